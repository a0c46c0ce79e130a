/* The upstream leg of a session up to the moment the client can be relayed:
 * find an address that answers (names resolved per session, an address list
 * tried in order, failed entries skipped for a while), connect, say who the
 * client is (PROXY header first, or in-band through the protocol's prelude),
 * TLS (implicit, or STARTTLS spoken by the proxy), the proxy's own login. The
 * relay owns the connection and routes its events here while the leg is set
 * up; the hop reports back through stp_hop_ops. It knows no protocol: the
 * prelude is the engine's (proto.h). */
#ifndef STP_NEXTHOP_H
#define STP_NEXTHOP_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "config.h"
#include "io.h"
#include "proto.h"

struct addrinfo;
struct stp_lookup;
struct stp_addrs;

enum stp_hop_stage {
    STP_HOP_CONNECTING,
    STP_HOP_TLS,      /* TLS handshake with the upstream */
    STP_HOP_PRELUDE,  /* the proxy's own dialogue */
};

struct stp_hop_ops {
    /* The leg entered STAGE (the relay's state follows). */
    void (*stage)(void *ctx, enum stp_hop_stage stage);
    /* Set up: relaying starts. GREETING (N bytes) is the greeting the
     * prelude read, for the engine; NULL: it is still to come on the
     * connection. */
    void (*ready)(void *ctx, const char *greeting, size_t n);
    /* Setup failed (logged already): WHY for the engine's reply, REASON
     * for the disconnect line. */
    void (*fail)(void *ctx, enum stp_fail why, enum stp_close_reason reason);
    /* A new connection for FAMILY in the hop's conn, in place of (closing)
     * any earlier attempt's. */
    int (*connection)(void *ctx, int family);
};

struct stp_hop {
    uint64_t id;                        /* the session's, for log lines */
    const struct stp_upstream_cfg *up;
    struct stp_tls_ctx *tls;            /* NULL for tls = none */
    const struct stp_proto *proto;
    const char *hostname;
    struct stp_conn *conn;              /* the relay's */
    struct stp_conn *client;            /* its address and TLS, for PROXY */
    const struct sockaddr *client_addr;
    const struct sockaddr *client_dst;  /* what it reached, from a PROXY
                                           header; NULL: ask the socket */
    bool client_transparent;            /* came in on a transparent
                                           listener */
    uv_loop_t *loop;                    /* for name lookups */
    const struct stp_server *srv;       /* its listeners: never a hop */
    uint64_t *down_until;               /* per entry of up->addrs: skipped
                                           until then (ms, monotonic);
                                           shared by the workers */
    const struct sockaddr_storage *dst; /* where it connects: stp_hop_resolve */
    struct sockaddr_storage *own_dst;   /* an original destination's, or the
                                           address being tried: owned */
    uint8_t order[STP_MAX_HOP_ADDRS];   /* entries, in the order tried */
    int n_order, next;                  /* ... and the next one's place */
    int entry;                          /* the one being tried, -1: none */
    struct stp_lookup *lookup;          /* the name lookup it waits for */
    struct stp_hop *next_waiter;        /* ... with these other hops */
    struct stp_addrs *addrs;            /* a name's addresses (shared) */
    struct addrinfo *ai_next;           /* ... the next to try */
    char *token;                        /* xoauth2: read for this session */
    enum stp_close_reason last_reason;  /* of the last failed attempt */
    int attempts;
    bool fallback;                      /* another address is left */
    bool retry;                         /* the prelude found this address
                                           unusable: try the next */
    bool spoke;                         /* the prelude took upstream bytes */
    const struct stp_hop_ops *ops;
    void *ctx;
    void *prelude;                      /* only while the prelude runs */
    bool tls_pending;                   /* the prelude asked for TLS */
    bool tls_done;
    bool prelude_ready;
    bool failed;                        /* reported: nothing more to do */
    enum stp_hop_stage stage;
};

/* Find where H connects and connect there (the relay's connection op makes
 * each attempt's conn): the original destination of the client's connection
 * (never one of SRV's listeners), or the upstream's addresses in turn. Any
 * failure is reported through the ops. */
struct stp_server;
void stp_hop_start(struct stp_hop *h, const struct stp_server *srv);
/* An event of H->conn while the leg is set up. */
void stp_hop_event(struct stp_hop *h, enum stp_io_event ev, int err);
/* Setup failed for WHY (one of the STP_FAIL_HOP_*): log it, report it. */
void stp_hop_fail(struct stp_hop *h, enum stp_fail why, const char *detail);
/* The setup deadline passed; GREETING: only the greeting was missing. */
void stp_hop_timeout(struct stp_hop *h, bool greeting);
/* The session ends: nothing more is tried (a lookup is left behind). */
void stp_hop_cancel(struct stp_hop *h);
void stp_hop_free(struct stp_hop *h);

#endif
