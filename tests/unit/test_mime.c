/* Unit tests: RFC 2047 decoding of header values and the header fields. */
#include <glib.h>
#include <time.h>

#include "check.h"
#include "popfetchd/mime.h"

static void
decode(const char *raw, const char *want)
{
	char *got = mime_decode_header(raw);

	CHECK_STR(got, want);
	free(got);
}

static void
words(void)
{
	decode("plain text", "plain text");
	decode(" =?UTF-8?B?w5xiZXJzaWNodA==?=", "Übersicht");
	/* adjacent words: the space between vanishes, padding mid-way is fine */
	decode("=?UTF-8?B?Rmlyc3QgZGVhZGxpbmUgdGhlbQ==?=\r\n "
	       "=?UTF-8?B?IG90aGVyIGludG8gamFsYXBlw7Fv?=",
	       "First deadline them other into jalapeño");
	/* a character split across two words */
	decode("=?UTF-8?B?w6k=?= =?UTF-8?B?w6k=?=", "éé");
	decode("=?UTF-8?Q?caf=C3?= =?UTF-8?Q?=A9?=", "café");
	decode("=?ISO-8859-1?Q?caf=E9_cr=E8me?=", "café crème");
	decode("Re: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from Bob", "Re: Grüße from Bob");
	decode("=?UTF-8*de?Q?Gr=C3=BC=C3=9Fe?=", "Grüße");
	decode("=?ISO-8859-2?Q?=A3=F3d=BC?= =?UTF-8?B?w6k=?=", "Łódźé");
	/* folded plain text unfolds to its white space */
	decode("a long\r\n subject", "a long subject");
	/* malformed words stay as written */
	decode("=?UTF-8?X?abc?=", "=?UTF-8?X?abc?=");
	decode("=?UTF-8?B?unterminated", "=?UTF-8?B?unterminated");
	decode("=??B?abc?=", "=??B?abc?=");
	/* unknown charset, raw 8-bit: best effort, valid UTF-8 */
	char *g = mime_decode_header("=?x-unknown?Q?caf=E9?=");
	CHECK(g != NULL && g_utf8_validate(g, -1, NULL));
	free(g);
	decode("caf\xe9", "café");
	g = mime_decode_header("\xff\xfe\x80");
	CHECK(g != NULL && g_utf8_validate(g, -1, NULL));
	free(g);
	decode("", NULL);
	decode("   ", NULL);
}

static double
cpu_seconds(void)
{
	struct timespec t;

	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* A value of unit repeated to a megabyte, then tail. */
static char *
megabyte(const char *unit, const char *tail)
{
	GString *g = g_string_new(NULL);

	while (g->len < 1024 * 1024)
		g_string_append(g, unit);
	g_string_append(g, tail);
	return g_string_free(g, FALSE);
}

/*
 * Encoded words are bounded (1024 bytes: RFC 2047 says 75, some mailers
 * write longer ones), and decoding is linear whatever the value holds: a
 * megabyte of unterminated words took a quadratic scan half a minute.
 */
static void
hostile_values(void)
{
	static const char *const units[] = {
		"=?a?q?x",	"=?utf-8?q?",	   "=?UTF-8?B?QUJD",
		"=?",		"=?utf-8?q?abc?=", "=?iso-8859-1?q?=E9?= =?koi8-r?b?wQ==?= ",
		"=?a?q?x\r\n ", "=?=?u?q?=?",	   "=?\xe9?",
		"=?u?q?\xe9",
	};
	GString *w = g_string_new("=?UTF-8?Q?");
	char *v, *got;

	while (w->len < 1000)
		g_string_append_c(w, 'a');
	g_string_append(w, "?=");
	got = mime_decode_header(w->str);
	CHECK(got != NULL && strlen(got) == 990 && got[0] == 'a');
	free(got);
	g_string_insert(w, 10, "0123456789012345678901234567890123456789");
	decode(w->str, w->str);
	g_string_free(w, TRUE);
	/* an unterminated word hides nothing after it */
	decode("=?a?q?x =?UTF-8?Q?ok?=", "=?a?q?x ok");
	decode("=?a?q?x\t=?UTF-8?Q?a?= =?UTF-8?Q?b?=", "=?a?q?x\tab");

	for (size_t i = 0; i < G_N_ELEMENTS(units); i++) {
		v = megabyte(units[i], " =?UTF-8?Q?the_end?=");
		double t0 = cpu_seconds();
		got = mime_decode_header(v);
		double t = cpu_seconds() - t0;
		if (t >= 0.5)
			fprintf(stderr, "\"%s\": %.3f s of CPU for a megabyte\n", units[i], t);
		CHECK(t < 0.5);
		CHECK(got != NULL && g_utf8_validate(got, -1, NULL) &&
		      g_str_has_suffix(got, "the end"));
		free(got);
		free(v);
	}
}

static void
fields(void)
{
	const char *msg = "From: =?UTF-8?B?Qm9iIE3DvGxsZXI=?= <bob@example.net>\r\n"
			  "To: a@example.org,\r\n \"C, D\" <c@example.org>\r\n"
			  "Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\r\n"
			  "Date: Tue, 14 Nov 2023 22:16:25 -0000\r\n"
			  "Message-ID: <x.1@example.net>\r\n"
			  "\r\n"
			  "Subject: not a header\r\n";
	struct mime_headers h;

	mime_parse_headers(msg, strlen(msg), &h);
	CHECK_STR(h.from, "Bob Müller <bob@example.net>");
	CHECK_STR(h.to, "a@example.org, \"C, D\" <c@example.org>");
	CHECK_STR(h.subject, "Grüße");
	CHECK_STR(h.date, "Tue, 14 Nov 2023 22:16:25 -0000");
	CHECK_STR(h.message_id, "x.1@example.net");
	CHECK(h.cc == NULL);
	mime_headers_clear(&h);

	/* no header block at all, garbage: fields stay NULL, nothing crashes */
	mime_parse_headers("\x01\x02\x03", 3, &h);
	CHECK(h.subject == NULL && h.from == NULL);
	mime_headers_clear(&h);
}

int
main(void)
{
	mime_init();
	words();
	hostile_values();
	fields();
	CHECK_DONE();
}
