/* What each configuration key means: value parsers, the key table, and the
 * checks that need a whole section. The INI mechanics are in config.c. */
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <strings.h>

#include "config_parser.h"
#include "stp.h"

static bool same_addr(const struct sockaddr_storage *a,
                      const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port &&
               x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return x->sin6_port == y->sin6_port &&
           memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
}

/* ---- values ---------------------------------------------------------- */

static int bad_value(struct parser *p, const struct key_def *k,
                     const char *value, const char *expected)
{
    return stp_cfg_fail(p, p->line, "invalid value '%s' for %s (expected %s)", value,
                k->name, expected);
}

static int set_string(struct parser *p, const struct key_def *k, void *obj,
                      const char *value)
{
    char **field = FIELD(obj, k->off, char *);
    if (*value == '\0')
        return stp_cfg_fail(p, p->line, "empty value for %s", k->name);
    char *copy = strdup(value);
    if (copy == NULL)
        return stp_cfg_oom(p);
    free(*field);
    *field = copy;
    return 0;
}

/* Goes into SMTP reply texts: no blanks or control characters. */
static int set_hostname(struct parser *p, const struct key_def *k, void *obj,
                        const char *value)
{
    size_t n = strlen(value);
    if (n == 0 || n > 255 || strspn(value, "abcdefghijklmnopqrstuvwxyz"
                                           "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                           "0123456789-._") != n)
        return bad_value(p, k, value, "a host name");
    return set_string(p, k, obj, value);
}

static int set_log_level(struct parser *p, const struct key_def *k,
                         void *obj, const char *value)
{
    if (stp_log_parse_level(value, FIELD(obj, k->off, enum stp_log_level)) < 0)
        return bad_value(p, k, value, "error, warn, info or debug");
    return 0;
}

static int set_workers(struct parser *p, const struct key_def *k, void *obj,
                       const char *value)
{
    const char *s = value;
    uint64_t n;
    if (strcasecmp(value, "auto") == 0) {
        n = 1; /* one worker until multi-worker support lands */
    } else if (stp_parse_uint(&s, INT32_MAX, &n) < 0 || *s != '\0' || n == 0) {
        return bad_value(p, k, value, "a positive number or auto");
    } else if (n > 1) {
        return stp_cfg_fail(p, p->line, "workers > 1 is not supported yet");
    }
    *FIELD(obj, k->off, int) = (int)n;
    return 0;
}

static int set_addr(struct parser *p, const struct key_def *k, void *obj,
                    const char *value)
{
    if (stp_parse_hostport(value, FIELD(obj, k->off2, struct sockaddr_storage)))
        return bad_value(p, k, value,
                         "a numeric HOST:PORT such as 127.0.0.1:25 or [::1]:25");
    return set_string(p, k, obj, value);
}

static int parse_tls(struct parser *p, const struct key_def *k,
                     const char *value, enum stp_tls_mode *mode)
{
    static const char *const names[] = {
        [STP_TLS_NONE] = "none",
        [STP_TLS_STARTTLS] = "starttls",
        [STP_TLS_IMPLICIT] = "implicit",
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(names); i++) {
        if (strcasecmp(value, names[i]) == 0) {
            *mode = (enum stp_tls_mode)i;
            return 0;
        }
    }
    return bad_value(p, k, value, "starttls, implicit or none");
}

static int set_tls(struct parser *p, const struct key_def *k, void *obj,
                   const char *value)
{
    return parse_tls(p, k, value, FIELD(obj, k->off, enum stp_tls_mode));
}

static int set_upstream_tls(struct parser *p, const struct key_def *k,
                            void *obj, const char *value)
{
    enum stp_tls_mode mode;
    int rc = parse_tls(p, k, value, &mode);
    if (rc < 0)
        return rc;
    if (mode != STP_TLS_NONE)
        return stp_cfg_fail(p, p->line, "upstream TLS is not supported yet");
    *FIELD(obj, k->off, enum stp_tls_mode) = mode;
    return 0;
}

static int set_bool(struct parser *p, const struct key_def *k, void *obj,
                    const char *value)
{
    static const char *const yes[] = {"yes", "true", "on", "1"};
    static const char *const no[] = {"no", "false", "off", "0"};
    for (size_t i = 0; i < STP_ARRAY_LEN(yes); i++) {
        if (strcasecmp(value, yes[i]) == 0 || strcasecmp(value, no[i]) == 0) {
            *FIELD(obj, k->off, bool) = strcasecmp(value, yes[i]) == 0;
            return 0;
        }
    }
    return bad_value(p, k, value, "yes or no");
}

static int set_max_line(struct parser *p, const struct key_def *k, void *obj,
                        const char *value)
{
    const char *s = value;
    uint64_t n;
    if (stp_parse_uint(&s, UINT32_MAX, &n) < 0 || *s != '\0' ||
        n < STP_MAX_LINE_MIN || n > STP_MAX_LINE_MAX)
        return bad_value(p, k, value, "512..8192");
    *FIELD(obj, k->off, uint32_t) = (uint32_t)n;
    return 0;
}

static int set_duration(struct parser *p, const struct key_def *k, void *obj,
                        const char *value)
{
    uint64_t ms;
    if (stp_parse_duration(value, &ms) < 0 || ms == 0)
        return bad_value(p, k, value,
                         "a duration greater than 0 like 300s, 5m, 1h or 250ms");
    *FIELD(obj, k->off, uint64_t) = ms;
    return 0;
}

#define PRX(f) offsetof(struct stp_config, f)
#define LST(f) offsetof(struct stp_listener_cfg, f)
#define UPS(f) offsetof(struct stp_upstream_cfg, f)

const struct key_def stp_cfg_keys[K_COUNT] = {
    [K_LOG_LEVEL] = {SECT_PROXY, "log_level", set_log_level, PRX(log_level), 0},
    [K_WORKERS] = {SECT_PROXY, "workers", set_workers, PRX(workers), 0},
    [K_HOSTNAME] = {SECT_PROXY, "hostname", set_hostname, PRX(hostname), 0},
    [K_LISTEN] = {SECT_LISTENER, "listen", set_addr, LST(listen_text), LST(addr)},
    [K_TLS] = {SECT_LISTENER, "tls", set_tls, LST(tls), 0},
    [K_REQUIRE_TLS] = {SECT_LISTENER, "require_tls", set_bool, LST(require_tls), 0},
    [K_CERT] = {SECT_LISTENER, "cert", set_string, LST(cert), 0},
    [K_KEY] = {SECT_LISTENER, "key", set_string, LST(key), 0},
    [K_UPSTREAM] = {SECT_LISTENER, "upstream", set_string, LST(upstream_name), 0},
    [K_MAX_LINE] = {SECT_LISTENER, "max_line", set_max_line, LST(max_line), 0},
    [K_TIMEOUT_IDLE] = {SECT_LISTENER, "timeout_idle", set_duration,
                        LST(timeout_idle_ms), 0},
    [K_ADDRESS] = {SECT_UPSTREAM, "address", set_addr, UPS(address_text), UPS(addr)},
    [K_UPSTREAM_TLS] = {SECT_UPSTREAM, "tls", set_upstream_tls, UPS(tls), 0},
    [K_TIMEOUT_CONNECT] = {SECT_UPSTREAM, "timeout_connect", set_duration,
                           UPS(timeout_connect_ms), 0},
    [K_TIMEOUT_REPLY] = {SECT_UPSTREAM, "timeout_reply", set_duration,
                         UPS(timeout_reply_ms), 0},
};

int stp_cfg_end_listener(struct parser *p, int i)
{
    struct stp_listener_cfg *l = &p->cfg->listeners[i];
    const int *kl = p->lst_state[i].key_line;

    if (l->listen_text == NULL)
        return stp_cfg_fail(p, l->line, "listener '%s' has no listen address", l->name);
    if (l->upstream_name == NULL)
        return stp_cfg_fail(p, l->line, "listener '%s' has no upstream", l->name);
    if (l->cert != NULL && l->key == NULL)
        return stp_cfg_fail(p, kl[K_CERT], "cert without key");
    if (l->key != NULL && l->cert == NULL)
        return stp_cfg_fail(p, kl[K_KEY], "key without cert");
    if (l->cert != NULL && (stp_cfg_check_file(p, "cert", l->cert, kl[K_CERT]) < 0 ||
                            stp_cfg_check_file(p, "key", l->key, kl[K_KEY]) < 0))
        return p->rc;
    if (l->tls == STP_TLS_NONE) {
        if (kl[K_REQUIRE_TLS] && l->require_tls)
            return stp_cfg_fail(p, kl[K_REQUIRE_TLS],
                        "require_tls = yes needs tls = starttls or implicit");
        l->require_tls = false;
    }
    for (int j = 0; j < i; j++) {
        if (same_addr(&l->addr, &p->cfg->listeners[j].addr))
            return stp_cfg_fail(p, kl[K_LISTEN],
                        "listener '%s' uses the listen address of listener '%s'",
                        l->name, p->cfg->listeners[j].name);
    }
    return 0;
}

int stp_cfg_end_upstream(struct parser *p, int i)
{
    struct stp_upstream_cfg *u = &p->cfg->upstreams[i];
    if (u->address_text == NULL)
        return stp_cfg_fail(p, u->line, "upstream '%s' has no address", u->name);
    return 0;
}
