/* Session tickets sealed by the proxy, and the client identities they
 * refer to. No wolfSSL session here: keys, sealing, the identity ring. */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>
#include <wolfssl/wolfcrypt/chacha20_poly1305.h>

#include <ctype.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "stp.h"
#include "ticket_keys.h"
#include "tls_ticket.h"

/* Server: the session ticket keys and the identities tickets refer to. */
struct stp_tickets {
    pthread_mutex_t mu;
    const struct stp_ticket_keys *shared; /* ticket_keys = FILE, or NULL */
    uint8_t label[255];    /* the listener and its policy, sealed along */
    size_t label_len;
    uint8_t prefix[8];     /* key_name: this context's prefix, key generation */
    struct {
        uint8_t key[CHACHA20_POLY1305_AEAD_KEYSIZE];
        uint64_t gen;
        time_t born;
    } k[2];
    int cur;
    uint64_t nonce;        /* per key: ChaCha20-Poly1305 nonces never repeat */
    struct ident_slot {
        uint8_t tag[12];   /* random: which identity the ticket meant */
        struct stp_tls_ident id;
    } *ids;                /* a ring, allocated with the first identity */
    uint32_t next_id;
};

/* wolfSSL's own tickets have no room for the client certificate, and its
 * session cache forgets it, so a resumed session would lose the identity
 * the full handshake verified. The proxy seals tickets itself: wolfSSL's
 * ticket state, then a 16-byte reference to the identity (zero without a
 * certificate), under ChaCha20-Poly1305. The identities are kept in a ring
 * of TICKET_IDS per listener: a ticket whose identity has been overwritten
 * is refused, which costs a full handshake, never a wrong identity. With
 * ticket_keys = FILE other processes open our tickets too: those without a
 * certificate resume there, those with one are refused (not in their
 * ring), as after a reload. */
enum {
    TICKET_KEY_LIFE = 3600, /* a new key every hour */
    TICKET_REF = 16,
    TICKET_IDS = 1024,
};

static time_t now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec;
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static uint64_t get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

static int random_bytes(void *p, size_t n)
{
    return getrandom(p, n, 0) == (ssize_t)n ? 0 : -EIO;
}

static int ticket_key_new(struct stp_tickets *tk, int slot, uint64_t gen)
{
    if (random_bytes(tk->k[slot].key, sizeof(tk->k[slot].key)) < 0)
        return -EIO;
    tk->k[slot].gen = gen;
    tk->k[slot].born = now_s();
    return 0;
}

struct stp_tickets *stp_tickets_new(const struct stp_ticket_keys *shared,
                                    const char *label)
{
    struct stp_tickets *tk = calloc(1, sizeof(*tk));
    if (!tk)
        return NULL;
    pthread_mutex_init(&tk->mu, NULL);
    tk->shared = shared;
    tk->label_len = STP_MIN(strlen(label), sizeof(tk->label));
    memcpy(tk->label, label, tk->label_len);
    if (random_bytes(tk->prefix, sizeof(tk->prefix)) < 0 ||
        ticket_key_new(tk, 0, 1) < 0) {
        pthread_mutex_destroy(&tk->mu);
        free(tk);
        return NULL;
    }
    return tk;
}

void stp_tickets_free(struct stp_tickets *tk)
{
    if (!tk)
        return;
    pthread_mutex_destroy(&tk->mu);
    explicit_bzero(tk->k, sizeof(tk->k));
    free(tk->ids);
    free(tk);
}

/* The key to seal with: the current one, or a new one when it is an hour
 * old (the previous still opens its tickets). Under tk->mu. */
static int ticket_seal_key(struct stp_tickets *tk)
{
    int cur = tk->cur;
    if (now_s() - tk->k[cur].born < TICKET_KEY_LIFE)
        return cur;
    if (ticket_key_new(tk, !cur, tk->k[cur].gen + 1) < 0)
        return -1;
    tk->cur = !cur;
    tk->nonce = 0;
    return tk->cur;
}

/* The key a ticket names, while tickets sealed with it can be alive. */
static int ticket_open_key(const struct stp_tickets *tk, const uint8_t *name)
{
    if (memcmp(name, tk->prefix, sizeof(tk->prefix)) != 0)
        return -1;
    uint64_t gen = get64(name + 8);
    for (int i = 0; i < 2; i++)
        if (tk->k[i].gen == gen &&
            now_s() - tk->k[i].born < TICKET_KEY_LIFE + STP_TICKET_LIFETIME)
            return i;
    return -1;
}

/* Keep ID; REF (TICKET_REF bytes) says where: slot + 1, then its tag. */
static int ident_keep(struct stp_tickets *tk, const struct stp_tls_ident *id,
                      uint8_t *ref)
{
    if (!tk->ids && !(tk->ids = calloc(TICKET_IDS, sizeof(*tk->ids))))
        return -ENOMEM;
    uint32_t slot = tk->next_id++ % TICKET_IDS;
    struct ident_slot *e = &tk->ids[slot];
    if (random_bytes(e->tag, sizeof(e->tag)) < 0)
        return -EIO;
    e->id = *id;
    put64(ref, (uint64_t)(slot + 1) << 32);
    memcpy(ref + 4, e->tag, sizeof(e->tag));
    return 0;
}

static const struct stp_tls_ident *ident_find(const struct stp_tickets *tk,
                                              const uint8_t *ref)
{
    uint64_t slot = get64(ref) >> 32;
    if (!tk->ids || slot == 0 || slot > TICKET_IDS)
        return NULL;
    const struct ident_slot *e = &tk->ids[slot - 1];
    return memcmp(e->tag, ref + 4, sizeof(e->tag)) == 0 ? &e->id : NULL;
}

/* What a ticket is sealed to besides its contents: the key name, the nonce,
 * the listener (its name and client-certificate policy: with a key file
 * shared by listeners and processes, a ticket from a listener that asks for
 * no certificate must not open at one that requires it) and the server
 * name the client asked for, lower-cased. A ticket offered under another
 * name fails to open: RFC 6066 section 3 forbids resuming it, and the PROXY
 * v2 authority would name a certificate this session never presented. */
enum {
    TICKET_AAD_MAX = WOLFSSL_TICKET_NAME_SZ + WOLFSSL_TICKET_IV_SZ + 1 + 255 +
                     255,
};

static size_t ticket_aad(const struct stp_tickets *tk, uint8_t *aad,
                         const uint8_t *name, const uint8_t *iv,
                         const char *sni)
{
    size_t n = 0, label = tk->label_len; /* at most 255 */
    memcpy(aad, name, WOLFSSL_TICKET_NAME_SZ);
    n += WOLFSSL_TICKET_NAME_SZ;
    memcpy(aad + n, iv, WOLFSSL_TICKET_IV_SZ);
    n += WOLFSSL_TICKET_IV_SZ;
    aad[n++] = (uint8_t)label; /* length first: label and name stay apart */
    memcpy(aad + n, tk->label, label);
    n += label;
    for (const char *p = sni; p && *p && n < TICKET_AAD_MAX; p++)
        aad[n++] = (uint8_t)tolower((unsigned char)*p);
    return n;
}

/* The key to seal with, its name and a nonce into NAME and IV. Under
 * tk->mu. With shared keys the nonce is 96 random bits, not a counter:
 * processes sharing a key have no common counter, and a per-process random
 * prefix would leave a 32- or 64-bit counter space per process. A repeat
 * among N tickets under one key has probability about N^2 / 2^97: below
 * 2^-33 for 2^32 tickets, far more than a key seals in its life. */
static const uint8_t *seal_key(struct stp_tickets *tk, uint8_t *name,
                               uint8_t *iv)
{
    memset(iv, 0, WOLFSSL_TICKET_IV_SZ);
    if (tk->shared) {
        const struct stp_ticket_key *k = &tk->shared->k[0];
        if (random_bytes(iv, CHACHA20_POLY1305_AEAD_IV_SIZE) < 0)
            return NULL;
        memcpy(name, k->name, WOLFSSL_TICKET_NAME_SZ);
        return k->aead;
    }
    int k = ticket_seal_key(tk);
    if (k < 0)
        return NULL;
    memcpy(name, tk->prefix, sizeof(tk->prefix));
    put64(name + 8, tk->k[k].gen);
    put64(iv, ++tk->nonce);
    return tk->k[k].key;
}

/* The key a ticket names, or NULL. A shared key opens tickets sealed by any
 * process holding it; its life is the operator's (the file's lines). */
static const uint8_t *open_key(const struct stp_tickets *tk,
                               const uint8_t *name)
{
    if (!tk->shared) {
        int k = ticket_open_key(tk, name);
        return k < 0 ? NULL : tk->k[k].key;
    }
    for (int i = 0; i < tk->shared->n; i++)
        if (memcmp(tk->shared->k[i].name, name, WOLFSSL_TICKET_NAME_SZ) == 0)
            return tk->shared->k[i].aead;
    return NULL;
}

static int seal(struct stp_tickets *tk, const char *sni,
                const struct stp_tls_ident *id, uint8_t *name, uint8_t *iv,
                uint8_t *mac, uint8_t *ticket, int len, int *out_len)
{
    uint8_t *ref = ticket + len;
    const uint8_t *key;
    if (len < 0 || len + TICKET_REF > *out_len)
        return -EINVAL;
    memset(ref, 0, TICKET_REF);
    /* A session whose identity cannot be kept gets no ticket. */
    if ((id && ident_keep(tk, id, ref) < 0) || !(key = seal_key(tk, name, iv)))
        return -EIO;
    memset(mac, 0, WOLFSSL_TICKET_MAC_SZ);
    uint8_t aad[TICKET_AAD_MAX];
    size_t aad_len = ticket_aad(tk, aad, name, iv, sni);
    if (wc_ChaCha20Poly1305_Encrypt(key, iv, aad, (word32)aad_len, ticket,
                                    (word32)(len + TICKET_REF), ticket,
                                    mac) != 0)
        return -EIO;
    *out_len = len + TICKET_REF;
    return 0;
}

/* An identity reference is found only in the ring of the listener context
 * that sealed it: another process's (or generation's) certificate is never
 * resumed, the client gets a full handshake and is verified again. */
static int open_(struct stp_tickets *tk, const char *sni,
                 struct stp_tls_ident **id, const uint8_t *name,
                 const uint8_t *iv, const uint8_t *mac, uint8_t *ticket,
                 int len, int *out_len)
{
    uint8_t aad[TICKET_AAD_MAX];
    static const uint8_t zeros[WOLFSSL_TICKET_MAC_SZ];
    const uint8_t *key = open_key(tk, name);
    /* The tag fills the first half of wolfSSL's MAC field; the rest was
     * sealed as zeros and must still be. */
    if (!key || len < TICKET_REF ||
        memcmp(mac + CHACHA20_POLY1305_AEAD_AUTHTAG_SIZE, zeros,
               WOLFSSL_TICKET_MAC_SZ - CHACHA20_POLY1305_AEAD_AUTHTAG_SIZE))
        return -EINVAL;
    size_t aad_len = ticket_aad(tk, aad, name, iv, sni);
    if (wc_ChaCha20Poly1305_Decrypt(key, iv, aad, (word32)aad_len, ticket,
                                    (word32)len, mac, ticket) != 0)
        return -EINVAL;
    const uint8_t *ref = ticket + len - TICKET_REF;
    static const uint8_t none[TICKET_REF];
    free(*id); /* TLS 1.3 may offer several tickets */
    *id = NULL;
    if (memcmp(ref, none, TICKET_REF) != 0) {
        const struct stp_tls_ident *kept = ident_find(tk, ref);
        if (!kept || !(*id = malloc(sizeof(*kept))))
            return -EINVAL;
        **id = *kept;
    }
    *out_len = len - TICKET_REF;
    return 0;
}

int stp_ticket_seal(struct stp_tickets *tk, const char *sni,
                    const struct stp_tls_ident *id, uint8_t *name, uint8_t *iv,
                    uint8_t *mac, uint8_t *ticket, int len, int *out_len)
{
    pthread_mutex_lock(&tk->mu);
    int r = seal(tk, sni, id, name, iv, mac, ticket, len, out_len);
    pthread_mutex_unlock(&tk->mu);
    return r;
}

int stp_ticket_open(struct stp_tickets *tk, const char *sni,
                    struct stp_tls_ident **id, const uint8_t *name,
                    const uint8_t *iv, const uint8_t *mac, uint8_t *ticket,
                    int len, int *out_len)
{
    pthread_mutex_lock(&tk->mu);
    int r = open_(tk, sni, id, name, iv, mac, ticket, len, out_len);
    pthread_mutex_unlock(&tk->mu);
    return r;
}

