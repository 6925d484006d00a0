/*
 * metrics — the daemon's figures in the Prometheus text exposition format
 * 0.0.4, served at GET /metrics by libevent's evhttp on the daemon's loop
 * (DESIGN.md §7). It is told plain numbers through this interface (a poll's
 * result, a token request, the session and configuration counts) and knows
 * no protocol.
 *
 * The endpoint never holds up the loop: the answer is built in memory, the
 * request is bounded in size (METRICS_MAX_HEADERS, METRICS_MAX_BODY) and in
 * time (a connection lives at most METRICS_DEADLINE seconds however slowly
 * its client sends or reads), every answer closes its connection, and at
 * most METRICS_MAX_CONNECTIONS connections are open at once (further ones
 * wait in the kernel's backlog).
 *
 * Every function accepts a NULL struct metrics and then does nothing: the
 * callers need no test of whether metrics are on.
 */
#ifndef POPFETCHD_METRICS_H
#define POPFETCHD_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

struct event_base;
struct evbuffer;
struct metrics;

#define METRICS_MAX_HEADERS	8192 /* bytes of request line and headers */
#define METRICS_MAX_BODY	1024 /* bytes of a request body (none is needed) */
#define METRICS_DEADLINE	5    /* seconds a connection may live */
#define METRICS_MAX_CONNECTIONS 16
#define METRICS_LAG_PERIOD	10 /* ms: the timer whose lateness is the loop's lag */

/*
 * "ADDRESS:PORT": an IPv4 address, or an IPv6 address in brackets
 * ("[::1]:9100"), and a port 1-65535; no host name (it would need a DNS
 * lookup). 0 with the address (without brackets) in host and the port in
 * *port, or -EINVAL (host and *port untouched).
 */
int metrics_parse_listen(const char *s, char *host, size_t size, uint16_t *port);

/*
 * The figures, with a timer on base every METRICS_LAG_PERIOD ms that
 * measures how late the loop runs timers (base NULL: no timer, for tests):
 * a callback that blocks the loop shows as lag. It runs only while metrics
 * are on (nobody would read it otherwise); each sample costs a clock read.
 * version: build_info's.
 */
struct metrics *metrics_new(struct event_base *base, const char *version);
/*
 * Serve /metrics on listen ("ADDRESS:PORT"); a new address replaces the
 * one served, the same one is left alone. On failure the address served
 * so far (if any) stays, and why says what failed: -errno.
 */
int metrics_listen(struct metrics *m, const char *listen, char *why, size_t size);
/* The address served ("ADDRESS:PORT"), or NULL. */
const char *metrics_address(const struct metrics *m);
/* Closes the endpoint and its connections. NULL is a no-op. */
void metrics_free(struct metrics *m);

/* A configuration's series: its counters start at 0 (so that rate() sees
 * the first poll); remove drops them all. */
void metrics_config_add(struct metrics *m, const char *id);
void metrics_config_remove(struct metrics *m, const char *id);

/* One poll's end. */
struct metrics_poll {
	bool ok;
	double seconds; /* how long it took */
	unsigned long long saved, bytes, deleted;
};
void metrics_poll_done(struct metrics *m, const char *id, const struct metrics_poll *p);
/* One request to a configuration's token endpoint; result: a short name
 * ("ok", "refused", "unavailable", "local"). */
void metrics_token_request(struct metrics *m, const char *id, const char *result);
/* When the server certificate of the configuration's last session expires. */
void metrics_set_cert_expiry(struct metrics *m, const char *id, time_t t);
/* Sessions running and polls waiting for a slot. */
void metrics_set_sessions(struct metrics *m, size_t running, size_t queued);
/* Configurations: polled, inactive (never polled), broken (cannot be set up). */
void metrics_set_configurations(struct metrics *m, size_t active, size_t inactive, size_t broken);
/* One sample of how late a timer fired (the lag timer adds its own). */
void metrics_loop_lag(struct metrics *m, double seconds);

/* The exposition text, as GET /metrics answers it. */
void metrics_render(const struct metrics *m, struct evbuffer *out);

#endif
