"""A client that half-closes (shutdown(SHUT_WR), or a TLS close_notify) after
pipelining its last commands still gets every reply the upstream owes it, as
it would from a server: otherwise a delivered message looks failed and is
sent again. A message it did not finish never completes upstream."""

import re
import socket
import ssl
import time

import pytest

import stp_harness as h

MSG = b"Subject: half-close\r\n\r\nbody\r\n"
PIPELINED = (b"MAIL FROM:<b@example.org>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n" +
             MSG + b".\r\nQUIT\r\n")


def reply_codes(data):
    return [int(l[:3]) for l in data.split(b"\r\n") if len(l) >= 4 and l[3:4] == b" "]


def plaintext_half_close(make_proxy, aio, data):
    """EHLO, DATA, then FIN: (proxy, the replies up to the close)."""
    proxy = make_proxy(aio, tls="none", require_tls=None)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.send(data)
        c.sock.shutdown(socket.SHUT_WR)
        return proxy, c.read_until_closed()


def test_plaintext_half_close_gets_every_reply(make_proxy, aio):
    proxy, got = plaintext_half_close(make_proxy, aio, PIPELINED)
    assert reply_codes(got) == [250, 250, 354, 250, 221], got
    assert [m["original_content"] for m in aio.wait_messages(1)] == [MSG]
    proxy.wait_event("disconnect", reason="quit")


def test_half_close_without_quit_closes_after_the_replies(make_proxy, aio):
    proxy, got = plaintext_half_close(make_proxy, aio, PIPELINED[:-len(b"QUIT\r\n")])
    assert reply_codes(got) == [250, 250, 354, 250], got
    assert len(aio.wait_messages(1)) == 1
    proxy.wait_event("disconnect", reason="client_eof")


def test_half_close_in_the_middle_of_a_message_delivers_nothing(make_proxy, aio):
    proxy, got = plaintext_half_close(make_proxy, aio, PIPELINED[:PIPELINED.index(b".\r\n")])
    assert reply_codes(got) == [250, 250, 354], got
    proxy.wait_event("disconnect", reason="client_eof")
    time.sleep(0.5)
    assert aio.envelopes == []


def tls_half_close(port, close_notify):
    """STARTTLS, then the pipelined transaction through a memory-BIO TLS
    client, then FIN (after a close_notify if asked); returns the decrypted
    replies up to the end."""
    c = h.SmtpConn(port)
    c.greeting()
    c.expect("EHLO client.test", 250)
    c.expect("STARTTLS", 220)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = h.client_tls_context().wrap_bio(inc, out, server_hostname="proxy.test")
    sock = c.sock
    sock.settimeout(h.IO_TIMEOUT)

    def pump_out():
        data = out.read()
        if data:
            sock.sendall(data)

    def pump_in():
        data = sock.recv(65536)
        if data:
            inc.write(data)
        else:
            inc.write_eof()
        return data

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump_out()
            assert pump_in(), "closed during the handshake"
    pump_out()
    tls.write(b"EHLO client.test\r\n" + PIPELINED)
    if close_notify:
        try:
            tls.unwrap()
        except ssl.SSLWantReadError:
            pass
    pump_out()
    sock.shutdown(socket.SHUT_WR)
    got = b""
    while True:
        try:
            data = tls.read(65536)
            if not data:
                break
            got += data
            continue
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            break
        if not pump_in():
            break
    sock.close()
    return got


@pytest.mark.parametrize("close_notify", [False, True], ids=["fin", "close_notify"])
def test_tls_half_close_gets_every_reply(make_proxy, aio, close_notify):
    proxy = make_proxy(aio)
    got = tls_half_close(proxy.port, close_notify)
    assert reply_codes(got) == [250, 250, 250, 354, 250, 221], got
    assert [m["original_content"] for m in aio.wait_messages(1)] == [MSG]
    proxy.wait_event("disconnect", reason="quit")


def test_half_close_inside_a_bdat_chunk_still_answers_the_message_before(make_proxy, postfix):
    """A complete message by BDAT LAST, then a second one cut inside its
    chunk, then FIN, all in one write: Postfix queues the first, and the
    client must get its 250 (or it sends the message again); the second is
    never delivered."""
    proxy = make_proxy(postfix.address("plain"), tls="none", require_tls=None)
    first = b"Subject: first\r\n\r\nfirst message\r\n"
    env = b"MAIL FROM:<b@example.org>\r\nRCPT TO:<a@example.net>\r\n"
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        assert "CHUNKING" in c.expect("EHLO client.test", 250).keywords()
        c.send(env + b"BDAT %d LAST\r\n" % len(first) + first +
               env + b"BDAT 100 LAST\r\nSubject: second\r\n")
        c.sock.shutdown(socket.SHUT_WR)
        got = c.read_until_closed()
    assert reply_codes(got)[:3] == [250, 250, 250], got
    m = re.search(rb"queued as ([0-9A-F]+)", got)
    assert m, got
    postfix.wait_log(r"%s: removed" % m.group(1).decode())
    proxy.wait_event("disconnect", reason="client_eof")
    assert "Subject: second" not in postfix.log_text()
