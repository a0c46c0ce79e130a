/* The POP3 engine of one proxied session (pop3.h). No I/O here: bytes in,
 * actions out. The line framer is the SMTP engine's (stp_line_find). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "pop3.h"
#include "smtp.h" /* stp_line_find */

static const char *const phase_names[STP_P3_COUNT] = {
    [STP_P3_GREETING] = "greeting", [STP_P3_COMMAND] = "command",
    [STP_P3_SASL] = "sasl",         [STP_P3_STLS] = "stls",
    [STP_P3_QUIT] = "quit",         [STP_P3_CLOSED] = "closed",
};

const char *stp_pop3_phase_name(enum stp_pop3_phase ph)
{
    return ph < STP_P3_COUNT ? phase_names[ph] : "?";
}

#define TO(ph) (1u << (ph))
/* Every phase may close; CLOSED is final. */
static const unsigned phase_moves[STP_P3_COUNT] = {
    [STP_P3_GREETING] = TO(STP_P3_COMMAND),
    [STP_P3_COMMAND] = TO(STP_P3_SASL) | TO(STP_P3_STLS) | TO(STP_P3_QUIT),
    [STP_P3_SASL] = TO(STP_P3_COMMAND),
    [STP_P3_STLS] = TO(STP_P3_COMMAND),
    [STP_P3_QUIT] = 0,
};

bool stp_pop3_phase_may(enum stp_pop3_phase from, enum stp_pop3_phase to)
{
    return from < STP_P3_CLOSED && to < STP_P3_COUNT &&
           (to == STP_P3_CLOSED || (phase_moves[from] & TO(to)));
}

/* The single place where the phase changes (smtp.c's enter()). */
static void enter(struct stp_pop3 *s, enum stp_pop3_phase ph)
{
    if (s->phase == STP_P3_CLOSED || ph == s->phase)
        return;
    if (!stp_pop3_phase_may(s->phase, ph)) {
        stp_proto_illegal_move(s->ops, s->ctx, stp_pop3_phase_name(s->phase),
                               stp_pop3_phase_name(ph));
        return;
    }
    if (s->ops->phase)
        s->ops->phase(s->ctx, stp_pop3_phase_name(s->phase),
                      stp_pop3_phase_name(ph));
    s->phase = ph;
}

void stp_pop3_init(struct stp_pop3 *s, const struct stp_proto_cfg *cfg,
                   const struct stp_proto_actions *ops, void *ctx)
{
    memset(s, 0, sizeof(*s));
    s->cfg = *cfg;
    if (s->cfg.max_line == 0)
        s->cfg.max_line = STP_MAX_LINE_MIN;
    if (s->cfg.max_line > STP_MAX_LINE_MAX)
        s->cfg.max_line = STP_MAX_LINE_MAX;
    s->ops = ops;
    s->ctx = ctx;
    s->tls = cfg->tls_active;
    /* RFC 2595 with TLS required: nothing reaches the upstream before TLS,
     * so nothing it says (or is told) in clear can matter later. */
    s->local = cfg->require_tls && cfg->offer_starttls && !s->tls;
    s->pend[0] = STP_P3P_GREETING;
    s->pend_count = 1;
    s->phase = STP_P3_GREETING;
}

static const char *host(const struct stp_pop3 *s)
{
    return s->cfg.hostname ? s->cfg.hostname : "localhost";
}

static void close_session(struct stp_pop3 *s, enum stp_close_reason why,
                          bool cut)
{
    if (s->phase == STP_P3_CLOSED)
        return;
    enter(s, STP_P3_CLOSED);
    s->ops->close(s->ctx, why, cut);
}

static void say(struct stp_pop3 *s, const char *text)
{
    s->ops->to_client(s->ctx, text, strlen(text));
}

/* Consecutive -ERR, the proxy's and the upstream's: at max_errors the
 * session ends (a client that only errs is probing or broken). */
static void count_reply(struct stp_pop3 *s, bool ok)
{
    if (ok) {
        s->errors = 0;
        return;
    }
    if (s->cfg.max_errors && ++s->errors >= s->cfg.max_errors) {
        char buf[160];
        snprintf(buf, sizeof(buf), "-ERR [SYS/PERM] %s too many errors\r\n",
                 host(s));
        say(s, buf);
        s->replied_fail = true;
        close_session(s, STP_CLOSE_ERRORS, true);
    }
}

static void local_reply(struct stp_pop3 *s, const char *text)
{
    say(s, text);
    count_reply(s, text[0] == '+');
}

static void reject(struct stp_pop3 *s, const char *detail, const char *text)
{
    if (s->ops->event)
        s->ops->event(s->ctx, "reject", detail);
    local_reply(s, text);
}

static unsigned owed(const struct stp_pop3 *s)
{
    return s->pend_count + (s->in_body ? 1u : 0u);
}

static void pend_push(struct stp_pop3 *s, enum stp_p3_pend kind,
                      enum stp_p3_stat stat)
{
    STP_ASSERT(s->pend_count < STP_POP3_MAX_PENDING);
    unsigned i = (s->pend_head + s->pend_count) % STP_POP3_MAX_PENDING;
    s->pend[i] = (uint8_t)kind;
    s->pend_stat[i] = (uint8_t)stat;
    s->pend_count++;
}

static void pend_pop(struct stp_pop3 *s)
{
    s->pend_head = (s->pend_head + 1) % STP_POP3_MAX_PENDING;
    s->pend_count--;
}

/* ---- commands ---------------------------------------------------------------- */

/* One row per verb: what the summary counts, how its response is framed
 * (with and without an argument), whether it is a login. */
enum {
    F_LOGIN = 1 << 0,    /* never in clear where TLS is offered */
    F_IDENTITY = 1 << 1, /* says who the client is: only the proxy may */
};

static const struct p3_cmd {
    const char *verb;
    enum stp_p3_stat stat;
    enum stp_p3_pend bare, with_arg;
    unsigned flags;
} cmds[] = {
    {"CAPA", STP_P3S_CAPA, STP_P3P_CAPA, STP_P3P_CAPA, 0},
    {"STLS", STP_P3S_STLS, STP_P3P_SINGLE, STP_P3P_SINGLE, 0}, /* local */
    {"USER", STP_P3S_USER, STP_P3P_SINGLE, STP_P3P_SINGLE, F_LOGIN},
    {"PASS", STP_P3S_PASS, STP_P3P_LOGIN, STP_P3P_LOGIN, F_LOGIN},
    {"APOP", STP_P3S_APOP, STP_P3P_LOGIN, STP_P3P_LOGIN, F_LOGIN},
    {"AUTH", STP_P3S_AUTH, STP_P3P_AUTH_LIST, STP_P3P_AUTH, F_LOGIN},
    {"STAT", STP_P3S_STAT, STP_P3P_SINGLE, STP_P3P_SINGLE, 0},
    {"LIST", STP_P3S_LIST, STP_P3P_MULTI, STP_P3P_SINGLE, 0},
    {"UIDL", STP_P3S_UIDL, STP_P3P_MULTI, STP_P3P_SINGLE, 0},
    {"RETR", STP_P3S_RETR, STP_P3P_MULTI, STP_P3P_MULTI, 0},
    {"TOP", STP_P3S_TOP, STP_P3P_MULTI, STP_P3P_MULTI, 0},
    {"DELE", STP_P3S_DELE, STP_P3P_SINGLE, STP_P3P_SINGLE, 0},
    {"RSET", STP_P3S_RSET, STP_P3P_SINGLE, STP_P3P_SINGLE, 0},
    {"NOOP", STP_P3S_NOOP, STP_P3P_SINGLE, STP_P3P_SINGLE, 0},
    {"QUIT", STP_P3S_QUIT, STP_P3P_QUIT, STP_P3P_QUIT, 0},
    /* RFC 6856: LANG alone lists the languages. */
    {"LANG", STP_P3S_OTHER, STP_P3P_MULTI, STP_P3P_SINGLE, 0},
    /* Dovecot's XCLIENT (login_trusted_networks), which would let any
     * client behind the proxy pose as any address. */
    {"XCLIENT", STP_P3S_OTHER, STP_P3P_SINGLE, STP_P3P_SINGLE, F_IDENTITY},
};
static const struct p3_cmd unknown_cmd = {"", STP_P3S_OTHER, STP_P3P_SINGLE,
                                          STP_P3P_SINGLE, 0};

static bool blank(char c) { return c == ' ' || c == '\t'; }

/* A line split as servers split it: leading blanks skipped, the verb up to
 * a blank, the argument after exactly one blank (a password may hold
 * spaces, even leading ones). */
struct p3_line {
    const struct p3_cmd *cmd;
    const char *verb, *arg;
    size_t verb_len, arg_len;
    bool has_arg;
};

static void parse_line(const char *line, size_t len, struct p3_line *out)
{
    size_t i = 0;
    while (i < len && blank(line[i]))
        i++;
    out->verb = line + i;
    size_t v = i;
    while (i < len && !blank(line[i]))
        i++;
    out->verb_len = i - v;
    out->arg = i < len ? line + i + 1 : line + len;
    out->arg_len = i < len ? len - i - 1 : 0;
    /* "LIST " is LIST to Dovecot (an empty argument is none), and so a
     * listing follows: the same here, and forwarded as "LIST". */
    out->has_arg = out->arg_len > 0;
    out->cmd = &unknown_cmd;
    for (size_t k = 0; k < STP_ARRAY_LEN(cmds); k++) {
        if (strlen(cmds[k].verb) == out->verb_len &&
            strncasecmp(cmds[k].verb, out->verb, out->verb_len) == 0) {
            out->cmd = &cmds[k];
            break;
        }
    }
}

/* Forward "VERB" or "VERB SP ARG": never the client's leading blanks or a
 * TAB where the upstream may split differently from us. */
static void forward(struct stp_pop3 *s, const struct p3_line *pl)
{
    char buf[STP_MAX_LINE_MAX + 2];
    size_t n = pl->verb_len;
    STP_ASSERT(n + 1 + pl->arg_len <= sizeof(buf));
    memcpy(buf, pl->verb, n);
    if (pl->has_arg) {
        buf[n++] = ' ';
        memcpy(buf + n, pl->arg, pl->arg_len);
        n += pl->arg_len;
    }
    enum stp_p3_pend kind = pl->has_arg ? pl->cmd->with_arg : pl->cmd->bare;
    s->ops->to_upstream(s->ctx, STP_FWD_LINE, buf, n);
    s->quiet = false;
    pend_push(s, kind, pl->cmd->stat);
    s->sent[pl->cmd->stat]++;
    if (kind == STP_P3P_AUTH)
        s->waiting = true; /* the next line may be a SASL response */
    if (kind == STP_P3P_QUIT)
        enter(s, STP_P3_QUIT);
}

/* The proxy's CAPA before TLS: what it does itself, nothing of the
 * upstream's, no USER nor SASL (RFC 2595 4: no plaintext login offered). */
#define LOCAL_CAPA "+OK Capability list follows\r\nSTLS\r\n.\r\n"
#define ERR_LOGIN_CLEAR                                                        \
    "-ERR [AUTH] Plaintext authentication disallowed: issue STLS first\r\n"

/* STLS, whoever else speaks (RFC 2595 4). */
static void stls(struct stp_pop3 *s, const struct p3_line *pl)
{
    s->sent[STP_P3S_STLS]++;
    if (pl->has_arg) {
        reject(s, "cmd=STLS reason=syntax", "-ERR Syntax: STLS\r\n");
    } else if (s->tls) {
        reject(s, "cmd=STLS reason=tls_active", "-ERR TLS already active\r\n");
    } else if (!s->cfg.offer_starttls) {
        reject(s, "cmd=STLS reason=not_offered",
               "-ERR Command not implemented\r\n");
    } else if (s->authed) {
        reject(s, "cmd=STLS reason=not_in_authorization_state",
               "-ERR STLS only in AUTHORIZATION state\r\n");
    } else {
        s->accepted[STP_P3S_STLS]++;
        local_reply(s, "+OK Begin TLS negotiation\r\n");
        enter(s, STP_P3_STLS);
        s->ops->start_tls(s->ctx);
    }
}

/* Before TLS with TLS required: the proxy answers everything itself. */
static void answer_locally(struct stp_pop3 *s, const struct p3_line *pl)
{
    const struct p3_cmd *c = pl->cmd;
    char buf[160];
    s->sent[c->stat]++;
    if (c->stat == STP_P3S_CAPA) {
        s->accepted[STP_P3S_CAPA]++;
        local_reply(s, LOCAL_CAPA);
    } else if (c->stat == STP_P3S_QUIT) {
        s->accepted[STP_P3S_QUIT]++;
        snprintf(buf, sizeof(buf), "+OK %s POP3 server signing off\r\n",
                 host(s));
        say(s, buf);
        close_session(s, STP_CLOSE_QUIT, true);
    } else if (c->flags & F_LOGIN) {
        snprintf(buf, sizeof(buf), "cmd=%s reason=tls_required", c->verb);
        reject(s, buf, ERR_LOGIN_CLEAR);
    } else {
        reject(s, "reason=tls_required", "-ERR Must issue STLS first\r\n");
    }
}

/* One complete client line. Returns false to stall (not consumed). */
static bool client_line(struct stp_pop3 *s, const char *line, size_t len)
{
    bool bad = memchr(line, '\r', len) || memchr(line, '\0', len);
    if (s->phase == STP_P3_SASL) {
        /* A SASL response, not a command; a bad one cancels (RFC 5034). */
        s->ops->to_upstream(s->ctx, STP_FWD_LINE, bad ? "*" : line,
                            bad ? 1 : len);
        pend_push(s, STP_P3P_AUTH, STP_P3S_AUTH);
        s->waiting = true;
        enter(s, STP_P3_COMMAND);
        return true;
    }
    struct p3_line pl;
    parse_line(line, len, &pl);
    /* With require_tls = no a login in clear is the operator's choice. */
    bool here = bad || s->local || pl.cmd->stat == STP_P3S_STLS ||
                (pl.cmd->flags & F_IDENTITY);
    if (here) {
        /* The proxy's reply comes after every reply owed before it. */
        if (owed(s))
            return false;
        if (bad) {
            s->sent[STP_P3S_OTHER]++;
            reject(s, "reason=bad_character",
                   "-ERR Bad character in command\r\n");
        } else if (pl.cmd->stat == STP_P3S_STLS) {
            stls(s, &pl);
        } else if (pl.cmd->flags & F_IDENTITY) {
            s->sent[STP_P3S_OTHER]++;
            reject(s, "cmd=XCLIENT reason=client_identity_command",
                   "-ERR [SYS/PERM] Insufficient authorization\r\n");
        } else {
            answer_locally(s, &pl);
        }
        return true;
    }
    if (s->pend_count == STP_POP3_MAX_PENDING)
        return false;
    forward(s, &pl);
    return true;
}

size_t stp_pop3_client_input(struct stp_pop3 *s, const char *p, size_t n)
{
    size_t off = 0;
    while (off < n && !s->waiting) {
        switch (s->phase) {
        case STP_P3_GREETING:
        case STP_P3_STLS: /* the rest is dropped with the plaintext */
        case STP_P3_CLOSED:
            return off;
        case STP_P3_QUIT:
            return n;
        case STP_P3_COMMAND:
        case STP_P3_SASL:
            break;
        case STP_P3_COUNT:
            STP_ASSERT(!"bad phase");
        }
        if (s->ops->upstream_full && s->ops->upstream_full(s->ctx))
            return off; /* every step forwards at most one line */
        const char *q = p + off;
        size_t left = n - off;
        if (s->skipping) {
            const char *lf = memchr(q, '\n', left);
            off += lf ? (size_t)(lf - q) + 1 : left;
            s->skipping = s->partial = lf == NULL;
            continue;
        }
        size_t len, used;
        enum stp_line_status st =
            stp_line_find(q, left, s->cfg.max_line, &len, &used);
        s->partial = st == STP_LINE_MORE;
        if (st == STP_LINE_MORE)
            return off;
        if (st == STP_LINE_TOO_LONG) {
            if (owed(s))
                return off;
            s->skipping = true;
            if (s->phase == STP_P3_SASL) {
                client_line(s, "*", 1); /* cancel the exchange */
                continue;
            }
            s->sent[STP_P3S_OTHER]++;
            reject(s, "reason=line_too_long", "-ERR Line too long\r\n");
            continue;
        }
        if (!client_line(s, q, len))
            return off;
        off += used;
    }
    return off;
}

/* ---- upstream responses ------------------------------------------------------- */

static long upstream_error(struct stp_pop3 *s, const char *detail)
{
    if (s->ops->event)
        s->ops->event(s->ctx, "upstream_error", detail);
    if (!s->in_body && !s->replied_fail) {
        char buf[160];
        snprintf(buf, sizeof(buf),
                 "-ERR [SYS/TEMP] %s upstream protocol error\r\n", host(s));
        say(s, buf);
    }
    s->replied_fail = true;
    close_session(s, STP_CLOSE_UPSTREAM_PROTO, true);
    return -EPROTO;
}

static bool prefix(const char *line, size_t n, const char *pre)
{
    size_t k = strlen(pre);
    return n >= k && strncasecmp(line, pre, k) == 0;
}

/* Does the capability line name keyword KW (RFC 2449: a keyword, then
 * blank-separated parameters)? */
static bool capa_is(const char *line, size_t n, const char *kw)
{
    size_t k = strlen(kw);
    while (n && blank(*line)) {
        line++;
        n--;
    }
    return n >= k && strncasecmp(line, kw, k) == 0 &&
           (n == k || blank(line[k]));
}

static bool plus_mech(const char *m, size_t n)
{
    return n >= 5 && strncasecmp(m + n - 5, "-PLUS", 5) == 0;
}

bool stp_pop3_capa_line(const char *line, size_t n, char *out, size_t cap,
                        size_t *outlen)
{
    *outlen = 0;
    if (capa_is(line, n, "STLS"))
        return false;
    if (!capa_is(line, n, "SASL")) {
        if (n > cap)
            return false;
        memcpy(out, line, n);
        *outlen = n;
        return true;
    }
    /* "SASL" then the mechanisms that survive. */
    size_t o = 0, i = 0, kept = 0;
    while (i < n && blank(line[i]))
        i++;
    i += 4;
    if (cap < 4)
        return false;
    memcpy(out, "SASL", 4);
    o = 4;
    while (i < n) {
        while (i < n && blank(line[i]))
            i++;
        size_t b = i;
        while (i < n && !blank(line[i]))
            i++;
        if (i == b || plus_mech(line + b, i - b))
            continue;
        if (o + 1 + (i - b) > cap)
            return false;
        out[o++] = ' ';
        memcpy(out + o, line + b, i - b);
        o += i - b;
        kept++;
    }
    *outlen = o;
    return kept > 0;
}

/* A line of CAPA's body (or of AUTH's mechanism list), edited; the "."
 * line ends it, after the proxy's own STLS where it offers one. */
static void body_line(struct stp_pop3 *s, const char *line, size_t len)
{
    char out[STP_POP3_MAX_REPLY_LINE + 2];
    size_t ol;
    if (len == 1 && line[0] == '.') {
        if (s->pend_stat[s->pend_head] == STP_P3S_CAPA &&
            s->cfg.offer_starttls && !s->tls && !s->authed)
            say(s, "STLS\r\n");
        say(s, ".\r\n");
        s->in_body = false;
        pend_pop(s);
        return;
    }
    if (s->pend_stat[s->pend_head] == STP_P3S_AUTH) {
        if (plus_mech(line, len))
            return;
        memcpy(out, line, len);
        ol = len;
    } else if (!stp_pop3_capa_line(line, len, out, sizeof(out) - 2, &ol)) {
        return;
    }
    memcpy(out + ol, "\r\n", 2);
    s->ops->to_client(s->ctx, out, ol + 2);
}

/* Multi-line body bytes, relayed as they came: returns how many of P[N]
 * belong to the body, *end when they finish it with "." CRLF (a "." then
 * a bare LF ends it too, as lenient clients read it). */
static size_t body_scan(struct stp_pop3 *s, const char *p, size_t n, bool *end)
{
    *end = false;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        switch (s->body) {
        case STP_P3B_BOL:
            s->body = c == '.' ? STP_P3B_DOT
                    : c == '\n' ? STP_P3B_BOL : STP_P3B_TEXT;
            break;
        case STP_P3B_TEXT:
            if (c == '\n')
                s->body = STP_P3B_BOL;
            break;
        case STP_P3B_DOT:
            if (c == '\n') {
                *end = true;
                return i + 1;
            }
            s->body = c == '\r' ? STP_P3B_DOT_CR : STP_P3B_TEXT;
            break;
        case STP_P3B_DOT_CR:
            if (c == '\n') {
                *end = true;
                return i + 1;
            }
            s->body = STP_P3B_TEXT;
            break;
        }
    }
    return n;
}

static void relay_status(struct stp_pop3 *s, const char *line, size_t len)
{
    char buf[STP_POP3_MAX_REPLY_LINE + 2];
    memcpy(buf, line, len);
    memcpy(buf + len, "\r\n", 2);
    s->ops->to_client(s->ctx, buf, len + 2);
}

/* An -ERR the upstream says before closing: the client hears it, as it
 * would from the server. */
static void relay_goodbye(struct stp_pop3 *s, const char *line, size_t len)
{
    relay_status(s, line, len);
    s->replied_fail = true;
    close_session(s, STP_CLOSE_UPSTREAM_421, false);
}

/* A complete status line from the upstream for the oldest command. */
static long status_line(struct stp_pop3 *s, const char *line, size_t len)
{
    bool ok = prefix(line, len, "+OK");
    bool err = prefix(line, len, "-ERR");
    if (s->pend_count == 0) {
        /* Unsolicited: only a goodbye (Dovecot's on inactivity). */
        if (!err)
            return upstream_error(s, "reason=unexpected_reply");
        relay_goodbye(s, line, len);
        return 0;
    }
    enum stp_p3_pend kind = (enum stp_p3_pend)s->pend[s->pend_head];
    enum stp_p3_stat stat = (enum stp_p3_stat)s->pend_stat[s->pend_head];
    bool cont = kind == STP_P3P_AUTH &&
                (len == 1 ? line[0] == '+' : prefix(line, len, "+ "));
    if (!ok && !err && !cont)
        return upstream_error(s, "reason=bad_reply_line");
    if (kind == STP_P3P_GREETING) {
        pend_pop(s);
        if (err) {
            relay_goodbye(s, line, len); /* it refuses service */
            return 0;
        }
        enter(s, STP_P3_COMMAND);
        if (s->local) {
            /* Never the upstream's words in clear: no APOP timestamp, no
             * banner that TLS could not vouch for. */
            char buf[320];
            snprintf(buf, sizeof(buf), "+OK %s POP3 ready\r\n", host(s));
            say(s, buf);
            return 0;
        }
    }
    bool body = ok && (kind == STP_P3P_CAPA || kind == STP_P3P_AUTH_LIST ||
                       kind == STP_P3P_MULTI);
    if (kind != STP_P3P_GREETING && !body)
        pend_pop(s);
    relay_status(s, line, len);
    if (kind == STP_P3P_GREETING)
        return 0;
    if (body) {
        s->in_body = true; /* popped at its end */
        s->body_capa = kind != STP_P3P_MULTI;
        s->body = STP_P3B_BOL;
    }
    if (ok)
        s->accepted[stat]++;
    if (kind == STP_P3P_AUTH) {
        s->waiting = false;
        if (cont) {
            enter(s, STP_P3_SASL);
            return 0;
        }
    }
    if (ok && (kind == STP_P3P_LOGIN || kind == STP_P3P_AUTH))
        s->authed = true;
    if (kind == STP_P3P_QUIT) {
        close_session(s, STP_CLOSE_QUIT, false);
        return 0;
    }
    count_reply(s, ok);
    return 0;
}

long stp_pop3_upstream_input(struct stp_pop3 *s, const char *p, size_t n)
{
    size_t off = 0;
    while (off < n && s->phase != STP_P3_CLOSED) {
        if (s->in_body && !s->body_capa) {
            bool end;
            size_t k = body_scan(s, p + off, n - off, &end);
            s->ops->to_client(s->ctx, p + off, k);
            s->body_bytes += k;
            off += k;
            if (end) {
                s->in_body = false;
                pend_pop(s);
            }
            continue;
        }
        size_t len, used;
        enum stp_line_status st = stp_line_find(
            p + off, n - off, STP_POP3_MAX_REPLY_LINE, &len, &used);
        if (st == STP_LINE_MORE)
            break;
        if (st == STP_LINE_TOO_LONG)
            return upstream_error(s, "reason=reply_line_too_long");
        const char *line = p + off;
        /* A CR or NUL inside could split it for a lenient client. */
        if (memchr(line, '\r', len) || memchr(line, '\0', len))
            return upstream_error(s, "reason=bad_reply_line");
        off += used;
        if (s->in_body) {
            body_line(s, line, len);
            continue;
        }
        /* Nothing asked since TLS began: injected before it, never to be
         * read inside it (the NO STARTTLS paper's response injection). */
        if (s->quiet && s->pend_count == 0)
            continue;
        long r = status_line(s, line, len);
        if (r < 0)
            return r;
    }
    return (long)off;
}

void stp_pop3_tls_started(struct stp_pop3 *s)
{
    STP_ASSERT(s->phase == STP_P3_STLS || s->phase == STP_P3_CLOSED);
    if (s->phase == STP_P3_CLOSED)
        return;
    /* RFC 2595 4: the client discards what it learnt; so does the proxy.
     * The upstream heard nothing (require_tls) or no login (STLS is only
     * accepted in AUTHORIZATION state). */
    s->tls = true;
    s->quiet = s->local;
    s->local = false;
    s->errors = 0;
    enter(s, STP_P3_COMMAND);
}

void stp_pop3_fail(struct stp_pop3 *s, enum stp_fail why)
{
    static const struct {
        const char *text;
        enum stp_close_reason reason;
    } replies[] = {
        [STP_FAIL_UNREACHABLE] = {"-ERR [SYS/TEMP] %s Service not "
                                  "available\r\n", STP_CLOSE_UPSTREAM_LOST},
        [STP_FAIL_LOST] = {"-ERR [SYS/TEMP] %s Upstream connection lost\r\n",
                           STP_CLOSE_UPSTREAM_LOST},
        [STP_FAIL_HOP_TLS] = {"-ERR [SYS/TEMP] %s TLS to next hop "
                              "unavailable\r\n", STP_CLOSE_NEXT_HOP},
        [STP_FAIL_HOP_IDENTITY] = {"-ERR [SYS/TEMP] %s Client identity not "
                                   "accepted by next hop\r\n",
                                   STP_CLOSE_NEXT_HOP},
        [STP_FAIL_HOP_PROTOCOL] = {"-ERR [SYS/TEMP] %s upstream protocol "
                                   "error\r\n", STP_CLOSE_NEXT_HOP},
        [STP_FAIL_LIMIT] = {"-ERR [SYS/TEMP] %s too many connections\r\n",
                            STP_CLOSE_LIMIT},
        [STP_FAIL_TIMEOUT] = {"-ERR [SYS/TEMP] %s timeout exceeded\r\n",
                              STP_CLOSE_TIMEOUT},
        [STP_FAIL_SHUTDOWN] = {"-ERR [SYS/TEMP] %s Service shutting down\r\n",
                               STP_CLOSE_SHUTDOWN},
        [STP_FAIL_HOP_LOOP] = {"-ERR [SYS/PERM] %s the next hop is this "
                               "proxy\r\n", STP_CLOSE_LOOP},
        [STP_FAIL_HOP_AUTH] = {"-ERR [SYS/TEMP] %s next hop refused the "
                               "proxy's authentication\r\n",
                               STP_CLOSE_NEXT_HOP},
        [STP_FAIL_DENIED] = {"-ERR [SYS/PERM] %s access denied\r\n",
                             STP_CLOSE_NOT_ALLOWED},
    };
    STP_ASSERT((size_t)why < STP_ARRAY_LEN(replies));
    if (s->phase == STP_P3_CLOSED)
        return;
    /* In the middle of a multi-line body a status line would read as
     * message content: the client sees the connection end instead. */
    if (!s->replied_fail && !s->in_body) {
        char buf[256];
        snprintf(buf, sizeof(buf), replies[why].text, host(s));
        say(s, buf);
        s->replied_fail = true;
    }
    close_session(s, replies[why].reason, true);
}

void stp_pop3_status(const struct stp_pop3 *s, struct stp_proto_status *st)
{
    st->greeting = s->phase == STP_P3_GREETING;
    st->replies_due = owed(s) > 0 && s->phase != STP_P3_GREETING;
    st->partial = s->partial;
    st->content = false; /* POP3 clients send no message content */
    st->idle = s->phase == STP_P3_COMMAND && owed(s) == 0 && !s->partial &&
               !s->waiting;
}

/* What the client sent before its last byte is still answered; once
 * nothing more can come of it, the session ends. */
enum stp_eof_verdict stp_pop3_client_eof(const struct stp_pop3 *s,
                                         size_t buffered)
{
    if (s->phase == STP_P3_CLOSED)
        return STP_EOF_WAIT;
    if (buffered > 0 &&
        (s->waiting || owed(s) ||
         (s->ops->upstream_full && s->ops->upstream_full(s->ctx))))
        return STP_EOF_WAIT;
    if (owed(s) == 0 || s->phase == STP_P3_GREETING)
        return STP_EOF_CLOSE;
    return STP_EOF_WAIT;
}

void stp_pop3_summary(const struct stp_pop3 *s, char *buf, size_t cap)
{
    static const char *const names[STP_P3S_COUNT] = {
        "capa", "stls", "user", "pass", "apop", "auth", "stat", "list",
        "uidl", "retr", "top", "dele", "rset", "noop", "quit", "other",
    };
    size_t o = 0;
    buf[0] = '\0';
    for (int i = 0; i < STP_P3S_COUNT && o < cap; i++) {
        if (!s->sent[i])
            continue;
        int n = s->accepted[i] == s->sent[i]
                    ? snprintf(buf + o, cap - o, "%s=%" PRIu32 " ", names[i],
                               s->sent[i])
                    : snprintf(buf + o, cap - o, "%s=%" PRIu32 "/%" PRIu32 " ",
                               names[i], s->accepted[i], s->sent[i]);
        if (n < 0 || (size_t)n >= cap - o) {
            buf[o] = '\0';
            return;
        }
        o += (size_t)n;
    }
    if (o < cap)
        snprintf(buf + o, cap - o, "body_bytes=%" PRIu64, s->body_bytes);
}
