"""Many sessions at once through one daemon."""

import os
import smtplib
import threading
import time

import stp_harness as h


def deliver(port, sender, msg, errors):
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.ehlo("client.test")
            s.starttls(context=h.client_tls_context())
            s.ehlo("client.test")
            refused = s.sendmail(sender, ["a@example.net"], msg)
            if refused:
                errors.append((sender, refused))
    except Exception as e:          # collected and asserted in the test thread
        errors.append((sender, repr(e)))


def test_parallel_starttls_sessions_all_deliver_intact(proxy_aio):
    proxy, up = proxy_aio
    n = 24
    msgs = {}
    for i in range(n):
        body = os.urandom(3000 * (i + 1)).hex().encode()
        lines = b"\r\n".join(body[j:j + 900] for j in range(0, len(body), 900))
        msgs["s%d@example.org" % i] = b"Subject: parallel %d\r\n\r\n" % i + lines + b"\r\n"
    errors = []
    threads = [threading.Thread(target=deliver, args=(proxy.port, snd, m, errors))
               for snd, m in msgs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    got = {e["mail_from"]: e["original_content"] for e in up.wait_messages(n)}
    assert got.keys() == msgs.keys()
    for snd, m in msgs.items():
        assert got[snd] == m, "message from %s differs" % snd


def test_slow_client_does_not_block_others(proxy_aio):
    proxy, up = proxy_aio
    slow, _ = h.open_session(proxy.port, tls=True, timeout=20)
    with slow:
        slow.begin_data("slow@example.org")
        slow.send(b"Subject: slow\r\n\r\npart one\r\n")
        # while the slow one sits in DATA, others get through quickly
        t0 = time.monotonic()
        errors = []
        for i in range(3):
            deliver(proxy.port, "fast%d@example.org" % i,
                    b"Subject: fast\r\n\r\nfast %d\r\n" % i, errors)
        assert not errors, errors
        assert time.monotonic() - t0 < 10
        slow.send(b"part two\r\n.\r\n")
        assert slow.read_reply().code == 250
        slow.expect("QUIT", 221)
    envs = up.wait_messages(4)
    froms = [e["mail_from"] for e in envs]
    assert froms[:3] == ["fast0@example.org", "fast1@example.org", "fast2@example.org"]
    assert envs[3]["original_content"] == b"Subject: slow\r\n\r\npart one\r\npart two\r\n"
