/*
 * fetch — one poll of one configuration. The order of every message's life
 * is the durability rule of DESIGN.md §4: RETR streamed into a staged
 * folder, headers read, text and attachments extracted, meta.json written;
 * then, for a batch of such messages at once (group commit), the folders
 * made durable, their UIDLs recorded and fdatasync'd, the folders renamed
 * into place and save_directory fsync'd — and only then their DELEs. With
 * a server that offers PIPELINING a window of RETRs is kept in flight.
 * Messages without UIDL that stay on the server are first asked TOP n 0:
 * known by their headers, only those not saved before are downloaded.
 *
 * Two state machines: the poll's (enum fetch_state, entered only through
 * fetch_enter, which traces and checks every transition) and each
 * message's (enum msg_state, through msg_enter). DELE is sent in one
 * place, delete_message, for a message in MSG_COMMITTED only.
 */
#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <time.h>

#include <event2/event.h>

#include "popfetchd/config.h"
#include "popfetchd/fetch.h"
#include "popfetchd/log.h"
#include "popfetchd/message.h"
#include "popfetchd/oauth2.h"
#include "popfetchd/pop3.h"
#include "popfetchd/runtime.h"
#include "popfetchd/store.h"
#include "popfetchd/util.h"
#include "popfetchd/worker.h"

#define BIT(s) (1u << (s))

/*
 * What becomes of one message of the listing:
 *
 *   LISTED    -> REQUESTED (RETR sent) | COMMITTED (saved before: its key is
 *                in the state) | SKIPPED (over max_message_size: left there)
 *   REQUESTED -> STAGED (sealed into the batch) | COMMITTED (saved before,
 *                known once here by its content) | FAILED
 *   STAGED    -> COMMITTED (the batch is durable) | FAILED (the commit failed)
 *   COMMITTED -> DELE_SENT (with remove_after_read; only in delete_message)
 *   DELE_SENT -> DELETED | COMMITTED (the server refused the DELE)
 */
enum msg_state {
	MSG_LISTED,    /* to be received */
	MSG_REQUESTED, /* RETR sent: its bytes go to a staged folder */
	MSG_STAGED,    /* complete and sealed into the batch, not durable yet */
	MSG_COMMITTED, /* durable and recorded, in this session or before: may be deleted */
	MSG_DELE_SENT, /* DELE sent, not answered yet */
	MSG_DELETED,   /* the server took the DELE (QUIT +OK commits it) */
	MSG_SKIPPED,   /* left on the server: over max_message_size */
	MSG_FAILED,    /* not saved in this session (refused, a write failed, dropped) */
};

/* the states a message may go to from each (msg_enter) */
static const unsigned msg_next[] = {
	[MSG_LISTED] = BIT(MSG_REQUESTED) | BIT(MSG_COMMITTED) | BIT(MSG_SKIPPED),
	[MSG_REQUESTED] = BIT(MSG_STAGED) | BIT(MSG_COMMITTED) | BIT(MSG_FAILED),
	[MSG_STAGED] = BIT(MSG_COMMITTED) | BIT(MSG_FAILED),
	[MSG_COMMITTED] = BIT(MSG_DELE_SENT),
	[MSG_DELE_SENT] = BIT(MSG_DELETED) | BIT(MSG_COMMITTED),
};

/* A message of the listing (or a copy, for a DELE sent). A listing may name
 * a million messages: this is kept small, the UIDL is the session's
 * (struct pop3_msg) or, for a message keyed by its content, in keys. */
struct candidate {
	unsigned long num;
	uint64_t size;	     /* as LIST says */
	const char *uid;     /* "" until keyed, for a message without UIDL */
	unsigned char state; /* enum msg_state */
};

/*
 * The poll:
 *
 *   START         -> TOKEN (OAuth2) | LOGIN
 *   TOKEN         -> LOGIN
 *   LOGIN         -> LISTING | TOKEN (the token was refused: one fresh one)
 *   LISTING       -> TOPPING (messages without UIDL to know by their headers)
 *                  | RETRIEVING
 *   TOPPING       -> RETRIEVING | COMMITTING (stopped, or an answer not trusted)
 *   RETRIEVING    -> STOPPING (fetch_stop, RETRs in flight)
 *                  | COMMITTING (nothing more to ask, or saving stops)
 *   STOPPING      -> COMMITTING
 *   COMMITTING    -> QUITTING | STARTING_OVER
 *   QUITTING, STARTING_OVER -> LOGIN (a new session of the same poll)
 *   TOPPING, RETRIEVING, QUITTING, STARTING_OVER
 *                 -> LOGIN (the session was lost after DELEs of messages
 *                    saved before: retry_fewer_deletions)
 *   any but COMMITTING -> DONE (finish)
 */
enum fetch_state {
	FETCH_START,	     /* opening the store */
	FETCH_TOKEN,	     /* waiting for an OAuth2 access token */
	FETCH_LOGIN,	     /* a POP3 session connects and logs in */
	FETCH_LISTING,	     /* UIDL and LIST asked */
	FETCH_TOPPING,	     /* TOP n 0 of the messages without UIDL in flight */
	FETCH_RETRIEVING,    /* RETRs in flight: messages saved, batches committed and deleted */
	FETCH_STOPPING,	     /* fetch_stop: the RETRs in flight are saved, no more asked */
	FETCH_COMMITTING,    /* the session's last batch committed, its DELEs sent */
	FETCH_QUITTING,	     /* QUIT sent: answers still in flight are dropped */
	FETCH_STARTING_OVER, /* the same, after an answer that could not be trusted: a new
				session follows that asks one command at a time */
	FETCH_DONE,
};

static const char *const state_names[] = {
	[FETCH_START] = "START",       [FETCH_TOKEN] = "TOKEN",
	[FETCH_LOGIN] = "LOGIN",       [FETCH_LISTING] = "LISTING",
	[FETCH_TOPPING] = "TOPPING",   [FETCH_RETRIEVING] = "RETRIEVING",
	[FETCH_STOPPING] = "STOPPING", [FETCH_COMMITTING] = "COMMITTING",
	[FETCH_QUITTING] = "QUITTING", [FETCH_STARTING_OVER] = "STARTING_OVER",
	[FETCH_DONE] = "DONE",
};

/* the states the poll may go to from each (fetch_enter) */
static const unsigned fetch_next[] = {
	[FETCH_START] = BIT(FETCH_TOKEN) | BIT(FETCH_LOGIN) | BIT(FETCH_DONE),
	[FETCH_TOKEN] = BIT(FETCH_LOGIN) | BIT(FETCH_DONE),
	[FETCH_LOGIN] = BIT(FETCH_LISTING) | BIT(FETCH_TOKEN) | BIT(FETCH_DONE),
	[FETCH_LISTING] = BIT(FETCH_TOPPING) | BIT(FETCH_RETRIEVING) | BIT(FETCH_DONE),
	[FETCH_TOPPING] =
		BIT(FETCH_RETRIEVING) | BIT(FETCH_COMMITTING) | BIT(FETCH_LOGIN) | BIT(FETCH_DONE),
	[FETCH_RETRIEVING] =
		BIT(FETCH_STOPPING) | BIT(FETCH_COMMITTING) | BIT(FETCH_LOGIN) | BIT(FETCH_DONE),
	[FETCH_STOPPING] = BIT(FETCH_COMMITTING) | BIT(FETCH_DONE),
	[FETCH_COMMITTING] = BIT(FETCH_QUITTING) | BIT(FETCH_STARTING_OVER),
	[FETCH_QUITTING] = BIT(FETCH_LOGIN) | BIT(FETCH_DONE),
	[FETCH_STARTING_OVER] = BIT(FETCH_LOGIN) | BIT(FETCH_DONE),
	[FETCH_DONE] = 0,
};

/*
 * A message without a (valid) UIDL is keyed by its content (message.h),
 * known once it is all there. Every message is hashed as it comes
 * (known_before says why). Kept on the server (remove_after_read: false),
 * such a message would be downloaded at every poll to be known so. Where
 * the server has TOP it is known by its header key instead
 * (start_top_phase says when): only a message whose key is not in the
 * state is downloaded. Messages that share that key (equal headers and
 * size) are known by their content, as is one whose TOP is refused or
 * whose header block is over HEADERS_MAX.
 */
#define KEY_SIZE    MESSAGE_KEY_SIZE
#define HEADERS_MAX (256 * 1024)
/* TOPs kept in flight when the server offers PIPELINING */
#define TOP_WINDOW 32

/* New sessions one poll may start after its first (a new token, lockstep,
 * fewer deletions at once). */
#define MAX_SESSIONS 8

/* RETRs kept in flight when the server offers PIPELINING (RFC 2449): at
 * most RETR_WINDOW, and beyond the first no more than RETR_WINDOW_BYTES as
 * LIST counts them (what a stopping daemon still waits for). 4 MiB rather
 * than 1: 200 messages of 1 MB took 15% less time (tests/bench/peers). */
#define RETR_WINDOW	  16
#define RETR_WINDOW_BYTES (4 * 1024 * 1024)
/* A batch is committed at conf_set.commit_batch messages, at BATCH_BYTES of
 * message data, or conf_set.commit_interval seconds after its first
 * message, whichever comes first (and when there is nothing more to
 * receive). */
#define BATCH_BYTES (32ULL * 1024 * 1024)

/*
 * With a worker pool (fetch_params.workers), a batch's commit (syncfs, the
 * records, the renames) runs on a worker thread, one such job at a time
 * per poll. The batch is taken from the store (store_batch_take) with its
 * candidates (the job's pend): while it is committed the session reads
 * on, and the messages that come are sealed into a new batch. A DELE
 * still goes out only once the commit's result is back on the loop
 * (commit_ended) and says the message is durable. A new batch that is due
 * while a commit runs (full, or its time bound passed: commit_due) is
 * committed right after it as it is (a seal that ends meanwhile joins the
 * batch after it), the session held meanwhile so that a batch keeps its
 * bounds; the session's last commit (wind_up) comes after it too. Once a
 * commit fails the session saves nothing more: the new batch is dropped
 * with it. A poll that must end while a job runs (the session failed,
 * fetch_abort) waits for it first (settle). The store's opening (a first
 * poll writes the state, with fsyncs) and the state's compaction after
 * QUIT are jobs that have the store alone: the session starts after the
 * one, the poll ends after the other.
 *
 * A message's seal (its MIME and S/MIME extraction, the files beside
 * message.eml: message_prepare) touches only that message's own folder:
 * up to SEALS_MAX of them run on workers while the session reads on, so
 * that receiving and extracting overlap. A seal that ended joins the
 * (new) batch on the loop (drain_seals), in the order the seals began: the
 * batches, and so the commits and the DELEs, keep the order the messages
 * came in. A seal still out is not in the batch: a commit on the loop
 * (commit_batch) waits for all of them first, the session's last commit
 * (wind_up) begins once they have ended.
 */
/* seals of one poll out at once: at most this many messages (each up to 4
 * MiB in memory, store.h) wait for theirs; at the bound the session is
 * held until one ends */
#define SEALS_MAX 3
enum job_kind { JOB_OPEN, JOB_SEAL, JOB_COMMIT, JOB_COMPACT };

/* A message the worker's commit made durable, for on_committed. */
struct committed {
	char *uid, *folder;
	unsigned long long size;
};

struct fetch_job {
	struct fetch *f;
	enum job_kind kind;
	int r;
	struct worker_job *wj; /* until done is called (ended) */
	bool ended;
	/* JOB_SEAL: the message of cand[cand] */
	size_t cand;
	struct message_info info;
	struct store_msg *msg;
	char why[600];
	/* JOB_COMMIT: the batch of n messages (the candidates pend), their
	 * DELEs with dele; then QUIT into after when quit */
	struct store_batch *batch;
	size_t *pend;
	size_t n;
	bool dele, quit;
	enum fetch_state after;
	struct committed *done;
	size_t ndone;
	/* JOB_COMPACT: the keys the state keeps */
	const char **keep;
	/* JOB_OPEN: the store to open */
	struct store_params sp;
	struct store *store;
};

struct fetch {
	struct event_base *base;
	const struct conf_mailbox *mb;
	enum fetch_mode mode;
	fetch_done_cb done;
	void *arg;
	enum fetch_state state;

	struct evdns_base *dns;
	int (*open_socket)(void *arg); /* fetch_params: tests only */
	void *open_arg;
	struct tls_ctx *tls;
	struct auth_scram_cache *scram_cache;
	struct oauth2_source *oauth2;
	struct oauth2_request *token_req;
	char *token; /* the access token of this poll (wiped) */
	/* a fresh token was fetched after the server refused one: once per
	 * poll, whichever of its sessions logs in (not a state of one) */
	bool token_retried;
	/* new sessions this poll may still start; fetch_stop leaves none */
	unsigned sessions_left;

	struct store *store;
	struct pop3_session *pop3;
	const char **mechanisms;
	/* a parameter of the session: one command at a time even where the
	 * server offers PIPELINING (after one whose answers were not trusted) */
	bool lockstep;

	struct candidate *cand;
	size_t ncand;
	size_t next;   /* the candidate whose response is being read */
	size_t issued; /* RETRs asked for: cand[next..issued) are in flight */
	size_t window; /* most RETRs in flight */
	size_t *pend;  /* candidates sealed in the batch, in order */
	size_t npend, pend_done;
	unsigned batch_max, batch_seconds;
	struct event *commit_ev; /* the batch's time bound */
	const char **listed;	 /* UIDLs on the server, for compaction after QUIT */
	size_t nlisted;
	char *keys; /* the content keys made in this session, KEY_SIZE bytes each, never moved */
	size_t nkeys, capkeys;
	struct store_msg *msg;	 /* the message being received */
	struct message_key *key; /* its key in the making */
	struct message_params msgp;
	/* listed messages without UIDL whose key is not known in this session,
	 * or is a header key not in the state (saved under another key before?) */
	size_t unkeyed;
	bool have_uidl; /* what the listing said: the server answered UIDL */
	/* TOP n 0 for the messages without UIDL; top_refused: a TOP was
	 * refused one at a time, no more in this poll (whichever session) */
	bool top_refused;
	size_t top_next, top_issue; /* candidates: the one being answered, the next to ask */
	size_t top_inflight, top_window;
	char *head_keys; /* the header keys, KEY_SIZE bytes each, never moved */
	size_t nhead_keys;
	struct pop3_head head; /* the header block of the TOP being answered */
	size_t head_bytes;     /* over HEADERS_MAX: too long to be known by */
	time_t msg_time;
	uint64_t msg_bytes, msg_limit; /* received so far, most accepted */
	struct candidate *dele;	       /* DELEs sent, to learn which the server took */
	size_t ndele, capdele;
	size_t dele_answered; /* answers come in the order the DELEs went out */
	size_t dele_ok;
	/* DELEs of messages saved by an earlier session: sent in this one, most
	 * per session (0: no limit), and those left for the next one */
	size_t stale_sent, stale_cap, stale_left;
	struct event *done_ev;

	struct worker_pool *workers;	    /* NULL: seal and commit here */
	struct fetch_job *job;		    /* the poll's job in flight (not a seal), or NULL */
	struct fetch_job *seals[SEALS_MAX]; /* out, in the order they began */
	size_t nseals;
	bool seals_full; /* they reached SEALS_MAX, and 2 have not ended since */
	/* wind_up waits for the seals out: then it commits and QUITs so */
	bool wind_pending, wind_dele;
	enum fetch_state wind_after;
	/* a seal or a commit failed: the seals out (of messages after it) are
	 * dropped as they end, as the RETRs in flight are */
	bool dropping;
	bool commit_due; /* the batch is due while a commit runs: after it */
	bool settling;	 /* the job is being ended at once: nothing follows it */
	bool awaiting;	 /* the commit is being ended at once: the caller goes on */

	struct fetch_result res;
	char where[300]; /* "host:port" or "[v6]:port", for error lines */
};

static void forget_token(struct fetch *f);
static bool commit_batch(struct fetch *f, bool dele);
static bool await_commit(struct fetch *f);
static uint64_t message_limit(const struct fetch *f, uint64_t listed);
static void start_session(struct fetch *f);
static void settle(struct fetch *f);
static bool flush_seals(struct fetch *f);
static void compacted(struct fetch *f, int r);
static void opened(struct fetch *f, int r, const char *why);

static void add_error_at(struct fetch *f, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
#define add_error(f, ...) add_error_at(f, LOG_LVL_ERROR, __VA_ARGS__)

static void
add_error_v(struct fetch *f, int level, const char *fmt, va_list ap)
{
	char *line;

	if (vasprintf(&line, fmt, ap) < 0)
		abort();
	log_msg(level, f->mb->id, "%s", line);
	f->res.errors = xrealloc(f->res.errors, (f->res.nerrors + 1) * sizeof(char *));
	f->res.errors[f->res.nerrors++] = line;
}

/* An error of this poll: logged at level, and kept for the result. */
static void
add_error_at(struct fetch *f, int level, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	add_error_v(f, level, fmt, ap);
	va_end(ap);
}

static void
set_exit(struct fetch *f, int code)
{
	if (f->res.exit_code == 0)
		f->res.exit_code = code;
}

/*
 * A rule of the state machines broken: a bug, never a server's doing, and
 * the end of the process before it could send a DELE it must not. Not
 * assert(): these hold in every build.
 */
#define MUST(cond) ((cond) ? (void)0 : broken_rule(#cond, __LINE__))

static void __attribute__((noreturn)) broken_rule(const char *rule, int line)
{
	fprintf(stderr, "popfetchd: fetch.c:%d: %s does not hold\n", line, rule);
	abort();
}

/* The one way the poll changes state: traced, and only along the diagram. */
static void
fetch_enter(struct fetch *f, enum fetch_state st)
{
	MUST(fetch_next[f->state] & BIT(st));
	log_debug(f->mb->id, "fetch %s -> %s", state_names[f->state], state_names[st]);
	f->state = st;
}

/* Is the session reading messages (their answers are saved)? */
static bool
retrieving(const struct fetch *f)
{
	return f->state == FETCH_RETRIEVING || f->state == FETCH_STOPPING;
}

static void
msg_enter(struct candidate *c, enum msg_state st)
{
	MUST(msg_next[c->state] & BIT(st));
	c->state = st;
}

static void
finish_cb(evutil_socket_t fd, short what, void *arg)
{
	struct fetch *f = arg;

	(void)fd;
	(void)what;
	f->done(f, f->arg);
}

static void
close_work(void *arg)
{
	store_close(arg);
}

static void
close_done(void *arg)
{
	(void)arg;
}

/*
 * The store closed, on the store's thread when there is one: removing the
 * staging folder, the last close of it (the kernel frees it then), a
 * rewrite of the state may wait for the disk, tens of milliseconds while
 * the disk is busy. The lock goes with it: a next poll of the
 * configuration opens its store on the same thread, after.
 */
static void
close_store(struct fetch *f)
{
	if (f->workers != NULL)
		worker_submit_serial(f->workers, close_work, close_done, f->store);
	else
		store_close(f->store);
	f->store = NULL;
}

/* End the poll: the owner hears of it from the loop, never re-entrantly. */
static void
finish(struct fetch *f)
{
	static const struct timeval zero = {0, 0};

	if (f->state == FETCH_DONE)
		return;
	settle(f);
	fetch_enter(f, FETCH_DONE);
	if (f->token_req != NULL) {
		oauth2_cancel(f->token_req);
		f->token_req = NULL;
	}
	forget_token(f);
	store_msg_abort(f->msg);
	f->msg = NULL;
	evtimer_del(f->commit_ev);
	/* complete messages of a session that ended are kept: no DELE can go
	 * out now, the next poll deletes them */
	commit_batch(f, false);
	if (f->pop3 != NULL) {
		pop3_session_free_deferred(f->pop3);
		f->pop3 = NULL;
	}
	close_store(f);
	log_fields(f->res.nsaved || f->res.deleted || f->res.exit_code ? LOG_LVL_INFO
								       : LOG_LVL_DEBUG,
		   f->mb->id, &(struct log_fields){.has_exit = true, .exit = f->res.exit_code},
		   "%zu saved, %zu already received, %zu deleted%s", f->res.nsaved, f->res.skipped,
		   f->res.deleted, f->res.exit_code ? " (with errors)" : "");
	evtimer_add(f->done_ev, &zero);
}

static void end_now(struct fetch *f, int code, int level, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

/* End the poll at once, without QUIT (nothing is deleted, the message in
 * hand is not kept): exit code, and an error line at level. */
static void
end_now(struct fetch *f, int code, int level, const char *fmt, ...)
{
	va_list ap;

	if (f->pop3 != NULL)
		pop3_abort(f->pop3);
	set_exit(f, code);
	va_start(ap, fmt);
	add_error_v(f, level, fmt, ap);
	va_end(ap);
	finish(f);
}

int
fetch_failure_exit(enum pop3_failure fail)
{
	switch (fail) {
	case POP3_FAIL_RESOLVE:
	case POP3_FAIL_CONNECT:
		return EX_UNAVAILABLE;
	case POP3_FAIL_LOST:
	case POP3_FAIL_TIMEOUT:
	case POP3_FAIL_TEMP:
		return EX_TEMPFAIL;
	case POP3_FAIL_PROTOCOL:
	case POP3_FAIL_TLS:
		return EX_PROTOCOL;
	case POP3_FAIL_AUTH:
		return EX_NOPERM;
	}
	return EX_PROTOCOL;
}

/*
 * The one place a DELE is sent: for a message that is durable (committed
 * by this session, or recorded by an earlier one), when the configuration
 * removes what it has read. False when it keeps it on the server.
 */
static bool
delete_message(struct fetch *f, struct candidate *c)
{
	MUST(c->state == MSG_COMMITTED);
	if (!f->mb->remove_after_read)
		return false;
	MUST(f->pop3 != NULL);
	msg_enter(c, MSG_DELE_SENT);
	if (f->ndele == f->capdele) {
		f->capdele = f->capdele ? 2 * f->capdele : 16;
		f->dele = xrealloc(f->dele, f->capdele * sizeof(*f->dele));
	}
	f->dele[f->ndele++] = *c;
	pop3_dele(f->pop3, c->num);
	return true;
}

/* A message saved before (the state has its key): it is committed, and
 * deleted where may_delete. True when a DELE went out. */
static bool
saved_before(struct fetch *f, struct candidate *c, bool may_delete)
{
	f->res.skipped++;
	msg_enter(c, MSG_COMMITTED);
	return may_delete && delete_message(f, c);
}

/* c, of a batch, is durable: count it, and now it may be deleted. */
static void
count_committed(struct fetch *f, struct candidate *c, const char *uid, char *folder,
		unsigned long long size)
{
	struct fetch_saved *sv;

	/* store commits the batch in the order it was sealed */
	MUST(strcmp(c->uid, uid) == 0);
	msg_enter(c, MSG_COMMITTED);
	f->res.saved = xrealloc(f->res.saved, (f->res.nsaved + 1) * sizeof(*f->res.saved));
	sv = &f->res.saved[f->res.nsaved++];
	sv->uid = xstrdup(uid);
	sv->folder = folder;
	sv->size = size;
	log_fields(LOG_LVL_DEBUG, f->mb->id, &(struct log_fields){.uidl = uid, .folder = folder},
		   "saved message %lu (%s) in %s", c->num, uid, folder ? folder : "(nothing kept)");
}

/* store_commit's callback for the batch committed here (commit_batch). */
static void
on_committed(void *arg, const char *uid, char *folder, unsigned long long size)
{
	struct fetch *f = arg;

	count_committed(f, &f->cand[f->pend[f->pend_done++]], uid, folder, size);
}

/* The batch of n messages, the candidates pend, was committed (r: the
 * commit's result, its first ndone messages committed and counted): their
 * DELEs go out with dele; false when it failed: the session must save
 * nothing more. */
static bool
batch_committed(struct fetch *f, const size_t *pend, size_t n, size_t ndone, int r, bool dele)
{
	/* the DELEs once the store is done with the batch: nothing the session
	 * may call back into runs inside store_commit */
	for (size_t i = 0; i < n; i++) {
		struct candidate *c = &f->cand[pend[i]];
		if (i >= ndone)
			msg_enter(c, MSG_FAILED);
		else if (dele)
			delete_message(f, c);
	}
	if (r < 0) {
		set_exit(f, EX_IOERR);
		add_error(f, "%zu of %zu message(s) not saved: %s", n - ndone, n,
			  store_error(f->store));
		return false;
	}
	log_debug(f->mb->id, "committed %zu message(s)", n);
	return true;
}

/* Group commit of the sealed messages here (the seals out first), then
 * (with dele) their DELEs; false when it or a seal failed. No commit is in
 * flight (await_commit, settle). */
static bool
commit_batch(struct fetch *f, bool dele)
{
	bool sealed_all = flush_seals(f);
	size_t n = f->npend;
	int r;

	MUST(f->job == NULL);
	if (n == 0)
		return sealed_all;
	evtimer_del(f->commit_ev);
	f->pend_done = 0;
	r = store_commit(f->store, on_committed, f);
	f->npend = 0;
	return batch_committed(f, f->pend, n, f->pend_done, r, dele) && sealed_all;
}

/* The batch is dropped, not committed: nothing of it was recorded. */
static void
drop_batch(struct fetch *f)
{
	for (size_t i = 0; i < f->npend; i++)
		msg_enter(&f->cand[f->pend[i]], MSG_FAILED);
	f->npend = 0;
	evtimer_del(f->commit_ev);
	if (f->store != NULL)
		store_discard(f->store);
}

/* ---- jobs on a worker ---- */

static void
collect_committed(void *arg, const char *uid, char *folder, unsigned long long size)
{
	struct fetch_job *j = arg;

	j->done = xrealloc(j->done, (j->ndone + 1) * sizeof(*j->done));
	j->done[j->ndone++] = (struct committed){xstrdup(uid), folder, size};
}

/* On the worker: only the store and the message of this poll. */
static void
job_work(void *arg)
{
	struct fetch_job *j = arg;
	struct fetch *f = j->f;

	if (j->kind == JOB_SEAL)
		j->r = message_prepare(&f->msgp, &j->info, j->msg, j->why, sizeof(j->why));
	else if (j->kind == JOB_COMMIT)
		j->r = store_batch_commit(j->batch, collect_committed, j);
	else if (j->kind == JOB_OPEN)
		j->r = store_open(&j->sp, &j->store, j->why, sizeof(j->why));
	else
		j->r = store_compact(f->store, j->keep, j->n);
}

static void job_done(void *arg);

/* Is a worker to take the poll's next commit (or the like)? */
static bool
use_worker(const struct fetch *f)
{
	return f->workers != NULL && f->job == NULL && !f->settling;
}

/* Has a job the store alone (opening, compaction; not a commit, beside
 * which messages are staged and sealed into a new batch)? */
static bool
store_taken(const struct fetch *f)
{
	return f->job != NULL && f->job->kind != JOB_COMMIT;
}

/* Is a worker to take the next seal? */
static bool
seal_on_worker(const struct fetch *f)
{
	return f->workers != NULL && !f->settling && !store_taken(f) && f->nseals < SEALS_MAX;
}

/* Seals at their bound hold the session until two of them have ended, not
 * one: a hold and a resume cost two epoll_ctl(2)s, once every two messages
 * instead of every message when the seals are what is slow. */
static bool
seals_full(struct fetch *f)
{
	if (f->nseals >= SEALS_MAX)
		f->seals_full = true;
	else if (f->nseals + 2 <= SEALS_MAX)
		f->seals_full = false;
	return f->seals_full;
}

/* The session reads unless a job has the store, the seals are at their
 * bound, the new batch waits for the commit in flight, or the session's
 * last commit waits. */
static void
read_or_hold(struct fetch *f)
{
	if (f->pop3 == NULL)
		return;
	if (store_taken(f) || seals_full(f) || f->commit_due || f->wind_pending)
		pop3_hold(f->pop3);
	else
		pop3_resume(f->pop3);
}

static void
job_start(struct fetch *f, struct fetch_job *j)
{
	j->f = f;
	f->job = j;
	j->wj = worker_submit_serial(f->workers, job_work, job_done, j);
	read_or_hold(f);
}

/* Commit the batch on a worker (see batch_committed), then QUIT into after
 * when quit. The session goes on into a new batch meanwhile. */
static void
commit_job(struct fetch *f, bool dele, bool quit, enum fetch_state after)
{
	struct fetch_job *j = xcalloc(1, sizeof(*j));

	evtimer_del(f->commit_ev);
	j->kind = JOB_COMMIT;
	j->n = f->npend;
	j->pend = xcalloc(j->n ? j->n : 1, sizeof(*j->pend));
	memcpy(j->pend, f->pend, j->n * sizeof(*j->pend));
	f->npend = 0;
	j->batch = store_batch_take(f->store);
	j->dele = dele;
	j->quit = quit;
	j->after = after;
	job_start(f, j);
}

static void stop_saving(struct fetch *f, enum fetch_state after, bool dele);

/* Back on the loop: the committed messages counted, their DELEs (not when
 * the poll is ending), then what the commit was for. False when it failed:
 * the new batch is dropped with it. */
static bool
commit_ended(struct fetch *f, struct fetch_job *j)
{
	bool ok;

	store_batch_end(j->batch); /* store_has knows them: before any DELE */
	for (size_t i = 0; i < j->ndone; i++) {
		count_committed(f, &f->cand[j->pend[i]], j->done[i].uid, j->done[i].folder,
				j->done[i].size);
		free(j->done[i].uid);
	}
	ok = batch_committed(f, j->pend, j->n, j->ndone, j->r, j->dele && !f->settling);
	if (j->quit) {
		fetch_enter(f, j->after);
		if (!f->settling)
			pop3_quit(f->pop3);
	} else if (!ok) {
		f->dropping = true;
		f->commit_due = false;
		drop_batch(f);
	}
	return ok;
}

/* The commit in flight, if any, ends now (blocking the loop: for a
 * message whose key is in its batch, see known_before) and its DELEs go
 * out; the caller commits the new batch. False when it failed. */
static bool
await_commit(struct fetch *f)
{
	if (f->job == NULL)
		return true;
	MUST(f->job->kind == JOB_COMMIT);
	f->awaiting = true;
	worker_finish(f->job->wj);
	f->awaiting = false;
	f->commit_due = false;
	read_or_hold(f);
	return !f->dropping;
}

/* wind_up once every seal has joined the batch. */
static void
wind_now(struct fetch *f, enum fetch_state after, bool dele)
{
	if (f->npend > 0 && use_worker(f)) {
		commit_job(f, dele, true, after);
		return;
	}
	commit_batch(f, dele);
	fetch_enter(f, after);
	pop3_quit(f->pop3);
}

/* Commit what is sealed (its DELEs go out with dele), then QUIT: the server
 * answers what is in flight first. after: FETCH_QUITTING, or
 * FETCH_STARTING_OVER for a new session one command at a time. With seals
 * or a commit out, that waits for their end (go_on). */
static void
wind_up(struct fetch *f, enum fetch_state after, bool dele)
{
	fetch_enter(f, FETCH_COMMITTING);
	if ((f->nseals > 0 || f->job != NULL) && !f->settling) {
		/* held meanwhile: nothing more is asked */
		f->wind_pending = true;
		f->wind_after = after;
		f->wind_dele = dele;
		read_or_hold(f);
		return;
	}
	wind_now(f, after, dele);
}

/* Save nothing more: the message in hand and the RETRs in flight are
 * dropped (left on the server), what is sealed is committed, QUIT. */
static void
stop_saving(struct fetch *f, enum fetch_state after, bool dele)
{
	store_msg_abort(f->msg);
	f->msg = NULL;
	for (size_t i = f->next; i < f->issued; i++)
		if (f->cand[i].state == MSG_REQUESTED)
			msg_enter(&f->cand[i], MSG_FAILED);
	wind_up(f, after, dele);
}

/* Commit the batch (after the commit in flight); when that fails the
 * session saves nothing more. */
static bool
commit_or_stop(struct fetch *f)
{
	if (await_commit(f) && commit_batch(f, true))
		return true;
	stop_saving(f, FETCH_QUITTING, true);
	return false;
}

/* The batch is due: committed now, on a worker when there is one, or
 * right after the commit in flight. */
static void
commit_soon(struct fetch *f)
{
	if (f->job != NULL) {
		f->commit_due = true; /* go_on */
		read_or_hold(f);
	} else if (!use_worker(f)) {
		commit_or_stop(f);
	} else if (f->npend > 0) {
		/* the last seals of a session winding up keep the batch's bounds
		 * too (and its DELEs go out as the wind-up says) */
		commit_job(f, f->wind_pending ? f->wind_dele : true, false, FETCH_COMMITTING);
	}
}

static void
commit_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct fetch *f = arg;

	(void)fd;
	(void)what;
	commit_soon(f);
}

static void start_over(struct fetch *f, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * An answer to a pipelined command could not be trusted (fmt says why, in
 * a notice): what this session reads after it is dropped. What is sealed
 * was read before, in step: it is committed, QUIT goes out alone (where a
 * shift shows), and then a new session of this poll asks one command at a
 * time.
 */
static void
start_over(struct fetch *f, const char *fmt, ...)
{
	va_list ap;
	char *why;

	va_start(ap, fmt);
	if (vasprintf(&why, fmt, ap) < 0)
		abort();
	va_end(ap);
	log_notice(f->mb->id, "%s: %s", f->where, why);
	free(why);
	stop_saving(f, FETCH_STARTING_OVER, true);
}

/*
 * Pipelined (window > 1), an -ERR may answer nothing (a line the server
 * added): every answer after it would then be taken for the command
 * before, a message saved under another's UIDL and the other deleted
 * unseen. A new session asks one command at a time, where a message the
 * server cannot send is dealt with as usual. True when that is so.
 */
static bool
pipelined_refusal(struct fetch *f, size_t window, const char *cmd, unsigned long num,
		  const char *error)
{
	if (window <= 1)
		return false;
	start_over(f,
		   "the server refused %s %lu among pipelined commands: starting over one "
		   "command at a time (server said: %s)",
		   cmd, num, error);
	return true;
}

/* More RETRs to ask for in this session? */
static bool
more_to_ask(const struct fetch *f)
{
	if (f->state != FETCH_RETRIEVING || f->issued >= f->ncand)
		return false;
	/* receive: one: the oldest message the server gives */
	return f->mode != FETCH_ONE ||
	       (f->res.nsaved == 0 && f->npend == 0 && f->nseals == 0 && f->job == NULL);
}

/* Keep the window of RETRs full. Once it is, it is filled again when half
 * of it has come: the RETRs then go in one write (one TLS record, one
 * system call) rather than one each as each message comes. */
static void
request_more(struct fetch *f)
{
	if (f->issued > f->next && f->issued - f->next > f->window / 2)
		return;
	while (more_to_ask(f) && f->issued - f->next < f->window) {
		uint64_t bytes = f->cand[f->issued].size;
		for (size_t i = f->next; i < f->issued; i++)
			bytes += f->cand[i].size;
		if (f->issued > f->next && bytes > RETR_WINDOW_BYTES)
			break;
		msg_enter(&f->cand[f->issued], MSG_REQUESTED);
		pop3_retr(f->pop3, f->cand[f->issued++].num);
	}
}

/* A response to a RETR has been dealt with (or the RETRs begin): ask
 * more, or, with nothing more to ask and nothing in flight, QUIT. */
static void
after_response(struct fetch *f)
{
	if (!retrieving(f))
		return;
	request_more(f);
	if (!more_to_ask(f) && f->next == f->issued)
		wind_up(f, FETCH_QUITTING, true);
}

static void
on_ready(void *arg)
{
	struct fetch *f = arg;

	fetch_enter(f, FETCH_LISTING);
	log_debug(f->mb->id, "logged in as %s with %s", f->mb->user, pop3_mechanism(f->pop3));
	f->res.tls_expires_at = pop3_tls_not_after(f->pop3);
	f->window = f->mode == FETCH_ALL && !f->lockstep && pop3_capa(f->pop3)->pipelining
			    ? RETR_WINDOW
			    : 1;
	runtime_warn_login(f->mb, pop3_mechanism(f->pop3));
	pop3_list(f->pop3);
}

/*
 * A message may be a little larger than LIST says (servers count sizes in
 * their own ways), never much larger: that bounds what a lying server can
 * write to disk. max_message_size caps it further.
 */
static uint64_t
message_limit(const struct fetch *f, uint64_t listed)
{
	uint64_t limit = listed + listed / 4 + 1024 * 1024;

	if (f->mb->max_message_size && limit > f->mb->max_message_size + 1024 * 1024)
		limit = f->mb->max_message_size + 1024 * 1024;
	return limit;
}

static int
cmp_uid(const void *a, const void *b)
{
	return strcmp((*(const struct pop3_msg *const *)a)->uid,
		      (*(const struct pop3_msg *const *)b)->uid);
}

/* A UIDL the server gives two messages names neither (RFC 1939 §7: unique
 * per message): dup[i] is set for both, and they are keyed by content. */
static bool *
duplicate_uids(const struct pop3_msg *msgs, size_t n)
{
	const struct pop3_msg **by = xcalloc(n ? n : 1, sizeof(*by));
	bool *dup = xcalloc(n ? n : 1, sizeof(*dup));

	for (size_t i = 0; i < n; i++)
		by[i] = &msgs[i];
	qsort(by, n, sizeof(*by), cmp_uid);
	for (size_t i = 1; i < n; i++)
		if (by[i]->uid[0] != '\0' && strcmp(by[i]->uid, by[i - 1]->uid) == 0)
			dup[by[i] - msgs] = dup[by[i - 1] - msgs] = true;
	free(by);
	return dup;
}

/* Is this one of the header keys (not a UIDL that reads like one)? */
static bool
keyed_by_headers(const struct fetch *f, const char *uid)
{
	uintptr_t p = (uintptr_t)uid, base = (uintptr_t)f->head_keys;

	return f->head_keys != NULL && p >= base && p < base + f->nhead_keys * KEY_SIZE;
}

/* The next candidate from i on without a key: the TOPs go out, and are
 * answered, in this order. */
static size_t
next_unkeyed(const struct fetch *f, size_t i)
{
	while (i < f->ncand && f->cand[i].uid[0] != '\0')
		i++;
	return i;
}

/* Ready for the answer to the TOP of cand[top_next]. */
static void
top_reset(struct fetch *f)
{
	pop3_head_init(&f->head);
	f->head_bytes = 0;
	f->msg_bytes = 0;
	if (f->top_next < f->ncand)
		message_key_begin_headers(f->key, f->cand[f->top_next].size);
}

/* Keep the window of TOPs full. */
static void
ask_tops(struct fetch *f)
{
	while (!f->top_refused && f->top_issue < f->ncand && f->top_inflight < f->top_window) {
		pop3_top(f->pop3, f->cand[f->top_issue].num);
		f->top_inflight++;
		f->top_issue = next_unkeyed(f, f->top_issue + 1);
	}
}

static int
cmp_cand_uid(const void *a, const void *b)
{
	return strcmp((*(const struct candidate *const *)a)->uid,
		      (*(const struct candidate *const *)b)->uid);
}

/* Messages with one header key (equal headers and size) are known by
 * their content instead: one is never taken for the other. */
static size_t
unkey_shared(struct fetch *f)
{
	struct candidate **by = xcalloc(f->ncand ? f->ncand : 1, sizeof(*by));
	bool *same = xcalloc(f->ncand ? f->ncand : 1, sizeof(*same));
	size_t n = 0, shared = 0;

	for (size_t i = 0; i < f->ncand; i++)
		if (keyed_by_headers(f, f->cand[i].uid))
			by[n++] = &f->cand[i];
	qsort(by, n, sizeof(*by), cmp_cand_uid);
	for (size_t i = 1; i < n; i++)
		if (strcmp(by[i]->uid, by[i - 1]->uid) == 0)
			same[i] = same[i - 1] = true;
	for (size_t i = 0; i < n; i++)
		if (same[i]) {
			by[i]->uid = "";
			shared++;
		}
	free(same);
	free(by);
	return shared;
}

static void
note_unkeyed(struct fetch *f, size_t by_headers, size_t by_content)
{
	const char *why = f->have_uidl ? "some messages have no valid UIDL"
				       : "the server does not support UIDL";

	if (by_headers > 0)
		log_notice(f->mb->id,
			   "%s: %s: %zu message(s) are known by their headers (TOP), %zu "
			   "downloaded to be known by their content",
			   f->where, why, by_headers, by_content);
	else if (by_content > 0)
		log_notice(f->mb->id,
			   "%s: %s: %zu message(s) are downloaded to be known by their content",
			   f->where, why, by_content);
}

/* Every TOP is answered: what is known by its headers and in the state is
 * not downloaded (but deleted, with remove_after_read); the RETRs begin. */
static void
end_top_phase(struct fetch *f)
{
	size_t shared = unkey_shared(f), k = 0, by_headers = 0, by_content = 0, stale = 0;

	for (size_t i = 0; i < f->ncand; i++) {
		struct candidate c = f->cand[i];
		if (keyed_by_headers(f, c.uid)) {
			by_headers++;
			f->listed[f->nlisted++] = c.uid;
			if (store_has(f->store, c.uid)) {
				f->unkeyed--;
				stale += saved_before(f, &c, true);
				continue;
			}
		} else if (c.uid[0] == '\0') {
			by_content++;
		}
		f->cand[k++] = c;
	}
	f->ncand = k;
	if (shared > 0)
		log_notice(f->mb->id,
			   "%s: %zu messages without UIDL have the same headers and size as "
			   "another: they are known by their content",
			   f->where, shared);
	note_unkeyed(f, by_headers, by_content);
	if (stale > 0)
		log_info(f->mb->id, "deleting %zu message(s) saved by an earlier session", stale);
	fetch_enter(f, FETCH_RETRIEVING);
	after_response(f);
}

/* The answer to the TOP at the head has been dealt with. */
static void
next_top(struct fetch *f)
{
	f->top_inflight--;
	f->top_next = next_unkeyed(f, f->top_next + 1);
	top_reset(f);
	ask_tops(f);
	if (f->top_inflight == 0)
		end_top_phase(f);
}

/* Bytes of the header block of the TOP at the head. */
static void
top_data(struct fetch *f, const char *buf, size_t len)
{
	const struct candidate *c = &f->cand[f->top_next];
	size_t n = pop3_head_feed(&f->head, buf, len);

	f->msg_bytes += len;
	if (f->msg_bytes > message_limit(f, c->size)) {
		end_now(f, EX_PROTOCOL, LOG_LVL_ERROR,
			"%s: the answer to TOP %lu 0 goes on past %llu bytes, far more than LIST "
			"announced for the whole message: the session is ended",
			f->where, c->num, (unsigned long long)message_limit(f, c->size));
		return;
	}
	if (n == 0 || f->head_bytes > HEADERS_MAX)
		return;
	f->head_bytes += n;
	if (f->head_bytes <= HEADERS_MAX)
		message_key_add(f->key, buf, n);
}

/* The TOP at the head was answered (error: refused). */
static void
top_answered(struct fetch *f, unsigned long num, const char *error)
{
	struct candidate *c = &f->cand[f->top_next];

	if (error != NULL && pipelined_refusal(f, f->top_window, "TOP", num, error))
		return;
	if (error != NULL) {
		f->top_refused = true;
		log_notice(f->mb->id,
			   "%s: the server refused TOP %lu (server said: %s): the messages "
			   "without UIDL not known by their headers yet are downloaded to be "
			   "known by their content",
			   f->where, num, error);
	} else if (f->head_bytes > HEADERS_MAX) {
		log_notice(f->mb->id,
			   "%s: message %lu has a header block over %d KiB: it is downloaded to "
			   "be known by its content",
			   f->where, num, HEADERS_MAX / 1024);
	} else {
		char *key = f->head_keys + f->nhead_keys++ * KEY_SIZE;
		message_key_end(f->key, key);
		c->uid = key;
	}
	next_top(f);
}

/*
 * The messages without UIDL are known by their headers where the server has
 * TOP (or may: it lists no capabilities): kept on the server, so that they
 * are not downloaded at every poll; deleted, only when the state holds
 * records (messages saved in keep mode, or whose deletion was not
 * committed), for with none there is nothing to know them from.
 */
static bool
start_top_phase(struct fetch *f)
{
	const struct pop3_capa *capa = pop3_capa(f->pop3);

	if (f->unkeyed == 0 || f->top_refused || (capa->seen && !capa->top) ||
	    (f->mb->remove_after_read && store_count(f->store) == 0))
		return false;
	fetch_enter(f, FETCH_TOPPING);
	f->head_keys = xcalloc(f->unkeyed, KEY_SIZE);
	f->nhead_keys = 0;
	f->top_window = capa->pipelining && !f->lockstep ? TOP_WINDOW : 1;
	f->top_issue = f->top_next = next_unkeyed(f, 0);
	f->top_inflight = 0;
	top_reset(f);
	ask_tops(f);
	return true;
}

/* A message of the listing saved by an earlier session: its deletion was
 * never committed (or it is kept on the server). At most stale_cap such
 * DELEs go out in one session. */
static void
listed_saved_before(struct fetch *f, struct candidate *c)
{
	if (f->stale_cap != 0 && f->stale_sent == f->stale_cap) {
		saved_before(f, c, false);
		f->stale_left += f->mb->remove_after_read; /* for the next session */
	} else if (saved_before(f, c, true)) {
		f->stale_sent++;
	}
}

/* One message of the listing (keyed: by a UIDL unique in it). */
static void
list_message(struct fetch *f, const struct pop3_msg *m, bool keyed)
{
	struct candidate c = {.num = m->num, .size = m->size, .uid = keyed ? m->uid : ""};

	if (keyed) {
		f->listed[f->nlisted++] = m->uid;
		if (store_has(f->store, m->uid)) {
			listed_saved_before(f, &c);
			return;
		}
	}
	if (f->mb->max_message_size && m->size > f->mb->max_message_size) {
		log_notice(f->mb->id,
			   "message %lu%s%s%s is %llu bytes, over max_message_size: left "
			   "on the server",
			   m->num, keyed ? " (" : "", m->uid, keyed ? ")" : "",
			   (unsigned long long)m->size);
		msg_enter(&c, MSG_SKIPPED);
		f->res.too_big++;
		return;
	}
	/* one without UIDL is keyed by its content once it is here */
	f->unkeyed += !keyed;
	f->cand[f->ncand++] = c;
}

static void
on_listing(void *arg, const struct pop3_msg *msgs, size_t n, bool have_uidl)
{
	struct fetch *f = arg;
	bool *dup = duplicate_uids(msgs, n);
	size_t ndup = 0;

	f->cand = xcalloc(n, sizeof(*f->cand));
	f->listed = xcalloc(n ? n : 1, sizeof(*f->listed));
	for (size_t i = 0; i < n; i++) {
		ndup += dup[i];
		list_message(f, &msgs[i], msgs[i].uid[0] != '\0' && !dup[i]);
	}
	free(dup);
	if (f->stale_left > 0) /* this session only deletes, then QUITs */
		f->ncand = f->unkeyed = 0;
	if (ndup > 0)
		log_warning(f->mb->id,
			    "%s: %zu messages share UIDLs with others: they are known "
			    "by their content instead",
			    f->where, ndup);
	if (f->stale_sent > 0)
		log_info(f->mb->id, "deleting %zu message(s) saved by an earlier session",
			 f->stale_sent);
	log_debug(f->mb->id, "%zu message(s) on the server, %zu to receive", n, f->ncand);
	f->pend = xcalloc(f->ncand ? f->ncand : 1, sizeof(*f->pend));
	f->capkeys = f->unkeyed;
	f->keys = xcalloc(f->capkeys ? f->capkeys : 1, KEY_SIZE);
	f->have_uidl = have_uidl;
	if (start_top_phase(f))
		return;
	note_unkeyed(f, 0, f->unkeyed);
	fetch_enter(f, FETCH_RETRIEVING);
	after_response(f);
}

/* The first bytes (or the end) of the message at the head: stage it. */
static int
begin_message(struct fetch *f)
{
	const struct candidate *c = &f->cand[f->next];
	int r;

	message_key_begin(f->key);
	f->msg_time = time(NULL);
	f->msg_bytes = 0;
	f->msg_limit = message_limit(f, c->size);
	r = store_msg_begin(f->store, c->uid, f->msg_time, &f->msg);
	if (r < 0) {
		set_exit(f, EX_IOERR);
		add_error(f, "%s", store_error(f->store));
		stop_saving(f, FETCH_QUITTING, true);
	}
	return r;
}

/* Bytes of the message at the head. */
static void
retr_data(struct fetch *f, const char *buf, size_t len)
{
	struct candidate *c = &f->cand[f->next];

	if (c->state == MSG_FAILED || (f->msg == NULL && begin_message(f) < 0))
		return;
	f->msg_bytes += len;
	if (f->msg_bytes > f->msg_limit) {
		end_now(f, EX_PROTOCOL, LOG_LVL_ERROR,
			"%s: message %lu (%s) goes on past %llu bytes, far more than LIST "
			"announced: the session is ended, nothing of it is kept",
			f->where, c->num, c->uid, (unsigned long long)f->msg_limit);
		return;
	}
	message_key_add(f->key, buf, len);
	if (store_msg_write(f->msg, buf, len) < 0)
		msg_enter(c, MSG_FAILED); /* store_error says why, once it is all read */
}

static void
on_data(void *arg, const char *buf, size_t len)
{
	struct fetch *f = arg;

	if (f->state == FETCH_TOPPING)
		top_data(f, buf, len);
	else if (retrieving(f))
		retr_data(f, buf, len);
	/* else in flight when the session stopped saving: dropped */
}

/* Pipelined, the data of RETR num began like a status line: a message that
 * begins so, or a server out of step. One command at a time tells. */
static void
on_ambiguous(void *arg, unsigned long num, const char *first_line)
{
	struct fetch *f = arg;

	if (f->state == FETCH_TOPPING)
		start_over(f,
			   "the answer to TOP %lu begins like a status line (\"%s\"): starting "
			   "over one command at a time",
			   num, first_line);
	else if (retrieving(f))
		start_over(f,
			   "the data of RETR %lu begins like a status line (\"%s\"): the message "
			   "may begin so, or the server's answers are out of step with the "
			   "commands; starting over one command at a time",
			   num, first_line);
	/* else in flight when the session stopped saving: dropped */
}

/* Is a message with this key in the batch, in the one being committed,
 * or sealed on a worker? (Byte-identical messages without UIDL have one
 * key.) */
static bool
pending_has(const struct fetch *f, const char *uid)
{
	const struct fetch_job *j = f->job;

	for (size_t i = 0; j != NULL && j->kind == JOB_COMMIT && i < j->n; i++)
		if (strcmp(f->cand[j->pend[i]].uid, uid) == 0)
			return true;
	for (size_t i = 0; i < f->npend; i++)
		if (strcmp(f->cand[f->pend[i]].uid, uid) == 0)
			return true;
	for (size_t i = 0; i < f->nseals; i++)
		if (strcmp(f->cand[f->seals[i]->cand].uid, uid) == 0)
			return true;
	return false;
}

/* A content key made in this session, kept as long as its UIDLs are. */
static const char *
keep_content_key(struct fetch *f, const char *key)
{
	char *k = f->keys + f->nkeys++ * KEY_SIZE;

	assert(f->nkeys <= f->capkeys);
	memcpy(k, key, KEY_SIZE);
	f->listed[f->nlisted++] = k;
	return k;
}

/*
 * The message just received, all here, known by its key: true when it is
 * done with (not to be saved). One with a UIDL has its content key
 * recorded beside it, for the day the server gives that UIDL to another
 * message too (a UIDL made of some header fields) and both are known by
 * their content. One without a key is keyed by its content; one known by
 * its headers, not in the state, may have been saved under its content
 * key only (in a poll where TOP failed, or by a release without header
 * keys). Saved before (or a
 * copy earlier in this session), it is not kept again but deleted, or
 * (kept on the server, known by its headers) its header key is recorded so
 * that the next poll need not download it.
 */
static bool
known_before(struct fetch *f, struct candidate *c)
{
	bool by_headers = keyed_by_headers(f, c->uid);
	char key[KEY_SIZE];

	message_key_end(f->key, key);
	if (c->uid[0] != '\0' && !by_headers) {
		store_msg_set_content_key(f->msg, key);
		return false;
	}
	f->unkeyed--;
	if (!by_headers)
		c->uid = keep_content_key(f, key);
	if (pending_has(f, key) && !commit_or_stop(f))
		return true;
	if (!store_has(f->store, key)) {
		if (by_headers)
			store_msg_set_content_key(f->msg, key);
		else
			store_msg_set_uid(f->msg, c->uid);
		return false;
	}
	log_debug(f->mb->id, "message %lu (%s) was saved before%s%s", c->num, c->uid,
		  by_headers ? " as " : "", by_headers ? key : "");
	store_msg_abort(f->msg);
	f->msg = NULL;
	if (!saved_before(f, c, true) && by_headers && store_record(f->store, c->uid) < 0) {
		/* known by its content again at the next poll: nothing lost */
		set_exit(f, EX_IOERR);
		add_error(f, "%s", store_error(f->store));
	}
	return true;
}

/* c was received but cannot be saved (why): what is sealed before it is
 * sound: committed, then QUIT. */
static void
not_saved(struct fetch *f, const struct candidate *c, const char *why)
{
	set_exit(f, EX_IOERR);
	add_error(f, "message %lu (%s) not saved: %s", c->num, c->uid, why);
	/* a seal that ends after the session stopped saving: QUIT follows */
	if (!f->settling && retrieving(f))
		stop_saving(f, FETCH_QUITTING, true);
}

/* Is the batch (of n messages) to be committed now? */
static bool
batch_full(const struct fetch *f, size_t *ret_n)
{
	unsigned long long bytes;
	size_t n = store_pending(f->store, &bytes);

	*ret_n = n;
	return n >= f->batch_max || bytes >= BATCH_BYTES || f->mode == FETCH_ONE;
}

/* A message was sealed into the batch: commit when the batch is full, or
 * set its time bound. */
static void
batch_sealed(struct fetch *f)
{
	size_t n;

	if (batch_full(f, &n)) {
		commit_soon(f);
	} else if (n == 1) {
		struct timeval bound = {(time_t)f->batch_seconds, 0};
		evtimer_add(f->commit_ev, &bound);
	}
}

/* The seal of c ended (r, and why it failed): c is in the batch, or not
 * saved. */
static void
sealed(struct fetch *f, struct candidate *c, int r, const char *why)
{
	if (r < 0) {
		f->dropping = true;
		not_saved(f, c, why);
		return;
	}
	msg_enter(c, MSG_STAGED);
	f->pend[f->npend++] = (size_t)(c - f->cand);
	if (f->settling)
		return;
	if (retrieving(f)) {
		batch_sealed(f);
	} else if (f->wind_pending) {
		size_t n;
		if (batch_full(f, &n))
			commit_soon(f);
	}
}

/* Seal c on a worker (message_prepare) while the session reads on: the
 * message in hand is the job's until it ends. */
static void
seal_job(struct fetch *f, struct candidate *c)
{
	struct fetch_job *j = xcalloc(1, sizeof(*j));

	j->f = f;
	j->kind = JOB_SEAL;
	j->cand = (size_t)(c - f->cand);
	j->info = (struct message_info){.num = c->num, .uid = c->uid, .received = f->msg_time};
	j->msg = f->msg;
	f->msg = NULL;
	f->seals[f->nseals++] = j;
	j->wj = worker_submit(f->workers, job_work, job_done, j);
	read_or_hold(f);
}

/* A seal that ended, on the loop: its message joins the batch (the
 * store's part of the seal), or is not saved. */
static void
seal_ended(struct fetch *f, struct fetch_job *j)
{
	int r = j->r;

	if (f->dropping) {
		store_msg_abort(j->msg);
		msg_enter(&f->cand[j->cand], MSG_FAILED);
		return;
	}
	if (r == 0 && (r = store_msg_seal(j->msg, f->msgp.save_text)) < 0)
		snprintf(j->why, sizeof(j->why), "%s", store_error(f->store));
	else if (r < 0)
		store_msg_abort(j->msg);
	sealed(f, &f->cand[j->cand], r, j->why);
}

/* A batch due while a commit runs (commit_due) waits for it as it is: a
 * seal that ends meanwhile joins the batch after it. */
static bool
batch_waits(const struct fetch *f)
{
	return f->commit_due && f->job != NULL;
}

/* The seals that ended join the batch in the order they began; none while
 * a job has the store alone, or while the batch waits to be committed. */
static void
drain_seals(struct fetch *f)
{
	while (f->nseals > 0 && f->seals[0]->ended && !store_taken(f) && !batch_waits(f)) {
		struct fetch_job *j = f->seals[0];
		f->nseals--;
		memmove(f->seals, f->seals + 1, f->nseals * sizeof(*f->seals));
		seal_ended(f, j);
		free(j);
	}
}

/* Every seal out ends now (blocking: run here, or waited for) and joins
 * the batch; the batch's bounds are not looked at meanwhile. False when
 * one failed. */
static bool
flush_seals(struct fetch *f)
{
	bool settling = f->settling, ok = true;

	MUST(!store_taken(f) || f->nseals == 0);
	f->settling = true;
	while (f->nseals > 0) {
		struct fetch_job *j = f->seals[0];
		if (!j->ended)
			worker_finish(j->wj);
		ok = ok && j->r == 0;
		drain_seals(f);
	}
	f->settling = settling;
	return ok;
}

/* c is all here: saved, unless known before. */
static void
received(struct fetch *f, struct candidate *c)
{
	struct message_info m;
	char why[600] = "";
	int r;

	if (known_before(f, c)) /* may key c by its content: c->uid changes */
		return;
	if (seal_on_worker(f)) {
		seal_job(f, c);
		return;
	}
	/* sealed here: after those out, into the batch in order */
	flush_seals(f);
	m = (struct message_info){.num = c->num, .uid = c->uid, .received = f->msg_time};
	r = message_seal(&f->msgp, &m, f->store, &f->msg, why, sizeof(why));
	sealed(f, c, r, why);
}

/* The server refused the RETR of c (error: what it said). */
static void
retr_refused(struct fetch *f, struct candidate *c, unsigned long num, const char *error)
{
	if (pipelined_refusal(f, f->window, "RETR", num, error))
		return;
	/* one message the server cannot send must not block the others */
	store_msg_abort(f->msg);
	f->msg = NULL;
	msg_enter(c, MSG_FAILED);
	set_exit(f, EX_TEMPFAIL);
	add_error(f, "%s: the server refused RETR %lu%s%s%s: left there (server said: %s)",
		  f->where, num, c->uid[0] ? " (" : "", c->uid, c->uid[0] ? ")" : "", error);
}

/* The answer to the RETR of c (error: the server refused it). */
static void
retr_answered(struct fetch *f, struct candidate *c, unsigned long num, const char *error)
{
	if (error != NULL) {
		retr_refused(f, c, num, error);
	} else if (c->num != num) {
		set_exit(f, EX_PROTOCOL);
		add_error(f, "%s: the server sent message %lu for RETR %lu: not saved", f->where,
			  num, c->num);
		/* what is sealed is sound, but a DELE by number could hit another */
		stop_saving(f, FETCH_QUITTING, false);
	} else if (c->state == MSG_FAILED) {
		not_saved(f, c, store_msg_error(f->msg));     /* a write of it failed */
	} else if (f->msg != NULL || begin_message(f) == 0) { /* empty: staged now */
		received(f, c);
	}
}

static void
on_retrieved(void *arg, unsigned long num, const char *error)
{
	struct fetch *f = arg;

	if (f->state == FETCH_TOPPING) {
		top_answered(f, num, error);
	} else if (retrieving(f)) {
		retr_answered(f, &f->cand[f->next], num, error);
		f->next++;
		after_response(f);
	}
	/* else in flight when the session stopped saving: dropped */
}

/* After a job or a seal: the seals that ended join the batch, what waited
 * for them happens, and then the session reads again. */
static void
go_on(struct fetch *f)
{
	if (f->job == NULL && f->commit_due) {
		f->commit_due = false;
		if (retrieving(f) || f->wind_pending)
			commit_soon(f);
	}
	drain_seals(f);
	if (f->job == NULL && f->wind_pending && f->nseals == 0) {
		f->wind_pending = false;
		wind_now(f, f->wind_after, f->wind_dele);
	}
	if (f->state != FETCH_DONE)
		read_or_hold(f);
}

/* Back on the loop (or in settle): the job's result. */
static void
job_done(void *arg)
{
	struct fetch_job *j = arg;
	struct fetch *f = j->f;

	if (j->kind == JOB_SEAL) {
		j->ended = true; /* joins the batch in its turn (drain_seals) */
		if (!f->settling)
			go_on(f);
		return;
	}
	f->job = NULL;
	if (j->kind == JOB_COMMIT) {
		/* (awaiting: the caller stops saving) */
		if (!commit_ended(f, j) && !f->settling && !f->awaiting && retrieving(f))
			stop_saving(f, FETCH_QUITTING, true);
	} else if (j->kind == JOB_OPEN) {
		f->store = j->store;
		opened(f, j->r, j->why);
	} else {
		compacted(f, j->r);
		if (!f->settling)
			finish(f);
	}
	FREE_ALL(j->done, j->keep, j->pend, j);
	if (!f->settling && !f->awaiting)
		go_on(f);
}

/* The poll ends: the job in flight, if any, ends now (blocking); its result
 * counts, what waited for it does not happen. */
static void
settle(struct fetch *f)
{
	if (f->job == NULL && f->nseals == 0)
		return;
	f->settling = true;
	if (f->job != NULL)
		worker_finish(f->job->wj);
	flush_seals(f);
	/* as a commit job that ends so: past COMMITTING, without QUIT */
	if (f->wind_pending)
		fetch_enter(f, f->wind_after);
	f->settling = false;
	f->commit_due = f->wind_pending = false;
}

static void
on_deleted(void *arg, unsigned long num, bool ok)
{
	struct fetch *f = arg;
	struct candidate *d = NULL;

	if (f->dele_answered < f->ndele && f->dele[f->dele_answered].num == num)
		d = &f->dele[f->dele_answered];
	else
		for (size_t i = 0; i < f->ndele; i++)
			if (f->dele[i].num == num)
				d = &f->dele[i];
	f->dele_answered++;
	if (!ok) {
		log_warning(f->mb->id, "the server refused DELE %lu: the message stays there", num);
		if (d != NULL)
			msg_enter(d, MSG_COMMITTED);
		return;
	}
	f->dele_ok++;
	if (d != NULL)
		msg_enter(d, MSG_DELETED);
}

static int
cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* After QUIT +OK the server holds exactly the listing less what we
 * deleted: the UIDLs the state keeps (so that it does not grow forever),
 * n of them. */
static const char **
kept_keys(const struct fetch *f, size_t *ret_n)
{
	const char **keep = xcalloc(f->nlisted ? f->nlisted : 1, sizeof(char *));
	const char **gone = xcalloc(f->ndele ? f->ndele : 1, sizeof(char *));
	size_t n = 0, ngone = 0;

	for (size_t i = 0; i < f->ndele; i++)
		if (f->dele[i].state == MSG_DELETED)
			gone[ngone++] = f->dele[i].uid;
	qsort(gone, ngone, sizeof(char *), cmp_str);
	for (size_t i = 0; i < f->nlisted; i++)
		if (bsearch(&f->listed[i], gone, ngone, sizeof(char *), cmp_str) == NULL)
			keep[n++] = f->listed[i];
	free(gone);
	*ret_n = n;
	return keep;
}

static void
compacted(struct fetch *f, int r)
{
	/* nothing is lost (the old state stays), but the state is not
	 * writable: that is exit 74 */
	if (r < 0) {
		set_exit(f, EX_IOERR);
		add_error(f, "%s", store_error(f->store));
	}
}

/* The state compacted (see kept_keys); true when a worker does it, and
 * the poll ends after. */
static bool
compact_state(struct fetch *f)
{
	struct fetch_job *j;
	size_t n;
	const char **keep = kept_keys(f, &n);

	if (!use_worker(f)) {
		compacted(f, store_compact(f->store, keep, n));
		free(keep);
		return false;
	}
	j = xcalloc(1, sizeof(*j));
	j->kind = JOB_COMPACT;
	j->keep = keep;
	j->n = n;
	job_start(f, j);
	return true;
}

/* Forget what the session knew (the UIDLs were its) and drop what it had
 * of a message it was receiving; what it saved and deleted stays so. */
static void
session_reset(struct fetch *f)
{
	MUST(f->nseals == 0 && f->job == NULL); /* they name candidates */
	f->dropping = false;
	store_msg_abort(f->msg);
	f->msg = NULL;
	free(f->listed);
	free(f->cand);
	free(f->pend);
	free(f->keys);
	free(f->head_keys);
	f->listed = NULL;
	f->cand = NULL;
	f->pend = NULL;
	f->keys = NULL;
	f->head_keys = NULL;
	f->nlisted = f->ncand = f->next = f->issued = f->npend = f->nkeys = f->capkeys = 0;
	f->ndele = f->dele_ok = f->dele_answered = f->unkeyed = 0;
	f->nhead_keys = f->top_inflight = 0;
	f->stale_sent = f->stale_left = 0;
	f->res.skipped = f->res.too_big = 0; /* counted anew from the new listing */
}

/* The same poll goes on in a new session: one command at a time after
 * answers that could not be trusted (lockstep), or to delete what the
 * last one could not. */
static void
restart_session(struct fetch *f, bool lockstep)
{
	pop3_session_free_deferred(f->pop3);
	f->pop3 = NULL;
	session_reset(f);
	f->lockstep = lockstep;
	f->sessions_left--;
	start_session(f);
}

static void
on_quit(void *arg, bool ok)
{
	struct fetch *f = arg;
	bool starting_over = f->state == FETCH_STARTING_OVER;

	if (ok)
		f->res.deleted += f->dele_ok;
	if (ok && (starting_over || f->stale_left > 0) && f->sessions_left > 0) {
		restart_session(f, f->lockstep || starting_over);
		return;
	}
	if (starting_over) {
		set_exit(f, EX_TEMPFAIL);
		add_error(f,
			  "%s: a pipelined RETR was refused, or its answer could not be trusted, "
			  "and the session ended before asking again one at a time: the rest "
			  "stays for the next poll",
			  f->where);
	}
	/* compaction only when every message is known: a record kept for a
	 * message without UIDL that was not downloaded this time must stay */
	if (ok && f->res.exit_code == 0 && f->unkeyed == 0 && f->stale_left == 0) {
		if (compact_state(f))
			return;
	} else if (!ok && f->ndele > 0) {
		set_exit(f, EX_TEMPFAIL);
		add_error(f,
			  "%s: QUIT was not answered +OK: the server did not commit the "
			  "deletions; the next poll deletes the saved messages",
			  f->where);
	}
	finish(f);
}

static void on_failed(void *arg, const struct pop3_error *err);

static const struct pop3_events fetch_events = {
	.ready = on_ready,
	.listing = on_listing,
	.data = on_data,
	.retrieved = on_retrieved,
	.ambiguous = on_ambiguous,
	.deleted = on_deleted,
	.quit = on_quit,
	.failed = on_failed,
};

/* A new POP3 session of this poll. */
static void
start_session(struct fetch *f)
{
	struct pop3_params pp;

	fetch_enter(f, FETCH_LOGIN);
	fetch_pop3_params(f->mb, f->tls, f->mechanisms, f->token, &pp);
	pp.scram_cache = f->scram_cache;
	pp.lockstep = f->lockstep;
	pp.open_socket = f->open_socket;
	pp.open_arg = f->open_arg;
	f->pop3 = pop3_session_new(f->base, f->dns, &pp, &fetch_events, f);
	pop3_session_start(f->pop3);
}

static void
forget_token(struct fetch *f)
{
	if (f->token != NULL) {
		explicit_bzero(f->token, strlen(f->token));
		free(f->token);
		f->token = NULL;
	}
}

static void
on_token(void *arg, enum oauth2_status status, const char *token, const char *detail)
{
	struct fetch *f = arg;

	f->token_req = NULL;
	if (status != OAUTH2_OK) {
		set_exit(f, oauth2_exit_code(status));
		add_error(f, "oauth2: %s", detail);
		finish(f);
		return;
	}
	forget_token(f);
	f->token = xstrdup(token);
	start_session(f);
}

/* Ask for a token (fresh: not the one cached); on_token goes on. */
static void
get_token(struct fetch *f, bool fresh)
{
	fetch_enter(f, FETCH_TOKEN);
	f->token_req = oauth2_get_token(f->oauth2, fresh, on_token, f);
}

/*
 * Some servers close the connection after so many commands (reported of
 * Yahoo- and GMX-style servers). The DELEs of messages saved before, which
 * a session sends first, may use them all up: QUIT never comes, nothing is
 * deleted, and every later poll does the same. When a session that sent
 * such DELEs is lost, the poll goes on in a new session that sends half as
 * many, QUITs, and goes on in another for the rest.
 */
static bool
retry_fewer_deletions(struct fetch *f, const struct pop3_error *err)
{
	/* lost while starting over: the new session is the lockstep one */
	bool lockstep = f->lockstep || f->state == FETCH_STARTING_OVER;

	if (err->fail != POP3_FAIL_LOST || f->stale_sent == 0 || f->sessions_left == 0)
		return false;
	/* what this session sealed is durable now; its DELE waits */
	if (!commit_batch(f, false))
		return false;
	f->stale_cap = f->stale_sent > 1 ? f->stale_sent / 2 : 1;
	log_notice(f->mb->id,
		   "%s: the connection was lost after %zu deletions of messages saved before "
		   "(%s): going on in a new session that deletes at most %zu at once",
		   f->where, f->stale_sent, err->detail, f->stale_cap);
	restart_session(f, lockstep);
	return true;
}

/* The server refused the token: one fresh token, one new session. */
static bool
retry_with_new_token(struct fetch *f, const struct pop3_error *err)
{
	if (f->oauth2 == NULL || !err->token_rejected || f->token_retried ||
	    f->state != FETCH_LOGIN)
		return false;
	f->token_retried = true;
	log_notice(f->mb->id, "the server refused the access token: fetching a new one and "
			      "trying once more");
	pop3_session_free_deferred(f->pop3);
	f->pop3 = NULL;
	get_token(f, true);
	return true;
}

static void
on_failed(void *arg, const struct pop3_error *err)
{
	struct fetch *f = arg;

	settle(f);
	if (retry_with_new_token(f, err) || retry_fewer_deletions(f, err))
		return;
	set_exit(f, fetch_failure_exit(err->fail));
	if (err->login_delay > f->res.login_delay)
		f->res.login_delay = err->login_delay;
	if (err->token_rejected && f->token_retried)
		add_error(f,
			  "%s: %s; a new access token was refused too: check that the mailbox "
			  "allows POP, that the app may use it (scope, consent) and that user "
			  "names the mailbox",
			  f->where, err->detail);
	else
		add_error(f, "%s: %s", f->where, err->detail);
	if (f->ndele > 0)
		log_notice(f->mb->id,
			   "the session ended before QUIT: the server keeps the %zu "
			   "message(s) marked for deletion; the next poll deletes them",
			   f->ndele);
	finish(f);
}

void
fetch_pop3_params(const struct conf_mailbox *mb, struct tls_ctx *tls, const char **mechanisms,
		  const char *token, struct pop3_params *pp)
{
	*pp = (struct pop3_params){
		.id = mb->id,
		.host = mb->server,
		.port = mb->port,
		.tls = mb->tls == CONF_TLS_NONE	      ? POP3_TLS_NONE
		       : mb->tls == CONF_TLS_IMPLICIT ? POP3_TLS_IMPLICIT
						      : POP3_TLS_EXPLICIT,
		.tls_ctx = tls,
		.user = mb->user,
		.password = mb->password,
		.token = token,
		.mechanisms = mechanisms,
		.connect_timeout = (unsigned)mb->connect_timeout,
		.command_timeout = (unsigned)mb->command_timeout,
	};
}

void
fetch_params_from_runtime(const struct runtime *rt, enum fetch_mode mode, struct fetch_params *fp)
{
	*fp = (struct fetch_params){
		.set = rt->set,
		.mb = rt->mb,
		.tls = rt->tls,
		.oauth2 = rt->oauth2,
		.scram_cache = rt->scram_cache,
		.smime_key = rt->smime_key,
		.smime_unavailable = rt->smime_why[0] ? rt->smime_why : NULL,
		.mode = mode,
	};
}

static struct fetch *
fetch_new(struct event_base *base, struct evdns_base *dns, const struct fetch_params *p,
	  fetch_done_cb done, void *arg)
{
	const struct conf_mailbox *mb = p->mb;
	struct fetch *f = xcalloc(1, sizeof(*f));

	f->base = base;
	f->dns = dns;
	f->open_socket = p->open_socket;
	f->open_arg = p->open_arg;
	f->mb = mb;
	f->tls = p->tls;
	f->scram_cache = p->scram_cache;
	f->oauth2 = p->oauth2;
	f->mode = p->mode;
	f->done = done;
	f->arg = arg;
	f->sessions_left = MAX_SESSIONS;
	f->workers = p->workers;
	f->done_ev = evtimer_new(base, finish_cb, f);
	f->commit_ev = evtimer_new(base, commit_timer_cb, f);
	f->key = message_key_new();
	f->msgp = (struct message_params){
		.id = mb->id,
		.keep = mb->save_directory != NULL,
		.save_text = mb->save_text,
		.save_attachments = mb->save_attachments,
		.max_decoded = mb->max_decoded_size,
		.smime_key = p->smime_key,
		.smime_unavailable = p->smime_unavailable,
	};
	f->batch_max = p->set->commit_batch; /* config.c gives the defaults */
	f->batch_seconds = p->set->commit_interval;
	if (f->done_ev == NULL || f->commit_ev == NULL)
		abort();
	snprintf(f->where, sizeof(f->where), strchr(mb->server, ':') ? "[%s]:%u" : "%s:%u",
		 mb->server, mb->port);
	return f;
}

/* The store is open (r, and why it is not): the session starts (after a
 * token, for OAuth2) unless the poll was stopped meanwhile. */
static void
opened(struct fetch *f, int r, const char *why)
{
	if (f->settling)
		return; /* the poll ends: finish follows */
	if (r < 0) {
		set_exit(f, r == -EBUSY ? EX_TEMPFAIL : EX_IOERR);
		add_error(f, "%s", why);
		finish(f);
	} else if (f->sessions_left == 0) {
		end_now(f, EX_TEMPFAIL, LOG_LVL_INFO, "%s: stopped before the session began",
			f->where);
	} else {
		f->mechanisms = runtime_mechanisms(f->mb);
		if (f->mb->auth != CONF_AUTH_OAUTH2)
			start_session(f);
		else if (f->oauth2 != NULL)
			get_token(f, false);
		else
			abort(); /* the owner builds a token source for every oauth2 configuration
				  */
	}
}

struct fetch *
fetch_start(struct event_base *base, struct evdns_base *dns, const struct fetch_params *p,
	    fetch_done_cb done, void *arg)
{
	const struct conf_mailbox *mb = p->mb;
	struct fetch *f = fetch_new(base, dns, p, done, arg);
	struct store_params sp = {
		.id = mb->id,
		.save_directory = mb->save_directory,
		.state_directory = p->set->state_directory,
		.server = mb->server,
		.user = mb->user,
	};
	char err[512];
	struct fetch_job *j;

	runtime_warn_tls(mb);
	if (!use_worker(f)) {
		opened(f, store_open(&sp, &f->store, err, sizeof(err)), err);
		return f;
	}
	j = xcalloc(1, sizeof(*j));
	j->kind = JOB_OPEN;
	j->sp = sp;
	job_start(f, j);
	return f;
}

const struct fetch_result *
fetch_result(const struct fetch *f)
{
	return &f->res;
}

void
fetch_stop(struct fetch *f)
{
	f->sessions_left = 0;
	/* from START the store's opening ends the poll (opened); a commit in
	 * flight is waited for by wind_up */
	if (store_taken(f))
		return;
	switch (f->state) {
	case FETCH_TOKEN:
	case FETCH_LOGIN:
	case FETCH_LISTING:
		/* not logged in yet (or waiting for a token): nothing to finish; a
		 * routine stop is not worth an error line per configuration */
		end_now(f, EX_TEMPFAIL, LOG_LVL_INFO, "%s: stopped before the session began",
			f->where);
		break;
	case FETCH_TOPPING:
		wind_up(f, FETCH_QUITTING, true);
		break;
	case FETCH_RETRIEVING:
		/* QUIT once the messages in flight are saved and committed */
		if (f->next == f->issued)
			wind_up(f, FETCH_QUITTING, true);
		else
			fetch_enter(f, FETCH_STOPPING);
		break;
	default: /* stopping, quitting, or done */
		break;
	}
}

void
fetch_abort(struct fetch *f, const char *why)
{
	if (f->state == FETCH_DONE)
		return;
	settle(f);
	drop_batch(f); /* not committed */
	end_now(f, EX_TEMPFAIL, LOG_LVL_ERROR,
		"%s: %s: the session was ended without QUIT; nothing it marked for deletion "
		"is deleted",
		f->where, why);
}

static void
result_clear(struct fetch_result *res)
{
	for (size_t i = 0; i < res->nsaved; i++)
		FREE_ALL(res->saved[i].uid, res->saved[i].folder);
	for (size_t i = 0; i < res->nerrors; i++)
		free(res->errors[i]);
	FREE_ALL(res->saved, res->errors);
}

void
fetch_progress(const struct fetch *f, struct fetch_progress *ret)
{
	/* receive (FETCH_ONE) asks for one message, the next only when that failed */
	size_t n = f->mode == FETCH_ONE && f->ncand > 1 ? 1 : f->ncand;
	struct fetch_progress p = {.listed = f->cand != NULL};

	for (size_t i = 0; i < n; i++) {
		const struct candidate *c = &f->cand[i];
		p.messages_total++;
		p.bytes_total += c->size;
		if (c->state != MSG_LISTED && c->state != MSG_REQUESTED) {
			p.messages++;
			p.bytes += c->size;
		}
	}
	/* the message at the head as far as it came */
	if (retrieving(f) && f->msg != NULL && f->next < n)
		p.bytes +=
			f->msg_bytes < f->cand[f->next].size ? f->msg_bytes : f->cand[f->next].size;
	*ret = p;
}

void
fetch_free(struct fetch *f)
{
	if (f == NULL)
		return;
	settle(f);
	forget_token(f);
	if (f->token_req != NULL)
		oauth2_cancel(f->token_req);
	session_reset(f);
	pop3_session_free(f->pop3);
	store_close(f->store);
	result_clear(&f->res);
	message_key_free(f->key);
	event_free(f->done_ev);
	event_free(f->commit_ev);
	FREE_ALL(f->dele, f->mechanisms, f);
}
