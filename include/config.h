/* Configuration: the INI file parsed into plain structs (inih). */
#ifndef STP_CONFIG_H
#define STP_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "log.h"

enum stp_tls_mode {
    STP_TLS_NONE = 0,
    STP_TLS_STARTTLS,
    STP_TLS_IMPLICIT,
    STP_TLS_OPPORTUNISTIC, /* upstreams only: STARTTLS when offered */
};
/* "none", "starttls", "implicit", "opportunistic": as the configuration
 * spells them. */
const char *stp_tls_mode_name(enum stp_tls_mode m);

/* What a listener speaks, with its clients and with its upstream. */
enum stp_protocol {
    STP_PROTO_SMTP = 0,
    STP_PROTO_LMTP,     /* RFC 2033: LHLO, a reply per recipient */
    STP_PROTO_IMAP,     /* RFC 9051, proxy/imap.c */
    STP_PROTO_POP3,     /* RFC 1939, STLS (RFC 2595) */
};

/* TLS protocol versions, in order. */
enum stp_tls_version {
    STP_TLS_V1_0 = 0, STP_TLS_V1_1, STP_TLS_V1_2, STP_TLS_V1_3,
};
/* "1.0" ... "1.3": as the configuration spells them. */
const char *stp_tls_version_name(enum stp_tls_version v);

/* How the upstream learns who the client is. */
enum stp_identity {
    STP_ID_NONE = 0, STP_ID_XCLIENT, STP_ID_PROXY_V1, STP_ID_PROXY_V2,
};

/* Whether a listener's connections start with a PROXY protocol header, and
 * which versions: a mask of STP_PP_V1 and STP_PP_V2 (proxy_header.h). */
enum stp_pp_mode {
    STP_PP_NO = 0, STP_PP_ONLY_V1 = 1, STP_PP_ONLY_V2 = 2, STP_PP_ANY = 3,
};

/* An address block: FAMILY AF_INET or AF_INET6, the first BITS of ADDR. */
struct stp_cidr {
    int family;
    uint8_t addr[16];
    uint8_t bits;
};

/* Which local address an upstream connection comes from. */
enum stp_source {
    STP_SRC_NONE = 0,   /* the kernel's choice */
    STP_SRC_CLIENT,     /* the client's own address (transparent) */
    STP_SRC_ADDRESS,    /* a configured local address */
};

enum stp_verify_client {
    STP_VERIFY_CLIENT_NONE = 0, STP_VERIFY_CLIENT_OPTIONAL,
    STP_VERIFY_CLIENT_REQUIRE,
};

/* TLS parameters a listener and an upstream both have. */
struct stp_tls_params {
    enum stp_tls_version min_version; /* default 1.2 */
    enum stp_tls_version max_version; /* default 1.3 */
    char *ciphers;                    /* NULL: Mozilla intermediate */
    char *groups;                     /* NULL: X25519:P-256:P-384 */
};

/* The lines of a section's TLS keys (0: not set), so an error found when the
 * TLS layer loads the files points at the key at fault. */
struct stp_tls_lines {
    int cert, key, ca;                /* ca: client_ca or ca_file */
    int ciphers, groups, min_version, max_version;
};

/* A certificate chosen by the client's server name (SNI). */
struct stp_sni_cfg {
    char *name;                       /* "mail.example.net", "*.example.org" */
    char *cert, *key;
    int line;
};

/* At most this many entries in an upstream's address list. */
#define STP_MAX_HOP_ADDRS 16

/* One entry of an upstream's address list. */
struct stp_hop_addr {
    char *host;                      /* as written, without [] */
    uint16_t port;
    bool is_name;                    /* a DNS name, resolved per session */
    struct sockaddr_storage addr;    /* !is_name: the address and port */
};

/* How the proxy authenticates to the next hop (RFC 4954), in its own
 * prelude, before the client's session starts. */
enum stp_auth {
    STP_AUTH_NONE = 0, STP_AUTH_PLAIN, STP_AUTH_LOGIN, STP_AUTH_XOAUTH2,
};

struct stp_upstream_cfg {
    char *name;
    char *address_text;              /* as written, for logs */
    struct stp_hop_addr *addrs;      /* address = A, B, ...: tried in order */
    int n_addrs;                     /* 0 with original_dst */
    uint64_t retry_after_ms;         /* default 30 s: a failed entry is
                                        skipped this long (unless all are) */
    enum stp_auth auth;              /* default none */
    char *username;
    char *password_file;             /* plain, login: read at load */
    char *password;                  /* ... its content, no final newline */
    char *token_file;                /* xoauth2: read for each session */
    char *helo_name;                 /* our EHLO; NULL: [proxy] hostname */
    int line_auth;                   /* where auth = is, 0: absent */
    enum stp_tls_mode tls;           /* default none */
    struct stp_tls_params tlsp;
    bool verify;                     /* default yes: chain and name (no
                                        for tls = opportunistic) */
    char *ca_file;                   /* NULL: the system trust store */
    char *server_name;               /* SNI and checked name; NULL: each
                                        entry's host */
    char *cert, *key;                /* client certificate, optional */
    enum stp_identity identity;      /* default none */
    struct stp_tls_lines tls_lines;
    uint64_t timeout_connect_ms;     /* default 30 s */
    uint64_t timeout_reply_ms;       /* default 600 s */
    bool original_dst;               /* address = original-destination:
                                        no ADDRS */
    enum stp_source source;          /* default none */
    struct sockaddr_storage source_addr; /* STP_SRC_ADDRESS, port 0 */
    int line_source;                 /* where source = is, 0: absent */
    int line;                        /* where the section starts */
    int metrics_slot;                /* its name's counters (metrics.c),
                                        set before the workers see it */
};

struct stp_listener_cfg {
    char *name;
    char *listen_text;
    struct sockaddr_storage addr;
    enum stp_protocol protocol;      /* default smtp */
    enum stp_tls_mode tls;           /* default starttls */
    bool require_tls;                /* default yes (no for tls = none) */
    char *cert;                      /* PEM chain file, NULL: self-signed */
    char *key;                       /* PEM key file */
    struct stp_tls_params tlsp;
    struct stp_sni_cfg *sni;         /* more certificates, by server name */
    int n_sni;
    char *client_ca;                 /* CAs for client certificates */
    enum stp_verify_client verify_client; /* default none */
    struct stp_tls_lines tls_lines;
    char *upstream_name;
    struct stp_upstream_cfg *upstream; /* resolved reference */
    uint32_t max_line;               /* default 2048, 512..8192 */
    uint64_t timeout_idle_ms;        /* default 300 s */
    uint64_t timeout_handshake_ms;   /* default 60 s */
    uint64_t timeout_command_ms;     /* default 300 s: one command line */
    uint64_t timeout_data_ms;        /* default 600 s: one message */
    uint32_t max_connections;        /* default 5000 */
    uint32_t max_connections_per_ip; /* default 50 */
    uint32_t max_errors;             /* default 20 */
    enum stp_pp_mode proxy_protocol; /* default no */
    struct stp_cidr *proxy_from;     /* who may send the header */
    int n_proxy_from;
    uint64_t timeout_proxy_header_ms; /* default 5 s */
    struct stp_cidr *allow;          /* allow =: who may connect; n_allow
                                        0: anyone */
    int n_allow;
    int line_allow;
    bool transparent;                /* IP_TRANSPARENT: accept TPROXY'd
                                        connections for any address */
    int line_transparent;            /* where transparent = is */
    int line;
    int metrics_slot;                /* as the upstream's */
};

struct stp_config {
    char *path;
    enum stp_log_level log_level;    /* default info */
    enum stp_log_format log_format;  /* default text; applied as soon as
                                        the file is read */
    int workers;                     /* event-loop threads, 1..256, default
                                        1; 0 is "auto": one per CPU
                                        (uv_available_parallelism()) at
                                        start. A reload keeps the running
                                        number */
    char *hostname;                  /* for 421 texts; default gethostname() */
    uint32_t max_connections;        /* default 10000, all listeners */
    uint64_t drain_timeout_ms;       /* default 30 s */
    char *user, *group;              /* drop privileges to these */
    char *ticket_keys;               /* shared ticket key file (read by
                                        stp_gen_new); line_ticket_keys: where
                                        ticket_keys = is */
    int line_ticket_keys;
    int line_user, line_group;       /* where user = and group = are */
    int line_proxy;                  /* [proxy], 0 without one */
    char *admin_listen;              /* [admin] listen = HOST:PORT (the
                                        metrics and health endpoints), or
                                        NULL: none. Read at start only */
    struct sockaddr_storage admin_addr;
    int line_admin;                  /* [admin], 0 without one */
    struct stp_listener_cfg *listeners;
    int n_listeners;
    struct stp_upstream_cfg *upstreams;
    int n_upstreams;
};

/* Parse FILE into *out. On error returns a negative code and writes
 * "FILE:LINE: message" (no newline) into err. Checks that cert/key files are
 * readable but does not load them (the TLS layer does). */
int stp_config_load(const char *path, struct stp_config *out, char *err,
                    size_t errlen);

/* Same, from a string; NAME is used in messages. For tests and fuzzing. */
int stp_config_parse_string(const char *name, const char *text,
                            struct stp_config *out, char *err, size_t errlen);

void stp_config_free(struct stp_config *cfg);

/* Decimal digits at *s (no sign, blank or "0x"), at most MAX; advances *s
 * past them. 0 or -EINVAL. */
int stp_parse_uint(const char **s, uint64_t max, uint64_t *out);

/* "300", "300s", "5m", "1h", "250ms" -> milliseconds. -EINVAL on bad text. */
int stp_parse_duration(const char *text, uint64_t *ms);

/* "127.0.0.1:25", "[::1]:25", "0.0.0.0:25" -> sockaddr. Numeric only. Port 0
 * is syntax like any other: the keys decide who may use it. */
int stp_parse_hostport(const char *text, struct sockaddr_storage *ss);

/* source = none | client | ADDRESS (a numeric IP, no port). -EINVAL on bad
 * text; *ADDR is set only for STP_SRC_ADDRESS. */
int stp_parse_source(const char *text, enum stp_source *mode,
                     struct sockaddr_storage *addr);

/* "10.0.0.0/8", "2001:db8::/32", "192.0.2.1" (one address) -> a block.
 * Bits past the prefix are cleared. -EINVAL on bad text. */
int stp_parse_cidr(const char *text, struct stp_cidr *out);
/* Is A (an IPv4-mapped IPv6 address counts as IPv4) in one of the N
 * blocks of V? */
bool stp_cidr_match(const struct stp_cidr *v, int n,
                    const struct sockaddr_storage *a);

/* The port of an AF_INET or AF_INET6 address, in host order. */
uint16_t stp_addr_port(const struct sockaddr_storage *ss);
void stp_addr_set_port(struct sockaddr_storage *ss, uint16_t port);

/* The same family, address and port. */
/* Would binding both fail: the same port, and one address covers the other
 * (equal, 0.0.0.0 for IPv4, [::] for both families)? Port 0 never does. */
bool stp_addr_overlaps(const struct sockaddr_storage *a,
                       const struct sockaddr_storage *b);
bool stp_same_addr(const struct sockaddr_storage *a,
                   const struct sockaddr_storage *b);

/* Format an address as "1.2.3.4:25" or "[::1]:25". */
void stp_format_addr(const struct sockaddr *sa, char *buf, size_t len);

#endif
