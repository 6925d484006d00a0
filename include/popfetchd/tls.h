/*
 * tls — the TLS client side: one context per configuration (trust anchors,
 * TLS 1.2 minimum, verification or a pinned fingerprint), a connection
 * object per session with SNI and the name to check, and the verdict on
 * the certificate a server presented. Knows no POP3 command.
 */
#ifndef POPFETCHD_TLS_H
#define POPFETCHD_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include <openssl/ssl.h>

struct tls_ctx;

struct tls_params {
	const char *ca_file; /* NULL: the system store */
	bool verify;	     /* false: any certificate is accepted */
	bool has_fingerprint;
	unsigned char fingerprint[32]; /* SHA-256 of the leaf certificate (DER) */
};

/* The context for a configuration (and again on reload): one shared by
 * every configuration with the same parameters while the CA file holds the
 * same bytes; each tls_ctx_new needs its tls_ctx_free. -EINVAL with a line
 * in err when the trust anchors cannot be loaded. */
int tls_ctx_new(const struct tls_params *p, struct tls_ctx **ret, char *err, size_t errlen);
void tls_ctx_free(struct tls_ctx *ctx);

/* A client connection for host: SNI for a name, the name (or IP) to check. */
SSL *tls_ssl_new(struct tls_ctx *ctx, const char *host);

/*
 * After the handshake, before anything is sent: 0 when the server's
 * certificate is acceptable; -1 with a line in err that names what was
 * expected and what was presented (subject, issuer, validity, SHA-256).
 */
int tls_check_peer(const struct tls_ctx *ctx, SSL *ssl, const char *host, char *err, size_t errlen);

/* "TLSv1.3 TLS_AES_256_GCM_SHA384" and the like, for debug and test lines. */
void tls_describe(SSL *ssl, char *buf, size_t len);

/* The handshake and the presented certificate in pieces, for the test
 * command and its JSON. */
struct tls_peer {
	char protocol[16]; /* "TLSv1.3"; "" when the handshake did not finish */
	char cipher[64];   /* "TLS_AES_256_GCM_SHA384"; "" likewise */
	bool has_cert;	   /* the rest is "" without a certificate */
	char subject[256]; /* RFC 2253 */
	char issuer[256];
	char not_before[24]; /* RFC 3339, UTC: "2036-11-26T10:15:02Z" */
	char not_after[24];
	bool expired;	     /* now is past not_after */
	char sha256[3 * 32]; /* "AB:CD:..." of the certificate (DER) */
	/* OpenSSL's verdict on the chain and the name, whatever the
	 * configuration makes of it: "ok", or why not */
	bool chain_ok;
	const char *chain_verdict;
};
void tls_peer(SSL *ssl, struct tls_peer *ret);
/* The presented certificate's notAfter (UTC, seconds since the epoch); 0
 * without a certificate or when OpenSSL cannot read the time. */
time_t tls_peer_not_after(SSL *ssl);

/* Channel bindings for SCRAM-*-PLUS, base64, malloc'd: tls-unique under
 * TLS 1.2, tls-exporter (RFC 9266) under TLS 1.3; the other one NULL. */
void tls_channel_binding(SSL *ssl, char **ret_unique, char **ret_exporter);

#endif
