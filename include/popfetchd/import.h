/*
 * import: the POP3 accounts of an .mpoprc or a .fetchmailrc as popfetchd
 * configurations. The parsers are pure (text in, accounts and notes out);
 * import_run reads the file and prints or writes the result.
 */
#ifndef POPFETCHD_IMPORT_H
#define POPFETCHD_IMPORT_H

#include <stdbool.h>
#include <stddef.h>

/* One account as the file describes it. Strings are NULL and numbers -1
 * when the file does not set them. */
struct import_account {
	char *name; /* mpop: the account name; fetchmail: USER@HOST */
	char *id;   /* the configuration id made of name (unique in the file) */
	unsigned line;
	char *server, *user, *password, *ca_file, *fingerprint, *mechanism, *interval;
	unsigned long long max_size; /* 0: none; mpop skipsize, fetchmail limit */
	int timeout;		     /* seconds (timeouts.connect and .command), -1 */
	int port;
	int tls;	   /* 0 none, 1 on */
	int starttls;	   /* with tls on: 1 STLS on 110, 0 TLS from the first byte */
	int certcheck;	   /* 0: the server's certificate is not verified */
	int keep;	   /* 1: leave the messages on the server */
	int password_eval; /* 1: the password came from a command */
	int inactive;	   /* 1: fetchmail "skip" */
	int pop3;	   /* 0: another protocol (not imported) */
	bool alias;	   /* mpop "account default : NAME" and nothing else */
	size_t own;	   /* settings on the account's own lines */
};

/* A note for the operator: "FILE:LINE: text". */
struct import_result {
	struct import_account *acc;
	size_t n_acc;
	char **notes;
	size_t n_notes;
};

void import_parse_mpoprc(const char *text, size_t len, const char *file, struct import_result *r);
void import_parse_fetchmailrc(const char *text, size_t len, const char *file,
			      struct import_result *r);

/* The configuration YAML of a (malloc'd). password_file is the path the
 * password is (or is to be) in; NULL when the account has none to write. */
char *import_yaml(const struct import_account *a, const char *source, const char *password_file);

void import_result_free(struct import_result *r);

/* popfetchd import KIND FILE [-o DIR]: an exit code (sysexits). */
int import_run(const char *kind, const char *file, const char *outdir);

#endif
