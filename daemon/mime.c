/*
 * mime — header fields of a message already on disk, decoded with GMime.
 * Only the header block is read, and only up to MIME_HEADER_MAX bytes.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

static char *
addresses(InternetAddressList *list)
{
	char *s, *r;

	if (list == NULL || internet_address_list_length(list) == 0)
		return NULL;
	s = internet_address_list_to_string(list, NULL, FALSE);
	r = dup_or_null(s);
	g_free(s);
	return r;
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
		h.message_id = dup_or_null(g_mime_message_get_message_id(msg));
		h.date = dup_or_null(g_mime_object_get_header(GMIME_OBJECT(msg), "Date"));
		h.subject = dup_or_null(g_mime_message_get_subject(msg));
		h.from = addresses(g_mime_message_get_from(msg));
		h.to = addresses(g_mime_message_get_to(msg));
		h.cc = addresses(g_mime_message_get_cc(msg));
		g_object_unref(msg);
	}
	g_object_unref(parser);
	g_object_unref(stream);
	*ret = h;
}

int
mime_read_headers(const char *path, struct mime_headers *ret)
{
	char *buf = xmalloc(MIME_HEADER_MAX);
	size_t len = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);

	if (fd < 0) {
		free(buf);
		return -errno;
	}
	while (len < MIME_HEADER_MAX) {
		ssize_t n = read(fd, buf + len, MIME_HEADER_MAX - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int r = -errno;
			close(fd);
			free(buf);
			return r;
		}
		if (n == 0)
			break;
		len += (size_t)n;
		/* stop as soon as the header block is complete */
		if (header_block_len(buf, len) < len)
			break;
	}
	close(fd);
	mime_parse_headers(buf, len, ret);
	free(buf);
	return 0;
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
