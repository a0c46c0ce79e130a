/* The relay's state table and deadlines (relay_state.h). */
#include "relay_state.h"

static const char *const sstate_names[STP_SS_COUNT] = {
    [STP_SS_NEW] = "new",           [STP_SS_PROXY_HEADER] = "proxy_header",
    [STP_SS_TLS_ACCEPT] = "tls_accept",
    [STP_SS_CONNECTING] = "connecting", [STP_SS_UPSTREAM_TLS] = "upstream_tls",
    [STP_SS_PRELUDE] = "prelude",   [STP_SS_RELAY] = "relay",
    [STP_SS_STARTTLS] = "starttls", [STP_SS_HANDSHAKE] = "handshake",
    [STP_SS_DRAINING] = "draining", [STP_SS_CLOSED] = "closed",
};

const char *stp_sstate_name(enum stp_sstate s)
{
    return s < STP_SS_COUNT ? sstate_names[s] : "?";
}

#define TO(st) (1u << (st))
#define ENDS (TO(STP_SS_DRAINING) | TO(STP_SS_CLOSED))
static const unsigned legal_moves[STP_SS_COUNT] = {
    [STP_SS_NEW] = TO(STP_SS_PROXY_HEADER) | TO(STP_SS_TLS_ACCEPT) |
                   TO(STP_SS_CONNECTING) | ENDS,
    [STP_SS_PROXY_HEADER] = TO(STP_SS_TLS_ACCEPT) | TO(STP_SS_CONNECTING) |
                            ENDS,
    [STP_SS_TLS_ACCEPT] = TO(STP_SS_CONNECTING) | ENDS,
    /* Back to CONNECTING: the next address, when one gave no service. */
    [STP_SS_CONNECTING] = TO(STP_SS_CONNECTING) | TO(STP_SS_UPSTREAM_TLS) |
                          TO(STP_SS_PRELUDE) | TO(STP_SS_RELAY) | ENDS,
    [STP_SS_UPSTREAM_TLS] = TO(STP_SS_CONNECTING) | TO(STP_SS_PRELUDE) |
                            TO(STP_SS_RELAY) | ENDS,
    [STP_SS_PRELUDE] = TO(STP_SS_CONNECTING) | TO(STP_SS_UPSTREAM_TLS) |
                       TO(STP_SS_RELAY) | ENDS,
    [STP_SS_RELAY] = TO(STP_SS_STARTTLS) | ENDS,
    [STP_SS_STARTTLS] = TO(STP_SS_HANDSHAKE) | ENDS,
    [STP_SS_HANDSHAKE] = TO(STP_SS_RELAY) | ENDS,
    [STP_SS_DRAINING] = TO(STP_SS_CLOSED),
    [STP_SS_CLOSED] = 0,
};

bool stp_sstate_may(enum stp_sstate from, enum stp_sstate to)
{
    return from < STP_SS_COUNT && to < STP_SS_COUNT &&
           (legal_moves[from] & TO(to));
}

bool stp_sstate_reads_client(enum stp_sstate st)
{
    return st == STP_SS_RELAY || st == STP_SS_HANDSHAKE ||
           st == STP_SS_TLS_ACCEPT || st == STP_SS_PROXY_HEADER;
}

bool stp_sstate_reads_upstream(enum stp_sstate st)
{
    return st == STP_SS_RELAY || stp_sstate_setting_up(st);
}

bool stp_sstate_setting_up(enum stp_sstate st)
{
    return st == STP_SS_CONNECTING || st == STP_SS_UPSTREAM_TLS ||
           st == STP_SS_PRELUDE;
}

enum stp_stop stp_sstate_stop(enum stp_sstate st, bool idle, bool force)
{
    switch (st) {
    case STP_SS_NEW:
    case STP_SS_PROXY_HEADER: /* not one byte before a valid header */
    case STP_SS_TLS_ACCEPT:
    case STP_SS_HANDSHAKE:
        return STP_STOP_CLOSE;
    case STP_SS_RELAY:
        return idle || force ? STP_STOP_GOODBYE : STP_STOP_LATER;
    case STP_SS_CONNECTING:
    case STP_SS_UPSTREAM_TLS:
    case STP_SS_PRELUDE:
    case STP_SS_STARTTLS:
        return STP_STOP_GOODBYE;
    case STP_SS_DRAINING:
    case STP_SS_CLOSED:
    case STP_SS_COUNT:
        break;
    }
    return STP_STOP_NONE;
}

const char *stp_deadline_name(enum stp_deadline d)
{
    static const char *const names[] = {
        "none", "handshake", "setup", "reply", "idle", "command", "data",
        "drain", "proxy_header",
    };
    return d <= STP_DL_PROXY_HEADER ? names[d] : "?";
}

/* RFC 5321 4.5.3.2 values by default: every wait is bounded. */
enum stp_deadline stp_deadline_next(enum stp_sstate st,
                                    const struct stp_proto_status *engine,
                                    const struct stp_clock *c,
                                    const struct stp_timeouts *t,
                                    uint64_t *at)
{
    enum stp_deadline which = STP_DL_NONE;
    *at = UINT64_MAX;
#define CONSIDER(d, when)                                                      \
    do {                                                                       \
        uint64_t w_ = (when);                                                  \
        if (w_ < *at) {                                                        \
            *at = w_;                                                          \
            which = (d);                                                       \
        }                                                                      \
    } while (0)
    switch (st) {
    case STP_SS_PROXY_HEADER:
        CONSIDER(STP_DL_PROXY_HEADER, c->state_ms + t->proxy_header);
        break;
    case STP_SS_TLS_ACCEPT:
    case STP_SS_HANDSHAKE:
        CONSIDER(STP_DL_HANDSHAKE, c->state_ms + t->handshake);
        break;
    case STP_SS_CONNECTING:
    case STP_SS_UPSTREAM_TLS:
    case STP_SS_PRELUDE:
        CONSIDER(STP_DL_SETUP, c->setup_ms + t->setup);
        break;
    case STP_SS_RELAY:
    case STP_SS_STARTTLS:
        /* The greeting is part of reaching the upstream. */
        if (engine->greeting) {
            CONSIDER(STP_DL_SETUP, c->setup_ms + t->setup);
            break;
        }
        /* While replies are due, the wait is the upstream's, not the
         * client's idleness. */
        if (engine->replies_due)
            CONSIDER(STP_DL_REPLY, c->upstream_seen_ms + t->reply);
        else
            CONSIDER(STP_DL_IDLE, c->client_seen_ms + t->idle);
        if (c->line_ms)
            CONSIDER(STP_DL_COMMAND, c->line_ms + t->command);
        if (c->content_ms)
            CONSIDER(STP_DL_DATA, c->content_ms + t->data);
        break;
    case STP_SS_DRAINING:
        CONSIDER(STP_DL_DRAIN, c->state_ms + t->drain);
        break;
    case STP_SS_NEW: /* only while accepting */
    case STP_SS_CLOSED:
    case STP_SS_COUNT:
        break;
    }
#undef CONSIDER
    return which;
}

void stp_clock_track(struct stp_clock *c, const struct stp_proto_status *st,
                     uint64_t now)
{
    if (!st->partial)
        c->line_ms = 0;
    else if (!c->line_ms)
        c->line_ms = now;
    if (!st->content)
        c->content_ms = 0;
    else if (!c->content_ms)
        c->content_ms = now;
}
