"""The proxy authenticates to its next hop (issue 14): `auth = plain | login |
xoauth2` with `username`, `password_file` or `token_file`, in its own prelude
after its EHLO and STARTTLS (or after implicit TLS), before the client's
session starts. The relay is aiosmtpd demanding AUTH before MAIL and only
inside TLS (AuthAioUpstream), with a certificate from the test CA.

What must hold: the relay sees the right credentials exactly once per
session, the client never sees AUTH offered and cannot send one of its own
(503 from the proxy, nothing forwarded), a refusal becomes a 421 4.7.0
greeting with the relay's reply in the log, and no secret is ever logged."""

import base64
import re

import pytest

import stp_harness as h

USER = "relay-user@example.org"
PASSWORD = "S3cret-pass-word-7731"
TOKEN_A = "ya29.token-A-4242-abcdef"
TOKEN_B = "ya29.token-B-9191-ghijkl"


def relay(make_aio, pki, mode, **kw):
    """An AuthAioUpstream on TLS MODE (starttls / implicit) with the
    upstream.test certificate."""
    ctx = h.server_tls_context(pki.upstream)
    if mode == "implicit":
        u = h.AuthAioUpstream(ssl_context=ctx, **kw)
    else:
        u = h.AuthAioUpstream(tls_context=ctx, require_starttls=True, **kw)
    return u.start()


@pytest.fixture
def relays(request):
    made = []

    def add(u):
        made.append(u)
        return u
    yield add
    for u in made:
        u.stop()


def auth_opts(pki, tls, **kw):
    opts = {"tls": tls, "verify": "yes", "ca_file": pki.ca.cert, "server_name": "upstream.test"}
    opts.update(kw)
    return opts


def secret_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    return str(p)


def assert_not_logged(proxy, *secrets):
    text = proxy.log_text()
    for s in secrets:
        for form in (s, base64.b64encode(s.encode()).decode()):
            assert form not in text, "secret %r appears in the log:\n%s" % (
                form, "\n".join(l for l in text.splitlines() if form in l))
    # and not in the encoded forms the mechanisms send
    for blob in (base64.b64encode(("\0%s\0%s" % (USER, secrets[0])).encode()).decode(),
                 base64.b64encode(("user=%s\x01auth=Bearer %s\x01\x01" % (
                     USER, secrets[0])).encode()).decode()):
        assert blob not in text, "an AUTH blob appears in the log"


def client_session(proxy, tag):
    """A client session that checks the EHLO has no AUTH, that its own AUTH
    gets a 503 5.5.1 from the proxy, then delivers. Returns the message."""
    msg = h.sample_message(tag)
    c, r = h.open_session(proxy.port)
    with c:
        assert "AUTH" not in r.keywords(), "AUTH offered to the client: %r" % r.raw
        assert not any(l.upper().startswith("AUTH") for l in r.lines), r.raw
        a = c.cmd("AUTH PLAIN " + base64.b64encode(b"\0mallory\0guess").decode())
        assert a.code == 503, "client AUTH: %r" % a.raw
        assert a.lines[0].startswith("5.5.1"), a.raw
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    return msg


def refused_client(proxy):
    """The client's greeting must be 421 4.7.0 and the connection closed."""
    with h.SmtpConn(proxy.port) as c:
        g = c.read_reply()
        assert g.code == 421, "greeting: %r" % g.raw
        assert g.lines[0].startswith("4.7.0"), g.raw
        rest = c.read_until_closed()
        assert rest == b"", rest
    return g


def test_plain_over_starttls(make_proxy, make_aio, pki, relays, tmp_path):
    up = relays(relay(make_aio, pki, "starttls", users={USER: PASSWORD}))
    proxy = make_proxy(up, upstream_opts=auth_opts(
        pki, "starttls", auth="plain", username=USER,
        password_file=secret_file(tmp_path, "pw", PASSWORD)))
    msg = client_session(proxy, "plain")
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    assert env["mail_from"] == "b@example.org" and env["rcpt_tos"] == ["a@example.net"]
    assert [(a["mechanism"], a["login"], a["secret"], a["ok"], a["tls"])
            for a in up.auth_attempts] == [("PLAIN", USER.encode(), PASSWORD.encode(), True, True)]
    lines = up.auth_lines()
    assert len(lines) == 1, "the relay saw more than the proxy's one AUTH: %r" % lines
    assert lines[0] == b"AUTH PLAIN " + base64.b64encode(
        ("\0%s\0%s" % (USER, PASSWORD)).encode()), lines[0]
    # AUTH came inside TLS, after the proxy's own EHLO and STARTTLS
    sess = up.sessions()
    assert len(sess) == 1
    assert sess[0].plaintext_lines() == [b"EHLO proxy.test", b"STARTTLS"], sess[0].lines
    assert not any(l.upper().startswith(b"AUTH") for l in sess[0].plaintext_lines())
    ev = proxy.wait_event("upstream_auth", upstream="up")
    assert ev.get("mechanism") == "PLAIN" and ev.get("user") == USER, ev["_line"]
    assert_not_logged(proxy, PASSWORD)


def test_login_over_implicit_tls(make_proxy, make_aio, pki, relays, tmp_path):
    up = relays(relay(make_aio, pki, "implicit", users={USER: PASSWORD}))
    proxy = make_proxy(up, upstream_opts=auth_opts(
        pki, "implicit", auth="login", username=USER,
        password_file=secret_file(tmp_path, "pw", PASSWORD)))
    msg = client_session(proxy, "login")
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    assert env["tls"], env
    assert [(a["mechanism"], a["login"], a["secret"], a["ok"], a["tls"])
            for a in up.auth_attempts] == [("LOGIN", USER.encode(), PASSWORD.encode(), True, True)]
    assert up.auth_lines() == [b"AUTH LOGIN"], up.auth_lines()
    ev = proxy.wait_event("upstream_auth", upstream="up")
    assert ev.get("mechanism") == "LOGIN" and ev.get("user") == USER, ev["_line"]
    assert_not_logged(proxy, PASSWORD)


def test_xoauth2_token_file_is_read_for_every_session(make_proxy, make_aio, pki, relays,
                                                      tmp_path):
    accepted = {"token": TOKEN_A}
    up = relays(relay(make_aio, pki, "starttls",
                      tokens=lambda login, token: login == USER and token == accepted["token"]))
    tf = secret_file(tmp_path, "token", TOKEN_A + "\n")
    proxy = make_proxy(up, upstream_opts=auth_opts(
        pki, "starttls", auth="xoauth2", username=USER, token_file=tf))
    msg = client_session(proxy, "xoauth2-a")
    assert up.wait_messages(1)[0]["original_content"] == msg
    a = up.auth_attempts[0]
    assert (a["mechanism"], a["login"], a["secret"], a["ok"]) == \
        ("XOAUTH2", USER.encode(), TOKEN_A.encode(), True)
    assert a["raw"] == ("user=%s\x01auth=Bearer %s\x01\x01" % (USER, TOKEN_A)).encode()
    ev = proxy.wait_event("upstream_auth", upstream="up")
    assert ev.get("mechanism") == "XOAUTH2" and ev.get("user") == USER, ev["_line"]

    # the token was refreshed: the relay now only takes B
    with open(tf, "w") as f:
        f.write(TOKEN_B + "\n")
    accepted["token"] = TOKEN_B
    msg = client_session(proxy, "xoauth2-b")
    assert up.wait_messages(2)[1]["original_content"] == msg
    assert [(x["secret"], x["ok"]) for x in up.auth_attempts] == \
        [(TOKEN_A.encode(), True), (TOKEN_B.encode(), True)]
    assert len(up.auth_lines()) == 2
    assert_not_logged(proxy, TOKEN_A, TOKEN_B)


def test_xoauth2_wrong_token_gets_the_client_a_421(make_proxy, make_aio, pki, relays, tmp_path):
    up = relays(relay(make_aio, pki, "starttls", tokens=lambda login, token: token == TOKEN_B))
    proxy = make_proxy(up, upstream_opts=auth_opts(
        pki, "starttls", auth="xoauth2", username=USER,
        token_file=secret_file(tmp_path, "token", TOKEN_A)))
    refused_client(proxy)
    assert [(a["secret"], a["ok"]) for a in up.auth_attempts] == [(TOKEN_A.encode(), False)]
    # the proxy answered the JSON error challenge with an empty line
    assert up.xoauth2_challenge_answers == [b""], up.xoauth2_challenge_answers
    ev = proxy.wait_event("upstream_error", upstream="up")
    assert ev.get("error", "").startswith("AUTH refused: 535"), ev["_line"]
    assert up.envelopes == []
    assert_not_logged(proxy, TOKEN_A)


@pytest.mark.parametrize("mech,tls", [("plain", "starttls"), ("login", "implicit")])
def test_wrong_password_gets_the_client_a_421(make_proxy, make_aio, pki, relays, tmp_path,
                                              mech, tls):
    wrong = "not-the-password-5150"
    up = relays(relay(make_aio, pki, tls, users={USER: PASSWORD}))
    proxy = make_proxy(up, upstream_opts=auth_opts(
        pki, tls, auth=mech, username=USER,
        password_file=secret_file(tmp_path, "pw", wrong)))
    refused_client(proxy)
    assert [(a["secret"], a["ok"]) for a in up.auth_attempts] == [(wrong.encode(), False)]
    ev = proxy.wait_event("upstream_error", upstream="up")
    err = ev.get("error", "")
    assert err.startswith("AUTH refused: 535"), ev["_line"]
    assert "5.7.8" in err and "Authentication credentials invalid" in err, \
        "the relay's reply is not quoted: " + ev["_line"]
    assert up.envelopes == []
    assert_not_logged(proxy, wrong)


def test_trailing_newline_is_not_part_of_the_password(make_proxy, make_aio, pki, relays,
                                                      tmp_path):
    up = relays(relay(make_aio, pki, "starttls", users={USER: PASSWORD}))
    proxy = make_proxy(up, upstream_opts=auth_opts(
        pki, "starttls", auth="plain", username=USER,
        password_file=secret_file(tmp_path, "pw", PASSWORD + "\n")))
    msg = client_session(proxy, "newline")
    assert up.wait_messages(1)[0]["original_content"] == msg
    assert [(a["secret"], a["ok"]) for a in up.auth_attempts] == [(PASSWORD.encode(), True)]
    assert_not_logged(proxy, PASSWORD)


def test_helo_name_is_the_proxys_ehlo_to_the_next_hop(make_proxy, make_aio, pki, relays,
                                                      tmp_path):
    up = relays(relay(make_aio, pki, "starttls", users={USER: PASSWORD}))
    proxy = make_proxy(up, upstream_opts=auth_opts(
        pki, "starttls", auth="plain", username=USER, helo_name="out.relay.example",
        password_file=secret_file(tmp_path, "pw", PASSWORD)))
    client_session(proxy, "helo-name")
    up.wait_messages(1)
    sess = up.sessions()
    assert sess[0].plaintext_lines() == [b"EHLO out.relay.example", b"STARTTLS"], sess[0].lines
    assert sess[0].tls_lines()[0] == b"EHLO out.relay.example", sess[0].tls_lines()
    assert b"EHLO proxy.test" not in [l for l, _ in sess[0].lines]


def test_helo_name_without_auth(make_proxy, make_aio, pki):
    """helo_name is the proxy's EHLO whenever it speaks first, with or
    without AUTH: here for its STARTTLS to the next hop."""
    up = make_aio(tls_context=h.server_tls_context(pki.upstream), require_starttls=True)
    proxy = make_proxy(up, upstream_opts=auth_opts(pki, "starttls",
                                                   helo_name="plain.relay.example"))
    c, _ = h.open_session(proxy.port)
    with c:
        h.send_message(c, h.sample_message("helo-name-plain"))
        c.expect("QUIT", 221)
    up.wait_messages(1)
    sess = up.sessions()
    assert sess[0].plaintext_lines() == [b"EHLO plain.relay.example", b"STARTTLS"], sess[0].lines


# --- -t -----------------------------------------------------------------------------------


def check(stp_bin, tmp_path, tls_files, upstream, listener=None, name="c"):
    lopts = {"listen": "127.0.0.1:2525", "tls": "starttls", "cert": tls_files["cert"],
             "key": tls_files["key"], "upstream": "up"}
    lopts.update(listener or {})
    uopts = {"address": "127.0.0.1:2526"}
    uopts.update(upstream)
    text = h.render_config({"hostname": "proxy.test"}, [("main", lopts)], [("up", uopts)])
    return text, h.check_config(stp_bin, str(tmp_path / name), text)


@pytest.mark.parametrize("case", ["auth_with_tls_none", "plain_without_password_file",
                                  "login_without_password_file",
                                  "xoauth2_without_token_file", "auth_with_xclient",
                                  "non_loopback_listener_without_allow"])
def test_check_refuses(stp_bin, tmp_path, tls_files, pki, case):
    pw = secret_file(tmp_path, "pw", PASSWORD)
    tok = secret_file(tmp_path, "tok", TOKEN_A)
    base = {"tls": "starttls", "ca_file": pki.ca.cert, "username": USER}
    listener = None
    if case == "auth_with_tls_none":
        up = dict(base, tls="none", auth="plain", password_file=pw)
        key = "auth"
    elif case == "plain_without_password_file":
        up = dict(base, auth="plain")
        key = "auth"
    elif case == "login_without_password_file":
        up = dict(base, auth="login")
        key = "auth"
    elif case == "xoauth2_without_token_file":
        up = dict(base, auth="xoauth2")
        key = "auth"
    elif case == "auth_with_xclient":
        up = dict(base, auth="plain", password_file=pw, client_identity="xclient")
        key = "auth"
    else:
        up = dict(base, auth="xoauth2", token_file=tok)
        listener = {"listen": "192.0.2.1:2525"}
        key = None
    text, p = check(stp_bin, tmp_path, tls_files, up, listener, name=case)
    assert p.returncode != 0, "-t accepted:\n%s\n%s" % (text, p.stdout)
    assert p.config_path + ":" in p.stdout, "no FILE:LINE in: %r" % p.stdout
    if case == "non_loopback_listener_without_allow":
        assert "allow" in p.stdout, "the error does not say what is missing: %r" % p.stdout
    if key:
        # auth-related refusals point at a line of the upstream section
        m = re.search(re.escape(p.config_path) + r":(\d+):", p.stdout)
        assert m, p.stdout
        n = int(m.group(1))
        up_start = text.splitlines().index("[upstream up]") + 1
        assert n > up_start, "error at line %d, not in [upstream up] (line %d on):\n%s" % (
            n, up_start, p.stdout)


def test_check_accepts_the_good_configurations(stp_bin, tmp_path, tls_files, pki):
    pw = secret_file(tmp_path, "pw", PASSWORD)
    tok = secret_file(tmp_path, "tok", TOKEN_A)
    base = {"tls": "starttls", "ca_file": pki.ca.cert, "username": USER}
    for i, (up, listener) in enumerate([
            (dict(base, auth="plain", password_file=pw), None),
            (dict(base, auth="login", password_file=pw, tls="implicit"), None),
            (dict(base, auth="xoauth2", token_file=tok, helo_name="out.example"), None),
            (dict(base, auth="none", username=None), {"listen": "192.0.2.1:2525"}),
            (dict(base, auth="plain", password_file=pw),
             {"listen": "192.0.2.1:2525", "allow": "192.0.2.0/24, 127.0.0.1/32"})]):
        text, p = check(stp_bin, tmp_path, tls_files, up, listener, name="ok%d" % i)
        assert p.returncode == 0, "-t refused:\n%s\n%s" % (text, p.stdout)


class AuthOfferingRaw(h.RawUpstream):
    """RawUpstream whose EHLO offers AUTH too: for replies to AUTH that
    aiosmtpd cannot be made to give (replies={"AUTH": ...})."""

    def _ehlo(self, w):
        lines = super()._ehlo(w).split(b"\r\n")[:-1]      # "250-..." ... "250 last"
        lines[-1] = b"250-" + lines[-1][4:]
        return b"\r\n".join(lines + [b"250 AUTH PLAIN LOGIN XOAUTH2", b""])


def test_temporary_auth_failure_454_gets_the_client_a_421(make_proxy, pki, tmp_path):
    up = AuthOfferingRaw(tls="starttls", pair=pki.upstream, replies={
        "AUTH": b"454 4.7.0 Temporary authentication failure\r\n"}).start()
    try:
        proxy = make_proxy(up, upstream_opts=auth_opts(
            pki, "starttls", auth="plain", username=USER,
            password_file=secret_file(tmp_path, "pw", PASSWORD)))
        refused_client(proxy)
        ev = proxy.wait_event("upstream_error", upstream="up")
        assert ev.get("error", "").startswith(
            "AUTH refused: 454 4.7.0 Temporary authentication failure"), ev["_line"]
        up.wait_conns(1)
        lines = [(l, t) for c in up.conns for l, t in c.lines]
        auth = [(l, t) for l, t in lines if l.upper().startswith(b"AUTH")]
        assert len(auth) == 1 and auth[0][1], "one AUTH, inside TLS: %r" % lines
        assert not [l for l, _ in lines if l.upper().startswith((b"MAIL", b"RCPT", b"DATA"))]
        assert_not_logged(proxy, PASSWORD)
    finally:
        up.stop()
