/* stp-loadgen: an SMTP STARTTLS load generator for the benchmark.
 *
 * Opens sessions against HOST:PORT and runs each one through
 *   greeting, EHLO, STARTTLS, TLS handshake, EHLO, MAIL, RCPT, DATA, QUIT
 * checking every reply code. It speaks to anything that offers STARTTLS in
 * front of a plaintext SMTP server: starttls-proxy, stunnel with
 * `protocol = smtp`, or a real MTA.
 *
 * Modes:
 *   full  sessions at concurrency C until N are done or T seconds passed;
 *         per-session latency (connect to the 221 reply) as p50/p90/p99.
 *   bulk  the same with few sessions and large messages: throughput after TLS.
 *   hold  open K sessions, complete STARTTLS and the second EHLO, then stay
 *         idle. Prints a "ready" line once every session is held or failed,
 *         then obeys commands on stdin: "verify" sends NOOP on every held
 *         session and reports how many answered; "quit" (or end of input,
 *         SIGINT, SIGTERM, --hold-time) closes them all.
 *
 * Results go to stdout as JSON, one object per line; errors go to stderr.
 * Any protocol error (a wrong reply code, a reply that is not SMTP, bytes
 * after the 220 to STARTTLS, a closed connection, a timeout) fails the session
 * loudly: the first ones are printed in full, all are counted by kind, and
 * the exit status is 1 when any session failed in full or bulk mode.
 *
 * One event loop, one thread; libuv for sockets, wolfSSL as the TLS client
 * driven through IO callbacks (ciphertext in from the read buffer, out into
 * a per-session buffer flushed with uv_try_write, the rest with uv_write). */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#ifdef NO_WOLFSSL_CLIENT
int main(void)
{
    fprintf(stderr, "stp-loadgen: this wolfSSL build has no TLS client "
                    "(NO_WOLFSSL_CLIENT); rebuild it with the client side\n");
    return 2;
}
#else

#define SESS_MAGIC 0x4c474e53u  /* "LGNS" */
#define RBUF_SIZE 8192          /* one SMTP reply, all its lines */
#define READ_SIZE (64 * 1024)   /* shared read buffer */
#define PLAIN_SIZE (16 * 1024)  /* decrypted bytes per wolfSSL_read */
#define PATTERN_SIZE (64 * 1024) /* message body pattern: 1024 lines of 64 */
#define LINE_LEN 64
#define RECORD_SIZE 16384       /* plaintext per wolfSSL_write: one record */
#define OUT_HIGH (256 * 1024)   /* ciphertext queued before waiting */
#define MAX_KINDS 32
#define MAX_PRINTED 10

enum mode { MODE_FULL, MODE_BULK, MODE_HOLD };

enum st {
    ST_CONNECTING,
    ST_GREETING,
    ST_EHLO1,
    ST_STARTTLS,
    ST_HANDSHAKE,
    ST_EHLO2,
    ST_MAIL,
    ST_RCPT,
    ST_DATA,
    ST_BODY,
    ST_QUIT,
    ST_HELD,
    ST_NOOP,
    ST_CLOSING,
    ST_COUNT
};

static const char *const st_names[ST_COUNT] = {
    "connect", "greeting", "ehlo", "starttls", "handshake", "ehlo_tls",
    "mail",    "rcpt",     "data", "body",     "quit",      "held",
    "noop",    "closing",
};

struct obuf {
    char *data;
    size_t len, cap;
};

struct sess {
    uint32_t magic;
    enum st st;
    uint64_t id;
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_write_t wreq;
    WOLFSSL *ssl;
    bool tls_on, closing, write_inflight, ok;
    uint64_t t0;       /* uv_hrtime() at connect */
    uint64_t t_state;  /* uv_hrtime() on entering the current state */
    uint64_t deadline; /* uv_now() ms; 0 = none */
    const char *cin;   /* ciphertext not yet taken by wolfSSL */
    size_t cin_len;
    char rbuf[RBUF_SIZE];
    size_t rlen;
    struct obuf pend, fly; /* being filled, being written */
    uint64_t body_left, body_off;
    bool end_sent;
    struct sess *prev, *next;
};

static struct {
    enum mode mode;
    const char *host;
    int port;
    unsigned concurrency;
    uint64_t sessions; /* full/bulk: total (0 = until duration); hold: K */
    double duration;   /* seconds, 0 = none */
    uint64_t size;     /* message size, octets */
    double timeout;    /* per step, seconds */
    double hold_time;  /* hold: seconds to stay after ready (0 = until told) */
    bool pipeline, resume, quiet;
    const char *ciphers;
    const char *group;
    const char *ehlo;
} opt = {
    .mode = MODE_FULL,
    .host = "127.0.0.1",
    .timeout = 30,
    .ciphers = "TLS13-AES128-GCM-SHA256",
    .group = "x25519",
    .ehlo = "loadgen.example.org",
};

static struct {
    uv_loop_t *loop;
    WOLFSSL_CTX *ctx;
    WOLFSSL_SESSION *saved; /* --resume: the session to offer */
    struct sockaddr_storage addr;
    struct sess *live; /* every session not yet freed */
    uint64_t next_id;
    uint64_t started, active, ok, failed;
    uint64_t held, dropped, verify_pending, verify_ok, verify_failed;
    uint64_t resumed, handshakes;
    uint64_t msg_bytes, msg_count;
    uint64_t t_start, t_end;
    bool stop_starting, ready_printed, quitting, verifying;
    double *lat;
    size_t lat_n, lat_cap;
    uint64_t phase_ns[ST_COUNT], phase_n[ST_COUNT]; /* time spent per state */
    char tls_version[32], cipher[64], curve[32];
    struct {
        char what[96];
        uint64_t n;
    } kinds[MAX_KINDS];
    unsigned n_kinds;
    uint64_t printed;
    uv_timer_t sweep, hold_timer;
    uv_signal_t sigint, sigterm;
    uv_pipe_t in_pipe;
    uv_tty_t in_tty;
    uv_stream_t *in;
    char cmd[256];
    size_t cmd_len;
} g;

static char pattern[PATTERN_SIZE];
static char header[512];
static size_t header_len;
static uint64_t body_len, message_len;
static char read_buf[READ_SIZE];

/* ---- small helpers --------------------------------------------------------- */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("stp-loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void obuf_append(struct obuf *b, const char *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            die("out of memory");
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void obuf_free(struct obuf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Count a failure by kind; print the first few in full. */
static void record_error(const struct sess *s, const char *what,
                         const char *detail)
{
    char kind[96];
    snprintf(kind, sizeof(kind), "%s: %s", st_names[s->st], what);
    unsigned i;
    for (i = 0; i < g.n_kinds; i++)
        if (strcmp(g.kinds[i].what, kind) == 0)
            break;
    if (i == g.n_kinds && g.n_kinds < MAX_KINDS) {
        snprintf(g.kinds[i].what, sizeof(g.kinds[i].what), "%s", kind);
        g.n_kinds++;
    }
    if (i < g.n_kinds)
        g.kinds[i].n++;
    if (g.printed++ < MAX_PRINTED)
        fprintf(stderr, "stp-loadgen: session %" PRIu64 " failed in state %s: %s%s%s\n",
                s->id, st_names[s->st], what, detail ? ": " : "",
                detail ? detail : "");
    else if (g.printed == MAX_PRINTED + 1)
        fprintf(stderr, "stp-loadgen: more failures, counted by kind at the end\n");
}

static struct sess *sess_of(void *p)
{
    struct sess *s = p;
    if (!s || s->magic != SESS_MAGIC)
        abort();
    return s;
}

/* ---- lifetime ----------------------------------------------------------- */

static void start_sessions(void);
static void maybe_finish(void);
static void maybe_ready(void);
static void maybe_verified(void);
static void hold_timer_cb(uv_timer_t *t);

static void on_closed(uv_handle_t *h)
{
    struct sess *s = sess_of(h->data);
    if (s->prev)
        s->prev->next = s->next;
    else
        g.live = s->next;
    if (s->next)
        s->next->prev = s->prev;
    if (s->ssl)
        wolfSSL_free(s->ssl);
    obuf_free(&s->pend);
    obuf_free(&s->fly);
    s->magic = 0;
    free(s);
    g.active--;
    start_sessions();
    if (opt.mode == MODE_HOLD)
        maybe_ready();
    maybe_finish();
}

static void sess_close(struct sess *s)
{
    if (s->closing)
        return;
    s->closing = true;
    uv_close((uv_handle_t *)&s->tcp, on_closed);
}

static void sess_fail(struct sess *s, const char *what, const char *detail)
{
    if (s->closing)
        return;
    bool was_held = s->st == ST_HELD || s->st == ST_NOOP;
    if (s->st == ST_NOOP) {
        g.verify_pending--;
        g.verify_failed++;
    }
    if (was_held) {
        g.held--;
        g.dropped++;
    }
    record_error(s, what, detail);
    g.failed++;
    sess_close(s);
    if (opt.mode == MODE_HOLD) {
        maybe_ready();
        maybe_verified();
    }
}

static void set_state(struct sess *s, enum st st)
{
    uint64_t now = uv_hrtime();
    if (s->t_state && s->st != ST_HELD) {
        g.phase_ns[s->st] += now - s->t_state;
        g.phase_n[s->st]++;
    }
    s->t_state = now;
    s->st = st;
    s->deadline = uv_now(g.loop) + (uint64_t)(opt.timeout * 1000);
}

/* ---- output --------------------------------------------------------------- */

static void pump_body(struct sess *s);
static void flush(struct sess *s);

static void write_cb(uv_write_t *req, int status)
{
    struct sess *s = sess_of(req->data);
    s->write_inflight = false;
    s->fly.len = 0;
    if (s->closing)
        return;
    if (status < 0) {
        if (s->st == ST_CLOSING)
            sess_close(s);
        else
            sess_fail(s, "write failed", uv_strerror(status));
        return;
    }
    if (s->st == ST_BODY) {
        s->deadline = uv_now(g.loop) + (uint64_t)(opt.timeout * 1000);
        pump_body(s);
        if (s->closing)
            return;
    }
    if (s->pend.len)
        flush(s);
    else if (s->st == ST_CLOSING)
        sess_close(s);
}

/* Swap the pending buffer in and write it (one write in flight). */
static void flush(struct sess *s)
{
    if (s->closing || s->write_inflight || !s->pend.len)
        return;
    /* Commands and handshake records usually fit the socket at once:
     * uv_try_write spares the write request and the epoll_ctl each uv_write
     * costs (the proxy does the same), so the client takes less of the CPU
     * it shares with the servers. Message bodies and the close keep
     * write_cb, which paces them. Errors surface through uv_write below. */
    if (s->st != ST_BODY && s->st != ST_CLOSING) {
        uv_buf_t b = uv_buf_init(s->pend.data, (unsigned)s->pend.len);
        int n = uv_try_write((uv_stream_t *)&s->tcp, &b, 1);
        if (n > 0) {
            s->pend.len -= (size_t)n;
            memmove(s->pend.data, s->pend.data + n, s->pend.len);
        }
        if (!s->pend.len)
            return;
    }
    struct obuf t = s->fly;
    s->fly = s->pend;
    s->pend = t;
    s->write_inflight = true;
    uv_buf_t b = uv_buf_init(s->fly.data, (unsigned)s->fly.len);
    int r = uv_write(&s->wreq, (uv_stream_t *)&s->tcp, &b, 1, write_cb);
    if (r < 0) {
        s->write_inflight = false;
        sess_fail(s, "write failed", uv_strerror(r));
    }
}

static int tls_send_cb(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
    struct sess *s = sess_of(ctx);
    obuf_append(&s->pend, buf, (size_t)sz);
    return sz;
}

static int tls_recv_cb(WOLFSSL *ssl, char *buf, int sz, void *ctx)
{
    struct sess *s = sess_of(ctx);
    if (!s->cin_len)
        return WOLFSSL_CBIO_ERR_WANT_READ;
    size_t k = (size_t)sz < s->cin_len ? (size_t)sz : s->cin_len;
    memcpy(buf, s->cin, k);
    s->cin += k;
    s->cin_len -= k;
    return (int)k;
}

static const char *tls_err(struct sess *s, int r)
{
    static char buf[WOLFSSL_MAX_ERROR_SZ];
    int e = wolfSSL_get_error(s->ssl, r);
    wolfSSL_ERR_error_string_n((unsigned long)e, buf, sizeof(buf));
    return buf;
}

/* Send bytes on the session, through TLS once it is on. Returns -1 after
 * failing the session. */
static int send_bytes(struct sess *s, const char *p, size_t n)
{
    if (!s->tls_on) {
        obuf_append(&s->pend, p, n);
        return 0;
    }
    while (n > 0) {
        int chunk = n > RECORD_SIZE ? RECORD_SIZE : (int)n;
        int r = wolfSSL_write(s->ssl, p, chunk);
        if (r <= 0) {
            sess_fail(s, "TLS write failed", tls_err(s, r));
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int send_cmd(struct sess *s, const char *cmd)
{
    if (send_bytes(s, cmd, strlen(cmd)) < 0)
        return -1;
    flush(s);
    return 0;
}

/* Queue message bytes until OUT_HIGH of ciphertext waits; write_cb calls
 * again as the socket drains. */
static void pump_body(struct sess *s)
{
    while (s->body_left > 0 && s->pend.len < OUT_HIGH) {
        size_t off = (size_t)(s->body_off % PATTERN_SIZE);
        size_t n = PATTERN_SIZE - off;
        if (n > RECORD_SIZE)
            n = RECORD_SIZE;
        if (n > s->body_left)
            n = (size_t)s->body_left;
        if (send_bytes(s, pattern + off, n) < 0)
            return;
        s->body_off += n;
        s->body_left -= n;
    }
    if (s->body_left == 0 && !s->end_sent) {
        s->end_sent = true;
        if (send_bytes(s, ".\r\n", 3) < 0)
            return;
    }
    flush(s);
}

/* ---- SMTP ------------------------------------------------------------------ */

static void start_tls(struct sess *s);

static bool has_capability(const char *reply, size_t len, const char *cap)
{
    size_t cl = strlen(cap);
    const char *p = reply, *end = reply + len;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (!eol)
            eol = end;
        if ((size_t)(eol - p) >= 4 + cl && strncasecmp(p + 4, cap, cl) == 0 &&
            (p + 4 + cl == eol || p[4 + cl] == '\r' || p[4 + cl] == ' '))
            return true;
        p = eol + 1;
    }
    return false;
}

static void session_done(struct sess *s)
{
    double ms = (double)(uv_hrtime() - s->t0) / 1e6;
    if (g.lat_n == g.lat_cap) {
        g.lat_cap = g.lat_cap ? g.lat_cap * 2 : 4096;
        if (!(g.lat = realloc(g.lat, g.lat_cap * sizeof(*g.lat))))
            die("out of memory");
    }
    g.lat[g.lat_n++] = ms;
    g.ok++;
    s->ok = true;
    if (opt.resume && !g.saved)
        g.saved = wolfSSL_get1_session(s->ssl);
    set_state(s, ST_CLOSING);
    /* close_notify, as an MTA's client does; then close once written. */
    wolfSSL_shutdown(s->ssl);
    if (s->pend.len || s->write_inflight)
        flush(s);
    else
        sess_close(s);
}

/* One complete reply: its code and text (all lines). */
static void on_reply(struct sess *s, int code, const char *text, size_t len)
{
    static const int expect[ST_COUNT] = {
        [ST_GREETING] = 220, [ST_EHLO1] = 250, [ST_STARTTLS] = 220,
        [ST_EHLO2] = 250,    [ST_MAIL] = 250,  [ST_RCPT] = 250,
        [ST_DATA] = 354,     [ST_BODY] = 250,  [ST_QUIT] = 221,
        [ST_NOOP] = 250,
    };
    if (expect[s->st] == 0 || (s->st == ST_BODY && !s->end_sent)) {
        char d[128];
        snprintf(d, sizeof(d), "%.*s", (int)(len > 100 ? 100 : len), text);
        d[strcspn(d, "\r\n")] = 0;
        sess_fail(s, "unexpected reply", d);
        return;
    }
    if (code != expect[s->st]) {
        char what[48], d[128];
        snprintf(what, sizeof(what), "expected %d, got %d", expect[s->st], code);
        snprintf(d, sizeof(d), "%.*s", (int)(len > 100 ? 100 : len), text);
        d[strcspn(d, "\r\n")] = 0;
        sess_fail(s, what, d);
        return;
    }
    char buf[512];
    switch (s->st) {
    case ST_GREETING:
        snprintf(buf, sizeof(buf), "EHLO %s\r\n", opt.ehlo);
        set_state(s, ST_EHLO1);
        send_cmd(s, buf);
        break;
    case ST_EHLO1:
        if (!has_capability(text, len, "STARTTLS")) {
            sess_fail(s, "STARTTLS not offered", NULL);
            return;
        }
        set_state(s, ST_STARTTLS);
        send_cmd(s, "STARTTLS\r\n");
        break;
    case ST_STARTTLS:
        start_tls(s);
        break;
    case ST_EHLO2:
        if (opt.mode == MODE_HOLD) {
            set_state(s, ST_HELD);
            s->deadline = 0;
            g.held++;
            start_sessions();
            maybe_ready();
            break;
        }
        snprintf(buf, sizeof(buf), "MAIL FROM:<bench@example.org> SIZE=%" PRIu64 "\r\n",
                 message_len);
        set_state(s, ST_MAIL);
        if (opt.pipeline) {
            size_t n = strlen(buf);
            snprintf(buf + n, sizeof(buf) - n,
                     "RCPT TO:<sink@example.net>\r\nDATA\r\n");
        }
        send_cmd(s, buf);
        break;
    case ST_MAIL:
        set_state(s, ST_RCPT);
        if (!opt.pipeline)
            send_cmd(s, "RCPT TO:<sink@example.net>\r\n");
        break;
    case ST_RCPT:
        set_state(s, ST_DATA);
        if (!opt.pipeline)
            send_cmd(s, "DATA\r\n");
        break;
    case ST_DATA:
        set_state(s, ST_BODY);
        s->body_left = body_len;
        s->body_off = 0;
        s->end_sent = false;
        if (send_bytes(s, header, header_len) < 0)
            return;
        pump_body(s);
        break;
    case ST_BODY:
        g.msg_bytes += message_len;
        g.msg_count++;
        set_state(s, ST_QUIT);
        send_cmd(s, "QUIT\r\n");
        break;
    case ST_QUIT:
        session_done(s);
        break;
    case ST_NOOP:
        set_state(s, ST_HELD);
        s->deadline = 0;
        g.verify_pending--;
        g.verify_ok++;
        maybe_verified();
        break;
    case ST_CONNECTING:
    case ST_HANDSHAKE:
    case ST_HELD:
    case ST_CLOSING:
    case ST_COUNT:
        abort(); /* expect[] is 0 there */
    }
}

/* Plaintext from the server (before TLS, or decrypted): split into replies. */
static void feed_plain(struct sess *s, const char *p, size_t n)
{
    bool was_plain = !s->tls_on;
    while (n > 0 && !s->closing) {
        size_t room = RBUF_SIZE - s->rlen;
        size_t k = n < room ? n : room;
        memcpy(s->rbuf + s->rlen, p, k);
        s->rlen += k;
        p += k;
        n -= k;
        size_t start = 0, pos = 0;
        while (!s->closing) {
            char *eol = memchr(s->rbuf + pos, '\n', s->rlen - pos);
            if (!eol)
                break;
            size_t llen = (size_t)(eol - (s->rbuf + pos)) + 1;
            const char *l = s->rbuf + pos;
            if (llen < 5 || l[0] < '0' || l[0] > '9' || l[1] < '0' ||
                l[1] > '9' || l[2] < '0' || l[2] > '9' ||
                (l[3] != ' ' && l[3] != '-' && l[3] != '\r')) {
                char d[128];
                snprintf(d, sizeof(d), "%.*s", (int)(llen > 100 ? 100 : llen), l);
                d[strcspn(d, "\r\n")] = 0;
                sess_fail(s, "malformed reply line", d);
                return;
            }
            pos += llen;
            if (l[3] == '-')
                continue;
            int code = (l[0] - '0') * 100 + (l[1] - '0') * 10 + (l[2] - '0');
            bool leftover = pos != s->rlen || n > 0;
            on_reply(s, code, s->rbuf + start, pos - start);
            start = pos;
            if (was_plain && s->tls_on) {
                /* That was the 220 to STARTTLS (RFC 3207): nothing may
                 * follow it in plaintext. */
                if (leftover && !s->closing)
                    sess_fail(s, "plaintext after the 220 to STARTTLS", NULL);
                return;
            }
        }
        if (s->closing)
            return;
        if (start > 0) {
            memmove(s->rbuf, s->rbuf + start, s->rlen - start);
            s->rlen -= start;
        } else if (s->rlen == RBUF_SIZE) {
            sess_fail(s, "reply longer than 8 KiB", NULL);
            return;
        }
    }
}

/* Decrypt whatever wolfSSL can and hand it on, until it wants more input. */
static void drain_tls(struct sess *s)
{
    char plain[PLAIN_SIZE];
    while (!s->closing && s->st != ST_CLOSING) {
        int r = wolfSSL_read(s->ssl, plain, sizeof(plain));
        if (r > 0) {
            feed_plain(s, plain, (size_t)r);
            continue;
        }
        int e = wolfSSL_get_error(s->ssl, r);
        if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE)
            break;
        if (e == WOLFSSL_ERROR_ZERO_RETURN)
            sess_fail(s, "TLS close_notify from server", NULL);
        else
            sess_fail(s, "TLS read failed", tls_err(s, r));
        return;
    }
    flush(s); /* a read may have produced output (alerts, key updates) */
}

static void do_handshake(struct sess *s)
{
    int r = wolfSSL_connect(s->ssl);
    flush(s);
    if (r != WOLFSSL_SUCCESS) {
        int e = wolfSSL_get_error(s->ssl, r);
        if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE)
            return;
        sess_fail(s, "TLS handshake failed", tls_err(s, r));
        return;
    }
    g.handshakes++;
    if (wolfSSL_session_reused(s->ssl))
        g.resumed++;
    if (!g.cipher[0]) {
        const char *v = wolfSSL_get_version(s->ssl);
        const char *c = wolfSSL_get_cipher_name(s->ssl);
        const char *cv = wolfSSL_get_curve_name(s->ssl);
        snprintf(g.tls_version, sizeof(g.tls_version), "%s", v ? v : "?");
        snprintf(g.cipher, sizeof(g.cipher), "%s", c ? c : "?");
        snprintf(g.curve, sizeof(g.curve), "%s", cv ? cv : "?");
    }
    char buf[300];
    snprintf(buf, sizeof(buf), "EHLO %s\r\n", opt.ehlo);
    set_state(s, ST_EHLO2);
    send_cmd(s, buf);
}

static void start_tls(struct sess *s)
{
    s->ssl = wolfSSL_new(g.ctx);
    if (!s->ssl) {
        sess_fail(s, "wolfSSL_new failed", NULL);
        return;
    }
    wolfSSL_SetIOReadCtx(s->ssl, s);
    wolfSSL_SetIOWriteCtx(s->ssl, s);
    int grp = strcmp(opt.group, "p256") == 0 ? WOLFSSL_ECC_SECP256R1
                                             : WOLFSSL_ECC_X25519;
    if (wolfSSL_UseKeyShare(s->ssl, (word16)grp) != WOLFSSL_SUCCESS) {
        sess_fail(s, "key share setup failed", NULL);
        return;
    }
    if (g.saved)
        wolfSSL_set_session(s->ssl, g.saved);
    s->tls_on = true;
    s->rlen = 0;
    set_state(s, ST_HANDSHAKE);
    do_handshake(s);
}

/* ---- reading ---------------------------------------------------------------- */

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    *buf = uv_buf_init(read_buf, sizeof(read_buf));
}

static void read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct sess *s = sess_of(st->data);
    if (s->closing || nread == 0)
        return;
    if (nread < 0) {
        if (s->st == ST_CLOSING) {
            sess_close(s);
            return;
        }
        sess_fail(s, nread == UV_EOF ? "connection closed by server"
                                     : "read failed",
                  nread == UV_EOF ? NULL : uv_strerror((int)nread));
        return;
    }
    if (s->st == ST_CLOSING)
        return; /* whatever follows our QUIT: ignored */
    if (!s->tls_on) {
        feed_plain(s, buf->base, (size_t)nread);
        return;
    }
    s->cin = buf->base;
    s->cin_len = (size_t)nread;
    if (s->st == ST_HANDSHAKE)
        do_handshake(s);
    if (!s->closing && s->st != ST_HANDSHAKE)
        drain_tls(s);
    if (!s->closing && s->cin_len && s->st != ST_CLOSING)
        sess_fail(s, "TLS input left unread", NULL);
    s->cin_len = 0;
}

/* ---- starting sessions ------------------------------------------------------ */

static void connect_cb(uv_connect_t *req, int status)
{
    struct sess *s = sess_of(req->data);
    if (status == UV_ECANCELED || s->closing)
        return;
    if (status < 0) {
        sess_fail(s, "connect failed", uv_strerror(status));
        return;
    }
    uv_tcp_nodelay(&s->tcp, 1);
    set_state(s, ST_GREETING);
    int r = uv_read_start((uv_stream_t *)&s->tcp, alloc_cb, read_cb);
    if (r < 0)
        sess_fail(s, "read failed", uv_strerror(r));
}

static bool may_start(void)
{
    if (g.stop_starting || g.quitting)
        return false;
    if (opt.mode == MODE_HOLD)
        return g.started < opt.sessions;
    if (opt.sessions && g.started >= opt.sessions)
        return false;
    if (opt.duration > 0 &&
        (double)(uv_hrtime() - g.t_start) / 1e9 >= opt.duration)
        return false;
    return true;
}

static unsigned in_progress(void)
{
    /* Sessions that are opening (hold) or running (full, bulk). */
    return (unsigned)(opt.mode == MODE_HOLD ? g.active - g.held : g.active);
}

static void start_sessions(void)
{
    while (may_start() && in_progress() < opt.concurrency) {
        struct sess *s = calloc(1, sizeof(*s));
        if (!s)
            die("out of memory");
        s->magic = SESS_MAGIC;
        s->id = ++g.next_id;
        s->tcp.data = s;
        s->creq.data = s;
        s->wreq.data = s;
        s->next = g.live;
        if (g.live)
            g.live->prev = s;
        g.live = s;
        g.started++;
        g.active++;
        s->t0 = uv_hrtime();
        set_state(s, ST_CONNECTING);
        int r = uv_tcp_init(g.loop, &s->tcp);
        if (r < 0)
            die("uv_tcp_init: %s", uv_strerror(r));
        r = uv_tcp_connect(&s->creq, &s->tcp, (struct sockaddr *)&g.addr,
                           connect_cb);
        if (r < 0)
            sess_fail(s, "connect failed", uv_strerror(r));
    }
}

/* ---- timers, control ------------------------------------------------------- */

static void sweep_cb(uv_timer_t *t)
{
    uint64_t now = uv_now(g.loop);
    struct sess *s = g.live, *next;
    for (; s; s = next) {
        next = s->next;
        if (!s->closing && s->deadline && now > s->deadline) {
            char d[64];
            snprintf(d, sizeof(d), "no progress for %.0f s", opt.timeout);
            sess_fail(s, "timeout", d);
        }
    }
    if (opt.mode != MODE_HOLD)
        start_sessions(); /* the duration may have run out */
    maybe_finish();
}

static void print_kinds(FILE *f)
{
    fputc('{', f);
    for (unsigned i = 0; i < g.n_kinds; i++) {
        fputs(i ? ", \"" : "\"", f);
        for (const char *p = g.kinds[i].what; *p; p++) {
            if (*p == '"' || *p == '\\')
                fputc('\\', f);
            fputc((unsigned char)*p < 0x20 ? '?' : *p, f);
        }
        fprintf(f, "\": %" PRIu64, g.kinds[i].n);
    }
    fputc('}', f);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p)
{
    if (!g.lat_n)
        return 0;
    size_t i = (size_t)ceil(p / 100.0 * (double)g.lat_n);
    if (i > 0)
        i--;
    if (i >= g.lat_n)
        i = g.lat_n - 1;
    return g.lat[i];
}

static void print_tls_fields(void)
{
    printf("\"tls\": \"%s\", \"cipher\": \"%s\", \"group\": \"%s\", "
           "\"handshakes\": %" PRIu64 ", \"resumed\": %" PRIu64,
           g.tls_version, g.cipher, g.curve, g.handshakes, g.resumed);
}

static void report_full(void)
{
    double el = (double)(g.t_end - g.t_start) / 1e9;
    double sum = 0;
    if (g.lat_n)
        qsort(g.lat, g.lat_n, sizeof(*g.lat), cmp_double);
    for (size_t i = 0; i < g.lat_n; i++)
        sum += g.lat[i];
    printf("{\"event\": \"result\", \"mode\": \"%s\", \"concurrency\": %u, "
           "\"started\": %" PRIu64 ", \"ok\": %" PRIu64 ", \"failed\": %" PRIu64
           ", \"elapsed_s\": %.6f, \"sessions_per_s\": %.3f, "
           "\"msg_size\": %" PRIu64 ", \"messages\": %" PRIu64
           ", \"msg_bytes\": %" PRIu64 ", \"mbytes_per_s\": %.3f, "
           "\"lat_ms\": {\"mean\": %.3f, \"p50\": %.3f, \"p90\": %.3f, "
           "\"p99\": %.3f, \"max\": %.3f}, ",
           opt.mode == MODE_BULK ? "bulk" : "full", opt.concurrency, g.started,
           g.ok, g.failed, el, el > 0 ? (double)g.ok / el : 0, message_len,
           g.msg_count, g.msg_bytes,
           el > 0 ? (double)g.msg_bytes / el / 1e6 : 0,
           g.lat_n ? sum / (double)g.lat_n : 0, pct(50), pct(90), pct(99),
           g.lat_n ? g.lat[g.lat_n - 1] : 0);
    print_tls_fields();
    printf(", \"phase_ms\": {");
    for (int i = 0, first = 1; i < ST_COUNT; i++) {
        if (!g.phase_n[i])
            continue;
        printf("%s\"%s\": %.3f", first ? "" : ", ", st_names[i],
               (double)g.phase_ns[i] / (double)g.phase_n[i] / 1e6);
        first = 0;
    }
    printf("}, \"errors\": ");
    print_kinds(stdout);
    printf("}\n");
    fflush(stdout);
}

static void close_controls(void)
{
    uv_close((uv_handle_t *)&g.sweep, NULL);
    if (!uv_is_closing((uv_handle_t *)&g.hold_timer))
        uv_close((uv_handle_t *)&g.hold_timer, NULL);
    uv_close((uv_handle_t *)&g.sigint, NULL);
    uv_close((uv_handle_t *)&g.sigterm, NULL);
    if (g.in && !uv_is_closing((uv_handle_t *)g.in))
        uv_close((uv_handle_t *)g.in, NULL);
}

static bool finished;

static void maybe_finish(void)
{
    if (finished)
        return;
    if (opt.mode == MODE_HOLD) {
        if (!g.quitting || g.active)
            return;
        finished = true;
        printf("{\"event\": \"done\", \"held_at_quit\": %" PRIu64
               ", \"dropped\": %" PRIu64 "}\n",
               g.held, g.dropped);
        fflush(stdout);
        close_controls();
        return;
    }
    if (g.active || may_start())
        return;
    finished = true;
    g.t_end = uv_hrtime();
    report_full();
    close_controls();
}

static void maybe_ready(void)
{
    if (g.ready_printed || g.started < opt.sessions ||
        g.active != g.held)
        return;
    if (opt.mode != MODE_HOLD)
        return;
    g.ready_printed = true;
    double el = (double)(uv_hrtime() - g.t_start) / 1e9;
    printf("{\"event\": \"ready\", \"requested\": %" PRIu64 ", \"held\": %" PRIu64
           ", \"failed\": %" PRIu64 ", \"elapsed_s\": %.3f, ",
           opt.sessions, g.held, g.failed, el);
    print_tls_fields();
    printf(", \"errors\": ");
    print_kinds(stdout);
    printf("}\n");
    fflush(stdout);
    if (opt.hold_time > 0)
        uv_timer_start(&g.hold_timer, hold_timer_cb,
                       (uint64_t)(opt.hold_time * 1000), 0);
}

static void maybe_verified(void)
{
    if (!g.verifying || g.verify_pending)
        return;
    g.verifying = false;
    printf("{\"event\": \"verified\", \"ok\": %" PRIu64 ", \"failed\": %" PRIu64
           ", \"held\": %" PRIu64 ", \"dropped\": %" PRIu64 ", \"errors\": ",
           g.verify_ok, g.verify_failed, g.held, g.dropped);
    print_kinds(stdout);
    printf("}\n");
    fflush(stdout);
}

static void quit_all(void)
{
    if (g.quitting)
        return;
    g.quitting = true;
    for (struct sess *s = g.live; s; s = s->next)
        if (!s->closing)
            sess_close(s);
    maybe_finish();
}

static void verify_all(void)
{
    if (g.verifying || g.quitting)
        return;
    g.verifying = true;
    g.verify_ok = g.verify_failed = 0;
    for (struct sess *s = g.live; s; s = s->next) {
        if (s->closing || s->st != ST_HELD)
            continue;
        set_state(s, ST_NOOP);
        g.verify_pending++;
        if (send_cmd(s, "NOOP\r\n") < 0)
            continue;
    }
    maybe_verified();
}

static void on_signal(uv_signal_t *h, int signum)
{
    if (opt.mode == MODE_HOLD) {
        quit_all();
        return;
    }
    /* full/bulk: stop starting, report what finished. */
    g.stop_starting = true;
    for (struct sess *s = g.live; s; s = s->next)
        if (!s->closing && s->st != ST_CLOSING)
            sess_fail(s, "interrupted", NULL);
    maybe_finish();
}

static void hold_timer_cb(uv_timer_t *t) { quit_all(); }

static void in_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    static char b[256];
    *buf = uv_buf_init(b, sizeof(b));
}

static void in_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    if (nread < 0) {
        uv_close((uv_handle_t *)st, NULL);
        g.in = NULL;
        quit_all();
        return;
    }
    for (ssize_t i = 0; i < nread; i++) {
        char c = buf->base[i];
        if (c != '\n') {
            if (g.cmd_len < sizeof(g.cmd) - 1)
                g.cmd[g.cmd_len++] = c;
            continue;
        }
        g.cmd[g.cmd_len] = 0;
        g.cmd_len = 0;
        if (strcmp(g.cmd, "verify") == 0)
            verify_all();
        else if (strcmp(g.cmd, "quit") == 0)
            quit_all();
        else if (strcmp(g.cmd, "status") == 0) {
            printf("{\"event\": \"status\", \"held\": %" PRIu64
                   ", \"dropped\": %" PRIu64 ", \"failed\": %" PRIu64 "}\n",
                   g.held, g.dropped, g.failed);
            fflush(stdout);
        } else if (g.cmd[0])
            fprintf(stderr, "stp-loadgen: unknown command '%s' (verify, status, quit)\n",
                    g.cmd);
    }
}

/* ---- set-up ----------------------------------------------------------------- */

static uint64_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    uint64_t m = 1;
    switch (*end) {
    case 'k': case 'K': m = 1024; end++; break;
    case 'm': case 'M': m = 1024 * 1024; end++; break;
    case 'g': case 'G': m = 1024ull * 1024 * 1024; end++; break;
    }
    if (end == s || *end || v < 0)
        die("bad size '%s' (a number with an optional K, M or G)", s);
    return (uint64_t)(v * (double)m);
}

static void build_message(void)
{
    /* 1024 lines of 62 printable octets and CRLF; none starts with '.'. */
    for (int i = 0; i < PATTERN_SIZE / LINE_LEN; i++) {
        char *l = pattern + i * LINE_LEN;
        for (int j = 0; j < LINE_LEN - 2; j++)
            l[j] = (char)('A' + (i * 7 + j) % 58);
        if (l[0] == '.')
            l[0] = 'x';
        l[LINE_LEN - 2] = '\r';
        l[LINE_LEN - 1] = '\n';
    }
    header_len = (size_t)snprintf(header, sizeof(header),
        "From: <bench@example.org>\r\nTo: <sink@example.net>\r\n"
        "Subject: stp-loadgen\r\nMessage-ID: <stp-loadgen@example.org>\r\n\r\n");
    uint64_t want = opt.size > header_len + 3 ? opt.size - header_len - 3 : 0;
    body_len = (want + LINE_LEN - 1) / LINE_LEN * LINE_LEN;
    if (body_len == 0)
        body_len = LINE_LEN;
    message_len = header_len + body_len + 3;
}

static void usage(FILE *f)
{
    fprintf(f,
"usage: stp-loadgen -p PORT [options]\n"
"  -H, --host ADDR        server address, numeric (default 127.0.0.1)\n"
"  -p, --port PORT        server port (required)\n"
"  -m, --mode MODE        full | bulk | hold (default full)\n"
"  -c, --concurrency C    sessions at once (full 8, bulk 1; hold: opening at once, 200)\n"
"  -n, --sessions N       full/bulk: sessions in all (0 = until -d); hold: sessions to hold\n"
"  -d, --duration SECS    full/bulk: stop starting sessions after SECS\n"
"  -s, --size SIZE        message size in octets, K/M/G suffixes (full 1K, bulk 256M)\n"
"  -t, --timeout SECS     fail a session that makes no progress for SECS (30)\n"
"      --hold-time SECS   hold: quit SECS after ready (default: wait for stdin/signal)\n"
"      --pipeline         send MAIL, RCPT and DATA together\n"
"      --resume           offer the first session's TLS session to later ones\n"
"      --ciphers LIST     wolfSSL cipher list (TLS13-AES128-GCM-SHA256)\n"
"      --group G          key share: x25519 | p256 (x25519)\n"
"      --ehlo NAME        EHLO argument\n"
"  -h, --help\n"
"Results: JSON lines on stdout. hold mode reads commands on stdin:\n"
"verify (NOOP on every held session), status, quit.\n");
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"host", 1, 0, 'H'},        {"port", 1, 0, 'p'},
        {"mode", 1, 0, 'm'},        {"concurrency", 1, 0, 'c'},
        {"sessions", 1, 0, 'n'},    {"duration", 1, 0, 'd'},
        {"size", 1, 0, 's'},        {"timeout", 1, 0, 't'},
        {"hold-time", 1, 0, 1},     {"pipeline", 0, 0, 2},
        {"resume", 0, 0, 3},        {"ciphers", 1, 0, 4},
        {"group", 1, 0, 5},         {"ehlo", 1, 0, 6},
        {"help", 0, 0, 'h'},        {0, 0, 0, 0},
    };
    bool have_c = false, have_n = false, have_s = false;
    int o;
    while ((o = getopt_long(argc, argv, "H:p:m:c:n:d:s:t:h", lo, NULL)) != -1) {
        switch (o) {
        case 'H': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'm':
            if (!strcmp(optarg, "full")) opt.mode = MODE_FULL;
            else if (!strcmp(optarg, "bulk")) opt.mode = MODE_BULK;
            else if (!strcmp(optarg, "hold")) opt.mode = MODE_HOLD;
            else die("bad mode '%s' (full, bulk, hold)", optarg);
            break;
        case 'c': opt.concurrency = (unsigned)atoi(optarg); have_c = true; break;
        case 'n': opt.sessions = strtoull(optarg, NULL, 10); have_n = true; break;
        case 'd': opt.duration = atof(optarg); break;
        case 's': opt.size = parse_size(optarg); have_s = true; break;
        case 't': opt.timeout = atof(optarg); break;
        case 1: opt.hold_time = atof(optarg); break;
        case 2: opt.pipeline = true; break;
        case 3: opt.resume = true; break;
        case 4: opt.ciphers = optarg; break;
        case 5:
            if (strcmp(optarg, "x25519") && strcmp(optarg, "p256"))
                die("bad group '%s' (x25519, p256)", optarg);
            opt.group = optarg;
            break;
        case 6: opt.ehlo = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc || opt.port <= 0 || opt.port > 65535) {
        usage(stderr);
        return 2;
    }
    if (!have_c)
        opt.concurrency = opt.mode == MODE_FULL ? 8 : opt.mode == MODE_BULK ? 1 : 200;
    if (!have_s)
        opt.size = opt.mode == MODE_BULK ? 256u << 20 : 1024;
    if (!have_n && opt.duration <= 0)
        opt.sessions = opt.mode == MODE_BULK ? opt.concurrency : 100;
    if (opt.mode == MODE_HOLD && opt.sessions == 0)
        die("hold mode needs -n K");
    if (opt.concurrency == 0 || opt.timeout <= 0)
        die("concurrency and timeout must be positive");
    build_message();

    signal(SIGPIPE, SIG_IGN);
    g.loop = uv_default_loop();
    int r = uv_ip4_addr(opt.host, opt.port, (struct sockaddr_in *)&g.addr);
    if (r < 0 && uv_ip6_addr(opt.host, opt.port, (struct sockaddr_in6 *)&g.addr) < 0)
        die("bad address '%s' (numeric IPv4 or IPv6)", opt.host);

    if (wolfSSL_Init() != WOLFSSL_SUCCESS)
        die("wolfSSL_Init failed");
    g.ctx = wolfSSL_CTX_new(wolfSSLv23_client_method());
    if (!g.ctx)
        die("wolfSSL_CTX_new failed");
    wolfSSL_CTX_set_verify(g.ctx, WOLFSSL_VERIFY_NONE, NULL);
    if (wolfSSL_CTX_set_cipher_list(g.ctx, opt.ciphers) != WOLFSSL_SUCCESS)
        die("cipher list '%s' not accepted by wolfSSL", opt.ciphers);
    int groups[1] = {strcmp(opt.group, "p256") == 0 ? WOLFSSL_ECC_SECP256R1
                                                     : WOLFSSL_ECC_X25519};
    if (wolfSSL_CTX_set_groups(g.ctx, groups, 1) != WOLFSSL_SUCCESS)
        die("group '%s' not accepted by wolfSSL", opt.group);
    wolfSSL_CTX_SetIORecv(g.ctx, tls_recv_cb);
    wolfSSL_CTX_SetIOSend(g.ctx, tls_send_cb);

    uv_timer_init(g.loop, &g.sweep);
    uv_timer_start(&g.sweep, sweep_cb, 250, 250);
    uv_timer_init(g.loop, &g.hold_timer);
    uv_signal_init(g.loop, &g.sigint);
    uv_signal_start(&g.sigint, on_signal, SIGINT);
    uv_signal_init(g.loop, &g.sigterm);
    uv_signal_start(&g.sigterm, on_signal, SIGTERM);
    if (opt.mode == MODE_HOLD) {
        uv_handle_type t = uv_guess_handle(0);
        if (t == UV_NAMED_PIPE && uv_pipe_init(g.loop, &g.in_pipe, 0) == 0 &&
            uv_pipe_open(&g.in_pipe, 0) == 0)
            g.in = (uv_stream_t *)&g.in_pipe;
        else if (t == UV_TTY && uv_tty_init(g.loop, &g.in_tty, 0, 1) == 0)
            g.in = (uv_stream_t *)&g.in_tty;
        if (g.in)
            uv_read_start(g.in, in_alloc, in_read);
        else if (opt.hold_time <= 0)
            die("hold mode: stdin is not a pipe or terminal; give --hold-time");
    }

    g.t_start = uv_hrtime();
    start_sessions();
    uv_run(g.loop, UV_RUN_DEFAULT);

    if (g.saved)
        wolfSSL_SESSION_free(g.saved);
    wolfSSL_CTX_free(g.ctx);
    wolfSSL_Cleanup();
    if (opt.mode != MODE_HOLD && g.n_kinds) {
        fprintf(stderr, "stp-loadgen: %" PRIu64 " of %" PRIu64 " sessions failed: ",
                g.failed, g.started);
        print_kinds(stderr);
        fputc('\n', stderr);
        return 1;
    }
    if (opt.mode == MODE_HOLD && g.n_kinds) {
        fprintf(stderr, "stp-loadgen: hold: %" PRIu64 " failed or dropped: ", g.failed);
        print_kinds(stderr);
        fputc('\n', stderr);
    }
    return 0;
}
#endif /* NO_WOLFSSL_CLIENT */
