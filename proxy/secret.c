/* Secrets read from files. Their bytes are zeroed wherever they were copied
 * before the memory is freed, and never reach a message. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "secret.h"
#include "stp.h"

void stp_secret_free(char *s)
{
    if (s == NULL)
        return;
    explicit_bzero(s, strlen(s));
    free(s);
}

/* Up to CAP bytes of FD into BUF; *N gets how many. O_NONBLOCK: a FIFO
 * without a writer reads as empty instead of stalling the caller. */
static int read_upto(int fd, char *buf, size_t cap, size_t *n)
{
    *n = 0;
    while (*n < cap) {
        ssize_t r = read(fd, buf + *n, cap - *n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            break;
        *n += (size_t)r;
    }
    return 0;
}

/* *FD is -1 on error. */
static int open_file(const char *path, int *fd)
{
    *fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (*fd < 0)
        return -errno;
    struct stat st;
    int rc = fstat(*fd, &st) < 0 ? -errno : S_ISDIR(st.st_mode) ? -EISDIR : 0;
    if (rc < 0) {
        close(*fd);
        *fd = -1;
    }
    return rc;
}

/* What is left after the final newline goes into AUTH lines and SASL
 * strings: a CR, LF or NUL there would end or split a command. */
static const char *check_content(const char *s, size_t n)
{
    if (n == 0)
        return "empty";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f)
            return "contains a control character (a second line, CR, NUL, ...)";
    }
    return NULL;
}

int stp_read_secret(const char *path, char **out, char *why, size_t whylen)
{
    int fd;
    size_t n = 0;
    *out = NULL;
    int rc = open_file(path, &fd);
    /* One byte more than allowed tells "too long" from "exactly full". */
    char *buf = rc < 0 ? NULL : malloc(STP_SECRET_MAX + 1);
    if (rc == 0 && buf == NULL)
        rc = -ENOMEM;
    if (rc == 0)
        rc = read_upto(fd, buf, STP_SECRET_MAX + 1, &n);
    if (fd >= 0)
        close(fd);
    if (rc < 0) {
        snprintf(why, whylen, "%s", stp_strerror(rc));
        goto out;
    }
    if (n > STP_SECRET_MAX) {
        snprintf(why, whylen, "longer than %d bytes", STP_SECRET_MAX);
        rc = -EFBIG;
        goto out;
    }
    if (n > 0 && buf[n - 1] == '\n')
        n -= n > 1 && buf[n - 2] == '\r' ? 2 : 1;
    const char *bad = check_content(buf, n);
    if (bad != NULL) {
        snprintf(why, whylen, "%s", bad);
        rc = -EINVAL;
        goto out;
    }
    if ((*out = malloc(n + 1)) == NULL) {
        snprintf(why, whylen, "%s", stp_strerror(-ENOMEM));
        rc = -ENOMEM;
        goto out;
    }
    memcpy(*out, buf, n);
    (*out)[n] = '\0';
out:
    if (buf != NULL)
        explicit_bzero(buf, STP_SECRET_MAX + 1);
    free(buf);
    return rc;
}
