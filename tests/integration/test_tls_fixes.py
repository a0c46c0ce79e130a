"""TLS behaviour that real clients showed to be wrong once: errors in TLS
material at the line of the key at fault, the TLS 1.0 recipe, `groups` on
TLS 1.2, fragmented ClientHellos, and the client certificate reported on a
resumed session."""

import os
import re
import socket
import ssl

import pytest

import stp_harness as h

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --- errors in TLS material point at the key's own line ------------------------------------


def listener_conf(pki, **extra):
    opts = {"listen": "127.0.0.1:0", "tls": "implicit",
            "cert": pki.proxy.cert, "key": pki.proxy.key, "upstream": "up"}
    opts.update(extra)
    return [("main", opts)]


def error_line(stp_bin, tmp_path, text):
    """-t on TEXT must fail with FILE:LINE: message; returns (line, message)."""
    p = h.check_config(stp_bin, str(tmp_path), text)
    assert p.returncode != 0, p.stdout
    m = re.search(r"^%s:(\d+): (.*)" % re.escape(p.config_path), p.stdout, re.M)
    assert m, "no FILE:LINE: error:\n%s" % p.stdout
    return int(m.group(1)), m.group(2)


def line_of(text, prefix):
    return [i for i, l in enumerate(text.splitlines(), 1) if l.startswith(prefix)][0]


@pytest.fixture
def garbage(tmp_path):
    path = tmp_path / "garbage.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n"
                    "-----END CERTIFICATE-----\n")
    return str(path)


def test_key_not_matching_its_certificate_is_reported_at_the_key_line(stp_bin, pki, tmp_path):
    text = h.render_config({"hostname": "proxy.test"}, listener_conf(pki, key=pki.a.key),
                           [("up", {"address": "127.0.0.1:25"})])
    line, msg = error_line(stp_bin, tmp_path, text)
    assert line == line_of(text, "key = "), msg
    assert "does not match" in msg, msg


@pytest.mark.parametrize("key", ["cert", "key", "client_ca"])
def test_unreadable_listener_material_is_reported_at_its_line(stp_bin, pki, tmp_path,
                                                             garbage, key):
    extra = {key: garbage}
    if key == "client_ca":
        extra["verify_client"] = "optional"
    text = h.render_config({"hostname": "proxy.test"}, listener_conf(pki, **extra),
                           [("up", {"address": "127.0.0.1:25"})])
    line, msg = error_line(stp_bin, tmp_path, text)
    assert line == line_of(text, key + " = "), msg


def test_bad_ciphers_are_reported_at_the_ciphers_line(stp_bin, pki, tmp_path):
    text = h.render_config({"hostname": "proxy.test"},
                           listener_conf(pki, ciphers="NO-SUCH-CIPHER"),
                           [("up", {"address": "127.0.0.1:25"})])
    line, msg = error_line(stp_bin, tmp_path, text)
    assert line == line_of(text, "ciphers = "), msg


def test_sni_pair_not_matching_is_reported_at_its_line(stp_bin, pki, tmp_path):
    text = h.render_config({"hostname": "proxy.test"},
                           listener_conf(pki, **{"sni.a.test": "%s %s" % (pki.a.cert,
                                                                          pki.b.key)}),
                           [("up", {"address": "127.0.0.1:25"})])
    line, msg = error_line(stp_bin, tmp_path, text)
    assert line == line_of(text, "sni.a.test = "), msg


@pytest.mark.parametrize("key", ["key", "ca_file"])
def test_upstream_material_is_reported_at_its_line(stp_bin, pki, tmp_path, garbage, key):
    up = {"address": "127.0.0.1:25", "tls": "implicit", "cert": pki.proxy_client.cert,
          "key": pki.proxy_client.key, "ca_file": pki.ca.cert}
    up[key] = pki.a.key if key == "key" else garbage
    text = h.render_config({"hostname": "proxy.test"}, listener_conf(pki), [("up", up)])
    line, msg = error_line(stp_bin, tmp_path, text)
    # the line in [upstream up], not the listener's key line
    assert line == max(i for i, l in enumerate(text.splitlines(), 1)
                       if l.startswith(key + " = ")), msg


# --- min_version = 1.0: the recipe in the README -----------------------------------------------


@pytest.fixture
def tls_1_0(stp_bin, pki, tmp_path):
    """Skip where wolfSSL was built without TLS 1.0 (Debian's: -t says so)."""
    text = h.render_config({"hostname": "proxy.test"}, listener_conf(pki, min_version="1.0"),
                           [("up", {"address": "127.0.0.1:25"})])
    p = h.check_config(stp_bin, str(tmp_path / "tls10"), text)
    if "not available in this wolfSSL build" in p.stdout:
        pytest.skip("this wolfSSL has no TLS 1.0")
    assert p.returncode == 0, p.stdout


def test_tls_1_0_device_gets_a_cbc_suite_and_smtp_works(make_proxy, aio, pki, tls_1_0):
    """The README's recipe: min_version = 1.0 and nothing else."""
    proxy = make_proxy(aio, min_version="1.0", cert=pki.proxy.cert, key=pki.proxy.key)
    talk = b"EHLO printer.test\nMAIL FROM:<p@example.org>\nRCPT TO:<a@example.net>\nDATA\n" \
           b"Subject: tls1.0\n\nscan\n.\nQUIT\n"
    rc, out = h.s_client(proxy.port, "-tls1", "-cipher", "DEFAULT@SECLEVEL=0", "-ign_eof",
                         stdin=talk, starttls=True)
    assert re.search(r"^New, TLSv1\.0, Cipher is ECDHE-ECDSA-AES(128|256)-SHA$", out, re.M), out
    assert "\n221 " in out, out
    assert aio.wait_messages(1)[-1]["original_content"].endswith(b"scan\r\n")


def test_tls_1_2_client_on_a_tls_1_0_listener_still_gets_aead(make_proxy, scripted, pki,
                                                              tls_1_0):
    proxy = make_proxy(scripted, min_version="1.0", cert=pki.proxy.cert, key=pki.proxy.key)
    # OpenSSL's default list offers CBC suites too: the server's order wins
    rc, out = h.s_client(proxy.port, "-tls1_2", "-cipher", "DEFAULT@SECLEVEL=0",
                         stdin=b"QUIT\n", starttls=True)
    assert re.search(r"^New, TLSv1\.2, Cipher is ECDHE-ECDSA-(AES128-GCM-SHA256|"
                     r"AES256-GCM-SHA384|CHACHA20-POLY1305)$", out, re.M), out


# --- groups apply to TLS 1.2's ECDHE curve -------------------------------------------------------


def implicit_proxy(make_proxy, upstream, pki, **kw):
    return make_proxy(upstream, tls="implicit", cert=pki.proxy.cert, key=pki.proxy.key, **kw)


def test_tls_1_2_client_offering_only_other_curves_is_refused(make_proxy, scripted, pki):
    proxy = implicit_proxy(make_proxy, scripted, pki, groups="P-384")
    rc, out = h.s_client(proxy.port, "-tls1_2", "-groups", "P-256")
    assert not re.search(r"^New, TLSv1\.2, Cipher is (?!\(NONE\))", out, re.M), out
    assert "Server Temp Key" not in out, out
    # Python's ssl, one curve
    ctx = h.client_tls_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ecdh_curve("prime256v1")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c, _ = h.open_implicit(proxy.port, ctx, timeout=5)
        c.close()
    assert proxy.events("tls_error"), proxy.log_tail()


def test_tls_1_2_client_offering_one_of_the_groups_gets_it(make_proxy, scripted, pki):
    proxy = implicit_proxy(make_proxy, scripted, pki, groups="P-384:X25519")
    rc, out = h.s_client(proxy.port, "-tls1_2", "-groups", "P-256:P-521:P-384",
                         stdin=b"QUIT\n")
    assert re.search(r"^Server Temp Key: ECDH, (secp384r1|P-384)", out, re.M), out
    ctx = h.client_tls_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    c, _ = h.open_implicit(proxy.port, ctx)
    with c:
        assert c.sock.version() == "TLSv1.2"
        c.expect("QUIT", 221)


def test_upstream_groups_apply_to_tls_1_2(make_proxy, make_aio, pki):
    """The upstream leg shares the code: an upstream that can only do P-256
    in TLS 1.2 is refused by groups = P-384."""
    sctx = h.server_tls_context(pki.upstream, maximum=ssl.TLSVersion.TLSv1_2)
    sctx.set_ecdh_curve("prime256v1")
    up = make_aio(ssl_context=sctx)
    proxy = make_proxy(up, upstream_opts={"tls": "implicit", "ca_file": pki.ca.cert,
                                          "server_name": "upstream.test", "groups": "P-384"})
    with h.SmtpConn(proxy.port, timeout=10) as c:
        r = c.read_reply()
        assert r.code == 421 and "4.7.0" in r.text, r.raw
    assert up.sessions() == []


# --- a ClientHello in many small records ---------------------------------------------------------


def refragment(data, size):
    """The TLS records in DATA re-split into records of at most SIZE bytes."""
    out, pos = b"", 0
    while pos < len(data):
        head, n = data[pos:pos + 3], int.from_bytes(data[pos + 3:pos + 5], "big")
        body, pos = data[pos + 5:pos + 5 + n], pos + 5 + n
        for k in range(0, len(body), size):
            chunk = body[k:k + size]
            out += head + len(chunk).to_bytes(2, "big") + chunk
    return out


class BioConn:
    """TLS over a raw socket through Python's MemoryBIO, so the test decides
    how the first flight is cut into records."""

    def __init__(self, port, ctx, hello_record_size):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="proxy.test")
        self._step(lambda: self.obj.do_handshake(),
                   lambda data: refragment(data, hello_record_size))

    def _step(self, op, first=lambda data: data):
        while True:
            try:
                result = op()
            except ssl.SSLWantReadError:
                result = None
            else:
                self._flush(first)
                return result
            self._flush(first)
            first = lambda data: data  # noqa: E731 - only the first flight
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the proxy")
            self.inc.write(data)

    def _flush(self, transform):
        data = self.out.read()
        if data:
            self.sock.sendall(transform(data))

    def read(self):
        return self._step(lambda: self.obj.read(65536))

    def write(self, data):
        self.obj.write(data)
        self._flush(lambda d: d)

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_client_hello_in_tiny_records_is_accepted(make_proxy, scripted, pki, size, version):
    proxy = implicit_proxy(make_proxy, scripted, pki)
    ctx = h.client_tls_context()
    ctx.maximum_version = version
    c = BioConn(proxy.port, ctx, size)
    try:
        assert c.read().startswith(b"220 "), "no greeting"
        c.write(b"QUIT\r\n")
        assert c.read().startswith(b"221 ")
    finally:
        c.close()
    # the server name came out of the reassembled ClientHello
    assert proxy.wait_event("tls").get("sni") == "proxy.test", proxy.log_tail()


# --- the client certificate of a resumed session ----------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_resumed_session_keeps_the_verified_client_certificate(make_proxy, make_aio, pki,
                                                               version):
    up = make_aio(proxy_protocol_timeout=5)
    proxy = implicit_proxy(make_proxy, up, pki, client_ca=pki.client_ca.cert,
                           verify_client="require",
                           upstream_opts={"client_identity": "proxy-v2"})
    ctx = h.client_tls_context()
    ctx.maximum_version = version
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    reused, sess, tlv, ev = h.cert_session(proxy, up, ctx)
    assert not reused
    # full handshake: PP2_CLIENT_SSL | CERT_CONN | CERT_SESS, verified
    assert tlv.get("SSL_CLIENT") == 0x07 and tlv.get("SSL_VERIFY") == 0, tlv
    assert tlv.get("SSL_CN") == b"client.test", tlv
    for _ in range(2):
        reused, sess, tlv, ev = h.cert_session(proxy, up, ctx, sess)
        assert reused, "not resumed"
        # resumed: the certificate came with the session, not this connection
        assert tlv.get("SSL_CLIENT") == 0x05 and tlv.get("SSL_VERIFY") == 0, tlv
        assert tlv.get("SSL_CN") == b"client.test", tlv
        assert "client.test" in ev.get("client_cert", ""), ev["_line"]


def test_resumed_session_without_certificate_reports_none(make_proxy, make_aio, pki):
    up = make_aio(proxy_protocol_timeout=5)
    proxy = implicit_proxy(make_proxy, up, pki, client_ca=pki.client_ca.cert,
                           verify_client="optional",
                           upstream_opts={"client_identity": "proxy-v2"})
    ctx = h.client_tls_context()
    _, sess, _, _ = h.cert_session(proxy, up, ctx)
    reused, _, tlv, ev = h.cert_session(proxy, up, ctx, sess)
    assert reused
    assert tlv.get("SSL_CLIENT") == 0x01 and "SSL_CN" not in tlv, tlv
    assert "client_cert" not in ev, ev["_line"]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_a_ticket_resumes_only_under_the_server_name_it_was_issued_for(make_proxy, scripted,
                                                                        pki, version):
    """RFC 6066 section 3: a session is not resumed under another server
    name (its certificate was never presented for that name)."""
    proxy = implicit_proxy(make_proxy, scripted, pki, **{"sni.a.test": pki.a.conf(),
                                                         "sni.b.test": pki.b.conf()})
    ctx = h.client_tls_context()
    ctx.maximum_version = version

    def session(name, sess=None):
        c, _ = h.open_implicit(proxy.port, ctx, server_hostname=name, session=sess)
        with c:
            c.expect("NOOP", 250)   # a TLS 1.3 ticket is in by now
            out = (c.sock.session_reused, c.sock.session)
            c.expect("QUIT", 221)
        return out

    _, sess = session("a.test")
    reused, _ = session("b.test", sess)
    assert not reused, "a ticket for a.test resumed under b.test"
    reused, _ = session("A.Test", sess)
    assert reused, "the name is compared without case"


# --- what the upstream's certificate must say ---------------------------------------------------


def leaf(pki, name, cn, ext):
    """A certificate for CN signed by the test CA with the extensions EXT
    (openssl x509 -extfile lines)."""
    key, csr = pki._csr(name, cn)
    cert = os.path.join(pki.dir, name + ".pem")
    extfile = os.path.join(pki.dir, name + ".ext")
    with open(extfile, "w") as f:
        f.write("\n".join(ext) + "\n")
    pki._serial += 1
    pki._run("x509", "-req", "-in", csr, "-CA", pki.ca.cert, "-CAkey", pki.ca.key,
             "-set_serial", str(pki._serial), "-days", "30", "-sha256", "-extfile", extfile,
             "-out", cert)
    return h.CertPair(name, cert, key, cn)


def upstream_outcome(make_proxy, make_aio, pki, pair, server_name):
    """Relay one session to an implicit-TLS upstream presenting PAIR; returns
    the reply code the client got first (220: relayed, 421: refused)."""
    up = make_aio(ssl_context=h.server_tls_context(pair))
    uopts = {"tls": "implicit", "ca_file": pki.ca.cert}
    if server_name:
        uopts["server_name"] = server_name
    proxy = make_proxy(up, upstream_opts=uopts)
    with h.SmtpConn(proxy.port, timeout=10) as c:
        code = c.read_reply().code
    return code, proxy, up


def test_ip_server_name_needs_an_ip_subject_alt_name(make_proxy, make_aio, pki):
    """CN=127.0.0.1 without a subjectAltName does not name the address."""
    cn_only = leaf(pki, "cn-ip", "127.0.0.1",
                   ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature",
                    "extendedKeyUsage=serverAuth"])
    code, proxy, up = upstream_outcome(make_proxy, make_aio, pki, cn_only, None)
    assert code == 421, proxy.log_tail()
    assert "iPAddress" in proxy.log_text(), proxy.log_tail()
    assert up.sessions() == []


def test_ip_server_name_matches_an_ip_subject_alt_name(make_proxy, make_aio, pki):
    code, proxy, _ = upstream_outcome(make_proxy, make_aio, pki, pki.upstream, None)
    assert code == 220, proxy.log_tail()


def test_upstream_leaf_that_may_not_sign_is_refused(make_proxy, make_aio, pki):
    ca_only = leaf(pki, "ku-certsign", "upstream.test",
                   ["basicConstraints=CA:FALSE", "keyUsage=critical,keyCertSign",
                    "extendedKeyUsage=serverAuth", "subjectAltName=DNS:upstream.test"])
    code, proxy, up = upstream_outcome(make_proxy, make_aio, pki, ca_only, "upstream.test")
    assert code == 421, proxy.log_tail()
    assert "key usage" in proxy.log_text(), proxy.log_tail()
    assert up.sessions() == []


def test_tls_1_2_session_id_resumption_never_loses_the_certificate(make_proxy, make_aio, pki):
    """A client without tickets offers its session ID: wolfSSL's session
    cache would resume it without the certificate, so such a listener does
    a full handshake instead."""
    up = make_aio(proxy_protocol_timeout=5)
    proxy = implicit_proxy(make_proxy, up, pki, client_ca=pki.client_ca.cert,
                           verify_client="require",
                           upstream_opts={"client_identity": "proxy-v2"})
    ctx = h.client_tls_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_TICKET
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    _, sess, _, _ = h.cert_session(proxy, up, ctx)
    assert not sess.has_ticket
    reused, _, tlv, ev = h.cert_session(proxy, up, ctx, sess)
    assert not reused
    assert tlv.get("SSL_CLIENT") == 0x07 and tlv.get("SSL_CN") == b"client.test", tlv
    assert "client.test" in ev.get("client_cert", ""), ev["_line"]
