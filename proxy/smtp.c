/* The SMTP engine of one proxied session: client command policy, upstream
 * reply tracking, EHLO editing, message-content framing. No I/O here: bytes
 * in, actions out (struct stp_proto_actions). The parsers are in smtp_parse.c. */
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "smtp.h"

/* ---- the engine ---------------------------------------------------------- */

static const char *const phase_names[STP_PH_COUNT] = {
    [STP_PH_GREETING] = "greeting",   [STP_PH_COMMAND] = "command",
    [STP_PH_CONTENT] = "content",     [STP_PH_CHUNK] = "chunk",
    [STP_PH_CHUNK_DISCARD] = "chunk-discard",
    [STP_PH_AUTH] = "auth",           [STP_PH_STARTTLS] = "starttls",
    [STP_PH_QUIT] = "quit",           [STP_PH_CLOSED] = "closed",
};

const char *stp_phase_name(enum stp_phase ph)
{
    return ph < STP_PH_COUNT ? phase_names[ph] : "?";
}

const char *stp_close_reason_name(enum stp_close_reason r)
{
    static const char *const names[STP_CLOSE_COUNT] = {
        [STP_CLOSE_NONE] = "unknown",
        [STP_CLOSE_QUIT] = "quit",
        [STP_CLOSE_UPSTREAM_421] = "upstream_421",
        [STP_CLOSE_UPSTREAM_LOST] = "upstream_lost",
        [STP_CLOSE_UPSTREAM_PROTO] = "upstream_protocol_error",
        [STP_CLOSE_TIMEOUT] = "timeout",
        [STP_CLOSE_SMUGGLE] = "smuggling",
        [STP_CLOSE_CLIENT_EOF] = "client_eof",
        [STP_CLOSE_NEXT_HOP] = "next_hop_setup_failed",
        [STP_CLOSE_ERRORS] = "too_many_errors",
        [STP_CLOSE_SHUTDOWN] = "shutdown",
        [STP_CLOSE_LIMIT] = "connection_limit",
        [STP_CLOSE_CLIENT_ERROR] = "client_error",
        [STP_CLOSE_WRITE_ERROR] = "write_error",
        [STP_CLOSE_TLS_INIT] = "tls_init_failed",
        [STP_CLOSE_TLS_HANDSHAKE] = "tls_handshake_failed",
        [STP_CLOSE_HANDSHAKE_TIMEOUT] = "handshake_timeout",
        [STP_CLOSE_IDLE_TIMEOUT] = "idle_timeout",
        [STP_CLOSE_COMMAND_TIMEOUT] = "command_timeout",
        [STP_CLOSE_DATA_TIMEOUT] = "data_timeout",
        [STP_CLOSE_UPSTREAM_TIMEOUT] = "upstream_timeout",
        [STP_CLOSE_UPSTREAM_UNREACHABLE] = "upstream_unreachable",
        [STP_CLOSE_UPSTREAM_CONNECT_TIMEOUT] = "upstream_connect_timeout",
        [STP_CLOSE_UPSTREAM_GREETING_TIMEOUT] = "upstream_greeting_timeout",
        [STP_CLOSE_MAX_CONNECTIONS] = "max_connections",
        [STP_CLOSE_LISTENER_MAX_CONNECTIONS] = "listener_max_connections",
        [STP_CLOSE_MAX_CONNECTIONS_PER_IP] = "max_connections_per_ip",
        [STP_CLOSE_PROXY_HEADER_INVALID] = "proxy_header_invalid",
        [STP_CLOSE_PROXY_HEADER_TIMEOUT] = "proxy_header_timeout",
        [STP_CLOSE_PROXY_NOT_ALLOWED] = "proxy_not_allowed",
        [STP_CLOSE_NOT_ALLOWED] = "not_allowed",
        [STP_CLOSE_LOOP] = "loop",
    };
    return r < STP_CLOSE_COUNT && names[r] ? names[r] : "?";
}

#define TO(ph) (1u << (ph))
/* Every phase may close; CLOSED is final. */
static const unsigned phase_moves[STP_PH_COUNT] = {
    [STP_PH_GREETING] = TO(STP_PH_COMMAND),
    [STP_PH_COMMAND] = TO(STP_PH_CONTENT) | TO(STP_PH_CHUNK) |
                       TO(STP_PH_CHUNK_DISCARD) | TO(STP_PH_AUTH) |
                       TO(STP_PH_STARTTLS) | TO(STP_PH_QUIT),
    [STP_PH_CONTENT] = TO(STP_PH_COMMAND),
    [STP_PH_CHUNK] = TO(STP_PH_COMMAND),
    [STP_PH_CHUNK_DISCARD] = TO(STP_PH_COMMAND),
    [STP_PH_AUTH] = TO(STP_PH_COMMAND),
    [STP_PH_STARTTLS] = TO(STP_PH_COMMAND),
    [STP_PH_QUIT] = 0,
};

bool stp_phase_may(enum stp_phase from, enum stp_phase to)
{
    return from < STP_PH_CLOSED && to < STP_PH_COUNT &&
           (to == STP_PH_CLOSED || (phase_moves[from] & TO(to)));
}

/* The single place where the phase changes, checked against the table: a
 * move it does not allow is a bug (debug builds stop, others report it and
 * stay). CLOSED is final: nothing an action did on the way out may open the
 * engine again. */
static void enter(struct stp_smtp *s, enum stp_phase ph)
{
    if (s->phase == STP_PH_CLOSED || ph == s->phase)
        return;
    if (!stp_phase_may(s->phase, ph)) {
        stp_proto_illegal_move(s->ops, s->ctx, stp_phase_name(s->phase),
                               stp_phase_name(ph));
        return;
    }
    if (s->ops->phase)
        s->ops->phase(s->ctx, stp_phase_name(s->phase), stp_phase_name(ph));
    s->phase = ph;
}

void stp_smtp_init(struct stp_smtp *s, const struct stp_smtp_cfg *cfg,
                   const struct stp_proto_actions *ops, void *ctx)
{
    memset(s, 0, sizeof(*s));
    s->cfg = *cfg;
    s->ops = ops;
    s->ctx = ctx;
    s->tls = cfg->tls_active;
    s->pend[0] = STP_PEND_GREETING;
    s->pend_stat[0] = STP_ST_NONE;
    s->pend_count = 1;
    enter(s, STP_PH_GREETING);
}

void stp_smtp_free(struct stp_smtp *s)
{
    free(s->ehlo);
    s->ehlo = NULL;
}

static void reply_421_close(struct stp_smtp *s, const char *fmt,
                            enum stp_close_reason why);

/* Count consecutive error replies; at the cap the session ends (Postfix's
 * smtpd_hard_error_limit: a client that only errs is probing or broken). */
static void count_reply(struct stp_smtp *s, int code)
{
    if (code < 400) {
        s->errors = 0;
        return;
    }
    if (code >= 500 && s->cfg.max_errors && ++s->errors >= s->cfg.max_errors)
        reply_421_close(s, "421 4.7.0 %s Error: too many errors\r\n",
                        STP_CLOSE_ERRORS);
}

static void reply(struct stp_smtp *s, const char *text)
{
    s->ops->to_client(s->ctx, text, strlen(text));
    count_reply(s, (text[0] - '0') * 100);
}

/* Asked once: an error cap reached inside a step that then closes for its
 * own reason (a 554 for smuggling with max_errors = 1) is one close. */
static void close_session(struct stp_smtp *s, enum stp_close_reason why,
                          bool cut)
{
    if (s->phase == STP_PH_CLOSED)
        return;
    enter(s, STP_PH_CLOSED);
    s->ops->close(s->ctx, why, cut);
}

static void reply_421_close(struct stp_smtp *s, const char *fmt,
                            enum stp_close_reason why)
{
    if (s->phase == STP_PH_CLOSED)
        return;
    if (!s->reply_421) {
        char buf[256];
        snprintf(buf, sizeof(buf), fmt, s->cfg.hostname ? s->cfg.hostname
                                                        : "localhost");
        reply(s, buf);
        s->reply_421 = true;
    }
    close_session(s, why, true);
}

static void reject(struct stp_smtp *s, const char *detail, const char *text)
{
    if (s->ops->event)
        s->ops->event(s->ctx, "reject", detail);
    reply(s, text);
}

/* STAT: which command the reply answers, for the summary. */
static bool pend_push(struct stp_smtp *s, enum stp_pend kind,
                      enum stp_stat stat)
{
    if (s->pend_count == STP_SMTP_MAX_PENDING)
        return false;
    unsigned i = (s->pend_head + s->pend_count) % STP_SMTP_MAX_PENDING;
    s->pend[i] = (uint8_t)kind;
    s->pend_stat[i] = (uint8_t)stat;
    s->pend_count++;
    return true;
}

static enum stp_pend pend_pop(struct stp_smtp *s)
{
    enum stp_pend k = (enum stp_pend)s->pend[s->pend_head];
    s->pend_head = (s->pend_head + 1) % STP_SMTP_MAX_PENDING;
    s->pend_count--;
    return k;
}

static void forward_line(struct stp_smtp *s, const char *p, size_t n,
                         enum stp_pend kind, enum stp_stat stat)
{
    s->ops->to_upstream(s->ctx, STP_FWD_LINE, p, n);
    pend_push(s, kind, stat);
}

static enum stp_stat stat_of(enum stp_cmd c)
{
    switch (c) {
    case STP_CMD_EHLO: case STP_CMD_LHLO: return STP_ST_EHLO;
    case STP_CMD_HELO: return STP_ST_HELO;
    case STP_CMD_STARTTLS: return STP_ST_STARTTLS;
    case STP_CMD_AUTH: return STP_ST_AUTH;
    case STP_CMD_MAIL: return STP_ST_MAIL;
    case STP_CMD_RCPT: return STP_ST_RCPT;
    case STP_CMD_DATA: return STP_ST_DATA;
    case STP_CMD_BDAT: return STP_ST_BDAT;
    case STP_CMD_RSET: return STP_ST_RSET;
    case STP_CMD_NOOP: return STP_ST_NOOP;
    case STP_CMD_QUIT: return STP_ST_QUIT;
    case STP_CMD_UNKNOWN: case STP_CMD_VRFY: case STP_CMD_EXPN:
    case STP_CMD_HELP: case STP_CMD_ETRN: case STP_CMD_XCLIENT:
    case STP_CMD_XFORWARD:
        break;
    }
    return STP_ST_UNKNOWN;
}

/* Forward a command as "VERB" or "VERB SP ARGS": never the client's leading
 * blanks or TAB/VT/FF separators, which upstreams split differently. */
static void forward_cmd(struct stp_smtp *s, const char *line, size_t len,
                        const struct stp_cmdline *cl, enum stp_pend kind)
{
    if (cl->canonical) {
        forward_line(s, line, len, kind, stat_of(cl->cmd));
        return;
    }
    char buf[STP_MAX_LINE_MAX];
    size_t n = cl->verb_len;
    STP_ASSERT(n + 1 + cl->arg_len <= sizeof(buf));
    memcpy(buf, cl->verb, n);
    if (cl->arg_len) {
        buf[n++] = ' ';
        memcpy(buf + n, cl->arg, cl->arg_len);
        n += cl->arg_len;
    }
    forward_line(s, buf, n, kind, stat_of(cl->cmd));
}

/* RFC 3207 section 4: before TLS, a server requiring it answers 530 to all but
 * these. */
static bool allowed_before_tls(enum stp_cmd c)
{
    return c == STP_CMD_EHLO || c == STP_CMD_HELO || c == STP_CMD_STARTTLS ||
           c == STP_CMD_QUIT || c == STP_CMD_NOOP || c == STP_CMD_RSET;
}

/* RFC 3207 4.2: after TLS the client must EHLO again. The upstream never saw
 * the handshake and still holds the plaintext EHLO, so until a new one only
 * these go through. */
static bool allowed_before_helo(enum stp_cmd c)
{
    return c == STP_CMD_EHLO || c == STP_CMD_HELO || c == STP_CMD_QUIT ||
           c == STP_CMD_NOOP || c == STP_CMD_RSET || c == STP_CMD_HELP;
}

/* Does this command get a reply from us rather than from the upstream? Such
 * replies wait until every earlier command has been answered. */
/* Does a MAIL command's argument carry the REQUIRETLS parameter (RFC 8689),
 * a blank-separated keyword after the path, in any case? */
static bool mail_requires_tls(const char *arg, size_t n)
{
    static const char kw[] = "REQUIRETLS";
    const size_t kl = sizeof(kw) - 1;
    for (size_t i = 0; i + kl <= n; i++) {
        if ((i == 0 || stp_smtp_space(arg[i - 1])) &&
            strncasecmp(arg + i, kw, kl) == 0 &&
            (i + kl == n || stp_smtp_space(arg[i + kl]) || arg[i + kl] == '='))
            return true;
    }
    return false;
}

static const char *local_reply(struct stp_smtp *s,
                               const struct stp_cmdline *cl, const char **why)
{
    enum stp_cmd c = cl->cmd;
    if (c == STP_CMD_XCLIENT || c == STP_CMD_XFORWARD) {
        *why = "client_identity_command";
        return "550 5.7.0 Error: insufficient authorization\r\n";
    }
    if (c == STP_CMD_STARTTLS) {
        *why = NULL;
        if (cl->arg_len)
            return "501 5.5.4 Syntax: STARTTLS\r\n";
        if (s->tls)
            return "554 5.5.1 Error: TLS already active\r\n";
        if (!s->cfg.offer_starttls)
            return "502 5.5.1 Error: command not implemented\r\n";
        return "220 2.0.0 Ready to start TLS\r\n";
    }
    if (s->cfg.require_tls && !s->tls && !allowed_before_tls(c)) {
        *why = "tls_required";
        return "530 5.7.0 Must issue a STARTTLS command first\r\n";
    }
    /* The proxy holds the next hop's login: a client neither sees AUTH
     * nor reaches the account's own AUTH (Postfix's wording when SASL is
     * off). */
    if (c == STP_CMD_AUTH && s->cfg.upstream_auth) {
        *why = "auth_by_proxy";
        return "503 5.5.1 Error: authentication not enabled\r\n";
    }
    /* RFC 4954 4, Postfix smtpd_tls_auth_only: where TLS is offered, no
     * password crosses in clear, whatever the upstream would accept. */
    if (c == STP_CMD_AUTH && s->cfg.offer_starttls && !s->tls) {
        *why = "auth_before_tls";
        return "538 5.7.11 Encryption required for requested authentication "
               "mechanism\r\n";
    }
    if (s->need_helo && !allowed_before_helo(c)) {
        *why = "helo_required_after_tls";
        return "503 5.5.1 Error: send HELO/EHLO first\r\n";
    }
    if (c == STP_CMD_MAIL && !(s->cfg.upstream_tls && s->tls) &&
        mail_requires_tls(cl->arg, cl->arg_len)) {
        /* Not offered (ehlo_flush): TLS on every hop cannot be kept. */
        *why = "requiretls_unavailable";
        return "555 5.7.10 Error: REQUIRETLS not available on this path\r\n";
    }
    if (c == STP_CMD_BDAT) {
        uint64_t size;
        bool last;
        if (stp_bdat_parse(cl->arg, cl->arg_len, &size, &last) < 0) {
            *why = "bdat_syntax";
            return "501 5.5.4 Syntax: BDAT size [LAST]\r\n";
        }
        if (!s->chunking) {
            /* An upstream that does not know BDAT would read the chunk as
             * commands: never forward it. */
            *why = "bdat_not_offered";
            return "502 5.5.1 Error: command not implemented\r\n";
        }
    }
    return NULL;
}

/* Handle one complete client command line. Returns false to stall (the line is
 * not consumed). */
static bool client_command(struct stp_smtp *s, const char *line, size_t len)
{
    bool bad = memchr(line, '\r', len) || memchr(line, '\0', len);
    if (s->phase == STP_PH_AUTH) {
        /* A SASL response, not a command; a bad one cancels the exchange. */
        forward_line(s, bad ? "*" : line, bad ? 1 : len, STP_PEND_AUTH,
                     STP_ST_AUTH);
        s->waiting = true;
        enter(s, STP_PH_COMMAND);
        return true;
    }
    if (bad) {
        if (s->pend_count)
            return false;
        s->sent[STP_ST_UNKNOWN]++;
        reject(s, "reason=bad_character",
               "500 5.5.2 Error: bad character in command\r\n");
        return true;
    }
    struct stp_cmdline cl;
    stp_cmd_parse(line, len, &cl);
    /* LMTP's LHLO is its EHLO, for the policy too; elsewhere it is no
     * command of ours (forwarded as it is, as an unknown verb). */
    if (cl.cmd == STP_CMD_LHLO)
        cl.cmd = s->cfg.lmtp ? STP_CMD_EHLO : STP_CMD_UNKNOWN;
    enum stp_cmd c = cl.cmd;
    const char *why = NULL;
    const char *text = local_reply(s, &cl, &why);
    if (text) {
        if (s->pend_count)
            return false;
        s->sent[stat_of(c)]++;
        if (text[0] == '2')
            s->accepted[stat_of(c)]++; /* STARTTLS's 220 */
        if (why) {
            char detail[96];
            snprintf(detail, sizeof(detail), "cmd=%s reason=%s",
                     stp_cmd_name(c), why);
            reject(s, detail, text);
        } else {
            reply(s, text);
        }
        if (s->phase == STP_PH_CLOSED)
            return true; /* too many errors */
        if (c == STP_CMD_STARTTLS && text[0] == '2') {
            enter(s, STP_PH_STARTTLS);
            s->ops->start_tls(s->ctx);
        } else if (c == STP_CMD_BDAT) {
            uint64_t size;
            bool last;
            if (stp_bdat_parse(cl.arg, cl.arg_len, &size, &last) == 0 &&
                size > 0) {
                s->chunk_left = size;
                enter(s, STP_PH_CHUNK_DISCARD);
            }
        }
        return true;
    }
    if (s->pend_count == STP_SMTP_MAX_PENDING)
        return false;
    s->sent[stat_of(c)]++;
    switch (c) {
    case STP_CMD_EHLO:
        forward_cmd(s, line, len, &cl, STP_PEND_EHLO);
        break;
    case STP_CMD_DATA:
        forward_cmd(s, line, len, &cl, STP_PEND_DATA);
        s->waiting = true;
        break;
    case STP_CMD_AUTH:
        forward_cmd(s, line, len, &cl, STP_PEND_AUTH);
        s->waiting = true;
        break;
    case STP_CMD_QUIT:
        forward_cmd(s, line, len, &cl, STP_PEND_QUIT);
        enter(s, STP_PH_QUIT);
        break;
    case STP_CMD_BDAT: {
        /* Rebuilt from what was counted: the upstream reads the same size. */
        bool last;
        char buf[40];
        stp_bdat_parse(cl.arg, cl.arg_len, &s->chunk_left, &last);
        int n = snprintf(buf, sizeof(buf), "BDAT %" PRIu64 "%s",
                         s->chunk_left, last ? " LAST" : "");
        /* BDAT LAST ends the transaction whatever its reply, as the end of
         * DATA does. */
        forward_line(s, buf, (size_t)n,
                     last ? STP_PEND_DATA_END : STP_PEND_BDAT, STP_ST_BDAT);
        if (s->chunk_left > 0)
            enter(s, STP_PH_CHUNK);
        break;
    }
    case STP_CMD_MAIL:
        forward_cmd(s, line, len, &cl, STP_PEND_MAIL);
        break;
    case STP_CMD_HELO:
        forward_cmd(s, line, len, &cl, STP_PEND_HELO);
        break;
    case STP_CMD_RSET:
        forward_cmd(s, line, len, &cl, STP_PEND_RESET);
        break;
    case STP_CMD_RCPT:
        forward_cmd(s, line, len, &cl, STP_PEND_RCPT);
        break;
    case STP_CMD_UNKNOWN: case STP_CMD_NOOP:
    case STP_CMD_VRFY: case STP_CMD_EXPN: case STP_CMD_HELP:
    case STP_CMD_ETRN:
        forward_cmd(s, line, len, &cl, STP_PEND_CMD);
        break;
    case STP_CMD_STARTTLS: case STP_CMD_XCLIENT: case STP_CMD_XFORWARD:
    case STP_CMD_LHLO:
        STP_ASSERT(!"answered locally or mapped above");
    }
    return true;
}

size_t stp_smtp_client_input(struct stp_smtp *s, const char *p, size_t n)
{
    size_t off = 0;
    while (off < n && !s->waiting) {
        if (s->ops->upstream_full && s->ops->upstream_full(s->ctx))
            return off; /* every step below forwards at most one piece */
        const char *q = p + off;
        size_t left = n - off;
        switch (s->phase) {
        case STP_PH_GREETING:
        case STP_PH_STARTTLS:
        case STP_PH_CLOSED:
            return off;
        case STP_PH_QUIT:
            return n;
        case STP_PH_CONTENT: {
            size_t used;
            enum stp_dot_result r = stp_dot_scan(&s->dot, q, left, &used);
            if (r == STP_DOT_SMUGGLE) {
                if (s->ops->event)
                    s->ops->event(s->ctx, "reject", "reason=smuggling");
                reply(s, "554 5.5.2 Error: bare <CR> or <LF> near end of "
                         "data\r\n");
                close_session(s, STP_CLOSE_SMUGGLE, true);
                return n;
            }
            if (used)
                s->ops->to_upstream(s->ctx, STP_FWD_RAW, q, used);
            off += used;
            if (r == STP_DOT_END) {
                pend_push(s, STP_PEND_DATA_END, STP_ST_DATA);
                enter(s, STP_PH_COMMAND);
            } else if (used < left) {
                return off; /* a held-back CR waits for its next byte */
            }
            break;
        }
        case STP_PH_CHUNK:
        case STP_PH_CHUNK_DISCARD: {
            size_t k = (size_t)STP_MIN((uint64_t)left, s->chunk_left);
            if (s->phase == STP_PH_CHUNK)
                s->ops->to_upstream(s->ctx, STP_FWD_RAW, q, k);
            s->chunk_left -= k;
            off += k;
            if (s->chunk_left == 0)
                enter(s, STP_PH_COMMAND);
            break;
        }
        case STP_PH_COMMAND:
        case STP_PH_AUTH: {
            size_t len, used;
            if (s->skipping) {
                const char *lf = memchr(q, '\n', left);
                off += lf ? (size_t)(lf - q) + 1 : left;
                s->skipping = lf == NULL;
                s->partial = s->skipping;
                break;
            }
            enum stp_line_status st =
                stp_line_find(q, left, s->cfg.max_line, &len, &used);
            s->partial = st == STP_LINE_MORE;
            if (st == STP_LINE_MORE)
                return off;
            if (st == STP_LINE_TOO_LONG) {
                if (s->pend_count)
                    return off;
                s->skipping = true;
                if (s->phase == STP_PH_AUTH) {
                    /* The upstream waits for a SASL response: cancel, and
                     * its 501 answers the client. */
                    client_command(s, "*", 1);
                    break;
                }
                s->sent[STP_ST_UNKNOWN]++;
                reject(s, "reason=line_too_long",
                       "500 5.5.2 Error: line too long\r\n");
                break;
            }
            if (!client_command(s, q, len))
                return off;
            off += used;
            if (s->phase == STP_PH_STARTTLS)
                return off;
            break;
        }
        case STP_PH_COUNT:
            STP_ASSERT(!"bad phase");
        }
    }
    return off;
}

/* The reply to the end of a message (of DATA or BDAT LAST) is in. */
static void count_message(struct stp_smtp *s, bool ok)
{
    if (ok)
        s->messages++;
    else
        s->rejected++;
    s->delivered = false;
}

/* An upstream reply is complete: act on what it answered. */
static void reply_done(struct stp_smtp *s, enum stp_pend kind,
                       enum stp_stat stat, int code)
{
    /* LMTP's replies after the message are delivery results, one per
     * recipient, not the client's errors. */
    bool delivery = kind == STP_PEND_DATA_END && s->cfg.lmtp;
    bool ok = code >= 200 && code < 300;
    /* DATA's 354 and AUTH's 334 are not yet an acceptance: the reply
     * after the content, or after the last SASL step, is. */
    if (stat < STP_ST_COUNT && (ok || (delivery && s->delivered)))
        s->accepted[stat]++;
    if (kind == STP_PEND_DATA_END)
        count_message(s, ok || (delivery && s->delivered));
    if (kind != STP_PEND_GREETING && kind != STP_PEND_RSET_INTERNAL &&
        kind != STP_PEND_QUIT && !delivery) {
        count_reply(s, code);
        if (s->phase == STP_PH_CLOSED)
            return;
    }
    switch (kind) {
    case STP_PEND_GREETING:
        enter(s, STP_PH_COMMAND);
        break;
    case STP_PEND_DATA:
        s->waiting = false;
        if (code == 354) {
            s->dot = STP_DOT_LINE_START;
            enter(s, STP_PH_CONTENT);
        }
        break;
    case STP_PEND_AUTH:
        s->waiting = false;
        if (code == 334)
            enter(s, STP_PH_AUTH);
        break;
    case STP_PEND_QUIT:
        close_session(s, STP_CLOSE_QUIT, false);
        break;
    case STP_PEND_MAIL:
        /* A refused MAIL leaves an open transaction open (503 to a second
         * MAIL): its recipients and the RSET owed at TLS stay. */
        if (ok) {
            s->in_tx = true;
            s->rcpts = 0;
        }
        break;
    case STP_PEND_RCPT:
        if (code >= 200 && code < 300)
            s->rcpts++;
        break;
    case STP_PEND_EHLO: case STP_PEND_HELO: case STP_PEND_RESET:
        /* Refused, they change nothing (RFC 5321 4.1.4). */
        if (!ok)
            break;
        if (kind != STP_PEND_RESET)
            s->need_helo = false;
        s->in_tx = false;
        s->rcpts = 0;
        break;
    case STP_PEND_DATA_END: /* the transaction is over, whatever the reply */
        s->in_tx = false;
        s->rcpts = 0;
        break;
    case STP_PEND_CMD: case STP_PEND_BDAT: case STP_PEND_RSET_INTERNAL:
        break;
    }
}

static bool ehlo_hold(struct stp_smtp *s, const char *p, size_t n)
{
    if (!s->ehlo && !(s->ehlo = malloc(STP_MAX_EHLO_REPLY)))
        return false;
    if (s->ehlo_len + n + 2 > STP_MAX_EHLO_REPLY)
        return false;
    memcpy(s->ehlo + s->ehlo_len, p, n);
    memcpy(s->ehlo + s->ehlo_len + n, "\r\n", 2);
    s->ehlo_len += n + 2;
    return true;
}

static bool ehlo_flush(struct stp_smtp *s)
{
    char out[STP_MAX_EHLO_REPLY + 16];
    unsigned flags = 0;
    if (s->cfg.offer_starttls && !s->tls)
        flags |= STP_EHLO_OFFER_STARTTLS | STP_EHLO_STRIP_AUTH;
    if (s->cfg.upstream_auth)
        flags |= STP_EHLO_STRIP_AUTH;
    /* REQUIRETLS promises TLS on every hop: offered only when both legs
     * are encrypted (a plaintext client leg is already a hop without). */
    if (!s->cfg.upstream_tls || !s->tls)
        flags |= STP_EHLO_STRIP_REQUIRETLS;
    /* LMTP's BDAT LAST would owe a reply per recipient, or one: the proxy
     * could not tell how many to wait for. Clients use DATA. */
    if (s->cfg.lmtp)
        flags |= STP_EHLO_STRIP_CHUNKING;
    int r = stp_ehlo_filter(s->ehlo, s->ehlo_len, out, sizeof(out), flags,
                            &s->chunking);
    free(s->ehlo);
    s->ehlo = NULL;
    s->ehlo_len = 0;
    if (r < 0)
        return false;
    s->ops->to_client(s->ctx, out, (size_t)r);
    return true;
}

/* Relay one reply line, always ending in CRLF, as one whole line. */
static void relay_line(struct stp_smtp *s, const char *line, size_t len)
{
    char buf[STP_MAX_REPLY_LINE + 2];
    STP_ASSERT(len <= STP_MAX_REPLY_LINE);
    memcpy(buf, line, len);
    memcpy(buf + len, "\r\n", 2);
    s->ops->to_client(s->ctx, buf, len + 2);
}

/* LMTP: after the end of data, does another reply follow this one? The
 * count is taken at the first reply, when every RCPT's reply is in. */
static bool lmtp_more(struct stp_smtp *s)
{
    if (!s->cfg.lmtp)
        return false;
    if (s->lmtp_due == 0)
        s->lmtp_due = s->rcpts ? s->rcpts : 1;
    return --s->lmtp_due > 0;
}

static long upstream_error(struct stp_smtp *s, const char *detail)
{
    if (s->ops->event)
        s->ops->event(s->ctx, "upstream_error", detail);
    reply_421_close(s, "421 4.4.2 %s Error: upstream protocol error\r\n",
                    STP_CLOSE_UPSTREAM_PROTO);
    return -EPROTO;
}

long stp_smtp_upstream_input(struct stp_smtp *s, const char *p, size_t n)
{
    size_t off = 0;
    while (off < n && s->phase != STP_PH_CLOSED) {
        size_t len, used;
        enum stp_line_status st =
            stp_line_find(p + off, n - off, STP_MAX_REPLY_LINE, &len, &used);
        if (st == STP_LINE_MORE)
            break;
        if (st == STP_LINE_TOO_LONG)
            return upstream_error(s, "reason=reply_line_too_long");
        const char *line = p + off;
        int code;
        bool last;
        /* A CR or NUL inside a reply could split it for a lenient client. */
        if (stp_reply_line(line, len, &code, &last) < 0 ||
            memchr(line, '\r', len) || memchr(line, '\0', len))
            return upstream_error(s, "reason=bad_reply_line");
        if (s->in_reply && code != s->reply_code)
            return upstream_error(s, "reason=reply_code_changed");
        /* Each line is bounded; so is a reply, or "250-" forever would be
         * relayed forever. */
        s->reply_bytes = (s->in_reply ? s->reply_bytes : 0) + len + 2;
        if (s->reply_bytes > STP_MAX_REPLY)
            return upstream_error(s, "reason=reply_too_long");
        off += used;
        if (s->pend_count == 0) {
            if (code == 421) {
                relay_line(s, line, len);
                s->reply_421 = last;
                if (last)
                    close_session(s, STP_CLOSE_UPSTREAM_421, false);
                s->in_reply = !last;
                s->reply_code = code;
                continue;
            }
            return upstream_error(s, "reason=unexpected_reply");
        }
        enum stp_pend kind = (enum stp_pend)s->pend[s->pend_head];
        s->in_reply = !last;
        s->reply_code = code;
        if (kind == STP_PEND_EHLO && code == 250) {
            if (!ehlo_hold(s, line, len))
                return upstream_error(s, "reason=ehlo_reply_too_long");
            if (last && !ehlo_flush(s))
                return upstream_error(s, "reason=bad_ehlo_reply");
        } else if (kind != STP_PEND_RSET_INTERNAL || code == 421) {
            relay_line(s, line, len);
        }
        if (!last)
            continue;
        if (kind == STP_PEND_DATA_END && lmtp_more(s)) {
            /* One reply per recipient the upstream accepted; the session
             * goes on after the last. One delivery makes it a message. */
            if (code >= 200 && code < 300)
                s->delivered = true;
            if (code == 421) {
                count_message(s, s->delivered);
                s->reply_421 = true;
                close_session(s, STP_CLOSE_UPSTREAM_421, false);
                break;
            }
            continue;
        }
        enum stp_stat stat = (enum stp_stat)s->pend_stat[s->pend_head];
        pend_pop(s);
        if (code == 421) {
            if (kind == STP_PEND_DATA_END)
                count_message(s, s->delivered);
            s->reply_421 = true;
            close_session(s, STP_CLOSE_UPSTREAM_421, false);
            break;
        }
        reply_done(s, kind, stat, code);
    }
    return (long)off;
}

void stp_smtp_tls_started(struct stp_smtp *s)
{
    STP_ASSERT(s->phase == STP_PH_STARTTLS || s->phase == STP_PH_CLOSED);
    if (s->phase == STP_PH_CLOSED)
        return;
    bool open_tx = s->in_tx;
    s->tls = true;
    s->in_tx = false;
    s->need_helo = true;
    s->chunking = false;
    enter(s, STP_PH_COMMAND);
    /* A transaction the upstream accepted in plaintext must not carry over
     * into the TLS session (RFC 3207 4.2). Without one there is nothing to
     * clear: envelope state only starts with an accepted MAIL, and the
     * client's EHLO after TLS resets the rest. Skipping RSET then saves a
     * round trip on every session. */
    if (open_tx)
        forward_line(s, "RSET", 4, STP_PEND_RSET_INTERNAL, STP_ST_NONE);
}

void stp_smtp_fail(struct stp_smtp *s, enum stp_fail why)
{
    static const struct {
        const char *text;
        enum stp_close_reason reason;
    } replies[] = {
        [STP_FAIL_UNREACHABLE] = {"421 4.3.2 Service not available, closing "
                                  "transmission channel\r\n",
                                  STP_CLOSE_UPSTREAM_LOST},
        [STP_FAIL_LOST] = {"421 4.4.2 Upstream connection lost\r\n",
                           STP_CLOSE_UPSTREAM_LOST},
        [STP_FAIL_HOP_TLS] = {"421 4.7.0 TLS to next hop unavailable\r\n",
                              STP_CLOSE_NEXT_HOP},
        [STP_FAIL_HOP_IDENTITY] = {"421 4.7.0 Client identity not accepted "
                                   "by next hop\r\n",
                                   STP_CLOSE_NEXT_HOP},
        [STP_FAIL_HOP_PROTOCOL] = {"421 4.4.2 %s Error: upstream protocol "
                                   "error\r\n",
                                   STP_CLOSE_NEXT_HOP},
        [STP_FAIL_LIMIT] = {"421 4.7.0 %s Error: too many connections\r\n",
                            STP_CLOSE_LIMIT},
        [STP_FAIL_TIMEOUT] = {"421 4.4.2 %s Error: timeout exceeded\r\n",
                              STP_CLOSE_TIMEOUT},
        [STP_FAIL_SHUTDOWN] = {"421 4.3.2 Service shutting down, closing "
                               "transmission channel\r\n",
                               STP_CLOSE_SHUTDOWN},
        [STP_FAIL_HOP_LOOP] = {"421 4.4.6 %s Error: mail loop: the next hop "
                               "is this proxy\r\n",
                               STP_CLOSE_LOOP},
        [STP_FAIL_HOP_AUTH] = {"421 4.7.0 %s Error: next hop refused the "
                               "proxy's authentication\r\n",
                               STP_CLOSE_NEXT_HOP},
        [STP_FAIL_DENIED] = {"554 5.7.1 %s Error: access denied\r\n",
                             STP_CLOSE_NOT_ALLOWED},
    };
    STP_ASSERT((size_t)why < STP_ARRAY_LEN(replies));
    reply_421_close(s, replies[why].text, replies[why].reason);
}

void stp_smtp_summary(const struct stp_smtp *s, char *buf, size_t cap)
{
    static const char *const names[STP_ST_COUNT] = {
        "ehlo", "helo", "starttls", "auth", "mail", "rcpt",
        "data", "bdat", "rset", "noop", "quit", "unknown",
    };
    size_t o = 0;
    buf[0] = '\0';
    for (int i = 0; i < STP_ST_COUNT && o < cap; i++) {
        if (!s->sent[i])
            continue;
        int n = s->accepted[i] == s->sent[i]
                    ? snprintf(buf + o, cap - o, "%s=%" PRIu32 " ", names[i],
                               s->sent[i])
                    : snprintf(buf + o, cap - o, "%s=%" PRIu32 "/%" PRIu32 " ",
                               names[i], s->accepted[i], s->sent[i]);
        if (n < 0 || (size_t)n >= cap - o) {
            buf[o] = '\0'; /* no half a count */
            return;
        }
        o += (size_t)n;
    }
    if (o < cap)
        snprintf(buf + o, cap - o, "messages=%" PRIu32 " rejected=%" PRIu32,
                 s->messages, s->rejected);
}
