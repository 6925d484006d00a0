/*
 * config — the YAML configuration directory turned into a validated,
 * immutable configuration set (DESIGN.md §1).
 *
 * Each file is loaded with libyaml's document API (for the node marks) and
 * walked with key tables: a key names a handler that checks the value node
 * and stores it at an offset of the struct being filled. Every error of
 * every file is collected as "FILE:LINE:COL: KEY: message"; secret values
 * never appear in one, and are wiped before their memory is freed.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <yaml.h>

#include "popfetchd/config.h"
#include "popfetchd/log.h"
#include "popfetchd/metrics.h"
#include "popfetchd/util.h"

#define MAX_FILE_SIZE	(1024 * 1024) /* a larger configuration file is an error */
#define MAX_SECRET_LINE 8192	      /* the first line of a secret file */
#define KEY_PATH_MAX	160

const char *const conf_default_sasl_mechanisms[] = {
	"SCRAM-SHA-256-PLUS",
	"SCRAM-SHA-256",
	"SCRAM-SHA-1",
	"CRAM-MD5",
	"APOP",
	"PLAIN",
	"LOGIN",
	"USER",
	NULL,
};

static const char *const status_names[] = {"active", "inactive", NULL};
static const char *const tls_names[] = {"implicit", "explicit", "none", NULL};
static const char *const auth_names[] = {"sasl", "oauth2", NULL};
static const char *const grant_names[] = {"client_credentials", "refresh_token", NULL};
static const char *const mech_names[] = {"XOAUTH2", "OAUTHBEARER", NULL};
static const char *const receive_names[] = {"all", "one", NULL};

/* One secret as written: inline, from a file or from a systemd credential. */
enum secret_kind { SEC_NONE, SEC_INLINE, SEC_FILE, SEC_CRED };

struct secret {
	enum secret_kind kind;
	bool tried; /* one of its keys was there, valid or not */
	char *src;  /* the inline value, the path or the credential name */
	yaml_mark_t mark;
	char path[KEY_PATH_MAX]; /* the dotted key that set it */
};

/* popfetchd.yaml, as parsed. */
struct dparse {
	char *state_directory, *keystore_directory;
	unsigned max_sessions;	  /* 0: unset */
	unsigned commit_batch;	  /* 0: unset */
	uint64_t commit_interval; /* 0: unset */
	uint64_t stop_timeout;	  /* 0: unset */
	int log_level;		  /* -1: unset */
	unsigned shard, shards;	  /* K/N; 0/0: unset */
	char *metrics_listen;
	struct defaults {
		char *server, *user, *tls_ca_file;
		unsigned port; /* 0: unset */
		int tls;       /* -1: unset */
		struct secret pw;
		char *password; /* loaded from pw */
	} d;
};

/* One configuration file, as parsed; m is moved into the set when all is valid. */
struct mparse {
	struct conf_mailbox m;
	/* indexes into the name tables; tls -1: unset */
	int status, tls, auth, grant, mech, receive;
	unsigned port; /* 0: unset */
	struct secret pw, cs, kp;
	yaml_mark_t id_mark;
	size_t order; /* file order, for duplicate ids */
};

static const struct mparse mparse_defaults = {
	.m = {.active = true,
	      .tls_verify = true,
	      .save_text = true,
	      .save_attachments = true,
	      .remove_after_read = true,
	      .poll_interval = 300,
	      .connect_timeout = 30,
	      .command_timeout = 60},
	.tls = -1,
};

struct loader {
	const char *dir;
	struct conf_errors *errs;
	bool no_secrets; /* read no secret (conf_state_directory) */
	struct dparse dp;
	struct mparse **mbx;
	size_t n_mbx, cap_mbx;
};

/* One file's walk. */
struct pctx {
	struct loader *l;
	const char *file;
	yaml_document_t *doc;
	yaml_node_t *root;
	void *base; /* struct dparse or struct mparse */
	mode_t mode;
};

struct key {
	const char *name;
	void (*fn)(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path);
	size_t off; /* into c->base */
	const void *arg;
};

static const yaml_mark_t mark_start; /* 1:1, for errors about a whole file */

/* ---- errors and memory ---- */

static void __attribute__((format(printf, 5, 6)))
add_error(struct conf_errors *errs, const char *file, yaml_mark_t mark, const char *key,
	  const char *fmt, ...)
{
	char name[1024], *msg;
	va_list ap;

	va_start(ap, fmt);
	if (vasprintf(&msg, fmt, ap) < 0)
		msg = NULL;
	va_end(ap);
	errs->lines = xrealloc(errs->lines, (errs->n + 1) * sizeof(char *));
	errs->lines[errs->n++] = xasprintf(
		"%s:%zu:%zu: %s: %s", util_printable(file, strlen(file), name, sizeof(name)),
		mark.line + 1, mark.column + 1, key, msg ? msg : "(out of memory)");
	free(msg);
}

#define perr(c, mark, key, ...) add_error((c)->l->errs, (c)->file, (mark), (key), __VA_ARGS__)

static void
wipe_free(char *p)
{
	if (p != NULL) {
		explicit_bzero(p, strlen(p));
		free(p);
	}
}

static void
set_str(char **field, const char *s)
{
	free(*field);
	*field = xstrdup(s);
}

static void
mailbox_clear(struct conf_mailbox *m)
{
	char **strings[] = {&m->file,
			    &m->id,
			    &m->description,
			    &m->server,
			    &m->tls_ca_file,
			    &m->user,
			    &m->save_directory,
			    &m->oauth2.token_endpoint,
			    &m->oauth2.client_id,
			    &m->oauth2.scope,
			    &m->oauth2.refresh_token_file,
			    &m->oauth2.ca_file,
			    &m->smime.key_name};

	for (size_t i = 0; i < sizeof(strings) / sizeof(strings[0]); i++)
		free(*strings[i]);
	for (size_t i = 0; i < m->n_sasl_mechanisms; i++)
		free(m->sasl_mechanisms[i]);
	free(m->sasl_mechanisms);
	wipe_free(m->password);
	wipe_free(m->oauth2.client_secret);
	wipe_free(m->smime.key_password);
}

static void
mparse_free(struct mparse *mp)
{
	mailbox_clear(&mp->m);
	wipe_free(mp->pw.src);
	wipe_free(mp->cs.src);
	wipe_free(mp->kp.src);
	free(mp);
}

static void
dparse_clear(struct dparse *dp)
{
	free(dp->state_directory);
	free(dp->keystore_directory);
	free(dp->metrics_listen);
	free(dp->d.server);
	free(dp->d.user);
	free(dp->d.tls_ca_file);
	wipe_free(dp->d.pw.src);
	wipe_free(dp->d.password);
}

/* Best effort: scrub the scalars (inline secrets among them) before libyaml frees them. */
static void
wipe_document(yaml_document_t *doc)
{
	for (yaml_node_t *n = doc->nodes.start; n != NULL && n < doc->nodes.top; n++)
		if (n->type == YAML_SCALAR_NODE)
			explicit_bzero(n->data.scalar.value, n->data.scalar.length);
	yaml_document_delete(doc);
}

static void
wipe_parser(yaml_parser_t *p)
{
	if (p->buffer.start != NULL)
		explicit_bzero(p->buffer.start, (size_t)(p->buffer.end - p->buffer.start));
	if (p->raw_buffer.start != NULL)
		explicit_bzero(p->raw_buffer.start,
			       (size_t)(p->raw_buffer.end - p->raw_buffer.start));
	yaml_parser_delete(p);
}

/* ---- scalar values ---- */

static bool
is_null(const yaml_node_t *v)
{
	const char *s = (const char *)v->data.scalar.value;

	return v->data.scalar.length == 0 || (v->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
					      (!strcmp(s, "~") || !strcmp(s, "null") ||
					       !strcmp(s, "Null") || !strcmp(s, "NULL")));
}

/* The text of a non-empty scalar, or NULL after an error naming what was expected. */
static const char *
scalar(struct pctx *c, yaml_node_t *v, const char *path, const char *what)
{
	if (v->type != YAML_SCALAR_NODE)
		perr(c, v->start_mark, path, "expected %s, not a %s", what,
		     v->type == YAML_MAPPING_NODE ? "mapping" : "list");
	else if (is_null(v))
		perr(c, v->start_mark, path, "expected %s, the value is empty", what);
	else if (strlen((const char *)v->data.scalar.value) != v->data.scalar.length)
		perr(c, v->start_mark, path, "contains a NUL character");
	else
		return (const char *)v->data.scalar.value;
	return NULL;
}

static void *
field(struct pctx *c, const struct key *k)
{
	return (char *)c->base + k->off;
}

static int
parse_uint(const char *s, uint64_t *ret)
{
	char *end;
	unsigned long long v;

	if (!isdigit((unsigned char)*s))
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno != 0 || *end != '\0')
		return -EINVAL;
	*ret = v;
	return 0;
}

/* "sha256:" and 64 hex digits, either case, colons allowed between bytes. */
static int
parse_fingerprint(const char *s, unsigned char out[32])
{
	static const char hex[] = "0123456789abcdef";
	size_t n = 0;

	if (strncasecmp(s, "sha256:", 7) != 0)
		return -EINVAL;
	for (s += 7; *s != '\0'; s += 2) {
		if (n > 0 && *s == ':')
			s++;
		const char *hi = s[0] ? strchr(hex, tolower((unsigned char)s[0])) : NULL;
		const char *lo = hi && s[1] ? strchr(hex, tolower((unsigned char)s[1])) : NULL;
		if (lo == NULL || n == 32)
			return -EINVAL;
		out[n++] = (unsigned char)((hi - hex) << 4 | (lo - hex));
	}
	return n == 32 ? 0 : -EINVAL;
}

/* ---- key handlers ---- */

/* An optional check of a string value (the arg of h_str). */
struct check {
	bool (*ok)(const char *s);
	const char *msg;
};

static bool
is_absolute(const char *s)
{
	return s[0] == '/';
}

static bool
is_https(const char *s)
{
	return strncasecmp(s, "https://", 8) == 0 && s[8] != '\0';
}

static bool
is_id(const char *s)
{
	static const char ok[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-";
	size_t n = strlen(s);

	return n <= 64 && strspn(s, ok) == n && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

/* smime.key_name names KEYSTORE/NAME.p12: no way out of the keystore. */
static bool
is_key_name(const char *s)
{
	return strchr(s, '/') == NULL && s[0] != '.';
}

static const struct check absolute_check = {
	is_absolute,
	"must be an absolute path (a relative one would depend on the daemon's working directory)"};
static bool
is_one_line(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			return false;
	return true;
}

static const struct check one_line_check = {is_one_line, "must not contain control characters"};
static const struct check https_check = {is_https, "must be an https:// URL"};
static const struct check id_check = {
	is_id, "must be 1-64 characters of A-Z a-z 0-9 _ . - (and not . or ..)"};
static bool
is_listen(const char *s)
{
	char host[64];
	uint16_t port;

	return metrics_parse_listen(s, host, sizeof(host), &port) == 0;
}

static const struct check listen_check = {
	is_listen, "must be ADDRESS:PORT with an IP address and a port 1-65535, as 127.0.0.1:9100 "
		   "or [::1]:9100"};
static const struct check key_name_check = {
	is_key_name, "must be a name (of KEYSTORE/NAME.p12) without '/' or a leading '.'"};

static void
h_str(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const struct check *chk = k->arg;
	const char *s = scalar(c, v, path, "a string");

	if (s != NULL && chk != NULL && !chk->ok(s))
		perr(c, v->start_mark, path, "%s", chk->msg);
	else if (s != NULL)
		set_str(field(c, k), s);
}

/* Free text: an empty value is allowed (and means none). */
static void
h_text(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	if (v->type != YAML_SCALAR_NODE || !is_null(v))
		h_str(c, k, v, path);
}

static void
h_bool(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	static const char *const yes[] = {"true", "yes", "on"}, *const no[] = {"false", "no",
									       "off"};
	const char *s = scalar(c, v, path, "true or false");

	for (size_t i = 0; s != NULL && i < 3; i++) {
		if (strcasecmp(s, yes[i]) == 0 || strcasecmp(s, no[i]) == 0) {
			*(bool *)field(c, k) = strcasecmp(s, yes[i]) == 0;
			return;
		}
	}
	if (s != NULL)
		perr(c, v->start_mark, path, "expected true or false");
}

/* One of the NULL-terminated names in arg, stored as its index. */
static void
h_enum(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const char *const *names = k->arg;
	const char *s = scalar(c, v, path, "a name");
	char list[128] = "";

	if (s == NULL)
		return;
	for (int i = 0; names[i] != NULL; i++) {
		if (strcmp(s, names[i]) == 0) {
			*(int *)field(c, k) = i;
			return;
		}
		snprintf(list + strlen(list), sizeof(list) - strlen(list), "%s%s", i ? ", " : "",
			 names[i]);
	}
	perr(c, v->start_mark, path, "must be one of %s", list);
}

static void
h_loglevel(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const char *s = scalar(c, v, path, "a log level");
	int level = s ? log_level_from_name(s) : -1;

	if (s != NULL && level < 0)
		perr(c, v->start_mark, path, "must be one of debug, info, notice, warning, error");
	else if (s != NULL)
		*(int *)field(c, k) = level;
}

/* "K/N": two decimal numbers. */
static int
parse_fraction(const char *s, uint64_t *ret_k, uint64_t *ret_n)
{
	char *end;

	if (!isdigit((unsigned char)*s))
		return -EINVAL;
	errno = 0;
	*ret_k = strtoull(s, &end, 10);
	if (errno != 0 || *end != '/')
		return -EINVAL;
	return parse_uint(end + 1, ret_n);
}

/* shard: K/N with 1 <= K <= N <= CONF_MAX_SHARDS. */
static void
h_shard(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	struct dparse *dp = c->base;
	const char *s = scalar(c, v, path, "K/N");
	uint64_t shard, shards;

	(void)k;
	if (s == NULL)
		return;
	if (parse_fraction(s, &shard, &shards) < 0)
		perr(c, v->start_mark, path,
		     "expected K/N: this process's shard K of N (e.g. 1/2)");
	else if (shards < 1 || shards > CONF_MAX_SHARDS)
		perr(c, v->start_mark, path, "N must be between 1 and %d", CONF_MAX_SHARDS);
	else if (shard < 1 || shard > shards)
		perr(c, v->start_mark, path, "K must be between 1 and N (%llu)",
		     (unsigned long long)shards);
	else {
		dp->shard = (unsigned)shard;
		dp->shards = (unsigned)shards;
	}
}

/* A number, duration or size and its range (the arg of h_num). */
struct num {
	int (*parse)(const char *s, uint64_t *ret);
	uint64_t min, max;
	const char *syntax, *range;
	bool narrow; /* stored as unsigned, not uint64_t */
};

#define DURATION "a duration (90, 90s, 5m, 1h, 1d)"
static const struct num port_num = {parse_uint, 1, 65535, "a number", "between 1 and 65535", 1};
static const struct num sessions_num = {parse_uint, 1, 10000, "a number", "between 1 and 10000", 1};
static const struct num batch_num = {parse_uint, 1, 1000, "a number", "between 1 and 1000", 1};
static const struct num poll_num = {util_parse_duration, 1, 7 * 86400, DURATION,
				    "between 1s and 7d", 0};
static const struct num timeout_num = {util_parse_duration, 1, 3600, DURATION,
				       "between 1s and 1h", 0};
static const struct num size_num = {
	util_parse_size, 1, UINT64_MAX, "a size (1000, 512k, 25M, 1G)", "at least 1 byte", 0};

static void
h_num(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const struct num *r = k->arg;
	const char *s = scalar(c, v, path, r->syntax);
	uint64_t n;

	if (s == NULL)
		return;
	if (r->parse(s, &n) < 0)
		perr(c, v->start_mark, path, "expected %s", r->syntax);
	else if (n < r->min || n > r->max)
		perr(c, v->start_mark, path, "must be %s", r->range);
	else if (r->narrow)
		*(unsigned *)field(c, k) = (unsigned)n;
	else
		*(uint64_t *)field(c, k) = n;
}

static void
h_fingerprint(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	struct conf_mailbox *m = &((struct mparse *)c->base)->m;
	const char *s = scalar(c, v, path, "sha256:HEX");

	(void)k;
	if (s != NULL && parse_fingerprint(s, m->tls_fingerprint) < 0)
		perr(c, v->start_mark, path,
		     "must be sha256: and 64 hex digits (colons between bytes allowed)");
	else if (s != NULL)
		m->has_fingerprint = true;
}

static const char *
find_mechanism(const char *s)
{
	for (size_t i = 0; conf_default_sasl_mechanisms[i] != NULL; i++)
		if (strcasecmp(s, conf_default_sasl_mechanisms[i]) == 0)
			return conf_default_sasl_mechanisms[i];
	return NULL;
}

static void
h_mechanisms(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	struct conf_mailbox *m = &((struct mparse *)c->base)->m;
	yaml_node_item_t *it;
	size_t n;

	(void)k;
	if (v->type != YAML_SEQUENCE_NODE) {
		perr(c, v->start_mark, path, "expected a list of mechanism names");
		return;
	}
	n = (size_t)(v->data.sequence.items.top - v->data.sequence.items.start);
	if (n == 0) {
		perr(c, v->start_mark, path, "must not be empty (leave it out for the default)");
		return;
	}
	m->sasl_mechanisms = xcalloc(n + 1, sizeof(char *));
	for (it = v->data.sequence.items.start; it < v->data.sequence.items.top; it++) {
		yaml_node_t *item = yaml_document_get_node(c->doc, *it);
		const char *s = scalar(c, item, path, "a mechanism name");
		const char *name = s ? find_mechanism(s) : NULL;
		bool dup = false;

		if (s != NULL && name == NULL)
			perr(c, item->start_mark, path,
			     "unknown mechanism (known: SCRAM-SHA-256-PLUS, SCRAM-SHA-256, "
			     "SCRAM-SHA-1, CRAM-MD5, APOP, PLAIN, LOGIN, USER)");
		for (size_t i = 0; name != NULL && i < m->n_sasl_mechanisms; i++)
			dup = dup || strcmp(m->sasl_mechanisms[i], name) == 0;
		if (dup)
			perr(c, item->start_mark, path, "%s is listed twice", name);
		else if (name != NULL)
			m->sasl_mechanisms[m->n_sasl_mechanisms++] = xstrdup(name);
	}
}

/* password, password_file or password_credential (and the like): arg is the
 * base name, the suffix of the key tells the kind. */
static void
h_secret(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	struct secret *sec = field(c, k);
	const char *base = k->arg, *suffix = k->name + strlen(base);
	enum secret_kind kind = !strcmp(suffix, "_file")	 ? SEC_FILE
				: !strcmp(suffix, "_credential") ? SEC_CRED
								 : SEC_INLINE;
	const char *s = scalar(c, v, path, kind == SEC_FILE ? "a path" : "a string");

	sec->tried = true;
	if (s == NULL)
		return;
	if (sec->kind != SEC_NONE) {
		perr(c, v->start_mark, path, "only one of %s, %s_file and %s_credential may be set",
		     base, base, base);
		return;
	}
	if (kind == SEC_CRED && (strchr(s, '/') || !strcmp(s, ".") || !strcmp(s, ".."))) {
		perr(c, v->start_mark, path, "must be a credential name, without '/'");
		return;
	}
	if (kind == SEC_INLINE && (c->mode & (S_IRGRP | S_IROTH)) != 0)
		perr(c, v->start_mark, path,
		     "%s holds this secret inline and is readable by group or others (chmod 600)",
		     c->file);
	sec->kind = kind;
	sec->src = xstrdup(s);
	sec->mark = v->start_mark;
	snprintf(sec->path, sizeof(sec->path), "%s", path);
}

static void walk_map(struct pctx *c, yaml_node_t *map, const struct key *keys, const char *prefix);

/* A nested mapping (oauth2:, smime:, timeouts:, defaults:); empty is fine. */
static void
h_map(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	char prefix[KEY_PATH_MAX];

	if (v->type == YAML_SCALAR_NODE && is_null(v))
		return;
	if (v->type != YAML_MAPPING_NODE) {
		perr(c, v->start_mark, path, "expected a mapping of keys");
		return;
	}
	snprintf(prefix, sizeof(prefix), "%s.", path);
	walk_map(c, v, k->arg, prefix);
}

/* ---- key tables ---- */

#define M(f) offsetof(struct mparse, f)
#define D(f) offsetof(struct dparse, f)

static const struct key oauth2_keys[] = {
	{"token_endpoint", h_str, M(m.oauth2.token_endpoint), &https_check},
	{"client_id", h_str, M(m.oauth2.client_id), NULL},
	{"client_secret", h_secret, M(cs), "client_secret"},
	{"client_secret_file", h_secret, M(cs), "client_secret"},
	{"client_secret_credential", h_secret, M(cs), "client_secret"},
	{"scope", h_str, M(m.oauth2.scope), NULL},
	{"grant", h_enum, M(grant), grant_names},
	{"refresh_token_file", h_str, M(m.oauth2.refresh_token_file), NULL},
	{"mechanism", h_enum, M(mech), mech_names},
	{"ca_file", h_str, M(m.oauth2.ca_file), NULL},
	{NULL, NULL, 0, NULL},
};

static const struct key smime_keys[] = {
	{"key_name", h_str, M(m.smime.key_name), &key_name_check},
	{"key_password", h_secret, M(kp), "key_password"},
	{"key_password_file", h_secret, M(kp), "key_password"},
	{"key_password_credential", h_secret, M(kp), "key_password"},
	{NULL, NULL, 0, NULL},
};

static const struct key timeout_keys[] = {
	{"connect", h_num, M(m.connect_timeout), &timeout_num},
	{"command", h_num, M(m.command_timeout), &timeout_num},
	{NULL, NULL, 0, NULL},
};

static const struct key mailbox_keys[] = {
	{"id", h_str, M(m.id), &id_check},
	{"description", h_text, M(m.description), NULL},
	{"status", h_enum, M(status), status_names},
	{"server", h_str, M(m.server), NULL},
	{"port", h_num, M(port), &port_num},
	{"tls", h_enum, M(tls), tls_names},
	{"tls_ca_file", h_str, M(m.tls_ca_file), NULL},
	{"tls_fingerprint", h_fingerprint, 0, NULL},
	{"tls_verify", h_bool, M(m.tls_verify), NULL},
	{"user", h_str, M(m.user), &one_line_check},
	{"password", h_secret, M(pw), "password"},
	{"password_file", h_secret, M(pw), "password"},
	{"password_credential", h_secret, M(pw), "password"},
	{"auth", h_enum, M(auth), auth_names},
	{"sasl_mechanisms", h_mechanisms, 0, NULL},
	{"oauth2", h_map, 0, oauth2_keys},
	{"smime", h_map, 0, smime_keys},
	{"save_text", h_bool, M(m.save_text), NULL},
	{"save_attachments", h_bool, M(m.save_attachments), NULL},
	{"save_directory", h_str, M(m.save_directory), &absolute_check},
	{"remove_after_read", h_bool, M(m.remove_after_read), NULL},
	{"receive", h_enum, M(receive), receive_names},
	{"poll_interval", h_num, M(m.poll_interval), &poll_num},
	{"max_message_size", h_num, M(m.max_message_size), &size_num},
	{"max_decoded_size", h_num, M(m.max_decoded_size), &size_num},
	{"timeouts", h_map, 0, timeout_keys},
	{NULL, NULL, 0, NULL},
};

static const struct key defaults_keys[] = {
	{"server", h_str, D(d.server), NULL},
	{"port", h_num, D(d.port), &port_num},
	{"tls", h_enum, D(d.tls), tls_names},
	{"user", h_str, D(d.user), &one_line_check},
	{"password", h_secret, D(d.pw), "password"},
	{"password_file", h_secret, D(d.pw), "password"},
	{"password_credential", h_secret, D(d.pw), "password"},
	{"tls_ca_file", h_str, D(d.tls_ca_file), NULL},
	{NULL, NULL, 0, NULL},
};

static const struct key daemon_keys[] = {
	{"state_directory", h_str, D(state_directory), &absolute_check},
	{"keystore_directory", h_str, D(keystore_directory), &absolute_check},
	{"max_sessions", h_num, D(max_sessions), &sessions_num},
	{"commit_batch", h_num, D(commit_batch), &batch_num},
	{"commit_interval", h_num, D(commit_interval), &timeout_num},
	{"stop_timeout", h_num, D(stop_timeout), &timeout_num},
	{"log_level", h_loglevel, D(log_level), NULL},
	{"shard", h_shard, 0, NULL},
	{"metrics_listen", h_str, D(metrics_listen), &listen_check},
	{"defaults", h_map, 0, defaults_keys},
	{NULL, NULL, 0, NULL},
};

/* ---- walking a mapping ---- */

/* The value of the first key name[0..n) among the pairs of map before end, or NULL. */
static yaml_node_t *
map_get(struct pctx *c, yaml_node_t *map, const char *name, size_t n, yaml_node_pair_t *end)
{
	for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < end; p++) {
		yaml_node_t *k = yaml_document_get_node(c->doc, p->key);
		if (k->type == YAML_SCALAR_NODE && k->data.scalar.length == n &&
		    memcmp(k->data.scalar.value, name, n) == 0)
			return yaml_document_get_node(c->doc, p->value);
	}
	return NULL;
}

/* The value of a dotted key ("oauth2.scope") of the file, or NULL. */
static yaml_node_t *
lookup(struct pctx *c, const char *path)
{
	yaml_node_t *v = c->root;

	for (;;) {
		size_t n = strcspn(path, ".");
		if (v == NULL || v->type != YAML_MAPPING_NODE)
			return NULL;
		v = map_get(c, v, path, n, v->data.mapping.pairs.top);
		if (path[n] == '\0')
			return v;
		path += n + 1;
	}
}

static void
walk_map(struct pctx *c, yaml_node_t *map, const struct key *keys, const char *prefix)
{
	for (yaml_node_pair_t *p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top;
	     p++) {
		yaml_node_t *kn = yaml_document_get_node(c->doc, p->key);
		char path[KEY_PATH_MAX], buf[64];
		const struct key *k;
		const char *name;

		if (kn->type != YAML_SCALAR_NODE) {
			snprintf(path, sizeof(path), "%s(key)", prefix);
			perr(c, kn->start_mark, path, "keys must be plain names");
			continue;
		}
		name = (const char *)kn->data.scalar.value;
		snprintf(path, sizeof(path), "%s%s", prefix,
			 util_printable(name, strlen(name), buf, sizeof(buf)));
		for (k = keys; k->name != NULL && strcmp(k->name, name) != 0; k++)
			;
		if (map_get(c, map, name, kn->data.scalar.length, p) != NULL)
			perr(c, kn->start_mark, path, "duplicate key");
		else if (k->name == NULL)
			perr(c, kn->start_mark, path, "unknown key");
		else
			k->fn(c, k, yaml_document_get_node(c->doc, p->value), path);
	}
}

/* ---- files ---- */

static char *
join(const char *dir, const char *name)
{
	size_t n = strlen(dir);

	return xasprintf("%s%s%s", dir, n > 0 && dir[n - 1] == '/' ? "" : "/", name);
}

/* The whole file, NUL-terminated; NULL when absent and optional or after an error. */
static char *
read_file(struct loader *l, const char *file, bool optional, size_t *ret_len, mode_t *ret_mode)
{
	struct stat st = {0};
	char *buf;
	size_t len = 0;
	ssize_t r = 0;
	int fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY);

	if (fd < 0) {
		if (errno != ENOENT || !optional)
			add_error(l->errs, file, mark_start, "(file)", "cannot open: %s",
				  strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size > MAX_FILE_SIZE) {
		add_error(l->errs, file, mark_start, "(file)", "%s",
			  st.st_size > MAX_FILE_SIZE ? "larger than 1 MiB" : "not a regular file");
		close(fd);
		return NULL;
	}
	buf = xmalloc((size_t)st.st_size + 1);
	while (len < (size_t)st.st_size && (r = read(fd, buf + len, (size_t)st.st_size - len)) > 0)
		len += (size_t)r;
	close(fd);
	if (r < 0) {
		add_error(l->errs, file, mark_start, "(file)", "cannot read: %s", strerror(errno));
		explicit_bzero(buf, len);
		free(buf);
		return NULL;
	}
	buf[len] = '\0';
	*ret_len = len;
	*ret_mode = st.st_mode;
	return buf;
}

static void
syntax_error(struct loader *l, const char *file, yaml_parser_t *p)
{
	add_error(l->errs, file, p->problem_mark, "(syntax)", "%s",
		  p->problem ? p->problem : "invalid YAML");
}

/* Parse exactly one YAML document. 0 on success (doc to be deleted), -1 on error. */
static int
parse_yaml(struct loader *l, const char *file, const char *buf, size_t len, yaml_document_t *doc)
{
	yaml_parser_t p;
	yaml_document_t extra;
	yaml_node_t *root;
	int rc = 0;

	if (!yaml_parser_initialize(&p)) {
		add_error(l->errs, file, mark_start, "(file)", "out of memory");
		return -1;
	}
	yaml_parser_set_input_string(&p, (const unsigned char *)buf, len);
	if (!yaml_parser_load(&p, doc)) {
		syntax_error(l, file, &p);
		rc = -1;
	} else if (yaml_document_get_root_node(doc) != NULL) {
		if (!yaml_parser_load(&p, &extra)) {
			syntax_error(l, file, &p);
			rc = -1;
		} else {
			if ((root = yaml_document_get_root_node(&extra)) != NULL) {
				add_error(l->errs, file, root->start_mark, "(document)",
					  "only one YAML document per file");
				rc = -1;
			}
			wipe_document(&extra);
		}
		if (rc < 0)
			wipe_document(doc);
	}
	wipe_parser(&p);
	return rc;
}

/* Read and parse a file, then hand it to fn. */
static void
load_file(struct loader *l, const char *file, bool optional, void *base, void (*fn)(struct pctx *c))
{
	yaml_document_t doc;
	struct pctx c = {.l = l, .file = file, .doc = &doc, .base = base};
	size_t len;
	char *buf = read_file(l, file, optional, &len, &c.mode);

	if (buf == NULL)
		return;
	if (parse_yaml(l, file, buf, len, &doc) == 0) {
		c.root = yaml_document_get_root_node(&doc);
		fn(&c);
		wipe_document(&doc);
	}
	explicit_bzero(buf, len);
	free(buf);
}

/* ---- secrets ---- */

/* The first line of an open secret file, or NULL after an error. */
static char *
first_line(struct pctx *c, const struct secret *sec, int fd, const char *name)
{
	char buf[MAX_SECRET_LINE + 1], *nl, *ret = NULL;
	size_t len = 0;
	ssize_t r = 0;

	while (len < MAX_SECRET_LINE && (r = read(fd, buf + len, MAX_SECRET_LINE - len)) > 0)
		len += (size_t)r;
	nl = memchr(buf, '\n', len);
	if (r < 0) {
		perr(c, sec->mark, sec->path, "cannot read %s: %s", name, strerror(errno));
	} else if (nl == NULL && len == MAX_SECRET_LINE) {
		perr(c, sec->mark, sec->path, "the first line of %s is too long", name);
	} else {
		len = nl ? (size_t)(nl - buf) : len;
		len -= len > 0 && buf[len - 1] == '\r';
		buf[len] = '\0';
		if (len == 0 || memchr(buf, '\0', len) != NULL)
			perr(c, sec->mark, sec->path,
			     "the first line of %s is empty or holds a NUL", name);
		else
			ret = xstrdup(buf);
	}
	explicit_bzero(buf, sizeof(buf));
	return ret;
}

/* A secret file: it must not be readable by others (check_others), unlike a
 * systemd credential, which systemd keeps safe. */
static char *
read_secret_file(struct pctx *c, const struct secret *sec, const char *file, bool check_others)
{
	char name[256], *ret = NULL;
	struct stat st;
	int fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY);

	util_printable(file, strlen(file), name, sizeof(name));
	if (fd < 0) {
		perr(c, sec->mark, sec->path, "cannot open %s: %s", name, strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
		perr(c, sec->mark, sec->path, "%s is not a regular file", name);
	else if (check_others && (st.st_mode & S_IROTH) != 0)
		perr(c, sec->mark, sec->path, "%s is readable by others (chmod 600)", name);
	else
		ret = first_line(c, sec, fd, name);
	close(fd);
	return ret;
}

/* A secret goes into a protocol line: a line break in it would send more. */
static char *
one_line_secret(struct pctx *c, const struct secret *sec, char *value)
{
	if (value != NULL && strpbrk(value, "\r\n") != NULL) {
		perr(c, sec->mark, sec->path, "must not contain a line break");
		wipe_free(value);
		return NULL;
	}
	return value;
}

static char *load_secret_value(struct pctx *c, const struct secret *sec);

/* The secret itself (to be wiped by the caller), or NULL when none or after an error. */
static char *
load_secret(struct pctx *c, const struct secret *sec)
{
	return one_line_secret(c, sec, load_secret_value(c, sec));
}

static char *
load_secret_value(struct pctx *c, const struct secret *sec)
{
	const char *credentials = getenv("CREDENTIALS_DIRECTORY");
	char *file, *ret;

	if (sec->kind == SEC_INLINE)
		return xstrdup(sec->src);
	if (sec->kind == SEC_FILE)
		return read_secret_file(c, sec, sec->src, true);
	if (sec->kind != SEC_CRED)
		return NULL;
	if (credentials == NULL || credentials[0] == '\0') {
		perr(c, sec->mark, sec->path,
		     "$CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit)");
		return NULL;
	}
	file = join(credentials, sec->src);
	ret = read_secret_file(c, sec, file, false);
	free(file);
	return ret;
}

/* ---- popfetchd.yaml ---- */

static void
daemon_root(struct pctx *c)
{
	struct dparse *dp = c->base;

	if (c->root == NULL)
		return;
	if (c->root->type != YAML_MAPPING_NODE) {
		perr(c, c->root->start_mark, "(top level)",
		     "expected a mapping of daemon settings");
		return;
	}
	walk_map(c, c->root, daemon_keys, "");
	if (!c->l->no_secrets)
		dp->d.password = load_secret(c, &dp->d.pw);
}

/* ---- a configuration ---- */

/* A required key is missing (and not merely invalid, which was reported). */
static void
require(struct pctx *c, const void *value, const char *path, const char *msg)
{
	if (value == NULL && lookup(c, path) == NULL)
		perr(c, c->root->start_mark, path, "%s", msg);
}

static void
fallback(char **field, const char *dflt)
{
	if (*field == NULL && dflt != NULL)
		*field = xstrdup(dflt);
}

static void
finish_oauth2(struct pctx *c, struct mparse *mp)
{
	struct conf_mailbox *m = &mp->m;

	require(c, m->oauth2.token_endpoint, "oauth2.token_endpoint", "required for auth: oauth2");
	require(c, m->oauth2.client_id, "oauth2.client_id", "required for auth: oauth2");
	if (m->oauth2.grant == CONF_GRANT_REFRESH_TOKEN) {
		require(c, m->oauth2.refresh_token_file, "oauth2.refresh_token_file",
			"required for grant refresh_token");
		return;
	}
	if (!mp->cs.tried)
		perr(c, c->root->start_mark, "oauth2.client_secret",
		     "required for grant client_credentials (client_secret, client_secret_file or "
		     "client_secret_credential)");
	require(c, m->oauth2.scope, "oauth2.scope", "required for grant client_credentials");
}

/* A PKCS#12 key readable by others is refused like a secret file. A missing
 * one is not a configuration error: its messages are saved undecrypted. */
static void
check_key_file(struct pctx *c, const char *name)
{
	const char *ks = c->l->dp.keystore_directory;
	char *dir = ks ? xstrdup(ks) : join(c->l->dir, "keys");
	char *file = xasprintf("%s/%s.p12", dir, name), clean_name[256];
	yaml_node_t *v = lookup(c, "smime.key_name");
	struct stat st;

	util_printable(file, strlen(file), clean_name, sizeof(clean_name));
	if (stat(file, &st) == 0 && (st.st_mode & S_IROTH) != 0)
		perr(c, v ? v->start_mark : mark_start, "smime.key_name",
		     "%s is readable by others (chmod 600)", clean_name);
	free(file);
	free(dir);
}

static void
finish_mailbox(struct pctx *c, struct mparse *mp)
{
	struct conf_mailbox *m = &mp->m;
	const struct defaults *d = &c->l->dp.d;

	require(c, m->id, "id", "required");
	fallback(&m->server, d->server);
	require(c, m->server, "server", "required (here or in popfetchd.yaml defaults)");
	fallback(&m->user, d->user);
	require(c, m->user, "user", "required (here or in popfetchd.yaml defaults)");
	fallback(&m->tls_ca_file, d->tls_ca_file);
	m->tls = (enum conf_tls)(mp->tls >= 0 ? mp->tls : d->tls >= 0 ? d->tls : 0);
	if (mp->port == 0)
		mp->port = d->port ? d->port : m->tls == CONF_TLS_IMPLICIT ? 995 : 110;
	m->port = (uint16_t)mp->port;
	m->active = mp->status == 0;
	m->auth = (enum conf_auth)mp->auth;
	m->oauth2.grant = (enum conf_grant)mp->grant;
	m->oauth2.mechanism = (enum conf_oauth_mech)mp->mech;
	m->receive = (enum conf_receive)mp->receive;

	m->password = load_secret(c, &mp->pw);
	m->oauth2.client_secret = load_secret(c, &mp->cs);
	m->smime.key_password = load_secret(c, &mp->kp);
	if (m->auth == CONF_AUTH_SASL && !mp->pw.tried) {
		if (d->password != NULL)
			m->password = xstrdup(d->password);
		else if (!d->pw.tried)
			perr(c, c->root->start_mark, "password",
			     "required for auth: sasl (password, password_file or "
			     "password_credential, here or in popfetchd.yaml defaults)");
	}
	if (m->auth == CONF_AUTH_OAUTH2)
		finish_oauth2(c, mp);
	if (mp->kp.kind != SEC_NONE && m->smime.key_name == NULL)
		perr(c, mp->kp.mark, mp->kp.path, "has no effect without smime.key_name");
	if (m->smime.key_name != NULL)
		check_key_file(c, m->smime.key_name);
	if (m->save_text || m->save_attachments)
		require(c, m->save_directory, "save_directory",
			"required when save_text or save_attachments is true");
}

static void
mailbox_root(struct pctx *c)
{
	struct mparse *mp = c->base;
	yaml_node_t *id;

	if (c->root == NULL || c->root->type != YAML_MAPPING_NODE) {
		perr(c, c->root ? c->root->start_mark : mark_start, "(top level)",
		     "expected a mapping of configuration keys");
		return;
	}
	walk_map(c, c->root, mailbox_keys, "");
	finish_mailbox(c, mp);
	if ((id = lookup(c, "id")) != NULL)
		mp->id_mark = id->start_mark;
}

static void
load_mailbox(struct loader *l, const char *file)
{
	struct mparse *mp = xmalloc(sizeof(*mp));

	*mp = mparse_defaults;
	mp->m.file = xstrdup(file);
	mp->order = l->n_mbx;
	load_file(l, file, false, mp, mailbox_root);
	if (mp->m.id == NULL) { /* invalid, and nothing to check duplicates against */
		mparse_free(mp);
		return;
	}
	if (l->n_mbx == l->cap_mbx) {
		l->cap_mbx = l->cap_mbx ? 2 * l->cap_mbx : 16;
		l->mbx = xrealloc(l->mbx, l->cap_mbx * sizeof(*l->mbx));
	}
	l->mbx[l->n_mbx++] = mp;
}

/* *.yaml and *.yml, as a shell glob would list them (no dot files). */
static int
yaml_name(const struct dirent *de)
{
	const char *dot = strrchr(de->d_name, '.');

	return de->d_name[0] != '.' && dot != NULL &&
	       (!strcmp(dot, ".yaml") || !strcmp(dot, ".yml"));
}

static int
by_name(const struct dirent **a, const struct dirent **b)
{
	return strcmp((*a)->d_name, (*b)->d_name);
}

static void
load_confd(struct loader *l)
{
	char *confd = join(l->dir, "conf.d");
	struct dirent **names;
	int n = scandir(confd, &names, yaml_name, by_name);

	if (n < 0 && errno != ENOENT)
		add_error(l->errs, confd, mark_start, "(directory)", "cannot read: %s",
			  strerror(errno));
	for (int i = 0; i < n; i++) {
		char *file = join(confd, names[i]->d_name);
		load_mailbox(l, file);
		free(file);
		free(names[i]);
	}
	if (n >= 0)
		free(names);
	free(confd);
}

static int
by_id(const void *a, const void *b)
{
	const struct mparse *x = *(struct mparse *const *)a, *y = *(struct mparse *const *)b;
	int r = strcmp(x->m.id, y->m.id);

	return r != 0 ? r : (x->order > y->order) - (x->order < y->order);
}

/* Sort by id; a repeated id is an error in the later file. */
static void
check_duplicates(struct loader *l)
{
	size_t first = 0;

	if (l->n_mbx > 1)
		qsort(l->mbx, l->n_mbx, sizeof(*l->mbx), by_id);
	for (size_t i = 1; i < l->n_mbx; i++) {
		if (strcmp(l->mbx[i]->m.id, l->mbx[first]->m.id) != 0)
			first = i;
		else
			add_error(l->errs, l->mbx[i]->m.file, l->mbx[i]->id_mark, "id",
				  "duplicate id \"%s\", already used in %s", l->mbx[i]->m.id,
				  l->mbx[first]->m.file);
	}
}

/* ---- the set ---- */

static char *
state_directory_of(const struct dparse *dp)
{
	const char *env = getenv("STATE_DIRECTORY");

	if (dp->state_directory != NULL)
		return xstrdup(dp->state_directory);
	if (env != NULL && env[0] != '\0' && env[0] != ':') /* colon-separated when several */
		return xasprintf("%.*s", (int)strcspn(env, ":"), env);
	return xstrdup("/var/lib/popfetchd");
}

static struct conf_set *
build_set(struct loader *l)
{
	struct conf_set *set = xcalloc(1, sizeof(*set));
	struct dparse *dp = &l->dp;

	set->dir = xstrdup(l->dir);
	set->state_directory = state_directory_of(dp);
	set->keystore_directory =
		dp->keystore_directory ? xstrdup(dp->keystore_directory) : join(l->dir, "keys");
	set->max_sessions = dp->max_sessions ? dp->max_sessions : 64;
	set->stop_timeout = dp->stop_timeout ? (unsigned)dp->stop_timeout : 60;
	set->commit_batch = dp->commit_batch ? dp->commit_batch : 64;
	set->commit_interval = dp->commit_interval ? (unsigned)dp->commit_interval : 1;
	set->shard = dp->shards ? dp->shard : 1;
	set->shards = dp->shards ? dp->shards : 1;
	set->log_level_set = dp->log_level >= 0;
	set->log_level = set->log_level_set ? dp->log_level : LOG_LVL_INFO;
	set->metrics_listen = dp->metrics_listen ? xstrdup(dp->metrics_listen) : NULL;
	set->mailboxes = xcalloc(l->n_mbx, sizeof(*set->mailboxes));
	for (size_t i = 0; i < l->n_mbx; i++) {
		struct conf_mailbox *m = xmalloc(sizeof(*m));
		*m = l->mbx[i]->m; /* moves the fields */
		memset(&l->mbx[i]->m, 0, sizeof(*m));
		set->mailboxes[set->n_mailboxes++] = m;
	}
	return set;
}

int
conf_load(const char *dir, struct conf_set **ret, struct conf_errors *errs)
{
	struct loader l = {.dir = dir, .errs = errs, .dp = {.log_level = -1, .d = {.tls = -1}}};
	size_t before = errs->n;
	struct stat st;
	char *file;
	int r = stat(dir, &st);

	if (r == 0 && !S_ISDIR(st.st_mode))
		errno = ENOTDIR;
	if (r < 0 || !S_ISDIR(st.st_mode)) {
		add_error(errs, dir, mark_start, "(directory)", "cannot open: %s", strerror(errno));
		return -EINVAL;
	}
	file = join(dir, "popfetchd.yaml");
	load_file(&l, file, true, &l.dp, daemon_root);
	free(file);
	load_confd(&l);
	check_duplicates(&l);
	if (errs->n == before)
		*ret = build_set(&l);
	for (size_t i = 0; i < l.n_mbx; i++)
		mparse_free(l.mbx[i]);
	free(l.mbx);
	dparse_clear(&l.dp);
	return errs->n == before ? 0 : -EINVAL;
}

int
conf_state_directory(const char *dir, char **ret, struct conf_errors *errs)
{
	struct loader l = {.dir = dir,
			   .errs = errs,
			   .no_secrets = true,
			   .dp = {.log_level = -1, .d = {.tls = -1}}};
	size_t before = errs->n;
	char *file = join(dir, "popfetchd.yaml");

	load_file(&l, file, true, &l.dp, daemon_root);
	free(file);
	if (errs->n == before)
		*ret = state_directory_of(&l.dp);
	dparse_clear(&l.dp);
	return errs->n == before ? 0 : -EINVAL;
}

void
conf_set_free(struct conf_set *set)
{
	if (set == NULL)
		return;
	for (size_t i = 0; i < set->n_mailboxes; i++) {
		mailbox_clear(set->mailboxes[i]);
		free(set->mailboxes[i]);
	}
	FREE_ALL(set->mailboxes, set->dir, set->state_directory, set->keystore_directory,
		 set->metrics_listen, set);
}

void
conf_errors_clear(struct conf_errors *errs)
{
	for (size_t i = 0; i < errs->n; i++)
		free(errs->lines[i]);
	free(errs->lines);
	errs->lines = NULL;
	errs->n = 0;
}

static int
find_cmp(const void *key, const void *elem)
{
	return strcmp(key, (*(struct conf_mailbox *const *)elem)->id);
}

const struct conf_mailbox *
conf_find(const struct conf_set *set, const char *id)
{
	struct conf_mailbox **m;

	if (set == NULL || id == NULL || set->n_mailboxes == 0)
		return NULL;
	m = bsearch(id, set->mailboxes, set->n_mailboxes, sizeof(*m), find_cmp);
	return m ? *m : NULL;
}

/* FNV-1a, 64 bits: fixed by its definition, the same on every host, build
 * and release (never seeded), and spreading similar ids apart. */
uint64_t
conf_shard_hash(const char *id)
{
	uint64_t h = 0xcbf29ce484222325ULL;

	for (const unsigned char *p = (const unsigned char *)id; *p != '\0'; p++) {
		h ^= *p;
		h *= 0x100000001b3ULL;
	}
	return h;
}

unsigned
conf_shard_of(const char *id, unsigned shards)
{
	return shards <= 1 ? 1 : (unsigned)(conf_shard_hash(id) % shards) + 1;
}

bool
conf_in_shard(const struct conf_set *set, const char *id)
{
	return conf_shard_of(id, set->shards) == set->shard;
}

const char *
conf_tls_name(enum conf_tls tls)
{
	return (unsigned)tls <= CONF_TLS_NONE ? tls_names[tls] : "?";
}

const char *
conf_auth_name(enum conf_auth auth)
{
	return (unsigned)auth <= CONF_AUTH_OAUTH2 ? auth_names[auth] : "?";
}
