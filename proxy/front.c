/* The front door of a session (front.h). */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "front.h"
#include "log.h"
#include "proxy_header.h"

#define SID "id=%016" PRIx64

enum stp_front_verdict stp_front_open(struct stp_front *f,
                                      enum stp_close_reason *why)
{
    const struct stp_listener_cfg *lc = f->lcfg;
    /* TCP_NODELAY comes from the listening socket (Linux copies it). */
    int r = stp_conn_peer(f->conn, &f->addr);
    if (r == 0) {
        stp_format_addr((struct sockaddr *)&f->addr, f->peer,
                        sizeof(f->peer));
    } else {
        memset(&f->addr, 0, sizeof(f->addr));
        snprintf(f->peer, sizeof(f->peer), "unknown");
    }
    /* Behind a load balancer the client's address is known only from its
     * header: the per-IP tally waits for it. */
    bool pp = lc->proxy_protocol != STP_PP_NO;
    stp_shared_count(f->srv->shared, &f->lst->bound, pp ? NULL : &f->addr, 1,
                     &f->counts);
    f->counted = true;
    f->ip_counted = !pp;
    f->id = f->counts.id;
    if (r < 0) {
        /* Reset before it was accepted (a load balancer's TCP check):
         * nobody to serve, and no address to judge it by. */
        stp_log(STP_LOG_INFO,
                SID " event=connect client=unknown listener=%s error=\"%s\"",
                f->id, lc->name, stp_strerror(r));
        *why = STP_CLOSE_CLIENT_ERROR;
        return STP_FRONT_REFUSE;
    }
    if (!pp) {
        stp_log(STP_LOG_INFO, SID " event=connect client=%s listener=%s",
                f->id, f->peer, lc->name);
        return STP_FRONT_BEGIN;
    }
    /* Only the load balancers named may send a header: from anyone else it
     * would let a client choose its address. Checked before reading a
     * byte. */
    if (!stp_cidr_match(lc->proxy_from, lc->n_proxy_from, &f->addr)) {
        stp_log(STP_LOG_WARN,
                SID " event=reject reason=%s client=%s listener=%s", f->id,
                stp_close_reason_name(STP_CLOSE_PROXY_NOT_ALLOWED), f->peer,
                lc->name);
        *why = STP_CLOSE_PROXY_NOT_ALLOWED;
        return STP_FRONT_REFUSE;
    }
    return STP_FRONT_HEADER;
}

void stp_front_refused(const struct stp_front *f, enum stp_close_reason r,
                       const char *detail)
{
    size_t n;
    stp_conn_in(f->conn, &n);
    stp_log(STP_LOG_WARN,
            SID " event=proxy_header_error reason=%s client=%s listener=%s "
                "bytes=%zu error=\"%s\"",
            f->id, stp_close_reason_name(r), f->peer, f->lcfg->name, n,
            detail);
}

/* The header's source is the client from now on: in the logs, the per-IP
 * tally and what the upstream is told. LOCAL and UNKNOWN (health checks)
 * keep the socket's addresses. */
static bool take_header(struct stp_front *f, const struct stp_pp_result *pp)
{
    char via[64]; /* the load balancer */
    memcpy(via, f->peer, sizeof(via));
    f->header = true;
    /* Only a header with addresses costs the session its destination;
     * without the memory, never carry on as the load balancer. */
    if (!pp->local && !(f->dst = malloc(sizeof(*f->dst))))
        return false;
    if (!pp->local) {
        f->addr = pp->src;
        *f->dst = pp->dst;
        stp_format_addr((struct sockaddr *)&f->addr, f->peer,
                        sizeof(f->peer));
    }
    f->counts.per_ip = stp_shared_count_ip(f->srv->shared, &f->addr, 1);
    f->ip_counted = true;
    stp_log(STP_LOG_INFO,
            SID " event=connect client=%s via=%s listener=%s proxy_header=v%u%s",
            f->id, f->peer, via, f->lcfg->name, pp->version,
            pp->local ? "-local" : "");
    return true;
}

enum stp_front_verdict stp_front_header(struct stp_front *f, bool eof,
                                        enum stp_close_reason *why)
{
    size_t n;
    const char *p = stp_conn_in(f->conn, &n);
    struct stp_pp_result pp;
    int r = stp_pp_parse(p, n, f->lcfg->proxy_protocol, &pp);
    if (r == 0 && !eof)
        return STP_FRONT_MORE;
    if (r <= 0) {
        /* Closed without a byte: a PROXY listener says nothing before a
         * valid header, not even why. */
        *why = STP_CLOSE_PROXY_HEADER_INVALID;
        stp_front_refused(f, *why,
                          r == 0 ? "closed before a complete header"
                                 : pp.reason);
        return STP_FRONT_REFUSE;
    }
    stp_conn_consume(f->conn, pp.len);
    if (!take_header(f, &pp)) {
        *why = STP_CLOSE_CLIENT_ERROR;
        stp_front_refused(f, *why, "out of memory");
        return STP_FRONT_REFUSE;
    }
    return STP_FRONT_BEGIN;
}

enum stp_close_reason stp_front_limit(const struct stp_front *f)
{
    /* The client's own address: behind a load balancer, its header's. */
    const struct stp_listener_cfg *lc = f->lcfg;
    enum stp_close_reason limit =
        lc->n_allow && !stp_cidr_match(lc->allow, lc->n_allow, &f->addr)
            ? STP_CLOSE_NOT_ALLOWED
            : stp_over_limit(f->gen, lc, &f->counts);
    if (limit)
        stp_log(STP_LOG_WARN, SID " event=reject reason=%s client=%s", f->id,
                stp_close_reason_name(limit), f->peer);
    return limit;
}

void stp_front_close(struct stp_front *f)
{
    if (f->counted)
        stp_shared_count(f->srv->shared, &f->lst->bound,
                         f->ip_counted ? &f->addr : NULL, -1, NULL);
    f->counted = false;
    free(f->dst);
    f->dst = NULL;
}
