/*
 * mime_extract — text bodies and attachments out of a message already on
 * disk (GMime, streamed from the file), written into the staged message
 * folder under safe names (DESIGN.md §3).
 */
#ifndef POPFETCHD_MIME_EXTRACT_H
#define POPFETCHD_MIME_EXTRACT_H

#include <stdbool.h>
#include <stddef.h>

struct mime_headers;

#define MIME_DEFAULT_MAX_DEPTH	 20
#define MIME_DEFAULT_MAX_PARTS	 1000
#define MIME_DEFAULT_MAX_DECODED (1024ULL * 1024 * 1024)
#define MIME_NAME_MAX		 255

struct mime_attachment {
	char *name;	     /* the safe unique name under attachments/ */
	char *original_name; /* the decoded name as the sender gave it; NULL when none */
	char *content_type;  /* "type/subtype", lower case */
	unsigned long long size;
	char sha256[65]; /* lower-case hex of the bytes written */
};

struct mime_result {
	char *text[2]; /* "text.txt" and/or "text.html" as written */
	size_t ntext;
	struct mime_attachment *att;
	size_t natt;
	char *note;  /* limits hit, charset trouble...; NULL when nothing to say */
	char *smime; /* "none", "decrypted", "signed" or "not-decrypted: REASON" */
};

struct smime_key;

struct mime_opts {
	bool save_text, save_attachments;
	int dirfd;			/* the staged message folder */
	unsigned max_depth;		/* MIME nesting, MIME_DEFAULT_MAX_DEPTH when 0 */
	unsigned max_parts;		/* MIME_DEFAULT_MAX_PARTS when 0 */
	unsigned long long max_decoded; /* total bytes written, MIME_DEFAULT_MAX_DECODED when 0 */
	const struct smime_key *smime_key; /* NULL: no key to decrypt with */
	const char *smime_unavailable;	   /* why there is none though one was configured */
	/* when not NULL: the message's header fields for meta.json, read from
	 * the same parse (as mime_parse_headers gives them; all NULL when it is
	 * not a MIME message) */
	struct mime_headers *headers;
	/* when not NULL: the message's bytes (eml_len of them), parsed instead
	 * of reading eml_path back; they must stay until mime_extract returns */
	const char *eml;
	size_t eml_len;
};

/*
 * Parse the message in eml_path, or in o->eml when given (a relative path is relative to o->dirfd:
 * "message.eml" of the staged folder, wherever that folder is by now) and
 * write, inside o->dirfd, text.txt (the first text/plain body,
 * transfer-decoded, converted to UTF-8 best effort) and text.html (the
 * first text/html body) when save_text, and every
 * attachment into attachments/ under a safe unique name when
 * save_attachments; a nested message/rfc822 becomes attachments/SUBJECT.eml.
 * Files are created with O_EXCL|O_NOFOLLOW, mode 0640, attachments/ 0750;
 * none is fsync'd: the caller makes the folder durable as a whole.
 *
 * S/MIME (RFC 8551): a top-level application/pkcs7-mime enveloped entity is
 * decrypted with o->smime_key, signed data and multipart/signed are
 * unwrapped, and text and attachments come from the entity inside (written
 * to a hidden file in the folder while it is read, removed before return).
 * ret->smime says what was found; an entity that cannot be decrypted is
 * "not-decrypted: REASON" and nothing is extracted from it.
 *
 * Beyond a limit (depth, parts, decoded bytes) extraction stops: what was
 * written completely stays, a partly written file is removed, and ret->note
 * says which limit. Hostile or malformed input is never an error (best
 * effort, noted). Returns 0, or -errno for a local I/O error (the message
 * file cannot be read, the disk fails): the caller treats that as a failed
 * save. *ret is always set (what was written so far) and must be cleared
 * with mime_result_clear().
 */
int mime_extract(const char *eml_path, const struct mime_opts *o, struct mime_result *ret);
void mime_result_clear(struct mime_result *r);

/*
 * Pure: the safe file name (DESIGN.md §3) for an already decoded UTF-8 name
 * (NULL or invalid UTF-8 allowed, an invalid byte becomes U+FFFD): last
 * path component, the unsafe characters of util.h (controls, bidi controls,
 * ...) and / \ < > : " | ? * replaced by '_', white space trimmed,
 * no leading dot, at most 255 bytes (and size - 1) keeping the extension,
 * cut on a UTF-8 boundary; never "." or "..". An empty result becomes
 * "attachment-N.EXT" with EXT from content_type (pdf, png, jpg, txt, html,
 * eml, ... bin). size should be at least 64.
 */
void mime_safe_name(const char *decoded, const char *content_type, unsigned n, char *out,
		    size_t size);

/*
 * Pure: name made unique against the ntaken names taken so far (compared
 * ignoring ASCII case, so the folder also works on case-insensitive file
 * systems): "NAME.EXT", then "NAME (2).EXT", "NAME (3).EXT"... still at most
 * 255 bytes.
 */
void mime_unique_name(const char *name, const char *const *taken, size_t ntaken, char *out,
		      size_t size);

#endif
