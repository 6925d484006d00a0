/* Unit tests: the exit code of several polls, root beside another user's state. */
#include <stdlib.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <unistd.h>

#include "check.h"
#include "popfetchd/oneshot.h"
#include "popfetchd/runtime.h"

static int
fold(const int *codes, size_t n)
{
	int worst = 0;

	for (size_t i = 0; i < n; i++)
		worst = oneshot_worst(worst, codes[i]);
	return worst;
}

static void
worst(void)
{
	/* what needs a person first: configuration, local I/O, credentials,
	 * protocol, a passing server condition, an unreachable server */
	static const int order[] = {EX_CONFIG,	 EX_IOERR,    EX_NOPERM,
				    EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE};
	const size_t n = sizeof(order) / sizeof(order[0]);

	CHECK(oneshot_worst(0, 0) == 0);
	for (size_t i = 0; i < n; i++) {
		CHECK(oneshot_worst(0, order[i]) == order[i]);
		CHECK(oneshot_worst(order[i], 0) == order[i]);
		for (size_t k = i; k < n; k++) {
			CHECK(oneshot_worst(order[i], order[k]) == order[i]);
			CHECK(oneshot_worst(order[k], order[i]) == order[i]);
		}
	}
	CHECK(fold((const int[]){0, EX_UNAVAILABLE, EX_TEMPFAIL, 0}, 4) == EX_TEMPFAIL);
	CHECK(fold((const int[]){EX_UNAVAILABLE, EX_NOPERM, EX_PROTOCOL}, 3) == EX_NOPERM);
	CHECK(fold((const int[]){EX_TEMPFAIL, EX_IOERR, EX_CONFIG, EX_NOPERM}, 4) == EX_CONFIG);
	/* a code outside the order still counts as a failure, after the others */
	CHECK(oneshot_worst(0, EX_SOFTWARE) == EX_SOFTWARE);
	CHECK(oneshot_worst(EX_SOFTWARE, EX_UNAVAILABLE) == EX_UNAVAILABLE);
}

static void
state_owner(void)
{
	char dir[] = "/tmp/pfd-owner-XXXXXX", why[600] = "";

	if (mkdtemp(dir) == NULL) {
		CHECK(!"mkdtemp");
		return;
	}
	CHECK(runtime_state_owner(dir, why, sizeof(why)) == 0);
	CHECK(runtime_state_owner("/nonexistent/pfd-state", why, sizeof(why)) == 0);
	if (geteuid() == 0 && chown(dir, 65534, 65534) == 0) {
		CHECK(runtime_state_owner(dir, why, sizeof(why)) == -1);
		CHECK(strstr(why, dir) != NULL && strstr(why, "run as that user") != NULL);
	}
	rmdir(dir);
}

int
main(void)
{
	worst();
	state_owner();
	CHECK_DONE();
}
