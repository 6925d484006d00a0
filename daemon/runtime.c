/*
 * runtime — a configuration's TLS context, OAuth2 token source, SCRAM
 * salted password and S/MIME key (see runtime.h).
 */
#include <errno.h>
#include <libgen.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/dns.h>

#include "popfetchd/auth.h"
#include "popfetchd/config.h"
#include "popfetchd/log.h"
#include "popfetchd/oauth2.h"
#include "popfetchd/runtime.h"
#include "popfetchd/smime.h"
#include "popfetchd/store.h"
#include "popfetchd/tls.h"
#include "popfetchd/util.h"

/* A key that cannot be loaded does not stop the polls: its messages are
 * saved as they came, and meta.json and the log say why. */
static void
load_smime_key(struct runtime *rt)
{
	const struct conf_mailbox *mb = rt->mb;
	char *path = xasprintf("%s/%s.p12", rt->set->keystore_directory, mb->smime.key_name);
	char err[400];

	if (smime_key_load(path, mb->smime.key_password, &rt->smime_key, err, sizeof(err)) < 0) {
		log_warning(mb->id, "%s: encrypted messages are saved undecrypted", err);
		snprintf(rt->smime_why, sizeof(rt->smime_why), "the key could not be loaded (%s)",
			 err);
	}
	free(path);
}

void
runtime_oauth2_params(const struct conf_mailbox *mb, const char *state_dir,
		      struct oauth2_params *op)
{
	*op = (struct oauth2_params){
		.id = mb->id,
		.token_endpoint = mb->oauth2.token_endpoint,
		.client_id = mb->oauth2.client_id,
		.client_secret = mb->oauth2.client_secret,
		.scope = mb->oauth2.scope,
		.grant = mb->oauth2.grant == CONF_GRANT_REFRESH_TOKEN
				 ? OAUTH2_GRANT_REFRESH_TOKEN
				 : OAUTH2_GRANT_CLIENT_CREDENTIALS,
		.refresh_token_file = mb->oauth2.refresh_token_file,
		.ca_file = mb->oauth2.ca_file,
		.state_dir = state_dir,
		.timeout = (unsigned)mb->connect_timeout,
	};
}

const char **
runtime_mechanisms(const struct conf_mailbox *mb)
{
	const char **m;
	size_t n;

	if (mb->auth == CONF_AUTH_OAUTH2) {
		m = xcalloc(2, sizeof(char *));
		m[0] = mb->oauth2.mechanism == CONF_OAUTH_XOAUTH2 ? "XOAUTH2" : "OAUTHBEARER";
	} else if (mb->sasl_mechanisms != NULL) {
		m = xcalloc(mb->n_sasl_mechanisms + 1, sizeof(char *));
		for (size_t i = 0; i < mb->n_sasl_mechanisms; i++)
			m[i] = mb->sasl_mechanisms[i];
	} else {
		for (n = 0; conf_default_sasl_mechanisms[n] != NULL; n++)
			;
		m = xcalloc(n + 1, sizeof(char *));
		memcpy(m, conf_default_sasl_mechanisms, n * sizeof(char *));
	}
	return m;
}

int
runtime_tls_new(const struct conf_mailbox *mb, struct tls_ctx **ret, char *why, size_t whylen)
{
	struct tls_params tp = {.ca_file = mb->tls_ca_file,
				.verify = mb->tls_verify,
				.has_fingerprint = mb->has_fingerprint};

	*ret = NULL;
	if (mb->tls == CONF_TLS_NONE)
		return 0;
	memcpy(tp.fingerprint, mb->tls_fingerprint, sizeof(tp.fingerprint));
	return tls_ctx_new(&tp, ret, why, whylen);
}

struct evdns_base *
runtime_dns_new(struct event_base *base)
{
	struct evdns_base *dns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS |
							      EVDNS_BASE_DISABLE_WHEN_INACTIVE);

	/* no resolv.conf: IP literals still work */
	return dns != NULL ? dns : evdns_base_new(base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
}

void
runtime_log_level(const struct conf_set *set, int verbosity)
{
	if (verbosity > 0)
		log_set_level(LOG_LVL_DEBUG);
	else if (verbosity < 0)
		log_set_level(LOG_LVL_WARNING);
	else
		log_set_level(set->log_level_set ? (enum log_level)set->log_level : LOG_LVL_INFO);
}

static bool
same_string(const char *a, const char *b)
{
	return a == NULL || b == NULL ? a == b : strcmp(a, b) == 0;
}

/* Would a token source for b be the one prev has? Every oauth2.* setting,
 * the client secret's value, and what the source derives from the rest. */
static bool
same_oauth2(const struct runtime *prev, const struct conf_set *set, const struct conf_mailbox *b)
{
	const struct conf_mailbox *a = prev->mb;

	return prev->oauth2 != NULL && b->auth == CONF_AUTH_OAUTH2 &&
	       same_string(a->oauth2.token_endpoint, b->oauth2.token_endpoint) &&
	       same_string(a->oauth2.client_id, b->oauth2.client_id) &&
	       same_string(a->oauth2.client_secret, b->oauth2.client_secret) &&
	       same_string(a->oauth2.scope, b->oauth2.scope) &&
	       a->oauth2.grant == b->oauth2.grant &&
	       same_string(a->oauth2.refresh_token_file, b->oauth2.refresh_token_file) &&
	       a->oauth2.mechanism == b->oauth2.mechanism &&
	       same_string(a->oauth2.ca_file, b->oauth2.ca_file) &&
	       a->connect_timeout == b->connect_timeout && strcmp(a->id, b->id) == 0 &&
	       strcmp(prev->set->state_directory, set->state_directory) == 0;
}

int
runtime_init(struct runtime *rt, const struct conf_set *set, const struct conf_mailbox *mb,
	     struct oauth2_client *oauth, bool keep_fresh, char *why, size_t whylen)
{
	return runtime_reinit(rt, NULL, set, mb, oauth, keep_fresh, why, whylen);
}

int
runtime_reinit(struct runtime *rt, const struct runtime *prev, const struct conf_set *set,
	       const struct conf_mailbox *mb, struct oauth2_client *oauth, bool keep_fresh,
	       char *why, size_t whylen)
{
	memset(rt, 0, sizeof(*rt));
	rt->set = set;
	rt->mb = mb;
	if (runtime_tls_new(mb, &rt->tls, why, whylen) < 0)
		return -1;
	rt->state_dir = xasprintf("%s/%s", set->state_directory, mb->id);
	if (prev != NULL && same_oauth2(prev, set, mb)) {
		rt->oauth2 = oauth2_source_ref(prev->oauth2);
	} else if (mb->auth == CONF_AUTH_OAUTH2 && oauth != NULL) {
		struct oauth2_params op;
		runtime_oauth2_params(mb, rt->state_dir, &op);
		rt->oauth2 = oauth2_source_new(oauth, &op);
		if (keep_fresh)
			oauth2_source_keep_fresh(rt->oauth2, true);
	}
	if (mb->auth != CONF_AUTH_OAUTH2)
		rt->scram_cache = prev != NULL && prev->scram_cache != NULL &&
						  same_string(prev->mb->password, mb->password)
					  ? auth_scram_cache_dup(prev->scram_cache)
					  : auth_scram_cache_new();
	if (mb->smime.key_name != NULL)
		load_smime_key(rt);
	return 0;
}

/* key's directory dir is writable: 0, or -1 with why. */
static int
check_dir(const char *key, const char *dir, bool staging, char *why, size_t whylen)
{
	struct store_dir_check c;
	int r;

	store_check_dir(dir, staging, false, &c);
	if (c.err != 0)
		snprintf(why, whylen, "%s %s is not writable: %s%s", key, dir,
			 c.cannot_create ? strerror(c.err) : c.why,
			 c.err == EROFS ? "; under systemd add it to ReadWritePaths= (systemctl "
					  "edit popfetchd)"
					: "");
	r = c.err != 0 ? -1 : 0;
	store_dir_check_clear(&c);
	return r;
}

int
runtime_check_dirs(const struct conf_mailbox *mb, char *why, size_t whylen)
{
	char *copy;
	int r = 0;

	if (mb->save_directory != NULL)
		r = check_dir("save_directory", mb->save_directory, true, why, whylen);
	if (r == 0 && mb->auth == CONF_AUTH_OAUTH2 && mb->oauth2.refresh_token_file != NULL) {
		/* a rotated refresh token is written beside it, then renamed */
		copy = xstrdup(mb->oauth2.refresh_token_file);
		r = check_dir("the directory of oauth2.refresh_token_file", dirname(copy), false,
			      why, whylen);
		free(copy);
	}
	return r;
}

void
runtime_clear(struct runtime *rt)
{
	oauth2_source_free(rt->oauth2);
	auth_scram_cache_free(rt->scram_cache);
	smime_key_free(rt->smime_key);
	tls_ctx_free(rt->tls);
	free(rt->state_dir);
	memset(rt, 0, sizeof(*rt));
}

void
runtime_warn_tls(const struct conf_mailbox *mb)
{
	if (mb->tls == CONF_TLS_NONE)
		log_warning(mb->id, "tls: none: the password and the mail cross the network in "
				    "clear");
	else if (!mb->tls_verify && !mb->has_fingerprint)
		log_warning(mb->id, "tls_verify: false: the server's certificate is not checked; "
				    "anyone in the path can read the password and the mail");
}

void
runtime_warn_login(const struct conf_mailbox *mb, const char *mechanism)
{
	if (mb->tls == CONF_TLS_NONE && auth_cleartext(mechanism))
		log_warning(mb->id, "the password went to the server in clear (%s without TLS)",
			    mechanism);
}

int
runtime_state_owner(const char *dir, char *why, size_t whylen)
{
	struct stat sb;
	const struct passwd *pw;

	if (geteuid() != 0 || stat(dir, &sb) < 0 || sb.st_uid == 0)
		return 0;
	pw = getpwuid(sb.st_uid);
	if (pw != NULL)
		snprintf(why, whylen,
			 "the state directory %s belongs to %s: run as that user (runuser -u "
			 "%s -- popfetchd ...); as root, popfetchd would leave files there that "
			 "%s cannot replace",
			 dir, pw->pw_name, pw->pw_name, pw->pw_name);
	else
		snprintf(why, whylen,
			 "the state directory %s belongs to uid %lu: run as that user "
			 "(setpriv --reuid=%lu ...); as root, popfetchd would leave files there "
			 "that it cannot replace",
			 dir, (unsigned long)sb.st_uid, (unsigned long)sb.st_uid);
	return -1;
}

void
runtime_raise_fd_limit(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl) < 0)
			log_debug(NULL, "cannot raise RLIMIT_NOFILE to %llu: %s",
				  (unsigned long long)rl.rlim_max, strerror(errno));
	}
}

int
runtime_check_fd_limit(const struct conf_set *set, char *why, size_t whylen)
{
	struct rlimit rl;
	unsigned long long need, fit;
	char todo[80];

	if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur == RLIM_INFINITY)
		return 0;
	need = (unsigned long long)set->max_sessions * RUNTIME_FDS_PER_SESSION +
	       RUNTIME_FDS_RESERVED;
	if (need <= rl.rlim_cur)
		return 0;
	fit = rl.rlim_cur > RUNTIME_FDS_RESERVED
		      ? (rl.rlim_cur - RUNTIME_FDS_RESERVED) / RUNTIME_FDS_PER_SESSION
		      : 0;
	if (fit > 0)
		snprintf(todo, sizeof(todo), "set max_sessions to at most %llu, or raise the limit",
			 fit);
	else
		snprintf(todo, sizeof(todo), "raise the limit");
	snprintf(why, whylen,
		 "%s/popfetchd.yaml: max_sessions: %u session(s) at once need up to %llu open "
		 "files (%d each, %d for the process), but this process may open only %llu "
		 "(RLIMIT_NOFILE); %s: LimitNOFILE= under systemd (systemctl edit popfetchd), "
		 "ulimit -n in a shell",
		 set->dir, set->max_sessions, need, RUNTIME_FDS_PER_SESSION, RUNTIME_FDS_RESERVED,
		 (unsigned long long)rl.rlim_cur, todo);
	return -1;
}
