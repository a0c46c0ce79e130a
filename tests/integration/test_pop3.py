"""protocol = pop3 in front of Dovecot's pop3d (plaintext, running
unprivileged, tests/integration/dovecot_util.py pop3_*): the proxy alone
speaks before TLS (its greeting, its CAPA, -ERR to any login), STLS with
nothing pipelined after it executed, the upstream's CAPA without STLS after
TLS, multi-line responses relayed byte for byte. Real clients: curl
--ssl-reqd pop3://, Python's poplib (stls() and POP3_SSL), openssl s_client
-starttls pop3."""

import os
import poplib
import re
import socket
import ssl
import subprocess

import pytest

import stp_harness as h
from dovecot_util import pop3_dovecot, pop3_dovecot_server, pop3_fill, \
    pop3_login_lines, pop3_start  # noqa: F401 (fixture)

USER = "alice@example.net"
# Lines POP3 must dot-stuff, and lines that look like POP3 responses.
MSG_DOTS = (b"From: s@example.org\r\nTo: alice@example.net\r\nSubject: dots\r\n\r\n"
            b"first line\r\n.\r\n..two dots\r\n.leading dot\r\n+OK not a reply\r\n"
            b"-ERR nor this\r\n. \r\n8bit \xc3\xa9\r\nlast\r\n")
MSG_PLAIN = (b"From: s@example.org\r\nTo: alice@example.net\r\nSubject: plain\r\n\r\n"
             b"hello\r\n")


def pop3_proxy(make_proxy, dovecot, **kw):
    opts = {"protocol": "pop3"}
    opts.update(kw)
    return make_proxy(dovecot.pop3_address, **opts)


class Pop3Raw:
    """A POP3 client on a socket, reading raw bytes (what the wire holds)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def _more(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed; had %r" % self.buf)
        self.buf += data

    def line(self):
        while b"\r\n" not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def multi(self):
        """The raw bytes of a multi-line body up to and with ".\r\n"."""
        while True:
            if self.buf.startswith(b".\r\n"):
                end = 3
            else:
                i = self.buf.find(b"\r\n.\r\n")
                end = i + 5 if i >= 0 else -1
            if end > 0:
                body, self.buf = self.buf[:end], self.buf[end:]
                return body
            self._more()

    def send(self, data):
        self.sock.sendall(data)

    def cmd(self, line):
        self.send(line.encode() + b"\r\n")
        return self.line()

    def starttls(self):
        self.sock = h.client_tls_context().wrap_socket(self.sock, server_hostname="proxy.test")
        self.buf = b""

    def close(self):
        self.sock.close()


def dot_stuff(raw):
    return re.sub(rb"(?m)^\.", b"..", raw)


@pytest.fixture
def dovecot_pop3(pop3_dovecot_server):
    pop3_fill(pop3_dovecot_server, USER, [MSG_DOTS, MSG_PLAIN])
    return pop3_dovecot_server


def test_greeting_and_capa_before_tls_are_the_proxys(make_proxy, dovecot_pop3):
    proxy = pop3_proxy(make_proxy, dovecot_pop3)
    c = Pop3Raw(proxy.port)
    try:
        greeting = c.line()
        assert greeting == b"+OK proxy.test POP3 ready", greeting     # no <APOP stamp>
        assert c.cmd("CAPA") == b"+OK Capability list follows"
        assert c.multi() == b"STLS\r\n.\r\n"
        assert c.cmd("QUIT").startswith(b"+OK")
    finally:
        c.close()


def test_login_before_tls_refused_and_never_reaches_dovecot(make_proxy, dovecot_pop3):
    proxy = pop3_proxy(make_proxy, dovecot_pop3)
    c = Pop3Raw(proxy.port)
    try:
        c.line()
        for line in ("USER " + USER, "PASS secret", "APOP %s 0123456789abcdef" % USER,
                     "AUTH PLAIN AGFsaWNlQGV4YW1wbGUubmV0AHNlY3JldA==", "NOOP", "STAT"):
            r = c.cmd(line)
            assert r.startswith(b"-ERR"), (line, r)
        assert c.cmd("USER x").startswith(b"-ERR [AUTH]")
        assert c.cmd("QUIT").startswith(b"+OK")
    finally:
        c.close()
    assert h.wait_until(lambda: any("Disconnected" in l or "Aborted" in l
                                    for l in pop3_login_lines(dovecot_pop3)), 10)
    log = "\n".join(pop3_login_lines(dovecot_pop3))
    assert "alice" not in log and "user=<x>" not in log, log
    assert "Login:" not in log, log


def test_injection_after_stls_is_never_executed(make_proxy, dovecot_pop3):
    """USER/PASS in the same packet as STLS (NO STARTTLS, USENIX Security
    2021): dropped with the plaintext, never executed inside TLS."""
    proxy = pop3_proxy(make_proxy, dovecot_pop3)
    c = Pop3Raw(proxy.port)
    try:
        c.line()
        c.send(b"STLS\r\nUSER " + USER.encode() + b"\r\nPASS injected\r\n")
        assert c.line() == b"+OK Begin TLS negotiation"
        assert c.buf == b""
        c.starttls()
        # Had the injected lines run, these replies would be theirs.
        assert c.cmd("CAPA").startswith(b"+OK")
        capa = c.multi()
        assert b"USER" in capa
        assert c.cmd("STAT").startswith(b"-ERR"), "STAT worked: a login was injected"
        assert c.cmd("QUIT").startswith(b"+OK")
    finally:
        c.close()
    h.wait_until(lambda: any("Disconnected" in l or "Logged out" in l
                             for l in pop3_login_lines(dovecot_pop3)), 10)
    log = dovecot_pop3.log_text()
    assert "Login: user=<" not in log, log
    assert "injected" not in log


def test_curl_ssl_reqd_list_and_retr(make_proxy, dovecot_pop3, tmp_path):
    curl = h.require_program("curl", "curl")
    proxy = pop3_proxy(make_proxy, dovecot_pop3)
    url = "pop3://127.0.0.1:%d/" % proxy.port
    base = [curl, "-sS", "--ssl-reqd", "-k", "--max-time", "20", "-u", USER + ":pw"]
    out = subprocess.run(base + [url], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert re.match(rb"1 %d\r\n2 %d\r\n$" % (len(MSG_DOTS), len(MSG_PLAIN)), out.stdout), \
        out.stdout
    out = subprocess.run(base + [url + "1"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == MSG_DOTS, out.stdout


def test_poplib_stls_capa_stripped_retr_top_uidl_dele(make_proxy, tls_files, tmp_path):
    """Dovecot with ssl = yes offers STLS itself: after the proxy's TLS the
    client must not see it (it would STLS again, to the proxy)."""
    d = pop3_start(pop3_dovecot(tmp_path, ssl_pair=tls_files))
    try:
        paths = pop3_fill(d, USER, [MSG_DOTS, MSG_PLAIN])
        with socket.create_connection(("127.0.0.1", d.pop3_port), timeout=5) as s:
            s.recv(512)
            s.sendall(b"CAPA\r\n")
            direct = b""
            while b"\r\n.\r\n" not in direct:
                direct += s.recv(4096)
        assert b"\r\nSTLS\r\n" in direct, direct          # what the proxy removes
        proxy = pop3_proxy(make_proxy, d)
        p = poplib.POP3("127.0.0.1", proxy.port, timeout=10)
        try:
            assert p.getwelcome() == b"+OK proxy.test POP3 ready"
            assert p.capa() == {"STLS": []}
            p.stls(context=h.client_tls_context())
            capa = p.capa()
            assert "STLS" not in capa and "USER" in capa, capa
            assert all(not m.upper().endswith("-PLUS") for m in capa.get("SASL", [])), capa
            p.user(USER)
            p.pass_("pw")
            assert p.stat() == (2, len(MSG_DOTS) + len(MSG_PLAIN))
            resp, lines, octets = p.retr(1)
            assert b"\r\n".join(lines) + b"\r\n" == MSG_DOTS
            resp, lines, _ = p.top(1, 0)
            assert b"\r\n".join(lines) + b"\r\n" == MSG_DOTS.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
            resp, uids, _ = p.uidl()
            assert len(uids) == 2 and uids[0].startswith(b"1 "), uids
            assert p.dele(1).startswith(b"+OK")
            assert p.quit().startswith(b"+OK")
        finally:
            p.close()
        assert h.wait_until(lambda: not os.path.exists(paths[0]) and
                            not any(n.startswith(os.path.basename(paths[0]).split(",")[0])
                                    for n in os.listdir(os.path.dirname(paths[0]) + "/../cur")),
                            10), "DELE+QUIT did not expunge"
    finally:
        d.cleanup()


def test_retr_raw_bytes_are_the_stored_message_stuffed(make_proxy, dovecot_pop3):
    """The relayed response is exactly Dovecot's: dot-stuffed lines pass
    untouched, "+OK"/"-ERR" lines inside the message are content; LIST and
    UIDL pipelined behind RETR come after its end (RFC 2449 PIPELINING)."""
    proxy = pop3_proxy(make_proxy, dovecot_pop3)
    c = Pop3Raw(proxy.port)
    try:
        c.line()
        assert c.cmd("STLS").startswith(b"+OK")
        c.starttls()
        assert c.cmd("USER " + USER).startswith(b"+OK")
        assert c.cmd("PASS pw").startswith(b"+OK")
        c.send(b"RETR 1\r\nLIST\r\nUIDL 2\r\n")
        assert c.line().startswith(b"+OK")
        assert c.multi() == dot_stuff(MSG_DOTS) + b".\r\n"
        assert c.line().startswith(b"+OK")
        assert c.multi() == b"1 %d\r\n2 %d\r\n.\r\n" % (len(MSG_DOTS), len(MSG_PLAIN))
        assert c.line().startswith(b"+OK 2 ")
        assert c.cmd("STLS") == b"-ERR TLS already active"
        assert c.cmd("QUIT").startswith(b"+OK")
    finally:
        c.close()


def test_pop3_ssl_on_implicit_listener(make_proxy, dovecot_pop3):
    proxy = pop3_proxy(make_proxy, dovecot_pop3, tls="implicit")
    p = poplib.POP3_SSL("127.0.0.1", proxy.port, context=h.client_tls_context(), timeout=10)
    try:
        # Dovecot's own, relayed under TLS (here with its [XCLIENT] code)
        assert p.getwelcome().startswith(b"+OK") and b"Dovecot" in p.getwelcome()
        assert "STLS" not in p.capa()
        p.user(USER)
        p.pass_("pw")
        resp, lines, _ = p.retr(2)
        assert b"\r\n".join(lines) + b"\r\n" == MSG_PLAIN
        p.quit()
    finally:
        p.close()


def test_openssl_s_client_starttls_pop3(make_proxy, dovecot_pop3):
    proxy = pop3_proxy(make_proxy, dovecot_pop3)
    rc, out = h.s_client(proxy.port, "-starttls", "pop3", "-quiet",
                         stdin=("USER %s\nPASS pw\nSTAT\nQUIT\n" % USER).encode())
    assert "+OK Logged in" in out, out
    assert re.search(r"\+OK 2 %d" % (len(MSG_DOTS) + len(MSG_PLAIN)), out), out


def test_config_refuses_upstream_starttls_for_pop3(stp_bin, tmp_path, tls_files):
    text = h.render_config(
        {"hostname": "proxy.test"},
        [("main", {"listen": "127.0.0.1:0", "protocol": "pop3", "tls": "starttls",
                   "cert": tls_files["cert"], "key": tls_files["key"], "upstream": "up"})],
        [("up", {"address": "127.0.0.1:110", "tls": "starttls"})])
    p = h.check_config(stp_bin, str(tmp_path), text)
    assert p.returncode != 0 and "not available for protocol = pop3" in p.stdout, p.stdout


def test_client_xclient_never_reaches_dovecot(make_proxy, dovecot_pop3):
    """Dovecot trusts 127.0.0.0/8 here, as it would trust the proxy: a
    client's XCLIENT through the proxy would let it pose as any address."""
    proxy = pop3_proxy(make_proxy, dovecot_pop3, tls="implicit")
    p = poplib.POP3_SSL("127.0.0.1", proxy.port, context=h.client_tls_context(), timeout=10)
    try:
        assert b"XCLIENT" in p.getwelcome()               # Dovecot would take it
        with pytest.raises(poplib.error_proto):
            p._shortcmd("XCLIENT ADDR=6.6.6.6 PORT=1")
        p.user(USER)
        p.pass_("pw")
        p.quit()
    finally:
        p.close()
    h.wait_until(lambda: any("Login:" in l for l in pop3_login_lines(dovecot_pop3)), 10)
    log = dovecot_pop3.log_text()
    assert "Login: user=<%s>" % USER in log, log
    assert "6.6.6.6" not in log, log


def test_proxy_v2_gives_dovecot_the_client_address(make_proxy, tmp_path):
    d = pop3_start(pop3_dovecot(tmp_path, haproxy=True), haproxy=True)
    try:
        pop3_fill(d, USER, [MSG_PLAIN])
        proxy = pop3_proxy(make_proxy, d, tls="implicit",
                           upstream_opts={"client_identity": "proxy-v2"})
        ctx = h.client_tls_context()
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10,
                                       source_address=("127.0.0.2", 0))
        with ctx.wrap_socket(raw, server_hostname="proxy.test") as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"+OK")
            s.sendall(("USER %s\r\nPASS pw\r\nQUIT\r\n" % USER).encode())
            assert [f.readline()[:3] for _ in range(3)] == [b"+OK"] * 3
        assert h.wait_until(lambda: any("Login:" in l for l in pop3_login_lines(d)), 10)
        login = [l for l in pop3_login_lines(d) if "Login:" in l][0]
        assert "rip=127.0.0.2" in login, login
    finally:
        d.cleanup()
