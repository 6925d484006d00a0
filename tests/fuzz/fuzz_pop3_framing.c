/*
 * libFuzzer harness: POP3 response framing across network reads.
 *
 * The input is what a server sends in one session, and the points where the
 * network cuts it into reads. The bytes go through pop3_parse's framing as
 * pop3.c moves them there from an evbuffer: lines (pop3_frame_line, on the
 * first POP3_LINE_MAX bytes made contiguous) for status lines and the CAPA,
 * UIDL and LIST listings (pop3_listing_*, joined at the end of LIST), and
 * the data of a RETR (pop3_data_feed: the out-of-step check of pipelined
 * data, then dot-unstuffing) from the first chain of the buffer, in pieces
 * of at most a scratch buffer. A model of the client's session decides what
 * each line is (greeting, CAPA, USER, PASS, STAT, UIDL, LIST, then RETR and
 * DELE in turn; RETR is taken as pipelined when CAPA offers PIPELINING) and
 * every parser result is written down in a record.
 *
 * Fed in the chosen pieces, with a scratch buffer chosen by the input, the
 * record must be exactly the one of the whole stream fed at once with the
 * daemon's 64 KiB scratch buffer: abort() otherwise.
 *
 * Input: byte 0: the number of split points (its low 5 bits); byte 1: the
 * scratch size in the split run (1 to 255; 0: 64 KiB); then two bytes
 * (little-endian, taken modulo the stream length + 1) per split point; the
 * rest is the stream.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "popfetchd/pop3_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define DAEMON_SCRATCH (64 * 1024)

/* What the model expects next; RETR and DELE alternate at the end. */
enum step {
	S_GREETING,
	S_CAPA,
	S_USER,
	S_PASS,
	S_STAT,
	S_UIDL,
	S_LIST,
	S_RETR,
	S_DELE,
};

struct rec {
	uint8_t *b;
	size_t len, cap;
};

struct model {
	struct evbuffer *in;
	enum step step;
	int mode; /* 0: status line, 1: listing, 2: message data */
	bool failed;
	bool more; /* the data reader waits for more input */
	size_t scratch;
	char *out; /* scratch + 1 bytes */
	struct pop3_capa capa;
	struct pop3_listing listing;
	struct pop3_data data;
	struct rec rec; /* everything the parsers said */
	struct rec msg; /* the message being retrieved */
};

static void
put(struct rec *r, const void *p, size_t n)
{
	if (r->len + n > r->cap) {
		size_t cap = r->cap ? r->cap : 256;
		while (cap < r->len + n)
			cap *= 2;
		r->b = realloc(r->b, cap);
		if (r->b == NULL)
			abort();
		r->cap = cap;
	}
	if (n > 0)
		memcpy(r->b + r->len, p, n);
	r->len += n;
}

static void
put_u64(struct rec *r, char tag, uint64_t v)
{
	put(r, &tag, 1);
	put(r, &v, sizeof(v));
}

static void
fail(struct model *m, uint64_t why)
{
	put_u64(&m->rec, 'F', why);
	m->failed = true;
}

static void
on_status(struct model *m, const char *line, size_t len)
{
	struct pop3_reply r;
	unsigned long count;
	uint64_t size;
	bool ok;

	pop3_parse_status(line, len, &r);
	if (r.text < line || r.text_len > len || r.text + r.text_len > line + len)
		abort();
	put_u64(&m->rec, 'S', (uint64_t)r.status << 32 | r.rcodes);
	put_u64(&m->rec, 'd', r.login_delay);
	put_u64(&m->rec, 't', r.text_len);
	put(&m->rec, r.text, r.text_len);
	if (r.status == POP3_STATUS_BAD || r.status == POP3_STATUS_CONT) {
		fail(m, 1);
		return;
	}
	ok = r.status == POP3_STATUS_OK;
	switch (m->step) {
	case S_GREETING:
	case S_USER:
	case S_PASS:
		if (!ok) {
			fail(m, 2);
			return;
		}
		m->step++;
		break;
	case S_CAPA:
		if (ok) {
			pop3_capa_init(&m->capa);
			m->mode = 1;
		} else {
			m->step = S_USER;
		}
		break;
	case S_STAT:
		if (!ok || pop3_parse_stat(r.text, r.text_len, &count, &size) < 0) {
			fail(m, 3);
			return;
		}
		put_u64(&m->rec, 'T', count);
		put_u64(&m->rec, 'z', size);
		m->step = S_UIDL;
		break;
	case S_UIDL:
		if (ok)
			m->mode = 1;
		else
			m->step = S_LIST;
		break;
	case S_LIST:
		if (!ok) {
			fail(m, 4);
			return;
		}
		m->mode = 1;
		break;
	case S_RETR:
		if (ok) {
			pop3_data_init(&m->data, m->capa.pipelining);
			m->msg.len = 0;
			m->mode = 2;
		}
		/* -ERR: that message only, the next RETR follows */
		break;
	case S_DELE:
		m->step = S_RETR;
		break;
	}
}

/* The end of LIST: the joined listing, checked and written down. */
static void
join(struct model *m)
{
	pop3_listing_join(&m->listing);
	if (m->listing.uids != NULL || m->listing.nuids != 0)
		abort();
	for (size_t i = 0; i < m->listing.nmsgs; i++) {
		const struct pop3_msg *msg = &m->listing.msgs[i];
		size_t n = strlen(msg->uid);
		if (n > POP3_UIDL_MAX || msg->num == 0 ||
		    (i > 0 && msg->num < m->listing.msgs[i - 1].num))
			abort();
		put_u64(&m->rec, 'L', msg->num);
		put_u64(&m->rec, 'z', msg->size);
		put(&m->rec, msg->uid, n + 1);
	}
}

static void
on_listing_line(struct model *m, const char *line, size_t len)
{
	int rc;

	if (pop3_listing_line(&line, &len) == 1) {
		m->mode = 0;
		if (m->step == S_CAPA) {
			put(&m->rec, "C", 1);
			put(&m->rec, &m->capa, sizeof(m->capa));
			m->step = S_USER;
		} else {
			if (m->step == S_LIST)
				join(m);
			m->step++; /* UIDL -> LIST -> RETR */
		}
		return;
	}
	switch (m->step) {
	case S_CAPA:
		pop3_parse_capa_line(&m->capa, line, len);
		if (memchr(m->capa.sasl, '\0', sizeof(m->capa.sasl)) == NULL)
			abort();
		break;
	case S_UIDL:
		/* -EINVAL: ignored, as pop3.c does */
		rc = pop3_listing_add_uidl(&m->listing, line, len);
		put_u64(&m->rec, 'U', (uint64_t)-rc);
		if (rc == -E2BIG || rc == -ENOMEM)
			fail(m, 7);
		break;
	case S_LIST:
		rc = pop3_listing_add_list(&m->listing, line, len);
		if (rc < 0)
			fail(m, 5);
		break;
	default:
		abort();
	}
}

/* input_piece() of pop3.c: at least want bytes (or all) in the first chain. */
static void
input_piece(struct model *m, size_t want, struct evbuffer_iovec *v)
{
	size_t have = evbuffer_get_length(m->in);

	if (evbuffer_pullup(m->in, (ev_ssize_t)(have < want ? have : want)) == NULL ||
	    evbuffer_peek(m->in, -1, NULL, v, 1) < 1 || v->iov_len < (have < want ? have : want))
		abort(); /* the caller saw bytes */
}

/* read_data() of pop3.c: what the first chain holds, at most the scratch. */
static void
read_data(struct model *m)
{
	struct evbuffer_iovec v;
	size_t used, outlen, have = evbuffer_get_length(m->in);
	enum pop3_data_result r;

	input_piece(m, pop3_data_want(&m->data), &v);
	r = pop3_data_feed(&m->data, v.iov_base, v.iov_len, m->out, m->scratch + 1, &used, &outlen);
	if (r == POP3_DATA_MORE) {
		/* only the start of pipelined data waits, and for a status line's first bytes */
		if (used != 0 || have >= 5 || !m->data.check_start)
			abort();
		m->more = true;
		return;
	}
	if (r == POP3_DATA_AMBIGUOUS) {
		const struct pop3_data *d = &m->data;
		if (used != 0 || d->check_start || !d->ambiguous || d->first_len > POP3_DATA_PEEK ||
		    d->first_len < 3 || memchr(d->first_line, '\r', d->first_len) != NULL ||
		    (memcmp(d->first_line, "+OK", 3) != 0 && memcmp(d->first_line, "-ERR", 4) != 0))
			abort();
		put(&m->rec, "A", 1); /* the line itself depends on how much had come */
		return;
	}
	if (used > v.iov_len || used > m->scratch || outlen > used + 1 ||
	    (m->data.ambiguous && outlen > 0) || (used == 0 && r != POP3_DATA_END) ||
	    (used < v.iov_len && used < m->scratch && r != POP3_DATA_END))
		abort();
	evbuffer_drain(m->in, used);
	put(&m->msg, m->out, outlen);
	if (r == POP3_DATA_END) {
		put_u64(&m->rec, 'M', m->msg.len);
		put(&m->rec, m->msg.b, m->msg.len);
		m->msg.len = 0;
		m->mode = 0;
		m->step = S_DELE;
	}
}

/* read_line() of pop3.c: 1 and a line, 0 for more input, -1 too long. */
static int
read_line(struct model *m, char *buf, size_t *len)
{
	struct evbuffer_iovec v;
	size_t used = 0;
	int r;

	input_piece(m, POP3_LINE_MAX, &v);
	r = pop3_frame_line(v.iov_base, v.iov_len, len, &used);
	if (r <= 0)
		return r < 0 ? -1 : 0;
	if (*len + 2 > POP3_LINE_MAX || used > v.iov_len ||
	    (used != *len + 1 && used != *len + 2) ||
	    ((const char *)v.iov_base)[used - 1] != '\n' || memchr(v.iov_base, '\n', *len) != NULL)
		abort();
	memcpy(buf, v.iov_base, *len);
	buf[*len] = '\0';
	evbuffer_drain(m->in, used);
	return 1;
}

/* on_read() of pop3.c, after each network read. */
static void
on_read(struct model *m)
{
	char line[POP3_LINE_MAX + 1];
	size_t len;
	int rc;

	m->more = false;
	while (!m->failed && !m->more && evbuffer_get_length(m->in) > 0) {
		if (m->mode == 2) {
			read_data(m);
			continue;
		}
		rc = read_line(m, line, &len);
		if (rc < 0)
			fail(m, 6);
		if (rc <= 0)
			break;
		if (m->mode == 1)
			on_listing_line(m, line, len);
		else
			on_status(m, line, len);
	}
}

/* The record of stream fed in the pieces that cuts[0..ncuts) delimit. */
static void
run(struct rec *ret, const uint8_t *stream, size_t n, const size_t *cuts, size_t ncuts,
    size_t scratch)
{
	struct model m = {.step = S_GREETING, .scratch = scratch};
	size_t from = 0;

	m.in = evbuffer_new();
	m.out = malloc(scratch + 1);
	if (m.in == NULL || m.out == NULL)
		abort();
	for (size_t i = 0; i <= ncuts && !m.failed; i++) {
		size_t to = i < ncuts ? cuts[i] : n;
		struct evbuffer *piece;

		if (to <= from)
			continue;
		/* a chain of its own, as a read into the bufferevent makes */
		piece = evbuffer_new();
		if (piece == NULL || evbuffer_add(piece, stream + from, to - from) < 0 ||
		    evbuffer_add_buffer(m.in, piece) < 0)
			abort();
		evbuffer_free(piece);
		from = to;
		on_read(&m);
	}
	/* where the session stands when the stream ends */
	put_u64(&m.rec, 'E', (uint64_t)m.step << 8 | (uint64_t)m.mode << 1 | m.failed);
	put_u64(&m.rec, 'b', m.failed ? 0 : evbuffer_get_length(m.in));
	if (m.mode == 2 && !m.failed) {
		put_u64(&m.rec, 'P', m.msg.len);
		put(&m.rec, m.msg.b, m.msg.len);
	}
	evbuffer_free(m.in);
	free(m.out);
	free(m.msg.b);
	pop3_listing_free(&m.listing);
	*ret = m.rec;
}

static int
cmp_size(const void *a, const void *b)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;

	return x < y ? -1 : x > y;
}

static void
dump(const char *what, const struct rec *r)
{
	fprintf(stderr, "%s (%zu bytes):", what, r->len);
	for (size_t i = 0; i < r->len; i++)
		fprintf(stderr, "%s%02x", i % 32 ? " " : "\n  ", r->b[i]);
	fprintf(stderr, "\n");
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t ncuts, scratch, hdr, n, cuts[32];
	const uint8_t *stream;
	struct rec whole, split;

	if (size < 2)
		return 0;
	ncuts = data[0] & 31;
	scratch = data[1] ? data[1] : DAEMON_SCRATCH;
	hdr = 2 + 2 * ncuts;
	if (size < hdr)
		return 0;
	stream = data + hdr;
	n = size - hdr;
	for (size_t i = 0; i < ncuts; i++)
		cuts[i] = (data[2 + 2 * i] | (size_t)data[3 + 2 * i] << 8) % (n + 1);
	qsort(cuts, ncuts, sizeof(cuts[0]), cmp_size);

	run(&whole, stream, n, NULL, 0, DAEMON_SCRATCH);
	run(&split, stream, n, cuts, ncuts, scratch);
	if (whole.len != split.len || memcmp(whole.b, split.b, whole.len) != 0) {
		fprintf(stderr, "fuzz_pop3_framing: %zu pieces (scratch %zu) differ from one\n",
			ncuts + 1, scratch);
		dump("whole", &whole);
		dump("in pieces", &split);
		abort();
	}
	free(whole.b);
	free(split.b);
	return 0;
}
