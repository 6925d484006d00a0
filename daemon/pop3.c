/*
 * pop3 — one POP3 client session over a libevent bufferevent.
 *
 * An enum state machine: enter_state() sends the state's command,
 * on_status() hands the status line of the response to the current state's
 * handler (status_handlers[]), on_listing_line() and read_data() take the
 * multi-line bodies, and on_event() the transport. Commands the owner
 * queues run one at a time, or pipelined. Framing, dot-unstuffing and the
 * listing are pop3_parse's: on_read() moves bytes from the input buffer to
 * it. Every end of a session goes through finish().
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/bufferevent_struct.h> /* ev_read: see read_ahead_on */
#include <event2/dns.h>
#include <event2/event.h>
#include <event2/util.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "popfetchd/auth.h"
#include "popfetchd/log.h"
#include "popfetchd/pop3.h"
#include "popfetchd/tls.h"
#include "popfetchd/util.h"

enum pop3_state {
	P3_INIT,
	P3_CONNECT,
	P3_GREETING,
	P3_CAPA,
	P3_STLS,
	P3_HANDSHAKE,
	P3_USER,
	P3_PASS,
	P3_AUTH,
	P3_APOP,
	P3_UTF8,
	P3_HOLD,
	P3_IDLE,
	P3_UIDL,
	P3_LIST,
	P3_STAT,
	P3_RETR,
	P3_TOP,
	P3_DELE,
	P3_QUIT,
	P3_DONE,
};

static const char *const state_names[] = {
	[P3_INIT] = "INIT", [P3_CONNECT] = "CONNECT", [P3_GREETING] = "GREETING",
	[P3_CAPA] = "CAPA", [P3_STLS] = "STLS",	      [P3_HANDSHAKE] = "HANDSHAKE",
	[P3_USER] = "USER", [P3_PASS] = "PASS",	      [P3_AUTH] = "AUTH",
	[P3_APOP] = "APOP", [P3_UTF8] = "UTF8",	      [P3_HOLD] = "HOLD",
	[P3_IDLE] = "IDLE", [P3_UIDL] = "UIDL",	      [P3_LIST] = "LIST",
	[P3_STAT] = "STAT", [P3_RETR] = "RETR",	      [P3_TOP] = "TOP",
	[P3_DELE] = "DELE", [P3_QUIT] = "QUIT",	      [P3_DONE] = "DONE",
};

/* Bounds on what a server may make a session do (a stall needs only 1 KiB
 * per command timeout, so these end what would otherwise never end): a
 * server lists its capabilities in a few dozen lines, and a SASL mechanism
 * needs at most three challenges. */
#define CAPA_MAX_LINES 256
#define AUTH_MAX_STEPS 16

/* Most commands in flight at once when the server offers PIPELINING
 * (RFC 2449 §6.6): RETR, TOP and DELE (QUIT always goes alone). */
#define PIPE_MAX 32

/* A command the owner queued. */
struct cmd {
	enum pop3_state state; /* P3_UIDL (listing), P3_STAT, P3_RETR, P3_TOP, P3_DELE, P3_QUIT */
	unsigned long num;
};

/* Most addresses of a host tried: a DNS answer decides how many sockets a
 * session opens. */
#define ADDR_MAX 16

/* A TCP connection being opened to one address of the host. */
struct attempt {
	struct pop3_session *s;
	evutil_socket_t fd; /* -1: not (or no longer) being opened */
	struct event *ev;
	char addr[INET6_ADDRSTRLEN + 8]; /* "192.0.2.7", "[2001:db8::7]" */
};

struct pop3_session {
	struct event_base *base;
	struct evdns_base *dns;
	struct pop3_params p;
	const struct pop3_events *ev;
	void *arg;

	struct bufferevent *bev;
	SSL *ssl;	 /* once TLS is on; owned by its bufferevent */
	bool tls_active; /* capabilities and everything after come through TLS */
	struct evdns_getaddrinfo_request *dns_req;
	struct evutil_addrinfo *addrs;
	const struct evutil_addrinfo *order[ADDR_MAX]; /* in the order tried */
	struct attempt att[ADDR_MAX];		       /* att[i] for order[i] */
	size_t naddrs, next_addr;
	struct event *attempt_timer;	      /* starts the next attempt */
	char addr_text[INET6_ADDRSTRLEN + 8]; /* the address connected to, or last tried */
	char connect_errors[512];
	struct event *cmd_timer;
	struct event *conn_timer;
	enum pop3_state state;
	bool multiline;	  /* inside the multi-line body of the current response */
	bool dead;	  /* failed() or quit() was called */
	bool held;	  /* pop3_hold: nothing is read or handed on */
	bool unsolicited; /* bytes were waiting when a command was due: it was not sent */
	unsigned err_rcodes, err_login_delay; /* of the response that fails */
	struct pop3_capa capa;
	const char *mechanism;
	char apop_ts[256];	       /* the greeting's <timestamp>, "" when none */
	char greeting[128];	       /* the greeting's text, printable, "" before it */
	struct auth *auth;	       /* the SASL exchange in progress */
	bool auth_cancelled;	       /* we sent "*": the server did not prove itself */
	unsigned auth_steps;	       /* challenges answered in this exchange */
	unsigned capa_lines;	       /* lines of the CAPA listing so far */
	char *auth_pending;	       /* a first response that did not fit on the AUTH line */
	char *cb_unique, *cb_exporter; /* channel bindings, base64, once TLS is on */

	struct cmd *queue; /* queued by the owner, not sent yet */
	size_t qhead, qlen, qcap;
	struct cmd inflight[PIPE_MAX]; /* sent, answered in this order */
	size_t ihead, ilen;
	unsigned long cur_num; /* of the response being read */

	struct pop3_data data; /* of the RETR (or TOP) being answered */
	char first_line[96];   /* printable: how that data began, when it was dropped */
	size_t rx_window;      /* bytes received since the command timer was armed */

	struct pop3_listing listing;
	bool have_uidl;

	char scratch[64 * 1024];
};

static void enter_state(struct pop3_session *s, enum pop3_state st);
static void cancel_attempts(struct pop3_session *s);
static void pump(struct pop3_session *s);
static void end_response(struct pop3_session *s);
static void set_read_size(struct bufferevent *bev);

static const char *
pop3_failure_name(enum pop3_failure fail)
{
	switch (fail) {
	case POP3_FAIL_RESOLVE:
		return "name resolution failed";
	case POP3_FAIL_CONNECT:
		return "connection failed";
	case POP3_FAIL_LOST:
		return "connection lost";
	case POP3_FAIL_TIMEOUT:
		return "timeout";
	case POP3_FAIL_TEMP:
		return "temporary server condition";
	case POP3_FAIL_PROTOCOL:
		return "protocol error";
	case POP3_FAIL_TLS:
		return "TLS failure";
	case POP3_FAIL_AUTH:
		return "authentication failed";
	}
	return "failure";
}

static void
set_state(struct pop3_session *s, enum pop3_state st)
{
	if (s->state != st)
		log_debug(s->p.id, "pop3: %s -> %s", state_names[s->state], state_names[st]);
	s->state = st;
}

/* Tell an owner that wants to know; false when the session ended meanwhile. */
static bool
progress(struct pop3_session *s, enum pop3_progress step)
{
	struct pop3_progress_info info = {
		.address = s->addr_text,
		.ssl = s->tls_active ? s->ssl : NULL,
		.greeting = s->greeting,
	};

	if (s->ev->progress != NULL)
		s->ev->progress(s->arg, step, &info);
	return !s->dead;
}

/* How a session ends: the owner hears of all but its own abort. */
enum ending {
	END_ABORTED,	 /* pop3_abort(), pop3_session_free_deferred() */
	END_QUIT_OK,	 /* +OK to QUIT: the server committed the deletions */
	END_QUIT_NOT_OK, /* -ERR to QUIT, or the connection closed after it */
	END_FAILED,
};

/*
 * The one end of a session: nothing more is read or sent (the bufferevent
 * is disabled; it is freed with the session, so that its TLS connection
 * can still be described), no connection attempt or timer is left, and
 * then the owner hears of it, once.
 */
static void
finish(struct pop3_session *s, enum ending how, const struct pop3_error *err)
{
	if (s->dead)
		return;
	s->dead = true;
	if (s->bev != NULL)
		bufferevent_disable(s->bev, EV_READ | EV_WRITE);
	cancel_attempts(s);
	evtimer_del(s->cmd_timer);
	evtimer_del(s->conn_timer);
	set_state(s, P3_DONE);
	switch (how) {
	case END_ABORTED:
		break;
	case END_QUIT_OK:
	case END_QUIT_NOT_OK:
		s->ev->quit(s->arg, how == END_QUIT_OK);
		break;
	case END_FAILED:
		s->ev->failed(s->arg, err);
		break;
	}
}

static void fail(struct pop3_session *s, enum pop3_failure fail, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void
fail(struct pop3_session *s, enum pop3_failure failure, const char *fmt, ...)
{
	char detail[1024];
	va_list ap;

	if (s->dead)
		return;
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	log_debug(s->p.id, "pop3: failed in %s: %s: %s", state_names[s->state],
		  pop3_failure_name(failure), detail);
	struct pop3_error e = {.fail = failure,
			       .rcodes = s->err_rcodes,
			       .login_delay = s->err_login_delay ? s->err_login_delay
								 : s->capa.login_delay,
			       .token_rejected = s->auth != NULL && auth_token_rejected(s->auth),
			       .detail = detail,
			       .ssl = s->ssl};
	finish(s, END_FAILED, &e);
}

static void
arm_timer(struct pop3_session *s)
{
	struct timeval tv = {.tv_sec = (time_t)s->p.command_timeout};

	s->rx_window = 0;
	evtimer_add(s->cmd_timer, &tv);
}

/*
 * A command as its debug line shows it: never a secret, not even at debug
 * (the user name is no secret). The password of PASS, the digest of APOP,
 * the initial response on an AUTH line and every line of the SASL exchange
 * after it (but its cancelling "*") are replaced.
 */
static void
shown_command(const struct pop3_session *s, const char *line, char *buf, size_t size)
{
	const char *sp;

	switch (s->state) {
	case P3_PASS:
		snprintf(buf, size, "PASS ****");
		break;
	case P3_APOP:
		sp = strrchr(line, ' ');
		snprintf(buf, size, "%.*s <digest>", (int)(sp ? sp - line : 4), line);
		break;
	case P3_AUTH:
		if (strncmp(line, "AUTH ", 5) == 0) {
			size_t verb = strcspn(line + 5, " ") + 5;
			snprintf(buf, size, "%.*s%s", (int)verb, line,
				 line[verb] != '\0' ? " <initial response>" : "");
		} else if (strcmp(line, "*") == 0) {
			snprintf(buf, size, "*");
		} else {
			snprintf(buf, size, "<SASL response, %zu bytes>", strlen(line));
		}
		break;
	default:
		snprintf(buf, size, "%s", line);
		break;
	}
}

/* Queue one command line (the CRLF added) and show it in a debug line,
 * note after it. */
static void
put_line(struct pop3_session *s, const char *line, const char *note)
{
	struct evbuffer *out = bufferevent_get_output(s->bev);
	char shown[512];

	shown_command(s, line, shown, sizeof(shown));
	log_debug(s->p.id, "C: %s%s", shown, note);
	evbuffer_add(out, line, strlen(line));
	evbuffer_add(out, "\r\n", 2);
}

static void send_line(struct pop3_session *s, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/*
 * Send a command when none is in flight. Every byte of the responses before
 * it was read, so bytes still waiting now came before the server heard this
 * command: they answer nothing; taken for its answer, they would shift every
 * later response by one (a RETR's status line saved as message data). The
 * command is not sent, and on_read() ends the session. (A command pipelined
 * behind others goes out with pipe_line.) The line may hold a secret: it is
 * wiped once it is queued.
 */
static void
send_line(struct pop3_session *s, const char *fmt, ...)
{
	char *line;
	va_list ap;
	int n;

	if (evbuffer_get_length(bufferevent_get_input(s->bev)) > 0) {
		s->unsolicited = true;
		bufferevent_trigger(s->bev, EV_READ,
				    BEV_TRIG_IGNORE_WATERMARKS | BEV_TRIG_DEFER_CALLBACKS);
		arm_timer(s);
		return;
	}
	va_start(ap, fmt);
	n = vasprintf(&line, fmt, ap);
	va_end(ap);
	if (n < 0)
		abort();
	put_line(s, line, "");
	explicit_bzero(line, (size_t)n);
	free(line);
	arm_timer(s);
}

/* -ERR to a login command: a temporary condition, or refused credentials. */
static void
fail_login(struct pop3_session *s, const char *cmd, const struct pop3_reply *r)
{
	char text[256];

	util_printable(r->text, r->text_len, text, sizeof(text));
	s->err_rcodes = r->rcodes;
	s->err_login_delay = r->login_delay;
	if (r->rcodes & (POP3_RC_IN_USE | POP3_RC_LOGIN_DELAY | POP3_RC_SYS_TEMP)) {
		fail(s, POP3_FAIL_TEMP, "%s refused for now (server said: %s)", cmd, text);
		return;
	}
	if (s->state == P3_AUTH && s->auth != NULL)
		auth_refused(s->auth);
	fail(s, POP3_FAIL_AUTH, "%s refused (server said: %s)", cmd, text);
}

/* The SASL list of CAPA names the mechanism (as a whole word). */
static bool
sasl_listed(const struct pop3_session *s, const char *mech)
{
	size_t n = strlen(mech);

	for (const char *p = s->capa.sasl; (p = strcasestr(p, mech)) != NULL; p += n)
		if ((p == s->capa.sasl || p[-1] == ' ') && (p[n] == '\0' || p[n] == ' '))
			return true;
	return false;
}

static bool
offered(const struct pop3_session *s, const char *mech)
{
	if (!auth_supported(mech))
		return false;
	if (strcmp(mech, "USER") == 0)
		return s->capa.user || !s->capa.seen;
	if (strcmp(mech, "APOP") == 0)
		return s->apop_ts[0] != '\0';
	if (auth_needs_binding(mech) && s->cb_unique == NULL && s->cb_exporter == NULL)
		return false; /* channel binding needs TLS */
	if ((strcmp(mech, "XOAUTH2") == 0 || strcmp(mech, "OAUTHBEARER") == 0) &&
	    s->capa.sasl[0] == '\0')
		return true; /* some servers do not list it: try */
	return sasl_listed(s, mech);
}

static void
start_login(struct pop3_session *s)
{
	char allowed[256] = "", offers[320];

	for (const char *const *m = s->p.mechanisms; *m != NULL; m++) {
		if (offered(s, *m)) {
			s->mechanism = *m;
			log_debug(s->p.id, "pop3: logging in with %s", *m);
			if (strcmp(*m, "USER") == 0)
				enter_state(s, P3_USER);
			else if (strcmp(*m, "APOP") == 0)
				enter_state(s, P3_APOP);
			else
				enter_state(s, P3_AUTH);
			return;
		}
		if (allowed[0] != '\0')
			strncat(allowed, " ", sizeof(allowed) - strlen(allowed) - 1);
		strncat(allowed, *m, sizeof(allowed) - strlen(allowed) - 1);
	}
	offers[0] = '\0';
	if (s->capa.sasl[0])
		snprintf(offers, sizeof(offers), "SASL %s", s->capa.sasl);
	if (s->capa.user || !s->capa.seen)
		strncat(offers, offers[0] ? ", USER" : "USER", sizeof(offers) - strlen(offers) - 1);
	if (s->apop_ts[0])
		strncat(offers, offers[0] ? ", APOP" : "APOP", sizeof(offers) - strlen(offers) - 1);
	fail(s, POP3_FAIL_AUTH,
	     "no usable login mechanism: the server offers %s; the configuration allows %s",
	     offers[0] ? offers : "nothing", allowed);
}

/* AUTH MECH [initial response] (RFC 5034). XOAUTH2 and OAUTHBEARER wait
 * for the "+" (Microsoft 365 refuses the message on the AUTH line). */
static void
send_auth(struct pop3_session *s)
{
	struct auth_params ap = {.user = s->p.user,
				 .password = s->p.password,
				 .token = s->p.token,
				 .cb_tls_unique = s->cb_unique,
				 .cb_tls_exporter = s->cb_exporter,
				 .scram_cache = s->p.scram_cache};
	const char *mech = s->mechanism;
	char err[256], *ir = NULL;
	bool oauth = strcmp(mech, "XOAUTH2") == 0 || strcmp(mech, "OAUTHBEARER") == 0;

	s->auth_steps = 0;
	if (auth_start(mech, &ap, &s->auth, err, sizeof(err)) < 0) {
		fail(s, POP3_FAIL_AUTH, "%s", err);
		return;
	}
	if (auth_client_first(mech) && auth_step(s->auth, NULL, &ir) < 0) {
		fail(s, POP3_FAIL_AUTH, "%s: cannot build the first message", mech);
		return;
	}
	/* RFC 5034 §4: an AUTH line with its initial response stays within 255 octets */
	if (ir != NULL && !oauth && strlen(mech) + strlen(ir) + 8 <= 255) {
		send_line(s, "AUTH %s %s", mech, ir[0] ? ir : "=");
		explicit_bzero(ir, strlen(ir));
		free(ir);
		return;
	}
	s->auth_pending = ir;
	send_line(s, "AUTH %s", mech);
}

/* "+ challenge" during AUTH. */
static void
on_auth_challenge(struct pop3_session *s, const struct pop3_reply *r)
{
	char challenge[POP3_LINE_MAX + 1], *resp = NULL;

	if (s->auth_cancelled || ++s->auth_steps > AUTH_MAX_STEPS) {
		fail(s, POP3_FAIL_PROTOCOL, "%s: the server's exchange goes on %s", s->mechanism,
		     s->auth_cancelled ? "after it was cancelled" : "and on: login abandoned");
		return;
	}
	if (s->auth_pending != NULL) {
		send_line(s, "%s", s->auth_pending);
		explicit_bzero(s->auth_pending, strlen(s->auth_pending));
		free(s->auth_pending);
		s->auth_pending = NULL;
		return;
	}
	snprintf(challenge, sizeof(challenge), "%.*s", (int)r->text_len, r->text);
	if (auth_step(s->auth, challenge, &resp) < 0) {
		/* cancel (RFC 5034), and fail on the server's -ERR to it */
		send_line(s, "*");
		if (auth_error(s->auth) != NULL) {
			fail(s, POP3_FAIL_AUTH, "%s: %s", s->mechanism, auth_error(s->auth));
			return;
		}
		s->auth_cancelled = true;
		return;
	}
	send_line(s, "%s", resp);
	explicit_bzero(resp, strlen(resp));
	free(resp);
}

/*
 * +OK to AUTH counts only once the exchange is over on our side: for SCRAM,
 * the server-final message (in a "+" continuation, or as the +OK's
 * additional data, RFC 5034) verified. Otherwise the session ends and
 * nothing more is sent.
 */
static bool
auth_accepted(struct pop3_session *s, const struct pop3_reply *r)
{
	char data[POP3_LINE_MAX + 1], err[160];

	snprintf(data, sizeof(data), "%.*s", (int)r->text_len, r->text);
	if (auth_finish(s->auth, data, err, sizeof(err)) == 0) {
		if (auth_salted_from_cache(s->auth))
			log_debug(s->p.id, "pop3: %s with the salted password of an earlier login",
				  s->mechanism);
		return true;
	}
	fail(s, POP3_FAIL_AUTH,
	     "%s: %s (a wrong server, or someone in between): login not accepted", s->mechanism,
	     err);
	return false;
}

/* "RETR 7", "TOP 7 0", "DELE 7": a command about one message, into buf. */
static const char *
message_command(enum pop3_state st, unsigned long num, char *buf, size_t size)
{
	snprintf(buf, size, st == P3_TOP ? "%s %lu 0" : "%s %lu", state_names[st], num);
	return buf;
}

/* Enter a state: send its command (a state is named after its command). */
static void
enter_state(struct pop3_session *s, enum pop3_state st)
{
	char line[40];

	set_state(s, st);
	s->multiline = false;
	switch (st) {
	case P3_CAPA:
		pop3_capa_init(&s->capa);
		s->capa_lines = 0;
		send_line(s, "CAPA");
		break;
	case P3_AUTH:
		send_auth(s);
		break;
	case P3_APOP: {
		char digest[33];
		auth_apop_digest(s->apop_ts, s->p.password ? s->p.password : "", digest);
		send_line(s, "APOP %s %s", s->p.user, digest);
		explicit_bzero(digest, sizeof(digest));
		break;
	}
	case P3_USER:
		send_line(s, "USER %s", s->p.user);
		break;
	case P3_PASS:
		send_line(s, "PASS %s", s->p.password ? s->p.password : "");
		break;
	case P3_UIDL:
		pop3_listing_reset(&s->listing);
		s->have_uidl = true;
		send_line(s, "UIDL");
		break;
	case P3_STLS:
	case P3_UTF8:
	case P3_LIST:
	case P3_STAT:
	case P3_QUIT:
		send_line(s, "%s", state_names[st]);
		break;
	case P3_RETR:
	case P3_TOP:
	case P3_DELE:
		send_line(s, "%s", message_command(st, s->cur_num, line, sizeof(line)));
		break;
	case P3_HOLD:
	case P3_IDLE:
		evtimer_del(s->cmd_timer);
		break;
	default:
		break;
	}
}

/* What follows CAPA: the STLS upgrade (explicit TLS, once), or the login
 * (held for the owner when it asked). */
static void
after_capa(struct pop3_session *s)
{
	if (s->p.tls != POP3_TLS_EXPLICIT || s->tls_active) {
		if (!progress(s, POP3_PROGRESS_CAPA))
			return;
		if (s->p.hold_login)
			enter_state(s, P3_HOLD);
		else
			start_login(s);
		return;
	}
	if (!s->capa.stls) {
		fail(s, POP3_FAIL_TLS,
		     "the server does not offer STLS, and tls: explicit never continues in "
		     "clear (use tls: implicit on port 995 if the server has it)");
		return;
	}
	enter_state(s, P3_STLS);
}

static void on_read(struct bufferevent *bev, void *arg);
static void on_event(struct bufferevent *bev, short what, void *arg);

/*
 * +OK to STLS: wrap the connection in TLS. Any byte already received after
 * that +OK was not sent through TLS by the server we are about to verify:
 * it is an injection attempt, and the session ends.
 */
static void
start_tls_upgrade(struct pop3_session *s)
{
	struct evbuffer *in = bufferevent_get_input(s->bev);
	struct timeval tv = {.tv_sec = (time_t)s->p.connect_timeout};
	struct bufferevent *tls;

	if (evbuffer_get_length(in) > 0) {
		fail(s, POP3_FAIL_TLS,
		     "%zu unexpected byte(s) after the +OK to STLS, before the TLS handshake: "
		     "someone is injecting data; nothing more is sent",
		     evbuffer_get_length(in));
		return;
	}
	s->ssl = tls_ssl_new(s->p.tls_ctx, s->p.host);
	tls = bufferevent_openssl_filter_new(s->base, s->bev, s->ssl, BUFFEREVENT_SSL_CONNECTING,
					     BEV_OPT_CLOSE_ON_FREE);
	if (tls == NULL)
		abort();
	bufferevent_openssl_set_allow_dirty_shutdown(tls, 1);
	set_read_size(tls);
	s->bev = tls;
	bufferevent_setcb(s->bev, on_read, NULL, on_event, s);
	bufferevent_enable(s->bev, EV_READ | EV_WRITE);
	evtimer_del(s->cmd_timer);
	evtimer_add(s->conn_timer, &tv);
	set_state(s, P3_HANDSHAKE);
}

/* The handshake is done: check the certificate before a byte goes out. */
static bool
tls_established(struct pop3_session *s)
{
	char err[1536], how[128];

	if (tls_check_peer(s->p.tls_ctx, s->ssl, s->p.host, err, sizeof(err)) < 0) {
		fail(s, POP3_FAIL_TLS, "%s", err);
		return false;
	}
	s->tls_active = true;
	tls_channel_binding(s->ssl, &s->cb_unique, &s->cb_exporter);
	tls_describe(s->ssl, how, sizeof(how));
	log_debug(s->p.id, "pop3: TLS established: %s", how);
	return progress(s, POP3_PROGRESS_TLS);
}

/* Why the handshake failed, in words: the most telling OpenSSL reason. */
static void
fail_handshake(struct pop3_session *s, short what, int err)
{
	unsigned long e, best = 0;
	char why[256];
	/* with tls: explicit the handshake follows the server's +OK to STLS */
	bool after_stls = s->p.tls == POP3_TLS_EXPLICIT;

	while ((e = bufferevent_get_openssl_error(s->bev)) != 0)
		if (ERR_GET_LIB(e) != 0 && (best == 0 || ERR_GET_REASON(e) != 0))
			best = e;
	if (best != 0) {
		const char *reason = ERR_reason_error_string(best);
		snprintf(why, sizeof(why), "%s", reason ? reason : "TLS error");
		if (ERR_GET_REASON(best) == SSL_R_WRONG_VERSION_NUMBER)
			strncat(why,
				after_stls ? " (the server said +OK to STLS but did not start TLS: "
					     "it answered in clear, a TLS problem on its side)"
					   : " (is this a TLS port? plain POP3 there needs tls: "
					     "explicit or none)",
				sizeof(why) - strlen(why) - 1);
	} else if ((what & BEV_EVENT_EOF) || err == EPIPE || err == ECONNRESET) {
		snprintf(why, sizeof(why), "the server closed the connection");
	} else if (what & BEV_EVENT_ERROR && err != 0) {
		snprintf(why, sizeof(why), "%s", evutil_socket_error_to_string(err));
	} else {
		snprintf(why, sizeof(why), "%s",
			 after_stls ? "no TLS handshake from the server after its +OK to STLS"
				    : "no TLS handshake from the server (a plain POP3 port? "
				      "there use tls: explicit)");
	}
	fail(s, POP3_FAIL_TLS, "TLS handshake with %s failed: %s", s->addr_text, why);
}

static void
logged_in(struct pop3_session *s)
{
	enter_state(s, P3_IDLE);
	s->ev->ready(s->arg);
	if (!s->dead)
		pump(s);
}

/* What the owner hears when the response to one of its commands is complete. */
struct answer {
	enum { A_LISTING, A_STAT, A_RETRIEVED, A_AMBIGUOUS, A_DELETED } kind;
	const char *text;    /* A_RETRIEVED: the server's refusal, or NULL; A_AMBIGUOUS: the
			      * first line */
	bool ok;	     /* A_DELETED */
	unsigned long count; /* A_STAT */
	uint64_t size;	     /* A_STAT */
};

/*
 * The response to the oldest command in flight is complete: the owner hears
 * of it, then what it queued (in the callback or before) goes out. The one
 * place that hands an answer to the owner.
 */
static void
answered(struct pop3_session *s, const struct answer *a)
{
	unsigned long num = s->cur_num;

	end_response(s);
	switch (a->kind) {
	case A_LISTING:
		s->ev->listing(s->arg, s->listing.msgs, s->listing.nmsgs, s->have_uidl);
		break;
	case A_STAT:
		s->ev->stat(s->arg, a->count, a->size);
		break;
	case A_RETRIEVED:
		s->ev->retrieved(s->arg, num, a->text);
		break;
	case A_AMBIGUOUS:
		s->ev->ambiguous(s->arg, num, a->text);
		break;
	case A_DELETED:
		s->ev->deleted(s->arg, num, a->ok);
		break;
	}
	if (!s->dead)
		pump(s);
}

/* Both listings are complete: joined, they go to the owner. */
static void
finish_listing(struct pop3_session *s)
{
	pop3_listing_join(&s->listing);
	answered(s, &(struct answer){.kind = A_LISTING});
}

/* One line of a UIDL or LIST listing, into the listing. */
static void
add_listing_line(struct pop3_session *s, const char *line, size_t len)
{
	int rc = s->state == P3_UIDL ? pop3_listing_add_uidl(&s->listing, line, len)
				     : pop3_listing_add_list(&s->listing, line, len);

	if (rc == -ENOMEM) {
		fputs("popfetchd: out of memory\n", stderr);
		abort();
	}
	if (rc == -E2BIG)
		fail(s, POP3_FAIL_PROTOCOL, "%s lists more than %d messages", state_names[s->state],
		     POP3_MAX_MESSAGES);
	else if (rc == -EINVAL && s->state == P3_LIST)
		fail(s, POP3_FAIL_PROTOCOL, "malformed LIST line");
	else if (rc == -EINVAL) /* a malformed UIDL entry: that message gets no UIDL */
		log_debug(s->p.id, "pop3: ignoring malformed UIDL line");
}

static void
on_listing_line(struct pop3_session *s, const char *line, size_t len)
{
	if (pop3_listing_line(&line, &len) == 1) {
		s->multiline = false;
		if (s->state == P3_CAPA)
			after_capa(s);
		else if (s->state == P3_UIDL)
			enter_state(s, P3_LIST);
		else if (s->state == P3_LIST)
			finish_listing(s);
		return;
	}
	switch (s->state) {
	case P3_CAPA:
		if (++s->capa_lines > CAPA_MAX_LINES) {
			fail(s, POP3_FAIL_PROTOCOL, "CAPA lists more than %d lines",
			     CAPA_MAX_LINES);
			return;
		}
		pop3_parse_capa_line(&s->capa, line, len);
		break;
	case P3_UIDL:
	case P3_LIST:
		add_listing_line(s, line, len);
		break;
	default:
		break;
	}
}

/* RFC 1939 §7: a greeting "+OK ... <process-ID.clock@hostname>" offers APOP. */
static void
apop_timestamp(struct pop3_session *s, const struct pop3_reply *r)
{
	const char *end = r->text + r->text_len;
	const char *lt = memchr(r->text, '<', r->text_len), *gt;

	s->apop_ts[0] = '\0';
	if (lt == NULL || (gt = memchr(lt, '>', (size_t)(end - lt))) == NULL)
		return;
	if ((size_t)(gt - lt + 1) >= sizeof(s->apop_ts) ||
	    memchr(lt, '@', (size_t)(gt - lt)) == NULL)
		return;
	for (const char *p = lt; p <= gt; p++)
		if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f)
			return;
	memcpy(s->apop_ts, lt, (size_t)(gt - lt + 1));
	s->apop_ts[gt - lt + 1] = '\0';
}

/*
 * The status line of the response to the current state's command, one
 * handler per state (status_handlers[]). ok: +OK, else -ERR (a "+"
 * continuation or a line of neither kind never reaches them).
 */
typedef void status_fn(struct pop3_session *s, const struct pop3_reply *r, bool ok);

static void
on_greeting(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	char text[256];

	util_printable(r->text, r->text_len, s->greeting, sizeof(s->greeting));
	if (!ok) {
		s->err_rcodes = r->rcodes;
		s->err_login_delay = r->login_delay;
		fail(s, POP3_FAIL_TEMP, "the server refused the session (server said: %s)",
		     util_printable(r->text, r->text_len, text, sizeof(text)));
		return;
	}
	apop_timestamp(s, r);
	enter_state(s, P3_CAPA);
}

/* +OK to a command whose listing (or data) follows. */
static void
begin_multiline(struct pop3_session *s)
{
	s->multiline = true;
	arm_timer(s);
}

static void
on_capa_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	(void)r;
	if (ok)
		begin_multiline(s);
	else
		after_capa(s);
}

static void
on_stls_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	char text[256];

	if (!ok) {
		fail(s, POP3_FAIL_TLS,
		     "the server refused STLS (server said: %s); with tls: explicit "
		     "nothing is sent in clear",
		     util_printable(r->text, r->text_len, text, sizeof(text)));
		return;
	}
	start_tls_upgrade(s);
}

static void
on_user_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	if (!ok) {
		fail_login(s, "USER", r);
		return;
	}
	enter_state(s, P3_PASS);
}

/* The answer to PASS, APOP or AUTH: logged in, or not. */
static void
on_login_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	if (s->state == P3_AUTH && s->auth_cancelled) {
		fail(s, POP3_FAIL_AUTH,
		     "%s: the server's answer does not prove it knows the password (a "
		     "wrong server, or someone in between): login cancelled",
		     s->mechanism);
		return;
	}
	if (!ok) {
		fail_login(s, "login", r);
		return;
	}
	if (s->state == P3_AUTH && !auth_accepted(s, r))
		return;
	if (s->capa.utf8)
		enter_state(s, P3_UTF8);
	else
		logged_in(s);
}

static void
on_utf8_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	(void)r;
	(void)ok; /* refused: the server goes on as before the command (RFC 6856) */
	logged_in(s);
}

static void
on_uidl_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	(void)r;
	if (ok) {
		begin_multiline(s);
		return;
	}
	s->have_uidl = false;
	enter_state(s, P3_LIST);
}

static void
on_list_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	char text[256];

	if (!ok) {
		fail(s, POP3_FAIL_PROTOCOL, "LIST refused (server said: %s)",
		     util_printable(r->text, r->text_len, text, sizeof(text)));
		return;
	}
	begin_multiline(s);
}

static void
on_stat_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	char text[256];
	unsigned long count;
	uint64_t size;

	if (!ok) {
		s->err_rcodes = r->rcodes;
		fail(s,
		     r->rcodes & (POP3_RC_IN_USE | POP3_RC_SYS_TEMP) ? POP3_FAIL_TEMP
								     : POP3_FAIL_PROTOCOL,
		     "STAT refused (server said: %s)",
		     util_printable(r->text, r->text_len, text, sizeof(text)));
		return;
	}
	if (pop3_parse_stat(r->text, r->text_len, &count, &size) < 0) {
		fail(s, POP3_FAIL_PROTOCOL, "malformed answer to STAT: \"%s\"",
		     util_printable(r->text, r->text_len, text, 80));
		return;
	}
	answered(s, &(struct answer){.kind = A_STAT, .count = count, .size = size});
}

/* RETR or TOP: its data follows, or (-ERR) that message only is refused. */
static void
on_retr_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	char text[256];

	if (!ok) {
		answered(s, &(struct answer){.kind = A_RETRIEVED,
					     .text = util_printable(r->text, r->text_len, text,
								    sizeof(text))});
		return;
	}
	pop3_data_init(&s->data, s->capa.pipelining && !s->p.lockstep);
	begin_multiline(s);
}

static void
on_dele_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	(void)r;
	answered(s, &(struct answer){.kind = A_DELETED, .ok = ok});
}

static void
on_quit_status(struct pop3_session *s, const struct pop3_reply *r, bool ok)
{
	(void)r;
	finish(s, ok ? END_QUIT_OK : END_QUIT_NOT_OK, NULL);
}

static status_fn *const status_handlers[] = {
	[P3_GREETING] = on_greeting, [P3_CAPA] = on_capa_status,
	[P3_STLS] = on_stls_status,  [P3_USER] = on_user_status,
	[P3_PASS] = on_login_status, [P3_AUTH] = on_login_status,
	[P3_APOP] = on_login_status, [P3_UTF8] = on_utf8_status,
	[P3_UIDL] = on_uidl_status,  [P3_LIST] = on_list_status,
	[P3_STAT] = on_stat_status,  [P3_RETR] = on_retr_status,
	[P3_TOP] = on_retr_status,   [P3_DELE] = on_dele_status,
	[P3_QUIT] = on_quit_status,  [P3_DONE] = NULL,
};

static void
on_status(struct pop3_session *s, const char *line, size_t len)
{
	struct pop3_reply r;
	char text[256];
	status_fn *handler = status_handlers[s->state];

	pop3_parse_status(line, len, &r);
	log_debug(s->p.id, "S: %s",
		  s->state == P3_PASS || s->state == P3_AUTH
			  ? "(reply to a login step)"
			  : util_printable(r.text, r.text_len, text, sizeof(text)));
	if (r.status == POP3_STATUS_CONT && s->state == P3_AUTH) {
		on_auth_challenge(s, &r);
		return;
	}
	if (r.status == POP3_STATUS_BAD || r.status == POP3_STATUS_CONT) {
		fail(s, POP3_FAIL_PROTOCOL, "unexpected response in %s: \"%s\"",
		     state_names[s->state], util_printable(r.text, r.text_len, text, 80));
		return;
	}
	if (handler == NULL) {
		fail(s, POP3_FAIL_PROTOCOL, "unsolicited response in %s: \"%s\"",
		     state_names[s->state], util_printable(r.text, r.text_len, text, 80));
		return;
	}
	handler(s, &r, r.status == POP3_STATUS_OK);
}

/*
 * The data of a pipelined RETR (or TOP) begins like a status line: the
 * server's responses may be out of step with the commands, or the message
 * may begin so (pop3_parse.h, struct pop3_data). The data is read to its
 * end and dropped, and the owner hears of it (ambiguous()): it asks again
 * one command at a time, where no response can be out of step unseen
 * (send_line). Without an owner that can, the session ends. False then.
 */
static bool
data_ambiguous(struct pop3_session *s)
{
	struct pop3_reply line = {.text = s->data.first_line, .text_len = s->data.first_len};

	util_printable(line.text, line.text_len, s->first_line, sizeof(s->first_line));
	if (s->ev->ambiguous == NULL) {
		fail(s, POP3_FAIL_PROTOCOL,
		     "the data of %s %lu begins with a status line (\"%s\"): the server's "
		     "responses are out of step with the commands",
		     state_names[s->state], s->cur_num, s->first_line);
		return false;
	}
	log_debug(s->p.id, "pop3: the data of %s %lu begins like a status line: dropped",
		  state_names[s->state], s->cur_num);
	return true;
}

/* The first bytes of the input, at least want of them (or all there are)
 * in one piece; false when there are none. */
static bool
input_piece(struct evbuffer *in, size_t want, struct evbuffer_iovec *v)
{
	size_t have = evbuffer_get_length(in);

	if (have == 0)
		return false;
	if (evbuffer_pullup(in, (ev_ssize_t)(have < want ? have : want)) == NULL)
		abort();
	return evbuffer_peek(in, -1, NULL, v, 1) == 1 && v->iov_len > 0;
}

/*
 * The body of a RETR response: what is there goes through the parser (in
 * pieces of at most the scratch buffer) and on to the owner. Returns false
 * when more input is needed.
 */
static bool
read_data(struct pop3_session *s, struct evbuffer *in)
{
	struct evbuffer_iovec v;
	size_t used, outlen;
	enum pop3_data_result r;

	if (!input_piece(in, pop3_data_want(&s->data), &v))
		return false;
	r = pop3_data_feed(&s->data, v.iov_base, v.iov_len, s->scratch, sizeof(s->scratch), &used,
			   &outlen);
	if (r == POP3_DATA_MORE)
		return false;
	if (r == POP3_DATA_AMBIGUOUS)
		return data_ambiguous(s);
	evbuffer_drain(in, used);
	s->rx_window += used;
	if (outlen > 0)
		s->ev->data(s->arg, s->scratch, outlen);
	if (s->dead)
		return false;
	if (r == POP3_DATA_END && s->data.ambiguous)
		answered(s, &(struct answer){.kind = A_AMBIGUOUS, .text = s->first_line});
	else if (r == POP3_DATA_END)
		answered(s, &(struct answer){.kind = A_RETRIEVED});
	return true;
}

/* One line of at most POP3_LINE_MAX octets with its end, into buf
 * (NUL-terminated): 1, or 0 when more input is needed, or -1 (failed). */
static int
read_line(struct pop3_session *s, struct evbuffer *in, char *buf, size_t *len)
{
	struct evbuffer_iovec v;
	size_t used;
	int r;

	if (!input_piece(in, POP3_LINE_MAX, &v))
		return 0;
	r = pop3_frame_line(v.iov_base, v.iov_len, len, &used);
	if (r < 0) {
		fail(s, POP3_FAIL_PROTOCOL, "response line longer than %d octets in %s",
		     POP3_LINE_MAX, state_names[s->state]);
		return -1;
	}
	if (r == 0)
		return 0;
	memcpy(buf, v.iov_base, *len);
	buf[*len] = '\0';
	evbuffer_drain(in, used);
	s->rx_window += used;
	return 1;
}

/*
 * Implicit TLS reads ahead: OpenSSL takes what the socket holds in one
 * read(2), not two per record (its header, then the rest; Dovecot sends 4
 * KiB records). libevent 2.1's bufferevent_openssl, though, takes a record
 * at a time and then waits for the socket to become readable, which it
 * does not while the next records wait in OpenSSL's buffer. So, while they
 * do and the session reads, its read event is made active again: libevent
 * goes on reading from the buffer in the same turn of the loop. (A session
 * upgraded by STLS reads through a filter over a socket bufferevent that
 * already reads in large pieces.)
 */
static void
read_ahead_on(struct pop3_session *s)
{
	if (s->p.tls == POP3_TLS_IMPLICIT && s->ssl != NULL && s->bev != NULL && !s->dead &&
	    !s->held && s->state != P3_HANDSHAKE && SSL_has_pending(s->ssl))
		event_active(&s->bev->ev_read, EV_READ, 1);
}

static void
on_read(struct bufferevent *bev, void *arg)
{
	struct pop3_session *s = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	char line[POP3_LINE_MAX + 1];
	size_t len;

	while (!s->dead && !s->held && bev == s->bev && evbuffer_get_length(in) > 0) {
		if (s->state == P3_HANDSHAKE)
			break;
		if (s->unsolicited) {
			fail(s, POP3_FAIL_PROTOCOL,
			     "%zu byte(s) from the server that answer no command (before %s): "
			     "nothing more is sent",
			     evbuffer_get_length(in), state_names[s->state]);
			break;
		}
		if ((s->state == P3_RETR || s->state == P3_TOP) && s->multiline) {
			if (!read_data(s, in))
				break;
			continue;
		}
		if (read_line(s, in, line, &len) <= 0)
			break;
		if (s->state == P3_IDLE || s->state == P3_HOLD || s->state == P3_CONNECT ||
		    s->state == P3_HANDSHAKE) {
			fail(s, POP3_FAIL_PROTOCOL, "unsolicited data from the server");
			break;
		}
		if (s->multiline)
			on_listing_line(s, line, len);
		else
			on_status(s, line, len);
	}
	read_ahead_on(s);
}

/* libevent reads at most 16 KiB per readiness by default: a message of
 * 16 KiB cost several reads, FIONREADs and loop turns. */
#define READ_SIZE (256 * 1024)

static void
set_read_size(struct bufferevent *bev)
{
	bufferevent_set_max_single_read(bev, READ_SIZE);
}

static void
set_nodelay(struct bufferevent *bev)
{
	int one = 1;
	evutil_socket_t fd = bufferevent_getfd(bev);

	if (fd >= 0)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* One address in turn, RFC 8305 style: an attempt that has neither
 * connected nor failed after ATTEMPT_DELAY_MS does not hold up the next
 * address; the first to connect wins, the others are closed. All of it
 * within timeouts.connect. */
#define ATTEMPT_DELAY_MS 250

/* Note why an address failed, for the message when every one has. */
static void
note_connect_error(struct pop3_session *s, const char *addr, const char *why)
{
	size_t used = strlen(s->connect_errors);

	snprintf(s->connect_errors + used, sizeof(s->connect_errors) - used, "%s%s: %s",
		 used ? "; " : "", addr, why);
}

static void
close_attempt(struct attempt *a)
{
	if (a->ev != NULL)
		event_free(a->ev);
	if (a->fd >= 0)
		evutil_closesocket(a->fd);
	a->ev = NULL;
	a->fd = -1;
}

static void
cancel_attempts(struct pop3_session *s)
{
	for (size_t i = 0; i < s->naddrs; i++)
		close_attempt(&s->att[i]);
	if (s->attempt_timer != NULL)
		evtimer_del(s->attempt_timer);
}

static size_t
attempts_pending(const struct pop3_session *s)
{
	size_t n = 0;

	for (size_t i = 0; i < s->naddrs; i++)
		n += s->att[i].fd >= 0;
	return n;
}

static void start_attempt(struct pop3_session *s);
static void tcp_up(struct pop3_session *s, struct attempt *a);

/* An attempt's socket became writable: connected, or failed. */
static void
on_attempt(evutil_socket_t fd, short what, void *arg)
{
	struct attempt *a = arg;
	struct pop3_session *s = a->s;
	int err = 0;
	socklen_t len = sizeof(err);

	(void)what;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
		err = errno;
	if (err == 0) {
		tcp_up(s, a);
		return;
	}
	log_debug(s->p.id, "pop3: %s: %s", a->addr, evutil_socket_error_to_string(err));
	note_connect_error(s, a->addr, evutil_socket_error_to_string(err));
	close_attempt(a);
	if (s->next_addr < s->naddrs)
		start_attempt(s); /* a failure starts the next one at once */
	else if (attempts_pending(s) == 0)
		fail(s, POP3_FAIL_CONNECT, "cannot connect to %s port %u: %s", s->p.host, s->p.port,
		     s->connect_errors);
}

static void
on_attempt_delay(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	start_attempt(arg);
}

/* Open a connection to the next address (and, when it fails at once, the
 * ones after it); the next one follows after ATTEMPT_DELAY_MS unless this
 * one has ended by then. */
static void
start_attempt(struct pop3_session *s)
{
	while (!s->dead && s->next_addr < s->naddrs) {
		struct attempt *a = &s->att[s->next_addr];
		const struct evutil_addrinfo *ai = s->order[s->next_addr++];
		int err;

		snprintf(s->addr_text, sizeof(s->addr_text), "%s", a->addr);
		log_debug(s->p.id, "pop3: connecting to %s port %u", a->addr, s->p.port);
		a->fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
			       IPPROTO_TCP);
		if (a->fd < 0 ||
		    (connect(a->fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS)) {
			err = errno;
			note_connect_error(s, a->addr, evutil_socket_error_to_string(err));
			close_attempt(a);
			continue;
		}
		a->ev = event_new(s->base, a->fd, EV_WRITE, on_attempt, a);
		if (a->ev == NULL || event_add(a->ev, NULL) < 0)
			abort();
		if (s->next_addr < s->naddrs) {
			struct timeval delay = {0, ATTEMPT_DELAY_MS * 1000};
			evtimer_add(s->attempt_timer, &delay);
		}
		return;
	}
	if (!s->dead && attempts_pending(s) == 0)
		fail(s, POP3_FAIL_CONNECT, "cannot connect to %s port %u: %s", s->p.host, s->p.port,
		     s->connect_errors);
}

/* "192.0.2.7", "[2001:db8::7]" */
static void
format_address(const struct evutil_addrinfo *ai, char *buf, size_t size)
{
	char host[INET6_ADDRSTRLEN];
	const void *a = ai->ai_family == AF_INET6
				? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
				: (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;

	if (evutil_inet_ntop(ai->ai_family, a, host, sizeof(host)) == NULL)
		snprintf(host, sizeof(host), "?");
	snprintf(buf, size, ai->ai_family == AF_INET6 ? "[%s]" : "%s", host);
}

/*
 * The order to try the addresses in (RFC 8305 §4): the resolver's first,
 * then the families alternating, each in the resolver's order. At most
 * ADDR_MAX of them: a DNS answer decides how many sockets a session opens.
 */
static void
order_addresses(struct pop3_session *s)
{
	const struct evutil_addrinfo *fam[2][ADDR_MAX];
	size_t n[2] = {0, 0}, k[2] = {0, 0};
	int first = -1;

	for (const struct evutil_addrinfo *ai = s->addrs; ai != NULL; ai = ai->ai_next) {
		if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
			continue;
		int f = ai->ai_family == AF_INET6;
		if (first < 0)
			first = f;
		if (n[f] < ADDR_MAX)
			fam[f][n[f]++] = ai;
	}
	s->naddrs = 0;
	for (int f = first < 0 ? 0 : first; s->naddrs < ADDR_MAX && (k[0] < n[0] || k[1] < n[1]);
	     f = !f)
		if (k[f] < n[f])
			s->order[s->naddrs++] = fam[f][k[f]++];
	for (size_t i = 0; i < s->naddrs; i++) {
		s->att[i] = (struct attempt){.s = s, .fd = -1};
		format_address(s->order[i], s->att[i].addr, sizeof(s->att[i].addr));
	}
}

static void
on_resolved(int result, struct evutil_addrinfo *res, void *arg)
{
	struct pop3_session *s = arg;

	if (result == EVUTIL_EAI_CANCEL)
		return; /* the session is being freed */
	s->dns_req = NULL;
	if (s->dead) {
		if (res != NULL)
			evutil_freeaddrinfo(res);
		return;
	}
	if (result != 0) {
		fail(s, POP3_FAIL_RESOLVE, "cannot resolve %s: %s", s->p.host,
		     evutil_gai_strerror(result));
		return;
	}
	s->addrs = res;
	order_addresses(s);
	if (s->naddrs == 0) {
		fail(s, POP3_FAIL_RESOLVE, "%s has no IPv4 or IPv6 address", s->p.host);
		return;
	}
	start_attempt(s);
}

/*
 * TCP is up on one address: the others are closed. Without TLS (or for
 * STLS later) the greeting is next; with implicit TLS the handshake, still
 * within timeouts.connect.
 */
static void
tcp_up(struct pop3_session *s, struct attempt *a)
{
	evutil_socket_t fd = a->fd;

	a->fd = -1;
	close_attempt(a);
	cancel_attempts(s);
	snprintf(s->addr_text, sizeof(s->addr_text), "%s", a->addr);
	log_debug(s->p.id, "pop3: connected to %s port %u", s->addr_text, s->p.port);
	if (s->p.tls == POP3_TLS_IMPLICIT) {
		s->ssl = tls_ssl_new(s->p.tls_ctx, s->p.host);
		if (s->ssl != NULL)
			SSL_set_read_ahead(s->ssl, 1); /* see read_ahead_on */
		s->bev = bufferevent_openssl_socket_new(
			s->base, fd, s->ssl, BUFFEREVENT_SSL_CONNECTING, BEV_OPT_CLOSE_ON_FREE);
		if (s->bev != NULL)
			bufferevent_openssl_set_allow_dirty_shutdown(s->bev, 1);
	} else {
		evtimer_del(s->conn_timer);
		s->bev = bufferevent_socket_new(s->base, fd, BEV_OPT_CLOSE_ON_FREE);
	}
	if (s->bev == NULL)
		abort();
	set_read_size(s->bev);
	set_nodelay(s->bev);
	bufferevent_setcb(s->bev, on_read, NULL, on_event, s);
	if (!progress(s, POP3_PROGRESS_CONNECTED))
		return;
	bufferevent_enable(s->bev, EV_READ | EV_WRITE);
	if (s->p.tls == POP3_TLS_IMPLICIT) {
		set_state(s, P3_HANDSHAKE);
		return;
	}
	set_state(s, P3_GREETING);
	arm_timer(s);
}

static void
on_event(struct bufferevent *bev, short what, void *arg)
{
	struct pop3_session *s = arg;
	int err = EVUTIL_SOCKET_ERROR();

	if ((what & BEV_EVENT_CONNECTED) && s->state == P3_HANDSHAKE) {
		evtimer_del(s->conn_timer);
		if (!tls_established(s))
			return;
		if (s->tls_active && s->p.tls == POP3_TLS_EXPLICIT) {
			/* what was learnt in clear is forgotten and asked again */
			enter_state(s, P3_CAPA);
			return;
		}
		set_state(s, P3_GREETING);
		arm_timer(s);
		/* the greeting may have come with the handshake's last flight */
		read_ahead_on(s);
		return;
	}
	if (what & BEV_EVENT_CONNECTED)
		return;
	if (s->state == P3_HANDSHAKE) {
		fail_handshake(s, what, err);
		return;
	}
	/* drain what the server said before it closed */
	on_read(bev, s);
	if (s->dead)
		return;
	if (s->state == P3_QUIT) {
		finish(s, END_QUIT_NOT_OK, NULL);
		return;
	}
	if (what & BEV_EVENT_EOF)
		fail(s, POP3_FAIL_LOST, "the server closed the connection in %s%s",
		     state_names[s->state], s->multiline ? " (in the middle of the response)" : "");
	else
		fail(s, POP3_FAIL_LOST, "connection error in %s: %s", state_names[s->state],
		     evutil_socket_error_to_string(err));
}

/* What the session waits for in its state: for a timeout's message. */
static const char *
waited_for(const struct pop3_session *s, char *buf, size_t size)
{
	const char *name = state_names[s->state];

	switch (s->state) {
	case P3_GREETING:
		snprintf(buf, size, "the server's greeting");
		break;
	case P3_AUTH:
		snprintf(buf, size, "the server's next step of the AUTH %s exchange", s->mechanism);
		break;
	case P3_CAPA:
	case P3_UIDL:
	case P3_LIST:
		snprintf(buf, size,
			 s->multiline ? "the rest of the %s listing" : "the answer to %s", name);
		break;
	case P3_RETR:
	case P3_TOP:
		if (s->multiline)
			snprintf(buf, size, "the data of message %lu (%s %lu)", s->cur_num, name,
				 s->cur_num);
		else
			snprintf(buf, size, "the answer to %s %lu", name, s->cur_num);
		break;
	case P3_DELE:
		snprintf(buf, size, "the answer to DELE %lu", s->cur_num);
		break;
	default:
		snprintf(buf, size, "the answer to %s", name);
		break;
	}
	return buf;
}

static void
on_cmd_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct pop3_session *s = arg;
	size_t got = s->rx_window;
	char what_for[128];

	(void)fd;
	(void)what;
	/* during multi-line data, progress of at least 1 KiB per window is
	 * alive; held, the wait is the owner's, not the server's */
	if ((s->multiline && got >= 1024) || s->held) {
		arm_timer(s);
		return;
	}
	waited_for(s, what_for, sizeof(what_for));
	if (s->multiline)
		fail(s, POP3_FAIL_TIMEOUT,
		     "timed out waiting for %s: %zu bytes in %u s (timeouts.command: less than "
		     "1 KiB in that time is a stall)",
		     what_for, got, s->p.command_timeout);
	else
		fail(s, POP3_FAIL_TIMEOUT,
		     "timed out waiting for %s: nothing within %u s (timeouts.command)", what_for,
		     s->p.command_timeout);
}

/* timeouts.connect: DNS, TCP and the TLS handshake. Once TCP is up, that
 * is a server that stalled (75), not one out of reach (69). */
static void
on_conn_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct pop3_session *s = arg;
	unsigned t = s->p.connect_timeout;

	(void)fd;
	(void)what;
	if (s->state == P3_HANDSHAKE) {
		fail(s, POP3_FAIL_TIMEOUT,
		     "the TLS handshake with %s did not complete within %u s (timeouts.connect)",
		     s->addr_text, t);
		return;
	}
	if (s->dns_req != NULL) {
		fail(s, POP3_FAIL_RESOLVE, "cannot resolve %s within %u s (timeouts.connect)",
		     s->p.host, t);
		return;
	}
	for (size_t i = 0; i < s->naddrs; i++)
		if (s->att[i].fd >= 0)
			note_connect_error(s, s->att[i].addr, "no answer");
	fail(s, POP3_FAIL_CONNECT,
	     "cannot connect to %s port %u: no TCP connection within %u s (timeouts.connect)%s%s",
	     s->p.host, s->p.port, t, s->connect_errors[0] ? ": " : "", s->connect_errors);
}

struct pop3_session *
pop3_session_new(struct event_base *base, struct evdns_base *dns, const struct pop3_params *params,
		 const struct pop3_events *events, void *arg)
{
	struct pop3_session *s = xcalloc(1, sizeof(*s));

	s->base = base;
	s->dns = dns;
	s->p = *params;
	s->ev = events;
	s->arg = arg;
	s->state = P3_INIT;
	s->cmd_timer = evtimer_new(base, on_cmd_timeout, s);
	s->conn_timer = evtimer_new(base, on_conn_timeout, s);
	s->attempt_timer = evtimer_new(base, on_attempt_delay, s);
	if (s->cmd_timer == NULL || s->conn_timer == NULL || s->attempt_timer == NULL)
		abort();
	return s;
}

/* params.open_socket: a socket connected already (tests) stands for TCP. */
static void
connect_injected(struct pop3_session *s)
{
	struct attempt *a = &s->att[0];

	*a = (struct attempt){.s = s, .fd = s->p.open_socket(s->p.open_arg)};
	snprintf(a->addr, sizeof(a->addr), "(test socket)");
	snprintf(s->addr_text, sizeof(s->addr_text), "%s", a->addr);
	if (a->fd < 0 || evutil_make_socket_nonblocking(a->fd) < 0) {
		close_attempt(a);
		fail(s, POP3_FAIL_CONNECT, "cannot connect to %s port %u: no test socket",
		     s->p.host, s->p.port);
		return;
	}
	tcp_up(s, a);
}

void
pop3_session_start(struct pop3_session *s)
{
	struct timeval tv = {.tv_sec = (time_t)s->p.connect_timeout};
	struct evutil_addrinfo hints = {
		.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_protocol = IPPROTO_TCP};
	char port[8];

	set_state(s, P3_CONNECT);
	evtimer_add(s->conn_timer, &tv);
	if (s->p.open_socket != NULL) {
		connect_injected(s);
		return;
	}
	snprintf(port, sizeof(port), "%u", s->p.port);
	log_debug(s->p.id, "pop3: resolving %s", s->p.host);
	/* may answer before returning (an IP literal, /etc/hosts) */
	s->dns_req = evdns_getaddrinfo(s->dns, s->p.host, port, &hints, on_resolved, s);
}

static void
free_now(struct pop3_session *s)
{
	if (s->dns_req != NULL)
		evdns_getaddrinfo_cancel(s->dns_req);
	cancel_attempts(s);
	if (s->addrs != NULL)
		evutil_freeaddrinfo(s->addrs);
	if (s->bev != NULL)
		bufferevent_free(s->bev);
	event_free(s->cmd_timer);
	event_free(s->conn_timer);
	event_free(s->attempt_timer);
	auth_free(s->auth);
	if (s->auth_pending != NULL) {
		explicit_bzero(s->auth_pending, strlen(s->auth_pending));
		free(s->auth_pending);
	}
	free(s->cb_unique);
	free(s->cb_exporter);
	free(s->queue);
	pop3_listing_free(&s->listing);
	free(s);
}

void
pop3_session_free(struct pop3_session *s)
{
	if (s != NULL)
		free_now(s);
}

static void
deferred_free(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	free_now(arg);
}

void
pop3_abort(struct pop3_session *s)
{
	finish(s, END_ABORTED, NULL);
}

void
pop3_hold(struct pop3_session *s)
{
	if (s->dead)
		return; /* nothing more comes anyway */
	s->held = true;
	if (s->bev != NULL)
		bufferevent_disable(s->bev, EV_READ);
}

void
pop3_resume(struct pop3_session *s)
{
	if (!s->held)
		return;
	s->held = false;
	if (s->dead || s->bev == NULL)
		return;
	bufferevent_enable(s->bev, EV_READ);
	/* what came before the hold is handed on from the loop */
	if (evbuffer_get_length(bufferevent_get_input(s->bev)) > 0)
		bufferevent_trigger(s->bev, EV_READ,
				    BEV_TRIG_IGNORE_WATERMARKS | BEV_TRIG_DEFER_CALLBACKS);
	read_ahead_on(s);
}

/* The end of a session: it must not be freed again afterwards. */
void
pop3_session_free_deferred(struct pop3_session *s)
{
	if (s == NULL)
		return;
	pop3_abort(s);
	event_base_once(s->base, -1, EV_TIMEOUT, deferred_free, s, NULL);
}

const struct pop3_capa *
pop3_capa(const struct pop3_session *s)
{
	return &s->capa;
}

const char *
pop3_mechanism(const struct pop3_session *s)
{
	return s->mechanism;
}

time_t
pop3_tls_not_after(const struct pop3_session *s)
{
	return s->tls_active ? tls_peer_not_after(s->ssl) : 0;
}

void
pop3_login(struct pop3_session *s, const char *token)
{
	if (s->dead || s->state != P3_HOLD)
		return;
	if (token != NULL)
		s->p.token = token;
	start_login(s);
}

/* A command of the owner's: queued behind the others, and sent when it can be. */
static void
queue_command(struct pop3_session *s, enum pop3_state st, unsigned long num)
{
	if (s->qhead + s->qlen == s->qcap) {
		if (s->qhead > 0) {
			memmove(s->queue, s->queue + s->qhead, s->qlen * sizeof(*s->queue));
			s->qhead = 0;
		} else {
			s->qcap = s->qcap ? 2 * s->qcap : 16;
			s->queue = xrealloc(s->queue, s->qcap * sizeof(*s->queue));
		}
	}
	s->queue[s->qhead + s->qlen] = (struct cmd){.state = st, .num = num};
	s->qlen++;
	pump(s);
}

/* QUIT is not: it goes out alone, once every response before it was read
 * and nothing else waits (send_line), so that a server whose responses got
 * out of step (an extra line) is caught before it commits deletions. */
static bool
pipelinable(enum pop3_state st)
{
	return st == P3_RETR || st == P3_TOP || st == P3_DELE;
}

/* A command behind others in flight: they were sent, so whatever waits in
 * the input is theirs. */
static void
pipe_line(struct pop3_session *s, const struct cmd *c)
{
	char line[40];

	if (!pipelinable(c->state))
		abort(); /* pump() pipelines nothing else */
	put_line(s, message_command(c->state, c->num, line, sizeof(line)), " (pipelined)");
}

/*
 * Send what the owner queued: one command at a time, or, when the server
 * offers PIPELINING, RETR, TOP and DELE without waiting for the responses
 * before, up to PIPE_MAX in flight. The listing, STAT and QUIT go out alone.
 */
static void
pump(struct pop3_session *s)
{
	while (!s->dead && s->qlen > 0) {
		struct cmd c = s->queue[s->qhead];
		if (s->ilen == 0) {
			if (s->state != P3_IDLE)
				return;
		} else {
			enum pop3_state last =
				s->inflight[(s->ihead + s->ilen - 1) % PIPE_MAX].state;
			if (!s->capa.pipelining || s->p.lockstep || s->unsolicited ||
			    s->ilen == PIPE_MAX || !pipelinable(c.state) || !pipelinable(last))
				return;
		}
		s->qhead++;
		if (--s->qlen == 0)
			s->qhead = 0;
		s->inflight[(s->ihead + s->ilen) % PIPE_MAX] = c;
		if (++s->ilen == 1) {
			s->cur_num = c.num;
			enter_state(s, c.state);
		} else {
			pipe_line(s, &c);
		}
	}
}

/* Read the response to the oldest command in flight. */
static void
begin_response(struct pop3_session *s)
{
	const struct cmd *c = &s->inflight[s->ihead];

	set_state(s, c->state);
	s->multiline = false;
	s->cur_num = c->num;
	arm_timer(s);
}

/* The response to the oldest command in flight is complete: on to the
 * next one's, or idle. */
static void
end_response(struct pop3_session *s)
{
	s->ihead = (s->ihead + 1) % PIPE_MAX;
	if (--s->ilen > 0)
		begin_response(s);
	else
		enter_state(s, P3_IDLE);
}

void
pop3_list(struct pop3_session *s)
{
	queue_command(s, P3_UIDL, 0);
}

void
pop3_retr(struct pop3_session *s, unsigned long num)
{
	queue_command(s, P3_RETR, num);
}

void
pop3_top(struct pop3_session *s, unsigned long num)
{
	queue_command(s, P3_TOP, num);
}

void
pop3_dele(struct pop3_session *s, unsigned long num)
{
	queue_command(s, P3_DELE, num);
}

void
pop3_stat(struct pop3_session *s)
{
	queue_command(s, P3_STAT, 0);
}

void
pop3_quit(struct pop3_session *s)
{
	if (s->state == P3_HOLD) {
		/* not logged in: nothing is queued */
		enter_state(s, P3_QUIT);
		return;
	}
	/* after what is queued already: those DELEs are for durable messages */
	queue_command(s, P3_QUIT, 0);
}
