/*
 * mime — a message's header fields for meta.json, decoded with GMime: from
 * a message mime_extract has parsed (mime_message_headers), or from bytes in
 * memory, of which only the header block up to MIME_HEADER_MAX is parsed.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <gmime/gmime.h>

#include "popfetchd/mime.h"
#include "popfetchd/util.h"

void
mime_init(void)
{
	static int done;

	if (!done) {
		g_mime_init();
		done = 1;
	}
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

/* Bytes in charset to UTF-8, appended to out; never fails (best effort). */
static void
append_converted(GString *out, const char *bytes, size_t len, const char *charset)
{
	gchar *u = NULL;

	if (len == 0)
		return;
	if (charset != NULL && g_ascii_strcasecmp(charset, "UTF-8") != 0 &&
	    g_ascii_strcasecmp(charset, "US-ASCII") != 0)
		u = g_convert(bytes, (gssize)len, "UTF-8", g_mime_charset_iconv_name(charset), NULL,
			      NULL, NULL);
	if (u == NULL && !g_utf8_validate(bytes, (gssize)len, NULL))
		/* unknown charset or raw 8-bit: the commonest legacy one */
		u = g_convert(bytes, (gssize)len, "UTF-8", "WINDOWS-1252", NULL, NULL, NULL);
	if (u == NULL)
		u = g_utf8_make_valid(bytes, (gssize)len);
	g_string_append(out, u);
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
 * One encoded word "=?charset?E?text?=" at p: its parts, and its end.
 * RFC 2231 language suffixes ("UTF-8*en") are dropped.
 */
static bool
parse_word(const char *p, const char *end, char *charset, size_t csize, char *enc,
	   const char **text, size_t *tlen, const char **after)
{
	const char *q, *c;

	if (end - p < 8 || p[0] != '=' || p[1] != '?')
		return false;
	c = p + 2;
	q = memchr(c, '?', (size_t)(end - c));
	if (q == NULL || q == c || (size_t)(q - c) >= csize || end - q < 5 || q[2] != '?')
		return false;
	if (strchr("BbQq", q[1]) == NULL)
		return false;
	memcpy(charset, c, (size_t)(q - c));
	charset[q - c] = '\0';
	if ((c = strchr(charset, '*')) != NULL)
		charset[c - charset] = '\0';
	*enc = q[1];
	*text = q + 3;
	for (q = *text; q + 1 < end; q++) {
		if (*q == ' ' || *q == '\t')
			return false;
		if (q[0] == '?' && q[1] == '=') {
			*tlen = (size_t)(q - *text);
			*after = q + 2;
			return true;
		}
	}
	return false;
}

/*
 * RFC 2047 decoding of a raw (possibly folded) header value to UTF-8.
 * Adjacent encoded words in one charset are joined as bytes before the
 * conversion, so a character split across two words survives (GMime 3.2
 * joins their base64 text instead and loses a word after "==" padding).
 */
char *
mime_decode_header(const char *raw)
{
	GString *out = g_string_new(NULL);
	GByteArray *pending = g_byte_array_new();
	char charset[64], pending_cs[64] = "", enc;
	const char *p = raw, *end = raw + strlen(raw), *text, *after, *lit;
	size_t tlen;
	bool last_was_word = false;

	while (p < end) {
		if (parse_word(p, end, charset, sizeof(charset), &enc, &text, &tlen, &after)) {
			if (pending->len > 0 && g_ascii_strcasecmp(charset, pending_cs) != 0) {
				append_converted(out, (char *)pending->data, pending->len,
						 pending_cs);
				g_byte_array_set_size(pending, 0);
			}
			snprintf(pending_cs, sizeof(pending_cs), "%s", charset);
			decode_payload(pending, enc, text, tlen);
			last_was_word = true;
			p = after;
			continue;
		}
		/* literal text up to the next "=?", unfolded */
		lit = p;
		while (p < end && !(p[0] == '=' && p + 1 < end && p[1] == '?' && p != lit))
			p++;
		bool blank = true;
		for (const char *q = lit; q < p; q++)
			if (*q != ' ' && *q != '\t' && *q != '\r' && *q != '\n')
				blank = false;
		if (blank && last_was_word && p < end)
			continue; /* white space between two encoded words vanishes */
		if (pending->len > 0) {
			append_converted(out, (char *)pending->data, pending->len, pending_cs);
			g_byte_array_set_size(pending, 0);
		}
		GString *unfolded = g_string_new(NULL);
		for (const char *q = lit; q < p; q++)
			if (*q != '\r' && *q != '\n')
				g_string_append_c(unfolded, *q);
		append_converted(out, unfolded->str, unfolded->len, NULL);
		g_string_free(unfolded, TRUE);
		last_was_word = false;
	}
	if (pending->len > 0)
		append_converted(out, (char *)pending->data, pending->len, pending_cs);
	g_byte_array_free(pending, TRUE);
	char *r = dup_or_null(g_strstrip(out->str));
	g_string_free(out, TRUE);
	return r;
}

/* The raw value of a header field, decoded; NULL when absent or empty. */
static char *
decoded_field(GMimeObject *obj, const char *name)
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
	msg = g_mime_parser_construct_message(parser, NULL);
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
	h.date = decoded_field(GMIME_OBJECT(msg), "Date");
	h.subject = decoded_field(GMIME_OBJECT(msg), "Subject");
	h.from = decoded_field(GMIME_OBJECT(msg), "From");
	h.to = decoded_field(GMIME_OBJECT(msg), "To");
	h.cc = decoded_field(GMIME_OBJECT(msg), "Cc");
	*ret = h;
}

void
mime_headers_clear(struct mime_headers *h)
{
	free(h->message_id);
	free(h->date);
	free(h->from);
	free(h->to);
	free(h->cc);
	free(h->subject);
	memset(h, 0, sizeof(*h));
}
