/*
 * message — one received message turned into its folder's contents: its
 * text and attachments extracted beside message.eml (MIME, S/MIME), its
 * meta.json (DESIGN.md §3), and the keys that name a message the server
 * gives no UIDL for (DESIGN.md §4.3). Knows no session, no network.
 */
#ifndef POPFETCHD_MESSAGE_H
#define POPFETCHD_MESSAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

struct smime_key;
struct store;
struct store_msg;

/*
 * A key made from a message's bytes: a prefix and the SHA-256 in lowercase
 * hex. A content key ("h") hashes the whole message: byte-identical
 * messages are one message. A header key ("t") hashes its LIST size in
 * decimal, a NUL, and its header block as TOP n 0 sends it (through the
 * first empty line).
 */
#define MESSAGE_KEY_SIZE (1 + 2 * 32 + 1) /* prefix, SHA-256 in hex, NUL */

struct message_key;

struct message_key *message_key_new(void);
void message_key_free(struct message_key *k);
/* Start a content key. */
void message_key_begin(struct message_key *k);
/* Start a header key of a message LIST says is listed_size bytes. */
void message_key_begin_headers(struct message_key *k, uint64_t listed_size);
void message_key_add(struct message_key *k, const void *buf, size_t len);
/* The key, into out (MESSAGE_KEY_SIZE bytes); k must be begun again after. */
void message_key_end(struct message_key *k, char *out);

/* What one configuration asks of its messages' folders. */
struct message_params {
	const char *id; /* the configuration: log lines and meta.json */
	bool keep;	/* a save_directory: with none only the record remains */
	bool save_text, save_attachments;
	unsigned long long max_decoded;	   /* mime_opts.max_decoded */
	const struct smime_key *smime_key; /* NULL: no key to decrypt with */
	const char *smime_unavailable;	   /* why there is none though one was configured */
};

/* One message as received. */
struct message_info {
	unsigned long num; /* its number on the server, for log lines */
	const char *uid;   /* the key it is saved under */
	time_t received;   /* when its first bytes came */
};

/*
 * message.eml of *msg is all here: close it, write beside it its text,
 * attachments and meta.json (with p->keep), and seal it into st's batch.
 * Once it is in the batch the store owns the message and *msg is set to
 * NULL; on a failure before, it stays the caller's.
 * 0, or -errno with why (a line for the operator).
 */
int message_seal(const struct message_params *p, const struct message_info *m, struct store *st,
		 struct store_msg **msg, char *why, size_t whylen);
/*
 * The part of message_seal that touches nothing but msg's own folder (the
 * parse, the files written beside message.eml, store_msg_close): a worker
 * thread may run it while the loop receives the next message; the loop
 * then seals msg into the batch (store_msg_seal). msg stays the caller's,
 * also on a failure (-errno with why).
 */
int message_prepare(const struct message_params *p, const struct message_info *m,
		    struct store_msg *msg, char *why, size_t whylen);

#endif
