"""TLS session resumption: a returning client presents the ticket it got and
skips the full handshake, on STARTTLS and implicit-TLS listeners, with TLS 1.3
and 1.2, whichever worker takes the connection. A ticket the proxy can no
longer read (issued before a reload) costs a full handshake, never a failed
session."""

import os
import ssl

import pytest

import stp_harness as h
import hardening_util as hu


def finish(c):
    """NOOP inside TLS (by then the server's ticket has arrived), QUIT.
    Returns (reused, version, the session to offer next time)."""
    c.expect("NOOP", 250)
    out = (c.sock.session_reused, c.sock.version(), c.sock.session)
    c.expect("QUIT", 221)
    return out


def starttls_session(port, ctx, session=None):
    """Greeting, EHLO, STARTTLS offering SESSION, EHLO, NOOP, QUIT."""
    with h.SmtpConn(port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.starttls(ctx, session=session)
        c.expect("EHLO client.test", 250)
        return finish(c)


def implicit_session(port, ctx, session=None):
    c, _ = h.open_implicit(port, ctx, session=session)
    with c:
        return finish(c)


def client_ctx(max_version=None):
    ctx = h.client_tls_context()
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


@pytest.mark.parametrize("max_version,want", [(None, "TLSv1.3"),
                                              (ssl.TLSVersion.TLSv1_2, "TLSv1.2")])
def test_starttls_session_resumes_with_its_ticket(make_proxy, scripted, max_version, want):
    proxy = make_proxy(scripted)
    ctx = client_ctx(max_version)
    reused, version, sess = starttls_session(proxy.port, ctx)
    assert version == want and not reused
    assert sess is not None and sess.has_ticket, "no session ticket from the proxy"
    for _ in range(3):
        reused, version, sess = starttls_session(proxy.port, ctx, sess)
        assert version == want
        assert reused, "the proxy ignored a ticket it issued: full handshake again"
    # every one of them still went through the normal STARTTLS path
    assert len(proxy.events("starttls")) == 4, proxy.log_tail()


def test_implicit_tls_session_resumes(make_proxy, scripted):
    proxy = make_proxy(scripted, tls="implicit")
    ctx = client_ctx()
    reused, _, sess = implicit_session(proxy.port, ctx)
    assert not reused and sess.has_ticket
    reused, version, _ = implicit_session(proxy.port, ctx, sess)
    assert reused and version == "TLSv1.3"


def test_resumption_whichever_worker_takes_the_connection(make_proxy, scripted):
    """workers = 2 spreads connections over two event loops (SO_REUSEPORT):
    the ticket key is the listener's, not a worker's."""
    proxy = make_proxy(scripted, proxy_opts={"workers": "2"})
    ctx = client_ctx()
    _, _, sess = starttls_session(proxy.port, ctx)
    results = [starttls_session(proxy.port, ctx, sess)[0] for _ in range(16)]
    assert all(results), "resumed %d of 16" % sum(results)


def test_ticket_from_before_a_reload_costs_a_full_handshake_only(make_proxy, scripted):
    proxy = make_proxy(scripted)
    ctx = client_ctx()
    _, _, sess = starttls_session(proxy.port, ctx)
    assert starttls_session(proxy.port, ctx, sess)[0]
    evs = hu.reload(proxy)
    assert hu.reload_status(evs) == "ok", proxy.log_tail()
    # The new configuration generation has its own ticket key: the old ticket
    # cannot be read, and the session goes on as a new one (whichever way it
    # goes, the client gets its session and a ticket that works).
    _, version, sess2 = starttls_session(proxy.port, ctx, sess)
    assert version == "TLSv1.3"
    assert starttls_session(proxy.port, ctx, sess2)[0]
    assert not proxy.events("tls_error"), proxy.log_tail()


def test_openssl_s_client_reuses_its_saved_session(make_proxy, scripted, tmp_path):
    """OpenSSL's own client, with the session saved to a file in between, as a
    command-line user would check it."""
    proxy = make_proxy(scripted)
    sess = str(tmp_path / "session.pem")
    # -ign_eof: s_client waits for the 221 (and by then has the ticket)
    # instead of closing when its input ends.
    talk = b"EHLO client.test\nQUIT\n"
    rc, out1 = h.s_client(proxy.port, "-servername", "proxy.test", "-ign_eof",
                          "-sess_out", sess, stdin=talk, starttls=True)
    assert rc == 0 and "New, TLSv1.3" in out1, out1
    assert os.path.getsize(sess) > 0, out1
    rc, out2 = h.s_client(proxy.port, "-servername", "proxy.test", "-ign_eof",
                          "-sess_in", sess, stdin=talk, starttls=True)
    assert rc == 0 and "Reused, TLSv1.3" in out2, out2
    assert "\n221 " in out2, out2
