/*
 * oauth2 — OAuth2 access tokens for the configurations that log in with
 * XOAUTH2 or OAUTHBEARER. Tokens are fetched from the token endpoint with
 * libcurl's multi interface driven by the process's libevent loop (socket
 * and timer callbacks, as curl's multi-event example: no blocking call, no
 * thread), cached in state_directory/ID/oauth2-token (mode 0600) so that
 * sessions and restarts reuse them, and refreshed in the background before
 * they expire. Knows nothing of POP3. Never logs a token or a secret.
 */
#ifndef POPFETCHD_OAUTH2_H
#define POPFETCHD_OAUTH2_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

struct event_base;
struct oauth2_client;
struct oauth2_source;
struct oauth2_request;

enum oauth2_grant { OAUTH2_GRANT_CLIENT_CREDENTIALS, OAUTH2_GRANT_REFRESH_TOKEN };

struct oauth2_params {
	const char *id;		    /* for log lines */
	const char *token_endpoint; /* https URL */
	const char *client_id;
	const char *client_secret; /* may be NULL for a public client (refresh_token) */
	const char *scope;	   /* may be NULL */
	enum oauth2_grant grant;
	const char *refresh_token_file; /* for OAUTH2_GRANT_REFRESH_TOKEN: read, and
					 * rewritten atomically when the endpoint
					 * rotates the refresh token */
	const char *ca_file;		/* trust anchors for the endpoint; NULL: curl's default */
	const char *state_dir;		/* state_directory/ID: the token cache lives there */
	unsigned timeout;		/* seconds for one request to the endpoint */
};

enum oauth2_status {
	OAUTH2_OK,
	OAUTH2_REFUSED,	    /* the endpoint refused: invalid_client, invalid_grant, ... (77) */
	OAUTH2_UNAVAILABLE, /* network error, timeout, 5xx, malformed answer (75) */
	OAUTH2_LOCAL,	    /* the cache or the refresh token file cannot be written (74) */
};

/* token: the access token (valid during the callback only), NULL unless OK.
 * detail: one line for the log (with the endpoint's error and
 * error_description when it gave them), never a secret. */
typedef void (*oauth2_token_cb)(void *arg, enum oauth2_status status, const char *token,
				const char *detail);

/* One per process: the curl multi handle on this event base. */
struct oauth2_client *oauth2_client_new(struct event_base *base);
/* observe is told of every request to a token endpoint once it has ended
 * (background refreshes too): the configuration's id and the result. NULL:
 * nobody is told. */
typedef void (*oauth2_observe_cb)(void *arg, const char *id, enum oauth2_status status);
void oauth2_client_observe(struct oauth2_client *client, oauth2_observe_cb observe, void *arg);
/* Cancels everything still running; before event_base_free. NULL is a no-op. */
void oauth2_client_free(struct oauth2_client *client);

/*
 * One per configuration; a reload that leaves its settings alone keeps it
 * (the access token, its expiry and a rotated refresh token not yet
 * written back live in memory only). Loads the cached token if any.
 *
 * A refresh holds state_dir/oauth2.lock (flock) from before it reads the
 * refresh token file until the rotated one is written back, so that two
 * processes never present the same refresh token; one that finds the lock
 * taken tries again every 100 ms, at most the request timeout, and then
 * uses the token the other process cached, if it is fresh.
 */
struct oauth2_source *oauth2_source_new(struct oauth2_client *client,
					const struct oauth2_params *params);
/* Another owner: each one calls oauth2_source_free. */
struct oauth2_source *oauth2_source_ref(struct oauth2_source *src);
void oauth2_source_free(struct oauth2_source *src);

/*
 * A valid access token: the one in memory or the cache when it has more
 * than a minute to live, else a fresh one from the endpoint (one request
 * for all callers waiting at that moment). force: the server rejected the
 * current token: fetch another even if it looks valid. cb is called from
 * the loop, never from inside this call. The request may be cancelled
 * until then.
 */
struct oauth2_request *oauth2_get_token(struct oauth2_source *src, bool force, oauth2_token_cb cb,
					void *arg);
void oauth2_cancel(struct oauth2_request *req);

/*
 * For the daemon: keep the token fresh without anyone asking: refresh it
 * when 80% of its lifetime has passed (at the latest 5 minutes before it
 * expires); a failing endpoint is retried with exponential backoff (from
 * 10 s up to 10 min, with jitter). Off by default.
 */
void oauth2_source_keep_fresh(struct oauth2_source *src, bool on);

/* The exit code (sysexits, DESIGN.md §2) of a poll that got no token so. */
int oauth2_exit_code(enum oauth2_status status);
/* "ok", "refused", "unavailable" or "local". */
const char *oauth2_status_name(enum oauth2_status status);

/* How many requests went to the endpoint. Only tests ask it
 * (tests/tools/oauth2-probe.c); the daemon does not. */
unsigned oauth2_source_requests(const struct oauth2_source *src);
/* When the access token in hand expires (the endpoint's expires_in from
 * when it was obtained); 0 when there is none. */
time_t oauth2_source_expiry(const struct oauth2_source *src);

#endif
