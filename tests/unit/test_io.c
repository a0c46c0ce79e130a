/* In-process tests of the I/O layer (proxy/io.c): a loopback TCP pair in one
 * libuv loop. What they pin down: no io function calls its owner back before
 * it returns (errors are returned; events come from the loop, or from
 * stp_conn_pull's result), and the half-close reports EOF once, after the
 * data before it. */
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io.h"
#include "unit.h"

static uv_loop_t loop;
static bool in_call;   /* inside a call into io.c made by the test */
static int n_data, n_eof, n_error, n_drained, last_err;

static void on_event(struct stp_conn *c, enum stp_io_event ev, int err)
{
    CHECK(!in_call, "event %d called back inside an io call", (int)ev);
    switch (ev) {
    case STP_IO_DATA: n_data++; break;
    case STP_IO_EOF: n_eof++; break;
    case STP_IO_ERROR: n_error++; last_err = err; break;
    case STP_IO_DRAINED: n_drained++; break;
    case STP_IO_TLS_READY: case STP_IO_CONNECTED: break;
    }
}

/* A connected pair: *CONN wraps one end, *PEER is the other's descriptor. */
static void pair(struct stp_conn *conn, int *peer)
{
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof(a);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(l >= 0 && bind(l, (struct sockaddr *)&a, sizeof(a)) == 0 &&
              listen(l, 1) == 0 &&
              getsockname(l, (struct sockaddr *)&a, &al) == 0,
          "listen");
    int c = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(connect(c, (struct sockaddr *)&a, sizeof(a)) == 0, "connect");
    *peer = accept(l, NULL, NULL);
    close(l);
    CHECK(stp_conn_init(&loop, conn, on_event, NULL) == 0, "conn init");
    CHECK(uv_tcp_open(&conn->tcp, c) == 0, "uv_tcp_open");
    n_data = n_eof = n_error = n_drained = last_err = 0;
}

static void run_until(int *counter, int want)
{
    for (int i = 0; i < 1000 && *counter < want; i++)
        uv_run(&loop, UV_RUN_ONCE);
}

static void closed(uv_handle_t *h) { (void)h; }

static void done(struct stp_conn *conn, int peer)
{
    stp_conn_close(conn, closed);
    uv_run(&loop, UV_RUN_DEFAULT);
    stp_conn_release(conn);
    if (peer >= 0)
        close(peer);
}

static void test_write_error_is_returned(void)
{
    case_begin("a write error is returned, not called back");
    struct stp_conn conn;
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
        r = stp_conn_write(&conn, chunk, sizeof(chunk));
        if (r == 0)
            r = stp_conn_flush(&conn);
    }
    in_call = false;
    CHECK(r < 0, "writing to a reset peer never failed");
    CHECK(n_error == 0, "the error was also called back");
    done(&conn, -1);
    case_end();
}

static void test_pull_calls_nobody(void)
{
    case_begin("stp_conn_pull makes no callback");
    struct stp_conn conn;
    int peer;
    pair(&conn, &peer);
    stp_conn_want_read(&conn, true);
    CHECK(write(peer, "NOOP\r\n", 6) == 6, "write");
    run_until(&n_data, 1);
    CHECK(n_data == 1, "data never came");
    enum stp_io_event ev;
    int err;
    in_call = true;
    bool got = stp_conn_pull(&conn, &ev, &err);
    in_call = false;
    CHECK(!got, "a plaintext pull reported an event");
    size_t n;
    stp_conn_in(&conn, &n);
    CHECK(n == 6, "%zu bytes buffered, want 6", n);
    done(&conn, peer);
    case_end();
}

static void test_half_close_keeps_data_and_writes(void)
{
    case_begin("a half-close: data first, EOF once, writing goes on");
    struct stp_conn conn;
    int peer;
    pair(&conn, &peer);
    stp_conn_want_read(&conn, true);
    CHECK(write(peer, "QUIT\r\n", 6) == 6, "write");
    shutdown(peer, SHUT_WR);
    run_until(&n_eof, 1);
    CHECK(n_data == 1 && n_eof == 1, "data %d eof %d", n_data, n_eof);
    size_t n;
    stp_conn_in(&conn, &n);
    CHECK(n == 6, "%zu bytes buffered at EOF, want 6", n);
    stp_conn_want_read(&conn, true); /* asking again reads nothing more */
    for (int i = 0; i < 5; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    CHECK(n_eof == 1, "EOF reported %d times", n_eof);
    in_call = true;
    int r = stp_conn_write(&conn, "221 Bye\r\n", 9);
    if (r == 0)
        r = stp_conn_flush(&conn);
    in_call = false;
    CHECK(r == 0, "write after the peer's EOF: %d", r);
    char buf[16];
    ssize_t got = read(peer, buf, sizeof(buf));
    CHECK(got == 9 && memcmp(buf, "221 Bye\r\n", 9) == 0,
          "the reply did not arrive: \"%s\"", got > 0 ? esc(buf, (size_t)got) : "");
    done(&conn, peer);
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
    uv_loop_close(&loop);
    return unit_summary();
}
