"""STARTTLS edge cases and the attacks from SMTP-REFERENCE.md: command
injection after STARTTLS, misuse of STARTTLS, client XCLIENT/XFORWARD,
failed handshakes, bare-LF smuggling around the end-of-data dot."""

import smtplib
import time

import pytest

import stp_harness as h


# --- command injection (CVE-2011-0411 family) -------------------------------

@pytest.mark.parametrize("injected", [b"NOOP", b"MAIL FROM:<x@y>"], ids=["noop", "mail"])
def test_commands_pipelined_after_starttls_are_not_executed(proxy_scripted, injected):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.send(b"STARTTLS\r\n" + injected + b"\r\n")      # one write
        r = c.read_reply()
        assert r.code == 220, r.raw
        extra = c.pending(0.5)
        assert extra == b"", "plaintext after the 220 to STARTTLS: %r" % extra
        c.starttls()
        c.send(b"EHLO client.test\r\n")
        r = c.read_reply()
        assert r.code == 250 and len(r.lines) > 1 and r.lines[0] == "upstream.test greets you", \
            "first reply inside TLS is not the EHLO reply: %r" % r.raw
        if injected.startswith(b"MAIL"):
            # no MAIL transaction leaked into TLS: a new MAIL is not "nested"
            c.expect("MAIL FROM:<b@example.org>", 250)
            c.expect("RSET", 250)
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not up.saw_line_containing(injected), \
        "upstream received the injected %r: %r" % (injected, up.all_commands())
    assert not up.saw_verb("STARTTLS")


def test_starttls_queued_behind_a_pending_reply_still_drops_injected_commands(proxy_scripted):
    """EHLO, STARTTLS and an injected command in one write: STARTTLS is
    answered only after the EHLO reply, and the rest is still discarded."""
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.send(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<x@y>\r\n")
        assert c.read_reply().code == 250
        assert c.read_reply().code == 220
        extra = c.pending(0.5)
        assert extra == b"", "plaintext after the 220 to STARTTLS: %r" % extra
        c.starttls()
        r = c.cmd("EHLO client.test")
        assert r.code == 250 and len(r.lines) > 1, r.raw
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not up.saw_line_containing(b"x@y"), up.all_commands()


def test_plaintext_transaction_does_not_survive_starttls(make_proxy, aio):
    """Session fixation: MAIL given in plaintext is forgotten after TLS, so a
    RCPT inside TLS without a new MAIL fails at the upstream."""
    proxy = make_proxy(aio, require_tls="no")
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("MAIL FROM:<fixed@example.org>", 250)
        c.expect("STARTTLS", 220)
        c.starttls()
        r = c.cmd("RCPT TO:<a@example.net>")
        assert r.code == 503, "plaintext MAIL survived into TLS: %r" % r.raw
        c.expect("EHLO client.test", 250)
        r = c.cmd("RCPT TO:<a@example.net>")
        assert r.code == 503, "plaintext MAIL survived into TLS: %r" % r.raw
        c.expect("QUIT", 221)
    assert aio.envelopes == []


def test_commands_before_the_new_ehlo_after_starttls_get_503(proxy_scripted):
    """RFC 3207 4.2: the client must EHLO again after TLS. The upstream still
    holds the plaintext EHLO, so the proxy holds everything else back until
    then (NOOP, RSET, HELP and QUIT excepted)."""
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO plaintext.name", 250)
        c.expect("STARTTLS", 220)
        c.starttls()
        for line in ("MAIL FROM:<b@example.org>", "RCPT TO:<a@example.net>", "DATA",
                     "VRFY root"):
            r = c.cmd(line)
            assert r.code == 503 and "HELO/EHLO" in r.text, (line, r.raw)
        c.expect("NOOP", 250)
        c.expect("EHLO tls.name", 250)
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("QUIT", 221)
    up.wait_closed()
    cmds = up.all_commands()
    assert not up.saw_verb("RCPT") and not up.saw_verb("DATA") and not up.saw_verb("VRFY"), cmds
    assert len(up.saw_verb("MAIL")) == 1, cmds
    assert len(proxy.events("reject")) == 4, proxy.log_tail()


def test_bare_cr_in_a_command_is_not_forwarded(proxy_scripted):
    """CRLF injection: a bare CR inside a command line must not reach the
    upstream, where some servers would take it as a line end."""
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        r = c.cmd(b"NOOP\rMAIL FROM:<evil@x>")
        assert r.code != 250 or "noop" in r.text, r.raw
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not any(b"\r" in l for l in up.all_commands()), up.all_commands()


def test_starttls_split_across_writes_still_works(proxy_scripted):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        for piece in (b"STA", b"RTT", b"LS\r", b"\n"):
            c.send(piece)
            time.sleep(0.05)
        assert c.read_reply().code == 220
        c.starttls()
        c.expect("EHLO client.test", 250)
        c.expect("QUIT", 221)


# --- STARTTLS misuse ----------------------------------------------------------

def test_starttls_with_an_argument_gets_501(proxy_scripted):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        r = c.expect("STARTTLS now", 501)
        assert "5.5.4" in r.text, r.raw
        # the session continues in plaintext, and a proper STARTTLS works
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("EHLO client.test", 250)
        c.expect("QUIT", 221)
    assert not up.saw_verb("STARTTLS")


def test_starttls_inside_tls_gets_554(proxy_scripted):
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        r = c.expect("STARTTLS", 554)
        assert "5.5.1" in r.text, r.raw
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
    assert not up.saw_verb("STARTTLS")


def test_starttls_on_tls_none_listener_gets_502(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, tls="none", require_tls="no", cert=None, key=None)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        r = c.expect("EHLO client.test", 250)
        assert "STARTTLS" not in r.keywords()
        c.expect("STARTTLS", 502)
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
    assert not up.saw_verb("STARTTLS")


# --- identity spoofing ------------------------------------------------------

XCMDS = ["XCLIENT ADDR=192.0.2.1 NAME=spoofed.example", "XFORWARD ADDR=192.0.2.1"]


@pytest.mark.parametrize("require_tls", ["yes", "no"])
@pytest.mark.parametrize("line", XCMDS, ids=["xclient", "xforward"])
def test_client_xclient_xforward_rejected_before_tls(make_scripted, make_proxy, line,
                                                     require_tls):
    up = make_scripted()
    proxy = make_proxy(up, require_tls=require_tls)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        r = c.cmd(line)
        ok = (550, 502, 530) if require_tls == "yes" else (550, 502)
        assert r.code in ok, "expected 550 (or 502), got %r" % r.raw
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not up.saw_verb("XCLIENT") and not up.saw_verb("XFORWARD"), up.all_commands()


@pytest.mark.parametrize("line", XCMDS, ids=["xclient", "xforward"])
def test_client_xclient_xforward_rejected_after_tls(proxy_scripted, line):
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        r = c.cmd(line)
        assert r.code in (550, 502), "expected 550 (or 502), got %r" % r.raw
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not up.saw_verb("XCLIENT") and not up.saw_verb("XFORWARD"), up.all_commands()


# --- failed TLS handshake ---------------------------------------------------

def test_tls_handshake_garbage_closes_only_that_connection(proxy_scripted):
    proxy, up = proxy_scripted
    bystander = h.SmtpConn(proxy.port)
    bystander.greeting()
    bystander.expect("EHLO bystander.test", 250)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.send(b"this is not a TLS ClientHello\r\n" * 16)
        got = c.read_until_closed(timeout=5)
        assert not got or got.startswith(b"\x15") or got.startswith(b"<"), \
            "expected a TLS alert or nothing before the close, got %r" % got
    with bystander:
        bystander.expect("NOOP", 250)
        bystander.expect("STARTTLS", 220)
        bystander.starttls()
        bystander.expect("EHLO bystander.test", 250)
        bystander.expect("QUIT", 221)
    # and a new session works end to end
    msg = b"Subject: after garbage\r\n\r\nstill serving\r\n"
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as s:
        s.starttls(context=h.client_tls_context())
        s.sendmail("b@example.org", ["a@example.net"], msg)
    m = up.wait_messages(1)[0]
    assert m["content"] == msg


def test_client_closing_mid_handshake_does_not_disturb_others(proxy_scripted):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        # the first bytes of a TLS record, then hang up
        c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)


# --- bare LF / bare CR around the end-of-data dot (SMTP smuggling) ----------

@pytest.mark.parametrize("ending", [b"\n.\n", b"\r\n.\n", b"\n.\r\n"],
                         ids=["lf-dot-lf", "crlf-dot-lf", "lf-dot-crlf"])
def test_bare_lf_around_dot_does_not_smuggle_a_command(proxy_scripted, ending):
    """The scripted upstream ends DATA at any "." line, bare LF or not: if the
    proxy passed the ambiguous ending through, the upstream would queue the
    message and execute the MAIL/RCPT/DATA that follow."""
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        c.begin_data()
        c.send(b"Subject: x\r\n\r\nhi" + ending
               + b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@x>\r\nDATA\r\n"
               + b"Subject: smuggled\r\n\r\nevil\r\n.\r\n")
        r = c.read_reply()
        assert 500 <= r.code < 600, "expected a 5xx for the ambiguous end of data, got %r" % r.raw
        rest = c.read_until_closed(timeout=5)
        assert b"250" not in rest, "more replies after the 5xx: %r" % rest
    up.wait_closed()
    assert not up.saw_line_containing(b"evil@x"), \
        "smuggled command reached the upstream: %r" % up.all_commands()
    assert not up.saw_line_containing(b"victim@x"), up.all_commands()
    assert up.messages == [], "upstream accepted a message: %r" % up.messages


def test_bare_lf_smuggling_split_across_writes_is_caught(proxy_scripted):
    """The ambiguous ending arrives one byte per write: the proxy has already
    passed "hi<LF>." upstream when the LF that completes it arrives."""
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        c.begin_data()
        c.send(b"Subject: x\r\n\r\nhi")
        for b in (b"\n", b".", b"\n"):
            time.sleep(0.1)
            c.send(b)
        r = c.read_reply()
        assert 500 <= r.code < 600, r.raw
        try:
            c.send(b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@x>\r\nDATA\r\nevil\r\n.\r\n")
        except OSError:
            pass                     # already closed by the proxy: fine
        c.read_until_closed(timeout=5)
    up.wait_closed()
    assert not up.saw_line_containing(b"evil@x"), up.all_commands()
    assert up.messages == [], up.messages


def test_bare_lf_smuggling_leaves_the_daemon_serving(proxy_scripted):
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        c.begin_data()
        c.send(b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@x>\r\n")
        r = c.read_reply()
        assert 500 <= r.code < 600, r.raw
        c.read_until_closed(timeout=5)
    msg = b"Subject: next\r\n\r\nnext session\r\n"
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as s:
        s.starttls(context=h.client_tls_context())
        s.sendmail("b@example.org", ["a@example.net"], msg)
    m = up.wait_messages(1)
    assert [x["content"] for x in m] == [msg]
