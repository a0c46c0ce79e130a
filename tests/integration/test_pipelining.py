"""RFC 2920 PIPELINING through the proxy, after STARTTLS."""

import stp_harness as h


def test_pipelined_transaction_replies_in_order_then_delivers(proxy_scripted):
    proxy, up = proxy_scripted
    c, ehlo = h.open_session(proxy.port, tls=True)
    with c:
        assert "PIPELINING" in ehlo.keywords()
        c.send(b"MAIL FROM:<b@example.org>\r\n"
               b"RCPT TO:<one@example.net>\r\n"
               b"RCPT TO:<two@example.net>\r\n"
               b"RCPT TO:<three@example.net>\r\n"
               b"DATA\r\n")
        replies = [c.read_reply() for _ in range(5)]
        assert [r.raw for r in replies] == [
            b"250 2.1.0 Ok mail\r\n",
            b"250 2.1.5 Ok rcpt <one@example.net>\r\n",
            b"250 2.1.5 Ok rcpt <two@example.net>\r\n",
            b"250 2.1.5 Ok rcpt <three@example.net>\r\n",
            b"354 End data with <CR><LF>.<CR><LF>\r\n",
        ]
        msg = b"Subject: pipelined\r\n\r\nthree recipients\r\n"
        c.send(msg + b".\r\n")
        r = c.read_reply()
        assert r.code == 250 and "queued as" in r.text, r.raw
        c.expect("QUIT", 221)
    m = up.wait_messages(1)[0]
    assert m["mail_from"] == b"FROM:<b@example.org>"
    assert m["rcpts"] == [b"TO:<one@example.net>", b"TO:<two@example.net>",
                          b"TO:<three@example.net>"]
    assert m["content"] == msg


def test_pipelined_group_with_rset_and_second_transaction(proxy_scripted):
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        c.send(b"RSET\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n")
        codes = [c.read_reply().code for _ in range(4)]
        assert codes == [250, 250, 250, 354]
        c.send(b"first\r\n.\r\nMAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n")
        codes = [c.read_reply().code for _ in range(4)]
        assert codes == [250, 250, 250, 354]
        c.send(b"second\r\n.\r\nQUIT\r\n")
        assert c.read_reply().code == 250
        assert c.read_reply().code == 221
    msgs = up.wait_messages(2)
    assert [m["content"] for m in msgs] == [b"first\r\n", b"second\r\n"]
    assert [m["mail_from"] for m in msgs] == [b"FROM:<b@example.org>", b"FROM:<c@example.org>"]
