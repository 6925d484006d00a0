/*
 * pop3 — one POP3 client session over a libevent bufferevent (RFC 1939,
 * RFC 2449). It connects, reads the greeting, asks CAPA, logs in, then runs
 * the commands its owner queues (listing, STAT, RETR, TOP, DELE, QUIT). Message bytes go
 * to the owner through a callback; the session writes no file and decides no
 * policy. It logs nothing above debug: the owner turns failures into lines.
 * What the server sends is framed and parsed by pop3_parse (pure code); the
 * session moves the bytes between the connection and the parser.
 */
#ifndef POPFETCHD_POP3_H
#define POPFETCHD_POP3_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "popfetchd/pop3_parse.h"

struct auth_scram_cache;
struct event_base;
struct evdns_base;
struct pop3_session;
struct ssl_st;
struct tls_ctx;

/* What went wrong; the owner maps each class to an exit code. */
enum pop3_failure {
	POP3_FAIL_RESOLVE,  /* host name did not resolve */
	POP3_FAIL_CONNECT,  /* refused, unreachable, connect timeout */
	POP3_FAIL_LOST,	    /* the connection ended mid-session */
	POP3_FAIL_TIMEOUT,  /* a response did not come in time, or trickled */
	POP3_FAIL_TEMP,	    /* [IN-USE], [LOGIN-DELAY], [SYS/TEMP] */
	POP3_FAIL_PROTOCOL, /* bad greeting, malformed or overlong response */
	POP3_FAIL_TLS,	    /* TLS required but not available or failed */
	POP3_FAIL_AUTH,	    /* credentials refused, no usable mechanism */
};

enum pop3_tls_mode { POP3_TLS_NONE, POP3_TLS_IMPLICIT, POP3_TLS_EXPLICIT };

struct pop3_params {
	const char *id; /* for debug lines */
	const char *host;
	uint16_t port;
	enum pop3_tls_mode tls;
	struct tls_ctx *tls_ctx; /* for implicit and explicit: built once per configuration */
	const char *user;
	const char *password;
	const char *token; /* OAuth2 access token, for XOAUTH2 / OAUTHBEARER */
	/* SCRAM's salted password kept from login to login (auth.h); NULL: none */
	struct auth_scram_cache *scram_cache;
	/* allowed mechanisms in order of preference, NULL-terminated */
	const char *const *mechanisms;
	/* seconds: DNS + TCP (+ TLS). The host's addresses are tried in turn,
	 * the next one when the one before has failed or not connected within
	 * 250 ms (RFC 8305); the first to connect is used. */
	unsigned connect_timeout;
	unsigned command_timeout; /* seconds: see DESIGN.md §1 timeouts.command */
	/* after POP3_PROGRESS_CAPA, wait for pop3_login() (or pop3_quit()) */
	bool hold_login;
	/* one command at a time even when the server offers PIPELINING */
	bool lockstep;
	/* For tests only (tests/unit/test_transcripts.c): a stream socket
	 * connected already, used instead of resolving host and connecting
	 * to it; -1 fails the session as a refused connection. NULL: connect
	 * as usual. */
	int (*open_socket)(void *arg);
	void *open_arg;
};

/* How far the opening of a session got: for an owner that reports each
 * step as it succeeds (the test command). */
enum pop3_progress {
	POP3_PROGRESS_CONNECTED, /* TCP connected; with implicit TLS the handshake
				  * comes next */
	POP3_PROGRESS_TLS,	 /* handshake done, certificate accepted */
	POP3_PROGRESS_CAPA,	 /* the capabilities the login goes by: pop3_capa() */
};

/* What the opening found so far, as a progress event tells it; valid
 * during the call. */
struct pop3_progress_info {
	const char *address;  /* connected to: "192.0.2.7", "[2001:db8::7]" */
	struct ssl_st *ssl;   /* from POP3_PROGRESS_TLS on: the TLS connection */
	const char *greeting; /* at POP3_PROGRESS_CAPA: the server's greeting, printable */
};

/* A failure as the owner hears of it. */
struct pop3_error {
	enum pop3_failure fail;
	unsigned rcodes;      /* enum pop3_rcode bits of the response that failed, if any */
	unsigned login_delay; /* seconds, from [LOGIN-DELAY n] or CAPA LOGIN-DELAY */
	bool token_rejected;  /* XOAUTH2/OAUTHBEARER: the server refused the token */
	const char *detail;   /* one line: our words, the server's text quoted */
	/* the TLS connection once a handshake began, else NULL: what the server
	 * presented can be described (tls_peer), also when it was refused */
	struct ssl_st *ssl;
};

/*
 * Owner callbacks. failed() and quit() are terminal: after them the session
 * sends nothing more and the owner frees it (not from inside the callback's
 * own stack frame: use pop3_session_free_deferred or free after the loop).
 */
struct pop3_events {
	void (*ready)(void *arg); /* logged in; pop3_capa() is valid */
	/* the joined UIDL and LIST listings (pop3_parse.h): msgs are valid until
	 * the session is freed or lists again */
	void (*listing)(void *arg, const struct pop3_msg *msgs, size_t n, bool have_uidl);
	/* message bytes, in order: of the RETR (or TOP) being answered */
	void (*data)(void *arg, const char *buf, size_t len);
	/* the whole message (or, for TOP, its header block) was sent; or error
	 * (the server's text) when it refused the RETR or TOP: the session goes on */
	void (*retrieved)(void *arg, unsigned long num, const char *error);
	/* pipelined, the data of RETR (or TOP) num began with a line that reads as a
	 * status line (first_line, made printable): the message may begin so,
	 * or the server's responses are out of step with the commands; the
	 * session cannot tell. The data was read to its end and dropped, the
	 * session goes on; a session with params.lockstep can tell. NULL: the
	 * session fails instead (POP3_FAIL_PROTOCOL). */
	void (*ambiguous)(void *arg, unsigned long num, const char *first_line);
	void (*deleted)(void *arg, unsigned long num, bool ok);
	void (*quit)(void *arg, bool ok); /* ok: the server committed the deletions */
	void (*failed)(void *arg, const struct pop3_error *err);
	/* optional (NULL: not told); the session must not be ended from it */
	void (*progress)(void *arg, enum pop3_progress step, const struct pop3_progress_info *info);
	/* the answer to pop3_stat(): messages and octets in the maildrop */
	void (*stat)(void *arg, unsigned long count, uint64_t size);
};

struct pop3_session *pop3_session_new(struct event_base *base, struct evdns_base *dns,
				      const struct pop3_params *params,
				      const struct pop3_events *events, void *arg);
/* Start connecting. Events arrive from the loop. */
void pop3_session_start(struct pop3_session *s);
void pop3_session_free(struct pop3_session *s);
/* Free from a zero-timeout event: safe inside the session's own callback. */
void pop3_session_free_deferred(struct pop3_session *s);

const struct pop3_capa *pop3_capa(const struct pop3_session *s);
/* The mechanism used to log in, after ready(). */
const char *pop3_mechanism(const struct pop3_session *s);
/* The server certificate's notAfter (UTC, seconds since the epoch) once TLS
 * is on; 0 without TLS. */
time_t pop3_tls_not_after(const struct pop3_session *s);

/* With params.hold_login, after POP3_PROGRESS_CAPA: log in now, with this
 * OAuth2 access token (NULL: params.token), which must live until the
 * session is freed. failed() may be called from inside this call. */
void pop3_login(struct pop3_session *s, const char *token);

/* Commands, valid after ready(); queued and answered in order. */
void pop3_list(struct pop3_session *s); /* UIDL (if any) + LIST -> listing() */
void pop3_retr(struct pop3_session *s, unsigned long num);
/* TOP num 0 (RFC 1939 §7): the header block of message num, answered
 * through data() and retrieved() as a RETR is. The owner asks it only of a
 * server that has it (CAPA TOP, or no CAPA at all). */
void pop3_top(struct pop3_session *s, unsigned long num);
void pop3_dele(struct pop3_session *s, unsigned long num);
void pop3_stat(struct pop3_session *s); /* STAT -> stat() */
/* Also valid while a held login waits: then the session ends without logging in. */
void pop3_quit(struct pop3_session *s);

/*
 * Hold the answers: nothing more is read or handed to the owner (what is
 * buffered stays) and the command timeout waits, until pop3_resume; the
 * owner works meanwhile on what it has (fetch: a seal or a commit on a
 * worker thread). Commands may still be sent. Safe in a callback: the
 * session hands on nothing after the callback returns.
 */
void pop3_hold(struct pop3_session *s);
/* Read again; what was buffered is handed on from the loop. */
void pop3_resume(struct pop3_session *s);

/* End the session at once, without QUIT (nothing is committed) and
 * without a failed() callback: the owner decided it. Safe in a callback. */
void pop3_abort(struct pop3_session *s);

#endif
