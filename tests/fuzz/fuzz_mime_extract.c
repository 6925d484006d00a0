/*
 * libFuzzer harness: message bytes -> a temporary file -> mime_extract into
 * a temporary folder. Asserts the no-escape property: every file created
 * is a regular file directly in the folder or in its attachments/, and
 * nothing appears beside the folder.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "popfetchd/mime_extract.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char root[64];

/* Checks and empties dir (relative to dfd); nested: attachments/ only. */
static void
check_and_clear(int dfd, int level)
{
	int fd = dup(dfd);
	DIR *d = fdopendir(fd);
	struct dirent *e;

	if (d == NULL)
		abort();
	while ((e = readdir(d)) != NULL) {
		struct stat st;
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			abort();
		if (e->d_name[0] == '.' || strchr(e->d_name, '/') || strlen(e->d_name) > 255)
			abort();
		if (S_ISDIR(st.st_mode)) {
			if (level != 0 || strcmp(e->d_name, "attachments") != 0)
				abort();
			int sub = openat(dfd, e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW);
			if (sub < 0)
				abort();
			check_and_clear(sub, 1);
			close(sub);
			if (unlinkat(dfd, e->d_name, AT_REMOVEDIR) < 0)
				abort();
		} else if (S_ISREG(st.st_mode)) {
			if (level == 0 && strcmp(e->d_name, "text.txt") != 0 &&
			    strcmp(e->d_name, "text.html") != 0 && strcmp(e->d_name, "msg") != 0)
				abort();
			/* the message itself stays; an attachment named msg goes */
			if ((level != 0 || strcmp(e->d_name, "msg") != 0) &&
			    unlinkat(dfd, e->d_name, 0) < 0)
				abort();
		} else {
			abort();
		}
	}
	closedir(d);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct mime_result r;
	int rootfd, dfd, fd;

	if (root[0] == '\0') {
		snprintf(root, sizeof(root), "/tmp/fuzz-mime-XXXXXX");
		if (mkdtemp(root) == NULL)
			abort();
	}
	rootfd = open(root, O_RDONLY | O_DIRECTORY);
	if (rootfd < 0 || mkdirat(rootfd, "m", 0750) < 0)
		abort();
	dfd = openat(rootfd, "m", O_RDONLY | O_DIRECTORY);
	fd = openat(dfd, "msg", O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (dfd < 0 || fd < 0 || write(fd, data, size) != (ssize_t)size)
		abort();
	close(fd);

	char path[128];
	snprintf(path, sizeof(path), "%s/m/msg", root);
	struct mime_opts o = {.save_text = true,
			      .save_attachments = true,
			      .dirfd = dfd,
			      .max_decoded = 64 * 1024 * 1024};
	if (mime_extract(path, &o, &r) != 0)
		abort();
	for (size_t i = 0; i < r.natt; i++)
		if (r.att[i].name == NULL || strlen(r.att[i].sha256) != 64)
			abort();
	mime_result_clear(&r);

	check_and_clear(dfd, 0);
	unlinkat(dfd, "msg", 0);
	close(dfd);
	if (unlinkat(rootfd, "m", AT_REMOVEDIR) < 0)
		abort(); /* something else was left in the folder */
	/* nothing beside the message folder */
	DIR *d = fdopendir(rootfd);
	struct dirent *e;
	while ((e = readdir(d)) != NULL)
		if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
			abort();
	closedir(d);
	return 0;
}
