"""Regression (found by an outside review): a next hop that does not speak ESMTP
(answers EHLO with 502/500, as HELO-only legacy servers do) has certainly not
offered STARTTLS, so under the documented rule ("the only way to plaintext is
a next hop that did not offer STARTTLS"; "refusing would stop mail that flows
today") the session should go on in plaintext. Instead proxy/prelude.c
reply_line() STP_UP_EHLO: code != 250 -> fail(STP_FAIL_HOP_TLS, "EHLO
refused") and every client gets 421 4.7.0 forever: mail that flows today
with tls = none never flows with tls = opportunistic.
"""
import pytest
import stp_harness as h


@pytest.mark.parametrize("reply", [b"502 5.5.1 EHLO not implemented\r\n",
                                   b"500 5.5.2 command unrecognized\r\n"])
def test_helo_only_next_hop_still_gets_mail(make_proxy, make_raw, reply):
    up = make_raw(tls=None, replies={"EHLO": reply})
    proxy = make_proxy(up, upstream_opts={"tls": "opportunistic"}, tls="none", require_tls=None)
    with h.SmtpConn(proxy.port) as c:
        g = c.read_reply()
    assert g.code == 220, ("HELO-only next hop: client got %r; %s"
                           % (g.raw, [e["_line"] for e in proxy.events("upstream_error")]))
