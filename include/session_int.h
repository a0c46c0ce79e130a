/* Session internals shared by session.c (the client side, the engine, the
 * lifetime) and upstream.c (connecting and preparing the upstream leg). */
#ifndef STP_SESSION_INT_H
#define STP_SESSION_INT_H

#include <inttypes.h>

#include "io.h"
#include "log.h"
#include "prelude.h"
#include "session.h"
#include "smtp.h"

#define SESSION_MAGIC 0x53545053u /* "STPS" */

enum stp_sstate {
    STP_SS_NEW = 0,        /* accepted, nothing started */
    STP_SS_TLS_ACCEPT,     /* implicit TLS: handshake before anything else */
    STP_SS_CONNECTING,     /* connecting upstream; the client waits */
    STP_SS_UPSTREAM_TLS,   /* TLS handshake with the upstream */
    STP_SS_PRELUDE,        /* our own EHLO/STARTTLS/XCLIENT with the upstream */
    STP_SS_RELAY,          /* both sides open, the engine runs */
    STP_SS_STARTTLS,       /* 220 queued; the handshake starts once flushed */
    STP_SS_HANDSHAKE,      /* STARTTLS handshake with the client */
    STP_SS_DRAINING,       /* final reply being flushed, then close */
    STP_SS_CLOSED,         /* handles closing; freed in the last callback */
    STP_SS_COUNT
};

struct stp_session {
    uint32_t magic;
    enum stp_sstate state;
    uint64_t id;
    struct stp_server *srv;
    struct stp_listener *lst;             /* the socket it came in on */
    struct stp_gen *gen;                  /* its configuration, referenced */
    const struct stp_listener_cfg *lcfg;
    struct stp_tls_ctx *ltls;             /* NULL for tls = none */
    const struct stp_upstream_cfg *up;
    struct stp_tls_ctx *up_tls;           /* NULL for tls = none */
    struct stp_conn *client;   /* from accept until finish */
    struct stp_conn *upstream; /* from connecting until closed; else NULL */
    uv_timer_t timer;
    struct stp_smtp smtp;
    struct stp_prelude *prelude; /* only while the prelude runs */
    bool up_tls_pending;         /* the prelude asked for TLS */
    int open_handles;
    bool upstream_closed;
    uint64_t upstream_in, upstream_out; /* its byte counts, kept at close */
    bool client_eof;             /* the client half-closed: reads no more */
    int client_err, upstream_err; /* a write failed inside the engine */
    enum stp_close_reason reason; /* first cause wins: stp_session_reason */
    uint64_t start_ms;
    /* Deadlines are computed from these (milliseconds of uv_now). */
    uint64_t state_ms;         /* entering the current state */
    uint64_t setup_ms;         /* starting to connect upstream */
    uint64_t client_seen_ms;   /* last byte from the client */
    uint64_t upstream_seen_ms; /* last upstream reply, or when one became due */
    uint64_t line_ms;          /* first byte of a partial command line; 0 */
    uint64_t content_ms;       /* start of the message being received; 0 */
    bool shutting_down;        /* 421 at the next command boundary */
    bool counted;              /* in the shared tallies */
    struct sockaddr_storage peer_addr;
    char peer[64];
    struct stp_session *prev, *next;
};

#define SID "id=%016" PRIx64

void stp_session_transition(struct stp_session *s, enum stp_sstate to);
void stp_session_reason(struct stp_session *s, enum stp_close_reason r);
void stp_session_settle(struct stp_session *s);
void stp_session_close_upstream(struct stp_session *s);
/* The upstream conn for FAMILY, counted among the session's handles. */
int stp_session_new_upstream(struct stp_session *s, int family);

/* upstream.c */
void stp_upstream_start(struct stp_session *s);
void stp_upstream_event(struct stp_conn *c, enum stp_io_event ev, int err);
/* Setup failed in a way the log has already explained: 421, close. */
void stp_upstream_fail(struct stp_session *s, enum stp_up_failure f,
                       const char *reason);
void stp_upstream_timeout(struct stp_session *s);
void stp_upstream_free(struct stp_session *s);

#endif
