/* Unit tests: content and header keys, a message's folder (meta.json, text). */
#include <fcntl.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "check.h"
#include "popfetchd/message.h"
#include "popfetchd/store.h"
#include "popfetchd/util.h"

static void
test_keys(void)
{
	struct message_key *k = message_key_new();
	char key[MESSAGE_KEY_SIZE];

	message_key_begin(k);
	message_key_add(k, "a", 1);
	message_key_add(k, "bc", 2);
	message_key_end(k, key);
	CHECK_STR(key, "hba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");

	/* LIST size in decimal, a NUL, the header block */
	message_key_begin_headers(k, 3);
	message_key_add(k, "abc", 3);
	message_key_end(k, key);
	CHECK_STR(key, "t4719e93f644e2b399049c5188952b4993bbbf55e866ca94a060d7d2e061aae92");

	/* begun again: nothing of the key before */
	message_key_begin(k);
	message_key_end(k, key);
	CHECK_STR(key, "he3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
	message_key_free(k);
	message_key_free(NULL);
}

static char root[] = "/tmp/pfd-message-XXXXXX";
static char save[256], state[256];

static const char eml[] = "From: Alice <alice@example.org>\r\n"
			  "Subject: Hello\r\n"
			  "Message-ID: <m1@example.org>\r\n"
			  "\r\n"
			  "Hi there.\r\n";

static void
on_committed(void *arg, const char *uid, char *folder, unsigned long long size)
{
	char **ret = arg;

	(void)uid;
	(void)size;
	*ret = folder;
}

/* Stage eml as uid, seal it with p, commit: the folder (malloc'd), or NULL. */
static char *
save_one(const struct message_params *p, const char *uid)
{
	struct store_params sp = {.id = "box",
				  .save_directory = p->keep ? save : NULL,
				  .state_directory = state,
				  .server = "pop.example.org",
				  .user = "u"};
	struct message_info m = {.num = 7, .uid = uid, .received = 1000000000};
	struct store *st = NULL;
	struct store_msg *msg = NULL;
	char err[256], why[600] = "", *folder = NULL;

	CHECK(store_open(&sp, &st, err, sizeof(err)) == 0);
	if (st == NULL)
		return NULL;
	CHECK(store_msg_begin(st, uid, m.received, &msg) == 0);
	CHECK(store_msg_write(msg, eml, sizeof(eml) - 1) == 0);
	CHECK(message_seal(p, &m, st, &msg, why, sizeof(why)) == 0);
	CHECK_STR(why, "");
	CHECK(msg == NULL); /* the store's now */
	CHECK(store_pending(st, NULL) == 1);
	CHECK(store_commit(st, on_committed, &folder) == 0);
	CHECK(store_has(st, uid));
	store_close(st);
	return folder;
}

static void
test_folder(void)
{
	struct message_params p = {.id = "box", .keep = true, .save_text = true};
	char *folder = save_one(&p, "u1"), path[600];
	json_error_t jerr;
	json_t *meta;

	CHECK(folder != NULL);
	if (folder == NULL)
		return;
	snprintf(path, sizeof(path), "%s/meta.json", folder);
	meta = json_load_file(path, 0, &jerr);
	CHECK(meta != NULL);
	CHECK_STR(json_string_value(json_object_get(meta, "configuration")), "box");
	CHECK_STR(json_string_value(json_object_get(meta, "uidl")), "u1");
	CHECK_STR(json_string_value(json_object_get(meta, "received_at")), "2001-09-09T01:46:40Z");
	CHECK(json_integer_value(json_object_get(meta, "size")) == (json_int_t)sizeof(eml) - 1);
	CHECK_STR(json_string_value(json_object_get(meta, "subject")), "Hello");
	CHECK_STR(json_string_value(json_object_get(meta, "message_id")), "m1@example.org");
	CHECK(json_is_null(json_object_get(meta, "cc")));
	CHECK_STR(json_string_value(json_object_get(meta, "smime")), "none");
	CHECK_STR(json_string_value(json_array_get(json_object_get(meta, "text"), 0)), "text.txt");
	CHECK(json_array_size(json_object_get(meta, "attachments")) == 0);
	json_decref(meta);
	snprintf(path, sizeof(path), "%s/text.txt", folder);
	CHECK(access(path, F_OK) == 0);
	/* save_text keeps message.eml too */
	snprintf(path, sizeof(path), "%s/message.eml", folder);
	CHECK(access(path, F_OK) == 0);
	free(folder);

	/* nothing kept: only the record */
	p.keep = false;
	CHECK(save_one(&p, "u2") == NULL);
}

int
main(void)
{
	char cmd[300];

	test_keys();
	if (mkdtemp(root) == NULL)
		return 1;
	snprintf(save, sizeof(save), "%s/save", root);
	snprintf(state, sizeof(state), "%s/state", root);
	CHECK(mkdir(save, 0750) == 0 && mkdir(state, 0750) == 0);
	test_folder();
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", root);
	CHECK(system(cmd) == 0);
	CHECK_DONE();
}
