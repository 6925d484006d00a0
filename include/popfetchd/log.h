/* log — log lines on stderr, with journald <N> priority prefixes. */
#ifndef POPFETCHD_LOG_H
#define POPFETCHD_LOG_H

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
/* Print "<N>" prefixes (when stderr goes to journald) or not. */
void log_set_prefix(int on);
/* Called before each line is written (NULL: nothing): what shares the
 * terminal's last line with the log, a progress line, clears it. */
void log_set_before_line(void (*fn)(void));

void log_msg(enum log_level level, const char *id, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#define log_error(id, ...)   log_msg(LOG_LVL_ERROR, id, __VA_ARGS__)
#define log_warning(id, ...) log_msg(LOG_LVL_WARNING, id, __VA_ARGS__)
#define log_notice(id, ...)  log_msg(LOG_LVL_NOTICE, id, __VA_ARGS__)
#define log_info(id, ...)    log_msg(LOG_LVL_INFO, id, __VA_ARGS__)
#define log_debug(id, ...)   log_msg(LOG_LVL_DEBUG, id, __VA_ARGS__)

#endif
