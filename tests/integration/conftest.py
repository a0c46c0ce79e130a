"""Shared fixtures for the starttls-proxy integration tests.

Every test file in this directory runs on its own (ctest runs each file as a
separate pytest invocation), so everything shared lives here or in
stp_harness.py.
"""

import subprocess

import pytest

import stp_harness as h


@pytest.fixture(scope="session")
def stp_bin():
    return h.daemon_binary()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A P-256 self-signed certificate for CN=proxy.test, made per session."""
    openssl = h.require_program("openssl", "openssl")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=proxy.test", "-days", "2", "-keyout", key, "-out", cert],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    return {"cert": cert, "key": key}


@pytest.fixture
def make_scripted():
    """Factory: make_scripted(**ScriptedUpstream options) -> started upstream."""
    yield from h.started_factory(h.ScriptedUpstream)


@pytest.fixture
def scripted(make_scripted):
    """A scripted upstream with the default greeting and EHLO."""
    return make_scripted()


@pytest.fixture
def aio():
    """An aiosmtpd upstream that keeps raw message bytes."""
    u = h.AioUpstream().start()
    yield u
    u.stop()


@pytest.fixture
def make_proxy(stp_bin, tls_files, tmp_path):
    """Factory: make_proxy(upstream, **listener options) -> running Proxy.

    UPSTREAM is an object with .address or an "IP:PORT" string. Listener
    options override the defaults below (a value of None removes the key);
    admin=True adds [admin] listen = 127.0.0.1:0.
    extra_listeners=[(name, opts)] adds listeners; proxy_opts overrides the
    [proxy] section; env adds to the daemon's environment. Listener "main"
    is at 127.0.0.1:0 (extra ones should be too): the kernel picks a free
    port and the Proxy reads it from the event=listening lines into .port
    (listener "main") and .ports[NAME]; nothing guesses a free port.

    At teardown the daemon must still be alive, exit 0 on SIGTERM and have no
    sanitizer reports in its log (unless the test stopped it itself)."""
    made = []

    def make(upstream, extra_listeners=(), proxy_opts=None, upstream_opts=None, env=None,
             admin=False, **listener):
        addr = upstream if isinstance(upstream, str) else upstream.address
        opts = {
            "listen": "127.0.0.1:0",
            "tls": "starttls",
            "require_tls": "yes",
            "cert": tls_files["cert"],
            "key": tls_files["key"],
            "upstream": "up",
            "max_line": "2048",
            "timeout_idle": "30s",
        }
        opts.update(listener)
        popts = {"log_level": "debug", "hostname": "proxy.test"}
        popts.update(proxy_opts or {})
        uopts = {"address": addr, "tls": "none"}
        uopts.update(upstream_opts or {})
        listeners = [("main", opts)] + list(extra_listeners)
        text = h.render_config(popts, listeners, [("up", uopts)])
        if admin:   # the kernel picks the port: event=admin_listening says it
            text += "\n[admin]\nlisten = 127.0.0.1:0\n"
        workdir = str(tmp_path / ("proxy%d" % len(made)))
        p = h.Proxy(stp_bin, workdir, text, n_listeners=len(listeners), env=env)
        made.append(p)
        p.start()
        return p

    yield make
    h.stop_proxies(made)


@pytest.fixture
def proxy_scripted(make_proxy, scripted):
    """(proxy, scripted upstream) with the default listener: STARTTLS required."""
    return make_proxy(scripted), scripted


@pytest.fixture
def proxy_aio(make_proxy, aio):
    """(proxy, aiosmtpd upstream) with the default listener: STARTTLS required."""
    return make_proxy(aio), aio


# --- TLS edges: certificates, TLS upstreams, Postfix -------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """Test CAs and certificates (stp_harness.Pki), made once per session."""
    return h.Pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def make_aio():
    """Factory: make_aio(**AioUpstream options) -> started aiosmtpd upstream
    (ssl_context= implicit TLS, tls_context= STARTTLS, proxy_protocol_timeout=)."""
    yield from h.started_factory(h.AioUpstream)


@pytest.fixture
def make_raw():
    """Factory: make_raw(**RawUpstream options) -> started byte-recording upstream."""
    yield from h.started_factory(h.RawUpstream)


@pytest.fixture(scope="session")
def postfix(pki):
    """A private Postfix instance (stp_harness.PostfixInstance), started once
    per session for the tests that ask for it, stopped at the end."""
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="stp-postfix-")
    pf = h.PostfixInstance(base, pki.upstream)
    try:
        pf.start()
        yield pf
    finally:
        pf.stop()
        shutil.rmtree(base, ignore_errors=True)
