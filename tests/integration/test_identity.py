"""Client identity to the upstream (client_identity = xclient | proxy-v1 |
proxy-v2), checked by what independent software made of it: a private Postfix
instance (XCLIENT, and the PROXY protocol before implicit TLS) and aiosmtpd
(which parses PROXY v1/v2 headers and their TLVs). The test client connects
from 127.0.0.2 so that its address differs from the proxy's own 127.0.0.1."""

import re

import pytest

import stp_harness as h

CLIENT_IP = "127.0.0.2"
SECRET_EHLO = "secret-client-ehlo.test"
EARLY = ("EHLO %s\r\nMAIL FROM:<secret@client.test>\r\n" % SECRET_EHLO).encode()

# Postfix service for each upstream tls mode (XCLIENT allowed from 127.0.0.0/8)
XCLIENT_SERVICE = {"none": "plain", "starttls": "starttls", "implicit": "implicit"}
PROXY_SERVICE = {"none": "haproxy", "implicit": "haproxy_implicit"}


def up_opts(pki, tls, identity, **kw):
    opts = {"tls": tls, "client_identity": identity}
    if tls != "none":
        opts.update({"verify": "yes", "ca_file": pki.ca.cert, "server_name": "upstream.test"})
    opts.update(kw)
    return opts


def plain_listener():
    return {"tls": "none", "require_tls": None}


def client_from_127_0_0_2(proxy, ehlo="client.test"):
    c = h.SmtpConn(proxy.port, source=(CLIENT_IP, 0))
    c.greeting()
    c.expect("EHLO " + ehlo, 250)
    return c


def queue_id(reply):
    m = re.search(r"queued as ([0-9A-F]+)", reply.text)
    assert m, "no Postfix queue id in %r" % reply.raw
    return m.group(1)


XTEXT_VALUE = re.compile(rb"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")


def assert_xtext_attributes(line):
    """XCLIENT NAME=VALUE ...: every value is valid xtext (RFC 3461)."""
    words = line.split(b" ")
    assert words[0].upper() == b"XCLIENT", line
    attrs = {}
    for w in words[1:]:
        name, eq, value = w.partition(b"=")
        assert eq and name.isalpha() and name.upper() == name, "bad attribute %r in %r" % (w, line)
        assert XTEXT_VALUE.match(value), "value of %r is not xtext: %r" % (name, line)
        attrs[name.decode()] = value.decode()
    return attrs


# --- XCLIENT with a real Postfix --------------------------------------------------------


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_xclient_gives_postfix_the_client_address_and_port(make_proxy, postfix, pki, tls):
    proxy = make_proxy(postfix.address(XCLIENT_SERVICE[tls]),
                       upstream_opts=up_opts(pki, tls, "xclient"), **plain_listener())
    c = client_from_127_0_0_2(proxy, ehlo="xclient.client.test")
    with c:
        port = c.sock.getsockname()[1]
        r = h.send_message(c, b"Subject: xclient %s\r\n\r\nbody\r\n" % tls.encode())
        qid = queue_id(r)
        c.expect("QUIT", 221)
    name, addr, cport = postfix.client_of_queue_id(qid)
    assert (addr, cport) == (CLIENT_IP, port), \
        "Postfix saw the client as %s[%s]:%d, expected [%s]:%d" % (name, addr, cport,
                                                                   CLIENT_IP, port)
    assert name == "unknown", name              # NAME=[UNAVAILABLE]: no DNS name
    m = postfix.wait_log(r"postfix/%s/smtpd\[(\d+)\]: %s: client=" % (
        XCLIENT_SERVICE[tls], qid))
    pid = m.group(1)
    log = postfix.log_text()
    tls_lines = re.findall(r"postfix/%s/smtpd\[%s\]: .*TLS connection established.*" % (
        XCLIENT_SERVICE[tls], pid), log)
    if tls == "none":
        assert not tls_lines, tls_lines
    else:
        assert tls_lines, "Postfix did not log TLS for the proxy's connection"


def test_client_xclient_is_refused_and_postfix_keeps_the_real_address(make_proxy, postfix, pki):
    proxy = make_proxy(postfix.address("plain"), upstream_opts=up_opts(pki, "none", "xclient"),
                       **plain_listener())
    c = client_from_127_0_0_2(proxy)
    with c:
        port = c.sock.getsockname()[1]
        r = c.cmd("XCLIENT ADDR=192.0.2.66 PORT=1234 NAME=forged.example")
        assert 500 <= r.code < 600, r.raw
        r = c.cmd("XFORWARD ADDR=192.0.2.66")
        assert 500 <= r.code < 600, r.raw
        qid = queue_id(h.send_message(c, b"Subject: forged?\r\n\r\nbody\r\n"))
        c.expect("QUIT", 221)
    _, addr, cport = postfix.client_of_queue_id(qid)
    assert (addr, cport) == (CLIENT_IP, port)
    assert "192.0.2.66" not in postfix.log_text()


def test_postfix_that_does_not_allow_xclient_gets_the_client_421(make_proxy, postfix, pki):
    proxy = make_proxy(postfix.address("noxclient"),
                       upstream_opts=up_opts(pki, "none", "xclient"), **plain_listener())
    with h.SmtpConn(proxy.port, timeout=10, source=(CLIENT_IP, 0)) as c:
        c.send(EARLY)
        r = c.read_reply()
        assert r.code == 421, r.raw
        c.read_until_closed(timeout=5)
    assert SECRET_EHLO not in postfix.log_text()


def test_upstream_without_xclient_gets_the_client_421_and_nothing_else(make_proxy, make_raw,
                                                                       pki):
    up = make_raw(xclient=False)
    proxy = make_proxy(up, upstream_opts=up_opts(pki, "none", "xclient"), **plain_listener())
    with h.SmtpConn(proxy.port, timeout=10) as c:
        sid = proxy.session_id_for(c.sock)
        c.send(EARLY)
        r = c.read_reply()
        assert r.code == 421 and "4.7.0" in r.text, r.raw
        c.read_until_closed(timeout=5)
    ev = proxy.wait_event("upstream_error", id=sid)
    assert ev.get("error") or ev.get("reason"), ev["_line"]
    conn = up.wait_conns(1)[0]
    assert conn.closed.wait(5)
    assert SECRET_EHLO.encode() not in conn.raw, bytes(conn.raw)
    assert set(conn.plaintext_lines()) <= {b"EHLO proxy.test", b"QUIT"}, conn.lines


def test_upstream_refusing_xclient_gets_the_client_421(make_proxy, make_raw, pki):
    up = make_raw(xclient=True, replies={"XCLIENT": b"550 5.7.0 Error: insufficient authorization\r\n"})
    proxy = make_proxy(up, upstream_opts=up_opts(pki, "none", "xclient"), **plain_listener())
    with h.SmtpConn(proxy.port, timeout=10) as c:
        c.send(EARLY)
        r = c.read_reply()
        assert r.code == 421 and "4.7.0" in r.text, r.raw
        c.read_until_closed(timeout=5)
    conn = up.wait_conns(1)[0]
    assert conn.closed.wait(5)
    assert SECRET_EHLO.encode() not in conn.raw
    verbs = [l.split(b" ")[0] for l in conn.plaintext_lines()]
    assert verbs[:2] == [b"EHLO", b"XCLIENT"], conn.lines
    assert set(verbs[2:]) <= {b"QUIT"}, conn.lines


def test_xclient_is_sent_inside_upstream_tls_before_the_client_session(make_proxy, make_raw, pki):
    up = make_raw(tls="starttls", pair=pki.upstream, xclient=True)
    proxy = make_proxy(up, upstream_opts=up_opts(pki, "starttls", "xclient"), **plain_listener())
    c = client_from_127_0_0_2(proxy, ehlo="weird+name=x.client.test")
    with c:
        port = c.sock.getsockname()[1]
        h.send_message(c, b"Subject: x\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    up.wait_messages(1)
    conn = up.conns[0]
    assert conn.plaintext_lines() == [b"EHLO proxy.test", b"STARTTLS"], conn.lines
    inside = conn.tls_lines()
    xclients = [l for l in inside if l.upper().startswith(b"XCLIENT")]
    assert xclients, inside
    first_client_line = inside.index(b"EHLO weird+name=x.client.test")
    assert inside.index(xclients[0]) < first_client_line, inside
    for x in xclients:
        attrs = assert_xtext_attributes(x)
        assert attrs.get("ADDR") == CLIENT_IP, x
        assert attrs.get("PORT") == str(port), x
        if "HELO" in attrs:
            assert attrs["HELO"] == "weird+2Bname+3Dx.client.test", x


# --- PROXY v1/v2 parsed by aiosmtpd -----------------------------------------------------


def aio_upstream(make_aio, pki, tls):
    kw = {"proxy_protocol_timeout": 5}
    if tls == "starttls":
        kw.update(tls_context=h.server_tls_context(pki.upstream), require_starttls=True)
    elif tls == "implicit":
        kw.update(ssl_context=h.server_tls_context(pki.upstream))
    return make_aio(**kw)


@pytest.mark.parametrize("tls", ["none", "starttls"])
@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_gives_aiosmtpd_the_client_address(make_proxy, make_aio, pki, version, tls):
    up = aio_upstream(make_aio, pki, tls)
    proxy = make_proxy(up, upstream_opts=up_opts(pki, tls, "proxy-v%d" % version),
                       **plain_listener())
    msg = h.sample_message("proxy-v%d-%s" % (version, tls))
    c = client_from_127_0_0_2(proxy)
    with c:
        port = c.sock.getsockname()[1]
        h.send_message(c, msg)
        c.expect("QUIT", 221)
    env = up.wait_messages(1)[0]
    assert env["original_content"] == msg
    # (aiosmtpd starts a new session object at STARTTLS: take the header
    # from its handle_PROXY hook rather than from the envelope's session)
    pd = up.wait_proxies(1)[0]
    assert pd["version"] == version, pd
    assert (pd["src_addr"], pd["src_port"]) == (CLIENT_IP, port), pd
    assert (pd["dst_addr"], pd["dst_port"]) == ("127.0.0.1", proxy.port), pd
    assert len(up.proxies) == 1, up.proxies
    if tls == "starttls":
        assert env["starttls_done"] and env["tls"], env


@pytest.mark.parametrize("tls", ["none", "starttls"])
def test_proxy_v2_carries_the_client_tls_of_an_implicit_listener(make_proxy, make_aio, pki, tls):
    up = aio_upstream(make_aio, pki, tls)
    proxy = make_proxy(up, upstream_opts=up_opts(pki, tls, "proxy-v2"), tls="implicit",
                       cert=pki.proxy.cert, key=pki.proxy.key)
    c = h.SmtpConn(proxy.port, source=(CLIENT_IP, 0))
    with c:
        c.starttls(server_hostname="mail.asked-for.test")
        version, cipher = c.sock.version(), c.sock.cipher()[0]
        sid = proxy.session_id_for(c.sock)
        c.greeting()
        c.expect("EHLO client.test", 250)
        h.send_message(c, b"Subject: tlv\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    up.wait_messages(1)
    pd = up.wait_proxies(1)[0]
    assert pd["version"] == 2, pd
    assert pd["src_addr"] == CLIENT_IP
    tlv = pd["tlv"]
    assert tlv.get("SSL") is True, "no PP2_TYPE_SSL TLV: %r" % tlv
    assert tlv.get("SSL_CLIENT", 0) & 0x01, "PP2_CLIENT_SSL not set: %r" % tlv
    assert not tlv.get("SSL_CLIENT", 0) & 0x02, "no client certificate was sent: %r" % tlv
    # HAProxy's spec: verify is 0 only for a presented and verified certificate
    assert tlv.get("SSL_VERIFY") not in (None, 0), tlv
    assert tlv.get("SSL_VERSION") == version.encode(), (tlv, version)
    logged = proxy.wait_event("tls", id=sid).get("cipher", "")
    assert tlv.get("SSL_CIPHER") in (cipher.encode(), logged.encode()), (tlv, cipher, logged)
    assert tlv.get("AUTHORITY") == b"mail.asked-for.test", tlv


def test_proxy_v2_carries_the_client_certificate_subject(make_proxy, make_aio, pki):
    up = aio_upstream(make_aio, pki, "none")
    proxy = make_proxy(up, upstream_opts=up_opts(pki, "none", "proxy-v2"), tls="implicit",
                       cert=pki.proxy.cert, key=pki.proxy.key, client_ca=pki.client_ca.cert,
                       verify_client="optional")
    ctx = h.client_tls_context()
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    c, _ = h.open_implicit(proxy.port, ctx)
    with c:
        h.send_message(c, b"Subject: cert\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    tlv = up.wait_messages(1)[0]["proxy"]["tlv"]
    assert tlv.get("SSL_CLIENT", 0) & 0x03 == 0x03, \
        "PP2_CLIENT_SSL and PP2_CLIENT_CERT_CONN expected: %r" % tlv
    assert tlv.get("SSL_VERIFY") == 0, tlv
    assert tlv.get("SSL_CN") == b"client.test", tlv


def test_proxy_v2_on_a_starttls_listener_carries_addresses(make_proxy, make_aio, pki):
    up = aio_upstream(make_aio, pki, "none")
    proxy = make_proxy(up, upstream_opts=up_opts(pki, "none", "proxy-v2"))
    c = h.SmtpConn(proxy.port, source=(CLIENT_IP, 0))
    with c:
        port = c.sock.getsockname()[1]
        c.greeting()
        c.expect("EHLO client.test", 250)
        c.expect("STARTTLS", 220)
        c.starttls()
        c.expect("EHLO client.test", 250)
        h.send_message(c, b"Subject: v2 starttls\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    pd = up.wait_messages(1)[0]["proxy"]
    assert (pd["version"], pd["src_addr"], pd["src_port"]) == (2, CLIENT_IP, port), pd


# --- PROXY then upstream TLS -----------------------------------------------------------------


@pytest.mark.parametrize("tls", ["none", "implicit"])
@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_gives_postfix_the_client_address(make_proxy, postfix, pki, version, tls):
    proxy = make_proxy(postfix.address(PROXY_SERVICE[tls]),
                       upstream_opts=up_opts(pki, tls, "proxy-v%d" % version), **plain_listener())
    c = client_from_127_0_0_2(proxy)
    with c:
        port = c.sock.getsockname()[1]
        qid = queue_id(h.send_message(c, b"Subject: postfix proxy\r\n\r\nbody\r\n"))
        c.expect("QUIT", 221)
    _, addr, cport = postfix.client_of_queue_id(qid)
    assert (addr, cport) == (CLIENT_IP, port)


def test_proxy_header_comes_before_the_upstream_tls_handshake(make_proxy, make_raw, pki):
    up = make_raw(tls="implicit", pair=pki.upstream, proxy_header=True)
    proxy = make_proxy(up, upstream_opts=up_opts(pki, "implicit", "proxy-v1"), **plain_listener())
    c = client_from_127_0_0_2(proxy)
    with c:
        port = c.sock.getsockname()[1]
        h.send_message(c, b"Subject: order\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    up.wait_messages(1)
    conn = up.conns[0]
    hdr = conn.proxy_header
    assert hdr == ("PROXY TCP4 %s 127.0.0.1 %d %d\r\n" % (CLIENT_IP, port, proxy.port)).encode(), hdr
    raw = bytes(conn.raw)
    assert raw.startswith(hdr)
    assert raw[len(hdr):len(hdr) + 2] == b"\x16\x03", "TLS must follow the header: %r" % (
        raw[:len(hdr) + 8],)
    assert conn.handshake == "ok"


# --- identity cannot be forged -------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_a_client_proxy_line_is_never_taken_as_the_header(make_proxy, make_aio, pki, version):
    up = aio_upstream(make_aio, pki, "none")
    proxy = make_proxy(up, upstream_opts=up_opts(pki, "none", "proxy-v%d" % version),
                       **plain_listener())
    forged = b"PROXY TCP4 192.0.2.66 192.0.2.1 4444 25\r\n"
    with h.SmtpConn(proxy.port, source=(CLIENT_IP, 0)) as c:
        port = c.sock.getsockname()[1]
        c.send(forged)                      # before the greeting, at once
        c.greeting()
        r = c.read_reply()                  # the reply to the forged line
        assert 500 <= r.code < 600, r.raw
        r = c.cmd(forged.rstrip(b"\r\n"))   # and again, as a command
        assert 500 <= r.code < 600, r.raw
        c.expect("EHLO client.test", 250)
        h.send_message(c, b"Subject: forged proxy\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    env = up.wait_messages(1)[0]
    assert len(up.proxies) == 1, up.proxies
    pd = env["proxy"]
    assert (pd["src_addr"], pd["src_port"]) == (CLIENT_IP, port), pd
    assert b"192.0.2.66" not in pd["raw"]


def test_a_client_xclient_never_reaches_an_xclient_upstream(make_proxy, make_raw, pki):
    up = make_raw(xclient=True)
    proxy = make_proxy(up, upstream_opts=up_opts(pki, "none", "xclient"), **plain_listener())
    c = client_from_127_0_0_2(proxy)
    with c:
        port = c.sock.getsockname()[1]
        r = c.cmd("XCLIENT ADDR=192.0.2.66 PORT=4444")
        assert r.code == 550 and "5.7.0" in r.text, r.raw
        h.send_message(c, b"Subject: x\r\n\r\nbody\r\n")
        c.expect("QUIT", 221)
    up.wait_messages(1)
    xclients = [l for l in up.conns[0].plaintext_lines() if l.upper().startswith(b"XCLIENT")]
    assert len(xclients) == 1, xclients
    attrs = assert_xtext_attributes(xclients[0])
    assert (attrs.get("ADDR"), attrs.get("PORT")) == (CLIENT_IP, str(port)), xclients


# --- a client's XCLIENT hidden behind odd white space, against Postfix ------------------
# Postfix skips leading white space and splits the verb on any of it: the
# proxy must refuse what Postfix would run, and forward the rest in canonical
# form. 192.0.2.0/24 is in this Postfix's mynetworks: a forged address there
# would be allowed to relay.

@pytest.mark.parametrize("line", [
    b"XCLIENT\tADDR=192.0.2.66", b"XCLIENT\x0bADDR=192.0.2.66", b"XCLIENT\x0cADDR=192.0.2.66",
    b" XCLIENT ADDR=192.0.2.66", b"\tXCLIENT ADDR=192.0.2.66", b"xclient\t\tADDR=192.0.2.66",
    b"XFORWARD\tADDR=192.0.2.66",
], ids=["tab", "vt", "ff", "leading-space", "leading-tab", "lower-two-tabs", "xforward-tab"])
def test_xclient_behind_white_space_is_refused_and_postfix_denies_relay(make_proxy, postfix,
                                                                          pki, line):
    proxy = make_proxy(postfix.address("plain"), upstream_opts=up_opts(pki, "none", "xclient"),
                       **plain_listener())
    c = client_from_127_0_0_2(proxy)
    with c:
        port = c.sock.getsockname()[1]
        c.send(line + b"\r\n")
        r = c.read_reply()
        assert r.code == 550 and "5.7.0" in r.text, r.raw
        c.expect("MAIL FROM:<b@example.org>", 250)
        r = c.cmd("RCPT TO:<victim@foreign.example>")
        assert r.code == 554 and "Relay access denied" in r.text, r.raw
        c.expect("RCPT TO:<a@example.net>", 250)
        c.expect("DATA", 354)
        c.send(b"Subject: ws\r\n\r\nbody\r\n.\r\n")
        qid = queue_id(c.read_reply())
        c.expect("QUIT", 221)
    _, addr, cport = postfix.client_of_queue_id(qid)
    assert (addr, cport) == (CLIENT_IP, port)
    assert "192.0.2.66" not in postfix.log_text()


def test_bdat_and_data_behind_a_tab_stay_in_step_with_postfix(make_proxy, postfix, pki):
    """BDAT<TAB>5 is counted as a 5-octet chunk (the XCLIENT after it is a
    command, refused); DATA<TAB> gets Postfix's 354 and the message goes in."""
    proxy = make_proxy(postfix.address("plain"), upstream_opts=up_opts(pki, "none", "xclient"),
                       **plain_listener())
    c = client_from_127_0_0_2(proxy)
    with c:
        port = c.sock.getsockname()[1]
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("RCPT TO:<a@example.net>", 250)
        c.send(b"BDAT\t5\r\nAAAAA")
        assert c.read_reply().code == 250
        c.send(b"XCLIENT ADDR=192.0.2.66\r\n")
        r = c.read_reply()
        assert r.code == 550, r.raw
        c.send(b"BDAT\t0 LAST\r\n")
        bdat_qid = queue_id(c.read_reply())
        c.expect("MAIL FROM:<b@example.org>", 250)
        c.expect("RCPT TO:<a@example.net>", 250)
        c.send(b"DATA\t\r\n")
        assert c.read_reply().code == 354
        c.send(b"Subject: tab\r\n\r\nbody\r\n.\r\n")
        data_qid = queue_id(c.read_reply())
        c.expect("QUIT", 221)
    for qid in (bdat_qid, data_qid):
        _, addr, cport = postfix.client_of_queue_id(qid)
        assert (addr, cport) == (CLIENT_IP, port)
    assert "192.0.2.66" not in postfix.log_text()
