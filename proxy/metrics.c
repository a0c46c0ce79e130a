/* Prometheus counters: the workers' side (one writer each, relaxed atomics)
 * and the scrape (sum over the workers, text format 0.0.4). */
#include <errno.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "metrics.h"

static const double hs_le[STP_MX_HS_BUCKETS] = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
static const double sess_le[STP_MX_SESS_BUCKETS] = {
    0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800};

bool stp_mx_refusal(enum stp_close_reason r)
{
    switch (r) {
    case STP_CLOSE_MAX_CONNECTIONS:
    case STP_CLOSE_LISTENER_MAX_CONNECTIONS:
    case STP_CLOSE_MAX_CONNECTIONS_PER_IP:
    case STP_CLOSE_NOT_ALLOWED:
    case STP_CLOSE_PROXY_HEADER_INVALID:
    case STP_CLOSE_PROXY_HEADER_TIMEOUT:
    case STP_CLOSE_PROXY_NOT_ALLOWED:
        return true;
    default:
        return false;
    }
}

/* ---- the workers' side ------------------------------------------------ */

static struct stp_mx_lst *lst_of(struct stp_mx *mx, int i)
{
    return mx && i >= 0 ? mx->lst[i] : NULL;
}

static struct stp_mx_up *up_of(struct stp_mx *mx, int i)
{
    return mx && i >= 0 ? mx->up[i] : NULL;
}

static int bucket(const double *le, int n, double v)
{
    int i = 0;
    while (i < n && v > le[i])
        i++;
    return i; /* n: +Inf */
}

void stp_mx_opened(struct stp_mx *mx, int lst)
{
    struct stp_mx_lst *l = lst_of(mx, lst);
    if (l)
        stp_mx_inc(&l->opened, 1);
}

void stp_mx_closed(struct stp_mx *mx, int lst, enum stp_close_reason r,
                   uint64_t duration_ms, const uint64_t bytes[STP_MX_DIRS])
{
    struct stp_mx_lst *l = lst_of(mx, lst);
    if (!l)
        return;
    for (int d = 0; d < STP_MX_DIRS; d++)
        stp_mx_inc(&l->bytes[d], bytes[d]);
    stp_mx_inc(&l->sess[bucket(sess_le, STP_MX_SESS_BUCKETS,
                               (double)duration_ms / 1e3)], 1);
    stp_mx_inc(&l->sess_sum_ms, duration_ms);
    /* Last: a scrape reading "closed" before "opened" sees no session
     * closed that was never open. */
    stp_mx_inc(&l->closed[r < STP_CLOSE_COUNT ? r : STP_CLOSE_NONE], 1);
}

void stp_mx_handshake(struct stp_mx *mx, int lst, bool ok, uint64_t ns)
{
    struct stp_mx_lst *l = lst_of(mx, lst);
    if (!l)
        return;
    stp_mx_inc(ok ? &l->tls_ok : &l->tls_failed, 1);
    if (!ok)
        return; /* a failure's time says nothing about handshakes */
    stp_mx_inc(&l->hs[bucket(hs_le, STP_MX_HS_BUCKETS, (double)ns / 1e9)], 1);
    stp_mx_inc(&l->hs_sum_us, ns / 1000);
}

void stp_mx_upstream(struct stp_mx *mx, int up, bool ok)
{
    struct stp_mx_up *u = up_of(mx, up);
    if (u)
        stp_mx_inc(ok ? &u->conn_ok : &u->conn_failed, 1);
}

void stp_mx_auth(struct stp_mx *mx, int up, bool ok)
{
    struct stp_mx_up *u = up_of(mx, up);
    if (u)
        stp_mx_inc(ok ? &u->auth_ok : &u->auth_failed, 1);
}

/* ---- the main thread's side ------------------------------------------- */

int stp_metrics_init(struct stp_metrics *m, int n_workers)
{
    memset(m, 0, sizeof(*m));
    if (!(m->w = calloc((size_t)n_workers + 1, sizeof(*m->w))))
        return -ENOMEM;
    m->n_workers = n_workers;
    return 0;
}

void stp_metrics_free(struct stp_metrics *m)
{
    for (int w = 0; m->w && w < m->n_workers; w++) {
        for (int i = 0; i < m->n_lst; i++)
            free(m->w[w].lst[i]);
        for (int i = 0; i < m->n_up; i++)
            free(m->w[w].up[i]);
    }
    for (int i = 0; i < m->n_lst; i++)
        free(m->lst_names[i]);
    for (int i = 0; i < m->n_up; i++)
        free(m->up_names[i]);
    free(m->w);
    memset(m, 0, sizeof(*m));
}

/* NAME's slot in NAMES, added with a block per worker if new; -1 if no
 * room or memory. */
static int slot(struct stp_metrics *m, bool lst, const char *name)
{
    char **names = lst ? m->lst_names : m->up_names;
    int *n = lst ? &m->n_lst : &m->n_up;
    for (int i = 0; i < *n; i++)
        if (strcmp(names[i], name) == 0)
            return i;
    if (*n == STP_MX_MAX_NAMES) {
        stp_log(STP_LOG_WARN, "event=metrics msg=\"too many %s names: not "
                "counted\" name=%s", lst ? "listener" : "upstream", name);
        return -1;
    }
    int i = *n;
    for (int w = 0; w < m->n_workers; w++) {
        void *b = calloc(1, lst ? sizeof(struct stp_mx_lst)
                                : sizeof(struct stp_mx_up));
        if (lst)
            m->w[w].lst[i] = b;
        else
            m->w[w].up[i] = b;
    }
    bool ok = (names[i] = strdup(name)) != NULL;
    for (int w = 0; w < m->n_workers; w++)
        ok &= (lst ? (void *)m->w[w].lst[i] : (void *)m->w[w].up[i]) != NULL;
    if (!ok) {
        for (int w = 0; w < m->n_workers; w++) {
            free(lst ? (void *)m->w[w].lst[i] : (void *)m->w[w].up[i]);
            if (lst)
                m->w[w].lst[i] = NULL;
            else
                m->w[w].up[i] = NULL;
        }
        free(names[i]);
        return -1;
    }
    ++*n;
    return i;
}

void stp_metrics_map(struct stp_metrics *m, struct stp_config *cfg)
{
    for (int i = 0; i < cfg->n_listeners; i++)
        cfg->listeners[i].metrics_slot = slot(m, true, cfg->listeners[i].name);
    for (int i = 0; i < cfg->n_upstreams; i++)
        cfg->upstreams[i].metrics_slot = slot(m, false, cfg->upstreams[i].name);
}

/* ---- rendering -------------------------------------------------------- */

static uint64_t ld(const uint64_t *c)
{
    return __atomic_load_n(c, __ATOMIC_RELAXED);
}

/* A label value: backslash, double quote and newline escaped. */
static void label(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            fputc('\\', f);
        if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
}

static void family(FILE *f, const char *name, const char *type,
                   const char *help)
{
    fprintf(f, "# HELP starttls_proxy_%s %s\n# TYPE starttls_proxy_%s %s\n",
            name, help, name, type);
}

/* Sums over the workers of one listener's (or upstream's) field at OFF. */
static uint64_t sum_lst(const struct stp_metrics *m, int i, size_t off)
{
    uint64_t v = 0;
    for (int w = 0; w < m->n_workers; w++)
        v += ld((const uint64_t *)(const void *)((const char *)m->w[w].lst[i] +
                                                 off));
    return v;
}

static uint64_t sum_up(const struct stp_metrics *m, int i, size_t off)
{
    uint64_t v = 0;
    for (int w = 0; w < m->n_workers; w++)
        v += ld((const uint64_t *)(const void *)((const char *)m->w[w].up[i] +
                                                 off));
    return v;
}

#define LOFF(f) offsetof(struct stp_mx_lst, f)
#define UOFF(f) offsetof(struct stp_mx_up, f)

static void lst_line(FILE *f, const char *metric, const struct stp_metrics *m,
                     int i, const char *extra, uint64_t v)
{
    fprintf(f, "starttls_proxy_%s{listener=\"", metric);
    label(f, m->lst_names[i]);
    fprintf(f, "\"%s} %" PRIu64 "\n", extra, v);
}

static void up_line(FILE *f, const char *metric, const struct stp_metrics *m,
                    int i, const char *extra, uint64_t v)
{
    fprintf(f, "starttls_proxy_%s{upstream=\"", metric);
    label(f, m->up_names[i]);
    fprintf(f, "\"%s} %" PRIu64 "\n", extra, v);
}

static void histogram(FILE *f, const char *metric, const struct stp_metrics *m,
                      const double *le, int n, size_t buckets, size_t sum,
                      double sum_scale)
{
    for (int i = 0; i < m->n_lst; i++) {
        uint64_t cum = 0;
        char extra[64];
        for (int b = 0; b <= n; b++) {
            cum += sum_lst(m, i, buckets + (size_t)b * sizeof(uint64_t));
            if (b < n)
                snprintf(extra, sizeof(extra), ",le=\"%g\"", le[b]);
            else
                snprintf(extra, sizeof(extra), ",le=\"+Inf\"");
            fprintf(f, "starttls_proxy_%s_bucket{listener=\"", metric);
            label(f, m->lst_names[i]);
            fprintf(f, "\"%s} %" PRIu64 "\n", extra, cum);
        }
        fprintf(f, "starttls_proxy_%s_sum{listener=\"", metric);
        label(f, m->lst_names[i]);
        fprintf(f, "\"} %.6f\n", (double)sum_lst(m, i, sum) * sum_scale);
        fprintf(f, "starttls_proxy_%s_count{listener=\"", metric);
        label(f, m->lst_names[i]);
        fprintf(f, "\"} %" PRIu64 "\n", cum);
    }
}

int stp_metrics_render(const struct stp_metrics *m,
                       const struct stp_mx_process *p, FILE *f)
{
    static const char *const dirs[STP_MX_DIRS] = {"client_in", "client_out",
                                                  "upstream_in", "upstream_out"};
    char extra[96];
    family(f, "build_info", "gauge", "The version of the running binary, always 1.");
    fprintf(f, "starttls_proxy_build_info{version=\"");
    label(f, p->version);
    fprintf(f, "\"} 1\n");
    family(f, "workers", "gauge", "Worker threads (event loops) running sessions.");
    fprintf(f, "starttls_proxy_workers %d\n", p->workers);
    family(f, "draining", "gauge",
           "1 once the proxy stopped accepting (SIGTERM, SIGINT) and lets open sessions finish.");
    fprintf(f, "starttls_proxy_draining %d\n", p->draining ? 1 : 0);
    family(f, "reloads_total", "counter", "Configuration reloads (SIGHUP), by result.");
    fprintf(f, "starttls_proxy_reloads_total{result=\"ok\"} %" PRIu64 "\n",
            p->reloads_ok);
    fprintf(f, "starttls_proxy_reloads_total{result=\"failed\"} %" PRIu64 "\n",
            p->reloads_failed);

    /* Closed first: a session counted closed was counted open before. */
    family(f, "connections_total", "counter", "Connections accepted, by listener.");
    uint64_t *closed = calloc((size_t)m->n_lst + 1, sizeof(*closed));
    if (!closed)
        return -ENOMEM;
    for (int i = 0; i < m->n_lst; i++) {
        for (int r = 0; r < STP_CLOSE_COUNT; r++)
            closed[i] += sum_lst(m, i, LOFF(closed) + (size_t)r * sizeof(uint64_t));
        lst_line(f, "connections_total", m, i, "", sum_lst(m, i, LOFF(opened)));
    }
    family(f, "connections_active", "gauge", "Sessions open now, by listener.");
    for (int i = 0; i < m->n_lst; i++) {
        uint64_t o = sum_lst(m, i, LOFF(opened));
        lst_line(f, "connections_active", m, i, "", o > closed[i] ? o - closed[i] : 0);
    }
    free(closed);
    family(f, "connections_rejected_total", "counter",
           "Connections refused before being served (limits, allow lists, PROXY headers), by listener and reason.");
    for (int i = 0; i < m->n_lst; i++)
        for (int r = 1; r < STP_CLOSE_COUNT; r++) {
            if (!stp_mx_refusal((enum stp_close_reason)r))
                continue;
            snprintf(extra, sizeof(extra), ",reason=\"%s\"",
                     stp_close_reason_name((enum stp_close_reason)r));
            lst_line(f, "connections_rejected_total", m, i, extra,
                     sum_lst(m, i, LOFF(closed) + (size_t)r * sizeof(uint64_t)));
        }
    family(f, "sessions_closed_total", "counter",
           "Sessions ended, by listener and the reason of the disconnect log line.");
    for (int i = 0; i < m->n_lst; i++)
        for (int r = 1; r < STP_CLOSE_COUNT; r++) {
            snprintf(extra, sizeof(extra), ",reason=\"%s\"",
                     stp_close_reason_name((enum stp_close_reason)r));
            lst_line(f, "sessions_closed_total", m, i, extra,
                     sum_lst(m, i, LOFF(closed) + (size_t)r * sizeof(uint64_t)));
        }
    family(f, "tls_handshakes_total", "counter",
           "TLS handshakes with clients (STARTTLS or implicit TLS), by listener and result.");
    for (int i = 0; i < m->n_lst; i++) {
        lst_line(f, "tls_handshakes_total", m, i, ",result=\"ok\"",
                 sum_lst(m, i, LOFF(tls_ok)));
        lst_line(f, "tls_handshakes_total", m, i, ",result=\"failed\"",
                 sum_lst(m, i, LOFF(tls_failed)));
    }
    family(f, "tls_handshake_duration_seconds", "histogram",
           "Time of the successful client TLS handshakes, by listener.");
    histogram(f, "tls_handshake_duration_seconds", m, hs_le, STP_MX_HS_BUCKETS,
              LOFF(hs), LOFF(hs_sum_us), 1e-6);
    family(f, "bytes_total", "counter",
           "Bytes relayed by ended sessions, by listener and direction (client_in: from the client).");
    for (int i = 0; i < m->n_lst; i++)
        for (int d = 0; d < STP_MX_DIRS; d++) {
            snprintf(extra, sizeof(extra), ",direction=\"%s\"", dirs[d]);
            lst_line(f, "bytes_total", m, i, extra,
                     sum_lst(m, i, LOFF(bytes) + (size_t)d * sizeof(uint64_t)));
        }
    family(f, "session_duration_seconds", "histogram",
           "Time from accept to close of ended sessions, by listener.");
    histogram(f, "session_duration_seconds", m, sess_le, STP_MX_SESS_BUCKETS,
              LOFF(sess), LOFF(sess_sum_ms), 1e-3);
    family(f, "upstream_connections_total", "counter",
           "Connection attempts to next hops (each failover attempt counts), by upstream and result.");
    for (int i = 0; i < m->n_up; i++) {
        up_line(f, "upstream_connections_total", m, i, ",result=\"ok\"",
                sum_up(m, i, UOFF(conn_ok)));
        up_line(f, "upstream_connections_total", m, i, ",result=\"failed\"",
                sum_up(m, i, UOFF(conn_failed)));
    }
    family(f, "upstream_auth_total", "counter",
           "Authentications of the proxy to next hops (auth =), by upstream and result.");
    for (int i = 0; i < m->n_up; i++) {
        up_line(f, "upstream_auth_total", m, i, ",result=\"ok\"",
                sum_up(m, i, UOFF(auth_ok)));
        up_line(f, "upstream_auth_total", m, i, ",result=\"failed\"",
                sum_up(m, i, UOFF(auth_failed)));
    }
    return ferror(f) ? -EIO : 0;
}
