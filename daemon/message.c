/*
 * message — one received message turned into its folder's contents (see
 * message.h).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "popfetchd/log.h"
#include "popfetchd/message.h"
#include "popfetchd/mime.h"
#include "popfetchd/mime_extract.h"
#include "popfetchd/store.h"
#include "popfetchd/util.h"

#define CONTENT_KEY_PREFIX 'h'
#define HEADER_KEY_PREFIX  't'

struct message_key {
	EVP_MD_CTX *md;
	char prefix;
};

struct message_key *
message_key_new(void)
{
	struct message_key *k = xcalloc(1, sizeof(*k));

	k->md = EVP_MD_CTX_new();
	if (k->md == NULL)
		abort();
	return k;
}

void
message_key_free(struct message_key *k)
{
	if (k != NULL)
		EVP_MD_CTX_free(k->md);
	free(k);
}

void
message_key_begin(struct message_key *k)
{
	if (!EVP_DigestInit_ex(k->md, EVP_sha256(), NULL))
		abort();
	k->prefix = CONTENT_KEY_PREFIX;
}

void
message_key_begin_headers(struct message_key *k, uint64_t listed_size)
{
	char size[32];

	snprintf(size, sizeof(size), "%llu", (unsigned long long)listed_size);
	if (!EVP_DigestInit_ex(k->md, EVP_sha256(), NULL) ||
	    !EVP_DigestUpdate(k->md, size, strlen(size) + 1))
		abort();
	k->prefix = HEADER_KEY_PREFIX;
}

void
message_key_add(struct message_key *k, const void *buf, size_t len)
{
	EVP_DigestUpdate(k->md, buf, len);
}

void
message_key_end(struct message_key *k, char *out)
{
	unsigned char d[EVP_MAX_MD_SIZE];
	unsigned int dlen = 0;

	if (!EVP_DigestFinal_ex(k->md, d, &dlen) || dlen != 32)
		abort();
	out[0] = k->prefix;
	util_hex(d, dlen, out + 1);
}

static char *
rfc3339(time_t t)
{
	struct tm tm;
	char buf[32];

	gmtime_r(&t, &tm);
	strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
	return xstrdup(buf);
}

static json_t *
str_or_null(const char *s)
{
	return s ? json_string(s) : json_null();
}

static json_t *
attachments_json(const struct mime_result *mr)
{
	json_t *att = json_array();

	for (size_t i = 0; i < mr->natt; i++) {
		const struct mime_attachment *a = &mr->att[i];
		json_t *e = json_object();
		json_object_set_new(e, "name", json_string(a->name));
		json_object_set_new(e, "original_name", str_or_null(a->original_name));
		json_object_set_new(e, "content_type", json_string(a->content_type));
		json_object_set_new(e, "size", json_integer((json_int_t)a->size));
		json_object_set_new(e, "sha256", json_string(a->sha256));
		json_array_append_new(att, e);
	}
	return att;
}

/* meta.json of DESIGN.md §3: what is known of the message. */
static char *
build_meta(const struct message_params *p, const struct message_info *m, unsigned long long size,
	   const struct mime_headers *h, const struct mime_result *mr)
{
	char *when = rfc3339(m->received), *text;
	json_t *o = json_object(), *texts = json_array();

	json_object_set_new(o, "configuration", json_string(p->id));
	json_object_set_new(o, "uidl", json_string(m->uid));
	json_object_set_new(o, "received_at", json_string(when));
	json_object_set_new(o, "size", json_integer((json_int_t)size));
	json_object_set_new(o, "message_id", str_or_null(h->message_id));
	json_object_set_new(o, "date", str_or_null(h->date));
	json_object_set_new(o, "from", str_or_null(h->from));
	json_object_set_new(o, "to", str_or_null(h->to));
	json_object_set_new(o, "cc", str_or_null(h->cc));
	json_object_set_new(o, "subject", str_or_null(h->subject));
	json_object_set_new(o, "smime", json_string(mr->smime ? mr->smime : "none"));
	for (size_t i = 0; i < mr->ntext; i++)
		json_array_append_new(texts, json_string(mr->text[i]));
	json_object_set_new(o, "text", texts);
	json_object_set_new(o, "attachments", attachments_json(mr));
	if (mr->note != NULL)
		json_object_set_new(o, "note", json_string(mr->note));
	/* invalid UTF-8 from a stranger is replaced, never fatal */
	text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
	json_decref(o);
	free(when);
	if (text == NULL)
		abort();
	char *line = xasprintf("%s\n", text);
	free(text);
	return line;
}

/* Beside message.eml in the staged folder: its text and attachments, and
 * meta.json, the header fields read by the same parse. */
static int
describe(const struct message_params *p, const struct message_info *m, unsigned long long size,
	 struct store_msg *msg, char *why, size_t whylen)
{
	struct mime_headers h = {0};
	struct mime_result mr = {0};
	struct mime_opts mo = {.save_text = p->save_text,
			       .save_attachments = p->save_attachments,
			       .dirfd = store_msg_dirfd(msg),
			       .max_decoded = p->max_decoded,
			       .smime_key = p->smime_key,
			       .smime_unavailable = p->smime_unavailable,
			       .headers = &h};
	char *meta;
	int r;

	mo.eml = store_msg_eml(msg, &mo.eml_len);
	/* hostile content is never an error; a disk that fails is */
	if ((r = mime_extract("message.eml", &mo, &mr)) < 0) {
		snprintf(why, whylen, "cannot write its text or attachments beside %s: %s",
			 store_msg_eml_path(msg), strerror(-r));
		mime_result_clear(&mr);
		mime_headers_clear(&h);
		return r;
	}
	if (mr.note != NULL)
		log_notice(p->id, "message %lu (%s): %s", m->num, m->uid, mr.note);
	if (mr.smime != NULL && strncmp(mr.smime, "not-", 4) == 0)
		log_warning(p->id, "message %lu (%s) is saved as it came, %s", m->num, m->uid,
			    mr.smime);
	meta = build_meta(p, m, size, &h, &mr);
	mime_result_clear(&mr);
	mime_headers_clear(&h);
	r = store_msg_add_file(msg, "meta.json", meta, strlen(meta));
	free(meta);
	if (r < 0)
		snprintf(why, whylen, "%s", store_msg_error(msg));
	return r;
}

int
message_prepare(const struct message_params *p, const struct message_info *m, struct store_msg *msg,
		char *why, size_t whylen)
{
	unsigned long long size;
	int r;

	if (store_msg_finish_eml(msg, &size) < 0) {
		snprintf(why, whylen, "%s", store_msg_error(msg));
		return -EIO;
	}
	/* with nothing kept, only the UIDL record remains: no text, no meta.json */
	if (p->keep && (r = describe(p, m, size, msg, why, whylen)) < 0)
		return r;
	if ((r = store_msg_close(msg, p->save_text)) < 0)
		snprintf(why, whylen, "%s", store_msg_error(msg));
	return r;
}

int
message_seal(const struct message_params *p, const struct message_info *m, struct store *st,
	     struct store_msg **msg, char *why, size_t whylen)
{
	int r;

	if ((r = message_prepare(p, m, *msg, why, whylen)) < 0)
		return r;
	/* the store owns it from here, also when sealing fails */
	r = store_msg_seal(*msg, p->save_text);
	*msg = NULL;
	if (r < 0)
		snprintf(why, whylen, "%s", store_error(st));
	return r;
}
