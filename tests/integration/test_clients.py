"""Real mail software through STARTTLS: swaks, curl, Python smtplib, openssl
s_client; and Postfix's smtp-sink as the upstream."""

import os
import queue
import re
import smtplib
import subprocess
import threading
import uuid

import pytest

import stp_harness as h


run = h.run_tool


def test_swaks_delivers_through_starttls(proxy_aio):
    proxy, up = proxy_aio
    swaks = h.require_program("swaks", "swaks")
    tag = uuid.uuid4().hex
    p = run([swaks, "--tls", "--server", "127.0.0.1:%d" % proxy.port,
             "--to", "a@example.net", "--from", "b@example.org",
             "--header", "X-Test-Tag: " + tag, "--body", "swaks body " + tag,
             "--timeout", "15"])
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode == 0, out
    assert "TLS started" in out or "STARTTLS" in out, out
    env = up.wait_messages(1)[0]
    assert env["mail_from"] == "b@example.org"
    assert env["rcpt_tos"] == ["a@example.net"]
    assert ("X-Test-Tag: %s\r\n" % tag).encode() in env["original_content"]
    assert ("swaks body %s" % tag).encode() in env["original_content"]


def test_curl_delivers_through_starttls(proxy_aio, tmp_path):
    proxy, up = proxy_aio
    msg = (b"From: b@example.org\r\nTo: a@example.net\r\nSubject: curl test\r\n\r\n"
           b"first line\r\n.a line that starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n")
    p = h.curl_upload("smtp://127.0.0.1:%d" % proxy.port, msg, tmp_path)
    assert p.returncode == 0, p.stdout.decode("utf-8", "replace")
    env = up.wait_messages(1)[0]
    assert env["mail_from"] == "b@example.org"
    assert env["rcpt_tos"] == ["a@example.net"]
    assert env["original_content"] == msg


def test_smtplib_delivers_through_starttls(proxy_aio):
    proxy, up = proxy_aio
    msg = b"From: b@example.org\r\nTo: a@example.net\r\nSubject: smtplib\r\n\r\nhello from smtplib\r\n"
    with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls")
        code, _ = s.starttls(context=h.client_tls_context())
        assert code == 220
        s.ehlo("client.test")
        assert not s.has_extn("starttls")
        refused = s.sendmail("b@example.org", ["a@example.net", "c@example.net"], msg)
        assert refused == {}
    env = up.wait_messages(1)[0]
    assert env["mail_from"] == "b@example.org"
    assert env["rcpt_tos"] == ["a@example.net", "c@example.net"]
    assert env["original_content"] == msg


def test_tls_uses_the_configured_certificate(proxy_scripted, tls_files):
    import ssl
    proxy, _ = proxy_scripted
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        der = c.sock.getpeercert(binary_form=True)
        with open(tls_files["cert"]) as f:
            assert der == ssl.PEM_cert_to_DER_cert(f.read())
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        c.expect("QUIT", 221)


class OpensslClient:
    """openssl s_client -starttls smtp, driven line by line."""

    def __init__(self, openssl, port):
        self.p = subprocess.Popen(
            [openssl, "s_client", "-starttls", "smtp", "-connect", "127.0.0.1:%d" % port,
             "-crlf", "-quiet", "-brief", "-nocommands", "-servername", "proxy.test"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = queue.Queue()
        self.stderr = b""
        threading.Thread(target=self._pump, daemon=True).start()
        self._err_thread = threading.Thread(target=self._pump_err, daemon=True)
        self._err_thread.start()

    def _pump(self):
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _pump_err(self):
        self.stderr = self.p.stderr.read()

    def send(self, text):
        self.p.stdin.write(text.encode() + b"\n")
        self.p.stdin.flush()

    def reply(self, timeout=10):
        out = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError("openssl s_client: no reply within %ds; got %r; stderr %r"
                                     % (timeout, out, self.stderr))
            if line is None:
                raise AssertionError("openssl s_client ended; got %r; stderr %r" % (out, self.stderr))
            out.append(line)
            if re.match(rb"^\d{3} ", line) or re.match(rb"^\d{3}\r?\n$", line):
                return out

    def close(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self._err_thread.join(10)   # stderr is read to its end before it is looked at


def test_openssl_s_client_starttls_handshake_then_ehlo_mail_quit(proxy_aio):
    proxy, up = proxy_aio
    openssl = h.require_program("openssl", "openssl")
    c = OpensslClient(openssl, proxy.port)
    try:
        c.send("EHLO openssl.client.test")
        r = c.reply()
        assert r[-1].startswith(b"250 "), r
        assert not any(b"STARTTLS" in l.upper() for l in r), r
        c.send("MAIL FROM:<b@example.org>")
        assert c.reply()[-1].startswith(b"250"), "MAIL"
        c.send("RCPT TO:<a@example.net>")
        assert c.reply()[-1].startswith(b"250"), "RCPT"
        c.send("DATA")
        assert c.reply()[-1].startswith(b"354"), "DATA"
        for line in ("Subject: via openssl", "", "body via s_client", "."):
            c.send(line)
        assert c.reply()[-1].startswith(b"250"), "end of data"
        c.send("QUIT")
        assert c.reply()[-1].startswith(b"221"), "QUIT"
    finally:
        c.close()
    err = c.stderr.decode("utf-8", "replace")
    assert "CONNECTION ESTABLISHED" in err, err
    assert re.search(r"Protocol version: TLSv1\.[23]", err), err
    env = up.wait_messages(1)[0]
    assert env["mail_from"] == "b@example.org"
    assert env["rcpt_tos"] == ["a@example.net"]
    assert env["original_content"] == b"Subject: via openssl\r\n\r\nbody via s_client\r\n"


def start_smtp_sink(tmp_path):
    sink = h.require_program("smtp-sink", "postfix", paths=["/usr/sbin/smtp-sink"])
    port = h.free_port()
    out = open(tmp_path / "sink.out", "wb")
    argv = [sink]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]
    argv += ["-c", "127.0.0.1:%d" % port, "100"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def ready():
        import socket
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(2)
                return s.recv(100).startswith(b"220")
        except OSError:
            return False
    if not h.wait_until(ready, 10, 0.1):
        p.kill()
        pytest.fail("smtp-sink did not start: %r" % (tmp_path / "sink.out").read_bytes())
    return p, out, port


def test_smtp_sink_upstream_receives_every_message_from_swaks(make_proxy, tmp_path):
    swaks = h.require_program("swaks", "swaks")
    sink, out, port = start_smtp_sink(tmp_path)
    try:
        proxy = make_proxy("127.0.0.1:%d" % port)
        n = 5
        for i in range(n):
            p = run([swaks, "--tls", "--server", "127.0.0.1:%d" % proxy.port,
                     "--to", "rcpt%d@example.net" % i, "--from", "b@example.org",
                     "--header", "Subject: sink %d" % i, "--timeout", "15"])
            assert p.returncode == 0, p.stdout.decode("utf-8", "replace")

        def delivered():
            text = (tmp_path / "sink.out").read_bytes().decode("latin-1")
            counts = re.findall(r"mesg=(\d+)", text)
            return int(counts[-1]) if counts else 0
        h.wait_until(lambda: delivered() >= n, 5)
        assert delivered() == n
    finally:
        sink.terminate()
        sink.wait(5)
        out.close()


def test_posttls_finger_establishes_tls(proxy_scripted, tmp_path):
    proxy, up = proxy_scripted
    finger = h.require_program("posttls-finger", "postfix", paths=["/usr/sbin/posttls-finger"])
    (tmp_path / "main.cf").write_text("")          # it insists on reading one
    env = dict(os.environ, MAIL_CONFIG=str(tmp_path))
    p = run([finger, "-c", "-l", "encrypt", "[127.0.0.1]:%d" % proxy.port], env=env)
    out = p.stdout.decode("utf-8", "replace")
    assert p.returncode == 0, out
    assert re.search(r"TLS connection established to .*: TLSv1\.[23] with cipher", out), out
    assert "subject_CN=proxy.test" in out, out
    up.wait_closed()
    assert up.saw_verb("QUIT"), up.all_commands()
