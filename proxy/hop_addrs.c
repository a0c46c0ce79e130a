/* Where a next hop connects (hop_addrs.h). */
#include <errno.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hop_addrs.h"
#include "nexthop.h"

/* A name being resolved on libuv's thread pool. A worker looks a name up
 * once at a time, however many sessions wait for it: a slow resolver holds
 * one pool thread per name and worker, not one per session, so the pool
 * (main.c sizes it) has threads left for other names. */
struct stp_lookup {
    uv_getaddrinfo_t req;
    struct stp_hop *waiters;        /* linked through next_waiter */
    struct stp_lookup *next;        /* in_flight */
    bool listed;                    /* in in_flight: new sessions join it */
    uint16_t port;
    char host[256];
};

/* This worker's lookups under way (each worker is a thread with its own
 * loop, and lookups complete on the loop that started them). */
static __thread struct stp_lookup *in_flight;

/* One lookup's addresses, shared by the sessions that waited for it. */
struct stp_addrs {
    unsigned refs;
    struct addrinfo *res;
};

static uint64_t mono_ms(void)
{
    return uv_hrtime() / 1000000;
}

void stp_addrs_plan(struct stp_hop *h)
{
    uint64_t now = mono_ms();
    h->n_order = h->next = 0;
    h->entry = -1;
    for (int i = 0; i < h->up->n_addrs; i++)
        if (!h->down_until ||
            __atomic_load_n(&h->down_until[i], __ATOMIC_RELAXED) <= now)
            h->order[h->n_order++] = (uint8_t)i;
    if (h->n_order == 0)
        for (int i = 0; i < h->up->n_addrs; i++)
            h->order[h->n_order++] = (uint8_t)i;
}

void stp_addrs_health(struct stp_hop *h, bool ok)
{
    if (h->entry < 0 || !h->down_until || (!ok && !h->up->retry_after_ms))
        return;
    __atomic_store_n(&h->down_until[h->entry],
                     ok ? 0 : mono_ms() + h->up->retry_after_ms,
                     __ATOMIC_RELAXED);
}

bool stp_addrs_more(const struct stp_hop *h)
{
    return h->ai_next || h->next < h->n_order;
}

static void unlist(struct stp_lookup *l)
{
    for (struct stp_lookup **pp = &in_flight; l->listed && *pp;
         pp = &(*pp)->next)
        if (*pp == l) {
            *pp = l->next;
            l->listed = false;
            return;
        }
}

/* A lookup nobody waits for is cancelled if it has not started (it then
 * completes with UV_ECANCELED, unlisted so that no new session joins it);
 * one already running is left to finish. */
void stp_addrs_abandon(struct stp_hop *h)
{
    struct stp_lookup *l = h->lookup;
    if (!l)
        return;
    for (struct stp_hop **pp = &l->waiters; *pp; pp = &(*pp)->next_waiter)
        if (*pp == h) {
            *pp = h->next_waiter;
            break;
        }
    h->lookup = NULL;
    h->next_waiter = NULL;
    if (!l->waiters && uv_cancel((uv_req_t *)&l->req) == 0)
        unlist(l);
}

static void release_addrs(struct stp_hop *h)
{
    struct stp_addrs *a = h->addrs;
    h->addrs = NULL;
    h->ai_next = NULL;
    if (a && --a->refs == 0) {
        uv_freeaddrinfo(a->res);
        free(a);
    }
}

void stp_addrs_free(struct stp_hop *h)
{
    stp_addrs_abandon(h);
    release_addrs(h);
}

/* With source = ADDRESS only that family can be reached. */
static bool family_ok(const struct stp_hop *h, int family)
{
    return h->up->source != STP_SRC_ADDRESS ||
           h->up->source_addr.ss_family == family;
}

/* The lookup H waited for is done: its addresses (shared, A), or STATUS. */
static void resolved(struct stp_hop *h, int status, struct stp_addrs *a)
{
    const struct stp_hop_addr *e = &h->up->addrs[h->entry];
    char why[320];
    const struct addrinfo *ai = a ? a->res : NULL;
    while (ai && !family_ok(h, ai->ai_family))
        ai = ai->ai_next;
    if (status < 0 || !ai) {
        if (status < 0)
            snprintf(why, sizeof(why), "cannot resolve %s: %s", e->host,
                     uv_strerror(status));
        else
            snprintf(why, sizeof(why),
                     "%s has no address of the family of source =", e->host);
        stp_hop_resolved(h, why);
        return;
    }
    a->refs++;
    h->addrs = a;
    h->ai_next = a->res;
    stp_hop_resolved(h, NULL);
}

static void on_resolved(uv_getaddrinfo_t *req, int status,
                        struct addrinfo *res)
{
    struct stp_lookup *l = req->data;
    unlist(l);
    struct stp_hop *w = l->waiters;
    free(l);
    struct stp_addrs *a = NULL;
    if (status == 0 && !(a = malloc(sizeof(*a))))
        status = UV_ENOMEM;
    if (a)
        *a = (struct stp_addrs){.refs = 1, .res = res}; /* ours, for now */
    else if (res)
        uv_freeaddrinfo(res);
    /* Each waiter goes on by itself; none can end another's session, and
     * sessions are freed only in close callbacks. */
    while (w) {
        struct stp_hop *h = w;
        w = h->next_waiter;
        h->next_waiter = NULL;
        h->lookup = NULL;
        resolved(h, status, a);
    }
    if (a && --a->refs == 0) {
        uv_freeaddrinfo(a->res);
        free(a);
    }
}

/* Look up the current entry's name off the event loop, or wait for this
 * worker's lookup of it under way. */
static enum stp_addr_step resolve(struct stp_hop *h, char *why, size_t n)
{
    const struct stp_hop_addr *e = &h->up->addrs[h->entry];
    h->dst = NULL;
    struct stp_lookup *l = in_flight;
    while (l && !(l->port == e->port && strcasecmp(l->host, e->host) == 0))
        l = l->next;
    if (!l) {
        char port[8];
        snprintf(port, sizeof(port), "%u", e->port);
        struct addrinfo hints = {
            .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
            .ai_protocol = IPPROTO_TCP, .ai_flags = AI_NUMERICSERV,
        };
        l = calloc(1, sizeof(*l));
        int r = l ? 0 : -ENOMEM;
        if (l) {
            l->req.data = l;
            l->port = e->port;
            snprintf(l->host, sizeof(l->host), "%s", e->host);
            r = uv_getaddrinfo(h->loop, &l->req, on_resolved, e->host, port,
                               &hints);
        }
        if (r < 0) {
            free(l);
            snprintf(why, n, "cannot resolve %s: %s", e->host, uv_strerror(r));
            return STP_ADDR_FAILED;
        }
        l->next = in_flight;
        l->listed = true;
        in_flight = l;
    }
    h->next_waiter = l->waiters;
    l->waiters = h;
    h->lookup = l;
    return STP_ADDR_LOOKUP;
}

enum stp_addr_step stp_addrs_next(struct stp_hop *h, char *why, size_t n)
{
    for (;;) {
        struct addrinfo *a = h->ai_next;
        if (a) {
            h->ai_next = a->ai_next;
            if (!family_ok(h, a->ai_family) ||
                a->ai_addrlen > sizeof(*h->own_dst))
                continue;
            if (!h->own_dst && !(h->own_dst = malloc(sizeof(*h->own_dst)))) {
                snprintf(why, n, "out of memory");
                return STP_ADDR_FAILED;
            }
            memset(h->own_dst, 0, sizeof(*h->own_dst));
            memcpy(h->own_dst, a->ai_addr, a->ai_addrlen);
            h->dst = h->own_dst;
            return STP_ADDR_CONNECT;
        }
        release_addrs(h);
        /* Every address of the entry failed (or it had none). */
        stp_addrs_health(h, false);
        if (h->next >= h->n_order)
            return STP_ADDR_NONE;
        h->entry = h->order[h->next++];
        const struct stp_hop_addr *e = &h->up->addrs[h->entry];
        if (e->is_name)
            return resolve(h, why, n);
        if (!family_ok(h, e->addr.ss_family))
            continue;
        h->dst = &e->addr;
        return STP_ADDR_CONNECT;
    }
}
