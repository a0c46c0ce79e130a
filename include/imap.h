/* The IMAP engine behind the relay's seam (proto.h): the proxy alone speaks
 * before TLS, then relays commands and responses, counting literals byte for
 * byte and editing capabilities. Pure: no sockets, no libuv, no wolfSSL. */
#ifndef STP_IMAP_H
#define STP_IMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

enum stp_imap_phase {
    STP_IM_GREETING = 0, /* waiting for the upstream's greeting */
    STP_IM_COMMAND,      /* reading a command line (or its continuation) */
    STP_IM_LITERAL,      /* client literal octets, forwarded */
    STP_IM_WAIT_CONT,    /* the upstream's "+" or tagged reply is awaited */
    STP_IM_CONT_LINE,    /* one client line that is no command: a SASL
                            response, or IDLE's DONE */
    STP_IM_STARTTLS,     /* OK sent; waiting for the handshake */
    STP_IM_CLOSED,       /* close requested; nothing more happens */
    STP_IM_COUNT
};
const char *stp_imap_phase_name(enum stp_imap_phase ph);

/* What a "+" from the upstream lets the client send. */
enum stp_imap_after { STP_IMA_LITERAL, STP_IMA_SASL, STP_IMA_IDLE };

/* The commands the summary counts. */
enum stp_imap_stat {
    STP_IS_CAPABILITY = 0, STP_IS_STARTTLS, STP_IS_LOGIN, STP_IS_AUTHENTICATE,
    STP_IS_SELECT, STP_IS_EXAMINE, STP_IS_FETCH, STP_IS_STORE, STP_IS_APPEND,
    STP_IS_IDLE, STP_IS_LOGOUT, STP_IS_OTHER, STP_IS_COUNT,
};

#define STP_IMAP_MAX_TAG 64
#define STP_IMAP_MAX_PENDING 128
/* An upstream response line (between literals) is held whole to be read;
 * longer is a protocol error. */
#define STP_IMAP_MAX_UP_LINE (32 * 1024)

struct stp_imap {
    struct stp_proto_cfg cfg;
    const struct stp_proto_actions *ops;
    void *ctx;
    enum stp_imap_phase phase;
    bool tls;            /* client leg encrypted */
    bool cont;           /* the next client line continues a command */
    bool partial;        /* a client line has begun but not ended */
    bool plain_state;    /* require_tls = no: a command that changes the
                            upstream's state went in clear, so STARTTLS
                            would carry it into TLS: refused */
    bool bye_sent;       /* the client already got a "* BYE" */
    bool in_idle;        /* IDLE accepted, DONE not yet sent */
    bool quiet;          /* TLS began, no command forwarded since: what the
                            upstream sends was sent before it (dropped) */
    bool dropping;       /* ... a response of it, up to its end */
    bool logout;         /* LOGOUT forwarded: its tag closes */
    bool in_append;      /* the command under way is an APPEND */
    bool held;           /* a "{n+}" went upstream as "{n}": the client's
                            octets wait for the upstream's "+" */
    bool discard;        /* the upstream refused the command: the client's
                            rest of it (octets, lines) is dropped */
    uint8_t after;       /* enum stp_imap_after, in WAIT_CONT */
    uint8_t tag_len, logout_len;
    char tag[STP_IMAP_MAX_TAG];        /* the command awaiting "+" */
    char logout_tag[STP_IMAP_MAX_TAG];
    uint64_t lit_left;   /* client literal octets to forward */
    uint64_t lit_next;   /* ... of the literal a "+" will open */
    uint32_t pending;    /* tagged replies the upstream owes */
    /* Upstream framing: inside a literal, or after one (the response line
     * goes on): the client is mid-response, nothing of ours may go in. */
    uint64_t up_lit;
    bool up_cont;
    uint32_t errors;     /* consecutive refusals by the proxy */
    uint32_t sent[STP_IS_COUNT];
};

void stp_imap_init(struct stp_imap *s, const struct stp_proto_cfg *cfg,
                   const struct stp_proto_actions *ops, void *ctx);
size_t stp_imap_client_input(struct stp_imap *s, const char *p, size_t n);
long stp_imap_upstream_input(struct stp_imap *s, const char *p, size_t n);
void stp_imap_tls_started(struct stp_imap *s);
void stp_imap_fail(struct stp_imap *s, enum stp_fail why);
void stp_imap_status(const struct stp_imap *s, struct stp_proto_status *st);
enum stp_eof_verdict stp_imap_client_eof(const struct stp_imap *s,
                                         size_t buffered);
void stp_imap_summary(const struct stp_imap *s, char *buf, size_t cap);

/* Edit a capability list (the text after "CAPABILITY ", without "]" or
 * CRLF): drop STARTTLS, LOGINDISABLED, COMPRESS=*, AUTH=*-PLUS; append
 * STARTTLS when asked. Returns the length written, or -ENOSPC. */
int stp_imap_cap_edit(const char *in, size_t n, char *out, size_t cap,
                      bool add_starttls);

/* The literal announced at the end of a client line (no terminator):
 * 0: none; 1: *N octets follow, *NONSYNC for "{n+}", *BINARY for "~{n}";
 * -1: something the proxy and the upstream could read differently (refuse
 * the line). */
int stp_imap_line_literal(const char *l, size_t len, uint64_t *n,
                          bool *nonsync, bool *binary);

extern const struct stp_proto stp_proto_imap;

#endif
