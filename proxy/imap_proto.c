/* The IMAP engine behind the relay's seam (proto.h). It has no prelude:
 * the upstream's greeting reaches the engine, which decides what the client
 * sees of it. In-band STARTTLS, XCLIENT and AUTH towards the upstream are
 * SMTP's; configuration refuses them for an imap listener (config_keys.c). */

#include "imap.h"

static void init(void *e, const struct stp_proto_cfg *cfg,
                 const struct stp_proto_actions *act, void *ctx)
{
    stp_imap_init(e, cfg, act, ctx);
}

static void engine_free(void *e) { (void)e; }

static size_t client_input(void *e, const char *p, size_t n)
{
    return stp_imap_client_input(e, p, n);
}

static long upstream_input(void *e, const char *p, size_t n)
{
    return stp_imap_upstream_input(e, p, n);
}

static void tls_started(void *e) { stp_imap_tls_started(e); }

static void fail(void *e, enum stp_fail why) { stp_imap_fail(e, why); }

static void status(const void *e, struct stp_proto_status *st)
{
    stp_imap_status(e, st);
}

static enum stp_eof_verdict client_eof(const void *e, size_t buffered)
{
    return stp_imap_client_eof(e, buffered);
}

static void summary(const void *e, char *buf, size_t cap)
{
    stp_imap_summary(e, buf, cap);
}

const struct stp_proto stp_proto_imap = {
    .name = "imap",
    .size = sizeof(struct stp_imap),
    .init = init,
    .free = engine_free,
    .client_input = client_input,
    .upstream_input = upstream_input,
    .tls_started = tls_started,
    .fail = fail,
    .status = status,
    .client_eof = client_eof,
    .summary = summary,
    STP_PROTO_NO_PRELUDE,
};
