/* libFuzzer target for the IMAP engine (stp_imap_*).
 *
 * The input is a script: one config byte, then operations that interleave
 * client bytes, upstream bytes (raw or canned lines) and events (TLS
 * started, a failure, a client EOF). The harness behaves like the relay:
 * unconsumed bytes stay buffered and are offered again; plaintext buffered
 * when the handshake starts is dropped. Broken invariants abort():
 *  - nothing reaches the upstream or the client after close;
 *  - with require_tls, before TLS, nothing at all is forwarded;
 *  - forwards are slices of the buffer being offered (the client's own
 *    bytes), or a client's "{n+}" line rewritten as "{n}";
 *  - after start_tls no client byte is consumed until tls_started;
 *  - the client, reading as imaplib does (a line ending in {n} announces n
 *    octets), sees no STARTTLS, LOGINDISABLED, COMPRESS=* or AUTH=*-PLUS in
 *    an untagged CAPABILITY or a [CAPABILITY] code once TLS is on, and
 *    before it (require_tls) only the proxy's own list;
 *  - implicit TLS: the literal octets the client reads are exactly those
 *    the upstream sent, in order (a prefix of them if the engine stopped). */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "imap.h"
#include "stp.h"

#define BUF 16384
#define LIT_CAP (1 << 20)

/* A reader of one direction of IMAP the way lenient clients read it. */
struct reader {
    uint64_t lit;        /* octets of the current literal still to come */
    bool after_lit;      /* the current line goes on after a literal */
    char line[BUF * 2];
    size_t len;
    bool overflow;
    char *lits;          /* literal octets seen, concatenated */
    size_t nlits;
};

struct fz {
    struct stp_imap e;
    int mode;            /* 0 starttls+require, 1 implicit, 2 starttls */
    bool tls, tls_pending, closed, up_gone;
    bool fed_pending;    /* TLS was pending when the offer was made */
    const char *in_base;
    size_t in_len;
    char cbuf[BUF], ubuf[BUF];
    size_t clen, ulen;
    struct reader cli, up;
};

static struct fz F;
static char lits_cli[LIT_CAP], lits_up[LIT_CAP];

static bool proxy_only(void) { return F.mode == 0 && !F.tls; }

/* Python's str.split(): what imaplib splits a capability list on. */
static bool ws(char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

static bool tok_forbidden(const char *t, size_t n)
{
    if ((n == 8 && !strncasecmp(t, "STARTTLS", 8)) ||
        (n == 13 && !strncasecmp(t, "LOGINDISABLED", 13)) ||
        (n >= 9 && !strncasecmp(t, "COMPRESS=", 9)))
        return true;
    return n >= 10 && !strncasecmp(t, "AUTH=", 5) &&
           !strncasecmp(t + n - 5, "-PLUS", 5);
}

/* The capability list a client would take from this first line of a
 * response, or NULL. */
static const char *caps_of(const char *l, size_t n, size_t *cl)
{
    if (n > 13 && !strncasecmp(l, "* CAPABILITY ", 13)) {
        *cl = n - 13;
        return l + 13;
    }
    const char *b = memchr(l, '[', n);
    if (!b || (size_t)(l + n - b) < 12 || strncasecmp(b, "[CAPABILITY ", 12))
        return NULL;
    /* only right after "tag STATUS " */
    const char *sp = memchr(l, ' ', n);
    if (!sp)
        return NULL;
    const char *sp2 = memchr(sp + 1, ' ', (size_t)(l + n - sp - 1));
    if (sp2 != b - 1)
        return NULL;
    /* a list without "]" is read to the end of the line */
    const char *e = memchr(b, ']', (size_t)(l + n - b));
    *cl = (size_t)((e ? e : l + n) - (b + 12));
    return b + 12;
}

static void check_caps(const char *l, size_t n)
{
    size_t cl;
    const char *c = caps_of(l, n, &cl);
    if (!c)
        return;
    bool ours = proxy_only();
    bool st = false, ld = false;
    for (size_t i = 0; i < cl;) {
        while (i < cl && ws(c[i]))
            i++;
        size_t b = i;
        while (i < cl && !ws(c[i]))
            i++;
        if (i == b)
            continue;
        if (ours) {
            st |= i - b == 8 && !strncasecmp(c + b, "STARTTLS", 8);
            ld |= i - b == 13 && !strncasecmp(c + b, "LOGINDISABLED", 13);
            CHECK(strncasecmp(c + b, "AUTH=", 5) != 0,
                  "AUTH= offered before TLS");
        } else if (F.tls) {
            if (tok_forbidden(c + b, i - b))
                fprintf(stderr, "line: %.*s\n", (int)n, l);
            CHECK(!tok_forbidden(c + b, i - b),
                  "a stripped capability reached the client after TLS");
        }
    }
    if (ours)
        CHECK(st && ld, "the proxy's own capabilities lack STARTTLS or "
                        "LOGINDISABLED");
}

static int lit_at_end(const char *l, size_t n, uint64_t *v)
{
    if (n < 3 || l[n - 1] != '}')
        return 0;
    size_t i = n - 1;
    if (l[i - 1] == '+')
        i--;
    size_t e = i;
    while (i > 0 && l[i - 1] >= '0' && l[i - 1] <= '9')
        i--;
    if (i == 0 || l[i - 1] != '{' || e == i || e - i > 10)
        return 0;
    *v = 0;
    for (size_t k = i; k < e; k++)
        *v = *v * 10 + (uint64_t)(l[k] - '0');
    return 1;
}

static void read_bytes(struct reader *r, const char *p, size_t n,
                       bool judge)
{
    for (size_t i = 0; i < n; i++) {
        if (r->lit) {
            if (r->nlits < LIT_CAP)
                r->lits[r->nlits++] = p[i];
            r->lit--;
            continue;
        }
        if (p[i] != '\n') {
            if (r->len < sizeof(r->line))
                r->line[r->len++] = p[i];
            else
                r->overflow = true;
            continue;
        }
        size_t len = r->len;
        if (len && r->line[len - 1] == '\r')
            len--;
        if (judge && !r->after_lit && !r->overflow)
            check_caps(r->line, len);
        uint64_t v = 0;
        bool lit = lit_at_end(r->line, len, &v) == 1;
        r->lit = lit ? v : 0;
        r->after_lit = lit;
        r->len = 0;
        r->overflow = false;
    }
}

static void op_to_upstream(void *ctx, enum stp_fwd kind, const char *p,
                           size_t n)
{
    (void)ctx;
    CHECK(!F.closed, "to_upstream after close");
    CHECK(!F.up_gone, "to_upstream after the upstream was cut");
    CHECK(!F.tls_pending, "to_upstream between start_tls and tls_started");
    if (kind == STP_FWD_LINE) {
        /* only a client's "{n+}" line, made "{n}" */
        CHECK(n > 0 && p[n - 1] == '}' && !memchr(p, '\r', n) &&
                  !memchr(p, '\n', n) && !memchr(p, '\0', n),
              "a line of the proxy's own went upstream");
    } else {
        CHECK(F.in_base && p >= F.in_base && p + n <= F.in_base + F.in_len,
              "FWD_RAW outside the offered buffer");
    }
    CHECK(!proxy_only(), "bytes forwarded before TLS with require_tls");
    if (getenv("FZ_DUMP"))
        fprintf(stderr, "[up]%.*s\n", (int)n, p);
}

static void op_to_client(void *ctx, const char *p, size_t n)
{
    (void)ctx;
    CHECK(!F.closed, "to_client after close");
    if (getenv("FZ_DUMP"))
        fprintf(stderr, "[cli %d]%.*s\n", F.e.phase, (int)n, p);
    read_bytes(&F.cli, p, n, true);
}

static void op_start_tls(void *ctx)
{
    (void)ctx;
    CHECK(!F.tls_pending && !F.tls, "start_tls twice");
    F.tls_pending = true;
}

static void op_close(void *ctx, enum stp_close_reason why, bool cut)
{
    (void)ctx;
    (void)why;
    CHECK(!F.closed, "close twice");
    F.closed = true;
    if (cut)
        F.up_gone = true;
}

static void op_event(void *ctx, const char *event, const char *detail)
{
    (void)ctx;
    (void)detail;
    CHECK(strcmp(event, "bug") != 0, "the engine reports a bug");
}

static const struct stp_proto_actions ops = {
    .to_upstream = op_to_upstream,
    .to_client = op_to_client,
    .start_tls = op_start_tls,
    .close = op_close,
    .event = op_event,
};

static const char *feed_input(void *ctx, enum stp_side side, size_t *n)
{
    (void)ctx;
    if (side == STP_SIDE_UPSTREAM) {
        *n = F.up_gone || F.closed ? 0 : F.ulen;
        return F.ubuf;
    }
    *n = F.tls_pending || F.closed ? 0 : F.clen;
    F.fed_pending = F.tls_pending;
    F.in_base = F.cbuf;
    F.in_len = F.clen;
    return F.cbuf;
}

static void feed_consume(void *ctx, enum stp_side side, size_t k)
{
    (void)ctx;
    char *buf = side == STP_SIDE_CLIENT ? F.cbuf : F.ubuf;
    size_t *len = side == STP_SIDE_CLIENT ? &F.clen : &F.ulen;
    CHECK(k <= *len, "consumed more than offered");
    CHECK(!(side == STP_SIDE_CLIENT && F.fed_pending),
          "client bytes consumed while waiting for TLS");
    if (side == STP_SIDE_UPSTREAM)
        read_bytes(&F.up, buf, k, false);
    memmove(buf, buf + k, *len - k);
    *len -= k;
}

static const struct stp_feed_io feed = {feed_input, feed_consume, NULL};

static void pump(void)
{
    if (stp_proto_feed(&stp_proto_imap, &F.e, &feed, NULL) < 0) {
        /* It took lines before the bad one: the reader sees them all. */
        read_bytes(&F.up, F.ubuf, F.ulen, false);
        F.up_gone = true;
        F.ulen = 0;
    }
    F.in_base = NULL;
}

static void add(bool client, const uint8_t *p, size_t n)
{
    char *buf = client ? F.cbuf : F.ubuf;
    size_t *len = client ? &F.clen : &F.ulen;
    if (n > BUF - *len)
        n = BUF - *len;
    memcpy(buf + *len, p, n);
    *len += n;
    pump();
}

static const char *const up_lines[] = {
    "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED AUTH=PLAIN] hi\r\n",
    "* PREAUTH hi\r\n",
    "* CAPABILITY IMAP4rev1 STARTTLS COMPRESS=DEFLATE AUTH=SCRAM-SHA-1-PLUS\r\n",
    "a OK [CAPABILITY IMAP4rev1 starttls] done\r\n",
    "+ OK\r\n",
    "* 1 FETCH (BODY[] {23}\r\n* CAPABILITY STARTTLS\r\n)\r\n",
    "a OK done\r\n",
    "* BYE bye\r\n",
    "* 1 EXISTS\r\n",
    "b NO [TOOBIG] no\r\n",
};

static const char *const cli_lines[] = {
    "a CAPABILITY\r\n", "t STARTTLS\r\n", "b LOGIN alice secret\r\n",
    "b APPEND INBOX {5}\r\n", "b APPEND INBOX {5+}\r\n", "i IDLE\r\n",
    "DONE\r\n", "c COMPRESS DEFLATE\r\n", "a AUTHENTICATE PLAIN\r\n",
    "z LOGOUT\r\n",
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    memset(&F, 0, sizeof(F));
    F.cli.lits = lits_cli;
    F.up.lits = lits_up;
    F.mode = data[0] % 3;
    struct stp_proto_cfg cfg = {
        .offer_starttls = F.mode != 1,
        .require_tls = F.mode != 2,
        .tls_active = F.mode == 1,
        .max_line = 64 + (data[0] >> 2) * 8,
        .max_errors = (data[0] >> 6) * 3,
        .hostname = "proxy.test",
    };
    F.tls = F.mode == 1;
    stp_imap_init(&F.e, &cfg, &ops, NULL);
    size_t i = 1;
    while (i < size && !F.closed) {
        uint8_t op = data[i++];
        size_t n = i < size ? data[i] : 0;
        switch (op % 8) {
        case 0:
        case 1: {
            i++;
            if (n > size - i)
                n = size - i;
            add(op % 8 == 0, data + i, n);
            i += n;
            break;
        }
        case 2:
            if (F.tls_pending) {
                F.tls_pending = false;
                F.tls = true;
                F.clen = 0;
                stp_imap_tls_started(&F.e);
                pump();
            }
            break;
        case 3:
            i++;
            stp_imap_fail(&F.e, (enum stp_fail)(n % (STP_FAIL_DENIED + 1)));
            break;
        case 4: {
            i++;
            const char *l = up_lines[n % STP_ARRAY_LEN(up_lines)];
            add(false, (const uint8_t *)l, strlen(l));
            break;
        }
        case 5: {
            i++;
            const char *l = cli_lines[n % STP_ARRAY_LEN(cli_lines)];
            add(true, (const uint8_t *)l, strlen(l));
            break;
        }
        case 6: {
            struct stp_proto_status st;
            stp_imap_status(&F.e, &st);
            (void)stp_imap_client_eof(&F.e, F.clen);
            break;
        }
        case 7:
            pump();
            break;
        }
    }
    if (F.mode == 1) {
        CHECK(F.cli.nlits <= F.up.nlits &&
                  memcmp(F.cli.lits, F.up.lits, F.cli.nlits) == 0,
              "literal octets changed on the way to the client");
        if (!F.closed && !F.up_gone && F.ulen == 0)
            CHECK(F.cli.nlits == F.up.nlits, "literal octets lost");
    }
    return 0;
}
