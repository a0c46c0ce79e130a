"""TLS behaviour that real clients showed to be wrong once: errors in TLS
material at the line of the key at fault, the TLS 1.0 recipe, `groups` on
TLS 1.2, fragmented ClientHellos, and the client certificate reported on a
resumed session."""

import re
import socket
import ssl

import pytest

import stp_harness as h

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --- errors in TLS material point at the key's own line ------------------------------------


def listener_conf(pki, **extra):
    opts = {"listen": "127.0.0.1:%d" % h.free_port(), "tls": "implicit",
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


def test_tls_1_0_device_gets_a_cbc_suite_and_smtp_works(make_proxy, aio, pki):
    """The README's recipe: min_version = 1.0 and nothing else."""
    proxy = make_proxy(aio, min_version="1.0", cert=pki.proxy.cert, key=pki.proxy.key)
    talk = b"EHLO printer.test\nMAIL FROM:<p@example.org>\nRCPT TO:<a@example.net>\nDATA\n" \
           b"Subject: tls1.0\n\nscan\n.\nQUIT\n"
    rc, out = h.s_client(proxy.port, "-tls1", "-cipher", "DEFAULT@SECLEVEL=0", "-ign_eof",
                         stdin=talk, starttls=True)
    assert re.search(r"^New, TLSv1\.0, Cipher is ECDHE-ECDSA-AES(128|256)-SHA$", out, re.M), out
    assert "\n221 " in out, out
    assert aio.wait_messages(1)[-1]["original_content"].endswith(b"scan\r\n")


def test_tls_1_2_client_on_a_tls_1_0_listener_still_gets_aead(make_proxy, scripted, pki):
    proxy = make_proxy(scripted, min_version="1.0", cert=pki.proxy.cert, key=pki.proxy.key)
    # OpenSSL's default list offers CBC suites too: the server's order wins
    rc, out = h.s_client(proxy.port, "-tls1_2", "-cipher", "DEFAULT@SECLEVEL=0",
                         stdin=b"QUIT\n", starttls=True)
    assert re.search(r"^New, TLSv1\.2, Cipher is ECDHE-ECDSA-(AES128-GCM-SHA256|"
                     r"AES256-GCM-SHA384|CHACHA20-POLY1305)$", out, re.M), out
