/* Command line, signals, privileges and the event loop. */
#include <getopt.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "config.h"
#include "listener.h"
#include "log.h"
#include "notify.h"
#include "stp.h"
#include "tls.h"
#include "transparent.h"
#include "upgrade.h"
#include "workers.h"

#define DEFAULT_CONFIG "/etc/starttls-proxy/starttls-proxy.ini"

static struct stp_workers workers;
/* Draining: after SIGTERM or SIGINT, or once an upgrade handed over (then
 * SIGHUP and SIGUSR2 no longer apply). */
static bool stopping;
/* A SIGTERM or SIGINT came: the next one ends every session at once. */
static bool told_to_stop;
/* Every signal the proxy handles. USR1 is what log rotation sends daemons
 * (we log to stderr: nothing to reopen) and USR2 starts a binary upgrade:
 * neither may take the default action, which kills. */
static const int handled[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2};
static uv_signal_t sigs[STP_ARRAY_LEN(handled)];
static const char *config_path = DEFAULT_CONFIG;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: starttls-proxy [-c FILE] [-t] [-h] [--version]\n"
            "  -c, --config FILE  configuration (default %s)\n"
            "  -t, --test         check the configuration and exit\n"
            "  -h, --help         this text\n"
            "  -V, --version      print the version\n"
            "Runs in the foreground and logs to stderr. SIGHUP reloads the\n"
            "configuration; SIGTERM or SIGINT stops accepting and lets open\n"
            "sessions finish (up to drain_timeout); a second one stops at "
            "once. SIGUSR2 starts this binary again on the same sockets\n"
            "and drains once it is accepting. SIGUSR1 is ignored.\n",
            DEFAULT_CONFIG);
}

static void close_signals(struct stp_workers *ws)
{
    (void)ws;
    stp_upgrade_abort();
    for (size_t i = 0; i < STP_ARRAY_LEN(sigs); i++)
        uv_close((uv_handle_t *)&sigs[i], NULL);
}

/* Name lookups run on libuv's thread pool (4 threads by default), and a
 * worker holds one thread per name being looked up: 4 more per worker
 * keep other names going while a few resolvers are slow. Read once, at the
 * pool's first use; UV_THREADPOOL_SIZE in the environment wins. */
static void pool_size(int n_workers)
{
    char v[16];
    int n = 4 + 4 * n_workers;
    snprintf(v, sizeof(v), "%d", n > 1024 ? 1024 : n);
    setenv("UV_THREADPOOL_SIZE", v, 0);
}

/* SIGHUP: read the file again; the workers switch to it, or nothing changes
 * if it is broken. */
static void reload(void)
{
    struct stp_gen *g = NULL;
    char err[1024] = "";
    int r = stp_gen_new(config_path, &g, err, sizeof(err));
    /* New addresses are bound here, so "ok" means they are listening. */
    if (r == 0)
        r = stp_workers_reload(&workers, g, err, sizeof(err));
    if (r < 0) {
        workers.reloads_failed++; /* for /metrics */
        stp_gen_unref(g);
        /* Out of memory, say, a path may fail without a word of its own. */
        if (err[0] == '\0')
            snprintf(err, sizeof(err), "%s: %s", config_path, stp_strerror(r));
        char e[1100]; /* the file's text is quoted in it */
        stp_log(STP_LOG_ERROR, "event=reload status=failed error=\"%s\"",
                stp_log_esc(e, sizeof(e), err));
        return;
    }
    /* workers = auto is one per CPU, as at the start. */
    int want = g->cfg.workers > 0 ? g->cfg.workers
                                  : (int)uv_available_parallelism();
    if (want != workers.n)
        stp_log(STP_LOG_WARN, "event=reload msg=\"workers changes only on "
                              "restart\" workers=%d", workers.n);
    workers.reloads_ok++;
    stp_log_set_level(g->cfg.log_level);
    stp_log(STP_LOG_INFO, "event=reload status=ok listeners=%d sessions=%u",
            g->cfg.n_listeners, stp_workers_sessions(&workers));
    stp_gen_unref(g); /* the workers took their own references */
}

/* The new process is accepting on our sockets (STATUS 0): we stop and
 * drain. Otherwise we go on serving (upgrade.c said why). */
static void upgrade_done(int status, int new_pid)
{
    if (status < 0 || stopping)
        return;
    stopping = true;
    /* Under systemd (Type=notify) the service follows the new process. */
    char m[64];
    snprintf(m, sizeof(m), "MAINPID=%d\nREADY=1", new_pid);
    stp_notify(m);
    stp_log(STP_LOG_INFO, "event=stopping signal=USR2 sessions=%u "
            "mode=handover new_pid=%d", stp_workers_sessions(&workers),
            new_pid);
    stp_workers_handover(&workers);
}

static void upgrade(void)
{
    const char *why = stopping ? "stopping" : "an upgrade is under way";
    if (!stopping && stp_workers_upgrade(&workers, uv_default_loop(),
                                         upgrade_done) != -EALREADY)
        return;
    stp_log(STP_LOG_WARN, "event=upgrade status=ignored reason=\"%s\"", why);
}

static void on_signal(uv_signal_t *h, int signum)
{
    if (signum == SIGUSR1) {
        stp_log(STP_LOG_INFO, "event=signal signal=USR1 action=ignored");
        return;
    }
    if (signum == SIGUSR2) {
        upgrade();
        return;
    }
    if (signum == SIGHUP) {
        if (!stopping)
            reload();
        return;
    }
    stp_log(STP_LOG_INFO, "event=stopping signal=%s sessions=%u mode=%s",
            strsignal(signum), stp_workers_sessions(&workers),
            told_to_stop ? "now" : "drain");
    stp_upgrade_abort(); /* the operator asked us to stop, not to switch */
    if (!stopping)
        stp_notify("STOPPING=1");
    /* After a hand-over too, the first one drains as usual (systemctl stop
     * sends it to every process of the service). */
    stp_workers_stop(&workers, told_to_stop);
    stopping = told_to_stop = true;
}

/* Who the process becomes once its sockets are bound. Resolved before
 * anything is bound, and by -t, so that a name that does not exist is a
 * configuration error with its line, not a failed start. Only root changes
 * identity; it must say whom to become, or user = root to stay. */
struct identity {
    bool change;
    uid_t uid;
    gid_t gid;
};

static int resolve_identity(const struct stp_config *cfg, struct identity *id,
                            char *err, size_t errlen)
{
    memset(id, 0, sizeof(*id));
    if (geteuid() != 0)
        return 0;
    if (!cfg->user) {
        snprintf(err, errlen,
                 "%s:%d: running as root: set user = (e.g. starttls-proxy) "
                 "in [proxy] to drop privileges after binding, or user = "
                 "root to stay root",
                 cfg->path, cfg->line_proxy);
        return -EPERM;
    }
    struct group *gr = cfg->group ? getgrnam(cfg->group) : NULL;
    if (cfg->group && !gr) {
        snprintf(err, errlen, "%s:%d: unknown group '%s'", cfg->path,
                 cfg->line_group, cfg->group);
        return -ENOENT;
    }
    if (strcmp(cfg->user, "root") == 0)
        return 0;
    struct passwd *pw = getpwnam(cfg->user);
    if (!pw) {
        snprintf(err, errlen, "%s:%d: unknown user '%s'", cfg->path,
                 cfg->line_user, cfg->user);
        return -ENOENT;
    }
    id->change = true;
    id->uid = pw->pw_uid;
    id->gid = gr ? gr->gr_gid : pw->pw_gid;
    return 0;
}

/* After binding and loading keys. */
static int drop_privileges(const struct stp_config *cfg,
                           const struct identity *id)
{
    if (!id->change)
        return 0;
    /* Transparent sockets are made per session, after the drop: keep the
     * network capabilities through setuid, and only those. */
    char what[512];
    bool caps = stp_tp_needs_caps(cfg, what, sizeof(what));
    if ((caps && stp_tp_keep_caps() < 0) || setgroups(1, &id->gid) < 0 ||
        setgid(id->gid) < 0 || setuid(id->uid) < 0) {
        fprintf(stderr, "%s:%d: cannot become %s: %s\n", cfg->path,
                cfg->line_user, cfg->user, strerror(errno));
        return -errno;
    }
    int r;
    if (caps && (r = stp_tp_restore_caps()) < 0) {
        fprintf(stderr, "%s: cannot keep CAP_NET_ADMIN as %s: %s\n", what,
                cfg->user, stp_strerror(r));
        return r;
    }
    stp_log(STP_LOG_INFO, "event=privileges user=%s uid=%u gid=%u", cfg->user,
            (unsigned)id->uid, (unsigned)id->gid);
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
    bool test = false;
    int o;
    stp_upgrade_init(argv); /* before getopt reorders it */
    while ((o = getopt_long(argc, argv, "c:thV", opts, NULL)) != -1) {
        switch (o) {
        case 'c': config_path = optarg; break;
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
    if (stp_tls_global_init() < 0) {
        fprintf(stderr, "starttls-proxy: TLS library failed to initialise\n");
        return 1;
    }

    /* The configuration, every TLS context it names and the account to
     * run as: -t stops here. */
    struct stp_gen *gen;
    struct identity id;
    char err[1024];
    int r = stp_gen_new(config_path, &gen, err, sizeof(err));
    if (r == 0 && (r = resolve_identity(&gen->cfg, &id, err, sizeof(err))) < 0)
        stp_gen_unref(gen);
    if (r < 0) {
        fprintf(stderr, "%s\n", err);
        stp_upgrade_fail(err);
        return 1;
    }
    stp_log_set_level(gen->cfg.log_level);
    if (test) {
        fprintf(stderr, "%s: configuration OK\n", config_path);
        stp_gen_unref(gen);
        return 0;
    }

    /* Without the capability the first transparent bind would fail with a
     * bare EPERM: say which key needs it, before anything is bound. */
    char what[512];
    if (stp_tp_needs_caps(&gen->cfg, what, sizeof(what)) &&
        !stp_tp_have_caps()) {
        fprintf(stderr, "%s needs CAP_NET_ADMIN (run as root, or grant it: "
                "AmbientCapabilities=CAP_NET_ADMIN, --cap-add NET_ADMIN)\n",
                what);
        stp_upgrade_fail("a transparent listener needs CAP_NET_ADMIN");
        stp_gen_unref(gen);
        return 1;
    }

    signal(SIGPIPE, SIG_IGN);
    uv_loop_t *loop = uv_default_loop();
    /* Handlers first: a signal must never find the default action, even
     * in the instant after the listeners appear. */
    for (size_t i = 0; i < STP_ARRAY_LEN(sigs); i++) {
        uv_signal_init(loop, &sigs[i]);
        uv_signal_start(&sigs[i], on_signal, handled[i]);
    }
    int n = gen->cfg.workers > 0 ? gen->cfg.workers
                                 : (int)uv_available_parallelism();
    pool_size(n);
    /* Started by an upgrade: the sockets are bound already (perhaps to a
     * port we could no longer bind ourselves). */
    struct stp_sockets inherited = {0};
    if (stp_upgrade_inherit(&inherited, err, sizeof(err)) < 0 ||
        stp_workers_init(&workers, loop, gen, n, &inherited, err,
                         sizeof(err)) < 0) {
        fprintf(stderr, "%s\n", err);
        stp_upgrade_fail(err);
        return 1;
    }
    if (drop_privileges(&gen->cfg, &id) < 0) {
        stp_upgrade_fail("cannot drop privileges (see the log)");
        return 1;
    }
    workers.on_all_done = close_signals;
    stp_gen_unref(gen); /* the workers hold it */
    if (stp_workers_run(&workers) < 0)
        return 1;
    stp_log(STP_LOG_INFO, "event=started version=%s pid=%d workers=%d",
            STP_VERSION, (int)getpid(), n);
    /* A successor is not systemd's main process until the old one says
     * so (upgrade_done). */
    if (!stp_upgrade_ready())
        stp_notify("READY=1");

    uv_run(loop, UV_RUN_DEFAULT);

    stp_workers_free(&workers);
    stp_log(STP_LOG_INFO, "event=stopped");
    uv_loop_close(loop);
    stp_tls_global_cleanup();
    return 0;
}
