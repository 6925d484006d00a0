/* util — allocation, number parsing, durable file writes, the one escaper of
 * untrusted text. */
#ifndef POPFETCHD_UTIL_H
#define POPFETCHD_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

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
/* free() each of n pointers; FREE_ALL(a->x, a->y, ...) frees the fields named. */
void util_free_each(void *const *p, size_t n);
#define FREE_ALL(...)                                                                              \
	util_free_each((void *const[]){__VA_ARGS__},                                               \
		       sizeof((void *const[]){__VA_ARGS__}) / sizeof(void *))
int util_write_all(int fd, const void *buf, size_t len);

/*
 * Replace path by len bytes of buf, durably: a temporary file in the same
 * directory (tmp, or when tmp is NULL a fresh ".NAME.XXXXXX"), created with
 * mode and never through a symbolic link; write, fsync, rename over path,
 * fsync the directory. The temporary is removed on every failure. 0, or
 * -errno with why (when not NULL) naming the step and the file, as in
 * "cannot rename /var/lib/x/uidl.tmp".
 */
int util_write_atomic(const char *path, const char *tmp, const void *buf, size_t len, mode_t mode,
		      char *why, size_t whylen);

/*
 * Text from outside (a server's reply, a certificate's names, a token
 * endpoint's error, a name from a message or a configuration file) made safe
 * for a log line, a terminal or a file name. Unsafe, with one list for every
 * use: the C0 controls and DEL, the C1 controls (U+0080-009F), bytes that
 * are not UTF-8 (GLib's validation: no overlong form, surrogate or code point
 * above U+10FFFF; a sequence cut short is bytes), the bidi controls U+061C,
 * U+200E-200F, U+202A-202E, U+2066-2069, the line and paragraph separators
 * U+2028-2029 and U+FEFF. The rest, printable ASCII and every other valid
 * UTF-8 character, is kept as it is.
 *
 * util_printable, for logs: an unsafe byte as \xhh, an unsafe character as
 * \uhhhh (lower-case hex). A backslash stays as it is: a secret that holds
 * one is still found by a redaction of the result, and the escapes of a
 * certificate's names (RFC 2253) read as they are.
 * util_printable_repl, for names: each unsafe byte or character as repl.
 *
 * Both write at most size - 1 bytes and a NUL into out (size > 0), never
 * cutting a character or an escape in half; a cut is marked "..." (when
 * size > 3). They return out.
 */
const char *util_printable(const char *in, size_t len, char *out, size_t size);
const char *util_printable_repl(const char *in, size_t len, char repl, char *out, size_t size);

/* Allocation that cannot fail (aborts on OOM, like xmalloc). */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
