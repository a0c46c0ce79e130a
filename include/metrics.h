/* Counters for the Prometheus endpoint. Each worker counts in its own
 * memory, without locks: one writer per counter (the worker's thread),
 * relaxed atomic loads and stores so the main thread can sum them at a
 * scrape without a data race. Counters are kept per listener and upstream
 * NAME for the life of the process: a reload that renames a listener starts
 * a new series and the old name keeps its totals. */
#ifndef STP_METRICS_H
#define STP_METRICS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "close.h"

struct stp_config;

/* Names a process may ever count (listener and upstream names each);
 * names past this are not counted (logged once). */
#define STP_MX_MAX_NAMES 1024

enum stp_mx_dir {
    STP_MX_CLIENT_IN,
    STP_MX_CLIENT_OUT,
    STP_MX_UPSTREAM_IN,
    STP_MX_UPSTREAM_OUT,
    STP_MX_DIRS
};

#define STP_MX_HS_BUCKETS 11   /* TLS handshake seconds, +Inf apart */
#define STP_MX_SESS_BUCKETS 12 /* session seconds, +Inf apart */

/* One listener name's counters in one worker. */
struct stp_mx_lst {
    uint64_t opened;
    uint64_t closed[STP_CLOSE_COUNT]; /* by reason */
    uint64_t tls_ok, tls_failed;
    uint64_t bytes[STP_MX_DIRS];
    uint64_t hs[STP_MX_HS_BUCKETS + 1], hs_sum_us;       /* not cumulative */
    uint64_t sess[STP_MX_SESS_BUCKETS + 1], sess_sum_ms;
};

struct stp_mx_up {
    uint64_t conn_ok, conn_failed; /* per connection attempt */
    uint64_t auth_ok, auth_failed;
};

/* One worker's counters: blocks allocated by the main thread before the
 * worker can see a configuration naming them. */
struct stp_mx {
    struct stp_mx_lst *lst[STP_MX_MAX_NAMES];
    struct stp_mx_up *up[STP_MX_MAX_NAMES];
};

struct stp_metrics {
    int n_workers;
    struct stp_mx *w;
    char *lst_names[STP_MX_MAX_NAMES];
    char *up_names[STP_MX_MAX_NAMES];
    int n_lst, n_up;
};

/* What the main thread knows: the process's own gauges. */
struct stp_mx_process {
    const char *version;
    bool draining;
    int workers;
    uint64_t reloads_ok, reloads_failed;
};

int stp_metrics_init(struct stp_metrics *m, int n_workers);
void stp_metrics_free(struct stp_metrics *m);
/* Give each listener and upstream of CFG its name's slot (metrics_slot),
 * adding names not seen before; -1 when out of room or memory. Main thread,
 * before the workers see CFG. */
void stp_metrics_map(struct stp_metrics *m, struct stp_config *cfg);
/* The text exposition format 0.0.4, summed over the workers. */
int stp_metrics_render(const struct stp_metrics *m,
                       const struct stp_mx_process *p, FILE *out);
/* Is R a connection refused before it was served (limits, allow lists,
 * PROXY headers)? connections_rejected_total counts these. */
bool stp_mx_refusal(enum stp_close_reason r);

/* The worker's side. MX may be NULL (no metrics) and a slot -1. */
static inline void stp_mx_inc(uint64_t *c, uint64_t n)
{
    /* One writer: a plain read-add-store, no locked instruction. */
    __atomic_store_n(c, __atomic_load_n(c, __ATOMIC_RELAXED) + n,
                     __ATOMIC_RELAXED);
}

void stp_mx_opened(struct stp_mx *mx, int lst);
void stp_mx_closed(struct stp_mx *mx, int lst, enum stp_close_reason r,
                   uint64_t duration_ms, const uint64_t bytes[STP_MX_DIRS]);
void stp_mx_handshake(struct stp_mx *mx, int lst, bool ok, uint64_t ns);
void stp_mx_upstream(struct stp_mx *mx, int up, bool ok);
void stp_mx_auth(struct stp_mx *mx, int up, bool ok);

#endif
