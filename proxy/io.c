/* libuv stream glue: pooled buffers, TLS pumping, a bounded output queue.
 *
 * Data path: ciphertext is read straight into `crx`, which the TLS recv
 * callback consumes; wolfSSL decrypts into `rx`; the owner hands slices of
 * `rx` to the other connection's queue (stp_conn_write_ref) without a copy.
 * Records produced by wolfSSL are appended to the queue by the send callback.
 * A flush hands every queued slice to uv_try_write; only what the socket
 * does not take goes to a uv_write, one in flight at a time. */
#include <string.h>

#include "io.h"

#define STP_CONN_MAGIC 0x53545043u /* "STPC" */

struct stp_conn {
    uint32_t magic;
    uv_tcp_t tcp;
    uv_write_t *wreq;   /* only while a write waits for the socket */
    stp_conn_cb cb;
    void *owner;
    void (*closed)(void *owner); /* told once the conn is freed */
    struct stp_tls *tls;
    bool tls_ready;
    bool reading;       /* the owner wants input */
    bool read_active;   /* uv_read_start is in effect */
    bool closing;
    bool eof;           /* the peer's FIN (or close_notify) came */
    bool eof_told;      /* STP_IO_EOF was reported: it is, once */
    /* Plaintext input: bytes [rx_off, rx->len) are not consumed yet. */
    struct stp_buf *rx;
    uint32_t rx_off;
    /* Ciphertext input, consumed by the TLS recv callback. */
    struct stp_buf *crx;
    uint32_t crx_off;
    /* Plaintext staged for one TLS record per flush. */
    struct stp_buf *ptx;
    /* Output queue of ciphertext or plaintext slices. */
    struct stp_slice outq[STP_OUTQ_SLOTS];
    unsigned out_head, out_count, out_inflight;
    size_t out_bytes;
    uint64_t bytes_in, bytes_out; /* on the wire */
};

/* ---- buffer pool (one event loop per thread: no locks) -------------------- */

#define POOL_REST 16

static __thread struct stp_buf *pool;
static __thread unsigned pool_n;

struct stp_buf *stp_buf_get(void)
{
    struct stp_buf *b = pool;
    if (b) {
        pool = b->next;
        pool_n--;
    } else if (!(b = malloc(sizeof(*b)))) {
        return NULL;
    }
    b->next = NULL;
    b->refs = 1;
    b->len = 0;
    return b;
}

void stp_buf_unref(struct stp_buf *b)
{
    if (!b || --b->refs > 0)
        return;
    if (pool_n >= POOL_REST) {
        free(b);
        return;
    }
    b->next = pool;
    pool = b;
    pool_n++;
}

void stp_buf_pool_trim(void)
{
    while (pool) {
        struct stp_buf *b = pool;
        pool = b->next;
        free(b);
    }
    pool_n = 0;
}

/* ---- helpers ------------------------------------------------------------- */

static struct stp_conn *conn_of(void *handle_data)
{
    struct stp_conn *c = handle_data;
    STP_ASSERT(c && c->magic == STP_CONN_MAGIC);
    return c;
}

/* Make room at the end of *bp, keeping bytes from *off on. Returns the free
 * space (0 when the buffer is full of unconsumed input). */
static size_t make_room(struct stp_buf **bp, uint32_t *off)
{
    struct stp_buf *b = *bp;
    if (!b) {
        if (!(*bp = stp_buf_get()))
            return 0;
        *off = 0;
        return STP_BUF_SIZE;
    }
    if (b->len < STP_BUF_SIZE || *off == 0)
        return STP_BUF_SIZE - b->len;
    size_t keep = b->len - *off;
    if (b->refs == 1) {
        memmove(b->data, b->data + *off, keep);
        b->len = (uint32_t)keep;
    } else {
        /* Slices of it are still queued for writing: move on. */
        struct stp_buf *nb = stp_buf_get();
        if (!nb)
            return 0;
        memcpy(nb->data, b->data + *off, keep);
        nb->len = (uint32_t)keep;
        stp_buf_unref(b);
        *bp = nb;
    }
    *off = 0;
    return STP_BUF_SIZE - (*bp)->len;
}

/* Is there room for input? Does not allocate: a missing buffer is fetched
 * from the pool by alloc_cb only when bytes actually arrive. */
static bool input_room(struct stp_conn *c)
{
    struct stp_buf *b = c->tls ? c->crx : c->rx;
    uint32_t off = c->tls ? c->crx_off : c->rx_off;
    return !b || b->len < STP_BUF_SIZE || off > 0;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct stp_conn *c = conn_of(h->data);
    struct stp_buf **bp = c->tls ? &c->crx : &c->rx;
    uint32_t *off = c->tls ? &c->crx_off : &c->rx_off;
    size_t room = make_room(bp, off);
    *buf = uv_buf_init(room ? (*bp)->data + (*bp)->len : NULL,
                       (unsigned)room);
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void update_reading(struct stp_conn *c)
{
    bool on = c->reading && !c->closing && !c->eof && input_room(c);
    if (on == c->read_active)
        return;
    c->read_active = on;
    if (on)
        uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb);
    else
        uv_read_stop((uv_stream_t *)&c->tcp);
}

/* ---- output queue ------------------------------------------------------- */

static void write_cb(uv_write_t *req, int status);

static int outq_push(struct stp_conn *c, struct stp_buf *b, uint32_t off,
                     uint32_t len)
{
    if (c->out_count == STP_OUTQ_SLOTS)
        return -ENOBUFS;
    struct stp_slice *s =
        &c->outq[(c->out_head + c->out_count) % STP_OUTQ_SLOTS];
    s->buf = b;
    s->off = off;
    s->len = len;
    c->out_count++;
    c->out_bytes += len;
    return 0;
}

/* Copy bytes onto the queue, filling the last buffer when it is ours alone
 * and not yet being written. */
static int outq_copy(struct stp_conn *c, const char *p, size_t n)
{
    while (n > 0) {
        struct stp_slice *t = NULL;
        if (c->out_count > c->out_inflight)
            t = &c->outq[(c->out_head + c->out_count - 1) % STP_OUTQ_SLOTS];
        if (t && t->buf->refs == 1 && t->off + t->len == t->buf->len &&
            t->buf->len < STP_BUF_SIZE) {
            size_t k = STP_MIN(n, (size_t)(STP_BUF_SIZE - t->buf->len));
            memcpy(t->buf->data + t->buf->len, p, k);
            t->buf->len += (uint32_t)k;
            t->len += (uint32_t)k;
            c->out_bytes += k;
            p += k;
            n -= k;
            continue;
        }
        struct stp_buf *b = stp_buf_get();
        if (!b)
            return -ENOMEM;
        int r = outq_push(c, b, 0, 0);
        if (r < 0) {
            stp_buf_unref(b);
            return r;
        }
    }
    return 0;
}

/* Drop the first n queued bytes: they have been written. */
static void outq_consume(struct stp_conn *c, size_t n)
{
    while (n > 0) {
        struct stp_slice *s = &c->outq[c->out_head];
        uint32_t k = (uint32_t)STP_MIN(n, (size_t)s->len);
        s->off += k;
        s->len -= k;
        c->out_bytes -= k;
        c->bytes_out += k;
        n -= k;
        if (s->len > 0)
            break;
        stp_buf_unref(s->buf);
        c->out_head = (c->out_head + 1) % STP_OUTQ_SLOTS;
        c->out_count--;
    }
}

static unsigned outq_bufs(const struct stp_conn *c, uv_buf_t *bufs)
{
    for (unsigned i = 0; i < c->out_count; i++) {
        const struct stp_slice *s =
            &c->outq[(c->out_head + i) % STP_OUTQ_SLOTS];
        bufs[i] = uv_buf_init(s->buf->data + s->off, s->len);
    }
    return c->out_count;
}

/* Write what is queued. The socket usually takes it all at once: then no
 * write request, no callback and no change to the epoll set (uv_write costs
 * an epoll_ctl per call). Only the rest goes to uv_write, which reports a
 * later error from write_cb. An error now is returned, never called back:
 * the owner may be in the middle of something (the SMTP engine). */
static int start_write(struct stp_conn *c)
{
    uv_buf_t bufs[STP_OUTQ_SLOTS];
    if (c->out_inflight || !c->out_count || c->closing)
        return 0;
    int n = uv_try_write((uv_stream_t *)&c->tcp, bufs, outq_bufs(c, bufs));
    if (n > 0)
        outq_consume(c, (size_t)n);
    if (!c->out_count)
        return 0;
    /* Most sessions never get here: the request exists only meanwhile. */
    if (!c->wreq && !(c->wreq = malloc(sizeof(*c->wreq))))
        return -ENOMEM;
    c->out_inflight = outq_bufs(c, bufs);
    int r = uv_write(c->wreq, (uv_stream_t *)&c->tcp, bufs, c->out_inflight,
                     write_cb);
    if (r < 0)
        c->out_inflight = 0;
    return r;
}

static void write_cb(uv_write_t *req, int status)
{
    struct stp_conn *c = conn_of(req->handle->data);
    for (unsigned i = 0; i < c->out_inflight; i++) {
        struct stp_slice *s = &c->outq[c->out_head];
        c->out_bytes -= s->len;
        if (status == 0)
            c->bytes_out += s->len;
        stp_buf_unref(s->buf);
        c->out_head = (c->out_head + 1) % STP_OUTQ_SLOTS;
        c->out_count--;
    }
    c->out_inflight = 0;
    if (status == UV_ECANCELED || c->closing)
        return;
    if (status == 0)
        status = start_write(c);
    if (status < 0) {
        c->cb(c, STP_IO_ERROR, status);
        return;
    }
    /* Only a write that had to wait reports the queue empty: the owner
     * checks the queue itself after its own flushes. */
    if (!c->out_count) {
        free(c->wreq); /* libuv is done with it */
        c->wreq = NULL;
        c->cb(c, STP_IO_DRAINED, 0);
    }
}

/* ---- TLS ------------------------------------------------------------------ */

static int tls_recv(void *arg, char *buf, int sz)
{
    struct stp_conn *c = arg;
    if (!c->crx || c->crx_off == c->crx->len)
        return -EAGAIN;
    size_t k = STP_MIN((size_t)sz, (size_t)(c->crx->len - c->crx_off));
    memcpy(buf, c->crx->data + c->crx_off, k);
    c->crx_off += (uint32_t)k;
    if (c->crx_off == c->crx->len) {
        /* Nothing left: give the buffer back so idle sessions hold none. */
        stp_buf_unref(c->crx);
        c->crx = NULL;
        c->crx_off = 0;
    }
    return (int)k;
}

static int tls_send(void *arg, const char *buf, int sz)
{
    struct stp_conn *c = arg;
    int r = outq_copy(c, buf, (size_t)sz);
    return r < 0 ? r : sz;
}

static const struct stp_tls_io tls_io = {tls_recv, tls_send};

/* The peer sends no more: said once. Its last bytes may still be in rx, and
 * we may still write (a half-closed client waits for its replies). */
static void tell_eof(struct stp_conn *c)
{
    c->eof_told = true;
    update_reading(c);
    c->cb(c, STP_IO_EOF, 0);
}

/* Decrypt buffered records into rx, as many as there is room for. Returns
 * the event the owner is to get (DATA, EOF or ERROR with *ERR), or -1 for
 * none; calls nobody. An end or error after data is reported by the next
 * call (wolfSSL reports it again). */
static int tls_fill(struct stp_conn *c, int *err)
{
    *err = 0;
    if (c->closing || !c->tls_ready || !c->reading || c->eof_told)
        return -1;
    size_t room = make_room(&c->rx, &c->rx_off);
    if (room == 0)
        return -1;
    /* Every record there is room for before telling the owner: what a peer
     * sent in several records goes on in one write. */
    int r;
    bool got = false;
    while (room > 0 &&
           (r = stp_tls_read(c->tls, c->rx->data + c->rx->len, room)) > 0) {
        c->rx->len += (uint32_t)r;
        room -= (size_t)r;
        got = true;
    }
    if (got)
        return STP_IO_DATA;
    if (r == -EAGAIN) {
        int w = stp_conn_flush(c); /* a read may have produced alerts */
        if (w < 0) {
            *err = w;
            return STP_IO_ERROR;
        }
        /* Fetched for a read that brought nothing: an idle session holds
         * no buffer. */
        if (c->rx && c->rx->len == 0)
            stp_conn_discard_input(c);
        /* The peer's FIN came before its last records: told now that they
         * are decrypted. */
        if (!c->eof || (c->crx && c->crx_off < c->crx->len))
            return -1;
    } else if (r < 0) {
        *err = r;
        return STP_IO_ERROR;
    }
    /* close_notify, or the FIN after the last record */
    c->eof = c->eof_told = true;
    return STP_IO_EOF;
}

/* Run the handshake and decrypt into rx while the owner takes input. Only
 * from a libuv callback: it calls the owner. */
static void tls_pump(struct stp_conn *c)
{
    while (!c->closing) {
        if (!c->tls_ready) {
            int r = stp_tls_handshake(c->tls);
            int w = stp_conn_flush(c);
            if (r == -EAGAIN && w < 0)
                r = w;
            if (r == -EAGAIN)
                break;
            if (r < 0) {
                c->cb(c, STP_IO_ERROR, r);
                return;
            }
            c->tls_ready = true;
            c->cb(c, STP_IO_TLS_READY, 0);
            continue;
        }
        int err, ev = tls_fill(c, &err);
        if (ev < 0)
            break;
        if (ev == STP_IO_EOF)
            update_reading(c);
        c->cb(c, (enum stp_io_event)ev, err);
        if (ev != STP_IO_DATA)
            return;
    }
    if (!c->closing)
        update_reading(c);
}

/* ---- reading ---------------------------------------------------------------- */

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct stp_conn *c = conn_of(s->data);
    if (nread <= 0) {
        /* alloc_cb gave a buffer for a read that brought nothing: return it,
         * or every idle connection would hold one. */
        struct stp_buf **bp = c->tls ? &c->crx : &c->rx;
        if (*bp && (*bp)->len == 0) {
            stp_buf_unref(*bp);
            *bp = NULL;
            if (c->tls)
                c->crx_off = 0;
            else
                c->rx_off = 0;
        }
    }
    if (nread == 0 || c->closing)
        return;
    if (nread == UV_ENOBUFS) {
        update_reading(c);
        return;
    }
    if (nread == UV_EOF) {
        c->eof = true;
        if (c->tls && c->tls_ready && !c->eof_told)
            tls_pump(c); /* the records before the FIN first */
        else if (!c->eof_told)
            tell_eof(c);
        else
            update_reading(c);
        return;
    }
    if (nread < 0) {
        c->cb(c, STP_IO_ERROR, (int)nread);
        return;
    }
    c->bytes_in += (uint64_t)nread;
    if (c->tls) {
        c->crx->len += (uint32_t)nread;
        tls_pump(c);
        return;
    }
    c->rx->len += (uint32_t)nread;
    c->cb(c, STP_IO_DATA, 0);
    if (!c->closing)
        update_reading(c);
}

/* ---- public ----------------------------------------------------------------- */

int stp_conn_new(uv_loop_t *loop, int family, stp_conn_cb cb, void *owner,
                 struct stp_conn **out)
{
    *out = NULL;
    struct stp_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return UV_ENOMEM;
    /* uv_accept wants a handle without a socket; a connecting one gets its
     * socket now so that it can be set up (source address) before connect. */
    int r = family == AF_UNSPEC
                ? uv_tcp_init(loop, &c->tcp)
                : uv_tcp_init_ex(loop, &c->tcp, (unsigned)family);
    if (r < 0) {
        free(c); /* libuv keeps no trace of a handle it failed to init */
        return r;
    }
    c->magic = STP_CONN_MAGIC;
    c->cb = cb;
    c->owner = owner;
    c->tcp.data = c;
    *out = c;
    return 0;
}

int stp_conn_accept(struct stp_conn *c, uv_stream_t *server)
{
    return uv_accept(server, (uv_stream_t *)&c->tcp);
}

int stp_conn_fd(const struct stp_conn *c)
{
    uv_os_fd_t fd;
    int r = uv_fileno((const uv_handle_t *)&c->tcp, &fd);
    return r < 0 ? r : (int)fd;
}

void *stp_conn_owner(const struct stp_conn *c)
{
    return c->owner;
}

struct stp_tls *stp_conn_tls(const struct stp_conn *c)
{
    return c->tls_ready ? c->tls : NULL;
}

const char *stp_conn_error_text(const struct stp_conn *c, int err)
{
    return err == -EPROTO && c->tls ? stp_tls_error(c->tls)
                                    : stp_strerror(err);
}

uint64_t stp_conn_bytes_in(const struct stp_conn *c)
{
    return c->bytes_in;
}

uint64_t stp_conn_bytes_out(const struct stp_conn *c)
{
    return c->bytes_out;
}

int stp_conn_peer(const struct stp_conn *c, struct sockaddr_storage *out)
{
    int len = sizeof(*out);
    return uv_tcp_getpeername(&c->tcp, (struct sockaddr *)out, &len);
}

int stp_conn_local(const struct stp_conn *c, struct sockaddr_storage *out)
{
    int len = sizeof(*out);
    return uv_tcp_getsockname(&c->tcp, (struct sockaddr *)out, &len);
}

static void connect_cb(uv_connect_t *req, int status)
{
    struct stp_conn *c = conn_of(req->handle->data);
    free(req); /* libuv calls this once, also when closed meanwhile */
    if (status == UV_ECANCELED)
        return;
    if (status == 0)
        uv_tcp_nodelay(&c->tcp, 1);
    c->cb(c, STP_IO_CONNECTED, status);
}

int stp_conn_connect(struct stp_conn *c, const struct sockaddr *addr)
{
    uv_connect_t *req = malloc(sizeof(*req));
    if (!req)
        return UV_ENOMEM;
    int r = uv_tcp_connect(req, &c->tcp, addr, connect_cb);
    if (r < 0)
        free(req);
    return r;
}

void stp_conn_want_read(struct stp_conn *c, bool on)
{
    c->reading = on;
    update_reading(c);
}

const char *stp_conn_in(const struct stp_conn *c, size_t *n)
{
    if (!c->rx) {
        *n = 0;
        return NULL;
    }
    *n = c->rx->len - c->rx_off;
    return c->rx->data + c->rx_off;
}

void stp_conn_consume(struct stp_conn *c, size_t n)
{
    STP_ASSERT(c->rx && n <= c->rx->len - c->rx_off);
    c->rx_off += (uint32_t)n;
    if (c->rx_off == c->rx->len) {
        stp_buf_unref(c->rx);
        c->rx = NULL;
        c->rx_off = 0;
    }
}

void stp_conn_discard_input(struct stp_conn *c)
{
    stp_buf_unref(c->rx);
    c->rx = NULL;
    c->rx_off = 0;
}

int stp_conn_write(struct stp_conn *c, const char *p, size_t n)
{
    if (!c->tls)
        return outq_copy(c, p, n);
    /* Stage replies so pipelined answers leave in one record. */
    while (n > 0) {
        if (!c->ptx && !(c->ptx = stp_buf_get()))
            return -ENOMEM;
        size_t k = STP_MIN(n, (size_t)(STP_BUF_SIZE - c->ptx->len));
        memcpy(c->ptx->data + c->ptx->len, p, k);
        c->ptx->len += (uint32_t)k;
        p += k;
        n -= k;
        if (c->ptx->len == STP_BUF_SIZE) {
            int r = stp_conn_flush(c);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

int stp_conn_write_ref(struct stp_conn *c, struct stp_conn *from,
                       const char *p, size_t n)
{
    if (n == 0)
        return 0;
    if (c->tls) {
        int r = stp_conn_flush(c);
        return r < 0 ? r : stp_tls_write(c->tls, p, n);
    }
    struct stp_buf *b = from->rx;
    STP_ASSERT(b && p >= b->data && p + n <= b->data + b->len);
    int r = outq_push(c, b, (uint32_t)(p - b->data), (uint32_t)n);
    if (r == 0)
        b->refs++;
    return r;
}

/* Encrypt the staged plaintext onto the output queue. */
static int seal(struct stp_conn *c)
{
    if (!c->tls || !c->ptx || !c->tls_ready)
        return 0;
    struct stp_buf *b = c->ptx;
    c->ptx = NULL;
    int r = b->len ? stp_tls_write(c->tls, b->data, b->len) : 0;
    stp_buf_unref(b);
    return r < 0 ? r : 0;
}

int stp_conn_flush(struct stp_conn *c)
{
    if (c->closing)
        return 0;
    int r = seal(c);
    return r < 0 ? r : start_write(c);
}

int stp_conn_close_notify(struct stp_conn *c)
{
    if (c->closing || !c->tls || !c->tls_ready)
        return stp_conn_flush(c);
    /* The last reply and the alert leave in one write. */
    int r = seal(c);
    if (r == 0)
        stp_tls_shutdown(c->tls);
    int w = start_write(c);
    return r < 0 ? r : w;
}

bool stp_conn_busy(const struct stp_conn *c)
{
    return c->out_bytes > STP_OUTQ_HIGH ||
           STP_OUTQ_SLOTS - c->out_count < STP_OUTQ_SLOTS_LOW;
}

/* A forwarded line takes at most two slots (its buffer may fill up). */
#define PIECE_SLOTS 2
_Static_assert(STP_OUTQ_SLOTS_LOW > PIECE_SLOTS, "full must imply busy");

bool stp_conn_full(const struct stp_conn *c)
{
    return STP_OUTQ_SLOTS - c->out_count <= PIECE_SLOTS;
}

bool stp_conn_idle(const struct stp_conn *c)
{
    return c->out_count == 0 && (!c->ptx || c->ptx->len == 0);
}

static int start_tls(struct stp_conn *c, struct stp_tls_ctx *ctx,
                     const char *server_name)
{
    int r = stp_tls_new(ctx, &tls_io, c, server_name, &c->tls);
    if (r < 0)
        return r;
    c->tls_ready = false;
    /* A client speaks first: its ClientHello goes out now. A handshake
     * needs the peer, so nothing completes here; the next read goes on.
     * (A server given kept input answers it here.) */
    r = stp_tls_handshake(c->tls);
    int w = stp_conn_flush(c);
    if (r == -EAGAIN || r == 0)
        r = w;
    update_reading(c);
    return r;
}

int stp_conn_start_tls(struct stp_conn *c, struct stp_tls_ctx *ctx,
                       const char *server_name)
{
    STP_ASSERT(!c->tls);
    stp_conn_discard_input(c);
    return start_tls(c, ctx, server_name);
}

int stp_conn_start_tls_keep(struct stp_conn *c, struct stp_tls_ctx *ctx,
                            const char *server_name)
{
    STP_ASSERT(!c->tls && !c->crx);
    /* The unconsumed rest of rx becomes crx as is: no copy, and slices of
     * its consumed part may still be queued elsewhere (refs). */
    if (c->rx && c->rx_off < c->rx->len) {
        c->crx = c->rx;
        c->crx_off = c->rx_off;
        c->rx = NULL;
        c->rx_off = 0;
    }
    stp_conn_discard_input(c);
    return start_tls(c, ctx, server_name);
}

bool stp_conn_pull(struct stp_conn *c, enum stp_io_event *ev, int *err)
{
    *err = 0;
    int e = c->tls ? tls_fill(c, err) : -1;
    if (!c->closing)
        update_reading(c);
    if (e < 0)
        return false;
    *ev = (enum stp_io_event)e;
    return true;
}

/* Everything the conn holds, then the conn; the owner learns last, so it
 * may free itself. */
static void close_cb(uv_handle_t *h)
{
    struct stp_conn *c = conn_of(h->data);
    void (*closed)(void *) = c->closed;
    void *owner = c->owner;
    while (c->out_count) {
        stp_buf_unref(c->outq[c->out_head].buf);
        c->out_head = (c->out_head + 1) % STP_OUTQ_SLOTS;
        c->out_count--;
    }
    stp_conn_discard_input(c);
    stp_buf_unref(c->crx);
    stp_buf_unref(c->ptx);
    stp_tls_free(c->tls);
    free(c->wreq);
    c->magic = 0;
    free(c);
    if (closed)
        closed(owner);
}

void stp_conn_close(struct stp_conn *c, void (*closed)(void *owner))
{
    if (c->closing)
        return;
    c->closing = true;
    c->closed = closed;
    c->read_active = false;
    uv_read_stop((uv_stream_t *)&c->tcp);
    uv_close((uv_handle_t *)&c->tcp, close_cb);
}
