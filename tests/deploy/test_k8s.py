"""deploy/k8s/starttls-proxy-pod.yaml under `podman kube play`: the legacy
server on 127.0.0.1 in the pod, starttls-proxy in front of it on 25/587
(STARTTLS required) and 465 (implicit TLS) with the certificate from the
Secret and the configuration from the ConfigMap; its probes; `kube down`.

The YAML played is the committed one with only these changes: the test's
image tags, hostPorts on 127.0.0.1 at free high ports, and names with a
random suffix (so runs never collide)."""

import base64
import os
import subprocess

import pytest

import deploy_harness as h

POD_YAML = os.path.join(h.DEPLOY, "k8s", "starttls-proxy-pod.yaml")
SECRET_SH = os.path.join(h.DEPLOY, "k8s", "tls-secret.sh")


def load_yaml():
    try:
        import yaml
    except ImportError:
        pytest.fail("python3 module yaml missing: install the Debian package 'python3-yaml'",
                    pytrace=False)
    with open(POD_YAML) as f:
        return yaml, [d for d in yaml.safe_load_all(f) if d]


def by_kind(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, "%s: want one %s, have %d" % (POD_YAML, kind, len(found))
    return found[0]


def container(pod, name):
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def test_committed_yaml_is_the_real_world_one():
    """What the test copy changes is what a real cluster needs as committed."""
    _, docs = load_yaml()
    pod = by_kind(docs, "Pod")
    proxy, legacy = container(pod, "starttls-proxy"), container(pod, "legacy-mta")
    assert {(p["containerPort"], p.get("hostPort")) for p in proxy["ports"]} == \
        {(25, 25), (587, 587), (465, 465)}
    assert "127.0.0.1:2525" in legacy["args"], legacy["args"]
    assert "ports" not in legacy
    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["capabilities"]["add"] == ["NET_BIND_SERVICE"]
    assert proxy["readinessProbe"]["exec"]["command"][:2] == ["smtp-probe", "ready"]
    assert proxy["livenessProbe"]["exec"]["command"][:2] == ["smtp-probe", "alive"]
    ini = by_kind(docs, "ConfigMap")["data"]["starttls-proxy.ini"]
    for listen, tls in (("0.0.0.0:25", "starttls"), ("0.0.0.0:587", "starttls"),
                        ("0.0.0.0:465", "implicit")):
        assert "listen = %s\ntls = %s\n" % (listen, tls) in ini, ini
    assert ini.count("require_tls = yes") == 2
    assert "address = 127.0.0.1:2525" in ini


def tls_secret(tls_pair, name):
    p = subprocess.run([SECRET_SH, tls_pair["cert"], tls_pair["key"], name],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_tls_secret_sh_makes_a_tls_secret(tls_pair):
    yaml, _ = load_yaml()
    secret = yaml.safe_load(tls_secret(tls_pair, "starttls-proxy-tls"))
    assert secret["kind"] == "Secret" and secret["type"] == "kubernetes.io/tls"
    assert secret["metadata"]["name"] == "starttls-proxy-tls"
    for key, path in (("tls.crt", tls_pair["cert"]), ("tls.key", tls_pair["key"])):
        assert base64.b64decode(secret["data"][key]) == open(path, "rb").read()
    # The Pod mounts this Secret where the ConfigMap's configuration looks.
    _, docs = load_yaml()
    pod = by_kind(docs, "Pod")
    vol = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert vol["secret"]["secretName"] == "starttls-proxy-tls"
    mount = next(m for m in container(pod, "starttls-proxy")["volumeMounts"]
                 if m["name"] == vol["name"])
    ini = by_kind(docs, "ConfigMap")["data"]["starttls-proxy.ini"]
    assert ini.count("cert = %s/tls.crt" % mount["mountPath"]) == 3, ini
    assert ini.count("key = %s/tls.key" % mount["mountPath"]) == 3, ini


@pytest.fixture
def played(proxy_image, legacy_image, tls_pair, tmp_path):
    """Play the test copy; yields a dict of names and host ports; kube down."""
    yaml, docs = load_yaml()
    suffix = os.urandom(3).hex()
    cm, pod = by_kind(docs, "ConfigMap"), by_kind(docs, "Pod")
    cm["metadata"]["name"] += "-" + suffix
    pod["metadata"]["name"] = "stp-test-mail-" + suffix
    secret_name = "starttls-proxy-tls-" + suffix
    for v in pod["spec"]["volumes"]:
        if "configMap" in v:
            v["configMap"]["name"] = cm["metadata"]["name"]
        if "secret" in v:
            v["secret"]["secretName"] = secret_name
    container(pod, "legacy-mta")["image"] = legacy_image
    proxy = container(pod, "starttls-proxy")
    proxy["image"] = proxy_image
    ports = {}
    for p, free in zip(proxy["ports"], h.free_ports(len(proxy["ports"]))):
        p["hostPort"], p["hostIP"] = free, "127.0.0.1"
        ports[p["containerPort"]] = free

    secret_file = tmp_path / "secret.yaml"
    secret_file.write_text(tls_secret(tls_pair, secret_name))
    if h.podman_version() < (4, 4):
        # podman 4.3 mounts a Secret's values still base64-encoded (podman
        # issue 16625, fixed in 4.4): the same files from the host instead.
        d = tmp_path / "tls"
        d.mkdir()
        for src, dst in (("cert", "tls.crt"), ("key", "tls.key")):
            (d / dst).write_bytes(open(tls_pair[src], "rb").read())
            os.chmod(str(d / dst), 0o644)
        os.chmod(str(d), 0o755)
        for v in pod["spec"]["volumes"]:
            if "secret" in v:
                del v["secret"]
                v["hostPath"] = {"path": str(d), "type": "Directory"}
        secret_file = None
    pod_file = tmp_path / "pod.yaml"
    pod_file.write_text(yaml.safe_dump_all(docs, sort_keys=False))

    pod_name = pod["metadata"]["name"]
    names = {"pod": pod_name, "proxy": pod_name + "-starttls-proxy",
             "legacy": pod_name + "-legacy-mta", "ports": ports}
    # kube play looks for ./IMAGE-NAME/Containerfile to build and fails on a
    # file of that name (ctest runs in the build tree, beside the binary
    # starttls-proxy): an empty directory as the working directory.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    try:
        if secret_file:
            h.podman("kube", "play", str(secret_file), cwd=str(cwd))
        h.podman("kube", "play", str(pod_file), timeout=300, cwd=str(cwd))
        yield names
    finally:
        h.podman("kube", "down", str(pod_file), check=False, timeout=120, cwd=str(cwd))
        h.podman("pod", "rm", "-f", pod_name, check=False)
        h.podman("secret", "rm", secret_name, check=False)
        h.podman("volume", "rm", "-f", cm["metadata"]["name"], secret_name, check=False)
    assert h.podman("pod", "exists", pod_name, check=False).returncode != 0, \
        "kube down left pod %s" % pod_name


def probe(ctr, mode, port="25"):
    return h.podman("exec", ctr, "smtp-probe", mode, port, check=False)


def delivered(legacy):
    p = h.podman("exec", legacy, "sh", "-c", "cat /var/spool/smtp-sink/* 2>/dev/null", check=False)
    return p.stdout


def listening_sockets(ctr):
    """(address, port) of the TCP listeners in CTR's network namespace."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        text = h.podman("exec", ctr, "cat", table, check=False).stdout
        for line in text.splitlines()[1:]:
            f = line.split()
            if len(f) > 3 and f[3] == "0A":
                addr, port = f[1].split(":")
                if len(addr) == 8:
                    addr = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
                out.add((addr, int(port, 16)))
    return out


def wait_ready(played):
    """Until the readiness probe passes; fail at once if a container of the pod
    stopped or restarted (restartPolicy Always hides a crash loop otherwise)."""
    def ready():
        for ctr in (played["proxy"], played["legacy"]):
            if h.container_state(ctr, "Status") != "running" or \
                    h.podman("inspect", "--format", "{{.RestartCount}}", ctr,
                             check=False).stdout.strip() not in ("", "0"):
                fail("container %s is not running steadily" % ctr)
        return probe(played["proxy"], "ready").returncode == 0

    def fail(why):
        pytest.fail("%s\n--- readiness: %s\n--- proxy log:\n%s\n--- legacy log:\n%s"
                    % (why, probe(played["proxy"], "ready").stdout,
                       h.container_logs(played["proxy"])[-3000:],
                       h.container_logs(played["legacy"])[-3000:]), pytrace=False)

    if not h.wait_until(ready, 60, 0.5):
        fail("the readiness probe did not pass within 60 s")


def test_sidecar_starttls_on_25_and_587(played, tls_pair):
    wait_ready(played)
    proxy, legacy, ports = played["proxy"], played["legacy"], played["ports"]

    # The legacy server is reachable inside the pod only: 127.0.0.1:2525.
    socks = listening_sockets(legacy)
    assert ("127.0.0.1", 2525) in socks, socks
    assert not any(port == 2525 and addr != "127.0.0.1" for addr, port in socks), socks
    assert {25, 465, 587} <= {port for _, port in socks}, socks

    # Not root, even as seen from the host.
    ids = h.proc_ids(int(h.container_state(proxy, "Pid")))
    assert ids["Uid"] == ["10025"] * 4, ids

    # require_tls on 25: refused in plain text.
    rc, out, subject = h.swaks(ports[25])
    assert rc != 0 and "530 5.7.0" in out, out
    assert subject not in delivered(legacy)

    for port in (25, 587):
        rc, out, subject = h.swaks(ports[port], "--tls", "--tls-verify",
                                   "--tls-ca-path", tls_pair["cert"])
        assert rc == 0, "port %d:\n%s" % (port, out)
        assert 'TLS peer DN="/CN=mail.example.net"' in out, out
        assert subject in delivered(legacy), "port %d: not delivered" % port

    # The liveness probe, as podman runs it (a healthcheck).
    p = h.podman("healthcheck", "run", proxy, check=False)
    assert p.returncode == 0, p.stdout

    # The probes mean something: with the mail server gone the proxy is
    # alive (421) but not ready.
    h.podman("stop", "-t", "5", legacy)
    assert probe(proxy, "alive").returncode == 0
    p = probe(proxy, "ready")
    assert p.returncode != 0 and "421" in p.stdout, p.stdout


def test_sidecar_implicit_tls_on_465(played, tls_pair):
    wait_ready(played)
    rc, out, subject = h.swaks(played["ports"][465], "--tls-on-connect", "--tls-verify",
                               "--tls-ca-path", tls_pair["cert"])
    assert rc == 0, out + "\n--- proxy log:\n" + h.container_logs(played["proxy"])
    assert subject in delivered(played["legacy"])
