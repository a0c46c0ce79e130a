/* Unit tests for the ClientHello reassembly (proxy/tls_hello.c): a
 * ClientHello split over records of 1, 2, 3, 7 and 50 bytes, fed all at once
 * and one byte at a time, must come out as the one-record form with the
 * same server name and groups; anything that is not a readable ClientHello
 * goes on byte for byte as it came.
 * Last line printed: "N passed, N failed". */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tls_hello.h"

#include "unit.h"

static size_t put16(uint8_t *p, size_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
    return 2;
}

/* A one-record ClientHello offering SNI (NULL: none) and N_GROUPS groups
 * (negative: no supported_groups extension). Returns its length. */
static size_t client_hello(uint8_t *out, const char *sni, const uint16_t *g,
                           int n_groups)
{
    uint8_t body[1024];
    size_t o = 0, ext;
    body[o++] = 3, body[o++] = 3;
    memset(body + o, 0xab, 32), o += 32;
    body[o++] = 0;                                   /* session id */
    o += put16(body + o, 4);                         /* two suites */
    o += put16(body + o, 0x1301), o += put16(body + o, 0xc02b);
    body[o++] = 1, body[o++] = 0;                    /* null compression */
    ext = o, o += 2;
    if (sni) {
        size_t n = strlen(sni);
        o += put16(body + o, 0), o += put16(body + o, n + 5);
        o += put16(body + o, n + 3);
        body[o++] = 0;
        o += put16(body + o, n);
        memcpy(body + o, sni, n), o += n;
    }
    if (n_groups >= 0) {
        o += put16(body + o, 10), o += put16(body + o, 2 + 2 * (size_t)n_groups);
        o += put16(body + o, 2 * (size_t)n_groups);
        for (int i = 0; i < n_groups; i++)
            o += put16(body + o, g[i]);
    }
    put16(body + ext, o - ext - 2);
    out[0] = 22, out[1] = 3, out[2] = 1;
    put16(out + 3, o + 4);
    out[5] = 1, out[6] = 0;
    put16(out + 7, o);
    memcpy(out + 9, body, o);
    return 9 + o;
}

/* The record REC re-split into records of at most SIZE payload bytes. */
static size_t fragment(const uint8_t *rec, size_t n, size_t size, uint8_t *out)
{
    size_t o = 0;
    for (size_t i = 5; i < n; i += size) {
        size_t k = n - i < size ? n - i : size;
        memcpy(out + o, rec, 3);
        put16(out + o + 3, k);
        memcpy(out + o + 5, rec + i, k);
        o += 5 + k;
    }
    return o;
}

/* Feed IN in pieces of STEP bytes; returns what is handed on. */
static size_t run(struct stp_hello *h, const uint8_t *in, size_t n, size_t step,
                  uint8_t *out, size_t cap)
{
    size_t fed = 0;
    memset(h, 0, sizeof(*h));
    while (fed < n) {
        size_t room;
        uint8_t *p = stp_hello_room(h, &room);
        if (room == 0)
            break;
        size_t k = n - fed < step ? n - fed : step;
        k = k < room ? k : room;
        memcpy(p, in + fed, k);
        fed += k;
        if (stp_hello_add(h, k))
            break;
    }
    size_t o = 0, k;
    while ((k = stp_hello_take(h, out + o, 7)) > 0 && o < cap)
        o += k;
    /* the rest (not taken in) goes on as it is */
    memcpy(out + o, in + fed, n - fed);
    return o + n - fed;
}

static void test_fragmented(void)
{
    static const uint16_t g[] = {0x0017, 0x001d, 0x0018};
    static const size_t sizes[] = {1, 2, 3, 7, 50, 100000};
    static const size_t steps[] = {1, 5, 100000};
    static const uint8_t tail[] = {20, 3, 3, 0, 1, 1};
    static uint8_t one[2048], in[16384], out[16384];
    static struct stp_hello h;
    size_t n1 = client_hello(one, "mx.example.net", g, 3);

    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
        for (size_t j = 0; j < sizeof(steps) / sizeof(steps[0]); j++) {
            char name[80];
            snprintf(name, sizeof(name), "records of %zu, fed %zu at a time",
                     sizes[i], steps[j]);
            case_begin(name);
            size_t n = fragment(one, n1, sizes[i], in);
            memcpy(in + n, tail, sizeof(tail));
            size_t got = run(&h, in, n + sizeof(tail), steps[j], out, sizeof(out));
            CHECK(h.decided && h.parsed, "not parsed");
            CHECK(got == n1 + sizeof(tail) && memcmp(out, one, n1) == 0 &&
                      memcmp(out + n1, tail, sizeof(tail)) == 0,
                  "handed on %s", esc((char *)out, got));
            CHECK(strcmp(h.sni, "mx.example.net") == 0, "sni '%s'", h.sni);
            CHECK(h.has_groups && h.n_groups == 3 && h.groups[0] == 0x17 &&
                      h.groups[1] == 0x1d && h.groups[2] == 0x18,
                  "groups: %d", h.n_groups);
            case_end();
        }
    }
}

static void test_no_extensions(void)
{
    static uint8_t one[2048], out[4096];
    static struct stp_hello h;
    case_begin("no server name, no supported_groups");
    size_t n = client_hello(one, NULL, NULL, -1);
    size_t got = run(&h, one, n, 100000, out, sizeof(out));
    CHECK(h.parsed && !h.has_groups && h.sni[0] == '\0', "parsed %d", h.parsed);
    CHECK(got == n && memcmp(out, one, n) == 0, "changed");
    case_end();
}

/* A long list of groups the proxy cannot name (GREASE, FFDHE, ...) before
 * an allowed one: the allowed one is seen, once. */
static void test_many_groups(void)
{
    static uint8_t one[4096], out[8192];
    static struct stp_hello h;
    uint16_t g[300];
    int n = 0;
    for (int i = 0; i < 290; i++)
        g[n++] = (uint16_t)(0x0100 + i); /* FFDHE and unassigned */
    g[n++] = 0x0a0a;                    /* GREASE */
    g[n++] = 0x001d;                    /* X25519 */
    g[n++] = 0x001d;
    g[n++] = 0x0018;                    /* P-384 */
    case_begin("an allowed group after 291 others is seen");
    size_t len = client_hello(one, "a.test", g, n);
    run(&h, one, len, 100000, out, sizeof(out));
    CHECK(h.parsed && h.has_groups, "parsed %d", h.parsed);
    CHECK(h.n_groups == 2 && h.groups[0] == 0x1d && h.groups[1] == 0x18,
          "groups: %d", h.n_groups);
    case_end();
}

/* What is not a readable ClientHello goes on untouched, for wolfSSL to judge. */
static void test_passed_on_as_is(void)
{
    static uint8_t in[STP_HELLO_CAP + 100], out[STP_HELLO_CAP + 100];
    static struct stp_hello h;
    static const struct {
        const char *name;
        const uint8_t *p;
        size_t n;
    } c[] = {
        {"alert record", (const uint8_t *)"\x15\x03\x03\x00\x02\x02\x28", 7},
        {"SSLv2-style hello", (const uint8_t *)"\x80\x2e\x01\x03\x01\x00\x15", 7},
        {"server hello", (const uint8_t *)"\x16\x03\x03\x00\x04\x02\x00\x00\x00", 9},
        {"bad extensions", (const uint8_t *)"\x16\x03\x01\x00\x2d\x01\x00\x00\x29"
                                            "\x03\x03" "0123456789abcdef0123456789abcdef"
                                            "\x00\x00\x00\x00\x00\x05\x00", 50},
    };
    for (size_t i = 0; i < sizeof(c) / sizeof(c[0]); i++) {
        case_begin(c[i].name);
        size_t got = run(&h, c[i].p, c[i].n, 100000, out, sizeof(out));
        CHECK(h.decided && !h.has_groups, "decided %d", h.decided);
        CHECK(got == c[i].n && memcmp(out, c[i].p, got) == 0, "changed");
        case_end();
    }
    /* a message larger than one record, split into full records */
    case_begin("ClientHello larger than a record");
    memcpy(in, "\x16\x03\x01\x40\x00\x01\x00\x50\x00", 9);
    memset(in + 9, 0, sizeof(in) - 9);
    size_t got = run(&h, in, sizeof(in), 1000, out, sizeof(out));
    CHECK(h.decided && !h.parsed, "parsed");
    CHECK(got == sizeof(in) && memcmp(out, in, got) == 0, "changed");
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    test_fragmented();
    test_no_extensions();
    test_many_groups();
    test_passed_on_as_is();
    return unit_summary();
}
