/* libFuzzer target for the configuration parser: any text either loads into
 * a consistent configuration or fails with one "FILE:LINE: message", and
 * nothing leaks either way (ASan's leak check runs with the fuzzer). */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0'; /* the parser takes a string: a NUL ends it */

    struct stp_config cfg;
    char err[512];
    int r = stp_config_parse_string("f.ini", text, &cfg, err, sizeof(err));
    if (r == 0) {
        CHECK(cfg.n_listeners > 0, "a valid configuration has a listener");
        for (int i = 0; i < cfg.n_listeners; i++) {
            const struct stp_listener_cfg *l = &cfg.listeners[i];
            CHECK(l->upstream != NULL, "every listener's upstream is resolved");
            CHECK(l->upstream >= cfg.upstreams &&
                      l->upstream < cfg.upstreams + cfg.n_upstreams,
                  "the upstream points into the configuration");
            CHECK(l->max_line >= 512 && l->max_line <= 8192, "max_line range");
            /* Relaying as an account: only for clients named, or on a
             * loopback socket nobody reaches from elsewhere. */
            CHECK(l->upstream->auth == STP_AUTH_NONE || l->n_allow > 0 ||
                      (l->proxy_protocol == STP_PP_NO && !l->transparent &&
                       ((l->addr.ss_family == AF_INET &&
                         ((const unsigned char *)&((const struct sockaddr_in *)
                                                       &l->addr)->sin_addr)[0] == 127) ||
                        l->addr.ss_family == AF_INET6)),
                  "auth without allow where anyone can connect");
            CHECK(l->upstream->auth == STP_AUTH_NONE || l->upstream->verify,
                  "auth to an unverified next hop");
            CHECK(!l->require_tls || l->tls != STP_TLS_NONE,
                  "require_tls needs TLS");
            CHECK((l->cert == NULL) == (l->key == NULL), "cert and key pair");
            CHECK(l->tlsp.min_version <= l->tlsp.max_version, "versions");
            CHECK(l->timeout_idle_ms > 0 && l->timeout_command_ms > 0,
                  "timeouts are positive");
        }
        for (int i = 0; i < cfg.n_upstreams; i++) {
            const struct stp_upstream_cfg *u = &cfg.upstreams[i];
            CHECK(u->original_dst == (u->n_addrs == 0),
                  "an address list, or original-destination");
            CHECK(u->n_addrs <= STP_MAX_HOP_ADDRS, "at most 16 entries");
            for (int j = 0; j < u->n_addrs; j++)
                CHECK(u->addrs[j].host && u->addrs[j].port != 0,
                      "every entry has a host and a port");
            CHECK(!u->original_dst || u->server_name != NULL ||
                      u->tls == STP_TLS_NONE || !u->verify,
                  "verifying TLS always has a name to check");
            CHECK(u->auth == STP_AUTH_NONE ||
                      u->tls == STP_TLS_STARTTLS || u->tls == STP_TLS_IMPLICIT,
                  "auth only over TLS");
        }
        stp_config_free(&cfg);
    } else {
        CHECK(r < 0, "errors are negative");
        CHECK(strncmp(err, "f.ini:", 6) == 0, "errors start with FILE:");
        const char *p = err + 6;
        CHECK(*p >= '0' && *p <= '9', "then a line number");
        while (*p >= '0' && *p <= '9')
            p++;
        CHECK(p[0] == ':' && p[1] == ' ' && p[2] != '\0', "then ': message'");
        CHECK(strchr(err, '\n') == NULL, "one line");
        CHECK(cfg.listeners == NULL && cfg.n_listeners == 0,
              "a failed load leaves nothing behind");
    }
    free(text);
    return 0;
}
