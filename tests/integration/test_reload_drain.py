"""SIGHUP reloads (certificates, listeners, upstreams, a broken file) without
disturbing open sessions; SIGTERM/SIGINT drain: idle sessions get
``421 4.3.2 Service shutting down, closing transmission channel`` at once,
a transaction in flight finishes first, drain_timeout ends the rest, a
second signal ends everything, exit code 0."""

import os
import re
import shutil
import signal
import socket
import time

import pytest

import stp_harness as h
import hardening_util as hu


def assert_reload_ok(proxy, text=None):
    evs = hu.reload(proxy, text)
    assert hu.reload_status(evs) == "ok", "reload failed:\n%s" % proxy.log_tail()
    return evs


def assert_reload_failed(proxy, text):
    """SIGHUP with TEXT is refused; returns the error= of the failure."""
    evs = hu.reload(proxy, text)
    assert hu.reload_status(evs) == "failed", "\n".join(e["_line"] for e in evs)
    return evs[0].get("error", "")


def assert_connection_refused(port):
    s = socket.socket()
    s.settimeout(3)
    try:
        with pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port))
    finally:
        s.close()


def next_reply_or_after_noop(conn, wait=2.0):
    """The next reply; if none comes within WAIT, send NOOP and read one
    (the 421 may come at once or at the next command)."""
    d = hu.poll_recv(conn, wait)
    if d is None:
        conn.send(b"NOOP\r\n")
        conn.sock.settimeout(5)
        return conn.read_reply()
    conn.buf = d
    conn.sock.settimeout(5)
    return conn.read_reply()


# --- SIGHUP -----------------------------------------------------------------------

def test_sighup_leaves_an_open_tls_session_to_complete_its_message(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("RCPT TO:<a@example.net>", 250)
        assert_reload_ok(proxy)
        c.expect("DATA", 354)
        c.send(b"Subject: across a reload\r\n\r\nbody\r\n.\r\n")
        assert c.read_reply().code == 250
        c.expect("QUIT", 221)
    assert up.wait_messages(1)[0]["content"] == b"Subject: across a reload\r\n\r\nbody\r\n"
    assert hu.deliver(proxy.port).code == 250        # and new sessions work


def test_sighup_mid_message_does_not_disturb_it(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up)
    c = hu.tls_session(proxy.port)
    with c:
        c.begin_data()
        c.send(b"Subject: split by a reload\r\n\r\nfirst half\r\n")
        assert_reload_ok(proxy)
        c.send(b"second half\r\n.\r\n")
        assert c.read_reply().code == 250
    assert up.wait_messages(1)[0]["content"] == \
        b"Subject: split by a reload\r\n\r\nfirst half\r\nsecond half\r\n"


def test_sighup_reloads_the_certificate_for_new_sessions(make_scripted, make_proxy, tmp_path):
    old = hu.make_cert(str(tmp_path / "old"), "old.test")
    new = hu.make_cert(str(tmp_path / "new"), "new.test")
    live = {"cert": str(tmp_path / "live.crt"), "key": str(tmp_path / "live.key")}
    shutil.copy(old["cert"], live["cert"])
    shutil.copy(old["key"], live["key"])
    up = make_scripted()
    proxy = hu.start(make_proxy, up, cert=live["cert"], key=live["key"])
    before = hu.tls_session(proxy.port)
    with before:
        assert before.sock.getpeercert(binary_form=True) == hu.cert_der(old["cert"])
        # renew: new files renamed into place, as certbot's hooks do
        for k in ("cert", "key"):
            shutil.copy(new[k], live[k] + ".tmp")
            os.replace(live[k] + ".tmp", live[k])
        assert_reload_ok(proxy)
        after = hu.tls_session(proxy.port)
        with after:
            assert after.sock.getpeercert(binary_form=True) == hu.cert_der(new["cert"]), \
                "a session after SIGHUP still got the old certificate"
            after.expect("QUIT", 221)
        r = hu.send_message(before, b"Subject: old cert\r\n\r\nstill fine\r\n")
        assert r.code == 250, r.raw
        before.expect("QUIT", 221)


def test_sighup_adds_a_listener(make_scripted, make_proxy, tls_files):
    up = make_scripted()
    proxy = hu.start(make_proxy, up)
    new_port = h.free_port()
    assert_connection_refused(new_port)
    assert_reload_ok(proxy, proxy.config_text + hu.listener_section("added", new_port, tls_files))
    proxy.wait_event("listening", listener="added")
    assert hu.deliver(new_port).code == 250
    assert hu.deliver(proxy.port).code == 250


def test_sighup_removes_a_listener_but_its_open_session_completes(make_scripted, make_proxy,
                                                                  tls_files):
    up = make_scripted()
    extra = ("second", {"listen": "127.0.0.1:0", "tls": "starttls",
                        "cert": tls_files["cert"], "key": tls_files["key"], "upstream": "up"})
    proxy = hu.start(make_proxy, up, extra_listeners=[extra])
    other = proxy.ports["second"]
    c = hu.tls_session(other)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        assert_reload_ok(proxy, hu.remove_section(proxy.config_text, "[listener second]"))
        assert_connection_refused(other)
        c.expect("RCPT TO:<a@example.net>", 250)
        c.expect("DATA", 354)
        c.send(b"Subject: removed listener\r\n\r\nbody\r\n.\r\n")
        assert c.read_reply().code == 250
        c.expect("QUIT", 221)
    assert hu.deliver(proxy.port).code == 250        # the kept listener still serves
    assert len(up.wait_messages(2)) == 2


def test_sighup_changes_the_upstream_for_new_sessions_only(make_scripted, make_proxy):
    old_up, new_up = make_scripted(), make_scripted()
    proxy = hu.start(make_proxy, old_up)
    before = hu.tls_session(proxy.port)
    with before:
        assert_reload_ok(proxy, proxy.config_text.replace(old_up.address, new_up.address))
        assert hu.deliver(proxy.port, b"Subject: new\r\n\r\nto the new upstream\r\n").code == 250
        r = hu.send_message(before, b"Subject: old\r\n\r\nto the old upstream\r\n")
        assert r.code == 250, r.raw
        before.expect("QUIT", 221)
    assert [m["content"] for m in new_up.wait_messages(1)] == \
        [b"Subject: new\r\n\r\nto the new upstream\r\n"]
    assert [m["content"] for m in old_up.wait_messages(1)] == \
        [b"Subject: old\r\n\r\nto the old upstream\r\n"]
    assert len(old_up.sessions) == 1 and len(new_up.sessions) == 1


def test_sighup_changes_a_listener_policy_for_new_sessions_only(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, require_tls="yes")
    with h.SmtpConn(proxy.port) as before:
        before.greeting()
        before.expect("EHLO client.test", 250)
        assert_reload_ok(proxy, hu.set_key(proxy.config_text, "listener main",
                                           "require_tls", "no"))
        with h.SmtpConn(proxy.port) as after:
            after.greeting()
            after.expect("EHLO client.test", 250)
            after.expect("MAIL FROM:<new@example.org>", 250)
            after.expect("QUIT", 221)
        before.expect("MAIL FROM:<old@example.org>", 530)   # still require_tls = yes
        before.expect("QUIT", 221)


def test_sighup_with_a_broken_file_logs_file_line_and_keeps_serving(make_scripted,
                                                                    make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up)
    good = proxy.config_text
    bad = hu.set_key(good, "listener main", "max_line", "1")
    bad_line = next(i for i, l in enumerate(bad.splitlines(), 1) if l == "max_line = 1")
    c = hu.tls_session(proxy.port)
    with c:
        err = assert_reload_failed(proxy, bad)
        assert "%s:%d: " % (proxy.config_path, bad_line) in err, err
        assert proxy.alive()
        c.expect("NOOP", 250)                        # the open session goes on
        assert hu.deliver(proxy.port).code == 250   # new sessions on the old config
        # a fixed file is taken by the next SIGHUP
        assert_reload_ok(proxy, hu.set_key(good, "listener main", "max_line", "512"))
        r = hu.tls_session(proxy.port)
        with r:
            assert r.cmd("NOOP " + "x" * 600).code == 500     # the new max_line
        c.expect("QUIT", 221)


def test_sighup_with_a_missing_certificate_keeps_the_old_config(make_scripted, make_proxy,
                                                               tmp_path):
    up = make_scripted()
    proxy = hu.start(make_proxy, up)
    missing = str(tmp_path / "gone.pem")
    bad = hu.set_key(proxy.config_text, "listener main", "cert", missing)
    err = assert_reload_failed(proxy, bad)
    assert re.search(re.escape(proxy.config_path) + r":\d+: ", err), err
    assert hu.deliver(proxy.port).code == 250


def test_sighup_with_an_unbindable_address_keeps_the_old_config(make_scripted, make_proxy,
                                                               tls_files):
    up = make_scripted()
    proxy = hu.start(make_proxy, up)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    with busy:
        port = busy.getsockname()[1]
        assert_reload_failed(proxy, proxy.config_text +
                             hu.listener_section("clash", port, tls_files))
    assert proxy.alive()
    assert hu.deliver(proxy.port).code == 250


# --- SIGTERM / SIGINT drain ---------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_sends_421_at_once_to_idle_sessions_and_exits_0(make_scripted, make_proxy,
                                                                    sig):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"drain_timeout": "20s"})
    tls = hu.tls_session(proxy.port)
    plain = h.SmtpConn(proxy.port)
    plain.greeting()
    plain.expect("EHLO client.test", 250)
    with tls, plain:
        t0 = time.monotonic()
        proxy.send_signal(sig)
        for c in (tls, plain):
            got = c.read_until_closed(timeout=3)
            assert got == hu.SHUTTING_DOWN, got
        assert time.monotonic() - t0 < 1.5
    hu.assert_clean_exit(proxy, hu.wait_exit(proxy, 3))


def test_sigterm_lets_a_message_in_progress_finish_then_421(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"drain_timeout": "20s"})
    busy = hu.tls_session(proxy.port)
    idle = hu.tls_session(proxy.port)
    with busy, idle:
        busy.begin_data()
        busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        proxy.send_signal(signal.SIGTERM)
        assert idle.read_until_closed(timeout=3) == hu.SHUTTING_DOWN
        assert_connection_refused(proxy.port)       # listeners closed at once
        time.sleep(0.5)
        assert proxy.alive(), "exited with a message in flight"
        busy.send(b"second half\r\n.\r\n")
        r = busy.read_reply()
        assert r.code == 250 and b"queued" in r.raw, r.raw
        r = next_reply_or_after_noop(busy)
        assert r.raw == hu.SHUTTING_DOWN, r.raw
        assert hu.is_closed(busy)
    hu.assert_clean_exit(proxy, hu.wait_exit(proxy, 3))
    assert up.wait_messages(1)[0]["content"] == \
        b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n"


def test_sigterm_lets_a_reply_due_from_the_upstream_arrive_then_421(make_scripted,
                                                                    make_proxy):
    up = make_scripted(delays={"NOOP": 1.0})
    proxy = hu.start(make_proxy, up, proxy={"drain_timeout": "20s"})
    c = hu.tls_session(proxy.port)
    with c:
        c.send(b"NOOP\r\n")
        time.sleep(0.3)
        proxy.send_signal(signal.SIGTERM)
        r = c.read_reply()
        assert r.raw == b"250 2.0.0 Ok noop\r\n", r.raw
        r = next_reply_or_after_noop(c)
        assert r.raw == hu.SHUTTING_DOWN, r.raw
        assert hu.is_closed(c)
    hu.assert_clean_exit(proxy, hu.wait_exit(proxy, 3))


def test_sigterm_lets_an_open_transaction_deliver_then_421(make_scripted, make_proxy):
    """README: a session with a MAIL accepted is in a transaction: it may go
    on to deliver, then gets the 421."""
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"drain_timeout": "20s"})
    c = hu.tls_session(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        proxy.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        c.expect("RCPT TO:<a@example.net>", 250)
        c.expect("DATA", 354)
        c.send(b"Subject: begun before SIGTERM\r\n\r\nbody\r\n.\r\n")
        assert c.read_reply().code == 250
        r = next_reply_or_after_noop(c)
        assert r.raw == hu.SHUTTING_DOWN, r.raw
    hu.assert_clean_exit(proxy, hu.wait_exit(proxy, 3))
    assert len(up.wait_messages(1)) == 1


def test_drain_timeout_closes_what_is_left_with_421_and_exits_0(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"drain_timeout": "1s"}, timeout_data="60s")
    c = hu.tls_session(proxy.port)
    with c:
        c.begin_data()
        c.send(b"Subject: never finished\r\n\r\nstalls here\r\n")
        t0 = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        got = c.read_until_closed(timeout=5)
        waited = time.monotonic() - t0
        assert got == hu.SHUTTING_DOWN, got
        assert 0.8 <= waited <= 2.5, "421 %.1fs after SIGTERM with drain_timeout = 1s" % waited
    hu.assert_clean_exit(proxy, hu.wait_exit(proxy, 3))
    up.wait_closed()
    assert up.messages == [], "the unfinished message was completed upstream"


def test_second_sigterm_ends_everything_at_once(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"drain_timeout": "30s"}, timeout_data="60s")
    c = hu.tls_session(proxy.port)
    with c:
        c.begin_data()
        c.send(b"Subject: cut short\r\n\r\nbody\r\n")
        proxy.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proxy.alive()
        t0 = time.monotonic()
        proxy.send_signal(signal.SIGTERM)
        got = c.read_until_closed(timeout=3)
        assert got == hu.SHUTTING_DOWN, got
        rc = hu.wait_exit(proxy, 3)
        assert rc is not None and time.monotonic() - t0 < 2.0, "still running after the 2nd SIGTERM"
        hu.assert_clean_exit(proxy, rc)
    up.wait_closed()
    assert up.messages == []
