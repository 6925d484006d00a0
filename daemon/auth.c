/*
 * auth — login mechanisms as challenge/response steps. GNU SASL does the
 * SCRAM, CRAM-MD5, PLAIN and LOGIN arithmetic; XOAUTH2 and OAUTHBEARER are
 * a single message each and are built here. Secrets are wiped on free.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <gsasl.h>
#include <openssl/evp.h>

#include "popfetchd/auth.h"
#include "popfetchd/util.h"

struct auth {
	char *mech;
	Gsasl_session *sasl; /* NULL for XOAUTH2 / OAUTHBEARER */
	char *oauth_message; /* the one message of XOAUTH2 / OAUTHBEARER */
	bool sent;	     /* that message went out */
	bool rejected;	     /* the server answered it with an error challenge */
	bool complete;	     /* our side is over (GSASL_OK): for SCRAM, the server proved itself */
	struct auth_scram_cache *cache; /* SCRAM: NULL when none */
	bool from_cache;		/* the salted password came from it */
	char error[96];			/* why a step failed, when not the proof */
};

/* One salted password and what it was computed from; all NULL when empty. */
struct auth_scram_cache {
	Gsasl_hash hash;
	char *salt;   /* base64, as the server sent it */
	char *iter;   /* the iteration count, decimal as GNU SASL prints it */
	char *salted; /* hex */
};

static Gsasl *gsasl_ctx;

static const char *const gsasl_mechs[] = {
	"SCRAM-SHA-256-PLUS",
	"SCRAM-SHA-256",
	"SCRAM-SHA-1-PLUS",
	"SCRAM-SHA-1",
	"CRAM-MD5",
	"PLAIN",
	"LOGIN",
	NULL,
};

static bool
in_list(const char *const *list, const char *mech)
{
	for (; *list != NULL; list++)
		if (strcasecmp(*list, mech) == 0)
			return true;
	return false;
}

static bool
is_oauth(const char *mech)
{
	return strcasecmp(mech, "XOAUTH2") == 0 || strcasecmp(mech, "OAUTHBEARER") == 0;
}

bool
auth_supported(const char *mech)
{
	return in_list(gsasl_mechs, mech) || is_oauth(mech) || strcasecmp(mech, "APOP") == 0 ||
	       strcasecmp(mech, "USER") == 0;
}

bool
auth_cleartext(const char *mech)
{
	return strcasecmp(mech, "PLAIN") == 0 || strcasecmp(mech, "LOGIN") == 0 ||
	       strcasecmp(mech, "USER") == 0;
}

bool
auth_client_first(const char *mech)
{
	return strcasecmp(mech, "LOGIN") != 0 && strcasecmp(mech, "CRAM-MD5") != 0;
}

bool
auth_needs_binding(const char *mech)
{
	size_t n = strlen(mech);

	return n > 5 && strcasecmp(mech + n - 5, "-PLUS") == 0;
}

static bool
is_scram(const char *mech)
{
	return strncasecmp(mech, "SCRAM-", 6) == 0;
}

static Gsasl_hash
scram_hash(const char *mech)
{
	return strncasecmp(mech, "SCRAM-SHA-1", 11) == 0 ? GSASL_HASH_SHA1 : GSASL_HASH_SHA256;
}

static void
forget_secret(char **p)
{
	if (*p != NULL) {
		explicit_bzero(*p, strlen(*p));
		free(*p);
		*p = NULL;
	}
}

static void
cache_empty(struct auth_scram_cache *c)
{
	forget_secret(&c->salt);
	forget_secret(&c->iter);
	forget_secret(&c->salted);
}

struct auth_scram_cache *
auth_scram_cache_new(void)
{
	return xcalloc(1, sizeof(struct auth_scram_cache));
}

struct auth_scram_cache *
auth_scram_cache_dup(const struct auth_scram_cache *c)
{
	struct auth_scram_cache *d = auth_scram_cache_new();

	if (c->salted != NULL) {
		d->hash = c->hash;
		d->salt = xstrdup(c->salt);
		d->iter = xstrdup(c->iter);
		d->salted = xstrdup(c->salted);
	}
	return d;
}

void
auth_scram_cache_free(struct auth_scram_cache *c)
{
	if (c == NULL)
		return;
	cache_empty(c);
	free(c);
}

/* A login that succeeded: its salted password, salt and count for the next. */
static void
cache_store(struct auth *a)
{
	struct auth_scram_cache *c = a->cache;
	const char *salt, *iter, *salted;

	if (c == NULL || a->from_cache || a->sasl == NULL || !is_scram(a->mech))
		return;
	salt = gsasl_property_fast(a->sasl, GSASL_SCRAM_SALT);
	iter = gsasl_property_fast(a->sasl, GSASL_SCRAM_ITER);
	salted = gsasl_property_fast(a->sasl, GSASL_SCRAM_SALTED_PASSWORD);
	cache_empty(c);
	if (salt == NULL || iter == NULL || salted == NULL)
		return;
	c->hash = scram_hash(a->mech);
	c->salt = xstrdup(salt);
	c->iter = xstrdup(iter);
	c->salted = xstrdup(salted);
}

/* A login that failed: whatever the cache holds is not trusted again. */
static void
cache_drop(struct auth *a)
{
	if (a->cache != NULL && is_scram(a->mech))
		cache_empty(a->cache);
}

/*
 * SaltedPassword := PBKDF2(SASLprep(password), salt, i) (RFC 5802 §3), as
 * hex, with OpenSSL's digests: GNU SASL's own are three times slower (4 ms
 * for SCRAM-SHA-256's 4096 iterations), and a server that stores the
 * password in clear salts each login anew (Dovecot), so no cache helps.
 * On any failure GNU SASL computes it itself.
 */
static int
salt_password(struct auth *a, Gsasl_session *sctx, const char *salt64, const char *iter)
{
	const EVP_MD *md = scram_hash(a->mech) == GSASL_HASH_SHA1 ? EVP_sha1() : EVP_sha256();
	const char *password = gsasl_property_fast(sctx, GSASL_PASSWORD);
	unsigned char out[EVP_MAX_MD_SIZE];
	char *prepped = NULL, *salt = NULL, hex[2 * EVP_MAX_MD_SIZE + 1];
	size_t saltlen, len = (size_t)EVP_MD_get_size(md);
	unsigned long long n = iter != NULL ? strtoull(iter, NULL, 10) : 0;
	int rc = GSASL_NO_CALLBACK;

	if (password == NULL || salt64 == NULL || n == 0 || n > AUTH_SCRAM_ITER_MAX ||
	    gsasl_saslprep(password, GSASL_ALLOW_UNASSIGNED, &prepped, NULL) != GSASL_OK ||
	    gsasl_base64_from(salt64, strlen(salt64), &salt, &saltlen) != GSASL_OK)
		goto out;
	if (PKCS5_PBKDF2_HMAC(prepped, (int)strlen(prepped), (unsigned char *)salt, (int)saltlen,
			      (int)n, md, (int)len, out) == 1) {
		util_hex(out, len, hex);
		if (gsasl_property_set(sctx, GSASL_SCRAM_SALTED_PASSWORD, hex) == GSASL_OK)
			rc = GSASL_OK;
		explicit_bzero(hex, sizeof(hex));
	}
	explicit_bzero(out, sizeof(out));
out:
	if (prepped != NULL)
		explicit_bzero(prepped, strlen(prepped));
	gsasl_free(prepped);
	gsasl_free(salt);
	return rc;
}

/*
 * GNU SASL asks for the properties not set on the session. The SCRAM
 * client asks for GSASL_SCRAM_SALTED_PASSWORD once it has set the salt
 * and iteration count of the server-first message, and runs PBKDF2 on the
 * password when it gets none: it gets the cache's, or ours.
 */
static int
on_property(Gsasl *ctx, Gsasl_session *sctx, Gsasl_property prop)
{
	struct auth *a = gsasl_session_hook_get(sctx);
	const struct auth_scram_cache *c;
	const char *salt, *iter;

	(void)ctx;
	if (prop != GSASL_SCRAM_SALTED_PASSWORD || a == NULL)
		return GSASL_NO_CALLBACK;
	salt = gsasl_property_fast(sctx, GSASL_SCRAM_SALT);
	iter = gsasl_property_fast(sctx, GSASL_SCRAM_ITER);
	if (iter != NULL && strtoull(iter, NULL, 10) > AUTH_SCRAM_ITER_MAX) {
		snprintf(a->error, sizeof(a->error),
			 "the server asks for %.20s SCRAM iterations, more than %d: refused", iter,
			 AUTH_SCRAM_ITER_MAX);
		/* GNU SASL ignores what this returns and would run PBKDF2 from
		 * the password: without one the step fails (GSASL_NO_PASSWORD) */
		gsasl_property_set(sctx, GSASL_PASSWORD, NULL);
		return GSASL_NO_CALLBACK;
	}
	c = a->cache;
	if (c != NULL && c->salted != NULL && salt != NULL && iter != NULL &&
	    c->hash == scram_hash(a->mech) && strcmp(c->salt, salt) == 0 &&
	    strcmp(c->iter, iter) == 0 && gsasl_property_set(sctx, prop, c->salted) == GSASL_OK) {
		a->from_cache = true;
		return GSASL_OK;
	}
	return salt_password(a, sctx, salt, iter);
}

static char *
b64(const char *data, size_t len)
{
	char *out = xmalloc(4 * ((len + 2) / 3) + 1);

	EVP_EncodeBlock((unsigned char *)out, (const unsigned char *)data, (int)len);
	return out;
}

int
auth_start(const char *mech, const struct auth_params *p, struct auth **ret, char *err,
	   size_t errlen)
{
	struct auth *a;
	int rc;

	if (is_oauth(mech)) {
		char *msg;
		if (p->token == NULL) {
			snprintf(err, errlen, "%s needs an access token", mech);
			return -EINVAL;
		}
		if (strcasecmp(mech, "XOAUTH2") == 0)
			msg = xasprintf("user=%s\001auth=Bearer %s\001\001", p->user, p->token);
		else /* RFC 7628: gs2 header, then key=value pairs */
			msg = xasprintf("n,a=%s,\001auth=Bearer %s\001\001", p->user, p->token);
		a = xcalloc(1, sizeof(*a));
		a->mech = xstrdup(mech);
		a->oauth_message = b64(msg, strlen(msg));
		explicit_bzero(msg, strlen(msg));
		free(msg);
		*ret = a;
		return 0;
	}
	if (!in_list(gsasl_mechs, mech)) {
		snprintf(err, errlen, "%s is not a SASL mechanism this build knows", mech);
		return -EINVAL;
	}
	if (gsasl_ctx == NULL) {
		if ((rc = gsasl_init(&gsasl_ctx)) != GSASL_OK) {
			snprintf(err, errlen, "GNU SASL: %s", gsasl_strerror(rc));
			return -EINVAL;
		}
		gsasl_callback_set(gsasl_ctx, on_property);
	}
	a = xcalloc(1, sizeof(*a));
	a->mech = xstrdup(mech);
	if ((rc = gsasl_client_start(gsasl_ctx, mech, &a->sasl)) != GSASL_OK) {
		snprintf(err, errlen, "GNU SASL cannot start %s: %s", mech, gsasl_strerror(rc));
		auth_free(a);
		return -EINVAL;
	}
	gsasl_session_hook_set(a->sasl, a);
	a->cache = is_scram(mech) ? p->scram_cache : NULL;
	gsasl_property_set(a->sasl, GSASL_AUTHID, p->user);
	if (p->password != NULL)
		gsasl_property_set(a->sasl, GSASL_PASSWORD, p->password);
	gsasl_property_set(a->sasl, GSASL_SERVICE, "pop");
	/* only for -PLUS: with binding data at hand, plain SCRAM in GNU SASL
	 * 2.2 refuses to start ("y" flag negotiation) */
	if (auth_needs_binding(mech) && p->cb_tls_exporter != NULL)
		gsasl_property_set(a->sasl, GSASL_CB_TLS_EXPORTER, p->cb_tls_exporter);
	if (auth_needs_binding(mech) && p->cb_tls_unique != NULL)
		gsasl_property_set(a->sasl, GSASL_CB_TLS_UNIQUE, p->cb_tls_unique);
	*ret = a;
	return 0;
}

int
auth_step(struct auth *a, const char *challenge_b64, char **ret_b64)
{
	char *out = NULL;
	int rc;

	if (a->sasl == NULL) {
		if (!a->sent) {
			a->sent = a->complete = true;
			*ret_b64 = xstrdup(a->oauth_message);
			return 0;
		}
		/* an error challenge (JSON): answered empty (XOAUTH2) or with
		 * %x01 (RFC 7628 §3.2.3), then the server says -ERR */
		a->rejected = true;
		a->complete = false;
		*ret_b64 = xstrdup(strcasecmp(a->mech, "XOAUTH2") == 0 ? "" : "AQ==");
		return 0;
	}
	rc = gsasl_step64(a->sasl, challenge_b64 ? challenge_b64 : "", &out);
	if (rc != GSASL_OK && rc != GSASL_NEEDS_MORE) {
		gsasl_free(out);
		cache_drop(a);
		return -EPROTO;
	}
	a->complete = rc == GSASL_OK;
	*ret_b64 = xstrdup(out ? out : "");
	gsasl_free(out);
	return 0;
}

const char *
auth_error(const struct auth *a)
{
	return a->error[0] ? a->error : NULL;
}

int
auth_finish(struct auth *a, const char *success_b64, char *err, size_t errlen)
{
	bool given = success_b64 != NULL && success_b64[0] != '\0', said_more;
	char *resp = NULL;

	if (a->complete) {
		cache_store(a);
		return 0;
	}
	if (a->sasl != NULL && given && auth_step(a, success_b64, &resp) == 0) {
		said_more = resp[0] != '\0';
		explicit_bzero(resp, strlen(resp));
		free(resp);
		if (a->complete && !said_more) {
			cache_store(a);
			return 0;
		}
		a->complete = false; /* the mechanism still had something to say */
	}
	cache_drop(a);
	if (!is_scram(a->mech))
		snprintf(err, errlen, "the server accepted before the exchange was complete");
	else if (!given)
		snprintf(err, errlen,
			 "the server did not prove it knows the password: its SCRAM signature is "
			 "missing");
	else
		snprintf(err, errlen,
			 "the server did not prove it knows the password: its SCRAM signature is "
			 "wrong");
	return -EPROTO;
}

void
auth_refused(struct auth *a)
{
	if (a->sasl == NULL && a->sent)
		a->rejected = true;
	cache_drop(a);
}

bool
auth_token_rejected(const struct auth *a)
{
	return a->rejected;
}

bool
auth_salted_from_cache(const struct auth *a)
{
	return a->from_cache;
}

void
auth_free(struct auth *a)
{
	if (a == NULL)
		return;
	if (a->sasl != NULL)
		gsasl_finish(a->sasl);
	if (a->oauth_message != NULL) {
		explicit_bzero(a->oauth_message, strlen(a->oauth_message));
		free(a->oauth_message);
	}
	free(a->mech);
	free(a);
}

void
auth_apop_digest(const char *timestamp, const char *password, char out[33])
{
	unsigned char md[16];
	unsigned int len = 0;
	EVP_MD_CTX *c = EVP_MD_CTX_new();

	if (c == NULL || EVP_DigestInit_ex(c, EVP_md5(), NULL) != 1 ||
	    EVP_DigestUpdate(c, timestamp, strlen(timestamp)) != 1 ||
	    EVP_DigestUpdate(c, password, strlen(password)) != 1 ||
	    EVP_DigestFinal_ex(c, md, &len) != 1)
		abort();
	EVP_MD_CTX_free(c);
	util_hex(md, sizeof(md), out);
}
