/* SIGUSR2: start our binary again and hand it the listening sockets
 * (upgrade.h). Both halves are here: the old process's (spawn, wait for
 * "ready", give up on a failure or a timeout) and the new one's (take the
 * descriptors, say "ready" or why not). */
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "stp.h"
#include "upgrade.h"

extern char **environ;

static char exe[PATH_MAX];
static char **args;
static int pipe_fd = -1; /* the new process's end of the pipe */

/* The old process's side: one upgrade at a time. */
static struct {
    uv_loop_t *loop;
    uv_process_t proc;
    uv_pipe_t pipe;
    uv_timer_t timer;
    bool proc_open, pipe_open, timer_open;
    bool decided;            /* DONE was called */
    int pid;
    char line[512];          /* what the new process said */
    size_t len;
    stp_upgrade_done done;
} up;

void stp_upgrade_init(char **argv)
{
    /* The path now, not /proc/self/exe later: once the file is replaced,
     * that link names the old, deleted binary. */
    size_t n = sizeof(exe);
    if (uv_exepath(exe, &n) < 0 && !realpath(argv[0], exe))
        snprintf(exe, sizeof(exe), "%s", argv[0]);
    args = argv;
    const char *p = getenv(STP_UPGRADE_ENV_PIPE);
    if (p) {
        char *end;
        long fd = strtol(p, &end, 10);
        if (*end == '\0' && fd > 2 && fd < INT_MAX &&
            fcntl((int)fd, F_SETFD, FD_CLOEXEC) == 0)
            pipe_fd = (int)fd;
        unsetenv(STP_UPGRADE_ENV_PIPE);
    }
}

/* ---- the new process ---------------------------------------------------- */

static void say(const char *text)
{
    if (pipe_fd < 0)
        return;
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t w = write(pipe_fd, text, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break; /* the old process is gone: nobody to tell */
        text += w;
        len -= (size_t)w;
    }
    close(pipe_fd);
    pipe_fd = -1;
}

bool stp_upgrade_ready(void)
{
    bool successor = pipe_fd >= 0;
    say("ready\n");
    return successor;
}

void stp_upgrade_fail(const char *msg)
{
    char line[600];
    snprintf(line, sizeof(line), "failed %s", msg);
    /* One line: a newline in MSG would end it early. */
    for (char *c = line; *c; c++)
        if (*c == '\n' || *c == '\r')
            *c = ' ';
    size_t n = strlen(line);
    if (n + 1 < sizeof(line)) {
        line[n] = '\n';
        line[n + 1] = '\0';
    }
    say(line);
}

/* One "FD=ADDR=NAME" entry (LEN bytes at E) into S->v[S->n]. */
static int inherit_one(struct stp_sockets *s, const char *e, size_t len)
{
    char buf[512];
    if (len >= sizeof(buf))
        return -EINVAL;
    memcpy(buf, e, len);
    buf[len] = '\0';
    char *addr = strchr(buf, '=');
    char *name = addr ? strchr(addr + 1, '=') : NULL;
    if (!name)
        return -EINVAL;
    *addr++ = '\0';
    *name++ = '\0';
    char *end;
    long fd = strtol(buf, &end, 10);
    struct stp_socket sk = {.fd = (int)fd};
    if (*end != '\0' || fd < 3 || fd > INT_MAX ||
        stp_parse_hostport(addr, &sk.addr) < 0)
        return -EINVAL;
    /* Only a listening socket: a descriptor we did not expect is refused
     * rather than accepted on. */
    int on = 0;
    socklen_t ol = sizeof(on);
    if (getsockopt(sk.fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &ol) < 0 || !on)
        return -ENOTSOCK;
    if (!(sk.name = strdup(name)))
        return -ENOMEM;
    /* Ours now, and not for whatever we start in turn. */
    fcntl(sk.fd, F_SETFD, FD_CLOEXEC);
    s->v[s->n++] = sk;
    return 0;
}

int stp_upgrade_inherit(struct stp_sockets *s, char *err, size_t errlen)
{
    const char *list = getenv(STP_UPGRADE_ENV_FDS);
    if (!list)
        return 0;
    size_t n = 1;
    for (const char *c = list; *c; c++)
        n += *c == ';';
    if (!(s->v = calloc(n, sizeof(*s->v)))) {
        snprintf(err, errlen, "%s: out of memory", STP_UPGRADE_ENV_FDS);
        return -ENOMEM;
    }
    for (const char *e = list; *e;) {
        size_t len = strcspn(e, ";");
        int r = inherit_one(s, e, len);
        if (r < 0) {
            snprintf(err, errlen, "%s: cannot use '%.*s': %s",
                     STP_UPGRADE_ENV_FDS, (int)STP_MIN(len, 200), e,
                     r == -EINVAL ? "expected FD=ADDR=NAME" : stp_strerror(r));
            stp_sockets_close(s);
            return r;
        }
        e += len + (e[len] == ';');
    }
    unsetenv(STP_UPGRADE_ENV_FDS);
    stp_log(STP_LOG_INFO, "event=upgrade status=inherited sockets=%d "
            "old_pid=%d", s->n, (int)getppid());
    return 0;
}

/* ---- the old process ---------------------------------------------------- */

static void closed(uv_handle_t *h)
{
    if (h == (uv_handle_t *)&up.proc)
        up.proc_open = false;
    else if (h == (uv_handle_t *)&up.pipe)
        up.pipe_open = false;
    else
        up.timer_open = false;
}

static void close_one(uv_handle_t *h, bool open)
{
    if (open && !uv_is_closing(h))
        uv_close(h, closed);
}

bool stp_upgrade_running(void)
{
    return up.proc_open || up.pipe_open || up.timer_open;
}

/* The outcome, once: logged, and handed to the caller. On success the new
 * process is left to itself (its handle closed, not killed). */
static void decide(int status, const char *reason)
{
    if (up.decided)
        return;
    up.decided = true;
    close_one((uv_handle_t *)&up.pipe, up.pipe_open);
    close_one((uv_handle_t *)&up.timer, up.timer_open);
    if (status == 0) {
        stp_log(STP_LOG_INFO, "event=upgrade status=ok pid=%d new_pid=%d",
                (int)getpid(), up.pid);
        close_one((uv_handle_t *)&up.proc, up.proc_open);
    } else {
        char e[600];
        stp_log(STP_LOG_ERROR, "event=upgrade status=failed new_pid=%d "
                "reason=\"%s\" action=\"still serving\"", up.pid,
                stp_log_esc(e, sizeof(e), reason));
    }
    up.done(status, up.pid);
}

static void on_child_exit(uv_process_t *p, int64_t status, int sig)
{
    char why[128];
    if (sig)
        snprintf(why, sizeof(why), "the new process was killed by signal %d "
                 "before it was ready", sig);
    else
        snprintf(why, sizeof(why), "the new process exited with status %d "
                 "before it was ready", (int)status);
    decide(-ECHILD, why);
    close_one((uv_handle_t *)p, up.proc_open);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    (void)h;
    (void)hint;
    b->base = up.line + up.len;
    b->len = sizeof(up.line) - 1 - up.len;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    (void)b;
    if (n < 0 || (n == 0 && up.len == sizeof(up.line) - 1)) {
        /* Gone without a word: its exit status tells why (on_child_exit). */
        uv_read_stop(s);
        close_one((uv_handle_t *)s, up.pipe_open);
        return;
    }
    up.len += (size_t)n;
    up.line[up.len] = '\0';
    char *nl = strchr(up.line, '\n');
    if (!nl)
        return;
    *nl = '\0';
    if (strcmp(up.line, "ready") == 0)
        decide(0, NULL);
    else if (strncmp(up.line, "failed ", 7) == 0)
        decide(-EINVAL, up.line + 7); /* on_child_exit reaps it */
    else
        decide(-EPROTO, "the new process said something else than ready");
}

static void on_timeout(uv_timer_t *t)
{
    (void)t;
    char why[96];
    snprintf(why, sizeof(why), "the new process was not ready within %d s: "
             "killed", STP_UPGRADE_TIMEOUT_MS / 1000);
    /* Not ready means not yet accepting: nothing of ours is lost. */
    uv_process_kill(&up.proc, SIGKILL);
    decide(-ETIMEDOUT, why);
}

/* "FD=ADDR=NAME;..." for the sockets of S, at descriptors 3, 4, ... */
static char *fds_env(const struct stp_sockets *s)
{
    size_t cap = strlen(STP_UPGRADE_ENV_FDS) + 2;
    for (int i = 0; i < s->n; i++)
        cap += 80 + strlen(s->v[i].name);
    char *v = malloc(cap);
    if (!v)
        return NULL;
    size_t at = (size_t)snprintf(v, cap, "%s=", STP_UPGRADE_ENV_FDS);
    for (int i = 0; i < s->n; i++) {
        char addr[64];
        stp_format_addr((const struct sockaddr *)&s->v[i].addr, addr,
                        sizeof(addr));
        /* A name is letters, digits, '_', '.', '-' (config.c): no ';'. */
        at += (size_t)snprintf(v + at, cap - at, "%s%d=%s=%s", i ? ";" : "",
                               3 + i, addr, s->v[i].name);
    }
    return v;
}

/* Our environment without a hand-over of our own, plus the new one. */
static char **child_env(char *fds, char *pipe)
{
    size_t n = 0;
    while (environ[n])
        n++;
    char **env = calloc(n + 3, sizeof(*env));
    size_t k = 0;
    for (size_t i = 0; env && i < n; i++)
        if (strncmp(environ[i], STP_UPGRADE_ENV_FDS "=",
                    sizeof(STP_UPGRADE_ENV_FDS)) != 0 &&
            strncmp(environ[i], STP_UPGRADE_ENV_PIPE "=",
                    sizeof(STP_UPGRADE_ENV_PIPE)) != 0)
            env[k++] = environ[i];
    if (env) {
        env[k++] = fds;
        env[k] = pipe;
    }
    return env;
}

int stp_upgrade_start(uv_loop_t *loop, const struct stp_sockets *s,
                      stp_upgrade_done done)
{
    if (stp_upgrade_running())
        return -EALREADY;
    memset(&up, 0, sizeof(up));
    up.loop = loop;
    up.done = done;
    int nio = 3 + s->n + 1;
    uv_stdio_container_t *io = calloc((size_t)nio, sizeof(*io));
    char *fds = fds_env(s);
    char pipe[48];
    snprintf(pipe, sizeof(pipe), "%s=%d", STP_UPGRADE_ENV_PIPE, nio - 1);
    char **env = fds ? child_env(fds, pipe) : NULL;
    int r = io && env ? 0 : -ENOMEM;
    if (r == 0) {
        /* Our stderr is the log; a descriptor we do not have is /dev/null. */
        for (int i = 0; i < 3; i++) {
            io[i].flags = fcntl(i, F_GETFD) < 0 ? UV_IGNORE : UV_INHERIT_FD;
            io[i].data.fd = i;
        }
        for (int i = 0; i < s->n; i++) {
            io[3 + i].flags = UV_INHERIT_FD;
            io[3 + i].data.fd = s->v[i].fd;
        }
        uv_pipe_init(loop, &up.pipe, 0);
        up.pipe_open = true;
        io[nio - 1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
        io[nio - 1].data.stream = (uv_stream_t *)&up.pipe;
        uv_process_options_t o = {
            .exit_cb = on_child_exit, .file = exe, .args = args, .env = env,
            .stdio_count = nio, .stdio = io,
        };
        r = uv_spawn(loop, &up.proc, &o);
        up.proc_open = true; /* initialised even when the spawn failed */
    }
    free(io);
    free(env);
    free(fds);
    if (r == 0) {
        up.pid = up.proc.pid;
        r = uv_read_start((uv_stream_t *)&up.pipe, on_alloc, on_read);
    }
    if (r < 0) {
        char e[600];
        stp_log(STP_LOG_ERROR, "event=upgrade status=failed reason=\"cannot "
                "start %s: %s\" action=\"still serving\"",
                stp_log_esc(e, sizeof(e), exe), stp_strerror(r));
        if (up.pid)
            uv_process_kill(&up.proc, SIGKILL);
        else
            close_one((uv_handle_t *)&up.proc, up.proc_open);
        close_one((uv_handle_t *)&up.pipe, up.pipe_open);
        up.decided = true;
        return r;
    }
    uv_timer_init(loop, &up.timer);
    up.timer_open = true;
    uv_timer_start(&up.timer, on_timeout, STP_UPGRADE_TIMEOUT_MS, 0);
    stp_log(STP_LOG_INFO, "event=upgrade status=started pid=%d new_pid=%d "
            "sockets=%d", (int)getpid(), up.pid, s->n);
    return 0;
}

void stp_upgrade_abort(void)
{
    if (!up.decided && up.proc_open) {
        /* It may be accepting already: let it drain what it took. */
        uv_process_kill(&up.proc, SIGTERM);
        decide(-ECANCELED, "stopping");
    }
    close_one((uv_handle_t *)&up.proc, up.proc_open);
    close_one((uv_handle_t *)&up.pipe, up.pipe_open);
    close_one((uv_handle_t *)&up.timer, up.timer_open);
}
