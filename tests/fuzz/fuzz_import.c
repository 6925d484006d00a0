/* libFuzzer harness: one file as an .mpoprc and as a .fetchmailrc, and
 * every account found as YAML. */
#include <stdint.h>
#include <stdlib.h>

#include "popfetchd/import.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void
render(struct import_result *r)
{
	for (size_t i = 0; i < r->n_acc; i++)
		free(import_yaml(&r->acc[i], "fuzz", i % 2 ? NULL : "/p"));
	import_result_free(r);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct import_result r = {0};

	import_parse_mpoprc((const char *)data, size, "fuzz", &r);
	render(&r);
	import_parse_fetchmailrc((const char *)data, size, "fuzz", &r);
	render(&r);
	return 0;
}
