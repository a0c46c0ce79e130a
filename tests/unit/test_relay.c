/* In-process tests of the relay (relay.c, nexthop.c, listener.c): in one
 * libuv loop, the proxy's own stp_server listening on 127.0.0.1:0 from a
 * configuration file, a scripted upstream SMTP server that records every
 * byte it gets, and a client (a libuv stream, or io.c's conn where TLS is
 * needed). The test drives the loop between its steps; a timer per case
 * turns a hang into a failure. What they pin down: bytes pass unchanged
 * both ways; a lost, refused or silent upstream gives the client a 421 and
 * nothing the upstream did not say; a slow upstream stalls the client
 * instead of growing the proxy, in plaintext and over TLS; a half-closed
 * client still gets its replies, and an unfinished message never completes;
 * pipelined plaintext after STARTTLS never reaches the upstream; a stop
 * says goodbye at the next command boundary, or cuts after drain_timeout;
 * limits and idle timeouts answer with a 421; and every session is freed
 * (n_sessions back to 0, the loop runs dry, ASan finds no leak).
 *
 * STP_TEST_ONLY=WORD runs the cases whose function names contain WORD;
 * STP_TEST_VERBOSE=1 shows the proxy's log. */
#define _GNU_SOURCE /* memmem */
#include <arpa/inet.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io.h"
#include "listener.h"
#include "log.h"
#include "tls.h"
#include "unit.h"

static uv_loop_t loop;
static char tmpdir[] = "/tmp/stp-test-relay-XXXXXX";

/* ---- growable byte strings ------------------------------------------------ */

struct bytes {
    char *p;
    size_t n, cap;
};

static void bytes_add(struct bytes *b, const char *p, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n)
            cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np) {
            fprintf(stderr, "out of memory\n");
            abort();
        }
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

/* The bytes from OFF on, printable even before any came. */
static const char *tail(const struct bytes *b, size_t off)
{
    return b->p ? b->p + off : "";
}

static void bytes_free(struct bytes *b)
{
    free(b->p);
    *b = (struct bytes){0};
}

/* Is A, all of it, the N bytes at P? Says where they differ if not. */
static bool same_bytes(const char *what, const struct bytes *a, const char *p,
                       size_t n)
{
    if (a->n == n && (n == 0 || memcmp(a->p, p, n) == 0))
        return true;
    size_t i = 0;
    while (a->p && i < a->n && i < n && a->p[i] == p[i])
        i++;
    size_t from = i > 40 ? i - 40 : 0;
    failf("%s: %zu bytes, want %zu; differ at %zu: got \"%s\" want \"%s\"",
          what, a->n, n, i, esc(tail(a, from), STP_MIN(a->n - from, 120)),
          esc(p + from, STP_MIN(n - from, 120)));
    return false;
}

/* ---- the case's clock ------------------------------------------------------ */

/* Each case has a few seconds; a wait that outlives them fails the case,
 * and every later wait in it returns at once. */
static uv_timer_t watchdog;
static bool expired;

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    expired = true;
}

#define PUMP_UNTIL(cond, ...)                                                  \
    do {                                                                       \
        while (!(cond) && !expired)                                            \
            uv_run(&loop, UV_RUN_ONCE);                                        \
        if (!(cond))                                                           \
            failf("timed out: " __VA_ARGS__);                                  \
    } while (0)

static uv_timer_t nap_timer;
static bool nap_over;

static void on_nap(uv_timer_t *t)
{
    (void)t;
    nap_over = true;
}

/* Run the loop for MS: long enough for anything already on its way to
 * arrive (loopback), to assert that something did not. */
static void pump_for(uint64_t ms)
{
    nap_over = false;
    uv_timer_start(&nap_timer, on_nap, ms, 0);
    while (!nap_over)
        uv_run(&loop, UV_RUN_ONCE);
}

/* ---- the scripted upstream ------------------------------------------------- */

#define UP_GREETING "220 up.test ESMTP scripted\r\n"
#define UP_EHLO                                                                \
    "250-up.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"
#define UP_OK "250 2.0.0 Ok\r\n"
#define UP_MAIL "250 2.1.0 Ok\r\n"
#define UP_RCPT "250 2.1.5 Ok\r\n"
#define UP_354 "354 End data with <CR><LF>.<CR><LF>\r\n"
#define UP_QUEUED "250 2.0.0 Ok: queued as 4711\r\n"
#define UP_BYE "221 2.0.0 Bye\r\n"
#define UP_WHAT "502 5.5.2 Error: command not recognized\r\n"
#define UP_EHLO_XCLIENT                                                        \
    "250-up.test\r\n250-XCLIENT NAME ADDR PORT\r\n250-PIPELINING\r\n"         \
    "250-8BITMIME\r\n250 SIZE 100000000\r\n"
#define UP_XCLIENT_GREETING "220 up.test ESMTP for the real client\r\n"

struct upstream;

/* One connection the upstream accepted. */
struct up_conn {
    uv_tcp_t tcp;
    struct upstream *up;
    size_t line_off;       /* commands are parsed up to here */
    bool in_data;          /* after our 354, until CRLF.CRLF */
    size_t scan;           /* where to look for the end of data */
    bool paused;           /* not reading (the back-pressure case) */
    bool closing;
    uv_shutdown_t sreq;
};

struct upstream {
    uv_tcp_t listener;
    struct sockaddr_in addr;
    struct up_conn *conn;  /* the latest one */
    int accepted;
    struct bytes rx;       /* every byte received, all connections */
    struct bytes tx;       /* every byte sent */
    size_t written;        /* of them, what the kernel took */
    const char *help;      /* the reply to HELP, when set */
    size_t data_start, data_end; /* the first message's content in rx */
    bool messages;         /* a message ended */
    /* the script's faults */
    bool close_on_mail;    /* MAIL arrives: close, no reply */
    bool bye_after_mail;   /* MAIL arrives: its 250, then close */
    bool pause_in_data;    /* stop reading once the 354 is sent */
    bool silent;           /* no greeting */
    const char *greeting;  /* instead of UP_GREETING */
    bool xclient;          /* offers XCLIENT, answers it with a greeting */
    size_t close_in_data;  /* > 0: close once this much content came */
    bool stopped;          /* the listener is closed */
    int rcvbuf;            /* > 0: SO_RCVBUF of accepted connections */
};

struct up_write {
    uv_write_t req;
    struct upstream *up;
    size_t n;
    char data[];
};

static void up_written(uv_write_t *req, int status)
{
    struct up_write *w = (struct up_write *)req;
    /* The proxy may be gone: not the upstream's concern. */
    if (status == 0)
        w->up->written += w->n;
    free(req);
}

static void up_send(struct up_conn *c, const char *text)
{
    size_t n = strlen(text);
    struct up_write *w = malloc(sizeof(*w) + n);
    w->up = c->up;
    w->n = n;
    memcpy(w->data, text, n);
    uv_buf_t b = uv_buf_init(w->data, (unsigned)n);
    bytes_add(&c->up->tx, text, n);
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, up_written) < 0)
        free(w);
}

static void up_closed(uv_handle_t *h)
{
    struct up_conn *c = h->data;
    if (c->up->conn == c)
        c->up->conn = NULL;
    free(c);
}

static void up_close(struct up_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    uv_close((uv_handle_t *)&c->tcp, up_closed);
}

/* After QUIT: the reply leaves first, then the FIN. */
static void up_shut(uv_shutdown_t *req, int status)
{
    (void)status;
    up_close(req->data);
}

static void up_hang_up(struct up_conn *c)
{
    c->sreq.data = c;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->paused = true; /* reads nothing more */
    if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, up_shut) < 0)
        up_close(c);
}

static bool verb_is(const char *line, size_t n, const char *verb)
{
    size_t k = strlen(verb);
    return n >= k && strncasecmp(line, verb, k) == 0 &&
           (n == k || line[k] == ' ' || line[k] == '\r');
}

static void up_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static char chunk[64 * 1024];
    (void)h;
    (void)suggested;
    *buf = uv_buf_init(chunk, sizeof(chunk));
}

/* Answer what has arrived: one reply per command line, the end of a message
 * found by CRLF.CRLF (the DATA line's CRLF counts as the first). */
static void up_process(struct up_conn *c)
{
    struct upstream *up = c->up;
    struct bytes *rx = &up->rx;
    while (!c->closing && !c->paused) {
        if (c->in_data && up->close_in_data &&
            rx->n - up->data_start >= up->close_in_data) {
            up_close(c);
            return;
        }
        if (c->in_data) {
            const char *end = memmem(rx->p + c->scan, rx->n - c->scan,
                                     "\r\n.\r\n", 5);
            if (!end) {
                c->scan = rx->n >= 4 ? rx->n - 4 : 0;
                return;
            }
            size_t at = (size_t)(end - rx->p);
            if (!up->messages) {
                up->data_end = at + 2; /* the content ends with its CRLF */
                up->messages = true;
            }
            c->in_data = false;
            c->line_off = at + 5;
            up_send(c, UP_QUEUED);
            continue;
        }
        const char *nl = memchr(rx->p + c->line_off, '\n',
                                rx->n - c->line_off);
        if (!nl)
            return;
        const char *line = rx->p + c->line_off;
        size_t n = (size_t)(nl - line) + 1;
        c->line_off += n;
        if (verb_is(line, n, "PROXY")) {
            continue; /* read, as a server that expects it does */
        } else if (verb_is(line, n, "EHLO")) {
            up_send(c, up->xclient ? UP_EHLO_XCLIENT : UP_EHLO);
        } else if (up->xclient && verb_is(line, n, "XCLIENT")) {
            up_send(c, UP_XCLIENT_GREETING);
        } else if (verb_is(line, n, "MAIL")) {
            if (up->close_on_mail) {
                up_close(c);
                return;
            }
            up_send(c, UP_MAIL);
            if (up->bye_after_mail) {
                up_hang_up(c);
                return;
            }
        } else if (verb_is(line, n, "RCPT")) {
            up_send(c, UP_RCPT);
        } else if (verb_is(line, n, "DATA")) {
            up_send(c, UP_354);
            c->in_data = true;
            c->scan = c->line_off - 2;
            if (!up->messages)
                up->data_start = c->line_off;
            if (up->pause_in_data) {
                c->paused = true;
                uv_read_stop((uv_stream_t *)&c->tcp);
            }
        } else if (up->help && verb_is(line, n, "HELP")) {
            up_send(c, up->help);
        } else if (verb_is(line, n, "NOOP") || verb_is(line, n, "RSET")) {
            up_send(c, UP_OK);
        } else if (verb_is(line, n, "QUIT")) {
            up_send(c, UP_BYE);
            up_hang_up(c);
            return;
        } else {
            up_send(c, UP_WHAT);
        }
    }
}

static void up_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct up_conn *c = s->data;
    if (nread < 0) {
        up_close(c);
        return;
    }
    if (nread == 0)
        return;
    bytes_add(&c->up->rx, buf->base, (size_t)nread);
    up_process(c);
}

static void up_resume(struct upstream *up)
{
    struct up_conn *c = up->conn;
    if (!c || !c->paused)
        return;
    c->paused = false;
    up->pause_in_data = false;
    uv_read_start((uv_stream_t *)&c->tcp, up_alloc, up_read);
    up_process(c); /* what came with the DATA line, if anything */
}

static void up_accept(uv_stream_t *server, int status)
{
    struct upstream *up = server->data;
    if (status < 0)
        return;
    struct up_conn *c = calloc(1, sizeof(*c));
    c->up = up;
    c->tcp.data = c;
    uv_tcp_init(&loop, &c->tcp);
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
        uv_close((uv_handle_t *)&c->tcp, up_closed);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1); /* replies leave at once, as a server's */
    /* One conversation at a time: the cases open one session each. */
    c->line_off = c->scan = up->rx.n;
    up->conn = c;
    up->accepted++;
    if (!up->silent)
        up_send(c, up->greeting ? up->greeting : UP_GREETING);
    uv_read_start((uv_stream_t *)&c->tcp, up_alloc, up_read);
}

/* UP is zeroed but for its script's faults. */
static void upstream_start(struct upstream *up)
{
    up->listener.data = up;
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    int len = sizeof(up->addr), fd = -1;
    CHECK(uv_tcp_init(&loop, &up->listener) == 0 &&
              uv_tcp_bind(&up->listener, (struct sockaddr *)&a, 0) == 0 &&
              uv_tcp_getsockname(&up->listener, (struct sockaddr *)&up->addr,
                                 &len) == 0 &&
              uv_fileno((uv_handle_t *)&up->listener, &fd) == 0,
          "upstream: bind");
    /* Accepted sockets inherit it (before listen: it sets the window). */
    if (up->rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &up->rcvbuf,
                   sizeof(up->rcvbuf));
    CHECK(uv_listen((uv_stream_t *)&up->listener, 8, up_accept) == 0,
          "upstream: listen");
}

static void upstream_stop(struct upstream *up)
{
    if (!up->listener.data)
        return; /* never started */
    if (up->conn)
        up_close(up->conn);
    if (!up->stopped)
        uv_close((uv_handle_t *)&up->listener, NULL);
    up->stopped = true;
}

static void upstream_free(struct upstream *up)
{
    bytes_free(&up->rx);
    bytes_free(&up->tx);
}

/* ---- the proxy ------------------------------------------------------------- */

struct proxy {
    struct stp_shared shared;
    struct stp_server srv;
    struct sockaddr_in addr; /* where it listens: the port the kernel gave */
    struct stp_sockets socks; /* the main thread's */
    bool started, empty;
};

static void on_empty(struct stp_server *srv)
{
    struct proxy *p = (struct proxy *)((char *)srv - offsetof(struct proxy,
                                                              srv));
    p->empty = true;
}

/* Address entries tried before UP's (failover cases), "A, B, ": set by
 * the case, cleared by world_end. */
static const char *first_entries = "";

/* A configuration: one listener at 127.0.0.1:0 in front of UP; the *_KEYS
 * are more lines for each section. NULL when it cannot be loaded. */
static struct stp_gen *make_gen(const struct upstream *up,
                                const char *proxy_keys,
                                const char *listener_keys,
                                const char *upstream_keys)
{
    struct stp_gen *g = NULL;
    char path[128], err[1024] = "";
    snprintf(path, sizeof(path), "%s/stp.conf", tmpdir);
    FILE *f = fopen(path, "w");
    if (!f) {
        failf("cannot write %s", path);
        return NULL;
    }
    fprintf(f,
            "[proxy]\n"
            "hostname = proxy.test\n"
            "%s"
            "\n"
            "[listener main]\n"
            "listen = 127.0.0.1:0\n"
            "upstream = up\n"
            "%s"
            "\n"
            "[upstream up]\n"
            "address = %s127.0.0.1:%d\n"
            "%s",
            proxy_keys, listener_keys, first_entries,
            ntohs(up->addr.sin_port), upstream_keys);
    fclose(f);
    if (stp_gen_new(path, &g, err, sizeof(err)) < 0)
        failf("configuration: %s", err);
    return g;
}

/* The daemon's start, in this loop. With KEEP_SOCKETS the main thread's
 * sockets stay open, for a reload; else the server has the only
 * descriptors and the port closes when it stops. */
static bool proxy_start(struct proxy *p, const struct upstream *up,
                        const char *proxy_keys, const char *listener_keys,
                        const char *upstream_keys, bool keep_sockets)
{
    *p = (struct proxy){0};
    char err[1024] = "";
    struct stp_gen *g = make_gen(up, proxy_keys, listener_keys, upstream_keys);
    if (!g)
        return false;
    CHECK(stp_shared_init(&p->shared) == 0, "shared init");
    int r = stp_sockets_bind(&p->socks, g, err, sizeof(err));
    int *fds = r == 0 ? stp_sockets_dup(&p->socks, g) : NULL;
    if (!fds) {
        failf("bind: %s", err);
        stp_sockets_close(&p->socks);
        stp_shared_free(&p->shared);
        stp_gen_unref(g);
        return false;
    }
    r = stp_server_start(&p->srv, &loop, g, &p->shared, 0, fds);
    /* As the daemon does: the server and its sessions hold the only
     * references, so ASan sees one that is dropped too early. */
    stp_gen_unref(g);
    if (!keep_sockets)
        stp_sockets_close(&p->socks);
    p->started = true;
    p->srv.on_empty = on_empty;
    CHECK(r == 0 && p->srv.listeners, "server start: %d", r);
    if (r < 0 || !p->srv.listeners)
        return false;
    const struct sockaddr_storage *b = &p->srv.listeners->bound;
    CHECK(b->ss_family == AF_INET && ((struct sockaddr_in *)b)->sin_port,
          "the listener's bound address has no port");
    memcpy(&p->addr, b, sizeof(p->addr));
    return true;
}

/* The listening socket of the proxy: for the back-pressure case, which
 * bounds what the kernel holds so that what is left to see is the proxy. */
static int proxy_listen_fd(struct proxy *p)
{
    int fd = -1;
    uv_fileno((uv_handle_t *)&p->srv.listeners->tcp, &fd);
    return fd;
}

static void proxy_stop(struct proxy *p)
{
    if (p->started)
        stp_server_stop(&p->srv, true);
}

/* After the loop ran dry: no session may be left. */
static void proxy_free(struct proxy *p)
{
    if (!p->started)
        return;
    CHECK(p->srv.n_sessions == 0 && p->srv.sessions == NULL,
          "%u sessions left at the end", p->srv.n_sessions);
    CHECK(p->shared.n_sessions == 0, "%u sessions still counted",
          p->shared.n_sessions);
    stp_server_free(&p->srv);
    stp_sockets_close(&p->socks);
    stp_shared_free(&p->shared);
    p->started = false;
}

/* ---- a plaintext client ----------------------------------------------------- */

struct client {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_shutdown_t sreq;
    int connected;         /* 1, or a negative error */
    bool open, eof, closing;
    int read_err;
    struct bytes rx;       /* every byte received */
    size_t seen;           /* the expected part of it */
    struct bytes sent;     /* every byte handed to a write */
    size_t written;        /* bytes whose writes completed */
    /* one long write (the back-pressure case): the kernel takes it as fast
     * as it can, a few chunks in flight at once */
    const char *bulk;
    size_t bulk_len, bulk_queued;
    int bulk_inflight;
    bool bulk_then_shut;   /* half-close once the bulk is queued */
    int sndbuf;            /* > 0: SO_SNDBUF, set before connecting */
    int rcvbuf;            /* > 0: SO_RCVBUF, set before connecting */
};

struct cl_write {
    uv_write_t req;
    size_t n;
    bool bulk;
    char data[];
};

static void client_pump_bulk(struct client *c);
static void client_shutdown(struct client *c);

static void cl_written(uv_write_t *req, int status)
{
    struct cl_write *w = (struct cl_write *)req;
    struct client *c = req->handle->data;
    if (status == 0)
        c->written += w->n;
    if (w->bulk) {
        c->bulk_inflight--;
        if (status == 0)
            client_pump_bulk(c);
    }
    free(w);
}

static void cl_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static char chunk[64 * 1024];
    (void)h;
    (void)suggested;
    *buf = uv_buf_init(chunk, sizeof(chunk));
}

static void cl_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct client *c = s->data;
    if (nread == UV_EOF) {
        c->eof = true;
        uv_read_stop(s);
    } else if (nread < 0) {
        c->read_err = (int)nread;
        c->eof = true;
        uv_read_stop(s);
    } else if (nread > 0) {
        bytes_add(&c->rx, buf->base, (size_t)nread);
    }
}

static void cl_connected(uv_connect_t *req, int status)
{
    struct client *c = req->handle->data;
    c->connected = status == 0 ? 1 : status;
    if (status == 0)
        uv_tcp_nodelay(&c->tcp, 1);
    if (status == 0)
        uv_read_start((uv_stream_t *)&c->tcp, cl_alloc, cl_read);
}

static bool client_connect(struct client *c, const struct sockaddr_in *to)
{
    int sndbuf = c->sndbuf, rcvbuf = c->rcvbuf;
    *c = (struct client){.sndbuf = sndbuf, .rcvbuf = rcvbuf};
    c->tcp.data = c;
    uv_tcp_init(&loop, &c->tcp);
    c->open = true;
    if (sndbuf > 0 || rcvbuf > 0) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (sndbuf > 0)
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
        if (rcvbuf > 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
        uv_tcp_open(&c->tcp, fd);
    }
    int r = uv_tcp_connect(&c->creq, &c->tcp, (const struct sockaddr *)to,
                           cl_connected);
    CHECK(r == 0, "connect: %s", uv_strerror(r));
    if (r < 0)
        return false;
    PUMP_UNTIL(c->connected != 0, "connecting to the proxy");
    CHECK(c->connected == 1, "connect: %s",
          c->connected < 0 ? uv_strerror(c->connected) : "pending");
    return c->connected == 1;
}

static void client_write(struct client *c, const char *p, size_t n)
{
    struct cl_write *w = malloc(sizeof(*w) + n);
    w->n = n;
    w->bulk = false;
    memcpy(w->data, p, n);
    bytes_add(&c->sent, p, n);
    uv_buf_t b = uv_buf_init(w->data, (unsigned)n);
    int r = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, cl_written);
    CHECK(r == 0, "client write: %s", uv_strerror(r));
    if (r < 0)
        free(w);
}

#define client_say(c, lit) client_write(c, S(lit))

#define BULK_CHUNK (64 * 1024)
#define BULK_INFLIGHT 4

/* At most BULK_INFLIGHT chunks queued in libuv: what the kernel would not
 * take stays here, unwritten, where the test can see it. */
static void client_pump_bulk(struct client *c)
{
    while (!c->closing && c->bulk_queued < c->bulk_len &&
           c->bulk_inflight < BULK_INFLIGHT) {
        size_t n = STP_MIN((size_t)BULK_CHUNK, c->bulk_len - c->bulk_queued);
        struct cl_write *w = malloc(sizeof(*w));
        w->n = n;
        w->bulk = true;
        uv_buf_t b = uv_buf_init((char *)c->bulk + c->bulk_queued,
                                 (unsigned)n);
        if (uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, cl_written) < 0) {
            free(w);
            failf("client bulk write failed");
            return;
        }
        c->bulk_queued += n;
        c->bulk_inflight++;
    }
    /* libuv sends the FIN after the writes queued before it. */
    if (c->bulk_then_shut && c->bulk_queued == c->bulk_len) {
        c->bulk_then_shut = false;
        client_shutdown(c);
    }
}

static void client_shutdown(struct client *c)
{
    int r = uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, NULL);
    CHECK(r == 0, "shutdown: %s", uv_strerror(r));
}

/* The next bytes from the proxy are exactly TEXT. */
static bool client_expect(struct client *c, const char *text, size_t n)
{
    PUMP_UNTIL(c->rx.n >= c->seen + n || c->eof,
               "waiting for \"%s\": got \"%s\"", esc(text, n),
               esc(tail(&c->rx, c->seen), c->rx.n - c->seen));
    size_t got = c->rx.n - c->seen;
    bool ok = got >= n && memcmp(tail(&c->rx, c->seen), text, n) == 0;
    CHECK(ok, "want \"%s\", got \"%s\"%s", esc(text, n),
          esc(tail(&c->rx, c->seen), got), c->eof ? " and EOF" : "");
    c->seen += ok ? n : got;
    return ok;
}

#define client_expect_lit(c, lit) client_expect(c, S(lit))

/* Nothing more, then the end of the connection. */
static void client_expect_eof(struct client *c)
{
    PUMP_UNTIL(c->eof, "waiting for the proxy to close");
    CHECK(c->rx.n == c->seen, "more after the expected: \"%s\"",
          esc(tail(&c->rx, c->seen), c->rx.n - c->seen));
    CHECK(c->read_err == 0, "the connection ended with %s",
          uv_strerror(c->read_err));
}

static void client_close(struct client *c)
{
    if (c->open && !c->closing) {
        c->closing = true;
        uv_close((uv_handle_t *)&c->tcp, NULL);
    }
}

static void client_free(struct client *c)
{
    bytes_free(&c->rx);
    bytes_free(&c->sent);
}

/* ---- a case ---------------------------------------------------------------- */

struct world {
    struct upstream up;
    struct proxy px;
    struct client cl;
    struct client late;    /* a second client */
    const char *proxy_keys, *upstream_keys; /* more configuration */
    bool keep_sockets;     /* for a reload */
};

static bool world_start(struct world *w, const char *listener_keys)
{
    expired = false;
    uv_timer_start(&watchdog, on_watchdog, 10000, 0);
    upstream_start(&w->up);
    return proxy_start(&w->px, &w->up,
                       w->proxy_keys ? w->proxy_keys : "drain_timeout = 5s\n",
                       listener_keys,
                       w->upstream_keys ? w->upstream_keys : "",
                       w->keep_sockets);
}

/* Whatever the case left open is closed and the loop runs dry: a session
 * that is never freed keeps a handle, and the loop never returns (the
 * alarm names the case). */
static void world_end(struct world *w)
{
    client_close(&w->cl);
    client_close(&w->late);
    proxy_stop(&w->px);
    upstream_stop(&w->up);
    uv_timer_stop(&watchdog);
    uv_timer_stop(&nap_timer);
    uv_run(&loop, UV_RUN_DEFAULT);
    first_entries = "";
    proxy_free(&w->px);
    client_free(&w->cl);
    client_free(&w->late);
    upstream_free(&w->up);
}

/* The session is over and freed: its close callbacks ran. */
static void expect_no_session(struct world *w)
{
    PUMP_UNTIL(w->px.srv.n_sessions == 0, "%u sessions still open",
               w->px.srv.n_sessions);
    CHECK(w->px.shared.n_sessions == 0, "%u sessions still counted",
          w->px.shared.n_sessions);
}

/* ---- the cases ---------------------------------------------------------------- */

#define MESSAGE                                                                \
    "From: <a@client.test>\r\n"                                                \
    "To: <b@up.test>\r\n"                                                      \
    "Subject: relay\r\n"                                                       \
    "\r\n"                                                                     \
    "..a line that starts with a dot, stuffed\r\n"                             \
    "8bit: \xc3\xa9t\xc3\xa9\r\n"                                              \
    "\r\n"

static void test_plain_session(void)
{
    case_begin("a plaintext session passes byte for byte both ways");
    struct world w = {0};
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\n");
        client_expect_lit(c, UP_EHLO);
        /* Pipelined up to DATA, which waits for its 354. */
        client_say(c, "MAIL FROM:<a@client.test>\r\nRCPT TO:<b@up.test>\r\n"
                      "DATA\r\n");
        client_expect_lit(c, UP_MAIL UP_RCPT UP_354);
        client_say(c, MESSAGE ".\r\n");
        client_expect_lit(c, UP_QUEUED);
        client_say(c, "QUIT\r\n");
        client_expect_lit(c, UP_BYE);
        client_expect_eof(c);
        /* Exactly what the other side said, nothing added or lost. */
        same_bytes("upstream received", &w.up.rx, c->sent.p, c->sent.n);
        same_bytes("client received", &c->rx, w.up.tx.p, w.up.tx.n);
        CHECK(w.up.messages && w.up.data_end - w.up.data_start ==
                                   sizeof(MESSAGE) - 1,
              "the message content was not found whole upstream");
        expect_no_session(&w);
    }
    world_end(&w);
    case_end();
}

static void test_upstream_lost_after_mail(void)
{
    case_begin("the upstream closing after MAIL: a 421, then the end");
    struct world w = {0};
    w.up.close_on_mail = true;
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\n");
        client_expect_lit(c, UP_EHLO);
        client_say(c, "MAIL FROM:<a@client.test>\r\n");
        client_expect_lit(c, "421 4.4.2 Upstream connection lost\r\n");
        /* No 250 for the MAIL the upstream never answered. */
        client_expect_eof(c);
        static const char want[] = UP_GREETING UP_EHLO
            "421 4.4.2 Upstream connection lost\r\n";
        same_bytes("client received", &c->rx, want, sizeof(want) - 1);
        static const char sent[] = "EHLO client.test\r\n"
                                   "MAIL FROM:<a@client.test>\r\n";
        same_bytes("upstream received", &w.up.rx, sent, sizeof(sent) - 1);
        expect_no_session(&w);
    }
    world_end(&w);
    case_end();
}

/* A deterministic message of N bytes: numbered lines, no lone dot. */
static char *make_message(size_t n)
{
    char *m = malloc(n);
    size_t off = 0;
    for (unsigned i = 0; off < n; i++) {
        char line[96];
        int k = snprintf(line, sizeof(line),
                         "line %09u the quick brown fox jumps over the lazy "
                         "dog 0123456789\r\n", i);
        size_t take = STP_MIN((size_t)k, n - off);
        memcpy(m + off, line, take);
        off += take;
    }
    /* It ends with a whole line. */
    memcpy(m + n - 2, "\r\n", 2);
    m[n - 3] = 'x';
    return m;
}

static long read_long(const char *path, int field)
{
    FILE *f = fopen(path, "r");
    long v = -1;
    for (int i = 0; f && i <= field; i++)
        if (fscanf(f, "%ld", &v) != 1)
            v = -1;
    if (f)
        fclose(f);
    return v;
}

/* The socket of this process whose local and peer addresses are these. */
static int find_socket(const struct sockaddr_in *local,
                       const struct sockaddr_in *peer)
{
    for (int fd = 0; fd < 4096; fd++) {
        struct sockaddr_in l, p;
        socklen_t ll = sizeof(l), pl = sizeof(p);
        if (getsockname(fd, (struct sockaddr *)&l, &ll) == 0 &&
            getpeername(fd, (struct sockaddr *)&p, &pl) == 0 &&
            l.sin_family == AF_INET && p.sin_family == AF_INET &&
            l.sin_port == local->sin_port && p.sin_port == peer->sin_port &&
            l.sin_addr.s_addr == local->sin_addr.s_addr &&
            p.sin_addr.s_addr == peer->sin_addr.s_addr)
            return fd;
    }
    return -1;
}

static int queued(int fd, unsigned long what)
{
    int n = 0;
    return fd >= 0 && ioctl(fd, what, &n) == 0 ? n : 0;
}

static uv_timer_t tick;
static size_t tick_last;
static int tick_quiet;

/* Every 100 ms: has the count at tick.data moved? */
static void on_tick(uv_timer_t *t)
{
    const size_t *count = t->data;
    tick_quiet = *count == tick_last ? tick_quiet + 1 : 0;
    tick_last = *count;
}

static void test_back_pressure(void)
{
    case_begin("an upstream that stops reading stalls the client, "
               "then every byte arrives");
    struct world w = {0};
    struct client *c = &w.cl;
    /* The kernel's share is bounded on every socket the test can reach:
     * ours, and the proxy's client side (inherited from its listening
     * socket). Its upstream side's send buffer grows up to tcp_wmem's
     * maximum: the message is larger than all of it together. */
    int small = 64 * 1024;
    long wmem = read_long("/proc/sys/net/ipv4/tcp_wmem", 2);
    if (wmem <= 0)
        wmem = 4 << 20;
    size_t total = (size_t)wmem * 2 + ((size_t)2 << 20);
    if (total < ((size_t)8 << 20))
        total = (size_t)8 << 20;
    char *msg = make_message(total);
    w.up.pause_in_data = true;
    w.up.rcvbuf = small;
    bool ok = world_start(&w, "tls = none\n");
    int lfd = ok ? proxy_listen_fd(&w.px) : -1;
    if (lfd >= 0)
        setsockopt(lfd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    c->sndbuf = small;
    if (ok && lfd >= 0 && client_connect(c, &w.px.addr)) {
        PUMP_UNTIL(w.up.conn, "the proxy never connected upstream");
        int ufd = -1, cfd = -1;
        if (w.up.conn)
            uv_fileno((uv_handle_t *)&w.up.conn->tcp, &ufd);
        uv_fileno((uv_handle_t *)&c->tcp, &cfd);
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                      "RCPT TO:<b@up.test>\r\nDATA\r\n");
        client_expect_lit(c, UP_EHLO UP_MAIL UP_RCPT UP_354);
        size_t head = c->sent.n;
        CHECK(w.up.conn && w.up.conn->paused, "the upstream did not pause");
        c->bulk = msg;
        c->bulk_len = total;
        client_pump_bulk(c);
        /* Stalled: nothing more taken for a while. */
        uv_timer_init(&loop, &tick);
        tick.data = &c->written;
        tick_last = c->written;
        tick_quiet = 0;
        uv_timer_start(&tick, on_tick, 100, 100);
        PUMP_UNTIL(tick_quiet >= 3 || c->written >= head + total,
                   "the client's writes never settled");
        uv_timer_stop(&tick);
        size_t taken = c->written - head;
        CHECK(taken < total,
              "the client wrote all %zu bytes while the upstream read "
              "nothing: the proxy buffered them", total);
        /* Where the bytes the client wrote are: its own send queue, the
         * proxy's two sockets, the upstream's receive queue, and what the
         * proxy holds. */
        struct sockaddr_in cl_addr, up_peer;
        int len = sizeof(cl_addr);
        uv_tcp_getsockname(&c->tcp, (struct sockaddr *)&cl_addr, &len);
        len = sizeof(up_peer);
        if (w.up.conn)
            uv_tcp_getpeername(&w.up.conn->tcp, (struct sockaddr *)&up_peer,
                               &len);
        int pfd_client = find_socket(&w.px.addr, &cl_addr);
        int pfd_up = find_socket(&up_peer, &w.up.addr);
        CHECK(pfd_client >= 0 && pfd_up >= 0,
              "the proxy's sockets not found (%d, %d)", pfd_client, pfd_up);
        size_t upstream_got = w.up.rx.n - w.up.data_start;
        size_t in_kernel = (size_t)queued(cfd, SIOCOUTQ) +
                           (size_t)queued(pfd_client, SIOCINQ) +
                           (size_t)queued(pfd_up, SIOCOUTQ) +
                           (size_t)queued(ufd, SIOCINQ);
        long held = (long)taken - (long)upstream_got - (long)in_kernel;
        long allowed = STP_OUTQ_HIGH + 4 * STP_BUF_SIZE;
        CHECK(held <= allowed,
              "the proxy holds %ld bytes of the message (more than %ld): "
              "taken %zu, upstream read %zu, in the kernel %zu",
              held, allowed, taken, upstream_got, in_kernel);
        if (getenv("STP_TEST_VERBOSE"))
            fprintf(stderr, "back-pressure: message %zu, taken %zu, "
                            "upstream read %zu, kernel %zu, proxy %ld\n",
                    total, taken, upstream_got, in_kernel, held);
        /* Reading again: everything, in order. */
        up_resume(&w.up);
        PUMP_UNTIL(c->written >= head + total, "the rest was never taken");
        client_say(c, ".\r\n");
        client_expect_lit(c, UP_QUEUED);
        CHECK(w.up.messages, "the message never ended upstream");
        if (w.up.messages && w.up.data_end - w.up.data_start == total) {
            CHECK(memcmp(w.up.rx.p + w.up.data_start, msg, total) == 0,
                  "the message arrived changed");
        } else {
            failf("the upstream got %zu bytes of content, want %zu",
                  w.up.messages ? w.up.data_end - w.up.data_start : 0,
                  total);
        }
        client_say(c, "QUIT\r\n");
        client_expect_lit(c, UP_BYE);
        client_expect_eof(c);
        expect_no_session(&w);
        uv_close((uv_handle_t *)&tick, NULL);
    }
    world_end(&w);
    free(msg);
    case_end();
}

static void test_half_close(void)
{
    case_begin("a client's half-close: its replies first, then the end");
    struct world w = {0};
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "NOOP\r\nNOOP\r\n");
        client_shutdown(c);
        client_expect_lit(c, UP_OK UP_OK);
        client_expect_eof(c);
        same_bytes("upstream received", &w.up.rx, S("NOOP\r\nNOOP\r\n"));
        expect_no_session(&w);
    }
    world_end(&w);
    case_end();
}

/* The client says STARTTLS and half-closes: no ClientHello can ever come, so
 * the session ends once the 220 is out, not after timeout_handshake. */
static void test_half_close_after_starttls(void)
{
    case_begin("STARTTLS then half-close: closed at once, not after the "
               "handshake timeout");
    struct world w = {0};
    if (world_start(&w, "tls = starttls\ntimeout_handshake = 5s\n") &&
        client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        uint64_t t0 = uv_now(&loop);
        client_say(c, "STARTTLS\r\n");
        client_shutdown(c);
        client_expect_lit(c, "220 2.0.0 Ready to start TLS\r\n");
        client_expect_eof(c);
        CHECK(uv_now(&loop) - t0 < 2000, "closed after %llu ms",
              (unsigned long long)(uv_now(&loop) - t0));
        expect_no_session(&w);
    }
    world_end(&w);
    case_end();
}

/* ---- STARTTLS, with io.c as the TLS client ----------------------------------- */

struct tls_client {
    struct stp_conn *conn;
    int connected, data, eof, error, tls_ready, last_err;
    bool freed;
    struct bytes rx;
    size_t seen;
    /* one long write, handed over while the conn's queue has room */
    const char *bulk;
    size_t bulk_len, bulk_off;
};

static void tc_pump_bulk(struct tls_client *t)
{
    while (t->bulk_off < t->bulk_len && !stp_conn_busy(t->conn)) {
        size_t n = STP_MIN((size_t)16384, t->bulk_len - t->bulk_off);
        int r = stp_conn_write(t->conn, t->bulk + t->bulk_off, n);
        if (r == 0)
            r = stp_conn_flush(t->conn);
        if (r < 0) {
            failf("client bulk write: %s", stp_strerror(r));
            t->bulk_len = t->bulk_off;
            return;
        }
        t->bulk_off += n;
    }
}

static void tc_event(struct stp_conn *conn, enum stp_io_event ev, int err)
{
    struct tls_client *t = stp_conn_owner(conn);
    size_t n;
    const char *p;
    switch (ev) {
    case STP_IO_CONNECTED: t->connected = err == 0 ? 1 : err; break;
    case STP_IO_DATA:
        t->data++;
        p = stp_conn_in(conn, &n);
        bytes_add(&t->rx, p, n);
        stp_conn_consume(conn, n);
        break;
    case STP_IO_EOF: t->eof++; break;
    case STP_IO_ERROR: t->error++; t->last_err = err; break;
    case STP_IO_TLS_READY: t->tls_ready++; break;
    case STP_IO_DRAINED: tc_pump_bulk(t); break;
    }
}

/* A TLS client context that takes the proxy's self-signed certificate. */
static struct stp_tls_ctx *tls_client_ctx(void)
{
    struct stp_tls_params params = {.min_version = STP_TLS_V1_2,
                                    .max_version = STP_TLS_V1_3};
    struct stp_tls_client_opts o = {.params = &params, .verify = false};
    struct stp_tls_ctx *cctx = NULL;
    struct stp_tls_err e;
    CHECK(stp_tls_ctx_new_client(&o, &cctx, &e) == 0, "client context: %s",
          e.msg);
    return cctx;
}

static void tc_freed(void *owner)
{
    ((struct tls_client *)owner)->freed = true;
}

static bool tc_expect(struct tls_client *t, const char *text, size_t n)
{
    PUMP_UNTIL(t->rx.n >= t->seen + n || t->eof || t->error,
               "waiting for \"%s\": got \"%s\"", esc(text, n),
               esc(tail(&t->rx, t->seen), t->rx.n - t->seen));
    size_t got = t->rx.n - t->seen;
    bool ok = got >= n && memcmp(tail(&t->rx, t->seen), text, n) == 0;
    CHECK(ok, "want \"%s\", got \"%s\"%s%s", esc(text, n),
          esc(tail(&t->rx, t->seen), got), t->eof ? " and EOF" : "",
          t->error ? " and an error" : "");
    t->seen += ok ? n : got;
    return ok;
}

static void tc_say(struct tls_client *t, const char *s)
{
    int r = stp_conn_write(t->conn, s, strlen(s));
    if (r == 0)
        r = stp_conn_flush(t->conn);
    CHECK(r == 0, "client write: %s", stp_strerror(r));
}

/* The in-process TLS client, connected to the proxy and reading. */
static bool tc_connect(struct tls_client *t, struct world *w)
{
    if (stp_conn_new(&loop, AF_INET, tc_event, t, &t->conn) < 0)
        return false;
    CHECK(stp_conn_connect(t->conn, (struct sockaddr *)&w->px.addr) == 0,
          "connect");
    PUMP_UNTIL(t->connected, "connecting");
    stp_conn_want_read(t->conn, true);
    return true;
}

/* The TLS client's case is over: close it, then the world. */
static void tc_end(struct tls_client *t, struct world *w,
                   struct stp_tls_ctx *cctx)
{
    if (t->conn)
        stp_conn_close(t->conn, tc_freed);
    world_end(w);
    stp_tls_ctx_free(cctx);
    bytes_free(&t->rx);
}

static void test_starttls_drops_pipelined_plaintext(void)
{
    case_begin("STARTTLS: plaintext pipelined after it never reaches the "
               "upstream");
    struct world w = {0};
    struct tls_client t = {0};
    struct stp_tls_ctx *cctx = tls_client_ctx();
    /* The proxy makes itself a self-signed certificate. */
    if (cctx && world_start(&w, "tls = starttls\n") &&
        tc_connect(&t, &w)) {
        tc_expect(&t, S(UP_GREETING));
        tc_say(&t, "EHLO client.test\r\n");
        tc_expect(&t, S("250-up.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                        "250-SIZE 100000000\r\n250 STARTTLS\r\n"));
        /* One write: the RSET is in the proxy's buffer with the STARTTLS. */
        tc_say(&t, "STARTTLS\r\nRSET\r\n");
        tc_expect(&t, S("220 2.0.0 Ready to start TLS\r\n"));
        pump_for(50);
        same_bytes("upstream before the handshake", &w.up.rx,
                   S("EHLO client.test\r\n"));
        CHECK(t.rx.n == t.seen, "more after the 220: \"%s\"",
              esc(tail(&t.rx, t.seen), t.rx.n - t.seen));
        CHECK(stp_conn_start_tls(t.conn, cctx, NULL) == 0, "start TLS");
        PUMP_UNTIL(t.tls_ready || t.error || t.eof, "the handshake");
        CHECK(t.tls_ready == 1, "no handshake: error %d (%s) eof %d",
              t.error, t.error ? stp_conn_error_text(t.conn, t.last_err) : "",
              t.eof);
        if (t.tls_ready) {
            /* The TLS session starts afresh: EHLO again, no STARTTLS
             * offered now, and the upstream sees only what came after. */
            tc_say(&t, "EHLO client.test\r\n");
            tc_expect(&t, S(UP_EHLO));
            tc_say(&t, "NOOP\r\n");
            tc_expect(&t, S(UP_OK));
            tc_say(&t, "QUIT\r\n");
            tc_expect(&t, S(UP_BYE));
            PUMP_UNTIL(t.eof || t.error, "the proxy's close");
            CHECK(t.rx.n == t.seen, "more after the expected: \"%s\"",
                  esc(tail(&t.rx, t.seen), t.rx.n - t.seen));
            same_bytes("upstream received", &w.up.rx,
                       S("EHLO client.test\r\nEHLO client.test\r\nNOOP\r\n"
                         "QUIT\r\n"));
            expect_no_session(&w);
        }
    }
    if (t.conn)
        stp_conn_close(t.conn, tc_freed);
    world_end(&w);
    CHECK(!t.conn || t.freed, "the client conn was not freed");
    stp_tls_ctx_free(cctx);
    bytes_free(&t.rx);
    case_end();
}

static void test_stop_idle_session(void)
{
    case_begin("a stop: an idle session gets a 421 and ends");
    struct world w = {0};
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\n");
        client_expect_lit(c, UP_EHLO);
        pump_for(20); /* idle between commands */
        stp_server_stop(&w.px.srv, false);
        client_expect_lit(c, "421 4.3.2 Service shutting down, closing "
                             "transmission channel\r\n");
        client_expect_eof(c);
        expect_no_session(&w);
        CHECK(w.px.empty, "on_empty was not called");
        same_bytes("upstream received", &w.up.rx, S("EHLO client.test\r\n"));
        /* The port is closed: nobody else gets in. */
        struct client *late = &w.late;
        late->tcp.data = late;
        uv_tcp_init(&loop, &late->tcp);
        late->open = true;
        uv_tcp_connect(&late->creq, &late->tcp,
                       (const struct sockaddr *)&w.px.addr, cl_connected);
        PUMP_UNTIL(late->connected != 0, "a connection after the stop");
        CHECK(late->connected == UV_ECONNREFUSED,
              "a connection after the stop: %s",
              late->connected == 1 ? "accepted"
                                   : uv_strerror(late->connected));
    }
    world_end(&w);
    case_end();
}

static void test_upstream_reply_then_close(void)
{
    case_begin("the upstream's last reply before it closes reaches the "
               "client, then a 421");
    struct world w = {0};
    w.up.bye_after_mail = true;
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\n");
        client_expect_lit(c, UP_EHLO);
        client_say(c, "MAIL FROM:<a@client.test>\r\n");
        client_expect_lit(c, UP_MAIL "421 4.4.2 Upstream connection lost\r\n");
        client_expect_eof(c);
        expect_no_session(&w);
    }
    world_end(&w);
    case_end();
}

/* The content of a message in two parts, the second with its end. */
#define PART1 "Subject: half\r\n\r\nthe first half of the body\r\n"
#define PART2 "and the second half\r\n.\r\n"

static void test_stop_waits_for_message(void)
{
    case_begin("a stop during DATA: the message completes, then the 421");
    struct world w = {0};
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                      "RCPT TO:<b@up.test>\r\nDATA\r\n");
        client_expect_lit(c, UP_EHLO UP_MAIL UP_RCPT UP_354);
        client_say(c, PART1);
        pump_for(20);
        stp_server_stop(&w.px.srv, false);
        pump_for(50);
        CHECK(c->rx.n == c->seen && !c->eof,
              "the stop interrupted the message: \"%s\"%s",
              esc(tail(&c->rx, c->seen), c->rx.n - c->seen),
              c->eof ? " and EOF" : "");
        client_say(c, PART2);
        client_expect_lit(c, UP_QUEUED "421 4.3.2 Service shutting down, "
                                       "closing transmission channel\r\n");
        client_expect_eof(c);
        CHECK(w.up.messages &&
                  w.up.data_end - w.up.data_start == sizeof(PART1 PART2) - 4,
              "the message did not arrive whole upstream");
        expect_no_session(&w);
    }
    world_end(&w);
    case_end();
}

static void test_half_close_mid_message(void)
{
    case_begin("a half-close in the middle of a message: it never "
               "completes upstream");
    struct world w = {0};
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                      "RCPT TO:<b@up.test>\r\nDATA\r\n");
        client_expect_lit(c, UP_EHLO UP_MAIL UP_RCPT UP_354);
        client_say(c, PART1);
        client_shutdown(c);
        client_expect_eof(c);
        expect_no_session(&w);
        PUMP_UNTIL(!w.up.conn, "the upstream connection was left open");
        CHECK(!w.up.messages, "an unfinished message completed upstream");
        static const char want[] = "EHLO client.test\r\n"
                                   "MAIL FROM:<a@client.test>\r\n"
                                   "RCPT TO:<b@up.test>\r\nDATA\r\n" PART1;
        same_bytes("upstream received", &w.up.rx, want, sizeof(want) - 1);
    }
    world_end(&w);
    case_end();
}

static void test_half_close_after_message_slow_upstream(void)
{
    case_begin("a whole message, QUIT and a half-close to a slow upstream: "
               "all delivered and answered");
    struct world w = {0};
    struct client *c = &w.cl;
    static const char end[] = ".\r\nQUIT\r\n";
    size_t len = (size_t)3 << 20; /* well over the proxy's queue */
    char *body = make_message(len), *msg = malloc(len + sizeof(end) - 1);
    memcpy(msg, body, len);
    memcpy(msg + len, end, sizeof(end) - 1);
    free(body);
    w.up.pause_in_data = true;
    if (world_start(&w, "tls = none\n") && client_connect(c, &w.px.addr)) {
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                      "RCPT TO:<b@up.test>\r\nDATA\r\n");
        client_expect_lit(c, UP_EHLO UP_MAIL UP_RCPT UP_354);
        c->bulk = msg;
        c->bulk_len = len + sizeof(end) - 1;
        c->bulk_then_shut = true;
        client_pump_bulk(c);
        pump_for(100); /* the proxy's queue fills; its reading stops */
        up_resume(&w.up);
        client_expect_lit(c, UP_QUEUED UP_BYE);
        client_expect_eof(c);
        CHECK(w.up.messages && w.up.data_end - w.up.data_start == len &&
                  memcmp(w.up.rx.p + w.up.data_start, msg, len) == 0,
              "the message did not arrive whole upstream");
        expect_no_session(&w);
    }
    world_end(&w);
    free(msg);
    case_end();
}

/* TLS to the client: the relay stops reading while the upstream's queue is
 * full, and must pump what wolfSSL and its buffers hold when it resumes
 * (no socket event comes for those bytes). */
static void test_back_pressure_tls(void)
{
    case_begin("back-pressure over TLS: the client stalls, then every byte "
               "arrives");
    struct world w = {0};
    struct tls_client t = {0};
    struct stp_tls_ctx *cctx = tls_client_ctx();
    int small = 64 * 1024;
    size_t total = (size_t)8 << 20;
    long wmem = read_long("/proc/sys/net/ipv4/tcp_wmem", 2);
    if (wmem > 0 && (size_t)wmem * 2 + ((size_t)2 << 20) > total)
        total = (size_t)wmem * 2 + ((size_t)2 << 20);
    char *msg = make_message(total);
    w.up.pause_in_data = true;
    w.up.rcvbuf = small;
    int lfd = -1;
    if (cctx && world_start(&w, "tls = starttls\n") &&
        (lfd = proxy_listen_fd(&w.px)) >= 0 &&
        stp_conn_new(&loop, AF_INET, tc_event, &t, &t.conn) == 0) {
        setsockopt(lfd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
        setsockopt(stp_conn_fd(t.conn), SOL_SOCKET, SO_SNDBUF, &small,
                   sizeof(small));
        CHECK(stp_conn_connect(t.conn, (struct sockaddr *)&w.px.addr) == 0,
              "connect");
        PUMP_UNTIL(t.connected, "connecting");
        stp_conn_want_read(t.conn, true);
        tc_expect(&t, S(UP_GREETING));
        tc_say(&t, "STARTTLS\r\n");
        tc_expect(&t, S("220 2.0.0 Ready to start TLS\r\n"));
        CHECK(stp_conn_start_tls(t.conn, cctx, NULL) == 0, "start TLS");
        PUMP_UNTIL(t.tls_ready || t.error || t.eof, "the handshake");
        CHECK(t.tls_ready == 1, "no handshake");
    }
    if (t.tls_ready == 1) {
        tc_say(&t, "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                   "RCPT TO:<b@up.test>\r\nDATA\r\n");
        tc_expect(&t, S(UP_EHLO UP_MAIL UP_RCPT UP_354));
        t.bulk = msg;
        t.bulk_len = total;
        tc_pump_bulk(&t);
        uv_timer_init(&loop, &tick);
        tick_last = t.bulk_off;
        tick_quiet = 0;
        tick.data = &t.bulk_off;
        uv_timer_start(&tick, on_tick, 100, 100);
        PUMP_UNTIL(tick_quiet >= 3 || t.bulk_off >= total,
                   "the client's writes never settled");
        uv_timer_stop(&tick);
        uv_close((uv_handle_t *)&tick, NULL);
        CHECK(t.bulk_off < total,
              "the client wrote all %zu bytes while the upstream read "
              "nothing: the proxy buffered them", total);
        if (getenv("STP_TEST_VERBOSE"))
            fprintf(stderr, "back-pressure over TLS: message %zu, taken "
                            "%zu\n", total, t.bulk_off);
        up_resume(&w.up);
        PUMP_UNTIL(t.bulk_off == total && stp_conn_idle(t.conn),
                   "the rest was never taken: %zu of %zu", t.bulk_off, total);
        tc_say(&t, ".\r\n");
        tc_expect(&t, S(UP_QUEUED));
        if (w.up.messages && w.up.data_end - w.up.data_start == total) {
            CHECK(memcmp(w.up.rx.p + w.up.data_start, msg, total) == 0,
                  "the message arrived changed");
        } else {
            failf("the upstream got %zu bytes of content, want %zu",
                  w.up.messages ? w.up.data_end - w.up.data_start
                                : w.up.rx.n - w.up.data_start,
                  total);
        }
        tc_say(&t, "QUIT\r\n");
        tc_expect(&t, S(UP_BYE));
        PUMP_UNTIL(t.eof || t.error, "the proxy's close");
        expect_no_session(&w);
    }
    tc_end(&t, &w, cctx);
    free(msg);
    case_end();
}

/* Mid-handshake the upstream is not read, and there is no channel for a
 * reply anyway: the loss is found once the handshake is done, and said over
 * TLS. */
static void test_upstream_lost_during_handshake(void)
{
    case_begin("the upstream lost during the client's handshake: a 421 "
               "over TLS after it");
    struct world w = {0};
    struct tls_client t = {0};
    struct stp_tls_ctx *cctx = tls_client_ctx();
    if (cctx && world_start(&w, "tls = starttls\n") &&
        tc_connect(&t, &w)) {
        tc_expect(&t, S(UP_GREETING));
        tc_say(&t, "STARTTLS\r\n");
        tc_expect(&t, S("220 2.0.0 Ready to start TLS\r\n"));
        if (w.up.conn)
            up_close(w.up.conn);
        PUMP_UNTIL(!w.up.conn, "closing the upstream");
        pump_for(20);
        CHECK(stp_conn_start_tls(t.conn, cctx, NULL) == 0, "start TLS");
        PUMP_UNTIL(t.tls_ready || t.error || t.eof, "the handshake");
        CHECK(t.tls_ready == 1, "no handshake: error %d eof %d", t.error,
              t.eof);
        tc_expect(&t, S("421 4.4.2 Upstream connection lost\r\n"));
        PUMP_UNTIL(t.eof || t.error, "the proxy's close");
        CHECK(t.rx.n == t.seen, "more after the 421: \"%s\"",
              esc(tail(&t.rx, t.seen), t.rx.n - t.seen));
        expect_no_session(&w);
    }
    tc_end(&t, &w, cctx);
    case_end();
}

static void test_connection_limit(void)
{
    case_begin("over max_connections_per_ip: a 421, and the first session "
               "goes on");
    struct world w = {0};
    if (world_start(&w, "tls = none\nmax_connections_per_ip = 1\n") &&
        client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl, *late = &w.late;
        client_expect_lit(c, UP_GREETING);
        if (client_connect(late, &w.px.addr)) {
            client_expect_lit(late, "421 4.7.0 proxy.test Error: too many "
                                    "connections\r\n");
            client_expect_eof(late);
        }
        PUMP_UNTIL(w.px.srv.n_sessions == 1, "the refused session stays");
        client_say(c, "EHLO client.test\r\n");
        client_expect_lit(c, UP_EHLO);
        client_say(c, "QUIT\r\n");
        client_expect_lit(c, UP_BYE);
        client_expect_eof(c);
        expect_no_session(&w);
        CHECK(w.up.accepted == 1, "%d upstream connections, want 1",
              w.up.accepted);
    }
    world_end(&w);
    case_end();
}

static void test_upstream_unreachable(void)
{
    case_begin("an upstream that refuses the connection: a 421");
    struct world w = {0};
    if (world_start(&w, "tls = none\n")) {
        upstream_stop(&w.up); /* its port is closed now */
        struct client *c = &w.cl;
        if (client_connect(c, &w.px.addr)) {
            client_expect_lit(c, "421 4.3.2 Service not available, closing "
                                 "transmission channel\r\n");
            client_expect_eof(c);
            expect_no_session(&w);
        }
    }
    world_end(&w);
    case_end();
}

static void test_upstream_never_greets(void)
{
    case_begin("an upstream that never greets: a 421 after timeout_connect");
    struct world w = {0};
    w.up.silent = true;
    w.upstream_keys = "timeout_connect = 300ms\n";
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        uint64_t t0 = uv_now(&loop);
        client_expect_lit(c, "421 4.3.2 Service not available, closing "
                             "transmission channel\r\n");
        uint64_t took = uv_now(&loop) - t0;
        CHECK(took >= 250, "the 421 came after %" PRIu64 " ms, before the "
              "timeout", took);
        client_expect_eof(c);
        expect_no_session(&w);
        PUMP_UNTIL(!w.up.conn, "the upstream connection was left open");
        CHECK(w.up.rx.n == 0, "the upstream got \"%s\"",
              esc(tail(&w.up.rx, 0), w.up.rx.n));
    }
    world_end(&w);
    case_end();
}

/* Start U (it is tried before the world's upstream) and name it first in
 * the address list, its entry written into ENTRIES. */
static void entry_before(struct upstream *u, char entries[64])
{
    upstream_start(u);
    snprintf(entries, 64, "127.0.0.1:%d, ", ntohs(u->addr.sin_port));
    first_entries = entries;
}

/* A plaintext EHLO/QUIT through C, the upstream's words back. */
static void short_session(struct client *c)
{
    client_expect_lit(c, UP_GREETING);
    client_say(c, "EHLO client.test\r\nQUIT\r\n");
    client_expect_lit(c, UP_EHLO UP_BYE);
    client_expect_eof(c);
}

static void test_failover_refused(void)
{
    case_begin("failover: a refused first address, the second serves, "
               "the client sees only it");
    struct world w = {0};
    struct upstream dead = {0};
    char entries[64];
    entry_before(&dead, entries);
    upstream_stop(&dead); /* its port is closed now */
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        short_session(&w.cl);
        same_bytes("upstream received", &w.up.rx, w.cl.sent.p, w.cl.sent.n);
        same_bytes("client received", &w.cl.rx, w.up.tx.p, w.up.tx.n);
        expect_no_session(&w);
    }
    world_end(&w);
    upstream_free(&dead);
    case_end();
}

static void test_failover_refusing_greeting(void)
{
    case_begin("failover: a 421 greeting is the next address, then the "
               "entry is skipped for retry_after");
    struct world w = {0};
    struct upstream busy = {.greeting = "421 4.3.2 busy.test busy\r\n"};
    char entries[64];
    entry_before(&busy, entries);
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        short_session(&w.cl);
        /* The refusing greeting never reached the client. */
        same_bytes("client received", &w.cl.rx, w.up.tx.p, w.up.tx.n);
        CHECK(busy.accepted == 1 && busy.rx.n == 0,
              "the busy address: %d connections, got \"%s\"", busy.accepted,
              esc(tail(&busy.rx, 0), busy.rx.n));
        expect_no_session(&w);
        /* A second session goes straight to the address that answers. */
        if (client_connect(&w.late, &w.px.addr)) {
            short_session(&w.late);
            CHECK(busy.accepted == 1, "the skipped entry was tried again");
            CHECK(w.up.accepted == 2, "%d sessions upstream", w.up.accepted);
        }
    }
    upstream_stop(&busy); /* before the loop runs dry */
    world_end(&w);
    upstream_free(&busy);
    case_end();
}

static void test_failover_silent(void)
{
    case_begin("failover: a silent first address, the second after "
               "timeout_connect");
    struct world w = {0};
    struct upstream mute = {.silent = true};
    char entries[64];
    entry_before(&mute, entries);
    w.upstream_keys = "timeout_connect = 300ms\n";
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        uint64_t t0 = uv_now(&loop);
        short_session(&w.cl);
        CHECK(uv_now(&loop) - t0 >= 250, "served before the timeout");
        CHECK(mute.accepted == 1, "%d connections to the silent address",
              mute.accepted);
        PUMP_UNTIL(!mute.conn, "the silent address's connection left open");
        expect_no_session(&w);
    }
    upstream_stop(&mute); /* before the loop runs dry */
    world_end(&w);
    upstream_free(&mute);
    case_end();
}

static void test_name_lookup(void)
{
    case_begin("a name: looked up off the loop, its addresses tried in "
               "turn, two sessions at once");
    struct world w = {0};
    char entries[64];
    /* localhost is ::1 (nobody there) and 127.0.0.1 (the upstream). */
    if (world_start(&w, "tls = none\n")) {
        snprintf(entries, sizeof(entries), "localhost:%d, ",
                 ntohs(w.up.addr.sin_port));
        first_entries = entries;
        proxy_stop(&w.px);
        uv_run(&loop, UV_RUN_NOWAIT);
        proxy_free(&w.px);
        if (proxy_start(&w.px, &w.up, "drain_timeout = 5s\n",
                        "tls = none\n", "", false) &&
            client_connect(&w.cl, &w.px.addr) &&
            client_connect(&w.late, &w.px.addr)) {
            short_session(&w.cl);
            short_session(&w.late);
            CHECK(w.up.accepted == 2, "%d sessions upstream", w.up.accepted);
        }
    }
    world_end(&w);
    case_end();
}

static void test_failover_all_dead(void)
{
    case_begin("failover: when no address answers, one 421");
    struct world w = {0};
    struct upstream busy = {.greeting = "554 5.3.2 busy.test no\r\n"};
    char entries[64];
    entry_before(&busy, entries);
    if (world_start(&w, "tls = none\n")) {
        upstream_stop(&w.up); /* the last one refuses connections */
        if (client_connect(&w.cl, &w.px.addr)) {
            client_expect_lit(&w.cl, "421 4.3.2 Service not available, "
                                     "closing transmission channel\r\n");
            client_expect_eof(&w.cl);
            expect_no_session(&w);
        }
    }
    upstream_stop(&busy); /* before the loop runs dry */
    world_end(&w);
    upstream_free(&busy);
    case_end();
}

static void test_idle_timeout(void)
{
    case_begin("an idle client: a 421 after timeout_idle, both sides closed");
    struct world w = {0};
    if (world_start(&w, "tls = none\ntimeout_idle = 300ms\n") &&
        client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\n");
        client_expect_lit(c, UP_EHLO);
        client_expect_lit(c, "421 4.4.2 proxy.test Error: timeout "
                             "exceeded\r\n");
        client_expect_eof(c);
        expect_no_session(&w);
        PUMP_UNTIL(!w.up.conn, "the upstream connection was left open");
    }
    world_end(&w);
    case_end();
}

static void test_drain_timeout_cuts_message(void)
{
    case_begin("a stop with a message that never ends: after drain_timeout, "
               "a 421 and the message is cut");
    struct world w = {0};
    w.proxy_keys = "drain_timeout = 300ms\n";
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                      "RCPT TO:<b@up.test>\r\nDATA\r\n");
        client_expect_lit(c, UP_EHLO UP_MAIL UP_RCPT UP_354);
        client_say(c, PART1);
        pump_for(20);
        stp_server_stop(&w.px.srv, false);
        pump_for(100);
        CHECK(c->rx.n == c->seen && !c->eof, "the stop did not wait");
        client_expect_lit(c, "421 4.3.2 Service shutting down, closing "
                             "transmission channel\r\n");
        client_expect_eof(c);
        expect_no_session(&w);
        CHECK(w.px.empty, "on_empty was not called");
        PUMP_UNTIL(!w.up.conn, "the upstream connection was left open");
        CHECK(!w.up.messages, "the unfinished message completed upstream");
    }
    world_end(&w);
    case_end();
}

/* SIGHUP's work in a worker: new sessions get the new configuration on the
 * same port; an open one keeps its own to the end, and the old generation
 * goes with its last session (ASan sees a leak or a use after free). */
static void test_reload_keeps_open_session(void)
{
    case_begin("a reload: new sessions go to the new upstream, the open one "
               "stays on the old");
    struct world w = {0};
    struct upstream b = {0};
    struct client second = {0};
    w.keep_sockets = true;
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO first.test\r\n");
        client_expect_lit(c, UP_EHLO);
        upstream_start(&b);
        struct stp_gen *g = make_gen(&b, "drain_timeout = 5s\n",
                                     "tls = none\n", "");
        char err[1024] = "";
        int *fds = NULL;
        if (g && stp_sockets_bind(&w.px.socks, g, err, sizeof(err)) == 0)
            fds = stp_sockets_dup(&w.px.socks, g);
        CHECK(fds, "the new generation's sockets: %s", err);
        if (fds) {
            CHECK(stp_server_adopt(&w.px.srv, g, fds) == 0, "adopt");
            stp_sockets_keep_only(&w.px.socks, g);
            CHECK(w.px.srv.gen == g, "the server did not switch");
        }
        stp_gen_unref(g); /* the server has its own reference */
        if (client_connect(&second, &w.px.addr)) {
            client_expect_lit(&second, UP_GREETING);
            client_say(&second, "EHLO second.test\r\nQUIT\r\n");
            client_expect_lit(&second, UP_EHLO UP_BYE);
            client_expect_eof(&second);
        }
        client_say(c, "NOOP\r\nQUIT\r\n");
        client_expect_lit(c, UP_OK UP_BYE);
        client_expect_eof(c);
        expect_no_session(&w);
        same_bytes("the old upstream received", &w.up.rx,
                   S("EHLO first.test\r\nNOOP\r\nQUIT\r\n"));
        same_bytes("the new upstream received", &b.rx,
                   S("EHLO second.test\r\nQUIT\r\n"));
    }
    client_close(&second);
    upstream_stop(&b);
    world_end(&w);
    client_free(&second);
    upstream_free(&b);
    case_end();
}

static void test_implicit_tls(void)
{
    case_begin("implicit TLS: the handshake first, then the upstream");
    struct world w = {0};
    struct tls_client t = {0};
    struct stp_tls_ctx *cctx = tls_client_ctx();
    if (cctx && world_start(&w, "tls = implicit\n") &&
        tc_connect(&t, &w)) {
        pump_for(50);
        CHECK(w.up.accepted == 0, "the upstream was called before the "
              "client's handshake");
        CHECK(stp_conn_start_tls(t.conn, cctx, NULL) == 0, "start TLS");
        PUMP_UNTIL(t.tls_ready || t.error || t.eof, "the handshake");
        CHECK(t.tls_ready == 1, "no handshake");
        tc_expect(&t, S(UP_GREETING));
        tc_say(&t, "EHLO client.test\r\n");
        tc_expect(&t, S(UP_EHLO));
        tc_say(&t, "QUIT\r\n");
        tc_expect(&t, S(UP_BYE));
        PUMP_UNTIL(t.eof || t.error, "the proxy's close");
        same_bytes("upstream received", &w.up.rx,
                   S("EHLO client.test\r\nQUIT\r\n"));
        expect_no_session(&w);
    }
    tc_end(&t, &w, cctx);
    case_end();
}

static void test_handshake_timeout(void)
{
    case_begin("implicit TLS, no handshake: closed after timeout_handshake, "
               "no upstream");
    struct world w = {0};
    if (world_start(&w, "tls = implicit\ntimeout_handshake = 300ms\n") &&
        client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        uint64_t t0 = uv_now(&loop);
        client_expect_eof(c);
        CHECK(uv_now(&loop) - t0 >= 250, "closed before the timeout");
        expect_no_session(&w);
        CHECK(w.up.accepted == 0, "an upstream connection for a client "
              "that never finished its handshake");
    }
    world_end(&w);
    case_end();
}

static void test_client_reset_mid_message(void)
{
    case_begin("a client reset during DATA: the message never completes, "
               "the upstream is closed");
    struct world w = {0};
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                      "RCPT TO:<b@up.test>\r\nDATA\r\n");
        client_expect_lit(c, UP_EHLO UP_MAIL UP_RCPT UP_354);
        client_say(c, PART1);
        pump_for(20);
        c->closing = true;
        uv_tcp_close_reset(&c->tcp, NULL);
        expect_no_session(&w);
        PUMP_UNTIL(!w.up.conn, "the upstream connection was left open");
        CHECK(!w.up.messages, "an unfinished message completed upstream");
    }
    world_end(&w);
    case_end();
}

static void test_reply_timeout(void)
{
    case_begin("an upstream that stops answering: a 421 after timeout_reply");
    struct world w = {0};
    w.upstream_keys = "timeout_reply = 300ms\n";
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\n");
        client_expect_lit(c, UP_EHLO);
        if (w.up.conn) { /* it reads on, but answers nothing more */
            w.up.conn->paused = true;
        }
        client_say(c, "MAIL FROM:<a@client.test>\r\n");
        client_expect_lit(c, "421 4.4.2 Upstream connection lost\r\n");
        client_expect_eof(c);
        expect_no_session(&w);
        PUMP_UNTIL(!w.up.conn, "the upstream connection was left open");
    }
    world_end(&w);
    case_end();
}

static void test_command_timeout(void)
{
    case_begin("a command line that never ends: a 421 after timeout_command");
    struct world w = {0};
    if (world_start(&w, "tls = none\ntimeout_command = 300ms\n") &&
        client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "NOOP");
        client_expect_lit(c, "421 4.4.2 proxy.test Error: timeout "
                             "exceeded\r\n");
        client_expect_eof(c);
        expect_no_session(&w);
        CHECK(w.up.rx.n == 0, "the upstream got \"%s\"",
              esc(tail(&w.up.rx, 0), w.up.rx.n));
    }
    world_end(&w);
    case_end();
}

/* Over TLS the half-close is the client's close_notify (TLS 1.3 lets the
 * other side go on writing): the replies to what it sent still come. */
static void test_half_close_tls(void)
{
    case_begin("a half-close over TLS (close_notify): the replies still "
               "come");
    struct world w = {0};
    struct tls_client t = {0};
    struct stp_tls_ctx *cctx = tls_client_ctx();
    if (cctx && world_start(&w, "tls = implicit\n") &&
        tc_connect(&t, &w)) {
        CHECK(stp_conn_start_tls(t.conn, cctx, NULL) == 0, "start TLS");
        PUMP_UNTIL(t.tls_ready || t.error || t.eof, "the handshake");
        CHECK(t.tls_ready == 1, "no handshake");
        tc_expect(&t, S(UP_GREETING));
        int r = stp_conn_write(t.conn, S("NOOP\r\nNOOP\r\n"));
        if (r == 0)
            r = stp_conn_close_notify(t.conn);
        CHECK(r == 0, "write and close_notify: %s", stp_strerror(r));
        tc_expect(&t, S(UP_OK UP_OK));
        PUMP_UNTIL(t.eof || t.error, "the proxy's close");
        same_bytes("upstream received", &w.up.rx, S("NOOP\r\nNOOP\r\n"));
        expect_no_session(&w);
    }
    tc_end(&t, &w, cctx);
    case_end();
}

/* The proxy closes a client that is still sending: its last reply must not
 * be lost to a reset (the kernel resets a socket closed with unread input,
 * and a reset may discard what the client has not read yet). */
static void test_upstream_lost_while_client_sends(void)
{
    case_begin("the upstream lost while the client streams a message: the "
               "client gets the 421");
    struct world w = {0};
    struct client *c = &w.cl;
    size_t total = (size_t)4 << 20;
    char *msg = make_message(total);
    w.up.close_in_data = 256 * 1024;
    /* Small windows: the proxy closes with the client's bytes unread. */
    int small = 64 * 1024;
    c->sndbuf = small;
    if (world_start(&w, "tls = none\n") &&
        setsockopt(proxy_listen_fd(&w.px), SOL_SOCKET, SO_RCVBUF, &small,
                   sizeof(small)) == 0 &&
        client_connect(c, &w.px.addr)) {
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                      "RCPT TO:<b@up.test>\r\nDATA\r\n");
        client_expect_lit(c, UP_EHLO UP_MAIL UP_RCPT UP_354);
        c->bulk = msg;
        c->bulk_len = total;
        client_pump_bulk(c);
        PUMP_UNTIL(c->eof, "the proxy never closed");
        static const char want[] = "421 4.4.2 Upstream connection lost\r\n";
        size_t got = c->rx.n - c->seen;
        CHECK(got == sizeof(want) - 1 &&
                  memcmp(tail(&c->rx, c->seen), want, got) == 0,
              "after the 354 the client got \"%s\" (then %s), want \"%s\"",
              esc(tail(&c->rx, c->seen), got),
              c->read_err ? uv_strerror(c->read_err) : "EOF", esc(S(want)));
        if (getenv("STP_TEST_VERBOSE"))
            fprintf(stderr, "upstream lost mid-message: the client wrote "
                            "%zu of %zu, then %s\n", c->written, total,
                    c->read_err ? uv_strerror(c->read_err) : "EOF");
        CHECK(!w.up.messages, "the message completed upstream");
        expect_no_session(&w);
    }
    world_end(&w);
    free(msg);
    case_end();
}

/* The next hop learns who the client is before any byte of it. */
static void test_identity_xclient(void)
{
    case_begin("client_identity = xclient: XCLIENT first, the client greeted "
               "with its reply");
    struct world w = {0};
    w.up.xclient = true;
    w.upstream_keys = "client_identity = xclient\n";
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_XCLIENT_GREETING);
        client_say(c, "EHLO client.test\r\n");
        client_expect_lit(c, UP_EHLO); /* XCLIENT is not for the client */
        client_say(c, "QUIT\r\n");
        client_expect_lit(c, UP_BYE);
        client_expect_eof(c);
        struct sockaddr_in me;
        int len = sizeof(me);
        uv_tcp_getsockname(&c->tcp, (struct sockaddr *)&me, &len);
        char want[256];
        snprintf(want, sizeof(want),
                 "EHLO proxy.test\r\n"
                 "XCLIENT ADDR=127.0.0.1 PORT=%u NAME=[UNAVAILABLE]\r\n"
                 "EHLO client.test\r\nQUIT\r\n",
                 ntohs(me.sin_port));
        same_bytes("upstream received", &w.up.rx, want, strlen(want));
        expect_no_session(&w);
    }
    world_end(&w);
    case_end();
}

static void test_identity_proxy_v1(void)
{
    case_begin("client_identity = proxy-v1: the PROXY line first");
    struct world w = {0};
    w.upstream_keys = "client_identity = proxy-v1\n";
    if (world_start(&w, "tls = none\n") && client_connect(&w.cl, &w.px.addr)) {
        struct client *c = &w.cl;
        client_expect_lit(c, UP_GREETING);
        client_say(c, "QUIT\r\n");
        client_expect_lit(c, UP_BYE);
        client_expect_eof(c);
        struct sockaddr_in me;
        int len = sizeof(me);
        uv_tcp_getsockname(&c->tcp, (struct sockaddr *)&me, &len);
        char want[256];
        snprintf(want, sizeof(want),
                 "PROXY TCP4 127.0.0.1 127.0.0.1 %u %u\r\nQUIT\r\n",
                 ntohs(me.sin_port), ntohs(w.px.addr.sin_port));
        same_bytes("upstream received", &w.up.rx, want, strlen(want));
        expect_no_session(&w);
    }
    world_end(&w);
    case_end();
}

/* The other direction: a client that does not read its replies stops the
 * proxy reading the upstream, instead of the replies piling up in it. */
static void test_back_pressure_replies(void)
{
    case_begin("a client that stops reading: the upstream's replies wait "
               "outside the proxy, then arrive in order");
    struct world w = {0};
    struct client *c = &w.cl;
    /* 64 replies (as many as may be owed) of 50 KB each */
    struct bytes help = {0};
    for (int i = 0; i < 250; i++) {
        char line[256];
        snprintf(line, sizeof(line), "214-%03d %0190d\r\n", i, i);
        bytes_add(&help, line, strlen(line));
    }
    bytes_add(&help, S("214 End of HELP info\r\n\0"));
    w.up.help = help.p;
    /* Small buffers toward the client (the proxy's side inherits its
     * listening socket's), or its kernel would take all the replies. */
    int small = 64 * 1024;
    c->rcvbuf = small;
    if (world_start(&w, "tls = none\n") &&
        setsockopt(proxy_listen_fd(&w.px), SOL_SOCKET, SO_SNDBUF, &small,
                   sizeof(small)) == 0 &&
        client_connect(c, &w.px.addr)) {
        client_expect_lit(c, UP_GREETING);
        struct bytes cmds = {0};
        for (int i = 0; i < 64; i++)
            bytes_add(&cmds, S("HELP\r\n"));
        uv_read_stop((uv_stream_t *)&c->tcp);
        client_write(c, cmds.p, cmds.n);
        bytes_free(&cmds);
        /* The upstream answers everything; the bytes settle somewhere. */
        uv_timer_init(&loop, &tick);
        tick.data = &w.up.written;
        tick_last = w.up.written;
        tick_quiet = 0;
        uv_timer_start(&tick, on_tick, 100, 100);
        PUMP_UNTIL(tick_quiet >= 3, "the upstream's writes never settled");
        uv_timer_stop(&tick);
        uv_close((uv_handle_t *)&tick, NULL);
        struct sockaddr_in cl_addr, up_peer;
        int len = sizeof(cl_addr), cfd = -1, ufd = -1;
        uv_tcp_getsockname(&c->tcp, (struct sockaddr *)&cl_addr, &len);
        uv_fileno((uv_handle_t *)&c->tcp, &cfd);
        len = sizeof(up_peer);
        if (w.up.conn) {
            uv_tcp_getpeername(&w.up.conn->tcp, (struct sockaddr *)&up_peer,
                               &len);
            uv_fileno((uv_handle_t *)&w.up.conn->tcp, &ufd);
        }
        int pfd_client = find_socket(&w.px.addr, &cl_addr);
        int pfd_up = find_socket(&up_peer, &w.up.addr);
        CHECK(pfd_client >= 0 && pfd_up >= 0,
              "the proxy's sockets not found (%d, %d)", pfd_client, pfd_up);
        /* Sent by the upstream, not yet read by the client: in the kernel
         * or in the proxy. The greeting was read. */
        size_t pending = w.up.written - (sizeof(UP_GREETING) - 1);
        size_t in_kernel = (size_t)queued(ufd, SIOCOUTQ) +
                           (size_t)queued(pfd_up, SIOCINQ) +
                           (size_t)queued(pfd_client, SIOCOUTQ) +
                           (size_t)queued(cfd, SIOCINQ);
        long held = (long)pending - (long)in_kernel;
        long allowed = STP_OUTQ_HIGH + 4 * STP_BUF_SIZE;
        CHECK(held <= allowed,
              "the proxy holds %ld bytes of replies (more than %ld): sent "
              "%zu, in the kernel %zu", held, allowed, pending, in_kernel);
        if (getenv("STP_TEST_VERBOSE"))
            fprintf(stderr, "reply back-pressure: sent %zu of %zu, kernel "
                            "%zu, proxy %ld\n", pending,
                    64 * (help.n - 1), in_kernel, held);
        uv_read_start((uv_stream_t *)&c->tcp, cl_alloc, cl_read);
        struct bytes want = {0};
        for (int i = 0; i < 64; i++)
            bytes_add(&want, help.p, help.n - 1);
        client_expect(c, want.p, want.n);
        bytes_free(&want);
        client_say(c, "QUIT\r\n");
        client_expect_lit(c, UP_BYE);
        client_expect_eof(c);
        expect_no_session(&w);
    }
    world_end(&w);
    bytes_free(&help);
    case_end();
}

/* Regression: replies the engine words
 * itself go to the client's queue whatever its size. set_reading() stops
 * reading the client only when the *upstream's* queue is busy, never when
 * the client's own is, so a client that pipelines commands refused locally
 * (here XCLIENT: 550, five bytes out per byte in) and does not read them
 * makes the proxy read on and queue replies until the 16 slots (about
 * 1 MiB) are full: then stp_conn_write fails with ENOBUFS and the session
 * dies with reason=write_error, its replies lost. With the default
 * max_errors = 20 the engine's 421 comes first; any max_errors above a few
 * thousand lets it happen. Expected: reading the client pauses while its
 * queue is over STP_OUTQ_HIGH, as for the upstream's. */
static void test_local_replies_back_pressure(void)
{
    case_begin("a client that does not read its local rejects: the proxy "
               "stops reading it, and does not die on ENOBUFS");
    struct world w = {0};
    struct client *c = &w.cl;
    int small = 64 * 1024;
    c->rcvbuf = small;
    static const char reply[] =
        "550 5.7.0 Error: insufficient authorization\r\n";
    int n = 200000; /* 1.8 MB of commands, 9 MB of replies */
    struct bytes cmds = {0}; /* the client's writes point into it */
    if (world_start(&w, "tls = none\nmax_errors = 1000000\n") &&
        setsockopt(proxy_listen_fd(&w.px), SOL_SOCKET, SO_SNDBUF, &small,
                   sizeof(small)) == 0 &&
        client_connect(c, &w.px.addr)) {
        client_expect_lit(c, UP_GREETING);
        uv_read_stop((uv_stream_t *)&c->tcp);
        for (int i = 0; i < n; i++)
            bytes_add(&cmds, S("XCLIENT\r\n"));
        c->bulk = cmds.p;
        c->bulk_len = cmds.n;
        client_pump_bulk(c);
        pump_for(300); /* the client reads nothing meanwhile */
        CHECK(w.px.srv.n_sessions == 1,
              "the session died while the client was not reading");
        uv_read_start((uv_stream_t *)&c->tcp, cl_alloc, cl_read);
        PUMP_UNTIL(c->written == cmds.n || c->eof,
                   "the commands were never all taken");
        bool ok = true;
        for (int i = 0; i < n && ok; i++)
            ok = client_expect(c, reply, sizeof(reply) - 1);
        client_say(c, "QUIT\r\n");
        client_expect_lit(c, UP_BYE);
        client_expect_eof(c);
        expect_no_session(&w);
    }
    world_end(&w);
    bytes_free(&cmds);
    case_end();
}

/* Regression: while back-pressure keeps the
 * proxy from reading a client that is sending a message, no client data
 * event comes, so the idle deadline (from the client's last read) runs as
 * if the client were idle: a slow upstream gets the client a "timeout
 * exceeded" 421 logged as reason=idle_timeout, the client blamed for the
 * upstream's stall. Expected: a client held back by the proxy is not idle
 * (the message's own timeout_data, or an upstream deadline, applies). */
static void test_back_pressure_not_idle(void)
{
    case_begin("a client held back by a slow upstream is not idle");
    struct world w = {0};
    struct client *c = &w.cl;
    size_t total = (size_t)8 << 20;
    char *msg = make_message(total);
    int small = 64 * 1024;
    w.up.pause_in_data = true;
    w.up.rcvbuf = small;
    c->sndbuf = small;
    if (world_start(&w, "tls = none\ntimeout_idle = 300ms\n") &&
        setsockopt(proxy_listen_fd(&w.px), SOL_SOCKET, SO_RCVBUF, &small,
                   sizeof(small)) == 0 &&
        client_connect(c, &w.px.addr)) {
        client_expect_lit(c, UP_GREETING);
        client_say(c, "EHLO client.test\r\nMAIL FROM:<a@client.test>\r\n"
                      "RCPT TO:<b@up.test>\r\nDATA\r\n");
        client_expect_lit(c, UP_EHLO UP_MAIL UP_RCPT UP_354);
        c->bulk = msg;
        c->bulk_len = total;
        client_pump_bulk(c);
        pump_for(1000); /* the upstream reads nothing for a second */
        CHECK(c->rx.n == c->seen && !c->eof,
              "the client, blocked by the proxy, was timed out: \"%s\"",
              esc(tail(&c->rx, c->seen), c->rx.n - c->seen));
        up_resume(&w.up);
        PUMP_UNTIL(c->written >= total || c->eof, "the rest was never taken");
        client_say(c, ".\r\n");
        client_expect_lit(c, UP_QUEUED);
        expect_no_session(&w);
    }
    world_end(&w);
    free(msg);
    case_end();
}

/* ---- main ---------------------------------------------------------------------- */

static void rm_tmpdir(void)
{
    char path[128];
    snprintf(path, sizeof(path), "%s/stp.conf", tmpdir);
    unlink(path);
    rmdir(tmpdir);
}

/* STP_TEST_ONLY=WORD runs the cases whose function name has WORD in it. */
#define RUN(fn)                                                                \
    do {                                                                       \
        const char *only_ = getenv("STP_TEST_ONLY");                           \
        if (!only_ || strstr(#fn, only_))                                      \
            fn();                                                              \
    } while (0)

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    /* The proxy's own log lines only when asked: a failure prints its own. */
    stp_log_set_level(getenv("STP_TEST_VERBOSE") ? STP_LOG_DEBUG
                                                 : STP_LOG_ERROR);
    if (!mkdtemp(tmpdir) || stp_tls_global_init() < 0) {
        fprintf(stderr, "setup failed\n");
        return 1;
    }
    uv_loop_init(&loop);
    uv_timer_init(&loop, &watchdog);
    uv_timer_init(&loop, &nap_timer);
    RUN(test_plain_session);
    RUN(test_upstream_lost_after_mail);
    RUN(test_back_pressure);
    RUN(test_half_close);
    RUN(test_half_close_after_starttls);
    RUN(test_starttls_drops_pipelined_plaintext);
    RUN(test_stop_idle_session);
    RUN(test_upstream_reply_then_close);
    RUN(test_stop_waits_for_message);
    RUN(test_half_close_mid_message);
    RUN(test_half_close_after_message_slow_upstream);
    RUN(test_upstream_lost_during_handshake);
    RUN(test_back_pressure_tls);
    RUN(test_connection_limit);
    RUN(test_upstream_unreachable);
    RUN(test_upstream_never_greets);
    RUN(test_failover_refused);
    RUN(test_failover_refusing_greeting);
    RUN(test_failover_silent);
    RUN(test_failover_all_dead);
    RUN(test_name_lookup);
    RUN(test_idle_timeout);
    RUN(test_drain_timeout_cuts_message);
    RUN(test_reload_keeps_open_session);
    RUN(test_implicit_tls);
    RUN(test_handshake_timeout);
    RUN(test_client_reset_mid_message);
    RUN(test_reply_timeout);
    RUN(test_command_timeout);
    RUN(test_half_close_tls);
    RUN(test_upstream_lost_while_client_sends);
    RUN(test_identity_xclient);
    RUN(test_identity_proxy_v1);
    RUN(test_back_pressure_replies);
    RUN(test_local_replies_back_pressure);
    RUN(test_back_pressure_not_idle);
    uv_close((uv_handle_t *)&watchdog, NULL);
    uv_close((uv_handle_t *)&nap_timer, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    stp_buf_pool_trim();
    stp_tls_global_cleanup();
    rm_tmpdir();
    return unit_summary();
}
