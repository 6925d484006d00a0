/* libFuzzer harness: one configuration file, through the whole loader
 * (YAML, types, ranges, secrets, errors). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "popfetchd/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[64];
static char file[128];

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct conf_errors errs = {0};
	struct conf_set *set = NULL;
	char sub[128];
	FILE *f;

	if (dir[0] == '\0') {
		snprintf(dir, sizeof(dir), "/tmp/pfd-fuzz-config-XXXXXX");
		if (mkdtemp(dir) == NULL)
			abort();
		snprintf(sub, sizeof(sub), "%s/conf.d", dir);
		mkdir(sub, 0700);
		snprintf(file, sizeof(file), "%s/conf.d/fuzz.yaml", dir);
	}
	f = fopen(file, "w");
	if (f == NULL)
		abort();
	fwrite(data, 1, size, f);
	fclose(f);
	chmod(file, 0600);
	if (conf_load(dir, &set, &errs) == 0)
		conf_set_free(set);
	for (size_t i = 0; i < errs.n; i++)
		if (errs.lines[i] == NULL || strncmp(errs.lines[i], file, strlen(file)) != 0)
			abort(); /* every error names the file */
	conf_errors_clear(&errs);
	return 0;
}
