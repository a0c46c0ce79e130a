/* log_format = json (proxy/log_json.c): text bodies and the exact objects
 * they become; every output, cut or not, checked by a strict validator of
 * the JSON the converter may write; and stp_log itself through a pipe. */
#include <fcntl.h>
#include <stdlib.h>

#include "log.h"

#include "unit.h"

#define TS "2026-12-06T07:39:18.123Z"
#define HEAD "{\"ts\":\"" TS "\",\"level\":\"info\","

/* A string as the converter writes it: printable ASCII, escapes \" \\ and
 * \u00HH only. Returns the position after its closing quote, or NULL. */
static const char *json_string(const char *p)
{
    if (*p++ != '"')
        return NULL;
    for (;; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"')
            return p + 1;
        if (c < 0x20 || c >= 0x7f)
            return NULL;
        if (c != '\\')
            continue;
        p++;
        if (*p == '"' || *p == '\\')
            continue;
        if (p[0] != 'u' || p[1] != '0' || p[2] != '0' || !p[3] || !p[4] ||
            !strchr("0123456789abcdef", p[3]) ||
            !strchr("0123456789abcdef", p[4]))
            return NULL;
        p += 4;
    }
}

/* One object of string members (a value may be true), nothing after it.
 * *KEYS gets how many members it has; duplicate keys are refused. */
static bool json_valid(const char *s, int *keys)
{
    const char *k[512];
    size_t kl[512];
    int n = 0;
    const char *p = s;
    if (*p++ != '{')
        return false;
    for (;;) {
        const char *e = json_string(p);
        if (!e || *e != ':' || n == 512)
            return false;
        for (int i = 0; i < n; i++)
            if (kl[i] == (size_t)(e - p) && memcmp(k[i], p, kl[i]) == 0)
                return false;
        k[n] = p;
        kl[n++] = (size_t)(e - p);
        p = e + 1;
        if (strncmp(p, "true", 4) == 0)
            p += 4;
        else if (!(p = json_string(p)))
            return false;
        if (*p == '}')
            break;
        if (*p++ != ',')
            return false;
    }
    *keys = n;
    return p[1] == '\0';
}

struct jcase {
    const char *name;
    const char *body;
    size_t n;
    bool cut;
    const char *want;
};

static const struct jcase cases[] = {
    {"ordinary line", S("id=1f3a event=connect client=127.0.0.1:5 "
                        "listener=main"), false,
     HEAD "\"event\":\"connect\",\"id\":\"1f3a\",\"client\":\"127.0.0.1:5\","
          "\"listener\":\"main\"}"},
    {"numbers stay strings", S("event=disconnect client_in=1062 "
                               "duration_ms=32"), false,
     HEAD "\"event\":\"disconnect\",\"client_in\":\"1062\","
          "\"duration_ms\":\"32\"}"},
    {"quoted value with blanks", S("event=reload msg=\"workers changes only "
                                   "on restart\" workers=2"), false,
     HEAD "\"event\":\"reload\",\"msg\":\"workers changes only on restart\","
          "\"workers\":\"2\"}"},
    {"\\\" and \\\\ in a quoted value", S("event=tls_error error=\"bad "
                                          "\\\"x\\\" a\\\\b\""), false,
     HEAD "\"event\":\"tls_error\",\"error\":\"bad \\\"x\\\" a\\\\b\"}"},
    {"\\xHH: the peer's bytes as U+00HH",
     S("event=starttls sni=\"a.test\\x0aforged\\xc3\\xa9\\x7f\" next=1"), false,
     HEAD "\"event\":\"starttls\",\"sni\":\"a.test\\u000aforged\\u00c3"
          "\\u00a9\\u007f\",\"next\":\"1\"}"},
    {"escaped backslash before x is no byte", S("event=e v=\"\\\\x41\""), false,
     HEAD "\"event\":\"e\",\"v\":\"\\\\x41\"}"},
    {"control and non-ASCII bytes reaching the converter",
     S("event=e v=a\x01\x1f\xff\"b"), false,
     HEAD "\"event\":\"e\",\"v\":\"a\\u0001\\u001f\\u00ff\\\"b\"}"},
    {"empty values and a flag", S("event=upstream_closed a= b=\"\" eof"), false,
     HEAD "\"event\":\"upstream_closed\",\"a\":\"\",\"b\":\"\",\"eof\":true}"},
    {"no event: the body is the message", S("something  \"odd\" = here"), false,
     HEAD "\"event\":\"message\",\"msg\":\"something  \\\"odd\\\" = here\"}"},
    {"empty body", S(""), false,
     HEAD "\"event\":\"message\",\"msg\":\"\"}"},
    {"twins get _2, _3", S("a=1 event=x a=2 level=y a=3 event=z ts=t"), false,
     HEAD "\"event\":\"x\",\"a\":\"1\",\"a_2\":\"2\",\"level_2\":\"y\","
          "\"a_3\":\"3\",\"event_2\":\"z\",\"ts_2\":\"t\"}"},
    {"lenient: odd escapes, an unterminated quote",
     S("event=e v=\"a\\qb\\x4\" w=\"abc"), false,
     HEAD "\"event\":\"e\",\"v\":\"a\\\\qb\\\\x4\",\"w\":\"abc\"}"},
    {"a text line already cut", S("event=e v=\"abc"), true,
     HEAD "\"event\":\"e\",\"v\":\"abc\",\"truncated\":true}"},
    {"extra blanks", S("  event=e   a=1  "), false,
     HEAD "\"event\":\"e\",\"a\":\"1\"}"},
};

static void test_cases(void)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct jcase *c = &cases[i];
        case_begin(c->name);
        char out[4096];
        int keys;
        size_t n = stp_log_json(out, sizeof(out), TS, "info", c->body, c->n,
                                c->cut);
        CHECK(strcmp(out, c->want) == 0, "got  %s\nwant %s", out, c->want);
        CHECK(n == strlen(out), "length %zu of %zu", n, strlen(out));
        CHECK(json_valid(out, &keys), "not valid JSON: %s", out);
        case_end();
    }
}

/* Long lines: every room from the least to more than enough; the output
 * always fits, is valid, and says when it was cut. */
static void test_long(void)
{
    static char body[8192], out[16384];
    size_t n = (size_t)snprintf(body, sizeof(body), "id=1 event=disconnect");
    for (int i = 0; n < 3000; i++)
        n += (size_t)snprintf(body + n, sizeof(body) - n,
                              " k%d=\"v\\x01\\\\\\\" x%d\" f%d", i, i, i);
    case_begin("long lines: cut anywhere, still valid");
    int full_keys = 0;
    static char full[16384];
    stp_log_json(full, sizeof(full), TS, "info", body, n, false);
    CHECK(json_valid(full, &full_keys), "uncut output not valid");
    CHECK(!strstr(full, "truncated"), "cut with room enough");
    for (size_t cap = STP_LOG_JSON_MIN; cap < 9000 && cur_ok; cap += 7) {
        memset(out, 'X', sizeof(out));
        size_t k = stp_log_json(out, cap, TS, "info", body, n, false);
        int keys;
        CHECK(k < cap && out[k] == '\0' && out[cap] == 'X',
              "cap %zu: %zu bytes written", cap, k);
        CHECK(json_valid(out, &keys), "cap %zu: not valid: %s", cap,
              out + (k > 200 ? k - 200 : 0));
        bool cut = strstr(out, ",\"truncated\":true}") != NULL;
        CHECK(cut == (strcmp(out, full) != 0) && keys <= full_keys + 1,
              "cap %zu: %d of %d keys, %s", cap, keys, full_keys,
              cut ? "cut" : "not cut");
        static const char head[] = HEAD "\"event\":\"disconnect\",\"id\":\"1\"";
        CHECK(strncmp(out, head, sizeof(head) - 1) == 0,
              "cap %zu: the head is lost: %.80s", cap, out);
    }
    case_end();

    case_begin("one value longer than the room is cut, not dropped");
    n = (size_t)snprintf(body, sizeof(body), "event=x v=\"");
    for (int i = 0; i < 2000; i++)
        n += (size_t)snprintf(body + n, sizeof(body) - n, "\\x0%d", i % 10);
    size_t k = stp_log_json(out, 1000, TS, "info", body, n, false);
    int keys;
    CHECK(json_valid(out, &keys) && keys == 5, "%s", out);
    CHECK(k > 900 && strstr(out, "\"v\":\"\\u0000\\u0001"), "%zu: %s", k, out);
    n = (size_t)snprintf(body, sizeof(body), "no event at all ");
    memset(body + n, 'z', 3000);
    k = stp_log_json(out, 600, TS, "info", body, n + 3000, false);
    CHECK(json_valid(out, &keys) && keys == 5 && k > 500, "%s", out);
    case_end();
}

/* Bodies of random tokens from the bytes that matter to the converter
 * (blanks, '=', quotes, backslashes, x and hex digits, control and 8-bit
 * bytes), at random rooms: always valid JSON, always in bounds. */
static void test_random(void)
{
    static const char alphabet[] = "ab= \"\\x0f\x01\xff" "evnt";
    static const char *const starts[] = {"", "event=", "event=\"", "id=1 "};
    static char body[3000], out[20000];
    unsigned seed = 12345;
    case_begin("random bodies, random rooms");
    for (int i = 0; i < 20000 && cur_ok; i++) {
        const char *st = starts[i % 4];
        size_t n = strlen(st);
        memcpy(body, st, n);
        seed = seed * 1103515245u + 12345u;
        size_t len = n + (seed >> 16) % (i < 19000 ? 60 : 2900);
        for (; n < len; n++) {
            seed = seed * 1103515245u + 12345u;
            body[n] = alphabet[(seed >> 16) % (sizeof(alphabet) - 1)];
        }
        seed = seed * 1103515245u + 12345u;
        size_t cap = STP_LOG_JSON_MIN + (seed >> 16) % 4000;
        memset(out, 'X', cap + 1);
        size_t k = stp_log_json(out, cap, TS, "info", body, n, i % 7 == 0);
        int keys;
        CHECK(k < cap && out[k] == '\0' && out[cap] == 'X', "bounds: %s",
              esc(body, n));
        CHECK(json_valid(out, &keys), "body %s\n-> %s", esc(body, n), out);
    }
    case_end();
}

/* stp_log itself: one write, one JSON object, one newline; text again
 * when switched back. */
static void test_stp_log(void)
{
    case_begin("stp_log with log_format = json");
    int fds[2], saved = dup(STDERR_FILENO);
    CHECK(pipe(fds) == 0, "pipe");
    dup2(fds[1], STDERR_FILENO);
    stp_log_set_format(STP_LOG_JSON);
    stp_log(STP_LOG_WARN, "id=%016x event=tls_error error=\"%s\"", 0x2a,
            "a \\\"b\\\"");
    char big[3000];
    memset(big, 'q', sizeof(big) - 1);
    big[sizeof(big) - 1] = 0;
    stp_log(STP_LOG_INFO, "event=big v=\"%s\"", big);
    stp_log_set_format(STP_LOG_TEXT);
    stp_log(STP_LOG_INFO, "event=plain a=1");
    dup2(saved, STDERR_FILENO);
    close(saved);
    close(fds[1]);
    static char got[40000];
    size_t n = 0;
    ssize_t r;
    while ((r = read(fds[0], got + n, sizeof(got) - 1 - n)) > 0)
        n += (size_t)r;
    close(fds[0]);
    got[n] = 0;
    char *l1 = got, *l2 = strchr(l1, '\n'), *l3 = l2 ? strchr(l2 + 1, '\n') : NULL;
    CHECK(l2 && l3, "three lines: %s", got);
    if (l2 && l3) {
        *l2++ = 0;
        *l3++ = 0;
        int keys;
        CHECK(json_valid(l1, &keys) && keys == 5, "line 1: %s", l1);
        CHECK(strstr(l1, "\"level\":\"warn\",\"event\":\"tls_error\","
                         "\"id\":\"000000000000002a\",\"error\":\"a \\\"b\\\"\"}"),
              "line 1: %s", l1);
        CHECK(strncmp(l1, "{\"ts\":\"20", 9) == 0 && strstr(l1, "Z\",\"level\""),
              "line 1 ts: %s", l1);
        CHECK(json_valid(l2, &keys) && strstr(l2, ",\"truncated\":true}"),
              "line 2: %.100s", l2);
        CHECK(strstr(l3, " info event=plain a=1\n") && l3[0] == '2',
              "line 3 not text: %s", l3);
    }
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    test_cases();
    test_long();
    test_random();
    test_stp_log();
    return unit_summary();
}
