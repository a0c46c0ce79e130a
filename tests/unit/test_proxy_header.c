/* The PROXY protocol receiver's parser (proxy/proxy_header.c): a table of
 * valid and hostile headers, each parsed whole and as every prefix (a
 * header split at any byte, byte by byte), and headers written by our own
 * sender (identity.c) read back. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>

#include "identity.h"
#include "proxy_header.h"
#include "unit.h"

#define V1 STP_PP_V1
#define V2 STP_PP_V2
#define ANY (STP_PP_V1 | STP_PP_V2)
#define SIG "\r\n\r\n\0\r\nQUIT\n"

struct pp_case {
    const char *name;
    const char *p;
    size_t n;
    unsigned versions;
    int want;            /* header length, or the error */
    bool local;
    const char *src;     /* "ADDR PORT" of the client when not local */
    const char *dst;
};

#define OK(name, lit, v, len, src, dst) {name, S(lit), v, len, false, src, dst}
#define LOCAL(name, lit, v, len) {name, S(lit), v, len, true, NULL, NULL}
#define BAD(name, lit, v, err) {name, S(lit), v, err, false, NULL, NULL}

static const struct pp_case cases[] = {
    /* v1 */
    OK("v1 TCP4", "PROXY TCP4 192.0.2.1 198.51.100.2 51234 25\r\n", V1, 44,
       "192.0.2.1 51234", "198.51.100.2 25"),
    OK("v1 TCP4 with data after it",
       "PROXY TCP4 192.0.2.1 198.51.100.2 51234 25\r\nEHLO x\r\n", V1, 44,
       "192.0.2.1 51234", "198.51.100.2 25"),
    OK("v1 TCP6", "PROXY TCP6 2001:db8::1 2001:db8::2 0 65535\r\n", V1, 44,
       "2001:db8::1 0", "2001:db8::2 65535"),
    OK("v1 TCP6 IPv4-mapped, as haproxy sends from a dual-stack bind",
       "PROXY TCP6 ::ffff:127.0.0.2 ::ffff:127.0.0.1 35105 60267\r\n", V1,
       58, "::ffff:127.0.0.2 35105", "::ffff:127.0.0.1 60267"),
    OK("v1 under any", "PROXY TCP4 0.0.0.0 255.255.255.255 1 2\r\n", ANY, 40,
       "0.0.0.0 1", "255.255.255.255 2"),
    LOCAL("v1 UNKNOWN", "PROXY UNKNOWN\r\n", V1, 15),
    LOCAL("v1 UNKNOWN ignores the rest",
          "PROXY UNKNOWN ffff:f...f:ffff 1.2.3.4 99999 x\r\n", V1, 47),
    LOCAL("v1 UNKNOWN at 107 bytes",
          "PROXY UNKNOWN xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
          "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n", V1, 107),
    BAD("v1 UNKNOWN at 108 bytes",
        "PROXY UNKNOWN xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n", V1, -EMSGSIZE),
    BAD("v1 no CRLF in 107 bytes",
        "PROXY TCP4 1.1.1.1 1.1.1.1 1 1111111111111111111111111111111111111111"
        "111111111111111111111111111111111111111111111", V1, -EMSGSIZE),
    BAD("v1 lone LF", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1, -EPROTO),
    BAD("v1 lone CR", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n", V1, -EPROTO),
    BAD("v1 lone CR early", "PROXY\r", V1, -EPROTO),
    BAD("v1 lowercase", "proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", V1, -EPROTO),
    BAD("v1 no space", "PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", V1, -EPROTO),
    BAD("v1 two spaces", "PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", V1, -EPROTO),
    BAD("v1 trailing space", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", V1, -EPROTO),
    BAD("v1 extra field", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", V1, -EPROTO),
    BAD("v1 missing port", "PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", V1, -EPROTO),
    BAD("v1 empty", "PROXY \r\n", V1, -EPROTO),
    BAD("v1 UDP4", "PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", V1, -EPROTO),
    BAD("v1 UNKNOWNX", "PROXY UNKNOWNX\r\n", V1, -EPROTO),
    BAD("v1 port 65536", "PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", V1, -EPROTO),
    BAD("v1 port 99999", "PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", V1, -EPROTO),
    BAD("v1 port leading zero", "PROXY TCP4 1.2.3.4 5.6.7.8 025 2\r\n", V1,
        -EPROTO),
    BAD("v1 port 00", "PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n", V1, -EPROTO),
    BAD("v1 port sign", "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", V1, -EPROTO),
    BAD("v1 port hex", "PROXY TCP4 1.2.3.4 5.6.7.8 0x19 2\r\n", V1, -EPROTO),
    BAD("v1 address leading zero", "PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", V1,
        -EPROTO),
    BAD("v1 address octet 00", "PROXY TCP4 1.2.3.4 5.6.00.8 1 2\r\n", V1,
        -EPROTO),
    BAD("v1 address 256", "PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", V1, -EPROTO),
    BAD("v1 address three parts", "PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", V1,
        -EPROTO),
    BAD("v1 address five parts", "PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", V1,
        -EPROTO),
    BAD("v1 TCP4 with IPv6", "PROXY TCP4 ::1 ::1 1 2\r\n", V1, -EPROTO),
    BAD("v1 TCP6 with IPv4", "PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", V1,
        -EPROTO),
    BAD("v1 TCP6 zone", "PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", V1, -EPROTO),
    BAD("v1 NUL in address", "PROXY TCP4 1.2.3.4\0 5.6.7.8 1 2\r\n", V1,
        -EPROTO),
    BAD("v1 on a v2 listener", "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", V2,
        -EPROTO),
    BAD("no header: SMTP", "EHLO client.example\r\n", V1, -EPROTO),
    BAD("no header under any", "EHLO client.example\r\n", ANY, -EPROTO),
    BAD("no header: TLS", "\x16\x03\x01\x02\x00\x01", ANY, -EPROTO),

    /* v2 */
    OK("v2 PROXY TCP4",
       SIG "\x21\x11\x00\x0c" "\xc0\x00\x02\x01" "\xc6\x33\x64\x02"
           "\xc8\x22" "\x00\x19", V2, 28, "192.0.2.1 51234", "198.51.100.2 25"),
    OK("v2 PROXY TCP4 with data after it",
       SIG "\x21\x11\x00\x0c" "\xc0\x00\x02\x01" "\xc6\x33\x64\x02"
           "\xc8\x22" "\x00\x19" "\x16\x03\x01", ANY, 28, "192.0.2.1 51234",
       "198.51.100.2 25"),
    OK("v2 PROXY TCP6",
       SIG "\x21\x21\x00\x24"
           "\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01"
           "\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x02" "\x00\x01" "\x01\xbb",
       V2, 52, "2001:db8::1 1", "2001:db8::2 443"),
    OK("v2 PROXY UDP4 (addresses taken)",
       SIG "\x21\x12\x00\x0c" "\x0a\x00\x00\x01" "\x0a\x00\x00\x02"
           "\x00\x01" "\x00\x02", V2, 28, "10.0.0.1 1", "10.0.0.2 2"),
    OK("v2 TLVs skipped",
       SIG "\x21\x11\x00\x1d" "\x0a\x00\x00\x01" "\x0a\x00\x00\x02"
           "\x00\x01" "\x00\x02" "\x04\x00\x00" "\x02\x00\x08" "mx.local"
           "\x01\x00\x00", V2, 45, "10.0.0.1 1", "10.0.0.2 2"),
    LOCAL("v2 LOCAL", SIG "\x20\x00\x00\x00", V2, 16),
    LOCAL("v2 LOCAL with a block (ignored)",
          SIG "\x20\x11\x00\x03" "abc", ANY, 19),
    LOCAL("v2 PROXY UNSPEC", SIG "\x21\x00\x00\x00", V2, 16),
    LOCAL("v2 PROXY UNIX", SIG "\x21\x31\x00\xd8"
          "/s"
          "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
          "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
          "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
          "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
          "\0\0"
          "/d"
          "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
          "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
          "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
          "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
          "\0\0",
          V2, 232),
    BAD("v2 bad signature", "\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c", V2,
        -EPROTO),
    BAD("v2 version 1", SIG "\x11\x11\x00\x0c", V2, -EPROTO),
    BAD("v2 version 3", SIG "\x31\x11\x00\x0c", V2, -EPROTO),
    BAD("v2 command 2", SIG "\x22\x11\x00\x0c", V2, -EPROTO),
    BAD("v2 command 15", SIG "\x2f\x11\x00\x0c", V2, -EPROTO),
    BAD("v2 family 4", SIG "\x21\x41\x00\x0c", V2, -EPROTO),
    BAD("v2 transport 3", SIG "\x21\x13\x00\x0c", V2, -EPROTO),
    BAD("v2 INET with UNSPEC transport", SIG "\x21\x10\x00\x0c", V2, -EPROTO),
    BAD("v2 INET block too short",
        SIG "\x21\x11\x00\x0b" "\x0a\x00\x00\x01\x0a\x00\x00\x02\x00\x01\x00",
        V2, -EPROTO),
    BAD("v2 INET6 block too short", SIG "\x21\x21\x00\x0c"
        "\x0a\x00\x00\x01\x0a\x00\x00\x02\x00\x01\x00\x02", V2, -EPROTO),
    BAD("v2 UNIX block too short", SIG "\x21\x31\x00\x24", V2, -EPROTO),
    BAD("v2 over our bound", SIG "\x21\x11\x0f\xf1", V2, -EMSGSIZE),
    BAD("v2 at the spec's bound", SIG "\x21\x11\xff\xff", V2, -EMSGSIZE),
    BAD("v2 TLV overruns",
        SIG "\x21\x11\x00\x11" "\x0a\x00\x00\x01" "\x0a\x00\x00\x02"
            "\x00\x01" "\x00\x02" "\x02\x00\x09" "mx", V2, -EPROTO),
    BAD("v2 TLV header cut",
        SIG "\x21\x11\x00\x0e" "\x0a\x00\x00\x01" "\x0a\x00\x00\x02"
            "\x00\x01" "\x00\x02" "\x02\x00", V2, -EPROTO),
    BAD("v2 on a v1 listener", SIG "\x20\x00\x00\x00", V1, -EPROTO),
};

static bool same_addr(const struct sockaddr_storage *ss, const char *want)
{
    char host[64], got[80];
    unsigned port;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)ss;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        port = ntohs(in->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const void *)ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        port = ntohs(in6->sin6_port);
    } else {
        return false;
    }
    snprintf(got, sizeof(got), "%s %u", host, port);
    return strcmp(got, want) == 0;
}

static void check_case(const struct pp_case *c)
{
    struct stp_pp_result r;
    case_begin(c->name);
    int got = stp_pp_parse(c->p, c->n, c->versions, &r);
    CHECK(got == c->want, "whole: %d, want %d (%s) for %s", got, c->want,
          r.reason ? r.reason : "-", esc(c->p, c->n));
    if (got > 0) {
        CHECK(r.len == (size_t)got && r.reason == NULL, "len %zu", r.len);
        CHECK(r.local == c->local, "local %d", r.local);
        CHECK(r.version == (c->p[0] == 'P' ? 1u : 2u), "version %u",
              r.version);
        if (!c->local && c->src)
            CHECK(same_addr(&r.src, c->src) && same_addr(&r.dst, c->dst),
                  "addresses differ from %s / %s", c->src, c->dst);
    } else if (got < 0) {
        CHECK(r.reason && *r.reason, "an error without a reason");
    }
    /* Every prefix: a valid header needs more until its last byte; a bad
     * one needs more or fails the same way, and once failed stays so. */
    size_t end = got > 0 ? (size_t)got : c->n;
    bool failed = false;
    for (size_t k = 0; k < end; k++) {
        int p = stp_pp_parse(c->p, k, c->versions, &r);
        if (got > 0)
            CHECK(p == 0, "prefix %zu: %d, want 0", k, p);
        else if (failed)
            CHECK(p == got, "prefix %zu: %d after failing", k, p);
        else
            CHECK(p == 0 || p == got, "prefix %zu: %d", k, p);
        failed = failed || p < 0;
    }
    case_end();
}

/* A header arriving one byte at a time into a growing buffer, as the relay
 * sees it, followed by the client's first bytes. */
static void test_byte_by_byte(void)
{
    static const char hdr[] = "PROXY TCP4 203.0.113.7 192.0.2.25 40000 25\r\n"
                              "\x16\x03\x01";
    case_begin("byte by byte: done exactly at the LF, the rest left");
    char buf[sizeof(hdr)];
    int got = 0;
    size_t k;
    struct stp_pp_result r;
    for (k = 1; k < sizeof(hdr) && got == 0; k++) {
        memcpy(buf, hdr, k);
        got = stp_pp_parse(buf, k, ANY, &r);
    }
    CHECK(got == 44 && k - 1 == 44, "done at %zu with %d", k - 1, got);
    CHECK(same_addr(&r.src, "203.0.113.7 40000"), "source");
    case_end();

    case_begin("early refusal: a non-header fails at its first byte");
    CHECK(stp_pp_parse("E", 1, ANY, &r) < 0, "E under any");
    CHECK(stp_pp_parse("E", 1, V1, &r) < 0, "E under v1");
    CHECK(stp_pp_parse("E", 1, V2, &r) < 0, "E under v2");
    CHECK(stp_pp_parse("P", 1, V2, &r) < 0, "P under v2");
    CHECK(stp_pp_parse("\r", 1, V1, &r) < 0, "CR under v1");
    CHECK(stp_pp_parse(SIG "\x21\x11\xff", 15, V2, &r) == 0,
          "length byte still to come");
    CHECK(stp_pp_parse(SIG "\x21\x11\xff\xff", 16, V2, &r) < 0,
          "too long refused before its body");
    case_end();
}

/* What our own sender writes toward upstreams is what we read back. */
static void test_round_trip(void)
{
    struct sockaddr_in s4 = {.sin_family = AF_INET, .sin_port = htons(5000)};
    struct sockaddr_in d4 = {.sin_family = AF_INET, .sin_port = htons(25)};
    inet_pton(AF_INET, "203.0.113.9", &s4.sin_addr);
    inet_pton(AF_INET, "192.0.2.1", &d4.sin_addr);
    struct sockaddr_in6 s6 = {.sin6_family = AF_INET6,
                              .sin6_port = htons(6000)};
    struct sockaddr_in6 d6 = {.sin6_family = AF_INET6,
                              .sin6_port = htons(465)};
    inet_pton(AF_INET6, "2001:db8::9", &s6.sin6_addr);
    inet_pton(AF_INET6, "::1", &d6.sin6_addr);
    struct stp_tls_info ti = {.version = "TLSv1.3", .cipher = "X",
                              .sni = "mx.example", .cn = "client"};
    char buf[1024];
    struct stp_pp_result r;

    case_begin("round trip: identity.c's v1 and v2 headers parse back");
    int n = stp_proxy_v1(buf, sizeof(buf), (void *)&s4, (void *)&d4);
    CHECK(n > 0 && stp_pp_parse(buf, (size_t)n, ANY, &r) == n, "v1 IPv4");
    CHECK(same_addr(&r.src, "203.0.113.9 5000") &&
              same_addr(&r.dst, "192.0.2.1 25"), "v1 IPv4 addresses");
    n = stp_proxy_v1(buf, sizeof(buf), (void *)&s6, (void *)&d6);
    CHECK(n > 0 && stp_pp_parse(buf, (size_t)n, V1, &r) == n, "v1 IPv6");
    CHECK(same_addr(&r.src, "2001:db8::9 6000"), "v1 IPv6 source");
    n = stp_proxy_v2(buf, sizeof(buf), (void *)&s6, (void *)&d6, &ti);
    CHECK(n > 0 && stp_pp_parse(buf, (size_t)n, V2, &r) == n, "v2 + TLVs");
    CHECK(same_addr(&r.src, "2001:db8::9 6000") &&
              same_addr(&r.dst, "::1 465"), "v2 IPv6 addresses");
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_case(&cases[i]);
    test_byte_by_byte();
    test_round_trip();
    return unit_summary();
}
