"""[admin] listen = HOST:PORT (issue 13): /metrics, /healthz, /readyz on
a small HTTP server on the main loop. The endpoints and their errors, the
counters moving by exactly what a test does (one worker and two),
promtool's lint of a real scrape, /readyz 503 while draining."""

import re
import signal
import socket
import subprocess
import time

import pytest

import stp_harness as h
import hardening_util as hu

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def admin_port(proxy):
    e = proxy.wait_event("admin_listening")
    return int(e["addr"].rsplit(":", 1)[1])


def raw(port, data, timeout=5.0, shut=False):
    """Send DATA, read until the server closes: (status, headers, body, raw)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
    finally:
        s.close()
    return parse_response(out)


def parse_response(out):
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.1 (\d{3}) ", lines[0])
    assert m, "not an HTTP response: %r" % out[:200]
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(m.group(1)), headers, body, out


def get(port, path, method="GET", version="1.1"):
    req = "%s %s HTTP/%s\r\nHost: 127.0.0.1\r\n\r\n" % (method, path, version)
    return raw(port, req.encode())


LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def scrape(port):
    """{(name, ((label, value), ...)): float} of /metrics."""
    st, hd, body, _ = get(port, "/metrics")
    assert st == 200 and hd["content-type"] == METRICS_TYPE, (st, hd)
    out = {}
    for ln in body.decode().splitlines():
        if not ln or ln.startswith("#"):
            continue
        m = LINE.match(ln)
        assert m, "bad exposition line %r" % ln
        labels = tuple(sorted(LABEL.findall(m.group(3) or "")))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def val(metrics, name, **labels):
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name, **labels):
    return val(after, name, **labels) - val(before, name, **labels)


@pytest.fixture
def admin_proxy(make_proxy, scripted):
    p = make_proxy(scripted, admin=True)
    return p, admin_port(p)


# --- the endpoints ------------------------------------------------------------

def test_healthz_readyz_and_metrics_answer_200(admin_proxy):
    _, port = admin_proxy
    st, hd, body, _ = get(port, "/healthz")
    assert (st, body) == (200, b"ok\n") and hd["connection"] == "close"
    st, _, body, _ = get(port, "/readyz")
    assert (st, body) == (200, b"ready\n")
    st, hd, body, _ = get(port, "/metrics", version="1.0")
    assert st == 200 and hd["content-type"] == METRICS_TYPE
    assert int(hd["content-length"]) == len(body)
    assert b'starttls_proxy_build_info{version="' in body
    assert b"starttls_proxy_workers 1\n" in body


def test_head_sends_the_same_headers_without_a_body(admin_proxy):
    _, port = admin_proxy
    for path in ("/metrics", "/healthz", "/readyz", "/nowhere"):
        gst, ghd, gbody, _ = get(port, path)
        st, hd, body, _ = get(port, path, method="HEAD")
        assert st == gst and body == b"", (path, st, body)
        assert hd["content-type"] == ghd["content-type"]
        if path != "/metrics":   # its length changes as it counts
            assert int(hd["content-length"]) == len(gbody)
        else:
            assert int(hd["content-length"]) > 1000


def test_unknown_path_is_404_other_methods_405(admin_proxy):
    _, port = admin_proxy
    assert get(port, "/")[0] == 404
    assert get(port, "/metrics/x")[0] == 404
    assert get(port, "/metrics?name[]=x")[0] == 200   # a query is ignored
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "get"):
        st, hd, _, _ = get(port, "/metrics", method=method)
        assert st == 405 and hd["allow"] == "GET, HEAD", (method, st, hd)


@pytest.mark.parametrize("req", [
    b"GET /metrics\r\n\r\n",
    b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\n\r\n",                       # no Host
    b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1 \r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /metrics HTTP/1.1\rHost: x\r\n\r\n",
    b"GET /met\x00rics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\x01\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
], ids=lambda r: repr(r[:30]))
def test_malformed_requests_are_400(admin_proxy, req):
    _, port = admin_proxy
    st, _, body, _ = raw(port, req)
    assert st == 400, (req, body)


def test_bare_lf_line_ends_are_accepted(admin_proxy):
    _, port = admin_proxy
    assert raw(port, b"GET /healthz HTTP/1.0\n\n")[0] == 200


def test_a_request_head_over_8_kib_is_400(admin_proxy):
    _, port = admin_proxy
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n"
    st, _, _, _ = raw(port, big)
    assert st == 400
    # just under the bound is fine
    ok = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n"
    assert raw(port, ok)[0] == 200


def test_a_slow_request_gets_400_after_10_s_and_is_closed(admin_proxy):
    _, port = admin_proxy
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    t0 = time.monotonic()
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")   # never finished
    out = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        out += d
    waited = time.monotonic() - t0
    s.close()
    assert parse_response(out)[0] == 400
    assert 9.0 <= waited <= 12.5, waited
    assert get(port, "/healthz")[0] == 200


def refused_at_accept(port, source="127.0.0.1"):
    """Is a request from SOURCE closed without an answer (reset at accept:
    connect() itself may already see it)?"""
    try:
        extra = socket.create_connection(("127.0.0.1", port), timeout=5,
                                         source_address=(source, 0))
        try:
            extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            got = extra.recv(100)
        finally:
            extra.close()
    except (ConnectionResetError, BrokenPipeError):
        got = b""
    return got == b""


def test_more_than_64_admin_connections_are_closed_at_accept(admin_proxy):
    proxy, port = admin_proxy
    # 8 from each of 8 addresses: the per-address cap is not what stops them
    held = [socket.create_connection(("127.0.0.1", port), timeout=5,
                                     source_address=("127.0.0.%d" % (2 + i % 8), 0))
            for i in range(64)]
    try:
        time.sleep(0.3)
        assert refused_at_accept(port, "127.0.0.10")
        # the mail path is not affected
        with hu.tls_session(proxy.port) as c:
            c.expect("NOOP", 250)
    finally:
        for s in held:
            s.close()
    assert h.wait_until(lambda: status_or_none(port, "/healthz") == 200, 5)


def test_one_address_cannot_take_the_admin_endpoints(admin_proxy):
    """At most 8 connections from one address: a client holding them open
    (slowly sending, reconnecting at each timeout) cannot keep the
    orchestrator's probes out. Found by an outside attack."""
    proxy, port = admin_proxy
    held = [socket.create_connection(("127.0.0.1", port), timeout=5,
                                     source_address=("127.0.0.2", 0)) for _ in range(60)]
    try:
        time.sleep(0.3)
        assert refused_at_accept(port, "127.0.0.2")
        assert get(port, "/readyz")[0] == 200
        assert get(port, "/healthz")[0] == 200
    finally:
        for s in held:
            s.close()


def status_or_none(port, path):
    try:
        return get(port, path)[0]
    except OSError:   # reset: still at the limit
        return None


# --- the counters -------------------------------------------------------------

def failed_handshake(port):
    c = h.SmtpConn(port)
    c.greeting()
    c.expect("EHLO client.test", 250)
    c.expect("STARTTLS", 220)
    c.send(b"this is not a ClientHello\r\n" * 4)
    c.read_until_closed(timeout=5)
    c.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_counters_move_by_exactly_what_the_test_did(make_proxy, scripted, workers):
    proxy = make_proxy(scripted, admin=True, proxy_opts={"workers": str(workers)},
                       extra_listeners=[("deny", {
                           "listen": "127.0.0.1:0", "tls": "starttls", "require_tls": "yes",
                           "upstream": "up", "allow": "192.0.2.0/24"})])
    port = admin_port(proxy)
    before = scrape(port)
    assert val(before, "starttls_proxy_workers") == workers
    for _ in range(3):
        with hu.tls_session(proxy.port) as c:
            c.expect("QUIT", 221)
    for _ in range(2):
        failed_handshake(proxy.port)
    for _ in range(2):
        c = h.SmtpConn(proxy.ports["deny"])
        c.read_until_closed(timeout=5)
        c.close()

    def settled():
        m = scrape(port)
        done = (val(m, "starttls_proxy_connections_active", listener="main") == 0 and
                val(m, "starttls_proxy_connections_active", listener="deny") == 0 and
                delta(before, m, "starttls_proxy_connections_total", listener="main") == 5)
        return m if done else None
    after = h.wait_until(settled, 5)
    assert after, scrape(port)
    d = lambda name, **l: delta(before, after, "starttls_proxy_" + name, **l)
    assert d("connections_total", listener="main") == 5
    assert d("connections_total", listener="deny") == 2
    assert d("connections_rejected_total", listener="deny", reason="not_allowed") == 2
    assert sum(d("connections_rejected_total", listener="main", reason=r)
               for r in ("not_allowed", "max_connections", "max_connections_per_ip")) == 0
    assert d("tls_handshakes_total", listener="main", result="ok") == 3
    assert d("tls_handshakes_total", listener="main", result="failed") == 2
    assert d("tls_handshake_duration_seconds_count", listener="main") == 3
    assert d("sessions_closed_total", listener="main", reason="quit") == 3
    assert d("sessions_closed_total", listener="main", reason="tls_handshake_failed") == 2
    assert d("sessions_closed_total", listener="deny", reason="not_allowed") == 2
    assert d("session_duration_seconds_count", listener="main") == 5
    # a STARTTLS listener connects upstream first: every session but the refused
    assert d("upstream_connections_total", upstream="up", result="ok") == 5
    assert d("upstream_connections_total", upstream="up", result="failed") == 0
    assert d("bytes_total", listener="main", direction="client_in") > 0
    assert d("bytes_total", listener="main", direction="upstream_out") > 0
    assert val(after, "starttls_proxy_draining") == 0


def test_failed_upstream_attempts_count_each_failover(make_proxy):
    dead1, dead2 = h.free_port(), h.free_port()
    up = h.ScriptedUpstream().start()
    try:
        proxy = make_proxy("127.0.0.1:%d, 127.0.0.1:%d, %s" % (dead1, dead2, up.address),
                           admin=True)
        port = admin_port(proxy)
        before = scrape(port)
        with hu.tls_session(proxy.port) as c:
            c.expect("QUIT", 221)
        after = h.wait_until(lambda: (lambda m: m if delta(
            before, m, "starttls_proxy_upstream_connections_total",
            upstream="up", result="ok") == 1 else None)(scrape(port)), 5)
        assert after
        assert delta(before, after, "starttls_proxy_upstream_connections_total",
                     upstream="up", result="failed") == 2
    finally:
        up.stop()


def test_reloads_are_counted(admin_proxy):
    proxy, port = admin_proxy
    hu.reload(proxy)
    hu.reload(proxy, proxy.config_text + "\n[bogus]\n")
    m = scrape(port)
    assert val(m, "starttls_proxy_reloads_total", result="ok") == 1
    assert val(m, "starttls_proxy_reloads_total", result="failed") == 1


def test_promtool_finds_no_problem_in_a_real_scrape(make_proxy, scripted):
    promtool = h.require_program("promtool", "prometheus")
    proxy = make_proxy(scripted, admin=True, proxy_opts={"workers": "2"})
    port = admin_port(proxy)
    with hu.tls_session(proxy.port) as c:
        c.begin_data()
        c.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
        assert c.read_reply().code == 250
        c.expect("QUIT", 221)
    failed_handshake(proxy.port)
    body = get(port, "/metrics")[2]
    r = subprocess.run([promtool, "check", "metrics"], input=body,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == b"", r.stdout.decode()


# --- draining -----------------------------------------------------------------

def test_readyz_is_503_while_draining_and_healthz_still_200(make_proxy, scripted):
    proxy = make_proxy(scripted, admin=True, proxy_opts={"drain_timeout": "20s"})
    port = admin_port(proxy)
    assert get(port, "/readyz")[0] == 200
    busy = hu.tls_session(proxy.port)
    with busy:
        busy.begin_data()
        busy.send(b"Subject: held\r\n\r\nfirst half\r\n")
        proxy.send_signal(signal.SIGTERM)
        assert h.wait_until(lambda: get(port, "/readyz")[0] == 503, 3)
        st, _, body, _ = get(port, "/readyz")
        assert (st, body) == (503, b"draining\n")
        assert get(port, "/healthz")[0] == 200
        m = scrape(port)
        assert val(m, "starttls_proxy_draining") == 1
        assert val(m, "starttls_proxy_connections_active", listener="main") == 1
        time.sleep(0.5)
        assert get(port, "/readyz")[0] == 503 and proxy.alive()
        busy.send(b"second half\r\n.\r\n")
        assert busy.read_reply().code == 250
    hu.assert_clean_exit(proxy, hu.wait_exit(proxy, 5))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
