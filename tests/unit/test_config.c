/* test_config — conf_load on temporary configuration directories. */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "popfetchd/config.h"
#include "popfetchd/util.h"
#include "popfetchd/log.h"

#define FP_HEX "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"

static char *dirs[64];
static size_t n_dirs;

/* A fresh configuration directory with an empty conf.d/. */
static const char *
new_dir(bool with_confd)
{
	char tmpl[] = "/tmp/popfetchd-test-config-XXXXXX";
	char sub[512];

	if (mkdtemp(tmpl) == NULL) {
		perror("mkdtemp");
		exit(2);
	}
	snprintf(sub, sizeof(sub), "%s/conf.d", tmpl);
	if (with_confd && mkdir(sub, 0755) < 0) {
		perror("mkdir");
		exit(2);
	}
	dirs[n_dirs] = strdup(tmpl);
	return dirs[n_dirs++];
}

static void
put(const char *dir, const char *name, mode_t mode, const char *text)
{
	char path[512];
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text) ||
	    fchmod(fd, mode) < 0) {
		perror(path);
		exit(2);
	}
	close(fd);
}

static const char *
path_of(const char *dir, const char *name)
{
	static char buf[4][512];
	static int i;

	i = (i + 1) % 4;
	snprintf(buf[i], sizeof(buf[i]), "%s/%s", dir, name);
	return buf[i];
}

static int
rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static void
dump(const struct conf_errors *e)
{
	for (size_t i = 0; i < e->n; i++)
		fprintf(stderr, "    | %s\n", e->lines[i]);
}

/* An error line containing all of needle (and, if given, needle2). */
static bool
has_error(const struct conf_errors *e, const char *needle, const char *needle2)
{
	for (size_t i = 0; i < e->n; i++)
		if (strstr(e->lines[i], needle) &&
		    (needle2 == NULL || strstr(e->lines[i], needle2)))
			return true;
	fprintf(stderr, "no error line with \"%s\"%s%s%s, have:\n", needle,
		needle2 ? " and \"" : "", needle2 ? needle2 : "", needle2 ? "\"" : "");
	dump(e);
	return false;
}

static bool
no_error_contains(const struct conf_errors *e, const char *secret)
{
	for (size_t i = 0; i < e->n; i++)
		if (strstr(e->lines[i], secret))
			return false;
	return true;
}

/* Load and expect success. */
static struct conf_set *
load_ok(const char *dir)
{
	struct conf_errors e = {0};
	struct conf_set *set = NULL;
	int r = conf_load(dir, &set, &e);

	CHECK(r == 0);
	CHECK(e.n == 0);
	if (r != 0)
		dump(&e);
	conf_errors_clear(&e);
	return set;
}

/* Load and expect failure, the set untouched. */
static void
load_bad(const char *dir, struct conf_errors *e)
{
	struct conf_set *set = (struct conf_set *)&set, *sentinel = set;

	CHECK(conf_load(dir, &set, e) == -EINVAL);
	CHECK(set == sentinel);
	CHECK(e->n > 0);
}

#define BASE "server: pop.example.com\nuser: alice\npassword: hunter2\nsave_directory: /srv/m\n"

static void
test_empty(void)
{
	const char *dir = new_dir(false);
	struct conf_set *set;
	char keys[600];

	unsetenv("STATE_DIRECTORY");
	set = load_ok(dir);
	CHECK(set != NULL && set->n_mailboxes == 0);
	CHECK_STR(set->dir, dir);
	CHECK_STR(set->state_directory, "/var/lib/popfetchd");
	snprintf(keys, sizeof(keys), "%s/keys", dir);
	CHECK_STR(set->keystore_directory, keys);
	CHECK(set->max_sessions == 64);
	CHECK(set->log_level == LOG_LVL_INFO && !set->log_level_set);
	CHECK(conf_find(set, "x") == NULL);
	conf_set_free(set);

	setenv("STATE_DIRECTORY", "/var/lib/one:/var/lib/two", 1);
	set = load_ok(dir);
	CHECK_STR(set->state_directory, "/var/lib/one");
	conf_set_free(set);
	unsetenv("STATE_DIRECTORY");
}

static void
test_full(void)
{
	const char *dir = new_dir(true);
	struct conf_set *set;
	const struct conf_mailbox *m;

	put(dir, "conf.d/full.yaml", 0600,
	    "id: full.box-1\n"
	    "description: The full one\n"
	    "status: inactive\n"
	    "server: pop.example.com\n"
	    "port: 1995\n"
	    "tls: explicit\n"
	    "tls_ca_file: /etc/ssl/ca.pem\n"
	    "tls_fingerprint: \"SHA256:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:"
	    "00112233445566778899aabbccddeeff\"\n"
	    "tls_verify: No\n"
	    "user: alice\n"
	    "password: \"p w\"\n"
	    "auth: sasl\n"
	    "sasl_mechanisms: [scram-sha-256, Plain, USER]\n"
	    "smime:\n  key_name: alice\n  key_password: kp\n"
	    "save_text: off\n"
	    "save_attachments: YES\n"
	    "save_directory: /srv/mail/full\n"
	    "remove_after_read: false\n"
	    "receive: one\n"
	    "poll_interval: 90\n"
	    "max_message_size: 25M\n"
	    "timeouts:\n  connect: 10s\n  command: 2m\n"
	    "oauth2:\n"
	    "  token_endpoint: https://login.example.com/token\n"
	    "  client_id: cid\n"
	    "  client_secret: cs\n"
	    "  scope: s\n"
	    "  grant: refresh_token\n"
	    "  refresh_token_file: /var/lib/x/rt\n"
	    "  mechanism: OAUTHBEARER\n"
	    "  ca_file: /etc/ssl/o.pem\n");
	set = load_ok(dir);
	if (set == NULL)
		return;
	CHECK(set->n_mailboxes == 1);
	m = conf_find(set, "full.box-1");
	CHECK(m != NULL);
	if (m == NULL)
		return;
	CHECK_STR(m->file, path_of(dir, "conf.d/full.yaml"));
	CHECK_STR(m->description, "The full one");
	CHECK(!m->active);
	CHECK_STR(m->server, "pop.example.com");
	CHECK(m->port == 1995);
	CHECK(m->tls == CONF_TLS_EXPLICIT);
	CHECK_STR(m->tls_ca_file, "/etc/ssl/ca.pem");
	CHECK(m->has_fingerprint);
	CHECK(m->tls_fingerprint[0] == 0x00 && m->tls_fingerprint[1] == 0x11 &&
	      m->tls_fingerprint[15] == 0xff && m->tls_fingerprint[31] == 0xff);
	CHECK(!m->tls_verify);
	CHECK_STR(m->user, "alice");
	CHECK_STR(m->password, "p w");
	CHECK(m->auth == CONF_AUTH_SASL);
	CHECK(m->n_sasl_mechanisms == 3);
	if (m->n_sasl_mechanisms == 3) {
		CHECK_STR(m->sasl_mechanisms[0], "SCRAM-SHA-256");
		CHECK_STR(m->sasl_mechanisms[1], "PLAIN");
		CHECK_STR(m->sasl_mechanisms[2], "USER");
	}
	CHECK_STR(m->smime.key_name, "alice");
	CHECK_STR(m->smime.key_password, "kp");
	CHECK(!m->save_text && m->save_attachments && !m->remove_after_read);
	CHECK_STR(m->save_directory, "/srv/mail/full");
	CHECK(m->receive == CONF_RECEIVE_ONE);
	CHECK(m->poll_interval == 90);
	CHECK(m->max_message_size == 25 * 1024 * 1024);
	CHECK(m->connect_timeout == 10 && m->command_timeout == 120);
	CHECK_STR(m->oauth2.token_endpoint, "https://login.example.com/token");
	CHECK_STR(m->oauth2.client_id, "cid");
	CHECK_STR(m->oauth2.client_secret, "cs");
	CHECK_STR(m->oauth2.scope, "s");
	CHECK(m->oauth2.grant == CONF_GRANT_REFRESH_TOKEN);
	CHECK_STR(m->oauth2.refresh_token_file, "/var/lib/x/rt");
	CHECK(m->oauth2.mechanism == CONF_OAUTH_OAUTHBEARER);
	CHECK_STR(m->oauth2.ca_file, "/etc/ssl/o.pem");
	conf_set_free(set);
}

static void
test_minimal_defaults(void)
{
	const char *dir = new_dir(true);
	struct conf_set *set;
	const struct conf_mailbox *m;

	put(dir, "conf.d/a.yaml", 0600, "id: a\n" BASE);
	set = load_ok(dir);
	m = set ? conf_find(set, "a") : NULL;
	CHECK(m != NULL);
	if (m == NULL)
		return;
	CHECK(m->description == NULL && m->active);
	CHECK(m->tls == CONF_TLS_IMPLICIT && m->port == 995 && m->tls_verify);
	CHECK(m->tls_ca_file == NULL && !m->has_fingerprint);
	CHECK(m->auth == CONF_AUTH_SASL);
	CHECK(m->sasl_mechanisms == NULL && m->n_sasl_mechanisms == 0);
	CHECK(m->save_text && m->save_attachments && m->remove_after_read);
	CHECK(m->receive == CONF_RECEIVE_ALL);
	CHECK(m->poll_interval == 300 && m->max_message_size == 0);
	CHECK(m->connect_timeout == 30 && m->command_timeout == 60);
	CHECK(m->oauth2.grant == CONF_GRANT_CLIENT_CREDENTIALS);
	CHECK(m->oauth2.mechanism == CONF_OAUTH_XOAUTH2);
	CHECK(m->smime.key_name == NULL && m->smime.key_password == NULL);
	conf_set_free(set);
}

static void
test_ports(void)
{
	const char *dir = new_dir(true);
	struct conf_set *set;

	put(dir, "conf.d/i.yaml", 0600, "id: i\ntls: implicit\n" BASE);
	put(dir, "conf.d/e.yaml", 0600, "id: e\ntls: explicit\n" BASE);
	put(dir, "conf.d/n.yaml", 0600, "id: n\ntls: none\n" BASE);
	put(dir, "conf.d/p.yaml", 0600, "id: p\ntls: explicit\nport: 2000\n" BASE);
	set = load_ok(dir);
	if (set == NULL)
		return;
	CHECK(conf_find(set, "i")->port == 995);
	CHECK(conf_find(set, "e")->port == 110);
	CHECK(conf_find(set, "n")->port == 110 && conf_find(set, "n")->tls == CONF_TLS_NONE);
	CHECK(conf_find(set, "p")->port == 2000);
	conf_set_free(set);
}

static void
test_daemon_settings(void)
{
	const char *dir = new_dir(true);
	struct conf_set *set;
	const struct conf_mailbox *a, *b, *c;
	char text[1024];

	put(dir, "dpw", 0600, "file-pw\nsecond line\n");
	put(dir, "popfetchd.yaml", 0600,
	    "state_directory: /srv/state\n"
	    "keystore_directory: /srv/keys\n"
	    "max_sessions: 5\n"
	    "log_level: debug\n"
	    "defaults:\n"
	    "  server: d.example\n"
	    "  port: 2110\n"
	    "  tls: none\n"
	    "  user: bob\n"
	    "  password: dpw\n"
	    "  tls_ca_file: /d/ca.pem\n");
	put(dir, "conf.d/a.yaml", 0600, "id: a\nsave_directory: /srv/a\n");
	put(dir, "conf.d/b.yaml", 0600,
	    "id: b\nserver: own.example\nuser: carol\npassword: own\ntls: implicit\n"
	    "tls_ca_file: /own/ca.pem\nsave_directory: /srv/b\n");
	snprintf(text, sizeof(text), "id: c\npassword_file: %s/dpw\nsave_directory: /srv/c\n", dir);
	put(dir, "conf.d/c.yml", 0644, text);
	put(dir, "conf.d/README.txt", 0644, "not: [yaml\n");
	put(dir, "conf.d/.hidden.yaml", 0644, "not: [yaml\n");
	put(dir, "conf.d/d.yaml~", 0644, "not: [yaml\n");
	set = load_ok(dir);
	if (set == NULL)
		return;
	CHECK_STR(set->state_directory, "/srv/state");
	CHECK_STR(set->keystore_directory, "/srv/keys");
	CHECK(set->max_sessions == 5);
	CHECK(set->log_level == LOG_LVL_DEBUG && set->log_level_set);
	CHECK(set->n_mailboxes == 3);
	a = conf_find(set, "a");
	b = conf_find(set, "b");
	c = conf_find(set, "c");
	CHECK(a && b && c);
	if (!a || !b || !c)
		return;
	CHECK_STR(a->server, "d.example");
	CHECK_STR(a->user, "bob");
	CHECK_STR(a->password, "dpw");
	CHECK(a->port == 2110 && a->tls == CONF_TLS_NONE);
	CHECK_STR(a->tls_ca_file, "/d/ca.pem");
	CHECK_STR(b->server, "own.example");
	CHECK_STR(b->user, "carol");
	CHECK_STR(b->password, "own");
	CHECK(b->tls == CONF_TLS_IMPLICIT && b->port == 2110);
	CHECK_STR(b->tls_ca_file, "/own/ca.pem");
	CHECK_STR(c->password, "file-pw");
	/* sorted by id */
	CHECK_STR(set->mailboxes[0]->id, "a");
	CHECK_STR(set->mailboxes[1]->id, "b");
	CHECK_STR(set->mailboxes[2]->id, "c");
	conf_set_free(set);
}

static void
test_metrics_listen(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	const char *f = path_of(dir, "popfetchd.yaml");
	struct conf_set *set = load_ok(dir);

	/* off unless set */
	CHECK(set != NULL && set->metrics_listen == NULL);
	conf_set_free(set);
	put(dir, "popfetchd.yaml", 0600, "metrics_listen: 127.0.0.1:9100\n");
	set = load_ok(dir);
	CHECK(set != NULL && set->metrics_listen != NULL);
	CHECK_STR(set ? set->metrics_listen : NULL, "127.0.0.1:9100");
	conf_set_free(set);
	put(dir, "popfetchd.yaml", 0600, "metrics_listen: \"[::1]:9100\"\n");
	set = load_ok(dir);
	CHECK_STR(set ? set->metrics_listen : NULL, "[::1]:9100");
	conf_set_free(set);
	put(dir, "popfetchd.yaml", 0600, "max_sessions: 3\nmetrics_listen: localhost:9100\n");
	load_bad(dir, &e);
	CHECK(has_error(&e, f, ":2:17: metrics_listen: must be ADDRESS:PORT with an IP address"));
	conf_errors_clear(&e);
	put(dir, "popfetchd.yaml", 0600, "metrics_listen: 127.0.0.1:70000\n");
	load_bad(dir, &e);
	CHECK(has_error(&e, f, ":1:17: metrics_listen: must be ADDRESS:PORT"));
	conf_errors_clear(&e);
	put(dir, "popfetchd.yaml", 0600, "metrics_listen: [::1]:9100\n");
	load_bad(dir, &e);
	/* unquoted, a YAML flow sequence: an error at its place */
	CHECK(has_error(&e, f, ":1:"));
	conf_errors_clear(&e);
}

static void
test_daemon_errors(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	const char *f = path_of(dir, "popfetchd.yaml");
	char want[1024];

	put(dir, "popfetchd.yaml", 0644,
	    "state_directory: var/state\n"
	    "max_sessions: 0\n"
	    "log_level: loud\n"
	    "colour: blue\n"
	    "defaults:\n"
	    "  port: 0\n"
	    "  tls: starttls\n"
	    "  password: topsecret\n"
	    "  password_file: /x\n"
	    "  shoe: 1\n");
	put(dir, "conf.d/a.yaml", 0600, "id: a\nsave_directory: /srv/a\n");
	load_bad(dir, &e);
	CHECK(has_error(&e, f, ":1:18: state_directory: must be an absolute path"));
	CHECK(has_error(&e, f, ":2:15: max_sessions: must be between 1 and 10000"));
	CHECK(has_error(&e, f, ":3:12: log_level: must be one of debug"));
	snprintf(want, sizeof(want), "%s:4:1: colour: unknown key", f);
	CHECK(has_error(&e, want, NULL));
	CHECK(has_error(&e, f, ":6:9: defaults.port: must be between 1 and 65535"));
	CHECK(has_error(&e, f, ":7:8: defaults.tls: must be one of implicit, explicit, none"));
	CHECK(has_error(&e, f, ":8:13: defaults.password: "));
	CHECK(has_error(&e, "defaults.password: ", "readable by group or others (chmod 600)"));
	CHECK(has_error(&e, f, ":9:18: defaults.password_file: only one of password, "));
	CHECK(has_error(&e, f, ":10:3: defaults.shoe: unknown key"));
	/* the configuration is checked too, with what could be read of the defaults */
	CHECK(has_error(&e, path_of(dir, "conf.d/a.yaml"),
			": server: required (here or in "
			"popfetchd.yaml defaults)"));
	CHECK(no_error_contains(&e, "topsecret"));
	conf_errors_clear(&e);
	CHECK(e.n == 0 && e.lines == NULL);
}

static void
test_secret_files(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	struct conf_set *set;
	char text[1024];
	const char *f;

	put(dir, "crlf", 0600, "crlf-pw\r\n");
	put(dir, "open", 0644, "open-secret\n");
	put(dir, "empty", 0600, "\n");
	snprintf(text, sizeof(text),
		 "id: a\n" BASE "smime:\n  key_name: k\n  key_password_file: %s/crlf\n", dir);
	put(dir, "conf.d/a.yaml", 0600, text);
	set = load_ok(dir);
	if (set != NULL)
		CHECK_STR(conf_find(set, "a")->smime.key_password, "crlf-pw");
	conf_set_free(set);

	snprintf(text, sizeof(text),
		 "id: b\nserver: s\nuser: u\nsave_directory: /s\npassword_file: %s/open\n", dir);
	put(dir, "conf.d/b.yaml", 0600, text);
	snprintf(text, sizeof(text),
		 "id: c\nserver: s\nuser: u\nsave_directory: /s\npassword_file: %s/nope\n", dir);
	put(dir, "conf.d/c.yaml", 0600, text);
	snprintf(text, sizeof(text),
		 "id: d\nserver: s\nuser: u\nsave_directory: /s\npassword_file: %s/empty\n", dir);
	put(dir, "conf.d/d.yaml", 0600, text);
	load_bad(dir, &e);
	f = path_of(dir, "conf.d/b.yaml");
	snprintf(text, sizeof(text),
		 "%s:5:16: password_file: %s/open is readable by others (chmod 600)", f, dir);
	CHECK(has_error(&e, text, NULL));
	CHECK(has_error(&e, path_of(dir, "conf.d/c.yaml"), ":5:16: password_file: cannot open"));
	CHECK(has_error(&e, path_of(dir, "conf.d/d.yaml"), "password_file: the first line"));
	CHECK(e.n == 3);
	CHECK(no_error_contains(&e, "open-secret"));
	conf_errors_clear(&e);
}

static void
test_credentials(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	struct conf_set *set;
	char creds[600];

	snprintf(creds, sizeof(creds), "%s/creds", dir);
	mkdir(creds, 0700);
	put(creds, "pop-pw", 0644, "cred-pw\n");
	put(dir, "conf.d/a.yaml", 0600,
	    "id: a\nserver: s\nuser: u\nsave_directory: /s\npassword_credential: pop-pw\n"
	    "auth: oauth2\noauth2:\n  token_endpoint: https://t.example/token\n  client_id: c\n"
	    "  scope: x\n  client_secret_credential: pop-pw\n");

	unsetenv("CREDENTIALS_DIRECTORY");
	load_bad(dir, &e);
	CHECK(has_error(&e, ":5:22: password_credential: $CREDENTIALS_DIRECTORY is not set", NULL));
	CHECK(has_error(&e, ":11:29: oauth2.client_secret_credential: $CREDENTIALS_DIRECTORY",
			NULL));
	conf_errors_clear(&e);

	setenv("CREDENTIALS_DIRECTORY", creds, 1);
	set = load_ok(dir);
	if (set != NULL) {
		CHECK_STR(conf_find(set, "a")->password, "cred-pw");
		CHECK_STR(conf_find(set, "a")->oauth2.client_secret, "cred-pw");
	}
	conf_set_free(set);

	put(dir, "conf.d/a.yaml", 0600,
	    "id: a\nserver: s\nuser: u\nsave_directory: /s\npassword_credential: ../x\n");
	put(dir, "conf.d/b.yaml", 0600,
	    "id: b\nserver: s\nuser: u\nsave_directory: /s\npassword_credential: missing\n");
	load_bad(dir, &e);
	CHECK(has_error(&e, "a.yaml:5:22: password_credential: must be a credential name", NULL));
	CHECK(has_error(&e, "b.yaml:5:22: password_credential: cannot open", "missing"));
	conf_errors_clear(&e);
	unsetenv("CREDENTIALS_DIRECTORY");
}

static void
test_inline_secret_mode(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	const char *f = path_of(dir, "conf.d/a.yaml");
	char want[1024];

	put(dir, "conf.d/a.yaml", 0640,
	    "id: a\nserver: s\nuser: u\npassword: very-secret-1\nsave_directory: /s\n"
	    "smime:\n  key_name: k\n  key_password: very-secret-2\n");
	put(dir, "conf.d/b.yaml", 0604,
	    "id: b\nserver: s\nuser: u\npassword_file: /dev/null\nsave_directory: /s\n"
	    "auth: oauth2\noauth2:\n  token_endpoint: https://t\n  client_id: c\n  scope: x\n"
	    "  client_secret: very-secret-3\n");
	load_bad(dir, &e);
	snprintf(want, sizeof(want),
		 "%s:4:11: password: %s holds this secret inline and is readable by group or "
		 "others (chmod 600)",
		 f, f);
	CHECK(has_error(&e, want, NULL));
	CHECK(has_error(&e, "a.yaml:8:17: smime.key_password: ", "(chmod 600)"));
	CHECK(has_error(&e, "b.yaml:11:18: oauth2.client_secret: ", "(chmod 600)"));
	CHECK(no_error_contains(&e, "very-secret"));
	conf_errors_clear(&e);
}

static void
test_secret_conflicts(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};

	put(dir, "conf.d/a.yaml", 0600,
	    "id: a\n" BASE "password_file: /etc/x\n"
	    "auth: oauth2\noauth2:\n  token_endpoint: https://t\n  client_id: c\n  scope: x\n"
	    "  client_secret: a\n  client_secret_credential: b\n"
	    "smime:\n  key_password: k\n");
	load_bad(dir, &e);
	CHECK(has_error(&e,
			":6:16: password_file: only one of password, password_file and "
			"password_credential may be set",
			NULL));
	CHECK(has_error(&e, ":13:29: oauth2.client_secret_credential: only one of client_secret",
			NULL));
	CHECK(has_error(&e, ":15:17: smime.key_password: has no effect without smime.key_name",
			NULL));
	CHECK(e.n == 3);
	conf_errors_clear(&e);
}

/* user and secrets go into protocol lines: no line breaks smuggled in */
static void
test_line_breaks(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	char *secret_file = xasprintf("%s/pw", dir);

	put(dir, "pw", 0600, "first\rDELE 1\nsecond line\n");
	put(dir, "conf.d/a.yaml", 0600,
	    "id: a\nserver: s\nuser: \"u\\r\\nDELE 1\"\npassword: \"p\\nQUIT\"\n"
	    "save_directory: /tmp/x\n");
	char *b = xasprintf("id: b\nserver: s\nuser: u\npassword_file: %s\n"
			    "save_directory: /tmp/x\n",
			    secret_file);
	put(dir, "conf.d/b.yaml", 0600, b);
	load_bad(dir, &e);
	CHECK(has_error(&e, "a.yaml:3:7: user: must not contain control characters", NULL));
	CHECK(has_error(&e, "a.yaml:4:11: password: must not contain a line break", NULL));
	CHECK(has_error(&e, "b.yaml:4:16: password_file: must not contain a line break", NULL));
	CHECK(no_error_contains(&e, "QUIT") && no_error_contains(&e, "DELE"));
	CHECK(e.n == 3);
	conf_errors_clear(&e);
	free(b);
	free(secret_file);
}

static void
test_unknown_and_types(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	const char *f = path_of(dir, "conf.d/t.yaml");
	char want[1024];

	put(dir, "conf.d/t.yaml", 0600,
	    "id: t\n" BASE				/* lines 1-5 */
	    "colour: red\n"				/* 6 */
	    "port: abc\n"				/* 7 */
	    "tls_verify: maybe\n"			/* 8 */
	    "poll_interval: 0\n"			/* 9 */
	    "max_message_size: 0\n"			/* 10 */
	    "status: paused\n"				/* 11 */
	    "timeouts:\n  connect: 2h\n  wait: 1\n"	/* 12-14 */
	    "oauth2:\n  foo: bar\n  grant: password\n"	/* 15-17 */
	    "sasl_mechanisms: [PLAIN, GSSAPI, plain]\n" /* 18 */
	    "receive: [all]\n"				/* 19 */
	    "tls_fingerprint: sha256:abcd\n"		/* 20 */
	    "description:\n"				/* 21 */
	    "tls: IMPLICIT\n");				/* 22 */
	put(dir, "conf.d/u.yaml", 0600,
	    "id: u\n" BASE "poll_interval: 8d\n"
	    "max_message_size: lots\n"
	    "timeouts:\n  command: soon\n"
	    "sasl_mechanisms: []\n"
	    "port: 70000\n"
	    "auth: kerberos\n"
	    "smime:\n  key_name: ../evil\n"
	    "oauth2: yes\n");
	load_bad(dir, &e);
	snprintf(want, sizeof(want), "%s:6:1: colour: unknown key", f);
	CHECK(has_error(&e, want, NULL));
	CHECK(has_error(&e, ":7:7: port: expected a number", NULL));
	CHECK(has_error(&e, ":8:13: tls_verify: expected true or false", NULL));
	CHECK(has_error(&e, ":9:16: poll_interval: must be between 1s and 7d", NULL));
	CHECK(has_error(&e, ":10:19: max_message_size: must be at least 1 byte", NULL));
	CHECK(has_error(&e, ":11:9: status: must be one of active, inactive", NULL));
	CHECK(has_error(&e, ":13:12: timeouts.connect: must be between 1s and 1h", NULL));
	CHECK(has_error(&e, ":14:3: timeouts.wait: unknown key", NULL));
	CHECK(has_error(&e, ":16:3: oauth2.foo: unknown key", NULL));
	CHECK(has_error(&e,
			":17:10: oauth2.grant: must be one of client_credentials, refresh_token",
			NULL));
	CHECK(has_error(&e, ":18:26: sasl_mechanisms: unknown mechanism", NULL));
	CHECK(has_error(&e, ":18:34: sasl_mechanisms: PLAIN is listed twice", NULL));
	CHECK(has_error(&e, ":19:10: receive: expected a name, not a list", NULL));
	CHECK(has_error(&e, ":20:18: tls_fingerprint: must be sha256:", NULL));
	CHECK(has_error(&e, ":22:6: tls: must be one of implicit", NULL));
	CHECK(has_error(&e, "u.yaml:6:16: poll_interval: must be between 1s and 7d", NULL));
	CHECK(has_error(&e, "u.yaml:7:19: max_message_size: expected a size", NULL));
	CHECK(has_error(&e, "u.yaml:9:12: timeouts.command: expected a duration", NULL));
	CHECK(has_error(&e, "u.yaml:10:18: sasl_mechanisms: must not be empty", NULL));
	CHECK(has_error(&e, "u.yaml:11:7: port: must be between 1 and 65535", NULL));
	CHECK(has_error(&e, "u.yaml:12:7: auth: must be one of sasl, oauth2", NULL));
	CHECK(has_error(&e, "u.yaml:14:13: smime.key_name: must be a name", NULL));
	CHECK(has_error(&e, "u.yaml:15:9: oauth2: expected a mapping", NULL));
	CHECK(e.n == 23);
	if (e.n != 23)
		dump(&e);
	conf_errors_clear(&e);
}

static void
test_fingerprint_forms(void)
{
	const char *dir = new_dir(true);
	struct conf_set *set;

	put(dir, "conf.d/a.yaml", 0600, "id: a\n" BASE "tls_fingerprint: sha256:" FP_HEX "\n");
	set = load_ok(dir);
	if (set != NULL) {
		const struct conf_mailbox *m = conf_find(set, "a");
		CHECK(m->has_fingerprint && m->tls_fingerprint[9] == 0x99 &&
		      m->tls_fingerprint[10] == 0xaa);
	}
	conf_set_free(set);
}

static void
test_structure(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};

	put(dir, "conf.d/1-syntax.yaml", 0600, "id: a\nserver: [x\n");
	put(dir, "conf.d/2-list.yaml", 0600, "- id: b\n");
	put(dir, "conf.d/3-dup.yaml", 0600, "id: c\n" BASE "id: c2\n");
	put(dir, "conf.d/4-docs.yaml", 0600, "id: d\n" BASE "---\nid: e\n");
	put(dir, "conf.d/5-empty.yaml", 0600, "");
	put(dir, "conf.d/6-tab.yml", 0600, "id: f\n\tserver: x\n");
	put(dir, "conf.d/7-key.yaml", 0600, "id: g\n" BASE "[a, b]: c\n");
	load_bad(dir, &e);
	CHECK(has_error(&e, "1-syntax.yaml:3:1: (syntax): ", NULL));
	CHECK(has_error(&e, "2-list.yaml:1:1: (top level): expected a mapping", NULL));
	CHECK(has_error(&e, "3-dup.yaml:6:1: id: duplicate key", NULL));
	CHECK(has_error(&e, "4-docs.yaml:7:1: (document): only one YAML document per file", NULL));
	CHECK(has_error(&e, "5-empty.yaml:1:1: (top level): expected a mapping", NULL));
	CHECK(has_error(&e, "6-tab.yml:", ": (syntax): "));
	CHECK(has_error(&e, "7-key.yaml:6:1: (key): keys must be plain names", NULL));
	CHECK(e.n == 7);
	conf_errors_clear(&e);
}

static void
test_required(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	struct conf_set *set;

	put(dir, "conf.d/a.yaml", 0600, "description: none of it\n");
	put(dir, "conf.d/b.yaml", 0600,
	    "id: b\nserver: s\nuser: u\npassword: p\nsave_directory: rel/dir\n");
	put(dir, "conf.d/c.yaml", 0600,
	    "id: c!\nserver: s\nuser: u\npassword: p\nsave_directory: /s\n");
	put(dir, "conf.d/d.yaml", 0600,
	    "id: "
	    "x234567890123456789012345678901234567890123456789012345678901234"
	    "5\n"
	    "server: s\nuser: u\npassword: p\nsave_directory: /s\n");
	put(dir, "conf.d/e.yaml", 0600,
	    "id: ..\nserver: \"\"\nuser: u\npassword: p\nsave_text: false\n");
	load_bad(dir, &e);
	CHECK(has_error(&e, "a.yaml:1:1: id: required", NULL));
	CHECK(has_error(&e, "a.yaml:1:1: server: required (here or in popfetchd.yaml defaults)",
			NULL));
	CHECK(has_error(&e, "a.yaml:1:1: user: required (here or in popfetchd.yaml defaults)",
			NULL));
	CHECK(has_error(&e, "a.yaml:1:1: password: required for auth: sasl", NULL));
	CHECK(has_error(&e,
			"a.yaml:1:1: save_directory: required when save_text or "
			"save_attachments is true",
			NULL));
	CHECK(has_error(&e, "b.yaml:5:17: save_directory: must be an absolute path", NULL));
	CHECK(has_error(&e, "c.yaml:1:5: id: must be 1-64 characters", NULL));
	CHECK(has_error(&e, "d.yaml:1:5: id: must be 1-64 characters", NULL));
	CHECK(has_error(&e, "e.yaml:1:5: id: must be 1-64", NULL));
	CHECK(has_error(&e, "e.yaml:2:9: server: expected a string, the value is empty", NULL));
	CHECK(has_error(&e, "e.yaml:1:1: save_directory: required", NULL));
	CHECK(no_error_contains(&e, "b.yaml:1:1"));
	CHECK(e.n == 11);
	conf_errors_clear(&e);

	/* no save flag, no directory; 64 characters are fine */
	dir = new_dir(true);
	put(dir, "conf.d/a.yaml", 0600,
	    "id: x234567890123456789012345678901234567890123456789012345678901234\n"
	    "server: s\nuser: u\npassword: p\nsave_text: false\nsave_attachments: false\n");
	set = load_ok(dir);
	if (set != NULL)
		CHECK(set->mailboxes[0]->save_directory == NULL);
	conf_set_free(set);
}

static void
test_oauth2(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	struct conf_set *set;
	char text[1024];

	put(dir, "cs", 0600, "client-secret\n");
	snprintf(text, sizeof(text),
		 "id: ok\nserver: outlook.office365.com\nuser: box@example.com\nauth: oauth2\n"
		 "save_directory: /srv/ok\noauth2:\n"
		 "  token_endpoint: https://login.microsoftonline.com/T/oauth2/v2.0/token\n"
		 "  client_id: app\n  client_secret_file: %s/cs\n"
		 "  scope: https://outlook.office365.com/.default\n",
		 dir);
	put(dir, "conf.d/ok.yaml", 0600, text);
	set = load_ok(dir);
	if (set != NULL) {
		const struct conf_mailbox *m = conf_find(set, "ok");
		CHECK(m->auth == CONF_AUTH_OAUTH2 && m->password == NULL);
		CHECK_STR(m->oauth2.client_secret, "client-secret");
		CHECK_STR(conf_auth_name(m->auth), "oauth2");
	}
	conf_set_free(set);

	put(dir, "conf.d/a.yaml", 0600,
	    "id: a\nserver: s\nuser: u\nsave_directory: /s\nauth: oauth2\n");
	put(dir, "conf.d/b.yaml", 0600,
	    "id: b\nserver: s\nuser: u\nsave_directory: /s\nauth: oauth2\n"
	    "oauth2:\n  token_endpoint: http://t.example/\n  client_id: c\n"
	    "  grant: refresh_token\n");
	load_bad(dir, &e);
	CHECK(has_error(&e, "a.yaml:1:1: oauth2.token_endpoint: required for auth: oauth2", NULL));
	CHECK(has_error(&e, "a.yaml:1:1: oauth2.client_id: required for auth: oauth2", NULL));
	CHECK(has_error(&e,
			"a.yaml:1:1: oauth2.client_secret: required for grant client_credentials",
			NULL));
	CHECK(has_error(&e, "a.yaml:1:1: oauth2.scope: required for grant client_credentials",
			NULL));
	CHECK(has_error(&e, "b.yaml:7:19: oauth2.token_endpoint: must be an https:// URL", NULL));
	CHECK(has_error(&e,
			"b.yaml:1:1: oauth2.refresh_token_file: required for grant refresh_token",
			NULL));
	CHECK(e.n == 6);
	conf_errors_clear(&e);
}

static void
test_duplicates_and_collection(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	char want[1024];

	put(dir, "conf.d/one.yaml", 0600, "id: same\n" BASE);
	put(dir, "conf.d/two.yaml", 0600, "id: same\n" BASE);
	put(dir, "conf.d/three.yml", 0600, "id: same\n" BASE);
	put(dir, "conf.d/zz.yaml", 0600, "id: zz\n" BASE "port: 0\n");
	put(dir, "conf.d/good.yaml", 0600, "id: good\n" BASE);
	load_bad(dir, &e);
	/* files in name order: one, three, two */
	snprintf(want, sizeof(want), "%s:1:5: id: duplicate id \"same\", already used in %s",
		 path_of(dir, "conf.d/three.yml"), path_of(dir, "conf.d/one.yaml"));
	CHECK(has_error(&e, want, NULL));
	snprintf(want, sizeof(want), "%s:1:5: id: duplicate id \"same\", already used in %s",
		 path_of(dir, "conf.d/two.yaml"), path_of(dir, "conf.d/one.yaml"));
	CHECK(has_error(&e, want, NULL));
	CHECK(has_error(&e, "zz.yaml:6:7: port:", NULL));
	CHECK(e.n == 3);
	conf_errors_clear(&e);
}

static void
test_misc(void)
{
	struct conf_errors e = {0};
	struct conf_set *set;
	const char *dir;

	conf_set_free(NULL);
	conf_errors_clear(&e);
	CHECK(e.n == 0);
	CHECK_STR(conf_tls_name(CONF_TLS_IMPLICIT), "implicit");
	CHECK_STR(conf_tls_name(CONF_TLS_EXPLICIT), "explicit");
	CHECK_STR(conf_tls_name(CONF_TLS_NONE), "none");
	CHECK_STR(conf_auth_name(CONF_AUTH_SASL), "sasl");
	CHECK_STR(conf_auth_name(CONF_AUTH_OAUTH2), "oauth2");
	CHECK_STR(conf_default_sasl_mechanisms[0], "SCRAM-SHA-256-PLUS");
	CHECK_STR(conf_default_sasl_mechanisms[7], "USER");
	CHECK(conf_default_sasl_mechanisms[8] == NULL);

	load_bad("/nonexistent/popfetchd-test", &e);
	CHECK(has_error(&e, "/nonexistent/popfetchd-test:1:1: (directory): cannot open", NULL));
	conf_errors_clear(&e);

	/* sorted by id regardless of file names; conf_find */
	dir = new_dir(true);
	put(dir, "conf.d/1.yaml", 0600, "id: zeta\n" BASE);
	put(dir, "conf.d/2.yaml", 0600, "id: alpha\n" BASE);
	put(dir, "conf.d/3.yaml", 0600, "id: Mid\n" BASE);
	set = load_ok(dir);
	if (set != NULL && set->n_mailboxes == 3) {
		CHECK_STR(set->mailboxes[0]->id, "Mid");
		CHECK_STR(set->mailboxes[1]->id, "alpha");
		CHECK_STR(set->mailboxes[2]->id, "zeta");
		CHECK_STR(conf_find(set, "alpha")->file, path_of(dir, "conf.d/2.yaml"));
		CHECK(conf_find(set, "nope") == NULL);
	}
	conf_set_free(set);
}

/*
 * The shard of an id is part of the deployment: processes of different
 * releases sharing one tree must agree. These values are FNV-1a 64 as
 * published (the "a" vector is FNV's own), never to change.
 */
static void
test_shard_hash(void)
{
	static const struct {
		const char *id;
		uint64_t hash;
		unsigned of2, of3, of10;
	} want[] = {
		{"a", 0xaf63dc4c8601ec8cULL, 1, 2, 7},
		{"invoices", 0x624f59ba098b0299ULL, 2, 3, 6},
		{"support", 0x11b17b9125e871a8ULL, 1, 2, 3},
		{"sales", 0xbae63d0d8eb40ab7ULL, 2, 1, 6},
		{"billing-2", 0x3033998485a53543ULL, 2, 2, 8},
		{"m001", 0xb65f9ca3b51c4babULL, 2, 2, 2},
		{"m002", 0xb65f9da3b51c4d5eULL, 1, 3, 3},
	};

	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		CHECK(conf_shard_hash(want[i].id) == want[i].hash);
		CHECK(conf_shard_of(want[i].id, 1) == 1);
		CHECK(conf_shard_of(want[i].id, 2) == want[i].of2);
		CHECK(conf_shard_of(want[i].id, 3) == want[i].of3);
		CHECK(conf_shard_of(want[i].id, 10) == want[i].of10);
	}
}

static void
test_shard_setting(void)
{
	const char *dir = new_dir(true);
	struct conf_errors e = {0};
	struct conf_set *set;
	const char *f = path_of(dir, "popfetchd.yaml");

	put(dir, "conf.d/a.yaml", 0600, "id: a\n" BASE);
	set = load_ok(dir);
	CHECK(set != NULL && set->shard == 1 && set->shards == 1);
	CHECK(set != NULL && conf_in_shard(set, "a") && conf_in_shard(set, "invoices"));
	conf_set_free(set);

	put(dir, "popfetchd.yaml", 0600, "shard: 2/3\n");
	set = load_ok(dir);
	CHECK(set != NULL && set->shard == 2 && set->shards == 3);
	CHECK(set != NULL && conf_in_shard(set, "a") && !conf_in_shard(set, "invoices"));
	conf_set_free(set);

	static const struct {
		const char *value, *error;
	} bad[] = {
		{"0/2", ":1:8: shard: K must be between 1 and N (2)"},
		{"3/2", ":1:8: shard: K must be between 1 and N (2)"},
		{"1/0", ":1:8: shard: N must be between 1 and 1000"},
		{"1/1001", ":1:8: shard: N must be between 1 and 1000"},
		{"2", ":1:8: shard: expected K/N"},
		{"1/2/3", ":1:8: shard: expected K/N"},
		{"-1/2", ":1:8: shard: expected K/N"},
		{"1/ 2", ":1:8: shard: expected K/N"},
		{"half", ":1:8: shard: expected K/N"},
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char text[64];
		snprintf(text, sizeof(text), "shard: \"%s\"\n", bad[i].value);
		put(dir, "popfetchd.yaml", 0600, text);
		load_bad(dir, &e);
		CHECK(has_error(&e, f, bad[i].error));
		conf_errors_clear(&e);
	}
}

int
main(void)
{
	unsetenv("CREDENTIALS_DIRECTORY");
	unsetenv("STATE_DIRECTORY");
	test_empty();
	test_full();
	test_minimal_defaults();
	test_ports();
	test_daemon_settings();
	test_daemon_errors();
	test_metrics_listen();
	test_secret_files();
	test_credentials();
	test_inline_secret_mode();
	test_secret_conflicts();
	test_line_breaks();
	test_unknown_and_types();
	test_fingerprint_forms();
	test_structure();
	test_required();
	test_oauth2();
	test_duplicates_and_collection();
	test_misc();
	test_shard_hash();
	test_shard_setting();
	for (size_t i = 0; i < n_dirs; i++) {
		nftw(dirs[i], rm_one, 16, FTW_DEPTH | FTW_PHYS);
		free(dirs[i]);
	}
	CHECK_DONE();
}
