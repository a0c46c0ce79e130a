/* The proxy's own SMTP dialogue with the upstream (RFC 3207 as a client,
 * XCLIENT), before any client byte is relayed. A failure at any step ends
 * the session: never a silent fall back to plaintext. The one plaintext
 * path is tls = opportunistic with no STARTTLS in the EHLO reply; once
 * STARTTLS is offered, a refusal or a broken handshake is a failure, so
 * an attacker who breaks TLS gains nothing. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "smtp.h"
#include "prelude.h"

static const char *const step_names[STP_UP_COUNT] = {
    "greeting", "ehlo", "starttls", "tls", "xclient", "ready", "failed",
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
    [STP_UP_EHLO] = TO(STP_UP_STARTTLS) | TO(STP_UP_XCLIENT) | TO(STP_UP_READY),
    [STP_UP_STARTTLS] = TO(STP_UP_TLS),
    [STP_UP_TLS] = TO(STP_UP_EHLO) | TO(STP_UP_XCLIENT) | TO(STP_UP_READY),
    [STP_UP_XCLIENT] = TO(STP_UP_READY),
};

bool stp_up_step_may(enum stp_up_step from, enum stp_up_step to)
{
    return from < STP_UP_READY && to < STP_UP_COUNT &&
           (to == STP_UP_FAILED || (step_moves[from] & TO(to)));
}

static void fail(struct stp_prelude *p, enum stp_fail f,
                 const char *reason)
{
    if (p->step == STP_UP_FAILED)
        return; /* reported once */
    p->step = STP_UP_FAILED;
    p->ops->fail(p->ctx, f, reason);
}

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
    if (line != small)
        free(line);
}

static const char *hello_verb(const struct stp_prelude *p)
{
    return p->cfg.lmtp ? "LHLO " : "EHLO ";
}

/* Next step after the greeting or the handshake. */
static void advance(struct stp_prelude *p)
{
    if (p->cfg.starttls && !p->tls_done && !p->plaintext) {
        send_line(p, STP_UP_EHLO, hello_verb(p), p->cfg.ehlo_name);
    } else if (p->cfg.xclient && !p->offers_xclient) {
        /* After TLS the server's capabilities must be learnt again. */
        send_line(p, STP_UP_EHLO, hello_verb(p), p->cfg.ehlo_name);
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
            /* The upstream refuses service: nothing can be set up. */
            fail(p, p->cfg.starttls ? STP_FAIL_HOP_TLS : STP_FAIL_HOP_IDENTITY,
                 "greeting was not 220");
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
        if (!last)
            return true;
        /* A server that knows no EHLO (500, 502: RFC 821 only) offers no
         * STARTTLS either: opportunistic TLS goes on without it, and the
         * client's own EHLO then meets the same refusal. */
        if ((code == 500 || code == 502) && p->cfg.opportunistic &&
            !p->tls_done && !p->cfg.xclient) {
            p->plaintext = true;
            advance(p);
            return true;
        }
        if (code != 250) {
            fail(p,
                 p->cfg.starttls && !p->tls_done ? STP_FAIL_HOP_TLS
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
            p->offers_xclient = false; /* forgotten at the TLS boundary */
            send_line(p, STP_UP_STARTTLS, "STARTTLS", "");
            return true;
        }
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
