/* Unit tests: TLS contexts shared by configurations with equal parameters. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "check.h"
#include "popfetchd/tls.h"

static char root[] = "/tmp/pfd-tls-XXXXXX";

/* A self-signed CA certificate in PEM at path. */
static void
write_ca(const char *path, const char *cn)
{
	EVP_PKEY *key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
	X509 *x = X509_new();
	X509_NAME *name;
	FILE *f;

	if (key == NULL || x == NULL)
		abort();
	X509_set_version(x, 2);
	ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
	X509_gmtime_adj(X509_getm_notBefore(x), 0);
	X509_gmtime_adj(X509_getm_notAfter(x), 86400);
	X509_set_pubkey(x, key);
	name = X509_get_subject_name(x);
	X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
	X509_set_issuer_name(x, name);
	if (X509_sign(x, key, EVP_sha256()) == 0)
		abort();
	f = fopen(path, "w");
	if (f == NULL || PEM_write_X509(f, x) != 1)
		abort();
	fclose(f);
	X509_free(x);
	EVP_PKEY_free(key);
}

/* A copy of from at to, byte for byte. */
static void
copy_file(const char *from, const char *to)
{
	FILE *in = fopen(from, "r"), *out = fopen(to, "w");
	char buf[4096];
	size_t n;

	if (in == NULL || out == NULL)
		abort();
	while ((n = fread(buf, 1, sizeof(buf), in)) > 0)
		if (fwrite(buf, 1, n, out) != n)
			abort();
	fclose(in);
	if (fclose(out) != 0)
		abort();
}

int
main(void)
{
	char ca[300], ca2[300], bad[300], tmp[300], err[256];
	struct tls_ctx *a, *b, *c, *d, *e, *f, *g, *h, *i;

	if (mkdtemp(root) == NULL)
		return 2;
	snprintf(ca, sizeof(ca), "%s/ca.pem", root);
	snprintf(ca2, sizeof(ca2), "%s/other.pem", root);
	snprintf(bad, sizeof(bad), "%s/bad.pem", root);
	snprintf(tmp, sizeof(tmp), "%s/ca.pem.new", root);
	write_ca(ca, "one");
	write_ca(ca2, "two");
	FILE *fb = fopen(bad, "w");
	fputs("not a certificate\n", fb);
	fclose(fb);

	struct tls_params p = {.ca_file = ca, .verify = true};
	CHECK(tls_ctx_new(&p, &a, err, sizeof(err)) == 0);
	CHECK(tls_ctx_new(&p, &b, err, sizeof(err)) == 0);
	CHECK(a == b); /* one context for equal parameters */

	struct tls_params q = p;
	q.verify = false;
	CHECK(tls_ctx_new(&q, &c, err, sizeof(err)) == 0 && c != a);
	q = p;
	q.has_fingerprint = true;
	memset(q.fingerprint, 7, sizeof(q.fingerprint));
	CHECK(tls_ctx_new(&q, &d, err, sizeof(err)) == 0 && d != a && d != c);
	q = p;
	q.ca_file = ca2;
	CHECK(tls_ctx_new(&q, &e, err, sizeof(err)) == 0 && e != a);

	/* the CA file replaced on disk (as before a reload): a new context,
	 * while the old one still serves those who hold it */
	write_ca(tmp, "one, renewed");
	CHECK(rename(tmp, ca) == 0);
	CHECK(tls_ctx_new(&p, &f, err, sizeof(err)) == 0 && f != a);
	SSL *s = tls_ssl_new(a, "pop.example.com");
	CHECK(s != NULL);
	SSL_free(s);
	/* rewritten with the same bytes (a new inode and mtime, as
	 * update-ca-certificates does): the same context, nothing loaded again */
	copy_file(ca, tmp);
	CHECK(rename(tmp, ca) == 0);
	CHECK(tls_ctx_new(&p, &h, err, sizeof(err)) == 0 && h == f);
	write_ca(tmp, "one, renewed again");
	CHECK(rename(tmp, ca) == 0);
	CHECK(tls_ctx_new(&p, &i, err, sizeof(err)) == 0 && i != f && i != a);

	struct tls_params r = {.ca_file = bad, .verify = true};
	CHECK(tls_ctx_new(&r, &g, err, sizeof(err)) == -EINVAL && strstr(err, bad) != NULL);
	struct tls_params none = {.ca_file = NULL, .verify = true};
	struct tls_ctx *s1, *s2;
	CHECK(tls_ctx_new(&none, &s1, err, sizeof(err)) == 0);
	CHECK(tls_ctx_new(&none, &s2, err, sizeof(err)) == 0 && s1 == s2 && s1 != a);

	tls_ctx_free(a);
	s = tls_ssl_new(b, "pop.example.com"); /* b (== a) still held */
	CHECK(s != NULL);
	SSL_free(s);
	tls_ctx_free(b);
	tls_ctx_free(c);
	tls_ctx_free(d);
	tls_ctx_free(e);
	tls_ctx_free(f);
	tls_ctx_free(h);
	tls_ctx_free(i);
	tls_ctx_free(s1);
	tls_ctx_free(s2);
	tls_ctx_free(NULL);

	char cmd[400];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", root);
	if (system(cmd) != 0)
		return 2;
	CHECK_DONE();
}
