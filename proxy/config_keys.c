/* What each configuration key means: value parsers, the key table, and the
 * checks that need a whole section. The INI mechanics are in config.c. */
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stddef.h>
#include <string.h>
#include <strings.h>

#include "config_parser.h"
#include "proxy_header.h"
#include "secret.h"
#include "stp.h"

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
        n = 0; /* one per CPU, decided at start */
    } else if (stp_parse_uint(&s, 256, &n) < 0 || *s != '\0' || n == 0) {
        return bad_value(p, k, value, "a number from 1 to 256 or auto");
    }
    *FIELD(obj, k->off, int) = (int)n;
    return 0;
}

/* A listener's address; port 0 lets the kernel pick one. */
static int set_addr(struct parser *p, const struct key_def *k, void *obj,
                    const char *value)
{
    struct sockaddr_storage *ss = FIELD(obj, k->off2, struct sockaddr_storage);
    if (stp_parse_hostport(value, ss) < 0)
        return bad_value(p, k, value,
                         "a numeric HOST:PORT such as 127.0.0.1:25 or [::1]:25");
    return set_string(p, k, obj, value);
}

static bool same_hop(const struct stp_hop_addr *a, const struct stp_hop_addr *b)
{
    if (a->is_name != b->is_name)
        return false;
    if (!a->is_name)
        return stp_same_addr(&a->addr, &b->addr);
    return a->port == b->port && strcasecmp(a->host, b->host) == 0;
}

/* The LEN bytes at S, one entry of address =, blanks around it allowed. */
static int add_hop(struct parser *p, const struct key_def *k,
                   struct stp_upstream_cfg *u, const char *s, size_t len)
{
    while (len > 0 && (*s == ' ' || *s == '\t')) {
        s++;
        len--;
    }
    while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t'))
        len--;
    int n = (int)STP_MIN(len, 300); /* for messages */
    if (len == 0)
        return stp_cfg_fail(p, p->line, "empty entry in %s (two ',' in a row "
                                        "or one at an end)", k->name);
    if (len == strlen("original-destination") &&
        strncasecmp(s, "original-destination", len) == 0)
        return stp_cfg_fail(p, p->line, "original-destination cannot be "
                                        "part of a list in %s", k->name);
    if (u->n_addrs == CFG_MAX_ADDRS)
        return stp_cfg_fail(p, p->line, "more than %d entries in %s",
                            CFG_MAX_ADDRS, k->name);
    struct stp_hop_addr h;
    int rc = stp_parse_hop(s, len, &h);
    if (rc == -ENOMEM)
        return stp_cfg_oom(p);
    if (rc < 0)
        return stp_cfg_fail(p, p->line,
                            "invalid value '%.*s' for %s (expected HOST:PORT "
                            "such as 192.0.2.1:25, [2001:db8::1]:25 or "
                            "mx.example.net:25)", n, s, k->name);
    for (int i = 0; i < u->n_addrs; i++) {
        if (same_hop(&u->addrs[i], &h)) {
            free(h.host);
            return stp_cfg_fail(p, p->line, "duplicate entry '%.*s' in %s",
                                n, s, k->name);
        }
    }
    struct stp_hop_addr *grown =
        realloc(u->addrs, ((size_t)u->n_addrs + 1) * sizeof(h));
    if (grown == NULL) {
        free(h.host);
        return stp_cfg_oom(p);
    }
    u->addrs = grown;
    u->addrs[u->n_addrs++] = h;
    return 0;
}

/* address = HOST:PORT[, HOST:PORT ...], tried in order; or
 * original-destination, alone: where an intercepted connection was going
 * (transparent.c finds it per session). Names are resolved per session,
 * never here: -t must not depend on DNS. */
static int set_up_address(struct parser *p, const struct key_def *k,
                          void *obj, const char *value)
{
    struct stp_upstream_cfg *u = obj;
    if (strcasecmp(value, "original-destination") == 0) {
        u->original_dst = true;
        return set_string(p, k, obj, "original-destination");
    }
    if (*value == '\0')
        return set_string(p, k, obj, value); /* says it is empty */
    for (const char *s = value;;) {
        size_t n = strcspn(s, ",");
        if (add_hop(p, k, u, s, n) < 0)
            return p->rc;
        if (s[n] == '\0')
            break;
        s += n + 1;
    }
    return set_string(p, k, obj, value);
}

static int set_source(struct parser *p, const struct key_def *k, void *obj,
                      const char *value)
{
    struct stp_upstream_cfg *u = obj;
    if (stp_parse_source(value, &u->source, &u->source_addr) < 0)
        return bad_value(p, k, value,
                         "none, client or a numeric IP address");
    return 0;
}

/* A value from the key's list of names, stored as its index. */
static int set_enum(struct parser *p, const struct key_def *k, void *obj,
                    const char *value)
{
    for (int i = 0; k->names[i]; i++) {
        if (strcasecmp(value, k->names[i]) == 0) {
            *FIELD(obj, k->off, int) = i;
            return 0;
        }
    }
    return bad_value(p, k, value, k->expected);
}

/* Value names in enum order, NULL-terminated for set_enum. The logs name
 * these values through the accessors below, never with a table of their
 * own. */
static const char *const tls_modes[] = {"none", "starttls", "implicit",
                                        "opportunistic", NULL};
static const char *const protocols[] = {"smtp", "lmtp", "imap", "pop3", NULL};
static const char *const versions[] = {"1.0", "1.1", "1.2", "1.3", NULL};
_Static_assert(STP_ARRAY_LEN(tls_modes) == STP_TLS_OPPORTUNISTIC + 2,
               "a name for every TLS mode");
_Static_assert(STP_ARRAY_LEN(versions) == STP_TLS_V1_3 + 2,
               "a name for every TLS version");

const char *stp_tls_mode_name(enum stp_tls_mode m)
{
    return (unsigned)m <= STP_TLS_OPPORTUNISTIC ? tls_modes[m] : "?";
}

const char *stp_tls_version_name(enum stp_tls_version v)
{
    return (unsigned)v <= STP_TLS_V1_3 ? versions[v] : "?";
}

static const char *const pp_modes[] = {"no", "v1", "v2", "any", NULL};
_Static_assert(STP_ARRAY_LEN(pp_modes) == STP_PP_ANY + 2,
               "a name for every proxy_protocol value");
_Static_assert(STP_PP_ONLY_V1 == STP_PP_V1 && STP_PP_ONLY_V2 == STP_PP_V2,
               "the mode is the parser's mask of versions");

/* proxy_protocol_from, allow: address blocks separated by commas or blanks,
 * into the array at OFF and its count at OFF2. */
static int set_cidrs(struct parser *p, const struct key_def *k, void *obj,
                     const char *value)
{
    struct stp_cidr **v = FIELD(obj, k->off, struct stp_cidr *);
    int *nv = FIELD(obj, k->off2, int);
    const char *s = value;
    while (*s) {
        s += strspn(s, ", \t");
        size_t n = strcspn(s, ", \t");
        if (n == 0)
            break;
        char one[64];
        struct stp_cidr c;
        if (n >= sizeof(one))
            return bad_value(p, k, value, "addresses or CIDR blocks such as "
                                          "10.0.0.0/8, 2001:db8::/32");
        memcpy(one, s, n);
        one[n] = '\0';
        if (stp_parse_cidr(one, &c) < 0)
            return bad_value(p, k, value, "addresses or CIDR blocks such as "
                                          "10.0.0.0/8, 2001:db8::/32");
        struct stp_cidr *grown = realloc(*v, ((size_t)*nv + 1) * sizeof(c));
        if (!grown)
            return stp_cfg_oom(p);
        *v = grown;
        (*v)[(*nv)++] = c;
        s += n;
    }
    if (*nv == 0)
        return stp_cfg_fail(p, p->line, "empty value for %s", k->name);
    return 0;
}

static const char *const verify_modes[] = {"none", "optional", "require",
                                           NULL};
static const char *const identities[] = {"none", "xclient", "proxy-v1",
                                         "proxy-v2", NULL};
static const char *const auths[] = {"none", "plain", "login", "xoauth2",
                                    NULL};
_Static_assert(STP_ARRAY_LEN(auths) == STP_AUTH_XOAUTH2 + 2,
               "a name for every auth mechanism");

/* Goes into SASL strings (PLAIN's NUL, XOAUTH2's ^A separators) and AUTH
 * lines: no blanks or control characters. */
static int set_username(struct parser *p, const struct key_def *k, void *obj,
                        const char *value)
{
    size_t n = strlen(value);
    bool ok = n >= 1 && n <= 255;
    for (size_t i = 0; ok && i < n; i++)
        ok = (unsigned char)value[i] > 0x20 && value[i] != 0x7f;
    if (!ok)
        return bad_value(p, k, value, "a user name of 1 to 255 bytes "
                                      "without blanks or control characters");
    return set_string(p, k, obj, value);
}

/* Groups by name: checked here so a typo is a FILE:LINE error. */
static int set_groups(struct parser *p, const struct key_def *k, void *obj,
                      const char *value)
{
    static const char *const known[] = {"X25519", "X448", "P-256", "P-384",
                                        "P-521"};
    const char *g = value;
    while (*g) {
        size_t n = strcspn(g, ":");
        bool ok = false;
        for (size_t i = 0; i < STP_ARRAY_LEN(known) && !ok; i++)
            ok = strlen(known[i]) == n && strncasecmp(g, known[i], n) == 0;
        if (!ok)
            return bad_value(p, k, value,
                             "groups from X25519, X448, P-256, P-384, P-521 "
                             "separated by ':'");
        g += n + (g[n] == ':');
    }
    return set_string(p, k, obj, value);
}

/* A limit: 1..1000000. */
static int set_count(struct parser *p, const struct key_def *k, void *obj,
                     const char *value)
{
    const char *s = value;
    uint64_t n;
    if (stp_parse_uint(&s, 1000000, &n) < 0 || *s != '\0' || n == 0)
        return bad_value(p, k, value, "a number from 1 to 1000000");
    *FIELD(obj, k->off, uint32_t) = (uint32_t)n;
    return 0;
}

/* A user or group name: looked up when privileges are dropped. */
static int set_account(struct parser *p, const struct key_def *k, void *obj,
                       const char *value)
{
    size_t n = strlen(value);
    if (n == 0 || n > 32 || strspn(value, "abcdefghijklmnopqrstuvwxyz"
                                          "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                          "0123456789-._") != n)
        return bad_value(p, k, value, "a user or group name");
    if (k - stp_cfg_keys == K_USER)
        p->cfg->line_user = p->line;
    else
        p->cfg->line_group = p->line;
    return set_string(p, k, obj, value);
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

/* retry_after: 0 is meaningful (never pass a failed entry over). */
static int set_duration_or_0(struct parser *p, const struct key_def *k,
                             void *obj, const char *value)
{
    uint64_t ms;
    if (stp_parse_duration(value, &ms) < 0)
        return bad_value(p, k, value, "a duration like 30s, 5m, 1h or 250ms, or 0");
    *FIELD(obj, k->off, uint64_t) = ms;
    return 0;
}

#define PRX(f) offsetof(struct stp_config, f)
#define LST(f) offsetof(struct stp_listener_cfg, f)
#define UPS(f) offsetof(struct stp_upstream_cfg, f)

const struct key_def stp_cfg_keys[K_COUNT] = {
    [K_LOG_LEVEL] = {SECT_PROXY, "log_level", set_log_level, PRX(log_level), 0},
    [K_LOG_FORMAT] = {SECT_PROXY, "log_format", set_enum, PRX(log_format), 0,
                      (const char *const[]){"text", "json", NULL}, "text or json"},
    [K_WORKERS] = {SECT_PROXY, "workers", set_workers, PRX(workers), 0},
    [K_HOSTNAME] = {SECT_PROXY, "hostname", set_hostname, PRX(hostname), 0},
    [K_ADMIN_LISTEN] = {SECT_ADMIN, "listen", set_addr, PRX(admin_listen),
                        PRX(admin_addr)},
    [K_LISTEN] = {SECT_LISTENER, "listen", set_addr, LST(listen_text), LST(addr)},
    [K_TLS] = {SECT_LISTENER, "tls", set_enum, LST(tls), 0, tls_modes,
               "starttls, implicit or none"},
    [K_REQUIRE_TLS] = {SECT_LISTENER, "require_tls", set_bool, LST(require_tls), 0},
    [K_CERT] = {SECT_LISTENER, "cert", set_string, LST(cert), 0},
    [K_KEY] = {SECT_LISTENER, "key", set_string, LST(key), 0},
    [K_UPSTREAM] = {SECT_LISTENER, "upstream", set_string, LST(upstream_name), 0},
    [K_MAX_LINE] = {SECT_LISTENER, "max_line", set_max_line, LST(max_line), 0},
    [K_TIMEOUT_IDLE] = {SECT_LISTENER, "timeout_idle", set_duration,
                        LST(timeout_idle_ms), 0},
    [K_ADDRESS] = {SECT_UPSTREAM, "address", set_up_address, UPS(address_text), 0},
    [K_UPSTREAM_TLS] = {SECT_UPSTREAM, "tls", set_enum, UPS(tls), 0,
                        tls_modes, "starttls, implicit, opportunistic or none"},
    [K_TIMEOUT_CONNECT] = {SECT_UPSTREAM, "timeout_connect", set_duration,
                           UPS(timeout_connect_ms), 0},
    [K_TIMEOUT_REPLY] = {SECT_UPSTREAM, "timeout_reply", set_duration,
                         UPS(timeout_reply_ms), 0},
#define VERSION_KEY(id, sect, name, field)                                     \
    [id] = {sect, name, set_enum, field, 0, versions, "1.0, 1.1, 1.2 or 1.3"}
    VERSION_KEY(K_MIN_VERSION, SECT_LISTENER, "min_version", LST(tlsp.min_version)),
    VERSION_KEY(K_MAX_VERSION, SECT_LISTENER, "max_version", LST(tlsp.max_version)),
    VERSION_KEY(K_UP_MIN_VERSION, SECT_UPSTREAM, "min_version", UPS(tlsp.min_version)),
    VERSION_KEY(K_UP_MAX_VERSION, SECT_UPSTREAM, "max_version", UPS(tlsp.max_version)),
    [K_CIPHERS] = {SECT_LISTENER, "ciphers", set_string, LST(tlsp.ciphers), 0},
    [K_GROUPS] = {SECT_LISTENER, "groups", set_groups, LST(tlsp.groups), 0},
    [K_UP_CIPHERS] = {SECT_UPSTREAM, "ciphers", set_string, UPS(tlsp.ciphers), 0},
    [K_UP_GROUPS] = {SECT_UPSTREAM, "groups", set_groups, UPS(tlsp.groups), 0},
    [K_CLIENT_CA] = {SECT_LISTENER, "client_ca", set_string, LST(client_ca), 0},
    [K_VERIFY_CLIENT] = {SECT_LISTENER, "verify_client", set_enum,
                         LST(verify_client), 0, verify_modes,
                         "none, optional or require"},
    [K_UP_VERIFY] = {SECT_UPSTREAM, "verify", set_bool, UPS(verify), 0},
    [K_UP_CA_FILE] = {SECT_UPSTREAM, "ca_file", set_string, UPS(ca_file), 0},
    [K_UP_SERVER_NAME] = {SECT_UPSTREAM, "server_name", set_hostname,
                          UPS(server_name), 0},
    [K_UP_CERT] = {SECT_UPSTREAM, "cert", set_string, UPS(cert), 0},
    [K_UP_KEY] = {SECT_UPSTREAM, "key", set_string, UPS(key), 0},
    [K_UP_IDENTITY] = {SECT_UPSTREAM, "client_identity", set_enum,
                       UPS(identity), 0, identities,
                       "none, xclient, proxy-v1 or proxy-v2"},
    [K_PROXY_MAX_CONN] = {SECT_PROXY, "max_connections", set_count,
                          PRX(max_connections), 0},
    [K_DRAIN_TIMEOUT] = {SECT_PROXY, "drain_timeout", set_duration,
                         PRX(drain_timeout_ms), 0},
    [K_USER] = {SECT_PROXY, "user", set_account, PRX(user), 0},
    [K_GROUP] = {SECT_PROXY, "group", set_account, PRX(group), 0},
    [K_MAX_CONN] = {SECT_LISTENER, "max_connections", set_count,
                    LST(max_connections), 0},
    [K_MAX_CONN_IP] = {SECT_LISTENER, "max_connections_per_ip", set_count,
                       LST(max_connections_per_ip), 0},
    [K_MAX_ERRORS] = {SECT_LISTENER, "max_errors", set_count,
                      LST(max_errors), 0},
    [K_PROTOCOL] = {SECT_LISTENER, "protocol", set_enum, LST(protocol), 0,
                    protocols, "smtp, lmtp, imap or pop3"},
    [K_TIMEOUT_HANDSHAKE] = {SECT_LISTENER, "timeout_handshake", set_duration,
                             LST(timeout_handshake_ms), 0},
    [K_TIMEOUT_COMMAND] = {SECT_LISTENER, "timeout_command", set_duration,
                           LST(timeout_command_ms), 0},
    [K_TIMEOUT_DATA] = {SECT_LISTENER, "timeout_data", set_duration,
                        LST(timeout_data_ms), 0},
    [K_PROXY_PROTOCOL] = {SECT_LISTENER, "proxy_protocol", set_enum,
                          LST(proxy_protocol), 0, pp_modes,
                          "no, v1, v2 or any"},
    [K_PROXY_FROM] = {SECT_LISTENER, "proxy_protocol_from", set_cidrs,
                      LST(proxy_from), LST(n_proxy_from)},
    [K_TIMEOUT_PROXY_HEADER] = {SECT_LISTENER, "timeout_proxy_header",
                                set_duration, LST(timeout_proxy_header_ms), 0},
    [K_TRANSPARENT] = {SECT_LISTENER, "transparent", set_bool,
                       LST(transparent), 0},
    [K_UP_SOURCE] = {SECT_UPSTREAM, "source", set_source, 0, 0},
    [K_UP_RETRY_AFTER] = {SECT_UPSTREAM, "retry_after", set_duration_or_0,
                          UPS(retry_after_ms), 0},
    [K_UP_AUTH] = {SECT_UPSTREAM, "auth", set_enum, UPS(auth), 0, auths,
                   "none, plain, login or xoauth2"},
    [K_UP_USERNAME] = {SECT_UPSTREAM, "username", set_username, UPS(username), 0},
    [K_UP_PASSWORD_FILE] = {SECT_UPSTREAM, "password_file", set_string,
                            UPS(password_file), 0},
    [K_UP_TOKEN_FILE] = {SECT_UPSTREAM, "token_file", set_string,
                         UPS(token_file), 0},
    [K_UP_HELO_NAME] = {SECT_UPSTREAM, "helo_name", set_hostname,
                        UPS(helo_name), 0},
    [K_ALLOW] = {SECT_LISTENER, "allow", set_cidrs, LST(allow), LST(n_allow)},
    [K_TICKET_KEYS] = {SECT_PROXY, "ticket_keys", set_string, PRX(ticket_keys), 0},
};

/* sni.NAME = CERT KEY: one more certificate for a listener. */
int stp_cfg_dynamic_key(struct parser *p, const char *name, const char *value)
{
    if (p->sect != SECT_LISTENER || strncmp(name, "sni.", 4) != 0)
        return -ENOENT;
    struct stp_listener_cfg *l = &p->cfg->listeners[p->idx];
    const char *host = name + 4;
    size_t hl = strlen(host);
    const char *h = host[0] == '*' && host[1] == '.' ? host + 2 : host;
    if (hl == 0 || hl > 253 || strspn(h, "abcdefghijklmnopqrstuvwxyz"
                                         "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                         "0123456789-.") != strlen(h))
        return stp_cfg_fail(p, p->line,
                            "invalid server name '%s' in %s (a host name or "
                            "*.domain)", host, name);
    for (int i = 0; i < l->n_sni; i++)
        if (strcasecmp(l->sni[i].name, host) == 0)
            return stp_cfg_fail(p, p->line, "duplicate key '%s'", name);
    char cert[512], key[512];
    int used = 0;
    if (sscanf(value, "%511s %511s %n", cert, key, &used) != 2 ||
        value[used] != '\0')
        return stp_cfg_fail(p, p->line,
                            "invalid value '%s' for %s (expected CERT KEY: "
                            "two file names)", value, name);
    if (stp_cfg_check_file(p, "cert", cert, p->line) < 0 ||
        stp_cfg_check_file(p, "key", key, p->line) < 0)
        return p->rc;
    struct stp_sni_cfg *grown =
        realloc(l->sni, ((size_t)l->n_sni + 1) * sizeof(*l->sni));
    if (!grown)
        return stp_cfg_oom(p);
    l->sni = grown;
    struct stp_sni_cfg *e = &l->sni[l->n_sni];
    e->name = strdup(host);
    e->cert = strdup(cert);
    e->key = strdup(key);
    e->line = p->line;
    l->n_sni++;
    if (!e->name || !e->cert || !e->key)
        return stp_cfg_oom(p);
    return 0;
}

static int check_versions(struct parser *p, const struct stp_tls_params *t,
                          int min_line, int max_line)
{
    if (t->min_version > t->max_version)
        return stp_cfg_fail(p, max_line ? max_line : min_line,
                            "max_version is lower than min_version");
    return 0;
}

/* A cert/key pair: both or neither, both readable. */
static int check_pair(struct parser *p, const char *cert, const char *key,
                      int cert_line, int key_line)
{
    if (cert != NULL && key == NULL)
        return stp_cfg_fail(p, cert_line, "cert without key");
    if (key != NULL && cert == NULL)
        return stp_cfg_fail(p, key_line, "key without cert");
    if (cert != NULL && (stp_cfg_check_file(p, "cert", cert, cert_line) < 0 ||
                         stp_cfg_check_file(p, "key", key, key_line) < 0))
        return p->rc;
    return 0;
}

int stp_cfg_end_listener(struct parser *p, int i)
{
    struct stp_listener_cfg *l = &p->cfg->listeners[i];
    const int *kl = p->lst_state[i].key_line;

    l->tls_lines = (struct stp_tls_lines){
        kl[K_CERT], kl[K_KEY], kl[K_CLIENT_CA], kl[K_CIPHERS], kl[K_GROUPS],
        kl[K_MIN_VERSION], kl[K_MAX_VERSION]};

    l->line_transparent = kl[K_TRANSPARENT];
    l->line_allow = kl[K_ALLOW];
    if (l->listen_text == NULL)
        return stp_cfg_fail(p, l->line, "listener '%s' has no listen address", l->name);
    if (l->upstream_name == NULL)
        return stp_cfg_fail(p, l->line, "listener '%s' has no upstream", l->name);
    if (check_pair(p, l->cert, l->key, kl[K_CERT], kl[K_KEY]) < 0 ||
        check_versions(p, &l->tlsp, kl[K_MIN_VERSION], kl[K_MAX_VERSION]) < 0)
        return p->rc;
    if (l->verify_client != STP_VERIFY_CLIENT_NONE && l->client_ca == NULL)
        return stp_cfg_fail(p, kl[K_VERIFY_CLIENT],
                            "verify_client needs client_ca");
    if (l->client_ca != NULL && stp_cfg_check_file(p, "client_ca", l->client_ca,
                                                   kl[K_CLIENT_CA]) < 0)
        return p->rc;
    /* A client is never offered TLS "if it likes": that is starttls with
     * require_tls = no. */
    if (l->tls == STP_TLS_OPPORTUNISTIC)
        return stp_cfg_fail(p, kl[K_TLS],
                            "tls = opportunistic is for an [upstream]; a "
                            "listener takes starttls, implicit or none");
    if (l->tls == STP_TLS_NONE) {
        if (kl[K_REQUIRE_TLS] && l->require_tls)
            return stp_cfg_fail(p, kl[K_REQUIRE_TLS],
                        "require_tls = yes needs tls = starttls or implicit");
        l->require_tls = false;
    }
    /* Trusting a header from anyone would let any client choose its
     * address: the senders must be named. */
    if (l->proxy_protocol != STP_PP_NO && l->n_proxy_from == 0)
        return stp_cfg_fail(p, kl[K_PROXY_PROTOCOL],
                            "proxy_protocol needs proxy_protocol_from (the "
                            "load balancers' addresses)");
    if (l->proxy_protocol == STP_PP_NO && l->n_proxy_from > 0)
        return stp_cfg_fail(p, kl[K_PROXY_FROM],
                            "proxy_protocol_from without proxy_protocol");
    /* Listeners at HOST:0 each get a port of their own: not a conflict. */
    for (int j = 0; j < i && stp_addr_port(&l->addr) != 0; j++) {
        const struct stp_listener_cfg *o = &p->cfg->listeners[j];
        if (stp_same_addr(&l->addr, &o->addr))
            return stp_cfg_fail(p, kl[K_LISTEN],
                        "listener '%s' uses the listen address of listener '%s'",
                        l->name, o->name);
        if (stp_addr_overlaps(&l->addr, &o->addr))
            return stp_cfg_fail(p, kl[K_LISTEN],
                        "listener '%s' (%s) and listener '%s' (%s) overlap: "
                        "a wildcard address takes its port on every address",
                        l->name, l->listen_text, o->name, o->listen_text);
    }
    return 0;
}

/* A fixed source address can only reach entries of its family; a name is
 * resolved to the addresses of that family. */
static int check_source(struct parser *p, struct stp_upstream_cfg *u,
                        const int *kl)
{
    u->line_source = kl[K_UP_SOURCE];
    for (int i = 0; i < u->n_addrs && u->source == STP_SRC_ADDRESS; i++) {
        const struct stp_hop_addr *a = &u->addrs[i];
        if (a->is_name || a->addr.ss_family == u->source_addr.ss_family)
            continue;
        bool v6 = a->addr.ss_family == AF_INET6;
        return stp_cfg_fail(p, kl[K_UP_SOURCE],
                            "source is not of the address family of %s%s%s:%u",
                            v6 ? "[" : "", a->host, v6 ? "]" : "", a->port);
    }
    return 0;
}

/* The password is read at load, so a reload reads it again; the reason
 * never quotes the file's content. */
static int read_password(struct parser *p, struct stp_upstream_cfg *u,
                         int line)
{
    char why[128];
    int rc = stp_read_secret(u->password_file, &u->password, why, sizeof(why));
    if (rc == -ENOMEM)
        return stp_cfg_oom(p);
    if (rc == -EINVAL || rc == -EFBIG)
        return stp_cfg_fail(p, line, "password_file '%s': %s",
                            u->password_file, why);
    if (rc < 0)
        return stp_cfg_fail(p, line, "cannot read password_file '%s': %s",
                            u->password_file, why);
    return 0;
}

/* Keys of auth = none that only make sense with a mechanism. */
static int check_no_credentials(struct parser *p, const int *kl)
{
    static const enum key_id creds[] = {K_UP_USERNAME, K_UP_PASSWORD_FILE,
                                        K_UP_TOKEN_FILE};
    for (size_t i = 0; i < STP_ARRAY_LEN(creds); i++)
        if (kl[creds[i]])
            return stp_cfg_fail(p, kl[creds[i]],
                                "%s needs auth = plain, login or xoauth2",
                                stp_cfg_keys[creds[i]].name);
    return 0;
}

/* auth =: a channel the password cannot leave in clear, a session nothing
 * resets, and the credentials its mechanism takes. */
static int check_auth(struct parser *p, struct stp_upstream_cfg *u,
                      const int *kl)
{
    const char *mech = auths[u->auth];
    bool oauth = u->auth == STP_AUTH_XOAUTH2;
    u->line_auth = kl[K_UP_AUTH];
    if (u->auth == STP_AUTH_NONE)
        return check_no_credentials(p, kl);
    if (u->tls == STP_TLS_NONE)
        return stp_cfg_fail(p, kl[K_UP_AUTH],
                            "auth needs tls = starttls or implicit: the "
                            "password would cross in clear");
    if (u->tls == STP_TLS_OPPORTUNISTIC)
        return stp_cfg_fail(p, kl[K_UP_AUTH],
                            "auth needs tls = starttls or implicit: with "
                            "opportunistic, a next hop that does not offer "
                            "STARTTLS would get the password in clear");
    /* Anyone on the path could present a certificate and take the
     * account: trust a private relay with ca_file instead. */
    if (!u->verify)
        return stp_cfg_fail(p, kl[K_UP_VERIFY] ? kl[K_UP_VERIFY] : kl[K_UP_AUTH],
                            "auth needs verify = yes: an unverified next hop "
                            "would be given the password (trust a private "
                            "relay's certificate with ca_file)");
    if (u->identity == STP_ID_XCLIENT)
        return stp_cfg_fail(p, kl[K_UP_IDENTITY],
                            "client_identity = xclient cannot be used with "
                            "auth: XCLIENT resets the session the proxy "
                            "authenticated (use proxy-v1, proxy-v2 or none)");
    if (u->username == NULL)
        return stp_cfg_fail(p, kl[K_UP_AUTH], "auth = %s needs username", mech);
    if (oauth && u->password_file != NULL)
        return stp_cfg_fail(p, kl[K_UP_PASSWORD_FILE],
                            "password_file is for auth = plain or login "
                            "(xoauth2 takes token_file)");
    if (!oauth && u->token_file != NULL)
        return stp_cfg_fail(p, kl[K_UP_TOKEN_FILE],
                            "token_file is for auth = xoauth2 (plain and "
                            "login take password_file)");
    if (oauth && u->token_file == NULL)
        return stp_cfg_fail(p, kl[K_UP_AUTH], "auth = xoauth2 needs token_file");
    if (!oauth && u->password_file == NULL)
        return stp_cfg_fail(p, kl[K_UP_AUTH], "auth = %s needs password_file",
                            mech);
    /* A token is renewed behind our back: read for each session. */
    if (oauth)
        return stp_cfg_check_file(p, "token_file", u->token_file,
                                  kl[K_UP_TOKEN_FILE]);
    return read_password(p, u, kl[K_UP_PASSWORD_FILE]);
}

/* 127.0.0.0/8 and ::1 (also as ::ffff:127.x.y.z); a wildcard is not. */
static bool is_loopback(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET)
        return ntohl(((const struct sockaddr_in *)ss)->sin_addr.s_addr) >> 24 == 127;
    if (ss->ss_family != AF_INET6)
        return false;
    const struct in6_addr *a = &((const struct sockaddr_in6 *)ss)->sin6_addr;
    return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
}

int stp_cfg_end_upstream(struct parser *p, int i)
{
    struct stp_upstream_cfg *u = &p->cfg->upstreams[i];
    const int *kl = p->up_state[i].key_line;
    u->tls_lines = (struct stp_tls_lines){
        kl[K_UP_CERT], kl[K_UP_KEY], kl[K_UP_CA_FILE], kl[K_UP_CIPHERS],
        kl[K_UP_GROUPS], kl[K_UP_MIN_VERSION], kl[K_UP_MAX_VERSION]};
    if (u->address_text == NULL)
        return stp_cfg_fail(p, u->line, "upstream '%s' has no address", u->name);
    if (check_pair(p, u->cert, u->key, kl[K_UP_CERT], kl[K_UP_KEY]) < 0 ||
        check_versions(p, &u->tlsp, kl[K_UP_MIN_VERSION],
                       kl[K_UP_MAX_VERSION]) < 0)
        return p->rc;
    if (u->ca_file != NULL &&
        stp_cfg_check_file(p, "ca_file", u->ca_file, kl[K_UP_CA_FILE]) < 0)
        return p->rc;
    /* Opportunistic TLS takes what the next hop has: checking by default
     * would turn a self-signed certificate into a refusal where plaintext
     * would have been accepted. verify = yes still means it. */
    if (u->tls == STP_TLS_OPPORTUNISTIC && !kl[K_UP_VERIFY])
        u->verify = false;
    if (check_source(p, u, kl) < 0)
        return p->rc;
    /* Each session goes somewhere else: no host name to check by default
     * (without verify, none is needed: intercepted deliveries to any MX).
     * A list's entries are each checked against their own host. */
    if (u->original_dst && u->server_name == NULL && u->tls != STP_TLS_NONE &&
        u->verify)
        return stp_cfg_fail(p, kl[K_ADDRESS],
                            "address = original-destination with tls and "
                            "verify needs server_name");
    return check_auth(p, u, kl);
}

/* A listener whose upstream logs in with the proxy's account relays for
 * whoever connects: where others can connect, they must be named. A
 * loopback socket is no such bound when a PROXY header or interception
 * brings clients from anywhere to it. */
int stp_cfg_check_link(struct parser *p, int i)
{
    const struct stp_listener_cfg *l = &p->cfg->listeners[i];
    const struct stp_upstream_cfg *u = l->upstream;
    bool remote_clients = l->proxy_protocol != STP_PP_NO || l->transparent;
    /* The IMAP and POP3 engines have no prelude: the proxy speaks neither
     * STARTTLS/STLS nor XCLIENT nor a login to their upstreams (yet). */
    if (l->protocol == STP_PROTO_IMAP || l->protocol == STP_PROTO_POP3) {
        const int *ukl = p->up_state[u - p->cfg->upstreams].key_line;
        const char *what = NULL, *hint = "";
        int line = 0;
        if (u->tls == STP_TLS_STARTTLS || u->tls == STP_TLS_OPPORTUNISTIC) {
            what = u->tls == STP_TLS_STARTTLS ? "tls = starttls"
                                              : "tls = opportunistic";
            line = ukl[K_UPSTREAM_TLS];
            hint = " (use tls = none or implicit)";
        } else if (u->identity == STP_ID_XCLIENT) {
            what = "client_identity = xclient";
            line = ukl[K_UP_IDENTITY];
            hint = " (use proxy-v1, proxy-v2 or none)";
        } else if (u->auth != STP_AUTH_NONE) {
            what = "auth";
            line = ukl[K_UP_AUTH];
        }
        if (what)
            return stp_cfg_fail(p, line ? line : l->line,
                                "upstream '%s': %s is not available for "
                                "protocol = %s (listener '%s')%s", u->name,
                                what, protocols[l->protocol], l->name, hint);
    }
    if (u->auth == STP_AUTH_NONE || l->n_allow > 0 ||
        (is_loopback(&l->addr) && !remote_clients))
        return 0;
    return stp_cfg_fail(p, l->line,
                        "listener '%s' relays with the account of upstream "
                        "'%s' (auth = %s): allow = is needed %s", l->name,
                        u->name, auths[u->auth],
                        remote_clients ? "where clients come through a PROXY "
                                         "header or interception"
                                       : "on a non-loopback listen address");
}
