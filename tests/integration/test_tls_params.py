"""TLS parameters on the client leg (SMTP-REFERENCE.md: Mozilla
"intermediate": TLS 1.2 and 1.3, ECDHE with AES-GCM or ChaCha20-Poly1305)."""

import ssl

import pytest

import stp_harness as h


def starttls_with(port, ctx):
    """Plaintext EHLO + STARTTLS, then a handshake with CTX. Returns the
    connection (TLS up) or raises the handshake error."""
    c = h.SmtpConn(port)
    c.greeting()
    c.expect("EHLO client.test", 250)
    c.expect("STARTTLS", 220)
    try:
        c.starttls(ctx)
    except BaseException:
        c.close()
        raise
    return c


def unverified(minimum, maximum, ciphers=None):
    ctx = h.client_tls_context()
    ctx.minimum_version = minimum
    ctx.maximum_version = maximum
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_modern_tls_versions_are_accepted(proxy_scripted, version):
    proxy, up = proxy_scripted
    want = {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    c = starttls_with(proxy.port, unverified(version, version))
    with c:
        assert c.sock.version() == want
        c.expect("EHLO client.test", 250)
        c.expect("QUIT", 221)
    assert proxy.wait_event("starttls")["tls"] == want


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256",
                                    "ECDHE-ECDSA-CHACHA20-POLY1305",
                                    "ECDHE-ECDSA-AES256-GCM-SHA384"])
def test_tls12_aead_ecdhe_ciphers_are_accepted(proxy_scripted, cipher):
    proxy, _ = proxy_scripted
    ctx = unverified(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2, cipher)
    c = starttls_with(proxy.port, ctx)
    with c:
        assert c.sock.cipher()[0] == cipher
        c.expect("EHLO client.test", 250)
        c.expect("QUIT", 221)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_tls_versions_are_refused(proxy_scripted):
    proxy, _ = proxy_scripted
    ctx = unverified(ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c = starttls_with(proxy.port, ctx)
        c.close()
    # and the daemon is still fine
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        c.expect("QUIT", 221)


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"])
def test_tls12_cbc_ciphers_are_refused(proxy_scripted, cipher):
    proxy, _ = proxy_scripted
    ctx = unverified(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2, cipher + ":@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c = starttls_with(proxy.port, ctx)
        c.close()
