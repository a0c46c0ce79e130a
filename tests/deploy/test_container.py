"""deploy/Dockerfile: the image is built, its runtime stage holds what it
should, and the container relays mail with STARTTLS (and implicit TLS) as a
non-root user, with a mounted configuration and with none at all."""

import json
import os
import shutil

import pytest

import deploy_harness as h


def inspect_image(tag):
    return json.loads(h.podman("image", "inspect", tag).stdout)[0]


def config_dir(tmp_path, text, tls_pair=None):
    """A directory to mount on /etc/starttls-proxy, readable by uid 10025."""
    d = tmp_path / "etc-starttls-proxy"
    d.mkdir()
    (d / "starttls-proxy.ini").write_text(text)
    if tls_pair:
        shutil.copy(tls_pair["cert"], str(d / "tls.crt"))
        shutil.copy(tls_pair["key"], str(d / "tls.key"))
    for p in [d] + list(d.iterdir()):
        os.chmod(str(p), 0o755 if p.is_dir() else 0o644)
    return str(d)


def run_proxy(containers, image, conf_dir, *args):
    """Start the image on the host's network with CONF_DIR mounted read-only,
    every capability dropped; return the container name once it has started."""
    name = containers()
    h.podman("run", "-d", "--name", name, "--network=host", "--cap-drop=ALL",
             "--read-only", "-v", "%s:/etc/starttls-proxy:ro" % conf_dir, *args, image)
    h.wait_log(name, "event=started")
    return name


def test_image_holds_only_the_runtime(proxy_image):
    info = inspect_image(proxy_image)
    cfg = info["Config"]
    assert cfg["User"] == "10025:10025"
    assert cfg["Entrypoint"] == ["/usr/local/bin/starttls-proxy"]
    assert cfg["Cmd"] == ["-c", "/etc/starttls-proxy/starttls-proxy.ini"]
    assert sorted(cfg["ExposedPorts"]) == ["25/tcp", "465/tcp", "587/tcp"]

    # Every shared library resolves; no compiler or headers came along; the
    # CA bundle and the default configuration are there, and the latter passes -t.
    script = ("set -e; ldd /usr/local/bin/starttls-proxy || true; "
              "! command -v cc; ! test -e /usr/include/wolfssl; ! test -e /usr/include/uv.h; "
              "test -s /etc/ssl/certs/ca-certificates.crt; "
              "test -x /usr/local/bin/smtp-probe; "
              "/usr/local/bin/starttls-proxy -t -c /etc/starttls-proxy/starttls-proxy.ini")
    p = h.podman("run", "--rm", "--entrypoint", "/bin/sh", proxy_image, "-c", script, check=False)
    assert p.returncode == 0, p.stdout
    assert "not found" not in p.stdout, p.stdout
    assert "configuration OK" in p.stdout, p.stdout

    libs = sorted(l.split()[0] for l in p.stdout.splitlines()
                  if "=>" in l and "linux-vdso" not in l)
    h.report("image binary loads: " + " ".join(libs))
    size = h.image_size(proxy_image)
    base = h.image_size(h.BASE_TAG)
    h.report("image %s: %.1f MB, %.1f MB on top of %s (%.1f MB)"
             % (proxy_image, size / 1e6, (size - base) / 1e6, h.BASE_TAG, base / 1e6))
    # The runtime stage adds the binary and a few libraries, not a toolchain.
    assert size - base < 25e6, "runtime stage adds %.1f MB" % ((size - base) / 1e6)


def test_starttls_delivery_as_non_root(proxy_image, containers, sink, tls_pair, tmp_path):
    port = h.free_port()
    conf = config_dir(tmp_path, h.proxy_config(
        [("smtp", {"listen": "127.0.0.1:%d" % port, "tls": "starttls", "require_tls": "yes",
                   "cert": "/etc/starttls-proxy/tls.crt",
                   "key": "/etc/starttls-proxy/tls.key"})],
        sink.address), tls_pair)
    name = run_proxy(containers, proxy_image, conf)

    # Not root, inside (id -u) and seen from the host (/proc), and no capability.
    assert h.podman("exec", name, "id", "-u").stdout.strip() == "10025"
    pid = int(h.container_state(name, "Pid"))
    ids = h.proc_ids(pid)
    assert ids["Uid"] == ["10025"] * 4, ids
    assert ids["Gid"] == ["10025"] * 4, ids
    assert int(ids["CapEff"][0], 16) == 0, ids

    # require_tls: plain mail is refused, nothing reaches the server.
    rc, out, _ = h.swaks(port)
    assert rc != 0 and "530 5.7.0" in out, out
    assert sink.messages() == []

    # With STARTTLS, verifying the mounted certificate.
    rc, out, subject = h.swaks(port, "--tls", "--tls-verify", "--tls-ca-path", tls_pair["cert"])
    assert rc == 0, out
    assert "TLS started" in out, out
    msgs = sink.messages()
    assert len(msgs) == 1 and subject in msgs[0], msgs
    assert "event=starttls" in h.container_logs(name)

    # The probe shipped in the image agrees: ready (220 relayed, STARTTLS offered).
    p = h.podman("exec", name, "smtp-probe", "ready", str(port), check=False)
    assert p.returncode == 0, p.stdout

    # SIGTERM (podman stop): a clean exit 0.
    h.podman("stop", "-t", "10", name)
    assert h.container_state(name, "ExitCode") == "0", h.container_logs(name)
    assert "event=stopping" in h.container_logs(name)


def test_implicit_tls_delivery(proxy_image, containers, sink, tls_pair, tmp_path):
    port = h.free_port()
    conf = config_dir(tmp_path, h.proxy_config(
        [("submissions", {"listen": "127.0.0.1:%d" % port, "tls": "implicit",
                          "cert": "/etc/starttls-proxy/tls.crt",
                          "key": "/etc/starttls-proxy/tls.key"})],
        sink.address), tls_pair)
    name = run_proxy(containers, proxy_image, conf)
    rc, out, subject = h.swaks(port, "--tls-on-connect", "--tls-verify",
                               "--tls-ca-path", tls_pair["cert"])
    assert rc == 0, out + "\n--- proxy log:\n" + h.container_logs(name)
    msgs = sink.messages()
    assert len(msgs) == 1 and subject in msgs[0], msgs


@pytest.mark.parametrize("privilege", [
    # podman: the capability, in the ambient set of the non-root user
    ["--cap-drop=ALL", "--cap-add=NET_BIND_SERVICE"],
    # what Docker does by default for a container with its own network
    ["--cap-drop=ALL", "--sysctl", "net.ipv4.ip_unprivileged_port_start=0"],
], ids=["cap-add", "sysctl"])
def test_bare_run_listens_on_25_465_587(proxy_image, containers, privilege):
    """No configuration mounted: the default one listens on 25, 587 and 465
    with an in-memory self-signed certificate."""
    p25, p587, p465 = h.free_ports(3)
    name = containers()
    h.podman("run", "-d", "--name", name, "--read-only", *privilege,
             "-p", "127.0.0.1:%d:25" % p25, "-p", "127.0.0.1:%d:587" % p587,
             "-p", "127.0.0.1:%d:465" % p465, proxy_image)
    h.wait_log(name, "event=started")
    log = h.container_logs(name)
    for addr in ("0.0.0.0:25", "0.0.0.0:587", "0.0.0.0:465"):
        assert "event=listening" in log and "addr=%s" % addr in log, log
    assert "event=self_signed" in log, log
    # Nothing listens on 127.0.0.1:2525 in its network namespace: the proxy
    # says so with 421 (it is up; the mail server is not).
    for port in (p25, p587):
        greeting = h.wait_greeting("127.0.0.1", port, expect="421", timeout=20)
        assert greeting.startswith("421 4.3.2"), greeting
