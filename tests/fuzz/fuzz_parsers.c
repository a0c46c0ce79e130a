/* libFuzzer target for the SMTP parsers. The first byte picks the parser, the
 * rest is its input (exact-size heap copies, so ASan sees any over-read).
 * Each result is compared with a small reference written from the spec, or,
 * for the EHLO filter, checked for the properties the proxy relies on. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "mta_tokens.h"
#include "smtp.h"

static char *dup_exact(const uint8_t *p, size_t n)
{
    char *b = malloc(n ? n : 1);
    if (n)
        memcpy(b, p, n);
    return b;
}

/* ---- stp_reply_line ------------------------------------------------------- */

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

static void fuzz_reply(const uint8_t *d, size_t n)
{
    char *b = dup_exact(d, n);
    int c1 = -1, c2 = -1;
    bool l1 = false, l2 = false;
    int r1 = stp_reply_line(b, n, &c1, &l1);
    int r2 = ref_reply(b, n, &c2, &l2);
    CHECK(r1 == r2, "reply_line verdict differs from the reference");
    if (r1 == 0)
        CHECK(c1 == c2 && l1 == l2, "reply_line code/last differ");
    free(b);
}

/* ---- stp_line_find ------------------------------------------------------------ */

static void fuzz_line(const uint8_t *d, size_t n)
{
    if (n < 2)
        return;
    size_t max = 1 + ((size_t)d[0] | (size_t)d[1] << 8) % 1100;
    d += 2;
    n -= 2;
    char *b = dup_exact(d, n);
    size_t len = 0, used = 0;
    enum stp_line_status st = stp_line_find(b, n, max, &len, &used);
    size_t lim = n < max ? n : max;
    const char *lf = memchr(b, '\n', lim);
    if (!lf) {
        CHECK(st == (n >= max ? STP_LINE_TOO_LONG : STP_LINE_MORE),
              "line_find status without LF");
    } else {
        size_t i = (size_t)(lf - b);
        CHECK(st == STP_LINE_OK, "line_find missed the LF");
        CHECK(used == i + 1, "line_find used");
        CHECK(len == ((i > 0 && b[i - 1] == '\r') ? i - 1 : i), "line_find len");
        CHECK(used <= max, "line_find line longer than max");
    }
    free(b);
}

/* ---- stp_cmd_parse ------------------------------------------------------------- */

static void fuzz_cmd(const uint8_t *d, size_t n)
{
    static const char *const verbs[] = {
        "", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP",
        "QUIT", "VRFY", "EXPN", "HELP", "ETRN", "AUTH", "STARTTLS", "XCLIENT",
        "XFORWARD", "LHLO",
    }; /* indexed by enum stp_cmd */
    char *b = dup_exact(d, n);
    struct stp_cmdline cl;
    stp_cmd_parse(b, n, &cl);
    /* The proxy's verb is Postfix's verb, and Exim runs no verb the proxy
     * did not see. */
    size_t off, len;
    postfix_verb(b, n, &off, &len);
    enum stp_cmd want = STP_CMD_UNKNOWN;
    for (int i = 1; i < (int)(sizeof(verbs) / sizeof(verbs[0])); i++) {
        if (strlen(verbs[i]) == len && strncasecmp(b + off, verbs[i], len) == 0)
            want = (enum stp_cmd)i;
        if (exim_verb_is(b, n, verbs[i]))
            CHECK(cl.cmd == (enum stp_cmd)i, "Exim reads a verb the proxy missed");
    }
    CHECK(cl.cmd == want, "cmd_parse verb differs from Postfix's");
    CHECK(cl.verb == b + off && cl.verb_len == len, "verb span differs");
    CHECK(cl.arg >= cl.verb + cl.verb_len && cl.arg + cl.arg_len == b + n,
          "arg outside the line");
    CHECK(cl.arg_len == 0 || !mta_space(cl.arg[0]), "arg starts with a blank");
    for (const char *q = cl.verb + cl.verb_len; q < cl.arg; q++)
        CHECK(mta_space(*q), "non-blank between verb and arg");
    CHECK(!cl.canonical || (off == 0 && (cl.arg_len == 0 ? len == n
                                         : cl.arg == b + len + 1 &&
                                               b[len] == ' ')),
          "canonical line is not VERB [SP ARGS]");
    CHECK(stp_cmd_name(cl.cmd) != NULL, "cmd_name NULL");
    free(b);
}

/* ---- stp_bdat_parse ---------------------------------------------------------------- */

/* RFC 3030: chunk-size [SP "LAST"]; we accept extra spaces around LAST and
 * after it, but LAST must be a separate token. */
static int ref_bdat(const char *p, size_t n, uint64_t *size, bool *last)
{
    size_t i = 0;
    uint64_t v = 0;
    if (n == 0 || p[0] < '0' || p[0] > '9')
        return -EINVAL;
    for (; i < n && p[i] >= '0' && p[i] <= '9'; i++) {
        unsigned dd = (unsigned)(p[i] - '0');
        if (v > (UINT64_MAX - dd) / 10)
            return -EINVAL;
        v = v * 10 + dd;
    }
    *last = false;
    size_t sp = i;
    while (i < n && p[i] == ' ')
        i++;
    if (i < n) {
        if (i == sp || n - i < 4 || strncasecmp(p + i, "LAST", 4) != 0)
            return -EINVAL;
        i += 4;
        while (i < n && p[i] == ' ')
            i++;
        if (i < n)
            return -EINVAL;
        *last = true;
    }
    *size = v;
    return 0;
}

static void fuzz_bdat(const uint8_t *d, size_t n)
{
    char *b = dup_exact(d, n);
    uint64_t s1 = 0, s2 = 0;
    bool l1 = false, l2 = false;
    int r1 = stp_bdat_parse(b, n, &s1, &l1);
    int r2 = ref_bdat(b, n, &s2, &l2);
    CHECK(r1 == 0 || r1 == -EINVAL, "bdat_parse returned an odd code");
    CHECK((r1 == 0) == (r2 == 0), "bdat_parse verdict differs from RFC 3030");
    if (r1 == 0)
        CHECK(s1 == s2 && l1 == l2, "bdat_parse size/last differ");
    free(b);
}

/* ---- stp_ehlo_filter ------------------------------------------------------------------ */

/* The keyword a client sees: leading blanks skipped, then letters, digits
 * and '-' (RFC 5321 ehlo-keyword). */
static bool keyword_is(const char *t, size_t n, const char *kw, bool blanks)
{
    while (blanks && n > 0 && (*t == ' ' || *t == '\t')) {
        t++;
        n--;
    }
    size_t k = 0;
    while (k < n && ((t[k] >= 'A' && t[k] <= 'Z') || (t[k] >= 'a' && t[k] <= 'z') ||
                     (t[k] >= '0' && t[k] <= '9') || t[k] == '-'))
        k++;
    return k == strlen(kw) && strncasecmp(t, kw, k) == 0;
}

static bool line_keyword_is(const char *t, size_t n, const char *kw)
{
    return keyword_is(t, n, kw, true);
}

/* Output lines: "250-" or "250 " + text + CRLF; only the last has "250 ". */
static void check_ehlo_output(const char *o, size_t n, unsigned flags,
                              const char *in, size_t inlen)
{
    CHECK(n >= 6, "EHLO output too short");
    size_t i = 0, nlines = 0;
    const char *last_text = NULL;
    size_t last_tl = 0;
    while (i < n) {
        const char *e = memchr(o + i, '\n', n - i);
        CHECK(e != NULL, "EHLO output line without LF");
        size_t ll = (size_t)(e - (o + i));
        CHECK(ll >= 5 && e[-1] == '\r', "EHLO output line not CRLF");
        bool is_last = (size_t)(e - o) + 1 == n;
        CHECK(memcmp(o + i, is_last ? "250 " : "250-", 4) == 0,
              "EHLO output continuation markers wrong");
        const char *t = o + i + 4;
        size_t tl = ll - 5;
        if (nlines > 0) {
            CHECK(!line_keyword_is(t, tl, "XCLIENT") &&
                      !line_keyword_is(t, tl, "XFORWARD"),
                  "EHLO output offers XCLIENT/XFORWARD");
            CHECK(!(flags & STP_EHLO_STRIP_AUTH) || !line_keyword_is(t, tl, "AUTH"),
                  "EHLO output offers AUTH though told to strip it");
            CHECK(!(flags & STP_EHLO_STRIP_REQUIRETLS) ||
                      !line_keyword_is(t, tl, "REQUIRETLS"),
                  "EHLO output offers REQUIRETLS though told to strip it");
            if (line_keyword_is(t, tl, "STARTTLS"))
                CHECK((flags & STP_EHLO_OFFER_STARTTLS) && is_last &&
                          tl == 8,
                      "EHLO output offers STARTTLS unasked, or not last");
        } else {
            /* the domain line is the input's first line */
            const char *ie = memchr(in, '\n', inlen);
            size_t il = (size_t)(ie - in);
            if (il > 0 && in[il - 1] == '\r')
                il--;
            size_t itl = il > 4 ? il - 4 : 0;
            CHECK(tl == itl && memcmp(t, in + 4, tl) == 0,
                  "EHLO output domain line differs from the input's");
        }
        last_text = t;
        last_tl = tl;
        nlines++;
        i = (size_t)(e - o) + 1;
    }
    if (flags & STP_EHLO_OFFER_STARTTLS)
        CHECK(nlines >= 2 && last_tl == 8 && memcmp(last_text, "STARTTLS", 8) == 0,
              "EHLO output lacks the STARTTLS it was asked to add");
}

static void fuzz_ehlo(const uint8_t *d, size_t n)
{
    if (n < 2)
        return;
    unsigned flags = d[0] & 7;
    size_t small = d[1];
    d += 2;
    n -= 2;
    char *in = dup_exact(d, n);
    size_t cap = 2 * n + 64; /* LF lines grow: "250\n" -> "250-\r\n" */
    char *out = malloc(cap);
    bool ch = false;
    int r = stp_ehlo_filter(in, n, out, cap, flags, &ch);
    CHECK(r == -EINVAL || r >= 0, "EHLO filter odd return with room to spare");
    if (r >= 0) {
        CHECK((size_t)r <= cap, "EHLO filter wrote past its capacity");
        check_ehlo_output(out, (size_t)r, flags, in, n);
        /* *chunking: a kept CHUNKING line (a domain line that reads
         * "CHUNKING" may count or not) */
        bool seen = false, first_is = false;
        size_t i = 0, k = 0;
        while (i < (size_t)r) {
            const char *e = memchr(out + i, '\n', (size_t)r - i);
            size_t ll = (size_t)(e - (out + i));
            bool is = ll > 5 && keyword_is(out + i + 4, ll - 5, "CHUNKING", true);
            if (k++ == 0)
                first_is = is;
            else if (is)
                seen = true;
            i += ll + 1;
        }
        CHECK(ch == seen || (ch && first_is),
              "EHLO filter *chunking disagrees with its output");
        /* exact capacity works, one less is -ENOSPC */
        char *o2 = malloc((size_t)r);
        CHECK(stp_ehlo_filter(in, n, o2, (size_t)r, flags, &ch) == r,
              "EHLO filter fails with exactly enough room");
        CHECK(memcmp(o2, out, (size_t)r) == 0, "EHLO filter output not stable");
        free(o2);
        o2 = malloc((size_t)r - 1);
        CHECK(stp_ehlo_filter(in, n, o2, (size_t)r - 1, flags, &ch) == -ENOSPC,
              "EHLO filter without -ENOSPC when short of room");
        free(o2);
    }
    /* a small buffer: never written past */
    if (small < cap) {
        char *o3 = malloc(small ? small : 1);
        int r3 = stp_ehlo_filter(in, n, o3, small, flags, &ch);
        CHECK(r3 == -ENOSPC || r3 == -EINVAL || (r3 >= 0 && (size_t)r3 <= small),
              "EHLO filter odd return with a small buffer");
        if (r >= 0)
            CHECK(r3 == ((size_t)r <= small ? r : -ENOSPC),
                  "EHLO filter small-buffer result inconsistent");
        free(o3);
    }
    free(out);
    free(in);
}

/* ---- stp_dot_scan ---------------------------------------------------------------------- */

/* Reference over the whole content, as if preceded by CRLF. */
static enum stp_dot_result ref_dot(const char *p, size_t n, size_t *used)
{
#define Q(j) ((j) < 2 ? "\r\n"[(j)] : p[(j)-2])
    size_t qn = n + 2;
    for (size_t i = 2; i < qn; i++) {
        if (Q(i) != '.')
            continue;
        char prev = Q(i - 1);
        bool next_eol = i + 1 < qn && (Q(i + 1) == '\r' || Q(i + 1) == '\n');
        if (prev == '\r') { /* a CR before '.' is bare */
            if (next_eol) {
                *used = i - 1;
                return STP_DOT_SMUGGLE;
            }
            continue;
        }
        if (prev != '\n')
            continue;
        if (Q(i - 2) != '\r') { /* bare LF */
            if (next_eol) {
                *used = i - 1;
                return STP_DOT_SMUGGLE;
            }
            continue;
        }
        if (i + 1 >= qn)
            continue;
        if (Q(i + 1) == '\n') {
            *used = i - 1;
            return STP_DOT_SMUGGLE;
        }
        if (Q(i + 1) != '\r')
            continue;
        if (i + 2 >= qn) {
            *used = n - 1; /* CRLF "." CR at the end: the CR waits */
            return STP_DOT_MORE;
        }
        if (Q(i + 2) == '\n') {
            *used = i + 1;
            return STP_DOT_END;
        }
        *used = i - 1;
        return STP_DOT_SMUGGLE;
    }
    *used = n;
    return STP_DOT_MORE;
#undef Q
}

/* Feed in pieces ending at CUTS[], keeping unused bytes, like the engine. */
static enum stp_dot_result dot_feed(const char *p, size_t n, const size_t *cuts,
                                    size_t ncuts, size_t *total)
{
    enum stp_dot_state st = STP_DOT_LINE_START;
    size_t done = 0;
    for (size_t c = 0; c < ncuts; c++) {
        size_t avail = cuts[c] - done;
        char *b = dup_exact((const uint8_t *)p + done, avail);
        size_t used = (size_t)-1;
        enum stp_dot_result r = stp_dot_scan(&st, b, avail, &used);
        free(b);
        CHECK(used <= avail, "dot_scan used more than offered");
        if (r != STP_DOT_MORE) {
            CHECK(r == STP_DOT_END || r == STP_DOT_SMUGGLE, "dot_scan odd result");
            *total = done + used;
            return r;
        }
        CHECK(used == avail || (used + 1 == avail && p[done + used] == '\r'),
              "dot_scan MORE held back something other than one CR");
        done += used;
    }
    *total = done;
    return STP_DOT_MORE;
}

static void fuzz_dot(const uint8_t *d, size_t n)
{
    if (n < 1)
        return;
    size_t k = d[0];
    d++;
    n--;
    const char *p = (const char *)d;
    size_t ru, wu, su, bu;
    enum stp_dot_result rr = ref_dot(p, n, &ru);
    size_t cut1[1] = {n};
    enum stp_dot_result wr = dot_feed(p, n, cut1, 1, &wu);
    CHECK(wr == rr && wu == ru, "dot_scan whole differs from the reference");
    size_t cut2[2] = {n ? k % (n + 1) : 0, n};
    enum stp_dot_result sr = dot_feed(p, n, cut2, 2, &su);
    CHECK(sr == wr && su == wu, "dot_scan split differs from whole");
    if (n <= 4096) {
        size_t *cuts = malloc((n ? n : 1) * sizeof(size_t));
        for (size_t i = 0; i < n; i++)
            cuts[i] = i + 1;
        enum stp_dot_result br = dot_feed(p, n, cuts, n, &bu);
        free(cuts);
        CHECK(br == wr && bu == wu, "dot_scan byte-by-byte differs from whole");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const uint8_t *d = data + 1;
    size_t n = size - 1;
    switch (data[0] % 6) {
    case 0: fuzz_reply(d, n); break;
    case 1: fuzz_ehlo(d, n); break;
    case 2: fuzz_dot(d, n); break;
    case 3: fuzz_line(d, n); break;
    case 4: fuzz_bdat(d, n); break;
    case 5: fuzz_cmd(d, n); break;
    }
    return 0;
}
