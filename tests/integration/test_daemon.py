"""The daemon as a process: -t config check, --version/-h, signals, log
events, self-signed fallback certificate, IPv6 and several listeners."""

import os
import re
import signal
import smtplib
import socket
import subprocess
import textwrap

import pytest

import stp_harness as h


def good_config(tls_files, port=0, upstream_port=None):
    # As root, -t checks the account to become, as a start would.
    user = "user = root\n" if os.geteuid() == 0 else ""
    return textwrap.dedent("""\
        [proxy]
        log_level = debug
        hostname = proxy.test
        {user}
        [listener main]
        listen = 127.0.0.1:{port}
        tls = starttls
        require_tls = yes
        cert = {cert}
        key = {key}
        upstream = up
        max_line = 2048
        timeout_idle = 300s

        [upstream up]
        address = 127.0.0.1:{uport}
        tls = none
        """).format(port=port, uport=upstream_port or h.free_port(),
                    cert=tls_files["cert"], key=tls_files["key"], user=user)


def line_of(text, prefix):
    for i, l in enumerate(text.splitlines(), 1):
        if l.startswith(prefix):
            return i
    raise AssertionError("no line starting with %r" % prefix)


def run_check(stp_bin, path):
    return subprocess.run([stp_bin, "-t", "-c", path], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)


def test_config_check_accepts_a_good_config(stp_bin, tls_files, tmp_path):
    path = tmp_path / "good.conf"
    path.write_text(good_config(tls_files))
    p = run_check(stp_bin, str(path))
    assert p.returncode == 0, p.stderr.decode()


@pytest.mark.parametrize("setting,replacement", [
    ("timeout_idle = ", "timeout_idle = 300"),
    ("timeout_idle = ", "timeout_idle = 5m"),
    ("timeout_idle = ", "timeout_idle = 250ms"),
    ("max_line = ", "max_line = 512"),
    ("max_line = ", "max_line = 8192"),
    ("require_tls = ", "require_tls = no"),
    ("listen = ", "listen = [::1]:2525"),
], ids=["duration-plain", "duration-minutes", "duration-ms", "max_line-min", "max_line-max",
        "require_tls-no", "listen-ipv6"])
def test_config_check_accepts_valid_values(stp_bin, tls_files, tmp_path, setting, replacement):
    text = good_config(tls_files)
    lines = text.splitlines()
    lines[line_of(text, setting) - 1] = replacement
    path = tmp_path / "ok.conf"
    path.write_text("\n".join(lines) + "\n")
    p = run_check(stp_bin, str(path))
    assert p.returncode == 0, "%r rejected: %s" % (replacement, p.stderr.decode())


@pytest.mark.parametrize("setting,replacement", [
    ("max_line = ", "max_line = 511"),
    ("max_line = ", "max_line = 8193"),
    ("max_line = ", "max_line = 100"),
    ("max_line = ", "max_line = 100000"),
    ("tls = starttls", "tls = sometimes"),
    ("require_tls = ", "require_tls = perhaps"),
    ("timeout_idle = ", "timeout_idle = 5 fortnights"),
    ("listen = ", "listen = not-an-address"),
    ("cert = ", "cert = /nonexistent/cert.pem"),
    ("max_line = ", "frobnicate = 1"),
    ("address = ", "address = 127.0.0.1:99999"),
    ("log_level = ", "log_level = chatty"),
], ids=["max_line-511", "max_line-8193", "max_line-low", "max_line-high", "tls", "require_tls", "duration", "listen",
        "cert-missing", "unknown-key", "upstream-port", "log_level"])
def test_config_check_reports_file_and_line(stp_bin, tls_files, tmp_path, setting, replacement):
    text = good_config(tls_files)
    n = line_of(text, setting)
    lines = text.splitlines()
    lines[n - 1] = replacement
    path = tmp_path / "bad.conf"
    path.write_text("\n".join(lines) + "\n")
    p = run_check(stp_bin, str(path))
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0, "bad config (%r at line %d) accepted: %s" % (replacement, n, err)
    assert "%s:%d: " % (path, n) in err, "expected '%s:%d: message', got %r" % (path, n, err)


def test_config_check_reports_unknown_upstream_reference(stp_bin, tls_files, tmp_path):
    text = good_config(tls_files).replace("upstream = up", "upstream = nowhere")
    path = tmp_path / "bad.conf"
    path.write_text(text)
    p = run_check(stp_bin, str(path))
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0, err
    ok_lines = {line_of(text, "upstream = nowhere"), line_of(text, "[listener main]")}
    m = re.search(re.escape(str(path)) + r":(\d+): \S", err)
    assert m and int(m.group(1)) in ok_lines, err


def test_config_check_reports_missing_file(stp_bin, tmp_path):
    p = run_check(stp_bin, str(tmp_path / "missing.conf"))
    assert p.returncode != 0
    assert "missing.conf" in p.stderr.decode("utf-8", "replace")


def test_daemon_refuses_to_start_with_a_bad_config(stp_bin, tls_files, tmp_path):
    text = good_config(tls_files).replace("max_line = 2048", "max_line = 1")
    path = tmp_path / "bad.conf"
    path.write_text(text)
    p = subprocess.run([stp_bin, "-c", str(path)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)
    err = p.stderr.decode("utf-8", "replace")
    assert p.returncode != 0
    assert "%s:%d: " % (path, line_of(text, "max_line")) in err, err


def test_version_and_help_exit_zero(stp_bin):
    p = subprocess.run([stp_bin, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=10)
    assert p.returncode == 0, p.stdout
    assert re.search(rb"\d+\.\d+\.\d+", p.stdout), p.stdout
    p = subprocess.run([stp_bin, "-h"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=10)
    assert p.returncode == 0, p.stdout
    assert b"-c" in p.stdout and b"-t" in p.stdout, p.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_daemon_stops_cleanly_on_signal(make_proxy, scripted, sig):
    proxy = make_proxy(scripted)
    c, _ = h.open_session(proxy.port, tls=True)   # the daemon is really serving
    c.expect("QUIT", 221)
    c.close()
    assert proxy.stop(sig) == 0, proxy.log_tail()


def test_daemon_stops_on_sigterm_with_a_session_open(make_proxy, scripted):
    proxy = make_proxy(scripted)
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        assert proxy.stop(signal.SIGTERM) == 0, proxy.log_tail()


def test_log_has_connect_starttls_disconnect_with_one_id(proxy_aio):
    proxy, up = proxy_aio
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as s:
        local = s.sock.getsockname()
        s.starttls(context=h.client_tls_context())
        s.sendmail("b@example.org", ["a@example.net"], b"Subject: log\r\n\r\nlog test\r\n")
    client = "%s:%d" % local[:2]
    conn = proxy.wait_event("connect", client=client)
    sid = conn["id"]
    assert re.fullmatch(r"[0-9a-fA-F]+", sid), conn["_line"]
    assert conn.get("listener") == "main", conn["_line"]
    tls = proxy.wait_event("starttls", id=sid)
    assert tls.get("tls", "").startswith("TLSv1."), tls["_line"]
    assert tls.get("cipher"), tls["_line"]
    disc = proxy.wait_event("disconnect", id=sid)
    keys = ("client_in", "client_out", "upstream_in", "upstream_out", "duration_ms")
    for key in ("reason",) + keys:
        assert key in disc, "%s missing: %s" % (key, disc["_line"])
    for key in keys:
        assert disc[key].isdigit(), disc["_line"]
    # Bytes on the wire each way: TLS makes the client side larger than what
    # the upstream saw, and both directions carried something.
    for key in keys[:4]:
        assert int(disc[key]) > 0, disc["_line"]
    assert int(disc["client_in"]) > int(disc["upstream_out"]), disc["_line"]
    # timestamps and levels on every event line of this session
    for e in proxy.events():
        if e.get("id") == sid:
            assert e["level"] in ("error", "warn", "info", "debug"), e["_line"]


def test_listening_event_names_listener_and_address(make_proxy, scripted):
    proxy = make_proxy(scripted)
    e = proxy.wait_event("listening", listener="main")
    assert e.get("addr") == "127.0.0.1:%d" % proxy.port, e["_line"]


def test_without_cert_daemon_uses_self_signed_cert_and_warns(make_proxy, scripted):
    proxy = make_proxy(scripted, cert=None, key=None)
    assert any(parse and parse["level"] == "warn" for parse in map(h.parse_log_line,
                                                                   proxy.log_lines())), \
        "no warning about the self-signed certificate:\n" + proxy.log_text()
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        assert c.sock.getpeercert(binary_form=True), "no certificate presented"
        c.expect("QUIT", 221)


def require_ipv6_loopback():
    """Skip the test where ::1 cannot be bound."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")


def test_ipv6_loopback_listener(make_proxy, aio):
    require_ipv6_loopback()
    proxy = make_proxy(aio, listen="[::1]:0")
    port = proxy.port
    c = h.SmtpConn(port, host="::1")
    with c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("EHLO client.test", 250)
        c.begin_data()
        c.send(b"Subject: v6\r\n\r\nover ::1\r\n.\r\n")
        assert c.read_reply().code == 250
        c.expect("QUIT", 221)
    assert aio.wait_messages(1)[0]["original_content"] == b"Subject: v6\r\n\r\nover ::1\r\n"
    e = proxy.wait_event("connect")
    assert e["client"].startswith("[::1]:"), e["_line"]


def test_ipv6_upstream(make_proxy, make_scripted):
    require_ipv6_loopback()
    up = make_scripted(host="::1")
    proxy = make_proxy(up)
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("QUIT", 221)
    assert up.saw_verb("MAIL") == [b"MAIL FROM:<b@example.org>"]


def test_two_listeners_with_different_policies(make_proxy, scripted, tls_files):
    proxy = make_proxy(scripted, extra_listeners=[("plain", {
        "listen": "127.0.0.1:0", "tls": "none", "require_tls": "no",
        "upstream": "up"})])
    other = proxy.ports["plain"]
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        assert "STARTTLS" in c.expect("EHLO a.test", 250).keywords()
        c.expect("MAIL FROM:<b@example.org>", 530)
        c.expect("QUIT", 221)
    with h.SmtpConn(other) as c:
        c.greeting()
        assert "STARTTLS" not in c.expect("EHLO b.test", 250).keywords()
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("QUIT", 221)
    assert proxy.wait_event("connect", listener="plain")
