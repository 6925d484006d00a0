/* Unit tests: folder naming, staging, commit, UIDL state, lock. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/sha.h>

#include "check.h"
#include "popfetchd/pop3_parse.h"
#include "popfetchd/store.h"
#include "popfetchd/util.h"

/* every UIDL the parser accepts is a key the store records */
_Static_assert(STORE_KEY_MAX >= POP3_UIDL_MAX, "a UIDL longer than the store's keys");

static char root[] = "/tmp/pfd-store-XXXXXX";
static char save[256], state[256];

static struct store *
open_store(const char *server, const char *user)
{
	struct store_params p = {.id = "box",
				 .save_directory = save,
				 .state_directory = state,
				 .server = server,
				 .user = user};
	struct store *st = NULL;
	char err[256];
	int r = store_open(&p, &st, err, sizeof(err));

	if (r < 0)
		fprintf(stderr, "store_open: %s\n", err);
	return st;
}

static const char *
state_path_of(const char *id)
{
	static char path[512];

	snprintf(path, sizeof(path), "%s/%s/uidl", state, id);
	return path;
}

static bool
exists(const char *path)
{
	struct stat sb;
	return lstat(path, &sb) == 0;
}

/* Entries in a directory (-1 when it cannot be read). */
static int
entries(const char *path)
{
	DIR *d = opendir(path);
	struct dirent *e;
	int n = 0;

	if (d == NULL)
		return -1;
	while ((e = readdir(d)) != NULL)
		n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
	closedir(d);
	return n;
}

static void
put(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	if (f != NULL) {
		fputs(text, f);
		fclose(f);
	}
}

static char *
slurp(const char *path)
{
	FILE *f = fopen(path, "r");
	char *buf = xcalloc(1, 65536);

	if (f != NULL) {
		size_t n = fread(buf, 1, 65535, f);
		buf[n] = '\0';
		fclose(f);
	}
	return buf;
}

static void
take_folder(void *arg, const char *uid, char *folder, unsigned long long size)
{
	(void)uid;
	(void)size;
	*(char **)arg = folder;
}

/* One message alone: sealed, then committed as a batch of one. */
static int
commit_one(struct store *st, struct store_msg *m, bool keep_eml, char **folder)
{
	int r;

	*folder = NULL;
	if ((r = store_msg_seal(m, keep_eml)) < 0)
		return r;
	return store_commit(st, take_folder, folder);
}

static void
naming(void)
{
	char name[64], want_hash[65];
	unsigned char md[SHA256_DIGEST_LENGTH];

	/* 2026-11-26T10:15:02Z */
	store_folder_name("box", "UID1", 1795688102, name, sizeof(name));
	SHA256((const unsigned char *)"box\0UID1", 8, md);
	util_hex(md, sizeof(md), want_hash);
	CHECK(strncmp(name, "20261126T101502Z-", 17) == 0);
	CHECK(strlen(name) == 29);
	CHECK(strncmp(name + 17, want_hash, 12) == 0);
}

static void
commit_and_state(void)
{
	struct store *st = open_store("pop.example", "alice");
	struct store_msg *m;
	char *folder = NULL, path[512];
	unsigned long long size = 0;

	CHECK(st != NULL);
	if (st == NULL)
		return;
	CHECK(!store_has(st, "U1"));
	CHECK(store_msg_begin(st, "U1", 1795688102, &m) == 0);
	CHECK(store_msg_write(m, "Subject: a\r\n\r\n", 14) == 0);
	CHECK(store_msg_write(m, "body\r\n", 6) == 0);
	CHECK(store_msg_finish_eml(m, &size) == 0 && size == 20);
	CHECK(store_msg_add_file(m, "meta.json", "{}", 2) == 0);
	/* a second file of the same name is refused (O_EXCL) */
	CHECK(store_msg_add_file(m, "meta.json", "{}", 2) < 0);
	CHECK(!store_has(st, "U1"));
	CHECK(commit_one(st, m, true, &folder) == 0 && folder != NULL);
	CHECK(store_has(st, "U1")); /* recorded by the commit */
	snprintf(path, sizeof(path), "%s/message.eml", folder);
	char *eml = slurp(path);
	CHECK_STR(eml, "Subject: a\r\n\r\nbody\r\n");
	free(eml);
	/* nothing left in staging */
	snprintf(path, sizeof(path), "%s/.tmp/box", save);
	CHECK(entries(path) == 0);
	free(folder);

	/* the same UIDL in the same second: a new name, nothing replaced */
	CHECK(store_msg_begin(st, "U1", 1795688102, &m) == 0);
	CHECK(commit_one(st, m, false, &folder) == 0);
	CHECK(folder != NULL && strstr(folder, "-2") != NULL);
	snprintf(path, sizeof(path), "%s/message.eml", folder);
	CHECK(!exists(path)); /* keep_eml false */
	free(folder);
	store_close(st);

	/* closed: no empty staging folder is left behind (.tmp itself stays:
	 * other configurations may be staging in it) */
	snprintf(path, sizeof(path), "%s/.tmp/box", save);
	CHECK(!exists(path));

	/* reopened: the state survived */
	st = open_store("pop.example", "alice");
	CHECK(st != NULL && store_has(st, "U1") && store_count(st) == 1);
	store_close(st);
	CHECK(!exists(path));
}

static void
binding_and_damage(void)
{
	char path[512];
	struct store *st;
	FILE *f;

	/* another user: a fresh state; the folders of the other mailbox, with
	 * perhaps the same UIDLs, mean nothing for this one */
	st = open_store("pop.example", "bob");
	CHECK(st != NULL && store_count(st) == 0);
	CHECK(!store_has(st, "U1"));
	CHECK(store_record(st, "U1") == 0);
	CHECK(store_record(st, "U2") == 0);
	store_close(st);

	/* a torn last line is dropped, the rest kept, the file repaired */
	snprintf(path, sizeof(path), "%s/box/uidl", state);
	f = fopen(path, "a");
	fputs("U3-torn", f);
	fclose(f);
	st = open_store("pop.example", "bob");
	CHECK(st != NULL && store_has(st, "U2") && store_count(st) == 2);
	store_close(st);
	char *text = slurp(path);
	CHECK(strstr(text, "U3-torn") == NULL && text[strlen(text) - 1] == '\n');
	free(text);

	/* garbage instead of a state: a warning, a fresh start, no crash */
	f = fopen(path, "w");
	fputs("\x01\x02garbage\n\xff\n", f);
	fclose(f);
	st = open_store("pop.example", "bob");
	CHECK(st != NULL && store_count(st) == 0);
	store_close(st);

	/* compaction keeps only what is listed and known */
	st = open_store("pop.example", "bob");
	CHECK(store_record(st, "A") == 0 && store_record(st, "B") == 0 &&
	      store_record(st, "C") == 0);
	const char *listed[] = {"B", "X"};
	CHECK(store_compact(st, listed, 2) == 0);
	CHECK(store_count(st) == 1 && store_has(st, "B"));
	store_close(st);
	st = open_store("pop.example", "bob");
	CHECK(st != NULL && store_count(st) == 1 && strcmp("B", "B") == 0 && store_has(st, "B"));
	store_close(st);
}

/* A folder in save_dir as a rename leaves it, with its meta.json or not. */
static void
make_folder(const char *name, bool meta)
{
	char path[600];

	snprintf(path, sizeof(path), "%s/%s", save, name);
	CHECK(mkdir(path, 0750) == 0);
	snprintf(path, sizeof(path), "%s/%s/meta.json", save, name);
	if (meta)
		put(path, "{}");
}

/*
 * A record written before a rename names the staging folder and the folder
 * it becomes: the message counts as received only when the staging folder
 * is gone and the folder is in save_dir, a directory with its meta.json.
 * Anything else (staging cleaned, save_directory changed, a record of an
 * older version that names no folder) means "received again", never
 * "deleted from the server though on disk nowhere".
 */
static void
interrupted_commit(void)
{
	char path[512], stage[512], link[600];
	struct store *st = open_store("pop.example", "carol");
	FILE *f;

	CHECK(st != NULL);
	store_close(st);
	make_folder("20261126T101502Z-aaaaaaaaaaaa", true);
	make_folder("20261126T101502Z-cccccccccccc", false);
	make_folder("real-dddddddddddd", true);
	snprintf(path, sizeof(path), "%s/real-dddddddddddd", save);
	snprintf(link, sizeof(link), "%s/20261126T101502Z-dddddddddddd", save);
	CHECK(symlink(path, link) == 0);
	snprintf(path, sizeof(path), "%s/box/uidl", state);
	f = fopen(path, "a");
	fputs("RENAMED 20261126T101502Z-aaaaaaaaaaaa.99.0 20261126T101502Z-aaaaaaaaaaaa\n", f);
	fputs("NOT-RENAMED 20261126T101502Z-bbbbbbbbbbbb.99.1 20261126T101502Z-bbbbbbbbbbbb\n", f);
	fputs("NOWHERE 20261126T101502Z-eeeeeeeeeeee.99.2 20261126T101502Z-eeeeeeeeeeee\n", f);
	fputs("NO-META 20261126T101502Z-cccccccccccc.99.3 20261126T101502Z-cccccccccccc\n", f);
	fputs("LINKED 20261126T101502Z-dddddddddddd.99.4 20261126T101502Z-dddddddddddd\n", f);
	fputs("OLD-FORMAT 20261126T101502Z-ffffffffffff.99.5\n", f);
	fputs("BAD ../../etc\n", f);
	fputs("BAD-FINAL 20261126T101502Z-ffffffffffff.99.6 ../x\n", f);
	fclose(f);
	snprintf(stage, sizeof(stage), "%s/.tmp/box", save);
	CHECK(mkdir(stage, 0700) == 0);
	snprintf(stage, sizeof(stage), "%s/.tmp/box/20261126T101502Z-bbbbbbbbbbbb.99.1", save);
	CHECK(mkdir(stage, 0700) == 0);
	st = open_store("pop.example", "carol");
	CHECK(st != NULL && store_has(st, "RENAMED") && !store_has(st, "NOT-RENAMED"));
	CHECK(!store_has(st, "NOWHERE") && !store_has(st, "NO-META") && !store_has(st, "LINKED"));
	CHECK(!store_has(st, "OLD-FORMAT"));
	CHECK(!store_has(st, "BAD") && !store_has(st, "BAD-FINAL"));
	CHECK(!exists(stage)); /* cleaned after the records were settled */
	store_close(st);
	/* settled for good: the file holds plain records now */
	char *text = slurp(path);
	CHECK(strstr(text, "\nRENAMED\n") != NULL && strstr(text, "NOT-RENAMED") == NULL);
	CHECK(strstr(text, "NOWHERE") == NULL && strstr(text, "OLD-FORMAT") == NULL);
	free(text);
	st = open_store("pop.example", "carol");
	CHECK(st != NULL && store_has(st, "RENAMED") && store_count(st) == 1);
	store_close(st);
}

#define H1 "h1111111111111111111111111111111111111111111111111111111111111111"
#define H2 "h2222222222222222222222222222222222222222222222222222222222222222"
#define H3 "h3333333333333333333333333333333333333333333333333333333333333333"
#define H4 "h4444444444444444444444444444444444444444444444444444444444444444"

/* A message of a few bytes saved under uid, with the content key key. */
static void
save_with_key(struct store *st, const char *uid, const char *key)
{
	struct store_msg *m;
	char *folder = NULL;

	CHECK(store_msg_begin(st, uid, 1795688102, &m) == 0);
	CHECK(store_msg_write(m, "Subject: k\r\n\r\nbody\r\n", 20) == 0);
	store_msg_set_content_key(m, key);
	CHECK(commit_one(st, m, true, &folder) == 0 && folder != NULL);
	free(folder);
}

/*
 * The content key of a message saved under a UIDL is recorded beside it
 * ("UIDL CONTENT"): should the server give that UIDL to another message
 * too, both are known by their content, and this one is known so already.
 * It counts as long as its record does: settled with it after a crash,
 * kept with it by compaction, and a record of its own once it is listed
 * without its UIDL.
 */
static void
content_keys(void)
{
	struct store *st = open_store("pop.example", "dave");
	char *text;
	FILE *f;

	CHECK(st != NULL);
	if (st == NULL)
		return;
	save_with_key(st, "U1", H1);
	save_with_key(st, "U2", "not-a-content-key"); /* ignored */
	save_with_key(st, H3, H3);		      /* its key already */
	CHECK(store_has(st, "U1") && store_has(st, H1) && store_count(st) == 3);
	store_close(st);
	text = slurp(state_path_of("box"));
	CHECK(strstr(text, "\nU1 " H1 "\n") != NULL && strstr(text, "\nU2\n") != NULL);
	CHECK(strstr(text, "\n" H3 "\n") != NULL && strstr(text, "not-a") == NULL);
	free(text);

	/* an interrupted commit: the content key counts only with its record */
	make_folder("20261126T101502Z-222222222222", true);
	f = fopen(state_path_of("box"), "a");
	fputs("R2 20261126T101502Z-222222222222.99.0 20261126T101502Z-222222222222 " H2 "\n", f);
	fputs("R4 20261126T101502Z-444444444444.99.1 20261126T101502Z-444444444444 " H4 "\n", f);
	fputs("OLD 20261126T101502Z-555555555555.99.2\n", f);
	fputs("BAD 20261126T101502Z-555555555555.99.3 20261126T101502Z-555555555555 x\n", f);
	fputs("BAD2 " H4 " " H4 "\n", f);
	fclose(f);
	st = open_store("pop.example", "dave");
	CHECK(st != NULL && store_has(st, "U1") && store_has(st, H1) && store_has(st, "R2") &&
	      store_has(st, H2));
	CHECK(!store_has(st, "R4") && !store_has(st, H4) && !store_has(st, "OLD") &&
	      !store_has(st, "BAD") && !store_has(st, "BAD2") && store_count(st) == 4);
	text = slurp(state_path_of("box")); /* settled: plain records */
	CHECK(strstr(text, "\nR2 " H2 "\n") != NULL && strstr(text, "R4") == NULL);
	free(text);

	/* compaction: a listed UIDL keeps its content key; a listed content
	 * key whose UIDL is not listed (shared now) becomes a record */
	const char *listed[] = {"U1", H2, "X"};
	CHECK(store_compact(st, listed, 3) == 0);
	CHECK(store_has(st, "U1") && store_has(st, H1) && store_has(st, H2));
	CHECK(!store_has(st, "R2") && !store_has(st, "U2") && !store_has(st, H3));
	CHECK(store_count(st) == 2);
	CHECK(store_compact(st, listed, 3) == 0 && store_count(st) == 2); /* nothing to drop */
	store_close(st);
	text = slurp(state_path_of("box"));
	CHECK(strstr(text, "\nU1 " H1 "\n") != NULL && strstr(text, "\n" H2 "\n") != NULL);
	CHECK(strstr(text, "R2") == NULL);
	free(text);
	st = open_store("pop.example", "dave");
	CHECK(st != NULL && store_has(st, H1) && store_has(st, H2) && store_count(st) == 2);
	/* the UIDL gone from the listing, its content key goes with it */
	const char *later[] = {H2};
	CHECK(store_compact(st, later, 1) == 0);
	CHECK(!store_has(st, "U1") && !store_has(st, H1) && store_has(st, H2));
	store_close(st);
}

/* Every name a message's folder may take is taken: nothing is recorded,
 * nothing renamed, the staging removed. */
static void
no_free_name(void)
{
	char name[64], path[600], stage[512], *folder = NULL;
	struct store *st = open_store("pop.example", "dave");
	struct store_msg *m;
	time_t when = 1795688102;

	CHECK(st != NULL);
	if (st == NULL)
		return;
	store_folder_name("box", "R1", when, name, sizeof(name));
	for (unsigned i = 1; i < 1000; i++) {
		if (i == 1)
			snprintf(path, sizeof(path), "%s/%s", save, name);
		else
			snprintf(path, sizeof(path), "%s/%s-%u", save, name, i);
		CHECK(mkdir(path, 0700) == 0);
	}
	CHECK(store_msg_begin(st, "R1", when, &m) == 0);
	CHECK(store_msg_write(m, "Subject: r\r\n\r\n", 14) == 0);
	snprintf(stage, sizeof(stage), "%s", store_msg_eml_path(m));
	*strrchr(stage, '/') = '\0';
	CHECK(commit_one(st, m, true, &folder) < 0 && folder == NULL);
	CHECK(strstr(store_error(st), "no free name") != NULL);
	CHECK(!store_has(st, "R1") && !exists(stage));
	snprintf(path, sizeof(path), "%s/box/uidl", state);
	char *text = slurp(path);
	CHECK(strstr(text, "R1") == NULL);
	free(text);
	store_close(st);
	for (unsigned i = 1; i < 1000; i++) {
		if (i == 1)
			snprintf(path, sizeof(path), "%s/%s", save, name);
		else
			snprintf(path, sizeof(path), "%s/%s-%u", save, name, i);
		CHECK(rmdir(path) == 0);
	}
}

/*
 * The staging folder is moved away and a symlink put in its place while the
 * message is written (whoever can write there could): what is written
 * still goes to the folder made for it, and the rename refuses the symlink
 * after the record was written. That record stays void (the staging entry
 * is kept), or the next start would take the message for saved, and
 * delete it from the server, though it never appeared.
 */
static void
replaced_staging_folder(void)
{
	char victim[512], moved[512], stage[512], path[700], *folder = NULL;
	struct store *st = open_store("pop.example", "erin");
	struct store_msg *m;

	CHECK(st != NULL);
	if (st == NULL)
		return;
	snprintf(victim, sizeof(victim), "%s/victim", root);
	CHECK(mkdir(victim, 0700) == 0);
	snprintf(path, sizeof(path), "%s/canary", victim);
	put(path, "canary");
	CHECK(store_msg_begin(st, "S1", 1795688102, &m) == 0);
	CHECK(store_msg_write(m, "Subject: s\r\n\r\n", 14) == 0);
	CHECK(store_msg_finish_eml(m, NULL) == 0); /* the staging folder is made */
	snprintf(stage, sizeof(stage), "%s", store_msg_eml_path(m));
	*strrchr(stage, '/') = '\0';
	snprintf(moved, sizeof(moved), "%s/moved", root);
	CHECK(rename(stage, moved) == 0 && symlink(victim, stage) == 0);
	CHECK(store_msg_add_file(m, "meta.json", "{}", 2) == 0);
	snprintf(path, sizeof(path), "%s/meta.json", moved);
	CHECK(exists(path)); /* written where the folder is, not where the link points */
	CHECK(commit_one(st, m, true, &folder) == -ELOOP && folder == NULL);
	CHECK(strstr(store_error(st), "is a symbolic link") != NULL);
	CHECK(!store_has(st, "S1"));
	CHECK(entries(victim) == 1);
	snprintf(path, sizeof(path), "%s/box/uidl", state);
	char *text = slurp(path);
	CHECK(strstr(text, "S1 ") != NULL); /* the record went to disk first */
	free(text);
	store_close(st);
	CHECK(exists(stage)); /* kept: it makes the record void */

	/* the next start: not saved, so received again; the link removed, not
	 * followed */
	st = open_store("pop.example", "erin");
	CHECK(st != NULL && !store_has(st, "S1") && store_count(st) == 0);
	CHECK(!exists(stage) && entries(victim) == 1);
	store_close(st);
	text = slurp(path);
	CHECK(strstr(text, "S1") == NULL);
	free(text);
	/* no folder of save_dir is a symlink */
	DIR *d = opendir(save);
	struct dirent *e;
	while (d != NULL && (e = readdir(d)) != NULL)
		CHECK(e->d_type != DT_LNK || strstr(e->d_name, "dddddddddddd") != NULL);
	if (d != NULL)
		closedir(d);
}

/* .tmp, or .tmp/ID, made a symlink (to the state directory, say): never
 * followed, never emptied; store_open fails and says why. */
static void
symlinked_staging(void)
{
	struct store_params p = {.id = "box",
				 .save_directory = save,
				 .state_directory = state,
				 .server = "s",
				 .user = "u"};
	char tmp[600], aside[700], victim[400], canary[600], err[512];
	struct store *st = NULL;

	snprintf(victim, sizeof(victim), "%s/victim2", root);
	snprintf(canary, sizeof(canary), "%s/box/uidl", victim);
	CHECK(mkdir(victim, 0700) == 0);
	snprintf(tmp, sizeof(tmp), "%s/box", victim);
	CHECK(mkdir(tmp, 0700) == 0);
	put(canary, "canary");

	snprintf(tmp, sizeof(tmp), "%s/.tmp", save);
	snprintf(aside, sizeof(aside), "%s/.tmp-aside", save);
	CHECK(rename(tmp, aside) == 0 && symlink(victim, tmp) == 0);
	CHECK(store_open(&p, &st, err, sizeof(err)) == -ELOOP && st == NULL);
	CHECK(strstr(err, "/.tmp is a symbolic link") != NULL);
	CHECK(exists(canary));
	CHECK(unlink(tmp) == 0 && rename(aside, tmp) == 0);

	snprintf(tmp, sizeof(tmp), "%s/.tmp/box", save);
	rmdir(tmp);
	CHECK(symlink(victim, tmp) == 0);
	CHECK(store_open(&p, &st, err, sizeof(err)) == -ELOOP && st == NULL);
	CHECK(strstr(err, "/.tmp/box is a symbolic link") != NULL);
	CHECK(exists(canary));
	CHECK(unlink(tmp) == 0);

	/* a symlink among the leftovers, and one inside a leftover folder:
	 * removed, their targets untouched */
	CHECK(mkdir(tmp, 0700) == 0);
	snprintf(aside, sizeof(aside), "%s/stale.1.1", tmp);
	CHECK(symlink(victim, aside) == 0);
	snprintf(aside, sizeof(aside), "%s/stale.1.2", tmp);
	CHECK(mkdir(aside, 0700) == 0);
	snprintf(aside, sizeof(aside), "%s/stale.1.2/attachments", tmp);
	CHECK(symlink(victim, aside) == 0);
	CHECK(store_open(&p, &st, err, sizeof(err)) == 0);
	CHECK(st != NULL && entries(tmp) == 0 && exists(canary));
	store_close(st);
}

static void
lock_and_staging(void)
{
	struct store *a = open_store("s", "u"), *b;
	struct store_params p = {.id = "box",
				 .save_directory = save,
				 .state_directory = state,
				 .server = "s",
				 .user = "u"};
	struct store_msg *m;
	char err[256], stale[512];

	CHECK(a != NULL);
	CHECK(store_open(&p, &b, err, sizeof(err)) == -EBUSY);
	CHECK(strstr(err, "another popfetchd process") != NULL);
	store_close(a);
	/* a staged message left by a process that died */
	int pipefd[2], status = 0;
	CHECK(pipe(pipefd) == 0);
	pid_t pid = fork();
	if (pid == 0) {
		a = open_store("s", "u");
		if (a == NULL || store_msg_begin(a, "Z", 1795688102, &m) < 0 ||
		    store_msg_write(m, "partial", 7) < 0 || store_msg_finish_eml(m, NULL) < 0)
			_exit(1);
		snprintf(stale, sizeof(stale), "%s", store_msg_eml_path(m));
		_exit(write(pipefd[1], stale, strlen(stale) + 1) > 0 ? 0 : 1);
	}
	CHECK(pid > 0 && waitpid(pid, &status, 0) == pid && status == 0);
	close(pipefd[1]);
	ssize_t n = read(pipefd[0], stale, sizeof(stale) - 1);
	close(pipefd[0]);
	stale[n > 0 ? n : 0] = '\0';
	CHECK(n > 0 && exists(stale));
	a = open_store("s", "u");
	CHECK(a != NULL && !exists(stale));
	store_close(a);
}

struct committed {
	char uid[8][16];
	char *folder[8];
	unsigned long long size[8];
	size_t n;
};

static void
collect(void *arg, const char *uid, char *folder, unsigned long long size)
{
	struct committed *c = arg;

	if (c->n < 8) {
		snprintf(c->uid[c->n], sizeof(c->uid[0]), "%s", uid);
		c->folder[c->n] = folder;
		c->size[c->n] = size;
		c->n++;
	} else {
		free(folder);
	}
}

/* Group commit: sealed messages are neither visible nor recorded until
 * store_commit, which makes them all so, in order; a discarded batch
 * leaves nothing. */
static void
batches(void)
{
	struct store *st = open_store("batch.example", "bob");
	struct committed c = {0};
	struct store_msg *m;
	unsigned long long bytes = 0;
	char stage[512], path[600];

	CHECK(st != NULL);
	if (st == NULL)
		return;
	for (int i = 1; i <= 3; i++) {
		char uid[8];
		snprintf(uid, sizeof(uid), "B%d", i);
		CHECK(store_msg_begin(st, uid, 1795688102 + i, &m) == 0);
		CHECK(store_msg_write(m, "Subject: b\r\n\r\nbody\r\n", (size_t)(15 + i)) == 0);
		if (i == 1)
			snprintf(stage, sizeof(stage), "%s", store_msg_eml_path(m));
		CHECK(store_msg_seal(m, true) == 0);
	}
	CHECK(store_pending(st, &bytes) == 3 && bytes == 16 + 17 + 18);
	CHECK(!store_has(st, "B1") && exists(stage));
	char *text = slurp(state_path_of("box"));
	CHECK(strstr(text, "B1") == NULL);
	free(text);
	CHECK(store_commit(st, collect, &c) == 0);
	CHECK(c.n == 3 && store_pending(st, NULL) == 0);
	CHECK(strcmp(c.uid[0], "B1") == 0 && strcmp(c.uid[1], "B2") == 0 &&
	      strcmp(c.uid[2], "B3") == 0);
	CHECK(c.size[0] == 16 && c.size[2] == 18);
	for (size_t i = 0; i < c.n; i++) {
		snprintf(path, sizeof(path), "%s/message.eml", c.folder[i] ? c.folder[i] : "");
		CHECK(c.folder[i] != NULL && exists(path));
		free(c.folder[i]);
	}
	CHECK(store_has(st, "B1") && store_has(st, "B3") && !exists(stage));
	text = slurp(state_path_of("box"));
	CHECK(strstr(text, "B1 ") != NULL && strstr(text, "B3 ") != NULL);
	free(text);
	/* nothing to commit is no error */
	CHECK(store_commit(st, collect, &c) == 0 && c.n == 3);
	/* a discarded batch: its staging is gone, nothing recorded */
	CHECK(store_msg_begin(st, "B4", 1795688110, &m) == 0);
	snprintf(stage, sizeof(stage), "%s", store_msg_eml_path(m));
	CHECK(store_msg_seal(m, true) == 0 && exists(stage));
	store_discard(st);
	CHECK(!exists(stage) && !store_has(st, "B4") && store_pending(st, NULL) == 0);
	/* a pending batch is dropped with the store */
	CHECK(store_msg_begin(st, "B5", 1795688111, &m) == 0);
	snprintf(stage, sizeof(stage), "%s", store_msg_eml_path(m));
	CHECK(store_msg_seal(m, true) == 0 && store_pending(st, NULL) == 1);
	store_close(st);
	CHECK(!exists(stage));
	st = open_store("batch.example", "bob");
	CHECK(st != NULL && !store_has(st, "B5") && store_has(st, "B3"));
	store_close(st);
}

struct batch_run {
	struct store_batch *b;
	struct committed c;
	int r;
};

static void *
commit_thread(void *arg)
{
	struct batch_run *run = arg;

	run->r = store_batch_commit(run->b, collect, &run->c);
	return NULL;
}

/* Seal a message uid into the store's batch; its staging folder in stage. */
static void
seal_one(struct store *st, const char *uid, int t, char *stage, size_t size)
{
	struct store_msg *m;

	CHECK(store_msg_begin(st, uid, 1795688102 + t, &m) == 0);
	CHECK(store_msg_write(m, "Subject: d\r\n\r\nbody\r\n", 20) == 0);
	if (stage != NULL) {
		snprintf(stage, size, "%s", store_msg_eml_path(m));
		*strrchr(stage, '/') = '\0';
	}
	CHECK(store_msg_seal(m, true) == 0);
}

/* The position of the record of uid in the state text, or -1. */
static long
record_at(const char *text, const char *uid)
{
	char line[32];
	const char *p;

	snprintf(line, sizeof(line), "\n%s ", uid);
	p = strstr(text, line);
	if (p == NULL) {
		snprintf(line, sizeof(line), "\n%s\n", uid);
		p = strstr(text, line);
	}
	return p ? p - text : -1;
}

/* A batch taken from the store is committed on another thread while the
 * store goes on: new messages staged and sealed into a new batch, a key
 * recorded. The new batch is not touched; the taken one's messages are
 * known once it ends; the records keep the batches' order. A failed
 * commit's words become the store's only at its end. */
static void
detached_batch(void)
{
	struct store_params p = {.id = "detached",
				 .save_directory = save,
				 .state_directory = state,
				 .server = "d",
				 .user = "u"};
	struct store *st = NULL;
	struct batch_run run = {0};
	struct committed c = {0};
	pthread_t t;
	char err[256], stage[512], moved[512], path[600];
	unsigned long long bytes;

	CHECK(store_open(&p, &st, err, sizeof(err)) == 0);
	if (st == NULL)
		return;
	seal_one(st, "D1", 1, NULL, 0);
	seal_one(st, "D2", 2, NULL, 0);
	run.b = store_batch_take(st);
	CHECK(store_pending(st, NULL) == 0);
	CHECK(pthread_create(&t, NULL, commit_thread, &run) == 0);
	seal_one(st, "D3", 3, NULL, 0);
	CHECK(store_record(st, "R1") == 0 && store_has(st, "R1"));
	seal_one(st, "D4", 4, NULL, 0);
	CHECK(pthread_join(t, NULL) == 0);
	CHECK(run.r == 0 && run.c.n == 2);
	CHECK(strcmp(run.c.uid[0], "D1") == 0 && strcmp(run.c.uid[1], "D2") == 0);
	/* durable, but known only once the batch ended on the loop */
	CHECK(!store_has(st, "D1"));
	store_batch_end(run.b);
	CHECK(store_has(st, "D1") && store_has(st, "D2") && !store_has(st, "D3"));
	CHECK(store_pending(st, &bytes) == 2 && bytes == 40);
	CHECK(store_commit(st, collect, &c) == 0 && c.n == 2);
	CHECK(strcmp(c.uid[0], "D3") == 0 && strcmp(c.uid[1], "D4") == 0);
	for (size_t i = 0; i < 2; i++) {
		snprintf(path, sizeof(path), "%s/message.eml", run.c.folder[i]);
		CHECK(exists(path));
		snprintf(path, sizeof(path), "%s/message.eml", c.folder[i]);
		CHECK(exists(path));
		FREE_ALL(run.c.folder[i], c.folder[i]);
	}
	char *text = slurp(state_path_of("detached"));
	CHECK(record_at(text, "R1") > 0 && record_at(text, "D1") > 0);
	CHECK(record_at(text, "D1") < record_at(text, "D2"));
	CHECK(record_at(text, "D2") < record_at(text, "D3"));
	CHECK(record_at(text, "D3") < record_at(text, "D4"));
	free(text);

	/* a commit that fails (its staging folder replaced) while the store
	 * stages another message: its error is the batch's until it ends */
	memset(&run, 0, sizeof(run));
	seal_one(st, "D5", 5, stage, sizeof(stage));
	snprintf(moved, sizeof(moved), "%s/moved-d5", root);
	CHECK(rename(stage, moved) == 0 && mkdir(stage, 0750) == 0);
	run.b = store_batch_take(st);
	CHECK(pthread_create(&t, NULL, commit_thread, &run) == 0);
	seal_one(st, "D6", 6, NULL, 0);
	CHECK(pthread_join(t, NULL) == 0);
	CHECK(run.r == -ESTALE && run.c.n == 0);
	CHECK(strstr(store_error(st), "not the folder") == NULL);
	store_batch_end(run.b);
	CHECK(strstr(store_error(st), "not the folder") != NULL && !store_has(st, "D5"));
	CHECK(store_pending(st, NULL) == 1);
	memset(&c, 0, sizeof(c));
	CHECK(store_commit(st, collect, &c) == 0 && c.n == 1 && strcmp(c.uid[0], "D6") == 0);
	free(c.folder[0]);
	store_close(st);

	/* the next start knows every committed one, and not the failed one */
	st = NULL;
	CHECK(store_open(&p, &st, err, sizeof(err)) == 0);
	CHECK(st != NULL && store_has(st, "D1") && store_has(st, "D4") && store_has(st, "R1"));
	CHECK(st != NULL && store_has(st, "D6") && !store_has(st, "D5"));
	store_close(st);
}

/* The same with an fsync per file and folder (as on FUSE), attachments/
 * included. */
static void
batch_synced_per_file(void)
{
	struct store_params p = {.id = "perfile",
				 .save_directory = save,
				 .state_directory = state,
				 .server = "s",
				 .user = "u",
				 .sync_per_file = true};
	struct store *st = NULL;
	struct committed c = {0};
	struct store_msg *m;
	char err[256], path[700];

	CHECK(store_open(&p, &st, err, sizeof(err)) == 0);
	if (st == NULL)
		return;
	for (int i = 1; i <= 2; i++) {
		char uid[8];
		snprintf(uid, sizeof(uid), "P%d", i);
		CHECK(store_msg_begin(st, uid, 1795688102 + i, &m) == 0);
		CHECK(store_msg_write(m, "Subject: p\r\n\r\nx\r\n", 17) == 0);
		CHECK(store_msg_finish_eml(m, NULL) == 0);
		CHECK(mkdirat(store_msg_dirfd(m), "attachments", 0750) == 0);
		int fd = openat(store_msg_dirfd(m), "attachments/a.pdf", O_WRONLY | O_CREAT, 0640);
		CHECK(fd >= 0 && write(fd, "%PDF", 4) == 4);
		close(fd);
		CHECK(store_msg_add_file(m, "meta.json", "{}", 2) == 0);
		CHECK(store_msg_seal(m, true) == 0);
	}
	CHECK(store_commit(st, collect, &c) == 0 && c.n == 2);
	for (size_t i = 0; i < c.n; i++) {
		snprintf(path, sizeof(path), "%s/attachments/a.pdf", c.folder[i]);
		CHECK(exists(path));
		free(c.folder[i]);
	}
	CHECK(store_has(st, "P1") && store_has(st, "P2"));
	store_close(st);
}

/* A UIDL of 70 characters (RFC 1939's longest) is recorded; 71 are not. */
static void
longest_key(void)
{
	struct store *st = open_store("long.example", "frank");
	struct store_msg *m;
	char uid[STORE_KEY_MAX + 2], *folder = NULL;

	CHECK(st != NULL);
	if (st == NULL)
		return;
	memset(uid, 'u', STORE_KEY_MAX);
	uid[STORE_KEY_MAX] = '\0';
	CHECK(store_msg_begin(st, uid, 1795688102, &m) == 0);
	CHECK(commit_one(st, m, false, &folder) == 0 && store_has(st, uid));
	free(folder);
	strcat(uid, "u");
	CHECK(store_msg_begin(st, uid, 1795688102, &m) == 0);
	CHECK(commit_one(st, m, false, &folder) == -EINVAL && !store_has(st, uid));
	free(folder);
	store_close(st);
	st = open_store("long.example", "frank");
	uid[STORE_KEY_MAX] = '\0';
	CHECK(st != NULL && store_has(st, uid));
	store_close(st);
}

/* Sum of the bytes of a file, and its size in *size (-1 when unreadable). */
static unsigned long long
file_sum(const char *path, long long *size)
{
	FILE *f = fopen(path, "rb");
	unsigned long long sum = 0;
	int ch;

	*size = -1;
	if (f == NULL)
		return 0;
	for (*size = 0; (ch = getc(f)) != EOF; (*size)++)
		sum = sum * 31 + (unsigned)ch;
	fclose(f);
	return sum;
}

/* One message of n bytes, written in pieces of 1000: its bytes are in
 * memory after finish_eml when keep (the same as the file's), otherwise
 * only in the file. */
static void
kept_or_written(size_t n, bool keep)
{
	struct store *st = open_store("keep.example", "kim");
	struct store_msg *m;
	char piece[1000], *folder = NULL, path[512];
	unsigned long long want = 0, size = 0;
	long long fsize;
	const char *mem;
	size_t len = 0;

	CHECK(st != NULL);
	if (st == NULL)
		return;
	CHECK(store_msg_begin(st, keep ? "K1" : "K2", 1795688102, &m) == 0);
	for (size_t i = 0; i < n; i += sizeof(piece)) {
		size_t k = n - i < sizeof(piece) ? n - i : sizeof(piece);
		for (size_t j = 0; j < k; j++) {
			piece[j] = (char)('a' + (i + j) % 23);
			want = want * 31 + (unsigned char)piece[j];
		}
		CHECK(store_msg_write(m, piece, k) == 0);
	}
	CHECK(store_msg_eml(m, &len) == NULL); /* not before message.eml is complete */
	CHECK(store_msg_finish_eml(m, &size) == 0 && size == n);
	mem = store_msg_eml(m, &len);
	CHECK(keep ? mem != NULL && len == n : mem == NULL);
	if (mem != NULL) {
		unsigned long long sum = 0;
		for (size_t i = 0; i < len; i++)
			sum = sum * 31 + (unsigned char)mem[i];
		CHECK(sum == want);
	}
	CHECK(commit_one(st, m, true, &folder) == 0 && folder != NULL);
	snprintf(path, sizeof(path), "%s/message.eml", folder ? folder : "");
	CHECK(file_sum(path, &fsize) == want && fsize == (long long)n);
	free(folder);
	store_close(st);
}

/* A message's staging folder: made when message.eml is finished (on the
 * thread that seals it), not when the message begins on the loop; or once
 * it grows past what is kept in memory. */
static void
stage_dir_of(struct store_msg *m, char *out, size_t len)
{
	snprintf(out, len, "%s", store_msg_eml_path(m));
	*strrchr(out, '/') = '\0';
}

static void
lazy_staging(void)
{
	static char big[1 << 20];
	struct store *st = open_store("pop.example", "lazy");
	struct store_msg *m;
	char stage[700], *folder = NULL;

	CHECK(st != NULL);
	if (st == NULL)
		return;
	CHECK(store_msg_begin(st, "L1", 1795688102, &m) == 0);
	CHECK(store_msg_write(m, "Subject: l\r\n\r\nx\r\n", 17) == 0);
	stage_dir_of(m, stage, sizeof(stage));
	CHECK(!exists(stage) && store_msg_dirfd(m) < 0);
	CHECK(store_msg_finish_eml(m, NULL) == 0);
	CHECK(exists(stage) && store_msg_dirfd(m) >= 0);
	CHECK(store_msg_add_file(m, "meta.json", "{}", 2) == 0);
	CHECK(commit_one(st, m, true, &folder) == 0 && folder != NULL);
	free(folder);

	/* larger than what is kept: made as it stops being kept; removed by
	 * an abort */
	memset(big, 'a', sizeof(big));
	CHECK(store_msg_begin(st, "L2", 1795688103, &m) == 0);
	stage_dir_of(m, stage, sizeof(stage));
	for (int i = 0; i < 4; i++)
		CHECK(store_msg_write(m, big, sizeof(big)) == 0 && !exists(stage));
	CHECK(store_msg_write(m, big, sizeof(big)) == 0 && exists(stage));
	store_msg_abort(m);
	CHECK(!exists(stage));

	/* cannot be made: the message's error; what is there is not ours */
	CHECK(store_msg_begin(st, "L3", 1795688104, &m) == 0);
	stage_dir_of(m, stage, sizeof(stage));
	CHECK(mkdir(stage, 0700) == 0);
	CHECK(store_msg_finish_eml(m, NULL) == -EEXIST);
	CHECK(strstr(store_msg_error(m), "cannot create") != NULL);
	CHECK(store_msg_finish_eml(m, NULL) == -EEXIST); /* and again */
	store_msg_abort(m);
	CHECK(exists(stage) && rmdir(stage) == 0);

	/* made, but not opened (no descriptor left): the same error at every
	 * call, and the folder removed by the abort */
	struct rlimit was, none;
	int lowest = dup(0);

	CHECK(lowest >= 0 && close(lowest) == 0 && getrlimit(RLIMIT_NOFILE, &was) == 0);
	none = (struct rlimit){.rlim_cur = (rlim_t)lowest, .rlim_max = was.rlim_max};
	CHECK(store_msg_begin(st, "L4", 1795688105, &m) == 0);
	stage_dir_of(m, stage, sizeof(stage));
	CHECK(setrlimit(RLIMIT_NOFILE, &none) == 0);
	int r1 = store_msg_finish_eml(m, NULL), r2 = store_msg_finish_eml(m, NULL);
	CHECK(setrlimit(RLIMIT_NOFILE, &was) == 0);
	CHECK(r1 == -EMFILE && r2 == -EMFILE && exists(stage));
	store_msg_abort(m);
	CHECK(!exists(stage));
	store_close(st);
}

int
main(void)
{
	if (mkdtemp(root) == NULL)
		return 2;
	snprintf(save, sizeof(save), "%s/save", root);
	snprintf(state, sizeof(state), "%s/state", root);
	naming();
	commit_and_state();
	binding_and_damage();
	interrupted_commit();
	content_keys();
	no_free_name();
	replaced_staging_folder();
	lazy_staging();
	symlinked_staging();
	lock_and_staging();
	batches();
	batch_synced_per_file();
	detached_batch();
	longest_key();
	kept_or_written(70 * 1000, true);	     /* beyond the first buffer */
	kept_or_written(4 * 1024 * 1024, true);	     /* the largest kept */
	kept_or_written(4 * 1024 * 1024 + 1, false); /* one byte more: in pieces */
	char cmd[600];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", root);
	if (system(cmd) != 0)
		return 2;
	CHECK_DONE();
}
