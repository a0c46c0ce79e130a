/* The seam between the relay and a protocol. The relay (relay.c, nexthop.c)
 * moves bytes, runs TLS, keeps deadlines and lifetimes; a protocol engine
 * decides what the bytes mean and words every reply. The relay knows a
 * protocol only through struct stp_proto: bytes in, actions out, a status
 * that drives its deadlines, the failures it asks the engine to word, and
 * the proxy's own dialogue with the upstream before relaying (the prelude).
 * Engines are pure: no sockets, no libuv, no wolfSSL. */
#ifndef STP_PROTO_H
#define STP_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "close.h"

enum stp_fwd {
    STP_FWD_LINE,  /* a command line without terminator: send it + CRLF */
    STP_FWD_RAW,   /* message content, verbatim, a slice of the input */
};

/* What an engine asks of the relay. Actions never call the engine back. */
struct stp_proto_actions {
    /* Bytes for the upstream. For STP_FWD_RAW, P points into the buffer
     * given to client_input, so the relay can send it without copying. */
    void (*to_upstream)(void *ctx, enum stp_fwd kind, const char *p, size_t n);
    /* Reply bytes for the client (complete lines). */
    void (*to_client)(void *ctx, const char *p, size_t n);
    /* The reply to the client's STARTTLS is queued: once it is flushed,
     * discard any buffered client plaintext, run the handshake, then call
     * tls_started. */
    void (*start_tls)(void *ctx);
    /* Close both sides once the client's output is flushed; CUT_UPSTREAM
     * closes the upstream at once (an unfinished message must not
     * complete). */
    void (*close)(void *ctx, enum stp_close_reason why, bool cut_upstream);
    /* Policy decisions worth a log line: "reject" with a short reason. */
    void (*event)(void *ctx, const char *event, const char *detail);
    /* Optional: every phase change, for debug logs. */
    void (*phase)(void *ctx, const char *from, const char *to);
    /* Optional back-pressure: true when the upstream's queue cannot take
     * another piece; client input then stops where it is. */
    bool (*upstream_full)(void *ctx);
};

/* Why the relay gives up on a session; the engine words the reply (SMTP's
 * 421, IMAP's "* BYE", POP3's "-ERR") and asks to close. */
enum stp_fail {
    STP_FAIL_UNREACHABLE,   /* the upstream never answered */
    STP_FAIL_LOST,          /* it closed, failed or stopped replying */
    STP_FAIL_HOP_TLS,       /* TLS to the next hop could not be had */
    STP_FAIL_HOP_IDENTITY,  /* it refused the client's identity */
    STP_FAIL_HOP_PROTOCOL,  /* it broke its protocol during setup */
    STP_FAIL_LIMIT,         /* over a connection limit */
    STP_FAIL_TIMEOUT,       /* a client deadline passed */
    STP_FAIL_SHUTDOWN,      /* the proxy is stopping */
    STP_FAIL_HOP_LOOP,      /* the next hop would be the proxy itself */
    STP_FAIL_HOP_AUTH,      /* it refused the proxy's own AUTH */
    STP_FAIL_DENIED,        /* the client is not in the allow list */
};

/* What the engine waits for, read after every dispatch. */
struct stp_proto_status {
    bool greeting;    /* the upstream's greeting (part of setting it up) */
    bool replies_due; /* the upstream owes replies: its deadline runs */
    bool partial;     /* the client is part-way through a command */
    bool content;     /* the client is sending a message */
    bool idle;        /* nothing owed, half-read or open: a shutdown
                         interrupts nothing */
};

/* After the client's last byte (half-close): wait for what is owed, close,
 * or close and cut the upstream (a message that can never complete). */
enum stp_eof_verdict { STP_EOF_WAIT, STP_EOF_CLOSE, STP_EOF_CUT };

/* The listener's side of a session, as every protocol reads it. */
struct stp_proto_cfg {
    bool offer_starttls;    /* the listener offers STARTTLS (or STLS) */
    bool require_tls;       /* refuse before TLS */
    bool tls_active;        /* implicit TLS: starts encrypted */
    bool upstream_tls;      /* the upstream leg is encrypted */
    bool upstream_auth;     /* the proxy logs in to the upstream itself:
                               clients are not offered AUTH */
    uint32_t max_line;      /* client command line limit incl. CRLF */
    uint32_t max_errors;    /* consecutive errors before closing; 0: no cap */
    const char *hostname;   /* the proxy's name, in its own replies */
};

/* ---- the prelude: the proxy's own dialogue before relaying ---------------- */

struct stp_up_ops {
    /* A command line for the upstream, without CRLF. */
    void (*send)(void *ctx, const char *line, size_t n);
    /* Our STARTTLS was answered and nothing followed: run the handshake
     * and call prelude_tls_done when it completes. */
    void (*start_tls)(void *ctx);
    /* The client's session may start; GREETING (complete lines) is what the
     * client is to be greeted with, fed to the engine as the upstream's. */
    void (*ready)(void *ctx, const char *greeting, size_t n);
    /* F is one of the STP_FAIL_HOP_* values. */
    void (*fail)(void *ctx, enum stp_fail f, const char *reason);
};

struct stp_prelude_cfg {
    bool starttls;                 /* upstream tls = starttls */
    bool opportunistic;            /* ... only if offered (opportunistic) */
    bool identity;                 /* say who the client is in-band */
    const struct sockaddr *client; /* ... this one */
    const char *hostname;          /* the proxy's name (EHLO argument) */
    /* Another address is left to try: a greeting that refuses service is
     * an unreachable next hop (STP_FAIL_UNREACHABLE), not the client's
     * answer. */
    bool fallback;
    int auth;                      /* enum stp_auth: log in as USER */
    const char *user, *secret;     /* must outlive the prelude */
};

/* ---- a protocol ------------------------------------------------------------ */

struct stp_proto {
    const char *name;
    size_t size; /* of one engine, which the relay allocates */
    void (*init)(void *e, const struct stp_proto_cfg *cfg,
                 const struct stp_proto_actions *act, void *ctx);
    void (*free)(void *e);
    /* Client plaintext: returns how many bytes were taken; the rest is
     * offered again later (more input, replies, room upstream). */
    size_t (*client_input)(void *e, const char *p, size_t n);
    /* Upstream bytes: returns how many were taken, or a negative value
     * after which the engine has asked to close. */
    long (*upstream_input)(void *e, const char *p, size_t n);
    /* The client leg is now TLS: forget everything learnt in plaintext. */
    void (*tls_started)(void *e);
    void (*fail)(void *e, enum stp_fail why);
    /* The upstream leg is set up, before its greeting reaches the engine;
     * TLS: it is encrypted. tls = opportunistic learns this only now, so
     * it overrides cfg->upstream_tls. Optional. */
    void (*upstream_leg)(void *e, bool tls);
    void (*status)(const void *e, struct stp_proto_status *st);
    /* The client half-closed; BUFFERED client bytes are still unread. */
    enum stp_eof_verdict (*client_eof)(const void *e, size_t buffered);
    /* The engine's part of the session's disconnect line: key=value pairs
     * (what the client asked for, what the upstream accepted) into BUF,
     * NUL-terminated, CAP > 0. Optional. */
    void (*summary)(const void *e, char *buf, size_t cap);

    /* The prelude, when the upstream leg needs one (STARTTLS spoken by the
     * proxy, in-band identity). prelude_new: 0 with *out NULL when none
     * is needed, or a negative error. */
    int (*prelude_new)(const struct stp_prelude_cfg *cfg,
                       const struct stp_up_ops *ops, void *ctx, void **out);
    size_t (*prelude_input)(void *pre, const char *p, size_t n);
    void (*prelude_tls_done)(void *pre);
    void (*prelude_free)(void *pre);
};

/* For an engine without a prelude (IMAP, POP3): no prelude is made, and a
 * hop that would need one (STARTTLS spoken to the upstream, in-band
 * identity, a login; -t refuses them first) fails with -EINVAL rather than
 * going on without it. */
int stp_proto_no_prelude(const struct stp_prelude_cfg *cfg,
                         const struct stp_up_ops *ops, void *ctx, void **out);
size_t stp_proto_no_prelude_input(void *pre, const char *p, size_t n);
void stp_proto_no_prelude_tls_done(void *pre);
#define STP_PROTO_NO_PRELUDE                                                   \
    .prelude_new = stp_proto_no_prelude,                                       \
    .prelude_input = stp_proto_no_prelude_input,                               \
    .prelude_tls_done = stp_proto_no_prelude_tls_done,                         \
    .prelude_free = stp_proto_no_prelude_tls_done

/* A phase move an engine's own table does not allow: a bug, reported as an
 * event "bug" (debug builds stop); the engine stays where it is. */
void stp_proto_illegal_move(const struct stp_proto_actions *ops, void *ctx,
                            const char *from, const char *to);

enum stp_protocol;
/* The engine for a listener's `protocol =`. */
const struct stp_proto *stp_proto_of(enum stp_protocol p);

/* ---- the feed loop ---------------------------------------------------------- */

enum stp_side { STP_SIDE_CLIENT, STP_SIDE_UPSTREAM };

/* How the feed loop sees the buffers of a relay (or of a test). */
struct stp_feed_io {
    /* The input of SIDE that may be offered now: NULL or *n == 0 when
     * there is none, or it must wait (TLS boundary, back-pressure, the
     * side is gone). Asked again before every offer. */
    const char *(*input)(void *ctx, enum stp_side side, size_t *n);
    void (*consume)(void *ctx, enum stp_side side, size_t n);
    /* The engine left client input untaken: if that was for want of room
     * upstream, make some (write) and return true to go on. Optional. */
    bool (*make_room)(void *ctx);
};

/* Offer both sides' input to engine E until neither moves, the upstream's
 * first (its replies may let the client go on). Returns the bytes taken, or
 * the negative value of upstream_input (the engine has asked to close).
 * Pure: the daemon, the unit tests and the fuzzers share it. */
long stp_proto_feed(const struct stp_proto *p, void *e,
                    const struct stp_feed_io *io, void *ctx);

#endif
