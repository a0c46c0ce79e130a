/* Unit tests for the IMAP engine (proxy/imap.c) behind the seam: scenarios
 * of client and upstream bytes, each fed whole, split at every byte of every
 * step (two pieces), and one byte at a time. Bytes the engine leaves are
 * offered again with the next ones, as the relay does. A scenario passes
 * only if the upstream and the client see exactly the same bytes in every
 * mode. Last line printed: "N passed, N failed". */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imap.h"
#include "stp.h"

#include "unit.h"

#define CAP 65536

static struct {
    struct stp_imap e;
    char cbuf[CAP], ubuf[CAP];
    size_t clen, ulen;
    char up[CAP], cli[CAP];
    size_t up_len, cli_len;
    const char *in_base;
    size_t in_len;
    int closes, start_tls, up_err;
    enum stp_close_reason reason;
    bool cut, up_gone, tls_pending;
    char viol[256];
} R;

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

static void append(char *dst, size_t *len, const char *p, size_t n)
{
    if (*len + n > CAP) {
        violation("recorder overflow");
        return;
    }
    memcpy(dst + *len, p, n);
    *len += n;
}

static void op_to_upstream(void *ctx, enum stp_fwd kind, const char *p,
                           size_t n)
{
    (void)ctx;
    if (R.closes && !R.cut)
        violation("to_upstream after close");
    if (kind == STP_FWD_LINE) {
        /* only a "{n+}" line made "{n}" */
        if (memchr(p, '\r', n) || memchr(p, '\n', n) || !n || p[n - 1] != '}')
            violation("FWD_LINE that is no literal line: \"%s\"", esc(p, n));
        append(R.up, &R.up_len, p, n);
        append(R.up, &R.up_len, "\r\n", 2);
        return;
    }
    if (!R.in_base || p < R.in_base || p + n > R.in_base + R.in_len)
        violation("FWD_RAW outside the client buffer");
    append(R.up, &R.up_len, p, n);
}

static void op_to_client(void *ctx, const char *p, size_t n)
{
    (void)ctx;
    if (R.closes)
        violation("to_client after close: \"%s\"", esc(p, n));
    append(R.cli, &R.cli_len, p, n);
}

static void op_start_tls(void *ctx)
{
    (void)ctx;
    if (R.tls_pending)
        violation("start_tls twice");
    R.start_tls++;
    R.tls_pending = true;
}

static void op_close(void *ctx, enum stp_close_reason why, bool cut)
{
    (void)ctx;
    if (R.closes)
        violation("close twice");
    R.closes++;
    R.reason = why;
    R.cut = cut;
    if (cut)
        R.up_gone = true;
}

static void op_event(void *ctx, const char *event, const char *detail)
{
    (void)ctx;
    if (strcmp(event, "bug") == 0)
        violation("engine bug: %s", detail);
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
        *n = R.up_gone ? 0 : R.ulen;
        return R.ubuf;
    }
    *n = R.tls_pending ? 0 : R.clen; /* the relay reads nothing then */
    R.in_base = R.cbuf;
    R.in_len = R.clen;
    return R.cbuf;
}

static void feed_consume(void *ctx, enum stp_side side, size_t k)
{
    (void)ctx;
    char *buf = side == STP_SIDE_CLIENT ? R.cbuf : R.ubuf;
    size_t *len = side == STP_SIDE_CLIENT ? &R.clen : &R.ulen;
    if (k > *len) {
        violation("consumed %zu of %zu", k, *len);
        k = *len;
    }
    memmove(buf, buf + k, *len - k);
    *len -= k;
}

static const struct stp_feed_io rec_feed = {feed_input, feed_consume, NULL};

static void pump(void)
{
    while (stp_proto_feed(&stp_proto_imap, &R.e, &rec_feed, NULL) < 0) {
        R.up_err++;
        R.up_gone = true;
        R.ulen = 0;
    }
    R.in_base = NULL;
}

enum step_op { S_END = 0, S_C, S_U, S_TLS, S_LOST, S_TIMEOUT, S_SHUTDOWN };

struct step {
    enum step_op op;
    const char *p;
    size_t n;
};

#define C(lit) {S_C, lit, sizeof(lit) - 1}
#define U(lit) {S_U, lit, sizeof(lit) - 1}
#define TLS {S_TLS, NULL, 0}
#define LOST {S_LOST, NULL, 0}
#define TIMEOUT {S_TIMEOUT, NULL, 0}
#define SHUTDOWN {S_SHUTDOWN, NULL, 0}
#define NO_CLOSE -1

struct scen {
    const char *name;
    struct stp_proto_cfg cfg;
    struct step steps[16];
    const char *up;
    const char *cli;
    int close;
    int start_tls;
    bool up_err;
    const char *summary;
};

#define HOST "proxy.test"
#define STARTTLS_REQ                                                           \
    {.offer_starttls = true, .require_tls = true, .max_line = 512,             \
     .max_errors = 20, .hostname = HOST}
#define IMPLICIT                                                               \
    {.require_tls = true, .tls_active = true, .max_line = 512,                 \
     .max_errors = 20, .hostname = HOST}
#define NOREQ                                                                  \
    {.offer_starttls = true, .max_line = 512, .max_errors = 20,                \
     .hostname = HOST}

#define UGREET "* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] Dovecot ready.\r\n"
#define GREET                                                                  \
    "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] " HOST " ready.\r\n"
#define TLSOK "t OK Begin TLS negotiation now.\r\n"
#define PRE C("t STARTTLS\r\n"), TLS
#define PRIV "NO [PRIVACYREQUIRED] Use STARTTLS first: no plaintext authentication.\r\n"
#define BADSYN "BAD Error in IMAP command received by proxy.\r\n"

static const struct scen scens[] = {
    {"greeting consumed, the proxy greets", STARTTLS_REQ,
     {U(UGREET)}, "", GREET, NO_CLOSE, 0, false, ""},
    {"client bytes wait for the greeting", STARTTLS_REQ,
     {C("a CAPABILITY\r\n"), U(UGREET)}, "",
     GREET "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n"
           "a OK Capability completed.\r\n",
     NO_CLOSE, 0, false, "capability=1"},
    {"pre-TLS refusals, nothing forwarded", STARTTLS_REQ,
     {U(UGREET), C("a LOGIN alice secret\r\nb authenticate PLAIN\r\n"
                   "c SELECT INBOX\r\nd NOOP\r\ne noop x\r\n\r\n"
                   "f\r\nx(y CAPABILITY\r\n")},
     "",
     GREET "a " PRIV "b " PRIV
     "c BAD [PRIVACYREQUIRED] Use STARTTLS first.\r\n"
     "d OK NOOP completed.\r\n"
     "e BAD [PRIVACYREQUIRED] Use STARTTLS first.\r\n"
     "* " BADSYN "* " BADSYN "* " BADSYN,
     NO_CLOSE, 0, false, NULL},
    {"pre-TLS sync literal refused without +", STARTTLS_REQ,
     {U(UGREET), C("a LOGIN {5}\r\n"), C("b SELECT {3}\r\nc NOOP\r\n")}, "",
     GREET "a " PRIV "b BAD [PRIVACYREQUIRED] Use STARTTLS first.\r\n"
           "c OK NOOP completed.\r\n",
     NO_CLOSE, 0, false, NULL},
    {"pre-TLS non-sync literal closes", STARTTLS_REQ,
     {U(UGREET), C("a LOGIN {5+}\r\nalice t STARTTLS\r\n")}, "",
     GREET "* BYE Literal on a refused command.\r\n", STP_CLOSE_CLIENT_ERROR,
     0, false, NULL},
    {"a non-sync marker the proxy does not read closes too", STARTTLS_REQ,
     {U(UGREET), PRE, C("a SELECT x{3+}\r\nabc\r\n")}, "",
     GREET TLSOK "* BYE Literal on a refused command.\r\n",
     STP_CLOSE_CLIENT_ERROR, 1, false, NULL},
    {"upstream bytes from before the client's TLS are never read inside it",
     STARTTLS_REQ,
     {U(UGREET), PRE,
      U("* OK [ALERT] Session expired, enter your password again\r\n"
        "* 1 FETCH (BODY[] {7}\r\nhello\r\n)\r\n"),
      C("a CAPABILITY\r\n"),
      U("* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na OK done\r\n")},
     "a CAPABILITY\r\n",
     GREET TLSOK "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\na OK done\r\n",
     NO_CLOSE, 1, false, NULL},
    {"pre-TLS LOGOUT", STARTTLS_REQ,
     {U(UGREET), C("z LOGOUT\r\n")}, "",
     GREET "* BYE Logging out.\r\nz OK Logout completed.\r\n",
     STP_CLOSE_QUIT, 0, false, "logout=1"},
    {"STARTTLS drops pipelined commands", STARTTLS_REQ,
     {U(UGREET), C("t STARTTLS\r\nb LOGIN x y\r\n"), TLS, C("c NOOP\r\n"),
      U("c OK NOOP completed.\r\n")},
     "c NOOP\r\n", GREET TLSOK "c OK NOOP completed.\r\n", NO_CLOSE, 1,
     false, "starttls=1 other=1"},
    {"capabilities stripped, untagged and in codes", STARTTLS_REQ,
     {U(UGREET), PRE, C("a CAPABILITY\r\n"),
      U("* CAPABILITY IMAP4rev1 starttls LOGINDISABLED COMPRESS=DEFLATE "
        "AUTH=SCRAM-SHA-1-PLUS AUTH=PLAIN IDLE\r\n"
        "a OK [CAPABILITY IMAP4rev1 STARTTLS compress=deflate "
        "AUTH=scram-sha-256-plus Auth=Plain] done\r\n"),
      C("b LOGIN x y\r\n"),
      U("* OK [CAPABILITY STARTTLS] hi\r\nb OK [CAPABILITY IMAP4rev1 "
        "LITERAL+ COMPRESS=DEFLATE] Logged in\r\n")},
     "a CAPABILITY\r\nb LOGIN x y\r\n",
     GREET TLSOK "* CAPABILITY IMAP4rev1 AUTH=PLAIN IDLE\r\n"
                 "a OK [CAPABILITY IMAP4rev1 Auth=Plain] done\r\n"
                 "* OK [CAPABILITY ] hi\r\n"
                 "b OK [CAPABILITY IMAP4rev1 LITERAL+] Logged in\r\n",
     NO_CLOSE, 1, false, "capability=1 starttls=1 login=1"},
    {"COMPRESS and a second STARTTLS refused by the proxy", STARTTLS_REQ,
     {U(UGREET), PRE, C("a COMPRESS DEFLATE\r\nb STARTTLS\r\nc NOOP\r\n"),
      U("c OK\r\n")},
     "c NOOP\r\n",
     GREET TLSOK "a NO [CANNOT] COMPRESS is not available through this "
                 "proxy.\r\nb BAD TLS is already active.\r\nc OK\r\n",
     NO_CLOSE, 1, false, NULL},
    {"the proxy's reply waits for the upstream's", STARTTLS_REQ,
     {U(UGREET), PRE, C("a NOOP\r\nb COMPRESS DEFLATE\r\n"),
      U("* 3 EXISTS\r\na OK\r\n")},
     "a NOOP\r\n",
     GREET TLSOK "* 3 EXISTS\r\na OK\r\nb NO [CANNOT] COMPRESS is not "
                 "available through this proxy.\r\n",
     NO_CLOSE, 1, false, NULL},
    {"APPEND literal holding a LOGIN line is data", STARTTLS_REQ,
     {U(UGREET), PRE, C("b APPEND INBOX (\\Seen) {14}\r\n"),
      U("+ OK\r\n"), C("a1 LOGIN x y\r\n\r\nc NOOP\r\n"),
      U("b OK [APPENDUID 1 1] Append completed.\r\nc OK\r\n")},
     "b APPEND INBOX (\\Seen) {14}\r\na1 LOGIN x y\r\n\r\nc NOOP\r\n",
     GREET TLSOK "+ OK\r\nb OK [APPENDUID 1 1] Append completed.\r\nc OK\r\n",
     NO_CLOSE, 1, false, "starttls=1 append=1 other=1"},
    {"a sync literal waits for +, also in the same packet", STARTTLS_REQ,
     {U(UGREET), PRE, C("b APPEND INBOX {3}\r\nxyz\r\n"), U("+ go\r\n"),
      U("b OK\r\n")},
     "b APPEND INBOX {3}\r\nxyz\r\n", GREET TLSOK "+ go\r\nb OK\r\n",
     NO_CLOSE, 1, false, NULL},
    {"a refused sync literal ends the command", STARTTLS_REQ,
     {U(UGREET), PRE, C("b APPEND INBOX {99999}\r\n"),
      U("b NO [TOOBIG] too big\r\n"), C("c NOOP\r\n"), U("c OK\r\n")},
     "b APPEND INBOX {99999}\r\nc NOOP\r\n",
     GREET TLSOK "b NO [TOOBIG] too big\r\nc OK\r\n", NO_CLOSE, 1, false,
     NULL},
    {"non-sync literals go as sync, the line goes on", STARTTLS_REQ,
     {U(UGREET), PRE,
      C("m APPEND INBOX {10+}\r\ne LOGOUT\r\n {4+}\r\nab\r\n\r\nn NOOP\r\n"),
      U("+ OK\r\n"), U("+ OK\r\n"), U("m OK\r\nn OK\r\n")},
     "m APPEND INBOX {10}\r\ne LOGOUT\r\n {4}\r\nab\r\n\r\nn NOOP\r\n",
     GREET TLSOK "m OK\r\nn OK\r\n", NO_CLOSE, 1, false, NULL},
    {"a refused non-sync literal's octets are dropped", STARTTLS_REQ,
     {U(UGREET), PRE,
      C("b APPEND INBOX {5+}\r\nhello {3+}\r\nabc\r\nc NOOP\r\n"),
      U("b NO [TOOBIG] no\r\n"), U("c OK\r\n")},
     "b APPEND INBOX {5}\r\nc NOOP\r\n",
     GREET TLSOK "b NO [TOOBIG] no\r\nc OK\r\n", NO_CLOSE, 1, false, NULL},
    {"binary literal ~{n}", STARTTLS_REQ,
     {U(UGREET), PRE, C("m APPEND INBOX ~{3+}\r\n\0\r\n\r\n"),
      U("+ OK\r\n"), U("m OK\r\n")},
     NULL, GREET TLSOK "m OK\r\n", NO_CLOSE, 1, false, NULL},
    {"ambiguous literals refused", STARTTLS_REQ,
     {U(UGREET), PRE, C("a SELECT x{3}\r\nb SELECT \"x {3}\r\n"),
      C("c SELECT {99999999999}\r\nd SEARCH TEXT ~{3}\r\n")},
     "",
     GREET TLSOK "a " BADSYN "b " BADSYN "c " BADSYN "d " BADSYN, NO_CLOSE,
     1, false, NULL},
    {"FETCH literal holding a CAPABILITY line is relayed as is",
     STARTTLS_REQ,
     {U(UGREET), PRE, C("f FETCH 1 BODY[]\r\n"),
      U("* 1 FETCH (BODY[] {23}\r\n* CAPABILITY STARTTLS\r\n)\r\n"
        "* CAPABILITY STARTTLS IDLE\r\nf OK\r\n")},
     "f FETCH 1 BODY[]\r\n",
     GREET TLSOK "* 1 FETCH (BODY[] {23}\r\n* CAPABILITY STARTTLS\r\n)\r\n"
                 "* CAPABILITY IDLE\r\nf OK\r\n",
     NO_CLOSE, 1, false, "starttls=1 fetch=1"},
    {"IDLE", STARTTLS_REQ,
     {U(UGREET), PRE, C("i IDLE\r\n"), U("+ idling\r\n"),
      U("* 1 EXISTS\r\n"), C("DONE\r\n"), U("i OK Idle completed.\r\n"),
      C("n NOOP\r\n"), U("n OK\r\n")},
     "i IDLE\r\nDONE\r\nn NOOP\r\n",
     GREET TLSOK "+ idling\r\n* 1 EXISTS\r\ni OK Idle completed.\r\nn OK\r\n",
     NO_CLOSE, 1, false, "starttls=1 idle=1 other=1"},
    {"AUTHENTICATE exchange after TLS", STARTTLS_REQ,
     {U(UGREET), PRE, C("a AUTHENTICATE PLAIN\r\n"), U("+ \r\n"),
      C("AGEAYg==\r\n"), U("a OK Logged in\r\n")},
     "a AUTHENTICATE PLAIN\r\nAGEAYg==\r\n",
     GREET TLSOK "+ \r\na OK Logged in\r\n", NO_CLOSE, 1, false, NULL},
    {"upstream PREAUTH refused", STARTTLS_REQ,
     {U("* PREAUTH [CAPABILITY IMAP4rev1] hi\r\n"), C("a NOOP\r\n")}, "",
     "* BYE " HOST " upstream offered a pre-authenticated session: "
     "refused\r\n",
     STP_CLOSE_UPSTREAM_PROTO, 0, true, NULL},
    {"upstream PREAUTH refused on implicit TLS", IMPLICIT,
     {U("* PREAUTH hi\r\n")}, "",
     "* BYE " HOST " upstream offered a pre-authenticated session: "
     "refused\r\n",
     STP_CLOSE_UPSTREAM_PROTO, 0, true, NULL},
    {"implicit TLS: the greeting is relayed, edited", IMPLICIT,
     {U(UGREET), C("a CAPABILITY\r\n"),
      U("* CAPABILITY IMAP4rev1 STARTTLS\r\na OK\r\n")},
     "a CAPABILITY\r\n",
     "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"
     "* CAPABILITY IMAP4rev1\r\na OK\r\n",
     NO_CLOSE, 0, false, NULL},
    {"an injected tagged response is an upstream error", IMPLICIT,
     {U(UGREET "x OK injected\r\n")}, "",
     "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"
     "* BYE " HOST " upstream protocol error\r\n",
     STP_CLOSE_UPSTREAM_PROTO, 0, true, NULL},
    {"a continuation announcing a literal is an upstream error", IMPLICIT,
     {U(UGREET), C("b APPEND x {1+}\r\nz\r\n"),
      U("+ OK {23}\r\n* CAPABILITY STARTTLS\r\n")},
     "b APPEND x {1}\r\n",
     "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"
     "* BYE " HOST " upstream protocol error\r\n",
     STP_CLOSE_UPSTREAM_PROTO, 0, true, NULL},
    {"upstream bytes before TLS are not shown", STARTTLS_REQ,
     {U(UGREET "* OK [ALERT] pre-TLS text\r\n")}, "", GREET, NO_CLOSE, 0,
     false, NULL},
    {"LOGOUT's tagged reply closes", IMPLICIT,
     {U(UGREET), C("z LOGOUT\r\n"), U("* BYE bye\r\nz OK done\r\n")},
     "z LOGOUT\r\n",
     "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"
     "* BYE bye\r\nz OK done\r\n",
     STP_CLOSE_QUIT, 0, false, NULL},
    {"BYE when the upstream is lost", STARTTLS_REQ,
     {U(UGREET), LOST}, "", GREET "* BYE Upstream connection lost.\r\n",
     STP_CLOSE_UPSTREAM_LOST, 0, false, NULL},
    {"BYE on timeout and none inside a literal", IMPLICIT,
     {U(UGREET), C("f FETCH 1 BODY[]\r\n"), U("* 1 FETCH (BODY[] {10}\r\nab"),
      TIMEOUT},
     "f FETCH 1 BODY[]\r\n",
     "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"
     "* 1 FETCH (BODY[] {10}\r\nab",
     STP_CLOSE_TIMEOUT, 0, false, NULL},
    {"BYE on shutdown", IMPLICIT, {U(UGREET), SHUTDOWN}, "",
     "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] Dovecot ready.\r\n"
     "* BYE Server shutting down.\r\n",
     STP_CLOSE_SHUTDOWN, 0, false, NULL},
    {"require_tls = no: STARTTLS added, LOGIN passes, then no STARTTLS",
     NOREQ,
     {U("* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"),
      C("a LOGIN x y\r\nt STARTTLS\r\n"), U("a OK Logged in\r\n")},
     "a LOGIN x y\r\n",
     "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN STARTTLS] hi\r\na OK Logged in\r\n"
     "t BAD STARTTLS is not available.\r\n",
     NO_CLOSE, 0, false, NULL},
    {"a line over the limit closes", STARTTLS_REQ,
     {U(UGREET), C("a NOOP xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                   "\r\n")},
     "", GREET "* BYE Command line too long.\r\n", STP_CLOSE_CLIENT_ERROR, 0,
     false, NULL},
};

enum mode { M_WHOLE, M_SPLIT, M_BYTES };

static void add(bool client, const char *p, size_t n)
{
    if (client)
        append(R.cbuf, &R.clen, p, n);
    else
        append(R.ubuf, &R.ulen, p, n);
    pump();
}

static bool run(const struct scen *sc, enum mode m, size_t split,
                const char *label)
{
    memset(&R, 0, sizeof(R));
    stp_imap_init(&R.e, &sc->cfg, &ops, NULL);
    bool any_split = false;
    for (const struct step *st = sc->steps; st->op != S_END; st++) {
        switch (st->op) {
        case S_C:
        case S_U: {
            bool c = st->op == S_C;
            if (m == M_WHOLE) {
                add(c, st->p, st->n);
            } else if (m == M_SPLIT) {
                size_t k = split < st->n ? split : st->n;
                any_split |= split < st->n;
                add(c, st->p, k);
                add(c, st->p + k, st->n - k);
            } else {
                for (size_t i = 0; i < st->n; i++)
                    add(c, st->p + i, 1);
            }
            break;
        }
        case S_TLS:
            if (!R.tls_pending)
                violation("TLS step without start_tls");
            R.tls_pending = false;
            R.clen = 0; /* the relay discards pipelined plaintext */
            if (!R.closes)
                stp_imap_tls_started(&R.e);
            pump();
            break;
        case S_LOST:
            stp_imap_fail(&R.e, STP_FAIL_LOST);
            break;
        case S_TIMEOUT:
            stp_imap_fail(&R.e, STP_FAIL_TIMEOUT);
            break;
        case S_SHUTDOWN:
            stp_imap_fail(&R.e, STP_FAIL_SHUTDOWN);
            break;
        case S_END:
            break;
        }
    }
    if (m == M_SPLIT && !any_split)
        return false; /* nothing new to try */
    CHECK(!R.viol[0], "%s: %s", label, R.viol);
    if (sc->up)
        CHECK(R.up_len == strlen(sc->up) && !memcmp(R.up, sc->up, R.up_len),
              "%s: upstream got \"%s\", want \"%s\"", label,
              esc(R.up, R.up_len), esc(sc->up, strlen(sc->up)));
    CHECK(R.cli_len == strlen(sc->cli) && !memcmp(R.cli, sc->cli, R.cli_len),
          "%s: client got \"%s\", want \"%s\"", label, esc(R.cli, R.cli_len),
          esc(sc->cli, strlen(sc->cli)));
    if (sc->close == NO_CLOSE)
        CHECK(R.closes == 0, "%s: closed (%s)", label,
              stp_close_reason_name(R.reason));
    else
        CHECK(R.closes == 1 && (int)R.reason == sc->close,
              "%s: close %d reason %s, want %s", label, R.closes,
              stp_close_reason_name(R.reason),
              stp_close_reason_name((enum stp_close_reason)sc->close));
    CHECK(R.start_tls == sc->start_tls, "%s: start_tls %d, want %d", label,
          R.start_tls, sc->start_tls);
    CHECK((R.up_err > 0) == sc->up_err, "%s: upstream error %d", label,
          R.up_err);
    if (sc->summary) {
        char sum[256];
        stp_imap_summary(&R.e, sum, sizeof(sum));
        CHECK(strcmp(sum, sc->summary) == 0, "%s: summary \"%s\", want \"%s\"",
              label, sum, sc->summary);
    }
    return true;
}

static void test_scenarios(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(scens); i++) {
        const struct scen *sc = &scens[i];
        case_begin(sc->name);
        run(sc, M_WHOLE, 0, "whole");
        for (size_t k = 0; k < 4096; k++) {
            char label[32];
            snprintf(label, sizeof(label), "split at %zu", k);
            if (!run(sc, M_SPLIT, k, label))
                break;
        }
        run(sc, M_BYTES, 0, "byte by byte");
        case_end();
    }
}

static void test_cap_edit(void)
{
    static const struct {
        const char *in, *out;
        bool add;
    } cases[] = {
        {"IMAP4rev1 STARTTLS IDLE", "IMAP4rev1 IDLE", false},
        {"imap4rev1 starttls logindisabled compress=deflate", "imap4rev1",
         false},
        {"AUTH=SCRAM-SHA-1-PLUS AUTH=SCRAM-SHA-1 AUTH=plus", "AUTH=SCRAM-SHA-1 "
                                                             "AUTH=plus",
         false},
        {"IMAP4rev1  LITERAL+", "IMAP4rev1 LITERAL+", false},
        {"IMAP4rev1 STARTTLS", "IMAP4rev1 STARTTLS", true},
        {"", "STARTTLS", true},
        {"STARTTLSX COMPRESSX", "STARTTLSX COMPRESSX", false},
    };
    case_begin("capability edit");
    for (size_t i = 0; i < STP_ARRAY_LEN(cases); i++) {
        char out[256];
        int r = stp_imap_cap_edit(cases[i].in, strlen(cases[i].in), out,
                                  sizeof(out), cases[i].add);
        CHECK(r >= 0 && (size_t)r == strlen(cases[i].out) &&
                  !memcmp(out, cases[i].out, (size_t)r),
              "cap_edit(\"%s\") = \"%.*s\"", cases[i].in, r < 0 ? 0 : r, out);
    }
    char small[4];
    CHECK(stp_imap_cap_edit(S("IMAP4rev1"), small, sizeof(small), false) ==
              -ENOSPC, "cap_edit: no room");
    case_end();
}

static void test_line_literal(void)
{
    static const struct {
        const char *l;
        int r;
        uint64_t n;
        bool nonsync;
    } cases[] = {
        {"a APPEND x {5}", 1, 5, false},
        {"a APPEND x {5+}", 1, 5, true},
        {"a APPEND x ~{0}", 1, 0, false},
        {"a APPEND x (\\Seen) {4294967295}", 1, 4294967295u, false},
        {"a APPEND x {4294967296}", -1, 0, false},
        {"a APPEND x {}", -1, 0, false},
        {"a APPEND x{5}", -1, 0, false},
        {"a LOGIN \"x {5}", -1, 0, false},
        {"a LOGIN \"x\\\" {5}\"", 0, 0, false},
        {"a LOGIN \"{5}\" {3}", 1, 3, false},
        {"a NOOP", 0, 0, false},
        {"a NOOP }", 0, 0, false},
        {"{3}", 1, 3, false}, /* a continuation: checked by the caller */
        {"a FETCH 1 (BODY[] {2}", 1, 2, false},
    };
    case_begin("line literal");
    for (size_t i = 0; i < STP_ARRAY_LEN(cases); i++) {
        uint64_t n = 0;
        bool ns = false, bin = false;
        int r = stp_imap_line_literal(cases[i].l, strlen(cases[i].l), &n, &ns,
                                      &bin);
        CHECK(r == cases[i].r && (r != 1 || (n == cases[i].n &&
                                             ns == cases[i].nonsync)),
              "line_literal(\"%s\") = %d n=%llu", cases[i].l, r,
              (unsigned long long)n);
    }
    case_end();
}

static void test_status(void)
{
    struct stp_proto_status st;
    const struct stp_proto_cfg cfg = STARTTLS_REQ;
    case_begin("status");
    memset(&R, 0, sizeof(R));
    stp_imap_init(&R.e, &cfg, &ops, NULL);
    stp_imap_status(&R.e, &st);
    CHECK(st.greeting && !st.idle, "greeting pending");
    add(false, S(UGREET));
    add(true, S("t STARTTLS\r\n"));
    R.tls_pending = false;
    stp_imap_tls_started(&R.e);
    stp_imap_status(&R.e, &st);
    CHECK(st.idle && !st.replies_due, "idle after TLS");
    add(true, S("a NO"));
    stp_imap_status(&R.e, &st);
    CHECK(st.partial && !st.idle, "partial command");
    add(true, S("OP\r\n"));
    stp_imap_status(&R.e, &st);
    CHECK(st.replies_due && !st.idle, "reply due");
    add(false, S("a OK\r\n"));
    add(true, S("b APPEND x {4+}\r\nab"));
    stp_imap_status(&R.e, &st);
    CHECK(st.replies_due && !st.content, "a held literal waits for +");
    add(false, S("+ OK\r\n"));
    stp_imap_status(&R.e, &st);
    CHECK(st.content && !st.idle, "content");
    add(true, S("cd\r\n"));
    add(false, S("b OK\r\n"));
    add(true, S("i IDLE\r\n"));
    add(false, S("+ idling\r\n"));
    stp_imap_status(&R.e, &st);
    CHECK(st.idle && !st.replies_due, "IDLE is idle");
    CHECK(stp_imap_client_eof(&R.e, 0) == STP_EOF_CLOSE, "eof in IDLE");
    add(true, S("DONE\r\n"));
    add(false, S("i OK\r\n"));
    add(true, S("a AUTHENTICATE PLAIN\r\n"));
    add(false, S("+ \r\n"));
    CHECK(stp_imap_client_eof(&R.e, 0) == STP_EOF_CUT, "eof in a SASL exchange");
    CHECK(!R.viol[0], "%s", R.viol);
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    test_cap_edit();
    test_line_literal();
    test_scenarios();
    test_status();
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
