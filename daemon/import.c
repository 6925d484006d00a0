/*
 * import: .mpoprc and .fetchmailrc accounts as popfetchd configurations.
 * Every setting without a popfetchd counterpart becomes a note with its file
 * and line; nothing is dropped silently.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <unistd.h>

#include "popfetchd/import.h"
#include "popfetchd/util.h"

#define IMPORT_MAX_FILE	 (4u << 20)
#define SECRETS_DIR	 "/etc/popfetchd/secrets"
#define SAVE_PLACEHOLDER "/srv/popfetchd"

static void make_ids(struct import_result *r);

static void __attribute__((format(printf, 4, 5)))
note(struct import_result *r, const char *file, unsigned line, const char *fmt, ...)
{
	va_list ap;
	char *text;

	va_start(ap, fmt);
	if (vasprintf(&text, fmt, ap) < 0)
		abort();
	va_end(ap);
	r->notes = xrealloc(r->notes, (r->n_notes + 1) * sizeof(*r->notes));
	r->notes[r->n_notes++] = xasprintf("%s:%u: %s", file, line, text);
	free(text);
}

static void
acc_init(struct import_account *a)
{
	memset(a, 0, sizeof(*a));
	a->port = a->tls = a->starttls = a->certcheck = a->keep = a->timeout = -1;
	a->password_eval = a->inactive = a->pop3 = -1;
}

static void
acc_clear(struct import_account *a)
{
	FREE_ALL(a->name, a->id, a->server, a->user, a->password, a->ca_file, a->fingerprint,
		 a->mechanism, a->interval);
	acc_init(a);
}

static void
set_str(char **dst, const char *v)
{
	free(*dst);
	*dst = v != NULL ? xstrdup(v) : NULL;
}

/* The settings src has over dst's (inheritance, defaults). */
static void
acc_overlay(struct import_account *dst, const struct import_account *src)
{
	char *const *from[] = {&src->server,	  &src->user,	   &src->password, &src->ca_file,
			       &src->fingerprint, &src->mechanism, &src->interval};
	char **to[] = {&dst->server,	  &dst->user,	   &dst->password, &dst->ca_file,
		       &dst->fingerprint, &dst->mechanism, &dst->interval};
	const int *nf[] = {&src->port,	    &src->tls,	&src->starttls,
			   &src->certcheck, &src->keep, &src->password_eval,
			   &src->inactive,  &src->pop3, &src->timeout};
	int *nt[] = {&dst->port,      &dst->tls,  &dst->starttls,
		     &dst->certcheck, &dst->keep, &dst->password_eval,
		     &dst->inactive,  &dst->pop3, &dst->timeout};

	for (size_t i = 0; i < sizeof(from) / sizeof(from[0]); i++)
		if (*from[i] != NULL)
			set_str(to[i], *from[i]);
	for (size_t i = 0; i < sizeof(nf) / sizeof(nf[0]); i++)
		if (*nf[i] >= 0)
			*nt[i] = *nf[i];
	if (src->max_size != 0)
		dst->max_size = src->max_size;
}

static size_t
acc_add(struct import_result *r, const char *name, unsigned line)
{
	struct import_account *a;

	r->acc = xrealloc(r->acc, (r->n_acc + 1) * sizeof(*r->acc));
	a = &r->acc[r->n_acc];
	acc_init(a);
	a->name = xstrdup(name);
	a->line = line;
	return r->n_acc++;
}

/* "on", "off" or nothing (on): 1, 0, or -1 for anything else. */
static int
on_off(const char *v)
{
	if (v[0] == '\0' || strcmp(v, "on") == 0)
		return 1;
	return strcmp(v, "off") == 0 ? 0 : -1;
}

/* A SASL mechanism popfetchd knows, from mpop's or fetchmail's name; NULL for
 * the default list ("on", "any"); "" when there is none. */
static const char *
mechanism_of(const char *v)
{
	static const char *const map[][2] = {
		{"on", NULL},
		{"any", NULL},
		{"user", "USER"},
		{"password", "USER"},
		{"plain", "PLAIN"},
		{"login", "LOGIN"},
		{"apop", "APOP"},
		{"cram-md5", "CRAM-MD5"},
		{"scram-sha-1", "SCRAM-SHA-1"},
		{"scram-sha-256", "SCRAM-SHA-256"},
		{"scram-sha-256-plus", "SCRAM-SHA-256-PLUS"},
	};

	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
		if (strcasecmp(v, map[i][0]) == 0)
			return map[i][1];
	return "";
}

static void
set_mechanism(struct import_result *r, const char *file, unsigned line, struct import_account *a,
	      const char *v)
{
	const char *m = mechanism_of(v);

	if (m != NULL && m[0] == '\0') {
		note(r, file, line,
		     "auth %s has no popfetchd counterpart (SASL mechanisms: USER, PLAIN, LOGIN, "
		     "APOP, CRAM-MD5, SCRAM-SHA-1, SCRAM-SHA-256[-PLUS]; XOAUTH2 and "
		     "OAUTHBEARER through auth: oauth2): the default list is used",
		     v);
		return;
	}
	set_str(&a->mechanism, m);
}

/* tls_fingerprint: a SHA-256 one ("AB:CD:..." or hex) as sha256:HEX. */
static void
set_fingerprint(struct import_result *r, const char *file, unsigned line, struct import_account *a,
		const char *v)
{
	char hex[65];
	size_t n = 0;

	if (strncasecmp(v, "sha256:", 7) == 0)
		v += 7;
	for (; *v && n < sizeof(hex) - 1; v++)
		if (*v != ':')
			hex[n++] = *v;
	hex[n] = '\0';
	if (*v != '\0' || n != 64 || strspn(hex, "0123456789abcdefABCDEF") != 64) {
		note(r, file, line,
		     "this fingerprint is not SHA-256 and cannot be carried over: pin the "
		     "certificate with tls_fingerprint: sha256:HEX (openssl x509 -noout "
		     "-fingerprint -sha256)");
		return;
	}
	free(a->fingerprint);
	a->fingerprint = xasprintf("sha256:%s", hex);
}

static void
set_port(struct import_result *r, const char *file, unsigned line, struct import_account *a,
	 const char *v)
{
	char *end;
	long p = strtol(v, &end, 10);

	if (*v == '\0' || *end != '\0' || p < 1 || p > 65535) {
		note(r, file, line, "port \"%s\" is not a port number 1-65535: not imported", v);
		return;
	}
	a->port = (int)p;
}

/* mpop skipsize, fetchmail limit: messages larger are left on the server,
 * as popfetchd's max_message_size does. "off" and 0 are no limit. */
static void
set_max_size(struct import_result *r, const char *file, unsigned line, struct import_account *a,
	     const char *cmd, const char *v)
{
	uint64_t n;

	if (strcmp(v, "off") == 0 || strcmp(v, "0") == 0)
		a->max_size = 0;
	else if (util_parse_size(v, &n) == 0 && n > 0)
		a->max_size = n;
	else
		note(r, file, line, "%s \"%s\" is not a size: not imported", cmd, v);
}

/* mpop and fetchmail timeout: seconds, as timeouts.connect and .command
 * (1s to 1h); mpop's "off" is the default. */
static void
set_timeout(struct import_result *r, const char *file, unsigned line, struct import_account *a,
	    const char *v)
{
	char *end;
	long t = strtol(v, &end, 10);

	if (strcmp(v, "off") == 0)
		a->timeout = -1;
	else if (*v == '\0' || *end != '\0' || t < 1 || t > 3600)
		note(r, file, line,
		     "timeout \"%s\" is not 1 to 3600 seconds: not imported "
		     "(timeouts.connect and timeouts.command keep their defaults)",
		     v);
	else
		a->timeout = (int)t;
}

/* ---- .mpoprc ---- */

struct mctx {
	struct import_result *r;
	const char *file;
	struct import_account defaults;
	long cur; /* the account being read, -1 defaults */
};

static long
acc_find(const struct import_result *r, const char *name)
{
	for (size_t i = 0; i < r->n_acc; i++)
		if (strcmp(r->acc[i].name, name) == 0)
			return (long)i;
	return -1;
}

/* account NAME [: PARENT[, PARENT...]] */
static void
mpop_account(struct mctx *c, char *arg, unsigned line)
{
	char *colon = strchr(arg, ':'), *p, *save = NULL;
	size_t end = colon ? (size_t)(colon - arg) : strlen(arg), i;
	char *name;

	while (end > 0 && (arg[end - 1] == ' ' || arg[end - 1] == '\t'))
		end--;
	name = xasprintf("%.*s", (int)end, arg);
	if (name[0] == '\0' || acc_find(c->r, name) >= 0)
		note(c->r, c->file, line, "account \"%s\" %s", name,
		     name[0] ? "is defined twice: the second is imported as another"
			     : "has no name");
	i = acc_add(c->r, name[0] ? name : "account", line);
	c->cur = (long)i;
	acc_overlay(&c->r->acc[i], &c->defaults);
	for (p = colon ? strtok_r(colon + 1, ", \t", &save) : NULL; p != NULL;
	     p = strtok_r(NULL, ", \t", &save)) {
		long parent = acc_find(c->r, p);

		if (parent < 0 || (size_t)parent == i)
			note(c->r, c->file, line,
			     "account %s inherits from \"%s\", which is not "
			     "defined before it: not inherited",
			     name, p);
		else
			acc_overlay(&c->r->acc[i], &c->r->acc[parent]);
	}
	c->r->acc[i].alias = colon != NULL && strcmp(name, "default") == 0;
	free(name);
}

static const char *const mpop_delivery_note =
	"delivery has no popfetchd counterpart: popfetchd writes each message into a folder "
	"under save_directory, not to an MDA, a maildir or an mbox (save_directory is a "
	"placeholder: set it)";

/* One setting of the current account or of defaults: true when it is known. */
static bool
mpop_setting(struct mctx *c, struct import_account *a, const char *cmd, const char *arg,
	     unsigned line)
{
	struct import_result *r = c->r;
	const char *f = c->file;
	int *flag = !strcmp(cmd, "tls")		    ? &a->tls
		    : !strcmp(cmd, "tls_starttls")  ? &a->starttls
		    : !strcmp(cmd, "tls_certcheck") ? &a->certcheck
		    : !strcmp(cmd, "keep")	    ? &a->keep
						    : NULL;

	if (flag != NULL) {
		if ((*flag = on_off(arg)) < 0)
			note(r, f, line, "%s \"%s\" is neither on nor off: not imported", cmd, arg);
	} else if (!strcmp(cmd, "host"))
		set_str(&a->server, arg);
	else if (!strcmp(cmd, "port"))
		set_port(r, f, line, a, arg);
	else if (!strcmp(cmd, "user"))
		set_str(&a->user, arg);
	else if (!strcmp(cmd, "password")) {
		set_str(&a->password, arg);
		a->password_eval = 0;
	} else if (!strcmp(cmd, "passwordeval")) {
		set_str(&a->password, NULL);
		a->password_eval = 1;
		note(r, f, line,
		     "passwordeval cannot be carried over: popfetchd runs no command "
		     "for a password; write it into the password_file, or use "
		     "password_credential");
	} else if (!strcmp(cmd, "tls_trust_file"))
		set_str(&a->ca_file, strcmp(arg, "system") == 0 ? NULL : arg);
	else if (!strcmp(cmd, "tls_fingerprint"))
		set_fingerprint(r, f, line, a, arg);
	else if (!strcmp(cmd, "auth"))
		set_mechanism(r, f, line, a, arg);
	else if (!strcmp(cmd, "only_new")) {
		if (on_off(arg) == 0)
			note(r, f, line,
			     "only_new off has no popfetchd counterpart: popfetchd "
			     "fetches each message once (its UIDL state)");
	} else if (!strcmp(cmd, "delivery"))
		note(r, f, line, "%s", mpop_delivery_note);
	else if (!strcmp(cmd, "skipsize"))
		set_max_size(r, f, line, a, cmd, arg);
	else if (!strcmp(cmd, "timeout"))
		set_timeout(r, f, line, a, arg);
	else if (!strcmp(cmd, "eval"))
		note(r, f, line,
		     "eval cannot be carried over: popfetchd runs no command for its "
		     "configuration; the settings its output gives are missing: add them");
	else
		return false;
	return true;
}

static void
mpop_line(struct mctx *c, const char *cmd, char *arg, unsigned line)
{
	struct import_account *a;

	if (!strcmp(cmd, "defaults")) {
		c->cur = -1;
		return;
	}
	if (!strcmp(cmd, "account")) {
		mpop_account(c, arg, line);
		return;
	}
	a = c->cur < 0 ? &c->defaults : &c->r->acc[c->cur];
	a->own++;
	if (!mpop_setting(c, a, cmd, arg, line))
		note(c->r, c->file, line, "%s has no popfetchd counterpart: not imported", cmd);
}

/* An argument: the rest of the line, "..." with \ escapes unquoted. */
static char *
mpop_arg(const char *s, size_t n)
{
	char *out = xmalloc(n + 1), *o = out;

	while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r'))
		n--;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '"')
			continue;
		if (s[i] == '\\' && i + 1 < n)
			i++;
		*o++ = s[i];
	}
	*o = '\0';
	return out;
}

void
import_parse_mpoprc(const char *text, size_t len, const char *file, struct import_result *r)
{
	struct mctx c = {.r = r, .file = file, .cur = -1};
	unsigned line = 0;

	acc_init(&c.defaults);
	for (size_t i = 0; i < len; line++) {
		size_t eol = i, w;
		char *cmd, *arg;

		while (eol < len && text[eol] != '\n')
			eol++;
		while (i < eol && (text[i] == ' ' || text[i] == '\t'))
			i++;
		for (w = i; w < eol && text[w] != ' ' && text[w] != '\t' && text[w] != '\r'; w++)
			;
		if (i < eol && text[i] != '#' && text[i] != '\r') {
			cmd = xasprintf("%.*s", (int)(w - i), text + i);
			while (w < eol && (text[w] == ' ' || text[w] == '\t'))
				w++;
			arg = mpop_arg(text + w, eol - w);
			mpop_line(&c, cmd, arg, line + 1);
			FREE_ALL(cmd, arg);
		}
		i = eol + 1;
	}
	for (size_t i = 0; i < r->n_acc; i++) {
		struct import_account *a = &r->acc[i];

		a->alias = a->alias && a->own == 0;
		if (a->alias)
			note(r, file, a->line,
			     "account default only names another account: "
			     "not imported twice");
	}
	acc_clear(&c.defaults);
	make_ids(r);
}

/* ---- .fetchmailrc ---- */

struct tok {
	char *s;
	unsigned line;
};

static bool
fm_space(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n' || ch == ',' || ch == ';' ||
	       ch == ':';
}

/* One quoted string from text[*i] (the quote), \ escapes as in C. */
static char *
fm_quoted(const char *text, size_t len, size_t *i, unsigned *line)
{
	char q = text[(*i)++], *out = xmalloc(len - *i + 1), *o = out;

	while (*i < len && text[*i] != q) {
		char ch = text[(*i)++];

		if (ch == '\n')
			(*line)++;
		if (ch == '\\' && *i < len) {
			ch = text[(*i)++];
			ch = ch == 'n' ? '\n' : ch == 't' ? '\t' : ch;
		}
		*o++ = ch;
	}
	if (*i < len)
		(*i)++;
	*o = '\0';
	return out;
}

static size_t
fm_tokens(const char *text, size_t len, struct tok **out)
{
	size_t n = 0, i = 0;
	unsigned line = 1;

	*out = NULL;
	while (i < len) {
		unsigned at = line;
		size_t s;

		if (fm_space(text[i])) {
			line += text[i++] == '\n';
			continue;
		}
		if (text[i] == '#') {
			while (i < len && text[i] != '\n')
				i++;
			continue;
		}
		*out = xrealloc(*out, (n + 1) * sizeof(**out));
		if (text[i] == '"' || text[i] == '\'') {
			(*out)[n].s = fm_quoted(text, len, &i, &line);
		} else {
			for (s = i; i < len && !fm_space(text[i]) && text[i] != '#'; i++)
				;
			(*out)[n].s = xasprintf("%.*s", (int)(i - s), text + s);
		}
		(*out)[n++].line = at;
	}
	return n;
}

enum fm_kind {
	FM_NOISE,
	FM_DROP,     /* no counterpart: reported */
	FM_DELIVERY, /* delivery: reported */
	FM_LIST,     /* a list of names: reported */
	FM_PROTO,
	FM_PORT,
	FM_AUTH,
	FM_PASS,
	FM_SSL,
	FM_CERTCK,
	FM_CAFILE,
	FM_FPR,
	FM_SSLPROTO,
	FM_KEEP,
	FM_NOKEEP,
	FM_FETCHALL,
	FM_UIDL,
	FM_NO,
	FM_LIMIT,
	FM_TIMEOUT,
};

static const struct fm_word {
	const char *word;
	enum fm_kind kind;
	int args;
} fm_words[] = {
	{"and", FM_NOISE, 0},
	{"with", FM_NOISE, 0},
	{"has", FM_NOISE, 0},
	{"wants", FM_NOISE, 0},
	{"options", FM_NOISE, 0},
	{"here", FM_NOISE, 0},
	{"there", FM_NOISE, 0},
	{"protocol", FM_PROTO, 1},
	{"proto", FM_PROTO, 1},
	{"port", FM_PORT, 1},
	{"service", FM_PORT, 1},
	{"auth", FM_AUTH, 1},
	{"authenticate", FM_AUTH, 1},
	{"password", FM_PASS, 1},
	{"pass", FM_PASS, 1},
	{"ssl", FM_SSL, 0},
	{"sslcertck", FM_CERTCK, 0},
	{"sslcertfile", FM_CAFILE, 1},
	{"sslfingerprint", FM_FPR, 1},
	{"sslproto", FM_SSLPROTO, 1},
	{"keep", FM_KEEP, 0},
	{"nokeep", FM_NOKEEP, 0},
	{"fetchall", FM_FETCHALL, 0},
	{"uidl", FM_UIDL, 0},
	{"no", FM_NO, 1},
	{"is", FM_LIST, 0},
	{"to", FM_LIST, 0},
	{"aka", FM_LIST, 0},
	{"localdomains", FM_LIST, 0},
	{"mda", FM_DELIVERY, 1},
	{"bsmtp", FM_DELIVERY, 1},
	{"lmtp", FM_DELIVERY, 0},
	{"smtphost", FM_DELIVERY, 1},
	{"smtpaddress", FM_DELIVERY, 1},
	{"smtpname", FM_DELIVERY, 1},
	{"folder", FM_DELIVERY, 1},
	{"via", FM_DROP, 1},
	{"timeout", FM_TIMEOUT, 1},
	{"interval", FM_DROP, 1},
	{"envelope", FM_DROP, 1},
	{"qvirtual", FM_DROP, 1},
	{"principal", FM_DROP, 1},
	{"esmtpname", FM_DROP, 1},
	{"esmtppassword", FM_DROP, 1},
	{"plugin", FM_DROP, 1},
	{"plugout", FM_DROP, 1},
	{"limit", FM_LIMIT, 1},
	{"warnings", FM_DROP, 1},
	{"batchlimit", FM_DROP, 1},
	{"fetchlimit", FM_DROP, 1},
	{"fetchsizelimit", FM_DROP, 1},
	{"fastuidl", FM_DROP, 1},
	{"expunge", FM_DROP, 1},
	{"antispam", FM_DROP, 1},
	{"preconnect", FM_DROP, 1},
	{"postconnect", FM_DROP, 1},
	{"sslkey", FM_DROP, 1},
	{"sslcert", FM_DROP, 1},
	{"sslcertpath", FM_DROP, 1},
	{"sslcommonname", FM_DROP, 1},
	{"dns", FM_DROP, 0},
	{"checkalias", FM_DROP, 0},
	{"stripcr", FM_DROP, 0},
	{"forcecr", FM_DROP, 0},
	{"pass8bits", FM_DROP, 0},
	{"dropstatus", FM_DROP, 0},
	{"dropdelivered", FM_DROP, 0},
	{"mimedecode", FM_DROP, 0},
	{"idle", FM_DROP, 0},
	{"rewrite", FM_DROP, 0},
	{"showdots", FM_DROP, 0},
	{"flush", FM_DROP, 0},
	{"limitflush", FM_DROP, 0},
	{"tracepolls", FM_DROP, 0},
	{"nofetchall", FM_NOISE, 0},
	{"noflush", FM_NOISE, 0},
};

static const struct fm_word *
fm_word(const char *s)
{
	for (size_t i = 0; i < sizeof(fm_words) / sizeof(fm_words[0]); i++)
		if (strcasecmp(s, fm_words[i].word) == 0)
			return &fm_words[i];
	return NULL;
}

static bool
fm_entry_word(const char *s)
{
	return !strcasecmp(s, "poll") || !strcasecmp(s, "skip") || !strcasecmp(s, "defaults") ||
	       !strcasecmp(s, "set") || !strcasecmp(s, "user") || !strcasecmp(s, "username");
}

struct fctx {
	struct import_result *r;
	const char *file;
	struct tok *t;
	size_t n, i;
	struct import_account defaults, server;
	int mode;  /* 0 none yet, 1 defaults, 2 a poll entry */
	long cur;  /* the user of the poll entry being read, -1 none yet */
	bool used; /* the poll entry has a user */
	char *interval;
};

static void
fm_protocol(struct fctx *c, struct import_account *a, const char *v, unsigned line)
{
	if (!strcasecmp(v, "pop3") || !strcasecmp(v, "auto") || !strcasecmp(v, "apop")) {
		a->pop3 = 1;
		if (!strcasecmp(v, "apop"))
			set_str(&a->mechanism, "APOP");
		if (!strcasecmp(v, "auto"))
			note(c->r, c->file, line, "protocol auto: imported as POP3");
		return;
	}
	a->pop3 = 0;
	note(c->r, c->file, line, "protocol %s is not POP3: not imported", v);
}

/* The words of "is/to/aka/localdomains": up to "here" or a keyword. */
static void
fm_list(struct fctx *c, const char *word, unsigned line)
{
	while (c->i < c->n && strcasecmp(c->t[c->i].s, "here") != 0 &&
	       fm_word(c->t[c->i].s) == NULL && !fm_entry_word(c->t[c->i].s))
		c->i++;
	if (!strcasecmp(word, "is") || !strcasecmp(word, "to"))
		note(c->r, c->file, line,
		     "%s: delivery to local users has no popfetchd counterpart "
		     "(popfetchd writes folders under save_directory)",
		     word);
	else
		note(c->r, c->file, line, "%s has no popfetchd counterpart: not imported", word);
}

static void
fm_no(struct fctx *c, struct import_account *a, const char *v, unsigned line)
{
	if (!strcasecmp(v, "keep"))
		a->keep = 0;
	else if (!strcasecmp(v, "sslcertck")) {
		a->certcheck = 0;
		note(c->r, c->file, line,
		     "no sslcertck: imported as tls_verify: false, which "
		     "logs a warning at every connect; pin the certificate "
		     "with tls_fingerprint instead");
	} else if (strcasecmp(v, "fetchall") != 0 && strcasecmp(v, "flush") != 0 &&
		   strcasecmp(v, "uidl") != 0)
		note(c->r, c->file, line, "no %s has no popfetchd counterpart: not imported", v);
}

/* sslproto '' is no TLS at all; a protocol floor is OpenSSL's here. */
static void
fm_sslproto(struct fctx *c, struct import_account *a, const char *v, unsigned line)
{
	if (v[0] == '\0' && a->tls != 1) {
		a->tls = 0;
		note(c->r, c->file, line, "sslproto \"\": imported as tls: none (no TLS)");
	} else if (v[0] == '\0')
		note(c->r, c->file, line, "sslproto \"\" beside ssl: ssl is kept (tls: implicit)");
	else
		note(c->r, c->file, line,
		     "sslproto \"%s\" has no popfetchd counterpart: popfetchd speaks "
		     "TLS 1.2 or later (tls chooses implicit or explicit TLS)",
		     v);
}

static void
fm_option(struct fctx *c, struct import_account *a, const struct fm_word *w, const char *word,
	  const char *v, unsigned line)
{
	struct import_result *r = c->r;
	const char *f = c->file;

	switch (w->kind) {
	case FM_NOISE:
	case FM_UIDL: /* popfetchd always keeps a UIDL state */
		break;
	case FM_DROP:
		note(r, f, line, "%s has no popfetchd counterpart: not imported", word);
		break;
	case FM_DELIVERY:
		note(r, f, line,
		     "%s has no popfetchd counterpart: popfetchd writes each message "
		     "into a folder under save_directory, not to an MDA, SMTP or an "
		     "mbox (save_directory is a placeholder: set it)",
		     word);
		break;
	case FM_LIST:
		fm_list(c, word, line);
		break;
	case FM_PROTO:
		fm_protocol(c, a, v, line);
		break;
	case FM_PORT:
		set_port(r, f, line, a, v);
		break;
	case FM_AUTH:
		set_mechanism(r, f, line, a, v);
		break;
	case FM_PASS:
		set_str(&a->password, v);
		break;
	case FM_SSL:
		a->tls = 1;
		a->starttls = 0;
		break;
	case FM_CERTCK:
		a->certcheck = 1;
		break;
	case FM_CAFILE:
		set_str(&a->ca_file, v);
		break;
	case FM_FPR:
		set_fingerprint(r, f, line, a, v);
		break;
	case FM_SSLPROTO:
		fm_sslproto(c, a, v, line);
		break;
	case FM_LIMIT:
		set_max_size(r, f, line, a, word, v);
		break;
	case FM_TIMEOUT:
		set_timeout(r, f, line, a, v);
		break;
	case FM_KEEP:
	case FM_NOKEEP:
		a->keep = w->kind == FM_KEEP;
		break;
	case FM_FETCHALL:
		note(r, f, line,
		     "fetchall has no popfetchd counterpart: popfetchd fetches each "
		     "message it has not saved before (its UIDL state)");
		break;
	case FM_NO:
		fm_no(c, a, v, line);
		break;
	}
}

/* set ...: the words on its line; "set daemon N" is the poll interval. */
static void
fm_set(struct fctx *c, unsigned line)
{
	size_t first = c->i;

	while (c->i < c->n && c->t[c->i].line == line)
		c->i++;
	if (c->i - first == 2 && !strcasecmp(c->t[first].s, "daemon")) {
		const char *v = c->t[first + 1].s;
		char *end;
		long n = strtol(v, &end, 10);

		if (*v >= '0' && *v <= '9' && *end == '\0' && n >= 1 && n <= 7 * 86400) {
			free(c->interval);
			c->interval = xasprintf("%lds", n);
		} else
			note(c->r, c->file, line,
			     "set daemon %s is not 1 to 604800 seconds: poll_interval "
			     "keeps its default (5m)",
			     v);
		return;
	}
	note(c->r, c->file, line, "set %s%s%s has no popfetchd counterpart: not imported",
	     first < c->i ? c->t[first].s : "", first + 1 < c->i ? " " : "",
	     first + 1 < c->i ? c->t[first + 1].s : "");
}

/* The poll entry ends: one without a user still is an account. */
static void
fm_end_entry(struct fctx *c)
{
	if (c->mode == 2 && !c->used) {
		size_t i = acc_add(c->r, c->server.server ? c->server.server : "", c->server.line);

		acc_overlay(&c->r->acc[i], &c->server);
		note(c->r, c->file, c->server.line,
		     "poll %s names no user (fetchmail uses the login name): set user",
		     c->server.server ? c->server.server : "");
	}
	c->mode = 0;
	c->cur = -1;
	c->used = false;
}

static void
fm_user(struct fctx *c, const char *user, unsigned line)
{
	size_t i;
	char *name;

	if (c->mode != 2) {
		set_str(&(c->mode == 1 ? &c->defaults : &c->server)->user, user);
		return;
	}
	name = xasprintf("%s@%s", user, c->server.server ? c->server.server : "");
	i = acc_add(c->r, name, line);
	free(name);
	acc_overlay(&c->r->acc[i], &c->server);
	set_str(&c->r->acc[i].user, user);
	c->cur = (long)i;
	c->used = true;
}

static void
fm_entry(struct fctx *c, const char *word, unsigned line)
{
	bool skip = !strcasecmp(word, "skip");

	fm_end_entry(c);
	if (!strcasecmp(word, "defaults")) {
		c->mode = 1;
		return;
	}
	acc_clear(&c->server);
	acc_overlay(&c->server, &c->defaults);
	c->server.line = line;
	c->mode = 2;
	if (c->i < c->n)
		set_str(&c->server.server, c->t[c->i++].s);
	if (skip) {
		c->server.inactive = 1;
		note(c->r, c->file, line, "skip: imported with status: inactive");
	}
}

static void
fm_word_at(struct fctx *c)
{
	const struct tok *t = &c->t[c->i++];
	const struct fm_word *w;
	struct import_account *a = c->mode == 1	 ? &c->defaults
				   : c->cur >= 0 ? &c->r->acc[c->cur]
						 : &c->server;

	if (!strcasecmp(t->s, "poll") || !strcasecmp(t->s, "skip") || !strcasecmp(t->s, "defaults"))
		fm_entry(c, t->s, t->line);
	else if (!strcasecmp(t->s, "set"))
		fm_set(c, t->line);
	else if (!strcasecmp(t->s, "user") || !strcasecmp(t->s, "username")) {
		if (c->i < c->n)
			fm_user(c, c->t[c->i++].s, t->line);
	} else if ((w = fm_word(t->s)) == NULL)
		note(c->r, c->file, t->line,
		     "\"%s\" is not a fetchmail keyword popfetchd knows: "
		     "not imported",
		     t->s);
	else if (w->args > 0 && c->i >= c->n)
		note(c->r, c->file, t->line, "%s needs a value", t->s);
	else
		fm_option(c, a, w, t->s, w->args > 0 ? c->t[c->i++].s : "", t->line);
}

void
import_parse_fetchmailrc(const char *text, size_t len, const char *file, struct import_result *r)
{
	struct fctx c = {.r = r, .file = file, .cur = -1};

	acc_init(&c.defaults);
	acc_init(&c.server);
	c.n = fm_tokens(text, len, &c.t);
	while (c.i < c.n)
		fm_word_at(&c);
	fm_end_entry(&c);
	for (size_t i = 0; i < r->n_acc; i++) {
		struct import_account *a = &r->acc[i];

		if (c.interval != NULL && a->interval == NULL)
			set_str(&a->interval, c.interval);
		if (a->pop3 < 0) {
			a->pop3 = 1;
			note(r, file, a->line,
			     "%s names no protocol (fetchmail tries IMAP, then "
			     "POP3): imported as POP3",
			     a->name);
		}
		if (a->tls < 0) {
			a->tls = a->starttls = 1;
			note(r, file, a->line,
			     "%s: without ssl fetchmail uses STLS when offered; "
			     "imported as tls: explicit, which requires it",
			     a->name);
		}
	}
	for (size_t i = 0; i < c.n; i++)
		free(c.t[i].s);
	free(c.t);
	free(c.interval);
	acc_clear(&c.defaults);
	acc_clear(&c.server);
	make_ids(r);
}

/* ---- the configurations ---- */

/* A YAML double-quoted scalar of s. */
static void
yaml_quoted(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '"' || ch == '\\')
			fprintf(f, "\\%c", ch);
		else if (ch < 0x20 || ch == 0x7f)
			fprintf(f, "\\x%02x", ch);
		else
			fputc(ch, f);
	}
	fputc('"', f);
}

/* A comment line's text: no line breaks or control characters in it. */
static void
comment_text(FILE *f, const char *s)
{
	for (; *s; s++)
		fputc((unsigned char)*s < 0x20 || *s == 0x7f ? '?' : *s, f);
}

static void
yaml_tls(FILE *f, const struct import_account *a)
{
	const char *tls = a->tls == 0 ? "none" : a->starttls == 0 ? "implicit" : "explicit";

	fprintf(f, "tls: %s\n", tls);
	if (a->port > 0)
		fprintf(f, "port: %d\n", a->port);
	if (a->certcheck == 0)
		fputs("tls_verify: false\n", f);
	if (a->ca_file != NULL) {
		fputs("tls_ca_file: ", f);
		yaml_quoted(f, a->ca_file);
		fputc('\n', f);
	}
	if (a->fingerprint != NULL)
		fprintf(f, "tls_fingerprint: %s\n", a->fingerprint);
}

char *
import_yaml(const struct import_account *a, const char *source, const char *password_file)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	if (f == NULL)
		abort();
	fputs("# imported from ", f);
	comment_text(f, source);
	fprintf(f, ", line %u: ", a->line);
	comment_text(f, a->name);
	fprintf(f, "\nid: %s\n", a->id);
	if (a->inactive == 1)
		fputs("status: inactive\n", f);
	fputs("server: ", f);
	yaml_quoted(f, a->server ? a->server : "");
	fputc('\n', f);
	yaml_tls(f, a);
	fputs("user: ", f);
	yaml_quoted(f, a->user ? a->user : "");
	fputc('\n', f);
	if (a->password_eval == 1)
		fputs("# passwordeval cannot be carried over (popfetchd runs no command): "
		      "write the password into this file, chmod 600\n",
		      f);
	if (password_file != NULL) {
		fputs("password_file: ", f);
		yaml_quoted(f, password_file);
		fputc('\n', f);
	}
	if (a->mechanism != NULL)
		fprintf(f, "sasl_mechanisms: [%s]\n", a->mechanism);
	fprintf(f, "remove_after_read: %s\n", a->keep == 1 ? "false" : "true");
	if (a->interval != NULL)
		fprintf(f, "poll_interval: %s\n", a->interval);
	if (a->max_size > 0)
		fprintf(f, "max_message_size: %llu\n", a->max_size);
	if (a->timeout > 0)
		fprintf(f, "timeouts:\n  connect: %ds\n  command: %ds\n", a->timeout, a->timeout);
	fprintf(f,
		"# popfetchd writes each message into a folder here, not to an MDA or mbox\n"
		"save_directory: %s/%s\n",
		SAVE_PLACEHOLDER, a->id);
	if (fclose(f) != 0)
		abort();
	return buf;
}

/* Configuration ids of the names: A-Z a-z 0-9 _ . -, unique. */
static void
make_ids(struct import_result *r)
{
	for (size_t i = 0; i < r->n_acc; i++) {
		struct import_account *a = &r->acc[i];
		char id[65];
		size_t n = 0;

		for (const char *s = a->name; *s && n < 56; s++)
			id[n++] = strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
					 "0123456789_.-",
					 *s)
					  ? *s
					  : '-';
		id[n] = '\0';
		if (n == 0 || id[0] == '.')
			snprintf(id, sizeof(id), "account%zu", i + 1);
		free(a->id);
		a->id = xstrdup(id);
		for (size_t j = 0, k = 2; j < i; j++)
			if (strcmp(r->acc[j].id, a->id) == 0) {
				free(a->id);
				a->id = xasprintf("%s-%zu", id, k++);
				j = (size_t)-1;
			}
	}
}

void
import_result_free(struct import_result *r)
{
	for (size_t i = 0; i < r->n_acc; i++)
		acc_clear(&r->acc[i]);
	for (size_t i = 0; i < r->n_notes; i++)
		free(r->notes[i]);
	free(r->acc);
	free(r->notes);
	memset(r, 0, sizeof(*r));
}

/* ---- the command ---- */

static char *
read_text(const char *file, size_t *len)
{
	FILE *f = fopen(file, "r");
	char *buf = xmalloc(IMPORT_MAX_FILE + 1);

	*len = f ? fread(buf, 1, IMPORT_MAX_FILE + 1, f) : 0;
	if (f == NULL || ferror(f) || *len > IMPORT_MAX_FILE) {
		fprintf(stderr, "popfetchd: cannot read %s: %s\n", file,
			f == NULL || ferror(f) ? strerror(errno) : "larger than 4 MiB");
		if (f != NULL)
			fclose(f);
		free(buf);
		return NULL;
	}
	fclose(f);
	buf[*len] = '\0';
	return buf;
}

static bool
wanted(const struct import_account *a)
{
	return a->pop3 != 0 && !a->alias;
}

static int
write_new(const char *path, const char *text, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);

	if (fd < 0 || util_write_all(fd, text, strlen(text)) < 0 || fsync(fd) < 0) {
		fprintf(stderr, "popfetchd: cannot write %s: %s\n", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	close(fd);
	fprintf(stderr, "popfetchd: wrote %s\n", path);
	return 0;
}

static void
print_all(const struct import_result *r, const char *file)
{
	for (size_t i = 0; i < r->n_acc; i++) {
		const struct import_account *a = &r->acc[i];
		char *pw = xasprintf("%s/%s.password", SECRETS_DIR, a->id),
		     *y = import_yaml(a, file, pw);

		printf("# ---- conf.d/%s.yaml ----\n%s", a->id, y);
		if (a->password != NULL)
			fprintf(stderr,
				"%s:%u: the password of %s is not printed: write it into %s "
				"(chmod 600), or import with -o DIR\n",
				file, a->line, a->name, pw);
		FREE_ALL(pw, y);
	}
}

/* Every file first checked, so that nothing is half written over. */
static int
write_all(const struct import_result *r, const char *file, const char *dir)
{
	int code = EX_OK;

	for (size_t i = 0; i < r->n_acc && code == EX_OK; i++)
		for (int k = 0; k < 2; k++) {
			char *p = xasprintf("%s/%s.%s", dir, r->acc[i].id, k ? "password" : "yaml");

			if (access(p, F_OK) == 0 || errno != ENOENT) {
				fprintf(stderr,
					"popfetchd: %s exists: not overwritten, nothing written\n",
					p);
				code = EX_CANTCREAT;
			}
			free(p);
		}
	for (size_t i = 0; i < r->n_acc && code == EX_OK; i++) {
		const struct import_account *a = &r->acc[i];
		char *pw = xasprintf("%s/%s.password", dir, a->id), *y = import_yaml(a, file, pw),
		     *yp = xasprintf("%s/%s.yaml", dir, a->id);

		if (a->password != NULL && write_new(pw, a->password, 0600) < 0)
			code = EX_CANTCREAT;
		else if (a->password == NULL)
			fprintf(stderr,
				"%s:%u: %s has no password to carry over: write it into %s "
				"(chmod 600)\n",
				file, a->line, a->name, pw);
		if (code == EX_OK && write_new(yp, y, 0640) < 0)
			code = EX_CANTCREAT;
		FREE_ALL(pw, y, yp);
	}
	return code;
}

/* The accounts to import, in r's order (the others freed). */
static size_t
keep_wanted(struct import_result *r)
{
	size_t n = 0;

	for (size_t i = 0; i < r->n_acc; i++) {
		if (wanted(&r->acc[i]))
			r->acc[n++] = r->acc[i];
		else
			acc_clear(&r->acc[i]);
	}
	r->n_acc = n;
	return n;
}

int
import_run(const char *kind, const char *file, const char *outdir)
{
	struct import_result r = {0};
	char dir[PATH_MAX], *text;
	size_t len;
	int code = EX_OK;

	if (strcmp(kind, "mpoprc") != 0 && strcmp(kind, "fetchmailrc") != 0) {
		fprintf(stderr, "popfetchd: import reads an mpoprc or a fetchmailrc, not \"%s\"\n",
			kind);
		return EX_USAGE;
	}
	if ((text = read_text(file, &len)) == NULL)
		return EX_NOINPUT;
	/* only after the file was read: an unreadable one leaves no directory behind */
	if (outdir != NULL && (util_mkdir_p(outdir, 0750) < 0 || realpath(outdir, dir) == NULL)) {
		fprintf(stderr, "popfetchd: cannot use %s: %s\n", outdir, strerror(errno));
		free(text);
		return EX_CANTCREAT;
	}
	if (kind[0] == 'm')
		import_parse_mpoprc(text, len, file, &r);
	else
		import_parse_fetchmailrc(text, len, file, &r);
	for (size_t i = 0; i < r.n_notes; i++)
		fprintf(stderr, "%s\n", r.notes[i]);
	if (keep_wanted(&r) == 0) {
		fprintf(stderr, "popfetchd: %s has no POP3 account to import\n", file);
		code = EX_DATAERR;
	} else if (outdir == NULL)
		print_all(&r, file);
	else
		code = write_all(&r, file, dir);
	import_result_free(&r);
	free(text);
	return code;
}
