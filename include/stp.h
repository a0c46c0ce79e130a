/* Common definitions for starttls-proxy: error codes, limits, invariants. */
#ifndef STP_H
#define STP_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define STP_VERSION "0.1.0"

/* Errors are negative errno values (libuv's UV_E* are the same on Linux). */
#define STP_OK 0

/* Size of one pooled I/O buffer: several TLS records (16 KiB + overhead
 * each), and always more than the longest command line. A bulk transfer
 * moves this much per read and write: 64 KiB took a tenth off the CPU per
 * GB against 16 KiB (fewer system calls and loopback segments). Idle
 * sessions hold none. */
#define STP_BUF_SIZE (64 * 1024)

/* RFC 5321 4.5.3.1: command line 512, reply line 512. We accept longer replies
 * from the upstream (some servers send long EHLO lines) but stay bounded. */
#define STP_MAX_LINE_MIN 512
#define STP_MAX_LINE_MAX 8192
#define STP_MAX_REPLY_LINE 2048
#define STP_MAX_EHLO_REPLY 8192
#define STP_MAX_REPLY (64 * 1024) /* one multi-line reply, all lines */

/* Broken invariants abort; bad input never does. */
#define STP_ASSERT(c)                                                          \
    do {                                                                       \
        if (!(c)) {                                                            \
            fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__,         \
                    __LINE__, #c);                                             \
            abort();                                                           \
        }                                                                      \
    } while (0)

#define STP_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define STP_MIN(a, b) ((a) < (b) ? (a) : (b))

/* Text for a negative error code (errno or libuv). */
const char *stp_strerror(int err);

#endif
