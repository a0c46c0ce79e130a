"""Helpers for the deployment tests (container image, pod, compose, systemd).

* podman()          -- rootful podman with runc and a CONTAINERS_CONF that
                       works on this machine (no ulimits, cgroupfs).
* base_image()      -- docker.io/library/debian:bookworm-slim, made locally
                       with debootstrap when missing (there is no registry).
* proxy_image(), legacy_image(), systemd_image()
                    -- images built from deploy/, tagged with a digest of
                       everything that goes into them, so they are built only
                       when missing or changed. Podman's image store keeps them
                       (and the layer cache) between runs.
* SmtpSink          -- Postfix's smtp-sink on a loopback port, dumping messages.
* swaks()           -- deliver a message, return swaks' transcript.

Nothing is installed here: a missing program fails the test naming the Debian
package to install.
"""

import atexit
import contextlib
import fcntl
import fnmatch
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.environ.get("STP_SOURCE_DIR") or os.path.dirname(os.path.dirname(HERE))
DEPLOY = os.path.join(REPO, "deploy")

BASE_TAG = "docker.io/library/debian:bookworm-slim"
LOCK_FILE = "/var/tmp/starttls-proxy-deploy-tests.lock"

CONTAINERS_CONF = ('[containers]\ndefault_ulimits = []\n'
                   '[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n')


# ---------------------------------------------------------------------------
# environment


def require_program(name, package):
    """Absolute path of NAME, or FAIL naming the Debian package."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        pytest.fail("required program %r not found: install the Debian package %r"
                    % (name, package), pytrace=False)
    return found


def require_root():
    if os.geteuid() != 0:
        pytest.fail("the deployment tests run rootful podman: run them as root", pytrace=False)


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n, host="127.0.0.1"):
    """N distinct free ports (held open together so they differ)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_until(pred, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


REPORT = []


def report(line):
    """A line for the person reading the test output: conftest.py prints them
    all at the end of the run (pytest's capture would hide a print)."""
    REPORT.append(line)


@contextlib.contextmanager
def build_lock():
    """Serialises base/image builds between test files run in parallel."""
    with open(LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# podman

_conf_path = None


def podman_env():
    global _conf_path
    if _conf_path is None:
        fd, _conf_path = tempfile.mkstemp(prefix="stp-containers-", suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(CONTAINERS_CONF)
        atexit.register(os.unlink, _conf_path)
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = _conf_path
    return env


def podman_cmd():
    require_root()
    require_program("podman", "podman")
    require_program("runc", "runc")
    return ["podman", "--runtime", "runc"]


def podman(*args, check=True, timeout=300, input=None, log=None, cwd=None):
    """Run podman ARGS; returns CompletedProcess (text). On failure with
    check, fails the test with the command and its output."""
    cmd = podman_cmd() + [str(a) for a in args]
    p = subprocess.run(cmd, env=podman_env(), input=input, timeout=timeout, cwd=cwd,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log is not None:
        with open(log, "a") as f:
            f.write("$ %s\n%s\n" % (" ".join(cmd), p.stdout))
    if check and p.returncode != 0:
        out = p.stdout if len(p.stdout) < 6000 else "...\n" + p.stdout[-6000:]
        pytest.fail("podman %s: exit %d\n%s" % (" ".join(map(str, args)), p.returncode, out),
                    pytrace=False)
    return p


def podman_version():
    """(major, minor) of the podman client."""
    v = podman("version", "--format", "{{.Client.Version}}").stdout.strip()
    return tuple(int(x) for x in v.split(".")[:2])


def image_exists(tag):
    return podman("image", "exists", tag, check=False).returncode == 0


def image_size(tag):
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def image_id(tag):
    return podman("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()


# ---------------------------------------------------------------------------
# base image: debian:bookworm-slim made with debootstrap

# What Docker's debian:*-slim leaves out (debuerreotype's slimification).
SLIM_DPKG_CFG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
"""

SLIM_APT_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::GzipIndexes "true";
"""

IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SOURCES = """\
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
"""


def base_image():
    """Make BASE_TAG (a minbase Debian 12 trimmed like bookworm-slim) if missing."""
    if image_exists(BASE_TAG):
        return BASE_TAG
    with build_lock():
        if image_exists(BASE_TAG):
            return BASE_TAG
        debootstrap = require_program("debootstrap", "debootstrap")
        t0 = time.monotonic()
        tmp = tempfile.mkdtemp(prefix="stp-debootstrap-", dir="/var/tmp")
        root = os.path.join(tmp, "rootfs")
        try:
            p = subprocess.run([debootstrap, "--variant=minbase", "bookworm", root,
                                "http://deb.debian.org/debian"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=900)
            if p.returncode != 0:
                pytest.fail("debootstrap failed:\n" + p.stdout[-4000:], pytrace=False)
            for d in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info",
                      "usr/share/groff", "usr/share/lintian", "var/lib/apt/lists",
                      "var/cache/apt", "var/log"):
                path = os.path.join(root, d)
                if d == "usr/share/doc":
                    for pkg in os.listdir(path):
                        for name in os.listdir(os.path.join(path, pkg)):
                            if name != "copyright":
                                p_ = os.path.join(path, pkg, name)
                                shutil.rmtree(p_) if os.path.isdir(p_) and not os.path.islink(p_) \
                                    else os.unlink(p_)
                    continue
                shutil.rmtree(path, ignore_errors=True)
                os.makedirs(path, exist_ok=True)
            os.makedirs(os.path.join(root, "var/lib/apt/lists/partial"), exist_ok=True)
            os.makedirs(os.path.join(root, "var/cache/apt/archives/partial"), exist_ok=True)
            for rel, text in (("etc/dpkg/dpkg.cfg.d/docker", SLIM_DPKG_CFG),
                              ("etc/apt/apt.conf.d/docker-clean", SLIM_APT_CLEAN),
                              ("etc/apt/sources.list", SOURCES)):
                with open(os.path.join(root, rel), "w") as f:
                    f.write(text)
            tar = subprocess.Popen(["tar", "-C", root, "--numeric-owner", "-c", "."],
                                   stdout=subprocess.PIPE)
            imp = subprocess.run(podman_cmd() + ["import", "--change", 'CMD ["bash"]',
                                                 "--change", "ENV PATH=" + IMAGE_PATH, "-",
                                                 BASE_TAG],
                                 stdin=tar.stdout, env=podman_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=600)
            tar.stdout.close()
            tar.wait()
            if imp.returncode != 0 or tar.returncode != 0:
                pytest.fail("podman import failed:\n" + imp.stdout[-4000:], pytrace=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report("base image %s made with debootstrap in %.0f s (%.1f MB)"
               % (BASE_TAG, time.monotonic() - t0, image_size(BASE_TAG) / 1e6))
    return BASE_TAG


# ---------------------------------------------------------------------------
# images built from deploy/


def _ignore_patterns(path):
    pats = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                neg = line.startswith("!")
                pat = line[1:] if neg else line
                pats.append((neg, pat.strip("/")))
    return pats


def _excluded(rel, pats):
    """.dockerignore semantics, enough for ours: last match wins; a pattern
    matching a directory matches everything below it."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for neg, pat in pats:
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            out = not neg
    return out


def context_files(context, ignore_file=None):
    """Files of a build context after .dockerignore, sorted, relative."""
    pats = _ignore_patterns(ignore_file or os.path.join(context, ".dockerignore"))
    files = []
    for dirpath, dirnames, filenames in os.walk(context):
        reldir = os.path.relpath(dirpath, context)
        reldir = "" if reldir == "." else reldir + "/"
        # Prune what can hold nothing of the context (and is big).
        dirnames[:] = [d for d in dirnames if d != ".git" and d != "__pycache__"
                       and not (_excluded(reldir + d, pats)
                                and not any(neg and pat.startswith(reldir + d + "/")
                                            for neg, pat in pats))]
        for name in filenames:
            rel = reldir + name
            if not _excluded(rel, pats):
                files.append(rel)
    return sorted(files)


def _digest(context, files, dockerfile, extra=""):
    h = hashlib.sha256()
    h.update(extra.encode())
    for path in [dockerfile] + [os.path.join(context, f) for f in files]:
        h.update(os.path.relpath(path, context).encode() + b"\0")
        st = os.lstat(path)
        h.update(b"%o\0" % (st.st_mode & 0o777))
        if os.path.islink(path):
            h.update(os.readlink(path).encode())
        else:
            with open(path, "rb") as f:
                h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_image(repo, dockerfile, context, files, build_args=(), timeout=1500):
    """Build DOCKERFILE in CONTEXT as REPO:t-<digest> unless that tag exists.
    Returns (tag, seconds spent building, or 0 when it was cached)."""
    base = base_image()
    tag = "%s:t-%s" % (repo, _digest(context, files, dockerfile,
                                    image_id(base) + "\0" + "\0".join(build_args)))
    if image_exists(tag):
        return tag, 0.0
    with build_lock():
        if image_exists(tag):
            return tag, 0.0
        t0 = time.monotonic()
        log = os.path.join(tempfile.gettempdir(), "stp-build-%s.log" % tag.split(":")[-1])
        args = ["build", "--pull=never", "--network=host", "--layers", "-f", dockerfile,
                "-t", tag]
        for a in build_args:
            args += ["--build-arg", a]
        p = podman(*(args + [context]), check=False, timeout=timeout, log=log)
        if p.returncode != 0:
            pytest.fail("building %s from %s failed (log: %s):\n%s"
                        % (tag, dockerfile, log, p.stdout[-8000:]), pytrace=False)
        took = time.monotonic() - t0
        # Older builds of the same image: drop their names (just that name:
        # a bare "untag IMAGE" would drop every name of a shared image), so
        # that podman can prune what no container uses.
        old = podman("images", "--format", "{{.Repository}}:{{.Tag}}", repo, check=False)
        for line in set(old.stdout.split()):
            if line != tag and line.startswith(repo + ":t-"):
                podman("untag", line, line, check=False)
        report("built %s in %.0f s (%.1f MB)" % (tag, took, image_size(tag) / 1e6))
        return tag, took


def proxy_image():
    """The image of deploy/Dockerfile (context: the repository, .dockerignore)."""
    files = context_files(REPO)
    return build_image("localhost/starttls-proxy", os.path.join(DEPLOY, "Dockerfile"),
                       REPO, files)


def legacy_image():
    """The stand-in legacy mail server (smtp-sink) of deploy/container."""
    ctx = os.path.join(DEPLOY, "container")
    return build_image("localhost/starttls-proxy-legacy",
                       os.path.join(ctx, "legacy.Dockerfile"), ctx, [])


# ---------------------------------------------------------------------------
# peers on the host


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1:PORT, one file per message in .dir."""

    def __init__(self, tmpdir):
        self.bin = require_program("smtp-sink", "postfix")
        # smtp-sink runs as nobody, who cannot enter pytest's 0700 tmp_path.
        self.dir = tempfile.mkdtemp(prefix="stp-sink-")
        os.chmod(self.dir, 0o777)
        self.logpath = os.path.join(str(tmpdir), "sink.log")
        self.port = free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.proc = None

    def start(self):
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.log = open(self.logpath, "w")
        self.proc = subprocess.Popen(
            [self.bin] + user + ["-d", self.dir + "/%H%M%S.", self.address, "100"],
            stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_until(lambda: _connects("127.0.0.1", self.port), 10):
            pytest.fail("smtp-sink did not start", pytrace=False)
        return self

    def messages(self):
        out = []
        for name in sorted(os.listdir(self.dir)):
            with open(os.path.join(self.dir, name), "rb") as f:
                out.append(f.read().decode("utf-8", "replace"))
        return out

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _connects(host, port):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def smtp_greeting(host, port, timeout=5):
    """The first line a server sends, or '' if none."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return s.recv(1024).decode("ascii", "replace")
    except OSError:
        return ""


def wait_greeting(host, port, expect="220", timeout=60):
    """Wait until HOST:PORT greets with EXPECT; returns the last greeting."""
    last = [""]

    def ok():
        last[0] = smtp_greeting(host, port)
        return last[0].startswith(expect)

    if not wait_until(ok, timeout, 0.5):
        return last[0]
    return last[0]


def swaks(port, *extra, host="127.0.0.1", timeout=60):
    """Deliver a message with swaks through HOST:PORT; EXTRA are swaks options
    (--tls, --tlsc, ...). Returns (returncode, transcript, unique subject)."""
    bin_ = require_program("swaks", "swaks")
    subject = "deploy-test-" + uuid.uuid4().hex
    p = subprocess.run([bin_, "--server", "%s:%d" % (host, port), "--to", "a@example.net",
                        "--from", "b@example.org", "--header", "Subject: " + subject,
                        "--body", "sent through starttls-proxy by tests/deploy",
                        "--timeout", "30"] + list(extra),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, subject


# ---------------------------------------------------------------------------
# containers


def container_logs(name):
    return podman("logs", name, check=False).stdout


def container_state(name, field):
    """podman inspect --format {{.State.FIELD}} NAME ('' if no such container)."""
    p = podman("inspect", "--format", "{{.State.%s}}" % field, name, check=False)
    return p.stdout.strip() if p.returncode == 0 else ""


def wait_log(name, needle, timeout=30):
    """Wait until NEEDLE is in the container's log; fail if it exits first."""
    def seen():
        if needle in container_logs(name):
            return True
        if container_state(name, "Status") not in ("running", "created", "configured"):
            pytest.fail("container %s is %s before logging %r; its log:\n%s"
                        % (name, container_state(name, "Status"), needle,
                           container_logs(name)), pytrace=False)
        return False

    if not wait_until(seen, timeout, 0.2):
        pytest.fail("container %s did not log %r within %d s; its log:\n%s"
                    % (name, needle, timeout, container_logs(name)), pytrace=False)


def proc_ids(pid):
    """{'Uid': [real, effective, saved, fs], 'Gid': [...]} of a host PID."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "CapEff", "CapPrm", "NoNewPrivs"):
                out[k] = v.split()
    return out


def proxy_config(listeners, upstream, hostname="deploy-test.example.net"):
    """INI text: LISTENERS is [(name, {key: value})], UPSTREAM HOST:PORT."""
    out = ["[proxy]", "log_level = info", "hostname = " + hostname, ""]
    for name, opts in listeners:
        out.append("[listener %s]" % name)
        for k, v in opts.items():
            out.append("%s = %s" % (k, v))
        out.append("upstream = up")
        out.append("")
    out += ["[upstream up]", "address = " + upstream, ""]
    return "\n".join(out)
