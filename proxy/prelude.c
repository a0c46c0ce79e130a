/* The proxy's own SMTP dialogue with the upstream (RFC 3207 as a client,
 * RFC 4954 AUTH, XCLIENT), before any client byte is relayed. A failure at any step ends
 * the session: never a silent fall back to plaintext. The one plaintext
 * path is tls = opportunistic with no STARTTLS in the EHLO reply; once
 * STARTTLS is offered, a refusal or a broken handshake is a failure, so
 * an attacker who breaks TLS gains nothing. */
#define _GNU_SOURCE /* memmem */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base64.h"
#include "config.h"
#include "prelude.h"
#include "smtp.h"

static const char *const step_names[STP_UP_COUNT] = {
    "greeting", "ehlo", "starttls", "tls", "auth", "xclient", "ready",
    "failed",
};

const char *stp_up_step_name(enum stp_up_step s)
{
    return s < STP_UP_COUNT ? step_names[s] : "?";
}

void stp_up_init(struct stp_prelude *p, const struct stp_up_cfg *cfg,
                 const struct stp_up_ops *ops, void *ctx)
{
    memset(p, 0, sizeof(*p));
    p->cfg = *cfg;
    p->ops = ops;
    p->ctx = ctx;
    p->step = STP_UP_GREETING;
}

#define TO(st) (1u << (st))
/* Every step but the last two may fail; READY and FAILED are final. */
static const unsigned step_moves[STP_UP_COUNT] = {
    [STP_UP_GREETING] = TO(STP_UP_EHLO) | TO(STP_UP_XCLIENT) | TO(STP_UP_READY),
    [STP_UP_EHLO] = TO(STP_UP_STARTTLS) | TO(STP_UP_AUTH) | TO(STP_UP_XCLIENT) |
                    TO(STP_UP_READY),
    [STP_UP_STARTTLS] = TO(STP_UP_TLS),
    [STP_UP_AUTH] = TO(STP_UP_AUTH) | TO(STP_UP_XCLIENT) | TO(STP_UP_READY),
    [STP_UP_TLS] = TO(STP_UP_EHLO) | TO(STP_UP_XCLIENT) | TO(STP_UP_READY),
    [STP_UP_XCLIENT] = TO(STP_UP_READY),
};

bool stp_up_step_may(enum stp_up_step from, enum stp_up_step to)
{
    return from < STP_UP_READY && to < STP_UP_COUNT &&
           (to == STP_UP_FAILED || (step_moves[from] & TO(to)));
}

static void fail(struct stp_prelude *p, enum stp_fail f, const char *reason);

/* The one place the step changes (but failing), checked against the table:
 * a move it does not allow is a bug, which fails the prelude (and stops a
 * debug build). Returns false then. */
static bool step_to(struct stp_prelude *p, enum stp_up_step next)
{
    if (stp_up_step_may(p->step, next)) {
        p->step = next;
        return true;
    }
#ifndef NDEBUG
    STP_ASSERT(!"illegal prelude step");
#endif
    fail(p, STP_FAIL_HOP_PROTOCOL, "internal error: illegal prelude step");
    return false;
}

/* Send VERB followed by ARG (either may be empty), never truncated. */
static void send_line(struct stp_prelude *p, enum stp_up_step next,
                      const char *verb, const char *arg)
{
    size_t a = strlen(verb), b = strlen(arg);
    char small[512], *line = a + b <= sizeof(small) ? small : malloc(a + b);
    if (!line) {
        fail(p, STP_FAIL_HOP_PROTOCOL, "out of memory");
        return;
    }
    memcpy(line, verb, a);
    memcpy(line + a, arg, b);
    if (step_to(p, next))
        p->ops->send(p->ctx, line, a + b);
    explicit_bzero(line, a + b); /* it may carry a credential */
    if (line != small)
        free(line);
}

static const char *hello_verb(const struct stp_prelude *p)
{
    return p->cfg.lmtp ? "LHLO " : "EHLO ";
}

static const char *const mech_names[] = {
    [STP_AUTH_PLAIN] = "PLAIN", [STP_AUTH_LOGIN] = "LOGIN",
    [STP_AUTH_XOAUTH2] = "XOAUTH2",
};

/* The mechanisms of an EHLO "AUTH PLAIN LOGIN" (or old "AUTH=...") line. */
static unsigned auth_mechs(const char *t, size_t n)
{
    unsigned m = 0;
    size_t i = 0;
    while (i < n && (t[i] == ' ' || t[i] == '\t'))
        i++;
    i += 4; /* "AUTH" */
    while (i < n) {
        while (i < n && (t[i] == ' ' || t[i] == '=' || t[i] == '\t'))
            i++;
        size_t w = i;
        while (i < n && t[i] != ' ' && t[i] != '\t')
            i++;
        for (int k = STP_AUTH_PLAIN; k <= STP_AUTH_XOAUTH2; k++)
            if (i - w == strlen(mech_names[k]) &&
                strncasecmp(t + w, mech_names[k], i - w) == 0)
                m |= 1u << k;
    }
    return m;
}

/* A SASL string in base64: at most a 255-byte user and a 4096-byte secret
 * (config.c), with a few bytes of framing. */
#define SASL_MAX 4400
static void send_b64(struct stp_prelude *p, const char *verb,
                     const char *raw, size_t n)
{
    char b64[STP_B64_LEN(SASL_MAX) + 1];
    if (n > SASL_MAX) {
        fail(p, STP_FAIL_HOP_AUTH, "credentials too long");
        return;
    }
    stp_b64_encode(raw, n, b64);
    send_line(p, STP_UP_AUTH, verb, b64);
    explicit_bzero(b64, sizeof(b64));
}

/* The initial response of PLAIN or XOAUTH2 into RAW (SASL_MAX + 1 bytes):
 * its length, or -1 when it does not fit. */
static int sasl_response(const struct stp_prelude *p, char *raw)
{
    int n = p->cfg.auth == STP_AUTH_PLAIN
                ? snprintf(raw, SASL_MAX + 1, "%c%s%c%s", 0, p->cfg.user, 0,
                           p->cfg.secret)
                : snprintf(raw, SASL_MAX + 1, "user=%s\001auth=Bearer %s\001\001",
                           p->cfg.user, p->cfg.secret);
    return n < 0 || n > SASL_MAX ? -1 : n;
}

/* Every copy of S (N bytes) in the text T becomes "***". */
static void blank_out(char *t, const char *s, size_t n)
{
    char *at;
    /* Searched after each mark: the secret may be made of asterisks. The
     * text never grows: a secret under 3 bytes is left (its base64 is
     * not). */
    while (n >= 3 && (at = memmem(t, strlen(t), s, n)) != NULL) {
        memmove(at + 3, at + n, strlen(at + n) + 1);
        memcpy(at, "***", 3);
        t = at + 3;
    }
}

/* A relay may quote what it was sent: the secret, raw or as sent, never
 * reaches a log line through its reply. */
static void redact(const struct stp_prelude *p, char *t)
{
    char raw[SASL_MAX + 1], b64[STP_B64_LEN(SASL_MAX) + 1];
    size_t sl = strlen(p->cfg.secret);
    /* Longest first: the others may be inside it. */
    int n = p->cfg.auth == STP_AUTH_LOGIN ? -1 : sasl_response(p, raw);
    if (n > 0)
        blank_out(t, b64, stp_b64_encode(raw, (size_t)n, b64));
    blank_out(t, b64, stp_b64_encode(p->cfg.secret, sl, b64));
    blank_out(t, p->cfg.secret, sl);
    explicit_bzero(raw, sizeof(raw));
    explicit_bzero(b64, sizeof(b64));
}

/* Report the failure, once. Its reason may quote the upstream, which is
 * logged: with a login configured, never with the secret in it. */
static void fail(struct stp_prelude *p, enum stp_fail f, const char *reason)
{
    if (p->step == STP_UP_FAILED)
        return;
    p->step = STP_UP_FAILED;
    char t[STP_MAX_REPLY_LINE + 200];
    if (p->cfg.auth != STP_AUTH_NONE) {
        snprintf(t, sizeof(t), "%s", reason);
        redact(p, t);
        reason = t;
    }
    p->ops->fail(p->ctx, f, reason);
}

/* AUTH with the initial response where the mechanism has one (RFC 4954 4):
 * one round trip for PLAIN and XOAUTH2. */
static void send_auth(struct stp_prelude *p)
{
    int m = p->cfg.auth;
    /* The configuration allows no AUTH without TLS; never in clear. */
    if (p->cfg.starttls && !p->tls_done) {
        fail(p, STP_FAIL_HOP_AUTH, "AUTH without TLS");
        return;
    }
    if (!(p->offers_auth & (1u << m))) {
        char why[64];
        snprintf(why, sizeof(why), "AUTH %s not offered", mech_names[m]);
        fail(p, STP_FAIL_HOP_AUTH, why);
        return;
    }
    if (m == STP_AUTH_LOGIN) {
        send_line(p, STP_UP_AUTH, "AUTH LOGIN", "");
        return;
    }
    char raw[SASL_MAX + 1];
    int n = sasl_response(p, raw);
    if (n < 0)
        fail(p, STP_FAIL_HOP_AUTH, "credentials too long");
    else
        send_b64(p, m == STP_AUTH_PLAIN ? "AUTH PLAIN " : "AUTH XOAUTH2 ", raw,
                 (size_t)n);
    explicit_bzero(raw, sizeof(raw));
}

/* Next step after the greeting, the handshake, an EHLO or AUTH. */
static void advance(struct stp_prelude *p)
{
    if (p->cfg.starttls && !p->tls_done && !p->plaintext) {
        send_line(p, STP_UP_EHLO, hello_verb(p), p->cfg.ehlo_name);
    } else if ((p->cfg.xclient || p->cfg.auth) && !p->have_caps) {
        /* After TLS the server's capabilities must be learnt again. */
        send_line(p, STP_UP_EHLO, hello_verb(p), p->cfg.ehlo_name);
    } else if (p->cfg.auth && !p->authed) {
        send_auth(p);
    } else if (p->cfg.xclient) {
        send_line(p, STP_UP_XCLIENT, p->cfg.xclient, "");
    } else {
        if (step_to(p, STP_UP_READY))
            p->ops->ready(p->ctx, p->greeting, p->greeting_len);
    }
}

/* Keep a greeting line (the client will be greeted with it). */
static bool keep_greeting(struct stp_prelude *p, const char *line, size_t len)
{
    if (p->greeting_len + len + 2 > sizeof(p->greeting)) {
        fail(p, STP_FAIL_HOP_PROTOCOL, "greeting too long");
        return false;
    }
    memcpy(p->greeting + p->greeting_len, line, len);
    memcpy(p->greeting + p->greeting_len + len, "\r\n", 2);
    p->greeting_len += len + 2;
    return true;
}

/* The last line of a reply to AUTH or to one of its continuations. */
static bool auth_reply(struct stp_prelude *p, int code, const char *line,
                       size_t len)
{
    int m = p->cfg.auth;
    if (code == 235 && !p->auth_challenged) {
        p->authed = true;
        advance(p);
        return p->step != STP_UP_FAILED;
    }
    if (code == 334 && m == STP_AUTH_LOGIN && p->auth_round < 2) {
        /* The server's prompts ("Username:", "Password:") are not read:
         * the order is the mechanism's. */
        const char *v = p->auth_round++ ? p->cfg.secret : p->cfg.user;
        send_b64(p, "", v, strlen(v));
        return p->step != STP_UP_FAILED;
    }
    if (code == 334 && m == STP_AUTH_XOAUTH2 && !p->auth_challenged) {
        /* The error challenge: an empty response ends the exchange, and
         * the final reply says why (RFC 7628 3.2.3). */
        p->auth_challenged = true;
        char *c = p->challenge;
        long dn = len > 4 ? stp_b64_decode(line + 4, len - 4,
                                           (unsigned char *)c,
                                           sizeof(p->challenge) - 1)
                          : -1;
        if (dn >= 0)
            c[dn] = '\0'; /* the log escapes what it holds */
        else
            snprintf(c, sizeof(p->challenge), "%.*s", (int)len, line);
        send_line(p, STP_UP_AUTH, "", "");
        return p->step != STP_UP_FAILED;
    }
    char why[STP_MAX_REPLY_LINE + 200];
    snprintf(why, sizeof(why), "AUTH refused: %.*s%s%s%s", (int)len, line,
             p->auth_challenged ? " (" : "",
             p->auth_challenged ? p->challenge : "",
             p->auth_challenged ? ")" : "");
    fail(p, STP_FAIL_HOP_AUTH, why); /* redacted there */
    return false;
}

/* One whole reply line. Returns false when the prelude stopped. */
static bool reply_line(struct stp_prelude *p, const char *line, size_t len,
                       bool more_buffered)
{
    int code;
    bool last;
    if (stp_reply_line(line, len, &code, &last) < 0 ||
        memchr(line, '\r', len) || memchr(line, '\0', len) ||
        (p->code && code != p->code)) {
        fail(p, STP_FAIL_HOP_PROTOCOL, "bad reply line");
        return false;
    }
    bool first = p->code == 0;
    p->code = last ? 0 : code;
    const char *text = len > 4 ? line + 4 : line + len;
    size_t tl = len > 4 ? len - 4 : 0;

    switch (p->step) {
    case STP_UP_GREETING:
        if (!keep_greeting(p, line, len))
            return false;
        if (!last)
            return true;
        if (code != 220) {
            /* The upstream refuses service: nothing can be set up here,
             * perhaps at the next address. */
            char why[160];
            snprintf(why, sizeof(why), "greeting: %.*s", (int)len, line);
            fail(p,
                 p->cfg.fallback   ? STP_FAIL_UNREACHABLE
                 : p->cfg.starttls ? STP_FAIL_HOP_TLS
                                   : STP_FAIL_HOP_IDENTITY,
                 p->cfg.fallback ? why : "greeting was not 220");
            return false;
        }
        advance(p);
        return true;
    case STP_UP_EHLO:
        /* The first line is the server's name, not an extension. */
        if (code == 250 && !first && stp_ehlo_keyword_is(text, tl, "STARTTLS"))
            p->offers_starttls = true;
        if (code == 250 && !first && stp_ehlo_keyword_is(text, tl, "XCLIENT"))
            p->offers_xclient = true;
        if (code == 250 && !first && stp_ehlo_keyword_is(text, tl, "AUTH"))
            p->offers_auth |= auth_mechs(text, tl);
        if (!last)
            return true;
        /* A server that knows no EHLO (500, 502: RFC 821 only) offers no
         * STARTTLS either: opportunistic TLS goes on without it, and the
         * client's own EHLO then meets the same refusal. */
        if ((code == 500 || code == 502) && p->cfg.opportunistic &&
            !p->tls_done && !p->cfg.xclient && !p->cfg.auth) {
            p->plaintext = true;
            advance(p);
            return true;
        }
        if (code != 250) {
            fail(p,
                 p->cfg.starttls && !p->tls_done ? STP_FAIL_HOP_TLS
                 : p->cfg.auth                   ? STP_FAIL_HOP_AUTH
                                                 : STP_FAIL_HOP_IDENTITY,
                 "EHLO refused");
            return false;
        }
        if (p->cfg.starttls && !p->tls_done && !p->offers_starttls) {
            if (!p->cfg.opportunistic) {
                fail(p, STP_FAIL_HOP_TLS, "STARTTLS not offered");
                return false;
            }
            /* This EHLO reply stands: XCLIENT (if offered) or READY. */
            p->plaintext = true;
        } else if (p->cfg.starttls && !p->tls_done) {
            /* forgotten at the TLS boundary */
            p->offers_xclient = false;
            p->offers_auth = 0;
            send_line(p, STP_UP_STARTTLS, "STARTTLS", "");
            return true;
        }
        p->have_caps = true;
        if (p->cfg.xclient && !p->offers_xclient) {
            fail(p, STP_FAIL_HOP_IDENTITY, "XCLIENT not offered");
            return false;
        }
        advance(p);
        return true;
    case STP_UP_STARTTLS:
        if (!last)
            return true;
        if (code != 220) {
            fail(p, STP_FAIL_HOP_TLS, "STARTTLS refused");
            return false;
        }
        if (more_buffered) {
            /* Bytes after the 220 in the same flight would be read as
             * replies inside TLS (response injection): refuse. */
            fail(p, STP_FAIL_HOP_TLS, "data after 220 to STARTTLS");
            return false;
        }
        if (step_to(p, STP_UP_TLS))
            p->ops->start_tls(p->ctx);
        return false; /* the rest of the input belongs to TLS */
    case STP_UP_AUTH:
        if (!last)
            return true;
        return auth_reply(p, code, line, len);
    case STP_UP_XCLIENT:
        /* Postfix answers XCLIENT with a new greeting, for the client. */
        if (first && code == 220)
            p->greeting_len = 0;
        if (code == 220 && !keep_greeting(p, line, len))
            return false;
        if (!last)
            return true;
        if (code != 220) {
            fail(p, STP_FAIL_HOP_IDENTITY, "XCLIENT refused");
            return false;
        }
        if (step_to(p, STP_UP_READY))
            p->ops->ready(p->ctx, p->greeting, p->greeting_len);
        return false;
    case STP_UP_TLS:
    case STP_UP_READY:
    case STP_UP_FAILED:
    case STP_UP_COUNT:
        break;
    }
    fail(p, STP_FAIL_HOP_PROTOCOL, "unexpected reply");
    return false;
}

size_t stp_up_input(struct stp_prelude *p, const char *buf, size_t n)
{
    size_t off = 0;
    while (off < n && p->step != STP_UP_TLS && p->step != STP_UP_READY &&
           p->step != STP_UP_FAILED) {
        size_t len, used;
        enum stp_line_status st =
            stp_line_find(buf + off, n - off, STP_MAX_REPLY_LINE, &len, &used);
        if (st == STP_LINE_MORE)
            break;
        if (st == STP_LINE_TOO_LONG) {
            fail(p, STP_FAIL_HOP_PROTOCOL, "reply line too long");
            return n;
        }
        off += used;
        if (!reply_line(p, buf + off - used, len, off < n))
            break;
    }
    return off;
}

void stp_up_tls_done(struct stp_prelude *p)
{
    STP_ASSERT(p->step == STP_UP_TLS);
    p->tls_done = true;
    advance(p);
}
