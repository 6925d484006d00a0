/*
 * config — the YAML configuration directory turned into a validated,
 * immutable configuration set (DESIGN.md §1).
 *
 * Each file is loaded with libyaml's document API (for the node marks) and
 * walked with key tables: a key names a handler that checks the value node
 * and stores it at an offset of the struct being filled. Every error of
 * every file is collected as "FILE:LINE:COL: KEY: message"; secret values
 * never appear in one.
 */
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
#include "popfetchd/util.h"

#define MAX_FILE_SIZE   (1024 * 1024) /* a configuration file larger than this is an error */
#define MAX_SECRET_LINE 8192          /* the first line of a secret file */
#define KEY_PATH_MAX    160

const char *const conf_default_sasl_mechanisms[] = {
	"SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5",
	"APOP",               "PLAIN",         "LOGIN",       "USER",
	NULL,
};

static const char *const status_names[] = {"active", "inactive", NULL};
static const char *const tls_names[] = {"implicit", "explicit", "none", NULL};
static const char *const auth_names[] = {"sasl", "oauth2", NULL};
static const char *const grant_names[] = {"client_credentials", "refresh_token", NULL};
static const char *const mech_names[] = {"XOAUTH2", "OAUTHBEARER", NULL};
static const char *const receive_names[] = {"all", "one", NULL};

struct range {
	uint64_t min, max;
	const char *text;
};

static const struct range port_range = {1, 65535, "between 1 and 65535"};
static const struct range sessions_range = {1, 10000, "between 1 and 10000"};
static const struct range poll_range = {1, 7 * 86400, "between 1s and 7d"};
static const struct range timeout_range = {1, 3600, "between 1s and 1h"};
static const struct range size_range = {1, UINT64_MAX, "at least 1 byte"};

/* One secret, as written: inline, from a file or from a systemd credential. */
enum secret_kind { SEC_NONE, SEC_INLINE, SEC_FILE, SEC_CRED };

struct secret {
	enum secret_kind kind;
	char *src;   /* the inline value, the path or the credential name */
	char *value; /* the loaded secret */
	yaml_mark_t mark;
	char path[KEY_PATH_MAX]; /* the dotted key that set it */
};

/* popfetchd.yaml, as parsed. */
struct defaults {
	char *server, *user, *tls_ca_file;
	unsigned port; /* 0: unset */
	int tls;       /* -1: unset */
	struct secret pw;
};

struct dparse {
	char *state_directory, *keystore_directory;
	unsigned max_sessions; /* 0: unset */
	int log_level;         /* -1: unset */
	struct defaults d;
};

/* One configuration file, as parsed; m is copied out when all is valid. */
struct mparse {
	struct conf_mailbox m;
	int status, tls, auth, grant, mech, receive; /* indexes into the name tables; tls -1: unset */
	unsigned port;                               /* 0: unset */
	struct secret pw, cs, kp;
	yaml_mark_t id_mark;
	size_t order; /* file order, for duplicate ids */
};

struct loader {
	const char *dir;
	struct conf_errors *errs;
	struct dparse dp;
	struct mparse **mbx;
	size_t n_mbx, cap_mbx;
};

/* The state of one file's walk. */
struct pctx {
	struct loader *l;
	const char *file;
	yaml_document_t *doc;
	void *base; /* struct dparse or struct mparse */
	mode_t mode;
};

struct key;
typedef void key_fn(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path);

struct key {
	const char *name;
	key_fn *fn;
	size_t off;
	const void *arg;
};

/* ---- errors ---- */

/* s with control characters replaced, truncated to fit buf. */
static const char *
clean(char *buf, size_t size, const char *s)
{
	size_t i = 0;

	for (; s[i] != '\0' && i + 1 < size; i++)
		buf[i] = ((unsigned char)s[i] < 0x20 || s[i] == 0x7f) ? '?' : s[i];
	buf[i] = '\0';
	return buf;
}

static void
add_error(struct conf_errors *errs, const char *file, yaml_mark_t mark, const char *key,
	  const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void
add_error(struct conf_errors *errs, const char *file, yaml_mark_t mark, const char *key,
	  const char *fmt, ...)
{
	char fbuf[1024], *msg;
	va_list ap;

	va_start(ap, fmt);
	if (vasprintf(&msg, fmt, ap) < 0)
		msg = NULL;
	va_end(ap);
	errs->lines = xrealloc(errs->lines, (errs->n + 1) * sizeof(char *));
	errs->lines[errs->n++] = xasprintf("%s:%zu:%zu: %s: %s", clean(fbuf, sizeof(fbuf), file),
					   mark.line + 1, mark.column + 1, key,
					   msg ? msg : "(out of memory)");
	free(msg);
}

#define perr(c, mark, key, ...) add_error((c)->l->errs, (c)->file, (mark), (key), __VA_ARGS__)

static const yaml_mark_t mark_start; /* 1:1, for errors about a whole file */

/* ---- memory ---- */

static void
wipe_free(char *p)
{
	if (p != NULL) {
		explicit_bzero(p, strlen(p));
		free(p);
	}
}

static void
secret_clear(struct secret *s)
{
	wipe_free(s->src);
	wipe_free(s->value);
	s->src = s->value = NULL;
	s->kind = SEC_NONE;
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
	free(m->file);
	free(m->id);
	free(m->description);
	free(m->server);
	free(m->tls_ca_file);
	free(m->user);
	wipe_free(m->password);
	for (size_t i = 0; i < m->n_sasl_mechanisms; i++)
		free(m->sasl_mechanisms[i]);
	free(m->sasl_mechanisms);
	free(m->oauth2.token_endpoint);
	free(m->oauth2.client_id);
	wipe_free(m->oauth2.client_secret);
	free(m->oauth2.scope);
	free(m->oauth2.refresh_token_file);
	free(m->oauth2.ca_file);
	free(m->smime.key_name);
	wipe_free(m->smime.key_password);
	free(m->save_directory);
}

static void
mparse_free(struct mparse *mp)
{
	if (mp == NULL)
		return;
	mailbox_clear(&mp->m);
	secret_clear(&mp->pw);
	secret_clear(&mp->cs);
	secret_clear(&mp->kp);
	free(mp);
}

static void
dparse_clear(struct dparse *dp)
{
	free(dp->state_directory);
	free(dp->keystore_directory);
	free(dp->d.server);
	free(dp->d.user);
	free(dp->d.tls_ca_file);
	secret_clear(&dp->d.pw);
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

	if (v->data.scalar.length == 0)
		return true;
	return v->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
	       (strcmp(s, "~") == 0 || strcmp(s, "null") == 0 || strcmp(s, "Null") == 0 ||
		strcmp(s, "NULL") == 0);
}

/* The text of a non-empty scalar, or NULL after an error naming what was expected. */
static const char *
scalar(struct pctx *c, yaml_node_t *v, const char *path, const char *what)
{
	if (v->type != YAML_SCALAR_NODE) {
		perr(c, v->start_mark, path, "expected %s, not a %s", what,
		     v->type == YAML_MAPPING_NODE ? "mapping" : "list");
		return NULL;
	}
	if (is_null(v)) {
		perr(c, v->start_mark, path, "expected %s, the value is empty", what);
		return NULL;
	}
	if (strlen((const char *)v->data.scalar.value) != v->data.scalar.length) {
		perr(c, v->start_mark, path, "contains a NUL character");
		return NULL;
	}
	return (const char *)v->data.scalar.value;
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

	if (*s < '0' || *s > '9')
		return -EINVAL;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno != 0 || *end != '\0')
		return -EINVAL;
	*ret = v;
	return 0;
}

static int
hexval(char ch)
{
	if (ch >= '0' && ch <= '9')
		return ch - '0';
	if (ch >= 'a' && ch <= 'f')
		return ch - 'a' + 10;
	if (ch >= 'A' && ch <= 'F')
		return ch - 'A' + 10;
	return -1;
}

/* "sha256:" and 64 hex digits, either case, colons allowed between bytes. */
static int
parse_fingerprint(const char *s, unsigned char out[32])
{
	size_t n = 0;

	if (strncasecmp(s, "sha256:", 7) != 0)
		return -EINVAL;
	for (s += 7; *s != '\0'; s += 2) {
		if (n > 0 && *s == ':')
			s++;
		int hi = hexval(s[0]);
		int lo = hi < 0 ? -1 : hexval(s[1]);
		if (hi < 0 || lo < 0 || n == 32)
			return -EINVAL;
		out[n++] = (unsigned char)(hi << 4 | lo);
	}
	return n == 32 ? 0 : -EINVAL;
}

/* ---- key handlers ---- */

static void
h_str(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const char *s = scalar(c, v, path, "a string");

	if (s != NULL)
		set_str(field(c, k), s);
}

/* Free text: an empty value is allowed (and means none). */
static void
h_text(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	if (v->type == YAML_SCALAR_NODE && is_null(v))
		return;
	h_str(c, k, v, path);
}

static void
h_abspath(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const char *s = scalar(c, v, path, "an absolute path");

	if (s == NULL)
		return;
	if (s[0] != '/') {
		perr(c, v->start_mark, path,
		     "must be an absolute path (a relative one would depend on the daemon's "
		     "working directory)");
		return;
	}
	set_str(field(c, k), s);
}

static void
h_id(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	static const char ok[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-";
	const char *s = scalar(c, v, path, "an identifier");
	size_t n;

	if (s == NULL)
		return;
	n = strlen(s);
	if (n > 64 || strspn(s, ok) != n || strcmp(s, ".") == 0 || strcmp(s, "..") == 0) {
		perr(c, v->start_mark, path,
		     "must be 1-64 characters of A-Z a-z 0-9 _ . - (and not . or ..)");
		return;
	}
	set_str(field(c, k), s);
	((struct mparse *)c->base)->id_mark = v->start_mark;
}

static void
h_https(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const char *s = scalar(c, v, path, "an https:// URL");

	if (s == NULL)
		return;
	if (strncasecmp(s, "https://", 8) != 0 || s[8] == '\0') {
		perr(c, v->start_mark, path, "must be an https:// URL");
		return;
	}
	set_str(field(c, k), s);
}

/* smime.key_name: the file KEYSTORE/NAME.p12, so no way out of the keystore. */
static void
h_keyname(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const char *s = scalar(c, v, path, "a key name");

	if (s == NULL)
		return;
	if (strchr(s, '/') != NULL || s[0] == '.') {
		perr(c, v->start_mark, path,
		     "must be a name (of KEYSTORE/NAME.p12) without '/' or a leading '.'");
		return;
	}
	set_str(field(c, k), s);
}

static void
h_bool(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	static const char *const yes[] = {"true", "yes", "on"}, *const no[] = {"false", "no", "off"};
	const char *s = scalar(c, v, path, "true or false");

	if (s == NULL)
		return;
	for (size_t i = 0; i < 3; i++) {
		if (strcasecmp(s, yes[i]) == 0 || strcasecmp(s, no[i]) == 0) {
			*(bool *)field(c, k) = strcasecmp(s, yes[i]) == 0;
			return;
		}
	}
	perr(c, v->start_mark, path, "expected true or false");
}

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
h_int(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const struct range *r = k->arg;
	const char *s = scalar(c, v, path, "a number");
	uint64_t n;

	if (s == NULL)
		return;
	if (parse_uint(s, &n) < 0 || n < r->min || n > r->max) {
		perr(c, v->start_mark, path, "must be a number %s", r->text);
		return;
	}
	*(unsigned *)field(c, k) = (unsigned)n;
}

static void
h_duration(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const struct range *r = k->arg;
	const char *s = scalar(c, v, path, "a duration");
	uint64_t n;

	if (s == NULL)
		return;
	if (util_parse_duration(s, &n) < 0) {
		perr(c, v->start_mark, path, "expected a duration (90, 90s, 5m, 1h, 1d)");
		return;
	}
	if (n < r->min || n > r->max) {
		perr(c, v->start_mark, path, "must be %s", r->text);
		return;
	}
	*(uint64_t *)field(c, k) = n;
}

static void
h_size(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const struct range *r = k->arg;
	const char *s = scalar(c, v, path, "a size");
	uint64_t n;

	if (s == NULL)
		return;
	if (util_parse_size(s, &n) < 0) {
		perr(c, v->start_mark, path, "expected a size (1000, 512k, 25M, 1G)");
		return;
	}
	if (n < r->min || n > r->max) {
		perr(c, v->start_mark, path, "must be %s", r->text);
		return;
	}
	*(uint64_t *)field(c, k) = n;
}

static void
h_fingerprint(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	struct conf_mailbox *m = &((struct mparse *)c->base)->m;
	const char *s = scalar(c, v, path, "sha256:HEX");

	(void)k;
	if (s == NULL)
		return;
	if (parse_fingerprint(s, m->tls_fingerprint) < 0) {
		perr(c, v->start_mark, path,
		     "must be sha256: and 64 hex digits (colons between bytes allowed)");
		return;
	}
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
		if (name == NULL)
			continue;
		for (size_t i = 0; i < m->n_sasl_mechanisms; i++)
			dup = dup || strcmp(m->sasl_mechanisms[i], name) == 0;
		if (dup)
			perr(c, item->start_mark, path, "%s is listed twice", name);
		else
			m->sasl_mechanisms[m->n_sasl_mechanisms++] = xstrdup(name);
	}
}

/* password / password_file / password_credential and the like; arg is the base name. */
static void
set_secret(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path,
	   enum secret_kind kind)
{
	struct secret *sec = field(c, k);
	const char *base = k->arg;
	const char *s = scalar(c, v, path, kind == SEC_FILE ? "a path" : "a string");

	if (s == NULL)
		return;
	if (sec->kind != SEC_NONE) {
		perr(c, v->start_mark, path, "only one of %s, %s_file and %s_credential may be set",
		     base, base, base);
		return;
	}
	if (kind == SEC_CRED && (strchr(s, '/') != NULL || strcmp(s, ".") == 0 ||
				 strcmp(s, "..") == 0)) {
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

static void
h_secret_inline(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	set_secret(c, k, v, path, SEC_INLINE);
}

static void
h_secret_file(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	set_secret(c, k, v, path, SEC_FILE);
}

static void
h_secret_cred(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	set_secret(c, k, v, path, SEC_CRED);
}

static void
h_loglevel(struct pctx *c, const struct key *k, yaml_node_t *v, const char *path)
{
	const char *s = scalar(c, v, path, "a log level");
	int level;

	if (s == NULL)
		return;
	level = log_level_from_name(s);
	if (level < 0) {
		perr(c, v->start_mark, path, "must be one of debug, info, notice, warning, error");
		return;
	}
	*(int *)field(c, k) = level;
}

static void walk_map(struct pctx *c, yaml_node_t *map, const struct key *keys,
		     const char *prefix);

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
	{"token_endpoint", h_https, M(m.oauth2.token_endpoint), NULL},
	{"client_id", h_str, M(m.oauth2.client_id), NULL},
	{"client_secret", h_secret_inline, M(cs), "client_secret"},
	{"client_secret_file", h_secret_file, M(cs), "client_secret"},
	{"client_secret_credential", h_secret_cred, M(cs), "client_secret"},
	{"scope", h_str, M(m.oauth2.scope), NULL},
	{"grant", h_enum, M(grant), grant_names},
	{"refresh_token_file", h_str, M(m.oauth2.refresh_token_file), NULL},
	{"mechanism", h_enum, M(mech), mech_names},
	{"ca_file", h_str, M(m.oauth2.ca_file), NULL},
	{NULL, NULL, 0, NULL},
};

static const struct key smime_keys[] = {
	{"key_name", h_keyname, M(m.smime.key_name), NULL},
	{"key_password", h_secret_inline, M(kp), "key_password"},
	{"key_password_file", h_secret_file, M(kp), "key_password"},
	{"key_password_credential", h_secret_cred, M(kp), "key_password"},
	{NULL, NULL, 0, NULL},
};

static const struct key timeout_keys[] = {
	{"connect", h_duration, M(m.connect_timeout), &timeout_range},
	{"command", h_duration, M(m.command_timeout), &timeout_range},
	{NULL, NULL, 0, NULL},
};

static const struct key mailbox_keys[] = {
	{"id", h_id, M(m.id), NULL},
	{"description", h_text, M(m.description), NULL},
	{"status", h_enum, M(status), status_names},
	{"server", h_str, M(m.server), NULL},
	{"port", h_int, M(port), &port_range},
	{"tls", h_enum, M(tls), tls_names},
	{"tls_ca_file", h_str, M(m.tls_ca_file), NULL},
	{"tls_fingerprint", h_fingerprint, 0, NULL},
	{"tls_verify", h_bool, M(m.tls_verify), NULL},
	{"user", h_str, M(m.user), NULL},
	{"password", h_secret_inline, M(pw), "password"},
	{"password_file", h_secret_file, M(pw), "password"},
	{"password_credential", h_secret_cred, M(pw), "password"},
	{"auth", h_enum, M(auth), auth_names},
	{"sasl_mechanisms", h_mechanisms, 0, NULL},
	{"oauth2", h_map, 0, oauth2_keys},
	{"smime", h_map, 0, smime_keys},
	{"save_text", h_bool, M(m.save_text), NULL},
	{"save_attachments", h_bool, M(m.save_attachments), NULL},
	{"save_directory", h_abspath, M(m.save_directory), NULL},
	{"remove_after_read", h_bool, M(m.remove_after_read), NULL},
	{"receive", h_enum, M(receive), receive_names},
	{"poll_interval", h_duration, M(m.poll_interval), &poll_range},
	{"max_message_size", h_size, M(m.max_message_size), &size_range},
	{"timeouts", h_map, 0, timeout_keys},
	{NULL, NULL, 0, NULL},
};

static const struct key defaults_keys[] = {
	{"server", h_str, D(d.server), NULL},
	{"port", h_int, D(d.port), &port_range},
	{"tls", h_enum, D(d.tls), tls_names},
	{"user", h_str, D(d.user), NULL},
	{"password", h_secret_inline, D(d.pw), "password"},
	{"password_file", h_secret_file, D(d.pw), "password"},
	{"password_credential", h_secret_cred, D(d.pw), "password"},
	{"tls_ca_file", h_str, D(d.tls_ca_file), NULL},
	{NULL, NULL, 0, NULL},
};

static const struct key daemon_keys[] = {
	{"state_directory", h_abspath, D(state_directory), NULL},
	{"keystore_directory", h_abspath, D(keystore_directory), NULL},
	{"max_sessions", h_int, D(max_sessions), &sessions_range},
	{"log_level", h_loglevel, D(log_level), NULL},
	{"defaults", h_map, 0, defaults_keys},
	{NULL, NULL, 0, NULL},
};

/* ---- walking a mapping ---- */

static void
key_path(char *out, size_t size, const char *prefix, const char *name)
{
	char buf[KEY_PATH_MAX];

	snprintf(out, size, "%s%s", prefix, clean(buf, 64, name));
}

static bool
seen_before(struct pctx *c, yaml_node_t *map, yaml_node_pair_t *p, const char *name)
{
	for (yaml_node_pair_t *q = map->data.mapping.pairs.start; q < p; q++) {
		yaml_node_t *k = yaml_document_get_node(c->doc, q->key);
		if (k->type == YAML_SCALAR_NODE && strcmp((char *)k->data.scalar.value, name) == 0)
			return true;
	}
	return false;
}

static void
walk_map(struct pctx *c, yaml_node_t *map, const struct key *keys, const char *prefix)
{
	yaml_node_pair_t *p;

	for (p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; p++) {
		yaml_node_t *kn = yaml_document_get_node(c->doc, p->key);
		yaml_node_t *v = yaml_document_get_node(c->doc, p->value);
		char path[KEY_PATH_MAX];
		const struct key *k;
		const char *name;

		if (kn->type != YAML_SCALAR_NODE) {
			key_path(path, sizeof(path), prefix, "(key)");
			perr(c, kn->start_mark, path, "keys must be plain names");
			continue;
		}
		name = (const char *)kn->data.scalar.value;
		key_path(path, sizeof(path), prefix, name);
		if (seen_before(c, map, p, name)) {
			perr(c, kn->start_mark, path, "duplicate key");
			continue;
		}
		for (k = keys; k->name != NULL && strcmp(k->name, name) != 0; k++)
			;
		if (k->name == NULL) {
			perr(c, kn->start_mark, path, "unknown key");
			continue;
		}
		k->fn(c, k, v, path);
	}
}

/* ---- files ---- */

static char *
join(const char *dir, const char *name)
{
	size_t n = strlen(dir);

	return xasprintf("%s%s%s", dir, n > 0 && dir[n - 1] == '/' ? "" : "/", name);
}

/* The whole file into *ret (NUL-terminated). 1: read, 0: absent and optional,
 * -1: error reported. */
static int
read_file(struct loader *l, const char *file, bool optional, char **ret, size_t *ret_len,
	  mode_t *ret_mode)
{
	struct stat st = {0};
	char *buf = NULL;
	size_t len = 0;
	ssize_t r;
	int fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY);

	if (fd < 0) {
		if (errno == ENOENT && optional)
			return 0;
		add_error(l->errs, file, mark_start, "(file)", "cannot open: %s", strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size > MAX_FILE_SIZE) {
		add_error(l->errs, file, mark_start, "(file)", "%s",
			  st.st_size > MAX_FILE_SIZE ? "larger than 1 MiB" : "not a regular file");
		close(fd);
		return -1;
	}
	buf = xmalloc((size_t)st.st_size + 1);
	while (len < (size_t)st.st_size &&
	       (r = read(fd, buf + len, (size_t)st.st_size - len)) != 0) {
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			add_error(l->errs, file, mark_start, "(file)", "cannot read: %s",
				  strerror(errno));
			explicit_bzero(buf, len);
			free(buf);
			close(fd);
			return -1;
		}
		len += (size_t)r;
	}
	close(fd);
	buf[len] = '\0';
	*ret = buf;
	*ret_len = len;
	*ret_mode = st.st_mode;
	return 1;
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
			yaml_node_t *root = yaml_document_get_root_node(&extra);
			if (root != NULL) {
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

/* Read and parse a file, then hand its root node to fn. */
static void
load_file(struct loader *l, const char *file, bool optional, void *base,
	  void (*fn)(struct pctx *c, yaml_node_t *root))
{
	yaml_document_t doc;
	char *buf;
	size_t len;
	mode_t mode;
	struct pctx c = {.l = l, .file = file, .doc = &doc, .base = base};

	if (read_file(l, file, optional, &buf, &len, &mode) <= 0)
		return;
	if (parse_yaml(l, file, buf, len, &doc) == 0) {
		c.mode = mode;
		fn(&c, yaml_document_get_root_node(&doc));
		wipe_document(&doc);
	}
	explicit_bzero(buf, len);
	free(buf);
}

/* ---- secrets ---- */

/* The first line of a secret file, or NULL after an error. */
static char *
read_secret_file(struct pctx *c, const struct secret *sec, const char *file, bool check_others)
{
	char buf[MAX_SECRET_LINE + 1], name[256], *nl, *ret = NULL;
	size_t len = 0;
	ssize_t r = 0;
	struct stat st;
	int fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY);

	clean(name, sizeof(name), file);
	if (fd < 0) {
		perr(c, sec->mark, sec->path, "cannot open %s: %s", name, strerror(errno));
		return NULL;
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		perr(c, sec->mark, sec->path, "%s is not a regular file", name);
		goto out;
	}
	if (check_others && (st.st_mode & S_IROTH) != 0) {
		perr(c, sec->mark, sec->path, "%s is readable by others (chmod 600)", name);
		goto out;
	}
	while (len < MAX_SECRET_LINE && memchr(buf, '\n', len) == NULL &&
	       ((r = read(fd, buf + len, MAX_SECRET_LINE - len)) > 0 || (r < 0 && errno == EINTR)))
		len += r > 0 ? (size_t)r : 0;
	if (r < 0) {
		perr(c, sec->mark, sec->path, "cannot read %s: %s", name, strerror(errno));
		goto out;
	}
	nl = memchr(buf, '\n', len);
	if (nl == NULL && len == MAX_SECRET_LINE) {
		perr(c, sec->mark, sec->path, "the first line of %s is too long", name);
		goto out;
	}
	len = nl ? (size_t)(nl - buf) : len;
	if (len > 0 && buf[len - 1] == '\r')
		len--;
	buf[len] = '\0';
	if (len == 0 || memchr(buf, '\0', len) != NULL)
		perr(c, sec->mark, sec->path, "the first line of %s is empty or holds a NUL", name);
	else
		ret = xstrdup(buf);
out:
	explicit_bzero(buf, sizeof(buf));
	close(fd);
	return ret;
}

static void
resolve_secret(struct pctx *c, struct secret *sec)
{
	const char *credentials = getenv("CREDENTIALS_DIRECTORY");
	char *file;

	switch (sec->kind) {
	case SEC_NONE:
		break;
	case SEC_INLINE:
		sec->value = xstrdup(sec->src);
		break;
	case SEC_FILE:
		sec->value = read_secret_file(c, sec, sec->src, true);
		break;
	case SEC_CRED:
		if (credentials == NULL || credentials[0] == '\0') {
			perr(c, sec->mark, sec->path,
			     "$CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit)");
			break;
		}
		file = join(credentials, sec->src);
		sec->value = read_secret_file(c, sec, file, false);
		free(file);
		break;
	}
}

/* Move a loaded secret out of sec. */
static char *
take_secret(struct secret *sec)
{
	char *v = sec->value;

	sec->value = NULL;
	return v;
}

/* ---- popfetchd.yaml ---- */

static void
daemon_root(struct pctx *c, yaml_node_t *root)
{
	struct dparse *dp = c->base;

	if (root == NULL)
		return;
	if (root->type != YAML_MAPPING_NODE) {
		perr(c, root->start_mark, "(top level)", "expected a mapping of daemon settings");
		return;
	}
	walk_map(c, root, daemon_keys, "");
	resolve_secret(c, &dp->d.pw);
}

/* ---- a configuration ---- */

static void
fallback(char **field, const char *dflt)
{
	if (*field == NULL && dflt != NULL)
		*field = xstrdup(dflt);
}

static void
finish_oauth2(struct pctx *c, struct mparse *mp, yaml_mark_t at)
{
	struct conf_mailbox *m = &mp->m;

	if (m->oauth2.token_endpoint == NULL)
		perr(c, at, "oauth2.token_endpoint", "required for auth: oauth2");
	if (m->oauth2.client_id == NULL)
		perr(c, at, "oauth2.client_id", "required for auth: oauth2");
	if (m->oauth2.grant == CONF_GRANT_CLIENT_CREDENTIALS) {
		if (mp->cs.kind == SEC_NONE)
			perr(c, at, "oauth2.client_secret",
			     "required for grant client_credentials (client_secret, "
			     "client_secret_file or client_secret_credential)");
		if (m->oauth2.scope == NULL)
			perr(c, at, "oauth2.scope", "required for grant client_credentials");
	} else if (m->oauth2.refresh_token_file == NULL) {
		perr(c, at, "oauth2.refresh_token_file", "required for grant refresh_token");
	}
}

static void
finish_mailbox(struct pctx *c, struct mparse *mp, yaml_mark_t at)
{
	struct conf_mailbox *m = &mp->m;
	const struct defaults *d = &c->l->dp.d;

	if (m->id == NULL)
		perr(c, at, "id", "required");
	fallback(&m->server, d->server);
	if (m->server == NULL)
		perr(c, at, "server", "required (here or in popfetchd.yaml defaults)");
	fallback(&m->user, d->user);
	if (m->user == NULL)
		perr(c, at, "user", "required (here or in popfetchd.yaml defaults)");
	m->tls = (enum conf_tls)(mp->tls >= 0 ? mp->tls : d->tls >= 0 ? d->tls : 0);
	m->port = (uint16_t)(mp->port   ? mp->port
			     : d->port  ? d->port
			     : m->tls == CONF_TLS_IMPLICIT ? 995
							    : 110);
	fallback(&m->tls_ca_file, d->tls_ca_file);
	m->active = mp->status == 0;
	m->auth = (enum conf_auth)mp->auth;
	m->oauth2.grant = (enum conf_grant)mp->grant;
	m->oauth2.mechanism = (enum conf_oauth_mech)mp->mech;
	m->receive = (enum conf_receive)mp->receive;

	resolve_secret(c, &mp->pw);
	resolve_secret(c, &mp->cs);
	resolve_secret(c, &mp->kp);
	m->password = take_secret(&mp->pw);
	m->oauth2.client_secret = take_secret(&mp->cs);
	m->smime.key_password = take_secret(&mp->kp);
	if (m->auth == CONF_AUTH_SASL && mp->pw.kind == SEC_NONE) {
		if (d->pw.value != NULL)
			m->password = xstrdup(d->pw.value);
		else if (d->pw.kind == SEC_NONE)
			perr(c, at, "password",
			     "required for auth: sasl (password, password_file or "
			     "password_credential, here or in popfetchd.yaml defaults)");
	}
	if (m->auth == CONF_AUTH_OAUTH2)
		finish_oauth2(c, mp, at);
	if (mp->kp.kind != SEC_NONE && m->smime.key_name == NULL)
		perr(c, mp->kp.mark, mp->kp.path, "has no effect without smime.key_name");
	if ((m->save_text || m->save_attachments) && m->save_directory == NULL)
		perr(c, at, "save_directory", "required when save_text or save_attachments is true");
}

static void
mailbox_root(struct pctx *c, yaml_node_t *root)
{
	struct mparse *mp = c->base;

	if (root == NULL || root->type != YAML_MAPPING_NODE) {
		perr(c, root ? root->start_mark : mark_start, "(top level)",
		     "expected a mapping of configuration keys");
		return;
	}
	walk_map(c, root, mailbox_keys, "");
	finish_mailbox(c, mp, root->start_mark);
}

static struct mparse *
mparse_new(const char *file, size_t order)
{
	struct mparse *mp = xcalloc(1, sizeof(*mp));

	mp->m.file = xstrdup(file);
	mp->m.active = true;
	mp->m.tls_verify = true;
	mp->m.save_text = true;
	mp->m.save_attachments = true;
	mp->m.remove_after_read = true;
	mp->m.poll_interval = 300;
	mp->m.connect_timeout = 30;
	mp->m.command_timeout = 60;
	mp->tls = -1;
	mp->order = order;
	return mp;
}

static void
load_mailbox(struct loader *l, const char *file)
{
	struct mparse *mp = mparse_new(file, l->n_mbx);

	load_file(l, file, false, mp, mailbox_root);
	if (mp->m.id == NULL) { /* nothing to check duplicates against */
		mparse_free(mp);
		return;
	}
	if (l->n_mbx == l->cap_mbx) {
		l->cap_mbx = l->cap_mbx ? 2 * l->cap_mbx : 16;
		l->mbx = xrealloc(l->mbx, l->cap_mbx * sizeof(*l->mbx));
	}
	l->mbx[l->n_mbx++] = mp;
}

static int
yaml_name(const struct dirent *de)
{
	const char *dot = strrchr(de->d_name, '.');

	return de->d_name[0] != '.' && dot != NULL &&
	       (strcmp(dot, ".yaml") == 0 || strcmp(dot, ".yml") == 0);
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
		if (strcmp(l->mbx[i]->m.id, l->mbx[first]->m.id) != 0) {
			first = i;
			continue;
		}
		add_error(l->errs, l->mbx[i]->m.file, l->mbx[i]->id_mark, "id",
			  "duplicate id \"%s\", already used in %s", l->mbx[i]->m.id,
			  l->mbx[first]->m.file);
	}
}

/* ---- the set ---- */

static char *
default_state_directory(void)
{
	const char *env = getenv("STATE_DIRECTORY");

	/* systemd passes a colon-separated list when there are several */
	if (env != NULL && env[0] != '\0' && env[0] != ':') {
		size_t n = strcspn(env, ":");
		char *dir = xmalloc(n + 1);

		memcpy(dir, env, n);
		dir[n] = '\0';
		return dir;
	}
	return xstrdup("/var/lib/popfetchd");
}

static struct conf_set *
build_set(struct loader *l)
{
	struct conf_set *set = xcalloc(1, sizeof(*set));
	struct dparse *dp = &l->dp;

	set->dir = xstrdup(l->dir);
	set->state_directory = dp->state_directory ? xstrdup(dp->state_directory)
						   : default_state_directory();
	set->keystore_directory = dp->keystore_directory ? xstrdup(dp->keystore_directory)
							 : join(l->dir, "keys");
	set->max_sessions = dp->max_sessions ? dp->max_sessions : 64;
	set->log_level_set = dp->log_level >= 0;
	set->log_level = set->log_level_set ? dp->log_level : LOG_LVL_INFO;
	set->mailboxes = xcalloc(l->n_mbx, sizeof(*set->mailboxes));
	for (size_t i = 0; i < l->n_mbx; i++) {
		struct conf_mailbox *m = xmalloc(sizeof(*m));
		*m = l->mbx[i]->m; /* moves the fields */
		memset(&l->mbx[i]->m, 0, sizeof(l->mbx[i]->m));
		set->mailboxes[set->n_mailboxes++] = m;
	}
	return set;
}

int
conf_load(const char *dir, struct conf_set **ret, struct conf_errors *errs)
{
	struct loader l = {.dir = dir, .errs = errs};
	size_t before = errs->n;
	struct stat st = {0};
	char *file;
	int rc = 0;

	l.dp.log_level = -1;
	l.dp.d.tls = -1;
	if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
		add_error(errs, dir, mark_start, "(directory)", "cannot open: %s",
			  S_ISDIR(st.st_mode) || st.st_mode == 0 ? strerror(errno) : "not a directory");
		return -EINVAL;
	}
	file = join(dir, "popfetchd.yaml");
	load_file(&l, file, true, &l.dp, daemon_root);
	free(file);
	load_confd(&l);
	check_duplicates(&l);
	if (errs->n != before)
		rc = -EINVAL;
	else
		*ret = build_set(&l);
	for (size_t i = 0; i < l.n_mbx; i++)
		mparse_free(l.mbx[i]);
	free(l.mbx);
	dparse_clear(&l.dp);
	return rc;
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
	free(set->mailboxes);
	free(set->dir);
	free(set->state_directory);
	free(set->keystore_directory);
	free(set);
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

const char *
conf_tls_name(enum conf_tls tls)
{
	return (unsigned)tls < 3 ? tls_names[tls] : "?";
}

const char *
conf_auth_name(enum conf_auth auth)
{
	return (unsigned)auth < 2 ? auth_names[auth] : "?";
}
