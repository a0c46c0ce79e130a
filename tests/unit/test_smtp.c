/* Unit tests for the SMTP protocol module (proxy/smtp.c): the small parsers,
 * the EHLO filter, the end-of-data scanner and the session engine.
 *
 * Everything is table-driven. Every case runs with its input fed all at once
 * and split at every byte position (two calls); engine scenarios also run
 * with both streams fed one byte at a time. The feeding loops behave like the
 * session: bytes the engine did not consume stay buffered and are offered
 * again with the next ones. A case passes only if it passes in every mode.
 * Last line printed: "N passed, N failed". */
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "smtp.h"

#include "unit.h"

/* ---- stp_line_find ---------------------------------------------------------- */

struct line_case {
    const char *in;
    size_t n;
    size_t max;
    enum stp_line_status st;
    size_t len, used;
};

static const struct line_case line_cases[] = {
    {S("EHLO x\r\n"), 512, STP_LINE_OK, 6, 8},
    {S("EHLO x\n"), 512, STP_LINE_OK, 6, 7},
    {S("EHLO x"), 512, STP_LINE_MORE, 0, 0},
    {S(""), 512, STP_LINE_MORE, 0, 0},
    {S("\r"), 512, STP_LINE_MORE, 0, 0},
    {S("\r\n"), 512, STP_LINE_OK, 0, 2},
    {S("\n"), 512, STP_LINE_OK, 0, 1},
    {S("a\rb\n"), 512, STP_LINE_OK, 3, 4},
    {S("a\r\r\n"), 512, STP_LINE_OK, 2, 4},
    {S("a\0b\r\n"), 512, STP_LINE_OK, 3, 5},
    {S("abc\r\ndef\r\n"), 512, STP_LINE_OK, 3, 5},
    {S("abc\ndef\r\n"), 512, STP_LINE_OK, 3, 4},
    /* limit: the terminator counts */
    {S("abcdefgh\r\n"), 10, STP_LINE_OK, 8, 10},
    {S("abcdefgh\r\n"), 9, STP_LINE_TOO_LONG, 0, 0},
    {S("abcdefgh\n"), 9, STP_LINE_OK, 8, 9},
    {S("abcdefghi\n"), 9, STP_LINE_TOO_LONG, 0, 0},
    {S("abcdefghij"), 10, STP_LINE_TOO_LONG, 0, 0},
    {S("abcdefghi"), 10, STP_LINE_MORE, 0, 0},
    {S("abcdefghijklmnop\r\n"), 10, STP_LINE_TOO_LONG, 0, 0},
    {S("abcdefghijklmnop"), 10, STP_LINE_TOO_LONG, 0, 0},
};

/* What stp_line_find must say about the first K bytes, given the verdict on
 * the whole buffer. */
static void line_expect_prefix(const struct line_case *c, size_t k,
                               enum stp_line_status *st, size_t *len,
                               size_t *used)
{
    *len = *used = 0;
    if (c->st == STP_LINE_OK && c->used <= k) {
        *st = STP_LINE_OK;
        *len = c->len;
        *used = c->used;
    } else {
        *st = k >= c->max ? STP_LINE_TOO_LONG : STP_LINE_MORE;
    }
}

static void check_line(const char *p, size_t n, size_t max,
                       enum stp_line_status est, size_t elen, size_t eused,
                       const char *mode)
{
    /* exact-size heap copy: reading past N is a bug ASan can see */
    char *b = malloc(n ? n : 1);
    memcpy(b, p, n);
    size_t len = 12345, used = 12345;
    enum stp_line_status st = stp_line_find(b, n, max, &len, &used);
    CHECK(st == est, "line_find(\"%s\", max %zu) %s: status %d, want %d",
          esc(p, n), max, mode, (int)st, (int)est);
    if (st == STP_LINE_OK && est == STP_LINE_OK)
        CHECK(len == elen && used == eused,
              "line_find(\"%s\") %s: len %zu used %zu, want %zu %zu",
              esc(p, n), mode, len, used, elen, eused);
    free(b);
}

static void test_line_find(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(line_cases); i++) {
        const struct line_case *c = &line_cases[i];
        char name[96];
        snprintf(name, sizeof(name), "line_find #%zu \"%s\"", i,
                 esc(c->in, c->n));
        case_begin(name);
        check_line(c->in, c->n, c->max, c->st, c->len, c->used, "whole");
        /* split: the caller first has K bytes, then all of them (nothing is
         * consumed until a line is found, so it re-offers the lot). */
        for (size_t k = 0; k < c->n; k++) {
            enum stp_line_status st;
            size_t len, used;
            line_expect_prefix(c, k, &st, &len, &used);
            check_line(c->in, k, c->max, st, len, used, "prefix");
            if (st == STP_LINE_OK)
                continue;
            check_line(c->in, c->n, c->max, c->st, c->len, c->used,
                       "after split");
        }
        case_end();
    }
}

/* Assemble LINE+CRLF through the framer in two calls split at every byte
 * position (and whole); return the framed length, or -1 on a framing error. */
static long frame_line(const char *line, size_t n, size_t split)
{
    char buf[600];
    memcpy(buf, line, n);
    memcpy(buf + n, "\r\n", 2);
    size_t len, used;
    if (split > 0 && split < n + 2) {
        if (stp_line_find(buf, split, 512, &len, &used) != STP_LINE_MORE)
            return -1;
    }
    if (stp_line_find(buf, n + 2, 512, &len, &used) != STP_LINE_OK ||
        used != n + 2)
        return -1;
    return (long)len;
}

/* ---- stp_cmd_parse ----------------------------------------------------------- */

struct cmd_case {
    const char *in;
    size_t n;
    enum stp_cmd cmd;
    int argoff;     /* -1: only check that arg stays inside the line */
    int canonical;  /* -1: don't check */
};

static const struct cmd_case cmd_cases[] = {
    {S("EHLO client.test"), STP_CMD_EHLO, 5, 1},
    {S("ehlo client.test"), STP_CMD_EHLO, 5, 1},
    {S("EhLo x"), STP_CMD_EHLO, 5, 1},
    {S("EHLO"), STP_CMD_EHLO, 4, 1},
    {S("EHLOX"), STP_CMD_UNKNOWN, -1, 1},
    {S("EHLOX y"), STP_CMD_UNKNOWN, -1, 1},
    {S("EHL"), STP_CMD_UNKNOWN, -1, 1},
    /* Upstreams split on any white space and skip leading blanks: so must
     * the classifier, or XCLIENT<TAB> passes as an unknown verb. */
    {S("EHLO\tx"), STP_CMD_EHLO, 5, 0},
    {S(""), STP_CMD_UNKNOWN, 0, 1},
    {S(" EHLO x"), STP_CMD_EHLO, 6, 0},
    {S("\t \tEHLO x"), STP_CMD_EHLO, 8, 0},
    {S("XCLIENT\tADDR=6.6.6.6"), STP_CMD_XCLIENT, 8, 0},
    {S("XCLIENT\vADDR=6.6.6.6"), STP_CMD_XCLIENT, 8, 0},
    {S("XCLIENT\fADDR=6.6.6.6"), STP_CMD_XCLIENT, 8, 0},
    {S("XCLIENT\rADDR=6.6.6.6"), STP_CMD_XCLIENT, 8, 0},
    {S(" XCLIENT ADDR=6.6.6.6"), STP_CMD_XCLIENT, 9, 0},
    {S("\tXFORWARD ADDR=6.6.6.6"), STP_CMD_XFORWARD, 10, 0},
    {S("XCLIENT"), STP_CMD_XCLIENT, 7, 1},
    {S("DATA\t"), STP_CMD_DATA, 5, 0},
    {S("DATA "), STP_CMD_DATA, 5, 0},
    {S("BDAT\t5"), STP_CMD_BDAT, 5, 0},
    {S("AUTH\tPLAIN"), STP_CMD_AUTH, 5, 0},
    {S("STARTTLS\t"), STP_CMD_STARTTLS, 9, 0},
    {S("STARTTLS \t "), STP_CMD_STARTTLS, 11, 0},
    {S(" \t "), STP_CMD_UNKNOWN, 3, 0},
    {S("XCLIENT\x1c" "ADDR"), STP_CMD_UNKNOWN, -1, 1},
    {S("HELO x"), STP_CMD_HELO, 5, 1},
    {S("MAIL FROM:<a@b>"), STP_CMD_MAIL, 5, 1},
    {S("MAIL  FROM:<>"), STP_CMD_MAIL, 6, 0},
    {S("MAIL FROM:<a>\tSIZE=1"), STP_CMD_MAIL, 5, 1},
    {S("mail from:<>"), STP_CMD_MAIL, 5, 1},
    {S("MAIL"), STP_CMD_MAIL, 4, 1},
    {S("RCPT TO:<a@b>"), STP_CMD_RCPT, 5, 1},
    {S("DATA"), STP_CMD_DATA, 4, 1},
    {S("data"), STP_CMD_DATA, 4, 1},
    {S("DATAX"), STP_CMD_UNKNOWN, -1, 1},
    {S("BDAT 100 LAST"), STP_CMD_BDAT, 5, 1},
    {S("RSET"), STP_CMD_RSET, 4, 1},
    {S("NOOP"), STP_CMD_NOOP, 4, 1},
    {S("NOOP   x"), STP_CMD_NOOP, 7, 0},
    {S("QUIT"), STP_CMD_QUIT, 4, 1},
    {S("VRFY user"), STP_CMD_VRFY, 5, 1},
    {S("EXPN list"), STP_CMD_EXPN, 5, 1},
    {S("HELP"), STP_CMD_HELP, 4, 1},
    {S("ETRN #d"), STP_CMD_ETRN, 5, 1},
    {S("AUTH PLAIN AGE="), STP_CMD_AUTH, 5, 1},
    {S("STARTTLS"), STP_CMD_STARTTLS, 8, 1},
    {S("starttls"), STP_CMD_STARTTLS, 8, 1},
    {S("StartTLS"), STP_CMD_STARTTLS, 8, 1},
    {S("STARTTLS foo"), STP_CMD_STARTTLS, 9, 1},
    {S("STARTTLSX"), STP_CMD_UNKNOWN, -1, 1},
    {S("STARTTL"), STP_CMD_UNKNOWN, -1, 1},
    {S("XCLIENT ADDR=1.2.3.4"), STP_CMD_XCLIENT, 8, 1},
    {S("xclient ADDR=1.2.3.4"), STP_CMD_XCLIENT, 8, 1},
    {S("XFORWARD NAME=x"), STP_CMD_XFORWARD, 9, 1},
    {S("xForward"), STP_CMD_XFORWARD, 8, 1},
    {S("FOO bar"), STP_CMD_UNKNOWN, -1, 1},
    {S("MAIL\0FROM"), STP_CMD_UNKNOWN, -1, -1},
};

static void test_cmd_parse(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(cmd_cases); i++) {
        const struct cmd_case *c = &cmd_cases[i];
        char name[96];
        snprintf(name, sizeof(name), "cmd_parse \"%s\"", esc(c->in, c->n));
        case_begin(name);
        for (size_t split = 0; split < c->n + 2; split++) {
            long len = frame_line(c->in, c->n, split);
            CHECK(len == (long)c->n, "framing at split %zu gave %ld", split,
                  len);
            char *b = malloc(c->n ? c->n : 1);
            memcpy(b, c->in, c->n);
            struct stp_cmdline cl;
            stp_cmd_parse(b, c->n, &cl);
            CHECK(cl.cmd == c->cmd, "split %zu: cmd %d (%s), want %d (%s)",
                  split, (int)cl.cmd, stp_cmd_name(cl.cmd), (int)c->cmd,
                  stp_cmd_name(c->cmd));
            CHECK(cl.arg >= b && cl.arg + cl.arg_len == b + c->n,
                  "arg outside the line");
            CHECK(cl.verb >= b && cl.verb + cl.verb_len <= cl.arg,
                  "verb outside the line");
            if (c->argoff >= 0)
                CHECK(cl.arg - b == c->argoff, "arg at %ld, want %d",
                      (long)(cl.arg - b), c->argoff);
            if (c->canonical >= 0)
                CHECK(cl.canonical == (c->canonical == 1),
                      "canonical %d, want %d", cl.canonical, c->canonical);
            /* a truncated line must not be read past its end */
            if (split <= c->n) {
                struct stp_cmdline c2;
                stp_cmd_parse(b, split, &c2);
                CHECK(c2.arg >= b && c2.arg + c2.arg_len == b + split,
                      "prefix %zu: arg outside the line", split);
            }
            free(b);
        }
        case_end();
    }
    case_begin("cmd_name for every command");
    for (int c = STP_CMD_UNKNOWN; c <= STP_CMD_XFORWARD; c++)
        CHECK(stp_cmd_name((enum stp_cmd)c) != NULL, "cmd_name(%d) NULL", c);
    CHECK(strcasecmp(stp_cmd_name(STP_CMD_STARTTLS), "STARTTLS") == 0,
          "cmd_name(STARTTLS) = %s", stp_cmd_name(STP_CMD_STARTTLS));
    case_end();
}

/* ---- stp_bdat_parse ------------------------------------------------------------ */

struct bdat_case {
    const char *in;
    size_t n;
    int ret;
    uint64_t size;
    bool last;
};

static const struct bdat_case bdat_cases[] = {
    {S("1000"), 0, 1000, false},
    {S("1000 LAST"), 0, 1000, true},
    {S("1000 last"), 0, 1000, true},
    {S("1000 LaSt"), 0, 1000, true},
    {S("0"), 0, 0, false},
    {S("0 LAST"), 0, 0, true},
    {S("007"), 0, 7, false},
    {S("1234567890123456789"), 0, 1234567890123456789ULL, false},
    {S(""), -EINVAL, 0, false},
    {S("LAST"), -EINVAL, 0, false},
    {S("-1"), -EINVAL, 0, false},
    {S("+1"), -EINVAL, 0, false},
    {S("10a"), -EINVAL, 0, false},
    {S("0x10"), -EINVAL, 0, false},
    {S("1 2"), -EINVAL, 0, false},
    {S("1000 FOO"), -EINVAL, 0, false},
    {S("1000 LASTX"), -EINVAL, 0, false},
    {S("1000 LAS"), -EINVAL, 0, false},
    {S("1000 LAST x"), -EINVAL, 0, false},
    {S("1000 LAST LAST"), -EINVAL, 0, false},
    {S("1000LAST"), -EINVAL, 0, false}, /* RFC 3030: SP before LAST */
    {S("1000last"), -EINVAL, 0, false},
    {S("18446744073709551616"), -EINVAL, 0, false},
    {S("99999999999999999999"), -EINVAL, 0, false},
    {S("184467440737095516150"), -EINVAL, 0, false},
    {S("1\0"), -EINVAL, 0, false},
};

static void test_bdat_parse(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(bdat_cases); i++) {
        const struct bdat_case *c = &bdat_cases[i];
        char name[96];
        snprintf(name, sizeof(name), "bdat_parse \"%s\"", esc(c->in, c->n));
        case_begin(name);
        for (size_t split = 0; split < c->n + 2; split++) {
            /* as the engine sees it: "BDAT " + arg, framed in two calls */
            char line[128];
            memcpy(line, "BDAT ", 5);
            memcpy(line + 5, c->in, c->n);
            long len = frame_line(line, c->n + 5, split);
            CHECK(len == (long)c->n + 5, "framing at split %zu", split);
            char *b = malloc(c->n ? c->n : 1);
            memcpy(b, c->in, c->n);
            uint64_t size = 777;
            bool last = false;
            int r = stp_bdat_parse(b, c->n, &size, &last);
            CHECK(r == c->ret, "ret %d, want %d", r, c->ret);
            if (r == 0 && c->ret == 0)
                CHECK(size == c->size && last == c->last,
                      "size %llu last %d, want %llu %d",
                      (unsigned long long)size, last,
                      (unsigned long long)c->size, c->last);
            if (split <= c->n) /* truncated: must not read past it */
                (void)stp_bdat_parse(b, split, &size, &last);
            free(b);
        }
        case_end();
    }
}

/* ---- stp_reply_line ------------------------------------------------------------ */

struct reply_case {
    const char *in;
    size_t n;
    int ret, code;
    bool last;
};

static const struct reply_case reply_cases[] = {
    {S("250"), 0, 250, true},
    {S("250 ok"), 0, 250, true},
    {S("250 "), 0, 250, true},
    {S("250-ok"), 0, 250, false},
    {S("250-"), 0, 250, false},
    {S("220 mx.test ESMTP"), 0, 220, true},
    {S("354 go ahead"), 0, 354, true},
    {S("421 4.4.2 bye"), 0, 421, true},
    {S("599 x"), 0, 599, true},
    {S("200-x"), 0, 200, false},
    {S("199 x"), -EINVAL, 0, false},
    {S("099 x"), -EINVAL, 0, false},
    {S("600 x"), -EINVAL, 0, false},
    {S("25"), -EINVAL, 0, false},
    {S(""), -EINVAL, 0, false},
    {S("2500"), -EINVAL, 0, false},
    {S("250x"), -EINVAL, 0, false},
    {S("250\t"), -EINVAL, 0, false},
    {S("25a ok"), -EINVAL, 0, false},
    {S("2a0 ok"), -EINVAL, 0, false},
    {S(" 250 ok"), -EINVAL, 0, false},
    {S("abc"), -EINVAL, 0, false},
    {S("250\0ok"), -EINVAL, 0, false},
};

/* Reference for truncated lines. */
static int ref_reply(const char *p, size_t n, int *code, bool *last)
{
    if (n < 3 || p[0] < '2' || p[0] > '5' || p[1] < '0' || p[1] > '9' ||
        p[2] < '0' || p[2] > '9')
        return -EINVAL;
    *code = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
    if (n == 3 || p[3] == ' ')
        *last = true;
    else if (p[3] == '-')
        *last = false;
    else
        return -EINVAL;
    return 0;
}

static void test_reply_line(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(reply_cases); i++) {
        const struct reply_case *c = &reply_cases[i];
        char name[96];
        snprintf(name, sizeof(name), "reply_line \"%s\"", esc(c->in, c->n));
        case_begin(name);
        for (size_t split = 0; split < c->n + 2; split++) {
            long len = frame_line(c->in, c->n, split);
            CHECK(len == (long)c->n, "framing at split %zu", split);
            char *b = malloc(c->n ? c->n : 1);
            memcpy(b, c->in, c->n);
            int code = -1;
            bool last = false;
            int r = stp_reply_line(b, c->n, &code, &last);
            CHECK(r == c->ret, "ret %d, want %d", r, c->ret);
            if (r == 0 && c->ret == 0)
                CHECK(code == c->code && last == c->last,
                      "code %d last %d, want %d %d", code, last, c->code,
                      c->last);
            if (split <= c->n) {
                int ec = 0, gc = -1;
                bool el = false, gl = true;
                int er = ref_reply(b, split, &ec, &el);
                int gr = stp_reply_line(b, split, &gc, &gl);
                CHECK(gr == er, "prefix %zu \"%s\": ret %d, want %d", split,
                      esc(b, split), gr, er);
                if (gr == 0 && er == 0)
                    CHECK(gc == ec && gl == el, "prefix %zu: %d/%d want %d/%d",
                          split, gc, gl, ec, el);
            }
            free(b);
        }
        case_end();
    }
}

/* ---- stp_ehlo_filter ------------------------------------------------------------ */

#define OFFER STP_EHLO_OFFER_STARTTLS
#define SAUTH STP_EHLO_STRIP_AUTH
#define SREQ STP_EHLO_STRIP_REQUIRETLS

struct ehlo_case {
    const char *name;
    const char *in;
    unsigned flags;
    const char *out; /* NULL: the filter must fail with ERR */
    int err;
    bool chunking;
};

static const struct ehlo_case ehlo_cases[] = {
    {"drop STARTTLS",
     "250-mx.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n", 0,
     "250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n", 0, false},
    {"drop the last line",
     "250-mx.test\r\n250-SIZE 1000\r\n250 STARTTLS\r\n", 0,
     "250-mx.test\r\n250 SIZE 1000\r\n", 0, false},
    {"only the domain line left", "250-mx.test\r\n250 XCLIENT NAME ADDR\r\n",
     0, "250 mx.test\r\n", 0, false},
    {"domain only", "250 mx.test\r\n", 0, "250 mx.test\r\n", 0, false},
    {"offer STARTTLS on a domain-only reply", "250 mx.test\r\n", OFFER,
     "250-mx.test\r\n250 STARTTLS\r\n", 0, false},
    {"offer STARTTLS once, last",
     "250-mx.test\r\n250-STARTTLS\r\n250 SIZE\r\n", OFFER,
     "250-mx.test\r\n250-SIZE\r\n250 STARTTLS\r\n", 0, false},
    {"strip every AUTH form",
     "250-mx.test\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=LOGIN\r\n"
     "250-auth cram-md5\r\n250 HELP\r\n",
     SAUTH, "250-mx.test\r\n250 HELP\r\n", 0, false},
    {"keep AUTH without the flag",
     "250-mx.test\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=LOGIN\r\n250 HELP\r\n", 0,
     "250-mx.test\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=LOGIN\r\n250 HELP\r\n", 0,
     false},
    {"AUTHX is not AUTH", "250-mx.test\r\n250-AUTHX\r\n250 OK\r\n", SAUTH,
     "250-mx.test\r\n250-AUTHX\r\n250 OK\r\n", 0, false},
    {"STARTTLSX is not STARTTLS", "250-mx.test\r\n250-STARTTLSX\r\n250 OK\r\n",
     0, "250-mx.test\r\n250-STARTTLSX\r\n250 OK\r\n", 0, false},
    {"strip REQUIRETLS", "250-mx.test\r\n250-REQUIRETLS\r\n250 SIZE\r\n", SREQ,
     "250-mx.test\r\n250 SIZE\r\n", 0, false},
    {"keep REQUIRETLS", "250-mx.test\r\n250-REQUIRETLS\r\n250 SIZE\r\n", 0,
     "250-mx.test\r\n250-REQUIRETLS\r\n250 SIZE\r\n", 0, false},
    {"keywords case-insensitive",
     "250-mx.test\r\n250-starttls\r\n250-XClient ADDR\r\n"
     "250-xforward NAME\r\n250-Auth PLAIN\r\n250-requiretls\r\n250 SIZE\r\n",
     SAUTH | SREQ, "250-mx.test\r\n250 SIZE\r\n", 0, false},
    {"STARTTLS with an argument dropped",
     "250-mx.test\r\n250-STARTTLS foo\r\n250 SIZE\r\n", 0,
     "250-mx.test\r\n250 SIZE\r\n", 0, false},
    {"LF-only input gives CRLF", "250-mx.test\n250-STARTTLS\n250 SIZE\n", OFFER,
     "250-mx.test\r\n250-SIZE\r\n250 STARTTLS\r\n", 0, false},
    {"CHUNKING reported", "250-mx.test\r\n250-CHUNKING\r\n250 SIZE\r\n", 0,
     "250-mx.test\r\n250-CHUNKING\r\n250 SIZE\r\n", 0, true},
    {"chunking lowercase", "250-mx.test\r\n250 chunking\r\n", OFFER,
     "250-mx.test\r\n250-chunking\r\n250 STARTTLS\r\n", 0, true},
    {"first line always kept", "250-STARTTLS\r\n250 SIZE\r\n", OFFER | SAUTH,
     "250-STARTTLS\r\n250-SIZE\r\n250 STARTTLS\r\n", 0, false},
    {"all flags",
     "250-mx.test Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
     "250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250-REQUIRETLS\r\n"
     "250-CHUNKING\r\n250-XCLIENT NAME ADDR\r\n250 8BITMIME\r\n",
     OFFER | SAUTH | SREQ,
     "250-mx.test Hello\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
     "250-CHUNKING\r\n250-8BITMIME\r\n250 STARTTLS\r\n",
     0, true},
    {"not a 250 line", "250-mx.test\r\n220 x\r\n", 0, NULL, -EINVAL, false},
    {"garbage line", "250-mx.test\r\nhello\r\n", 0, NULL, -EINVAL, false},
    {"550 reply", "550 no\r\n", 0, NULL, -EINVAL, false},
};

/* Valid output: CRLF lines, "250-" except the last "250 ". */
static bool ehlo_output_valid(const char *p, size_t n)
{
    if (n == 0)
        return false;
    size_t i = 0;
    while (i < n) {
        const char *e = memchr(p + i, '\n', n - i);
        if (!e || e == p + i || e[-1] != '\r')
            return false;
        size_t ll = (size_t)(e - (p + i)) - 1;
        bool last = (size_t)(e - p) + 1 == n;
        if (ll < 3 || memcmp(p + i, "250", 3) != 0)
            return false;
        if (ll > 3 && p[i + 3] != (last ? ' ' : '-'))
            return false;
        if (ll == 3 && !last)
            return false;
        if (memchr(p + i, '\r', ll))
            return false;
        i = (size_t)(e - p) + 1;
    }
    return true;
}

static void test_ehlo_filter(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(ehlo_cases); i++) {
        const struct ehlo_case *c = &ehlo_cases[i];
        char name[96];
        snprintf(name, sizeof(name), "ehlo_filter: %s", c->name);
        case_begin(name);
        size_t inlen = strlen(c->in);
        char *in = malloc(inlen);
        memcpy(in, c->in, inlen);
        size_t cap = 4096;
        char *out = malloc(cap);
        bool ch = !c->chunking;
        int r = stp_ehlo_filter(in, inlen, out, cap, c->flags, &ch);
        if (c->out) {
            size_t olen = strlen(c->out);
            CHECK(r == (int)olen && memcmp(out, c->out, olen) == 0,
                  "got %d \"%s\", want \"%s\"", r,
                  r > 0 ? esc(out, (size_t)r) : "", esc(c->out, olen));
            CHECK(ch == c->chunking, "chunking %d, want %d", ch, c->chunking);
            free(out);
            /* exact capacity fits; one byte less is -ENOSPC */
            out = malloc(olen);
            r = stp_ehlo_filter(in, inlen, out, olen, c->flags, &ch);
            CHECK(r == (int)olen, "cap %zu: %d", olen, r);
            free(out);
            out = malloc(olen - 1);
            r = stp_ehlo_filter(in, inlen, out, olen - 1, c->flags, &ch);
            CHECK(r == -ENOSPC, "cap %zu: %d, want -ENOSPC", olen - 1, r);
            free(out);
            out = malloc(cap);
        } else {
            CHECK(r == c->err, "got %d, want %d", r, c->err);
        }
        /* truncated input (split at every byte) must never give bad output */
        for (size_t k = 0; k < inlen; k++) {
            char *t = malloc(k ? k : 1);
            memcpy(t, c->in, k);
            r = stp_ehlo_filter(t, k, out, cap, c->flags, &ch);
            CHECK(r < 0 || ehlo_output_valid(out, (size_t)r),
                  "prefix %zu: invalid output \"%s\"", k,
                  esc(out, (size_t)r));
            free(t);
        }
        free(out);
        free(in);
        case_end();
    }
}

/* Keywords as a client reads them: RFC 5321 ehlo-keyword, (ALPHA / DIGIT)
 * *(ALPHA / DIGIT / "-"), so any other byte (HTAB, a stray CR) ends it. The
 * filter must not let such a line advertise what it was told to drop. */
struct ehlo_kw_case {
    const char *name;
    const char *in;
    unsigned flags;
    const char *forbidden;
};

static const struct ehlo_kw_case ehlo_kw_cases[] = {
    {"AUTH<TAB>PLAIN stripped", "250-mx.test\r\n250-AUTH\tPLAIN\r\n250 SIZE\r\n",
     SAUTH, "AUTH"},
    {"AUTH<CR> stripped", "250-mx.test\r\n250-AUTH\r\r\n250 SIZE\r\n", SAUTH,
     "AUTH"},
    {"STARTTLS<CR> dropped", "250-mx.test\r\n250-STARTTLS\r\r\n250 SIZE\r\n", 0,
     "STARTTLS"},
    {"XCLIENT<TAB> dropped", "250-mx.test\r\n250-XCLIENT\tADDR\r\n250 SIZE\r\n",
     0, "XCLIENT"},
    {"' AUTH PLAIN' (leading space) stripped",
     "250-mx.test\r\n250- AUTH PLAIN\r\n250 SIZE\r\n", SAUTH, "AUTH"},
    {"' STARTTLS' (leading space) dropped",
     "250-mx.test\r\n250- STARTTLS\r\n250 SIZE\r\n", 0, "STARTTLS"},
    {"REQUIRETLS<TAB> stripped",
     "250-mx.test\r\n250-REQUIRETLS\t\r\n250 SIZE\r\n", SREQ, "REQUIRETLS"},
};

static bool ehlo_advertises(const char *out, size_t n, const char *kw)
{
    size_t i = 0, k = strlen(kw);
    bool first = true;
    while (i < n) {
        const char *e = memchr(out + i, '\n', n - i);
        size_t ll = e ? (size_t)(e - (out + i)) : n - i;
        if (!first && ll > 4) {
            const char *t = out + i + 4;
            size_t tl = 0, tn = ll - 4;
            while (tn > 0 && (*t == ' ' || *t == '\t')) { /* clients strip it */
                t++;
                tn--;
            }
            while (tl < tn &&
                   ((t[tl] >= 'A' && t[tl] <= 'Z') ||
                    (t[tl] >= 'a' && t[tl] <= 'z') ||
                    (t[tl] >= '0' && t[tl] <= '9') || t[tl] == '-'))
                tl++;
            if (tl == k && strncasecmp(t, kw, k) == 0)
                return true;
        }
        first = false;
        i += ll + 1;
    }
    return false;
}

static void test_ehlo_keywords(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(ehlo_kw_cases); i++) {
        const struct ehlo_kw_case *c = &ehlo_kw_cases[i];
        char name[96], out[1024];
        snprintf(name, sizeof(name), "ehlo_filter: %s", c->name);
        case_begin(name);
        bool ch;
        int r = stp_ehlo_filter(c->in, strlen(c->in), out, sizeof(out),
                                c->flags, &ch);
        CHECK(r < 0 || !ehlo_advertises(out, (size_t)r, c->forbidden),
              "output advertises %s: \"%s\"", c->forbidden,
              esc(out, r > 0 ? (size_t)r : 0));
        case_end();
    }
}

/* ---- stp_dot_scan ------------------------------------------------------------------ */

struct dot_case {
    const char *in;
    size_t n;
    enum stp_dot_result res;
    size_t used;
};

static const struct dot_case dot_cases[] = {
    {S("hello\r\n.\r\n"), STP_DOT_END, 10},
    {S(".\r\n"), STP_DOT_END, 3},
    {S("hello\r\n.\r\nMAIL FROM:<x>\r\n"), STP_DOT_END, 10},
    {S("hello\r\n..\r\n.\r\n"), STP_DOT_END, 14},
    {S("\r\n\r\n.\r\n"), STP_DOT_END, 7},
    {S("hello\r\r\n.\r\n"), STP_DOT_END, 11},
    {S("hello\r\n"), STP_DOT_MORE, 7},
    {S("hello\r\n."), STP_DOT_MORE, 8},
    {S("hello\r\n.\r"), STP_DOT_MORE, 9 - 1},
    {S(".\r"), STP_DOT_MORE, 1},
    {S(""), STP_DOT_MORE, 0},
    {S("a\rb\nc\r\n..d\r\n.x\r\n"), STP_DOT_MORE, 16},
    {S("x\n..\n"), STP_DOT_MORE, 5},
    {S("x\r..\r\n"), STP_DOT_MORE, 6},
    {S("x\n.y\r\n"), STP_DOT_MORE, 6},
    {S("x\r\n.y\r\n"), STP_DOT_MORE, 7},
    /* the smuggling family: *used stops before the offending byte */
    {S("hello\n.\nMAIL FROM:<x>\r\n"), STP_DOT_SMUGGLE, 7},
    {S("hello\r\n.\nMAIL FROM:<x>\r\n"), STP_DOT_SMUGGLE, 8},
    {S("hello\n.\r\nMAIL FROM:<x>\r\n"), STP_DOT_SMUGGLE, 7},
    {S("hello\r.\rMAIL FROM:<x>\r\n"), STP_DOT_SMUGGLE, 7},
    {S("hello\r.\nX"), STP_DOT_SMUGGLE, 7},
    {S("hello\r.\r\n"), STP_DOT_SMUGGLE, 7},
    {S("hello\r\n.\rX\r\n.\r\n"), STP_DOT_SMUGGLE, 8},
    {S("hello\r\n.\r."), STP_DOT_SMUGGLE, 8},
    {S("a\r\n.\r\r\n"), STP_DOT_SMUGGLE, 4},
    {S("hello\n.\r"), STP_DOT_SMUGGLE, 7},
    {S("\n.\n"), STP_DOT_SMUGGLE, 2},
    {S(".\n"), STP_DOT_SMUGGLE, 1},
    {S(".\rX"), STP_DOT_SMUGGLE, 1},
};

/* Feed P[0..N) in pieces ending at the offsets in CUTS (the last one is N),
 * keeping what the scanner did not use, like the engine does. */
static enum stp_dot_result dot_feed(const char *p, size_t n,
                                    const size_t *cuts, size_t ncuts,
                                    size_t *total)
{
    enum stp_dot_state st = STP_DOT_LINE_START;
    size_t done = 0; /* bytes used so far */
    for (size_t c = 0; c < ncuts; c++) {
        size_t avail = cuts[c] - done;
        char *b = malloc(avail ? avail : 1); /* exact size for ASan */
        memcpy(b, p + done, avail);
        size_t used = 99999;
        enum stp_dot_result r = stp_dot_scan(&st, b, avail, &used);
        free(b);
        if (used > avail) {
            failf("dot_scan used %zu of %zu", used, avail);
            *total = done;
            return r;
        }
        if (r != STP_DOT_MORE) {
            *total = done + used;
            return r;
        }
        CHECK(used == avail || (used == avail - 1 && p[done + used] == '\r'),
              "MORE used %zu of %zu (\"%s\")", used, avail,
              esc(p + done, avail));
        done += used;
    }
    *total = done;
    return STP_DOT_MORE;
}

static void test_dot_scan(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(dot_cases); i++) {
        const struct dot_case *c = &dot_cases[i];
        char name[96];
        snprintf(name, sizeof(name), "dot_scan \"%s\"", esc(c->in, c->n));
        case_begin(name);
        size_t cuts[64], total;
        enum stp_dot_result r;
        cuts[0] = c->n;
        r = dot_feed(c->in, c->n, cuts, 1, &total);
        CHECK(r == c->res && total == c->used, "whole: %d/%zu, want %d/%zu",
              (int)r, total, (int)c->res, c->used);
        for (size_t k = 1; k < c->n; k++) {
            cuts[0] = k;
            cuts[1] = c->n;
            r = dot_feed(c->in, c->n, cuts, 2, &total);
            CHECK(r == c->res && total == c->used,
                  "split at %zu: %d/%zu, want %d/%zu", k, (int)r, total,
                  (int)c->res, c->used);
        }
        for (size_t k = 0; k < c->n; k++)
            cuts[k] = k + 1;
        r = dot_feed(c->in, c->n, cuts, c->n, &total);
        CHECK(r == c->res && total == c->used,
              "byte by byte: %d/%zu, want %d/%zu", (int)r, total, (int)c->res,
              c->used);
        case_end();
    }
}

/* ---- the engine ------------------------------------------------------------------ */

#define REC_CAP (256 * 1024)

/* Everything the engine emitted, and the caller's buffers. */
struct rec {
    struct stp_smtp s;
    char up[REC_CAP];   /* upstream wire: lines + CRLF, raw slices */
    size_t up_len;
    char raw[REC_CAP];  /* the STP_FWD_RAW bytes alone */
    size_t raw_len;
    char cli[REC_CAP];
    size_t cli_len;
    int start_tls;
    bool tls_pending;   /* start_tls called, tls_started not yet */
    int closes;
    enum stp_close_reason reason;
    bool cut;
    int rejects;
    int up_err;
    bool up_gone;       /* upstream cut: the caller feeds it no more */
    const char *in_base; /* the buffer of the client_input call under way */
    bool fed_pending;    /* TLS was pending when that call began */
    size_t in_len;
    char cbuf[REC_CAP]; /* client bytes not consumed yet */
    size_t clen;
    char ubuf[REC_CAP];
    size_t ulen;
    char viol[300];     /* first broken invariant */
    unsigned room;      /* pieces the upstream takes before it is full;
                           0: unlimited */
    unsigned pieces;    /* to_upstream calls since the caller made room */
};

static struct rec R;
static long partial_calls;       /* to_client calls that were not whole lines */
static char partial_example[200];

/* After every engine call the client stream must hold whole CRLF lines, each
 * starting with three digits. */
static void check_client_stream(void)
{
    size_t i = 0;
    while (i < R.cli_len) {
        const char *e = memchr(R.cli + i, '\n', R.cli_len - i);
        size_t ll = e ? (size_t)(e - (R.cli + i)) : R.cli_len - i;
        if (!e || ll < 4 || e[-1] != '\r' || R.cli[i] < '0' ||
            R.cli[i] > '9' || R.cli[i + 1] < '0' || R.cli[i + 1] > '9' ||
            R.cli[i + 2] < '0' || R.cli[i + 2] > '9') {
            if (!R.viol[0])
                snprintf(R.viol, sizeof(R.viol),
                         "client stream not whole reply lines: \"%s\"",
                         esc(R.cli + i, R.cli_len - i));
            return;
        }
        i += ll + 1;
    }
}

static void violation(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void violation(const char *fmt, ...)
{
    if (R.viol[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(R.viol, sizeof(R.viol), fmt, ap);
    va_end(ap);
}

static void append(char *dst, size_t *len, const char *p, size_t n)
{
    if (*len + n > REC_CAP) {
        violation("recorder overflow");
        return;
    }
    memcpy(dst + *len, p, n);
    *len += n;
}

static void op_to_upstream(void *ctx, enum stp_fwd kind, const char *p,
                           size_t n)
{
    if (R.closes)
        violation("to_upstream after close: \"%s\"", esc(p, n));
    if (R.room && R.pieces++ >= R.room)
        violation("to_upstream while full: \"%s\"", esc(p, n));
    if (kind == STP_FWD_LINE) {
        if (memchr(p, '\r', n) || memchr(p, '\n', n) || memchr(p, '\0', n))
            violation("FWD_LINE with CR/LF/NUL: \"%s\"", esc(p, n));
        append(R.up, &R.up_len, p, n);
        append(R.up, &R.up_len, "\r\n", 2);
    } else if (kind == STP_FWD_RAW) {
        if (!R.in_base || p < R.in_base || p + n > R.in_base + R.in_len)
            violation("FWD_RAW outside the client buffer");
        append(R.up, &R.up_len, p, n);
        append(R.raw, &R.raw_len, p, n);
    } else {
        violation("bad fwd kind %d", (int)kind);
    }
}

static void op_to_client(void *ctx, const char *p, size_t n)
{
    if (R.closes)
        violation("to_client after close: \"%s\"", esc(p, n));
    /* The header promises complete lines per call; counted apart (see
     * test_client_calls) so one deviation does not hide everything else. */
    if (n < 2 || p[n - 2] != '\r' || p[n - 1] != '\n') {
        if (!partial_calls++)
            snprintf(partial_example, sizeof(partial_example), "%s",
                     esc(p, n));
    }
    append(R.cli, &R.cli_len, p, n);
}

static void op_start_tls(void *ctx)
{
    if (R.closes)
        violation("start_tls after close");
    if (R.tls_pending)
        violation("start_tls twice");
    R.start_tls++;
    R.tls_pending = true;
}

static void op_close(void *ctx, enum stp_close_reason why, bool cut)
{
    if (R.closes)
        violation("close twice (%s after %s)", stp_close_reason_name(why),
                  stp_close_reason_name(R.reason));
    if (!stp_close_reason_name(why))
        violation("no name for close reason %d", (int)why);
    R.closes++;
    R.reason = why;
    R.cut = cut;
    if (cut)
        R.up_gone = true;
}

static void op_event(void *ctx, const char *event, const char *detail)
{
    if (!event || !detail)
        violation("event with NULL text");
    else if (strcmp(event, "bug") == 0)
        violation("engine reports a bug: %s", detail);
    else if (strcmp(event, "reject") == 0)
        R.rejects++;
}

static bool op_upstream_full(void *ctx)
{
    return R.room && R.pieces >= R.room;
}

static const struct stp_proto_actions rec_ops = {
    .to_upstream = op_to_upstream,
    .to_client = op_to_client,
    .start_tls = op_start_tls,
    .close = op_close,
    .event = op_event,
    .upstream_full = op_upstream_full,
};

/* The relay's view of the recorder's buffers, for the feed loop the daemon
 * runs too. */
static const char *feed_input(void *ctx, enum stp_side side, size_t *n)
{
    if (side == STP_SIDE_UPSTREAM) {
        *n = R.up_gone ? 0 : R.ulen;
        return R.ubuf;
    }
    *n = R.clen;
    R.in_base = R.cbuf; /* to check that RAW pieces are slices of it */
    R.in_len = R.clen;
    R.fed_pending = R.tls_pending;
    return R.cbuf;
}

static void feed_consume(void *ctx, enum stp_side side, size_t k)
{
    char *buf = side == STP_SIDE_CLIENT ? R.cbuf : R.ubuf;
    size_t *len = side == STP_SIDE_CLIENT ? &R.clen : &R.ulen;
    if (k > *len) {
        violation("%s input consumed %zu of %zu",
                  side == STP_SIDE_CLIENT ? "client" : "upstream", k, *len);
        k = *len;
    }
    if (side == STP_SIDE_CLIENT && k && R.fed_pending)
        violation("client bytes consumed while waiting for TLS: \"%s\"",
                  esc(R.cbuf, k));
    memmove(buf, buf + k, *len - k);
    *len -= k;
    check_client_stream();
}

static const struct stp_feed_io rec_feed = {feed_input, feed_consume, NULL};

/* Offer the buffered bytes to the engine until neither side moves. */
static void pump(void)
{
    while (stp_proto_feed(&stp_proto_smtp, &R.s, &rec_feed, NULL) < 0) {
        R.up_err++; /* the engine asked to close */
        R.up_gone = true;
        R.ulen = 0;
    }
    R.in_base = NULL;
    check_client_stream();
}

enum step_op {
    S_END = 0,
    S_C,       /* client bytes */
    S_U,       /* upstream bytes */
    S_TLS,     /* handshake done: the caller drops buffered plaintext */
    S_LOST,
    S_TIMEOUT,
    S_SHUTDOWN, /* the proxy is stopping */
    S_UNREACH,
    S_LEFT,    /* expect N client bytes still unconsumed */
    S_CLI,     /* expect N bytes sent to the client so far */
};

struct step {
    enum step_op op;
    const char *p; /* for S_C/S_U: N == 0 means strlen(P) (built at start) */
    size_t n;
};

#define C(lit) {S_C, lit, sizeof(lit) - 1}
#define U(lit) {S_U, lit, sizeof(lit) - 1}
#define CD(buf) {S_C, buf, 0}
#define UD(buf) {S_U, buf, 0}
#define TLS {S_TLS, NULL, 0}
#define LOST {S_LOST, NULL, 0}
#define TIMEOUT {S_TIMEOUT, NULL, 0}
#define SHUTDOWN {S_SHUTDOWN, NULL, 0}
#define UNREACH {S_UNREACH, NULL, 0}
#define LEFT(k) {S_LEFT, NULL, k}
#define CLI(lit) {S_CLI, NULL, sizeof(lit) - 1}

#define NO_CLOSE -1
#define ANY_CLOSE -2

struct scen {
    const char *name;
    struct stp_smtp_cfg cfg;
    struct step steps[28];
    const char *up;     /* expected upstream wire bytes */
    const char *up_min; /* if set: UP is the most that may be sent and
                           UP_MIN the least (smuggling: safe bytes vary) */
    const char *raw;    /* expected FWD_RAW bytes (prefix if UP_MIN); NULL:
                           don't check */
    const char *cli;
    int close;          /* reason, NO_CLOSE or ANY_CLOSE */
    int cut;            /* -1: don't check */
    int start_tls;
    bool reject;        /* at least one "reject" event */
    bool up_err;        /* upstream_input returned < 0 */
    const char *summary; /* the engine's summary at the end; NULL: don't
                            check */
};

#define HOST "proxy.test"
/* offer_starttls, require_tls, tls_active, upstream_tls */
#define CFG(offer, req, active, uptls)                                         \
    {.offer_starttls = offer, .require_tls = req, .tls_active = active,        \
     .upstream_tls = uptls, .max_line = 512, .hostname = HOST}
#define DEF CFG(true, false, false, false)
#define NONE CFG(false, false, false, false) /* tls = none */
#define LMTP                                                                   \
    {.offer_starttls = true, .lmtp = true, .max_line = 512, .hostname = HOST}
/* DEF with max_errors = n */
#define ERRS(n)                                                                \
    {.offer_starttls = true, .max_line = 512, .hostname = HOST,               \
     .max_errors = n}

#define GREET "220 mx.test ESMTP\r\n"
#define EHLO_UP                                                                \
    "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n"   \
    "250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
/* offer_starttls, no TLS yet: STARTTLS moved last, AUTH gone */
#define EHLO_PLAIN                                                             \
    "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"                   \
    "250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
/* after TLS: no STARTTLS, AUTH kept */
#define EHLO_TLS                                                               \
    "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"                   \
    "250-AUTH PLAIN LOGIN\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
#define EHLO_CHUNK_UP                                                          \
    "250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n"
#define EHLO_CHUNK_PLAIN                                                       \
    "250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n"        \
    "250 STARTTLS\r\n"

#define R220 "220 2.0.0 Ready to start TLS\r\n"
#define R530 "530 5.7.0 Must issue a STARTTLS command first\r\n"
#define R501TLS "501 5.5.4 Syntax: STARTTLS\r\n"
#define R554TLS "554 5.5.1 Error: TLS already active\r\n"
#define R502 "502 5.5.1 Error: command not implemented\r\n"
#define R538                                                                   \
    "538 5.7.11 Encryption required for requested authentication mechanism\r\n"
#define R503HELO "503 5.5.1 Error: send HELO/EHLO first\r\n"
#define R500LONG "500 5.5.2 Error: line too long\r\n"
#define R500CHAR "500 5.5.2 Error: bad character in command\r\n"
#define R550X "550 5.7.0 Error: insufficient authorization\r\n"
#define R501BDAT "501 5.5.4 Syntax: BDAT size [LAST]\r\n"
#define R554SMUG "554 5.5.2 Error: bare <CR> or <LF> near end of data\r\n"
#define ERR421 "421 4.4.2 " HOST " Error: upstream protocol error\r\n"
#define LOST421 "421 4.4.2 Upstream connection lost\r\n"
#define TMO421 "421 4.4.2 " HOST " Error: timeout exceeded\r\n"
#define UNR421 "421 4.3.2 Service not available, closing transmission channel\r\n"
#define ERRS421 "421 4.7.0 " HOST " Error: too many errors\r\n"
#define SHUT421 "421 4.3.2 Service shutting down, closing transmission channel\r\n"
#define R550 "550 5.1.1 No such user\r\n"
#define R450 "450 4.2.1 Try again later\r\n"
#define OK250 "250 2.0.0 Ok\r\n"
#define R354 "354 End data with <CR><LF>.<CR><LF>\r\n"

/* Inputs and expectations too long to write out, built by init_dynamic(). */
static char d_long[1024], d_long_pend[1024];
static char d_512[600], d_513[600], d_512lf[600], d_512lf_up[600];
static char d_long_reply[2200];
/* 70 lines of "250-" and 1000 x: over STP_MAX_REPLY after 65 of them */
static char d_endless[70 * 1006 + 1], d_endless_cli[sizeof(GREET) + 65 * 1006 +
                                                  sizeof(ERR421)];
static char d_70noop[70 * 6 + 1], d_64ok[64 * 14 + 1], d_6ok[6 * 14 + 1],
    d_70ok_cli[sizeof(GREET) + 70 * 14 + 1];

static void init_dynamic(void)
{
    char a600[601], a505[506], a506[507];
    memset(a600, 'a', 600);
    a600[600] = 0;
    memset(a505, 'a', 505);
    a505[505] = 0;
    memset(a506, 'a', 506);
    a506[506] = 0;
    snprintf(d_long, sizeof(d_long), "NOOP %s\r\nNOOP\r\n", a600);
    snprintf(d_long_pend, sizeof(d_long_pend), "NOOP\r\nNOOP %s\r\nRSET\r\n",
             a600);
    snprintf(d_512, sizeof(d_512), "NOOP %s\r\n", a505);    /* 512 octets */
    snprintf(d_513, sizeof(d_513), "NOOP %s\r\nNOOP\r\n", a506); /* 513 */
    snprintf(d_512lf, sizeof(d_512lf), "NOOP %s\n", a506);  /* 512 with LF */
    snprintf(d_512lf_up, sizeof(d_512lf_up), "NOOP %s\r\n", a506);
    char x2100[2101];
    memset(x2100, 'x', 2100);
    x2100[2100] = 0;
    snprintf(d_long_reply, sizeof(d_long_reply), "250 %s\r\n", x2100);
    char cont[1007];
    memset(cont, 'x', sizeof(cont));
    memcpy(cont, "250-", 4);
    memcpy(cont + 1004, "\r\n", 3);
    strcpy(d_endless_cli, GREET);
    for (int i = 0; i < 70; i++) {
        strcat(d_endless, cont);
        if (i < 65)
            strcat(d_endless_cli, cont);
    }
    strcat(d_endless_cli, ERR421);
    d_70noop[0] = d_64ok[0] = d_6ok[0] = 0;
    strcpy(d_70ok_cli, GREET);
    for (int i = 0; i < 70; i++) {
        strcat(d_70noop, "NOOP\r\n");
        strcat(i < 64 ? d_64ok : d_6ok, OK250);
        strcat(d_70ok_cli, OK250);
    }
}

/* Trailing fields left out of a row are 0/false. */
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

/* Scenarios. Upstream output is the wire form (forwarded lines get CRLF). */
static const struct scen scens[] = {
    /* --- greeting --- */
    {"greeting relayed", DEF, {U(GREET)}, "", NULL, "", GREET, NO_CLOSE, -1},
    {"multi-line greeting", DEF, {U("220-mx.test ESMTP\r\n220 hello\r\n")},
     "", NULL, "", "220-mx.test ESMTP\r\n220 hello\r\n", NO_CLOSE, -1},
    {"LF-only greeting normalised", DEF, {U("220 mx.test\n")}, "", NULL, "",
     "220 mx.test\r\n", NO_CLOSE, -1},
    {"client waits for the greeting", DEF,
     {C("EHLO c\r\n"), LEFT(8), CLI(""), U(GREET), U(EHLO_UP)},
     "EHLO c\r\n", NULL, "", GREET EHLO_PLAIN, NO_CLOSE, -1},

    /* --- EHLO filter in the engine --- */
    {"EHLO filtered: STARTTLS last, AUTH gone", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP)}, "EHLO c\r\n", NULL, "",
     GREET EHLO_PLAIN, NO_CLOSE, -1},
    {"EHLO reply held until complete", DEF,
     {U(GREET), C("EHLO c\r\n"), U("250-mx.test\r\n250-SIZE 1\r\n"),
      CLI(GREET), U("250 HELP\r\n")},
     "EHLO c\r\n", NULL, "",
     GREET "250-mx.test\r\n250-SIZE 1\r\n250-HELP\r\n250 STARTTLS\r\n",
     NO_CLOSE, -1},
    {"EHLO removed last line", CFG(false, false, false, false),
     {U(GREET), C("EHLO c\r\n"),
      U("250-mx.test\r\n250-SIZE 1000\r\n250 XFORWARD NAME ADDR\r\n")},
     "EHLO c\r\n", NULL, "", GREET "250-mx.test\r\n250 SIZE 1000\r\n",
     NO_CLOSE, -1},
    {"EHLO domain only gets STARTTLS", DEF,
     {U(GREET), C("EHLO c\r\n"), U("250 mx.test\r\n")}, "EHLO c\r\n", NULL, "",
     GREET "250-mx.test\r\n250 STARTTLS\r\n", NO_CLOSE, -1},
    {"EHLO LF-only reply", DEF,
     {U(GREET), C("EHLO c\r\n"), U("250-mx.test\n250-STARTTLS\n250 SIZE\n")},
     "EHLO c\r\n", NULL, "",
     GREET "250-mx.test\r\n250-SIZE\r\n250 STARTTLS\r\n", NO_CLOSE, -1},
    {"EHLO REQUIRETLS stripped (plain upstream)", CFG(false, false, false, false),
     {U(GREET), C("EHLO c\r\n"),
      U("250-mx.test\r\n250-REQUIRETLS\r\n250 SIZE\r\n")},
     "EHLO c\r\n", NULL, "", GREET "250-mx.test\r\n250 SIZE\r\n", NO_CLOSE, -1},
    {"EHLO REQUIRETLS stripped (plaintext client leg, TLS upstream)",
     CFG(false, false, false, true),
     {U(GREET), C("EHLO c\r\n"),
      U("250-mx.test\r\n250-REQUIRETLS\r\n250 SIZE\r\n")},
     "EHLO c\r\n", NULL, "", GREET "250-mx.test\r\n250 SIZE\r\n", NO_CLOSE, -1},
    {"MAIL REQUIRETLS refused unless both legs are TLS", CFG(false, false, false, true),
     {U(GREET), C("EHLO c\r\n"), U(OK250),
      C("MAIL FROM:<a> requiretls\r\nMAIL FROM:<requiretls@b> SIZE=1\r\n"),
      U(OK250)},
     "EHLO c\r\nMAIL FROM:<requiretls@b> SIZE=1\r\n", NULL, "",
     GREET OK250 "555 5.7.10 Error: REQUIRETLS not available on this path\r\n"
     OK250, NO_CLOSE, -1, 0, true},
    {"MAIL REQUIRETLS passes when both legs are TLS", CFG(false, false, true, true),
     {U(GREET), C("EHLO c\r\n"), U(OK250), C("MAIL FROM:<a> REQUIRETLS\r\n"),
      U(OK250)},
     "EHLO c\r\nMAIL FROM:<a> REQUIRETLS\r\n", NULL, "",
     GREET OK250 OK250, NO_CLOSE, -1},
    {"EHLO REQUIRETLS kept (both legs TLS)",
     CFG(false, false, true, true),
     {U(GREET), C("EHLO c\r\n"),
      U("250-mx.test\r\n250-REQUIRETLS\r\n250-AUTH PLAIN\r\n250 SIZE\r\n")},
     "EHLO c\r\n", NULL, "",
     GREET "250-mx.test\r\n250-REQUIRETLS\r\n250-AUTH PLAIN\r\n250 SIZE\r\n",
     NO_CLOSE, -1},
    {"EHLO XCLIENT/XFORWARD never offered", CFG(true, false, true, false),
     {U(GREET), C("EHLO c\r\n"),
      U("250-mx.test\r\n250-XCLIENT ADDR NAME\r\n250-xforward NAME\r\n"
        "250 SIZE\r\n")},
     "EHLO c\r\n", NULL, "", GREET "250-mx.test\r\n250 SIZE\r\n", NO_CLOSE, -1},
    {"EHLO non-250 reply relayed unchanged", DEF,
     {U(GREET), C("EHLO c\r\n"), U("502-5.5.1 no\r\n502 5.5.1 EHLO\r\n"),
      C("HELO c\r\n"), U("250 mx.test\r\n")},
     "EHLO c\r\nHELO c\r\n", NULL, "",
     GREET "502-5.5.1 no\r\n502 5.5.1 EHLO\r\n250 mx.test\r\n", NO_CLOSE, -1},
    {"EHLO and NOOP replies in one read", DEF,
     {U(GREET), C("EHLO c\r\nNOOP\r\n"), U(EHLO_UP OK250)},
     "EHLO c\r\nNOOP\r\n", NULL, "", GREET EHLO_PLAIN OK250, NO_CLOSE, -1},
    {"implicit TLS: no STARTTLS, AUTH kept", CFG(true, false, true, false),
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP), C("STARTTLS\r\n")}, "EHLO c\r\n",
     NULL, "", GREET EHLO_TLS R554TLS, NO_CLOSE, -1},

    /* --- STARTTLS --- */
    {"STARTTLS, then EHLO after TLS", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP), C("STARTTLS\r\n"), LEFT(0), TLS,
      C("EHLO c\r\n"), U(EHLO_UP)},
     "EHLO c\r\nEHLO c\r\n", NULL, "",
     GREET EHLO_PLAIN R220 EHLO_TLS, NO_CLOSE, -1, 1},
    {"STARTTLS lowercase", DEF,
     {U(GREET), C("starttls\r\n"), TLS}, "", NULL, "",
     GREET R220, NO_CLOSE, -1, 1},
    {"STARTTLS with an argument", DEF,
     {U(GREET), C("STARTTLS now\r\nNOOP\r\n"), U(OK250)}, "NOOP\r\n", NULL, "",
     GREET R501TLS OK250, NO_CLOSE, -1, 0},
    {"STARTTLS not offered", CFG(false, false, false, false),
     {U(GREET), C("STARTTLS\r\nNOOP\r\n"), U(OK250)}, "NOOP\r\n", NULL, "",
     GREET R502 OK250, NO_CLOSE, -1, 0},
    {"STARTTLS twice", DEF,
     {U(GREET), C("STARTTLS\r\n"), TLS, C("STARTTLS\r\n")},
     "", NULL, "", GREET R220 R554TLS, NO_CLOSE, -1, 1},
    {"STARTTLS waits for pending replies", DEF,
     {U(GREET), C("NOOP\r\nSTARTTLS\r\n"), LEFT(10), U(OK250), LEFT(0), TLS},
     "NOOP\r\n", NULL, "", GREET OK250 R220, NO_CLOSE, -1, 1},
    {"STARTTLS injection: pipelined NOOP never runs", DEF,
     {U(GREET), C("STARTTLS\r\nNOOP\r\n"), LEFT(6), TLS,
      C("EHLO c\r\n"), U(EHLO_UP)},
     "EHLO c\r\n", NULL, "", GREET R220 EHLO_TLS, NO_CLOSE, -1, 1},
    {"STARTTLS injection, LF-only, require_tls", CFG(true, true, false, false),
     {U(GREET), C("STARTTLS\nMAIL FROM:<evil>\n"), LEFT(17), TLS},
     "", NULL, "", GREET R220, NO_CLOSE, -1, 1},
    {"open plaintext transaction: RSET after TLS, its reply swallowed", DEF,
     {U(GREET), C("MAIL FROM:<a>\r\n"), U(OK250), C("STARTTLS\r\n"), TLS,
      C("EHLO c\r\n"), U(OK250 EHLO_UP)},
     "MAIL FROM:<a>\r\nRSET\r\nEHLO c\r\n", NULL, "",
     GREET OK250 R220 EHLO_TLS, NO_CLOSE, -1, 1},
    {"rejected MAIL opens no transaction: no RSET after TLS", DEF,
     {U(GREET), C("MAIL FROM:<a>\r\n"), U("550 5.7.1 no\r\n"),
      C("STARTTLS\r\n"), TLS, C("EHLO c\r\n"), U(EHLO_UP)},
     "MAIL FROM:<a>\r\nEHLO c\r\n", NULL, "",
     GREET "550 5.7.1 no\r\n" R220 EHLO_TLS, NO_CLOSE, -1, 1},
    {"503 to a second MAIL keeps the transaction: RSET after TLS", DEF,
     {U(GREET), C("MAIL FROM:<a>\r\n"), U(OK250), C("MAIL FROM:<b>\r\n"),
      U("503 5.5.1 Error: nested MAIL command\r\n"), C("STARTTLS\r\n"), TLS,
      C("EHLO c\r\n"), U(OK250 EHLO_UP)},
     "MAIL FROM:<a>\r\nMAIL FROM:<b>\r\nRSET\r\nEHLO c\r\n", NULL, "",
     GREET OK250 "503 5.5.1 Error: nested MAIL command\r\n" R220 EHLO_TLS,
     NO_CLOSE, -1, 1},
    {"refused EHLO keeps the transaction: RSET after TLS", DEF,
     {U(GREET), C("MAIL FROM:<a>\r\n"), U(OK250), C("EHLO c\r\n"),
      U("501 5.5.2 Syntax\r\n"), C("STARTTLS\r\n"), TLS, C("EHLO c\r\n"),
      U(OK250 EHLO_UP)},
     "MAIL FROM:<a>\r\nEHLO c\r\nRSET\r\nEHLO c\r\n", NULL, "",
     GREET OK250 "501 5.5.2 Syntax\r\n" R220 EHLO_TLS, NO_CLOSE, -1, 1},
    {"after TLS, a refused EHLO is no EHLO: MAIL still 503", DEF,
     {U(GREET), C("STARTTLS\r\n"), TLS, C("EHLO c\r\n"),
      U("501 5.5.2 Syntax\r\n"), C("MAIL FROM:<a>\r\n")},
     "EHLO c\r\n", NULL, "",
     GREET R220 "501 5.5.2 Syntax\r\n" R503HELO, NO_CLOSE, -1, 1, true},
    {"transaction ended by RSET: no RSET after TLS", DEF,
     {U(GREET), C("MAIL FROM:<a>\r\nRSET\r\n"), U(OK250 OK250),
      C("STARTTLS\r\n"), TLS, C("EHLO c\r\n"), U(EHLO_UP)},
     "MAIL FROM:<a>\r\nRSET\r\nEHLO c\r\n", NULL, "",
     GREET OK250 OK250 R220 EHLO_TLS, NO_CLOSE, -1, 1},
    {"421 to our RSET is relayed", DEF,
     {U(GREET), C("MAIL FROM:<a>\r\n"), U(OK250), C("STARTTLS\r\n"), TLS,
      U("421 4.3.0 bye\r\n")},
     "MAIL FROM:<a>\r\nRSET\r\n", NULL, "",
     GREET OK250 R220 "421 4.3.0 bye\r\n", STP_CLOSE_UPSTREAM_421, -1, 1},
    {"after TLS, MAIL before a new EHLO: 503, not forwarded", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP), C("STARTTLS\r\n"), TLS,
      C("MAIL FROM:<a>\r\nRCPT TO:<b>\r\nAUTH PLAIN AGEAYg==\r\n"
        "NOOP\r\nRSET\r\nHELP\r\n"),
      U(OK250 OK250 "214 2.0.0 help\r\n")},
     "EHLO c\r\nNOOP\r\nRSET\r\nHELP\r\n", NULL, "",
     GREET EHLO_PLAIN R220 R503HELO R503HELO R503HELO OK250 OK250
     "214 2.0.0 help\r\n", NO_CLOSE, -1, 1, true},
    {"after TLS, HELO then MAIL is forwarded", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP), C("STARTTLS\r\n"), TLS,
      C("HELO c\r\n"), U("250 mx.test\r\n"), C("MAIL FROM:<a>\r\n"),
      U("250 2.1.0 Ok\r\n")},
     "EHLO c\r\nHELO c\r\nMAIL FROM:<a>\r\n", NULL, "",
     GREET EHLO_PLAIN R220 "250 mx.test\r\n250 2.1.0 Ok\r\n", NO_CLOSE, -1,
     1},
    {"implicit TLS: no new EHLO needed (the upstream is fresh)",
     CFG(true, false, true, false),
     {U(GREET), C("MAIL FROM:<a>\r\n"), U("250 2.1.0 Ok\r\n")},
     "MAIL FROM:<a>\r\n", NULL, "", GREET "250 2.1.0 Ok\r\n", NO_CLOSE, -1,
     0},
    {"timeout while waiting for the handshake", DEF,
     {U(GREET), C("STARTTLS\r\nNOOP\r\n"), TIMEOUT}, "", NULL, "",
     GREET R220 TMO421, STP_CLOSE_TIMEOUT, 1, 1},

    /* --- require_tls --- */
#define REQ530(verb_line)                                                      \
    {"530 for " verb_line, CFG(true, true, false, false),                           \
     {U(GREET), C(verb_line "\r\nNOOP\r\n"), U(OK250)}, "NOOP\r\n", NULL, "",  \
     GREET R530 OK250, NO_CLOSE, -1, 0, true}
    REQ530("MAIL FROM:<a@b>"),
    REQ530("mail from:<a@b>"),
    REQ530("RCPT TO:<a@b>"),
    REQ530("DATA"),
    REQ530("AUTH PLAIN AGEAYg=="),
    REQ530("AUTH LOGIN"),
    REQ530("VRFY root"),
    REQ530("EXPN staff"),
    REQ530("ETRN example.org"),
    REQ530("HELP"),
    REQ530("XYZZY"),
    REQ530("BDAT x"),
    {"530 for BDAT discards its octets", CFG(true, true, false, false),
     {U(GREET), C("BDAT 9\r\nMAIL FROMNOOP\r\n"), U(OK250)}, "NOOP\r\n", NULL,
     "", GREET R530 OK250, NO_CLOSE, -1, 0, true},
    {"530 for BDAT LAST split octets", CFG(true, true, false, false),
     {U(GREET), C("BDAT 10 LAST\r\nhello"), C("world"), C("NOOP\r\n"),
      U(OK250)},
     "NOOP\r\n", NULL, "", GREET R530 OK250, NO_CLOSE, -1, 0, true},
    {"require_tls: allowed verbs forwarded", CFG(true, true, false, false),
     {U(GREET), C("EHLO c\r\nHELO c\r\nNOOP\r\nRSET\r\n"),
      U(EHLO_UP "250 mx.test\r\n" OK250 OK250), C("QUIT\r\n"),
      U("221 2.0.0 Bye\r\n")},
     "EHLO c\r\nHELO c\r\nNOOP\r\nRSET\r\nQUIT\r\n", NULL, "",
     GREET EHLO_PLAIN "250 mx.test\r\n" OK250 OK250 "221 2.0.0 Bye\r\n",
     STP_CLOSE_QUIT, -1, 0},
    {"require_tls: MAIL allowed after TLS", CFG(true, true, false, false),
     {U(GREET), C("MAIL FROM:<a>\r\n"), C("STARTTLS\r\n"), TLS,
      C("EHLO c\r\n"), U(EHLO_UP), C("MAIL FROM:<a>\r\n"),
      U("250 2.1.0 Ok\r\n")},
     "EHLO c\r\nMAIL FROM:<a>\r\n", NULL, "",
     GREET R530 R220 EHLO_TLS "250 2.1.0 Ok\r\n", NO_CLOSE, -1, 1, true},

    /* --- XCLIENT / XFORWARD and reply order --- */
    {"XCLIENT/XFORWARD always refused", CFG(true, false, true, false),
     {U(GREET),
      C("XCLIENT ADDR=1.2.3.4\r\nxforward NAME=spoof\r\nXCLIENT\r\nNOOP\r\n"),
      U(OK250)},
     "NOOP\r\n", NULL, "", GREET R550X R550X R550X OK250, NO_CLOSE, -1, 0,
     true},
    /* Postfix and Exim split the verb on any white space (and Postfix skips
     * leading blanks): the proxy must see what they see. */
    {"XCLIENT/XFORWARD behind TAB, VT, FF or leading blanks refused",
     CFG(true, false, true, false),
     {U(GREET),
      C("XCLIENT\tADDR=6.6.6.6\r\nXCLIENT\vADDR=6.6.6.6\r\n"
        "XCLIENT\fADDR=6.6.6.6\r\n XCLIENT ADDR=6.6.6.6\r\n"
        "\txforward ADDR=6.6.6.6\r\nNOOP\r\n"),
      U(OK250)},
     "NOOP\r\n", NULL, "", GREET R550X R550X R550X R550X R550X OK250,
     NO_CLOSE, -1, 0, true},
    {"odd white space forwarded in canonical form", CFG(true, false, true, false),
     {U(GREET), C("  EHLO\tc\r\n"), U(EHLO_UP),
      C("MAIL\tFROM:<a>\r\nRCPT  TO:<b>\r\nNOOP\f\r\n"),
      U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" OK250)},
     "EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nNOOP\r\n", NULL, "",
     GREET EHLO_TLS "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" OK250, NO_CLOSE, -1,
     0},
    {"DATA<TAB> is DATA: content follows the 354", CFG(true, false, true, false),
     {U(GREET), C("MAIL FROM:<a>\r\n"), U("250 2.1.0 Ok\r\n"),
      C("RCPT TO:<b>\r\n"), U("250 2.1.5 Ok\r\n"), C("DATA\t\r\n"), U(R354),
      C("XCLIENT ADDR=6.6.6.6\r\n.\r\n"), U(OK250)},
     "MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nXCLIENT ADDR=6.6.6.6\r\n.\r\n",
     NULL, "XCLIENT ADDR=6.6.6.6\r\n.\r\n",
     GREET "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" R354 OK250, NO_CLOSE, -1, 0},
    {"BDAT<TAB>5 counts the chunk, the XCLIENT after it is refused",
     CFG(true, false, true, false),
     {U(GREET), C("EHLO c\r\n"), U(EHLO_CHUNK_UP),
      C("BDAT\t5\r\nAAAAAXCLIENT ADDR=6.6.6.6\r\nbdat 0  last\r\n"),
      U(OK250), U(OK250)},
     "EHLO c\r\nBDAT 5\r\nAAAAABDAT 0 LAST\r\n", NULL, "AAAAA",
     GREET "250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n"
     OK250 R550X OK250, NO_CLOSE, -1, 0, true},
    {"STARTTLS<TAB> is STARTTLS", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP), C("STARTTLS\t\r\n"), TLS,
      C("EHLO c\r\n"), U(EHLO_UP)},
     "EHLO c\r\nEHLO c\r\n", NULL, "", GREET EHLO_PLAIN R220 EHLO_TLS,
     NO_CLOSE, -1, 1},
    {"reply order with a pipelined XCLIENT", DEF,
     {U(GREET),
      C("MAIL FROM:<a>\r\nRCPT TO:<b>\r\nXCLIENT ADDR=1.2.3.4\r\n"
        "RCPT TO:<c>\r\n"),
      CLI(GREET), U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"),
      U("250 2.1.5 Ok\r\n")},
     "MAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\n", NULL, "",
     GREET "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" R550X "250 2.1.5 Ok\r\n",
     NO_CLOSE, -1, 0, true},

    /* --- DATA --- */
    {"DATA transaction byte-exact", DEF,
     {U(GREET), C("EHLO client.test\r\n"), U(EHLO_UP),
      C("MAIL FROM:<a@x.test>\r\n"), U("250 2.1.0 Ok\r\n"),
      C("RCPT TO:<b@y.test>\r\n"), U("250 2.1.5 Ok\r\n"), C("DATA\r\n"),
      U(R354), C("Subject: t\r\n\r\n..leading dot\r\nbody\r\n.\r\n"),
      U("250 2.0.0 Ok: queued as ABC\r\n"), C("QUIT\r\n"),
      U("221 2.0.0 Bye\r\n")},
     "EHLO client.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
     "DATA\r\nSubject: t\r\n\r\n..leading dot\r\nbody\r\n.\r\nQUIT\r\n",
     NULL, "Subject: t\r\n\r\n..leading dot\r\nbody\r\n.\r\n",
     GREET EHLO_PLAIN "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" R354
                      "250 2.0.0 Ok: queued as ABC\r\n221 2.0.0 Bye\r\n",
     STP_CLOSE_QUIT, -1, 0},
    {"DATA content with bare CR/LF away from the dot", DEF,
     {U(GREET), C("DATA\r\n"), U(R354),
      C("a\rb\nc\r\n..d\r\n.x\r\nx\n..\r\n\r\n.\r\n"), U(OK250)},
     "DATA\r\na\rb\nc\r\n..d\r\n.x\r\nx\n..\r\n\r\n.\r\n", NULL,
     "a\rb\nc\r\n..d\r\n.x\r\nx\n..\r\n\r\n.\r\n", GREET R354 OK250, NO_CLOSE,
     -1},
    {"DATA empty message", DEF,
     {U(GREET), C("DATA\r\n"), U(R354), C(".\r\nNOOP\r\n"), U(OK250 OK250)},
     "DATA\r\n.\r\nNOOP\r\n", NULL, ".\r\n", GREET R354 OK250 OK250, NO_CLOSE,
     -1},
    {"DATA waits for 354 before reading content", DEF,
     {U(GREET), C("DATA\r\nhello\r\n.\r\n"), LEFT(10), U(R354), LEFT(0),
      U(OK250)},
     "DATA\r\nhello\r\n.\r\n", NULL, "hello\r\n.\r\n", GREET R354 OK250,
     NO_CLOSE, -1},
    {"DATA refused: back to commands", DEF,
     {U(GREET), C("DATA\r\n"), U("554 5.5.1 No valid recipients\r\n"),
      C("NOOP\r\n"), U(OK250)},
     "DATA\r\nNOOP\r\n", NULL, "",
     GREET "554 5.5.1 No valid recipients\r\n" OK250, NO_CLOSE, -1},
    {"commands pipelined after end of data", DEF,
     {U(GREET), C("DATA\r\n"), U(R354), C("line\r\n.\r\nRSET\r\nNOOP\r\n"),
      U("250 2.0.0 queued\r\n" OK250 OK250)},
     "DATA\r\nline\r\n.\r\nRSET\r\nNOOP\r\n", NULL, "line\r\n.\r\n",
     GREET R354 "250 2.0.0 queued\r\n" OK250 OK250, NO_CLOSE, -1},
    {"XCLIENT inside content is content", DEF,
     {U(GREET), C("DATA\r\n"), U(R354), C("XCLIENT ADDR=1.2.3.4\r\n.\r\n"),
      U(OK250)},
     "DATA\r\nXCLIENT ADDR=1.2.3.4\r\n.\r\n", NULL,
     "XCLIENT ADDR=1.2.3.4\r\n.\r\n", GREET R354 OK250, NO_CLOSE, -1},

    /* --- smuggling --- */
#define SMUG(label, content, safe)                                             \
    {"smuggling " label, DEF,                                                \
     {U(GREET), C("DATA\r\n"), U(R354), C(content), U(OK250)},                 \
     "DATA\r\n" safe, "DATA\r\n", safe, GREET R354 R554SMUG,                   \
     STP_CLOSE_SMUGGLE, 1}
    /* The 554 reaches a cap of 1: one close, for the errors. */
    {"smuggling with max_errors = 1 closes once", ERRS(1),
     {U(GREET), C("DATA\r\n"), U(R354), C("hello\n.\nMAIL FROM:<evil>\r\n")},
     "DATA\r\nhello\n.", "DATA\r\n", "hello\n.", GREET R354 R554SMUG ERRS421,
     STP_CLOSE_ERRORS, 1},
    SMUG("\\n.\\n", "hello\n.\nMAIL FROM:<evil>\r\n", "hello\n."),
    SMUG("\\r\\n.\\n", "hello\r\n.\nMAIL FROM:<evil>\r\n", "hello\r\n."),
    SMUG("\\n.\\r\\n", "hello\n.\r\nMAIL FROM:<evil>\r\n", "hello\n."),
    SMUG("\\r.\\r", "hello\r.\rMAIL FROM:<evil>\r\n", "hello\r."),
    SMUG("\\r.\\r\\n", "hello\r.\r\nMAIL FROM:<evil>\r\n", "hello\r."),
    SMUG("\\r\\n.\\rX", "hello\r\n.\rX\r\n.\r\n", "hello\r\n."),
    SMUG("at content start", "\n.\nMAIL FROM:<evil>\r\n", "\n."),
    SMUG("dot then LF at start", ".\nRCPT TO:<evil>\r\n", "."),

    /* --- BDAT --- */
    {"BDAT with CHUNKING: octets never parsed", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_CHUNK_UP), C("MAIL FROM:<a>\r\n"),
      U("250 2.1.0 Ok\r\n"), C("RCPT TO:<b>\r\n"), U("250 2.1.5 Ok\r\n"),
      C("BDAT 9\r\nXCLIENT\r\nbdat 7 last\r\na\r\n.\r\nX"), C("QUIT\r\n"),
      U("250 2.0.0 9 octets\r\n250 2.0.0 queued\r\n221 2.0.0 Bye\r\n")},
     "EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 9\r\nXCLIENT\r\n"
     "BDAT 7 LAST\r\na\r\n.\r\nXQUIT\r\n",
     NULL, "XCLIENT\r\na\r\n.\r\nX",
     GREET EHLO_CHUNK_PLAIN "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
                            "250 2.0.0 9 octets\r\n250 2.0.0 queued\r\n"
                            "221 2.0.0 Bye\r\n",
     STP_CLOSE_QUIT, -1},
    {"BDAT chunk across reads, BDAT 0 LAST", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_CHUNK_UP), C("BDAT 10\r\nhello"),
      C("world"), C("BDAT 0 LAST\r\nNOOP\r\n"), U(OK250 OK250 OK250)},
     "EHLO c\r\nBDAT 10\r\nhelloworldBDAT 0 LAST\r\nNOOP\r\n", NULL,
     "helloworld", GREET EHLO_CHUNK_PLAIN OK250 OK250 OK250, NO_CLOSE, -1},
    {"BDAT without CHUNKING: 502, octets dropped", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP), C("BDAT 9\r\nMAIL FROMNOOP\r\n"),
      U(OK250)},
     "EHLO c\r\nNOOP\r\n", NULL, "", GREET EHLO_PLAIN R502 OK250, NO_CLOSE,
     -1},
    {"BDAT after HELO: 502", DEF,
     {U(GREET), C("HELO c\r\n"), U("250 mx.test\r\n"),
      C("BDAT 3 LAST\r\nabcNOOP\r\n"), U(OK250)},
     "HELO c\r\nNOOP\r\n", NULL, "", GREET "250 mx.test\r\n" R502 OK250,
     NO_CLOSE, -1},
    {"BDAT syntax errors", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_CHUNK_UP),
      C("BDAT\r\nBDAT abc\r\nBDAT 5 LAST x\r\nBDAT -1\r\nNOOP\r\n"), U(OK250)},
     "EHLO c\r\nNOOP\r\n", NULL, "",
     GREET EHLO_CHUNK_PLAIN R501BDAT R501BDAT R501BDAT R501BDAT OK250,
     NO_CLOSE, -1},
    {"CHUNKING forgotten after TLS", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_CHUNK_UP), C("STARTTLS\r\n"), TLS,
      C("EHLO c\r\n"), U(EHLO_UP), C("BDAT 3 LAST\r\nabcNOOP\r\n"), U(OK250)},
     "EHLO c\r\nEHLO c\r\nNOOP\r\n", NULL, "",
     GREET EHLO_CHUNK_PLAIN R220 EHLO_TLS R502 OK250, NO_CLOSE, -1, 1},
    {"BDAT before the EHLO after TLS: 503, octets discarded", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_CHUNK_UP), C("STARTTLS\r\n"), TLS,
      C("BDAT 3 LAST\r\nabcNOOP\r\n"), U(OK250)},
     "EHLO c\r\nNOOP\r\n", NULL, "",
     GREET EHLO_CHUNK_PLAIN R220 R503HELO OK250, NO_CLOSE, -1, 1, true},
    {"CHUNKING forgotten by a later EHLO", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_CHUNK_UP), C("EHLO c\r\n"),
      U(EHLO_UP), C("BDAT 3 LAST\r\nabcNOOP\r\n"), U(OK250)},
     "EHLO c\r\nEHLO c\r\nNOOP\r\n", NULL, "",
     GREET EHLO_CHUNK_PLAIN EHLO_PLAIN R502 OK250, NO_CLOSE, -1},

    /* --- AUTH --- */
    {"AUTH before TLS where TLS is offered: 538, never forwarded", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP),
      C("AUTH PLAIN AHVzZXIAcGFzcw==\r\nAUTH\tLOGIN\r\n auth plain\r\n"
        "NOOP\r\n"), U(OK250)},
     "EHLO c\r\nNOOP\r\n", NULL, "",
     GREET EHLO_PLAIN R538 R538 R538 OK250, NO_CLOSE, -1, 0, true},
    {"AUTH before TLS with require_tls: 530", CFG(true, true, false, false),
     {U(GREET), C("AUTH PLAIN AHVzZXIAcGFzcw==\r\nNOOP\r\n"), U(OK250)},
     "NOOP\r\n", NULL, "", GREET R530 OK250, NO_CLOSE, -1, 0, true},
    {"AUTH LOGIN exchange after STARTTLS", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP), C("STARTTLS\r\n"), TLS,
      C("EHLO c\r\n"), U(EHLO_UP), C("AUTH LOGIN\r\n"),
      U("334 VXNlcm5hbWU6\r\n"), C("dXNlcg==\r\n"), U("334 UGFzc3dvcmQ6\r\n"),
      C("cGFzcw==\r\n"), U("235 2.7.0 Authentication successful\r\n"),
      C("STARTTLS\r\nNOOP\r\n"), U(OK250)},
     "EHLO c\r\nEHLO c\r\nAUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\nNOOP\r\n", NULL,
     "", GREET EHLO_PLAIN R220 EHLO_TLS
     "334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n"
     "235 2.7.0 Authentication successful\r\n" R554TLS OK250,
     NO_CLOSE, -1, 1},
    {"AUTH on a tls = none listener is relayed", NONE,
     {U(GREET), C("AUTH\tPLAIN AHVzZXIAcGFzcw==\r\n"),
      U("235 2.7.0 Authentication successful\r\n")},
     "AUTH PLAIN AHVzZXIAcGFzcw==\r\n", NULL, "",
     GREET "235 2.7.0 Authentication successful\r\n", NO_CLOSE, -1, 0},
    {"AUTH response pipelined waits for the 334", NONE,
     {U(GREET), C("AUTH LOGIN\r\ndXNlcg==\r\n"), LEFT(10),
      U("334 VXNlcm5hbWU6\r\n"), LEFT(0), U("535 5.7.8 failed\r\n"),
      C("NOOP\r\n"), U(OK250)},
     "AUTH LOGIN\r\ndXNlcg==\r\nNOOP\r\n", NULL, "",
     GREET "334 VXNlcm5hbWU6\r\n535 5.7.8 failed\r\n" OK250, NO_CLOSE, -1, 0},
    {"AUTH response is not a command", NONE,
     {U(GREET), C("AUTH LOGIN\r\n"), U("334 VXNlcm5hbWU6\r\n"),
      C("XCLIENT ADDR=1.2.3.4\r\n"), U("501 5.5.2 Cannot decode\r\n"),
      C("NOOP\r\n"), U(OK250)},
     "AUTH LOGIN\r\nXCLIENT ADDR=1.2.3.4\r\nNOOP\r\n", NULL, "",
     GREET "334 VXNlcm5hbWU6\r\n501 5.5.2 Cannot decode\r\n" OK250, NO_CLOSE,
     -1, 0},

    /* --- LMTP --- */
    {"LMTP: LHLO is its EHLO, one reply per accepted recipient", LMTP,
     {U(GREET), C("LHLO c\r\n"), U(EHLO_CHUNK_UP),
      C("MAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nRCPT TO:<d>\r\n"
        "DATA\r\n"),
      U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n250 2.1.5 Ok\r\n"),
      U(R354), C("hi\r\n.\r\nNOOP\r\n"), U("250 2.0.0 <b> Saved\r\n"),
      U("452 4.2.2 <d> over quota\r\n"), U(OK250)},
     "LHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nRCPT TO:<d>\r\n"
     "DATA\r\nhi\r\n.\r\nNOOP\r\n",
     NULL, "hi\r\n.\r\n",
     GREET "250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
     "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n250 2.1.5 Ok\r\n" R354
     "250 2.0.0 <b> Saved\r\n452 4.2.2 <d> over quota\r\n" OK250,
     NO_CLOSE, -1, 0},
    {"LMTP: recipients counted per transaction", LMTP,
     {U(GREET), C("LHLO c\r\n"), U(EHLO_UP), C("MAIL FROM:<a>\r\n"),
      U("250 2.1.0 Ok\r\n"), C("RCPT TO:<b>\r\n"), U("250 2.1.5 Ok\r\n"),
      C("RSET\r\nMAIL FROM:<a>\r\nRCPT TO:<c>\r\nDATA\r\n"),
      U(OK250 "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" R354), C(".\r\nQUIT\r\n"),
      U("250 2.0.0 <c> Saved\r\n221 2.0.0 Bye\r\n")},
     "LHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nRSET\r\nMAIL FROM:<a>\r\n"
     "RCPT TO:<c>\r\nDATA\r\n.\r\nQUIT\r\n",
     NULL, ".\r\n",
     GREET EHLO_PLAIN "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" OK250
     "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" R354
     "250 2.0.0 <c> Saved\r\n221 2.0.0 Bye\r\n",
     STP_CLOSE_QUIT, 0, 0},
    {"LMTP: 503 to a second MAIL keeps the recipients counted", LMTP,
     {U(GREET), C("LHLO c\r\n"), U(EHLO_UP),
      C("MAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nMAIL FROM:<x>\r\n"
        "DATA\r\n"),
      U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
        "503 5.5.1 MAIL already given\r\n" R354),
      C(".\r\nNOOP\r\n"),
      U("250 2.0.0 <b> Saved\r\n250 2.0.0 <c> Saved\r\n" OK250)},
     "LHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\n"
     "MAIL FROM:<x>\r\nDATA\r\n.\r\nNOOP\r\n",
     NULL, ".\r\n",
     GREET EHLO_PLAIN "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
     "503 5.5.1 MAIL already given\r\n" R354
     "250 2.0.0 <b> Saved\r\n250 2.0.0 <c> Saved\r\n" OK250,
     NO_CLOSE, -1, 0},
    {"LMTP: failed deliveries are not client errors (max_errors)",
     {.offer_starttls = true, .lmtp = true, .max_line = 512,
      .hostname = HOST, .max_errors = 2},
     {U(GREET), C("LHLO c\r\n"), U(EHLO_UP),
      C("MAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nRCPT TO:<d>\r\n"
        "DATA\r\n"),
      U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
        R354),
      C(".\r\nNOOP\r\n"),
      U("552 5.2.2 <b> Mailbox is full\r\n552 5.2.2 <c> Mailbox is full\r\n"
        "250 2.0.0 <d> Saved\r\n" OK250)},
     "LHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\n"
     "RCPT TO:<d>\r\nDATA\r\n.\r\nNOOP\r\n",
     NULL, ".\r\n",
     GREET EHLO_PLAIN "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
     "250 2.1.5 Ok\r\n" R354 "552 5.2.2 <b> Mailbox is full\r\n"
     "552 5.2.2 <c> Mailbox is full\r\n250 2.0.0 <d> Saved\r\n" OK250,
     NO_CLOSE, -1, 0},
    {"LMTP: AUTH and XCLIENT rules as for SMTP", LMTP,
     {U(GREET), C("LHLO c\r\nAUTH PLAIN AGE=\r\nXCLIENT\tADDR=6.6.6.6\r\n"),
      U(EHLO_UP)},
     "LHLO c\r\n", NULL, "", GREET EHLO_PLAIN R538 R550X, NO_CLOSE, -1, 0,
     true},
    {"SMTP: LHLO is an unknown verb, the upstream's to answer", DEF,
     {U(GREET), C("LHLO c\r\n"), U("502 5.5.2 Error: command not recognized\r\n")},
     "LHLO c\r\n", NULL, "",
     GREET "502 5.5.2 Error: command not recognized\r\n", NO_CLOSE, -1, 0},

    /* --- line framing --- */
    {"line too long, then NOOP works", DEF,
     {U(GREET), CD(d_long), U(OK250)}, "NOOP\r\n", NULL, "",
     GREET R500LONG OK250, NO_CLOSE, -1},
    {"line too long waits for pending replies", DEF,
     {U(GREET), CD(d_long_pend), U(OK250), U("250 2.0.0 Second\r\n")},
     "NOOP\r\nRSET\r\n", NULL, "", GREET OK250 R500LONG "250 2.0.0 Second\r\n",
     NO_CLOSE, -1},
    {"512-octet line is fine", DEF, {U(GREET), CD(d_512), U(OK250)}, d_512,
     NULL, "", GREET OK250, NO_CLOSE, -1},
    {"512-octet LF line is fine", DEF, {U(GREET), CD(d_512lf), U(OK250)},
     d_512lf_up, NULL, "", GREET OK250, NO_CLOSE, -1},
    {"513-octet line is too long", DEF, {U(GREET), CD(d_513), U(OK250)},
     "NOOP\r\n", NULL, "", GREET R500LONG OK250, NO_CLOSE, -1},
    {"bad characters", DEF,
     {U(GREET),
      C("NOOP a\rb\r\nMAIL FROM:<a>\0\r\nNOOP\r\r\nRSET\r\n"), U(OK250)},
     "RSET\r\n", NULL, "", GREET R500CHAR R500CHAR R500CHAR OK250, NO_CLOSE,
     -1},
    {"LF-only commands", DEF,
     {U(GREET), C("EHLO c\nNOOP\n"), U(EHLO_UP OK250)}, "EHLO c\r\nNOOP\r\n",
     NULL, "", GREET EHLO_PLAIN OK250, NO_CLOSE, -1},
    {"64 replies outstanding at most", DEF,
     {U(GREET), CD(d_70noop), LEFT(36), UD(d_64ok), LEFT(0), UD(d_6ok)},
     d_70noop, NULL, "", d_70ok_cli, NO_CLOSE, -1},

    /* --- upstream trouble --- */
    {"upstream 421 mid-session", DEF,
     {U(GREET), C("EHLO c\r\n"), U(EHLO_UP), C("MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"),
      U("421 4.3.0 Server shutting down\r\n"), C("NOOP\r\n"), LOST},
     "EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\n", NULL, "",
     GREET EHLO_PLAIN "421 4.3.0 Server shutting down\r\n",
     STP_CLOSE_UPSTREAM_421, -1},
    {"unsolicited 421", DEF,
     {U(GREET), U("421 4.4.2 idle\r\n"), C("NOOP\r\n"), LOST}, "", NULL, "",
     GREET "421 4.4.2 idle\r\n", STP_CLOSE_UPSTREAM_421, -1},
    {"421 greeting", DEF, {U("421 mx.test busy\r\n"), C("EHLO c\r\n")}, "",
     NULL, "", "421 mx.test busy\r\n", STP_CLOSE_UPSTREAM_421, -1},
    {"multi-line 421 relayed whole", DEF,
     {U(GREET), C("NOOP\r\n"), U("421-4.3.0 going\r\n421 4.3.0 down\r\n")},
     "NOOP\r\n", NULL, "", GREET "421-4.3.0 going\r\n421 4.3.0 down\r\n",
     STP_CLOSE_UPSTREAM_421, -1},
    {"invalid greeting", DEF, {U("hello\r\n")}, "", NULL, "", ERR421,
     STP_CLOSE_UPSTREAM_PROTO, 1, 0, false, true},
    {"invalid reply", DEF,
     {U(GREET), C("NOOP\r\n"), U("hello world\r\n"), C("NOOP\r\n")},
     "NOOP\r\n", NULL, "", GREET ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false,
     true},
    {"unsolicited reply", DEF, {U(GREET), U(OK250)}, "", NULL, "",
     GREET ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false, true},
    {"unsolicited reply in the greeting read", DEF, {U(GREET OK250)}, "",
     NULL, "", GREET ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false, true},
    /* The client gets a 4xx whenever the upstream fails, also in the middle
     * of a reply (a client takes the last line's code: 421). */
    {"multi-line reply changes code", DEF,
     {U(GREET), C("NOOP\r\n"), U("250-a\r\n251 b\r\n")}, "NOOP\r\n", NULL, "",
     GREET "250-a\r\n" ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false, true},
    {"EHLO reply changes code", DEF,
     {U(GREET), C("EHLO c\r\n"), U("250-mx.test\r\n251 b\r\n")}, "EHLO c\r\n",
     NULL, "", GREET ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false, true},
    {"reply line too long", DEF, {U(GREET), C("NOOP\r\n"), UD(d_long_reply)},
     "NOOP\r\n", NULL, "", GREET ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false,
     true},
    {"multi-line reply without an end: 421 past 64 KiB", DEF,
     {U(GREET), C("NOOP\r\n"), UD(d_endless)}, "NOOP\r\n", NULL, "",
     d_endless_cli, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false, true},
    {"reply line with an embedded CR", DEF,
     {U(GREET), C("NOOP\r\n"), U("250 a\rb\r\n")}, "NOOP\r\n", NULL, "",
     GREET ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false, true},
    {"reply line ending CR CR LF", DEF,
     {U(GREET), C("NOOP\r\n"), U("250 ok\r\r\n")}, "NOOP\r\n", NULL, "",
     GREET ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false, true},
    {"reply line with a NUL", DEF,
     {U(GREET), C("NOOP\r\n"), U("250 a\0b\r\n")}, "NOOP\r\n", NULL, "",
     GREET ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0, false, true},
    {"EHLO line STARTTLS<CR> cannot slip through", DEF,
     {U(GREET), C("EHLO c\r\n"), U("250-mx.test\r\n250-STARTTLS\r\r\n250 SIZE\r\n")},
     "EHLO c\r\n", NULL, "", GREET ERR421, STP_CLOSE_UPSTREAM_PROTO, 1, 0,
     false, true},
    {"bare 250 reply", DEF, {U(GREET), C("NOOP\r\n"), U("250\r\n")},
     "NOOP\r\n", NULL, "", GREET "250\r\n", NO_CLOSE, -1},
    {"upstream lost mid-DATA: 421, no 250", DEF,
     {U(GREET), C("DATA\r\n"), U(R354), C("partial\r\n"), LOST,
      C("more\r\n.\r\n")},
     "DATA\r\npartial\r\n", NULL, "partial\r\n", GREET R354 LOST421,
     STP_CLOSE_UPSTREAM_LOST, 1},
    {"upstream lost while idle", DEF, {U(GREET), LOST, LOST}, "", NULL, "",
     GREET LOST421, STP_CLOSE_UPSTREAM_LOST, 1},
    {"upstream lost before the greeting", DEF, {C("EHLO c\r\n"), LOST}, "",
     NULL, "", LOST421, STP_CLOSE_UPSTREAM_LOST, 1},
    {"upstream unreachable", DEF, {UNREACH, C("EHLO c\r\n"), LOST}, "", NULL,
     "", UNR421, ANY_CLOSE, -1},
    {"timeout", DEF,
     {U(GREET), C("MAIL FR"), TIMEOUT, C("OM:<a>\r\n"), LOST}, "", NULL, "",
     GREET TMO421, STP_CLOSE_TIMEOUT, 1},

    /* --- QUIT --- */
    {"QUIT: later bytes consumed and ignored", DEF,
     {U(GREET), C("QUIT\r\nNOOP\r\nMAIL FROM:<a>\r\n"), LEFT(0),
      U("221 2.0.0 Bye\r\n"), LOST},
     "QUIT\r\n", NULL, "", GREET "221 2.0.0 Bye\r\n", STP_CLOSE_QUIT, -1},
    {"QUIT after pipelined NOOP", DEF,
     {U(GREET), C("NOOP\r\nQUIT\r\n"), U(OK250 "221 2.0.0 Bye\r\n")},
     "NOOP\r\nQUIT\r\n", NULL, "", GREET OK250 "221 2.0.0 Bye\r\n",
     STP_CLOSE_QUIT, -1},

    /* --- max_errors: consecutive 5xx replies, ours and the upstream's --- */
    {"max_errors: upstream 5xx replies reach the cap", ERRS(3),
     {U(GREET), C("RCPT TO:<a>\r\n"), U(R550), C("RCPT TO:<b>\r\n"), U(R550),
      C("RCPT TO:<c>\r\n"), U(R550), C("NOOP\r\n"), U(OK250)},
     "RCPT TO:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\n", NULL, "",
     GREET R550 R550 R550 ERRS421, STP_CLOSE_ERRORS, 1},
    {"max_errors: the proxy's own refusals count", ERRS(3),
     {U(GREET), C("XCLIENT a\r\nXCLIENT b\r\nXCLIENT c\r\nNOOP\r\n")}, "",
     NULL, "", GREET R550X R550X R550X ERRS421, STP_CLOSE_ERRORS, 1, 0, true},
    {"max_errors: refusals and upstream replies count together", ERRS(3),
     {U(GREET), C("RCPT TO:<a>\r\n"), U(R550), C("AUTH PLAIN AGE=\r\n"),
      C("VRFY x\r\n"), U("502 5.5.1 VRFY disabled\r\n"), C("NOOP\r\n")},
     "RCPT TO:<a>\r\nVRFY x\r\n", NULL, "",
     GREET R550 R538 "502 5.5.1 VRFY disabled\r\n" ERRS421, STP_CLOSE_ERRORS,
     1, 0, true},
    {"max_errors: a 2xx resets the count", ERRS(3),
     {U(GREET),
      C("RCPT TO:<a>\r\nRCPT TO:<b>\r\nNOOP\r\nRCPT TO:<c>\r\nRCPT TO:<d>\r\n"),
      U(R550 R550 OK250 R550 R550)},
     "RCPT TO:<a>\r\nRCPT TO:<b>\r\nNOOP\r\nRCPT TO:<c>\r\nRCPT TO:<d>\r\n",
     NULL, "", GREET R550 R550 OK250 R550 R550, NO_CLOSE, -1},
    {"max_errors: a 3xx resets the count", ERRS(2),
     {U(GREET), C("RCPT TO:<a>\r\nDATA\r\n"), U(R550 R354),
      C(".\r\nNOOP\r\n"), U(R550 OK250)},
     "RCPT TO:<a>\r\nDATA\r\n.\r\nNOOP\r\n", NULL, ".\r\n",
     GREET R550 R354 R550 OK250, NO_CLOSE, -1},
    {"max_errors: a 4xx neither counts nor resets", ERRS(3),
     {U(GREET), C("RCPT TO:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\n"),
      U(R550 R450 R550), CLI(GREET R550 R450 R550), C("RCPT TO:<d>\r\n"),
      U(R550)},
     "RCPT TO:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nRCPT TO:<d>\r\n", NULL,
     "", GREET R550 R450 R550 R550 ERRS421, STP_CLOSE_ERRORS, 1},
    {"max_errors: pipelined replies past the cap are not relayed", ERRS(2),
     {U(GREET), C("RCPT TO:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nNOOP\r\n"),
      U(R550 R550 R550 OK250)},
     "RCPT TO:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nNOOP\r\n", NULL, "",
     GREET R550 R550 ERRS421, STP_CLOSE_ERRORS, 1},
    {"max_errors: a pipelined refusal waits its turn, then counts", ERRS(2),
     {U(GREET), C("RCPT TO:<a>\r\nXCLIENT x\r\nNOOP\r\n"), U(R550)},
     "RCPT TO:<a>\r\n", NULL, "", GREET R550 R550X ERRS421, STP_CLOSE_ERRORS,
     1, 0, true},
    {"max_errors 1: an over-long line is the one error", ERRS(1),
     {U(GREET), CD(d_long)}, "", NULL, "", GREET R500LONG ERRS421,
     STP_CLOSE_ERRORS, 1, 0, true},
    {"max_errors: a 5xx greeting is not counted", ERRS(1),
     {U("554 5.3.2 mx.test busy\r\n"), C("NOOP\r\n"), U(OK250)}, "NOOP\r\n",
     NULL, "", "554 5.3.2 mx.test busy\r\n" OK250, NO_CLOSE, -1},
    {"max_errors: a 5xx to QUIT is not counted", ERRS(1),
     {U(GREET), C("QUIT\r\n"), U("554 5.5.1 no\r\n")}, "QUIT\r\n", NULL, "",
     GREET "554 5.5.1 no\r\n", STP_CLOSE_QUIT, 0},
    {"max_errors 0: no cap", DEF,
     {U(GREET), C("RCPT TO:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nNOOP\r\n"),
      U(R550 R550 R550 OK250)},
     "RCPT TO:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nNOOP\r\n", NULL, "",
     GREET R550 R550 R550 OK250, NO_CLOSE, -1},

    /* --- shutdown --- */
    {"shutdown: 421 and close", DEF,
     {U(GREET), SHUTDOWN, C("NOOP\r\n")}, "", NULL, "", GREET SHUT421,
     STP_CLOSE_SHUTDOWN, 1},
    {"upstream lost in the middle of a relayed reply: 421 all the same",
     DEF, {U(GREET), C("HELP\r\n"), U("214-help one\r\n"), LOST},
     "HELP\r\n", NULL, "", GREET "214-help one\r\n" LOST421,
     STP_CLOSE_UPSTREAM_LOST, 1},
    {"shutdown twice: one 421", DEF, {U(GREET), SHUTDOWN, SHUTDOWN}, "", NULL,
     "", GREET SHUT421, STP_CLOSE_SHUTDOWN, 1},
    {"shutdown before the greeting", DEF,
     {C("EHLO c\r\n"), SHUTDOWN, U(GREET)}, "", NULL, "", SHUT421,
     STP_CLOSE_SHUTDOWN, 1},
    {"shutdown mid-DATA cuts the upstream", DEF,
     {U(GREET), C("DATA\r\n"), U(R354), C("partial\r\n"), SHUTDOWN,
      C("more\r\n.\r\n")},
     "DATA\r\npartial\r\n", NULL, "partial\r\n", GREET R354 SHUT421,
     STP_CLOSE_SHUTDOWN, 1},
    {"shutdown after the upstream's 421: no second 421", DEF,
     {U(GREET), C("NOOP\r\n"), U("421-4.3.0 going\r\n421 4.3.0 down\r\n"),
      SHUTDOWN},
     "NOOP\r\n", NULL, "", GREET "421-4.3.0 going\r\n421 4.3.0 down\r\n",
     STP_CLOSE_UPSTREAM_421, 0},
    {"shutdown after an unsolicited 421: no second 421", DEF,
     {U(GREET), U("421 4.4.2 idle\r\n"), SHUTDOWN, SHUTDOWN}, "", NULL, "",
     GREET "421 4.4.2 idle\r\n", STP_CLOSE_UPSTREAM_421, 0},
    {"shutdown after a timeout: one 421", DEF,
     {U(GREET), TIMEOUT, SHUTDOWN}, "", NULL, "", GREET TMO421,
     STP_CLOSE_TIMEOUT, 1},
    {"shutdown after too many errors: one 421", ERRS(1),
     {U(GREET), C("XCLIENT\r\n"), SHUTDOWN}, "", NULL, "",
     GREET R550X ERRS421, STP_CLOSE_ERRORS, 1, 0, true},
    {"shutdown after QUIT was answered", DEF,
     {U(GREET), C("QUIT\r\n"), U("221 2.0.0 Bye\r\n"), SHUTDOWN}, "QUIT\r\n",
     NULL, "", GREET "221 2.0.0 Bye\r\n", STP_CLOSE_QUIT, 0},

    /* --- the summary for the disconnect line (Postfix's counts) --- */
    {.name = "summary: STARTTLS, pipelined envelope, a refused RCPT",
     .cfg = DEF,
     .steps = {U(GREET), C("EHLO c\r\n"), U(EHLO_UP), C("STARTTLS\r\n"), TLS,
               C("EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<x>\r\n"
                 "DATA\r\n"),
               U(EHLO_UP), U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" R550 R354),
               C("hi\r\n.\r\nQUIT\r\n"), U(OK250 "221 2.0.0 Bye\r\n")},
     .up = "EHLO c\r\nEHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\n"
           "RCPT TO:<x>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
     .cli = GREET EHLO_PLAIN R220 EHLO_TLS "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
            R550 R354 OK250 "221 2.0.0 Bye\r\n",
     .close = STP_CLOSE_QUIT, .cut = -1, .start_tls = 1,
     .summary = "ehlo=2 starttls=1 mail=1 rcpt=1/2 data=1 quit=1 "
                "messages=1 rejected=0"},
    {.name = "summary: BDAT and DATA messages the upstream rejects",
     .cfg = DEF,
     .steps = {U(GREET), C("EHLO c\r\n"), U(EHLO_CHUNK_UP),
               C("MAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 5\r\nhelloBDAT 0 LAST\r\n"),
               U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 5 octets\r\n"
                 "554 5.7.1 Rejected\r\n"),
               C("MAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\n"),
               U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" R354),
               C("x\r\n.\r\nRSET\r\nNOOP\r\nVRFY u\r\nQUIT\r\n"),
               U("554 5.7.1 Spam\r\n" OK250 OK250 "252 2.0.0 u\r\n"
                 "221 2.0.0 Bye\r\n")},
     .up = "EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 5\r\nhello"
           "BDAT 0 LAST\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nDATA\r\nx\r\n.\r\n"
           "RSET\r\nNOOP\r\nVRFY u\r\nQUIT\r\n",
     .cli = GREET EHLO_CHUNK_PLAIN "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
            "250 2.0.0 5 octets\r\n554 5.7.1 Rejected\r\n"
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" R354 "554 5.7.1 Spam\r\n" OK250
            OK250 "252 2.0.0 u\r\n221 2.0.0 Bye\r\n",
     .close = STP_CLOSE_QUIT, .cut = -1,
     .summary = "ehlo=1 mail=2 rcpt=2 data=0/1 bdat=1/2 rset=1 noop=1 quit=1 "
                "unknown=1 messages=0 rejected=2"},
    {.name = "summary: commands the proxy refuses count as sent, not accepted",
     .cfg = CFG(true, true, false, false),
     .steps = {U(GREET), C("EHLO c\r\nMAIL FROM:<a>\r\nXCLIENT ADDR=1.2.3.4\r\n"
                           "STARTTLS x\r\n"),
               U(EHLO_UP), CD(d_long), U(OK250)},
     .up = "EHLO c\r\nNOOP\r\n",
     .cli = GREET EHLO_PLAIN R530 R550X R501TLS R500LONG OK250,
     .close = NO_CLOSE, .cut = -1, .reject = true,
     .summary = "ehlo=1 starttls=0/1 mail=0/1 noop=1 unknown=0/2 "
                "messages=0 rejected=0"},
    {.name = "summary: LMTP, one delivery of two makes a message",
     .cfg = LMTP,
     .steps = {U(GREET), C("LHLO c\r\n"), U(EHLO_CHUNK_UP),
               C("MAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\nRCPT TO:<d>\r\n"
                 "DATA\r\n"),
               U("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n"
                 "250 2.1.5 Ok\r\n"),
               U(R354), C("hi\r\n.\r\nNOOP\r\n"), U("250 2.0.0 <b> Saved\r\n"),
               U("452 4.2.2 <d> over quota\r\n"), U(OK250)},
     .up = "LHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\nRCPT TO:<c>\r\n"
           "RCPT TO:<d>\r\nDATA\r\nhi\r\n.\r\nNOOP\r\n",
     .cli = GREET "250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
            "250 STARTTLS\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n"
            "250 2.1.5 Ok\r\n" R354
            "250 2.0.0 <b> Saved\r\n452 4.2.2 <d> over quota\r\n" OK250,
     .close = NO_CLOSE, .cut = -1,
     .summary = "ehlo=1 mail=1 rcpt=2/3 data=1 noop=1 messages=1 rejected=0"},
};

/* How a run splits the two byte streams. */
enum feed_mode { F_WHOLE, F_SPLIT_CLIENT, F_SPLIT_UP, F_BYTES };

static size_t step_len(const struct step *st)
{
    return st->n ? st->n : strlen(st->p);
}

static void feed(bool client, const char *p, size_t n)
{
    if (client) {
        append(R.cbuf, &R.clen, p, n);
    } else {
        if (R.up_gone) /* the caller closed that socket */
            return;
        append(R.ubuf, &R.ulen, p, n);
    }
    pump();
}

/* Run one scenario; SPLIT is a position in the client or upstream stream.
 * Returns false (after reporting) on a mismatch. */
static bool run_scen(const struct scen *sc, enum feed_mode mode, size_t split)
{
    static const char *mode_names[] = {"whole", "client split", "upstream split",
                                       "byte by byte"};
    memset(&R, 0, sizeof(R));
    stp_smtp_init(&R.s, &sc->cfg, &rec_ops, NULL);
    char where[64];
    snprintf(where, sizeof(where), "%s", mode_names[mode]);
    if (mode == F_SPLIT_CLIENT || mode == F_SPLIT_UP)
        snprintf(where, sizeof(where), "%s at %zu", mode_names[mode], split);
    bool ok = true;
    size_t coff = 0, uoff = 0; /* offsets in the client/upstream streams */
    for (const struct step *st = sc->steps; st->op != S_END; st++) {
        switch (st->op) {
        case S_C:
        case S_U: {
            bool client = st->op == S_C;
            size_t n = step_len(st);
            size_t *off = client ? &coff : &uoff;
            if (mode == F_BYTES) {
                for (size_t i = 0; i < n; i++)
                    feed(client, st->p + i, 1);
            } else if (((mode == F_SPLIT_CLIENT && client) ||
                        (mode == F_SPLIT_UP && !client)) &&
                       split > *off && split < *off + n) {
                feed(client, st->p, split - *off);
                feed(client, st->p + (split - *off), n - (split - *off));
            } else {
                feed(client, st->p, n);
            }
            *off += n;
            break;
        }
        case S_TLS:
            if (!R.tls_pending) {
                failf("%s: scenario step TLS without start_tls", where);
                ok = false;
                goto out;
            }
            R.clen = 0; /* plaintext received before the handshake is dropped */
            R.tls_pending = false;
            stp_smtp_tls_started(&R.s);
            pump();
            break;
        case S_LOST:
            stp_smtp_fail(&R.s, STP_FAIL_LOST);
            R.up_gone = true;
            pump();
            break;
        case S_TIMEOUT:
            stp_smtp_fail(&R.s, STP_FAIL_TIMEOUT);
            pump();
            break;
        case S_SHUTDOWN:
            stp_smtp_fail(&R.s, STP_FAIL_SHUTDOWN);
            pump();
            break;
        case S_UNREACH:
            stp_smtp_fail(&R.s, STP_FAIL_UNREACHABLE);
            R.up_gone = true;
            pump();
            break;
        case S_LEFT:
            if (R.clen != st->n) {
                failf("%s: step %ld: %zu client bytes left unconsumed (\"%s\"), "
                      "want %zu",
                      where, (long)(st - sc->steps), R.clen, esc(R.cbuf, R.clen),
                      st->n);
                ok = false;
            }
            break;
        case S_CLI:
            if (R.cli_len != st->n) {
                failf("%s: step %ld: client got \"%s\" so far, want %zu bytes",
                      where, (long)(st - sc->steps), esc(R.cli, R.cli_len),
                      st->n);
                ok = false;
            }
            break;
        case S_END:
            break;
        }
    }

    if (R.viol[0]) {
        failf("%s: %s", where, R.viol);
        ok = false;
    }
    size_t elen = strlen(sc->up);
    if (sc->up_min) {
        size_t mlen = strlen(sc->up_min);
        if (R.up_len < mlen || R.up_len > elen ||
            memcmp(R.up, sc->up, R.up_len) != 0) {
            failf("%s: upstream got \"%s\", want a prefix of \"%s\" of at "
                  "least %zu bytes",
                  where, esc(R.up, R.up_len), esc(sc->up, elen), mlen);
            ok = false;
        }
        if (sc->raw && (R.raw_len > strlen(sc->raw) ||
                        memcmp(R.raw, sc->raw, R.raw_len) != 0)) {
            failf("%s: raw \"%s\" is not a prefix of \"%s\"", where,
                  esc(R.raw, R.raw_len), esc(sc->raw, strlen(sc->raw)));
            ok = false;
        }
    } else {
        if (R.up_len != elen || memcmp(R.up, sc->up, elen) != 0) {
            failf("%s: upstream got \"%s\", want \"%s\"", where,
                  esc(R.up, R.up_len), esc(sc->up, elen));
            ok = false;
        }
        if (sc->raw && (R.raw_len != strlen(sc->raw) ||
                        memcmp(R.raw, sc->raw, R.raw_len) != 0)) {
            failf("%s: raw \"%s\", want \"%s\"", where, esc(R.raw, R.raw_len),
                  esc(sc->raw, strlen(sc->raw)));
            ok = false;
        }
    }
    size_t clen = strlen(sc->cli);
    if (R.cli_len != clen || memcmp(R.cli, sc->cli, clen) != 0) {
        failf("%s: client got \"%s\", want \"%s\"", where, esc(R.cli, R.cli_len),
              esc(sc->cli, clen));
        ok = false;
    }
    if (sc->close == NO_CLOSE && R.closes) {
        failf("%s: unexpected close (%s)", where, stp_close_reason_name(R.reason));
        ok = false;
    } else if (sc->close != NO_CLOSE && !R.closes) {
        failf("%s: no close", where);
        ok = false;
    } else if (sc->close >= 0 && R.reason != (enum stp_close_reason)sc->close) {
        failf("%s: close reason %s, want %s", where,
              stp_close_reason_name(R.reason),
              stp_close_reason_name((enum stp_close_reason)sc->close));
        ok = false;
    }
    if (R.closes && sc->cut >= 0 && R.cut != (sc->cut != 0)) {
        failf("%s: cut_upstream %d, want %d", where, R.cut, sc->cut);
        ok = false;
    }
    if (R.start_tls != sc->start_tls) {
        failf("%s: start_tls called %d times, want %d", where, R.start_tls,
              sc->start_tls);
        ok = false;
    }
    if (sc->reject && R.rejects == 0) {
        failf("%s: no \"reject\" event", where);
        ok = false;
    }
    if (sc->summary) {
        char sum[256];
        stp_proto_smtp.summary(&R.s, sum, sizeof(sum));
        if (strcmp(sum, sc->summary) != 0) {
            failf("%s: summary \"%s\", want \"%s\"", where, sum,
                  sc->summary);
            ok = false;
        }
    }
    if (sc->up_err != (R.up_err > 0)) {
        failf("%s: upstream_input error returns: %d, want %s", where, R.up_err,
              sc->up_err ? "some" : "none");
        ok = false;
    }
out:
    stp_smtp_free(&R.s);
    return ok;
}

static void test_engine(void)
{
    for (size_t i = 0; i < STP_ARRAY_LEN(scens); i++) {
        const struct scen *sc = &scens[i];
        char name[128];
        snprintf(name, sizeof(name), "engine: %s", sc->name);
        case_begin(name);
        size_t ctotal = 0, utotal = 0;
        for (const struct step *st = sc->steps; st->op != S_END; st++) {
            if (st->op == S_C)
                ctotal += step_len(st);
            else if (st->op == S_U)
                utotal += step_len(st);
        }
        /* stop at the first failing mode: one report per scenario is enough */
        if (!run_scen(sc, F_WHOLE, 0))
            goto done;
        /* Every split point; a stream of tens of KiB at a prime stride,
         * or its quadratic cost hangs the sanitizer builds. */
        for (size_t k = 1; k < ctotal; k += ctotal > 4096 ? 997 : 1)
            if (!run_scen(sc, F_SPLIT_CLIENT, k))
                goto done;
        for (size_t k = 1; k < utotal; k += utotal > 4096 ? 997 : 1)
            if (!run_scen(sc, F_SPLIT_UP, k))
                goto done;
        run_scen(sc, F_BYTES, 0);
    done:
        case_end();
    }
}

static void test_client_calls(void)
{
    case_begin("to_client gets whole CRLF lines per call (smtp.h contract)");
    CHECK(partial_calls == 0,
          "%ld to_client calls in the engine runs were not whole lines, "
          "e.g. \"%s\"",
          partial_calls, partial_example);
    case_end();
}

static void test_names(void)
{
    case_begin("phase and close-reason names");
    for (int p = 0; p < STP_PH_COUNT; p++)
        CHECK(stp_phase_name((enum stp_phase)p) != NULL, "phase %d", p);
    for (int r = 0; r < STP_CLOSE_COUNT; r++)
        CHECK(strcmp(stp_close_reason_name((enum stp_close_reason)r), "?"),
              "reason %d has no name", r);
    case_end();

    case_begin("summary: a count that does not fit is left out whole");
    {
        struct stp_smtp e;
        memset(&e, 0, sizeof(e));
        e.sent[STP_ST_EHLO] = e.accepted[STP_ST_EHLO] = 2;
        e.sent[STP_ST_RCPT] = 3;
        e.accepted[STP_ST_RCPT] = 1;
        char b[64];
        stp_smtp_summary(&e, b, sizeof(b));
        CHECK(strcmp(b, "ehlo=2 rcpt=1/3 messages=0 rejected=0") == 0, "%s", b);
        stp_smtp_summary(&e, b, 12);
        CHECK(strcmp(b, "ehlo=2 ") == 0, "cut: \"%s\"", b);
        stp_smtp_summary(&e, b, 1);
        CHECK(b[0] == 0, "cap 1: \"%s\"", b);
    }
    case_end();

    case_begin("init state");
    struct stp_smtp_cfg cfg = DEF;
    memset(&R, 0, sizeof(R));
    stp_smtp_init(&R.s, &cfg, &rec_ops, NULL);
    CHECK(R.s.phase == STP_PH_GREETING, "phase %s, want GREETING",
          stp_phase_name(R.s.phase));
    CHECK(stp_smtp_client_input(&R.s, "NOOP\r\n", 6) == 0,
          "client input consumed before the greeting");
    CHECK(R.up_len == 0 && R.cli_len == 0, "output before the greeting");
    stp_smtp_free(&R.s);
    case_end();
}

/* With room for ROOM pieces upstream, many small pieces in one read are
 * forwarded ROOM at a time and the rest stays unconsumed, to be offered
 * again once the caller made room; nothing is lost or reordered. */
static void test_backpressure(void)
{
    static const char body[] = "MAIL FROM:<a>\r\nRCPT TO:<b>\r\n"
        "BDAT 1\r\nxBDAT 1\r\nyBDAT 2\r\n\r\nBDAT 3\r\n.\r\n"
        "BDAT 0 LAST\r\nNOOP\r\n";
    static const char want[] = "EHLO c\r\nMAIL FROM:<a>\r\nRCPT TO:<b>\r\n"
        "BDAT 1\r\nxBDAT 1\r\nyBDAT 2\r\n\r\nBDAT 3\r\n.\r\n"
        "BDAT 0 LAST\r\nNOOP\r\n";
    for (unsigned room = 1; room <= 3; room++) {
        char name[64];
        snprintf(name, sizeof(name), "back-pressure: room for %u piece(s)",
                 room);
        case_begin(name);
        struct stp_smtp_cfg cfg = DEF;
        memset(&R, 0, sizeof(R));
        stp_smtp_init(&R.s, &cfg, &rec_ops, NULL);
        stp_smtp_upstream_input(&R.s, GREET, sizeof(GREET) - 1);
        stp_smtp_client_input(&R.s, "EHLO c\r\n", 8);
        stp_smtp_upstream_input(&R.s, EHLO_CHUNK_UP,
                                sizeof(EHLO_CHUNK_UP) - 1);
        R.room = room;
        R.pieces = 0;
        size_t off = 0, n = sizeof(body) - 1;
        int calls = 0;
        while (off < n && calls++ < 100) {
            R.in_base = body + off;
            R.in_len = n - off;
            size_t k = stp_smtp_client_input(&R.s, body + off, n - off);
            R.in_base = NULL;
            CHECK(k > 0 || R.pieces == 0, "stalled at %zu with %u pieces",
                  off, R.pieces);
            CHECK(R.pieces <= room, "%u pieces, room for %u", R.pieces, room);
            off += k;
            R.pieces = 0; /* the caller wrote them */
        }
        CHECK(off == n, "consumed %zu of %zu", off, n);
        CHECK(calls > 1, "all in one call despite room for %u", room);
        CHECK(R.up_len == sizeof(want) - 1 &&
                  memcmp(R.up, want, R.up_len) == 0,
              "upstream got \"%s\"", esc(R.up, R.up_len));
        CHECK(!R.viol[0], "%s", R.viol);
        stp_smtp_free(&R.s);
        case_end();
    }
}

/* The phase table: CLOSED is final, everything may close, QUIT only
 * closes, and message content is entered only from a command. */
static void test_phase_table(void)
{
    case_begin("phase table");
    for (int to = 0; to < STP_PH_COUNT; to++) {
        CHECK(!stp_phase_may(STP_PH_CLOSED, to), "closed -> %s",
              stp_phase_name(to));
        CHECK(stp_phase_may(STP_PH_QUIT, to) == (to == STP_PH_CLOSED),
              "quit -> %s", stp_phase_name(to));
    }
    for (int from = 0; from < STP_PH_CLOSED; from++) {
        CHECK(stp_phase_may(from, STP_PH_CLOSED), "%s cannot close",
              stp_phase_name(from));
        if (from != STP_PH_COMMAND)
            CHECK(!stp_phase_may(from, STP_PH_CONTENT) &&
                      !stp_phase_may(from, STP_PH_CHUNK) &&
                      !stp_phase_may(from, STP_PH_STARTTLS),
                  "%s enters content or STARTTLS", stp_phase_name(from));
    }
    CHECK(!stp_phase_may(STP_PH_COMMAND, STP_PH_GREETING), "back to greeting");
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    init_dynamic();
    test_phase_table();
    test_line_find();
    test_cmd_parse();
    test_bdat_parse();
    test_reply_line();
    test_ehlo_filter();
    test_ehlo_keywords();
    test_dot_scan();
    test_names();
    test_engine();
    test_backpressure();
    test_client_calls();
    return unit_summary();
}
