/* The server: configuration generations with their TLS contexts, listening
 * sockets, per-address connection counts, reload and shutdown. */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/random.h>
#include <sys/socket.h>

#include "listener.h"
#include "log.h"
#include "relay.h"
#include "stp.h"
#include "ticket_keys.h"
#include "transparent.h"

/* ---- generations ------------------------------------------------------------ */

static void gen_free(struct stp_gen *g)
{
    for (int i = 0; g->lst_tls && i < g->cfg.n_listeners; i++)
        stp_tls_ctx_free(g->lst_tls[i]);
    for (int i = 0; g->up_tls && i < g->cfg.n_upstreams; i++)
        stp_tls_ctx_free(g->up_tls[i]);
    for (int i = 0; g->up_down && i < g->cfg.n_upstreams; i++)
        free(g->up_down[i]);
    free(g->lst_tls);
    free(g->up_tls);
    stp_ticket_keys_free(g->ticket_keys); /* after the contexts using it */
    free(g->up_down);
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

/* ticket_keys = FILE: a bad line is reported at its line in FILE. */
static int gen_ticket_keys(struct stp_gen *g, char *err, size_t errlen)
{
    const struct stp_config *cfg = &g->cfg;
    char why[384];
    if (!cfg->ticket_keys)
        return 0;
    int r = stp_ticket_keys_load(cfg->ticket_keys, &g->ticket_keys, why,
                                 sizeof(why));
    if (r == -EINVAL)
        snprintf(err, errlen, "%s", why);
    else if (r < 0)
        snprintf(err, errlen, "%s:%d: cannot read ticket_keys %s", cfg->path,
                 cfg->line_ticket_keys, why);
    return r;
}

static int gen_tls(struct stp_gen *g, char *err, size_t errlen)
{
    const struct stp_config *cfg = &g->cfg;
    struct stp_tls_err e;
    int r = gen_ticket_keys(g, err, errlen);
    if (r < 0)
        return r;
    for (int i = 0; i < cfg->n_listeners; i++) {
        const struct stp_listener_cfg *lc = &cfg->listeners[i];
        struct stp_tls_server_opts o = {
            .name = lc->name, .ticket_keys = g->ticket_keys,
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
    *out = NULL; /* a caller may unref whatever it got */
    struct stp_gen *g = calloc(1, sizeof(*g));
    if (!g)
        return -ENOMEM;
    g->refs = 1;
    int r = stp_config_load(path, &g->cfg, err, errlen);
    if (r < 0) {
        free(g);
        return r;
    }
    /* The lines about this configuration (its certificates, its
     * listeners) are already in its format. A reload that fails after
     * this point keeps the new format: every line is still whole. */
    stp_log_set_format(g->cfg.log_format);
    g->lst_tls = calloc((size_t)g->cfg.n_listeners + 1, sizeof(*g->lst_tls));
    g->up_tls = calloc((size_t)g->cfg.n_upstreams + 1, sizeof(*g->up_tls));
    g->up_down = calloc((size_t)g->cfg.n_upstreams + 1, sizeof(*g->up_down));
    for (int i = 0; g->up_down && i < g->cfg.n_upstreams; i++)
        if (!(g->up_down[i] = calloc((size_t)g->cfg.upstreams[i].n_addrs + 1,
                                     sizeof(**g->up_down))))
            r = -ENOMEM;
    if (!g->lst_tls || !g->up_tls || !g->up_down)
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

/* ---- tallies ---------------------------------------------------------------- */

struct stp_tally {
    struct stp_tally *next;
    unsigned count;
    uint8_t len;
    uint8_t key[20]; /* an IPv6 address, or a family, port and address */
};

/* A client address: its bytes. */
static size_t ip_key(const struct sockaddr_storage *ss, uint8_t *key)
{
    if (ss->ss_family == AF_INET) {
        memcpy(key, &((const struct sockaddr_in *)ss)->sin_addr, 4);
        return 4;
    }
    memcpy(key, &((const struct sockaddr_in6 *)ss)->sin6_addr, 16);
    return 16;
}

/* A listening socket's own address (two listeners at HOST:0 have two): the
 * listener's identity across reloads, as it is for its socket, so a renamed
 * listener keeps counting its sessions, and one removed and added again
 * finds those still open. */
static size_t listener_key(const struct sockaddr_storage *ss, uint8_t *key)
{
    uint16_t port = ss->ss_family == AF_INET
                        ? ((const struct sockaddr_in *)ss)->sin_port
                        : ((const struct sockaddr_in6 *)ss)->sin6_port;
    key[0] = ss->ss_family == AF_INET ? 4 : 6;
    memcpy(key + 1, &port, 2);
    return 3 + ip_key(ss, key + 3);
}

/* The count of KEY after adding DELTA (under sh->mu). */
static unsigned tally_add(struct stp_tallies *t, const uint8_t *k, size_t len,
                          int delta)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ k[i]) * 16777619u;
    struct stp_tally **pp = &t->table[h & (t->buckets - 1)];
    for (; *pp; pp = &(*pp)->next) {
        struct stp_tally *e = *pp;
        if (e->len != len || memcmp(e->key, k, len) != 0)
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
    struct stp_tally *e = calloc(1, sizeof(*e));
    if (!e)
        return 0; /* unaccounted rather than refused */
    e->len = (uint8_t)len;
    memcpy(e->key, k, len);
    e->count = (unsigned)delta;
    e->next = *pp;
    *pp = e;
    return e->count;
}

static int tallies_init(struct stp_tallies *t, unsigned buckets)
{
    t->buckets = buckets;
    t->table = calloc(buckets, sizeof(*t->table));
    return t->table ? 0 : -ENOMEM;
}

static void tallies_free(struct stp_tallies *t)
{
    for (unsigned i = 0; t->table && i < t->buckets; i++) {
        while (t->table[i]) {
            struct stp_tally *e = t->table[i];
            t->table[i] = e->next;
            free(e);
        }
    }
    free(t->table);
}

int stp_shared_init(struct stp_shared *sh)
{
    memset(sh, 0, sizeof(*sh));
    if (tallies_init(&sh->per_ip, 4096) < 0 ||
        tallies_init(&sh->per_listener, 64) < 0) {
        tallies_free(&sh->per_ip);
        return -ENOMEM;
    }
    if (getrandom(&sh->next_id, sizeof(sh->next_id), 0) < 0)
        sh->next_id = uv_hrtime();
    pthread_mutex_init(&sh->mu, NULL);
    return 0;
}

void stp_shared_free(struct stp_shared *sh)
{
    tallies_free(&sh->per_ip);
    tallies_free(&sh->per_listener);
    pthread_mutex_destroy(&sh->mu);
}

enum stp_close_reason stp_over_limit(const struct stp_gen *gen,
                                     const struct stp_listener_cfg *lc,
                                     const struct stp_counts *n)
{
    if (n->total > gen->cfg.max_connections)
        return STP_CLOSE_MAX_CONNECTIONS;
    if (n->listener > lc->max_connections)
        return STP_CLOSE_LISTENER_MAX_CONNECTIONS;
    if (n->per_ip > lc->max_connections_per_ip)
        return STP_CLOSE_MAX_CONNECTIONS_PER_IP;
    return STP_CLOSE_NONE;
}

void stp_shared_count(struct stp_shared *sh,
                      const struct sockaddr_storage *lst_addr,
                      const struct sockaddr_storage *peer, int delta,
                      struct stp_counts *out)
{
    uint8_t lkey[20], ikey[20];
    size_t llen = listener_key(lst_addr, lkey);
    size_t ilen = peer && peer->ss_family ? ip_key(peer, ikey) : 0;
    pthread_mutex_lock(&sh->mu);
    sh->n_sessions += (unsigned)delta;
    unsigned per_lst = tally_add(&sh->per_listener, lkey, llen, delta);
    unsigned per_ip = ilen ? tally_add(&sh->per_ip, ikey, ilen, delta) : 0;
    if (out) {
        out->id = ++sh->next_id;
        out->total = sh->n_sessions;
        out->listener = per_lst;
        out->per_ip = per_ip;
    }
    pthread_mutex_unlock(&sh->mu);
}

unsigned stp_shared_count_ip(struct stp_shared *sh,
                             const struct sockaddr_storage *peer, int delta)
{
    uint8_t ikey[20];
    if (!peer->ss_family)
        return 0;
    size_t ilen = ip_key(peer, ikey);
    pthread_mutex_lock(&sh->mu);
    unsigned n = tally_add(&sh->per_ip, ikey, ilen, delta);
    pthread_mutex_unlock(&sh->mu);
    return n;
}

/* ---- listening sockets: one per address, the main thread's ------------------ */

/* Whether S is LC's socket: the one bound for its configured address, so that
 * HOST:0 stays on the port the kernel gave it across reloads. Several
 * listeners may ask for HOST:0, each for a socket of its own: there the
 * listener's name tells them apart. */
static bool socket_is(const struct stp_socket *s,
                      const struct stp_listener_cfg *lc)
{
    return stp_same_addr(&s->addr, &lc->addr) &&
           (stp_addr_port(&lc->addr) != 0 || strcmp(s->name, lc->name) == 0);
}

static int socket_find(const struct stp_sockets *s,
                       const struct stp_listener_cfg *lc)
{
    for (int i = 0; i < s->n; i++)
        if (socket_is(&s->v[i], lc))
            return i;
    return -1;
}

static void socket_close(struct stp_socket *s)
{
    close(s->fd);
    free(s->name);
}

/* A listening socket on SS, or -errno. Set up as libuv's bind would: the
 * address reusable at once after a restart (not shared: that would be
 * SO_REUSEPORT), [::] taking IPv4 too. TCP_NODELAY is inherited by accepted
 * sockets (Linux copies it): no system call per session. */
static int socket_listen(const struct sockaddr_storage *ss, bool transparent)
{
    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                    0);
    if (fd < 0)
        return -errno;
    int one = 1, zero = 0;
    socklen_t len = ss->ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                             : sizeof(struct sockaddr_in6);
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        (ss->ss_family == AF_INET6 &&
         setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) < 0) ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0 ||
        (transparent && stp_tp_listen_opt(fd, ss->ss_family) < 0) ||
        bind(fd, (const struct sockaddr *)ss, len) < 0 || listen(fd, 511) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    return fd;
}

int stp_sockets_bind(struct stp_sockets *s, const struct stp_gen *g, char *err,
                     size_t errlen)
{
    const struct stp_config *c = &g->cfg;
    struct stp_socket *v = realloc(s->v, ((size_t)s->n + (size_t)c->n_listeners +
                                          1) * sizeof(*v));
    if (!v) {
        snprintf(err, errlen, "%s:0: out of memory", c->path);
        return -ENOMEM;
    }
    s->v = v;
    int before = s->n;
    for (int i = 0; i < c->n_listeners; i++) {
        const struct stp_listener_cfg *lc = &c->listeners[i];
        if (socket_find(s, lc) >= 0)
            continue;
        char *name = strdup(lc->name);
        int fd = name ? socket_listen(&lc->addr, lc->transparent) : -ENOMEM;
        if (fd < 0) {
            snprintf(err, errlen,
                     "%s:%d: listener '%s': cannot listen on %s: %s", c->path,
                     lc->line, lc->name, lc->listen_text, stp_strerror(fd));
            free(name);
            while (s->n > before)
                socket_close(&s->v[--s->n]);
            return fd;
        }
        s->v[s->n++] = (struct stp_socket){lc->addr, name, fd};
    }
    return 0;
}

void stp_sockets_keep_only(struct stp_sockets *s, const struct stp_gen *g)
{
    int kept = 0;
    for (int i = 0; i < s->n; i++) {
        bool in_g = false;
        for (int j = 0; j < g->cfg.n_listeners && !in_g; j++)
            in_g = socket_is(&s->v[i], &g->cfg.listeners[j]);
        if (in_g)
            s->v[kept++] = s->v[i];
        else
            socket_close(&s->v[i]);
    }
    s->n = kept;
}

int *stp_sockets_dup(const struct stp_sockets *s, const struct stp_gen *g)
{
    int n = g->cfg.n_listeners;
    int *fds = malloc(((size_t)n + 1) * sizeof(*fds));
    for (int i = 0; fds && i < n; i++) {
        int k = socket_find(s, &g->cfg.listeners[i]);
        STP_ASSERT(k >= 0); /* stp_sockets_bind(g) came first */
        /* dup(), which ThreadSanitizer follows (not fcntl's F_DUPFD): a
         * descriptor number reused by another worker is then not taken for
         * that worker's socket. CLOEXEC, as the original has: an upgrade
         * hands the new process the main thread's sockets, not these. */
        if ((fds[i] = dup(s->v[k].fd)) < 0 ||
            fcntl(fds[i], F_SETFD, FD_CLOEXEC) < 0) {
            if (fds[i] >= 0)
                close(fds[i]);
            stp_fds_free(fds, i);
            return NULL;
        }
    }
    return fds;
}

void stp_sockets_close(struct stp_sockets *s)
{
    for (int i = 0; i < s->n; i++)
        socket_close(&s->v[i]);
    free(s->v);
    s->v = NULL;
    s->n = 0;
}

void stp_fds_free(int *fds, int n)
{
    for (int i = 0; fds && i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(fds);
}

/* ---- a worker's handles on them -------------------------------------------- */

static void on_connection(uv_stream_t *server, int status);

static void spare_closed(uv_handle_t *h)
{
    struct stp_listener *l = h->data;
    l->spare_busy = false;
    /* Another connection came while the spare was closing: libuv holds it
     * and watches the socket no more until it is taken. */
    if (l->pending && l->idx >= 0) {
        l->pending = false;
        on_connection((uv_stream_t *)&l->tcp, 0);
    }
}

/* A connection libuv accepted must be taken, or libuv stops watching the
 * listening socket for good. With no session for it (out of memory), it is
 * taken into the listener's spare handle, which needs no memory, and closed
 * at once: the client sees a reset rather than a port that hangs. */
static void reject_pending(struct stp_listener *l)
{
    if (l->spare_busy) {
        l->pending = true; /* taken when the spare is closed */
        return;
    }
    uv_tcp_init(l->srv->loop, &l->spare);
    l->spare.data = l;
    l->spare_busy = true;
    if (uv_accept((uv_stream_t *)&l->tcp, (uv_stream_t *)&l->spare) == 0)
        uv_tcp_close_reset(&l->spare, spare_closed);
    else
        uv_close((uv_handle_t *)&l->spare, spare_closed);
}

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
    if (r < 0 && r != STP_ACCEPT_FAILED) {
        stp_log(STP_LOG_WARN,
                "event=accept_error addr=%s error=\"%s\" action=closed",
                lst->addr, stp_strerror(r));
        reject_pending(lst);
    }
}

static void listener_closed(uv_handle_t *h) { (void)h; }

static void listener_close(struct stp_listener *l)
{
    if (l->idx < 0)
        return;
    l->idx = -1;
    uv_close((uv_handle_t *)&l->tcp, listener_closed);
}

/* The address FD is bound to: for HOST:0, the port the kernel picked. */
static int bound_addr(int fd, struct sockaddr_storage *ss)
{
    socklen_t len = sizeof(*ss);
    memset(ss, 0, sizeof(*ss));
    return getsockname(fd, (struct sockaddr *)ss, &len) < 0 ? -errno : 0;
}

/* Accept on *FD, a worker's duplicate of the listening socket; the handle
 * takes it over (*FD becomes -1), else the caller still owns it. */
static struct stp_listener *listener_open(struct stp_server *srv,
                                          const struct stp_listener_cfg *lc,
                                          int idx, int *fd)
{
    struct stp_listener *l = calloc(1, sizeof(*l));
    if (!l)
        return NULL;
    l->srv = srv;
    l->idx = idx;
    if (bound_addr(*fd, &l->bound) < 0)
        l->bound = lc->addr;
    stp_format_addr((const struct sockaddr *)&l->bound, l->addr,
                    sizeof(l->addr));
    int r = uv_tcp_init(srv->loop, &l->tcp);
    if (r == 0) {
        l->tcp.data = l;
        if ((r = uv_tcp_open(&l->tcp, *fd)) == 0) {
            *fd = -1;
            r = uv_listen((uv_stream_t *)&l->tcp, 511, on_connection);
        }
        if (r < 0)
            uv_close((uv_handle_t *)&l->tcp, listener_closed);
    }
    if (r < 0) {
        stp_log(STP_LOG_ERROR,
                "event=listen_error listener=%s addr=%s error=\"%s\"",
                lc->name, l->addr, uv_strerror(r));
        l->idx = -1;
    }
    l->next = srv->listeners;
    srv->listeners = l; /* kept even when closed: freed with the server */
    return r < 0 ? NULL : l;
}

static void log_listening(const struct stp_listener *l,
                          const struct stp_listener_cfg *lc)
{
    stp_log(STP_LOG_INFO,
            "event=listening worker=%d listener=%s addr=%s tls=%s "
            "require_tls=%s upstream=%s",
            l->srv->worker, lc->name, l->addr, stp_tls_mode_name(lc->tls),
            lc->require_tls ? "yes" : "no", lc->upstream->address_text);
}

int stp_server_start(struct stp_server *srv, uv_loop_t *loop,
                     struct stp_gen *gen, struct stp_shared *shared,
                     int worker, int *fds)
{
    memset(srv, 0, sizeof(*srv));
    srv->loop = loop;
    srv->gen = gen;
    srv->shared = shared;
    srv->worker = worker;
    stp_gen_ref(gen);
    uv_timer_init(loop, &srv->drain_timer);
    srv->drain_timer.data = srv;
    int r = 0;
    for (int i = 0; r == 0 && i < gen->cfg.n_listeners; i++) {
        const struct stp_listener_cfg *lc = &gen->cfg.listeners[i];
        struct stp_listener *l = listener_open(srv, lc, i, &fds[i]);
        if (l)
            log_listening(l, lc);
        else
            r = -EADDRNOTAVAIL;
    }
    stp_fds_free(fds, gen->cfg.n_listeners);
    return r;
}

int stp_server_adopt(struct stp_server *srv, struct stp_gen *g, int *fds)
{
    const struct stp_config *c = &g->cfg;
    if (srv->stopping) {
        stp_fds_free(fds, c->n_listeners);
        return -ESHUTDOWN;
    }
    struct stp_listener **map = calloc((size_t)c->n_listeners + 1,
                                       sizeof(*map));
    bool *fresh = calloc((size_t)c->n_listeners + 1, sizeof(*fresh));
    int r = map && fresh ? 0 : -ENOMEM;
    /* Keep the handles on the sockets the main thread kept (FDS[I] is a
     * duplicate of the same socket: the same bound address); open the new
     * ones first, so a failure leaves the running configuration untouched. */
    for (int i = 0; r == 0 && i < c->n_listeners; i++) {
        struct sockaddr_storage bound;
        bool known = bound_addr(fds[i], &bound) == 0;
        for (struct stp_listener *l = srv->listeners; l && known; l = l->next)
            if (l->idx >= 0 && stp_same_addr(&l->bound, &bound))
                map[i] = l;
        if (!map[i]) {
            fresh[i] = true;
            if (!(map[i] = listener_open(srv, &c->listeners[i], i, &fds[i])))
                r = -EADDRNOTAVAIL;
        }
    }
    stp_fds_free(fds, c->n_listeners); /* the kept addresses' duplicates */
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

static void stop_accepting(struct stp_server *srv)
{
    if (srv->stopping)
        return;
    srv->stopping = true;
    for (struct stp_listener *l = srv->listeners; l; l = l->next)
        listener_close(l);
    uv_timer_start(&srv->drain_timer, on_drain_timeout,
                   srv->gen->cfg.drain_timeout_ms, 0);
}

void stp_server_stop(struct stp_server *srv, bool force)
{
    stop_accepting(srv);
    stp_sessions_shutdown(srv, force);
    stp_server_check_empty(srv);
}

void stp_server_handover(struct stp_server *srv)
{
    stop_accepting(srv);
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
