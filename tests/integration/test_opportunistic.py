"""[upstream] tls = opportunistic: the proxy says EHLO itself and upgrades the
next hop with STARTTLS when it is offered; when it is not, the session goes
on in plaintext (logged tls=none). Once STARTTLS is offered there is no
downgrade: a refusal, a broken handshake or a certificate that fails
verify = yes is a 421, and nothing travels in plaintext. A listener refuses
the value (-t names FILE:LINE)."""

import re
import ssl

import pytest

import stp_harness as h

# What an impatient client pipelines before the greeting: none of it may
# reach a next hop whose TLS failed.
SECRET_EHLO = "secret-client-ehlo.test"
SECRET_FROM = "secret-sender@client.test"
EARLY = ("EHLO %s\r\nMAIL FROM:<%s>\r\n" % (SECRET_EHLO, SECRET_FROM)).encode()


def opp_opts(pki=None, **kw):
    opts = {"tls": "opportunistic", "server_name": "upstream.test"}
    if pki is not None:
        opts["ca_file"] = pki.ca.cert
    opts.update(kw)
    return opts


def deliver(proxy, tag):
    """One message through a STARTTLS client session; returns (sid, msg)."""
    msg = h.sample_message(tag)
    c, _ = h.open_session(proxy.port, ehlo="client.test")
    with c:
        sid = proxy.session_id_for(c.sock)
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    return sid, msg


def refused(proxy, up, reason_words):
    """The client's first reply is 421 4.7.0, then the close; the reason is
    logged; nothing of the client's reached the next hop. Returns its RawConn."""
    with h.SmtpConn(proxy.port, timeout=15) as c:
        sid = proxy.session_id_for(c.sock)
        c.send(EARLY)
        r = c.read_reply()
        assert r.code == 421 and "4.7.0" in r.text, \
            "expected 421 4.7.0 first, got %r\nlog:\n%s" % (r.raw, proxy.log_tail(15))
        rest = c.read_until_closed(timeout=5)
        assert b"250" not in rest and b"220" not in rest, rest
    ev = proxy.wait_event("upstream_error", id=sid)
    why = (ev.get("error") or "").lower()
    assert any(w in why for w in reason_words), \
        "reason %r mentions none of %r: %s" % (why, reason_words, ev["_line"])
    # never reported as a plaintext session
    assert not [e for e in proxy.events("upstream_tls")
                if e.get("id") == sid and e.get("tls") == "none"], proxy.log_tail(15)
    conn = up.wait_conns(1)[0]
    assert conn.closed.wait(5), "the proxy kept the upstream connection open"
    assert SECRET_EHLO.encode() not in conn.raw, bytes(conn.raw)
    assert SECRET_FROM.encode() not in conn.raw, bytes(conn.raw)
    assert conn.tls_lines() == [] and conn.messages == []
    assert proxy.alive()
    return conn


def after_starttls(conn):
    raw = bytes(conn.raw)
    i = raw.find(b"STARTTLS\r\n")
    assert i >= 0, "the proxy never sent STARTTLS: %r" % raw
    return raw[i + len(b"STARTTLS\r\n"):]


# --- (1) STARTTLS offered: upgraded --------------------------------------------------


@pytest.mark.parametrize("pair", ["upstream", "self_signed"])
def test_offered_starttls_is_used_and_logged_with_its_version(make_proxy, make_raw, pki, pair):
    # verify defaults to no: a self-signed next hop is encrypted, not refused
    up = make_raw(tls="starttls", pair=getattr(pki, pair))
    proxy = make_proxy(up, upstream_opts=opp_opts())
    sid, msg = deliver(proxy, "opp-tls-" + pair)
    assert up.wait_messages(1) == [msg]
    conn = up.conns[0]
    assert conn.handshake == "ok" and conn.tls_version in ("TLSv1.2", "TLSv1.3"), \
        (conn.handshake, conn.tls_version)
    # our EHLO and STARTTLS in plaintext, everything of the client's inside TLS
    assert conn.plaintext_lines() == [b"EHLO proxy.test", b"STARTTLS"], conn.lines
    tls = conn.tls_lines()
    assert b"EHLO client.test" in tls, tls
    assert any(l.startswith(b"MAIL FROM:<b@example.org>") for l in tls), tls
    ev = proxy.wait_event("upstream_tls", id=sid)
    assert ev.get("tls") == conn.tls_version and ev.get("cipher"), ev["_line"]
    assert ev.get("verified") == "no", ev["_line"]


def test_offered_starttls_with_aiosmtpd_delivers_byte_exact(make_proxy, make_aio, pki):
    up = make_aio(tls_context=h.server_tls_context(pki.upstream), require_starttls=True)
    proxy = make_proxy(up, upstream_opts=opp_opts(pki, verify="yes"))
    sid, msg = deliver(proxy, "opp-aio-tls")
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    assert env["starttls_done"] and env["tls"]["version"] in ("TLSv1.2", "TLSv1.3"), env
    ev = proxy.wait_event("upstream_tls", id=sid)
    assert ev.get("tls") == env["tls"]["version"] and ev.get("verified") == "yes", ev["_line"]


# --- (2) STARTTLS not offered: plaintext, logged ---------------------------------------


def test_no_starttls_delivers_byte_exact_in_plaintext_and_logs_tls_none(make_proxy, make_aio):
    up = make_aio()                                  # aiosmtpd without TLS
    proxy = make_proxy(up, upstream_opts=opp_opts())
    sid, msg = deliver(proxy, "opp-plain")
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    assert not env["starttls_done"] and not env["tls"], env
    assert env["ehlo"] == "client.test"              # the client's EHLO came last
    lines = up.sessions()[0].plaintext_lines()
    # our EHLO, then the client's own (a second EHLO is legal SMTP)
    assert lines[:2] == [b"EHLO proxy.test", b"EHLO client.test"], lines
    assert b"STARTTLS" not in lines
    ev = proxy.wait_event("upstream_tls", id=sid)
    assert ev.get("tls") == "none", ev["_line"]
    assert ev.get("upstream") == "up" and "not offered" in ev.get("reason", ""), ev["_line"]


def test_no_starttls_client_sees_one_greeting_and_the_next_hops_ehlo(make_proxy, make_raw):
    up = make_raw(tls="starttls", offer_starttls=False)
    proxy = make_proxy(up, upstream_opts=opp_opts(), tls="none", require_tls=None)
    with h.SmtpConn(proxy.port) as c:
        g = c.greeting()
        assert "upstream.test ESMTP raw" in g.text, g.raw
        assert c.pending(0.5) == b"", "more than one greeting: %r" % c.pending(0)
        r = c.expect("EHLO client.test", 250)
        assert c.pending(0.5) == b"", "more than one EHLO reply"
        assert "STARTTLS" not in r.keywords(), r.raw
        msg = h.sample_message("opp-plain-raw")
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    assert up.wait_messages(1) == [msg]
    conn = up.conns[0]
    assert conn.tls_at is None and conn.handshake is None
    assert conn.plaintext_lines()[:2] == [b"EHLO proxy.test", b"EHLO client.test"], conn.lines


def test_no_starttls_means_no_requiretls_for_the_client(make_proxy, make_scripted):
    # a next hop that offers REQUIRETLS but not STARTTLS: the leg is plaintext,
    # so the proxy must not pass REQUIRETLS on (RFC 8689)
    up = make_scripted(ehlo=["upstream.test", "PIPELINING", "REQUIRETLS", "8BITMIME"])
    proxy = make_proxy(up, upstream_opts=opp_opts())
    c, r = h.open_session(proxy.port)
    with c:
        assert "REQUIRETLS" not in r.keywords(), r.raw
        assert "8BITMIME" in r.keywords(), r.raw
        c.expect("QUIT", 221)


def test_no_starttls_with_xclient_sends_xclient_in_plaintext(make_proxy, make_raw):
    up = make_raw(tls="starttls", offer_starttls=False, xclient=True)
    proxy = make_proxy(up, upstream_opts=opp_opts(client_identity="xclient"))
    sid, msg = deliver(proxy, "opp-xclient")
    assert up.wait_messages(1) == [msg]
    lines = up.conns[0].plaintext_lines()
    assert lines[0] == b"EHLO proxy.test", lines
    assert lines[1].startswith(b"XCLIENT ") and b"ADDR=127.0.0.1" in lines[1], lines
    assert lines[2] == b"EHLO client.test", lines
    assert proxy.wait_event("upstream_tls", id=sid).get("tls") == "none"


# --- (3) verify = yes: a failing certificate is a 421, never plaintext ------------------


@pytest.mark.parametrize("pair", ["self_signed", "wrong_name", "expired"])
def test_verify_yes_with_an_untrusted_certificate_gets_421(make_proxy, make_raw, pki, pair):
    up = make_raw(tls="starttls", pair=getattr(pki, pair))
    proxy = make_proxy(up, upstream_opts=opp_opts(pki, verify="yes"))
    conn = refused(proxy, up, ["verif", "cert", "signer", "trust", "asn", "issuer", "ca",
                               "name", "domain", "match", "expired", "date"])
    assert conn.plaintext_lines() == [b"EHLO proxy.test", b"STARTTLS"], conn.lines
    assert conn.handshake != "ok"
    records = h.tls_records(after_starttls(conn))
    assert records and records[0][0] == 0x16, records   # a ClientHello, then no SMTP


# --- (4) STARTTLS offered but refused or broken: 421, no downgrade ------------------------


def test_454_to_starttls_gets_421_not_plaintext(make_proxy, make_raw, pki):
    up = make_raw(tls="starttls", pair=pki.upstream,
                  replies={"STARTTLS": b"454 4.7.0 TLS not available due to local problem\r\n"})
    proxy = make_proxy(up, upstream_opts=opp_opts())
    conn = refused(proxy, up, ["starttls", "refused", "454"])
    assert conn.plaintext_lines()[:2] == [b"EHLO proxy.test", b"STARTTLS"], conn.lines
    assert after_starttls(conn) in (b"", b"QUIT\r\n"), after_starttls(conn)


def test_scripted_454_upstream_gets_421_and_nothing_delivered(make_proxy, make_scripted):
    up = make_scripted()        # offers STARTTLS, answers it 454
    proxy = make_proxy(up, upstream_opts=opp_opts())
    with h.SmtpConn(proxy.port, timeout=15) as c:
        c.send(EARLY)
        r = c.read_reply()
        assert r.code == 421 and "4.7.0" in r.text, r.raw
    up.wait_sessions(1)
    assert up.messages == []
    assert not up.saw_verb("MAIL") and not up.saw_line_containing(SECRET_EHLO)


def test_reply_injected_after_the_220_gets_421(make_proxy, make_raw, pki):
    up = make_raw(tls="starttls", pair=pki.upstream, replies={"STARTTLS": b"220 go\r\n250 x\r\n"})
    proxy = make_proxy(up, upstream_opts=opp_opts())
    conn = refused(proxy, up, ["after 220"])
    assert after_starttls(conn) == b"", after_starttls(conn)


def test_failed_handshake_gets_421_not_plaintext(make_proxy, make_raw, pki):
    # the next hop speaks TLS 1.2 at most, the proxy insists on 1.3
    ctx = h.server_tls_context(pki.upstream, maximum=ssl.TLSVersion.TLSv1_2)
    up = make_raw(tls="starttls", ssl_context=ctx)
    proxy = make_proxy(up, upstream_opts=opp_opts(min_version="1.3"))
    conn = refused(proxy, up, ["handshake", "tls", "version", "protocol"])
    assert conn.plaintext_lines() == [b"EHLO proxy.test", b"STARTTLS"], conn.lines
    assert conn.handshake != "ok"


# --- (5) configuration ----------------------------------------------------------------------


def test_check_rejects_opportunistic_on_a_listener_with_file_line(stp_bin, tmp_path):
    text = h.render_config({"hostname": "proxy.test"},
                           [("main", {"listen": "127.0.0.1:0", "tls": "opportunistic",
                                      "upstream": "up"})],
                           [("up", {"address": "127.0.0.1:2525"})])
    p = h.check_config(stp_bin, str(tmp_path), text)
    assert p.returncode != 0, p.stdout
    n = text.splitlines().index("tls = opportunistic") + 1
    assert re.search(r"%s:%d: tls = opportunistic is for an \[upstream\]"
                     % (re.escape(p.config_path), n), p.stdout), (n, p.stdout)


def test_check_accepts_opportunistic_on_an_upstream(stp_bin, tmp_path):
    text = h.render_config({"hostname": "proxy.test"},
                           [("main", {"listen": "127.0.0.1:0", "tls": "none",
                                      "upstream": "up"})],
                           [("up", {"address": "127.0.0.1:2525", "tls": "opportunistic"})])
    p = h.check_config(stp_bin, str(tmp_path), text)
    assert p.returncode == 0, p.stdout
