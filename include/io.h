/* I/O layer: one libuv TCP stream with pooled buffers, an optional TLS layer
 * and a bounded output queue. It speaks to its owner in events. */
#ifndef STP_IO_H
#define STP_IO_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "stp.h"
#include "tls.h"

/* A pooled buffer. Reference-counted so that a slice of received plaintext can
 * be written to the other side without a copy while new input goes elsewhere. */
struct stp_buf {
    struct stp_buf *next; /* pool free list */
    uint32_t refs;
    uint32_t len;
    char data[STP_BUF_SIZE];
};

struct stp_buf *stp_buf_get(void);
void stp_buf_unref(struct stp_buf *b);
/* Release pooled buffers above the pool's resting size (idle trimming). */
void stp_buf_pool_trim(void);

struct stp_slice {
    struct stp_buf *buf;
    uint32_t off, len;
};

/* Slices waiting to be written (most leave at the next flush). */
#define STP_OUTQ_SLOTS 16
/* Back-pressure: stop reading the other side above this many queued bytes,
 * or when few slots are left. */
#define STP_OUTQ_HIGH (256 * 1024)
#define STP_OUTQ_SLOTS_LOW 4

enum stp_io_event {
    STP_IO_DATA,       /* new plaintext in the input buffer */
    STP_IO_DRAINED,    /* a write that had to wait for the socket
                          finished and left the output queue empty.
                          Not reported when a flush wrote everything at
                          once, nor after a failed or cancelled write:
                          after its own flushes the owner checks
                          stp_conn_idle() itself */
    STP_IO_TLS_READY,  /* handshake complete */
    STP_IO_EOF,        /* peer closed (or TLS close_notify), once; what it
                          sent before is in the input buffer, and writing
                          still works */
    STP_IO_ERROR,      /* read/write/TLS error; err says which */
    STP_IO_CONNECTED,  /* outgoing connect done (err < 0: failed) */
};

/* One connection: opaque, heap-allocated, freed by its own close callback. */
struct stp_conn;
typedef void (*stp_conn_cb)(struct stp_conn *c, enum stp_io_event ev, int err);

/* A connection reporting to CB, with OWNER for the owner to find itself.
 * FAMILY AF_UNSPEC: no socket yet, for stp_conn_accept (uv_accept refuses a
 * handle that has one). AF_INET/AF_INET6: the socket is created now, so it
 * can be configured (stp_conn_fd) before stp_conn_connect. On error *OUT is
 * NULL and nothing needs closing. */
int stp_conn_new(uv_loop_t *loop, int family, stp_conn_cb cb, void *owner,
                 struct stp_conn **out);
/* Take the connection SERVER has pending (an AF_UNSPEC conn). */
int stp_conn_accept(struct stp_conn *c, uv_stream_t *server);
int stp_conn_connect(struct stp_conn *c, const struct sockaddr *addr);
/* The OS socket, or a negative error when there is none yet. */
int stp_conn_fd(const struct stp_conn *c);

void *stp_conn_owner(const struct stp_conn *c);
/* The TLS session once its handshake completed; NULL before and without. */
struct stp_tls *stp_conn_tls(const struct stp_conn *c);
/* Text for an STP_IO_ERROR's ERR: the TLS layer's own reason for -EPROTO
 * (also during the handshake), else stp_strerror(ERR). */
const char *stp_conn_error_text(const struct stp_conn *c, int err);
/* Bytes on the wire (ciphertext with TLS); frozen once closing. */
uint64_t stp_conn_bytes_in(const struct stp_conn *c);
uint64_t stp_conn_bytes_out(const struct stp_conn *c);
/* The peer's and our own address; 0 or a negative error. */
int stp_conn_peer(const struct stp_conn *c, struct sockaddr_storage *out);
int stp_conn_local(const struct stp_conn *c, struct sockaddr_storage *out);

/* Start or stop delivering input (and TLS progress). Idempotent. */
void stp_conn_want_read(struct stp_conn *c, bool on);

/* Input view (NULL and *N = 0 when empty) and consumption. */
const char *stp_conn_in(const struct stp_conn *c, size_t *n);
void stp_conn_consume(struct stp_conn *c, size_t n);
/* Drop all buffered plaintext input (the STARTTLS boundary). */
void stp_conn_discard_input(struct stp_conn *c);

/* Queue bytes (copied; encrypted if TLS). Nothing goes out until flush,
 * except that on TLS a full staging buffer is sealed and flushed at once. */
int stp_conn_write(struct stp_conn *c, const char *p, size_t n);
/* Queue a slice of another connection's input buffer without copying
 * (plaintext connections only; TLS ones encrypt it). */
int stp_conn_write_ref(struct stp_conn *c, struct stp_conn *from,
                       const char *p, size_t n);
/* Encrypt staged plaintext and start writing. */
int stp_conn_flush(struct stp_conn *c);
/* Flush, ending TLS with a close_notify if it is up. */
int stp_conn_close_notify(struct stp_conn *c);
bool stp_conn_busy(const struct stp_conn *c); /* over the high-water mark */
/* No slot left for another piece (a line may take two); implies busy. */
bool stp_conn_full(const struct stp_conn *c);
/* Nothing queued, in flight or staged for TLS. */
bool stp_conn_idle(const struct stp_conn *c);

/* Switch to TLS in CTX's role (SERVER_NAME: see stp_tls_new). Input
 * buffered so far is discarded: it was plaintext, and a peer must not get
 * bytes it sent before STARTTLS treated as sent under TLS (injection). */
int stp_conn_start_tls(struct stp_conn *c, struct stp_tls_ctx *ctx,
                       const char *server_name);
/* The same, but the input not consumed yet is kept as the first ciphertext:
 * for TLS that follows a plaintext prefix in the same read (a PROXY header
 * before an implicit-TLS ClientHello). Never at a STARTTLS boundary. */
int stp_conn_start_tls_keep(struct stp_conn *c, struct stp_tls_ctx *ctx,
                            const char *server_name);
/* After the owner stalled and can take input again: decrypt what is
 * buffered (bytes inside wolfSSL never wake the loop) and return the event
 * that brought (DATA, EOF, ERROR with *ERR), for the owner to dispatch
 * itself; false: none. Reading restarts if it was paused.
 *
 * No function here calls the owner back before it returns: errors are
 * returned, and events come only from libuv's callbacks (or from this
 * one's result), so a caller is never re-entered half-way. */
bool stp_conn_pull(struct stp_conn *c, enum stp_io_event *ev, int *err);

/* Close: no more events. When libuv is done with the handle, the conn
 * releases its buffers and TLS and frees itself, then calls CLOSED(owner)
 * (CLOSED may be NULL), never before this returns. A second call before
 * then does nothing; after CLOSED the pointer is gone. */
void stp_conn_close(struct stp_conn *c, void (*closed)(void *owner));

#endif
