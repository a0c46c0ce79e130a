"""Receiving the PROXY protocol on a listener (proxy_protocol = v1 | v2 | any).

Debian's haproxy is the real sender (send-proxy, send-proxy-v2 and its
check-send-proxy health checks); raw sockets send the hostile headers. A
connection whose header is missing, malformed, late or from outside
proxy_protocol_from must be closed without a single byte (no greeting, no
ServerHello), and the proxy's log must say why."""

import os
import re
import socket
import ssl
import struct
import subprocess
import time

import pytest

import stp_harness as h

CLIENT_IP = "127.0.0.2"   # the real client, behind haproxy
LB_FROM = "127.0.0.0/8"   # who may send headers
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def pp_listener(version="any", **kw):
    opts = {"proxy_protocol": version, "proxy_protocol_from": LB_FROM}
    opts.update(kw)
    return opts


def v1(src, dst, sport, dport):
    return ("PROXY TCP4 %s %s %d %d\r\n" % (src, dst, sport, dport)).encode()


def v2(src, dst, sport, dport, cmd=0x21, fam=0x11, tlvs=b""):
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    block += tlvs
    return V2_SIG + bytes([cmd, fam]) + struct.pack("!H", len(block)) + block


def connect(port, timeout=5.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def closed_without_a_byte(sock, timeout=5.0):
    """Everything the server sent until it closed (b"" is what we want);
    fails if it does not close within TIMEOUT."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            d = sock.recv(65536)
            if not d:
                break
            got += d
    except ConnectionResetError:
        pass                       # closed with our bytes unread: still closed
    except socket.timeout:
        raise AssertionError("not closed within %.1fs; got %r" % (timeout, got))
    return got


def smtp_on(sock):
    """An h.SmtpConn over a socket that already sent its header."""
    c = h.SmtpConn.__new__(h.SmtpConn)
    c.sock, c.raw_sock, c.buf, c.tls = sock, sock, b"", False
    return c


def sockname(sock):
    host, port = sock.getsockname()[:2]
    return "%s:%d" % (host, port)


# --- haproxy in front ---------------------------------------------------------------


class Haproxy:
    """haproxy in the foreground, unprivileged, on a 127.0.0.1 port, with
    one backend server: the proxy's listener."""

    def __init__(self, workdir, backend_port, server_opts, backend_opts="",
                 bind="127.0.0.1:%d"):
        self.bin = h.require_program("haproxy", "haproxy", ("/usr/sbin/haproxy",))
        os.makedirs(workdir, exist_ok=True)
        self.port = h.free_port()
        self.stats = os.path.join(workdir, "stats.sock")
        self.cfg = os.path.join(workdir, "haproxy.cfg")
        self.log_path = os.path.join(workdir, "haproxy.log")
        with open(self.cfg, "w") as f:
            f.write("""global
    stats socket %s mode 600 level user
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind %s
    default_backend be
backend be
    %s
    server stp 127.0.0.1:%d %s
""" % (self.stats, bind % self.port, backend_opts, backend_port, server_opts))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([self.bin, "-db", "-f", self.cfg], stdout=self.log,
                                     stderr=subprocess.STDOUT)

        def up():
            if self.proc.poll() is not None:
                pytest.fail("haproxy exited %s:\n%s" % (self.proc.returncode,
                                                        h.read_text(self.log_path)),
                            pytrace=False)
            # Its stats socket, not the frontend: a probe there would reach
            # the proxy as a session of its own.
            u = socket.socket(socket.AF_UNIX)
            try:
                u.connect(self.stats)
                return True
            except OSError:
                return False
            finally:
                u.close()
        assert h.wait_until(up, 10), "haproxy did not listen:\n" + h.read_text(self.log_path)

    def server_status(self, field="status"):
        """A field of the backend server's stats: status ("UP", "DOWN"...),
        check_status ("L4OK": its last health check passed)..."""
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.stats)
        s.sendall(b"show stat\n")
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
        s.close()
        lines = data.decode().splitlines()
        head = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(head, line.split(",")))
            if row.get("pxname") == "be" and row.get("svname") == "stp":
                return row.get(field, "")
        return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def make_haproxy(tmp_path):
    made = []

    def make(backend_port, server_opts, backend_opts="", bind="127.0.0.1:%d"):
        hp = Haproxy(str(tmp_path / ("haproxy%d" % len(made))), backend_port, server_opts,
                     backend_opts, bind)
        made.append(hp)
        return hp
    yield make
    for hp in made:
        hp.stop()


SEND = {"v1": "send-proxy", "v2": "send-proxy-v2"}


@pytest.mark.parametrize("listener,send", [("v1", "v1"), ("v2", "v2"), ("any", "v1"),
                                           ("any", "v2")])
def test_mail_through_haproxy_is_logged_and_passed_on_with_the_real_client(
        make_proxy, make_aio, make_haproxy, pki, listener, send):
    up = make_aio(proxy_protocol_timeout=5)
    proxy = make_proxy(up, upstream_opts={"client_identity": "proxy-v2"},
                       **pp_listener(listener))
    hp = make_haproxy(proxy.port, SEND[send])
    msg = h.sample_message("through haproxy " + send)
    c = h.SmtpConn(hp.port, source=(CLIENT_IP, 0))
    with c:
        port = c.sock.getsockname()[1]
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("EHLO client.test", 250)
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    assert up.wait_messages(1)[0]["original_content"] == msg
    # The proxy's log: the real client, and haproxy's address beside it.
    e = proxy.wait_event("connect", client="%s:%d" % (CLIENT_IP, port))
    assert e["via"].startswith("127.0.0.1:"), e
    assert e["proxy_header"] == send, e
    # What the upstream is told: the header's source and destination.
    pd = up.wait_proxies(1)[0]
    assert len(up.proxies) == 1, up.proxies
    assert (pd["src_addr"], pd["src_port"]) == (CLIENT_IP, port), pd
    assert (pd["dst_addr"], pd["dst_port"]) == ("127.0.0.1", hp.port), pd
    assert not proxy.events("proxy_header_error"), proxy.log_tail()


def test_xclient_through_haproxy_gives_postfix_the_real_client(make_proxy, make_haproxy,
                                                              postfix):
    proxy = make_proxy(postfix.address("plain"), upstream_opts={"client_identity": "xclient"},
                       tls="none", require_tls=None, **pp_listener("v2"))
    hp = make_haproxy(proxy.port, "send-proxy-v2")
    c = h.SmtpConn(hp.port, source=(CLIENT_IP, 0))
    with c:
        port = c.sock.getsockname()[1]
        c.greeting()
        c.expect("EHLO client.test", 250)
        r = h.send_message(c, b"Subject: via haproxy\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    qid = re.search(r"queued as ([0-9A-F]+)", r.text).group(1)
    _, addr, cport = postfix.client_of_queue_id(qid)
    assert (addr, cport) == (CLIENT_IP, port), (addr, cport)


@pytest.mark.parametrize("send", ["v1", "v2"])
def test_haproxy_health_checks_with_check_send_proxy(make_proxy, scripted, make_haproxy, send):
    proxy = make_proxy(scripted, **pp_listener("any"))
    # An SMTP check (greeting, EHLO): haproxy waits for the proxy's answer,
    # so each check is a whole session, not a connection reset before the
    # proxy could even accept it.
    hp = make_haproxy(proxy.port, "%s check check-send-proxy inter 200ms rise 2 fall 1"
                      % SEND[send], "option smtpchk EHLO localhost")
    # Checks that passed, several of them, each a session of the proxy's.
    assert h.wait_until(lambda: len(proxy.events("connect")) >= 3, 15), proxy.log_tail()
    assert h.wait_until(lambda: hp.server_status("check_status") == "L7OK", 10), \
        "haproxy: %r\n%s" % (hp.server_status("check_status"), proxy.log_tail())
    for e in proxy.events("connect"):
        assert e.get("via", "").startswith("127.0.0.1:"), e
        # haproxy's v2 checks say LOCAL: the socket's own addresses stand
        if send == "v2":
            assert e["proxy_header"] == "v2-local", e
            assert e["client"] == e["via"], e
    assert not proxy.events("proxy_header_error"), proxy.log_tail()
    assert hp.server_status() == "UP"


# --- hostile headers, sent directly -------------------------------------------------------

HOSTILE = [
    ("no header: SMTP", b"EHLO client.test\r\n", "neither a v1 nor a v2 header"),
    ("no header: TLS", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "neither"),
    ("v1 lone LF", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "LF without CR"),
    ("v1 lone CR", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rX", "CR without LF"),
    ("v1 over 107 bytes", b"PROXY UNKNOWN " + b"x" * 100, "107"),
    ("v1 leading zero in address", b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",
     "bad IPv4 address"),
    ("v1 leading zero in port", b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n", "bad port"),
    ("v1 port over 65535", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n", "bad port"),
    ("v1 two spaces", b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n", "empty field"),
    ("v1 TCP6 with IPv4", b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n", "bad IPv6 address"),
    ("v2 version 1", V2_SIG + b"\x11\x11\x00\x0c" + bytes(12), "version not 2"),
    ("v2 command 2", V2_SIG + b"\x22\x11\x00\x0c" + bytes(12), "LOCAL or PROXY"),
    ("v2 unknown family", V2_SIG + b"\x21\x51\x00\x0c" + bytes(12), "family"),
    ("v2 INET block short", V2_SIG + b"\x21\x11\x00\x08" + bytes(8), "shorter"),
    ("v2 INET6 block short", V2_SIG + b"\x21\x21\x00\x0c" + bytes(12), "shorter"),
    ("v2 length over the bound", V2_SIG + b"\x21\x11\x10\x00" + bytes(64), "4096"),
    ("v2 TLV overruns", v2("192.0.2.1", "192.0.2.2", 1, 2, tlvs=b"\x02\x00\x09mx"),
     "TLV overruns"),
    ("v2 signature typo", b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c", "signature"),
]


@pytest.mark.parametrize("name,data,why", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_header_is_closed_without_a_byte(proxy_scripted_pp, name, data, why):
    proxy, up = proxy_scripted_pp
    s = connect(proxy.port)
    with s:
        me = sockname(s)
        s.sendall(data)
        assert closed_without_a_byte(s) == b""
    e = proxy.wait_event("proxy_header_error", client=me)
    assert e["reason"] == "proxy_header_invalid", e
    assert why in e["error"], e
    proxy.wait_event("disconnect", id=e["id"], reason="proxy_header_invalid")
    assert not up.sessions, "the upstream was reached"


def test_partial_header_at_eof_is_closed_without_a_byte(proxy_scripted_pp):
    proxy, up = proxy_scripted_pp
    s = connect(proxy.port)
    with s:
        me = sockname(s)
        s.sendall(b"PROXY TCP4 192.0.2.1 192.0")
        s.shutdown(socket.SHUT_WR)
        assert closed_without_a_byte(s) == b""
    e = proxy.wait_event("proxy_header_error", client=me)
    assert "closed before a complete header" in e["error"] and e["bytes"] == "26", e


@pytest.fixture
def proxy_scripted_pp(make_proxy, scripted):
    return make_proxy(scripted, **pp_listener("any")), scripted


# --- split headers, the allow-list, the timeout --------------------------------------------


@pytest.mark.parametrize("header", [v1("203.0.113.9", "192.0.2.25", 40001, 25),
                                    v2("203.0.113.9", "192.0.2.25", 40001, 25,
                                       tlvs=b"\x04\x00\x02\x00\x00")],
                         ids=["v1", "v2"])
def test_header_sent_byte_by_byte(make_proxy, scripted, header):
    proxy = make_proxy(scripted, tls="none", require_tls=None, **pp_listener("any"))
    s = connect(proxy.port)
    with s:
        for b in header:
            s.sendall(bytes([b]))
            time.sleep(0.005)
        c = smtp_on(s)
        c.greeting()
        c.expect("EHLO client.test", 250)
        h.send_message(c, b"Subject: split\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    scripted.wait_messages(1)
    e = proxy.wait_event("connect", client="203.0.113.9:40001")
    assert e["via"].startswith("127.0.0.1:"), e


def test_peer_outside_proxy_protocol_from_is_closed_without_a_byte(make_proxy, scripted):
    proxy = make_proxy(scripted, proxy_protocol="v1", proxy_protocol_from="10.0.0.0/8, ::1")
    s = connect(proxy.port)
    with s:
        me = sockname(s)
        s.sendall(v1("203.0.113.9", "192.0.2.25", 40001, 25))
        assert closed_without_a_byte(s) == b""
    e = proxy.wait_event("reject", client=me)
    assert e["reason"] == "proxy_not_allowed", e
    proxy.wait_event("disconnect", id=e["id"], reason="proxy_not_allowed")
    assert not proxy.events("proxy_header_error")
    assert not scripted.sessions


@pytest.mark.parametrize("sent", [b"", b"PROXY TCP4 1.2.3.4", V2_SIG])
def test_header_timeout_closes_without_a_byte(make_proxy, scripted, sent):
    proxy = make_proxy(scripted, timeout_proxy_header="300ms", **pp_listener("any"))
    s = connect(proxy.port)
    with s:
        me = sockname(s)
        t0 = time.monotonic()
        s.sendall(sent)
        assert closed_without_a_byte(s, timeout=5) == b""
        took = time.monotonic() - t0
    assert 0.25 <= took < 3, took
    e = proxy.wait_event("proxy_header_error", client=me)
    assert e["reason"] == "proxy_header_timeout", e
    assert e["bytes"] == str(len(sent)), e
    proxy.wait_event("disconnect", id=e["id"], reason="proxy_header_timeout")


# --- implicit TLS: the header and the ClientHello in one write ------------------------------


def test_implicit_tls_header_and_client_hello_in_one_write(make_proxy, scripted, pki):
    proxy = make_proxy(scripted, tls="implicit", cert=pki.proxy.cert, key=pki.proxy.key,
                       **pp_listener("v2"))
    s = connect(proxy.port)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = h.client_tls_context().wrap_bio(inc, out, server_hostname="proxy.test")
    with s:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = out.read()
        s.sendall(v2("198.51.100.20", "192.0.2.25", 50000, 465) + hello)

        def pump():
            o = out.read()
            if o:
                s.sendall(o)
            d = s.recv(65536)
            assert d, "closed during the handshake: %s" % proxy.log_tail()
            inc.write(d)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        s.sendall(out.read())

        def read_line():
            buf = b""
            while not buf.endswith(b"\r\n"):
                try:
                    buf += tls.read(1)
                except ssl.SSLWantReadError:
                    pump()
            return buf
        assert read_line().startswith(b"220 "), "no greeting"
        tls.write(b"QUIT\r\n")
        s.sendall(out.read())
        assert read_line().startswith(b"221 ")
    e = proxy.wait_event("connect", client="198.51.100.20:50000")
    assert e["proxy_header"] == "v2", e
    proxy.wait_event("tls", id=e["id"])


# --- the per-IP limit counts the header's source ---------------------------------------------


def test_max_connections_per_ip_counts_the_header_source(make_proxy, scripted):
    proxy = make_proxy(scripted, max_connections_per_ip="2", tls="none", require_tls=None,
                       **pp_listener("v1"))

    def open_as(src, sport):
        s = connect(proxy.port)
        s.sendall(v1(src, "192.0.2.25", sport, 25))
        return smtp_on(s)

    held = [open_as("198.51.100.7", 1000 + i) for i in range(2)]
    for c in held:
        c.greeting()
    # All come from 127.0.0.1: only the header's source counts.
    other = open_as("198.51.100.8", 2000)
    other.greeting()
    third = open_as("198.51.100.7", 1002)
    r = third.read_reply()
    assert r.code == 421, r.raw
    third.sock.close()
    e = proxy.wait_event("reject", client="198.51.100.7:1002")
    assert e["reason"] == "max_connections_per_ip", e
    # One of them leaves: its header's source is counted out.
    held[0].expect("QUIT", 221)
    held[0].sock.close()
    proxy.wait_event("disconnect", id=proxy.wait_event("connect",
                                                       client="198.51.100.7:1000")["id"])
    again = open_as("198.51.100.7", 1003)
    again.greeting()
    for c in (held[1], other, again):
        c.expect("QUIT", 221)
        c.sock.close()


# A real haproxy whose frontend is dual-stack (`bind :::PORT v4v6`) writes
# every IPv4 client as `PROXY TCP6 ::ffff:127.0.0.2 ::ffff:127.0.0.1 ...`:
# the parser once refused the dotted form, and with it every IPv4 client of
# such a balancer (found by an outside review).
@pytest.mark.parametrize("listener", ["v1", "any"])
def test_ipv4_client_through_dual_stack_haproxy_send_proxy(make_proxy, scripted, make_haproxy,
                                                            listener):
    proxy = make_proxy(scripted, proxy_protocol=listener, proxy_protocol_from="127.0.0.0/8",
                       tls="none", require_tls=None)
    hp = make_haproxy(proxy.port, "send-proxy", bind=":::%d v4v6")
    c = h.SmtpConn(hp.port, source=(CLIENT_IP, 0), timeout=5)
    with c:
        got = c.pending(3)
    errs = proxy.events("proxy_header_error")
    assert got.startswith(b"220"), ("IPv4 client behind dual-stack haproxy refused: got %r; %s"
                                    % (got, [e["_line"] for e in errs]))
