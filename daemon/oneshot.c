/*
 * oneshot — receive and receive-all (see oneshot.h): a poll per
 * configuration, each with its own runtime, started as session slots free
 * up (at most max_sessions at once), all on one event loop.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>
#include <jansson.h>

#include "popfetchd/config.h"
#include "popfetchd/fetch.h"
#include "popfetchd/log.h"
#include "popfetchd/oauth2.h"
#include "popfetchd/oneshot.h"
#include "popfetchd/runtime.h"
#include "popfetchd/status.h"
#include "popfetchd/util.h"
#include "popfetchd/worker.h"

/* the progress line is redrawn this often (ms), and its rate is measured
 * over the last PROGRESS_SAMPLES redraws */
#define PROGRESS_PERIOD	 250
#define PROGRESS_SAMPLES 8

struct job {
	const char *id;
	const struct conf_mailbox *mb; /* NULL when the id names no active configuration */
	int refused;		       /* the exit code when it is not polled, 0 */
	char why[600];		       /* and why */
	bool has_runtime;
	time_t started;
	struct runtime rt;
	struct fetch *f;
	struct oneshot *os;
};

struct progress {
	struct event *ev;
	bool shown; /* a line is on the terminal */
	struct {
		struct timespec at;
		unsigned long long bytes;
	} samples[PROGRESS_SAMPLES];
	size_t nsamples;
};

struct oneshot {
	const struct oneshot_options *o;
	const struct conf_set *set;
	struct job *jobs;
	size_t n, next, running, finished;
	struct event_base *base;
	struct evdns_base *dns;
	struct oauth2_client *oauth;
	/* commits, and seals, as the daemon's (DESIGN.md §6): a message is
	 * extracted, and a batch committed, while the next is received; NULL:
	 * on the loop */
	struct worker_pool *workers;
	struct progress progress;
};

int
oneshot_worst(int a, int b)
{
	static const int order[] = {EX_CONFIG,	 EX_IOERR,    EX_NOPERM,
				    EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE};
	size_t ra = a == 0 ? SIZE_MAX : 6, rb = b == 0 ? SIZE_MAX : 6;

	for (size_t i = 0; i < sizeof(order) / sizeof(order[0]); i++) {
		if (a == order[i])
			ra = i;
		if (b == order[i])
			rb = i;
	}
	return ra <= rb ? a : b;
}

/* ---- the progress line ---- */

static struct progress *on_screen; /* the progress line shown, for the log */

static void
progress_clear(void)
{
	if (on_screen == NULL || !on_screen->shown)
		return;
	fputs("\r\033[K", stderr);
	on_screen->shown = false;
}

/* A size in the unit that suits total: "3.1/51.0 MB". */
static void
format_sizes(char *buf, size_t size, unsigned long long done, unsigned long long total)
{
	static const struct {
		double div;
		const char *unit;
	} units[] = {{1e3, "kB"}, {1e6, "MB"}, {1e9, "GB"}};
	size_t u = 0;

	while (u + 1 < sizeof(units) / sizeof(units[0]) && total >= units[u + 1].div)
		u++;
	snprintf(buf, size, "%.1f/%.1f %s", (double)done / units[u].div,
		 (double)total / units[u].div, units[u].unit);
}

static void
format_rate(char *buf, size_t size, double rate)
{
	if (rate >= 1e6)
		snprintf(buf, size, "%.1f MB/s", rate / 1e6);
	else
		snprintf(buf, size, "%.0f kB/s", rate / 1e3);
}

static double
elapsed(const struct timespec *from, const struct timespec *to)
{
	return (double)(to->tv_sec - from->tv_sec) + (double)(to->tv_nsec - from->tv_nsec) / 1e9;
}

/* Bytes per second over the last samples, -1 before there are two (bytes
 * may fall when a session starts over and lists anew: then it starts from
 * there). */
static double
progress_rate(struct progress *p, unsigned long long bytes)
{
	struct timespec now;
	size_t last = p->nsamples - 1;
	double dt;

	clock_gettime(CLOCK_MONOTONIC, &now);
	if (p->nsamples > 0 && bytes < p->samples[last].bytes)
		p->nsamples = 0;
	if (p->nsamples == PROGRESS_SAMPLES) {
		memmove(&p->samples[0], &p->samples[1], sizeof(p->samples[0]) * last);
		p->nsamples--;
	}
	p->samples[p->nsamples].at = now;
	p->samples[p->nsamples++].bytes = bytes;
	dt = elapsed(&p->samples[0].at, &now);
	return dt > 0 ? (double)(bytes - p->samples[0].bytes) / dt : -1;
}

/* Fit the line to the terminal: a wrapped line is not overwritten by \r. */
static void
progress_show(struct progress *p, char *line)
{
	struct winsize ws;

	if (ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1 &&
	    strlen(line) >= ws.ws_col)
		line[ws.ws_col - 1] = '\0';
	fprintf(stderr, "\r%s\033[K", line);
	p->shown = true;
}

static void
on_progress(evutil_socket_t fd, short what, void *arg)
{
	struct oneshot *os = arg;
	struct fetch_progress sum = {0}, one;
	char line[512], sizes[64], rate[32] = "", *at = line;
	double bps;

	(void)fd;
	(void)what;
	for (size_t i = 0; i < os->n; i++) {
		if (os->jobs[i].f == NULL)
			continue;
		fetch_progress(os->jobs[i].f, &one);
		sum.listed |= one.listed;
		sum.messages += one.messages;
		sum.messages_total += one.messages_total;
		sum.bytes += one.bytes;
		sum.bytes_total += one.bytes_total;
	}
	if (!sum.listed)
		return;
	format_sizes(sizes, sizeof(sizes), sum.bytes, sum.bytes_total);
	if ((bps = progress_rate(&os->progress, sum.bytes)) >= 0)
		format_rate(rate, sizeof(rate), bps);
	if (os->n == 1)
		at += snprintf(line, sizeof(line), "%s: ", os->jobs[0].id);
	else
		at += snprintf(line, sizeof(line), "%zu/%zu configurations done, ", os->finished,
			       os->n);
	snprintf(at, sizeof(line) - (size_t)(at - line), "%zu/%zu messages, %s%s%s", sum.messages,
		 sum.messages_total, sizes, rate[0] ? ", " : "", rate);
	progress_show(&os->progress, line);
}

/* Only on a terminal: nothing extra where stderr is a file or a pipe. */
static void
progress_start(struct oneshot *os)
{
	const struct timeval period = {0, PROGRESS_PERIOD * 1000};

	if (!os->o->progress || os->o->json || !isatty(STDERR_FILENO))
		return;
	os->progress.ev = event_new(os->base, -1, EV_PERSIST, on_progress, os);
	if (os->progress.ev == NULL)
		abort();
	event_add(os->progress.ev, &period);
	on_screen = &os->progress;
	log_set_before_line(progress_clear);
}

static void
progress_stop(struct oneshot *os)
{
	if (os->progress.ev == NULL)
		return;
	progress_clear();
	log_set_before_line(NULL);
	on_screen = NULL;
	event_free(os->progress.ev);
	os->progress.ev = NULL;
}

/* ---- which configurations ---- */

static void
refuse(struct job *j, int code, const char *why)
{
	j->refused = code;
	snprintf(j->why, sizeof(j->why), "%s", why);
}

/* The job for an ID named on the command line. */
static void
find_job(const struct conf_set *set, const char *id, struct job *j)
{
	const struct conf_mailbox *mb = conf_find(set, id);

	j->id = id;
	if (mb == NULL) {
		j->refused = EX_CONFIG;
		snprintf(j->why, sizeof(j->why), "%s: no configuration with this id in %s/conf.d",
			 id, set->dir);
	} else if (!mb->active) {
		j->refused = EX_CONFIG;
		snprintf(j->why, sizeof(j->why),
			 "%s: the configuration is inactive (status: inactive in %s)", id,
			 mb->file);
	} else {
		j->mb = mb;
	}
}

static bool
named_before(const struct oneshot_options *o, size_t i)
{
	for (size_t k = 0; k < i; k++)
		if (strcmp(o->ids[k], o->ids[i]) == 0)
			return true;
	return false;
}

/* The jobs: the IDs named (each once), or every active configuration. */
static void
select_jobs(struct oneshot *os)
{
	const struct conf_set *set = os->set;
	size_t cap = os->o->all ? set->n_mailboxes : os->o->n_ids;

	os->jobs = xcalloc(cap ? cap : 1, sizeof(*os->jobs));
	if (os->o->all) {
		for (size_t i = 0; i < set->n_mailboxes; i++) {
			const struct conf_mailbox *mb = set->mailboxes[i];
			if (mb->active && conf_in_shard(set, mb->id))
				os->jobs[os->n++] = (struct job){.id = mb->id, .mb = mb};
		}
	} else {
		for (size_t i = 0; i < os->o->n_ids; i++)
			if (!named_before(os->o, i))
				find_job(set, os->o->ids[i], &os->jobs[os->n++]);
	}
	for (size_t i = 0; i < os->n; i++)
		os->jobs[i].os = os;
}

/*
 * As root, no state files where another user keeps them: the whole state
 * directory (one line for all), or one configuration's.
 */
static void
check_owners(struct oneshot *os)
{
	char why[600];
	bool all = runtime_state_owner(os->set->state_directory, why, sizeof(why)) < 0;

	if (all)
		fprintf(stderr, "popfetchd: %s\n", why);
	for (size_t i = 0; i < os->n; i++) {
		struct job *j = &os->jobs[i];
		char *dir;

		if (j->refused)
			continue;
		if (all) {
			refuse(j, EX_IOERR, why);
			continue;
		}
		dir = xasprintf("%s/%s", os->set->state_directory, j->id);
		if (runtime_state_owner(dir, why, sizeof(why)) < 0) {
			fprintf(stderr, "popfetchd: %s: %s\n", j->id, why);
			refuse(j, EX_IOERR, why);
		}
		free(dir);
	}
}

/* ---- the polls ---- */

static void pump(struct oneshot *os);

static int
job_exit(const struct job *j)
{
	return j->refused ? j->refused : fetch_result(j->f)->exit_code;
}

static void
print_folders(const struct job *j)
{
	const struct fetch_result *r = fetch_result(j->f);

	progress_clear();
	for (size_t i = 0; i < r->nsaved; i++)
		if (r->saved[i].folder != NULL)
			printf("%s\n", r->saved[i].folder);
	fflush(stdout);
}

/* status.json after a one-shot poll: no next poll is planned. */
static void
record_status(const struct conf_set *set, const struct job *j, const struct fetch_result *r)
{
	struct status_poll p = {.started_at = j->started,
				.finished_at = time(NULL),
				.exit_code = r->exit_code,
				.error = r->nerrors > 0 ? r->errors[0] : NULL,
				.messages_saved = r->nsaved,
				.messages_deleted = r->deleted,
				.tls_expires_at = r->tls_expires_at};
	char why[512];

	for (size_t i = 0; i < r->nsaved; i++)
		p.bytes_saved += r->saved[i].size;
	if (status_record_poll(set->state_directory, j->id, &p, why, sizeof(why)) < 0)
		log_warning(j->id, "%s", why);
}

static void
on_fetch_done(struct fetch *f, void *arg)
{
	struct job *j = arg;
	struct oneshot *os = j->os;

	record_status(os->set, j, fetch_result(f));
	os->running--;
	os->finished++;
	if (!os->o->json)
		print_folders(j);
	pump(os);
	if (os->running == 0)
		event_base_loopbreak(os->base);
}

static void
start_job(struct oneshot *os, struct job *j)
{
	struct fetch_params fp;

	if (runtime_init(&j->rt, os->set, j->mb, os->oauth, false, j->why, sizeof(j->why)) < 0) {
		char *broken = xasprintf("broken: %s", j->why), why[512];

		runtime_clear(&j->rt);
		j->refused = EX_CONFIG;
		fprintf(stderr, "popfetchd: %s: %s (%s)\n", j->id, j->why, j->mb->file);
		if (status_record_state(os->set->state_directory, j->id, broken, 0, why,
					sizeof(why)) < 0)
			log_warning(j->id, "%s", why);
		free(broken);
		return;
	}
	j->started = time(NULL);
	j->has_runtime = true;
	fetch_params_from_runtime(&j->rt, os->o->mode, &fp);
	fp.workers = os->workers;
	j->f = fetch_start(os->base, os->dns, &fp, on_fetch_done, j);
	os->running++;
}

/* Start polls while there are free session slots. */
static void
pump(struct oneshot *os)
{
	while (os->running < os->set->max_sessions && os->next < os->n) {
		struct job *j = &os->jobs[os->next++];
		if (!j->refused)
			start_job(os, j);
		if (j->refused) /* not polled: done at once */
			os->finished++;
	}
}

static bool
any_oauth2(const struct oneshot *os)
{
	for (size_t i = 0; i < os->n; i++)
		if (!os->jobs[i].refused && os->jobs[i].mb->auth == CONF_AUTH_OAUTH2)
			return true;
	return false;
}

/* As many threads for seals as polls, up to WORKER_THREADS (one keeps a
 * second core busy with a poll's seals, a thread more is for another
 * poll), and one for the store's jobs (worker_submit_serial): a seal never
 * waits for a commit's syncfs, and every commit's system calls come from
 * one thread, in order (tests/integration/test_crash.py counts them so with
 * strace). */
static unsigned
seal_threads(const struct oneshot *os)
{
	unsigned n = 0;

	for (size_t i = 0; i < os->n && n < WORKER_THREADS; i++)
		n += !os->jobs[i].refused;
	return (n > 0 ? n : 1) + 1;
}

static void
run_jobs(struct oneshot *os)
{
	os->base = event_base_new();
	if (os->base == NULL)
		abort();
	os->dns = runtime_dns_new(os->base);
	os->oauth = any_oauth2(os) ? oauth2_client_new(os->base) : NULL;
	if ((os->workers = worker_pool_new(os->base, seal_threads(os))) == NULL)
		log_warning(NULL,
			    "cannot start worker threads (%s): messages are sealed and committed "
			    "on the event loop",
			    strerror(errno));
	progress_start(os);
	pump(os);
	if (os->running > 0)
		event_base_dispatch(os->base);
	progress_stop(os);
}

static void
free_jobs(struct oneshot *os)
{
	for (size_t i = 0; i < os->n; i++) {
		fetch_free(os->jobs[i].f);
		if (os->jobs[i].has_runtime)
			runtime_clear(&os->jobs[i].rt);
	}
	oauth2_client_free(os->oauth);
	worker_pool_free(os->workers); /* nothing is out: the polls are freed */
	if (os->base != NULL) {
		/* run what is still pending (deferred frees) */
		event_base_loop(os->base, EVLOOP_NONBLOCK);
		evdns_base_free(os->dns, 0);
		event_base_free(os->base);
	}
	free(os->jobs);
}

/* ---- the report ---- */

static void
print_json(json_t *o)
{
	char *s = json_dumps(o, JSON_PRESERVE_ORDER | JSON_COMPACT);

	puts(s);
	free(s);
}

static json_t *
saved_json(const struct fetch_result *r)
{
	json_t *saved = json_array();

	for (size_t i = 0; i < r->nsaved; i++) {
		json_t *s = json_object();
		json_object_set_new(s, "uidl", json_string(r->saved[i].uid));
		json_object_set_new(s, "folder",
				    r->saved[i].folder ? json_string(r->saved[i].folder)
						       : json_null());
		json_object_set_new(s, "size", json_integer((json_int_t)r->saved[i].size));
		json_array_append_new(saved, s);
	}
	return saved;
}

/* One configuration's result; errors: its lines when it was not polled. */
static json_t *
result_json(const char *id, const struct fetch_result *r, json_t *errors, int code)
{
	static const struct fetch_result none = {0};
	json_t *out = json_object();

	if (r == NULL)
		r = &none;
	if (errors == NULL) {
		errors = json_array();
		for (size_t i = 0; i < r->nerrors; i++)
			json_array_append_new(errors, json_string(r->errors[i]));
	}
	json_object_set_new(out, "configuration", json_string(id));
	json_object_set_new(out, "saved", saved_json(r));
	json_object_set_new(out, "skipped", json_integer((json_int_t)r->skipped));
	json_object_set_new(out, "left_too_big", json_integer((json_int_t)r->too_big));
	json_object_set_new(out, "deleted", json_integer((json_int_t)r->deleted));
	json_object_set_new(out, "errors", errors);
	json_object_set_new(out, "exit_code", json_integer(code));
	return out;
}

static json_t *
job_json(const struct job *j)
{
	json_t *errors = NULL;

	if (j->refused) {
		errors = json_array();
		json_array_append_new(errors, json_string(j->why));
	}
	return result_json(j->id, j->refused ? NULL : fetch_result(j->f), errors, job_exit(j));
}

static void
print_job(const struct job *j)
{
	json_t *out = job_json(j);

	print_json(out);
	json_decref(out);
}

/* Several configurations, or --all: {"results": [...], "errors": [...],
 * "exit_code": N}. */
static void
print_results(const struct oneshot *os, json_t *errors, int code)
{
	json_t *out = json_object(), *results = json_array();

	for (size_t i = 0; i < os->n; i++)
		json_array_append_new(results, job_json(&os->jobs[i]));
	json_object_set_new(out, "results", results);
	json_object_set_new(out, "errors", errors != NULL ? errors : json_array());
	json_object_set_new(out, "exit_code", json_integer(code));
	print_json(out);
	json_decref(out);
}

static bool
several(const struct oneshot_options *o)
{
	return o->all || o->n_ids != 1;
}

/* The set could not be loaded: every configuration named is refused. */
static int
set_refused(const struct oneshot_options *o, json_t *errors)
{
	if (!o->json) {
		json_decref(errors);
		return EX_CONFIG;
	}
	if (several(o)) {
		struct oneshot os = {.o = o};
		print_results(&os, errors, EX_CONFIG);
		return EX_CONFIG;
	}
	json_t *out = result_json(o->ids[0], NULL, errors, EX_CONFIG);
	print_json(out);
	json_decref(out);
	return EX_CONFIG;
}

int
oneshot_run(const struct conf_set *set, struct json_t *set_errors, const struct oneshot_options *o)
{
	struct oneshot os = {.o = o, .set = set};
	int code = 0;

	if (set == NULL)
		return set_refused(o, set_errors);
	json_decref(set_errors);
	select_jobs(&os);
	if (os.n == 0)
		log_notice(NULL, "no active configuration in %s/conf.d: nothing to receive",
			   set->dir);
	for (size_t i = 0; i < os.n; i++)
		if (os.jobs[i].refused)
			fprintf(stderr, "popfetchd: %s\n", os.jobs[i].why);
	check_owners(&os);
	run_jobs(&os);
	for (size_t i = 0; i < os.n; i++)
		code = oneshot_worst(code, job_exit(&os.jobs[i]));
	if (o->json && several(o))
		print_results(&os, NULL, code);
	else if (o->json)
		print_job(&os.jobs[0]);
	free_jobs(&os);
	return code;
}
