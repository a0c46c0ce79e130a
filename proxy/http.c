/* The admin endpoints' request parser. Strict on purpose: an HTTP server on
 * an operations port has no old clients to be lenient with, and whatever it
 * does not understand exactly is a 400. */
#include <errno.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>

#include "http.h"

/* RFC 9110 tchar: what a method or a header name is made of. */
static bool tchar(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c >= '0' && c <= '9') || (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* One line from *AT: its length without the line end, or -1 if no end yet,
 * -2 for a CR not followed by LF. *AT moves past the end. */
static long line_at(const char *p, size_t n, size_t *at)
{
    for (size_t i = *at; i < n; i++) {
        if (p[i] == '\n') {
            long len = (long)(i - *at);
            *at = i + 1;
            return len;
        }
        if (p[i] == '\r') {
            if (i + 1 == n)
                return -1;
            if (p[i + 1] != '\n')
                return -2;
            long len = (long)(i - *at);
            *at = i + 2;
            return len;
        }
    }
    return -1;
}

static int request_line(const char *s, size_t len, struct stp_http_req *r)
{
    size_t i = 0;
    while (i < len && tchar((unsigned char)s[i]))
        i++;
    if (i == 0 || i > 16 || i >= len || s[i] != ' ')
        return -EINVAL;
    r->method = i == 3 && memcmp(s, "GET", 3) == 0    ? STP_HTTP_GET
                : i == 4 && memcmp(s, "HEAD", 4) == 0 ? STP_HTTP_HEAD
                                                      : STP_HTTP_OTHER;
    size_t t = ++i;
    while (i < len && (unsigned char)s[i] > 0x20 && (unsigned char)s[i] < 0x7f)
        i++;
    if (i == t || s[t] != '/' || i >= len || s[i] != ' ')
        return -EINVAL;
    r->path = s + t;
    const char *q = memchr(r->path, '?', i - t);
    r->path_len = q ? (size_t)(q - r->path) : i - t;
    i++;
    if (len - i != 8 || memcmp(s + i, "HTTP/1.", 7) != 0 ||
        (s[i + 7] != '0' && s[i + 7] != '1'))
        return -EINVAL;
    r->minor = s[i + 7] - '0';
    return 0;
}

/* "name: value": NAME is tchar, VALUE visible ASCII, blanks or obs-text. */
static int header_line(const char *s, size_t len, int *hosts)
{
    size_t i = 0;
    while (i < len && tchar((unsigned char)s[i]))
        i++;
    if (i == 0 || i >= len || s[i] != ':')
        return -EINVAL;
    for (size_t j = i + 1; j < len; j++) {
        unsigned char c = (unsigned char)s[j];
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return -EINVAL;
    }
    if (i == 4 && strncasecmp(s, "host", 4) == 0)
        ++*hosts;
    if (i == 17 && strncasecmp(s, "transfer-encoding", 17) == 0)
        return -EINVAL;
    return 0;
}

long stp_http_parse(const char *p, size_t n, struct stp_http_req *r)
{
    memset(r, 0, sizeof(*r));
    size_t at = 0;
    long len = line_at(p, n, &at);
    if (len == -1)
        return 0;
    if (len < 0 || request_line(p, (size_t)len, r) < 0)
        return -EINVAL;
    int hosts = 0;
    for (;;) {
        size_t start = at;
        len = line_at(p, n, &at);
        if (len == -1)
            return 0;
        if (len < 0)
            return -EINVAL;
        if (len == 0)
            break;
        /* A leading blank would be obsolete line folding. */
        if (p[start] == ' ' || p[start] == '\t' ||
            header_line(p + start, (size_t)len, &hosts) < 0)
            return -EINVAL;
    }
    if (hosts > 1 || (r->minor == 1 && hosts != 1))
        return -EINVAL;
    return (long)at;
}
