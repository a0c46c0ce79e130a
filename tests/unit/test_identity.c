/* Unit tests for the identity module (proxy/identity.c): PROXY protocol v1
 * and v2 headers (with the TLS TLVs), RFC 3461 xtext and the XCLIENT line.
 *
 * Table-driven. Every output is checked exactly (v2 through an independent
 * decoder written here from HAProxy's proxy-protocol.txt), and every
 * function is called with each capacity from 0 up to the output's length:
 * too small must give -ENOSPC and write nothing past the capacity (guard
 * bytes after the buffer are checked), enough must give the same output.
 * Last line printed: "N passed, N failed". */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "identity.h"
#include "stp.h"

#include "unit.h"

/* ---- addresses ----------------------------------------------------------- */

union addr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
    struct sockaddr_un un;
    struct sockaddr_storage ss;
};

/* An address from its text ("1.2.3.4" or anything with a ':' for IPv6). */
static union addr mk(const char *text, unsigned port)
{
    union addr a;
    memset(&a, 0, sizeof(a));
    if (strchr(text, ':')) {
        a.in6.sin6_family = AF_INET6;
        a.in6.sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, text, &a.in6.sin6_addr) != 1)
            abort();
    } else {
        a.in.sin_family = AF_INET;
        a.in.sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, text, &a.in.sin_addr) != 1)
            abort();
    }
    return a;
}

static union addr mk_unix(void)
{
    union addr a;
    memset(&a, 0, sizeof(a));
    a.un.sun_family = AF_UNIX;
    strcpy(a.un.sun_path, "/run/x.sock");
    return a;
}

/* ---- capacity sweep ------------------------------------------------------ */

#define GUARD 32
#define GUARD_BYTE 0xA5

/* A buffer of CAP bytes followed by GUARD guard bytes, all GUARD_BYTE. */
static char *guarded(size_t cap)
{
    char *b = malloc(cap + GUARD);
    if (!b)
        abort();
    memset(b, GUARD_BYTE, cap + GUARD);
    return b;
}

static bool guard_intact(const char *b, size_t cap)
{
    for (size_t i = 0; i < GUARD; i++)
        if ((unsigned char)b[cap + i] != GUARD_BYTE)
            return false;
    return true;
}

/* One of the functions under test, bound to its arguments. */
struct call {
    int kind; /* 1: v1, 2: v2, 3: xclient, 4: xtext */
    const struct sockaddr *src, *dst;
    const struct stp_tls_info *tls;
    const char *s;
};

static int invoke(const struct call *c, char *buf, size_t cap)
{
    switch (c->kind) {
    case 1:
        return stp_proxy_v1(buf, cap, c->src, c->dst);
    case 2:
        return stp_proxy_v2(buf, cap, c->src, c->dst, c->tls);
    case 3:
        return stp_xclient_line(buf, cap, c->src);
    default:
        return stp_xtext(buf, cap, c->s);
    }
}

/* Calls C with every capacity 0..LEN+1 (LEN: the output length with a big
 * buffer, which must equal WANT_LEN). Below LEN: -ENOSPC. From NEED on: the
 * full output, identical to REF. At LEN itself text functions may ask for a
 * byte for the NUL: NEED is LEN or LEN+1. Nothing is written past the
 * capacity in any case. */
static void cap_sweep(const struct call *c, const char *ref, size_t len,
                      size_t need, const char *what)
{
    for (size_t cap = 0; cap <= len + 1; cap++) {
        char *b = guarded(cap);
        int r = invoke(c, b, cap);
        if (cap < len)
            CHECK(r == -ENOSPC, "%s: cap %zu (output %zu bytes): got %d, want "
                  "-ENOSPC", what, cap, len, r);
        else if (cap >= need)
            CHECK(r == (int)len && memcmp(b, ref, len) == 0,
                  "%s: cap %zu (output %zu bytes): got %d%s, want the full "
                  "output", what, cap, len, r,
                  r == (int)len ? " with other bytes" : "");
        else
            CHECK(r == -ENOSPC || (r == (int)len && memcmp(b, ref, len) == 0),
                  "%s: cap %zu: got %d, want -ENOSPC or the output", what,
                  cap, r);
        CHECK(guard_intact(b, cap), "%s: cap %zu: wrote past the capacity "
              "(returned %d)", what, cap, r);
        free(b);
    }
}

/* ---- PROXY v1 ------------------------------------------------------------ */

struct v1_case {
    const char *src;
    unsigned sport;
    const char *dst;
    unsigned dport;
    const char *want;
};

static const struct v1_case v1_cases[] = {
    {"192.0.2.1", 56324, "198.51.100.2", 25,
     "PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"},
    {"1.2.3.4", 5678, "10.0.0.1", 587,
     "PROXY TCP4 1.2.3.4 10.0.0.1 5678 587\r\n"},
    {"0.0.0.0", 0, "255.255.255.255", 65535,
     "PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n"},
    {"255.255.255.255", 65535, "255.255.255.255", 65535,
     "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"},
    {"2001:db8::1", 41234, "2001:db8::25", 25,
     "PROXY TCP6 2001:db8::1 2001:db8::25 41234 25\r\n"},
    {"::1", 1, "::1", 2, "PROXY TCP6 ::1 ::1 1 2\r\n"},
    {"2001:DB8:0:0:0:0:0:1", 465, "fe80::1", 465,
     "PROXY TCP6 2001:db8::1 fe80::1 465 465\r\n"},
    {"::ffff:192.0.2.1", 4000, "::ffff:192.0.2.2", 25,
     "PROXY TCP6 ::ffff:192.0.2.1 ::ffff:192.0.2.2 4000 25\r\n"},
    /* the longest line: 104 bytes, inside the spec's 107 */
    {"ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535,
     "fffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535,
     "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe "
     "fffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"},
};

/* The v1 grammar, checked apart from the exact string. */
static void v1_shape(const char *p, size_t n)
{
    CHECK(n <= 107, "v1 line of %zu bytes, the spec allows 107", n);
    CHECK(n >= 8 && memcmp(p, "PROXY ", 6) == 0, "no \"PROXY \" prefix");
    CHECK(n >= 2 && p[n - 2] == '\r' && p[n - 1] == '\n', "no CRLF at the end");
    size_t spaces = 0;
    for (size_t i = 0; i < n; i++) {
        CHECK(p[i] != '\0', "NUL inside the v1 line");
        if (i < n - 2)
            CHECK(p[i] != '\r' && p[i] != '\n', "CR/LF inside the v1 line");
        spaces += p[i] == ' ';
    }
    CHECK(spaces == 5, "%zu spaces in \"%s\", want 5", spaces, esc(p, n));
}

static void test_v1(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(v1_cases); i++) {
        const struct v1_case *c = &v1_cases[i];
        char name[160];
        snprintf(name, sizeof(name), "proxy v1 %s:%u -> %s:%u", c->src,
                 c->sport, c->dst, c->dport);
        case_begin(name);
        union addr s = mk(c->src, c->sport), d = mk(c->dst, c->dport);
        char buf[512];
        memset(buf, GUARD_BYTE, sizeof(buf));
        int r = stp_proxy_v1(buf, sizeof(buf), &s.sa, &d.sa);
        size_t wl = strlen(c->want);
        CHECK(r == (int)wl && memcmp(buf, c->want, wl) == 0,
              "got %d \"%s\", want \"%s\"", r, r > 0 ? esc(buf, (size_t)r) : "",
              esc(c->want, wl));
        if (r > 0) {
            v1_shape(buf, (size_t)r);
            /* HAProxy sizes its buffer at 108: it must be enough. */
            char b108[108];
            CHECK(stp_proxy_v1(b108, sizeof(b108), &s.sa, &d.sa) == r,
                  "a 108-byte buffer is not enough");
        }
        struct call cl = {1, &s.sa, &d.sa, NULL, NULL};
        cap_sweep(&cl, c->want, wl, wl + 1, "v1");
        case_end();
    }

    case_begin("proxy v1: mixed or unknown families give -EAFNOSUPPORT");
    {
        union addr v4 = mk("192.0.2.1", 1), v6 = mk("2001:db8::1", 2),
                   un = mk_unix();
        char buf[256];
        CHECK(stp_proxy_v1(buf, sizeof(buf), &v4.sa, &v6.sa) == -EAFNOSUPPORT,
              "v4 -> v6");
        CHECK(stp_proxy_v1(buf, sizeof(buf), &v6.sa, &v4.sa) == -EAFNOSUPPORT,
              "v6 -> v4");
        CHECK(stp_proxy_v1(buf, sizeof(buf), &un.sa, &un.sa) == -EAFNOSUPPORT,
              "unix -> unix");
        CHECK(stp_proxy_v1(buf, sizeof(buf), &un.sa, &v4.sa) == -EAFNOSUPPORT,
              "unix -> v4");
        CHECK(stp_proxy_v1(buf, sizeof(buf), &v4.sa, &un.sa) == -EAFNOSUPPORT,
              "v4 -> unix");
    }
    case_end();
}

/* ---- PROXY v2: an independent decoder ------------------------------------ */

static const uint8_t SIG[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* What a v2 header says, decoded. A string TLV is {present, bytes, len}. */
struct tstr {
    bool present;
    char v[70000];
    size_t len;
};

struct v2_decoded {
    int family;          /* AF_INET or AF_INET6 */
    uint8_t src[16], dst[16];
    unsigned sport, dport;
    struct tstr authority;
    bool ssl;            /* a PP2_TYPE_SSL TLV was there */
    uint8_t client;
    uint32_t verify;
    struct tstr version, cipher, cn;
    char err[200];
};

static unsigned be16(const uint8_t *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

static bool take_str(struct v2_decoded *d, struct tstr *t, const uint8_t *v,
                     size_t len, const char *name)
{
    if (t->present) {
        snprintf(d->err, sizeof(d->err), "duplicate %s TLV", name);
        return false;
    }
    t->present = true;
    memcpy(t->v, v, len);
    t->len = len;
    return true;
}

/* Decode P[0..N) as a complete v2 header; false with d->err set if the bytes
 * are not one. */
static bool v2_decode(const uint8_t *p, size_t n, struct v2_decoded *d)
{
    memset(d, 0, sizeof(*d));
#define BAD(...)                                                               \
    do {                                                                       \
        snprintf(d->err, sizeof(d->err), __VA_ARGS__);                         \
        return false;                                                          \
    } while (0)
    if (n < 16)
        BAD("%zu bytes, shorter than the 16-byte header", n);
    if (memcmp(p, SIG, 12) != 0)
        BAD("bad signature");
    if (p[12] != 0x21)
        BAD("version/command byte 0x%02x, want 0x21", p[12]);
    size_t alen;
    if (p[13] == 0x11) {
        d->family = AF_INET;
        alen = 12;
    } else if (p[13] == 0x21) {
        d->family = AF_INET6;
        alen = 36;
    } else {
        BAD("family/protocol byte 0x%02x", p[13]);
    }
    size_t len = be16(p + 14);
    if (len != n - 16)
        BAD("length field %zu, but %zu bytes follow the header", len, n - 16);
    if (len < alen)
        BAD("length %zu shorter than the addresses (%zu)", len, alen);
    const uint8_t *a = p + 16;
    size_t al = d->family == AF_INET ? 4 : 16;
    memcpy(d->src, a, al);
    memcpy(d->dst, a + al, al);
    d->sport = be16(a + 2 * al);
    d->dport = be16(a + 2 * al + 2);

    size_t o = 16 + alen;
    while (o < n) {
        if (n - o < 3)
            BAD("truncated TLV header at %zu", o);
        uint8_t type = p[o];
        size_t tl = be16(p + o + 1);
        if (n - o - 3 < tl)
            BAD("TLV 0x%02x at %zu: length %zu overruns the header", type, o,
                tl);
        const uint8_t *v = p + o + 3;
        if (type == 0x02) {
            if (!take_str(d, &d->authority, v, tl, "AUTHORITY"))
                return false;
        } else if (type == 0x20) {
            if (d->ssl)
                BAD("duplicate SSL TLV");
            d->ssl = true;
            if (tl < 5)
                BAD("SSL TLV of %zu bytes, under 5", tl);
            d->client = v[0];
            d->verify = (uint32_t)v[1] << 24 | (uint32_t)v[2] << 16 |
                        (uint32_t)v[3] << 8 | v[4];
            size_t so = 5;
            while (so < tl) {
                if (tl - so < 3)
                    BAD("truncated sub-TLV in SSL TLV");
                uint8_t st = v[so];
                size_t sl = be16(v + so + 1);
                if (tl - so - 3 < sl)
                    BAD("sub-TLV 0x%02x overruns the SSL TLV", st);
                const uint8_t *sv = v + so + 3;
                bool ok = true;
                if (st == 0x21)
                    ok = take_str(d, &d->version, sv, sl, "SSL_VERSION");
                else if (st == 0x23)
                    ok = take_str(d, &d->cipher, sv, sl, "SSL_CIPHER");
                else if (st == 0x22)
                    ok = take_str(d, &d->cn, sv, sl, "SSL_CN");
                else
                    BAD("unexpected SSL sub-TLV 0x%02x", st);
                if (!ok)
                    return false;
                so += 3 + sl;
            }
        } else {
            BAD("unexpected TLV 0x%02x", type);
        }
        o += 3 + tl;
    }
    return true;
#undef BAD
}

static void check_str(const struct tstr *t, const char *want, const char *name)
{
    if (!want) {
        CHECK(!t->present, "%s present (\"%s\"), want it omitted", name,
              esc(t->v, t->len));
        return;
    }
    size_t wl = strlen(want);
    CHECK(t->present && t->len == wl && memcmp(t->v, want, wl) == 0,
          "%s %s\"%s\", want \"%s\"", name, t->present ? "" : "missing ",
          esc(t->v, t->len), esc(want, wl));
}

struct v2_case {
    const char *name;
    const char *src;
    unsigned sport;
    const char *dst;
    unsigned dport;
    bool with_tls;
    struct stp_tls_info tls;
};

static char long_sni[300];

static const struct v2_case v2_cases[] = {
    {"v4, no TLS", "192.0.2.1", 56324, "198.51.100.2", 25, false, {0}},
    {"v6, no TLS", "2001:db8::1", 41234, "2001:db8::25", 25, false, {0}},
    {"v4 ports 0/65535", "0.0.0.0", 0, "255.255.255.255", 65535, false, {0}},
    {"v4 port bytes 0x1234/0xABCD", "10.1.2.3", 0x1234, "10.3.2.1", 0xABCD,
     false, {0}},
    {"v6 mapped", "::ffff:192.0.2.1", 465, "::ffff:192.0.2.2", 25, false, {0}},
    {"v4, TLS all fields, verified cert", "192.0.2.1", 40000, "198.51.100.2",
     465, true,
     {"TLSv1.3", "TLS_AES_128_GCM_SHA256", "mail.example.com",
      "client.example.org", true}},
    {"v4, TLS, verified cert of a resumed session", "192.0.2.1", 40000,
     "198.51.100.2", 465, true,
     {"TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", NULL, "client.example.org",
      true, true}},
    {"v4, TLS, cert not verified", "192.0.2.1", 40000, "198.51.100.2", 465,
     true, {"TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", "mx.test", "bob", false}},
    {"v4, TLS, no client cert", "192.0.2.1", 40000, "198.51.100.2", 465, true,
     {"TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", "mx.test", NULL, false}},
    {"v4, TLS, all NULL", "192.0.2.1", 1, "198.51.100.2", 2, true,
     {NULL, NULL, NULL, NULL, false}},
    {"v4, TLS, SNI only", "192.0.2.1", 1, "198.51.100.2", 2, true,
     {NULL, NULL, "only.sni.test", NULL, false}},
    {"v4, TLS, no SNI", "192.0.2.1", 1, "198.51.100.2", 2, true,
     {"TLSv1.3", "TLS_AES_256_GCM_SHA384", NULL, "cn", true}},
    {"v4, TLS, empty strings", "192.0.2.1", 1, "198.51.100.2", 2, true,
     {"", "", "", "", true}},
    {"v6, TLS all fields", "2001:db8::1", 41234, "2001:db8::25", 465, true,
     {"TLSv1.3", "TLS_AES_128_GCM_SHA256", "mail.example.com",
      "CN=client,O=Example", true}},
    {"v6, TLS long SNI", "2001:db8::1", 1, "2001:db8::2", 2, true,
     {"TLSv1.3", "TLS_AES_128_GCM_SHA256", long_sni, NULL, false}},
};

static void check_v2(const struct v2_case *c, const uint8_t *p, size_t n)
{
    static struct v2_decoded d;
    if (!v2_decode(p, n, &d)) {
        failf("not a valid v2 header: %s", d.err);
        return;
    }
    union addr s = mk(c->src, c->sport), t = mk(c->dst, c->dport);
    CHECK(d.family == s.sa.sa_family, "family %d, want %d", d.family,
          s.sa.sa_family);
    if (s.sa.sa_family == AF_INET) {
        CHECK(memcmp(d.src, &s.in.sin_addr, 4) == 0, "source address");
        CHECK(memcmp(d.dst, &t.in.sin_addr, 4) == 0, "destination address");
    } else {
        CHECK(memcmp(d.src, &s.in6.sin6_addr, 16) == 0, "source address");
        CHECK(memcmp(d.dst, &t.in6.sin6_addr, 16) == 0, "destination address");
    }
    CHECK(d.sport == c->sport, "source port %u, want %u", d.sport, c->sport);
    CHECK(d.dport == c->dport, "destination port %u, want %u", d.dport,
          c->dport);
    if (!c->with_tls) {
        CHECK(!d.ssl && !d.authority.present, "TLVs without TLS info");
        CHECK(n == 16u + (d.family == AF_INET ? 12u : 36u),
              "%zu bytes, want just header + addresses", n);
        return;
    }
    const struct stp_tls_info *ti = &c->tls;
    check_str(&d.authority, ti->sni, "AUTHORITY");
    CHECK(d.ssl, "no PP2_TYPE_SSL TLV");
    if (!d.ssl)
        return;
    /* PP2_CLIENT_SSL; with a certificate PP2_CLIENT_CERT_SESS, and
     * PP2_CLIENT_CERT_CONN unless it came with a resumed session. */
    uint8_t want_client =
        0x01 | (ti->cn ? 0x04 : 0) | (ti->cn && !ti->cert_resumed ? 0x02 : 0);
    CHECK(d.client == want_client, "client flags 0x%02x, want 0x%02x",
          d.client, want_client);
    if (ti->cn && ti->cert_verified)
        CHECK(d.verify == 0, "verify %u for a verified certificate, want 0",
              d.verify);
    if (ti->cn && !ti->cert_verified)
        CHECK(d.verify != 0, "verify 0 for an unverified certificate");
    /* No certificate: the spec's words say non-zero, HAProxy itself sends
     * 0 with PP2_CLIENT_CERT_CONN clear; receivers must look at the flag.
     * Either is accepted (see the report). */
    check_str(&d.version, ti->version, "SSL_VERSION");
    check_str(&d.cipher, ti->cipher, "SSL_CIPHER");
    check_str(&d.cn, ti->cn, "SSL_CN");
}

static void test_v2(void)
{
    memset(long_sni, 'a', sizeof(long_sni) - 1);
    memcpy(long_sni + 100, ".example", 8);
    for (size_t i = 0; i < STP_ARRAY_LEN(v2_cases); i++) {
        const struct v2_case *c = &v2_cases[i];
        char name[160];
        snprintf(name, sizeof(name), "proxy v2: %s", c->name);
        case_begin(name);
        union addr s = mk(c->src, c->sport), d = mk(c->dst, c->dport);
        const struct stp_tls_info *ti = c->with_tls ? &c->tls : NULL;
        static char big[4096];
        memset(big, GUARD_BYTE, sizeof(big));
        int r = stp_proxy_v2(big, sizeof(big), &s.sa, &d.sa, ti);
        CHECK(r > 0, "returned %d", r);
        if (r > 0) {
            check_v2(c, (const uint8_t *)big, (size_t)r);
            struct call cl = {2, &s.sa, &d.sa, ti, NULL};
            /* binary: an exact-size buffer must do */
            cap_sweep(&cl, big, (size_t)r, (size_t)r, "v2");
        }
        case_end();
    }

    case_begin("proxy v2: mixed or unknown families give -EAFNOSUPPORT");
    {
        union addr v4 = mk("192.0.2.1", 1), v6 = mk("2001:db8::1", 2),
                   un = mk_unix();
        struct stp_tls_info ti = {"TLSv1.3", NULL, NULL, NULL, false};
        char buf[256];
        CHECK(stp_proxy_v2(buf, sizeof(buf), &v4.sa, &v6.sa, NULL) ==
                  -EAFNOSUPPORT, "v4 -> v6");
        CHECK(stp_proxy_v2(buf, sizeof(buf), &v6.sa, &v4.sa, &ti) ==
                  -EAFNOSUPPORT, "v6 -> v4");
        CHECK(stp_proxy_v2(buf, sizeof(buf), &un.sa, &un.sa, NULL) ==
                  -EAFNOSUPPORT, "unix -> unix");
    }
    case_end();

    case_begin("proxy v2: TLVs over 64 KiB give -ENOSPC, not a wrapped length");
    {
        union addr s = mk("192.0.2.1", 1), d = mk("192.0.2.2", 2);
        size_t cap = 300000;
        char *huge = malloc(70000), *b = guarded(cap);
        memset(huge, 'x', 69999);
        huge[69999] = 0;
        struct stp_tls_info one = {NULL, NULL, huge, NULL, false};
        CHECK(stp_proxy_v2(b, cap, &s.sa, &d.sa, &one) == -ENOSPC,
              "a 69999-byte SNI TLV was accepted");
        /* each TLV fits, the sum does not */
        huge[40000] = 0;
        struct stp_tls_info two = {NULL, NULL, huge, huge, false};
        int r = stp_proxy_v2(b, cap, &s.sa, &d.sa, &two);
        CHECK(r == -ENOSPC, "two 40000-byte TLVs: got %d, want -ENOSPC", r);
        CHECK(guard_intact(b, cap), "wrote past the capacity");
        free(huge);
        free(b);
    }
    case_end();
}

/* ---- xtext --------------------------------------------------------------- */

struct xtext_case {
    const char *in;
    const char *want;
};

static const struct xtext_case xtext_cases[] = {
    {"", ""},
    {"abc", "abc"},
    {"1.2.3.4", "1.2.3.4"},
    {"IPV6:2001:db8::1", "IPV6:2001:db8::1"},
    {"[UNAVAILABLE]", "[UNAVAILABLE]"},
    {"a+b", "a+2Bb"},
    {"a=b", "a+3Db"},
    {"+=", "+2B+3D"},
    {" ", "+20"},
    {"a b", "a+20b"},
    {"!~", "!~"},
    {"\"#$%&'()*,-./:;<>?@[\\]^_`{|}", "\"#$%&'()*,-./:;<>?@[\\]^_`{|}"},
    {"\x7f", "+7F"},
    {"\x01\t\r\n", "+01+09+0D+0A"},
    {"\x80\xff\xab", "+80+FF+AB"},
    {"caf\xc3\xa9", "caf+C3+A9"},
    {"x\r\nMAIL FROM:<a>", "x+0D+0AMAIL+20FROM:<a>"},
};

/* RFC 3461 decoding, to check the round trip. */
static int xtext_decode(const char *s, char *out, size_t cap)
{
    size_t o = 0;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (o + 1 >= cap || c < '!' || c > '~' || c == '=')
            return -1;
        if (c == '+') {
            unsigned v;
            if (sscanf(s + 1, "%2X", &v) != 1 || !s[1] || !s[2])
                return -1;
            out[o++] = (char)v;
            s += 2;
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = 0;
    return (int)o;
}

static void test_xtext(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(xtext_cases); i++) {
        const struct xtext_case *c = &xtext_cases[i];
        char name[160];
        snprintf(name, sizeof(name), "xtext \"%s\"", esc(c->in, strlen(c->in)));
        case_begin(name);
        char buf[256];
        size_t wl = strlen(c->want);
        int r = stp_xtext(buf, sizeof(buf), c->in);
        CHECK(r == (int)wl && strcmp(buf, c->want) == 0,
              "got %d \"%s\", want \"%s\"", r,
              r >= 0 ? esc(buf, (size_t)r) : "", c->want);
        char back[256];
        if (r >= 0)
            CHECK(xtext_decode(buf, back, sizeof(back)) ==
                          (int)strlen(c->in) && strcmp(back, c->in) == 0,
                  "does not decode back to the input");
        struct call cl = {4, NULL, NULL, NULL, c->in};
        /* xtext NUL-terminates: it needs len + 1 (cap == len must fail) */
        cap_sweep(&cl, c->want, wl, wl + 1, "xtext");
        if (r >= 0) {
            char *b = guarded(wl);
            CHECK(stp_xtext(b, wl, c->in) == -ENOSPC,
                  "cap == length (no room for the NUL) was accepted");
            free(b);
        }
        case_end();
    }

    case_begin("xtext: every single byte");
    for (int c = 1; c < 256; c++) {
        char in[2] = {(char)c, 0}, out[8], want[8];
        bool plain = c >= '!' && c <= '~' && c != '+' && c != '=';
        if (plain)
            snprintf(want, sizeof(want), "%c", c);
        else
            snprintf(want, sizeof(want), "+%02X", (unsigned)c);
        int r = stp_xtext(out, sizeof(out), in);
        CHECK(r == (int)strlen(want) && strcmp(out, want) == 0,
              "byte 0x%02x: got %d \"%s\", want \"%s\"", (unsigned)c, r,
              r >= 0 ? esc(out, (size_t)r) : "", want);
    }
    case_end();
}

/* ---- XCLIENT line -------------------------------------------------------- */

struct xclient_case {
    const char *addr;
    unsigned port;
    const char *want;
};

static const struct xclient_case xclient_cases[] = {
    {"1.2.3.4", 5678, "XCLIENT ADDR=1.2.3.4 PORT=5678 NAME=[UNAVAILABLE]"},
    {"192.0.2.100", 0, "XCLIENT ADDR=192.0.2.100 PORT=0 NAME=[UNAVAILABLE]"},
    {"255.255.255.255", 65535,
     "XCLIENT ADDR=255.255.255.255 PORT=65535 NAME=[UNAVAILABLE]"},
    {"2001:db8::1", 41234,
     "XCLIENT ADDR=IPV6:2001:db8::1 PORT=41234 NAME=[UNAVAILABLE]"},
    {"::1", 25, "XCLIENT ADDR=IPV6:::1 PORT=25 NAME=[UNAVAILABLE]"},
    {"::ffff:192.0.2.1", 25,
     "XCLIENT ADDR=IPV6:::ffff:192.0.2.1 PORT=25 NAME=[UNAVAILABLE]"},
    {"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535,
     "XCLIENT ADDR=IPV6:ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff PORT=65535 "
     "NAME=[UNAVAILABLE]"},
};

static void test_xclient(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(xclient_cases); i++) {
        const struct xclient_case *c = &xclient_cases[i];
        char name[160];
        snprintf(name, sizeof(name), "xclient %s port %u", c->addr, c->port);
        case_begin(name);
        union addr a = mk(c->addr, c->port);
        char buf[512];
        int r = stp_xclient_line(buf, sizeof(buf), &a.sa);
        size_t wl = strlen(c->want);
        CHECK(r == (int)wl && memcmp(buf, c->want, wl) == 0,
              "got %d \"%s\", want \"%s\"", r, r > 0 ? esc(buf, (size_t)r) : "",
              c->want);
        if (r > 0) {
            size_t n = (size_t)r;
            CHECK(!memchr(buf, '\r', n) && !memchr(buf, '\n', n) &&
                      !memchr(buf, '\0', n),
                  "CR/LF/NUL in the line");
            CHECK(buf[r] == '\0', "not NUL-terminated");
            CHECK(r + 2 <= 512, "longer than an SMTP command line");
            /* upstream.c builds it into 256 bytes */
            CHECK(r < 256, "does not fit the caller's 256-byte buffer");
        }
        struct call cl = {3, &a.sa, NULL, NULL, NULL};
        cap_sweep(&cl, c->want, wl, wl + 1, "xclient");
        case_end();
    }

    case_begin("xclient: unknown family gives -EAFNOSUPPORT");
    {
        union addr un = mk_unix();
        char buf[256];
        CHECK(stp_xclient_line(buf, sizeof(buf), &un.sa) == -EAFNOSUPPORT,
              "AF_UNIX accepted");
    }
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    test_v1();
    test_v2();
    test_xtext();
    test_xclient();
    return unit_summary();
}
