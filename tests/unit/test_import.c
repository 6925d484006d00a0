/* The .mpoprc and .fetchmailrc parsers and the YAML they give. */
#include <string.h>

#include "check.h"
#include "popfetchd/import.h"

static bool
has_note(const struct import_result *r, const char *text)
{
	for (size_t i = 0; i < r->n_notes; i++)
		if (strstr(r->notes[i], text) != NULL)
			return true;
	return false;
}

static void
test_mpop_inheritance(void)
{
	static const char rc[] =
		"# c\ndefaults\nkeep on\ntls_starttls off\n\n"
		"account a\nhost h1\nuser \"u 1\"\npassword \"p\\\"w\"\nauth plain\n"
		"account b : a\nhost h2\nkeep off\nproxy_host x\n"
		"account default : b\n";
	struct import_result r = {0};

	import_parse_mpoprc(rc, sizeof(rc) - 1, "rc", &r);
	CHECK(r.n_acc == 3);
	CHECK_STR(r.acc[0].server, "h1");
	CHECK_STR(r.acc[0].user, "u 1");
	CHECK_STR(r.acc[0].password, "p\"w");
	CHECK_STR(r.acc[0].mechanism, "PLAIN");
	CHECK(r.acc[0].keep == 1 && r.acc[0].starttls == 0);
	CHECK_STR(r.acc[1].server, "h2");
	CHECK_STR(r.acc[1].password, "p\"w");
	CHECK(r.acc[1].keep == 0);
	CHECK(r.acc[2].alias);
	CHECK(has_note(&r, "rc:14: proxy_host has no popfetchd counterpart"));
	CHECK(has_note(&r, "rc:15: account default only names another"));
	import_result_free(&r);
}

static void
test_mpop_values(void)
{
	static const char rc[] = "account x\nport 0\ntls maybe\nauth gssapi\n"
				 "tls_fingerprint AB:CD\npasswordeval pass x\n";
	struct import_result r = {0};

	import_parse_mpoprc(rc, sizeof(rc) - 1, "rc", &r);
	CHECK(r.n_acc == 1 && r.acc[0].port == -1 && r.acc[0].tls == -1);
	CHECK(r.acc[0].mechanism == NULL && r.acc[0].fingerprint == NULL);
	CHECK(r.acc[0].password_eval == 1 && r.acc[0].password == NULL);
	CHECK(has_note(&r, "rc:2: port"));
	CHECK(has_note(&r, "rc:4: auth gssapi"));
	CHECK(has_note(&r, "rc:5: this fingerprint is not SHA-256"));
	CHECK(has_note(&r, "rc:6: passwordeval cannot be carried over"));
	import_result_free(&r);
}

static void
test_fetchmail(void)
{
	static const char rc[] =
		"set daemon 60\ndefaults proto pop3 keep\n"
		"poll h port 995 user 'a' there with password \"x#y\" is l here ssl\n"
		"  mda \"procmail\" # comment\n"
		"poll h2 user b pass 'q\\'s' no keep sslproto ''\n"
		"poll i protocol imap user c\n";
	struct import_result r = {0};

	import_parse_fetchmailrc(rc, sizeof(rc) - 1, "f", &r);
	CHECK(r.n_acc == 3);
	CHECK_STR(r.acc[0].id, "a-h");
	CHECK_STR(r.acc[0].password, "x#y");
	CHECK(r.acc[0].port == 995 && r.acc[0].tls == 1 && r.acc[0].starttls == 0);
	CHECK(r.acc[0].keep == 1);
	CHECK_STR(r.acc[0].interval, "60s");
	CHECK_STR(r.acc[1].password, "q's");
	CHECK(r.acc[1].keep == 0 && r.acc[1].tls == 0);
	CHECK(r.acc[2].pop3 == 0);
	CHECK(has_note(&r, "f:3: is: delivery"));
	CHECK(has_note(&r, "f:4: mda has no popfetchd counterpart"));
	CHECK(has_note(&r, "f:6: protocol imap is not POP3"));
	import_result_free(&r);
}

/* skipsize, timeout and eval of mpop; limit, timeout, sslproto and set
 * daemon of fetchmail: carried over or reported, never dropped. */
static void
test_sizes_timeouts_eval(void)
{
	static const char mrc[] = "defaults\ntimeout 20\naccount a\nhost h\nskipsize 10m\n"
				  "eval echo host x\naccount b : a\ntimeout 0\nskipsize big\n"
				  "include other\n";
	static const char frc[] = "set daemon 0\npoll h user u limit 5000 timeout 45\n"
				  "  sslproto TLS1.2+\npoll h2 user v limit 0 timeout 7200\n";
	struct import_result r = {0};

	import_parse_mpoprc(mrc, sizeof(mrc) - 1, "rc", &r);
	CHECK(r.n_acc == 2);
	CHECK(r.acc[0].max_size == 10u << 20 && r.acc[0].timeout == 20);
	CHECK(r.acc[1].max_size == 10u << 20 && r.acc[1].timeout == 20);
	CHECK(has_note(&r, "rc:6: eval cannot be carried over"));
	CHECK(has_note(&r, "rc:8: timeout \"0\" is not 1 to 3600 seconds"));
	CHECK(has_note(&r, "rc:9: skipsize \"big\" is not a size"));
	CHECK(has_note(&r, "rc:10: include has no popfetchd counterpart"));
	import_result_free(&r);

	import_parse_fetchmailrc(frc, sizeof(frc) - 1, "f", &r);
	CHECK(r.n_acc == 2);
	CHECK(r.acc[0].max_size == 5000 && r.acc[0].timeout == 45);
	CHECK(r.acc[0].interval == NULL);
	CHECK(r.acc[1].max_size == 0 && r.acc[1].timeout == -1);
	CHECK(has_note(&r, "f:1: set daemon 0 is not 1 to 604800 seconds"));
	CHECK(has_note(&r, "f:3: sslproto \"TLS1.2+\" has no popfetchd counterpart"));
	CHECK(has_note(&r, "f:4: timeout \"7200\""));
	import_result_free(&r);
}

static void
test_yaml(void)
{
	struct import_account a = {.name = "n\nx",
				   .id = "n-x",
				   .line = 3,
				   .server = "h",
				   .user = "u\"\\",
				   .port = 995,
				   .tls = 1,
				   .starttls = 0,
				   .certcheck = 0,
				   .keep = 1,
				   .mechanism = "PLAIN",
				   .password_eval = -1,
				   .inactive = -1,
				   .max_size = 1000,
				   .timeout = 20};
	char *y = import_yaml(&a, "rc", "/s/n-x.password");

	CHECK(strstr(y, "line 3: n?x\nid: n-x\n") != NULL);
	CHECK(strstr(y, "user: \"u\\\"\\\\\"\n") != NULL);
	CHECK(strstr(y, "tls: implicit\nport: 995\ntls_verify: false\n") != NULL);
	CHECK(strstr(y, "password_file: \"/s/n-x.password\"\n") != NULL);
	CHECK(strstr(y, "remove_after_read: false\n") != NULL);
	CHECK(strstr(y, "max_message_size: 1000\ntimeouts:\n  connect: 20s\n  command: 20s\n") !=
	      NULL);
	free(y);
}

int
main(void)
{
	test_mpop_inheritance();
	test_mpop_values();
	test_fetchmail();
	test_sizes_timeouts_eval();
	test_yaml();
	CHECK_DONE();
}
