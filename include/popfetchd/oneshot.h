/*
 * oneshot — receive and receive-all (DESIGN.md §2): one poll of each
 * configuration named, or of every active one (--all), concurrently within
 * max_sessions on one event loop. The folders saved go to stdout as each
 * poll ends (or one JSON object at the end), a progress line to a terminal,
 * and the exit code is the most urgent of the polls'.
 */
#ifndef POPFETCHD_ONESHOT_H
#define POPFETCHD_ONESHOT_H

#include <stdbool.h>
#include <stddef.h>

#include "popfetchd/fetch.h"

struct conf_set;
struct json_t;

struct oneshot_options {
	const char *const *ids; /* the configurations named on the command line */
	size_t n_ids;
	bool all;      /* --all: every active configuration (ids: none) */
	bool json;     /* one JSON object on stdout */
	bool progress; /* a progress line on stderr, if it is a terminal */
	enum fetch_mode mode;
};

/*
 * Poll and report. set is the configuration set, or NULL when it could not
 * be loaded: then set_errors (a JSON array of its error lines, taken over)
 * goes into the report. One ID without --all reports as receive always has
 * ({"configuration": ID, "saved": [...], ..., "exit_code": N}); several, or
 * --all, as {"results": [one such object each], "errors": [...],
 * "exit_code": N}. Returns the exit code (sysexits, DESIGN.md §2).
 */
int oneshot_run(const struct conf_set *set, struct json_t *set_errors,
		const struct oneshot_options *o);

/* The exit code of several polls: the most urgent of theirs, in the order
 * 78, 74, 77, 76, 75, 69 (what needs a person first); 0 when all are. */
int oneshot_worst(int a, int b);

#endif
