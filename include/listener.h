/* The server: listening sockets, the configuration generation new sessions
 * use, connection limits, reload and shutdown. */
#ifndef STP_LISTENER_H
#define STP_LISTENER_H

#include <stdbool.h>
#include <uv.h>

#include "config.h"
#include "tls.h"

struct stp_session;
struct stp_ipcount;

/* A configuration with its TLS contexts. Sessions hold a reference, so a
 * reload never changes what an open session runs on. */
struct stp_gen {
    unsigned refs;
    struct stp_config cfg;
    struct stp_tls_ctx **lst_tls; /* per listener; NULL for tls = none */
    struct stp_tls_ctx **up_tls;  /* per upstream; NULL for tls = none */
};

/* A bound socket. Kept across reloads while its address stays; closed ones
 * are kept until the server is freed (sessions may still point at them). */
struct stp_listener {
    uv_tcp_t tcp;
    struct stp_server *srv;
    int idx;                 /* its [listener] in srv->gen->cfg; -1: closed */
    unsigned n_sessions;
    char addr[64];
    struct stp_listener *next;
};

struct stp_server {
    uv_loop_t *loop;
    struct stp_gen *gen;             /* for new sessions */
    struct stp_listener *listeners;  /* all ever bound */
    struct stp_session *sessions;    /* doubly linked */
    unsigned n_sessions;
    struct stp_ipcount **ip_table;   /* sessions per client address */
    unsigned ip_buckets;
    bool stopping;
    uv_timer_t drain_timer;
    void (*on_empty)(struct stp_server *srv); /* stopping, last session gone */
};

/* Load and check everything a configuration needs, bind nothing: also the
 * -t check. On error ERR holds "FILE:LINE: message". */
int stp_gen_new(const char *path, struct stp_gen **out, char *err,
                size_t errlen);
void stp_gen_ref(struct stp_gen *g);
void stp_gen_unref(struct stp_gen *g);

/* Bind the generation's listeners and start accepting. Errors are printed. */
int stp_server_start(struct stp_server *srv, uv_loop_t *loop,
                     struct stp_gen *gen);
/* SIGHUP: a new generation from PATH. A bad file, or an address that cannot
 * be bound, leaves everything as it was. Logged either way. */
int stp_server_reload(struct stp_server *srv, const char *path);
/* Stop accepting; sessions end at their next command boundary, all of them
 * after the drain timeout or at once with FORCE. */
void stp_server_stop(struct stp_server *srv, bool force);
void stp_server_free(struct stp_server *srv);
/* A session ended: when stopping and none are left, call on_empty. */
void stp_server_check_empty(struct stp_server *srv);

/* Connection accounting for the limits, by client address. */
unsigned stp_server_ip_add(struct stp_server *srv,
                           const struct sockaddr_storage *ss, int delta);

#endif
