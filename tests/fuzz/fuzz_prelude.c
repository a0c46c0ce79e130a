/* libFuzzer target for the upstream prelude (stp_up_*).
 *
 * Input: one config byte (bit 0: STARTTLS, bit 1: XCLIENT, bits 2-3: which
 * EHLO name, bit 4: opportunistic, which implies STARTTLS, bits 5-6: AUTH
 * none, PLAIN, LOGIN, XOAUTH2, bit 7: another address is left), one seed
 * byte for the read sizes, then the upstream's bytes.
 * The harness behaves like the session: the bytes arrive in reads of random
 * sizes (or of whole lines), unconsumed bytes stay buffered and are offered
 * again with the next read; when start_tls is requested, whatever is still
 * buffered belongs to TLS and the handshake "completes" (stp_up_tls_done)
 * before the next read, whose bytes then stand for decrypted ones. Broken invariants abort():
 *  - no callback after fail or ready, none between start_tls and
 *    tls_done, never both ready and fail, fail and ready at most once;
 *  - a sent line is never empty and never holds CR, LF or NUL, and is one
 *    of "EHLO <name>", "STARTTLS", the configured XCLIENT line, in an order
 *    the protocol allows (STARTTLS only when configured and before TLS,
 *    XCLIENT only when configured and, with STARTTLS, after TLS, or in
 *    opportunistic plaintext);
 *  - start_tls only when configured, right after STARTTLS was sent, at most
 *    once, and only when the input offered ended exactly with a final 220
 *    reply line that the call consumed;
 *  - the greeting handed to ready is non-empty CRLF lines of one 220 reply
 *    ("220-" lines, then one "220 "/"220" line), with no other CR or LF;
 *  - ready with STARTTLS configured only after the handshake, unless
 *    opportunistic and STARTTLS was never sent (not offered: one EHLO);
 *    never ready in plaintext once STARTTLS was sent (no downgrade); ready
 *    with XCLIENT configured only after XCLIENT was sent;
 *  - AUTH and its responses only when configured, after an EHLO, never
 *    before TLS when STARTTLS is configured, the credentials only in
 *    them; ready with AUTH configured only after it was sent; an empty
 *    line only to answer XOAUTH2's error challenge;
 *  - a failure's reason (logged) never holds the secret, raw or base64;
 *  - FAIL_TLS only with STARTTLS configured, FAIL_AUTH only with AUTH,
 *    FAIL_UNREACHABLE only with another address left;
 *  - stp_up_input never consumes more than offered, and nothing once it
 *    is in the TLS, READY or FAILED step. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "prelude.h"
#include "fuzz.h"

#define BUF 65536

/* -DSTRICT_FAIL_CATEGORY=0 skips the one category check (FAIL_TLS only with
 * STARTTLS configured), to explore past a known misclassification. */
#ifndef STRICT_FAIL_CATEGORY
#define STRICT_FAIL_CATEGORY 1
#endif

static const char *const names[4] = {
    "proxy.example",
    "p",
    "mx-01.relay.example.org",
    /* the config allows up to 255 */
    "hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh"
    "hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh"
    "hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh"
    "hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh",
};

#define XCL "XCLIENT ADDR=IPV6:2001:db8::1 PORT=41234 NAME=[UNAVAILABLE]"
/* dev / s3cret: the lines that may carry them */
#define A_PLAIN "AUTH PLAIN AGRldgBzM2NyZXQ="
#define A_XOA "AUTH XOAUTH2 dXNlcj1kZXYBYXV0aD1CZWFyZXIgczNjcmV0AQE="

struct fz {
    struct stp_prelude p;
    struct stp_up_cfg cfg;
    char ehlo[300];
    size_t ehlo_len;
    bool in_call;
    bool ended;        /* fail or ready called */
    int readies, fails, start_tls;
    bool tls_pending;  /* start_tls called, tls_done not yet */
    bool tls_done;
    bool sent_starttls, sent_xclient, sent_auth;
    int auth_lines;        /* continuations sent */
    int ehlos;
    bool last_was_starttls; /* the last line sent was STARTTLS */
    char ubuf[BUF];
    size_t ulen;
};

static struct fz F;

/* May the prelude go on without TLS? Only opportunistic, with STARTTLS
 * never sent (the one EHLO reply did not offer it). */
static bool plaintext_ok(void)
{
    return F.cfg.opportunistic && !F.sent_starttls && F.ehlos == 1 &&
           !F.p.offers_starttls;
}

static void op_send(void *ctx, const char *line, size_t n)
{
    (void)ctx;
    CHECK(!F.ended, "send after fail/ready");
    CHECK(!F.tls_pending, "send during the handshake");
    CHECK(F.in_call || F.tls_done, "send outside input/tls_done");
    CHECK(n < 1024, "sent line huge");
    CHECK(n > 0 || (F.cfg.auth == STP_AUTH_XOAUTH2 && F.sent_auth &&
                    F.p.auth_challenged && F.auth_lines++ == 0),
          "empty line, not the one answer to an XOAUTH2 challenge");
    CHECK(!memchr(line, '\r', n) && !memchr(line, '\n', n) &&
              !memchr(line, '\0', n),
          "sent line with CR/LF/NUL");
    F.last_was_starttls = false;
    if (n == F.ehlo_len && memcmp(line, F.ehlo, n) == 0) {
        F.ehlos++;
        /* one EHLO before TLS, one after (or one without TLS) */
        CHECK(F.ehlos <= (F.cfg.starttls ? 2 : 1), "too many EHLOs");
        CHECK(!F.cfg.starttls || (F.ehlos == 1) == !F.tls_done,
              "EHLO at the wrong time");
        CHECK(F.cfg.starttls || F.cfg.xclient || F.cfg.auth,
              "EHLO with nothing to do");
    } else if (n == 8 && memcmp(line, "STARTTLS", 8) == 0) {
        CHECK(F.cfg.starttls, "STARTTLS not configured");
        CHECK(!F.tls_done && !F.sent_starttls, "STARTTLS twice/after TLS");
        CHECK(F.ehlos == 1, "STARTTLS before EHLO");
        F.sent_starttls = true;
        F.last_was_starttls = true;
    } else if (F.cfg.xclient && n == strlen(F.cfg.xclient) &&
               memcmp(line, F.cfg.xclient, n) == 0) {
        CHECK(!F.sent_xclient, "XCLIENT twice");
        CHECK(!F.cfg.starttls || F.tls_done || plaintext_ok(),
              "XCLIENT before TLS");
        CHECK(F.ehlos >= 1, "XCLIENT before EHLO");
        F.sent_xclient = true;
    } else if (F.cfg.auth && !F.sent_auth &&
               ((F.cfg.auth == STP_AUTH_PLAIN && n == strlen(A_PLAIN) &&
                 memcmp(line, A_PLAIN, n) == 0) ||
                (F.cfg.auth == STP_AUTH_LOGIN && n == 10 &&
                 memcmp(line, "AUTH LOGIN", n) == 0) ||
                (F.cfg.auth == STP_AUTH_XOAUTH2 && n == strlen(A_XOA) &&
                 memcmp(line, A_XOA, n) == 0))) {
        CHECK(!F.cfg.starttls || F.tls_done, "AUTH before TLS");
        CHECK(F.ehlos >= 1, "AUTH before EHLO");
        CHECK(!F.sent_xclient, "AUTH after XCLIENT");
        F.sent_auth = true;
    } else if (F.cfg.auth == STP_AUTH_LOGIN && F.sent_auth &&
               ((F.auth_lines == 0 && n == 4 && memcmp(line, "ZGV2", 4) == 0) ||
                (F.auth_lines == 1 && n == 8 &&
                 memcmp(line, "czNjcmV0", 8) == 0))) {
        F.auth_lines++;
    } else if (n > 0) {
        CHECK(false, "unexpected line sent");
    }
}

static void op_start_tls(void *ctx)
{
    (void)ctx;
    CHECK(!F.ended, "start_tls after fail/ready");
    CHECK(F.in_call, "start_tls outside stp_up_input");
    CHECK(F.cfg.starttls, "start_tls not configured");
    CHECK(F.last_was_starttls, "start_tls without STARTTLS just sent");
    CHECK(!F.tls_pending && !F.tls_done, "start_tls twice");
    F.start_tls++;
    F.tls_pending = true;
}

static bool is_220_greeting(const char *g, size_t n)
{
    size_t i = 0;
    bool last_seen = false;
    if (n == 0)
        return false;
    while (i < n) {
        if (last_seen)
            return false; /* a line after the final one */
        const char *lf = memchr(g + i, '\n', n - i);
        if (!lf)
            return false;
        size_t e = (size_t)(lf - g); /* index of LF */
        if (e < i + 4 || g[e - 1] != '\r')
            return false; /* too short for "220" + CRLF, or no CR */
        size_t len = e - 1 - i;  /* line without CRLF */
        const char *l = g + i;
        if (memcmp(l, "220", 3) != 0)
            return false;
        if (memchr(l, '\r', len))
            return false;
        if (len == 3 || l[3] == ' ')
            last_seen = true;
        else if (l[3] != '-')
            return false;
        i = e + 1;
    }
    return last_seen;
}

static void op_ready(void *ctx, const char *g, size_t n)
{
    (void)ctx;
    CHECK(!F.ended, "ready after fail/ready");
    CHECK(!F.tls_pending, "ready during the handshake");
    CHECK(!F.cfg.starttls || F.tls_done || plaintext_ok(),
          "ready without the STARTTLS handshake");
    CHECK(!F.sent_starttls || F.tls_done, "ready after STARTTLS, without TLS");
    CHECK(!F.cfg.xclient || F.sent_xclient, "ready without XCLIENT sent");
    CHECK(!F.cfg.auth || (F.sent_auth && F.p.authed),
          "ready without AUTH accepted");
    CHECK(is_220_greeting(g, n), "greeting is not one 220 reply of CRLF lines");
    F.ended = true;
    F.readies++;
}

static void op_fail(void *ctx, enum stp_fail f, const char *reason)
{
    (void)ctx;
    CHECK(!F.ended, "fail after fail/ready");
    CHECK(!F.tls_pending, "fail during the handshake");
    CHECK(f == STP_FAIL_HOP_TLS || f == STP_FAIL_HOP_IDENTITY ||
              f == STP_FAIL_HOP_PROTOCOL ||
              (f == STP_FAIL_HOP_AUTH && F.cfg.auth) ||
              (f == STP_FAIL_UNREACHABLE && F.cfg.fallback),
          "bad failure category");
    CHECK(reason && *reason, "fail without a reason");
    /* The reason is logged: never the secret, raw or as this mechanism
     * sent it (a relay may quote any bytes, but only what it was sent can
     * come from us). */
    CHECK(F.cfg.auth == STP_AUTH_NONE ||
              (!strstr(reason, "s3cret") && !strstr(reason, "czNjcmV0") &&
               (F.cfg.auth != STP_AUTH_PLAIN ||
                !strstr(reason, &A_PLAIN[11])) &&
               (F.cfg.auth != STP_AUTH_XOAUTH2 ||
                !strstr(reason, &A_XOA[13]))),
          "the secret in a failure reason");
    CHECK(strncmp(reason, "internal error", 14) != 0, reason); /* step_to */
#if STRICT_FAIL_CATEGORY
    CHECK(f != STP_FAIL_HOP_TLS || F.cfg.starttls,
          "FAIL_TLS without STARTTLS configured");
#endif
    F.ended = true;
    F.fails++;
}

static const struct stp_up_ops ops = {
    .send = op_send,
    .start_tls = op_start_tls,
    .ready = op_ready,
    .fail = op_fail,
};

/* Does B[0..N) end with a final 220 reply line ("220", "220 ...") and its
 * LF? */
static bool ends_with_final_220(const char *b, size_t n)
{
    if (n < 4 || b[n - 1] != '\n')
        return false;
    size_t e = n - 1;
    if (e > 0 && b[e - 1] == '\r')
        e--;
    size_t s = e;
    while (s > 0 && b[s - 1] != '\n')
        s--;
    size_t len = e - s;
    return len >= 3 && memcmp(b + s, "220", 3) == 0 &&
           (len == 3 || b[s + 3] == ' ');
}

static void pump(void)
{
    for (int guard = 0; guard < 100000; guard++) {
        if (!F.ulen)
            return;
        enum stp_up_step before = F.p.step;
        int tls_before = F.start_tls;
        F.in_call = true;
        size_t k = stp_up_input(&F.p, F.ubuf, F.ulen);
        F.in_call = false;
        CHECK(k <= F.ulen, "consumed more than offered");
        if (before == STP_UP_TLS || before == STP_UP_READY ||
            before == STP_UP_FAILED)
            CHECK(k == 0, "bytes consumed after TLS/ready/fail");
        if (F.start_tls != tls_before) {
            CHECK(k == F.ulen, "start_tls with bytes after the 220");
            CHECK(ends_with_final_220(F.ubuf, F.ulen),
                  "start_tls, but the input does not end with a final 220");
            CHECK(F.p.step == STP_UP_TLS, "start_tls, step not TLS");
        }
        if (F.fails)
            CHECK(F.p.step == STP_UP_FAILED, "failed, step not FAILED");
        else if (F.readies)
            CHECK(F.p.step == STP_UP_READY, "ready, step not READY");
        memmove(F.ubuf, F.ubuf + k, F.ulen - k);
        F.ulen -= k;
        if (!k)
            return;
    }
    CHECK(false, "pump does not settle");
}

static uint32_t rng;
static uint32_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    memset(&F, 0, sizeof(F));
    uint8_t c = data[0];
    F.cfg.opportunistic = c & 16;
    F.cfg.starttls = (c & 1) || F.cfg.opportunistic;
    F.cfg.xclient = (c & 2) ? XCL : NULL;
    F.cfg.ehlo_name = names[(c >> 2) & 3];
    F.cfg.auth = (c >> 5) & 3; /* STP_AUTH_NONE .. STP_AUTH_XOAUTH2 */
    F.cfg.fallback = c & 128;
    F.cfg.user = "dev";
    F.cfg.secret = "s3cret";
    F.ehlo_len = (size_t)snprintf(F.ehlo, sizeof(F.ehlo), "EHLO %s",
                                  F.cfg.ehlo_name);
    rng = 0x9e3779b9u ^ ((uint32_t)data[1] * 0x01000193u) ^ (uint32_t)(c << 8);
    if (!rng)
        rng = 1;
    stp_up_init(&F.p, &F.cfg, &ops, NULL);
    CHECK(F.p.step == STP_UP_GREETING, "init step");

    const char *in = (const char *)data + 2;
    size_t n = size - 2, off = 0;
    /* Read sizes: whole lines (so a 220 often ends its read, as a real
     * server's does), or a few bytes, sometimes many. */
    while (off < n) {
        uint32_t r = next_rand();
        size_t len;
        if ((r & 3) == 0) {
            len = 1 + (r >> 8) % 4096;
        } else if ((r & 3) == 1) {
            len = 1 + (r >> 8) % 24;
        } else {
            unsigned lines = 1 + (r >> 8) % 3;
            len = 0;
            while (off + len < n && lines) {
                if (in[off + len++] == '\n')
                    lines--;
            }
        }
        if (len > n - off)
            len = n - off;
        if (F.ulen + len > BUF)
            break;
        memcpy(F.ubuf + F.ulen, in + off, len);
        F.ulen += len;
        off += len;
        pump();
        if (F.tls_pending) {
            /* the rest of the plaintext belongs to TLS (which would reject
             * it); the handshake completes */
            F.ulen = 0;
            F.tls_pending = false;
            F.tls_done = true;
            stp_up_tls_done(&F.p);
            CHECK(F.p.step != STP_UP_TLS, "still TLS after tls_done");
            CHECK(F.ended || F.ehlos == 2 || F.fails,
                  "after TLS: neither ready nor a second EHLO");
        }
        if (F.ended) {
            /* nothing is taken any more */
            CHECK(stp_up_input(&F.p, "220 x\r\n", 7) == 0,
                  "input consumed after the end");
            break;
        }
    }
    CHECK(!(F.readies && F.fails), "both ready and fail");
    CHECK(F.readies + F.fails <= 1, "ready/fail more than once");
    return 0;
}
