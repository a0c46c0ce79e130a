/* Unit tests for transparent proxying: parsing source =, the keys
 * transparent, address = original-destination and source =, which keys
 * need CAP_NET_ADMIN, and the socket helpers on loopback (no namespaces:
 * tests/integration/test_transparent.py runs the real interception). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "transparent.h"

#include "checks.h"

static void test_parse_source(void)
{
    static const struct {
        const char *text;
        enum stp_source mode;
        int family;
    } good[] = {
        {"none", STP_SRC_NONE, 0},
        {"NONE", STP_SRC_NONE, 0},
        {"client", STP_SRC_CLIENT, 0},
        {"Client", STP_SRC_CLIENT, 0},
        {"192.0.2.7", STP_SRC_ADDRESS, AF_INET},
        {"2001:db8::7", STP_SRC_ADDRESS, AF_INET6},
        {"[2001:db8::7]", STP_SRC_ADDRESS, AF_INET6},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        enum stp_source m = 99;
        struct sockaddr_storage ss;
        memset(&ss, 0, sizeof(ss));
        CHECK(stp_parse_source(good[i].text, &m, &ss) == 0);
        CHECK(m == good[i].mode);
        if (good[i].family)
            CHECK(ss.ss_family == good[i].family && stp_addr_port(&ss) == 0);
    }
    static const char *const bad[] = {
        "", "[]", "clients", "192.0.2.7:25", "[2001:db8::7]:25", "host.example",
        "192.0.2.256", "10.0.0.0/8", " 192.0.2.7", "[192.0.2.7",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        enum stp_source m = 99;
        CHECK(stp_parse_source(bad[i], &m, NULL) == -EINVAL);
        CHECK(m == 99);
    }
}

#define LST "[listener a]\nlisten = 0.0.0.0:25\nupstream = up\n"

static void test_keys(void)
{
    struct stp_config c;
    char err[512];
    CHECK(stp_config_parse_string("t.ini",
                                  LST "transparent = yes\n"
                                  "[upstream up]\n"
                                  "address = original-destination\n"
                                  "source = client\n",
                                  &c, err, sizeof(err)) == 0);
    CHECK(c.listeners[0].transparent);
    CHECK(c.listeners[0].line_transparent == 4);
    CHECK(c.upstreams[0].original_dst);
    CHECK(c.upstreams[0].n_addrs == 0);
    CHECK_STR(c.upstreams[0].address_text, "original-destination");
    CHECK(c.upstreams[0].source == STP_SRC_CLIENT);
    CHECK(c.upstreams[0].line_source == 7);
    char what[256];
    CHECK(stp_tp_needs_caps(&c, what, sizeof(what)));
    CHECK_STR(what, "t.ini:4: transparent = yes (listener 'a')");
    c.listeners[0].transparent = false;
    CHECK(stp_tp_needs_caps(&c, what, sizeof(what)));
    CHECK_STR(what, "t.ini:7: source = client (upstream 'up')");
    stp_config_free(&c);

    /* Defaults: nothing transparent, nothing needs a capability. */
    CHECK(stp_config_parse_string("t.ini",
                                  LST "[upstream up]\naddress = 127.0.0.1:25\n",
                                  &c, err, sizeof(err)) == 0);
    CHECK(!c.listeners[0].transparent);
    CHECK(!c.upstreams[0].original_dst);
    CHECK(c.upstreams[0].source == STP_SRC_NONE);
    CHECK(!stp_tp_needs_caps(&c, what, sizeof(what)));
    stp_config_free(&c);

    /* A fixed source address of the upstream's family. */
    CHECK(stp_config_parse_string("t.ini",
                                  LST "[upstream up]\naddress = [::1]:25\n"
                                  "source = [::1]\n",
                                  &c, err, sizeof(err)) == 0);
    CHECK(c.upstreams[0].source == STP_SRC_ADDRESS);
    CHECK(c.upstreams[0].source_addr.ss_family == AF_INET6);
    CHECK(!stp_tp_needs_caps(&c, what, sizeof(what)));
    stp_config_free(&c);

    static const struct { const char *text; const char *err; } bad[] = {
        {LST "transparent = maybe\n[upstream up]\naddress = 127.0.0.1:25\n",
         "t.ini:4: invalid value 'maybe' for transparent (expected yes or no)"},
        {LST "[upstream up]\naddress = 127.0.0.1:25\nsource = me\n",
         "t.ini:6: invalid value 'me' for source (expected none, client or "
         "a numeric IP address)"},
        {LST "[upstream up]\naddress = 127.0.0.1:25\nsource = ::1\n",
         "t.ini:6: source is not of the address family of 127.0.0.1:25"},
        {LST "[upstream up]\naddress = original-destination\ntls = starttls\n",
         "t.ini:5: address = original-destination with tls and verify "
         "needs server_name"},
        {LST "[upstream up]\naddress = original-dst\n",
         "t.ini:5: invalid value 'original-dst' for address (expected "
         "HOST:PORT such as 192.0.2.1:25, [2001:db8::1]:25 or "
         "mx.example.net:25)"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        CHECK(stp_config_parse_string("t.ini", bad[i].text, &c, err,
                                      sizeof(err)) < 0);
        CHECK_STR(err, bad[i].err);
    }
}

/* A plain loopback connection: its own address on a transparent listener,
 * and no original destination without NAT (or the same address when
 * conntrack tracks it). */
static void test_original_dst(void)
{
    int l = socket(AF_INET, SOCK_STREAM, 0), c = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    CHECK(bind(l, (struct sockaddr *)&a, sizeof(a)) == 0 && listen(l, 1) == 0);
    CHECK(getsockname(l, (struct sockaddr *)&a, &len) == 0);
    CHECK(connect(c, (struct sockaddr *)&a, sizeof(a)) == 0);
    int s = accept(l, NULL, NULL);
    CHECK(s >= 0);
    struct sockaddr_storage d;
    CHECK(stp_tp_original_dst(s, true, &d) == 0);
    CHECK(stp_same_addr(&d, (struct sockaddr_storage *)&a) ||
          (d.ss_family == AF_INET &&
           ((struct sockaddr_in *)&d)->sin_port == a.sin_port));
    int r = stp_tp_original_dst(s, false, &d);
    CHECK(r == -ENOENT || (r == 0 && stp_addr_port(&d) == ntohs(a.sin_port)));

    /* source = a local address binds the socket there before connect. */
    struct stp_upstream_cfg up = {.source = STP_SRC_ADDRESS};
    const char *why = NULL;
    struct sockaddr_in *src = (struct sockaddr_in *)&up.source_addr;
    src->sin_family = AF_INET;
    src->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int u = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(stp_tp_bind_source(u, &up, NULL, &why) == 0);
    struct sockaddr_in b;
    len = sizeof(b);
    CHECK(getsockname(u, (struct sockaddr *)&b, &len) == 0 &&
          b.sin_addr.s_addr == htonl(INADDR_LOOPBACK));
    close(u);
    /* ... and refuses an address of the other family, saying why. */
    u = socket(AF_INET6, SOCK_STREAM, 0);
    CHECK(stp_tp_bind_source(u, &up, NULL, &why) == -EAFNOSUPPORT);
    CHECK(why && strstr(why, "family"));
    close(u);
    /* source = client without a client address: an error, never the
     * proxy's own address. */
    up.source = STP_SRC_CLIENT;
    u = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(stp_tp_bind_source(u, &up, NULL, &why) == -EINVAL);
    close(u);
    up.source = STP_SRC_NONE;
    CHECK(stp_tp_bind_source(-1, &up, NULL, &why) == 0);
    close(s);
    close(c);
    close(l);
}

int main(void)
{
    test_parse_source();
    test_keys();
    test_original_dst();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed == 0 ? 0 : 1;
}
