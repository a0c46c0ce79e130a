/* ticket_keys = FILE: the key file's lines, and tickets sealed by one
 * process's listener context opened by another's holding the same keys. */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "base64.h"
#include "ticket_keys.h"
#include "tls_ticket.h"

#include "unit.h"

/* A line of 80 bytes: 16 of NAME, then 64 of SEED. */
static void key_line(char *out, uint8_t name, uint8_t seed)
{
    uint8_t raw[STP_TICKET_KEY_LEN];
    memset(raw, seed, sizeof(raw));
    memset(raw, name, STP_TICKET_KEY_NAME);
    stp_b64_encode(raw, sizeof(raw), out);
}

static struct stp_ticket_keys *keys_of(const char *text)
{
    struct stp_ticket_keys *k = NULL;
    char err[256];
    if (stp_ticket_keys_parse("keys.txt", text, strlen(text), &k, err,
                              sizeof(err)) < 0)
        failf("parse: %s", err);
    return k;
}

static void test_parse_good(void)
{
    char a[STP_B64_LEN(80) + 1], b[STP_B64_LEN(80) + 1], text[512];
    key_line(a, 1, 0xaa);
    key_line(b, 2, 0xbb);
    case_begin("two keys, CRLF, a blank line, no final newline");
    snprintf(text, sizeof(text), "%s\r\n\n%s", a, b);
    struct stp_ticket_keys *k = keys_of(text);
    CHECK(k && k->n == 2, "n = %d", k ? k->n : -1);
    if (k) {
        CHECK(k->k[0].name[0] == 1 && k->k[0].name[15] == 1 &&
                  k->k[0].aead[0] == 0xaa && k->k[0].aead[31] == 0xaa &&
                  k->k[1].name[0] == 2,
              "the first line is the first key, name then AEAD key");
    }
    stp_ticket_keys_free(k);
    case_end();
}

static void test_parse_bad(void)
{
    char a[STP_B64_LEN(80) + 1], b[STP_B64_LEN(80) + 1];
    char short_[STP_B64_LEN(48) + 1], long_[STP_B64_LEN(81) + 1];
    uint8_t raw[81] = {0};
    key_line(a, 1, 0xaa);
    key_line(b, 1, 0xbb); /* the same name as a */
    stp_b64_encode(raw, 48, short_);
    stp_b64_encode(raw, 81, long_);
    char t[6][600];
    snprintf(t[0], sizeof(t[0]), "%s\n%s\n", a, short_);
    snprintf(t[1], sizeof(t[1]), "%s\n\n%s\n", a, long_);
    snprintf(t[2], sizeof(t[2]), "%s\n%.40s*%s\n", a, a, a + 41);
    snprintf(t[3], sizeof(t[3]), "\n\n");
    snprintf(t[4], sizeof(t[4]), "%s\n%s\n", a, b);
    snprintf(t[5], sizeof(t[5]), "# a comment\n%s\n", a);
    static const char *const want[] = {
        "keys.txt:2: not 80 bytes of base64", "keys.txt:3: not 80 bytes",
        "keys.txt:2: not 80 bytes", "keys.txt:2: no key",
        "keys.txt:2: the same key name", "keys.txt:1: not 80 bytes",
    };
    case_begin("malformed files: FILE:LINE of the bad line, no key bytes");
    for (int i = 0; i < 6; i++) {
        struct stp_ticket_keys *k = (void *)1;
        char err[256] = "";
        int r = stp_ticket_keys_parse("keys.txt", t[i], strlen(t[i]), &k, err,
                                      sizeof(err));
        CHECK(r == -EINVAL && k == NULL, "case %d: r = %d", i, r);
        CHECK(strncmp(err, want[i], strlen(want[i])) == 0,
              "case %d: \"%s\"", i, err);
        CHECK(!strstr(err, a + 4), "case %d: key text in \"%s\"", i, err);
    }
    case_end();
}

enum { STATE = 100, ROOM = 200 };

struct ticket {
    uint8_t name[WOLFSSL_TICKET_NAME_SZ], iv[WOLFSSL_TICKET_IV_SZ];
    uint8_t mac[WOLFSSL_TICKET_MAC_SZ], body[ROOM];
    int len;
};

static int seal(struct stp_tickets *tk, const struct stp_tls_ident *id,
                struct ticket *t)
{
    memset(t->body, 0x5a, STATE);
    t->len = ROOM;
    return stp_ticket_seal(tk, "mx.example", id, t->name, t->iv, t->mac,
                           t->body, STATE, &t->len);
}

/* Opens a copy, so one ticket can be offered to several contexts. */
static int open_(struct stp_tickets *tk, const struct ticket *t,
                 struct stp_tls_ident **id)
{
    struct ticket c = *t;
    int out = 0;
    int r = stp_ticket_open(tk, "mx.example", id, c.name, c.iv, c.mac, c.body,
                            c.len, &out);
    if (r == 0 && (out != STATE || c.body[0] != 0x5a || c.body[STATE - 1] != 0x5a))
        failf("opened, but not to the state sealed");
    return r;
}

static void test_across_processes(void)
{
    char a[STP_B64_LEN(80) + 1], b[STP_B64_LEN(80) + 1], text[512];
    key_line(a, 1, 0xaa);
    key_line(b, 2, 0xbb);
    struct stp_ticket_keys *old = keys_of(a);
    snprintf(text, sizeof(text), "%s\n%s\n", b, a);
    struct stp_ticket_keys *rotated = keys_of(text);
    struct stp_tickets *p1 = stp_tickets_new(old, "verify_client=0 main");
    struct stp_tickets *p2 = stp_tickets_new(old, "verify_client=0 main");
    struct stp_tickets *p3 = stp_tickets_new(rotated, "verify_client=0 main");
    struct stp_tickets *own = stp_tickets_new(NULL, "verify_client=0 main");
    struct stp_tickets *other = stp_tickets_new(old, "verify_client=0 submit");
    struct stp_tls_ident *got = NULL, who = {"/CN=client.test", "client.test"};
    struct ticket t, t2, t3, tid;

    case_begin("a ticket without identity opens in another process");
    CHECK(seal(p1, NULL, &t) == 0, "seal");
    CHECK(memcmp(t.name, old->k[0].name, sizeof(t.name)) == 0,
          "the ticket names the key that sealed it");
    CHECK(open_(p2, &t, &got) == 0 && got == NULL, "p2 opens it");
    CHECK(open_(p1, &t, &got) == 0 && got == NULL, "p1 opens it");
    case_end();

    case_begin("nonces differ between tickets, and 4 IV bytes stay 0");
    CHECK(seal(p1, NULL, &t2) == 0 && seal(p2, NULL, &t3) == 0, "seal");
    CHECK(memcmp(t.iv, t2.iv, 12) && memcmp(t.iv, t3.iv, 12) &&
              memcmp(t2.iv, t3.iv, 12),
          "a nonce repeated");
    CHECK(!t.iv[12] && !t.iv[13] && !t.iv[14] && !t.iv[15], "IV tail");
    case_end();

    case_begin("an identity opens only in the context that kept it");
    CHECK(seal(p1, &who, &tid) == 0, "seal");
    CHECK(open_(p2, &tid, &got) < 0 && got == NULL, "p2 refuses it");
    CHECK(open_(p1, &tid, &got) == 0 && got &&
              strcmp(got->cn, "client.test") == 0,
          "p1 resumes the identity");
    case_end();

    case_begin("rotation: old tickets open, new ones need the new key");
    CHECK(open_(p3, &t, &got) == 0 && got == NULL, "old ticket, new file");
    CHECK(seal(p3, NULL, &t2) == 0, "seal");
    CHECK(memcmp(t2.name, rotated->k[0].name, sizeof(t2.name)) == 0,
          "sealed with the first line");
    CHECK(open_(p1, &t2, &got) < 0, "a process without the new key");
    CHECK(open_(p3, &t2, &got) == 0, "a process with it");
    case_end();

    case_begin("refused: own keys, another listener, a flipped byte");
    CHECK(open_(own, &t, &got) < 0, "a process without the file");
    CHECK(seal(own, NULL, &t3) == 0 && open_(p1, &t3, &got) < 0,
          "its tickets in one with the file");
    CHECK(open_(other, &t, &got) < 0, "another listener");
    t2 = t;
    t2.body[7] ^= 1;
    CHECK(open_(p2, &t2, &got) < 0, "body");
    t2 = t;
    t2.iv[13] ^= 1;
    CHECK(open_(p2, &t2, &got) < 0, "IV tail");
    case_end();

    free(got);
    stp_tickets_free(p1);
    stp_tickets_free(p2);
    stp_tickets_free(p3);
    stp_tickets_free(own);
    stp_tickets_free(other);
    stp_ticket_keys_free(old);
    stp_ticket_keys_free(rotated);
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    test_parse_good();
    test_parse_bad();
    test_across_processes();
    return unit_summary();
}
