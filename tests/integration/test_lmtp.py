"""protocol = lmtp in front of Dovecot's LMTP server (running unprivileged,
tests/integration/dovecot_util.py): LHLO for EHLO on both legs, the same
STARTTLS rules, one reply per accepted recipient after the message, the
delivered bytes exact; Python's smtplib.LMTP as a client."""

import re
import smtplib

import stp_harness as h
from dovecot_util import dovecot_lmtp  # noqa: F401 (fixture)

MSG = (b"From: s@example.org\r\nTo: alice@example.net\r\nSubject: lmtp\r\n\r\n"
       b"line one\r\n.leading dot\r\n8bit \xc3\xa9\r\nlast\r\n")


def lmtp_proxy(make_proxy, dovecot, **kw):
    opts = {"protocol": "lmtp"}
    opts.update(kw)
    return make_proxy(dovecot, **opts)


def test_lmtp_through_starttls_one_reply_per_recipient(make_proxy, dovecot_lmtp):
    proxy = lmtp_proxy(make_proxy, dovecot_lmtp)
    with h.SmtpConn(proxy.port) as c:
        assert "dovecot.test" in c.greeting().text
        r = c.expect("LHLO client.test", 250)
        kw = r.keywords()
        assert "STARTTLS" in kw and "CHUNKING" not in kw, r.raw
        c.expect("MAIL FROM:<s@example.org>", 530)        # require_tls = yes
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("LHLO client.test", 250)
        c.expect("MAIL FROM:<s@example.org>", 250)
        c.expect("RCPT TO:<alice@example.net>", 250)
        c.expect("RCPT TO:<eve@other.org>", 550)
        c.expect("RCPT TO:<bob@example.net>", 250)
        c.expect("DATA", 354)
        c.send(h.dot_stuff(MSG) + b".\r\nNOOP\r\n")
        replies = [c.read_reply() for _ in range(3)]
        assert [r.code for r in replies] == [250, 250, 250], [r.raw for r in replies]
        assert "alice@example.net" in replies[0].text and "bob@example.net" in replies[1].text
        assert "Saved" not in replies[2].text           # NOOP's own reply, last
        c.expect("QUIT", 221)
    for user in ("alice", "bob"):
        assert [dovecot_lmtp.strip(m) for m in dovecot_lmtp.wait_messages(user, 1)] == [MSG]
    assert "eve" not in dovecot_lmtp.users()


def test_smtplib_lmtp_client(make_proxy, dovecot_lmtp):
    proxy = lmtp_proxy(make_proxy, dovecot_lmtp)
    c = smtplib.LMTP("127.0.0.1", proxy.port, local_hostname="client.test", timeout=10)
    try:
        c.ehlo()                                   # LHLO
        c.starttls(context=h.client_tls_context())
        refused = c.sendmail("s@example.org", ["carol@example.net"], MSG)
        assert refused == {}
    finally:
        c.quit()
    assert [dovecot_lmtp.strip(m) for m in dovecot_lmtp.wait_messages("carol", 1)] == [MSG]


def test_lmtp_xclient_gives_dovecot_the_client_address(make_proxy, dovecot_lmtp):
    """The proxy's own greeting to the upstream says LHLO, then XCLIENT."""
    proxy = lmtp_proxy(make_proxy, dovecot_lmtp, tls="none", require_tls=None,
                       upstream_opts={"client_identity": "xclient"})
    with h.SmtpConn(proxy.port, source=("127.0.0.2", 0)) as c:
        c.greeting()
        c.expect("LHLO client.test", 250)
        c.expect("MAIL FROM:<s@example.org>", 250)
        c.expect("RCPT TO:<dave@example.net>", 250)
        c.expect("DATA", 354)
        c.send(h.dot_stuff(MSG) + b".\r\n")
        assert c.read_reply().code == 250
        c.expect("QUIT", 221)
    raw = dovecot_lmtp.wait_messages("dave", 1)[0]
    assert re.search(rb"Received: from client\.test \(\[127\.0\.0\.2\]\)", raw), raw[:300]
    assert dovecot_lmtp.strip(raw) == MSG


def test_lmtp_refused_second_mail_keeps_every_delivery_reply(make_proxy, dovecot_lmtp):
    """Dovecot refuses a MAIL inside an open transaction (503) and keeps the
    transaction: after the message, one reply per recipient still follows,
    and the proxy relays each, not a 421 after the first (which would make
    the client send bob's copy again)."""
    proxy = lmtp_proxy(make_proxy, dovecot_lmtp, tls="none", require_tls=None)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("LHLO client.test", 250)
        c.expect("MAIL FROM:<s@example.org>", 250)
        c.expect("RCPT TO:<erin@example.net>", 250)
        c.expect("RCPT TO:<frank@example.net>", 250)
        c.expect("MAIL FROM:<other@example.org>", 503)
        c.expect("DATA", 354)
        c.send(h.dot_stuff(MSG) + b".\r\nNOOP\r\n")
        replies = [c.read_reply() for _ in range(3)]
        assert [r.code for r in replies] == [250, 250, 250], [r.raw for r in replies]
        assert "erin@example.net" in replies[0].text, replies[0].raw
        assert "frank@example.net" in replies[1].text, replies[1].raw
        c.expect("QUIT", 221)
    for user in ("erin", "frank"):
        assert [dovecot_lmtp.strip(m) for m in dovecot_lmtp.wait_messages(user, 1)] == [MSG]
