/* libFuzzer harness: every pure POP3 parser, and the dot-unstuffer fed at
 * split points chosen by the input, and the header-block scanner likewise. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "popfetchd/pop3_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The header block found in pieces is the one found at once, and ends
 * with the LF of an empty line. */
static void
head(const uint8_t *data, size_t size)
{
	struct pop3_head whole, h;
	size_t n = 0, off = 0;
	size_t once;

	pop3_head_init(&whole);
	once = pop3_head_feed(&whole, (const char *)data, size);
	if (once > size || (once < size && !whole.done) ||
	    (whole.done && (once == 0 || data[once - 1] != '\n')))
		abort();
	pop3_head_init(&h);
	while (off < size && !h.done) {
		size_t step = 1 + data[off] % 13;
		if (step > size - off)
			step = size - off;
		size_t used = pop3_head_feed(&h, (const char *)data + off, step);
		if (used > step || (used < step && !h.done))
			abort();
		n += used;
		off += step;
	}
	if (n != once || h.done != whole.done)
		abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char *s = (const char *)data;
	struct pop3_reply r;
	struct pop3_capa capa;
	struct pop3_dot d;
	char uid[POP3_UIDL_MAX + 1];
	unsigned long num;
	uint64_t sz;
	size_t len = size, off = 0, o, total = 0;
	const char *line = s;
	char *out;

	pop3_parse_status(s, size, &r);
	if (r.text < s || r.text + r.text_len > s + size)
		abort();
	pop3_capa_init(&capa);
	pop3_parse_capa_line(&capa, s, size);
	if (strlen(capa.sasl) >= sizeof(capa.sasl))
		abort();
	if (pop3_parse_uidl_line(s, size, &num, uid) == 0 && (strlen(uid) == 0 || strlen(uid) > 70))
		abort();
	pop3_parse_list_line(s, size, &num, &sz);
	pop3_parse_stat(s, size, &num, &sz);
	pop3_listing_line(&line, &len);
	/* a longer input never takes back what a prefix of it decided */
	int like = pop3_looks_like_status(s, size);
	for (size_t k = 0; k <= size && k <= 6; k++) {
		int pre = pop3_looks_like_status(s, k);
		if (like < -1 || like > 1 || (pre >= 0 && pre != like))
			abort();
	}

	/* unstuff in pieces whose sizes come from the data itself */
	out = malloc(size + 1);
	pop3_dot_init(&d);
	while (off < size && !d.done) {
		size_t step = 1 + data[off] % 17;
		if (step > size - off)
			step = size - off;
		size_t used = pop3_dot_feed(&d, s + off, step, out, &o);
		if (o > used + 1 || used > step || (used < step && !d.done))
			abort();
		off += used;
		total += o;
	}
	if (total > size)
		abort();
	free(out);
	head(data, size);
	return 0;
}
