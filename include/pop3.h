/* The POP3 engine of one proxied session (RFC 1939, 2449 CAPA/PIPELINING,
 * 2595 STLS, 5034 AUTH): client command policy, the queue of responses the
 * upstream owes, CAPA editing, multi-line framing. Pure: bytes in, actions
 * out (struct stp_proto_actions); no sockets, no libuv, no wolfSSL.
 *
 * With require_tls on a STARTTLS listener the proxy alone speaks before TLS:
 * its own greeting (no APOP timestamp), its own CAPA (STLS only), -ERR to
 * everything else; the upstream's greeting is consumed and nothing reaches
 * the upstream before TLS. After TLS (or on an implicit listener) commands
 * are forwarded in canonical form and responses relayed; multi-line bodies
 * pass byte for byte (dot-stuffing untouched), only their end is tracked. */
#ifndef STP_POP3_H
#define STP_POP3_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "close.h"
#include "proto.h"
#include "stp.h"

/* A status line or a CAPA line from the upstream, with its CRLF. RFC 2449
 * allows 512 octets; servers' greetings and CAPA lines run longer. */
#define STP_POP3_MAX_REPLY_LINE 4096
#define STP_POP3_MAX_PENDING 64

enum stp_pop3_phase {
    STP_P3_GREETING = 0, /* waiting for the upstream's greeting */
    STP_P3_COMMAND,      /* reading client commands */
    STP_P3_SASL,         /* the client's next line is a SASL response */
    STP_P3_STLS,         /* +OK to STLS sent; waiting for the handshake */
    STP_P3_QUIT,         /* QUIT forwarded; client input ignored */
    STP_P3_CLOSED,       /* close requested; nothing more happens */
    STP_P3_COUNT
};
const char *stp_pop3_phase_name(enum stp_pop3_phase ph);
bool stp_pop3_phase_may(enum stp_pop3_phase from, enum stp_pop3_phase to);

/* What each queued upstream response answers. */
enum stp_p3_pend {
    STP_P3P_GREETING = 0,
    STP_P3P_SINGLE,   /* one status line */
    STP_P3P_MULTI,    /* a body follows a +OK (RETR, TOP, LIST, UIDL) */
    STP_P3P_CAPA,     /* a body follows, edited line by line */
    STP_P3P_LOGIN,    /* PASS, APOP: +OK is the TRANSACTION state */
    STP_P3P_AUTH,     /* AUTH mech: "+ challenge", +OK or -ERR */
    STP_P3P_AUTH_LIST,/* AUTH alone: a mechanism list follows a +OK */
    STP_P3P_QUIT,
};

/* The commands the summary counts. */
enum stp_p3_stat {
    STP_P3S_CAPA = 0, STP_P3S_STLS, STP_P3S_USER, STP_P3S_PASS, STP_P3S_APOP,
    STP_P3S_AUTH, STP_P3S_STAT, STP_P3S_LIST, STP_P3S_UIDL, STP_P3S_RETR,
    STP_P3S_TOP, STP_P3S_DELE, STP_P3S_RSET, STP_P3S_NOOP, STP_P3S_QUIT,
    STP_P3S_OTHER, STP_P3S_COUNT
};

/* Where the body scanner stands: only the start of a line matters, for the
 * terminating "." line; everything else passes as it came. */
enum stp_p3_body {
    STP_P3B_BOL = 0, /* at the start of a line */
    STP_P3B_TEXT,    /* inside a line */
    STP_P3B_DOT,     /* "." at the start of a line */
    STP_P3B_DOT_CR,  /* ".\r" at the start of a line */
};

struct stp_pop3 {
    struct stp_proto_cfg cfg;
    const struct stp_proto_actions *ops;
    void *ctx;
    enum stp_pop3_phase phase;
    bool tls;          /* the client leg is TLS */
    bool local;        /* the proxy alone speaks (require_tls, before TLS) */
    bool quiet;        /* TLS began, no command forwarded since: what the
                          upstream sends was sent before it (dropped) */
    bool authed;       /* a login succeeded: TRANSACTION state */
    bool waiting;      /* an AUTH step is answered before the next line */
    bool partial;      /* the client is part-way through a line */
    bool skipping;     /* dropping the rest of an over-long client line */
    bool in_body;      /* a multi-line body is being relayed */
    bool body_capa;    /* ... it is CAPA's (or AUTH's list), line by line */
    bool replied_fail; /* the failure's -ERR was said */
    enum stp_p3_body body;
    uint8_t pend[STP_POP3_MAX_PENDING];
    uint8_t pend_stat[STP_POP3_MAX_PENDING];
    unsigned pend_head, pend_count;
    uint32_t errors;   /* consecutive -ERR */
    uint32_t sent[STP_P3S_COUNT], accepted[STP_P3S_COUNT];
    uint64_t body_bytes; /* relayed in multi-line bodies */
};

void stp_pop3_init(struct stp_pop3 *s, const struct stp_proto_cfg *cfg,
                   const struct stp_proto_actions *ops, void *ctx);
size_t stp_pop3_client_input(struct stp_pop3 *s, const char *p, size_t n);
long stp_pop3_upstream_input(struct stp_pop3 *s, const char *p, size_t n);
void stp_pop3_tls_started(struct stp_pop3 *s);
void stp_pop3_fail(struct stp_pop3 *s, enum stp_fail why);
void stp_pop3_status(const struct stp_pop3 *s, struct stp_proto_status *st);
enum stp_eof_verdict stp_pop3_client_eof(const struct stp_pop3 *s,
                                         size_t buffered);
void stp_pop3_summary(const struct stp_pop3 *s, char *buf, size_t cap);

/* CAPA editing, one capability line (no terminator) at a time: false to
 * drop it (STLS: the proxy offers its own or none); a SASL line loses its
 * -PLUS mechanisms (channel binding cannot cross a TLS-terminating proxy),
 * rewritten into OUT (*outlen), or dropped when none is left. */
bool stp_pop3_capa_line(const char *line, size_t n, char *out, size_t cap,
                        size_t *outlen);

extern const struct stp_proto stp_proto_pop3;

#endif
