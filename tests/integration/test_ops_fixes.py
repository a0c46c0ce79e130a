"""Operating the daemon: listener limits across reloads, one process per set
of ports, signals that must not kill, and -t checking what a start checks."""

import os
import signal

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


# --- signals -----------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_and_sigusr2_are_ignored(make_scripted, make_proxy, workers):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"workers": str(workers)})
    for sig, name in ((signal.SIGUSR1, "USR1"), (signal.SIGUSR2, "USR2")):
        proxy.send_signal(sig)
        proxy.wait_event("signal", signal=name, action="ignored")
    assert proxy.alive(), proxy.log_tail()
    assert hu.deliver(proxy.port).code == 250
    hu.assert_clean_exit(proxy, proxy.stop())


# --- -t checks the account a start as root would become ----------------------------------

def one_listener_config(proxy_opts):
    return h.render_config(
        dict({"hostname": "proxy.test"}, **proxy_opts),
        [("main", {"listen": "127.0.0.1:%d" % h.free_port(), "upstream": "up"})],
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
