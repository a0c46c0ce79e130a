/* Unit tests for the upstream prelude (proxy/prelude.c): the proxy's own
 * dialogue with the upstream before a client is relayed (greeting, EHLO,
 * STARTTLS with its response-injection check, EHLO again after TLS,
 * XCLIENT).
 *
 * Scenarios are tables of steps driven through recording ops. Each runs with
 * the upstream's bytes fed whole (one call per step), split at every byte
 * position of the whole upstream stream (two calls), and one byte at a time.
 * The feeding loop behaves like the session: bytes stp_up_input() did not
 * consume stay buffered and are offered again with the next ones. A scenario
 * passes only if it passes in every mode. The response-injection cases,
 * whose verdict depends on where the reads fall, have their own test.
 * Last line printed: "N passed, N failed". */
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "config.h"
#include "prelude.h"

#include "unit.h"

static const char *fail_name(int f)
{
    switch (f) {
    case STP_FAIL_HOP_TLS:
        return "FAIL_TLS";
    case STP_FAIL_HOP_IDENTITY:
        return "FAIL_IDENTITY";
    case STP_FAIL_HOP_PROTOCOL:
        return "FAIL_PROTOCOL";
    case STP_FAIL_HOP_AUTH:
        return "FAIL_AUTH";
    case STP_FAIL_UNREACHABLE:
        return "FAIL_UNREACHABLE";
    }
    return "?";
}

/* ---- recording ops ------------------------------------------------------- */

#define REC_CAP 65536

struct rec {
    struct stp_prelude p;
    char sent[REC_CAP]; /* lines sent upstream, each + CRLF */
    size_t sent_len;
    int start_tls;
    bool tls_pending;  /* start_tls called, stp_up_tls_done not yet */
    int readies;
    char greeting[REC_CAP];
    size_t greeting_len;
    int fails;
    enum stp_fail fcat;
    char reason[200];
    bool in_call;      /* inside stp_up_input */
    char ubuf[REC_CAP]; /* upstream bytes not consumed yet */
    size_t ulen;
    char viol[300];    /* first broken invariant */
};

static struct rec R;

static void violation(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));
static void violation(const char *fmt, ...)
{
    if (R.viol[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(R.viol, sizeof(R.viol), fmt, ap);
    va_end(ap);
}

static void no_callback_after_end(const char *what)
{
    if (R.fails || R.readies)
        violation("%s after %s", what, R.fails ? "fail" : "ready");
    if (R.tls_pending)
        violation("%s while the TLS handshake is under way", what);
}

static void op_send(void *ctx, const char *line, size_t n)
{
    (void)ctx;
    no_callback_after_end("send");
    if (memchr(line, '\r', n) || memchr(line, '\n', n) || memchr(line, '\0', n))
        violation("sent line with CR/LF/NUL: \"%s\"", esc(line, n));
    if (R.sent_len + n + 2 > REC_CAP) {
        violation("recorder overflow");
        return;
    }
    memcpy(R.sent + R.sent_len, line, n);
    memcpy(R.sent + R.sent_len + n, "\r\n", 2);
    R.sent_len += n + 2;
}

static void op_start_tls(void *ctx)
{
    (void)ctx;
    no_callback_after_end("start_tls");
    if (!R.in_call)
        violation("start_tls outside stp_up_input");
    R.start_tls++;
    R.tls_pending = true;
}

static void op_ready(void *ctx, const char *g, size_t n)
{
    (void)ctx;
    no_callback_after_end("ready");
    R.readies++;
    if (n > REC_CAP) {
        violation("greeting of %zu bytes", n);
        return;
    }
    memcpy(R.greeting, g, n);
    R.greeting_len = n;
}

static void op_fail(void *ctx, enum stp_fail f, const char *reason)
{
    (void)ctx;
    no_callback_after_end("fail");
    R.fails++;
    R.fcat = f;
    snprintf(R.reason, sizeof(R.reason), "%s", reason ? reason : "(null)");
    if (!reason)
        violation("fail with a NULL reason");
    else if (strstr(reason, "illegal"))
        violation("prelude reports a bug: %s", reason);
}

static const struct stp_up_ops rec_ops = {
    .send = op_send,
    .start_tls = op_start_tls,
    .ready = op_ready,
    .fail = op_fail,
};

/* Offer the buffered bytes until the prelude stops consuming. */
static void pump(void)
{
    for (int guard = 0; guard < 100000 && R.ulen; guard++) {
        enum stp_up_step before = R.p.step;
        int tls_before = R.start_tls;
        R.in_call = true;
        size_t k = stp_up_input(&R.p, R.ubuf, R.ulen);
        R.in_call = false;
        if (k > R.ulen) {
            violation("stp_up_input consumed %zu of %zu", k, R.ulen);
            k = R.ulen;
        }
        if (k && (before == STP_UP_TLS || before == STP_UP_READY ||
                  before == STP_UP_FAILED))
            violation("%zu bytes consumed in step %s: \"%s\"", k,
                      stp_up_step_name(before), esc(R.ubuf, k));
        if (R.start_tls != tls_before && k != R.ulen)
            violation("start_tls with %zu bytes after the 220 in the same "
                      "input: \"%s\"", R.ulen - k, esc(R.ubuf + k, R.ulen - k));
        if ((R.fails && R.p.step != STP_UP_FAILED) ||
            (R.readies && !R.fails && R.p.step != STP_UP_READY) ||
            (R.tls_pending && R.p.step != STP_UP_TLS))
            violation("step %s after the callbacks",
                      stp_up_step_name(R.p.step));
        memmove(R.ubuf, R.ubuf + k, R.ulen - k);
        R.ulen -= k;
        if (!k)
            return;
    }
}

static void feed(const char *p, size_t n)
{
    if (R.ulen + n > REC_CAP) {
        violation("recorder overflow");
        return;
    }
    memcpy(R.ubuf + R.ulen, p, n);
    R.ulen += n;
    pump();
}

/* ---- scenarios ----------------------------------------------------------- */

enum step_op {
    S_END = 0,
    S_U,    /* upstream bytes */
    S_TLS,  /* the handshake completed: stp_up_tls_done() */
    S_STEP, /* the prelude is in step N now */
    S_LEFT, /* N upstream bytes are buffered, unconsumed */
};

struct step {
    enum step_op op;
    const char *p;
    size_t n;
};

#define U(s) {S_U, s, 0}
#define UN(s) {S_U, s, sizeof(s) - 1} /* with NULs */
#define TLS {S_TLS, NULL, 0}
#define STEP(s) {S_STEP, NULL, s}
#define LEFT(k) {S_LEFT, NULL, k}

enum outcome { PENDING, READY, FAILED };
#define ANY_CAT -1

struct scen {
    const char *name;
    int cfg; /* CF_* bits */
    struct step steps[12];
    const char *sent;     /* all lines sent, CRLF-terminated */
    int start_tls;
    enum outcome out;
    const char *greeting; /* READY: the greeting handed on */
    int cat;              /* FAILED: category or ANY_CAT */
    const char *reason;   /* FAILED: substring of the reason, or NULL */
};

#define CF_NONE 0
#define CF_TLS 1
#define CF_XC 2
#define CF_BOTH 3
#define CF_LMTP 4
#define CF_OPP 8 /* tls = opportunistic: STARTTLS only when offered */
#define CF_FB 16 /* another address is left: a refusing greeting is one */
#define CF_PLAIN 32 /* auth = plain, login, xoauth2 as dev / s3cret */
#define CF_LOGIN 64
#define CF_XOA 128

#define NAME "proxy.example"
#define XCL "XCLIENT ADDR=192.0.2.7 PORT=41234 NAME=[UNAVAILABLE]"
#define EHLO "EHLO " NAME "\r\n"
#define STLS "STARTTLS\r\n"
#define XCLS XCL "\r\n"
#define GREET "220 mx.example ESMTP\r\n"
#define E_TLS                                                                  \
    "250-mx.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
#define E_XC "250-mx.example\r\n250-XCLIENT NAME ADDR PORT\r\n250 8BITMIME\r\n"
#define E_BOTH "250-mx.example\r\n250-XCLIENT ADDR\r\n250 STARTTLS\r\n"
#define E_NONE "250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
#define GO "220 2.0.0 Ready to start TLS\r\n"
#define NEWG "220 mx.example ESMTP after XCLIENT\r\n"
#define E_AUTH "250-mx.example\r\n250-AUTH PLAIN LOGIN XOAUTH2\r\n250 8BITMIME\r\n"
#define E_TLS_AUTH "250-mx.example\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n"
#define OK235 "235 2.7.0 Authentication successful\r\n"
#define NO535 "535 5.7.8 Error: authentication failed\r\n"
#define A_PLAIN "AUTH PLAIN AGRldgBzM2NyZXQ=\r\n"      /* \0dev\0s3cret */
#define A_XOA "AUTH XOAUTH2 dXNlcj1kZXYBYXV0aD1CZWFyZXIgczNjcmV0AQE=\r\n"

/* Long lines, built at start-up. */
static char line_2048[2100]; /* "250 xxx…\r\n": 2048 bytes with its CRLF */
static char line_2049[2100]; /* one more */
static char greet_1024[1100]; /* a greeting of exactly 1024 bytes */
static char greet_1025[1100];
static char ehlo_2048[2200];  /* EHLO reply whose last line is 2048 bytes */
static char ehlo_2049[2200];

static void init_dynamic(void)
{
    /* "250 " + 2042 x + CRLF = 2048 */
    strcpy(line_2048, "250 ");
    memset(line_2048 + 4, 'x', 2042);
    strcpy(line_2048 + 2046, "\r\n");
    strcpy(line_2049, "250 ");
    memset(line_2049 + 4, 'x', 2043);
    strcpy(line_2049 + 2047, "\r\n");
    snprintf(ehlo_2048, sizeof(ehlo_2048), "250-mx\r\n250-STARTTLS\r\n%s",
             line_2048);
    snprintf(ehlo_2049, sizeof(ehlo_2049), "250-mx\r\n250-STARTTLS\r\n%s",
             line_2049);
    /* 8 lines "220-" + 122 bytes + CRLF = 128 each: 1024 */
    size_t o = 0;
    for (int i = 0; i < 8; i++) {
        memcpy(greet_1024 + o, i < 7 ? "220-" : "220 ", 4);
        memset(greet_1024 + o + 4, 'g', 122);
        memcpy(greet_1024 + o + 126, "\r\n", 2);
        o += 128;
    }
    greet_1024[o] = 0;
    memcpy(greet_1025, greet_1024, 1024);
    /* one more text byte in the last line */
    memcpy(greet_1025 + 1024 - 2, "g\r\n", 4);
}

static const struct scen scens[] = {
    /* --- nothing configured: the greeting is all --- */
    {"none: ready after the greeting, nothing sent", CF_NONE,
     {U(GREET), STEP(STP_UP_READY)}, "", 0, READY, GREET, 0, NULL},
    {"none: multi-line greeting passed on whole", CF_NONE,
     {U("220-mx.example ESMTP\r\n220-second line\r\n220 last\r\n")}, "", 0,
     READY, "220-mx.example ESMTP\r\n220-second line\r\n220 last\r\n", 0,
     NULL},
    {"none: bare 220", CF_NONE, {U("220\r\n")}, "", 0, READY, "220\r\n", 0,
     NULL},
    {"none: LF-only greeting becomes CRLF", CF_NONE,
     {U("220-a\n220 b\n")}, "", 0, READY, "220-a\r\n220 b\r\n", 0, NULL},
    {"none: greeting not ready until its last line", CF_NONE,
     {U("220-a\r\n"), STEP(STP_UP_GREETING), U("220 b\r\n")}, "", 0, READY,
     "220-a\r\n220 b\r\n", 0, NULL},
    {"none: bytes after the greeting are left to the session", CF_NONE,
     {U(GREET "250 early\r\n"), LEFT(11), U("x"), LEFT(12)}, "", 0, READY,
     GREET, 0, NULL},
    {"none: greeting of exactly 1024 bytes", CF_NONE, {U(greet_1024)}, "", 0,
     READY, greet_1024, 0, NULL},
    {"none: greeting over 1024 bytes", CF_NONE, {U(greet_1025)}, "", 0, FAILED,
     NULL, STP_FAIL_HOP_PROTOCOL, NULL},
    {"none: 554 greeting fails", CF_NONE, {U("554 go away\r\n")}, "", 0,
     FAILED, NULL, ANY_CAT, NULL},
    {"none: no greeting yet", CF_NONE, {U("220 partial"),
     STEP(STP_UP_GREETING), LEFT(11)}, "", 0, PENDING, NULL, 0, NULL},

    /* --- bad reply lines (greeting) --- */
    {"bad: no code", CF_TLS, {U("hello there\r\n")}, "", 0, FAILED, NULL,
     STP_FAIL_HOP_PROTOCOL, NULL},
    {"bad: empty line", CF_TLS, {U("\r\n")}, "", 0, FAILED, NULL,
     STP_FAIL_HOP_PROTOCOL, NULL},
    {"bad: two-digit code", CF_TLS, {U("22 x\r\n")}, "", 0, FAILED, NULL,
     STP_FAIL_HOP_PROTOCOL, NULL},
    {"bad: four digits", CF_TLS, {U("2200 x\r\n")}, "", 0, FAILED, NULL,
     STP_FAIL_HOP_PROTOCOL, NULL},
    {"bad: code 620", CF_TLS, {U("620 x\r\n")}, "", 0, FAILED, NULL,
     STP_FAIL_HOP_PROTOCOL, NULL},
    {"bad: code changes mid-reply", CF_TLS, {U("220-a\r\n250 b\r\n")}, "", 0,
     FAILED, NULL, STP_FAIL_HOP_PROTOCOL, NULL},
    {"bad: CR inside the line", CF_TLS, {U("220 a\rb\r\n")}, "", 0, FAILED,
     NULL, STP_FAIL_HOP_PROTOCOL, NULL},
    {"bad: CR before CRLF", CF_NONE, {U("220 a\r\r\n")}, "", 0, FAILED, NULL,
     STP_FAIL_HOP_PROTOCOL, NULL},
    {"bad: over-long line", CF_TLS, {U(line_2049)}, "", 0, FAILED, NULL,
     STP_FAIL_HOP_PROTOCOL, "too long"},

    /* --- STARTTLS --- */
    {"tls: the whole dialogue, original greeting kept", CF_TLS,
     {U(GREET), STEP(STP_UP_EHLO), U(E_TLS), STEP(STP_UP_STARTTLS), U(GO),
      STEP(STP_UP_TLS), TLS, STEP(STP_UP_READY)},
     EHLO STLS, 1, READY, GREET, 0, NULL},
    {"lmtp: LHLO where SMTP says EHLO", CF_TLS | CF_LMTP,
     {U(GREET), U(E_TLS), U(GO), TLS},
     "LHLO " NAME "\r\n" STLS, 1, READY, GREET, 0, NULL},
    {"tls: multi-line greeting kept across TLS", CF_TLS,
     {U("220-mx.example\r\n220 ESMTP\r\n"), U(E_TLS), U(GO), TLS},
     EHLO STLS, 1, READY, "220-mx.example\r\n220 ESMTP\r\n", 0, NULL},
    {"tls: multi-line 220 to STARTTLS", CF_TLS,
     {U(GREET), U(E_TLS), U("220-go\r\n220 ahead\r\n"), TLS}, EHLO STLS, 1,
     READY, GREET, 0, NULL},
    {"tls: greeting and EHLO reply in one read", CF_TLS,
     {U(GREET E_TLS), U(GO), TLS}, EHLO STLS, 1, READY, GREET, 0, NULL},
    {"tls: nothing consumed after the 220 (a later read belongs to TLS)",
     CF_TLS, {U(GREET), U(E_TLS), U(GO), U("250 x\r\n"), STEP(STP_UP_TLS),
     LEFT(7)}, EHLO STLS, 1, PENDING, NULL, 0, NULL},
    {"tls: nothing consumed after the handshake either", CF_TLS,
     {U(GREET), U(E_TLS), U(GO), TLS, U("250 x\r\n"), LEFT(7)}, EHLO STLS, 1,
     READY, GREET, 0, NULL},
    {"tls: waits for STARTTLS's reply", CF_TLS,
     {U(GREET), U(E_TLS), U("220 2.0.0 Rea"), STEP(STP_UP_STARTTLS)},
     EHLO STLS, 0, PENDING, NULL, 0, NULL},
    {"tls: 554 greeting", CF_TLS, {U("554 5.3.2 go away\r\n")}, "", 0, FAILED,
     NULL, STP_FAIL_HOP_TLS, NULL},
    {"tls: 421 multi-line greeting", CF_TLS,
     {U("421-mx.example\r\n421 busy\r\n")}, "", 0, FAILED, NULL,
     STP_FAIL_HOP_TLS, NULL},
    /* The same keyword matcher as the client's EHLO filter: what the proxy
     * hides from a client as STARTTLS is what it takes as STARTTLS. */
    {"tls: STARTTLS<TAB> and a blank before it are STARTTLS", CF_TLS,
     {U(GREET), U("250-mx\r\n250- STARTTLS\t\r\n250 SIZE\r\n"), U(GO), TLS},
     EHLO STLS, 1, READY, GREET, 0, NULL},
    {"tls: STARTTLSX is not STARTTLS", CF_TLS,
     {U(GREET), U("250-mx\r\n250-STARTTLSX\r\n250 SIZE\r\n")}, EHLO, 0,
     FAILED, NULL, STP_FAIL_HOP_TLS, NULL},
    {"tls: EHLO without STARTTLS", CF_TLS, {U(GREET), U(E_NONE), U(GO)}, EHLO,
     0, FAILED, NULL, STP_FAIL_HOP_TLS, NULL},
    {"tls: EHLO refused", CF_TLS, {U(GREET), U("502 5.5.1 no EHLO\r\n")},
     EHLO, 0, FAILED, NULL, STP_FAIL_HOP_TLS, NULL},
    {"tls: STARTTLS in a refused EHLO reply does not count", CF_TLS,
     {U(GREET), U("550-x\r\n550 STARTTLS\r\n")}, EHLO, 0, FAILED, NULL,
     STP_FAIL_HOP_TLS, NULL},
    {"tls: 454 to STARTTLS", CF_TLS,
     {U(GREET), U(E_TLS), U("454 4.7.0 TLS not available\r\n"), U(GO)},
     EHLO STLS, 0, FAILED, NULL, STP_FAIL_HOP_TLS, NULL},
    {"tls: 501 to STARTTLS", CF_TLS,
     {U(GREET), U(E_TLS), U("501 5.5.4 Syntax\r\n")}, EHLO STLS, 0, FAILED,
     NULL, STP_FAIL_HOP_TLS, NULL},
    {"tls: 250 to STARTTLS", CF_TLS, {U(GREET), U(E_TLS), U("250 ok\r\n")},
     EHLO STLS, 0, FAILED, NULL, STP_FAIL_HOP_TLS, NULL},
    {"tls: code change in STARTTLS's reply", CF_TLS,
     {U(GREET), U(E_TLS), U("220-go\r\n250 x\r\n")}, EHLO STLS, 0, FAILED,
     NULL, STP_FAIL_HOP_PROTOCOL, NULL},
    {"tls: code change in the EHLO reply", CF_TLS,
     {U(GREET), U("250-mx\r\n251-STARTTLS\r\n251 x\r\n")}, EHLO, 0, FAILED,
     NULL, STP_FAIL_HOP_PROTOCOL, NULL},
    {"tls: CR inside an EHLO line (STARTTLS<CR>)", CF_TLS,
     {U(GREET), U("250-mx\r\n250-STARTTLS\r\r\n250 SIZE\r\n")}, EHLO, 0,
     FAILED, NULL, STP_FAIL_HOP_PROTOCOL, NULL},
    {"tls: EHLO line without a code", CF_TLS,
     {U(GREET), U("250-mx\r\nSTARTTLS\r\n250 SIZE\r\n")}, EHLO, 0, FAILED,
     NULL, STP_FAIL_HOP_PROTOCOL, NULL},
    {"tls: EHLO line of 2048 bytes is accepted", CF_TLS,
     {U(GREET), U(ehlo_2048), U(GO), TLS}, EHLO STLS, 1, READY, GREET, 0,
     NULL},
    {"tls: EHLO line of 2049 bytes is refused", CF_TLS,
     {U(GREET), U(ehlo_2049)}, EHLO, 0, FAILED, NULL, STP_FAIL_HOP_PROTOCOL,
     "too long"},

    /* --- keyword matching --- */
    {"kw: 250 STARTTLS as the last line", CF_TLS,
     {U(GREET), U("250-mx\r\n250 STARTTLS\r\n"), U(GO), TLS}, EHLO STLS, 1,
     READY, GREET, 0, NULL},
    {"kw: lower case starttls", CF_TLS,
     {U(GREET), U("250-mx\r\n250-starttls\r\n250 SIZE\r\n"), U(GO), TLS},
     EHLO STLS, 1, READY, GREET, 0, NULL},
    {"kw: mixed case StartTLS", CF_TLS,
     {U(GREET), U("250-mx\r\n250 StartTls\r\n"), U(GO), TLS}, EHLO STLS, 1,
     READY, GREET, 0, NULL},
    {"kw: leading blanks", CF_TLS,
     {U(GREET), U("250-mx\r\n250-  \tSTARTTLS\r\n250 SIZE\r\n"), U(GO), TLS},
     EHLO STLS, 1, READY, GREET, 0, NULL},
    {"kw: LF-only EHLO reply", CF_TLS,
     {U(GREET), U("250-mx\n250 STARTTLS\n"), U(GO), TLS}, EHLO STLS, 1,
     READY, GREET, 0, NULL},
    {"kw: STARTTLSX is not STARTTLS", CF_TLS,
     {U(GREET), U("250-mx\r\n250-STARTTLSX\r\n250 SIZE\r\n")}, EHLO, 0,
     FAILED, NULL, STP_FAIL_HOP_TLS, NULL},
    {"kw: X-STARTTLS is not STARTTLS", CF_TLS,
     {U(GREET), U("250-mx\r\n250-X-STARTTLS\r\n250 SIZE\r\n")}, EHLO, 0,
     FAILED, NULL, STP_FAIL_HOP_TLS, NULL},
    {"kw: STARTTLS as a parameter is not STARTTLS", CF_TLS,
     {U(GREET), U("250-mx\r\n250-AUTH STARTTLS\r\n250 SIZE\r\n")}, EHLO, 0,
     FAILED, NULL, STP_FAIL_HOP_TLS, NULL},
    {"kw: STARTTL is not STARTTLS", CF_TLS,
     {U(GREET), U("250-mx\r\n250 STARTTL\r\n")}, EHLO, 0, FAILED, NULL,
     STP_FAIL_HOP_TLS, NULL},
    {"kw: 250-XCLIENT NAME ADDR", CF_XC,
     {U(GREET), U("250-mx\r\n250-XCLIENT NAME ADDR\r\n250 SIZE\r\n"), U(NEWG)},
     EHLO XCLS, 0, READY, NEWG, 0, NULL},
    {"kw: 250 xclient addr (lower case, last line)", CF_XC,
     {U(GREET), U("250-mx\r\n250 xclient addr\r\n"), U(NEWG)}, EHLO XCLS, 0,
     READY, NEWG, 0, NULL},
    {"kw: XCLIENT with leading blanks", CF_XC,
     {U(GREET), U("250-mx\r\n250-   XCLIENT ADDR\r\n250 SIZE\r\n"), U(NEWG)},
     EHLO XCLS, 0, READY, NEWG, 0, NULL},
    {"kw: bare XCLIENT", CF_XC,
     {U(GREET), U("250-mx\r\n250 XCLIENT\r\n"), U(NEWG)}, EHLO XCLS, 0, READY,
     NEWG, 0, NULL},
    {"kw: XCLIENTS is not XCLIENT", CF_XC,
     {U(GREET), U("250-mx\r\n250 XCLIENTS ADDR\r\n")}, EHLO, 0, FAILED, NULL,
     STP_FAIL_HOP_IDENTITY, NULL},
    {"kw: XFORWARD is not XCLIENT", CF_XC,
     {U(GREET), U("250-mx\r\n250 XFORWARD NAME ADDR\r\n")}, EHLO, 0, FAILED,
     NULL, STP_FAIL_HOP_IDENTITY, NULL},

    /* --- XCLIENT only --- */
    {"xc: the whole dialogue, the new greeting replaces the old", CF_XC,
     {U(GREET), STEP(STP_UP_EHLO), U(E_XC), STEP(STP_UP_XCLIENT), U(NEWG),
      STEP(STP_UP_READY)},
     EHLO XCLS, 0, READY, NEWG, 0, NULL},
    {"xc: multi-line new greeting", CF_XC,
     {U("220-old\r\n220 old\r\n"), U(E_XC),
      U("220-new one\r\n220 new two\r\n")},
     EHLO XCLS, 0, READY, "220-new one\r\n220 new two\r\n", 0, NULL},
    {"xc: greeting and EHLO reply in one read", CF_XC,
     {U(GREET E_XC), U(NEWG)}, EHLO XCLS, 0, READY, NEWG, 0, NULL},
    {"xc: bytes after the new greeting are left to the session", CF_XC,
     {U(GREET), U(E_XC), U(NEWG "250 x\r\n"), LEFT(7)}, EHLO XCLS, 0, READY,
     NEWG, 0, NULL},
    {"xc: new greeting of exactly 1024 bytes", CF_XC,
     {U(GREET), U(E_XC), U(greet_1024)}, EHLO XCLS, 0, READY, greet_1024, 0,
     NULL},
    {"xc: new greeting over 1024 bytes", CF_XC,
     {U(GREET), U(E_XC), U(greet_1025)}, EHLO XCLS, 0, FAILED, NULL,
     STP_FAIL_HOP_PROTOCOL, "too long"},
    {"xc: XCLIENT not offered", CF_XC, {U(GREET), U(E_NONE), U(NEWG)}, EHLO, 0,
     FAILED, NULL, STP_FAIL_HOP_IDENTITY, NULL},
    {"xc: XCLIENT answered 550", CF_XC,
     {U(GREET), U(E_XC), U("550 5.7.0 insufficient authorization\r\n")},
     EHLO XCLS, 0, FAILED, NULL, STP_FAIL_HOP_IDENTITY, NULL},
    {"xc: XCLIENT answered 421 multi-line", CF_XC,
     {U(GREET), U(E_XC), U("421-a\r\n421 b\r\n")}, EHLO XCLS, 0, FAILED, NULL,
     STP_FAIL_HOP_IDENTITY, NULL},
    {"xc: XCLIENT answered 250", CF_XC,
     {U(GREET), U(E_XC), U("250 ok\r\n")}, EHLO XCLS, 0, FAILED, NULL,
     STP_FAIL_HOP_IDENTITY, NULL},
    {"xc: code change in XCLIENT's reply", CF_XC,
     {U(GREET), U(E_XC), U("220-a\r\n250 b\r\n")}, EHLO XCLS, 0, FAILED, NULL,
     STP_FAIL_HOP_PROTOCOL, NULL},
    {"xc: EHLO refused", CF_XC, {U(GREET), U("502 5.5.1 no\r\n")}, EHLO, 0,
     FAILED, NULL, STP_FAIL_HOP_IDENTITY, NULL},
    {"xc: 554 greeting", CF_XC, {U("554 no\r\n")}, "", 0, FAILED, NULL,
     ANY_CAT, NULL},
    {"xc: STARTTLS offered but not configured: not used", CF_XC,
     {U(GREET), U("250-mx\r\n250-STARTTLS\r\n250 XCLIENT ADDR\r\n"), U(NEWG)},
     EHLO XCLS, 0, READY, NEWG, 0, NULL},

    /* --- STARTTLS + XCLIENT --- */
    {"both: whole dialogue, EHLO again after TLS", CF_BOTH,
     {U(GREET), U(E_BOTH), STEP(STP_UP_STARTTLS), U(GO), STEP(STP_UP_TLS),
      TLS, STEP(STP_UP_EHLO), U(E_XC), STEP(STP_UP_XCLIENT), U(NEWG)},
     EHLO STLS EHLO XCLS, 1, READY, NEWG, 0, NULL},
    {"both: XCLIENT seen before TLS does not count after it", CF_BOTH,
     {U(GREET), U(E_BOTH), U(GO), TLS, U(E_NONE), U(NEWG)},
     EHLO STLS EHLO, 1, FAILED, NULL, STP_FAIL_HOP_IDENTITY, NULL},
    {"both: XCLIENT offered only after TLS", CF_BOTH,
     {U(GREET), U(E_TLS), U(GO), TLS, U(E_XC), U(NEWG)},
     EHLO STLS EHLO XCLS, 1, READY, NEWG, 0, NULL},
    {"both: STARTTLS missing, XCLIENT offered", CF_BOTH,
     {U(GREET), U(E_XC), U(GO)}, EHLO, 0, FAILED, NULL, STP_FAIL_HOP_TLS, NULL},
    {"both: second EHLO refused", CF_BOTH,
     {U(GREET), U(E_BOTH), U(GO), TLS, U("554 no\r\n")}, EHLO STLS EHLO, 1,
     FAILED, NULL, STP_FAIL_HOP_IDENTITY, NULL},
    {"both: XCLIENT refused after TLS", CF_BOTH,
     {U(GREET), U(E_BOTH), U(GO), TLS, U(E_XC), U("550 no\r\n")},
     EHLO STLS EHLO XCLS, 1, FAILED, NULL, STP_FAIL_HOP_IDENTITY, NULL},
    {"both: 421 greeting", CF_BOTH, {U("421 busy\r\n")}, "", 0, FAILED, NULL,
     STP_FAIL_HOP_TLS, NULL},

    /* --- opportunistic: STARTTLS when offered, else plaintext; once
     * offered, never a downgrade --- */
    {"opp: STARTTLS offered: the whole TLS dialogue", CF_OPP,
     {U(GREET), STEP(STP_UP_EHLO), U(E_TLS), STEP(STP_UP_STARTTLS), U(GO),
      STEP(STP_UP_TLS), TLS, STEP(STP_UP_READY)},
     EHLO STLS, 1, READY, GREET, 0, NULL},
    {"opp: STARTTLS not offered: ready in plaintext, greeting kept", CF_OPP,
     {U(GREET), STEP(STP_UP_EHLO), U(E_NONE), STEP(STP_UP_READY)}, EHLO, 0,
     READY, GREET, 0, NULL},
    {"opp: plaintext, bytes after the EHLO reply left to the session", CF_OPP,
     {U(GREET), U(E_NONE "250 x\r\n"), LEFT(7)}, EHLO, 0, READY, GREET, 0,
     NULL},
    {"opp: STARTTLSX is not STARTTLS: plaintext", CF_OPP,
     {U(GREET), U("250-mx\r\n250 STARTTLSX\r\n")}, EHLO, 0, READY, GREET, 0,
     NULL},
    {"opp: STARTTLS in the first (name) line does not count", CF_OPP,
     {U(GREET), U("250-STARTTLS\r\n250 SIZE\r\n")}, EHLO, 0, READY, GREET,
     0, NULL},
    {"opp: lmtp, LHLO reply without STARTTLS", CF_OPP | CF_LMTP,
     {U(GREET), U(E_NONE)}, "LHLO " NAME "\r\n", 0, READY, GREET, 0, NULL},
    {"opp: 454 to STARTTLS fails, no downgrade", CF_OPP,
     {U(GREET), U(E_TLS), U("454 4.7.0 TLS not available\r\n")}, EHLO STLS,
     0, FAILED, NULL, STP_FAIL_HOP_TLS, "STARTTLS refused"},
    {"opp: 501 to STARTTLS fails", CF_OPP,
     {U(GREET), U(E_TLS), U("501 5.5.4 Syntax\r\n")}, EHLO STLS, 0, FAILED,
     NULL, STP_FAIL_HOP_TLS, NULL},
    {"opp: 250 to STARTTLS fails", CF_OPP,
     {U(GREET), U(E_TLS), U("250 ok\r\n")}, EHLO STLS, 0, FAILED, NULL,
     STP_FAIL_HOP_TLS, NULL},
    {"opp: EHLO unknown (502, an RFC 821 server): plaintext", CF_OPP,
     {U(GREET), U("502 5.5.1 no EHLO\r\n")}, EHLO, 0, READY, GREET, 0,
     NULL},
    {"opp: EHLO unknown (500): plaintext", CF_OPP,
     {U(GREET), U("500 5.5.2 what?\r\n")}, EHLO, 0, READY, GREET, 0, NULL},
    {"opp: EHLO refused otherwise (554) fails", CF_OPP,
     {U(GREET), U("554 5.7.1 go away\r\n")}, EHLO, 0, FAILED, NULL,
     STP_FAIL_HOP_TLS, "EHLO refused"},
    {"opp+xc: EHLO unknown: no XCLIENT without EHLO, fails", CF_OPP | CF_XC,
     {U(GREET), U("502 5.5.1 no EHLO\r\n")}, EHLO, 0, FAILED, NULL,
     ANY_CAT, "EHLO refused"},
    {"opp: 554 greeting fails", CF_OPP, {U("554 no\r\n")}, "", 0, FAILED,
     NULL, ANY_CAT, NULL},
    {"opp+xc: not offered, XCLIENT offered: XCLIENT in plaintext",
     CF_OPP | CF_XC,
     {U(GREET), STEP(STP_UP_EHLO), U(E_XC), STEP(STP_UP_XCLIENT), U(NEWG),
      STEP(STP_UP_READY)},
     EHLO XCLS, 0, READY, NEWG, 0, NULL},
    {"opp+xc: neither offered: XCLIENT missing fails", CF_OPP | CF_XC,
     {U(GREET), U(E_NONE)}, EHLO, 0, FAILED, NULL, STP_FAIL_HOP_IDENTITY,
     "XCLIENT not offered"},
    {"opp+xc: both offered: EHLO again after TLS, then XCLIENT",
     CF_OPP | CF_XC,
     {U(GREET), U(E_BOTH), STEP(STP_UP_STARTTLS), U(GO), STEP(STP_UP_TLS),
      TLS, STEP(STP_UP_EHLO), U(E_XC), STEP(STP_UP_XCLIENT), U(NEWG)},
     EHLO STLS EHLO XCLS, 1, READY, NEWG, 0, NULL},
    {"opp+xc: XCLIENT seen before TLS does not count after it",
     CF_OPP | CF_XC,
     {U(GREET), U(E_BOTH), U(GO), TLS, U(E_NONE)}, EHLO STLS EHLO, 1, FAILED,
     NULL, STP_FAIL_HOP_IDENTITY, NULL},
    {"opp+xc: 454 to STARTTLS fails, no XCLIENT in plaintext",
     CF_OPP | CF_XC,
     {U(GREET), U(E_BOTH), U("454 4.7.0 no\r\n")}, EHLO STLS, 0, FAILED,
     NULL, STP_FAIL_HOP_TLS, NULL},

    /* --- another address left: a refusing greeting is unreachable --- */
    {"fallback: 421 greeting is unreachable, quoted", CF_FB,
     {U("421 4.3.2 busy\r\n")}, "", 0, FAILED, NULL, STP_FAIL_UNREACHABLE,
     "greeting: 421 4.3.2 busy"},
    {"fallback: 554 greeting with STARTTLS too", CF_FB | CF_TLS,
     {U("554 5.7.1 no\r\n")}, "", 0, FAILED, NULL, STP_FAIL_UNREACHABLE,
     "554"},
    {"fallback: 220 greeting: ready, passed on", CF_FB, {U(GREET)}, "", 0,
     READY, GREET, 0, NULL},

    /* --- the proxy's own login (RFC 4954) --- */
    {"plain: after STARTTLS, EHLO again, one round trip", CF_TLS | CF_PLAIN,
     {U(GREET), U(E_TLS), U(GO), STEP(STP_UP_TLS), TLS, STEP(STP_UP_EHLO),
      U(E_AUTH), STEP(STP_UP_AUTH), U(OK235), STEP(STP_UP_READY)},
     EHLO STLS EHLO A_PLAIN, 1, READY, GREET, 0, NULL},
    {"plain: implicit TLS: EHLO for the mechanisms first", CF_PLAIN,
     {U(GREET), STEP(STP_UP_EHLO), U(E_AUTH), U(OK235)}, EHLO A_PLAIN, 0,
     READY, GREET, 0, NULL},
    {"plain: AUTH offered only before TLS does not count",
     CF_TLS | CF_PLAIN,
     {U(GREET), U(E_TLS_AUTH), U(GO), TLS, U(E_NONE)}, EHLO STLS EHLO, 1,
     FAILED, NULL, STP_FAIL_HOP_AUTH, "AUTH PLAIN not offered"},
    {"plain: mechanism not offered", CF_PLAIN,
     {U(GREET), U("250-mx\r\n250 AUTH LOGIN\r\n")}, EHLO, 0, FAILED, NULL,
     STP_FAIL_HOP_AUTH, "not offered"},
    {"plain: old AUTH=PLAIN form counts", CF_PLAIN,
     {U(GREET), U("250-mx\r\n250 AUTH=LOGIN PLAIN\r\n"), U(OK235)},
     EHLO A_PLAIN, 0, READY, GREET, 0, NULL},
    {"plain: AUTH in the name line does not count", CF_PLAIN,
     {U(GREET), U("250-AUTH PLAIN\r\n250 8BITMIME\r\n")}, EHLO, 0, FAILED,
     NULL, STP_FAIL_HOP_AUTH, "not offered"},
    {"plain: 535 refused, quoted", CF_PLAIN,
     {U(GREET), U(E_AUTH), U(NO535)}, EHLO A_PLAIN, 0, FAILED, NULL,
     STP_FAIL_HOP_AUTH, "AUTH refused: 535 5.7.8"},
    {"plain: a refusal quoting what was sent is logged without it",
     CF_PLAIN,
     {U(GREET), U(E_AUTH),
      U("535 5.7.8 AGRldgBzM2NyZXQ= (s3cret) is wrong\r\n")},
     EHLO A_PLAIN, 0, FAILED, NULL, STP_FAIL_HOP_AUTH,
     "AUTH refused: 535 5.7.8 *** (***) is wrong"},
    {"login: a refusal quoting the password's base64 is logged without it",
     CF_LOGIN,
     {U(GREET), U(E_AUTH), U("334 VXNlcm5hbWU6\r\n"),
      U("334 UGFzc3dvcmQ6\r\n"), U("535 5.7.8 czNjcmV0 rejected\r\n")},
     EHLO "AUTH LOGIN\r\nZGV2\r\nczNjcmV0\r\n", 0, FAILED, NULL,
     STP_FAIL_HOP_AUTH, "AUTH refused: 535 5.7.8 *** rejected"},
    {"xoauth2: a refusal quoting the token is logged without it", CF_XOA,
     {U(GREET), U(E_AUTH),
      U("535 5.7.8 dXNlcj1kZXYBYXV0aD1CZWFyZXIgczNjcmV0AQE= s3cret\r\n")},
     EHLO A_XOA, 0, FAILED, NULL, STP_FAIL_HOP_AUTH,
     "AUTH refused: 535 5.7.8 *** ***"},
    {"plain: 334 to an initial response is refused", CF_PLAIN,
     {U(GREET), U(E_AUTH), U("334 \r\n")}, EHLO A_PLAIN, 0, FAILED, NULL,
     STP_FAIL_HOP_AUTH, "AUTH refused: 334"},
    {"plain: EHLO refused is an AUTH failure", CF_PLAIN,
     {U(GREET), U("502 5.5.1 no\r\n")}, EHLO, 0, FAILED, NULL,
     STP_FAIL_HOP_AUTH, "EHLO refused"},
    {"login: user and password prompts", CF_LOGIN,
     {U(GREET), U(E_AUTH), STEP(STP_UP_AUTH), U("334 VXNlcm5hbWU6\r\n"),
      U("334 UGFzc3dvcmQ6\r\n"), U(OK235)},
     EHLO "AUTH LOGIN\r\nZGV2\r\nczNjcmV0\r\n", 0, READY, GREET, 0, NULL},
    {"login: a third prompt is refused", CF_LOGIN,
     {U(GREET), U(E_AUTH), U("334 VXNlcm5hbWU6\r\n"),
      U("334 UGFzc3dvcmQ6\r\n"), U("334 more\r\n")},
     EHLO "AUTH LOGIN\r\nZGV2\r\nczNjcmV0\r\n", 0, FAILED, NULL,
     STP_FAIL_HOP_AUTH, "AUTH refused: 334 more"},
    {"login: 535 after the password", CF_LOGIN,
     {U(GREET), U(E_AUTH), U("334 VXNlcm5hbWU6\r\n"),
      U("334 UGFzc3dvcmQ6\r\n"), U(NO535)},
     EHLO "AUTH LOGIN\r\nZGV2\r\nczNjcmV0\r\n", 0, FAILED, NULL,
     STP_FAIL_HOP_AUTH, "535"},
    {"xoauth2: initial response accepted", CF_TLS | CF_XOA,
     {U(GREET), U(E_TLS), U(GO), TLS, U(E_AUTH), U(OK235)},
     EHLO STLS EHLO A_XOA, 1, READY, GREET, 0, NULL},
    {"xoauth2: error challenge, empty reply, final error decoded",
     CF_XOA,
     {U(GREET), U(E_AUTH), U("334 eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
      STEP(STP_UP_AUTH), U(NO535)},
     EHLO A_XOA "\r\n", 0, FAILED, NULL, STP_FAIL_HOP_AUTH,
     "535 5.7.8 Error: authentication failed ({\"status\":\"401\"})"},
    {"xoauth2: 235 after an error challenge is still a failure", CF_XOA,
     {U(GREET), U(E_AUTH), U("334 eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
      U(OK235)},
     EHLO A_XOA "\r\n", 0, FAILED, NULL, STP_FAIL_HOP_AUTH, "235"},
};

enum feed_mode { F_WHOLE, F_SPLIT, F_BYTES };

static size_t step_len(const struct step *st)
{
    return st->n ? st->n : strlen(st->p);
}

static struct stp_up_cfg make_cfg(int bits)
{
    struct stp_up_cfg c = {
        .starttls = bits & (CF_TLS | CF_OPP),
        .opportunistic = bits & CF_OPP,
        .ehlo_name = NAME,
        .xclient = (bits & CF_XC) ? XCL : NULL,
        .lmtp = bits & CF_LMTP,
        .fallback = bits & CF_FB,
        .auth = (bits & CF_PLAIN)   ? STP_AUTH_PLAIN
                : (bits & CF_LOGIN) ? STP_AUTH_LOGIN
                : (bits & CF_XOA)   ? STP_AUTH_XOAUTH2
                                    : STP_AUTH_NONE,
        .user = "dev",
        .secret = "s3cret",
    };
    return c;
}

/* Run one scenario; SPLIT is a position in the upstream stream. Returns
 * false (after reporting) on a mismatch. */
static bool run_scen(const struct scen *sc, enum feed_mode mode, size_t split)
{
    memset(&R, 0, sizeof(R));
    struct stp_up_cfg cfg = make_cfg(sc->cfg);
    stp_up_init(&R.p, &cfg, &rec_ops, NULL);
    char where[64];
    if (mode == F_SPLIT)
        snprintf(where, sizeof(where), "split at %zu", split);
    else
        snprintf(where, sizeof(where), "%s",
                 mode == F_WHOLE ? "whole" : "byte by byte");
    bool ok = true;
    size_t off = 0;
    for (const struct step *st = sc->steps; st->op != S_END; st++) {
        long idx = (long)(st - sc->steps);
        switch (st->op) {
        case S_U: {
            size_t n = step_len(st);
            if (mode == F_BYTES) {
                for (size_t i = 0; i < n; i++)
                    feed(st->p + i, 1);
            } else if (mode == F_SPLIT && split > off && split < off + n) {
                feed(st->p, split - off);
                feed(st->p + (split - off), n - (split - off));
            } else {
                feed(st->p, n);
            }
            off += n;
            break;
        }
        case S_TLS:
            if (!R.tls_pending || R.p.step != STP_UP_TLS) {
                failf("%s: step %ld: handshake done without start_tls (step "
                      "%s)", where, idx, stp_up_step_name(R.p.step));
                return false;
            }
            if (R.ulen) {
                failf("%s: step %ld: %zu bytes buffered at the handshake: "
                      "\"%s\"", where, idx, R.ulen, esc(R.ubuf, R.ulen));
                ok = false;
            }
            R.tls_pending = false;
            stp_up_tls_done(&R.p);
            pump();
            break;
        case S_STEP:
            if (R.p.step != (enum stp_up_step)st->n) {
                failf("%s: step %ld: prelude in step %s, want %s", where, idx,
                      stp_up_step_name(R.p.step),
                      stp_up_step_name((enum stp_up_step)st->n));
                ok = false;
            }
            break;
        case S_LEFT:
            if (R.ulen != st->n) {
                failf("%s: step %ld: %zu bytes left unconsumed (\"%s\"), want "
                      "%zu", where, idx, R.ulen, esc(R.ubuf, R.ulen), st->n);
                ok = false;
            }
            break;
        case S_END:
            break;
        }
    }

    if (R.viol[0]) {
        failf("%s: %s", where, R.viol);
        ok = false;
    }
    size_t sl = strlen(sc->sent);
    if (R.sent_len != sl || memcmp(R.sent, sc->sent, sl) != 0) {
        failf("%s: sent \"%s\", want \"%s\"", where, esc(R.sent, R.sent_len),
              esc(sc->sent, sl));
        ok = false;
    }
    if (R.start_tls != sc->start_tls) {
        failf("%s: start_tls called %d times, want %d", where, R.start_tls,
              sc->start_tls);
        ok = false;
    }
    if (R.readies && R.fails) {
        failf("%s: both ready and fail", where);
        ok = false;
    }
    switch (sc->out) {
    case PENDING:
        if (R.readies || R.fails) {
            failf("%s: %s (%s), want neither ready nor fail", where,
                  R.readies ? "ready" : fail_name((int)R.fcat), R.reason);
            ok = false;
        }
        break;
    case READY: {
        size_t gl = strlen(sc->greeting);
        if (R.readies != 1 || R.fails) {
            failf("%s: ready called %d times%s%s%s, want once", where,
                  R.readies, R.fails ? ", fail: " : "",
                  R.fails ? fail_name((int)R.fcat) : "",
                  R.fails ? R.reason : "");
            ok = false;
        } else if (R.greeting_len != gl ||
                   memcmp(R.greeting, sc->greeting, gl) != 0) {
            failf("%s: greeting \"%s\", want \"%s\"", where,
                  esc(R.greeting, R.greeting_len), esc(sc->greeting, gl));
            ok = false;
        }
        if (R.p.step != STP_UP_READY) {
            failf("%s: step %s after ready", where, stp_up_step_name(R.p.step));
            ok = false;
        }
        break;
    }
    case FAILED:
        if (R.fails != 1 || R.readies) {
            failf("%s: fail called %d times, ready %d times, want one fail",
                  where, R.fails, R.readies);
            ok = false;
        } else {
            if (sc->cat != ANY_CAT && (int)R.fcat != sc->cat) {
                failf("%s: failure %s (\"%s\"), want %s", where,
                      fail_name((int)R.fcat), R.reason, fail_name(sc->cat));
                ok = false;
            }
            if (sc->reason && !strstr(R.reason, sc->reason)) {
                failf("%s: reason \"%s\", want it to mention \"%s\"", where,
                      R.reason, sc->reason);
                ok = false;
            }
        }
        if (R.p.step != STP_UP_FAILED) {
            failf("%s: step %s after fail", where, stp_up_step_name(R.p.step));
            ok = false;
        }
        break;
    }
    /* Once finished, the prelude takes no more bytes and does nothing. */
    if (R.readies || R.fails || R.tls_pending) {
        size_t before = R.sent_len;
        int r0 = R.readies, f0 = R.fails, t0 = R.start_tls;
        static const char more[] = "220 more\r\n250 more\r\n";
        size_t k = stp_up_input(&R.p, more, sizeof(more) - 1);
        if (k || R.sent_len != before || R.readies != r0 || R.fails != f0 ||
            R.start_tls != t0) {
            failf("%s: input after the end: consumed %zu, callbacks ran", where,
                  k);
            ok = false;
        }
    }
    return ok;
}

static void test_scenarios(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(scens); i++) {
        const struct scen *sc = &scens[i];
        char name[160];
        snprintf(name, sizeof(name), "prelude: %s", sc->name);
        case_begin(name);
        size_t total = 0;
        for (const struct step *st = sc->steps; st->op != S_END; st++)
            if (st->op == S_U)
                total += step_len(st);
        /* stop at the first failing mode: one report per scenario is enough */
        if (!run_scen(sc, F_WHOLE, 0))
            goto done;
        for (size_t k = 1; k < total; k++)
            if (!run_scen(sc, F_SPLIT, k))
                goto done;
        run_scen(sc, F_BYTES, 0);
    done:
        case_end();
    }
}

/* ---- response injection: the 220 to STARTTLS must end its read ----------- */

/* Feed GREET + E_TLS, then TAIL cut into the reads given by CUTS (positions
 * inside TAIL, ascending, 0-terminated). */
static void run_tail(int cfgbits, const char *tail, const size_t *cuts)
{
    memset(&R, 0, sizeof(R));
    struct stp_up_cfg cfg = make_cfg(cfgbits);
    stp_up_init(&R.p, &cfg, &rec_ops, NULL);
    feed(GREET, strlen(GREET));
    feed(E_TLS, strlen(E_TLS));
    size_t n = strlen(tail), at = 0;
    for (const size_t *c = cuts; *c; c++) {
        feed(tail + at, *c - at);
        at = *c;
    }
    feed(tail + at, n - at);
}

struct inj_case {
    const char *tail;  /* upstream bytes after our STARTTLS */
    size_t go_end;     /* where the final 220 line ends in TAIL */
};

static const struct inj_case inj_cases[] = {
    {"220 go\r\n250 x\r\n", 8},
    {"220 go\r\n2", 8},
    {"220 go\r\n\r\n", 8},
    {"220-go\r\n220 go\r\n250-a\r\n250 b\r\n", 16},
    {"220 go\n250 injected\n", 7},
    {"220 2.0.0 Ready to start TLS\r\n\x16\x03\x01", 30},
};

static void test_injection(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(inj_cases); i++) {
        const struct inj_case *c = &inj_cases[i];
        size_t n = strlen(c->tail);
        char name[160];
        snprintf(name, sizeof(name), "injection: \"%s\" after STARTTLS",
                 esc(c->tail, n));
        case_begin(name);
        /* in one read: refused */
        size_t none[] = {0};
        run_tail(CF_TLS, c->tail, none);
        CHECK(R.fails == 1 && R.fcat == STP_FAIL_HOP_TLS && !R.start_tls &&
                  !R.readies,
              "one read: fails %d (%s \"%s\") start_tls %d ready %d, want "
              "FAIL_TLS only", R.fails, fail_name((int)R.fcat), R.reason,
              R.start_tls, R.readies);
        CHECK(strstr(R.reason, "after 220") != NULL,
              "one read: reason \"%s\", want \"data after 220...\"", R.reason);
        CHECK(R.sent_len == strlen(EHLO STLS), "one read: sent \"%s\"",
              esc(R.sent, R.sent_len));
        CHECK(!R.viol[0], "one read: %s", R.viol);
        /* with the same XCLIENT configured too, the same */
        run_tail(CF_BOTH, c->tail, none);
        CHECK(R.fails == 1 && R.fcat == STP_FAIL_HOP_TLS && !R.start_tls,
              "starttls+xclient, one read: not refused");
        CHECK(R.sent_len == strlen(EHLO STLS),
              "starttls+xclient: sent \"%s\" after the refusal",
              esc(R.sent, R.sent_len));
        /* opportunistic once STARTTLS was offered: the same, no downgrade */
        run_tail(CF_OPP, c->tail, none);
        CHECK(R.fails == 1 && R.fcat == STP_FAIL_HOP_TLS && !R.start_tls &&
                  !R.readies && strstr(R.reason, "after 220") != NULL,
              "opportunistic, one read: fails %d (%s \"%s\") ready %d, want "
              "FAIL_TLS only", R.fails, fail_name((int)R.fcat), R.reason,
              R.readies);
        run_tail(CF_OPP | CF_XC, c->tail, none);
        CHECK(R.fails == 1 && R.fcat == STP_FAIL_HOP_TLS && !R.start_tls &&
                  R.sent_len == strlen(EHLO STLS),
              "opportunistic+xclient, one read: not refused, or sent \"%s\"",
              esc(R.sent, R.sent_len));
        /* split at every byte: refused unless the read ends right after the
         * 220, in which case start_tls runs and the rest stays unconsumed
         * (it is the TLS layer's to reject) */
        for (size_t k = 1; k < n; k++) {
            size_t cut[] = {k, 0};
            run_tail(CF_TLS, c->tail, cut);
            if (k == c->go_end) {
                CHECK(R.start_tls == 1 && !R.fails && !R.readies &&
                          R.p.step == STP_UP_TLS && R.ulen == n - k,
                      "split at %zu (the 220's end): start_tls %d fails %d "
                      "step %s, %zu left, want start_tls with %zu left", k,
                      R.start_tls, R.fails, stp_up_step_name(R.p.step), R.ulen,
                      n - k);
            } else {
                CHECK(R.fails == 1 && R.fcat == STP_FAIL_HOP_TLS &&
                          !R.start_tls,
                      "split at %zu: fails %d (%s) start_tls %d, want FAIL_TLS",
                      k, R.fails, fail_name((int)R.fcat), R.start_tls);
            }
            CHECK(!R.viol[0], "split at %zu: %s", k, R.viol);
        }
        /* byte by byte: the 220 ends a read, so TLS starts, and no later
         * byte is consumed */
        memset(&R, 0, sizeof(R));
        struct stp_up_cfg cfg = make_cfg(CF_TLS);
        stp_up_init(&R.p, &cfg, &rec_ops, NULL);
        feed(GREET, strlen(GREET));
        feed(E_TLS, strlen(E_TLS));
        for (size_t b = 0; b < n; b++)
            feed(c->tail + b, 1);
        CHECK(R.start_tls == 1 && !R.fails && R.p.step == STP_UP_TLS &&
                  R.ulen == n - c->go_end,
              "byte by byte: start_tls %d fails %d step %s, %zu left, want %zu",
              R.start_tls, R.fails, stp_up_step_name(R.p.step), R.ulen,
              n - c->go_end);
        CHECK(!R.viol[0], "byte by byte: %s", R.viol);
        case_end();
    }
}

/* ---- odds and ends ------------------------------------------------------- */

static void test_names_and_init(void)
{
    case_begin("step names");
    for (int s = 0; s < STP_UP_COUNT; s++) {
        const char *n = stp_up_step_name((enum stp_up_step)s);
        CHECK(n && *n && strcmp(n, "?") != 0, "step %d has no name", s);
        for (int t = 0; t < s; t++)
            CHECK(!n || strcmp(n, stp_up_step_name((enum stp_up_step)t)) != 0,
                  "steps %d and %d share the name %s", t, s, n);
    }
    CHECK(strcmp(stp_up_step_name(STP_UP_COUNT), "?") == 0,
          "out of range step named %s", stp_up_step_name(STP_UP_COUNT));
    CHECK(strcmp(stp_up_step_name((enum stp_up_step)1000), "?") == 0,
          "step 1000 named");
    case_end();

    case_begin("init: waits for the greeting, sends nothing");
    for (int bits = 0; bits < 16; bits++) {
        memset(&R, 0, sizeof(R));
        struct stp_up_cfg cfg = make_cfg(bits);
        stp_up_init(&R.p, &cfg, &rec_ops, NULL);
        CHECK(R.p.step == STP_UP_GREETING, "cfg %d: step %s", bits,
              stp_up_step_name(R.p.step));
        CHECK(stp_up_input(&R.p, "", 0) == 0, "cfg %d: empty input consumed",
              bits);
        CHECK(stp_up_input(&R.p, "220 partial", 11) == 0,
              "cfg %d: partial line consumed", bits);
        CHECK(!R.sent_len && !R.readies && !R.fails && !R.start_tls,
              "cfg %d: callbacks before any line", bits);
    }
    case_end();

    case_begin("cfg strings are copied by reference only as documented");
    {
        /* The cfg struct itself is copied: a caller's stack struct may go. */
        memset(&R, 0, sizeof(R));
        struct stp_up_cfg *cfg = malloc(sizeof(*cfg));
        *cfg = make_cfg(CF_XC);
        stp_up_init(&R.p, cfg, &rec_ops, NULL);
        memset(cfg, 0, sizeof(*cfg));
        free(cfg);
        feed(GREET, strlen(GREET));
        feed(E_XC, strlen(E_XC));
        CHECK(R.sent_len == strlen(EHLO XCLS) &&
                  memcmp(R.sent, EHLO XCLS, R.sent_len) == 0,
              "sent \"%s\"", esc(R.sent, R.sent_len));
    }
    case_end();
}

/* A long configured line must be sent whole or refused, never cut or read
 * past its buffer. Run in a child: an out-of-bounds read aborts under ASan. */
static void long_line_child(const char *name, const char *xclient)
{
    memset(&R, 0, sizeof(R));
    /* STARTTLS makes the prelude send EHLO even without XCLIENT */
    struct stp_up_cfg cfg = {.starttls = xclient == NULL, .ehlo_name = name,
                             .xclient = xclient};
    stp_up_init(&R.p, &cfg, &rec_ops, NULL);
    feed(GREET, strlen(GREET));
    char want[2000];
    snprintf(want, sizeof(want), "EHLO %s\r\n", name);
    if (R.fails)
        _exit(0); /* refused: fine */
    if (R.sent_len != strlen(want) || memcmp(R.sent, want, R.sent_len) != 0) {
        fprintf(stderr, "  sent %zu bytes, want the %zu of \"EHLO <name>\"\n",
                R.sent_len, strlen(want));
        _exit(1);
    }
    if (xclient) {
        feed(E_XC, strlen(E_XC));
        snprintf(want, sizeof(want), "EHLO %s\r\n%s\r\n", name, xclient);
        if (!R.fails && (R.sent_len != strlen(want) ||
                         memcmp(R.sent, want, R.sent_len) != 0)) {
            fprintf(stderr, "  sent %zu bytes, want the %zu of EHLO+XCLIENT\n",
                    R.sent_len, strlen(want));
            _exit(1);
        }
    }
    _exit(0);
}

static void test_long_config(void)
{
    static char name255[256], name700[701], xc700[701];
    memset(name255, 'h', 255);
    memset(name700, 'h', 700);
    memcpy(xc700, "XCLIENT ADDR=", 13);
    memset(xc700 + 13, 'a', 687);
    struct {
        const char *title, *name, *xclient;
    } cases[] = {
        {"long config: 255-byte EHLO name (the config's limit)", name255, NULL},
        {"long config: 700-byte EHLO name", name700, NULL},
        {"long config: 700-byte XCLIENT line", "proxy.example", xc700},
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(cases); i++) {
        case_begin(cases[i].title);
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0)
            long_line_child(cases[i].name, cases[i].xclient);
        int status = 0;
        if (pid < 0 || waitpid(pid, &status, 0) != pid)
            failf("fork/wait failed");
        else if (WIFSIGNALED(status))
            failf("child killed by signal %d (out-of-bounds access?)",
                  WTERMSIG(status));
        else if (WEXITSTATUS(status) != 0)
            failf("line cut or read past its buffer (exit %d)",
                  WEXITSTATUS(status));
        case_end();
    }
}

/* The step table: READY and FAILED are final, every other step may fail,
 * and TLS is reached only through a STARTTLS the upstream accepted. */
static void test_step_table(void)
{
    case_begin("step table");
    for (int to = 0; to < STP_UP_COUNT; to++) {
        CHECK(!stp_up_step_may(STP_UP_READY, to) &&
                  !stp_up_step_may(STP_UP_FAILED, to),
              "a final step -> %s", stp_up_step_name(to));
        if (to != STP_UP_STARTTLS)
            CHECK(!stp_up_step_may(to, STP_UP_TLS), "%s -> tls",
                  stp_up_step_name(to));
    }
    for (int from = 0; from < STP_UP_READY; from++)
        CHECK(stp_up_step_may(from, STP_UP_FAILED), "%s cannot fail",
              stp_up_step_name(from));
    CHECK(!stp_up_step_may(STP_UP_STARTTLS, STP_UP_READY),
          "ready without the handshake");
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    init_dynamic();
    test_step_table();
    test_names_and_init();
    test_scenarios();
    test_injection();
    test_long_config();
    return unit_summary();
}
