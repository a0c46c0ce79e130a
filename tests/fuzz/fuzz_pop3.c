/* libFuzzer target for the POP3 engine (stp_pop3_*), through the daemon's
 * feed loop.
 *
 * The input is a script: one config byte, then operations that interleave
 * client bytes, upstream bytes (raw or canned) and events (TLS started,
 * timeout, upstream lost, shutdown, a slower upstream). Unconsumed bytes stay
 * buffered and are offered again; plaintext buffered when the handshake
 * starts is dropped. Broken invariants abort():
 *  - nothing reaches the upstream or the client after close;
 *  - with require_tls on a STARTTLS listener, nothing at all is forwarded
 *    before TLS (no USER, PASS, APOP, AUTH, nor anything else);
 *  - STLS is never forwarded; a forwarded line holds no CR, LF or NUL;
 *  - after start_tls no client byte is consumed until tls_started;
 *  - after TLS no CAPA line the client sees names STLS, no SASL line a
 *    -PLUS mechanism;
 *  - multi-line body bytes reach the client as contiguous slices of the
 *    upstream's input, in order: relayed untouched;
 *  - the queue of owed responses stays within its bound. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "pop3.h"

#define BUF 16384

struct fz {
    struct stp_pop3 s;
    bool local;        /* require_tls on a STARTTLS listener */
    bool tls;
    bool tls_pending;
    bool closed;
    bool up_gone;
    bool fed_pending;
    const char *up_base; /* the upstream buffer offered in the call */
    size_t up_len;
    const char *body_next; /* where the next body slice must start */
    char cbuf[BUF];
    size_t clen;
    char ubuf[BUF];
    size_t ulen;
    unsigned room, pieces;
};

static struct fz F;

static bool verb_is(const char *p, size_t n, const char *v)
{
    size_t k = strlen(v);
    return n >= k && strncasecmp(p, v, k) == 0 && (n == k || p[k] == ' ');
}

static void op_to_upstream(void *ctx, enum stp_fwd kind, const char *p,
                           size_t n)
{
    (void)ctx;
    CHECK(!F.closed, "to_upstream after close");
    CHECK(!F.up_gone, "to_upstream after the upstream was cut");
    CHECK(!F.tls_pending, "to_upstream between start_tls and tls_started");
    CHECK(!(F.room && F.pieces >= F.room), "to_upstream while full");
    F.pieces++;
    CHECK(kind == STP_FWD_LINE, "POP3 forwards lines only");
    CHECK(!memchr(p, '\r', n) && !memchr(p, '\n', n) && !memchr(p, '\0', n),
          "FWD_LINE holds CR, LF or NUL");
    CHECK(!(F.local && !F.tls), "forwarded before TLS with require_tls");
    CHECK(F.s.phase == STP_P3_SASL || !verb_is(p, n, "STLS"),
          "STLS forwarded");
    CHECK(F.s.phase == STP_P3_SASL || !verb_is(p, n, "XCLIENT"),
          "XCLIENT forwarded");
}

static bool capa_names(const char *p, size_t n, const char *kw)
{
    size_t k = strlen(kw);
    while (n && (*p == ' ' || *p == '\t')) {
        p++;
        n--;
    }
    return n >= k && strncasecmp(p, kw, k) == 0 &&
           (n == k || p[k] == ' ' || p[k] == '\t' || p[k] == '\r');
}

static void op_to_client(void *ctx, const char *p, size_t n)
{
    (void)ctx;
    CHECK(!F.closed, "to_client after close");
    if (F.s.in_body && !F.s.body_capa) {
        /* Body bytes: a slice of the upstream's input, where the last
         * one ended. */
        CHECK(F.up_base && p >= F.up_base && p + n <= F.up_base + F.up_len,
              "body bytes not a slice of the upstream's input");
        CHECK(!F.body_next || p == F.body_next, "body slices not contiguous");
        F.body_next = p + n;
        return;
    }
    F.body_next = NULL; /* a status line: the next body starts anywhere */
    if (F.s.in_body && F.s.body_capa && F.tls &&
        F.s.pend_stat[F.s.pend_head] == STP_P3S_CAPA) {
        CHECK(!capa_names(p, n, "STLS"), "STLS in a CAPA after TLS");
        if (capa_names(p, n, "SASL"))
            for (size_t i = 0; i + 5 <= n; i++)
                CHECK(strncasecmp(p + i, "-PLUS", 5) != 0 ||
                          (i + 5 < n && p[i + 5] != ' ' && p[i + 5] != '\r'),
                      "a -PLUS mechanism in CAPA's SASL");
    }
}

static void op_start_tls(void *ctx)
{
    (void)ctx;
    CHECK(!F.closed, "start_tls after close");
    CHECK(!F.tls_pending && !F.tls, "start_tls twice or under TLS");
    F.tls_pending = true;
}

static void op_close(void *ctx, enum stp_close_reason why, bool cut)
{
    (void)ctx;
    CHECK(!F.closed, "close twice");
    CHECK(stp_close_reason_name(why) != NULL, "close reason without a name");
    F.closed = true;
    if (cut)
        F.up_gone = true;
}

static void op_event(void *ctx, const char *event, const char *detail)
{
    (void)ctx;
    CHECK(event && detail, "event with NULL text");
    CHECK(strcmp(event, "bug") != 0, detail);
}

static bool op_upstream_full(void *ctx)
{
    (void)ctx;
    return F.room && F.pieces >= F.room;
}

static const struct stp_proto_actions ops = {
    .upstream_full = op_upstream_full,
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
        *n = F.up_gone ? 0 : F.ulen;
        F.up_base = F.ubuf;
        F.up_len = *n;
        F.body_next = F.s.in_body ? F.ubuf : NULL;
        return F.ubuf;
    }
    F.up_base = NULL;
    F.fed_pending = F.tls_pending;
    *n = F.clen;
    return F.cbuf;
}

static void feed_consume(void *ctx, enum stp_side side, size_t k)
{
    (void)ctx;
    char *buf = side == STP_SIDE_CLIENT ? F.cbuf : F.ubuf;
    size_t *len = side == STP_SIDE_CLIENT ? &F.clen : &F.ulen;
    CHECK(k <= *len, "input consumed too much");
    if (side == STP_SIDE_CLIENT) {
        CHECK(!F.fed_pending, "client bytes consumed before tls_started");
    } else {
        F.up_base = NULL;
        F.body_next = NULL;
    }
    memmove(buf, buf + k, *len - k);
    *len -= k;
}

static bool feed_make_room(void *ctx)
{
    (void)ctx;
    bool full = F.room && F.pieces >= F.room;
    F.pieces = 0;
    return full;
}

static const struct stp_feed_io fz_feed = {feed_input, feed_consume,
                                           feed_make_room};

static void pump(void)
{
    while (stp_proto_feed(&stp_proto_pop3, &F.s, &fz_feed, NULL) < 0) {
        CHECK(F.closed, "upstream_input error without close");
        F.up_gone = true;
        F.ulen = 0;
    }
    F.up_base = NULL;
    CHECK(F.s.pend_count <= STP_POP3_MAX_PENDING, "queue over its bound");
}

static void feed(bool client, const uint8_t *p, size_t n)
{
    char *buf = client ? F.cbuf : F.ubuf;
    size_t *len = client ? &F.clen : &F.ulen;
    if (!client && F.up_gone)
        return;
    if (n > BUF - *len)
        n = BUF - *len;
    memcpy(buf + *len, p, n);
    *len += n;
    pump();
}

static const char *const client_lines[] = {
    "CAPA\r\n", "STLS\r\n", "stls\r\n", "STLS x\r\n", "USER alice\r\n",
    "PASS secret\r\n", "APOP alice 0123456789abcdef\r\n", "AUTH PLAIN\r\n",
    "AUTH\r\n", "AUTH PLAIN AGEAYg==\r\n", "dXNlcg==\r\n", "*\r\n",
    "STAT\r\n", "LIST\r\n", "LIST 1\r\n", "UIDL\r\n", "UIDL 1\r\n",
    "RETR 1\r\n", "TOP 1 0\r\n", "DELE 1\r\n", "RSET\r\n", "NOOP\r\n",
    "QUIT\r\n", "LANG\r\n", " user\tbob\r\n", "STLS\r\nUSER x\r\nPASS y\r\n",
    "USER a\rPASS b\r\n", "\r\n", "\n", "\r", "XCLIENT ADDR=6.6.6.6\r\n",
    "\txclient ADDR=6.6.6.6\r\n",
};

static const char *const upstream_lines[] = {
    "+OK Dovecot ready. <1.2@host>\r\n", "+OK\r\n", "-ERR no\r\n",
    "+OK Logged in.\r\n", "+ VXNlcm5hbWU6\r\n", "+\r\n", ".\r\n", "..\r\n",
    "+OK\r\nCAPA\r\nSTLS\r\nSASL PLAIN SCRAM-SHA-1-PLUS\r\nUSER\r\n.\r\n",
    "stls\r\n", "SASL SCRAM-SHA-256-PLUS\r\n", "SASL PLAIN-PLUS LOGIN\r\n",
    "+OK 2 messages\r\n1 100\r\n2 200\r\n.\r\n",
    "+OK\r\nFrom: a\r\n\r\n+OK no\r\n..\r\n..x\r\n.\r\n", "line\r\n",
    "-ERR Disconnected for inactivity.\r\n", ".\n", "\r\n.\r", "\n.\r\n",
};

#define N(a) (sizeof(a) / sizeof((a)[0]))

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint32_t max_lines[] = {255, 512, 1000, 8192};
    if (size < 1)
        return 0;
    memset(&F, 0, sizeof(F));
    uint8_t c0 = data[0];
    struct stp_proto_cfg cfg = {
        .offer_starttls = c0 & 1,
        .require_tls = (c0 >> 1) & 1,
        .tls_active = (c0 >> 2) & 1,
        .max_line = max_lines[(c0 >> 3) % N(max_lines)],
        .max_errors = (c0 >> 5) & 3,
        .hostname = "fuzz.test",
    };
    if (cfg.tls_active)
        cfg.offer_starttls = false; /* as the configuration has it */
    F.local = cfg.require_tls && cfg.offer_starttls && !cfg.tls_active;
    F.tls = cfg.tls_active;
    stp_pop3_init(&F.s, &cfg, &ops, NULL);

    size_t i = 1;
    while (i < size) {
        uint8_t op = data[i++];
        uint8_t arg = i < size ? data[i] : 0;
        switch (op % 9) {
        case 0:
        case 1: { /* raw client bytes */
            if (i >= size)
                break;
            i++;
            size_t n = arg < size - i ? arg : size - i;
            feed(true, data + i, n);
            i += n;
            break;
        }
        case 2: { /* a canned client line */
            i++;
            const char *t = client_lines[arg % N(client_lines)];
            feed(true, (const uint8_t *)t, strlen(t));
            break;
        }
        case 3: { /* raw upstream bytes */
            if (i >= size)
                break;
            i++;
            size_t n = arg < size - i ? arg : size - i;
            feed(false, data + i, n);
            i += n;
            break;
        }
        case 4:
        case 5: { /* canned upstream bytes */
            i++;
            const char *t = upstream_lines[arg % N(upstream_lines)];
            feed(false, (const uint8_t *)t, strlen(t));
            break;
        }
        case 6: /* the handshake finished */
            if (F.tls_pending) {
                F.clen = 0;
                F.tls_pending = false;
                F.tls = true;
                stp_pop3_tls_started(&F.s);
                pump();
            }
            break;
        case 7: /* events */
            i++;
            if (arg % 4 == 0) {
                stp_pop3_fail(&F.s, STP_FAIL_TIMEOUT);
            } else if (arg % 4 == 1) {
                stp_pop3_fail(&F.s, STP_FAIL_LOST);
                F.up_gone = true;
            } else if (arg % 4 == 2) {
                stp_pop3_fail(&F.s, STP_FAIL_SHUTDOWN);
            } else {
                F.room = (arg >> 2) % 4;
            }
            pump();
            break;
        default:
            pump();
            break;
        }
    }
    struct stp_proto_status st;
    stp_pop3_status(&F.s, &st);
    CHECK(!(st.idle && st.replies_due), "idle with replies due");
    char sum[512];
    stp_pop3_summary(&F.s, sum, sizeof(sum));
    CHECK(strstr(sum, "body_bytes=") != NULL, "summary without body_bytes");
    for (int k = 0; k < STP_P3S_COUNT; k++)
        CHECK(F.s.accepted[k] <= F.s.sent[k], "more accepted than sent");
    return 0;
}
