/* The server: listening sockets, the configuration generation new sessions
 * use, connection limits, reload and shutdown. */
#ifndef STP_LISTENER_H
#define STP_LISTENER_H

#include <stdbool.h>
#include <uv.h>

#include "close.h"
#include "config.h"
#include "tls.h"

#include <pthread.h>

struct stp_session;
struct stp_ticket_keys;
struct stp_tally;
struct stp_mx;

/* A configuration with its TLS contexts. Sessions hold a reference, so a
 * reload never changes what an open session runs on. Shared by the workers:
 * the count is atomic, the rest read-only. */
struct stp_gen {
    unsigned refs;
    struct stp_config cfg;
    struct stp_tls_ctx **lst_tls; /* per listener; NULL for tls = none */
    struct stp_tls_ctx **up_tls;  /* per upstream; NULL for tls = none */
    struct stp_ticket_keys *ticket_keys; /* ticket_keys = FILE as read for
                                            this generation (a reload reads
                                            it again), or NULL */
    uint64_t **up_down;           /* per upstream, per address entry: when
                                     a failed entry may be tried again
                                     (nexthop.c; atomics, all workers) */
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

/* The listening sockets, one per address, bound and listening in the main
 * thread. One socket per address means the kernel itself refuses the
 * address to a second process (no SO_REUSEPORT). Each worker accepts on its
 * own duplicate of the descriptor; when several loops wake for one
 * connection, the losers' accept() gets EAGAIN, which libuv ignores. */
struct stp_socket {
    struct sockaddr_storage addr;  /* as configured: HOST:0 stays port 0 */
    char *name;                    /* the listener it was bound for */
    int fd;
};

struct stp_sockets {
    struct stp_socket *v;
    int n;
};

/* Bind and listen on every address of G not yet in S, all or none (a
 * listener at HOST:0 keeps the socket bound for its name and address). ERR gets
 * "FILE:LINE: listener 'NAME': cannot listen on ADDR: reason". */
int stp_sockets_bind(struct stp_sockets *s, const struct stp_gen *g, char *err,
                     size_t errlen);
/* Close the sockets whose address G no longer has. */
void stp_sockets_keep_only(struct stp_sockets *s, const struct stp_gen *g);
/* A duplicate of the socket of each listener of G, in G's order, for one
 * worker: an array the worker owns (see stp_fds_free). NULL when out of
 * descriptors or memory. */
int *stp_sockets_dup(const struct stp_sockets *s, const struct stp_gen *g);
void stp_sockets_close(struct stp_sockets *s);
/* Close the N descriptors of FDS not taken (-1) and free the array. */
void stp_fds_free(int *fds, int n);

/* A worker's handle on a listening socket. Kept across reloads while its
 * address stays; closed ones are kept until the server is freed (sessions
 * may still point at them). */
struct stp_listener {
    uv_tcp_t tcp;
    uv_tcp_t spare;          /* takes a connection no session can have */
    bool spare_busy;         /* closing the last one it took */
    bool pending;            /* a connection waits for the spare */
    struct stp_server *srv;
    int idx;                 /* its [listener] in srv->gen->cfg; -1: closed */
    struct sockaddr_storage bound; /* the socket's own address: the port
                                    * the kernel picked for HOST:0 */
    char addr[64];                 /* BOUND, formatted */
    struct stp_listener *next;
};

/* One worker's event loop with its handles on the listening sockets and its
 * sessions. */
struct stp_server {
    uv_loop_t *loop;
    int worker;                      /* number, for logs */
    struct stp_shared *shared;
    struct stp_gen *gen;             /* for new sessions */
    struct stp_listener *listeners;  /* all ever bound */
    struct stp_session *sessions;    /* doubly linked */
    unsigned n_sessions;             /* this worker's */
    bool stopping;
    uv_timer_t drain_timer;
    void (*on_empty)(struct stp_server *srv); /* stopping, last session gone */
    struct stp_mx *metrics;          /* this worker's counters, or NULL */
};

/* Load and check everything a configuration needs, bind nothing: also the
 * -t check. On error ERR holds "FILE:LINE: message". */
int stp_gen_new(const char *path, struct stp_gen **out, char *err,
                size_t errlen);
void stp_gen_ref(struct stp_gen *g);
void stp_gen_unref(struct stp_gen *g);

int stp_shared_init(struct stp_shared *sh);
void stp_shared_free(struct stp_shared *sh);
/* Count a session on the listening socket bound to LST_ADDR, from PEER, in
 * (+1) or out (-1) of the limits' tallies. */
void stp_shared_count(struct stp_shared *sh,
                      const struct sockaddr_storage *lst_addr,
                      const struct sockaddr_storage *peer, int delta,
                      struct stp_counts *out);

/* Count a session from PEER in (+1) or out (-1) of the per-address tally
 * only: for a client whose address is known after it was counted in (a
 * PROXY header). Returns the count after DELTA (0 for no address). */
unsigned stp_shared_count_ip(struct stp_shared *sh,
                             const struct sockaddr_storage *peer, int delta);

/* Is a session just counted (N) over one of GEN's limits for listener LC?
 * The reason that names the limit, or STP_CLOSE_NONE. */
enum stp_close_reason stp_over_limit(const struct stp_gen *gen,
                                     const struct stp_listener_cfg *lc,
                                     const struct stp_counts *n);

/* Listen with the generation's sockets on LOOP (not yet running): FDS from
 * stp_sockets_dup, taken over. Errors are logged. */
int stp_server_start(struct stp_server *srv, uv_loop_t *loop,
                     struct stp_gen *gen, struct stp_shared *shared,
                     int worker, int *fds);
/* SIGHUP: switch new sessions to GEN (the server takes a reference) and FDS
 * (from stp_sockets_dup, taken over): sockets the main thread kept are kept,
 * new ones listened on first; if one cannot be, nothing changes. */
int stp_server_adopt(struct stp_server *srv, struct stp_gen *gen, int *fds);
/* Stop accepting; sessions end at their next command boundary, all of them
 * after the drain timeout or at once with FORCE. */
void stp_server_stop(struct stp_server *srv, bool force);
/* An upgrade: another process accepts on our sockets now. Stop accepting and
 * let the sessions end by themselves (a client just accepted is greeted and
 * served, not sent away with a 421); the drain timeout ends the rest. */
void stp_server_handover(struct stp_server *srv);
void stp_server_free(struct stp_server *srv);
/* A session ended: when stopping and none are left, call on_empty. */
void stp_server_check_empty(struct stp_server *srv);

#endif
