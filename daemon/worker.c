/*
 * worker — the thread pool (see worker.h).
 *
 * One mutex guards the lists: jobs queued for any thread, serial jobs
 * queued for the first thread alone, and jobs done whose done callback has
 * not run yet. A job queued wakes one thread that may take it. A thread
 * that finishes a job moves it to the done list and, when the list was
 * empty, adds 1 to an eventfd; the loop's read event on it takes the done
 * jobs one at a time until none is left (a done callback may finish
 * another job, which must still be found in the list) and calls them. That
 * event is added only while jobs are out: an idle pool keeps no loop
 * running.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

#include <event2/event.h>

#include "popfetchd/util.h"
#include "popfetchd/worker.h"

enum job_state { JOB_QUEUED, JOB_RUNNING, JOB_DONE };

struct worker_job {
	struct worker_pool *pool;
	worker_fn work, done;
	void *arg;
	enum job_state state;
	bool serial;		 /* queued in serial, for the first thread */
	struct worker_job *next; /* in a queue or the done list */
};

struct worker_pool {
	pthread_mutex_t lock;
	pthread_cond_t queued;	 /* a job for any thread was queued, or stop */
	pthread_cond_t to_first; /* a job for the first thread, or stop */
	pthread_cond_t finished; /* a job's work has run */
	struct worker_job *queue, **queue_tail;
	struct worker_job *serial, **serial_tail; /* worker_submit_serial */
	struct worker_job *done;
	bool stop;
	pthread_t *threads;
	unsigned nthreads;
	unsigned size;	/* threads asked for */
	unsigned begun; /* threads that took their number (the first: 0) */
	int efd;
	struct event *ev;
	size_t out; /* jobs submitted whose done has not run (the loop's alone) */
};

/* Remove j from the list at *head; false when it is not there. */
static bool
unlink_job(struct worker_job **head, struct worker_job *j)
{
	for (struct worker_job **pp = head; *pp != NULL; pp = &(*pp)->next)
		if (*pp == j) {
			*pp = j->next;
			j->next = NULL;
			return true;
		}
	return false;
}

/* The first thread takes the serial jobs, and the others when it is the
 * only one; the others take only those for any thread (a long seal does not
 * keep a commit waiting). The job is taken off its queue (the lock is
 * held); NULL when there is none for this thread. */
static struct worker_job *
take_queued(struct worker_pool *p, bool first)
{
	struct worker_job **head = first && p->serial != NULL ? &p->serial : &p->queue;
	struct worker_job *j = *head;

	if (j == NULL || (first && head == &p->queue && p->size > 1))
		return NULL;
	*head = j->next;
	if (p->serial == NULL)
		p->serial_tail = &p->serial;
	if (p->queue == NULL)
		p->queue_tail = &p->queue;
	j->next = NULL;
	return j;
}

static void
wake_loop(struct worker_pool *p)
{
	uint64_t one = 1;

	/* can only fail when the counter is near 2^64: it is read at once */
	while (write(p->efd, &one, sizeof(one)) < 0 && errno == EINTR)
		;
}

/* A worker yields the CPU to the loop: a long parse or a commit's syncfs
 * must not make the loop's timers late (Linux's nice value is per thread;
 * failing to lower it only loses that). */
#define WORKER_NICE 5

static void
lower_priority(void)
{
	pid_t tid = gettid();
	int now;

	errno = 0;
	now = getpriority(PRIO_PROCESS, (id_t)tid);
	if (errno == 0)
		(void)setpriority(PRIO_PROCESS, (id_t)tid, now + WORKER_NICE);
}

static void *
thread_main(void *arg)
{
	struct worker_pool *p = arg;
	struct worker_job *j;
	bool first;

	lower_priority();
	pthread_mutex_lock(&p->lock);
	first = p->begun++ == 0;
	for (;;) {
		while (!p->stop && (j = take_queued(p, first)) == NULL)
			pthread_cond_wait(first ? &p->to_first : &p->queued, &p->lock);
		if (p->stop)
			break;
		j->state = JOB_RUNNING;
		pthread_mutex_unlock(&p->lock);
		j->work(j->arg);
		pthread_mutex_lock(&p->lock);
		j->state = JOB_DONE;
		j->next = p->done;
		p->done = j;
		pthread_cond_broadcast(&p->finished);
		if (j->next == NULL) /* else the loop is yet to take the others */
			wake_loop(p);
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

/* On the loop: j's done, and the event goes when no job is out. */
static void
job_over(struct worker_pool *p, struct worker_job *j)
{
	j->done(j->arg);
	free(j);
	if (--p->out == 0)
		event_del(p->ev);
}

/* The eventfd: call the done jobs, one at a time. */
static void
on_done(evutil_socket_t fd, short what, void *arg)
{
	struct worker_pool *p = arg;
	uint64_t n;
	struct worker_job *j;

	(void)what;
	while (read(fd, &n, sizeof(n)) < 0 && errno == EINTR)
		;
	for (;;) {
		pthread_mutex_lock(&p->lock);
		j = p->done;
		if (j != NULL)
			p->done = j->next;
		pthread_mutex_unlock(&p->lock);
		if (j == NULL)
			return;
		job_over(p, j);
	}
}

static struct worker_job *
submit(struct worker_pool *p, worker_fn work, worker_fn done, void *arg, bool serial)
{
	struct worker_job *j = xcalloc(1, sizeof(*j));

	j->pool = p;
	j->work = work;
	j->done = done;
	j->arg = arg;
	j->state = JOB_QUEUED;
	j->serial = serial;
	if (p->out++ == 0)
		event_add(p->ev, NULL);
	pthread_mutex_lock(&p->lock);
	if (serial) {
		*p->serial_tail = j;
		p->serial_tail = &j->next;
	} else {
		*p->queue_tail = j;
		p->queue_tail = &j->next;
	}
	/* the first thread takes the serial jobs, and any when it is alone */
	pthread_cond_signal(serial || p->size <= 1 ? &p->to_first : &p->queued);
	pthread_mutex_unlock(&p->lock);
	return j;
}

struct worker_job *
worker_submit(struct worker_pool *p, worker_fn work, worker_fn done, void *arg)
{
	return submit(p, work, done, arg, false);
}

struct worker_job *
worker_submit_serial(struct worker_pool *p, worker_fn work, worker_fn done, void *arg)
{
	return submit(p, work, done, arg, true);
}

/* j, queued, leaves its queue (the lock is held). */
static void
unqueue(struct worker_pool *p, struct worker_job *j)
{
	struct worker_job **head = j->serial ? &p->serial : &p->queue;
	struct worker_job ***tail = j->serial ? &p->serial_tail : &p->queue_tail;

	unlink_job(head, j);
	*tail = head;
	while (**tail != NULL)
		*tail = &(**tail)->next;
}

size_t
worker_outstanding(const struct worker_pool *p)
{
	return p->out;
}

void
worker_finish(struct worker_job *j)
{
	struct worker_pool *p = j->pool;
	bool run_here = false;

	pthread_mutex_lock(&p->lock);
	if (j->state == JOB_QUEUED) {
		unqueue(p, j);
		run_here = true;
	} else {
		while (j->state != JOB_DONE)
			pthread_cond_wait(&p->finished, &p->lock);
		unlink_job(&p->done, j);
	}
	pthread_mutex_unlock(&p->lock);
	if (run_here)
		j->work(j->arg);
	job_over(p, j);
}

/* Every job out ends: queued ones run here, running ones are waited for. */
static void
drain(struct worker_pool *p)
{
	while (p->out > 0) {
		struct worker_job *j;

		pthread_mutex_lock(&p->lock);
		while ((j = p->queue ? p->queue : p->serial ? p->serial : p->done) == NULL)
			pthread_cond_wait(&p->finished, &p->lock);
		pthread_mutex_unlock(&p->lock);
		worker_finish(j);
	}
}

void
worker_pool_free(struct worker_pool *p)
{
	if (p == NULL)
		return;
	drain(p);
	pthread_mutex_lock(&p->lock);
	p->stop = true;
	pthread_cond_broadcast(&p->queued);
	pthread_cond_broadcast(&p->to_first);
	pthread_mutex_unlock(&p->lock);
	for (unsigned i = 0; i < p->nthreads; i++)
		pthread_join(p->threads[i], NULL);
	if (p->ev != NULL)
		event_free(p->ev);
	if (p->efd >= 0)
		close(p->efd);
	pthread_cond_destroy(&p->queued);
	pthread_cond_destroy(&p->to_first);
	pthread_cond_destroy(&p->finished);
	pthread_mutex_destroy(&p->lock);
	FREE_ALL(p->threads, p);
}

/* The threads take no signal: the loop's thread handles them all. */
static int
start_threads(struct worker_pool *p, unsigned threads)
{
	sigset_t all, old;
	int err = 0;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (; p->nthreads < threads && err == 0; p->nthreads++)
		if ((err = pthread_create(&p->threads[p->nthreads], NULL, thread_main, p)) != 0)
			break;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return err;
}

struct worker_pool *
worker_pool_new(struct event_base *base, unsigned threads)
{
	struct worker_pool *p = xcalloc(1, sizeof(*p));
	int err;

	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->queued, NULL);
	pthread_cond_init(&p->to_first, NULL);
	pthread_cond_init(&p->finished, NULL);
	p->queue_tail = &p->queue;
	p->serial_tail = &p->serial;
	p->size = threads;
	p->threads = xcalloc(threads ? threads : 1, sizeof(*p->threads));
	if ((p->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0 ||
	    (p->ev = event_new(base, p->efd, EV_READ | EV_PERSIST, on_done, p)) == NULL) {
		err = p->efd < 0 ? errno : ENOMEM;
		goto fail;
	}
	if ((err = start_threads(p, threads)) != 0)
		goto fail;
	return p;
fail:
	worker_pool_free(p);
	errno = err;
	return NULL;
}
