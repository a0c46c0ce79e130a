/* Listening sockets and the server that owns them and their sessions. */
#ifndef STP_LISTENER_H
#define STP_LISTENER_H

#include <stdbool.h>
#include <uv.h>

#include "config.h"
#include "tls.h"

struct stp_session;

struct stp_listener {
    uv_tcp_t tcp;
    const struct stp_listener_cfg *cfg;
    struct stp_tls_ctx *tls;          /* NULL for tls = none */
    struct stp_server *srv;
    char addr[64];
};

struct stp_server {
    uv_loop_t *loop;
    const struct stp_config *cfg;
    struct stp_listener *listeners;
    int n_listeners;
    struct stp_tls_ctx **up_tls;      /* per upstream; NULL for tls = none */
    struct stp_session *sessions;     /* doubly linked, for shutdown */
    unsigned n_sessions;
    bool stopping;
};

/* Build every TLS context the configuration names (listeners: certificates,
 * SNI, client CAs; upstreams: trust store, client certificate) without
 * binding anything: also the -t check. On error ERR says "FILE:LINE: ...". */
int stp_server_tls(struct stp_server *srv, const struct stp_config *cfg,
                   char *err, size_t errlen);
/* The TLS context of upstream U (NULL for tls = none). */
struct stp_tls_ctx *stp_server_upstream_tls(const struct stp_server *srv,
                                            const struct stp_upstream_cfg *u);

/* Build TLS contexts (self-signed where no cert is configured, with a
 * warning), bind and listen. Errors are logged; returns negative on failure. */
int stp_server_start(struct stp_server *srv, uv_loop_t *loop,
                     const struct stp_config *cfg);
/* Stop accepting and end every session with a 421. The loop then runs out. */
void stp_server_stop(struct stp_server *srv);
/* Free what stop left (after the loop has finished). */
void stp_server_free(struct stp_server *srv);

#endif
