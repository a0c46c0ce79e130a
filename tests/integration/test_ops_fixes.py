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
