/* In-process tests of the I/O layer (proxy/io.c): loopback TCP connections
 * in one libuv loop. What they pin down: no io function calls its owner back
 * before it returns (errors are returned; events come from the loop, or from
 * stp_conn_pull's result), the half-close reports EOF once, after the data
 * before it; a conn frees itself on close and only then tells its owner;
 * input before TLS is dropped unless kept on purpose. */
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io.h"
#include "unit.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FREED(p) __asan_address_is_poisoned(p)
#else
#define FREED(p) true /* only ASan can tell */
#endif

static uv_loop_t loop;
static bool in_call;   /* inside a call into io.c made by the test */

/* What one conn was told; its owner. */
struct seen {
    int data, eof, error, drained, tls_ready, connected, last_err;
};
static struct seen ev0; /* for the tests with one conn */

static void on_event(struct stp_conn *c, enum stp_io_event ev, int err)
{
    CHECK(!in_call, "event %d called back inside an io call", (int)ev);
    struct seen *n = stp_conn_owner(c);
    switch (ev) {
    case STP_IO_DATA: n->data++; break;
    case STP_IO_EOF: n->eof++; break;
    case STP_IO_ERROR: n->error++; n->last_err = err; break;
    case STP_IO_DRAINED: n->drained++; break;
    case STP_IO_TLS_READY: n->tls_ready++; break;
    case STP_IO_CONNECTED: n->connected++; n->last_err = err; break;
    }
}

static int listening_socket(struct sockaddr_in *a)
{
    *a = (struct sockaddr_in){.sin_family = AF_INET,
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof(*a);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(l >= 0 && bind(l, (struct sockaddr *)a, sizeof(*a)) == 0 &&
              listen(l, 4) == 0 &&
              getsockname(l, (struct sockaddr *)a, &al) == 0,
          "listen");
    return l;
}

static void run_until(int *counter, int want)
{
    for (int i = 0; i < 1000 && *counter < want; i++)
        uv_run(&loop, UV_RUN_ONCE);
}

/* A connected pair: *CONN connected out through io.c, *PEER is the
 * accepted descriptor. */
static void pair(struct stp_conn **conn, int *peer)
{
    struct sockaddr_in a;
    int l = listening_socket(&a);
    ev0 = (struct seen){0};
    CHECK(stp_conn_new(&loop, AF_INET, on_event, &ev0, conn) == 0,
          "conn new");
    CHECK(stp_conn_connect(*conn, (struct sockaddr *)&a) == 0, "connect");
    run_until(&ev0.connected, 1);
    CHECK(ev0.connected == 1 && ev0.last_err == 0, "connect: %d",
          ev0.last_err);
    *peer = accept(l, NULL, NULL);
    CHECK(*peer >= 0, "accept");
    close(l);
    ev0 = (struct seen){0};
}

static void done(struct stp_conn *conn, int peer)
{
    stp_conn_close(conn, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (peer >= 0)
        close(peer);
}

static void test_write_error_is_returned(void)
{
    case_begin("a write error is returned, not called back");
    struct stp_conn *conn;
    int peer;
    pair(&conn, &peer);
    /* The peer goes away with a reset: writes fail with EPIPE/ECONNRESET. */
    struct linger lg = {1, 0};
    setsockopt(peer, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(peer);
    static char chunk[4096];
    int r = 0;
    in_call = true;
    for (int i = 0; i < 1000 && r == 0; i++) {
        r = stp_conn_write(conn, chunk, sizeof(chunk));
        if (r == 0)
            r = stp_conn_flush(conn);
    }
    in_call = false;
    CHECK(r < 0, "writing to a reset peer never failed");
    CHECK(ev0.error == 0, "the error was also called back");
    done(conn, -1);
    case_end();
}

static void test_pull_calls_nobody(void)
{
    case_begin("stp_conn_pull makes no callback");
    struct stp_conn *conn;
    int peer;
    pair(&conn, &peer);
    stp_conn_want_read(conn, true);
    CHECK(write(peer, "NOOP\r\n", 6) == 6, "write");
    run_until(&ev0.data, 1);
    CHECK(ev0.data == 1, "data never came");
    enum stp_io_event ev;
    int err;
    in_call = true;
    bool got = stp_conn_pull(conn, &ev, &err);
    in_call = false;
    CHECK(!got, "a plaintext pull reported an event");
    size_t n;
    stp_conn_in(conn, &n);
    CHECK(n == 6, "%zu bytes buffered, want 6", n);
    done(conn, peer);
    case_end();
}

static void test_half_close_keeps_data_and_writes(void)
{
    case_begin("a half-close: data first, EOF once, writing goes on");
    struct stp_conn *conn;
    int peer;
    pair(&conn, &peer);
    stp_conn_want_read(conn, true);
    CHECK(write(peer, "QUIT\r\n", 6) == 6, "write");
    shutdown(peer, SHUT_WR);
    run_until(&ev0.eof, 1);
    CHECK(ev0.data == 1 && ev0.eof == 1, "data %d eof %d", ev0.data,
          ev0.eof);
    size_t n;
    stp_conn_in(conn, &n);
    CHECK(n == 6, "%zu bytes buffered at EOF, want 6", n);
    stp_conn_want_read(conn, true); /* asking again reads nothing more */
    for (int i = 0; i < 5; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    CHECK(ev0.eof == 1, "EOF reported %d times", ev0.eof);
    in_call = true;
    int r = stp_conn_write(conn, "221 Bye\r\n", 9);
    if (r == 0)
        r = stp_conn_flush(conn);
    in_call = false;
    CHECK(r == 0, "write after the peer's EOF: %d", r);
    char buf[16];
    ssize_t got = read(peer, buf, sizeof(buf));
    CHECK(got == 9 && memcmp(buf, "221 Bye\r\n", 9) == 0,
          "the reply did not arrive: \"%s\"", got > 0 ? esc(buf, (size_t)got) : "");
    done(conn, peer);
    case_end();
}

/* ---- creating and closing ------------------------------------------------ */

static void *closed_owner;
static int n_closed, n_closed_other;
static struct stp_conn *closing_conn;

static void on_closed(void *owner)
{
    CHECK(!in_call, "closed called back inside stp_conn_close");
    CHECK(FREED(closing_conn), "the owner was told before the conn was freed");
    closed_owner = owner;
    n_closed++;
}

static void on_closed_other(void *owner)
{
    (void)owner;
    n_closed_other++;
}

static void test_inet_socket_before_connect(void)
{
    case_begin("AF_INET: the socket exists (and can be bound) before connect");
    struct sockaddr_in a;
    int l = listening_socket(&a);
    struct stp_conn *conn;
    ev0 = (struct seen){0};
    CHECK(stp_conn_new(&loop, AF_INET, on_event, &ev0, &conn) == 0, "new");
    int fd = stp_conn_fd(conn);
    CHECK(fd >= 0, "no socket before connect: %d", fd);
    /* What later work does to it: a source address of our choosing. */
    struct sockaddr_in src = {.sin_family = AF_INET,
                              .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof(src);
    CHECK(bind(fd, (struct sockaddr *)&src, sizeof(src)) == 0 &&
              getsockname(fd, (struct sockaddr *)&src, &sl) == 0,
          "bind before connect");
    CHECK(stp_conn_connect(conn, (struct sockaddr *)&a) == 0, "connect");
    run_until(&ev0.connected, 1);
    CHECK(ev0.connected == 1 && ev0.last_err == 0, "connect: %d",
          ev0.last_err);
    CHECK(stp_conn_fd(conn) == fd, "the socket changed on connect");
    struct sockaddr_in from;
    socklen_t fl = sizeof(from);
    int peer = accept(l, (struct sockaddr *)&from, &fl);
    CHECK(peer >= 0 && from.sin_port == src.sin_port,
          "the connection did not come from the bound port");
    struct sockaddr_storage local, remote;
    CHECK(stp_conn_local(conn, &local) == 0 &&
              ((struct sockaddr_in *)&local)->sin_port == src.sin_port,
          "stp_conn_local");
    CHECK(stp_conn_peer(conn, &remote) == 0 &&
              ((struct sockaddr_in *)&remote)->sin_port == a.sin_port,
          "stp_conn_peer");
    CHECK(stp_conn_tls(conn) == NULL, "a plaintext conn has TLS");
    close(l);
    done(conn, peer);

    /* One to accept into has no socket: uv_accept would refuse it. */
    CHECK(stp_conn_new(&loop, AF_UNSPEC, on_event, &ev0, &conn) == 0,
          "new unspec");
    CHECK(stp_conn_fd(conn) < 0, "AF_UNSPEC conn has a socket");
    done(conn, -1);
    case_end();
}

static void test_close_frees_then_tells_owner_once(void)
{
    case_begin("close: the conn is freed, then the owner told, once");
    struct stp_conn *conn;
    int peer;
    pair(&conn, &peer);
    /* Something to release: queued output and buffered input. */
    stp_conn_want_read(conn, true);
    CHECK(write(peer, "NOOP\r\n", 6) == 6, "write");
    run_until(&ev0.data, 1);
    CHECK(stp_conn_write(conn, "250 OK\r\n", 8) == 0, "queue");
    n_closed = n_closed_other = 0;
    closed_owner = NULL;
    closing_conn = conn;
    in_call = true;
    stp_conn_close(conn, on_closed);
    stp_conn_close(conn, on_closed_other); /* a second close: nothing */
    in_call = false;
    CHECK(n_closed == 0, "closed called back inside stp_conn_close");
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(n_closed == 1, "owner told %d times", n_closed);
    CHECK(n_closed_other == 0, "the second close's callback ran");
    CHECK(closed_owner == &ev0, "the owner was not passed");
    CHECK(ev0.error == 0 && ev0.drained == 0, "events after close");
    close(peer);
    case_end();
}

/* ---- TLS after a plaintext prefix ------------------------------------------ */

static struct stp_tls_ctx *sctx, *cctx;
static uv_tcp_t lst;
static struct stp_conn *accepted;
static struct seen evs, evc; /* server and client side */
static int n_accepted, n_timer;

static void on_connection(uv_stream_t *server, int status)
{
    CHECK(status == 0, "listen: %d", status);
    CHECK(stp_conn_new(&loop, AF_UNSPEC, on_event, &evs, &accepted) == 0,
          "new accepted");
    CHECK(stp_conn_accept(accepted, server) == 0, "stp_conn_accept");
    CHECK(stp_conn_fd(accepted) >= 0, "no socket after accept");
    n_accepted++;
}

static void on_timer(uv_timer_t *t)
{
    (void)t;
    n_timer++;
}

static void tls_ctxs(void)
{
    case_begin("TLS contexts for the tests");
    static const struct stp_tls_params params = {STP_TLS_V1_2, STP_TLS_V1_3,
                                                 NULL, NULL};
    struct stp_tls_server_opts so = {.cn = "localhost", .params = &params};
    struct stp_tls_client_opts co = {.params = &params, .verify = false};
    struct stp_tls_err e;
    CHECK(stp_tls_ctx_new_server(&so, &sctx, &e) == 0, "server ctx: %s",
          e.msg);
    CHECK(stp_tls_ctx_new_client(&co, &cctx, &e) == 0, "client ctx: %s",
          e.msg);
    case_end();
}

/* The client writes "HDR\r\n" and its ClientHello in one write (start_tls
 * appends the hello to the queued header, one flush); the server's conn
 * gets both in one read and has consumed the header. */
static void prefix_then_hello(struct stp_conn **cli)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int al = sizeof(a);
    CHECK(uv_tcp_init(&loop, &lst) == 0 &&
              uv_tcp_bind(&lst, (struct sockaddr *)&a, 0) == 0 &&
              uv_listen((uv_stream_t *)&lst, 4, on_connection) == 0 &&
              uv_tcp_getsockname(&lst, (struct sockaddr *)&a, &al) == 0,
          "uv listen");
    evs = evc = (struct seen){0};
    n_accepted = 0;
    accepted = NULL;
    CHECK(stp_conn_new(&loop, AF_INET, on_event, &evc, cli) == 0, "new");
    CHECK(stp_conn_connect(*cli, (struct sockaddr *)&a) == 0, "connect");
    run_until(&evc.connected, 1);
    run_until(&n_accepted, 1);
    CHECK(evc.connected == 1 && n_accepted == 1, "no connection");
    if (!accepted)
        return;
    struct sockaddr_storage cl, ap;
    CHECK(stp_conn_local(*cli, &cl) == 0 && stp_conn_peer(accepted, &ap) == 0 &&
              ((struct sockaddr_in *)&cl)->sin_port ==
                  ((struct sockaddr_in *)&ap)->sin_port,
          "the accepted peer is not the client");
    stp_conn_want_read(accepted, true);
    stp_conn_want_read(*cli, true);
    CHECK(stp_conn_write(*cli, "HDR\r\n", 5) == 0, "write header");
    CHECK(stp_conn_start_tls(*cli, cctx, NULL) == 0, "client start_tls");
    run_until(&evs.data, 1);
    size_t n;
    const char *p = stp_conn_in(accepted, &n);
    CHECK(n > 5 && memcmp(p, "HDR\r\n", 5) == 0 && p[5] == 0x16,
          "header and hello not in one read: %zu bytes", n);
    if (n >= 5)
        stp_conn_consume(accepted, 5);
}

static void tls_done(struct stp_conn *cli)
{
    stp_conn_close(cli, NULL);
    if (accepted)
        stp_conn_close(accepted, NULL);
    uv_close((uv_handle_t *)&lst, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
}

/* Header and hello in one read, the header consumed, TLS started keeping
 * (KEEP) or dropping the rest; T is armed to end the wait after MS. False:
 * the setup failed (reported). */
static bool start_after_prefix(struct stp_conn **cli, bool keep,
                               uv_timer_t *t, uint64_t ms)
{
    prefix_then_hello(cli);
    if (!accepted)
        return false;
    in_call = true;
    int r = keep ? stp_conn_start_tls_keep(accepted, sctx, NULL)
                 : stp_conn_start_tls(accepted, sctx, NULL);
    in_call = false;
    CHECK(r == 0, "start_tls (keep %d): %d", keep, r);
    size_t n;
    stp_conn_in(accepted, &n);
    CHECK(n == 0, "%zu bytes left as plaintext", n);
    n_timer = 0;
    uv_timer_init(&loop, t);
    uv_timer_start(t, on_timer, ms, 0);
    return true;
}

static void test_start_tls_keep_hands_prefix_rest_to_tls(void)
{
    case_begin("start_tls_keep: the hello read with the header does the handshake");
    struct stp_conn *cli;
    uv_timer_t t;
    /* Bounded: with the hello lost, nothing would ever happen. */
    if (!start_after_prefix(&cli, true, &t, 5000)) {
        case_end();
        return;
    }
    CHECK(stp_conn_tls(accepted) == NULL, "TLS before the handshake is done");
    size_t n;
    while ((evs.tls_ready < 1 || evc.tls_ready < 1) && !evs.error &&
           !evc.error && !n_timer)
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    CHECK(evs.tls_ready == 1 && evc.tls_ready == 1,
          "handshake: server %d (error %s) client %d (error %s)",
          evs.tls_ready, stp_conn_error_text(accepted, evs.last_err),
          evc.tls_ready, stp_conn_error_text(cli, evc.last_err));
    CHECK(stp_conn_tls(accepted) && stp_conn_tls(cli), "no TLS after it");
    /* And the channel works. */
    if (stp_conn_tls(accepted) && stp_conn_tls(cli)) {
        CHECK(stp_conn_write(cli, "EHLO x\r\n", 8) == 0 &&
                  stp_conn_flush(cli) == 0,
              "write under TLS");
        run_until(&evs.data, 2);
        const char *p = stp_conn_in(accepted, &n);
        CHECK(n == 8 && memcmp(p, "EHLO x\r\n", 8) == 0, "got \"%s\"",
              p ? esc(p, n) : "");
    }
    tls_done(cli);
    case_end();
}

static void test_start_tls_discards_prefix_rest(void)
{
    case_begin("start_tls: what was read with the prefix is dropped");
    struct stp_conn *cli;
    uv_timer_t t;
    /* The hello is gone: neither side gets anywhere. */
    if (!start_after_prefix(&cli, false, &t, 300)) {
        case_end();
        return;
    }
    run_until(&n_timer, 1);
    uv_close((uv_handle_t *)&t, NULL);
    CHECK(evs.tls_ready == 0 && evc.tls_ready == 0,
          "a handshake completed on dropped input");
    CHECK(stp_conn_bytes_out(accepted) == 0,
          "the server answered a hello it should not have seen");
    CHECK(stp_conn_bytes_in(accepted) > 5, "bytes_in %llu",
          (unsigned long long)stp_conn_bytes_in(accepted));
    tls_done(cli);
    case_end();
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    uv_loop_init(&loop);
    test_write_error_is_returned();
    test_pull_calls_nobody();
    test_half_close_keeps_data_and_writes();
    test_inet_socket_before_connect();
    test_close_frees_then_tells_owner_once();
    if (stp_tls_global_init() < 0) {
        fprintf(stderr, "FAIL TLS init\n");
        return 1;
    }
    tls_ctxs();
    test_start_tls_keep_hands_prefix_rest_to_tls();
    test_start_tls_discards_prefix_rest();
    stp_tls_ctx_free(sctx);
    stp_tls_ctx_free(cctx);
    stp_tls_global_cleanup();
    if (uv_loop_close(&loop) != 0) {
        fprintf(stderr, "FAIL handles left open in the loop\n");
        return 1;
    }
    return unit_summary();
}
