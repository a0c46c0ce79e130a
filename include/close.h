/* Why a session ended: one list for the protocol engine's reasons and the
 * relay's, named in one table (the disconnect log line; metrics labels). */
#ifndef STP_CLOSE_H
#define STP_CLOSE_H

enum stp_close_reason {
    STP_CLOSE_NONE = 0,        /* not decided yet */
    /* the engine's */
    STP_CLOSE_QUIT,            /* client said QUIT and got the reply */
    STP_CLOSE_UPSTREAM_421,    /* upstream said 421 */
    STP_CLOSE_UPSTREAM_LOST,   /* upstream EOF/error: we sent 421 4.4.2 */
    STP_CLOSE_UPSTREAM_PROTO,  /* upstream broke the protocol: 421 4.4.2 */
    STP_CLOSE_TIMEOUT,         /* idle: we sent 421 4.4.2 */
    STP_CLOSE_SMUGGLE,         /* ambiguous end of data: 554, upstream cut */
    STP_CLOSE_CLIENT_EOF,      /* the client sent its last byte */
    STP_CLOSE_NEXT_HOP,        /* upstream TLS or identity setup failed */
    STP_CLOSE_ERRORS,          /* max_errors consecutive errors: 421 */
    STP_CLOSE_SHUTDOWN,        /* the proxy is stopping: 421 */
    STP_CLOSE_LIMIT,           /* over a connection limit: 421 */
    /* the relay's */
    STP_CLOSE_CLIENT_ERROR,    /* reading from the client failed */
    STP_CLOSE_WRITE_ERROR,     /* writing to either side failed */
    STP_CLOSE_TLS_INIT,        /* no TLS object for the client */
    STP_CLOSE_TLS_HANDSHAKE,   /* the client's handshake failed */
    STP_CLOSE_HANDSHAKE_TIMEOUT,
    STP_CLOSE_IDLE_TIMEOUT,
    STP_CLOSE_COMMAND_TIMEOUT,
    STP_CLOSE_DATA_TIMEOUT,
    STP_CLOSE_UPSTREAM_TIMEOUT,    /* no reply within timeout_reply */
    STP_CLOSE_UPSTREAM_UNREACHABLE,
    STP_CLOSE_UPSTREAM_CONNECT_TIMEOUT,
    STP_CLOSE_UPSTREAM_GREETING_TIMEOUT,
    STP_CLOSE_MAX_CONNECTIONS,     /* the proxy's limit */
    STP_CLOSE_LISTENER_MAX_CONNECTIONS,
    STP_CLOSE_MAX_CONNECTIONS_PER_IP,
    /* a listener's PROXY protocol: closed without a byte */
    STP_CLOSE_PROXY_HEADER_INVALID,  /* malformed, or ended before it did */
    STP_CLOSE_PROXY_HEADER_TIMEOUT,  /* none within timeout_proxy_header */
    STP_CLOSE_PROXY_NOT_ALLOWED,     /* peer not in proxy_protocol_from */
    /* address = original-destination named one of our own listeners */
    STP_CLOSE_LOOP,
    STP_CLOSE_NOT_ALLOWED,         /* client not in the listener's allow */
    STP_CLOSE_COUNT
};

/* "quit", "client_eof", ...; "unknown" for NONE. */
const char *stp_close_reason_name(enum stp_close_reason r);

#endif
