"""A period without memory: every connection is refused (closed at once),
the listener goes on accepting, and serves again as soon as memory is back,
with no descriptor left behind. The daemon runs with the project's own
allocation-failure shim preloaded (tests/support/failalloc.c): while a flag
file exists, malloc, calloc and realloc fail."""

import os
import signal
import socket
import subprocess

import pytest

import stp_harness as h


def shim():
    path = os.environ.get("STP_FAILALLOC")
    if not path or not os.path.exists(path):
        pytest.skip("STP_FAILALLOC (the allocation-failure shim) not built")
    ldd = subprocess.run(["ldd", h.daemon_binary()], stdout=subprocess.PIPE, text=True).stdout
    if "libasan" in ldd:
        pytest.skip("AddressSanitizer's allocator cannot be interposed")
    return path


def fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def test_listener_survives_a_period_without_memory(make_proxy, aio, tmp_path):
    flag = str(tmp_path / "fail")
    proxy = make_proxy(aio, tls="none", require_tls=None,
                       env={"LD_PRELOAD": shim(), "STP_FAILALLOC_FLAG": flag})
    with h.SmtpConn(proxy.port) as c:    # a session before: buffers exist
        c.greeting()
        c.expect("QUIT", 221)
    h.wait_until(lambda: proxy.events("disconnect"), 5)
    before = fds(proxy.proc.pid)
    open(flag, "w").close()
    try:
        for _ in range(20):
            try:    # closed at once (a reset, maybe before connect returns)
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                    assert s.recv(100) == b""   # never a hang (socket.timeout)
            except ConnectionResetError:
                pass
        # a reload without memory is refused with a reason, nothing else
        proxy.send_signal(signal.SIGHUP)
        ev = h.wait_until(lambda: proxy.events("reload"), 5)
        assert ev and ev[0].get("status") == "failed" and ev[0].get("error"), ev
    finally:
        os.unlink(flag)
    assert [e for e in proxy.events("accept_error") if e.get("action") == "closed"]
    with h.SmtpConn(proxy.port) as c:
        c.greeting()
        c.expect("EHLO client.test", 250)
        h.send_message(c, b"Subject: after\r\n\r\nmemory is back\r\n")
        c.expect("QUIT", 221)
    assert len(aio.wait_messages(1)) == 1
    h.wait_until(lambda: fds(proxy.proc.pid) == before, 5)


def test_admin_endpoints_survive_a_period_without_memory(make_proxy, aio, tmp_path):
    """A connection [admin] cannot allocate for is still taken and closed
    (a spare handle): libuv stops watching a listening socket whose
    connection is left, and /healthz stayed dead after memory came back.
    Found by an outside attack."""
    flag = str(tmp_path / "fail")
    proxy = make_proxy(aio, tls="none", require_tls=None, admin=True,
                       env={"LD_PRELOAD": shim(), "STP_FAILALLOC_FLAG": flag})
    port = int(proxy.wait_event("admin_listening")["addr"].rsplit(":", 1)[1])

    def healthz():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                return s.recv(100)
        except OSError:
            return b""
    assert healthz().startswith(b"HTTP/1.1 200")
    open(flag, "w").close()
    try:
        for _ in range(5):
            assert not healthz().startswith(b"HTTP/1.1 200")
    finally:
        os.unlink(flag)
    assert h.wait_until(lambda: healthz().startswith(b"HTTP/1.1 200"), 5), \
        "[admin] does not answer now that memory is back"
