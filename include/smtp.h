/* SMTP protocol logic: line framing, command policy, reply parsing, the EHLO
 * filter, message-content tracking. Pure: no sockets, no libuv, no wolfSSL.
 * The session feeds it bytes and it emits actions through stp_smtp_ops, so it
 * can be unit-tested and fuzzed on its own. */
#ifndef STP_SMTP_H
#define STP_SMTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "close.h"
#include "prelude.h"
#include "proto.h"
#include "stp.h"

/* ---- small parsers -------------------------------------------------------- */

enum stp_line_status {
    STP_LINE_MORE = 0,   /* no LF yet, and still under the limit */
    STP_LINE_OK,         /* a line: *len excludes the terminator */
    STP_LINE_TOO_LONG,   /* no LF within max bytes */
};

/* Find one line in p[0..n). Terminator is LF or CRLF. On STP_LINE_OK, *len is
 * the line without terminator and *used includes it. A line (with its
 * terminator) longer than max octets is STP_LINE_TOO_LONG even if it ends in
 * this buffer. */
enum stp_line_status stp_line_find(const char *p, size_t n, size_t max,
                                   size_t *len, size_t *used);

enum stp_cmd {
    STP_CMD_UNKNOWN = 0,
    STP_CMD_EHLO, STP_CMD_HELO, STP_CMD_MAIL, STP_CMD_RCPT, STP_CMD_DATA,
    STP_CMD_BDAT, STP_CMD_RSET, STP_CMD_NOOP, STP_CMD_QUIT, STP_CMD_VRFY,
    STP_CMD_EXPN, STP_CMD_HELP, STP_CMD_ETRN, STP_CMD_AUTH, STP_CMD_STARTTLS,
    STP_CMD_XCLIENT, STP_CMD_XFORWARD, STP_CMD_LHLO,
};

/* A command line (no terminator) split the way the most lenient upstream
 * splits it: leading white space skipped, the verb (case-insensitive) ends at
 * any white space (SP, HT, VT, FF, CR, LF), the arguments start after the white
 * space that follows it. A line is forwarded in canonical form, "VERB" or
 * "VERB SP ARGS", so every upstream reads the verb the proxy classified. */
struct stp_cmdline {
    enum stp_cmd cmd;
    const char *verb;  /* as the client wrote it */
    size_t verb_len;
    const char *arg;   /* to the end of the line; arg_len 0: none */
    size_t arg_len;
    bool canonical;    /* the line is already "VERB" or "VERB SP ARGS" */
};
void stp_cmd_parse(const char *line, size_t len, struct stp_cmdline *out);
bool stp_smtp_space(char c);
const char *stp_cmd_name(enum stp_cmd cmd);

/* "BDAT <size> [LAST]" arguments. 0 or -EINVAL. */
int stp_bdat_parse(const char *arg, size_t len, uint64_t *size, bool *last);

/* One reply line (no terminator): "250-text", "250 text" or "250".
 * Returns 0 with *code and *last set, or -EINVAL if it is not a reply line. */
int stp_reply_line(const char *line, size_t len, int *code, bool *last);

/* Does an EHLO extension line's text (after "250-") name keyword KW? Blanks
 * before it are skipped, as clients do; RFC 5321 keywords are letters,
 * digits and '-', anything else ends one ("AUTH=", "AUTH\t", "AUTH PLAIN"
 * are all AUTH). The proxy's own EHLO and the client's use this one
 * matcher. */
bool stp_ehlo_keyword_is(const char *text, size_t n, const char *kw);

/* EHLO reply filter. IN is a complete 250 reply (lines with CRLF). Writes the
 * edited reply into OUT: drops extension lines named by FLAGS, always drops
 * STARTTLS/XCLIENT/XFORWARD, appends STARTTLS when asked, and fixes the
 * continuation markers so exactly the last line has "250 ". Returns the
 * length written or -ENOSPC. *chunking reports whether CHUNKING was offered.*/
enum {
    STP_EHLO_OFFER_STARTTLS = 1 << 0,
    STP_EHLO_STRIP_AUTH = 1 << 1,
    STP_EHLO_STRIP_REQUIRETLS = 1 << 2,
    STP_EHLO_STRIP_CHUNKING = 1 << 3,
};
int stp_ehlo_filter(const char *in, size_t inlen, char *out, size_t outcap,
                    unsigned flags, bool *chunking);

/* End-of-data scanner for DATA content. Looks only for CRLF "." CRLF, and for
 * the ambiguous forms a lenient upstream could take as the end (a "." line
 * opened or closed by a bare CR or LF: the SMTP smuggling family). */
enum stp_dot_state {
    STP_DOT_LINE_START = 0, /* after CRLF (content starts here) */
    STP_DOT_TEXT,
    STP_DOT_CR,             /* after CR */
    STP_DOT_BARE_START,     /* after a bare LF or bare CR */
    STP_DOT_DOT,            /* CRLF "." */
    STP_DOT_DOT_CR,         /* CRLF "." CR */
    STP_DOT_BARE_DOT,       /* bare line end then "." */
};
enum stp_dot_result {
    STP_DOT_MORE = 0,  /* all of the input is content */
    STP_DOT_END,       /* *used bytes end with CRLF.CRLF */
    STP_DOT_SMUGGLE,   /* ambiguous end: *used bytes are safe, stop there */
};
enum stp_dot_result stp_dot_scan(enum stp_dot_state *st, const char *p,
                                 size_t n, size_t *used);

/* ---- the session's protocol engine ------------------------------------------ */

struct stp_smtp_cfg {
    bool offer_starttls;    /* listener tls = starttls */
    bool require_tls;       /* 530 before TLS */
    bool tls_active;        /* implicit TLS: starts active */
    bool upstream_tls;      /* upstream leg encrypted (REQUIRETLS passes) */
    bool upstream_auth;     /* the proxy logged in upstream: no client AUTH */
    bool lmtp;              /* RFC 2033: LHLO, a reply per recipient */
    uint32_t max_line;      /* client command line limit incl. CRLF */
    uint32_t max_errors;    /* consecutive error replies before 421; 0: no cap */
    const char *hostname;   /* in 421 texts */
};

enum stp_phase {
    STP_PH_GREETING = 0, /* waiting for the upstream's greeting */
    STP_PH_COMMAND,      /* reading client commands */
    STP_PH_CONTENT,      /* DATA content until CRLF.CRLF */
    STP_PH_CHUNK,        /* BDAT octets, forwarded */
    STP_PH_CHUNK_DISCARD,/* BDAT octets of a refused BDAT, dropped */
    STP_PH_AUTH,         /* client lines are SASL responses */
    STP_PH_STARTTLS,     /* 220 sent; waiting for the handshake */
    STP_PH_QUIT,         /* QUIT forwarded; client input ignored */
    STP_PH_CLOSED,       /* close requested; nothing more happens */
    STP_PH_COUNT
};
const char *stp_phase_name(enum stp_phase ph);
/* Does the engine's table allow FROM -> TO? */
bool stp_phase_may(enum stp_phase from, enum stp_phase to);

/* What each queued upstream reply answers. */
enum stp_pend {
    STP_PEND_GREETING = 0, STP_PEND_EHLO, STP_PEND_CMD, STP_PEND_DATA,
    STP_PEND_DATA_END, STP_PEND_BDAT, STP_PEND_AUTH, STP_PEND_QUIT,
    STP_PEND_RSET_INTERNAL, /* ours, at the TLS boundary: not relayed */
    STP_PEND_MAIL,          /* a 2xx opens a transaction */
    STP_PEND_RESET,         /* RSET: a 2xx ends the transaction */
    STP_PEND_HELO,          /* HELO: a 2xx ends it, and is the HELO after
                               TLS; a refusal changes nothing (RFC 5321
                               4.1.4) */
    STP_PEND_RCPT,          /* a 2xx adds a recipient (LMTP counts them) */
};

#define STP_SMTP_MAX_PENDING 64

/* The commands the summary line counts, in Postfix's words and order
 * (smtpd's "disconnect ... ehlo=1 mail=1 rcpt=0/1"). LMTP's LHLO is ehlo;
 * VRFY, EXPN, HELP, ETRN, XCLIENT, XFORWARD and lines that are no command
 * (too long, a bad byte) are unknown. */
enum stp_stat {
    STP_ST_EHLO = 0, STP_ST_HELO, STP_ST_STARTTLS, STP_ST_AUTH, STP_ST_MAIL,
    STP_ST_RCPT, STP_ST_DATA, STP_ST_BDAT, STP_ST_RSET, STP_ST_NOOP,
    STP_ST_QUIT, STP_ST_UNKNOWN, STP_ST_COUNT,
    STP_ST_NONE = 0xff, /* a reply the summary does not count (ours) */
};

struct stp_smtp {
    struct stp_smtp_cfg cfg;
    const struct stp_proto_actions *ops;
    void *ctx;
    enum stp_phase phase;
    bool tls;            /* client leg encrypted */
    bool chunking;       /* upstream offered CHUNKING in its last EHLO */
    bool skipping;       /* discarding the rest of an over-long line */
    bool waiting;        /* stalled until the pending replies are in */
    bool reply_421;      /* the client already got a 421 */
    bool partial;        /* a command line has begun but not ended */
    bool in_tx;          /* the upstream accepted a MAIL, no end yet */
    uint32_t rcpts;      /* recipients the upstream accepted in it */
    uint32_t lmtp_due;   /* LMTP: replies still due to the end of data */
    bool need_helo;      /* TLS started, no EHLO/HELO accepted since: the
                            upstream still holds the plaintext one */
    uint32_t errors;     /* consecutive error replies */
    enum stp_dot_state dot;
    uint64_t chunk_left;
    uint8_t pend[STP_SMTP_MAX_PENDING];
    uint8_t pend_stat[STP_SMTP_MAX_PENDING]; /* enum stp_stat of each */
    unsigned pend_head, pend_count;
    /* The summary: commands sent and those the upstream (or, for
     * STARTTLS, the proxy) accepted; messages accepted and refused after
     * their content. */
    uint32_t sent[STP_ST_COUNT], accepted[STP_ST_COUNT];
    uint32_t messages, rejected;
    bool delivered;      /* LMTP: a recipient's delivery of this message
                            was accepted */
    /* The upstream reply being assembled. Only an EHLO reply is held, in a
     * buffer that exists only while it is assembled (a session is idle most
     * of its life and should not carry it). */
    bool in_reply;
    int reply_code;
    size_t reply_bytes;  /* of the reply being relayed, up to STP_MAX_REPLY */
    char *ehlo;
    size_t ehlo_len;
};

void stp_smtp_init(struct stp_smtp *s, const struct stp_smtp_cfg *cfg,
                   const struct stp_proto_actions *ops, void *ctx);

void stp_smtp_free(struct stp_smtp *s);

/* Client bytes (plaintext). Returns how many were consumed; the rest must be
 * offered again later (after more input, or after upstream replies). */
size_t stp_smtp_client_input(struct stp_smtp *s, const char *p, size_t n);

/* Upstream bytes. Returns how many were consumed (whole lines), or a negative
 * error after which the engine has already asked to close. */
long stp_smtp_upstream_input(struct stp_smtp *s, const char *p, size_t n);

/* The client leg is now TLS: forget everything learnt in plaintext. */
void stp_smtp_tls_started(struct stp_smtp *s);

/* Is message content (DATA or a BDAT chunk) being received? */
static inline bool stp_smtp_in_content(const struct stp_smtp *s)
{
    return s->phase == STP_PH_CONTENT || s->phase == STP_PH_CHUNK ||
           s->phase == STP_PH_CHUNK_DISCARD;
}

/* Is the client part-way through a command line? */
static inline bool stp_smtp_partial_line(const struct stp_smtp *s)
{
    return s->partial;
}

/* Between transactions, nothing owed, nothing half-read: a 421 now loses
 * nothing and interrupts nothing. */
static inline bool stp_smtp_idle(const struct stp_smtp *s)
{
    return s->phase == STP_PH_COMMAND && s->pend_count == 0 && !s->partial &&
           !s->waiting && !s->in_tx;
}

/* Is the engine waiting for upstream replies? */
static inline bool stp_smtp_replies_due(const struct stp_smtp *s)
{
    return s->pend_count > 0;
}

/* "ehlo=2 starttls=1 mail=1 rcpt=1/2 data=1 quit=1 messages=1 rejected=0"
 * into BUF (CAP > 0): only the commands sent, as ACCEPTED/SENT where some
 * were refused, as Postfix writes them; messages and rejected always. */
void stp_smtp_summary(const struct stp_smtp *s, char *buf, size_t cap);

/* The relay gives up for WHY: the 421 that says so, then close. */
void stp_smtp_fail(struct stp_smtp *s, enum stp_fail why);

/* The engine behind the relay's seam (proto.h): SMTP, and LMTP, the same
 * engine with cfg.lmtp set. */
extern const struct stp_proto stp_proto_smtp, stp_proto_lmtp;

#endif
