"""The disconnect line sums a session up, as Postfix's "disconnect ...
ehlo=1 mail=1 rcpt=0/1" line does: who, over what TLS, to which upstream
address, the commands counted, the messages, the bytes. And log_format =
json: every line the daemon writes is one JSON object."""

import json
import re
import socket

import pytest

import hardening_util as hu
import stp_harness as h

# The keys the disconnect line always had, last and in this order: parsers
# written against the old line keep working.
TAIL = ["reason", "client_in", "client_out", "upstream_in", "upstream_out", "duration_ms"]
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def keys_in_order(line):
    return [k for k, _ in h.LOG_KV.findall(line.split(" ", 2)[2])]


def my_address(c):
    return "%s:%d" % c.sock.getsockname()[:2]


def summary(proxy, c_addr):
    sid = proxy.wait_event("connect", client=c_addr)["id"]
    return sid, proxy.wait_event("disconnect", id=sid)


def test_starttls_session_is_summed_up_in_its_disconnect_line(make_proxy, aio):
    proxy = make_proxy(aio)
    c = h.SmtpConn(proxy.port)
    with c:
        me = my_address(c)
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.starttls(server_hostname="proxy.test")
        version = c.sock.version()
        c.expect("EHLO client.test", 250)
        h.send_message(c, h.sample_message("summary"))
        c.expect("QUIT", 221)
    aio.wait_messages(1)
    sid, d = summary(proxy, me)
    line = d["_line"]
    assert d["client"] == me, line
    assert d["listener"] == "main", line
    assert d["tls"] == version == "TLSv1.3", line
    assert d["cipher"] == proxy.wait_event("starttls", id=sid)["cipher"] != "none", line
    assert 'sni="proxy.test"' in line, line
    assert "client_cert" not in d, line
    assert d["upstream"] == "up" and d["upstream_address"] == aio.address, line
    assert d["upstream_tls"] == "none", line
    assert (" ehlo=2 starttls=1 mail=1 rcpt=1 data=1 quit=1 messages=1 rejected=0 "
            "reason=quit ") in line, line
    keys = keys_in_order(line)
    assert keys[:2] == ["id", "event"] and keys[-len(TAIL):] == TAIL, keys
    # The message went through both legs; TLS framing only adds to the client's.
    size = len(h.sample_message("summary"))
    for k in ("client_in", "upstream_out"):
        assert int(d[k]) > size, line
    assert int(d["client_out"]) > int(d["upstream_in"]) > 0, line


def test_plaintext_pipelined_session_counts_refusals_and_exact_bytes(make_proxy, make_scripted):
    """Without TLS every byte is known: what the client sent and read is
    what the line counts, and the upstream gets the same commands."""
    up = make_scripted(replies={"RCPT": b"550 5.1.1 <x@y>: no such user\r\n"})
    proxy = make_proxy(up, tls="none", require_tls=None, cert=None, key=None)
    sent = (b"EHLO client.test\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRSET\r\nNOOP\r\n"
            b"VRFY u\r\nQUIT\r\n")
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with s:
        me = "%s:%d" % s.getsockname()[:2]
        got = b""
        while not got.endswith(b"\r\n"):
            got += s.recv(4096)
        s.sendall(sent)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    assert got.count(b"\r\n221 ") == 1 and b"\r\n550 5.1.1" in got, got
    _, d = summary(proxy, me)
    line = d["_line"]
    assert (" ehlo=1 mail=1 rcpt=0/1 rset=1 noop=1 quit=1 unknown=1 messages=0 rejected=0 "
            "reason=quit ") in line, line
    assert d["tls"] == "none" and d["cipher"] == "none" and "sni" not in d, line
    assert d["client_in"] == str(len(sent)), line
    assert d["client_out"] == str(len(got)), line
    assert d["upstream_out"] == str(len(sent)), line
    assert int(d["upstream_in"]) > 0, line


def test_client_certificate_common_name_is_in_the_summary(make_proxy, aio, pki):
    proxy = make_proxy(aio, cert=pki.proxy.cert, key=pki.proxy.key,
                       client_ca=pki.client_ca.cert, verify_client="optional")
    c = h.SmtpConn(proxy.port)
    with c:
        me = my_address(c)
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.starttls(h.verifying_client_context(pki.ca, cert=pki.client))
        c.expect("EHLO client.test", 250)
        c.expect("QUIT", 221)
    _, d = summary(proxy, me)
    assert 'client_cert="client.test"' in d["_line"], d["_line"]
    assert " ehlo=2 starttls=1 quit=1 messages=0 rejected=0 reason=quit " in d["_line"]


def test_upstream_address_is_the_one_used_after_failover(make_proxy, aio):
    dead = h.free_port()
    proxy = make_proxy("127.0.0.1:%d, %s" % (dead, aio.address))
    c, _ = h.open_session(proxy.port)
    with c:
        me = my_address(c)
        c.expect("QUIT", 221)
    _, d = summary(proxy, me)
    assert d["upstream_address"] == aio.address, d["_line"]


def test_upstream_tls_version_is_in_the_summary(make_proxy, make_aio, pki):
    up = make_aio(tls_context=h.server_tls_context(pki.upstream), require_starttls=True)
    proxy = make_proxy(up, upstream_opts={"tls": "starttls", "verify": "yes",
                                          "ca_file": pki.ca.cert,
                                          "server_name": "upstream.test"})
    c, _ = h.open_session(proxy.port)
    with c:
        me = my_address(c)
        h.send_message(c, h.sample_message("upstream-tls"))
        c.expect("QUIT", 221)
    sid, d = summary(proxy, me)
    assert d["upstream_tls"] == proxy.wait_event("upstream_tls", id=sid)["tls"] == "TLSv1.3", \
        d["_line"]
    assert d["upstream_address"] == up.address and " messages=1 " in d["_line"], d["_line"]


def test_a_session_that_never_reached_the_upstream_says_none(make_proxy):
    dead = h.free_port()
    proxy = make_proxy("127.0.0.1:%d" % dead)
    c = h.SmtpConn(proxy.port)
    with c:
        me = my_address(c)
        c.greeting(421)
    _, d = summary(proxy, me)
    assert d["upstream_address"] == "none" and d["upstream_tls"] == "none", d["_line"]
    assert " messages=0 rejected=0 reason=" in d["_line"], d["_line"]


# --- log_format = json -------------------------------------------------------


@pytest.fixture
def json_logs(monkeypatch):
    """The harness reads JSON lines too (a line that is not JSON still
    parses as text, so a mixed log is visible as such)."""
    text = h.parse_log_line

    def parse(line):
        if line.startswith("{"):
            d = json.loads(line)
            d["_line"] = line
            return d
        return text(line)
    monkeypatch.setattr(h, "parse_log_line", parse)


def check_json_lines(lines):
    """Every line one JSON object: ts, level, event first, all values
    strings but flags (true)."""
    objs = []
    for line in lines:
        o = json.loads(line)
        assert isinstance(o, dict), line
        assert list(o)[:3] == ["ts", "level", "event"], line
        assert TS.match(o["ts"]), line
        assert o["level"] in ("error", "warn", "info", "debug"), line
        for k, v in o.items():
            assert isinstance(v, str) or v is True, line
        objs.append(o)
    return objs


def test_json_every_line_is_one_object_and_the_summary_has_its_members(make_proxy, aio,
                                                                       json_logs):
    proxy = make_proxy(aio, proxy_opts={"log_format": "json"})
    c = h.SmtpConn(proxy.port)
    with c:
        me = my_address(c)
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("EHLO client.test", 250)
        h.send_message(c, h.sample_message("json"))
        c.expect("QUIT", 221)
    sid, d = summary(proxy, me)
    assert proxy.stop() == 0
    objs = check_json_lines(proxy.log_lines())
    names = {o["event"] for o in objs}
    assert {"started", "listening", "connect", "starttls", "state", "disconnect",
            "stopping"} <= names, names
    (disc,) = [o for o in objs if o["event"] == "disconnect"]
    for k in ("id", "client", "listener", "tls", "cipher", "client_in", "client_out",
              "upstream_in", "upstream_out", "duration_ms", "reason"):
        assert k in disc, (k, disc)
    assert disc["id"] == sid and disc["client"] == me and disc["listener"] == "main", disc
    assert disc["tls"] == "TLSv1.3" and disc["sni"] == "proxy.test", disc
    assert disc["rcpt"] == "1" and disc["messages"] == "1" and disc["reason"] == "quit", disc
    assert int(disc["client_in"]) > len(h.sample_message("json")), disc
    assert int(disc["duration_ms"]) >= 0, disc


FORGED = 'a.test\n2026-01-01T00:00:00.000Z error event=reload status=failed "x=1\\'


def test_json_peer_values_round_trip_exactly(make_proxy, scripted, json_logs):
    """A server name with a newline, a quote and a backslash: escaped as
    \\xHH, \\" and \\\\ in text, it comes back byte for byte from JSON."""
    proxy = make_proxy(scripted, tls="implicit", require_tls=None,
                       proxy_opts={"log_format": "json"})
    h.s_client(proxy.port, "-servername", FORGED, stdin=b"QUIT\r\n")
    tls = proxy.wait_event("tls")
    assert tls["sni"] == FORGED, tls["_line"]
    d = proxy.wait_event("disconnect", id=tls["id"])
    assert d["sni"] == FORGED and "x" not in d, d["_line"]
    assert proxy.stop() == 0
    objs = check_json_lines(proxy.log_lines())
    assert not [o for o in objs if o["event"] == "reload"], objs


def test_a_reload_switches_text_to_json(make_proxy, aio, json_logs):
    proxy = make_proxy(aio)
    before = len(proxy.log_lines())
    assert not proxy.log_lines()[0].startswith("{")
    text = proxy.config_text.replace("[proxy]\n", "[proxy]\nlog_format = json\n", 1)
    (ev,) = hu.reload(proxy, text)
    assert ev["status"] == "ok" and ev["_line"].startswith("{"), ev["_line"]
    c, _ = h.open_session(proxy.port)
    with c:
        me = my_address(c)
        c.expect("QUIT", 221)
    summary(proxy, me)
    assert proxy.stop() == 0
    lines = proxy.log_lines()
    assert all(not l.startswith("{") for l in lines[:before])
    first_json = next(i for i, l in enumerate(lines) if l.startswith("{"))
    check_json_lines(lines[first_json:])
