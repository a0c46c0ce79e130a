"""The upstream's greeting and EHLO reply as the client sees them through the
proxy, before and after STARTTLS."""

import pytest

import stp_harness as h

UPSTREAM_EHLO_FIRST = "upstream.test greets you"


def ehlo_lines(last):
    """Upstream EHLO lines with LAST moved to the end of the reply."""
    lines = [
        UPSTREAM_EHLO_FIRST,
        "PIPELINING",
        "SIZE 10240000",
        "STARTTLS",
        "AUTH PLAIN LOGIN",
        "XCLIENT NAME ADDR",
        "8BITMIME",
        "XFORWARD NAME",
    ]
    lines.remove(last)
    return lines + [last]


def assert_well_formed_ehlo(r):
    """Exactly the last line has '250 ', every other line '250-'."""
    raw_lines = r.raw.split(b"\r\n")
    assert raw_lines[-1] == b"", "reply does not end in CRLF: %r" % r.raw
    raw_lines = raw_lines[:-1]
    for l in raw_lines[:-1]:
        assert l.startswith(b"250-"), "continuation line without '250-': %r in %r" % (l, r.raw)
    assert raw_lines[-1].startswith(b"250 "), "last line without '250 ': %r" % r.raw
    assert b"\n" not in b"".join(raw_lines) and b"\r" not in b"".join(raw_lines), r.raw


@pytest.mark.parametrize("greeting", [
    ["upstream.test ESMTP Distinctive-Greeting-7f3a ready"],
    ["upstream.test ESMTP first line of a multi-line greeting",
     "second line 0xC0FFEE",
     "third and last line"],
], ids=["single-line", "multi-line"])
def test_upstream_greeting_is_relayed_unchanged(make_scripted, make_proxy, greeting):
    up = make_scripted(greeting=greeting)
    proxy = make_proxy(up)
    expected = b"".join(("220%s%s\r\n" % ("-" if i < len(greeting) - 1 else " ", t)).encode()
                        for i, t in enumerate(greeting))
    with h.SmtpConn(proxy.port) as c:
        r = c.read_reply()
        assert r.raw == expected
        assert c.pending(0.3) == b"", "extra bytes after the greeting"
        c.expect("QUIT", 221)


@pytest.mark.parametrize("last", ["XFORWARD NAME", "STARTTLS", "AUTH PLAIN LOGIN",
                                  "XCLIENT NAME ADDR"])
def test_ehlo_before_tls_offers_starttls_and_hides_auth_xclient_xforward(
        make_scripted, make_proxy, last):
    up = make_scripted(ehlo=ehlo_lines(last))
    proxy = make_proxy(up)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        r = c.expect("EHLO client.test", 250)
        assert_well_formed_ehlo(r)
        kw = r.keywords()
        assert r.lines[0] == UPSTREAM_EHLO_FIRST
        assert kw.count("STARTTLS") == 1, r.raw
        for gone in ("AUTH", "XCLIENT", "XFORWARD"):
            assert gone not in kw, "%s offered before TLS: %r" % (gone, r.raw)
        for kept in ("PIPELINING", "SIZE", "8BITMIME"):
            assert kept in kw, "%s lost: %r" % (kept, r.raw)
        c.expect("QUIT", 221)
    assert up.saw_verb("EHLO") == [b"EHLO client.test"]


@pytest.mark.parametrize("last", ["XFORWARD NAME", "STARTTLS", "AUTH PLAIN LOGIN"])
def test_ehlo_after_tls_offers_auth_but_not_starttls_xclient_xforward(
        make_scripted, make_proxy, last):
    up = make_scripted(ehlo=ehlo_lines(last))
    proxy = make_proxy(up)
    c, r = h.open_session(proxy.port, tls=True)
    with c:
        assert_well_formed_ehlo(r)
        kw = r.keywords()
        assert r.lines[0] == UPSTREAM_EHLO_FIRST
        assert "STARTTLS" not in kw, "STARTTLS offered after TLS: %r" % r.raw
        assert "AUTH" in kw, "AUTH not offered after TLS: %r" % r.raw
        assert "AUTH PLAIN LOGIN" in r.lines, r.raw
        assert "XCLIENT" not in kw and "XFORWARD" not in kw, r.raw
        for kept in ("PIPELINING", "SIZE", "8BITMIME"):
            assert kept in kw, "%s lost: %r" % (kept, r.raw)
        c.expect("QUIT", 221)


@pytest.mark.parametrize("lines", [
    ["AUTH=PLAIN LOGIN", "AUTH PLAIN"],
    ["auth plain", "starttls", "xclient NAME", "xforward NAME"],
    ["Auth Login", "StartTLS", "XClient ADDR", "XForward ADDR"],
], ids=["auth-equals", "lower-case", "mixed-case"])
def test_ehlo_filter_matches_keywords_case_insensitively(make_scripted, make_proxy, lines):
    up = make_scripted(ehlo=[UPSTREAM_EHLO_FIRST, "PIPELINING"] + lines + ["8BITMIME"])
    proxy = make_proxy(up)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        r = c.expect("EHLO client.test", 250)
        assert_well_formed_ehlo(r)
        assert sorted(r.keywords()) == ["8BITMIME", "PIPELINING", "STARTTLS"], r.raw
        c.expect("QUIT", 221)


def test_ehlo_after_tls_without_upstream_auth_offers_no_auth(make_scripted, make_proxy):
    up = make_scripted(ehlo=[UPSTREAM_EHLO_FIRST, "PIPELINING", "8BITMIME"])
    proxy = make_proxy(up)
    c, r = h.open_session(proxy.port, tls=True)
    with c:
        assert_well_formed_ehlo(r)
        assert r.keywords() == ["PIPELINING", "8BITMIME"], r.raw
        c.expect("QUIT", 221)


def test_ehlo_reply_with_only_a_domain_line_gets_starttls(make_scripted, make_proxy):
    up = make_scripted(ehlo=["upstream.test"])
    proxy = make_proxy(up)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        r = c.expect("EHLO client.test", 250)
        assert_well_formed_ehlo(r)
        assert r.lines[0] == "upstream.test"
        assert r.keywords() == ["STARTTLS"], r.raw
        c.expect("QUIT", 221)


def test_helo_after_tls_is_relayed(proxy_scripted):
    proxy, up = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        r = c.expect("HELO client.test", 250)
        assert r.raw == b"250 upstream.test helo-reply\r\n"
        c.expect("QUIT", 221)
    assert b"HELO client.test" in up.saw_verb("HELO")


def test_helo_in_plaintext_is_relayed_when_tls_is_optional(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, require_tls="no")
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        r = c.expect("HELO client.test", 250)
        assert r.raw == b"250 upstream.test helo-reply\r\n"
        c.expect("QUIT", 221)
    assert up.saw_verb("HELO") == [b"HELO client.test"]


def test_ehlo_on_tls_none_listener_does_not_offer_starttls(make_scripted, make_proxy):
    up = make_scripted()
    proxy = make_proxy(up, tls="none", require_tls="no", cert=None, key=None)
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        r = c.expect("EHLO client.test", 250)
        assert_well_formed_ehlo(r)
        kw = r.keywords()
        assert "STARTTLS" not in kw, r.raw
        assert "XCLIENT" not in kw and "XFORWARD" not in kw, r.raw
        c.expect("QUIT", 221)
