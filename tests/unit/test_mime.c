/* Unit tests: RFC 2047 decoding of header values and the header fields. */
#include <glib.h>
#include <gmime/gmime.h>
#include <stdbool.h>
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

/* in decoded by mime_base64_decode_step and by GMime, both in pieces of
 * at most step bytes: the same bytes, the same state after every piece. */
static void
same_base64(const unsigned char *in, size_t len, size_t step)
{
	unsigned char *a = g_malloc(len + 3), *b = g_malloc(len + 3);
	size_t na = 0, nb = 0;
	int sa = 0, sb = 0;
	uint32_t va = 0;
	guint32 vb = 0;
	bool same = true;

	for (size_t i = 0; i < len || i == 0; i += step) {
		size_t k = len - i < step ? len - i : step;
		na += mime_base64_decode_step(in + i, k, a + na, &sa, &va);
		nb += g_mime_encoding_base64_decode_step(in + i, k, b + nb, &sb, &vb);
		same = same && sa == sb && va == vb && na == nb;
		if (len == 0)
			break;
	}
	CHECK(same && na == nb && memcmp(a, b, na) == 0);
	g_free(a);
	g_free(b);
}

static void
base64(void)
{
	static const char *const odd[] = {
		"",
		"aGVsbG8gd29ybGQ=",		    /* one '=' */
		"aGVsbG8gd29ybA==",		    /* two */
		"aGVsbG8gd29y",			    /* none needed */
		"aGVsbG8gd29ybA",		    /* padding missing */
		"aGVsbG8gd29yb",		    /* a lone sextet at the end */
		"aGVs\r\nbG8g\r\nd29y\r\nbA==\r\n", /* line breaks */
		"aGVsbG8=IGFmdGVy",		    /* data after the end */
		"aGVsbG8===",			    /* too many '=' */
		"=aGVs",			    /* '=' first */
		"a=GVs",			    /* '=' after one sextet */
		"aG=Vs",
		"aGV=s",
		"aG Vs\tbG*8g!d2~9y-bA_=.=", /* garbage among the alphabet */
		"\x80\xff-aGVs\xc3\xa9-bG8", /* bytes beyond ASCII */
		"////++++AAAAzzzz",
	};
	GRand *rnd = g_rand_new_with_seed(19);

	mime_init();
	for (size_t i = 0; i < sizeof(odd) / sizeof(odd[0]); i++) {
		const unsigned char *in = (const unsigned char *)odd[i];
		for (size_t step = 1; step <= 8; step++)
			same_base64(in, strlen(odd[i]), step);
		same_base64(in, strlen(odd[i]), 4096);
	}
	same_base64((const unsigned char *)"aGVs\0bG8=", 9, 3); /* a NUL */
	/* random text: mostly the alphabet, with line breaks, stray bytes and
	 * '=' now and then, cut in random pieces */
	for (int t = 0; t < 2000; t++) {
		static const char alpha[] =
			"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
		size_t len = (size_t)g_rand_int_range(rnd, 0, 400);
		unsigned char *in = g_malloc(len + 1);
		for (size_t j = 0; j < len; j++) {
			int k = g_rand_int_range(rnd, 0, 100);
			in[j] = k < 90	 ? (unsigned char)alpha[g_rand_int_range(rnd, 0, 64)]
				: k < 95 ? (unsigned char)"\r\n"[k % 2]
				: k < 98 ? (unsigned char)g_rand_int_range(rnd, 0, 256)
					 : '=';
		}
		same_base64(in, len, (size_t)g_rand_int_range(rnd, 1, 80));
		g_free(in);
	}
	g_rand_free(rnd);
}

int
main(void)
{
	mime_init();
	words();
	hostile_values();
	fields();
	base64();
	CHECK_DONE();
}
