/*
 * mime_extract — text bodies and attachments of a message already on disk.
 * GMime parses the file with a persistent stream: part contents stay on
 * disk and are decoded chunk by chunk while they are written, so memory
 * does not grow with the size of an attachment.
 */
#include <errno.h>
#include <fcntl.h>
#include <iconv.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gmime/gmime.h>
#include <openssl/evp.h>

#include "popfetchd/mime.h"
#include "popfetchd/mime_extract.h"
#include "popfetchd/smime.h"
#include "popfetchd/util.h"

#define CHUNK 65536
/* text is converted in smaller pieces: with what conversion may make of
 * them, the buffers stay below what malloc takes from the system and gives
 * back at every free, a mapping per message otherwise */
#define TEXT_CHUNK 16384
/* a file's bytes are written this many at a time (a buffer freed below 64
 * KiB, where glibc consolidates its heap) */
#define SINK_BUF	    32768
#define FILE_FLAGS	    (O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC)
#define FILE_MODE	    0640
#define DIR_MODE	    0750
#define MAX_UNIQUE_ATTEMPTS 10000
#define EXT_MAX		    32 /* a longer "extension" is not one */
#define LIMIT_HIT	    1  /* internal: a limit stopped the extraction */
#define SMIME_LAYERS	    4  /* S/MIME wrappings peeled off, at most */

/* ---- safe names (pure) ---- */

static const char *
ext_for_type(const char *ct)
{
	static const struct {
		const char *type, *ext;
	} map[] = {
		{"application/pdf", "pdf"}, {"image/png", "png"},
		{"image/jpeg", "jpg"},	    {"image/jpg", "jpg"},
		{"image/gif", "gif"},	    {"image/webp", "webp"},
		{"image/svg+xml", "svg"},   {"text/plain", "txt"},
		{"text/html", "html"},	    {"text/calendar", "ics"},
		{"text/csv", "csv"},	    {"message/rfc822", "eml"},
		{"application/zip", "zip"}, {"application/json", "json"},
		{"application/xml", "xml"}, {"text/xml", "xml"},
	};

	if (ct == NULL)
		return "bin";
	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
		if (g_ascii_strcasecmp(ct, map[i].type) == 0)
			return map[i].ext;
	return "bin";
}

/* What a name may not hold besides the unsafe characters (util.h). */
static bool
reserved_char(char c)
{
	return c != '\0' && strchr("/\\<>:\"|?*", c) != NULL;
}

/* Length of s cut to at most max bytes on a UTF-8 boundary. */
static size_t
utf8_cut(const char *s, size_t len, size_t max)
{
	if (len <= max)
		return len;
	while (max > 0 && ((unsigned char)s[max] & 0xc0) == 0x80)
		max--;
	return max;
}

/* Where the extension of name (len bytes) starts ('.' included); len when none. */
static size_t
ext_start(const char *name, size_t len)
{
	for (size_t i = len; i > 1; i--) {
		if (name[i - 1] == '.')
			return len - (i - 1) <= EXT_MAX ? i - 1 : len;
	}
	return len;
}

/* stem + suffix + ext into out, the stem cut so that all fits in limit bytes. */
static void
compose(const char *stem, size_t stemlen, const char *suffix, const char *ext, size_t extlen,
	char *out, size_t size)
{
	size_t limit = size - 1 < MIME_NAME_MAX ? size - 1 : MIME_NAME_MAX;
	size_t sufflen = strlen(suffix);

	if (sufflen + extlen >= limit) {
		/* absurdly small buffer: give up the extension */
		extlen = 0;
		if (sufflen >= limit)
			sufflen = 0;
	}
	stemlen = utf8_cut(stem, stemlen, limit - sufflen - extlen);
	memcpy(out, stem, stemlen);
	memcpy(out + stemlen, suffix, sufflen);
	memcpy(out + stemlen + sufflen, ext, extlen);
	out[stemlen + sufflen + extlen] = '\0';
}

void
mime_safe_name(const char *decoded, const char *content_type, unsigned n, char *out, size_t size)
{
	gchar *valid, *safe, *p, *start;
	size_t len, e;

	if (size == 0)
		return;
	valid = g_utf8_make_valid(decoded ? decoded : "", -1);
	/* last path component */
	start = valid;
	for (p = valid; *p; p++)
		if (*p == '/' || *p == '\\')
			start = p + 1;
	/* each unsafe or reserved character becomes one '_': never longer */
	len = strlen(start);
	safe = g_malloc(len + 1);
	util_printable_repl(start, len, '_', safe, len + 1);
	g_free(valid);
	for (p = safe; *p; p++)
		if (reserved_char(*p))
			*p = '_';
	/* no white space around, no leading dot (so never "." or "..") */
	start = safe;
	while (*start == '.' || g_ascii_isspace(*start))
		start++;
	len = strlen(start);
	while (len > 0 && g_ascii_isspace(start[len - 1]))
		len--;
	if (len == 0) {
		char tmp[64];
		snprintf(tmp, sizeof(tmp), "attachment-%u.%s", n, ext_for_type(content_type));
		compose(tmp, strlen(tmp), "", "", 0, out, size);
	} else {
		e = ext_start(start, len);
		compose(start, e, "", start + e, len - e, out, size);
	}
	g_free(safe);
}

/* name for attempt k: k == 1 is the name itself, then "NAME (k).EXT". */
static void
name_variant(const char *name, unsigned k, char *out, size_t size)
{
	size_t len = strlen(name), e = ext_start(name, len);
	char suffix[32] = "";

	if (k > 1)
		snprintf(suffix, sizeof(suffix), " (%u)", k);
	compose(name, e, suffix, name + e, len - e, out, size);
}

static bool
is_taken(const char *name, const char *const *taken, size_t ntaken)
{
	for (size_t i = 0; i < ntaken; i++)
		if (taken[i] != NULL && g_ascii_strcasecmp(name, taken[i]) == 0)
			return true;
	return false;
}

void
mime_unique_name(const char *name, const char *const *taken, size_t ntaken, char *out, size_t size)
{
	for (unsigned k = 1;; k++) {
		name_variant(name, k, out, size);
		if (!is_taken(out, taken, ntaken) || k >= UINT32_MAX - 1)
			return;
	}
}

/* ---- extraction ---- */

struct ctx {
	const struct mime_opts *o;
	struct mime_result *r;
	GString *note;
	unsigned max_depth, max_parts, nparts;
	unsigned long long max_decoded, decoded;
	int attfd;
	/* names created in attachments/, in ASCII lower case, and for each name
	 * wanted the next variant to try (name_variant's k): a thousand parts of
	 * one name cost a thousand tries, not half a million comparisons each */
	GHashTable *taken, *next_variant;
	bool stopped, have_plain, have_html;
	int err; /* first local I/O error, -errno */
	/* S/MIME: the most telling state met, in this order of importance */
	enum { SM_NONE, SM_SIGNED, SM_DECRYPTED, SM_FAILED } smime;
	char smime_why[256];
};

static void add_note(struct ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
add_note(struct ctx *c, const char *fmt, ...)
{
	va_list ap;

	if (c->note->len > 0)
		g_string_append(c->note, "; ");
	va_start(ap, fmt);
	g_string_append_vprintf(c->note, fmt, ap);
	va_end(ap);
}

static void
limit_bytes(struct ctx *c)
{
	if (!c->stopped)
		add_note(c, "limit: more than %llu decoded bytes; extraction stopped",
			 c->max_decoded);
	c->stopped = true;
}

/*
 * A file being written: what is decoded into it is kept in buf and written
 * SINK_BUF bytes at a time (a decoder hands over 4 KiB at a time, and each
 * write(2) is a system call), then at sink_end.
 */
struct sink {
	int fd;
	EVP_MD_CTX *md;
	unsigned long long size;
	char *buf; /* SINK_BUF bytes once something is put, used of them */
	size_t used;
};

static int
sink_flush(struct sink *s)
{
	int r = s->used > 0 ? util_write_all(s->fd, s->buf, s->used) : 0;

	s->used = 0;
	return r;
}

/* 0, LIMIT_HIT, or -errno. */
static int
sink_write(struct ctx *c, struct sink *s, const char *buf, size_t len)
{
	int r;

	if (len > c->max_decoded - c->decoded) {
		limit_bytes(c);
		return LIMIT_HIT;
	}
	if (len == 0)
		return 0;
	if (s->md != NULL)
		EVP_DigestUpdate(s->md, buf, len);
	s->size += len;
	c->decoded += len;
	if (len > SINK_BUF - s->used && (r = sink_flush(s)) < 0)
		return r;
	if (len >= SINK_BUF / 4 && s->used == 0) /* a base64 decoder's 48 KiB */
		return util_write_all(s->fd, buf, len);
	if (s->buf == NULL)
		s->buf = xmalloc(SINK_BUF);
	memcpy(s->buf + s->used, buf, len);
	s->used += len;
	return 0;
}

/*
 * The end of the sink's file: what is left in buf written and the file
 * closed (r 0), or, after a failure r, closed and removed as name in dirfd.
 * No fsync: the caller makes the whole folder durable at once
 * (store_commit). 0, or r or the -errno of the write or close.
 */
static int
sink_end(struct sink *s, int r, int dirfd, const char *name)
{
	if (r == 0)
		r = sink_flush(s);
	if (close(s->fd) < 0 && r == 0)
		r = -errno;
	if (r != 0)
		unlinkat(dirfd, name, 0);
	free(s->buf);
	s->buf = NULL;
	s->fd = -1;
	return r;
}

/*
 * The transfer-decoded content of a part. Base64, most of what a mail
 * carries, is decoded here (mime_base64_decode_step, GMime's result
 * faster); quoted-printable and uuencode by GMime's filter.
 */
struct decoded {
	GMimeStream *s; /* the content: encoded when b64, decoded otherwise */
	bool b64;
	int state;
	guint32 save;
	char *raw; /* base64 read, rawlen bytes */
	size_t rawlen;
	size_t chunk; /* what is read at a time: CHUNK, or less for less */
};

/* false: the part has no content */
static bool
decoded_open(GMimePart *part, struct decoded *d)
{
	GMimeDataWrapper *dw = g_mime_part_get_content(part);
	GMimeStream *src;
	GMimeContentEncoding enc;

	memset(d, 0, sizeof(*d));
	d->chunk = CHUNK;
	if (dw == NULL || (src = g_mime_data_wrapper_get_stream(dw)) == NULL)
		return false;
	g_mime_stream_reset(src);
	/* decoded, no part is longer than its content in the message: a
	 * buffer of its size is enough (a small one is not taken from the
	 * system and given back at every part) */
	gint64 len = g_mime_stream_length(src);
	if (len >= 0 && len < CHUNK - 16)
		d->chunk = (size_t)len + 16;
	enc = g_mime_data_wrapper_get_encoding(dw);
	if (enc == GMIME_CONTENT_ENCODING_BASE64) {
		d->s = g_object_ref(src);
		d->b64 = true;
		return true;
	}
	d->s = g_mime_stream_filter_new(src);
	if (enc == GMIME_CONTENT_ENCODING_QUOTEDPRINTABLE ||
	    enc == GMIME_CONTENT_ENCODING_UUENCODE) {
		GMimeFilter *f = g_mime_filter_basic_new(enc, FALSE);
		g_mime_stream_filter_add(GMIME_STREAM_FILTER(d->s), f);
		g_object_unref(f);
	}
	return true;
}

/* Up to size (at least 16) decoded bytes into buf: their number, 0 at the
 * end, -1 on an error (errno). */
static ssize_t
decoded_read(struct decoded *d, char *buf, size_t size)
{
	if (d->s == NULL)
		return 0;
	if (!d->b64)
		return g_mime_stream_read(d->s, buf, size);
	/* a quarter less out than in: size - 3 in leaves room for the 3 of a
	 * quartet begun in the last read; a piece of line breaks gives nothing
	 * and is not the end */
	if (d->raw == NULL)
		d->raw = xmalloc(d->rawlen = size - 3);
	while (d->state >= 0) {
		ssize_t n = g_mime_stream_read(d->s, d->raw,
					       size - 3 < d->rawlen ? size - 3 : d->rawlen);
		size_t out;
		if (n < 0 && g_mime_stream_eos(d->s))
			return 0; /* a file's part says so at its end */
		if (n <= 0)
			return n;
		out = mime_base64_decode_step((unsigned char *)d->raw, (size_t)n,
					      (unsigned char *)buf, &d->state, &d->save);
		if (out > 0)
			return (ssize_t)out;
	}
	return 0; /* after the '=' that ends it, GMime ignores the rest too */
}

static void
decoded_close(struct decoded *d)
{
	if (d->s != NULL)
		g_object_unref(d->s);
	free(d->raw);
	memset(d, 0, sizeof(*d));
}

/* Every byte of in to put(), a chunk at a time, until put() returns
 * non-zero. 0, what put() returned, or -errno of the read. */
static int
drain(struct decoded *in, int (*put)(void *arg, const char *buf, size_t n), void *arg)
{
	char *buf = xmalloc(in->chunk);
	ssize_t n;
	int r = 0;

	while (r == 0 && (n = decoded_read(in, buf, in->chunk)) != 0) {
		if (n < 0)
			r = errno ? -errno : -EIO;
		else
			r = put(arg, buf, (size_t)n);
	}
	free(buf);
	return r;
}

struct to_sink {
	struct ctx *c;
	struct sink *s;
};

static int
put_sink(void *arg, const char *buf, size_t n)
{
	struct to_sink *t = arg;

	return sink_write(t->c, t->s, buf, n);
}

/* All of in into the sink. 0, LIMIT_HIT, or -errno. */
static int
copy_stream(struct ctx *c, struct decoded *in, struct sink *s)
{
	return drain(in, put_sink, &(struct to_sink){c, s});
}

/*
 * ---- text to UTF-8, best effort ----
 *
 * A stranger's charset label is a hint. Text declared UTF-8, US-ASCII or
 * nothing is checked, and a byte that is not UTF-8 is read as Windows-1252
 * (the usual truth of mislabelled mail). Any other charset goes through
 * iconv; a byte it cannot read becomes U+FFFD. Either way the file is valid
 * UTF-8 and the note counts what was guessed or replaced.
 */

/* Windows-1252 0x80..0x9f; the rest of its upper half is Latin-1. */
static const uint16_t cp1252_high[32] = {
	0x20ac, 0xfffd, 0x201a, 0x0192, 0x201e, 0x2026, 0x2020, 0x2021, 0x02c6, 0x2030, 0x0160,
	0x2039, 0x0152, 0xfffd, 0x017d, 0xfffd, 0xfffd, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022,
	0x2013, 0x2014, 0x02dc, 0x2122, 0x0161, 0x203a, 0x0153, 0xfffd, 0x017e, 0x0178};

struct conv {
	iconv_t cd;    /* from the declared charset; (iconv_t)-1: UTF-8, checked */
	char pend[16]; /* an incomplete sequence at the end of a chunk */
	size_t npend;
	unsigned long bad; /* bytes guessed (UTF-8) or replaced (iconv) */
};

static void
put_unichar(GString *out, gunichar u)
{
	char b[6];

	g_string_append_len(out, b, g_unichar_to_utf8(u, b));
}

static void
conv_utf8(struct conv *v, const char *p, size_t n, bool final, GString *out)
{
	size_t i = 0;

	while (i < n) {
		unsigned char ch = (unsigned char)p[i];
		const gchar *end;
		/* what is valid UTF-8, most of it, is copied at once; a NUL
		 * (which GLib calls invalid) as it is */
		g_utf8_validate_len(p + i, n - i, &end);
		if (end == p + i && ch < 0x80)
			end++;
		if (end > p + i) {
			g_string_append_len(out, p + i, end - (p + i));
			i = (size_t)(end - p);
			continue;
		}
		gunichar u = g_utf8_get_char_validated(p + i, (gssize)(n - i));
		if (u == (gunichar)-2 && !final && n - i < sizeof(v->pend)) {
			memcpy(v->pend, p + i, n - i);
			v->npend = n - i;
			return;
		}
		if (u == (gunichar)-1 || u == (gunichar)-2) {
			put_unichar(out, ch < 0xa0 ? cp1252_high[ch - 0x80] : ch);
			v->bad++;
			i++;
			continue;
		}
		size_t len = (size_t)(g_utf8_next_char(p + i) - (p + i));
		g_string_append_len(out, p + i, (gssize)len);
		i += len;
	}
}

static void
conv_iconv(struct conv *v, char *p, size_t n, bool final, GString *out)
{
	char buf[4096], *o;
	size_t ol;

	while (n > 0) {
		o = buf;
		ol = sizeof(buf);
		size_t r = iconv(v->cd, &p, &n, &o, &ol);
		int e = errno;
		g_string_append_len(out, buf, o - buf);
		if (r != (size_t)-1 || e == E2BIG)
			continue;
		if (e == EINVAL && !final && n < sizeof(v->pend)) {
			memcpy(v->pend, p, n);
			v->npend = n;
			return;
		}
		/* EILSEQ, or a sequence cut off at the very end */
		put_unichar(out, 0xfffd);
		v->bad++;
		p++;
		n--;
	}
	if (final) { /* back to the initial shift state */
		o = buf;
		ol = sizeof(buf);
		iconv(v->cd, NULL, NULL, &o, &ol);
		g_string_append_len(out, buf, o - buf);
	}
}

/* Convert one chunk of in (the last when final) onto out. */
static void
conv_feed(struct conv *v, const char *in, size_t len, bool final, GString *out)
{
	char *p = (char *)in, *joined = NULL;
	size_t n = len;

	if (v->npend > 0) {
		joined = xmalloc(v->npend + len);
		memcpy(joined, v->pend, v->npend);
		memcpy(joined + v->npend, in, len);
		p = joined;
		n = v->npend + len;
		v->npend = 0;
	}
	if (v->cd == (iconv_t)-1)
		conv_utf8(v, p, n, final, out);
	else
		conv_iconv(v, p, n, final, out);
	free(joined);
}

static bool
is_utf8_label(const char *cs)
{
	return cs == NULL || *cs == '\0' || g_ascii_strcasecmp(cs, "utf-8") == 0 ||
	       g_ascii_strcasecmp(cs, "utf8") == 0 || g_ascii_strcasecmp(cs, "us-ascii") == 0 ||
	       g_ascii_strcasecmp(cs, "ascii") == 0;
}

/* The decoded body, converted (struct conv), into fd. 0, LIMIT_HIT or -errno. */
static int
convert_into(struct ctx *c, struct decoded *in, struct conv *v, struct sink *s)
{
	char *buf = xmalloc(TEXT_CHUNK);
	GString *out = g_string_sized_new(TEXT_CHUNK + TEXT_CHUNK / 2);
	bool final = false;
	int r = 0;

	while (r == 0 && !final) {
		ssize_t n = decoded_read(in, buf, TEXT_CHUNK);
		if (n < 0) {
			r = errno ? -errno : -EIO;
			break;
		}
		final = n == 0;
		conv_feed(v, buf, (size_t)n, final, out);
		r = sink_write(c, s, out->str, out->len);
		g_string_truncate(out, 0);
	}
	g_string_free(out, TRUE);
	free(buf);
	return r;
}

static void
text_body(struct ctx *c, GMimePart *part, const char *name)
{
	const char *cs = g_mime_object_get_content_type_parameter(GMIME_OBJECT(part), "charset");
	const char *said = cs != NULL && *cs != '\0' ? cs : "us-ascii";
	struct conv v = {.cd = (iconv_t)-1};
	struct sink s = {.fd = -1};
	bool unknown = false;
	char label[48];
	struct decoded in;
	int r;

	util_printable(said, strlen(said), label, sizeof(label));
	if (!is_utf8_label(cs) && (v.cd = g_mime_iconv_open("UTF-8", cs)) == (iconv_t)-1)
		unknown = true;
	if ((s.fd = openat(c->o->dirfd, name, FILE_FLAGS, FILE_MODE)) < 0) {
		r = -errno;
	} else {
		decoded_open(part, &in);
		r = convert_into(c, &in, &v, &s);
		decoded_close(&in);
		r = sink_end(&s, r, c->o->dirfd, name);
	}
	if (v.cd != (iconv_t)-1)
		g_mime_iconv_close(v.cd);
	if (r < 0) {
		c->err = r;
		c->stopped = true;
		return;
	}
	if (r != 0)
		return;
	c->r->text[c->r->ntext++] = xstrdup(name);
	if (unknown)
		add_note(c, "%s: unknown charset \"%s\", read as UTF-8 (Windows-1252 where not)",
			 name, label);
	else if (v.bad > 0 && v.cd == (iconv_t)-1)
		add_note(c, "%s: %lu byte(s) not valid in charset \"%s\", read as Windows-1252",
			 name, v.bad, label);
	else if (v.bad > 0)
		add_note(c, "%s: %lu byte(s) invalid in charset \"%s\", replaced by U+FFFD", name,
			 v.bad, label);
}

static int
attachments_dir(struct ctx *c)
{
	if (c->attfd >= 0)
		return c->attfd;
	if (mkdirat(c->o->dirfd, "attachments", DIR_MODE) < 0 && errno != EEXIST)
		return -errno;
	c->attfd =
		openat(c->o->dirfd, "attachments", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	return c->attfd < 0 ? -errno : c->attfd;
}

/* Create a unique file for want in attachments/: fd, name in out. */
static int
open_unique(struct ctx *c, const char *want, char *out, size_t size)
{
	gchar *key = g_ascii_strdown(want, -1), *folded;
	unsigned k = MAX(1, GPOINTER_TO_UINT(g_hash_table_lookup(c->next_variant, key)));
	int fd = -EEXIST;

	for (; k < MAX_UNIQUE_ATTEMPTS && fd == -EEXIST; k++) {
		name_variant(want, k, out, size);
		folded = g_ascii_strdown(out, -1);
		if (g_hash_table_contains(c->taken, folded)) {
			g_free(folded);
			continue;
		}
		fd = openat(c->attfd, out, FILE_FLAGS, FILE_MODE);
		if (fd < 0) {
			fd = -errno;
			g_free(folded);
		} else {
			g_hash_table_add(c->taken, folded);
		}
	}
	g_hash_table_insert(c->next_variant, key, GUINT_TO_POINTER(k));
	return fd;
}

static struct mime_attachment *
new_attachment(struct ctx *c)
{
	c->r->att = xrealloc(c->r->att, (c->r->natt + 1) * sizeof(*c->r->att));
	return memset(&c->r->att[c->r->natt], 0, sizeof(*c->r->att));
}

static void
digest_hex(EVP_MD_CTX *md, char out[65])
{
	unsigned char d[EVP_MAX_MD_SIZE];
	unsigned int dlen = 0;

	EVP_DigestFinal_ex(md, d, &dlen);
	util_hex(d, dlen, out);
}

/* The message part msg written by GMime into fd (the file name in
 * attachments/), with the message's CRLF line ends, then hashed and
 * counted from disk into s. 0, LIMIT_HIT or -errno. */
static int
write_message_part(struct ctx *c, GMimeObject *msg, int fd, const char *name, struct sink *s)
{
	GMimeStream *out = g_mime_stream_fs_new(fd);
	GMimeFormatOptions *fo = g_mime_format_options_new();
	char *buf;
	ssize_t n;
	int r, rfd;

	g_mime_stream_fs_set_owner(GMIME_STREAM_FS(out), FALSE);
	g_mime_format_options_set_newline_format(fo, GMIME_NEWLINE_FORMAT_DOS);
	r = g_mime_object_write_to_stream(msg, fo, out) < 0 || g_mime_stream_flush(out) < 0
		    ? (errno ? -errno : -EIO)
		    : 0;
	g_mime_format_options_free(fo);
	g_object_unref(out);
	if (r != 0)
		return r;
	if ((rfd = openat(c->attfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC)) < 0)
		return -errno;
	buf = xmalloc(CHUNK);
	while ((n = read(rfd, buf, CHUNK)) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			r = -errno;
			break;
		}
		EVP_DigestUpdate(s->md, buf, (size_t)n);
		s->size += (unsigned long long)n;
	}
	close(rfd);
	free(buf);
	if (r == 0 && s->size > c->max_decoded - c->decoded) {
		limit_bytes(c);
		r = LIMIT_HIT;
	} else if (r == 0) {
		c->decoded += s->size;
	}
	return r;
}

/* Write one attachment: in (NULL: empty) or, for a message, msg. */
static void
save_attachment(struct ctx *c, const char *want, const char *original, const char *ctype,
		struct decoded *in, GMimeObject *msg)
{
	char name[MIME_NAME_MAX + 1];
	struct sink s = {.fd = -1};
	int r, fd;

	if ((r = attachments_dir(c)) < 0 || (fd = open_unique(c, want, name, sizeof(name))) < 0) {
		c->err = r < 0 ? r : fd;
		c->stopped = true;
		return;
	}
	s.fd = fd;
	r = 0; /* no content at all: an empty file */
	s.md = EVP_MD_CTX_new();
	if (s.md == NULL || !EVP_DigestInit_ex(s.md, EVP_sha256(), NULL))
		abort();
	if (msg != NULL)
		r = write_message_part(c, msg, fd, name, &s);
	else if (in != NULL)
		r = copy_stream(c, in, &s);
	r = sink_end(&s, r, c->attfd, name);
	if (r < 0) {
		c->err = r;
		c->stopped = true;
	}
	if (r == 0) {
		struct mime_attachment *a = new_attachment(c);
		a->name = xstrdup(name);
		a->original_name = original ? xstrdup(original) : NULL;
		a->content_type = xstrdup(ctype);
		a->size = s.size;
		digest_hex(s.md, a->sha256);
		c->r->natt++;
	}
	EVP_MD_CTX_free(s.md);
}

/* A name from the message (RFC 2231 already done by GMime) as UTF-8. */
static char *
decode_name(const char *raw)
{
	if (raw == NULL || *raw == '\0')
		return NULL;
	if (strstr(raw, "=?") != NULL || !g_utf8_validate(raw, -1, NULL))
		return mime_decode_header(raw);
	return xstrdup(raw);
}

/* header's value with every RFC 2231 "%00" turned into "%5F" ('_'), or
 * NULL when it has none. */
static char *
without_encoded_nul(GMimeObject *obj, const char *header)
{
	const char *raw = g_mime_object_get_header(obj, header);
	GString *g;

	if (raw == NULL || strstr(raw, "%00") == NULL)
		return NULL;
	g = g_string_new(NULL);
	for (const char *p = raw; *p; p++) {
		if (p[0] == '%' && p[1] == '0' && p[2] == '0') {
			g_string_append(g, "%5F");
			p += 2;
		} else {
			g_string_append_c(g, *p);
		}
	}
	return g_string_free(g, FALSE);
}

/*
 * The part's file name, decoded. GMime decodes RFC 2231 values into C
 * strings, so an encoded NUL (%00) would cut the name short and drop its
 * extension; such a header is read again with the NUL as '_', which the
 * safe name rules would have made of it anyway.
 */
static char *
filename_of(GMimePart *part)
{
	GMimeObject *obj = GMIME_OBJECT(part);
	char *fixed, *name = NULL;

	if ((fixed = without_encoded_nul(obj, "Content-Disposition")) != NULL) {
		GMimeContentDisposition *d =
			g_mime_content_disposition_parse(mime_parser_options(), fixed);
		const char *fn = d ? g_mime_content_disposition_get_parameter(d, "filename") : NULL;
		name = decode_name(fn);
		if (d != NULL)
			g_object_unref(d);
		g_free(fixed);
		fixed = NULL;
	}
	GMimeContentDisposition *disp = g_mime_object_get_content_disposition(obj);
	bool from_type =
		disp == NULL || g_mime_content_disposition_get_parameter(disp, "filename") == NULL;
	if (name == NULL && from_type &&
	    (fixed = without_encoded_nul(obj, "Content-Type")) != NULL) {
		GMimeContentType *ct = g_mime_content_type_parse(mime_parser_options(), fixed);
		name = decode_name(ct ? g_mime_content_type_get_parameter(ct, "name") : NULL);
		if (ct != NULL)
			g_object_unref(ct);
	}
	g_free(fixed);
	return name != NULL ? name : decode_name(g_mime_part_get_filename(part));
}

static char *
mime_type_of(GMimeObject *obj)
{
	GMimeContentType *ct = g_mime_object_get_content_type(obj);
	gchar *t = ct ? g_mime_content_type_get_mime_type(ct) : NULL;
	char *r = xstrdup(t ? t : "application/octet-stream");

	g_free(t);
	for (char *p = r; *p; p++)
		*p = g_ascii_tolower(*p);
	return r;
}

static void
leaf(struct ctx *c, GMimePart *part)
{
	GMimeObject *obj = GMIME_OBJECT(part);
	GMimeContentDisposition *disp = g_mime_object_get_content_disposition(obj);
	char *ctype = mime_type_of(obj);
	char *orig = filename_of(part);
	bool attachment = orig != NULL || (disp && g_mime_content_disposition_is_attachment(disp));

	if (!attachment && strcmp(ctype, "text/plain") == 0) {
		if (c->o->save_text && !c->have_plain)
			text_body(c, part, "text.txt");
		c->have_plain = true;
	} else if (!attachment && strcmp(ctype, "text/html") == 0) {
		if (c->o->save_text && !c->have_html)
			text_body(c, part, "text.html");
		c->have_html = true;
	} else if (strcmp(ctype, "application/pkcs7-signature") == 0 ||
		   strcmp(ctype, "application/x-pkcs7-signature") == 0 ||
		   strcmp(ctype, "application/pgp-signature") == 0) {
		/* a signature is not content; it stays in message.eml */
	} else if (c->o->save_attachments) {
		char want[MIME_NAME_MAX + 1];
		struct decoded in;
		bool some = decoded_open(part, &in);
		mime_safe_name(orig, ctype, (unsigned)c->r->natt + 1, want, sizeof(want));
		save_attachment(c, want, orig, ctype, some ? &in : NULL, NULL);
		decoded_close(&in);
	}
	free(orig);
	free(ctype);
}

static void
message_part(struct ctx *c, GMimeMessagePart *mp)
{
	GMimeMessage *m = g_mime_message_part_get_message(mp);
	GMimeObject *obj = GMIME_OBJECT(mp);
	char *subject = NULL, *orig = NULL, *ctype, want[MIME_NAME_MAX + 1];

	if (!c->o->save_attachments)
		return;
	ctype = mime_type_of(obj);
	if (m != NULL)
		subject = mime_decoded_field(GMIME_OBJECT(m), "Subject");
	{
		GMimeContentDisposition *d = g_mime_object_get_content_disposition(obj);
		const char *fn = d ? g_mime_content_disposition_get_parameter(d, "filename") : NULL;
		if (fn == NULL)
			fn = g_mime_object_get_content_type_parameter(obj, "name");
		orig = decode_name(fn);
	}
	/* SUBJECT.eml; without a subject the file name, then attachment-N.eml */
	if (subject != NULL) {
		char *tmp = xasprintf("%s.eml", subject);
		/* a subject is not a path: "Re: A/B" keeps both sides */
		for (char *p = tmp; *p; p++)
			if (*p == '/' || *p == '\\')
				*p = '_';
		mime_safe_name(tmp, "message/rfc822", (unsigned)c->r->natt + 1, want, sizeof(want));
		free(tmp);
	} else {
		mime_safe_name(orig, "message/rfc822", (unsigned)c->r->natt + 1, want,
			       sizeof(want));
	}
	save_attachment(c, want, orig ? orig : subject, ctype, NULL, m ? GMIME_OBJECT(m) : NULL);
	free(subject);
	free(orig);
	free(ctype);
}

static void
walk(struct ctx *c, GMimeObject *obj, unsigned depth)
{
	if (c->stopped || obj == NULL)
		return;
	if (++c->nparts > c->max_parts) {
		add_note(c, "limit: more than %u MIME parts; extraction stopped", c->max_parts);
		c->stopped = true;
		return;
	}
	if (depth > c->max_depth) {
		add_note(c, "limit: MIME nesting deeper than %u; extraction stopped", c->max_depth);
		c->stopped = true;
		return;
	}
	if (GMIME_IS_MULTIPART(obj)) {
		GMimeMultipart *mp = GMIME_MULTIPART(obj);
		int n = g_mime_multipart_get_count(mp);
		for (int i = 0; i < n && !c->stopped; i++)
			walk(c, g_mime_multipart_get_part(mp, i), depth + 1);
	} else if (GMIME_IS_MESSAGE_PART(obj)) {
		message_part(c, GMIME_MESSAGE_PART(obj));
	} else if (GMIME_IS_PART(obj)) {
		leaf(c, GMIME_PART(obj));
	}
}

/* ---- S/MIME layers (RFC 8551) ---- */

static void entity(struct ctx *c, GMimeObject *obj, unsigned layer);

static void
set_smime(struct ctx *c, int state, const char *why)
{
	if (state <= (int)c->smime)
		return;
	c->smime = state;
	if (why != NULL)
		util_printable(why, strlen(why), c->smime_why, sizeof(c->smime_why));
}

/* application/pkcs7-mime, its x- spelling, or octet-stream named *.p7m */
static bool
is_pkcs7_mime(GMimeObject *obj)
{
	char *t;
	bool yes;

	if (!GMIME_IS_PART(obj))
		return false;
	t = mime_type_of(obj);
	yes = strcmp(t, "application/pkcs7-mime") == 0 ||
	      strcmp(t, "application/x-pkcs7-mime") == 0;
	if (!yes && strcmp(t, "application/octet-stream") == 0) {
		const char *fn = g_mime_part_get_filename(GMIME_PART(obj));
		size_t n = fn ? strlen(fn) : 0;
		yes = n > 4 && g_ascii_strcasecmp(fn + n - 4, ".p7m") == 0;
	}
	free(t);
	return yes;
}

/*
 * A scratch file for an S/MIME layer: unnamed (O_TMPFILE) in the message
 * folder, or named and unlinked at once where the file system cannot do
 * that. Nothing of it is ever visible, even if the process dies. fd or -errno.
 */
static int
scratch(struct ctx *c)
{
	char name[64];
	int fd = openat(c->o->dirfd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);

	if (fd >= 0 || (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL))
		return fd >= 0 ? fd : -errno;
	for (unsigned i = 0; i < MAX_UNIQUE_ATTEMPTS; i++) {
		snprintf(name, sizeof(name), ".smime.%ld.%u", (long)getpid(), i);
		fd = openat(c->o->dirfd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC,
			    0600);
		if (fd >= 0) {
			unlinkat(c->o->dirfd, name, 0);
			return fd;
		}
		if (errno != EEXIST)
			break;
	}
	return -errno;
}

struct to_fd {
	int fd;
	unsigned long long len, max;
};

static int
put_fd(void *arg, const char *buf, size_t n)
{
	struct to_fd *t = arg;

	if ((t->len += n) > t->max)
		return LIMIT_HIT;
	return util_write_all(t->fd, buf, n);
}

/* The transfer-decoded content of part into fd, at most max bytes, and
 * fd rewound. 0, LIMIT_HIT or -errno. */
static int
spool(GMimePart *part, int fd, unsigned long long max)
{
	struct decoded in;
	int r = 0;

	if (decoded_open(part, &in))
		r = drain(&in, put_fd, &(struct to_fd){.fd = fd, .max = max});
	decoded_close(&in);
	if (r == 0 && lseek(fd, 0, SEEK_SET) < 0)
		r = -errno;
	return r;
}

static void
local_error(struct ctx *c, int r)
{
	c->err = r;
	c->stopped = true;
}

/* Go on with the MIME entity in fd (decrypted or unwrapped; closed here). */
static void
inner_entity(struct ctx *c, int fd, unsigned layer)
{
	GMimeStream *stream;
	GMimeParser *parser;
	GMimeObject *obj;

	if (lseek(fd, 0, SEEK_SET) < 0) {
		local_error(c, -errno);
		close(fd);
		return;
	}
	stream = g_mime_stream_fs_new(fd); /* owns fd */
	parser = g_mime_parser_new_with_stream(stream);
	g_mime_parser_set_persist_stream(parser, TRUE);
	obj = g_mime_parser_construct_part(parser, mime_parser_options());
	if (obj == NULL) {
		add_note(c, "the S/MIME content is not a MIME entity; nothing extracted");
	} else {
		entity(c, obj, layer + 1);
		g_object_unref(obj);
	}
	g_object_unref(parser);
	g_object_unref(stream);
}

/* Does the file at fd begin with a header field ("Name:")? RFC 8551: what
 * is encrypted is a MIME entity, so its first line is a header field. */
static bool
starts_with_header(int fd)
{
	char buf[80];
	ssize_t n = pread(fd, buf, sizeof(buf), 0);
	ssize_t i = 0;

	while (i < n && buf[i] > ' ' && buf[i] < 0x7f && buf[i] != ':')
		i++;
	return i > 0 && i < n && buf[i] == ':';
}

static bool
says_enveloped(GMimePart *part)
{
	const char *t = g_mime_object_get_content_type_parameter(GMIME_OBJECT(part), "smime-type");

	return t != NULL && (g_ascii_strcasecmp(t, "enveloped-data") == 0 ||
			     g_ascii_strcasecmp(t, "authEnveloped-data") == 0);
}

/* Decrypt (enveloped) or unwrap (signed) cms into out. 0; -1 with why
 * saying what failed; another -errno. */
static int
peel(struct ctx *c, struct smime_cms *cms, int out, char *why, size_t size)
{
	char detail[256] = "";
	int r;

	if (smime_cms_kind(cms) == SMIME_KIND_SIGNED) {
		r = smime_cms_unwrap_signed(cms, out, detail, sizeof(detail));
		snprintf(why, size, "signed data: %s", detail);
		return r;
	}
	if (c->o->smime_key == NULL && c->o->smime_unavailable != NULL) {
		snprintf(why, size, "%s", c->o->smime_unavailable);
		return -1;
	}
	r = smime_cms_decrypt(c->o->smime_key, cms, out, detail, sizeof(detail));
	snprintf(why, size, "%s", detail);
	if (r == 0 && !starts_with_header(out)) {
		/* a corrupt key transport decrypts with a random key (OpenSSL's
		 * defence against padding oracles): 1 in 256 passes the padding */
		snprintf(why, size, "corrupt (the decrypted content is not a MIME entity)");
		r = -1;
	}
	return r;
}

/*
 * An application/pkcs7-mime part. Its DER goes to a scratch file, OpenSSL
 * reads the CMS structure from there (the only copy held in memory), and
 * the decrypted or unwrapped entity goes to another scratch file that GMime
 * then parses like the message itself.
 */
static void
pkcs7(struct ctx *c, GMimePart *part, unsigned layer)
{
	unsigned long long cap = c->max_decoded - c->decoded;
	struct smime_cms *cms = NULL;
	char why[300] = "";
	int r, der, out;

	if (cap > SMIME_MAX_SIZE)
		cap = SMIME_MAX_SIZE;
	if ((der = scratch(c)) < 0) {
		local_error(c, der);
		return;
	}
	r = spool(part, der, cap);
	if (r == 0)
		r = smime_cms_read(der, &cms, why, sizeof(why));
	close(der);
	if (r == LIMIT_HIT) {
		set_smime(c, SM_FAILED, "too large");
		limit_bytes(c);
		return;
	}
	if (r < -1) {
		local_error(c, r);
		return;
	}
	if (r == -1) {
		if (says_enveloped(part))
			set_smime(c, SM_FAILED, why);
		else /* not CMS: an attachment like any other */
			walk(c, GMIME_OBJECT(part), layer);
		return;
	}
	switch (smime_cms_kind(cms)) {
	case SMIME_KIND_ENVELOPED:
	case SMIME_KIND_SIGNED:
		break;
	default:
		/* certs-only, compressed...: an attachment like any other */
		smime_cms_free(cms);
		walk(c, GMIME_OBJECT(part), layer);
		return;
	}
	if ((out = scratch(c)) < 0) {
		smime_cms_free(cms);
		local_error(c, out);
		return;
	}
	r = peel(c, cms, out, why, sizeof(why));
	if (r == 0) {
		set_smime(c, smime_cms_kind(cms) == SMIME_KIND_ENVELOPED ? SM_DECRYPTED : SM_SIGNED,
			  NULL);
		smime_cms_free(cms);
		inner_entity(c, out, layer);
		return;
	}
	smime_cms_free(cms);
	close(out);
	if (r < -1)
		local_error(c, r);
	else
		set_smime(c, SM_FAILED, why);
}

/* The entity that holds the content, S/MIME wrappings peeled off first. */
static void
entity(struct ctx *c, GMimeObject *obj, unsigned layer)
{
	if (c->stopped || obj == NULL)
		return;
	if (layer < SMIME_LAYERS && is_pkcs7_mime(obj)) {
		pkcs7(c, GMIME_PART(obj), layer);
	} else if (layer < SMIME_LAYERS && GMIME_IS_MULTIPART_SIGNED(obj) &&
		   g_mime_multipart_get_count(GMIME_MULTIPART(obj)) >= 1) {
		/* the first part is the content, the second the signature */
		set_smime(c, SM_SIGNED, NULL);
		entity(c, g_mime_multipart_get_part(GMIME_MULTIPART(obj), 0), layer + 1);
	} else {
		walk(c, obj, layer);
	}
}

/*
 * The message for the parser. The parser reads each part's content again
 * through the stream when it is decoded (a seek and a read, each a system
 * call, per piece). Bytes still in memory are read there, without a copy.
 * From the file, a small message is mapped, so that reading it is copying;
 * a large one is read: its mapped pages would count in the process's
 * resident memory, which stays flat whatever the message's size.
 */
#define MMAP_MAX (4 * 1024 * 1024)

static void
release_array(gpointer a)
{
	(void)g_byte_array_free(a, FALSE); /* the bytes are the caller's */
}

static GMimeStream *
eml_stream(const struct mime_opts *o, const char *eml_path)
{
	struct stat sb;
	int fd;

	if (o->eml != NULL && o->eml_len <= G_MAXUINT) {
		/* not the stream's to free: only the array around the bytes is ours */
		GByteArray *a = g_byte_array_new_take((guint8 *)o->eml, o->eml_len);
		GMimeStream *m = g_mime_stream_mem_new_with_byte_array(a);
		g_mime_stream_mem_set_owner(GMIME_STREAM_MEM(m), FALSE);
		g_object_set_data_full(G_OBJECT(m), "popfetchd-eml", a, release_array);
		return m;
	}
	fd = openat(o->dirfd >= 0 ? o->dirfd : AT_FDCWD, eml_path,
		    O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return NULL;
	if (fstat(fd, &sb) == 0 && sb.st_size > 0 && sb.st_size <= MMAP_MAX) {
		GMimeStream *m = g_mime_stream_mmap_new(fd, PROT_READ, MAP_PRIVATE);
		if (m != NULL)
			return m; /* owns fd */
	}
	return g_mime_stream_fs_new(fd);
}

int
mime_extract(const char *eml_path, const struct mime_opts *o, struct mime_result *ret)
{
	struct ctx c = {
		.o = o,
		.r = ret,
		.attfd = -1,
		.max_depth = o->max_depth ? o->max_depth : MIME_DEFAULT_MAX_DEPTH,
		.max_parts = o->max_parts ? o->max_parts : MIME_DEFAULT_MAX_PARTS,
		.max_decoded = o->max_decoded ? o->max_decoded : MIME_DEFAULT_MAX_DECODED,
	};
	GMimeStream *stream;
	GMimeParser *parser;
	GMimeMessage *msg;

	memset(ret, 0, sizeof(*ret));
	mime_init();
	if ((stream = eml_stream(o, eml_path)) == NULL)
		return -errno;
	c.note = g_string_new(NULL);
	c.taken = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
	c.next_variant = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
	parser = g_mime_parser_new_with_stream(stream);
	g_mime_parser_set_persist_stream(parser, TRUE);
	msg = g_mime_parser_construct_message(parser, mime_parser_options());
	if (o->headers != NULL) {
		if (msg != NULL)
			mime_message_headers(msg, o->headers);
		else
			memset(o->headers, 0, sizeof(*o->headers));
	}
	if (msg == NULL)
		add_note(&c, "not a MIME message; nothing extracted");
	else
		entity(&c, g_mime_message_get_mime_part(msg), 0);
	if (c.attfd >= 0)
		close(c.attfd);
	if (msg != NULL)
		g_object_unref(msg);
	g_object_unref(parser);
	g_object_unref(stream);
	if (c.note->len > 0)
		ret->note = xstrdup(c.note->str);
	static const char *const state[] = {"none", "signed", "decrypted"};
	ret->smime = c.smime == SM_FAILED ? xasprintf("not-decrypted: %s", c.smime_why)
					  : xstrdup(state[c.smime]);
	g_string_free(c.note, TRUE);
	g_hash_table_destroy(c.taken);
	g_hash_table_destroy(c.next_variant);
	return c.err;
}

void
mime_result_clear(struct mime_result *r)
{
	for (size_t i = 0; i < r->ntext; i++)
		free(r->text[i]);
	for (size_t i = 0; i < r->natt; i++) {
		free(r->att[i].name);
		free(r->att[i].original_name);
		free(r->att[i].content_type);
	}
	free(r->att);
	free(r->note);
	free(r->smime);
	memset(r, 0, sizeof(*r));
}
