"""Command policy: require_tls, line length limits."""

import subprocess
import time

import pytest

import stp_harness as h

MUST_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"

REFUSED_BEFORE_TLS = [
    ("MAIL", "MAIL FROM:<b@example.org>"),
    ("RCPT", "RCPT TO:<a@example.net>"),
    ("DATA", "DATA"),
    ("AUTH", "AUTH PLAIN AGJAZXhhbXBsZS5vcmcAc2VjcmV0"),
    ("VRFY", "VRFY postmaster"),
    ("EXPN", "EXPN staff"),
    ("ETRN", "ETRN example.org"),
]


@pytest.mark.parametrize("verb,line", REFUSED_BEFORE_TLS, ids=[v for v, _ in REFUSED_BEFORE_TLS])
def test_require_tls_refuses_command_before_starttls(proxy_scripted, verb, line):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        r = c.cmd(line)
        assert r.raw == (MUST_STARTTLS + "\r\n").encode(), r.raw
        # still usable: the refused command did not desynchronise the session
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not up.saw_verb(verb), "%s reached the upstream: %r" % (verb, up.all_commands())


def test_require_tls_refuses_whole_plaintext_transaction_and_forwards_none(proxy_scripted):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        for _, line in REFUSED_BEFORE_TLS:
            r = c.cmd(line)
            assert r.code == 530 and "5.7.0" in r.text, "%s: %r" % (line, r.raw)
        # message content sent anyway must not be taken as commands either
        c.send(b"Subject: x\r\nbody\r\n.\r\n")
        for _ in range(3):
            r = c.read_reply()
            assert r.code >= 500, r.raw
        c.expect("QUIT", 221)
    up.wait_closed()
    for verb, _ in REFUSED_BEFORE_TLS:
        assert not up.saw_verb(verb), up.all_commands()
    assert up.messages == []


def test_verbs_are_case_insensitive(proxy_scripted):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("ehlo client.test", 250)
        c.expect("mail from:<b@example.org>", 530)
        c.expect("Vrfy postmaster", 530)
        assert c.cmd("xclient ADDR=192.0.2.1").code in (550, 502, 530)
        c.expect("starttls", 220)
        c.starttls()
        c.expect("Ehlo client.test", 250)
        c.expect("StartTLS", 554)
        assert c.cmd("xForward ADDR=192.0.2.1").code in (550, 502)
        c.expect("quit", 221)
    up.wait_closed()
    assert not up.saw_verb("XCLIENT") and not up.saw_verb("XFORWARD")
    assert not up.saw_verb("STARTTLS") and not up.saw_verb("VRFY")
    assert not up.saw_line_containing(b"b@example.org")


def test_require_tls_allows_noop_ehlo_rset_quit(proxy_scripted):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("NOOP", 250)
        c.expect("EHLO client.test", 250)
        c.expect("RSET", 250)
        c.expect("EHLO client.test", 250)
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
        assert c.read_until_closed(timeout=5) == b""


def test_require_tls_refusal_is_logged(proxy_scripted):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("MAIL FROM:<b@example.org>", 530)
        sid = proxy.session_id_for(c.sock)
        c.expect("QUIT", 221)
    e = proxy.wait_event("reject", id=sid)
    assert e.get("cmd", "").upper() == "MAIL", e["_line"]
    assert e.get("reason"), e["_line"]


def test_require_tls_no_relays_a_plaintext_session(make_proxy, aio):
    swaks = h.require_program("swaks", "swaks")
    proxy = make_proxy(aio, require_tls="no")
    p = subprocess.run(
        [swaks, "--server", "127.0.0.1:%d" % proxy.port, "--to", "a@example.net",
         "--from", "b@example.org", "--header", "Subject: plaintext", "--timeout", "15"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode == 0, out
    env = aio.wait_messages(1)[0]
    assert env["mail_from"] == "b@example.org"
    assert env["rcpt_tos"] == ["a@example.net"]
    assert b"Subject: plaintext\r\n" in env["original_content"]


def test_require_tls_no_still_hides_auth_before_tls(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, require_tls="no")
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        r = c.expect("EHLO client.test", 250)
        kw = r.keywords()
        assert "STARTTLS" in kw and "AUTH" not in kw, r.raw
        c.expect("QUIT", 221)


# --- line length ----------------------------------------------------------------

def test_command_longer_than_max_line_gets_500_and_session_continues(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, max_line="512")
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        r = c.cmd("NOOP " + "x" * 600)
        assert r.code == 500 and "5.5.2" in r.text, r.raw
        c.expect("NOOP", 250)
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not up.saw_line_containing(b"x" * 100), "the long line reached the upstream"


def test_command_of_exactly_max_line_octets_is_accepted(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, max_line="512")
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        line = "NOOP " + "y" * (512 - len("NOOP ") - 2)      # 512 octets with CRLF
        r = c.cmd(line)
        assert r.code == 250, r.raw
        r = c.cmd("NOOP " + "z" * 600)
        assert r.code == 500, r.raw
        c.expect("QUIT", 221)


def test_long_line_in_plaintext_before_tls_gets_500(proxy_scripted):
    proxy, up = proxy_scripted
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        r = c.cmd("EHLO " + "a" * 5000)
        assert r.code == 500 and "5.5.2" in r.text, r.raw
        c.expect("EHLO client.test", 250)
        c.expect("QUIT", 221)


def test_one_mebibyte_line_without_crlf_keeps_memory_bounded(proxy_scripted):
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True, timeout=15)
    with c:
        before = h.rss_kib(proxy.pid)
        chunk = b"A" * 65536
        for _ in range(16):                       # 1 MiB, no line end
            c.send(chunk)
        time.sleep(0.3)
        assert proxy.alive(), "daemon died on a 1 MiB line:\n" + proxy.log_tail()
        grown = h.rss_kib(proxy.pid) - before
        assert grown < 20 * 1024, "VmRSS grew by %d KiB on a 1 MiB line" % grown
        c.send(b"\r\nNOOP\r\n")
        r = c.read_reply()
        assert r.code == 500 and "5.5.2" in r.text, r.raw
        r = c.read_reply()
        assert r.code == 250, "expected exactly one 500 for the long line, then 250: %r" % r.raw
        c.expect("QUIT", 221)
    up.wait_closed()
    assert not up.saw_line_containing(b"A" * 100)


def test_many_long_lines_keep_memory_bounded(proxy_scripted):
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True, timeout=15)
    with c:
        before = h.rss_kib(proxy.pid)
        for _ in range(8):                        # 8 MiB in total
            c.send(b"B" * (1024 * 1024) + b"\r\n")
        c.send(b"NOOP\r\n")
        codes = []
        while True:
            r = c.read_reply()
            codes.append(r.code)
            if r.code != 500:
                break
        assert codes == [500] * 8 + [250], codes
        grown = h.rss_kib(proxy.pid) - before
        assert grown < 20 * 1024, "VmRSS grew by %d KiB" % grown
        c.expect("QUIT", 221)


# --- AUTH after TLS --------------------------------------------------------------

def test_auth_plain_after_tls_is_relayed(proxy_scripted):
    import smtplib
    proxy, up = proxy_scripted
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as s:
        s.starttls(context=h.client_tls_context())
        s.ehlo("client.test")
        assert s.has_extn("auth")
        code, _ = s.login("user@example.org", "secret")
        assert code == 235
    auths = up.saw_verb("AUTH")
    assert len(auths) == 1 and auths[0].startswith(b"AUTH PLAIN "), up.all_commands()


def test_auth_login_exchange_after_tls_is_relayed(proxy_scripted):
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        r = c.expect("AUTH LOGIN", 334)
        assert r.raw == b"334 VXNlcm5hbWU6\r\n"
        r = c.expect("dXNlcg==", 334)
        assert r.raw == b"334 UGFzc3dvcmQ6\r\n"
        # a SASL response is not a command, whatever it looks like
        c.expect("STARTTLS", 235)
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("QUIT", 221)
    cmds = up.all_commands()
    i = cmds.index(b"AUTH LOGIN")
    assert cmds[i + 1:i + 3] == [b"dXNlcg==", b"STARTTLS"], cmds


@pytest.mark.parametrize("line", ["AUTH PLAIN AHVzZXIAc2VjcmV0", "AUTH LOGIN", "auth\tplain"])
def test_auth_before_tls_on_an_opportunistic_listener_gets_538(make_scripted, make_proxy, line):
    """RFC 4954 4 (Postfix smtpd_tls_auth_only): where TLS is offered, no
    password crosses in clear, even with require_tls = no; the upstream,
    which offers AUTH, never sees it. After STARTTLS the same AUTH goes
    through."""
    up = make_scripted()
    proxy = make_proxy(up, require_tls="no")
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        r = c.cmd(line)
        assert r.code == 538 and "5.7.11" in r.text, r.raw
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("EHLO client.test", 250)
        c.expect("AUTH PLAIN AHVzZXIAc2VjcmV0", 235)
        c.expect("QUIT", 221)
    auths = up.saw_verb("AUTH")
    assert auths == [b"AUTH PLAIN AHVzZXIAc2VjcmV0"], up.all_commands()


def test_auth_on_a_plaintext_listener_is_relayed(make_scripted, make_proxy):
    """tls = none (devices on a private network): AUTH is the upstream's."""
    up = make_scripted()
    proxy = make_proxy(up, tls="none", require_tls=None)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("AUTH PLAIN AHVzZXIAc2VjcmV0", 235)
        c.expect("QUIT", 221)
    assert up.saw_verb("AUTH") == [b"AUTH PLAIN AHVzZXIAc2VjcmV0"], up.all_commands()