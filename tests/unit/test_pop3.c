/* Unit tests for the POP3 engine (proxy/pop3.c) behind the seam.
 *
 * Scenarios are scripts of client bytes, upstream bytes and events; each runs
 * with both streams fed whole, split at every byte position of the client
 * stream and of the upstream stream (two calls), and one byte at a time. The
 * feeding loop is the daemon's (stp_proto_feed): bytes the engine did not
 * take stay buffered and are offered again. A case passes only if it passes
 * in every mode. Last line printed: "N passed, N failed". */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pop3.h"

#include "unit.h"

#define REC_CAP 65536

struct rec {
    struct stp_pop3 s;
    char up[REC_CAP]; /* upstream wire: lines + CRLF */
    size_t up_len;
    char cli[REC_CAP];
    size_t cli_len;
    int start_tls;
    bool tls_pending;
    int closes;
    enum stp_close_reason reason;
    bool cut;
    int rejects;
    int up_err;
    bool up_gone;
    bool fed_pending;
    bool tls;            /* the client leg is TLS */
    bool require_tls;
    char cbuf[REC_CAP];
    size_t clen;
    char ubuf[REC_CAP];
    size_t ulen;
    char viol[300];
    unsigned room, pieces;
};

static struct rec R;

static void violation(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
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
    if (*len + n > REC_CAP) {
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
    if (R.closes)
        violation("to_upstream after close: \"%s\"", esc(p, n));
    if (R.tls_pending)
        violation("to_upstream between start_tls and tls_started");
    if (R.require_tls && !R.tls)
        violation("forwarded before TLS: \"%s\"", esc(p, n));
    if (R.room && R.pieces++ >= R.room)
        violation("to_upstream while full: \"%s\"", esc(p, n));
    if (kind != STP_FWD_LINE)
        violation("POP3 forwards lines only");
    if (memchr(p, '\r', n) || memchr(p, '\n', n) || memchr(p, '\0', n))
        violation("FWD_LINE with CR/LF/NUL: \"%s\"", esc(p, n));
    append(R.up, &R.up_len, p, n);
    append(R.up, &R.up_len, "\r\n", 2);
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
    if (R.tls_pending || R.tls)
        violation("start_tls twice or under TLS");
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
    if (!event || !detail)
        violation("event with NULL text");
    else if (strcmp(event, "bug") == 0)
        violation("engine reports a bug: %s", detail);
    else if (strcmp(event, "reject") == 0)
        R.rejects++;
}

static bool op_upstream_full(void *ctx)
{
    (void)ctx;
    return R.room && R.pieces >= R.room;
}

static const struct stp_proto_actions rec_ops = {
    .to_upstream = op_to_upstream,
    .to_client = op_to_client,
    .start_tls = op_start_tls,
    .close = op_close,
    .event = op_event,
    .upstream_full = op_upstream_full,
};

static const char *feed_input(void *ctx, enum stp_side side, size_t *n)
{
    (void)ctx;
    if (side == STP_SIDE_UPSTREAM) {
        *n = R.up_gone ? 0 : R.ulen;
        return R.ubuf;
    }
    *n = R.clen;
    R.fed_pending = R.tls_pending;
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
    if (side == STP_SIDE_CLIENT && k && R.fed_pending)
        violation("client bytes consumed while waiting for TLS: \"%s\"",
                  esc(R.cbuf, k));
    memmove(buf, buf + k, *len - k);
    *len -= k;
}

/* The relay writes what was queued, then offers the client's input again. */
static bool feed_make_room(void *ctx)
{
    (void)ctx;
    bool full = R.room && R.pieces >= R.room;
    R.pieces = 0;
    return full;
}

static const struct stp_feed_io rec_feed = {feed_input, feed_consume,
                                            feed_make_room};

static void pump(void)
{
    while (stp_proto_feed(&stp_proto_pop3, &R.s, &rec_feed, NULL) < 0) {
        R.up_err++;
        R.up_gone = true;
        R.ulen = 0;
    }
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
    struct step steps[20];
    const char *up;  /* expected upstream wire bytes */
    const char *cli; /* expected client bytes */
    int close;       /* reason or NO_CLOSE */
    int start_tls;
    bool reject;     /* at least one reject event */
    bool up_err;
    const char *summary;
};

/* A STARTTLS listener requiring TLS, an implicit one, a plaintext one. */
#define CFG_STLS {.offer_starttls = true, .require_tls = true,                \
                  .max_line = 512, .hostname = "proxy.test"}
#define CFG_IMPLICIT {.require_tls = true, .tls_active = true,                \
                      .max_line = 512, .hostname = "proxy.test"}
#define CFG_OPT {.offer_starttls = true, .max_line = 512,                     \
                 .hostname = "proxy.test"}

#define UGREET "+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>\r\n"
#define PGREET "+OK proxy.test POP3 ready\r\n"
#define TLS_REQ                                                               \
    "-ERR [AUTH] Plaintext authentication disallowed: issue STLS first\r\n"
#define BEGIN "+OK Begin TLS negotiation\r\n"
/* A message whose lines look like protocol: "+OK", "-ERR", a stuffed "."
 * line ("..") and stuffed text, CRLF.CRLF split across lines. */
#define MSG_BODY                                                              \
    "From: a@b.test\r\nSubject: dots\r\n\r\n+OK not a reply\r\n-ERR nor "      \
    "this\r\n..\r\n..leading dot\r\n...\r\n.\tx\r\nend\r\n"
#define RETR_RESP "+OK 123 octets\r\n" MSG_BODY ".\r\n"
#define UCAPA                                                                 \
    "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE" \
    "\r\nstls\r\nUSER\r\nSASL PLAIN SCRAM-SHA-256-PLUS LOGIN scram-sha-1-plus" \
    "\r\n.\r\n"
#define UCAPA_SEEN                                                            \
    "+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE" \
    "\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"

static const struct scen scens[] = {
    {"greeting: the proxy's, no APOP timestamp, upstream's consumed",
     CFG_STLS, {U(UGREET)}, "", PGREET, NO_CLOSE, 0, false, false, NULL},
    {"client bytes before the greeting wait", CFG_STLS,
     {C("CAPA\r\n"), U(UGREET)}, "",
     PGREET "+OK Capability list follows\r\nSTLS\r\n.\r\n", NO_CLOSE, 0,
     false, false, "capa=1 body_bytes=0"},
    {"before TLS: USER, PASS, APOP, AUTH refused, never forwarded", CFG_STLS,
     {U(UGREET), C("USER alice\r\n"), C("PASS secret\r\n"),
      C("APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"),
      C("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"), C("auth\r\n"),
      C(" user\tbob\r\n")},
     "", PGREET TLS_REQ TLS_REQ TLS_REQ TLS_REQ TLS_REQ TLS_REQ, NO_CLOSE, 0,
     true, false, "user=0/2 pass=0/1 apop=0/1 auth=0/2 body_bytes=0"},
    {"before TLS: NOOP, STAT, RETR, unknown get -ERR", CFG_STLS,
     {U(UGREET), C("NOOP\r\nSTAT\r\nRETR 1\r\nXYZZY\r\n")}, "",
     PGREET "-ERR Must issue STLS first\r\n-ERR Must issue STLS first\r\n"
            "-ERR Must issue STLS first\r\n-ERR Must issue STLS first\r\n",
     NO_CLOSE, 0, true, false, NULL},
    {"before TLS: QUIT answered by the proxy", CFG_STLS,
     {U(UGREET), C("QUIT\r\nUSER x\r\n")}, "",
     PGREET "+OK proxy.test POP3 server signing off\r\n", STP_CLOSE_QUIT, 0,
     false, false, NULL},
    {"upstream bytes from before the client's TLS are never read inside it",
     CFG_STLS,
     {U(UGREET), C("STLS\r\n"), TLS, U("-ERR [AUTH] injected\r\n"),
      C("CAPA\r\n"), U(UCAPA)},
     "CAPA\r\n", PGREET BEGIN UCAPA_SEEN, NO_CLOSE, 1, false, false, NULL},
    {"STLS: pipelined USER/PASS after it are never executed", CFG_STLS,
     {U(UGREET), C("STLS\r\nUSER x\r\nPASS y\r\n"), TLS, C("CAPA\r\n"),
      U(UCAPA)},
     "CAPA\r\n", PGREET BEGIN UCAPA_SEEN, NO_CLOSE, 1, false, false,
     "capa=1 stls=1 body_bytes=0"},
    {"after TLS: a second STLS is refused by the proxy", CFG_STLS,
     {U(UGREET), C("stls\r\n"), TLS, C("STLS\r\n"), C("STLS now\r\n")}, "",
     PGREET BEGIN "-ERR TLS already active\r\n-ERR Syntax: STLS\r\n",
     NO_CLOSE, 1, true, false, NULL},
    {"after TLS: login, RETR with dot-stuffed lines relayed untouched",
     CFG_STLS,
     {U(UGREET), C("STLS\r\n"), TLS,
      C("USER alice\r\nPASS secret\r\nRETR 1\r\n"),
      U("+OK\r\n+OK Logged in.\r\n" RETR_RESP)},
     "USER alice\r\nPASS secret\r\nRETR 1\r\n",
     PGREET BEGIN "+OK\r\n+OK Logged in.\r\n" RETR_RESP, NO_CLOSE, 1, false,
     false, "stls=1 user=1 pass=1 retr=1 body_bytes=102"},
    {"pipelined commands, multi-line and single answers in order",
     CFG_IMPLICIT,
     {U(UGREET), C("CAPA\r\nLIST\r\nUIDL 1\r\nTOP 1 0\r\nDELE 1\r\nQUIT\r\n"),
      U("+OK\r\nTOP\r\n.\r\n+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"
        "+OK 1 whqtswO00WBw418f9t5JxYwZ\r\n+OK\r\nSubject: x\r\n\r\n.\r\n"
        "+OK deleted\r\n+OK bye\r\n")},
     "CAPA\r\nLIST\r\nUIDL 1\r\nTOP 1 0\r\nDELE 1\r\nQUIT\r\n",
     UGREET "+OK\r\nTOP\r\n.\r\n+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"
            "+OK 1 whqtswO00WBw418f9t5JxYwZ\r\n+OK\r\nSubject: x\r\n\r\n.\r\n"
            "+OK deleted\r\n+OK bye\r\n",
     STP_CLOSE_QUIT, 0, false, false,
     "capa=1 list=1 uidl=1 top=1 dele=1 quit=1 body_bytes=34"},
    {"implicit TLS: greeting relayed with its APOP timestamp", CFG_IMPLICIT,
     {U(UGREET), C("STLS\r\n")}, "",
     UGREET "-ERR TLS already active\r\n", NO_CLOSE, 0, true, false, NULL},
    {"-ERR to RETR has no body; LIST n is single-line", CFG_IMPLICIT,
     {U(UGREET), C("RETR 9\r\nLIST 1\r\nNOOP\r\n"),
      U("-ERR no such message\r\n+OK 1 120\r\n+OK\r\n")},
     "RETR 9\r\nLIST 1\r\nNOOP\r\n",
     UGREET "-ERR no such message\r\n+OK 1 120\r\n+OK\r\n", NO_CLOSE, 0,
     false, false, "list=1 retr=0/1 noop=1 body_bytes=0"},
    {"LIST and UIDL with an empty argument are listings, as Dovecot reads "
     "them", CFG_IMPLICIT,
     {U(UGREET), C("LIST \r\nUIDL \r\n"),
      U("+OK 1 messages:\r\n1 120\r\n.\r\n+OK\r\n1 abc\r\n.\r\n")},
     "LIST\r\nUIDL\r\n",
     UGREET "+OK 1 messages:\r\n1 120\r\n.\r\n+OK\r\n1 abc\r\n.\r\n",
     NO_CLOSE, 0, false, false, NULL},
    {"AUTH exchange: challenge, response, +OK", CFG_IMPLICIT,
     {U(UGREET), C("AUTH LOGIN\r\ndXNlcg==\r\n"), U("+ VXNlcm5hbWU6\r\n"),
      U("+ UGFzc3dvcmQ6\r\n"), C("cGFzcw==\r\n"), U("+OK Logged in.\r\n")},
     "AUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\n",
     UGREET "+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n+OK Logged in.\r\n",
     NO_CLOSE, 0, false, false, "auth=1 body_bytes=0"},
    {"AUTH alone: mechanism list without -PLUS", CFG_IMPLICIT,
     {U(UGREET), C("AUTH\r\n"),
      U("+OK\r\nPLAIN\r\nSCRAM-SHA-1-PLUS\r\nLOGIN\r\n.\r\n")},
     "AUTH\r\n", UGREET "+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n", NO_CLOSE, 0, false,
     false, NULL},
    {"a SASL line of only -PLUS mechanisms is dropped", CFG_IMPLICIT,
     {U(UGREET), C("CAPA\r\n"),
      U("+OK\r\nSASL SCRAM-SHA-256-PLUS\r\n STLS\r\nSTLSX\r\n.\r\n")},
     "CAPA\r\n", UGREET "+OK\r\nSTLSX\r\n.\r\n", NO_CLOSE, 0, false, false,
     NULL},
    {"require_tls = no: forwarded in clear, CAPA offers the proxy's STLS",
     CFG_OPT,
     {U(UGREET), C("CAPA\r\n"), U("+OK\r\nUSER\r\nSTLS\r\n.\r\n"),
      C("STLS\r\nCAPA\r\n"), TLS, C("CAPA\r\n"), U("+OK\r\nUSER\r\n.\r\n")},
     "CAPA\r\nCAPA\r\n",
     UGREET "+OK\r\nUSER\r\nSTLS\r\n.\r\n" BEGIN "+OK\r\nUSER\r\n.\r\n",
     NO_CLOSE, 1, false, false, NULL},
    {"require_tls = no: STLS waits for the replies owed before it", CFG_OPT,
     {U(UGREET), C("CAPA\r\nSTLS\r\n"), U("+OK\r\n.\r\n")}, "CAPA\r\n",
     UGREET "+OK\r\nSTLS\r\n.\r\n" BEGIN, NO_CLOSE, 1, false, false, NULL},
    {"require_tls = no: no STLS after a login", CFG_OPT,
     {U(UGREET), C("USER a\r\nPASS b\r\n"), U("+OK\r\n+OK in\r\n"),
      C("STLS\r\nCAPA\r\n"), U("+OK\r\nUIDL\r\n.\r\n")},
     "USER a\r\nPASS b\r\nCAPA\r\n",
     UGREET "+OK\r\n+OK in\r\n-ERR STLS only in AUTHORIZATION state\r\n"
            "+OK\r\nUIDL\r\n.\r\n",
     NO_CLOSE, 0, true, false, NULL},
    {"over-long command refused, the next one works", CFG_IMPLICIT,
     {U(UGREET),
      C("USER "
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "\r\nNOOP\r\n"),
      U("+OK\r\n")},
     "NOOP\r\n", UGREET "-ERR Line too long\r\n+OK\r\n", NO_CLOSE, 0, true,
     false, NULL},
    {"canonical forwarding: blanks before the verb, TAB after it",
     CFG_IMPLICIT, {U(UGREET), C("  user\talice\r\nPASS  two  spaces\r\n")},
     "user alice\r\nPASS  two  spaces\r\n", UGREET, NO_CLOSE, 0, false, false,
     NULL},
    {"XCLIENT is the proxy's alone: refused, never forwarded", CFG_IMPLICIT,
     {U(UGREET), C("XCLIENT ADDR=6.6.6.6\r\n xclient\tADDR=6.6.6.6\r\n")},
     "", UGREET "-ERR [SYS/PERM] Insufficient authorization\r\n"
                "-ERR [SYS/PERM] Insufficient authorization\r\n",
     NO_CLOSE, 0, true, false, NULL},
    {"a bare CR in a command is refused locally", CFG_IMPLICIT,
     {U(UGREET), C("USER a\rPASS b\r\n")}, "",
     UGREET "-ERR Bad character in command\r\n", NO_CLOSE, 0, true, false,
     NULL},
    {"upstream lost mid-RETR: no -ERR inside the body", CFG_IMPLICIT,
     {U(UGREET), C("RETR 1\r\n"), U("+OK\r\nline one\r\n-ERR x"), LOST},
     "RETR 1\r\n", UGREET "+OK\r\nline one\r\n-ERR x", STP_CLOSE_UPSTREAM_LOST,
     0, false, false, NULL},
    {"upstream lost between commands: -ERR then close", CFG_IMPLICIT,
     {U(UGREET), C("NOOP\r\n"), LOST}, "NOOP\r\n",
     UGREET "-ERR [SYS/TEMP] proxy.test Upstream connection lost\r\n",
     STP_CLOSE_UPSTREAM_LOST, 0, false, false, NULL},
    {"timeout and shutdown word -ERR", CFG_STLS, {U(UGREET), TIMEOUT, SHUTDOWN},
     "", PGREET "-ERR [SYS/TEMP] proxy.test timeout exceeded\r\n",
     STP_CLOSE_TIMEOUT, 0, false, false, NULL},
    {"upstream refuses service in its greeting", CFG_STLS,
     {U("-ERR [SYS/TEMP] busy\r\n"), C("CAPA\r\n")}, "",
     "-ERR [SYS/TEMP] busy\r\n", STP_CLOSE_UPSTREAM_421, 0, false, false,
     NULL},
    {"upstream garbage is a protocol error", CFG_IMPLICIT,
     {U(UGREET), C("NOOP\r\n"), U("220 smtp.test\r\n")}, "NOOP\r\n",
     UGREET "-ERR [SYS/TEMP] proxy.test upstream protocol error\r\n",
     STP_CLOSE_UPSTREAM_PROTO, 0, false, true, NULL},
    {"unsolicited upstream -ERR closes", CFG_IMPLICIT,
     {U(UGREET), U("-ERR Disconnected for inactivity.\r\n")}, "",
     UGREET "-ERR Disconnected for inactivity.\r\n", STP_CLOSE_UPSTREAM_421, 0,
     false, false, NULL},
    {"max_errors caps consecutive -ERR", {.offer_starttls = true,
     .require_tls = true, .max_line = 512, .max_errors = 2,
     .hostname = "proxy.test"},
     {U(UGREET), C("USER a\r\nUSER b\r\nUSER c\r\n")}, "",
     PGREET TLS_REQ TLS_REQ "-ERR [SYS/PERM] proxy.test too many errors\r\n",
     STP_CLOSE_ERRORS, 0, true, false, NULL},
};

enum feed_mode { F_WHOLE, F_SPLIT_CLIENT, F_SPLIT_UP, F_BYTES };

static void feed(bool client, const char *p, size_t n)
{
    if (client)
        append(R.cbuf, &R.clen, p, n);
    else if (!R.up_gone)
        append(R.ubuf, &R.ulen, p, n);
    pump();
}

static bool run_scen(const struct scen *sc, enum feed_mode mode, size_t split,
                     unsigned room)
{
    static const char *mode_names[] = {"whole", "client split",
                                       "upstream split", "byte by byte"};
    memset(&R, 0, sizeof(R));
    R.room = room;
    R.tls = sc->cfg.tls_active;
    R.require_tls = sc->cfg.require_tls;
    stp_pop3_init(&R.s, &sc->cfg, &rec_ops, NULL);
    char where[64];
    snprintf(where, sizeof(where), "%s at %zu room %u", mode_names[mode],
             split, room);
    bool ok = true;
    size_t coff = 0, uoff = 0;
    for (const struct step *st = sc->steps; st->op != S_END; st++) {
        switch (st->op) {
        case S_C:
        case S_U: {
            bool client = st->op == S_C;
            size_t *off = client ? &coff : &uoff;
            if (mode == F_BYTES) {
                for (size_t i = 0; i < st->n; i++)
                    feed(client, st->p + i, 1);
            } else if (((mode == F_SPLIT_CLIENT && client) ||
                        (mode == F_SPLIT_UP && !client)) &&
                       split > *off && split < *off + st->n) {
                feed(client, st->p, split - *off);
                feed(client, st->p + (split - *off), st->n - (split - *off));
            } else {
                feed(client, st->p, st->n);
            }
            *off += st->n;
            break;
        }
        case S_TLS:
            if (!R.tls_pending) {
                failf("%s: TLS step without start_tls", where);
                return false;
            }
            R.clen = 0; /* plaintext pipelined after STLS is dropped */
            R.tls_pending = false;
            R.tls = true;
            stp_pop3_tls_started(&R.s);
            pump();
            break;
        case S_LOST:
            stp_pop3_fail(&R.s, STP_FAIL_LOST);
            R.up_gone = true;
            pump();
            break;
        case S_TIMEOUT:
            stp_pop3_fail(&R.s, STP_FAIL_TIMEOUT);
            pump();
            break;
        case S_SHUTDOWN:
            stp_pop3_fail(&R.s, STP_FAIL_SHUTDOWN);
            pump();
            break;
        case S_END:
            break;
        }
    }
    if (R.viol[0]) {
        failf("%s: %s", where, R.viol);
        ok = false;
    }
    if (R.up_len != strlen(sc->up) || memcmp(R.up, sc->up, R.up_len) != 0) {
        failf("%s: upstream got \"%s\", want \"%s\"", where,
              esc(R.up, R.up_len), esc(sc->up, strlen(sc->up)));
        ok = false;
    }
    if (R.cli_len != strlen(sc->cli) ||
        memcmp(R.cli, sc->cli, R.cli_len) != 0) {
        failf("%s: client got \"%s\", want \"%s\"", where,
              esc(R.cli, R.cli_len), esc(sc->cli, strlen(sc->cli)));
        ok = false;
    }
    if (sc->close == NO_CLOSE && R.closes) {
        failf("%s: unexpected close (%s)", where,
              stp_close_reason_name(R.reason));
        ok = false;
    } else if (sc->close != NO_CLOSE &&
               (!R.closes || R.reason != (enum stp_close_reason)sc->close)) {
        failf("%s: close %d reason %s, want %s", where, R.closes,
              stp_close_reason_name(R.reason),
              stp_close_reason_name((enum stp_close_reason)sc->close));
        ok = false;
    }
    if (R.start_tls != sc->start_tls) {
        failf("%s: start_tls %d times, want %d", where, R.start_tls,
              sc->start_tls);
        ok = false;
    }
    if (sc->reject && !R.rejects) {
        failf("%s: no reject event", where);
        ok = false;
    }
    if (sc->up_err != (R.up_err > 0)) {
        failf("%s: upstream_input errors %d", where, R.up_err);
        ok = false;
    }
    if (sc->summary) {
        char sum[256];
        stp_proto_pop3.summary(&R.s, sum, sizeof(sum));
        if (strcmp(sum, sc->summary) != 0) {
            failf("%s: summary \"%s\", want \"%s\"", where, sum, sc->summary);
            ok = false;
        }
    }
    return ok;
}

static void test_engine(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(scens); i++) {
        const struct scen *sc = &scens[i];
        char name[160];
        snprintf(name, sizeof(name), "pop3 engine: %s", sc->name);
        case_begin(name);
        size_t ct = 0, ut = 0;
        for (const struct step *st = sc->steps; st->op != S_END; st++) {
            if (st->op == S_C)
                ct += st->n;
            else if (st->op == S_U)
                ut += st->n;
        }
        if (!run_scen(sc, F_WHOLE, 0, 0) || !run_scen(sc, F_WHOLE, 0, 1))
            goto done;
        for (size_t k = 1; k < ct; k++)
            if (!run_scen(sc, F_SPLIT_CLIENT, k, 0))
                goto done;
        for (size_t k = 1; k < ut; k++)
            if (!run_scen(sc, F_SPLIT_UP, k, 0))
                goto done;
        if (!run_scen(sc, F_BYTES, 0, 0))
            goto done;
        run_scen(sc, F_BYTES, 0, 1);
    done:
        case_end();
    }
}

/* ---- CAPA line editing ---------------------------------------------------- */

static const struct {
    const char *in, *out; /* OUT NULL: dropped */
} capa_cases[] = {
    {"STLS", NULL},
    {"stls", NULL},
    {"  Stls", NULL},
    {"STLS x", NULL},
    {"STLSX", "STLSX"},
    {"USER", "USER"},
    {"SASL PLAIN LOGIN", "SASL PLAIN LOGIN"},
    {"SASL SCRAM-SHA-256-PLUS PLAIN", "SASL PLAIN"},
    {"sasl  plain\tscram-sha-1-plus ", "SASL plain"},
    {"SASL SCRAM-SHA-1-PLUS", NULL},
    {"SASL", NULL},
    {"SASLX PLAIN-PLUS", "SASLX PLAIN-PLUS"},
    {"IMPLEMENTATION Dovecot", "IMPLEMENTATION Dovecot"},
};

static void test_capa_line(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(capa_cases); i++) {
        char name[96], out[128];
        size_t ol;
        snprintf(name, sizeof(name), "capa line \"%s\"", capa_cases[i].in);
        case_begin(name);
        bool keep = stp_pop3_capa_line(capa_cases[i].in,
                                       strlen(capa_cases[i].in), out,
                                       sizeof(out), &ol);
        if (!capa_cases[i].out)
            CHECK(!keep, "kept as \"%s\"", esc(out, ol));
        else
            CHECK(keep && ol == strlen(capa_cases[i].out) &&
                      memcmp(out, capa_cases[i].out, ol) == 0,
                  "got %d \"%s\", want \"%s\"", keep, esc(out, keep ? ol : 0),
                  capa_cases[i].out);
        case_end();
    }
}

/* ---- status, pipelining bound, the phase table ---------------------------- */

static void test_status_and_bound(void)
{
    case_begin("status: greeting, replies due, partial, idle; a bounded queue");
    struct stp_proto_cfg cfg = CFG_IMPLICIT;
    memset(&R, 0, sizeof(R));
    R.tls = true;
    stp_pop3_init(&R.s, &cfg, &rec_ops, NULL);
    struct stp_proto_status st;
    stp_pop3_status(&R.s, &st);
    CHECK(st.greeting && !st.idle, "before the greeting");
    CHECK(stp_pop3_client_eof(&R.s, 0) == STP_EOF_CLOSE, "eof before greeting");
    feed(false, S(UGREET));
    stp_pop3_status(&R.s, &st);
    CHECK(!st.greeting && st.idle && !st.replies_due, "after the greeting");
    feed(true, S("NOO"));
    stp_pop3_status(&R.s, &st);
    CHECK(st.partial && !st.idle, "mid-line");
    feed(true, S("P\r\n"));
    stp_pop3_status(&R.s, &st);
    CHECK(st.replies_due && !st.idle, "a reply owed");
    CHECK(stp_pop3_client_eof(&R.s, 0) == STP_EOF_WAIT, "eof with reply owed");
    feed(false, S("+OK\r\n"));
    /* More pipelined commands than the queue holds: the rest waits. */
    char many[(STP_POP3_MAX_PENDING + 10) * 6 + 1];
    size_t n = 0;
    for (int i = 0; i < STP_POP3_MAX_PENDING + 10; i++)
        n += (size_t)snprintf(many + n, sizeof(many) - n, "NOOP\r\n");
    feed(true, many, n);
    CHECK(R.s.pend_count == STP_POP3_MAX_PENDING, "queue holds %u",
          R.s.pend_count);
    CHECK(R.clen == 10 * 6, "%zu bytes wait", R.clen);
    for (int i = 0; i < STP_POP3_MAX_PENDING + 10; i++)
        feed(false, S("+OK\r\n"));
    CHECK(R.clen == 0 && R.s.pend_count == 0, "all answered: %zu left %u owed",
          R.clen, R.s.pend_count);
    CHECK(!R.viol[0], "%s", R.viol);
    case_end();

    case_begin("phase table: CLOSED is final, GREETING only to COMMAND");
    CHECK(stp_pop3_phase_may(STP_P3_GREETING, STP_P3_COMMAND), "g->c");
    CHECK(!stp_pop3_phase_may(STP_P3_GREETING, STP_P3_STLS), "g->stls");
    CHECK(!stp_pop3_phase_may(STP_P3_CLOSED, STP_P3_COMMAND), "closed->c");
    CHECK(stp_pop3_phase_may(STP_P3_QUIT, STP_P3_CLOSED), "quit->closed");
    for (int i = 0; i < STP_P3_COUNT; i++)
        CHECK(strcmp(stp_pop3_phase_name((enum stp_pop3_phase)i), "?") != 0,
              "phase %d has no name", i);
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    test_engine();
    test_capa_line();
    test_status_and_bound();
    return unit_summary();
}
