/* Unit tests: status.json written, carried on and replaced atomically; the
 * daemon's claim; the status command's JSON and exit codes. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "check.h"
#include "popfetchd/status.h"

static char root[] = "/tmp/pfd-status-XXXXXX";

static json_t *
load(const char *id)
{
	char path[300];
	json_error_t e;

	snprintf(path, sizeof(path), "%s/%s/status.json", root, id);
	return json_load_file(path, 0, &e);
}

static long long
num(const json_t *o, const char *key)
{
	return json_integer_value(json_object_get(o, key));
}

static const char *
str(const json_t *o, const char *key)
{
	return json_string_value(json_object_get(o, key));
}

static ino_t
inode(const char *id)
{
	char path[300];
	struct stat st;

	snprintf(path, sizeof(path), "%s/%s/status.json", root, id);
	return stat(path, &st) == 0 ? st.st_ino : 0;
}

/* The keys of o, in order, joined by ",". */
static void
keys(const json_t *o, char *buf, size_t len)
{
	const char *k;
	json_t *v;

	buf[0] = '\0';
	json_object_foreach((json_t *)o, k, v)
	{
		strncat(buf, k, len - strlen(buf) - 1);
		strncat(buf, ",", len - strlen(buf) - 1);
	}
}

static void
fields_and_values(void)
{
	struct status_poll p = {.started_at = 1795000000,
				.finished_at = 1795000002,
				.messages_saved = 3,
				.bytes_saved = 3000,
				.messages_deleted = 3,
				.tls_expires_at = 1800000000,
				.next_poll_at = 1795000302};
	char why[256], k[512];
	json_t *o;

	CHECK(status_record_poll(root, "a", &p, why, sizeof(why)) == 0);
	CHECK((o = load("a")) != NULL);
	keys(o, k, sizeof(k));
	CHECK_STR(k, "configuration,state,last_poll,last_success_at,consecutive_failures,"
		     "next_poll_at,totals,tls_certificate_expires_at,");
	keys(json_object_get(o, "last_poll"), k, sizeof(k));
	CHECK_STR(k, "started_at,finished_at,result,exit_code,error,messages_saved,bytes_saved,"
		     "messages_deleted,");
	keys(json_object_get(o, "totals"), k, sizeof(k));
	CHECK_STR(k, "messages_saved,bytes_saved,");
	CHECK_STR(str(o, "configuration"), "a");
	CHECK_STR(str(o, "state"), "active");
	CHECK_STR(str(json_object_get(o, "last_poll"), "started_at"), "2026-11-18T11:06:40Z");
	CHECK_STR(str(json_object_get(o, "last_poll"), "result"), "ok");
	CHECK(json_is_null(json_object_get(json_object_get(o, "last_poll"), "error")));
	CHECK_STR(str(o, "last_success_at"), "2026-11-18T11:06:42Z");
	CHECK_STR(str(o, "next_poll_at"), "2026-11-18T11:11:42Z");
	CHECK_STR(str(o, "tls_certificate_expires_at"), "2027-01-15T08:00:00Z");
	CHECK(num(json_object_get(o, "totals"), "bytes_saved") == 3000);
	json_decref(o);
}

static void
carried_on(void)
{
	struct status_poll fail = {.started_at = 1795000400,
				   .finished_at = 1795000401,
				   .exit_code = 77,
				   .error = "authentication failed: -ERR [AUTH] no"};
	struct status_poll ok = {.started_at = 1795000500,
				 .finished_at = 1795000501,
				 .messages_saved = 2,
				 .bytes_saved = 100};
	char why[256];
	json_t *o;

	CHECK(status_record_poll(root, "a", &fail, why, sizeof(why)) == 0);
	CHECK(status_record_poll(root, "a", &fail, why, sizeof(why)) == 0);
	o = load("a");
	CHECK(num(o, "consecutive_failures") == 2);
	CHECK_STR(str(json_object_get(o, "last_poll"), "result"), "failed");
	CHECK(num(json_object_get(o, "last_poll"), "exit_code") == 77);
	CHECK_STR(str(json_object_get(o, "last_poll"), "error"),
		  "authentication failed: -ERR [AUTH] no");
	CHECK_STR(str(o, "last_success_at"), "2026-11-18T11:06:42Z"); /* kept */
	CHECK(json_is_null(json_object_get(o, "next_poll_at")));      /* a one-shot's */
	/* a failed poll that saw no certificate keeps the last one seen */
	CHECK_STR(str(o, "tls_certificate_expires_at"), "2027-01-15T08:00:00Z");
	CHECK(num(json_object_get(o, "totals"), "messages_saved") == 3);
	json_decref(o);

	CHECK(status_record_poll(root, "a", &ok, why, sizeof(why)) == 0);
	o = load("a");
	CHECK(num(o, "consecutive_failures") == 0);
	CHECK(num(json_object_get(o, "totals"), "messages_saved") == 5);
	CHECK(num(json_object_get(o, "totals"), "bytes_saved") == 3100);
	CHECK_STR(str(o, "last_success_at"), "2026-11-18T11:15:01Z");
	/* succeeded without TLS: no certificate */
	CHECK(json_is_null(json_object_get(o, "tls_certificate_expires_at")));
	json_decref(o);
}

/* Each record a new file renamed over the old: no temporary left, modes. */
static void
atomic(void)
{
	struct status_poll ok = {.started_at = 1795000600, .finished_at = 1795000601};
	char why[256], path[300];
	ino_t before = inode("a");
	struct stat st;
	struct dirent *de;
	DIR *d;
	int n = 0;

	CHECK(status_record_poll(root, "a", &ok, why, sizeof(why)) == 0);
	CHECK(inode("a") != 0 && inode("a") != before);
	snprintf(path, sizeof(path), "%s/a", root);
	CHECK((d = opendir(path)) != NULL);
	while (d != NULL && (de = readdir(d)) != NULL)
		n += de->d_name[0] != '.' || strlen(de->d_name) > 2;
	if (d != NULL)
		closedir(d);
	CHECK(n == 1);
	CHECK(stat(path, &st) == 0 && (st.st_mode & 07777) == STATUS_DIR_MODE);
	snprintf(path, sizeof(path), "%s/a/status.json", root);
	CHECK(stat(path, &st) == 0 && (st.st_mode & 07777) == STATUS_FILE_MODE);
}

static void
damaged_and_states(void)
{
	struct status_poll ok = {.started_at = 1795000600, .finished_at = 1795000601};
	char why[256], path[300];
	json_t *o;
	FILE *f;
	ino_t ino;

	snprintf(path, sizeof(path), "%s/b", root);
	mkdir(path, 0750);
	snprintf(path, sizeof(path), "%s/b/status.json", root);
	f = fopen(path, "w");
	fputs("{\"totals\": {\"messages_saved\": 7", f);
	fclose(f);
	CHECK(status_record_poll(root, "b", &ok, why, sizeof(why)) == 0);
	o = load("b");
	CHECK(num(json_object_get(o, "totals"), "messages_saved") == 0); /* afresh */
	json_decref(o);

	CHECK(status_record_state(root, "b", "broken: cannot load x.pem", 1795000900, why,
				  sizeof(why)) == 0);
	o = load("b");
	CHECK_STR(str(o, "state"), "broken: cannot load x.pem");
	CHECK_STR(str(o, "next_poll_at"), "2026-11-18T11:21:40Z");
	CHECK_STR(str(json_object_get(o, "last_poll"), "result"), "ok"); /* kept */
	json_decref(o);
	ino = inode("b");
	CHECK(status_record_state(root, "b", "broken: cannot load x.pem", 1795000900, why,
				  sizeof(why)) == 0);
	CHECK(inode("b") == ino); /* unchanged: not written again */

	CHECK(status_record_state(root, "c", "inactive", 0, why, sizeof(why)) == 0);
	o = load("c");
	CHECK_STR(str(o, "state"), "inactive");
	CHECK(json_is_null(json_object_get(o, "last_poll")));
	CHECK(num(o, "consecutive_failures") == 0);
	json_decref(o);
}

/* status_show's JSON (to a file) and exit code. */
static int
show(const char *id, json_t **ret)
{
	char path[300];
	json_error_t e;
	int code;

	snprintf(path, sizeof(path), "%s/out.json", root);
	fflush(stdout);
	if (freopen(path, "w", stdout) == NULL)
		abort();
	code = status_show(NULL, root, id, true);
	fflush(stdout);
	*ret = json_load_file(path, 0, &e);
	return code;
}

static void
command(void)
{
	char why[256];
	json_t *o;
	int fd;

	/* a: ok; b: broken; c: inactive */
	CHECK(show(NULL, &o) == 75);
	CHECK(json_array_size(json_object_get(o, "configurations")) == 3);
	CHECK(json_is_false(json_object_get(json_object_get(o, "daemon"), "running")));
	json_decref(o);
	CHECK(show("a", &o) == 0);
	CHECK(json_array_size(json_object_get(o, "configurations")) == 1);
	json_decref(o);
	CHECK(show("c", &o) == 0); /* inactive: not counted */
	json_decref(o);
	CHECK(show("nope", &o) == 78);
	json_decref(o);

	CHECK((fd = status_daemon_claim(root, why, sizeof(why))) >= 0);
	CHECK(status_daemon_claim(root, why, sizeof(why)) == -EBUSY);
	CHECK(strstr(why, "another daemon") != NULL);
	show("a", &o);
	CHECK(json_is_true(json_object_get(json_object_get(o, "daemon"), "running")));
	CHECK(json_integer_value(json_object_get(json_object_get(o, "daemon"), "pid")) == getpid());
	json_decref(o);
	close(fd);
	show("a", &o);
	CHECK(json_is_false(json_object_get(json_object_get(o, "daemon"), "running")));
	json_decref(o);
}

int
main(void)
{
	char cmd[400];

	if (mkdtemp(root) == NULL)
		return 2;
	fields_and_values();
	carried_on();
	atomic();
	damaged_and_states();
	command();
	snprintf(cmd, sizeof(cmd), "rm -rf %s", root);
	if (system(cmd) != 0)
		return 2;
	CHECK_DONE();
}
