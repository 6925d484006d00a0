/*
 * faultfs — an LD_PRELOAD shim that makes file system calls fail on paths
 * chosen by a glob, for the disk-fault tests (tests/integration/test_crash.py).
 *
 * strace's fault injection (-e inject=SYSCALL:error=E:when=N, -P PATH) picks
 * a call by its number or by an exact path; a message's staging folder has a
 * name nobody knows in advance (time, pid, serial), and two configurations in
 * one daemon differ only by a path prefix. This shim picks a call by the path
 * it touches, matched with fnmatch(3) against a glob:
 *
 *   PFD_FAULTS="RULE[;RULE...]"   RULE = OP:ERRNO:NTH:COUNT:GLOB
 *
 *   OP     write (write, writev, pwrite: the file the fd names)
 *          fsync, fdatasync (the file or directory the fd names)
 *          syncfs (the file or directory the fd names: its file system)
 *          open (open, openat, creat and their 64 forms: the path opened)
 *          mkdir (mkdir, mkdirat)
 *          rename (rename, renameat, renameat2: the source or the target)
 *   ERRNO  EIO, ENOSPC, EDQUOT, EROFS, EACCES or a number
 *   NTH    the first matching call that fails (1 = the first)
 *   COUNT  how many matching calls fail from there (0 = every one)
 *   GLOB   an absolute path pattern; "*" also matches "/"
 *
 * A failed call does nothing and returns -1 with errno set, as a full or
 * failing disk would. Every injection is reported on stderr as
 * "faultfs: OP(PATH) -> ERRNO" so a test can prove its fault fired. Relative
 * paths are resolved against the directory fd (or the working directory);
 * an fd's path comes from /proc/self/fd. Calls made inside the C library
 * (fopen/fprintf) are not seen: use strace for those.
 *
 * Build: cc -shared -fPIC -O2 -o faultfs.so faultfs.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_RULES 8

struct rule {
	char op[16];
	int err;
	unsigned long nth, count, seen;
	char glob[PATH_MAX];
};

static struct rule rules[MAX_RULES];
static int nrules = -1;
static __thread int inside; /* our own calls (readlink, stderr) are not faulted */

static int
parse_errno(const char *s)
{
	static const struct {
		const char *name;
		int value;
	} names[] = {{"EIO", EIO},     {"ENOSPC", ENOSPC}, {"EDQUOT", EDQUOT},
		     {"EROFS", EROFS}, {"EACCES", EACCES}, {"EPERM", EPERM}};

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (strcmp(s, names[i].name) == 0)
			return names[i].value;
	return atoi(s) > 0 ? atoi(s) : EIO;
}

static void
load_rules(void)
{
	const char *env = getenv("PFD_FAULTS");
	char *copy, *save = NULL, *item;

	nrules = 0;
	if (env == NULL || *env == '\0')
		return;
	copy = strdup(env);
	for (item = strtok_r(copy, ";", &save); item && nrules < MAX_RULES;
	     item = strtok_r(NULL, ";", &save)) {
		struct rule *r = &rules[nrules];
		char *f[5];
		int k = 0;
		char *p = item;
		/* the glob is the rest of the line: it may hold ':' */
		for (; k < 4; k++) {
			char *c = strchr(p, ':');
			if (c == NULL)
				break;
			*c = '\0';
			f[k] = p;
			p = c + 1;
		}
		if (k != 4) {
			fprintf(stderr, "faultfs: bad rule (want OP:ERRNO:NTH:COUNT:GLOB)\n");
			continue;
		}
		f[4] = p;
		snprintf(r->op, sizeof(r->op), "%s", f[0]);
		r->err = parse_errno(f[1]);
		r->nth = strtoul(f[2], NULL, 10);
		r->count = strtoul(f[3], NULL, 10);
		snprintf(r->glob, sizeof(r->glob), "%s", f[4]);
		if (r->nth == 0)
			r->nth = 1;
		nrules++;
	}
	free(copy);
}

static void
report(const char *op, const char *path, int err)
{
	char line[PATH_MAX + 128];
	int n = snprintf(line, sizeof(line), "faultfs: %s(%s) -> %s\n", op, path,
			 err == ENOSPC ? "ENOSPC"
			 : err == EIO  ? "EIO"
				       : strerror(err));
	ssize_t (*real_write)(int, const void *, size_t) =
		(ssize_t(*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
	if (n > 0 && real_write != NULL)
		(void)!real_write(2, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

/* Should this call on path (or, for a rename, path2) fail? The errno, or 0. */
static int
check(const char *op, const char *path, const char *path2)
{
	if (inside)
		return 0;
	if (nrules < 0)
		load_rules();
	for (int i = 0; i < nrules; i++) {
		struct rule *r = &rules[i];
		if (strcmp(r->op, op) != 0)
			continue;
		if (!(path != NULL && fnmatch(r->glob, path, 0) == 0) &&
		    !(path2 != NULL && fnmatch(r->glob, path2, 0) == 0))
			continue;
		if (path == NULL || fnmatch(r->glob, path, 0) != 0)
			path = path2;
		r->seen++;
		if (r->seen >= r->nth && (r->count == 0 || r->seen < r->nth + r->count)) {
			report(op, path, r->err);
			return r->err;
		}
	}
	return 0;
}

static const char *
fd_path(int fd, char *buf, size_t size)
{
	char link[64];
	ssize_t n;

	if (nrules == 0)
		return NULL;
	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	inside++;
	n = readlink(link, buf, size - 1);
	inside--;
	if (n < 0)
		return NULL;
	buf[n] = '\0';
	return buf;
}

static const char *
at_path(int dirfd, const char *path, char *buf, size_t size)
{
	char dir[PATH_MAX];

	if (nrules == 0 || path == NULL)
		return NULL;
	if (path[0] == '/')
		return path;
	if (dirfd == AT_FDCWD) {
		inside++;
		char *ok = getcwd(dir, sizeof(dir));
		inside--;
		if (ok == NULL)
			return NULL;
	} else if (fd_path(dirfd, dir, sizeof(dir)) == NULL) {
		return NULL;
	}
	if ((size_t)snprintf(buf, size, "%s/%.*s", dir, PATH_MAX / 2, path) >= size)
		return NULL;
	return buf;
}

/* The C library's function of that name (static: looked up once). */
#define REAL(name)                                                                                 \
	static __typeof__(&name) real_##name;                                                      \
	if (real_##name == NULL) {                                                                 \
		real_##name = (__typeof__(&name))dlsym(RTLD_NEXT, #name);                          \
	}

#define FAIL_IF2(op, path, path2)                                                                  \
	do {                                                                                       \
		if (nrules < 0)                                                                    \
			load_rules();                                                              \
		int e_ = nrules > 0 ? check(op, path, path2) : 0;                                  \
		if (e_) {                                                                          \
			errno = e_;                                                                \
			return -1;                                                                 \
		}                                                                                  \
	} while (0)
#define FAIL_IF(op, path) FAIL_IF2(op, path, NULL)

ssize_t
write(int fd, const void *buf, size_t len)
{
	char p[PATH_MAX];
	REAL(write);
	if (fd > 2)
		FAIL_IF("write", fd_path(fd, p, sizeof(p)));
	return real_write(fd, buf, len);
}

ssize_t
writev(int fd, const struct iovec *iov, int n)
{
	char p[PATH_MAX];
	REAL(writev);
	if (fd > 2)
		FAIL_IF("write", fd_path(fd, p, sizeof(p)));
	return real_writev(fd, iov, n);
}

ssize_t
pwrite(int fd, const void *buf, size_t len, off_t off)
{
	char p[PATH_MAX];
	REAL(pwrite);
	if (fd > 2)
		FAIL_IF("write", fd_path(fd, p, sizeof(p)));
	return real_pwrite(fd, buf, len, off);
}

int
fsync(int fd)
{
	char p[PATH_MAX];
	REAL(fsync);
	FAIL_IF("fsync", fd_path(fd, p, sizeof(p)));
	return real_fsync(fd);
}

int
syncfs(int fd)
{
	char p[PATH_MAX];
	REAL(syncfs);
	FAIL_IF("syncfs", fd_path(fd, p, sizeof(p)));
	return real_syncfs(fd);
}

int
fdatasync(int fd)
{
	char p[PATH_MAX];
	REAL(fdatasync);
	FAIL_IF("fdatasync", fd_path(fd, p, sizeof(p)));
	return real_fdatasync(fd);
}

static mode_t
open_mode(int flags, va_list ap)
{
	return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

#define OPEN_WRAPPER(name)                                                                         \
	int name(const char *path, int flags, ...)                                                 \
	{                                                                                          \
		char p[PATH_MAX];                                                                  \
		va_list ap;                                                                        \
		va_start(ap, flags);                                                               \
		mode_t mode = open_mode(flags, ap);                                                \
		va_end(ap);                                                                        \
		REAL(name);                                                                        \
		FAIL_IF("open", at_path(AT_FDCWD, path, p, sizeof(p)));                            \
		return real_##name(path, flags, mode);                                             \
	}

#define OPENAT_WRAPPER(name)                                                                       \
	int name(int dirfd, const char *path, int flags, ...)                                      \
	{                                                                                          \
		char p[PATH_MAX];                                                                  \
		va_list ap;                                                                        \
		va_start(ap, flags);                                                               \
		mode_t mode = open_mode(flags, ap);                                                \
		va_end(ap);                                                                        \
		REAL(name);                                                                        \
		FAIL_IF("open", at_path(dirfd, path, p, sizeof(p)));                               \
		return real_##name(dirfd, path, flags, mode);                                      \
	}

OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)
OPENAT_WRAPPER(openat)
OPENAT_WRAPPER(openat64)

int
creat(const char *path, mode_t mode)
{
	char p[PATH_MAX];
	REAL(creat);
	FAIL_IF("open", at_path(AT_FDCWD, path, p, sizeof(p)));
	return real_creat(path, mode);
}

int
mkdir(const char *path, mode_t mode)
{
	char p[PATH_MAX];
	REAL(mkdir);
	FAIL_IF("mkdir", at_path(AT_FDCWD, path, p, sizeof(p)));
	return real_mkdir(path, mode);
}

int
mkdirat(int dirfd, const char *path, mode_t mode)
{
	char p[PATH_MAX];
	REAL(mkdirat);
	FAIL_IF("mkdir", at_path(dirfd, path, p, sizeof(p)));
	return real_mkdirat(dirfd, path, mode);
}

int
renameat2(int olddirfd, const char *old, int newdirfd, const char *new, unsigned flags)
{
	char p[PATH_MAX], q[PATH_MAX];
	REAL(renameat2);
	FAIL_IF2("rename", at_path(olddirfd, old, p, sizeof(p)),
		 at_path(newdirfd, new, q, sizeof(q)));
	return real_renameat2(olddirfd, old, newdirfd, new, flags);
}

int
renameat(int olddirfd, const char *old, int newdirfd, const char *new)
{
	char p[PATH_MAX], q[PATH_MAX];
	REAL(renameat);
	FAIL_IF2("rename", at_path(olddirfd, old, p, sizeof(p)),
		 at_path(newdirfd, new, q, sizeof(q)));
	return real_renameat(olddirfd, old, newdirfd, new);
}

int
rename(const char *old, const char *new)
{
	char p[PATH_MAX], q[PATH_MAX];
	REAL(rename);
	FAIL_IF2("rename", at_path(AT_FDCWD, old, p, sizeof(p)),
		 at_path(AT_FDCWD, new, q, sizeof(q)));
	return real_rename(old, new);
}
