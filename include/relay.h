/* The relay: one client <-> upstream session, I/O events in, a protocol
 * engine (proto.h) in the middle. */
#ifndef STP_RELAY_H
#define STP_RELAY_H

#include <stdbool.h>

#include "listener.h"

/* Accept a pending connection on LST and start its session. Returns 0, or a
 * negative error: STP_ACCEPT_FAILED when the connection was taken and lost
 * (the accept itself failed), any other when no session could be made for
 * it and it is still pending. */
#define STP_ACCEPT_FAILED (-0x10000)
int stp_session_accept(struct stp_listener *lst);
/* Server shutdown: sessions between commands get the protocol's goodbye and
 * close now, the others when their command or message is done; FORCE: all
 * of them now. */
void stp_sessions_shutdown(struct stp_server *srv, bool force);

#endif
