/*
 * mime — what popfetchd reads out of a message already on disk (GMime):
 * the header fields for meta.json, decoded to UTF-8.
 */
#ifndef POPFETCHD_MIME_H
#define POPFETCHD_MIME_H

#include <stddef.h>
#include <stdint.h>

/* The header block read is bounded: a stranger controls its size. */
#define MIME_HEADER_MAX (256 * 1024)

struct mime_headers {
	char *message_id; /* without angle brackets; NULL when absent */
	char *date;	  /* the Date field as written */
	char *from;	  /* address lists as written, encoded words decoded */
	char *to;
	char *cc;
	char *subject; /* decoded (RFC 2047) */
};

void mime_init(void);
/* The options every GMime parse of a message uses (a GMimeParserOptions *):
 * linear on hostile header values. */
struct _GMimeParserOptions;
struct _GMimeParserOptions *mime_parser_options(void);
/* Parse the header block of a message in memory (the header block, or a
 * whole message; a malformed header is not an error: fields stay NULL). */
void mime_parse_headers(const char *buf, size_t len, struct mime_headers *ret);
void mime_headers_clear(struct mime_headers *h);
/* The same, from a message GMime has parsed already (a GMimeMessage *). */
struct _GMimeMessage;
void mime_message_headers(struct _GMimeMessage *msg, struct mime_headers *ret);
/* The raw value of the header field name of obj (a GMimeObject *),
 * decoded as by mime_decode_header; NULL when absent or empty. */
struct _GMimeObject;
char *mime_decoded_field(struct _GMimeObject *obj, const char *name);
/* A raw header value (folded, RFC 2047 encoded words, any charset) as
 * UTF-8; NULL when it is empty. Never fails on bad input: best effort. */
char *mime_decode_header(const char *raw);

/* Base64 decoded exactly as GMime's g_mime_encoding_base64_decode_step
 * decodes it, state and save included (both 0 to begin; out holds len + 3),
 * faster. Returns the bytes written to out. */
size_t mime_base64_decode_step(const unsigned char *in, size_t len, unsigned char *out, int *state,
			       uint32_t *save);

#endif
