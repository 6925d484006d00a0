/* util — small pure helpers shared by several modules. */
#ifndef POPFETCHD_UTIL_H
#define POPFETCHD_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* "90", "90s", "5m", "1h", "2d" -> seconds. 0 on success, -EINVAL on bad
 * syntax, -ERANGE on overflow. *ret untouched on failure. */
int util_parse_duration(const char *s, uint64_t *ret);
/* "25M", "512k", "1G", "1000", "25MB", "25MiB" (binary units) -> bytes. */
int util_parse_size(const char *s, uint64_t *ret);

/* Lower-case hex of len bytes into out (2*len+1 bytes). */
void util_hex(const unsigned char *in, size_t len, char *out);

/* Local files: 0 or -errno. mkdir -p with mode for each new level; fsync
 * of a directory by path; a write that goes on after short writes. */
int util_mkdir_p(const char *path, unsigned mode);
int util_fsync_dir(const char *path);
int util_write_all(int fd, const void *buf, size_t len);

/* Allocation that cannot fail (aborts on OOM, like xmalloc). */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
