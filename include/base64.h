/* Base64 (RFC 4648, with padding) for SASL exchanges (RFC 4954). */
#ifndef STP_BASE64_H
#define STP_BASE64_H

#include <stddef.h>

/* The encoded length of N bytes, without a terminator. */
#define STP_B64_LEN(n) ((((n) + 2) / 3) * 4)

/* Encode N bytes of IN into OUT (at least STP_B64_LEN(n) + 1 bytes, a NUL
 * is added). Returns the length. */
size_t stp_b64_encode(const void *in, size_t n, char *out);

/* Decode N characters of IN into OUT (CAP bytes). Returns the length, or
 * -EINVAL on a character outside the alphabet, bad padding or no room. */
long stp_b64_decode(const char *in, size_t n, unsigned char *out, size_t cap);

#endif
