/* The admin endpoints' HTTP server, on the main thread's loop: the workers
 * never see a scrape, so it cannot slow a mail session. One request per
 * connection; the response ends it (Connection: close): scrapers and probes
 * open a connection per request anyway. Memory is freed in the last close
 * callback. */
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "admin.h"
#include "config.h"
#include "http.h"
#include "log.h"
#include "stp.h"

#define CONN_MAGIC 0x41444d43u /* "ADMC" */
#define LINGER_MS 1000 /* after a response, for the peer to read and close */

struct stp_admin {
    uv_tcp_t tcp;
    uv_loop_t *loop;
    const struct stp_admin_ops *ops;
    void *ctx;
    struct conn *conns;
    int n_conns;
    int refs;          /* the listening handle and every connection */
    bool closing;
    struct sockaddr_storage addr; /* as configured, for an upgrade */
    uv_tcp_t spare;    /* takes a connection to refuse, without memory */
    bool spare_busy;   /* closing the last one it took */
    bool pending;      /* a connection waits for the spare */
};

struct conn {
    uint32_t magic;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    uv_shutdown_t sd;
    struct stp_admin *a;
    struct conn *prev, *next;
    int handles;
    bool answered, closing;
    struct sockaddr_storage peer;
    char *resp;
    size_t n;
    char head[STP_ADMIN_MAX_HEAD];
};

static void admin_unref(struct stp_admin *a)
{
    if (--a->refs == 0)
        free(a);
}

static void conn_handle_closed(uv_handle_t *h)
{
    struct conn *c = h->data;
    if (--c->handles > 0)
        return;
    struct stp_admin *a = c->a;
    if (c->prev)
        c->prev->next = c->next;
    else
        a->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    a->n_conns--;
    free(c->resp);
    c->magic = 0;
    free(c);
    admin_unref(a);
}

static void conn_close(struct conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, conn_handle_closed);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    (void)req;
    (void)status; /* the peer's EOF, or the linger timer, closes */
}

static void on_written(uv_write_t *req, int status)
{
    struct conn *c = req->data;
    if (c->closing)
        return;
    /* Our side is done; reading on until the peer's EOF means no reset
     * (unread bytes at close would send one) can eat the response. */
    if (status < 0 || uv_shutdown(&c->sd, (uv_stream_t *)&c->tcp,
                                  on_shutdown) < 0)
        conn_close(c);
}

static void on_timeout(uv_timer_t *t);

static void respond(struct conn *c, int status, const char *type,
                    const char *body, size_t len, bool head_only)
{
    const char *phrase = status == 200   ? "OK"
                         : status == 404 ? "Not Found"
                         : status == 405 ? "Method Not Allowed"
                         : status == 503 ? "Service Unavailable"
                         : status == 500 ? "Internal Server Error"
                                         : "Bad Request";
    size_t cap = 512 + (head_only ? 0 : len);
    if (c->answered || !(c->resp = malloc(cap))) {
        conn_close(c);
        return;
    }
    c->answered = true;
    int n = snprintf(c->resp, cap,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
                     "Content-Length: %zu\r\n%sCache-Control: no-store\r\n"
                     "Connection: close\r\n\r\n",
                     status, phrase, type, len,
                     status == 405 ? "Allow: GET, HEAD\r\n" : "");
    if (!head_only) {
        memcpy(c->resp + n, body, len);
        n += (int)len;
    }
    uv_buf_t b = uv_buf_init(c->resp, (unsigned)n);
    c->wr.data = c;
    uv_timer_start(&c->timer, on_timeout, LINGER_MS, 0);
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_written) < 0)
        conn_close(c);
}

#define TEXT "text/plain; charset=utf-8"

static void respond_text(struct conn *c, int status, const char *body,
                         bool head_only)
{
    respond(c, status, TEXT, body, strlen(body), head_only);
}

static bool is(const struct stp_http_req *r, const char *path)
{
    return r->path_len == strlen(path) && memcmp(r->path, path, r->path_len) == 0;
}

static void serve_metrics(struct conn *c, bool head_only)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    int r = f ? c->a->ops->metrics(c->a->ctx, f) : -ENOMEM;
    if (f && fclose(f) != 0 && r == 0)
        r = -EIO;
    if (r < 0)
        respond_text(c, 500, "cannot render the metrics\n", head_only);
    else
        respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", text, len,
                head_only);
    free(text);
}

/* Methods first: no path of this server takes anything but GET and HEAD. */
static void route(struct conn *c, const struct stp_http_req *r)
{
    bool head_only = r->method == STP_HTTP_HEAD;
    if (r->method == STP_HTTP_OTHER)
        respond_text(c, 405, "method not allowed\n", false);
    else if (is(r, "/metrics"))
        serve_metrics(c, head_only);
    else if (is(r, "/healthz"))
        respond_text(c, 200, "ok\n", head_only);
    else if (is(r, "/readyz"))
        c->a->ops->ready(c->a->ctx)
            ? respond_text(c, 200, "ready\n", head_only)
            : respond_text(c, 503, "draining\n", head_only);
    else
        respond_text(c, 404, "not found\n", head_only);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct conn *c = h->data;
    (void)hint;
    /* Once answered, whatever else comes is read and dropped. */
    if (c->answered)
        *buf = uv_buf_init(c->head, sizeof(c->head));
    else
        *buf = uv_buf_init(c->head + c->n, (unsigned)(sizeof(c->head) - c->n));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = s->data;
    (void)buf;
    if (nread < 0) {
        conn_close(c);
        return;
    }
    if (nread == 0 || c->answered)
        return;
    c->n += (size_t)nread;
    struct stp_http_req r;
    long len = stp_http_parse(c->head, c->n, &r);
    if (len < 0 || (len == 0 && c->n == sizeof(c->head)))
        respond_text(c, 400, "bad request\n", false);
    else if (len > 0)
        route(c, &r);
}

/* No complete request in time: 400, then close. */
static void on_timeout(uv_timer_t *t)
{
    struct conn *c = t->data;
    if (c->answered)
        conn_close(c);
    else
        respond_text(c, 400, "request timeout\n", false);
}

static void refuse(struct stp_admin *a);

static void spare_closed(uv_handle_t *h)
{
    struct stp_admin *a = h->data;
    a->spare_busy = false;
    if (a->pending && !a->closing) {
        a->pending = false;
        refuse(a);
    }
    admin_unref(a);
}

/* Over the limit, or out of memory for a connection: taken and closed, as
 * libuv stops watching a listening socket whose connection is not taken.
 * The spare handle needs no memory; while it closes the last one, the next
 * waits (and libuv with it). */
static void refuse(struct stp_admin *a)
{
    if (a->spare_busy) {
        a->pending = true;
        return;
    }
    a->spare_busy = true;
    a->refs++;
    uv_tcp_init(a->loop, &a->spare);
    a->spare.data = a;
    if (uv_accept((uv_stream_t *)&a->tcp, (uv_stream_t *)&a->spare) == 0)
        uv_tcp_close_reset(&a->spare, spare_closed);
    else
        uv_close((uv_handle_t *)&a->spare, spare_closed);
}

/* Connections open from C's address, C included. */
static int from_same_address(const struct stp_admin *a, const struct conn *c)
{
    int n = 0;
    struct sockaddr_storage x = c->peer, y;
    stp_addr_set_port(&x, 0);
    for (const struct conn *o = a->conns; o; o = o->next) {
        y = o->peer;
        stp_addr_set_port(&y, 0);
        n += !o->closing && stp_same_addr(&x, &y);
    }
    return n;
}

static void on_connection(uv_stream_t *server, int status)
{
    struct stp_admin *a = server->data;
    if (status < 0 || a->closing)
        return;
    struct conn *c = a->n_conns < STP_ADMIN_MAX_CONNS ? calloc(1, sizeof(*c))
                                                     : NULL;
    if (!c) {
        refuse(a);
        return;
    }
    c->magic = CONN_MAGIC;
    c->a = a;
    a->refs++;
    a->n_conns++;
    c->next = a->conns;
    if (c->next)
        c->next->prev = c;
    a->conns = c;
    c->handles = 2;
    uv_tcp_init(a->loop, &c->tcp);
    uv_timer_init(a->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    int len = sizeof(c->peer);
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0 ||
        uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&c->peer, &len) < 0 ||
        from_same_address(a, c) > STP_ADMIN_MAX_PER_IP ||
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0) {
        conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, on_timeout, STP_ADMIN_TIMEOUT_MS, 0);
}

static void listener_closed(uv_handle_t *h)
{
    admin_unref(h->data);
}

/* Is FD bound to ADDR? Port 0 in ADDR: whichever port the kernel gave. */
static bool bound_to(int fd, const struct sockaddr_storage *addr)
{
    struct sockaddr_storage ss = {0};
    socklen_t len = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        return false;
    if (stp_addr_port(addr) == 0)
        stp_addr_set_port(&ss, 0);
    return stp_same_addr(&ss, addr);
}

int stp_admin_socket(const struct stp_admin *a, struct sockaddr_storage *addr)
{
    uv_os_fd_t fd;
    if (!a || a->closing || uv_fileno((const uv_handle_t *)&a->tcp, &fd) < 0)
        return -1;
    *addr = a->addr;
    return fd;
}

int stp_admin_start(struct stp_admin **out, uv_loop_t *loop,
                    const struct sockaddr_storage *addr, int fd,
                    const struct stp_admin_ops *ops, void *ctx, char *err,
                    size_t errlen)
{
    struct stp_admin *a = calloc(1, sizeof(*a));
    *out = NULL;
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    a->loop = loop;
    a->ops = ops;
    a->ctx = ctx;
    a->refs = 1;
    a->addr = *addr;
    uv_tcp_init(loop, &a->tcp);
    a->tcp.data = a;
    if (fd >= 0 && !bound_to(fd, addr)) {
        close(fd); /* [admin] moved: the old address is not ours now */
        fd = -1;
    }
    int r = fd >= 0 ? uv_tcp_open(&a->tcp, fd)
                    : uv_tcp_bind(&a->tcp, (const struct sockaddr *)addr, 0);
    if (r == 0)
        r = uv_listen((uv_stream_t *)&a->tcp, 64, on_connection);
    if (r < 0) {
        snprintf(err, errlen, "%s", uv_strerror(r));
        uv_close((uv_handle_t *)&a->tcp, listener_closed);
        return r;
    }
    struct sockaddr_storage ss;
    int len = sizeof(ss);
    char text[64] = "?";
    if (uv_tcp_getsockname(&a->tcp, (struct sockaddr *)&ss, &len) == 0)
        stp_format_addr((const struct sockaddr *)&ss, text, sizeof(text));
    stp_log(STP_LOG_INFO, "event=admin_listening addr=%s", text);
    *out = a;
    return 0;
}

void stp_admin_close(struct stp_admin *a)
{
    if (!a || a->closing)
        return;
    a->closing = true;
    for (struct conn *c = a->conns; c; c = c->next)
        conn_close(c);
    uv_close((uv_handle_t *)&a->tcp, listener_closed);
}
