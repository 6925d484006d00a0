/* Unit tests: RFC 2047 decoding of header values and the header fields. */
#include <glib.h>

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
	fields();
	CHECK_DONE();
}
