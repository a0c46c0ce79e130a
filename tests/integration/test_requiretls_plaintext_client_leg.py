"""Regression (found by an outside review): REQUIRETLS is advertised to (and MAIL FROM ... REQUIRETLS accepted
from) a client whose own leg to the proxy is plaintext, whenever the upstream
leg is TLS (here tls = opportunistic, next hop offering STARTTLS). RFC 8689 /
SMTP-REFERENCE: "Don't advertise it unless honoured end to end" -- the
client->proxy hop is not encrypted. proxy/smtp.c ehlo_flush() strips
REQUIRETLS only when !s->cfg.upstream_tls, never when the client leg (s->tls)
is plaintext.
Not specific to opportunistic: the same holds with [upstream] tls = starttls
(verified by hand with ca_file set); the listener tls = none case is the one
where MAIL FROM ... REQUIRETLS is then accepted (250) and relayed; on a
STARTTLS listener with require_tls only the advertisement leaks.

Fails (non-zero) while the bug is present."""
import pytest
import stp_harness as h

EHLO = b"250-upstream.test\r\n250-STARTTLS\r\n250-REQUIRETLS\r\n250 8BITMIME\r\n"


@pytest.mark.parametrize("listener_tls", ["none", "starttls"])
def test_requiretls_not_offered_on_plaintext_client_leg(make_proxy, make_raw, pki, listener_tls):
    up = make_raw(tls="starttls", pair=pki.upstream, replies={"EHLO": EHLO})
    proxy = make_proxy(up, upstream_opts={"tls": "opportunistic", "server_name": "upstream.test"},
                       tls=listener_tls, require_tls=None)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        r = c.expect("EHLO client.test", 250)
        offered = "REQUIRETLS" in r.keywords()
        m = c.cmd("MAIL FROM:<a@example.org> REQUIRETLS") if offered else None
        c.send(b"QUIT\r\n")
    conn = up.wait_conns(1)[0]
    assert conn.handshake == "ok"          # the upstream leg is TLS
    assert not offered, ("plaintext client leg offered REQUIRETLS: %r; MAIL reply %r; "
                         "upstream got (inside TLS) %r" % (r.raw, m and m.raw, conn.tls_lines()))
