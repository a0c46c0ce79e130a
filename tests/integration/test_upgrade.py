"""SIGUSR2: a binary upgrade without downtime. The daemon starts its own
binary again (the path it was started from, the same arguments) with the
listening sockets as inherited descriptors; once the new process says it is
ready, the old one stops accepting, lets its sessions finish and exits 0.
Nothing is refused meanwhile: both hold the one listening socket (same
inode), the kernel queues connections on it. A new process that fails (bad
configuration, exit, crash) leaves the old one serving, with
event=upgrade status=failed reason=...

The new process is the old one's child: this module makes pytest a child
subreaper, so that when the old process exits the new one is reparented to
us and its exit status can be read with waitpid."""

import ctypes
import os
import pwd
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time

import pytest

import stp_harness as h
import hardening_util as hu

PR_SET_CHILD_SUBREAPER = 36
GREETING = "upstream.test ESMTP scripted"   # ScriptedUpstream's default
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: ThreadSanitizer", "assertion failed")


@pytest.fixture(autouse=True, scope="module")
def subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) failed")
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


class Successor:
    """The process an upgrade started: not our child until its parent exits
    (then reparented to us, the subreaper). It logs to the same file."""

    def __init__(self, old, pid):
        self.old = old
        self.pid = pid
        self.exit_code = None

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def events(self, name=None):
        return self.old.events(name)

    def alive(self):
        return self.exit_code is None and self._reap() is None

    def _reap(self):
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Not (yet) ours: its parent is alive. Running unless a zombie.
            try:
                with open("/proc/%d/stat" % self.pid) as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                return -1
            return None if state != "Z" else -1
        if pid == 0:
            return None
        self.exit_code = os.waitstatus_to_exitcode(status)
        return self.exit_code

    def stop(self, timeout=h.STOP_TIMEOUT):
        """SIGTERM; its exit code (it must be our child by then)."""
        if self.exit_code is not None:
            return self.exit_code
        os.kill(self.pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._reap() is not None:
                return self.exit_code
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("new process %d did not exit within %.0fs of SIGTERM"
                             % (self.pid, timeout))


@pytest.fixture
def launch(stp_bin, tmp_path, make_scripted):
    """launch(upstream, workers=1, binary=None, proxy_opts=None, **listener)
    -> Proxy. Plaintext listener "main" at 127.0.0.1:0. At teardown every
    process still running (old or new) must exit 0 on SIGTERM, and the log
    must hold no sanitizer report."""
    made, successors = [], []

    def start(upstream, workers=1, binary=None, proxy_opts=None, workdir=None, env=None,
              extra_listeners=(), admin=False, **listener):
        opts = {"listen": "127.0.0.1:0", "tls": "none", "upstream": "up",
                "timeout_idle": "30s"}
        opts.update(listener)
        popts = {"log_level": "debug", "hostname": "proxy.test", "workers": str(workers)}
        popts.update(proxy_opts or {})
        listeners = [("main", opts)] + [(n, dict(opts, **o)) for n, o in extra_listeners]
        text = h.render_config(popts, listeners,
                               [("up", {"address": upstream.address, "tls": "none"})])
        if admin:
            text += "\n[admin]\nlisten = 127.0.0.1:0\n"
        p = h.Proxy(binary or stp_bin, workdir or str(tmp_path / ("proxy%d" % len(made))), text,
                    n_listeners=len(listeners), env=env)
        made.append(p)
        p.start()
        p.successors = successors
        return p

    yield start
    errors = []
    for s in successors:
        try:
            if s.alive() and s.stop() != 0:
                errors.append("new process %d: exit code %s on SIGTERM" % (s.pid, s.exit_code))
        except AssertionError as e:
            errors.append(str(e))
    for p in made:
        if p.exit_code is None:
            try:
                p.check_and_stop()
            except BaseException as e:
                errors.append(str(e))
        text = p.log_text()
        errors += ["log contains %r" % m for m in SANITIZER_MARKERS if m in text]
    if errors:
        pytest.fail("\n".join(errors) + "\nlog:\n" + made[0].log_tail(80), pytrace=False)


def upgrade_events(proxy, status=None):
    return [e for e in proxy.events("upgrade") if status is None or e.get("status") == status]


def sigusr2(proxy, timeout=10.0):
    """SIGUSR2 to PROXY (old); the event=upgrade ok or failed it ends with."""
    def ends():
        return [e for e in upgrade_events(proxy) if e.get("status") in ("ok", "failed")]
    before = len(ends())
    os.kill(proxy.pid, signal.SIGUSR2)

    def outcome():
        evs = ends()[before:]
        return evs and evs[0]
    ev = h.wait_until(outcome, timeout)
    assert ev, "no event=upgrade status=ok|failed within %.0fs:\n%s" % (timeout, proxy.log_tail())
    return ev


def upgraded(proxy, timeout=10.0):
    """SIGUSR2 that must succeed: the Successor (also reaped at teardown)."""
    ev = sigusr2(proxy, timeout)
    assert ev["status"] == "ok", "upgrade failed:\n%s" % proxy.log_tail()
    new = Successor(proxy, int(ev["new_pid"]))
    proxy.successors.append(new)
    assert proxy.wait_event("started", pid=str(new.pid))
    return new


def wait_old_exit(proxy, timeout=10.0):
    try:
        rc = proxy.proc.wait(timeout)
    except Exception:
        pytest.fail("the old process did not exit after the hand-over:\n%s" % proxy.log_tail(),
                    pytrace=False)
    proxy.exit_code = rc
    return rc


def listen_inode(port):
    """The inode of the socket listening on 127.0.0.1:PORT (/proc/net/tcp)."""
    want = "0100007F:%04X" % port
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":
                return int(fields[9])
    return None


def socket_inodes(pid):
    """The socket inodes among PID's descriptors."""
    out = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def ehlo_quit(port):
    """One whole session; "ok" or what went wrong."""
    try:
        c = h.SmtpConn(port, timeout=10)
    except ConnectionRefusedError:
        return "refused"
    try:
        r = c.read_reply()
        if r.code != 220 or GREETING not in r.text:
            return "greeting %r" % r.raw
        r = c.cmd("EHLO client.test")
        if r.code != 250:
            return "ehlo %r" % r.raw
        r = c.cmd("QUIT")
        return "ok" if r.code == 221 else "quit %r" % r.raw
    except ConnectionResetError:
        return "reset"
    except (EOFError, socket.timeout, OSError) as e:
        return "%s: %s" % (type(e).__name__, e)
    finally:
        c.close()


class ConnectLoop:
    """A new session every INTERVAL seconds for DURATION, each in a thread of
    its own; .results holds each outcome."""

    def __init__(self, port, interval=0.01, duration=3.0):
        self.port, self.interval, self.duration = port, interval, duration
        self.results = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _one(self):
        r = ehlo_quit(self.port)
        with self.lock:
            self.results.append(r)

    def _run(self):
        threads = []
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < self.duration:
            t = threading.Thread(target=self._one, daemon=True)
            t.start()
            threads.append(t)
            n += 1
            time.sleep(max(0, start + n * self.interval - time.monotonic()))
        for t in threads:
            t.join(30)

    def join(self):
        self.thread.join(60)
        return self.results


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_upgrade_under_a_connect_loop_loses_nothing(launch, make_scripted, workers):
    up = make_scripted()
    proxy = launch(up, workers=workers)
    port = proxy.port
    inode = listen_inode(port)
    assert inode and inode in socket_inodes(proxy.pid)

    # A transaction open in the old process across the switch.
    c = h.SmtpConn(port)
    c.greeting(220)
    c.expect("EHLO client.test", 250)
    c.begin_data()
    c.send(b"Subject: across the upgrade\r\n\r\nfirst half\r\n")

    loop = ConnectLoop(port)
    time.sleep(1.0)
    new = upgraded(proxy)
    results = loop.join()

    bad = [r for r in results if r != "ok"]
    assert len(results) >= 250, "the loop made only %d sessions" % len(results)
    assert not bad, "%d of %d sessions failed: %r" % (len(bad), len(results), bad[:10])
    # Sessions were accepted by both processes (the old one until ready).
    assert proxy.exit_code is None and proxy.alive(), "the old process left mid-transaction"

    c.send(b"second half\r\n.\r\n")
    r = c.read_reply()
    assert r.code == 250, "end of data after the upgrade: %r" % r.raw
    c.expect("QUIT", 221)
    c.close()
    assert wait_old_exit(proxy) == 0
    assert any(b"second half" in m["content"] for m in up.messages)

    # The same listening socket, now only in the new process.
    assert listen_inode(port) == inode
    assert inode in socket_inodes(new.pid)
    assert ehlo_quit(port) == "ok"


def http_get(port, path):
    """The status code of GET PATH on 127.0.0.1:PORT, or the error."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET %s HTTP/1.0\r\n\r\n" % path.encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        return int(data.split(b" ", 2)[1])
    except OSError as e:
        return "error: %s" % e


def test_the_admin_socket_is_handed_over_too(launch, make_scripted):
    """[admin] is a listening socket like the others: the new process takes
    it over (it could not bind it while the old one holds it), scrapes are
    answered throughout, and the old process stops answering at the
    hand-over (its /readyz would say 503)."""
    up = make_scripted()
    proxy = launch(up, admin=True)
    port = int(proxy.wait_event("admin_listening")["addr"].rsplit(":", 1)[1])
    inode = listen_inode(port)
    assert http_get(port, "/healthz") == 200 and inode in socket_inodes(proxy.pid)

    codes, stop = [], threading.Event()

    def scrape():
        while not stop.is_set():
            codes.append(http_get(port, "/readyz"))
            time.sleep(0.01)
    t = threading.Thread(target=scrape)
    t.start()
    try:
        time.sleep(0.3)
        new = upgraded(proxy)
        assert wait_old_exit(proxy) == 0
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    assert codes and all(c == 200 for c in codes), [c for c in codes if c != 200][:5]
    assert listen_inode(port) == inode and inode in socket_inodes(new.pid)
    assert http_get(port, "/metrics") == 200
    assert ehlo_quit(proxy.port) == "ok"


def test_a_session_greeted_by_the_old_process_is_not_sent_away(launch, make_scripted):
    """Idle between commands at the hand-over: no 421, the session goes on."""
    up = make_scripted()
    proxy = launch(up)
    c = h.SmtpConn(proxy.port)
    c.greeting(220)
    upgraded(proxy)
    assert c.pending(0.5) == b"", "the old process said something on its own"
    c.expect("EHLO client.test", 250)
    assert h.send_message(c, b"Subject: t\r\n\r\nbody\r\n").code == 250
    c.expect("QUIT", 221)
    c.close()
    assert wait_old_exit(proxy) == 0


def test_sigterm_to_the_old_process_after_the_hand_over_drains_it_as_usual(launch,
                                                                           make_scripted):
    """The old process is draining its own way (no 421); a SIGTERM then (as
    systemctl stop sends to every process) is a first SIGTERM: a message
    under way finishes, then the 421."""
    up = make_scripted()
    proxy = launch(up)
    c = h.SmtpConn(proxy.port)
    c.greeting(220)
    c.expect("EHLO client.test", 250)
    c.begin_data()
    c.send(b"Subject: t\r\n\r\nfirst\r\n")
    upgraded(proxy)
    os.kill(proxy.pid, signal.SIGTERM)
    proxy.wait_event("stopping", signal="Terminated", mode="drain")
    assert c.pending(0.3) == b"", "a reply mid-message"
    c.send(b"second\r\n.\r\n")
    r = c.read_reply()
    assert r.code == 250, r.raw
    assert c.read_reply().raw == hu.SHUTTING_DOWN
    c.close()
    assert wait_old_exit(proxy) == 0


def test_bad_configuration_at_upgrade_time_leaves_the_old_process_serving(launch, make_scripted):
    up = make_scripted()
    proxy = launch(up)
    good = proxy.config_text
    hu.write_config(proxy, good + "this is not a key\n")
    ev = sigusr2(proxy)
    assert ev["status"] == "failed"
    bad_line = len(good.splitlines()) + 1
    assert "stp.conf:%d:" % bad_line in ev["reason"], ev
    time.sleep(0.3)
    assert proxy.alive()
    assert ehlo_quit(proxy.port) == "ok"
    assert not h.wait_until(lambda: proxy.events("started")[1:], 0.3)

    # Fixed, the next SIGUSR2 goes through.
    hu.write_config(proxy, good)
    upgraded(proxy)
    assert wait_old_exit(proxy) == 0
    assert ehlo_quit(proxy.port) == "ok"


def test_port_zero_listeners_keep_their_own_sockets_by_name(launch, make_scripted):
    """Three listeners at 127.0.0.1:0, one socket each: the new process
    matches them by name,
    each keeps its port and inode; one removed from the file is closed."""
    odd = "b.2-x"
    up = make_scripted()
    proxy = launch(up, extra_listeners=[(odd, {}), ("gone", {})])
    ports = dict(proxy.ports)
    assert len(set(ports.values())) == 3, ports
    inodes = {n: listen_inode(p) for n, p in ports.items()}
    hu.write_config(proxy, hu.remove_section(proxy.config_text, "[listener gone]"))
    new = upgraded(proxy)
    assert wait_old_exit(proxy) == 0
    for name in ("main", odd):
        assert listen_inode(ports[name]) == inodes[name], name
        assert inodes[name] in socket_inodes(new.pid)
        assert ehlo_quit(ports[name]) == "ok"
    assert listen_inode(ports["gone"]) is None
    assert inodes["gone"] not in socket_inodes(new.pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", ports["gone"]), timeout=3).close()


def wrapper(path, body, real):
    """Replace the binary at PATH, as an operator installing a new version
    would (rename over it), with a shell script: BODY, then exec REAL."""
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write("#!/bin/sh\n%s\nexec %s \"$@\"\n" % (body, real))
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)


def test_the_new_binary_is_the_file_at_the_path_now(launch, make_scripted, stp_bin, tmp_path):
    """The path is started again, not the old (replaced) inode: a wrapper
    installed there runs, and its failure (exit 3) is reported."""
    binary = str(tmp_path / "starttls-proxy")
    shutil.copy(stp_bin, binary)
    up = make_scripted()
    proxy = launch(up, binary=binary)
    wrapper(binary, "exit 3", stp_bin)
    ev = sigusr2(proxy)
    assert ev["status"] == "failed" and "exited with status 3" in ev["reason"], ev
    assert ehlo_quit(proxy.port) == "ok"
    wrapper(binary, "kill -SEGV $$", stp_bin)
    ev = sigusr2(proxy)
    assert ev["status"] == "failed" and "signal 11" in ev["reason"], ev
    assert ehlo_quit(proxy.port) == "ok"
    assert proxy.alive()


def test_a_second_sigusr2_during_an_upgrade_is_ignored(launch, make_scripted, stp_bin, tmp_path):
    binary = str(tmp_path / "starttls-proxy")
    shutil.copy(stp_bin, binary)
    up = make_scripted()
    proxy = launch(up, binary=binary)
    wrapper(binary, "sleep 1.5", stp_bin)      # a slow start
    os.kill(proxy.pid, signal.SIGUSR2)
    assert proxy.wait_event("upgrade", status="started")
    os.kill(proxy.pid, signal.SIGUSR2)
    ign = proxy.wait_event("upgrade", status="ignored")
    assert "under way" in ign["reason"]
    assert h.wait_until(lambda: upgrade_events(proxy, "ok"), 10)
    assert len(upgrade_events(proxy, "started")) == 1
    new = Successor(proxy, int(upgrade_events(proxy, "ok")[0]["new_pid"]))
    proxy.successors.append(new)
    assert wait_old_exit(proxy) == 0
    assert ehlo_quit(proxy.port) == "ok"
    # The new process upgrades in turn (it hands over what it inherited).
    before = len(upgrade_events(proxy, "ok"))
    new.send_signal(signal.SIGUSR2)
    assert h.wait_until(lambda: upgrade_events(proxy, "ok")[before:], 10), proxy.log_tail()
    third = Successor(proxy, int(upgrade_events(proxy, "ok")[-1]["new_pid"]))
    proxy.successors.append(third)
    assert h.wait_until(lambda: not new.alive(), 10)
    assert new.exit_code == 0
    assert ehlo_quit(proxy.port) == "ok"


def test_a_new_process_never_ready_is_killed_after_30s(launch, make_scripted, stp_bin,
                                                       tmp_path):
    binary = str(tmp_path / "starttls-proxy")
    shutil.copy(stp_bin, binary)
    up = make_scripted()
    proxy = launch(up, binary=binary)
    wrapper(binary, "exec sleep 120", stp_bin)     # starts, never says ready
    t0 = time.monotonic()
    ev = sigusr2(proxy, timeout=45)
    assert ev["status"] == "failed" and "not ready within 30 s" in ev["reason"], ev
    assert 29 < time.monotonic() - t0 < 40
    stuck = int(ev["new_pid"])
    assert h.wait_until(lambda: not os.path.exists("/proc/%d" % stuck), 5), "not killed"
    assert proxy.alive() and ehlo_quit(proxy.port) == "ok"


def test_sigterm_during_an_upgrade_stops_both(launch, make_scripted, stp_bin, tmp_path):
    binary = str(tmp_path / "starttls-proxy")
    shutil.copy(stp_bin, binary)
    up = make_scripted()
    proxy = launch(up, binary=binary)
    wrapper(binary, "sleep 2", stp_bin)
    os.kill(proxy.pid, signal.SIGUSR2)
    started = proxy.wait_event("upgrade", status="started")
    assert proxy.stop() == 0
    ev = proxy.wait_event("upgrade", status="failed")
    assert ev["reason"] == "stopping"
    pid = int(started["new_pid"])
    assert h.wait_until(lambda: not os.path.exists("/proc/%d" % pid) or
                        Successor(proxy, pid)._reap() is not None, 10), "new process left running"


def free_low_port():
    for port in range(700, 1000):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    pytest.skip("no free port below 1024")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_after_dropping_root_the_new_process_keeps_port_below_1024(launch, make_scripted,
                                                                   stp_bin):
    """Started as root, the old process bound a port below 1024 and became
    nobody; the new one starts as nobody, cannot bind that port, and needs
    not: it inherits the socket."""
    nobody = pwd.getpwnam("nobody")
    # Everything the new process reads must be readable by nobody.
    d = tempfile.mkdtemp(prefix="stp-upgrade-")
    os.chmod(d, 0o755)
    binary = os.path.join(d, "starttls-proxy")
    shutil.copy(stp_bin, binary)
    os.chmod(binary, 0o755)
    try:
        up = make_scripted()
        port = free_low_port()
        proxy = launch(up, binary=binary, proxy_opts={"user": "nobody"},
                       workdir=os.path.join(d, "w"), listen="127.0.0.1:%d" % port)
        os.chmod(proxy.workdir, 0o755)
        os.chmod(proxy.config_path, 0o644)
        proxy.wait_event("started")
        assert hu.proc_status(proxy.pid)["Uid"].split()[0] == str(nobody.pw_uid)
        inode = listen_inode(port)
        new = upgraded(proxy)
        assert hu.proc_status(new.pid)["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert wait_old_exit(proxy) == 0
        # The old process is gone and the same socket listens: the new one
        # holds it. (Its descriptors are nobody's: root without
        # CAP_SYS_PTRACE, as in an unprivileged container, cannot list them.)
        assert listen_inode(port) == inode
        try:
            assert inode in socket_inodes(new.pid)
        except PermissionError:
            pass
        assert ehlo_quit(port) == "ok"
    finally:
        os.unlink(binary)   # the directory keeps the log for a post-mortem


class NotifySocket:
    """A stand-in for systemd's notification socket: each datagram with the
    pid of its sender (SO_PASSCRED)."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.sock.settimeout(5)

    def recv(self):
        """(sender pid, text)."""
        msg, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(data[:4], "little")
        return pid, msg.decode()

    def pending(self, wait=0.3):
        self.sock.settimeout(wait)
        try:
            return self.recv()
        except socket.timeout:
            return None
        finally:
            self.sock.settimeout(5)


def test_systemd_notify_follows_the_new_main_process(launch, make_scripted, tmp_path):
    """Type=notify: READY=1 at start; on the hand-over the old (main)
    process names the new one with MAINPID=; the new one sends nothing of
    its own until it is the main process; STOPPING=1 on SIGTERM."""
    ns = NotifySocket(str(tmp_path / "notify"))
    up = make_scripted()
    proxy = launch(up, env={"NOTIFY_SOCKET": ns.path})
    assert ns.recv() == (proxy.pid, "READY=1")
    new = upgraded(proxy)
    assert ns.recv() == (proxy.pid, "MAINPID=%d\nREADY=1" % new.pid)
    assert wait_old_exit(proxy) == 0
    assert ns.pending() is None, "the old process said more, or the new one spoke"
    assert ehlo_quit(proxy.port) == "ok"
    assert new.stop() == 0
    assert ns.recv() == (new.pid, "STOPPING=1")
