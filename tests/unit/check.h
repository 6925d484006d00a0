/* check.h — the few assertions the C unit tests need (no framework). */
#ifndef POPFETCHD_CHECK_H
#define POPFETCHD_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_failures;
static int check_count;

#define CHECK(cond)                                                                                \
	do {                                                                                       \
		check_count++;                                                                     \
		if (!(cond)) {                                                                     \
			check_failures++;                                                          \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
		}                                                                                  \
	} while (0)

#define CHECK_STR(a, b)                                                                            \
	do {                                                                                       \
		const char *check_a_ = (a), *check_b_ = (b);                                       \
		check_count++;                                                                     \
		if ((check_a_ == NULL) != (check_b_ == NULL) ||                                    \
		    (check_a_ != NULL && strcmp(check_a_, check_b_) != 0)) {                       \
			check_failures++;                                                          \
			fprintf(stderr, "%s:%d: CHECK_STR failed: %s == \"%s\", want \"%s\"\n",    \
				__FILE__, __LINE__, #a, check_a_ ? check_a_ : "(null)",            \
				check_b_ ? check_b_ : "(null)");                                   \
		}                                                                                  \
	} while (0)

#define CHECK_DONE()                                                                               \
	do {                                                                                       \
		fprintf(stderr, "%d checks, %d failed\n", check_count, check_failures);            \
		return check_failures ? 1 : 0;                                                     \
	} while (0)

#endif
