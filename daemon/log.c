/* log — log lines on stderr, with journald <N> priority prefixes. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "popfetchd/log.h"

static enum log_level threshold = LOG_LVL_INFO;
static int prefix;
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

void
log_set_prefix(int on)
{
	prefix = on;
}

void
log_set_before_line(void (*fn)(void))
{
	before_line = fn;
}

static void
log_vmsg(enum log_level level, const char *id, const char *fmt, va_list ap)
{
	char line[2048];
	int n = 0;

	if (level > threshold)
		return;
	if (prefix)
		n = snprintf(line, sizeof(line), "<%d>", (int)level);
	else
		n = snprintf(line, sizeof(line), "popfetchd: ");
	if (id != NULL && n >= 0 && (size_t)n < sizeof(line))
		n += snprintf(line + n, sizeof(line) - (size_t)n, "%s: ", id);
	if (n >= 0 && (size_t)n < sizeof(line))
		vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
	/* one line per call: a server's text must not start a line of its own */
	for (char *p = line; *p != '\0'; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	if (before_line != NULL)
		before_line();
	fprintf(stderr, "%s\n", line);
}

void
log_msg(enum log_level level, const char *id, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vmsg(level, id, fmt, ap);
	va_end(ap);
}
