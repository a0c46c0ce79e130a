"""Dropping privileges: started as root, the proxy binds and loads its keys,
then becomes `user` (and `group`); it refuses to stay root unless
`user = root` says so. These tests need root (CI runs the suite as root)."""

import grp
import os
import pwd

import pytest

import stp_harness as h
import hardening_util as hu

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="dropping privileges needs root (CI runs as root)")


def ids_after_start(proxy):
    """/proc ids once the daemon has finished starting (it logs listening
    when it has bound, drops privileges, then logs started)."""
    proxy.wait_event("started")
    return ids(proxy.pid)


def ids(pid):
    st = hu.proc_status(pid)
    uids = [int(x) for x in st["Uid"].split()]
    gids = [int(x) for x in st["Gid"].split()]
    groups = [int(x) for x in st.get("Groups", "").split()]
    return uids, gids, groups


def test_drops_to_user_nobody_and_still_serves(make_scripted, make_proxy):
    nobody = pwd.getpwnam("nobody")
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"user": "nobody"})
    uids, gids, groups = ids_after_start(proxy)
    assert uids == [nobody.pw_uid] * 4, "Uid (real, effective, saved, fs): %r" % uids
    assert gids == [nobody.pw_gid] * 4, "Gid: %r" % gids
    assert set(groups) <= {nobody.pw_gid}, "supplementary groups kept: %r" % groups
    assert hu.deliver(proxy.port).code == 250
    assert len(up.wait_messages(1)) == 1


def test_group_option_sets_the_group(make_scripted, make_proxy):
    nobody = pwd.getpwnam("nobody")
    daemon_gid = grp.getgrnam("daemon").gr_gid
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"user": "nobody", "group": "daemon"})
    uids, gids, groups = ids_after_start(proxy)
    assert uids == [nobody.pw_uid] * 4, uids
    assert gids == [daemon_gid] * 4, gids
    assert set(groups) <= {daemon_gid}, groups
    assert hu.deliver(proxy.port).code == 250


def run_briefly(stp_bin, tmp_path, proxy_opts, timeout=5):
    """Start the daemon with a one-listener config; returns (exit code or
    None if still running after TIMEOUT, stderr, config path)."""
    text = h.render_config(
        dict({"hostname": "proxy.test"}, **proxy_opts),
        [("main", {"listen": "127.0.0.1:0", "upstream": "up"})],
        [("up", {"address": "127.0.0.1:%d" % h.free_port()})])
    path = tmp_path / "stp.conf"
    path.write_text(text)
    rc, err = hu.run_briefly(stp_bin, path, timeout)
    return rc, err, str(path)


def test_root_without_user_refuses_to_start_with_a_clear_message(stp_bin, tmp_path):
    rc, err, path = run_briefly(stp_bin, tmp_path, {"user": None})
    assert rc is not None, "started as root without user =:\n" + err
    assert rc != 0, err
    assert "user" in err and "root" in err, "unclear message: %r" % err
    assert path in err, "the message does not name the file: %r" % err


def test_root_with_user_root_starts(make_scripted, make_proxy):
    up = make_scripted()
    proxy = hu.start(make_proxy, up, proxy={"user": "root"})
    assert ids_after_start(proxy)[0] == [0, 0, 0, 0]
    assert hu.deliver(proxy.port).code == 250


def test_unknown_user_refuses_to_start_naming_file_and_line(stp_bin, tmp_path):
    rc, err, path = run_briefly(stp_bin, tmp_path, {"user": "no-such-user-stp"})
    assert rc is not None and rc != 0, err
    assert "no-such-user-stp" in err, err
    assert path + ":" in err, err
