/* Telling the upstream who the client is: PROXY protocol headers (v1 text,
 * v2 binary with TLS TLVs) and the XCLIENT command. Pure functions. */
#ifndef STP_IDENTITY_H
#define STP_IDENTITY_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/socket.h>

/* What the client's TLS looked like, for PROXY v2 (NULL fields: unknown). */
struct stp_tls_info {
    const char *version;  /* "TLSv1.3" */
    const char *cipher;
    const char *sni;      /* server name the client asked for */
    const char *cn;       /* client certificate subject */
    bool cert_verified;   /* a client certificate was presented and verified */
    bool cert_resumed;    /* ... in the full handshake of a resumed session */
};

/* Each returns the header length written into BUF, or -ENOSPC/-EAFNOSUPPORT.
 * SRC is the client, DST the address it connected to. */
int stp_proxy_v1(char *buf, size_t cap, const struct sockaddr *src,
                 const struct sockaddr *dst);
int stp_proxy_v2(char *buf, size_t cap, const struct sockaddr *src,
                 const struct sockaddr *dst, const struct stp_tls_info *tls);

/* "XCLIENT ADDR=... PORT=... NAME=[UNAVAILABLE]" without CRLF; values are
 * xtext-encoded (RFC 3461). */
int stp_xclient_line(char *buf, size_t cap, const struct sockaddr *src);

/* RFC 3461 xtext: '+', '=' and bytes outside '!'..'~' become "+HH". */
int stp_xtext(char *buf, size_t cap, const char *s);

#endif
