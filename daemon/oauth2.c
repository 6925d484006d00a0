/*
 * oauth2 — OAuth2 access tokens over libcurl's multi interface on the
 * process's libevent loop.
 *
 * The curl glue follows curl's docs/examples/multi-event.c: curl says which
 * sockets to watch (CURLMOPT_SOCKETFUNCTION: one event per socket) and when
 * to wake it (CURLMOPT_TIMERFUNCTION: one timer per client); both events call
 * curl_multi_socket_action(), then check_multi_info() collects the finished
 * transfers.
 *
 * A source has at most one transfer in flight; every request made while it
 * runs waits for its result. A finished request moves to the source's ready
 * list and its callback runs from the source's deliver event, never from
 * inside oauth2_get_token() or a curl callback, so that a callback may ask
 * for another token, cancel a request or free the source (which then dies
 * once the deliver event is over).
 *
 * Decisions:
 * - A refresh token the endpoint rotated that cannot be written back to
 *   refresh_token_file is kept in memory and used for every later request
 *   (the old one may be revoked by now), the write is retried at every
 *   oauth2_get_token(), and until it succeeds every caller gets OAUTH2_LOCAL:
 *   a source that cannot keep its only credential fails loudly (exit 74)
 *   instead of working until the next restart and then being refused. The
 *   new access token is kept in memory meanwhile, so nothing is fetched twice.
 * - The token cache is an optimisation: when it cannot be written the token
 *   is still handed out and a warning is logged (a state directory that is
 *   not writable is reported by the store as well).
 * - Refused (exit 77) are the RFC 6749 §5.2 errors that a retry cannot cure:
 *   invalid_request, invalid_client, invalid_grant, unauthorized_client,
 *   unsupported_grant_type, invalid_scope, plus access_denied, with HTTP
 *   400, 401 or 403, and a bare 401. Everything else (5xx, 429, other
 *   errors such as temporarily_unavailable, network, TLS, timeouts,
 *   malformed answers) is unavailable (exit 75).
 * - Secrets (client secret, refresh and access tokens) appear in no log line
 *   and no detail: the endpoint's own text is made printable (util.h),
 *   bounded, and any secret it echoes is replaced by <redacted>. Buffers
 *   that held secrets are wiped before they are freed.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/queue.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/event.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include "build-config.h"
#include "popfetchd/log.h"
#include "popfetchd/oauth2.h"
#include "popfetchd/util.h"

#define BODY_MAX	(64 * 1024) /* the endpoint's answer */
#define FILE_MAX	(64 * 1024) /* the cache, the refresh token file */
#define ERROR_MAX	64	    /* the endpoint's error code, in a detail */
#define DESCRIPTION_MAX 240	    /* the endpoint's error_description, in a detail */
#define DEFAULT_TIMEOUT 30
#define DEFAULT_EXPIRES 3600
#define MAX_EXPIRES	(366L * 86400)
#define MIN_TTL		60  /* a token with less to live is not handed out */
#define FRESH_LATEST	300 /* keep_fresh: at the latest this long before expiry */
#define BACKOFF_MIN	10
#define BACKOFF_MAX	600
#define CACHE_NAME	"oauth2-token"
#define LOCK_NAME	"oauth2.lock"
#define LOCK_RETRY_MS	100 /* another process refreshes: try its lock again this soon */

TAILQ_HEAD(request_list, oauth2_request);

struct sock_watch {
	LIST_ENTRY(sock_watch) link;
	curl_socket_t fd;
	struct event *ev;
};

struct oauth2_client {
	struct event_base *base;
	CURLM *multi;
	struct event *timer; /* curl's timeout */
	LIST_HEAD(, oauth2_source) sources;
	LIST_HEAD(, sock_watch) socks;
	oauth2_observe_cb observe;
	void *observe_arg;
};

struct transfer {
	struct oauth2_source *src;
	CURL *easy;
	struct curl_slist *headers;
	char *form;	     /* secrets: wiped */
	char *refresh_token; /* the one sent (refresh_token grant) */
	char *body;	     /* BODY_MAX bytes once the answer starts */
	size_t len;
	bool too_big;
	char errbuf[CURL_ERROR_SIZE];
};

struct oauth2_request {
	TAILQ_ENTRY(oauth2_request) link;
	struct request_list *list; /* the source's waiting or ready list */
	oauth2_token_cb cb;
	void *arg;
	enum oauth2_status status;
	char *token;
	char *detail;
};

struct oauth2_source {
	LIST_ENTRY(oauth2_source) link;
	struct oauth2_client *client; /* NULL once the client is freed */
	unsigned refs;
	char *id;
	char *endpoint;
	char *host; /* host[:port] of the endpoint, for details */
	char *client_id;
	char *client_secret;
	char *scope;
	enum oauth2_grant grant;
	char *refresh_token_file;
	char *ca_file;
	char *state_dir;
	char *cache_path;
	char *lock_path;
	long timeout;
	char binding[2 * SHA256_DIGEST_LENGTH + 1];

	char *token; /* the current access token, or NULL */
	time_t obtained_at, expires_at;
	char *unsaved_refresh_token; /* rotated, not yet written back */

	/* a refresh holds LOCK_NAME from before it reads the refresh token
	 * until the rotated one is written back: one process at a time */
	int lock_fd;		     /* -1 when not held */
	bool locking;		     /* waiting for another process's lock */
	time_t lock_deadline;	     /* when waiting ends in failure */
	struct event *lock_ev;	     /* the next try */
	struct transfer *xfer;	     /* in flight, or NULL */
	struct request_list waiting; /* for xfer */
	struct request_list ready;   /* for the deliver event */
	struct event *deliver_ev;
	bool delivering;
	bool dead; /* freed during delivery: destroyed after it */

	bool keep_fresh;
	struct event *fresh_ev;
	unsigned backoff; /* seconds; 0 after a success */

	unsigned requests;
};

static void start_transfer(struct oauth2_source *src);
static void lock_release(struct oauth2_source *src);

static const char *
grant_name(enum oauth2_grant grant)
{
	return grant == OAUTH2_GRANT_REFRESH_TOKEN ? "refresh_token" : "client_credentials";
}

static void
free_secret(char *s)
{
	if (s == NULL)
		return;
	explicit_bzero(s, strlen(s));
	free(s);
}

static char *
xstrdup_or_null(const char *s)
{
	return s != NULL ? xstrdup(s) : NULL;
}

/* Tokens go into SASL strings and one-line files: printable, no blanks. */
static bool
token_chars_ok(const char *s)
{
	if (*s == '\0')
		return false;
	for (; *s != '\0'; s++)
		if ((unsigned char)*s <= 0x20 || (unsigned char)*s >= 0x7f)
			return false;
	return true;
}

/* Replace every secret found in s by <redacted>. Takes s, returns a new
 * string (or s itself). */
static char *
redact(char *s, const char *const *secrets, size_t nsecrets)
{
	static const char mark[] = "<redacted>";

	for (size_t k = 0; k < nsecrets; k++) {
		const char *secret = secrets[k];
		size_t slen, n = 0, cap;
		char *out, *hit;
		const char *p;

		if (secret == NULL || *secret == '\0' || strstr(s, secret) == NULL)
			continue;
		slen = strlen(secret);
		cap = strlen(s) / slen * (sizeof(mark) - 1) + strlen(s) + 1;
		out = xmalloc(cap);
		for (p = s; (hit = strstr(p, secret)) != NULL; p = hit + slen) {
			memcpy(out + n, p, (size_t)(hit - p));
			n += (size_t)(hit - p);
			memcpy(out + n, mark, sizeof(mark) - 1);
			n += sizeof(mark) - 1;
		}
		strcpy(out + n, p);
		free_secret(s);
		s = out;
	}
	return s;
}

/* The endpoint's text made printable (util.h), cut to about max bytes. */
static char *
printable_dup(const char *s, size_t max)
{
	char *out = xmalloc(max + 4);

	util_printable(s, strlen(s), out, max + 4);
	return out;
}

/* What the endpoint said, for a log line: the secrets of the exchange
 * redacted before the text is escaped and cut, where a secret split by an
 * escape or the cut would no longer be found whole. */
static char *
endpoint_text(const struct oauth2_source *src, const struct transfer *x, const char *s, size_t max)
{
	const char *secrets[] = {src->client_secret, x->refresh_token, src->token,
				 src->unsaved_refresh_token};
	char *raw = redact(xstrdup(s), secrets, sizeof(secrets) / sizeof(secrets[0]));
	char *out = printable_dup(raw, max);

	free_secret(raw);
	return out;
}

/* host or host:port of url, never its path or query (which may hold
 * anything). */
static char *
endpoint_host(const char *url)
{
	CURLU *u = curl_url();
	char *host = NULL, *port = NULL, *raw, *ret;

	if (u != NULL && curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
	    curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK) {
		if (curl_url_get(u, CURLUPART_PORT, &port, 0) == CURLUE_OK)
			raw = xasprintf("%s:%s", host, port);
		else
			raw = xstrdup(host);
	} else {
		raw = xstrdup("(invalid URL)");
	}
	curl_free(host);
	curl_free(port);
	curl_url_cleanup(u);
	ret = printable_dup(raw, 255);
	free(raw);
	return ret;
}

/* ---- files ---- */

/* At most max bytes of a regular file, NUL-terminated. 0 or -errno. */
static int
read_small_file(const char *path, bool nofollow, char **ret, size_t *ret_len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | (nofollow ? O_NOFOLLOW : 0));
	struct stat st;
	char *buf;
	size_t len = 0;
	int r = 0;

	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		r = -errno;
		close(fd);
		return r;
	}
	if (!S_ISREG(st.st_mode) || st.st_size > FILE_MAX) {
		close(fd);
		return S_ISREG(st.st_mode) ? -EFBIG : -EINVAL;
	}
	buf = xmalloc(FILE_MAX + 1);
	while (len < FILE_MAX) {
		ssize_t n = read(fd, buf + len, FILE_MAX - len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = -errno;
			break;
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	if (r < 0) {
		explicit_bzero(buf, len);
		free(buf);
		return r;
	}
	buf[len] = '\0';
	*ret = buf;
	*ret_len = len;
	return 0;
}

/* The refresh token: the first line of the file, trimmed. */
static int
read_refresh_token(const char *path, char **ret)
{
	char *buf, *start, *end;
	size_t len;
	int r;

	if ((r = read_small_file(path, false, &buf, &len)) < 0)
		return r;
	start = buf + strspn(buf, " \t\r");
	end = start + strcspn(start, "\n");
	while (end > start && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r'))
		end--;
	*end = '\0';
	if (*start == '\0')
		r = -ENODATA;
	else if (!token_chars_ok(start))
		r = -EINVAL;
	else
		*ret = xstrdup(start);
	explicit_bzero(buf, len);
	free(buf);
	return r;
}

/* A token as the cache holds it. */
struct cached {
	char *token;
	time_t obtained_at, expires_at;
};

/* The cached token, when the cache holds a valid one for this source with
 * more than MIN_TTL to live. */
static bool
cache_read(struct oauth2_source *src, struct cached *ret)
{
	json_t *root = NULL, *jtoken, *jexpires, *jobtained;
	json_error_t jerr;
	const char *binding;
	char *buf;
	size_t len;
	time_t now = time(NULL);
	bool ok = false;
	int r;

	if ((r = read_small_file(src->cache_path, true, &buf, &len)) < 0) {
		if (r != -ENOENT)
			log_warning(src->id, "cannot read the token cache %s: %s; ignored",
				    src->cache_path, strerror(-r));
		return false;
	}
	root = json_loadb(buf, len, 0, &jerr);
	explicit_bzero(buf, len);
	free(buf);
	/* never jerr.text: it quotes the text near the error, a token perhaps */
	if (!json_is_object(root)) {
		log_warning(src->id, "the token cache %s is damaged (not a JSON object); ignored",
			    src->cache_path);
		goto out;
	}
	binding = json_string_value(json_object_get(root, "binding"));
	jtoken = json_object_get(root, "access_token");
	jexpires = json_object_get(root, "expires_at");
	jobtained = json_object_get(root, "obtained_at");
	if (binding == NULL || !json_is_string(jtoken) ||
	    !token_chars_ok(json_string_value(jtoken)) || !json_is_integer(jexpires) ||
	    (jobtained != NULL && !json_is_integer(jobtained))) {
		log_warning(src->id, "the token cache %s is damaged; ignored", src->cache_path);
		goto out;
	}
	if (strcmp(binding, src->binding) != 0) {
		log_debug(src->id,
			  "the token cache is for another endpoint, client or scope; ignored");
		goto out;
	}
	if (json_integer_value(jexpires) - now <= MIN_TTL) {
		log_debug(src->id, "the cached access token has expired");
		goto out;
	}
	ret->token = xstrdup(json_string_value(jtoken));
	ret->expires_at = (time_t)json_integer_value(jexpires);
	ret->obtained_at = jobtained != NULL ? (time_t)json_integer_value(jobtained)
					     : ret->expires_at - DEFAULT_EXPIRES;
	if (ret->obtained_at > now || ret->obtained_at >= ret->expires_at)
		ret->obtained_at = now;
	ok = true;
out:
	json_decref(root);
	return ok;
}

static void
cache_load(struct oauth2_source *src)
{
	struct cached c;

	if (!cache_read(src, &c))
		return;
	src->token = c.token;
	src->obtained_at = c.obtained_at;
	src->expires_at = c.expires_at;
	log_debug(src->id, "using the cached access token, valid for %lld s",
		  (long long)(src->expires_at - time(NULL)));
}

static void
cache_save(struct oauth2_source *src)
{
	json_t *root = json_pack("{s:s, s:s, s:I, s:I}", "binding", src->binding, "access_token",
				 src->token, "expires_at", (json_int_t)src->expires_at,
				 "obtained_at", (json_int_t)src->obtained_at);
	char *text = root != NULL ? json_dumps(root, JSON_COMPACT) : NULL;
	int r = text == NULL ? -ENOMEM : util_mkdir_p(src->state_dir, 0750);

	if (r == 0)
		r = util_write_atomic(src->cache_path, NULL, text, strlen(text), 0600, NULL, 0);
	if (r < 0)
		log_warning(src->id,
			    "cannot write the token cache %s: %s; the token is kept in memory only",
			    src->cache_path, strerror(-r));
	free_secret(text);
	json_decref(root);
}

static void
discard_token(struct oauth2_source *src)
{
	free_secret(src->token);
	src->token = NULL;
	src->obtained_at = src->expires_at = 0;
	if (unlink(src->cache_path) < 0 && errno != ENOENT)
		log_warning(src->id, "cannot remove the token cache %s: %s", src->cache_path,
			    strerror(errno));
}

/* Write the rotated refresh token back. 0, or -errno with *ret_detail. */
static int
save_refresh_token(struct oauth2_source *src, char **ret_detail)
{
	char *data = xasprintf("%s\n", src->unsaved_refresh_token);
	int r = util_write_atomic(src->refresh_token_file, NULL, data, strlen(data), 0600, NULL, 0);

	free_secret(data);
	if (r < 0) {
		*ret_detail =
			xasprintf("the token endpoint rotated the refresh token, but %s "
				  "cannot be written: %s (the new one is kept in memory only)",
				  src->refresh_token_file, strerror(-r));
		return r;
	}
	free_secret(src->unsaved_refresh_token);
	src->unsaved_refresh_token = NULL;
	log_info(src->id, "the token endpoint rotated the refresh token: saved to %s",
		 src->refresh_token_file);
	return 0;
}

/* ---- requests ---- */

static void
request_free(struct oauth2_request *req)
{
	free_secret(req->token);
	free(req->detail);
	free(req);
}

static void
make_ready(struct oauth2_source *src, struct oauth2_request *req, enum oauth2_status status,
	   const char *token, const char *detail)
{
	req->status = status;
	req->token = status == OAUTH2_OK ? xstrdup(token) : NULL;
	req->detail = xstrdup_or_null(detail);
	req->list = &src->ready;
	TAILQ_INSERT_TAIL(&src->ready, req, link);
	if (src->deliver_ev != NULL)
		event_active(src->deliver_ev, EV_TIMEOUT, 1);
}

/* Every waiting request gets this result. */
static void
complete_waiting(struct oauth2_source *src, enum oauth2_status status, const char *token,
		 const char *detail)
{
	struct oauth2_request *req;

	while ((req = TAILQ_FIRST(&src->waiting)) != NULL) {
		TAILQ_REMOVE(&src->waiting, req, link);
		make_ready(src, req, status, token, detail);
	}
}

static void source_destroy(struct oauth2_source *src);

static void
deliver_cb(evutil_socket_t fd, short what, void *arg)
{
	struct oauth2_source *src = arg;
	struct oauth2_request *req;

	(void)fd;
	(void)what;
	src->delivering = true;
	while (!src->dead && (req = TAILQ_FIRST(&src->ready)) != NULL) {
		TAILQ_REMOVE(&src->ready, req, link);
		req->list = NULL;
		req->cb(req->arg, req->status, req->token, req->detail);
		request_free(req);
	}
	src->delivering = false;
	if (src->dead)
		source_destroy(src);
}

/* ---- keep_fresh ---- */

static time_t
refresh_at(time_t obtained_at, time_t expires_at)
{
	time_t lifetime = expires_at - obtained_at;
	time_t at = obtained_at + lifetime / 10 * 8 + lifetime % 10 * 8 / 10;

	if (at > expires_at - FRESH_LATEST)
		at = expires_at - FRESH_LATEST;
	/* a short-lived token is refreshed at half-life, not over and over */
	if (at < obtained_at + lifetime / 2)
		at = obtained_at + lifetime / 2;
	return at;
}

static time_t
refresh_time(const struct oauth2_source *src)
{
	return refresh_at(src->obtained_at, src->expires_at);
}

/* A transfer is in flight, or waits for another process's lock. */
static bool
busy(const struct oauth2_source *src)
{
	return src->xfer != NULL || src->locking;
}

static void
fresh_arm(struct oauth2_source *src, time_t delay)
{
	struct timeval tv = {delay > 0 ? delay : 0, 0};

	if (src->fresh_ev != NULL)
		evtimer_add(src->fresh_ev, &tv);
}

static void
fresh_arm_next(struct oauth2_source *src)
{
	time_t now = time(NULL);

	if (src->token == NULL)
		fresh_arm(src, 0);
	else
		fresh_arm(src, refresh_time(src) - now);
}

/* quiet: a caller was waiting for this token, and reports the failure */
static void
fresh_retry(struct oauth2_source *src, const char *detail, bool quiet)
{
	unsigned delay;

	src->backoff = src->backoff == 0		 ? BACKOFF_MIN
		       : src->backoff >= BACKOFF_MAX / 2 ? BACKOFF_MAX
							 : src->backoff * 2;
	/* jitter: 80% to 120% */
	delay = src->backoff * (80 + arc4random_uniform(41)) / 100;
	log_msg(quiet ? LOG_LVL_DEBUG : LOG_LVL_WARNING, src->id,
		"cannot refresh the access token: %s; next attempt in %u s",
		detail != NULL ? detail : "unknown error", delay);
	fresh_arm(src, (time_t)delay);
}

static void
fresh_cb(evutil_socket_t fd, short what, void *arg)
{
	struct oauth2_source *src = arg;
	char *detail = NULL;

	(void)fd;
	(void)what;
	if (busy(src))
		return; /* its end re-arms */
	if (src->unsaved_refresh_token != NULL && save_refresh_token(src, &detail) < 0) {
		fresh_retry(src, detail, false);
		free(detail);
		return;
	}
	if (src->token != NULL && time(NULL) < refresh_time(src)) {
		fresh_arm_next(src);
		return;
	}
	start_transfer(src);
}

/* A transfer ended, or could not start: tell the waiting requests. */
static void
finish(struct oauth2_source *src, enum oauth2_status status, const char *detail)
{
	bool reported = !TAILQ_EMPTY(&src->waiting);

	lock_release(src);
	if (status != OAUTH2_OK)
		log_debug(src->id, "no access token: %s", detail);
	complete_waiting(src, status, status == OAUTH2_OK ? src->token : NULL, detail);
	if (!src->keep_fresh)
		return;
	if (status == OAUTH2_OK) {
		src->backoff = 0;
		fresh_arm_next(src);
	} else {
		fresh_retry(src, detail, reported);
	}
}

/* ---- transfers ---- */

static void
transfer_free(struct transfer *x)
{
	if (x == NULL)
		return;
	if (x->easy != NULL)
		curl_easy_cleanup(x->easy);
	curl_slist_free_all(x->headers);
	free_secret(x->form);
	free_secret(x->refresh_token);
	if (x->body != NULL) {
		explicit_bzero(x->body, x->len);
		free(x->body);
	}
	free(x);
}

static void
abort_transfer(struct oauth2_source *src)
{
	lock_release(src);
	src->locking = false;
	if (src->lock_ev != NULL)
		evtimer_del(src->lock_ev);
	if (src->xfer == NULL)
		return;
	if (src->client != NULL)
		curl_multi_remove_handle(src->client->multi, src->xfer->easy);
	transfer_free(src->xfer);
	src->xfer = NULL;
}

static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	struct transfer *x = userdata;
	size_t n = size * nmemb;

	if (n > BODY_MAX - x->len) {
		x->too_big = true;
		return 0; /* CURLE_WRITE_ERROR */
	}
	if (x->body == NULL)
		x->body = xmalloc(BODY_MAX);
	memcpy(x->body + x->len, ptr, n);
	x->len += n;
	return n;
}

/* "&key=value", value URL-encoded. false when curl cannot encode. */
static bool
form_add(struct transfer *x, const char *key, const char *value)
{
	char *enc = curl_easy_escape(x->easy, value, 0), *form;

	if (enc == NULL)
		return false;
	form = x->form == NULL ? xasprintf("%s=%s", key, enc)
			       : xasprintf("%s&%s=%s", x->form, key, enc);
	explicit_bzero(enc, strlen(enc));
	curl_free(enc);
	free_secret(x->form);
	x->form = form;
	return true;
}

static bool
transfer_setup(struct oauth2_source *src, struct transfer *x)
{
	bool ok = true;

	ok = ok && form_add(x, "grant_type", grant_name(src->grant));
	if (src->grant == OAUTH2_GRANT_REFRESH_TOKEN)
		ok = ok && form_add(x, "refresh_token", x->refresh_token);
	ok = ok && form_add(x, "client_id", src->client_id);
	if (src->client_secret != NULL)
		ok = ok && form_add(x, "client_secret", src->client_secret);
	if (src->scope != NULL)
		ok = ok && form_add(x, "scope", src->scope);
	if (!ok)
		return false;
	x->headers = curl_slist_append(NULL, "Accept: application/json");
	if (x->headers == NULL)
		return false;

#define SET(opt, val) (ok = ok && curl_easy_setopt(x->easy, opt, val) == CURLE_OK)
	SET(CURLOPT_URL, src->endpoint);
	SET(CURLOPT_PROTOCOLS_STR, "https");
	SET(CURLOPT_FOLLOWLOCATION, 0L);
	SET(CURLOPT_NOSIGNAL, 1L);
	SET(CURLOPT_SSL_VERIFYPEER, 1L);
	SET(CURLOPT_SSL_VERIFYHOST, 2L);
	SET(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
	if (src->ca_file != NULL)
		SET(CURLOPT_CAINFO, src->ca_file);
	SET(CURLOPT_TIMEOUT, src->timeout);
	SET(CURLOPT_CONNECTTIMEOUT, src->timeout);
	SET(CURLOPT_POSTFIELDSIZE, (long)strlen(x->form));
	SET(CURLOPT_POSTFIELDS, x->form);
	SET(CURLOPT_HTTPHEADER, x->headers);
	SET(CURLOPT_USERAGENT, "popfetchd/" POPFETCHD_VERSION);
	SET(CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)BODY_MAX);
	SET(CURLOPT_WRITEFUNCTION, write_cb);
	SET(CURLOPT_WRITEDATA, x);
	SET(CURLOPT_ERRORBUFFER, x->errbuf);
	SET(CURLOPT_PRIVATE, x);
#undef SET
	return ok;
}

/* Ask the endpoint (the lock is held, or cannot be had at all). */
static void
send_request(struct oauth2_source *src)
{
	struct transfer *x;
	char *detail = NULL;
	enum oauth2_status status = OAUTH2_UNAVAILABLE;
	int r;

	x = xcalloc(1, sizeof(*x));
	x->src = src;
	if (src->grant == OAUTH2_GRANT_REFRESH_TOKEN) {
		if (src->unsaved_refresh_token != NULL) {
			x->refresh_token = xstrdup(src->unsaved_refresh_token);
		} else if (src->refresh_token_file == NULL) {
			status = OAUTH2_LOCAL;
			detail = xstrdup("no refresh_token_file for the refresh_token grant");
			goto fail;
		} else if ((r = read_refresh_token(src->refresh_token_file, &x->refresh_token)) <
			   0) {
			status = OAUTH2_LOCAL;
			detail = r == -ENODATA ? xasprintf("%s holds no refresh token",
							   src->refresh_token_file)
				 : r == -EINVAL
					 ? xasprintf("%s does not hold a valid refresh token",
						     src->refresh_token_file)
					 : xasprintf("cannot read the refresh token from %s: %s",
						     src->refresh_token_file, strerror(-r));
			goto fail;
		}
	}
	if ((x->easy = curl_easy_init()) == NULL || !transfer_setup(src, x)) {
		detail = xasprintf("token endpoint %s: cannot set up the request", src->host);
		goto fail;
	}
	if (curl_multi_add_handle(src->client->multi, x->easy) != CURLM_OK) {
		detail = xasprintf("token endpoint %s: cannot start the request", src->host);
		goto fail;
	}
	src->xfer = x;
	src->requests++;
	log_debug(src->id, "requesting an access token from %s (%s grant)", src->host,
		  grant_name(src->grant));
	return;
fail:
	transfer_free(x);
	finish(src, status, detail);
	free(detail);
}

/* ---- one refresh at a time across processes ---- */

static void
lock_release(struct oauth2_source *src)
{
	if (src->lock_fd >= 0) {
		close(src->lock_fd); /* releases the flock */
		src->lock_fd = -1;
	}
}

/* 0 when held, -EWOULDBLOCK when another process holds it, another -errno
 * when there is no lock to take (then the refresh goes on without). */
static int
lock_take(struct oauth2_source *src)
{
	int fd = open(src->lock_path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);

	if (fd < 0)
		return -errno;
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		int r = -errno;

		close(fd);
		return r;
	}
	src->lock_fd = fd;
	return 0;
}

/* Another process may have refreshed while this one waited for the lock:
 * a token in the cache that is not ours and not yet due for refresh is
 * taken instead of asking the endpoint. */
static bool
adopt_cached(struct oauth2_source *src)
{
	struct cached c;

	if (!cache_read(src, &c))
		return false;
	if ((src->token != NULL && strcmp(c.token, src->token) == 0) ||
	    time(NULL) >= refresh_at(c.obtained_at, c.expires_at)) {
		free_secret(c.token);
		return false;
	}
	free_secret(src->token);
	src->token = c.token;
	src->obtained_at = c.obtained_at;
	src->expires_at = c.expires_at;
	log_debug(src->id, "another process has just refreshed the access token: using it");
	return true;
}

static void
lock_attempt(struct oauth2_source *src)
{
	static const struct timeval retry = {0, LOCK_RETRY_MS * 1000};
	int r = lock_take(src);

	if (r == -EWOULDBLOCK && time(NULL) < src->lock_deadline) {
		evtimer_add(src->lock_ev, &retry);
		return;
	}
	src->locking = false;
	if (r == -EWOULDBLOCK) {
		char *detail = xasprintf("another process has been refreshing this token for %ld s "
					 "(it holds %s)",
					 src->timeout, src->lock_path);

		finish(src, OAUTH2_UNAVAILABLE, detail);
		free(detail);
		return;
	}
	if (r < 0)
		log_warning(src->id, "cannot lock %s: %s; refreshing without it", src->lock_path,
			    strerror(-r));
	if (adopt_cached(src)) {
		finish(src, OAUTH2_OK, NULL);
		return;
	}
	send_request(src);
}

static void
lock_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	lock_attempt(arg);
}

/* A refresh: take the lock (waiting at most the request timeout for
 * another process), then ask the endpoint unless that process's token
 * can be had. */
static void
start_transfer(struct oauth2_source *src)
{
	if (src->client == NULL || busy(src))
		return;
	src->locking = true;
	src->lock_deadline = time(NULL) + src->timeout;
	lock_attempt(src);
}

/* What the endpoint answered. */
struct answer {
	enum oauth2_status status;
	char *token;
	long expires_in;
	char *refresh_token; /* when it sent one */
	char *detail;
};

static bool
parse_expires_in(json_t *v, long *ret)
{
	json_int_t n;

	if (v == NULL) {
		*ret = DEFAULT_EXPIRES;
		return true;
	}
	if (json_is_integer(v)) {
		n = json_integer_value(v);
	} else if (json_is_string(v)) { /* some endpoints send "3599" */
		const char *s = json_string_value(v);
		char *end;

		errno = 0;
		n = strtoll(s, &end, 10);
		if (errno != 0 || end == s || *end != '\0')
			return false;
	} else {
		return false;
	}
	if (n <= 0)
		return false;
	*ret = n > MAX_EXPIRES ? MAX_EXPIRES : (long)n;
	return true;
}

static bool
refusal(const char *error)
{
	static const char *const errors[] = {
		"invalid_request",	  "invalid_client", "invalid_grant", "unauthorized_client",
		"unsupported_grant_type", "invalid_scope",  "access_denied",
	};

	for (size_t i = 0; i < sizeof(errors) / sizeof(errors[0]); i++)
		if (strcmp(error, errors[i]) == 0)
			return true;
	return false;
}

static void
evaluate_ok(struct oauth2_source *src, json_t *root, struct answer *a)
{
	json_t *jtoken = json_object_get(root, "access_token");
	json_t *jtype = json_object_get(root, "token_type");
	json_t *jrefresh = json_object_get(root, "refresh_token");
	const char *why = NULL;

	if (!json_is_string(jtoken) || !token_chars_ok(json_string_value(jtoken)))
		why = "no valid access_token";
	else if (jtype != NULL &&
		 (!json_is_string(jtype) || strcasecmp(json_string_value(jtype), "bearer") != 0))
		why = "token_type is not Bearer";
	else if (!parse_expires_in(json_object_get(root, "expires_in"), &a->expires_in))
		why = "expires_in is not a positive number";
	else if (jrefresh != NULL &&
		 (!json_is_string(jrefresh) || !token_chars_ok(json_string_value(jrefresh))))
		why = "refresh_token is not valid";
	if (why != NULL) {
		a->detail = xasprintf("token endpoint %s sent a malformed answer (HTTP 200): %s",
				      src->host, why);
		return;
	}
	a->status = OAUTH2_OK;
	a->token = xstrdup(json_string_value(jtoken));
	if (jrefresh != NULL)
		a->refresh_token = xstrdup(json_string_value(jrefresh));
}

static void
evaluate(struct oauth2_source *src, struct transfer *x, CURLcode code, struct answer *a)
{
	json_t *root = NULL;
	json_error_t jerr;
	const char *error = NULL, *description = NULL;
	char *err_s = NULL, *desc_s = NULL;
	long http = 0;

	a->status = OAUTH2_UNAVAILABLE;
	if (x->too_big || code == CURLE_FILESIZE_EXCEEDED) {
		a->detail = xasprintf("token endpoint %s: the answer exceeds %d KiB", src->host,
				      BODY_MAX / 1024);
		return;
	}
	if (code != CURLE_OK) {
		char *e = endpoint_text(src, x, x->errbuf, 300);

		a->detail = xasprintf("token endpoint %s: %s%s%s%s", src->host,
				      curl_easy_strerror(code), *e != '\0' ? " (" : "", e,
				      *e != '\0' ? ")" : "");
		free(e);
		return;
	}
	curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &http);
	if (x->len > 0)
		root = json_loadb(x->body, x->len, 0, &jerr);
	if (http == 200) {
		if (json_is_object(root))
			evaluate_ok(src, root, a);
		else
			/* never jerr.text: it quotes the answer, a token perhaps */
			a->detail = xasprintf("token endpoint %s sent a malformed answer "
					      "(HTTP 200): not a JSON object",
					      src->host);
		goto out;
	}
	if (json_is_object(root)) {
		error = json_string_value(json_object_get(root, "error"));
		description = json_string_value(json_object_get(root, "error_description"));
	}
	if (error != NULL)
		err_s = endpoint_text(src, x, error, ERROR_MAX);
	if (description != NULL && *description != '\0')
		desc_s = endpoint_text(src, x, description, DESCRIPTION_MAX);
	if ((http == 400 || http == 401 || http == 403) && error != NULL && refusal(error)) {
		a->status = OAUTH2_REFUSED;
		a->detail =
			xasprintf("the token endpoint refused: %s%s%s (HTTP %ld)", err_s,
				  desc_s != NULL ? ": " : "", desc_s != NULL ? desc_s : "", http);
	} else if (http == 401 && error == NULL) {
		a->status = OAUTH2_REFUSED;
		a->detail = xstrdup("the token endpoint refused the client (HTTP 401)");
	} else {
		a->detail = xasprintf("token endpoint %s answered HTTP %ld%s%s%s%s", src->host,
				      http, err_s != NULL ? ": " : "", err_s != NULL ? err_s : "",
				      desc_s != NULL ? ": " : "", desc_s != NULL ? desc_s : "");
	}
out:
	free(err_s);
	free(desc_s);
	json_decref(root);
}

static void
transfer_done(struct transfer *x, CURLcode code)
{
	struct oauth2_source *src = x->src;
	struct answer a = {0};
	time_t now = time(NULL);

	evaluate(src, x, code, &a);
	{
		const char *secrets[] = {
			src->client_secret, x->refresh_token, a.token,
			a.refresh_token,    src->token,	      src->unsaved_refresh_token};

		a.detail = redact(a.detail != NULL ? a.detail : xstrdup(""), secrets,
				  sizeof(secrets) / sizeof(secrets[0]));
	}
	src->xfer = NULL;
	if (a.status == OAUTH2_OK) {
		free_secret(src->token);
		src->token = a.token;
		a.token = NULL;
		src->obtained_at = now;
		src->expires_at = now + a.expires_in;
		log_info(src->id, "new access token, valid for %ld s", a.expires_in);
		cache_save(src);
		if (src->grant == OAUTH2_GRANT_REFRESH_TOKEN && a.refresh_token != NULL &&
		    strcmp(a.refresh_token, x->refresh_token) != 0) {
			free_secret(src->unsaved_refresh_token);
			src->unsaved_refresh_token = a.refresh_token;
			a.refresh_token = NULL;
			free(a.detail);
			a.detail = NULL;
			if (save_refresh_token(src, &a.detail) < 0) {
				log_error(src->id, "%s", a.detail);
				a.status = OAUTH2_LOCAL;
			}
		}
	}
	curl_multi_remove_handle(src->client->multi, x->easy);
	transfer_free(x);
	if (src->client->observe != NULL)
		src->client->observe(src->client->observe_arg, src->id, a.status);
	finish(src, a.status, a.detail);
	free_secret(a.token);
	free_secret(a.refresh_token);
	free(a.detail);
}

/* ---- curl on libevent (curl's docs/examples/multi-event.c) ---- */

static void
check_multi_info(struct oauth2_client *c)
{
	CURLMsg *msg;
	int left;

	while ((msg = curl_multi_info_read(c->multi, &left)) != NULL) {
		struct transfer *x = NULL;
		CURLcode code = msg->data.result;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
		if (x != NULL)
			transfer_done(x, code);
	}
}

static void
sock_event_cb(evutil_socket_t fd, short what, void *arg)
{
	struct oauth2_client *c = arg;
	int action =
		(what & EV_READ ? CURL_CSELECT_IN : 0) | (what & EV_WRITE ? CURL_CSELECT_OUT : 0);
	int running;

	curl_multi_socket_action(c->multi, fd, action, &running);
	check_multi_info(c);
	if (running <= 0)
		evtimer_del(c->timer);
}

static void
timer_event_cb(evutil_socket_t fd, short what, void *arg)
{
	struct oauth2_client *c = arg;
	int running;

	(void)fd;
	(void)what;
	curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
	check_multi_info(c);
}

/* CURLMOPT_TIMERFUNCTION */
static int
timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
	struct oauth2_client *c = userp;

	(void)multi;
	if (timeout_ms < 0) {
		evtimer_del(c->timer);
	} else {
		struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};

		evtimer_add(c->timer, &tv);
	}
	return 0;
}

/* CURLMOPT_SOCKETFUNCTION */
static int
socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	struct oauth2_client *c = userp;
	struct sock_watch *w = socketp;
	short kind;

	(void)easy;
	if (what == CURL_POLL_REMOVE) {
		if (w != NULL) {
			if (w->ev != NULL)
				event_free(w->ev);
			LIST_REMOVE(w, link);
			free(w);
		}
		return 0;
	}
	kind = EV_PERSIST | (what & CURL_POLL_IN ? EV_READ : 0) |
	       (what & CURL_POLL_OUT ? EV_WRITE : 0);
	if (w == NULL) {
		w = xcalloc(1, sizeof(*w));
		w->fd = s;
		LIST_INSERT_HEAD(&c->socks, w, link);
		curl_multi_assign(c->multi, s, w);
	} else if (w->ev != NULL) {
		event_free(w->ev);
	}
	w->ev = event_new(c->base, s, kind, sock_event_cb, c);
	if (w->ev == NULL || event_add(w->ev, NULL) < 0)
		return -1;
	return 0;
}

/* ---- the interface ---- */

struct oauth2_client *
oauth2_client_new(struct event_base *base)
{
	struct oauth2_client *c;

	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		return NULL;
	c = xcalloc(1, sizeof(*c));
	c->base = base;
	LIST_INIT(&c->sources);
	LIST_INIT(&c->socks);
	c->multi = curl_multi_init();
	c->timer = evtimer_new(base, timer_event_cb, c);
	if (c->multi == NULL || c->timer == NULL) {
		if (c->multi != NULL)
			curl_multi_cleanup(c->multi);
		if (c->timer != NULL)
			event_free(c->timer);
		free(c);
		curl_global_cleanup();
		return NULL;
	}
	curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
	curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
	curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
	curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
	return c;
}

void
oauth2_client_observe(struct oauth2_client *c, oauth2_observe_cb observe, void *arg)
{
	if (c != NULL) {
		c->observe = observe;
		c->observe_arg = arg;
	}
}

/* The client goes away first: stop the source's transfer and events. Its
 * requests stay (never called back) until oauth2_cancel or
 * oauth2_source_free. */
static void
source_detach(struct oauth2_source *src)
{
	abort_transfer(src);
	if (src->deliver_ev != NULL)
		event_free(src->deliver_ev);
	if (src->fresh_ev != NULL)
		event_free(src->fresh_ev);
	if (src->lock_ev != NULL)
		event_free(src->lock_ev);
	src->deliver_ev = src->fresh_ev = src->lock_ev = NULL;
	LIST_REMOVE(src, link);
	src->client = NULL;
}

void
oauth2_client_free(struct oauth2_client *c)
{
	struct oauth2_source *src;
	struct sock_watch *w;

	if (c == NULL)
		return;
	while ((src = LIST_FIRST(&c->sources)) != NULL)
		source_detach(src);
	curl_multi_cleanup(c->multi);
	while ((w = LIST_FIRST(&c->socks)) != NULL) {
		LIST_REMOVE(w, link);
		if (w->ev != NULL)
			event_free(w->ev);
		free(w);
	}
	event_free(c->timer);
	free(c);
	curl_global_cleanup();
}

/* sha256 hex of endpoint \0 client_id \0 scope \0 grant */
static void
compute_binding(struct oauth2_source *src)
{
	const char *parts[] = {src->endpoint, src->client_id, src->scope != NULL ? src->scope : "",
			       grant_name(src->grant)};
	unsigned char md[SHA256_DIGEST_LENGTH];
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();

	if (ctx == NULL)
		abort();
	EVP_DigestInit_ex(ctx, EVP_sha256(), NULL);
	for (size_t i = 0, n = sizeof(parts) / sizeof(parts[0]); i < n; i++)
		/* each part with its NUL, but the last */
		EVP_DigestUpdate(ctx, parts[i], strlen(parts[i]) + (i + 1 < n ? 1 : 0));
	EVP_DigestFinal_ex(ctx, md, NULL);
	EVP_MD_CTX_free(ctx);
	util_hex(md, sizeof(md), src->binding);
}

struct oauth2_source *
oauth2_source_new(struct oauth2_client *client, const struct oauth2_params *params)
{
	struct oauth2_source *src;
	int r;

	if (client == NULL || params->token_endpoint == NULL || params->client_id == NULL ||
	    params->state_dir == NULL)
		return NULL;
	src = xcalloc(1, sizeof(*src));
	src->client = client;
	src->refs = 1;
	src->lock_fd = -1;
	src->id = xstrdup_or_null(params->id);
	src->endpoint = xstrdup(params->token_endpoint);
	src->host = endpoint_host(params->token_endpoint);
	src->client_id = xstrdup(params->client_id);
	src->client_secret = xstrdup_or_null(params->client_secret);
	src->scope = xstrdup_or_null(params->scope);
	src->grant = params->grant;
	src->refresh_token_file = xstrdup_or_null(params->refresh_token_file);
	src->ca_file = xstrdup_or_null(params->ca_file);
	src->state_dir = xstrdup(params->state_dir);
	src->cache_path = xasprintf("%s/%s", params->state_dir, CACHE_NAME);
	src->lock_path = xasprintf("%s/%s", params->state_dir, LOCK_NAME);
	src->timeout = params->timeout > 0 ? (long)params->timeout : DEFAULT_TIMEOUT;
	compute_binding(src);
	TAILQ_INIT(&src->waiting);
	TAILQ_INIT(&src->ready);
	src->deliver_ev = event_new(client->base, -1, 0, deliver_cb, src);
	src->fresh_ev = evtimer_new(client->base, fresh_cb, src);
	src->lock_ev = evtimer_new(client->base, lock_cb, src);
	if (src->deliver_ev == NULL || src->fresh_ev == NULL || src->lock_ev == NULL)
		abort(); /* out of memory, as xmalloc */
	LIST_INSERT_HEAD(&client->sources, src, link);
	/* 0750 as store makes it (status.json is the group's); the token is 0600 */
	if ((r = util_mkdir_p(src->state_dir, 0750)) < 0)
		log_warning(src->id, "cannot create the state directory %s: %s", src->state_dir,
			    strerror(-r));
	cache_load(src);
	return src;
}

static void
source_destroy(struct oauth2_source *src)
{
	struct oauth2_request *req;

	if (src->client != NULL)
		source_detach(src);
	while ((req = TAILQ_FIRST(&src->waiting)) != NULL) {
		TAILQ_REMOVE(&src->waiting, req, link);
		request_free(req);
	}
	while ((req = TAILQ_FIRST(&src->ready)) != NULL) {
		TAILQ_REMOVE(&src->ready, req, link);
		request_free(req);
	}
	free_secret(src->client_secret);
	free_secret(src->token);
	free_secret(src->unsaved_refresh_token);
	FREE_ALL(src->id, src->endpoint, src->host, src->client_id, src->scope,
		 src->refresh_token_file, src->ca_file, src->state_dir, src->cache_path,
		 src->lock_path, src);
}

struct oauth2_source *
oauth2_source_ref(struct oauth2_source *src)
{
	src->refs++;
	return src;
}

void
oauth2_source_free(struct oauth2_source *src)
{
	if (src == NULL || src->dead || --src->refs > 0)
		return;
	if (src->delivering) {
		/* inside one of its callbacks: deliver_cb destroys it */
		abort_transfer(src);
		if (src->fresh_ev != NULL)
			evtimer_del(src->fresh_ev);
		src->keep_fresh = false;
		src->dead = true;
		return;
	}
	source_destroy(src);
}

struct oauth2_request *
oauth2_get_token(struct oauth2_source *src, bool force, oauth2_token_cb cb, void *arg)
{
	struct oauth2_request *req = xcalloc(1, sizeof(*req));
	char *detail = NULL;

	req->cb = cb;
	req->arg = arg;
	if (src->client == NULL || src->dead) {
		/* too late: the client is gone; never called back */
		req->list = &src->waiting;
		TAILQ_INSERT_TAIL(&src->waiting, req, link);
		return req;
	}
	if (force && src->token != NULL) {
		log_debug(src->id, "discarding the current access token");
		discard_token(src);
	}
	if (src->unsaved_refresh_token != NULL && save_refresh_token(src, &detail) < 0) {
		make_ready(src, req, OAUTH2_LOCAL, NULL, detail);
		free(detail);
		return req;
	}
	if (src->token != NULL && src->expires_at - time(NULL) > MIN_TTL) {
		make_ready(src, req, OAUTH2_OK, src->token, NULL);
		return req;
	}
	req->list = &src->waiting;
	TAILQ_INSERT_TAIL(&src->waiting, req, link);
	start_transfer(src); /* or join the one under way */
	return req;
}

void
oauth2_cancel(struct oauth2_request *req)
{
	if (req == NULL)
		return;
	if (req->list != NULL)
		TAILQ_REMOVE(req->list, req, link);
	request_free(req);
}

void
oauth2_source_keep_fresh(struct oauth2_source *src, bool on)
{
	if (on == src->keep_fresh)
		return;
	src->keep_fresh = on;
	src->backoff = 0;
	if (src->fresh_ev == NULL)
		return;
	if (!on)
		evtimer_del(src->fresh_ev);
	else if (!busy(src))
		fresh_arm_next(src);
}

int
oauth2_exit_code(enum oauth2_status status)
{
	switch (status) {
	case OAUTH2_OK:
		return EX_OK;
	case OAUTH2_REFUSED:
		return EX_NOPERM;
	case OAUTH2_LOCAL:
		return EX_IOERR;
	case OAUTH2_UNAVAILABLE:
		break;
	}
	return EX_TEMPFAIL;
}

const char *
oauth2_status_name(enum oauth2_status status)
{
	static const char *const names[] = {
		[OAUTH2_OK] = "ok",
		[OAUTH2_REFUSED] = "refused",
		[OAUTH2_UNAVAILABLE] = "unavailable",
		[OAUTH2_LOCAL] = "local",
	};

	return (unsigned)status < sizeof(names) / sizeof(names[0]) ? names[status] : "unknown";
}

unsigned
oauth2_source_requests(const struct oauth2_source *src)
{
	return src != NULL ? src->requests : 0;
}

time_t
oauth2_source_expiry(const struct oauth2_source *src)
{
	return src != NULL && src->token != NULL ? src->expires_at : 0;
}
