/*
 * smime — PKCS#12 keys and CMS enveloped / signed data (OpenSSL 3).
 *
 * Everything here is parsed from bytes a stranger wrote: the DER is bounded
 * before OpenSSL sees it (SMIME_MAX_SIZE), and since neither decryption nor
 * unwrapping can produce more than the DER holds, that bound is also the
 * bound on what we hand back. Decryption is only attempted for a recipient
 * that names our certificate, so a message for someone else is told apart
 * from a corrupt one, and the operator learns who it was for.
 *
 * The OpenSSL error queue is left empty on return: the TLS code of the same
 * thread reads it.
 */
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pkcs12.h>
#include <openssl/x509.h>

#include "popfetchd/smime.h"

struct smime_key {
	EVP_PKEY *pkey;
	X509 *cert;
};

/* The reason of the last OpenSSL error, or fallback; clears the queue. */
static const char *
ssl_reason(const char *fallback)
{
	unsigned long e = ERR_peek_last_error();
	const char *r = e ? ERR_reason_error_string(e) : NULL;

	ERR_clear_error();
	return r ? r : fallback;
}

static int
unsupported_algorithm(void)
{
	unsigned long e;

	while ((e = ERR_get_error()) != 0) {
		int r = ERR_GET_REASON(e);

		if (r == ERR_R_UNSUPPORTED || r == ERR_R_FETCH_FAILED ||
		    (ERR_GET_LIB(e) == ERR_LIB_EVP && r == EVP_R_UNSUPPORTED_ALGORITHM)) {
			ERR_clear_error();
			return 1;
		}
	}
	return 0;
}

static int
load_fail(int rc, char *err, size_t errlen, const char *path, const char *what)
{
	if (err && errlen)
		snprintf(err, errlen, "S/MIME key %s: %s", path, what);
	ERR_clear_error();
	return rc;
}

static const char unsupported_why[] = "uses an algorithm this OpenSSL does not provide "
				      "(a legacy PKCS#12? re-export it with AES)";

/* The PKCS#12 structure in the file at path; a load_fail() code when it
 * cannot be read or is not one. */
static int
read_p12(const char *path, PKCS12 **ret, char *err, size_t errlen)
{
	FILE *f;
	struct stat st;
	int e, rc = 0;

	*ret = NULL;
	f = fopen(path, "rb");
	if (!f) {
		e = errno;
		return load_fail(-e, err, errlen, path, e == ENOENT ? "no such file" : strerror(e));
	}
	if (fstat(fileno(f), &st) == 0 && !S_ISREG(st.st_mode)) {
		rc = load_fail(-EINVAL, err, errlen, path, "not a regular file");
	} else if ((*ret = d2i_PKCS12_fp(f, NULL)) == NULL && ferror(f)) {
		e = errno ? errno : EIO;
		rc = load_fail(-e, err, errlen, path, strerror(e));
	} else if (*ret == NULL) {
		rc = load_fail(-EINVAL, err, errlen, path, "not a PKCS#12 file");
	}
	fclose(f);
	return rc;
}

/* The password that opens p12, as its MAC tells: *pass is password, or
 * NULL or "" for an empty or absent one (either may have been used when
 * exporting). A load_fail() code when the MAC refuses it. */
static int
check_mac(PKCS12 *p12, const char *path, const char *password, const char **pass, char *err,
	  size_t errlen)
{
	int ok;

	*pass = password;
	if (!PKCS12_mac_present(p12))
		return 0;
	if (!password || !*password) {
		ok = PKCS12_verify_mac(p12, NULL, 0);
		if (ok) {
			*pass = NULL;
		} else {
			ERR_clear_error();
			ok = PKCS12_verify_mac(p12, "", 0);
			*pass = "";
		}
	} else {
		ok = PKCS12_verify_mac(p12, password, -1);
	}
	if (ok)
		return 0;
	return load_fail(-EINVAL, err, errlen, path,
			 unsupported_algorithm() ? unsupported_why
			 : (password && *password)
				 ? "wrong password (MAC verification failed)"
				 : "a password is needed (MAC verification failed)");
}

/* The certificate among certs that belongs to pkey, with a reference of its
 * own; NULL when none does. PKCS12_parse matches the certificate by local
 * key id; a file without ids still carries the right one among the others. */
static X509 *
cert_for_key(STACK_OF(X509) * certs, EVP_PKEY *pkey)
{
	X509 *cert = NULL;

	for (int i = 0; i < sk_X509_num(certs); i++) {
		X509 *c = sk_X509_value(certs, i);

		if (X509_check_private_key(c, pkey)) {
			cert = c;
			X509_up_ref(cert);
			break;
		}
	}
	ERR_clear_error();
	return cert;
}

int
smime_key_load(const char *p12_path, const char *password, struct smime_key **ret, char *err,
	       size_t errlen)
{
	PKCS12 *p12 = NULL;
	EVP_PKEY *pkey = NULL;
	X509 *cert = NULL;
	STACK_OF(X509) *ca = NULL;
	const char *pass;
	struct smime_key *k;
	char buf[256];
	int rc;

	*ret = NULL;
	ERR_clear_error();
	if ((rc = read_p12(p12_path, &p12, err, errlen)) < 0)
		return rc;
	if ((rc = check_mac(p12, p12_path, password, &pass, err, errlen)) < 0)
		goto out;
	if (!PKCS12_parse(p12, pass, &pkey, &cert, &ca)) {
		if (unsupported_algorithm()) {
			rc = load_fail(-EINVAL, err, errlen, p12_path, unsupported_why);
		} else {
			snprintf(buf, sizeof(buf), "cannot be decoded (%s)",
				 ssl_reason("parse error"));
			rc = load_fail(-EINVAL, err, errlen, p12_path, buf);
		}
		goto out;
	}
	if (!pkey) {
		rc = load_fail(-EINVAL, err, errlen, p12_path, "holds no private key");
		goto out;
	}
	if (!cert)
		cert = cert_for_key(ca, pkey);
	if (!cert) {
		rc = load_fail(-EINVAL, err, errlen, p12_path,
			       "holds no certificate for its private key");
		goto out;
	}
	if (!X509_check_private_key(cert, pkey)) {
		rc = load_fail(-EINVAL, err, errlen, p12_path,
			       "its certificate does not match its private key");
		goto out;
	}
	k = calloc(1, sizeof(*k));
	if (!k) {
		rc = load_fail(-ENOMEM, err, errlen, p12_path, strerror(ENOMEM));
		goto out;
	}
	k->pkey = pkey;
	k->cert = cert;
	pkey = NULL;
	cert = NULL;
	*ret = k;
	rc = 0;
out:
	EVP_PKEY_free(pkey);
	X509_free(cert);
	sk_X509_pop_free(ca, X509_free);
	PKCS12_free(p12);
	ERR_clear_error();
	return rc;
}

void
smime_key_free(struct smime_key *k)
{
	if (!k)
		return;
	EVP_PKEY_free(k->pkey);
	X509_free(k->cert);
	free(k);
}

void
smime_key_info(const struct smime_key *k, struct smime_key_info *ret)
{
	const ASN1_TIME *until = X509_get0_notAfter(k->cert);
	BIO *b = BIO_new(BIO_s_mem());
	char *data;
	long n;
	struct tm tm;

	memset(ret, 0, sizeof(*ret));
	if (b != NULL) {
		X509_NAME_print_ex(b, X509_get_subject_name(k->cert), 0,
				   XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB);
		n = BIO_get_mem_data(b, &data);
		snprintf(ret->subject, sizeof(ret->subject), "%.*s", (int)(n > 0 ? n : 0), data);
		BIO_free(b);
	}
	if (until != NULL && ASN1_TIME_to_tm(until, &tm) == 1)
		strftime(ret->not_after, sizeof(ret->not_after), "%Y-%m-%dT%H:%M:%SZ", &tm);
	ret->expired = until != NULL && X509_cmp_current_time(until) < 0;
	ERR_clear_error();
}

static void
set_why(char *why, size_t whylen, const char *fmt, const char *arg)
{
	if (!why || !whylen)
		return;
	if (arg)
		snprintf(why, whylen, fmt, arg);
	else
		snprintf(why, whylen, "%s", fmt);
}

static CMS_ContentInfo *
parse(const void *der, size_t len)
{
	const unsigned char *p = der;

	if (!der || len == 0 || len > SMIME_MAX_SIZE || len > LONG_MAX)
		return NULL;
	return d2i_CMS_ContentInfo(NULL, &p, (long)len);
}

int
smime_kind(const void *der, size_t len)
{
	CMS_ContentInfo *cms = parse(der, len);
	int kind = SMIME_KIND_OTHER;

	if (!cms) {
		ERR_clear_error();
		return SMIME_KIND_OTHER;
	}
	switch (OBJ_obj2nid(CMS_get0_type(cms))) {
	case NID_pkcs7_enveloped:
	case NID_id_smime_ct_authEnvelopedData:
		kind = SMIME_KIND_ENVELOPED;
		break;
	case NID_pkcs7_signed:
		kind = SMIME_KIND_SIGNED;
		break;
	}
	CMS_ContentInfo_free(cms);
	ERR_clear_error();
	return kind;
}

/* "issuer CN=x, serial 0x1f" or "subject key id 0a:..". into out. */
static void
describe_id(char *out, size_t outlen, const ASN1_OCTET_STRING *keyid, const X509_NAME *issuer,
	    const ASN1_INTEGER *serial)
{
	*out = '\0';
	if (issuer && serial) {
		BIO *b = BIO_new(BIO_s_mem());
		BIGNUM *bn = ASN1_INTEGER_to_BN(serial, NULL);
		char *hex = bn ? BN_bn2hex(bn) : NULL;
		char name[200] = "?";

		if (b && X509_NAME_print_ex(b, issuer, 0, XN_FLAG_RFC2253) >= 0) {
			int n = BIO_read(b, name, sizeof(name) - 1);

			name[n > 0 ? n : 0] = '\0';
		}
		snprintf(out, outlen, "issuer %s, serial 0x%s", name, hex ? hex : "?");
		OPENSSL_free(hex);
		BN_free(bn);
		BIO_free(b);
	} else if (keyid) {
		size_t o = 0;
		int n = ASN1_STRING_length(keyid);
		const unsigned char *d = ASN1_STRING_get0_data(keyid);

		o = (size_t)snprintf(out, outlen, "subject key id ");
		for (int i = 0; i < n && o + 4 < outlen; i++)
			o += (size_t)snprintf(out + o, outlen - o, "%s%02x", i ? ":" : "", d[i]);
	} else {
		snprintf(out, outlen, "an unidentified recipient");
	}
}

/* 1 if some recipient names our certificate (or we cannot tell, e.g. a
 * password or KEK recipient: let OpenSSL decide), 0 if none does; then
 * who[] describes the first recipient and *n counts them. */
static int
recipient_match(CMS_ContentInfo *cms, X509 *cert, char *who, size_t wholen, int *n)
{
	STACK_OF(CMS_RecipientInfo) *ris = CMS_get0_RecipientInfos(cms);
	int undecided = 0;

	*n = 0;
	*who = '\0';
	for (int i = 0; i < sk_CMS_RecipientInfo_num(ris); i++) {
		CMS_RecipientInfo *ri = sk_CMS_RecipientInfo_value(ris, i);
		ASN1_OCTET_STRING *keyid = NULL;
		X509_NAME *issuer = NULL;
		ASN1_INTEGER *serial = NULL;

		switch (CMS_RecipientInfo_type(ri)) {
		case CMS_RECIPINFO_TRANS:
			if (CMS_RecipientInfo_ktri_cert_cmp(ri, cert) == 0)
				return 1;
			if (CMS_RecipientInfo_ktri_get0_signer_id(ri, &keyid, &issuer, &serial) &&
			    (*n)++ == 0)
				describe_id(who, wholen, keyid, issuer, serial);
			break;
		case CMS_RECIPINFO_AGREE: {
			STACK_OF(CMS_RecipientEncryptedKey) *reks =
				CMS_RecipientInfo_kari_get0_reks(ri);

			for (int j = 0; j < sk_CMS_RecipientEncryptedKey_num(reks); j++) {
				CMS_RecipientEncryptedKey *rek =
					sk_CMS_RecipientEncryptedKey_value(reks, j);

				if (CMS_RecipientEncryptedKey_cert_cmp(rek, cert) == 0)
					return 1;
				keyid = NULL;
				issuer = NULL;
				serial = NULL;
				if (CMS_RecipientEncryptedKey_get0_id(rek, &keyid, NULL, NULL,
								      &issuer, &serial) &&
				    (*n)++ == 0)
					describe_id(who, wholen, keyid, issuer, serial);
			}
			break;
		}
		default:
			undecided = 1;
			break;
		}
	}
	ERR_clear_error();
	return undecided;
}

/* Copy a memory BIO's bytes into a fresh NUL-terminated buffer. */
static int
take_bio(BIO *b, char **out, size_t *outlen, char *why, size_t whylen)
{
	char *data;
	long n = BIO_get_mem_data(b, &data);
	char *copy;

	if (n < 0 || (size_t)n > SMIME_MAX_SIZE) {
		set_why(why, whylen, "too large", NULL);
		return -1;
	}
	copy = malloc((size_t)n + 1);
	if (!copy) {
		set_why(why, whylen, "out of memory", NULL);
		return -1;
	}
	if (n > 0)
		memcpy(copy, data, (size_t)n);
	copy[n] = '\0';
	*out = copy;
	*outlen = (size_t)n;
	return 0;
}

/* The CMS structure of der, after the checks both entry points share. */
static CMS_ContentInfo *
open_cms(const void *der, size_t len, char **out, size_t *outlen, char *why, size_t whylen)
{
	CMS_ContentInfo *cms;

	*out = NULL;
	*outlen = 0;
	ERR_clear_error();
	if (len > SMIME_MAX_SIZE) {
		set_why(why, whylen, "too large", NULL);
		return NULL;
	}
	if ((cms = parse(der, len)) == NULL)
		set_why(why, whylen, "corrupt (%s)", ssl_reason("not CMS"));
	return cms;
}

/*
 * A key-agreement recipient (EC keys) whose key is wrapped with AES key
 * wrap with padding (RFC 5649). OpenSSL 3.0's unwrap of it writes past its
 * buffer on a malformed wrapped key (upstream PR #30663; Debian 12's 3.0.19
 * has it), and the message comes from a stranger: such mail is refused.
 */
static bool
kari_wrap_pad(CMS_ContentInfo *cms)
{
	STACK_OF(CMS_RecipientInfo) *ris = CMS_get0_RecipientInfos(cms);

	for (int i = 0; i < sk_CMS_RecipientInfo_num(ris); i++) {
		CMS_RecipientInfo *ri = sk_CMS_RecipientInfo_value(ris, i);
		X509_ALGOR *alg = NULL, *wrap;
		ASN1_OCTET_STRING *ukm = NULL;
		const ASN1_OBJECT *obj;
		const void *pval;
		const unsigned char *p;
		int ptype, nid;

		if (CMS_RecipientInfo_type(ri) != CMS_RECIPINFO_AGREE ||
		    !CMS_RecipientInfo_kari_get0_alg(ri, &alg, &ukm) || alg == NULL)
			continue;
		X509_ALGOR_get0(&obj, &ptype, &pval, alg);
		if (ptype != V_ASN1_SEQUENCE || pval == NULL)
			continue;
		p = ASN1_STRING_get0_data(pval);
		wrap = d2i_X509_ALGOR(NULL, &p, ASN1_STRING_length(pval));
		if (wrap == NULL)
			continue;
		X509_ALGOR_get0(&obj, NULL, NULL, wrap);
		nid = OBJ_obj2nid(obj);
		X509_ALGOR_free(wrap);
		if (nid == NID_id_aes128_wrap_pad || nid == NID_id_aes192_wrap_pad ||
		    nid == NID_id_aes256_wrap_pad)
			return true;
	}
	return false;
}

/* Decrypt cms into out. 0, or -1 with why. */
static int
decrypt_cms(const struct smime_key *k, CMS_ContentInfo *cms, BIO *out, char *why, size_t whylen)
{
	char who[300], buf[400];
	int nid, n;

	nid = OBJ_obj2nid(CMS_get0_type(cms));
	if (nid != NID_pkcs7_enveloped && nid != NID_id_smime_ct_authEnvelopedData) {
		set_why(why, whylen, "not enveloped data", NULL);
		return -1;
	}
	if (!k) {
		set_why(why, whylen, "no key configured", NULL);
		return -1;
	}
	if (!recipient_match(cms, k->cert, who, sizeof(who), &n)) {
		if (n > 1)
			snprintf(buf, sizeof(buf),
				 "not for this key (the recipients are %s and %d more)", who,
				 n - 1);
		else if (n == 1)
			snprintf(buf, sizeof(buf), "not for this key (the recipient is %s)", who);
		else
			snprintf(buf, sizeof(buf), "not for this key (no recipient)");
		set_why(why, whylen, buf, NULL);
		return -1;
	}
	if (kari_wrap_pad(cms)) {
		set_why(why, whylen,
			"unsupported (key agreement with AES key wrap with padding is refused: "
			"OpenSSL 3.0 mishandles it)",
			NULL);
		ERR_clear_error();
		return -1;
	}
	if (!CMS_decrypt(cms, k->pkey, k->cert, NULL, out, CMS_BINARY)) {
		set_why(why, whylen, "corrupt (%s)", ssl_reason("decryption failed"));
		return -1;
	}
	return 0;
}

/* The encapsulated content of signed data, not copied. 0, or -1 with why. */
static int
signed_content(CMS_ContentInfo *cms, const unsigned char **data, size_t *len, char *why,
	       size_t whylen)
{
	ASN1_OCTET_STRING **pos;
	int n;

	if (OBJ_obj2nid(CMS_get0_type(cms)) != NID_pkcs7_signed) {
		set_why(why, whylen, "not signed data", NULL);
		return -1;
	}
	pos = CMS_get0_content(cms);
	if (!pos || !*pos) {
		set_why(why, whylen, "no encapsulated content (detached signature)", NULL);
		return -1;
	}
	n = ASN1_STRING_length(*pos);
	if (n < 0 || (size_t)n > SMIME_MAX_SIZE) {
		set_why(why, whylen, "too large", NULL);
		return -1;
	}
	*data = ASN1_STRING_get0_data(*pos);
	*len = (size_t)n;
	return 0;
}

int
smime_decrypt(const struct smime_key *k, const void *der, size_t len, char **out, size_t *outlen,
	      char *why, size_t whylen)
{
	CMS_ContentInfo *cms;
	BIO *b = NULL;
	int rc = -1;

	if ((cms = open_cms(der, len, out, outlen, why, whylen)) == NULL)
		return -1;
	b = BIO_new(BIO_s_mem());
	if (!b)
		set_why(why, whylen, "out of memory", NULL);
	else if (decrypt_cms(k, cms, b, why, whylen) == 0)
		rc = take_bio(b, out, outlen, why, whylen);
	BIO_free(b);
	CMS_ContentInfo_free(cms);
	ERR_clear_error();
	return rc;
}

int
smime_unwrap_signed(const void *der, size_t len, char **out, size_t *outlen, char *why,
		    size_t whylen)
{
	CMS_ContentInfo *cms;
	const unsigned char *d;
	size_t n;
	int rc = -1;

	if ((cms = open_cms(der, len, out, outlen, why, whylen)) == NULL)
		return -1;
	if (signed_content(cms, &d, &n, why, whylen) < 0)
		goto done;
	*out = malloc(n + 1);
	if (!*out) {
		set_why(why, whylen, "out of memory", NULL);
		goto done;
	}
	if (n > 0)
		memcpy(*out, d, n);
	(*out)[n] = '\0';
	*outlen = n;
	rc = 0;
done:
	CMS_ContentInfo_free(cms);
	ERR_clear_error();
	return rc;
}

/* ---- from and to files: only the CMS structure is held in memory ---- */

struct smime_cms {
	CMS_ContentInfo *cms;
};

int
smime_cms_read(int fd, struct smime_cms **ret, char *why, size_t whylen)
{
	struct stat st;
	BIO *b;
	CMS_ContentInfo *cms;

	*ret = NULL;
	ERR_clear_error();
	if (fstat(fd, &st) < 0)
		return -errno;
	if ((unsigned long long)st.st_size > SMIME_MAX_SIZE) {
		set_why(why, whylen, "too large", NULL);
		return -1;
	}
	if ((b = BIO_new_fd(fd, BIO_NOCLOSE)) == NULL) {
		set_why(why, whylen, "out of memory", NULL);
		return -1;
	}
	cms = st.st_size > 0 ? d2i_CMS_bio(b, NULL) : NULL;
	BIO_free(b);
	if (cms == NULL) {
		set_why(why, whylen, "corrupt (%s)", ssl_reason("not CMS"));
		return -1;
	}
	*ret = calloc(1, sizeof(**ret));
	if (*ret == NULL) {
		CMS_ContentInfo_free(cms);
		set_why(why, whylen, "out of memory", NULL);
		return -1;
	}
	(*ret)->cms = cms;
	ERR_clear_error();
	return 0;
}

int
smime_cms_kind(const struct smime_cms *c)
{
	switch (OBJ_obj2nid(CMS_get0_type(c->cms))) {
	case NID_pkcs7_enveloped:
	case NID_id_smime_ct_authEnvelopedData:
		return SMIME_KIND_ENVELOPED;
	case NID_pkcs7_signed:
		return SMIME_KIND_SIGNED;
	}
	return SMIME_KIND_OTHER;
}

/* A write to the output file failed: a local error, not the message's. */
static bool
write_failed(int e)
{
	return e == ENOSPC || e == EIO || e == EDQUOT || e == EFBIG || e == EBADF || e == EROFS;
}

int
smime_cms_decrypt(const struct smime_key *k, struct smime_cms *c, int out_fd, char *why,
		  size_t whylen)
{
	BIO *b = BIO_new_fd(out_fd, BIO_NOCLOSE);
	int rc;

	if (!b) {
		set_why(why, whylen, "out of memory", NULL);
		return -1;
	}
	errno = 0;
	rc = decrypt_cms(k, c->cms, b, why, whylen);
	if (rc < 0 && write_failed(errno)) {
		int e = errno;
		set_why(why, whylen, "cannot write: %s", strerror(e));
		rc = -e;
	}
	BIO_free(b);
	ERR_clear_error();
	return rc;
}

int
smime_cms_unwrap_signed(struct smime_cms *c, int out_fd, char *why, size_t whylen)
{
	const unsigned char *d;
	size_t n, done = 0;

	if (signed_content(c->cms, &d, &n, why, whylen) < 0)
		return -1;
	while (done < n) {
		ssize_t w = write(out_fd, d + done, n - done);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			int e = errno;
			set_why(why, whylen, "cannot write: %s", strerror(e));
			return -e;
		}
		done += (size_t)w;
	}
	return 0;
}

void
smime_cms_free(struct smime_cms *c)
{
	if (c == NULL)
		return;
	CMS_ContentInfo_free(c->cms);
	free(c);
}
