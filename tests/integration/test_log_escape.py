"""Values a peer chooses (here the TLS server name a client sends) are
escaped in the log: a newline cannot start a forged line, a quote cannot end
a value early and forge keys."""

import stp_harness as h

FORGED = 'a.test\n2026-01-01T00:00:00.000Z error event=reload status=failed "x=1'


def test_a_server_name_cannot_forge_log_lines(make_proxy, scripted):
    proxy = make_proxy(scripted, tls="implicit", require_tls=None)
    rc, out = h.s_client(proxy.port, "-servername", FORGED, stdin=b"QUIT\r\n")
    ev = proxy.wait_event("tls")
    assert ev.get("sni") == 'a.test\\x0a2026-01-01T00:00:00.000Z error event=reload ' \
                           'status=failed \\"x=1', ev["_line"]
    assert "x" not in ev, ev["_line"]
    # The tls and disconnect lines carry the name, escaped: no other line
    # may hold the forged text, and nothing parses as a reload.
    d = proxy.wait_event("disconnect", id=ev["id"])
    assert d.get("sni") == ev["sni"] and "x" not in d, d["_line"]
    assert not [l for l in proxy.log_lines()
                if "event=reload" in l and 'sni="a.test\\x0a2026' not in l]
    assert not proxy.events("reload")


def test_a_refused_reload_quotes_the_file_safely(make_proxy, scripted):
    """The error of a refused reload quotes the file's text: escaped too."""
    import hardening_util as hu
    proxy = make_proxy(scripted)
    text = proxy.config_text.replace("hostname = proxy.test",
                                     'hostname = a" level=info event=started forged="1')
    assert text != proxy.config_text
    (ev,) = hu.reload(proxy, text)
    assert ev.get("status") == "failed", ev["_line"]
    assert "forged" not in ev and 'a\\"' in ev["error"], ev["_line"]
