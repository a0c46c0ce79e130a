/* wolfSSL glue. The I/O layer feeds ciphertext through the recv callback and
 * collects records from the send callback; wolfSSL never touches a socket. */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/openssl/ssl.h>
#include <wolfssl/wolfcrypt/asn_public.h>
#include <wolfssl/wolfcrypt/ecc.h>
#include <wolfssl/wolfcrypt/random.h>

#include <arpa/inet.h>
#include <stdarg.h>
#include <ctype.h>
#include <string.h>
#include <strings.h>

#include "stp.h"
#include "tls.h"
#include "tls_hello.h"
#include "tls_ticket.h"

struct stp_tls_ctx {
    WOLFSSL_CTX *ctx;
    bool client;
    bool verify;
    /* Server: contexts chosen by the client's server name. */
    struct sni_ctx {
        char *name;       /* "mx.example.net" or "*.example.org" */
        WOLFSSL_CTX *ctx;
    } *sni;
    int n_sni;
    uint16_t groups[8];   /* what `groups` allows, for TLS 1.2's check */
    int n_groups;
    struct stp_tickets *tickets; /* server */
};

struct stp_tls {
    WOLFSSL *ssl;
    const struct stp_tls_ctx *ctx;
    const struct stp_tls_io *io;
    void *arg;
    int last_err;
    bool server;
    bool hello_done;      /* server: the ClientHello went to wolfSSL */
    bool groups_ok;       /* it offers a group TLS 1.2 may use */
    struct stp_hello *hello; /* server: the first flight until then */
    struct stp_tls_ident *resumed; /* the identity the ticket carried */
    char *sni;            /* the name the client asked for, if any */
    char *ip_name;        /* client: the IP address the server must name */
    const char *refused;  /* why peer_checks refused the peer, for logs */
};

/* Mozilla "intermediate": TLS 1.2 and 1.3, ECDHE with AEAD only. */
#define AEAD_CIPHERS                                                          \
    "TLS13-AES128-GCM-SHA256:TLS13-AES256-GCM-SHA384:"                        \
    "TLS13-CHACHA20-POLY1305-SHA256:"                                         \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"              \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"              \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
static const char default_ciphers[] = AEAD_CIPHERS;
/* TLS 1.0 and 1.1 have no AEAD suite: with min_version below 1.2 the default
 * list gains the ECDHE CBC-SHA suites (Mozilla "old"), after the AEAD ones,
 * which the server's order keeps first for TLS 1.2 and 1.3 clients. */
static const char legacy_ciphers[] =
    AEAD_CIPHERS ":ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:"
                 "ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA";
static const char default_groups[] = "X25519:P-256:P-384";
static const char system_ca_file[] = "/etc/ssl/certs/ca-certificates.crt";

static int hello_recv(struct stp_tls *t, char *buf, int sz);

static int io_recv(WOLFSSL *ssl, char *buf, int sz, void *arg)
{
    struct stp_tls *t = arg;
    if (t->server && !t->hello_done)
        return hello_recv(t, buf, sz);
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

/* wolfSSL picks TLS 1.2's ECDHE curve among the client's groups that
 * `groups` allows, but when there is none it takes P-256 (its default
 * ECDHE size) instead of failing. So a client must offer one of ours, or,
 * offering none at all (RFC 8422 allows it), P-256 must be one of ours. */
static bool shares_group(const struct stp_tls_ctx *c,
                         const struct stp_hello *h)
{
    static const uint16_t p256[] = {WOLFSSL_ECC_SECP256R1};
    const uint16_t *offer = h->has_groups ? h->groups : p256;
    int n = h->has_groups ? h->n_groups : 1;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < c->n_groups; j++)
            if (offer[i] == c->groups[j])
                return true;
    return false;
}

/* What the proxy keeps from the ClientHello. The server name is held only
 * when there is one: most SMTP clients send none, and an idle session
 * should cost little. wolfSSL keeps it only when it matched one of ours;
 * logs and PROXY v2 want it in any case. */
static void hello_noted(struct stp_tls *t, const struct stp_hello *h)
{
    t->groups_ok = shares_group(t->ctx, h);
    if (h->sni[0])
        t->sni = strdup(h->sni);
}

/* Server side: the client's first flight is read into t->hello until its
 * ClientHello is whole, then handed to wolfSSL as one record; later input
 * goes straight through. The 16 KiB are held for that moment only. */
static int hello_recv(struct stp_tls *t, char *buf, int sz)
{
    struct stp_hello *h = t->hello;
    size_t room;
    if (!h && !(h = t->hello = calloc(1, sizeof(*h))))
        return WOLFSSL_CBIO_ERR_GENERAL;
    for (uint8_t *p; (p = stp_hello_room(h, &room)), room > 0;) {
        int n = t->io->recv(t->arg, (char *)p, (int)STP_MIN(room, INT32_MAX));
        if (n == -EAGAIN)
            return WOLFSSL_CBIO_ERR_WANT_READ;
        if (n <= 0)
            return WOLFSSL_CBIO_ERR_CONN_CLOSE;
        if (stp_hello_add(h, (size_t)n))
            hello_noted(t, h);
    }
    size_t k = stp_hello_take(h, (uint8_t *)buf, (size_t)sz);
    if (k > 0)
        return (int)k;
    free(h);
    t->hello = NULL;
    t->hello_done = true;
    return io_recv(t->ssl, buf, sz, t);
}

/* Called by wolfSSL with the ClientHello read, before it picks a suite:
 * below TLS 1.3, a client that shares no group with us is refused here (see
 * shares_group); TLS 1.3 key shares are wolfSSL's own business. */
static int on_cert_setup(WOLFSSL *ssl, void *arg)
{
    const struct stp_tls *t = wolfSSL_GetIOReadCtx(ssl);
    (void)arg;
    return wolfSSL_GetVersion(ssl) >= WOLFSSL_TLSV1_3 || t->groups_ok;
}

/* ---- session tickets ------------------------------------------------------ */

static bool session_ident(const struct stp_tls *t, struct stp_tls_ident *id);

/* wolfSSL's own tickets have no room for the client certificate: the proxy
 * seals them itself (tls_ticket.c), bound to the server name asked for. */
static int on_ticket(WOLFSSL *ssl, unsigned char name[WOLFSSL_TICKET_NAME_SZ],
                     unsigned char iv[WOLFSSL_TICKET_IV_SZ],
                     unsigned char mac[WOLFSSL_TICKET_MAC_SZ], int enc,
                     unsigned char *ticket, int len, int *out_len, void *arg)
{
    struct stp_tickets *tk = arg;
    struct stp_tls *t = wolfSSL_GetIOReadCtx(ssl);
    if (enc) {
        struct stp_tls_ident id;
        bool has = session_ident(t, &id);
        return stp_ticket_seal(tk, t->sni, has ? &id : NULL, name, iv, mac,
                               ticket, len, out_len) < 0
                   ? WOLFSSL_TICKET_RET_REJECT
                   : WOLFSSL_TICKET_RET_OK;
    }
    if (stp_ticket_open(tk, t->sni, &t->resumed, name, iv, mac, ticket, len,
                        out_len) < 0)
        return WOLFSSL_TICKET_RET_REJECT;
    /* As wolfSSL's own callback: TLS 1.2 gets a fresh ticket. */
    return wolfSSL_GetVersion(ssl) >= WOLFSSL_TLSV1_3
               ? WOLFSSL_TICKET_RET_OK
               : WOLFSSL_TICKET_RET_CREATE;
}

int stp_tls_global_init(void)
{
    return wolfSSL_Init() == WOLFSSL_SUCCESS ? 0 : -EIO;
}

void stp_tls_global_cleanup(void) { wolfSSL_Cleanup(); }

/* Record an error about setting AT; returns -EINVAL. */
static int fail(struct stp_tls_err *e, enum stp_tls_setting at,
                const char *what, int code)
{
    char buf[WOLFSSL_MAX_ERROR_SZ];
    wolfSSL_ERR_error_string_n((unsigned long)code, buf, sizeof(buf));
    e->at = at;
    snprintf(e->msg, sizeof(e->msg), "%s: %s", what, code ? buf : "failed");
    return -EINVAL;
}

/* Until something more precise is known. */
static void err_init(struct stp_tls_err *e)
{
    e->at = STP_TLS_SET_SECTION;
    e->sni = -1;
    snprintf(e->msg, sizeof(e->msg), "out of memory");
}

__attribute__((format(printf, 3, 4)))
static int failf(struct stp_tls_err *e, enum stp_tls_setting at,
                 const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
    va_end(ap);
    e->at = at;
    return -EINVAL;
}

/* An ECDSA P-256 certificate signed by its own key, valid for a year, so a
 * listener without configured files still speaks TLS (the demo, a first
 * run). Clients cannot verify it: the caller warns loudly. */
static int self_signed(WOLFSSL_CTX *ctx, const char *cn,
                       struct stp_tls_err *e)
{
    WC_RNG rng;
    ecc_key key;
    Cert cert;
    byte der[2048], kder[256];
    int r, len, klen = 0;

    if ((r = wc_InitRng(&rng)) != 0)
        return fail(e, STP_TLS_SET_SECTION, "self-signed certificate: rng", r);
    if ((r = wc_ecc_init(&key)) != 0) {
        wc_FreeRng(&rng);
        return fail(e, STP_TLS_SET_SECTION, "self-signed certificate: key", r);
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
        return fail(e, STP_TLS_SET_SECTION, "self-signed certificate", r);
    if ((r = wolfSSL_CTX_use_certificate_buffer(ctx, der, len,
                                                WOLFSSL_FILETYPE_ASN1)) !=
            WOLFSSL_SUCCESS ||
        (r = wolfSSL_CTX_use_PrivateKey_buffer(ctx, kder, klen,
                                               WOLFSSL_FILETYPE_ASN1)) !=
            WOLFSSL_SUCCESS)
        return fail(e, STP_TLS_SET_SECTION, "self-signed certificate: load",
                    r);
    return 0;
}

/* The wolfSSL ids of the groups in S (NULL: the defaults), in order, into
 * IDS (room for 8) and their names, ':'-separated, into LIST. Returns how
 * many. The names were checked when the configuration was read. */
static int parse_groups(const char *s, int *ids, char *list, size_t listlen)
{
    static const struct {
        const char *name;
        int id;
    } g[] = {
        {"X25519", WOLFSSL_ECC_X25519},    {"X448", WOLFSSL_ECC_X448},
        {"P-256", WOLFSSL_ECC_SECP256R1},  {"P-384", WOLFSSL_ECC_SECP384R1},
        {"P-521", WOLFSSL_ECC_SECP521R1},
    };
    int n = 0;
    list[0] = '\0';
    for (s = s ? s : default_groups; *s && n < 8;) {
        size_t len = strcspn(s, ":");
        for (size_t i = 0; i < STP_ARRAY_LEN(g) && n < 8; i++) {
            if (strlen(g[i].name) != len || strncasecmp(s, g[i].name, len))
                continue;
            ids[n++] = g[i].id;
            size_t used = strlen(list);
            snprintf(list + used, listlen - used, "%s%s", used ? ":" : "",
                     g[i].name);
        }
        s += len + (s[len] == ':');
    }
    return n;
}

/* Versions, ciphers and groups: the same for both roles. */
static int apply_params(WOLFSSL_CTX *ctx, const struct stp_tls_params *p,
                        struct stp_tls_err *e)
{
    static const struct {
        int min, max;
    } v[] = {
        [STP_TLS_V1_0] = {WOLFSSL_TLSV1, 0x0301},
        [STP_TLS_V1_1] = {WOLFSSL_TLSV1_1, 0x0302},
        [STP_TLS_V1_2] = {WOLFSSL_TLSV1_2, 0x0303},
        [STP_TLS_V1_3] = {WOLFSSL_TLSV1_3, 0x0304},
    };
    if (wolfSSL_CTX_SetMinVersion(ctx, v[p->min_version].min) !=
        WOLFSSL_SUCCESS)
        return failf(e, STP_TLS_SET_MIN_VERSION,
                     "TLS %s is not available in this wolfSSL build",
                     stp_tls_version_name(p->min_version));
    if (wolfSSL_CTX_set_max_proto_version(ctx, v[p->max_version].max) !=
        WOLFSSL_SUCCESS)
        return failf(e, STP_TLS_SET_MAX_VERSION,
                     "TLS %s is not available in this wolfSSL build",
                     stp_tls_version_name(p->max_version));
    const char *ciphers = p->ciphers                       ? p->ciphers
                          : p->min_version < STP_TLS_V1_2 ? legacy_ciphers
                                                          : default_ciphers;
    if (wolfSSL_CTX_set_cipher_list(ctx, ciphers) != WOLFSSL_SUCCESS)
        return failf(e, STP_TLS_SET_CIPHERS, "no usable cipher in '%s'",
                     ciphers);
    char list[64];
    int ids[8], n = parse_groups(p->groups, ids, list, sizeof(list));
    /* set1_curves_list is what keeps TLS 1.2's ECDHE curve among the
     * client's groups that are ours (wolfSSL's disabled-curve mask; see
     * on_cert_setup for a client offering none); set_groups fixes the TLS
     * 1.3 key share order. */
    if (wolfSSL_CTX_set1_curves_list(ctx, list) != WOLFSSL_SUCCESS ||
        wolfSSL_CTX_set_groups(ctx, ids, n) != WOLFSSL_SUCCESS)
        return failf(e, STP_TLS_SET_GROUPS, "groups '%s' are not available",
                     p->groups ? p->groups : default_groups);
    return 0;
}

/* A key that does not match its certificate is the key's fault: the
 * certificate is what the clients were promised. */
static int load_pair(WOLFSSL_CTX *ctx, const char *cert, const char *key,
                     struct stp_tls_err *e)
{
    if (wolfSSL_CTX_use_certificate_chain_file(ctx, cert) != WOLFSSL_SUCCESS)
        return fail(e, STP_TLS_SET_CERT, cert, (int)wolfSSL_ERR_get_error());
    if (wolfSSL_CTX_use_PrivateKey_file(ctx, key, WOLFSSL_FILETYPE_PEM) !=
        WOLFSSL_SUCCESS)
        return fail(e, STP_TLS_SET_KEY, key, (int)wolfSSL_ERR_get_error());
    if (wolfSSL_CTX_check_private_key(ctx) != WOLFSSL_SUCCESS)
        return failf(e, STP_TLS_SET_KEY, "%s: key does not match certificate %s",
                     key, cert);
    return 0;
}

/* A server context with one certificate and the listener's policy. */
static WOLFSSL_CTX *server_ctx(const struct stp_tls_server_opts *o,
                               const char *cert, const char *key,
                               struct stp_tickets *tk, struct stp_tls_err *e)
{
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfSSLv23_server_method());
    if (!ctx) {
        fail(e, STP_TLS_SET_SECTION, "TLS context", 0);
        return NULL;
    }
    int r = apply_params(ctx, o->params, e);
    if (r == 0)
        r = cert ? load_pair(ctx, cert, key, e) : self_signed(ctx, o->cn, e);
    if (r == 0 && o->client_ca) {
        if (wolfSSL_CTX_load_verify_locations(ctx, o->client_ca, NULL) !=
            WOLFSSL_SUCCESS) {
            r = fail(e, STP_TLS_SET_CA, o->client_ca,
                     (int)wolfSSL_ERR_get_error());
        } else {
            int mode = o->verify_client == STP_VERIFY_CLIENT_REQUIRE
                           ? WOLFSSL_VERIFY_PEER |
                                 WOLFSSL_VERIFY_FAIL_IF_NO_PEER_CERT
                       : o->verify_client == STP_VERIFY_CLIENT_OPTIONAL
                           ? WOLFSSL_VERIFY_PEER
                           : WOLFSSL_VERIFY_NONE;
            wolfSSL_CTX_set_verify(ctx, mode, NULL);
            /* wolfSSL's session cache (TLS 1.2 resumption by session ID)
             * forgets the client certificate; tickets keep it. */
            if (mode != WOLFSSL_VERIFY_NONE)
                wolfSSL_CTX_set_session_cache_mode(ctx, WOLFSSL_SESS_CACHE_OFF);
        }
    }
    if (r < 0) {
        wolfSSL_CTX_free(ctx);
        return NULL;
    }
    wolfSSL_CTX_SetIORecv(ctx, io_recv);
    wolfSSL_CTX_SetIOSend(ctx, io_send);
    wolfSSL_CTX_set_cert_cb(ctx, on_cert_setup, NULL);
    /* Every certificate's context seals with the listener's keys. */
    wolfSSL_CTX_set_TicketEncCb(ctx, on_ticket);
    wolfSSL_CTX_set_TicketEncCtx(ctx, tk);
    wolfSSL_CTX_set_TicketHint(ctx, STP_TICKET_LIFETIME);
    return ctx;
}

static bool name_matches(const char *pattern, const char *name)
{
    if (pattern[0] == '*' && pattern[1] == '.') {
        const char *dot = strchr(name, '.');
        return dot && dot != name && strcasecmp(dot + 1, pattern + 2) == 0;
    }
    return strcasecmp(pattern, name) == 0;
}

/* Pick the certificate for the name the client asked for; without a match
 * the listener's default stays. */
static int on_servername(WOLFSSL *ssl, int *alert, void *arg)
{
    struct stp_tls_ctx *c = arg;
    const char *name = wolfSSL_get_servername(ssl, WOLFSSL_SNI_HOST_NAME);
    if (!name)
        return 0;
    for (int i = 0; i < c->n_sni; i++) {
        if (name_matches(c->sni[i].name, name)) {
            wolfSSL_set_SSL_CTX(ssl, c->sni[i].ctx);
            break;
        }
    }
    return 0;
}

int stp_tls_ctx_new_server(const struct stp_tls_server_opts *o,
                           struct stp_tls_ctx **out, struct stp_tls_err *e)
{
    err_init(e);
    struct stp_tls_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return -ENOMEM;
    *out = c;
    char list[64];
    int ids[8];
    c->n_groups = parse_groups(o->params->groups, ids, list, sizeof(list));
    for (int i = 0; i < c->n_groups; i++)
        c->groups[i] = (uint16_t)ids[i];
    c->verify = o->client_ca && o->verify_client != STP_VERIFY_CLIENT_NONE;
    /* The listener and whether it asks for a certificate: tickets of a
     * listener that asks for none never open at one that requires one. */
    char label[256];
    snprintf(label, sizeof(label), "verify_client=%d %s",
             c->verify ? (int)o->verify_client : 0, o->name ? o->name : "");
    if (!(c->tickets = stp_tickets_new(o->ticket_keys, label)) ||
        !(c->ctx = server_ctx(o, o->cert, o->key, c->tickets, e)))
        goto fail;
    if (o->n_sni > 0) {
        if (!(c->sni = calloc((size_t)o->n_sni, sizeof(*c->sni))))
            goto fail;
        for (int i = 0; i < o->n_sni; i++) {
            c->n_sni++; /* freed with the context, whatever fails below */
            c->sni[i].name = strdup(o->sni[i].name);
            c->sni[i].ctx = server_ctx(o, o->sni[i].cert, o->sni[i].key,
                                       c->tickets, e);
            if (!c->sni[i].name || !c->sni[i].ctx) {
                e->sni = i;
                goto fail;
            }
        }
        wolfSSL_CTX_set_servername_callback(c->ctx, on_servername);
        wolfSSL_CTX_set_servername_arg(c->ctx, c);
    }
    return 0;
fail:
    stp_tls_ctx_free(c);
    *out = NULL;
    return -EINVAL;
}

int stp_tls_ctx_new_client(const struct stp_tls_client_opts *o,
                           struct stp_tls_ctx **out, struct stp_tls_err *e)
{
    err_init(e);
    WOLFSSL_CTX *ctx = wolfSSL_CTX_new(wolfSSLv23_client_method());
    if (!ctx)
        return fail(e, STP_TLS_SET_SECTION, "TLS context", 0);
    int r = apply_params(ctx, o->params, e);
    if (r == 0 && o->cert)
        r = load_pair(ctx, o->cert, o->key, e);
    if (r == 0 && o->verify) {
        const char *ca = o->ca_file ? o->ca_file : system_ca_file;
        if (wolfSSL_CTX_load_verify_locations(ctx, ca, NULL) !=
            WOLFSSL_SUCCESS)
            r = fail(e, STP_TLS_SET_CA, ca, (int)wolfSSL_ERR_get_error());
    }
    if (r < 0) {
        wolfSSL_CTX_free(ctx);
        return r;
    }
    wolfSSL_CTX_set_verify(ctx, o->verify ? WOLFSSL_VERIFY_PEER
                                          : WOLFSSL_VERIFY_NONE, NULL);
    wolfSSL_CTX_SetIORecv(ctx, io_recv);
    wolfSSL_CTX_SetIOSend(ctx, io_send);
    struct stp_tls_ctx *c = calloc(1, sizeof(*c));
    if (!c) {
        wolfSSL_CTX_free(ctx);
        return -ENOMEM;
    }
    c->ctx = ctx;
    c->client = true;
    c->verify = o->verify;
    *out = c;
    return 0;
}

void stp_tls_ctx_free(struct stp_tls_ctx *ctx)
{
    if (!ctx)
        return;
    for (int i = 0; i < ctx->n_sni; i++) {
        free(ctx->sni[i].name);
        wolfSSL_CTX_free(ctx->sni[i].ctx);
    }
    free(ctx->sni);
    wolfSSL_CTX_free(ctx->ctx);
    stp_tickets_free(ctx->tickets);
    free(ctx);
}

static bool is_ip(const char *s)
{
    unsigned char buf[16];
    return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

int stp_tls_new(struct stp_tls_ctx *ctx, const struct stp_tls_io *io,
                void *arg, const char *server_name, struct stp_tls **out)
{
    struct stp_tls *t = calloc(1, sizeof(*t));
    if (!t)
        return -ENOMEM;
    t->ssl = wolfSSL_new(ctx->ctx);
    if (!t->ssl) {
        free(t);
        return -ENOMEM;
    }
    t->ctx = ctx;
    t->io = io;
    t->arg = arg;
    t->server = !ctx->client;
    wolfSSL_SetIOReadCtx(t->ssl, t);
    wolfSSL_SetIOWriteCtx(t->ssl, t);
    if (ctx->client && server_name) {
        if ((!is_ip(server_name) &&
             wolfSSL_UseSNI(t->ssl, WOLFSSL_SNI_HOST_NAME, server_name,
                            (unsigned short)strlen(server_name)) !=
                 WOLFSSL_SUCCESS) ||
            (ctx->verify &&
             wolfSSL_check_domain_name(t->ssl, server_name) !=
                 WOLFSSL_SUCCESS)) {
            stp_tls_free(t);
            return -EINVAL;
        }
        if (ctx->verify && is_ip(server_name) &&
            !(t->ip_name = strdup(server_name))) {
            stp_tls_free(t);
            return -ENOMEM;
        }
    }
    *out = t;
    return 0;
}

void stp_tls_free(struct stp_tls *t)
{
    if (!t)
        return;
    wolfSSL_free(t->ssl);
    free(t->hello);
    free(t->resumed);
    free(t->ip_name);
    free(t->sni);
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

/* Whether the certificate names IP among its iPAddress entries. */
static bool names_ip(WOLFSSL_X509 *x, const char *ip)
{
    unsigned char want[16], got[16];
    int af = strchr(ip, ':') ? AF_INET6 : AF_INET;
    bool found = false;
    if (inet_pton(af, ip, want) != 1)
        return false;
    /* wolfSSL gives iPAddress entries as text; compared as addresses. */
    for (const char *n; !found && (n = wolfSSL_X509_get_next_altname(x));)
        found = inet_pton(af, n, got) == 1 &&
                memcmp(want, got, af == AF_INET ? 4 : 16) == 0;
    return found;
}

/* What wolfSSL 5.5.4 does not check in a verified peer's certificate: a
 * leaf whose key usage leaves out digitalSignature cannot sign the key
 * exchange or CertificateVerify (RFC 5280 4.2.1.3; every suite the proxy
 * offers by default signs), and an IP address must be one of its
 * iPAddress names, never its common name (RFC 6125 1.7.2, RFC 2818 3.1). */
static int peer_checks(struct stp_tls *t)
{
    WOLFSSL_X509 *x = wolfSSL_get_peer_certificate(t->ssl);
    if (!x)
        return 0;
    unsigned ku = wolfSSL_X509_get_key_usage(x);
    if (ku != (unsigned)-1 && !(ku & KEYUSE_DIGITAL_SIG))
        t->refused = "peer certificate's key usage does not allow signing";
    else if (t->ip_name && !names_ip(x, t->ip_name))
        t->refused = "peer certificate does not name the IP address "
                     "(no matching subjectAltName iPAddress)";
    wolfSSL_X509_free(x);
    return t->refused ? -EPROTO : 0;
}

int stp_tls_handshake(struct stp_tls *t)
{
    int r = wolfSSL_negotiate(t->ssl);
    if (r == WOLFSSL_SUCCESS)
        return t->ctx->verify ? peer_checks(t) : 0;
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

const char *stp_tls_sni(const struct stp_tls *t)
{
    if (t->sni)
        return t->sni;
    return wolfSSL_get_servername(t->ssl, WOLFSSL_SNI_HOST_NAME);
}

/* The identity in the peer's certificate; false when it sent none. */
static bool cert_ident(WOLFSSL *ssl, struct stp_tls_ident *id)
{
    WOLFSSL_X509 *x = wolfSSL_get_peer_certificate(ssl);
    if (!x)
        return false;
    WOLFSSL_X509_NAME *name = wolfSSL_X509_get_subject_name(x);
    bool ok = wolfSSL_X509_NAME_oneline(name, id->subject,
                                        (int)sizeof(id->subject)) != NULL;
    if (wolfSSL_X509_NAME_get_text_by_NID(name, NID_commonName, id->cn,
                                          (int)sizeof(id->cn)) <= 0)
        id->cn[0] = '\0';
    wolfSSL_X509_free(x);
    return ok;
}

/* The client's verified identity: its certificate in a full handshake, what
 * the ticket carried in a resumed one. */
static bool session_ident(const struct stp_tls *t, struct stp_tls_ident *id)
{
    if (stp_tls_cert_resumed(t)) {
        *id = *t->resumed;
        return true;
    }
    return cert_ident(t->ssl, id);
}

bool stp_tls_cert_resumed(const struct stp_tls *t)
{
    return t->resumed && wolfSSL_session_reused(t->ssl);
}

bool stp_tls_peer_cn(const struct stp_tls *t, char *buf, size_t len)
{
    struct stp_tls_ident id;
    if (!session_ident(t, &id) || !id.cn[0])
        return false;
    snprintf(buf, len, "%s", id.cn);
    return true;
}

bool stp_tls_peer_subject(const struct stp_tls *t, char *buf, size_t len)
{
    struct stp_tls_ident id;
    if (!session_ident(t, &id))
        return false;
    snprintf(buf, len, "%s", id.subject);
    return true;
}

const char *stp_tls_error(const struct stp_tls *t)
{
    if (t->refused)
        return t->refused;
    static __thread char buf[WOLFSSL_MAX_ERROR_SZ];
    wolfSSL_ERR_error_string_n((unsigned long)t->last_err, buf, sizeof(buf));
    return buf;
}

void stp_tls_describe(const struct stp_tls *t, char *buf, size_t len)
{
    const char *sni = stp_tls_sni(t);
    char subject[256], esni[300], esubject[300];
    bool cert = stp_tls_peer_subject(t, subject, sizeof(subject));
    /* Both are the client's choice: escaped, so they cannot forge a line
     * or a key. */
    snprintf(buf, len, "tls=%s cipher=%s%s%s%s%s%s%s", stp_tls_version(t),
             stp_tls_cipher(t), sni ? " sni=\"" : "",
             sni ? stp_log_esc(esni, sizeof(esni), sni) : "", sni ? "\"" : "",
             cert ? " client_cert=\"" : "",
             cert ? stp_log_esc(esubject, sizeof(esubject), subject) : "",
             cert ? "\"" : "");
}
