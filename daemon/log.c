/*
 * log — log lines on stderr, or records with fields in the journal (see
 * log.h).
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <systemd/sd-journal.h>

#include "popfetchd/log.h"

#define JOURNAL_SOCKET "/run/systemd/journal/socket" /* what sd_journal_sendv() writes to */

static enum log_level threshold = LOG_LVL_INFO;
static enum {
	TO_STDERR,  /* "popfetchd: " lines */
	TO_STREAM,  /* stderr is journald's stream: "<N>" priority prefixes */
	TO_JOURNAL, /* native records, TO_STREAM when one cannot go */
} sink = TO_STDERR;
static void (*before_line)(void);

static const struct {
	const char *name;
	enum log_level level;
} level_names[] = {
	{"error", LOG_LVL_ERROR}, {"warning", LOG_LVL_WARNING}, {"notice", LOG_LVL_NOTICE},
	{"info", LOG_LVL_INFO},	  {"debug", LOG_LVL_DEBUG},
};

void
log_set_level(enum log_level level)
{
	threshold = level;
}

int
log_level_from_name(const char *name)
{
	for (size_t i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++)
		if (strcmp(name, level_names[i].name) == 0)
			return (int)level_names[i].level;
	return -1;
}

/* Is fd the stream "DEVICE:INODE" names? */
static bool
stream_is(const char *journal_stream, int fd)
{
	uintmax_t dev, ino;
	struct stat st;
	int end = 0;

	if (journal_stream == NULL ||
	    sscanf(journal_stream, "%" SCNuMAX ":%" SCNuMAX "%n", &dev, &ino, &end) != 2 ||
	    journal_stream[end] != '\0' || fstat(fd, &st) < 0)
		return false;
	return (uintmax_t)st.st_dev == dev && (uintmax_t)st.st_ino == ino;
}

/* systemd.exec(5): JOURNAL_STREAM names the stream journald reads, as
 * "DEVICE:INODE"; stderr may since have been redirected elsewhere (a
 * script run by a unit, 2>file), and then it is not the journal's. */
bool
log_setup(void)
{
	struct stat st;

	if (!stream_is(getenv("JOURNAL_STREAM"), STDERR_FILENO))
		sink = TO_STDERR;
	/* sd_journal_sendv() drops a record silently when the socket is not
	 * there (a mount namespace without it): then the stream it is */
	else if (stat(JOURNAL_SOCKET, &st) == 0 && S_ISSOCK(st.st_mode))
		sink = TO_JOURNAL;
	else
		sink = TO_STREAM;
	return sink == TO_JOURNAL;
}

/* "KEY=value" as iov[*n], in buf. */
static void __attribute__((format(printf, 5, 6)))
add_field(struct iovec *iov, size_t *n, char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int len;

	va_start(ap, fmt);
	len = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	if (len < 0)
		return;
	iov[*n].iov_base = buf;
	iov[*n].iov_len = (size_t)len < size ? (size_t)len : size - 1;
	(*n)++;
}

/* The record through journald's native protocol; <0 when it could not go. */
static int
journal_send(enum log_level level, const char *id, const struct log_fields *lf, const char *msg)
{
	char prio[16], config[96], exitc[32], uidl[400], folder[4200], message[2200];
	struct iovec iov[7];
	size_t n = 0;

	add_field(iov, &n, prio, sizeof(prio), "PRIORITY=%d", (int)level);
	iov[n++] = (struct iovec){"SYSLOG_IDENTIFIER=popfetchd", 27};
	add_field(iov, &n, message, sizeof(message), "MESSAGE=%s", msg);
	if (id != NULL)
		add_field(iov, &n, config, sizeof(config), "POPFETCHD_CONFIG=%s", id);
	if (lf != NULL && lf->uidl != NULL)
		add_field(iov, &n, uidl, sizeof(uidl), "POPFETCHD_UIDL=%s", lf->uidl);
	if (lf != NULL && lf->folder != NULL)
		add_field(iov, &n, folder, sizeof(folder), "POPFETCHD_FOLDER=%s", lf->folder);
	if (lf != NULL && lf->has_exit)
		add_field(iov, &n, exitc, sizeof(exitc), "POPFETCHD_EXIT=%d", lf->exit);
	return sd_journal_sendv(iov, (int)n);
}

void
log_set_before_line(void (*fn)(void))
{
	before_line = fn;
}

static void
log_vmsg(enum log_level level, const char *id, const struct log_fields *lf, const char *fmt,
	 va_list ap)
{
	char line[2048];
	int n = 0;

	if (level > threshold)
		return;
	if (id != NULL)
		n = snprintf(line, sizeof(line), "%s: ", id);
	if (n >= 0 && (size_t)n < sizeof(line))
		vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
	/* one line per call: a server's text must not start a line of its own */
	for (char *p = line; *p != '\0'; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	if (sink == TO_JOURNAL && journal_send(level, id, lf, line) >= 0)
		return;
	if (before_line != NULL)
		before_line();
	/* journald reads a "<N>" prefix as the line's priority */
	if (sink != TO_STDERR)
		fprintf(stderr, "<%d>%s\n", (int)level, line);
	else
		fprintf(stderr, "popfetchd: %s\n", line);
}

void
log_msg(enum log_level level, const char *id, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vmsg(level, id, NULL, fmt, ap);
	va_end(ap);
}

void
log_fields(enum log_level level, const char *id, const struct log_fields *lf, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vmsg(level, id, lf, fmt, ap);
	va_end(ap);
}
