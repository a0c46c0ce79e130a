"""The upstream going away, and the idle timeout."""

import smtplib
import time

import stp_harness as h


def test_upstream_down_gets_421_4_3_2_and_close(make_proxy):
    dead = "127.0.0.1:%d" % h.free_port()      # nothing listens there
    proxy = make_proxy(dead)
    with h.SmtpConn(proxy.port, timeout=10) as c:
        r = c.read_reply()
        assert r.code == 421 and "4.3.2" in r.text, r.raw
        assert c.read_until_closed(timeout=5) == b""
    # and again: the daemon keeps accepting
    with h.SmtpConn(proxy.port, timeout=10) as c:
        r = c.read_reply()
        assert r.code == 421 and "4.3.2" in r.text, r.raw


def test_upstream_drop_mid_data_gets_421_4_4_2_never_250(make_scripted, make_proxy):
    up = make_scripted(drop_in_data_after=100, fault_sessions=1)
    proxy = make_proxy(up)
    c, _ = h.open_session(proxy.port, tls=True, timeout=10)
    with c:
        c.begin_data()
        body = b"Subject: doomed\r\n\r\n" + b"".join(b"line %04d of the message\r\n" % i
                                                 for i in range(80))
        c.send(body + b".\r\n")
        r = c.read_reply()
        assert r.code == 421 and "4.4.2" in r.text, "expected 421 4.4.2, got %r" % r.raw
        rest = c.read_until_closed(timeout=5)
        assert b"250" not in rest, rest
    up.wait_closed()
    assert up.sessions[0].dropped
    assert up.messages == []
    # the daemon keeps serving: the next session (no fault) delivers
    msg = b"Subject: next\r\n\r\nafter the drop\r\n"
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as s:
        s.starttls(context=h.client_tls_context())
        assert s.sendmail("b@example.org", ["a@example.net"], msg) == {}
    assert up.wait_messages(1)[0]["content"] == msg


def test_upstream_closing_while_client_is_idle_gets_421(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up)
    c, _ = h.open_session(proxy.port, tls=True, timeout=10)
    with c:
        up.wait_sessions(1)
        up.hang_up()                        # the upstream hangs up on its own
        r = c.read_reply()
        assert r.code == 421 and "4.4.2" in r.text, r.raw
        c.read_until_closed(timeout=5)


def test_idle_client_gets_421_4_4_2_and_is_closed(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, timeout_idle="1s")
    with h.SmtpConn(proxy.port, timeout=10) as c:
        c.greeting()
        t0 = time.monotonic()
        r = c.read_reply()
        waited = time.monotonic() - t0
        assert r.code == 421 and "4.4.2" in r.text, r.raw
        assert 0.5 <= waited <= 4, "timeout after %.1fs with timeout_idle = 1s" % waited
        assert c.read_until_closed(timeout=3) == b""


def test_idle_client_inside_tls_gets_421_4_4_2_and_is_closed(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, timeout_idle="1500ms")
    c, _ = h.open_session(proxy.port, tls=True, timeout=10)
    with c:
        t0 = time.monotonic()
        r = c.read_reply()
        waited = time.monotonic() - t0
        assert r.code == 421 and "4.4.2" in r.text, r.raw
        assert 1.0 <= waited <= 4.5, "timeout after %.1fs with timeout_idle = 1500ms" % waited
        c.read_until_closed(timeout=3)


def test_active_client_is_not_timed_out(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, timeout_idle="1s")
    c, _ = h.open_session(proxy.port, tls=True, timeout=10)
    with c:
        for _ in range(6):                  # 3 s of activity, 0.5 s apart
            time.sleep(0.5)
            c.expect("NOOP", 250)
        c.expect("QUIT", 221)


def test_upstream_421_mid_session_is_relayed_and_closes(make_scripted, make_proxy):
    up = make_scripted(replies={"NOOP": b"421 4.3.0 upstream.test going down\r\n"})
    proxy = make_proxy(up)
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        r = c.cmd("NOOP")
        assert r.raw == b"421 4.3.0 upstream.test going down\r\n", r.raw
        assert c.read_until_closed(timeout=5) == b""


def test_client_stalling_the_tls_handshake_is_closed_after_the_timeout(make_scripted,
                                                                       make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, timeout_handshake="1s")
    with h.SmtpConn(proxy.port, timeout=10) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        t0 = time.monotonic()
        got = c.read_until_closed(timeout=6)    # we never send a ClientHello
        assert time.monotonic() - t0 < 5
        assert not got.startswith(b"421"), "an SMTP reply where TLS was expected: %r" % got


def test_client_disconnect_mid_data_does_not_complete_the_message(proxy_scripted):
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    c.begin_data()
    c.send(b"Subject: unfinished\r\n\r\nsome content\r\n.")   # no final CRLF
    time.sleep(0.2)
    c.close()                                   # abrupt: no QUIT
    up.wait_sessions(1)
    up.wait_closed(timeout=5)
    assert up.messages == [], "an unfinished message was completed upstream: %r" % up.messages


def test_upstream_421_greeting_is_relayed_and_closes(make_scripted, make_proxy):
    up = make_scripted(greeting=["upstream.test too busy, try later"], greeting_code=421)
    proxy = make_proxy(up)
    with h.SmtpConn(proxy.port) as c:
        r = c.read_reply()
        assert r.raw == b"421 upstream.test too busy, try later\r\n", r.raw
        assert c.read_until_closed(timeout=5) == b""


def test_slow_upstream_reply_to_end_of_data_is_not_a_client_timeout(make_scripted, make_proxy):
    """The client waiting for the upstream's reply is not idle: a content
    filter taking longer than timeout_idle must not turn into a 421 (the
    message may already be queued upstream: a 421 invites a duplicate)."""
    up = make_scripted(delays={"DATA_END": 2.5})
    proxy = make_proxy(up, timeout_idle="1s")
    c, _ = h.open_session(proxy.port, tls=True, timeout=10)
    with c:
        c.begin_data()
        c.send(b"Subject: slow filter\r\n\r\nbody\r\n.\r\n")
        r = c.read_reply()
        assert r.code == 250, "waiting for the upstream's reply timed out the client: %r" % r.raw
        c.expect("QUIT", 221)
    assert len(up.wait_messages(1)) == 1


def test_slow_upstream_reply_to_a_command_is_not_a_client_timeout(make_scripted, make_proxy):
    up = make_scripted(delays={"RCPT": 2.5})
    proxy = make_proxy(up, timeout_idle="1s")
    c, _ = h.open_session(proxy.port, tls=True, timeout=10)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        r = c.cmd("RCPT TO:<a@example.net>")
        assert r.code == 250, "waiting for the upstream's reply timed out the client: %r" % r.raw
        c.expect("QUIT", 221)
