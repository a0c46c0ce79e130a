/* The relay's state table, deadlines and clock (relay_state.c). */
#include "relay_state.h"
#include "unit.h"

static void test_moves(void)
{
    case_begin("state table: CLOSED is final, DRAINING only closes");
    for (int to = 0; to < STP_SS_COUNT; to++) {
        CHECK(!stp_sstate_may(STP_SS_CLOSED, to), "closed -> %s",
              stp_sstate_name(to));
        CHECK(stp_sstate_may(STP_SS_DRAINING, to) == (to == STP_SS_CLOSED),
              "draining -> %s", stp_sstate_name(to));
        CHECK(!stp_sstate_may(to, STP_SS_NEW), "%s -> new",
              stp_sstate_name(to));
    }
    case_end();

    case_begin("state table: every open state may end, none stays put but "
               "connecting (the next address)");
    for (int from = 0; from < STP_SS_DRAINING; from++) {
        CHECK(stp_sstate_may(from, STP_SS_DRAINING) &&
                  stp_sstate_may(from, STP_SS_CLOSED),
              "%s cannot end", stp_sstate_name(from));
        CHECK(stp_sstate_may(from, from) == (from == STP_SS_CONNECTING),
              "%s -> itself", stp_sstate_name(from));
        /* Another address only while the leg is set up: once relayed, the
         * client has the upstream's greeting. */
        CHECK(stp_sstate_may(from, STP_SS_CONNECTING) ==
                  (from <= STP_SS_PRELUDE),
              "%s -> connecting", stp_sstate_name(from));
        CHECK(strcmp(stp_sstate_name(from), "?") != 0, "%d unnamed", from);
    }
    CHECK(!stp_sstate_may(STP_SS_COUNT, STP_SS_CLOSED), "out of range");
    case_end();

    case_begin("state table: no client byte is relayed before setup");
    /* Setup states never reach STARTTLS or HANDSHAKE without RELAY. */
    static const enum stp_sstate setup[] = {STP_SS_NEW, STP_SS_PROXY_HEADER,
                                            STP_SS_TLS_ACCEPT,
                                            STP_SS_CONNECTING,
                                            STP_SS_UPSTREAM_TLS,
                                            STP_SS_PRELUDE};
    for (size_t i = 0; i < sizeof(setup) / sizeof(setup[0]); i++) {
        CHECK(!stp_sstate_may(setup[i], STP_SS_STARTTLS) &&
                  !stp_sstate_may(setup[i], STP_SS_HANDSHAKE),
              "%s skips relaying", stp_sstate_name(setup[i]));
    }
    CHECK(!stp_sstate_may(STP_SS_TLS_ACCEPT, STP_SS_RELAY),
          "implicit TLS relays before connecting");
    case_end();

    case_begin("state table: the PROXY header comes before anything else");
    for (int from = 0; from < STP_SS_COUNT; from++)
        CHECK(stp_sstate_may(from, STP_SS_PROXY_HEADER) ==
                  (from == STP_SS_NEW),
              "%s -> proxy_header", stp_sstate_name(from));
    for (int to = 0; to < STP_SS_COUNT; to++)
        CHECK(stp_sstate_may(STP_SS_PROXY_HEADER, to) ==
                  (to == STP_SS_TLS_ACCEPT || to == STP_SS_CONNECTING ||
                   to >= STP_SS_DRAINING),
              "proxy_header -> %s", stp_sstate_name(to));
    case_end();
}

static void test_reading_and_stop(void)
{
    case_begin("no client byte is read while the upstream is set up");
    for (int st = 0; st < STP_SS_COUNT; st++) {
        if (stp_sstate_setting_up(st) || st == STP_SS_NEW ||
            st == STP_SS_STARTTLS || st >= STP_SS_DRAINING)
            CHECK(!stp_sstate_reads_client(st), "client read in %s",
                  stp_sstate_name(st));
        CHECK(stp_sstate_reads_upstream(st) ==
                  (st == STP_SS_RELAY || stp_sstate_setting_up(st)),
              "upstream read in %s", stp_sstate_name(st));
    }
    CHECK(stp_sstate_reads_client(STP_SS_RELAY) &&
              stp_sstate_reads_client(STP_SS_HANDSHAKE),
          "relaying without reading the client");
    CHECK(stp_sstate_reads_client(STP_SS_PROXY_HEADER) &&
              !stp_sstate_setting_up(STP_SS_PROXY_HEADER),
          "the header is read, the upstream not yet set up");
    case_end();

    case_begin("shutdown: close, goodbye now or at the boundary");
    CHECK(stp_sstate_stop(STP_SS_HANDSHAKE, true, false) == STP_STOP_CLOSE,
          "mid-handshake there is no channel for a reply");
    CHECK(stp_sstate_stop(STP_SS_PROXY_HEADER, true, false) == STP_STOP_CLOSE,
          "no reply before a complete PROXY header");
    CHECK(stp_sstate_stop(STP_SS_RELAY, false, false) == STP_STOP_LATER,
          "a message in flight is cut");
    CHECK(stp_sstate_stop(STP_SS_RELAY, false, true) == STP_STOP_GOODBYE,
          "force waits");
    CHECK(stp_sstate_stop(STP_SS_RELAY, true, false) == STP_STOP_GOODBYE,
          "an idle session waits");
    CHECK(stp_sstate_stop(STP_SS_PRELUDE, false, false) == STP_STOP_GOODBYE,
          "setup waits");
    CHECK(stp_sstate_stop(STP_SS_DRAINING, true, true) == STP_STOP_NONE &&
              stp_sstate_stop(STP_SS_CLOSED, true, true) == STP_STOP_NONE,
          "an ending session is stopped again");
    case_end();
}

static const struct stp_timeouts T = {
    .handshake = 60000, .setup = 30000, .reply = 300000, .idle = 300000,
    .command = 300000, .data = 600000, .drain = 5000, .proxy_header = 5000,
};

static void expect(const char *name, enum stp_sstate st,
                   struct stp_proto_status ps, struct stp_clock c,
                   enum stp_deadline want, uint64_t want_at)
{
    case_begin(name);
    uint64_t at;
    enum stp_deadline d = stp_deadline_next(st, &ps, &c, &T, &at);
    CHECK(d == want, "deadline %s, want %s", stp_deadline_name(d),
          stp_deadline_name(want));
    CHECK(d == STP_DL_NONE || at == want_at, "at %llu, want %llu",
          (unsigned long long)at, (unsigned long long)want_at);
    case_end();
}

static void test_deadlines(void)
{
    struct stp_proto_status none = {0}, greeting = {.greeting = true},
                            due = {.replies_due = true};
    struct stp_clock c = {.state_ms = 1000, .setup_ms = 2000,
                          .client_seen_ms = 3000, .upstream_seen_ms = 4000};
    expect("handshake bounded from entering it", STP_SS_HANDSHAKE, none, c,
           STP_DL_HANDSHAKE, 61000);
    expect("implicit TLS handshake", STP_SS_TLS_ACCEPT, none, c,
           STP_DL_HANDSHAKE, 61000);
    expect("the PROXY header: timeout_proxy_header from accepting",
           STP_SS_PROXY_HEADER, due, c, STP_DL_PROXY_HEADER, 6000);
    expect("setup: one deadline across its steps", STP_SS_PRELUDE, none, c,
           STP_DL_SETUP, 32000);
    expect("the greeting is part of setup", STP_SS_RELAY, greeting, c,
           STP_DL_SETUP, 32000);
    expect("replies due: the upstream's deadline", STP_SS_RELAY, due, c,
           STP_DL_REPLY, 304000);
    expect("nothing due: the client's idleness", STP_SS_RELAY, none, c,
           STP_DL_IDLE, 303000);
    struct stp_clock line = c;
    line.line_ms = 2500;
    expect("a partial command line comes first", STP_SS_RELAY, none, line,
           STP_DL_COMMAND, 302500);
    struct stp_clock msg = c;
    msg.content_ms = 100;
    msg.client_seen_ms = 500000;
    expect("a message is bounded as a whole", STP_SS_RELAY, none, msg,
           STP_DL_DATA, 600100);
    expect("the final reply is bounded", STP_SS_DRAINING, due, c,
           STP_DL_DRAIN, 6000);
    expect("closed: no deadline", STP_SS_CLOSED, due, c, STP_DL_NONE, 0);
}

static void test_clock(void)
{
    case_begin("clock: line and message starts kept until they end");
    struct stp_clock c = {0};
    struct stp_proto_status st = {.partial = true};
    stp_clock_track(&c, &st, 10);
    stp_clock_track(&c, &st, 20);
    CHECK(c.line_ms == 10, "line_ms %llu", (unsigned long long)c.line_ms);
    st = (struct stp_proto_status){.content = true};
    stp_clock_track(&c, &st, 30);
    stp_clock_track(&c, &st, 40);
    CHECK(c.line_ms == 0 && c.content_ms == 30, "line %llu content %llu",
          (unsigned long long)c.line_ms, (unsigned long long)c.content_ms);
    st = (struct stp_proto_status){0};
    stp_clock_track(&c, &st, 50);
    CHECK(c.content_ms == 0, "content_ms kept");
    case_end();
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    test_moves();
    test_reading_and_stop();
    test_deadlines();
    test_clock();
    return unit_summary();
}
