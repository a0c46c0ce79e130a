/* PROXY protocol headers and XCLIENT lines (HAProxy's proxy-protocol.txt,
 * Postfix's XCLIENT_README). Everything here comes from the kernel or the
 * TLS library, never from the client's words, so a client cannot forge it. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "identity.h"

static void addr_text(const struct sockaddr *sa, char *buf, size_t len,
                      unsigned *port)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        inet_ntop(AF_INET, &in->sin_addr, buf, (socklen_t)len);
        *port = ntohs(in->sin_port);
    } else {
        const struct sockaddr_in6 *in6 = (const void *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, buf, (socklen_t)len);
        *port = ntohs(in6->sin6_port);
    }
}

static bool same_family(const struct sockaddr *a, const struct sockaddr *b)
{
    return a->sa_family == b->sa_family &&
           (a->sa_family == AF_INET || a->sa_family == AF_INET6);
}

int stp_proxy_v1(char *buf, size_t cap, const struct sockaddr *src,
                 const struct sockaddr *dst)
{
    char s[INET6_ADDRSTRLEN], d[INET6_ADDRSTRLEN];
    unsigned sp, dp;
    if (!same_family(src, dst))
        return -EAFNOSUPPORT;
    addr_text(src, s, sizeof(s), &sp);
    addr_text(dst, d, sizeof(d), &dp);
    int n = snprintf(buf, cap, "PROXY %s %s %s %u %u\r\n",
                     src->sa_family == AF_INET ? "TCP4" : "TCP6", s, d, sp, dp);
    return n < 0 || (size_t)n >= cap ? -ENOSPC : n;
}

static const uint8_t v2_sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                   0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

enum {
    PP2_TYPE_AUTHORITY = 0x02,
    PP2_TYPE_SSL = 0x20,
    PP2_SUBTYPE_SSL_VERSION = 0x21,
    PP2_SUBTYPE_SSL_CN = 0x22,
    PP2_SUBTYPE_SSL_CIPHER = 0x23,
    PP2_CLIENT_SSL = 0x01,
    PP2_CLIENT_CERT_CONN = 0x02,
    PP2_CLIENT_CERT_SESS = 0x04,
};

/* As HAProxy: CERT_SESS for a session with a client certificate, CERT_CONN
 * when it was sent on this connection (a full handshake, not a resumed
 * one). */
static uint8_t client_bits(const struct stp_tls_info *tls)
{
    if (!tls->cn)
        return PP2_CLIENT_SSL;
    return PP2_CLIENT_SSL | PP2_CLIENT_CERT_SESS |
           (tls->cert_resumed ? 0 : PP2_CLIENT_CERT_CONN);
}

/* Append one TLV; false when it does not fit. */
static bool tlv(uint8_t *buf, size_t cap, size_t *o, uint8_t type,
                const void *v, size_t len)
{
    if (len > 0xffff || *o + 3 + len > cap)
        return false;
    buf[*o] = type;
    buf[*o + 1] = (uint8_t)(len >> 8);
    buf[*o + 2] = (uint8_t)len;
    memcpy(buf + *o + 3, v, len);
    *o += 3 + len;
    return true;
}

static bool tlv_str(uint8_t *buf, size_t cap, size_t *o, uint8_t type,
                    const char *s)
{
    return !s || tlv(buf, cap, o, type, s, strlen(s));
}

int stp_proxy_v2(char *out, size_t cap, const struct sockaddr *src,
                 const struct sockaddr *dst, const struct stp_tls_info *tls)
{
    uint8_t *buf = (uint8_t *)out;
    size_t o = 16;
    if (!same_family(src, dst))
        return -EAFNOSUPPORT;
    if (cap < 16 + (src->sa_family == AF_INET ? 12u : 36u))
        return -ENOSPC;
    memcpy(buf, v2_sig, sizeof(v2_sig));
    buf[12] = 0x21; /* version 2, PROXY */
    if (src->sa_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)src, *d = (const void *)dst;
        buf[13] = 0x11; /* TCP over IPv4 */
        memcpy(buf + o, &s->sin_addr, 4);
        memcpy(buf + o + 4, &d->sin_addr, 4);
        memcpy(buf + o + 8, &s->sin_port, 2);
        memcpy(buf + o + 10, &d->sin_port, 2);
        o += 12;
    } else {
        const struct sockaddr_in6 *s = (const void *)src,
                                  *d = (const void *)dst;
        buf[13] = 0x21; /* TCP over IPv6 */
        memcpy(buf + o, &s->sin6_addr, 16);
        memcpy(buf + o + 16, &d->sin6_addr, 16);
        memcpy(buf + o + 32, &s->sin6_port, 2);
        memcpy(buf + o + 34, &d->sin6_port, 2);
        o += 36;
    }
    if (tls) {
        if (!tlv_str(buf, cap, &o, PP2_TYPE_AUTHORITY, tls->sni))
            return -ENOSPC;
        /* PP2_TYPE_SSL: client flags, verify result, then sub-TLVs. */
        size_t ssl = o;
        if (o + 3 + 5 > cap)
            return -ENOSPC;
        o += 3;
        buf[o] = client_bits(tls);
        /* 0 only for a certificate presented and verified (the spec). */
        uint32_t verify = tls->cn && tls->cert_verified ? 0 : 1;
        buf[o + 1] = (uint8_t)(verify >> 24);
        buf[o + 2] = (uint8_t)(verify >> 16);
        buf[o + 3] = (uint8_t)(verify >> 8);
        buf[o + 4] = (uint8_t)verify;
        o += 5;
        if (!tlv_str(buf, cap, &o, PP2_SUBTYPE_SSL_VERSION, tls->version) ||
            !tlv_str(buf, cap, &o, PP2_SUBTYPE_SSL_CIPHER, tls->cipher) ||
            !tlv_str(buf, cap, &o, PP2_SUBTYPE_SSL_CN, tls->cn))
            return -ENOSPC;
        size_t len = o - ssl - 3;
        buf[ssl] = PP2_TYPE_SSL;
        buf[ssl + 1] = (uint8_t)(len >> 8);
        buf[ssl + 2] = (uint8_t)len;
    }
    size_t len = o - 16;
    if (len > 0xffff)
        return -ENOSPC;
    buf[14] = (uint8_t)(len >> 8);
    buf[15] = (uint8_t)len;
    return (int)o;
}

int stp_xtext(char *buf, size_t cap, const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    if (cap == 0)
        return -ENOSPC;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        bool plain = c >= '!' && c <= '~' && c != '+' && c != '=';
        if (o + (plain ? 1 : 3) >= cap)
            return -ENOSPC;
        if (plain) {
            buf[o++] = (char)c;
        } else {
            buf[o++] = '+';
            buf[o++] = hex[c >> 4];
            buf[o++] = hex[c & 15];
        }
    }
    buf[o] = '\0';
    return (int)o;
}

int stp_xclient_line(char *buf, size_t cap, const struct sockaddr *src)
{
    char a[INET6_ADDRSTRLEN + 5], x[3 * sizeof(a)];
    unsigned port;
    if (src->sa_family != AF_INET && src->sa_family != AF_INET6)
        return -EAFNOSUPPORT;
    /* Postfix wants IPv6 addresses as "IPV6:..." */
    size_t pre = 0;
    if (src->sa_family == AF_INET6) {
        memcpy(a, "IPV6:", 5);
        pre = 5;
    }
    addr_text(src, a + pre, sizeof(a) - pre, &port);
    if (stp_xtext(x, sizeof(x), a) < 0)
        return -ENOSPC;
    /* The proxy does no DNS: the name is honestly unknown. */
    int n = snprintf(buf, cap, "XCLIENT ADDR=%s PORT=%u NAME=[UNAVAILABLE]",
                     x, port);
    return n < 0 || (size_t)n >= cap ? -ENOSPC : n;
}
