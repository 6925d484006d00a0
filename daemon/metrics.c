/*
 * metrics — the Prometheus endpoint (see metrics.h).
 *
 * The configurations' series live in an array sorted by id. The answer to a
 * scrape is rendered into an evbuffer in one go (some hundred bytes per
 * configuration) and handed to evhttp, which writes it without blocking.
 *
 * evhttp bounds a request's size and each read's or write's inactivity, but
 * not a connection's life: a client that trickles a byte every few seconds
 * would stay. So every connection's bufferevent is made here (the evhttp
 * "bevcb"), held by one reference of ours with a deadline; the 1 s timer
 * that measures the loop's lag also sweeps them: one whose deadline passed
 * is shut down (evhttp then reads the end of the stream and frees it), and
 * one that evhttp has freed (its callbacks are gone) loses our reference.
 * A connection that made a request is let go at once, from evhttp's close
 * callback. The bufferevent closes its socket when the last reference goes
 * (BEV_OPT_CLOSE_ON_FREE): evhttp would close it at once, and a socket
 * that gets its number while our reference still has events on it would
 * have them fire. A read high-water mark bounds what such a bufferevent
 * may still read. Counting them lets the listener pause at
 * METRICS_MAX_CONNECTIONS.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>

#include "popfetchd/log.h"
#include "popfetchd/metrics.h"
#include "popfetchd/util.h"

#define TOKEN_RESULTS 4 /* distinct results of token requests kept per configuration */

struct histogram {
	const double *bounds; /* upper bounds, increasing; +Inf follows */
	size_t n;
	unsigned long long counts[16]; /* per bucket, not cumulative; [n] is +Inf */
	unsigned long long count;
	double sum;
	double max; /* the largest value observed */
};

static const double poll_bounds[] = {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900};
static const double lag_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
				    0.1,   0.25,   0.5,	  1,	2.5};

struct series {
	char *id;
	unsigned long long polls_ok, polls_failed, saved, bytes, deleted;
	unsigned failures;   /* consecutive failed polls */
	time_t last_success; /* 0: none since the start */
	time_t cert_expiry;  /* 0: unknown */
	struct {
		char name[16];
		unsigned long long n;
	} tokens[TOKEN_RESULTS];
};

struct conn {
	struct bufferevent *bev; /* one reference is ours */
	struct timespec deadline;
	bool cut; /* shut down already */
};

struct metrics {
	struct event_base *base;
	char *version;
	double start_time; /* the process's, seconds since the epoch */

	struct series **series; /* sorted by id */
	size_t nseries, capseries;
	size_t running, queued, active, inactive, broken;
	struct histogram poll_duration, loop_lag;

	struct event *tick; /* 1 s: the connections' sweep */
	struct event *lag;  /* METRICS_LAG_PERIOD: the loop's lag */
	struct timespec lag_due;

	struct evhttp *http;
	struct evhttp_bound_socket *bound;
	char *listening; /* the address served, or NULL */
	struct conn *conns;
	size_t nconns, capconns;
	bool paused; /* the listener, at METRICS_MAX_CONNECTIONS */
};

/* ---- the address ---- */

int
metrics_parse_listen(const char *s, char *host, size_t size, uint16_t *port)
{
	char addr[INET6_ADDRSTRLEN + 2];
	unsigned char bin[sizeof(struct in6_addr)];
	const char *colon, *p;
	size_t n;
	unsigned long v = 0;
	bool v6 = s != NULL && s[0] == '[';

	if (s == NULL || (colon = strrchr(s, ':')) == NULL || colon[1] == '\0')
		return -EINVAL;
	for (p = colon + 1; *p != '\0'; p++) {
		if (*p < '0' || *p > '9' || (v = v * 10 + (unsigned long)(*p - '0')) > 65535)
			return -EINVAL;
	}
	n = (size_t)(colon - s);
	if (v == 0 || (v6 && (n < 3 || s[n - 1] != ']')))
		return -EINVAL;
	if (v6) {
		s++;
		n -= 2;
	}
	if (n == 0 || n >= sizeof(addr) || n >= size)
		return -EINVAL;
	memcpy(addr, s, n);
	addr[n] = '\0';
	if (inet_pton(v6 ? AF_INET6 : AF_INET, addr, bin) != 1)
		return -EINVAL;
	memcpy(host, addr, n + 1);
	*port = (uint16_t)v;
	return 0;
}

/* ---- figures ---- */

static double
mono_diff(const struct timespec *a, const struct timespec *b)
{
	return (double)(a->tv_sec - b->tv_sec) + (double)(a->tv_nsec - b->tv_nsec) / 1e9;
}

static void
histogram_init(struct histogram *h, const double *bounds, size_t n)
{
	memset(h, 0, sizeof(*h));
	h->bounds = bounds;
	h->n = n;
}

static void
histogram_observe(struct histogram *h, double v)
{
	size_t i = 0;

	while (i < h->n && v > h->bounds[i])
		i++;
	h->counts[i]++;
	h->count++;
	h->sum += v;
	if (v > h->max)
		h->max = v;
}

static size_t
series_pos(const struct metrics *m, const char *id, bool *found)
{
	size_t lo = 0, hi = m->nseries;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		int c = strcmp(m->series[mid]->id, id);
		if (c == 0) {
			*found = true;
			return mid;
		}
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	*found = false;
	return lo;
}

/* id's series, made when it is not there yet. */
static struct series *
series_get(struct metrics *m, const char *id)
{
	bool found;
	size_t i = series_pos(m, id, &found);
	struct series *s;

	if (found)
		return m->series[i];
	if (m->nseries == m->capseries) {
		m->capseries = m->capseries ? 2 * m->capseries : 64;
		m->series = xrealloc(m->series, m->capseries * sizeof(*m->series));
	}
	s = xcalloc(1, sizeof(*s));
	s->id = xstrdup(id);
	memmove(m->series + i + 1, m->series + i, (m->nseries - i) * sizeof(*m->series));
	m->series[i] = s;
	m->nseries++;
	return s;
}

void
metrics_config_add(struct metrics *m, const char *id)
{
	if (m != NULL)
		series_get(m, id);
}

void
metrics_config_remove(struct metrics *m, const char *id)
{
	bool found;
	size_t i;

	if (m == NULL || (i = series_pos(m, id, &found), !found))
		return;
	free(m->series[i]->id);
	free(m->series[i]);
	m->nseries--;
	memmove(m->series + i, m->series + i + 1, (m->nseries - i) * sizeof(*m->series));
}

void
metrics_poll_done(struct metrics *m, const char *id, const struct metrics_poll *p)
{
	struct series *s;

	if (m == NULL)
		return;
	s = series_get(m, id);
	if (p->ok) {
		s->polls_ok++;
		s->failures = 0;
		s->last_success = time(NULL);
	} else {
		s->polls_failed++;
		s->failures++;
	}
	s->saved += p->saved;
	s->bytes += p->bytes;
	s->deleted += p->deleted;
	histogram_observe(&m->poll_duration, p->seconds < 0 ? 0 : p->seconds);
}

void
metrics_token_request(struct metrics *m, const char *id, const char *result)
{
	struct series *s;

	if (m == NULL)
		return;
	s = series_get(m, id);
	for (size_t i = 0; i < TOKEN_RESULTS; i++) {
		if (s->tokens[i].name[0] == '\0')
			snprintf(s->tokens[i].name, sizeof(s->tokens[i].name), "%s", result);
		if (strncmp(s->tokens[i].name, result, sizeof(s->tokens[i].name) - 1) == 0) {
			s->tokens[i].n++;
			return;
		}
	}
}

void
metrics_set_cert_expiry(struct metrics *m, const char *id, time_t t)
{
	if (m != NULL)
		series_get(m, id)->cert_expiry = t;
}

void
metrics_set_sessions(struct metrics *m, size_t running, size_t queued)
{
	if (m != NULL) {
		m->running = running;
		m->queued = queued;
	}
}

void
metrics_set_configurations(struct metrics *m, size_t active, size_t inactive, size_t broken)
{
	if (m != NULL) {
		m->active = active;
		m->inactive = inactive;
		m->broken = broken;
	}
}

void
metrics_loop_lag(struct metrics *m, double seconds)
{
	if (m != NULL)
		histogram_observe(&m->loop_lag, seconds < 0 ? 0 : seconds);
}

/* ---- the exposition text ---- */

/* A label value: backslash, double quote and line feed escaped. */
static void
add_label(struct evbuffer *out, const char *s)
{
	for (; *s != '\0'; s++) {
		if (*s == '\\')
			evbuffer_add(out, "\\\\", 2);
		else if (*s == '"')
			evbuffer_add(out, "\\\"", 2);
		else if (*s == '\n')
			evbuffer_add(out, "\\n", 2);
		else
			evbuffer_add(out, s, 1);
	}
}

static void
add_header(struct evbuffer *out, const char *name, const char *type, const char *help)
{
	evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* name{config="ID"} VALUE, or name{config="ID",LABEL="VALUE"} VALUE */
static void
add_config_sample(struct evbuffer *out, const char *name, const char *id, const char *label,
		  const char *value, unsigned long long v)
{
	evbuffer_add_printf(out, "%s{config=\"", name);
	add_label(out, id);
	if (label != NULL) {
		evbuffer_add_printf(out, "\",%s=\"", label);
		add_label(out, value);
	}
	evbuffer_add_printf(out, "\"} %llu\n", v);
}

static void
add_histogram(struct evbuffer *out, const char *name, const struct histogram *h)
{
	unsigned long long cum = 0;

	for (size_t i = 0; i < h->n; i++) {
		cum += h->counts[i];
		evbuffer_add_printf(out, "%s_bucket{le=\"%g\"} %llu\n", name, h->bounds[i], cum);
	}
	evbuffer_add_printf(out, "%s_bucket{le=\"+Inf\"} %llu\n", name, h->count);
	evbuffer_add_printf(out, "%s_sum %.9g\n%s_count %llu\n", name, h->sum, name, h->count);
}

/* The per-configuration families whose value is one counter of a series. */
static const struct family {
	const char *name, *type, *help;
	size_t off;
} config_families[] = {
	{"popfetchd_messages_saved_total", "counter", "Messages saved (durable on disk).",
	 offsetof(struct series, saved)},
	{"popfetchd_bytes_saved_total", "counter", "Bytes of the messages saved.",
	 offsetof(struct series, bytes)},
	{"popfetchd_messages_deleted_total", "counter",
	 "Messages deleted from the server (QUIT committed).", offsetof(struct series, deleted)},
};

static void
render_polls(const struct metrics *m, struct evbuffer *out)
{
	add_header(out, "popfetchd_polls_total", "counter", "Polls that ended, by result.");
	for (size_t i = 0; i < m->nseries; i++) {
		const struct series *s = m->series[i];
		add_config_sample(out, "popfetchd_polls_total", s->id, "result", "ok", s->polls_ok);
		add_config_sample(out, "popfetchd_polls_total", s->id, "result", "failed",
				  s->polls_failed);
	}
	for (size_t f = 0; f < sizeof(config_families) / sizeof(config_families[0]); f++) {
		const struct family *fam = &config_families[f];
		add_header(out, fam->name, fam->type, fam->help);
		for (size_t i = 0; i < m->nseries; i++)
			add_config_sample(out, fam->name, m->series[i]->id, NULL, NULL,
					  *(const unsigned long long *)((const char *)m->series[i] +
									fam->off));
	}
	add_header(out, "popfetchd_consecutive_failures", "gauge",
		   "Polls that failed in a row (0 after a success).");
	for (size_t i = 0; i < m->nseries; i++)
		add_config_sample(out, "popfetchd_consecutive_failures", m->series[i]->id, NULL,
				  NULL, m->series[i]->failures);
}

/* The gauges of a time, for the configurations that have one. */
static void
render_times(const struct metrics *m, struct evbuffer *out, const char *name, const char *help,
	     size_t off)
{
	add_header(out, name, "gauge", help);
	for (size_t i = 0; i < m->nseries; i++) {
		time_t t = *(const time_t *)((const char *)m->series[i] + off);
		if (t != 0)
			add_config_sample(out, name, m->series[i]->id, NULL, NULL,
					  (unsigned long long)t);
	}
}

static void
render_tokens(const struct metrics *m, struct evbuffer *out)
{
	add_header(out, "popfetchd_token_requests_total", "counter",
		   "Requests to the OAuth2 token endpoint, by result.");
	for (size_t i = 0; i < m->nseries; i++) {
		const struct series *s = m->series[i];
		for (size_t k = 0; k < TOKEN_RESULTS && s->tokens[k].name[0] != '\0'; k++)
			add_config_sample(out, "popfetchd_token_requests_total", s->id, "result",
					  s->tokens[k].name, s->tokens[k].n);
	}
}

static void
render_daemon(const struct metrics *m, struct evbuffer *out)
{
	add_header(out, "popfetchd_sessions", "gauge",
		   "POP3 sessions running, and polls queued for a session slot.");
	evbuffer_add_printf(out, "popfetchd_sessions{state=\"running\"} %zu\n", m->running);
	evbuffer_add_printf(out, "popfetchd_sessions{state=\"queued\"} %zu\n", m->queued);
	add_header(out, "popfetchd_configurations", "gauge",
		   "Configurations by state (broken: cannot be set up, not polled).");
	evbuffer_add_printf(out, "popfetchd_configurations{state=\"active\"} %zu\n", m->active);
	evbuffer_add_printf(out, "popfetchd_configurations{state=\"inactive\"} %zu\n", m->inactive);
	evbuffer_add_printf(out, "popfetchd_configurations{state=\"broken\"} %zu\n", m->broken);
	add_header(out, "popfetchd_poll_duration_seconds", "histogram",
		   "How long polls took, from the session's start to its end.");
	add_histogram(out, "popfetchd_poll_duration_seconds", &m->poll_duration);
	add_header(out, "popfetchd_event_loop_lag_seconds", "histogram",
		   "How late a 10 ms timer of the event loop fired.");
	add_histogram(out, "popfetchd_event_loop_lag_seconds", &m->loop_lag);
	add_header(out, "popfetchd_event_loop_lag_max_seconds", "gauge",
		   "The latest the 10 ms timer of the event loop fired since the start.");
	evbuffer_add_printf(out, "popfetchd_event_loop_lag_max_seconds %.6f\n", m->loop_lag.max);
	add_header(out, "popfetchd_build_info", "gauge", "The version of popfetchd running.");
	evbuffer_add_printf(out, "popfetchd_build_info{version=\"");
	add_label(out, m->version);
	evbuffer_add_printf(out, "\"} 1\n");
}

/* ---- process_* (from /proc/self) ---- */

struct proc_figures {
	double cpu; /* seconds, user + system */
	unsigned long long vsize, rss;
	unsigned long long starttime; /* clock ticks after boot */
};

static int
read_proc_stat(struct proc_figures *p)
{
	char buf[1024], *s;
	size_t n;
	unsigned long utime, stime;
	long rss;
	FILE *f = fopen("/proc/self/stat", "re");

	if (f == NULL)
		return -errno;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	/* after the command's name (which may hold anything): field 3 on */
	if ((s = strrchr(buf, ')')) == NULL ||
	    sscanf(s + 2,
		   "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu %*d %*d %*d %*d %*d %*d "
		   "%llu %llu %ld",
		   &utime, &stime, &p->starttime, &p->vsize, &rss) != 5)
		return -EINVAL;
	p->cpu = (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
	p->rss = (unsigned long long)rss * (unsigned long long)sysconf(_SC_PAGESIZE);
	return 0;
}

/* The boot time (seconds since the epoch) from /proc/stat, 0 if unknown. */
static double
boot_time(void)
{
	char line[256];
	unsigned long long btime = 0;
	FILE *f = fopen("/proc/stat", "re");

	if (f == NULL)
		return 0;
	while (fgets(line, sizeof(line), f) != NULL)
		if (sscanf(line, "btime %llu", &btime) == 1)
			break;
	fclose(f);
	return (double)btime;
}

static long
open_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *de;
	long n = 0;

	if (d == NULL)
		return -1;
	while ((de = readdir(d)) != NULL)
		if (de->d_name[0] != '.')
			n++;
	closedir(d);
	return n - 1; /* the directory's own */
}

static void
render_process(const struct metrics *m, struct evbuffer *out)
{
	struct proc_figures p;
	struct rlimit rl;
	long fds = open_fds();

	if (read_proc_stat(&p) == 0) {
		add_header(out, "process_cpu_seconds_total", "counter",
			   "User and system CPU time spent, in seconds.");
		evbuffer_add_printf(out, "process_cpu_seconds_total %.2f\n", p.cpu);
		add_header(out, "process_resident_memory_bytes", "gauge",
			   "Resident memory size in bytes.");
		evbuffer_add_printf(out, "process_resident_memory_bytes %llu\n", p.rss);
		add_header(out, "process_virtual_memory_bytes", "gauge",
			   "Virtual memory size in bytes.");
		evbuffer_add_printf(out, "process_virtual_memory_bytes %llu\n", p.vsize);
	}
	if (m->start_time > 0) {
		add_header(out, "process_start_time_seconds", "gauge",
			   "Start time of the process since the epoch, in seconds.");
		evbuffer_add_printf(out, "process_start_time_seconds %.2f\n", m->start_time);
	}
	if (fds >= 0) {
		add_header(out, "process_open_fds", "gauge", "Open file descriptors.");
		evbuffer_add_printf(out, "process_open_fds %ld\n", fds);
	}
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
		add_header(out, "process_max_fds", "gauge", "Most open file descriptors allowed.");
		evbuffer_add_printf(out, "process_max_fds %llu\n", (unsigned long long)rl.rlim_cur);
	}
}

void
metrics_render(const struct metrics *m, struct evbuffer *out)
{
	render_polls(m, out);
	render_times(m, out, "popfetchd_last_success_timestamp_seconds",
		     "When the last successful poll ended (absent: none since the start).",
		     offsetof(struct series, last_success));
	render_times(m, out, "popfetchd_tls_certificate_expiry_timestamp_seconds",
		     "When the server certificate of the last session expires.",
		     offsetof(struct series, cert_expiry));
	render_tokens(m, out);
	render_daemon(m, out);
	render_process(m, out);
}

/* ---- the endpoint ---- */

static void
reply(struct evhttp_request *req, int code, const char *reason, const char *text)
{
	struct evbuffer *body = evbuffer_new();

	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
			  "text/plain; charset=utf-8");
	evbuffer_add(body, text, strlen(text));
	evhttp_send_reply(req, code, reason, body);
	evbuffer_free(body);
}

static void
release(struct metrics *m, size_t i)
{
	bufferevent_decref(m->conns[i].bev);
	m->conns[i] = m->conns[--m->nconns];
}

/* evhttp is about to free a connection that made a request. */
static void
on_close(struct evhttp_connection *evcon, void *arg)
{
	struct metrics *m = arg;
	struct bufferevent *bev = evhttp_connection_get_bufferevent(evcon);

	for (size_t i = 0; i < m->nconns; i++)
		if (m->conns[i].bev == bev) {
			release(m, i);
			return;
		}
}

static void
on_request(struct evhttp_request *req, void *arg)
{
	struct metrics *m = arg;
	struct evkeyvalq *headers = evhttp_request_get_output_headers(req);
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
	const char *path = uri != NULL ? evhttp_uri_get_path(uri) : NULL;
	enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
	struct evbuffer *body;

	evhttp_connection_set_closecb(evhttp_request_get_connection(req), on_close, m);
	/* one request per connection: its deadline is the request's */
	evhttp_add_header(headers, "Connection", "close");
	if (path == NULL || strcmp(path, "/metrics") != 0) {
		reply(req, HTTP_NOTFOUND, "Not Found",
		      "404 not found: the metrics are at /metrics\n");
		return;
	}
	if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
		evhttp_add_header(headers, "Allow", "GET, HEAD");
		reply(req, 405, "Method Not Allowed", "405 method not allowed: GET or HEAD\n");
		return;
	}
	body = evbuffer_new();
	metrics_render(m, body);
	evhttp_add_header(headers, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
	evhttp_send_reply(req, HTTP_OK, "OK", body);
	evbuffer_free(body);
}

static void
listener_pause(struct metrics *m, bool pause)
{
	struct evconnlistener *l = m->bound ? evhttp_bound_socket_get_listener(m->bound) : NULL;

	if (l == NULL || m->paused == pause)
		return;
	if (pause)
		evconnlistener_disable(l);
	else
		evconnlistener_enable(l);
	m->paused = pause;
}

/* evhttp's bufferevent for a new connection: ours to watch (see the top). */
static struct bufferevent *
new_connection(struct event_base *base, void *arg)
{
	struct metrics *m = arg;
	struct bufferevent *bev = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);
	struct conn *c;

	if (bev == NULL)
		return NULL;
	/* above METRICS_MAX_HEADERS: evhttp refuses the request first */
	bufferevent_setwatermark(bev, EV_READ, 0, 2 * METRICS_MAX_HEADERS);
	if (m->nconns == m->capconns) {
		m->capconns = m->capconns ? 2 * m->capconns : METRICS_MAX_CONNECTIONS;
		m->conns = xrealloc(m->conns, m->capconns * sizeof(*m->conns));
	}
	bufferevent_incref(bev);
	c = &m->conns[m->nconns++];
	c->bev = bev;
	c->cut = false;
	clock_gettime(CLOCK_MONOTONIC, &c->deadline);
	c->deadline.tv_sec += METRICS_DEADLINE;
	if (m->nconns >= METRICS_MAX_CONNECTIONS)
		listener_pause(m, true);
	return bev;
}

/* Drop the connections evhttp has freed; cut those past their deadline. */
static void
sweep(struct metrics *m, const struct timespec *now)
{
	size_t i = 0;

	while (i < m->nconns) {
		struct conn *c = &m->conns[i];
		bufferevent_event_cb eventcb = NULL;

		/* evhttp keeps an event callback while it uses the bufferevent */
		bufferevent_getcb(c->bev, NULL, NULL, &eventcb, NULL);
		if (eventcb == NULL) {
			release(m, i);
			continue;
		}
		if (!c->cut && mono_diff(now, &c->deadline) >= 0) {
			evutil_socket_t fd = bufferevent_getfd(c->bev);
			log_debug(NULL, "metrics: a connection took more than %d s: closed",
				  METRICS_DEADLINE);
			if (fd >= 0)
				shutdown(fd, SHUT_RDWR);
			c->cut = true;
		}
		i++;
	}
	if (m->nconns < METRICS_MAX_CONNECTIONS)
		listener_pause(m, false);
}

static void
arm_tick(struct metrics *m)
{
	static const struct timeval second = {1, 0};

	evtimer_add(m->tick, &second);
}

static void
on_tick(evutil_socket_t fd, short what, void *arg)
{
	struct metrics *m = arg;
	struct timespec now;

	(void)fd;
	(void)what;
	clock_gettime(CLOCK_MONOTONIC, &now);
	sweep(m, &now);
	arm_tick(m);
}

/* The next lag sample is due METRICS_LAG_PERIOD from now. libevent's own
 * clock is the one cached when this loop iteration began: brought up to date
 * first, its deadline is ours. */
static void
arm_lag(struct metrics *m)
{
	static const struct timeval period = {0, METRICS_LAG_PERIOD * 1000};

	event_base_update_cache_time(m->base);
	clock_gettime(CLOCK_MONOTONIC, &m->lag_due);
	m->lag_due.tv_nsec += METRICS_LAG_PERIOD * 1000000L;
	if (m->lag_due.tv_nsec >= 1000000000L) {
		m->lag_due.tv_sec++;
		m->lag_due.tv_nsec -= 1000000000L;
	}
	evtimer_add(m->lag, &period);
}

static void
on_lag(evutil_socket_t fd, short what, void *arg)
{
	struct metrics *m = arg;
	struct timespec now;

	(void)fd;
	(void)what;
	clock_gettime(CLOCK_MONOTONIC, &now);
	metrics_loop_lag(m, mono_diff(&now, &m->lag_due));
	arm_lag(m);
}

static void
drop_connections(struct metrics *m)
{
	for (size_t i = 0; i < m->nconns; i++)
		bufferevent_decref(m->conns[i].bev);
	m->nconns = 0;
}

/* No more HTTP server: its connections go with it. */
static void
close_server(struct metrics *m)
{
	if (m->http != NULL)
		evhttp_free(m->http);
	drop_connections(m);
	m->http = NULL;
}

void
metrics_free(struct metrics *m)
{
	if (m == NULL)
		return;
	for (size_t i = 0; i < m->nseries; i++)
		FREE_ALL(m->series[i]->id, m->series[i]);
	close_server(m);
	if (m->tick != NULL)
		event_free(m->tick);
	if (m->lag != NULL)
		event_free(m->lag);
	FREE_ALL(m->conns, m->series, m->listening, m->version, m);
}

static struct evhttp *
http_new(struct metrics *m)
{
	struct evhttp *http = evhttp_new(m->base);

	if (http == NULL)
		return NULL;
	evhttp_set_max_headers_size(http, METRICS_MAX_HEADERS);
	evhttp_set_max_body_size(http, METRICS_MAX_BODY);
	evhttp_set_timeout(http, METRICS_DEADLINE);
	/* every method reaches on_request, which answers 405 itself */
	evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
						 EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
						 EVHTTP_REQ_OPTIONS | EVHTTP_REQ_TRACE |
						 EVHTTP_REQ_CONNECT | EVHTTP_REQ_PATCH);
	evhttp_set_gencb(http, on_request, m);
	evhttp_set_bevcb(http, new_connection, m);
	return http;
}

int
metrics_listen(struct metrics *m, const char *listen, char *why, size_t size)
{
	char host[INET6_ADDRSTRLEN];
	uint16_t port;
	struct evhttp *http;
	struct evhttp_bound_socket *bound;
	int err;

	if (m == NULL || (m->listening != NULL && strcmp(m->listening, listen) == 0))
		return 0;
	if (metrics_parse_listen(listen, host, sizeof(host), &port) < 0) {
		snprintf(why, size, "not ADDRESS:PORT with an IP address");
		return -EINVAL;
	}
	if (m->base == NULL || (http = http_new(m)) == NULL) {
		snprintf(why, size, "cannot set up an HTTP server");
		return -ENOMEM;
	}
	errno = 0;
	if ((bound = evhttp_bind_socket_with_handle(http, host, port)) == NULL) {
		err = errno ? errno : EADDRNOTAVAIL;
		snprintf(why, size, "cannot listen on %s: %s", listen, strerror(err));
		evhttp_free(http);
		return -err;
	}
	close_server(m);
	m->http = http;
	m->bound = bound;
	m->paused = false;
	free(m->listening);
	m->listening = xstrdup(listen);
	return 0;
}

const char *
metrics_address(const struct metrics *m)
{
	return m != NULL ? m->listening : NULL;
}

/* ---- life ---- */

struct metrics *
metrics_new(struct event_base *base, const char *version)
{
	struct metrics *m = xcalloc(1, sizeof(*m));
	struct proc_figures p;

	m->base = base;
	m->version = xstrdup(version);
	if (read_proc_stat(&p) == 0 && boot_time() > 0)
		m->start_time = boot_time() + (double)p.starttime / (double)sysconf(_SC_CLK_TCK);
	histogram_init(&m->poll_duration, poll_bounds, sizeof(poll_bounds) / sizeof(double));
	histogram_init(&m->loop_lag, lag_bounds, sizeof(lag_bounds) / sizeof(double));
	if (base != NULL) {
		if ((m->tick = evtimer_new(base, on_tick, m)) == NULL ||
		    (m->lag = evtimer_new(base, on_lag, m)) == NULL)
			abort();
		arm_tick(m);
		arm_lag(m);
	}
	return m;
}
