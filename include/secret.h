/* Secrets read from files: the password an upstream's AUTH sends (read at
 * load) and an OAuth token (read for each session, as it is renewed). */
#ifndef STP_SECRET_H
#define STP_SECRET_H

#include <stddef.h>

/* The longest secret file, final newline included. */
#define STP_SECRET_MAX 4096

/* Read PATH into *OUT (NUL-terminated, caller frees with stp_secret_free).
 * At most STP_SECRET_MAX bytes; one final "\n" or "\r\n" is dropped; empty
 * content or any other byte below 0x20 or 0x7f is refused, since the secret
 * goes into protocol lines. On error returns -errno (-EINVAL: content,
 * -EFBIG: too long) and writes why into WHY, never a byte of the content. */
int stp_read_secret(const char *path, char **out, char *why, size_t whylen);

/* Zero S, then free it; NULL is fine. */
void stp_secret_free(char *s);

#endif
