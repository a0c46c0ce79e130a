/* The relay's side of the protocol seam: which engine a listener runs, and
 * the loop that offers buffered input to it. */
#include <errno.h>
#include <stdio.h>

#include "config.h"
#include "imap.h"
#include "pop3.h"
#include "proto.h"
#include "smtp.h"
#include "stp.h"

const struct stp_proto *stp_proto_of(enum stp_protocol p)
{
    if (p == STP_PROTO_IMAP)
        return &stp_proto_imap;
    if (p == STP_PROTO_POP3)
        return &stp_proto_pop3;
    return p == STP_PROTO_LMTP ? &stp_proto_lmtp : &stp_proto_smtp;
}

int stp_proto_no_prelude(const struct stp_prelude_cfg *cfg,
                         const struct stp_up_ops *ops, void *ctx, void **out)
{
    (void)ops;
    (void)ctx;
    *out = NULL;
    return cfg->starttls || cfg->identity || cfg->auth ? -EINVAL : 0;
}

/* Never called: there is never a prelude to feed, finish or free. */
size_t stp_proto_no_prelude_input(void *pre, const char *p, size_t n)
{
    (void)pre;
    (void)p;
    (void)n;
    return 0;
}

void stp_proto_no_prelude_tls_done(void *pre)
{
    (void)pre;
}

void stp_proto_illegal_move(const struct stp_proto_actions *ops, void *ctx,
                            const char *from, const char *to)
{
    char d[96];
    snprintf(d, sizeof(d), "msg=\"illegal phase move\" from=%s to=%s", from,
             to);
    if (ops->event)
        ops->event(ctx, "bug", d);
#ifndef NDEBUG
    STP_ASSERT(!"illegal phase move");
#endif
}

/* An engine takes what it can and leaves the rest: a partial line, input
 * behind a reply it waits for, content the upstream has no room for. So the
 * loop offers both sides again until neither moves; replies first, as they
 * are what lets a stalled client go on. */
long stp_proto_feed(const struct stp_proto *p, void *e,
                    const struct stp_feed_io *io, void *ctx)
{
    long total = 0;
    for (;;) {
        bool moved = false;
        size_t n;
        const char *in = io->input(ctx, STP_SIDE_UPSTREAM, &n);
        if (in && n) {
            long k = p->upstream_input(e, in, n);
            if (k < 0)
                return k;
            if (k > 0) {
                io->consume(ctx, STP_SIDE_UPSTREAM, (size_t)k);
                total += k;
                moved = true;
            }
        }
        in = io->input(ctx, STP_SIDE_CLIENT, &n);
        if (in && n) {
            size_t k = p->client_input(e, in, n);
            if (k > 0) {
                io->consume(ctx, STP_SIDE_CLIENT, k);
                total += (long)k;
                moved = true;
            }
            if (k < n && io->make_room && io->make_room(ctx))
                moved = true;
        }
        if (!moved)
            return total;
    }
}
