/*
 * store — message folders staged, fsync'd and renamed into place, and the
 * per-configuration UIDL state. Every durable write is: write in a temporary
 * place, fsync the file, rename, fsync the directory.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/sha.h>

#include "popfetchd/log.h"
#include "popfetchd/pop3_parse.h"
#include "popfetchd/store.h"
#include "popfetchd/util.h"

#define STATE_MAGIC "popfetchd-uidl 1"

/* A set of strings (open addressing, linear probing). */
struct strset {
	char **slots;
	size_t cap, n;
};

struct store {
	char *id;
	char *save_dir;	  /* NULL: nothing kept */
	char *state_dir;  /* state_directory/ID */
	char *stage_dir;  /* save_dir/.tmp/ID, or state_dir/tmp */
	char *state_path; /* state_dir/uidl */
	char binding[2 * SHA256_DIGEST_LENGTH + 1];
	int lock_fd;
	int save_fd;  /* save_dir, kept open for its fsyncs */
	long pid;     /* in staging names */
	int state_fd; /* O_APPEND, or -1 until the first record */
	struct strset uids;
	bool rewrite; /* an append failed half-way: rewrite before the next */
	bool sync_per_file;
	unsigned serial;
	struct store_msg **batch; /* sealed, not yet durable: store_commit */
	size_t nbatch, capbatch;
	unsigned long long batch_bytes;
	char error[512];
};

struct store_msg {
	struct store *st;
	char *uid;
	char *name; /* folder name */
	time_t received;
	char *stage; /* staging folder's name in stage_dir */
	char *path;  /* staging folder */
	char *eml;   /* staging folder/message.eml */
	int dirfd;
	int fd;	    /* message.eml */
	char *wbuf; /* what is not written to it yet: one write per STORE_WBUF */
	size_t wlen;
	unsigned long long size;
	/* a record naming the staging folder may be on disk: from then on only
	 * the rename, or the next store_open once it has settled that record,
	 * may remove the staging folder (its absence means "renamed") */
	bool recorded;
};

static int append_lines(struct store *st, const char *lines, size_t len);
static int record_line(struct store *st, const char *uid, const char *stage, char *line,
		       size_t size);

static uint64_t
strhash(const char *s)
{
	uint64_t h = 1469598103934665603ULL;

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
}

static bool
strset_has(const struct strset *set, const char *s)
{
	if (set->cap == 0)
		return false;
	for (size_t i = strhash(s) & (set->cap - 1);; i = (i + 1) & (set->cap - 1)) {
		if (set->slots[i] == NULL)
			return false;
		if (strcmp(set->slots[i], s) == 0)
			return true;
	}
}

static void strset_add(struct strset *set, const char *s);

static void
strset_grow(struct strset *set)
{
	struct strset bigger = {.cap = set->cap ? 2 * set->cap : 64};

	bigger.slots = xcalloc(bigger.cap, sizeof(char *));
	for (size_t i = 0; i < set->cap; i++)
		if (set->slots[i] != NULL) {
			size_t j = strhash(set->slots[i]) & (bigger.cap - 1);
			while (bigger.slots[j] != NULL)
				j = (j + 1) & (bigger.cap - 1);
			bigger.slots[j] = set->slots[i];
		}
	bigger.n = set->n;
	free(set->slots);
	*set = bigger;
}

static void
strset_add(struct strset *set, const char *s)
{
	size_t i;

	if (strset_has(set, s))
		return;
	if ((set->n + 1) * 2 > set->cap)
		strset_grow(set);
	for (i = strhash(s) & (set->cap - 1); set->slots[i] != NULL; i = (i + 1) & (set->cap - 1))
		;
	set->slots[i] = xstrdup(s);
	set->n++;
}

static void
strset_clear(struct strset *set)
{
	for (size_t i = 0; i < set->cap; i++)
		free(set->slots[i]);
	free(set->slots);
	memset(set, 0, sizeof(*set));
}

static int seterr(struct store *st, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int
seterr(struct store *st, int err, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(st->error, sizeof(st->error), fmt, ap);
	va_end(ap);
	if (n >= 0 && (size_t)n < sizeof(st->error))
		snprintf(st->error + n, sizeof(st->error) - (size_t)n, ": %s", strerror(err));
	return -err;
}

/* Hex SHA-256 of a followed by b. */
static void
sha256_hex(const void *a, size_t alen, const void *b, size_t blen, char *hex)
{
	unsigned char md[SHA256_DIGEST_LENGTH];
	EVP_MD_CTX *c = EVP_MD_CTX_new();

	if (c == NULL || EVP_DigestInit_ex(c, EVP_sha256(), NULL) != 1 ||
	    EVP_DigestUpdate(c, a, alen) != 1 || EVP_DigestUpdate(c, b, blen) != 1 ||
	    EVP_DigestFinal_ex(c, md, NULL) != 1)
		abort();
	EVP_MD_CTX_free(c);
	util_hex(md, sizeof(md), hex);
}

const char *
store_error(const struct store *st)
{
	return st->error;
}

void
store_folder_name(const char *id, const char *uid, time_t received, char *out, size_t size)
{
	char hex[2 * SHA256_DIGEST_LENGTH + 1];
	char when[32];
	struct tm tm;

	/* with its NUL: ID "\0" UIDL */
	sha256_hex(id, strlen(id) + 1, uid, strlen(uid), hex);
	gmtime_r(&received, &tm);
	strftime(when, sizeof(when), "%Y%m%dT%H%M%SZ", &tm);
	snprintf(out, size, "%s-%.12s", when, hex);
}

/* Remove everything inside the directory dfd (not following symlinks). */
static int
remove_contents(int dfd, int depth)
{
	DIR *d;
	struct dirent *e;
	int r = 0;

	if (depth > 8)
		return -ELOOP;
	d = fdopendir(dfd);
	if (d == NULL) {
		close(dfd);
		return -errno;
	}
	while ((e = readdir(d)) != NULL) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		if (unlinkat(dirfd(d), e->d_name, 0) == 0)
			continue;
		if (errno != EISDIR && errno != EPERM) {
			r = -errno;
			continue;
		}
		int sub = openat(dirfd(d), e->d_name,
				 O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (sub < 0) {
			r = -errno;
			continue;
		}
		int rr = remove_contents(sub, depth + 1);
		if (rr < 0)
			r = rr;
		if (unlinkat(dirfd(d), e->d_name, AT_REMOVEDIR) < 0)
			r = -errno;
	}
	closedir(d);
	return r;
}

static int
remove_tree(const char *path)
{
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	int r;

	if (fd < 0)
		return errno == ENOENT ? 0 : -errno;
	r = remove_contents(fd, 0);
	if (rmdir(path) < 0 && r == 0)
		r = -errno;
	return r;
}

static void
compute_binding(struct store *st, const char *server, const char *user)
{
	sha256_hex(server, strlen(server) + 1, user, strlen(user) + 1, st->binding);
}

static bool
valid_uid(const char *s, size_t len)
{
	if (len == 0 || len > POP3_UIDL_MAX)
		return false;
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e)
			return false;
	return true;
}

/* Write the whole state anew: temporary file, fsync, rename, fsync dir. */
static int
write_state(struct store *st, const char *const *uids, size_t n)
{
	char *tmp = xasprintf("%s.tmp", st->state_path);
	FILE *f;
	int fd, r = 0;

	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (fd < 0) {
		r = seterr(st, errno, "cannot write %s", tmp);
		free(tmp);
		return r;
	}
	f = fdopen(fd, "w");
	if (f == NULL)
		abort();
	fprintf(f, "%s %s\n", STATE_MAGIC, st->binding);
	for (size_t i = 0; i < n; i++)
		fprintf(f, "%s\n", uids[i]);
	if (fflush(f) != 0 || fsync(fd) < 0)
		r = seterr(st, errno, "cannot write %s", tmp);
	if (fclose(f) != 0 && r == 0)
		r = seterr(st, errno, "cannot write %s", tmp);
	if (r == 0 && rename(tmp, st->state_path) < 0)
		r = seterr(st, errno, "cannot rename %s", tmp);
	if (r == 0 && util_fsync_dir(st->state_dir) < 0)
		r = seterr(st, errno, "cannot fsync %s", st->state_dir);
	if (r < 0)
		unlink(tmp);
	free(tmp);
	if (r == 0 && st->state_fd >= 0) {
		close(st->state_fd);
		st->state_fd = -1;
	}
	return r;
}

/* Rewrite the state from the set in memory. */
static int
rewrite_state(struct store *st)
{
	const char **all = xcalloc(st->uids.n, sizeof(char *));
	size_t n = 0;
	int r;

	for (size_t i = 0; i < st->uids.cap; i++)
		if (st->uids.slots[i] != NULL)
			all[n++] = st->uids.slots[i];
	r = write_state(st, all, n);
	free(all);
	if (r == 0)
		st->rewrite = false;
	return r;
}

/* A staging folder's name as we make them: NAME.PID.SERIAL */
static bool
valid_stage(const char *s)
{
	if (*s == '\0' || *s == '.' || strlen(s) > 96)
		return false;
	for (; *s; s++)
		if (!(isalnum((unsigned char)*s) || *s == '.' || *s == '-'))
			return false;
	return true;
}

/*
 * One record line: "UIDL" (received), or "UIDL STAGE" (written just before
 * the folder STAGE was renamed into place: received if the staging folder
 * is gone, since only the rename removes it). Returns 1 when received, 0
 * when the rename never happened, -1 when the line is damaged.
 */
static int
parse_record(struct store *st, char *line, size_t len)
{
	char *sp = memchr(line, ' ', len), *path;
	struct stat sb;
	int r;

	if (sp == NULL)
		return valid_uid(line, len) ? 1 : -1;
	*sp = '\0';
	if (!valid_uid(line, (size_t)(sp - line)) || !valid_stage(sp + 1))
		return -1;
	path = xasprintf("%s/%s", st->stage_dir, sp + 1);
	r = lstat(path, &sb) == 0 ? 0 : 1;
	free(path);
	return r;
}

/* "popfetchd-uidl 1 " and a binding: a state of ours, perhaps of another
 * server or user. Anything else in the first line is damage. */
static bool
is_header(const char *line)
{
	size_t n = strlen(STATE_MAGIC);

	if (strncmp(line, STATE_MAGIC " ", n + 1) != 0 ||
	    strlen(line + n + 1) != 2 * SHA256_DIGEST_LENGTH)
		return false;
	for (const char *p = line + n + 1; *p; p++)
		if (!isxdigit((unsigned char)*p) || isupper((unsigned char)*p))
			return false;
	return true;
}

/*
 * Read the state. Anything odd (another server or user, a damaged header,
 * a torn last line, invalid lines) is reported, kept where sound, and the
 * file rewritten clean: at worst some mail is downloaded again, never lost.
 * Records of folders whose rename is settled by now are rewritten as
 * plain records, before the staging folders are cleaned.
 */
static int
load_state(struct store *st)
{
	FILE *f = fopen(st->state_path, "re");
	char *line = NULL;
	size_t cap = 0, bad = 0, unfinished = 0, renamed = 0;
	ssize_t len;
	bool rewrite = false, first = true;
	int r = 0;

	if (f == NULL) {
		if (errno == ENOENT)
			return write_state(st, NULL, 0);
		return seterr(st, errno, "cannot read the state %s", st->state_path);
	}
	while ((len = getline(&line, &cap, f)) >= 0) {
		bool complete = len > 0 && line[len - 1] == '\n';
		if (complete)
			line[--len] = '\0';
		if (first) {
			first = false;
			char want[128];
			snprintf(want, sizeof(want), "%s %s", STATE_MAGIC, st->binding);
			if (!complete || strcmp(line, want) != 0) {
				if (complete && is_header(line))
					log_notice(st->id,
						   "server or user changed: starting a fresh UIDL "
						   "state in %s",
						   st->state_path);
				else
					log_warning(st->id,
						    "the UIDL state %s is damaged (bad header): "
						    "starting afresh; mail left on the server "
						    "may be saved again",
						    st->state_path);
				strset_clear(&st->uids);
				rewrite = true;
				break;
			}
			continue;
		}
		if (!complete) {
			bad++; /* torn by a crash during the append */
			rewrite = true;
			continue;
		}
		bool staged = memchr(line, ' ', (size_t)len) != NULL;
		if (staged)
			rewrite = true; /* settle it now, before staging is cleaned */
		switch (parse_record(st, line, (size_t)len)) {
		case 1:
			strset_add(&st->uids, line);
			renamed += staged;
			break;
		case 0:
			unfinished++;
			break;
		default:
			bad++;
			rewrite = true;
			break;
		}
	}
	if (ferror(f))
		r = seterr(st, errno, "cannot read the state %s", st->state_path);
	free(line);
	fclose(f);
	if (r < 0)
		return r;
	if (first) {
		/* never written so: every state starts with its header line */
		log_warning(st->id,
			    "the UIDL state %s is empty (truncated): starting afresh; mail left "
			    "on the server may be saved again",
			    st->state_path);
		rewrite = true;
	}
	if (bad > 0)
		log_warning(st->id,
			    "the UIDL state %s has %zu damaged line(s), ignored; the messages "
			    "they named may be saved again",
			    st->state_path, bad);
	if (unfinished > 0)
		log_notice(st->id,
			   "%zu message(s) were not saved completely by an interrupted "
			   "session; they are received again",
			   unfinished);
	/*
	 * A folder renamed by a session that ended before its fsync of
	 * save_directory succeeded (killed, or the fsync failed) is visible but
	 * perhaps not durable, and once its record is settled here it is
	 * deleted from the server. So save_directory is fsync'd first; should
	 * that fail, the records stay as they are and nothing is deleted.
	 * (A save_directory that is gone has nothing left to make durable.)
	 */
	if (renamed > 0 && st->save_dir != NULL && (r = util_fsync_dir(st->save_dir)) < 0 &&
	    r != -ENOENT)
		return seterr(st, -r, "cannot fsync %s", st->save_dir);
	return rewrite ? rewrite_state(st) : 0;
}

static int
take_lock(struct store *st)
{
	char *path = xasprintf("%s/lock", st->state_dir);

	st->lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (st->lock_fd < 0) {
		int r = seterr(st, errno, "cannot open the lock %s", path);
		free(path);
		return r;
	}
	if (flock(st->lock_fd, LOCK_EX | LOCK_NB) < 0) {
		int e = errno;
		snprintf(st->error, sizeof(st->error),
			 "another popfetchd process is working on this configuration (lock %s)",
			 path);
		free(path);
		return e == EWOULDBLOCK ? -EBUSY : -e;
	}
	free(path);
	return 0;
}

int
store_open(const struct store_params *p, struct store **ret, char *err, size_t errlen)
{
	struct store *st = xcalloc(1, sizeof(*st));
	int r;

	st->id = xstrdup(p->id);
	st->lock_fd = st->state_fd = st->save_fd = -1;
	st->pid = (long)getpid();
	st->state_dir = xasprintf("%s/%s", p->state_directory, p->id);
	st->state_path = xasprintf("%s/uidl", st->state_dir);
	compute_binding(st, p->server, p->user);
	if (p->save_directory != NULL) {
		st->save_dir = xstrdup(p->save_directory);
		st->stage_dir = xasprintf("%s/.tmp/%s", p->save_directory, p->id);
	} else {
		st->stage_dir = xasprintf("%s/tmp", st->state_dir);
	}

	if ((r = util_mkdir_p(st->state_dir, 0700)) < 0) {
		seterr(st, -r, "cannot create the state directory %s", st->state_dir);
		goto fail;
	}
	if ((r = take_lock(st)) < 0)
		goto fail;
	/* settles the records of an interrupted session by what is staged */
	if ((r = load_state(st)) < 0)
		goto fail;
	/* a session that died left its staging behind: nobody else uses it */
	if ((r = remove_tree(st->stage_dir)) < 0) {
		seterr(st, -r, "cannot remove stale staging %s", st->stage_dir);
		goto fail;
	}
	/* the consumer of the folders may be a group: folders 0750, files 0640 */
	if (st->save_dir != NULL && (r = util_mkdir_p(st->save_dir, 0750)) < 0) {
		seterr(st, -r, "cannot create the save directory %s", st->save_dir);
		goto fail;
	}
	if ((r = util_mkdir_p(st->stage_dir, 0700)) < 0) {
		seterr(st, -r, "cannot create %s", st->stage_dir);
		goto fail;
	}
	if (st->save_dir != NULL &&
	    (st->save_fd = open(st->save_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
		r = seterr(st, errno, "cannot open the save directory %s", st->save_dir);
		goto fail;
	}
	/* syncfs does not reach a FUSE daemon; an fsync does (FUSE_FSYNC) */
	struct statfs sfs;
	st->sync_per_file =
		p->sync_per_file || (st->save_fd >= 0 && fstatfs(st->save_fd, &sfs) == 0 &&
				     sfs.f_type == 0x65735546 /* FUSE_SUPER_MAGIC */);
	*ret = st;
	return 0;
fail:
	snprintf(err, errlen, "%s", st->error);
	store_close(st);
	return r;
}

void
store_close(struct store *st)
{
	if (st == NULL)
		return;
	store_discard(st);
	free(st->batch);
	if (st->state_fd >= 0)
		close(st->state_fd);
	if (st->lock_fd >= 0)
		close(st->lock_fd);
	if (st->save_fd >= 0)
		close(st->save_fd);
	strset_clear(&st->uids);
	free(st->id);
	free(st->save_dir);
	free(st->state_dir);
	free(st->stage_dir);
	free(st->state_path);
	free(st);
}

bool
store_has(struct store *st, const char *uid)
{
	return strset_has(&st->uids, uid);
}

size_t
store_count(const struct store *st)
{
	return st->uids.n;
}

int
store_msg_begin(struct store *st, const char *uid, time_t received, struct store_msg **ret)
{
	struct store_msg *m = xcalloc(1, sizeof(*m));
	char name[64];

	store_folder_name(st->id, uid, received, name, sizeof(name));
	m->st = st;
	m->fd = m->dirfd = -1;
	m->uid = xstrdup(uid);
	m->name = xstrdup(name);
	m->received = received;
	m->stage = xasprintf("%s.%ld.%u", name, st->pid, st->serial++);
	m->path = xasprintf("%s/%s", st->stage_dir, m->stage);
	m->eml = xasprintf("%s/message.eml", m->path);
	if (mkdir(m->path, 0750) < 0) {
		int r = seterr(st, errno, "cannot create %s", m->path);
		store_msg_abort(m);
		return r;
	}
	m->dirfd = open(m->path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (m->dirfd >= 0)
		m->fd = openat(m->dirfd, "message.eml",
			       O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
	if (m->fd < 0) {
		int r = seterr(st, errno, "cannot create %s", m->eml);
		store_msg_abort(m);
		return r;
	}
	*ret = m;
	return 0;
}

void
store_msg_set_uid(struct store_msg *m, const char *uid)
{
	char name[64];

	store_folder_name(m->st->id, uid, m->received, name, sizeof(name));
	free(m->uid);
	free(m->name);
	m->uid = xstrdup(uid);
	m->name = xstrdup(name);
}

/* message.eml is written in pieces of this size (the network gives a few
 * KiB at a time: a write each would be several system calls per message). */
#define STORE_WBUF (64 * 1024)

static int
flush_eml(struct store_msg *m)
{
	int r;

	if (m->wlen == 0)
		return 0;
	r = util_write_all(m->fd, m->wbuf, m->wlen);
	m->wlen = 0;
	if (r < 0)
		return seterr(m->st, -r, "cannot write %s", m->eml);
	return 0;
}

int
store_msg_write(struct store_msg *m, const void *buf, size_t len)
{
	int r;

	if (m->wlen + len > STORE_WBUF && (r = flush_eml(m)) < 0)
		return r;
	m->size += len;
	if (len >= STORE_WBUF) {
		if ((r = util_write_all(m->fd, buf, len)) < 0)
			return seterr(m->st, -r, "cannot write %s", m->eml);
		return 0;
	}
	if (m->wbuf == NULL)
		m->wbuf = xmalloc(STORE_WBUF);
	memcpy(m->wbuf + m->wlen, buf, len);
	m->wlen += len;
	return 0;
}

const char *
store_msg_eml_path(const struct store_msg *m)
{
	return m->eml;
}

int
store_msg_dirfd(const struct store_msg *m)
{
	return m->dirfd;
}

int
store_msg_finish_eml(struct store_msg *m, unsigned long long *ret_size)
{
	/* no fsync: the folder is made durable as a whole by store_commit */
	if (m->fd >= 0) {
		int r = flush_eml(m);
		if (close(m->fd) < 0 && r == 0)
			r = seterr(m->st, errno, "cannot write %s", m->eml);
		m->fd = -1;
		free(m->wbuf);
		m->wbuf = NULL;
		if (r < 0)
			return r;
	}
	if (ret_size != NULL)
		*ret_size = m->size;
	return 0;
}

int
store_msg_add_file(struct store_msg *m, const char *name, const void *data, size_t len)
{
	int fd, r;

	fd = openat(m->dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
	if (fd < 0)
		return seterr(m->st, errno, "cannot create %s/%s", m->path, name);
	r = util_write_all(fd, data, len);
	if (close(fd) < 0 && r == 0)
		r = -errno;
	if (r < 0)
		return seterr(m->st, -r, "cannot write %s/%s", m->path, name);
	return 0;
}

/* Rename the staged folder into save_dir under its name, never replacing
 * anything: a taken name gets "-2", "-3", ... */
static int
rename_into_place(struct store_msg *m, char **ret_folder)
{
	struct store *st = m->st;

	for (unsigned i = 1; i < 1000; i++) {
		char *dst = i == 1 ? xasprintf("%s/%s", st->save_dir, m->name)
				   : xasprintf("%s/%s-%u", st->save_dir, m->name, i);
		if (renameat2(AT_FDCWD, m->path, AT_FDCWD, dst, RENAME_NOREPLACE) == 0) {
			*ret_folder = dst;
			return 0;
		}
		int e = errno;
		free(dst);
		if (e != EEXIST && e != ENOTEMPTY)
			return seterr(st, e, "cannot rename %s into %s", m->path, st->save_dir);
	}
	return seterr(st, EEXIST, "cannot rename %s into %s", m->path, st->save_dir);
}

int
store_msg_seal(struct store_msg *m, bool keep_eml)
{
	struct store *st = m->st;
	int r;

	if ((r = store_msg_finish_eml(m, NULL)) < 0) {
		store_msg_abort(m);
		return r;
	}
	if (st->save_dir != NULL && !keep_eml && unlinkat(m->dirfd, "message.eml", 0) < 0) {
		r = seterr(st, errno, "cannot remove %s", m->eml);
		store_msg_abort(m);
		return r;
	}
	close(m->dirfd);
	m->dirfd = -1;
	if (st->nbatch == st->capbatch) {
		st->capbatch = st->capbatch ? 2 * st->capbatch : 16;
		st->batch = xrealloc(st->batch, st->capbatch * sizeof(*st->batch));
	}
	st->batch[st->nbatch++] = m;
	st->batch_bytes += m->size;
	return 0;
}

size_t
store_pending(const struct store *st, unsigned long long *ret_bytes)
{
	if (ret_bytes != NULL)
		*ret_bytes = st->batch_bytes;
	return st->nbatch;
}

void
store_discard(struct store *st)
{
	for (size_t i = 0; i < st->nbatch; i++)
		store_msg_abort(st->batch[i]);
	st->nbatch = 0;
	st->batch_bytes = 0;
}

/* fsync every file and folder under the directory dfd (closed here). */
static int
sync_tree(int dfd, int depth)
{
	DIR *d;
	struct dirent *e;
	int r = 0;

	if (depth > 8) {
		close(dfd);
		return -ELOOP;
	}
	if ((d = fdopendir(dfd)) == NULL) {
		close(dfd);
		return -errno;
	}
	while (r == 0 && (e = readdir(d)) != NULL) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		struct stat sb;
		if (fd < 0 || fstat(fd, &sb) < 0) {
			r = -errno;
			if (fd >= 0)
				close(fd);
			break;
		}
		if (S_ISDIR(sb.st_mode)) {
			r = sync_tree(fd, depth + 1);
			continue;
		}
		if (fsync(fd) < 0)
			r = -errno;
		close(fd);
	}
	if (r == 0 && fsync(dirfd(d)) < 0)
		r = -errno;
	closedir(d);
	return r;
}

/* The batch's files and folders on disk: one syncfs, or one fsync each. */
static int
sync_batch(struct store *st)
{
	if (!st->sync_per_file)
		return syncfs(st->save_fd) < 0 ? -errno : 0;
	for (size_t i = 0; i < st->nbatch; i++) {
		int fd = open(st->batch[i]->path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		int r = fd < 0 ? -errno : sync_tree(fd, 0);
		if (r < 0)
			return r;
	}
	return util_fsync_dir(st->stage_dir);
}

/*
 * Group commit (DESIGN.md §4): the order of one message's commit, once for
 * the whole batch.
 *  1. syncfs: every file and folder of the batch is on disk (one flush of
 *     the file system instead of one fsync per file, per folder);
 *  2. the batch's records, each naming its staged folder, appended in one
 *     write and one fdatasync;
 *  3. the renames into save_directory;
 *  4. one fsync of save_directory.
 * Only then is a message committed, and may its DELE go out. A process that
 * dies anywhere in between leaves records that the next store_open settles
 * by what is still staged.
 */
int
store_commit(struct store *st, store_commit_cb cb, void *arg)
{
	size_t n = st->nbatch, renamed = 0, len = 0;
	char **folders = NULL, *lines = NULL;
	int r = 0;

	if (n == 0)
		return 0;
	if (st->save_dir != NULL && (r = sync_batch(st)) < 0) {
		r = seterr(st, -r, "cannot make %zu message(s) durable (%s of %s)", n,
			   st->sync_per_file ? "fsync" : "syncfs", st->save_dir);
		goto out;
	}
	lines = xmalloc(n * (POP3_UIDL_MAX + 128));
	for (size_t i = 0; i < n; i++) {
		struct store_msg *m = st->batch[i];
		int k = record_line(st, m->uid, st->save_dir ? m->stage : NULL, lines + len,
				    POP3_UIDL_MAX + 128);
		if (k < 0) {
			r = k;
			goto out;
		}
		len += (size_t)k;
	}
	/* even a failed append may have left the lines on disk (a write that
	 * went through, then a failed fdatasync and a failed cut back): from
	 * here on a failure keeps the staging folders, whose presence makes
	 * those records void */
	for (size_t i = 0; i < n; i++)
		st->batch[i]->recorded = st->save_dir != NULL;
	if ((r = append_lines(st, lines, len)) < 0)
		goto out;
	folders = xcalloc(n, sizeof(char *));
	if (st->save_dir == NULL) {
		renamed = n; /* nothing is kept: the records are all that remains */
		goto committed;
	}
	for (; renamed < n; renamed++) {
		struct store_msg *m = st->batch[renamed];
		if ((r = rename_into_place(m, &folders[renamed])) < 0)
			break; /* its record is void: the staging folder stays until cleaned */
		free(m->path); /* renamed: nothing left to remove */
		m->path = NULL;
	}
	if (renamed > 0 && fsync(st->save_fd) < 0) {
		/* visible but perhaps not durable: not received as far as the
		 * server is concerned, so no DELE; the records settle it later */
		r = seterr(st, errno, "cannot fsync %s", st->save_dir);
		for (size_t i = 0; i < renamed; i++)
			free(folders[i]);
		renamed = 0;
	}
committed:
	for (size_t i = 0; i < renamed; i++) {
		struct store_msg *m = st->batch[i];
		strset_add(&st->uids, m->uid);
		cb(arg, m->uid, folders[i], m->size); /* takes the folder */
	}
out:
	free(folders);
	free(lines);
	store_discard(st);
	return r;
}

void
store_msg_abort(struct store_msg *m)
{
	if (m == NULL)
		return;
	if (m->fd >= 0)
		close(m->fd);
	free(m->wbuf);
	if (m->dirfd >= 0)
		close(m->dirfd);
	/* a recorded staging folder is left for store_open to settle, then clean */
	if (m->path != NULL && !m->recorded)
		remove_tree(m->path);
	free(m->uid);
	free(m->name);
	free(m->stage);
	free(m->path);
	free(m->eml);
	free(m);
}

/* "UIDL\n", or "UIDL STAGE\n": its length, or -errno. */
static int
record_line(struct store *st, const char *uid, const char *stage, char *line, size_t size)
{
	int n;

	if (!valid_uid(uid, strlen(uid)))
		return seterr(st, EINVAL, "invalid UIDL");
	n = stage ? snprintf(line, size, "%s %s\n", uid, stage) : snprintf(line, size, "%s\n", uid);
	if (n < 0 || (size_t)n >= size)
		return seterr(st, ENAMETOOLONG, "cannot record %s", uid);
	return n;
}

/*
 * Append record lines in one write and fdatasync them. A failed append is
 * cut back (or the file rewritten whole before the next one), so that a
 * torn line never joins the next record.
 */
static int
append_lines(struct store *st, const char *lines, size_t len)
{
	struct stat sb;
	int r;

	if (st->rewrite && (r = rewrite_state(st)) < 0)
		return r;
	if (st->state_fd < 0) {
		st->state_fd = open(st->state_path, O_WRONLY | O_APPEND | O_CLOEXEC | O_NOFOLLOW);
		if (st->state_fd < 0)
			return seterr(st, errno, "cannot open the state %s", st->state_path);
	}
	if (fstat(st->state_fd, &sb) < 0)
		return seterr(st, errno, "cannot stat the state %s", st->state_path);
	r = util_write_all(st->state_fd, lines, len);
	if (r == 0 && fdatasync(st->state_fd) < 0)
		r = -errno;
	if (r < 0) {
		if (ftruncate(st->state_fd, sb.st_size) < 0 || fdatasync(st->state_fd) < 0)
			st->rewrite = true;
		return seterr(st, -r, "cannot write the state %s", st->state_path);
	}
	return 0;
}

int
store_record(struct store *st, const char *uid)
{
	char line[POP3_UIDL_MAX + 128];
	int n = record_line(st, uid, NULL, line, sizeof(line)), r;

	if (n < 0)
		return n;
	r = append_lines(st, line, (size_t)n);
	if (r == 0)
		strset_add(&st->uids, uid);
	return r;
}

int
store_compact(struct store *st, const char *const *uids, size_t n)
{
	struct strset keep = {0};
	const char **list = xcalloc(n, sizeof(char *));
	size_t k = 0;
	int r;

	for (size_t i = 0; i < n; i++)
		if (strset_has(&st->uids, uids[i]) && !strset_has(&keep, uids[i])) {
			strset_add(&keep, uids[i]);
			list[k++] = uids[i];
		}
	if (k == st->uids.n) {
		/* nothing to drop */
		strset_clear(&keep);
		free(list);
		return 0;
	}
	r = write_state(st, list, k);
	free(list);
	if (r == 0) {
		strset_clear(&st->uids);
		st->uids = keep;
	} else {
		strset_clear(&keep);
	}
	return r;
}
