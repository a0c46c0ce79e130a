"""Byte-exact delivery through STARTTLS to aiosmtpd, which keeps the raw
(un-dot-stuffed) message bytes in envelope.original_content."""

import base64
import hashlib
import os
import smtplib
import time

import stp_harness as h


def send_over_starttls(port, msg, rcpts=("a@example.net",), mail_options=(), timeout=15):
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as s:
        s.ehlo("client.test")
        code, _ = s.starttls(context=h.client_tls_context())
        assert code == 220
        s.ehlo("client.test")
        refused = s.sendmail("b@example.org", list(rcpts), msg, mail_options=list(mail_options))
        assert refused == {}


def test_dot_stuffed_lines_arrive_unstuffed(proxy_aio):
    proxy, up = proxy_aio
    msg = (b"Subject: dots\r\n\r\n"
           b".\r\n"
           b"..\r\n"
           b"...\r\n"
           b". a dot and a space\r\n"
           b".leading dot\r\n"
           b"middle . dot\r\n"
           b"\r\n"
           b".\r\n"
           b"end\r\n")
    send_over_starttls(proxy.port, msg)
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg


def test_eight_bit_body_arrives_unchanged(proxy_aio):
    proxy, up = proxy_aio
    high = bytes(range(0x80, 0x100))
    msg = (b"Subject: 8bit\r\nContent-Type: text/plain; charset=latin1\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n"
           + high + b"\r\n"
           + b"caf\xe9 \xc3\xa9t\xc3\xa9 \xff\xfe\r\n"
           + b"." + high[::-1] + b"\r\n")
    send_over_starttls(proxy.port, msg, mail_options=["BODY=8BITMIME"])
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    assert "BODY=8BITMIME" in env["mail_options"]


def test_998_octet_lines_arrive_unchanged(proxy_aio):
    proxy, up = proxy_aio
    lines = [b"Subject: long lines", b""]
    for i in range(20):
        ch = bytes([0x41 + i])
        lines.append((ch * 998))
        lines.append((b"%d " % i) + b"y" * (998 - len(b"%d " % i)))
    msg = b"\r\n".join(lines) + b"\r\n"
    assert all(len(l) <= 998 for l in lines)
    send_over_starttls(proxy.port, msg)
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg


def test_message_split_into_odd_sized_writes_arrives_unchanged(proxy_aio):
    """The end-of-data dot and the CRLFs straddle write boundaries."""
    proxy, up = proxy_aio
    body = b"Subject: splits\r\n\r\n" + b"".join(
        b"line %d with some text\r\n.dotline %d\r\n" % (i, i) for i in range(200))
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    c, _ = h.open_session(proxy.port, tls=True)
    with c:
        c.begin_data()
        wire = stuffed + b".\r\n"
        i, n = 0, 1
        while i < len(wire):
            c.send(wire[i:i + n])
            i += n
            n = n % 7 + 1
            if i % 97 < 7:
                time.sleep(0.001)
        r = c.read_reply()
        assert r.code == 250, r.raw
        c.expect("QUIT", 221)
    env = up.wait_messages(1)[0]
    assert env["original_content"] == body


def test_50_megabyte_message_arrives_with_the_same_sha256(proxy_aio):
    proxy, up = proxy_aio
    line_len = 998
    target = 50 * 1024 * 1024
    n_lines = target // (line_len + 2) + 1
    text = base64.b64encode(os.urandom(n_lines * line_len * 3 // 4 + 3))
    lines = [text[i * line_len:(i + 1) * line_len] for i in range(n_lines)]
    for i in range(0, n_lines, 101):        # some lines need dot-stuffing
        lines[i] = b"." + lines[i][1:]
    for i in range(50, n_lines, 997):       # and some carry 8-bit bytes
        lines[i] = bytes(range(0x80, 0x100)) + lines[i][128:]
    msg = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    assert len(msg) >= target
    want = hashlib.sha256(msg).hexdigest()
    t0 = time.monotonic()
    send_over_starttls(proxy.port, msg, mail_options=["BODY=8BITMIME"], timeout=60)
    env = up.wait_messages(1, timeout=30)[0]
    elapsed = time.monotonic() - t0
    got = env["original_content"]
    assert len(got) == len(msg)
    assert hashlib.sha256(got).hexdigest() == want
    assert elapsed < 60, "50 MB took %.1fs" % elapsed


def test_stalled_upstream_applies_backpressure_not_buffering(make_scripted, make_proxy):
    """While the upstream reads nothing, a client pushing a 40 MB message must
    be held back by TCP flow control, not buffered inside the daemon."""
    import threading
    gate = threading.Event()
    up = make_scripted(data_gate=gate)
    proxy = make_proxy(up)
    line = b"z" * 998 + b"\r\n"
    body = b"Subject: backpressure\r\n\r\n" + line * (40 * 1024 * 1024 // len(line))
    c, _ = h.open_session(proxy.port, tls=True, timeout=60)
    with c:
        c.begin_data()
        before = h.rss_kib(proxy.pid)
        errors = []

        def push():
            try:
                c.send(body + b".\r\n")
            except Exception as e:
                errors.append(repr(e))
        t = threading.Thread(target=push, daemon=True)
        t.start()
        try:
            time.sleep(2)
            grown = h.rss_kib(proxy.pid) - before
            assert t.is_alive(), "the whole 40 MB was accepted while the upstream read nothing"
            assert grown < 20 * 1024, "VmRSS grew by %d KiB against a stalled upstream" % grown
        finally:
            gate.set()
        t.join(60)
        assert not errors, errors
        r = c.read_reply()
        assert r.code == 250, r.raw
        c.expect("QUIT", 221)
    m = up.wait_messages(1)[0]
    assert hashlib.sha256(m["content"]).digest() == hashlib.sha256(body).digest()
