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

/* Most messages a listing may hold: a bound on what a server can make us allocate. */
#define POP3_MAX_MESSAGES 1000000

/*
 * Line framing (RFC 1939 §3): the first line of buf ends at its first LF
 * ("\r\n", or a bare "\n"; one CR right before the LF ends the line with
 * it). A line may hold at most POP3_LINE_MAX - 2 octets before its end:
 * the first POP3_LINE_MAX bytes of the input are enough to decide. Returns
 * 1: a line of *line_len bytes at buf, *used bytes with its end; 0: no end
 * yet, more input is needed; -EMSGSIZE: the line is over the limit.
 */
int pop3_frame_line(const char *buf, size_t len, size_t *line_len, size_t *used);

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
 * The multi-line data of a RETR or TOP, read as it arrives: dot-unstuffed
 * (pop3_dot_feed), and, when the command was pipelined, checked first for
 * responses out of step with the commands. A server that added a line to
 * an earlier response puts the real status line of this one where the
 * message should begin; a message may also begin with a line that reads
 * as a status line ("+OK ..." is a line like any other): the two cannot be
 * told apart, so data that begins so is reported, then read to its end and
 * dropped.
 */
#define POP3_DATA_PEEK 80 /* bytes the check of a pipelined data's start looks at */

struct pop3_data {
	struct pop3_dot dot;
	bool check_start;		 /* the data's first line is still to be checked */
	bool ambiguous;			 /* it read as a status line: the data is dropped */
	char first_line[POP3_DATA_PEEK]; /* that line (raw, not terminated) */
	size_t first_len;
};

enum pop3_data_result {
	POP3_DATA_MORE,	     /* nothing consumed: more input is needed */
	POP3_DATA_AMBIGUOUS, /* nothing consumed: the data begins like a status line
			      * (first_line); the next calls consume it and drop it */
	POP3_DATA_BYTES,     /* *used bytes consumed, *outlen bytes of the message in out */
	POP3_DATA_END,	     /* the same, and the terminating line was among them */
};

/* check_start: the command was pipelined (its data must not begin like a
 * status line). */
void pop3_data_init(struct pop3_data *d, bool check_start);
/* How many bytes of the input the next pop3_data_feed wants to see at once
 * (when there are that many): POP3_DATA_PEEK before the start is checked,
 * then 1. */
size_t pop3_data_want(const struct pop3_data *d);
/* Feed the bytes after the "+OK" line, in pieces of any size; out has room
 * for outsize (at least 2) bytes. Input after the terminator is not consumed. */
enum pop3_data_result pop3_data_feed(struct pop3_data *d, const char *in, size_t inlen, char *out,
				     size_t outsize, size_t *used, size_t *outlen);

/* One message of the maildrop, from LIST, with its UIDL when the server has one. */
struct pop3_msg {
	unsigned long num;
	uint64_t size;
	/* "" when the server has no UIDL for it; the bytes are the listing's,
	 * valid until it is reset or freed (a listing of many messages is kept once) */
	const char *uid;
};

/* A UIDL listing entry: the UIDL itself is at uid_bytes + off. */
struct pop3_uid_entry {
	unsigned long num;
	uint32_t off;
};

/*
 * A listing being read: the lines of UIDL (when the server has it) and of
 * LIST, joined by message number once both are complete. Compact, since a
 * server decides how long it is: the UIDLs NUL-terminated one after the
 * other in uid_bytes. Zero-initialised is empty.
 */
struct pop3_listing {
	struct pop3_msg *msgs; /* from LIST; joined: by number, each with its UIDL */
	size_t nmsgs, capmsgs;
	struct pop3_uid_entry *uids; /* from UIDL; freed by the join */
	size_t nuids, capuids;
	char *uid_bytes;
	size_t uid_used, uid_cap;
};

/* Empty the listing for the next one (the memory is kept). */
void pop3_listing_reset(struct pop3_listing *l);
/* One line of the UIDL listing (unstuffed, not the terminator): 0 kept;
 * -EINVAL malformed, ignored (that message gets no UIDL); -E2BIG more than
 * POP3_MAX_MESSAGES lines; -ENOMEM. */
int pop3_listing_add_uidl(struct pop3_listing *l, const char *line, size_t len);
/* One line of the LIST listing: 0 kept; -EINVAL malformed; -E2BIG more
 * than POP3_MAX_MESSAGES lines; -ENOMEM. */
int pop3_listing_add_list(struct pop3_listing *l, const char *line, size_t len);
/* Both listings are complete: msgs sorted by number, each with the UIDL
 * the UIDL listing gave it ("" when none, or when it named the message
 * twice: no key one can trust); the UIDL entries are freed. */
void pop3_listing_join(struct pop3_listing *l);
void pop3_listing_free(struct pop3_listing *l);

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
