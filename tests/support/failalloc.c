/* LD_PRELOAD shim for the tests: while the file named by STP_FAILALLOC_FLAG
 * exists, malloc, calloc and realloc fail with ENOMEM, so a test can make a
 * running daemon go through a period without memory and come out of it. */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

void *__libc_malloc(size_t n);
void *__libc_calloc(size_t k, size_t n);
void *__libc_realloc(void *p, size_t n);

static int failing(void)
{
    static const char *flag;
    static int looked;
    if (!looked) {
        flag = getenv("STP_FAILALLOC_FLAG");
        looked = 1;
    }
    if (flag && access(flag, F_OK) == 0) {
        errno = ENOMEM;
        return 1;
    }
    return 0;
}

void *malloc(size_t n) { return failing() ? NULL : __libc_malloc(n); }
void *calloc(size_t k, size_t n) { return failing() ? NULL : __libc_calloc(k, n); }
void *realloc(void *p, size_t n) { return failing() ? NULL : __libc_realloc(p, n); }
