/* Worker threads. Each owns a loop, its handles on the listening sockets, its
 * sessions and its buffer pool; they share only the configuration generation
 * (read-only, atomic reference count) and the limits' tallies (one mutex,
 * taken when a session starts and ends). The main thread owns the listening
 * sockets and hands each worker duplicates of their descriptors. Commands
 * reach a worker through its uv_async. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "admin.h"
#include "io.h"
#include "log.h"
#include "workers.h"

enum { CMD_RELOAD = 1, CMD_STOP = 2, CMD_FORCE = 4, CMD_HANDOVER = 8 };

struct stp_worker {
    struct stp_workers *ws;
    int n;
    pthread_t thread;
    bool started;
    uv_loop_t loop;
    uv_async_t async;
    struct stp_server srv;
    pthread_mutex_t mu;          /* guards cmd, next_gen and next_fds */
    unsigned cmd;
    struct stp_gen *next_gen;
    int *next_fds;               /* its sockets, one per listener */
    bool done;
};

static void on_command(uv_async_t *a)
{
    struct stp_worker *w = a->data;
    pthread_mutex_lock(&w->mu);
    unsigned cmd = w->cmd;
    struct stp_gen *g = w->next_gen;
    int *fds = w->next_fds;
    w->cmd = 0;
    w->next_gen = NULL;
    w->next_fds = NULL;
    pthread_mutex_unlock(&w->mu);
    if (g) {
        stp_server_adopt(&w->srv, g, fds);
        stp_gen_unref(g);
    }
    if (cmd & (CMD_STOP | CMD_FORCE))
        stp_server_stop(&w->srv, cmd & CMD_FORCE);
    else if (cmd & CMD_HANDOVER)
        stp_server_handover(&w->srv);
}

/* The worker's last session ended while stopping: let its loop run out. */
static void on_empty(struct stp_server *srv)
{
    struct stp_worker *w = (struct stp_worker *)((char *)srv -
                                                 offsetof(struct stp_worker,
                                                          srv));
    if (!uv_is_closing((uv_handle_t *)&w->async))
        uv_close((uv_handle_t *)&w->async, NULL);
}

static void *worker_main(void *arg)
{
    struct stp_worker *w = arg;
    uv_run(&w->loop, UV_RUN_DEFAULT);
    stp_buf_pool_trim(); /* this thread's pool */
    pthread_mutex_lock(&w->mu);
    w->done = true;
    pthread_mutex_unlock(&w->mu);
    uv_async_send(&w->ws->done);
    return NULL;
}

static void on_worker_done(uv_async_t *a)
{
    struct stp_workers *ws = a->data;
    for (int i = 0; i < ws->n; i++) {
        pthread_mutex_lock(&ws->w[i].mu);
        bool done = ws->w[i].done;
        pthread_mutex_unlock(&ws->w[i].mu);
        if (!done)
            return;
    }
    uv_close((uv_handle_t *)&ws->done, NULL);
    stp_admin_close(ws->admin); /* the main loop may end now */
    ws->admin = NULL;
    if (ws->on_all_done)
        ws->on_all_done(ws);
}

/* The admin endpoints' view of the process. */
static bool admin_ready(void *ctx)
{
    struct stp_workers *ws = ctx;
    return !ws->draining;
}

static int admin_metrics(void *ctx, FILE *out)
{
    struct stp_workers *ws = ctx;
    struct stp_mx_process p = {
        .version = STP_VERSION, .draining = ws->draining, .workers = ws->n,
        .reloads_ok = ws->reloads_ok, .reloads_failed = ws->reloads_failed,
    };
    return stp_metrics_render(&ws->metrics, &p, out);
}

static const struct stp_admin_ops admin_ops = {admin_ready, admin_metrics};

/* An upgrade hands over [admin]'s socket with the listeners': out of S
 * (it is no listener's), its descriptor, or -1. */
static int take_admin_socket(struct stp_sockets *s)
{
    for (int i = 0; i < s->n; i++) {
        if (strcmp(s->v[i].name, STP_ADMIN_SOCKET_NAME) != 0)
            continue;
        int fd = s->v[i].fd;
        free(s->v[i].name);
        s->v[i] = s->v[--s->n];
        return fd;
    }
    return -1;
}

/* Bound with the listeners, before privileges are dropped; or taken over
 * from the process an upgrade replaces. */
static int admin_start(struct stp_workers *ws, uv_loop_t *loop,
                       const struct stp_config *c, char *err, size_t errlen)
{
    char why[128];
    int fd = take_admin_socket(&ws->sockets);
    if (!c->admin_listen) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    int r = stp_admin_start(&ws->admin, loop, &c->admin_addr, fd, &admin_ops,
                            ws, why, sizeof(why));
    if (r < 0)
        snprintf(err, errlen, "%s:%d: [admin]: cannot listen on %s: %s",
                 c->path, c->line_admin, c->admin_listen, why);
    return r;
}

int stp_workers_init(struct stp_workers *ws, uv_loop_t *main_loop,
                     struct stp_gen *gen, int n, struct stp_sockets *inherited,
                     char *err, size_t errlen)
{
    memset(ws, 0, sizeof(*ws));
    if (inherited) {
        ws->sockets = *inherited;
        *inherited = (struct stp_sockets){0};
    }
    if (stp_shared_init(&ws->shared) < 0 ||
        !(ws->w = calloc((size_t)n, sizeof(*ws->w)))) {
        snprintf(err, errlen, "%s:0: out of memory", gen->cfg.path);
        return -ENOMEM;
    }
    ws->gen = gen;
    stp_gen_ref(gen);
    if (stp_metrics_init(&ws->metrics, n) < 0) {
        snprintf(err, errlen, "%s:0: out of memory", gen->cfg.path);
        return -ENOMEM;
    }
    stp_metrics_map(&ws->metrics, &gen->cfg);
    int r = admin_start(ws, main_loop, &gen->cfg, err, errlen);
    if (r < 0 || (r = stp_sockets_bind(&ws->sockets, gen, err, errlen)) < 0)
        return r;
    stp_sockets_keep_only(&ws->sockets, gen); /* inherited, no longer used */
    ws->n = n;
    uv_async_init(main_loop, &ws->done, on_worker_done);
    ws->done.data = ws;
    for (int i = 0; i < n; i++) {
        struct stp_worker *w = &ws->w[i];
        w->ws = ws;
        w->n = i;
        pthread_mutex_init(&w->mu, NULL);
        int *fds = stp_sockets_dup(&ws->sockets, gen);
        if (!fds || uv_loop_init(&w->loop) < 0) {
            snprintf(err, errlen, "%s:0: worker %d: %s", gen->cfg.path, i,
                     fds ? "cannot make its event loop" : strerror(errno));
            stp_fds_free(fds, gen->cfg.n_listeners);
            return -ENOMEM;
        }
        uv_async_init(&w->loop, &w->async, on_command);
        w->async.data = w;
        r = stp_server_start(&w->srv, &w->loop, gen, &ws->shared, i, fds);
        w->srv.on_empty = on_empty;
        w->srv.metrics = &ws->metrics.w[i];
        if (r < 0) {
            snprintf(err, errlen, "%s:0: worker %d cannot listen (see the "
                     "log)", gen->cfg.path, i);
            return r;
        }
    }
    return 0;
}

int stp_workers_run(struct stp_workers *ws)
{
    for (int i = 0; i < ws->n; i++) {
        struct stp_worker *w = &ws->w[i];
        int r = pthread_create(&w->thread, NULL, worker_main, w);
        if (r != 0)
            return -r;
        w->started = true;
    }
    return 0;
}

/* The pending generation and its descriptors, if any, dropped. */
static void drop_next(struct stp_worker *w)
{
    if (w->next_gen)
        stp_fds_free(w->next_fds, w->next_gen->cfg.n_listeners);
    stp_gen_unref(w->next_gen);
    w->next_gen = NULL;
    w->next_fds = NULL;
}

/* CMD, and G with FDS (taken over): a generation not yet adopted is
 * replaced. */
static void post(struct stp_worker *w, unsigned cmd, struct stp_gen *g,
                 int *fds)
{
    pthread_mutex_lock(&w->mu);
    w->cmd |= cmd;
    if (g) {
        stp_gen_ref(g);
        drop_next(w);
        w->next_gen = g;
        w->next_fds = fds;
    }
    bool done = w->done;
    pthread_mutex_unlock(&w->mu);
    if (!done)
        uv_async_send(&w->async);
}

/* Every worker's duplicates of GEN's sockets, or NULL (errno says why). */
static int **dup_for_workers(struct stp_workers *ws, struct stp_gen *gen)
{
    int **fds = calloc((size_t)ws->n, sizeof(*fds));
    for (int i = 0; fds && i < ws->n; i++) {
        if ((fds[i] = stp_sockets_dup(&ws->sockets, gen)))
            continue;
        int e = errno;
        while (i-- > 0)
            stp_fds_free(fds[i], gen->cfg.n_listeners);
        free(fds);
        errno = e;
        return NULL;
    }
    return fds;
}

int stp_workers_reload(struct stp_workers *ws, struct stp_gen *gen,
                       char *err, size_t errlen)
{
    int r = stp_sockets_bind(&ws->sockets, gen, err, errlen);
    if (r < 0)
        return r;
    int **fds = dup_for_workers(ws, gen);
    if (!fds) {
        snprintf(err, errlen, "%s:0: cannot hand the listening sockets to "
                 "the workers: %s", gen->cfg.path, strerror(errno));
        /* Only what GEN bound goes: the running generation keeps its own. */
        stp_sockets_keep_only(&ws->sockets, ws->gen);
        return -ENOMEM;
    }
    const char *was = ws->gen->cfg.admin_listen, *now = gen->cfg.admin_listen;
    if ((was || now) && (!was || !now || strcmp(was, now) != 0))
        stp_log(STP_LOG_WARN, "event=reload msg=\"[admin] changes only on "
                              "restart\" admin=%s", was ? was : "none");
    /* Before any worker can see GEN. */
    stp_metrics_map(&ws->metrics, &gen->cfg);
    for (int i = 0; i < ws->n; i++)
        post(&ws->w[i], CMD_RELOAD, gen, fds[i]);
    free(fds);
    stp_sockets_keep_only(&ws->sockets, gen);
    stp_gen_ref(gen);
    stp_gen_unref(ws->gen);
    ws->gen = gen;
    return 0;
}

void stp_workers_stop(struct stp_workers *ws, bool force)
{
    /* Our descriptors too, or the kernel would keep completing connections
     * that no worker accepts any more. */
    stp_sockets_close(&ws->sockets);
    ws->draining = true;
    for (int i = 0; i < ws->n; i++)
        post(&ws->w[i], force ? CMD_FORCE : CMD_STOP, NULL, NULL);
}

void stp_workers_handover(struct stp_workers *ws)
{
    stp_sockets_close(&ws->sockets); /* the new process keeps them open */
    /* The new process answers /readyz now: ours would say 503. */
    stp_admin_close(ws->admin);
    ws->admin = NULL;
    for (int i = 0; i < ws->n; i++)
        post(&ws->w[i], CMD_HANDOVER, NULL, NULL);
}

int stp_workers_upgrade(struct stp_workers *ws, uv_loop_t *loop,
                        stp_upgrade_done done)
{
    /* The listeners' sockets, and [admin]'s under a name no listener has. */
    struct stp_sockets all = {
        calloc((size_t)ws->sockets.n + 1, sizeof(*all.v)), ws->sockets.n};
    if (!all.v)
        return -ENOMEM;
    memcpy(all.v, ws->sockets.v, (size_t)ws->sockets.n * sizeof(*all.v));
    struct sockaddr_storage addr;
    int fd = stp_admin_socket(ws->admin, &addr);
    if (fd >= 0)
        all.v[all.n++] = (struct stp_socket){addr, STP_ADMIN_SOCKET_NAME, fd};
    int r = stp_upgrade_start(loop, &all, done);
    free(all.v); /* the entries are ws's */
    return r;
}

unsigned stp_workers_sessions(struct stp_workers *ws)
{
    pthread_mutex_lock(&ws->shared.mu);
    unsigned n = ws->shared.n_sessions;
    pthread_mutex_unlock(&ws->shared.mu);
    return n;
}

void stp_workers_free(struct stp_workers *ws)
{
    for (int i = 0; i < ws->n; i++) {
        struct stp_worker *w = &ws->w[i];
        if (w->started)
            pthread_join(w->thread, NULL);
        uv_loop_close(&w->loop);
        stp_server_free(&w->srv);
        drop_next(w);
        pthread_mutex_destroy(&w->mu);
    }
    free(ws->w);
    stp_sockets_close(&ws->sockets);
    stp_gen_unref(ws->gen);
    stp_shared_free(&ws->shared);
    stp_metrics_free(&ws->metrics);
}
