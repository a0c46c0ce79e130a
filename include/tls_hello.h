/* The client's ClientHello, held until it is whole. TLS lets a client split
 * it over any number of records (down to one byte each); wolfSSL 5.5.4 fails
 * a handshake whose message header is split, and the proxy wants the server
 * name and the offered groups from it anyway. So the server side reads the
 * first flight through this, which hands the ClientHello on in one record,
 * and notes what it said. Pure: no I/O, no wolfSSL. */
#ifndef STP_TLS_HELLO_H
#define STP_TLS_HELLO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A record header and the largest record: a ClientHello that does not fit
 * is handed on as it came. */
#define STP_HELLO_CAP (5 + 16384)
#define STP_HELLO_MAX_GROUPS 32

struct stp_hello {
    uint8_t buf[STP_HELLO_CAP];
    size_t len;           /* bytes received */
    size_t out_len;       /* once decided: bytes of buf to hand on */
    size_t off;           /* of those, handed on */
    bool decided;
    /* What the ClientHello said; nothing when it could not be read. */
    bool parsed;
    bool has_groups;      /* it had a supported_groups extension */
    int n_groups;
    uint16_t groups[STP_HELLO_MAX_GROUPS]; /* those `groups` can name */
    char sni[256];        /* host_name, or "" */
};

/* Where the next input goes and how much fits; 0 once decided. */
uint8_t *stp_hello_room(struct stp_hello *h, size_t *room);
/* N bytes were written at the room; true once decided (the ClientHello is
 * whole, or it never will be readable here and goes on as it came). */
bool stp_hello_add(struct stp_hello *h, size_t n);
/* Copy up to MAX bytes to hand on into DST; 0 when none are left. */
size_t stp_hello_take(struct stp_hello *h, uint8_t *dst, size_t max);

#endif
