/* Base64 for SASL: the RFC 4648 section 10 vectors both ways, every byte
 * value round-tripped, and what decoding must refuse. */
#include <errno.h>
#include <stdint.h>

#include "base64.h"

#include "unit.h"

static void test_vectors(void)
{
    static const char *const v[][2] = {
        {"", ""},         {"f", "Zg=="},         {"fo", "Zm8="},
        {"foo", "Zm9v"},  {"foob", "Zm9vYg=="},  {"fooba", "Zm9vYmE="},
        {"foobar", "Zm9vYmFy"},
    };
    case_begin("RFC 4648 vectors");
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        char out[16];
        unsigned char back[16];
        size_t n = stp_b64_encode(v[i][0], strlen(v[i][0]), out);
        CHECK(n == strlen(v[i][1]) && strcmp(out, v[i][1]) == 0,
              "encode \"%s\": \"%s\"", v[i][0], out);
        long m = stp_b64_decode(v[i][1], strlen(v[i][1]), back, sizeof(back));
        CHECK(m == (long)strlen(v[i][0]) &&
                  memcmp(back, v[i][0], (size_t)m) == 0,
              "decode \"%s\": %ld", v[i][1], m);
    }
    case_end();
}

static void test_all_bytes(void)
{
    case_begin("every byte value round-trips, at every length");
    unsigned char in[256], back[256];
    char out[STP_B64_LEN(256) + 1];
    for (int i = 0; i < 256; i++)
        in[i] = (unsigned char)(255 - i);
    for (size_t n = 0; n <= 256; n++) {
        size_t k = stp_b64_encode(in, n, out);
        long m = stp_b64_decode(out, k, back, sizeof(back));
        CHECK(k == STP_B64_LEN(n) && m == (long)n &&
                  memcmp(in, back, n) == 0,
              "length %zu", n);
    }
    case_end();
}

static void test_refused(void)
{
    static const char *const bad[] = {
        "Zg=", "Zg", "Z===", "Zg=a", "Zm9v!A==", "Zm 9", "=Zg=", "Zg==Zg==",
        "Zm9\n",
    };
    case_begin("malformed input and no room are refused");
    unsigned char out[16];
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CHECK(stp_b64_decode(bad[i], strlen(bad[i]), out, sizeof(out)) ==
                  -EINVAL,
              "\"%s\" accepted", esc(bad[i], strlen(bad[i])));
    CHECK(stp_b64_decode("Zm9vYmFy", 8, out, 5) == -EINVAL, "no room");
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    test_vectors();
    test_all_bytes();
    test_refused();
    return unit_summary();
}
