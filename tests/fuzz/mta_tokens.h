/* How real upstreams find the verb of a command line, for the fuzzers to
 * compare with what the proxy classified and forwarded.
 *  - Postfix (smtpd.c, smtpd_token.c): leading white space is skipped, the
 *    verb ends at any isspace() byte (SP, HT, LF, VT, FF, CR).
 *  - Exim (smtp_in.c): the verb must be at the start of the line and be
 *    followed by isspace() or the end of the line.
 * A line both read the same way, and the same way as the proxy, cannot carry
 * a verb the proxy did not see. */
#ifndef STP_FUZZ_MTA_TOKENS_H
#define STP_FUZZ_MTA_TOKENS_H

#include <ctype.h>
#include <stdbool.h>
#include <stddef.h>
#include <strings.h>

static inline bool mta_space(char c)
{
    return isascii((unsigned char)c) && isspace((unsigned char)c);
}

/* Postfix: the verb's span in P[0..N). */
static inline void postfix_verb(const char *p, size_t n, size_t *off, size_t *len)
{
    size_t b = 0;
    while (b < n && mta_space(p[b]))
        b++;
    size_t e = b;
    while (e < n && !mta_space(p[e]))
        e++;
    *off = b;
    *len = e - b;
}

/* Exim: does the line start with VERB as a whole word? */
static inline bool exim_verb_is(const char *p, size_t n, const char *verb)
{
    size_t k = strlen(verb);
    return n >= k && strncasecmp(p, verb, k) == 0 &&
           (n == k || mta_space(p[k]));
}

static inline bool postfix_verb_is(const char *p, size_t n, const char *verb)
{
    size_t off, len;
    postfix_verb(p, n, &off, &len);
    return len == strlen(verb) && strncasecmp(p + off, verb, len) == 0;
}

/* Either MTA would run VERB. */
static inline bool mta_verb_is(const char *p, size_t n, const char *verb)
{
    return postfix_verb_is(p, n, verb) || exim_verb_is(p, n, verb);
}

#endif
