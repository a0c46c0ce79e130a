/* Configuration values: numbers, durations, socket addresses. */
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>

#include "config.h"
#include "config_parser.h"
#include "stp.h"

/* Decimal digits only: strtoul would accept blanks, signs and "0x". */
int stp_parse_uint(const char **s, uint64_t max, uint64_t *out)
{
    const char *c = *s;
    uint64_t v = 0;
    if (!isdigit((unsigned char)*c))
        return -EINVAL;
    for (; isdigit((unsigned char)*c); c++) {
        unsigned d = (unsigned)(*c - '0');
        if (v > (max - d) / 10)
            return -EINVAL;
        v = v * 10 + d;
    }
    *s = c;
    *out = v;
    return 0;
}

int stp_parse_duration(const char *text, uint64_t *ms)
{
    static const struct { const char *unit; uint64_t ms; } units[] = {
        {"", 1000}, {"ms", 1}, {"s", 1000}, {"m", 60 * 1000},
        {"h", 60 * 60 * 1000},
    };
    uint64_t v;
    if (stp_parse_uint(&text, UINT64_MAX, &v) < 0)
        return -EINVAL;
    for (size_t i = 0; i < STP_ARRAY_LEN(units); i++) {
        if (strcmp(text, units[i].unit) != 0)
            continue;
        if (v > UINT64_MAX / units[i].ms)
            return -EINVAL;
        *ms = v * units[i].ms;
        return 0;
    }
    return -EINVAL;
}

int stp_parse_hostport(const char *text, struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    const char *colon;
    const char *h = text;
    bool v6 = text[0] == '[';

    if (v6) {
        const char *close = strchr(text, ']');
        if (close == NULL || close[1] != ':')
            return -EINVAL;
        h = text + 1;
        colon = close + 1;
    } else {
        colon = strrchr(text, ':');
        /* A second colon means IPv6 without brackets: the port is ambiguous. */
        if (colon == NULL || memchr(text, ':', (size_t)(colon - text)))
            return -EINVAL;
    }
    size_t hlen = (size_t)(colon - h) - (v6 ? 1 : 0);
    if (hlen == 0 || hlen >= sizeof(host))
        return -EINVAL;
    memcpy(host, h, hlen);
    host[hlen] = '\0';

    const char *port_text = colon + 1;
    uint64_t port;
    if (stp_parse_uint(&port_text, 65535, &port) < 0 || *port_text != '\0')
        return -EINVAL;

    memset(ss, 0, sizeof(*ss));
    if (v6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
            return -EINVAL;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
            return -EINVAL;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
    }
    return 0;
}

bool stp_valid_dns_name(const char *text)
{
    static const char ldh[] = "abcdefghijklmnopqrstuvwxyz"
                              "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-";
    size_t n = strlen(text);
    if (n == 0 || n > 253)
        return false;
    const char *label = text, *last = text;
    for (;;) {
        size_t l = strcspn(label, ".");
        if (l == 0 || l > 63 || label[0] == '-' || label[l - 1] == '-' ||
            strspn(label, ldh) < l)
            return false; /* "a..b", "a.", "-a", "a_b" */
        last = label;
        if (label[l] == '\0')
            break;
        label += l + 1;
    }
    /* "1.2.3", "10.1" or "0x7f.1" are no names: getaddrinfo() would take
     * them as IPv4 addresses (inet_aton's forms), not what was meant. */
    struct in_addr a;
    return strspn(last, "0123456789") != strlen(last) && inet_aton(text, &a) == 0;
}

/* PORT: 1..65535, digits only. */
static int parse_port(const char *text, uint16_t *port)
{
    uint64_t v;
    if (stp_parse_uint(&text, 65535, &v) < 0 || *text != '\0' || v == 0)
        return -EINVAL;
    *port = (uint16_t)v;
    return 0;
}

int stp_parse_hop(const char *text, size_t len, struct stp_hop_addr *out)
{
    char buf[256 + 8]; /* a 253-character name and a port */
    memset(out, 0, sizeof(*out));
    if (len == 0 || len >= sizeof(buf))
        return -EINVAL;
    memcpy(buf, text, len);
    buf[len] = '\0';
    char *colon = strrchr(buf, ':');
    if (colon == NULL)
        return -EINVAL;
    *colon = '\0';
    const char *host = buf;
    bool v6 = buf[0] == '[';
    struct in_addr a4;
    if (v6 || inet_pton(AF_INET, buf, &a4) == 1) {
        *colon = ':';
        if (stp_parse_hostport(buf, &out->addr) < 0 ||
            (out->port = stp_addr_port(&out->addr)) == 0)
            return -EINVAL;
        /* The host as written: before the ':', inside the brackets. */
        host = buf + v6;
        *(v6 ? colon - 1 : colon) = '\0';
    } else if (!stp_valid_dns_name(buf) || parse_port(colon + 1, &out->port) < 0) {
        return -EINVAL;
    } else {
        out->is_name = true;
    }
    if ((out->host = strdup(host)) == NULL)
        return -ENOMEM;
    return 0;
}

int stp_parse_source(const char *text, enum stp_source *mode,
                     struct sockaddr_storage *addr)
{
    if (strcasecmp(text, "none") == 0) {
        *mode = STP_SRC_NONE;
        return 0;
    }
    if (strcasecmp(text, "client") == 0) {
        *mode = STP_SRC_CLIENT;
        return 0;
    }
    /* Brackets are accepted around IPv6, as in HOST:PORT. */
    char host[INET6_ADDRSTRLEN];
    size_t n = strlen(text);
    if (n >= 2 && text[0] == '[' && text[n - 1] == ']') {
        text++;
        n -= 2;
    }
    if (n == 0 || n >= sizeof(host))
        return -EINVAL;
    memcpy(host, text, n);
    host[n] = '\0';
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &sin->sin_addr) == 1)
        sin->sin_family = AF_INET;
    else if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1)
        sin6->sin6_family = AF_INET6;
    else
        return -EINVAL;
    *mode = STP_SRC_ADDRESS;
    *addr = ss;
    return 0;
}

int stp_parse_cidr(const char *text, struct stp_cidr *out)
{
    char host[INET6_ADDRSTRLEN];
    const char *slash = strchr(text, '/');
    size_t hlen = slash ? (size_t)(slash - text) : strlen(text);
    if (hlen == 0 || hlen >= sizeof(host))
        return -EINVAL;
    memcpy(host, text, hlen);
    host[hlen] = '\0';
    memset(out, 0, sizeof(*out));
    if (inet_pton(AF_INET, host, out->addr) == 1)
        out->family = AF_INET;
    else if (inet_pton(AF_INET6, host, out->addr) == 1)
        out->family = AF_INET6;
    else
        return -EINVAL;
    uint64_t max = out->family == AF_INET ? 32 : 128, bits = max;
    if (slash) {
        const char *b = slash + 1;
        if (stp_parse_uint(&b, max, &bits) < 0 || *b != '\0')
            return -EINVAL;
    }
    out->bits = (uint8_t)bits;
    for (unsigned i = 0; i < 16; i++) {
        unsigned keep = bits >= 8 * (i + 1) ? 8 : bits > 8 * i ? bits - 8 * i : 0;
        out->addr[i] &= (uint8_t)(0xff00u >> keep);
    }
    return 0;
}

static bool prefix_eq(const uint8_t *a, const uint8_t *b, unsigned bits)
{
    if (memcmp(a, b, bits / 8) != 0)
        return false;
    uint8_t mask = (uint8_t)(0xff00u >> (bits % 8));
    return bits % 8 == 0 || ((a[bits / 8] ^ b[bits / 8]) & mask) == 0;
}

bool stp_cidr_match(const struct stp_cidr *v, int n,
                    const struct sockaddr_storage *a)
{
    const uint8_t *ip;
    int family = a->ss_family;
    if (family == AF_INET) {
        ip = (const uint8_t *)&((const struct sockaddr_in *)a)->sin_addr;
    } else if (family == AF_INET6) {
        const struct in6_addr *in6 = &((const struct sockaddr_in6 *)a)->sin6_addr;
        ip = in6->s6_addr;
        /* A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d. */
        if (IN6_IS_ADDR_V4MAPPED(in6)) {
            family = AF_INET;
            ip += 12;
        }
    } else {
        return false;
    }
    for (int i = 0; i < n; i++)
        if (v[i].family == family && prefix_eq(v[i].addr, ip, v[i].bits))
            return true;
    return false;
}

uint16_t stp_addr_port(const struct sockaddr_storage *ss)
{
    return ntohs(ss->ss_family == AF_INET
                     ? ((const struct sockaddr_in *)ss)->sin_port
                     : ((const struct sockaddr_in6 *)ss)->sin6_port);
}

void stp_addr_set_port(struct sockaddr_storage *ss, uint16_t port)
{
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = htons(port);
    else if (ss->ss_family == AF_INET6)
        ((struct sockaddr_in6 *)ss)->sin6_port = htons(port);
}

/* Family, address and port: what bind() is given, whatever else the structs
 * carry. */
bool stp_same_addr(const struct sockaddr_storage *a,
                   const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port &&
               x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return x->sin6_port == y->sin6_port &&
           memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
}

static bool addr_any(const struct sockaddr_storage *a)
{
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr == INADDR_ANY;
    return IN6_IS_ADDR_UNSPECIFIED(&((const struct sockaddr_in6 *)a)->sin6_addr);
}

bool stp_addr_overlaps(const struct sockaddr_storage *a,
                       const struct sockaddr_storage *b)
{
    if (stp_addr_port(a) == 0 || stp_addr_port(a) != stp_addr_port(b))
        return false;
    if (stp_same_addr(a, b))
        return true;
    /* [::] takes IPv4 too (the proxy clears IPV6_V6ONLY); 0.0.0.0 every
     * IPv4 address. */
    if ((a->ss_family == AF_INET6 && addr_any(a)) ||
        (b->ss_family == AF_INET6 && addr_any(b)))
        return true;
    return a->ss_family == b->ss_family && (addr_any(a) || addr_any(b));
}

void stp_format_addr(const struct sockaddr *sa, char *buf, size_t len)
{
    char host[INET6_ADDRSTRLEN];
    if (len == 0)
        return;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
        snprintf(buf, len, "%s:%u", host, ntohs(sin->sin_port));
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
        snprintf(buf, len, "[%s]:%u", host, ntohs(sin6->sin6_port));
    } else {
        snprintf(buf, len, "?");
    }
}
