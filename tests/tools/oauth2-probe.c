/*
 * oauth2-probe — runs the oauth2 module on an event loop, for the tests.
 *
 *   oauth2-probe --endpoint URL --client-id ID [--client-secret S] [--scope X]
 *       [--grant client_credentials|refresh_token] [--refresh-token-file F]
 *       [--ca CA] --state DIR [--timeout SECONDS] [--get N] [--force]
 *       [--keep-fresh SECONDS] [--second-endpoint URL2] [--cancel-after MS]
 *       [--verbose]
 *
 * --get N (default 1): get a token N times in sequence, each after the
 * previous callback (--force: every one with force=true). --keep-fresh S:
 * then turn keep_fresh on and run the loop for S seconds. --second-endpoint:
 * a second source (same client, state DIR/second) whose one get_token runs
 * at the same time as the first of the main source. --cancel-after MS:
 * cancel the main source's pending request after MS ms.
 *
 * stdout, one line per event:
 *   token OK HEX UNIXTIME          a token (HEX: first 12 hex of its SHA-256)
 *   token REFUSED|UNAVAILABLE|LOCAL DETAIL
 *   second token ...               the same for the second source
 *   finished main|second SECONDS   (--second-endpoint) a source's gets are done,
 *                                  SECONDS since the start, in that order
 *   cancelled                      (--cancel-after)
 *   request N UNIXTIME.MS          (--keep-fresh) the source sent its Nth request
 *   token OK HEX UNIXTIME          (--keep-fresh) the cached token changed
 *   requests N                     at exit: requests sent by the main source
 *   second requests N              at exit, with --second-endpoint
 * Logs go to stderr. Exit 0 after a run, 64 on a usage error, 1 when the
 * module cannot be set up.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <event2/event.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#include "popfetchd/log.h"
#include "popfetchd/oauth2.h"
#include "popfetchd/util.h"

struct probe {
	const char *name; /* "main" or "second" */
	const char *prefix;
	struct oauth2_source *src;
	struct oauth2_request *req;
	unsigned left;
	bool force;
};

static struct event_base *base;
static struct probe probes[2];
static unsigned nprobes;
static double started;
static unsigned keep_fresh;
static char *cache_path;
static char last_hex[13];
static unsigned last_requests;
static bool finished;
static struct event *tick, *stop;

static double
now_s(void)
{
	struct timeval tv;

	gettimeofday(&tv, NULL);
	return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

static void
token_hex(const char *token, char out[13])
{
	unsigned char md[SHA256_DIGEST_LENGTH];
	char hex[2 * SHA256_DIGEST_LENGTH + 1];

	EVP_Digest(token, strlen(token), md, NULL, EVP_sha256(), NULL);
	util_hex(md, sizeof(md), hex);
	memcpy(out, hex, 12);
	out[12] = '\0';
}

static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
	unsigned requests = oauth2_source_requests(probes[0].src);
	json_t *root;
	const char *token;
	char hex[13];

	(void)fd;
	(void)what;
	(void)arg;
	while (last_requests < requests)
		printf("request %u %.3f\n", ++last_requests, now_s());
	root = json_load_file(cache_path, 0, NULL);
	token = json_string_value(json_object_get(root, "access_token"));
	if (token != NULL) {
		token_hex(token, hex);
		if (strcmp(hex, last_hex) != 0) {
			printf("token OK %s %lld\n", hex, (long long)time(NULL));
			memcpy(last_hex, hex, sizeof(hex));
		}
	}
	json_decref(root);
	fflush(stdout);
}

static void
stop_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	event_base_loopbreak(base);
}

/* Every get is answered: stop, or keep the token fresh for a while. */
static void
all_done(void)
{
	struct timeval tenth = {0, 100000}, end = {(time_t)keep_fresh, 0};

	for (unsigned i = 0; i < nprobes; i++)
		if (probes[i].left > 0)
			return;
	if (finished || tick != NULL)
		return; /* already done */
	if (keep_fresh == 0) {
		finished = true;
		event_base_loopbreak(base);
		return;
	}
	last_requests = oauth2_source_requests(probes[0].src);
	oauth2_source_keep_fresh(probes[0].src, true);
	tick = event_new(base, -1, EV_PERSIST, tick_cb, NULL);
	stop = evtimer_new(base, stop_cb, NULL);
	event_add(tick, &tenth);
	evtimer_add(stop, &end);
}

static void get_next(struct probe *p);

static void
token_cb(void *arg, enum oauth2_status status, const char *token, const char *detail)
{
	static const char *const names[] = {"OK", "REFUSED", "UNAVAILABLE", "LOCAL"};
	struct probe *p = arg;

	p->req = NULL;
	if (status == OAUTH2_OK) {
		token_hex(token, last_hex);
		printf("%stoken OK %s %lld\n", p->prefix, last_hex, (long long)time(NULL));
	} else {
		printf("%stoken %s %s\n", p->prefix, names[status], detail != NULL ? detail : "");
	}
	if (--p->left > 0) {
		get_next(p);
	} else if (nprobes > 1) {
		printf("finished %s %.3f\n", p->name, now_s() - started);
	}
	fflush(stdout);
	if (p->left == 0)
		all_done();
}

static void
get_next(struct probe *p)
{
	p->req = oauth2_get_token(p->src, p->force, token_cb, p);
}

static void
cancel_cb(evutil_socket_t fd, short what, void *arg)
{
	struct probe *p = arg;

	(void)fd;
	(void)what;
	if (p->req == NULL)
		return;
	oauth2_cancel(p->req);
	p->req = NULL;
	p->left = 0;
	printf("cancelled\n");
	fflush(stdout);
	all_done();
}

static void
usage(void)
{
	fprintf(stderr, "usage: oauth2-probe --endpoint URL --client-id ID [--client-secret S] "
			"[--scope X]\n"
			"    [--grant client_credentials|refresh_token] [--refresh-token-file F] "
			"[--ca CA]\n"
			"    --state DIR [--timeout S] [--get N] [--force] [--keep-fresh S]\n"
			"    [--second-endpoint URL2] [--cancel-after MS] [--verbose]\n");
	exit(64);
}

static unsigned
number(const char *s)
{
	char *end;
	unsigned long n = strtoul(s, &end, 10);

	if (*s == '\0' || *end != '\0' || n > 1000000)
		usage();
	return (unsigned)n;
}

int
main(int argc, char **argv)
{
	static const struct option options[] = {
		{"endpoint", required_argument, NULL, 'e'},
		{"client-id", required_argument, NULL, 'i'},
		{"client-secret", required_argument, NULL, 's'},
		{"scope", required_argument, NULL, 'S'},
		{"grant", required_argument, NULL, 'g'},
		{"refresh-token-file", required_argument, NULL, 'r'},
		{"ca", required_argument, NULL, 'c'},
		{"state", required_argument, NULL, 'd'},
		{"timeout", required_argument, NULL, 't'},
		{"get", required_argument, NULL, 'n'},
		{"force", no_argument, NULL, 'f'},
		{"keep-fresh", required_argument, NULL, 'k'},
		{"second-endpoint", required_argument, NULL, '2'},
		{"cancel-after", required_argument, NULL, 'C'},
		{"verbose", no_argument, NULL, 'v'},
		{NULL, 0, NULL, 0},
	};
	struct oauth2_params params = {.id = "probe"};
	const char *second = NULL;
	unsigned gets = 1, cancel_after = 0;
	bool force = false;
	struct oauth2_client *client;
	struct event *cancel = NULL;
	int c;

	while ((c = getopt_long(argc, argv, "v", options, NULL)) != -1) {
		switch (c) {
		case 'e':
			params.token_endpoint = optarg;
			break;
		case 'i':
			params.client_id = optarg;
			break;
		case 's':
			params.client_secret = optarg;
			break;
		case 'S':
			params.scope = optarg;
			break;
		case 'g':
			if (strcmp(optarg, "client_credentials") == 0)
				params.grant = OAUTH2_GRANT_CLIENT_CREDENTIALS;
			else if (strcmp(optarg, "refresh_token") == 0)
				params.grant = OAUTH2_GRANT_REFRESH_TOKEN;
			else
				usage();
			break;
		case 'r':
			params.refresh_token_file = optarg;
			break;
		case 'c':
			params.ca_file = optarg;
			break;
		case 'd':
			params.state_dir = optarg;
			break;
		case 't':
			params.timeout = number(optarg);
			break;
		case 'n':
			gets = number(optarg);
			break;
		case 'f':
			force = true;
			break;
		case 'k':
			keep_fresh = number(optarg);
			break;
		case '2':
			second = optarg;
			break;
		case 'C':
			cancel_after = number(optarg);
			break;
		case 'v':
			log_set_level(LOG_LVL_DEBUG);
			break;
		default:
			usage();
		}
	}
	if (optind != argc || params.token_endpoint == NULL || params.client_id == NULL ||
	    params.state_dir == NULL)
		usage();

	base = event_base_new();
	client = oauth2_client_new(base);
	if (base == NULL || client == NULL) {
		fprintf(stderr, "oauth2-probe: cannot set up the event loop or curl\n");
		return 1;
	}
	cache_path = xasprintf("%s/oauth2-token", params.state_dir);
	probes[0] =
		(struct probe){"main", "", oauth2_source_new(client, &params), NULL, gets, force};
	nprobes = 1;
	if (second != NULL) {
		struct oauth2_params p2 = params;
		char *dir = xasprintf("%s/second", params.state_dir);

		p2.id = "probe-second";
		p2.token_endpoint = second;
		p2.state_dir = dir;
		probes[1] = (struct probe){"second", "second ", oauth2_source_new(client, &p2),
					   NULL,     1,		force};
		free(dir); /* the source keeps its own copy */
		nprobes = 2;
	}
	for (unsigned i = 0; i < nprobes; i++)
		if (probes[i].src == NULL) {
			fprintf(stderr, "oauth2-probe: cannot create the source\n");
			return 1;
		}

	started = now_s();
	for (unsigned i = 0; i < nprobes; i++)
		if (probes[i].left > 0)
			get_next(&probes[i]);
	if (cancel_after > 0) {
		struct timeval tv = {cancel_after / 1000, (cancel_after % 1000) * 1000};

		cancel = evtimer_new(base, cancel_cb, &probes[0]);
		evtimer_add(cancel, &tv);
	}
	all_done(); /* nothing to get */
	if (!finished)
		event_base_dispatch(base);

	printf("requests %u\n", oauth2_source_requests(probes[0].src));
	if (nprobes > 1)
		printf("second requests %u\n", oauth2_source_requests(probes[1].src));
	fflush(stdout);
	for (unsigned i = 0; i < nprobes; i++)
		oauth2_source_free(probes[i].src);
	oauth2_client_free(client);
	if (cancel != NULL)
		event_free(cancel);
	if (tick != NULL)
		event_free(tick);
	if (stop != NULL)
		event_free(stop);
	free(cache_path);
	event_base_free(base);
	return 0;
}
