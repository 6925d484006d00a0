/*
 * config — the YAML configuration directory turned into a validated,
 * immutable configuration set (DESIGN.md §1). Knows nothing of sockets.
 */
#ifndef POPFETCHD_CONFIG_H
#define POPFETCHD_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum conf_tls { CONF_TLS_IMPLICIT, CONF_TLS_EXPLICIT, CONF_TLS_NONE };
enum conf_auth { CONF_AUTH_SASL, CONF_AUTH_OAUTH2 };
enum conf_grant { CONF_GRANT_CLIENT_CREDENTIALS, CONF_GRANT_REFRESH_TOKEN };
enum conf_oauth_mech { CONF_OAUTH_XOAUTH2, CONF_OAUTH_OAUTHBEARER };
enum conf_receive { CONF_RECEIVE_ALL, CONF_RECEIVE_ONE };

struct conf_mailbox {
	char *file; /* the YAML file it came from */
	char *id;
	char *description; /* NULL when absent */
	bool active;

	char *server;  /* never NULL in a valid set (own value or defaults) */
	uint16_t port; /* never 0 in a valid set: default 110, or 995 for implicit */
	enum conf_tls tls;
	char *tls_ca_file; /* NULL: system store */
	bool has_fingerprint;
	unsigned char tls_fingerprint[32]; /* SHA-256 of the leaf certificate (DER) */
	bool tls_verify;

	char *user;	/* never NULL in a valid set */
	char *password; /* the secret itself, loaded from inline/file/credential; may be NULL */

	enum conf_auth auth;
	char **sasl_mechanisms; /* upper-case names, in order; NULL = the default list */
	size_t n_sasl_mechanisms;

	struct {
		char *token_endpoint;
		char *client_id;
		char *client_secret; /* loaded secret */
		char *scope;
		enum conf_grant grant;
		char *refresh_token_file;
		enum conf_oauth_mech mechanism;
		char *ca_file;
	} oauth2;

	struct {
		char *key_name;	    /* NULL: no S/MIME decryption */
		char *key_password; /* loaded secret, may be NULL */
	} smime;

	bool save_text;
	bool save_attachments;
	char *save_directory; /* absolute; NULL when both save flags are false and it is unset */
	bool remove_after_read;
	enum conf_receive receive;
	uint64_t poll_interval;	   /* seconds */
	uint64_t max_message_size; /* bytes, 0 = no limit */
	uint64_t max_decoded_size; /* bytes written beside message.eml, 0 = the default */
	uint64_t connect_timeout;  /* seconds */
	uint64_t command_timeout;  /* seconds */
};

struct conf_set {
	char *dir;		  /* the -c directory */
	char *state_directory;	  /* never NULL */
	char *keystore_directory; /* never NULL */
	unsigned max_sessions;
	unsigned stop_timeout;	  /* seconds a stopping daemon waits for running sessions */
	unsigned commit_batch;	  /* most messages made durable by one group commit */
	unsigned commit_interval; /* seconds a batch's first message waits at most */
	unsigned shard, shards;	  /* shard: K/N, 1/1 when unset: this process serves K of N */
	int log_level;		  /* enum log_level; LOG_LVL_INFO when unset */
	bool log_level_set;
	char *metrics_listen;		 /* "ADDRESS:PORT" of the /metrics endpoint, NULL: off */
	struct conf_mailbox **mailboxes; /* sorted by id */
	size_t n_mailboxes;
};

/* The errors of one load, each one line "FILE:LINE:COL: KEY: message". */
struct conf_errors {
	char **lines;
	size_t n;
};

/*
 * Load DIR/popfetchd.yaml (optional) and DIR/conf.d/ *.yaml|*.yml. Every error
 * of every file is collected into errs (never printing a secret). Returns 0
 * and sets *ret when the whole set is valid; -EINVAL (with errs filled) when
 * anything is invalid, *ret untouched.
 */
int conf_load(const char *dir, struct conf_set **ret, struct conf_errors *errs);
/* The state directory DIR/popfetchd.yaml names (or the default), read
 * without the configurations and without any secret: for `status` by an
 * operator who may read neither. 0 with *ret malloc'd, or -EINVAL with errs. */
int conf_state_directory(const char *dir, char **ret, struct conf_errors *errs);
void conf_set_free(struct conf_set *set);
void conf_errors_clear(struct conf_errors *errs);

/* The mailbox with this id, or NULL. */
const struct conf_mailbox *conf_find(const struct conf_set *set, const char *id);

/*
 * Sharding (shard: K/N): a configuration belongs to shard
 * FNV-1a-64(the id's bytes) mod N + 1. Stable across hosts, builds and
 * releases: several processes with the same tree and N split it between them.
 */
#define CONF_MAX_SHARDS 1000
uint64_t conf_shard_hash(const char *id);
/* The shard (1..shards) of id. */
unsigned conf_shard_of(const char *id, unsigned shards);
/* Does this process (set's shard) serve the configuration id? */
bool conf_in_shard(const struct conf_set *set, const char *id);

const char *conf_tls_name(enum conf_tls tls);
const char *conf_auth_name(enum conf_auth auth);

/* The default mechanism list, in order of preference, NULL-terminated. */
extern const char *const conf_default_sasl_mechanisms[];

#endif
