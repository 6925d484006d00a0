/*
 * log — one line per call, naming the configuration it is about. Under
 * journald (JOURNAL_STREAM names stderr) each line is a record sent with
 * sd_journal_sendv: PRIORITY, MESSAGE, SYSLOG_IDENTIFIER=popfetchd,
 * POPFETCHD_CONFIG=ID and the fields of struct log_fields that are set;
 * when the journal's socket is missing or refuses a record, the line goes
 * to stderr with a "<N>" priority prefix. Otherwise lines go to stderr as "popfetchd: ...".
 *
 * A line may be logged from a worker thread (worker.h: a seal's notes and
 * warnings): each is formatted on the caller's stack and goes out in one
 * write (one stdio call, or one sd_journal_sendv), so lines of threads never
 * mix. The settings (log_set_level, log_setup, log_set_before_line) are made
 * before any thread starts; the one-shot commands, whose progress line uses
 * log_set_before_line, seal on their loop.
 */
#ifndef POPFETCHD_LOG_H
#define POPFETCHD_LOG_H

#include <stdbool.h>

/* syslog priorities, as journald reads them from a "<N>" prefix */
enum log_level {
	LOG_LVL_ERROR = 3,
	LOG_LVL_WARNING = 4,
	LOG_LVL_NOTICE = 5,
	LOG_LVL_INFO = 6,
	LOG_LVL_DEBUG = 7,
};

/* Set the threshold; lines above it are dropped. */
void log_set_level(enum log_level level);
/* Parse "debug|info|notice|warning|error"; -1 when unknown. */
int log_level_from_name(const char *name);
/* Send to the journal when JOURNAL_STREAM names stderr (its st_dev:st_ino,
 * systemd.exec(5)); true when it does. */
bool log_setup(void);
/* Called before each line is written (NULL: nothing): what shares the
 * terminal's last line with the log, a progress line, clears it. */
void log_set_before_line(void (*fn)(void));

/* A record's optional journal fields (never a secret). */
struct log_fields {
	const char *uidl;   /* POPFETCHD_UIDL: the message's UIDL */
	const char *folder; /* POPFETCHD_FOLDER: the saved message's folder */
	bool has_exit;
	int exit; /* POPFETCHD_EXIT: a poll's exit code, when has_exit */
};

/* A line about configuration id (NULL: the daemon), "ID: " before it. */
void log_msg(enum log_level level, const char *id, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* The same with journal fields: log_fields(LOG_LVL_INFO, id,
 * &(struct log_fields){.uidl = u, .folder = f}, "saved ..."). */
void log_fields(enum log_level level, const char *id, const struct log_fields *lf, const char *fmt,
		...) __attribute__((format(printf, 4, 5)));

#define log_error(id, ...)   log_msg(LOG_LVL_ERROR, id, __VA_ARGS__)
#define log_warning(id, ...) log_msg(LOG_LVL_WARNING, id, __VA_ARGS__)
#define log_notice(id, ...)  log_msg(LOG_LVL_NOTICE, id, __VA_ARGS__)
#define log_info(id, ...)    log_msg(LOG_LVL_INFO, id, __VA_ARGS__)
#define log_debug(id, ...)   log_msg(LOG_LVL_DEBUG, id, __VA_ARGS__)

#endif
