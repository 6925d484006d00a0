/*
 * Unit tests: smime. Fixtures are made at run time with the openssl CLI in
 * a temporary directory: two self-signed recipients (alice, bob) as PKCS#12
 * files with passwords, a message encrypted to alice, one signed by alice.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "popfetchd/smime.h"

static char dir[] = "/tmp/test_smime.XXXXXX";

static const char entity[] = "Content-Type: text/plain; charset=utf-8\r\n"
			     "Content-Transfer-Encoding: 8bit\r\n"
			     "\r\n"
			     "The invoice is attached. Gr\xc3\xbc\xc3\x9f"
			     "e.\r\n";

static int
sh(const char *fmt, ...)
{
	char cmd[4096];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(cmd, sizeof(cmd), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(cmd))
		return -1;
	return system(cmd);
}

static char *
path(const char *name)
{
	static char buf[8][512];
	static int i;
	char *p = buf[i++ % 8];

	snprintf(p, 512, "%s/%s", dir, name);
	return p;
}

static unsigned char *
slurp(const char *name, size_t *len)
{
	FILE *f = fopen(path(name), "rb");
	unsigned char *buf = NULL;
	size_t cap = 0, n = 0, r;

	if (!f)
		return NULL;
	do {
		if (n == cap) {
			cap = cap ? 2 * cap : 4096;
			buf = realloc(buf, cap);
		}
		r = fread(buf + n, 1, cap - n, f);
		n += r;
	} while (r > 0);
	fclose(f);
	*len = n;
	return buf;
}

static int
make_fixtures(void)
{
	FILE *f;
	int rc = 0;

	if (!mkdtemp(dir))
		return -1;
	f = fopen(path("entity.txt"), "wb");
	if (!f)
		return -1;
	fwrite(entity, 1, sizeof(entity) - 1, f);
	fclose(f);
	for (int i = 0; i < 2; i++) {
		const char *who = i ? "bob" : "alice";

		rc |= sh("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -days 2 "
			 "-subj /CN=%s -keyout %s.key -out %s.crt 2>/dev/null",
			 dir, who, who, who);
		rc |= sh("cd %s && openssl pkcs12 -export -inkey %s.key -in %s.crt "
			 "-passout pass:s3cret-%s -out %s.p12",
			 dir, who, who, who, who);
	}
	/* a PKCS#12 with only the certificate */
	rc |= sh("cd %s && openssl pkcs12 -export -nokeys -in alice.crt -passout pass:x "
		 "-out nokey.p12",
		 dir);
	/* alice's key beside a certificate without a key id: bob's, or her own */
	rc |= sh("cd %s && openssl pkcs12 -export -nocerts -inkey alice.key -certfile bob.crt "
		 "-passout pass:x -out othercert.p12 2>/dev/null",
		 dir);
	rc |= sh("cd %s && openssl pkcs12 -export -nocerts -inkey alice.key -certfile alice.crt "
		 "-passout pass:x -out noid.p12 2>/dev/null",
		 dir);
	rc |= sh("cd %s && openssl cms -encrypt -binary -outform DER -aes256 -in entity.txt "
		 "-out enc.der alice.crt",
		 dir);
	rc |= sh("cd %s && openssl cms -encrypt -binary -outform DER -aes256 -in entity.txt "
		 "-out both.der bob.crt alice.crt",
		 dir);
	rc |= sh("cd %s && openssl cms -encrypt -binary -outform DER -aes256 -in entity.txt "
		 "-out bob.der bob.crt",
		 dir);
	rc |= sh("cd %s && openssl cms -sign -nodetach -binary -outform DER -in entity.txt "
		 "-signer alice.crt -inkey alice.key -out signed.der",
		 dir);
	rc |= sh("cd %s && openssl cms -sign -binary -outform DER -in entity.txt "
		 "-signer alice.crt -inkey alice.key -out detached.der",
		 dir);
	return rc ? -1 : 0;
}

static void
cleanup(void)
{
	if (strchr(dir, 'X') == NULL)
		sh("rm -rf %s", dir);
}

static struct smime_key *
load(const char *name, const char *pw)
{
	struct smime_key *k = NULL;
	char err[512] = "";
	int rc = smime_key_load(path(name), pw, &k, err, sizeof(err));

	CHECK(rc == 0);
	CHECK(k != NULL);
	if (rc)
		fprintf(stderr, "load %s: %s\n", name, err);
	return k;
}

static void
test_load_errors(void)
{
	struct smime_key *k = (struct smime_key *)1;
	char err[512];
	int rc;

	rc = smime_key_load(path("alice.p12"), "wrong-password", &k, err, sizeof(err));
	fprintf(stderr, "wrong password: %s\n", err);
	CHECK(rc == -EINVAL);
	CHECK(k == NULL);
	CHECK(strstr(err, path("alice.p12")) != NULL);
	CHECK(strstr(err, "wrong password") != NULL);
	CHECK(strstr(err, "wrong-password") == NULL);

	rc = smime_key_load(path("alice.p12"), NULL, &k, err, sizeof(err));
	fprintf(stderr, "no password: %s\n", err);
	CHECK(rc == -EINVAL);
	CHECK(strstr(err, path("alice.p12")) != NULL);

	rc = smime_key_load(path("missing.p12"), "x", &k, err, sizeof(err));
	fprintf(stderr, "missing: %s\n", err);
	CHECK(rc == -ENOENT);
	CHECK(strstr(err, path("missing.p12")) != NULL);
	CHECK(strstr(err, "no such file") != NULL);

	rc = smime_key_load(path("entity.txt"), "x", &k, err, sizeof(err));
	fprintf(stderr, "not p12: %s\n", err);
	CHECK(rc == -EINVAL);
	CHECK(strstr(err, "not a PKCS#12") != NULL);

	rc = smime_key_load(dir, "x", &k, err, sizeof(err));
	fprintf(stderr, "directory: %s\n", err);
	CHECK(rc < 0);

	rc = smime_key_load(path("nokey.p12"), "x", &k, err, sizeof(err));
	fprintf(stderr, "no key: %s\n", err);
	CHECK(rc == -EINVAL);
	CHECK(strstr(err, "no private key") != NULL);

	rc = smime_key_load(path("othercert.p12"), "x", &k, err, sizeof(err));
	fprintf(stderr, "other certificate: %s\n", err);
	CHECK(rc == -EINVAL);
	CHECK(k == NULL);
	CHECK(strstr(err, "holds no certificate for its private key") != NULL);

	k = load("noid.p12", "x");
	smime_key_free(k);

	if (geteuid() != 0) {
		sh("cp %s %s && chmod 000 %s", path("bob.p12"), path("locked.p12"),
		   path("locked.p12"));
		rc = smime_key_load(path("locked.p12"), "s3cret-bob", &k, err, sizeof(err));
		fprintf(stderr, "unreadable: %s\n", err);
		CHECK(rc == -EACCES);
		CHECK(strstr(err, path("locked.p12")) != NULL);
	}
}

/* Messages other than enc.der: for both keys, for bob only, not enveloped. */
static void
decrypt_other_messages(struct smime_key *alice, struct smime_key *bob)
{
	size_t len, outlen;
	unsigned char *der;
	char *out, why[512];
	int rc;

	/* two recipients: each can read it */
	der = slurp("both.der", &len);
	CHECK(der != NULL);
	if (der) {
		rc = smime_decrypt(alice, der, len, &out, &outlen, why, sizeof(why));
		CHECK(rc == 0 && outlen == sizeof(entity) - 1);
		free(out);
		rc = smime_decrypt(bob, der, len, &out, &outlen, why, sizeof(why));
		CHECK(rc == 0 && outlen == sizeof(entity) - 1);
		free(out);
	}
	free(der);

	der = slurp("bob.der", &len);
	CHECK(der != NULL);
	if (der) {
		rc = smime_decrypt(alice, der, len, &out, &outlen, why, sizeof(why));
		fprintf(stderr, "alice on bob's: %s\n", why);
		CHECK(rc == -1 && strstr(why, "CN=bob") != NULL);
	}
	free(der);

	/* signed data is not enveloped */
	der = slurp("signed.der", &len);
	if (der) {
		rc = smime_decrypt(alice, der, len, &out, &outlen, why, sizeof(why));
		CHECK(rc == -1);
		CHECK_STR(why, "not enveloped data");
	}
	free(der);
}

static void
test_decrypt(void)
{
	struct smime_key *alice = load("alice.p12", "s3cret-alice");
	struct smime_key *bob = load("bob.p12", "s3cret-bob");
	size_t len, outlen;
	unsigned char *der;
	char *out, why[512];
	int rc;

	der = slurp("enc.der", &len);
	CHECK(der != NULL);
	if (!der || !alice || !bob)
		goto done;
	CHECK(smime_kind(der, len) == SMIME_KIND_ENVELOPED);

	rc = smime_decrypt(alice, der, len, &out, &outlen, why, sizeof(why));
	CHECK(rc == 0);
	CHECK(outlen == sizeof(entity) - 1);
	CHECK(out && memcmp(out, entity, sizeof(entity) - 1) == 0);
	CHECK(out && out[outlen] == '\0');
	free(out);

	/* for another recipient */
	why[0] = '\0';
	rc = smime_decrypt(bob, der, len, &out, &outlen, why, sizeof(why));
	fprintf(stderr, "bob on alice's: %s\n", why);
	CHECK(rc == -1);
	CHECK(out == NULL);
	CHECK(strstr(why, "not for this key") != NULL);
	CHECK(strstr(why, "CN=alice") != NULL);

	/* no key */
	rc = smime_decrypt(NULL, der, len, &out, &outlen, why, sizeof(why));
	CHECK(rc == -1);
	CHECK_STR(why, "no key configured");

	/* a flipped byte in the ciphertext (the last bytes are the
	 * encrypted content): corrupt, not a crash */
	der[len - 5] ^= 0x55;
	rc = smime_decrypt(alice, der, len, &out, &outlen, why, sizeof(why));
	fprintf(stderr, "flipped: rc %d %s\n", rc, rc ? why : "(decrypted)");
	if (rc == 0)
		CHECK(outlen != sizeof(entity) - 1 || memcmp(out, entity, outlen) != 0);
	else
		CHECK(strncmp(why, "corrupt", 7) == 0);
	free(out);

	/* every truncation: -1 or a result, never a crash */
	der[len - 5] ^= 0x55;
	for (size_t cut = 0; cut < len; cut += (cut < 64 ? 1 : 37)) {
		rc = smime_decrypt(alice, der, cut, &out, &outlen, why, sizeof(why));
		CHECK(rc == -1 || rc == 0);
		free(out);
		CHECK(smime_kind(der, cut) >= 0);
	}
	free(der);

	decrypt_other_messages(alice, bob);
done:
	smime_key_free(alice);
	smime_key_free(bob);
}

static void
test_signed(void)
{
	size_t len, outlen;
	unsigned char *der;
	char *out, why[512];
	int rc;

	der = slurp("signed.der", &len);
	CHECK(der != NULL);
	if (!der)
		return;
	CHECK(smime_kind(der, len) == SMIME_KIND_SIGNED);
	rc = smime_unwrap_signed(der, len, &out, &outlen, why, sizeof(why));
	CHECK(rc == 0);
	CHECK(outlen == sizeof(entity) - 1);
	CHECK(out && memcmp(out, entity, sizeof(entity) - 1) == 0);
	free(out);
	for (size_t cut = 0; cut < len; cut += (cut < 64 ? 1 : 29)) {
		rc = smime_unwrap_signed(der, cut, &out, &outlen, why, sizeof(why));
		CHECK(rc == -1 || rc == 0);
		free(out);
	}
	free(der);

	der = slurp("detached.der", &len);
	CHECK(der != NULL);
	if (der) {
		CHECK(smime_kind(der, len) == SMIME_KIND_SIGNED);
		rc = smime_unwrap_signed(der, len, &out, &outlen, why, sizeof(why));
		fprintf(stderr, "detached: %s\n", why);
		CHECK(rc == -1 && strstr(why, "detached") != NULL);
	}
	free(der);

	der = slurp("enc.der", &len);
	if (der) {
		rc = smime_unwrap_signed(der, len, &out, &outlen, why, sizeof(why));
		CHECK(rc == -1);
		CHECK_STR(why, "not signed data");
	}
	free(der);
}

static void
test_garbage(void)
{
	static const char *junk[] = {
		"",
		"hello",
		"\x30",
		"\x30\x80",
		"\x30\x82\xff\xff\x06\x09",
		"\x30\x0b\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x03", /* enveloped, no content */
	};
	struct smime_key *alice = load("alice.p12", "s3cret-alice");
	size_t outlen;
	char *out, why[256];
	unsigned char rnd[4096];
	size_t len;
	unsigned char *entity_bytes = slurp("entity.txt", &len);

	for (size_t i = 0; i < sizeof(junk) / sizeof(junk[0]); i++) {
		size_t n = strlen(junk[i]);

		CHECK(smime_kind(junk[i], n) == SMIME_KIND_OTHER);
		CHECK(smime_decrypt(alice, junk[i], n, &out, &outlen, why, sizeof(why)) == -1);
		CHECK(out == NULL);
		CHECK(smime_unwrap_signed(junk[i], n, &out, &outlen, why, sizeof(why)) == -1);
		CHECK(out == NULL);
	}
	CHECK(smime_kind(NULL, 0) == SMIME_KIND_OTHER);
	CHECK(smime_decrypt(alice, NULL, 0, &out, &outlen, why, sizeof(why)) == -1);
	CHECK(smime_decrypt(alice, "x", SMIME_MAX_SIZE + 1, &out, &outlen, why, sizeof(why)) == -1);
	CHECK_STR(why, "too large");
	CHECK(smime_unwrap_signed("x", SMIME_MAX_SIZE + 1, &out, &outlen, why, sizeof(why)) == -1);
	CHECK_STR(why, "too large");
	if (entity_bytes) {
		CHECK(smime_kind(entity_bytes, len) == SMIME_KIND_OTHER);
		CHECK(smime_decrypt(alice, entity_bytes, len, &out, &outlen, why, sizeof(why)) ==
		      -1);
		fprintf(stderr, "MIME text as DER: %s\n", why);
		CHECK(strncmp(why, "corrupt", 7) == 0);
	}
	free(entity_bytes);
	srand(5);
	for (int round = 0; round < 200; round++) {
		size_t n = (size_t)(rand() % (int)sizeof(rnd));

		for (size_t i = 0; i < n; i++)
			rnd[i] = (unsigned char)rand();
		if (n > 0)
			rnd[0] = 0x30;
		CHECK(smime_kind(rnd, n) >= 0);
		if (smime_decrypt(alice, rnd, n, &out, &outlen, why, sizeof(why)) == 0)
			free(out);
		if (smime_unwrap_signed(rnd, n, &out, &outlen, why, sizeof(why)) == 0)
			free(out);
	}
	smime_key_free(alice);
	smime_key_free(NULL);
}

/* Everything of a file descriptor's file, from the start. */
static char *
read_fd(int fd, size_t *len)
{
	char *buf = calloc(1, 65536);
	ssize_t n = pread(fd, buf, 65535, 0);

	*len = n > 0 ? (size_t)n : 0;
	return buf;
}

static void
test_files(void)
{
	struct smime_key *alice = load("alice.p12", "s3cret-alice");
	struct smime_key *bob = load("bob.p12", "s3cret-bob");
	struct smime_cms *cms = NULL;
	char why[512], *got;
	size_t len;
	int in, out, full, rc;

	/* decrypted straight into a file */
	in = open(path("enc.der"), O_RDONLY);
	CHECK(smime_cms_read(in, &cms, why, sizeof(why)) == 0);
	close(in);
	CHECK(cms != NULL && smime_cms_kind(cms) == SMIME_KIND_ENVELOPED);
	out = open(path("dec.out"), O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(cms && smime_cms_decrypt(alice, cms, out, why, sizeof(why)) == 0);
	got = read_fd(out, &len);
	CHECK(len == sizeof(entity) - 1 && memcmp(got, entity, len) == 0);
	free(got);
	close(out);

	/* other recipient and no key: -1 with the same reasons as in memory */
	rc = smime_cms_decrypt(bob, cms, -1, why, sizeof(why));
	CHECK(rc == -1 && strstr(why, "not for this key") != NULL);
	rc = smime_cms_decrypt(NULL, cms, -1, why, sizeof(why));
	CHECK(rc == -1);
	CHECK_STR(why, "no key configured");

	/* a full disk is a local error (-ENOSPC), not a corrupt message */
	full = open("/dev/full", O_WRONLY);
	if (full >= 0 && cms) {
		rc = smime_cms_decrypt(alice, cms, full, why, sizeof(why));
		fprintf(stderr, "decrypt to /dev/full: %d %s\n", rc, why);
		CHECK(rc == -ENOSPC);
		CHECK(strstr(why, "cannot write") != NULL);
	}
	smime_cms_free(cms);
	cms = NULL;

	/* signed data unwrapped into a file; to /dev/full: -ENOSPC */
	in = open(path("signed.der"), O_RDONLY);
	CHECK(smime_cms_read(in, &cms, why, sizeof(why)) == 0);
	close(in);
	CHECK(cms != NULL && smime_cms_kind(cms) == SMIME_KIND_SIGNED);
	out = open(path("unwrapped.out"), O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(cms && smime_cms_unwrap_signed(cms, out, why, sizeof(why)) == 0);
	got = read_fd(out, &len);
	CHECK(len == sizeof(entity) - 1 && memcmp(got, entity, len) == 0);
	free(got);
	close(out);
	CHECK(cms && smime_cms_decrypt(alice, cms, -1, why, sizeof(why)) == -1);
	CHECK_STR(why, "not enveloped data");
	if (full >= 0 && cms)
		CHECK(smime_cms_unwrap_signed(cms, full, why, sizeof(why)) == -ENOSPC);
	smime_cms_free(cms);
	cms = NULL;

	/* detached signature: nothing to unwrap */
	in = open(path("detached.der"), O_RDONLY);
	CHECK(smime_cms_read(in, &cms, why, sizeof(why)) == 0);
	close(in);
	CHECK(cms && smime_cms_unwrap_signed(cms, -1, why, sizeof(why)) == -1);
	CHECK(strstr(why, "detached") != NULL);
	smime_cms_free(cms);
	cms = NULL;

	/* garbage and an empty file: corrupt, no structure */
	in = open(path("entity.txt"), O_RDONLY);
	CHECK(smime_cms_read(in, &cms, why, sizeof(why)) == -1 && cms == NULL);
	CHECK(strncmp(why, "corrupt", 7) == 0);
	close(in);
	in = open(path("empty"), O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(smime_cms_read(in, &cms, why, sizeof(why)) == -1 && cms == NULL);
	close(in);
	/* an unreadable descriptor: -errno */
	CHECK(smime_cms_read(-1, &cms, why, sizeof(why)) == -EBADF);
	if (full >= 0)
		close(full);
	smime_cms_free(NULL);
	smime_key_free(alice);
	smime_key_free(bob);
}

int
main(void)
{
	if (system("openssl version >/dev/null 2>&1") != 0) {
		fprintf(stderr, "openssl CLI not found: skipped\n");
		return 77;
	}
	if (make_fixtures() != 0) {
		fprintf(stderr, "fixtures could not be made in %s\n", dir);
		cleanup();
		return 1;
	}
	test_load_errors();
	test_decrypt();
	test_signed();
	test_garbage();
	test_files();
	cleanup();
	CHECK_DONE();
}
