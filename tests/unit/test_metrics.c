/* Unit tests: the metrics module's exposition text (counters, histograms,
 * label escaping) and its address syntax. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <event2/buffer.h>

#include "check.h"
#include "popfetchd/metrics.h"

/* The text metrics_render() gives, NUL-terminated (static buffer). */
static const char *
render(const struct metrics *m)
{
	static char text[65536];
	struct evbuffer *b = evbuffer_new();
	size_t n;

	metrics_render(m, b);
	n = evbuffer_get_length(b);
	if (n >= sizeof(text))
		n = sizeof(text) - 1;
	evbuffer_remove(b, text, n);
	text[n] = '\0';
	evbuffer_free(b);
	return text;
}

/* Whether text holds line as one whole line. */
static int
has_line(const char *text, const char *line)
{
	size_t n = strlen(line);

	for (const char *p = text; (p = strstr(p, line)) != NULL; p++)
		if ((p == text || p[-1] == '\n') && p[n] == '\n')
			return 1;
	return 0;
}

#define CHECK_LINE(text, line)                                                                     \
	do {                                                                                       \
		CHECK(has_line(text, line));                                                       \
		if (!has_line(text, line))                                                         \
			fprintf(stderr, "  missing line: %s\n", line);                             \
	} while (0)

static void
counters(void)
{
	struct metrics *m = metrics_new(NULL, "1.2.3");
	const char *t;

	metrics_config_add(m, "invoices");
	metrics_config_add(m, "archive");
	t = render(m);
	/* registered configurations start at 0 */
	CHECK_LINE(t, "popfetchd_polls_total{config=\"invoices\",result=\"ok\"} 0");
	CHECK_LINE(t, "popfetchd_polls_total{config=\"archive\",result=\"failed\"} 0");
	CHECK_LINE(t, "popfetchd_messages_saved_total{config=\"invoices\"} 0");
	CHECK(strstr(t, "popfetchd_last_success_timestamp_seconds{") == NULL);

	metrics_poll_done(
		m, "invoices",
		&(struct metrics_poll){
			.ok = true, .seconds = 0.3, .saved = 3, .bytes = 4000, .deleted = 2});
	metrics_poll_done(
		m, "invoices",
		&(struct metrics_poll){.ok = true, .seconds = 2, .saved = 1, .bytes = 96});
	metrics_poll_done(m, "archive", &(struct metrics_poll){.ok = false, .seconds = 40});
	metrics_poll_done(m, "archive", &(struct metrics_poll){.ok = false, .seconds = 4000});
	metrics_token_request(m, "archive", "ok");
	metrics_token_request(m, "archive", "refused");
	metrics_token_request(m, "archive", "refused");
	metrics_set_cert_expiry(m, "invoices", 1900000000);
	metrics_set_sessions(m, 2, 5);
	metrics_set_configurations(m, 7, 1, 2);
	t = render(m);
	CHECK_LINE(t, "# TYPE popfetchd_polls_total counter");
	CHECK_LINE(t, "# HELP popfetchd_polls_total Polls that ended, by result.");
	CHECK_LINE(t, "popfetchd_polls_total{config=\"invoices\",result=\"ok\"} 2");
	CHECK_LINE(t, "popfetchd_polls_total{config=\"invoices\",result=\"failed\"} 0");
	CHECK_LINE(t, "popfetchd_polls_total{config=\"archive\",result=\"failed\"} 2");
	CHECK_LINE(t, "popfetchd_messages_saved_total{config=\"invoices\"} 4");
	CHECK_LINE(t, "popfetchd_bytes_saved_total{config=\"invoices\"} 4096");
	CHECK_LINE(t, "popfetchd_messages_deleted_total{config=\"invoices\"} 2");
	CHECK_LINE(t, "popfetchd_consecutive_failures{config=\"archive\"} 2");
	CHECK_LINE(t, "popfetchd_consecutive_failures{config=\"invoices\"} 0");
	CHECK(strstr(t, "popfetchd_last_success_timestamp_seconds{config=\"invoices\"} ") != NULL);
	CHECK(strstr(t, "popfetchd_last_success_timestamp_seconds{config=\"archive\"}") == NULL);
	CHECK_LINE(t, "popfetchd_tls_certificate_expiry_timestamp_seconds{config=\"invoices\"} "
		      "1900000000");
	CHECK_LINE(t, "popfetchd_token_requests_total{config=\"archive\",result=\"ok\"} 1");
	CHECK_LINE(t, "popfetchd_token_requests_total{config=\"archive\",result=\"refused\"} 2");
	CHECK_LINE(t, "popfetchd_sessions{state=\"running\"} 2");
	CHECK_LINE(t, "popfetchd_sessions{state=\"queued\"} 5");
	CHECK_LINE(t, "popfetchd_configurations{state=\"active\"} 7");
	CHECK_LINE(t, "popfetchd_configurations{state=\"inactive\"} 1");
	CHECK_LINE(t, "popfetchd_configurations{state=\"broken\"} 2");
	CHECK_LINE(t, "popfetchd_build_info{version=\"1.2.3\"} 1");
	CHECK_LINE(t, "# TYPE process_cpu_seconds_total counter");
	CHECK(strstr(t, "\nprocess_resident_memory_bytes ") != NULL);
	CHECK(strstr(t, "\nprocess_open_fds ") != NULL);
	CHECK(strstr(t, "\nprocess_start_time_seconds ") != NULL);

	/* a success ends the run of failures */
	metrics_poll_done(m, "archive", &(struct metrics_poll){.ok = true});
	CHECK_LINE(render(m), "popfetchd_consecutive_failures{config=\"archive\"} 0");

	/* a removed configuration's series are gone */
	metrics_config_remove(m, "archive");
	t = render(m);
	CHECK(strstr(t, "config=\"archive\"") == NULL);
	CHECK_LINE(t, "popfetchd_messages_saved_total{config=\"invoices\"} 4");
	metrics_free(m);
}

static void
histograms(void)
{
	struct metrics *m = metrics_new(NULL, "1");
	const char *t;
	static const double d[] = {0.05, 0.1, 0.3, 2, 2, 4000};

	for (size_t i = 0; i < sizeof(d) / sizeof(d[0]); i++)
		metrics_poll_done(m, "a", &(struct metrics_poll){.ok = true, .seconds = d[i]});
	t = render(m);
	CHECK_LINE(t, "# TYPE popfetchd_poll_duration_seconds histogram");
	/* cumulative; a value on a bound falls into that bucket (le) */
	CHECK_LINE(t, "popfetchd_poll_duration_seconds_bucket{le=\"0.1\"} 2");
	CHECK_LINE(t, "popfetchd_poll_duration_seconds_bucket{le=\"0.25\"} 2");
	CHECK_LINE(t, "popfetchd_poll_duration_seconds_bucket{le=\"0.5\"} 3");
	CHECK_LINE(t, "popfetchd_poll_duration_seconds_bucket{le=\"2.5\"} 5");
	CHECK_LINE(t, "popfetchd_poll_duration_seconds_bucket{le=\"900\"} 5");
	CHECK_LINE(t, "popfetchd_poll_duration_seconds_bucket{le=\"+Inf\"} 6");
	CHECK_LINE(t, "popfetchd_poll_duration_seconds_sum 4004.45");
	CHECK_LINE(t, "popfetchd_poll_duration_seconds_count 6");

	metrics_loop_lag(m, 0.0004);
	metrics_loop_lag(m, 0.02);
	metrics_loop_lag(m, 3);
	t = render(m);
	CHECK_LINE(t, "# TYPE popfetchd_event_loop_lag_seconds histogram");
	CHECK_LINE(t, "popfetchd_event_loop_lag_seconds_bucket{le=\"0.001\"} 1");
	CHECK_LINE(t, "popfetchd_event_loop_lag_seconds_bucket{le=\"0.025\"} 2");
	CHECK_LINE(t, "popfetchd_event_loop_lag_seconds_bucket{le=\"2.5\"} 2");
	CHECK_LINE(t, "popfetchd_event_loop_lag_seconds_bucket{le=\"+Inf\"} 3");
	CHECK_LINE(t, "popfetchd_event_loop_lag_seconds_count 3");
	CHECK_LINE(t, "# TYPE popfetchd_event_loop_lag_max_seconds gauge");
	CHECK_LINE(t, "popfetchd_event_loop_lag_max_seconds 3.000000");
	metrics_free(m);
}

static void
escaping(void)
{
	struct metrics *m = metrics_new(NULL, "v\"1\\2\n3");
	const char *t;

	metrics_poll_done(m, "a\\b\"c\nd", &(struct metrics_poll){.ok = true, .saved = 1});
	metrics_token_request(m, "x", "bad\"name");
	t = render(m);
	CHECK_LINE(t, "popfetchd_messages_saved_total{config=\"a\\\\b\\\"c\\nd\"} 1");
	CHECK_LINE(t, "popfetchd_build_info{version=\"v\\\"1\\\\2\\n3\"} 1");
	CHECK_LINE(t, "popfetchd_token_requests_total{config=\"x\",result=\"bad\\\"name\"} 1");
	/* every line is a comment or a sample: no raw line feed got through */
	for (const char *p = t; *p != '\0'; p = strchr(p, '\n') + 1)
		CHECK(*p == '#' || (*p >= 'a' && *p <= 'z'));
	metrics_free(m);
}

static void
addresses(void)
{
	char host[64] = "untouched";
	uint16_t port = 7;

	CHECK(metrics_parse_listen("127.0.0.1:9100", host, sizeof(host), &port) == 0);
	CHECK_STR(host, "127.0.0.1");
	CHECK(port == 9100);
	CHECK(metrics_parse_listen("[::1]:9100", host, sizeof(host), &port) == 0);
	CHECK_STR(host, "::1");
	CHECK(metrics_parse_listen("0.0.0.0:65535", host, sizeof(host), &port) == 0 &&
	      port == 65535);
	CHECK(metrics_parse_listen("[fe80::1:2]:1", host, sizeof(host), &port) == 0);
	CHECK_STR(host, "fe80::1:2");
	strcpy(host, "untouched");
	port = 7;
	static const char *const bad[] = {
		"",
		"9100",
		":9100",
		"127.0.0.1",
		"127.0.0.1:",
		"127.0.0.1:0",
		"127.0.0.1:65536",
		"127.0.0.1:-1",
		"127.0.0.1:9x",
		"localhost:9100",
		"::1:9100",
		"[::1]",
		"[::1:9100",
		"[127.0.0.1]:1",
		"[]:9100",
		"1.2.3:9100",
		"[::1]x:9100",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int r = metrics_parse_listen(bad[i], host, sizeof(host), &port);
		CHECK(r == -EINVAL);
		if (r != -EINVAL)
			fprintf(stderr, "  accepted: \"%s\"\n", bad[i]);
	}
	CHECK_STR(host, "untouched");
	CHECK(port == 7);
	/* no room for the address */
	CHECK(metrics_parse_listen("127.0.0.1:1", host, 5, &port) == -EINVAL);
}

static void
null_is_off(void)
{
	/* the callers need no test of whether metrics are on */
	metrics_config_add(NULL, "a");
	metrics_poll_done(NULL, "a", &(struct metrics_poll){.ok = true});
	metrics_token_request(NULL, "a", "ok");
	metrics_set_cert_expiry(NULL, "a", 1);
	metrics_set_sessions(NULL, 1, 1);
	metrics_set_configurations(NULL, 1, 1, 1);
	metrics_loop_lag(NULL, 1);
	metrics_config_remove(NULL, "a");
	CHECK(metrics_address(NULL) == NULL);
	metrics_free(NULL);
}

int
main(void)
{
	counters();
	histograms();
	escaping();
	addresses();
	null_is_off();
	CHECK_DONE();
}
