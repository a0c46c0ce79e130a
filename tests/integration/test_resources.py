"""Resources: thousands of aborted handshakes leave RSS and open descriptors
where they were; running out of descriptors does not kill the daemon, and it
serves again once they are back."""

import os
import socket
import threading
import time

import stp_harness as h
import hardening_util as hu


def at_starttls(port):
    """A connection to PORT that has sent EHLO and STARTTLS and read both
    replies: the next bytes are the client's TLS handshake."""
    c = h.SmtpConn(port, timeout=10)
    try:
        c.greeting()
        c.send(b"EHLO a.test\r\nSTARTTLS\r\n")
        c.read_reply()
        c.read_reply()
    except BaseException:
        c.close()
        raise
    return c


def abort_starttls_garbage(port, hello):
    with at_starttls(port) as c:
        c.send(b"\x16\x03\x01\x00\x10this is not TLS!" * 2)
        c.read_until_closed(timeout=10)


def abort_starttls_half_hello(port, hello):
    with at_starttls(port) as c:
        c.send(hello[:len(hello) // 2])
    # closed by us mid-handshake


def abort_implicit_half_hello(port, hello):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(hello[:len(hello) // 2])
    hu.reset_close(s)


def abort_connect_close(port, hello):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.close()


def run_aborts(ports, n, threads=16):
    """N aborted handshakes, spread over four ways of aborting, from
    THREADS threads. Returns the list of client-side errors."""
    hello = hu.client_hello()
    kinds = [(abort_starttls_garbage, ports[0]), (abort_starttls_half_hello, ports[0]),
             (abort_implicit_half_hello, ports[1]), (abort_connect_close, ports[0])]
    errors = []
    counter = iter(range(n))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            fn, port = kinds[i % len(kinds)]
            try:
                fn(port, hello)
            except Exception as e:      # collected, asserted by the test
                errors.append("%s: %r" % (fn.__name__, e))
    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    return errors


def test_2000_aborted_handshakes_leave_rss_and_descriptors_at_baseline(make_scripted,
                                                                       make_proxy, tls_files):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"log_level": "info"},
                     max_connections_per_ip="1000", timeout_handshake="5s",
                     extra_listeners=[("smtps", {
                         "listen": "127.0.0.1:0", "tls": "implicit",
                         "cert": tls_files["cert"], "key": tls_files["key"], "upstream": "up",
                         "max_connections_per_ip": "1000", "timeout_handshake": "5s"})])
    ports = (proxy.port, proxy.ports["smtps"])
    # warm up the allocator and the buffer pool, then take the baseline
    assert not run_aborts(ports, 200)
    assert hu.deliver(proxy.port).code == 250
    time.sleep(0.5)
    base_fds = hu.fd_count(proxy.pid)
    base_rss = h.rss_kib(proxy.pid)

    t0 = time.monotonic()
    errors = run_aborts(ports, 2000)
    took = time.monotonic() - t0
    assert not errors, "%d client errors, e.g. %s" % (len(errors), errors[:5])
    connects = len(proxy.events("connect"))
    assert connects >= 2201, "the daemon logged %d connections, expected 2201" % connects

    settled = h.wait_until(lambda: hu.fd_count(proxy.pid) <= base_fds + 10, 10, interval=0.2)
    fds = hu.fd_count(proxy.pid)
    rss = h.rss_kib(proxy.pid)
    assert settled, "open descriptors %d, baseline %d (after %.1fs of aborts)" % (
        fds, base_fds, took)
    hu.assert_rss_growth(rss - base_rss, 5 * 1024, "after 2000 aborted handshakes "
                         "(baseline %d KiB)" % base_rss)
    assert hu.deliver(proxy.port).code == 250
    assert proxy.alive()


def fd_limited_binary(tmp_path, limit):
    """A wrapper that execs the daemon under RLIMIT_NOFILE = LIMIT (the PID
    stays the daemon's, so stp_harness.Proxy can drive it)."""
    path = tmp_path / "stp-nofile.sh"
    path.write_text("#!/bin/sh\nulimit -n %d || exit 111\nexec %s \"$@\"\n"
                    % (limit, h.daemon_binary()))
    os.chmod(str(path), 0o755)
    return str(path)


def test_running_out_of_descriptors_is_survived_and_recovered(make_scripted, tmp_path,
                                                              tls_files):
    up = make_scripted()
    text = h.render_config(
        {"log_level": "info", "hostname": "proxy.test"},
        [("main", {"listen": "127.0.0.1:0", "cert": tls_files["cert"],
                   "key": tls_files["key"], "upstream": "up", "timeout_idle": "30s",
                   "max_connections_per_ip": "1000"})],
        [("up", {"address": up.address})])
    proxy = h.Proxy(fd_limited_binary(tmp_path, 64), str(tmp_path / "proxy"), text)
    proxy.start()
    port = proxy.port
    try:
        with open("/proc/%d/limits" % proxy.pid) as f:
            assert any(l.startswith("Max open files") and l.split()[3] == "64" for l in f), \
                "the descriptor limit did not apply"
        conns = []
        try:
            for _ in range(150):                 # each session needs two descriptors
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                conns.append(s)
            time.sleep(1.0)
            assert proxy.alive(), "daemon died out of descriptors:\n" + proxy.log_tail()
            # every connection was either served (a reply came) or closed:
            # none is left hanging unanswered
            served = closed = 0
            hanging = []
            for s in conns:
                s.settimeout(5)
                try:
                    d = s.recv(4096)
                except (ConnectionResetError, socket.timeout) as e:
                    if isinstance(e, socket.timeout):
                        hanging.append(s.getsockname())
                        continue
                    d = b""
                if d.startswith(b"220"):
                    served += 1
                else:
                    closed += 1
            assert served > 0, "no session was served"
            assert closed > 0, "150 sessions under a limit of 64 descriptors all served?"
            assert not hanging, "%d connections got neither a reply nor a close" % len(hanging)
        finally:
            for s in conns:
                s.close()
        # once they are gone, a normal session works
        ok = h.wait_until(lambda: _delivers(port), 10, interval=0.5)
        assert ok, "no normal session after the descriptors came back:\n" + proxy.log_tail()
        assert proxy.alive()
    finally:
        rc = proxy.stop()
    hu.assert_clean_exit(proxy, rc)


def _delivers(port):
    try:
        return hu.deliver(port).code == 250
    except (AssertionError, OSError, EOFError):
        return False
