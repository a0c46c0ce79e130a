/* Session tickets the proxy seals itself: wolfSSL's ticket state plus a
 * reference to the verified client identity, under ChaCha20-Poly1305, bound
 * to the key name, the nonce and the server name asked for. One set of keys
 * and one identity ring per listener TLS context, shared by its workers. */
#ifndef STP_TLS_TICKET_H
#define STP_TLS_TICKET_H

#include <stdint.h>

/* A verified client certificate's identity, kept for its session. */
struct stp_tls_ident {
    char subject[256];
    char cn[256];
};

/* Seconds a ticket is good for (wolfSSL's default hint). */
#define STP_TICKET_LIFETIME 300

struct stp_tickets;
struct stp_ticket_keys;

/* SHARED: keys from ticket_keys = FILE (NULL: keys of its own), which must
 * outlive the result. LABEL names the listener and its client-certificate
 * policy: a ticket opens only under the label it was sealed with. */
struct stp_tickets *stp_tickets_new(const struct stp_ticket_keys *shared,
                                    const char *label);
void stp_tickets_free(struct stp_tickets *tk);

/* wolfSSL's ticket callback arguments: NAME, IV and MAC are filled; TICKET
 * holds LEN bytes of state and room for *OUT_LEN. ID: the identity to keep
 * (NULL: none). 0, or negative: no ticket. */
int stp_ticket_seal(struct stp_tickets *tk, const char *sni,
                    const struct stp_tls_ident *id, uint8_t *name, uint8_t *iv,
                    uint8_t *mac, uint8_t *ticket, int len, int *out_len);
/* Opens TICKET in place; *ID (freed and replaced) becomes the identity it
 * carried, or NULL. Negative: refuse it (a full handshake follows). */
int stp_ticket_open(struct stp_tickets *tk, const char *sni,
                    struct stp_tls_ident **id, const uint8_t *name,
                    const uint8_t *iv, const uint8_t *mac, uint8_t *ticket,
                    int len, int *out_len);

#endif
