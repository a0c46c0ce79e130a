/* Receiving the PROXY protocol (HAProxy's proxy-protocol.txt, v1 text and
 * v2 binary): a load balancer in front of a listener says who its client
 * is in a header before anything else. A pure parser: no I/O, fed the
 * bytes buffered so far, as often as more arrive. */
#ifndef STP_PROXY_HEADER_H
#define STP_PROXY_HEADER_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

/* Versions a listener accepts (a bitmask; `any` is both). */
#define STP_PP_V1 1u
#define STP_PP_V2 2u

/* v1: the spec's bound, CRLF included. */
#define STP_PP_V1_MAX 107
/* v2: our bound on the whole header (16 fixed bytes, addresses, TLVs). The
 * spec allows 16 + 65535; what load balancers send (addresses, TLS and
 * cloud TLVs) is a few hundred bytes at most. */
#define STP_PP_V2_MAX 4096

struct stp_pp_result {
    unsigned version;   /* 1 or 2 */
    /* v1 UNKNOWN, v2 LOCAL (health checks) or a v2 family without IP
     * addresses (UNSPEC, UNIX): the socket's own addresses stand. */
    bool local;
    struct sockaddr_storage src, dst; /* the client, what it reached */
    size_t len;         /* bytes the header took */
    const char *reason; /* why it was refused: static text */
};

/* Parse the header at the start of P (N bytes buffered) for VERSIONS.
 * Returns 0: a valid prefix, more bytes needed; > 0: a complete header of
 * that many bytes (also OUT->len); < 0: not a valid header (-EPROTO, or
 * -EMSGSIZE when over the bounds), OUT->reason says why. Errors are found
 * as early as the bytes allow, never by waiting for more. */
int stp_pp_parse(const char *p, size_t n, unsigned versions,
                 struct stp_pp_result *out);

#endif
