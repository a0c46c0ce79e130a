"""deploy/compose.yaml: the legacy server on 127.0.0.1 in its network
namespace, starttls-proxy joining it (network_mode: service:), mail delivered
through 25/587 (STARTTLS required) and 465 (implicit TLS); `down` removes it
all.

Who runs the file: ComposeRunner below, compose semantics for exactly the
keys the file uses turned into podman commands; a key it does not know fails
the test rather than being ignored. Not podman-compose: Debian 12 ships 1.0.3,
which cannot run `network_mode: service:` (podman-compose issue 593, fixed in
1.0.4: it passes "service:..." to podman and adds the project network too).
docker compose and podman-compose >= 1.0.4 run the file as it is.

What the test changes: the test's image tags instead of `build:`, published
ports on 127.0.0.1 at free high ports, and STARTTLS_PROXY_ETC pointing at the
image's default configuration with its cert/key lines uncommented and a test
certificate beside it (a second run keeps the default, self-signed, setup)."""

import json
import os
import re
import shlex

import pytest

import deploy_harness as h

COMPOSE = os.path.join(h.DEPLOY, "compose.yaml")
DEFAULT_ETC = os.path.join(h.DEPLOY, "container", "etc")


def load_yaml():
    try:
        import yaml
    except ImportError:
        pytest.fail("python3 module yaml missing: install the Debian package 'python3-yaml'",
                    pytrace=False)
    with open(COMPOSE) as f:
        return yaml, yaml.safe_load(f)


def test_committed_compose_file():
    _, doc = load_yaml()
    legacy, proxy = doc["services"]["legacy-mta"], doc["services"]["starttls-proxy"]
    assert proxy["network_mode"] == "service:legacy-mta"
    assert "127.0.0.1:2525" in legacy["command"]
    assert sorted(legacy["ports"]) == ["25:25", "465:465", "587:587"]
    assert "ports" not in proxy
    assert proxy["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert os.path.exists(os.path.join(h.DEPLOY, legacy["build"]["context"],
                                       legacy["build"]["dockerfile"]))
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]
    assert proxy["volumes"] == ["${STARTTLS_PROXY_ETC:-./container/etc}:/etc/starttls-proxy:ro"]
    assert os.path.isfile(os.path.join(DEFAULT_ETC, "starttls-proxy.ini"))
    assert proxy["healthcheck"]["test"][:3] == ["CMD", "smtp-probe", "ready"]


# ---------------------------------------------------------------------------
# running a compose file


INTERPOLATE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ComposeRunner:
    """`up -d` / `down` of a compose file with podman, as docker compose does
    it, for the keys in SERVICE_KEYS."""

    SERVICE_KEYS = {"build", "image", "command", "ports", "restart", "network_mode",
                    "depends_on", "volumes", "read_only", "security_opt", "cap_drop",
                    "cap_add", "healthcheck"}

    def __init__(self, project, doc, project_dir, env):
        self.project, self.doc, self.dir, self.env = project, doc, project_dir, env
        unknown = set(doc) - {"services"}
        assert not unknown, "ComposeRunner: top-level keys %s unknown" % unknown
        for name, svc in doc["services"].items():
            unknown = set(svc) - self.SERVICE_KEYS
            assert not unknown, "ComposeRunner: %s: keys %s unknown" % (name, unknown)

    def interpolate(self, s):
        return INTERPOLATE.sub(lambda m: self.env.get(m.group(1)) or (m.group(2) or ""), s)

    def name(self, service):
        return "%s-%s-1" % (self.project, service)

    def order(self):
        done, out = set(), []

        def visit(n):
            if n not in done:
                done.add(n)
                for d in self.doc["services"][n].get("depends_on", []):
                    visit(d)
                out.append(n)

        for n in self.doc["services"]:
            visit(n)
        return out

    def up(self):
        net = self.project + "_default"
        h.podman("network", "create", "--label", "com.docker.compose.project=" + self.project,
                 net)
        for service in self.order():
            svc = self.doc["services"][service]
            args = ["run", "-d", "--name", self.name(service),
                    "--label", "com.docker.compose.project=" + self.project,
                    "--label", "com.docker.compose.service=" + service]
            mode = svc.get("network_mode")
            if mode:
                assert mode.startswith("service:"), mode
                args += ["--network", "container:" + self.name(mode[len("service:"):])]
            else:
                args += ["--network", net, "--network-alias", service]
            for p in svc.get("ports", []):
                args += ["-p", p]
            for v in svc.get("volumes", []):
                src, _, rest = self.interpolate(v).partition(":")
                if src.startswith("."):
                    src = os.path.normpath(os.path.join(self.dir, src))
                args += ["-v", "%s:%s" % (src, rest)]
            if svc.get("read_only"):
                args.append("--read-only")
            for o in svc.get("security_opt", []):
                args += ["--security-opt", o]
            for c in svc.get("cap_drop", []):
                args += ["--cap-drop", c]
            for c in svc.get("cap_add", []):
                args += ["--cap-add", c]
            if "restart" in svc:
                args += ["--restart", svc["restart"]]
            hc = svc.get("healthcheck")
            if hc:
                # podman 4.3 takes a command line (CMD-SHELL), not a JSON array.
                test = hc["test"]
                cmd = (shlex.join(test[1:]) if test[0] == "CMD" else test[1]
                       if test[0] == "CMD-SHELL" else test)
                args += ["--health-cmd", cmd,
                         "--health-interval", hc.get("interval", "30s"),
                         "--health-timeout", hc.get("timeout", "30s"),
                         "--health-retries", str(hc.get("retries", 3))]
            args.append(svc["image"])
            args += svc.get("command", [])
            h.podman(*args)

    def down(self):
        for service in reversed(self.order()):
            h.podman("rm", "-f", "-t", "10", self.name(service), check=False)
        h.podman("network", "rm", "-f", self.project + "_default", check=False)


def project_containers(project):
    """{service: container name} of a compose project, running or not."""
    out = h.podman("ps", "-a", "--format", "json",
                   "--filter", "label=com.docker.compose.project=" + project).stdout
    return {c["Labels"]["com.docker.compose.service"]: c["Names"][0]
            for c in json.loads(out or "[]")}


def compose_up(tmp_path, proxy_image, legacy_image, etc_dir=None):
    """Start the compose file with the test's changes (see the module's
    docstring); returns (names, down function)."""
    yaml, doc = load_yaml()
    legacy, proxy = doc["services"]["legacy-mta"], doc["services"]["starttls-proxy"]
    for svc, image in ((legacy, legacy_image), (proxy, proxy_image)):
        del svc["build"]
        svc["image"] = image
    ports = {}
    free = h.free_ports(len(legacy["ports"]))
    for i, spec in enumerate(legacy["ports"]):
        container_port = int(spec.split(":")[-1])
        ports[container_port] = free[i]
        legacy["ports"][i] = "127.0.0.1:%d:%d" % (free[i], container_port)
    project = "stp-test-" + os.urandom(3).hex()
    env = dict(os.environ)
    env.pop("STARTTLS_PROXY_ETC", None)
    if etc_dir:
        env["STARTTLS_PROXY_ETC"] = etc_dir

    c = ComposeRunner(project, doc, h.DEPLOY, env)
    down = c.down
    try:
        c.up()
    except BaseException:
        down()
        raise
    names = project_containers(project)
    if set(names) != {"legacy-mta", "starttls-proxy"}:
        down()
        pytest.fail("compose up: containers %s" % names, pytrace=False)
    return {"project": project, "ports": ports,
            "proxy": names["starttls-proxy"], "legacy": names["legacy-mta"]}, down


@pytest.fixture
def cert_etc(tls_pair, tmp_path):
    """The image's default configuration with cert/key uncommented, and a
    certificate: what the compose file's comment tells a user to do."""
    etc = tmp_path / "etc"
    etc.mkdir()
    with open(os.path.join(DEFAULT_ETC, "starttls-proxy.ini")) as f:
        ini = f.read()
    assert ini.count(";cert = /etc/starttls-proxy/tls.crt") == 3, ini
    (etc / "starttls-proxy.ini").write_text(ini.replace(";cert = ", "cert = ")
                                            .replace(";key = ", "key = "))
    (etc / "tls.crt").write_bytes(open(tls_pair["cert"], "rb").read())
    (etc / "tls.key").write_bytes(open(tls_pair["key"], "rb").read())
    for p in [etc] + list(etc.iterdir()):
        os.chmod(str(p), 0o755 if p.is_dir() else 0o644)
    return str(etc)


@pytest.fixture
def up(proxy_image, legacy_image, cert_etc, tmp_path):
    names, down = compose_up(tmp_path, proxy_image, legacy_image, cert_etc)
    try:
        yield names
    finally:
        down()
    left = project_containers(names["project"])
    assert not left, "compose down left %s" % left


def wait_ready(up):
    def ready():
        if h.container_state(up["proxy"], "Status") != "running":
            pytest.fail("proxy container is %s; its log:\n%s"
                        % (h.container_state(up["proxy"], "Status"),
                           h.container_logs(up["proxy"])), pytrace=False)
        return h.podman("exec", up["proxy"], "smtp-probe", "ready", "25",
                        check=False).returncode == 0

    if not h.wait_until(ready, 60, 0.5):
        pytest.fail("not ready within 60 s:\n--- proxy log:\n%s\n--- legacy log:\n%s"
                    % (h.container_logs(up["proxy"]), h.container_logs(up["legacy"])),
                    pytrace=False)


def delivered(legacy):
    return h.podman("exec", legacy, "sh", "-c", "cat /var/spool/smtp-sink/* 2>/dev/null",
                    check=False).stdout


def test_compose_starttls_on_25_and_587(up, tls_pair):
    wait_ready(up)
    ids = h.proc_ids(int(h.container_state(up["proxy"], "Pid")))
    assert ids["Uid"] == ["10025"] * 4, ids
    assert ids["NoNewPrivs"] == ["1"], ids

    # The legacy server listens on loopback only, in the shared namespace.
    tcp = h.podman("exec", up["legacy"], "cat", "/proc/net/tcp").stdout
    listeners = {l.split()[1] for l in tcp.splitlines()[1:] if l.split()[3] == "0A"}
    assert "0100007F:09DD" in listeners, listeners          # 127.0.0.1:2525
    assert not any(a.endswith(":09DD") and a != "0100007F:09DD" for a in listeners), listeners

    rc, out, subject = h.swaks(up["ports"][25])
    assert rc != 0 and "530 5.7.0" in out, out
    for port in (25, 587):
        rc, out, subject = h.swaks(up["ports"][port], "--tls", "--tls-verify",
                                   "--tls-ca-path", tls_pair["cert"])
        assert rc == 0, "port %d:\n%s" % (port, out)
        assert subject in delivered(up["legacy"]), "port %d: not delivered" % port

    p = h.podman("healthcheck", "run", up["proxy"], check=False)
    assert p.returncode == 0, p.stdout


def test_compose_implicit_tls_on_465(up, tls_pair):
    wait_ready(up)
    rc, out, subject = h.swaks(up["ports"][465], "--tls-on-connect", "--tls-verify",
                               "--tls-ca-path", tls_pair["cert"])
    assert rc == 0, out + "\n--- proxy log:\n" + h.container_logs(up["proxy"])
    assert subject in delivered(up["legacy"])


def test_compose_default_configuration(proxy_image, legacy_image, tmp_path):
    """No STARTTLS_PROXY_ETC: deploy/container/etc, an in-memory self-signed
    certificate, and mail still flows (the client does not verify)."""
    names, down = compose_up(tmp_path, proxy_image, legacy_image)
    try:
        wait_ready(names)
        assert "event=self_signed" in h.container_logs(names["proxy"])
        rc, out, subject = h.swaks(names["ports"][587], "--tls")
        assert rc == 0, out
        assert subject in delivered(names["legacy"])
    finally:
        down()
