"""Implicit TLS listeners (tls = implicit, RFC 8314): TLS from the first
byte, then the session as after STARTTLS."""

import select
import socket
import ssl
import uuid

import pytest

import stp_harness as h


@pytest.fixture
def implicit_proxy(make_proxy, pki):
    """make_proxy for an implicit-TLS listener with the CA-signed proxy.test
    certificate."""
    def make(upstream, **kw):
        opts = {"tls": "implicit", "cert": pki.proxy.cert, "key": pki.proxy.key}
        opts.update(kw)
        return make_proxy(upstream, **opts)
    return make


run = h.run_tool


def test_swaks_tls_on_connect_delivers(implicit_proxy, aio):
    proxy = implicit_proxy(aio)
    swaks = h.require_program("swaks", "swaks")
    tag = uuid.uuid4().hex
    p = run([swaks, "--tls-on-connect", "--server", "127.0.0.1:%d" % proxy.port,
             "--ehlo", "swaks.client.test", "--to", "a@example.net", "--from", "b@example.org",
             "--header", "X-Test-Tag: " + tag, "--body", "implicit body " + tag,
             "--timeout", "15"])
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode == 0, out
    assert "TLS started" in out, out
    assert "STARTTLS" not in out.split("TLS started", 1)[1], out
    env = aio.wait_messages(1)[0]
    assert env["mail_from"] == "b@example.org"
    assert env["rcpt_tos"] == ["a@example.net"]
    assert ("X-Test-Tag: %s\r\n" % tag).encode() in env["original_content"]
    assert ("implicit body %s" % tag).encode() in env["original_content"]


def test_curl_smtps_delivers_byte_exact(implicit_proxy, aio, tmp_path):
    proxy = implicit_proxy(aio)
    msg = (b"From: b@example.org\r\nTo: a@example.net\r\nSubject: smtps\r\n\r\n"
           b"first line\r\n.a line that starts with a dot\r\n..two dots\r\nlast line\r\n")
    p = h.curl_upload("smtps://127.0.0.1:%d" % proxy.port, msg, tmp_path)
    assert p.returncode == 0, p.stdout.decode("utf-8", "replace")
    env = aio.wait_messages(1)[0]
    assert env["mail_from"] == "b@example.org"
    assert env["rcpt_tos"] == ["a@example.net"]
    assert env["original_content"] == msg


def test_certificate_verifies_against_the_test_ca(implicit_proxy, scripted, pki):
    proxy = implicit_proxy(scripted)
    ctx = h.verifying_client_context(pki.ca)          # chain and name checked
    c, _ = h.open_implicit(proxy.port, ctx, server_hostname="proxy.test")
    with c:
        assert c.sock.getpeercert(binary_form=True) == pki.proxy.der()
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        c.expect("QUIT", 221)


def test_greeting_arrives_only_inside_tls(implicit_proxy, scripted):
    proxy = implicit_proxy(scripted)
    with h.SmtpConn(proxy.port) as c:
        # the server must wait for our ClientHello: no plaintext greeting
        r, _, _ = select.select([c.sock], [], [], 0.7)
        assert not r, "the implicit listener sent plaintext before TLS: %r" % (
            c.sock.recv(4096, socket.MSG_PEEK),)
        c.starttls()
        g = c.greeting()
        assert g.raw.startswith(b"220"), g.raw
        assert "upstream.test" in g.text       # the upstream's greeting, relayed
        c.expect("QUIT", 221)


def test_ehlo_never_offers_starttls_and_keeps_auth(implicit_proxy, scripted):
    # the scripted upstream offers STARTTLS, AUTH, XCLIENT, XFORWARD itself
    proxy = implicit_proxy(scripted)
    c, r = h.open_implicit(proxy.port)
    with c:
        kw = r.keywords()
        assert "STARTTLS" not in kw, r.raw
        assert "XCLIENT" not in kw and "XFORWARD" not in kw, r.raw
        assert "AUTH" in kw, "inside TLS AUTH is offered as after STARTTLS: %r" % r.raw
        assert r.raw.splitlines()[-1].startswith(b"250 "), r.raw
        c.expect("QUIT", 221)


def test_starttls_on_implicit_listener_gets_554(implicit_proxy, scripted):
    proxy = implicit_proxy(scripted)
    c, _ = h.open_implicit(proxy.port)
    with c:
        r = c.cmd("STARTTLS")
        assert r.code == 554 and "5.5.1" in r.text, r.raw
        # the session goes on inside the same TLS
        c.expect("NOOP", 250)
        c.expect("QUIT", 221)
    assert not scripted.saw_verb("STARTTLS"), scripted.all_commands()


def test_mail_is_accepted_without_starttls_even_with_require_tls(implicit_proxy, scripted):
    proxy = implicit_proxy(scripted, require_tls="yes")
    c, _ = h.open_implicit(proxy.port)
    with c:
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("RCPT TO:<a@example.net>", 250)
        c.expect("QUIT", 221)
    assert scripted.saw_verb("MAIL")


@pytest.mark.parametrize("first", [b"EHLO x\r\n", b"QUIT\r\n", b"HELO x\r\nMAIL FROM:<a@b>\r\n"],
                         ids=["ehlo", "quit", "pipelined"])
def test_plaintext_client_never_gets_a_plaintext_reply(implicit_proxy, scripted, first):
    proxy = implicit_proxy(scripted)
    with h.SmtpConn(proxy.port, timeout=10) as c:
        c.send(first)
        got = c.read_until_closed(timeout=8)
        # a TLS alert record (0x15) is fine; an SMTP reply is not
        assert not got[:1].isdigit(), "plaintext reply to a plaintext client: %r" % got
        assert b"220" not in got and b"250" not in got and b"554" not in got, got
    assert not scripted.saw_verb("EHLO") and not scripted.saw_verb("QUIT"), \
        scripted.all_commands()
    # only that connection failed
    c, _ = h.open_implicit(proxy.port)
    with c:
        c.expect("QUIT", 221)


def test_tls_event_is_logged_before_the_mail_commands(implicit_proxy, aio):
    proxy = implicit_proxy(aio)
    c, _ = h.open_implicit(proxy.port, ehlo="log.client.test")
    with c:
        sid = proxy.session_id_for(c.sock)
        h.send_message(c, h.sample_message("log"))
        c.expect("QUIT", 221)
    proxy.wait_event("disconnect", id=sid)
    mine = [e for e in proxy.events() if e.get("id") == sid]
    names = [e["event"] for e in mine]
    tls = [e for e in mine if e["event"] in ("tls", "starttls")]
    assert tls, "no tls/starttls event for the implicit session: %r" % names
    assert tls[0]["tls"] in ("TLSv1.2", "TLSv1.3"), tls[0]["_line"]
    assert tls[0].get("cipher"), tls[0]["_line"]
    i_tls = names.index(tls[0]["event"])
    i_connect = names.index("connect")
    i_disc = names.index("disconnect")
    assert i_connect < i_tls < i_disc, names
    # debug logs each SMTP state change: the first one after the greeting
    # (MAIL, RCPT, DATA) must come after the TLS event
    smtp_changes = [i for i, e in enumerate(mine) if e["event"] == "smtp"]
    assert all(i > i_tls for i in smtp_changes), [e["_line"] for e in mine]
    assert aio.wait_messages(1)[0]["ehlo"] == "log.client.test"


def test_tls_event_reports_the_negotiated_version(implicit_proxy, scripted):
    proxy = implicit_proxy(scripted)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = h.client_tls_context()
        ctx.minimum_version = ctx.maximum_version = version
        c, _ = h.open_implicit(proxy.port, ctx)
        with c:
            sid = proxy.session_id_for(c.sock)
            want = c.sock.version()
            c.expect("QUIT", 221)
        ev = [e for e in proxy.events() if e.get("id") == sid and e["event"] in ("tls", "starttls")]
        assert ev and ev[0]["tls"] == want, (want, [e["_line"] for e in ev])
