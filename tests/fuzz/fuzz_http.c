/* libFuzzer target for the admin endpoints' request parser (http.c).
 * Whatever the bytes, the parser stays inside them and sees a request the
 * same way whole or in part: a complete head needs more at every shorter
 * prefix, is found again at its exact length and with anything after it; a
 * refusal stays a refusal at every longer prefix; the path it reports lies
 * inside the input and starts with '/'. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "http.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    /* A copy of exactly SIZE bytes: ASan catches a read past it. */
    char *p = malloc(size ? size : 1);
    memcpy(p, data, size);
    struct stp_http_req r;
    long whole = stp_http_parse(p, size, &r);
    CHECK(whole == 0 || whole == -EINVAL || (whole > 0 && (size_t)whole <= size),
          "a length inside the input, 0 or -EINVAL");
    if (whole > 0) {
        CHECK(r.path >= p && r.path + r.path_len <= p + whole && r.path_len > 0 &&
                  r.path[0] == '/',
              "the path inside the head");
        CHECK(r.minor == 0 || r.minor == 1, "HTTP/1.0 or 1.1");
        CHECK(stp_http_parse(p, (size_t)whole, &r) == whole,
              "found again at its exact length");
        for (size_t k = 0; k < (size_t)whole; k++)
            CHECK(stp_http_parse(p, k, &r) == 0, "a prefix needs more");
    } else if (whole < 0) {
        long prev = 0;
        for (size_t k = 0; k <= size; k++) {
            long got = stp_http_parse(p, k, &r);
            CHECK(got == 0 || got == -EINVAL, "no head before a refusal");
            CHECK(prev == 0 || got == prev, "refused stays refused");
            prev = got;
        }
    }
    free(p);
    return 0;
}
