/* Reassembling the ClientHello (RFC 8446 5.1: handshake messages may be
 * fragmented over records) and reading the two extensions the proxy uses. */
#include <string.h>

#include "tls_hello.h"

enum {
    REC_HANDSHAKE = 22,
    HS_CLIENT_HELLO = 1,
    EXT_SERVER_NAME = 0,
    EXT_SUPPORTED_GROUPS = 10,
    REC_MAX = 16384,
};

static uint32_t be(const uint8_t *p, int n)
{
    uint32_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* A bounded reader over the ClientHello body. */
struct rd {
    const uint8_t *p;
    size_t n;
    bool bad;
};

static const uint8_t *take(struct rd *r, size_t n)
{
    if (r->bad || r->n < n) {
        r->bad = true;
        return NULL;
    }
    const uint8_t *p = r->p;
    r->p += n;
    r->n -= n;
    return p;
}

static uint32_t num(struct rd *r, int n)
{
    const uint8_t *p = take(r, (size_t)n);
    return p ? be(p, n) : 0;
}

/* A vector with an N-byte length prefix, as its own reader. */
static struct rd vec(struct rd *r, int n)
{
    size_t len = num(r, n);
    const uint8_t *p = take(r, len);
    return (struct rd){p, p ? len : 0, p == NULL};
}

static void server_name(struct stp_hello *h, struct rd e)
{
    struct rd list = vec(&e, 2);
    while (!list.bad && list.n > 0) {
        uint32_t type = num(&list, 1);
        struct rd name = vec(&list, 2);
        if (!name.bad && type == 0 && name.n < sizeof(h->sni) &&
            memchr(name.p, '\0', name.n) == NULL) {
            memcpy(h->sni, name.p, name.n);
            h->sni[name.n] = '\0';
            return;
        }
    }
}

/* Only the groups `groups` can name are kept (secp256r1, secp384r1,
 * secp521r1, x25519, x448), once each: a client that lists dozens of
 * others (GREASE, FFDHE, post-quantum) before an allowed one still has it
 * seen, however long its list. */
static bool group_known(uint16_t g)
{
    return g == 23 || g == 24 || g == 25 || g == 29 || g == 30;
}

static void groups(struct stp_hello *h, struct rd e)
{
    struct rd list = vec(&e, 2);
    h->has_groups = true;
    while (!list.bad && list.n >= 2) {
        uint16_t g = (uint16_t)num(&list, 2);
        bool seen = false;
        for (int i = 0; i < h->n_groups; i++)
            seen |= h->groups[i] == g;
        if (group_known(g) && !seen && h->n_groups < STP_HELLO_MAX_GROUPS)
            h->groups[h->n_groups++] = g;
    }
}

/* MSG: the ClientHello body (after its 4-byte header). */
static void parse(struct stp_hello *h, const uint8_t *msg, size_t len)
{
    struct rd r = {msg, len, false};
    take(&r, 2 + 32);  /* legacy_version, random */
    vec(&r, 1);        /* legacy_session_id */
    vec(&r, 2);        /* cipher_suites */
    vec(&r, 1);        /* legacy_compression_methods */
    struct rd exts = r.n > 0 ? vec(&r, 2) : (struct rd){NULL, 0, r.bad};
    if (exts.bad)
        return;
    while (exts.n > 0) {
        uint32_t type = num(&exts, 2);
        struct rd e = vec(&exts, 2);
        if (exts.bad)
            return;
        if (type == EXT_SERVER_NAME)
            server_name(h, e);
        else if (type == EXT_SUPPORTED_GROUPS)
            groups(h, e);
    }
    h->parsed = true;
}

static bool decide(struct stp_hello *h, size_t out_len)
{
    h->decided = true;
    h->out_len = out_len;
    return true;
}

/* The first N payload bytes of the records in buf[0..end), gathered at
 * buf + 5 over the record headers after the first (never ahead of where
 * they are read, so in place). */
static void gather(struct stp_hello *h, size_t end)
{
    size_t w = 5;
    for (size_t pos = 0; pos < end;) {
        size_t len = be(h->buf + pos + 3, 2);
        memmove(h->buf + w, h->buf + pos + 5, len);
        w += len;
        pos += 5 + len;
    }
}

bool stp_hello_add(struct stp_hello *h, size_t n)
{
    size_t pos = 0, payload = 0, records = 0;
    uint8_t head[4];

    h->len += n;
    /* Walk the complete records; the message header may span several. */
    while (pos + 5 <= h->len) {
        const uint8_t *rec = h->buf + pos;
        size_t len = be(rec + 3, 2);
        if (rec[0] != REC_HANDSHAKE || rec[1] != 3 || len == 0 || len > REC_MAX)
            return decide(h, h->len); /* not for us to judge: wolfSSL will */
        if (pos + 5 + len > h->len)
            break;
        for (size_t i = 0; i < len && payload + i < 4; i++)
            head[payload + i] = rec[5 + i];
        payload += len;
        pos += 5 + len;
        records++;
        if (payload < 4)
            continue;
        if (head[0] != HS_CLIENT_HELLO)
            return decide(h, h->len);
        size_t msg = 4 + be(head + 1, 3);
        if (msg > REC_MAX || payload > msg)
            return decide(h, h->len); /* too big to re-frame, or more after */
        if (payload < msg)
            continue;
        /* Whole: one record of it, then whatever came after. */
        if (records > 1) {
            gather(h, pos);
            h->buf[3] = (uint8_t)(msg >> 8);
            h->buf[4] = (uint8_t)msg;
            memmove(h->buf + 5 + msg, h->buf + pos, h->len - pos);
        }
        parse(h, h->buf + 5 + 4, msg - 4);
        return decide(h, 5 + msg + (h->len - pos));
    }
    if (h->len == sizeof(h->buf))
        return decide(h, h->len);
    return false;
}

uint8_t *stp_hello_room(struct stp_hello *h, size_t *room)
{
    *room = h->decided ? 0 : sizeof(h->buf) - h->len;
    return h->buf + h->len;
}

size_t stp_hello_take(struct stp_hello *h, uint8_t *dst, size_t max)
{
    size_t n = h->out_len - h->off;
    if (n > max)
        n = max;
    memcpy(dst, h->buf + h->off, n);
    h->off += n;
    return n;
}
