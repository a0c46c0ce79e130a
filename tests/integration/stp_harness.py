"""Helpers for the starttls-proxy integration tests.

Everything here talks to real sockets and real processes:

* Proxy            -- writes a config, starts the daemon, waits for
                      ``event=listening`` in its log, stops it by PID.
* ScriptedUpstream -- a threaded SMTP server with configurable greeting, EHLO
                      lines and faults that records every line it receives.
* AioUpstream      -- aiosmtpd in a thread, keeping the raw message bytes.
* SmtpConn         -- a raw-socket SMTP client that reads replies exactly and
                      can switch to TLS on the same socket.

Every socket has a timeout so that a hung daemon fails a test quickly.
"""

import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

IO_TIMEOUT = 5.0        # default per-socket timeout, seconds
START_TIMEOUT = 10.0    # daemon start-up (until event=listening)
STOP_TIMEOUT = 10.0     # daemon shutdown after SIGTERM


# ---------------------------------------------------------------------------
# environment


def daemon_binary():
    path = os.environ.get("STP_BIN") or os.path.join(REPO, "build", "starttls-proxy")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(
            "starttls-proxy binary not found at %r (set STP_BIN, or build it: "
            "cmake -S . -B build && cmake --build build)" % path,
            pytrace=False,
        )
    return path


def require_program(name, package, paths=()):
    """Absolute path of NAME, or FAIL naming the Debian package."""
    for p in paths:
        if os.access(p, os.X_OK):
            return p
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        pytest.fail(
            "required program %r not found: install the Debian package %r" % (name, package),
            pytrace=False,
        )
    return found


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def client_tls_context():
    """TLS client context that does not verify (the proxy uses a test cert)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def wait_until(pred, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


# ---------------------------------------------------------------------------
# the daemon

LOG_KV = re.compile(r'([A-Za-z_][A-Za-z0-9_.-]*)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_log_line(line):
    """'<ts> <level> id=.. event=.. k=v' -> dict (ts, level, and the pairs)."""
    parts = line.split(" ", 2)
    if len(parts) < 3:
        return None
    d = {"ts": parts[0], "level": parts[1], "_line": line}
    for k, v in LOG_KV.findall(parts[2]):
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            v = v[1:-1]
        d.setdefault(k, v)
    return d


def render_config(proxy=None, listeners=(), upstreams=()):
    """listeners/upstreams: sequences of (name, {key: value}). Returns text."""
    out = ["[proxy]"]
    for k, v in (proxy or {}).items():
        out.append("%s = %s" % (k, v))
    for name, opts in listeners:
        out.append("")
        out.append("[listener %s]" % name)
        for k, v in opts.items():
            if v is not None:
                out.append("%s = %s" % (k, v))
    for name, opts in upstreams:
        out.append("")
        out.append("[upstream %s]" % name)
        for k, v in opts.items():
            if v is not None:
                out.append("%s = %s" % (k, v))
    return "\n".join(out) + "\n"


class Proxy:
    """One running starttls-proxy process."""

    def __init__(self, binary, workdir, config_text, n_listeners=1):
        self.binary = binary
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.config_path = os.path.join(workdir, "stp.conf")
        with open(self.config_path, "w") as f:
            f.write(config_text)
        self.config_text = config_text
        self.log_path = os.path.join(workdir, "stp.log")
        self.n_listeners = n_listeners
        self.proc = None
        self.exit_code = None

    # -- lifecycle --

    def start(self):
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.binary, "-c", self.config_path],
            stdin=subprocess.DEVNULL, stdout=self._logf, stderr=self._logf,
            cwd=self.workdir,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            n = sum(1 for l in self.log_lines() if "event=listening" in l)
            if n >= self.n_listeners:
                return self
            rc = self.proc.poll()
            if rc is not None:
                self.exit_code = rc
                self._close_log()
                pytest.fail(
                    "starttls-proxy exited with code %s before listening.\nconfig:\n%s\nstderr:\n%s"
                    % (rc, self.config_text, self.log_text()),
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                self.kill()
                self.exit_code = self.proc.returncode
                pytest.fail(
                    "starttls-proxy did not log event=listening (%d expected) within %.0fs.\n"
                    "config:\n%s\nstderr:\n%s"
                    % (self.n_listeners, START_TIMEOUT, self.config_text, self.log_text()),
                    pytrace=False,
                )
            time.sleep(0.02)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Signal the daemon and return its exit code (kills it on timeout)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self._close_log()
                raise AssertionError(
                    "starttls-proxy did not exit within %.0fs of signal %d\nstderr:\n%s"
                    % (timeout, sig, self.log_tail()))
        self.exit_code = self.proc.returncode
        self._close_log()
        return self.exit_code

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._close_log()

    def _close_log(self):
        f = getattr(self, "_logf", None)
        if f and not f.closed:
            f.close()

    def check_and_stop(self):
        """Teardown: the daemon must still be running, must stop with exit code
        0 on SIGTERM and must not have reported sanitizer errors."""
        problems = []
        rc = self.proc.poll()
        if rc is not None:
            problems.append("starttls-proxy died during the test (exit code %s)" % rc)
        else:
            try:
                rc = self.stop()
            except AssertionError as e:
                problems.append(str(e))
                rc = 0
            if rc != 0:
                problems.append("starttls-proxy exited with code %s on SIGTERM (expected 0)" % rc)
        text = self.log_text()
        for marker in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                       "assertion failed"):
            if marker in text:
                problems.append("daemon log contains %r" % marker)
        if problems:
            pytest.fail("\n".join(problems) + "\nstderr:\n" + self.log_tail(), pytrace=False)

    # -- log --

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=60):
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_lines(self):
        return self.log_text().splitlines()

    def events(self, name=None):
        out = []
        for line in self.log_lines():
            d = parse_log_line(line)
            if d and "event" in d and (name is None or d["event"] == name):
                out.append(d)
        return out

    def wait_event(self, name, timeout=5.0, **match):
        """First log event NAME whose keys equal MATCH; fails on timeout."""
        def find():
            for e in self.events(name):
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            return None
        e = wait_until(find, timeout)
        if not e:
            pytest.fail("no log line event=%s %s within %.1fs\nstderr:\n%s"
                        % (name, match, timeout, self.log_tail()), pytrace=False)
        return e

    def session_id_for(self, client_sock, timeout=5.0):
        """The id= of the connect event for this client socket."""
        host, port = client_sock.getsockname()[:2]
        want = ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)
        return self.wait_event("connect", timeout, client=want)["id"]


# ---------------------------------------------------------------------------
# a raw-socket SMTP client


class Reply:
    def __init__(self, code, lines, raw):
        self.code = code          # int
        self.lines = lines        # texts after "NNN-"/"NNN "
        self.raw = raw            # exact bytes received

    @property
    def text(self):
        return "\n".join(self.lines)

    def keywords(self):
        """EHLO extension keywords (upper case), first line excluded."""
        return [l.split()[0].upper() for l in self.lines[1:] if l.strip()]

    def __repr__(self):
        return "Reply(%r)" % self.raw


class SmtpConn:
    """SMTP over a plain socket, with an exact view of what the server sent."""

    def __init__(self, port, host="127.0.0.1", timeout=IO_TIMEOUT, family=None):
        if family is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.raw_sock = self.sock
        self.buf = b""
        self.tls = False

    # -- plumbing --

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection; unparsed bytes %r" % self.buf)
        self.buf += data

    def read_line(self):
        while b"\n" not in self.buf:
            self._recv()
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def read_reply(self):
        raw = b""
        lines = []
        code = None
        while True:
            line = self.read_line()
            raw += line
            m = re.match(rb"^(\d{3})([ -])?(.*?)\r?\n$", line, re.S)
            assert m, "not an SMTP reply line: %r (reply so far %r)" % (line, raw)
            c = int(m.group(1))
            assert code is None or c == code, "reply code changed inside a reply: %r" % raw
            code = c
            lines.append(m.group(3).decode("utf-8", "replace"))
            if m.group(2) != b"-":
                return Reply(code, lines, raw)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def cmd(self, line):
        self.send(line.encode() + b"\r\n" if isinstance(line, str) else line + b"\r\n")
        return self.read_reply()

    def expect(self, line, code, text=None):
        r = self.cmd(line)
        assert r.code == code, "%r: expected %d, got %r" % (line, code, r.raw)
        if text is not None:
            assert text in r.text, "%r: expected %r in reply, got %r" % (line, text, r.raw)
        return r

    def greeting(self, code=220):
        r = self.read_reply()
        assert r.code == code, "greeting: expected %d, got %r" % (code, r.raw)
        return r

    def pending(self, wait=0.5):
        """Bytes the server sent that we have not read (waits up to WAIT)."""
        if self.buf:
            return self.buf
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return b"<tls data pending>"
        r, _, _ = select.select([self.sock], [], [], wait)
        if not r:
            return b""
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                return self.sock.recv(65536) or b"<EOF>"
            return self.sock.recv(65536, socket.MSG_PEEK) or b"<EOF>"
        except (ConnectionError, ssl.SSLError, OSError) as e:
            return ("<%s>" % e).encode()

    def starttls(self, ctx=None, server_hostname="proxy.test"):
        """Switch this socket to TLS. Refuses if the server sent anything
        beyond what we have parsed (that would be response injection)."""
        assert not self.buf, "bytes after the 220 to STARTTLS: %r" % self.buf
        self.sock = (ctx or client_tls_context()).wrap_socket(
            self.sock, server_hostname=server_hostname)
        self.tls = True
        return self.sock

    def read_until_closed(self, timeout=IO_TIMEOUT):
        """Read until EOF; returns everything received. Fails on timeout."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        data = self.buf
        self.buf = b""
        while True:
            if time.monotonic() > deadline:
                raise AssertionError("connection not closed within %.1fs; got %r" % (timeout, data))
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise AssertionError("connection not closed within %.1fs; got %r" % (timeout, data))
            except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError, BrokenPipeError):
                return data
            except ssl.SSLError as e:
                # a TLS alert from the peer also ends the connection
                return data + ("<%s>" % e.__class__.__name__).encode()
            if not chunk:
                return data
            data += chunk

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_session(port, host="127.0.0.1", ehlo="client.test", tls=True, timeout=IO_TIMEOUT):
    """Connect, read the greeting, EHLO, and optionally STARTTLS + EHLO again.
    Returns (conn, last_ehlo_reply)."""
    c = SmtpConn(port, host=host, timeout=timeout)
    c.greeting()
    r = c.expect("EHLO " + ehlo, 250)
    if tls:
        c.expect("STARTTLS", 220)
        c.starttls()
        r = c.expect("EHLO " + ehlo, 250)
    return c, r


# ---------------------------------------------------------------------------
# a scripted upstream SMTP server


DEFAULT_EHLO = [
    "upstream.test greets you",
    "PIPELINING",
    "SIZE 100000000",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "AUTH PLAIN LOGIN",
    "STARTTLS",
    "XCLIENT NAME ADDR",
    "XFORWARD NAME",
]


class UpstreamSession:
    def __init__(self, index):
        self.index = index
        self.commands = []     # command lines (bytes, without terminator)
        self.content = []      # raw DATA content per DATA (bytes, as received)
        self.chunks = []       # BDAT chunks of the message in progress
        self.dropped = False   # we cut the connection on purpose
        self.closed = threading.Event()


class ScriptedUpstream:
    """A threaded SMTP server.

    It is deliberately lenient: a line ends at LF (a preceding CR is dropped),
    both for commands and for the end-of-data dot. A proxy that lets a bare LF
    through around the dot therefore gets its "smuggled" command executed here,
    which is what the smuggling tests look for.

    greeting:   list of reply lines (text after the code) for the 220 greeting
    ehlo:       list of EHLO reply lines (first is the domain line)
    replies:    {VERB: b"raw reply bytes"} overrides
    drop_in_data_after: cut the connection once this many content bytes arrived
    fault_sessions:     how many sessions (from the first) get the fault
    data_gate:  a threading.Event; after its 354 the upstream reads no content
                until the event is set (a stalled upstream)
    delays:     {VERB or "DATA_END": seconds} to wait before replying
    greeting_code: 220, or e.g. 421/554 for an upstream that refuses
    """

    def __init__(self, greeting=("upstream.test ESMTP scripted",), ehlo=DEFAULT_EHLO,
                 replies=None, drop_in_data_after=None, fault_sessions=1, host="127.0.0.1",
                 data_gate=None, delays=None, greeting_code=220):
        self.greeting = list(greeting)
        self.ehlo = list(ehlo)
        self.replies = {k.upper(): v for k, v in (replies or {}).items()}
        self.drop_in_data_after = drop_in_data_after
        self.fault_sessions = fault_sessions
        self.data_gate = data_gate
        self.delays = {k.upper(): v for k, v in (delays or {}).items()}
        self.greeting_code = greeting_code
        self.sessions = []
        self.messages = []     # accepted: dict(mail_from, rcpts, content)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        v6 = ":" in host
        self.sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.address = ("[%s]:%d" if v6 else "%s:%d") % (host, self.port)
        self._conns = []
        self._threads = []
        self._stopping = False
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self):
        self._accept_thread.start()
        return self

    def stop(self):
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accept_thread.join(5)
        for t in self._threads:
            t.join(5)

    def hang_up(self):
        """Close every open session from the server side."""
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- views for assertions --

    def all_commands(self):
        with self.lock:
            return [c for s in self.sessions for c in s.commands]

    def saw_verb(self, verb):
        verb = verb.upper().encode()
        return [c for c in self.all_commands() if c.split(b" ", 1)[0].split(b":", 1)[0].upper() == verb]

    def saw_line_containing(self, needle):
        if isinstance(needle, str):
            needle = needle.encode()
        return [c for c in self.all_commands() if needle.lower() in c.lower()]

    def wait_sessions(self, n, timeout=5.0):
        ok = wait_until(lambda: len(self.sessions) >= n, timeout)
        assert ok, "upstream saw %d sessions, expected %d" % (len(self.sessions), n)

    def wait_closed(self, timeout=5.0):
        """Wait until every session seen so far has ended."""
        for s in list(self.sessions):
            assert s.closed.wait(timeout), "upstream session %d still open" % s.index

    def wait_messages(self, n, timeout=10.0):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.messages) >= n, timeout)
        assert ok, "upstream accepted %d messages, expected %d; commands: %r" % (
            len(self.messages), n, self.all_commands())
        return self.messages

    # -- server --

    def _accept_loop(self):
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                sess = UpstreamSession(len(self.sessions))
                self.sessions.append(sess)
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, sess), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn, sess):
        conn.settimeout(30)
        rbuf = bytearray()
        rpos = 0
        faulty = sess.index < self.fault_sessions

        def send(b):
            conn.sendall(b)

        def fill():
            nonlocal rbuf, rpos
            if rpos > 65536:
                del rbuf[:rpos]
                rpos = 0
            d = conn.recv(262144)
            if not d:
                raise EOFError
            rbuf += d

        def read_line():
            nonlocal rpos
            while True:
                i = rbuf.find(b"\n", rpos)
                if i >= 0:
                    line = bytes(rbuf[rpos:i + 1])
                    rpos = i + 1
                    return line
                fill()

        def read_exact(n):
            nonlocal rpos
            while len(rbuf) - rpos < n:
                fill()
            data = bytes(rbuf[rpos:rpos + n])
            rpos += n
            return data

        try:
            g = self.greeting
            if not g:                   # a silent upstream: never greets
                while conn.recv(65536):
                    pass
                return
            send(b"".join(("%d%s%s\r\n" % (self.greeting_code, "-" if i < len(g) - 1 else " ",
                                              t)).encode()
                          for i, t in enumerate(g)))
            if self.greeting_code != 220:
                while conn.recv(65536):
                    pass
                return
            mail_from = None
            rcpts = []
            while True:
                raw = read_line()
                line = raw.rstrip(b"\n").rstrip(b"\r")
                with self.lock:
                    sess.commands.append(line)
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("latin-1")
                arg = line[len(verb):].strip()
                if verb in self.delays:
                    time.sleep(self.delays[verb])
                if verb in self.replies:
                    send(self.replies[verb])
                    if verb == "QUIT":
                        return
                    continue
                if verb == "EHLO":
                    e = self.ehlo
                    send(b"".join(("250%s%s\r\n" % ("-" if i < len(e) - 1 else " ", t)).encode()
                                  for i, t in enumerate(e)))
                    mail_from, rcpts = None, []
                elif verb == "HELO":
                    send(b"250 upstream.test helo-reply\r\n")
                    mail_from, rcpts = None, []
                elif verb == "MAIL":
                    mail_from = arg
                    rcpts = []
                    send(b"250 2.1.0 Ok mail\r\n")
                elif verb == "RCPT":
                    rcpts.append(arg)
                    send(b"250 2.1.5 Ok rcpt " + arg.split(b":", 1)[-1] + b"\r\n")
                elif verb == "DATA":
                    send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    if self.data_gate is not None:
                        self.data_gate.wait(30)
                    parts, size = [], 0
                    while True:
                        if faulty and self.drop_in_data_after is not None \
                                and size >= self.drop_in_data_after:
                            sess.dropped = True
                            with self.lock:
                                sess.content.append(b"".join(parts))
                            conn.shutdown(socket.SHUT_RDWR)
                            return
                        craw = read_line()
                        if craw.rstrip(b"\n").rstrip(b"\r") == b".":
                            break
                        parts.append(craw)
                        size += len(craw)
                    content = b"".join(parts)
                    if "DATA_END" in self.delays:
                        time.sleep(self.delays["DATA_END"])
                    with self.cond:
                        sess.content.append(content)
                        self.messages.append({"mail_from": mail_from, "rcpts": rcpts,
                                              "content": content, "session": sess.index})
                        n = len(self.messages)
                        self.cond.notify_all()
                    send(b"250 2.0.0 Ok: queued as SCRIPTED%d\r\n" % n)
                    mail_from, rcpts = None, []
                elif verb == "BDAT":
                    parts = arg.split()
                    size = int(parts[0])
                    last = len(parts) > 1 and parts[1].upper() == b"LAST"
                    chunk = read_exact(size)
                    with self.lock:
                        sess.chunks.append(chunk)
                    if last:
                        content = b"".join(sess.chunks)
                        sess.chunks = []
                        with self.cond:
                            sess.content.append(content)
                            self.messages.append({"mail_from": mail_from, "rcpts": rcpts,
                                                  "content": content, "session": sess.index})
                            n = len(self.messages)
                            self.cond.notify_all()
                        send(b"250 2.0.0 Ok: %d octets, queued as SCRIPTED%d\r\n" % (size, n))
                        mail_from, rcpts = None, []
                    else:
                        send(b"250 2.0.0 Ok: %d octets received\r\n" % size)
                elif verb == "RSET":
                    mail_from, rcpts = None, []
                    sess.chunks = []
                    send(b"250 2.0.0 Ok rset\r\n")
                elif verb == "NOOP":
                    send(b"250 2.0.0 Ok noop\r\n")
                elif verb == "VRFY":
                    send(b"252 2.0.0 vrfy\r\n")
                elif verb == "EXPN":
                    send(b"250 2.0.0 expn\r\n")
                elif verb == "ETRN":
                    send(b"250 2.0.0 etrn\r\n")
                elif verb == "HELP":
                    send(b"214 2.0.0 help\r\n")
                elif verb == "AUTH":
                    words = arg.split()
                    mech = words[0].upper() if words else b""
                    if mech == b"LOGIN" and len(words) == 1:
                        send(b"334 VXNlcm5hbWU6\r\n")
                        sess.commands.append(read_line().rstrip(b"\n").rstrip(b"\r"))
                        send(b"334 UGFzc3dvcmQ6\r\n")
                        sess.commands.append(read_line().rstrip(b"\n").rstrip(b"\r"))
                    elif len(words) == 1:
                        send(b"334 \r\n")
                        sess.commands.append(read_line().rstrip(b"\n").rstrip(b"\r"))
                    send(b"235 2.7.0 Authentication successful\r\n")
                elif verb in ("XCLIENT", "XFORWARD"):
                    # an upstream that trusts everyone: the tests check that
                    # such commands never reach it
                    send(b"250 2.0.0 Ok " + verb.lower().encode() + b"\r\n")
                elif verb == "STARTTLS":
                    send(b"454 4.7.0 upstream has no TLS\r\n")
                elif verb == "QUIT":
                    send(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    send(b"502 5.5.2 Error: command not recognized\r\n")
        except (EOFError, OSError, ValueError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
            sess.closed.set()


# ---------------------------------------------------------------------------
# aiosmtpd upstream


class AioUpstream:
    """aiosmtpd in a thread; keeps every envelope with its raw bytes."""

    def __init__(self, data_size_limit=64 * 1024 * 1024):
        try:
            from aiosmtpd.controller import Controller
        except ImportError:
            pytest.fail("python module aiosmtpd not found: install the Debian package "
                        "'python3-aiosmtpd'", pytrace=False)
        self.envelopes = []
        self.cond = threading.Condition()
        outer = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                with outer.cond:
                    outer.envelopes.append({
                        "mail_from": envelope.mail_from,
                        "rcpt_tos": list(envelope.rcpt_tos),
                        "mail_options": list(envelope.mail_options),
                        "original_content": envelope.original_content,
                    })
                    outer.cond.notify_all()
                return "250 2.0.0 Ok: queued by aiosmtpd"

        self.port = free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.controller = Controller(
            Handler(), hostname="127.0.0.1", port=self.port,
            decode_data=False, data_size_limit=data_size_limit,
            server_hostname="aio.upstream.test",
            ident="aiosmtpd-upstream",
        )

    def start(self):
        self.controller.start()
        return self

    def stop(self):
        self.controller.stop()

    def wait_messages(self, n, timeout=10.0):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.envelopes) >= n, timeout)
        assert ok, "aiosmtpd received %d messages, expected %d" % (len(self.envelopes), n)
        return self.envelopes
