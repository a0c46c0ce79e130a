/* The admin endpoints: a small HTTP/1.x server on the main thread's loop
 * (GET or HEAD /metrics, /healthz, /readyz). One response per connection,
 * then Connection: close. Requests are bounded in size (STP_ADMIN_MAX_HEAD)
 * and time (STP_ADMIN_TIMEOUT_MS), connections in number
 * (STP_ADMIN_MAX_CONNS, STP_ADMIN_MAX_PER_IP from one address: more are
 * closed at accept). */
#ifndef STP_ADMIN_H
#define STP_ADMIN_H

#include <stdbool.h>
#include <stdio.h>
#include <sys/socket.h>
#include <uv.h>

#define STP_ADMIN_MAX_HEAD 8192
#define STP_ADMIN_TIMEOUT_MS 10000
#define STP_ADMIN_MAX_CONNS 64
/* From one client address: a client that holds connections open cannot
 * take them all, and the orchestrator's probes still get in. */
#define STP_ADMIN_MAX_PER_IP 8

struct stp_admin;

struct stp_admin_ops {
    bool (*ready)(void *ctx);                 /* /readyz: 200 or 503 */
    int (*metrics)(void *ctx, FILE *out);     /* /metrics: the body */
};

/* Listen on ADDR (bound now, so before privileges are dropped), or on FD
 * (>= 0: a socket an upgrade handed over, taken when it is bound to ADDR,
 * closed otherwise). ERR says why not. */
int stp_admin_start(struct stp_admin **out, uv_loop_t *loop,
                    const struct sockaddr_storage *addr, int fd,
                    const struct stp_admin_ops *ops, void *ctx, char *err,
                    size_t errlen);
/* Its listening socket, for an upgrade to hand over: the descriptor (-1:
 * none) and, into *ADDR, the address it was configured with. */
int stp_admin_socket(const struct stp_admin *a, struct sockaddr_storage *addr);
/* The name an upgrade gives that socket (no listener can have it). */
#define STP_ADMIN_SOCKET_NAME "[admin]"
/* Stop listening and close every connection; freed in the last close
 * callback. NULL is fine. */
void stp_admin_close(struct stp_admin *a);

#endif
