/* libFuzzer target for the SMTP engine (stp_smtp_*).
 *
 * The input is a script: one config byte, then operations that interleave
 * client bytes, upstream bytes (raw or canned lines) and events (TLS started,
 * timeout, upstream lost/unreachable, shutdown). The harness behaves like the
 * session: unconsumed bytes stay buffered and are offered again; plaintext
 * buffered when the handshake starts is dropped. Broken invariants abort():
 *  - nothing reaches the upstream or the client after close;
 *  - a forwarded line never holds CR, LF or NUL, and is never XCLIENT or
 *    XFORWARD (a SASL response forwarded verbatim is the one exception);
 *  - with require_tls, before TLS: no MAIL/RCPT/DATA/BDAT/AUTH/VRFY/EXPN/ETRN/
 *    HELP line and no message bytes are forwarded;
 *  - raw forwards are slices of the buffer being offered;
 *  - the client stream is whole CRLF lines starting with three digits after
 *    every engine call;
 *  - after start_tls no client byte is consumed (and nothing is forwarded)
 *    until tls_started;
 *  - the engine never stalls in COMMAND with nothing pending while a whole
 *    max_line of input is buffered. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "mta_tokens.h"
#include "smtp.h"

#define BUF 16384

struct fz {
    struct stp_smtp s;
    bool require_tls;
    bool offer;        /* the listener offers STARTTLS */
    bool tls;          /* the client leg is (now) TLS */
    bool tls_pending;  /* start_tls called, tls_started not yet */
    bool closed;
    bool up_gone;
    const char *in_base; /* buffer of the client_input call under way */
    size_t in_len;
    bool auth_call;    /* that call started in the AUTH phase */
    bool fed_pending;  /* TLS was pending when that call began */
    int lines_in_call;
    int cli_pos;       /* position in the current client line */
    char cli_prev;
    char cbuf[BUF];
    size_t clen;
    char ubuf[BUF];
    size_t ulen;
    unsigned room;     /* pieces the upstream takes per call; 0: any */
    unsigned pieces;
};

static struct fz F;

/* "VERB" or "VERB SP ARGS": read alike by every tokeniser. */
static bool canonical(const char *p, size_t n)
{
    size_t off, len;
    postfix_verb(p, n, &off, &len);
    return off == 0 && (len == n || (p[len] == ' ' && len + 1 < n &&
                                     !mta_space(p[len + 1])));
}

static void op_to_upstream(void *ctx, enum stp_fwd kind, const char *p,
                           size_t n)
{
    CHECK(!F.closed, "to_upstream after close");
    CHECK(!F.up_gone, "to_upstream after the upstream was cut");
    CHECK(!F.tls_pending, "to_upstream between start_tls and tls_started");
    CHECK(!(F.room && F.pieces >= F.room), "to_upstream while full");
    F.pieces++;
    if (kind == STP_FWD_RAW) {
        CHECK(F.in_base && p >= F.in_base && p + n <= F.in_base + F.in_len,
              "FWD_RAW outside the offered buffer");
        CHECK(!(F.require_tls && !F.tls), "message bytes forwarded before TLS");
        return;
    }
    CHECK(kind == STP_FWD_LINE, "bad fwd kind");
    CHECK(!memchr(p, '\r', n) && !memchr(p, '\n', n) && !memchr(p, '\0', n),
          "FWD_LINE holds CR, LF or NUL");
    bool sasl = F.auth_call && F.lines_in_call == 0;
    if (F.in_base)
        F.lines_in_call++;
    if (!sasl) {
        CHECK(canonical(p, n), "command forwarded in non-canonical form");
        CHECK(!mta_verb_is(p, n, "XCLIENT") && !mta_verb_is(p, n, "XFORWARD"),
              "XCLIENT/XFORWARD forwarded");
        CHECK(!mta_verb_is(p, n, "STARTTLS"), "STARTTLS forwarded");
        CHECK(!(F.offer && !F.tls && mta_verb_is(p, n, "AUTH")),
              "AUTH forwarded in clear where TLS is offered");
    }
    if (F.require_tls && !F.tls) {
        static const char *const restricted[] = {
            "MAIL", "RCPT", "DATA", "BDAT", "AUTH", "VRFY", "EXPN", "ETRN",
            "HELP",
        };
        for (size_t i = 0; i < sizeof(restricted) / sizeof(restricted[0]); i++)
            CHECK(!mta_verb_is(p, n, restricted[i]),
                  "restricted command forwarded before TLS");
    }
}

static void op_to_client(void *ctx, const char *p, size_t n)
{
    CHECK(!F.closed, "to_client after close");
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (F.cli_pos < 3)
            CHECK(c >= '0' && c <= '9', "client line does not start with 3 digits");
        if (c == '\n') {
            CHECK(F.cli_prev == '\r' && F.cli_pos >= 4, "client line not CRLF");
            F.cli_pos = 0;
        } else {
            F.cli_pos++;
        }
        F.cli_prev = c;
    }
}

static void op_start_tls(void *ctx)
{
    CHECK(!F.closed, "start_tls after close");
    CHECK(!F.tls_pending && !F.tls, "start_tls twice or under TLS");
    F.tls_pending = true;
}

static void op_close(void *ctx, enum stp_close_reason why, bool cut)
{
    CHECK(!F.closed, "close twice");
    CHECK(stp_close_reason_name(why) != NULL, "close reason without a name");
    F.closed = true;
    if (cut)
        F.up_gone = true;
}

static void op_event(void *ctx, const char *event, const char *detail)
{
    CHECK(event && detail, "event with NULL text");
    CHECK(strcmp(event, "bug") != 0, detail);
}

static void op_phase(void *ctx, const char *from, const char *to)
{
    CHECK(strcmp(from, "?") != 0 && strcmp(to, "?") != 0, "bad phase");
}

static bool op_upstream_full(void *ctx)
{
    return F.room && F.pieces >= F.room;
}

static const struct stp_proto_actions ops = {
    .upstream_full = op_upstream_full,
    .to_upstream = op_to_upstream,
    .to_client = op_to_client,
    .start_tls = op_start_tls,
    .close = op_close,
    .event = op_event,
    .phase = op_phase,
};

static void client_stream_whole(void)
{
    CHECK(F.cli_pos == 0, "engine call left a partial line for the client");
}

/* The daemon's feed loop over the fuzzer's buffers. */
static const char *feed_input(void *ctx, enum stp_side side, size_t *n)
{
    if (side == STP_SIDE_UPSTREAM) {
        F.in_base = NULL;
        *n = F.up_gone ? 0 : F.ulen;
        return F.ubuf;
    }
    F.in_base = F.cbuf;
    F.in_len = F.clen;
    F.auth_call = F.s.phase == STP_PH_AUTH;
    F.lines_in_call = 0;
    F.fed_pending = F.tls_pending;
    *n = F.clen;
    return F.cbuf;
}

static void feed_consume(void *ctx, enum stp_side side, size_t k)
{
    char *buf = side == STP_SIDE_CLIENT ? F.cbuf : F.ubuf;
    size_t *len = side == STP_SIDE_CLIENT ? &F.clen : &F.ulen;
    client_stream_whole();
    CHECK(k <= *len, "input consumed too much");
    if (side == STP_SIDE_CLIENT) {
        CHECK(!F.fed_pending, "client bytes consumed before tls_started");
        F.in_base = NULL;
        F.pieces = 0; /* written: room again */
    }
    memmove(buf, buf + k, *len - k);
    *len -= k;
}

static bool feed_make_room(void *ctx)
{
    bool full = F.room && F.pieces >= F.room;
    F.in_base = NULL;
    F.pieces = 0;
    return full;
}

static const struct stp_feed_io fz_feed = {feed_input, feed_consume,
                                           feed_make_room};

static void pump(void)
{
    while (stp_proto_feed(&stp_proto_smtp, &F.s, &fz_feed, NULL) < 0) {
        CHECK(F.closed, "upstream_input error without close");
        F.up_gone = true;
        F.ulen = 0;
    }
    F.in_base = NULL;
    client_stream_whole();
    /* Liveness: with nothing pending, a full line's worth must move. */
    if (!F.closed && F.s.phase == STP_PH_COMMAND && F.s.pend_count == 0 &&
        !F.s.waiting && F.clen >= F.s.cfg.max_line)
        CHECK(0, "engine stalls with a full line buffered and nothing pending");
}

static void feed(bool client, const uint8_t *p, size_t n)
{
    char *buf = client ? F.cbuf : F.ubuf;
    size_t *len = client ? &F.clen : &F.ulen;
    if (!client && F.up_gone)
        return;
    if (n > BUF - *len) /* the caller stops reading when its buffer is full */
        n = BUF - *len;
    memcpy(buf + *len, p, n);
    *len += n;
    pump();
}

static const char *const client_lines[] = {
    "EHLO client.test\r\n", "HELO client.test\r\n", "MAIL FROM:<a@b.test>\r\n",
    "RCPT TO:<c@d.test>\r\n", "DATA\r\n", "BDAT 5\r\n", "BDAT 3 LAST\r\n",
    "BDAT 0 LAST\r\n", "RSET\r\n", "NOOP\r\n", "QUIT\r\n", "STARTTLS\r\n",
    "starttls\n", "STARTTLS x\r\n", "AUTH LOGIN\r\n",
    "AUTH PLAIN AGEAYg==\r\n", "XCLIENT ADDR=1.2.3.4\r\n",
    "XFORWARD NAME=spoof\r\n", "VRFY root\r\n", "EXPN list\r\n",
    "ETRN x.test\r\n", "HELP\r\n", "dXNlcg==\r\n", "*\r\n", "\r\n.\r\n",
    ".\r\n", "\n.\n", "\r\n.\n", "\n.\r\n", "\r.\r", "\r\n.\r", "..x\r\n",
    "hello world\r\n", "\r", "\n", ".", "BDAT 9\r\nXCLIENT\r\n",
    "MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n",
    "XCLIENT\tADDR=6.6.6.6\r\n", " XCLIENT ADDR=6.6.6.6\r\n",
    "\tXFORWARD\vADDR=6.6.6.6\r\n", "XCLIENT\fADDR=6.6.6.6\r\n",
    "DATA\t\r\n", "BDAT\t5\r\n", "AUTH\tPLAIN\r\n", "STARTTLS\t\r\n",
    "  MAIL\tFROM:<a>\r\n", "RCPT  TO:<b>\r\n", "LHLO client.test\r\n",
};

static const char *const upstream_lines[] = {
    "220 mx.test ESMTP\r\n", "250 2.0.0 Ok\r\n",
    "250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-STARTTLS\r\n"
    "250-AUTH PLAIN LOGIN\r\n250-REQUIRETLS\r\n250-XCLIENT ADDR\r\n"
    "250 8BITMIME\r\n",
    "250-mx.test\r\n", "250 CHUNKING\r\n", "250-STARTTLS\r\n",
    "354 End data with <CR><LF>.<CR><LF>\r\n", "334 VXNlcm5hbWU6\r\n",
    "235 2.7.0 Authentication successful\r\n", "535 5.7.8 failed\r\n",
    "421 4.3.0 bye\r\n", "421-4.3.0 going\r\n", "221 2.0.0 Bye\r\n",
    "550 5.1.1 no\r\n", "502 5.5.1 no\r\n", "554 5.5.1 no\r\n",
    "250 ok\n", "220-mx.test\r\n",
};

#define N(a) (sizeof(a) / sizeof((a)[0]))

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint32_t max_lines[] = {512, 513, 600, 1000, 2048, 8192};
    if (size < 1)
        return 0;
    memset(&F, 0, sizeof(F));
    uint8_t c0 = data[0];
    struct stp_smtp_cfg cfg = {
        .offer_starttls = c0 & 1,
        .require_tls = (c0 >> 1) & 1,
        .tls_active = (c0 >> 2) & 1,
        .upstream_tls = (c0 >> 3) & 1,
        .max_line = max_lines[(c0 >> 4) % N(max_lines)],
        .lmtp = (c0 >> 7) & 1,
        .hostname = "fuzz.test",
        /* The top nibble also picks max_line: 11..15 cap errors at 1..5. */
        .max_errors = (c0 >> 4) >= 11 ? (uint32_t)(c0 >> 4) - 10 : 0,
    };
    F.require_tls = cfg.require_tls;
    F.offer = cfg.offer_starttls;
    F.tls = cfg.tls_active;
    stp_smtp_init(&F.s, &cfg, &ops, NULL);

    size_t i = 1;
    while (i < size) {
        uint8_t op = data[i++];
        uint8_t arg = i < size ? data[i] : 0;
        switch (op % 10) {
        case 0:
        case 1: { /* raw client bytes */
            if (i >= size)
                break;
            i++;
            size_t n = STP_MIN((size_t)arg, size - i);
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
            size_t n = STP_MIN((size_t)arg, size - i);
            feed(false, data + i, n);
            i += n;
            break;
        }
        case 4:
        case 5: { /* a canned upstream reply */
            i++;
            const char *t = upstream_lines[arg % N(upstream_lines)];
            feed(false, (const uint8_t *)t, strlen(t));
            break;
        }
        case 6: /* the handshake finished */
            if (F.tls_pending) {
                F.clen = 0; /* plaintext read before it is dropped */
                F.tls_pending = false;
                F.tls = true;
                stp_smtp_tls_started(&F.s);
                client_stream_whole();
                pump();
            }
            break;
        case 7: /* timer and upstream events, room upstream */
            i++;
            if (arg % 4 == 0)
                stp_smtp_fail(&F.s, STP_FAIL_TIMEOUT);
            else if (arg % 4 == 1) {
                stp_smtp_fail(&F.s, STP_FAIL_LOST);
                F.up_gone = true;
            } else if (arg % 4 == 2) {
                stp_smtp_fail(&F.s, STP_FAIL_UNREACHABLE);
                F.up_gone = true;
            } else {
                F.room = (arg >> 2) % 4; /* a slower upstream, or not */
            }
            client_stream_whole();
            pump();
            break;
        case 8: /* the proxy is stopping */
            stp_smtp_fail(&F.s, STP_FAIL_SHUTDOWN);
            client_stream_whole();
            pump();
            break;
        default: /* offer the buffers again */
            pump();
            break;
        }
    }
    /* The summary never has more accepted than sent: every acceptance is
     * a reply to one command the client sent. */
    char sum[512];
    stp_smtp_summary(&F.s, sum, sizeof(sum));
    CHECK(strstr(sum, " messages=") || strncmp(sum, "messages=", 9) == 0,
          "summary without its message totals");
    for (int st = 0; st < STP_ST_COUNT; st++)
        CHECK(F.s.accepted[st] <= F.s.sent[st], "more accepted than sent");
    stp_smtp_free(&F.s);
    return 0;
}
