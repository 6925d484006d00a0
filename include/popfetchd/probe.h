/*
 * probe — the test command (DESIGN.md §2 "test ID"), the Test button: one
 * configuration checked step by step, from the configuration file to the
 * save directory, each step reported with its result and one line an
 * operator can act on. It logs in and asks STAT, then QUIT: it never
 * retrieves or deletes mail, and writes nothing but a probe file that it
 * removes again (and a rotated OAuth2 refresh token, which must be kept).
 */
#ifndef POPFETCHD_PROBE_H
#define POPFETCHD_PROBE_H

#include <stdbool.h>

struct probe_options {
	const char *confdir; /* the -c directory */
	const char *id;	     /* the configuration to test */
	bool json;	     /* one JSON object on stdout instead of one line per step */
	int verbosity;	     /* -1 (-q), 0, 1 (-v): as for the other commands */
};

/*
 * Load the configuration set, run every step, print the report on stdout
 * (logs go to stderr). Returns the exit code (sysexits, DESIGN.md §2) of the
 * first step that failed, 0 when none did.
 */
int probe_run(const struct probe_options *o);

#endif
