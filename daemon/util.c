/* util — allocation, number parsing, durable file writes, the one escaper of
 * untrusted text. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>

#include "popfetchd/util.h"

/* A decimal number followed by a unit from the table; the unit is optional
 * (multiplier 1). Case-insensitive units. */
struct unit {
	const char *name;
	uint64_t mult;
};

static int
parse_with_units(const char *s, const struct unit *units, uint64_t *ret)
{
	const char *p = s;
	uint64_t v = 0;

	if (s == NULL || !isdigit((unsigned char)*p))
		return -EINVAL;
	for (; isdigit((unsigned char)*p); p++) {
		if (v > (UINT64_MAX - 9) / 10)
			return -ERANGE;
		v = v * 10 + (uint64_t)(*p - '0');
	}
	while (*p == ' ')
		p++;
	if (*p == '\0') {
		*ret = v;
		return 0;
	}
	for (const struct unit *u = units; u->name != NULL; u++) {
		if (strcasecmp(p, u->name) != 0)
			continue;
		if (u->mult != 0 && v > UINT64_MAX / u->mult)
			return -ERANGE;
		*ret = v * u->mult;
		return 0;
	}
	return -EINVAL;
}

int
util_parse_duration(const char *s, uint64_t *ret)
{
	static const struct unit units[] = {
		{"s", 1}, {"sec", 1}, {"m", 60}, {"min", 60}, {"h", 3600}, {"d", 86400}, {NULL, 0},
	};
	return parse_with_units(s, units, ret);
}

int
util_parse_size(const char *s, uint64_t *ret)
{
	static const struct unit units[] = {
		{"b", 1},
		{"k", 1024},
		{"kb", 1024},
		{"kib", 1024},
		{"m", 1024 * 1024},
		{"mb", 1024 * 1024},
		{"mib", 1024 * 1024},
		{"g", 1024ULL * 1024 * 1024},
		{"gb", 1024ULL * 1024 * 1024},
		{"gib", 1024ULL * 1024 * 1024},
		{NULL, 0},
	};
	return parse_with_units(s, units, ret);
}

void
util_hex(const unsigned char *in, size_t len, char *out)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < len; i++) {
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 0xf];
	}
	out[2 * len] = '\0';
}

static void
oom(void)
{
	fputs("popfetchd: out of memory\n", stderr);
	abort();
}

void *
xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (p == NULL)
		oom();
	return p;
}

void *
xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	if (p == NULL)
		oom();
	return p;
}

void *
xrealloc(void *p, size_t n)
{
	p = realloc(p, n ? n : 1);
	if (p == NULL)
		oom();
	return p;
}

char *
xstrdup(const char *s)
{
	char *p = strdup(s);

	if (p == NULL)
		oom();
	return p;
}

char *
xasprintf(const char *fmt, ...)
{
	va_list ap;
	char *p;

	va_start(ap, fmt);
	if (vasprintf(&p, fmt, ap) < 0)
		oom();
	va_end(ap);
	return p;
}

int
util_mkdir_p(const char *path, unsigned mode)
{
	char buf[PATH_MAX];
	size_t len = strlen(path);

	if (len == 0 || len >= sizeof(buf))
		return -ENAMETOOLONG;
	memcpy(buf, path, len + 1);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, (mode_t)mode) < 0 && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(buf, (mode_t)mode) < 0 && errno != EEXIST)
		return -errno;
	return 0;
}

int
util_fsync_dir(const char *path)
{
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int r = 0;

	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		r = -errno;
	close(fd);
	return r;
}

void
util_free_each(void *const *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(p[i]);
}

int
util_write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Write buf to the new file fd, then fsync and close it. 0 or -errno. */
static int
fill_file(int fd, const void *buf, size_t len)
{
	int r = util_write_all(fd, buf, len);

	if (r == 0 && fsync(fd) < 0)
		r = -errno;
	if (close(fd) < 0 && r == 0)
		r = -errno;
	return r;
}

int
util_write_atomic(const char *path, const char *tmp, const void *buf, size_t len, mode_t mode,
		  char *why, size_t whylen)
{
	const char *slash = strrchr(path, '/');
	char *dir = slash == NULL   ? xstrdup(".")
		    : slash == path ? xstrdup("/")
				    : xasprintf("%.*s", (int)(slash - path), path);
	char *t = tmp != NULL ? xstrdup(tmp)
			      : xasprintf("%s/.%s.XXXXXX", dir, slash == NULL ? path : slash + 1);
	const char *step = "write", *what = t;
	int fd, r = 0;

	if (tmp != NULL)
		fd = open(t, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
	else
		fd = mkostemp(t, O_CLOEXEC); /* O_CREAT | O_EXCL, mode 0600 */
	if (fd < 0) {
		r = -errno;
		step = "create";
		goto out;
	}
	/* a leftover temporary file of that name keeps its mode through O_TRUNC */
	if (fchmod(fd, mode) < 0)
		r = -errno;
	if (r == 0)
		r = fill_file(fd, buf, len);
	else
		close(fd);
	if (r == 0 && rename(t, path) < 0) {
		r = -errno;
		step = "rename";
	}
	if (r < 0) {
		unlink(t);
	} else if ((r = util_fsync_dir(dir)) < 0) {
		step = "fsync";
		what = dir;
	}
out:
	if (r < 0 && why != NULL && whylen > 0)
		snprintf(why, whylen, "cannot %s %s", step, what);
	free(t);
	free(dir);
	return r;
}

/* ---- untrusted text ---- */

/* The one list of characters that never reach a log line or a name as
 * they are (util.h); bytes that are not UTF-8 come on top. */
static const struct {
	gunichar lo, hi;
} unsafe_chars[] = {
	{0x0000, 0x001f}, /* C0 controls: ESC of a terminal sequence, CR, LF, ... */
	{0x007f, 0x009f}, /* DEL, C1 controls (U+009B is a CSI on some terminals) */
	{0x061c, 0x061c}, /* ARABIC LETTER MARK */
	{0x200e, 0x200f}, /* LEFT-TO-RIGHT MARK, RIGHT-TO-LEFT MARK */
	{0x2028, 0x2029}, /* LINE SEPARATOR, PARAGRAPH SEPARATOR */
	{0x202a, 0x202e}, /* bidi embeddings and overrides ("evil\u202efdp.exe") */
	{0x2066, 0x2069}, /* bidi isolates */
	{0xfeff, 0xfeff}, /* ZERO WIDTH NO-BREAK SPACE (byte order mark) */
};

static bool
unsafe_char(gunichar c)
{
	for (size_t i = 0; i < G_N_ELEMENTS(unsafe_chars); i++)
		if (c >= unsafe_chars[i].lo && c <= unsafe_chars[i].hi)
			return true;
	return false;
}

/* The character at p (n > 0 bytes): its length in bytes, its code point in
 * *cp, whether it is unsafe in *bad. A byte that is not UTF-8 (alone, or the
 * start of a sequence that is invalid or cut short) is one unsafe byte with
 * *cp (gunichar)-1. */
static size_t
next_char(const char *p, size_t n, gunichar *cp, bool *bad)
{
	gunichar c = (unsigned char)p[0];

	if (c >= 0x80)
		c = g_utf8_get_char_validated(p, (gssize)n);
	if (c == (gunichar)-1 || c == (gunichar)-2) {
		*cp = (gunichar)-1;
		*bad = true;
		return 1;
	}
	*cp = c;
	*bad = unsafe_char(c);
	return c < 0x80 ? 1 : (size_t)(g_utf8_next_char(p) - p);
}

/* How the character at p (step bytes) is shown: its bytes, repl, or (repl
 * 0) its escape in esc. Returns the bytes to copy, their number in *n. */
static const char *
shown_as(const char *p, size_t step, gunichar cp, bool bad, char repl, char esc[16], size_t *n)
{
	if (!bad) {
		*n = step;
		return p;
	}
	if (repl != 0) {
		esc[0] = repl;
		*n = 1;
	} else if (cp == (gunichar)-1 || cp < 0x80) {
		*n = (size_t)snprintf(esc, 16, "\\x%02x", (unsigned char)*p);
	} else {
		*n = (size_t)snprintf(esc, 16, "\\u%04x", (unsigned)cp);
	}
	return esc;
}

const char *
util_printable_repl(const char *in, size_t len, char repl, char *out, size_t size)
{
	size_t o = 0, keep = 0; /* keep: where "..." goes if what follows does not fit */

	if (size == 0)
		return out;
	for (size_t i = 0; i < len;) {
		char esc[16];
		gunichar cp;
		bool bad;
		size_t step = next_char(in + i, len - i, &cp, &bad), n;
		const char *piece = shown_as(in + i, step, cp, bad, repl, esc, &n);

		if (o + n > size - 1) {
			if (size > 3) {
				memcpy(out + keep, "...", 3);
				o = keep + 3;
			}
			break;
		}
		memcpy(out + o, piece, n);
		o += n;
		i += step;
		if (o + 4 <= size)
			keep = o;
	}
	out[o] = '\0';
	return out;
}

const char *
util_printable(const char *in, size_t len, char *out, size_t size)
{
	return util_printable_repl(in, len, 0, out, size);
}
