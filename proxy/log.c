/* Logging to stderr: one write() per line so lines from several workers never
 * interleave, UTC timestamps, key=value bodies written by the callers. */
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "stp.h"

static enum stp_log_level log_level = STP_LOG_INFO;
static const char *const level_names[] = {"error", "warn", "info", "debug"};

void stp_log_set_level(enum stp_log_level level) { log_level = level; }
enum stp_log_level stp_log_get_level(void) { return log_level; }

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
    if (level > log_level)
        return;
    char line[2048];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    int n = (int)strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    n += snprintf(line + n, sizeof(line) - (size_t)n, ".%03dZ %s ",
                  (int)(tv.tv_usec / 1000), level_names[level]);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        return;
    n += m;
    if ((size_t)n > sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}

const char *stp_strerror(int err)
{
    return strerror(err < 0 ? -err : err);
}
