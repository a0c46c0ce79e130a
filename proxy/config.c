/* Configuration: an INI file (inih) parsed into the plain structs of config.h.
 *
 * Debian's inih calls the handler without a line number and never when a new
 * section starts, so the line reader does both jobs: it counts lines for
 * "FILE:LINE:" messages and opens sections itself (an empty [listener a] must
 * still exist and be checked). It also strips indentation, so inih never sees
 * an indented key as a continuation of the previous value.
 *
 * inih's separators and line length are fixed when it is built: it takes
 * "key: value" as "key = value", and its buffer holds 198 characters. The
 * reader refuses the colon, and splits a longer line itself, by inih's rules,
 * for the same handler. */
#include <arpa/inet.h>
#include <ctype.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ini.h>

#include "config.h"
#include "secret.h"
#include "stp.h"

#include "config_parser.h"

#define CFG_MAX_FILE_SIZE (1024 * 1024)

static int vfail(struct parser *p, int rc, int line, const char *fmt,
                 va_list ap)
{
    if (p->rc < 0)
        return p->rc; /* keep the first error */
    p->rc = rc;
    if (p->err == NULL || p->errlen == 0)
        return rc;
    int n = snprintf(p->err, p->errlen, "%s:%d: ", p->file, line);
    if (n >= 0 && (size_t)n < p->errlen)
        vsnprintf(p->err + n, p->errlen - (size_t)n, fmt, ap);
    return rc;
}

int stp_cfg_fail(struct parser *p, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = vfail(p, -EINVAL, line, fmt, ap);
    va_end(ap);
    return rc;
}

int stp_cfg_fail_rc(struct parser *p, int rc, int line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    rc = vfail(p, rc, line, fmt, ap);
    va_end(ap);
    return rc;
}

int stp_cfg_oom(struct parser *p)
{
    return stp_cfg_fail_rc(p, -ENOMEM, p->line, "out of memory");
}

/* ---- sections -------------------------------------------------------- */

static void *section_obj(struct parser *p, struct sect_state **state)
{
    switch (p->sect) {
    case SECT_PROXY:
        *state = &p->proxy;
        return p->cfg;
    case SECT_LISTENER:
        *state = &p->lst_state[p->idx];
        return &p->cfg->listeners[p->idx];
    case SECT_UPSTREAM:
        *state = &p->up_state[p->idx];
        return &p->cfg->upstreams[p->idx];
    case SECT_ADMIN:
        *state = &p->admin;
        return p->cfg;
    case SECT_NONE:
        break;
    }
    STP_ASSERT(!"no current section");
    return NULL;
}

static const char *section_label(struct parser *p, char *buf, size_t len)
{
    if (p->sect == SECT_LISTENER)
        snprintf(buf, len, "listener %s", p->cfg->listeners[p->idx].name);
    else if (p->sect == SECT_UPSTREAM)
        snprintf(buf, len, "upstream %s", p->cfg->upstreams[p->idx].name);
    else
        snprintf(buf, len, p->sect == SECT_ADMIN ? "admin" : "proxy");
    return buf;
}

/* ARR with n elements -> n + 1, the new one zeroed; NULL when out of memory. */
static void *grow(void *arr, int n, size_t size)
{
    char *bigger = realloc(arr, ((size_t)n + 1) * size);
    if (bigger != NULL)
        memset(bigger + (size_t)n * size, 0, size);
    return bigger;
}

int stp_cfg_check_file(struct parser *p, const char *what, const char *path,
                      int line)
{
    /* O_NONBLOCK: a FIFO without a writer would hold the main loop (a
     * reload) in open(), and the read that follows later too. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    int e = fd < 0 ? errno : 0;
    struct stat st;
    bool regular = true;
    if (fd >= 0) {
        if (fstat(fd, &st) < 0)
            e = errno;
        else if (S_ISDIR(st.st_mode))
            e = EISDIR;
        else
            regular = !S_ISFIFO(st.st_mode) && !S_ISSOCK(st.st_mode);
        close(fd);
    }
    if (e != 0)
        return stp_cfg_fail(p, line, "cannot read %s '%s': %s", what, path, strerror(e));
    if (!regular)
        return stp_cfg_fail(p, line, "%s '%s' is a FIFO or a socket, not a "
                            "file", what, path);
    return 0;
}


/* Checks that need the whole section: required keys, key pairs. */
static int end_section(struct parser *p)
{
    if (p->sect == SECT_LISTENER)
        return stp_cfg_end_listener(p, p->idx);
    if (p->sect == SECT_UPSTREAM)
        return stp_cfg_end_upstream(p, p->idx);
    if (p->sect == SECT_ADMIN && !p->admin.key_line[K_ADMIN_LISTEN])
        return stp_cfg_fail(p, p->cfg->line_admin,
                            "[admin] needs listen = HOST:PORT");
    return 0;
}
static bool valid_name(const char *s)
{
    size_t n = strlen(s);
    return n > 0 && strspn(s, "abcdefghijklmnopqrstuvwxyz"
                              "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                              "0123456789_.-") == n;
}

/* One more zeroed listener or upstream, and its parse state. The state array
 * may end up one longer than the config array: harmless. */
static int add_slot(struct parser *p, bool lst, int n)
{
    struct stp_config *c = p->cfg;
    struct sect_state **st = lst ? &p->lst_state : &p->up_state;
    void *grown = grow(*st, n, sizeof(**st));
    if (grown == NULL)
        return -ENOMEM;
    *st = grown;
    if (lst && (grown = grow(c->listeners, n, sizeof(*c->listeners))) != NULL)
        c->listeners = grown;
    else if (!lst && (grown = grow(c->upstreams, n, sizeof(*c->upstreams))) != NULL)
        c->upstreams = grown;
    return grown ? 0 : -ENOMEM;
}

static int open_named(struct parser *p, bool lst, const char *name)
{
    struct stp_config *c = p->cfg;
    const char *kind = lst ? "listener" : "upstream";
    int n = lst ? c->n_listeners : c->n_upstreams;

    if (*name == '\0')
        return stp_cfg_fail(p, p->line, "missing name in [%s]", kind);
    if (!valid_name(name))
        return stp_cfg_fail(p, p->line,
                    "invalid %s name '%s' (letters, digits, '_', '.', '-')",
                    kind, name);
    for (int i = 0; i < n; i++) {
        const char *other = lst ? c->listeners[i].name : c->upstreams[i].name;
        if (strcmp(other, name) == 0)
            return stp_cfg_fail(p, p->line, "duplicate %s '%s'", kind, name);
    }
    char *copy = strdup(name);
    if (copy == NULL || add_slot(p, lst, n) < 0) {
        free(copy);
        return stp_cfg_oom(p);
    }
    if (lst) {
        struct stp_listener_cfg *l = &c->listeners[n];
        l->name = copy;
        l->line = p->line;
        l->tls = STP_TLS_STARTTLS;
        l->require_tls = true; /* turned off at the end for tls = none */
        l->max_line = CFG_DEFAULT_MAX_LINE;
        l->timeout_idle_ms = CFG_DEFAULT_IDLE_MS;
        l->timeout_handshake_ms = CFG_DEFAULT_HANDSHAKE_MS;
        l->timeout_command_ms = CFG_DEFAULT_COMMAND_MS;
        l->timeout_data_ms = CFG_DEFAULT_DATA_MS;
        l->max_connections = CFG_DEFAULT_LISTENER_CONN;
        l->max_connections_per_ip = CFG_DEFAULT_CONN_PER_IP;
        l->max_errors = CFG_DEFAULT_MAX_ERRORS;
        l->timeout_proxy_header_ms = CFG_DEFAULT_PROXY_HEADER_MS;
        l->tlsp.min_version = STP_TLS_V1_2;
        l->tlsp.max_version = STP_TLS_V1_3;
        c->n_listeners++;
    } else {
        struct stp_upstream_cfg *u = &c->upstreams[n];
        u->name = copy;
        u->line = p->line;
        u->tls = STP_TLS_NONE;
        u->timeout_connect_ms = CFG_DEFAULT_CONNECT_MS;
        u->timeout_reply_ms = CFG_DEFAULT_REPLY_MS;
        u->retry_after_ms = CFG_DEFAULT_RETRY_AFTER_MS;
        u->tlsp.min_version = STP_TLS_V1_2;
        u->tlsp.max_version = STP_TLS_V1_3;
        u->verify = true;
        c->n_upstreams++;
    }
    p->sect = lst ? SECT_LISTENER : SECT_UPSTREAM;
    p->idx = n;
    return 0;
}

static int syntax_error(struct parser *p, int line)
{
    return stp_cfg_fail(p, line, "syntax error (expected [section] or key = value)");
}

/* LINE starts with '['. */
static int begin_section(struct parser *p, char *line)
{
    char *close = strchr(line, ']');
    if (close == NULL)
        return syntax_error(p, p->line);
    const char *rest = close + 1;
    rest += strspn(rest, " \t\r\n");
    if (*rest != '\0' && *rest != ';' && *rest != '#')
        return stp_cfg_fail(p, p->line, "unexpected text after section header");
    if (end_section(p) < 0)
        return p->rc;

    /* Work on a copy: inih still has to parse the line itself. */
    char text[256];
    size_t len = (size_t)(close - line - 1);
    if (len >= sizeof(text))
        return stp_cfg_fail(p, p->line, "section header too long");
    memcpy(text, line + 1, len);
    text[len] = '\0';
    char *kind = text + strspn(text, " \t");
    char *e = kind + strlen(kind);
    while (e > kind && isspace((unsigned char)e[-1]))
        *--e = '\0';
    size_t klen = strcspn(kind, " \t");
    const char *name = kind + klen + strspn(kind + klen, " \t");

    if (klen == 5 && strncmp(kind, "proxy", klen) == 0 && *name == '\0') {
        if (p->proxy_line != 0)
            return stp_cfg_fail(p, p->line, "duplicate section [proxy]");
        p->proxy_line = p->line;
        p->cfg->line_proxy = p->line;
        p->sect = SECT_PROXY;
        return 0;
    }
    if (klen == 5 && strncmp(kind, "admin", klen) == 0 && *name == '\0') {
        if (p->cfg->line_admin != 0)
            return stp_cfg_fail(p, p->line, "duplicate section [admin]");
        p->cfg->line_admin = p->line;
        p->sect = SECT_ADMIN;
        return 0;
    }
    if (klen == 8 && strncmp(kind, "listener", klen) == 0)
        return open_named(p, true, name);
    if (klen == 8 && strncmp(kind, "upstream", klen) == 0)
        return open_named(p, false, name);
    return stp_cfg_fail(p, p->line, "unknown section [%s]", kind);
}

/* Where inih ends a key (at the first of CHARS) or a value (CHARS NULL) in
 * the LEN characters at S: there, or at an inline comment, a ';' after a
 * blank (INI_ALLOW_INLINE_COMMENTS and INI_INLINE_COMMENT_PREFIXES as Debian
 * builds inih). Returns its offset, LEN if none. */
static size_t inih_span(const char *s, size_t len, const char *chars)
{
    bool was_space = false;
    size_t i = 0;
    for (; i < len; i++) {
        if ((chars && strchr(chars, s[i])) || (was_space && s[i] == ';'))
            break;
        was_space = isspace((unsigned char)s[i]);
    }
    return i;
}

/* The LEN characters at S without the blanks around them, NUL-terminated. */
static char *strip(char *s, size_t len)
{
    while (len > 0 && isspace((unsigned char)*s)) {
        s++;
        len--;
    }
    while (len > 0 && isspace((unsigned char)s[len - 1]))
        len--;
    s[len] = '\0';
    return s;
}

static int on_key(void *user, const char *section, const char *name,
                  const char *value);

/* A trimmed line of LEN characters that inih's buffer cannot hold, read here
 * as inih would read it. BUF gets the blank line inih is handed instead. */
static char *long_line(struct parser *p, const char *s, size_t len, char *buf)
{
    if (!p->long_line && !(p->long_line = malloc(CFG_MAX_LINE + 1))) {
        stp_cfg_oom(p);
        return NULL;
    }
    char *line = p->long_line;
    memcpy(line, s, len);
    line[len] = '\0';
    strcpy(buf, "\n");
    if (line[0] == ';' || line[0] == '#')
        return buf;
    if (line[0] == '[')
        return begin_section(p, line) < 0 ? NULL : buf;
    size_t sep = inih_span(line, len, "=");
    if (sep == len) {
        syntax_error(p, p->line);
        return NULL;
    }
    char *value = line + sep + 1;
    size_t vlen = inih_span(value, len - sep - 1, NULL);
    return on_key(p, "", strip(line, sep), strip(value, vlen)) ? buf : NULL;
}

/* inih takes "key: value" too; one separator keeps files greppable. */
static bool colon_separated(const char *s, size_t len)
{
    size_t sep = inih_span(s, len, "=:");
    return sep < len && s[sep] == ':';
}

/* ini_reader: hands inih one line at a time (see the top of the file). */
static char *read_line(char *buf, int num, void *stream)
{
    struct parser *p = stream;
    /* inih keeps going after a bad line; catch it here, in line order, so it
     * is reported before whatever the end of its section finds missing. */
    if (p->rc == 0 && p->want_key)
        syntax_error(p, p->line);
    if (p->rc < 0 || p->pos >= p->end)
        return NULL;

    const char *s = p->pos;
    const char *nl = memchr(s, '\n', (size_t)(p->end - s));
    const char *eol = nl ? nl : p->end;
    p->pos = nl ? nl + 1 : p->end;
    p->line++;

    if (p->line == 1 && eol - s >= 3 && memcmp(s, "\xEF\xBB\xBF", 3) == 0)
        s += 3;
    while (s < eol && isspace((unsigned char)*s))
        s++;
    while (eol > s && isspace((unsigned char)eol[-1]))
        eol--;
    size_t len = (size_t)(eol - s);
    if (len > CFG_MAX_LINE || num < 2) {
        stp_cfg_fail(p, p->line, "line too long (max %d characters)",
                     CFG_MAX_LINE);
        return NULL;
    }
    p->want_key = len > 0 && strchr("[;#", s[0]) == NULL;
    if (p->want_key && colon_separated(s, len)) {
        stp_cfg_fail(p, p->line, "use '=' between key and value");
        return NULL;
    }
    if (num < 2 || len > (size_t)num - 2)
        return long_line(p, s, len, buf);
    memcpy(buf, s, len);
    buf[len] = '\n';
    buf[len + 1] = '\0';
    if (buf[0] == '[' && begin_section(p, buf) < 0)
        return NULL;
    return buf;
}

static const struct key_def *find_key(enum sect_kind sect, const char *name)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(stp_cfg_keys); i++) {
        if (stp_cfg_keys[i].sect == sect && strcmp(stp_cfg_keys[i].name, name) == 0)
            return &stp_cfg_keys[i];
    }
    return NULL;
}

/* ini_handler: returns nonzero on success. */
static int on_key(void *user, const char *section, const char *name,
                  const char *value)
{
    struct parser *p = user;
    char label[128];
    (void)section; /* ours, from begin_section(), is authoritative */

    p->want_key = false;
    if (p->rc < 0)
        return 0;
    if (p->sect == SECT_NONE)
        return !stp_cfg_fail(p, p->line, "key '%s' outside of a section", name);
    const struct key_def *k = find_key(p->sect, name);
    if (k == NULL) {
        int r = stp_cfg_dynamic_key(p, name, value ? value : "");
        if (r != -ENOENT)
            return r == 0;
        return !stp_cfg_fail(p, p->line, "unknown key '%s' in [%s]", name,
                     section_label(p, label, sizeof(label)));
    }
    struct sect_state *st;
    void *obj = section_obj(p, &st);
    int *line = &st->key_line[k - stp_cfg_keys];
    if (*line != 0)
        return !stp_cfg_fail(p, p->line, "duplicate key '%s'", name);
    *line = p->line;
    return k->set(p, k, obj, value ? value : "") == 0;
}

/* Checks across sections, once everything is read. */
static int finish(struct parser *p)
{
    struct stp_config *c = p->cfg;

    if (end_section(p) < 0)
        return p->rc;
    for (int i = 0; i < c->n_listeners; i++) {
        struct stp_listener_cfg *l = &c->listeners[i];
        for (int j = 0; j < c->n_upstreams && l->upstream == NULL; j++) {
            if (strcmp(c->upstreams[j].name, l->upstream_name) == 0)
                l->upstream = &c->upstreams[j];
        }
        if (l->upstream == NULL)
            return stp_cfg_fail(p, p->lst_state[i].key_line[K_UPSTREAM],
                        "listener '%s' names unknown upstream '%s'", l->name,
                        l->upstream_name);
        if (stp_cfg_check_link(p, i) < 0)
            return p->rc;
    }
    if (c->n_listeners == 0)
        return stp_cfg_fail(p, p->line > 0 ? p->line : 1, "no listener defined");
    /* Its content is the TLS layer's, read with the contexts (stp_gen_new). */
    c->line_ticket_keys = p->proxy.key_line[K_TICKET_KEYS];
    if (c->ticket_keys && stp_cfg_check_file(p, "ticket_keys", c->ticket_keys,
                                             c->line_ticket_keys) < 0)
        return p->rc;
    if (c->hostname == NULL) {
        char host[256];
        if (gethostname(host, sizeof(host)) < 0 || host[0] == '\0')
            snprintf(host, sizeof(host), "localhost");
        host[sizeof(host) - 1] = '\0';
        c->hostname = strdup(host);
        if (c->hostname == NULL)
            return stp_cfg_oom(p);
    }
    return 0;
}

static int parse_text(const char *file, const char *text, size_t len,
                      struct stp_config *out, char *err, size_t errlen)
{
    struct parser p = {
        .file = file,
        .pos = text,
        .end = text + len,
        .cfg = out,
        .err = err,
        .errlen = errlen,
    };

    out->log_level = STP_LOG_INFO;
    out->workers = 1;
    out->max_connections = CFG_DEFAULT_PROXY_CONN;
    out->drain_timeout_ms = CFG_DEFAULT_DRAIN_MS;
    out->path = strdup(file);
    if (out->path == NULL)
        stp_cfg_oom(&p);

    int syntax = p.rc < 0 ? 0 : ini_parse_stream(read_line, &p, on_key, &p);
    if (p.want_key)
        syntax_error(&p, p.line); /* the last line */
    if (syntax > 0)
        syntax_error(&p, syntax); /* anything read_line() did not foresee */
    if (p.rc == 0)
        finish(&p);

    free(p.lst_state);
    free(p.up_state);
    free(p.long_line);
    if (p.rc < 0)
        stp_config_free(out);
    return p.rc;
}

int stp_config_parse_string(const char *name, const char *text,
                            struct stp_config *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    return parse_text(name, text, strlen(text), out, err, errlen);
}

/* Reads the whole file: bounded, and a NUL byte is reported by its line. */
static int read_file(const char *path, char **text, size_t *len,
                     const char **what)
{
    *what = "cannot open";
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct stat st;
    int e = fstat(fd, &st) < 0 ? errno : S_ISDIR(st.st_mode) ? EISDIR : 0;
    if (e != 0) {
        close(fd);
        return -e;
    }
    *what = "cannot read";
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    int rc = buf ? 0 : -ENOMEM;
    while (rc == 0) {
        if (n == cap) {
            char *bigger = cap < CFG_MAX_FILE_SIZE ? realloc(buf, cap * 2) : NULL;
            if (bigger == NULL) {
                rc = cap < CFG_MAX_FILE_SIZE ? -ENOMEM : -EFBIG;
                break;
            }
            buf = bigger;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            rc = -errno;
        else if (r == 0)
            break;
        else
            n += (size_t)r;
    }
    close(fd);
    if (rc < 0) {
        free(buf);
        return rc;
    }
    *text = buf;
    *len = n;
    return 0;
}

int stp_config_load(const char *path, struct stp_config *out, char *err,
                    size_t errlen)
{
    char *text = NULL;
    size_t len = 0;
    const char *what;

    memset(out, 0, sizeof(*out));
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    int rc = read_file(path, &text, &len, &what);
    if (rc < 0) {
        if (err != NULL && errlen > 0)
            snprintf(err, errlen, "%s:0: %s: %s", path, what, stp_strerror(rc));
        return rc;
    }
    const char *nul = memchr(text, '\0', len);
    if (nul != NULL) {
        int line = 1;
        for (const char *c = text; c < nul; c++)
            line += *c == '\n';
        if (err != NULL && errlen > 0)
            snprintf(err, errlen, "%s:%d: NUL byte in file", path, line);
        free(text);
        return -EINVAL;
    }
    rc = parse_text(path, text, len, out, err, errlen);
    free(text);
    return rc;
}

void stp_config_free(struct stp_config *cfg)
{
    free(cfg->admin_listen);
    for (int i = 0; i < cfg->n_listeners; i++) {
        struct stp_listener_cfg *l = &cfg->listeners[i];
        free(l->name);
        free(l->listen_text);
        free(l->cert);
        free(l->key);
        free(l->upstream_name);
        free(l->tlsp.ciphers);
        free(l->tlsp.groups);
        free(l->client_ca);
        free(l->proxy_from);
        free(l->allow);
        for (int j = 0; j < l->n_sni; j++) {
            free(l->sni[j].name);
            free(l->sni[j].cert);
            free(l->sni[j].key);
        }
        free(l->sni);
    }
    for (int i = 0; i < cfg->n_upstreams; i++) {
        struct stp_upstream_cfg *u = &cfg->upstreams[i];
        free(u->name);
        free(u->address_text);
        for (int j = 0; j < u->n_addrs; j++)
            free(u->addrs[j].host);
        free(u->addrs);
        free(u->username);
        stp_secret_free(u->password);
        free(u->password_file);
        free(u->token_file);
        free(u->helo_name);
        free(u->tlsp.ciphers);
        free(u->tlsp.groups);
        free(u->ca_file);
        free(u->server_name);
        free(u->cert);
        free(u->key);
    }
    free(cfg->listeners);
    free(cfg->upstreams);
    free(cfg->hostname);
    free(cfg->user);
    free(cfg->group);
    free(cfg->ticket_keys);
    free(cfg->path);
    memset(cfg, 0, sizeof(*cfg));
}
