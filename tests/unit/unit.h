/* The unit tests' harness: cases, failure messages, a hang alarm, a
 * printable form of byte strings. Included once by each test program. */
#ifndef STP_TEST_UNIT_H
#define STP_TEST_UNIT_H

#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int n_pass, n_fail;
static const char *cur_case;
static bool cur_ok;
static int cur_msgs;

/* An engine that loops forever must fail the run, naming the case. */
static char hang_name[160];
static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "HANG in case: ";
    (void)!write(2, msg, sizeof(msg) - 1);
    (void)!write(2, hang_name, strlen(hang_name));
    (void)!write(2, "\n", 1);
    _exit(2);
}

static void case_begin(const char *name)
{
    snprintf(hang_name, sizeof(hang_name), "%s", name);
    alarm(30);
    cur_case = name;
    cur_ok = true;
    cur_msgs = 0;
}

static void case_end(void)
{
    if (cur_ok)
        n_pass++;
    else
        n_fail++;
}

static void failf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void failf(const char *fmt, ...)
{
    cur_ok = false;
    if (cur_msgs++ >= 4) /* the first few are enough to see what broke */
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL [%s] ", cur_case);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

#define CHECK(cond, ...)                                                       \
    do {                                                                       \
        if (!(cond))                                                           \
            failf(__VA_ARGS__);                                                \
    } while (0)

/* Printable form of a byte string (rotating static buffers). */
__attribute__((unused)) static const char *esc(const char *p, size_t n)
{
    static char bufs[6][3000];
    static int k;
    char *b = bufs[k++ % 6];
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (o > sizeof(bufs[0]) - 40) {
            o += (size_t)sprintf(b + o, "...(%zu bytes)", n);
            break;
        }
        unsigned char c = (unsigned char)p[i];
        if (c == '\r')
            o += (size_t)sprintf(b + o, "\\r");
        else if (c == '\n')
            o += (size_t)sprintf(b + o, "\\n");
        else if (c == '\\' || c == '"')
            o += (size_t)sprintf(b + o, "\\%c", c);
        else if (c < 32 || c > 126)
            o += (size_t)sprintf(b + o, "\\x%02x", c);
        else
            b[o++] = (char)c;
    }
    b[o] = 0;
    return b;
}

#define S(lit) lit, sizeof(lit) - 1 /* a literal with its length (NULs ok) */

/* Every program ends with this line; ctest reads it. */
static inline int unit_summary(void)
{
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail == 0 ? 0 : 1;
}

#endif
