/* Internals shared by the INI reader (config.c), the key definitions
 * (config_keys.c) and the value parsers (values.c). Not part of any other
 * module's interface. */
#ifndef STP_CONFIG_PARSER_H
#define STP_CONFIG_PARSER_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

#include "config.h"

#define CFG_DEFAULT_MAX_LINE 2048
/* The longest line of the file, blanks around it aside. inih's buffer is
 * fixed when it is built (Debian's: 200 bytes); longer lines are split by
 * our reader itself (see read_line in config.c). */
#define CFG_MAX_LINE 4096
#define CFG_DEFAULT_IDLE_MS (300 * 1000)
#define CFG_DEFAULT_CONNECT_MS (30 * 1000)
/* RFC 5321 4.5.3.2.6: a client waits 10 minutes for the reply to the end of
 * data; giving up sooner invites duplicate deliveries. */
#define CFG_DEFAULT_REPLY_MS (600 * 1000)
/* RFC 5321 4.5.3.2: 5 minutes per command, 10 for a whole message (its
 * data blocks get 3 each; we bound the message instead). */
#define CFG_DEFAULT_COMMAND_MS (300 * 1000)
#define CFG_DEFAULT_DATA_MS (600 * 1000)
#define CFG_DEFAULT_HANDSHAKE_MS (60 * 1000)
/* The spec asks for at least 3 s (a TCP retransmit); a load balancer sends
 * its header at once. */
#define CFG_DEFAULT_PROXY_HEADER_MS (5 * 1000)
#define CFG_DEFAULT_PROXY_CONN 10000
#define CFG_DEFAULT_LISTENER_CONN 5000
#define CFG_DEFAULT_CONN_PER_IP 50
#define CFG_DEFAULT_MAX_ERRORS 20
#define CFG_DEFAULT_DRAIN_MS (30 * 1000)
/* How long a next hop that failed is passed over (for the entries after
 * it) before it is tried again. */
#define CFG_DEFAULT_RETRY_AFTER_MS (30 * 1000)
/* address = A, B, ...: each failed entry costs up to timeout_connect, so a
 * longer list only delays the client's 421. */
#define CFG_MAX_ADDRS STP_MAX_HOP_ADDRS

enum sect_kind { SECT_NONE, SECT_PROXY, SECT_LISTENER, SECT_UPSTREAM,
                 SECT_ADMIN };

/* One id per key; also indexes key_line[] to find duplicates and to report
 * checks done at the end of a section at the line of the key concerned. */
enum key_id {
    K_LOG_LEVEL,
    K_LOG_FORMAT,
    K_WORKERS,
    K_HOSTNAME,
    K_LISTEN,
    K_TLS,
    K_REQUIRE_TLS,
    K_CERT,
    K_KEY,
    K_UPSTREAM,
    K_MAX_LINE,
    K_TIMEOUT_IDLE,
    K_ADDRESS,
    K_UPSTREAM_TLS,
    K_TIMEOUT_CONNECT,
    K_TIMEOUT_REPLY,
    K_MIN_VERSION,
    K_MAX_VERSION,
    K_CIPHERS,
    K_GROUPS,
    K_CLIENT_CA,
    K_VERIFY_CLIENT,
    K_UP_MIN_VERSION,
    K_UP_MAX_VERSION,
    K_UP_CIPHERS,
    K_UP_GROUPS,
    K_UP_VERIFY,
    K_UP_CA_FILE,
    K_UP_SERVER_NAME,
    K_UP_CERT,
    K_UP_KEY,
    K_UP_IDENTITY,
    K_PROXY_MAX_CONN,
    K_DRAIN_TIMEOUT,
    K_USER,
    K_GROUP,
    K_MAX_CONN,
    K_MAX_CONN_IP,
    K_MAX_ERRORS,
    K_TIMEOUT_HANDSHAKE,
    K_TIMEOUT_COMMAND,
    K_TIMEOUT_DATA,
    K_PROTOCOL,
    K_PROXY_PROTOCOL,
    K_PROXY_FROM,
    K_TIMEOUT_PROXY_HEADER,
    K_TRANSPARENT,
    K_UP_SOURCE,
    K_UP_RETRY_AFTER,
    K_UP_AUTH,
    K_UP_USERNAME,
    K_UP_PASSWORD_FILE,
    K_UP_TOKEN_FILE,
    K_UP_HELO_NAME,
    K_ALLOW,
    K_TICKET_KEYS,
    K_ADMIN_LISTEN,
    K_COUNT,
};

struct sect_state {
    int key_line[K_COUNT]; /* 0: key absent */
};

struct parser {
    const char *file;
    const char *pos, *end; /* text not yet handed to inih */
    int line;              /* line last handed to inih */
    char *long_line;       /* a line too long for inih, CFG_MAX_LINE + 1 */
    bool want_key;         /* that line must reach on_key(), else bad syntax */
    struct stp_config *cfg;
    enum sect_kind sect;
    int idx;               /* current listener / upstream */
    struct sect_state proxy;
    int proxy_line;
    struct sect_state admin;
    struct sect_state *lst_state, *up_state; /* parallel to cfg arrays */
    char *err;
    size_t errlen;
    int rc;
};

struct key_def;
typedef int (*key_setter)(struct parser *p, const struct key_def *k,
                          void *obj, const char *value);

struct key_def {
    enum sect_kind sect;
    const char *name;
    key_setter set;
    size_t off;  /* field in the section's struct */
    size_t off2; /* second field: an address's sockaddr, a list's count */
    const char *const *names; /* set_enum: the value names, by number */
    const char *expected;     /* set_enum: for the error message */
};

#define FIELD(obj, off, type) ((type *)(void *)((char *)(obj) + (off)))

extern const struct key_def stp_cfg_keys[K_COUNT];

/* Record the first error as "FILE:LINE: message"; returns the error code. */
__attribute__((format(printf, 3, 4)))
int stp_cfg_fail(struct parser *p, int line, const char *fmt, ...);
__attribute__((format(printf, 4, 5)))
int stp_cfg_fail_rc(struct parser *p, int rc, int line, const char *fmt, ...);
int stp_cfg_oom(struct parser *p);
int stp_cfg_check_file(struct parser *p, const char *what, const char *path,
                       int line);
/* A key no table entry names (sni.NAME); -ENOENT when it is unknown. */
int stp_cfg_dynamic_key(struct parser *p, const char *name, const char *value);
/* Checks once a section is complete. */
int stp_cfg_end_listener(struct parser *p, int i);
int stp_cfg_end_upstream(struct parser *p, int i);
/* Checks of listener I against its upstream, once references are resolved. */
int stp_cfg_check_link(struct parser *p, int i);

/* One entry of an upstream's address list: "192.0.2.1:25", "[2001:db8::1]:25"
 * or "mx.example.net:25" (a DNS name, not resolved here), LEN bytes at TEXT.
 * The port is required, 1..65535. Fills OUT, OUT->host allocated; -EINVAL
 * on bad text, -ENOMEM. */
int stp_parse_hop(const char *text, size_t len, struct stp_hop_addr *out);
/* Is TEXT a DNS host name: letters, digits and '-', labels of 1..63 without
 * a '-' at either end, 253 characters at most, and nothing an IPv4 parser
 * would take as an address? */
bool stp_valid_dns_name(const char *text);

#endif
