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
};

struct stp_upstream_cfg {
    char *name;
    char *address_text;              /* as written, for logs */
    struct sockaddr_storage addr;    /* resolved numerically */
    enum stp_tls_mode tls;           /* only STP_TLS_NONE for now */
    uint64_t timeout_connect_ms;     /* default 30 s */
    uint64_t timeout_reply_ms;       /* default 600 s */
    int line;                        /* where the section starts */
};

struct stp_listener_cfg {
    char *name;
    char *listen_text;
    struct sockaddr_storage addr;
    enum stp_tls_mode tls;           /* default starttls */
    bool require_tls;                /* default yes (no for tls = none) */
    char *cert;                      /* PEM chain file, NULL: self-signed */
    char *key;                       /* PEM key file */
    char *upstream_name;
    struct stp_upstream_cfg *upstream; /* resolved reference */
    uint32_t max_line;               /* default 2048, 512..8192 */
    uint64_t timeout_idle_ms;        /* default 300 s */
    int line;
};

struct stp_config {
    char *path;
    enum stp_log_level log_level;    /* default info */
    int workers;                     /* default 1; only 1 supported yet */
    char *hostname;                  /* for 421 texts; default gethostname() */
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

/* "127.0.0.1:25", "[::1]:25", "0.0.0.0:25" -> sockaddr. Numeric only. */
int stp_parse_hostport(const char *text, struct sockaddr_storage *ss);

/* Format an address as "1.2.3.4:25" or "[::1]:25". */
void stp_format_addr(const struct sockaddr *sa, char *buf, size_t len);

#endif
