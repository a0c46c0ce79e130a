/* One client <-> upstream session: I/O events in, SMTP engine in the middle. */
#ifndef STP_SESSION_H
#define STP_SESSION_H

#include "listener.h"

/* Accept a pending connection on LST and start its session. */
int stp_session_accept(struct stp_listener *lst);
/* Server shutdown: every session gets a 421 (if it is past its greeting)
 * and closes. */
void stp_sessions_shutdown(struct stp_server *srv);

#endif
