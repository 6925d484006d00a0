/* Unit tests: APOP, XOAUTH2 / OAUTHBEARER messages, mechanism facts, SCRAM steps. */
#include <openssl/evp.h>

#include "check.h"
#include "popfetchd/auth.h"

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

int
main(void)
{
	apop();
	oauth_message("XOAUTH2", "user=someuser@example.com\001auth=Bearer ya29.vF9dft4\001\001");
	oauth_message("OAUTHBEARER",
		      "n,a=someuser@example.com,\001auth=Bearer ya29.vF9dft4\001\001");
	facts();
	sasl();
	CHECK_DONE();
}
