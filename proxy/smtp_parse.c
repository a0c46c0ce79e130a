/* SMTP parsers: line framing, command verbs, BDAT arguments, reply lines,
 * the EHLO reply filter and the end-of-data scanner. Pure functions. */
#include <stdbool.h>
#include <string.h>
#include <strings.h>

#include "smtp.h"

enum stp_line_status stp_line_find(const char *p, size_t n, size_t max,
                                   size_t *len, size_t *used)
{
    size_t lim = STP_MIN(n, max);
    const char *lf = memchr(p, '\n', lim);
    if (!lf)
        return n >= max ? STP_LINE_TOO_LONG : STP_LINE_MORE;
    size_t i = (size_t)(lf - p);
    *used = i + 1;
    *len = (i > 0 && p[i - 1] == '\r') ? i - 1 : i;
    return STP_LINE_OK;
}

static const struct {
    const char *verb;
    enum stp_cmd cmd;
} verbs[] = {
    {"EHLO", STP_CMD_EHLO},         {"HELO", STP_CMD_HELO},
    {"MAIL", STP_CMD_MAIL},         {"RCPT", STP_CMD_RCPT},
    {"DATA", STP_CMD_DATA},         {"BDAT", STP_CMD_BDAT},
    {"RSET", STP_CMD_RSET},         {"NOOP", STP_CMD_NOOP},
    {"QUIT", STP_CMD_QUIT},         {"VRFY", STP_CMD_VRFY},
    {"EXPN", STP_CMD_EXPN},         {"HELP", STP_CMD_HELP},
    {"ETRN", STP_CMD_ETRN},         {"AUTH", STP_CMD_AUTH},
    {"STARTTLS", STP_CMD_STARTTLS}, {"XCLIENT", STP_CMD_XCLIENT},
    {"XFORWARD", STP_CMD_XFORWARD}, {"LHLO", STP_CMD_LHLO},
};

/* Upstreams tokenise with isspace(): Postfix skips leading white space and
 * ends the verb at any of these, Exim ends it at any of these too. The proxy
 * recognises verbs the same lenient way, so that no upstream can read a verb
 * the proxy did not see (XCLIENT<TAB>..., a leading blank). CR and LF never
 * reach here (a line ends at LF, a bare CR refuses it) but count, to be
 * safe. */
bool stp_smtp_space(char c)
{
    return c == ' ' || c == '\t' || c == '\v' || c == '\f' || c == '\r' ||
           c == '\n';
}

void stp_cmd_parse(const char *line, size_t len, struct stp_cmdline *out)
{
    size_t b = 0;
    while (b < len && stp_smtp_space(line[b]))
        b++;
    size_t v = b;
    while (v < len && !stp_smtp_space(line[v]))
        v++;
    size_t a = v;
    while (a < len && stp_smtp_space(line[a]))
        a++;
    out->verb = line + b;
    out->verb_len = v - b;
    out->arg = line + a;
    out->arg_len = len - a;
    /* As the client wrote it, the line is what we would send: no leading
     * blank, one SP before the arguments, nothing after a bare verb. */
    out->canonical = b == 0 && (a == len ? v == len : a == v + 1 &&
                                                      line[v] == ' ');
    out->cmd = STP_CMD_UNKNOWN;
    for (size_t i = 0; i < STP_ARRAY_LEN(verbs); i++) {
        if (strlen(verbs[i].verb) == out->verb_len &&
            strncasecmp(out->verb, verbs[i].verb, out->verb_len) == 0) {
            out->cmd = verbs[i].cmd;
            break;
        }
    }
}

const char *stp_cmd_name(enum stp_cmd cmd)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(verbs); i++)
        if (verbs[i].cmd == cmd)
            return verbs[i].verb;
    return "UNKNOWN";
}

int stp_bdat_parse(const char *arg, size_t len, uint64_t *size, bool *last)
{
    size_t i = 0;
    uint64_t v = 0;
    if (len == 0 || arg[0] < '0' || arg[0] > '9')
        return -EINVAL;
    for (; i < len && arg[i] >= '0' && arg[i] <= '9'; i++) {
        unsigned d = (unsigned)(arg[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -EINVAL;
        v = v * 10 + d;
    }
    *last = false;
    size_t digits_end = i;
    while (i < len && arg[i] == ' ')
        i++;
    if (i < len) {
        /* RFC 3030: size SP "LAST"; "1000LAST" is not BDAT syntax. */
        if (i == digits_end)
            return -EINVAL;
        if (len - i < 4 || strncasecmp(arg + i, "LAST", 4) != 0)
            return -EINVAL;
        i += 4;
        while (i < len && arg[i] == ' ')
            i++;
        if (i < len)
            return -EINVAL;
        *last = true;
    }
    *size = v;
    return 0;
}

int stp_reply_line(const char *line, size_t len, int *code, bool *last)
{
    if (len < 3 || line[0] < '2' || line[0] > '5' || line[1] < '0' ||
        line[1] > '9' || line[2] < '0' || line[2] > '9')
        return -EINVAL;
    if (len == 3 || line[3] == ' ')
        *last = true;
    else if (line[3] == '-')
        *last = false;
    else
        return -EINVAL;
    *code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
    return 0;
}

bool stp_ehlo_keyword_is(const char *t, size_t n, const char *kw)
{
    /* Clients skip blanks before the keyword, so must we. */
    while (n && (*t == ' ' || *t == '\t')) {
        t++;
        n--;
    }
    size_t k = strlen(kw);
    if (n < k || strncasecmp(t, kw, k) != 0)
        return false;
    if (n == k)
        return true;
    char c = t[k];
    return !((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
             (c >= '0' && c <= '9') || c == '-');
}

int stp_ehlo_filter(const char *in, size_t inlen, char *out, size_t outcap,
                    unsigned flags, bool *chunking)
{
    size_t o = 0, off = 0;
    const char *held = NULL; /* kept line not yet written: its marker waits */
    size_t held_len = 0;
    bool first = true;
    *chunking = false;

    for (;;) {
        const char *t = NULL;
        size_t tl = 0;
        if (off < inlen) {
            size_t len, used;
            if (stp_line_find(in + off, inlen - off, inlen - off + 1, &len,
                              &used) != STP_LINE_OK)
                return -EINVAL;
            int code;
            bool last;
            if (stp_reply_line(in + off, len, &code, &last) < 0 || code != 250)
                return -EINVAL;
            t = len > 4 ? in + off + 4 : in + off + len;
            tl = len > 4 ? len - 4 : 0;
            off += used;
            bool was_first = first;
            first = false;
            if (!was_first) {
                if (stp_ehlo_keyword_is(t, tl, "STARTTLS") ||
                    stp_ehlo_keyword_is(t, tl, "XCLIENT") ||
                    stp_ehlo_keyword_is(t, tl, "XFORWARD") ||
                    ((flags & STP_EHLO_STRIP_AUTH) &&
                     stp_ehlo_keyword_is(t, tl, "AUTH")) ||
                    ((flags & STP_EHLO_STRIP_REQUIRETLS) &&
                     stp_ehlo_keyword_is(t, tl, "REQUIRETLS")) ||
                    ((flags & STP_EHLO_STRIP_CHUNKING) &&
                     stp_ehlo_keyword_is(t, tl, "CHUNKING")))
                    continue;
                if (stp_ehlo_keyword_is(t, tl, "CHUNKING"))
                    *chunking = true;
            }
        } else if (flags & STP_EHLO_OFFER_STARTTLS) {
            t = "STARTTLS";
            tl = 8;
            flags &= ~(unsigned)STP_EHLO_OFFER_STARTTLS;
        }
        if (held) {
            bool is_last = (t == NULL);
            if (o + 4 + held_len + 2 > outcap)
                return -ENOSPC;
            memcpy(out + o, is_last ? "250 " : "250-", 4);
            memcpy(out + o + 4, held, held_len);
            memcpy(out + o + 4 + held_len, "\r\n", 2);
            o += 4 + held_len + 2;
        }
        if (!t)
            break;
        held = t;
        held_len = tl;
    }
    return first ? -EINVAL : (int)o;
}

enum stp_dot_result stp_dot_scan(enum stp_dot_state *st, const char *p,
                                 size_t n, size_t *used)
{
    enum stp_dot_state s = *st;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        switch (s) {
        case STP_DOT_TEXT: {
            /* The common case. Every end (or smuggling) pattern has a '.':
             * jump to the next one. Without dots the state depends only on
             * the last two bytes, so the machine resumes two bytes before
             * it (or before the end) in TEXT. */
            const char *dot = memchr(p + i, '.', n - i);
            size_t k = dot ? (size_t)(dot - p) : n;
            if (k >= i + 2) {
                i = k - 2;
                c = p[i];
            }
            s = c == '\r' ? STP_DOT_CR
                : c == '\n' ? STP_DOT_BARE_START
                             : STP_DOT_TEXT;
            break;
        }
        case STP_DOT_CR:
            s = c == '\n'   ? STP_DOT_LINE_START
                : c == '\r' ? STP_DOT_CR
                : c == '.'  ? STP_DOT_BARE_DOT
                            : STP_DOT_TEXT;
            break;
        case STP_DOT_LINE_START:
        case STP_DOT_BARE_START:
            if (c == '.')
                s = s == STP_DOT_LINE_START ? STP_DOT_DOT : STP_DOT_BARE_DOT;
            else
                s = c == '\r' ? STP_DOT_CR
                    : c == '\n' ? STP_DOT_BARE_START
                                : STP_DOT_TEXT;
            break;
        case STP_DOT_DOT:
            if (c == '\n') {
                *used = i;
                *st = s;
                return STP_DOT_SMUGGLE;
            }
            s = c == '\r' ? STP_DOT_DOT_CR : STP_DOT_TEXT;
            break;
        case STP_DOT_DOT_CR:
            if (c != '\n') {
                /* The bare CR is in this buffer: a trailing one is held back. */
                STP_ASSERT(i > 0);
                *used = i - 1;
                *st = s;
                return STP_DOT_SMUGGLE;
            }
            *used = i + 1;
            *st = STP_DOT_LINE_START;
            return STP_DOT_END;
        case STP_DOT_BARE_DOT:
            if (c == '\r' || c == '\n') {
                *used = i;
                *st = s;
                return STP_DOT_SMUGGLE;
            }
            s = STP_DOT_TEXT;
            break;
        }
    }
    *used = n;
    /* Whether a CR after CRLF "." is bare depends on the next byte: keep it. */
    if (s == STP_DOT_DOT_CR && n > 0) {
        *used = n - 1;
        s = STP_DOT_DOT;
    }
    *st = s;
    return STP_DOT_MORE;
}

