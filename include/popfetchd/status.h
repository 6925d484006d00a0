/*
 * status — what each configuration last did, for the operator (DESIGN.md
 * §7): state_directory/ID/status.json, replaced atomically after every poll
 * by the daemon and the one-shot commands alike, and the `status` command
 * that reads them (never contacting a server). Also whether a daemon runs
 * on a state directory: it holds a lock on state_directory/popfetchd.pid.
 * Knows no protocol: a poll is the figures of struct status_poll.
 */
#ifndef POPFETCHD_STATUS_H
#define POPFETCHD_STATUS_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

struct conf_set;

/* The status files' modes: the operator's group (popfetchd) may read
 * status.json, never the UIDL state or a token (0600 in the same directory). */
#define STATUS_DIR_MODE	 0750
#define STATUS_FILE_MODE 0640

/* One poll, as status.json records it. */
struct status_poll {
	time_t started_at;
	time_t finished_at;
	int exit_code;	   /* sysexits; 0: the poll succeeded */
	const char *error; /* the first error line (free of secrets), NULL when none */
	unsigned long long messages_saved, bytes_saved, messages_deleted;
	time_t tls_expires_at; /* 0: no certificate seen */
	time_t next_poll_at;   /* 0: none planned (a one-shot command, a stopping daemon) */
};

/*
 * Record a poll of configuration id in state_directory/id/status.json: the
 * previous file's totals, last_success_at and consecutive_failures carried
 * on, state "active". 0, or -errno with why naming the file.
 */
int status_record_poll(const char *state_directory, const char *id, const struct status_poll *p,
		       char *why, size_t whylen);
/*
 * Record a state without a poll ("inactive", "broken: REASON") and the next
 * try (0: none); the rest of the file is kept. Nothing is written when the
 * file says so already. 0, or -errno with why.
 */
int status_record_state(const char *state_directory, const char *id, const char *state,
			time_t next_poll_at, char *why, size_t whylen);

/*
 * A daemon's claim on state_directory: a lock on popfetchd.pid (which gets
 * its pid), held while the returned descriptor is open. -EBUSY when another
 * process holds it (why names its pid), another -errno when the file cannot
 * be made.
 */
int status_daemon_claim(const char *state_directory, char *why, size_t whylen);

/*
 * The `status` command: one line per configuration of set (or, with set
 * NULL, per status.json found in state_directory), or one of them (id not
 * NULL); with json one object on stdout. The exit code: 0 when every
 * active configuration's last poll succeeded, 75 when one did not (or was
 * never polled, or is broken), 74 when a status.json cannot be read, 78
 * for an unknown id.
 */
int status_show(const struct conf_set *set, const char *state_directory, const char *id, bool json);

#endif
