/* Unit tests: durations and sizes. */
#include <errno.h>

#include "check.h"
#include "popfetchd/util.h"

static void
durations(void)
{
	uint64_t v = 7;

	CHECK(util_parse_duration("90", &v) == 0 && v == 90);
	CHECK(util_parse_duration("90s", &v) == 0 && v == 90);
	CHECK(util_parse_duration("5m", &v) == 0 && v == 300);
	CHECK(util_parse_duration("1h", &v) == 0 && v == 3600);
	CHECK(util_parse_duration("2d", &v) == 0 && v == 172800);
	CHECK(util_parse_duration("5M", &v) == 0 && v == 300);
	v = 7;
	CHECK(util_parse_duration("", &v) == -EINVAL && v == 7);
	CHECK(util_parse_duration("m", &v) == -EINVAL);
	CHECK(util_parse_duration("-5s", &v) == -EINVAL);
	CHECK(util_parse_duration("5 parsecs", &v) == -EINVAL);
	CHECK(util_parse_duration("1.5h", &v) == -EINVAL);
	CHECK(util_parse_duration("99999999999999999999", &v) == -ERANGE);
	CHECK(util_parse_duration("999999999999999999d", &v) == -ERANGE);
	CHECK(util_parse_duration(NULL, &v) == -EINVAL && v == 7);
}

static void
sizes(void)
{
	uint64_t v = 7;

	CHECK(util_parse_size("1000", &v) == 0 && v == 1000);
	CHECK(util_parse_size("25M", &v) == 0 && v == 25u * 1024 * 1024);
	CHECK(util_parse_size("25MB", &v) == 0 && v == 25u * 1024 * 1024);
	CHECK(util_parse_size("25mib", &v) == 0 && v == 25u * 1024 * 1024);
	CHECK(util_parse_size("512k", &v) == 0 && v == 512u * 1024);
	CHECK(util_parse_size("2G", &v) == 0 && v == 2ULL * 1024 * 1024 * 1024);
	v = 7;
	CHECK(util_parse_size("25X", &v) == -EINVAL && v == 7);
	CHECK(util_parse_size("M", &v) == -EINVAL);
	CHECK(util_parse_size("99999999999G", &v) == -ERANGE);
}

static void
hex(void)
{
	unsigned char in[] = {0x00, 0x3f, 0xa0, 0xff};
	char out[9];

	util_hex(in, sizeof(in), out);
	CHECK_STR(out, "003fa0ff");
}

int
main(void)
{
	durations();
	sizes();
	hex();
	CHECK_DONE();
}
