/* Where a next hop connects: the entries of its upstream's address list in
 * order, names looked up off the event loop (one lookup per name and worker,
 * shared by the sessions waiting for it), entries that failed lately
 * skipped for retry_after by every worker. nexthop.c connects to what it
 * is given and says how it went. */
#ifndef STP_HOP_ADDRS_H
#define STP_HOP_ADDRS_H

#include <stdbool.h>
#include <stddef.h>

struct stp_hop;

enum stp_addr_step {
    STP_ADDR_CONNECT, /* h->dst is the next address */
    STP_ADDR_LOOKUP,  /* a name is being looked up: stp_hop_resolved() */
    STP_ADDR_FAILED,  /* the current entry gave none (WHY): try again */
    STP_ADDR_NONE,    /* every entry has been tried */
};

/* The entries this session tries, as written: those that have not failed
 * within retry_after; all of them when every one has (one may be back). */
void stp_addrs_plan(struct stp_hop *h);
/* The next address (of the current name, else of the next entry). */
enum stp_addr_step stp_addrs_next(struct stp_hop *h, char *why, size_t n);
/* Is another address left after the current one? */
bool stp_addrs_more(const struct stp_hop *h);
/* The current entry answered (OK), or none of its addresses did. */
void stp_addrs_health(struct stp_hop *h, bool ok);
/* H waits for its lookup no more. */
void stp_addrs_abandon(struct stp_hop *h);
/* Abandoned, and its share of a name's addresses released. */
void stp_addrs_free(struct stp_hop *h);

/* nexthop.c's: the lookup H waited for is done; WHY is NULL when it
 * brought addresses (stp_addrs_next gives them), else what went wrong. */
void stp_hop_resolved(struct stp_hop *h, const char *why);

#endif
