"""Connection limits (global, per listener, per client address) and the cap
on consecutive error replies.

A refused client gets exactly
``421 4.7.0 <hostname> Error: too many connections`` and a close, and the
upstream never hears of it. Per-address tests connect from several
127.x.y.z source addresses (all of 127/8 is loopback on Linux)."""

import time

import stp_harness as h
import hardening_util as hu


def second_listener(tls_files, **kw):
    opts = {"listen": "127.0.0.1:0", "tls": "starttls", "require_tls": "yes",
            "cert": tls_files["cert"], "key": tls_files["key"], "upstream": "up",
            "timeout_idle": "30s"}
    opts.update(kw)
    return ("second", opts)


def settle_upstream(up, expected):
    """The upstream saw exactly EXPECTED sessions (and no more arrive)."""
    up.wait_sessions(expected)
    time.sleep(0.3)
    assert len(up.sessions) == expected, \
        "upstream saw %d connections, expected %d: a refused client reached it" % (
            len(up.sessions), expected)


def test_global_limit_counts_every_listener(make_scripted, make_proxy, tls_files):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"max_connections": "3"},
                     extra_listeners=[second_listener(tls_files)])
    other = proxy.ports["second"]
    open_ = [hu.greeted(proxy.port), hu.greeted(proxy.port), hu.greeted(other)]
    try:
        hu.assert_refused(proxy.port)
        hu.assert_refused(other)
        settle_upstream(up, 3)
    finally:
        for c in open_:
            c.close()


def test_slot_freed_by_a_finished_session_is_reused(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"max_connections": "2"})
    a, b = hu.greeted(proxy.port), hu.greeted(proxy.port)
    with b:
        hu.assert_refused(proxy.port)
        with a:
            a.expect("QUIT", 221)
        # the slot comes back once the daemon has seen the close
        c = h.wait_until(lambda: hu.try_greeted(proxy.port), 3, interval=0.1)
        assert c, "no slot after a session ended"
        with c:
            c.expect("EHLO client.test", 250)
            c.expect("QUIT", 221)


def test_listener_limit_leaves_other_listeners_open(make_scripted, make_proxy, tls_files):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, max_connections="2",
                     extra_listeners=[second_listener(tls_files)])
    other = proxy.ports["second"]
    conns = [hu.greeted(proxy.port), hu.greeted(proxy.port)]
    try:
        hu.assert_refused(proxy.port)
        conns.append(hu.greeted(other))
        conns.append(hu.greeted(other))
        settle_upstream(up, 4)
    finally:
        for c in conns:
            c.close()


def test_per_ip_limit_refuses_only_that_address(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, max_connections_per_ip="2")
    conns = [hu.greeted(proxy.port, "127.0.0.2"), hu.greeted(proxy.port, "127.0.0.2")]
    try:
        hu.assert_refused(proxy.port, "127.0.0.2")
        conns.append(hu.greeted(proxy.port, "127.0.0.3"))
        conns.append(hu.greeted(proxy.port, "127.0.0.3"))
        hu.assert_refused(proxy.port, "127.0.0.3")
        conns.append(hu.greeted(proxy.port, "127.0.0.4"))
        settle_upstream(up, 5)
    finally:
        for c in conns:
            c.close()


def test_implicit_tls_listener_over_its_limit_just_closes(make_scripted, make_proxy,
                                                          tls_files):
    """README: an implicit-TLS listener has no plaintext channel for a 421;
    over the limit it closes without a byte (and without the upstream)."""
    up = make_scripted()
    proxy = hu.start(make_proxy, up, extra_listeners=[("smtps", {
        "listen": "127.0.0.1:0", "tls": "implicit", "cert": tls_files["cert"],
        "key": tls_files["key"], "upstream": "up", "max_connections": "1"})])
    port = proxy.ports["smtps"]
    first = hu.implicit_session(port)
    with first:
        with h.SmtpConn(port) as c:
            assert c.read_until_closed(timeout=5) == b""
        first.expect("NOOP", 250)
        settle_upstream(up, 1)


def test_refused_client_gets_421_even_when_the_upstream_is_slow(make_scripted, make_proxy):
    """The 421 comes from the proxy at once: it does not wait for (or
    contact) the upstream, here one that never greets."""
    up = make_scripted(greeting=[])
    proxy = hu.start(make_proxy, up, max_connections_per_ip="1")
    first = h.SmtpConn(proxy.port)
    with first:
        up.wait_sessions(1)
        t0 = time.monotonic()
        hu.assert_refused(proxy.port)
        assert time.monotonic() - t0 < 1.0
        settle_upstream(up, 1)


def test_slots_are_released_however_a_session_ends(make_scripted, make_proxy):
    """QUIT, a client FIN, a client RST, a failed TLS handshake, an idle
    timeout: after each, the per-address count is back, so two sessions from
    one address still fit under a limit of two."""
    up = make_scripted()
    proxy = hu.start(make_proxy, up, max_connections_per_ip="2", timeout_idle="1s")
    src = "127.0.0.5"
    for _ in range(2):
        c = hu.greeted(proxy.port, src)
        c.expect("QUIT", 221)
        c.close()
        c = hu.greeted(proxy.port, src)
        c.close()                                             # FIN
        c = hu.greeted(proxy.port, src)
        hu.reset_close(c.sock)                                # RST
        c = hu.greeted(proxy.port, src)
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.send(b"\x16\x03\x01\x00\x05not a ClientHello" * 4)  # failed handshake
        c.read_until_closed(timeout=5)
        c.close()
        c = hu.greeted(proxy.port, src)
        assert c.read_reply().raw == hu.TIMEOUT_EXCEEDED       # idle timeout
        c.close()

    def two_fit():
        a = _try_greeted_from(proxy.port, src)
        b = _try_greeted_from(proxy.port, src)
        ok = a is not None and b is not None
        for c in (a, b):
            if c:
                c.close()
        return ok
    assert h.wait_until(two_fit, 3, interval=0.2), \
        "a per-address slot leaked:\n" + proxy.log_tail(20)


def _try_greeted_from(port, src):
    c = hu.connect_from(port, src)
    r = c.read_reply()
    if r.code == 220:
        return c
    c.close()
    return None


# --- max_errors -----------------------------------------------------------------

def test_max_errors_consecutive_rejections_get_421_and_close(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, max_errors="3")
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("MAIL FROM:<b@example.org>", 530)              # 1
        c.expect("RCPT TO:<a@example.net>", 530)                # 2
        c.send(b"DATA\r\n")                                      # 3
        got = c.read_until_closed(timeout=5)
    assert got == (b"530 5.7.0 Must issue a STARTTLS command first\r\n"
                   + hu.TOO_MANY_ERRORS), got
    assert not up.saw_verb("MAIL") and not up.saw_verb("DATA")


def test_max_errors_count_is_reset_by_a_2xx(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, max_errors="3")
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        for _ in range(3):
            c.expect("MAIL FROM:<b@example.org>", 530)
            c.expect("MAIL FROM:<b@example.org>", 530)
            c.expect("NOOP", 250)                 # resets the count
        c.expect("QUIT", 221)


def test_max_errors_counts_the_upstreams_5xx(make_scripted, make_proxy):
    up = make_scripted(replies={"RCPT": b"550 5.1.1 <x@example.net>: no such user\r\n"})
    proxy = hu.start(make_proxy, up, max_errors="3")
    c = hu.tls_session(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("RCPT TO:<x1@example.net>", 550)
        c.expect("XCLIENT ADDR=192.0.2.1", 550)       # the proxy's own refusal
        c.send(b"RCPT TO:<x3@example.net>\r\n")
        got = c.read_until_closed(timeout=5)
    assert got == b"550 5.1.1 <x@example.net>: no such user\r\n" + hu.TOO_MANY_ERRORS, got


def test_max_errors_does_not_count_4xx_replies(make_scripted, make_proxy):
    """4xx replies (greylisting, a full mailbox) are not client errors."""
    up = make_scripted(replies={"RCPT": b"450 4.2.0 <x@example.net>: greylisted\r\n"})
    proxy = hu.start(make_proxy, up, max_errors="2")
    c = hu.tls_session(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        for i in range(5):
            c.expect("RCPT TO:<x%d@example.net>" % i, 450)
        c.expect("QUIT", 221)
