/*
 * pop3_parse — pure parsing of POP3 server responses. No I/O, no globals:
 * every function takes bytes and fills a struct.
 */
#include <ctype.h>
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "popfetchd/pop3_parse.h"

static bool
has_prefix_ci(const char *s, size_t len, const char *prefix)
{
	size_t n = strlen(prefix);

	return len >= n && strncasecmp(s, prefix, n) == 0;
}

static const struct {
	const char *name;
	unsigned bit;
} rcode_names[] = {
	{"IN-USE", POP3_RC_IN_USE},	{"LOGIN-DELAY", POP3_RC_LOGIN_DELAY},
	{"SYS/TEMP", POP3_RC_SYS_TEMP}, {"SYS/PERM", POP3_RC_SYS_PERM},
	{"AUTH", POP3_RC_AUTH},		{"UTF8", POP3_RC_UTF8},
};

/* "[CODE]" or "[CODE n]" at the start of text; consumed from *text. */
static void
parse_rcode(struct pop3_reply *r)
{
	const char *p = r->text, *end = r->text + r->text_len, *close;
	size_t n;

	if (p == end || *p != '[')
		return;
	close = memchr(p, ']', (size_t)(end - p));
	if (close == NULL)
		return;
	p++;
	for (size_t i = 0; i < sizeof(rcode_names) / sizeof(rcode_names[0]); i++) {
		n = strlen(rcode_names[i].name);
		if ((size_t)(close - p) < n || strncasecmp(p, rcode_names[i].name, n) != 0)
			continue;
		/* exact code, or a sub-code "SYS/TEMP/..." style, or "CODE n" */
		if (p + n != close && p[n] != ' ' && p[n] != '/')
			continue;
		r->rcodes |= rcode_names[i].bit;
		if (rcode_names[i].bit == POP3_RC_LOGIN_DELAY && p[n] == ' ') {
			unsigned long v = 0;
			for (const char *q = p + n + 1; q < close && isdigit((unsigned char)*q);
			     q++)
				if (v < 100000000)
					v = v * 10 + (unsigned long)(*q - '0');
			r->login_delay = (unsigned)v;
		}
		break;
	}
	p = close + 1;
	while (p < end && *p == ' ')
		p++;
	r->text_len = (size_t)(end - p);
	r->text = p;
}

void
pop3_parse_status(const char *line, size_t len, struct pop3_reply *ret)
{
	struct pop3_reply r = {.status = POP3_STATUS_BAD, .text = line, .text_len = len};
	size_t skip = 0;

	if (has_prefix_ci(line, len, "+OK") && (len == 3 || line[3] == ' ')) {
		r.status = POP3_STATUS_OK;
		skip = 3;
	} else if (has_prefix_ci(line, len, "-ERR") && (len == 4 || line[4] == ' ')) {
		r.status = POP3_STATUS_ERR;
		skip = 4;
	} else if (len >= 1 && line[0] == '+' && (len == 1 || line[1] == ' ')) {
		r.status = POP3_STATUS_CONT;
		skip = 1;
	}
	if (r.status != POP3_STATUS_BAD) {
		while (skip < len && line[skip] == ' ')
			skip++;
		r.text = line + skip;
		r.text_len = len - skip;
		if (r.status != POP3_STATUS_CONT)
			parse_rcode(&r);
	}
	*ret = r;
}

void
pop3_capa_init(struct pop3_capa *capa)
{
	memset(capa, 0, sizeof(*capa));
}

/* Next space-separated word of [*p, end); its length, or 0 at the end. */
static size_t
next_word(const char **p, const char *end, const char **word)
{
	const char *s = *p;

	while (s < end && (*s == ' ' || *s == '\t'))
		s++;
	*word = s;
	while (s < end && *s != ' ' && *s != '\t')
		s++;
	*p = s;
	return (size_t)(s - *word);
}

static bool
word_is(const char *w, size_t n, const char *name)
{
	return n == strlen(name) && strncasecmp(w, name, n) == 0;
}

/* RFC 4422 §3.1: a mechanism name is 1 to 20 of A-Z, 0-9, "-" and "_". */
static bool
sasl_name_ok(const char *w, size_t n)
{
	if (n == 0 || n > 20)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!isalnum((unsigned char)w[i]) && w[i] != '-' && w[i] != '_')
			return false;
	return true;
}

/* Another name the server offers; anything that is no mechanism name (a
 * terminal escape sequence, say) is not kept: the list reaches log lines. */
static void
capa_add_sasl(struct pop3_capa *capa, const char *w, size_t n)
{
	size_t used = strlen(capa->sasl);

	if (!sasl_name_ok(w, n) || used + n + 2 > sizeof(capa->sasl))
		return;
	if (used > 0)
		capa->sasl[used++] = ' ';
	for (size_t i = 0; i < n; i++)
		capa->sasl[used + i] = (char)toupper((unsigned char)w[i]);
	capa->sasl[used + n] = '\0';
}

/* The capabilities that are a word alone, and their flags. */
static const struct {
	const char *name;
	size_t flag; /* offset of its bool in struct pop3_capa */
} capa_words[] = {
	{"STLS", offsetof(struct pop3_capa, stls)},
	{"UIDL", offsetof(struct pop3_capa, uidl)},
	{"TOP", offsetof(struct pop3_capa, top)},
	{"PIPELINING", offsetof(struct pop3_capa, pipelining)},
	{"USER", offsetof(struct pop3_capa, user)},
	{"UTF8", offsetof(struct pop3_capa, utf8)},
	{"AUTH-RESP-CODE", offsetof(struct pop3_capa, auth_resp_code)},
	{"RESP-CODES", offsetof(struct pop3_capa, resp_codes)},
};

void
pop3_parse_capa_line(struct pop3_capa *capa, const char *line, size_t len)
{
	const char *p = line, *end = line + len, *w;
	size_t n = next_word(&p, end, &w);

	capa->seen = true;
	for (size_t i = 0; i < sizeof(capa_words) / sizeof(capa_words[0]); i++)
		if (word_is(w, n, capa_words[i].name)) {
			*(bool *)((char *)capa + capa_words[i].flag) = true;
			return;
		}
	if (word_is(w, n, "LOGIN-DELAY")) {
		unsigned long v = 0;
		n = next_word(&p, end, &w);
		for (size_t i = 0; i < n && isdigit((unsigned char)w[i]); i++)
			if (v < 100000000)
				v = v * 10 + (unsigned long)(w[i] - '0');
		capa->login_delay = (unsigned)v;
	} else if (word_is(w, n, "SASL")) {
		while ((n = next_word(&p, end, &w)) > 0)
			capa_add_sasl(capa, w, n);
	}
}

/* A decimal message number or size; the digits consumed from *p. */
static int
parse_number(const char **p, const char *end, uint64_t max, uint64_t *ret)
{
	const char *s = *p;
	uint64_t v = 0;

	if (s == end || !isdigit((unsigned char)*s))
		return -EINVAL;
	for (; s < end && isdigit((unsigned char)*s); s++) {
		v = v * 10 + (uint64_t)(*s - '0');
		if (v > max)
			return -ERANGE;
	}
	*p = s;
	*ret = v;
	return 0;
}

int
pop3_parse_uidl_line(const char *line, size_t len, unsigned long *num, char *uid)
{
	const char *p = line, *end = line + len, *w;
	uint64_t n;
	size_t wl;

	if (parse_number(&p, end, 0xffffffffu, &n) < 0 || n == 0 || p == end || *p != ' ')
		return -EINVAL;
	wl = next_word(&p, end, &w);
	if (wl == 0 || wl > POP3_UIDL_MAX)
		return -EINVAL;
	for (size_t i = 0; i < wl; i++)
		if ((unsigned char)w[i] < 0x21 || (unsigned char)w[i] > 0x7e)
			return -EINVAL;
	/* trailing spaces are tolerated, anything else is not */
	while (p < end && *p == ' ')
		p++;
	if (p != end)
		return -EINVAL;
	memcpy(uid, w, wl);
	uid[wl] = '\0';
	*num = (unsigned long)n;
	return 0;
}

/* "N SIZE", as STAT answers and LIST lines are. */
static int
number_and_size(const char *text, size_t len, unsigned long *num, uint64_t *size)
{
	const char *p = text, *end = text + len;
	uint64_t n, sz;

	if (parse_number(&p, end, 0xffffffffu, &n) < 0 || p == end || *p != ' ')
		return -EINVAL;
	while (p < end && *p == ' ')
		p++;
	if (parse_number(&p, end, UINT64_MAX / 16, &sz) < 0)
		return -EINVAL;
	/* RFC 1939 allows nothing after the size, but some servers add a note */
	if (p != end && *p != ' ')
		return -EINVAL;
	*num = (unsigned long)n;
	*size = sz;
	return 0;
}

int
pop3_parse_list_line(const char *line, size_t len, unsigned long *num, uint64_t *size)
{
	unsigned long n;
	uint64_t sz;

	if (number_and_size(line, len, &n, &sz) < 0 || n == 0)
		return -EINVAL;
	*num = n;
	*size = sz;
	return 0;
}

int
pop3_parse_stat(const char *text, size_t len, unsigned long *count, uint64_t *size)
{
	return number_and_size(text, len, count, size);
}

int
pop3_listing_line(const char **line, size_t *len)
{
	if (*len == 1 && (*line)[0] == '.')
		return 1;
	if (*len > 0 && (*line)[0] == '.') {
		(*line)++;
		(*len)--;
	}
	return 0;
}

int
pop3_frame_line(const char *buf, size_t len, size_t *line_len, size_t *used)
{
	size_t n = len < POP3_LINE_MAX ? len : POP3_LINE_MAX;
	const char *lf = memchr(buf, '\n', n);
	size_t end;

	if (lf == NULL)
		return n == POP3_LINE_MAX ? -EMSGSIZE : 0;
	end = (size_t)(lf - buf);
	*used = end + 1;
	if (end > 0 && buf[end - 1] == '\r')
		end--;
	if (end + 2 > POP3_LINE_MAX)
		return -EMSGSIZE;
	*line_len = end;
	return 1;
}

/* The dot-unstuffing states. */
enum {
	DOT_BOL,   /* at the beginning of a line */
	DOT_MID,   /* inside a line */
	DOT_CR,	   /* after a CR inside a line */
	DOT_DOT,   /* after a "." at the beginning of a line */
	DOT_DOTCR, /* after ".\r" at the beginning of a line */
};

int
pop3_looks_like_status(const char *buf, size_t len)
{
	static const char *const status[] = {"+OK", "-ERR"};

	for (size_t i = 0; i < 2; i++) {
		size_t n = strlen(status[i]);
		if (len <= n) {
			if (memcmp(buf, status[i], len) == 0)
				return -1;
			continue;
		}
		if (memcmp(buf, status[i], n) == 0 &&
		    (buf[n] == ' ' || buf[n] == '\r' || buf[n] == '\n'))
			return 1;
	}
	return 0;
}

void
pop3_dot_init(struct pop3_dot *d)
{
	d->state = DOT_BOL;
	d->done = false;
}

size_t
pop3_dot_feed(struct pop3_dot *d, const char *in, size_t inlen, char *out, size_t *outlen)
{
	size_t i = 0, o = 0;
	int st = d->state;

	while (i < inlen && !d->done) {
		char c = in[i];

		if (st == DOT_MID) {
			/* the common case: copy up to the next CR in one go */
			const char *cr = memchr(in + i, '\r', inlen - i);
			size_t n = cr ? (size_t)(cr - (in + i)) : inlen - i;
			memcpy(out + o, in + i, n);
			o += n;
			i += n;
			if (cr == NULL)
				break;
			out[o++] = '\r';
			i++;
			st = DOT_CR;
			continue;
		}
		i++;
		switch (st) {
		case DOT_BOL:
			if (c == '.') {
				st = DOT_DOT;
				break;
			}
			out[o++] = c;
			st = c == '\r' ? DOT_CR : DOT_MID;
			break;
		case DOT_CR:
			out[o++] = c;
			st = c == '\n' ? DOT_BOL : c == '\r' ? DOT_CR : DOT_MID;
			break;
		case DOT_DOT:
			if (c == '\r') {
				st = DOT_DOTCR;
				break;
			}
			/* the stuffing dot is dropped, the rest of the line kept */
			out[o++] = c;
			st = DOT_MID;
			break;
		case DOT_DOTCR:
			if (c == '\n') {
				d->done = true;
				st = DOT_BOL;
				break;
			}
			/* ".\rX": not the terminator; the dot was stuffing */
			out[o++] = '\r';
			out[o++] = c;
			st = c == '\r' ? DOT_CR : DOT_MID;
			break;
		}
	}
	d->state = st;
	*outlen = o;
	return i;
}

void
pop3_data_init(struct pop3_data *d, bool check_start)
{
	pop3_dot_init(&d->dot);
	d->check_start = check_start;
	d->ambiguous = false;
	d->first_len = 0;
}

size_t
pop3_data_want(const struct pop3_data *d)
{
	return d->check_start ? POP3_DATA_PEEK : 1;
}

/* The first line of the data, when it reads as a status line: kept raw
 * (up to its CR, or as much of it as was seen) for the owner to quote. */
static enum pop3_data_result
check_start(struct pop3_data *d, const char *in, size_t inlen)
{
	size_t have = inlen < POP3_DATA_PEEK ? inlen : POP3_DATA_PEEK;
	int r = pop3_looks_like_status(in, have);
	const char *cr;

	if (r < 0)
		return POP3_DATA_MORE;
	d->check_start = false;
	if (r == 0)
		return POP3_DATA_BYTES;
	cr = memchr(in, '\r', have);
	d->first_len = cr != NULL ? (size_t)(cr - in) : have;
	memcpy(d->first_line, in, d->first_len);
	d->ambiguous = true;
	return POP3_DATA_AMBIGUOUS;
}

enum pop3_data_result
pop3_data_feed(struct pop3_data *d, const char *in, size_t inlen, char *out, size_t outsize,
	       size_t *used, size_t *outlen)
{
	*used = *outlen = 0;
	if (inlen == 0 || d->dot.done)
		return POP3_DATA_MORE;
	if (d->check_start) {
		enum pop3_data_result r = check_start(d, in, inlen);
		if (r != POP3_DATA_BYTES)
			return r;
	}
	/* pop3_dot_feed may write one byte more than it reads */
	if (inlen > outsize - 1)
		inlen = outsize - 1;
	*used = pop3_dot_feed(&d->dot, in, inlen, out, outlen);
	if (d->ambiguous)
		*outlen = 0;
	return d->dot.done ? POP3_DATA_END : POP3_DATA_BYTES;
}

void
pop3_listing_reset(struct pop3_listing *l)
{
	l->nmsgs = 0;
	l->nuids = 0;
	l->uid_used = 0;
}

/* Room for one more element of size in *v (of *cap, *n used). */
static int
grow(void **v, size_t *cap, size_t n, size_t size, size_t first)
{
	size_t c;
	void *p;

	if (n < *cap)
		return 0;
	c = *cap ? 2 * *cap : first;
	p = realloc(*v, c * size);
	if (p == NULL)
		return -ENOMEM;
	*v = p;
	*cap = c;
	return 0;
}

int
pop3_listing_add_uidl(struct pop3_listing *l, const char *line, size_t len)
{
	char uid[POP3_UIDL_MAX + 1];
	unsigned long num;
	size_t n;

	if (l->nuids >= POP3_MAX_MESSAGES)
		return -E2BIG;
	if (pop3_parse_uidl_line(line, len, &num, uid) < 0)
		return -EINVAL;
	n = strlen(uid) + 1;
	while (l->uid_used + n > l->uid_cap)
		if (grow((void **)&l->uid_bytes, &l->uid_cap, l->uid_cap, 1, 4096) < 0)
			return -ENOMEM;
	if (grow((void **)&l->uids, &l->capuids, l->nuids, sizeof(*l->uids), 64) < 0)
		return -ENOMEM;
	memcpy(l->uid_bytes + l->uid_used, uid, n);
	l->uids[l->nuids].num = num;
	l->uids[l->nuids].off = (uint32_t)l->uid_used;
	l->nuids++;
	l->uid_used += n;
	return 0;
}

int
pop3_listing_add_list(struct pop3_listing *l, const char *line, size_t len)
{
	unsigned long num;
	uint64_t size;

	if (pop3_parse_list_line(line, len, &num, &size) < 0)
		return -EINVAL;
	if (l->nmsgs >= POP3_MAX_MESSAGES)
		return -E2BIG;
	if (grow((void **)&l->msgs, &l->capmsgs, l->nmsgs, sizeof(*l->msgs), 64) < 0)
		return -ENOMEM;
	l->msgs[l->nmsgs++] = (struct pop3_msg){.num = num, .size = size, .uid = NULL};
	return 0;
}

static int
cmp_msg(const void *a, const void *b)
{
	const struct pop3_msg *x = a, *y = b;
	return x->num < y->num ? -1 : x->num > y->num;
}

static int
cmp_uid(const void *a, const void *b)
{
	const struct pop3_uid_entry *x = a, *y = b;
	return x->num < y->num ? -1 : x->num > y->num;
}

/* No UIDL: an entry whose UIDL is no key (it names two messages). */
#define UID_NONE UINT32_MAX

void
pop3_listing_join(struct pop3_listing *l)
{
	size_t j = 0;

	if (l->nmsgs > 1)
		qsort(l->msgs, l->nmsgs, sizeof(*l->msgs), cmp_msg);
	if (l->nuids > 1)
		qsort(l->uids, l->nuids, sizeof(*l->uids), cmp_uid);
	/* a message the UIDL listing names twice has no UIDL one can trust */
	for (size_t k = 1; k < l->nuids; k++)
		if (l->uids[k].num == l->uids[k - 1].num)
			l->uids[k].off = l->uids[k - 1].off = UID_NONE;
	for (size_t i = 0; i < l->nmsgs; i++) {
		while (j < l->nuids && l->uids[j].num < l->msgs[i].num)
			j++;
		if (j < l->nuids && l->uids[j].num == l->msgs[i].num && l->uids[j].off != UID_NONE)
			l->msgs[i].uid = l->uid_bytes + l->uids[j].off;
		else
			l->msgs[i].uid = "";
	}
	free(l->uids);
	l->uids = NULL;
	l->nuids = l->capuids = 0;
}

void
pop3_listing_free(struct pop3_listing *l)
{
	free(l->msgs);
	free(l->uids);
	free(l->uid_bytes);
	*l = (struct pop3_listing){0};
}

enum { HEAD_BOL, HEAD_CR, HEAD_MID };

void
pop3_head_init(struct pop3_head *h)
{
	h->state = HEAD_BOL;
	h->done = false;
}

size_t
pop3_head_feed(struct pop3_head *h, const char *buf, size_t len)
{
	size_t i = 0;

	while (i < len && !h->done) {
		char c = buf[i];

		if (h->state == HEAD_MID) {
			const char *lf = memchr(buf + i, '\n', len - i);
			if (lf == NULL)
				return len;
			i = (size_t)(lf - buf) + 1;
			h->state = HEAD_BOL;
			continue;
		}
		i++;
		if (c == '\n')
			h->done = true; /* a line with nothing, or only a CR, before its LF */
		else if (c == '\r' && h->state == HEAD_BOL)
			h->state = HEAD_CR;
		else
			h->state = HEAD_MID;
	}
	return i;
}
