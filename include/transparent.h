/* Transparent proxying, the Linux-specific parts: IP_TRANSPARENT sockets,
 * where an intercepted connection was going (TPROXY, REDIRECT/DNAT), the
 * upstream's source address, and the capabilities all this needs. */
#ifndef STP_TRANSPARENT_H
#define STP_TRANSPARENT_H

#include <stdbool.h>
#include <sys/socket.h>

#include "config.h"

struct stp_server;

/* Let listening socket FD (FAMILY) accept connections for any address.
 * 0, or -errno with errno set. */
int stp_tp_listen_opt(int fd, int family);

/* Where the connection on accepted socket FD was going: its own local
 * address on a transparent listener (TPROXY keeps it), else the address
 * before NAT (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST). -ENOENT: it was
 * not redirected. */
int stp_tp_original_dst(int fd, bool transparent,
                        struct sockaddr_storage *out);

/* Is DST one of SRV's listening addresses (a wildcard listener listens on
 * every local address)? Connecting there would loop back into the proxy. */
bool stp_tp_is_own(const struct stp_server *srv,
                   const struct sockaddr_storage *dst);

/* Bind upstream socket FD (not connected yet) as UP's source says: the
 * client's address CLIENT (IP_TRANSPARENT, port 0) or the configured one.
 * On error WHY says what failed. */
int stp_tp_bind_source(int fd, const struct stp_upstream_cfg *up,
                       const struct sockaddr *client, const char **why);

/* Does CFG need CAP_NET_ADMIN (transparent listeners, source = client)?
 * The key that does, as "FILE:LINE: KEY", into WHAT. */
bool stp_tp_needs_caps(const struct stp_config *cfg, char *what, size_t n);
/* Is CAP_NET_ADMIN (or CAP_NET_RAW, enough for IP_TRANSPARENT) in our
 * effective set? */
bool stp_tp_have_caps(void);
/* Around setuid(): keep the permitted set (PR_SET_KEEPCAPS), then make
 * CAP_NET_ADMIN and CAP_NET_RAW, those of them we had, effective again and
 * drop every other capability. */
int stp_tp_keep_caps(void);
int stp_tp_restore_caps(void);

#endif
