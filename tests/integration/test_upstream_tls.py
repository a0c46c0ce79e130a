"""TLS on the upstream leg: implicit (Python's ssl in aiosmtpd) and STARTTLS
spoken by the proxy itself (aiosmtpd with require_starttls); the failures
against a hostile upstream on raw sockets that records every byte it gets;
and every listener mode with every upstream mode."""

import ssl

import pytest

import stp_harness as h

# What an impatient client sends before the greeting. None of it may ever
# reach an upstream whose TLS failed.
SECRET_EHLO = "secret-client-ehlo.test"
SECRET_FROM = "secret-sender@client.test"
EARLY = ("EHLO %s\r\nMAIL FROM:<%s>\r\n" % (SECRET_EHLO, SECRET_FROM)).encode()


def upstream_tls_opts(pki, tls, **kw):
    opts = {"tls": tls, "verify": "yes", "ca_file": pki.ca.cert, "server_name": "upstream.test"}
    opts.update(kw)
    return opts


def session_events(proxy, sid, name=None):
    return [e for e in proxy.events(name) if e.get("id") == sid]


def listener_session(proxy, mode, ehlo="client.test"):
    """Open a client session on a listener of MODE, ready for MAIL."""
    if mode == "implicit":
        c, _ = h.open_implicit(proxy.port, ehlo=ehlo)
    else:
        c, _ = h.open_session(proxy.port, ehlo=ehlo, tls=(mode == "starttls"))
    return c


# --- implicit TLS upstream ------------------------------------------------------------


def test_implicit_upstream_verified_delivers_byte_exact(make_proxy, make_aio, pki):
    up = make_aio(ssl_context=h.server_tls_context(pki.upstream))
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "implicit"))
    msg = h.sample_message("implicit-upstream")
    c, _ = h.open_session(proxy.port, ehlo="impl.client.test")
    with c:
        sid = proxy.session_id_for(c.sock)
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    assert env["mail_from"] == "b@example.org" and env["rcpt_tos"] == ["a@example.net"]
    assert env["tls"] and env["tls"]["version"] in ("TLSv1.2", "TLSv1.3"), env["tls"]
    assert env["ehlo"] == "impl.client.test"
    assert [n for n in up.sni if n] == ["upstream.test"], up.sni   # None: aiosmtpd's start-up probe
    ev = proxy.wait_event("upstream_tls", id=sid)
    assert ev.get("tls") == env["tls"]["version"], ev["_line"]
    assert ev.get("cipher"), ev["_line"]
    assert ev.get("verified") in ("yes", "1", "true"), ev["_line"]


def test_implicit_upstream_tls_event_comes_before_the_client_greeting(make_proxy, make_aio, pki):
    up = make_aio(ssl_context=h.server_tls_context(pki.upstream))
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "implicit"))
    with h.SmtpConn(proxy.port) as c:
        sid = proxy.session_id_for(c.sock)
        g = c.greeting()
        assert "aio.upstream.test" in g.text, g.raw
        # the greeting was relayed, so the upstream leg is already TLS
        names = [e["event"] for e in session_events(proxy, sid)]
        assert "upstream_tls" in names, names
        c.expect("QUIT", 221)


# --- STARTTLS upstream -------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["none", "starttls"])
def test_starttls_upstream_client_sees_one_greeting_and_one_ehlo(make_proxy, make_aio, pki,
                                                                 listener):
    up = make_aio(tls_context=h.server_tls_context(pki.upstream), require_starttls=True)
    lopts = {"tls": listener}
    if listener == "none":
        lopts["require_tls"] = None
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "starttls"), **lopts)
    msg = h.sample_message("starttls-upstream")
    with h.SmtpConn(proxy.port) as c:
        g = c.greeting()
        assert c.pending(0.5) == b"", "more than one greeting: %r then %r" % (
            g.raw, c.pending(0))
        r = c.expect("EHLO client.test", 250)
        assert c.pending(0.5) == b"", "more than one EHLO reply: %r then %r" % (
            r.raw, c.pending(0))
        assert b"Ready to start TLS" not in g.raw + r.raw
        assert "aio.upstream.test" in r.lines[0], r.raw     # the upstream's own EHLO reply
        if listener == "none":
            assert "STARTTLS" not in r.keywords(), r.raw
        else:
            assert "STARTTLS" in r.keywords(), r.raw        # the proxy's, for the client leg
            c.expect("STARTTLS", 220)
            c.starttls()
            r = c.expect("EHLO client.test", 250)
            assert "STARTTLS" not in r.keywords(), r.raw
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    assert env["starttls_done"] and env["tls"], env
    # what aiosmtpd read: the proxy's own EHLO and STARTTLS in plaintext, then
    # everything of the client's inside TLS
    sess = up.sessions()
    assert len(sess) == 1, [s.lines for s in sess]
    plain = sess[0].plaintext_lines()
    assert plain == [b"EHLO proxy.test", b"STARTTLS"], plain
    inside = sess[0].tls_lines()
    assert b"EHLO client.test" in inside, inside
    assert any(l.startswith(b"MAIL FROM:<b@example.org>") for l in inside), inside
    assert [n for n in up.sni if n] == ["upstream.test"], up.sni   # None: aiosmtpd's start-up probe


def test_starttls_upstream_with_starttls_listener_logs_both_legs(make_proxy, make_aio, pki):
    up = make_aio(tls_context=h.server_tls_context(pki.upstream), require_starttls=True)
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "starttls"))
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        sid = proxy.session_id_for(c.sock)
        c.expect("QUIT", 221)
    up_ev = proxy.wait_event("upstream_tls", id=sid)
    cl_ev = proxy.wait_event("starttls", id=sid)
    assert up_ev["tls"] in ("TLSv1.2", "TLSv1.3") and up_ev.get("cipher"), up_ev["_line"]
    assert cl_ev["tls"] in ("TLSv1.2", "TLSv1.3") and cl_ev.get("cipher"), cl_ev["_line"]
    assert up_ev.get("server_name") in (None, "upstream.test"), up_ev["_line"]


def test_upstream_certificate_for_the_proxy_is_presented(make_proxy, make_raw, pki):
    ctx = h.server_tls_context(pki.upstream, client_ca=pki.client_ca, require_client_cert=True)
    up = make_raw(tls="implicit", ssl_context=ctx)
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(
        pki, "implicit", cert=pki.proxy_client.cert, key=pki.proxy_client.key))
    c, _ = h.open_session(proxy.port)
    with c:
        h.send_message(c, b"Subject: client cert\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    conn = up.wait_conns(1)[0]
    assert conn.handshake == "ok", conn.handshake
    assert conn.peer_cert == pki.proxy_client.der()
    assert up.wait_messages(1) == [b"Subject: client cert\r\n\r\nbody\r\n"]


def test_upstream_that_requires_a_client_certificate_without_one_gets_421(make_proxy, make_raw,
                                                                          pki):
    # with TLS 1.3 the server's refusal (an alert) arrives after the proxy's
    # side of the handshake is done, but before the upstream's greeting
    ctx = h.server_tls_context(pki.upstream, client_ca=pki.client_ca, require_client_cert=True)
    up = make_raw(tls="implicit", ssl_context=ctx)
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "implicit"))
    conn = expect_next_hop_refused(proxy, up, ["tls", "alert", "certificate", "handshake"])
    assert conn.handshake != "ok", conn.handshake


# --- failures: 421 4.7.0, a reason in the log, and no client byte upstream ---------------


def expect_next_hop_refused(proxy, up, reason_words):
    """An impatient client pipelines EHLO and MAIL at once; the first thing it
    reads must be 421 4.7.0, then the close. Returns the upstream's RawConn."""
    with h.SmtpConn(proxy.port, timeout=15) as c:
        sid = proxy.session_id_for(c.sock)
        c.send(EARLY)
        r = c.read_reply()
        assert r.code == 421 and "4.7.0" in r.text, \
            "expected 421 4.7.0 as the first reply, got %r\nlog:\n%s" % (r.raw, proxy.log_tail(15))
        rest = c.read_until_closed(timeout=5)
        assert b"250" not in rest and b"220" not in rest, rest
    ev = proxy.wait_event("upstream_error", id=sid)
    why = (ev.get("error") or ev.get("reason") or "")
    assert why, "upstream_error without a reason: %s" % ev["_line"]
    assert any(w.lower() in why.lower() for w in reason_words), \
        "reason %r does not mention any of %r: %s" % (why, reason_words, ev["_line"])
    conn = up.wait_conns(1)[0]
    assert conn.closed.wait(5), "the proxy kept the upstream connection open"
    # nothing the client sent reached the upstream, in any form
    assert SECRET_EHLO.encode() not in conn.raw, bytes(conn.raw)
    assert SECRET_FROM.encode() not in conn.raw, bytes(conn.raw)
    assert conn.tls_lines() == [], conn.tls_lines()
    assert conn.messages == []
    # and the daemon carries on
    assert proxy.alive()
    return conn


def after_starttls_line(conn):
    """Raw bytes received after the proxy's STARTTLS line."""
    raw = bytes(conn.raw)
    i = raw.find(b"STARTTLS\r\n")
    assert i >= 0, "the proxy never sent STARTTLS: %r" % raw
    return raw[i + len(b"STARTTLS\r\n"):]


def test_upstream_without_starttls_gets_421_and_no_fallback(make_proxy, make_raw, pki):
    up = make_raw(tls="starttls", pair=pki.upstream, offer_starttls=False)
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "starttls"))
    conn = expect_next_hop_refused(proxy, up, ["starttls"])
    lines = conn.plaintext_lines()
    assert lines[:1] == [b"EHLO proxy.test"], lines
    assert set(lines[1:]) <= {b"QUIT"}, "after an EHLO without STARTTLS: %r" % lines
    assert conn.tls_at is None


def test_upstream_answering_454_to_starttls_gets_421(make_proxy, make_raw, pki):
    up = make_raw(tls="starttls", pair=pki.upstream,
                  replies={"STARTTLS": b"454 4.7.0 TLS not available due to local problem\r\n"})
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "starttls"))
    conn = expect_next_hop_refused(proxy, up, ["454", "starttls", "refused"])
    assert conn.plaintext_lines()[:2] == [b"EHLO proxy.test", b"STARTTLS"], conn.lines
    assert after_starttls_line(conn) in (b"", b"QUIT\r\n"), after_starttls_line(conn)


def test_upstream_injecting_a_reply_after_its_220_gets_421(make_proxy, make_raw, pki):
    # Exim CVE-2021-38371: "250 x" arrives with the 220, in one write
    up = make_raw(tls="starttls", pair=pki.upstream, replies={"STARTTLS": b"220 go\r\n250 x\r\n"})
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "starttls"))
    conn = expect_next_hop_refused(proxy, up, ["inject", "after", "pipelin", "unexpected",
                                               "extra", "220"])
    assert conn.plaintext_lines() == [b"EHLO proxy.test", b"STARTTLS"], conn.lines
    # the proxy aborted at once: not even a ClientHello went out
    assert after_starttls_line(conn) == b"", after_starttls_line(conn)
    assert conn.handshake != "ok"


def tls_failure_case(make_proxy, make_raw, pki, mode, pair, reason_words, **uopts):
    up = make_raw(tls=mode, pair=pair)
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, mode, **uopts))
    conn = expect_next_hop_refused(proxy, up, reason_words)
    assert conn.handshake is not None and conn.handshake != "ok", \
        "the upstream's handshake completed: %r" % conn.handshake
    if mode == "starttls":
        assert conn.plaintext_lines() == [b"EHLO proxy.test", b"STARTTLS"], conn.lines
        rest = after_starttls_line(conn)
    else:
        rest = bytes(conn.raw)
    # a ClientHello first, then nothing but TLS records (an alert), no SMTP
    records = h.tls_records(rest)
    assert records and records[0][0] == 0x16, records
    return conn


VERIFY_WORDS = ["verif", "certificate", "cert", "signer", "trust", "asn", "issuer", "ca"]


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_self_signed_upstream_with_verify_gets_421(make_proxy, make_raw, pki, mode):
    tls_failure_case(make_proxy, make_raw, pki, mode, pki.self_signed, VERIFY_WORDS)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_upstream_with_the_wrong_name_gets_421(make_proxy, make_raw, pki, mode):
    tls_failure_case(make_proxy, make_raw, pki, mode, pki.wrong_name,
                     VERIFY_WORDS + ["name", "domain", "match"])


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_upstream_with_an_expired_certificate_gets_421(make_proxy, make_raw, pki, mode):
    tls_failure_case(make_proxy, make_raw, pki, mode, pki.expired,
                     VERIFY_WORDS + ["expired", "date", "after"])


def test_server_name_mismatch_with_a_valid_certificate_gets_421(make_proxy, make_raw, pki):
    # a good upstream.test certificate, but the proxy expects another name
    tls_failure_case(make_proxy, make_raw, pki, "starttls", pki.upstream,
                     VERIFY_WORDS + ["name", "domain", "match"], server_name="mx.elsewhere.test")


def test_implicit_upstream_that_speaks_plaintext_gets_421(make_proxy, make_raw, pki):
    up = make_raw(tls=None)                      # greets "220 ..." in plaintext at once
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "implicit"))
    conn = expect_next_hop_refused(proxy, up, ["tls", "handshake", "record", "version",
                                               "protocol", "length", "parse"])
    records = h.tls_records(bytes(conn.raw))
    assert records and records[0][0] == 0x16, records       # a ClientHello, nothing else


def test_verify_no_accepts_a_self_signed_upstream(make_proxy, make_raw, pki):
    up = make_raw(tls="starttls", pair=pki.self_signed)
    proxy = make_proxy(up, upstream_opts=upstream_tls_opts(pki, "starttls", verify="no",
                                                           ca_file=None))
    # verify = no is worth a warning at start
    assert any(" warn " in l and "verify" in l for l in proxy.log_lines()), proxy.log_text()
    msg = h.sample_message("verify-no")
    c, _ = h.open_session(proxy.port)
    with c:
        sid = proxy.session_id_for(c.sock)
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    assert up.wait_messages(1) == [msg]
    conn = up.conns[0]
    assert conn.handshake == "ok"
    assert conn.plaintext_lines() == [b"EHLO proxy.test", b"STARTTLS"], conn.lines
    assert b"EHLO client.test" in conn.tls_lines()
    ev = proxy.wait_event("upstream_tls", id=sid)
    assert ev.get("verified") in ("no", "0", "false"), ev["_line"]


# --- every listener mode with every upstream mode --------------------------------------


@pytest.mark.parametrize("upstream_mode", ["none", "implicit", "starttls"])
@pytest.mark.parametrize("listener_mode", ["starttls", "implicit", "none"])
def test_every_listener_mode_with_every_upstream_mode_delivers(make_proxy, make_aio, pki,
                                                               listener_mode, upstream_mode):
    if upstream_mode == "implicit":
        up = make_aio(ssl_context=h.server_tls_context(pki.upstream))
    elif upstream_mode == "starttls":
        up = make_aio(tls_context=h.server_tls_context(pki.upstream), require_starttls=True)
    else:
        up = make_aio()
    lopts = {"tls": listener_mode, "cert": pki.proxy.cert, "key": pki.proxy.key}
    if listener_mode == "none":
        lopts["require_tls"] = None
    uopts = upstream_tls_opts(pki, upstream_mode) if upstream_mode != "none" else {}
    proxy = make_proxy(up, upstream_opts=uopts, **lopts)
    tag = "%s-%s" % (listener_mode, upstream_mode)
    msg = h.sample_message(tag)
    c = listener_session(proxy, listener_mode, ehlo="matrix.client.test")
    with c:
        h.send_message(c, msg, rcpts=("a@example.net", "c@example.net"))
        c.expect("QUIT", 221)
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    assert env["mail_from"] == "b@example.org"
    assert env["rcpt_tos"] == ["a@example.net", "c@example.net"]
    assert env["ehlo"] == "matrix.client.test"
    if upstream_mode == "none":
        assert env["tls"] is None
    else:
        assert env["tls"] and env["tls"]["version"] in ("TLSv1.2", "TLSv1.3"), env
        assert env["starttls_done"] == (upstream_mode == "starttls")
