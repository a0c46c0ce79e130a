"""Upstream faults beyond test_upstream_faults.py (which covers an upstream
that is down, drops mid-message, hangs up while the client is idle, greets
with 421, answers slowly but within timeout_reply): a reset while a reply is
due, a reply slower than timeout_reply, a drop right after the end-of-data
dot, floods of continuation lines, over-long and bare-LF reply lines, a
multi-line reply cut by EOF, and an upstream that accepts but never greets.
Whatever the fault: the client gets a 4xx (never a 2xx it did not earn),
memory stays bounded and the daemon keeps serving the next client."""

import time

import stp_harness as h
import hardening_util as hu
from hardening_util import make_fault_upstream  # noqa: F401 (fixture)


def read_reply_bytes(conn, timeout):
    """Raw bytes up to and including the first final reply line ("NNN "),
    or up to the close. Returns (bytes, closed). Linear in the size, for
    replies of millions of octets."""
    conn.sock.settimeout(timeout)
    data = bytearray(conn.buf)
    conn.buf = b""
    scanned = 0
    while True:
        while True:
            nl = data.find(b"\n", scanned)
            if nl < 0:
                break
            line = data[scanned:nl + 1]
            scanned = nl + 1
            if len(line) >= 4 and line[3:4] != b"-":
                conn.buf = bytes(data[scanned:])
                return bytes(data[:scanned]), False
        try:
            chunk = conn.sock.recv(262144)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            return bytes(data), True
        data += chunk


def assert_still_serving(proxy, upstream_messages, n_before):
    """A fresh session (the upstream's fault is for its first session only)
    delivers a message end to end."""
    assert proxy.alive(), "daemon died:\n" + proxy.log_tail()
    r = hu.deliver(proxy.port, b"Subject: next\r\n\r\nafter the fault\r\n")
    assert r.code == 250, "the session after the fault failed: %r" % r.raw
    assert h.wait_until(lambda: len(upstream_messages()) > n_before, 5), \
        "the session after the fault delivered nothing upstream"


def assert_rcpt_gets_upstream_lost(make_proxy, up):
    """Through a proxy in front of UP, whose RCPT hook breaks the session:
    the RCPT gets 421 4.4.2, the client is closed, the daemon goes on."""
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        r = c.cmd("RCPT TO:<a@example.net>")
        assert r.raw == hu.UPSTREAM_LOST, r.raw
        assert hu.is_closed(c)
    assert_still_serving(proxy, lambda: up.messages, 0)


def test_upstream_reset_while_a_reply_is_due_gets_421_4_4_2(make_fault_upstream, make_proxy):
    up = make_fault_upstream(hooks={"RCPT": lambda peer, line: peer.reset()})
    assert_rcpt_gets_upstream_lost(make_proxy, up)


def test_upstream_reset_inside_data_never_acknowledges(make_fault_upstream, make_proxy):
    def reset_at_end(peer, content):
        peer.reset()
    up = make_fault_upstream(hooks={"DATA_END": reset_at_end})
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    with c:
        r = hu.send_message(c, b"Subject: reset\r\n\r\nbody\r\n")
        assert r.raw == hu.UPSTREAM_LOST, r.raw
        assert hu.is_closed(c)
    assert up.messages == []
    assert_still_serving(proxy, lambda: up.messages, 0)


def test_upstream_reply_slower_than_timeout_reply_gets_421_4_4_2(make_scripted, make_proxy):
    up = make_scripted(delays={"RCPT": 2.5})
    proxy = hu.start(make_proxy, up, upstream_opts={"timeout_reply": "1s"})
    c = hu.tls_session(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        t0 = time.monotonic()
        r = c.cmd("RCPT TO:<a@example.net>")
        waited = time.monotonic() - t0
        assert r.raw == hu.UPSTREAM_LOST, r.raw
        assert 0.8 <= waited <= 3.0, "421 after %.1fs with timeout_reply = 1s" % waited
        assert hu.is_closed(c)
    up.wait_closed(timeout=6)


def test_upstream_reply_within_timeout_reply_is_relayed(make_scripted, make_proxy):
    up = make_scripted(delays={"RCPT": 0.6})
    proxy = hu.start(make_proxy, up, upstream_opts={"timeout_reply": "2s"})
    c = hu.tls_session(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        r = c.cmd("RCPT TO:<a@example.net>")
        assert r.code == 250 and b"Ok rcpt" in r.raw, r.raw
        c.expect("QUIT", 221)


def test_slow_end_of_data_reply_beyond_timeout_reply_is_never_250(make_scripted, make_proxy):
    up = make_scripted(delays={"DATA_END": 2.5})
    proxy = hu.start(make_proxy, up, upstream_opts={"timeout_reply": "1s"})
    c = hu.tls_session(proxy.port)
    with c:
        r = hu.send_message(c, b"Subject: slow\r\n\r\nbody\r\n")
        assert r.raw == hu.UPSTREAM_LOST, r.raw
        rest = c.read_until_closed(timeout=6)
        assert b"250" not in rest, rest


def test_upstream_closing_right_after_end_of_data_gets_4xx_never_250(make_fault_upstream,
                                                                   make_proxy):
    def hang_up_at_end(peer, content):
        peer.hang_up()              # whole message read, no reply
    up = make_fault_upstream(hooks={"DATA_END": hang_up_at_end})
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    with c:
        r = hu.send_message(c, b"Subject: dropped\r\n\r\nbody\r\n")
        assert 400 <= r.code < 500, "expected a 4xx after the upstream hung up: %r" % r.raw
        assert r.raw == hu.UPSTREAM_LOST, r.raw
        rest = c.read_until_closed(timeout=5)
        assert b"250" not in rest, rest
    assert_still_serving(proxy, lambda: up.messages, 0)


def test_flood_of_continuation_lines_keeps_memory_bounded(make_scripted, make_proxy):
    """100,000 "250-" lines (about 8 MB) to one NOOP: the client gets them
    relayed or a 421, the daemon's RSS stays far below the flood's size."""
    n = 100000
    flood = b"".join(b"250-%s %06d\r\n" % (b"x" * 64, i) for i in range(n)) + b"250 end\r\n"
    up = make_scripted(replies={"NOOP": flood})
    proxy = hu.start(make_proxy, up, proxy={"log_level": "info"})
    c = hu.tls_session(proxy.port, timeout=30)
    base = h.rss_kib(proxy.pid)
    with c, hu.RssSampler(proxy.pid) as rss:
        c.send(b"NOOP\r\n")
        data, closed = read_reply_bytes(c, timeout=30)
        lines = data.splitlines(keepends=True)
        last = lines[-1] if lines else b""
        relayed = last == b"250 end\r\n" and len(lines) == n + 1
        refused = last.startswith(b"421 4.")
        assert relayed or refused, "got %d lines, last %r (closed=%s)" % (len(lines), last, closed)
        assert data.count(b"\n") == data.count(b"\r\n"), "bare LF sent to the client"
        if relayed:
            c.expect("MAIL FROM:<b@example.org>", 250)     # still in step
    hu.assert_rss_growth(rss.peak - base, 6 * 1024, "during an 8 MB reply")
    assert_still_serving(proxy, lambda: up.messages, 0)


def test_reply_line_longer_than_2048_octets_gets_421(make_scripted, make_proxy):
    up = make_scripted(replies={"NOOP": b"250 " + b"y" * 5000 + b"\r\n"})
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    with c:
        r = c.cmd("NOOP")
        assert r.code == 421 and "4.4.2" in r.text, r.raw
        assert b"yyyy" not in r.raw
        assert hu.is_closed(c)
    assert proxy.wait_event("upstream_error")
    assert_still_serving(proxy, lambda: up.messages, 0)


def test_one_mebibyte_reply_without_lf_keeps_memory_bounded(make_scripted, make_proxy):
    up = make_scripted(replies={"NOOP": b"250 " + b"z" * (1024 * 1024)})
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    base = h.rss_kib(proxy.pid)
    with c, hu.RssSampler(proxy.pid) as rss:
        r = c.cmd("NOOP")
        assert r.code == 421 and "4.4.2" in r.text, r.raw
        assert hu.is_closed(c)
    hu.assert_rss_growth(rss.peak - base, 4 * 1024, "on a 1 MiB reply line")
    assert_still_serving(proxy, lambda: up.messages, 0)


def test_bare_lf_reply_lines_reach_the_client_as_crlf_or_421(make_scripted, make_proxy):
    """Replies ended by a bare LF: relayed with CRLF line ends (a client never
    sees a bare LF from the proxy), or refused with a 421. Either way the
    session stays in step."""
    up = make_scripted(replies={"NOOP": b"250-first\n250-second\n250 third\n"})
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    with c:
        r = c.cmd("NOOP")
        assert b"\n" not in r.raw.replace(b"\r\n", b""), "bare LF relayed: %r" % r.raw
        if r.code == 250:
            assert r.raw == b"250-first\r\n250-second\r\n250 third\r\n", r.raw
            c.expect("MAIL FROM:<b@example.org>", 250)      # still in step
            c.expect("QUIT", 221)
        else:
            assert r.code == 421 and "4.4.2" in r.text, r.raw
            assert hu.is_closed(c)
    assert_still_serving(proxy, lambda: up.messages, 0)


def test_eof_in_the_middle_of_a_multiline_reply_gets_421(make_fault_upstream, make_proxy):
    def cut(peer, line):
        peer.send(b"250-first line of three\r\n250-second line of three\r\n")
        time.sleep(0.2)
        peer.hang_up()
    up = make_fault_upstream(hooks={"NOOP": cut})
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    with c:
        c.send(b"NOOP\r\n")
        lines, closed = hu.read_lines_until_final(c)
        assert lines, "nothing before the close"
        assert lines[-1] == hu.UPSTREAM_LOST, lines
        assert not any(l.startswith(b"250 ") for l in lines), lines
        assert hu.is_closed(c)
    assert_still_serving(proxy, lambda: up.messages, 0)


def test_eof_in_the_middle_of_a_reply_line_gets_421(make_fault_upstream, make_proxy):
    def cut(peer, line):
        peer.send(b"250 2.1.5 Ok rc")              # no line end
        time.sleep(0.2)
        peer.hang_up()
    up = make_fault_upstream(hooks={"RCPT": cut})
    assert_rcpt_gets_upstream_lost(make_proxy, up)


def test_upstream_that_accepts_but_never_greets_gets_421_after_timeout_connect(
        make_scripted, make_proxy):
    up = make_scripted(greeting=[])           # a silent upstream
    proxy = hu.start(make_proxy, up, upstream_opts={"timeout_connect": "1s"})
    with h.SmtpConn(proxy.port, timeout=5) as c:
        t0 = time.monotonic()
        r = c.read_reply()
        waited = time.monotonic() - t0
        assert r.code == 421 and "4.3.2" in r.text, r.raw
        assert 0.8 <= waited <= 3.0, "421 after %.1fs with timeout_connect = 1s" % waited
        assert hu.is_closed(c)
    up.wait_closed(timeout=5)


def test_unsolicited_reply_from_upstream_gets_421(make_scripted, make_proxy):
    """A reply nobody asked for (not a 421) is a protocol error: relaying it
    would desynchronise every later reply."""
    up = make_scripted(replies={"NOOP": b"250 2.0.0 Ok noop\r\n250 2.0.0 surprise\r\n"})
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    with c:
        c.send(b"NOOP\r\n")
        first = c.read_reply()
        assert first.raw == b"250 2.0.0 Ok noop\r\n", first.raw
        second = c.read_reply()
        assert second.code == 421 and "4.4.2" in second.text, second.raw
        assert hu.is_closed(c)
    assert_still_serving(proxy, lambda: up.messages, 0)
