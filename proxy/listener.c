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

static int listener_tls(struct stp_listener *lst, const char *hostname)
{
    const struct stp_listener_cfg *lc = lst->cfg;
    char err[512];
    if (lc->tls == STP_TLS_NONE)
        return 0;
    int r = stp_tls_ctx_new_server(lc->cert, lc->key, hostname, &lst->tls,
                                   err, sizeof(err));
    if (r < 0) {
        stp_log(STP_LOG_ERROR, "event=config_error listener=%s error=\"%s\"",
                lc->name, err);
        return r;
    }
    if (!lc->cert)
        stp_log(STP_LOG_WARN,
                "event=self_signed listener=%s cn=%s msg=\"no cert/key "
                "configured: using an in-memory SELF-SIGNED certificate that "
                "no client can verify; set cert = and key = for production\"",
                lc->name, hostname);
    return 0;
}

static void listener_closed(uv_handle_t *h) { (void)h; }

int stp_server_start(struct stp_server *srv, uv_loop_t *loop,
                     const struct stp_config *cfg)
{
    memset(srv, 0, sizeof(*srv));
    srv->loop = loop;
    srv->cfg = cfg;
    srv->listeners = calloc((size_t)cfg->n_listeners, sizeof(*srv->listeners));
    if (!srv->listeners)
        return -ENOMEM;
    for (int i = 0; i < cfg->n_listeners; i++) {
        struct stp_listener *lst = &srv->listeners[i];
        lst->cfg = &cfg->listeners[i];
        lst->srv = srv;
        stp_format_addr((const struct sockaddr *)&lst->cfg->addr, lst->addr,
                        sizeof(lst->addr));
        int r = listener_tls(lst, cfg->hostname);
        if (r < 0)
            return r;
        uv_tcp_init(loop, &lst->tcp);
        lst->tcp.data = lst;
        srv->n_listeners = i + 1;
        r = uv_tcp_bind(&lst->tcp, (const struct sockaddr *)&lst->cfg->addr,
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
    for (int i = 0; i < srv->n_listeners; i++)
        stp_tls_ctx_free(srv->listeners[i].tls);
    free(srv->listeners);
    srv->listeners = NULL;
}
