/* A session's front door: who the client is (the socket's peer, or the
 * source in a load balancer's PROXY header), the allow list for such
 * headers, the session's place in the shared tallies and the connection
 * limits. The relay owns the connection and the state machine and acts on
 * the verdicts; this knows the listener and the tallies. */
#ifndef STP_FRONT_H
#define STP_FRONT_H

#include <stdbool.h>
#include <stdint.h>

#include "io.h"
#include "listener.h"

struct stp_front {
    uint64_t id;                      /* the session's, from the tallies */
    struct stp_server *srv;
    struct stp_listener *lst;
    const struct stp_listener_cfg *lcfg;
    const struct stp_gen *gen;
    struct stp_conn *conn;            /* the client's (the relay's) */
    struct sockaddr_storage addr;     /* the client: a header's source */
    struct sockaddr_storage *dst;     /* what it reached, per a header;
                                         NULL without one (owned) */
    bool header;                      /* a PROXY header was read */
    bool counted, ip_counted;         /* in the tallies; ADDR per IP too */
    struct stp_counts counts;         /* when it was counted in */
    char peer[64];                    /* ADDR, formatted */
};

enum stp_front_verdict {
    STP_FRONT_MORE,    /* a PROXY header is still being read */
    STP_FRONT_HEADER,  /* read a PROXY header before anything else */
    STP_FRONT_BEGIN,   /* the client is known: the session may begin */
    STP_FRONT_REFUSE,  /* close without a byte (logged; *WHY says why) */
};

/* The connection was accepted: its peer, the tallies, the allow list. */
enum stp_front_verdict stp_front_open(struct stp_front *f,
                                      enum stp_close_reason *why);
/* What the client sent so far (EOF: nothing more will come), offered to
 * the header parser; on BEGIN the header is consumed. */
enum stp_front_verdict stp_front_header(struct stp_front *f, bool eof,
                                        enum stp_close_reason *why);
/* The log line of a refusal while reading a header. */
void stp_front_refused(const struct stp_front *f, enum stp_close_reason r,
                       const char *detail);
/* Not in the allow list, or over one of the limits? The reason (logged),
 * or STP_CLOSE_NONE. */
enum stp_close_reason stp_front_limit(const struct stp_front *f);
/* Out of the tallies (from the session's last close callback). */
void stp_front_close(struct stp_front *f);

#endif
