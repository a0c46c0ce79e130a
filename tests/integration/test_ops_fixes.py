"""Operating the daemon: listener limits across reloads, one process per set
of ports, signals that must not kill, -t checking what a start checks, and
the configuration syntax beyond inih's defaults (no "key: value", lines
longer than its 198 characters)."""

import os
import signal
import socket

import pytest

import stp_harness as h
import hardening_util as hu

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the account checks apply to a start as root")


def reload_ok(proxy, text=None):
    evs = hu.reload(proxy, text)
    assert hu.reload_status(evs) == "ok", "reload failed:\n%s" % proxy.log_tail()


def wait_greeted(port):
    """A greeted connection once a slot is free (sessions end asynchronously)."""
    c = h.wait_until(lambda: hu.try_greeted(port), 3, interval=0.1)
    assert c, "no slot came free on port %d" % port
    return c


def close_all(conns):
    for c in conns:
        c.close()


# --- the listener's max_connections across reloads ---------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_listener_limit_counts_sessions_opened_before_a_reload(make_scripted, make_proxy,
                                                               workers):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"workers": str(workers)}, max_connections="2")
    conns = [hu.greeted(proxy.port), hu.greeted(proxy.port)]
    try:
        reload_ok(proxy)
        hu.assert_refused(proxy.port)
        # a session of the old configuration ends: the new one gets its slot
        conns.pop().close()
        conns.append(wait_greeted(proxy.port))
        hu.assert_refused(proxy.port)
    finally:
        close_all(conns)


def test_listener_limit_survives_a_rename(make_scripted, make_proxy):
    up = make_scripted()
    # A fixed port: renamed, a listener at 127.0.0.1:0 would be a new one on
    # a new port; at a fixed address it keeps its socket.
    proxy = hu.start(make_proxy, up, max_connections="2",
                     listen="127.0.0.1:%d" % h.free_port())
    conns = [hu.greeted(proxy.port), hu.greeted(proxy.port)]
    try:
        reload_ok(proxy, proxy.config_text.replace("[listener main]", "[listener renamed]"))
        hu.assert_refused(proxy.port)
        conns.pop().close()
        conns.append(wait_greeted(proxy.port))
    finally:
        close_all(conns)


def test_listener_removed_and_added_again_counts_its_open_sessions(make_scripted,
                                                                   make_proxy, tls_files):
    up = make_scripted()
    other = h.free_port()
    proxy = hu.start(make_proxy, up)
    full = proxy.config_text + hu.listener_section("second", other, tls_files,
                                                   max_connections="2")
    reload_ok(proxy, full)
    conns = [hu.greeted(other), hu.greeted(other)]
    try:
        reload_ok(proxy, hu.remove_section(full, "[listener second]"))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", other), timeout=3).close()
        reload_ok(proxy, full)
        hu.assert_refused(other)
        conns.pop().close()
        conns.append(wait_greeted(other))
        hu.assert_refused(other)
    finally:
        close_all(conns)
    assert hu.deliver(proxy.port).code == 250


# --- one process per set of ports ------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_daemon_on_the_same_ports_refuses_to_start(make_scripted, make_proxy,
                                                           workers):
    up = make_scripted()
    # A fixed port: a second daemon asking for 127.0.0.1:0 would just get
    # another one.
    proxy = hu.start(make_proxy, up, proxy={"workers": str(workers)},
                     listen="127.0.0.1:%d" % h.free_port())
    rc, err = hu.run_briefly(proxy.binary, proxy.config_path)
    assert rc is not None, "a second daemon started on the same ports:\n" + err
    assert rc != 0, err
    assert "127.0.0.1:%d: Address already in use" % proxy.port in err, err
    assert "%s:" % proxy.config_path in err, err
    for _ in range(6):                  # every connection still reaches the first
        assert hu.deliver(proxy.port).code == 250
    assert len(up.wait_messages(6)) == 6


def test_two_workers_serve_a_listener_added_by_reload_until_it_is_removed(
        make_scripted, make_proxy, tls_files):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"workers": "2"})
    other = h.free_port()
    reload_ok(proxy, proxy.config_text + hu.listener_section("added", other, tls_files))
    for _ in range(6):
        assert hu.deliver(other).code == 250
    reload_ok(proxy, hu.remove_section(proxy.config_text, "[listener added]"))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", other), timeout=3).close()
    assert hu.deliver(proxy.port).code == 250


# --- signals -----------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_is_ignored(make_scripted, make_proxy, workers):
    """(SIGUSR2 is the binary upgrade: test_upgrade.py.)"""
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"workers": str(workers)})
    proxy.send_signal(signal.SIGUSR1)
    proxy.wait_event("signal", signal="USR1", action="ignored")
    assert proxy.alive(), proxy.log_tail()
    assert hu.deliver(proxy.port).code == 250
    hu.assert_clean_exit(proxy, proxy.stop())


# --- -t checks the account a start as root would become ----------------------------------

def one_listener_config(proxy_opts):
    return h.render_config(
        dict({"hostname": "proxy.test"}, **proxy_opts),
        [("main", {"listen": "127.0.0.1:0", "upstream": "up"})],
        [("up", {"address": "127.0.0.1:%d" % h.free_port()})])


def line_starting(text, prefix):
    return next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith(prefix))


@needs_root
@pytest.mark.parametrize("opts,where,message", [
    ({"user": "no-such-user-stp"}, "user =", "unknown user 'no-such-user-stp'"),
    ({"user": "nobody", "group": "no-such-group-stp"}, "group =",
     "unknown group 'no-such-group-stp'"),
    ({"user": None}, "[proxy]", "running as root: set user ="),
], ids=["unknown-user", "unknown-group", "root-without-user"])
def test_config_check_refuses_what_a_start_as_root_refuses(stp_bin, tmp_path, opts, where,
                                                           message):
    text = one_listener_config(opts)
    p = h.check_config(stp_bin, str(tmp_path), text)
    want = "%s:%d: %s" % (p.config_path, line_starting(text, where), message)
    assert p.returncode != 0 and want in p.stdout, "-t said:\n" + p.stdout
    rc, err = hu.run_briefly(stp_bin, p.config_path)
    assert rc is not None and rc != 0 and want in err, "the start said:\n" + err


@needs_root
def test_config_check_accepts_a_user_and_group_that_exist(stp_bin, tmp_path):
    p = h.check_config(stp_bin, str(tmp_path),
                       one_listener_config({"user": "nobody", "group": "daemon"}))
    assert p.returncode == 0, p.stdout


# --- configuration syntax ---------------------------------------------------------------

DEFAULT_CIPHERS = ("TLS13-AES128-GCM-SHA256:TLS13-AES256-GCM-SHA384:"
                   "TLS13-CHACHA20-POLY1305-SHA256:"
                   "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                   "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                   "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


def test_the_default_cipher_list_can_be_written_out(make_scripted, make_proxy):
    assert len("ciphers = " + DEFAULT_CIPHERS) > 198
    up = make_scripted()
    proxy = hu.start(make_proxy, up, ciphers=DEFAULT_CIPHERS)
    assert hu.deliver(proxy.port).code == 250


def test_config_check_refuses_a_colon_between_key_and_value(stp_bin, tmp_path):
    text = one_listener_config({}).replace("listen = ", "listen: ")
    p = h.check_config(stp_bin, str(tmp_path), text)
    want = "%s:%d: use '=' between key and value" % (p.config_path,
                                                     line_starting(text, "listen:"))
    assert p.returncode != 0 and want in p.stdout, p.stdout
