/* Listening sockets: TLS contexts per listener, bind, accept. */
#include <string.h>

#include "listener.h"
#include "log.h"
#include "session.h"
#include "stp.h"

static void on_connection(uv_stream_t *server, int status)
{
    struct stp_listener *lst = server->data;
    if (status < 0) {
        stp_log(STP_LOG_WARN, "event=accept_error listener=%s error=\"%s\"",
                lst->cfg->name, uv_strerror(status));
        return;
    }
    int r = stp_session_accept(lst);
    if (r < 0)
        stp_log(STP_LOG_WARN, "event=accept_error listener=%s error=\"%s\"",
                lst->cfg->name, stp_strerror(r));
}

int stp_server_tls(struct stp_server *srv, const struct stp_config *cfg,
                   char *err, size_t errlen)
{
    char msg[512];
    if (!srv->listeners &&
        !(srv->listeners = calloc((size_t)cfg->n_listeners,
                                  sizeof(*srv->listeners))))
        return -ENOMEM;
    if (!(srv->up_tls = calloc((size_t)cfg->n_upstreams + 1,
                               sizeof(*srv->up_tls))))
        return -ENOMEM;
    for (int i = 0; i < cfg->n_listeners; i++) {
        const struct stp_listener_cfg *lc = &cfg->listeners[i];
        struct stp_tls_server_opts o = {
            .cert = lc->cert, .key = lc->key, .cn = cfg->hostname,
            .params = &lc->tlsp, .sni = lc->sni, .n_sni = lc->n_sni,
            .client_ca = lc->client_ca, .verify_client = lc->verify_client,
        };
        if (lc->tls == STP_TLS_NONE)
            continue;
        if (stp_tls_ctx_new_server(&o, &srv->listeners[i].tls, msg,
                                   sizeof(msg)) < 0) {
            snprintf(err, errlen, "%s:%d: listener '%s': %s", cfg->path,
                     lc->line, lc->name, msg);
            return -EINVAL;
        }
        if (!lc->cert)
            stp_log(STP_LOG_WARN,
                    "event=self_signed listener=%s cn=%s msg=\"no cert/key "
                    "configured: using an in-memory SELF-SIGNED certificate "
                    "that no client can verify; set cert = and key = for "
                    "production\"",
                    lc->name, cfg->hostname);
    }
    for (int i = 0; i < cfg->n_upstreams; i++) {
        const struct stp_upstream_cfg *u = &cfg->upstreams[i];
        struct stp_tls_client_opts o = {
            .params = &u->tlsp, .verify = u->verify, .ca_file = u->ca_file,
            .cert = u->cert, .key = u->key,
        };
        if (u->tls == STP_TLS_NONE)
            continue;
        if (stp_tls_ctx_new_client(&o, &srv->up_tls[i], msg, sizeof(msg)) <
            0) {
            snprintf(err, errlen, "%s:%d: upstream '%s': %s", cfg->path,
                     u->line, u->name, msg);
            return -EINVAL;
        }
        if (!u->verify)
            stp_log(STP_LOG_WARN,
                    "event=no_verify upstream=%s msg=\"verify = no: the "
                    "upstream's certificate is not checked; anyone on the "
                    "path can read and change the mail\"",
                    u->name);
    }
    return 0;
}

struct stp_tls_ctx *stp_server_upstream_tls(const struct stp_server *srv,
                                            const struct stp_upstream_cfg *u)
{
    return srv->up_tls[u - srv->cfg->upstreams];
}

static void listener_closed(uv_handle_t *h) { (void)h; }

int stp_server_start(struct stp_server *srv, uv_loop_t *loop,
                     const struct stp_config *cfg)
{
    memset(srv, 0, sizeof(*srv));
    srv->loop = loop;
    srv->cfg = cfg;
    char err[1024];
    if (stp_server_tls(srv, cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s\n", err); /* FILE:LINE: message, as for -t */
        return -EINVAL;
    }
    for (int i = 0; i < cfg->n_listeners; i++) {
        struct stp_listener *lst = &srv->listeners[i];
        lst->cfg = &cfg->listeners[i];
        lst->srv = srv;
        stp_format_addr((const struct sockaddr *)&lst->cfg->addr, lst->addr,
                        sizeof(lst->addr));
        uv_tcp_init(loop, &lst->tcp);
        lst->tcp.data = lst;
        srv->n_listeners = i + 1;
        int r = uv_tcp_bind(&lst->tcp, (const struct sockaddr *)&lst->cfg->addr,
                        0);
        if (r == 0)
            r = uv_listen((uv_stream_t *)&lst->tcp, 511, on_connection);
        if (r < 0) {
            stp_log(STP_LOG_ERROR,
                    "event=listen_error listener=%s addr=%s error=\"%s\"",
                    lst->cfg->name, lst->addr, uv_strerror(r));
            return r;
        }
        stp_log(STP_LOG_INFO,
                "event=listening listener=%s addr=%s tls=%s require_tls=%s "
                "upstream=%s",
                lst->cfg->name, lst->addr,
                lst->cfg->tls == STP_TLS_NONE       ? "none"
                : lst->cfg->tls == STP_TLS_IMPLICIT ? "implicit"
                                                    : "starttls",
                lst->cfg->require_tls ? "yes" : "no",
                lst->cfg->upstream->address_text);
    }
    return 0;
}

void stp_server_stop(struct stp_server *srv)
{
    if (srv->stopping)
        return;
    srv->stopping = true;
    for (int i = 0; i < srv->n_listeners; i++)
        uv_close((uv_handle_t *)&srv->listeners[i].tcp, listener_closed);
    stp_sessions_shutdown(srv);
}

void stp_server_free(struct stp_server *srv)
{
    for (int i = 0; srv->listeners && i < srv->cfg->n_listeners; i++)
        stp_tls_ctx_free(srv->listeners[i].tls);
    for (int i = 0; srv->up_tls && i < srv->cfg->n_upstreams; i++)
        stp_tls_ctx_free(srv->up_tls[i]);
    free(srv->listeners);
    free(srv->up_tls);
    srv->listeners = NULL;
    srv->up_tls = NULL;
}
