"""RFC 3030 CHUNKING/BDAT through the proxy: chunk octets are counted, never
read as commands or scanned for an end-of-data dot."""

import stp_harness as h

EHLO_WITH_CHUNKING = ["upstream.test greets you", "PIPELINING", "8BITMIME", "CHUNKING",
                      "BINARYMIME"]
EHLO_WITHOUT_CHUNKING = ["upstream.test greets you", "PIPELINING", "8BITMIME"]

# looks like commands and like end-of-data markers, but is message content
TRICKY = (b"Subject: bdat\r\n\r\n"
          b"line\r\n.\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<victim@x>\r\n"
          b"bare\n.\nlf\r\nQUIT\r\n\x00\xff binary")


def test_bdat_chunks_are_relayed_byte_exact(make_scripted, make_proxy):
    up = make_scripted(ehlo=EHLO_WITH_CHUNKING)
    proxy = make_proxy(up)
    c, ehlo = h.open_session(proxy.port, tls=True)
    with c:
        assert "CHUNKING" in ehlo.keywords(), ehlo.raw
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("RCPT TO:<a@example.net>", 250)
        first, second = TRICKY[:40], TRICKY[40:]
        c.send(b"BDAT %d\r\n" % len(first) + first)
        r = c.read_reply()
        assert r.code == 250, r.raw
        c.send(b"BDAT %d LAST\r\n" % len(second) + second)
        r = c.read_reply()
        assert r.code == 250 and "queued" in r.text, r.raw
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
    m = up.wait_messages(1)[0]
    assert m["content"] == TRICKY
    assert not up.saw_line_containing(b"evil@x"), up.all_commands()


def test_bdat_pipelined_chunks_and_zero_length_last(make_scripted, make_proxy):
    up = make_scripted(ehlo=EHLO_WITH_CHUNKING)
    proxy = make_proxy(up)
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        c.send(b"MAIL FROM:<b@example.org>\r\nRCPT TO:<a@example.net>\r\n"
               + b"BDAT 10\r\n0123456789" + b"BDAT 5\r\n\r\n.\r\n" + b"BDAT 0 LAST\r\n")
        codes = [c.read_reply().code for _ in range(5)]
        assert codes == [250] * 5, codes
        c.expect("QUIT", 221)
    m = up.wait_messages(1)[0]
    assert m["content"] == b"0123456789\r\n.\r\n"


def test_bdat_many_tiny_pipelined_chunks_in_one_write(make_scripted, make_proxy):
    """Each tiny chunk and each BDAT line is a separate piece on the way
    upstream: far more pieces than the output queue has slots. The proxy must
    hold back and resume, not fail the session."""
    up = make_scripted(ehlo=EHLO_WITH_CHUNKING)
    proxy = make_proxy(up)
    c, _ = h.open_session(proxy.port, tls=True)
    n = 60  # under the engine's 64 pending replies: all in one write
    body = bytes(0x41 + i % 26 for i in range(n))
    with c:
        c.send(b"MAIL FROM:<b@example.org>\r\nRCPT TO:<a@example.net>\r\n"
               + b"".join(b"BDAT 1\r\n" + body[i:i + 1] for i in range(n))
               + b"BDAT 0 LAST\r\n")
        codes = [c.read_reply().code for _ in range(n + 3)]
        assert codes == [250] * (n + 3), codes
        c.expect("QUIT", 221)
    m = up.wait_messages(1)[0]
    assert m["content"] == body


def test_bdat_refused_when_upstream_lacks_chunking_and_chunk_is_discarded(make_scripted,
                                                                          make_proxy):
    up = make_scripted(ehlo=EHLO_WITHOUT_CHUNKING)
    proxy = make_proxy(up)
    c, ehlo = h.open_session(proxy.port, tls=True)
    with c:
        assert "CHUNKING" not in ehlo.keywords(), ehlo.raw
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("RCPT TO:<a@example.net>", 250)
        payload = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@x>\r\nNOOP\r\n"
        c.send(b"BDAT %d LAST\r\n" % len(payload) + payload)
        r = c.read_reply()
        assert 500 <= r.code < 600, r.raw
        # the chunk was swallowed: the next reply answers our RSET, not NOOP
        r = c.cmd("RSET")
        assert r.raw == b"250 2.0.0 Ok rset\r\n", "chunk octets were read as commands: %r" % r.raw
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not up.saw_verb("BDAT")
    assert not up.saw_line_containing(b"evil@x") and not up.saw_line_containing(b"victim@x")
    assert up.messages == []
