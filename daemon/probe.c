/*
 * probe — the test command: one configuration checked step by step.
 *
 * The network steps run as one POP3 session that holds its login after
 * CAPA (pop3_params.hold_login): connect, TLS, CAPA, then the OAuth2 token
 * (fetched while the session waits), then the login, STAT and QUIT. Each
 * pop3 progress event closes the step in progress; a failure belongs to the
 * step in progress, and every network step after it is skipped. The local
 * steps (S/MIME key, save directory) run whatever happened on the network.
 *
 * The token is fetched with a token source of its own whose cache lives in
 * a temporary directory: the test always asks the endpoint, and the
 * daemon's cached token is neither used nor replaced.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>
#include <jansson.h>

#include "popfetchd/auth.h"
#include "popfetchd/config.h"
#include "popfetchd/fetch.h"
#include "popfetchd/log.h"
#include "popfetchd/oauth2.h"
#include "popfetchd/pop3.h"
#include "popfetchd/probe.h"
#include "popfetchd/runtime.h"
#include "popfetchd/smime.h"
#include "popfetchd/store.h"
#include "popfetchd/tls.h"
#include "popfetchd/util.h"

/* The steps of the test, in the order they are reported. */
enum step {
	ST_CONFIG,  /* the configuration is valid and active, its TLS context builds */
	ST_CONNECT, /* DNS and TCP */
	ST_TLS,	    /* the handshake, and the certificate as verified */
	ST_CAPA,    /* the greeting and the capabilities the login goes by */
	ST_TOKEN,   /* OAuth2: an access token from the endpoint */
	ST_AUTH,    /* the login, with the mechanism chosen */
	ST_STAT,    /* messages and octets in the maildrop */
	ST_SMIME,   /* the S/MIME key loads */
	ST_SAVE,    /* save_directory can be written */
	ST_COUNT,
};

static const char *const step_names[] = {
	[ST_CONFIG] = "config", [ST_CONNECT] = "connect", [ST_TLS] = "tls",
	[ST_CAPA] = "capa",	[ST_TOKEN] = "token",	  [ST_AUTH] = "auth",
	[ST_STAT] = "stat",	[ST_SMIME] = "smime",	  [ST_SAVE] = "save",
};

enum result { PR_PENDING, PR_OK, PR_WARNING, PR_SKIPPED, PR_FAILED };

static const char *const result_names[] = {
	[PR_PENDING] = "skipped", [PR_OK] = "ok",	  [PR_WARNING] = "warning",
	[PR_SKIPPED] = "skipped", [PR_FAILED] = "FAILED",
};

struct report {
	enum result result;
	int exit_code; /* of a failure */
	char *detail;
	json_t *fields; /* structured extras for --json, NULL when none */
};

struct probe {
	const struct conf_set *set;
	const struct conf_mailbox *mb;
	struct event_base *base;
	struct tls_ctx *tls;
	struct pop3_session *pop3;
	struct oauth2_client *oauth;
	struct oauth2_source *src;
	struct oauth2_request *token_req;
	char *token_dir;	/* the token source's temporary state directory */
	char *token;		/* the access token of the test (wiped) */
	struct event *login_ev; /* resume_login(), from the loop */
	const char **mechanisms;
	enum step cur; /* the network step in progress; ST_SMIME when they are over */
	struct report steps[ST_COUNT];
};

static void
vset_step(struct probe *p, enum step st, enum result r, json_t *fields, const char *fmt, va_list ap)
{
	struct report *rep = &p->steps[st];

	free(rep->detail);
	json_decref(rep->fields);
	if (vasprintf(&rep->detail, fmt, ap) < 0)
		abort();
	for (char *c = rep->detail; *c != '\0'; c++)
		if (*c == '\n' || *c == '\r' || *c == '\t')
			*c = ' ';
	rep->result = r;
	rep->fields = fields;
	log_debug(p->mb != NULL ? p->mb->id : NULL, "test: %s %s: %s", step_names[st],
		  result_names[r], rep->detail);
}

static void set_step(struct probe *p, enum step st, enum result r, json_t *fields, const char *fmt,
		     ...) __attribute__((format(printf, 5, 6)));
static void fail_step(struct probe *p, enum step st, int code, json_t *fields, const char *fmt, ...)
	__attribute__((format(printf, 5, 6)));

/* Record a step's outcome: one line of detail, and the fields (taken). */
static void
set_step(struct probe *p, enum step st, enum result r, json_t *fields, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vset_step(p, st, r, fields, fmt, ap);
	va_end(ap);
}

/* A failed step, with the exit code it stands for. */
static void
fail_step(struct probe *p, enum step st, int code, json_t *fields, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vset_step(p, st, PR_FAILED, fields, fmt, ap);
	va_end(ap);
	p->steps[st].exit_code = code;
}

/* Every step from..to-1 not decided yet is skipped, with the reason. */
static void
skip_steps(struct probe *p, enum step from, enum step to, const char *why)
{
	for (enum step st = from; st < to; st++)
		if (p->steps[st].result == PR_PENDING)
			set_step(p, st, PR_SKIPPED, NULL, "%s", why);
}

/* The network steps are over: stop the loop (the session is freed after it). */
static void
network_done(struct probe *p)
{
	char why[64];

	for (enum step st = ST_CONNECT; st < ST_SMIME; st++)
		if (p->steps[st].result == PR_FAILED) {
			snprintf(why, sizeof(why), "not tried: the %s step failed", step_names[st]);
			skip_steps(p, ST_CONNECT, ST_SMIME, why);
			break;
		}
	p->cur = ST_SMIME;
	if (p->token_req != NULL) {
		oauth2_cancel(p->token_req);
		p->token_req = NULL;
	}
	event_base_loopbreak(p->base);
}

static const char *
where(const struct probe *p, char *buf, size_t size)
{
	snprintf(buf, size, strchr(p->mb->server, ':') ? "[%s]:%u" : "%s:%u", p->mb->server,
		 p->mb->port);
	return buf;
}

/* "3.2 MiB" and the like. */
static void
human_size(uint64_t n, char *buf, size_t size)
{
	static const char *const units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
	double v = (double)n;
	size_t u = 0;

	while (v >= 1024 && u < sizeof(units) / sizeof(units[0]) - 1) {
		v /= 1024;
		u++;
	}
	if (u == 0)
		snprintf(buf, size, "%llu bytes", (unsigned long long)n);
	else
		snprintf(buf, size, "%.1f %s", v, units[u]);
}

/* ---- the network steps ---- */

static json_t *
peer_fields(const struct tls_peer *tp, const char *verification, bool verified)
{
	json_t *o = json_object();

	json_object_set_new(o, "protocol",
			    tp->protocol[0] ? json_string(tp->protocol) : json_null());
	json_object_set_new(o, "cipher", tp->cipher[0] ? json_string(tp->cipher) : json_null());
	json_object_set_new(o, "subject", tp->has_cert ? json_string(tp->subject) : json_null());
	json_object_set_new(o, "issuer", tp->has_cert ? json_string(tp->issuer) : json_null());
	json_object_set_new(o, "not_before",
			    tp->has_cert ? json_string(tp->not_before) : json_null());
	json_object_set_new(o, "not_after",
			    tp->has_cert ? json_string(tp->not_after) : json_null());
	json_object_set_new(o, "sha256", tp->has_cert ? json_string(tp->sha256) : json_null());
	json_object_set_new(o, "verified", json_boolean(verified));
	json_object_set_new(o, "verification", json_string(verification));
	return o;
}

/* The address without the brackets of an IPv6 one, into buf. */
static const char *
bare_address(const char *addr, char *buf, size_t size)
{
	size_t n = strlen(addr);

	if (n >= 2 && addr[0] == '[' && addr[n - 1] == ']')
		snprintf(buf, size, "%.*s", (int)(n - 2), addr + 1);
	else
		snprintf(buf, size, "%s", addr);
	return buf;
}

static void
on_connected(struct probe *p, const char *address)
{
	const struct conf_mailbox *mb = p->mb;
	char addr[64];
	json_t *f = json_object();

	bare_address(address, addr, sizeof(addr));
	json_object_set_new(f, "address", json_string(addr));
	json_object_set_new(f, "port", json_integer(mb->port));
	if (strcmp(addr, mb->server) == 0)
		set_step(p, ST_CONNECT, PR_OK, f, "connected to %s port %u", addr, mb->port);
	else
		set_step(p, ST_CONNECT, PR_OK, f, "connected to %s port %u (%s)", addr, mb->port,
			 mb->server);
	if (mb->tls == CONF_TLS_NONE) {
		set_step(p, ST_TLS, PR_WARNING, NULL,
			 "tls: none: no TLS at all; the password and the mail cross the network "
			 "in clear");
		p->cur = ST_CAPA;
		return;
	}
	p->cur = ST_TLS;
}

static void
on_tls(struct probe *p, SSL *ssl)
{
	const struct conf_mailbox *mb = p->mb;
	struct tls_peer tp;
	char verdict[300];
	enum result r = PR_OK;
	bool verified = true;
	json_t *f;

	tls_peer(ssl, &tp);
	if (mb->has_fingerprint) {
		snprintf(verdict, sizeof(verdict),
			 "verified: the certificate matches tls_fingerprint%s",
			 tp.expired ? " (it has expired: the pin accepts it all the same)" : "");
		if (tp.expired)
			r = PR_WARNING;
	} else if (!mb->tls_verify) {
		snprintf(verdict, sizeof(verdict),
			 "NOT verified (tls_verify: false): anyone in the path can read the "
			 "password and the mail; verification would say: %s",
			 tp.chain_verdict);
		r = PR_WARNING;
		verified = false;
	} else {
		snprintf(verdict, sizeof(verdict), "verified: trusted by %s, valid for %s",
			 mb->tls_ca_file ? mb->tls_ca_file : "the system trust store", mb->server);
	}
	f = peer_fields(&tp, verdict, verified);
	json_object_set_new(f, "stls", json_boolean(mb->tls == CONF_TLS_EXPLICIT));
	set_step(p, ST_TLS, r, f, "%s%s %s; certificate %s, issuer %s, valid until %s%s; %s",
		 mb->tls == CONF_TLS_EXPLICIT ? "STLS, then " : "", tp.protocol, tp.cipher,
		 tp.subject, tp.issuer, tp.not_after, tp.expired ? " (expired)" : "", verdict);
	p->cur = ST_CAPA;
}

/* One more capability: in the list for --json and in the line. */
static void
add_capa(char *text, size_t size, json_t *list, const char *name)
{
	size_t n = strlen(text);

	snprintf(text + n, size - n, "%s%s", n > 0 ? " " : "", name);
	json_array_append_new(list, json_string(name));
}

/* The greeting without the APOP timestamp, which changes every time and
 * says nothing here; true when there was one (the server offers APOP). */
static bool
greeting_text(const char *g, char *buf, size_t size)
{
	const char *lt = strchr(g, '<');
	bool apop = lt != NULL && strchr(lt, '@') != NULL && strchr(lt, '>') != NULL;
	size_t n = apop ? (size_t)(lt - g) : strlen(g);

	while (n > 0 && g[n - 1] == ' ')
		n--;
	snprintf(buf, size, "%.*s", (int)n, g);
	return apop;
}

/* The capabilities that matter to popfetchd, in a few words. */
static void
on_capa(struct probe *p, const char *server_greeting)
{
	const struct pop3_capa *c = pop3_capa(p->pop3);
	const struct {
		bool on;
		const char *name;
	} flags[] = {
		{c->uidl, "UIDL"},
		{c->top, "TOP"},
		{c->pipelining, "PIPELINING"},
		{c->user, "USER"},
		{c->utf8, "UTF8"},
		{c->resp_codes, "RESP-CODES"},
		{c->auth_resp_code, "AUTH-RESP-CODE"},
		{c->stls, "STLS"},
	};
	json_t *caps = json_array(), *sasl = json_array(), *f = json_object();
	char text[512] = "", greeting[128], word[300];
	char *copy, *save = NULL;
	bool apop;

	for (size_t i = 0; i < sizeof(flags) / sizeof(flags[0]); i++)
		if (flags[i].on)
			add_capa(text, sizeof(text), caps, flags[i].name);
	if (c->login_delay > 0) {
		snprintf(word, sizeof(word), "LOGIN-DELAY %u", c->login_delay);
		add_capa(text, sizeof(text), caps, word);
	}
	apop = greeting_text(server_greeting, greeting, sizeof(greeting));
	if (apop)
		add_capa(text, sizeof(text), caps, "APOP");
	if (c->sasl[0] != '\0') {
		size_t n = strlen(text);
		snprintf(text + n, sizeof(text) - n, "%sSASL(%s)", n > 0 ? " " : "", c->sasl);
		copy = xstrdup(c->sasl);
		for (char *w = strtok_r(copy, " ", &save); w != NULL;
		     w = strtok_r(NULL, " ", &save))
			json_array_append_new(sasl, json_string(w));
		free(copy);
	}
	json_object_set_new(f, "greeting", json_string(greeting));
	json_object_set_new(f, "capabilities", caps);
	json_object_set_new(f, "sasl", sasl);
	if (!c->seen)
		set_step(p, ST_CAPA, PR_OK, f,
			 "greeting \"%s\"; no CAPA (an RFC 1939 server): USER/PASS and UIDL are "
			 "assumed",
			 greeting);
	else
		set_step(p, ST_CAPA, c->uidl ? PR_OK : PR_WARNING, f, "greeting \"%s\"; %s%s%s",
			 greeting, text[0] ? text : "(nothing)",
			 p->mb->tls == CONF_TLS_EXPLICIT ? " (asked again inside TLS)" : "",
			 c->uidl ? ""
				 : "; no UIDL: without it popfetchd cannot tell new messages from "
				   "old ones (receive fails with 76 when there is mail)");
	p->cur = ST_TOKEN;
	/* the session enters its held login when this returns */
	event_active(p->login_ev, 0, 0);
}

static void
on_token(void *arg, enum oauth2_status status, const char *token, const char *detail)
{
	struct probe *p = arg;
	json_t *f = json_object();
	time_t expiry, now = time(NULL);
	char until[32] = "";
	struct tm tm;

	p->token_req = NULL;
	json_object_set_new(f, "token_endpoint", json_string(p->mb->oauth2.token_endpoint));
	if (status != OAUTH2_OK) {
		fail_step(p, ST_TOKEN,
			  status == OAUTH2_REFUSED ? EX_NOPERM
			  : status == OAUTH2_LOCAL ? EX_IOERR
						   : EX_TEMPFAIL,
			  f, "%s", detail != NULL ? detail : "no access token");
		/* the session waits in its held login: end it politely; the
		 * network steps are over whatever becomes of the QUIT */
		p->cur = ST_SMIME;
		pop3_quit(p->pop3);
		return;
	}
	p->token = xstrdup(token);
	expiry = oauth2_source_expiry(p->src);
	if (expiry > 0 && gmtime_r(&expiry, &tm) != NULL)
		strftime(until, sizeof(until), "%Y-%m-%dT%H:%M:%SZ", &tm);
	json_object_set_new(f, "expires_at", until[0] ? json_string(until) : json_null());
	json_object_set_new(f, "expires_in",
			    expiry > now ? json_integer((json_int_t)(expiry - now)) : json_null());
	set_step(p, ST_TOKEN, PR_OK, f,
		 "%s issued an access token (%s grant), valid until %s (%lld s)",
		 p->mb->oauth2.token_endpoint,
		 p->mb->oauth2.grant == CONF_GRANT_REFRESH_TOKEN ? "refresh_token"
								 : "client_credentials",
		 until[0] ? until : "?", (long long)(expiry > now ? expiry - now : 0));
	p->cur = ST_AUTH;
	pop3_login(p->pop3, p->token);
}

static void
on_progress(void *arg, enum pop3_progress what, const struct pop3_progress_info *info)
{
	struct probe *p = arg;

	switch (what) {
	case POP3_PROGRESS_CONNECTED:
		on_connected(p, info->address);
		break;
	case POP3_PROGRESS_TLS:
		on_tls(p, info->ssl);
		break;
	case POP3_PROGRESS_CAPA:
		on_capa(p, info->greeting);
		break;
	}
}

/* From the loop, once the session holds its login after CAPA: fetch the
 * token (OAuth2) or log in at once. */
static void
resume_login(evutil_socket_t fd, short what, void *arg)
{
	struct probe *p = arg;

	(void)fd;
	(void)what;
	if (p->cur != ST_TOKEN)
		return; /* the session ended meanwhile */
	if (p->mb->auth != CONF_AUTH_OAUTH2) {
		set_step(p, ST_TOKEN, PR_SKIPPED, NULL, "auth: sasl: no token needed");
		p->cur = ST_AUTH;
		pop3_login(p->pop3, NULL);
		return;
	}
	if (p->src == NULL) {
		fail_step(p, ST_TOKEN, EX_IOERR, NULL,
			  "no temporary directory for the token cache (see the log)");
		p->cur = ST_SMIME;
		pop3_quit(p->pop3);
		return;
	}
	p->token_req = oauth2_get_token(p->src, false, on_token, p);
}

static void
on_ready(void *arg)
{
	struct probe *p = arg;
	const char *mech = pop3_mechanism(p->pop3);
	json_t *f = json_object();
	bool clear = p->mb->tls == CONF_TLS_NONE && auth_cleartext(mech);

	json_object_set_new(f, "mechanism", json_string(mech));
	json_object_set_new(f, "user", json_string(p->mb->user));
	set_step(p, ST_AUTH, clear ? PR_WARNING : PR_OK, f, "logged in as %s with %s%s",
		 p->mb->user, mech,
		 clear ? "; the password crossed the network in clear (tls: none)" : "");
	p->cur = ST_STAT;
	pop3_stat(p->pop3);
}

static void
on_stat(void *arg, unsigned long count, uint64_t size)
{
	struct probe *p = arg;
	json_t *f = json_object();
	char human[32];

	human_size(size, human, sizeof(human));
	json_object_set_new(f, "count", json_integer((json_int_t)count));
	json_object_set_new(f, "size", json_integer((json_int_t)size));
	set_step(p, ST_STAT, PR_OK, f, "%lu message%s, %llu octets%s%s%s", count,
		 count == 1 ? "" : "s", (unsigned long long)size, size >= 1024 ? " (" : "",
		 size >= 1024 ? human : "", size >= 1024 ? ")" : "");
	p->cur = ST_SMIME;
	pop3_quit(p->pop3);
}

static void
on_quit(void *arg, bool ok)
{
	struct probe *p = arg;

	if (!ok)
		log_debug(p->mb->id, "test: QUIT was not answered +OK (nothing was changed)");
	network_done(p);
}

static void
on_failed(void *arg, const struct pop3_error *err)
{
	struct probe *p = arg;
	enum step st = p->cur;
	json_t *f = NULL;

	if (st == ST_SMIME) {
		/* only QUIT was left, and nothing was changed */
		log_debug(p->mb->id, "test: at QUIT: %s", err->detail);
		network_done(p);
		return;
	}
	if (st == ST_TOKEN) {
		/* the server went away while the token was fetched */
		set_step(p, ST_TOKEN, PR_SKIPPED, NULL,
			 "not finished: the server ended the session meanwhile");
		st = ST_AUTH;
	}
	if (st == ST_TLS && err->ssl != NULL) {
		/* what the server presented, also when it was refused */
		struct tls_peer tp;
		tls_peer(err->ssl, &tp);
		f = peer_fields(&tp, err->detail, false);
		json_object_set_new(f, "stls", json_boolean(p->mb->tls == CONF_TLS_EXPLICIT));
	}
	if (st == ST_AUTH && pop3_mechanism(p->pop3) != NULL) {
		f = json_object();
		json_object_set_new(f, "mechanism", json_string(pop3_mechanism(p->pop3)));
		json_object_set_new(f, "user", json_string(p->mb->user));
	}
	if (st == ST_CONNECT)
		fail_step(p, st, fetch_failure_exit(err->fail), f, "%s (port %u)", err->detail,
			  p->mb->port);
	else
		fail_step(p, st, fetch_failure_exit(err->fail), f, "%s", err->detail);
	network_done(p);
}

/* listing, data, retrieved and deleted never come: nothing is asked for */
static const struct pop3_events probe_events = {.ready = on_ready,
						.quit = on_quit,
						.failed = on_failed,
						.progress = on_progress,
						.stat = on_stat};

/* ---- setting up and tearing down ---- */

/* A token source of the test's own, its cache in a temporary directory. */
static void
token_source_new(struct probe *p)
{
	const struct conf_mailbox *mb = p->mb;
	const char *tmp = getenv("TMPDIR");
	char *dir = xasprintf("%s/popfetchd-test-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");

	if (mkdtemp(dir) == NULL) {
		log_warning(mb->id, "test: cannot create a temporary directory (%s): %s", dir,
			    strerror(errno));
		free(dir);
		return;
	}
	p->token_dir = dir;
	p->oauth = oauth2_client_new(p->base);
	struct oauth2_params op;
	runtime_oauth2_params(mb, dir, &op);
	p->src = oauth2_source_new(p->oauth, &op);
}

/* Remove the temporary token directory and what the source wrote in it. */
static void
token_dir_remove(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;

	if (d != NULL) {
		while ((e = readdir(d)) != NULL)
			if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
				unlinkat(dirfd(d), e->d_name, 0);
		closedir(d);
	}
	if (rmdir(dir) < 0 && errno != ENOENT)
		log_warning(NULL, "test: cannot remove %s: %s", dir, strerror(errno));
}

static void
run_network(struct probe *p)
{
	const struct conf_mailbox *mb = p->mb;
	struct evdns_base *dns;
	struct pop3_params pp;

	p->base = event_base_new();
	if (p->base == NULL)
		abort();
	dns = runtime_dns_new(p->base);
	if (mb->auth == CONF_AUTH_OAUTH2)
		token_source_new(p);
	p->mechanisms = runtime_mechanisms(mb);
	p->login_ev = event_new(p->base, -1, 0, resume_login, p);
	if (p->login_ev == NULL)
		abort();

	fetch_pop3_params(mb, p->tls, p->mechanisms, NULL, &pp);
	pp.hold_login = true;
	p->cur = ST_CONNECT;
	p->pop3 = pop3_session_new(p->base, dns, &pp, &probe_events, p);
	pop3_session_start(p->pop3);
	/* until network_done() */
	event_base_dispatch(p->base);
	skip_steps(p, ST_CONNECT, ST_SMIME, "not finished");

	pop3_session_free(p->pop3);
	p->pop3 = NULL;
	event_free(p->login_ev);
	p->login_ev = NULL;
	oauth2_cancel(p->token_req);
	p->token_req = NULL;
	oauth2_source_free(p->src);
	p->src = NULL;
	oauth2_client_free(p->oauth);
	p->oauth = NULL;
	/* run what is still pending (deferred frees) */
	event_base_loop(p->base, EVLOOP_NONBLOCK);
	evdns_base_free(dns, 0);
	event_base_free(p->base);
	p->base = NULL;
	if (p->token_dir != NULL)
		token_dir_remove(p->token_dir);
}

/* ---- the local steps ---- */

static void
check_smime(struct probe *p)
{
	const struct conf_mailbox *mb = p->mb;
	struct smime_key *key = NULL;
	struct smime_key_info info;
	char err[512];
	char *path;
	json_t *f;

	if (mb->smime.key_name == NULL) {
		set_step(p, ST_SMIME, PR_SKIPPED, NULL,
			 "no smime.key_name: encrypted mail is saved as it came");
		return;
	}
	path = xasprintf("%s/%s.p12", p->set->keystore_directory, mb->smime.key_name);
	f = json_object();
	json_object_set_new(f, "path", json_string(path));
	/* err names the file and what is wrong, never the password */
	if (smime_key_load(path, mb->smime.key_password, &key, err, sizeof(err)) < 0) {
		fail_step(p, ST_SMIME, EX_CONFIG, f, "%s", err);
		free(path);
		return;
	}
	smime_key_info(key, &info);
	json_object_set_new(f, "subject", json_string(info.subject));
	json_object_set_new(f, "not_after",
			    info.not_after[0] ? json_string(info.not_after) : json_null());
	set_step(p, ST_SMIME, info.expired ? PR_WARNING : PR_OK, f,
		 "%s loads with its password: certificate %s, valid until %s%s", path, info.subject,
		 info.not_after[0] ? info.not_after : "?",
		 info.expired ? " (expired: mail encrypted to it still decrypts, but senders "
				"will refuse to encrypt to it)"
			      : "");
	smime_key_free(key);
	free(path);
}

/*
 * What the store needs: save_directory (or, before the first receive, the
 * directory it will be created in) and its .tmp take new files; a probe file
 * is created and removed where the messages are staged.
 */
static void
check_save(struct probe *p)
{
	const char *save = p->mb->save_directory;
	struct store_dir_check c;
	json_t *f;

	if (save == NULL) {
		set_step(p, ST_SAVE, PR_SKIPPED, NULL,
			 "no save_directory (save_text and save_attachments are off): nothing "
			 "is written");
		return;
	}
	f = json_object();
	json_object_set_new(f, "path", json_string(save));
	store_check_dir(save, true, true, &c);
	if (c.err != 0) {
		fail_step(p, ST_SAVE, EX_IOERR, f, "%s", c.why);
	} else if (c.missing) {
		set_step(p, ST_SAVE, PR_OK, f,
			 "%s does not exist yet; the first receive creates it (%s takes new "
			 "entries)",
			 save, c.where);
	} else {
		json_object_set_new(f, "probe_file", json_string(c.probe));
		set_step(p, ST_SAVE, PR_OK, f, "%s is writable (created and removed %s)", save,
			 c.probe);
	}
	store_dir_check_clear(&c);
}

/* ---- the configuration, the report ---- */

/* Load the set as the other commands do; NULL with the config step failed. */
static struct conf_set *
load(struct probe *p, const struct probe_options *o)
{
	struct conf_errors errs = {0};
	struct conf_set *set = NULL;

	if (conf_load(o->confdir, &set, &errs) < 0) {
		json_t *lines = json_array(), *f = json_object();
		for (size_t i = 0; i < errs.n; i++) {
			fprintf(stderr, "%s\n", errs.lines[i]);
			json_array_append_new(lines, json_string(errs.lines[i]));
		}
		json_object_set_new(f, "errors", lines);
		fail_step(p, ST_CONFIG, EX_CONFIG, f, "%zu configuration error(s) in %s%s%s",
			  errs.n, o->confdir, errs.n > 0 ? ", the first: " : "",
			  errs.n > 0 ? errs.lines[0] : "");
		conf_errors_clear(&errs);
		return NULL;
	}
	conf_errors_clear(&errs);
	runtime_log_level(set, o->verbosity);
	return set;
}

/* As root, nothing written where another user keeps the state (runtime.h). */
static bool
state_owned(struct probe *p, const struct conf_mailbox *mb, json_t *f)
{
	char why[600], *dir = xasprintf("%s/%s", p->set->state_directory, mb->id);
	bool ok = runtime_state_owner(p->set->state_directory, why, sizeof(why)) == 0 &&
		  runtime_state_owner(dir, why, sizeof(why)) == 0;

	free(dir);
	if (!ok)
		fail_step(p, ST_CONFIG, EX_IOERR, f, "%s", why);
	return ok;
}

/* The configuration named, active, with a TLS context that can be built. */
static bool
check_config(struct probe *p, const struct probe_options *o)
{
	const struct conf_mailbox *mb = conf_find(p->set, o->id);
	char err[512], at[300];
	json_t *f;

	if (mb == NULL) {
		fail_step(p, ST_CONFIG, EX_CONFIG, NULL,
			  "no configuration with id \"%s\" in %s/conf.d", o->id, p->set->dir);
		return false;
	}
	f = json_object();
	json_object_set_new(f, "file", json_string(mb->file));
	if (!mb->active) {
		fail_step(p, ST_CONFIG, EX_CONFIG, f,
			  "the configuration is inactive (status: inactive in %s)", mb->file);
		return false;
	}
	if (!state_owned(p, mb, f))
		return false;
	p->mb = mb;
	if (runtime_tls_new(mb, &p->tls, err, sizeof(err)) < 0) {
		fail_step(p, ST_CONFIG, EX_CONFIG, f, "%s: %s", mb->file, err);
		return true; /* the local steps still run */
	}
	json_object_set_new(f, "server", json_string(mb->server));
	json_object_set_new(f, "port", json_integer(mb->port));
	json_object_set_new(f, "tls", json_string(conf_tls_name(mb->tls)));
	json_object_set_new(f, "auth", json_string(conf_auth_name(mb->auth)));
	json_object_set_new(f, "user", json_string(mb->user));
	set_step(p, ST_CONFIG, PR_OK, f, "%s: %s, tls %s, auth %s, user %s", mb->file,
		 where(p, at, sizeof(at)), conf_tls_name(mb->tls), conf_auth_name(mb->auth),
		 mb->user);
	return true;
}

static int
exit_code(const struct probe *p)
{
	for (enum step st = 0; st < ST_COUNT; st++)
		if (p->steps[st].result == PR_FAILED)
			return p->steps[st].exit_code;
	return 0;
}

static void
print_report(const struct probe *p, const struct probe_options *o, int code)
{
	if (!o->json) {
		for (enum step st = 0; st < ST_COUNT; st++)
			printf("%-7s %-7s %s\n", step_names[st], result_names[p->steps[st].result],
			       p->steps[st].detail);
		fflush(stdout);
		return;
	}
	json_t *out = json_object(), *steps = json_array();
	for (enum step st = 0; st < ST_COUNT; st++) {
		const struct report *rep = &p->steps[st];
		json_t *s = json_object();
		json_object_set_new(s, "step", json_string(step_names[st]));
		json_object_set_new(s, "result", json_string(result_names[rep->result]));
		json_object_set_new(s, "detail", json_string(rep->detail));
		if (rep->result == PR_FAILED)
			json_object_set_new(s, "exit_code", json_integer(rep->exit_code));
		if (rep->fields != NULL)
			json_object_update(s, rep->fields);
		json_array_append_new(steps, s);
	}
	json_object_set_new(out, "configuration", json_string(o->id));
	json_object_set_new(out, "ok", json_boolean(code == 0));
	json_object_set_new(out, "exit_code", json_integer(code));
	json_object_set_new(out, "steps", steps);
	char *text = json_dumps(out, JSON_PRESERVE_ORDER | JSON_COMPACT);
	puts(text);
	fflush(stdout);
	free(text);
	json_decref(out);
}

int
probe_run(const struct probe_options *o)
{
	struct probe p = {.cur = ST_CONNECT};
	struct conf_set *set;
	int code;

	set = load(&p, o);
	p.set = set;
	if (set == NULL || !check_config(&p, o)) {
		skip_steps(&p, ST_CONNECT, ST_COUNT, "not tried: no usable configuration");
	} else {
		if (p.steps[ST_CONFIG].result == PR_FAILED)
			skip_steps(&p, ST_CONNECT, ST_SMIME,
				   "not tried: the configuration cannot be used");
		else
			run_network(&p);
		check_smime(&p);
		check_save(&p);
	}
	code = exit_code(&p);
	print_report(&p, o, code);

	for (enum step st = 0; st < ST_COUNT; st++) {
		free(p.steps[st].detail);
		json_decref(p.steps[st].fields);
	}
	if (p.token != NULL) {
		explicit_bzero(p.token, strlen(p.token));
		free(p.token);
	}
	free(p.token_dir);
	free(p.mechanisms);
	tls_ctx_free(p.tls);
	conf_set_free(set);
	return code;
}
