/* Worker threads: one event loop each, accepting on its own duplicates of
 * the listening sockets, with its sessions; the main thread owns the
 * sockets and handles signals. */
#ifndef STP_WORKERS_H
#define STP_WORKERS_H

#include <pthread.h>
#include <uv.h>

#include "listener.h"
#include "metrics.h"
#include "upgrade.h"

struct stp_admin;

struct stp_worker;

struct stp_workers {
    struct stp_worker *w;
    int n;
    struct stp_shared shared;
    struct stp_sockets sockets;  /* the main thread's, one per address */
    struct stp_gen *gen;         /* the generation last handed out */
    uv_async_t done;             /* on the main loop: a worker finished */
    void (*on_all_done)(struct stp_workers *ws);
    struct stp_metrics metrics;  /* each worker's counters */
    struct stp_admin *admin;     /* [admin]: on the main loop, or NULL */
    bool draining;               /* stopped accepting: /readyz says 503 */
    uint64_t reloads_ok, reloads_failed; /* SIGHUPs (main.c counts) */
};

/* Bind the listeners (and the [admin] endpoints) and create N workers
 * listening on them (nothing runs yet, so this can happen before privileges
 * are dropped). INHERITED (or NULL), sockets another process bound (an
 * upgrade), is taken over: those GEN has are not bound again, the others
 * are closed. ERR gets
 * "FILE:LINE: message", e.g. for an address another process holds. */
int stp_workers_init(struct stp_workers *ws, uv_loop_t *main_loop,
                     struct stp_gen *gen, int n, struct stp_sockets *inherited,
                     char *err, size_t errlen);
int stp_workers_run(struct stp_workers *ws);
/* Bind what GEN adds, then hand every worker GEN (each takes its own
 * reference) with its sockets; the addresses GEN dropped are closed. On
 * error nothing changes and ERR says why. */
int stp_workers_reload(struct stp_workers *ws, struct stp_gen *gen,
                       char *err, size_t errlen);
/* Stop listening at once (the sockets close); the workers drain. */
void stp_workers_stop(struct stp_workers *ws, bool force);
/* An upgrade succeeded: stop accepting, sessions end by themselves. */
void stp_workers_handover(struct stp_workers *ws);
/* SIGUSR2: start our binary again and hand it the listening sockets and
 * [admin]'s (upgrade.h). */
int stp_workers_upgrade(struct stp_workers *ws, uv_loop_t *loop,
                        stp_upgrade_done done);
unsigned stp_workers_sessions(struct stp_workers *ws);
/* After the main loop ended: join and free. */
void stp_workers_free(struct stp_workers *ws);

#endif
