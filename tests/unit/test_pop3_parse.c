/* Unit tests: the POP3 response parser and dot-unstuffing. */
#include <errno.h>
#include <stdio.h>

#include "check.h"
#include "popfetchd/pop3_parse.h"

static struct pop3_reply
status(const char *line)
{
	struct pop3_reply r;

	pop3_parse_status(line, strlen(line), &r);
	return r;
}

static bool
text_is(const struct pop3_reply *r, const char *want)
{
	return r->text_len == strlen(want) && memcmp(r->text, want, r->text_len) == 0;
}

static void
status_lines(void)
{
	struct pop3_reply r;

	r = status("+OK Dovecot ready.");
	CHECK(r.status == POP3_STATUS_OK && text_is(&r, "Dovecot ready.") && r.rcodes == 0);
	r = status("+OK");
	CHECK(r.status == POP3_STATUS_OK && r.text_len == 0);
	r = status("-ERR");
	CHECK(r.status == POP3_STATUS_ERR);
	r = status("-ERR [AUTH] Authentication failed.");
	CHECK(r.status == POP3_STATUS_ERR && r.rcodes == POP3_RC_AUTH &&
	      text_is(&r, "Authentication failed."));
	r = status("-ERR [IN-USE] Mailbox locked");
	CHECK(r.rcodes == POP3_RC_IN_USE);
	r = status("-ERR [SYS/TEMP] Try again");
	CHECK(r.rcodes == POP3_RC_SYS_TEMP);
	r = status("-ERR [SYS/PERM] Gone");
	CHECK(r.rcodes == POP3_RC_SYS_PERM);
	r = status("-ERR [LOGIN-DELAY] wait");
	CHECK(r.rcodes == POP3_RC_LOGIN_DELAY && r.login_delay == 0);
	r = status("-ERR [LOGIN-DELAY 900] wait");
	CHECK(r.rcodes == POP3_RC_LOGIN_DELAY && r.login_delay == 900);
	r = status("-ERR [AUTHX] no such code");
	CHECK(r.rcodes == 0);
	r = status("-ERR [IN-USE no close");
	CHECK(r.rcodes == 0 && r.status == POP3_STATUS_ERR);
	r = status("+ ");
	CHECK(r.status == POP3_STATUS_CONT);
	r = status("+ PDEyMzQ+");
	CHECK(r.status == POP3_STATUS_CONT && text_is(&r, "PDEyMzQ+"));
	r = status("+OKAY");
	CHECK(r.status == POP3_STATUS_BAD);
	r = status("hello");
	CHECK(r.status == POP3_STATUS_BAD);
	r = status("");
	CHECK(r.status == POP3_STATUS_BAD);
	/* a NUL inside the line does not end it */
	pop3_parse_status("-ERR a\0b", 8, &r);
	CHECK(r.status == POP3_STATUS_ERR && r.text_len == 3);
}

static void
capa(void)
{
	struct pop3_capa c;
	const char *lines[] = {"CAPA",
			       "TOP",
			       "UIDL",
			       "RESP-CODES",
			       "PIPELINING",
			       "AUTH-RESP-CODE",
			       "USER",
			       "UTF8",
			       "STLS",
			       "LOGIN-DELAY 900",
			       "SASL PLAIN login SCRAM-SHA-256"};

	pop3_capa_init(&c);
	CHECK(!c.seen && !c.uidl);
	for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++)
		pop3_parse_capa_line(&c, lines[i], strlen(lines[i]));
	CHECK(c.seen && c.top && c.uidl && c.resp_codes && c.pipelining && c.auth_resp_code);
	CHECK(c.user && c.utf8 && c.stls && c.login_delay == 900);
	CHECK_STR(c.sasl, "PLAIN LOGIN SCRAM-SHA-256");
	/* a huge SASL line is cut, not overflowed */
	char big[2000];
	memset(big, 'A', sizeof(big));
	memcpy(big, "SASL ", 5);
	for (size_t i = 10; i < sizeof(big); i += 10)
		big[i] = ' ';
	pop3_capa_init(&c);
	pop3_parse_capa_line(&c, big, sizeof(big));
	CHECK(strlen(c.sasl) < sizeof(c.sasl));
	/* only mechanism names (RFC 4422: 1-20 of A-Z 0-9 - _) are kept: the
	 * list is shown in log lines, and a server's escape sequences are not */
	const char hostile[] = "SASL PLAIN \x1b[31mRED X\x07Y caf\xc3\xa9 \xe2\x80\xae "
			       "A23456789012345678901 x_oauth2 12345678901234567890 LOGIN";
	pop3_capa_init(&c);
	pop3_parse_capa_line(&c, hostile, sizeof(hostile) - 1);
	CHECK_STR(c.sasl, "PLAIN X_OAUTH2 12345678901234567890 LOGIN");
}

static void
listings(void)
{
	unsigned long n, cnt;
	uint64_t sz;
	char uid[POP3_UIDL_MAX + 1];
	const char *l;
	size_t len;

	CHECK(pop3_parse_uidl_line("1 000000017f5c1a2b", 18, &n, uid) == 0 && n == 1);
	CHECK_STR(uid, "000000017f5c1a2b");
	CHECK(pop3_parse_uidl_line("12 abc ", 7, &n, uid) == 0 && n == 12);
	CHECK(pop3_parse_uidl_line("0 abc", 5, &n, uid) == -EINVAL);
	CHECK(pop3_parse_uidl_line("x abc", 5, &n, uid) == -EINVAL);
	CHECK(pop3_parse_uidl_line("1", 1, &n, uid) == -EINVAL);
	CHECK(pop3_parse_uidl_line("1 ", 2, &n, uid) == -EINVAL);
	CHECK(pop3_parse_uidl_line("1 a b", 5, &n, uid) == -EINVAL);
	CHECK(pop3_parse_uidl_line("1 a\x01", 4, &n, uid) == -EINVAL);
	char longuid[80] = "1 ";
	memset(longuid + 2, 'u', 71);
	CHECK(pop3_parse_uidl_line(longuid, 73, &n, uid) == -EINVAL);
	CHECK(pop3_parse_uidl_line(longuid, 72, &n, uid) == 0 && strlen(uid) == 70);
	CHECK(pop3_parse_uidl_line("99999999999 a", 13, &n, uid) == -EINVAL);

	CHECK(pop3_parse_list_line("3 1234", 6, &n, &sz) == 0 && n == 3 && sz == 1234);
	CHECK(pop3_parse_list_line("3  1234 extra", 13, &n, &sz) == 0 && sz == 1234);
	CHECK(pop3_parse_list_line("3 12x", 5, &n, &sz) == -EINVAL);
	CHECK(pop3_parse_list_line("3", 1, &n, &sz) == -EINVAL);
	CHECK(pop3_parse_list_line("3 99999999999999999999999", 25, &n, &sz) == -EINVAL);

	CHECK(pop3_parse_stat("2 320", 5, &cnt, &sz) == 0 && cnt == 2 && sz == 320);
	CHECK(pop3_parse_stat("0 0", 3, &cnt, &sz) == 0 && cnt == 0 && sz == 0);
	CHECK(pop3_parse_stat("3  1234 messages", 16, &cnt, &sz) == 0 && cnt == 3 && sz == 1234);
	CHECK(pop3_parse_stat("3", 1, &cnt, &sz) == -EINVAL);
	CHECK(pop3_parse_stat("3 12x", 5, &cnt, &sz) == -EINVAL);
	CHECK(pop3_parse_stat("", 0, &cnt, &sz) == -EINVAL);
	CHECK(pop3_parse_stat("Logged in.", 10, &cnt, &sz) == -EINVAL);
	CHECK(pop3_parse_stat("1 99999999999999999999999", 25, &cnt, &sz) == -EINVAL);

	l = ".";
	len = 1;
	CHECK(pop3_listing_line(&l, &len) == 1);
	l = "..x";
	len = 3;
	CHECK(pop3_listing_line(&l, &len) == 0 && len == 2 && l[0] == '.');
	l = "TOP";
	len = 3;
	CHECK(pop3_listing_line(&l, &len) == 0 && len == 3);
}

/* Unstuff in pieces of `step` bytes; returns output length, -1 if no end. */
static long
unstuff(const char *in, size_t inlen, size_t step, char *out, size_t *consumed)
{
	struct pop3_dot d;
	size_t i = 0, o = 0;

	pop3_dot_init(&d);
	while (i < inlen && !d.done) {
		size_t n = inlen - i < step ? inlen - i : step, w;
		size_t used = pop3_dot_feed(&d, in + i, n, out + o, &w);
		i += used;
		o += w;
		if (used < n && !d.done)
			return -2; /* must consume everything until done */
	}
	*consumed = i;
	return d.done ? (long)o : -1;
}

static void
dot(void)
{
	static const struct {
		const char *in, *out;
		size_t rest; /* bytes after the terminator */
	} cases[] = {
		{"Subject: x\r\n\r\nbody\r\n.\r\n", "Subject: x\r\n\r\nbody\r\n", 0},
		{".\r\n", "", 0},
		{"..\r\n.\r\n", ".\r\n", 0},
		{"..leading\r\n...two\r\n.\r\n", ".leading\r\n..two\r\n", 0},
		{"a\r\n.\r\nNEXT", "a\r\n", 4},
		{"a.\r\n.b\r\n.\r\n", "a.\r\nb\r\n", 0},
		{"x\r\r\n.\r\n", "x\r\r\n", 0},
		{".\r.\r\n.\r\n", "\r.\r\n", 0},
		{".\r\rX\r\n.\r\n", "\r\rX\r\n", 0},
		{".\r\r\n.\r\n", "\r\r\n", 0},
		{"a\nb\n.\n\r\n.\r\n", "a\nb\n.\n\r\n", 0},
		{"nul\0in\r\n.\r\n", "nul\0in\r\n", 0},
	};
	static const size_t lens[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 11};

	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		size_t inlen = lens[c] ? lens[c] : strlen(cases[c].in);
		size_t outlen = c == 11 ? 8 : strlen(cases[c].out);
		/* every split point, every piece size */
		for (size_t step = 1; step <= inlen; step++) {
			char out[256];
			size_t consumed = 0;
			long n = unstuff(cases[c].in, inlen, step, out, &consumed);
			CHECK(n == (long)outlen);
			CHECK(n >= 0 && memcmp(out, cases[c].out, outlen) == 0);
			CHECK(consumed == inlen - cases[c].rest);
		}
	}
	/* no terminator yet: everything consumed, not done */
	char out[64];
	size_t consumed;
	CHECK(unstuff("abc\r\n.", 6, 6, out, &consumed) == -1);
}

static void
status_like(void)
{
	static const struct {
		const char *in;
		int want;
	} cases[] = {
		{"+OK 120 octets\r\n", 1},
		{"+OK\r\n", 1},
		{"+OK\n", 1},
		{"-ERR no such message\r\n", 1},
		{"-ERR\r\n", 1},
		{"+OKAY: a header\r\n", 0},
		{"+ok lower case\r\n", 0},
		{"-ERRATA: 1\r\n", 0},
		{"Received: from x\r\n", 0},
		{"+", -1},
		{"+O", -1},
		{"+OK", -1},
		{"-ER", -1},
		{"-ERR", -1},
		{"", -1},
		{"+X", 0},
		{"R", 0},
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		CHECK(pop3_looks_like_status(cases[i].in, strlen(cases[i].in)) == cases[i].want);
}

/* The header block's length, fed in pieces of `step` bytes; -1 if no end. */
static long
head_len(const char *in, size_t inlen, size_t step)
{
	struct pop3_head h;
	size_t i = 0, n = 0;

	pop3_head_init(&h);
	while (i < inlen) {
		size_t piece = inlen - i < step ? inlen - i : step;
		size_t used = pop3_head_feed(&h, in + i, piece);
		if (used > piece || (used < piece && !h.done))
			return -2;
		n += used;
		i += piece;
		if (h.done)
			break;
	}
	return h.done ? (long)n : -1;
}

static void
head(void)
{
	static const struct {
		const char *in;
		long want; /* bytes of the header block, -1: it does not end */
	} cases[] = {
		{"Subject: x\r\nFrom: y\r\n\r\nbody\r\n", 23},
		{"Subject: x\r\n\r\n", 14},
		{"\r\nbody\r\n", 2},
		{"\nbody\n", 1},
		{"A: 1\nB: 2\n\nbody\n", 11},
		{"A: 1\r\n\nrest", 7},
		{"A: 1\r\n \r\n\r\n", 11},
		{"A: \r\r\n\r\nx", 8},
		{"A: 1\r\n\r\r\n\r\n", 11},
		{"A: 1\r\nB: 2\r\n", -1},
		{"A: 1\r\n\r", -1},
		{"", -1},
	};

	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		size_t inlen = strlen(cases[c].in);
		for (size_t step = 1; step <= (inlen ? inlen : 1); step++)
			CHECK(head_len(cases[c].in, inlen, step) == cases[c].want);
	}
	/* once done, nothing more belongs to the block */
	struct pop3_head h;
	pop3_head_init(&h);
	CHECK(pop3_head_feed(&h, "\r\n", 2) == 2 && h.done);
	CHECK(pop3_head_feed(&h, "more\r\n\r\n", 10) == 0 && h.done);
}

/* pop3_frame_line on a C string: its result, the line and what it used. */
static int
frame(const char *in, size_t inlen, char *line, size_t *used)
{
	size_t len = 99999;
	int r;

	*used = 99999;
	r = pop3_frame_line(in, inlen, &len, used);
	line[0] = '\0';
	if (r == 1)
		snprintf(line, POP3_LINE_MAX + 1, "%.*s", (int)len, in);
	return r;
}

static void
framing(void)
{
	char line[POP3_LINE_MAX + 1], big[700];
	size_t used;

	CHECK(frame("+OK hi\r\n-ERR\r\n", 14, line, &used) == 1 && used == 8);
	CHECK_STR(line, "+OK hi");
	CHECK(frame("+OK hi\n", 7, line, &used) == 1 && used == 7);
	CHECK_STR(line, "+OK hi");
	CHECK(frame("\r\n", 2, line, &used) == 1 && used == 2);
	CHECK_STR(line, "");
	/* a CR not before the LF is part of the line; one before it is not */
	CHECK(frame("a\rb\r\n", 5, line, &used) == 1 && used == 5);
	CHECK_STR(line, "a\rb");
	CHECK(frame("x\r\r\n", 4, line, &used) == 1 && used == 4);
	CHECK_STR(line, "x\r");
	CHECK(frame("+OK", 3, line, &used) == 0);
	CHECK(frame("+OK\r", 4, line, &used) == 0);
	CHECK(frame("", 0, line, &used) == 0);
	/* at most POP3_LINE_MAX octets with the CRLF: 510 before it */
	memset(big, 'x', sizeof(big));
	memcpy(big + 510, "\r\n", 2);
	CHECK(frame(big, 512, line, &used) == 1 && used == 512 && strlen(line) == 510);
	big[510] = '\n';
	CHECK(frame(big, 600, line, &used) == 1 && used == 511 && strlen(line) == 510);
	memset(big, 'x', sizeof(big));
	memcpy(big + 511, "\r\n", 2);
	CHECK(frame(big, 513, line, &used) == -EMSGSIZE);
	big[511] = '\n';
	CHECK(frame(big, 512, line, &used) == -EMSGSIZE);
	memset(big, 'x', sizeof(big));
	CHECK(frame(big, 511, line, &used) == 0);
	CHECK(frame(big, 512, line, &used) == -EMSGSIZE);
	big[650] = '\n';
	CHECK(frame(big, 700, line, &used) == -EMSGSIZE);
}

/* Feed data in pieces of step bytes (an output buffer of outsize) until
 * its end: the result of the last call, the message (or "") in out. */
static enum pop3_data_result
data_run(struct pop3_data *d, const char *in, size_t inlen, size_t step, size_t outsize, char *out,
	 size_t *consumed, int *ambiguous)
{
	char piece[256];
	size_t i = 0, o = 0, offered = 0;
	enum pop3_data_result r = POP3_DATA_MORE;

	*ambiguous = 0;
	while (i < inlen) {
		size_t used, outlen;
		offered = offered + step < inlen - i ? offered + step : inlen - i;
		r = pop3_data_feed(d, in + i, offered, piece, outsize, &used, &outlen);
		if (r == POP3_DATA_AMBIGUOUS)
			++*ambiguous;
		if (r == POP3_DATA_MORE || r == POP3_DATA_AMBIGUOUS)
			continue;
		memcpy(out + o, piece, outlen);
		o += outlen;
		i += used;
		offered = 0;
		if (r == POP3_DATA_END)
			break;
	}
	out[o] = '\0';
	*consumed = i;
	return r;
}

static void
data(void)
{
	struct pop3_data d;
	char out[256];
	size_t used, outlen, consumed;
	int amb;
	const char msg[] = "Subject: x\r\n\r\n..dot\r\n.\r\n+OK next\r\n";
	const char out_of_step[] = "+OK 120 octets\r\nSubject: y\r\n.\r\n";

	/* pipelined, a plain message: unstuffed, the input after it left */
	for (size_t step = 1; step <= sizeof(msg) - 1; step++) {
		pop3_data_init(&d, true);
		CHECK(pop3_data_want(&d) == POP3_DATA_PEEK);
		CHECK(data_run(&d, msg, sizeof(msg) - 1, step, 5, out, &consumed, &amb) ==
		      POP3_DATA_END);
		CHECK_STR(out, "Subject: x\r\n\r\n.dot\r\n");
		CHECK(consumed == 24 && amb == 0 && !d.ambiguous && pop3_data_want(&d) == 1);
	}
	/* pipelined, data that begins like a status line: reported once, dropped */
	for (size_t step = 1; step <= sizeof(out_of_step) - 1; step++) {
		pop3_data_init(&d, true);
		CHECK(data_run(&d, out_of_step, sizeof(out_of_step) - 1, step, 64, out, &consumed,
			       &amb) == POP3_DATA_END);
		CHECK_STR(out, "");
		CHECK(consumed == sizeof(out_of_step) - 1 && amb == 1 && d.ambiguous);
	}
	/* the line as far as it came, up to its CR */
	pop3_data_init(&d, true);
	CHECK(pop3_data_feed(&d, out_of_step, 32, out, 64, &used, &outlen) == POP3_DATA_AMBIGUOUS &&
	      used == 0 && outlen == 0);
	CHECK(d.first_len == 14 && memcmp(d.first_line, "+OK 120 octets", 14) == 0);
	pop3_data_init(&d, true);
	CHECK(pop3_data_feed(&d, "-ERR no", 7, out, 64, &used, &outlen) == POP3_DATA_AMBIGUOUS);
	CHECK(d.first_len == 7 && memcmp(d.first_line, "-ERR no", 7) == 0);
	/* too few bytes to tell: nothing consumed */
	pop3_data_init(&d, true);
	CHECK(pop3_data_feed(&d, "-ER", 3, out, 64, &used, &outlen) == POP3_DATA_MORE && used == 0);
	CHECK(pop3_data_feed(&d, "-ERRATA: 1\r\n", 12, out, 64, &used, &outlen) ==
		      POP3_DATA_BYTES &&
	      used == 12 && outlen == 12 && !d.ambiguous);
	/* not pipelined: the same bytes are the message */
	pop3_data_init(&d, false);
	CHECK(pop3_data_want(&d) == 1);
	CHECK(data_run(&d, out_of_step, sizeof(out_of_step) - 1, 7, 64, out, &consumed, &amb) ==
	      POP3_DATA_END);
	CHECK_STR(out, "+OK 120 octets\r\nSubject: y\r\n");
	/* the output buffer bounds what one call consumes */
	pop3_data_init(&d, false);
	CHECK(pop3_data_feed(&d, "abcdef", 6, out, 4, &used, &outlen) == POP3_DATA_BYTES &&
	      used == 3 && outlen == 3);
	CHECK(pop3_data_feed(&d, "", 0, out, 4, &used, &outlen) == POP3_DATA_MORE && used == 0);
}

static void
listing_join(void)
{
	static const char *const uidl[] = {"3 ccc",  "1 aaa",	     "bad line", "2 dup",
					   "2 dup2", "9 not-listed", "4 " /* malformed */};
	static const char *const list[] = {"4 400", "2 200", "1 100", "3 300"};
	struct pop3_listing l = {0};

	for (size_t i = 0; i < sizeof(uidl) / sizeof(uidl[0]); i++) {
		int want = i == 2 || i == 6 ? -EINVAL : 0;
		CHECK(pop3_listing_add_uidl(&l, uidl[i], strlen(uidl[i])) == want);
	}
	CHECK(l.nuids == 5);
	for (size_t i = 0; i < sizeof(list) / sizeof(list[0]); i++)
		CHECK(pop3_listing_add_list(&l, list[i], strlen(list[i])) == 0);
	CHECK(pop3_listing_add_list(&l, "5 x", 3) == -EINVAL && l.nmsgs == 4);
	pop3_listing_join(&l);
	CHECK(l.uids == NULL && l.nuids == 0 && l.nmsgs == 4);
	for (size_t i = 0; i < 4; i++)
		CHECK(l.msgs[i].num == i + 1 && l.msgs[i].size == (i + 1) * 100);
	CHECK_STR(l.msgs[0].uid, "aaa");
	CHECK_STR(l.msgs[1].uid, ""); /* named twice: no key */
	CHECK_STR(l.msgs[2].uid, "ccc");
	CHECK_STR(l.msgs[3].uid, ""); /* none */

	/* the next listing starts empty; without UIDL every uid is "" */
	pop3_listing_reset(&l);
	CHECK(l.nmsgs == 0 && l.nuids == 0);
	CHECK(pop3_listing_add_list(&l, "7 70", 4) == 0);
	pop3_listing_join(&l);
	CHECK(l.nmsgs == 1 && l.msgs[0].num == 7);
	CHECK_STR(l.msgs[0].uid, "");

	/* at most POP3_MAX_MESSAGES lines of either listing */
	pop3_listing_reset(&l);
	char line[32];
	int rc = 0;
	for (unsigned long i = 1; i <= POP3_MAX_MESSAGES && rc == 0; i++) {
		int n = snprintf(line, sizeof(line), "%lu u%lu", i, i);
		rc = pop3_listing_add_uidl(&l, line, (size_t)n);
		if (rc == 0) {
			n = snprintf(line, sizeof(line), "%lu 1", i);
			rc = pop3_listing_add_list(&l, line, (size_t)n);
		}
	}
	CHECK(rc == 0 && l.nmsgs == POP3_MAX_MESSAGES && l.nuids == POP3_MAX_MESSAGES);
	CHECK(pop3_listing_add_uidl(&l, "1000001 u", 9) == -E2BIG);
	CHECK(pop3_listing_add_list(&l, "1000001 1", 9) == -E2BIG);
	CHECK(pop3_listing_add_list(&l, "1000001 x", 9) == -EINVAL);
	pop3_listing_join(&l);
	CHECK_STR(l.msgs[POP3_MAX_MESSAGES - 1].uid, "u1000000");
	pop3_listing_free(&l);
	CHECK(l.msgs == NULL && l.uid_bytes == NULL && l.nmsgs == 0);
}

int
main(void)
{
	status_lines();
	capa();
	listings();
	dot();
	status_like();
	head();
	framing();
	data();
	listing_join();
	CHECK_DONE();
}
