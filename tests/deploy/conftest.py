"""Fixtures shared by the deployment tests (each file runs on its own)."""

import os
import subprocess

import pytest

import deploy_harness as h


def pytest_terminal_summary(terminalreporter):
    if h.REPORT:
        terminalreporter.section("deployment report")
        for line in h.REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def proxy_image():
    """Tag of the image built from deploy/Dockerfile (built if missing)."""
    tag, _ = h.proxy_image()
    return tag


@pytest.fixture(scope="module")
def legacy_image():
    tag, _ = h.legacy_image()
    return tag


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    """A P-256 certificate for mail.example.net (and 127.0.0.1) and its key,
    readable by the container's user."""
    openssl = h.require_program("openssl", "openssl")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=mail.example.net", "-days", "2",
         "-addext", "subjectAltName=DNS:mail.example.net,IP:127.0.0.1",
         "-keyout", key, "-out", cert],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    os.chmod(str(d), 0o755)
    os.chmod(cert, 0o644)
    os.chmod(key, 0o644)
    return {"cert": cert, "key": key}


@pytest.fixture
def containers():
    """Names to give containers; each is removed at teardown."""
    made = []

    def name(prefix="stp-test"):
        n = "%s-%s" % (prefix, os.urandom(4).hex())
        made.append(n)
        return n

    yield name
    for n in made:
        h.podman("rm", "-f", "-t", "0", n, check=False)


@pytest.fixture
def sink(tmp_path):
    s = h.SmtpSink(tmp_path).start()
    yield s
    s.stop()
