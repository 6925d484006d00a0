/* libFuzzer harness: the header block of a message, decoded with GMime. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "popfetchd/mime.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct mime_headers h;

	mime_parse_headers((const char *)data, size, &h);
	mime_headers_clear(&h);
	return 0;
}
