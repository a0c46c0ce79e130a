/* PROXY protocol headers as a listener receives them (proxy_header.h).
 * Strict where the spec is: a receiver must never guess whether a header is
 * there, and must drop a connection whose header is not valid. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>

#include "proxy_header.h"

static int fail(struct stp_pp_result *out, int err, const char *reason)
{
    out->reason = reason;
    return err;
}

/* ---- v1: "PROXY TCP4 SRC DST SPORT DPORT\r\n" ------------------------------ */

/* Exactly 4 decimal numbers 0..255, one dot between them, no heading zero
 * (it could be read as octal). */
static bool v1_ipv4(const char *s, size_t n, struct in_addr *a)
{
    uint8_t b[4];
    size_t i = 0;
    for (int part = 0; part < 4; part++) {
        if (part > 0 && (i >= n || s[i++] != '.'))
            return false;
        size_t start = i;
        unsigned v = 0;
        while (i < n && s[i] >= '0' && s[i] <= '9' && i - start < 3)
            v = v * 10 + (unsigned)(s[i++] - '0');
        size_t digits = i - start;
        if (digits == 0 || v > 255 || (digits > 1 && s[start] == '0'))
            return false;
        b[part] = (uint8_t)v;
    }
    if (i != n)
        return false;
    memcpy(a, b, 4);
    return true;
}

static bool v1_ipv6(const char *s, size_t n, struct in6_addr *a)
{
    char buf[INET6_ADDRSTRLEN];
    /* The spec shows hexadecimal groups only, but haproxy on a dual-stack
     * socket writes IPv4 clients as ::ffff:a.b.c.d: inet_pton's forms. */
    if (n == 0 || n >= sizeof(buf))
        return false;
    memcpy(buf, s, n);
    buf[n] = '\0';
    return inet_pton(AF_INET6, buf, a) == 1;
}

/* 0..65535 in decimal, no heading zero. */
static bool v1_port(const char *s, size_t n, uint16_t *port)
{
    unsigned v = 0;
    if (n == 0 || n > 5 || (n > 1 && s[0] == '0'))
        return false;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v > 65535)
        return false;
    *port = htons((uint16_t)v);
    return true;
}

/* The complete line L (N bytes, CRLF excluded). */
static int v1_fields(const char *l, size_t n, struct stp_pp_result *out)
{
    const char *tok[5]; /* protocol, addresses, ports */
    size_t len[5];
    int k = 0;
    size_t i = 6; /* after "PROXY " */
    for (;;) {
        size_t start = i;
        while (i < n && l[i] != ' ')
            i++;
        if (i == start)
            return fail(out, -EPROTO, "v1: empty field");
        if (k == 0 && i - start == 7 && memcmp(l + start, "UNKNOWN", 7) == 0) {
            /* The receiver must ignore anything after it. */
            out->local = true;
            return 0;
        }
        if (k == 5)
            return fail(out, -EPROTO, "v1: too many fields");
        tok[k] = l + start;
        len[k++] = i - start;
        if (i == n)
            break;
        i++; /* exactly one space */
    }
    bool v4 = len[0] == 4 && memcmp(tok[0], "TCP4", 4) == 0;
    bool v6 = len[0] == 4 && memcmp(tok[0], "TCP6", 4) == 0;
    if (!v4 && !v6)
        return fail(out, -EPROTO, "v1: protocol not TCP4, TCP6 or UNKNOWN");
    if (k != 5)
        return fail(out, -EPROTO, "v1: missing fields");
    uint16_t sp, dp;
    if (!v1_port(tok[3], len[3], &sp) || !v1_port(tok[4], len[4], &dp))
        return fail(out, -EPROTO, "v1: bad port");
    memset(&out->src, 0, sizeof(out->src));
    memset(&out->dst, 0, sizeof(out->dst));
    if (v4) {
        struct sockaddr_in *s = (void *)&out->src, *d = (void *)&out->dst;
        if (!v1_ipv4(tok[1], len[1], &s->sin_addr) ||
            !v1_ipv4(tok[2], len[2], &d->sin_addr))
            return fail(out, -EPROTO, "v1: bad IPv4 address");
        s->sin_family = d->sin_family = AF_INET;
        s->sin_port = sp;
        d->sin_port = dp;
    } else {
        struct sockaddr_in6 *s = (void *)&out->src, *d = (void *)&out->dst;
        if (!v1_ipv6(tok[1], len[1], &s->sin6_addr) ||
            !v1_ipv6(tok[2], len[2], &d->sin6_addr))
            return fail(out, -EPROTO, "v1: bad IPv6 address");
        s->sin6_family = d->sin6_family = AF_INET6;
        s->sin6_port = sp;
        d->sin6_port = dp;
    }
    return 0;
}

static int parse_v1(const char *p, size_t n, struct stp_pp_result *out)
{
    static const char sig[] = "PROXY ";
    if (memcmp(p, sig, n < 6 ? n : 6) != 0)
        return fail(out, -EPROTO, "v1: does not start with \"PROXY \"");
    /* The CRLF must come within the first 107 bytes; no lone CR or LF. */
    size_t lim = n < STP_PP_V1_MAX ? n : STP_PP_V1_MAX;
    for (size_t i = 0; i < lim; i++) {
        if (p[i] == '\n')
            return fail(out, -EPROTO, "v1: LF without CR");
        if (p[i] != '\r')
            continue;
        if (i + 2 > STP_PP_V1_MAX)
            break;
        if (i + 1 == n)
            return 0; /* the LF may follow */
        if (p[i + 1] != '\n')
            return fail(out, -EPROTO, "v1: CR without LF");
        out->version = 1;
        int r = v1_fields(p, i, out);
        if (r < 0)
            return r;
        out->len = i + 2;
        return (int)out->len;
    }
    if (lim == STP_PP_V1_MAX)
        return fail(out, -EMSGSIZE, "v1: no CRLF within 107 bytes");
    return 0;
}

/* ---- v2: binary ------------------------------------------------------------- */

static const uint8_t v2_sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                   0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

static int parse_v2(const uint8_t *p, size_t n, struct stp_pp_result *out)
{
    if (memcmp(p, v2_sig, n < 12 ? n : 12) != 0)
        return fail(out, -EPROTO, "v2: bad signature");
    if (n > 12 && p[12] >> 4 != 2)
        return fail(out, -EPROTO, "v2: version not 2");
    if (n > 12 && (p[12] & 15) > 1)
        return fail(out, -EPROTO, "v2: command not LOCAL or PROXY");
    /* Family (high nibble) UNSPEC, INET, INET6, UNIX; transport (low)
     * UNSPEC, STREAM, DGRAM: UNSPEC only with UNSPEC. */
    uint8_t fam = n > 13 ? p[13] >> 4 : 0, tr = n > 13 ? p[13] & 15 : 0;
    if (n > 13 && (fam > 3 || tr > 2 || (fam == 0) != (tr == 0)))
        return fail(out, -EPROTO, "v2: unknown address family or transport");
    if (n < 16)
        return 0;
    size_t len = (size_t)p[14] << 8 | p[15];
    if (16 + len > STP_PP_V2_MAX)
        return fail(out, -EMSGSIZE, "v2: header over 4096 bytes");
    bool local = (p[12] & 15) == 0;
    static const size_t need[4] = {0, 12, 36, 216};
    /* LOCAL: the block is discarded, family included. */
    size_t alen = local ? 0 : need[fam];
    if (len < alen)
        return fail(out, -EPROTO,
                    "v2: address block shorter than its family needs");
    if (n < 16 + len)
        return 0;
    /* TLVs are skipped, but must tile the rest exactly. */
    for (size_t o = 16 + alen; !local && o < 16 + len;) {
        if (16 + len - o < 3 ||
            16 + len - o - 3 < ((size_t)p[o + 1] << 8 | p[o + 2]))
            return fail(out, -EPROTO, "v2: TLV overruns the header");
        o += 3 + ((size_t)p[o + 1] << 8 | p[o + 2]);
    }
    out->version = 2;
    out->local = local || fam == 0 || fam == 3;
    const uint8_t *a = p + 16;
    if (!out->local) {
        memset(&out->src, 0, sizeof(out->src));
        memset(&out->dst, 0, sizeof(out->dst));
    }
    if (!out->local && fam == 1) {
        struct sockaddr_in *s = (void *)&out->src, *d = (void *)&out->dst;
        s->sin_family = d->sin_family = AF_INET;
        memcpy(&s->sin_addr, a, 4);
        memcpy(&d->sin_addr, a + 4, 4);
        memcpy(&s->sin_port, a + 8, 2);
        memcpy(&d->sin_port, a + 10, 2);
    } else if (!out->local && fam == 2) {
        struct sockaddr_in6 *s = (void *)&out->src, *d = (void *)&out->dst;
        s->sin6_family = d->sin6_family = AF_INET6;
        memcpy(&s->sin6_addr, a, 16);
        memcpy(&d->sin6_addr, a + 16, 16);
        memcpy(&s->sin6_port, a + 32, 2);
        memcpy(&d->sin6_port, a + 34, 2);
    }
    out->len = 16 + len;
    return (int)out->len;
}

int stp_pp_parse(const char *p, size_t n, unsigned versions,
                 struct stp_pp_result *out)
{
    out->version = 0;
    out->local = false;
    out->len = 0;
    out->reason = NULL;
    if (n == 0)
        return 0;
    /* The first byte tells the versions apart: 'P' or CR. */
    if (versions == (STP_PP_V1 | STP_PP_V2) && p[0] != 'P' && p[0] != '\r')
        return fail(out, -EPROTO, "neither a v1 nor a v2 header");
    if ((versions & STP_PP_V1) && (p[0] == 'P' || !(versions & STP_PP_V2)))
        return parse_v1(p, n, out);
    if (versions & STP_PP_V2)
        return parse_v2((const uint8_t *)p, n, out);
    return fail(out, -EPROTO, "PROXY protocol not enabled");
}
