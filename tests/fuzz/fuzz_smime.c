/*
 * libFuzzer harness: CMS bytes (what an application/pkcs7-mime part holds
 * after base64) through every S/MIME entry point, in memory and from a file
 * (a memfd, as the daemon reads a part it staged on disk), with no key and
 * with two fixed TEST keys: tests/fuzz/keys/rsa.p12 and ec.p12, made once
 * by tests/fuzz/make-smime-seeds (never real keys). The seed corpus holds
 * messages encrypted to them, so decryption itself is reached.
 *
 * Asserts: the memory and file APIs agree (CMS or not, the kind, and for
 * unwrapping and each decryption the result, the reason and the bytes);
 * nothing comes out larger than the DER; a result fits the kind; the
 * OpenSSL error queue is empty after every call (smime.c promises it).
 *
 * One disagreement is allowed, because it is not deterministic: when the
 * RSA key transport of enveloped data does not decrypt, OpenSSL goes on with
 * a random content key rather than tell (against Bleichenbacher's attack),
 * and about one time in 256 the CBC padding of the garbage that gives is
 * valid: "decrypted". Two results that differ are accepted only when doing
 * the same again gives a different result.
 *
 * And one is allowed because the daemon does not care: in BER of an unknown
 * content type, end-of-contents octets can also be read as the value of the
 * ANY that holds the content. d2i with a length (the memory API) reads them
 * so; d2i from a BIO (the file API: asn1_d2i_read_bio frames the input
 * before decoding it) takes them for the end and then misses one: "corrupt
 * (missing eoc)" or "(header too long)". CMS of another kind or not CMS at
 * all, the part is an attachment like any other either way. Enveloped or
 * signed data must read the same.
 *
 * OpenSSL is not built with the sanitizers, so a write past a buffer inside
 * it goes unseen; the harness gives OpenSSL an allocator that puts guard
 * bytes after every block (poisoned for ASan, so our own code touching them
 * is reported too) and checks them when the block is freed or reallocated.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FUZZ_ASAN 1
#endif
#elif defined(__SANITIZE_ADDRESS__)
#define FUZZ_ASAN 1
#endif
#ifdef FUZZ_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n)   ASAN_POISON_MEMORY_REGION(p, n)
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define POISON(p, n)   ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include "popfetchd/smime.h"

#ifndef FUZZ_KEYDIR
#define FUZZ_KEYDIR "tests/fuzz/keys"
#endif
#define KEY_PASSWORD "fuzz-test-key"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool ready;
static struct smime_key *keys[3]; /* none, RSA, EC */
static int in_fd = -1, out_fd = -1;

/* ---- OpenSSL's allocator: guard bytes after every block ---- */

#define GUARD	    32
#define GUARD_BYTE  0xa5
#define GUARD_MAGIC 0x5a5a0fa110c8ed00ULL

struct block {
	size_t n;
	uint64_t magic;
}; /* 16 bytes: the block after it stays aligned as malloc's */

static void *
guard_malloc(size_t n, const char *file, int line)
{
	struct block *b;
	unsigned char *p;

	(void)file;
	(void)line;
	if (n > SIZE_MAX - sizeof(*b) - GUARD || (b = malloc(sizeof(*b) + n + GUARD)) == NULL)
		return NULL;
	b->n = n;
	b->magic = GUARD_MAGIC;
	p = (unsigned char *)(b + 1);
	memset(p + n, GUARD_BYTE, GUARD);
	POISON(p + n, GUARD);
	return p;
}

static struct block *
guard_check(void *p, const char *file, int line)
{
	struct block *b = (struct block *)p - 1;
	unsigned char *g;

	if (b->magic != GUARD_MAGIC) {
		fprintf(stderr, "fuzz_smime: OpenSSL freed %p, not a block it allocated (%s:%d)\n",
			p, file ? file : "?", line);
		abort();
	}
	g = (unsigned char *)p + b->n;
	UNPOISON(g, GUARD);
	for (size_t i = 0; i < GUARD; i++) {
		if (g[i] != GUARD_BYTE) {
			fprintf(stderr,
				"fuzz_smime: heap overflow inside OpenSSL: byte %zu past a block "
				"of %zu bytes was written; freed at %s:%d\n",
				i, b->n, file ? file : "?", line);
			abort();
		}
	}
	return b;
}

static void
guard_free(void *p, const char *file, int line)
{
	if (p != NULL)
		free(guard_check(p, file, line));
}

static void *
guard_realloc(void *p, size_t n, const char *file, int line)
{
	struct block *b;
	void *q;

	if (p == NULL)
		return guard_malloc(n, file, line);
	b = guard_check(p, file, line);
	POISON((unsigned char *)p + b->n, GUARD);
	if ((q = guard_malloc(n, file, line)) == NULL)
		return NULL;
	memcpy(q, p, b->n < n ? b->n : n);
	guard_free(p, file, line);
	return q;
}

static void
setup(void)
{
	const char *dir = getenv("POPFETCHD_FUZZ_KEYDIR");
	const char *names[] = {"rsa.p12", "ec.p12"};
	char path[4096], err[512];

	/* before OpenSSL allocates anything, or it keeps its own */
	if (!CRYPTO_set_mem_functions(guard_malloc, guard_realloc, guard_free))
		fprintf(stderr,
			"fuzz_smime: OpenSSL allocated before the harness: no guard bytes\n");
	if (dir == NULL)
		dir = FUZZ_KEYDIR;
	for (int i = 0; i < 2; i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
		if (smime_key_load(path, KEY_PASSWORD, &keys[i + 1], err, sizeof(err)) < 0) {
			fprintf(stderr, "fuzz_smime: %s (POPFETCHD_FUZZ_KEYDIR says where)\n", err);
			abort();
		}
	}
	in_fd = memfd_create("fuzz-smime-in", MFD_CLOEXEC);
	out_fd = memfd_create("fuzz-smime-out", MFD_CLOEXEC);
	if (in_fd < 0 || out_fd < 0)
		abort();
	ready = true;
}

static void
queue_empty(const char *after)
{
	if (ERR_peek_error() != 0) {
		fprintf(stderr, "fuzz_smime: OpenSSL error queue not empty after %s\n", after);
		ERR_print_errors_fp(stderr);
		abort();
	}
}

/* fd holds exactly data, read from its start. */
static void
fill(int fd, const void *data, size_t size)
{
	size_t done = 0;

	if (ftruncate(fd, 0) < 0 || lseek(fd, 0, SEEK_SET) < 0)
		abort();
	while (done < size) {
		ssize_t w = write(fd, (const char *)data + done, size - done);
		if (w <= 0)
			abort();
		done += (size_t)w;
	}
	if (lseek(fd, 0, SEEK_SET) < 0)
		abort();
}

/* What was written to fd (malloc'd; *len bytes). */
static char *
slurp(int fd, size_t *len)
{
	struct stat st;
	char *buf;
	size_t done = 0;

	if (fstat(fd, &st) < 0 || (buf = malloc((size_t)st.st_size + 1)) == NULL)
		abort();
	while (done < (size_t)st.st_size) {
		ssize_t r = pread(fd, buf + done, (size_t)st.st_size - done, (off_t)done);
		if (r <= 0)
			abort();
		done += (size_t)r;
	}
	*len = done;
	return buf;
}

/* What one call said: its return, its reason, what it wrote. */
struct outcome {
	int rc;
	char why[512];
	char *out;
	size_t len;
};

static void
outcome_clear(struct outcome *o)
{
	free(o->out);
	o->out = NULL;
}

static bool
same(const struct outcome *a, const struct outcome *b)
{
	if (a->rc != b->rc)
		return false;
	if (a->rc != 0)
		return strcmp(a->why, b->why) == 0;
	return a->len == b->len && memcmp(a->out, b->out, a->len) == 0;
}

/* The input read again through the file API: its CMS, or NULL and why. */
static struct smime_cms *
read_cms(char *why, size_t whylen)
{
	struct smime_cms *c = NULL;
	int rc;

	why[0] = '\0';
	if (lseek(in_fd, 0, SEEK_SET) < 0)
		abort();
	rc = smime_cms_read(in_fd, &c, why, whylen);
	queue_empty("smime_cms_read");
	if (rc < -1 || (rc == 0) != (c != NULL))
		abort();
	if (rc == -1 && strncmp(why, "corrupt (", 9) != 0)
		abort();
	return c;
}

/* A memory API result, checked against what the header promises. */
static void
check_memory(const struct outcome *o, size_t size)
{
	if (o->rc == 0 && (o->out == NULL || o->out[o->len] != '\0' || o->len > size))
		abort();
	if (o->rc != 0 && (o->rc != -1 || o->out != NULL || o->why[0] == '\0'))
		abort();
}

/* op 0: unwrapping; 1 + i: decryption with keys[i]. */
static const char *const op_names[] = {"unwrap", "decrypt without key", "decrypt with the RSA key",
				       "decrypt with the EC key"};

static void
memory_op(int op, const uint8_t *data, size_t size, struct outcome *o)
{
	o->why[0] = '\0';
	if (op == 0)
		o->rc = smime_unwrap_signed(data, size, &o->out, &o->len, o->why, sizeof(o->why));
	else
		o->rc = smime_decrypt(keys[op - 1], data, size, &o->out, &o->len, o->why,
				      sizeof(o->why));
	queue_empty(op ? "smime_decrypt" : "smime_unwrap_signed");
	check_memory(o, size);
}

/* The same through the file API: a fresh structure each time, as the
 * daemon reads one per message. */
static void
file_op(int op, struct outcome *o)
{
	struct smime_cms *c = read_cms(o->why, sizeof(o->why));

	if (c == NULL)
		abort(); /* it was CMS a moment ago */
	fill(out_fd, "", 0);
	o->why[0] = '\0';
	if (op == 0)
		o->rc = smime_cms_unwrap_signed(c, out_fd, o->why, sizeof(o->why));
	else
		o->rc = smime_cms_decrypt(keys[op - 1], c, out_fd, o->why, sizeof(o->why));
	queue_empty(op ? "smime_cms_decrypt" : "smime_cms_unwrap_signed");
	smime_cms_free(c);
	o->out = slurp(out_fd, &o->len);
	if (o->rc != 0 && o->rc != -1)
		abort(); /* a memfd does not fail to be written */
}

static void
compare(int op, int kind, const uint8_t *data, size_t size)
{
	struct outcome m, f, again;
	bool random = false;

	memory_op(op, data, size, &m);
	/* signed data unwraps; enveloped data decrypts, and only with a key */
	if (m.rc == 0 && (op == 0 ? kind != SMIME_KIND_SIGNED
				  : kind != SMIME_KIND_ENVELOPED || keys[op - 1] == NULL))
		abort();
	file_op(op, &f);
	if (!same(&m, &f)) {
		/* only a result that changes when asked again may differ */
		for (int t = 0; t < 4 && !random; t++) {
			memory_op(op, data, size, &again);
			random = !same(&again, &m);
			outcome_clear(&again);
			file_op(op, &again);
			random = random || !same(&again, &f);
			outcome_clear(&again);
		}
		if (!random) {
			fprintf(stderr,
				"fuzz_smime: %s: memory %d \"%s\" (%zu bytes), file %d \"%s\" "
				"(%zu bytes)\n",
				op_names[op], m.rc, m.rc ? m.why : "", m.len, f.rc,
				f.rc ? f.why : "", f.len);
			abort();
		}
	}
	outcome_clear(&m);
	outcome_clear(&f);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct outcome m;
	struct smime_cms *c;
	char why[512];
	int kind;
	bool cms;

	if (!ready)
		setup();

	kind = smime_kind(data, size);
	queue_empty("smime_kind");
	if (kind != SMIME_KIND_OTHER && kind != SMIME_KIND_ENVELOPED && kind != SMIME_KIND_SIGNED)
		abort();

	/* CMS or not, and which kind: the memory API tells by its reason */
	memory_op(0, data, size, &m);
	cms = !(m.rc < 0 && strncmp(m.why, "corrupt (", 9) == 0);
	if (!cms && kind != SMIME_KIND_OTHER)
		abort();
	outcome_clear(&m);
	fill(in_fd, data, size);
	c = read_cms(why, sizeof(why));
	if (cms && c == NULL && kind == SMIME_KIND_OTHER)
		return 0; /* BER of another content type, framed two ways: see above */
	if (cms != (c != NULL)) {
		fprintf(stderr, "fuzz_smime: the memory API %s CMS, the file API %s (%s)\n",
			cms ? "reads" : "does not read", c ? "does" : "does not", c ? "" : why);
		abort();
	}
	if (c == NULL)
		return 0;
	if (smime_cms_kind(c) != kind)
		abort();
	smime_cms_free(c);

	for (int op = 0; op < 4; op++)
		compare(op, kind, data, size);
	return 0;
}
