"""Deadlines on the client leg: per command line (even while bytes keep
trickling in), per message (DATA and a BDAT chunk), per TLS handshake, and
over-long lines before TLS. Timeouts answer
``421 4.4.2 <hostname> Error: timeout exceeded`` (a TLS handshake has no
SMTP reply: just a close).

The idle timeout alone (nothing sent) is covered by test_upstream_faults.py;
here every slow client keeps sending, so only the new deadlines can stop it."""

import selectors
import threading
import time

import stp_harness as h
import hardening_util as hu


def drip(conns, interval, until, payload=b"NOOP" + b"x" * 64):
    """Send one byte every INTERVAL to every socket in CONNS (non-blocking)
    until it is closed or UNTIL (monotonic) passes. Returns, per socket,
    (seconds from its first byte to EOF or None, bytes received)."""
    sel = selectors.DefaultSelector()
    state = {}
    now = time.monotonic()
    for c in conns:
        c.sock.setblocking(False)
        sel.register(c.sock, selectors.EVENT_READ, c)
        state[c] = {"first": None, "sent": 0, "got": b"", "closed_at": None}
    next_send = now
    while time.monotonic() < until and any(s["closed_at"] is None for s in state.values()):
        now = time.monotonic()
        if now >= next_send:
            for c, s in state.items():
                if s["closed_at"] is not None:
                    continue
                try:
                    c.sock.send(payload[s["sent"] % len(payload):][:1])
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    continue
                if s["first"] is None:
                    s["first"] = now
                s["sent"] += 1
            next_send += interval
        for key, _ in sel.select(timeout=max(0.0, min(next_send, until) - time.monotonic())):
            c = key.data
            s = state[c]
            try:
                d = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except (ConnectionResetError, OSError):
                d = b""
            if d:
                s["got"] += d
            else:
                s["closed_at"] = time.monotonic()
                sel.unregister(c.sock)
    sel.close()
    return {c: ((s["closed_at"] - s["first"]) if s["closed_at"] and s["first"] else None,
                s["got"]) for c, s in state.items()}


def test_200_dripping_clients_get_421_after_timeout_command_while_others_are_served(
        make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"log_level": "info"}, timeout_command="2s",
                     timeout_idle="30s", max_connections_per_ip="1000")
    drippers = []
    try:
        for _ in range(200):
            c = h.SmtpConn(proxy.port, timeout=10)
            c.greeting()
            drippers.append(c)
        result = {}
        t = threading.Thread(target=lambda: result.update(
            drip(drippers, 0.5, time.monotonic() + 8)))
        t.start()
        time.sleep(0.7)
        t0 = time.monotonic()
        r = hu.deliver(proxy.port, b"Subject: fast\r\n\r\nwhile 200 drip\r\n")
        took = time.monotonic() - t0
        t.join(15)
        assert r.code == 250, r.raw
        assert took < 1.0, "a normal session took %.2fs beside 200 dripping clients" % took
        late, wrong = [], []
        for c, (secs, got) in result.items():
            if got != hu.TIMEOUT_EXCEEDED:
                wrong.append(got)
            elif secs is None or not 1.5 <= secs <= 3.5:
                late.append(secs)
        assert not wrong, "%d drippers got something else than %r, e.g. %r" % (
            len(wrong), hu.TIMEOUT_EXCEEDED, wrong[:3])
        assert not late, "%d drippers were not closed 1.5-3.5 s after their first byte " \
                         "(timeout_command = 2s): %r" % (len(late), late[:10])
    finally:
        for c in drippers:
            c.close()
    assert len(up.wait_messages(1)) == 1


def test_dripping_client_inside_tls_gets_421_after_timeout_command(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, timeout_command="1s", timeout_idle="30s")
    c = hu.tls_session(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        t0 = time.monotonic()
        got = hu.drip(c, (bytes([ch]) for ch in b"RCPT TO:<a@example.net>"), 0.25, timeout=3,
                      default=b"")
        waited = time.monotonic() - t0
        assert got == hu.TIMEOUT_EXCEEDED, got
        assert 0.8 <= waited <= 2.5, "closed %.1fs after the first byte" % waited
    up.wait_closed()
    assert not up.saw_verb("RCPT")


def test_complete_commands_sent_slowly_are_not_a_command_timeout(make_scripted, make_proxy):
    """The deadline is per line: many short lines over a longer time are fine."""
    up = make_scripted()
    proxy = hu.start(make_proxy, up, timeout_command="1s", timeout_idle="30s")
    c = hu.tls_session(proxy.port)
    with c:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            c.send(b"NO")
            time.sleep(0.3)
            c.send(b"OP\r\n")
            assert c.read_reply().code == 250
        c.expect("QUIT", 221)


def test_client_stalling_mid_message_gets_421_after_timeout_data(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, timeout_data="1500ms", timeout_idle="30s")
    c = hu.tls_session(proxy.port)
    with c:
        c.begin_data()
        t0 = time.monotonic()
        c.send(b"Subject: stalled\r\n\r\nthe first half of the message\r\n")
        got = c.read_until_closed(timeout=5)
        waited = time.monotonic() - t0
    assert got == hu.TIMEOUT_EXCEEDED, got
    assert 1.2 <= waited <= 3.0, "closed %.1fs after the 354 (timeout_data = 1500ms)" % waited
    up.wait_closed()
    assert up.messages == [], "a half message was completed upstream: %r" % up.messages


def test_client_dripping_content_gets_421_after_timeout_data(make_scripted, make_proxy):
    """Content lines keep arriving, so neither idle nor command deadlines
    fire: the whole message has to be in within timeout_data."""
    up = make_scripted()
    proxy = hu.start(make_proxy, up, timeout_data="1500ms", timeout_idle="30s",
                     timeout_command="30s")
    c = hu.tls_session(proxy.port)
    with c:
        c.begin_data()
        t0 = time.monotonic()
        got = hu.drip(c, (b"line %d of a slow message\r\n" % i for i in range(40)), 0.2,
                      timeout=3, default=b"")
        waited = time.monotonic() - t0
    assert got == hu.TIMEOUT_EXCEEDED, got
    assert 1.2 <= waited <= 3.0, "closed %.1fs after the 354 (timeout_data = 1500ms)" % waited
    up.wait_closed()
    assert up.messages == []


def test_client_stalling_inside_a_bdat_chunk_gets_421_after_timeout_data(make_scripted,
                                                                         make_proxy):
    up = make_scripted(ehlo=["upstream.test", "PIPELINING", "CHUNKING", "8BITMIME"])
    proxy = hu.start(make_proxy, up, timeout_data="1500ms", timeout_idle="30s")
    c = hu.tls_session(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("RCPT TO:<a@example.net>", 250)
        t0 = time.monotonic()
        c.send(b"BDAT 1000 LAST\r\n" + b"x" * 100)
        got = c.read_until_closed(timeout=5)
        waited = time.monotonic() - t0
    assert got == hu.TIMEOUT_EXCEEDED, got
    assert 1.2 <= waited <= 3.0, "closed %.1fs after BDAT (timeout_data = 1500ms)" % waited
    up.wait_closed()
    assert up.messages == []


def test_whole_message_within_timeout_data_is_delivered(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, timeout_data="2s", timeout_idle="30s")
    c = hu.tls_session(proxy.port)
    with c:
        c.begin_data()
        for i in range(5):
            c.send(b"line %d\r\n" % i)
            time.sleep(0.2)
        c.send(b".\r\n")
        assert c.read_reply().code == 250
        # the next message has its own deadline
        r = hu.send_message(c, b"Subject: second\r\n\r\nbody\r\n")
        assert r.code == 250, r.raw
        c.expect("QUIT", 221)
    assert len(up.wait_messages(2)) == 2


def test_half_a_client_hello_dripped_after_starttls_is_closed_after_timeout_handshake(
        make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, timeout_handshake="1s", timeout_idle="30s")
    hello = hu.client_hello()
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        t0 = time.monotonic()
        got = hu.drip(c, (bytes([b]) for b in hello[:len(hello) // 2]), 0.2, timeout=3,
                      send_errors=(BrokenPipeError, ConnectionResetError))
        waited = time.monotonic() - t0
    assert got is not None, "still open after %.1fs of a dripped ClientHello" % waited
    assert b"421" not in got and b"220" not in got, "an SMTP reply inside TLS: %r" % got
    assert 0.8 <= waited <= 2.5, "closed %.1fs after STARTTLS (timeout_handshake = 1s)" % waited


def test_half_a_client_hello_on_an_implicit_tls_listener_is_closed_after_timeout_handshake(
        make_scripted, make_proxy, tls_files):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, extra_listeners=[("smtps", {
        "listen": "127.0.0.1:0", "tls": "implicit", "cert": tls_files["cert"],
        "key": tls_files["key"], "upstream": "up", "timeout_handshake": "1s",
        "timeout_idle": "30s"})])
    port = proxy.ports["smtps"]
    hello = hu.client_hello()
    with h.SmtpConn(port) as c:
        c.send(hello[:len(hello) // 2])
        t0 = time.monotonic()
        got = c.read_until_closed(timeout=5)
        waited = time.monotonic() - t0
    assert not got.startswith(b"421") and b"220 " not in got, got
    assert 0.8 <= waited <= 2.5, "closed %.1fs after half a ClientHello" % waited


def test_one_mebibyte_line_without_crlf_before_tls_keeps_memory_bounded(make_scripted,
                                                                         make_proxy):
    """Before TLS (the same after TLS is in test_policy.py): 500 5.5.2, one
    reply, the session goes on, memory bounded, nothing reaches the upstream."""
    up = make_scripted()
    proxy = hu.start(make_proxy, up)
    with h.SmtpConn(proxy.port, timeout=15) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        before = h.rss_kib(proxy.pid)
        with hu.RssSampler(proxy.pid) as rss:
            for _ in range(16):
                c.send(b"M" * 65536)
            time.sleep(0.3)
            c.send(b"\r\nNOOP\r\n")
            r = c.read_reply()
            assert r.raw == b"500 5.5.2 Error: line too long\r\n", r.raw
            assert c.read_reply().code == 250, "expected exactly one 500, then the NOOP's 250"
        hu.assert_rss_growth(rss.peak - before, 4 * 1024, "on a 1 MiB line before TLS")
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("EHLO client.test", 250)
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not up.saw_line_containing(b"M" * 100)
