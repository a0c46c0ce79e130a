/* A strict HTTP/1.x request-head parser for the admin endpoints: the
 * request line and the headers, no body. Pure: no sockets, fuzzed. */
#ifndef STP_HTTP_H
#define STP_HTTP_H

#include <stddef.h>
#include <stdint.h>

enum stp_http_method { STP_HTTP_GET, STP_HTTP_HEAD, STP_HTTP_OTHER };

struct stp_http_req {
    enum stp_http_method method;
    const char *path;      /* the target up to any '?', in the input */
    size_t path_len;
    int minor;             /* HTTP/1.MINOR: 0 or 1 */
};

/* Parse the N bytes at P. Returns the length of a complete head (request
 * line and headers up to the empty line), 0 when more bytes are needed, or
 * -EINVAL for anything that is not a well-formed HTTP/1.0 or 1.1 request:
 * the line "METHOD SP TARGET SP HTTP/1.x", TARGET starting with '/',
 * header lines "name: value" without folding, CRLF (or a bare LF) line
 * ends, no control characters, HTTP/1.1 with exactly one Host, no
 * Transfer-Encoding (there is no body to read). */
long stp_http_parse(const char *p, size_t n, struct stp_http_req *r);

#endif
