"""Transparent deployment: the proxy in a router namespace intercepts SMTP on
its way from a client namespace to a server namespace.

    client ns  192.0.2.2 ──veth── 192.0.2.1  router ns  198.51.100.1 ──veth── 198.51.100.2  server ns
                                  (the proxy)

IPv6 beside it: 2001:db8:1::/64 client side, 2001:db8:2::/64 server side.

Cases: TPROXY with the client's own address towards the server (source =
client, run as nobody with CAP_NET_ADMIN kept; IPv4 and IPv6 on one [::]
listener), REDIRECT with SO_ORIGINAL_DST,
the loop guard (421 when the original destination is the proxy itself), and
the start-up check for CAP_NET_ADMIN.

These need root, network namespaces and nftables' tproxy/socket support. They
FAIL when the namespaces cannot be made: a skip would hide a broken set-up.
The namespaces and the processes in them are removed even when a test fails.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

import stp_harness as h

PID = os.getpid()
SERVER_IP = "198.51.100.2"
ROUTER_SRV_IP = "198.51.100.1"
CLIENT_IP = "192.0.2.2"
ROUTER_CLI_IP = "192.0.2.1"
SERVER_IP6 = "2001:db8:2::2"
ROUTER_SRV_IP6 = "2001:db8:2::1"
CLIENT_IP6 = "2001:db8:1::2"
ROUTER_CLI_IP6 = "2001:db8:1::1"
PROXY_PORT = 10025
CMD_TIMEOUT = 20

# A tiny SMTP server: records the peer address it sees, whether the session
# was encrypted, and the message bytes as one JSON line per message in OUT.
# With a certificate and key (argv 3, 4) it offers STARTTLS.
SERVER_PY = r'''
import json, socket, ssl, sys
out = sys.argv[2]
tls_ctx = None
if len(sys.argv) > 4:
    tls_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls_ctx.load_cert_chain(sys.argv[3], sys.argv[4])
ls = socket.socket(socket.AF_INET6)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
ls.bind(("::", int(sys.argv[1])))
ls.listen(8)
open(out + ".ready", "w").close()
while True:
    c, peer = ls.accept()
    c.settimeout(10)
    f = c.makefile("rb")
    tls = None
    def say(t):
        c.sendall(t.encode() + b"\r\n")
    say("220 sink.test ESMTP")
    try:
        while True:
            line = f.readline()
            if not line:
                break
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                say("250-sink.test\r\n250 STARTTLS" if tls_ctx and not tls
                    else "250 sink.test")
            elif verb == b"STAR" and tls_ctx and not tls:
                say("220 2.0.0 go ahead")
                c = tls_ctx.wrap_socket(c, server_side=True)
                tls = c.version()
                f = c.makefile("rb")
            elif verb == b"DATA":
                say("354 go")
                data = b""
                while True:
                    l = f.readline()
                    if not l or l == b".\r\n":
                        break
                    data += l
                with open(out, "a") as o:
                    o.write(json.dumps({"peer": peer[0].replace("::ffff:", ""), "tls": tls,
                                        "data": data.decode("latin-1")}) + "\n")
                say("250 2.0.0 queued")
            elif verb == b"QUIT":
                say("221 bye")
                break
            else:
                say("250 ok")
    except OSError:
        pass
    c.close()
'''

# The client: one SMTP session from the client namespace; prints the replies
# as JSON.
CLIENT_PY = r'''
import json, socket, sys
host, port, msg = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode("latin-1")
s = socket.create_connection((host, port), timeout=10)
f = s.makefile("rb")
replies = []
def reply():
    lines = []
    while True:
        l = f.readline()
        if not l:
            lines.append("<closed>")
            break
        lines.append(l.decode("latin-1").rstrip("\r\n"))
        if l[3:4] != b"-":
            break
    replies.append(lines)
    return lines[-1]
def cmd(t):
    s.sendall(t + b"\r\n")
    return reply()
if reply().startswith("220"):
    cmd(b"EHLO client.test")
    cmd(b"MAIL FROM:<a@example.org>")
    cmd(b"RCPT TO:<b@example.net>")
    if cmd(b"DATA").startswith("354"):
        s.sendall(msg + b".\r\n")
        reply()
    cmd(b"QUIT")
print(json.dumps(replies))
'''

MESSAGE = ("From: a@example.org\r\nTo: b@example.net\r\nSubject: transparent\r\n"
           "\r\nline one\r\n..dot-stuffed line\r\n\ttabbed \xe9 8-bit\r\n")


def run(argv, check=True, timeout=CMD_TIMEOUT, **kw):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout, **kw)
    if check and p.returncode != 0:
        pytest.fail("%s failed (%d): %s" % (" ".join(argv), p.returncode,
                                            p.stdout.decode("utf-8", "replace")),
                    pytrace=False)
    return p


class Net:
    """Three namespaces and two veth pairs, unique to this test process."""

    def __init__(self):
        self.cli, self.rtr, self.srv = ("stp%s-%d" % (n, PID) for n in ("cli", "rtr", "srv"))
        self.procs = []
        self.made = []

    def ns(self, name, *argv):
        return ["ip", "netns", "exec", name] + list(argv)

    def sh(self, name, *argv, **kw):
        return run(self.ns(name, *argv), **kw)

    def setup(self):
        if os.geteuid() != 0:
            pytest.fail("test_transparent needs root (network namespaces)", pytrace=False)
        h.require_program("ip", "iproute2")
        h.require_program("nft", "nftables")
        for n in (self.cli, self.rtr, self.srv):
            run(["ip", "netns", "add", n])
            self.made.append(n)
            self.sh(n, "ip", "link", "set", "lo", "up")
        a, b = "tc%d" % PID, "tr%d" % PID       # client <-> router
        c, d = "ts%d" % PID, "tq%d" % PID       # router <-> server
        run(["ip", "link", "add", a, "netns", self.cli, "type", "veth", "peer", "name", b,
             "netns", self.rtr])
        run(["ip", "link", "add", c, "netns", self.rtr, "type", "veth", "peer", "name", d,
             "netns", self.srv])
        for n, dev, addr, addr6 in (
                (self.cli, a, CLIENT_IP, CLIENT_IP6), (self.rtr, b, ROUTER_CLI_IP, ROUTER_CLI_IP6),
                (self.rtr, c, ROUTER_SRV_IP, ROUTER_SRV_IP6), (self.srv, d, SERVER_IP, SERVER_IP6)):
            self.sh(n, "ip", "addr", "add", addr + "/24", "dev", dev)
            # nodad: usable at once, no duplicate address detection wait
            self.sh(n, "ip", "-6", "addr", "add", addr6 + "/64", "dev", dev, "nodad")
            self.sh(n, "ip", "link", "set", dev, "up")
        self.sh(self.cli, "ip", "route", "add", "default", "via", ROUTER_CLI_IP)
        self.sh(self.cli, "ip", "-6", "route", "add", "default", "via", ROUTER_CLI_IP6)
        # Replies to the client's address come back through the router:
        # needed for source = client.
        self.sh(self.srv, "ip", "route", "add", "default", "via", ROUTER_SRV_IP)
        self.sh(self.srv, "ip", "-6", "route", "add", "default", "via", ROUTER_SRV_IP6)
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0", "net.ipv6.conf.all.forwarding=1"):
            self.sh(self.rtr, "sysctl", "-qw", key)
        return self

    def nft(self, script):
        p = subprocess.run(self.ns(self.rtr, "nft", "-f", "-"), input=script.encode(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=CMD_TIMEOUT)
        if p.returncode != 0:
            pytest.fail("nft failed: %s\n%s" % (p.stdout.decode(), script), pytrace=False)

    def spawn(self, name, argv, **kw):
        p = subprocess.Popen(self.ns(name, *argv), stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def teardown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for n in self.made:
            # Whatever still runs in it (the deleted namespace lingers while
            # a process holds it) is killed first.
            pids = subprocess.run(["ip", "netns", "pids", n], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", n], stderr=subprocess.DEVNULL)


@pytest.fixture
def net(request):
    n = Net()
    request.addfinalizer(n.teardown)
    return n.setup()


def start_server(net, tmp_path, tls_files=None):
    """The recording SMTP server on SERVER_IP:25 (offering STARTTLS with
    TLS_FILES); returns a reader of its records."""
    out = str(tmp_path / "server.jsonl")
    argv = ["python3", "-c", SERVER_PY, "25", out]
    if tls_files:
        argv += [tls_files["cert"], tls_files["key"]]
    net.spawn(net.srv, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not h.wait_until(lambda: os.path.exists(out + ".ready"), 10):
        pytest.fail("the server did not start in its namespace", pytrace=False)

    def records():
        return [json.loads(l) for l in h.read_text(out).splitlines() if l]
    return records


@pytest.fixture
def server(net, tmp_path):
    return start_server(net, tmp_path)


def start_proxy(net, tmp_path, listener, upstream, proxy=None):
    """The daemon in the router namespace (an `ip netns exec` wrapper as
    its binary: the PID stays the daemon's)."""
    wrapper = tmp_path / "in-router.sh"
    wrapper.write_text("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n"
                       % (net.rtr, h.daemon_binary()))
    wrapper.chmod(0o755)
    text = h.render_config(
        proxy=proxy,
        listeners=[("main", dict({"listen": "[::]:%d" % PROXY_PORT, "tls": "none",
                                  "upstream": "up", "timeout_idle": "20s"}, **listener))],
        upstreams=[("up", dict({"timeout_connect": "5s"}, **upstream))])
    p = h.Proxy(str(wrapper), str(tmp_path / "proxy"), text)
    p.start()
    net.procs.append(p.proc)
    return p


def smtp_from_client(net, host, port):
    p = net.spawn(net.cli, ["python3", "-c", CLIENT_PY, host, str(port), MESSAGE],
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=CMD_TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("the client hung", pytrace=False)
    try:
        return json.loads(out.decode("latin-1").strip().splitlines()[-1])
    except (ValueError, IndexError):
        pytest.fail("client failed: %r" % out, pytrace=False)


TPROXY_RULES = """
table inet stp_tproxy {
    chain pre {
        type filter hook prerouting priority mangle; policy accept;
        # Packets of connections the proxy already has (both legs: the
        # upstream socket is transparent too) go to it.
        meta l4proto tcp socket transparent 1 meta mark set 1 accept
        # New SMTP connections through the router go to the proxy.
        ip daddr 198.51.100.0/24 tcp dport 25 tproxy ip to :%d meta mark set 1 accept
        ip6 daddr 2001:db8:2::/64 tcp dport 25 tproxy ip6 to :%d meta mark set 1 accept
    }
}
""" % (PROXY_PORT, PROXY_PORT)

REDIRECT_RULES = """
table ip stp_nat {
    chain pre {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 198.51.100.0/24 tcp dport 25 redirect to :%d
    }
}
""" % PROXY_PORT


def tproxy_routing(net):
    net.nft(TPROXY_RULES)
    net.sh(net.rtr, "ip", "rule", "add", "fwmark", "1", "lookup", "100")
    net.sh(net.rtr, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    net.sh(net.rtr, "ip", "-6", "rule", "add", "fwmark", "1", "lookup", "100")
    net.sh(net.rtr, "ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100")


@pytest.mark.parametrize("server_ip,client_ip", [(SERVER_IP, CLIENT_IP),
                                                (SERVER_IP6, CLIENT_IP6)], ids=["ipv4", "ipv6"])
def test_tproxy_client_address_reaches_server(net, server, tmp_path, server_ip, client_ip):
    tproxy_routing(net)
    # As nobody: CAP_NET_ADMIN must survive the drop for the per-session
    # transparent bind.
    p = start_proxy(net, tmp_path, {"transparent": "yes"},
                    {"address": "original-destination", "source": "client"},
                    proxy={"user": "nobody"})
    replies = smtp_from_client(net, server_ip, 25)
    assert replies[0] == ["220 sink.test ESMTP"], replies
    assert replies[-2][-1].startswith("250 2.0.0"), replies
    recs = server()
    assert len(recs) == 1, (recs, p.log_tail())
    assert recs[0]["peer"] == client_ip, recs      # the client's own address
    assert recs[0]["data"] == MESSAGE, recs  # the bytes on the wire, stuffing kept
    assert "event=privileges user=nobody" in p.log_text()
    p.check_and_stop()


def test_redirect_original_destination(net, server, tmp_path):
    net.nft(REDIRECT_RULES)
    p = start_proxy(net, tmp_path, {}, {"address": "original-destination"})
    replies = smtp_from_client(net, SERVER_IP, 25)
    assert replies[-2][-1].startswith("250 2.0.0"), (replies, p.log_tail())
    recs = server()
    assert len(recs) == 1, (recs, p.log_tail())
    # source = none: the server sees the router.
    assert recs[0]["peer"] == ROUTER_SRV_IP, recs
    assert recs[0]["data"] == MESSAGE, recs  # the bytes on the wire, stuffing kept
    p.check_and_stop()


@pytest.mark.parametrize("offers", [True, False], ids=["starttls", "plaintext"])
def test_outbound_upgrade(net, tmp_path, tls_files, offers):
    """A legacy MTA's own delivery to some MX, intercepted on its way
    (REDIRECT) and sent on to where it was going with tls = opportunistic:
    encrypted when that host offers STARTTLS, and still delivered, in
    plaintext, when it does not."""
    records = start_server(net, tmp_path, tls_files if offers else None)
    net.nft(REDIRECT_RULES)
    p = start_proxy(net, tmp_path, {}, {"address": "original-destination",
                                        "tls": "opportunistic"})
    replies = smtp_from_client(net, SERVER_IP, 25)
    assert replies[-2][-1].startswith("250 2.0.0"), (replies, p.log_tail())
    recs = records()
    assert len(recs) == 1, (recs, p.log_tail())
    assert recs[0]["data"] == MESSAGE, recs
    if offers:
        assert recs[0]["tls"] and recs[0]["tls"].startswith("TLSv1."), recs
    else:
        assert recs[0]["tls"] is None, recs
    e = p.wait_event("upstream_tls")
    assert (e["tls"] == "none") != offers, e
    p.check_and_stop()


@pytest.mark.parametrize("mode", ["tproxy", "redirect"])
def test_loop_guard(net, server, tmp_path, mode):
    if mode == "tproxy":
        tproxy_routing(net)
        p = start_proxy(net, tmp_path, {"transparent": "yes"},
                        {"address": "original-destination", "source": "client"})
    else:
        net.nft(REDIRECT_RULES)
        p = start_proxy(net, tmp_path, {}, {"address": "original-destination"})
    # Straight at the proxy's own listening address: its original
    # destination is the proxy itself.
    replies = smtp_from_client(net, ROUTER_CLI_IP, PROXY_PORT)
    assert replies[0][0].startswith("421 4.4.6"), (replies, p.log_tail())
    assert replies[0][-1] == "<closed>" or len(replies) == 1 or replies[1] == ["<closed>"]
    assert server() == []
    p.wait_event("disconnect", reason="loop")
    assert "is this proxy's own listener" in p.log_text()
    p.check_and_stop()


SAME_PORT_REDIRECT = """
table ip stp_nat {
    chain pre {
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 198.51.100.0/24 tcp dport %d redirect to :%d
    }
}
""" % (PROXY_PORT, PROXY_PORT)


@pytest.mark.parametrize("nonlocal_bind", [0, 1], ids=["sysctl0", "sysctl1"])
def test_loop_guard_ignores_ip_nonlocal_bind(net, tmp_path, nonlocal_bind):
    """The intercepted port is the listening port, the destination a remote
    server: no loop, whether or not net.ipv4.ip_nonlocal_bind lets any
    address be bound (where keepalived or haproxy VIPs live). The guard once
    judged 'local' by a trial bind, and refused every such session."""
    out = str(tmp_path / "server.jsonl")
    net.spawn(net.srv, ["python3", "-c", SERVER_PY, str(PROXY_PORT), out],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert h.wait_until(lambda: os.path.exists(out + ".ready"), 10)
    net.sh(net.rtr, "sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=%d" % nonlocal_bind)
    net.nft(SAME_PORT_REDIRECT)
    p = start_proxy(net, tmp_path, {}, {"address": "original-destination"})
    replies = smtp_from_client(net, SERVER_IP, PROXY_PORT)
    recs = [json.loads(l) for l in h.read_text(out).splitlines() if l]
    log = p.log_tail(12)
    p.check_and_stop()
    assert replies[0] == ["220 sink.test ESMTP"], (replies, log)
    assert len(recs) == 1 and recs[0]["peer"] == ROUTER_SRV_IP, (recs, log)


@pytest.mark.parametrize("listener,upstream,key", [
    ({"transparent": "yes"}, {"address": "127.0.0.1:25"}, "transparent = yes"),
    ({}, {"address": "original-destination", "source": "client"}, "source = client"),
])
def test_needs_cap_net_admin(listener, upstream, key):
    """Started without capabilities, the daemon refuses and names the key."""
    setpriv = h.require_program("setpriv", "util-linux")
    d = tempfile.mkdtemp(prefix="stp-tp-caps-")
    try:
        os.chmod(d, 0o755)
        conf = os.path.join(d, "stp.conf")
        text = h.render_config(
            proxy={"user": None},
            listeners=[("main", dict({"listen": "127.0.0.1:0", "tls": "none",
                                      "upstream": "up"}, **listener))],
            upstreams=[("up", upstream)])
        with open(conf, "w") as f:
            f.write(text)
        os.chmod(conf, 0o644)
        line = text.splitlines().index(key) + 1
        p = run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", h.daemon_binary(), "-c", conf],
                check=False, timeout=10)
        out = p.stdout.decode("utf-8", "replace")
        assert p.returncode != 0, out
        assert "%s:%d: %s" % (conf, line, key) in out, out
        assert "needs CAP_NET_ADMIN" in out, out
    finally:
        shutil.rmtree(d, ignore_errors=True)
