/* util — small pure helpers shared by several modules. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
