/* The admin endpoints: a small HTTP/1.x server on the main thread's loop
 * (GET or HEAD /metrics, /healthz, /readyz). One response per connection,
 * then Connection: close. Requests are bounded in size (STP_ADMIN_MAX_HEAD)
 * and time (STP_ADMIN_TIMEOUT_MS), connections in number
 * (STP_ADMIN_MAX_CONNS, more are closed at accept). */
#ifndef STP_ADMIN_H
#define STP_ADMIN_H

#include <stdbool.h>
#include <stdio.h>
#include <sys/socket.h>
#include <uv.h>

#define STP_ADMIN_MAX_HEAD 8192
#define STP_ADMIN_TIMEOUT_MS 10000
#define STP_ADMIN_MAX_CONNS 64

struct stp_admin;

struct stp_admin_ops {
    bool (*ready)(void *ctx);                 /* /readyz: 200 or 503 */
    int (*metrics)(void *ctx, FILE *out);     /* /metrics: the body */
};

/* Listen on ADDR (bound now, so before privileges are dropped). ERR says
 * why not. */
int stp_admin_start(struct stp_admin **out, uv_loop_t *loop,
                    const struct sockaddr_storage *addr,
                    const struct stp_admin_ops *ops, void *ctx, char *err,
                    size_t errlen);
/* Stop listening and close every connection; freed in the last close
 * callback. NULL is fine. */
void stp_admin_close(struct stp_admin *a);

#endif
