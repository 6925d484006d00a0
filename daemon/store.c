/*
 * store — message folders staged, fsync'd and renamed into place, and the
 * per-configuration UIDL state. Every durable write is: write in a temporary
 * place, fsync the file, rename, fsync the directory.
 */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
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
#include "popfetchd/store.h"
#include "popfetchd/util.h"

#define STATE_MAGIC "popfetchd-uidl 1"
/* A record line: a UIDL, a staging folder's and a folder's names, a
 * content key, the spaces and the newline (record_line) */
#define RECORD_MAX (STORE_KEY_MAX + 2 * 96 + 1 + 2 * SHA256_DIGEST_LENGTH + 4 + 1)

/* A set of strings (open addressing, linear probing), each with a value
 * (NULL or a string of its own). */
struct strset {
	char **slots;
	char **vals;
	size_t cap, n;
};

#define ERROR_MAX 512

/* Messages sealed, not yet durable: the store's own batch, or one taken
 * from it (store_batch_take) to be committed while the store goes on. */
struct store_batch {
	struct store *st;
	struct store_msg **msgs;
	size_t n, cap;
	unsigned long long bytes;
	size_t committed; /* the first ones: durable, remembered by store_batch_end */
	int r;		  /* store_batch_commit's result */
	char error[ERROR_MAX];
};

struct store {
	char *id;
	char *save_dir;	  /* NULL: nothing kept */
	char *state_dir;  /* state_directory/ID */
	char *stage_dir;  /* save_dir/.tmp/ID, or state_dir/tmp */
	char *state_path; /* state_dir/uidl */
	char binding[2 * SHA256_DIGEST_LENGTH + 1];
	int lock_fd;
	/* save_dir is opened once, by its path; the staging below it only
	 * through these, never by a path (see open_staging) */
	int save_fd;  /* save_dir, -1 when nothing is kept */
	int tmp_fd;   /* the staging's parent: save_dir/.tmp, or state_dir */
	int stage_fd; /* stage_dir */
	long pid;     /* in staging names */
	int state_fd; /* O_APPEND, or -1 until the first record */
	/* The state file and what decides how it is written (state_fd,
	 * rewrite, unsettled, doubt), and changes to uids and aliases: a commit
	 * on a worker appends records while the loop may record a key
	 * (store_record). Only the loop changes uids and aliases, so it reads
	 * them (store_has) without it. */
	pthread_mutex_t state_lock;
	/* the keys of the records (UIDLs, or content keys of messages without
	 * one), each with the content key recorded beside it or NULL */
	struct strset uids;
	/* those content keys: messages known by them too (store_has) */
	struct strset aliases;
	bool rewrite; /* an append failed half-way: rewrite before the next */
	/* records naming a rename were appended: rewritten as plain records
	 * once the renames are done (a consumer may take a folder away at
	 * once, and a record naming a folder that is not there is void) */
	bool unsettled;
	/* the record lines of messages recorded but not committed (a failed
	 * rename or fsync of save_dir): kept as they are by every rewrite, for
	 * the next store_open to settle */
	char *doubt;
	size_t ndoubt;
	bool sync_per_file;
	/* a batch was taken and has not ended (store_batch_end): its records
	 * may be in the state but not in uids yet (under state_lock) */
	bool committing;
	unsigned serial;
	struct store_batch batch; /* sealed, not yet durable: store_commit */
	char error[ERROR_MAX];
};

struct store_msg {
	struct store *st;
	char *uid;
	char *alias; /* its content key, recorded beside uid; or NULL */
	char *name;  /* folder name */
	time_t received;
	char *stage; /* staging folder's name in stage_dir */
	char *path;  /* staging folder, for messages; NULL once renamed */
	char *eml;   /* staging folder/message.eml, for messages */
	char *final; /* its name in save_dir, chosen before its record */
	int dirfd;
	bool made;    /* the staging folder exists (made when first needed) */
	int made_err; /* making it failed after its mkdir: -errno, again */
	dev_t dev;    /* the staging folder made, known again at the rename */
	ino_t ino;
	int fd; /* message.eml */
	/* what is not written to it yet; while the message is at most
	 * STORE_KEEP_MAX (kept), all of it, written at once when it ends and
	 * kept until it is sealed (store_msg_eml) */
	char *wbuf;
	size_t wlen, wcap;
	bool kept;
	unsigned long long size;
	/* a record naming the staging folder may be on disk: from then on only
	 * the rename, or the next store_open once it has settled that record,
	 * may remove the staging folder (its presence means "not renamed") */
	bool recorded;
	/* store_msg_close has run: only the batch's part of the seal is left */
	bool closed;
	/* the last error of this message's own files: a worker may write them
	 * while the loop uses the store (store_msg_close) */
	char error[ERROR_MAX];
};

static int append_lines(struct store *st, const char *lines, size_t len, char *error);
static int record_line(const char *uid, const char *alias, const struct store_msg *m, char *line,
		       size_t size, char *error);

static uint64_t
strhash(const char *s)
{
	uint64_t h = 1469598103934665603ULL;

	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
}

/* The slot of s, or of where it would go. */
static size_t
strset_slot(const struct strset *set, const char *s)
{
	size_t i = strhash(s) & (set->cap - 1);

	while (set->slots[i] != NULL && strcmp(set->slots[i], s) != 0)
		i = (i + 1) & (set->cap - 1);
	return i;
}

static bool
strset_has(const struct strset *set, const char *s)
{
	return set->cap != 0 && set->slots[strset_slot(set, s)] != NULL;
}

/* The value of s (NULL when it has none, or is not in the set). */
static const char *
strset_value(const struct strset *set, const char *s)
{
	return set->cap != 0 ? set->vals[strset_slot(set, s)] : NULL;
}

static void
strset_grow(struct strset *set)
{
	struct strset bigger = {.cap = set->cap ? 2 * set->cap : 64};

	bigger.slots = xcalloc(bigger.cap, sizeof(char *));
	bigger.vals = xcalloc(bigger.cap, sizeof(char *));
	for (size_t i = 0; i < set->cap; i++)
		if (set->slots[i] != NULL) {
			size_t j = strset_slot(&bigger, set->slots[i]);
			bigger.slots[j] = set->slots[i];
			bigger.vals[j] = set->vals[i];
		}
	bigger.n = set->n;
	free(set->slots);
	free(set->vals);
	*set = bigger;
}

/* Add s with the value val (may be NULL); s already there keeps its value,
 * or takes val if it had none. */
static void
strset_put(struct strset *set, const char *s, const char *val)
{
	size_t i;

	if ((set->n + 1) * 2 > set->cap)
		strset_grow(set);
	i = strset_slot(set, s);
	if (set->slots[i] == NULL) {
		set->slots[i] = xstrdup(s);
		set->n++;
	}
	if (set->vals[i] == NULL && val != NULL)
		set->vals[i] = xstrdup(val);
}

static void
strset_add(struct strset *set, const char *s)
{
	strset_put(set, s, NULL);
}

static void
strset_clear(struct strset *set)
{
	for (size_t i = 0; i < set->cap; i++) {
		free(set->slots[i]);
		free(set->vals[i]);
	}
	free(set->slots);
	free(set->vals);
	memset(set, 0, sizeof(*set));
}

/* The line of an error (fmt, then what err says) into buf: -err. */
static int
verror(char *buf, size_t size, int err, const char *fmt, va_list ap)
{
	int n = vsnprintf(buf, size, fmt, ap);

	if (n >= 0 && (size_t)n < size)
		snprintf(buf + n, size - (size_t)n, ": %s", strerror(err));
	return -err;
}

static int seterr(struct store *st, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int
seterr(struct store *st, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	verror(st->error, sizeof(st->error), err, fmt, ap);
	va_end(ap);
	return -err;
}

static int errat(char *error, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* An error into error (ERROR_MAX bytes): the store's, or a batch's that a
 * worker commits while the loop may set the store's. */
static int
errat(char *error, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	verror(error, ERROR_MAX, err, fmt, ap);
	va_end(ap);
	return -err;
}

static int msg_seterr(struct store_msg *m, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* An error of m's own files: in m, not in the store (see store_msg_close). */
static int
msg_seterr(struct store_msg *m, int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	verror(m->error, sizeof(m->error), err, fmt, ap);
	va_end(ap);
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

/*
 * visit(dir, name, depth) for every entry of the directory dfd (closed
 * here), depth levels below a message's folder: all of them, or up to the
 * first failure when stop is set. 0, or the last -errno.
 */
static int
walk(int dfd, int depth, int (*visit)(int dir, const char *name, int depth), bool stop)
{
	struct dirent *e;
	int r = 0;
	DIR *d = NULL;

	if (depth > 8)
		r = -ELOOP;
	else if ((d = fdopendir(dfd)) == NULL)
		r = -errno;
	if (d == NULL) {
		close(dfd);
		return r;
	}
	while ((r == 0 || !stop) && (e = readdir(d)) != NULL) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		int rr = visit(dirfd(d), e->d_name, depth);
		if (rr < 0)
			r = rr;
	}
	closedir(d);
	return r;
}

/* Remove name of dir, and all it holds when it is a folder (not following
 * symlinks). */
static int
remove_entry(int dir, const char *name, int depth)
{
	int r, sub;

	if (unlinkat(dir, name, 0) == 0)
		return 0;
	if (errno != EISDIR && errno != EPERM)
		return -errno;
	sub = openat(dir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (sub < 0)
		return -errno;
	r = walk(sub, depth + 1, remove_entry, false);
	if (unlinkat(dir, name, AT_REMOVEDIR) < 0)
		r = -errno;
	return r;
}

/* Remove everything inside the directory dfd (not following symlinks). */
static int
remove_contents(int dfd, int depth)
{
	return walk(dfd, depth, remove_entry, false);
}

/* Remove the entry name of the directory parent, a folder with all it holds
 * (a symlink is removed itself, never followed). */
static int
remove_at(int parent, const char *name)
{
	int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	int r;

	if (fd < 0) {
		if (errno == ENOENT)
			return 0;
		if (errno != ENOTDIR && errno != ELOOP)
			return -errno;
		return unlinkat(parent, name, 0) < 0 && errno != ENOENT ? -errno : 0;
	}
	r = remove_contents(fd, 0);
	if (unlinkat(parent, name, AT_REMOVEDIR) < 0 && r == 0)
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
	if (len == 0 || len > STORE_KEY_MAX)
		return false;
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e)
			return false;
	return true;
}

/*
 * A content key: "h" and the SHA-256 of the message's bytes in lowercase
 * hex (a message without a valid UIDL is known by it; one with a UIDL has
 * it recorded beside). Never the name of a staging folder, which has dots.
 */
static bool
is_content_key(const char *s)
{
	if (s[0] != 'h' || strlen(s + 1) != 2 * SHA256_DIGEST_LENGTH)
		return false;
	for (s++; *s; s++)
		if (!isxdigit((unsigned char)*s) || isupper((unsigned char)*s))
			return false;
	return true;
}

/* A record's key into the state in memory, with its content key or NULL
 * (on the loop, or while nothing else runs: state_lock). */
static void
remember(struct store *st, const char *uid, const char *alias)
{
	strset_put(&st->uids, uid, alias);
	if (alias != NULL)
		strset_add(&st->aliases, alias);
}

/* Write the whole state anew, the records of these keys in this order,
 * each with its content key in set (util_write_atomic, through
 * state_dir/uidl.tmp); the error into error. state_lock is held (or
 * nothing else runs). */
static int
write_state(struct store *st, const char *const *keys, size_t n, const struct strset *set,
	    char *error)
{
	char *tmp = xasprintf("%s.tmp", st->state_path), *text = NULL, why[PATH_MAX + 32];
	size_t len = 0;
	FILE *f = open_memstream(&text, &len);
	int r;

	if (f == NULL)
		abort();
	fprintf(f, "%s %s\n", STATE_MAGIC, st->binding);
	for (size_t i = 0; i < n; i++) {
		const char *alias = strset_value(set, keys[i]);
		fprintf(f, "%s%s%s\n", keys[i], alias ? " " : "", alias ? alias : "");
	}
	if (st->ndoubt > 0)
		fwrite(st->doubt, 1, st->ndoubt, f);
	if (fclose(f) != 0)
		abort();
	r = util_write_atomic(st->state_path, tmp, text, len, 0600, why, sizeof(why));
	if (r < 0)
		errat(error, -r, "%s", why);
	free(text);
	free(tmp);
	if (r == 0)
		st->unsettled = false;
	if (r == 0 && st->state_fd >= 0) {
		close(st->state_fd);
		st->state_fd = -1;
	}
	return r;
}

/* Rewrite the state from the set in memory (as write_state). */
static int
rewrite_state(struct store *st, char *error)
{
	const char **all = xcalloc(st->uids.n ? st->uids.n : 1, sizeof(char *));
	size_t n = 0;
	int r;

	for (size_t i = 0; i < st->uids.cap; i++)
		if (st->uids.slots[i] != NULL)
			all[n++] = st->uids.slots[i];
	r = write_state(st, all, n, &st->uids, error);
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

/* Is name a folder in save_dir holding its meta.json, as a rename of ours
 * leaves it? (Never following a symlink.) */
static bool
in_place(const struct store *st, const char *name)
{
	struct stat sb;
	bool ok;
	int fd;

	if (st->save_fd < 0)
		return false;
	fd = openat(st->save_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return false;
	ok = fstatat(fd, "meta.json", &sb, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(sb.st_mode);
	close(fd);
	return ok;
}

/* What a record line says, checked against the disk. */
enum record {
	REC_DAMAGED,
	REC_RECEIVED,	/* "UIDL", or "UIDL STAGE FINAL" with FINAL in place */
	REC_UNFINISHED, /* STAGE is still staged: the rename never happened */
	/* neither staged nor in place (the staging was cleaned, save_directory
	 * changed, a consumer took the folder), or a record of a version that
	 * did not name FINAL: nothing proves the message is on disk */
	REC_UNPROVEN,
};

/*
 * One record line: "KEY" (received), or "KEY STAGE FINAL", written just
 * before the staging folder STAGE was renamed to save_dir/FINAL. KEY is a
 * UIDL or a content key; either form may end in the content key of the
 * message saved under a UIDL ("KEY CONTENT", "KEY STAGE FINAL CONTENT"),
 * which counts as long as its record does. The line is cut into its fields
 * (line is then KEY); *alias is CONTENT or NULL, *staged whether it names
 * a rename.
 */
static enum record
parse_record(struct store *st, char *line, size_t len, const char **alias, bool *staged)
{
	char *field[4] = {line};
	size_t n = 1;
	struct stat sb;

	*alias = NULL;
	*staged = false;
	if (strlen(line) != len)
		return REC_DAMAGED;
	for (char *p = line; (p = strchr(p, ' ')) != NULL; n++) {
		if (n == 4)
			return REC_DAMAGED;
		*p++ = '\0';
		field[n] = p;
	}
	/* "KEY STAGE" (a version that did not name FINAL) has no content key:
	 * a staging folder's name has dots */
	if ((n == 2 || n == 4) && is_content_key(field[n - 1]))
		*alias = field[--n];
	if (!valid_uid(line, strlen(line)))
		return REC_DAMAGED;
	if (n == 1)
		return REC_RECEIVED;
	*staged = true;
	if (n == 4 || !valid_stage(field[1]) || (n == 3 && !valid_stage(field[2])))
		return REC_DAMAGED;
	if (fstatat(st->stage_fd, field[1], &sb, AT_SYMLINK_NOFOLLOW) == 0)
		return REC_UNFINISHED;
	return n == 3 && in_place(st, field[2]) ? REC_RECEIVED : REC_UNPROVEN;
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

/* What reading the state found. */
struct settled {
	size_t bad, unfinished, unproven, renamed;
	bool rewrite, empty;
};

/* The header line: false when the state is not this binding's. */
static bool
check_header(struct store *st, const char *line, bool complete)
{
	char want[128];

	snprintf(want, sizeof(want), "%s %s", STATE_MAGIC, st->binding);
	if (complete && strcmp(line, want) == 0)
		return true;
	if (complete && is_header(line))
		log_notice(st->id, "server or user changed: starting a fresh UIDL state in %s",
			   st->state_path);
	else
		log_warning(st->id,
			    "the UIDL state %s is damaged (bad header): starting afresh; mail "
			    "left on the server may be saved again",
			    st->state_path);
	return false;
}

/* Every line of the state into st->uids, settling the records of renames. */
static void
read_records(struct store *st, FILE *f, struct settled *s)
{
	char *line = NULL;
	size_t cap = 0;
	ssize_t len;

	s->empty = true;
	while ((len = getline(&line, &cap, f)) >= 0) {
		bool complete = len > 0 && line[len - 1] == '\n';
		if (complete)
			line[--len] = '\0';
		if (s->empty) {
			s->empty = false;
			if (check_header(st, line, complete))
				continue;
			strset_clear(&st->uids);
			strset_clear(&st->aliases);
			s->rewrite = true;
			break;
		}
		if (!complete) {
			s->bad++; /* torn by a crash during the append */
			s->rewrite = true;
			continue;
		}
		const char *alias;
		bool staged;
		enum record rec = parse_record(st, line, (size_t)len, &alias, &staged);
		if (staged)
			s->rewrite = true; /* settle it now, before staging is cleaned */
		switch (rec) {
		case REC_RECEIVED:
			remember(st, line, alias);
			s->renamed += staged;
			break;
		case REC_UNFINISHED:
			s->unfinished++;
			break;
		case REC_UNPROVEN:
			s->unproven++;
			break;
		case REC_DAMAGED:
			s->bad++;
			s->rewrite = true;
			break;
		}
	}
	free(line);
}

/*
 * Read the state. Anything odd (another server or user, a damaged header,
 * a torn last line, invalid lines) is reported, kept where sound, and the
 * file rewritten clean: at worst some mail is downloaded again, never lost.
 * Records of renames are settled by what is staged and what is in place,
 * and rewritten as plain records, before the staging folders are cleaned.
 */
static int
load_state(struct store *st)
{
	FILE *f = fopen(st->state_path, "re");
	struct settled s = {0};
	int r = 0;

	if (f == NULL) {
		if (errno == ENOENT)
			return write_state(st, NULL, 0, &st->uids, st->error);
		return seterr(st, errno, "cannot read the state %s", st->state_path);
	}
	read_records(st, f, &s);
	if (ferror(f))
		r = seterr(st, errno, "cannot read the state %s", st->state_path);
	fclose(f);
	if (r < 0)
		return r;
	if (s.empty) {
		/* never written so: every state starts with its header line */
		log_warning(st->id,
			    "the UIDL state %s is empty (truncated): starting afresh; mail left "
			    "on the server may be saved again",
			    st->state_path);
		s.rewrite = true;
	}
	if (s.bad > 0)
		log_warning(st->id,
			    "the UIDL state %s has %zu damaged line(s), ignored; the messages "
			    "they named may be saved again",
			    st->state_path, s.bad);
	if (s.unfinished > 0)
		log_notice(st->id,
			   "%zu message(s) were not saved completely by an interrupted "
			   "session; they are received again",
			   s.unfinished);
	if (s.unproven > 0)
		log_warning(st->id,
			    "%zu message(s) recorded by an interrupted session are neither "
			    "staged nor in %s; they are received again, not deleted",
			    s.unproven, st->save_dir ? st->save_dir : "a save directory");
	/*
	 * A folder renamed by a session that ended before its fsync of
	 * save_directory succeeded (killed, or the fsync failed) is visible but
	 * perhaps not durable, and once its record is settled here it is
	 * deleted from the server. So save_directory is fsync'd first; should
	 * that fail, the records stay as they are and nothing is deleted.
	 */
	if (s.renamed > 0 && fsync(st->save_fd) < 0)
		return seterr(st, errno, "cannot fsync %s", st->save_dir);
	return s.rewrite ? rewrite_state(st, st->error) : 0;
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

/*
 * Open (creating it) the directory name in parent, never following a
 * symlink: whoever can write save_directory could otherwise point the
 * staging, and what is removed in it, anywhere.
 */
static int
open_dir_at(struct store *st, int parent, const char *parent_path, const char *name, int *ret_fd)
{
	struct stat sb;
	int fd;

	if (mkdirat(parent, name, 0700) < 0 && errno != EEXIST)
		return seterr(st, errno, "cannot create %s/%s", parent_path, name);
	fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd >= 0) {
		*ret_fd = fd;
		return 0;
	}
	if ((errno == ENOTDIR || errno == ELOOP) &&
	    fstatat(parent, name, &sb, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(sb.st_mode)) {
		snprintf(st->error, sizeof(st->error),
			 "%s/%s is a symbolic link: popfetchd never follows one in its staging "
			 "(remove it)",
			 parent_path, name);
		return -ELOOP;
	}
	return seterr(st, errno, "cannot open %s/%s", parent_path, name);
}

/*
 * The staging directory, as file descriptors. save_directory itself is
 * opened by its path, once, following the symlinks an administrator may
 * have put in it (/srv/mail -> /data/mail); .tmp, .tmp/ID and everything
 * below are ours, used only relative to these descriptors.
 */
static int
open_staging(struct store *st)
{
	const char *parent = st->state_dir, *name = "tmp";
	char *tmp_path = NULL;
	int r;

	if (st->save_dir != NULL) {
		/* the consumer of the folders may be a group: folders 0750, files 0640 */
		if ((r = util_mkdir_p(st->save_dir, 0750)) < 0)
			return seterr(st, -r, "cannot create the save directory %s", st->save_dir);
		st->save_fd = open(st->save_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (st->save_fd < 0)
			return seterr(st, errno, "cannot open the save directory %s", st->save_dir);
		if ((r = open_dir_at(st, st->save_fd, st->save_dir, ".tmp", &st->tmp_fd)) < 0)
			return r;
		parent = tmp_path = xasprintf("%s/.tmp", st->save_dir);
		name = st->id;
	} else {
		st->tmp_fd = open(st->state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (st->tmp_fd < 0)
			return seterr(st, errno, "cannot open the state directory %s",
				      st->state_dir);
	}
	r = open_dir_at(st, st->tmp_fd, parent, name, &st->stage_fd);
	free(tmp_path);
	return r;
}

int
store_open(const struct store_params *p, struct store **ret, char *err, size_t errlen)
{
	struct store *st = xcalloc(1, sizeof(*st));
	struct statfs sfs;
	int r, fd;

	st->id = xstrdup(p->id);
	st->batch.st = st;
	if (pthread_mutex_init(&st->state_lock, NULL) != 0)
		abort();
	st->lock_fd = st->state_fd = st->save_fd = st->tmp_fd = st->stage_fd = -1;
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

	/* the group may read status.json there; uidl and lock are 0600 */
	if ((r = util_mkdir_p(st->state_dir, 0750)) < 0) {
		seterr(st, -r, "cannot create the state directory %s", st->state_dir);
		goto fail;
	}
	if ((r = take_lock(st)) < 0 || (r = open_staging(st)) < 0)
		goto fail;
	/* settles the records of an interrupted session by what is staged */
	if ((r = load_state(st)) < 0)
		goto fail;
	/* a session that died left its staging behind: nobody else uses it */
	fd = dup(st->stage_fd);
	if ((r = fd < 0 ? -errno : remove_contents(fd, 0)) < 0) {
		seterr(st, -r, "cannot remove stale staging in %s", st->stage_dir);
		goto fail;
	}
	/* syncfs does not reach a FUSE daemon; an fsync does (FUSE_FSYNC) */
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
	free(st->batch.msgs);
	pthread_mutex_lock(&st->state_lock);
	if (st->unsettled && rewrite_state(st, st->error) < 0)
		log_warning(st->id,
			    "%s; the state names folders of this session by their renames, "
			    "and one that a consumer takes away before the next poll counts as "
			    "not received: its message may be saved again",
			    st->error);
	pthread_mutex_unlock(&st->state_lock);
	/* the staging is empty unless a recorded folder waits to be settled:
	 * not left behind, while the lock still keeps others off it */
	if (st->stage_fd >= 0)
		unlinkat(st->tmp_fd, st->save_dir ? st->id : "tmp", AT_REMOVEDIR);
	if (st->state_fd >= 0)
		close(st->state_fd);
	if (st->lock_fd >= 0)
		close(st->lock_fd);
	if (st->save_fd >= 0)
		close(st->save_fd);
	if (st->tmp_fd >= 0)
		close(st->tmp_fd);
	if (st->stage_fd >= 0)
		close(st->stage_fd);
	strset_clear(&st->uids);
	strset_clear(&st->aliases);
	pthread_mutex_destroy(&st->state_lock);
	FREE_ALL(st->doubt, st->id, st->save_dir, st->state_dir, st->stage_dir, st->state_path, st);
}

bool
store_has(struct store *st, const char *uid)
{
	return strset_has(&st->uids, uid) || strset_has(&st->aliases, uid);
}

size_t
store_count(const struct store *st)
{
	return st->uids.n;
}

/*
 * The staging folder and its message.eml, made when first needed: when the
 * message is sealed (on a worker thread, off the loop, for all but the
 * largest), or when it grows past STORE_KEEP_MAX. 0 or -errno (the
 * message's error says why).
 */
static int
make_stage(struct store_msg *m)
{
	struct stat sb;

	if (m->made)
		return m->made_err;
	if (mkdirat(m->st->stage_fd, m->stage, 0750) < 0)
		return msg_seterr(m, errno, "cannot create %s", m->path);
	m->made = true;
	/* from here on, what is written goes where this descriptor is, even if
	 * the folder is moved or replaced by a symlink */
	m->dirfd =
		openat(m->st->stage_fd, m->stage, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (m->dirfd >= 0 && fstat(m->dirfd, &sb) == 0) {
		m->dev = sb.st_dev;
		m->ino = sb.st_ino;
		m->fd = openat(m->dirfd, "message.eml",
			       O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0640);
	}
	if (m->fd < 0)
		return m->made_err = msg_seterr(m, errno, "cannot create %s", m->eml);
	return 0;
}

int
store_msg_begin(struct store *st, const char *uid, time_t received, struct store_msg **ret)
{
	struct store_msg *m = xcalloc(1, sizeof(*m));
	char name[64];

	store_folder_name(st->id, uid, received, name, sizeof(name));
	m->st = st;
	m->fd = m->dirfd = -1;
	m->kept = true;
	m->uid = xstrdup(uid);
	m->name = xstrdup(name);
	m->received = received;
	m->stage = xasprintf("%s.%ld.%u", name, st->pid, st->serial++);
	m->path = xasprintf("%s/%s", st->stage_dir, m->stage);
	m->eml = xasprintf("%s/message.eml", m->path);
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

void
store_msg_set_content_key(struct store_msg *m, const char *key)
{
	free(m->alias);
	m->alias = is_content_key(key) && strcmp(key, m->uid) != 0 ? xstrdup(key) : NULL;
}

/* message.eml is written in pieces of this size (the network gives a few
 * KiB at a time: a write each would be several system calls per message). */
#define STORE_WBUF (64 * 1024)
/* A message up to this size stays in memory until it is sealed: written in
 * one piece, and parsed from these bytes instead of the file. Larger ones
 * are written in STORE_WBUF pieces as they come. */
#define STORE_KEEP_MAX (4 * 1024 * 1024)
/* its first buffer: doubled as it grows; most mail fits in a few */
#define STORE_KEEP_FIRST (16 * 1024)

static int
flush_eml(struct store_msg *m)
{
	int r;

	if (m->wlen == 0)
		return 0;
	r = util_write_all(m->fd, m->wbuf, m->wlen);
	m->wlen = 0;
	if (r < 0)
		return msg_seterr(m, -r, "cannot write %s", m->eml);
	return 0;
}

/* Room in wbuf for len more bytes of a kept message; false when the message
 * would grow beyond STORE_KEEP_MAX. */
static bool
keep_room(struct store_msg *m, size_t len)
{
	if (len > STORE_KEEP_MAX - m->wlen)
		return false;
	if (m->wlen + len > m->wcap) {
		size_t cap = m->wcap ? m->wcap : STORE_KEEP_FIRST;
		while (cap < m->wlen + len)
			cap *= 2;
		m->wcap = cap < STORE_KEEP_MAX ? cap : STORE_KEEP_MAX;
		m->wbuf = xrealloc(m->wbuf, m->wcap);
	}
	return true;
}

/* A kept message, written at once; wbuf stays. */
static int
write_kept(struct store_msg *m)
{
	int r = util_write_all(m->fd, m->wbuf, m->wlen);

	return r < 0 ? msg_seterr(m, -r, "cannot write %s", m->eml) : 0;
}

int
store_msg_write(struct store_msg *m, const void *buf, size_t len)
{
	int r;

	m->size += len;
	if (m->kept && keep_room(m, len)) {
		memcpy(m->wbuf + m->wlen, buf, len);
		m->wlen += len;
		return 0;
	}
	if (m->kept) { /* too large to keep: in pieces from here on */
		m->kept = false;
		if ((r = make_stage(m)) < 0 || (r = flush_eml(m)) < 0)
			return r;
		free(m->wbuf);
		m->wbuf = NULL;
		m->wcap = 0;
	}
	if (m->wlen + len > STORE_WBUF && (r = flush_eml(m)) < 0)
		return r;
	if (len >= STORE_WBUF) {
		if ((r = util_write_all(m->fd, buf, len)) < 0)
			return msg_seterr(m, -r, "cannot write %s", m->eml);
		return 0;
	}
	if (m->wbuf == NULL)
		m->wbuf = xmalloc(m->wcap = STORE_WBUF);
	memcpy(m->wbuf + m->wlen, buf, len);
	m->wlen += len;
	return 0;
}

const char *
store_msg_eml(const struct store_msg *m, size_t *ret_len)
{
	if (!m->made || m->fd >= 0 || !m->kept || m->wbuf == NULL)
		return NULL;
	*ret_len = m->wlen;
	return m->wbuf;
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
	int made = make_stage(m); /* 0 once made and open */

	if (made < 0)
		return made;
	if (m->fd >= 0) {
		int r = m->kept ? write_kept(m) : flush_eml(m);
		if (close(m->fd) < 0 && r == 0)
			r = msg_seterr(m, errno, "cannot write %s", m->eml);
		m->fd = -1;
		if (!m->kept) {
			free(m->wbuf);
			m->wbuf = NULL;
		}
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
		return msg_seterr(m, errno, "cannot create %s/%s", m->path, name);
	r = util_write_all(fd, data, len);
	if (close(fd) < 0 && r == 0)
		r = -errno;
	if (r < 0)
		return msg_seterr(m, -r, "cannot write %s/%s", m->path, name);
	return 0;
}

/* Is the name free in save_dir (not even a dangling symlink there), and
 * not taken by a message before this one in the batch? */
static bool
name_free(const struct store_batch *b, size_t upto, const char *name)
{
	struct stat sb;

	if (fstatat(b->st->save_fd, name, &sb, AT_SYMLINK_NOFOLLOW) == 0 || errno != ENOENT)
		return false;
	for (size_t i = 0; i < upto; i++)
		if (strcmp(b->msgs[i]->final, name) == 0)
			return false;
	return true;
}

/* The name in save_dir of the batch's message i, chosen before its record
 * names it: its own name, or, should that be taken, "-2", "-3", ... */
static int
choose_final(struct store_batch *b, size_t i)
{
	struct store_msg *m = b->msgs[i];

	for (unsigned k = 1; k < 1000; k++) {
		free(m->final);
		m->final = k == 1 ? xstrdup(m->name) : xasprintf("%s-%u", m->name, k);
		if (name_free(b, i, m->final))
			return 0;
	}
	return errat(b->error, EEXIST, "no free name for %s in %s", m->name, b->st->save_dir);
}

/*
 * Rename the staged folder to save_dir/final, never replacing anything: a
 * name taken since it was chosen is a failure (the record names it). The
 * staging entry must still be the folder made for it: not a symlink, not
 * another folder put in its place. The error into error.
 */
static int
rename_into_place(struct store_msg *m, char **ret_folder, char *error)
{
	struct store *st = m->st;
	struct stat sb;

	if (fstatat(st->stage_fd, m->stage, &sb, AT_SYMLINK_NOFOLLOW) < 0)
		return errat(error, errno, "cannot rename %s into %s", m->path, st->save_dir);
	if (S_ISLNK(sb.st_mode)) {
		snprintf(error, ERROR_MAX,
			 "%s is a symbolic link: popfetchd never follows one in its staging "
			 "(remove it)",
			 m->path);
		return -ELOOP;
	}
	if (sb.st_dev != m->dev || sb.st_ino != m->ino) {
		snprintf(error, ERROR_MAX,
			 "%s is not the folder popfetchd staged there: it was replaced", m->path);
		return -ESTALE;
	}
	if (renameat2(st->stage_fd, m->stage, st->save_fd, m->final, RENAME_NOREPLACE) < 0)
		return errat(error, errno, "cannot rename %s to %s/%s", m->path, st->save_dir,
			     m->final);
	*ret_folder = xasprintf("%s/%s", st->save_dir, m->final);
	return 0;
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
	if (m->made && m->path != NULL && !m->recorded)
		remove_at(m->st->stage_fd, m->stage);
	FREE_ALL(m->uid, m->alias, m->name, m->final, m->stage, m->path, m->eml, m);
}

int
store_msg_close(struct store_msg *m, bool keep_eml)
{
	int r;

	if (m->closed)
		return 0;
	if ((r = store_msg_finish_eml(m, NULL)) < 0)
		return r;
	if (m->st->save_dir != NULL && !keep_eml && unlinkat(m->dirfd, "message.eml", 0) < 0)
		return msg_seterr(m, errno, "cannot remove %s", m->eml);
	close(m->dirfd);
	m->dirfd = -1;
	free(m->wbuf);
	m->wbuf = NULL;
	m->closed = true;
	return 0;
}

const char *
store_msg_error(const struct store_msg *m)
{
	return m->error;
}

int
store_msg_seal(struct store_msg *m, bool keep_eml)
{
	struct store *st = m->st;
	struct store_batch *b = &st->batch;
	int r;

	if ((r = store_msg_close(m, keep_eml)) < 0) {
		snprintf(st->error, sizeof(st->error), "%s", m->error);
		store_msg_abort(m);
		return r;
	}
	if (b->n == b->cap) {
		b->cap = b->cap ? 2 * b->cap : 16;
		b->msgs = xrealloc(b->msgs, b->cap * sizeof(*b->msgs));
	}
	b->msgs[b->n++] = m;
	b->bytes += m->size;
	return 0;
}

size_t
store_pending(const struct store *st, unsigned long long *ret_bytes)
{
	if (ret_bytes != NULL)
		*ret_bytes = st->batch.bytes;
	return st->batch.n;
}

void
store_discard(struct store *st)
{
	for (size_t i = 0; i < st->batch.n; i++)
		store_msg_abort(st->batch.msgs[i]);
	st->batch.n = 0;
	st->batch.bytes = 0;
}

static int sync_tree(int dfd, int depth);

/* fsync name of dir, and all it holds when it is a folder. */
static int
sync_entry(int dir, const char *name, int depth)
{
	struct stat sb;
	int r = 0, fd = openat(dir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	if (fstat(fd, &sb) < 0)
		r = -errno;
	else if (S_ISDIR(sb.st_mode))
		return sync_tree(fd, depth + 1);
	else if (fsync(fd) < 0)
		r = -errno;
	close(fd);
	return r;
}

/* fsync the directory dfd (closed here) and every file and folder under it. */
static int
sync_tree(int dfd, int depth)
{
	if (fsync(dfd) < 0) {
		int r = -errno;
		close(dfd);
		return r;
	}
	return walk(dfd, depth, sync_entry, true);
}

/* The batch's files and folders on disk: one syncfs, or one fsync each. */
static int
sync_batch(const struct store_batch *b)
{
	const struct store *st = b->st;

	if (!st->sync_per_file)
		return syncfs(st->save_fd) < 0 ? -errno : 0;
	for (size_t i = 0; i < b->n; i++) {
		int fd = openat(st->stage_fd, b->msgs[i]->stage,
				O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		int r = fd < 0 ? -errno : sync_tree(fd, 0);
		if (r < 0)
			return r;
	}
	return fsync(st->stage_fd) < 0 ? -errno : 0;
}

/* The record of m, on disk perhaps, though m is not committed (state_lock
 * is held). */
static void
keep_in_doubt(struct store *st, const struct store_msg *m)
{
	char line[RECORD_MAX], error[ERROR_MAX];
	/* as it was written */
	int n = record_line(m->uid, m->alias, m, line, sizeof(line), error);

	if (n < 0)
		return;
	st->doubt = xrealloc(st->doubt, st->ndoubt + (size_t)n + 1);
	memcpy(st->doubt + st->ndoubt, line, (size_t)n + 1);
	st->ndoubt += (size_t)n;
}

struct store_batch *
store_batch_take(struct store *st)
{
	struct store_batch *b = xmalloc(sizeof(*b));

	*b = st->batch;
	b->committed = 0;
	b->r = 0;
	b->error[0] = '\0';
	st->batch = (struct store_batch){.st = st};
	pthread_mutex_lock(&st->state_lock);
	st->committing = true;
	pthread_mutex_unlock(&st->state_lock);
	return b;
}

/* Step 2 of the commit: the batch's records, each naming its staging
 * folder and its folder's name in save_directory, in one append. */
static int
record_batch(struct store_batch *b)
{
	struct store *st = b->st;
	size_t len = 0;
	char *lines = xmalloc(b->n * RECORD_MAX);
	int r = 0;

	for (size_t i = 0; i < b->n && r == 0; i++) {
		struct store_msg *m = b->msgs[i];
		int k = st->save_dir != NULL ? choose_final(b, i) : 0;
		if (k == 0)
			k = record_line(m->uid, m->alias, st->save_dir ? m : NULL, lines + len,
					RECORD_MAX, b->error);
		if (k < 0)
			r = k;
		else
			len += (size_t)k;
	}
	if (r == 0) {
		/* even a failed append may have left the lines on disk (a write
		 * that went through, then a failed fdatasync and a failed cut
		 * back): from here on a failure keeps the staging folders, whose
		 * presence makes those records void */
		for (size_t i = 0; i < b->n; i++)
			b->msgs[i]->recorded = st->save_dir != NULL;
		pthread_mutex_lock(&st->state_lock);
		r = append_lines(st, lines, len, b->error);
		if (r == 0 && st->save_dir != NULL)
			st->unsettled = true;
		pthread_mutex_unlock(&st->state_lock);
	}
	free(lines);
	return r;
}

/* Steps 3 and 4: the renames, then the fsync of save_dir; the messages
 * committed (folders[i] for each), the first ones of the batch. */
static size_t
rename_batch(struct store_batch *b, char **folders, int *ret)
{
	struct store *st = b->st;
	size_t renamed = 0;

	for (; renamed < b->n; renamed++) {
		struct store_msg *m = b->msgs[renamed];
		if ((*ret = rename_into_place(m, &folders[renamed], b->error)) < 0)
			break; /* its record is void: the staging folder stays until cleaned */
		free(m->path); /* renamed: nothing left to remove */
		m->path = NULL;
	}
	if (renamed > 0 && fsync(st->save_fd) < 0) {
		/* visible but perhaps not durable: not received as far as the
		 * server is concerned, so no DELE; the records settle it later */
		*ret = errat(b->error, errno, "cannot fsync %s", st->save_dir);
		for (size_t i = 0; i < renamed; i++)
			free(folders[i]);
		renamed = 0;
	}
	return renamed;
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
store_batch_commit(struct store_batch *b, store_commit_cb cb, void *arg)
{
	struct store *st = b->st;
	size_t n = b->n, renamed = 0;
	char **folders = NULL;
	int r = 0;

	if (n == 0)
		return 0;
	if (st->save_dir != NULL && (r = sync_batch(b)) < 0) {
		r = errat(b->error, -r, "cannot make %zu message(s) durable (%s of %s)", n,
			  st->sync_per_file ? "fsync" : "syncfs", st->save_dir);
		goto out;
	}
	if ((r = record_batch(b)) < 0)
		goto out;
	folders = xcalloc(n, sizeof(char *));
	/* with nothing kept, the records are all that remains */
	renamed = st->save_dir != NULL ? rename_batch(b, folders, &r) : n;
	for (size_t i = 0; i < renamed; i++)
		cb(arg, b->msgs[i]->uid, folders[i], b->msgs[i]->size); /* takes the folder */
out:
	b->committed = renamed;
	b->r = r;
	pthread_mutex_lock(&st->state_lock);
	for (size_t i = renamed; i < n; i++)
		if (b->msgs[i]->recorded)
			keep_in_doubt(st, b->msgs[i]);
	pthread_mutex_unlock(&st->state_lock);
	free(folders);
	return r;
}

void
store_batch_end(struct store_batch *b)
{
	struct store *st;

	if (b == NULL)
		return;
	st = b->st;
	pthread_mutex_lock(&st->state_lock);
	for (size_t i = 0; i < b->committed; i++)
		remember(st, b->msgs[i]->uid, b->msgs[i]->alias);
	st->committing = false;
	pthread_mutex_unlock(&st->state_lock);
	if (b->r < 0)
		snprintf(st->error, sizeof(st->error), "%s", b->error);
	/* the renamed ones have nothing left to remove, the recorded ones
	 * stay for store_open to settle */
	for (size_t i = 0; i < b->n; i++)
		store_msg_abort(b->msgs[i]);
	free(b->msgs);
	free(b);
}

int
store_commit(struct store *st, store_commit_cb cb, void *arg)
{
	struct store_batch *b;
	int r;

	if (st->batch.n == 0)
		return 0;
	b = store_batch_take(st);
	r = store_batch_commit(b, cb, arg);
	store_batch_end(b);
	return r;
}

/* "UIDL\n", or "UIDL STAGE FINAL\n" for the message m about to be renamed,
 * with " CONTENT" before the newline when there is an alias: its length, or
 * -errno (the error into error). */
static int
record_line(const char *uid, const char *alias, const struct store_msg *m, char *line, size_t size,
	    char *error)
{
	const char *sep = alias ? " " : "";
	int n;

	if (!valid_uid(uid, strlen(uid)))
		return errat(error, EINVAL, "invalid UIDL");
	if (alias == NULL)
		alias = "";
	n = m ? snprintf(line, size, "%s %s %s%s%s\n", uid, m->stage, m->final, sep, alias)
	      : snprintf(line, size, "%s%s%s\n", uid, sep, alias);
	if (n < 0 || (size_t)n >= size)
		return errat(error, ENAMETOOLONG, "cannot record %s", uid);
	return n;
}

/*
 * Append record lines in one write and fdatasync them. A failed append is
 * cut back (or the file rewritten whole before the next one), so that a
 * torn line never joins the next record. state_lock is held; the error
 * into error.
 */
static int
append_lines(struct store *st, const char *lines, size_t len, char *error)
{
	struct stat sb;
	int r;

	if (st->rewrite && (r = rewrite_state(st, error)) < 0)
		return r;
	if (st->state_fd < 0) {
		st->state_fd = open(st->state_path, O_WRONLY | O_APPEND | O_CLOEXEC | O_NOFOLLOW);
		if (st->state_fd < 0)
			return errat(error, errno, "cannot open the state %s", st->state_path);
	}
	if (fstat(st->state_fd, &sb) < 0)
		return errat(error, errno, "cannot stat the state %s", st->state_path);
	r = util_write_all(st->state_fd, lines, len);
	if (r == 0 && fdatasync(st->state_fd) < 0)
		r = -errno;
	if (r < 0) {
		if (ftruncate(st->state_fd, sb.st_size) < 0 || fdatasync(st->state_fd) < 0)
			st->rewrite = true;
		return errat(error, -r, "cannot write the state %s", st->state_path);
	}
	return 0;
}

int
store_record(struct store *st, const char *uid)
{
	char line[RECORD_MAX];
	int n = record_line(uid, NULL, NULL, line, sizeof(line), st->error), r;

	if (n < 0)
		return n;
	pthread_mutex_lock(&st->state_lock);
	if (st->rewrite && st->committing)
		/* the state is rewritten from the records in memory, which lack
		 * those of the batch being committed until it ends */
		r = seterr(st, EBUSY,
			   "cannot write the state %s: it must be rewritten after a failed "
			   "write, and a commit is under way",
			   st->state_path);
	else
		r = append_lines(st, line, (size_t)n, st->error);
	if (r == 0)
		strset_add(&st->uids, uid);
	pthread_mutex_unlock(&st->state_lock);
	return r;
}

int
store_compact(struct store *st, const char *const *uids, size_t n)
{
	struct strset keep = {0}, aliases = {0};
	const char **list = xcalloc(n ? n : 1, sizeof(char *));
	size_t k = 0, promoted = 0;
	int r;

	pthread_mutex_lock(&st->state_lock);
	for (size_t i = 0; i < n; i++) {
		const char *alias = strset_value(&st->uids, uids[i]);
		bool record = strset_has(&st->uids, uids[i]);
		if (strset_has(&keep, uids[i]))
			continue;
		/* a content key listed while its UIDL is not (shared with
		 * another, or gone) becomes a record of its own */
		if (!record && !strset_has(&st->aliases, uids[i]))
			continue;
		promoted += !record;
		strset_put(&keep, uids[i], alias);
		if (alias != NULL)
			strset_add(&aliases, alias);
		list[k++] = uids[i];
	}
	if (k == st->uids.n && promoted == 0 && !st->unsettled) {
		/* nothing to drop */
		r = 0;
		goto out;
	}
	r = write_state(st, list, k, &keep, st->error);
	if (r == 0) {
		strset_clear(&st->uids);
		strset_clear(&st->aliases);
		st->uids = keep;
		st->aliases = aliases;
		memset(&keep, 0, sizeof(keep));
		memset(&aliases, 0, sizeof(aliases));
	}
out:
	pthread_mutex_unlock(&st->state_lock);
	strset_clear(&keep);
	strset_clear(&aliases);
	free(list);
	return r;
}

/* ---- is a directory writable? ---- */

/* Create, write (fsync with sync) and remove a file in dir: 0 or -errno. */
static int
probe_file(const char *dir, bool sync, char **ret_path)
{
	unsigned char rnd[6];
	char hex[13];
	int fd, r = 0;

	if (getentropy(rnd, sizeof(rnd)) < 0)
		memset(rnd, 0, sizeof(rnd));
	util_hex(rnd, sizeof(rnd), hex);
	*ret_path = xasprintf("%s/.popfetchd-test-%ld-%s", dir, (long)getpid(), hex);
	fd = open(*ret_path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	if (util_write_all(fd, "popfetchd test\n", 15) < 0 || (sync && fsync(fd) < 0))
		r = -errno;
	if (close(fd) < 0 && r == 0)
		r = -errno;
	if (unlink(*ret_path) < 0 && r == 0)
		r = -errno;
	return r;
}

/* The nearest ancestor of path that exists (path itself if it does). */
static char *
existing_ancestor(const char *path)
{
	char buf[PATH_MAX];
	struct stat st;

	snprintf(buf, sizeof(buf), "%s", path);
	while (stat(buf, &st) < 0 && (errno == ENOENT || errno == ENOTDIR) &&
	       strcmp(buf, "/") != 0 && strcmp(buf, ".") != 0) {
		char *up = dirname(buf);
		memmove(buf, up, strlen(up) + 1);
	}
	return xstrdup(buf);
}

static void __attribute__((format(printf, 3, 4)))
check_failed(struct store_dir_check *c, int err, const char *fmt, ...)
{
	va_list ap;

	c->err = err;
	va_start(ap, fmt);
	vsnprintf(c->why, sizeof(c->why), fmt, ap);
	va_end(ap);
}

/* The probe file in dir (judged for name). */
static void
check_probe(struct store_dir_check *c, const char *dir, const char *name, bool sync)
{
	int r = probe_file(dir, sync, &c->probe);

	if (r < 0) {
		c->cannot_create = true;
		if (c->missing)
			check_failed(c, -r, "%s does not exist and cannot be created: %s: %s", name,
				     c->probe, strerror(-r));
		else
			check_failed(c, -r, "cannot create %s: %s", c->probe, strerror(-r));
	}
}

/* dir exists: its staging .tmp, a probe file in it, renames into dir. */
static void
check_staging(struct store_dir_check *c, const char *dir, bool sync)
{
	char *tmp = xasprintf("%s/.tmp", dir);
	struct stat st;
	bool exists = lstat(tmp, &st) == 0;

	if (exists && S_ISLNK(st.st_mode))
		check_failed(c, ELOOP,
			     "%s is a symbolic link: popfetchd never follows one in its staging "
			     "(remove it)",
			     tmp);
	else if (exists && !S_ISDIR(st.st_mode))
		check_failed(c, ENOTDIR, "%s is not a directory: messages cannot be staged there",
			     tmp);
	else
		check_probe(c, exists ? tmp : dir, dir, sync);
	if (c->err == 0 && faccessat(AT_FDCWD, dir, W_OK | X_OK, AT_EACCESS) < 0)
		check_failed(c, errno, "%s: %s: folders cannot be renamed into it", dir,
			     strerror(errno));
	free(tmp);
}

void
store_check_dir(const char *dir, bool staging, bool sync, struct store_dir_check *ret)
{
	struct stat st;

	*ret = (struct store_dir_check){0};
	ret->where = existing_ancestor(dir);
	ret->missing = strcmp(ret->where, dir) != 0;
	if (stat(ret->where, &st) < 0)
		check_failed(ret, errno, "%s: %s", ret->where, strerror(errno));
	else if (!S_ISDIR(st.st_mode) && !ret->missing)
		check_failed(ret, ENOTDIR, "%s is not a directory", dir);
	else if (!S_ISDIR(st.st_mode))
		check_failed(ret, ENOTDIR, "%s cannot be created: %s is not a directory", dir,
			     ret->where);
	else if (staging && !ret->missing)
		check_staging(ret, dir, sync);
	else
		check_probe(ret, ret->where, dir, sync);
}

void
store_dir_check_clear(struct store_dir_check *c)
{
	free(c->where);
	free(c->probe);
	*c = (struct store_dir_check){0};
}
