/*
 * worker — a small pool of threads for the work that would block the
 * daemon's loop (DESIGN.md §6): a commit's fsyncs and renames, the MIME and
 * S/MIME extraction of a large or hostile message. A job's work runs on a
 * worker thread; its done callback runs afterwards on the loop, which stays
 * the only thread that touches sessions, timers and the scheduler. The
 * owner of a job must keep away from what its work uses until done.
 *
 * A pool of one thread runs its jobs in the order they were submitted.
 * With more, the first thread runs the serial jobs (worker_submit_serial)
 * alone, one at a time in the order they were submitted, and the others
 * the rest: the store's commits of every poll on one thread (a syncfs
 * flushes the whole file system: two at once would only repeat each
 * other's work; a test counts their system calls per thread), never
 * waiting behind a long extraction.
 * Knows nothing of what a job does.
 */
#ifndef POPFETCHD_WORKER_H
#define POPFETCHD_WORKER_H

#include <stddef.h>

struct event_base;
struct worker_pool;
struct worker_job;

/* the daemon's pool: threads for seals, and one for the store's jobs */
#define WORKER_THREADS	 2
#define WORKER_POOL_SIZE (WORKER_THREADS + 1)

/* Threads, and an event on base through which finished jobs come back.
 * NULL when a thread or the event cannot be made (errno says why). */
struct worker_pool *worker_pool_new(struct event_base *base, unsigned threads);
/* Every job out ends first (as worker_finish: their done callbacks are
 * called from inside this call), then the threads stop. NULL is a no-op. */
void worker_pool_free(struct worker_pool *p);

typedef void (*worker_fn)(void *arg);

/* Queue work(arg) for a worker; done(arg) is called on the loop once it
 * has run (never from inside this call). The job is the pool's: its
 * handle is valid until done is called. */
struct worker_job *worker_submit(struct worker_pool *p, worker_fn work, worker_fn done, void *arg);
/* The same for the pool's first thread, after the serial jobs before it. */
struct worker_job *worker_submit_serial(struct worker_pool *p, worker_fn work, worker_fn done,
					void *arg);
/* The job ends now: its work is run here if no worker has begun it, or
 * waited for, and then done is called from inside this call (and never
 * again). Blocks the loop: for the rare ends (a session that fails, a
 * stop), not the usual path. */
void worker_finish(struct worker_job *j);
/* Jobs submitted whose done callback has not run yet; on the loop. */
size_t worker_outstanding(const struct worker_pool *p);

#endif
