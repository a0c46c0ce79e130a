/* libFuzzer target for the PROXY protocol receiver (proxy_header.c). The
 * first byte picks the versions the listener takes; the rest is what the
 * load balancer sent. Whatever it is, the parser stays inside the bytes and
 * its bounds, and a header is seen the same way whole or as a prefix: a
 * complete one needs more at every shorter prefix and is found again at its
 * exact length; a refused one is refused at every longer prefix too. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proxy_header.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    if (size < 1)
        return 0;
    unsigned versions = data[0] % 3 + 1;
    data++, size--;
    /* A copy of exactly SIZE bytes: ASan catches a read past it. */
    char *p = malloc(size ? size : 1);
    memcpy(p, data, size);
    struct stp_pp_result r;
    int whole = stp_pp_parse(p, size, versions, &r);
    CHECK(whole <= (int)size, "never more than was given");
    if (whole > 0) {
        CHECK(r.len == (size_t)whole && r.version >= 1 && r.version <= 2 &&
                  (versions >> (r.version - 1)) & 1,
              "a version the listener takes");
        CHECK(r.version == 1 ? r.len <= STP_PP_V1_MAX : r.len <= STP_PP_V2_MAX,
              "within the bounds");
        CHECK(r.local || r.src.ss_family == r.dst.ss_family,
              "both addresses of one family");
        CHECK(stp_pp_parse(p, (size_t)whole, versions, &r) == whole,
              "found again at its exact length");
        for (size_t k = 0; k < (size_t)whole; k++)
            CHECK(stp_pp_parse(p, k, versions, &r) == 0,
                  "a prefix of a valid header needs more");
    } else if (whole < 0) {
        CHECK(r.reason != NULL, "a reason for every refusal");
        int prev = 0;
        for (size_t k = 0; k <= size; k++) {
            int got = stp_pp_parse(p, k, versions, &r);
            CHECK(got == 0 || got == whole, "one verdict for all prefixes");
            CHECK(prev == 0 || got == prev, "refused stays refused");
            prev = got;
        }
    }
    free(p);
    return 0;
}
