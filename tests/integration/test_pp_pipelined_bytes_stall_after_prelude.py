"""Regression (found by an outside review): on a proxy_protocol listener, SMTP
bytes that arrive in the same read as the PROXY header (README: "bytes that
follow it in the same read are the session's") are never processed when the
upstream leg has a prelude (client_identity = xclient, or [upstream] tls =
starttls / opportunistic): the client gets the greeting and then nothing --
its EHLO/MAIL/RCPT/QUIT sit in the proxy's input buffer until the client
sends more bytes or timeout_idle closes it. The same bytes without a header
(controls) or with a header but no prelude are answered.
Location: proxy/relay.c read_header() -> session_begin(); the prelude path
(proxy/nexthop.c act_ready -> relay.c hop_ready()) never dispatches client
bytes already buffered by stp_front_header()/stp_conn_consume(), and no new
read event comes for them.
"""
import socket

import pytest

import stp_harness as h
from test_proxy_protocol import v1, connect

EARLY = b"EHLO early\r\nMAIL FROM:<e@x>\r\nRCPT TO:<r@y>\r\nQUIT\r\n"


def read_all(s, t=4):
    s.settimeout(t)
    got = b""
    try:
        while True:
            d = s.recv(9999)
            if not d:
                return got
            got += d
    except socket.timeout:
        return got + b"<no more after %ss>" % str(t).encode()


@pytest.mark.parametrize("pp", [True, False], ids=["header", "no-header"])
@pytest.mark.parametrize("prelude", ["xclient", "opportunistic"])
def test_bytes_with_header_are_served(make_proxy, make_raw, pki, pp, prelude):
    if prelude == "xclient":
        up = make_raw(tls=None, xclient=True)
        uo = {"client_identity": "xclient"}
    else:
        up = make_raw(tls="starttls", pair=pki.upstream)
        uo = {"tls": "opportunistic", "server_name": "upstream.test"}
    kw = dict(proxy_protocol="v1", proxy_protocol_from="127.0.0.0/8") if pp else {}
    proxy = make_proxy(up, upstream_opts=uo, tls="none", require_tls=None, **kw)
    s = connect(proxy.port)
    with s:
        s.sendall((v1("198.51.100.20", "192.0.2.25", 50000, 25) if pp else b"") + EARLY)
        got = read_all(s)
    assert b"221 " in got, "pipelined commands never answered: %r\n%s" % (got, proxy.log_tail(8))
