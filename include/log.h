/* Logging: one line per event, key=value, to stderr. */
#ifndef STP_LOG_H
#define STP_LOG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

enum stp_log_level {
    STP_LOG_ERROR = 0,
    STP_LOG_WARN,
    STP_LOG_INFO,
    STP_LOG_DEBUG,
};

/* [proxy] log_format: the names are set_enum's, in this order. */
enum stp_log_format {
    STP_LOG_TEXT = 0,
    STP_LOG_JSON,
};

void stp_log_set_level(enum stp_log_level level);
void stp_log_set_format(enum stp_log_format format);
enum stp_log_level stp_log_get_level(void);
/* "error" | "warn" | "info" | "debug" -> level; -EINVAL otherwise. */
int stp_log_parse_level(const char *text, enum stp_log_level *level);

/* Writes "<timestamp> <level> <message>\n" to stderr in one write(). */
void stp_log(enum stp_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* A value a peer chose (SNI, certificate subject, reply text, error text),
 * made safe to print between double quotes: '"' and '\\' escaped with a
 * backslash, control and non-ASCII bytes as \xHH, cut with "..." to fit
 * CAP (at least 8). Returns BUF. */
const char *stp_log_esc(char *buf, size_t cap, const char *s);

/* log_format = json: BODY (N bytes of a text line's key=value pairs, CUT if
 * the text was cut) as one JSON object, NUL-terminated in BUF, which holds
 * CAP >= STP_LOG_JSON_MIN bytes; always valid JSON. Returns its length.
 * The rules are in log_json.c and README "Logs". */
#define STP_LOG_JSON_MIN 512
size_t stp_log_json(char *buf, size_t cap, const char *ts, const char *level,
                    const char *body, size_t n, bool cut);

#define stp_log_enabled(lvl) ((lvl) <= stp_log_get_level())

#endif
