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
                  rss_sessions=4000, steps=[9000]),
    "full": dict(rounds=5, full_secs=4.0, full_conc=16, lat_secs=4.0,
                 bulk_bytes=512 << 20, bulk_sessions=2, rss_rounds=3,
                 rss_sessions=4000,
                 steps=[2000, 5000, 9000, 12000, 15000, 18000]),
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
                 name="starttls-proxy", admin=False):
        super().__init__(workdir)
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
tls = starttls
require_tls = yes
cert = %s
key = %s
upstream = sink
timeout_idle = 600s
%s

[upstream sink]
address = 127.0.0.1:%d
tls = none
%s""" % (self.workers, "\n".join(sect["proxy"]), port, self.cert, self.key,
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

    def __init__(self, workdir, binary, cert, key, upstream_port):
        super().__init__(workdir)
        self.binary, self.cert, self.key = binary, cert, key
        self.upstream_port = upstream_port

    def argv(self):
        conf = os.path.join(self.workdir, "stunnel.%d.conf" % self.port)
        # debug = 4 (warning): no line per connection, as log_level = warn.
        with open(conf, "w") as f:
            f.write("""foreground = yes
pid =
debug = 4
socket = l:TCP_NODELAY=1
socket = r:TCP_NODELAY=1

[smtp]
accept = 127.0.0.1:%d
connect = 127.0.0.1:%d
protocol = smtp
cert = %s
key = %s
""" % (self.port, self.upstream_port, self.cert, self.key))
        return [self.binary, conf]


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
        self.sink = self.start(SmtpSink(self.workdir, self.args.smtp_sink))
        only = set(self.args.only.split(",")) if self.args.only else {"rounds", "rss", "max"}
        parts = [("rounds", "sessions, latency, bulk (metrics 1-3), %d rounds" % p["rounds"], self.run_rounds),
                 ("rss", "RSS per idle session (metric 4), %d round(s)" % p["rss_rounds"], self.run_rss),
                 ("max", "max concurrent sessions (metric 5), steps %s" % p["steps"], self.run_max)]
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
            if not self.sink.alive():
                self.errors.append("smtp-sink died:\n" + self.sink.log_tail())
                break


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
    ap.add_argument("--only", help="comma list of parts: rounds, rss, max")
    ap.add_argument("--max-steps", help="comma list of session counts for metric 5")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--workdir", help="parent of the scratch directory (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (configs, logs)")
    ap.add_argument("--no-wait", action="store_true",
                    help="start at once even with many sockets of an earlier run in TIME_WAIT")
    args = ap.parse_args()
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

    need = [("starttls-proxy", args.proxy, None), ("stp-loadgen", args.loadgen, None),
            ("smtp-sink", args.smtp_sink, "postfix"),
            ("openssl", shutil.which("openssl") or "openssl", "openssl")]
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
            "packages: apt-get install stunnel4 postfix openssl")
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

    print()
    print("%s, %s run, %.0f s, %d CPUs, median of rounds; "
          "ratio = starttls-proxy / %s" % (" vs ".join(bench.names),
                                           "quick" if args.quick else "full", elapsed,
                                           os.cpu_count(), " or ".join(bench.names[1:])))
    tls = "TLS: %s; starttls-proxy wolfSSL: %s" % (bench.info.get("tls", "?"), wolfssl_of(args.proxy))
    if args.baseline:
        tls += "; baseline wolfSSL: %s" % wolfssl_of(args.baseline)
    if not args.no_stunnel:
        tls += "; stunnel: %s" % stunnel_version(args.stunnel)
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
    if not args.no_stunnel:
        print()
        print(bench.table())
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
