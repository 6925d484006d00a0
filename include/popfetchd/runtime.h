/*
 * runtime — what one configuration needs to be polled besides its settings:
 * its TLS context, its OAuth2 token source, its SCRAM salted password (once
 * a login has computed it) and its S/MIME key, built once
 * and shared by every poll of it (receive builds one, the daemon one per
 * configuration and reload).
 */
#ifndef POPFETCHD_RUNTIME_H
#define POPFETCHD_RUNTIME_H

#include <stdbool.h>
#include <stddef.h>

struct conf_set;
struct conf_mailbox;
struct auth_scram_cache;
struct oauth2_client;
struct oauth2_params;
struct event_base;
struct evdns_base;
struct oauth2_source;
struct smime_key;
struct tls_ctx;

struct runtime {
	const struct conf_set *set;
	const struct conf_mailbox *mb;
	struct tls_ctx *tls;	      /* NULL for tls: none */
	struct oauth2_source *oauth2; /* for auth: oauth2 */
	struct smime_key *smime_key;  /* NULL when none, or it could not be loaded */
	char smime_why[512];	      /* why not, when smime.key_name is set */
	char *state_dir;	      /* state_directory/ID */
	/* SCRAM's salted password from login to login (auth.h); NULL for auth:
	 * oauth2 */
	struct auth_scram_cache *scram_cache;
};

/*
 * Build it. oauth may be NULL when mb does not use OAuth2; keep_fresh
 * refreshes the token in the background (the daemon). An S/MIME key that
 * cannot be loaded is logged and noted, not an error. 0, or -1 with why
 * (the TLS context cannot be built: a bad tls_ca_file).
 */
int runtime_init(struct runtime *rt, const struct conf_set *set, const struct conf_mailbox *mb,
		 struct oauth2_client *oauth, bool keep_fresh, char *why, size_t whylen);
/*
 * The same after a reload, prev being the runtime of the configuration's
 * previous settings (NULL: none). When no OAuth2 setting changed (every
 * oauth2.* key, the secret's value, the timeout, the state directory) the
 * token source is prev's, shared: its access token and a rotated refresh
 * token held in memory survive the reload. When the password is the same,
 * so is the SCRAM salted password (a copy of prev's).
 */
int runtime_reinit(struct runtime *rt, const struct runtime *prev, const struct conf_set *set,
		   const struct conf_mailbox *mb, struct oauth2_client *oauth, bool keep_fresh,
		   char *why, size_t whylen);
void runtime_clear(struct runtime *rt);
/* The start-up check of the daemon: mb's save_directory and the directory
 * of its oauth2.refresh_token_file take new files. 0, or -1 with why (one
 * line naming the key, the path and the cause, and ReadWritePaths= when the
 * file system is read-only). */
int runtime_check_dirs(const struct conf_mailbox *mb, char *why, size_t whylen);
/* The token source parameters of mb, its cache in state_dir. */
void runtime_oauth2_params(const struct conf_mailbox *mb, const char *state_dir,
			   struct oauth2_params *op);
/* The log level: -v / -q (verbosity 1 / -1) over the set's log_level. */
void runtime_log_level(const struct conf_set *set, int verbosity);
/* The SASL mechanisms to offer mb's server, in order, NULL-terminated: a
 * malloc'd array of borrowed strings (free() it). */
const char **runtime_mechanisms(const struct conf_mailbox *mb);
/* mb's TLS context in *ret (NULL for tls: none). 0, or -1 with why (a bad
 * tls_ca_file). */
int runtime_tls_new(const struct conf_mailbox *mb, struct tls_ctx **ret, char *why, size_t whylen);
/* An evdns base with the system's resolvers (or none, for IP literals). */
struct evdns_base *runtime_dns_new(struct event_base *base);
/* What mb's TLS settings risk (tls: none, tls_verify: false without a
 * fingerprint), as a warning: logged as each poll of it starts. */
void runtime_warn_tls(const struct conf_mailbox *mb);
/* Logged in with mechanism: a warning when that sent mb's password in clear. */
void runtime_warn_login(const struct conf_mailbox *mb, const char *mechanism);

/*
 * File descriptors. A POP3 session holds at most RUNTIME_FDS_PER_SESSION at
 * once: its socket; the store's lock, UIDL state, save_directory, staging
 * parent and staging directories; the message in hand's folder and
 * message.eml; a file being extracted and message.eml read back for the MIME
 * parse; and room for a message handed to a worker while the next one
 * arrives. The process keeps RUNTIME_FDS_RESERVED beside its sessions: stdio,
 * the event loop, signals, DNS, sd_notify, the daemon's lock, /metrics and
 * its scrapes, token requests, status.json writes.
 */
#define RUNTIME_FDS_PER_SESSION 12
#define RUNTIME_FDS_RESERVED	64
/* The soft RLIMIT_NOFILE raised to the hard one (nothing here uses select). */
void runtime_raise_fd_limit(void);
/* Do set's max_sessions sessions fit the descriptor limit? 0, or -1 with why:
 * the file and key, what they need, what the limit is and what to do. */
int runtime_check_fd_limit(const struct conf_set *set, char *why, size_t whylen);

/*
 * Root beside another user's state: a command run as root must not leave
 * files owned by root in a state directory that a daemon reads as its own
 * user (it could not replace them). -1 with why when the process runs as
 * root and dir exists and belongs to another user; 0 otherwise.
 */
int runtime_state_owner(const char *dir, char *why, size_t whylen);

#endif
