/* Unit tests: APOP, XOAUTH2 / OAUTHBEARER messages, mechanism facts, SCRAM steps. */
#include <errno.h>

#include <gsasl.h>
#include <openssl/evp.h>

#include "check.h"
#include "popfetchd/auth.h"
#include "popfetchd/config.h"
#include "popfetchd/runtime.h"

static char *
unb64(const char *in)
{
	size_t n = strlen(in);
	unsigned char *out = calloc(1, n + 1);
	int len = EVP_DecodeBlock(out, (const unsigned char *)in, (int)n);

	while (len > 0 && n > 0 && in[--n] == '=')
		len--;
	out[len > 0 ? len : 0] = '\0';
	return (char *)out;
}

static void
apop(void)
{
	char hex[33];

	/* RFC 1939 §7 */
	auth_apop_digest("<1896.697170952@dbc.mtview.ca.us>", "tanstaaf", hex);
	CHECK_STR(hex, "c4c9334bac560ecc979e58001b3e22fb");
}

static void
oauth_message(const char *mech, const char *want)
{
	struct auth_params p = {.user = "someuser@example.com", .token = "ya29.vF9dft4"};
	struct auth *a = NULL;
	char err[128], *out = NULL, *plain;

	CHECK(auth_start(mech, &p, &a, err, sizeof(err)) == 0);
	CHECK(auth_step(a, NULL, &out) == 0);
	plain = unb64(out);
	CHECK(strcmp(plain, want) == 0);
	free(plain);
	free(out);
	CHECK(!auth_token_rejected(a));
	/* an error challenge: the RFC's answer, and the token is marked refused */
	CHECK(auth_step(a, "eyJzdGF0dXMiOiI0MDEifQ==", &out) == 0);
	CHECK_STR(out, strcmp(mech, "XOAUTH2") == 0 ? "" : "AQ==");
	CHECK(auth_token_rejected(a));
	free(out);
	auth_free(a);

	/* a plain -ERR after the token (Microsoft 365) refuses it too; before
	 * the token went out it does not */
	CHECK(auth_start(mech, &p, &a, err, sizeof(err)) == 0);
	auth_refused(a);
	CHECK(!auth_token_rejected(a));
	CHECK(auth_step(a, NULL, &out) == 0);
	free(out);
	auth_refused(a);
	CHECK(auth_token_rejected(a));
	auth_free(a);
}

static void
facts(void)
{
	CHECK(auth_supported("SCRAM-SHA-256-PLUS") && auth_supported("CRAM-MD5"));
	CHECK(auth_supported("APOP") && auth_supported("USER") && auth_supported("XOAUTH2"));
	CHECK(!auth_supported("GSSAPI") && !auth_supported("NTLM"));
	CHECK(auth_cleartext("PLAIN") && auth_cleartext("LOGIN") && auth_cleartext("USER"));
	CHECK(!auth_cleartext("SCRAM-SHA-1") && !auth_cleartext("APOP"));
	CHECK(auth_client_first("PLAIN") && auth_client_first("SCRAM-SHA-256"));
	CHECK(!auth_client_first("LOGIN") && !auth_client_first("CRAM-MD5"));
	CHECK(auth_needs_binding("SCRAM-SHA-256-PLUS") && !auth_needs_binding("SCRAM-SHA-256"));
}

static void
sasl(void)
{
	struct auth_params p = {.user = "tim", .password = "tanstaaftanstaaf"};
	struct auth *a = NULL;
	char err[128], *out = NULL, *plain;

	/* PLAIN: authzid NUL authcid NUL password */
	CHECK(auth_start("PLAIN", &p, &a, err, sizeof(err)) == 0);
	CHECK(auth_step(a, NULL, &out) == 0);
	CHECK_STR(out, "AHRpbQB0YW5zdGFhZnRhbnN0YWFm");
	free(out);
	auth_free(a);

	/* CRAM-MD5, RFC 2195's example */
	CHECK(auth_start("CRAM-MD5", &p, &a, err, sizeof(err)) == 0);
	CHECK(auth_step(a, "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+", &out) == 0);
	plain = unb64(out);
	CHECK_STR(plain, "tim b913a602c7eda7a495b4e6e7334d3890");
	free(plain);
	free(out);
	auth_free(a);

	/* SCRAM: a client-first message, then a forged server-first is refused */
	CHECK(auth_start("SCRAM-SHA-256", &p, &a, err, sizeof(err)) == 0);
	CHECK(auth_step(a, NULL, &out) == 0);
	plain = unb64(out);
	CHECK(strncmp(plain, "n,,n=tim,r=", 11) == 0);
	free(plain);
	free(out);
	/* "r=" not extending our nonce: a wrong server */
	CHECK(auth_step(a, "cj1mb3JnZWQscz1RU1hDUitRNnNlazhiZjkyLGk9NDA5Ng==", &out) < 0);
	auth_free(a);

	CHECK(auth_start("GSSAPI", &p, &a, err, sizeof(err)) < 0);
}

static char *
b64(const char *in)
{
	size_t n = strlen(in);
	char *out = calloc(1, 4 * ((n + 2) / 3) + 1);

	EVP_EncodeBlock((unsigned char *)out, (const unsigned char *)in, (int)n);
	return out;
}

static const char *server_password = "tanstaaftanstaaf";

static int
server_props(Gsasl *ctx, Gsasl_session *sctx, Gsasl_property prop)
{
	(void)ctx;
	if (prop != GSASL_PASSWORD)
		return GSASL_NO_CALLBACK;
	return gsasl_property_set(sctx, GSASL_PASSWORD, server_password);
}

enum server_final { SF_NONE, SF_WRONG, SF_ON_OK, SF_CONTINUATION };

/*
 * One SCRAM exchange against GNU SASL's server side, up to the +OK: what
 * auth_finish() says when the server-final message is missing, wrong, on
 * the +OK, or was answered in a continuation.
 */
static int
scram_with_server(const char *mech, enum server_final how)
{
	struct auth_params p = {.user = "tim", .password = "tanstaaftanstaaf"};
	struct auth *a = NULL;
	Gsasl *srv_ctx = NULL;
	Gsasl_session *srv = NULL;
	char err[160] = "", *c_first = NULL, *s_first = NULL, *c_final = NULL, *s_final = NULL;
	char *plain, *given = NULL, *out = NULL;
	int rc;

	CHECK(gsasl_init(&srv_ctx) == GSASL_OK);
	gsasl_callback_set(srv_ctx, server_props);
	CHECK(gsasl_server_start(srv_ctx, mech, &srv) == GSASL_OK);
	gsasl_property_set(srv, GSASL_SCRAM_ITER, "4096");
	CHECK(auth_start(mech, &p, &a, err, sizeof(err)) == 0);
	CHECK(auth_step(a, NULL, &c_first) == 0);
	CHECK(gsasl_step64(srv, c_first, &s_first) == GSASL_NEEDS_MORE);
	CHECK(auth_step(a, s_first, &c_final) == 0);
	CHECK(gsasl_step64(srv, c_final, &s_final) == GSASL_OK);
	switch (how) {
	case SF_NONE:
		rc = auth_finish(a, "", err, sizeof(err));
		CHECK(rc == 0 || strstr(err, "missing") != NULL);
		break;
	case SF_WRONG:
		plain = unb64(s_final);
		CHECK(strncmp(plain, "v=", 2) == 0);
		plain[2] = plain[2] == 'A' ? 'B' : 'A';
		given = b64(plain);
		free(plain);
		rc = auth_finish(a, given, err, sizeof(err));
		CHECK(rc == 0 || strstr(err, "wrong") != NULL);
		break;
	case SF_ON_OK:
		rc = auth_finish(a, s_final, err, sizeof(err));
		break;
	case SF_CONTINUATION:
	default:
		CHECK(auth_step(a, s_final, &out) == 0);
		CHECK_STR(out, "");
		/* the +OK's text is then only words */
		rc = auth_finish(a, "Logged in.", err, sizeof(err));
		break;
	}
	if (rc < 0)
		CHECK(strstr(err, "did not prove it knows the password") != NULL);
	free(out);
	free(given);
	free(c_first);
	free(c_final);
	gsasl_free(s_first);
	gsasl_free(s_final);
	auth_free(a);
	gsasl_finish(srv);
	gsasl_done(srv_ctx);
	return rc;
}

static void
server_proof(void)
{
	struct auth_params p = {.user = "tim", .password = "tanstaaftanstaaf"};
	struct auth *a = NULL;
	char err[160], *out = NULL;

	for (const char *const *m = (const char *const[]){"SCRAM-SHA-256", "SCRAM-SHA-1", NULL};
	     *m != NULL; m++) {
		CHECK(scram_with_server(*m, SF_NONE) == -EPROTO);
		CHECK(scram_with_server(*m, SF_WRONG) == -EPROTO);
		CHECK(scram_with_server(*m, SF_ON_OK) == 0);
		CHECK(scram_with_server(*m, SF_CONTINUATION) == 0);
	}

	/* PLAIN is over once its one message is built */
	CHECK(auth_start("PLAIN", &p, &a, err, sizeof(err)) == 0);
	CHECK(auth_finish(a, NULL, err, sizeof(err)) == -EPROTO);
	CHECK(auth_step(a, NULL, &out) == 0);
	free(out);
	CHECK(auth_finish(a, NULL, err, sizeof(err)) == 0);
	auth_free(a);

	/* LOGIN accepted after the user name: data that asks for more is no end */
	CHECK(auth_start("LOGIN", &p, &a, err, sizeof(err)) == 0);
	CHECK(auth_step(a, "VXNlcm5hbWU6", &out) == 0);
	free(out);
	CHECK(auth_finish(a, "UGFzc3dvcmQ6", err, sizeof(err)) == -EPROTO);
	auth_free(a);
}

/* The server of a SCRAM login: its salt (base64) and iteration count. */
struct scram_server {
	const char *salt, *iter;
};

/*
 * One SCRAM login of password with cache against GNU SASL's server side:
 * 0 when it succeeded, -1 when the server refused it, -EPROTO when the
 * server's signature was wrong (forged when forge); *cached: the salted
 * password came from the cache.
 */
static int
scram_login(const char *mech, const char *password, const struct scram_server *sv,
	    struct auth_scram_cache *cache, bool forge, bool *cached)
{
	struct auth_params p = {.user = "tim", .password = password, .scram_cache = cache};
	struct auth *a = NULL;
	Gsasl *srv_ctx = NULL;
	Gsasl_session *srv = NULL;
	char err[160], *c_first = NULL, *s_first = NULL, *c_final = NULL, *s_final = NULL, *plain;
	int rc;

	CHECK(gsasl_init(&srv_ctx) == GSASL_OK);
	gsasl_callback_set(srv_ctx, server_props);
	CHECK(gsasl_server_start(srv_ctx, mech, &srv) == GSASL_OK);
	gsasl_property_set(srv, GSASL_SCRAM_SALT, sv->salt);
	gsasl_property_set(srv, GSASL_SCRAM_ITER, sv->iter);
	CHECK(auth_start(mech, &p, &a, err, sizeof(err)) == 0);
	CHECK(auth_step(a, NULL, &c_first) == 0);
	CHECK(gsasl_step64(srv, c_first, &s_first) == GSASL_NEEDS_MORE);
	CHECK(auth_step(a, s_first, &c_final) == 0);
	*cached = auth_salted_from_cache(a);
	if (gsasl_step64(srv, c_final, &s_final) != GSASL_OK) {
		auth_refused(a); /* the -ERR to the client's proof */
		rc = -1;
	} else {
		if (forge) {
			plain = unb64(s_final);
			plain[2] = plain[2] == 'A' ? 'B' : 'A';
			free(s_final);
			s_final = b64(plain);
			free(plain);
		}
		rc = auth_finish(a, s_final, err, sizeof(err));
	}
	free(c_first);
	free(c_final);
	free(s_first);
	free(s_final);
	auth_free(a);
	gsasl_finish(srv);
	gsasl_done(srv_ctx);
	return rc;
}

#define PW "tanstaaftanstaaf"

/* SCRAM's salted password: computed once per password, salt, iteration
 * count and hash, then taken from the cache; dropped after a failed login. */
static void
scram_cache(void)
{
	const struct scram_server s1 = {"QSXCR+Q6sek8bf92", "4096"},
				  s2 = {"W22ZaJ0SNY7soEsUEjb6gQ==", "4096"},
				  s2_more = {"W22ZaJ0SNY7soEsUEjb6gQ==", "8192"};
	struct auth_scram_cache *c = auth_scram_cache_new(), *d;
	bool cached;

	/* computed, then cached; another hash is another salted password */
	CHECK(scram_login("SCRAM-SHA-256", PW, &s1, c, false, &cached) == 0 && !cached);
	CHECK(scram_login("SCRAM-SHA-256", PW, &s1, c, false, &cached) == 0 && cached);
	CHECK(scram_login("SCRAM-SHA-1", PW, &s1, c, false, &cached) == 0 && !cached);
	CHECK(scram_login("SCRAM-SHA-1", PW, &s1, c, false, &cached) == 0 && cached);
	/* a new salt (the account made again), a new iteration count */
	CHECK(scram_login("SCRAM-SHA-1", PW, &s2, c, false, &cached) == 0 && !cached);
	CHECK(scram_login("SCRAM-SHA-1", PW, &s2, c, false, &cached) == 0 && cached);
	CHECK(scram_login("SCRAM-SHA-1", PW, &s2_more, c, false, &cached) == 0 && !cached);
	CHECK(scram_login("SCRAM-SHA-1", PW, &s2_more, c, false, &cached) == 0 && cached);

	/* a copy holds the same; the server refuses: the cache is dropped */
	d = auth_scram_cache_dup(c);
	CHECK(scram_login("SCRAM-SHA-1", PW, &s2_more, d, false, &cached) == 0 && cached);
	server_password = "another password";
	CHECK(scram_login("SCRAM-SHA-1", PW, &s2_more, c, false, &cached) == -1 && cached);
	server_password = PW;
	CHECK(scram_login("SCRAM-SHA-1", PW, &s2_more, c, false, &cached) == 0 && !cached);
	/* a wrong server signature drops it too */
	CHECK(scram_login("SCRAM-SHA-1", PW, &s2_more, d, true, &cached) == -EPROTO && cached);
	CHECK(scram_login("SCRAM-SHA-1", PW, &s2_more, d, false, &cached) == 0 && !cached);
	auth_scram_cache_free(d);

	/* a wrong salted password (another password's) locks nobody out:
	 * one refused login, then PBKDF2 again */
	server_password = "another password";
	CHECK(scram_login("SCRAM-SHA-1", "another password", &s2_more, c, false, &cached) == -1 &&
	      cached);
	CHECK(scram_login("SCRAM-SHA-1", "another password", &s2_more, c, false, &cached) == 0 &&
	      !cached);
	server_password = PW;

	/* PBKDF2 of the password after SASLprep, as the server does: a
	 * no-break space is a space (RFC 4013 §2.1) */
	server_password = "tanstaaf\xc2\xa0tanstaaf";
	CHECK(scram_login("SCRAM-SHA-256", server_password, &s1, NULL, false, &cached) == 0);
	CHECK(scram_login("SCRAM-SHA-1", "tanstaaf tanstaaf", &s1, NULL, false, &cached) == 0);
	server_password = PW;

	/* no cache: PBKDF2 every time */
	CHECK(scram_login("SCRAM-SHA-256", PW, &s1, NULL, false, &cached) == 0 && !cached);
	CHECK(scram_login("SCRAM-SHA-256", PW, &s1, NULL, false, &cached) == 0 && !cached);
	auth_scram_cache_free(c);
	auth_scram_cache_free(NULL);
}

/* A reload keeps the salted password when the password stays (a copy of
 * it: the running poll keeps its own), not when it changes. */
static void
scram_cache_reload(void)
{
	const struct scram_server sv = {"QSXCR+Q6sek8bf92", "4096"};
	struct conf_set set = {.state_directory = "/nonexistent"};
	struct conf_mailbox mb = {.id = "x", .tls = CONF_TLS_NONE, .password = PW}, same = mb,
			    other = mb, oauth = mb;
	struct runtime before, kept, changed, token;
	char why[256];
	bool cached;

	other.password = "another password";
	oauth.auth = CONF_AUTH_OAUTH2;
	CHECK(runtime_init(&before, &set, &mb, NULL, false, why, sizeof(why)) == 0);
	CHECK(scram_login("SCRAM-SHA-256", PW, &sv, before.scram_cache, false, &cached) == 0);
	CHECK(runtime_reinit(&kept, &before, &set, &same, NULL, false, why, sizeof(why)) == 0);
	CHECK(runtime_reinit(&changed, &before, &set, &other, NULL, false, why, sizeof(why)) == 0);
	CHECK(runtime_reinit(&token, &before, &set, &oauth, NULL, false, why, sizeof(why)) == 0);
	CHECK(token.scram_cache == NULL);
	runtime_clear(&before);
	CHECK(scram_login("SCRAM-SHA-256", PW, &sv, kept.scram_cache, false, &cached) == 0 &&
	      cached);
	server_password = "another password";
	CHECK(scram_login("SCRAM-SHA-256", "another password", &sv, changed.scram_cache, false,
			  &cached) == 0 &&
	      !cached);
	server_password = PW;
	runtime_clear(&kept);
	runtime_clear(&changed);
	runtime_clear(&token);
}

int
main(void)
{
	apop();
	oauth_message("XOAUTH2", "user=someuser@example.com\001auth=Bearer ya29.vF9dft4\001\001");
	oauth_message("OAUTHBEARER",
		      "n,a=someuser@example.com,\001auth=Bearer ya29.vF9dft4\001\001");
	facts();
	sasl();
	server_proof();
	scram_cache();
	scram_cache_reload();
	CHECK_DONE();
}
