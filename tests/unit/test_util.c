/* Unit tests: durations, sizes, untrusted text, atomic writes. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

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

/* util_printable of the NUL-terminated in into a buffer of size bytes. */
static void
shown(const char *in, size_t size, const char *want)
{
	char out[256];

	CHECK(util_printable(in, strlen(in), out, size) == out);
	CHECK_STR(out, want);
}

static void
replaced(const char *in, const char *want)
{
	char out[256];

	CHECK_STR(util_printable_repl(in, strlen(in), '_', out, sizeof(out)), want);
}

static void
printable(void)
{
	char out[64];

	shown("plain ASCII, kept: ~!\"#'", 256, "plain ASCII, kept: ~!\"#'");
	shown("Gr\xc3\xbc\xc3\x9f"
	      "e \xe2\x80\x93 \xf0\x9f\x98\x80",
	      256,
	      "Gr\xc3\xbc\xc3\x9f"
	      "e \xe2\x80\x93 \xf0\x9f\x98\x80");
	/* the bidi override of "evil\u202Efdp.exe" */
	shown("evil\xe2\x80\xae"
	      "fdp.exe",
	      256, "evil\\u202efdp.exe");
	shown("a\r\nb", 256, "a\\x0d\\x0ab");
	shown("\x1b[31mRED\x1b[0m", 256, "\\x1b[31mRED\\x1b[0m");
	shown("tab\tdel\x7f", 256, "tab\\x09del\\x7f");
	shown("back\\slash \\, as it is", 256, "back\\slash \\, as it is");
	shown("bad \xff\xfe end", 256, "bad \\xff\\xfe end");
	shown("overlong \xc0\xaf, surrogate \xed\xa0\x80", 256,
	      "overlong \\xc0\\xaf, surrogate \\xed\\xa0\\x80");
	shown("above \xf4\x90\x80\x80", 256, "above \\xf4\\x90\\x80\\x80");
	shown("C1 \xc2\x9b"
	      "31m",
	      256, "C1 \\u009b31m");
	shown("cut short \xe2\x80", 256, "cut short \\xe2\\x80");
	shown("cut short \xf0\x9f\x98", 256, "cut short \\xf0\\x9f\\x98");
	shown("\xd8\x9c \xe2\x80\x8e \xe2\x80\x8f \xe2\x80\xa8 \xe2\x80\xa9 \xe2\x81\xa6 "
	      "\xe2\x81\xa9 "
	      "\xef\xbb\xbf",
	      256, "\\u061c \\u200e \\u200f \\u2028 \\u2029 \\u2066 \\u2069 \\ufeff");
	/* neighbours of the list are kept: U+200D, U+202F, U+2065, U+206A */
	shown("\xe2\x80\x8d\xe2\x80\xaf\xe2\x81\xa5\xe2\x81\xaa", 256,
	      "\xe2\x80\x8d\xe2\x80\xaf\xe2\x81\xa5\xe2\x81\xaa");
	/* a NUL inside the length is a byte like any other */
	CHECK_STR(util_printable("a\0b", 3, out, sizeof(out)), "a\\x00b");
	CHECK_STR(util_printable("", 0, out, sizeof(out)), "");

	/* cut: "..." where it fits, never half an escape or a character */
	shown("0123456789", 11, "0123456789");
	shown("0123456789", 10, "012345...");
	shown("012345\x1b", 10, "012345...");
	shown("01234\x1b", 10, "01234\\x1b");
	shown("0123\xc3\xbc\xc3\xbc", 8, "0123...");
	shown("abcdef", 3, "ab");
	shown("abcdef", 1, "");

	replaced("evil\xe2\x80\xae"
		 "fdp.exe",
		 "evil_fdp.exe");
	replaced("a\r\nb\x1b\x7f\xc2\x85 \\ \xff\xc3\xbc", "a__b___ \\ _\xc3\xbc");
	replaced("cut \xe2\x80", "cut __");
}

/* The names in dir, sorted, joined by spaces. */
static void
listing(const char *dir, char *out, size_t size)
{
	struct dirent **ents;
	int n = scandir(dir, &ents, NULL, alphasort);
	size_t o = 0;

	out[0] = '\0';
	for (int i = 0; i < n; i++) {
		if (strcmp(ents[i]->d_name, ".") != 0 && strcmp(ents[i]->d_name, "..") != 0)
			o += (size_t)snprintf(out + o, size - o, "%s%s", o ? " " : "",
					      ents[i]->d_name);
		free(ents[i]);
	}
	free(ents);
}

/* Nothing is written where there is no room at all. */
static void
printable_no_room(void)
{
	char out[4] = "xyz";

	util_printable_repl("abc", 3, '_', out, 0);
	CHECK_STR(out, "xyz");
}

static void
atomic(void)
{
	char dir[] = "/tmp/test_util.XXXXXX", path[128], tmp[128], why[256], names[256], buf[16];
	struct stat sb;
	int fd;

	CHECK(mkdtemp(dir) != NULL);
	snprintf(path, sizeof(path), "%s/state", dir);
	snprintf(tmp, sizeof(tmp), "%s/state.tmp", dir);

	/* a fresh ".state.XXXXXX", 0600; replaced in place */
	CHECK(util_write_atomic(path, NULL, "one\n", 4, 0600, why, sizeof(why)) == 0);
	CHECK(util_write_atomic(path, NULL, "two!\n", 5, 0600, why, sizeof(why)) == 0);
	fd = open(path, O_RDONLY);
	CHECK(fd >= 0 && read(fd, buf, sizeof(buf)) == 5 && memcmp(buf, "two!\n", 5) == 0);
	close(fd);
	CHECK(stat(path, &sb) == 0 && (sb.st_mode & 07777) == 0600);
	listing(dir, names, sizeof(names));
	CHECK_STR(names, "state");

	/* a named temporary; a leftover of a crash is overwritten */
	fd = open(tmp, O_WRONLY | O_CREAT, 0600);
	CHECK(fd >= 0 && write(fd, "leftover, longer", 16) == 16);
	close(fd);
	CHECK(util_write_atomic(path, tmp, "3\n", 2, 0640, NULL, 0) == 0);
	CHECK(stat(path, &sb) == 0 && sb.st_size == 2);
	CHECK((sb.st_mode & 07777) == 0640); /* not the leftover's 0600 */
	listing(dir, names, sizeof(names));
	CHECK_STR(names, "state");

	/* never through a symbolic link */
	CHECK(symlink("elsewhere", tmp) == 0);
	CHECK(util_write_atomic(path, tmp, "4\n", 2, 0600, why, sizeof(why)) == -ELOOP);
	CHECK(strncmp(why, "cannot create ", 14) == 0 && strcmp(why + 14, tmp) == 0);
	CHECK(unlink(tmp) == 0);

	/* a failed rename (over a directory) leaves no temporary behind */
	CHECK(unlink(path) == 0 && mkdir(path, 0700) == 0);
	CHECK(util_write_atomic(path, tmp, "5\n", 2, 0600, why, sizeof(why)) == -EISDIR);
	CHECK(strncmp(why, "cannot rename ", 14) == 0 && strcmp(why + 14, tmp) == 0);
	CHECK(util_write_atomic(path, NULL, "5\n", 2, 0600, why, sizeof(why)) == -EISDIR);
	CHECK(strncmp(why, "cannot rename ", 14) == 0);
	listing(dir, names, sizeof(names));
	CHECK_STR(names, "state");
	CHECK(rmdir(path) == 0);

	/* no directory to write in */
	snprintf(path, sizeof(path), "%s/missing/state", dir);
	CHECK(util_write_atomic(path, NULL, "6\n", 2, 0600, why, sizeof(why)) == -ENOENT);
	CHECK(strncmp(why, "cannot create ", 14) == 0 && strstr(why, "/missing/.state.") != NULL);
	CHECK(rmdir(dir) == 0);
}

int
main(void)
{
	durations();
	sizes();
	hex();
	printable();
	atomic();
	printable_no_room();
	CHECK_DONE();
}
