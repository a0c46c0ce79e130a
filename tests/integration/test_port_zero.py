"""listen = HOST:0: the kernel picks the port, every worker accepts on that
one socket, event=listening reports the real address, and a reload keeps the
port while the listener stays at HOST:0."""

import stp_harness as h
import hardening_util as hu


def listening(proxy, name, n):
    """The first N event=listening lines of listener NAME (one per worker,
    again at each reload)."""
    evs = h.wait_until(lambda: [e for e in proxy.events("listening")
                                if e.get("listener") == name][:n] or None, 5)
    evs = evs if evs and len(evs) == n else []
    assert evs, "expected %d event=listening for %s:\n%s" % (n, name, proxy.log_tail())
    return evs


def test_port_zero_with_two_workers_logs_one_real_port_kept_across_sighup(make_scripted,
                                                                           make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"workers": "2"}, listen="127.0.0.1:0")
    assert "listen = 127.0.0.1:0\n" in proxy.config_text
    evs = listening(proxy, "main", 2)
    assert sorted(e["worker"] for e in evs) == ["0", "1"], [e["_line"] for e in evs]
    assert proxy.port and proxy.port != 0
    assert {e["addr"] for e in evs} == {"127.0.0.1:%d" % proxy.port}, \
        [e["_line"] for e in evs]
    for _ in range(6):
        assert hu.deliver(proxy.port).code == 250
    evs = hu.reload(proxy)
    assert hu.reload_status(evs) == "ok", proxy.log_tail()
    after = listening(proxy, "main", 4)[2:]
    assert {e["addr"] for e in after} == {"127.0.0.1:%d" % proxy.port}, \
        [e["_line"] for e in after]
    for _ in range(6):
        assert hu.deliver(proxy.port).code == 250
    assert len(up.wait_messages(12)) == 12


def test_two_listeners_at_port_zero_are_two_sockets_with_their_own_limits(
        make_scripted, make_proxy, tls_files):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"workers": "2"}, max_connections="1",
                     extra_listeners=[("second", {
                         "listen": "127.0.0.1:0", "cert": tls_files["cert"],
                         "key": tls_files["key"], "upstream": "up",
                         "max_connections": "1"})])
    first, second = proxy.ports["main"], proxy.ports["second"]
    assert first != second and 0 not in (first, second), proxy.ports
    # max_connections counts per socket: one session on each, the next refused
    conns = [hu.greeted(first), hu.greeted(second)]
    try:
        hu.assert_refused(first)
        hu.assert_refused(second)
        evs = hu.reload(proxy)
        assert hu.reload_status(evs) == "ok", proxy.log_tail()
        assert proxy.learn_ports() == {"main": first, "second": second}
        hu.assert_refused(second)
    finally:
        for c in conns:
            c.close()
    # both serve again once the daemon has seen the closes
    for name, port in (("main", first), ("second", second)):
        c = h.wait_until(lambda: hu.try_greeted(port), 3, interval=0.1)
        assert c, "listener %s did not serve again" % name
        c.close()
