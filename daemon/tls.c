/*
 * tls — client contexts, connections and the verdict on certificates.
 *
 * The handshake itself runs with SSL_VERIFY_NONE: OpenSSL still builds and
 * checks the chain and the name (SSL_set1_host) and keeps the result, and
 * tls_check_peer() reads it before the session sends a single byte. That
 * way a refused certificate can be described in full to the operator.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdbool.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509v3.h>

#include "popfetchd/tls.h"
#include "popfetchd/util.h"

/*
 * A context holds nothing of one configuration but its parameters, so the
 * configurations with the same ones share it (a daemon with a thousand
 * mailboxes on one server has one, not a thousand of ~19 KB each). A CA
 * file replaced on disk with other certificates (a reload after it was
 * replaced) makes a new one; one rewritten with the same bytes, as
 * update-ca-certificates and configuration management do, does not: loading
 * a bundle again on every reload leaves up to ~1 MB of the heap fragmented for
 * each. Without a CA file, the system's default bundle is that file.
 */
struct tls_ctx {
	SSL_CTX *ssl_ctx;
	bool verify;
	bool has_fingerprint;
	unsigned char fingerprint[32];
	char *ca_file; /* NULL: the system store */
	struct stat ca_st;
	bool has_digest;
	unsigned char ca_digest[32]; /* SHA-256 of the CA file's bytes when loaded */
	unsigned refs;
	struct tls_ctx *next; /* the contexts in use */
};

static struct tls_ctx *contexts;

static bool
same_file(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
	       a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec &&
	       a->st_ctim.tv_sec == b->st_ctim.tv_sec && a->st_ctim.tv_nsec == b->st_ctim.tv_nsec;
}

/* SHA-256 of the file's bytes; -1 when it cannot be read. */
static int
file_digest(const char *path, unsigned char md[32])
{
	FILE *f = fopen(path, "re");
	EVP_MD_CTX *mdctx = EVP_MD_CTX_new();
	unsigned char buf[16384];
	size_t n;
	bool ok = f != NULL && mdctx != NULL && EVP_DigestInit_ex(mdctx, EVP_sha256(), NULL) == 1;

	while (ok && (n = fread(buf, 1, sizeof(buf), f)) > 0)
		ok = EVP_DigestUpdate(mdctx, buf, n) == 1;
	ok = ok && !ferror(f) && EVP_DigestFinal_ex(mdctx, md, NULL) == 1;
	EVP_MD_CTX_free(mdctx);
	if (f != NULL)
		fclose(f);
	return ok ? 0 : -1;
}

static bool
same_params(const struct tls_ctx *c, const struct tls_params *p)
{
	if (c->verify != p->verify || c->has_fingerprint != p->has_fingerprint ||
	    (p->has_fingerprint &&
	     memcmp(c->fingerprint, p->fingerprint, sizeof(c->fingerprint)) != 0))
		return false;
	if ((c->ca_file == NULL) != (p->ca_file == NULL))
		return false;
	return p->ca_file == NULL || strcmp(c->ca_file, p->ca_file) == 0;
}

/*
 * A context in use with these parameters and the same CA file: unchanged on
 * disk (ca_st), or else with the same bytes, then known by its new ca_st.
 */
static struct tls_ctx *
find_shared(const struct tls_params *p, const char *path, const struct stat *ca_st)
{
	unsigned char md[32];
	int have_md = 0; /* 1: md read, -1: the file cannot be read */

	for (struct tls_ctx *c = contexts; c != NULL; c = c->next) {
		if (!same_params(c, p))
			continue;
		if (same_file(&c->ca_st, ca_st))
			return c;
		if (!c->has_digest || ca_st->st_ino == 0)
			continue;
		if (have_md == 0)
			have_md = file_digest(path, md) == 0 ? 1 : -1;
		if (have_md == 1 && memcmp(md, c->ca_digest, sizeof(md)) == 0) {
			c->ca_st = *ca_st;
			return c;
		}
	}
	return NULL;
}

/* The OpenSSL error queue (or errno) in words, emptied. */
static void
tls_error_string(unsigned long first, char *buf, size_t len)
{
	unsigned long e = first ? first : ERR_get_error();

	if (e == 0) {
		snprintf(buf, len, "%s", errno ? strerror(errno) : "the connection ended");
		return;
	}
	ERR_error_string_n(e, buf, len);
	ERR_clear_error();
}

int
tls_ctx_new(const struct tls_params *p, struct tls_ctx **ret, char *err, size_t errlen)
{
	const char *path = p->ca_file ? p->ca_file : X509_get_default_cert_file();
	struct tls_ctx *ctx;
	struct stat ca_st = {0};
	char why[256];

	if (stat(path, &ca_st) < 0)
		memset(&ca_st, 0, sizeof(ca_st)); /* none: compared as such */
	if (p->ca_file == NULL || ca_st.st_ino != 0) {
		if ((ctx = find_shared(p, path, &ca_st)) != NULL) {
			ctx->refs++;
			*ret = ctx;
			return 0;
		}
	}
	ctx = xcalloc(1, sizeof(*ctx));
	ctx->refs = 1;
	/* the bytes before OpenSSL reads them: a change after the stat shows in the next one */
	ctx->ca_st = ca_st;
	ctx->has_digest = ca_st.st_ino != 0 && file_digest(path, ctx->ca_digest) == 0;
	ctx->ca_file = p->ca_file ? xstrdup(p->ca_file) : NULL;
	ctx->ssl_ctx = SSL_CTX_new(TLS_client_method());
	if (ctx->ssl_ctx == NULL)
		abort();
	SSL_CTX_set_min_proto_version(ctx->ssl_ctx, TLS1_2_VERSION);
	SSL_CTX_set_verify(ctx->ssl_ctx, SSL_VERIFY_NONE, NULL);
	SSL_CTX_set_mode(ctx->ssl_ctx, SSL_MODE_RELEASE_BUFFERS);
	ctx->verify = p->verify;
	ctx->has_fingerprint = p->has_fingerprint;
	memcpy(ctx->fingerprint, p->fingerprint, sizeof(ctx->fingerprint));
	ERR_clear_error();
	if (p->ca_file != NULL) {
		if (SSL_CTX_load_verify_locations(ctx->ssl_ctx, p->ca_file, NULL) != 1) {
			tls_error_string(0, why, sizeof(why));
			snprintf(err, errlen, "tls_ca_file: cannot load %s: %s", p->ca_file, why);
			tls_ctx_free(ctx);
			return -EINVAL;
		}
	} else if (SSL_CTX_set_default_verify_paths(ctx->ssl_ctx) != 1) {
		tls_error_string(0, why, sizeof(why));
		snprintf(err, errlen, "cannot load the system trust store: %s", why);
		tls_ctx_free(ctx);
		return -EINVAL;
	}
	ctx->next = contexts;
	contexts = ctx;
	*ret = ctx;
	return 0;
}

void
tls_ctx_free(struct tls_ctx *ctx)
{
	if (ctx == NULL || --ctx->refs > 0)
		return;
	for (struct tls_ctx **pp = &contexts; *pp != NULL; pp = &(*pp)->next)
		if (*pp == ctx) {
			*pp = ctx->next;
			break;
		}
	SSL_CTX_free(ctx->ssl_ctx);
	free(ctx->ca_file);
	free(ctx);
}

static bool
is_ip_literal(const char *host)
{
	unsigned char buf[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

SSL *
tls_ssl_new(struct tls_ctx *ctx, const char *host)
{
	SSL *ssl = SSL_new(ctx->ssl_ctx);

	if (ssl == NULL)
		abort();
	if (is_ip_literal(host)) {
		/* no SNI for an address (RFC 6066); check the address instead */
		X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host);
	} else {
		SSL_set_tlsext_host_name(ssl, host);
		SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
		SSL_set1_host(ssl, host);
	}
	return ssl;
}

static void
fingerprint_hex(const unsigned char *md, char *out)
{
	for (int i = 0; i < 32; i++)
		sprintf(out + 3 * i, "%02X%s", md[i], i < 31 ? ":" : "");
}

static void
name_line(X509_NAME *name, char *buf, size_t len)
{
	BIO *b = BIO_new(BIO_s_mem());
	long n;
	char *data;

	X509_NAME_print_ex(b, name, 0, XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
	n = BIO_get_mem_data(b, &data);
	/* the server chose these names: escaped like all outside text */
	util_printable(data, n > 0 ? (size_t)n : 0, buf, len);
	BIO_free(b);
}

static void
time_line(const ASN1_TIME *t, char *buf, size_t len)
{
	BIO *b = BIO_new(BIO_s_mem());
	long n;
	char *data;

	ASN1_TIME_print(b, t);
	n = BIO_get_mem_data(b, &data);
	snprintf(buf, len, "%.*s", (int)(n > 0 ? n : 0), data);
	BIO_free(b);
}

static void
describe_cert(X509 *cert, char *buf, size_t len)
{
	char subject[256], issuer[256], from[64], until[64], fp[3 * 32];
	unsigned char md[32];
	unsigned int mdlen = 0;

	if (cert == NULL) {
		snprintf(buf, len, "no certificate");
		return;
	}
	name_line(X509_get_subject_name(cert), subject, sizeof(subject));
	name_line(X509_get_issuer_name(cert), issuer, sizeof(issuer));
	time_line(X509_get0_notBefore(cert), from, sizeof(from));
	time_line(X509_get0_notAfter(cert), until, sizeof(until));
	X509_digest(cert, EVP_sha256(), md, &mdlen);
	fingerprint_hex(md, fp);
	snprintf(buf, len, "subject %s, issuer %s, valid from %s until %s, SHA-256 %s", subject,
		 issuer, from, until, fp);
}

/* RFC 3339 in UTC, or "" for a time OpenSSL cannot read. */
static void
time_rfc3339(const ASN1_TIME *t, char *buf, size_t len)
{
	struct tm tm;

	if (t == NULL || ASN1_TIME_to_tm(t, &tm) != 1 ||
	    strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
		buf[0] = '\0';
}

void
tls_peer(SSL *ssl, struct tls_peer *ret)
{
	X509 *cert = SSL_get0_peer_certificate(ssl);
	long result = SSL_get_verify_result(ssl);
	unsigned char md[32];
	unsigned int mdlen = 0;

	memset(ret, 0, sizeof(*ret));
	if (SSL_is_init_finished(ssl)) {
		snprintf(ret->protocol, sizeof(ret->protocol), "%s", SSL_get_version(ssl));
		snprintf(ret->cipher, sizeof(ret->cipher), "%s",
			 SSL_get_cipher_name(ssl) ? SSL_get_cipher_name(ssl) : "");
	}
	ret->chain_ok = cert != NULL && result == X509_V_OK;
	ret->chain_verdict =
		cert == NULL ? "no certificate" : X509_verify_cert_error_string(result);
	if (cert == NULL)
		return;
	ret->has_cert = true;
	name_line(X509_get_subject_name(cert), ret->subject, sizeof(ret->subject));
	name_line(X509_get_issuer_name(cert), ret->issuer, sizeof(ret->issuer));
	time_rfc3339(X509_get0_notBefore(cert), ret->not_before, sizeof(ret->not_before));
	time_rfc3339(X509_get0_notAfter(cert), ret->not_after, sizeof(ret->not_after));
	ret->expired = X509_cmp_current_time(X509_get0_notAfter(cert)) < 0;
	if (X509_digest(cert, EVP_sha256(), md, &mdlen) == 1 && mdlen == 32)
		fingerprint_hex(md, ret->sha256);
}

time_t
tls_peer_not_after(SSL *ssl)
{
	X509 *cert = SSL_get0_peer_certificate(ssl);
	struct tm tm;

	if (cert == NULL || ASN1_TIME_to_tm(X509_get0_notAfter(cert), &tm) != 1)
		return 0;
	return timegm(&tm);
}

void
tls_describe(SSL *ssl, char *buf, size_t len)
{
	snprintf(buf, len, "%s %s", SSL_get_version(ssl), SSL_get_cipher_name(ssl));
}

int
tls_check_peer(const struct tls_ctx *ctx, SSL *ssl, const char *host, char *err, size_t errlen)
{
	X509 *cert = SSL_get0_peer_certificate(ssl);
	char presented[1024], want[3 * 32];
	unsigned char md[32];
	unsigned int mdlen = 0;
	long result;

	describe_cert(cert, presented, sizeof(presented));
	if (cert == NULL) {
		snprintf(err, errlen, "the server presented no certificate");
		return -1;
	}
	if (ctx->has_fingerprint) {
		X509_digest(cert, EVP_sha256(), md, &mdlen);
		if (mdlen == 32 && CRYPTO_memcmp(md, ctx->fingerprint, 32) == 0)
			return 0;
		fingerprint_hex(ctx->fingerprint, want);
		snprintf(err, errlen,
			 "the certificate does not match tls_fingerprint sha256:%s; presented: %s",
			 want, presented);
		return -1;
	}
	if (!ctx->verify)
		return 0;
	result = SSL_get_verify_result(ssl);
	if (result == X509_V_OK)
		return 0;
	if (result == X509_V_ERR_HOSTNAME_MISMATCH || result == X509_V_ERR_IP_ADDRESS_MISMATCH)
		snprintf(err, errlen,
			 "certificate verification failed: the certificate is not for %s; "
			 "presented: %s",
			 host, presented);
	else
		snprintf(err, errlen,
			 "certificate verification failed: %s (expected a certificate for %s "
			 "from a trusted CA); presented: %s",
			 X509_verify_cert_error_string(result), host, presented);
	return -1;
}

static char *
b64(const unsigned char *data, size_t len)
{
	char *out = xmalloc(4 * ((len + 2) / 3) + 1);

	EVP_EncodeBlock((unsigned char *)out, data, (int)len);
	return out;
}

void
tls_channel_binding(SSL *ssl, char **ret_unique, char **ret_exporter)
{
	static const char label[] = "EXPORTER-Channel-Binding";
	unsigned char buf[64];
	size_t n;

	*ret_unique = *ret_exporter = NULL;
	if (SSL_version(ssl) >= TLS1_3_VERSION) {
		if (SSL_export_keying_material(ssl, buf, 32, label, strlen(label), NULL, 0, 0) == 1)
			*ret_exporter = b64(buf, 32);
		return;
	}
	/* tls-unique: the first Finished of the handshake, ours (no resumption) */
	n = SSL_get_finished(ssl, buf, sizeof(buf));
	if (n > 0 && n <= sizeof(buf))
		*ret_unique = b64(buf, n);
}
