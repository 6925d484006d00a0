/* test_worker — the thread pool: work on a thread, done on the loop, in
 * any number; a job ended at once (worker_finish) whether queued, running
 * or done; the pool freed with nothing left; its threads yield to the loop
 * (a higher nice value); serial jobs on one thread, in order. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <event2/event.h>

#include "check.h"
#include "popfetchd/worker.h"

#define JOBS 200

struct job {
	struct event_base *base;
	pthread_t loop_thread;
	atomic_bool worked;
	bool on_thread; /* the work ran off the loop's thread */
	bool done_on_loop;
	int done_calls;
	unsigned sleep_us;
	int *remaining;
};

static void
work(void *arg)
{
	struct job *j = arg;

	if (j->sleep_us)
		usleep(j->sleep_us);
	j->on_thread = !pthread_equal(pthread_self(), j->loop_thread);
	atomic_store(&j->worked, true);
}

static void
done(void *arg)
{
	struct job *j = arg;

	j->done_on_loop = pthread_equal(pthread_self(), j->loop_thread);
	j->done_calls++;
	CHECK(atomic_load(&j->worked));
	if (j->remaining != NULL && --*j->remaining == 0)
		event_base_loopbreak(j->base);
}

static atomic_int wakes; /* 8-byte write(2)s: the eventfd's */

ssize_t
write(int fd, const void *buf, size_t n)
{
	if (n == sizeof(uint64_t))
		atomic_fetch_add(&wakes, 1);
	return syscall(SYS_write, fd, buf, n);
}

/* Jobs that end while the loop has not yet taken the first: one wake of
 * the loop for them all, which then takes every one. */
static void
one_wake_for_many(void)
{
	struct event_base *base = event_base_new();
	struct worker_pool *p = worker_pool_new(base, 2);
	static struct job jobs[50];
	int remaining = 50, worked = 0;

	atomic_store(&wakes, 0);
	for (int i = 0; i < 50; i++) {
		jobs[i] = (struct job){
			.base = base, .loop_thread = pthread_self(), .remaining = &remaining};
		worker_submit(p, work, done, &jobs[i]);
	}
	while (worked < 50) {
		usleep(1000);
		worked = 0;
		for (int i = 0; i < 50; i++)
			worked += atomic_load(&jobs[i].worked);
	}
	/* one thread took them all (the first takes serial jobs alone) and put
	 * each on the list before its next: the first woke the loop */
	CHECK(atomic_load(&wakes) == 1);
	event_base_dispatch(base);
	CHECK(remaining == 0);
	worker_pool_free(p);
	event_base_free(base);
}

static void
many_jobs(void)
{
	struct event_base *base = event_base_new();
	struct worker_pool *p = worker_pool_new(base, 2);
	static struct job jobs[JOBS];
	int remaining = JOBS;

	CHECK(p != NULL);
	for (int i = 0; i < JOBS; i++) {
		jobs[i] = (struct job){.base = base,
				       .loop_thread = pthread_self(),
				       .remaining = &remaining,
				       .sleep_us = i % 10 == 0 ? 1000 : 0};
		worker_submit(p, work, done, &jobs[i]);
	}
	/* never from inside worker_submit */
	for (int i = 0; i < JOBS; i++)
		CHECK(jobs[i].done_calls == 0);
	event_base_dispatch(base);
	CHECK(remaining == 0);
	for (int i = 0; i < JOBS; i++) {
		CHECK(jobs[i].on_thread);
		CHECK(jobs[i].done_on_loop);
		CHECK(jobs[i].done_calls == 1);
	}
	/* with no job out the pool keeps the loop from nothing: it runs dry */
	CHECK(event_base_loop(base, 0) == 1);
	worker_pool_free(p);
	event_base_free(base);
}

/* No thread: a queued job is run by worker_finish itself, a serial one too,
 * and the serial queue goes on without it. */
static void
finish_queued(void)
{
	struct event_base *base = event_base_new();
	struct worker_pool *p = worker_pool_new(base, 0);
	struct job j = {.base = base, .loop_thread = pthread_self()};
	struct job a = j, b = j;
	struct worker_job *h = worker_submit(p, work, done, &j);
	struct worker_job *ha = worker_submit_serial(p, work, done, &a);
	struct worker_job *hb = worker_submit_serial(p, work, done, &b);

	worker_finish(h);
	CHECK(j.done_calls == 1);
	CHECK(!j.on_thread);
	worker_finish(hb);
	CHECK(b.done_calls == 1 && !b.on_thread && a.done_calls == 0);
	worker_finish(ha);
	CHECK(a.done_calls == 1);
	event_base_loop(base, EVLOOP_NONBLOCK);
	CHECK(j.done_calls == 1 && a.done_calls == 1 && b.done_calls == 1);
	worker_pool_free(p);
	event_base_free(base);
}

/* Running, or done and not yet handed back: worker_finish waits, calls done
 * once, and the loop does not call it again. */
static void
finish_running_and_done(void)
{
	struct event_base *base = event_base_new();
	struct worker_pool *p = worker_pool_new(base, 1);
	struct job slow = {.base = base, .loop_thread = pthread_self(), .sleep_us = 50000};
	struct job quick = {.base = base, .loop_thread = pthread_self()};
	struct worker_job *hs = worker_submit(p, work, done, &slow);
	struct worker_job *hq;

	worker_finish(hs);
	CHECK(slow.done_calls == 1 && atomic_load(&slow.worked));
	hq = worker_submit(p, work, done, &quick);
	while (!atomic_load(&quick.worked))
		usleep(1000);
	worker_finish(hq); /* done already, its done callback not yet called */
	CHECK(quick.done_calls == 1 && quick.on_thread);
	event_base_loop(base, EVLOOP_NONBLOCK);
	CHECK(slow.done_calls == 1 && quick.done_calls == 1);
	worker_pool_free(p);
	event_base_free(base);
}

/* Freed with jobs out: each one's work runs and its done is called once. */
static void
free_with_jobs_out(void)
{
	struct event_base *base = event_base_new();
	struct worker_pool *p = worker_pool_new(base, 0);
	struct worker_pool *p1 = worker_pool_new(base, 1);
	struct job j = {.base = base, .loop_thread = pthread_self()};
	struct job k[3];

	worker_submit(p, work, done, &j);
	worker_pool_free(p);
	CHECK(j.done_calls == 1 && atomic_load(&j.worked));
	for (int i = 0; i < 3; i++) {
		k[i] = (struct job){.base = base, .loop_thread = pthread_self(), .sleep_us = 5000};
		worker_submit(p1, work, done, &k[i]);
	}
	worker_pool_free(p1);
	for (int i = 0; i < 3; i++)
		CHECK(k[i].done_calls == 1 && k[i].done_on_loop && atomic_load(&k[i].worked));
	worker_pool_free(NULL);
	event_base_free(base);
}

static void
nice_work(void *arg)
{
	int *nice = arg;

	errno = 0;
	*nice = getpriority(PRIO_PROCESS, (id_t)gettid());
	CHECK(errno == 0);
}

static struct event_base *nice_base;

static void
nice_done(void *arg)
{
	(void)arg;
	event_base_loopbreak(nice_base);
}

/* A worker's nice value is above the loop's (Linux: per thread), unless the
 * loop is already at the most (19). */
static void
workers_yield(void)
{
	struct event_base *base = nice_base = event_base_new();
	struct worker_pool *p = worker_pool_new(base, 1);
	int loop, nice = -100;

	errno = 0;
	loop = getpriority(PRIO_PROCESS, (id_t)gettid());
	CHECK(errno == 0);
	worker_submit(p, nice_work, nice_done, &nice); /* on the thread, not by worker_finish */
	event_base_dispatch(base);
	CHECK(nice > loop || loop == 19);
	CHECK(nice <= 19);
	worker_pool_free(p);
	event_base_free(base);
}

#define SERIAL 40

struct tagged {
	pthread_t thread;
	int order; /* the serial jobs' order of running */
	bool serial;
	int *remaining;
	struct event_base *base;
};

static atomic_int serial_ran;

static void
tagged_work(void *arg)
{
	struct tagged *t = arg;

	t->thread = pthread_self();
	if (t->serial)
		t->order = atomic_fetch_add(&serial_ran, 1);
	if (t->serial)
		usleep(200); /* a commit waiting for the disk */
}

static void
tagged_done(void *arg)
{
	struct tagged *t = arg;

	if (--*t->remaining == 0)
		event_base_loopbreak(t->base);
}

/* Serial jobs run one thread, in the order submitted, and that thread runs
 * nothing else when there are others; a pool of one thread runs both. */
static void
serial_jobs(unsigned threads)
{
	struct event_base *base = event_base_new();
	struct worker_pool *p = worker_pool_new(base, threads);
	static struct tagged t[2 * SERIAL];
	int remaining = 2 * SERIAL;

	atomic_store(&serial_ran, 0);
	for (int i = 0; i < 2 * SERIAL; i++) {
		t[i] = (struct tagged){.serial = i % 2 == 0, .remaining = &remaining, .base = base};
		if (t[i].serial)
			worker_submit_serial(p, tagged_work, tagged_done, &t[i]);
		else
			worker_submit(p, tagged_work, tagged_done, &t[i]);
	}
	event_base_dispatch(base);
	CHECK(remaining == 0);
	for (int i = 0; i < 2 * SERIAL; i++) {
		CHECK(!pthread_equal(t[i].thread, pthread_self()));
		if (t[i].serial) {
			CHECK(pthread_equal(t[i].thread, t[0].thread));
			CHECK(t[i].order == i / 2);
		} else if (threads > 1) {
			CHECK(!pthread_equal(t[i].thread, t[0].thread));
		}
	}
	worker_pool_free(p);
	event_base_free(base);
}

static void
on_timeout(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	event_base_loopbreak(arg);
}

/* One job for any thread, alone, with the first thread (serial jobs only)
 * asleep beside the others: it runs (a wake-up that reached only the first
 * thread would leave it queued). */
static void
lone_jobs(void)
{
	struct event_base *base = event_base_new();
	struct worker_pool *p = worker_pool_new(base, 3);
	struct timeval second = {1, 0};
	struct event *timeout = evtimer_new(base, on_timeout, base);

	for (int i = 0; i < 50; i++) {
		int remaining = 1;
		struct tagged t = {.remaining = &remaining, .base = base};

		usleep(2000); /* every thread back asleep */
		worker_submit(p, tagged_work, tagged_done, &t);
		evtimer_add(timeout, &second);
		event_base_dispatch(base);
		evtimer_del(timeout);
		CHECK(remaining == 0);
		if (remaining != 0)
			break;
	}
	event_free(timeout);
	worker_pool_free(p);
	event_base_free(base);
}

int
main(void)
{
	lone_jobs();
	serial_jobs(1);
	serial_jobs(3);
	workers_yield();
	many_jobs();
	one_wake_for_many();
	finish_queued();
	finish_running_and_done();
	free_with_jobs_out();
	CHECK_DONE();
}
