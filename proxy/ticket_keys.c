/* The shared session-ticket key file (ticket_keys.h). Nothing read from it
 * reaches a message: errors name the line, never its content. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base64.h"
#include "log.h"
#include "stp.h"
#include "ticket_keys.h"

/* A line longer than this cannot be 80 bytes of base64 (108 characters). */
enum { FILE_MAX = 64 * 1024 };

void stp_ticket_keys_free(struct stp_ticket_keys *k)
{
    if (!k)
        return;
    explicit_bzero(k, sizeof(*k));
    free(k);
}

/* One line, blanks at its end cut (a CR, a space pasted along). Blank
 * lines are skipped. 0, or -EINVAL with WHY set. */
static int parse_line(struct stp_ticket_keys *ks, const char *s, size_t n,
                      const char **why)
{
    uint8_t raw[STP_TICKET_KEY_LEN + 3]; /* room to tell "too long" */
    while (n > 0 && (s[n - 1] == '\r' || s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    if (n == 0)
        return 0;
    long got = stp_b64_decode(s, n, raw, sizeof(raw));
    int rc = 0;
    if (got != STP_TICKET_KEY_LEN) {
        *why = "not 80 bytes of base64 (openssl rand 80 | openssl base64 -A)";
        rc = -EINVAL;
    } else if (ks->n == STP_TICKET_KEYS_MAX) {
        *why = "more than 64 keys";
        rc = -EINVAL;
    } else {
        struct stp_ticket_key *k = &ks->k[ks->n];
        memcpy(k->name, raw, sizeof(k->name));
        memcpy(k->aead, raw + sizeof(k->name), sizeof(k->aead));
        /* A ticket names its key: two keys with one name would be
         * ambiguous (the same key twice is a copy-paste slip too). */
        for (int i = 0; i < ks->n && rc == 0; i++)
            if (memcmp(ks->k[i].name, k->name, sizeof(k->name)) == 0) {
                *why = "the same key name (first 16 bytes) as an earlier line";
                rc = -EINVAL;
            }
        if (rc == 0)
            ks->n++;
    }
    explicit_bzero(raw, sizeof(raw));
    return rc;
}

int stp_ticket_keys_parse(const char *file, const char *text, size_t len,
                          struct stp_ticket_keys **out, char *err,
                          size_t errlen)
{
    *out = NULL;
    struct stp_ticket_keys *ks = calloc(1, sizeof(*ks));
    if (!ks) {
        snprintf(err, errlen, "%s: %s", file, stp_strerror(-ENOMEM));
        return -ENOMEM;
    }
    int line = 0;
    for (size_t pos = 0; pos < len;) {
        const char *s = text + pos;
        const char *nl = memchr(s, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - s) : len - pos;
        const char *why = NULL;
        line++;
        if (parse_line(ks, s, n, &why) < 0) {
            snprintf(err, errlen, "%s:%d: %s", file, line, why);
            stp_ticket_keys_free(ks);
            return -EINVAL;
        }
        pos += n + (nl != NULL);
    }
    if (ks->n == 0) {
        snprintf(err, errlen, "%s:%d: no key in the file", file,
                 line > 0 ? line : 1);
        stp_ticket_keys_free(ks);
        return -EINVAL;
    }
    *out = ks;
    return 0;
}

/* Like ssh with a private key, though only a warning: the file is still
 * used, since refusing would stop a fleet at its next reload. */
static void check_mode(const char *path, const struct stat *st)
{
    if (!(st->st_mode & (S_IROTH | S_IWOTH)))
        return;
    char esc[300];
    stp_log(STP_LOG_WARN,
            "event=ticket_keys_mode file=\"%s\" mode=%04o msg=\"others may "
            "read the session-ticket keys (anyone with them can decrypt "
            "recorded sessions): chmod o-rw\"",
            stp_log_esc(esc, sizeof(esc), path),
            (unsigned)(st->st_mode & 07777));
}

int stp_ticket_keys_load(const char *path, struct stp_ticket_keys **out,
                         char *err, size_t errlen)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat st;
    int rc = fd < 0                   ? -errno
             : fstat(fd, &st) < 0     ? -errno
             : S_ISDIR(st.st_mode)    ? -EISDIR
             : st.st_size > FILE_MAX  ? -EFBIG
                                      : 0;
    char *buf = rc < 0 ? NULL : malloc((size_t)st.st_size + 1);
    ssize_t n = 0;
    if (rc == 0 && !buf)
        rc = -ENOMEM;
    /* A regular file: one read has it whole, unless it grew meanwhile. */
    if (rc == 0 && (n = read(fd, buf, (size_t)st.st_size + 1)) < 0)
        rc = -errno;
    if (rc == 0 && n > st.st_size)
        rc = -EAGAIN;
    if (fd >= 0)
        close(fd);
    if (rc < 0) {
        snprintf(err, errlen, "%s: %s", path,
                 rc == -EAGAIN ? "changed while read" : stp_strerror(rc));
    } else {
        check_mode(path, &st);
        rc = stp_ticket_keys_parse(path, buf, (size_t)n, out, err, errlen);
    }
    if (buf) {
        explicit_bzero(buf, (size_t)st.st_size + 1);
        free(buf);
    }
    return rc;
}
