/*
 * scheduler — the daemon's polls: one timer per active configuration of
 * this process's shard, at most max_sessions sessions at once (the rest wait
 * in a first-come queue), never two for one configuration, first polls
 * spread over the first interval, exponential backoff with jitter after a
 * failure ([LOGIN-DELAY] honoured), the swap to a reloaded configuration
 * set, and a graceful stop. A configuration whose runtime cannot be built
 * (TLS context), or whose save directory or refresh-token directory takes
 * no new file, is broken: never polled, its setup retried with the same
 * backoff, polled as soon as a retry or a reload builds it. An OAuth2 poll
 * gets its token before it takes a session slot; without one it is a failed
 * poll that took none. Knows no protocol: a poll is fetch_start() and its
 * result.
 */
#ifndef POPFETCHD_SCHEDULER_H
#define POPFETCHD_SCHEDULER_H

#include <stddef.h>

struct event_base;
struct evdns_base;
struct conf_set;
struct metrics;
struct scheduler;
struct worker_pool;

#define SCHED_MAX_BACKOFF 3600 /* seconds: a failing configuration is tried at least hourly */

struct sched_stats {
	size_t configurations;	  /* active ones */
	size_t running;		  /* sessions now */
	size_t queued;		  /* due, waiting for a session slot */
	size_t failing;		  /* whose last poll failed */
	size_t broken;		  /* whose setup failed (a tls_ca_file that cannot be
				   * loaded): not polled, the setup retried */
	unsigned long long saved; /* messages saved since start */
	char last_error[400];	  /* "ID: line" of the latest failure, "" when none */
};

/* Called whenever the figures of scheduler_stats() may have changed. */
typedef void (*sched_changed_cb)(void *arg);

/* Start polling every active configuration of set in its shard (the
 * scheduler owns it). */
struct scheduler *scheduler_new(struct event_base *base, struct evdns_base *dns,
				struct conf_set *set, sched_changed_cb changed, void *arg);
/*
 * Swap in a reloaded set (owned from now on): new configurations (and those
 * a changed shard setting brings into this process's shard) start
 * (first poll spread over their interval), removed or inactive ones stop
 * after their running session, changed ones take effect at their next poll;
 * a running session finishes on the configuration it began with.
 */
void scheduler_swap(struct scheduler *s, struct conf_set *set);
/*
 * Stop: no new session; running ones save the message in hand and QUIT;
 * after grace seconds what still runs is ended without QUIT. done() is
 * called from the loop when no session is left.
 */
void scheduler_stop(struct scheduler *s, unsigned grace, void (*done)(void *arg), void *arg);
void scheduler_stats(const struct scheduler *s, struct sched_stats *st);
/* Report every poll's end, token request and configuration to m (NULL: to
 * nobody from now on). */
void scheduler_set_metrics(struct scheduler *s, struct metrics *m);
/* Seal and commit the polls' messages on the threads of workers, and
 * write the status files on writer's one thread, in order (NULL: on the
 * loop), from now on. Both must outlive the scheduler, and writer be
 * freed (its writes done) after it. */
void scheduler_set_workers(struct scheduler *s, struct worker_pool *workers,
			   struct worker_pool *writer);
void scheduler_free(struct scheduler *s);

#endif
