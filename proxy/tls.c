/* wolfSSL glue. The I/O layer feeds ciphertext through the recv callback and
 * collects records from the send callback; wolfSSL never touches a socket. */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/ecc.h>
#include <wolfssl/wolfcrypt/random.h>

#include <string.h>

#include "stp.h"
#include "tls.h"

struct stp_tls_ctx {
    WOLFSSL_CTX *ctx;
};

struct stp_tls {
    WOLFSSL *ssl;
    const struct stp_tls_io *io;
    void *arg;
    int last_err;
};

/* Mozilla "intermediate": TLS 1.2 and 1.3, ECDHE with AEAD only. */
static const char server_ciphers[] =
    "TLS13-AES128-GCM-SHA256:TLS13-AES256-GCM-SHA384:"
    "TLS13-CHACHA20-POLY1305-SHA256:"
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";
static int server_groups[] = {WOLFSSL_ECC_X25519, WOLFSSL_ECC_SECP256R1,
                              WOLFSSL_ECC_SECP384R1};

static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *arg)
{
    struct stp_tls *t = arg;
    int n = t->io->recv(t->arg, buf, sz);
    if (n == -EAGAIN)
        return WOLFSSL_CBIO_ERR_WANT_READ;
    return n < 0 ? WOLFSSL_CBIO_ERR_CONN_CLOSE : n;
}

static int io_send(WOLFSSL *ssl, char *buf, int sz, void *arg)
{
    struct stp_tls *t = arg;
    int n = t->io->send(t->arg, buf, sz);
    return n < 0 ? WOLFSSL_CBIO_ERR_CONN_CLOSE : n;
}

int stp_tls_global_init(void)
{
    return wolfSSL_Init() == WOLFSSL_SUCCESS ? 0 : -EIO;
}

void stp_tls_global_cleanup(void) { wolfSSL_Cleanup(); }

static int fail(char *err, size_t errlen, const char *what, int code)
{
    char buf[WOLFSSL_MAX_ERROR_SZ];
    wolfSSL_ERR_error_string_n((unsigned long)code, buf, sizeof(buf));
    snprintf(err, errlen, "%s: %s", what, code ? buf : "failed");
    return -EINVAL;
}

/* An ECDSA P-256 certificate signed by its own key, valid for a year, so a
 * listener without configured files still speaks TLS (the demo, a first
 * run). Clients cannot verify it: the caller warns loudly. */
static int self_signed(WOLFSSL_CTX *ctx, const char *cn, char *err,
                       size_t errlen)
{
    WC_RNG rng;
    ecc_key key;
    Cert cert;
    byte der[2048], kder[256];
    int r, len, klen = 0;

    if ((r = wc_InitRng(&rng)) != 0)
        return fail(err, errlen, "self-signed certificate: rng", r);
    if ((r = wc_ecc_init(&key)) != 0) {
        wc_FreeRng(&rng);
        return fail(err, errlen, "self-signed certificate: key", r);
    }
    r = wc_ecc_make_key_ex(&rng, 32, &key, ECC_SECP256R1);
    if (r == 0)
        r = wc_InitCert(&cert);
    if (r == 0) {
        snprintf(cert.subject.commonName, CTC_NAME_SIZE, "%s", cn);
        snprintf(cert.subject.org, CTC_NAME_SIZE, "starttls-proxy self-signed");
        cert.sigType = CTC_SHA256wECDSA;
        cert.daysValid = 365;
        cert.isCA = 0;
        r = wc_MakeCert(&cert, der, sizeof(der), NULL, &key, &rng);
    }
    if (r >= 0)
        r = wc_SignCert(cert.bodySz, cert.sigType, der, sizeof(der), NULL,
                        &key, &rng);
    len = r;
    if (r >= 0)
        r = klen = wc_EccKeyToDer(&key, kder, sizeof(kder));
    wc_ecc_free(&key);
    wc_FreeRng(&rng);
    if (r < 0)
        return fail(err, errlen, "self-signed certificate", r);
    if ((r = wolfSSL_CTX_use_certificate_buffer(ctx, der, len,
                                                WOLFSSL_FILETYPE_ASN1)) !=
            WOLFSSL_SUCCESS ||
        (r = wolfSSL_CTX_use_PrivateKey_buffer(ctx, kder, klen,
                                               WOLFSSL_FILETYPE_ASN1)) !=
            WOLFSSL_SUCCESS)
        return fail(err, errlen, "self-signed certificate: load", r);
    return 0;
}

int stp_tls_ctx_new_server(const char *cert, const char *key, const char *cn,
                           struct stp_tls_ctx **out, char *err, size_t errlen)
{
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfSSLv23_server_method());
    int r;
    if (!ctx)
        return fail(err, errlen, "TLS context", 0);
    if (wolfSSL_CTX_SetMinVersion(ctx, WOLFSSL_TLSV1_2) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_set_cipher_list(ctx, server_ciphers) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_set_groups(ctx, server_groups,
                               (int)STP_ARRAY_LEN(server_groups)) !=
            WOLFSSL_SUCCESS) {
        wolfSSL_CTX_free(ctx);
        return fail(err, errlen, "TLS policy", 0);
    }
    if (cert) {
        if ((r = wolfSSL_CTX_use_certificate_chain_file(ctx, cert)) !=
            WOLFSSL_SUCCESS) {
            wolfSSL_CTX_free(ctx);
            return fail(err, errlen, cert, wolfSSL_ERR_get_error());
        }
        if ((r = wolfSSL_CTX_use_PrivateKey_file(ctx, key,
                                                 WOLFSSL_FILETYPE_PEM)) !=
            WOLFSSL_SUCCESS) {
            wolfSSL_CTX_free(ctx);
            return fail(err, errlen, key, wolfSSL_ERR_get_error());
        }
        if (wolfSSL_CTX_check_private_key(ctx) != WOLFSSL_SUCCESS) {
            wolfSSL_CTX_free(ctx);
            snprintf(err, errlen, "%s: key does not match certificate %s",
                     key, cert);
            return -EINVAL;
        }
    } else if (self_signed(ctx, cn, err, errlen) < 0) {
        wolfSSL_CTX_free(ctx);
        return -EINVAL;
    }
    wolfSSL_CTX_SetIORecv(ctx, io_recv);
    wolfSSL_CTX_SetIOSend(ctx, io_send);
    *out = calloc(1, sizeof(**out));
    if (!*out) {
        wolfSSL_CTX_free(ctx);
        return -ENOMEM;
    }
    (*out)->ctx = ctx;
    return 0;
}

void stp_tls_ctx_free(struct stp_tls_ctx *ctx)
{
    if (!ctx)
        return;
    wolfSSL_CTX_free(ctx->ctx);
    free(ctx);
}

int stp_tls_new(struct stp_tls_ctx *ctx, const struct stp_tls_io *io,
                void *arg, struct stp_tls **out)
{
    struct stp_tls *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->ssl = wolfSSL_new(ctx->ctx);
    if (!t->ssl) {
        free(t);
        return -ENOMEM;
    }
    t->io = io;
    t->arg = arg;
    wolfSSL_SetIOReadCtx(t->ssl, t);
    wolfSSL_SetIOWriteCtx(t->ssl, t);
    *out = t;
    return 0;
}

void stp_tls_free(struct stp_tls *t)
{
    if (!t)
        return;
    wolfSSL_free(t->ssl);
    free(t);
}

/* Map a wolfSSL return to ours, remembering the error for the log. */
static int result(struct stp_tls *t, int r)
{
    int e = wolfSSL_get_error(t->ssl, r);
    if (e == WOLFSSL_ERROR_WANT_READ || e == WOLFSSL_ERROR_WANT_WRITE)
        return -EAGAIN;
    if (e == WOLFSSL_ERROR_ZERO_RETURN)
        return 0;
    t->last_err = e;
    return -EPROTO;
}

int stp_tls_handshake(struct stp_tls *t)
{
    int r = wolfSSL_accept(t->ssl);
    if (r == WOLFSSL_SUCCESS)
        return 0;
    r = result(t, r);
    return r == 0 ? -ECONNRESET : r;
}

int stp_tls_read(struct stp_tls *t, char *buf, size_t len)
{
    int r = wolfSSL_read(t->ssl, buf, (int)STP_MIN(len, (size_t)INT32_MAX));
    return r > 0 ? r : result(t, r);
}

int stp_tls_write(struct stp_tls *t, const char *p, size_t n)
{
    while (n > 0) {
        int chunk = (int)STP_MIN(n, (size_t)(1 << 20));
        int r = wolfSSL_write(t->ssl, p, chunk);
        if (r <= 0) {
            /* Our send callback never blocks, so any failure is final. */
            r = result(t, r);
            return r == 0 ? -EPIPE : r;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

void stp_tls_shutdown(struct stp_tls *t)
{
    wolfSSL_shutdown(t->ssl);
}

const char *stp_tls_version(const struct stp_tls *t)
{
    return wolfSSL_get_version(t->ssl);
}

const char *stp_tls_cipher(const struct stp_tls *t)
{
    return wolfSSL_get_cipher_name(t->ssl);
}

const char *stp_tls_error(const struct stp_tls *t)
{
    static __thread char buf[WOLFSSL_MAX_ERROR_SZ];
    wolfSSL_ERR_error_string_n((unsigned long)t->last_err, buf, sizeof(buf));
    return buf;
}
