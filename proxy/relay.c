/* A relayed session: the client connection, the upstream connection, one
 * timer, and a protocol engine between them (proto.h). The I/O layer reports
 * events; the engine decides and words every reply; this file carries out
 * its actions, keeps the deadlines and owns the lifetime. Setting up the
 * upstream leg is nexthop.c's. Memory is freed only in the last close
 * callback. No protocol text here. */
#include <inttypes.h>
#include <stddef.h>
#include <string.h>

#include "listener.h"
#include "log.h"
#include "metrics.h"
#include "nexthop.h"
#include "front.h"
#include "relay.h"
#include "relay_state.h"

#define SESSION_MAGIC 0x53545053u /* "STPS" */
#define SID "id=%016" PRIx64
#define DRAIN_TIMEOUT_MS 5000 /* for a final reply the client won't read */

struct stp_session {
    uint32_t magic;
    enum stp_sstate state;
    uint64_t id;
    struct stp_server *srv;
    struct stp_listener *lst;             /* the socket it came in on */
    struct stp_gen *gen;                  /* its configuration, referenced */
    const struct stp_listener_cfg *lcfg;
    struct stp_tls_ctx *ltls;             /* NULL for tls = none */
    const struct stp_upstream_cfg *up;
    struct stp_conn *client;
    struct stp_conn *upstream;            /* from connecting until closed */
    struct stp_hop hop;
    uv_timer_t timer;
    int open_handles;
    bool upstream_closed;
    bool upstream_eof;           /* it ended: no client byte is taken now */
    bool client_eof;             /* the client half-closed: reads no more */
    bool shutting_down;          /* the goodbye at the next boundary */
    bool held;                   /* the upstream's queue holds the client */
    int client_err, upstream_err; /* a write failed inside the engine */
    enum stp_close_reason reason; /* first cause wins: session_reason */
    uint64_t upstream_in, upstream_out; /* its counts, kept at its close */
    char up_addr[64];          /* the address relayed to, once set up */
    char up_tls[16];           /* ... and its TLS version */
    uint64_t start_ms;
    uint64_t tls_start_ns;     /* the client handshake's start */
    bool counted;              /* opened in the metrics: closed at finish */
    struct stp_clock clock;    /* the deadlines are computed from it */
    struct stp_front front;    /* who the client is, its tallies */
    struct stp_session *prev, *next;
    const struct stp_proto *proto;
    _Alignas(max_align_t) unsigned char engine[]; /* proto->size bytes */
};

static struct stp_session *session_of(void *p)
{
    struct stp_session *s = p;
    STP_ASSERT(s && s->magic == SESSION_MAGIC);
    return s;
}

/* Why the session ends: the first cause said wins (a timeout that makes the
 * engine close reads "idle_timeout", not the engine's "timeout"). */
static void session_reason(struct stp_session *s, enum stp_close_reason r)
{
    if (s->reason == STP_CLOSE_NONE)
        s->reason = r;
}

static uint64_t now_ms(const struct stp_session *s)
{
    return uv_now(s->srv->loop);
}

/* The one place the state changes. A move the table does not allow is a
 * bug: debug builds stop on it, others log it and stay where they are. */
static void transition(struct stp_session *s, enum stp_sstate to)
{
    if (!stp_sstate_may(s->state, to)) {
        stp_log(STP_LOG_ERROR, SID " event=bug msg=\"illegal state move\" "
                "from=%s to=%s", s->id, stp_sstate_name(s->state),
                stp_sstate_name(to));
#ifndef NDEBUG
        STP_ASSERT(!"illegal session state move");
#endif
        return;
    }
    if (stp_log_enabled(STP_LOG_DEBUG))
        stp_log(STP_LOG_DEBUG, SID " event=state from=%s to=%s", s->id,
                stp_sstate_name(s->state), stp_sstate_name(to));
    s->clock.state_ms = now_ms(s);
    /* Setup is one deadline from connect to the greeting, whatever its
     * steps. */
    if (to == STP_SS_CONNECTING)
        s->clock.setup_ms = s->clock.state_ms;
    if (to == STP_SS_HANDSHAKE || to == STP_SS_TLS_ACCEPT)
        s->tls_start_ns = uv_hrtime();
    s->state = to;
}

/* ---- deadlines -------------------------------------------------------------- */

static enum stp_deadline next_deadline(const struct stp_session *s,
                                       uint64_t *at)
{
    const struct stp_listener_cfg *lc = s->lcfg;
    const struct stp_timeouts t = {
        .handshake = lc->timeout_handshake_ms,
        .setup = s->up->timeout_connect_ms,
        .reply = s->up->timeout_reply_ms,
        .idle = lc->timeout_idle_ms,
        .command = lc->timeout_command_ms,
        .data = lc->timeout_data_ms,
        .drain = DRAIN_TIMEOUT_MS,
        .proxy_header = lc->timeout_proxy_header_ms,
    };
    struct stp_proto_status st = {0};
    if (s->state == STP_SS_RELAY || s->state == STP_SS_STARTTLS)
        s->proto->status(s->engine, &st);
    st.replies_due |= s->held;
    return stp_deadline_next(s->state, &st, &s->clock, &t, at);
}

static void on_timer(uv_timer_t *t);

static void rearm(struct stp_session *s)
{
    uint64_t at;
    if (next_deadline(s, &at) == STP_DL_NONE) {
        uv_timer_stop(&s->timer);
        return;
    }
    uint64_t now = now_ms(s);
    uv_timer_start(&s->timer, on_timer, at > now ? at - now : 0, 0);
}

/* ---- closing ---------------------------------------------------------------- */

/* Each of the session's handles, once closed; the last frees the session. */
static void session_unref(struct stp_session *s)
{
    if (--s->open_handles > 0)
        return;
    struct stp_server *srv = s->srv;
    if (s->prev)
        s->prev->next = s->next;
    else
        srv->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    srv->n_sessions--;
    stp_front_close(&s->front);
    s->proto->free(s->engine);
    stp_hop_free(&s->hop);
    stp_gen_unref(s->gen);
    s->magic = 0;
    free(s);
    stp_server_check_empty(srv);
}

static void handle_closed(uv_handle_t *h)
{
    session_unref(session_of(h->data));
}

/* A conn frees itself before this: the session only counts it. */
static void conn_closed(void *owner)
{
    session_unref(session_of(owner));
}

static void close_upstream(struct stp_session *s)
{
    stp_hop_cancel(&s->hop);
    if (s->upstream_closed)
        return;
    s->upstream_closed = true;
    if (!s->upstream)
        return; /* never connected */
    /* The counts stop at close; the disconnect line may come later. */
    s->upstream_in += stp_conn_bytes_in(s->upstream);
    s->upstream_out += stp_conn_bytes_out(s->upstream);
    stp_conn_close(s->upstream, conn_closed);
    s->upstream = s->hop.conn = NULL; /* freed in its close callback */
}

/* The session in one line, as Postfix's "disconnect" line: who, over
 * what, to where, what the engine counted, then the long-standing keys in
 * their old order, so nobody has to join lines by id. */
static void log_disconnect(struct stp_session *s)
{
    const struct stp_tls *t = stp_conn_tls(s->client);
    char tls[700] = "tls=none cipher=none", engine[512] = "";
    if (t) {
        /* The client's choices: quoted and escaped (stp_log_esc). */
        const char *sni = stp_tls_sni(t);
        char cn[128], esni[300], ecn[300];
        bool cert = stp_tls_peer_cn(t, cn, sizeof(cn));
        snprintf(tls, sizeof(tls), "tls=%s cipher=%s%s%s%s%s%s%s",
                 stp_tls_version(t), stp_tls_cipher(t), sni ? " sni=\"" : "",
                 sni ? stp_log_esc(esni, sizeof(esni), sni) : "",
                 sni ? "\"" : "", cert ? " client_cert=\"" : "",
                 cert ? stp_log_esc(ecn, sizeof(ecn), cn) : "",
                 cert ? "\"" : "");
    }
    if (s->proto->summary)
        s->proto->summary(s->engine, engine, sizeof(engine));
    stp_log(STP_LOG_INFO,
            SID " event=disconnect client=%s listener=%s %s upstream=%s "
                "upstream_address=%s upstream_tls=%s%s%s reason=%s "
                "client_in=%" PRIu64 " client_out=%" PRIu64
                " upstream_in=%" PRIu64 " upstream_out=%" PRIu64
                " duration_ms=%" PRIu64,
            s->id, s->front.peer[0] ? s->front.peer : "unknown",
            s->lcfg->name, tls, s->up->name,
            s->up_addr[0] ? s->up_addr : "none",
            s->up_tls[0] ? s->up_tls : "none", engine[0] ? " " : "", engine,
            stp_close_reason_name(s->reason), stp_conn_bytes_in(s->client),
            stp_conn_bytes_out(s->client), s->upstream_in, s->upstream_out,
            now_ms(s) - s->start_ms);
}

/* The session's counters, once it is over (the byte counts too: nothing is
 * counted per read). */
static void count_closed(struct stp_session *s, bool in_handshake)
{
    struct stp_mx *mx = s->srv->metrics;
    int slot = s->lcfg->metrics_slot;
    if (!s->counted)
        return;
    if (in_handshake)
        stp_mx_handshake(mx, slot, false, 0);
    const uint64_t bytes[STP_MX_DIRS] = {
        [STP_MX_CLIENT_IN] = stp_conn_bytes_in(s->client),
        [STP_MX_CLIENT_OUT] = stp_conn_bytes_out(s->client),
        [STP_MX_UPSTREAM_IN] = s->upstream_in,
        [STP_MX_UPSTREAM_OUT] = s->upstream_out,
    };
    stp_mx_closed(mx, slot, s->reason, now_ms(s) - s->start_ms, bytes);
}

static void finish(struct stp_session *s)
{
    if (s->state == STP_SS_CLOSED)
        return;
    bool in_handshake = s->state == STP_SS_HANDSHAKE ||
                        s->state == STP_SS_TLS_ACCEPT;
    transition(s, STP_SS_CLOSED);
    close_upstream(s);
    log_disconnect(s);
    count_closed(s, in_handshake);
    uv_timer_stop(&s->timer);
    uv_close((uv_handle_t *)&s->timer, handle_closed);
    stp_conn_close(s->client, conn_closed);
}

/* Close once the client has its last reply (bounded by a timer). */
static void drain_and_close(struct stp_session *s,
                            enum stp_close_reason reason,
                            bool cut_upstream)
{
    if (s->state >= STP_SS_DRAINING)
        return;
    session_reason(s, reason);
    stp_hop_cancel(&s->hop); /* no new attempt while the reply drains */
    if (cut_upstream)
        close_upstream(s);
    transition(s, STP_SS_DRAINING);
    stp_conn_want_read(s->client, false);
    stp_conn_close_notify(s->client);
    if (stp_conn_idle(s->client))
        finish(s);
    else
        rearm(s);
}

/* The engine words the failure (its 421, BYE or -ERR) and asks to close. */
static void engine_fail(struct stp_session *s, enum stp_fail why,
                        enum stp_close_reason reason)
{
    session_reason(s, reason);
    s->proto->fail(s->engine, why);
}

/* ---- engine actions --------------------------------------------------------- */

static void fail_write(struct stp_session *s, bool upstream, int r)
{
    stp_log(STP_LOG_WARN, SID " event=error side=%s error=\"%s\"", s->id,
            upstream ? "upstream" : "client", stp_strerror(r));
    if (upstream)
        engine_fail(s, STP_FAIL_LOST, STP_CLOSE_WRITE_ERROR);
    else {
        session_reason(s, STP_CLOSE_WRITE_ERROR);
        finish(s);
    }
}

static void act_to_upstream(void *ctx, enum stp_fwd kind, const char *p,
                            size_t n)
{
    struct stp_session *s = ctx;
    if (!s->upstream || s->upstream_err)
        return;
    int r;
    if (kind == STP_FWD_RAW) {
        r = stp_conn_write_ref(s->upstream, s->client, p, n);
    } else {
        r = stp_conn_write(s->upstream, p, n);
        if (r == 0)
            r = stp_conn_write(s->upstream, "\r\n", 2);
    }
    if (r < 0)
        s->upstream_err = r; /* acted on once the engine has returned */
}

static void act_to_client(void *ctx, const char *p, size_t n)
{
    struct stp_session *s = ctx;
    if (s->client_err)
        return;
    int r = stp_conn_write(s->client, p, n);
    if (r < 0)
        s->client_err = r; /* acted on once the engine has returned */
}

/* A write that failed inside an engine action is acted on here, outside
 * the engine, which must not be re-entered half-way through a step. */
static void write_errors(struct stp_session *s)
{
    if (s->client_err && s->state != STP_SS_CLOSED)
        fail_write(s, false, s->client_err);
    else if (s->upstream_err && s->upstream && s->state < STP_SS_DRAINING)
        fail_write(s, true, s->upstream_err);
    s->client_err = s->upstream_err = 0;
}

static void act_start_tls(void *ctx)
{
    struct stp_session *s = ctx;
    /* Reading stops in settle if the reply cannot leave at once; usually
     * it does, TLS starts there and reading never pauses. Either way
     * nothing is read before settle: this runs inside the client's read
     * callback and the engine takes nothing after STARTTLS. */
    transition(s, STP_SS_STARTTLS);
}

static void act_close(void *ctx, enum stp_close_reason why, bool cut)
{
    drain_and_close(ctx, why, cut);
}

static void act_event(void *ctx, const char *event, const char *detail)
{
    struct stp_session *s = ctx;
    stp_log(STP_LOG_INFO, SID " event=%s %s", s->id, event, detail);
}

static void act_phase(void *ctx, const char *from, const char *to)
{
    struct stp_session *s = ctx;
    if (stp_log_enabled(STP_LOG_DEBUG))
        stp_log(STP_LOG_DEBUG, SID " event=%s from=%s to=%s", s->id,
                s->proto->name, from, to);
}

static bool act_upstream_full(void *ctx)
{
    struct stp_session *s = ctx;
    return s->upstream && stp_conn_full(s->upstream);
}

static const struct stp_proto_actions engine_actions = {
    .to_upstream = act_to_upstream,
    .to_client = act_to_client,
    .start_tls = act_start_tls,
    .close = act_close,
    .event = act_event,
    .phase = act_phase,
    .upstream_full = act_upstream_full,
};

/* ---- flow ------------------------------------------------------------------- */

static void set_reading(struct stp_session *s)
{
    /* Back-pressure both ways: the client waits while the upstream's
     * queue is over its mark, and while its own is (replies the engine
     * words itself, to a client that does not read them). */
    bool up_busy = s->upstream && stp_conn_busy(s->upstream);
    stp_conn_want_read(s->client, stp_sstate_reads_client(s->state) &&
                                      !up_busy && !stp_conn_busy(s->client));
    if (s->upstream)
        stp_conn_want_read(s->upstream,
                           stp_sstate_reads_upstream(s->state) &&
                               !stp_conn_busy(s->client));
}

static void flush_both(struct stp_session *s)
{
    int r;
    if (s->upstream && (r = stp_conn_flush(s->upstream)) < 0)
        fail_write(s, true, r);
    if (s->state != STP_SS_CLOSED && (r = stp_conn_flush(s->client)) < 0)
        fail_write(s, false, r);
}

/* ---- the feed loop's view of the session ------------------------------------ */

static const char *feed_input(void *ctx, enum stp_side side, size_t *n)
{
    struct stp_session *s = ctx;
    *n = 0;
    if (s->state != STP_SS_RELAY)
        return NULL;
    if (side == STP_SIDE_UPSTREAM)
        return s->upstream ? stp_conn_in(s->upstream, n) : NULL;
    /* Back-pressure: client input waits while the upstream's queue is
     * over its mark. */
    if (!s->upstream || s->upstream_eof || stp_conn_busy(s->upstream))
        return NULL;
    return stp_conn_in(s->client, n);
}

static void feed_consume(void *ctx, enum stp_side side, size_t n)
{
    struct stp_session *s = ctx;
    struct stp_conn *c = side == STP_SIDE_CLIENT ? s->client : s->upstream;
    if (c && s->state != STP_SS_CLOSED)
        stp_conn_consume(c, n);
}

/* The engine stopped for want of room upstream (many small pieces, such as
 * pipelined tiny BDAT chunks): write them, usually at once, and go on; with
 * a write still pending, DRAINED resumes. */
static bool feed_make_room(void *ctx)
{
    struct stp_session *s = ctx;
    if (s->state != STP_SS_RELAY || !act_upstream_full(s))
        return false;
    int r = stp_conn_flush(s->upstream);
    if (r < 0) {
        fail_write(s, true, r);
        return false;
    }
    return !stp_conn_full(s->upstream);
}

static const struct stp_feed_io feed_io = {feed_input, feed_consume,
                                           feed_make_room};

static void feed(struct stp_session *s)
{
    stp_proto_feed(s->proto, s->engine, &feed_io, s);
}

/* The client sent its last byte (shutdown(SHUT_WR), or close_notify): what
 * it sent before is still handled and answered; the engine says when
 * nothing more can come of it. */
static void check_client_eof(struct stp_session *s)
{
    if (!s->client_eof || s->state != STP_SS_RELAY)
        return;
    size_t n;
    stp_conn_in(s->client, &n);
    enum stp_eof_verdict v = s->proto->client_eof(s->engine, n);
    if (v != STP_EOF_WAIT)
        drain_and_close(s, STP_CLOSE_CLIENT_EOF, v == STP_EOF_CUT);
}

/* While the upstream's full queue holds the client back, the wait is the
 * upstream's (its reply deadline, from when the hold began), not the
 * client's idleness; when it ends, the client was waiting, not idle. */
static void track_hold(struct stp_session *s)
{
    bool held = s->upstream && stp_conn_busy(s->upstream);
    if (held != s->held) {
        if (held)
            s->clock.upstream_seen_ms = now_ms(s);
        else
            s->clock.client_seen_ms = now_ms(s);
    }
    s->held = held;
}

/* After anything happened: push output, pick who may read. */
static void settle(struct stp_session *s)
{
    if (s->state == STP_SS_CLOSED)
        return;
    write_errors(s);
    if (s->state == STP_SS_CLOSED)
        return;
    flush_both(s);
    if (s->state == STP_SS_STARTTLS && stp_conn_idle(s->client)) {
        /* Nothing of ours is left to send in plaintext. Whatever the client
         * pipelined after STARTTLS is dropped with the buffer. */
        if (stp_conn_start_tls(s->client, s->ltls, NULL) < 0) {
            session_reason(s, STP_CLOSE_TLS_INIT);
            finish(s);
            return;
        }
        transition(s, STP_SS_HANDSHAKE);
    }
    check_client_eof(s);
    if (s->state == STP_SS_RELAY) {
        struct stp_proto_status st;
        s->proto->status(s->engine, &st);
        stp_clock_track(&s->clock, &st, now_ms(s));
        /* Shutting down: the goodbye as soon as nothing is in flight. */
        if (s->shutting_down && st.idle) {
            s->proto->fail(s->engine, STP_FAIL_SHUTDOWN);
            if (s->state == STP_SS_CLOSED)
                return;
            flush_both(s);
        }
    }
    if (s->state < STP_SS_DRAINING) {
        set_reading(s);
        track_hold(s);
    }
    if (s->state != STP_SS_CLOSED)
        rearm(s);
}

/* Replies, or room in the upstream's queue, may let the client go on. What
 * is buffered is offered again; then, with reading allowed again, TLS is
 * pumped: bytes held in wolfSSL or in its input buffer would otherwise wait
 * for a socket event that may never come (the client waits for a reply). */
static void on_client(struct stp_conn *c, enum stp_io_event ev, int err);

static void resume(struct stp_session *s)
{
    enum stp_io_event ev;
    int err;
    for (;;) {
        feed(s);
        if (s->state != STP_SS_RELAY)
            return;
        set_reading(s);
        /* What was decrypted is dispatched here, after the I/O call
         * returned, as if it came from the loop. */
        if (!stp_conn_pull(s->client, &ev, &err))
            return;
        on_client(s->client, ev, err);
        if (ev != STP_IO_DATA)
            return;
    }
}

static void log_client_tls(struct stp_session *s, const char *event)
{
    char d[900];
    stp_tls_describe(stp_conn_tls(s->client), d, sizeof(d));
    stp_log(STP_LOG_INFO, SID " event=%s %s", s->id, event, d);
}

static void start_upstream(struct stp_session *s);
static void read_header(struct stp_session *s, bool eof);

static void on_client(struct stp_conn *c, enum stp_io_event ev, int err)
{
    struct stp_session *s = session_of(stp_conn_owner(c));
    struct stp_proto_status st;
    switch (ev) {
    case STP_IO_DATA:
        if (s->state == STP_SS_PROXY_HEADER) {
            read_header(s, false);
            break;
        }
        s->clock.client_seen_ms = now_ms(s);
        s->proto->status(s->engine, &st);
        if (!st.replies_due) /* a reply may be due from now */
            s->clock.upstream_seen_ms = s->clock.client_seen_ms;
        feed(s);
        break;
    case STP_IO_DRAINED:
        if (s->state == STP_SS_DRAINING) {
            finish(s);
            return;
        }
        /* Either side may have been held back by this queue; TLS may
         * hold decrypted client bytes no socket event will bring. */
        resume(s);
        break;
    case STP_IO_TLS_READY:
        stp_mx_handshake(s->srv->metrics, s->lcfg->metrics_slot, true,
                         uv_hrtime() - s->tls_start_ns);
        if (s->state == STP_SS_TLS_ACCEPT) {
            /* Implicit TLS: only now is there someone to connect for. */
            log_client_tls(s, "tls");
            start_upstream(s);
            break;
        }
        log_client_tls(s, "starttls");
        transition(s, STP_SS_RELAY);
        s->proto->tls_started(s->engine);
        break;
    case STP_IO_EOF:
        if (s->state == STP_SS_PROXY_HEADER) {
            read_header(s, true);
            return;
        }
        if (s->state == STP_SS_RELAY) {
            /* A half-close: the client may still read the replies to
             * what it sent (settle decides when it is over). */
            s->client_eof = true;
            break;
        }
        /* fall through */
    case STP_IO_ERROR: {
        bool handshake = s->state == STP_SS_HANDSHAKE ||
                         s->state == STP_SS_TLS_ACCEPT;
        if (handshake) {
            char e[256];
            stp_log(STP_LOG_INFO, SID " event=tls_error error=\"%s\"", s->id,
                    ev == STP_IO_EOF ? "connection closed"
                                     : stp_log_esc(e, sizeof(e),
                                                   stp_conn_error_text(c, err)));
        }
        session_reason(s, ev == STP_IO_EOF ? STP_CLOSE_CLIENT_EOF
                          : handshake      ? STP_CLOSE_TLS_HANDSHAKE
                                           : STP_CLOSE_CLIENT_ERROR);
        /* An unfinished message must not complete upstream. */
        finish(s);
        return;
    }
    case STP_IO_CONNECTED:
        STP_ASSERT(!"client connects nowhere");
    }
    settle(s);
}

static void on_upstream(struct stp_conn *c, enum stp_io_event ev, int err)
{
    struct stp_session *s = session_of(stp_conn_owner(c));
    if (stp_sstate_setting_up(s->state)) {
        stp_hop_event(&s->hop, ev, err);
        /* Relaying may have begun: client bytes that came while the leg
         * was set up (behind a PROXY header, with the TLS Finished) bring
         * no event of their own. */
        if (s->state == STP_SS_RELAY)
            resume(s);
        settle(s);
        return;
    }
    struct stp_proto_status st;
    switch (ev) {
    case STP_IO_DATA:
        s->clock.upstream_seen_ms = now_ms(s);
        /* Replies count as activity: the client was waiting, not idle. */
        s->clock.client_seen_ms = s->clock.upstream_seen_ms;
        resume(s);
        break;
    case STP_IO_DRAINED:
        resume(s);
        break;
    case STP_IO_EOF:
    case STP_IO_ERROR:
        if (s->state >= STP_SS_DRAINING)
            return;
        s->proto->status(s->engine, &st);
        if (s->up->tls != STP_TLS_NONE && st.greeting) {
            /* With TLS 1.3 a server refuses our certificate only after our
             * side of the handshake is done: still a TLS failure. */
            char why[160];
            snprintf(why, sizeof(why), "TLS refused after handshake: %s",
                     ev == STP_IO_EOF ? "connection closed"
                                      : stp_conn_error_text(c, err));
            stp_hop_fail(&s->hop, STP_FAIL_HOP_TLS, why);
            break;
        }
        char e[256];
        if (ev == STP_IO_EOF)
            stp_log(STP_LOG_INFO, SID " event=upstream_closed eof", s->id);
        else
            stp_log(STP_LOG_INFO, SID " event=upstream_closed error=\"%s\"",
                    s->id,
                    stp_log_esc(e, sizeof(e), stp_conn_error_text(c, err)));
        /* Relay whatever complete replies arrived before the end. */
        s->upstream_eof = true;
        feed(s);
        if (s->state < STP_SS_DRAINING)
            engine_fail(s, STP_FAIL_LOST, STP_CLOSE_UPSTREAM_LOST);
        break;
    case STP_IO_TLS_READY:
    case STP_IO_CONNECTED:
        STP_ASSERT(!"only during setup");
    }
    settle(s);
}

/* ---- the hop's reports ------------------------------------------------------ */

static void hop_stage(void *ctx, enum stp_hop_stage stage)
{
    static const enum stp_sstate to[] = {
        [STP_HOP_CONNECTING] = STP_SS_CONNECTING,
        [STP_HOP_TLS] = STP_SS_UPSTREAM_TLS,
        [STP_HOP_PRELUDE] = STP_SS_PRELUDE,
    };
    transition(ctx, to[stage]);
}

static void hop_ready(void *ctx, const char *greeting, size_t n)
{
    struct stp_session *s = ctx;
    transition(s, STP_SS_RELAY);
    stp_mx_upstream(s->srv->metrics, s->up->metrics_slot, true);
    /* For the disconnect line: where the hop got to, after any failover. */
    if (s->hop.dst)
        stp_format_addr((const struct sockaddr *)s->hop.dst, s->up_addr,
                        sizeof(s->up_addr));
    const struct stp_tls *ut = s->upstream ? stp_conn_tls(s->upstream) : NULL;
    snprintf(s->up_tls, sizeof(s->up_tls), "%s",
             ut ? stp_tls_version(ut) : "none");
    if (s->proto->upstream_leg)
        s->proto->upstream_leg(s->engine, s->hop.tls_done);
    /* The engine greets the client as if the upstream had just said it. */
    if (greeting)
        s->proto->upstream_input(s->engine, greeting, n);
}

static void hop_fail(void *ctx, enum stp_fail why, enum stp_close_reason r)
{
    engine_fail(ctx, why, r);
}

/* Each address the hop tries gets a connection of its family; an earlier
 * attempt's is closed (its bytes still count). */
static int hop_connection(void *ctx, int family)
{
    struct stp_session *s = ctx;
    if (s->upstream) {
        s->upstream_in += stp_conn_bytes_in(s->upstream);
        s->upstream_out += stp_conn_bytes_out(s->upstream);
        stp_conn_close(s->upstream, conn_closed);
        s->upstream = s->hop.conn = NULL;
    }
    int r = stp_conn_new(s->srv->loop, family, on_upstream, s, &s->upstream);
    if (r < 0)
        return r;
    s->open_handles++;
    s->hop.conn = s->upstream;
    return 0;
}

static const struct stp_hop_ops hop_ops = {hop_stage, hop_ready, hop_fail,
                                           hop_connection};

static void start_upstream(struct stp_session *s)
{
    stp_hop_start(&s->hop, s->srv);
}

static void on_timer(uv_timer_t *t)
{
    struct stp_session *s = session_of(t->data);
    uint64_t at;
    enum stp_deadline d = next_deadline(s, &at);
    if (d == STP_DL_NONE || at > now_ms(s)) {
        rearm(s); /* moved since the timer was set */
        return;
    }
    if (d != STP_DL_DRAIN && d != STP_DL_PROXY_HEADER)
        stp_log(STP_LOG_INFO, SID " event=timeout deadline=%s", s->id,
                stp_deadline_name(d));
    switch (d) {
    case STP_DL_PROXY_HEADER:
        stp_front_refused(&s->front, STP_CLOSE_PROXY_HEADER_TIMEOUT,
                          "no complete header within timeout_proxy_header");
        session_reason(s, STP_CLOSE_PROXY_HEADER_TIMEOUT);
        finish(s);
        return;
    case STP_DL_HANDSHAKE:
        /* Mid-handshake there is no channel for a reply. */
        session_reason(s, STP_CLOSE_HANDSHAKE_TIMEOUT);
        finish(s);
        return;
    case STP_DL_SETUP:
        stp_hop_timeout(&s->hop, s->state == STP_SS_RELAY);
        break;
    case STP_DL_REPLY:
        stp_log(STP_LOG_WARN,
                SID " event=upstream_error upstream=%s error=\"reply timeout\"",
                s->id, s->up->name);
        engine_fail(s, STP_FAIL_LOST, STP_CLOSE_UPSTREAM_TIMEOUT);
        break;
    case STP_DL_IDLE:
    case STP_DL_COMMAND:
    case STP_DL_DATA:
        engine_fail(s, STP_FAIL_TIMEOUT,
                    d == STP_DL_IDLE      ? STP_CLOSE_IDLE_TIMEOUT
                    : d == STP_DL_COMMAND ? STP_CLOSE_COMMAND_TIMEOUT
                                      : STP_CLOSE_DATA_TIMEOUT);
        break;
    case STP_DL_DRAIN:
        finish(s);
        return;
    case STP_DL_NONE:
        return;
    }
    settle(s);
}

/* ---- accepting -------------------------------------------------------------- */

/* Once it is known who the client is: its limits, then the implicit TLS
 * handshake or the upstream. */
static void session_begin(struct stp_session *s)
{
    const struct stp_listener_cfg *lc = s->lcfg;
    enum stp_close_reason limit = stp_front_limit(&s->front);
    if (limit) {
        session_reason(s, limit);
        if (lc->tls == STP_TLS_IMPLICIT)
            finish(s); /* a handshake just to refuse would cost more */
        else
            s->proto->fail(s->engine, limit == STP_CLOSE_NOT_ALLOWED
                                          ? STP_FAIL_DENIED
                                          : STP_FAIL_LIMIT);
        return;
    }
    if (lc->tls == STP_TLS_IMPLICIT) {
        transition(s, STP_SS_TLS_ACCEPT);
        /* A ClientHello read with a PROXY header is TLS's first input. */
        int r = s->front.header ? stp_conn_start_tls_keep(s->client, s->ltls, NULL)
                          : stp_conn_start_tls(s->client, s->ltls, NULL);
        if (r < 0) {
            session_reason(s, STP_CLOSE_TLS_INIT);
            finish(s);
        }
    } else {
        start_upstream(s);
    }
}

/* A load balancer's PROXY header: read before anything else. */
static void read_header(struct stp_session *s, bool eof)
{
    enum stp_close_reason why;
    switch (stp_front_header(&s->front, eof, &why)) {
    case STP_FRONT_MORE:
    case STP_FRONT_HEADER:
        return;
    case STP_FRONT_REFUSE:
        session_reason(s, why);
        finish(s);
        return;
    case STP_FRONT_BEGIN:
        s->hop.client_dst = (const struct sockaddr *)s->front.dst;
        if (eof) {
            session_reason(s, STP_CLOSE_CLIENT_EOF);
            finish(s);
            return;
        }
        session_begin(s);
    }
}

/* The session's configuration, its engine and its hop, once it is known
 * who connected. */
static void session_setup(struct stp_session *s, uint64_t id)
{
    const struct stp_listener_cfg *lc = s->lcfg;
    struct stp_proto_cfg pc = {
        .offer_starttls = lc->tls == STP_TLS_STARTTLS,
        .require_tls = lc->require_tls,
        .tls_active = lc->tls == STP_TLS_IMPLICIT,
        .upstream_tls = s->up->tls != STP_TLS_NONE,
        .upstream_auth = s->up->auth != STP_AUTH_NONE,
        .max_line = lc->max_line,
        .max_errors = lc->max_errors,
        .hostname = s->gen->cfg.hostname,
    };
    s->id = id;
    s->proto->init(s->engine, &pc, &engine_actions, s);
    s->hop = (struct stp_hop){
        .id = id,
        .up = s->up,
        .tls = s->gen->up_tls[s->up - s->gen->cfg.upstreams],
        .proto = s->proto,
        .hostname = s->gen->cfg.hostname,
        .client = s->client,
        .client_addr = (const struct sockaddr *)&s->front.addr,
        .client_transparent = lc->transparent,
        .loop = s->srv->loop,
        .down_until = s->gen->up_down[s->up - s->gen->cfg.upstreams],
        .entry = -1,
        .ops = &hop_ops,
        .ctx = s,
    };
}

int stp_session_accept(struct stp_listener *lst)
{
    struct stp_server *srv = lst->srv;
    const struct stp_listener_cfg *lc = &srv->gen->cfg.listeners[lst->idx];
    const struct stp_proto *proto = stp_proto_of(lc->protocol);
    struct stp_session *s = calloc(1, sizeof(*s) + proto->size);
    if (!s)
        return -ENOMEM;
    s->magic = SESSION_MAGIC;
    s->srv = srv;
    s->lst = lst;
    s->gen = srv->gen;
    s->lcfg = lc;
    s->ltls = s->gen->lst_tls[lst->idx];
    s->up = lc->upstream;
    s->proto = proto;
    s->start_ms = uv_now(srv->loop);
    s->front = (struct stp_front){
        .srv = srv, .lst = lst, .lcfg = lc, .gen = s->gen,
    };
    int r = stp_conn_new(srv->loop, AF_UNSPEC, on_client, s, &s->client);
    if (r < 0) {
        free(s);
        return r;
    }
    stp_gen_ref(s->gen);
    s->open_handles = 1;
    s->next = srv->sessions;
    if (s->next)
        s->next->prev = s;
    srv->sessions = s;
    srv->n_sessions++;
    /* The engine is set up before anything can close the session (its
     * free runs in the last close callback). */
    session_setup(s, 0);
    uv_timer_init(srv->loop, &s->timer);
    s->timer.data = s;
    s->open_handles++;
    if ((r = stp_conn_accept(s->client, (uv_stream_t *)&lst->tcp)) < 0) {
        s->upstream_closed = true;
        transition(s, STP_SS_CLOSED);
        uv_close((uv_handle_t *)&s->timer, handle_closed);
        stp_conn_close(s->client, conn_closed);
        stp_log(STP_LOG_WARN, "event=accept_error addr=%s error=\"%s\"",
                lst->addr, uv_strerror(r));
        return STP_ACCEPT_FAILED;
    }
    s->front.conn = s->client;
    s->counted = true;
    stp_mx_opened(srv->metrics, lc->metrics_slot);
    enum stp_close_reason why;
    enum stp_front_verdict v = stp_front_open(&s->front, &why);
    s->id = s->hop.id = s->front.id;
    s->clock.client_seen_ms = s->clock.upstream_seen_ms = s->start_ms;
    s->clock.state_ms = s->start_ms;
    if (v == STP_FRONT_REFUSE) {
        session_reason(s, why);
        finish(s);
    } else if (v == STP_FRONT_HEADER) {
        transition(s, STP_SS_PROXY_HEADER);
    } else {
        session_begin(s);
    }
    settle(s);
    return 0;
}

/* Shutting down: a session between commands gets its goodbye now; one in
 * the middle of a command or message may finish it first (settle() says
 * goodbye at the next boundary); FORCE ends it regardless. */
static void session_shutdown(struct stp_session *s, bool force)
{
    struct stp_proto_status st = {0};
    if (s->state == STP_SS_RELAY)
        s->proto->status(s->engine, &st);
    enum stp_stop what = stp_sstate_stop(s->state, st.idle, force);
    if (what == STP_STOP_NONE)
        return;
    s->shutting_down = true;
    session_reason(s, STP_CLOSE_SHUTDOWN);
    if (what == STP_STOP_CLOSE)
        finish(s);
    if (what != STP_STOP_GOODBYE)
        return;
    s->proto->fail(s->engine, STP_FAIL_SHUTDOWN);
    settle(s);
}

void stp_sessions_shutdown(struct stp_server *srv, bool force)
{
    for (struct stp_session *s = srv->sessions; s; s = s->next)
        session_shutdown(s, force);
}
