"""Regression (found by an outside review): a real haproxy (Debian 2.6) whose frontend is dual-stack
(`bind :::PORT v4v6`, or `bind :::PORT` with net.ipv6.bindv6only=0) sends,
for every IPv4 client, a v1 header such as
    PROXY TCP6 ::ffff:127.0.0.2 ::ffff:127.0.0.1 35105 60267\r\n
proxy/proxy_header.c v1_ipv6() refuses any IPv6 field containing '.', so
the proxy drops every IPv4 client of such a balancer without a byte
(event=proxy_header_error ... "v1: bad IPv6 address").

Failed while the bug was present."""
import os
import socket
import subprocess

import pytest

import stp_harness as h

CLIENT_IP = "127.0.0.2"


class DualStackHaproxy:
    def __init__(self, workdir, backend_port, server_opts):
        os.makedirs(workdir, exist_ok=True)
        self.port = h.free_port()
        self.stats = os.path.join(workdir, "stats.sock")
        cfg = os.path.join(workdir, "haproxy.cfg")
        self.log_path = os.path.join(workdir, "haproxy.log")
        with open(cfg, "w") as f:
            f.write("""global
    stats socket %s mode 600 level user
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind :::%d v4v6
    default_backend be
backend be
    server stp 127.0.0.1:%d %s
""" % (self.stats, self.port, backend_port, server_opts))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["/usr/sbin/haproxy", "-db", "-f", cfg], stdout=self.log,
                                     stderr=subprocess.STDOUT)

        def up():
            u = socket.socket(socket.AF_UNIX)
            try:
                u.connect(self.stats)
                return True
            except OSError:
                return False
            finally:
                u.close()
        assert h.wait_until(up, 10), h.read_text(self.log_path)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture
def dual_haproxy(tmp_path):
    made = []

    def make(port, opts):
        hp = DualStackHaproxy(str(tmp_path / ("hp%d" % len(made))), port, opts)
        made.append(hp)
        return hp
    yield make
    for hp in made:
        hp.stop()


@pytest.mark.parametrize("listener", ["v1", "any"])
def test_ipv4_client_through_dual_stack_haproxy_send_proxy(make_proxy, scripted, dual_haproxy,
                                                            listener):
    proxy = make_proxy(scripted, proxy_protocol=listener, proxy_protocol_from="127.0.0.0/8",
                       tls="none", require_tls=None)
    hp = dual_haproxy(proxy.port, "send-proxy")
    c = h.SmtpConn(hp.port, source=(CLIENT_IP, 0), timeout=5)
    with c:
        got = c.pending(3)
    errs = proxy.events("proxy_header_error")
    assert got.startswith(b"220"), ("IPv4 client behind dual-stack haproxy refused: got %r; %s"
                                    % (got, [e["_line"] for e in errs]))
