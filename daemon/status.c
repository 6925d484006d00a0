/*
 * status — status.json per configuration, the daemon's claim on its state
 * directory, and the `status` command (see status.h).
 *
 * A status.json is read back as a whole object with every field of
 * DESIGN.md §7 in its order (status_load: a missing or damaged one starts
 * afresh), changed, and replaced with util_write_atomic.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <unistd.h>

#include <jansson.h>

#include "popfetchd/config.h"
#include "popfetchd/log.h"
#include "popfetchd/status.h"
#include "popfetchd/util.h"

#define PID_FILE "popfetchd.pid"

/* ---- times ---- */

/* RFC 3339 in UTC: "2026-11-26T10:15:02Z" (buf >= 21 bytes). */
static void
time_text(time_t t, char *buf, size_t len)
{
	struct tm tm;

	if (gmtime_r(&t, &tm) == NULL || strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
		snprintf(buf, len, "?");
}

static json_t *
time_json(time_t t)
{
	char buf[32];

	if (t == 0)
		return json_null();
	time_text(t, buf, sizeof(buf));
	return json_string(buf);
}

/* A time as status.json writes it, or 0. */
static time_t
time_parse(const json_t *v)
{
	struct tm tm = {0};
	const char *s = json_string_value(v), *end;

	if (s == NULL || (end = strptime(s, "%Y-%m-%dT%H:%M:%SZ", &tm)) == NULL || *end != '\0')
		return 0;
	return timegm(&tm);
}

/* ---- status.json ---- */

/* old's value of key when it has this type, else dflt (a new reference). */
static json_t *
kept(const json_t *old, const char *key, json_type type, json_t *dflt)
{
	json_t *v = json_object_get(old, key);

	if (v == NULL || json_typeof(v) != type ||
	    (type == JSON_INTEGER && json_integer_value(v) < 0))
		return dflt;
	json_decref(dflt);
	return json_deep_copy(v);
}

/* A kept time: a string, or null. */
static json_t *
kept_time(const json_t *old, const char *key)
{
	return time_parse(json_object_get(old, key)) ? kept(old, key, JSON_STRING, NULL)
						     : json_null();
}

/* The object to write for id, every field in the order of DESIGN.md §7,
 * with what old holds of them. */
static json_t *
normalize(const json_t *old, const char *id)
{
	json_t *o = json_object(), *totals = json_object();
	const json_t *ot = json_object_get(old, "totals");

	json_object_set_new(o, "configuration", json_string(id));
	json_object_set_new(o, "state", kept(old, "state", JSON_STRING, json_string("active")));
	json_object_set_new(o, "last_poll", kept(old, "last_poll", JSON_OBJECT, json_null()));
	json_object_set_new(o, "last_success_at", kept_time(old, "last_success_at"));
	json_object_set_new(o, "consecutive_failures",
			    kept(old, "consecutive_failures", JSON_INTEGER, json_integer(0)));
	json_object_set_new(o, "next_poll_at", kept_time(old, "next_poll_at"));
	json_object_set_new(totals, "messages_saved",
			    kept(ot, "messages_saved", JSON_INTEGER, json_integer(0)));
	json_object_set_new(totals, "bytes_saved",
			    kept(ot, "bytes_saved", JSON_INTEGER, json_integer(0)));
	json_object_set_new(o, "totals", totals);
	json_object_set_new(o, "tls_certificate_expires_at",
			    kept_time(old, "tls_certificate_expires_at"));
	return o;
}

/*
 * state_directory/id/status.json as an object with every field: a file
 * that is missing starts afresh, and so does one that cannot be parsed
 * (logged). -errno (with why) when it cannot be read at all.
 */
static int
status_load(const char *dir, const char *id, json_t **ret, char *why, size_t whylen)
{
	char *path = xasprintf("%s/%s/status.json", dir, id);
	FILE *f = fopen(path, "re");
	json_t *old = NULL;
	json_error_t e;
	int r = 0;

	if (f == NULL && errno != ENOENT) {
		r = -errno;
		snprintf(why, whylen, "cannot read %s: %s", path, strerror(errno));
	} else if (f != NULL) {
		old = json_loadf(f, JSON_REJECT_DUPLICATES, &e);
		if (old == NULL || !json_is_object(old))
			log_warning(id, "%s: not a status file (%s): it starts afresh", path,
				    old == NULL ? e.text : "not an object");
		fclose(f);
	}
	if (r == 0)
		*ret = normalize(old, id);
	json_decref(old);
	free(path);
	return r;
}

static int
status_save(const char *dir, const char *id, const json_t *o, char *why, size_t whylen)
{
	char *sdir = xasprintf("%s/%s", dir, id), *path = xasprintf("%s/status.json", sdir);
	char *json = json_dumps(o, JSON_PRESERVE_ORDER | JSON_INDENT(2));
	char *text = xasprintf("%s\n", json);
	int r = util_mkdir_p(sdir, STATUS_DIR_MODE);

	if (r < 0)
		snprintf(why, whylen, "cannot create %s: %s", sdir, strerror(-r));
	else
		r = util_write_atomic(path, NULL, text, strlen(text), STATUS_FILE_MODE, why,
				      whylen);
	FREE_ALL(sdir, path, json, text);
	return r;
}

static json_t *
poll_json(const struct status_poll *p)
{
	json_t *o = json_object();

	json_object_set_new(o, "started_at", time_json(p->started_at));
	json_object_set_new(o, "finished_at", time_json(p->finished_at));
	json_object_set_new(o, "result", json_string(p->exit_code == 0 ? "ok" : "failed"));
	json_object_set_new(o, "exit_code", json_integer(p->exit_code));
	json_object_set_new(o, "error", p->error ? json_string(p->error) : json_null());
	json_object_set_new(o, "messages_saved", json_integer((json_int_t)p->messages_saved));
	json_object_set_new(o, "bytes_saved", json_integer((json_int_t)p->bytes_saved));
	json_object_set_new(o, "messages_deleted", json_integer((json_int_t)p->messages_deleted));
	return o;
}

static void
add_to(json_t *o, const char *key, unsigned long long n)
{
	json_object_set_new(
		o, key, json_integer(json_integer_value(json_object_get(o, key)) + (json_int_t)n));
}

int
status_record_poll(const char *state_directory, const char *id, const struct status_poll *p,
		   char *why, size_t whylen)
{
	json_t *o, *totals;
	bool ok = p->exit_code == 0;
	int r;

	if ((r = status_load(state_directory, id, &o, why, whylen)) < 0)
		return r;
	totals = json_object_get(o, "totals");
	json_object_set_new(o, "state", json_string("active"));
	json_object_set_new(o, "last_poll", poll_json(p));
	if (ok)
		json_object_set_new(o, "last_success_at", time_json(p->finished_at));
	json_object_set_new(
		o, "consecutive_failures",
		json_integer(ok ? 0
				: json_integer_value(json_object_get(o, "consecutive_failures")) +
					     1));
	json_object_set_new(o, "next_poll_at", time_json(p->next_poll_at));
	add_to(totals, "messages_saved", p->messages_saved);
	add_to(totals, "bytes_saved", p->bytes_saved);
	/* the certificate of the last handshake; none after a poll that
	 * succeeded without one (tls: none) */
	if (p->tls_expires_at != 0 || ok)
		json_object_set_new(o, "tls_certificate_expires_at", time_json(p->tls_expires_at));
	r = status_save(state_directory, id, o, why, whylen);
	json_decref(o);
	return r;
}

int
status_record_state(const char *state_directory, const char *id, const char *state,
		    time_t next_poll_at, char *why, size_t whylen)
{
	json_t *o, *next = time_json(next_poll_at);
	char *path = xasprintf("%s/%s/status.json", state_directory, id);
	struct stat st;
	int r = status_load(state_directory, id, &o, why, whylen);

	if (r == 0) {
		if (stat(path, &st) < 0 ||
		    strcmp(json_string_value(json_object_get(o, "state")), state) != 0 ||
		    !json_equal(json_object_get(o, "next_poll_at"), next)) {
			json_object_set_new(o, "state", json_string(state));
			json_object_set(o, "next_poll_at", next);
			r = status_save(state_directory, id, o, why, whylen);
		}
		json_decref(o);
	}
	json_decref(next);
	free(path);
	return r;
}

/* ---- the daemon's claim ---- */

/* An OFD lock on the whole file: released when the descriptor closes;
 * F_OFD_GETLK tests it without taking it. */
static int
pid_lock(int fd, int cmd, short type, struct flock *fl)
{
	*fl = (struct flock){.l_type = type, .l_whence = SEEK_SET};
	return fcntl(fd, cmd, fl);
}

/* The pid written in the file, or 0. */
static long
pid_read(int fd)
{
	char buf[32];
	ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);

	if (n <= 0)
		return 0;
	buf[n] = '\0';
	return strtol(buf, NULL, 10);
}

int
status_daemon_claim(const char *state_directory, char *why, size_t whylen)
{
	char *path = xasprintf("%s/" PID_FILE, state_directory);
	struct flock fl;
	int fd = -1, r = util_mkdir_p(state_directory, STATUS_DIR_MODE);

	if (r == 0 &&
	    (fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, STATUS_FILE_MODE)) < 0)
		r = -errno;
	if (r < 0) {
		snprintf(why, whylen, "cannot create %s: %s", path, strerror(-r));
	} else if (pid_lock(fd, F_OFD_SETLK, F_WRLCK, &fl) < 0) {
		r = errno == EAGAIN || errno == EACCES ? -EBUSY : -errno;
		snprintf(why, whylen, "%s: %s (pid %ld)", path,
			 r == -EBUSY ? "another daemon runs on this state directory" : strerror(-r),
			 pid_read(fd));
	} else if (ftruncate(fd, 0) < 0 || dprintf(fd, "%ld\n", (long)getpid()) < 0) {
		r = -errno;
		snprintf(why, whylen, "cannot write %s: %s", path, strerror(errno));
	}
	if (r < 0 && fd >= 0)
		close(fd);
	free(path);
	return r < 0 ? r : fd;
}

/* Whether a daemon holds state_directory's claim: 1 (its pid in *ret_pid),
 * 0, or -errno when that cannot be told. */
static int
daemon_running(const char *state_directory, long *ret_pid)
{
	char *path = xasprintf("%s/" PID_FILE, state_directory);
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW), r = 0;
	struct flock fl;

	free(path);
	*ret_pid = 0;
	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	if (pid_lock(fd, F_OFD_GETLK, F_WRLCK, &fl) < 0)
		r = -errno;
	else if (fl.l_type != F_UNLCK && (r = 1))
		*ret_pid = pid_read(fd);
	close(fd);
	return r;
}

/* ---- the status command ---- */

/* One configuration's line of the table, each cell printable. */
struct row {
	char id[3 * 64 + 1];
	char state[16];
	char last[64];
	char result[32];
	char saved[24];
	char total[24];
	char next[64];
	char error[1024];
	int code; /* what it adds to the exit code: 0, 75, 74 */
};

/* "2026-11-26 10:15:02 (3min ago)" in local time, or "-". */
static void
when(const json_t *v, time_t now, char *buf, size_t len)
{
	time_t t = time_parse(v);
	long d = (long)(t > now ? t - now : now - t);
	const char *unit = "s";
	struct tm tm;
	char at[32];

	if (t == 0 || localtime_r(&t, &tm) == NULL ||
	    strftime(at, sizeof(at), "%Y-%m-%d %H:%M:%S", &tm) == 0) {
		snprintf(buf, len, "-");
		return;
	}
	if (d >= 172800)
		d /= 86400, unit = "d";
	else if (d >= 7200)
		d /= 3600, unit = "h";
	else if (d >= 120)
		d /= 60, unit = "min";
	snprintf(buf, len, t > now ? "%s (in %ld%s)" : "%s (%ld%s ago)", at, d, unit);
}

static void
cell(const char *text, char *buf, size_t len)
{
	util_printable(text ? text : "-", strlen(text ? text : "-"), buf, len);
}

/* The row of o (a normalized status.json); active: what the configuration
 * says (-1: no configuration, the file's state holds). */
static void
row_fill(struct row *w, const json_t *o, int active, time_t now)
{
	const char *state = json_string_value(json_object_get(o, "state"));
	const json_t *poll = json_object_get(o, "last_poll");
	const json_t *totals = json_object_get(o, "totals");
	bool broken = strncmp(state, "broken", 6) == 0, inactive;

	inactive = active == 0 || (active < 0 && strcmp(state, "inactive") == 0);
	cell(json_string_value(json_object_get(o, "configuration")), w->id, sizeof(w->id));
	snprintf(w->state, sizeof(w->state), "%s",
		 inactive ? "inactive"
		 : broken ? "broken"
			  : "active");
	when(json_object_get(poll, "finished_at"), now, w->last, sizeof(w->last));
	if (!json_is_object(poll))
		snprintf(w->result, sizeof(w->result), "never polled");
	else if (json_integer_value(json_object_get(poll, "exit_code")) == 0)
		snprintf(w->result, sizeof(w->result), "ok");
	else
		snprintf(w->result, sizeof(w->result), "failed (%d)",
			 (int)json_integer_value(json_object_get(poll, "exit_code")));
	if (json_is_object(poll))
		snprintf(w->saved, sizeof(w->saved), "%lld",
			 (long long)json_integer_value(json_object_get(poll, "messages_saved")));
	else
		snprintf(w->saved, sizeof(w->saved), "-");
	snprintf(w->total, sizeof(w->total), "%lld",
		 (long long)json_integer_value(json_object_get(totals, "messages_saved")));
	when(json_object_get(o, "next_poll_at"), now, w->next, sizeof(w->next));
	cell(broken && !inactive ? state : json_string_value(json_object_get(poll, "error")),
	     w->error, sizeof(w->error));
	w->code = !inactive && (broken || strcmp(w->result, "ok") != 0) ? EX_TEMPFAIL : 0;
}

/* The row and the JSON entry of configuration id. */
static json_t *
entry(const char *dir, const char *id, int active, time_t now, struct row *w)
{
	char why[512];
	json_t *o;

	if (status_load(dir, id, &o, why, sizeof(why)) < 0) {
		o = normalize(NULL, id);
		json_object_set_new(o, "state", json_string("unreadable"));
		json_object_set_new(o, "unreadable", json_string(why));
		row_fill(w, o, active, now);
		snprintf(w->state, sizeof(w->state), "unreadable");
		cell(why, w->error, sizeof(w->error));
		w->code = EX_IOERR;
		return o;
	}
	if (active >= 0 &&
	    (!active || strcmp(json_string_value(json_object_get(o, "state")), "inactive") == 0))
		json_object_set_new(o, "state", json_string(active ? "active" : "inactive"));
	row_fill(w, o, active, now);
	return o;
}

/* The configurations to show: their ids and what the configuration says
 * of each (1 active, 0 inactive, -1 no configuration). */
struct listing {
	char **ids;
	int *active;
	size_t n;
};

static void
listing_add(struct listing *l, const char *id, int active)
{
	l->ids = xrealloc(l->ids, (l->n + 1) * sizeof(*l->ids));
	l->active = xrealloc(l->active, (l->n + 1) * sizeof(*l->active));
	l->ids[l->n] = xstrdup(id);
	l->active[l->n++] = active;
}

/* Every configuration of set, or the one id names (-ENOENT: none). */
static int
list_from_set(const struct conf_set *set, const char *id, struct listing *l)
{
	for (size_t i = 0; i < set->n_mailboxes; i++)
		if (id == NULL || strcmp(set->mailboxes[i]->id, id) == 0)
			listing_add(l, set->mailboxes[i]->id, set->mailboxes[i]->active);
	return id != NULL && l->n == 0 ? -ENOENT : 0;
}

/* A directory of dir that has a status.json, readable or not. */
static int
has_status(const struct dirent *de)
{
	return de->d_name[0] != '.' && (de->d_type == DT_DIR || de->d_type == DT_UNKNOWN);
}

/* Without a configuration: every status.json in dir, or id's. */
static int
list_from_dir(const char *dir, const char *id, struct listing *l)
{
	struct dirent **des;
	struct stat st;
	int n = scandir(dir, &des, has_status, alphasort);

	if (n < 0)
		return -errno;
	for (int i = 0; i < n; i++) {
		char *path = xasprintf("%s/%s/status.json", dir, des[i]->d_name);
		if ((id == NULL || strcmp(id, des[i]->d_name) == 0) &&
		    (stat(path, &st) == 0 || errno == EACCES))
			listing_add(l, des[i]->d_name, -1);
		free(path);
		free(des[i]);
	}
	free(des);
	return id != NULL && l->n == 0 ? -ENOENT : 0;
}

static void
listing_clear(struct listing *l)
{
	util_free_each((void *const *)l->ids, l->n);
	free(l->ids);
	free(l->active);
}

#define NCOLS 8

static const char *
column(const struct row *w, int c)
{
	const char *cells[NCOLS] = {w->id,    w->state, w->last, w->result,
				    w->saved, w->total, w->next, w->error};
	return cells[c];
}

/* Aligned columns, as systemctl list-timers prints them; the last column
 * (the error) as long as it is. */
static void
print_table(const char *daemon_line, const struct row *rows, size_t n)
{
	static const struct row head = {"ID",	 "STATE",     "LAST POLL",  "RESULT", "SAVED",
					"TOTAL", "NEXT POLL", "LAST ERROR", 0};
	size_t width[NCOLS] = {0};

	printf("%s\n\n", daemon_line);
	for (size_t i = 0; i <= n; i++)
		for (int c = 0; c < NCOLS; c++) {
			size_t len = strlen(column(i < n ? &rows[i] : &head, c));
			if (len > width[c])
				width[c] = len;
		}
	for (size_t i = 0; i <= n; i++) {
		const struct row *w = i == 0 ? &head : &rows[i - 1];
		for (int c = 0; c < NCOLS - 1; c++)
			/* the counts right-aligned */
			printf(c == 4 || c == 5 ? "%*s  " : "%-*s  ", (int)width[c], column(w, c));
		printf("%s\n", column(w, NCOLS - 1));
	}
}

/* Whether a daemon runs on dir: a line for the table, an object for JSON. */
static json_t *
daemon_state(const char *dir, char *line, size_t len)
{
	json_t *o = json_object();
	long pid;
	int r = daemon_running(dir, &pid);

	json_object_set_new(o, "running", r > 0 ? json_true() : json_false());
	json_object_set_new(o, "pid", r > 0 && pid > 0 ? json_integer(pid) : json_null());
	if (r < 0) {
		snprintf(line, len,
			 "daemon: cannot tell whether one runs on %s (%s/" PID_FILE ": %s)", dir,
			 dir, strerror(-r));
		json_object_set_new(o, "error", json_string(line));
	} else if (r > 0) {
		snprintf(line, len, "daemon: running on %s (pid %ld)", dir, pid);
	} else {
		snprintf(line, len, "daemon: not running on %s", dir);
	}
	return o;
}

static void
print_json(const char *dir, json_t *daemon, json_t *configurations)
{
	json_t *out = json_object();
	char *s;

	json_object_set_new(out, "state_directory", json_string(dir));
	json_object_set_new(out, "daemon", daemon);
	json_object_set_new(out, "configurations", configurations);
	s = json_dumps(out, JSON_PRESERVE_ORDER | JSON_COMPACT);
	puts(s);
	free(s);
	json_decref(out);
}

int
status_show(const struct conf_set *set, const char *state_directory, const char *id, bool json)
{
	struct listing l = {0};
	time_t now = time(NULL);
	char line[1024];
	json_t *daemon = daemon_state(state_directory, line, sizeof(line)), *list = json_array();
	int r = set ? list_from_set(set, id, &l) : list_from_dir(state_directory, id, &l), code;
	struct row *rows = xcalloc(l.n + 1, sizeof(*rows));

	if (r == -ENOENT)
		fprintf(stderr, "popfetchd: no configuration with id \"%s\" in %s%s\n", id,
			set ? set->dir : state_directory, set ? "/conf.d" : " (no status.json)");
	else if (r < 0)
		fprintf(stderr, "popfetchd: cannot read the state directory %s: %s\n",
			state_directory, strerror(-r));
	if (r < 0) {
		code = r == -ENOENT ? EX_CONFIG : EX_IOERR;
	} else {
		code = 0;
		for (size_t i = 0; i < l.n; i++) {
			json_array_append_new(
				list, entry(state_directory, l.ids[i], l.active[i], now, &rows[i]));
			/* the more urgent first: 74 (see to the files), then 75 */
			if (rows[i].code == EX_IOERR || code == 0)
				code = rows[i].code;
		}
	}
	if (json) {
		print_json(state_directory, daemon, list);
	} else {
		if (r == 0)
			print_table(line, rows, l.n);
		json_decref(daemon);
		json_decref(list);
	}
	free(rows);
	listing_clear(&l);
	return code;
}
