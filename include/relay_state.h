/* A relayed session's states, the moves between them, and the deadline that
 * bounds each: pure, so the relay and the unit tests share them. */
#ifndef STP_RELAY_STATE_H
#define STP_RELAY_STATE_H

#include <stdbool.h>
#include <stdint.h>

#include "proto.h"

enum stp_sstate {
    STP_SS_NEW = 0,        /* accepted, nothing started */
    STP_SS_PROXY_HEADER,   /* a load balancer's PROXY header is read;
                              nothing is sent before it is complete */
    STP_SS_TLS_ACCEPT,     /* implicit TLS: handshake before anything else */
    STP_SS_CONNECTING,     /* connecting upstream; the client waits */
    STP_SS_UPSTREAM_TLS,   /* TLS handshake with the upstream */
    STP_SS_PRELUDE,        /* the engine's own dialogue with the upstream */
    STP_SS_RELAY,          /* both sides open, the engine runs */
    STP_SS_STARTTLS,       /* the reply to STARTTLS queued; the handshake
                              starts once it is flushed */
    STP_SS_HANDSHAKE,      /* STARTTLS handshake with the client */
    STP_SS_DRAINING,       /* final reply being flushed, then close */
    STP_SS_CLOSED,         /* handles closing; freed in the last callback */
    STP_SS_COUNT
};

const char *stp_sstate_name(enum stp_sstate s);
/* Does the table allow FROM -> TO? Every state may end until it has;
 * CLOSED is final. */
bool stp_sstate_may(enum stp_sstate from, enum stp_sstate to);

/* Which side a session in ST may read (before back-pressure): the client
 * only for its PROXY header, or while it is relayed or in a handshake, so
 * no client byte arrives before the upstream is set up; the upstream while
 * it is set up or relayed. */
bool stp_sstate_reads_client(enum stp_sstate st);
bool stp_sstate_reads_upstream(enum stp_sstate st);
/* Is the upstream leg being set up (its events go to the hop)? */
bool stp_sstate_setting_up(enum stp_sstate st);

/* What a shutdown does to a session in ST: nothing (it is ending), close
 * at once (no channel for a reply: before or inside a TLS handshake), or
 * the engine's goodbye, now or (not IDLE, not FORCE) at its next
 * boundary. */
enum stp_stop { STP_STOP_NONE, STP_STOP_CLOSE, STP_STOP_GOODBYE,
                STP_STOP_LATER };
enum stp_stop stp_sstate_stop(enum stp_sstate st, bool idle, bool force);

enum stp_deadline {
    STP_DL_NONE, STP_DL_HANDSHAKE, STP_DL_SETUP, STP_DL_REPLY, STP_DL_IDLE,
    STP_DL_COMMAND, STP_DL_DATA, STP_DL_DRAIN, STP_DL_PROXY_HEADER,
};
const char *stp_deadline_name(enum stp_deadline d);

/* When things happened, in milliseconds of the loop's clock. */
struct stp_clock {
    uint64_t state_ms;         /* entering the current state */
    uint64_t setup_ms;         /* starting to connect upstream */
    uint64_t client_seen_ms;   /* last byte from the client */
    uint64_t upstream_seen_ms; /* last upstream reply, or when one was due */
    uint64_t line_ms;          /* first byte of a partial command; 0 */
    uint64_t content_ms;       /* start of the message being received; 0 */
};

struct stp_timeouts {
    uint64_t handshake, setup, reply, idle, command, data, drain;
    uint64_t proxy_header;
};

/* The deadline that comes first in state ST (ENGINE: the engine's status,
 * read only in RELAY and STARTTLS), and when (*AT). */
enum stp_deadline stp_deadline_next(enum stp_sstate st,
                                    const struct stp_proto_status *engine,
                                    const struct stp_clock *c,
                                    const struct stp_timeouts *t,
                                    uint64_t *at);

/* After the engine ran at NOW: note when a command line or a message
 * began, or that none is under way. */
void stp_clock_track(struct stp_clock *c, const struct stp_proto_status *st,
                     uint64_t now);

#endif
