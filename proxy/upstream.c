/* The upstream leg of a session, up to the moment the client's session can
 * be relayed: connect, say who the client is (PROXY header first, or
 * XCLIENT), TLS (implicit, or STARTTLS spoken by the proxy itself). Until
 * then the client is not read, so no client byte can reach the upstream in
 * plaintext or before its identity. */
#include <string.h>

#include "identity.h"
#include "listener.h"
#include "session_int.h"

void stp_upstream_fail(struct stp_session *s, enum stp_up_failure f,
                       const char *reason)
{
    char e[256]; /* may quote what the next hop said or presented */
    stp_log(STP_LOG_WARN, SID " event=upstream_error upstream=%s error=\"%s\"",
            s->id, s->up->name, stp_log_esc(e, sizeof(e), reason));
    stp_session_reason(s, STP_CLOSE_NEXT_HOP);
    stp_smtp_next_hop_failed(&s->smtp, f);
}

static bool needs_prelude(const struct stp_upstream_cfg *u)
{
    return u->tls == STP_TLS_STARTTLS || u->identity == STP_ID_XCLIENT;
}

/* ---- the prelude's actions ------------------------------------------------ */

static void act_send(void *ctx, const char *line, size_t n)
{
    struct stp_session *s = ctx;
    if (stp_conn_write(s->upstream, line, n) < 0 ||
        stp_conn_write(s->upstream, "\r\n", 2) < 0)
        stp_upstream_fail(s, STP_UP_FAIL_PROTOCOL, "write failed");
}

static void act_start_tls(void *ctx)
{
    struct stp_session *s = ctx;
    s->up_tls_pending = true; /* once the 220 is consumed */
}

static void act_ready(void *ctx, const char *greeting, size_t n)
{
    struct stp_session *s = ctx;
    stp_session_transition(s, STP_SS_RELAY);
    /* The engine greets the client as if the upstream had just said it. */
    stp_smtp_upstream_input(&s->smtp, greeting, n);
}

static void act_fail(void *ctx, enum stp_up_failure f, const char *reason)
{
    stp_upstream_fail(ctx, f, reason);
}

static const struct stp_up_ops prelude_ops = {
    .send = act_send,
    .start_tls = act_start_tls,
    .ready = act_ready,
    .fail = act_fail,
};

/* ---- steps ----------------------------------------------------------------- */

void stp_upstream_free(struct stp_session *s)
{
    free(s->prelude);
    s->prelude = NULL;
}

static int start_tls(struct stp_session *s)
{
    int r = stp_conn_start_tls(s->upstream, s->up_tls, s->up->server_name);
    if (r < 0) {
        stp_upstream_fail(s, STP_UP_FAIL_TLS, "TLS setup failed");
        return r;
    }
    stp_session_transition(s, STP_SS_UPSTREAM_TLS);
    return 0;
}

/* After the TCP connection and any TLS: the proxy's own dialogue, or
 * straight to relaying (the greeting then reaches the engine directly). */
static void begin(struct stp_session *s)
{
    if (!needs_prelude(s->up)) {
        stp_session_transition(s, STP_SS_RELAY);
        return;
    }
    char xclient[256];
    struct stp_up_cfg pc = {
        .starttls = s->up->tls == STP_TLS_STARTTLS,
        .ehlo_name = s->gen->cfg.hostname,
        .lmtp = s->lcfg->protocol == STP_PROTO_LMTP,
        .xclient = NULL,
    };
    if (s->up->identity == STP_ID_XCLIENT) {
        /* Never carry on without the identity the upstream relies on. */
        if (stp_xclient_line(xclient, sizeof(xclient),
                             (struct sockaddr *)&s->peer_addr) < 0) {
            stp_upstream_fail(s, STP_UP_FAIL_IDENTITY,
                              "client address unknown");
            return;
        }
        pc.xclient = xclient;
    }
    /* The XCLIENT line lives right after the prelude, as long as it. */
    size_t xl = pc.xclient ? strlen(pc.xclient) + 1 : 0;
    if (!(s->prelude = malloc(sizeof(*s->prelude) + xl))) {
        stp_upstream_fail(s, STP_UP_FAIL_PROTOCOL, "out of memory");
        return;
    }
    if (pc.xclient)
        pc.xclient = memcpy((char *)(s->prelude + 1), pc.xclient, xl);
    stp_up_init(s->prelude, &pc, &prelude_ops, s);
    stp_session_transition(s, STP_SS_PRELUDE);
}

/* PROXY v1/v2: the very first bytes on the connection. */
static void send_proxy_header(struct stp_session *s)
{
    char buf[1024];
    int n;
    /* The address the client reached: asked only here, as few sessions
     * need it. */
    struct sockaddr_storage local;
    if (stp_conn_local(s->client, &local) < 0)
        memset(&local, 0, sizeof(local));
    const struct sockaddr *src = (struct sockaddr *)&s->peer_addr;
    const struct sockaddr *dst = (struct sockaddr *)&local;
    if (s->up->identity == STP_ID_PROXY_V1) {
        n = stp_proxy_v1(buf, sizeof(buf), src, dst);
    } else {
        /* The client's TLS is known here only on an implicit listener. */
        struct stp_tls_info ti = {0}, *tip = NULL;
        char cn[256];
        struct stp_tls *ct = stp_conn_tls(s->client);
        if (ct) {
            ti.version = stp_tls_version(ct);
            ti.cipher = stp_tls_cipher(ct);
            ti.sni = stp_tls_sni(ct);
            if (stp_tls_peer_cn(ct, cn, sizeof(cn))) {
                ti.cn = cn;
                ti.cert_verified = true; /* the handshake verified it */
                ti.cert_resumed = stp_tls_cert_resumed(ct);
            }
            tip = &ti;
        }
        n = stp_proxy_v2(buf, sizeof(buf), src, dst, tip);
    }
    if (n < 0 || stp_conn_write(s->upstream, buf, (size_t)n) < 0)
        stp_upstream_fail(s, STP_UP_FAIL_IDENTITY, "cannot build PROXY header");
}

static void connect_failed(struct stp_session *s, int err)
{
    stp_log(STP_LOG_WARN,
            SID " event=upstream_error upstream=%s address=%s "
                "error=\"%s\"",
            s->id, s->up->name, s->up->address_text, stp_strerror(err));
    stp_session_reason(s, STP_CLOSE_UPSTREAM_UNREACHABLE);
    stp_smtp_upstream_unreachable(&s->smtp);
}

void stp_upstream_start(struct stp_session *s)
{
    stp_session_transition(s, STP_SS_CONNECTING);
    /* The socket exists before connect, for its family. */
    int r = stp_session_new_upstream(s, s->up->addr.ss_family);
    if (r == 0)
        r = stp_conn_connect(s->upstream,
                             (const struct sockaddr *)&s->up->addr);
    if (r < 0)
        connect_failed(s, r);
}

static void prelude_input(struct stp_session *s)
{
    size_t n;
    const char *p = stp_conn_in(s->upstream, &n);
    if (n == 0)
        return;
    size_t k = stp_up_input(s->prelude, p, n);
    if (s->state == STP_SS_DRAINING || s->state == STP_SS_CLOSED)
        return;
    if (k)
        stp_conn_consume(s->upstream, k);
    if (s->up_tls_pending) {
        s->up_tls_pending = false;
        start_tls(s);
    } else if (s->prelude->step == STP_UP_READY) {
        stp_upstream_free(s);
    }
}

/* Events of the upstream connection while it is being set up. */
void stp_upstream_event(struct stp_conn *c, enum stp_io_event ev, int err)
{
    struct stp_session *s = stp_conn_owner(c);
    switch (ev) {
    case STP_IO_CONNECTED:
        if (err < 0) {
            connect_failed(s, err);
            break;
        }
        if (s->up->identity == STP_ID_PROXY_V1 ||
            s->up->identity == STP_ID_PROXY_V2)
            send_proxy_header(s);
        if (s->state == STP_SS_CONNECTING) {
            if (s->up->tls == STP_TLS_IMPLICIT)
                start_tls(s);
            else
                begin(s);
        }
        break;
    case STP_IO_TLS_READY:
        stp_log(STP_LOG_INFO,
                SID " event=upstream_tls upstream=%s tls=%s cipher=%s "
                    "server_name=%s verified=%s",
                s->id, s->up->name, stp_tls_version(stp_conn_tls(c)),
                stp_tls_cipher(stp_conn_tls(c)), s->up->server_name,
                s->up->verify ? "yes" : "no");
        if (s->prelude) {
            stp_session_transition(s, STP_SS_PRELUDE);
            stp_up_tls_done(s->prelude);
        } else {
            begin(s);
        }
        break;
    case STP_IO_DATA:
        if (s->state == STP_SS_PRELUDE)
            prelude_input(s);
        break;
    case STP_IO_DRAINED:
        break;
    case STP_IO_EOF:
    case STP_IO_ERROR: {
        char why[160];
        if (s->state == STP_SS_UPSTREAM_TLS) {
            snprintf(why, sizeof(why), "TLS handshake failed: %s",
                     ev == STP_IO_EOF ? "connection closed"
                                      : stp_conn_error_text(c, err));
            stp_upstream_fail(s, STP_UP_FAIL_TLS, why);
        } else {
            snprintf(why, sizeof(why), "connection %s during setup",
                     ev == STP_IO_EOF ? "closed" : stp_strerror(err));
            stp_upstream_fail(s,
                              s->up->tls == STP_TLS_NONE
                                  ? STP_UP_FAIL_PROTOCOL
                                  : STP_UP_FAIL_TLS,
                              why);
        }
        break;
    }
    }
}

void stp_upstream_timeout(struct stp_session *s)
{
    /* Never reached, or never greeted: as if it could not be reached. */
    bool greeting = s->state == STP_SS_RELAY;
    if (greeting || s->state == STP_SS_CONNECTING) {
        stp_log(STP_LOG_WARN,
                SID " event=upstream_error upstream=%s address=%s "
                    "error=\"%s\"",
                s->id, s->up->name, s->up->address_text,
                greeting ? "no greeting" : "connect timeout");
        stp_session_reason(s, greeting ? STP_CLOSE_UPSTREAM_GREETING_TIMEOUT
                                       : STP_CLOSE_UPSTREAM_CONNECT_TIMEOUT);
        stp_smtp_upstream_unreachable(&s->smtp);
        return;
    }
    bool tls_phase = s->up->tls != STP_TLS_NONE &&
                     !(s->prelude && s->prelude->tls_done);
    stp_upstream_fail(s, tls_phase ? STP_UP_FAIL_TLS : STP_UP_FAIL_IDENTITY,
                      "setup timeout");
}
