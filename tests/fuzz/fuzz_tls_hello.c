/* libFuzzer target for the ClientHello reassembly: any first flight, cut
 * into reads as the first byte says, is either handed on byte for byte as
 * it came or, when it was a ClientHello, as that ClientHello in one record
 * followed by whatever came after it; never more bytes than came in. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tls_hello.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    static struct stp_hello h;
    static unsigned char out[STP_HELLO_CAP];
    if (size < 1)
        return 0;
    size_t step = data[0] % 16 + 1, fed = 0;
    data++, size--;
    memset(&h, 0, sizeof(h));
    bool decided = false;
    while (fed < size && !decided) {
        size_t room;
        unsigned char *p = stp_hello_room(&h, &room);
        CHECK(room > 0, "room until decided");
        size_t k = size - fed < step ? size - fed : step;
        k = k < room ? k : room;
        memcpy(p, data + fed, k);
        fed += k;
        decided = stp_hello_add(&h, k);
    }
    size_t n = 0, k;
    while ((k = stp_hello_take(&h, out + n, 5)) > 0)
        n += k;
    CHECK(n <= fed, "never more out than in");
    CHECK(h.n_groups >= 0 && h.n_groups <= STP_HELLO_MAX_GROUPS, "groups bound");
    CHECK(memchr(h.sni, '\0', sizeof(h.sni)) != NULL, "server name ends");
    if (!decided) {
        CHECK(n == 0, "nothing handed on before the decision");
        return 0; /* waits for more */
    }
    if (n == fed && memcmp(out, data, n) == 0)
        return 0; /* as it came */
    CHECK(n >= 9 && out[0] == 22 && out[5] == 1,
          "changed only into one handshake record with the ClientHello");
    size_t rec = (size_t)out[3] << 8 | out[4];
    size_t msg = (size_t)out[6] << 16 | (size_t)out[7] << 8 | out[8];
    CHECK(rec == msg + 4 && 5 + rec <= n, "the record holds the whole message");
    return 0;
}
