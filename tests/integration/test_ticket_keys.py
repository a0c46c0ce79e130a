"""[proxy] ticket_keys = FILE: processes (replicas) sharing one key file resume
each other's TLS sessions, on STARTTLS and implicit-TLS listeners, TLS 1.3 and
1.2, with Python's ssl and `openssl s_client -sess_out / -sess_in`. SIGHUP
reads the file again (rotation: a new first line seals, the old line still
opens); a malformed file is a FILE:LINE error at start and a refused reload;
a process without the file never resumes the others' tickets, and a ticket
never carries a client certificate to another process."""

import base64
import os
import re
import ssl

import pytest

import stp_harness as h
import hardening_util as hu
from test_resumption import client_ctx, implicit_session, starttls_session

TLS_VERSIONS = [(None, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")]


def new_key():
    return base64.b64encode(os.urandom(80)).decode()


def write_keys(path, *keys, mode=0o600):
    with open(path, "w") as f:
        f.write("".join(k + "\n" for k in keys))
    os.chmod(path, mode)
    return str(path)


@pytest.fixture
def keyfile(tmp_path):
    return write_keys(tmp_path / "ticket-keys.txt", new_key())


@pytest.fixture
def replicas(make_proxy, scripted, keyfile):
    """Two daemons with the same configuration and ticket key file, two
    workers each (they share the keys: TSan runs this suite)."""
    def make(**listener):
        return [make_proxy(scripted, proxy_opts={"ticket_keys": keyfile, "workers": "2"},
                           **listener)
                for _ in range(2)]
    return make


def reload_ok(proxy):
    evs = hu.reload(proxy)
    assert hu.reload_status(evs) == "ok", proxy.log_tail()


@pytest.mark.parametrize("max_version,want", TLS_VERSIONS)
def test_starttls_replicas_resume_each_others_sessions(replicas, max_version, want):
    a, b = replicas()
    ctx = client_ctx(max_version)
    reused, version, sess = starttls_session(a.port, ctx)
    assert version == want and not reused and sess.has_ticket
    reused, version, sess = starttls_session(b.port, ctx, sess)
    assert version == want and reused, "B did not resume A's session"
    reused, _, _ = starttls_session(a.port, ctx, sess)
    assert reused, "A did not resume the session B issued"
    for p in (a, b):
        assert not p.events("tls_error"), p.log_tail()


@pytest.mark.parametrize("max_version,want", TLS_VERSIONS)
def test_implicit_tls_replicas_resume_each_others_sessions(replicas, max_version, want):
    a, b = replicas(tls="implicit")
    ctx = client_ctx(max_version)
    reused, _, sess = implicit_session(a.port, ctx)
    assert not reused and sess.has_ticket
    reused, version, sess = implicit_session(b.port, ctx, sess)
    assert reused and version == want, "B did not resume A's session"
    assert implicit_session(a.port, ctx, sess)[0], "A did not resume B's"


def test_openssl_session_saved_on_one_replica_is_reused_on_the_other(replicas, tmp_path):
    a, b = replicas()
    talk = b"EHLO client.test\nQUIT\n"
    for version in ("-tls1_3", "-tls1_2"):
        sess = str(tmp_path / ("session%s.pem" % version))
        rc, out = h.s_client(a.port, version, "-servername", "proxy.test", "-ign_eof",
                             "-sess_out", sess, stdin=talk, starttls=True)
        assert rc == 0 and "New, TLSv1." in out, out
        rc, out = h.s_client(b.port, version, "-servername", "proxy.test", "-ign_eof",
                             "-sess_in", sess, stdin=talk, starttls=True)
        assert rc == 0 and "Reused, TLSv1." in out, out
        assert "\n221 " in out, out


def test_rotation_with_sighup(make_proxy, scripted, tmp_path):
    """A new first line seals, the old one kept second still opens: an old
    ticket resumes after the reload, a new one only where the new key is."""
    old, new = new_key(), new_key()
    path_a = write_keys(tmp_path / "a.keys", old)
    path_b = write_keys(tmp_path / "b.keys", old)
    a = make_proxy(scripted, proxy_opts={"ticket_keys": path_a})
    b = make_proxy(scripted, proxy_opts={"ticket_keys": path_b})
    ctx = client_ctx()
    _, _, old_sess = starttls_session(a.port, ctx)

    write_keys(path_a, new, old)
    reload_ok(a)
    assert starttls_session(a.port, ctx, old_sess)[0], "the old ticket after rotation"
    # A fresh full handshake on A: its ticket is sealed with the new key.
    new_ctx = client_ctx()
    reused, _, new_sess = starttls_session(a.port, new_ctx)
    assert not reused
    reused, _, _ = starttls_session(b.port, new_ctx, new_sess)
    assert not reused, "B resumed a ticket sealed with a key it does not have"
    assert not b.events("tls_error"), b.log_tail()

    write_keys(path_b, new, old)
    reload_ok(b)
    reused, _, _ = starttls_session(b.port, new_ctx, new_sess)
    assert reused, "B has the new key now"
    assert starttls_session(b.port, ctx, old_sess)[0], "and still the old one"

    # The old line dropped (after the ticket lifetime): old tickets no more.
    write_keys(path_b, new)
    reload_ok(b)
    assert not starttls_session(b.port, ctx, old_sess)[0]


def test_a_process_without_the_file_does_not_resume_the_others(make_proxy, scripted, keyfile):
    a = make_proxy(scripted, proxy_opts={"ticket_keys": keyfile})
    c = make_proxy(scripted)
    for max_version, want in TLS_VERSIONS:
        ctx = client_ctx(max_version)
        _, _, sess = starttls_session(a.port, ctx)
        reused, version, csess = starttls_session(c.port, ctx, sess)
        assert not reused and version == want, "a full handshake, and it works"
        # and the other way round
        assert not starttls_session(a.port, ctx, csess)[0]
    for p in (a, c):
        assert not p.events("tls_error"), p.log_tail()


def test_malformed_file_fails_the_check_at_its_line(stp_bin, tmp_path):
    bad = tmp_path / "keys.txt"
    bad.write_text(new_key() + "\n\n" + new_key()[:-8] + "\n")
    os.chmod(bad, 0o600)
    text = h.render_config({"hostname": "proxy.test", "ticket_keys": str(bad)},
                           [("main", {"listen": "127.0.0.1:0", "tls": "starttls",
                                      "upstream": "up"})],
                           [("up", {"address": "127.0.0.1:25"})])
    p = h.check_config(stp_bin, str(tmp_path), text)
    assert p.returncode != 0, p.stdout
    assert re.search(r"^%s:3: not 80 bytes of base64" % re.escape(str(bad)), p.stdout,
                     re.M), p.stdout
    # a missing file: at the config line of the key
    text = text.replace(str(bad), str(tmp_path / "missing.txt"))
    p = h.check_config(stp_bin, str(tmp_path), text)
    assert p.returncode != 0, p.stdout
    line = [i for i, l in enumerate(text.splitlines(), 1) if l.startswith("ticket_keys")][0]
    assert "%s:%d: cannot read ticket_keys" % (p.config_path, line) in p.stdout, p.stdout


def test_malformed_file_at_reload_keeps_the_old_keys(replicas, keyfile):
    a, b = replicas()
    ctx = client_ctx()
    _, _, sess = starttls_session(a.port, ctx)
    with open(keyfile) as f:
        good = f.read()
    with open(keyfile, "a") as f:
        f.write("not base64 at all\n")
    evs = hu.reload(a)
    assert hu.reload_status(evs) == "failed", a.log_tail()
    assert "%s:2: not 80 bytes of base64" % keyfile in evs[0].get("error", ""), evs
    # the old configuration keeps serving, its keys with it
    reused, _, sess = starttls_session(a.port, ctx, sess)
    assert reused
    assert starttls_session(b.port, ctx, sess)[0]
    with open(keyfile, "w") as f:
        f.write(good)
    reload_ok(a)
    assert starttls_session(a.port, ctx, sess)[0]


def test_key_file_readable_by_others_is_a_warning_and_never_logged(make_proxy, scripted,
                                                                    tmp_path):
    key = new_key()
    path = write_keys(tmp_path / "open.keys", key, mode=0o644)
    a = make_proxy(scripted, proxy_opts={"ticket_keys": path})
    warn = a.events("ticket_keys_mode")
    assert warn and warn[0].get("mode") == "0644", a.log_tail()
    starttls_session(a.port, client_ctx())
    os.chmod(path, 0o640)
    reload_ok(a)
    assert len(a.events("ticket_keys_mode")) == 1, a.log_tail()
    text = a.log_text()
    assert key not in text and key[:16] not in text


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLSv1.2", "TLSv1.3"])
def test_a_ticket_does_not_carry_the_client_certificate_across_processes(
        make_proxy, make_aio, pki, keyfile, version):
    up = make_aio(proxy_protocol_timeout=5)
    a, b = [make_proxy(up, tls="implicit", cert=pki.proxy.cert, key=pki.proxy.key,
                       client_ca=pki.client_ca.cert, verify_client="optional",
                       proxy_opts={"ticket_keys": keyfile},
                       upstream_opts={"client_identity": "proxy-v2"}) for _ in range(2)]
    ctx = h.client_tls_context()
    ctx.maximum_version = version
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    reused, sess, tlv, _ = h.cert_session(a, up, ctx)
    assert not reused
    # On A, the ticket resumes with the identity A verified (CERT_SESS only).
    reused, sess_a, tlv, ev = h.cert_session(a, up, ctx, sess)
    assert reused and tlv.get("SSL_CLIENT") == 0x05, tlv
    # On B: a full handshake, the certificate sent and verified again
    # (PP2_CLIENT_SSL | CERT_CONN | CERT_SESS), never resumed without it.
    reused, _, tlv, ev = h.cert_session(b, up, ctx, sess_a)
    assert not reused, "B resumed a ticket whose identity it never verified"
    assert tlv.get("SSL_CLIENT") == 0x07 and tlv.get("SSL_VERIFY") == 0, tlv
    assert tlv.get("SSL_CN") == b"client.test", tlv
    assert "client.test" in ev.get("client_cert", ""), ev["_line"]
    # Without a certificate, the same listeners do resume across processes.
    plain = h.client_tls_context()
    plain.maximum_version = version
    _, sess, _, _ = h.cert_session(a, up, plain)
    reused, _, tlv, ev = h.cert_session(b, up, plain, sess)
    assert reused and tlv.get("SSL_CLIENT") == 0x01, tlv
    assert "client_cert" not in ev, ev["_line"]


def test_listeners_do_not_open_each_others_tickets(make_proxy, scripted, keyfile):
    """One key for every listener: a ticket from a listener that asks for no
    certificate must not resume at another (its policy may require one)."""
    a = make_proxy(scripted, proxy_opts={"ticket_keys": keyfile},
                   extra_listeners=[("other", {"listen": "127.0.0.1:0", "tls": "starttls",
                                               "upstream": "up"})])
    ctx = client_ctx()
    _, _, sess = starttls_session(a.port, ctx)
    assert starttls_session(a.port, ctx, sess)[0]
    assert not starttls_session(a.ports["other"], ctx, sess)[0]
