"""Dovecot's LMTP server as a real downstream for the integration tests.

DovecotLmtp writes a dovecot.conf of its own into a fresh directory and runs
``dovecot -F`` unprivileged: started as root, the master and every child run
as ``nobody:nogroup`` (no root at any moment, no setuid); started as another
user, as that user. It listens on 127.0.0.1:<free port>, plaintext LMTP
(optionally with STARTTLS), and delivers every recipient @example.net (any
local part, case-insensitive, ``+detail`` dropped) to the Maildir
``<workdir>/home/<local part>/Maildir``. Any other domain gets
``550 5.1.1 ... User doesn't exist``.

Messages are stored with CRLF line ends (``mail_save_crlf = yes``). What
Dovecot changes, so that a test compares the right thing:

* it prepends ``Return-Path: <sender>`` and a ``Received: from <lhlo>
  ([client ip]) ... by dovecot.test with LMTP ...`` field (``with LMTPS`` and
  a ``(using TLSv1.3 with cipher ...)`` line after STARTTLS); Delivered-To
  is off unless asked for. d.strip(raw) / strip_added_headers() remove
  exactly those;
* a bare LF in the data is stored as CRLF; dot-stuffing is undone as LMTP
  requires. NUL and 8-bit bytes are kept.

Reading back: d.messages("alice") (or "alice@example.net") -> [bytes], in
delivery order (Dovecot's UID order); d.wait_messages(user, n) waits for n;
d.users() -> local parts that got mail; d.deliveries() -> [(user, mailbox)]
from the log. start() checks readiness with one connection of its own, so
the log holds one extra "Connect from 127.0.0.1 ... state=GREETING" pair.

XCLIENT: Dovecot honours ``XCLIENT ADDR=.. PORT=.. HELO=..`` from
login_trusted_networks (127.0.0.0/8 here unless xclient=False); it answers
with a new 220 greeting, the client address then shows in the Received field
(``from <lhlo> ([ADDR])``) and in the log (``Disconnect from ADDR``).

Beware: Python's smtplib.LMTP.data()/sendmail() read ONE reply after the
final dot, but LMTP sends one per accepted recipient; with two or more
accepted recipients send DATA by hand and read each reply with getreply().

Usage::

    from dovecot_util import dovecot_lmtp        # the fixture
    def test_x(dovecot_lmtp):
        d = dovecot_lmtp                          # started DovecotLmtp
        ... deliver to d.address ...
        raw = d.wait_messages("alice", 1)[0]
        assert d.strip(raw) == expected

or, for options (STARTTLS)::

    d = DovecotLmtp(tmp_path, ssl_pair=(cert, key)).start()
    try: ...
    finally: d.cleanup()             # stop() + remove the work directory

The work directory lives under /tmp with a short name (not in pytest's
tmp_path: that is mode 0700 root, which nobody cannot enter, and Dovecot's
unix socket paths must stay short). DovecotLmtp(tmp_path) (and the fixture)
copy dovecot.conf and dovecot.log into tmp_path at stop(); cleanup() removes
the work directory.
"""

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

import stp_harness as h

DOMAIN = "example.net"
HOSTNAME = "dovecot.test"       # Dovecot's greeting / LHLO / Received name
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

_MAILDIR_NAME = re.compile(rb"^(\d+)\.M(\d+)P(\d+)")


def dovecot_binary():
    return h.require_program("dovecot", "dovecot-core", paths=("/usr/sbin/dovecot",))


def _run_as():
    """(user name, uid, gid) Dovecot runs as: nobody when we are root."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam("nobody")
    else:
        pw = pwd.getpwuid(os.geteuid())
    return pw.pw_name, pw.pw_uid, pw.pw_gid


def _session_pids(sid):
    """PIDs of the live processes whose session id is SID."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 3 and fields[0] != b"Z" and int(fields[3]) == sid:
            out.append(int(name))
    return out


def _fields(raw):
    """Split the header fields at the top of RAW: yields (start, end, text)
    per field (with its continuation lines), stopping at the blank line."""
    pos = 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end + 1
        line = raw[pos:end]
        if line in (b"\r\n", b"\n"):
            return
        while end < len(raw) and raw[end:end + 1] in (b" ", b"\t"):
            nxt = raw.find(b"\n", end)
            end = len(raw) if nxt < 0 else nxt + 1
        yield pos, end, raw[pos:end]
        pos = end


def strip_added_headers(raw, hostname=HOSTNAME, delivered_to=True, received=True):
    """RAW (a stored message) without what Dovecot's LMTP prepended, which is,
    in this order at the very top: ``Return-Path: <sender>`` (always), then
    ``Delivered-To:`` (only with lmtp_hdr_delivery_address = final and one
    recipient in the transaction; pass delivered_to=False when the instance
    did not enable it) and ``Received: ... by HOSTNAME with LMTP ...`` (pass
    received=False when the instance disabled it). Fields of the original
    message are never removed: RAW is returned unchanged when it does not
    start with Return-Path."""
    fields = []
    for f in _fields(raw):
        fields.append(f)
        if len(fields) == 3:
            break
    if not fields or not fields[0][2].lower().startswith(b"return-path:"):
        return raw
    pos, i = fields[0][1], 1
    if delivered_to and i < len(fields) and fields[i][2].lower().startswith(b"delivered-to:"):
        pos, i = fields[i][1], i + 1
    if received and i < len(fields):
        text = re.sub(rb"\s+", b" ", fields[i][2].lower())
        if text.startswith(b"received:") and \
                (b" by " + hostname.lower().encode() + b" with lmtp") in text:
            pos = fields[i][1]
    return raw[pos:]


def split_message(raw):
    """(header bytes incl. the blank line, body bytes) of RAW."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[:i + len(sep)], raw[i + len(sep):]
    return raw, b""


class DovecotLmtp:
    """One Dovecot instance serving LMTP on 127.0.0.1:PORT.

    base_dir: if given (e.g. pytest's tmp_path), stop() copies dovecot.conf,
      dovecot.log and stdout.log there, for a post-mortem after cleanup().
      The live work directory is always a fresh /tmp/dovecot-XXXX (.workdir).
    ssl_pair: (cert_path, key_path) or {"cert":..,"key":..} (conftest's
      tls_files) to offer STARTTLS (ssl = yes, not required). The files are
      copied into the work directory so that the unprivileged user can read
      them.
    xclient: trust 127.0.0.0/8 for XCLIENT (login_trusted_networks).
    delivered_to: add Delivered-To (lmtp_hdr_delivery_address = final).
    received_header: add Dovecot's Received field.
    parent: where the work directory is made (default /tmp).
    extra_conf: text appended to dovecot.conf.
    """

    def __init__(self, base_dir=None, ssl_pair=None, xclient=True, delivered_to=False,
                 received_header=True, parent=None, extra_conf="", port=None):
        self.user, self.uid, self.gid = _run_as()
        self.base_dir = None if base_dir is None else str(base_dir)
        self.workdir = tempfile.mkdtemp(prefix="dovecot-", dir=parent or "/tmp")
        os.chmod(self.workdir, 0o755)
        self._port_given = bool(port)
        self.port = port or h.free_port()
        self.address = "127.0.0.1:%d" % self.port
        self.hostname = HOSTNAME
        self.log_path = os.path.join(self.workdir, "dovecot.log")
        self.config_path = os.path.join(self.workdir, "dovecot.conf")
        self.home = os.path.join(self.workdir, "home")
        self.proc = None
        self.exit_code = None
        self.tls = ssl_pair is not None
        self.delivered_to = delivered_to
        self.received_header = received_header
        for sub in ("run", "state", "home"):
            os.mkdir(os.path.join(self.workdir, sub))
        ssl_lines = "ssl = no\n"
        if ssl_pair is not None:
            if isinstance(ssl_pair, dict):
                ssl_pair = (ssl_pair["cert"], ssl_pair["key"])
            cert = os.path.join(self.workdir, "lmtp-cert.pem")
            key = os.path.join(self.workdir, "lmtp-key.pem")
            shutil.copyfile(ssl_pair[0], cert)
            shutil.copyfile(ssl_pair[1], key)
            os.chmod(key, 0o600)
            ssl_lines = ("ssl = yes\nssl_cert = <%s\nssl_key = <%s\n"
                         "ssl_min_protocol = TLSv1.2\n" % (cert, key))
        with open(os.path.join(self.workdir, "users"), "w") as f:
            # passwd-file keyed by domain: only @example.net exists
            f.write("%s::%d:%d::::\n" % (DOMAIN, self.uid, self.gid))
        w = self.workdir
        conf = f"""\
# written by dovecot_util.py
base_dir = {w}/run
state_dir = {w}/state
log_path = {w}/dovecot.log
info_log_path = {w}/dovecot.log
debug_log_path = {w}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
hostname = {HOSTNAME}
default_internal_user = {self.user}
default_internal_group = {grp.getgrgid(self.gid).gr_name}
default_login_user = {self.user}
first_valid_uid = {self.uid}
last_valid_uid = {self.uid}
first_valid_gid = {self.gid}
last_valid_gid = {self.gid}
{ssl_lines}login_trusted_networks = {"127.0.0.0/8" if xclient else ""}
mail_location = maildir:~/Maildir
mail_save_crlf = yes
postmaster_address = postmaster@{DOMAIN}
auth_username_format = %Lu
recipient_delimiter = +
lmtp_save_to_detail_mailbox = no
lmtp_hdr_delivery_address = {"final" if delivered_to else "none"}
lmtp_add_received_header = {"yes" if received_header else "no"}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = passwd-file
  args = username_format=%Ld {w}/users
  override_fields = home={w}/home/%Ln
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
service anvil {{
  chroot =
}}
service auth-worker {{
  user = $default_internal_user
}}
"""
        conf += extra_conf
        with open(self.config_path, "w") as f:
            f.write(conf)
        for root, dirs, files in os.walk(self.workdir):
            for n in [root] + [os.path.join(root, x) for x in files]:
                os.chown(n, self.uid, self.gid)

    # -- lifecycle --

    def start(self):
        """Run dovecot; return self once it greets on the port (fails the
        test otherwise). A port taken between free_port() and bind is
        retried with another one, unless the port was given."""
        for attempt in range(3):
            err = self._start_once()
            if err is None:
                return self
            if self._port_given or "Address already in use" not in err or attempt == 2:
                pytest.fail(err, pytrace=False)
            new = h.free_port()
            with open(self.config_path) as f:
                conf = f.read()
            conf = conf.replace("    port = %d\n" % self.port, "    port = %d\n" % new)
            with open(self.config_path, "w") as f:
                f.write(conf)
            self.port = new
            self.address = "127.0.0.1:%d" % new

    def _start_once(self):
        binary = dovecot_binary()
        kw = {}
        if os.geteuid() == 0:
            kw = dict(user=self.uid, group=self.gid, extra_groups=[])
        out_path = os.path.join(self.workdir, "stdout.log")
        self._out = open(out_path, "ab")
        self.proc = subprocess.Popen(
            [binary, "-F", "-c", self.config_path],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out,
            cwd=self.workdir, start_new_session=True, **kw)
        self.exit_code = None
        deadline = time.monotonic() + START_TIMEOUT
        last = None
        want = ("220 %s " % self.hostname).encode()
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()
                return "dovecot exited with %d at start-up:\n%s%s" % (
                    rc, h.read_text(out_path), self.log_text())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    banner = s.recv(512)
                    if banner.startswith(want) and self.proc.poll() is None:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                        return None
                    last = banner
            except OSError as e:
                last = e
            time.sleep(0.05)
        self.stop()
        return "dovecot did not answer on %s within %ss (%r):\n%s%s" % (
            self.address, START_TIMEOUT, last, h.read_text(out_path), self.log_text())

    def stop(self):
        """SIGTERM the master, wait for it and for every process of its
        session (SIGKILL whatever is left after STOP_TIMEOUT). Idempotent."""
        if self.proc is None:
            return self.exit_code
        sid = self.proc.pid
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.exit_code = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(sid, signal.SIGKILL)
            self.exit_code = self.proc.wait(5)
        if not h.wait_until(lambda: not _session_pids(sid), STOP_TIMEOUT):
            for pid in _session_pids(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            h.wait_until(lambda: not _session_pids(sid), 5)
        self.proc = None
        self._out.close()
        if self.base_dir:
            os.makedirs(self.base_dir, exist_ok=True)
            for name in ("dovecot.conf", "dovecot.log", "stdout.log"):
                try:
                    shutil.copyfile(os.path.join(self.workdir, name),
                                    os.path.join(self.base_dir, name))
                except OSError:
                    pass
        return self.exit_code

    def cleanup(self):
        """Stop, then remove the work directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    # -- results --

    def log_text(self):
        return h.read_text(self.log_path)

    def maildir(self, user):
        """The Maildir of USER: a local part ("alice") or an address
        ("Alice+x@example.net")."""
        local = user.split("@", 1)[0].split("+", 1)[0].lower()
        return os.path.join(self.home, local, "Maildir")

    def users(self):
        """Local parts that have a Maildir (got at least one message)."""
        try:
            return sorted(os.listdir(self.home))
        except FileNotFoundError:
            return []

    def _entries(self, user):
        """[(sort key, path, in uidlist)] of USER's INBOX messages."""
        md = self.maildir(user)
        uids = {}
        try:
            with open(os.path.join(md, "dovecot-uidlist"), "rb") as f:
                next(f, None)
                for line in f:
                    head, sep, name = line.rstrip(b"\n").partition(b":")
                    if sep and head.split():
                        uids[name.split(b":2,")[0]] = int(head.split()[0])
        except FileNotFoundError:
            pass
        out = []
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(md, sub).encode())
            except FileNotFoundError:
                continue
            for n in names:
                base = n.split(b":2,")[0]
                m = _MAILDIR_NAME.match(base)
                t = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
                uid = uids.get(base)
                key = (uid if uid is not None else 1 << 62, t, base)
                out.append((key, os.path.join(md.encode(), sub.encode(), n), uid is not None))
        out.sort()
        return out

    def strip(self, raw):
        """strip_added_headers() for what this instance adds."""
        return strip_added_headers(raw, self.hostname, delivered_to=self.delivered_to,
                                   received=self.received_header)

    def messages(self, user, strip=False):
        """Each message delivered to USER, in delivery order, as the exact
        bytes stored (strip=True: without Dovecot's added fields)."""
        out = []
        for _, path, _ in self._entries(user):
            with open(path, "rb") as f:
                raw = f.read()
            out.append(self.strip(raw) if strip else raw)
        return out

    def wait_messages(self, user, n, timeout=10, strip=False):
        """Wait until USER has N messages, all committed; return them.
        Fails the test after TIMEOUT seconds."""
        def ready():
            e = self._entries(user)
            return len(e) >= n and all(c for _, _, c in e)
        if not h.wait_until(ready, timeout):
            pytest.fail("%s: %d message(s) after %ss, wanted %d; dovecot log:\n%s" % (
                user, len(self._entries(user)), timeout, n, self.log_text()), pytrace=False)
        return self.messages(user, strip=strip)

    def deliveries(self):
        """[(user, mailbox)] from the log's "saved mail to" lines, in order;
        user is as Dovecot names it ("alice@example.net")."""
        return re.findall(r"lmtp\(([^)]*)\)<[^\n]*?saved mail to (\S+)", self.log_text())


@pytest.fixture
def dovecot_lmtp(tmp_path):
    """A started DovecotLmtp (plaintext, XCLIENT trusted from 127.0.0.0/8).
    At teardown: stopped (no process left), its conf and logs copied into
    tmp_path, its work directory removed."""
    d = DovecotLmtp(tmp_path)
    try:
        yield d.start()
    finally:
        d.cleanup()


# ---- IMAP ---------------------------------------------------------------------

IMAP_USERS = {"alice": "secret", "bob": "secret"}


class DovecotImap(DovecotLmtp):
    """Dovecot's imapd on 127.0.0.1:PORT, unprivileged, as a plaintext IMAP
    upstream: LOGIN/AUTHENTICATE PLAIN allowed without TLS
    (disable_plaintext_auth = no), users alice and bob (password "secret",
    passwd-file), Maildir under <workdir>/home/<user>, COMPRESS=DEFLATE on
    (imap_zlib), IDLE notifications every second. ssl_pair as for
    DovecotLmtp makes it offer STARTTLS too (so that stripping is real).
    haproxy=True: the listener wants a PROXY header (v1 or v2) from
    127.0.0.0/8 first, and refuses connections without one.
    The log (log_text()) has auth_verbose and auth_debug lines: a LOGIN that
    reached Dovecot shows there."""

    def __init__(self, base_dir=None, ssl_pair=None, parent=None, extra_conf="", port=None,
                 haproxy=False):
        super().__init__(base_dir, ssl_pair=ssl_pair, xclient=False, parent=parent,
                         port=port)
        self.haproxy = haproxy
        w = self.workdir
        with open(os.path.join(w, "imap-users"), "w") as f:
            for user, pw in IMAP_USERS.items():
                f.write("%s:{PLAIN}%s:%d:%d::%s/home/%s::\n"
                        % (user, pw, self.uid, self.gid, w, user))
        with open(self.config_path) as f:
            conf = f.read()
        head = conf[:conf.index("passdb {")]
        head = head.replace("protocols = lmtp", "protocols = imap")
        head = head.replace("login_trusted_networks = \n", "")
        conf = head + f"""\
disable_plaintext_auth = no
{"haproxy_trusted_networks = 127.0.0.0/8" if haproxy else ""}
auth_mechanisms = plain login
auth_verbose = yes
auth_debug = yes
mail_plugins = $mail_plugins zlib
imap_idle_notify_interval = 1 secs
protocol imap {{
  mail_plugins = $mail_plugins imap_zlib
}}
passdb {{
  driver = passwd-file
  args = {w}/imap-users
}}
userdb {{
  driver = passwd-file
  args = {w}/imap-users
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
    haproxy = {"yes" if haproxy else "no"}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service auth-worker {{
  user = $default_internal_user
}}
""" + extra_conf
        with open(self.config_path, "w") as f:
            f.write(conf)
        for n in (self.config_path, os.path.join(w, "imap-users")):
            os.chown(n, self.uid, self.gid)

    def _start_once(self):
        binary = dovecot_binary()
        kw = {}
        if os.geteuid() == 0:
            kw = dict(user=self.uid, group=self.gid, extra_groups=[])
        out_path = os.path.join(self.workdir, "stdout.log")
        self._out = open(out_path, "ab")
        self.proc = subprocess.Popen(
            [binary, "-F", "-c", self.config_path],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out,
            cwd=self.workdir, start_new_session=True, **kw)
        self.exit_code = None
        deadline = time.monotonic() + START_TIMEOUT
        last = None
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()
                return "dovecot exited with %d at start-up:\n%s%s" % (
                    rc, h.read_text(out_path), self.log_text())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if self.haproxy:
                        s.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\n")
                    banner = s.recv(512)
                    if banner.startswith(b"* OK") and self.proc.poll() is None:
                        s.sendall(b"a LOGOUT\r\n")
                        s.recv(512)
                        return None
                    last = banner
            except OSError as e:
                last = e
            time.sleep(0.05)
        self.stop()
        return "dovecot did not answer on %s within %ss (%r):\n%s%s" % (
            self.address, START_TIMEOUT, last, h.read_text(out_path), self.log_text())

    def imap_messages(self, user, mailbox="INBOX"):
        """The stored messages of USER's MAILBOX, as bytes, in UID order
        (read from the Maildir: new/ and cur/, Dovecot's names sort by
        delivery)."""
        base = os.path.join(self.workdir, "home", user, "Maildir")
        if mailbox != "INBOX":
            base = os.path.join(base, "." + mailbox)
        out = []
        for sub in ("cur", "new"):
            d = os.path.join(base, sub)
            if os.path.isdir(d):
                for name in os.listdir(d):
                    out.append((name, os.path.join(d, name)))
        out.sort()
        res = []
        for _, path in out:
            with open(path, "rb") as f:
                res.append(f.read())
        return res


@pytest.fixture
def dovecot_imap(tmp_path, tls_files):
    """A started DovecotImap offering STARTTLS and COMPRESS=DEFLATE. At
    teardown: stopped, conf and logs copied into tmp_path, removed."""
    d = DovecotImap(tmp_path, ssl_pair=tls_files)
    try:
        yield d.start()
    finally:
        d.cleanup()


# ---- POP3: Dovecot's pop3d beside its LMTP server (protocol = pop3 tests) ----

def pop3_dovecot(base_dir=None, ssl_pair=None, extra_conf="", haproxy=False):
    """A DovecotLmtp (not started) whose instance also serves POP3 on
    127.0.0.1:<.pop3_port> (.pop3_address): plaintext USER/PASS allowed
    (disable_plaintext_auth = no), any password for any user@example.net
    (the static passdb), the mailbox <workdir>/home/<local part>/Maildir.
    With ssl_pair its CAPA offers STLS (ssl = yes). LMTP stays: start()'s
    readiness check uses it; pop3_start() also waits for the POP3 greeting.
    auth_verbose and login lines name every login attempt in the log
    (pop3_login_lines). haproxy: the POP3 listener wants a PROXY header
    from 127.0.0.0/8 (the client's address then shows as rip=)."""
    port = h.free_port()
    trusted = "haproxy_trusted_networks = 127.0.0.0/8\n" if haproxy else ""
    conf = f"""\
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
pop3_uidl_format = %08Xu%08Xv
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
    haproxy = {"yes" if haproxy else "no"}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""
    d = DovecotLmtp(base_dir, ssl_pair=ssl_pair, extra_conf=trusted + conf + extra_conf)
    with open(d.config_path) as f:
        text = f.read()
    with open(d.config_path, "w") as f:
        f.write(text.replace("protocols = lmtp\n", "protocols = lmtp pop3\n"))
    d.pop3_port = port
    d.pop3_address = "127.0.0.1:%d" % port
    return d


def pop3_start(d, haproxy=False):
    """Start D (from pop3_dovecot) and wait for its POP3 greeting (HAPROXY:
    after a PROXY v1 header of our own)."""
    d.start()

    def greets():
        try:
            with socket.create_connection(("127.0.0.1", d.pop3_port), timeout=2) as s:
                if haproxy:
                    s.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 2\r\n")
                ok = s.recv(512).startswith(b"+OK")
                s.sendall(b"QUIT\r\n")
                s.recv(512)
                return ok
        except OSError:
            return False
    if not h.wait_until(greets, START_TIMEOUT):
        pytest.fail("dovecot pop3 did not greet on %s:\n%s" % (d.pop3_address, d.log_text()),
                    pytrace=False)
    return d


def pop3_fill(d, user, messages):
    """Put MESSAGES (bytes, CRLF line ends, as POP3 serves them) into USER's
    Maildir/new, in order, readable by Dovecot; returns their paths."""
    md = d.maildir(user)
    for sub in ("new", "cur", "tmp"):
        os.makedirs(os.path.join(md, sub), exist_ok=True)
    paths = []
    base = int(time.time())
    for i, raw in enumerate(messages):
        p = os.path.join(md, "new", "%d.M%dP%d.pop3test,S=%d" % (base, i + 1, os.getpid(),
                                                                 len(raw)))
        with open(p, "wb") as f:
            f.write(raw)
        paths.append(p)
    for root, dirs, files in os.walk(os.path.dirname(md)):
        for n in [root] + [os.path.join(root, x) for x in files]:
            os.chown(n, d.uid, d.gid)
    return paths


def pop3_login_lines(d):
    """Dovecot's pop3-login session lines ("Login: user=<...>", "Disconnected
    (no auth attempts ...)", "Aborted login (auth failed ...)")."""
    return [l for l in d.log_text().splitlines() if "pop3-login:" in l]


@pytest.fixture
def pop3_dovecot_server(tmp_path):
    """A started pop3_dovecot() instance (plaintext POP3). At teardown:
    stopped, conf and logs copied into tmp_path, work directory removed."""
    d = pop3_dovecot(tmp_path)
    try:
        yield pop3_start(d)
    finally:
        d.cleanup()
