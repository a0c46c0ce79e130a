/* TLS glue: wolfSSL contexts and per-connection objects driven through IO
 * callbacks, so the event loop owns the sockets and wolfSSL never blocks. */
#ifndef STP_TLS_H
#define STP_TLS_H

#include <stdbool.h>
#include <stddef.h>

struct stp_tls_ctx;
struct stp_tls;

/* Ciphertext transport supplied by the I/O layer. recv returns bytes copied
 * (> 0) or -EAGAIN when nothing is buffered; send must accept all SZ bytes
 * (it queues them) and returns SZ, or a negative error. */
struct stp_tls_io {
    int (*recv)(void *arg, char *buf, int sz);
    int (*send)(void *arg, const char *buf, int sz);
};

int stp_tls_global_init(void);
void stp_tls_global_cleanup(void);

/* A server context: TLS 1.2+, Mozilla "intermediate" ciphers and groups. With
 * no CERT/KEY, an in-memory self-signed ECDSA P-256 certificate for CN. */
int stp_tls_ctx_new_server(const char *cert, const char *key, const char *cn,
                           struct stp_tls_ctx **out, char *err, size_t errlen);
void stp_tls_ctx_free(struct stp_tls_ctx *ctx);

int stp_tls_new(struct stp_tls_ctx *ctx, const struct stp_tls_io *io,
                void *arg, struct stp_tls **out);
void stp_tls_free(struct stp_tls *t);

/* 0: handshake complete; -EAGAIN: needs more input; other <0: failed. */
int stp_tls_handshake(struct stp_tls *t);
/* > 0 plaintext bytes; 0: peer sent close_notify; -EAGAIN; other <0 error. */
int stp_tls_read(struct stp_tls *t, char *buf, size_t len);
/* Encrypts all of P (records go to io->send). 0 or negative error. */
int stp_tls_write(struct stp_tls *t, const char *p, size_t n);
/* Queue a close_notify alert (best effort). */
void stp_tls_shutdown(struct stp_tls *t);

const char *stp_tls_version(const struct stp_tls *t);
const char *stp_tls_cipher(const struct stp_tls *t);
/* Last error as text, for logs. */
const char *stp_tls_error(const struct stp_tls *t);

#endif
