/* systemd's service notifications (sd_notify(3)) without libsystemd: with
 * Type=notify the proxy says when it is ready and, after an upgrade, which
 * process is the service's main process now. */
#ifndef STP_NOTIFY_H
#define STP_NOTIFY_H

/* Send MSG ("READY=1", "MAINPID=123") to $NOTIFY_SOCKET; 0 without one. */
int stp_notify(const char *msg);

#endif
