/*
 * smime — S/MIME with OpenSSL CMS: a PKCS#12 key loaded once per
 * configuration, decryption of enveloped data, unwrapping of signed data.
 * Works on DER bytes (an application/pkcs7-mime part after base64 decoding);
 * knows nothing of MIME structure, files or the network.
 */
#ifndef POPFETCHD_SMIME_H
#define POPFETCHD_SMIME_H

#include <stdbool.h>
#include <stddef.h>

/* Ceiling on the DER handed in and on what comes out (decrypted or
 * unwrapped content is never larger than the DER that holds it). */
#define SMIME_MAX_SIZE ((size_t)256 << 20)

enum smime_kind {
	SMIME_KIND_OTHER = 0,	  /* not CMS, corrupt, or another content type */
	SMIME_KIND_ENVELOPED = 1, /* enveloped-data (or auth-enveloped-data) */
	SMIME_KIND_SIGNED = 2,	  /* signed-data */
};

struct smime_key;

/* Load KEYSTORE/NAME.p12 with its password (NULL: none). 0, or -errno
 * (missing, unreadable) / -EINVAL (not PKCS#12, wrong password, no private
 * key, certificate not matching the key, unsupported algorithm) with one line
 * in err that names the file and says what is wrong — never the password. */
int smime_key_load(const char *p12_path, const char *password, struct smime_key **ret, char *err,
		   size_t errlen);
void smime_key_free(struct smime_key *k);

/* The key's certificate, for the test command. */
struct smime_key_info {
	char subject[256];  /* RFC 2253 */
	char not_after[24]; /* RFC 3339, UTC; "" when unreadable */
	bool expired;	    /* now is past not_after */
};
void smime_key_info(const struct smime_key *k, struct smime_key_info *ret);

/* Decrypt CMS enveloped data with the key and its certificate: 0 and the
 * decrypted MIME entity in *out (malloc'd, NUL-terminated, *outlen bytes
 * without the NUL). -1 with a reason in why: "no key configured", "not for
 * this key (the recipient is ...)", "not enveloped data", "corrupt (...)",
 * "too large". k may be NULL (no key configured). */
int smime_decrypt(const struct smime_key *k, const void *der, size_t len, char **out,
		  size_t *outlen, char *why, size_t whylen);

/* The content of CMS signed-data (encapsulated, not detached), without
 * verifying the signature. 0 and *out, *outlen as above, or -1 with why:
 * "not signed data", "no encapsulated content (detached signature)",
 * "corrupt", "too large". */
int smime_unwrap_signed(const void *der, size_t len, char **out, size_t *outlen, char *why,
			size_t whylen);

/* What the DER holds: SMIME_KIND_ENVELOPED (1), SMIME_KIND_SIGNED (2) or
 * SMIME_KIND_OTHER (0, also for garbage). */
int smime_kind(const void *der, size_t len);

/*
 * The same from and to files, for large mail: only the CMS structure is
 * held in memory, the content goes straight to out_fd.
 * smime_cms_read: the DER in fd (read from its current offset): 0, -1 with
 * why ("corrupt (...)", "too large"), or -errno when fd cannot be read.
 * smime_cms_decrypt / smime_cms_unwrap_signed: 0, -1 with why (as the
 * functions above), or -errno when out_fd cannot be written (why says so).
 */
struct smime_cms;
int smime_cms_read(int fd, struct smime_cms **ret, char *why, size_t whylen);
int smime_cms_kind(const struct smime_cms *c);
int smime_cms_decrypt(const struct smime_key *k, struct smime_cms *c, int out_fd, char *why,
		      size_t whylen);
int smime_cms_unwrap_signed(struct smime_cms *c, int out_fd, char *why, size_t whylen);
void smime_cms_free(struct smime_cms *c);

#endif
