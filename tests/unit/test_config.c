/* Unit tests for proxy/config.c: value parsers, defaults, a full config, and
 * the exact "FILE:LINE: message" of every class of error. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "secret.h"
#include "stp.h"

#include "checks.h"

/* A minimal valid config: listener then upstream, 5 lines. */
#define LST_A "[listener a]\nlisten = 0.0.0.0:25\nupstream = up\n"
#define UP "[upstream up]\naddress = 127.0.0.1:2525\n"
#define MINIMAL LST_A UP

static bool is_zeroed(const struct stp_config *c)
{
    static const struct stp_config zero;
    return memcmp(c, &zero, sizeof(zero)) == 0;
}

static void test_durations(void)
{
    static const struct { const char *text; uint64_t ms; } good[] = {
        {"300", 300000},  {"300s", 300000}, {"5m", 300000},
        {"1h", 3600000},  {"250ms", 250},   {"0", 0},
        {"0ms", 0},       {"007s", 7000},
        {"18446744073709551615ms", UINT64_MAX},
        {"18446744073709551s", 18446744073709551000u},
    };
    static const char *const bad[] = {
        "", "s", "ms", "-1", "+1", " 1", "1 ", "1x", "1.5s", "5mm", "1sms",
        "1S", "0x10", "18446744073709551616", "18446744073709552s",
        "99999999999999999999h", "5 m",
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(good); i++) {
        uint64_t ms = 1;
        CHECK(stp_parse_duration(good[i].text, &ms) == 0);
        CHECK(ms == good[i].ms);
    }
    for (size_t i = 0; i < STP_ARRAY_LEN(bad); i++) {
        uint64_t ms = 42;
        int rc = stp_parse_duration(bad[i], &ms);
        if (rc != -EINVAL)
            fprintf(stderr, "  accepted duration '%s'\n", bad[i]);
        CHECK(rc == -EINVAL);
        CHECK(ms == 42);
    }
}

static void test_hostport(void)
{
    static const struct { const char *text; int family; const char *fmt; } good[] = {
        {"127.0.0.1:25", AF_INET, "127.0.0.1:25"},
        {"0.0.0.0:25", AF_INET, "0.0.0.0:25"},
        {"1.2.3.4:65535", AF_INET, "1.2.3.4:65535"},
        {"10.0.0.1:025", AF_INET, "10.0.0.1:25"},
        {"[::1]:25", AF_INET6, "[::1]:25"},
        {"[::]:465", AF_INET6, "[::]:465"},
        {"[2001:DB8::1]:587", AF_INET6, "[2001:db8::1]:587"},
        {"[::ffff:192.0.2.1]:1", AF_INET6, "[::ffff:192.0.2.1]:1"},
        {"1.2.3.4:0", AF_INET, "1.2.3.4:0"}, /* the keys decide who may */
        {"[::1]:0", AF_INET6, "[::1]:0"},
    };
    static const char *const bad[] = {
        "localhost:25", "1.2.3.4", "::1:25", "1.2.3.4:99999",
        "1.2.3.4:", ":25", "[::1]", "[::1]25", "[::1:25", "[::1]]:25",
        "1.2.3.4:25x", "1.2.3.4:-1", "1.2.3.4:+25", "[1.2.3.4]:25",
        "1.2.3:25", "", "[]:25", "[fe80::1%eth0]:25", "1.2.3.4 :25",
        "1.2.3.4: 25", "::1", "[::1]:65536", "256.1.1.1:25",
    };
    char buf[64];
    for (size_t i = 0; i < STP_ARRAY_LEN(good); i++) {
        struct sockaddr_storage ss;
        CHECK(stp_parse_hostport(good[i].text, &ss) == 0);
        CHECK(ss.ss_family == good[i].family);
        stp_format_addr((struct sockaddr *)&ss, buf, sizeof(buf));
        CHECK_STR(buf, good[i].fmt);
    }
    for (size_t i = 0; i < STP_ARRAY_LEN(bad); i++) {
        struct sockaddr_storage ss;
        int rc = stp_parse_hostport(bad[i], &ss);
        if (rc != -EINVAL)
            fprintf(stderr, "  accepted address '%s'\n", bad[i]);
        CHECK(rc == -EINVAL);
    }

    struct sockaddr_storage ss;
    CHECK(stp_parse_hostport("[::1]:25", &ss) == 0);
    char small[6];
    stp_format_addr((struct sockaddr *)&ss, small, sizeof(small));
    CHECK_STR(small, "[::1]"); /* truncated, still terminated */
    struct sockaddr unix_sa = {.sa_family = AF_UNIX};
    stp_format_addr(&unix_sa, buf, sizeof(buf));
    CHECK_STR(buf, "?");
}

/* listen = HOST:0: the kernel picks the port, so two listeners may both ask
 * for 127.0.0.1:0; two at the same real port are still refused. An upstream
 * needs a real port (see test_errors). */
static void test_port_zero(void)
{
    struct stp_config c;
    char err[256] = "";
    CHECK(stp_config_parse_string("t.ini",
                                  "[listener a]\nlisten = 127.0.0.1:0\n"
                                  "upstream = up\n"
                                  "[listener b]\nlisten = 127.0.0.1:0\n"
                                  "upstream = up\n"
                                  "[listener c]\nlisten = [::1]:0\n"
                                  "upstream = up\n" UP,
                                  &c, err, sizeof(err)) == 0);
    CHECK_STR(err, "");
    CHECK(c.n_listeners == 3);
    CHECK_STR(c.listeners[0].listen_text, "127.0.0.1:0");
    CHECK(c.listeners[0].addr.ss_family == AF_INET);
    CHECK(stp_addr_port(&c.listeners[0].addr) == 0);
    CHECK(stp_same_addr(&c.listeners[0].addr, &c.listeners[1].addr));
    CHECK(c.listeners[2].addr.ss_family == AF_INET6);
    CHECK(stp_addr_port(&c.listeners[2].addr) == 0);
    stp_config_free(&c);

    CHECK(stp_config_parse_string("t.ini",
                                  "[listener a]\nlisten = 127.0.0.1:2525\n"
                                  "upstream = up\n"
                                  "[listener b]\nlisten = 127.0.0.1:2525\n"
                                  "upstream = up\n" UP,
                                  &c, err, sizeof(err)) < 0);
    CHECK_STR(err, "t.ini:5: listener 'b' uses the listen address of listener 'a'");
    CHECK(is_zeroed(&c));

    /* A wildcard takes the port on every address: -t says so, not the
     * start's bind. */
    CHECK(stp_config_parse_string("t.ini",
                                  "[listener a]\nlisten = 0.0.0.0:2525\n"
                                  "upstream = up\n"
                                  "[listener b]\nlisten = [::]:2525\n"
                                  "upstream = up\n" UP,
                                  &c, err, sizeof(err)) < 0);
    CHECK_STR(err, "t.ini:5: listener 'b' ([::]:2525) and listener 'a' "
                   "(0.0.0.0:2525) overlap: a wildcard address takes its "
                   "port on every address");
    CHECK(is_zeroed(&c));
    CHECK(stp_config_parse_string("t.ini",
                                  "[listener a]\nlisten = 127.0.0.1:2525\n"
                                  "upstream = up\n"
                                  "[listener b]\nlisten = 127.0.0.2:2525\n"
                                  "upstream = up\n" UP,
                                  &c, err, sizeof(err)) == 0);
    stp_config_free(&c);
}

static void test_same_addr(void)
{
    struct sockaddr_storage a, b;
    CHECK(stp_parse_hostport("127.0.0.1:25", &a) == 0);
    CHECK(stp_parse_hostport("127.0.0.1:25", &b) == 0);
    CHECK(stp_same_addr(&a, &b));
    b.ss_family = AF_INET; /* padding the kernel may fill is not compared */
    memset(((struct sockaddr_in *)&b)->sin_zero, 0xff,
           sizeof(((struct sockaddr_in *)&b)->sin_zero));
    CHECK(stp_same_addr(&a, &b));
    CHECK(stp_parse_hostport("127.0.0.1:26", &b) == 0);
    CHECK(!stp_same_addr(&a, &b));
    CHECK(stp_parse_hostport("127.0.0.2:25", &b) == 0);
    CHECK(!stp_same_addr(&a, &b));
    CHECK(stp_parse_hostport("[::1]:25", &a) == 0);
    CHECK(stp_parse_hostport("[::1]:25", &b) == 0);
    CHECK(stp_same_addr(&a, &b));
    ((struct sockaddr_in6 *)&b)->sin6_flowinfo = 7;
    CHECK(stp_same_addr(&a, &b));
    CHECK(stp_parse_hostport("[::2]:25", &b) == 0);
    CHECK(!stp_same_addr(&a, &b));
    CHECK(stp_parse_hostport("0.0.0.0:25", &b) == 0);
    CHECK(!stp_same_addr(&a, &b)); /* another family */
    CHECK(stp_addr_port(&a) == 25);

    static const struct { const char *a, *b; bool overlap; } ov[] = {
        {"127.0.0.1:25", "127.0.0.1:25", true},
        {"0.0.0.0:25", "127.0.0.1:25", true},
        {"127.0.0.1:25", "0.0.0.0:25", true},
        {"[::]:25", "127.0.0.1:25", true},   /* IPV6_V6ONLY is off */
        {"0.0.0.0:25", "[::]:25", true},
        {"[::]:25", "[::1]:25", true},
        {"127.0.0.1:25", "127.0.0.2:25", false},
        {"0.0.0.0:25", "[::1]:25", false},
        {"0.0.0.0:25", "0.0.0.0:26", false},
        {"0.0.0.0:0", "0.0.0.0:0", false},  /* each gets a port */
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(ov); i++) {
        CHECK(stp_parse_hostport(ov[i].a, &a) == 0);
        CHECK(stp_parse_hostport(ov[i].b, &b) == 0);
        CHECK(stp_addr_overlaps(&a, &b) == ov[i].overlap);
    }
}

/* Each text is parsed as "t.ini" and must fail with exactly this message. */
static void test_errors(void)
{
    static const struct { const char *text; const char *err; } cases[] = {
        /* sections */
        {"[foo]\n", "t.ini:1: unknown section [foo]"},
        {"[Proxy]\n", "t.ini:1: unknown section [Proxy]"},
        {"[proxy x]\n", "t.ini:1: unknown section [proxy x]"},
        {"[ listener  a b ]\n", "t.ini:1: invalid listener name 'a b' "
                                "(letters, digits, '_', '.', '-')"},
        {"[listener]\n", "t.ini:1: missing name in [listener]"},
        {"[upstream a/b]\n", "t.ini:1: invalid upstream name 'a/b' "
                             "(letters, digits, '_', '.', '-')"},
        {MINIMAL "[listener a]\n", "t.ini:6: duplicate listener 'a'"},
        {MINIMAL "[upstream up]\n", "t.ini:6: duplicate upstream 'up'"},
        {"[proxy]\n[proxy]\n", "t.ini:2: duplicate section [proxy]"},
        {MINIMAL "[admin]\nlisten = 127.0.0.1:9925\n[admin]\n",
         "t.ini:8: duplicate section [admin]"},
        {MINIMAL "[admin]\n", "t.ini:6: [admin] needs listen = HOST:PORT"},
        {MINIMAL "[admin]\nlisten = localhost:9925\n",
         "t.ini:7: invalid value 'localhost:9925' for listen (expected a numeric "
         "HOST:PORT such as 127.0.0.1:25 or [::1]:25)"},
        {MINIMAL "[admin]\nport = 1\n", "t.ini:7: unknown key 'port' in [admin]"},
        {"[proxy] x\n", "t.ini:1: unexpected text after section header"},
        {"listen = 1.2.3.4:25\n", "t.ini:1: key 'listen' outside of a section"},
        /* keys */
        {"[proxy]\nbar = 1\n", "t.ini:2: unknown key 'bar' in [proxy]"},
        {"[listener a]\nlisten = 0.0.0.0:25\nbar = 1\n",
         "t.ini:3: unknown key 'bar' in [listener a]"},
        {"[listener a]\nListen = 0.0.0.0:25\n",
         "t.ini:2: unknown key 'Listen' in [listener a]"},
        {"[upstream u]\nlisten = 0.0.0.0:25\n",
         "t.ini:2: unknown key 'listen' in [upstream u]"},
        {"[listener a]\nlisten = 0.0.0.0:25\nlisten = 0.0.0.0:26\n",
         "t.ini:3: duplicate key 'listen'"},
        {"[proxy]\nlog_level = info\nlog_level = info\n",
         "t.ini:3: duplicate key 'log_level'"},
        /* PROXY protocol on listeners */
        {LST_A "proxy_protocol = v2\n" UP,
         "t.ini:4: proxy_protocol needs proxy_protocol_from (the load "
         "balancers' addresses)"},
        {LST_A "proxy_protocol_from = 10.0.0.0/8\n" UP,
         "t.ini:4: proxy_protocol_from without proxy_protocol"},
        {LST_A "proxy_protocol = yes\n" UP,
         "t.ini:4: invalid value 'yes' for proxy_protocol (expected no, v1, "
         "v2 or any)"},
        {LST_A "proxy_protocol = v1\nproxy_protocol_from = 10.0.0.0/33\n" UP,
         "t.ini:5: invalid value '10.0.0.0/33' for proxy_protocol_from "
         "(expected addresses or CIDR blocks such as 10.0.0.0/8, "
         "2001:db8::/32)"},
        {LST_A "proxy_protocol = v1\nproxy_protocol_from = 10.0.0/8\n" UP,
         "t.ini:5: invalid value '10.0.0/8' for proxy_protocol_from "
         "(expected addresses or CIDR blocks such as 10.0.0.0/8, "
         "2001:db8::/32)"},
        {LST_A "proxy_protocol = v1\nproxy_protocol_from = ::1/\n" UP,
         "t.ini:5: invalid value '::1/' for proxy_protocol_from "
         "(expected addresses or CIDR blocks such as 10.0.0.0/8, "
         "2001:db8::/32)"},
        {LST_A "proxy_protocol = v1\nproxy_protocol_from = ,\n" UP,
         "t.ini:5: empty value for proxy_protocol_from"},
        {LST_A "proxy_protocol = v1\nproxy_protocol_from = ::1\n"
               "proxy_protocol_from = ::2\n" UP,
         "t.ini:6: duplicate key 'proxy_protocol_from'"},
        {LST_A "timeout_proxy_header = 0\n" UP,
         "t.ini:4: invalid value '0' for timeout_proxy_header (expected a "
         "duration greater than 0 like 300s, 5m, 1h or 250ms)"},
        /* values */
        {"[proxy]\nlog_level = loud\n", "t.ini:2: invalid value 'loud' for "
                                        "log_level (expected error, warn, info or debug)"},
        {"[proxy]\nlog_format = yaml\n", "t.ini:2: invalid value 'yaml' for "
                                         "log_format (expected text or json)"},
        {"[proxy]\nworkers = 257\n", "t.ini:2: invalid value '257' for workers "
                                     "(expected a number from 1 to 256 or auto)"},
        {"[proxy]\nworkers = 0\n", "t.ini:2: invalid value '0' for workers "
                                   "(expected a number from 1 to 256 or auto)"},
        {"[proxy]\nworkers = many\n", "t.ini:2: invalid value 'many' for workers "
                                      "(expected a number from 1 to 256 or auto)"},
        {"[proxy]\nhostname = mx example\n",
         "t.ini:2: invalid value 'mx example' for hostname (expected a host name)"},
        {"[listener a]\nlisten = localhost:25\n",
         "t.ini:2: invalid value 'localhost:25' for listen (expected a numeric "
         "HOST:PORT such as 127.0.0.1:25 or [::1]:25)"},
        {"[listener a]\ntls = ssl\n", "t.ini:2: invalid value 'ssl' for tls "
                                      "(expected starttls, implicit or none)"},
        {"[listener a]\nlisten = 0.0.0.0:25\nrequire_tls = maybe\n",
         "t.ini:3: invalid value 'maybe' for require_tls (expected yes or no)"},
        {"[listener a]\nmax_line = 511\n",
         "t.ini:2: invalid value '511' for max_line (expected 512..8192)"},
        {"[listener a]\nmax_line = 8193\n",
         "t.ini:2: invalid value '8193' for max_line (expected 512..8192)"},
        {"[listener a]\nmax_line = 2k\n",
         "t.ini:2: invalid value '2k' for max_line (expected 512..8192)"},
        {"[listener a]\ntimeout_idle = 0s\n",
         "t.ini:2: invalid value '0s' for timeout_idle (expected a duration "
         "greater than 0 like 300s, 5m, 1h or 250ms)"},
        {"[listener a]\ntimeout_idle = -1s\n",
         "t.ini:2: invalid value '-1s' for timeout_idle (expected a duration "
         "greater than 0 like 300s, 5m, 1h or 250ms)"},
        {"[listener a]\nupstream =\n", "t.ini:2: empty value for upstream"},
        {"[listener a]\nmin_version = 1.4\n",
         "t.ini:2: invalid value '1.4' for min_version (expected 1.0, 1.1, 1.2 or 1.3)"},
        {"[upstream u]\nmax_version = tls1.3\n",
         "t.ini:2: invalid value 'tls1.3' for max_version (expected 1.0, 1.1, 1.2 or 1.3)"},
        {"[listener a]\ngroups = X25519:P-255\n",
         "t.ini:2: invalid value 'X25519:P-255' for groups (expected groups from "
         "X25519, X448, P-256, P-384, P-521 separated by ':')"},
        {"[listener a]\nverify_client = always\n",
         "t.ini:2: invalid value 'always' for verify_client (expected none, "
         "optional or require)"},
        {"[upstream u]\nclient_identity = proxy\n",
         "t.ini:2: invalid value 'proxy' for client_identity (expected none, "
         "xclient, proxy-v1 or proxy-v2)"},
        {"[upstream u]\nverify = sometimes\n",
         "t.ini:2: invalid value 'sometimes' for verify (expected yes or no)"},
        {"[listener a]\nsni.a b = x y\n",
         "t.ini:2: invalid server name 'a b' in sni.a b (a host name or *.domain)"},
        {"[listener a]\nsni.mx.test = /nonexistent.pem\n",
         "t.ini:2: invalid value '/nonexistent.pem' for sni.mx.test (expected "
         "CERT KEY: two file names)"},
        {"[listener a]\nsni.mx.test = /nonexistent.pem /k.pem\n",
         "t.ini:2: cannot read cert '/nonexistent.pem': No such file or directory"},
        {LST_A "min_version = 1.3\nmax_version = 1.2\n" UP,
         "t.ini:5: max_version is lower than min_version"},
        {LST_A "verify_client = require\n" UP,
         "t.ini:4: verify_client needs client_ca"},
        {"[upstream u]\ntls = maybe\n", "t.ini:2: invalid value 'maybe' for tls "
                                        "(expected starttls, implicit, "
                                        "opportunistic or none)"},
        /* opportunistic is an upstream's: a client is offered STARTTLS */
        {LST_A "tls = opportunistic\n" UP,
         "t.ini:4: tls = opportunistic is for an [upstream]; a listener takes "
         "starttls, implicit or none"},
        {"[upstream u]\ntimeout_connect = 30 s\n",
         "t.ini:2: invalid value '30 s' for timeout_connect (expected a duration "
         "greater than 0 like 300s, 5m, 1h or 250ms)"},
        {"[upstream u]\naddress = 1.2.3.4:0\n",
         "t.ini:2: invalid value '1.2.3.4:0' for address (expected HOST:PORT "
         "such as 192.0.2.1:25, [2001:db8::1]:25 or mx.example.net:25)"},
        /* whole sections */
        {"[proxy]\n[listener a]\nupstream = up\n" UP,
         "t.ini:2: listener 'a' has no listen address"},
        {"[listener a]\nlisten = 0.0.0.0:25\n" UP, "t.ini:1: listener 'a' has no upstream"},
        {LST_A "[upstream up]\ntls = none\n", "t.ini:4: upstream 'up' has no address"},
        {"[listener a]\nlisten = 0.0.0.0:25\nupstream = x\n" UP,
         "t.ini:3: listener 'a' names unknown upstream 'x'"},
        {LST_A "cert = /dev/null\n" UP, "t.ini:4: cert without key"},
        {LST_A "key = /dev/null\n" UP, "t.ini:4: key without cert"},
        {LST_A "cert = /nonexistent/c.pem\nkey = /dev/null\n" UP,
         "t.ini:4: cannot read cert '/nonexistent/c.pem': No such file or directory"},
        {LST_A "cert = /dev/null\nkey = /nonexistent/k.pem\n" UP,
         "t.ini:5: cannot read key '/nonexistent/k.pem': No such file or directory"},
        {LST_A "cert = /etc\nkey = /dev/null\n" UP,
         "t.ini:4: cannot read cert '/etc': Is a directory"},
        /* its lines are read with the TLS contexts (test_ticket_keys.c) */
        {"[proxy]\nticket_keys = /nonexistent/keys\n" LST_A UP,
         "t.ini:2: cannot read ticket_keys '/nonexistent/keys': No such file "
         "or directory"},
        {"[proxy]\nticket_keys =\n" LST_A UP, "t.ini:2: empty value for ticket_keys"},
        {LST_A "ticket_keys = /dev/null\n" UP,
         "t.ini:4: unknown key 'ticket_keys' in [listener a]"},
        {LST_A "require_tls = yes\ntls = none\n" UP,
         "t.ini:4: require_tls = yes needs tls = starttls or implicit"},
        {MINIMAL "[listener b]\nlisten = 0.0.0.0:25\nupstream = up\n",
         "t.ini:7: listener 'b' uses the listen address of listener 'a'"},
        /* whole file */
        {"", "t.ini:1: no listener defined"},
        {UP "\n; nothing else\n", "t.ini:4: no listener defined"},
        /* syntax, and which error wins */
        {"[listener a]\nlisten\n", "t.ini:2: syntax error (expected [section] or key = value)"},
        {"[listener a\n", "t.ini:1: syntax error (expected [section] or key = value)"},
        {"[proxy]\nworkers\nbar = 1\n",
         "t.ini:2: syntax error (expected [section] or key = value)"},
        {"[proxy]\nbar = 1\nworkers\n", "t.ini:2: unknown key 'bar' in [proxy]"},
        /* a bad line wins over what its section then lacks */
        {"[listener a]\nupstream = up\nlisten 0.0.0.0\n" UP,
         "t.ini:3: syntax error (expected [section] or key = value)"},
        /* inih also reads "name: value": refused */
        {"[listener a]\nlisten 0.0.0.0:25\n",
         "t.ini:2: use '=' between key and value"},
        {"[listener a]\nlisten: 0.0.0.0:25\n",
         "t.ini:2: use '=' between key and value"},
        {MINIMAL "  max_line : 512 ; a colon\n",
         "t.ini:6: use '=' between key and value"},
        {MINIMAL "oops", "t.ini:6: syntax error (expected [section] or key = value)"},
        {"[proxy]\n = 1\n", "t.ini:2: unknown key '' in [proxy]"},
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(cases); i++) {
        struct stp_config cfg;
        char err[256] = "untouched";
        int rc = stp_config_parse_string("t.ini", cases[i].text, &cfg, err,
                                         sizeof(err));
        CHECK(rc == -EINVAL);
        CHECK_STR(err, cases[i].err);
        CHECK(is_zeroed(&cfg));
    }
}

/* TEXT with "%s" replaced by N copies of C. */
static char *with_run(const char *text, size_t n, char c)
{
    char *run = malloc(n + 1);
    size_t len = strlen(text) + n;
    char *out = malloc(len + 1);
    memset(run, c, n);
    run[n] = '\0';
    snprintf(out, len + 1, text, run);
    free(run);
    return out;
}

static void test_line_too_long(void)
{
    struct stp_config cfg;
    char err[256];
    char *text = with_run("[listener a]\ncert = /%s\n", 4090, 'x');
    CHECK(stp_config_parse_string("t.ini", text, &cfg, err, sizeof(err)) == -EINVAL);
    CHECK_STR(err, "t.ini:2: line too long (max 4096 characters)");
    free(text);

    /* A tiny error buffer truncates but stays terminated. */
    char tiny[8];
    CHECK(stp_config_parse_string("t.ini", "[foo]\n", &cfg, tiny, sizeof(tiny)) == -EINVAL);
    CHECK_STR(tiny, "t.ini:1");
    CHECK(stp_config_parse_string("t.ini", "[foo]\n", &cfg, NULL, 0) == -EINVAL);
}

/* Lines longer than inih's 198 characters are read as inih reads shorter
 * ones: the default cipher list can be written out. */
static void test_long_lines(void)
{
    static const char ciphers[] =
        "TLS13-AES128-GCM-SHA256:TLS13-AES256-GCM-SHA384:"
        "TLS13-CHACHA20-POLY1305-SHA256:"
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305;not-a-comment";
    struct stp_config cfg;
    char err[256] = "";
    char text[2048];
    snprintf(text, sizeof(text),
             LST_A "  ciphers\t=  %s  ; the default, written out\n"
             "; %s\n" UP, ciphers, ciphers);
    CHECK(strlen(ciphers) > 198);
    CHECK(stp_config_parse_string("t.ini", text, &cfg, err, sizeof(err)) == 0);
    CHECK_STR(err, "");
    CHECK_STR(cfg.listeners[0].tlsp.ciphers, ciphers);
    CHECK(cfg.n_upstreams == 1 && cfg.listeners[0].upstream == &cfg.upstreams[0]);
    stp_config_free(&cfg);

    /* the longest line there may be */
    char *at_max = with_run(LST_A "ciphers = %s\n" UP, 4096 - 10, 'A');
    CHECK(stp_config_parse_string("t.ini", at_max, &cfg, err, sizeof(err)) == 0);
    CHECK(cfg.listeners[0].tlsp.ciphers && strlen(cfg.listeners[0].tlsp.ciphers) == 4086);
    stp_config_free(&cfg);
    free(at_max);

    static const struct { const char *text; const char *err; } bad[] = {
        {LST_A "ciphers: %s\n" UP, "t.ini:4: use '=' between key and value"},
        {LST_A "ciphers %s\n" UP,
         "t.ini:4: syntax error (expected [section] or key = value)"},
        {LST_A "ciphers = %s\nlisten = 0.0.0.0:26\n" UP, "t.ini:5: duplicate key 'listen'"},
        {LST_A "%s = 1\n" UP, "t.ini:4: unknown key '"},
        {"[listener %s]\n", "t.ini:1: section header too long"},
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(bad); i++) {
        char *t = with_run(bad[i].text, 300, 'A');
        CHECK(stp_config_parse_string("t.ini", t, &cfg, err, sizeof(err)) == -EINVAL);
        CHECK(strncmp(err, bad[i].err, strlen(bad[i].err)) == 0);
        if (strncmp(err, bad[i].err, strlen(bad[i].err)) != 0)
            fprintf(stderr, "  got:  %s\n  want: %s...\n", err, bad[i].err);
        CHECK(is_zeroed(&cfg));
        free(t);
    }
}

static void test_defaults(void)
{
    struct stp_config cfg;
    char err[256] = "";
    char host[256] = "";
    CHECK(stp_config_parse_string("t.ini", MINIMAL, &cfg, err, sizeof(err)) == 0);
    CHECK_STR(err, "");
    CHECK_STR(cfg.path, "t.ini");
    CHECK(cfg.log_level == STP_LOG_INFO);
    CHECK(cfg.log_format == STP_LOG_TEXT);
    CHECK(cfg.workers == 1);
    gethostname(host, sizeof(host) - 1);
    CHECK_STR(cfg.hostname, host[0] ? host : "localhost");
    CHECK(cfg.n_listeners == 1 && cfg.n_upstreams == 1);
    if (cfg.n_listeners == 1 && cfg.n_upstreams == 1) {
        const struct stp_listener_cfg *l = &cfg.listeners[0];
        const struct stp_upstream_cfg *u = &cfg.upstreams[0];
        CHECK_STR(l->name, "a");
        CHECK_STR(l->listen_text, "0.0.0.0:25");
        CHECK(l->addr.ss_family == AF_INET);
        CHECK(l->tls == STP_TLS_STARTTLS);
        CHECK(l->require_tls);
        CHECK(l->cert == NULL && l->key == NULL);
        CHECK_STR(l->upstream_name, "up");
        CHECK(l->upstream == u);
        CHECK(l->max_line == 2048);
        CHECK(l->timeout_idle_ms == 300000);
        CHECK(l->line == 1);
        CHECK_STR(u->name, "up");
        CHECK_STR(u->address_text, "127.0.0.1:2525");
        CHECK(u->n_addrs == 1 && !u->addrs[0].is_name &&
              u->addrs[0].port == 2525);
        CHECK_STR(u->addrs[0].host, "127.0.0.1");
        CHECK(u->tls == STP_TLS_NONE);
        CHECK(u->server_name == NULL); /* each entry's host */
        CHECK(u->timeout_connect_ms == 30000);
        CHECK(u->retry_after_ms == 30000);
        CHECK(u->auth == STP_AUTH_NONE && u->line_auth == 0);
        CHECK(u->username == NULL && u->password == NULL &&
              u->password_file == NULL && u->token_file == NULL);
        CHECK(u->helo_name == NULL); /* [proxy] hostname */
        CHECK(u->line == 4);
        CHECK(l->allow == NULL && l->n_allow == 0 && l->line_allow == 0);
    }
    stp_config_free(&cfg);
    CHECK(is_zeroed(&cfg));
    stp_config_free(&cfg); /* safe twice */

    /* require_tls defaults to no without TLS; values are case-insensitive. */
    static const struct { const char *extra; bool require; } cases[] = {
        {"tls = NONE\n", false},
        {"tls = none\nrequire_tls = Off\n", false},
        {"tls = Implicit\n", true},
        {"tls = starttls\nrequire_tls = 0\n", false},
        {"require_tls = TRUE\n", true},
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(cases); i++) {
        char text[512];
        snprintf(text, sizeof(text), LST_A "%s" UP, cases[i].extra);
        CHECK(stp_config_parse_string("t.ini", text, &cfg, err, sizeof(err)) == 0);
        CHECK(cfg.n_listeners == 1 && cfg.listeners[0].require_tls == cases[i].require);
        stp_config_free(&cfg);
    }

    /* verify defaults to yes, but to no with tls = opportunistic (which
     * takes what the next hop has); verify = yes is kept. */
    static const struct {
        const char *extra;
        enum stp_tls_mode tls;
        bool verify;
    } ups[] = {
        {"tls = starttls\n", STP_TLS_STARTTLS, true},
        {"tls = implicit\n", STP_TLS_IMPLICIT, true},
        {"tls = opportunistic\n", STP_TLS_OPPORTUNISTIC, false},
        {"tls = Opportunistic\nverify = yes\n", STP_TLS_OPPORTUNISTIC, true},
        {"verify = yes\ntls = opportunistic\n", STP_TLS_OPPORTUNISTIC, true},
        {"tls = opportunistic\nverify = no\n", STP_TLS_OPPORTUNISTIC, false},
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(ups); i++) {
        char text[512];
        snprintf(text, sizeof(text), MINIMAL "%s", ups[i].extra);
        CHECK(stp_config_parse_string("t.ini", text, &cfg, err, sizeof(err)) == 0);
        CHECK(cfg.n_upstreams == 1 && cfg.upstreams[0].tls == ups[i].tls &&
              cfg.upstreams[0].verify == ups[i].verify);
        stp_config_free(&cfg);
    }
    CHECK_STR(stp_tls_mode_name(STP_TLS_OPPORTUNISTIC), "opportunistic");

    CHECK(stp_config_parse_string("t.ini", "[proxy]\nworkers = AUTO\n" MINIMAL,
                                  &cfg, err, sizeof(err)) == 0);
    CHECK(cfg.workers == 0); /* one per CPU, decided at start */
    stp_config_free(&cfg);
    CHECK(stp_config_parse_string("t.ini", "[proxy]\nworkers = 4\n" MINIMAL,
                                  &cfg, err, sizeof(err)) == 0);
    CHECK(cfg.workers == 4);
    stp_config_free(&cfg);
    CHECK(stp_config_parse_string("t.ini", "[proxy]\nlog_format = JSON\n"
                                  MINIMAL, &cfg, err, sizeof(err)) == 0);
    CHECK(cfg.log_format == STP_LOG_JSON);
    stp_config_free(&cfg);
    CHECK(stp_config_parse_string("t.ini", "[proxy]\nlog_format = text\n"
                                  MINIMAL, &cfg, err, sizeof(err)) == 0);
    CHECK(cfg.log_format == STP_LOG_TEXT);
    stp_config_free(&cfg);
}

/* proxy_protocol: the versions as a mask, the senders as blocks. */
static void test_proxy_protocol(void)
{
    struct stp_config cfg;
    char err[256] = "";
    CHECK(stp_config_parse_string("t.ini", MINIMAL, &cfg, err, sizeof(err)) == 0);
    CHECK(cfg.listeners[0].proxy_protocol == STP_PP_NO &&
          cfg.listeners[0].n_proxy_from == 0 &&
          cfg.listeners[0].timeout_proxy_header_ms == 5000);
    stp_config_free(&cfg);
    CHECK(stp_config_parse_string(
              "t.ini",
              LST_A "proxy_protocol = ANY\n"
                    "proxy_protocol_from = 10.1.2.3/8, 192.0.2.7 ,2001:db8::/32\t::1\n"
                    "timeout_proxy_header = 250ms\n" UP,
              &cfg, err, sizeof(err)) == 0);
    CHECK_STR(err, "");
    const struct stp_listener_cfg *l = &cfg.listeners[0];
    CHECK(l->proxy_protocol == STP_PP_ANY && l->n_proxy_from == 4);
    CHECK(l->timeout_proxy_header_ms == 250);
    static const struct { const char *addr; bool in; } who[] = {
        {"10.200.0.1", true},  {"11.0.0.1", false},   {"192.0.2.7", true},
        {"192.0.2.8", false},  {"2001:db8:ff::1", true}, {"2001:db9::1", false},
        {"::1", true},         {"::2", false},
        {"::ffff:10.0.0.9", true}, /* a dual-stack socket's IPv4 peer */
        {"::ffff:11.0.0.9", false},
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(who); i++) {
        struct sockaddr_storage ss = {0};
        if (strchr(who[i].addr, ':')) {
            ss.ss_family = AF_INET6;
            inet_pton(AF_INET6, who[i].addr,
                      &((struct sockaddr_in6 *)&ss)->sin6_addr);
        } else {
            ss.ss_family = AF_INET;
            inet_pton(AF_INET, who[i].addr,
                      &((struct sockaddr_in *)&ss)->sin_addr);
        }
        bool in = stp_cidr_match(l->proxy_from, l->n_proxy_from, &ss);
        if (in != who[i].in)
            fprintf(stderr, "  %s: %d\n", who[i].addr, in);
        CHECK(in == who[i].in);
    }
    struct stp_cidr c;
    CHECK(stp_parse_cidr("0.0.0.0/0", &c) == 0 && c.bits == 0);
    CHECK(stp_parse_cidr("::/0", &c) == 0 && c.family == AF_INET6);
    CHECK(stp_parse_cidr("1.2.3.4/-1", &c) < 0);
    CHECK(stp_parse_cidr("1.2.3.4/ 8", &c) < 0);
    CHECK(stp_parse_cidr("/8", &c) < 0);
    stp_config_free(&cfg);
}

/* Every key set, upstreams referenced before they are defined, IPv6, CRLF,
 * a BOM, indentation and comments: all of it lands in the struct. */
static void test_full(const char *cert, const char *key)
{
    char text[2048];
    snprintf(text, sizeof(text),
             "\xEF\xBB\xBF# starttls-proxy test config\r\n"
             "[proxy]\r\n"
             "log_level = DEBUG ; inline comment\n"
             "workers = 1\n"
             "hostname = mx.example.net\n"
             "\n"
             "[listener smtp]\n"
             "  listen = [::]:25\n"
             "  tls = starttls\n"
             "  require_tls = no\n"
             "  cert = %s\n"
             "  key = %s\n"
             "  upstream = back-end.1\n"
             "  max_line = 4096\n"
             "  timeout_idle = 5m\n"
             "[listener submissions]\n"
             "listen = 127.0.0.1:465\n"
             "tls = implicit\n"
             "upstream = other\n"
             "max_line = 512\n"
             "timeout_idle = 250ms\n"
             "[upstream other]\n"
             "address = [::1]:2526\n"
             "[upstream back-end.1]\n"
             "address = 192.0.2.7:2525\n"
             "tls = none\n"
             "timeout_connect = 1h\n",
             cert, key);
    struct stp_config cfg;
    char err[256] = "";
    char buf[64];
    int rc = stp_config_parse_string("full.ini", text, &cfg, err, sizeof(err));
    CHECK(rc == 0);
    CHECK_STR(err, "");
    if (rc != 0)
        return;
    CHECK(cfg.log_level == STP_LOG_DEBUG);
    CHECK(cfg.workers == 1);
    CHECK_STR(cfg.hostname, "mx.example.net");
    CHECK(cfg.n_listeners == 2 && cfg.n_upstreams == 2);

    const struct stp_listener_cfg *l = &cfg.listeners[0];
    CHECK_STR(l->name, "smtp");
    CHECK_STR(l->listen_text, "[::]:25");
    stp_format_addr((const struct sockaddr *)&l->addr, buf, sizeof(buf));
    CHECK_STR(buf, "[::]:25");
    CHECK(l->tls == STP_TLS_STARTTLS);
    CHECK(!l->require_tls);
    CHECK_STR(l->cert, cert);
    CHECK_STR(l->key, key);
    CHECK_STR(l->upstream_name, "back-end.1");
    CHECK(l->upstream == &cfg.upstreams[1]);
    CHECK(l->max_line == 4096);
    CHECK(l->timeout_idle_ms == 300000);
    CHECK(l->line == 7);

    l = &cfg.listeners[1];
    CHECK_STR(l->name, "submissions");
    stp_format_addr((const struct sockaddr *)&l->addr, buf, sizeof(buf));
    CHECK_STR(buf, "127.0.0.1:465");
    CHECK(l->tls == STP_TLS_IMPLICIT);
    CHECK(l->require_tls);
    CHECK(l->cert == NULL);
    CHECK(l->upstream == &cfg.upstreams[0]);
    CHECK(l->max_line == 512);
    CHECK(l->timeout_idle_ms == 250);
    CHECK(l->line == 16);

    const struct stp_upstream_cfg *u = &cfg.upstreams[0];
    CHECK_STR(u->name, "other");
    CHECK(u->n_addrs == 1 && !u->addrs[0].is_name);
    stp_format_addr((const struct sockaddr *)&u->addrs[0].addr, buf, sizeof(buf));
    CHECK_STR(buf, "[::1]:2526");
    CHECK(u->timeout_connect_ms == 30000);
    CHECK(u->line == 22);
    u = &cfg.upstreams[1];
    CHECK_STR(u->name, "back-end.1");
    CHECK_STR(u->address_text, "192.0.2.7:2525");
    CHECK(u->tls == STP_TLS_NONE);
    CHECK(u->timeout_connect_ms == 3600000);
    CHECK(u->line == 24);
    stp_config_free(&cfg);
}

static void write_file(const char *path, const char *text, size_t len)
{
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f == NULL)
        return;
    CHECK(fwrite(text, 1, len, f) == len);
    fclose(f);
}

static void test_load(const char *dir, const char *cert, const char *key)
{
    char path[512], text[1024], want[1024], err[512];
    struct stp_config cfg;

    snprintf(path, sizeof(path), "%s/proxy.ini", dir);
    snprintf(text, sizeof(text), LST_A "cert = %s\nkey = %s\n" UP, cert, key);
    write_file(path, text, strlen(text));
    CHECK(stp_config_load(path, &cfg, err, sizeof(err)) == 0);
    CHECK_STR(cfg.path, path);
    CHECK(cfg.n_listeners == 1 && cfg.listeners[0].cert != NULL);
    if (cfg.n_listeners == 1)
        CHECK_STR(cfg.listeners[0].key, key);
    stp_config_free(&cfg);

    /* Errors name the real file. */
    snprintf(text, sizeof(text), LST_A "cert = %s\nkey = %s/missing.pem\n" UP,
             cert, dir);
    write_file(path, text, strlen(text));
    CHECK(stp_config_load(path, &cfg, err, sizeof(err)) == -EINVAL);
    snprintf(want, sizeof(want),
             "%s:5: cannot read key '%s/missing.pem': No such file or directory",
             path, dir);
    CHECK_STR(err, want);
    CHECK(is_zeroed(&cfg));

    write_file(path, "[proxy]\n\0[foo]\n", 15);
    CHECK(stp_config_load(path, &cfg, err, sizeof(err)) == -EINVAL);
    snprintf(want, sizeof(want), "%s:2: NUL byte in file", path);
    CHECK_STR(err, want);
    unlink(path);

    CHECK(stp_config_load(path, &cfg, err, sizeof(err)) == -ENOENT);
    snprintf(want, sizeof(want), "%s:0: cannot open: No such file or directory", path);
    CHECK_STR(err, want);
    CHECK(is_zeroed(&cfg));

    CHECK(stp_config_load(dir, &cfg, err, sizeof(err)) == -EISDIR);
    snprintf(want, sizeof(want), "%s:0: cannot open: Is a directory", dir);
    CHECK_STR(err, want);
}

/* The documented example under conf/ must stay loadable. */
static void test_shipped_example(void)
{
    static const char *const files[] = {"starttls-proxy.ini",
                                        "behind-haproxy.ini"};
    for (size_t i = 0; i < STP_ARRAY_LEN(files); i++) {
        char path[1024], err[512] = "";
        const char *slash = strrchr(__FILE__, '/');
        int dirlen = slash ? (int)(slash - __FILE__) : 1;
        snprintf(path, sizeof(path), "%.*s/../../conf/%s", dirlen,
                 slash ? __FILE__ : ".", files[i]);
        struct stp_config cfg;
        int rc = stp_config_load(path, &cfg, err, sizeof(err));
        if (rc != 0)
            fprintf(stderr, "  %s\n", err);
        CHECK(rc == 0);
        CHECK(cfg.n_listeners >= 1);
        stp_config_free(&cfg);
    }
}

/* The TLS keys of issue 3: defaults and every key set. */
static void test_tls_keys(const char *cert, const char *key)
{
    struct stp_config c;
    char err[512];
    char text[2048];
    snprintf(text, sizeof(text),
             "[listener a]\nlisten = 127.0.0.1:25\nupstream = up\n"
             "[listener b]\nlisten = 127.0.0.1:465\ntls = implicit\n"
             "upstream = up\nmin_version = 1.0\nmax_version = 1.2\n"
             "ciphers = ECDHE-RSA-AES128-GCM-SHA256\ngroups = p-256:X25519\n"
             "client_ca = %s\nverify_client = optional\n"
             "sni.mx.test = %s %s\nsni.*.example.org = %s %s\n"
             "[upstream up]\naddress = [::1]:587\n"
             "[upstream v]\naddress = 10.0.0.1:465\ntls = implicit\n"
             "verify = no\nca_file = %s\nserver_name = relay.example.net\n"
             "cert = %s\nkey = %s\nclient_identity = proxy-v2\n"
             "min_version = 1.3\n",
             cert, cert, key, cert, key, cert, cert, key);
    int r = stp_config_parse_string("t.ini", text, &c, err, sizeof(err));
    CHECK(r == 0);
    if (r != 0) {
        printf("  %s\n", err);
        return;
    }
    const struct stp_listener_cfg *a = &c.listeners[0], *b = &c.listeners[1];
    CHECK(a->tlsp.min_version == STP_TLS_V1_2 && a->tlsp.max_version == STP_TLS_V1_3);
    CHECK(a->tlsp.ciphers == NULL && a->tlsp.groups == NULL);
    CHECK(a->verify_client == STP_VERIFY_CLIENT_NONE && a->n_sni == 0);
    CHECK(b->tlsp.min_version == STP_TLS_V1_0 && b->tlsp.max_version == STP_TLS_V1_2);
    CHECK_STR(b->tlsp.ciphers, "ECDHE-RSA-AES128-GCM-SHA256");
    CHECK_STR(b->tlsp.groups, "p-256:X25519");
    CHECK(b->verify_client == STP_VERIFY_CLIENT_OPTIONAL);
    CHECK(b->n_sni == 2);
    if (b->n_sni == 2) {
        CHECK_STR(b->sni[0].name, "mx.test");
        CHECK_STR(b->sni[1].name, "*.example.org");
        CHECK_STR(b->sni[1].key, key);
    }
    const struct stp_upstream_cfg *up = &c.upstreams[0], *v = &c.upstreams[1];
    CHECK(up->tls == STP_TLS_NONE && up->verify && up->identity == STP_ID_NONE);
    CHECK(up->server_name == NULL); /* the entry's host, ::1, is checked */
    CHECK(v->tls == STP_TLS_IMPLICIT && !v->verify);
    CHECK_STR(v->server_name, "relay.example.net");
    CHECK(v->identity == STP_ID_PROXY_V2);
    CHECK(v->tlsp.min_version == STP_TLS_V1_3);
    CHECK_STR(v->cert, cert);
    stp_config_free(&c);
}

/* A loopback listener: its upstream may log in without allow =. */
#define LST_LO "[listener a]\nlisten = 127.0.0.1:25\nupstream = up\n"
#define HOSTPORT_EXPECTED                                                      \
    "(expected HOST:PORT such as 192.0.2.1:25, [2001:db8::1]:25 or "           \
    "mx.example.net:25)"

/* Each text is parsed as "t.ini" and must fail with exactly this message,
 * leaving nothing behind. */
struct bad_case {
    const char *text;
    const char *err;
};

static void check_bad(const struct bad_case *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct stp_config cfg;
        char err[512] = "untouched";
        int rc = stp_config_parse_string("t.ini", cases[i].text, &cfg, err,
                                         sizeof(err));
        CHECK(rc == -EINVAL);
        CHECK_STR(err, cases[i].err);
        CHECK(is_zeroed(&cfg));
    }
}

/* address = A, B, ...: numeric entries parsed, names kept for the next hop
 * to resolve, the text as written for logs. */
static void test_address_lists(void)
{
    struct stp_config c;
    char err[512] = "";
    char buf[64];
    CHECK(stp_config_parse_string(
              "t.ini",
              LST_A "[upstream up]\naddress = [2001:DB8::1]:587 ,mx.Example.net:25,"
                    "\t192.0.2.1:2525 , localhost:26\n",
              &c, err, sizeof(err)) == 0);
    CHECK_STR(err, "");
    const struct stp_upstream_cfg *u = &c.upstreams[0];
    CHECK_STR(u->address_text, "[2001:DB8::1]:587 ,mx.Example.net:25,"
                               "\t192.0.2.1:2525 , localhost:26");
    CHECK(!u->original_dst && u->n_addrs == 4);
    if (u->n_addrs == 4) {
        CHECK_STR(u->addrs[0].host, "2001:DB8::1");
        CHECK(!u->addrs[0].is_name && u->addrs[0].port == 587);
        stp_format_addr((const struct sockaddr *)&u->addrs[0].addr, buf,
                        sizeof(buf));
        CHECK_STR(buf, "[2001:db8::1]:587");
        CHECK_STR(u->addrs[1].host, "mx.Example.net"); /* as written */
        CHECK(u->addrs[1].is_name && u->addrs[1].port == 25);
        CHECK(u->addrs[1].addr.ss_family == AF_UNSPEC);
        CHECK_STR(u->addrs[2].host, "192.0.2.1");
        stp_format_addr((const struct sockaddr *)&u->addrs[2].addr, buf,
                        sizeof(buf));
        CHECK_STR(buf, "192.0.2.1:2525");
        CHECK(!u->addrs[2].is_name && u->addrs[2].port == 2525);
        CHECK_STR(u->addrs[3].host, "localhost");
        CHECK(u->addrs[3].is_name && u->addrs[3].port == 26);
    }
    stp_config_free(&c);

    /* Names a resolver takes as they are; nothing is looked up (-t works
     * offline), so an unknown name loads. */
    static const char *const names[] = {
        "a:1", "localhost:65535", "xn--bcher-kva.example:25",
        "a-b.c-d.e:25", "1a.example:25", "mx1.example.123a:25",
        "no-such-host.invalid:25", "MX.EXAMPLE.NET:25",
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(names); i++) {
        char text[512];
        snprintf(text, sizeof(text), MINIMAL "[upstream v]\naddress = %s\n",
                 names[i]);
        int rc = stp_config_parse_string("t.ini", text, &c, err, sizeof(err));
        if (rc != 0)
            fprintf(stderr, "  refused %s: %s\n", names[i], err);
        CHECK(rc == 0);
        if (rc == 0)
            CHECK(c.upstreams[1].n_addrs == 1 && c.upstreams[1].addrs[0].is_name);
        stp_config_free(&c);
    }
    /* The longest label and the longest name. */
    char *longest = with_run("[upstream up]\naddress = %s.example:25\n" LST_A,
                             63, 'a');
    CHECK(stp_config_parse_string("t.ini", longest, &c, err, sizeof(err)) == 0);
    stp_config_free(&c);
    free(longest);
    char name[254];
    for (int i = 0; i < 253; i++)
        name[i] = i % 2 ? '.' : 'a'; /* a.a.a...a: 127 labels */
    name[253] = '\0';
    char text[1200];
    snprintf(text, sizeof(text), LST_A "[upstream up]\naddress = %s:25\n", name);
    CHECK(stp_config_parse_string("t.ini", text, &c, err, sizeof(err)) == 0);
    CHECK(c.n_upstreams == 1 && c.upstreams[0].n_addrs == 1);
    stp_config_free(&c);
    snprintf(text, sizeof(text), LST_A "[upstream up]\naddress = a%s:25\n", name);
    CHECK(stp_config_parse_string("t.ini", text, &c, err, sizeof(err)) < 0);
    CHECK(strstr(err, "t.ini:5: invalid value 'aa.a.a") == err);

    /* Sixteen entries, the most there may be. */
    char list[600] = "";
    for (int i = 1; i <= 16; i++)
        snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s10.0.0.%d:25",
                 i > 1 ? ", " : "", i);
    snprintf(text, sizeof(text), LST_A "[upstream up]\naddress = %s\n", list);
    CHECK(stp_config_parse_string("t.ini", text, &c, err, sizeof(err)) == 0);
    CHECK(c.upstreams[0].n_addrs == 16);
    stp_config_free(&c);
    snprintf(text, sizeof(text), LST_A "[upstream up]\naddress = %s,a.test:1\n", list);
    CHECK(stp_config_parse_string("t.ini", text, &c, err, sizeof(err)) == -EINVAL);
    CHECK_STR(err, "t.ini:5: more than 16 entries in address");
    CHECK(is_zeroed(&c));

    /* The same host on another port is another entry. */
    CHECK(stp_config_parse_string(
              "t.ini",
              LST_A "[upstream up]\naddress = mx.test:25, mx.test:587, "
                    "192.0.2.1:25, 192.0.2.1:26\n",
              &c, err, sizeof(err)) == 0);
    CHECK(c.upstreams[0].n_addrs == 4);
    stp_config_free(&c);

    /* TLS with verify: each entry's host is the name checked. */
    CHECK(stp_config_parse_string(
              "t.ini",
              LST_A "[upstream up]\naddress = mx.test:25, [::1]:25\ntls = starttls\n",
              &c, err, sizeof(err)) == 0);
    CHECK(c.upstreams[0].verify && c.upstreams[0].server_name == NULL);
    stp_config_free(&c);

    /* source = ADDRESS: numeric entries must be of its family; names are
     * resolved to addresses of that family. */
    CHECK(stp_config_parse_string(
              "t.ini",
              LST_A "[upstream up]\naddress = mx.test:25, 192.0.2.1:25\n"
                    "source = 192.0.2.9\n",
              &c, err, sizeof(err)) == 0);
    CHECK(c.upstreams[0].line_source == 6);
    stp_config_free(&c);
    CHECK(stp_config_parse_string(
              "t.ini",
              LST_A "[upstream up]\naddress = mx.test:25\nsource = [::1]\n",
              &c, err, sizeof(err)) == 0);
    stp_config_free(&c);

    static const struct bad_case bad[] = {
#define ADDR(v) LST_A "[upstream up]\naddress = " v "\n"
#define BAD_ENTRY(e) "t.ini:5: invalid value '" e "' for address " HOSTPORT_EXPECTED
        {ADDR(""), "t.ini:5: empty value for address"},
        {ADDR(","), "t.ini:5: empty entry in address (two ',' in a row or "
                    "one at an end)"},
        {ADDR("1.2.3.4:25,,1.2.3.5:25"), "t.ini:5: empty entry in address "
                                         "(two ',' in a row or one at an end)"},
        {ADDR("1.2.3.4:25 , "), "t.ini:5: empty entry in address (two ',' "
                                "in a row or one at an end)"},
        {ADDR(", 1.2.3.4:25"), "t.ini:5: empty entry in address (two ',' in "
                               "a row or one at an end)"},
        {ADDR("1.2.3.4:25, 1.2.3.4:25"),
         "t.ini:5: duplicate entry '1.2.3.4:25' in address"},
        {ADDR("[::1]:25,[0:0::1]:25"),
         "t.ini:5: duplicate entry '[0:0::1]:25' in address"},
        {ADDR("MX.example.net:25, 1.2.3.4:25, mx.EXAMPLE.net:25"),
         "t.ini:5: duplicate entry 'mx.EXAMPLE.net:25' in address"},
        {ADDR("original-destination, 1.2.3.4:25"),
         "t.ini:5: original-destination cannot be part of a list in address"},
        {ADDR("1.2.3.4:25, Original-Destination"),
         "t.ini:5: original-destination cannot be part of a list in address"},
        {ADDR("1.2.3.4:25, mx.test"), BAD_ENTRY("mx.test")},
        {ADDR("mx.test:0"), BAD_ENTRY("mx.test:0")},
        {ADDR("mx.test:65536"), BAD_ENTRY("mx.test:65536")},
        {ADDR("mx.test:25x"), BAD_ENTRY("mx.test:25x")},
        {ADDR("mx.test:+25"), BAD_ENTRY("mx.test:+25")},
        {ADDR("mx.test:"), BAD_ENTRY("mx.test:")},
        {ADDR("mx.test :25"), BAD_ENTRY("mx.test :25")},
        {ADDR("[::1]:25 [::2]:25"), BAD_ENTRY("[::1]:25 [::2]:25")},
        {ADDR("1.2.3.4:0"), BAD_ENTRY("1.2.3.4:0")},
        {ADDR("[::1]:0"), BAD_ENTRY("[::1]:0")},
        {ADDR("[::1]"), BAD_ENTRY("[::1]")},
        {ADDR("::1:25"), BAD_ENTRY("::1:25")},
        {ADDR("[1.2.3.4]:25"), BAD_ENTRY("[1.2.3.4]:25")},
        {ADDR("[mx.test]:25"), BAD_ENTRY("[mx.test]:25")},
        {ADDR("1.2.3.4:25:26"), BAD_ENTRY("1.2.3.4:25:26")},
        /* numeric-looking names: a resolver would read them as IPv4 */
        {ADDR("1.2.3:25"), BAD_ENTRY("1.2.3:25")},
        {ADDR("256.1.1.1:25"), BAD_ENTRY("256.1.1.1:25")},
        {ADDR("12345:25"), BAD_ENTRY("12345:25")},
        {ADDR("0x7f.1:25"), BAD_ENTRY("0x7f.1:25")},
        {ADDR("0x7f000001:25"), BAD_ENTRY("0x7f000001:25")},
        {ADDR("mx.example.1:25"), BAD_ENTRY("mx.example.1:25")},
        /* labels */
        {ADDR("a..b:25"), BAD_ENTRY("a..b:25")},
        {ADDR(".a:25"), BAD_ENTRY(".a:25")},
        {ADDR("mx.test.:25"), BAD_ENTRY("mx.test.:25")},
        {ADDR("-mx.test:25"), BAD_ENTRY("-mx.test:25")},
        {ADDR("mx-.test:25"), BAD_ENTRY("mx-.test:25")},
        {ADDR("mx.test-:25"), BAD_ENTRY("mx.test-:25")},
        {ADDR("mx_1.test:25"), BAD_ENTRY("mx_1.test:25")},
        {ADDR("m\xc3\xa9.test:25"), BAD_ENTRY("m\xc3\xa9.test:25")},
        {ADDR("original-dst"), BAD_ENTRY("original-dst")},
        /* source = ADDRESS against each numeric entry */
        {LST_A "[upstream up]\naddress = mx.test:25, [::1]:25\n"
               "source = 127.0.0.1\n",
         "t.ini:6: source is not of the address family of [::1]:25"},
        {LST_A "[upstream up]\naddress = [::1]:25, 10.0.0.1:25\n"
               "source = ::1\n",
         "t.ini:6: source is not of the address family of 10.0.0.1:25"},
        {LST_A "[upstream up]\naddress = [::1]:25\naddress = [::2]:25\n",
         "t.ini:6: duplicate key 'address'"},
#undef ADDR
#undef BAD_ENTRY
    };
    check_bad(bad, STP_ARRAY_LEN(bad));

    /* A 64-character label. */
    char *label64 = with_run(LST_A "[upstream up]\naddress = %s.test:25\n", 64, 'a');
    CHECK(stp_config_parse_string("t.ini", label64, &c, err, sizeof(err)) == -EINVAL);
    CHECK(strncmp(err, "t.ini:5: invalid value 'aaaa", 28) == 0);
    free(label64);
}

static void test_retry_after(void)
{
    static const struct { const char *extra; uint64_t ms; } good[] = {
        {"", 30000}, {"retry_after = 0\n", 0}, {"retry_after = 5m\n", 300000},
        {"retry_after = 250ms\n", 250},
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(good); i++) {
        struct stp_config c;
        char err[256], text[256];
        snprintf(text, sizeof(text), MINIMAL "%s", good[i].extra);
        CHECK(stp_config_parse_string("t.ini", text, &c, err, sizeof(err)) == 0);
        CHECK(c.n_upstreams == 1 && c.upstreams[0].retry_after_ms == good[i].ms);
        stp_config_free(&c);
    }
    static const struct bad_case bad[] = {
        {MINIMAL "retry_after = -1\n",
         "t.ini:6: invalid value '-1' for retry_after (expected a duration "
         "like 30s, 5m, 1h or 250ms, or 0)"},
        {MINIMAL "retry_after = soon\n",
         "t.ini:6: invalid value 'soon' for retry_after (expected a duration "
         "like 30s, 5m, 1h or 250ms, or 0)"},
        {LST_A "[upstream up]\nretry_after = 1s\naddress = 1.2.3.4:25\n"
               "retry_after = 2s\n",
         "t.ini:7: duplicate key 'retry_after'"},
    };
    check_bad(bad, STP_ARRAY_LEN(bad));
}

/* stp_read_secret: one final newline dropped, nothing else that would end
 * up in a protocol line, and no byte of the content in a reason. */
static void test_secret(const char *dir)
{
    static const struct {
        const char *content;
        size_t len;
        const char *want; /* NULL: refused with WHY */
        const char *why;
    } cases[] = {
        {"s3cret", 6, "s3cret", NULL},
        {"s3cret\n", 7, "s3cret", NULL},
        {"s3cret\r\n", 8, "s3cret", NULL},
        {"pass word \xc3\xa9", 12, "pass word \xc3\xa9", NULL},
        {"s3cret\n\n", 8, NULL, "contains a control character"},
        {"s3cret\r", 7, NULL, "contains a control character"},
        {"s3cret\r\r\n", 9, NULL, "contains a control character"},
        {"s3c\0ret", 7, NULL, "contains a control character"},
        {"s3c\tret", 7, NULL, "contains a control character"},
        {"s3c\x7fret", 7, NULL, "contains a control character"},
        {"s3c\nret\n", 8, NULL, "contains a control character"},
        {"", 0, NULL, "empty"},
        {"\n", 1, NULL, "empty"},
        {"\r\n", 2, NULL, "empty"},
    };
    char path[512];
    snprintf(path, sizeof(path), "%s/secret", dir);
    for (size_t i = 0; i < STP_ARRAY_LEN(cases); i++) {
        write_file(path, cases[i].content, cases[i].len);
        char *got = (char *)"untouched", why[256] = "";
        int rc = stp_read_secret(path, &got, why, sizeof(why));
        if (cases[i].want != NULL) {
            CHECK(rc == 0);
            CHECK_STR(got, cases[i].want);
            stp_secret_free(got);
        } else {
            CHECK(rc == -EINVAL && got == NULL);
            CHECK(strncmp(why, cases[i].why, strlen(cases[i].why)) == 0);
            CHECK(strstr(why, "s3c") == NULL);
        }
    }

    /* 4096 bytes at most, the final newline included. */
    char big[4098];
    memset(big, 'a', sizeof(big));
    write_file(path, big, 4096);
    char *got = NULL, why[256] = "";
    CHECK(stp_read_secret(path, &got, why, sizeof(why)) == 0);
    CHECK(got != NULL && strlen(got) == 4096);
    stp_secret_free(got);
    big[4096] = '\n';
    write_file(path, big, 4097);
    CHECK(stp_read_secret(path, &got, why, sizeof(why)) == -EFBIG && got == NULL);
    CHECK_STR(why, "longer than 4096 bytes");
    write_file(path, big, 4098);
    CHECK(stp_read_secret(path, &got, why, sizeof(why)) == -EFBIG);
    unlink(path);
    CHECK(stp_read_secret(path, &got, why, sizeof(why)) == -ENOENT && got == NULL);
    CHECK_STR(why, "No such file or directory");
    CHECK(stp_read_secret(dir, &got, why, sizeof(why)) == -EISDIR);
    CHECK_STR(why, "Is a directory");
    stp_secret_free(NULL);
}

/* auth =, username =, password_file =, token_file =, helo_name =. Run in
 * DIR, so files have short names: pw, tok, empty (and none, missing). */
static void test_auth(const char *dir)
{
    char err[512];
    struct stp_config c;
    int back = open(".", O_RDONLY | O_DIRECTORY);
    CHECK(back >= 0 && chdir(dir) == 0);
    write_file("pw", "s3cr3t-pw\n", 10);
    write_file("tok", "not read at load", 16);
    write_file("empty", "\n", 1);

    CHECK(stp_config_parse_string(
              "t.ini",
              LST_LO "[upstream up]\naddress = smtp.example.net:587\n"
                     "tls = starttls\nauth = PLAIN\nusername = user@example.net\n"
                     "password_file = pw\nhelo_name = mx.example.net\n",
              &c, err, sizeof(err)) == 0);
    CHECK_STR(err, "");
    const struct stp_upstream_cfg *u = &c.upstreams[0];
    CHECK(u->auth == STP_AUTH_PLAIN && u->line_auth == 7);
    CHECK_STR(u->username, "user@example.net");
    CHECK_STR(u->password_file, "pw");
    CHECK_STR(u->password, "s3cr3t-pw");
    CHECK(u->token_file == NULL);
    CHECK_STR(u->helo_name, "mx.example.net");
    stp_config_free(&c);

    CHECK(stp_config_parse_string(
              "t.ini",
              LST_LO "[upstream up]\naddress = 192.0.2.1:465\ntls = implicit\n"
                     "auth = xoauth2\nusername = u\ntoken_file = tok\n"
                     "client_identity = proxy-v2\n",
              &c, err, sizeof(err)) == 0);
    u = &c.upstreams[0];
    CHECK(u->auth == STP_AUTH_XOAUTH2 && u->password == NULL);
    CHECK_STR(u->token_file, "tok");
    stp_config_free(&c);

    CHECK(stp_config_parse_string(
              "t.ini",
              LST_LO "[upstream up]\naddress = 192.0.2.1:587\ntls = starttls\n"
                     "auth = login\nusername = u\npassword_file = pw\n",
              &c, err, sizeof(err)) == 0);
    CHECK(c.upstreams[0].auth == STP_AUTH_LOGIN);
    stp_config_free(&c);

    /* Errors at the line of the key at fault. */
#define AUP(keys) LST_LO "[upstream up]\naddress = 192.0.2.1:25\n" keys
#define USER_EXPECTED                                                          \
    "(expected a user name of 1 to 255 bytes without blanks or control "      \
    "characters)"
    static const struct bad_case bad[] = {
        {AUP("auth = plain\nusername = u\npassword_file = pw\n"),
         "t.ini:6: auth needs tls = starttls or implicit: the password would "
         "cross in clear"},
        {AUP("tls = none\nauth = login\nusername = u\npassword_file = pw\n"),
         "t.ini:7: auth needs tls = starttls or implicit: the password would "
         "cross in clear"},
        {AUP("tls = opportunistic\nauth = login\nusername = u\n"
             "password_file = pw\n"),
         "t.ini:7: auth needs tls = starttls or implicit: with opportunistic, "
         "a next hop that does not offer STARTTLS would get the password in "
         "clear"},
        {AUP("tls = starttls\nauth = plain\npassword_file = pw\n"),
         "t.ini:7: auth = plain needs username"},
        {AUP("tls = starttls\nauth = login\nusername = u\n"),
         "t.ini:7: auth = login needs password_file"},
        {AUP("tls = starttls\nauth = xoauth2\nusername = u\n"),
         "t.ini:7: auth = xoauth2 needs token_file"},
        {AUP("tls = starttls\nauth = xoauth2\nusername = u\ntoken_file = tok\n"
             "password_file = pw\n"),
         "t.ini:10: password_file is for auth = plain or login (xoauth2 takes "
         "token_file)"},
        {AUP("tls = starttls\nauth = plain\nusername = u\npassword_file = pw\n"
             "token_file = tok\n"),
         "t.ini:10: token_file is for auth = xoauth2 (plain and login take "
         "password_file)"},
        {AUP("username = u\n"),
         "t.ini:6: username needs auth = plain, login or xoauth2"},
        {AUP("auth = none\npassword_file = pw\n"),
         "t.ini:7: password_file needs auth = plain, login or xoauth2"},
        {AUP("tls = starttls\ntoken_file = tok\n"),
         "t.ini:7: token_file needs auth = plain, login or xoauth2"},
        {AUP("tls = implicit\nauth = plain\nusername = u\npassword_file = pw\n"
             "client_identity = xclient\n"),
         "t.ini:10: client_identity = xclient cannot be used with auth: "
         "XCLIENT resets the session the proxy authenticated (use proxy-v1, "
         "proxy-v2 or none)"},
        {AUP("auth = cram-md5\n"), "t.ini:6: invalid value 'cram-md5' for "
                                   "auth (expected none, plain, login or "
                                   "xoauth2)"},
        {AUP("username = a b\n"),
         "t.ini:6: invalid value 'a b' for username " USER_EXPECTED},
        {AUP("username = a\x01z\n"),
         "t.ini:6: invalid value 'a\x01z' for username " USER_EXPECTED},
        {AUP("username = a\x7fz\n"),
         "t.ini:6: invalid value 'a\x7fz' for username " USER_EXPECTED},
        {AUP("username =\n"), "t.ini:6: invalid value '' for username " USER_EXPECTED},
        {AUP("password_file =\n"), "t.ini:6: empty value for password_file"},
        {AUP("token_file =\n"), "t.ini:6: empty value for token_file"},
        {AUP("helo_name = mx example\n"), "t.ini:6: invalid value 'mx "
                                          "example' for helo_name (expected "
                                          "a host name)"},
        {AUP("tls = starttls\nauth = plain\nauth = login\n"),
         "t.ini:8: duplicate key 'auth'"},
        {AUP("tls = starttls\nauth = plain\nusername = u\n"
             "password_file = none\n"),
         "t.ini:9: cannot read password_file 'none': No such file or "
         "directory"},
        {AUP("tls = starttls\nauth = plain\nusername = u\n"
             "password_file = empty\n"),
         "t.ini:9: password_file 'empty': empty"},
        {AUP("tls = starttls\nauth = xoauth2\nusername = u\ntoken_file = none\n"),
         "t.ini:9: cannot read token_file 'none': No such file or directory"},
        {AUP("tls = starttls\nauth = xoauth2\nusername = u\ntoken_file = .\n"),
         "t.ini:9: cannot read token_file '.': Is a directory"},
    };
    check_bad(bad, STP_ARRAY_LEN(bad));
#undef USER_EXPECTED

    /* 255 bytes of user name, not 256. */
    char *user = with_run(AUP("tls = starttls\nauth = plain\nusername = %s\n"
                              "password_file = pw\n"), 255, 'u');
    CHECK(stp_config_parse_string("t.ini", user, &c, err, sizeof(err)) == 0);
    CHECK(c.n_upstreams == 1 && strlen(c.upstreams[0].username) == 255);
    stp_config_free(&c);
    free(user);
    user = with_run(AUP("username = %s\n"), 256, 'u');
    CHECK(stp_config_parse_string("t.ini", user, &c, err, sizeof(err)) == -EINVAL);
    CHECK(strncmp(err, "t.ini:6: invalid value 'uuu", 27) == 0);
    free(user);

    /* A password of several lines is refused without being quoted. */
    write_file("pw", "s3cr3t\nmore\n", 12);
    CHECK(stp_config_parse_string(
              "t.ini",
              AUP("tls = starttls\nauth = plain\nusername = u\npassword_file = pw\n"),
              &c, err, sizeof(err)) == -EINVAL);
    CHECK(strncmp(err, "t.ini:9: password_file 'pw': ", 29) == 0);
    CHECK(strstr(err, "s3cr3t") == NULL && strstr(err, "more") == NULL);
#undef AUP
    unlink("pw");
    unlink("tok");
    unlink("empty");
    CHECK(back >= 0 && fchdir(back) == 0);
    close(back);
}

/* allow =: who may connect; required where a listener others can reach
 * relays with the proxy's own account. Run in DIR, for the file pw. */
static void test_allow(const char *dir)
{
    struct stp_config c;
    char err[512] = "";
    int back = open(".", O_RDONLY | O_DIRECTORY);
    CHECK(back >= 0 && chdir(dir) == 0);
    write_file("pw", "s3cr3t", 6);
#define AUTH_UP                                                                \
    "[upstream up]\naddress = 192.0.2.1:587\ntls = starttls\nauth = plain\n"  \
    "username = u\npassword_file = pw\n"
    CHECK(stp_config_parse_string(
              "t.ini",
              LST_A "allow = 10.0.0.0/8, 192.0.2.1 2001:db8::/32\n" AUTH_UP,
              &c, err, sizeof(err)) == 0);
    CHECK_STR(err, "");
    const struct stp_listener_cfg *l = &c.listeners[0];
    CHECK(l->n_allow == 3 && l->line_allow == 4);
    struct sockaddr_storage ss = {0};
    ss.ss_family = AF_INET;
    inet_pton(AF_INET, "10.9.8.7", &((struct sockaddr_in *)&ss)->sin_addr);
    CHECK(stp_cidr_match(l->allow, l->n_allow, &ss));
    inet_pton(AF_INET, "192.0.2.2", &((struct sockaddr_in *)&ss)->sin_addr);
    CHECK(!stp_cidr_match(l->allow, l->n_allow, &ss));
    CHECK(l->n_proxy_from == 0); /* a list of its own */
    stp_config_free(&c);

    /* Loopback needs no allow =; without auth, nothing needs it. */
    static const char *const ok[] = {
        "[listener a]\nlisten = 127.0.0.1:25\nupstream = up\n" AUTH_UP,
        "[listener a]\nlisten = 127.8.9.10:25\nupstream = up\n" AUTH_UP,
        "[listener a]\nlisten = [::1]:25\nupstream = up\n" AUTH_UP,
        "[listener a]\nlisten = [::ffff:127.0.0.1]:25\nupstream = up\n" AUTH_UP,
        LST_A "allow = 192.0.2.0/24\n" UP,
        MINIMAL,
    };
    for (size_t i = 0; i < STP_ARRAY_LEN(ok); i++) {
        int rc = stp_config_parse_string("t.ini", ok[i], &c, err, sizeof(err));
        if (rc != 0)
            fprintf(stderr, "  %s\n", err);
        CHECK(rc == 0);
        stp_config_free(&c);
    }

    static const struct bad_case bad[] = {
        {LST_A AUTH_UP,
         "t.ini:1: listener 'a' relays with the account of upstream 'up' "
         "(auth = plain): allow = is needed on a non-loopback listen address"},
        {"[listener a]\nlisten = [::]:25\nupstream = up\n" AUTH_UP,
         "t.ini:1: listener 'a' relays with the account of upstream 'up' "
         "(auth = plain): allow = is needed on a non-loopback listen address"},
        /* Loopback, but the clients are anyone a load balancer or an
         * interception brings. */
        {"[listener a]\nlisten = 127.0.0.1:25\nupstream = up\n"
         "proxy_protocol = v2\nproxy_protocol_from = 127.0.0.1\n" AUTH_UP,
         "t.ini:1: listener 'a' relays with the account of upstream 'up' "
         "(auth = plain): allow = is needed where clients come through a "
         "PROXY header or interception"},
        {"[listener a]\nlisten = 127.0.0.1:25\nupstream = up\n"
         "transparent = yes\n" AUTH_UP,
         "t.ini:1: listener 'a' relays with the account of upstream 'up' "
         "(auth = plain): allow = is needed where clients come through a "
         "PROXY header or interception"},
        {"[listener a]\nlisten = 127.0.0.1:25\nupstream = up\n"
         "[upstream up]\naddress = 192.0.2.1:587\ntls = starttls\n"
         "verify = no\nauth = plain\nusername = u\npassword_file = pw\n",
         "t.ini:7: auth needs verify = yes: an unverified next hop would be "
         "given the password (trust a private relay's certificate with "
         "ca_file)"},
        {"[listener a]\nlisten = 127.0.0.1:25\nupstream = up\n"
         "[listener b]\nlisten = 192.0.2.7:25\nupstream = up\n" AUTH_UP,
         "t.ini:4: listener 'b' relays with the account of upstream 'up' "
         "(auth = plain): allow = is needed on a non-loopback listen address"},
        {AUTH_UP "[listener b]\nlisten = [2001:db8::1]:25\nupstream = up\n",
         "t.ini:7: listener 'b' relays with the account of upstream 'up' "
         "(auth = plain): allow = is needed on a non-loopback listen address"},
        {LST_A "allow = 10.0.0.0/33\n" UP,
         "t.ini:4: invalid value '10.0.0.0/33' for allow (expected addresses "
         "or CIDR blocks such as 10.0.0.0/8, 2001:db8::/32)"},
        {LST_A "allow = mx.test\n" UP,
         "t.ini:4: invalid value 'mx.test' for allow (expected addresses "
         "or CIDR blocks such as 10.0.0.0/8, 2001:db8::/32)"},
        {LST_A "allow = , \n" UP, "t.ini:4: empty value for allow"},
        {LST_A "allow = ::1\nallow = ::2\n" UP, "t.ini:5: duplicate key 'allow'"},
    };
    check_bad(bad, STP_ARRAY_LEN(bad));
#undef AUTH_UP
    unlink("pw");
    CHECK(back >= 0 && fchdir(back) == 0);
    close(back);
}

/* A FIFO without a writer held -t and a reload in open(). */
static void test_fifo(const char *dir)
{
    char path[256], text[512], err[512] = "", want[512];
    snprintf(path, sizeof(path), "%s/fifo", dir);
    CHECK(mkfifo(path, 0600) == 0);
    snprintf(text, sizeof(text),
             "[listener a]\nlisten = 0.0.0.0:25\nupstream = up\ncert = %s\n"
             "key = /dev/null\n[upstream up]\naddress = 127.0.0.1:2525\n",
             path);
    struct stp_config c;
    CHECK(stp_config_parse_string("t.ini", text, &c, err, sizeof(err)) ==
          -EINVAL);
    snprintf(want, sizeof(want), "t.ini:4: cert '%s' is a FIFO or a socket, "
             "not a file", path);
    CHECK_STR(err, want);
    unlink(path);
}

int main(void)
{
    char dir[] = "/tmp/stp-test-config-XXXXXX";
    char cert[sizeof(dir) + 16], key[sizeof(dir) + 16];
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(cert, sizeof(cert), "%s/cert.pem", dir);
    snprintf(key, sizeof(key), "%s/key.pem", dir);
    write_file(cert, "-----BEGIN CERTIFICATE-----\n", 28);
    write_file(key, "-----BEGIN PRIVATE KEY-----\n", 28);

    test_durations();
    test_hostport();
    test_port_zero();
    test_same_addr();
    test_errors();
    test_line_too_long();
    test_long_lines();
    test_defaults();
    test_proxy_protocol();
    test_full(cert, key);
    test_tls_keys(cert, key);
    test_load(dir, cert, key);
    test_shipped_example();
    test_address_lists();
    test_retry_after();
    test_secret(dir);
    test_auth(dir);
    test_allow(dir);
    test_fifo(dir);

    unlink(cert);
    unlink(key);
    rmdir(dir);
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed == 0 ? 0 : 1;
}
