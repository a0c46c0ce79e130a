"""TLS policy: versions, ciphers and groups on listeners and upstreams, SNI
certificates and client certificates. test_tls_params.py covers the defaults
of a STARTTLS listener; here the same defaults on an implicit listener and on
the upstream leg, and every key that changes them."""

import os
import re
import socket
import ssl
import subprocess

import pytest

import stp_harness as h

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def tls_proxy(make_proxy, pki):
    """make_proxy with an implicit listener and the CA-signed proxy.test cert."""
    def make(upstream, upstream_opts=None, **kw):
        opts = {"tls": "implicit", "cert": pki.proxy.cert, "key": pki.proxy.key}
        opts.update(kw)
        return make_proxy(upstream, upstream_opts=upstream_opts, **opts)
    return make


def client_ctx(minimum=None, maximum=None, ciphers=None, cert=None):
    ctx = h.limit_tls(h.client_tls_context(), minimum, maximum, ciphers)
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def refused(port, ctx, server_hostname="proxy.test"):
    """Try an implicit-TLS session; returns None when no greeting ever came
    (handshake failure, alert, close), else the greeting it got."""
    c = h.SmtpConn(port, timeout=5)
    try:
        c.starttls(ctx, server_hostname=server_hostname)
        return c.read_reply()
    except (ssl.SSLError, ConnectionError, EOFError, socket.timeout, OSError):
        return None
    finally:
        c.close()


def still_serving(proxy):
    c, _ = h.open_implicit(proxy.port)
    with c:
        c.expect("QUIT", 221)


def s_client_ok(out):
    return bool(re.search(r"^New, TLSv1\.[0-3], Cipher is (?!\(NONE\))", out, re.M))


# --- defaults on an implicit listener ------------------------------------------------


def test_implicit_listener_refuses_tls_1_0_and_1_1_by_default(tls_proxy, scripted):
    proxy = tls_proxy(scripted)
    for v in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        g = refused(proxy.port, client_ctx(v, v, "DEFAULT:@SECLEVEL=0"))
        assert g is None, "%s accepted: %r" % (v, g)
    still_serving(proxy)


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"])
def test_implicit_listener_refuses_cbc_ciphers_by_default(tls_proxy, scripted, cipher):
    proxy = tls_proxy(scripted)
    v = ssl.TLSVersion.TLSv1_2
    assert refused(proxy.port, client_ctx(v, v, cipher + ":@SECLEVEL=0")) is None


def test_default_groups_are_x25519_p256_p384(tls_proxy, scripted):
    proxy = tls_proxy(scripted)
    for group, ok in (("X25519", True), ("P-256", True), ("P-384", True), ("P-521", False),
                      ("X448", False)):
        rc, out = h.s_client(proxy.port, "-groups", group, "-servername", "proxy.test")
        assert s_client_ok(out) == ok, "group %s: %s" % (group, out[-600:])


# --- versions ----------------------------------------------------------------------------


def test_min_version_1_3_refuses_a_tls_1_2_client(tls_proxy, scripted):
    proxy = tls_proxy(scripted, min_version="1.3")
    v12 = ssl.TLSVersion.TLSv1_2
    assert refused(proxy.port, client_ctx(v12, v12)) is None
    c, _ = h.open_implicit(proxy.port, client_ctx(ssl.TLSVersion.TLSv1_3))
    with c:
        assert c.sock.version() == "TLSv1.3"
        c.expect("QUIT", 221)


def test_max_version_1_2_refuses_a_tls_1_3_only_client(tls_proxy, scripted):
    proxy = tls_proxy(scripted, max_version="1.2")
    assert refused(proxy.port, client_ctx(ssl.TLSVersion.TLSv1_3)) is None
    c, _ = h.open_implicit(proxy.port)
    with c:
        assert c.sock.version() == "TLSv1.2"
        c.expect("QUIT", 221)


def test_min_version_1_3_on_a_starttls_listener(make_proxy, scripted, pki):
    proxy = make_proxy(scripted, min_version="1.3", cert=pki.proxy.cert, key=pki.proxy.key)
    v12 = ssl.TLSVersion.TLSv1_2
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            c.starttls(client_ctx(v12, v12))
            c.cmd("EHLO client.test")


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_old_tls_device_bridges_to_a_tls_1_3_upstream(tls_proxy, make_aio, pki, stp_bin,
                                                      tmp_path, version):
    """A device that only speaks TLS 1.0/1.1 on a private listener, the
    upstream leg TLS 1.3 only. If this wolfSSL cannot do the old version,
    -t must say so clearly instead."""
    legacy_ciphers = "ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-ECDSA-AES128-GCM-SHA256"
    text = h.render_config(
        {"hostname": "proxy.test"},
        [("legacy", {"listen": "127.0.0.1:0", "tls": "implicit",
                     "cert": pki.proxy.cert, "key": pki.proxy.key, "min_version": version,
                     "ciphers": legacy_ciphers, "upstream": "up"})],
        [("up", {"address": "127.0.0.1:25"})])
    p = h.check_config(stp_bin, str(tmp_path / "check"), text)
    if p.returncode != 0:
        # not available in this build: a FILE:LINE error about the version
        assert re.search(r"^%s:\d+: .*" % re.escape(p.config_path), p.stdout, re.M), p.stdout
        assert "min_version" in p.stdout or version in p.stdout, p.stdout
        return
    up_ctx = h.server_tls_context(pki.upstream, minimum=ssl.TLSVersion.TLSv1_3)
    up = make_aio(ssl_context=up_ctx)
    proxy = tls_proxy(up, upstream_opts={"tls": "implicit", "ca_file": pki.ca.cert,
                                         "server_name": "upstream.test"},
                      min_version=version, ciphers=legacy_ciphers)
    v = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1}[version]
    ctx = client_ctx(v, v, "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")
    msg = h.sample_message("tls" + version)
    try:
        c, _ = h.open_implicit(proxy.port, ctx)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        pytest.fail("-t accepts min_version = %s but a TLS %s client cannot connect: %r\n%s"
                    % (version, version, e, proxy.log_tail(10)))
    with c:
        assert c.sock.version() == {"1.0": "TLSv1", "1.1": "TLSv1.1"}[version]
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    assert env["tls"]["version"] == "TLSv1.3"


# --- ciphers and groups ---------------------------------------------------------------------


def test_ciphers_restrict_the_tls_1_2_suites_s_client_can_negotiate(tls_proxy, scripted):
    proxy = tls_proxy(scripted, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:TLS13-AES256-GCM-SHA384")
    rc, out = h.s_client(proxy.port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert not s_client_ok(out), out[-800:]
    rc, out = h.s_client(proxy.port, "-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305")
    assert not s_client_ok(out), out[-800:]
    rc, out = h.s_client(proxy.port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384")
    assert s_client_ok(out), out[-800:]
    assert "Cipher is ECDHE-ECDSA-AES256-GCM-SHA384" in out, out[-800:]


def test_ciphers_restrict_the_tls_1_3_suites_s_client_can_negotiate(tls_proxy, scripted):
    proxy = tls_proxy(scripted, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384:TLS13-AES256-GCM-SHA384")
    rc, out = h.s_client(proxy.port, "-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256")
    assert not s_client_ok(out), out[-800:]
    rc, out = h.s_client(proxy.port, "-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384")
    assert s_client_ok(out), out[-800:]
    assert "Cipher is TLS_AES_256_GCM_SHA384" in out, out[-800:]


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_groups_restrict_the_key_exchange(tls_proxy, scripted, version):
    proxy = tls_proxy(scripted, groups="P-384")
    rc, out = h.s_client(proxy.port, version, "-groups", "X25519")
    assert not s_client_ok(out), out[-800:]
    # the client prefers P-256 (and in TLS 1.2 needs it for the P-256
    # certificate, RFC 8422): the server must pick P-384 all the same
    rc, out = h.s_client(proxy.port, version, "-groups", "P-256:P-384")
    assert s_client_ok(out), out[-800:]
    temp = re.search(r"Server Temp Key: .*", out)
    assert temp and re.search(r"ECDH, (secp384r1|P-384)", temp.group(0)), \
        "groups = P-384 but %s" % (temp.group(0) if temp else out[-800:])


# --- SNI ----------------------------------------------------------------------------------


@pytest.fixture
def sni_proxy(tls_proxy, scripted, pki):
    return tls_proxy(scripted, **{"sni.a.test": pki.a.conf(), "sni.b.test": pki.b.conf(),
                                  "sni.*.example.org": pki.wild.conf()})


@pytest.mark.parametrize("name,cn", [
    ("a.test", "a.test"),
    ("b.test", "b.test"),
    ("unknown.test", "proxy.test"),              # no match: the default certificate
    ("mail.example.org", "*.example.org"),       # the wildcard matches one label
    ("deep.mail.example.org", "proxy.test"),     # ... and only one
])
def test_sni_selects_the_certificate(sni_proxy, name, cn):
    rc, out = h.s_client(sni_proxy.port, "-servername", name)
    assert s_client_ok(out), out[-800:]
    assert h.peer_cn(out) == cn, out[-1500:]


def test_no_sni_gets_the_default_certificate(sni_proxy):
    rc, out = h.s_client(sni_proxy.port, "-noservername")
    assert s_client_ok(out), out[-800:]
    assert h.peer_cn(out) == "proxy.test", out[-1500:]


def test_sni_on_a_starttls_listener(make_proxy, scripted, pki):
    proxy = make_proxy(scripted, cert=pki.proxy.cert, key=pki.proxy.key,
                       **{"sni.b.test": pki.b.conf()})
    rc, out = h.s_client(proxy.port, "-servername", "b.test", starttls=True)
    assert s_client_ok(out), out[-800:]
    assert h.peer_cn(out) == "b.test", out[-1500:]
    rc, out = h.s_client(proxy.port, "-servername", "x.test", starttls=True)
    assert h.peer_cn(out) == "proxy.test", out[-1500:]


def test_posttls_finger_verifies_the_sni_certificate(sni_proxy, pki, tmp_path):
    finger = h.require_program("posttls-finger", "postfix", paths=["/usr/sbin/posttls-finger"])
    (tmp_path / "main.cf").write_text("")
    env = dict(os.environ, MAIL_CONFIG=str(tmp_path))
    for name in ("a.test", "b.test"):
        p = subprocess.run([finger, "-c", "-w", "-l", "secure", "-F", pki.ca.cert, "-s", name,
                            "[127.0.0.1]:%d" % sni_proxy.port, name],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30, env=env)
        out = p.stdout.decode("utf-8", "replace")
        assert re.search(r"Verified TLS connection established to .*: TLSv1\.[23]", out), out
        assert "subject_CN=%s" % name in out, out


@pytest.mark.parametrize("with_sni_keys", [True, False], ids=["sni-keys", "no-sni-keys"])
def test_the_client_server_name_is_logged(tls_proxy, scripted, pki, with_sni_keys):
    keys = {"sni.a.test": pki.a.conf()} if with_sni_keys else {}
    proxy = tls_proxy(scripted, **keys)
    for name in ("a.test", "unknown.test"):
        c, _ = h.open_implicit(proxy.port, server_hostname=name)
        with c:
            sid = proxy.session_id_for(c.sock)
            c.expect("QUIT", 221)
        ev = proxy.wait_event("tls", id=sid)
        assert ev.get("sni") == name, ev["_line"]


# --- client certificates ---------------------------------------------------------------------


@pytest.fixture
def cert_proxy(tls_proxy, make_aio, pki):
    def make(mode, **kw):
        up = make_aio()
        p = tls_proxy(up, client_ca=pki.client_ca.cert, verify_client=mode, **kw)
        return p, up
    return make


def deliver_over(proxy, up, ctx, tag):
    msg = h.sample_message(tag)
    c, _ = h.open_implicit(proxy.port, ctx)
    with c:
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    assert up.wait_messages(1)[-1]["original_content"] == msg


def test_verify_client_require_refuses_a_client_without_certificate(cert_proxy):
    proxy, up = cert_proxy("require")
    assert refused(proxy.port, client_ctx()) is None
    assert up.sessions() == []


def test_verify_client_require_refuses_a_certificate_from_another_ca(cert_proxy, pki):
    proxy, up = cert_proxy("require")
    assert refused(proxy.port, client_ctx(cert=pki.client_other)) is None
    assert up.sessions() == []


def test_verify_client_require_accepts_a_certificate_from_client_ca(cert_proxy, pki):
    proxy, up = cert_proxy("require")
    deliver_over(proxy, up, client_ctx(cert=pki.client), "client-cert")


def test_verify_client_require_on_a_starttls_listener(make_proxy, aio, pki):
    proxy = make_proxy(aio, cert=pki.proxy.cert, key=pki.proxy.key,
                       client_ca=pki.client_ca.cert, verify_client="require")
    c = h.SmtpConn(proxy.port)
    with c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, EOFError)):
            c.starttls(client_ctx())
            c.cmd("EHLO client.test")
    c, _ = h.open_session(proxy.port, tls=False)
    with c:
        c.expect("STARTTLS", 220)
        c.starttls(client_ctx(cert=pki.client))
        c.expect("EHLO client.test", 250)
        h.send_message(c, b"Subject: starttls client cert\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    aio.wait_messages(1)


def test_verify_client_optional_accepts_a_client_without_certificate(cert_proxy):
    proxy, up = cert_proxy("optional")
    deliver_over(proxy, up, client_ctx(), "no-client-cert")


def test_verify_client_optional_refuses_a_certificate_that_does_not_verify(cert_proxy, pki):
    proxy, up = cert_proxy("optional")
    assert refused(proxy.port, client_ctx(cert=pki.client_other)) is None
    assert up.sessions() == []


def test_verify_client_optional_accepts_and_logs_a_good_certificate(cert_proxy, pki):
    proxy, up = cert_proxy("optional")
    c, _ = h.open_implicit(proxy.port, client_ctx(cert=pki.client))
    with c:
        sid = proxy.session_id_for(c.sock)
        h.send_message(c, b"Subject: logged\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    up.wait_messages(1)
    ev = proxy.wait_event("tls", id=sid)
    assert "client.test" in ev["_line"], ev["_line"]


@pytest.mark.parametrize("mode", ["optional", "require"])
def test_verify_client_without_client_ca_is_a_config_error(stp_bin, pki, tmp_path, mode):
    text = h.render_config(
        {"hostname": "proxy.test"},
        [("main", {"listen": "127.0.0.1:0", "tls": "implicit",
                   "cert": pki.proxy.cert, "key": pki.proxy.key, "verify_client": mode,
                   "upstream": "up"})],
        [("up", {"address": "127.0.0.1:25"})])
    p = h.check_config(stp_bin, str(tmp_path), text)
    assert p.returncode != 0, p.stdout
    assert re.search(r"^%s:\d+: .*client_ca" % re.escape(p.config_path), p.stdout, re.M), p.stdout


@pytest.mark.parametrize("key,value", [
    ("min_version", "0.9"), ("max_version", "1.4"), ("verify_client", "maybe"),
    ("sni.a.test", "/nonexistent/a.pem /nonexistent/a.key"), ("ciphers", "NO-SUCH-CIPHER"),
    ("groups", "P-999"),
])
def test_bad_listener_tls_values_are_config_errors(stp_bin, pki, tmp_path, key, value):
    text = h.render_config(
        {"hostname": "proxy.test"},
        [("main", {"listen": "127.0.0.1:0", "tls": "implicit",
                   "cert": pki.proxy.cert, "key": pki.proxy.key, key: value,
                   "upstream": "up"})],
        [("up", {"address": "127.0.0.1:25"})])
    p = h.check_config(stp_bin, str(tmp_path), text)
    assert p.returncode != 0, p.stdout
    lines = text.splitlines()
    line = lines.index("%s = %s" % (key, value)) + 1
    section = lines.index("[listener main]") + 1
    m = re.search(r"^%s:(\d+): (.*)" % re.escape(p.config_path), p.stdout, re.M)
    assert m, "no FILE:LINE: error:\n%s" % p.stdout
    # the key's own line; values only checked when the TLS context is built
    # may point at the section, but must then quote the value
    assert int(m.group(1)) == line or (int(m.group(1)) == section and value in m.group(2)), \
        "expected an error at line %d:\n%s" % (line, p.stdout)


# --- the upstream leg -----------------------------------------------------------------------------


def upstream_refused(make_proxy, up, pki, **uopts):
    opts = {"tls": "implicit", "ca_file": pki.ca.cert, "server_name": "upstream.test"}
    opts.update(uopts)
    proxy = make_proxy(up, upstream_opts=opts)
    with h.SmtpConn(proxy.port, timeout=10) as c:
        r = c.read_reply()
        assert r.code == 421 and "4.7.0" in r.text, "%r\n%s" % (r.raw, proxy.log_tail(10))
        c.read_until_closed(timeout=5)
    conn = up.wait_conns(1)[0]
    assert conn.closed.wait(5)
    assert conn.handshake != "ok" and conn.tls_lines() == [], (conn.handshake, conn.lines)


def test_upstream_defaults_refuse_a_tls_1_1_upstream(make_proxy, make_raw, pki):
    v = ssl.TLSVersion.TLSv1_1
    ctx = h.server_tls_context(pki.upstream, minimum=v, maximum=v, ciphers="DEFAULT:@SECLEVEL=0")
    upstream_refused(make_proxy, make_raw(tls="implicit", ssl_context=ctx), pki)


def test_upstream_defaults_refuse_a_cbc_only_upstream(make_proxy, make_raw, pki):
    v = ssl.TLSVersion.TLSv1_2
    ctx = h.server_tls_context(pki.upstream, minimum=v, maximum=v,
                               ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    upstream_refused(make_proxy, make_raw(tls="implicit", ssl_context=ctx), pki)


def test_upstream_min_version_1_3_refuses_a_tls_1_2_upstream(make_proxy, make_raw, pki):
    v = ssl.TLSVersion.TLSv1_2
    ctx = h.server_tls_context(pki.upstream, minimum=v, maximum=v)
    upstream_refused(make_proxy, make_raw(tls="implicit", ssl_context=ctx), pki,
                     min_version="1.3")


def test_upstream_max_version_and_ciphers_choose_what_is_negotiated(make_proxy, make_aio, pki):
    up = make_aio(ssl_context=h.server_tls_context(pki.upstream))
    proxy = make_proxy(up, upstream_opts={
        "tls": "implicit", "ca_file": pki.ca.cert, "server_name": "upstream.test",
        "max_version": "1.2", "ciphers": "ECDHE-ECDSA-AES256-GCM-SHA384"})
    c, _ = h.open_session(proxy.port)
    with c:
        h.send_message(c, b"Subject: pinned\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    env = up.wait_messages(1)[0]
    assert env["tls"] == {"version": "TLSv1.2", "cipher": "ECDHE-ECDSA-AES256-GCM-SHA384"}, env
