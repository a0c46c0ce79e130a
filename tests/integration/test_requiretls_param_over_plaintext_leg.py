"""Regression (found by an outside review): with tls = opportunistic and a plaintext next-hop leg, the
proxy strips REQUIRETLS from the EHLO reply but still relays
`MAIL FROM:<...> REQUIRETLS` to the next hop in plaintext (the engine's
comment in proxy/smtp_proto.c upstream_leg() says REQUIRETLS is "offered and
passed only over an encrypted upstream leg"; only the offer is filtered, in
proxy/smtp.c ehlo_flush()). Against a next hop that advertises REQUIRETLS
without STARTTLS (the same hop test_opportunistic.py
test_no_starttls_means_no_requiretls_for_the_client uses), a REQUIRETLS
message is accepted over a plaintext hop instead of being refused by the
proxy (RFC 8689 wants it refused / bounced, never sent in clear).
"""
import stp_harness as h


def test_requiretls_mail_param_not_relayed_over_plaintext(make_proxy, make_raw):
    up = make_raw(tls=None, replies={"EHLO": b"250-upstream.test\r\n250 REQUIRETLS\r\n"})
    proxy = make_proxy(up, upstream_opts={"tls": "opportunistic"}, tls="none", require_tls=None)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        m = c.cmd("MAIL FROM:<a@example.org> REQUIRETLS")
        c.cmd("QUIT")
    lines = up.wait_conns(1)[0].plaintext_lines()
    sent = [l for l in lines if l.startswith(b"MAIL FROM") and b"REQUIRETLS" in l]
    assert not sent, ("MAIL ... REQUIRETLS went to the next hop in plaintext (reply %r): %r"
                      % (m.raw, lines))
