/* log_format = json: a text line's key=value body turned into one JSON
 * object. The callers keep writing key=value (one format to get right); the
 * conversion here is lenient and always yields valid JSON, whatever the
 * body holds. Rules (README "Logs"):
 *  - members "ts", "level", "event" first, then the body's keys in order;
 *  - every value is a JSON string (numbers too: a key's type never depends
 *    on its value); a bare word without '=' (a flag) is true;
 *  - a quoted value is unescaped first (\" \\ \xHH), so its characters
 *    U+0000..U+00FF are the bytes the peer sent; control, DEL and non-ASCII
 *    bytes are written \u00HH;
 *  - a body without event= is {"event":"message","msg":BODY};
 *  - a key met again gets _2, _3... (JSON readers keep only one of twins);
 *  - cut to fit: the value that does not fit is cut (never inside an
 *    escape), the members after it dropped, and "truncated":true says so;
 *    so does a text line that was already cut. */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "log.h"
#include "stp.h"

struct tok {
    const char *k, *v;
    size_t kl, vl;
    bool quoted;
    bool flag; /* a bare word */
};

/* The next token of [*p, end), or false at the end. */
static bool next_tok(const char **pp, const char *end, struct tok *t)
{
    const char *p = *pp;
    while (p < end && *p == ' ')
        p++;
    if (p == end)
        return false;
    *t = (struct tok){.k = p};
    while (p < end && *p != '=' && *p != ' ')
        p++;
    t->kl = (size_t)(p - t->k);
    if (p == end || *p == ' ') {
        t->flag = true;
    } else if (++p < end && *p == '"') {
        t->quoted = true;
        t->v = ++p;
        while (p < end && *p != '"')
            p += (*p == '\\' && p + 1 < end) ? 2 : 1;
        t->vl = (size_t)(p - t->v);
        if (p < end)
            p++; /* the closing quote; a cut line may have none */
    } else {
        t->v = p;
        while (p < end && *p != ' ')
            p++;
        t->vl = (size_t)(p - t->v);
    }
    *pp = p;
    return true;
}

struct out {
    char *b;
    size_t cap, o;
    bool full;
};

static void put(struct out *w, const char *p, size_t n)
{
    if (w->full || n > w->cap - w->o) {
        w->full = true;
        return;
    }
    memcpy(w->b + w->o, p, n);
    w->o += n;
}

static void put_byte(struct out *w, unsigned char c)
{
    char e[8];
    if (c == '"' || c == '\\') {
        e[0] = '\\';
        e[1] = (char)c;
        put(w, e, 2);
    } else if (c < 0x20 || c >= 0x7f) {
        snprintf(e, sizeof(e), "\\u%04x", c);
        put(w, e, 6);
    } else {
        put(w, (const char *)&c, 1);
    }
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* A JSON string of P; UNESCAPE: undo stp_log_esc first. A backslash that
 * starts none of its escapes stands for itself. Out of room, the string is
 * cut after its last whole character and still closed (a byte is kept for
 * that quote). */
static void put_str(struct out *w, const char *p, size_t n, bool unescape)
{
    put(w, "\"", 1);
    if (w->full)
        return; /* not even begun: the caller drops its member */
    for (size_t i = 0; i < n && !w->full; i++) {
        size_t good = w->o;
        unsigned char c = (unsigned char)p[i];
        if (unescape && c == '\\' && i + 1 < n) {
            if (p[i + 1] == '"' || p[i + 1] == '\\') {
                c = (unsigned char)p[++i];
            } else if (p[i + 1] == 'x' && i + 3 < n && hexval(p[i + 2]) >= 0 &&
                       hexval(p[i + 3]) >= 0) {
                c = (unsigned char)(hexval(p[i + 2]) * 16 + hexval(p[i + 3]));
                i += 3;
            }
        }
        put_byte(w, c);
        if (w->full)
            w->o = good;
    }
    if (!w->full)
        put(w, "\"", 1);
    if (w->full)
        w->b[w->o++] = '"';
}

static bool same(const char *a, size_t al, const char *b, size_t bl)
{
    return al == bl && memcmp(a, b, al) == 0;
}

/* How many keys before T (and the three we always write, the first
 * event= being the third) are T's. */
static unsigned twins(const char *body, const char *end, const struct tok *t,
                      const char *event)
{
    static const char *const fixed[] = {"ts", "level", "event"};
    unsigned n = 0;
    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++)
        n += same(t->k, t->kl, fixed[i], strlen(fixed[i]));
    struct tok u;
    const char *p = body;
    while (next_tok(&p, end, &u) && u.k < t->k)
        n += u.k != event && same(t->k, t->kl, u.k, u.kl);
    return n;
}

size_t stp_log_json(char *buf, size_t cap, const char *ts, const char *level,
                    const char *body, size_t n, bool cut)
{
    static const char tail[] = ",\"truncated\":true}";
    STP_ASSERT(cap >= STP_LOG_JSON_MIN);
    /* Room is kept for the tail, a closing quote and the NUL; the fixed
     * members always fit (an event name is short: at most 64 bytes). */
    struct out w = {buf, cap - sizeof(tail) - 1, 0, false};
    const char *end = body + n, *p = body;
    struct tok t, ev = {0};
    bool have_event = false;
    while (!have_event && next_tok(&p, end, &t))
        if (!t.flag && same(t.k, t.kl, "event", 5)) {
            ev = t;
            have_event = true;
        }
    put(&w, "{\"ts\":", 6);
    put_str(&w, ts, strlen(ts), false);
    put(&w, ",\"level\":", 9);
    put_str(&w, level, strlen(level), false);
    put(&w, ",\"event\":", 9);
    if (have_event)
        put_str(&w, ev.v, ev.vl > 64 ? 64 : ev.vl, ev.quoted);
    else
        put(&w, "\"message\"", 9);
    if (!have_event) {
        size_t mark = w.o;
        put(&w, ",\"msg\":", 7);
        size_t vstart = w.o;
        put_str(&w, body, n, false);
        if (w.full && w.o == vstart)
            w.o = mark;
    } else {
        for (p = body; !w.full && next_tok(&p, end, &t);) {
            if (t.k == ev.k)
                continue;
            size_t mark = w.o;
            put(&w, ",", 1);
            unsigned k = twins(body, end, &t, ev.k);
            if (k) {
                char key[160];
                int kl = snprintf(key, sizeof(key), "%.*s_%u",
                                  (int)(t.kl > 140 ? 140 : t.kl), t.k, k + 1);
                put_str(&w, key, (size_t)kl, false);
            } else {
                put_str(&w, t.k, t.kl, false);
            }
            put(&w, ":", 1);
            size_t vstart = w.o;
            if (t.flag)
                put(&w, "true", 4);
            else
                put_str(&w, t.v, t.vl, t.quoted); /* a value may be cut */
            /* A member without room for its key or the start of its value
             * goes whole. */
            if (w.full && (t.flag || w.o == vstart))
                w.o = mark;
        }
    }
    size_t o = w.o;
    if (w.full || cut) {
        memcpy(buf + o, tail, sizeof(tail) - 1);
        o += sizeof(tail) - 1;
    } else {
        buf[o++] = '}';
    }
    buf[o] = '\0';
    return o;
}
