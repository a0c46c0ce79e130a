#!/usr/bin/python3
"""starttls-proxy against stunnel, side by side, on loopback.

Starts Postfix's smtp-sink as the plaintext upstream, then starttls-proxy and
stunnel (`protocol = smtp`, TCP_NODELAY on both sides) in front of it with the
same ECDSA P-256 certificate, and drives both with stp-loadgen, alternating
proxy/stunnel each round (the order flips every round) and reporting the
median over rounds:

  1. full STARTTLS sessions per CPU-second of the server process
     (utime + stime from /proc/PID/stat, before and after),
  2. p50/p99 session latency at 8 concurrent sessions,
  3. server CPU seconds per GB of message relayed after TLS,
  4. RSS per idle established TLS session at 4,000 sessions,
  5. the most concurrent TLS sessions one process holds without error.

Builds nothing: it expects build/starttls-proxy and build/tests/bench/stp-loadgen
(or the paths given). Not part of ctest: it measures, it does not pass or fail
(it exits non-zero only when a measurement itself failed: a protocol error, a
server that died). Standard library only, Debian's /usr/bin/python3.

  tests/bench/run.py --quick        # about a minute
  tests/bench/run.py                # the full run, under ~10 minutes

Two builds of the proxy in the same run (a regression check): --baseline PATH
runs a second starttls-proxy binary (an older build, see tests/bench/baseline.sh)
as one more server in the same rounds, with the same generated config, and
prints a second table, starttls-proxy / baseline, with the ratios taken round
by round; --no-stunnel leaves stunnel out.

  tests/bench/run.py --quick --baseline /tmp/stp-baseline-build/starttls-proxy --no-stunnel

IMAP (not in the default run): --only imap puts Dovecot's imapd (plaintext,
unprivileged, one 1 MB message) behind starttls-proxy (protocol = imap),
stunnel (protocol = imap) and, when installed, nginx's mail proxy (starttls
only), and prints CPU per session (connect, STARTTLS, LOGIN, SELECT, FETCH 1
BODY[], LOGOUT; and without the FETCH) and wall times, with ratios:

  tests/bench/run.py --quick --only imap

The admin endpoints' cost: --admin gives starttls-proxy an [admin] section
and scrapes its /metrics once per second while it runs; --admin-compare runs
the same binary twice in the same rounds, with --admin ("starttls-proxy")
and without [admin] ("baseline"), stunnel left out:

  tests/bench/run.py --quick --rounds 4 --only rounds --admin-compare
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# The targets (issue 4), ratio = starttls-proxy / stunnel.
TARGETS = {
    "cpu_per_session": ("ratio", 0.25, "<= 0.25x stunnel"),
    "p50": ("abs", 5.0, "<= 5 ms"),
    "cpu_per_gb": ("ratio", 0.5, "<= 0.5x stunnel"),
    "rss_per_session": ("ratio", 0.15, "<= 0.15x stunnel"),
    "max_sessions": ("min", 9000, ">= 9,000"),
}

PROFILES = {
    # rounds: metrics 1-3; rss_rounds: metric 4; steps: metric 5.
    "quick": dict(rounds=2, full_secs=2.0, full_conc=16, lat_secs=2.0,
                  bulk_bytes=128 << 20, bulk_sessions=2, rss_rounds=1,
                  rss_sessions=4000, steps=[9000],
                  imap_rounds=3, imap_sessions=200, imap_login_sessions=400,
                  imap_lat_sessions=10),
    "full": dict(rounds=5, full_secs=4.0, full_conc=16, lat_secs=4.0,
                 bulk_bytes=512 << 20, bulk_sessions=2, rss_rounds=3,
                 rss_sessions=4000,
                 steps=[2000, 5000, 9000, 12000, 15000, 18000],
                 imap_rounds=5, imap_sessions=400, imap_login_sessions=800,
                 imap_lat_sessions=20),
}


class BenchError(Exception):
    pass


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port):
    """Is something listening on 127.0.0.1:PORT? (from /proc, no connect)"""
    want = "0100007F:%04X" % port
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want and parts[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def cpu_seconds(pid):
    """utime + stime of the whole process (all its threads), seconds."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def time_wait_sockets():
    """TCP sockets in TIME_WAIT, IPv4 and IPv6 (from /proc/net/sockstat*)."""
    n = 0
    for path in ("/proc/net/sockstat", "/proc/net/sockstat6"):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if parts and parts[0] in ("TCP:", "TCP6:") and "tw" in parts:
                        n += int(parts[parts.index("tw") + 1])
        except OSError:
            pass
    return n


def wait_for_quiet(limit, max_wait):
    """An earlier run's tens of thousands of closed connections linger in
    TIME_WAIT (and in conntrack) for a minute or two and slow loopback TCP:
    wait for them to expire, up to MAX_WAIT seconds."""
    t0 = time.monotonic()
    n = time_wait_sockets()
    if n > limit:
        log("run.py: %d sockets in TIME_WAIT (an earlier run's): waiting up to %ds for them"
            % (n, max_wait))
    while n > limit and time.monotonic() - t0 < max_wait:
        time.sleep(2)
        n = time_wait_sockets()
    return n


def rss_kib(pid):
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * PAGE_KIB


def threads(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


class Daemon:
    """A server process started by us and stopped by its PID."""

    name = "daemon"

    def __init__(self, workdir):
        self.workdir = workdir
        self.proc = None
        self.port = None
        self.log_path = None

    def argv(self):
        raise NotImplementedError

    def start(self):
        self.port = free_port()
        argv = self.argv()
        self.log_path = os.path.join(self.workdir, "%s.%d.log" % (self.name, self.port))
        self.logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        deadline = time.monotonic() + 15
        while not listening(self.port):
            if self.proc.poll() is not None:
                raise BenchError("%s exited at start (status %s):\n%s" % (
                    self.name, self.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError("%s not listening on %d after 15 s" % (self.name, self.port))
            time.sleep(0.02)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def check(self):
        if not self.alive():
            raise BenchError("%s died (status %s):\n%s" % (
                self.name, self.proc.returncode if self.proc else None, self.log_tail()))

    def log_tail(self, n=15):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        self.proc = None


class SmtpSink(Daemon):
    name = "smtp-sink"

    def __init__(self, workdir, binary):
        super().__init__(workdir)
        self.binary = binary

    def argv(self):
        argv = [self.binary]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        # -m: smtp-sink serves 256 connections at once by default; the
        # rest would wait in the backlog and look like a stalled server.
        return argv + ["-m", "20000", "-c", "127.0.0.1:%d" % self.port, "4096"]


class StarttlsProxy(Daemon):
    name = "starttls-proxy"

    # Keys newer builds need for a benchmark (limits that would turn load from
    # one address away, root without `user`); older builds reject them as
    # unknown, so each is asked of the binary once with -t.
    OPTIONAL = [
        ("proxy", "user", "root"),
        ("proxy", "max_connections", "1000000"),
        ("listener", "max_connections", "1000000"),
        ("listener", "max_connections_per_ip", "1000000"),
        ("listener", "max_errors", "1000000"),
    ]
    _accepted = {}

    def __init__(self, workdir, binary, cert, key, upstream_port, workers="1",
                 name="starttls-proxy", admin=False, protocol=None):
        super().__init__(workdir)
        self.protocol = protocol    # None: the default (smtp), no key written
        self.name = name    # "baseline" for --baseline: its log files and errors
        self.binary, self.cert, self.key = binary, cert, key
        self.upstream_port = upstream_port
        self.workers = workers
        self.admin = admin  # [admin] on, /metrics scraped once per second
        self.admin_port = None
        self.scrapes, self.scrape_errors = 0, []
        self._scraper = None
        self._stop_scraping = threading.Event()

    def start(self):
        if self.admin:
            self.admin_port = free_port()
        super().start()
        if self.admin:
            self._stop_scraping.clear()
            self._scraper = threading.Thread(target=self._scrape_loop, daemon=True)
            self._scraper.start()
        return self

    def _scrape_loop(self):
        # As Prometheus would: one connection per scrape, the whole body read.
        while not self._stop_scraping.wait(1.0):
            try:
                with socket.create_connection(("127.0.0.1", self.admin_port), timeout=5) as s:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
                    data = b""
                    while True:
                        d = s.recv(65536)
                        if not d:
                            break
                        data += d
                if not data.startswith(b"HTTP/1.1 200 "):
                    raise OSError("status %r" % data[:20])
                self.scrapes += 1
            except OSError as e:
                self.scrape_errors.append(str(e))

    def stop(self):
        if self._scraper:
            self._stop_scraping.set()
            self._scraper.join(10)
            self._scraper = None
        super().stop()

    def config(self, port, extra):
        sect = {"proxy": [], "listener": []}
        for where, k, v in extra:
            sect[where].append("%s = %s" % (k, v))
        return """[proxy]
log_level = warn
workers = %s
%s

[listener bench]
listen = 127.0.0.1:%d
%stls = starttls
require_tls = yes
cert = %s
key = %s
upstream = sink
timeout_idle = 600s
%s

[upstream sink]
address = 127.0.0.1:%d
tls = none
%s""" % (self.workers, "\n".join(sect["proxy"]), port,
       "protocol = %s\n" % self.protocol if self.protocol else "", self.cert, self.key,
       "\n".join(sect["listener"]), self.upstream_port,
       "\n[admin]\nlisten = 127.0.0.1:%d\n" % (self.admin_port or 0) if self.admin else "")

    def accepted(self):
        # Per binary: a baseline build may know fewer keys than the proxy.
        if self.binary not in self._accepted:
            ok = []
            path = os.path.join(self.workdir, "key-check.ini")
            # Run as root, -t wants `user` (as a start would): check each
            # key beside it.
            base = [i for i in self.OPTIONAL if i[1] == "user"] if os.geteuid() == 0 else []
            for item in self.OPTIONAL:
                if item[1] == "user" and os.geteuid() != 0:
                    continue
                with open(path, "w") as f:
                    f.write(self.config(1, base + [item] if item not in base else [item]))
                p = subprocess.run([self.binary, "-t", "-c", path], capture_output=True)
                if p.returncode == 0:
                    ok.append(item)
            self._accepted[self.binary] = ok
        return self._accepted[self.binary]

    def argv(self):
        conf = os.path.join(self.workdir, "%s.%d.ini" % (self.name, self.port))
        with open(conf, "w") as f:
            f.write(self.config(self.port, self.accepted()))
        return [self.binary, "-c", conf]


class Stunnel(Daemon):
    name = "stunnel"

    def __init__(self, workdir, binary, cert, key, upstream_port, protocol="smtp"):
        super().__init__(workdir)
        self.binary, self.cert, self.key = binary, cert, key
        self.upstream_port = upstream_port
        self.protocol = protocol

    def argv(self):
        conf = os.path.join(self.workdir, "stunnel.%d.conf" % self.port)
        # debug = 4 (warning): no line per connection, as log_level = warn.
        with open(conf, "w") as f:
            f.write("""foreground = yes
pid =
debug = 4
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1

[%s]
accept = 127.0.0.1:%d
connect = 127.0.0.1:%d
protocol = %s
cert = %s
key = %s
%s""" % (self.protocol, self.port, self.upstream_port, self.protocol, self.cert, self.key,
       # IMAP: the Python client offers OpenSSL's TLS 1.3 suites; pin the
       # one every server here gets (the SMTP rows' loadgen offers only it).
       "ciphersuites = TLS_AES_128_GCM_SHA256\n" if self.protocol == "imap" else ""))
        return [self.binary, conf]


# ---------------------------------------------------------------------------
# IMAP (--only imap): Dovecot's imapd as the plaintext upstream, the proxy
# (protocol = imap), stunnel (protocol = imap) and nginx's mail proxy
# (starttls only) in front of it, and a Python client (this script run as
# --imap-client) doing connect, STARTTLS, LOGIN, SELECT, FETCH 1 BODY[], LOGOUT.

IMAP_USER, IMAP_PASS = "bench", "secret"
IMAP_MSG_SIZE = 1000000     # "a 1 MB message": 10^6 octets as stored and fetched


def imap_message(size=IMAP_MSG_SIZE):
    """A plain-text message of exactly SIZE octets, CRLF line ends (as
    Dovecot stores and serves it with mail_save_crlf)."""
    head = (b"From: bench@example.net\r\nTo: bench@example.net\r\n"
            b"Subject: 1 MB benchmark message\r\nMessage-ID: <imap-bench@example.net>\r\n"
            b"Date: Sun, 06 Dec 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    body = bytearray()
    i = 0
    while len(head) + len(body) < size:
        body += b"%07d The quick brown fox jumps over the lazy dog; 0123456789 abcdef.\r\n" % i
        i += 1
    msg = bytes(head + body)[:size - 2] + b"\r\n"
    assert len(msg) == size
    return msg


def cpu_seconds_tree(pid):
    """cpu_seconds() of PID and all its live descendants (nginx: master and
    worker)."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            total += cpu_seconds(p)
            for t in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, t)) as f:
                    todo += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return total


class DovecotImapd(Daemon):
    """Dovecot imapd on 127.0.0.1:PORT, plaintext, unprivileged (as
    tests/integration/dovecot_util.py's DovecotImap: started as root, master
    and children run as nobody), one user bench/secret whose INBOX holds one
    message of IMAP_MSG_SIZE octets. Tuned so that the upstream is not the
    bottleneck: login processes kept and reused (service_count = 0), imap
    processes reused, no per-login info log."""

    name = "dovecot"

    def __init__(self, workdir, binary, keep=False):
        super().__init__(workdir)
        self.binary, self.keep = binary, keep
        # Not under the scratch directory: that is mode 0700 root, which
        # nobody cannot enter (as in dovecot_util.py). Removed at stop().
        self.dir = tempfile.mkdtemp(prefix="stp-bench-dovecot-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        import pwd
        pw = pwd.getpwnam("nobody") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        self.user, self.uid, self.gid = pw.pw_name, pw.pw_uid, pw.pw_gid
        import grp
        self.group = grp.getgrgid(self.gid).gr_name
        self.message = imap_message()
        md = os.path.join(self.dir, "home", IMAP_USER, "Maildir")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(md, sub))
        for sub in ("run", "state"):
            os.mkdir(os.path.join(self.dir, sub))
        with open(os.path.join(md, "cur", "1700000000.M1P1.bench,S=%d,W=%d:2,S" % (
                len(self.message), len(self.message))), "wb") as f:
            f.write(self.message)
        with open(os.path.join(self.dir, "users"), "w") as f:
            f.write("%s:{PLAIN}%s:%d:%d::%s/home/%s::\n" % (
                IMAP_USER, IMAP_PASS, self.uid, self.gid, self.dir, IMAP_USER))

    def argv(self):
        w = self.dir
        conf = os.path.join(w, "dovecot.conf")
        with open(conf, "w") as f:
            f.write(f"""\
# written by tests/bench/run.py
base_dir = {w}/run
state_dir = {w}/state
log_path = {w}/dovecot.log
info_log_path = /dev/null
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {self.user}
default_internal_group = {self.group}
default_login_user = {self.user}
first_valid_uid = {self.uid}
last_valid_uid = {self.uid}
first_valid_gid = {self.gid}
last_valid_gid = {self.gid}
mail_location = maildir:~/Maildir
mail_save_crlf = yes
mail_max_userip_connections = 10000
passdb {{
  driver = passwd-file
  args = {w}/users
}}
userdb {{
  driver = passwd-file
  args = {w}/users
}}
service imap-login {{
  chroot =
  service_count = 0
  process_min_avail = 1
  client_limit = 2000
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service imap {{
  service_count = 0
  process_min_avail = 2
  process_limit = 2000
}}
service anvil {{
  chroot =
}}
service auth-worker {{
  user = $default_internal_user
}}
""")
        for root, dirs, files in os.walk(w):
            for n in [root] + [os.path.join(root, x) for x in files]:
                os.chown(n, self.uid, self.gid)
        return [self.binary, "-F", "-c", conf]

    def start(self):
        # As DovecotImap: the master itself runs unprivileged, in a session
        # of its own (stop() ends every process of it).
        self.port = free_port()
        argv = self.argv()
        self.log_path = os.path.join(self.dir, "dovecot.log")
        self.logf = open(os.path.join(self.workdir, "dovecot.stdout.log"), "wb")
        kw = dict(user=self.uid, group=self.gid, extra_groups=[]) if os.geteuid() == 0 else {}
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT, cwd=self.dir,
                                     start_new_session=True, **kw)
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise BenchError("dovecot exited at start (status %s):\n%s" % (
                    self.proc.returncode, self.log_tail()))
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"* OK"):
                        s.sendall(b"a LOGOUT\r\n")
                        s.recv(512)
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError("dovecot not answering on %d after 15 s:\n%s" % (
                    self.port, self.log_tail()))
            time.sleep(0.05)

    def stop(self):
        if self.proc is None:
            return
        sid = self.proc.pid
        super().stop()
        # Its children (imap, imap-login, auth) may outlive the master a moment.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [p for p in session_pids(sid)]
            if not left:
                return
            time.sleep(0.1)
        for p in session_pids(sid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cleanup(self):
        self.stop()
        if self.keep:
            log("dovecot's directory kept: %s" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def session_pids(sid):
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 3 and fields[0] != b"Z" and int(fields[3]) == sid:
            out.append(int(name))
    return out


class AuthHttp:
    """nginx mail's auth_http endpoint: every login is OK and goes to the
    Dovecot at UPSTREAM_PORT (a thread of this script; its CPU is not counted
    for nginx, nginx's side of the request is)."""

    def __init__(self, upstream_port):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self):
                self.send_response(200)
                self.send_header("Auth-Status", "OK")
                self.send_header("Auth-Server", "127.0.0.1")
                self.send_header("Auth-Port", str(upstream_port))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class NginxMail(Daemon):
    """nginx's mail proxy, `protocol imap; starttls only;`, one worker; the
    CPU counted is the master's and the worker's. nginx logs the client in
    itself: after STARTTLS and LOGIN it asks auth_http, then logs in to
    Dovecot with the same credentials and relays from there."""

    name = "nginx"

    def __init__(self, workdir, binary, cert, key, auth_port, module):
        super().__init__(workdir)
        self.binary, self.cert, self.key = binary, cert, key
        self.auth_port, self.module = auth_port, module

    def argv(self):
        d = os.path.join(self.workdir, "nginx.%d" % self.port)
        os.makedirs(d, exist_ok=True)
        conf = os.path.join(d, "nginx.conf")
        load = "load_module %s;\n" % self.module if self.module else ""
        with open(conf, "w") as f:
            f.write(f"""\
# written by tests/bench/run.py
{load}daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
mail {{
    server_name bench.localhost;
    auth_http 127.0.0.1:{self.auth_port}/auth;
    ssl_certificate {self.cert};
    ssl_certificate_key {self.key};
    ssl_protocols TLSv1.3;
    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;
    ssl_session_tickets off;
    server {{
        listen 127.0.0.1:{self.port};
        protocol imap;
        starttls only;
        imap_auth login plain;
    }}
}}
""")
        return [self.binary, "-e", os.path.join(d, "error.log"), "-p", d, "-c", conf]

    @property
    def pid(self):
        return self.proc.pid


def nginx_mail_status():
    """(binary, load_module path or None, None) when nginx with the mail
    module is there, else (None, None, why not)."""
    binary = shutil.which("nginx", path="/usr/sbin:/usr/bin:/usr/local/sbin")
    if not binary:
        return None, None, "nginx not installed (apt-get install nginx-light libnginx-mod-mail)"
    try:
        v = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr
    except OSError as e:
        return None, None, "nginx -V: %s" % e
    if "--with-mail=dynamic" in v:
        for m in ("/usr/lib/nginx/modules/ngx_mail_module.so",
                  "/usr/share/nginx/modules/ngx_mail_module.so"):
            if os.path.exists(m):
                return binary, m, None
        return None, None, "nginx's mail module is not installed (apt-get install libnginx-mod-mail)"
    if "--with-mail" in v:
        return binary, None, None
    return None, None, "this nginx is built without the mail module"


# -- the client ---------------------------------------------------------------

def imap_client_main(argv):
    """run.py --imap-client PORT N FETCH(0/1) SIZE [CONC]: N sessions, CONC at
    a time (threads), each connect, STARTTLS, LOGIN, SELECT INBOX, FETCH 1
    BODY[] (FETCH=1), LOGOUT; the FETCHed literal must be SIZE octets (the
    first session also compares the content). Prints one JSON line.
    Its TLS is Python's ssl (OpenSSL): TLS 1.3 only, the suite from
    OPENSSL_CONF (run.py pins TLS_AES_128_GCM_SHA256)."""
    import ssl
    port, n, fetch, size = int(argv[0]), int(argv[1]), argv[2] == "1", int(argv[3])
    conc = int(argv[4]) if len(argv) > 4 else 1
    expect = imap_message(size)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    res = {"ok": 0, "failed": 0, "errors": {}, "wall_ms": [], "fetch_ms": [], "tls": None}
    lock = threading.Lock()
    todo = list(range(n))

    def tagged(f, tag):
        lines = []
        while True:
            line = f.readline()
            if not line:
                raise OSError("connection closed waiting for %s" % tag)
            lines.append(line)
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise OSError("%s: %r" % (tag.decode(), line[:200]))
                return lines

    def session(k):
        t0 = time.monotonic()
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        # As stp-loadgen: without it the TLS Finished and the LOGIN after it
        # meet Nagle and the server's delayed ACK (a 40 ms stall per session).
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            f = s.makefile("rb")
            if not f.readline().startswith(b"* OK"):
                raise OSError("greeting")
            s.sendall(b"a1 STARTTLS\r\n")
            tagged(f, b"a1")
            t = ctx.wrap_socket(s, server_hostname="bench.localhost")
            s = t
            f = t.makefile("rb", buffering=65536)
            t.sendall(b"a2 LOGIN %s %s\r\n" % (IMAP_USER.encode(), IMAP_PASS.encode()))
            tagged(f, b"a2")
            t.sendall(b"a3 SELECT INBOX\r\n")
            tagged(f, b"a3")
            tf = None
            if fetch:
                tf0 = time.monotonic()
                t.sendall(b"a4 FETCH 1 BODY[]\r\n")
                line = f.readline()
                if not line.startswith(b"* 1 FETCH") or not line.rstrip().endswith(b"}"):
                    raise OSError("FETCH: %r" % line[:200])
                m = int(line.rstrip()[line.rindex(b"{") + 1:-1])
                body = f.read(m)
                if m != size or len(body) != size or (k == 0 and body != expect):
                    raise OSError("FETCH: %d octets, wanted %d%s" % (
                        len(body), size, "" if len(body) != size else " (different content)"))
                tagged(f, b"a4")
                tf = (time.monotonic() - tf0) * 1000
            t.sendall(b"a5 LOGOUT\r\n")
            tagged(f, b"a5")
            with lock:
                res["ok"] += 1
                res["wall_ms"].append((time.monotonic() - t0) * 1000)
                if tf is not None:
                    res["fetch_ms"].append(tf)
                res["tls"] = "%s %s" % (t.version(), t.cipher()[0])
        finally:
            s.close()

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                k = todo.pop(0)
            try:
                session(k)
            except (OSError, ValueError, ssl.SSLError) as e:
                with lock:
                    res["failed"] += 1
                    key = str(e)[:120]
                    res["errors"][key] = res["errors"].get(key, 0) + 1
    t0 = time.monotonic()
    ths = [threading.Thread(target=worker) for _ in range(conc)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    res["elapsed_s"] = time.monotonic() - t0
    for key in ("wall_ms", "fetch_ms"):
        v = sorted(res.pop(key))
        res[key.replace("_ms", "_p50_ms")] = statistics.median(v) if v else None
        res[key.replace("_ms", "_max_ms")] = v[-1] if v else None
    print(json.dumps(res), flush=True)
    return 0 if res["failed"] == 0 else 1


OPENSSL_CLIENT_CONF = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
Groups = X25519
"""


# ---------------------------------------------------------------------------
# the load generator


class Loadgen:
    def __init__(self, binary, workdir):
        self.binary = binary
        self.workdir = workdir

    def run(self, port, args, timeout):
        """full/bulk: run to the end; the JSON result. Fails loudly."""
        argv = [self.binary, "-p", str(port)] + [str(a) for a in args]
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError("stp-loadgen %s did not finish in %d s" % (" ".join(argv[1:]), timeout))
        out = p.stdout.decode("utf-8", "replace")
        err = p.stderr.decode("utf-8", "replace")
        result = None
        for line in out.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
        if p.returncode != 0 or result is None or result.get("failed"):
            raise BenchError("stp-loadgen %s failed (exit %d):\n%s" % (
                " ".join(argv[1:]), p.returncode, err.strip() or out.strip()))
        return result

    def hold(self, port, k, conc=200, timeout=30):
        return Hold(self.binary, port, k, conc, timeout)


class Hold:
    """stp-loadgen -m hold, driven through its stdin."""

    def __init__(self, binary, port, k, conc, timeout):
        argv = [binary, "-p", str(port), "-m", "hold", "-n", str(k), "-c", str(conc),
                "-t", str(timeout)]
        self.errf = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errf)

    def _event(self, name, timeout):
        deadline = time.monotonic() + timeout
        import select
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("stp-loadgen hold: no '%s' in %d s" % (name, timeout))
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if not r:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError("stp-loadgen hold exited (status %s): %s" % (
                    self.proc.wait(), self.stderr()))
            ev = json.loads(line)
            if ev.get("event") == name:
                return ev

    def stderr(self):
        self.errf.seek(0)
        return self.errf.read().decode("utf-8", "replace").strip()

    def ready(self, timeout):
        return self._event("ready", timeout)

    def verify(self, timeout=60):
        self.proc.stdin.write(b"verify\n")
        self.proc.stdin.flush()
        return self._event("verified", timeout)

    def quit(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.p = dict(PROFILES["quick" if args.quick else "full"])
        if args.rounds:
            self.p["rounds"] = args.rounds
        if args.rss_rounds:
            self.p["rss_rounds"] = args.rss_rounds
        if args.bulk_mib:
            self.p["bulk_bytes"] = args.bulk_mib << 20
        if args.imap_rounds:
            self.p["imap_rounds"] = args.imap_rounds
        if args.imap_sessions:
            self.p["imap_sessions"] = args.imap_sessions
            self.p["imap_login_sessions"] = 2 * args.imap_sessions
        self.workdir = tempfile.mkdtemp(prefix="stp-bench-", dir=args.workdir)
        self.loadgen = Loadgen(args.loadgen, self.workdir)
        self.daemons = []
        self.admin_daemons = []   # with --admin: their scrape counts
        self.results = {}   # metric -> {"starttls-proxy": [..], "stunnel": [..], "baseline": [..]}
        # The servers of this run, in the order of round 1 (later rounds rotate).
        self.names = ["starttls-proxy"]
        if args.baseline:
            self.names.append("baseline")
        if not args.no_stunnel:
            self.names.append("stunnel")
        self.info = {}
        self.errors = []
        # IMAP (--only imap): the same servers, and nginx's mail proxy when
        # it is installed (self.nginx: binary, module, or why not).
        self.nginx = (None, None, "left out (--no-nginx)") if args.no_nginx else nginx_mail_status()
        self.imap_names = list(self.names) + (["nginx"] if self.nginx[0] else [])
        self.make_cert()

    def make_cert(self):
        self.cert = os.path.join(self.workdir, "cert.pem")
        self.key = os.path.join(self.workdir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-keyout", self.key, "-out", self.cert, "-days", "7",
                        "-subj", "/CN=bench.localhost"],
                       check=True, capture_output=True)

    def start(self, d):
        self.daemons.append(d)
        return d.start()

    def stop(self, d):
        d.stop()
        if d in self.daemons:
            self.daemons.remove(d)

    def stop_all(self):
        for d in list(reversed(self.daemons)):
            try:
                d.stop()
            except Exception as e:  # keep stopping the others
                log("stopping %s: %s" % (d.name, e))
        self.daemons = []

    def server(self, name):
        if name == "starttls-proxy":
            d = StarttlsProxy(self.workdir, self.args.proxy, self.cert, self.key,
                              self.sink.port, self.args.workers, admin=self.args.admin)
            self.admin_daemons.append(d)
            return d
        if name == "baseline":
            return StarttlsProxy(self.workdir, self.args.baseline, self.cert, self.key,
                                 self.sink.port, self.args.workers, name="baseline")
        return Stunnel(self.workdir, self.args.stunnel, self.cert, self.key, self.sink.port)

    def add(self, metric, name, value):
        self.results.setdefault(metric, {}).setdefault(name, []).append(value)

    def order(self, rnd):
        # Rotate by one each round, so no server always goes first: with two
        # servers that alternates them (proxy first in odd rounds), with three
        # (proxy, baseline, stunnel) each goes first every third round.
        k = rnd % len(self.names)
        return self.names[k:] + self.names[:k]

    # -- 1, 2, 3: on one long-running process each ------------------------
    def run_rounds(self):
        p = self.p
        servers = {n: self.start(self.server(n)) for n in self.names}
        # Warm up each server (first-use allocations, page faults), not measured.
        for n, d in servers.items():
            self.loadgen.run(d.port, ["-c", 4, "-n", 40], 60)
        # Within a round each measurement runs on every server back to back
        # (full sessions on all, then latency on all, then bulk on all), so
        # the servers' figures of one round are as close in time as they can
        # be: the per-round ratios compare like with like.
        for rnd in range(p["rounds"]):
            for step in (self.step_full, self.step_latency, self.step_bulk):
                for name in self.order(rnd):
                    servers[name].check()
                    step(rnd, name, servers[name])
        for d in servers.values():
            self.stop(d)

    def step_full(self, rnd, name, d):
        p = self.p
        # 1: sessions per CPU-second under load.
        c0 = cpu_seconds(d.pid)
        r = self.loadgen.run(d.port, ["-c", p["full_conc"], "-d", p["full_secs"]],
                             p["full_secs"] + 120)
        c1 = cpu_seconds(d.pid)
        d.check()
        cpu = c1 - c0
        self.add("sessions_per_cpu_s", name, r["ok"] / cpu if cpu > 0 else float("inf"))
        self.add("cpu_per_session", name, cpu * 1000.0 / r["ok"])
        self.add("sessions_per_s", name, r["sessions_per_s"])
        self.info["tls"] = "%s %s %s" % (r["tls"], r["cipher"], r["group"])
        log("  round %d %-14s full:  %5d sessions, %.2f CPU-s, %.3f ms CPU/session, %.0f sessions/s"
            % (rnd + 1, name, r["ok"], cpu, cpu * 1000.0 / r["ok"], r["sessions_per_s"]))

    def step_latency(self, rnd, name, d):
        p = self.p
        # 2: latency at 8 concurrent.
        r = self.loadgen.run(d.port, ["-c", 8, "-d", p["lat_secs"]], p["lat_secs"] + 120)
        d.check()
        self.add("p50", name, r["lat_ms"]["p50"])
        self.add("p99", name, r["lat_ms"]["p99"])
        log("  round %d %-14s c=8:   %5d sessions, p50 %.2f ms, p99 %.2f ms"
            % (rnd + 1, name, r["ok"], r["lat_ms"]["p50"], r["lat_ms"]["p99"]))
        self.info.setdefault("phase_ms_c8", {}).setdefault(name, []).append(r["phase_ms"])
        # The same one at a time: the latency without queueing.
        r = self.loadgen.run(d.port, ["-c", 1, "-d", p["lat_secs"] / 2], p["lat_secs"] + 120)
        d.check()
        self.add("p50_c1", name, r["lat_ms"]["p50"])
        self.info.setdefault("phase_ms_c1", {}).setdefault(name, []).append(r["phase_ms"])

    def step_bulk(self, rnd, name, d):
        p = self.p
        # 3: CPU per GB after TLS.
        n = p["bulk_sessions"]
        size = p["bulk_bytes"] // n
        c0 = cpu_seconds(d.pid)
        r = self.loadgen.run(d.port, ["-m", "bulk", "-c", n, "-n", n, "-s", size], 600)
        c1 = cpu_seconds(d.pid)
        d.check()
        gb = r["msg_bytes"] / 1e9
        self.add("cpu_per_gb", name, (c1 - c0) / gb)
        self.add("mbytes_per_s", name, r["mbytes_per_s"])
        log("  round %d %-14s bulk:  %.2f GB, %.2f CPU-s, %.2f s/GB, %.0f MB/s"
            % (rnd + 1, name, gb, c1 - c0, (c1 - c0) / gb, r["mbytes_per_s"]))

    # -- 4: RSS per idle session, fresh process each time -------------------
    def run_rss(self):
        p = self.p
        k = p["rss_sessions"]
        for rnd in range(p["rss_rounds"]):
            for name in self.order(rnd):
                d = self.start(self.server(name))
                try:
                    self.loadgen.run(d.port, ["-c", 4, "-n", 40], 60)
                    time.sleep(0.3)
                    base = rss_kib(d.pid)
                    h = self.loadgen.hold(d.port, k)
                    try:
                        ev = h.ready(timeout=180)
                        if ev["failed"]:
                            raise BenchError("%s: %d of %d idle sessions failed: %s" % (
                                name, ev["failed"], k, ev["errors"]))
                        time.sleep(1.0)
                        d.check()
                        rss = rss_kib(d.pid)
                        v = h.verify()
                        if v["ok"] != k:
                            raise BenchError("%s: only %d of %d idle sessions answered NOOP" % (
                                name, v["ok"], k))
                    finally:
                        h.quit()
                    per = (rss - base) / k
                    self.add("rss_per_session", name, per)
                    self.add("rss_base", name, base)
                    log("  round %d %-14s idle:  %d sessions, RSS %d -> %d KiB, %.1f KiB/session"
                        % (rnd + 1, name, k, base, rss, per))
                finally:
                    self.stop(d)

    # -- 5: most concurrent sessions, stepping up ---------------------------
    def run_max(self):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = soft - 64          # the load generator's own fds
        steps = [s for s in self.p["steps"] if s <= cap] or [cap]
        if self.args.max_steps:
            steps = [int(x) for x in self.args.max_steps.split(",")]
        for name in self.names:
            best, note = 0, "all steps held"
            for k in steps:
                d = self.start(self.server(name))
                h = None
                try:
                    t0 = time.monotonic()
                    h = self.loadgen.hold(d.port, k, conc=200, timeout=60)
                    ev = h.ready(timeout=600)
                    ok = ev["failed"] == 0 and d.alive()
                    v = h.verify(timeout=120) if ok else None
                    extra = ""
                    if d.alive():
                        extra = ", RSS %d MiB, %d threads" % (rss_kib(d.pid) // 1024, threads(d.pid))
                    if ok and v["ok"] == k:
                        best = k
                        log("  %-14s %6d sessions held, all answered NOOP (%.0f s%s)"
                            % (name, k, time.monotonic() - t0, extra))
                        continue
                    if ok:
                        kinds = ", ".join("%s x%d" % (w, n) for w, n in
                                          sorted(v["errors"].items(), key=lambda x: -x[1])[:3])
                        note = "at %d: all held, then %d of them failed (%s)" % (
                            k, k - v["ok"], kinds)
                    else:
                        kinds = ", ".join("%s x%d" % (w, n) for w, n in
                                          sorted(ev["errors"].items(), key=lambda x: -x[1])[:3])
                        note = "at %d: %d held, %d failed (%s)" % (k, ev["held"], ev["failed"], kinds)
                        if not d.alive():
                            note += "; the server died"
                    log("  %-14s %6d sessions: %s%s" % (name, k, note, extra))
                    break
                finally:
                    if h:
                        h.quit()
                    self.stop(d)
            self.add("max_sessions", name, best)
            self.info["max_note_" + name] = note

    # -- IMAP (--only imap): login and a 1 MB FETCH --------------------------
    def imap_server(self, name, dovecot, auth):
        if name == "starttls-proxy":
            return StarttlsProxy(self.workdir, self.args.proxy, self.cert, self.key,
                                 dovecot.port, self.args.workers, protocol="imap")
        if name == "baseline":
            return StarttlsProxy(self.workdir, self.args.baseline, self.cert, self.key,
                                 dovecot.port, self.args.workers, name="baseline",
                                 protocol="imap")
        if name == "stunnel":
            return Stunnel(self.workdir, self.args.stunnel, self.cert, self.key, dovecot.port,
                           protocol="imap")
        return NginxMail(self.workdir, self.nginx[0], self.cert, self.key, auth.port,
                         self.nginx[1])

    def imap_client(self, port, n, fetch, conc=1):
        conf = os.path.join(self.workdir, "openssl-client.cnf")
        if not os.path.exists(conf):
            with open(conf, "w") as f:
                f.write(OPENSSL_CLIENT_CONF)
        env = dict(os.environ, OPENSSL_CONF=conf)
        argv = [sys.executable, os.path.abspath(__file__), "--imap-client", str(port), str(n),
                "1" if fetch else "0", str(IMAP_MSG_SIZE), str(conc)]
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                               timeout=60 + n * 2)
        except subprocess.TimeoutExpired:
            raise BenchError("IMAP client (%d sessions) did not finish" % n)
        out = p.stdout.decode("utf-8", "replace")
        res = None
        for line in out.splitlines():
            if line.startswith("{"):
                res = json.loads(line)
        if p.returncode != 0 or res is None or res["failed"]:
            raise BenchError("IMAP client on port %d failed (exit %d): %s%s" % (
                port, p.returncode, res["errors"] if res else out.strip(),
                p.stderr.decode("utf-8", "replace").strip()[-2000:]))
        return res

    def run_imap(self):
        p = self.p
        names = self.imap_names
        dovecot = self.start(DovecotImapd(self.workdir, self.args.dovecot, self.args.keep))
        auth = AuthHttp(dovecot.port) if "nginx" in names else None
        try:
            servers = {n: self.start(self.imap_server(n, dovecot, auth)) for n in names}
            for n, d in servers.items():      # warm-up, not measured
                self.imap_client(d.port, 10, True)
            # Per round, each step on every server back to back (the order
            # rotates by one each round): CPU with the FETCH, CPU without it
            # (the difference is the FETCH's own cost), both at imap_conc
            # sessions at a time; then wall times one session at a time.
            conc = self.args.imap_conc
            for rnd in range(p["imap_rounds"]):
                k = rnd % len(names)
                for step, fetch, count, c in (("imap", True, p["imap_sessions"], conc),
                                              ("imap_login", False, p["imap_login_sessions"], conc),
                                              ("imap_c1", True, p["imap_lat_sessions"], 1)):
                    for name in names[k:] + names[:k]:
                        d = servers[name]
                        d.check()
                        c0 = cpu_seconds_tree(d.pid)
                        r = self.imap_client(d.port, count, fetch, c)
                        cpu = cpu_seconds_tree(d.pid) - c0
                        d.check()
                        self.add(step + "_cpu", name, cpu * 1000.0 / r["ok"])
                        self.add(step + "_wall", name, r["wall_p50_ms"])
                        self.add(step + "_per_s", name, r["ok"] / r["elapsed_s"])
                        if fetch:
                            self.add(step + "_fetch_ms", name, r["fetch_p50_ms"])
                        self.info["imap_tls"] = r["tls"]
                        log("  round %d %-14s %-9s c=%d %4d sessions, %.2f CPU-s, %.3f ms CPU/session, "
                            "p50 %.1f ms/session%s" % (
                                rnd + 1, name, "login" if not fetch else "login+1MB", c, r["ok"], cpu,
                                cpu * 1000.0 / r["ok"], r["wall_p50_ms"],
                                ", FETCH p50 %.1f ms" % r["fetch_p50_ms"] if fetch else ""))
            for d in servers.values():
                self.stop(d)
        finally:
            if auth:
                auth.stop()
            self.stop(dovecot)
            dovecot.cleanup()

    def imap_rows(self):
        c = self.args.imap_conc
        return [
            ("imap_cpu", "CPU per session (login + FETCH 1 MB), ms", "%.3f"),
            ("imap_login_cpu", "CPU per session without the FETCH, ms", "%.3f"),
            ("imap_fetch_cpu", "  difference: CPU per 1 MB FETCH, ms", "%.3f"),
            ("imap_per_s", "  sessions/s with the FETCH, %d at a time (info)" % c, "%.0f"),
            ("imap_c1_wall", "wall time per session, 1 at a time, p50, ms", "%.1f"),
            ("imap_c1_fetch_ms", "  of it the FETCH 1 MB, p50, ms", "%.1f"),
        ]

    def imap_table(self):
        names = [n for n in self.imap_names if n in self.results.get("imap_cpu", {})]
        if not names:
            return "IMAP: no results"
        # Derived per round: the FETCH's own cost, the two CPU figures' difference.
        for n in names:
            a = self.results["imap_cpu"].get(n, [])
            b = self.results.get("imap_login_cpu", {}).get(n, [])
            self.results.setdefault("imap_fetch_cpu", {})[n] = [x - y for x, y in zip(a, b)]
        others = [n for n in names if n != "starttls-proxy"]
        hdr = ["metric"] + names + ["/ " + o for o in others]
        out = [tuple(hdr)]
        for metric, label, fmt in self.imap_rows():
            row = [label]
            vals = {n: self.median(metric, n) for n in names}
            row += [fmt % vals[n] if vals[n] is not None else "-" for n in names]
            a = vals.get("starttls-proxy")
            for o in others:
                b = vals[o]
                row.append("%.3f" % (a / b) if a is not None and b else "-")
            out.append(tuple(row))
        lines = self.layout(out)
        per = []
        for o in others:
            for metric, label in (("imap_cpu", "CPU per session"),
                                  ("imap_login_cpu", "without FETCH")):
                r = self.paired_ratios(metric, o)
                if r:
                    per.append("%s / %s: %s %.3f (%.3f-%.3f)" % (
                        "starttls-proxy", o, label, statistics.median(r), min(r), max(r)))
        lines.append("")
        lines.append("ratio = starttls-proxy / that server, of the medians over %d rounds; per round "
                     "(median, range):" % self.p["imap_rounds"])
        lines += ["  " + x for x in per]
        return "\n".join(lines)

    # -- the table ----------------------------------------------------------
    def median(self, metric, name):
        v = self.results.get(metric, {}).get(name)
        return statistics.median(v) if v else None

    def rows(self):
        return [
            ("sessions_per_cpu_s", "full STARTTLS sessions per CPU-second", "%.0f", None),
            ("cpu_per_session", "CPU per session, ms", "%.3f", "cpu_per_session"),
            ("sessions_per_s", "  sessions/s at %d concurrent (info)" % self.p["full_conc"], "%.0f", None),
            ("p50", "p50 session latency at 8 concurrent, ms", "%.2f", "p50"),
            ("p99", "p99 session latency at 8 concurrent, ms", "%.2f", None),
            ("p50_c1", "  p50 latency, 1 session at a time, ms (info)", "%.2f", None),
            ("cpu_per_gb", "CPU seconds per GB after TLS", "%.2f", "cpu_per_gb"),
            ("mbytes_per_s", "  relay throughput, MB/s (info)", "%.0f", None),
            ("rss_per_session", "RSS per idle TLS session at %d, KiB" % self.p["rss_sessions"], "%.1f",
             "rss_per_session"),
            ("max_sessions", "max concurrent TLS sessions", "%d", "max_sessions"),
        ]

    @staticmethod
    def layout(out):
        widths = [max(len(r[i]) for r in out) for i in range(len(out[0]))]
        lines = []
        for i, r in enumerate(out):
            lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j])
                                   for j, c in enumerate(r)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return lines

    def table(self):
        """starttls-proxy against stunnel, with the issue's targets."""
        rows = self.rows()
        out = []
        hdr = ("metric", "starttls-proxy", "stunnel", "ratio", "target", "met")
        out.append(hdr)
        for metric, label, fmt, tgt in rows:
            if metric not in self.results:
                continue
            a = self.median(metric, "starttls-proxy")
            b = self.median(metric, "stunnel")
            fa = fmt % a if a is not None else "-"
            fb = fmt % b if b is not None else "-"
            ratio = "%.3f" % (a / b) if a is not None and b else "-"
            target, met = "", ""
            if tgt:
                kind, val, text = TARGETS[tgt]
                target = text
                if a is not None:
                    if kind == "ratio" and b:
                        met = "yes" if a / b <= val else "NO"
                    elif kind == "abs":
                        met = "yes" if a <= val else "NO"
                    elif kind == "min":
                        met = "yes" if a >= val else "NO"
            out.append((label, fa, fb, ratio, target, met))
        lines = self.layout(out)
        paired = []
        for metric, label in (("cpu_per_session", "CPU per session"),
                              ("cpu_per_gb", "CPU per GB")):
            r = self.paired_ratios(metric)
            if r:
                paired.append("%s %.3f (%.3f-%.3f)" % (label, statistics.median(r), min(r),
                                                       max(r)))
        if paired:
            # Both servers run back to back in each round, so a round's ratio
            # is less disturbed by the machine drifting between rounds.
            lines.append("")
            lines.append("ratio per round (median, range): " + "; ".join(paired))
        return "\n".join(lines)

    # Round by round for the baseline table: the CPU metrics (the regression
    # check's criteria, with idle memory) and their inverse.
    PAIRED_BASELINE = ("sessions_per_cpu_s", "cpu_per_session", "cpu_per_gb", "rss_per_session")

    def baseline_table(self):
        """starttls-proxy against an older build of itself (--baseline)."""
        out = [("metric", "starttls-proxy", "baseline", "ratio", "per round: median (range)", "n")]
        for metric, label, fmt, _ in self.rows():
            if metric not in self.results:
                continue
            a = self.median(metric, "starttls-proxy")
            b = self.median(metric, "baseline")
            fa = fmt % a if a is not None else "-"
            fb = fmt % b if b is not None else "-"
            ratio = "%.3f" % (a / b) if a is not None and b else "-"
            per, n = "", ""
            r = self.paired_ratios(metric, "baseline") if metric in self.PAIRED_BASELINE else []
            if r:
                per = "%.3f (%.3f-%.3f)" % (statistics.median(r), min(r), max(r))
                n = str(len(r))
            out.append((label, fa, fb, ratio, per, n))
        lines = self.layout(out)
        lines.append("")
        lines.append("ratio = starttls-proxy / baseline (1.000: the same); per round: the ratio of the "
                     "two within each round (they run back to back), its median and range over n rounds")
        return "\n".join(lines)

    def paired_ratios(self, metric, other="stunnel"):
        """starttls-proxy / OTHER, round by round."""
        a = self.results.get(metric, {}).get("starttls-proxy", [])
        b = self.results.get(metric, {}).get(other, [])
        return [x / y for x, y in zip(a, b) if y]

    def run(self):
        p = self.p
        only = parts_of(self.args)
        self.sink = None
        if only & SMTP_PARTS:
            self.sink = self.start(SmtpSink(self.workdir, self.args.smtp_sink))
        parts = [("rounds", "sessions, latency, bulk (metrics 1-3), %d rounds" % p["rounds"], self.run_rounds),
                 ("rss", "RSS per idle session (metric 4), %d round(s)" % p["rss_rounds"], self.run_rss),
                 ("max", "max concurrent sessions (metric 5), steps %s" % p["steps"], self.run_max),
                 ("imap", "IMAP: login + FETCH of 1 MB, %d rounds of %d sessions (and %d without "
                  "the FETCH), %s" % (p["imap_rounds"], p["imap_sessions"], p["imap_login_sessions"],
                                     ", ".join(self.imap_names)), self.run_imap)]
        for key, title, fn in parts:
            if key not in only:
                continue
            log("== %s" % title)
            t0 = time.monotonic()
            try:
                fn()
            except BenchError as e:
                self.errors.append("%s: %s" % (key, e))
                log("FAILED: %s" % e)
            log("   (%.0f s)" % (time.monotonic() - t0))
            if self.sink and not self.sink.alive():
                self.errors.append("smtp-sink died:\n" + self.sink.log_tail())
                break


SMTP_PARTS = {"rounds", "rss", "max"}


def parts_of(args):
    """The parts to run: --only's list, or the SMTP ones (IMAP is asked for:
    --only imap, or --only rounds,rss,max,imap for everything)."""
    return set(args.only.split(",")) if args.only else set(SMTP_PARTS)


def wolfssl_of(binary):
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    for line in out.splitlines():
        if "wolfssl" in line:
            return "shared: " + line.split("=>")[-1].split("(")[0].strip()
    return "static (linked in)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true", help="short run (about a minute)")
    ap.add_argument("--proxy", default=os.path.join(REPO, "build", "starttls-proxy"))
    ap.add_argument("--loadgen", default=os.path.join(REPO, "build", "tests", "bench", "stp-loadgen"))
    ap.add_argument("--stunnel", default=shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel4")
    ap.add_argument("--smtp-sink", default=shutil.which("smtp-sink", path="/usr/sbin:/usr/bin") or "/usr/sbin/smtp-sink")
    ap.add_argument("--workers", default="1",
                    help="starttls-proxy's workers = (default 1: one event loop)")
    ap.add_argument("--baseline", metavar="PATH",
                    help="a second starttls-proxy binary (an older build, tests/bench/baseline.sh) "
                         "run in the same rounds; adds a table starttls-proxy / baseline")
    ap.add_argument("--no-stunnel", action="store_true",
                    help="leave stunnel out (with --baseline: proxy against baseline only)")
    ap.add_argument("--admin", action="store_true",
                    help="give starttls-proxy an [admin] section and scrape /metrics once per second")
    ap.add_argument("--admin-compare", action="store_true",
                    help="the same binary with --admin and as a baseline without [admin], "
                         "stunnel left out: the cost of the metrics")
    ap.add_argument("--rounds", type=int, help="rounds for metrics 1-3 (quick 2, full 5)")
    ap.add_argument("--rss-rounds", type=int, help="rounds for metric 4 (quick 1, full 3)")
    ap.add_argument("--bulk-mib", type=int,
                    help="MiB relayed per server and round for metric 3 (quick 128, full 512); "
                         "CPU time comes in 10 ms ticks, so more gives a finer CPU per GB")
    ap.add_argument("--only", help="comma list of parts: rounds, rss, max (the default), imap")
    ap.add_argument("--dovecot", default=shutil.which("dovecot", path="/usr/sbin:/usr/bin") or "/usr/sbin/dovecot",
                    help="IMAP: Dovecot's master binary (imapd is the upstream)")
    ap.add_argument("--no-nginx", action="store_true", help="IMAP: leave nginx's mail proxy out")
    ap.add_argument("--imap-rounds", type=int, help="IMAP: rounds (quick 3, full 5)")
    ap.add_argument("--imap-sessions", type=int,
                    help="IMAP: sessions with the 1 MB FETCH per server and round (quick 200, "
                         "full 400); twice as many without it")
    ap.add_argument("--imap-conc", type=int, default=8,
                    help="IMAP: sessions at a time for the CPU figures (default 8; the wall "
                         "times are taken one session at a time)")
    ap.add_argument("--max-steps", help="comma list of session counts for metric 5")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--workdir", help="parent of the scratch directory (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs)")
    ap.add_argument("--no-wait", action="store_true",
                    help="start at once even with many sockets of an earlier run in TIME_WAIT")
    if sys.argv[1:2] == ["--imap-client"]:
        return imap_client_main(sys.argv[2:])
    args = ap.parse_args()
    only = parts_of(args)
    unknown = only - SMTP_PARTS - {"imap"}
    if unknown:
        ap.error("--only: unknown part(s) %s" % ", ".join(sorted(unknown)))
    if args.admin_compare:
        if args.baseline:
            ap.error("--admin-compare uses the proxy binary as its own baseline")
        args.admin = args.no_stunnel = True
        args.baseline = args.proxy
    if args.no_stunnel and not args.baseline:
        ap.error("--no-stunnel leaves nothing to compare against: give --baseline PATH")
    if args.baseline:
        # The -t key checks are remembered per path: keep the two apart.
        args.baseline = os.path.abspath(args.baseline)
        args.proxy = os.path.abspath(args.proxy)

    need = [("starttls-proxy", args.proxy, None),
            ("openssl", shutil.which("openssl") or "openssl", "openssl")]
    if only & SMTP_PARTS:
        need += [("stp-loadgen", args.loadgen, None), ("smtp-sink", args.smtp_sink, "postfix")]
    if "imap" in only:
        need.append(("dovecot", args.dovecot, "dovecot-imapd"))
    if args.baseline:
        need.append(("baseline starttls-proxy", args.baseline, None))
    if not args.no_stunnel:
        need.append(("stunnel", args.stunnel, "stunnel4"))
    missing = [(what, path) for what, path, pkg in need
               if not (os.path.isfile(path) and os.access(path, os.X_OK))]
    if missing:
        for what, path in missing:
            log("run.py: %s not found at %s" % (what, path))
        log("build: cmake -S . -B build && cmake --build build; "
            "packages: apt-get install stunnel4 postfix openssl (IMAP: dovecot-imapd; "
            "nginx-light libnginx-mod-mail)")
        return 2

    # Each session costs the load generator 1 fd and the proxy 2.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    bench = Bench(args)
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    tw0 = time_wait_sockets() if args.no_wait else wait_for_quiet(1000, 150)
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    log("run.py: %s run, scratch %s, fd limit %d, load average %.2f%s" % (
        "quick" if args.quick else "full", bench.workdir, hard, load0,
        " (other work is running: figures will be noisy)" if load0 > 0.5 else ""))
    try:
        bench.run()
    except KeyboardInterrupt:
        log("run.py: interrupted")
        bench.errors.append("interrupted")
    finally:
        bench.stop_all()
        if not args.keep:
            shutil.rmtree(bench.workdir, ignore_errors=True)
    elapsed = time.monotonic() - t0

    names = bench.names if only & SMTP_PARTS else bench.imap_names
    print()
    print("%s, %s run, %.0f s, %d CPUs, median of rounds; "
          "ratio = starttls-proxy / %s" % (" vs ".join(names),
                                           "quick" if args.quick else "full", elapsed,
                                           os.cpu_count(), " or ".join(names[1:])))
    tls = "TLS: %s; starttls-proxy wolfSSL: %s" % (
        bench.info.get("tls") or bench.info.get("imap_tls", "?"), wolfssl_of(args.proxy))
    if args.baseline:
        tls += "; baseline wolfSSL: %s" % wolfssl_of(args.baseline)
    if not args.no_stunnel:
        tls += "; stunnel: %s" % stunnel_version(args.stunnel)
    if "imap" in only and bench.nginx[0]:
        tls += "; %s" % nginx_version(bench.nginx[0])
    print(tls)
    print("load average at start: %.2f, TIME_WAIT sockets %d (other work on the machine "
          "disturbs latency most)" % (load0, tw0))
    if args.baseline:
        for name, path in (("starttls-proxy", args.proxy), ("baseline", args.baseline)):
            print("%s: %s (%s, built %s)" % (name, path, proxy_version(path), time.strftime(
                "%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))))
    for name, path in (("starttls-proxy", args.proxy), ("baseline", args.baseline)):
        extra = StarttlsProxy._accepted.get(path) if path else None
        if extra:
            print("%s config adds: %s" % (name, ", ".join(
                "[%s] %s = %s" % (w, k, v) for w, k, v in extra)))
    if not args.no_stunnel and only & SMTP_PARTS:
        print()
        print(bench.table())
    if "imap" in only:
        print()
        print("IMAP: Dovecot imapd (plaintext) behind %s; per session: connect, STARTTLS, "
              "LOGIN, SELECT INBOX, FETCH 1 BODY[] (%d octets), LOGOUT, %d at a time for CPU; client: "
              "Python ssl, %s; CPU: the server process's utime + stime%s" % (
                  ", ".join(bench.imap_names), IMAP_MSG_SIZE, args.imap_conc,
                  bench.info.get("imap_tls", "?"),
                  " (nginx: master + worker)" if "nginx" in bench.imap_names else ""))
        if not bench.nginx[0]:
            print("nginx mail: not run: %s" % bench.nginx[2])
        print()
        print(bench.imap_table())
    if args.admin:
        n = sum(d.scrapes for d in bench.admin_daemons)
        errs = [e for d in bench.admin_daemons for e in d.scrape_errors]
        print("[admin] on for starttls-proxy: %d scrapes of /metrics, %d failed%s" % (
            n, len(errs), (" (first: %s)" % errs[0]) if errs else ""))
        if errs:
            bench.errors.append("%d scrapes failed" % len(errs))
    if args.baseline:
        print()
        print("starttls-proxy against the baseline %s, same rounds:" % (
            "(the same binary without [admin])" if args.admin_compare else "build"))
        print()
        print(bench.baseline_table())
    for name in bench.names:
        note = bench.info.get("max_note_" + name)
        if note:
            print("max sessions, %s: %s" % (name, note))
    if bench.errors:
        print()
        for e in bench.errors:
            print("ERROR: " + e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"profile": "quick" if args.quick else "full", "elapsed_s": elapsed,
                       "results": bench.results, "info": bench.info, "errors": bench.errors,
                       "params": bench.p, "servers": bench.names,
                       "binaries": {"starttls-proxy": args.proxy, "baseline": args.baseline}},
                      f, indent=2)
    return 1 if bench.errors else 0


def proxy_version(binary):
    try:
        p = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (p.stdout.strip() or p.stderr.strip()).splitlines()
    return out[0] if p.returncode == 0 and out else "no -V"


def nginx_version(binary):
    try:
        p = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "nginx ?"
    lines = (p.stdout + p.stderr).splitlines()
    v = [l.split(": ", 1)[-1] for l in lines if l.startswith("nginx version")]
    ssl = [l.split("with ", 1)[-1] for l in lines if l.startswith("built with")]
    return (v[0] if v else "nginx ?") + (" (%s)" % ssl[0] if ssl else "")


def stunnel_version(binary):
    try:
        p = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in (p.stdout + p.stderr).splitlines():
        if line.startswith("stunnel "):
            ssl = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith("Running")]
            return line.split(" on ")[0] + (" (" + ssl[0].split("with ")[-1] + ")" if ssl else "")
    return "?"


if __name__ == "__main__":
    sys.exit(main())
