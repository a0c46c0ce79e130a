"""The next hop as a list (issue 14): `address = HOST:PORT, HOST:PORT ...`
with DNS names resolved for each session, every address of every entry tried
in order until one greets 220, failed entries skipped for `retry_after` by
later sessions (in every worker), and a slow resolver that must not hold up
sessions of other listeners.

What counts as a failed address: connection refused, a connect that times
out (`timeout_connect`, per address), no greeting within timeout_connect, a
close before the greeting, a 421 or 554 greeting. Only the last candidate's
non-220 greeting reaches the client; when nothing is left the client gets a
421 of the proxy's own."""

import os
import socket
import threading
import time

import pytest

import stp_harness as h

UP = "up"


def hop_errors(proxy, address):
    """The event=upstream_error lines naming ADDRESS (as the proxy writes it)."""
    return [e for e in proxy.events("upstream_error")
            if e.get("upstream") == UP and e.get("address") == address]


def deliver(port, tag, host="127.0.0.1", tls=True, timeout=h.IO_TIMEOUT):
    """One client session through the proxy: greeting, EHLO (STARTTLS),
    one message, QUIT. Returns (message bytes, seconds until the greeting)."""
    msg = h.sample_message(tag)
    t0 = time.monotonic()
    c = h.SmtpConn(port, host=host, timeout=timeout)
    with c:
        c.greeting()
        took = time.monotonic() - t0
        c.expect("EHLO client.test", 250)
        if tls:
            c.expect("STARTTLS", 220)
            c.starttls()
            c.expect("EHLO client.test", 250)
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    return msg, took


def refused_greeting(port, timeout=h.IO_TIMEOUT):
    """Connect, read the greeting, which must be a 421, and the close after
    it. Returns (reply, seconds until the greeting)."""
    t0 = time.monotonic()
    with h.SmtpConn(port, timeout=timeout) as c:
        g = c.read_reply()
        took = time.monotonic() - t0
        assert g.code == 421, "expected a 421 greeting, got %r" % g.raw
        rest = c.read_until_closed(timeout)
        assert rest == b"", "bytes after the 421 greeting: %r" % rest
    return g, took


def closed_port():
    """A loopback port nothing listens on (connect: refused)."""
    return "127.0.0.1:%d" % h.free_port()


class CloseBeforeGreeting(h.ThreadedUpstream):
    """Accepts and closes at once, before any greeting."""

    class _Rec:
        def __init__(self, index):
            self.index = index
            self.closed = threading.Event()

    RECORD = _Rec

    def __init__(self):
        self.sessions = []
        self.lock = threading.Lock()
        self._listen("127.0.0.1")

    def _serve(self, conn, rec):
        self._close(conn, rec)


@pytest.fixture
def ns_proxies(stp_bin, tmp_path):
    """Factory: ns_proxies(binds, config_text, n_listeners) -> a running Proxy
    whose daemon lives in its own mount namespace with BINDS bind-mounted
    ({target: source}). Checked and stopped at teardown like make_proxy's."""
    made = []

    def make(binds, text, n_listeners=1):
        wd = str(tmp_path / ("nsproxy%d" % len(made)))
        wrapper = h.namespaced_binary(wd, binds, stp_bin)
        p = h.Proxy(wrapper, wd, text, n_listeners=n_listeners)
        made.append(p)
        p.start()
        return p

    yield make
    h.stop_proxies(made)


def base_config(tls_files, listeners, upstreams, proxy_opts=None):
    popts = {"log_level": "debug", "hostname": "proxy.test"}
    popts.update(proxy_opts or {})
    ls = []
    for name, opts in listeners:
        o = {"listen": "127.0.0.1:0", "tls": "starttls", "require_tls": "yes",
             "cert": tls_files["cert"], "key": tls_files["key"], "timeout_idle": "30s"}
        o.update(opts)
        ls.append((name, o))
    return h.render_config(popts, ls, upstreams)


def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def localhost_has(family):
    try:
        return any(ai[0] == family for ai in socket.getaddrinfo("localhost", 25, 0,
                                                                  socket.SOCK_STREAM))
    except socket.gaierror:
        return False


# --- names --------------------------------------------------------------------------------


def test_localhost_name_reaches_a_server_on_ipv6_loopback_only(make_proxy, make_scripted,
                                                               ns_proxies, tls_files, tmp_path):
    if not has_ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback (::1)")
    up6 = make_scripted(host="::1")
    addr = "localhost:%d" % up6.port
    if localhost_has(socket.AF_INET6):
        proxy = make_proxy(addr, upstream_opts={"timeout_connect": "2s"})
    else:
        # this host's /etc/hosts maps localhost to 127.0.0.1 only: give the
        # daemon one that has both, as most hosts do
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
        text = base_config(tls_files, [("main", {"upstream": UP})],
                           [(UP, {"address": addr, "tls": "none", "timeout_connect": "2s"})])
        proxy = ns_proxies({"/etc/hosts": str(hosts)}, text)
    msg, _ = deliver(proxy.port, "via-ipv6-localhost")
    got = up6.wait_messages(1)
    assert got[0]["content"] == h.dot_stuff(msg)
    assert len(got) == 1


def test_localhost_name_reaches_a_server_on_ipv4_loopback_only(make_proxy, make_scripted):
    up4 = make_scripted(host="127.0.0.1")
    proxy = make_proxy("localhost:%d" % up4.port, upstream_opts={"timeout_connect": "2s"})
    msg, _ = deliver(proxy.port, "via-ipv4-localhost")
    got = up4.wait_messages(1)
    assert got[0]["content"] == h.dot_stuff(msg)
    # a second session resolves again and arrives too
    msg2, _ = deliver(proxy.port, "via-ipv4-localhost-2")
    assert up4.wait_messages(2)[1]["content"] == h.dot_stuff(msg2)


def test_every_address_of_a_name_is_tried_and_logged_numerically(make_aio, ns_proxies,
                                                                 tls_files, tmp_path):
    """localhost with both ::1 and 127.0.0.1, nothing on its port: both
    addresses fail, each logged as a number, then the second entry delivers."""
    if not has_ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback (::1)")
    good = make_aio()
    port = h.free_port()
    with socket.socket(socket.AF_INET6) as s6:     # make sure ::1:PORT is closed too
        try:
            s6.bind(("::1", port))
        except OSError:
            pytest.skip("port %d taken on ::1" % port)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    text = base_config(tls_files, [("main", {"upstream": UP})],
                       [(UP, {"address": "localhost:%d, %s" % (port, good.address),
                              "tls": "none", "timeout_connect": "2s"})])
    proxy = ns_proxies({"/etc/hosts": str(hosts)}, text)
    msg, _ = deliver(proxy.port, "both-families-fail")
    assert good.wait_messages(1)[0]["original_content"] == msg
    got = sorted(e.get("address") for e in proxy.events("upstream_error")
                 if e.get("upstream") == UP)
    assert got == sorted(["127.0.0.1:%d" % port, "[::1]:%d" % port]), "\n".join(
        e["_line"] for e in proxy.events("upstream_error"))


def test_unresolvable_first_entry_falls_over_to_the_second(make_proxy, make_aio):
    good = make_aio()
    proxy = make_proxy("nonexistent.invalid:25, " + good.address)
    msg, _ = deliver(proxy.port, "after-nxdomain")
    assert good.wait_messages(1)[0]["original_content"] == msg
    ev = proxy.wait_event("upstream_error", upstream=UP, address="nonexistent.invalid:25")
    assert ev.get("error", "").startswith("cannot resolve nonexistent.invalid:"), ev["_line"]


def test_name_without_an_address_of_the_source_family_is_logged(make_aio, ns_proxies,
                                                                tls_files, tmp_path):
    """source = 127.0.0.1 reaches only IPv4: a name with only an IPv6
    address is a failed entry that says why, and the next one serves."""
    good = make_aio()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 v6only.test\n")
    text = base_config(tls_files, [("main", {"upstream": UP})],
                       [(UP, {"address": "v6only.test:25, " + good.address,
                              "tls": "none", "source": "127.0.0.1"})])
    proxy = ns_proxies({"/etc/hosts": str(hosts)}, text)
    msg, _ = deliver(proxy.port, "v4-source")
    assert good.wait_messages(1)[0]["original_content"] == msg
    ev = proxy.wait_event("upstream_error", upstream=UP, address="v6only.test:25")
    assert "no address of the family of source" in ev.get("error", ""), ev["_line"]


def test_name_leading_back_to_the_proxy_is_never_connected(make_aio, ns_proxies, tls_files,
                                                            tmp_path):
    """self.test is the proxy's own listener address: one connect line (the
    client's), a 421 4.4.6 when nothing else is left, and with a second
    entry the message goes there."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost self.test\n")
    port = h.free_port()
    text = base_config(tls_files, [("main", {"upstream": UP, "listen": "127.0.0.1:%d" % port})],
                       [(UP, {"address": "self.test:%d" % port, "tls": "none"})])
    proxy = ns_proxies({"/etc/hosts": str(hosts)}, text)
    g, _ = refused_greeting(proxy.port)
    assert g.raw.startswith(b"421 4.4.6"), g.raw
    ev = proxy.wait_event("upstream_error", upstream=UP, address="127.0.0.1:%d" % port)
    assert "own listener" in ev.get("error", ""), ev["_line"]
    assert len(proxy.events("connect")) == 1, "the proxy connected to itself"

    good = make_aio()
    port2 = h.free_port()
    text = base_config(tls_files, [("main", {"upstream": UP, "listen": "127.0.0.1:%d" % port2})],
                       [(UP, {"address": "self.test:%d, %s" % (port2, good.address),
                              "tls": "none"})])
    proxy = ns_proxies({"/etc/hosts": str(hosts)}, text)
    msg, _ = deliver(proxy.port, "not-to-itself")
    assert good.wait_messages(1)[0]["original_content"] == msg
    assert len(proxy.events("connect")) == 1


class ScriptedAt(h.ScriptedUpstream):
    """A ScriptedUpstream on a port chosen by the test (the same port on
    several loopback addresses)."""

    def __init__(self, host, port, **kw):
        self._want_port = port
        super().__init__(host=host, **kw)

    def _listen(self, host="127.0.0.1"):
        super()._listen(host)                   # port 0, then move to the one asked for
        self.sock.close()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, self._want_port))
        self.sock.listen(self.BACKLOG)
        self.port = self._want_port
        self.address = "%s:%d" % (host, self.port)


def test_name_is_resolved_again_for_each_session(make_scripted, ns_proxies, tls_files,
                                                 tmp_path, request):
    """hop.test moves from 127.0.0.2 to 127.0.0.3 between two sessions (the
    daemon's /etc/hosts is rewritten in place): the second session follows."""
    first = make_scripted(host="127.0.0.2")
    second = ScriptedAt("127.0.0.3", first.port).start()
    request.addfinalizer(second.stop)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.2 hop.test\n")
    text = base_config(tls_files, [("main", {"upstream": UP})],
                       [(UP, {"address": "hop.test:%d" % first.port, "tls": "none"})])
    proxy = ns_proxies({"/etc/hosts": str(hosts)}, text)
    msg, _ = deliver(proxy.port, "to-dot-2")
    assert first.wait_messages(1)[0]["content"] == h.dot_stuff(msg)
    with open(hosts, "r+") as f:               # same inode: the bind mount sees it
        f.seek(0)
        f.write("127.0.0.1 localhost\n127.0.0.3 hop.test\n")
        f.truncate()
    msg, _ = deliver(proxy.port, "to-dot-3")
    assert second.wait_messages(1)[0]["content"] == h.dot_stuff(msg)
    assert len(first.messages) == 1


def test_ipv6_literal_entry_is_logged_in_brackets(make_proxy, make_aio):
    if not has_ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback (::1)")
    good = make_aio()
    port = h.free_port(socket.AF_INET6, "::1")
    proxy = make_proxy("[::1]:%d, %s" % (port, good.address))
    msg, _ = deliver(proxy.port, "after-v6-refused")
    assert good.wait_messages(1)[0]["original_content"] == msg
    assert len(hop_errors(proxy, "[::1]:%d" % port)) == 1, "\n".join(
        e["_line"] for e in proxy.events("upstream_error"))


def test_unresolvable_name_passes_check_and_gets_the_client_a_421(make_proxy, stp_bin, tmp_path,
                                                                  tls_files):
    text = base_config(tls_files, [("main", {"upstream": UP})],
                       [(UP, {"address": "nonexistent.invalid:25", "tls": "none"})])
    p = h.check_config(stp_bin, str(tmp_path / "check"), text)
    assert p.returncode == 0, "-t refused a name it cannot resolve yet:\n" + p.stdout

    proxy = make_proxy("nonexistent.invalid:25")
    refused_greeting(proxy.port)
    ev = proxy.wait_event("upstream_error", upstream=UP, address="nonexistent.invalid:25")
    assert ev.get("error", "").startswith("cannot resolve nonexistent.invalid:"), ev["_line"]
    assert len(ev["error"]) > len("cannot resolve nonexistent.invalid:") + 1, \
        "the reason is missing: " + ev["_line"]


# --- failover -----------------------------------------------------------------------------


def first_entry(kind, make_scripted, request):
    """(address of a first entry that fails in the way KIND, server or None)."""
    if kind == "refused":
        return closed_port(), None
    if kind == "greets_421":
        s = make_scripted(greeting=("4.3.2 too busy",), greeting_code=421)
        return s.address, s
    if kind == "greets_554":
        s = make_scripted(greeting=("5.7.1 not you",), greeting_code=554)
        return s.address, s
    if kind == "never_greets":
        s = make_scripted(greeting=())
        return s.address, s
    if kind == "closes_before_greeting":
        s = CloseBeforeGreeting().start()
        request.addfinalizer(s.stop)
        return s.address, s
    if kind == "connect_timeout":
        s = h.FullBacklog()
        request.addfinalizer(s.close)
        return s.address, s
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["refused", "greets_421", "greets_554", "never_greets",
                                  "closes_before_greeting", "connect_timeout"])
def test_failed_first_entry_falls_over_to_the_second(make_proxy, make_scripted, make_aio,
                                                      request, kind):
    first, server = first_entry(kind, make_scripted, request)
    good = make_aio()
    proxy = make_proxy("%s, %s" % (first, good.address),
                       upstream_opts={"timeout_connect": "1s"})
    t0 = time.monotonic()
    msg, took = deliver(proxy.port, "failover-" + kind)
    env = good.wait_messages(1)[0]
    assert env["original_content"] == msg, "not byte-identical at the second entry"
    assert len(good.envelopes) == 1
    errs = hop_errors(proxy, first)
    assert len(errs) == 1, "expected one upstream_error for %s, got:\n%s" % (
        first, "\n".join(e["_line"] for e in proxy.events("upstream_error")))
    assert errs[0].get("error"), errs[0]["_line"]
    if kind in ("never_greets", "connect_timeout"):
        assert took >= 0.8, "timeout_connect = 1s, yet the greeting came after %.2fs" % took
    if kind in ("greets_421", "greets_554", "never_greets", "closes_before_greeting"):
        assert len(server.sessions) == 1, "the first entry was tried %d times" % len(
            server.sessions)
    assert time.monotonic() - t0 < 10


def test_last_candidate_non_220_greeting_is_relayed_verbatim(make_proxy, make_scripted):
    last = make_scripted(greeting=("5.7.1 go away",), greeting_code=554)
    proxy = make_proxy("%s, %s" % (closed_port(), last.address),
                       upstream_opts={"timeout_connect": "1s"})
    with h.SmtpConn(proxy.port) as c:
        g = c.read_reply()
        assert g.raw == b"554 5.7.1 go away\r\n", g.raw
    last.wait_sessions(1)


def test_only_candidate_554_greeting_is_relayed_verbatim(make_proxy, make_scripted):
    only = make_scripted(greeting=("5.7.1 go away",), greeting_code=554)
    proxy = make_proxy(only.address)
    with h.SmtpConn(proxy.port) as c:
        g = c.read_reply()
        assert g.raw == b"554 5.7.1 go away\r\n", g.raw


@pytest.mark.parametrize("code,lines,raw", [
    (421, ("4.3.2 too busy",), b"421 4.3.2 too busy\r\n"),
    (554, ("5.7.1 go away", "5.7.1 and stay away"),
     b"554-5.7.1 go away\r\n554 5.7.1 and stay away\r\n"),
])
def test_last_candidate_refusal_is_relayed_whole(make_proxy, make_scripted, code, lines, raw):
    """The last candidate's non-220 greeting, a 421 or one of several
    lines, reaches the client as it was sent (strict reading of "that
    greeting is relayed")."""
    last = make_scripted(greeting=lines, greeting_code=code)
    proxy = make_proxy("%s, %s" % (closed_port(), last.address),
                       upstream_opts={"timeout_connect": "1s"})
    with h.SmtpConn(proxy.port) as c:
        g = c.read_reply()
        assert g.raw == raw, g.raw


# --- retry_after --------------------------------------------------------------------------


def test_dead_entry_is_skipped_by_later_sessions(make_proxy, make_scripted, make_aio):
    dead = make_scripted(greeting=())
    good = make_aio()
    proxy = make_proxy("%s, %s" % (dead.address, good.address),
                       upstream_opts={"timeout_connect": "2s", "retry_after": "30s"})
    msg, took = deliver(proxy.port, "learns")
    assert took >= 1.8, "the silent first entry was given only %.2fs" % took
    assert good.wait_messages(1)[0]["original_content"] == msg
    assert len(hop_errors(proxy, dead.address)) == 1

    for i in range(3):
        msg, took = deliver(proxy.port, "skips-%d" % i)
        assert took < 1.0, "session %d waited %.2fs: the dead entry was tried again" % (i, took)
        assert good.wait_messages(2 + i)[1 + i]["original_content"] == msg
    assert len(hop_errors(proxy, dead.address)) == 1, "\n".join(
        e["_line"] for e in hop_errors(proxy, dead.address))
    assert len(dead.sessions) == 1, "the dead entry saw %d connections" % len(dead.sessions)


def test_dead_entry_is_tried_again_after_retry_after(make_proxy, make_scripted, make_aio):
    dead = make_scripted(greeting=())
    good = make_aio()
    proxy = make_proxy("%s, %s" % (dead.address, good.address),
                       upstream_opts={"timeout_connect": "2s", "retry_after": "1s"})
    _, took = deliver(proxy.port, "first")
    assert took >= 1.8, took
    assert len(hop_errors(proxy, dead.address)) == 1
    time.sleep(1.5)
    msg, took = deliver(proxy.port, "after-retry-after")
    assert took >= 1.8, "retry_after (1s) passed, yet the dead entry was not tried (%.2fs)" % took
    assert good.wait_messages(2)[1]["original_content"] == msg
    assert len(hop_errors(proxy, dead.address)) == 2
    assert len(dead.sessions) == 2


def test_dead_entry_is_skipped_in_every_worker(make_proxy, make_scripted, make_aio):
    dead = make_scripted(greeting=())
    good = make_aio()
    proxy = make_proxy("%s, %s" % (dead.address, good.address), proxy_opts={"workers": "2"},
                       upstream_opts={"timeout_connect": "2s", "retry_after": "30s"})
    _, took = deliver(proxy.port, "learns")
    assert took >= 1.8, took
    # new connections land on either worker; none of them may wait again
    slow = []
    for i in range(10):
        _, took = deliver(proxy.port, "w%d" % i)
        if took >= 1.0:
            slow.append((i, round(took, 2)))
    assert not slow, "sessions that tried the dead entry again (index, seconds): %r" % slow
    # eight at once, so that both workers' accept loops take some
    t0 = time.monotonic()
    conns = [h.SmtpConn(proxy.port) for _ in range(8)]
    try:
        for c in conns:
            c.greeting()
        took = time.monotonic() - t0
        assert took < 1.0, "8 concurrent sessions took %.2fs to be greeted" % took
        for i, c in enumerate(conns):
            c.expect("EHLO client.test", 250)
            c.expect("STARTTLS", 220)
            c.starttls()
            c.expect("EHLO client.test", 250)
            h.send_message(c, h.sample_message("batch-%d" % i))
            c.expect("QUIT", 221)
    finally:
        for c in conns:
            c.close()
    assert len(good.wait_messages(19)) == 19
    assert len(dead.sessions) == 1, "the dead entry saw %d connections" % len(dead.sessions)
    assert len(hop_errors(proxy, dead.address)) == 1


def test_penalized_entry_is_skipped_even_when_the_others_fail(make_proxy, make_scripted):
    """Strict reading of "skipped for retry_after ... unless all entries
    are in that state": A failed (penalty), B is healthy; when B then fails
    too, A is not tried (it is not the case that all entries were in
    penalty when the session started): the client gets the 421 at once."""
    a = make_scripted(greeting=())
    b = make_scripted()
    proxy = make_proxy("%s, %s" % (a.address, b.address),
                       upstream_opts={"timeout_connect": "1s", "retry_after": "30s"})
    msg, _ = deliver(proxy.port, "b-delivers")
    assert b.wait_messages(1)[0]["content"] == h.dot_stuff(msg)
    assert len(a.sessions) == 1
    b.stop()                            # B refuses from now on
    _, took = refused_greeting(proxy.port)
    assert len(hop_errors(proxy, b.address)) == 1
    assert len(a.sessions) == 1 and len(hop_errors(proxy, a.address)) == 1, \
        "the entry in penalty was tried after the healthy one failed (%.2fs):\n%s" % (
            took, "\n".join(e["_line"] for e in proxy.events("upstream_error")))
    assert took < 0.9, took


def test_all_entries_dead_gives_421_and_later_sessions_try_them_all(make_proxy, make_scripted):
    d1 = make_scripted(greeting=())
    d2 = make_scripted(greeting=())
    proxy = make_proxy("%s, %s" % (d1.address, d2.address),
                       upstream_opts={"timeout_connect": "1s", "retry_after": "30s"})
    _, took = refused_greeting(proxy.port)
    assert took >= 1.8, "two silent entries at 1s each, the 421 came after %.2fs" % took
    assert len(hop_errors(proxy, d1.address)) == 1
    assert len(hop_errors(proxy, d2.address)) == 1
    # both are in penalty now: that is the same as none, so both are tried
    _, took = refused_greeting(proxy.port)
    assert took >= 1.8, took
    assert len(d1.sessions) == 2 and len(d2.sessions) == 2, (len(d1.sessions), len(d2.sessions))
    assert len(hop_errors(proxy, d1.address)) == 2
    assert len(hop_errors(proxy, d2.address)) == 2


def test_entry_that_greets_220_is_healthy_again_at_once(make_proxy):
    """Entries B (never up) and A, both down: 421, both in penalty. A comes
    back; the next session tries all (all in penalty): B fails again, A greets
    220. From then on A is healthy: a third session goes straight to A and
    does not try B, which is still in penalty."""
    b = closed_port()
    a_addr = closed_port()              # A down for the first session
    proxy = make_proxy("%s, %s" % (b, a_addr),
                       upstream_opts={"timeout_connect": "1s", "retry_after": "30s"})
    refused_greeting(proxy.port)
    assert len(hop_errors(proxy, b)) == 1 and len(hop_errors(proxy, a_addr)) == 1
    a2 = _aio_on_port(int(a_addr.rsplit(":", 1)[1]))    # A is back
    try:
        msg, _ = deliver(proxy.port, "a-is-back")
        assert a2.wait_messages(1)[0]["original_content"] == msg
        assert len(hop_errors(proxy, b)) == 2, "all entries in penalty: B must be tried again"
        msg, _ = deliver(proxy.port, "a-is-healthy")
        assert a2.wait_messages(2)[1]["original_content"] == msg
        assert len(hop_errors(proxy, b)) == 2, \
            "B was tried again: A's 220 did not make it healthy, or B's penalty was forgotten"
        assert len(hop_errors(proxy, a_addr)) == 1
    finally:
        a2.stop()


def _aio_on_port(port):
    u = h.AioUpstream()
    u.port = port
    u.address = "127.0.0.1:%d" % port
    u.controller.port = port
    return u.start()


# --- a slow resolver ----------------------------------------------------------------------


@pytest.fixture
def blackhole_dns():
    """A DNS server that never answers, on a loopback address of its own."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    # not 127.0.0.53/54: systemd-resolved has those
    dns = None
    for addr in ("127.0.0.153", "127.0.1.153", "127.0.2.153"):
        try:
            dns = h.DnsBlackhole(addr).start()
            break
        except OSError as e:
            why = e
    if dns is None:
        pytest.skip("cannot bind a loopback address on port 53: %s" % why)
    yield dns
    dns.stop()


def slow_resolver_binds(tmp_path, dns, hosts="127.0.0.1 localhost\n"):
    """/etc files for a daemon whose names go to DNS (a timeout of 3 s)
    unless HOSTS names them: no nss-resolve, nscd or the like."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver %s\noptions timeout:3 attempts:1\n" % dns.host)
    nss = tmp_path / "nsswitch.conf"
    nss.write_text("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n")
    etc_hosts = tmp_path / "hosts"
    etc_hosts.write_text(hosts)
    return {"/etc/resolv.conf": str(resolv), "/etc/nsswitch.conf": str(nss),
            "/etc/hosts": str(etc_hosts)}


def slow_and_fast(tls_files, slow, fast):
    """Listener a to upstream "slow" at SLOW, b to "fast" at FAST, plaintext;
    one worker: a lookup that blocked its loop would hold up b too."""
    plain = {"tls": "none", "require_tls": None}
    return base_config(
        tls_files,
        [("a", dict(plain, upstream="slow")), ("b", dict(plain, upstream="fast"))],
        [("slow", {"address": slow, "tls": "none"}), ("fast", {"address": fast, "tls": "none"})],
        proxy_opts={"workers": "1"})


def test_slow_resolver_does_not_delay_other_sessions(ns_proxies, make_aio, tls_files, tmp_path,
                                                     blackhole_dns):
    dns = blackhole_dns
    good = make_aio()
    text = slow_and_fast(tls_files, "slow.example.test:25, %s" % good.address, good.address)
    proxy = ns_proxies(slow_resolver_binds(tmp_path, dns), text, n_listeners=2)

    t0 = time.monotonic()
    waiting = [h.SmtpConn(proxy.ports["a"], timeout=20) for _ in range(3)]
    try:
        assert h.wait_until(lambda: "slow.example.test" in dns.queries, 3), \
            "the resolver never asked %s for slow.example.test: %r" % (dns.host, dns.queries)
        for i in range(5):
            msg, took = deliver(proxy.ports["b"], "fast-%d" % i, tls=False)
            assert took < 0.5, "session %d on listener b waited %.2fs for its greeting " \
                               "behind the slow resolver" % (i, took)
        assert len(good.wait_messages(5)) == 5
        assert time.monotonic() - t0 < 2.5, "listener b's sessions were held up"
        for i, c in enumerate(waiting):
            c.greeting()
            c.expect("EHLO client.test", 250)
            h.send_message(c, h.sample_message("slow-%d" % i))
            c.expect("QUIT", 221)
        assert time.monotonic() - t0 >= 2.5, "the A sessions did not wait for DNS at all"
    finally:
        for c in waiting:
            c.close()
    got = good.wait_messages(8)
    assert sorted(e["original_content"] for e in got[5:]) == sorted(
        h.sample_message("slow-%d" % i) for i in range(3))
    errs = [e for e in proxy.events("upstream_error") if e.get("upstream") == "slow"
            and e.get("address") == "slow.example.test:25"]
    assert len(errs) >= 1, proxy.log_tail()
    assert "cannot resolve slow.example.test" in errs[0].get("error", ""), errs[0]["_line"]


def test_many_sessions_on_a_slow_name_leave_other_names_resolving(ns_proxies, make_aio,
                                                                 tls_files, tmp_path,
                                                                 blackhole_dns):
    """Eight sessions wait for slow.example.test: they share one lookup, so
    libuv's thread pool still looks up fast.test (from /etc/hosts) at once.
    Found by an outside attack: four waiting sessions took the whole pool,
    and a healthy name timed out and was put in penalty."""
    dns = blackhole_dns
    good = make_aio()
    text = slow_and_fast(tls_files, "slow.example.test:%d" % good.port,
                         "fast.test:%d" % good.port)
    binds = slow_resolver_binds(tmp_path, dns, "127.0.0.1 localhost fast.test\n")
    proxy = ns_proxies(binds, text, n_listeners=2)
    waiting = [h.SmtpConn(proxy.ports["a"], timeout=20) for _ in range(8)]
    try:
        assert h.wait_until(lambda: "slow.example.test" in dns.queries, 3), dns.queries
        time.sleep(0.3)     # every one of them is waiting now
        msg, took = deliver(proxy.ports["b"], "fast-name", tls=False)
        assert took < 1.0, "a name from /etc/hosts waited %.2fs behind the slow one" % took
        assert good.wait_messages(1)[0]["original_content"] == msg
        for c in waiting:
            g = c.read_reply()
            assert g.code == 421, g.raw
    finally:
        for c in waiting:
            c.close()
    asked = dns.queries.count("slow.example.test")
    assert asked <= 4, "%d queries for one name: the sessions did not share a lookup" % asked
    assert not [e for e in proxy.events("upstream_error") if e.get("upstream") == "fast"]
