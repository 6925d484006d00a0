/*
 * pop3_parse — pure parsing of POP3 server responses (RFC 1939, RFC 2449
 * CAPA, RFC 3206 / RFC 2449 response codes). No I/O, no globals.
 */
#ifndef POPFETCHD_POP3_PARSE_H
#define POPFETCHD_POP3_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* RFC 2449: a response line is at most 512 octets including CRLF. */
#define POP3_LINE_MAX 512
/* RFC 1939: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E. */
#define POP3_UIDL_MAX 70

enum pop3_status {
	POP3_STATUS_OK,	  /* "+OK" */
	POP3_STATUS_ERR,  /* "-ERR" */
	POP3_STATUS_CONT, /* "+ " SASL continuation */
	POP3_STATUS_BAD,  /* anything else: protocol violation */
};

/* Response codes (RFC 2449 / 3206), as bits. */
enum pop3_rcode {
	POP3_RC_IN_USE = 1 << 0,
	POP3_RC_LOGIN_DELAY = 1 << 1,
	POP3_RC_SYS_TEMP = 1 << 2,
	POP3_RC_SYS_PERM = 1 << 3,
	POP3_RC_AUTH = 1 << 4,
	POP3_RC_UTF8 = 1 << 5,
};

struct pop3_reply {
	enum pop3_status status;
	unsigned rcodes;  /* enum pop3_rcode bits */
	const char *text; /* the text after the status (and code), in the line */
	size_t text_len;
	unsigned login_delay; /* seconds from "[LOGIN-DELAY n]", 0 when none given */
};

/* Parse one status line (without its CRLF). Never fails: unknown status is
 * POP3_STATUS_BAD. text points into line. */
void pop3_parse_status(const char *line, size_t len, struct pop3_reply *ret);

/* Capabilities (RFC 2449) that popfetchd uses. */
struct pop3_capa {
	bool seen; /* a CAPA list was received */
	bool stls;
	bool uidl;
	bool top;
	bool pipelining;
	bool user;
	bool utf8;
	bool resp_codes;
	bool auth_resp_code;
	unsigned login_delay; /* LOGIN-DELAY n */
	char sasl[256];	      /* the SASL mechanisms, space-separated, upper-case */
};

/* Reset and parse one line of a CAPA listing into capa. */
void pop3_capa_init(struct pop3_capa *capa);
void pop3_parse_capa_line(struct pop3_capa *capa, const char *line, size_t len);

/* "n uid" of a UIDL listing. uid is copied (NUL-terminated) into uid[71].
 * 0 on success, -EINVAL for a malformed line or a uid outside RFC 1939. */
int pop3_parse_uidl_line(const char *line, size_t len, unsigned long *num, char *uid);
/* "n size" of a LIST listing. */
int pop3_parse_list_line(const char *line, size_t len, unsigned long *num, uint64_t *size);
/* The text of a +OK to STAT (RFC 1939 §5): "nn mm", the number of messages
 * and the size of the maildrop in octets; anything after the size is
 * ignored (the RFC allows it). 0, or -EINVAL. */
int pop3_parse_stat(const char *text, size_t len, unsigned long *count, uint64_t *size);
/* A multi-line listing line (CAPA/UIDL/LIST): the terminator "." -> 1;
 * a dot-stuffed line has its first dot removed (*line, *len adjusted); 0. */
int pop3_listing_line(const char **line, size_t *len);

/* Do the first bytes of a RETR's data read as a status line: "+OK" or
 * "-ERR" followed by a space or the end of the line? A message may begin
 * so; so does the data of a pipelined RETR whose responses are out of step
 * with the commands. 1: they do, 0: they do not, -1: too few bytes to tell. */
int pop3_looks_like_status(const char *buf, size_t len);

/*
 * Streaming dot-unstuffing of multi-line message data (RFC 1939 §3): feed
 * the bytes after the "+OK" line in chunks of any size; the message bytes
 * (CRLF kept, stuffing dots removed, terminator not included) are written
 * to out, which must have room for inlen + 1 bytes (a ".\r" held back from
 * the previous piece comes out with this one). Returns the number of input
 * bytes consumed; *outlen is set to the bytes written; d->done becomes true
 * when the terminating CRLF.CRLF was consumed (input after it is not
 * consumed).
 */
struct pop3_dot {
	int state;
	bool done;
};
void pop3_dot_init(struct pop3_dot *d);
size_t pop3_dot_feed(struct pop3_dot *d, const char *in, size_t inlen, char *out, size_t *outlen);

/*
 * Streaming search for the end of a message's header block (RFC 5322
 * §2.1): its first empty line ("\r\n", or a bare "\n", at the start of a
 * line). Feed the message bytes (unstuffed) in chunks of any size; returns
 * how many of them belong to the header block: all of them until it ends,
 * then those up to and including the empty line's LF, none after. h->done
 * becomes true once the empty line was seen. What TOP n 0 sends after it
 * (body lines a server adds) is not part of the block.
 */
struct pop3_head {
	int state;
	bool done;
};
void pop3_head_init(struct pop3_head *h);
size_t pop3_head_feed(struct pop3_head *h, const char *buf, size_t len);

#endif
