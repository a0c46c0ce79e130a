/* The SMTP engine and its prelude behind the relay's seam (proto.h). LMTP is
 * the same engine with cfg.lmtp: LHLO on both legs, a reply per recipient
 * after the message. */
#include <stdlib.h>
#include <string.h>

#include "identity.h"
#include "prelude.h"
#include "smtp.h"

static void init(void *e, const struct stp_proto_cfg *cfg,
                 const struct stp_proto_actions *act, void *ctx, bool lmtp)
{
    struct stp_smtp_cfg c = {
        .offer_starttls = cfg->offer_starttls,
        .require_tls = cfg->require_tls,
        .tls_active = cfg->tls_active,
        .upstream_tls = cfg->upstream_tls,
        .upstream_auth = cfg->upstream_auth,
        .lmtp = lmtp,
        .max_line = cfg->max_line,
        .max_errors = cfg->max_errors,
        .hostname = cfg->hostname,
    };
    stp_smtp_init(e, &c, act, ctx);
}

static void init_smtp(void *e, const struct stp_proto_cfg *cfg,
                      const struct stp_proto_actions *act, void *ctx)
{
    init(e, cfg, act, ctx, false);
}

static void init_lmtp(void *e, const struct stp_proto_cfg *cfg,
                      const struct stp_proto_actions *act, void *ctx)
{
    init(e, cfg, act, ctx, true);
}

static void engine_free(void *e) { stp_smtp_free(e); }

static size_t client_input(void *e, const char *p, size_t n)
{
    return stp_smtp_client_input(e, p, n);
}

static long upstream_input(void *e, const char *p, size_t n)
{
    return stp_smtp_upstream_input(e, p, n);
}

static void tls_started(void *e) { stp_smtp_tls_started(e); }

static void fail(void *e, enum stp_fail why) { stp_smtp_fail(e, why); }

/* REQUIRETLS is offered and passed only over an encrypted upstream leg. */
static void upstream_leg(void *e, bool tls)
{
    struct stp_smtp *s = e;
    s->cfg.upstream_tls = tls;
}

static void status(const void *e, struct stp_proto_status *st)
{
    const struct stp_smtp *s = e;
    st->greeting = s->phase == STP_PH_GREETING;
    st->replies_due = stp_smtp_replies_due(s);
    st->partial = stp_smtp_partial_line(s);
    st->content = stp_smtp_in_content(s);
    st->idle = stp_smtp_idle(s);
}

/* What the client sent before its last byte is still handled and answered,
 * as a server would; once nothing more can come of it, the session ends. A
 * message it did not finish must not complete upstream. */
static enum stp_eof_verdict client_eof(const void *e, size_t buffered)
{
    const struct stp_smtp *s = e;
    if (s->phase == STP_PH_CLOSED)
        return STP_EOF_WAIT; /* closing already */
    if (buffered > 0 &&
        (s->waiting || stp_smtp_replies_due(s) ||
         (s->ops->upstream_full && s->ops->upstream_full(s->ctx))))
        return STP_EOF_WAIT; /* buffered commands or content still to go */
    if (stp_smtp_in_content(s)) {
        /* This message can never complete, but what came before it is
         * still answered (a BDAT LAST that delivered the previous one):
         * all replies but the unfinished chunk's own, then the cut. */
        unsigned owed = s->pend_count;
        if (s->phase == STP_PH_CHUNK && owed > 0)
            owed--;
        return owed == 0 ? STP_EOF_CUT : STP_EOF_WAIT;
    }
    /* Waiting for the greeting only: nothing the client asked for. */
    if (!stp_smtp_replies_due(s) || s->phase == STP_PH_GREETING)
        return STP_EOF_CLOSE;
    return STP_EOF_WAIT;
}

static void summary(const void *e, char *buf, size_t cap)
{
    stp_smtp_summary(e, buf, cap);
}

/* ---- the prelude ------------------------------------------------------------ */

static int prelude_new(const struct stp_prelude_cfg *cfg,
                       const struct stp_up_ops *ops, void *ctx, void **out,
                       bool lmtp)
{
    *out = NULL;
    if (!cfg->starttls && !cfg->identity && !cfg->fallback && !cfg->auth)
        return 0; /* the engine reads the greeting itself */
    char xclient[256];
    size_t xl = 0;
    /* Never carry on without the identity the upstream relies on. */
    if (cfg->identity) {
        if (!cfg->client ||
            stp_xclient_line(xclient, sizeof(xclient), cfg->client) < 0)
            return -EINVAL;
        xl = strlen(xclient) + 1;
    }
    /* The XCLIENT line lives right after the prelude, as long as it. */
    struct stp_prelude *p = malloc(sizeof(*p) + xl);
    if (!p)
        return -ENOMEM;
    struct stp_up_cfg pc = {
        .starttls = cfg->starttls,
        .opportunistic = cfg->opportunistic,
        .ehlo_name = cfg->hostname,
        .lmtp = lmtp,
        .xclient = xl ? memcpy((char *)(p + 1), xclient, xl) : NULL,
        .fallback = cfg->fallback,
        .auth = cfg->auth,
        .user = cfg->user,
        .secret = cfg->secret,
    };
    stp_up_init(p, &pc, ops, ctx);
    *out = p;
    return 0;
}

static int prelude_smtp(const struct stp_prelude_cfg *cfg,
                        const struct stp_up_ops *ops, void *ctx, void **out)
{
    return prelude_new(cfg, ops, ctx, out, false);
}

static int prelude_lmtp(const struct stp_prelude_cfg *cfg,
                        const struct stp_up_ops *ops, void *ctx, void **out)
{
    return prelude_new(cfg, ops, ctx, out, true);
}

static size_t prelude_input(void *pre, const char *p, size_t n)
{
    return stp_up_input(pre, p, n);
}

static void prelude_tls_done(void *pre) { stp_up_tls_done(pre); }

static void prelude_free(void *pre) { free(pre); }

#define SMTP_FAMILY                                                            \
    .size = sizeof(struct stp_smtp), .free = engine_free,                      \
    .client_input = client_input, .upstream_input = upstream_input,            \
    .tls_started = tls_started, .fail = fail, .upstream_leg = upstream_leg,    \
    .status = status, .client_eof = client_eof, .summary = summary,            \
    .prelude_input = prelude_input,                                            \
    .prelude_tls_done = prelude_tls_done, .prelude_free = prelude_free

const struct stp_proto stp_proto_smtp = {
    .name = "smtp", .init = init_smtp, .prelude_new = prelude_smtp,
    SMTP_FAMILY,
};

const struct stp_proto stp_proto_lmtp = {
    .name = "lmtp", .init = init_lmtp, .prelude_new = prelude_lmtp,
    SMTP_FAMILY,
};
