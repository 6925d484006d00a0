/*
 * mime — a message's header fields for meta.json, decoded with GMime: from
 * a message mime_extract has parsed (mime_message_headers), or from bytes in
 * memory, of which only the header block up to MIME_HEADER_MAX is parsed.
 * And base64 decoded as GMime decodes it, faster.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gmime/gmime.h>

#include "popfetchd/mime.h"
#include "popfetchd/util.h"

static GMimeParserOptions *parser_options;

void
mime_init(void)
{
	if (parser_options != NULL)
		return;
	g_mime_init();
	/*
	 * GMime's loose RFC 2047 reading (its default) looks for the end of
	 * every "=?" up to the end of the value: quadratic in a stranger's
	 * header, a minute for a megabyte. The strict reading splits the
	 * value at white space first and is linear. What popfetchd shows is
	 * decoded from the raw values by mime_decode_header, loosely and
	 * linearly, and so is a file name GMime leaves with "=?" in it.
	 */
	parser_options = g_mime_parser_options_new();
	g_mime_parser_options_set_rfc2047_compliance_mode(parser_options,
							  GMIME_RFC_COMPLIANCE_STRICT);
}

GMimeParserOptions *
mime_parser_options(void)
{
	mime_init();
	return parser_options;
}

static char *
dup_or_null(const char *s)
{
	if (s == NULL)
		return NULL;
	while (*s == ' ' || *s == '\t')
		s++;
	return *s ? xstrdup(s) : NULL;
}

/*
 * What mime_decode_header has read so far: the text converted to UTF-8,
 * then either the bytes of adjacent encoded words in one charset or the
 * literal text after them (unfolded), each converted as a whole when the
 * other kind begins, so that the work is linear in the number of words.
 */
struct decoder {
	GString *out;
	GByteArray *words;
	char cs[64]; /* the charset of words */
	GString *lit;
	/* converters to UTF-8 by charset name (lower case), opened once per
	 * value: a value can switch charsets at every word, and opening one
	 * costs far more than converting a word; (GIConv)-1 when there is none */
	GHashTable *conv;
};

static void
close_converter(gpointer cd)
{
	if ((GIConv)cd != (GIConv)-1)
		g_iconv_close((GIConv)cd);
}

static GIConv
converter(struct decoder *d, const char *charset)
{
	gchar *key = g_ascii_strdown(charset, -1);
	gpointer cd;

	if (g_hash_table_lookup_extended(d->conv, key, NULL, &cd)) {
		g_free(key);
		/* back to the initial state: a failed conversion may leave it shifted */
		if ((GIConv)cd != (GIConv)-1)
			g_iconv((GIConv)cd, NULL, NULL, NULL, NULL);
		return (GIConv)cd;
	}
	cd = g_iconv_open("UTF-8", g_mime_charset_iconv_name(charset));
	g_hash_table_insert(d->conv, key, cd);
	return (GIConv)cd;
}

/* Bytes in charset (NULL: UTF-8, or else Windows-1252) to UTF-8, appended
 * to d->out; never fails (best effort). */
static void
append_converted(struct decoder *d, const char *bytes, size_t len, const char *charset)
{
	gchar *u = NULL;
	GIConv cd;

	if (len == 0)
		return;
	if (charset != NULL && g_ascii_strcasecmp(charset, "UTF-8") != 0 &&
	    g_ascii_strcasecmp(charset, "US-ASCII") != 0 &&
	    (cd = converter(d, charset)) != (GIConv)-1)
		u = g_convert_with_iconv(bytes, (gssize)len, cd, NULL, NULL, NULL);
	if (u == NULL && !g_utf8_validate(bytes, (gssize)len, NULL) &&
	    (cd = converter(d, "WINDOWS-1252")) != (GIConv)-1)
		/* unknown charset or raw 8-bit: the commonest legacy one */
		u = g_convert_with_iconv(bytes, (gssize)len, cd, NULL, NULL, NULL);
	if (u == NULL)
		u = g_utf8_make_valid(bytes, (gssize)len);
	g_string_append(d->out, u);
	g_free(u);
}

/* The payload of an encoded word ("B" or "Q") as bytes, appended to buf. */
static void
decode_payload(GByteArray *buf, char enc, const char *text, size_t len)
{
	if (enc == 'B' || enc == 'b') {
		gint state = 0;
		guint save = 0;
		guchar *tmp = g_malloc(len + 3);
		gsize n = g_base64_decode_step(text, len, tmp, &state, &save);
		g_byte_array_append(buf, tmp, (guint)n);
		g_free(tmp);
		return;
	}
	for (size_t i = 0; i < len; i++) {
		guint8 c = (guint8)text[i];
		if (c == '_') {
			c = ' ';
		} else if (c == '=' && i + 2 < len && g_ascii_isxdigit(text[i + 1]) &&
			   g_ascii_isxdigit(text[i + 2])) {
			c = (guint8)(g_ascii_xdigit_value(text[i + 1]) * 16 +
				     g_ascii_xdigit_value(text[i + 2]));
			i += 2;
		}
		g_byte_array_append(buf, &c, 1);
	}
}

/*
 * An encoded word longer than this is read as plain text. RFC 2047 allows
 * 75 characters; some mailers write longer ones, a whole subject in one
 * word, but none this long.
 */
#define WORD_MAX 1024

/*
 * One encoded word "=?charset?E?text?=" at p: its parts, and its end.
 * RFC 2231 language suffixes ("UTF-8*en") are dropped. *clear is where the
 * search for a "?=" stopped last time without finding one (at white space,
 * the WORD_MAX window or the end): a word starting before it needs no
 * second look at the same bytes, so a value full of unterminated words is
 * read in linear time.
 */
static bool
parse_word(const char *p, const char *end, char *charset, size_t csize, char *enc,
	   const char **text, size_t *tlen, const char **after, const char **clear)
{
	const char *q, *c, *limit;

	if (end - p < 8 || p[0] != '=' || p[1] != '?')
		return false;
	c = p + 2;
	q = memchr(c, '?', MIN((size_t)(end - c), csize));
	if (q == NULL || q == c || end - q < 5 || q[2] != '?')
		return false;
	if (strchr("BbQq", q[1]) == NULL)
		return false;
	memcpy(charset, c, (size_t)(q - c));
	charset[q - c] = '\0';
	if ((c = strchr(charset, '*')) != NULL)
		charset[c - charset] = '\0';
	*enc = q[1];
	*text = q + 3;
	limit = end - p > WORD_MAX ? p + WORD_MAX : end;
	for (q = MAX(*text, *clear); q + 1 < limit; q++) {
		if (*q == ' ' || *q == '\t')
			break;
		if (q[0] == '?' && q[1] == '=') {
			*tlen = (size_t)(q - *text);
			*after = q + 2;
			return true;
		}
	}
	*clear = q;
	return false;
}

static void
flush_words(struct decoder *d)
{
	if (d->words->len > 0)
		append_converted(d, (char *)d->words->data, d->words->len, d->cs);
	g_byte_array_set_size(d->words, 0);
}

static void
flush_literal(struct decoder *d)
{
	append_converted(d, d->lit->str, d->lit->len, NULL);
	g_string_truncate(d->lit, 0);
}

/* The literal text from lit to p, unfolded (CR and LF dropped). */
static void
add_literal(struct decoder *d, const char *lit, const char *p)
{
	flush_words(d);
	for (const char *q = lit; q < p; q++)
		if (*q != '\r' && *q != '\n')
			g_string_append_c(d->lit, *q);
}

static void
add_word(struct decoder *d, const char *charset, char enc, const char *text, size_t tlen)
{
	flush_literal(d);
	if (g_ascii_strcasecmp(charset, d->cs) != 0)
		flush_words(d);
	snprintf(d->cs, sizeof(d->cs), "%s", charset);
	decode_payload(d->words, enc, text, tlen);
}

static bool
is_blank(const char *s, const char *end)
{
	for (; s < end; s++)
		if (*s != ' ' && *s != '\t' && *s != '\r' && *s != '\n')
			return false;
	return true;
}

/*
 * RFC 2047 decoding of a raw (possibly folded) header value to UTF-8.
 * Adjacent encoded words in one charset are joined as bytes before the
 * conversion, so a character split across two words survives (GMime 3.2
 * joins their base64 text instead and loses a word after "==" padding).
 * Linear in the length of raw, whatever it holds.
 */
char *
mime_decode_header(const char *raw)
{
	struct decoder d = {
		g_string_new(NULL), g_byte_array_new(), "", g_string_new(NULL),
		g_hash_table_new_full(g_str_hash, g_str_equal, g_free, close_converter)};
	const char *p = raw, *end = raw + strlen(raw), *text, *after, *lit, *clear = raw;
	char charset[64], enc;
	size_t tlen;
	bool last_was_word = false;

	while (p < end) {
		if (parse_word(p, end, charset, sizeof(charset), &enc, &text, &tlen, &after,
			       &clear)) {
			add_word(&d, charset, enc, text, tlen);
			last_was_word = true;
			p = after;
			continue;
		}
		/* literal text up to the next "=?" */
		lit = p;
		while (p < end && !(p[0] == '=' && p + 1 < end && p[1] == '?' && p != lit))
			p++;
		if (last_was_word && p < end && is_blank(lit, p))
			continue; /* white space between two encoded words vanishes */
		add_literal(&d, lit, p);
		last_was_word = false;
	}
	flush_words(&d);
	flush_literal(&d);
	g_byte_array_free(d.words, TRUE);
	g_string_free(d.lit, TRUE);
	g_hash_table_destroy(d.conv);
	char *r = dup_or_null(g_strstrip(d.out->str));
	g_string_free(d.out, TRUE);
	return r;
}

char *
mime_decoded_field(GMimeObject *obj, const char *name)
{
	GMimeHeader *h = g_mime_header_list_get_header(g_mime_object_get_header_list(obj), name);
	const char *raw = h ? g_mime_header_get_raw_value(h) : NULL;

	return raw ? mime_decode_header(raw) : NULL;
}

/* Length of the header block, including the empty line that ends it. */
static size_t
header_block_len(const char *buf, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		if (buf[i] != '\n')
			continue;
		if (i + 1 < len && buf[i + 1] == '\n')
			return i + 2;
		if (i + 2 < len && buf[i + 1] == '\r' && buf[i + 2] == '\n')
			return i + 3;
	}
	return len;
}

void
mime_parse_headers(const char *buf, size_t len, struct mime_headers *ret)
{
	struct mime_headers h = {0};
	GMimeStream *stream;
	GMimeParser *parser;
	GMimeMessage *msg;
	size_t hlen;

	mime_init();
	if (len > MIME_HEADER_MAX)
		len = MIME_HEADER_MAX;
	hlen = header_block_len(buf, len);
	/* the header block alone, closed by an empty line, parses as a message */
	stream = g_mime_stream_mem_new();
	g_mime_stream_write(stream, buf, hlen);
	g_mime_stream_write_string(stream, "\r\n\r\n");
	g_mime_stream_reset(stream);
	parser = g_mime_parser_new_with_stream(stream);
	msg = g_mime_parser_construct_message(parser, parser_options);
	if (msg != NULL) {
		mime_message_headers(msg, &h);
		g_object_unref(msg);
	}
	g_object_unref(parser);
	g_object_unref(stream);
	*ret = h;
}

void
mime_message_headers(GMimeMessage *msg, struct mime_headers *ret)
{
	struct mime_headers h = {0};

	h.message_id = dup_or_null(g_mime_message_get_message_id(msg));
	h.date = mime_decoded_field(GMIME_OBJECT(msg), "Date");
	h.subject = mime_decoded_field(GMIME_OBJECT(msg), "Subject");
	h.from = mime_decoded_field(GMIME_OBJECT(msg), "From");
	h.to = mime_decoded_field(GMIME_OBJECT(msg), "To");
	h.cc = mime_decoded_field(GMIME_OBJECT(msg), "Cc");
	*ret = h;
}

void
mime_headers_clear(struct mime_headers *h)
{
	FREE_ALL(h->message_id, h->date, h->from, h->to, h->cc, h->subject);
	memset(h, 0, sizeof(*h));
}

/*
 * ---- base64, as GMime's g_mime_encoding_base64_decode_step ----
 *
 * The same bytes out for the same input however it is split, with the same
 * state: characters outside the alphabet are skipped, the first '=' ends the
 * stream (what follows is ignored), a quartet cut short by it gives the bytes
 * it holds. GMime looks at each character on its own; whole quartets of the
 * alphabet, all but a few characters of a mail's base64, are decoded here
 * four at a time.
 */
#define B64_PAD	 64  /* '=' */
#define B64_SKIP 128 /* not of the alphabet */
#define P	 B64_PAD
#define S	 B64_SKIP
/* clang-format off */
static const unsigned char b64_rank[256] = {
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S, 62,  S,  S,  S, 63,
	52, 53, 54, 55, 56, 57, 58, 59, 60, 61,  S,  S,  S,  P,  S,  S,
	 S,  0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14,
	15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,  S,  S,  S,  S,  S,
	 S, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
	41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
	 S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,  S,
};
/* clang-format on */
#undef P
#undef S

/* Whole quartets from in while they are of the alphabet; *in moves on. */
static unsigned char *
b64_quartets(const unsigned char **in, const unsigned char *end, unsigned char *out)
{
	const unsigned char *p = *in;

	while (end - p >= 4) {
		uint32_t a = b64_rank[p[0]], b = b64_rank[p[1]], c = b64_rank[p[2]],
			 d = b64_rank[p[3]];
		if ((a | b | c | d) & (B64_PAD | B64_SKIP))
			break;
		uint32_t v = a << 18 | b << 12 | c << 6 | d;
		out[0] = (unsigned char)(v >> 16);
		out[1] = (unsigned char)(v >> 8);
		out[2] = (unsigned char)v;
		out += 3;
		p += 4;
	}
	*in = p;
	return out;
}

size_t
mime_base64_decode_step(const unsigned char *in, size_t len, unsigned char *out, int *state,
			uint32_t *save)
{
	const unsigned char *p = in, *end = in + len;
	unsigned char *o = out;
	uint32_t saved = *save;
	int n = *state;

	if (n < 0) /* after the '=' that ended the stream */
		return 0;
	while (p < end) {
		if (n == 0 && (o = b64_quartets(&p, end, o), p == end))
			break;
		unsigned char r = b64_rank[*p++];
		if (r == B64_SKIP)
			continue;
		if (r == B64_PAD) {
			/* "xx=" or "xxx=": the bytes the quartet holds so far */
			if (++n > 2) {
				saved <<= 6;
				if (n < 4)
					saved <<= 6;
				*o++ = (unsigned char)(saved >> 16);
				if (n == 4)
					*o++ = (unsigned char)(saved >> 8);
			}
			n = -1;
			break;
		}
		saved = saved << 6 | r;
		if (++n == 4) {
			*o++ = (unsigned char)(saved >> 16);
			*o++ = (unsigned char)(saved >> 8);
			*o++ = (unsigned char)saved;
			saved = 0;
			n = 0;
		}
	}
	*save = saved;
	*state = n;
	return (size_t)(o - out);
}
