/* Session-ticket keys shared by processes: [proxy] ticket_keys = FILE, one
 * key a line, 80 bytes in base64; the first seals, every one opens. */
#ifndef STP_TICKET_KEYS_H
#define STP_TICKET_KEYS_H

#include <stddef.h>
#include <stdint.h>

/* The 80 bytes of a line: a 16-byte name (wolfSSL's ticket key_name, so a
 * ticket says which key sealed it), a 32-byte ChaCha20-Poly1305 key, and 32
 * bytes not used (the layout of nginx's and HAProxy's 80-byte files, which
 * keep an HMAC key there; room for a future cipher). */
enum {
    STP_TICKET_KEY_LEN = 80,
    STP_TICKET_KEY_NAME = 16,
    STP_TICKET_KEY_AEAD = 32,
    STP_TICKET_KEYS_MAX = 64, /* lines in one file */
};

struct stp_ticket_key {
    uint8_t name[STP_TICKET_KEY_NAME];
    uint8_t aead[STP_TICKET_KEY_AEAD];
};

/* Read-only once loaded: the workers share it without a lock. */
struct stp_ticket_keys {
    int n;
    struct stp_ticket_key k[STP_TICKET_KEYS_MAX];
};

/* Parse the LEN bytes of TEXT, named FILE in messages. On error returns
 * -EINVAL and writes "FILE:LINE: why" into ERR, never a byte of a key. */
int stp_ticket_keys_parse(const char *file, const char *text, size_t len,
                          struct stp_ticket_keys **out, char *err,
                          size_t errlen);

/* Read PATH and parse it. A file that others than its owner and group may
 * read or write is loaded with a warning logged. Errors: -EINVAL as for
 * parse; another negative errno with "PATH: reason" when it cannot be
 * read. */
int stp_ticket_keys_load(const char *path, struct stp_ticket_keys **out,
                         char *err, size_t errlen);

/* Zero the keys, then free them; NULL is fine. */
void stp_ticket_keys_free(struct stp_ticket_keys *k);

#endif
