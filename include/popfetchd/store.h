/*
 * store — what popfetchd writes: one folder per message, staged under
 * save_directory/.tmp/ID/, fsync'd and renamed into place (DESIGN.md §3), and
 * the per-configuration state under state_directory/ID/: the UIDLs already
 * saved (bound to server and user) and the lock. Knows nothing of the network.
 */
#ifndef POPFETCHD_STORE_H
#define POPFETCHD_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

/* The longest key the state records: a UIDL is 1 to 70 characters
 * 0x21-0x7E (RFC 1939 §7), a content key 65; a longer one is refused. */
#define STORE_KEY_MAX 70

struct store;
struct store_msg;

struct store_params {
	const char *id;
	const char *save_directory; /* NULL: nothing is kept (both save flags off) */
	const char *state_directory;
	const char *server; /* the state is bound to server and user */
	const char *user;
	/* make a batch durable with an fsync per file and folder instead of
	 * one syncfs; store_open sets it by itself where syncfs does not reach
	 * the storage (FUSE: sshfs and the like) */
	bool sync_per_file;
};

/*
 * Take the configuration's lock, open the staging (save_directory by its
 * path; .tmp and .tmp/ID below it never through a symlink: -ELOOP), load
 * the UIDL state, remove staging leftovers. -EBUSY when another process
 * holds the lock, another -errno for local I/O errors; err gets a line an
 * operator can act on.
 */
int store_open(const struct store_params *p, struct store **ret, char *err, size_t errlen);
void store_close(struct store *st);

/* Was this UIDL (or content key) saved before? The state knows: a record
 * written just before a rename counts once its staging folder is gone and
 * the folder it names is in save_directory with its meta.json (settled by
 * store_open). A content key recorded beside a UIDL counts as long as the
 * UIDL's record does. */
bool store_has(struct store *st, const char *uid);

/* Stage a new message folder: message.eml takes store_msg_write. The
 * staging folder itself is made when first needed, when the message is
 * finished (store_msg_finish_eml, on the thread that seals it) or grows past
 * what is kept in memory; a failure to make it is the message's error
 * (store_msg_error). 0. */
int store_msg_begin(struct store *st, const char *uid, time_t received, struct store_msg **ret);
/* The message's key is known only once it is all there (a server without
 * UIDL: a key from its content): set it before store_msg_seal. */
void store_msg_set_uid(struct store_msg *m, const char *uid);
/* The message's content key ("h" and the SHA-256 of its bytes in lowercase
 * hex), recorded beside its UIDL: should the server later give that UIDL to
 * another message too, both are known by their content, and this one is not
 * saved again. Set before store_msg_seal; ignored when it is not of that
 * form or is the message's key itself. */
void store_msg_set_content_key(struct store_msg *m, const char *key);
int store_msg_write(struct store_msg *m, const void *buf, size_t len);
/* The staged message.eml's path, for messages (the folder is used through
 * store_msg_dirfd), complete after store_msg_finish_eml. */
const char *store_msg_eml_path(const struct store_msg *m);
/* After store_msg_finish_eml and until store_msg_seal: the bytes of
 * message.eml, still in memory (*ret_len of them), or NULL when the message
 * was too large to keep (read the file instead). */
const char *store_msg_eml(const struct store_msg *m, size_t *ret_len);
/* The staged folder, for files made inside it with openat (mime_extract);
 * -1 until store_msg_finish_eml has made it. */
int store_msg_dirfd(const struct store_msg *m);
/* Close message.eml; returns its size in *ret_size. Nothing is fsync'd
 * here: store_commit makes the folder durable as a whole. */
int store_msg_finish_eml(struct store_msg *m, unsigned long long *ret_size);
/* Another file of the folder (relative name, e.g. "meta.json"), written
 * with O_EXCL|O_NOFOLLOW (made durable by store_commit). */
int store_msg_add_file(struct store_msg *m, const char *name, const void *data, size_t len);

/*
 * Group commit (DESIGN.md §4). store_msg_seal ends a complete message (with
 * keep_eml false, message.eml is removed first) and adds it to the store's
 * batch; the store owns it from then on, also when sealing fails. The
 * message is not durable, not visible, not recorded.
 */
int store_msg_seal(struct store_msg *m, bool keep_eml);
/*
 * The part of store_msg_seal that touches only m's own files (message.eml
 * closed, or removed with keep_eml false; the folder closed): a worker
 * thread may run it while the loop goes on using the store, and the loop
 * then seals m. On a failure (-errno, store_msg_error says what) m stays
 * the caller's, to abort.
 */
int store_msg_close(struct store_msg *m, bool keep_eml);
/* The last error of m's own files (store_msg_write, store_msg_finish_eml,
 * store_msg_add_file, store_msg_close): a line for the operator. */
const char *store_msg_error(const struct store_msg *m);
/* Messages in the batch, and their message bytes in *ret_bytes (may be NULL). */
size_t store_pending(const struct store *st, unsigned long long *ret_bytes);
/* A message of the batch is committed: durable, recorded, visible at
 * folder (malloc'd, the callee's; NULL when nothing is kept). */
typedef void (*store_commit_cb)(void *arg, const char *uid, char *folder, unsigned long long size);
/*
 * Make the batch durable and visible: one syncfs of save_directory's file
 * system (with sync_per_file: an fsync of each file and folder of the
 * batch), the batch's records (each naming its staging folder and its
 * folder's name in save_directory) in one append and fdatasync, the renames
 * into save_directory (never replacing anything, never of a staging entry
 * that is not the folder made for the message), one fsync of save_directory.
 * cb is called, in seal order, for each message committed, before it
 * returns; on an error (-errno, store_error() says what) the messages not
 * committed are dropped (a recorded staging folder is left for the next
 * store_open to settle). The batch is empty afterwards.
 */
int store_commit(struct store *st, store_commit_cb cb, void *arg);
/*
 * A batch committed while the store goes on: store_batch_take (on the
 * loop) takes the store's batch (the store begins a new one), and
 * store_batch_commit may then run on a worker thread while the loop
 * stages, seals and looks up messages and records keys; one batch at a
 * time per store. cb is called there, as for store_commit. Then, back on
 * the loop, store_batch_end makes the committed messages known to
 * store_has, makes a failure's words the store's (store_error), and frees
 * the batch. store_commit is the three at once.
 */
struct store_batch;
struct store_batch *store_batch_take(struct store *st);
int store_batch_commit(struct store_batch *b, store_commit_cb cb, void *arg);
void store_batch_end(struct store_batch *b);
/* Drop the batch: nothing of it was recorded; the staging is removed. */
void store_discard(struct store *st);
/* Remove the staged folder. NULL is a no-op. */
void store_msg_abort(struct store_msg *m);

/* Append the UIDL to the state and fsync it. Only after this may the
 * message be deleted from the server. */
int store_record(struct store *st, const char *uid);
/* Rewrite the state (atomically) to hold only these UIDLs (and content
 * keys): those of the listing that are still on the server. A kept UIDL
 * keeps its content key; a listed content key recorded only beside a UIDL
 * that is not kept becomes a record of its own. */
int store_compact(struct store *st, const char *const *uids, size_t n);
size_t store_count(const struct store *st);

/* "YYYYMMDDTHHMMSSZ-" + 12 hex of SHA-256(id "\0" uid): out >= 30 bytes. */
void store_folder_name(const char *id, const char *uid, time_t received, char *out, size_t size);
/* The last error's words, for a log line. */
const char *store_error(const struct store *st);

/* What store_check_dir found. */
struct store_dir_check {
	int err;	    /* 0: new files can be made; else the errno of why */
	bool cannot_create; /* err is a probe file's creation failing (EROFS, EACCES) */
	bool missing;	    /* dir does not exist yet: where takes it (a save creates it) */
	char *where;	    /* the directory probed: dir, or its nearest existing ancestor */
	char *probe;	    /* the file created there and removed, NULL when none */
	char why[600];	    /* when err: the line an operator reads, naming the path */
};

/*
 * Can files be made in dir? A probe file is created, written and removed
 * there (fsync'd with sync). A dir that does not exist yet is judged by the
 * nearest ancestor that does (missing). staging: dir is a save_directory,
 * whose messages are staged in dir/.tmp (never a symlink) and renamed into
 * dir. ret is filled in every case; store_dir_check_clear() it.
 */
void store_check_dir(const char *dir, bool staging, bool sync, struct store_dir_check *ret);
void store_dir_check_clear(struct store_dir_check *c);

#endif
