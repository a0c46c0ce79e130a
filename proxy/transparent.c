/* Transparent proxying on Linux: IP_TRANSPARENT sockets, the original
 * destination of an intercepted connection, the upstream's source address
 * and the capabilities these need. Nothing else in the proxy knows these
 * socket options. */
#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <linux/capability.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "listener.h"
#include "transparent.h"

/* <linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h> clash
 * with <netinet/in.h>; both options are 80. */
#ifndef SO_ORIGINAL_DST
#define SO_ORIGINAL_DST 80
#endif
#ifndef IP6T_SO_ORIGINAL_DST
#define IP6T_SO_ORIGINAL_DST 80
#endif

/* IPv4 reached through a dual-stack socket, as the IPv4 address it is. */
static void unmap(struct sockaddr_storage *ss)
{
    const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
    if (ss->ss_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr))
        return;
    struct sockaddr_in s4 = {.sin_family = AF_INET, .sin_port = s6->sin6_port};
    memcpy(&s4.sin_addr, &s6->sin6_addr.s6_addr[12], 4);
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, &s4, sizeof(s4));
}

static socklen_t addr_len(int family)
{
    return family == AF_INET ? sizeof(struct sockaddr_in)
                             : sizeof(struct sockaddr_in6);
}

/* 0, or -errno with errno set (callers chain it with other calls). */
static int set_transparent(int fd, int family)
{
    int one = 1;
    int r = family == AF_INET6
                ? setsockopt(fd, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof(one))
                : setsockopt(fd, SOL_IP, IP_TRANSPARENT, &one, sizeof(one));
    return r < 0 ? -errno : 0;
}

int stp_tp_listen_opt(int fd, int family)
{
    /* A dual-stack socket takes IPv4 too: both options then. */
    int r = set_transparent(fd, family);
    if (r == 0 && family == AF_INET6)
        r = set_transparent(fd, AF_INET);
    return r;
}

int stp_tp_original_dst(int fd, bool transparent, struct sockaddr_storage *out)
{
    struct sockaddr_storage local;
    socklen_t len = sizeof(local);
    memset(&local, 0, sizeof(local));
    if (getsockname(fd, (struct sockaddr *)&local, &len) < 0)
        return -errno;
    unmap(&local);
    if (transparent) {
        /* TPROXY delivers without rewriting: the socket is bound to the
         * address the client was going to. */
        *out = local;
        return 0;
    }
    /* Conntrack has the tuple before REDIRECT/DNAT rewrote it; an IPv4
     * connection on a dual-stack socket is asked at the IPv4 level. */
    memset(out, 0, sizeof(*out));
    len = sizeof(*out);
    int r = local.ss_family == AF_INET
                ? getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, out, &len)
                : getsockopt(fd, SOL_IPV6, IP6T_SO_ORIGINAL_DST, out, &len);
    if (r < 0)
        return -errno;
    unmap(out);
    return 0;
}

static bool is_any(const struct sockaddr_storage *a)
{
    static const struct in6_addr any6 = IN6ADDR_ANY_INIT;
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr == INADDR_ANY;
    return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr, &any6,
                  sizeof(any6)) == 0;
}

/* Does a local interface have A (the wildcard and loopback count)? Asked
 * of the interfaces, not by a trial bind(), which net.ipv4.ip_nonlocal_bind
 * would let succeed for any address. */
static bool is_local(const struct sockaddr_storage *a)
{
    if (is_any(a))
        return true;
    if (a->ss_family == AF_INET &&
        (ntohl(((const struct sockaddr_in *)a)->sin_addr.s_addr) >> 24) == 127)
        return true;
    struct ifaddrs *ifs;
    if (getifaddrs(&ifs) < 0)
        return true; /* unknown: a refused loop beats a loop */
    bool found = false;
    for (struct ifaddrs *i = ifs; i && !found; i = i->ifa_next) {
        const struct sockaddr *s = i->ifa_addr;
        if (!s || s->sa_family != a->ss_family)
            continue;
        if (s->sa_family == AF_INET)
            found = ((const struct sockaddr_in *)s)->sin_addr.s_addr ==
                    ((const struct sockaddr_in *)a)->sin_addr.s_addr;
        else
            found = memcmp(&((const struct sockaddr_in6 *)s)->sin6_addr,
                           &((const struct sockaddr_in6 *)a)->sin6_addr,
                           sizeof(struct in6_addr)) == 0;
    }
    freeifaddrs(ifs);
    return found;
}

bool stp_tp_is_own(const struct stp_server *srv,
                   const struct sockaddr_storage *dst)
{
    struct sockaddr_storage d = *dst;
    unmap(&d);
    for (const struct stp_listener *l = srv->listeners; l; l = l->next) {
        if (l->idx < 0)
            continue;
        struct sockaddr_storage b = l->bound;
        unmap(&b);
        if (stp_addr_port(&b) != stp_addr_port(&d))
            continue;
        if (stp_same_addr(&b, &d))
            return true;
        /* [::] listens on IPv4 too (the sockets are dual-stack). */
        if (is_any(&b) &&
            (b.ss_family == d.ss_family || b.ss_family == AF_INET6) &&
            is_local(&d))
            return true;
    }
    return false;
}

int stp_tp_bind_source(int fd, const struct stp_upstream_cfg *up,
                       const struct sockaddr *client, const char **why)
{
    if (up->source == STP_SRC_NONE)
        return 0;
    struct sockaddr_storage src;
    memset(&src, 0, sizeof(src));
    int family;
    socklen_t flen = sizeof(family);
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &family, &flen) < 0) {
        *why = "cannot read the upstream socket's family";
        return -errno;
    }
    if (up->source == STP_SRC_ADDRESS) {
        src = up->source_addr;
    } else {
        if (!client || (client->sa_family != AF_INET &&
                        client->sa_family != AF_INET6)) {
            *why = "source = client: the client's address is unknown";
            return -EINVAL;
        }
        memcpy(&src, client, addr_len(client->sa_family));
        unmap(&src);
        if (src.ss_family == AF_INET)
            ((struct sockaddr_in *)&src)->sin_port = 0;
        else
            ((struct sockaddr_in6 *)&src)->sin6_port = 0;
    }
    if (src.ss_family != family) {
        *why = up->source == STP_SRC_CLIENT
                   ? "source = client: the client's address family is not "
                     "the upstream's"
                   : "source address family is not the upstream's";
        return -EAFNOSUPPORT;
    }
    /* A foreign address needs IP_TRANSPARENT; the replies reach us only if
     * the routes send them back through this host. */
    int r;
    if (up->source == STP_SRC_CLIENT && (r = set_transparent(fd, family)) < 0) {
        *why = "source = client: IP_TRANSPARENT refused (CAP_NET_ADMIN?)";
        return r;
    }
    if (bind(fd, (struct sockaddr *)&src, addr_len(family)) < 0) {
        *why = up->source == STP_SRC_CLIENT
                   ? "source = client: cannot bind to the client's address"
                   : "cannot bind to the source address";
        return -errno;
    }
    return 0;
}

/* ---- capabilities ---------------------------------------------------------- */

#define NET_CAPS ((1u << CAP_NET_ADMIN) | (1u << CAP_NET_RAW))

bool stp_tp_needs_caps(const struct stp_config *cfg, char *what, size_t n)
{
    for (int i = 0; i < cfg->n_listeners; i++) {
        const struct stp_listener_cfg *l = &cfg->listeners[i];
        if (l->transparent) {
            snprintf(what, n, "%s:%d: transparent = yes (listener '%s')",
                     cfg->path, l->line_transparent, l->name);
            return true;
        }
    }
    for (int i = 0; i < cfg->n_upstreams; i++) {
        const struct stp_upstream_cfg *u = &cfg->upstreams[i];
        if (u->source == STP_SRC_CLIENT) {
            snprintf(what, n, "%s:%d: source = client (upstream '%s')",
                     cfg->path, u->line_source, u->name);
            return true;
        }
    }
    return false;
}

static int caps_get(struct __user_cap_data_struct d[2])
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    return syscall(SYS_capget, &h, d) < 0 ? -errno : 0;
}

bool stp_tp_have_caps(void)
{
    struct __user_cap_data_struct d[2];
    return caps_get(d) == 0 && (d[0].effective & NET_CAPS) != 0;
}

int stp_tp_keep_caps(void)
{
    return prctl(PR_SET_KEEPCAPS, 1L, 0L, 0L, 0L) < 0 ? -errno : 0;
}

int stp_tp_restore_caps(void)
{
    struct __user_cap_data_struct d[2];
    int r = caps_get(d);
    if (r < 0)
        return r;
    uint32_t keep = d[0].permitted & NET_CAPS;
    memset(d, 0, sizeof(d));
    d[0].permitted = d[0].effective = keep;
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    if (syscall(SYS_capset, &h, d) < 0)
        return -errno;
    prctl(PR_SET_KEEPCAPS, 0L, 0L, 0L, 0L);
    return keep ? 0 : -EPERM;
}
