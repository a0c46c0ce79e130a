/* The proxy's own dialogue with the upstream before the client's session is
 * relayed: read the greeting, EHLO, STARTTLS (and check that nothing follows
 * the 220), EHLO again, AUTH, XCLIENT. Pure: replies in, actions out. */
#ifndef STP_PRELUDE_H
#define STP_PRELUDE_H

#include <stdbool.h>
#include <stddef.h>

#include "proto.h"
#include "stp.h"

enum stp_up_step {
    STP_UP_GREETING = 0, /* waiting for the upstream's greeting */
    STP_UP_EHLO,         /* our EHLO sent */
    STP_UP_STARTTLS,     /* our STARTTLS sent */
    STP_UP_TLS,          /* handshake under way (the caller's) */
    STP_UP_AUTH,         /* our AUTH sent (and its continuations) */
    STP_UP_XCLIENT,      /* our XCLIENT sent */
    STP_UP_READY,        /* done: the client's session may start */
    STP_UP_FAILED,
    STP_UP_COUNT
};
const char *stp_up_step_name(enum stp_up_step s);
/* Does the prelude's table allow FROM -> TO? */
bool stp_up_step_may(enum stp_up_step from, enum stp_up_step to);

struct stp_up_cfg {
    bool starttls;          /* upstream tls = starttls (or opportunistic) */
    bool opportunistic;     /* with STARTTLS: go on in plaintext when the
                               EHLO reply does not offer it */
    const char *ehlo_name;  /* our EHLO argument */
    bool lmtp;              /* say LHLO, not EHLO */
    const char *xclient;    /* the XCLIENT line, or NULL; must outlive P */
    bool fallback;          /* a refusing greeting is STP_FAIL_UNREACHABLE */
    int auth;               /* enum stp_auth, STP_AUTH_NONE: no login */
    const char *user, *secret; /* must outlive P */
};

struct stp_prelude {
    struct stp_up_cfg cfg;
    const struct stp_up_ops *ops;
    void *ctx;
    enum stp_up_step step;
    bool tls_done;
    bool plaintext;         /* opportunistic, STARTTLS not offered */
    int code;               /* of the reply being read; 0 between replies */
    bool offers_starttls, offers_xclient;
    bool have_caps;         /* an EHLO reply in the current TLS state */
    unsigned offers_auth;   /* 1 << enum stp_auth of each mechanism */
    bool authed;
    int auth_round;         /* continuations answered so far */
    bool auth_challenged;   /* XOAUTH2's error challenge came */
    char challenge[160];    /* ... what it said, for the log */
    size_t greeting_len;
    char greeting[1024];
};

void stp_up_init(struct stp_prelude *p, const struct stp_up_cfg *cfg,
                 const struct stp_up_ops *ops, void *ctx);
/* Upstream bytes; returns how many were consumed. */
size_t stp_up_input(struct stp_prelude *p, const char *buf, size_t n);
/* The caller's TLS handshake completed. */
void stp_up_tls_done(struct stp_prelude *p);

#endif
