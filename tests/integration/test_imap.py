"""protocol = imap in front of Dovecot's imapd (running unprivileged as the
plaintext upstream, tests/integration/dovecot_util.py DovecotImap, with
COMPRESS=DEFLATE and STARTTLS offered so that stripping them is real): real
clients (imaplib, curl, openssl s_client) and the attacks the IMAP engine
is there for: login before TLS, injection after STARTTLS, capabilities,
literals carrying protocol lines, an upstream PREAUTH."""

import imaplib
import os
import re
import socket
import ssl
import subprocess
import threading
import time

import pytest

import stp_harness as h
from dovecot_util import DovecotImap, dovecot_imap  # noqa: F401 (fixture)

# CRLF, a line longer than 998 octets, 8-bit, and lines that would be
# commands if a literal were read as anything but data.
MSG = (b"From: s@example.org\r\nTo: alice@example.net\r\nSubject: imap\r\n\r\n"
       b"a2 LOGOUT\r\n* CAPABILITY IMAP4rev1 STARTTLS\r\n"
       b"b1 LOGIN alice secret\r\n" + b"x" * 3000 + b"\r\n"
       b"8bit \xc3\xa9\xff\r\n.\r\nlast\r\n")
FORBIDDEN = ("STARTTLS", "LOGINDISABLED", "COMPRESS=DEFLATE")


def imap_proxy(make_proxy, upstream, **kw):
    opts = {"protocol": "imap"}
    opts.update(kw)
    return make_proxy(upstream, **opts)


class Imap:
    """A raw IMAP client: lines in, responses (with their literals) out."""

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        d = self.sock.recv(65536)
        if not d:
            raise EOFError("closed; have %r" % self.buf)
        self.buf += d

    def line(self):
        """One response line with the literals it announces, as bytes."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            ln, self.buf = self.buf.split(b"\r\n", 1)
            out += ln + b"\r\n"
            m = re.search(rb"~?\{(\d+)\}$", ln)
            if not m:
                return out
            n = int(m.group(1))
            while len(self.buf) < n:
                self._fill()
            out += self.buf[:n]
            self.buf = self.buf[n:]

    def until(self, tag):
        """Lines up to and including the one tagged TAG."""
        lines = []
        while True:
            ln = self.line()
            lines.append(ln)
            if ln.startswith(tag.encode() + b" "):
                return lines

    def cmd(self, tag, text):
        self.send(("%s %s\r\n" % (tag, text)).encode())
        return self.until(tag)

    def starttls(self):
        r = self.cmd("t", "STARTTLS")
        assert r[-1].startswith(b"t OK"), r
        assert self.buf == b""
        self.sock = h.client_tls_context().wrap_socket(self.sock)

    def closed(self, timeout=5):
        self.sock.settimeout(timeout)
        try:
            while True:
                d = self.sock.recv(4096)
                if not d:
                    return True
                self.buf += d
        except (ConnectionResetError, ssl.SSLError):
            return True
        except socket.timeout:
            return False


def caps_of(lines):
    text = b"".join(lines).decode("latin-1")
    found = re.findall(r"CAPABILITY ([^\]\r\n]*)", text, re.I)
    return [c.upper().split() for c in found]


def assert_no_forbidden(lines):
    for caps in caps_of(lines):
        for bad in FORBIDDEN:
            assert bad not in caps, (bad, lines)
        assert not [c for c in caps if c.startswith("AUTH=") and c.endswith("-PLUS")]


def test_pre_tls_the_proxy_alone_speaks(make_proxy, dovecot_imap):
    proxy = imap_proxy(make_proxy, dovecot_imap)
    c = Imap(proxy.port)
    try:
        g = c.line()
        assert g == b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] proxy.test ready.\r\n"
        r = c.cmd("a", "CAPABILITY")
        assert r == [b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n",
                     b"a OK Capability completed.\r\n"]
        assert c.cmd("b", "LOGIN alice secret")[-1].startswith(b"b NO [PRIVACYREQUIRED]")
        assert c.cmd("c", "AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==")[-1].startswith(
            b"c NO [PRIVACYREQUIRED]")
        assert c.cmd("d", "SELECT INBOX")[-1].startswith(b"d BAD")
        assert c.cmd("e", "NOOP") == [b"e OK NOOP completed.\r\n"]
        # A synchronizing literal on a refused line: BAD, and no "+".
        r = c.cmd("f", "LOGIN {5}")
        assert r == [r[-1]] and r[-1].startswith((b"f BAD", b"f NO [PRIVACYREQUIRED]")), r
        # A non-synchronizing one cannot be skipped: * BYE and close.
        c.send(b"g LOGIN {5+}\r\nalice secret\r\n")
        assert c.line().startswith(b"* BYE")
        assert c.closed()
    finally:
        c.close()
    time.sleep(0.3)
    log = dovecot_imap.log_text()
    assert "alice" not in log, log


def test_imaplib_starttls_append_fetch_byte_identical(make_proxy, dovecot_imap):
    proxy = imap_proxy(make_proxy, dovecot_imap)
    m = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)
    try:
        assert "LOGINDISABLED" in m.capabilities and "STARTTLS" in m.capabilities
        m.starttls(ssl_context=h.client_tls_context())
        for bad in FORBIDDEN:
            assert bad not in m.capabilities, m.capabilities
        m.login("alice", "secret")
        typ, _ = m.append("INBOX", None, None, MSG)
        assert typ == "OK"
        typ, _ = m.select("INBOX")
        assert typ == "OK"
        typ, data = m.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == MSG
        m.logout()
    finally:
        try:
            m.shutdown()
        except OSError:
            pass
    assert dovecot_imap.imap_messages("alice") == [MSG]
    e = proxy.wait_event("disconnect")
    assert "login=1" in str(e) and "append=1" in str(e), e


def test_capabilities_stripped_untagged_and_in_codes(make_proxy, dovecot_imap):
    proxy = imap_proxy(make_proxy, dovecot_imap)
    c = Imap(proxy.port)
    try:
        c.line()
        c.starttls()
        r = c.cmd("a", "CAPABILITY")
        assert caps_of(r) and "IMAP4REV1" in caps_of(r)[0]
        assert_no_forbidden(r)
        r = c.cmd("b", "LOGIN alice secret")
        assert r[-1].startswith(b"b OK"), r
        assert_no_forbidden(r)
        r = c.cmd("c", "capability")
        assert "IDLE" in caps_of(r)[0] and "MOVE" in caps_of(r)[0]
        assert_no_forbidden(r)
        assert c.cmd("d", "COMPRESS DEFLATE")[-1].startswith(b"d NO")
        assert c.cmd("e", "STARTTLS")[-1].startswith(b"e BAD")
        assert c.cmd("f", "NOOP")[-1].startswith(b"f OK")   # still plain text
        c.cmd("g", "LOGOUT")
        assert c.closed()
    finally:
        c.close()
    log = dovecot_imap.log_text()
    assert "COMPRESS" not in log


def test_commands_pipelined_after_starttls_are_discarded(make_proxy, dovecot_imap):
    proxy = imap_proxy(make_proxy, dovecot_imap)
    c = Imap(proxy.port)
    try:
        c.line()
        c.send(b"t STARTTLS\r\nb LOGIN alice secret\r\nb2 SELECT INBOX\r\n")
        assert c.line().startswith(b"t OK")
        c.sock = h.client_tls_context().wrap_socket(c.sock)
        r = c.cmd("c", "NOOP")
        assert r[-1].startswith(b"c OK"), r
        assert not [ln for ln in r if ln.startswith(b"b")], r
        # not logged in: the injected LOGIN never ran
        r = c.cmd("e", "SELECT INBOX")
        assert not r[-1].startswith(b"e OK"), r
    finally:
        c.close()
    time.sleep(0.3)
    assert "user=<alice>" not in dovecot_imap.log_text()


def test_id_is_answered_by_the_proxy_never_an_address_for_dovecot(make_proxy, tmp_path,
                                                                   tls_files):
    """Dovecot takes x-originating-ip from a trusted address, which the
    proxy's is: a client's ID must never reach it (found by an outside
    attack: Dovecot logged rip=203.0.113.66)."""
    d = DovecotImap(tmp_path, ssl_pair=tls_files,
                    extra_conf="login_trusted_networks = 127.0.0.0/8\n")
    try:
        d.start()
        proxy = imap_proxy(make_proxy, d)
        c = Imap(proxy.port)
        try:
            c.line()
            assert c.cmd("t", "STARTTLS")[-1].startswith(b"t OK")
            c.sock = h.client_tls_context().wrap_socket(c.sock)
            r = c.cmd("i", 'ID ("x-originating-ip" "203.0.113.66" '
                           '"x-session-id" "spoofed")')
            assert r == [b"* ID NIL\r\n", b"i OK ID completed.\r\n"], r
            r = c.cmd("j", "ID {5}")
            assert r[-1].startswith(b"j NO"), r
            assert c.cmd("l", "LOGIN alice secret")[-1].startswith(b"l OK")
        finally:
            c.close()
        time.sleep(0.3)
        log = d.log_text()
        assert "user=<alice>" in log
        assert "203.0.113.66" not in log and "spoofed" not in log, log[-2000:]
    finally:
        d.cleanup()


def test_literal_with_protocol_lines_is_data(make_proxy, dovecot_imap):
    """APPEND with a synchronizing literal whose content holds command
    lines; both kinds of literal; FETCH brings the same bytes back, with
    the fake "* CAPABILITY STARTTLS" inside untouched."""
    proxy = imap_proxy(make_proxy, dovecot_imap)
    c = Imap(proxy.port)
    try:
        c.line()
        c.starttls()
        assert c.cmd("a", "LOGIN alice secret")[-1].startswith(b"a OK")
        c.send(b"b APPEND INBOX {%d}\r\n" % len(MSG))
        assert c.line().startswith(b"+")
        c.send(MSG + b"\r\n")
        r = c.until("b")
        assert r[-1].startswith(b"b OK"), r
        c.send(b"b2 APPEND INBOX {%d+}\r\n" % len(MSG) + MSG + b"\r\n")
        assert c.until("b2")[-1].startswith(b"b2 OK")
        c.cmd("s", "SELECT INBOX")
        r = c.cmd("f", "FETCH 1:2 (BODY.PEEK[])")
        assert r[-1].startswith(b"f OK"), r
        bodies = [ln for ln in r if ln.startswith(b"* ")]
        assert len(bodies) == 2 and all(MSG in b for b in bodies), r
        r = c.cmd("n", "NOOP")                  # still in step
        assert r[-1].startswith(b"n OK"), r
    finally:
        c.close()
    assert dovecot_imap.imap_messages("alice") == [MSG, MSG]
    assert "LOGOUT" not in dovecot_imap.log_text()


def test_idle_sees_exists_from_another_client(make_proxy, dovecot_imap):
    proxy = imap_proxy(make_proxy, dovecot_imap)
    c = Imap(proxy.port)
    try:
        c.line()
        c.starttls()
        c.cmd("a", "LOGIN alice secret")
        c.cmd("s", "SELECT INBOX")
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+")
        m = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)
        m.starttls(ssl_context=h.client_tls_context())
        m.login("alice", "secret")
        m.append("INBOX", None, None, MSG)
        m.logout()
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ln = c.line()
            seen.append(ln)
            if re.match(rb"\* 1 EXISTS", ln):
                break
        assert re.match(rb"\* 1 EXISTS", seen[-1]), seen
        c.send(b"DONE\r\n")
        assert c.until("i")[-1].startswith(b"i OK")
        assert c.cmd("n", "NOOP")[-1].startswith(b"n OK")
    finally:
        c.close()


def test_curl_ssl_reqd(make_proxy, dovecot_imap):
    curl = h.require_program("curl", "curl")
    proxy = imap_proxy(make_proxy, dovecot_imap)
    m = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)
    m.starttls(ssl_context=h.client_tls_context())
    m.login("alice", "secret")
    m.append("INBOX", None, None, MSG)
    m.logout()
    base = "imap://127.0.0.1:%d/" % proxy.port
    p = subprocess.run([curl, "-sS", "--ssl-reqd", "-k", "-u", "alice:secret", base],
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert b"INBOX" in p.stdout
    p = subprocess.run([curl, "-sS", "--ssl-reqd", "-k", "-u", "alice:secret",
                        base + "INBOX;UID=1"], capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout == MSG


def test_openssl_s_client_starttls_imap(make_proxy, dovecot_imap):
    proxy = imap_proxy(make_proxy, dovecot_imap)
    rc, out = h.s_client(proxy.port, "-starttls", "imap", "-crlf", "-ign_eof",
                         stdin=b"a LOGIN alice secret\nb LOGOUT\n")
    assert "a OK" in out and "b OK" in out, out


def test_implicit_tls_imaplib_ssl(make_proxy, dovecot_imap):
    proxy = imap_proxy(make_proxy, dovecot_imap, tls="implicit")
    m = imaplib.IMAP4_SSL("127.0.0.1", proxy.port, ssl_context=h.client_tls_context(),
                          timeout=10)
    try:
        assert "Dovecot" in m.welcome.decode()
        for bad in FORBIDDEN:
            assert bad not in m.capabilities, m.capabilities
        m.login("alice", "secret")
        assert m.select("INBOX")[0] == "OK"
        m.logout()
    finally:
        try:
            m.shutdown()
        except OSError:
            pass


class RawUpstream:
    """One-shot upstream: sends GREETING, records what it receives."""

    def __init__(self, greeting):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.received = b""
        self.greeting = greeting
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(self.greeting)
            conn.settimeout(5)
            try:
                while True:
                    d = conn.recv(4096)
                    if not d:
                        break
                    self.received += d
            except OSError:
                pass
            conn.close()


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_upstream_preauth_is_refused(make_proxy, tls):
    up = RawUpstream(b"* PREAUTH [CAPABILITY IMAP4rev1] logged in as root\r\n")
    proxy = imap_proxy(make_proxy, up, tls=tls)
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    if tls == "implicit":
        s = h.client_tls_context().wrap_socket(s)
    data = b""
    try:
        while True:
            d = s.recv(4096)
            if not d:
                break
            data += d
    except (OSError, ssl.SSLError):
        pass
    s.close()
    assert data.startswith(b"* BYE") and b"PREAUTH" not in data, data
    assert up.received == b""


@pytest.mark.parametrize("version", ["proxy-v1", "proxy-v2"])
def test_proxy_header_to_dovecot(make_proxy, tmp_path, tls_files, version):
    """client_identity = proxy-v1|v2 works for imap: this Dovecot refuses
    a connection that does not start with a PROXY header."""
    d = DovecotImap(tmp_path / "dovecot", ssl_pair=tls_files, haproxy=True)
    d.start()
    try:
        proxy = imap_proxy(make_proxy, d, upstream_opts={"client_identity": version})
        m = imaplib.IMAP4("127.0.0.1", proxy.port, timeout=10)
        m.starttls(ssl_context=h.client_tls_context())
        m.login("alice", "secret")
        assert m.select("INBOX")[0] == "OK"
        m.logout()
        # and without a header, this Dovecot says nothing
        with socket.create_connection(("127.0.0.1", d.port), timeout=3) as raw:
            raw.sendall(b"a CAPABILITY\r\n")
            try:
                got = raw.recv(512)
            except OSError:
                got = b""
        assert not got.startswith(b"* OK"), got
    finally:
        d.cleanup()


@pytest.mark.parametrize("up_opts, words", [
    ({"tls": "starttls"}, "tls = starttls"),
    ({"tls": "opportunistic"}, "tls = opportunistic"),
    ({"client_identity": "xclient"}, "client_identity = xclient"),
    ({"tls": "implicit", "auth": "plain", "username": "u", "password_file": "PW"}, "auth"),
])
def test_config_refuses_smtp_only_upstream_features(stp_bin, tls_files, tmp_path, up_opts, words):
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    up_opts = {k: (str(pw) if v == "PW" else v) for k, v in up_opts.items()}
    opts = {"listen": "127.0.0.1:0", "protocol": "imap", "upstream": "up",
            "cert": tls_files["cert"], "key": tls_files["key"]}
    uopts = {"address": "127.0.0.1:143"}
    uopts.update(up_opts)
    text = h.render_config({"hostname": "proxy.test"}, [("main", opts)], [("up", uopts)])
    p = h.check_config(stp_bin, str(tmp_path), text)
    assert p.returncode != 0, p.stdout
    assert "not available for protocol = imap" in p.stdout and words in p.stdout, p.stdout
