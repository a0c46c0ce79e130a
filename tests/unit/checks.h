/* Counting checks for the table-driven tests (config, transparent): a
 * failed check prints its expression and goes on. */
#ifndef STP_TEST_CHECKS_H
#define STP_TEST_CHECKS_H

#include <stdio.h>
#include <string.h>

static int n_passed, n_failed;

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (cond) {                                                            \
            n_passed++;                                                        \
        } else {                                                               \
            n_failed++;                                                        \
            fprintf(stderr, "%s:%d: FAIL: %s\n", __FILE__, __LINE__, #cond);   \
        }                                                                      \
    } while (0)

#define CHECK_STR(got, want)                                                   \
    do {                                                                       \
        const char *g_ = (got), *w_ = (want);                                  \
        if (g_ != NULL && strcmp(g_, w_) == 0) {                               \
            n_passed++;                                                        \
        } else {                                                               \
            n_failed++;                                                        \
            fprintf(stderr, "%s:%d: FAIL: %s\n  got:  %s\n  want: %s\n",       \
                    __FILE__, __LINE__, #got, g_ ? g_ : "(null)", w_);         \
        }                                                                      \
    } while (0)

#endif
