/*
 * auth — login mechanisms turned into what RFC 5034 AUTH (and RFC 1939 APOP)
 * send: GNU SASL for SCRAM-SHA-256(-PLUS), SCRAM-SHA-1, CRAM-MD5, PLAIN and
 * LOGIN; XOAUTH2 and OAUTHBEARER (RFC 7628) of our own. Knows no socket:
 * it takes challenges and gives responses, base64 both ways.
 */
#ifndef POPFETCHD_AUTH_H
#define POPFETCHD_AUTH_H

#include <stdbool.h>
#include <stddef.h>

struct auth;
struct auth_scram_cache;

struct auth_params {
	const char *user;
	const char *password; /* SASL mechanisms and APOP */
	const char *token;    /* XOAUTH2, OAUTHBEARER */
	/* channel bindings for the -PLUS mechanisms, base64; NULL when none */
	const char *cb_tls_unique;
	const char *cb_tls_exporter;
	/* SCRAM's salted password from an earlier login with the same password;
	 * NULL: none (see auth_scram_cache_new) */
	struct auth_scram_cache *scram_cache;
};

/* Does this build implement the mechanism (SASL name, or APOP / USER)? */
bool auth_supported(const char *mech);
/* Does the mechanism send the password as it is (to warn without TLS)? */
bool auth_cleartext(const char *mech);
/* Does the client speak first (an initial response can go with AUTH)? */
bool auth_client_first(const char *mech);
/* Does it need channel binding (the -PLUS mechanisms)? */
bool auth_needs_binding(const char *mech);

/* 0, or -EINVAL with a line in err. */
int auth_start(const char *mech, const struct auth_params *p, struct auth **ret, char *err,
	       size_t errlen);
/*
 * The next response to a challenge (base64, "" for an empty one), malloc'd
 * into *ret_b64; the first call of a client-first mechanism takes NULL.
 * Returns 0, or -EPROTO when the server's message is wrong (a SCRAM server
 * that cannot prove it knows the password): the caller cancels with "*".
 * For XOAUTH2/OAUTHBEARER, a challenge after the token is the server's
 * error: the response is the one RFC 7628 asks for, and
 * auth_token_rejected() becomes true.
 */
int auth_step(struct auth *a, const char *challenge_b64, char **ret_b64);
/*
 * The most SCRAM iterations a server may ask for: PBKDF2 runs on the event
 * loop, and 100 000 rounds take some 33 ms on a small VM (servers use 4096
 * to 15 000). More is refused, so that a hostile server cannot stall every
 * other mailbox; auth_step then fails and auth_error() says why.
 */
#define AUTH_SCRAM_ITER_MAX 100000
/* Why the last auth_step failed when it is not the server's proof, or NULL. */
const char *auth_error(const struct auth *a);
/*
 * The server said +OK to AUTH: is the exchange over on our side? For SCRAM
 * that means the server-final message verified (the server proved it knows
 * the password), whether it came in a "+" continuation or as the +OK's
 * additional data (RFC 5034), given here as success_b64 (NULL or "" when
 * none). 0, or -EPROTO with a line in err: then the login does not count.
 */
int auth_finish(struct auth *a, const char *success_b64, char *err, size_t errlen);
/*
 * The server refused the login (-ERR, not a temporary response code). For
 * XOAUTH2/OAUTHBEARER after the token went out, that refuses the token,
 * error challenge or not (Microsoft 365 sends none): auth_token_rejected()
 * becomes true.
 */
void auth_refused(struct auth *a);
bool auth_token_rejected(const struct auth *a);
/* Did this SCRAM login take its salted password from the cache? */
bool auth_salted_from_cache(const struct auth *a);
void auth_free(struct auth *a);

/*
 * SCRAM's salted password, Hi(password, salt, i) (RFC 5802 §3): PBKDF2, most
 * of a login's CPU, and the same at every login while the password, the
 * server's salt and iteration count and the hash stay. A cache holds the
 * last one: a login that gets that salt and count from the server uses it
 * instead of PBKDF2; a login that succeeds (the server proved itself)
 * stores its own; a failed login empties it. One cache serves one password
 * (one configuration): a new password needs a new cache. The salted
 * password is as good as the password at a server with that salt: it stays
 * in memory and is wiped when replaced or freed.
 */
struct auth_scram_cache *auth_scram_cache_new(void);
/* A new cache holding what c holds (a reload that keeps the password). */
struct auth_scram_cache *auth_scram_cache_dup(const struct auth_scram_cache *c);
void auth_scram_cache_free(struct auth_scram_cache *c);

/* APOP (RFC 1939): MD5 of the greeting's timestamp and the password, hex. */
void auth_apop_digest(const char *timestamp, const char *password, char out[33]);

#endif
