/* Command line, signals and the event loop. */
#include <getopt.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "config.h"
#include "listener.h"
#include "log.h"
#include "stp.h"
#include "tls.h"

#define DEFAULT_CONFIG "/etc/starttls-proxy/starttls-proxy.ini"

static struct stp_server server;
static uv_signal_t sig_term, sig_int;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: starttls-proxy [-c FILE] [-t] [-h] [--version]\n"
            "  -c, --config FILE  configuration (default %s)\n"
            "  -t, --test         check the configuration and exit\n"
            "  -h, --help         this text\n"
            "  -V, --version      print the version\n"
            "Runs in the foreground and logs to stderr; SIGTERM or SIGINT "
            "stops it.\n",
            DEFAULT_CONFIG);
}

static void on_signal(uv_signal_t *h, int signum)
{
    stp_log(STP_LOG_INFO, "event=stopping signal=%s sessions=%u",
            strsignal(signum), server.n_sessions);
    stp_server_stop(&server);
    uv_close((uv_handle_t *)&sig_term, NULL);
    uv_close((uv_handle_t *)&sig_int, NULL);
}

/* -t: parse, then build every TLS context so bad keys are caught too. */
static int check_only(const struct stp_config *cfg)
{
    struct stp_server srv = {.cfg = cfg};
    char err[1024];
    int r = stp_server_tls(&srv, cfg, err, sizeof(err));
    stp_server_free(&srv);
    if (r < 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    fprintf(stderr, "%s: configuration OK\n", cfg->path);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"test", no_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *path = DEFAULT_CONFIG;
    bool test = false;
    int o;
    while ((o = getopt_long(argc, argv, "c:thV", opts, NULL)) != -1) {
        switch (o) {
        case 'c': path = optarg; break;
        case 't': test = true; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("starttls-proxy %s\n", STP_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }

    struct stp_config cfg;
    char err[1024];
    if (stp_config_load(path, &cfg, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    stp_log_set_level(cfg.log_level);
    if (stp_tls_global_init() < 0) {
        fprintf(stderr, "starttls-proxy: TLS library failed to initialise\n");
        return 1;
    }
    if (test) {
        int r = check_only(&cfg);
        stp_config_free(&cfg);
        return r;
    }

    signal(SIGPIPE, SIG_IGN);
    uv_loop_t *loop = uv_default_loop();
    if (stp_server_start(&server, loop, &cfg) < 0)
        return 1;
    uv_signal_init(loop, &sig_term);
    uv_signal_init(loop, &sig_int);
    uv_signal_start(&sig_term, on_signal, SIGTERM);
    uv_signal_start(&sig_int, on_signal, SIGINT);
    stp_log(STP_LOG_INFO, "event=started version=%s pid=%d", STP_VERSION,
            (int)getpid());

    uv_run(loop, UV_RUN_DEFAULT);

    stp_log(STP_LOG_INFO, "event=stopped");
    uv_loop_close(loop);
    stp_server_free(&server);
    stp_config_free(&cfg);
    stp_tls_global_cleanup();
    return 0;
}
