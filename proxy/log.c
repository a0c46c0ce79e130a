/* Logging to stderr: one write() per line so lines from several workers never
 * interleave, UTC timestamps, key=value bodies written by the callers. */
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "stp.h"

/* Set by the main thread on reload, read by every worker: atomic. */
static _Atomic int log_level = STP_LOG_INFO;
static _Atomic int log_format = STP_LOG_TEXT;
static const char *const level_names[] = {"error", "warn", "info", "debug"};

void stp_log_set_level(enum stp_log_level level)
{
    atomic_store_explicit(&log_level, (int)level, memory_order_relaxed);
}

void stp_log_set_format(enum stp_log_format format)
{
    atomic_store_explicit(&log_format, (int)format, memory_order_relaxed);
}

enum stp_log_level stp_log_get_level(void)
{
    return (enum stp_log_level)atomic_load_explicit(&log_level,
                                                    memory_order_relaxed);
}

int stp_log_parse_level(const char *text, enum stp_log_level *level)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(level_names); i++) {
        if (strcasecmp(text, level_names[i]) == 0) {
            *level = (enum stp_log_level)i;
            return 0;
        }
    }
    return -EINVAL;
}

void stp_log(enum stp_log_level level, const char *fmt, ...)
{
    if (level > stp_log_get_level())
        return;
    char line[2048], ts[40];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    size_t t = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + t, sizeof(ts) - t, ".%03dZ", (int)(tv.tv_usec / 1000));
    int n = snprintf(line, sizeof(line), "%s %s ", ts, level_names[level]);
    int body = n;
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    n += m;
    bool cut = (size_t)n > sizeof(line) - 2;
    if (cut)
        n = (int)sizeof(line) - 2;
    /* Values from peers are escaped by the callers (stp_log_esc); this is
     * the backstop: whatever slipped through, one call is one line. */
    for (int i = 0; i < n; i++)
        if ((unsigned char)line[i] < 0x20 || line[i] == 0x7f)
            line[i] = '?';
    ssize_t w;
    if (atomic_load_explicit(&log_format, memory_order_relaxed) ==
        STP_LOG_JSON) {
        /* Room for any line we write (a byte is at most 6 in JSON); what
         * still does not fit is cut, as valid JSON. */
        char js[6 * sizeof(line) + 256];
        size_t k = stp_log_json(js, sizeof(js) - 1, ts, level_names[level],
                                line + body, (size_t)(n - body), cut);
        js[k++] = '\n';
        w = write(STDERR_FILENO, js, k);
    } else {
        line[n++] = '\n';
        w = write(STDERR_FILENO, line, (size_t)n);
    }
    (void)w;
}

const char *stp_log_esc(char *buf, size_t cap, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    STP_ASSERT(cap >= 8);
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        char e[4];
        size_t k = 0;
        if (c == '"' || c == '\\') {
            e[k++] = '\\';
            e[k++] = (char)c;
        } else if (c < 0x20 || c >= 0x7f) {
            e[k++] = '\\';
            e[k++] = 'x';
            e[k++] = hex[c >> 4];
            e[k++] = hex[c & 15];
        } else {
            e[k++] = (char)c;
        }
        if (o + k + 4 > cap) { /* room for "..." and the NUL */
            memcpy(buf + o, "...", 3);
            o += 3;
            break;
        }
        memcpy(buf + o, e, k);
        o += k;
    }
    buf[o] = '\0';
    return buf;
}

const char *stp_strerror(int err)
{
    return strerror(err < 0 ? -err : err);
}
