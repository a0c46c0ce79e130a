/* The server: configuration generations with their TLS contexts, listening
 * sockets, per-address connection counts, reload and shutdown. */
#include <string.h>
#include <unistd.h>
#include <sys/random.h>

#include "listener.h"
#include "log.h"
#include "session.h"
#include "stp.h"

/* ---- generations ------------------------------------------------------------ */

static void gen_free(struct stp_gen *g)
{
    for (int i = 0; g->lst_tls && i < g->cfg.n_listeners; i++)
        stp_tls_ctx_free(g->lst_tls[i]);
    for (int i = 0; g->up_tls && i < g->cfg.n_upstreams; i++)
        stp_tls_ctx_free(g->up_tls[i]);
    free(g->lst_tls);
    free(g->up_tls);
    free(g->lst_sessions);
    stp_config_free(&g->cfg);
    free(g);
}

void stp_gen_ref(struct stp_gen *g)
{
    __atomic_add_fetch(&g->refs, 1, __ATOMIC_RELAXED);
}

void stp_gen_unref(struct stp_gen *g)
{
    if (g && __atomic_sub_fetch(&g->refs, 1, __ATOMIC_ACQ_REL) == 0)
        gen_free(g);
}

/* The line of the setting a TLS error is about; the section's when that
 * setting is a default. */
static int tls_err_line(const struct stp_tls_err *e,
                        const struct stp_tls_lines *l,
                        const struct stp_sni_cfg *sni, int section)
{
    int line = e->sni >= 0 ? sni[e->sni].line
               : e->at == STP_TLS_SET_CERT        ? l->cert
               : e->at == STP_TLS_SET_KEY         ? l->key
               : e->at == STP_TLS_SET_CA          ? l->ca
               : e->at == STP_TLS_SET_CIPHERS     ? l->ciphers
               : e->at == STP_TLS_SET_GROUPS      ? l->groups
               : e->at == STP_TLS_SET_MIN_VERSION ? l->min_version
               : e->at == STP_TLS_SET_MAX_VERSION ? l->max_version
                                                  : 0;
    return line > 0 ? line : section;
}

static int gen_tls(struct stp_gen *g, char *err, size_t errlen)
{
    const struct stp_config *cfg = &g->cfg;
    struct stp_tls_err e;
    for (int i = 0; i < cfg->n_listeners; i++) {
        const struct stp_listener_cfg *lc = &cfg->listeners[i];
        struct stp_tls_server_opts o = {
            .cert = lc->cert, .key = lc->key, .cn = cfg->hostname,
            .params = &lc->tlsp, .sni = lc->sni, .n_sni = lc->n_sni,
            .client_ca = lc->client_ca, .verify_client = lc->verify_client,
        };
        if (lc->tls == STP_TLS_NONE)
            continue;
        if (stp_tls_ctx_new_server(&o, &g->lst_tls[i], &e) < 0) {
            snprintf(err, errlen, "%s:%d: listener '%s': %s", cfg->path,
                     tls_err_line(&e, &lc->tls_lines, lc->sni, lc->line),
                     lc->name, e.msg);
            return -EINVAL;
        }
        if (!lc->cert)
            stp_log(STP_LOG_WARN,
                    "event=self_signed listener=%s cn=%s msg=\"no cert/key "
                    "configured: using an in-memory SELF-SIGNED certificate "
                    "that no client can verify; set cert = and key = for "
                    "production\"",
                    lc->name, cfg->hostname);
    }
    for (int i = 0; i < cfg->n_upstreams; i++) {
        const struct stp_upstream_cfg *u = &cfg->upstreams[i];
        struct stp_tls_client_opts o = {
            .params = &u->tlsp, .verify = u->verify, .ca_file = u->ca_file,
            .cert = u->cert, .key = u->key,
        };
        if (u->tls == STP_TLS_NONE)
            continue;
        if (stp_tls_ctx_new_client(&o, &g->up_tls[i], &e) < 0) {
            snprintf(err, errlen, "%s:%d: upstream '%s': %s", cfg->path,
                     tls_err_line(&e, &u->tls_lines, NULL, u->line), u->name,
                     e.msg);
            return -EINVAL;
        }
        if (!u->verify)
            stp_log(STP_LOG_WARN,
                    "event=no_verify upstream=%s msg=\"verify = no: the "
                    "upstream's certificate is not checked; anyone on the "
                    "path can read and change the mail\"",
                    u->name);
    }
    return 0;
}

int stp_gen_new(const char *path, struct stp_gen **out, char *err,
                size_t errlen)
{
    struct stp_gen *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    g->refs = 1;
    int r = stp_config_load(path, &g->cfg, err, errlen);
    if (r < 0) {
        free(g);
        return r;
    }
    g->lst_tls = calloc((size_t)g->cfg.n_listeners + 1, sizeof(*g->lst_tls));
    g->up_tls = calloc((size_t)g->cfg.n_upstreams + 1, sizeof(*g->up_tls));
    g->lst_sessions = calloc((size_t)g->cfg.n_listeners + 1,
                             sizeof(*g->lst_sessions));
    if (!g->lst_tls || !g->up_tls || !g->lst_sessions)
        r = -ENOMEM;
    if (r == 0)
        r = gen_tls(g, err, errlen);
    if (r < 0) {
        gen_free(g);
        return r;
    }
    *out = g;
    return 0;
}

/* ---- client addresses ------------------------------------------------------- */

struct stp_ipcount {
    struct stp_ipcount *next;
    unsigned count;
    uint8_t len;
    uint8_t addr[16];
};

static size_t ip_key(const struct sockaddr_storage *ss, const uint8_t **p)
{
    if (ss->ss_family == AF_INET) {
        *p = (const uint8_t *)&((const struct sockaddr_in *)ss)->sin_addr;
        return 4;
    }
    *p = (const uint8_t *)&((const struct sockaddr_in6 *)ss)->sin6_addr;
    return 16;
}

/* Sessions from the address in SS, after adding DELTA (under sh->mu). */
static unsigned ip_add(struct stp_shared *sh, const struct sockaddr_storage *ss,
                       int delta)
{
    const uint8_t *k;
    size_t len = ip_key(ss, &k);
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ k[i]) * 16777619u;
    struct stp_ipcount **pp = &sh->ip_table[h & (sh->ip_buckets - 1)];
    for (; *pp; pp = &(*pp)->next) {
        struct stp_ipcount *e = *pp;
        if (e->len != len || memcmp(e->addr, k, len) != 0)
            continue;
        e->count += (unsigned)delta;
        unsigned n = e->count;
        if (n == 0) {
            *pp = e->next;
            free(e);
        }
        return n;
    }
    if (delta <= 0)
        return 0;
    struct stp_ipcount *e = calloc(1, sizeof(*e));
    if (!e)
        return 0; /* unaccounted rather than refused */
    e->len = (uint8_t)len;
    memcpy(e->addr, k, len);
    e->count = (unsigned)delta;
    e->next = *pp;
    *pp = e;
    return e->count;
}

int stp_shared_init(struct stp_shared *sh)
{
    memset(sh, 0, sizeof(*sh));
    sh->ip_buckets = 4096;
    if (!(sh->ip_table = calloc(sh->ip_buckets, sizeof(*sh->ip_table))))
        return -ENOMEM;
    if (getrandom(&sh->next_id, sizeof(sh->next_id), 0) < 0)
        sh->next_id = uv_hrtime();
    pthread_mutex_init(&sh->mu, NULL);
    return 0;
}

void stp_shared_free(struct stp_shared *sh)
{
    for (unsigned i = 0; sh->ip_table && i < sh->ip_buckets; i++) {
        while (sh->ip_table[i]) {
            struct stp_ipcount *e = sh->ip_table[i];
            sh->ip_table[i] = e->next;
            free(e);
        }
    }
    free(sh->ip_table);
    pthread_mutex_destroy(&sh->mu);
}

void stp_shared_count(struct stp_shared *sh, struct stp_gen *g, int lst,
                      const struct sockaddr_storage *peer, int delta,
                      struct stp_counts *out)
{
    pthread_mutex_lock(&sh->mu);
    sh->n_sessions += (unsigned)delta;
    g->lst_sessions[lst] += (unsigned)delta;
    unsigned per_ip = peer && peer->ss_family ? ip_add(sh, peer, delta) : 0;
    if (out) {
        out->id = ++sh->next_id;
        out->total = sh->n_sessions;
        out->listener = g->lst_sessions[lst];
        out->per_ip = per_ip;
    }
    pthread_mutex_unlock(&sh->mu);
}

/* ---- listening sockets ------------------------------------------------------ */

static void on_connection(uv_stream_t *server, int status)
{
    struct stp_listener *lst = server->data;
    if (status < 0) {
        /* libuv already shed the connection when out of descriptors. */
        stp_log(STP_LOG_WARN, "event=accept_error addr=%s error=\"%s\"",
                lst->addr, uv_strerror(status));
        return;
    }
    int r = stp_session_accept(lst);
    if (r < 0)
        stp_log(STP_LOG_WARN, "event=accept_error addr=%s error=\"%s\"",
                lst->addr, stp_strerror(r));
}

static void listener_closed(uv_handle_t *h) { (void)h; }

static void listener_close(struct stp_listener *l)
{
    if (l->idx < 0)
        return;
    l->idx = -1;
    uv_close((uv_handle_t *)&l->tcp, listener_closed);
}

static struct stp_listener *listener_open(struct stp_server *srv,
                                          const struct stp_listener_cfg *lc,
                                          int idx)
{
    struct stp_listener *l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    l->srv = srv;
    l->idx = idx;
    stp_format_addr((const struct sockaddr *)&lc->addr, l->addr,
                    sizeof(l->addr));
    int r = uv_tcp_init_ex(srv->loop, &l->tcp, lc->addr.ss_family);
    l->tcp.data = l;
    if (r == 0 && srv->reuseport) {
        /* Each worker has its own socket; the kernel spreads connections. */
        uv_os_fd_t fd;
        int one = 1;
        if (uv_fileno((uv_handle_t *)&l->tcp, &fd) == 0 &&
            setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0)
            r = -errno;
    }
    if (r == 0)
        r = uv_tcp_bind(&l->tcp, (const struct sockaddr *)&lc->addr, 0);
    if (r == 0) /* accepted sockets inherit it: no system call per session */
        r = uv_tcp_nodelay(&l->tcp, 1);
    if (r == 0)
        r = uv_listen((uv_stream_t *)&l->tcp, 511, on_connection);
    if (r < 0) {
        stp_log(STP_LOG_ERROR,
                "event=listen_error listener=%s addr=%s error=\"%s\"",
                lc->name, l->addr, uv_strerror(r));
        if (!uv_is_closing((uv_handle_t *)&l->tcp))
            uv_close((uv_handle_t *)&l->tcp, listener_closed);
        l->idx = -1;
    }
    l->next = srv->listeners;
    srv->listeners = l; /* kept even when closed: freed with the server */
    return r < 0 ? NULL : l;
}

static void log_listening(const struct stp_listener *l,
                          const struct stp_listener_cfg *lc)
{
    static const char *const modes[] = {"none", "starttls", "implicit"};
    stp_log(STP_LOG_INFO,
            "event=listening worker=%d listener=%s addr=%s tls=%s "
            "require_tls=%s upstream=%s",
            l->srv->worker, lc->name, l->addr, modes[lc->tls],
            lc->require_tls ? "yes" : "no", lc->upstream->address_text);
}

static bool same_addr(const struct sockaddr_storage *a,
                      const struct sockaddr_storage *b)
{
    size_t len = a->ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                         : sizeof(struct sockaddr_in6);
    return a->ss_family == b->ss_family && memcmp(a, b, len) == 0;
}

int stp_gen_check_bind(const struct stp_gen *new, const struct stp_gen *old,
                       bool reuseport, char *err, size_t errlen)
{
    for (int i = 0; i < new->cfg.n_listeners; i++) {
        const struct stp_listener_cfg *lc = &new->cfg.listeners[i];
        bool kept = false;
        for (int j = 0; j < old->cfg.n_listeners && !kept; j++)
            kept = same_addr(&lc->addr, &old->cfg.listeners[j].addr);
        if (kept)
            continue;
        int fd = socket(lc->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1, e = fd < 0 ? errno : 0;
        if (!e && (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one,
                              sizeof(one)) < 0 ||
                   (reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one,
                                            sizeof(one)) < 0) ||
                   bind(fd, (const struct sockaddr *)&lc->addr,
                        sizeof(lc->addr)) < 0))
            e = errno;
        if (fd >= 0)
            close(fd);
        if (e) {
            snprintf(err, errlen, "%s:%d: listener '%s': cannot listen on %s: %s",
                     new->cfg.path, lc->line, lc->name, lc->listen_text,
                     strerror(e));
            return -e;
        }
    }
    return 0;
}

int stp_server_start(struct stp_server *srv, uv_loop_t *loop,
                     struct stp_gen *gen, struct stp_shared *shared,
                     int worker, bool reuseport)
{
    memset(srv, 0, sizeof(*srv));
    srv->loop = loop;
    srv->gen = gen;
    srv->shared = shared;
    srv->worker = worker;
    srv->reuseport = reuseport;
    stp_gen_ref(gen);
    uv_timer_init(loop, &srv->drain_timer);
    srv->drain_timer.data = srv;
    for (int i = 0; i < gen->cfg.n_listeners; i++) {
        const struct stp_listener_cfg *lc = &gen->cfg.listeners[i];
        struct stp_listener *l = listener_open(srv, lc, i);
        if (!l)
            return -EADDRNOTAVAIL;
        log_listening(l, lc);
    }
    return 0;
}

int stp_server_adopt(struct stp_server *srv, struct stp_gen *g)
{
    if (srv->stopping)
        return -ESHUTDOWN;
    const struct stp_config *c = &g->cfg;
    struct stp_listener **map = calloc((size_t)c->n_listeners + 1,
                                       sizeof(*map));
    bool *fresh = calloc((size_t)c->n_listeners + 1, sizeof(*fresh));
    int r = map && fresh ? 0 : -ENOMEM;
    /* Keep the sockets whose address stays; bind the new ones first, so a
     * failure leaves the running configuration untouched. */
    for (int i = 0; r == 0 && i < c->n_listeners; i++) {
        for (struct stp_listener *l = srv->listeners; l; l = l->next)
            if (l->idx >= 0 &&
                same_addr(&srv->gen->cfg.listeners[l->idx].addr,
                          &c->listeners[i].addr))
                map[i] = l;
        if (!map[i]) {
            fresh[i] = true;
            if (!(map[i] = listener_open(srv, &c->listeners[i], i)))
                r = -EADDRNOTAVAIL;
        }
    }
    if (r < 0) {
        for (int i = 0; map && fresh && i < c->n_listeners; i++)
            if (fresh[i] && map[i])
                listener_close(map[i]);
        stp_log(STP_LOG_ERROR,
                "event=reload status=failed worker=%d error=\"cannot listen "
                "on every address\"",
                srv->worker);
        free(map);
        free(fresh);
        return r;
    }
    for (struct stp_listener *l = srv->listeners; l; l = l->next) {
        bool kept = false;
        for (int i = 0; i < c->n_listeners; i++)
            kept |= map[i] == l;
        if (!kept)
            listener_close(l);
    }
    for (int i = 0; i < c->n_listeners; i++) {
        map[i]->idx = i;
        log_listening(map[i], &c->listeners[i]);
    }
    free(map);
    free(fresh);
    stp_gen_ref(g);
    stp_gen_unref(srv->gen);
    srv->gen = g;
    return 0;
}

/* ---- stopping --------------------------------------------------------------- */

static void on_drain_timeout(uv_timer_t *t)
{
    struct stp_server *srv = t->data;
    stp_log(STP_LOG_INFO, "event=drain_timeout sessions=%u", srv->n_sessions);
    stp_sessions_shutdown(srv, true);
}

void stp_server_stop(struct stp_server *srv, bool force)
{
    if (!srv->stopping) {
        srv->stopping = true;
        for (struct stp_listener *l = srv->listeners; l; l = l->next)
            listener_close(l);
        uv_timer_start(&srv->drain_timer, on_drain_timeout,
                       srv->gen->cfg.drain_timeout_ms, 0);
    }
    stp_sessions_shutdown(srv, force);
    stp_server_check_empty(srv);
}

void stp_server_check_empty(struct stp_server *srv)
{
    if (!srv->stopping || srv->n_sessions > 0)
        return;
    if (!uv_is_closing((uv_handle_t *)&srv->drain_timer))
        uv_close((uv_handle_t *)&srv->drain_timer, NULL);
    if (srv->on_empty)
        srv->on_empty(srv);
}

void stp_server_free(struct stp_server *srv)
{
    while (srv->listeners) {
        struct stp_listener *l = srv->listeners;
        srv->listeners = l->next;
        free(l);
    }
    stp_gen_unref(srv->gen);
    srv->gen = NULL;
}
