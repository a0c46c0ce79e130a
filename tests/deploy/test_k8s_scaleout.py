"""deploy/k8s/starttls-proxy-deployment.yaml and starttls-proxy-service.yaml:
the scale-out example. What a cluster alone runs (Service,
PodDisruptionBudget, HorizontalPodAutoscaler) is checked by reading it: kinds,
selectors, the budget under the replicas, the autoscaler on the Deployment,
probes on the [admin] port, the grace period above drain_timeout. What podman
runs (ConfigMap, Deployment) is played with `podman kube play`: two replicas
with one ticket-key Secret deliver mail to a mail server in a pod of its own,
answer /healthz, /readyz and /metrics, and resume each other's TLS sessions
(Python ssl, TLS 1.3 and 1.2; openssl s_client -sess_out / -sess_in), and
through a rotation of the key file plus SIGHUP (README's procedure).

The YAML played is the committed one with only these changes: the test's
image tags, names with a random suffix, 2 replicas, the upstream address (the
test's mail server pod), on podman 4 no container ports (it publishes each on
the host at the same number: two replicas would want the same 25) and, on
podman 4.3, hostPath directories in place of the Secrets (podman issue
16625). podman plays each replica of a Deployment as a pod of its own
(NAME-pod-0, NAME-pod-1) on its kube network; the test reaches each one at
its pod address."""

import base64
import configparser
import os
import re
import smtplib
import socket
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

import deploy_harness as h

K8S = os.path.join(h.DEPLOY, "k8s")
DEPLOYMENT_YAML = os.path.join(K8S, "starttls-proxy-deployment.yaml")
SERVICE_YAML = os.path.join(K8S, "starttls-proxy-service.yaml")
SECRET_SH = os.path.join(K8S, "tls-secret.sh")
SERVER_NAME = "mail.example.net"      # the tls_pair certificate's name


def yaml_module():
    try:
        import yaml
    except ImportError:
        pytest.fail("python3 module yaml missing: install the Debian package 'python3-yaml'",
                    pytrace=False)
    return yaml


def load(path):
    with open(path) as f:
        return [d for d in yaml_module().safe_load_all(f) if d]


def by_kind(docs, kind):
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, "want one %s, have %d" % (kind, len(found))
    return found[0]


def proxy_container(deployment):
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"]
                if c["name"] == "starttls-proxy")


def ini_of(configmap):
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.read_string(configmap["data"]["starttls-proxy.ini"])
    return cp


def seconds(duration):
    """The proxy's durations: 30s, 2m, 500ms, 1h (a bare number: seconds)."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", duration.strip())
    assert m, "not a duration: %r" % duration
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def admin_port(ini):
    host, _, port = ini["admin"]["listen"].rpartition(":")
    # The kubelet and Prometheus come from outside the pod.
    assert host in ("0.0.0.0", "[::]", "::"), ini["admin"]["listen"]
    return int(port)


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------
# the manifests, read


def test_podman_file_holds_what_podman_plays():
    assert sorted(d["kind"] for d in load(DEPLOYMENT_YAML)) == ["ConfigMap", "Deployment"]
    assert sorted(d["kind"] for d in load(SERVICE_YAML)) == \
        ["HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


def test_service_budget_and_autoscaler_select_the_deployment():
    docs = load(DEPLOYMENT_YAML) + load(SERVICE_YAML)
    dep = by_kind(docs, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    replicas = dep["spec"]["replicas"]
    assert matches(selector, labels) and replicas >= 3
    pod = dep["spec"]["template"]["spec"]

    # Spread over nodes, counting this Deployment's pods.
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    for c in spread.values():
        assert c["labelSelector"]["matchLabels"] == selector

    svc = by_kind(docs, "Service")
    assert svc["spec"]["selector"] and matches(svc["spec"]["selector"], labels)
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert "sessionAffinity" not in svc["spec"]
    names = {p["name"]: p["containerPort"] for p in proxy_container(dep)["ports"]}
    assert {p["port"]: names[p["targetPort"]] for p in svc["spec"]["ports"]} == \
        {25: 25, 587: 587, 465: 465}

    pdb = by_kind(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert 0 < pdb["spec"]["minAvailable"] < replicas

    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"] <= replicas \
        <= hpa["spec"]["maxReplicas"]
    # It scales on CPU: the container must request some.
    assert proxy_container(dep)["resources"]["requests"]["cpu"]


def test_probes_grace_secrets_and_configuration_agree():
    docs = load(DEPLOYMENT_YAML)
    dep, cm = by_kind(docs, "Deployment"), by_kind(docs, "ConfigMap")
    pod = dep["spec"]["template"]["spec"]
    proxy = proxy_container(dep)
    ini = ini_of(cm)
    port = admin_port(ini)

    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert {"name": "admin", "containerPort": port} in proxy["ports"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == port and ann["prometheus.io/path"] == "/metrics"

    # The kubelet's SIGKILL comes after the preStop pause and the whole drain.
    pre_stop = proxy["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > \
        int(pre_stop[1]) + seconds(ini["proxy"]["drain_timeout"])

    # Configuration, certificate and ticket keys where the volumes put them.
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert proxy["args"] == ["-c", mounts["config"] + "/starttls-proxy.ini"]
    assert vols["tls"]["secret"]["secretName"] == "starttls-proxy-tls"
    assert vols["tickets"]["secret"]["secretName"] == "starttls-proxy-tickets"
    assert ini["proxy"]["ticket_keys"] == mounts["tickets"] + "/ticket.keys"
    listeners = [s for s in ini.sections() if s.startswith("listener ")]
    assert len(listeners) == 3
    for s in listeners:
        assert ini[s]["cert"] == mounts["tls"] + "/tls.crt"
        assert ini[s]["key"] == mounts["tls"] + "/tls.key"
    # Keys readable by the proxy's group only (fsGroup), not by others.
    assert pod["securityContext"]["fsGroup"] == proxy["securityContext"]["runAsGroup"]
    for name in ("tls", "tickets"):
        assert vols[name]["secret"]["defaultMode"] == 0o440

    sc = proxy["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]


# ---------------------------------------------------------------------------
# the manifests, played


def opaque_secret(name, files):
    """The YAML of `kubectl create secret generic NAME --from-file=...`."""
    return yaml_module().safe_dump({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque",
        "data": {k: base64.b64encode(v).decode() for k, v in files.items()}})


def pod_ip(pod_name):
    infra = h.podman("pod", "inspect", "--format", "{{.InfraContainerID}}", pod_name).stdout.strip()
    out = h.podman("inspect", "--format",
                   "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", infra).stdout
    ips = out.split()
    assert len(ips) == 1, "pod %s: addresses %r" % (pod_name, ips)
    return ips[0]


def http_get(ip, port, path):
    """(status, body) of GET http://IP:PORT/PATH; (0, why) if no answer."""
    try:
        with urllib.request.urlopen("http://%s:%d%s" % (ip, port, path), timeout=3) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except OSError as e:
        return 0, str(e)


def check_configuration(image, config, volumes):
    """`starttls-proxy -t -c CONFIG` in the image, VOLUMES [(host dir, mount
    path)] mounted: fails the test with the proxy's words (e.g. an [admin] it
    does not know) before anything is played."""
    p = h.podman("run", "--rm", "--network=none",
                 *sum((["-v", "%s:%s:ro" % v] for v in volumes), []),
                 image, "-t", "-c", config, check=False)
    if p.returncode != 0:
        pytest.fail("the image's starttls-proxy refuses the ConfigMap's configuration "
                    "(-t):\n%s" % p.stdout, pytrace=False)


@pytest.fixture
def scaleout(proxy_image, legacy_image, tls_pair, tmp_path):
    """A mail server pod, then the test copy of the Deployment (2 replicas);
    yields names, pod addresses and ports; kube down."""
    yaml = yaml_module()
    suffix = os.urandom(3).hex()
    cwd = tmp_path / "cwd"          # see test_k8s.py: kube play looks for ./IMAGE/Containerfile
    cwd.mkdir()

    # The mail server the replicas relay to: smtp-sink in a pod of its own,
    # on the kube network (in a cluster: a Service's name in [upstream mta]).
    mta_pod = "stp-test-mta-" + suffix
    mta_file = tmp_path / "mta.yaml"
    mta_file.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": mta_pod},
        "spec": {"containers": [{
            "name": "mta", "image": legacy_image, "imagePullPolicy": "IfNotPresent",
            "args": ["-d", "/var/spool/smtp-sink/%Y%m%d%H%M%S.", "-h", "mta.example.net",
                     "0.0.0.0:2525", "100"]}]}}))

    docs = load(DEPLOYMENT_YAML)
    cm, dep = by_kind(docs, "ConfigMap"), by_kind(docs, "Deployment")
    cm["metadata"]["name"] += "-" + suffix
    dep["metadata"]["name"] = "stp-test-scaleout-" + suffix
    dep["spec"]["replicas"] = 2
    pod = dep["spec"]["template"]["spec"]
    proxy = proxy_container(dep)
    proxy["image"] = proxy_image
    if h.podman_version() < (5, 0):
        # podman 4 publishes every containerPort on the host at the same port
        # when there is no hostPort: two replicas (and the host's own mail
        # server) would want 25. The test reaches the pods at their addresses.
        del proxy["ports"]
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    secret_names = {}
    for v in pod["volumes"]:
        if "configMap" in v:
            v["configMap"]["name"] = cm["metadata"]["name"]
        if "secret" in v:
            v["secret"]["secretName"] += "-" + suffix
            secret_names[v["name"]] = v["secret"]["secretName"]

    # The Secrets' files: the certificate, and one ticket key the replicas share.
    files = {"tls": {"tls.crt": open(tls_pair["cert"], "rb").read(),
                     "tls.key": open(tls_pair["key"], "rb").read()},
             "tickets": {"ticket.keys": base64.b64encode(os.urandom(80)) + b"\n"}}
    host_dirs = {}
    for vol, content in files.items():
        d = tmp_path / vol
        d.mkdir()
        for name, data in content.items():
            (d / name).write_bytes(data)
            # As fsGroup and defaultMode 0440 make them in a cluster.
            os.chown(str(d / name), 0, 10025)
            os.chmod(str(d / name), 0o440)
        os.chmod(str(d), 0o755)
        host_dirs[vol] = str(d)
    secrets_file = None
    if h.podman_version() < (4, 4):
        # podman 4.3 mounts a Secret's values still base64-encoded (podman
        # issue 16625, fixed in 4.4): the same files from the host instead.
        for v in pod["volumes"]:
            if "secret" in v:
                del v["secret"]
                v["hostPath"] = {"path": host_dirs[v["name"]], "type": "Directory"}
    else:
        secrets_file = tmp_path / "secrets.yaml"
        secrets_file.write_text(
            "---\n".join(opaque_secret(secret_names[vol], content)
                         for vol, content in files.items()))

    dep_name = dep["metadata"]["name"]
    pods = ["%s-pod-%d" % (dep_name, i) for i in range(2)]
    dep_file = tmp_path / "deployment.yaml"
    try:
        h.podman("kube", "play", str(mta_file), cwd=str(cwd))
        mta_ip = pod_ip(mta_pod)
        ini = ini_of(cm)
        ini["upstream mta"]["address"] = "%s:2525" % mta_ip
        (tmp_path / "config").mkdir()
        with open(str(tmp_path / "config" / "starttls-proxy.ini"), "w") as f:
            ini.write(f)
        os.chmod(str(tmp_path / "config"), 0o755)
        cm["data"]["starttls-proxy.ini"] = (tmp_path / "config" / "starttls-proxy.ini").read_text()
        check_configuration(proxy_image, proxy["args"][1],
                            [(str(tmp_path / "config"), mounts["config"]),
                             (host_dirs["tls"], mounts["tls"]),
                             (host_dirs["tickets"], mounts["tickets"])])
        dep_file.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        if secrets_file:
            h.podman("kube", "play", str(secrets_file), cwd=str(cwd))
        h.podman("kube", "play", str(dep_file), timeout=300, cwd=str(cwd))
        yield {"pods": pods, "containers": [p + "-starttls-proxy" for p in pods],
               "tickets": None if secrets_file else host_dirs["tickets"] + "/ticket.keys",
               "ips": [pod_ip(p) for p in pods], "admin": admin_port(ini),
               "mta": mta_pod + "-mta"}
    finally:
        if dep_file.exists():
            h.podman("kube", "down", str(dep_file), check=False, timeout=120, cwd=str(cwd))
        h.podman("kube", "down", str(mta_file), check=False, timeout=120, cwd=str(cwd))
        h.podman("pod", "rm", "-f", mta_pod, *pods, check=False)
        for name in secret_names.values():
            h.podman("secret", "rm", name, check=False)
        h.podman("volume", "rm", "-f", cm["metadata"]["name"], *secret_names.values(),
                 check=False)
    for p in pods + [mta_pod]:
        assert h.podman("pod", "exists", p, check=False).returncode != 0, \
            "kube down left pod %s" % p


def logs(played):
    return "\n".join("--- %s:\n%s" % (c, h.container_logs(c)[-3000:])
                     for c in played["containers"])


def wait_ready(played):
    """Until both replicas answer 200 on /readyz; fail at once if one stopped
    or restarted (restartPolicy Always hides a crash loop otherwise)."""
    def ready():
        for ctr in played["containers"] + [played["mta"]]:
            if h.container_state(ctr, "Status") != "running" or \
                    h.podman("inspect", "--format", "{{.RestartCount}}", ctr,
                             check=False).stdout.strip() not in ("", "0"):
                pytest.fail("container %s is not running steadily\n%s" % (ctr, logs(played)),
                            pytrace=False)
        return all(http_get(ip, played["admin"], "/readyz")[0] == 200 for ip in played["ips"])

    if not h.wait_until(ready, 60, 0.5):
        pytest.fail("/readyz: %r\n%s" % ([http_get(ip, played["admin"], "/readyz")
                                          for ip in played["ips"]], logs(played)),
                    pytrace=False)


def delivered(played):
    return h.podman("exec", played["mta"], "sh", "-c",
                    "cat /var/spool/smtp-sink/* 2>/dev/null", check=False).stdout


def tls_client(ip, ctx, session=None):
    """Implicit TLS on IP:465: the greeting read (so a TLS 1.3 ticket has
    arrived), QUIT. Returns (session, reused, version)."""
    with socket.create_connection((ip, 465), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVER_NAME, session=session) as s:
            greeting = s.recv(1024)
            assert greeting.startswith(b"220"), greeting
            s.sendall(b"QUIT\r\n")
            s.recv(1024)
            return s.session, s.session_reused, s.version()


def s_client(ip, cafile, sess_arg, sess_file):
    """openssl s_client STARTTLS on IP:25 with -sess_out or -sess_in; QUIT
    after a second (a TLS 1.3 ticket comes after the handshake)."""
    openssl = h.require_program("openssl", "openssl")
    cmd = "(sleep 1; printf 'QUIT\\r\\n') | %s s_client -connect %s:25 -starttls smtp " \
          "-servername %s -CAfile %s -verify_return_error %s %s 2>&1" \
          % (openssl, ip, SERVER_NAME, cafile, sess_arg, sess_file)
    return subprocess.run(["sh", "-c", cmd], stdout=subprocess.PIPE, text=True,
                          timeout=60).stdout


def test_two_replicas_deliver_and_resume_each_others_sessions(scaleout, tls_pair, tmp_path):
    played = scaleout
    wait_ready(played)
    ip1, ip2 = played["ips"]
    assert ip1 != ip2

    # The admin endpoints the probes and Prometheus use, on each pod address.
    for ip in (ip1, ip2):
        assert http_get(ip, played["admin"], "/healthz")[0] == 200
        status, body = http_get(ip, played["admin"], "/metrics")
        assert status == 200 and "starttls_proxy_build_info" in body, body[:2000]
    for ctr in played["containers"]:
        assert "event=ticket_keys_mode" not in h.container_logs(ctr)

    # Mail through each replica reaches the one mail server.
    for ip, port in ((ip1, 25), (ip2, 587)):
        # (swaks 2020 checks the name against the address it connects to:
        # the certificate is verified by the resumption checks below.)
        rc, out, subject = h.swaks(port, "--tls", "--tls-sni", SERVER_NAME, host=ip)
        assert rc == 0, "%s:%d\n%s\n%s" % (ip, port, out, logs(played))
        assert 'TLS peer DN="/CN=mail.example.net"' in out, out
        assert subject in delivered(played), "%s:%d: not delivered" % (ip, port)

    # A session from one replica resumes on the other, both ways, TLS 1.3
    # and 1.2: they seal and open tickets with the key of the shared Secret.
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = ssl.create_default_context(cafile=tls_pair["cert"])
        ctx.minimum_version = ctx.maximum_version = version
        for first, second in ((ip1, ip2), (ip2, ip1)):
            session, reused, got = tls_client(first, ctx)
            assert not reused and got == version.name.replace("_", "."), got
            _, reused, _ = tls_client(second, ctx, session)
            assert reused, "%s: a session of %s not resumed on %s\n%s" \
                % (version.name, first, second, logs(played))

    # The same with openssl s_client over STARTTLS.
    sess = str(tmp_path / "sess.pem")
    out = s_client(ip1, tls_pair["cert"], "-sess_out", sess)
    assert "New, TLSv1.3" in out and os.path.getsize(sess) > 0, out
    out = s_client(ip2, tls_pair["cert"], "-sess_in", sess)
    assert "Reused, TLSv1.3" in out, out + "\n" + logs(played)


def rewrite_keys(played, text):
    """Replace the replicas' key file as the kubelet swaps a Secret's files,
    SIGHUP every replica, wait until each has reloaded."""
    keys, new = played["tickets"], played["tickets"] + ".new"
    with open(new, "wb") as f:
        f.write(text)
    os.chown(new, 0, 10025)
    os.chmod(new, 0o440)
    os.replace(new, keys)
    counts = [h.container_logs(c).count("event=reload status=ok") for c in played["containers"]]
    for ctr in played["containers"]:
        h.podman("kill", "--signal", "HUP", ctr)
    for ctr, n in zip(played["containers"], counts):
        assert h.wait_until(
            lambda: h.container_logs(ctr).count("event=reload status=ok") > n, 15), logs(played)


def test_ticket_key_rotation_with_sighup(scaleout, tls_pair):
    """README's rotation: a new key on the first line of the Secret's file,
    the old one below, SIGHUP every replica: a session sealed before resumes
    on the other replica, and so does one sealed after; the old line dropped
    and SIGHUP again: only the one sealed after."""
    played = scaleout
    if played["tickets"] is None:
        pytest.skip("Secret volumes (podman 4.4+): the test cannot rewrite their files")
    wait_ready(played)
    ip1, ip2 = played["ips"]
    ctx = ssl.create_default_context(cafile=tls_pair["cert"])
    before, _, _ = tls_client(ip1, ctx)

    old_key = open(played["tickets"], "rb").read()
    new_key = base64.b64encode(os.urandom(80)) + b"\n"
    rewrite_keys(played, new_key + old_key)
    _, reused, _ = tls_client(ip2, ctx, before)
    assert reused, "a ticket of the old key not resumed after the rotation\n" + logs(played)
    after, reused, _ = tls_client(ip2, ctx)
    assert not reused
    _, reused, _ = tls_client(ip1, ctx, after)
    assert reused, "a ticket of the new key not resumed on the other replica\n" + logs(played)

    # The new key seals: with the old one gone, only tickets sealed after
    # the rotation open.
    rewrite_keys(played, new_key)
    _, reused, _ = tls_client(ip1, ctx, before)
    assert not reused, "a ticket of the dropped key still resumed"
    _, reused, _ = tls_client(ip1, ctx, after)
    assert reused, "a ticket of the new key not resumed\n" + logs(played)


def test_a_stopped_replica_drains_while_the_other_serves(scaleout, tls_pair):
    """What the kubelet's SIGTERM does to a replica (after preStop): /readyz
    503 at once (the Service drops it), /healthz still 200 (no restart while
    it drains), the transaction under way finishes and is delivered; the
    other replica stays ready."""
    played = scaleout
    wait_ready(played)
    ip1, ip2 = played["ips"]
    ctr2 = played["containers"][1]
    ctx = ssl.create_default_context(cafile=tls_pair["cert"])
    ctx.check_hostname = False      # smtplib names the address; the chain is checked
    subject = "drain-" + os.urandom(8).hex()
    with smtplib.SMTP(ip2, 25, timeout=30) as c:
        c.ehlo("client.example.org")
        c.starttls(context=ctx)
        c.ehlo("client.example.org")
        assert c.mail("b@example.org")[0] == 250
        assert c.rcpt("a@example.net")[0] == 250
        h.podman("kill", "--signal", "TERM", ctr2)
        assert h.wait_until(lambda: http_get(ip2, played["admin"], "/readyz")[0] == 503, 10), \
            "/readyz of the draining replica: %r\n%s" \
            % (http_get(ip2, played["admin"], "/readyz"), logs(played))
        assert http_get(ip2, played["admin"], "/healthz")[0] == 200
        assert http_get(ip1, played["admin"], "/readyz")[0] == 200
        code, _ = c.data("Subject: %s\r\n\r\ndrained\r\n" % subject)
        assert code == 250, logs(played)
        try:
            c.quit()
        except smtplib.SMTPServerDisconnected:
            pass            # the drain's 421 and close may come first
    assert subject in delivered(played)
