"""`allow = CIDR, ...` on a listener (issue 14): who may connect at all.
Anyone else gets `554 5.7.1` as the greeting and a close (on an implicit-TLS
listener just a close: no handshake, no byte), a `event=reject
reason=not_allowed` log line, and never reaches the upstream. Behind
`proxy_protocol` the address judged is the one in the PROXY header.

The two client addresses are both loopback: 127.0.0.1 and 127.0.0.2 (the
client socket is bound to it)."""

import socket
import time

import pytest

import stp_harness as h

SECOND = ("127.0.0.2", 0)


def addr_of(sock):
    host, port = sock.getsockname()[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def assert_refused(proxy, source=None, host="127.0.0.1"):
    """A client from SOURCE gets 554 5.7.1 as its greeting, then the close;
    the proxy logs the reject. Returns the reject event."""
    with h.SmtpConn(proxy.port, host=host, source=source) as c:
        me = addr_of(c.sock)
        g = c.read_reply()
        assert g.code == 554, "greeting to a client not allowed: %r" % g.raw
        assert g.lines[0].startswith("5.7.1"), g.raw
        rest = c.read_until_closed()
        assert rest == b"", "bytes after the 554: %r" % rest
    e = proxy.wait_event("reject", client=me)
    assert e.get("reason") == "not_allowed", e["_line"]
    d = proxy.wait_event("disconnect", id=e["id"])
    assert d.get("upstream_out") in ("0", None) and d.get("upstream_in") in ("0", None), d["_line"]
    return e


def deliver(proxy, tag, source=None, host="127.0.0.1"):
    msg = h.sample_message(tag)
    c = h.SmtpConn(proxy.port, host=host, source=source)
    with c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("EHLO client.test", 250)
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    return msg


def test_client_outside_allow_gets_554_and_never_reaches_the_upstream(make_proxy, scripted):
    proxy = make_proxy(scripted, allow="127.0.0.2/32")
    assert_refused(proxy)
    assert_refused(proxy)
    time.sleep(0.3)
    assert scripted.sessions == [], "a refused client made the proxy connect upstream"
    msg = deliver(proxy, "allowed", source=SECOND)
    got = scripted.wait_messages(1)
    assert got[0]["content"] == h.dot_stuff(msg)
    assert len(scripted.sessions) == 1
    assert not [e for e in proxy.events("reject") if e.get("client", "").startswith("127.0.0.2:")]


def test_allow_list_with_several_prefixes(make_proxy, scripted):
    # 127.0.0.2/31 is .2 and .3; .1 is in neither entry
    proxy = make_proxy(scripted, allow="10.0.0.0/8, 127.0.0.2/31, ::1/128")
    deliver(proxy, "dot3", source=("127.0.0.3", 0))
    deliver(proxy, "dot2", source=SECOND)
    assert_refused(proxy)
    assert_refused(proxy, source=("127.0.0.4", 0))
    scripted.wait_messages(2)
    assert len(scripted.sessions) == 2


def test_allow_on_an_ipv6_listener(make_proxy, make_scripted):
    try:
        with socket.socket(socket.AF_INET6) as s6:
            s6.bind(("::1", 0))
    except OSError:
        pytest.skip("this host has no IPv6 loopback (::1)")
    up = make_scripted()
    refusing = make_proxy(up, listen="[::1]:0", allow="127.0.0.0/8, ::2/128")
    e = assert_refused(refusing, host="::1")
    assert e["client"].startswith("[::1]:"), e["_line"]
    allowing = make_proxy(up, listen="[::1]:0", allow="127.0.0.0/8, ::1/128")
    msg = deliver(allowing, "ipv6-allowed", host="::1")
    assert up.wait_messages(1)[0]["content"] == h.dot_stuff(msg)
    assert len(up.sessions) == 1


def test_without_allow_everyone_may_connect(make_proxy, scripted):
    proxy = make_proxy(scripted)
    deliver(proxy, "dot1")
    deliver(proxy, "dot2", source=SECOND)
    assert len(scripted.wait_messages(2)) == 2
    assert not proxy.events("reject")


def test_implicit_tls_listener_closes_a_refused_client_without_a_byte(make_proxy, scripted, pki):
    proxy = make_proxy(scripted, tls="implicit", cert=pki.proxy.cert, key=pki.proxy.key,
                       allow="127.0.0.2/32")
    # the refused client says nothing: it must still get nothing but the close
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    with s:
        me = addr_of(s)
        assert closed_without_a_byte(s) == b""
    e = proxy.wait_event("reject", client=me)
    assert e.get("reason") == "not_allowed", e["_line"]
    d = proxy.wait_event("disconnect", id=e["id"])
    assert d.get("client_out") == "0", "bytes sent to a refused client: " + d["_line"]

    # and one that starts a handshake gets no ServerHello either
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    with s:
        me = addr_of(s)
        ctx = h.client_tls_context()
        try:
            t = ctx.wrap_socket(s, server_hostname="proxy.test")
            t.close()
            raise AssertionError("the TLS handshake completed for a refused client")
        except (ssl_errors()) as ex:
            assert "handshake completed" not in str(ex)
    e = proxy.wait_event("reject", client=me)
    assert not [t for t in proxy.events("tls") if t.get("id") == e["id"]], "handshake done"
    d = proxy.wait_event("disconnect", id=e["id"])
    assert d.get("client_out") == "0", "bytes sent to a refused client: " + d["_line"]

    c, _ = h.open_implicit(proxy.port, source=SECOND)
    with c:
        h.send_message(c, h.sample_message("implicit-allowed"))
        c.expect("QUIT", 221)
    scripted.wait_messages(1)
    assert len(scripted.sessions) == 1


def closed_without_a_byte(sock, timeout=5.0):
    """Everything SOCK receives until the peer closes (a reset counts as
    the close); fails if the peer keeps the connection open."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        except socket.timeout:
            raise AssertionError("still open after %.0fs; got %r" % (timeout, data))
        if not chunk:
            return data
        data += chunk


def ssl_errors():
    import ssl
    return (ssl.SSLError, ConnectionError, OSError)


def v1(src, dst, sport, dport):
    return ("PROXY TCP4 %s %s %d %d\r\n" % (src, dst, sport, dport)).encode()


def test_allow_judges_the_address_from_the_proxy_header(make_proxy, scripted):
    proxy = make_proxy(scripted, proxy_protocol="v1", proxy_protocol_from="127.0.0.0/8",
                       allow="192.0.2.0/24")
    # the TCP peer (127.0.0.1) is not in allow; the header's source is
    c = h.SmtpConn(proxy.port)
    with c:
        c.send(v1("192.0.2.7", "127.0.0.1", 5555, 25))
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("EHLO client.test", 250)
        msg = h.sample_message("via-proxy-header")
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    assert scripted.wait_messages(1)[0]["content"] == h.dot_stuff(msg)
    assert not proxy.events("reject")

    # a header whose source is outside allow is refused, even from loopback
    c = h.SmtpConn(proxy.port, source=SECOND)
    with c:
        c.send(v1("198.51.100.9", "127.0.0.1", 5556, 25))
        g = c.read_reply()
        assert g.code == 554 and g.lines[0].startswith("5.7.1"), g.raw
        assert c.read_until_closed() == b""
    e = proxy.wait_event("reject", client="198.51.100.9:5556")
    assert e.get("reason") == "not_allowed", e["_line"]
    time.sleep(0.3)
    assert len(scripted.sessions) == 1, "the refused client reached the upstream"
