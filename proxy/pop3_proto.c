/* The POP3 engine behind the relay's seam (proto.h). The upstream leg has
 * no prelude: POP3's STLS and identity commands are not spoken to the next
 * hop (the configuration refuses tls = starttls, opportunistic, xclient and
 * auth for a pop3 listener's upstream), so its greeting reaches the engine
 * directly; PROXY headers and implicit TLS are the hop's, as for SMTP. */

#include "pop3.h"

static void init(void *e, const struct stp_proto_cfg *cfg,
                 const struct stp_proto_actions *act, void *ctx)
{
    stp_pop3_init(e, cfg, act, ctx);
}

static void engine_free(void *e) { (void)e; }

static size_t client_input(void *e, const char *p, size_t n)
{
    return stp_pop3_client_input(e, p, n);
}

static long upstream_input(void *e, const char *p, size_t n)
{
    return stp_pop3_upstream_input(e, p, n);
}

static void tls_started(void *e) { stp_pop3_tls_started(e); }

static void fail(void *e, enum stp_fail why) { stp_pop3_fail(e, why); }

static void status(const void *e, struct stp_proto_status *st)
{
    stp_pop3_status(e, st);
}

static enum stp_eof_verdict client_eof(const void *e, size_t buffered)
{
    return stp_pop3_client_eof(e, buffered);
}

static void summary(const void *e, char *buf, size_t cap)
{
    stp_pop3_summary(e, buf, cap);
}

const struct stp_proto stp_proto_pop3 = {
    .name = "pop3",
    .size = sizeof(struct stp_pop3),
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
