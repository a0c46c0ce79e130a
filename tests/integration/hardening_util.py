"""Shared helpers for the hardening tests (limits, deadlines, faults, reload
and drain, privileges, resources, TLS audit).

Built on stp_harness.py and conftest.py (make_proxy, make_scripted,
tls_files), which stay untouched: what they lack is wrapped here.

* start()          -- make_proxy with [proxy] options.
* FaultUpstream    -- a threaded upstream speaking ordinary SMTP, except
                      where a hook (per verb, or at the end of data) takes
                      over the socket: hang up, reset, cut a reply...
* ClientHello bytes, source-bound connections, reply readers that tolerate
  a reply cut by a close, RSS and descriptor sampling, config rewriting and
  SIGHUP, certificate generation.
"""

import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time

import pytest

import stp_harness as h

HOSTNAME = "proxy.test"          # conftest's [proxy] hostname
TOO_MANY_CONNECTIONS = b"421 4.7.0 proxy.test Error: too many connections\r\n"
TOO_MANY_ERRORS = b"421 4.7.0 proxy.test Error: too many errors\r\n"
TIMEOUT_EXCEEDED = b"421 4.4.2 proxy.test Error: timeout exceeded\r\n"
UPSTREAM_LOST = b"421 4.4.2 Upstream connection lost\r\n"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, closing transmission channel\r\n"


# ---------------------------------------------------------------------------
# configuration

def start(make_proxy, upstream, proxy=None, **listener):
    """make_proxy(UPSTREAM, proxy_opts=PROXY, **LISTENER). Run as root,
    stp_harness.render_config adds ``user = root`` unless PROXY sets
    ``user`` (None leaves the key out)."""
    return make_proxy(upstream, proxy_opts=dict(proxy or {}), **listener)


def listener_section(name, port, tls_files, **opts):
    """Text of a [listener NAME] section with conftest's defaults."""
    o = {"listen": "127.0.0.1:%d" % port, "tls": "starttls", "require_tls": "yes",
         "cert": tls_files["cert"], "key": tls_files["key"], "upstream": "up",
         "max_line": "2048", "timeout_idle": "30s"}
    o.update(opts)
    return "\n[listener %s]\n" % name + "".join(
        "%s = %s\n" % (k, v) for k, v in o.items() if v is not None)


def remove_section(text, header):
    """TEXT without the section whose header line is HEADER ("[listener x]")."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("["):
            skipping = line.strip() == header
        if not skipping:
            out.append(line)
    return "".join(out)


def set_key(text, section, key, value):
    """TEXT with KEY in [SECTION] set to VALUE (added if missing)."""
    lines = text.splitlines()
    out, in_sect, done = [], False, False
    for line in lines:
        if line.startswith("["):
            if in_sect and not done:
                out.append("%s = %s" % (key, value))
                done = True
            in_sect = line.strip() == "[%s]" % section
        elif in_sect and re.match(r"\s*%s\s*=" % re.escape(key), line):
            line = "%s = %s" % (key, value)
            done = True
        out.append(line)
    if in_sect and not done:
        out.append("%s = %s" % (key, value))
        done = True
    assert done, "no section [%s] in config" % section
    return "\n".join(out) + "\n"


def write_config(proxy, text):
    """Replace the daemon's config file as an operator would (rename)."""
    tmp = proxy.config_path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, proxy.config_path)
    proxy.config_text = text


def reload_events(proxy):
    return proxy.events("reload")


def reload(proxy, text=None, timeout=10.0, settle=0.3):
    """Optionally rewrite the config, send SIGHUP and return every
    event=reload logged for it (waits for the first, then SETTLE seconds
    more: one SIGHUP must not log both ok and failed)."""
    before = len(reload_events(proxy))
    if text is not None:
        write_config(proxy, text)
    proxy.send_signal(signal.SIGHUP)
    ev = h.wait_until(lambda: reload_events(proxy)[before:] or None, timeout)
    if not ev:
        pytest.fail("no event=reload within %.0fs of SIGHUP (daemon alive: %s)\nstderr:\n%s"
                    % (timeout, proxy.alive(), proxy.log_tail()), pytrace=False)
    time.sleep(settle)
    return reload_events(proxy)[before:]


def reload_status(events):
    """The one status the events of a SIGHUP agree on, or a failure naming
    the contradiction."""
    statuses = {e.get("status") for e in events}
    assert len(statuses) == 1, "one SIGHUP logged contradictory reload events:\n%s" % (
        "\n".join(e["_line"] for e in events))
    return statuses.pop()


# ---------------------------------------------------------------------------
# connection limits

def greeted(port, source=None):
    """A connection that got its 220 greeting (a session the proxy accepted)."""
    c = connect_from(port, source) if source else h.SmtpConn(port)
    c.greeting(220)
    return c


def try_greeted(port):
    """A connection if it got a 220 greeting, else None (closed)."""
    c = h.SmtpConn(port)
    r = c.read_reply()
    if r.code == 220:
        return c
    c.close()
    return None


def assert_refused(port, source=None):
    """The next connection gets exactly the too-many-connections 421, then EOF."""
    c = connect_from(port, source) if source else h.SmtpConn(port)
    with c:
        got = c.read_until_closed(timeout=5)
    assert got == TOO_MANY_CONNECTIONS, "expected only %r then a close, got %r" % (
        TOO_MANY_CONNECTIONS, got)


# ---------------------------------------------------------------------------
# certificates


def make_cert(directory, cn, kind="ec"):
    """A self-signed certificate for CN (kind "ec" P-256 or "rsa" 2048).
    Returns {"cert": path, "key": path}."""
    openssl = h.require_program("openssl", "openssl")
    os.makedirs(directory, exist_ok=True)
    cert = os.path.join(directory, "%s.crt" % cn)
    key = os.path.join(directory, "%s.key" % cn)
    if kind == "ec":
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    else:
        newkey = ["-newkey", "rsa:2048"]
    subprocess.run([openssl, "req", "-x509"] + newkey +
                   ["-nodes", "-subj", "/CN=%s" % cn, "-addext", "subjectAltName=DNS:%s" % cn,
                    "-days", "30", "-keyout", key, "-out", cert],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    return {"cert": cert, "key": key}


def cert_der(path):
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


# ---------------------------------------------------------------------------
# clients


def client_hello():
    """The bytes of a real TLS ClientHello (as Python's client sends it)."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = h.client_tls_context().wrap_bio(inc, out, server_hostname=HOSTNAME)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = out.read()
    assert data[:1] == b"\x16" and len(data) > 100, data[:16]
    return data


def connect_from(port, source, timeout=h.IO_TIMEOUT):
    """An SmtpConn to 127.0.0.1:PORT from source address SOURCE (127.x.y.z)."""
    # SmtpConn connects in its constructor: build one around our own socket.
    c = h.SmtpConn.__new__(h.SmtpConn)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    c.sock = c.raw_sock = s
    c.buf = b""
    c.tls = False
    return c


def reset_close(sock):
    """Close with a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_lines_until_final(conn, timeout=10.0):
    """Read reply lines until one is final ("NNN " or "NNN"), or the peer
    closes. Returns (lines, closed). Does not insist that all lines carry
    one code (a reply cut by the proxy's own 421 need not)."""
    conn.sock.settimeout(timeout)
    lines = []
    while True:
        try:
            line = conn.read_line()
        except EOFError:
            return lines, True
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return lines, True
        lines.append(line)
        if re.match(rb"^\d{3}(?: |\r?\n)", line):
            return lines, False


def poll_recv(conn, wait):
    """Bytes the server sent within WAIT seconds: None if nothing came, b""
    on EOF or reset. Works on plain and TLS sockets alike (reads, does not
    peek)."""
    if conn.buf:
        d, conn.buf = conn.buf, b""
        return d
    conn.sock.settimeout(wait)
    try:
        return conn.sock.recv(65536)
    except (socket.timeout, ssl.SSLWantReadError):
        return None
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return b""


def receive_rest(conn, first, timeout=5.0):
    """FIRST (from poll_recv) plus everything until the close."""
    if first == b"":
        return b""
    return first + conn.read_until_closed(timeout=timeout)


def drip(conn, pieces, wait, timeout=3.0, default=None, send_errors=()):
    """Send PIECES one at a time, polling WAIT seconds after each for the
    server's answer. Returns what came (through receive_rest, TIMEOUT to
    the close), b"" when a send raised one of SEND_ERRORS, or DEFAULT when
    every piece went out without an answer."""
    for piece in pieces:
        try:
            conn.send(piece)
        except send_errors:
            return b""
        d = poll_recv(conn, wait)
        if d is not None:
            return receive_rest(conn, d, timeout=timeout)
    return default


def is_closed(conn, timeout=5.0):
    """True when the peer closed (EOF or reset) within TIMEOUT with nothing
    more to read; raises if data arrives instead."""
    try:
        rest = conn.read_until_closed(timeout=timeout)
    except AssertionError:
        return False
    assert rest == b"" or rest.startswith(b"<"), "bytes before the close: %r" % rest
    return True


def tls_session(port, timeout=10.0, host="127.0.0.1"):
    """A TLS session through PORT, EHLO done (wraps h.open_session)."""
    c, _ = h.open_session(port, host=host, tls=True, timeout=timeout)
    return c


def implicit_session(port, timeout=10.0):
    """A session on an implicit-TLS listener: TLS first, greeting, EHLO."""
    c = h.SmtpConn(port, timeout=timeout)
    c.starttls()
    c.greeting()
    c.expect("EHLO client.test", 250)
    return c


def send_message(conn, body=b"Subject: t\r\n\r\nbody\r\n", mail="b@example.org",
                 rcpt="a@example.net"):
    """MAIL, RCPT, DATA, BODY, dot on an open session; returns the final reply."""
    conn.expect("MAIL FROM:<%s>" % mail, 250)
    conn.expect("RCPT TO:<%s>" % rcpt, 250)
    conn.expect("DATA", 354)
    conn.send(body + b".\r\n")
    return conn.read_reply()


def deliver(port, body=b"Subject: t\r\n\r\nbody\r\n", timeout=10.0, **kw):
    """A whole STARTTLS session delivering BODY; returns the end-of-data reply."""
    c = tls_session(port, timeout=timeout)
    with c:
        r = send_message(c, body, **kw)
        if r.code == 250:
            c.expect("QUIT", 221)
        return r


# ---------------------------------------------------------------------------
# the daemon as a process


_sanitized = {}


def sanitized():
    """Whether the daemon binary is built with AddressSanitizer (its
    quarantine keeps freed memory for a while: RSS bounds mean nothing)."""
    binary = h.daemon_binary()
    if binary not in _sanitized:
        with open(binary, "rb") as f:
            _sanitized[binary] = b"__asan_init" in f.read()
    return _sanitized[binary]


def assert_rss_growth(grown_kib, limit_kib, what):
    """VmRSS grew by less than LIMIT_KIB (skipped under ASan, see sanitized)."""
    if sanitized():
        return
    assert grown_kib < limit_kib, "VmRSS grew by %d KiB %s (limit %d KiB)" % (
        grown_kib, what, limit_kib)


SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "assertion failed")


def assert_clean_exit(proxy, rc):
    """For daemons a test stopped itself (conftest then skips its checks):
    exit code 0 and no sanitizer report in the log."""
    text = proxy.log_text()
    found = [m for m in SANITIZER_MARKERS if m in text]
    assert not found, "daemon log contains %r:\n%s" % (found, proxy.log_tail(40))
    assert rc == 0, "exit code %r, expected 0:\n%s" % (rc, proxy.log_tail())


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def proc_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


class RssSampler:
    """Samples VmRSS of PID every few milliseconds in a thread; .peak (KiB)."""

    def __init__(self, pid, interval=0.01):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, h.rss_kib(self.pid))
            except (OSError, AssertionError):
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = h.rss_kib(self.pid)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(2)


def run_briefly(stp_bin, path, timeout=5):
    """Run the daemon on the config file PATH; returns (exit code, or None if
    it was still running after TIMEOUT, stderr). Stops it if running."""
    p = subprocess.Popen([stp_bin, "-c", str(path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = p.communicate(timeout=timeout)
        return p.returncode, err.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=10)
        return None, err.decode("utf-8", "replace")


def wait_exit(proxy, timeout):
    """Wait for the daemon to exit on its own; returns the exit code or None."""
    try:
        rc = proxy.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    proxy.exit_code = rc
    proxy._close_log()
    return rc


# ---------------------------------------------------------------------------
# an upstream whose faults are scripted per verb


class FaultSession:
    def __init__(self, index):
        self.index = index
        self.commands = []
        self.closed = threading.Event()


class Peer:
    """What a hook gets: the upstream's side of one session."""

    def __init__(self, conn, sess, reader):
        self.conn = conn
        self.sess = sess
        self._reader = reader

    def send(self, data):
        self.conn.sendall(data)

    def read_line(self):
        return self._reader()

    def hang_up(self):
        """FIN: shutdown and close."""
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()

    def reset(self):
        """RST: close with SO_LINGER 0."""
        reset_close(self.conn)


class FaultUpstream(h.ThreadedUpstream):
    """A threaded upstream speaking ordinary SMTP (greeting, EHLO, MAIL,
    RCPT, DATA, RSET, NOOP, QUIT), except where a hook takes over.

    hooks: {VERB: fn(peer, line)} called instead of the normal reply to
           VERB, and {"DATA_END": fn(peer, content)} called instead of the
           250 once a whole message has been read. A hook returns True to go
           on with the session, anything else to end it (closing the socket
           if the hook has not).
    fault_sessions: how many sessions (from the first) get the hooks (1).
    messages: the messages this upstream acknowledged with 250.
    """

    EHLO = [b"upstream.test hello", b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES"]
    RECORD = FaultSession
    BACKLOG = 128
    JOIN_WORKERS = False

    def __init__(self, hooks=None, fault_sessions=1, ehlo=None):
        self.hooks = {k.upper(): v for k, v in (hooks or {}).items()}
        self.fault_sessions = fault_sessions
        self.ehlo = list(ehlo or self.EHLO)
        self.sessions = []
        self.messages = []
        self.lock = threading.Condition()
        self._listen("127.0.0.1")

    def wait_sessions(self, n, timeout=5.0):
        self._wait_records(n, timeout)

    def _serve(self, conn, sess):
        conn.settimeout(30)
        buf = bytearray()

        def read_line():
            while True:
                i = buf.find(b"\n")
                if i >= 0:
                    line = bytes(buf[:i + 1])
                    del buf[:i + 1]
                    return line
                d = conn.recv(65536)
                if not d:
                    raise EOFError
                buf.extend(d)

        peer = Peer(conn, sess, read_line)
        hooks = self.hooks if sess.index < self.fault_sessions else {}

        def reply(code, lines):
            peer.send(b"".join(b"%d%s%s\r\n" % (code, b"-" if i < len(lines) - 1 else b" ", t)
                               for i, t in enumerate(lines)))

        try:
            reply(220, [b"upstream.test ESMTP fault"])
            while True:
                line = read_line().rstrip(b"\n").rstrip(b"\r")
                with self.lock:
                    sess.commands.append(line)
                verb = h.command_verb(line)
                if verb in hooks:
                    if hooks[verb](peer, line) is True:
                        continue
                    return
                if verb == "EHLO":
                    reply(250, self.ehlo)
                elif verb == "DATA":
                    reply(354, [b"go ahead"])
                    parts = []
                    while True:
                        l = read_line()
                        if l.rstrip(b"\r\n") == b".":
                            break
                        parts.append(l)
                    content = b"".join(parts)
                    if "DATA_END" in hooks:
                        if hooks["DATA_END"](peer, content) is True:
                            continue
                        return
                    with self.lock:
                        self.messages.append(content)
                        n = len(self.messages)
                        self.lock.notify_all()
                    reply(250, [b"2.0.0 Ok: queued as FAULT%d" % n])
                elif verb == "QUIT":
                    reply(221, [b"2.0.0 Bye"])
                    return
                elif verb in ("MAIL", "RCPT", "RSET", "NOOP", "HELO"):
                    reply(250, [b"2.0.0 Ok"])
                else:
                    reply(502, [b"5.5.2 Error: command not recognized"])
        except (EOFError, OSError):
            pass
        finally:
            self._close(conn, sess)


@pytest.fixture
def make_fault_upstream():
    yield from h.started_factory(FaultUpstream)
