/* The upstream leg of a session, up to the moment the client's session can
 * be relayed: find an address that answers, connect, say who the client is
 * (PROXY header first, or the prelude's in-band identity), TLS (implicit, or
 * STARTTLS spoken by the proxy itself), the proxy's own login. Until then
 * the client is not read, so no client byte can reach the upstream in
 * plaintext, before its identity, or at an address that was given up. */
#include <inttypes.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hop_addrs.h"
#include "identity.h"
#include "listener.h"
#include "log.h"
#include "metrics.h"
#include "nexthop.h"
#include "secret.h"
#include "tls.h"
#include "transparent.h"

#define SID "id=%016" PRIx64

void stp_hop_fail(struct stp_hop *h, enum stp_fail why, const char *detail)
{
    if (h->failed)
        return;
    h->failed = true;
    /* The attempt under way failed (a failover's were counted already). */
    stp_mx_upstream(h->srv ? h->srv->metrics : NULL, h->up->metrics_slot,
                    false);
    if (why == STP_FAIL_HOP_AUTH)
        stp_mx_auth(h->srv ? h->srv->metrics : NULL, h->up->metrics_slot,
                    false);
    char e[256]; /* may quote what the next hop said or presented */
    stp_log(STP_LOG_WARN, SID " event=upstream_error upstream=%s error=\"%s\"",
            h->id, h->up->name, stp_log_esc(e, sizeof(e), detail));
    h->ops->fail(h->ctx, why,
                 why == STP_FAIL_HOP_LOOP ? STP_CLOSE_LOOP : STP_CLOSE_NEXT_HOP);
}

static void enter(struct stp_hop *h, enum stp_hop_stage stage)
{
    h->stage = stage;
    h->ops->stage(h->ctx, stage);
}

/* ---- addresses ------------------------------------------------------------- */

/* What the logs call the attempt: the address, or the name being looked
 * up. */
static void attempt_name(const struct stp_hop *h, char *a, size_t n)
{
    if (h->dst) {
        stp_format_addr((const struct sockaddr *)h->dst, a, n);
    } else if (h->entry >= 0) {
        const struct stp_hop_addr *e = &h->up->addrs[h->entry];
        snprintf(a, n, "%s:%u", e->host, e->port);
    } else {
        snprintf(a, n, "%s", h->up->address_text);
    }
}

static void log_attempt(const struct stp_hop *h, const char *detail)
{
    char a[300], e[256];
    attempt_name(h, a, sizeof(a));
    stp_log(STP_LOG_WARN,
            SID " event=upstream_error upstream=%s address=%s error=\"%s\"",
            h->id, h->up->name, a, stp_log_esc(e, sizeof(e), detail));
}

void stp_hop_cancel(struct stp_hop *h)
{
    h->failed = true;
    stp_addrs_abandon(h);
}

static void release_prelude(struct stp_hop *h)
{
    if (h->prelude)
        h->proto->prelude_free(h->prelude);
    h->prelude = NULL;
}

void stp_hop_free(struct stp_hop *h)
{
    stp_addrs_free(h);
    free(h->own_dst);
    h->own_dst = NULL;
    h->dst = NULL;
    release_prelude(h);
    stp_secret_free(h->token);
    h->token = NULL;
}

static void try_next(struct stp_hop *h);
static void connect_to(struct stp_hop *h);

/* No address is left, or there was only one: the session fails. */
static void give_up(struct stp_hop *h, enum stp_fail why,
                    enum stp_close_reason reason)
{
    if (h->failed)
        return;
    h->failed = true;
    if (h->attempts > 1)
        stp_log(STP_LOG_WARN,
                SID " event=upstream_error upstream=%s error=\"none of %d "
                    "addresses answered\"",
                h->id, h->up->name, h->attempts);
    h->ops->fail(h->ctx, why, reason);
}

/* This address did not answer (or not with service): the next one, if any;
 * else WHY ends the session. */
static void attempt_failed(struct stp_hop *h, enum stp_fail why,
                           enum stp_close_reason reason, const char *detail)
{
    if (h->failed)
        return;
    stp_mx_upstream(h->srv ? h->srv->metrics : NULL, h->up->metrics_slot,
                    false);
    log_attempt(h, detail);
    stp_addrs_abandon(h);
    h->last_reason = reason;
    if (!h->up->original_dst && stp_addrs_more(h)) {
        try_next(h);
        return;
    }
    stp_addrs_health(h, false);
    give_up(h, why, reason);
}

/* Never reached, or never greeted: as if it could not be reached. */
static void unreachable(struct stp_hop *h, enum stp_close_reason reason,
                        const char *detail)
{
    attempt_failed(h, STP_FAIL_UNREACHABLE, reason, detail);
}

/* Connect to H->dst, in a new connection (the relay's). */
static void connect_to(struct stp_hop *h)
{
    h->attempts++;
    h->fallback = !h->up->original_dst && stp_addrs_more(h);
    h->tls_done = h->tls_pending = h->prelude_ready = h->spoke = false;
    release_prelude(h);
    /* The setup deadline starts again for each address. */
    enter(h, STP_HOP_CONNECTING);
    /* A name (or an address) that leads back to this proxy would take a
     * connection per hop until a limit: the next address instead. */
    if (!h->up->original_dst && stp_tp_is_own(h->srv, h->dst)) {
        attempt_failed(h, STP_FAIL_HOP_LOOP, STP_CLOSE_LOOP,
                       "this is the proxy's own listener");
        return;
    }
    int r = h->ops->connection(h->ctx, h->dst->ss_family);
    if (r < 0) {
        /* Out of descriptors or memory here: no fault of the next hop,
         * which is not put in penalty for it. */
        char e[96];
        snprintf(e, sizeof(e), "no connection: %s", stp_strerror(r));
        stp_hop_fail(h, STP_FAIL_UNREACHABLE, e);
        return;
    }
    const char *why = "";
    r = stp_tp_bind_source(stp_conn_fd(h->conn), h->up, h->client_addr, &why);
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

/* The next address, the lookup of the next name, or the failure once none
 * is left. */
static void try_next(struct stp_hop *h)
{
    char why[320];
    switch (stp_addrs_next(h, why, sizeof(why))) {
    case STP_ADDR_CONNECT:
        connect_to(h);
        break;
    case STP_ADDR_LOOKUP:
        enter(h, STP_HOP_CONNECTING); /* the setup deadline bounds it */
        break;
    case STP_ADDR_FAILED:
        unreachable(h, STP_CLOSE_UPSTREAM_UNREACHABLE, why);
        break;
    case STP_ADDR_NONE:
        give_up(h, STP_FAIL_UNREACHABLE,
                h->last_reason ? h->last_reason
                               : STP_CLOSE_UPSTREAM_UNREACHABLE);
        break;
    }
}

void stp_hop_resolved(struct stp_hop *h, const char *why)
{
    if (why)
        unreachable(h, STP_CLOSE_UPSTREAM_UNREACHABLE, why);
    else
        try_next(h);
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

static const char *server_name(const struct stp_hop *h)
{
    if (h->up->server_name || h->entry < 0)
        return h->up->server_name;
    return h->up->addrs[h->entry].host;
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
    if (h->up->auth != STP_AUTH_NONE)
        stp_log(STP_LOG_INFO,
                SID " event=upstream_auth upstream=%s mechanism=%s user=%s",
                h->id, h->up->name,
                h->up->auth == STP_AUTH_PLAIN   ? "PLAIN"
                : h->up->auth == STP_AUTH_LOGIN ? "LOGIN"
                                                : "XOAUTH2",
                h->up->username);
    if (h->up->auth != STP_AUTH_NONE)
        stp_mx_auth(h->srv->metrics, h->up->metrics_slot, true);
    h->prelude_ready = true; /* freed once the prelude has returned */
    h->ops->ready(h->ctx, greeting, n);
}

static void act_fail(void *ctx, enum stp_fail f, const char *reason)
{
    struct stp_hop *h = ctx;
    if (f != STP_FAIL_UNREACHABLE) {
        stp_hop_fail(h, f, reason);
        return;
    }
    /* A greeting that refuses service, with another address left: tried
     * once the prelude has returned (it is freed then). */
    log_attempt(h, reason);
    h->last_reason = STP_CLOSE_UPSTREAM_UNREACHABLE;
    h->retry = true;
}

static const struct stp_up_ops prelude_ops = {
    .send = act_send,
    .start_tls = act_start_tls,
    .ready = act_ready,
    .fail = act_fail,
};

/* ---- steps ----------------------------------------------------------------- */

static void start_tls(struct stp_hop *h)
{
    if (stp_conn_start_tls(h->conn, h->tls, server_name(h)) < 0) {
        stp_hop_fail(h, STP_FAIL_HOP_TLS, "TLS setup failed");
        return;
    }
    enter(h, STP_HOP_TLS);
}

/* After the TCP connection and any TLS: the proxy's own dialogue, or
 * straight to relaying (the greeting then reaches the engine directly). */
static void begin(struct stp_hop *h)
{
    const struct stp_upstream_cfg *up = h->up;
    if (up->auth == STP_AUTH_XOAUTH2 && !h->token) {
        /* Read per session: a refresher outside may have replaced it. */
        char why[160], e[400];
        if (stp_read_secret(up->token_file, &h->token, why, sizeof(why)) < 0) {
            snprintf(e, sizeof(e), "token_file %s: %s", up->token_file, why);
            stp_hop_fail(h, STP_FAIL_HOP_AUTH, e);
            return;
        }
    }
    struct stp_prelude_cfg pc = {
        .starttls = up->tls == STP_TLS_STARTTLS ||
                    up->tls == STP_TLS_OPPORTUNISTIC,
        .opportunistic = up->tls == STP_TLS_OPPORTUNISTIC,
        .identity = up->identity == STP_ID_XCLIENT,
        .client = h->client_addr,
        .hostname = up->helo_name ? up->helo_name : h->hostname,
        .fallback = h->fallback,
        .auth = (int)up->auth,
        .user = up->username,
        .secret = up->auth == STP_AUTH_XOAUTH2 ? h->token : up->password,
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
        stp_addrs_health(h, true);
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

/* address = original-destination: where the client's connection was going,
 * never one of SRV's own listeners. */
static void original_destination(struct stp_hop *h,
                                 const struct stp_server *srv)
{
    char d[64], why[128];
    enter(h, STP_HOP_CONNECTING);
    /* Only intercepting sessions carry an address of their own. */
    if (!(h->own_dst = malloc(sizeof(*h->own_dst)))) {
        stp_hop_fail(h, STP_FAIL_UNREACHABLE, "out of memory");
        return;
    }
    int r = stp_tp_original_dst(stp_conn_fd(h->client), h->client_transparent,
                                h->own_dst);
    if (r < 0) {
        snprintf(why, sizeof(why), "original destination unknown: %s",
                 stp_strerror(r));
        stp_hop_fail(h, STP_FAIL_UNREACHABLE, why);
        return;
    }
    h->dst = h->own_dst;
    stp_format_addr((const struct sockaddr *)h->dst, d, sizeof(d));
    if (stp_tp_is_own(srv, h->dst)) {
        snprintf(why, sizeof(why),
                 "original destination %s is this proxy's own listener", d);
        stp_hop_fail(h, STP_FAIL_HOP_LOOP, why);
        return;
    }
    stp_log(STP_LOG_INFO, SID " event=original_destination upstream=%s "
            "address=%s", h->id, h->up->name, d);
    connect_to(h);
}

void stp_hop_start(struct stp_hop *h, const struct stp_server *srv)
{
    h->srv = srv;
    if (h->up->original_dst) {
        h->entry = -1;
        original_destination(h, srv);
        return;
    }
    stp_addrs_plan(h);
    try_next(h);
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
    if (k) {
        h->spoke = true;
        stp_conn_consume(h->conn, k);
    }
    if (h->retry) {
        h->retry = false;
        if (stp_addrs_more(h)) {
            try_next(h);
        } else {
            stp_addrs_health(h, false);
            give_up(h, STP_FAIL_UNREACHABLE, STP_CLOSE_UPSTREAM_UNREACHABLE);
        }
    } else if (h->tls_pending) {
        h->tls_pending = false;
        start_tls(h);
    } else if (h->prelude_ready) {
        stp_addrs_health(h, true);
        release_prelude(h);
    }
}

/* Before any greeting (or inside implicit TLS) a failure means this
 * address gives no service: another may. */
static bool before_greeting(const struct stp_hop *h)
{
    return h->stage == STP_HOP_CONNECTING ||
           (h->stage == STP_HOP_TLS && h->up->tls == STP_TLS_IMPLICIT) ||
           (h->stage == STP_HOP_PRELUDE && !h->spoke);
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
        const char *sn = server_name(h);
        h->tls_done = true;
        stp_log(STP_LOG_INFO,
                SID " event=upstream_tls upstream=%s tls=%s cipher=%s "
                    "server_name=%s verified=%s",
                h->id, h->up->name, stp_tls_version(t), stp_tls_cipher(t),
                sn ? sn : "none", h->up->verify ? "yes" : "no");
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
        const char *what = ev == STP_IO_EOF ? "connection closed"
                                            : stp_conn_error_text(h->conn, err);
        if (h->stage == STP_HOP_TLS) {
            snprintf(why, sizeof(why), "TLS handshake failed: %s", what);
            if (h->up->tls == STP_TLS_IMPLICIT && h->fallback)
                unreachable(h, STP_CLOSE_NEXT_HOP, why);
            else
                stp_hop_fail(h, STP_FAIL_HOP_TLS, why);
        } else if (before_greeting(h) && h->fallback) {
            snprintf(why, sizeof(why), "%s before the greeting", what);
            unreachable(h, STP_CLOSE_UPSTREAM_UNREACHABLE, why);
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
    if (h->lookup) {
        unreachable(h, STP_CLOSE_UPSTREAM_CONNECT_TIMEOUT,
                    "name lookup timeout");
        return;
    }
    bool silent = h->stage == STP_HOP_PRELUDE && !h->spoke;
    if (greeting || silent || h->stage == STP_HOP_CONNECTING) {
        unreachable(h,
                    greeting || silent ? STP_CLOSE_UPSTREAM_GREETING_TIMEOUT
                                       : STP_CLOSE_UPSTREAM_CONNECT_TIMEOUT,
                    greeting || silent ? "no greeting" : "connect timeout");
        return;
    }
    if (h->stage == STP_HOP_TLS && h->up->tls == STP_TLS_IMPLICIT &&
        h->fallback) {
        unreachable(h, STP_CLOSE_NEXT_HOP, "TLS handshake timeout");
        return;
    }
    bool tls_phase = h->up->tls != STP_TLS_NONE && !h->tls_done;
    stp_hop_fail(h, tls_phase ? STP_FAIL_HOP_TLS : STP_FAIL_HOP_IDENTITY,
                 "setup timeout");
}
