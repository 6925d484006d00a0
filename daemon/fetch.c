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
 */
#include <errno.h>
#include <stdint.h>
#include <stdarg.h>
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

/* A message to receive (or one a DELE was sent for). A listing may name a
 * million messages: this is kept small, the UIDL is the session's
 * (struct pop3_msg) or, for a message keyed by its content, in keys. */
struct candidate {
	unsigned long num;
	uint64_t size;	 /* as LIST says */
	const char *uid; /* "" until keyed, for a message without UIDL */
};

/*
 * A message the server gives no (valid) UIDL for is keyed by its content
 * (message.h), known once it is all there. Every message is hashed as it
 * comes (known_before says why). Kept on the server (remove_after_read:
 * false), such a message would be downloaded at every poll to be known so.
 * Where the server has TOP it is known by its header key instead
 * (start_top_phase says when): only a message whose key is not in the state
 * is downloaded. Messages that share that key (equal headers and size) are
 * known by their content, as is one whose TOP is refused or whose header
 * block is over HEADERS_MAX.
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

struct fetch {
	struct event_base *base;
	const struct conf_mailbox *mb;
	enum fetch_mode mode;
	fetch_done_cb done;
	void *arg;

	struct evdns_base *dns;
	struct tls_ctx *tls;
	struct oauth2_source *oauth2;
	struct oauth2_request *token_req;
	char *token; /* the access token of this poll (wiped) */
	bool token_retried;

	struct store *store;
	struct pop3_session *pop3;
	const char **mechanisms;

	struct candidate *cand;
	size_t ncand;
	size_t next;   /* the candidate whose response is being read */
	size_t issued; /* RETRs asked for: cand[next..issued) are in flight */
	size_t window; /* most RETRs in flight */
	/* a refused pipelined RETR: this session saves nothing more, and a new
	 * one asks one message at a time (lockstep) */
	bool again, lockstep;
	size_t *pend; /* candidates sealed in the batch, in order */
	size_t npend, pend_done;
	unsigned batch_max, batch_seconds;
	struct event *commit_ev; /* the batch's time bound */
	bool halted;		 /* save nothing more: what is in flight is dropped */
	bool no_dele;		 /* commit without DELE (the session is gone, or confused) */
	bool quit_sent;
	bool aborted;	     /* fetch_abort: the batch is dropped, not committed */
	const char **listed; /* UIDLs on the server, for compaction after QUIT */
	size_t nlisted;
	char **keys; /* the content keys made in this session */
	size_t nkeys;
	struct store_msg *msg;	 /* the message being received */
	struct message_key *key; /* its key in the making */
	struct message_params msgp;
	/* listed messages without UIDL whose key is not known in this session,
	 * or is a header key not in the state (saved under another key before?) */
	size_t unkeyed;
	bool have_uidl; /* the server answered UIDL */
	/* TOP n 0 for the messages without UIDL (HEADER_KEY_PREFIX) */
	bool topping;		    /* asking: no RETR before every answer is in */
	bool top_refused;	    /* a TOP was refused one at a time: no more in this poll */
	size_t top_next, top_issue; /* candidates: the one being answered, the next to ask */
	size_t top_inflight, top_window;
	char *head_keys; /* the header keys, KEY_SIZE bytes each, never moved */
	size_t nhead_keys;
	struct pop3_head head; /* the header block of the TOP being answered */
	size_t head_bytes;
	bool head_too_long;
	time_t msg_time;
	int msg_error;		       /* a write of the current message failed */
	uint64_t msg_bytes, msg_limit; /* received so far, most accepted */
	struct candidate *dele;	       /* DELEs sent, to learn which the server took */
	size_t ndele, capdele;
	size_t dele_answered; /* answers come in the order the DELEs went out */
	size_t dele_ok;
	const char **deleted_uids; /* UIDLs the server accepted a DELE for, in this session */
	size_t ndeleted_uids, capdeleted_uids;
	bool listing_done;
	/* DELEs of messages saved by an earlier session: sent in this one, most
	 * per session (0: no limit), and whether some wait for the next one */
	size_t stale_sent, stale_cap;
	bool stale_left;
	unsigned sessions; /* sessions this poll started beyond the first */
	bool stopping;	   /* fetch_stop(): QUIT after the message in hand */
	struct event *done_ev;

	struct fetch_result res;
	bool finished;
	char where[300]; /* "host:port" or "[v6]:port", for error lines */
};

static bool retry_with_new_token(struct fetch *f, const struct pop3_error *err);
static bool retry_fewer_deletions(struct fetch *f, const struct pop3_error *err);
static void forget_token(struct fetch *f);
static bool commit_batch(struct fetch *f);
static uint64_t message_limit(const struct fetch *f, uint64_t listed);

static void add_error_at(struct fetch *f, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
#define add_error(f, ...) add_error_at(f, LOG_LVL_ERROR, __VA_ARGS__)

/* An error of this poll: logged at level, and kept for the result. */
static void
add_error_at(struct fetch *f, int level, const char *fmt, ...)
{
	va_list ap;
	char *line;

	va_start(ap, fmt);
	if (vasprintf(&line, fmt, ap) < 0)
		abort();
	va_end(ap);
	log_msg(level, f->mb->id, "%s", line);
	f->res.errors = xrealloc(f->res.errors, (f->res.nerrors + 1) * sizeof(char *));
	f->res.errors[f->res.nerrors++] = line;
}

static void
set_exit(struct fetch *f, int code)
{
	if (f->res.exit_code == 0)
		f->res.exit_code = code;
}

static void
finish_cb(evutil_socket_t fd, short what, void *arg)
{
	struct fetch *f = arg;

	(void)fd;
	(void)what;
	f->done(f, f->arg);
}

/* End the poll: the owner hears of it from the loop, never re-entrantly. */
static void
finish(struct fetch *f)
{
	if (f->finished)
		return;
	f->finished = true;
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
	f->no_dele = true;
	if (!f->aborted)
		commit_batch(f);
	if (f->pop3 != NULL) {
		pop3_session_free_deferred(f->pop3);
		f->pop3 = NULL;
	}
	/* the lock is released now: the next poll may start at once */
	store_close(f->store);
	f->store = NULL;
	log_msg(f->res.nsaved || f->res.deleted || f->res.exit_code ? LOG_LVL_INFO : LOG_LVL_DEBUG,
		f->mb->id, "%zu saved, %zu already received, %zu deleted%s", f->res.nsaved,
		f->res.skipped, f->res.deleted, f->res.exit_code ? " (with errors)" : "");
	static const struct timeval zero = {0, 0};

	evtimer_add(f->done_ev, &zero);
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

static void
on_failed(void *arg, const struct pop3_error *err)
{
	struct fetch *f = arg;

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

/* DELE, remembering which message it was for. */
static void
send_dele(struct fetch *f, unsigned long num, const char *uid)
{
	if (f->ndele == f->capdele) {
		f->capdele = f->capdele ? 2 * f->capdele : 16;
		f->dele = xrealloc(f->dele, f->capdele * sizeof(*f->dele));
	}
	f->dele[f->ndele].num = num;
	f->dele[f->ndele].uid = uid;
	f->ndele++;
	pop3_dele(f->pop3, num);
}

/* More RETRs to ask for in this session? */
static bool
more_to_ask(const struct fetch *f)
{
	if (f->halted || f->stopping || f->issued >= f->ncand)
		return false;
	/* receive: one: the oldest message the server gives */
	return f->mode != FETCH_ONE || (f->res.nsaved == 0 && f->npend == 0);
}

/* Keep the window of RETRs full. */
static void
request_more(struct fetch *f)
{
	while (more_to_ask(f) && f->issued - f->next < f->window) {
		uint64_t bytes = f->cand[f->issued].size;
		for (size_t i = f->next; i < f->issued; i++)
			bytes += f->cand[i].size;
		if (f->issued > f->next && bytes > RETR_WINDOW_BYTES)
			break;
		pop3_retr(f->pop3, f->cand[f->issued++].num);
	}
}

/* Commit what is sealed (its DELEs go out), then QUIT: the server answers
 * what is in flight first. */
static void
wind_up(struct fetch *f)
{
	if (f->quit_sent || f->finished)
		return;
	commit_batch(f);
	f->quit_sent = true;
	pop3_quit(f->pop3);
}

/* A response to a RETR has been dealt with. */
static void
after_response(struct fetch *f)
{
	if (f->finished)
		return;
	request_more(f);
	if (f->halted || (!more_to_ask(f) && f->next == f->issued))
		wind_up(f);
}

/* Stop saving: the sealed messages are committed, the rest dropped. */
static void
halt(struct fetch *f)
{
	f->halted = true;
	store_msg_abort(f->msg);
	f->msg = NULL;
}

/* Is this one of the header keys (not a UIDL that reads like one)? */
static bool
keyed_by_headers(const struct fetch *f, const char *uid)
{
	uintptr_t p = (uintptr_t)uid, base = (uintptr_t)f->head_keys;

	return f->head_keys != NULL && p >= base && p < base + f->nhead_keys * KEY_SIZE;
}

/* The first bytes (or the end) of the message at the head: stage it. */
static int
begin_message(struct fetch *f)
{
	const struct candidate *c = &f->cand[f->next];
	int r;

	message_key_begin(f->key);
	f->msg_time = time(NULL);
	f->msg_error = 0;
	f->msg_bytes = 0;
	f->msg_limit = message_limit(f, c->size);
	r = store_msg_begin(f->store, c->uid, f->msg_time, &f->msg);
	if (r < 0) {
		set_exit(f, EX_IOERR);
		add_error(f, "%s", store_error(f->store));
		halt(f);
	}
	return r;
}

static void
on_ready(void *arg)
{
	struct fetch *f = arg;

	log_debug(f->mb->id, "logged in as %s with %s", f->mb->user, pop3_mechanism(f->pop3));
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
	f->head_too_long = false;
	f->msg_bytes = 0;
	if (f->top_next >= f->ncand)
		return;
	message_key_begin_headers(f->key, f->cand[f->top_next].size);
}

/* Keep the window of TOPs full. */
static void
ask_tops(struct fetch *f)
{
	while (!f->top_refused && !f->halted && !f->stopping && f->top_issue < f->ncand &&
	       f->top_inflight < f->top_window) {
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

	f->topping = false;
	for (size_t i = 0; i < f->ncand; i++) {
		struct candidate c = f->cand[i];
		if (keyed_by_headers(f, c.uid)) {
			by_headers++;
			f->listed[f->nlisted++] = c.uid;
			if (store_has(f->store, c.uid)) {
				f->res.skipped++;
				f->unkeyed--;
				if (f->mb->remove_after_read) {
					send_dele(f, c.num, c.uid);
					stale++;
				}
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
	after_response(f);
}

/* The answer to the TOP at the head has been dealt with. */
static void
next_top(struct fetch *f)
{
	f->top_inflight--;
	f->top_next = next_unkeyed(f, f->top_next + 1);
	top_reset(f);
	if (f->halted) {
		wind_up(f);
		return;
	}
	ask_tops(f);
	if (f->top_inflight == 0)
		end_top_phase(f);
}

/* An answer to a pipelined TOP could not be trusted: a new session asks
 * one command at a time (as after a pipelined RETR, start_over_in_lockstep). */
static void
top_start_over(struct fetch *f)
{
	f->again = true;
	halt(f);
	next_top(f);
}

/* Bytes of the header block of the TOP at the head. */
static void
top_data(struct fetch *f, const char *buf, size_t len)
{
	const struct candidate *c = &f->cand[f->top_next];
	size_t n = pop3_head_feed(&f->head, buf, len);

	f->msg_bytes += len;
	if (f->msg_bytes > message_limit(f, c->size)) {
		set_exit(f, EX_PROTOCOL);
		add_error(f,
			  "%s: the answer to TOP %lu 0 goes on past %llu bytes, far more than "
			  "LIST announced for the whole message: the session is ended",
			  f->where, c->num, (unsigned long long)message_limit(f, c->size));
		pop3_abort(f->pop3);
		finish(f);
		return;
	}
	if (f->head_too_long || n == 0)
		return;
	if (f->head_bytes + n > HEADERS_MAX) {
		f->head_too_long = true;
		return;
	}
	f->head_bytes += n;
	message_key_add(f->key, buf, n);
}

/* The TOP at the head was answered (error: refused). */
static void
top_answered(struct fetch *f, unsigned long num, const char *error)
{
	struct candidate *c = &f->cand[f->top_next];

	if (f->halted) {
		next_top(f);
		return;
	}
	if (error != NULL && f->top_window > 1) {
		log_notice(f->mb->id,
			   "%s: the server refused TOP %lu among pipelined commands: starting "
			   "over one command at a time (server said: %s)",
			   f->where, num, error);
		top_start_over(f);
		return;
	}
	if (error != NULL) {
		f->top_refused = true;
		log_notice(f->mb->id,
			   "%s: the server refused TOP %lu (server said: %s): the messages "
			   "without UIDL not known by their headers yet are downloaded to be "
			   "known by their content",
			   f->where, num, error);
	} else if (f->head_too_long) {
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
	f->topping = true;
	f->head_keys = xcalloc(f->unkeyed, KEY_SIZE);
	f->nhead_keys = 0;
	f->top_window = capa->pipelining && !f->lockstep ? TOP_WINDOW : 1;
	f->top_issue = f->top_next = next_unkeyed(f, 0);
	f->top_inflight = 0;
	top_reset(f);
	ask_tops(f);
	return true;
}

static void
on_listing(void *arg, const struct pop3_msg *msgs, size_t n, bool have_uidl)
{
	struct fetch *f = arg;
	bool *dup = duplicate_uids(msgs, n);
	size_t stale = 0, ndup = 0;

	f->listing_done = true;
	f->cand = xcalloc(n, sizeof(*f->cand));
	f->listed = xcalloc(n ? n : 1, sizeof(*f->listed));
	for (size_t i = 0; i < n; i++) {
		const struct pop3_msg *m = &msgs[i];
		bool keyed = m->uid[0] != '\0' && !dup[i];
		ndup += dup[i];
		if (keyed) {
			f->listed[f->nlisted++] = m->uid;
			if (store_has(f->store, m->uid)) {
				f->res.skipped++;
				if (f->mb->remove_after_read && f->stale_cap != 0 &&
				    stale == f->stale_cap)
					f->stale_left = true;
				else if (f->mb->remove_after_read) {
					/* saved before; its deletion was never committed */
					send_dele(f, m->num, m->uid);
					stale++;
				}
				continue;
			}
		}
		if (f->mb->max_message_size && m->size > f->mb->max_message_size) {
			log_notice(f->mb->id,
				   "message %lu%s%s%s is %llu bytes, over max_message_size: left "
				   "on the server",
				   m->num, keyed ? " (" : "", m->uid, keyed ? ")" : "",
				   (unsigned long long)m->size);
			f->res.too_big++;
			continue;
		}
		/* one without UIDL is keyed by its content once it is here */
		f->unkeyed += !keyed;
		f->cand[f->ncand].num = m->num;
		f->cand[f->ncand].uid = keyed ? m->uid : "";
		f->cand[f->ncand].size = m->size;
		f->ncand++;
	}
	free(dup);
	f->stale_sent = stale;
	if (f->stale_left)
		f->ncand = 0; /* this session only deletes, then QUITs */
	if (ndup > 0)
		log_warning(f->mb->id,
			    "%s: %zu messages share UIDLs with others: they are known "
			    "by their content instead",
			    f->where, ndup);
	if (stale > 0)
		log_info(f->mb->id, "deleting %zu message(s) saved by an earlier session", stale);
	log_debug(f->mb->id, "%zu message(s) on the server, %zu to receive", n, f->ncand);
	f->pend = xcalloc(f->ncand ? f->ncand : 1, sizeof(*f->pend));
	f->have_uidl = have_uidl;
	if (start_top_phase(f))
		return;
	note_unkeyed(f, 0, f->unkeyed);
	after_response(f);
}

static void
on_data(void *arg, const char *buf, size_t len)
{
	struct fetch *f = arg;

	if (f->halted || f->finished)
		return;
	if (f->topping) {
		top_data(f, buf, len);
		return;
	}
	if (f->msg == NULL && begin_message(f) < 0)
		return;
	if (f->msg_error)
		return;
	f->msg_bytes += len;
	if (f->msg_bytes > f->msg_limit) {
		const struct candidate *c = &f->cand[f->next];
		set_exit(f, EX_PROTOCOL);
		add_error(f,
			  "%s: message %lu (%s) goes on past %llu bytes, far more than LIST "
			  "announced: the session is ended, nothing of it is kept",
			  f->where, c->num, c->uid, (unsigned long long)f->msg_limit);
		pop3_abort(f->pop3);
		finish(f);
		return;
	}
	message_key_add(f->key, buf, len);
	if (store_msg_write(f->msg, buf, len) < 0)
		f->msg_error = 1;
}

/* The content key of the message just received (one without UIDL). */
static void
content_key(struct fetch *f, struct candidate *c)
{
	char *key = xcalloc(1, KEY_SIZE);

	message_key_end(f->key, key);
	f->keys = xrealloc(f->keys, (f->nkeys + 1) * sizeof(*f->keys));
	f->keys[f->nkeys++] = key;
	c->uid = key;
	f->unkeyed--;
	f->listed[f->nlisted++] = key;
}

/* A message of the batch is durable: count it, and now it may be deleted. */
static void
on_committed(void *arg, const char *uid, char *folder, unsigned long long size)
{
	struct fetch *f = arg;
	const struct candidate *c = &f->cand[f->pend[f->pend_done++]];
	struct fetch_saved *sv;

	f->res.saved = xrealloc(f->res.saved, (f->res.nsaved + 1) * sizeof(*f->res.saved));
	sv = &f->res.saved[f->res.nsaved++];
	sv->uid = xstrdup(uid);
	sv->folder = folder;
	sv->size = size;
	log_debug(f->mb->id, "saved message %lu (%s) in %s", c->num, uid,
		  folder ? folder : "(nothing kept)");
}

/* Group commit of the sealed messages; false when it failed (the session
 * then saves nothing more). */
static bool
commit_batch(struct fetch *f)
{
	size_t n = f->npend;
	int r;

	if (n == 0)
		return true;
	evtimer_del(f->commit_ev);
	f->pend_done = 0;
	r = store_commit(f->store, on_committed, f);
	f->npend = 0;
	/* the DELEs once the store is done with the batch: nothing the session
	 * may call back into runs inside store_commit */
	for (size_t i = 0; i < f->pend_done; i++)
		if (f->mb->remove_after_read && !f->no_dele && f->pop3 != NULL)
			send_dele(f, f->cand[f->pend[i]].num, f->cand[f->pend[i]].uid);
	if (r < 0) {
		set_exit(f, EX_IOERR);
		add_error(f, "%zu of %zu message(s) not saved: %s", n - f->pend_done, n,
			  store_error(f->store));
		f->halted = true;
		return false;
	}
	log_debug(f->mb->id, "committed %zu message(s)", n);
	return true;
}

static void
commit_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct fetch *f = arg;

	(void)fd;
	(void)what;
	if (!commit_batch(f))
		wind_up(f);
}

/* The message is in the staged folder: complete it and add it to the batch. */
static int
seal_message(struct fetch *f, const struct candidate *c, char *why, size_t whylen)
{
	struct message_info m = {.num = c->num,
				 .uid = c->uid,
				 .received = f->msg_time,
				 .write_failed = f->msg_error != 0};
	int r = message_seal(&f->msgp, &m, f->store, &f->msg, why, whylen);

	if (r == 0)
		f->pend[f->npend++] = (size_t)(c - f->cand);
	return r;
}

/* Is a message with this key in the batch? (Byte-identical messages
 * without UIDL have one key.) */
static bool
pending_has(const struct fetch *f, const char *uid)
{
	for (size_t i = 0; i < f->npend; i++)
		if (strcmp(f->cand[f->pend[i]].uid, uid) == 0)
			return true;
	return false;
}

/*
 * What this session read after a response it could not trust is dropped.
 * What is sealed was read before, in step: it is committed, QUIT goes out
 * alone (where a shift shows), and then a new session of this poll asks one
 * command at a time (restart_lockstep).
 */
static void
start_over_in_lockstep(struct fetch *f)
{
	f->again = true;
	halt(f);
	f->next++;
	after_response(f);
}

/* Pipelined, the data of RETR num began like a status line: a message that
 * begins so, or a server out of step. One command at a time tells. */
static void
on_ambiguous(void *arg, unsigned long num, const char *first_line)
{
	struct fetch *f = arg;

	if (f->topping) {
		if (!f->halted)
			log_notice(f->mb->id,
				   "%s: the answer to TOP %lu begins like a status line (\"%s\"): "
				   "starting over one command at a time",
				   f->where, num, first_line);
		top_start_over(f);
		return;
	}
	store_msg_abort(f->msg);
	f->msg = NULL;
	if (f->halted) {
		f->next++;
		after_response(f);
		return;
	}
	log_notice(f->mb->id,
		   "%s: the data of RETR %lu begins like a status line (\"%s\"): the message "
		   "may begin so, or the server's answers are out of step with the commands; "
		   "starting over one command at a time",
		   f->where, num, first_line);
	start_over_in_lockstep(f);
}

/*
 * A message known by its headers, not in the state, may have been saved by
 * its content (by an earlier version, or in a poll where TOP failed): then
 * it is not saved again, and deleted, or (kept on the server) its header
 * key is recorded so that the next poll need not download it. True when it
 * is done with (not to be saved).
 */
static bool
saved_by_content(struct fetch *f, const struct candidate *c)
{
	char key[KEY_SIZE];

	f->unkeyed--;
	message_key_end(f->key, key);
	if (pending_has(f, key) && !commit_batch(f)) {
		halt(f);
		return true;
	}
	if (!store_has(f->store, key)) {
		store_msg_set_content_key(f->msg, key);
		return false;
	}
	log_debug(f->mb->id, "message %lu (%s) was saved before as %s", c->num, c->uid, key);
	store_msg_abort(f->msg);
	f->msg = NULL;
	f->res.skipped++;
	if (f->mb->remove_after_read)
		send_dele(f, c->num, c->uid);
	else if (store_record(f->store, c->uid) < 0) {
		/* known by its content again at the next poll: nothing lost */
		set_exit(f, EX_IOERR);
		add_error(f, "%s", store_error(f->store));
	}
	return true;
}

/*
 * A message without a key, all here: keyed by its content. Saved before (or
 * a copy earlier in this session), it is not kept again. True when it is
 * done with (not to be saved).
 */
static bool
saved_as_content_key(struct fetch *f, struct candidate *c)
{
	content_key(f, c);
	if (pending_has(f, c->uid) && !commit_batch(f)) {
		halt(f);
		return true;
	}
	if (!store_has(f->store, c->uid)) {
		store_msg_set_uid(f->msg, c->uid);
		return false;
	}
	log_debug(f->mb->id, "message %lu (%s) was saved before", c->num, c->uid);
	store_msg_abort(f->msg);
	f->msg = NULL;
	f->res.skipped++;
	if (f->mb->remove_after_read)
		send_dele(f, c->num, c->uid);
	return true;
}

/*
 * The message just received, all here, known by its key: true when it is
 * done with (saved before: not to be saved again). One saved under a UIDL
 * or a header key has its content key recorded beside it, for the day the
 * server gives that key to another message too (a UIDL made of some header
 * fields) and both are known by their content.
 */
static bool
known_before(struct fetch *f, struct candidate *c)
{
	char key[KEY_SIZE];

	if (c->uid[0] == '\0')
		return saved_as_content_key(f, c);
	if (keyed_by_headers(f, c->uid))
		return saved_by_content(f, c);
	message_key_end(f->key, key);
	store_msg_set_content_key(f->msg, key);
	return false;
}

/* The server refused the RETR at the head (error: what it said). */
static void
retr_refused(struct fetch *f, const struct candidate *c, unsigned long num, const char *error)
{
	if (f->window > 1) {
		/*
		 * Pipelined, an -ERR may answer nothing (a line the server
		 * added): every answer after it would then be taken for the
		 * command before, a message saved under another's UIDL and the
		 * other deleted unseen. A new session asks one message at a
		 * time, where a message the server cannot send is skipped as
		 * usual.
		 */
		log_notice(f->mb->id,
			   "%s: the server refused RETR %lu among pipelined commands: starting "
			   "over one command at a time (server said: %s)",
			   f->where, num, error);
		start_over_in_lockstep(f);
		return;
	}
	/* one message the server cannot send must not block the others */
	store_msg_abort(f->msg);
	f->msg = NULL;
	set_exit(f, EX_TEMPFAIL);
	add_error(f, "%s: the server refused RETR %lu%s%s%s: left there (server said: %s)",
		  f->where, num, c->uid[0] ? " (" : "", c->uid, c->uid[0] ? ")" : "", error);
	f->next++;
	after_response(f);
}

static void
on_retrieved(void *arg, unsigned long num, const char *error)
{
	struct fetch *f = arg;
	struct candidate *c = &f->cand[f->next];
	char why[600] = "";

	if (f->topping) {
		top_answered(f, num, error);
		return;
	}
	if (f->halted) {
		/* in flight when the session stopped saving: not kept */
		store_msg_abort(f->msg);
		f->msg = NULL;
		f->next++;
		after_response(f);
		return;
	}
	if (error != NULL) {
		retr_refused(f, c, num, error);
		return;
	}
	if (c->num != num) {
		set_exit(f, EX_PROTOCOL);
		add_error(f, "%s: the server sent message %lu for RETR %lu: not saved", f->where,
			  num, c->num);
		/* what is sealed is sound, but a DELE by number could hit another */
		f->no_dele = true;
		halt(f);
		f->next++;
		after_response(f);
		return;
	}
	if (f->msg == NULL && begin_message(f) < 0) { /* an empty message */
		f->next++;
		after_response(f);
		return;
	}
	if (known_before(f, c)) {
		f->next++;
		after_response(f);
		return;
	}
	if (seal_message(f, c, why, sizeof(why)) < 0) {
		set_exit(f, EX_IOERR);
		add_error(f, "message %lu (%s) not saved: %s", num, c->uid, why);
		/* what is sealed before it is sound: committed, then QUIT */
		halt(f);
		f->next++;
		after_response(f);
		return;
	}
	f->next++;
	unsigned long long bytes;
	size_t n = store_pending(f->store, &bytes);
	if (n >= f->batch_max || bytes >= BATCH_BYTES || f->mode == FETCH_ONE) {
		if (!commit_batch(f))
			halt(f);
	} else if (n == 1) {
		struct timeval bound = {(time_t)f->batch_seconds, 0};
		evtimer_add(f->commit_ev, &bound);
	}
	after_response(f);
}

static void
on_deleted(void *arg, unsigned long num, bool ok)
{
	struct fetch *f = arg;
	const char *uid = NULL;

	if (f->dele_answered < f->ndele && f->dele[f->dele_answered].num == num)
		uid = f->dele[f->dele_answered].uid;
	else
		for (size_t i = 0; i < f->ndele; i++)
			if (f->dele[i].num == num)
				uid = f->dele[i].uid;
	f->dele_answered++;
	if (!ok) {
		log_warning(f->mb->id, "the server refused DELE %lu: the message stays there", num);
		return;
	}
	f->dele_ok++;
	if (uid != NULL) {
		if (f->ndeleted_uids == f->capdeleted_uids) {
			f->capdeleted_uids = f->capdeleted_uids ? 2 * f->capdeleted_uids : 64;
			f->deleted_uids = xrealloc(f->deleted_uids,
						   f->capdeleted_uids * sizeof(*f->deleted_uids));
		}
		f->deleted_uids[f->ndeleted_uids++] = uid;
	}
}

static int
cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* After QUIT +OK the server holds exactly the listing less what we deleted:
 * keep only those UIDLs in the state so that it does not grow forever. */
static void
compact_state(struct fetch *f)
{
	const char **keep = xcalloc(f->nlisted ? f->nlisted : 1, sizeof(char *));
	size_t n = 0;

	if (f->ndeleted_uids > 1)
		qsort(f->deleted_uids, f->ndeleted_uids, sizeof(char *), cmp_str);
	for (size_t i = 0; i < f->nlisted; i++)
		if (f->ndeleted_uids == 0 ||
		    bsearch(&f->listed[i], f->deleted_uids, f->ndeleted_uids, sizeof(char *),
			    cmp_str) == NULL)
			keep[n++] = f->listed[i];
	if (store_compact(f->store, keep, n) < 0) {
		/* nothing is lost (the old state stays), but the state is not
		 * writable: that is exit 74 */
		set_exit(f, EX_IOERR);
		add_error(f, "%s", store_error(f->store));
	}
	free(keep);
}

static void start_session(struct fetch *f);

static void
free_keys(struct fetch *f)
{
	for (size_t i = 0; i < f->nkeys; i++)
		free(f->keys[i]);
	free(f->keys);
	f->keys = NULL;
	f->nkeys = 0;
}

/* The same poll goes on in a new session (after a refused pipelined RETR:
 * one command at a time). What the first one saved and deleted stays so. */
static void
restart_session(struct fetch *f, bool lockstep)
{
	pop3_session_free_deferred(f->pop3);
	f->pop3 = NULL;
	/* the UIDLs were the old session's: the new one lists what is left */
	free_keys(f);
	free(f->listed);
	free(f->cand);
	free(f->pend);
	free(f->deleted_uids);
	f->listed = NULL;
	f->cand = NULL;
	f->pend = NULL;
	f->deleted_uids = NULL;
	f->nlisted = f->ncand = f->next = f->issued = f->npend = 0;
	f->ndele = f->dele_ok = f->dele_answered = f->unkeyed = 0;
	f->ndeleted_uids = f->capdeleted_uids = 0;
	free(f->head_keys);
	f->head_keys = NULL;
	f->nhead_keys = f->top_inflight = 0;
	f->topping = false;
	f->res.skipped = f->res.too_big = 0; /* counted anew from the new listing */
	f->listing_done = f->halted = f->no_dele = f->quit_sent = f->again = false;
	f->stale_sent = 0;
	f->stale_left = false;
	f->lockstep = lockstep;
	f->sessions++;
	start_session(f);
}

static void
on_quit(void *arg, bool ok)
{
	struct fetch *f = arg;

	if (ok && (f->again || f->stale_left) && !f->stopping && f->sessions < MAX_SESSIONS) {
		f->res.deleted += f->dele_ok;
		restart_session(f, f->lockstep || f->again);
		return;
	}
	if (f->again) {
		set_exit(f, EX_TEMPFAIL);
		add_error(f,
			  "%s: a pipelined RETR was refused, or its answer could not be trusted, "
			  "and the session ended before asking again one at a time: the rest "
			  "stays for the next poll",
			  f->where);
	}
	if (ok) {
		f->res.deleted += f->dele_ok;
		/* only when every message is known: a record kept for a message
		 * without UIDL that was not downloaded this time must stay */
		if (f->listing_done && f->res.exit_code == 0 && f->unkeyed == 0 && !f->stale_left)
			compact_state(f);
	} else if (f->ndele > 0) {
		set_exit(f, EX_TEMPFAIL);
		add_error(f,
			  "%s: QUIT was not answered +OK: the server did not commit the "
			  "deletions; the next poll deletes the saved messages",
			  f->where);
	}
	finish(f);
}

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

/* A new POP3 session of this poll (a second one only to retry a token). */
static void
start_session(struct fetch *f)
{
	struct pop3_params pp;

	runtime_pop3_params(f->mb, f->tls, f->mechanisms, f->token, &pp);
	pp.lockstep = f->lockstep;
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
	if (err->fail != POP3_FAIL_LOST || f->stale_sent == 0 || f->stopping || f->aborted ||
	    f->sessions >= MAX_SESSIONS)
		return false;
	/* what this session sealed is durable now; its DELE waits */
	f->no_dele = true;
	if (!commit_batch(f))
		return false;
	f->stale_cap = f->stale_sent > 1 ? f->stale_sent / 2 : 1;
	log_notice(f->mb->id,
		   "%s: the connection was lost after %zu deletions of messages saved before "
		   "(%s): going on in a new session that deletes at most %zu at once",
		   f->where, f->stale_sent, err->detail, f->stale_cap);
	restart_session(f, f->lockstep);
	return true;
}

/* The server refused the token: one fresh token, one new session. */
static bool
retry_with_new_token(struct fetch *f, const struct pop3_error *err)
{
	if (f->oauth2 == NULL || !err->token_rejected || f->token_retried || f->listing_done)
		return false;
	f->token_retried = true;
	log_notice(f->mb->id, "the server refused the access token: fetching a new one and "
			      "trying once more");
	pop3_session_free_deferred(f->pop3);
	f->pop3 = NULL;
	f->token_req = oauth2_get_token(f->oauth2, true, on_token, f);
	return true;
}

void
fetch_params_from_runtime(const struct runtime *rt, enum fetch_mode mode, struct fetch_params *fp)
{
	*fp = (struct fetch_params){
		.set = rt->set,
		.mb = rt->mb,
		.tls = rt->tls,
		.oauth2 = rt->oauth2,
		.smime_key = rt->smime_key,
		.smime_unavailable = rt->smime_why[0] ? rt->smime_why : NULL,
		.mode = mode,
	};
}

struct fetch *
fetch_start(struct event_base *base, struct evdns_base *dns, const struct fetch_params *p,
	    fetch_done_cb done, void *arg)
{
	const struct conf_mailbox *mb = p->mb;
	struct fetch *f = xcalloc(1, sizeof(*f));
	struct store_params sp = {
		.id = mb->id,
		.save_directory = mb->save_directory,
		.state_directory = p->set->state_directory,
		.server = mb->server,
		.user = mb->user,
	};
	char err[512];
	int r;

	f->base = base;
	f->dns = dns;
	f->mb = mb;
	f->tls = p->tls;
	f->oauth2 = p->oauth2;
	f->mode = p->mode;
	f->done = done;
	f->arg = arg;
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

	runtime_warn_tls(mb);
	if ((r = store_open(&sp, &f->store, err, sizeof(err))) < 0) {
		set_exit(f, r == -EBUSY ? EX_TEMPFAIL : EX_IOERR);
		add_error(f, "%s", err);
		finish(f);
		return f;
	}
	f->mechanisms = runtime_mechanisms(mb);
	if (mb->auth == CONF_AUTH_OAUTH2) {
		if (f->oauth2 == NULL)
			abort(); /* the owner builds a token source for every oauth2 configuration
				  */
		f->token_req = oauth2_get_token(f->oauth2, false, on_token, f);
		return f;
	}
	start_session(f);
	return f;
}

void
fetch_stop(struct fetch *f)
{
	if (f->finished || f->stopping)
		return;
	f->stopping = true;
	if (f->pop3 != NULL && f->listing_done) {
		/* QUIT once the messages in flight are saved and committed */
		if (f->next == f->issued)
			wind_up(f);
		return;
	}
	/* not logged in yet (or waiting for a token): nothing to finish */
	if (f->pop3 != NULL)
		pop3_abort(f->pop3);
	/* a routine stop: not worth an error line per configuration */
	add_error_at(f, LOG_LVL_INFO, "%s: stopped before the session began", f->where);
	set_exit(f, EX_TEMPFAIL);
	finish(f);
}

void
fetch_abort(struct fetch *f, const char *why)
{
	if (f->finished)
		return;
	f->aborted = true;
	if (f->pop3 != NULL)
		pop3_abort(f->pop3);
	set_exit(f, EX_TEMPFAIL);
	add_error(f,
		  "%s: %s: the session was ended without QUIT; nothing it marked for deletion "
		  "is deleted",
		  f->where, why);
	finish(f);
}

const struct fetch_result *
fetch_result(const struct fetch *f)
{
	return &f->res;
}

void
fetch_free(struct fetch *f)
{
	if (f == NULL)
		return;
	store_msg_abort(f->msg);
	pop3_session_free(f->pop3);
	store_close(f->store);
	if (f->token_req != NULL)
		oauth2_cancel(f->token_req);
	forget_token(f);
	for (size_t i = 0; i < f->res.nsaved; i++) {
		free(f->res.saved[i].uid);
		free(f->res.saved[i].folder);
	}
	free(f->res.saved);
	for (size_t i = 0; i < f->res.nerrors; i++)
		free(f->res.errors[i]);
	free(f->res.errors);
	free(f->listed);
	free_keys(f);
	free(f->head_keys);
	free(f->deleted_uids);
	free(f->cand);
	free(f->pend);
	free(f->dele);
	free(f->mechanisms);
	message_key_free(f->key);
	event_free(f->done_ev);
	event_free(f->commit_ev);
	free(f);
}
