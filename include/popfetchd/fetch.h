/*
 * fetch — one poll of one configuration, for receive, receive-all and the
 * daemon alike: drives a pop3 session, picks the messages not yet received,
 * hands their bytes to message and store, commits, and only then asks pop3
 * to DELE. Knows no sockets, no TLS, no YAML.
 */
#ifndef POPFETCHD_FETCH_H
#define POPFETCHD_FETCH_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include "popfetchd/pop3.h"

struct event_base;
struct evdns_base;
struct conf_set;
struct conf_mailbox;
struct fetch;
struct runtime;
struct tls_ctx;

enum fetch_mode {
	FETCH_ONE, /* MAIL_RECEIVE: the oldest message not yet received */
	FETCH_ALL, /* MAIL_RECEIVEALL: every message not yet received */
};

struct fetch_saved {
	char *uid;
	char *folder; /* NULL when nothing is kept (no save_directory) */
	unsigned long long size;
};

struct fetch_result {
	int exit_code; /* sysexits, as DESIGN.md §2 */
	struct fetch_saved *saved;
	size_t nsaved;
	size_t skipped;	      /* already received before */
	size_t too_big;	      /* left on the server: over max_message_size */
	size_t deleted;	      /* deletions the server committed (QUIT +OK) */
	unsigned login_delay; /* seconds the server asked to wait, 0 if none */
	char **errors;	      /* what went wrong, one line each */
	size_t nerrors;
	time_t tls_expires_at; /* the server certificate's notAfter (UTC), 0 without TLS */
};

typedef void (*fetch_done_cb)(struct fetch *f, void *arg);

struct auth_scram_cache;
struct oauth2_source;
struct smime_key;
struct worker_pool;

struct fetch_params {
	const struct conf_set *set;
	const struct conf_mailbox *mb;
	struct tls_ctx *tls;		   /* the configuration's TLS context; NULL for tls: none */
	struct oauth2_source *oauth2;	   /* its token source, for auth: oauth2 */
	const struct smime_key *smime_key; /* its S/MIME key, NULL when none */
	const char *smime_unavailable;	   /* why not, when smime.key_name is set */
	enum fetch_mode mode;
	/* its SCRAM salted password from login to login (auth.h); NULL: none */
	struct auth_scram_cache *scram_cache;
	/* Where the poll seals and commits its messages (worker.h): NULL, on
	 * the loop, in the call; else on workers: a few seals, and a commit,
	 * while the session reads on. */
	struct worker_pool *workers;
	/* For tests only: passed to every POP3 session of the poll (struct
	 * pop3_params); NULL: connect to the server as usual. */
	int (*open_socket)(void *arg);
	void *open_arg;
};

/* The parameters of a poll with a configuration's runtime (runtime.h). */
/* A POP3 session's parameters for mb (token: for OAuth2, may be NULL); the
 * test command's too. */
void fetch_pop3_params(const struct conf_mailbox *mb, struct tls_ctx *tls, const char **mechanisms,
		       const char *token, struct pop3_params *pp);
void fetch_params_from_runtime(const struct runtime *rt, enum fetch_mode mode,
			       struct fetch_params *fp);

/* The exit code (sysexits, DESIGN.md §2) of a session that failed so. */
int fetch_failure_exit(enum pop3_failure fail);

/* Start one poll; done() is called from the loop (never from inside
 * fetch_start) when it has ended, successfully or not. What p points to
 * must live until then. */
struct fetch *fetch_start(struct event_base *base, struct evdns_base *dns,
			  const struct fetch_params *p, fetch_done_cb done, void *arg);
/* The daemon is stopping: no further RETR. A session in its message loop
 * saves the messages whose RETR is in flight, commits them, then QUITs (so
 * its deletions commit); one not logged in yet ends at once. done()
 * follows as usual. */
void fetch_stop(struct fetch *f);
/* End now, without QUIT (nothing is deleted; the messages in hand and the
 * batch not committed yet are not kept): the stop took too long. done()
 * follows. */
void fetch_abort(struct fetch *f, const char *why);
const struct fetch_result *fetch_result(const struct fetch *f);

/* How far the poll is through what its listing has to receive (in the
 * session at hand: one that starts over lists anew). Sizes as LIST gives
 * them; a message counts as done once saved, known as saved before, or
 * failed. */
struct fetch_progress {
	bool listed; /* the listing is known */
	size_t messages, messages_total;
	unsigned long long bytes, bytes_total;
};
void fetch_progress(const struct fetch *f, struct fetch_progress *ret);
void fetch_free(struct fetch *f);

#endif
