/*
 * scheduler — timers, backoff, the session limit and the reload swap (see
 * scheduler.h).
 *
 * A configuration set is shared by reference: every job's current settings
 * (a struct cfg: the mailbox, its TLS context, token source and S/MIME key)
 * hold the set they come from, and so does a running poll through the cfg
 * it began with. A reload swaps the jobs' cfgs; an old set is freed when the
 * last poll that uses it ends.
 *
 * A configuration whose runtime cannot be built (a tls_ca_file that cannot
 * be loaded), or whose save directory or refresh-token directory takes no
 * new file (the start-up check, runtime_check_dirs), is broken: it is not polled, its setup is
 * tried again with the backoff of a failed poll, and it is polled as soon as a try, or a reload,
 * succeeds.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <glib.h>

#include "popfetchd/config.h"
#include "popfetchd/fetch.h"
#include "popfetchd/log.h"
#include "popfetchd/metrics.h"
#include "popfetchd/oauth2.h"
#include "popfetchd/runtime.h"
#include "popfetchd/scheduler.h"
#include "popfetchd/status.h"
#include "popfetchd/util.h"
#include "popfetchd/worker.h"

struct setref {
	struct conf_set *set;
	unsigned refs;
};

struct cfg {
	unsigned refs;
	struct setref *sr;
	const struct conf_mailbox *mb;
	struct runtime rt;
	char *broken; /* why it cannot be polled (runtime, directories), or NULL */
};

struct job {
	struct scheduler *s;
	char *id;
	struct cfg *cfg;     /* for the next poll */
	struct cfg *running; /* what the running poll uses */
	struct fetch *fetch;
	/* an OAuth2 poll gets its token before it takes a session slot: a
	 * slow token endpoint holds no slot another configuration could use */
	struct oauth2_request *token_req;
	struct cfg *token_cfg; /* whose token source it asks */
	struct event *timer;
	time_t started_at;	 /* of the poll: its token request or its session */
	struct timespec started; /* of the running poll, or its token request */
	unsigned failures;
	bool queued, removed, seen;
	TAILQ_ENTRY(job) all;
	TAILQ_ENTRY(job) queue;
};

TAILQ_HEAD(jobs, job);

struct scheduler {
	struct event_base *base;
	struct evdns_base *dns;
	struct oauth2_client *oauth;
	struct setref *current;
	struct jobs jobs, queue;
	GHashTable *by_id; /* id -> its job, the removed ones left out */
	/* the jobs not removed, and of them the broken and the failing ones:
	 * kept as they change (tally), not counted at each STATUS= */
	size_t nconfigs, nbroken, nfailing;
	size_t nrunning, nqueued, max_sessions;
	unsigned long long saved;
	char last_error[400];
	uint64_t rng;
	sched_changed_cb changed;
	void *arg;
	struct metrics *metrics;     /* NULL: off */
	struct worker_pool *workers; /* NULL: seal and commit on the loop */
	struct worker_pool *writer;  /* one thread: status.json, in order; NULL: here */
	bool stopping;
	struct event *grace;
	void (*stopped)(void *arg);
	void *stopped_arg;
};

static void pump(struct scheduler *s);

/* j's share of the counts, taken away (-1) before a change to its cfg,
 * failures or removal, and given back (+1) after. */
static void
tally(struct job *j, int sign)
{
	struct scheduler *s = j->s;

	if (j->removed)
		return;
	s->nconfigs += (size_t)sign;
	if (j->cfg->broken != NULL)
		s->nbroken += (size_t)sign;
	else if (j->failures > 0)
		s->nfailing += (size_t)sign;
}
static void on_grace(evutil_socket_t fd, short what, void *arg);

/* ---- jobs: lookup and timing ---- */

static double
rnd(struct scheduler *s)
{
	/* splitmix64: jitter needs spread, not secrecy */
	uint64_t z = (s->rng += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	z ^= z >> 31;
	return (double)(z >> 11) / (double)(1ULL << 53);
}

static void
arm(struct job *j, double seconds)
{
	struct timeval tv;

	if (seconds < 0)
		seconds = 0;
	tv.tv_sec = (time_t)seconds;
	tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
	evtimer_add(j->timer, &tv);
}

static void
changed(struct scheduler *s)
{
	if (s->changed != NULL)
		s->changed(s->arg);
}

static struct setref *
setref_new(struct conf_set *set)
{
	struct setref *sr = xcalloc(1, sizeof(*sr));

	sr->set = set;
	sr->refs = 1;
	return sr;
}

static void
setref_unref(struct setref *sr)
{
	if (sr != NULL && --sr->refs == 0) {
		conf_set_free(sr->set);
		free(sr);
	}
}

/* mb's settings and runtime; prev: the cfg it replaces (its token source
 * is kept when the OAuth2 settings are the same), or NULL. */
static struct cfg *
cfg_new(struct scheduler *s, struct setref *sr, const struct conf_mailbox *mb,
	const struct cfg *prev)
{
	struct cfg *c = xcalloc(1, sizeof(*c));
	char why[512];

	c->refs = 1;
	c->sr = sr;
	sr->refs++;
	c->mb = mb;
	if (runtime_reinit(&c->rt, prev != NULL ? &prev->rt : NULL, sr->set, mb, s->oauth, true,
			   why, sizeof(why)) < 0 ||
	    runtime_check_dirs(mb, why, sizeof(why)) < 0)
		c->broken = xstrdup(why);
	return c;
}

static struct cfg *
cfg_ref(struct cfg *c)
{
	c->refs++;
	return c;
}

static void
cfg_unref(struct cfg *c)
{
	if (c != NULL && --c->refs == 0) {
		runtime_clear(&c->rt);
		free(c->broken);
		setref_unref(c->sr);
		free(c);
	}
}

/* ---- jobs ---- */

static void
set_cfg(struct job *j, struct cfg *c)
{
	tally(j, -1);
	cfg_unref(j->cfg);
	j->cfg = c;
	tally(j, +1);
}

static void
set_failures(struct job *j, unsigned failures)
{
	tally(j, -1);
	j->failures = failures;
	tally(j, +1);
}

/* Seconds to the next try after another consecutive failure: the poll
 * interval doubled per failure, up to an hour (or the interval), with
 * jitter so that failing configurations do not retry in step. */
static double
failure_delay(struct job *j)
{
	double interval = (double)j->cfg->mb->poll_interval, cap, d;

	set_failures(j, j->failures + 1);
	cap = interval > SCHED_MAX_BACKOFF ? interval : SCHED_MAX_BACKOFF;
	d = interval;
	for (unsigned i = 0; i < j->failures && d < cap; i++)
		d *= 2;
	if (d > cap)
		d = cap;
	return d * (0.75 + 0.25 * rnd(j->s));
}

/* Seconds to the next poll after one that ended with r. */
static double
next_delay(struct job *j, const struct fetch_result *r)
{
	double d;

	if (r->exit_code == 0) {
		set_failures(j, 0);
		return (double)j->cfg->mb->poll_interval;
	}
	d = failure_delay(j);
	if (r->login_delay > d)
		d = r->login_delay;
	return d;
}

static void
dequeue(struct job *j)
{
	if (j->queued) {
		TAILQ_REMOVE(&j->s->queue, j, queue);
		j->queued = false;
		j->s->nqueued--;
	}
}

static void
cancel_token(struct job *j)
{
	if (j->token_req != NULL) {
		oauth2_cancel(j->token_req);
		j->token_req = NULL;
	}
	cfg_unref(j->token_cfg);
	j->token_cfg = NULL;
}

static struct job *
find(struct scheduler *s, const char *id)
{
	return g_hash_table_lookup(s->by_id, id);
}

/* Its id is free for a job of a later set; it goes when its poll ends. */
static void
mark_removed(struct job *j)
{
	if (!j->removed && find(j->s, j->id) == j)
		g_hash_table_remove(j->s->by_id, j->id);
	tally(j, -1);
	j->removed = true;
}

static void
job_free(struct job *j)
{
	struct job *same = find(j->s, j->id);

	/* a reload may have brought the id back while this one finished */
	if (same == NULL || same == j)
		metrics_config_remove(j->s->metrics, j->id);
	if (same == j)
		g_hash_table_remove(j->s->by_id, j->id);
	tally(j, -1);
	cancel_token(j);
	dequeue(j);
	TAILQ_REMOVE(&j->s->jobs, j, all);
	event_free(j->timer);
	cfg_unref(j->cfg);
	free(j->id);
	free(j);
}

static void on_fetch_done(struct fetch *f, void *arg);

/* One write of a status.json (a poll, or a state: inactive, broken). Each
 * replaces the file with fsyncs: on the writer thread, which takes them
 * in order, they keep the loop free. */
struct status_write {
	char *dir, *id, *state, *error; /* state NULL: a poll */
	struct status_poll p;
	int r;
	char why[512];
};

static void
status_work(void *arg)
{
	struct status_write *w = arg;

	w->r = w->state == NULL ? status_record_poll(w->dir, w->id, &w->p, w->why, sizeof(w->why))
				: status_record_state(w->dir, w->id, w->state, w->p.next_poll_at,
						      w->why, sizeof(w->why));
}

static void
status_done(void *arg)
{
	struct status_write *w = arg;

	if (w->r < 0)
		log_warning(w->id, "%s", w->why);
	FREE_ALL(w->dir, w->id, w->state, w->error, w);
}

/* w (its strings copied) is the writer's from now on. */
static void
status_write(struct scheduler *s, struct status_write *w)
{
	w->p.error = w->error;
	if (s->writer != NULL) {
		worker_submit(s->writer, status_work, status_done, w);
		return;
	}
	status_work(w);
	status_done(w);
}

/* status.json after a poll that used c; next: seconds to the next one,
 * < 0 when none is planned (the daemon stops, the configuration is gone). */
static void
record_poll(struct job *j, const struct cfg *c, const struct fetch_result *r, double next)
{
	struct status_write *w = xcalloc(1, sizeof(*w));
	time_t now = time(NULL);
	struct status_poll p = {.started_at = j->started_at ? j->started_at : now,
				.finished_at = now,
				.exit_code = r->exit_code,
				.error = r->nerrors > 0 ? r->errors[0] : NULL,
				.messages_saved = r->nsaved,
				.messages_deleted = r->deleted,
				.tls_expires_at = r->tls_expires_at,
				.next_poll_at = next < 0 ? 0 : now + (time_t)next};

	for (size_t i = 0; i < r->nsaved; i++)
		p.bytes_saved += r->saved[i].size;
	w->dir = xstrdup(c->sr->set->state_directory);
	w->id = xstrdup(j->id);
	w->error = p.error != NULL ? xstrdup(p.error) : NULL;
	w->p = p;
	status_write(j->s, w);
}

/* status.json of a configuration that is not polled now: inactive, broken. */
static void
record_state(struct scheduler *s, const struct conf_set *set, const char *id, const char *state,
	     time_t next)
{
	struct status_write *w = xcalloc(1, sizeof(*w));

	w->dir = xstrdup(set->state_directory);
	w->id = xstrdup(id);
	w->state = xstrdup(state);
	w->p.next_poll_at = next;
	status_write(s, w);
}

/* Its runtime cannot be built: no poll; say why each time and try again
 * with the backoff of a failed poll. */
static void
setup_failed(struct job *j)
{
	double d = failure_delay(j);

	log_error(j->id, "cannot be polled: %s (%s); next try in %.0f s", j->cfg->broken,
		  j->cfg->mb->file, d);
	char *state = xasprintf("broken: %s", j->cfg->broken);
	record_state(j->s, j->cfg->sr->set, j->id, state, time(NULL) + (time_t)d);
	free(state);
	snprintf(j->s->last_error, sizeof(j->s->last_error), "%s: %.300s", j->id, j->cfg->broken);
	cancel_token(j);
	dequeue(j);
	arm(j, d);
	changed(j->s);
}

/* A broken configuration's retry, from the same settings: the file it
 * could not load may have been fixed. true when it can be polled now. */
static bool
retry_setup(struct job *j)
{
	struct cfg *c = cfg_new(j->s, j->cfg->sr, j->cfg->mb, NULL);

	set_cfg(j, c);
	if (c->broken != NULL) {
		setup_failed(j);
		return false;
	}
	log_notice(j->id, "set up now: polled again");
	changed(j->s);
	return true;
}

static void
start(struct job *j)
{
	struct scheduler *s = j->s;
	struct fetch_params fp;

	j->running = cfg_ref(j->cfg);
	j->started_at = time(NULL);
	fetch_params_from_runtime(
		&j->running->rt,
		j->running->mb->receive == CONF_RECEIVE_ONE ? FETCH_ONE : FETCH_ALL, &fp);
	fp.workers = s->workers;
	s->nrunning++;
	clock_gettime(CLOCK_MONOTONIC, &j->started);
	log_debug(j->id, "poll starts (%zu of %zu sessions)", s->nrunning, s->max_sessions);
	j->fetch = fetch_start(s->base, s->dns, &fp, on_fetch_done, j);
}

/* Start queued polls while there are free session slots. */
static void
pump(struct scheduler *s)
{
	struct job *j;

	while (!s->stopping && s->nrunning < s->max_sessions && (j = TAILQ_FIRST(&s->queue))) {
		dequeue(j);
		start(j);
	}
}

static void
enqueue(struct job *j)
{
	struct scheduler *s = j->s;

	if (s->stopping || j->removed || j->fetch != NULL || j->queued || j->cfg->broken)
		return;
	TAILQ_INSERT_TAIL(&s->queue, j, queue);
	j->queued = true;
	s->nqueued++;
	pump(s);
	changed(s);
}

/* A poll's end, for the metrics. */
static void
report_poll(struct job *j, const struct fetch_result *r)
{
	struct metrics_poll p = {
		.ok = r->exit_code == 0, .saved = r->nsaved, .deleted = r->deleted};
	struct timespec now;

	clock_gettime(CLOCK_MONOTONIC, &now);
	p.seconds = (double)(now.tv_sec - j->started.tv_sec) +
		    (double)(now.tv_nsec - j->started.tv_nsec) / 1e9;
	for (size_t i = 0; i < r->nsaved; i++)
		p.bytes += r->saved[i].size;
	metrics_poll_done(j->s->metrics, j->id, &p);
}

/* No token, no poll: a failed poll that took no session slot. */
static void
token_failed(struct job *j, enum oauth2_status status, const char *detail)
{
	char *error = xasprintf("no access token: %s", detail);
	struct fetch_result r = {
		.exit_code = oauth2_exit_code(status), .errors = &error, .nerrors = 1};
	double d = next_delay(j, &r);

	report_poll(j, &r);
	log_fields(LOG_LVL_ERROR, j->id,
		   &(struct log_fields){.has_exit = true, .exit = r.exit_code},
		   "poll failed (exit %d): no access token: %s; next try in %.0f s", r.exit_code,
		   detail, d);
	record_poll(j, j->cfg, &r, d);
	free(error);
	snprintf(j->s->last_error, sizeof(j->s->last_error), "%s: no access token: %.300s", j->id,
		 detail);
	arm(j, d);
	changed(j->s);
}

/* The token is in hand (and in the cache): now the poll may wait for a
 * session slot. */
static void
on_token(void *arg, enum oauth2_status status, const char *token, const char *detail)
{
	struct job *j = arg;

	(void)token;
	j->token_req = NULL;
	cancel_token(j);
	if (status != OAUTH2_OK)
		token_failed(j, status, detail);
	else
		enqueue(j);
}

static void
on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct job *j = arg;

	(void)fd;
	(void)what;
	if (j->token_req != NULL || j->s->stopping || j->removed)
		return;
	if (j->cfg->broken != NULL && !retry_setup(j))
		return;
	if (j->cfg->rt.oauth2 != NULL && j->fetch == NULL && !j->queued && !j->removed) {
		j->started_at = time(NULL);
		j->token_cfg = cfg_ref(j->cfg);
		clock_gettime(CLOCK_MONOTONIC, &j->started);
		j->token_req = oauth2_get_token(j->token_cfg->rt.oauth2, false, on_token, j);
		return;
	}
	enqueue(j);
}

struct reap {
	struct fetch *f;
	struct cfg *cfg;
};

/* A poll's leftovers are freed from the loop, not from its own callback. */
static void
reap_cb(evutil_socket_t fd, short what, void *arg)
{
	struct reap *r = arg;

	(void)fd;
	(void)what;
	fetch_free(r->f);
	cfg_unref(r->cfg);
	free(r);
}

static void
on_fetch_done(struct fetch *f, void *arg)
{
	struct job *j = arg;
	struct scheduler *s = j->s;
	const struct fetch_result *r = fetch_result(f);
	struct reap *rp = xmalloc(sizeof(*rp));
	static const struct timeval zero = {0, 0};
	double d = -1;

	s->nrunning--;
	s->saved += r->nsaved;
	report_poll(j, r);
	if (r->tls_expires_at != 0)
		metrics_set_cert_expiry(j->s->metrics, j->id, r->tls_expires_at);
	if (r->exit_code != 0) {
		/* each error was logged when it happened (fetch) */
		snprintf(s->last_error, sizeof(s->last_error), "%s: %s", j->id,
			 r->nerrors > 0 ? r->errors[0] : "failed");
	}
	if (!s->stopping && !j->removed) {
		d = next_delay(j, r);
		if (r->exit_code != 0)
			log_fields(LOG_LVL_NOTICE, j->id,
				   &(struct log_fields){.has_exit = true, .exit = r->exit_code},
				   "poll failed (exit %d): next try in %.0f s", r->exit_code, d);
		arm(j, d);
	}
	record_poll(j, j->running, r, d);
	rp->f = f;
	rp->cfg = j->running;
	j->fetch = NULL;
	j->running = NULL;
	if (event_base_once(s->base, -1, EV_TIMEOUT, reap_cb, rp, &zero) < 0)
		abort();
	if (j->removed)
		job_free(j);
	pump(s);
	changed(s);
	if (s->stopping && s->nrunning == 0 && s->stopped != NULL) {
		void (*done)(void *) = s->stopped;
		s->stopped = NULL;
		event_del(s->grace);
		done(s->stopped_arg);
	}
}

static void
add_job(struct scheduler *s, struct cfg *c)
{
	struct job *j = xcalloc(1, sizeof(*j));

	j->s = s;
	j->id = xstrdup(c->mb->id);
	j->cfg = c;
	j->seen = true;
	j->timer = evtimer_new(s->base, on_timer, j);
	if (j->timer == NULL)
		abort();
	TAILQ_INSERT_TAIL(&s->jobs, j, all);
	g_hash_table_insert(s->by_id, j->id, j);
	tally(j, +1);
	metrics_config_add(s->metrics, j->id);
	if (c->broken != NULL)
		setup_failed(j);
	else /* first polls spread over the first interval, never all at once */
		arm(j, rnd(s) * (double)c->mb->poll_interval);
}

/* Make the jobs match set: the heart of start-up and reload alike. */
static void
apply(struct scheduler *s, struct conf_set *set)
{
	struct setref *sr = setref_new(set);
	struct job *j, *next;

	TAILQ_FOREACH(j, &s->jobs, all)
		j->seen = false;
	for (size_t i = 0; i < set->n_mailboxes; i++) {
		const struct conf_mailbox *mb = set->mailboxes[i];
		if (!conf_in_shard(set, mb->id))
			continue;
		if (!mb->active) {
			record_state(s, set, mb->id, "inactive", 0);
			continue;
		}
		if ((j = find(s, mb->id)) == NULL) {
			add_job(s, cfg_new(s, sr, mb, NULL));
			continue;
		}
		/* takes effect at its next poll; a running one keeps its own */
		struct cfg *c = cfg_new(s, sr, mb, j->cfg);
		bool was_broken = j->cfg->broken != NULL;
		set_cfg(j, c);
		j->seen = true;
		if (c->broken != NULL) {
			setup_failed(j);
		} else if (was_broken) {
			log_notice(j->id, "set up after the reload: polled now");
			arm(j, 0);
		}
	}
	for (j = TAILQ_FIRST(&s->jobs); j != NULL; j = next) {
		next = TAILQ_NEXT(j, all);
		if (j->seen || j->removed)
			continue;
		log_info(j->id, "removed from the configuration%s",
			 j->fetch ? ": its running session finishes first" : "");
		evtimer_del(j->timer);
		dequeue(j);
		if (j->fetch != NULL)
			mark_removed(j);
		else
			job_free(j);
	}
	setref_unref(s->current);
	s->current = sr;
	s->max_sessions = set->max_sessions;
	pump(s);
}

/* ---- the interface ---- */

struct scheduler *
scheduler_new(struct event_base *base, struct evdns_base *dns, struct conf_set *set,
	      sched_changed_cb changed_cb, void *arg)
{
	struct scheduler *s = xcalloc(1, sizeof(*s));
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	s->rng = (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32) ^ (uint64_t)ts.tv_sec;
	s->base = base;
	s->dns = dns;
	s->changed = changed_cb;
	s->arg = arg;
	s->oauth = oauth2_client_new(base);
	s->grace = evtimer_new(base, on_grace, s);
	if (s->grace == NULL)
		abort();
	TAILQ_INIT(&s->jobs);
	TAILQ_INIT(&s->queue);
	s->by_id = g_hash_table_new(g_str_hash, g_str_equal);
	apply(s, set);
	return s;
}

static void
on_token_request(void *arg, const char *id, enum oauth2_status status)
{
	struct scheduler *s = arg;

	metrics_token_request(s->metrics, id, oauth2_status_name(status));
}

void
scheduler_set_metrics(struct scheduler *s, struct metrics *m)
{
	struct job *j;

	s->metrics = m;
	TAILQ_FOREACH(j, &s->jobs, all)
		if (!j->removed)
			metrics_config_add(m, j->id);
	oauth2_client_observe(s->oauth, m != NULL ? on_token_request : NULL, s);
}

void
scheduler_set_workers(struct scheduler *s, struct worker_pool *workers, struct worker_pool *writer)
{
	s->workers = workers;
	s->writer = writer;
}

void
scheduler_swap(struct scheduler *s, struct conf_set *set)
{
	if (s->stopping) {
		conf_set_free(set);
		return;
	}
	apply(s, set);
	changed(s);
}

static void
stopped_now(evutil_socket_t fd, short what, void *arg)
{
	struct scheduler *s = arg;
	void (*done)(void *) = s->stopped;

	(void)fd;
	(void)what;
	if (done != NULL) {
		s->stopped = NULL;
		done(s->stopped_arg);
	}
}

/* The stop's grace time is over: the polls still running end without QUIT. */
static void
on_grace(evutil_socket_t fd, short what, void *arg)
{
	struct scheduler *s = arg;

	(void)fd;
	(void)what;
	for (struct job *j = TAILQ_FIRST(&s->jobs); j != NULL; j = TAILQ_NEXT(j, all))
		if (j->fetch != NULL) {
			log_warning(j->id, "still running at the end of the stop grace time: ended "
					   "without QUIT");
			fetch_abort(j->fetch, "the daemon is stopping");
		}
}

void
scheduler_stop(struct scheduler *s, unsigned grace, void (*done)(void *arg), void *arg)
{
	struct job *j;
	struct timeval tv = {grace, 0};
	static const struct timeval zero = {0, 0};

	s->stopping = true;
	s->stopped = done;
	s->stopped_arg = arg;
	TAILQ_FOREACH(j, &s->jobs, all) {
		evtimer_del(j->timer);
		cancel_token(j);
		dequeue(j);
	}
	if (s->nrunning == 0) {
		if (event_base_once(s->base, -1, EV_TIMEOUT, stopped_now, s, &zero) < 0)
			abort();
		return;
	}
	log_info(NULL, "stopping: %zu session(s) finish the message in hand (at most %u s)",
		 s->nrunning, grace);
	evtimer_add(s->grace, &tv);
	TAILQ_FOREACH(j, &s->jobs, all)
		if (j->fetch != NULL)
			fetch_stop(j->fetch);
	changed(s);
}

void
scheduler_stats(const struct scheduler *s, struct sched_stats *st)
{
	memset(st, 0, sizeof(*st));
	st->configurations = s->nconfigs;
	st->broken = s->nbroken;
	st->failing = s->nfailing;
	st->running = s->nrunning;
	st->queued = s->nqueued;
	st->saved = s->saved;
	snprintf(st->last_error, sizeof(st->last_error), "%s", s->last_error);
}

void
scheduler_free(struct scheduler *s)
{
	struct job *j;

	if (s == NULL)
		return;
	while ((j = TAILQ_FIRST(&s->jobs)) != NULL) {
		if (j->fetch != NULL) {
			fetch_free(j->fetch);
			cfg_unref(j->running);
		}
		job_free(j);
	}
	setref_unref(s->current);
	g_hash_table_destroy(s->by_id);
	event_free(s->grace);
	oauth2_client_free(s->oauth);
	free(s);
}
