/* SIGUSR2: a binary upgrade without downtime. The running process starts its
 * own binary again, with its arguments, and hands it the listening sockets
 * as inherited descriptors; the new one loads its configuration, accepts on
 * the same sockets and says "ready" through a pipe; only then does the old
 * one stop accepting and drain. Until then both accept on one socket (one
 * kernel queue), so no connection is refused while they switch. */
#ifndef STP_UPGRADE_H
#define STP_UPGRADE_H

#include <stdbool.h>
#include <uv.h>

#include "listener.h"

/* The environment a new process finds: its sockets, "FD=ADDR=NAME" joined
 * by ';' (ADDR as configured, HOST:0 included, and the listener's name: the
 * two that tell sockets apart, as in listener.c), and the descriptor of the
 * pipe to the old process. */
#define STP_UPGRADE_ENV_FDS "STP_INHERIT_FDS"
#define STP_UPGRADE_ENV_PIPE "STP_UPGRADE_PIPE"
/* How long the new process has to load its configuration and accept. */
#define STP_UPGRADE_TIMEOUT_MS 30000

/* At start, before anything changes the directory or the file is replaced:
 * the path of our binary and our arguments, to start them again. */
void stp_upgrade_init(char **argv);

/* In a process started by an upgrade: the sockets handed over, into S (left
 * empty otherwise), and the pipe remembered. ERR on a malformed hand-over. */
int stp_upgrade_inherit(struct stp_sockets *s, char *err, size_t errlen);
/* The new process is accepting: tell the old one. False when no upgrade
 * started us. */
bool stp_upgrade_ready(void);
/* The new process cannot start: tell the old one why (MSG), before exiting. */
void stp_upgrade_fail(const char *msg);

/* The old process's side. DONE runs on the main loop once: with the new
 * pid when it is ready, or with a negative code and the reason it was not
 * (the reason is logged already). */
typedef void (*stp_upgrade_done)(int status, int new_pid);
/* Start the new process with S's sockets. -EALREADY while one is under way. */
int stp_upgrade_start(uv_loop_t *loop, const struct stp_sockets *s,
                      stp_upgrade_done done);
bool stp_upgrade_running(void);
/* Stopping: give up an upgrade under way (the new process is told to stop)
 * and close what keeps the loop alive. */
void stp_upgrade_abort(void);

#endif
