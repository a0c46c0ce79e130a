"""Helpers for the starttls-proxy integration tests.

Everything here talks to real sockets and real processes:

* Proxy            -- writes a config, starts the daemon, waits for
                      ``event=listening`` in its log and reads the ports
                      from it (listeners are at 127.0.0.1:0: the kernel
                      picks), stops it by PID.
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


def read_text(path):
    """The text of the file at PATH (UTF-8, bad bytes replaced); "" while
    it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


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


def run_tool(argv, timeout=30, **kw):
    """Run a client program: no stdin, stdout and stderr together."""
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout, **kw)


def curl_upload(url, msg, tmp_path):
    """Send MSG with curl to URL (smtp:// for STARTTLS, smtps:// for
    implicit TLS), from b@example.org to a@example.net. Returns the
    CompletedProcess."""
    curl = require_program("curl", "curl")
    f = tmp_path / "msg.eml"
    f.write_bytes(msg)
    return run_tool([curl, "-sS", "--ssl-reqd", "-k", "--max-time", "20", url,
                     "--mail-from", "b@example.org", "--mail-rcpt", "a@example.net",
                     "-T", str(f)])


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
    proxy = dict(proxy or {})
    # Started as root, the daemon refuses to keep root unless asked: the
    # suite asks (test_privileges.py covers dropping to another user).
    if os.geteuid() == 0:
        proxy.setdefault("user", "root")

    def keys(opts):
        out.extend("%s = %s" % (k, v) for k, v in opts.items() if v is not None)

    keys(proxy)
    for kind, sections in (("listener", listeners), ("upstream", upstreams)):
        for name, opts in sections:
            out.append("")
            out.append("[%s %s]" % (kind, name))
            keys(opts)
    return "\n".join(out) + "\n"


class Proxy:
    """One running starttls-proxy process."""

    def __init__(self, binary, workdir, config_text, n_listeners=1, env=None):
        self.binary = binary
        self.env = env              # extra environment variables
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
        self.ports = {}             # listener name -> port, from the log
        self.port = None            # listener "main" (or the only one)

    # -- lifecycle --

    def start(self):
        self._logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.binary, "-c", self.config_path],
            stdin=subprocess.DEVNULL, stdout=self._logf, stderr=self._logf,
            cwd=self.workdir, env=dict(os.environ, **self.env) if self.env else None,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if len(self.listening_addrs()) >= self.n_listeners:
                self.learn_ports()
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

    def listening_addrs(self):
        """{listener name: "HOST:PORT"} from the event=listening lines, the
        last of each listener (every worker logs it, a reload logs it again):
        the address the daemon really bound, the port the kernel picked for
        listen = HOST:0."""
        return {e["listener"]: e["addr"] for e in self.events("listening")
                if "listener" in e and "addr" in e}

    def learn_ports(self):
        """Set .ports from the log, and .port: listener "main"'s, or the
        only listener's."""
        self.ports = {name: int(addr.rsplit(":", 1)[1])
                      for name, addr in self.listening_addrs().items()}
        only = list(self.ports.values()) if len(self.ports) == 1 else [None]
        self.port = self.ports.get("main", only[0])
        return self.ports

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
                       "WARNING: ThreadSanitizer", "assertion failed"):
            if marker in text:
                problems.append("daemon log contains %r" % marker)
        if problems:
            pytest.fail("\n".join(problems) + "\nstderr:\n" + self.log_tail(), pytrace=False)

    # -- log --

    def log_text(self):
        return read_text(self.log_path)

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

    def __init__(self, port, host="127.0.0.1", timeout=IO_TIMEOUT, family=None, source=None):
        if family is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:          # (host, port): e.g. ("127.0.0.2", 0)
            self.sock.bind(source)
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

    def begin_data(self, mail_from="b@example.org", rcpt="a@example.net"):
        """MAIL FROM, RCPT TO and DATA, expecting 250, 250 and 354."""
        self.expect("MAIL FROM:<%s>" % mail_from, 250)
        self.expect("RCPT TO:<%s>" % rcpt, 250)
        return self.expect("DATA", 354)

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

    def starttls(self, ctx=None, server_hostname="proxy.test", session=None):
        """Switch this socket to TLS (offering SESSION for resumption, with
        the CTX it came from). Refuses if the server sent anything beyond
        what we have parsed (that would be response injection)."""
        assert not self.buf, "bytes after the 220 to STARTTLS: %r" % self.buf
        self.sock = (ctx or client_tls_context()).wrap_socket(
            self.sock, server_hostname=server_hostname, session=session)
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


def started_factory(cls):
    """The body of a factory fixture: yields make(**kw), which builds and
    starts a CLS(**kw); every one made is stopped at teardown. Use it as
    ``yield from started_factory(cls)``."""
    made = []

    def make(**kw):
        u = cls(**kw).start()
        made.append(u)
        return u

    yield make
    for u in made:
        u.stop()


# ---------------------------------------------------------------------------
# what every threaded upstream shares


def command_verb(line):
    """The verb of a command line (bytes): the text before the first space
    or colon, upper-cased, as str."""
    return line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("latin-1")


class ThreadedUpstream:
    """A listening socket, an accept loop that gives every connection a
    record and a thread running ``self._serve(conn, record)``, and stop().

    Subclasses set RECORD (the per-connection record class, built with its
    index), RECORDS (the attribute holding the list of records) and NOUN
    (for messages), call ``self._listen(host)`` after setting ``self.lock``,
    and define ``_serve``.
    """

    RECORD = None
    RECORDS = "sessions"
    NOUN = "session"
    BACKLOG = 64
    JOIN_WORKERS = True    # stop() waits for the per-connection threads

    def _listen(self, host="127.0.0.1"):
        v6 = ":" in host
        self.sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(self.BACKLOG)
        self.port = self.sock.getsockname()[1]
        self.address = ("[%s]:%d" if v6 else "%s:%d") % (host, self.port)
        self._conns = []
        self._threads = []
        self._stopping = False
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)

    def _records(self):
        return getattr(self, self.RECORDS)

    def start(self):
        self._accept_thread.start()
        return self

    def _shutdown_conns(self):
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._shutdown_conns()
        self._accept_thread.join(5)
        if self.JOIN_WORKERS:
            for t in self._threads:
                t.join(5)

    def _wait_records(self, n, timeout):
        records = self._records()
        ok = wait_until(lambda: len(records) >= n, timeout)
        assert ok, "upstream saw %d %ss, expected %d" % (len(records), self.NOUN, n)
        return records

    def wait_closed(self, timeout=5.0):
        """Wait until every connection seen so far has ended."""
        for r in list(self._records()):
            assert r.closed.wait(timeout), "upstream %s %d still open" % (self.NOUN, r.index)

    @staticmethod
    def _close(conn, rec):
        """The end of a _serve: close the socket, mark the record closed."""
        try:
            conn.close()
        except OSError:
            pass
        rec.closed.set()

    def _accept_loop(self):
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                records = self._records()
                rec = self.RECORD(len(records))
                records.append(rec)
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, rec), daemon=True)
            self._threads.append(t)
            t.start()


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


class ScriptedUpstream(ThreadedUpstream):
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

    RECORD = UpstreamSession

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
        self._listen(host)

    def hang_up(self):
        """Close every open session from the server side."""
        self._shutdown_conns()

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
        self._wait_records(n, timeout)

    def wait_messages(self, n, timeout=10.0):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.messages) >= n, timeout)
        assert ok, "upstream accepted %d messages, expected %d; commands: %r" % (
            len(self.messages), n, self.all_commands())
        return self.messages

    # -- server --

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
                verb = command_verb(line)
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
            self._close(conn, sess)


# ---------------------------------------------------------------------------
# aiosmtpd upstream


class AioConn:
    """One connection aiosmtpd served: every command line it read, with
    whether it arrived inside TLS."""

    def __init__(self, peer):
        self.peer = peer
        self.lines = []        # (line bytes without CRLF, inside_tls)

    def plaintext_lines(self):
        return [l for l, t in self.lines if not t]

    def tls_lines(self):
        return [l for l, t in self.lines if t]


def _proxy_dict(pd):
    tlv = None
    try:
        tlv = dict(pd.tlv) if pd.tlv else {}
    except Exception as e:                # malformed TLVs: keep the error
        tlv = {"_error": repr(e)}
    return {
        "version": pd.version,
        "command": pd.command,
        "family": pd.family,
        "protocol": pd.protocol,
        "src_addr": str(pd.src_addr) if pd.src_addr is not None else None,
        "src_port": pd.src_port,
        "dst_addr": str(pd.dst_addr) if pd.dst_addr is not None else None,
        "dst_port": pd.dst_port,
        "tlv": tlv,
        "raw": bytes(pd.whole_raw),
    }


class AioUpstream:
    """aiosmtpd in a thread; keeps every envelope with its raw bytes.

    ssl_context:      implicit TLS from the first byte (Controller ssl_context)
    tls_context:      offers STARTTLS (SMTP tls_context)
    require_starttls: 530 to mail commands before STARTTLS
    proxy_protocol_timeout: expect a PROXY v1/v2 header first (aiosmtpd parses
                      it; each valid header is kept in .proxies)

    Every connection is recorded in .conns (AioConn: each command line and
    whether it came inside TLS); every server name asked for in a handshake in
    .sni. Envelopes carry the session's TLS version/cipher, peer, PROXY data
    and EHLO name."""

    def __init__(self, data_size_limit=64 * 1024 * 1024, ssl_context=None, tls_context=None,
                 require_starttls=False, proxy_protocol_timeout=None,
                 server_hostname="aio.upstream.test"):
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import SMTP
        except ImportError:
            pytest.fail("python module aiosmtpd not found: install the Debian package "
                        "'python3-aiosmtpd'", pytrace=False)
        self.envelopes = []
        self.conns = []
        self.proxies = []
        self.sni = []
        self.cond = threading.Condition()
        outer = self

        def ssl_info(server):
            t = server.transport
            obj = t.get_extra_info("ssl_object") if t is not None else None
            if obj is None:
                return None
            return {"version": obj.version(), "cipher": obj.cipher()[0]}

        class Handler:
            async def handle_PROXY(self, server, session, envelope, proxy_data):
                with outer.cond:
                    outer.proxies.append(_proxy_dict(proxy_data))
                    outer.cond.notify_all()
                return True

            async def handle_DATA(self, server, session, envelope):
                with outer.cond:
                    pd = getattr(session, "proxy_data", None)
                    outer.envelopes.append({
                        "mail_from": envelope.mail_from,
                        "rcpt_tos": list(envelope.rcpt_tos),
                        "mail_options": list(envelope.mail_options),
                        "original_content": envelope.original_content,
                        "tls": ssl_info(server),
                        "starttls_done": session.ssl is not None,
                        "peer": session.peer,
                        "ehlo": session.host_name,
                        "proxy": _proxy_dict(pd) if pd else None,
                    })
                    outer.cond.notify_all()
                return "250 2.0.0 Ok: queued by aiosmtpd"

        class RecordingSMTP(SMTP):
            async def _handle_client(self):
                conn = AioConn(self.session.peer)
                with outer.cond:
                    outer.conns.append(conn)
                reader = self._reader
                orig = reader.readuntil

                async def readuntil(separator=b"\n"):
                    line = await orig(separator)
                    if separator == b"\n":        # command lines (DATA uses CRLF)
                        t = self.transport
                        tls = t is not None and t.get_extra_info("ssl_object") is not None
                        with outer.cond:
                            conn.lines.append((bytes(line).rstrip(b"\r\n"), tls))
                    return line
                reader.readuntil = readuntil
                return await super()._handle_client()

        def record_sni(obj, name, ctx):
            with outer.cond:
                outer.sni.append(name)
            return None

        for ctx in (ssl_context, tls_context):
            if ctx is not None:
                ctx.sni_callback = record_sni

        proxy_mode = proxy_protocol_timeout is not None

        class RecordingController(Controller):
            def factory(self):
                return RecordingSMTP(self.handler, **self.SMTP_kwargs)

            def _trigger_server(self):
                if not proxy_mode:
                    return super()._trigger_server()
                # aiosmtpd waits for a PROXY header before greeting: a bare
                # connect is enough to make it build its protocol object.
                with socket.create_connection((self.hostname, self.port), 1.0):
                    pass

        smtp_kw = {}
        if tls_context is not None:
            smtp_kw["tls_context"] = tls_context
            smtp_kw["require_starttls"] = require_starttls
        if proxy_mode:
            smtp_kw["proxy_protocol_timeout"] = proxy_protocol_timeout
        self.tls_mode = "implicit" if ssl_context else ("starttls" if tls_context else None)
        self.port = free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.controller = RecordingController(
            Handler(), hostname="127.0.0.1", port=self.port,
            decode_data=False, data_size_limit=data_size_limit,
            server_hostname=server_hostname,
            ident="aiosmtpd-upstream", ssl_context=ssl_context, **smtp_kw
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

    def wait_proxies(self, n, timeout=10.0):
        with self.cond:
            ok = self.cond.wait_for(lambda: len(self.proxies) >= n, timeout)
        assert ok, "aiosmtpd got %d PROXY headers, expected %d" % (len(self.proxies), n)
        return self.proxies

    def sessions(self):
        """Connections that sent at least one line (not the start-up probe)."""
        with self.cond:
            return [c for c in self.conns if c.lines]


# ---------------------------------------------------------------------------
# test certificates


class CertPair:
    def __init__(self, name, cert, key, cn):
        self.name = name
        self.cert = cert        # PEM path
        self.key = key          # PEM path
        self.cn = cn

    def der(self):
        with open(self.cert) as f:
            return ssl.PEM_cert_to_DER_cert(f.read())

    def conf(self):
        """'CERT KEY', the value of an sni.NAME key."""
        return "%s %s" % (self.cert, self.key)

    def __repr__(self):
        return "CertPair(%s, CN=%s)" % (self.name, self.cn)


class Pki:
    """Every certificate the TLS tests need, made with openssl in DIRECTORY.

    CAs: ca (servers), client_ca (client certificates), other_ca (trusted by
    nobody). Servers (signed by ca, P-256, SAN DNS names): proxy (proxy.test),
    a (a.test), b (b.test), wild (*.example.org), upstream (upstream.test and
    IP 127.0.0.1), wrong_name (other.test), expired (upstream.test, valid in
    January 2020 only); self_signed (upstream.test, no CA). Clients: client
    (client.test, by client_ca), client_other (client.test, by other_ca),
    proxy_client (proxy.test, by client_ca: the proxy's certificate towards
    an upstream that asks for one)."""

    def __init__(self, directory):
        self.dir = directory
        self.openssl = require_program("openssl", "openssl")
        self._serial = 100
        self.ca = self._ca("ca", "STP Test CA")
        self.client_ca = self._ca("client-ca", "STP Client CA")
        self.other_ca = self._ca("other-ca", "STP Other CA")
        self.proxy = self._leaf("proxy", "proxy.test", ["DNS:proxy.test"], self.ca)
        self.a = self._leaf("a", "a.test", ["DNS:a.test"], self.ca)
        self.b = self._leaf("b", "b.test", ["DNS:b.test"], self.ca)
        self.wild = self._leaf("wild", "*.example.org", ["DNS:*.example.org"], self.ca)
        self.upstream = self._leaf("upstream", "upstream.test",
                                   ["DNS:upstream.test", "IP:127.0.0.1"], self.ca)
        self.wrong_name = self._leaf("wrong-name", "other.test", ["DNS:other.test"], self.ca)
        self.expired = self._expired("expired", "upstream.test", ["DNS:upstream.test"], self.ca)
        self.self_signed = self._self_signed("self-signed", "upstream.test",
                                             ["DNS:upstream.test", "IP:127.0.0.1"])
        self.client = self._leaf("client", "client.test", ["DNS:client.test"],
                                 self.client_ca, usage="clientAuth")
        self.client_other = self._leaf("client-other", "client.test", ["DNS:client.test"],
                                       self.other_ca, usage="clientAuth")
        self.proxy_client = self._leaf("proxy-client", "proxy.test", ["DNS:proxy.test"],
                                       self.client_ca, usage="clientAuth")

    def _run(self, *args):
        p = subprocess.run([self.openssl] + list(args), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        if p.returncode != 0:
            pytest.fail("openssl %s failed:\n%s" % (" ".join(args), p.stdout.decode(
                "utf-8", "replace")), pytrace=False)

    def _key(self, name):
        key = os.path.join(self.dir, name + ".key")
        self._run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                  "-out", key)
        return key

    def _ca(self, name, cn):
        key = self._key(name)
        cert = os.path.join(self.dir, name + ".pem")
        self._run("req", "-x509", "-new", "-key", key, "-subj", "/CN=" + cn, "-days", "30",
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", cert)
        return CertPair(name, cert, key, cn)

    def _csr(self, name, cn):
        key = self._key(name)
        csr = os.path.join(self.dir, name + ".csr")
        self._run("req", "-new", "-key", key, "-subj", "/CN=" + cn, "-out", csr)
        return key, csr

    def _ext(self, name, sans, usage):
        ext = os.path.join(self.dir, name + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=%s\nsubjectAltName=%s\n" % (usage, ",".join(sans)))
        return ext

    def _leaf(self, name, cn, sans, ca, usage="serverAuth"):
        key, csr = self._csr(name, cn)
        cert = os.path.join(self.dir, name + ".pem")
        self._serial += 1
        self._run("x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key,
                  "-set_serial", str(self._serial), "-days", "30", "-sha256",
                  "-extfile", self._ext(name, sans, usage), "-out", cert)
        return CertPair(name, cert, key, cn)

    def _self_signed(self, name, cn, sans):
        key = self._key(name)
        cert = os.path.join(self.dir, name + ".pem")
        self._run("req", "-x509", "-new", "-key", key, "-subj", "/CN=" + cn, "-days", "30",
                  "-addext", "subjectAltName=" + ",".join(sans), "-out", cert)
        return CertPair(name, cert, key, cn)

    def _expired(self, name, cn, sans, ca):
        """openssl x509 cannot back-date; openssl ca can (-startdate/-enddate)."""
        key, csr = self._csr(name, cn)
        cert = os.path.join(self.dir, name + ".pem")
        db = os.path.join(self.dir, name + "-db")
        os.makedirs(db, exist_ok=True)
        open(os.path.join(db, "index.txt"), "w").close()
        with open(os.path.join(db, "serial"), "w") as f:
            f.write("1000\n")
        cnf = os.path.join(self.dir, name + ".cnf")
        with open(cnf, "w") as f:
            f.write("[ca]\ndefault_ca = c\n[c]\ndir = %s\ndatabase = $dir/index.txt\n"
                    "serial = $dir/serial\nnew_certs_dir = $dir\ndefault_md = sha256\n"
                    "policy = p\nunique_subject = no\n[p]\ncommonName = supplied\n" % db)
        self._run("ca", "-batch", "-config", cnf, "-cert", ca.cert, "-keyfile", ca.key,
                  "-startdate", "20200101000000Z", "-enddate", "20200201000000Z", "-notext",
                  "-extfile", self._ext(name, sans, "serverAuth"), "-in", csr, "-out", cert)
        return CertPair(name, cert, key, cn)


def limit_tls(ctx, minimum=None, maximum=None, ciphers=None):
    """Restrict CTX to CIPHERS and the MINIMUM..MAXIMUM protocol versions
    (each only when given). Returns CTX."""
    if ciphers:
        ctx.set_ciphers(ciphers)
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def server_tls_context(pair, minimum=None, maximum=None, ciphers=None, client_ca=None,
                       require_client_cert=False):
    """A Python (OpenSSL) server context with PAIR's certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    limit_tls(ctx, minimum, maximum, ciphers)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca.cert)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def verifying_client_context(ca, cert=None):
    """A client context that verifies the chain against CA and the name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca.cert)
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def open_implicit(port, ctx=None, server_hostname="proxy.test", ehlo="client.test",
                  timeout=IO_TIMEOUT, source=None, session=None):
    """Connect to an implicit-TLS listener: handshake (offering SESSION),
    greeting, EHLO. Returns (conn, ehlo_reply)."""
    c = SmtpConn(port, timeout=timeout, source=source)
    try:
        c.starttls(ctx, server_hostname=server_hostname, session=session)
        c.greeting()
        r = c.expect("EHLO " + ehlo, 250)
    except BaseException:
        c.close()
        raise
    return c, r


def dot_stuff(body):
    """The DATA form of BODY (which must end in CRLF), without the final dot."""
    return re.sub(rb"(?m)^\.", b"..", body)


def send_message(c, body, mail_from="b@example.org", rcpts=("a@example.net",)):
    """MAIL, RCPT..., DATA, BODY; every reply must be positive. Returns the
    reply to the end of data."""
    c.expect("MAIL FROM:<%s>" % mail_from, 250)
    for r in rcpts:
        c.expect("RCPT TO:<%s>" % r, 250)
    c.expect("DATA", 354)
    c.send(dot_stuff(body) + b".\r\n")
    r = c.read_reply()
    assert r.code == 250, "end of data: %r" % r.raw
    return r


def sample_message(tag):
    """A message that exercises the data path: a dot-stuffed line, 8-bit text,
    a 998-octet line, CRLF everywhere."""
    return (b"From: b@example.org\r\nTo: a@example.net\r\nSubject: " + tag.encode() +
            b"\r\n\r\n.leading dot\r\n..two\r\n8bit: \xc3\xa9\xe2\x82\xac\r\n" +
            b"x" * 998 + b"\r\nend " + tag.encode() + b"\r\n")


def check_config(binary, workdir, text):
    """starttls-proxy -t on TEXT: CompletedProcess with .stdout (text, both
    streams) and the config path in .config_path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "check.conf")
    with open(path, "w") as f:
        f.write(text)
    p = subprocess.run([binary, "-t", "-c", path], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
    p.stdout = p.stdout.decode("utf-8", "replace")
    p.config_path = path
    return p


def s_client(port, *args, stdin=b"", timeout=20, starttls=False):
    """openssl s_client against 127.0.0.1:PORT. Returns (returncode, stdout+stderr text).
    STDIN is sent, then EOF (s_client then closes)."""
    openssl = require_program("openssl", "openssl")
    argv = [openssl, "s_client", "-connect", "127.0.0.1:%d" % port, "-crlf"]
    if starttls:
        argv += ["-starttls", "smtp"]
    argv += list(args)
    p = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def peer_cn(output):
    """The subject CN of the server certificate in s_client output."""
    m = re.search(r"^subject=.*?CN\s*=\s*([^,/\n]+)", output, re.M)
    return m.group(1).strip() if m else None


# ---------------------------------------------------------------------------
# an SMTP upstream on raw sockets that records every byte


PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def tls_records(data):
    """Split DATA into TLS records: [(content_type, length)]. Fails if DATA is
    anything else than whole TLS records (e.g. plaintext SMTP after them)."""
    out = []
    i = 0
    while i < len(data):
        head = data[i:i + 5]
        assert len(head) == 5 and head[0] in (0x14, 0x15, 0x16, 0x17) and head[1] == 3, \
            "not a TLS record at offset %d: %r" % (i, data[i:i + 40])
        n = int.from_bytes(head[3:5], "big")
        assert i + 5 + n <= len(data), "truncated TLS record at offset %d" % i
        out.append((head[0], n))
        i += 5 + n
    return out


class RawConn:
    """What one connection to a RawUpstream received."""

    def __init__(self, index):
        self.index = index
        self.raw = bytearray()       # every byte read from the socket, TLS or not
        self.tls_at = None           # offset in raw where the TLS bytes begin
        self.proxy_header = None     # the PROXY header (proxy_header=True)
        self.lines = []              # (command line without CRLF, inside_tls)
        self.messages = []           # DATA content, per message
        self.handshake = None        # None: no TLS; "ok"; or the error text
        self.tls_version = None
        self.cipher = None
        self.sni = None
        self.peer_cert = None        # DER of the client's certificate, if any
        self.closed = threading.Event()

    def plaintext(self):
        """The bytes received before TLS started (everything without TLS)."""
        return bytes(self.raw if self.tls_at is None else self.raw[:self.tls_at])

    def after_tls_start(self):
        return b"" if self.tls_at is None else bytes(self.raw[self.tls_at:])

    def plaintext_lines(self):
        return [l for l, t in self.lines if not t]

    def tls_lines(self):
        return [l for l, t in self.lines if t]


class _Wire:
    """A socket that can turn into TLS (server side) through memory BIOs, so
    that the raw bytes stay visible."""

    def __init__(self, sock, rec):
        self.sock = sock
        self.rec = rec
        self.buf = bytearray()
        self.obj = None
        self.inc = self.out = None

    def _recv_raw(self):
        d = self.sock.recv(65536)
        if not d:
            raise EOFError
        self.rec.raw += d
        return d

    def _flush(self):
        if self.out is not None:
            data = self.out.read()
            if data:
                self.sock.sendall(data)

    def fill(self):
        if self.obj is None:
            self.buf += self._recv_raw()
            return
        while True:
            try:
                d = self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                self.inc.write(self._recv_raw())
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                raise EOFError
            if not d:
                raise EOFError
            self.buf += d
            return

    def read_line(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            self.fill()

    def read_exact(self, n):
        while len(self.buf) < n:
            self.fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def send(self, data):
        if self.obj is None:
            self.sock.sendall(data)
        else:
            self.obj.write(data)
            self._flush()

    def _drain(self, timeout=2.0):
        """After a failed handshake: keep recording whatever else arrives
        until the peer closes (or TIMEOUT)."""
        self.sock.settimeout(timeout)
        try:
            while self._recv_raw():
                pass
        except (EOFError, OSError):
            pass

    def start_tls(self, ctx, sni_map):
        """Server handshake. Bytes already buffered are the first TLS bytes."""
        self.rec.tls_at = len(self.rec.raw) - len(self.buf)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.inc.write(bytes(self.buf))
        self.buf = bytearray()
        obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        try:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    self.inc.write(self._recv_raw())
        except ssl.SSLError as e:
            try:
                self._flush()               # the alert
            except OSError:
                pass
            self.rec.handshake = "error: %s" % e
            self._drain()
            raise EOFError
        except (EOFError, OSError) as e:
            self.rec.handshake = "error: peer closed during the handshake (%s)" % (
                e.__class__.__name__)
            raise EOFError
        self._flush()
        self.obj = obj
        self.rec.handshake = "ok"
        self.rec.tls_version = obj.version()
        self.rec.cipher = obj.cipher()[0]
        self.rec.sni = sni_map.get(id(obj))
        self.rec.peer_cert = obj.getpeercert(binary_form=True)


class RawUpstream(ThreadedUpstream):
    """A threaded SMTP server that records every byte it receives (RawConn.raw)
    and each command line with whether it came inside TLS. For the upstream
    TLS tests, hostile or not.

    tls:            None, "starttls" (offers STARTTLS in EHLO unless
                    offer_starttls=False) or "implicit" (handshake first)
    pair:           CertPair for the server certificate
    replies:        {VERB: raw bytes}: e.g. {"STARTTLS": b"454 ...\\r\\n"}. A
                    STARTTLS reply starting with 220 starts the handshake
                    after it is sent (even with bytes injected behind it).
    xclient:        offer XCLIENT (answered 220 as Postfix does)
    proxy_header:   read a PROXY v1/v2 header before anything else
    ssl_context:    a server context to use instead of one made from PAIR
    """

    RECORD = RawConn
    RECORDS = "conns"
    NOUN = "connection"

    def __init__(self, tls=None, pair=None, offer_starttls=True, replies=None, xclient=False,
                 proxy_header=False, ssl_context=None,
                 greeting=b"220 upstream.test ESMTP raw\r\n", host="127.0.0.1"):
        self.tls = tls
        self.offer_starttls = offer_starttls
        self.replies = {k.upper(): v for k, v in (replies or {}).items()}
        self.xclient = xclient
        self.proxy_header = proxy_header
        self.greeting = greeting
        self.sni_map = {}
        self.ctx = ssl_context
        if self.ctx is None and pair is not None:
            self.ctx = server_tls_context(pair)
        if self.ctx is not None:
            def record_sni(obj, name, ctx):
                self.sni_map[id(obj)] = name
            self.ctx.sni_callback = record_sni
        self.conns = []
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._listen(host)

    def wait_conns(self, n, timeout=5.0):
        return self._wait_records(n, timeout)

    def wait_messages(self, n, timeout=10.0):
        def count():
            return sum(len(c.messages) for c in self.conns)
        ok = wait_until(lambda: count() >= n, timeout)
        assert ok, "upstream got %d messages, expected %d; lines %r" % (
            count(), n, [c.lines for c in self.conns])
        return [m for c in self.conns for m in c.messages]

    def _ehlo(self, w):
        lines = ["upstream.test raw", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self.tls == "starttls" and self.offer_starttls and w.obj is None:
            lines.append("STARTTLS")
        if self.xclient:
            lines.append("XCLIENT NAME ADDR PORT PROTO HELO LOGIN")
        return b"".join(("250%s%s\r\n" % ("-" if i < len(lines) - 1 else " ", t)).encode()
                        for i, t in enumerate(lines))

    def _read_proxy_header(self, w):
        while len(w.buf) < 16 and not w.buf.startswith(b"PROXY ") and b"\n" not in w.buf:
            w.fill()
        if w.buf.startswith(PROXY_V2_SIG):
            head = w.read_exact(16)
            return head + w.read_exact(int.from_bytes(head[14:16], "big"))
        return w.read_line()

    def _serve(self, sock, rec):
        sock.settimeout(15)
        w = _Wire(sock, rec)
        try:
            if self.proxy_header:
                rec.proxy_header = self._read_proxy_header(w)
            if self.tls == "implicit":
                w.start_tls(self.ctx, self.sni_map)
            w.send(self.greeting)
            while True:
                raw = w.read_line()
                line = raw.rstrip(b"\n").rstrip(b"\r")
                with self.lock:
                    rec.lines.append((line, w.obj is not None))
                verb = command_verb(line)
                if verb in self.replies:
                    reply = self.replies[verb]
                    w.send(reply)
                    if verb == "STARTTLS" and reply.startswith(b"220"):
                        w.start_tls(self.ctx, self.sni_map)
                    elif verb == "QUIT":
                        return
                    continue
                if verb in ("EHLO", "HELO"):
                    w.send(self._ehlo(w) if verb == "EHLO" else b"250 upstream.test\r\n")
                elif verb == "STARTTLS":
                    if self.tls == "starttls" and w.obj is None:
                        w.send(b"220 2.0.0 Ready to start TLS\r\n")
                        w.start_tls(self.ctx, self.sni_map)
                    else:
                        w.send(b"502 5.5.1 no STARTTLS here\r\n")
                elif verb == "XCLIENT":
                    if self.xclient:
                        w.send(self.greeting)
                    else:
                        w.send(b"502 5.5.1 no XCLIENT here\r\n")
                elif verb in ("MAIL", "RCPT", "RSET", "NOOP"):
                    w.send(b"250 2.0.0 Ok\r\n")
                elif verb == "DATA":
                    w.send(b"354 go ahead\r\n")
                    parts = []
                    while True:
                        l = w.read_line()
                        if l == b".\r\n":
                            break
                        parts.append(l[1:] if l.startswith(b".") else l)
                    with self.lock:
                        rec.messages.append(b"".join(parts))
                    w.send(b"250 2.0.0 Ok: queued by raw\r\n")
                elif verb == "QUIT":
                    w.send(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    w.send(b"502 5.5.2 Error: command not recognized\r\n")
        except (EOFError, OSError, ValueError, ssl.SSLError):
            pass
        finally:
            self._close(sock, rec)


# ---------------------------------------------------------------------------
# a private Postfix instance


class PostfixInstance:
    """A Postfix of the tests' own: main.cf/master.cf in BASE/conf, queue and
    data directories in BASE, log in BASE/maillog (postlogd). Every mail is
    accepted for example.net and discarded after it was queued; the log line
    "QUEUEID: client=NAME[ADDR]:PORT" shows who smtpd thinks the client is.

    smtpd services on loopback (self.ports[NAME]):
      plain            XCLIENT allowed from 127.0.0.0/8, no TLS
      starttls         ... and STARTTLS offered (upstream.test certificate)
      implicit         ... TLS from the first byte (smtpd_tls_wrappermode)
      noxclient        no XCLIENT for anyone
      haproxy          PROXY v1/v2 header expected first
      haproxy_implicit PROXY header first, then TLS (wrappermode)
    Needs root (postfix start)."""

    SERVICES = {
        "plain": [],
        "starttls": ["smtpd_tls_security_level=may"],
        "implicit": ["smtpd_tls_wrappermode=yes", "smtpd_tls_security_level=encrypt"],
        "noxclient": ["smtpd_authorized_xclient_hosts="],
        "haproxy": ["smtpd_upstream_proxy_protocol=haproxy"],
        "haproxy_implicit": ["smtpd_upstream_proxy_protocol=haproxy",
                             "smtpd_tls_wrappermode=yes", "smtpd_tls_security_level=encrypt"],
    }

    def __init__(self, base, server_pair):
        self.postfix = require_program("postfix", "postfix", paths=["/usr/sbin/postfix"])
        if os.geteuid() != 0:
            pytest.fail("the Postfix tests start a private Postfix instance and must run "
                        "as root", pytrace=False)
        self.base = base
        self.conf = os.path.join(base, "conf")
        self.queue = os.path.join(base, "queue")
        self.data = os.path.join(base, "data")
        self.maillog = os.path.join(base, "maillog")
        self.pair = server_pair
        self.ports = {name: free_port() for name in self.SERVICES}
        self.started = False

    def _write_config(self):
        import pwd
        for d in (self.conf, self.queue, self.data):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.base, 0o755)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        # smtpd reads its key as root before dropping privileges; copy the
        # files next to the configuration so that the path is short and ours
        tls_cert = os.path.join(self.conf, "smtpd.pem")
        tls_key = os.path.join(self.conf, "smtpd.key")
        shutil.copy(self.pair.cert, tls_cert)
        shutil.copy(self.pair.key, tls_key)
        os.chmod(tls_key, 0o600)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.upstream.test",
            "mydomain": "upstream.test",
            "mydestination": "",
            "mynetworks": "192.0.2.0/24",
            "relay_domains": "example.net",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.base,
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_client_port_logging": "yes",
            "smtpd_peername_lookup": "no",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_upstream_proxy_timeout": "10s",
            "default_transport": "discard",
            "local_transport": "discard",
            "relay_transport": "discard",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtpd_tls_cert_file": tls_cert,
            "smtpd_tls_key_file": tls_key,
            "smtpd_tls_security_level": "none",
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
        }
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            for k, v in main.items():
                f.write("%s = %s\n" % (k, v))
        lines = []
        for name, opts in self.SERVICES.items():
            lines.append("127.0.0.1:%d inet n - n - - smtpd -o syslog_name=postfix/%s%s"
                         % (self.ports[name], name, "".join(" -o " + o for o in opts)))
        lines += [
            "cleanup   unix  n - n - 0 cleanup",
            "qmgr      unix  n - n 300 1 qmgr",
            "tlsmgr    unix  - - n 1000? 1 tlsmgr",
            "rewrite   unix  - - n - - trivial-rewrite",
            "bounce    unix  - - n - 0 bounce",
            "defer     unix  - - n - 0 bounce",
            "trace     unix  - - n - 0 bounce",
            "verify    unix  - - n - 1 verify",
            "flush     unix  n - n 1000? 0 flush",
            "proxymap  unix  - - n - - proxymap",
            "discard   unix  - - n - - discard",
            "error     unix  - - n - - error",
            "retry     unix  - - n - - error",
            "anvil     unix  - - n - 1 anvil",
            "scache    unix  - - n - 1 scache",
            "postlog   unix-dgram n - n - 1 postlogd",
        ]
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _postfix(self, cmd, timeout=60):
        return subprocess.run([self.postfix, "-c", self.conf, cmd], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)

    def start(self):
        self._write_config()
        p = self._postfix("start")
        if p.returncode != 0:
            pytest.fail("postfix -c %s start failed (%d): %s\nmaillog:\n%s" % (
                self.conf, p.returncode, p.stdout.decode("utf-8", "replace"),
                self.log_text()), pytrace=False)
        self.started = True

        def ready():
            try:
                with socket.create_connection(("127.0.0.1", self.ports["plain"]), 1) as s:
                    s.settimeout(5)
                    return s.recv(100).startswith(b"220")
            except OSError:
                return False
        if not wait_until(ready, 20, 0.1):
            self.stop()
            pytest.fail("private Postfix did not answer on port %d\nmaillog:\n%s"
                        % (self.ports["plain"], self.log_text()), pytrace=False)
        return self

    def stop(self):
        if self.started:
            self._postfix("stop")
            self.started = False

    def address(self, service):
        return "127.0.0.1:%d" % self.ports[service]

    def log_text(self):
        return read_text(self.maillog)

    def wait_log(self, pattern, timeout=10.0):
        """The first match of regex PATTERN in the maillog; fails on timeout."""
        rx = re.compile(pattern, re.M)
        m = wait_until(lambda: rx.search(self.log_text()), timeout, 0.05)
        if not m:
            pytest.fail("no maillog line matching %r within %.0fs; maillog tail:\n%s" % (
                pattern, timeout, "\n".join(self.log_text().splitlines()[-40:])), pytrace=False)
        return m

    def client_of_queue_id(self, queue_id, timeout=10.0):
        """(name, addr, port) smtpd logged for the message QUEUE_ID."""
        m = self.wait_log(r"\b%s: client=([^\[\s]*)\[([^\]]+)\]:(\d+)" % re.escape(queue_id),
                          timeout)
        return m.group(1), m.group(2), int(m.group(3))


# ---------------------------------------------------------------------------
# next hops that fail in particular ways, a daemon in its own mount
# namespace, a relay that wants AUTH (issue 14)


class FullBacklog:
    """A listening socket (listen(0)) whose accept queue is full: a further
    connect gets no SYN-ACK and hangs until the connector's own timeout, the
    nearest loopback gets to a real connect timeout. Nothing is accepted."""

    def __init__(self, host="127.0.0.1", probe=0.5, max_fillers=8):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.address = "%s:%d" % (host, self.port)
        self.fillers = []
        for _ in range(max_fillers):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(probe)
            try:
                c.connect((host, self.port))
            except socket.timeout:
                c.close()
                return                  # full: this connect hung
            self.fillers.append(c)
        self.close()
        pytest.fail("could not fill the accept queue of a listen(0) socket with %d "
                    "connections" % max_fillers, pytrace=False)

    def start(self):
        return self

    def stop(self):
        self.close()

    def close(self):
        for c in self.fillers:
            c.close()
        self.sock.close()


class DnsBlackhole:
    """A UDP socket on HOST:53 that reads DNS queries and never answers: a
    resolver pointed at it waits for its own timeout. .queries keeps the
    query names asked (as text)."""

    def __init__(self, host="127.0.0.153", port=53):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.2)
        self.host = host
        self.queries = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _qname(pkt):
        labels, i = [], 12
        while i < len(pkt) and pkt[i]:
            n = pkt[i]
            labels.append(pkt[i + 1:i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        return ".".join(labels)

    def _loop(self):
        while not self._stopping:
            try:
                pkt, _ = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.queries.append(self._qname(pkt))

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stopping = True
        self._thread.join(2)
        self.sock.close()


def namespaced_binary(workdir, binds, binary=None):
    """A wrapper script that runs the daemon (BINARY, default $STP_BIN) in a
    mount namespace of its own where each {target: source} of BINDS is
    bind-mounted (e.g. {"/etc/resolv.conf": path}). unshare and sh exec, so
    the wrapper's PID is the daemon's and signals reach it. Skips the test
    when not root or when the namespace cannot be made."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace (unshare --mount)")
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    if not unshare:
        pytest.skip("unshare (util-linux) not found")
    binary = binary or daemon_binary()
    mounts = " && ".join("mount --bind %s %s" % (shlex_quote(src), shlex_quote(dst))
                         for dst, src in binds.items())
    probe = subprocess.run([unshare, "--mount", "--", "sh", "-c", mounts + " && true"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
    if probe.returncode != 0:
        pytest.skip("cannot bind-mount in a private mount namespace: %s"
                    % probe.stdout.decode("utf-8", "replace").strip())
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "stp-in-namespace.sh")
    with open(path, "w") as f:
        f.write("#!/bin/sh\nexec %s --mount -- sh -c %s sh \"$@\"\n" % (
            shlex_quote(unshare), shlex_quote(mounts + ' && exec %s "$@"' % shlex_quote(binary))))
    os.chmod(path, 0o755)
    return path


def shlex_quote(s):
    import shlex
    return shlex.quote(s)


class AuthAioUpstream(AioUpstream):
    """AioUpstream that demands AUTH (RFC 4954) before MAIL, only inside TLS
    (auth_require_tls, or under implicit TLS a check of its own), and
    records every attempt in .auth_attempts: dicts (mechanism, login,
    secret: bytes; ok, tls: whether it came inside TLS).

    users:  {login (str): password (str)} for PLAIN and LOGIN
    tokens: a callable (login, token) -> bool for XOAUTH2, or None (no
            XOAUTH2 offered). A refused XOAUTH2 gets the RFC 7628 / Google
            error challenge (334 + base64 JSON), then 535 after the client's
            empty line."""

    XOAUTH2_ERROR = b'{"status":"401","schemes":"Bearer","scope":"https://mail.example/"}'

    def __init__(self, users=None, tokens=None, **kw):
        super().__init__(**kw)
        from aiosmtpd.smtp import AuthResult, LoginPassword
        self.auth_attempts = []
        self.xoauth2_challenge_answers = []
        users = {k.encode(): v.encode() for k, v in (users or {}).items()}
        outer = self

        def in_tls(server):
            t = server.transport
            return t is not None and t.get_extra_info("ssl_object") is not None

        def authenticator(server, session, envelope, mechanism, auth_data):
            tls = in_tls(server)
            ok = (tls and isinstance(auth_data, LoginPassword)
                  and users.get(bytes(auth_data.login)) == bytes(auth_data.password))
            with outer.cond:
                outer.auth_attempts.append({
                    "mechanism": mechanism, "login": bytes(auth_data.login),
                    "secret": bytes(auth_data.password), "ok": ok, "tls": tls})
                outer.cond.notify_all()
            # handled=False: aiosmtpd then sends the 535 itself (its
            # default, handled=True, sends nothing)
            return AuthResult(success=ok, handled=False, auth_data=auth_data)

        kwargs = self.controller.SMTP_kwargs
        kwargs["authenticator"] = authenticator
        # aiosmtpd only knows about its own STARTTLS: behind implicit TLS it
        # would refuse AUTH (538) and not offer it. in_tls() checks instead.
        kwargs["auth_require_tls"] = kw.get("ssl_context") is None
        kwargs["auth_required"] = True

        if tokens is not None:
            import base64

            async def auth_XOAUTH2(server, args):
                if len(args) != 2:
                    await server.push("501 5.5.2 XOAUTH2 wants the initial response")
                    return AuthResult(success=False, handled=True)
                try:
                    raw = base64.b64decode(args[1], validate=True)
                except Exception:
                    await server.push("501 5.5.2 Can't decode base64")
                    return AuthResult(success=False, handled=True)
                login, token, well_formed = b"", b"", False
                parts = raw.split(b"\x01")
                if len(parts) == 4 and parts[2:] == [b"", b""] and parts[0].startswith(b"user=") \
                        and parts[1].startswith(b"auth=Bearer "):
                    well_formed = True
                    login = parts[0][len(b"user="):]
                    token = parts[1][len(b"auth=Bearer "):]
                tls = in_tls(server)
                ok = tls and well_formed and bool(tokens(login.decode("utf-8", "replace"),
                                                 token.decode("utf-8", "replace")))
                with outer.cond:
                    outer.auth_attempts.append({"mechanism": "XOAUTH2", "login": login,
                                                "secret": token, "ok": ok, "raw": raw,
                                                "tls": tls})
                    outer.cond.notify_all()
                if ok:
                    return AuthResult(success=True, auth_data=login)
                answer = await server.challenge_auth(outer.XOAUTH2_ERROR)
                with outer.cond:
                    outer.xoauth2_challenge_answers.append(answer)
                return AuthResult(success=False, handled=False,
                                  message="535 5.7.8 Username and Password not accepted")

            self.controller.handler.auth_XOAUTH2 = auth_XOAUTH2

    def auth_lines(self):
        """Every AUTH command line the relay read, over all connections."""
        with self.cond:
            return [l for c in self.conns for l, _ in c.lines
                    if l.split(b" ", 1)[0].upper() == b"AUTH"]


def stop_proxies(made):
    """A factory fixture's teardown: each Proxy still running must exit 0 on
    SIGTERM with no sanitizer report in its log; the failures all together."""
    errors = []
    for p in made:
        if p.exit_code is not None:     # the test stopped it on purpose
            continue
        try:
            p.check_and_stop()
        except BaseException as e:      # pytest.fail raises a BaseException subclass
            errors.append(str(e))
    if errors:
        pytest.fail("\n\n".join(errors), pytrace=False)


def cert_session(proxy, up, ctx, session=None, subject=b"resumed"):
    """An implicit-TLS session offering SESSION: a message, NOOP (the ticket
    is in by then), QUIT. Returns (reused, the session, the PROXY v2 TLVs
    the upstream got, the proxy's tls event)."""
    c, _ = open_implicit(proxy.port, ctx, session=session)
    with c:
        sid = proxy.session_id_for(c.sock)
        n = len(up.wait_messages(0))
        send_message(c, b"Subject: " + subject + b"\r\n\r\nbody\r\n")
        c.expect("NOOP", 250)
        out = (c.sock.session_reused, c.sock.session)
        c.expect("QUIT", 221)
    tlv = up.wait_messages(n + 1)[n]["proxy"]["tlv"]
    return out + (tlv, proxy.wait_event("tls", id=sid))
