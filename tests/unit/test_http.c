/* The admin endpoints' request parser (http.c) and the metrics text
 * (metrics.c): table-driven, each request fed whole and at every prefix. */
#include <errno.h>
#include <stdlib.h>

#include "checks.h"
#include "config.h"
#include "http.h"
#include "metrics.h"

struct http_case {
    const char *in;
    long want;               /* head length, 0 more, -EINVAL */
    enum stp_http_method method;
    const char *path;
};

#define OK(s, m, p) {s, (long)sizeof(s) - 1, m, p}
#define BAD(s) {s, -EINVAL, 0, NULL}
#define MORE(s) {s, 0, 0, NULL}

static const struct http_case cases[] = {
    OK("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", STP_HTTP_GET, "/metrics"),
    OK("HEAD /healthz HTTP/1.0\r\n\r\n", STP_HTTP_HEAD, "/healthz"),
    OK("GET /readyz HTTP/1.0\n\n", STP_HTTP_GET, "/readyz"),
    OK("GET /metrics?x=1 HTTP/1.1\r\nhost:x\r\nAccept: */*\r\n\r\n", STP_HTTP_GET,
       "/metrics"),
    OK("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
       STP_HTTP_OTHER, "/metrics"),
    OK("get / HTTP/1.0\r\n\r\n", STP_HTTP_OTHER, "/"),
    OK("GET / HTTP/1.1\r\nHost: \xc3\xa9\t x \r\n\r\n", STP_HTTP_GET, "/"),
    MORE(""),
    MORE("GET /metrics HTTP/1.1"),
    MORE("GET /metrics HTTP/1.1\r"),
    MORE("GET /metrics HTTP/1.1\r\nHost: x\r\n"),
    MORE("GET /metrics HTTP/1.1\r\nHost: x\r\n\r"),
    BAD("GET /metrics\r\n\r\n"),
    BAD("GET /metrics HTTP/1.2\r\n\r\n"),
    BAD("GET /metrics HTTP/2.0\r\n\r\n"),
    BAD("GET /metrics http/1.1\r\nHost: x\r\n\r\n"),
    BAD("GET /metrics HTTP/1.1\r\n\r\n"),
    BAD("GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    BAD("GET /metrics HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n"),
    BAD("GET metrics HTTP/1.0\r\n\r\n"),
    BAD("GET * HTTP/1.0\r\n\r\n"),
    BAD("GET http://x/metrics HTTP/1.0\r\n\r\n"),
    BAD("GET  /metrics HTTP/1.0\r\n\r\n"),
    BAD("GET /metrics  HTTP/1.0\r\n\r\n"),
    BAD("GET /metrics HTTP/1.0 \r\n\r\n"),
    BAD(" GET /metrics HTTP/1.0\r\n\r\n"),
    BAD("\r\nGET /metrics HTTP/1.0\r\n\r\n"),
    BAD("GET\t/metrics HTTP/1.0\r\n\r\n"),
    BAD("GET /met\x7frics HTTP/1.0\r\n\r\n"),
    BAD("VERYLONGMETHODNAME1 / HTTP/1.0\r\n\r\n"),
    BAD("GET /metrics HTTP/1.0\rX\n\r\n"),
    BAD("GET /metrics HTTP/1.0\r\nHost x\r\n\r\n"),
    BAD("GET /metrics HTTP/1.0\r\n: x\r\n\r\n"),
    BAD("GET /metrics HTTP/1.0\r\nHo st: x\r\n\r\n"),
    BAD("GET /metrics HTTP/1.0\r\nA: b\r\n c\r\n\r\n"),
    BAD("GET /metrics HTTP/1.0\r\nA: b\x01\r\n\r\n"),
    BAD("GET /metrics HTTP/1.0\r\nA: b\x7f\r\n\r\n"),
    BAD("GET /metrics HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
};

static void check_http(const struct http_case *c)
{
    size_t n = strlen(c->in);
    struct stp_http_req r;
    long got = stp_http_parse(c->in, n, &r);
    if (got != c->want)
        fprintf(stderr, "case %.40s: got %ld want %ld\n", c->in, got, c->want);
    CHECK(got == c->want);
    if (c->want > 0 && got > 0) {
        CHECK(r.method == c->method);
        CHECK(r.path_len == strlen(c->path) &&
              memcmp(r.path, c->path, r.path_len) == 0);
        /* Whatever follows the head is not the parser's. */
        char *more = malloc(n + 6);
        memcpy(more, c->in, n);
        memcpy(more + n, "GARBA", 6);
        CHECK(stp_http_parse(more, n + 5, &r) == got);
        free(more);
    }
    /* Every prefix: more needed before a verdict, the verdict after. */
    bool refused = false;
    for (size_t k = 0; k < n; k++) {
        char *p = malloc(k + 1); /* exactly K bytes for ASan */
        memcpy(p, c->in, k);
        long v = stp_http_parse(p, k, &r);
        free(p);
        CHECK(v == 0 || (c->want < 0 && v == -EINVAL));
        CHECK(!refused || v == -EINVAL);
        refused |= v < 0;
    }
}

/* Two workers' counters summed, label values escaped, histograms
 * cumulative. */
static void check_render(void)
{
    struct stp_metrics m;
    CHECK(stp_metrics_init(&m, 2) == 0);
    struct stp_listener_cfg lst[2] = {{.name = "in"}, {.name = "we\"ird\\na\nme"}};
    struct stp_upstream_cfg up[1] = {{.name = "mx"}};
    struct stp_config cfg = {.listeners = lst, .n_listeners = 2,
                             .upstreams = up, .n_upstreams = 1};
    stp_metrics_map(&m, &cfg);
    CHECK(lst[0].metrics_slot == 0 && lst[1].metrics_slot == 1 &&
          up[0].metrics_slot == 0);
    /* A reload naming the same listener again keeps its slot. */
    struct stp_listener_cfg again[1] = {{.name = "in"}};
    struct stp_config cfg2 = {.listeners = again, .n_listeners = 1};
    stp_metrics_map(&m, &cfg2);
    CHECK(again[0].metrics_slot == 0 && m.n_lst == 2);

    const uint64_t bytes[STP_MX_DIRS] = {10, 20, 30, 40};
    for (int w = 0; w < 2; w++) {
        stp_mx_opened(&m.w[w], 0);
        stp_mx_opened(&m.w[w], 0);
        stp_mx_handshake(&m.w[w], 0, true, 30 * 1000000ull);  /* 0.03 s */
        stp_mx_closed(&m.w[w], 0, STP_CLOSE_QUIT, 2000, bytes);
        stp_mx_upstream(&m.w[w], 0, w == 0);
    }
    stp_mx_opened(&m.w[1], 1);
    stp_mx_handshake(&m.w[1], 1, false, 0);
    stp_mx_closed(&m.w[1], 1, STP_CLOSE_NOT_ALLOWED, 5, bytes);
    stp_mx_opened(NULL, 0);  /* no metrics: nothing happens */
    stp_mx_closed(&m.w[0], -1, STP_CLOSE_QUIT, 1, bytes);

    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    struct stp_mx_process p = {.version = "1.2.3", .workers = 2, .draining = true,
                               .reloads_ok = 4};
    CHECK(stp_metrics_render(&m, &p, f) == 0);
    fclose(f);
    static const char *const want[] = {
        "# TYPE starttls_proxy_build_info gauge\n"
        "starttls_proxy_build_info{version=\"1.2.3\"} 1\n",
        "starttls_proxy_workers 2\n",
        "starttls_proxy_draining 1\n",
        "starttls_proxy_reloads_total{result=\"ok\"} 4\n",
        "starttls_proxy_reloads_total{result=\"failed\"} 0\n",
        "starttls_proxy_connections_total{listener=\"in\"} 4\n",
        "starttls_proxy_connections_active{listener=\"in\"} 2\n",
        "starttls_proxy_connections_total{listener=\"we\\\"ird\\\\na\\nme\"} 1\n",
        "starttls_proxy_connections_active{listener=\"we\\\"ird\\\\na\\nme\"} 0\n",
        "starttls_proxy_connections_rejected_total{listener=\"we\\\"ird\\\\na\\nme\","
        "reason=\"not_allowed\"} 1\n",
        "starttls_proxy_connections_rejected_total{listener=\"in\",reason=\"not_allowed\"} 0\n",
        "starttls_proxy_sessions_closed_total{listener=\"in\",reason=\"quit\"} 2\n",
        "starttls_proxy_tls_handshakes_total{listener=\"in\",result=\"ok\"} 2\n",
        "starttls_proxy_tls_handshakes_total{listener=\"we\\\"ird\\\\na\\nme\",result=\"failed\"} 1\n",
        "starttls_proxy_tls_handshake_duration_seconds_bucket{listener=\"in\",le=\"0.025\"} 0\n",
        "starttls_proxy_tls_handshake_duration_seconds_bucket{listener=\"in\",le=\"0.05\"} 2\n",
        "starttls_proxy_tls_handshake_duration_seconds_bucket{listener=\"in\",le=\"+Inf\"} 2\n",
        "starttls_proxy_tls_handshake_duration_seconds_sum{listener=\"in\"} 0.060000\n",
        "starttls_proxy_tls_handshake_duration_seconds_count{listener=\"in\"} 2\n",
        "starttls_proxy_bytes_total{listener=\"in\",direction=\"client_in\"} 20\n",
        "starttls_proxy_bytes_total{listener=\"in\",direction=\"upstream_out\"} 80\n",
        "starttls_proxy_session_duration_seconds_bucket{listener=\"in\",le=\"1\"} 0\n",
        "starttls_proxy_session_duration_seconds_bucket{listener=\"in\",le=\"2.5\"} 2\n",
        "starttls_proxy_session_duration_seconds_sum{listener=\"in\"} 4.000000\n",
        "starttls_proxy_upstream_connections_total{upstream=\"mx\",result=\"ok\"} 1\n",
        "starttls_proxy_upstream_connections_total{upstream=\"mx\",result=\"failed\"} 1\n",
        "starttls_proxy_upstream_auth_total{upstream=\"mx\",result=\"ok\"} 0\n",
    };
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        bool found = text && strstr(text, want[i]) != NULL;
        if (!found)
            fprintf(stderr, "metrics text lacks: %s", want[i]);
        CHECK(found);
    }
    /* Every family has its HELP and TYPE, every counter ends in _total. */
    for (char *l = text; l && *l; l = strchr(l, '\n') + 1) {
        if (strncmp(l, "# TYPE ", 7) == 0 && strstr(l, " counter\n") == strchr(l, '\n') - 8)
            CHECK(strstr(l, "_total counter\n") == strchr(l, '\n') - 14);
        if (!strchr(l, '\n'))
            break;
    }
    free(text);
    stp_metrics_free(&m);
}

int main(void)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_http(&cases[i]);
    check_render();
    CHECK(stp_mx_refusal(STP_CLOSE_PROXY_HEADER_INVALID) &&
          !stp_mx_refusal(STP_CLOSE_QUIT));
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
