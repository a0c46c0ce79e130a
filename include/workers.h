/* Worker threads: one event loop each, with its own listening sockets
 * (SO_REUSEPORT) and sessions; the main thread only handles signals. */
#ifndef STP_WORKERS_H
#define STP_WORKERS_H

#include <pthread.h>
#include <uv.h>

#include "listener.h"

struct stp_worker;

struct stp_workers {
    struct stp_worker *w;
    int n;
    struct stp_shared shared;
    uv_async_t done;             /* on the main loop: a worker finished */
    void (*on_all_done)(struct stp_workers *ws);
};

/* Create N workers and bind their listeners (nothing runs yet, so this can
 * happen before privileges are dropped). */
int stp_workers_init(struct stp_workers *ws, uv_loop_t *main_loop,
                     struct stp_gen *gen, int n);
int stp_workers_run(struct stp_workers *ws);
/* Hand every worker the new generation (each takes its own reference). */
void stp_workers_reload(struct stp_workers *ws, struct stp_gen *gen);
void stp_workers_stop(struct stp_workers *ws, bool force);
unsigned stp_workers_sessions(struct stp_workers *ws);
/* After the main loop ended: join and free. */
void stp_workers_free(struct stp_workers *ws);

#endif
