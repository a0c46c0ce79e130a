/* The server: listening sockets, the configuration generation new sessions
 * use, connection limits, reload and shutdown. */
#ifndef STP_LISTENER_H
#define STP_LISTENER_H

#include <stdbool.h>
#include <uv.h>

#include "config.h"
#include "tls.h"

#include <pthread.h>

struct stp_session;
struct stp_tally;

/* A configuration with its TLS contexts. Sessions hold a reference, so a
 * reload never changes what an open session runs on. Shared by the workers:
 * the count is atomic, the rest read-only. */
struct stp_gen {
    unsigned refs;
    struct stp_config cfg;
    struct stp_tls_ctx **lst_tls; /* per listener; NULL for tls = none */
    struct stp_tls_ctx **up_tls;  /* per upstream; NULL for tls = none */
};

/* Sessions per key (a client address, a listening address): a hash table
 * whose entries exist while their count is above 0. */
struct stp_tallies {
    struct stp_tally **table;
    unsigned buckets; /* a power of 2 */
};

/* What the workers share: the counts behind the connection limits. Taken
 * once when a session starts and once when it ends, never on the data path.
 * They outlive configuration generations: a limit counts the sessions open,
 * whichever configuration they started on. */
struct stp_shared {
    pthread_mutex_t mu;
    unsigned n_sessions;               /* all workers */
    struct stp_tallies per_ip;         /* by client address */
    struct stp_tallies per_listener;   /* by listening address */
    uint64_t next_id;                  /* session ids */
};

/* Counts seen by one session as it starts. */
struct stp_counts {
    uint64_t id;
    unsigned total, listener, per_ip;
};

/* A bound socket. Kept across reloads while its address stays; closed ones
 * are kept until the server is freed (sessions may still point at them). */
struct stp_listener {
    uv_tcp_t tcp;
    struct stp_server *srv;
    int idx;                 /* its [listener] in srv->gen->cfg; -1: closed */
    char addr[64];
    struct stp_listener *next;
};

/* One worker's event loop with its own listening sockets (SO_REUSEPORT
 * when there are several workers) and sessions. */
struct stp_server {
    uv_loop_t *loop;
    int worker;                      /* number, for logs */
    bool reuseport;
    struct stp_shared *shared;
    struct stp_gen *gen;             /* for new sessions */
    struct stp_listener *listeners;  /* all ever bound */
    struct stp_session *sessions;    /* doubly linked */
    unsigned n_sessions;             /* this worker's */
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

int stp_shared_init(struct stp_shared *sh);
void stp_shared_free(struct stp_shared *sh);
/* Count a session in (+1) or out (-1) of the limits' tallies. */
void stp_shared_count(struct stp_shared *sh, struct stp_gen *g, int lst,
                      const struct sockaddr_storage *peer, int delta,
                      struct stp_counts *out);

/* Bind the generation's listeners on LOOP (not yet running). Errors are
 * logged. */
int stp_server_start(struct stp_server *srv, uv_loop_t *loop,
                     struct stp_gen *gen, struct stp_shared *shared,
                     int worker, bool reuseport);
/* Before a reload: can every address NEW adds to OLD be bound? ERR gets
 * "FILE:LINE: ..." for the first that cannot. */
int stp_gen_check_bind(const struct stp_gen *new, const struct stp_gen *old,
                       bool reuseport, char *err, size_t errlen);
/* SIGHUP: switch new sessions to GEN (the server takes a reference): its
 * listeners are bound first; if one cannot be, nothing changes. */
int stp_server_adopt(struct stp_server *srv, struct stp_gen *gen);
/* Stop accepting; sessions end at their next command boundary, all of them
 * after the drain timeout or at once with FORCE. */
void stp_server_stop(struct stp_server *srv, bool force);
void stp_server_free(struct stp_server *srv);
/* A session ended: when stopping and none are left, call on_empty. */
void stp_server_check_empty(struct stp_server *srv);

#endif
