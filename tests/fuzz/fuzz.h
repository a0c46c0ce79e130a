/* What every fuzz target shares: an invariant that breaks aborts, so
 * libFuzzer keeps the input that broke it. */
#ifndef STP_FUZZ_H
#define STP_FUZZ_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(c, what)                                                         \
    do {                                                                       \
        if (!(c)) {                                                            \
            fprintf(stderr, "invariant broken: %s\n", what);                   \
            abort();                                                           \
        }                                                                      \
    } while (0)

#endif
