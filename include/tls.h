/* TLS glue: wolfSSL contexts and per-connection objects driven through IO
 * callbacks, so the event loop owns the sockets and wolfSSL never blocks. */
#ifndef STP_TLS_H
#define STP_TLS_H

#include <stdbool.h>
#include <stddef.h>

#include "config.h"

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

struct stp_ticket_keys;

struct stp_tls_server_opts {
    const char *name;             /* the listener's, binds its tickets */
    const char *cert, *key;       /* NULL: in-memory self-signed for CN */
    const char *cn;
    const struct stp_tls_params *params; /* versions, ciphers, groups */
    const struct stp_sni_cfg *sni;       /* more certificates by name */
    int n_sni;
    const char *client_ca;
    enum stp_verify_client verify_client;
    /* Session-ticket keys shared with other processes (outlive the
     * context); NULL: the context's own, random, renewed hourly. */
    const struct stp_ticket_keys *ticket_keys;
};

struct stp_tls_client_opts {
    const struct stp_tls_params *params;
    bool verify;                  /* chain (CA_FILE or the system store) */
    const char *ca_file;
    const char *cert, *key;       /* client certificate, optional */
};

/* The setting a context error is about, so the caller can point at its
 * line in the configuration. */
enum stp_tls_setting {
    STP_TLS_SET_SECTION = 0, /* none in particular */
    STP_TLS_SET_CERT,
    STP_TLS_SET_KEY,
    STP_TLS_SET_CA,          /* client_ca, ca_file */
    STP_TLS_SET_CIPHERS,
    STP_TLS_SET_GROUPS,
    STP_TLS_SET_MIN_VERSION,
    STP_TLS_SET_MAX_VERSION,
};

struct stp_tls_err {
    enum stp_tls_setting at;
    int sni;                 /* >= 0: the cert or key of that sni entry */
    char msg[448];
};

/* Defaults follow Mozilla "intermediate": TLS 1.2 and 1.3, ECDHE with AEAD,
 * X25519/P-256/P-384. Errors: negative, with the setting and a message in
 * *E. */
int stp_tls_ctx_new_server(const struct stp_tls_server_opts *o,
                           struct stp_tls_ctx **out, struct stp_tls_err *e);
int stp_tls_ctx_new_client(const struct stp_tls_client_opts *o,
                           struct stp_tls_ctx **out, struct stp_tls_err *e);
void stp_tls_ctx_free(struct stp_tls_ctx *ctx);

/* A connection of CTX's role. For a client, SERVER_NAME (may be NULL) is sent
 * as SNI unless it is an IP address, and checked when the context verifies. */
int stp_tls_new(struct stp_tls_ctx *ctx, const struct stp_tls_io *io,
                void *arg, const char *server_name, struct stp_tls **out);
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
/* The server name the client asked for (server side), or NULL. */
const char *stp_tls_sni(const struct stp_tls *t);
/* Common name of the peer's certificate into BUF; false when none. On a
 * resumed session (server side), the client certificate verified in the
 * full handshake, which the session ticket carried. */
bool stp_tls_peer_cn(const struct stp_tls *t, char *buf, size_t len);
/* Subject of the peer's certificate into BUF (as for the common name);
 * false when there is none. */
bool stp_tls_peer_subject(const struct stp_tls *t, char *buf, size_t len);
/* "tls=VERSION cipher=NAME" and, when the client chose them, sni="..." and
 * client_cert="SUBJECT", escaped for a log line. */
void stp_tls_describe(const struct stp_tls *t, char *buf, size_t len);
/* True when the client certificate came with a resumed session rather than
 * in this handshake. */
bool stp_tls_cert_resumed(const struct stp_tls *t);
/* Last error as text, for logs. */
const char *stp_tls_error(const struct stp_tls *t);

#endif
