/* The IMAP engine of one proxied session (RFC 9051/3501). Before TLS, with
 * require_tls, the proxy alone answers; after it, commands go to the
 * upstream as the client wrote them and responses come back with their
 * capabilities edited. Literals ({n}, {n+}, ~{n}) are counted, never read:
 * what is inside one is data on both legs, whatever it looks like. Lines are
 * read the way Dovecot reads them; where the proxy and the upstream could
 * read a line differently, the proxy refuses it. No I/O here. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "imap.h"
#include "stp.h"

static const char *const phase_names[STP_IM_COUNT] = {
    [STP_IM_GREETING] = "greeting", [STP_IM_COMMAND] = "command",
    [STP_IM_LITERAL] = "literal",   [STP_IM_WAIT_CONT] = "wait-continuation",
    [STP_IM_CONT_LINE] = "continuation-line",
    [STP_IM_STARTTLS] = "starttls", [STP_IM_CLOSED] = "closed",
};

const char *stp_imap_phase_name(enum stp_imap_phase ph)
{
    return ph < STP_IM_COUNT ? phase_names[ph] : "?";
}

#define TO(ph) (1u << (ph))
/* Every phase may close; CLOSED is final. */
static const unsigned phase_moves[STP_IM_COUNT] = {
    [STP_IM_GREETING] = TO(STP_IM_COMMAND),
    [STP_IM_COMMAND] = TO(STP_IM_LITERAL) | TO(STP_IM_WAIT_CONT) |
                       TO(STP_IM_STARTTLS) | TO(STP_IM_COMMAND),
    [STP_IM_LITERAL] = TO(STP_IM_COMMAND),
    [STP_IM_WAIT_CONT] = TO(STP_IM_LITERAL) | TO(STP_IM_CONT_LINE) |
                         TO(STP_IM_COMMAND),
    [STP_IM_CONT_LINE] = TO(STP_IM_WAIT_CONT) | TO(STP_IM_COMMAND),
    [STP_IM_STARTTLS] = TO(STP_IM_COMMAND),
};

static void enter(struct stp_imap *s, enum stp_imap_phase ph)
{
    if (s->phase == ph)
        return;
    bool ok = ph == STP_IM_CLOSED ||
              (s->phase < STP_IM_CLOSED && (phase_moves[s->phase] & TO(ph)));
    if (!ok) {
        stp_proto_illegal_move(s->ops, s->ctx, stp_imap_phase_name(s->phase),
                               stp_imap_phase_name(ph));
        return;
    }
    if (s->ops->phase)
        s->ops->phase(s->ctx, stp_imap_phase_name(s->phase),
                      stp_imap_phase_name(ph));
    s->phase = ph;
}

static const char *host(const struct stp_imap *s)
{
    return s->cfg.hostname ? s->cfg.hostname : "localhost";
}

void stp_imap_init(struct stp_imap *s, const struct stp_proto_cfg *cfg,
                   const struct stp_proto_actions *ops, void *ctx)
{
    memset(s, 0, sizeof(*s));
    s->cfg = *cfg;
    s->ops = ops;
    s->ctx = ctx;
    s->tls = cfg->tls_active;
    s->phase = STP_IM_GREETING;
}

/* Before TLS with require_tls the upstream is never spoken to. */
static bool proxy_only(const struct stp_imap *s)
{
    return s->cfg.require_tls && !s->tls;
}

static void say(struct stp_imap *s, const char *text)
{
    s->ops->to_client(s->ctx, text, strlen(text));
}

static void close_session(struct stp_imap *s, enum stp_close_reason why,
                          bool cut)
{
    if (s->phase == STP_IM_CLOSED)
        return;
    enter(s, STP_IM_CLOSED);
    s->ops->close(s->ctx, why, cut);
}

/* "* BYE" then close. Inside an upstream response (a literal, or a line
 * after one) nothing can be said that the client would read as ours. */
static void bye_close(struct stp_imap *s, const char *text,
                      enum stp_close_reason why)
{
    if (s->phase == STP_IM_CLOSED)
        return;
    if (!s->bye_sent && s->up_lit == 0 && !s->up_cont) {
        char buf[256];
        snprintf(buf, sizeof(buf), "* BYE %s\r\n", text);
        say(s, buf);
        s->bye_sent = true;
    }
    close_session(s, why, true);
}

/* ---- capabilities ----------------------------------------------------------- */

static bool cap_dropped(const char *t, size_t n)
{
    if ((n == 8 && strncasecmp(t, "STARTTLS", 8) == 0) ||
        (n == 13 && strncasecmp(t, "LOGINDISABLED", 13) == 0) ||
        (n >= 9 && strncasecmp(t, "COMPRESS=", 9) == 0))
        return true;
    /* Channel binding to the proxy's TLS would never verify upstream. */
    return n >= 10 && strncasecmp(t, "AUTH=", 5) == 0 &&
           strncasecmp(t + n - 5, "-PLUS", 5) == 0;
}

int stp_imap_cap_edit(const char *in, size_t n, char *out, size_t cap,
                      bool add_starttls)
{
    size_t o = 0, i = 0;
    while (i < n) {
        while (i < n && in[i] == ' ')
            i++;
        size_t b = i;
        while (i < n && in[i] != ' ')
            i++;
        if (i == b || cap_dropped(in + b, i - b))
            continue;
        if (o + (o > 0) + (i - b) > cap)
            return -ENOSPC;
        if (o > 0)
            out[o++] = ' ';
        memcpy(out + o, in + b, i - b);
        o += i - b;
    }
    if (add_starttls) {
        if (o + 9 > cap)
            return -ENOSPC;
        if (o > 0)
            out[o++] = ' ';
        memcpy(out + o, "STARTTLS", 8);
        o += 8;
    }
    return (int)o;
}

/* Atoms and single spaces only. Clients split a list on any white space
 * (imaplib), the proxy on SP: a TAB would hide a STARTTLS from it. No atom
 * holds a brace: an edit could make or hide the literal a line ends with. */
static bool cap_text_ok(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if ((c < 0x21 && c != ' ') || c > 0x7e || c == '{' || c == '}')
            return false;
    }
    return true;
}

static bool word_is(const char *p, size_t n, const char *w)
{
    size_t k = strlen(w);
    return n >= k && strncasecmp(p, w, k) == 0 && (n == k || p[k] == ' ');
}

/* Relay a response line (no terminator) with any capability list in it
 * edited: "* CAPABILITY ..." or a "[CAPABILITY ...]" code after the status
 * word of "* OK", a tagged OK and the like. False: it does not fit. */
static bool relay_edited(struct stp_imap *s, const char *l, size_t len)
{
    char out[STP_IMAP_MAX_UP_LINE + 32];
    bool add = s->cfg.offer_starttls && !s->tls;
    const char *sp = memchr(l, ' ', len);
    size_t o = 0;
    if (sp) {
        const char *w = sp + 1;
        size_t wl = len - (size_t)(w - l);
        if (l[0] == '*' && sp == l + 1 && word_is(w, wl, "CAPABILITY")) {
            size_t head = (size_t)(w - l) + 10;
            if (!cap_text_ok(l + head, len - head))
                return false;
            memcpy(out, l, head);
            o = head;
            out[o++] = ' ';
            int r = stp_imap_cap_edit(l + head, len - head, out + o,
                                      sizeof(out) - o - 2, add);
            if (r < 0)
                return false;
            o += (size_t)r;
            if (r == 0)
                o--; /* no capability left: no trailing space */
        } else {
            /* status word, then perhaps "[CAPABILITY ...]" */
            const char *sp2 = memchr(w, ' ', wl);
            const char *code = sp2 ? sp2 + 1 : NULL;
            size_t cl = code ? len - (size_t)(code - l) : 0;
            bool is_cap = code && cl > 12 &&
                          strncasecmp(code, "[CAPABILITY ", 12) == 0;
            const char *end = is_cap ? memchr(code, ']', cl) : NULL;
            if (is_cap && !end)
                return false; /* where would a client end the list? */
            if (end) {
                size_t head = (size_t)(code - l) + 12;
                if (!cap_text_ok(l + head, (size_t)(end - l) - head))
                    return false;
                memcpy(out, l, head);
                o = head;
                int r = stp_imap_cap_edit(l + head, (size_t)(end - l) - head,
                                          out + o, sizeof(out) - o - 2, add);
                if (r < 0)
                    return false;
                o += (size_t)r;
                size_t rest = len - (size_t)(end - l);
                if (o + rest + 2 > sizeof(out))
                    return false;
                memcpy(out + o, end, rest);
                o += rest;
            }
        }
    }
    if (o == 0) {
        memcpy(out, l, len);
        o = len;
    }
    memcpy(out + o, "\r\n", 2);
    s->ops->to_client(s->ctx, out, o + 2);
    return true;
}

/* ---- client lines ----------------------------------------------------------- */

/* RFC 9051 tag: ASTRING-CHAR but "+"; Dovecot refuses the rest. */
static bool tag_char(unsigned char c)
{
    return c > 0x20 && c < 0x7f && !strchr("(){%*\"\\+", c);
}

static bool atom_char(unsigned char c)
{
    return c > 0x20 && c < 0x7f && !strchr("(){%*\"\\]", c);
}

int stp_imap_line_literal(const char *l, size_t len, uint64_t *n,
                          bool *nonsync, bool *binary)
{
    *binary = false;
    bool quoted = false;
    for (size_t i = 0; i < len; i++) {
        if (quoted && l[i] == '\\') {
            i++;
        } else if (l[i] == '"') {
            quoted = !quoted;
        }
    }
    if (quoted)
        return -1; /* a string the line ends inside: the upstream errs */
    if (len == 0 || l[len - 1] != '}')
        return 0;
    size_t i = len - 1;
    *nonsync = i > 0 && l[i - 1] == '+';
    if (*nonsync)
        i--;
    size_t digits_end = i;
    while (i > 0 && l[i - 1] >= '0' && l[i - 1] <= '9')
        i--;
    if (i == 0 || l[i - 1] != '{')
        return 0; /* "}" ends an atom: no literal for anyone */
    size_t nd = digits_end - i;
    if (nd == 0 || nd > 10)
        return -1;
    uint64_t v = 0;
    for (size_t k = i; k < digits_end; k++)
        v = v * 10 + (uint64_t)(l[k] - '0');
    if (v > UINT32_MAX)
        return -1;
    i--; /* at "{" */
    if (i > 0 && l[i - 1] == '~') {
        *binary = true;
        i--;
    }
    /* A literal starts an argument; "x{3}" is read otherwise by some. */
    if (i > 0 && l[i - 1] != ' ' && l[i - 1] != '(')
        return -1;
    *n = v;
    return 1;
}

/* Find one line: LF or CRLF ends it. *len excludes the terminator. 0: more
 * needed, 1: a line, -1: over MAX. */
static int find_line(const char *p, size_t n, size_t max, size_t *len,
                     size_t *used)
{
    const char *lf = memchr(p, '\n', n < max ? n : max);
    if (!lf)
        return n >= max ? -1 : 0;
    *used = (size_t)(lf - p) + 1;
    *len = *used - 1;
    if (*len > 0 && p[*len - 1] == '\r')
        (*len)--;
    return 1;
}

static const struct {
    const char *name;
    enum stp_imap_stat stat;
} stat_names[] = {
    {"CAPABILITY", STP_IS_CAPABILITY}, {"STARTTLS", STP_IS_STARTTLS},
    {"LOGIN", STP_IS_LOGIN},           {"AUTHENTICATE", STP_IS_AUTHENTICATE},
    {"SELECT", STP_IS_SELECT},         {"EXAMINE", STP_IS_EXAMINE},
    {"FETCH", STP_IS_FETCH},           {"STORE", STP_IS_STORE},
    {"APPEND", STP_IS_APPEND},         {"IDLE", STP_IS_IDLE},
    {"LOGOUT", STP_IS_LOGOUT},
};

static enum stp_imap_stat stat_of(const char *c, size_t n)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(stat_names); i++)
        if (strlen(stat_names[i].name) == n &&
            strncasecmp(c, stat_names[i].name, n) == 0)
            return stat_names[i].stat;
    return STP_IS_OTHER;
}

/* A refusal of the proxy's own: tagged when the tag is readable. A client
 * that only errs is cut off (max_errors). */
static void refuse(struct stp_imap *s, const char *tag, size_t tl,
                   const char *text, const char *why)
{
    char buf[STP_IMAP_MAX_TAG + 160];
    if (s->ops->event) {
        char d[96];
        snprintf(d, sizeof(d), "reason=%s", why);
        s->ops->event(s->ctx, "reject", d);
    }
    snprintf(buf, sizeof(buf), "%.*s %s\r\n", tl ? (int)tl : 1,
             tl ? tag : "*", text);
    say(s, buf);
    if (s->cfg.max_errors && ++s->errors >= s->cfg.max_errors)
        bye_close(s, "Too many invalid commands.", STP_CLOSE_ERRORS);
}

static void forward(struct stp_imap *s, const char *p, size_t n)
{
    s->ops->to_upstream(s->ctx, STP_FWD_RAW, p, n);
}

/* The line's literal, after the line went to the upstream (or, for a
 * continuation line, was refused with it). */
/* Forward a command line that announces a literal. A non-synchronizing
 * one goes upstream as synchronizing ("{n+}" -> "{n}"), and the client's
 * octets, already on their way, wait here for the upstream's "+": had the
 * upstream refused the line part-way (Dovecot stops at the first bad
 * argument and reads on after the line end), it would read them as
 * commands while the proxy counted them as data. Its tagged reply instead
 * of "+" ends the command, and the octets the client sends for it are
 * dropped. */
static void forward_literal_line(struct stp_imap *s, const char *q,
                                 size_t len, size_t used, uint64_t n,
                                 bool nonsync)
{
    if (nonsync) {
        char buf[STP_MAX_LINE_MAX + 2];
        STP_ASSERT(len >= 2 && len - 1 <= sizeof(buf));
        memcpy(buf, q, len - 2);
        buf[len - 2] = '}';
        s->ops->to_upstream(s->ctx, STP_FWD_LINE, buf, len - 1);
    } else {
        forward(s, q, used);
    }
    s->held = nonsync;
    s->lit_next = n;
    s->after = STP_IMA_LITERAL;
    enter(s, STP_IM_WAIT_CONT);
}

/* One complete client line (LEN without terminator, USED with). Returns
 * false to stall: the line stays unread. */
static bool client_line(struct stp_imap *s, const char *q, size_t len,
                        size_t used)
{
    /* Ours must not land inside an upstream response or before replies
     * owed to earlier commands. */
    bool quiet = s->pending == 0 && s->up_lit == 0 && !s->up_cont;
    bool bad = memchr(q, '\0', len) || memchr(q, '\r', len);
    uint64_t lit = 0;
    bool nonsync = false, binary = false;
    int lr = bad ? -1
                 : stp_imap_line_literal(q, len, &lit, &nonsync, &binary);

    if (s->phase == STP_IM_CONT_LINE) {
        /* A SASL response or IDLE's DONE: data, forwarded whole. */
        if (bad) {
            bye_close(s, "Invalid characters in line.", STP_CLOSE_CLIENT_ERROR);
            return true;
        }
        forward(s, q, used);
        if (s->in_idle) {
            s->in_idle = false;
            enter(s, STP_IM_COMMAND);
        } else {
            enter(s, STP_IM_WAIT_CONT);
        }
        return true;
    }

    if (s->cont) {
        /* The rest of a command after a literal (the upstream has the
         * beginning): it cannot be refused alone. After a literal comes a
         * space, a ")" or the line end, or the upstream reads otherwise. */
        if (lr < 0 || (lr == 1 && binary && !s->in_append) ||
            (len > 0 && q[0] != ' ' && q[0] != ')')) {
            bye_close(s, "Invalid command line.", STP_CLOSE_CLIENT_ERROR);
            return true;
        }
        s->cont = false;
        if (s->discard) {
            /* The upstream refused the command: the rest is dropped, and
             * a non-synchronizing literal with it. */
            s->discard = lr == 1 && nonsync;
            s->cont = s->discard;
            s->lit_left = s->discard ? lit : 0;
            if (s->lit_left)
                enter(s, STP_IM_LITERAL);
            return true;
        }
        if (lr == 1)
            forward_literal_line(s, q, len, used, lit, nonsync);
        else
            forward(s, q, used);
        return true;
    }

    /* "tag SP command [SP args]", case-insensitive command. */
    size_t tl = 0;
    while (tl < len && tag_char((unsigned char)q[tl]))
        tl++;
    bool tag_ok = tl > 0 && tl <= STP_IMAP_MAX_TAG &&
                  tl < len && q[tl] == ' ';
    size_t cb = tl + 1, ce = cb;
    while (tag_ok && ce < len && atom_char((unsigned char)q[ce]))
        ce++;
    bool cmd_ok = tag_ok && ce > cb && (ce == len || q[ce] == ' ');
    const char *cmd = q + cb;
    size_t cl = cmd_ok ? ce - cb : 0;
    bool args = cmd_ok && ce < len;

    const char *text = NULL, *why = NULL;
    bool starttls = false, local_ok = false, id_local = false;
    enum stp_imap_stat st = cmd_ok ? stat_of(cmd, cl) : STP_IS_OTHER;
    /* Dovecot reads "~{n}" as a literal only where APPEND takes a
     * message; elsewhere its octets would be commands to it and data to
     * the proxy. */
    if (lr == 1 && binary && st != STP_IS_APPEND)
        lr = -1;
    if (bad || lr < 0 || !cmd_ok) {
        text = "BAD Error in IMAP command received by proxy.";
        why = bad ? "bad_character" : lr < 0 ? "ambiguous_literal"
                                            : "bad_syntax";
    } else if (st == STP_IS_STARTTLS) {
        if (args || lr) {
            text = "BAD STARTTLS takes no arguments.";
            why = "starttls_syntax";
        } else if (s->tls) {
            text = "BAD TLS is already active.";
            why = "starttls_twice";
        } else if (!s->cfg.offer_starttls || s->plain_state) {
            text = "BAD STARTTLS is not available.";
            why = "starttls_unavailable";
        } else {
            text = "OK Begin TLS negotiation now.";
            starttls = local_ok = true;
        }
    } else if (cl == 8 && strncasecmp(cmd, "COMPRESS", 8) == 0) {
        /* The proxy reads the stream: it cannot be compressed. */
        text = "NO [CANNOT] COMPRESS is not available through this proxy.";
        why = "compress";
    } else if (cl == 2 && strncasecmp(cmd, "ID", 2) == 0) {
        /* RFC 2971 ID is no identity, but Dovecot takes x-originating-ip
         * and its kin from a trusted address, which the proxy's is: any
         * client could name its own. Answered here, never forwarded. */
        if (lr) {
            text = "NO ID is answered by this proxy, without literals.";
            why = "client_identity_command";
        } else {
            text = "OK ID completed.";
            local_ok = id_local = true;
        }
    } else if (proxy_only(s)) {
        if (st == STP_IS_LOGIN || st == STP_IS_AUTHENTICATE) {
            text = "NO [PRIVACYREQUIRED] Use STARTTLS first: no plaintext "
                   "authentication.";
            why = "auth_before_tls";
        } else if ((st == STP_IS_CAPABILITY || st == STP_IS_LOGOUT ||
                    (cl == 4 && strncasecmp(cmd, "NOOP", 4) == 0)) &&
                   !args && lr == 0) {
            local_ok = true;
            text = st == STP_IS_CAPABILITY ? "OK Capability completed."
                   : st == STP_IS_LOGOUT   ? "OK Logout completed."
                                           : "OK NOOP completed.";
        } else {
            text = "BAD [PRIVACYREQUIRED] Use STARTTLS first.";
            why = "tls_required";
        }
    }

    if (text) {
        if (!quiet)
            return false;
        /* Also a marker the proxy will not read as one ("x{3+}"): the
         * client may. */
        bool nonsync_tail = len >= 2 && q[len - 1] == '}' && q[len - 2] == '+';
        if (((lr == 1 && nonsync) || (lr < 0 && nonsync_tail)) && !local_ok) {
            /* The client sends the octets unasked: they cannot be told
             * from commands. */
            if (s->ops->event)
                s->ops->event(s->ctx, "reject",
                              "reason=nonsync_literal_on_refused_line");
            bye_close(s, "Literal on a refused command.",
                      STP_CLOSE_CLIENT_ERROR);
            return true;
        }
        s->sent[st]++;
        if (st == STP_IS_CAPABILITY && local_ok)
            say(s, "* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\n");
        if (st == STP_IS_LOGOUT && local_ok)
            say(s, "* BYE Logging out.\r\n");
        if (id_local)
            say(s, "* ID NIL\r\n");
        if (why) {
            refuse(s, q, tag_ok ? tl : 0, text, why);
        } else {
            char buf[STP_IMAP_MAX_TAG + 80];
            snprintf(buf, sizeof(buf), "%.*s %s\r\n", (int)tl, q, text);
            say(s, buf);
            s->errors = 0;
        }
        if (s->phase == STP_IM_CLOSED)
            return true;
        if (st == STP_IS_LOGOUT && local_ok) {
            s->bye_sent = true;
            close_session(s, STP_CLOSE_QUIT, false);
        } else if (starttls) {
            enter(s, STP_IM_STARTTLS);
            s->ops->start_tls(s->ctx);
        }
        return true;
    }

    /* Forwarded. */
    if (s->pending >= STP_IMAP_MAX_PENDING)
        return false;
    s->errors = 0;
    s->sent[st]++;
    s->pending++;
    s->quiet = false;
    if (!s->tls && st != STP_IS_CAPABILITY &&
        !(cl == 4 && strncasecmp(cmd, "NOOP", 4) == 0))
        s->plain_state = true;
    s->in_append = st == STP_IS_APPEND;
    if (st == STP_IS_LOGOUT) {
        s->logout = true;
        memcpy(s->logout_tag, q, tl);
        s->logout_len = (uint8_t)tl;
    }
    memcpy(s->tag, q, tl);
    s->tag_len = (uint8_t)tl;
    if (lr == 1) {
        forward_literal_line(s, q, len, used, lit, nonsync);
    } else {
        forward(s, q, used);
        if (st == STP_IS_AUTHENTICATE || st == STP_IS_IDLE) {
            s->after = st == STP_IS_IDLE ? STP_IMA_IDLE : STP_IMA_SASL;
            enter(s, STP_IM_WAIT_CONT);
        }
    }
    return true;
}

size_t stp_imap_client_input(struct stp_imap *s, const char *p, size_t n)
{
    size_t off = 0;
    while (off < n) {
        if (s->ops->upstream_full && s->ops->upstream_full(s->ctx))
            return off; /* every step below forwards at most one piece */
        const char *q = p + off;
        size_t left = n - off;
        switch (s->phase) {
        case STP_IM_GREETING:
        case STP_IM_STARTTLS:
        case STP_IM_WAIT_CONT:
        case STP_IM_CLOSED:
            return off;
        case STP_IM_LITERAL: {
            size_t k = (size_t)STP_MIN((uint64_t)left, s->lit_left);
            if (!s->discard)
                forward(s, q, k);
            s->lit_left -= k;
            off += k;
            if (s->lit_left == 0)
                enter(s, STP_IM_COMMAND);
            break;
        }
        case STP_IM_COMMAND:
        case STP_IM_CONT_LINE: {
            size_t len = 0, used = 0;
            int r = find_line(q, left, s->cfg.max_line, &len, &used);
            s->partial = r == 0;
            if (r == 0)
                return off;
            if (r < 0) {
                /* Its end, perhaps announcing a literal, is unseen. */
                if (s->ops->event)
                    s->ops->event(s->ctx, "reject", "reason=line_too_long");
                bye_close(s, "Command line too long.", STP_CLOSE_CLIENT_ERROR);
                return n;
            }
            if (!client_line(s, q, len, used))
                return off;
            off += used;
            if (s->phase == STP_IM_STARTTLS || s->phase == STP_IM_CLOSED)
                return s->phase == STP_IM_CLOSED ? n : off;
            break;
        }
        case STP_IM_COUNT:
            STP_ASSERT(!"bad phase");
        }
    }
    return off;
}

/* ---- upstream responses ----------------------------------------------------- */

static long upstream_error(struct stp_imap *s, const char *detail)
{
    if (s->ops->event)
        s->ops->event(s->ctx, "upstream_error", detail);
    char t[160];
    snprintf(t, sizeof(t), "%s upstream protocol error", host(s));
    bye_close(s, t, STP_CLOSE_UPSTREAM_PROTO);
    return -EPROTO;
}

/* The literal announced at the end of a response line, as clients read it
 * (imaplib: "{n}" before the line end, quotes or not). */
static int up_literal(const char *l, size_t len, uint64_t *n)
{
    if (len < 3 || l[len - 1] != '}')
        return 0;
    size_t i = len - 1;
    if (l[i - 1] == '+')
        i--;
    size_t e = i;
    while (i > 0 && l[i - 1] >= '0' && l[i - 1] <= '9')
        i--;
    if (i == 0 || l[i - 1] != '{')
        return 0;
    if (e == i || e - i > 10)
        return -1;
    uint64_t v = 0;
    for (size_t k = i; k < e; k++)
        v = v * 10 + (uint64_t)(l[k] - '0');
    *n = v;
    return 1;
}

static long greeting(struct stp_imap *s, const char *l, size_t len)
{
    if (word_is(l, len, "* PREAUTH")) {
        /* It would log every client in as someone, unasked. */
        if (s->ops->event)
            s->ops->event(s->ctx, "reject", "reason=upstream_preauth");
        char t[160];
        snprintf(t, sizeof(t), "%s upstream offered a pre-authenticated "
                               "session: refused", host(s));
        bye_close(s, t, STP_CLOSE_UPSTREAM_PROTO);
        return -EPROTO;
    }
    if (word_is(l, len, "* BYE")) {
        char t[160];
        snprintf(t, sizeof(t), "%s Service not available", host(s));
        bye_close(s, t, STP_CLOSE_UPSTREAM_421);
        return -EPROTO;
    }
    if (!word_is(l, len, "* OK"))
        return upstream_error(s, "reason=bad_greeting");
    enter(s, STP_IM_COMMAND);
    if (proxy_only(s)) {
        char buf[256];
        snprintf(buf, sizeof(buf),
                 "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] %s "
                 "ready.\r\n", host(s));
        say(s, buf);
    } else if (!relay_edited(s, l, len)) {
        return upstream_error(s, "reason=greeting_too_long");
    }
    return 0;
}

/* The first line of a response (not the rest of one after a literal). */
static long response(struct stp_imap *s, const char *l, size_t len)
{
    if (len > 0 && l[0] == '+') {
        if (proxy_only(s))
            return upstream_error(s, "reason=unexpected_continuation");
        if (s->phase == STP_IM_WAIT_CONT) {
            switch ((enum stp_imap_after)s->after) {
            case STP_IMA_LITERAL:
                s->lit_left = s->lit_next;
                s->cont = true;
                enter(s, s->lit_left ? STP_IM_LITERAL : STP_IM_COMMAND);
                if (s->held) {
                    /* asked for by the proxy, not by the client */
                    s->held = false;
                    return 0;
                }
                break;
            case STP_IMA_IDLE:
                s->in_idle = true;
                /* fall through */
            case STP_IMA_SASL:
                enter(s, STP_IM_CONT_LINE);
                break;
            }
        } else if (!(s->phase == STP_IM_CONT_LINE && s->in_idle)) {
            /* Unasked, it would have the client send what it holds. */
            return upstream_error(s, "reason=unexpected_continuation");
        }
        return relay_edited(s, l, len)
                   ? 0
                   : upstream_error(s, "reason=response_too_long");
    }
    if (len > 0 && l[0] == '*') {
        if (word_is(l, len, "* PREAUTH"))
            return upstream_error(s, "reason=preauth_after_greeting");
        bool bye = word_is(l, len, "* BYE");
        if (proxy_only(s)) {
            return 0; /* nothing was asked: dropped (its close follows) */
        }
        if (!relay_edited(s, l, len))
            return upstream_error(s, "reason=response_too_long");
        if (bye)
            s->bye_sent = true;
        return 0;
    }
    /* Tagged: answers a command the proxy forwarded, or is injected. */
    const char *sp = memchr(l, ' ', len);
    size_t tl = sp ? (size_t)(sp - l) : len;
    if (s->pending == 0)
        return upstream_error(s, "reason=unexpected_tagged_response");
    s->pending--;
    if (!relay_edited(s, l, len))
        return upstream_error(s, "reason=response_too_long");
    bool mine = tl == s->tag_len && memcmp(l, s->tag, tl) == 0;
    if (mine && (s->phase == STP_IM_WAIT_CONT ||
                 (s->phase == STP_IM_CONT_LINE && !s->in_idle))) {
        /* The command ended without (more) continuation. */
        bool held = s->phase == STP_IM_WAIT_CONT &&
                    s->after == STP_IMA_LITERAL && s->held;
        s->cont = held;
        s->discard = held;
        s->held = false;
        s->in_idle = false;
        s->lit_left = held ? s->lit_next : 0;
        enter(s, s->lit_left ? STP_IM_LITERAL : STP_IM_COMMAND);
    }
    if (s->logout && tl == s->logout_len && memcmp(l, s->logout_tag, tl) == 0)
        close_session(s, STP_CLOSE_QUIT, false);
    return 0;
}

long stp_imap_upstream_input(struct stp_imap *s, const char *p, size_t n)
{
    size_t off = 0;
    while (off < n && s->phase != STP_IM_CLOSED) {
        const char *q = p + off;
        size_t left = n - off;
        if (s->up_lit) {
            size_t k = (size_t)STP_MIN((uint64_t)left, s->up_lit);
            if (!proxy_only(s) && !s->dropping)
                s->ops->to_client(s->ctx, q, k);
            s->up_lit -= k;
            off += k;
            continue;
        }
        size_t len = 0, used = 0;
        int r = find_line(q, left, STP_IMAP_MAX_UP_LINE, &len, &used);
        if (r == 0)
            break;
        if (r < 0)
            return upstream_error(s, "reason=response_line_too_long");
        /* A CR or NUL inside a line could split it for a lenient client. */
        if (memchr(q, '\r', len) || memchr(q, '\0', len))
            return upstream_error(s, "reason=bad_response_line");
        uint64_t lit = 0;
        int lr = up_literal(q, len, &lit);
        if (lr < 0)
            return upstream_error(s, "reason=bad_literal");
        off += used;
        long rc;
        if (s->up_cont) {
            /* The rest of a response after a literal: relayed as it is. */
            if (!proxy_only(s) && !s->dropping)
                s->ops->to_client(s->ctx, q, used);
            rc = 0;
        } else if (s->quiet && s->pending == 0) {
            s->dropping = true; /* with the literals it announces */
            rc = 0;
        } else if (lr && len > 0 && q[0] == '+') {
            /* A continuation request is text, never data: a client may
             * read it so or not. */
            return upstream_error(s, "reason=literal_in_continuation");
        } else if (s->phase == STP_IM_GREETING) {
            if (lr)
                return upstream_error(s, "reason=bad_greeting");
            rc = greeting(s, q, len);
        } else {
            rc = response(s, q, len);
        }
        if (rc < 0)
            return rc;
        s->up_cont = lr == 1;
        s->up_lit = lr == 1 ? lit : 0;
        if (!s->up_cont)
            s->dropping = false; /* the response ended */
    }
    return (long)off;
}

void stp_imap_tls_started(struct stp_imap *s)
{
    STP_ASSERT(s->phase == STP_IM_STARTTLS || s->phase == STP_IM_CLOSED);
    if (s->phase == STP_IM_CLOSED)
        return;
    /* Nothing was asked of the upstream before TLS: what it sent by now
     * was sent before it, and is never read inside it (the NO STARTTLS
     * paper's response injection). */
    s->quiet = proxy_only(s);
    s->tls = true;
    s->cont = s->partial = s->discard = s->held = false;
    s->errors = 0;
    enter(s, STP_IM_COMMAND);
}

void stp_imap_fail(struct stp_imap *s, enum stp_fail why)
{
    static const struct {
        const char *text;
        enum stp_close_reason reason;
    } texts[] = {
        [STP_FAIL_UNREACHABLE] = {"Service not available.",
                                  STP_CLOSE_UPSTREAM_LOST},
        [STP_FAIL_LOST] = {"Upstream connection lost.",
                           STP_CLOSE_UPSTREAM_LOST},
        [STP_FAIL_HOP_TLS] = {"TLS to next hop unavailable.",
                              STP_CLOSE_NEXT_HOP},
        [STP_FAIL_HOP_IDENTITY] = {"Client identity not accepted by next "
                                   "hop.", STP_CLOSE_NEXT_HOP},
        [STP_FAIL_HOP_PROTOCOL] = {"%s upstream protocol error.",
                                   STP_CLOSE_NEXT_HOP},
        [STP_FAIL_LIMIT] = {"%s too many connections.", STP_CLOSE_LIMIT},
        [STP_FAIL_TIMEOUT] = {"%s Disconnected for inactivity.",
                              STP_CLOSE_TIMEOUT},
        [STP_FAIL_SHUTDOWN] = {"Server shutting down.", STP_CLOSE_SHUTDOWN},
        [STP_FAIL_HOP_LOOP] = {"%s the next hop is this proxy.",
                               STP_CLOSE_LOOP},
        [STP_FAIL_HOP_AUTH] = {"%s next hop refused the proxy's "
                               "authentication.", STP_CLOSE_NEXT_HOP},
        [STP_FAIL_DENIED] = {"%s access denied.", STP_CLOSE_NOT_ALLOWED},
    };
    STP_ASSERT((size_t)why < STP_ARRAY_LEN(texts));
    char t[200];
    snprintf(t, sizeof(t), texts[why].text, host(s));
    bye_close(s, t, texts[why].reason);
}

void stp_imap_status(const struct stp_imap *s, struct stp_proto_status *st)
{
    /* IDLE waits for the client, as long as it likes. */
    uint32_t owed = s->pending - (s->in_idle && s->pending ? 1 : 0);
    st->greeting = s->phase == STP_IM_GREETING;
    st->replies_due = owed > 0 || s->phase == STP_IM_WAIT_CONT;
    st->partial = s->partial || s->cont;
    st->content = s->phase == STP_IM_LITERAL;
    st->idle = (s->phase == STP_IM_COMMAND ||
                (s->phase == STP_IM_CONT_LINE && s->in_idle)) &&
               owed == 0 && !s->partial && !s->cont && s->up_lit == 0 &&
               !s->up_cont;
}

/* What the client sent before its last byte is still answered; an APPEND
 * whose literal never completes must not complete upstream. */
enum stp_eof_verdict stp_imap_client_eof(const struct stp_imap *s,
                                         size_t buffered)
{
    if (s->phase == STP_IM_CLOSED)
        return STP_EOF_WAIT;
    if (s->phase == STP_IM_LITERAL || s->cont)
        return STP_EOF_CUT;
    if (buffered > 0 && (s->pending || s->phase == STP_IM_WAIT_CONT ||
                         (s->ops->upstream_full &&
                          s->ops->upstream_full(s->ctx))))
        return STP_EOF_WAIT;
    if (s->phase == STP_IM_WAIT_CONT)
        return STP_EOF_CUT;
    /* IDLE can only end with a DONE that will never come; a SASL
     * exchange with a response that will not either. */
    if (s->phase == STP_IM_CONT_LINE && buffered == 0)
        return s->in_idle && s->pending == 1 ? STP_EOF_CLOSE : STP_EOF_CUT;
    if (s->pending == 0 || s->phase == STP_IM_GREETING)
        return STP_EOF_CLOSE;
    return STP_EOF_WAIT;
}

void stp_imap_summary(const struct stp_imap *s, char *buf, size_t cap)
{
    static const char *const names[STP_IS_COUNT] = {
        "capability", "starttls", "login", "authenticate", "select",
        "examine", "fetch", "store", "append", "idle", "logout", "other",
    };
    size_t o = 0;
    buf[0] = '\0';
    for (int i = 0; i < STP_IS_COUNT; i++) {
        if (!s->sent[i])
            continue;
        int k = snprintf(buf + o, cap - o, "%s%s=%" PRIu32, o ? " " : "",
                         names[i], s->sent[i]);
        if (k < 0 || (size_t)k >= cap - o) {
            buf[o] = '\0';
            return;
        }
        o += (size_t)k;
    }
}
