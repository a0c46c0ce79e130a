/* The upstream leg of a session, up to the moment the client's session can
 * be relayed: connect, say who the client is (PROXY header first, or the
 * prelude's in-band identity), TLS (implicit, or STARTTLS spoken by the
 * proxy itself). Until then the client is not read, so no client byte can
 * reach the upstream in plaintext or before its identity. */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "identity.h"
#include "log.h"
#include "nexthop.h"
#include "tls.h"
#include "transparent.h"

#define SID "id=%016" PRIx64

void stp_hop_fail(struct stp_hop *h, enum stp_fail why, const char *detail)
{
    if (h->failed)
        return;
    h->failed = true;
    char e[256]; /* may quote what the next hop said or presented */
    stp_log(STP_LOG_WARN, SID " event=upstream_error upstream=%s error=\"%s\"",
            h->id, h->up->name, stp_log_esc(e, sizeof(e), detail));
    h->ops->fail(h->ctx, why,
                 why == STP_FAIL_HOP_LOOP ? STP_CLOSE_LOOP : STP_CLOSE_NEXT_HOP);
}

/* Never reached, or never greeted: as if it could not be reached. */
static void unreachable(struct stp_hop *h, enum stp_close_reason reason,
                        const char *detail)
{
    if (h->failed)
        return;
    h->failed = true;
    char a[64]; /* the original destination differs per session */
    if (h->dst)
        stp_format_addr((const struct sockaddr *)h->dst, a, sizeof(a));
    else
        snprintf(a, sizeof(a), "%s", h->up->address_text);
    stp_log(STP_LOG_WARN,
            SID " event=upstream_error upstream=%s address=%s error=\"%s\"",
            h->id, h->up->name, a, detail);
    h->ops->fail(h->ctx, STP_FAIL_UNREACHABLE, reason);
}

static void enter(struct stp_hop *h, enum stp_hop_stage stage)
{
    h->stage = stage;
    h->ops->stage(h->ctx, stage);
}

/* ---- the prelude's actions ------------------------------------------------ */

static void act_send(void *ctx, const char *line, size_t n)
{
    struct stp_hop *h = ctx;
    if (stp_conn_write(h->conn, line, n) < 0 ||
        stp_conn_write(h->conn, "\r\n", 2) < 0)
        stp_hop_fail(h, STP_FAIL_HOP_PROTOCOL, "write failed");
}

static void act_start_tls(void *ctx)
{
    struct stp_hop *h = ctx;
    h->tls_pending = true; /* once the reply is consumed */
}

static void act_ready(void *ctx, const char *greeting, size_t n)
{
    struct stp_hop *h = ctx;
    /* The prelude goes on in plaintext only when STARTTLS was not offered
     * (prelude.c): worth a line, the mail travels unencrypted. */
    if (h->up->tls == STP_TLS_OPPORTUNISTIC && !h->tls_done)
        stp_log(STP_LOG_INFO,
                SID " event=upstream_tls upstream=%s tls=none "
                    "reason=\"STARTTLS not offered\"",
                h->id, h->up->name);
    h->prelude_ready = true; /* freed once the prelude has returned */
    h->ops->ready(h->ctx, greeting, n);
}

static void act_fail(void *ctx, enum stp_fail f, const char *reason)
{
    stp_hop_fail(ctx, f, reason);
}

static const struct stp_up_ops prelude_ops = {
    .send = act_send,
    .start_tls = act_start_tls,
    .ready = act_ready,
    .fail = act_fail,
};

/* ---- steps ----------------------------------------------------------------- */

void stp_hop_free(struct stp_hop *h)
{
    free(h->own_dst);
    h->own_dst = NULL;
    if (h->prelude)
        h->proto->prelude_free(h->prelude);
    h->prelude = NULL;
}

static void start_tls(struct stp_hop *h)
{
    if (stp_conn_start_tls(h->conn, h->tls, h->up->server_name) < 0) {
        stp_hop_fail(h, STP_FAIL_HOP_TLS, "TLS setup failed");
        return;
    }
    enter(h, STP_HOP_TLS);
}

/* After the TCP connection and any TLS: the proxy's own dialogue, or
 * straight to relaying (the greeting then reaches the engine directly). */
static void begin(struct stp_hop *h)
{
    struct stp_prelude_cfg pc = {
        .starttls = h->up->tls == STP_TLS_STARTTLS ||
                    h->up->tls == STP_TLS_OPPORTUNISTIC,
        .opportunistic = h->up->tls == STP_TLS_OPPORTUNISTIC,
        .identity = h->up->identity == STP_ID_XCLIENT,
        .client = h->client_addr,
        .hostname = h->hostname,
    };
    int r = h->proto->prelude_new(&pc, &prelude_ops, h, &h->prelude);
    if (r < 0) {
        /* Never carry on without the identity the upstream relies on. */
        stp_hop_fail(h, r == -ENOMEM ? STP_FAIL_HOP_PROTOCOL
                                     : STP_FAIL_HOP_IDENTITY,
                     r == -ENOMEM ? "out of memory" : "client address unknown");
        return;
    }
    if (!h->prelude) {
        h->ops->ready(h->ctx, NULL, 0);
        return;
    }
    enter(h, STP_HOP_PRELUDE);
}

/* PROXY v1/v2: the very first bytes on the connection. */
static void send_proxy_header(struct stp_hop *h)
{
    char buf[1024];
    int n;
    /* The address the client reached: a load balancer's header says it,
     * else the socket, asked only here as few sessions need it. */
    struct sockaddr_storage local;
    if (stp_conn_local(h->client, &local) < 0)
        memset(&local, 0, sizeof(local));
    const struct sockaddr *dst =
        h->client_dst ? h->client_dst : (struct sockaddr *)&local;
    if (h->up->identity == STP_ID_PROXY_V1) {
        n = stp_proxy_v1(buf, sizeof(buf), h->client_addr, dst);
    } else {
        /* The client's TLS is known here only on an implicit listener. */
        struct stp_tls_info ti = {0}, *tip = NULL;
        struct stp_tls *t = stp_conn_tls(h->client);
        char cn[256];
        if (t) {
            ti.version = stp_tls_version(t);
            ti.cipher = stp_tls_cipher(t);
            ti.sni = stp_tls_sni(t);
            if (stp_tls_peer_cn(t, cn, sizeof(cn))) {
                ti.cn = cn;
                ti.cert_verified = true; /* the handshake verified it */
                ti.cert_resumed = stp_tls_cert_resumed(t);
            }
            tip = &ti;
        }
        n = stp_proxy_v2(buf, sizeof(buf), h->client_addr, dst, tip);
    }
    if (n < 0 || stp_conn_write(h->conn, buf, (size_t)n) < 0)
        stp_hop_fail(h, STP_FAIL_HOP_IDENTITY, "cannot build PROXY header");
}

int stp_hop_resolve(struct stp_hop *h, const struct stp_server *srv)
{
    if (!h->up->original_dst) {
        h->dst = &h->up->addr;
        return 0;
    }
    char d[64], why[128];
    /* Only intercepting sessions carry an address of their own. */
    if (!(h->own_dst = malloc(sizeof(*h->own_dst)))) {
        enter(h, STP_HOP_CONNECTING);
        stp_hop_fail(h, STP_FAIL_UNREACHABLE, "out of memory");
        return -ENOMEM;
    }
    h->dst = h->own_dst;
    int r = stp_tp_original_dst(stp_conn_fd(h->client), h->client_transparent,
                                h->own_dst);
    if (r < 0) {
        snprintf(why, sizeof(why), "original destination unknown: %s",
                 stp_strerror(r));
        enter(h, STP_HOP_CONNECTING);
        stp_hop_fail(h, STP_FAIL_UNREACHABLE, why);
        return r;
    }
    if (stp_tp_is_own(srv, h->dst)) {
        stp_format_addr((const struct sockaddr *)h->dst, d, sizeof(d));
        snprintf(why, sizeof(why),
                 "original destination %s is this proxy's own listener", d);
        enter(h, STP_HOP_CONNECTING);
        stp_hop_fail(h, STP_FAIL_HOP_LOOP, why);
        return -ELOOP;
    }
    stp_format_addr((const struct sockaddr *)h->dst, d, sizeof(d));
    stp_log(STP_LOG_INFO, SID " event=original_destination upstream=%s "
            "address=%s", h->id, h->up->name, d);
    return 0;
}

void stp_hop_start(struct stp_hop *h)
{
    enter(h, STP_HOP_CONNECTING);
    const char *why = "";
    int r = stp_tp_bind_source(stp_conn_fd(h->conn), h->up, h->client_addr,
                               &why);
    if (r < 0) {
        /* Never the proxy's own address instead: the upstream would trust
         * or refuse the wrong sender. */
        char e[192];
        snprintf(e, sizeof(e), "%s: %s", why, stp_strerror(r));
        stp_hop_fail(h, STP_FAIL_UNREACHABLE, e);
        return;
    }
    r = stp_conn_connect(h->conn, (const struct sockaddr *)h->dst);
    if (r < 0)
        unreachable(h, STP_CLOSE_UPSTREAM_UNREACHABLE, stp_strerror(r));
}

static void prelude_input(struct stp_hop *h)
{
    size_t n;
    const char *p = stp_conn_in(h->conn, &n);
    if (n == 0)
        return;
    size_t k = h->proto->prelude_input(h->prelude, p, n);
    if (h->failed)
        return;
    if (k)
        stp_conn_consume(h->conn, k);
    if (h->tls_pending) {
        h->tls_pending = false;
        start_tls(h);
    } else if (h->prelude_ready) {
        stp_hop_free(h);
    }
}

void stp_hop_event(struct stp_hop *h, enum stp_io_event ev, int err)
{
    if (h->failed)
        return;
    switch (ev) {
    case STP_IO_CONNECTED:
        if (err < 0) {
            unreachable(h, STP_CLOSE_UPSTREAM_UNREACHABLE, stp_strerror(err));
            break;
        }
        if (h->up->identity == STP_ID_PROXY_V1 ||
            h->up->identity == STP_ID_PROXY_V2)
            send_proxy_header(h);
        if (h->failed)
            break;
        if (h->up->tls == STP_TLS_IMPLICIT)
            start_tls(h);
        else
            begin(h);
        break;
    case STP_IO_TLS_READY: {
        struct stp_tls *t = stp_conn_tls(h->conn);
        h->tls_done = true;
        stp_log(STP_LOG_INFO,
                SID " event=upstream_tls upstream=%s tls=%s cipher=%s "
                    "server_name=%s verified=%s",
                h->id, h->up->name, stp_tls_version(t), stp_tls_cipher(t),
                h->up->server_name ? h->up->server_name : "none",
                h->up->verify ? "yes" : "no");
        if (h->prelude) {
            enter(h, STP_HOP_PRELUDE);
            h->proto->prelude_tls_done(h->prelude);
        } else {
            begin(h);
        }
        break;
    }
    case STP_IO_DATA:
        if (h->stage == STP_HOP_PRELUDE)
            prelude_input(h);
        break;
    case STP_IO_DRAINED:
        break;
    case STP_IO_EOF:
    case STP_IO_ERROR: {
        char why[160];
        if (h->stage == STP_HOP_TLS) {
            snprintf(why, sizeof(why), "TLS handshake failed: %s",
                     ev == STP_IO_EOF ? "connection closed"
                                      : stp_conn_error_text(h->conn, err));
            stp_hop_fail(h, STP_FAIL_HOP_TLS, why);
        } else {
            snprintf(why, sizeof(why), "connection %s during setup",
                     ev == STP_IO_EOF ? "closed" : stp_strerror(err));
            stp_hop_fail(h,
                         h->up->tls == STP_TLS_NONE ? STP_FAIL_HOP_PROTOCOL
                                                    : STP_FAIL_HOP_TLS,
                         why);
        }
        break;
    }
    }
}

void stp_hop_timeout(struct stp_hop *h, bool greeting)
{
    if (greeting || h->stage == STP_HOP_CONNECTING) {
        unreachable(h,
                    greeting ? STP_CLOSE_UPSTREAM_GREETING_TIMEOUT
                             : STP_CLOSE_UPSTREAM_CONNECT_TIMEOUT,
                    greeting ? "no greeting" : "connect timeout");
        return;
    }
    bool tls_phase = h->up->tls != STP_TLS_NONE && !h->tls_done;
    stp_hop_fail(h, tls_phase ? STP_FAIL_HOP_TLS : STP_FAIL_HOP_IDENTITY,
                 "setup timeout");
}
