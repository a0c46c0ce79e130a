"""Regression (found by an outside review): on a tls = implicit listener whose
upstream has a prelude (client_identity = xclient), client application data
that arrives in the same flight as the TLS Finished (EHLO ... QUIT written
right after the handshake) is decrypted into the input buffer during the
handshake and never dispatched once the prelude is done: the client gets the
greeting, then nothing until timeout_idle. Without a prelude (noid) the same
bytes are answered.
"""
import socket, ssl, pytest
import stp_harness as h
from test_proxy_protocol import v2, connect
@pytest.mark.parametrize("pp", [True, False])
@pytest.mark.parametrize("ident", ["xclient", "noid"])
def test_implicit_tls_app_data_with_finished_is_served(make_proxy, make_raw, pki, pp, ident):
    up = make_raw(tls=None, xclient=(ident == "xclient"))
    kw = dict(proxy_protocol="v2", proxy_protocol_from="127.0.0.0/8") if pp else {}
    proxy = make_proxy(up, upstream_opts={"client_identity": "xclient" if ident == "xclient" else "none"}, tls="implicit",
                       cert=pki.proxy.cert, key=pki.proxy.key, **kw)
    s = connect(proxy.port)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = h.client_tls_context().wrap_bio(inc, out, server_hostname="proxy.test")
    try: tls.do_handshake()
    except ssl.SSLWantReadError: pass
    s.sendall((v2("198.51.100.20", "192.0.2.25", 50000, 465) if pp else b"") + out.read())
    while True:
        try:
            tls.do_handshake(); break
        except ssl.SSLWantReadError:
            o = out.read()
            if o: s.sendall(o)
            d = s.recv(65536)
            assert d, 'closed in handshake: ' + proxy.log_tail(10)
            inc.write(d)
    tls.write(b"EHLO early\r\nQUIT\r\n")
    s.sendall(out.read())   # Finished + app data in one write
    s.settimeout(4); got = b""
    try:
        while True:
            d = s.recv(65536)
            if not d: break
            inc.write(d)
            while True:
                try:
                    r = tls.read(65536)
                    if not r: break
                    got += r
                except ssl.SSLWantReadError: break
                except ssl.SSLError: break
            if b"221" in got: break
    except socket.timeout: got += b"<TIMEOUT>"
    assert b"221 " in got, "pp=%s ident=%s: early app data never answered: %r" % (pp, ident, got[-80:])
