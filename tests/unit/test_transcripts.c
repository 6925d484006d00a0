/*
 * Transcript tests: pop3 and fetch against a scripted POP3 server at the
 * other end of a socketpair (pop3_params.open_socket), with a real
 * configuration and a real store in a temporary directory. Each file
 * unit/transcripts/NAME.pop3 is one case; unit/transcripts/README says how
 * one reads. Every case checks, besides what it expects:
 *   - the client sends exactly the C: lines, in order ('*' matches any
 *     text): pipelined commands must all come before the answers after them;
 *   - commit before DELE: when the server reads DELE n, message n's folder
 *     is in save_directory and its key in the state file;
 *   - every folder in save_directory is complete, and the message.eml of
 *     every saved message holds exactly the bytes the server sent for it.
 * A case marked "drops: every" is replayed once more for every S: line k,
 * the server closing the connection instead of sending it: no crash, the
 * rules above, and a failure (unless the cut came after QUIT and nothing
 * was deleted). After the cases (a run without arguments), check_overlap:
 * with seals on a worker, the session reads on while a seal waits.
 * Usage: test_transcripts [FILE.pop3...] (default: every case); with
 * TRANSCRIPT_DEBUG set, the session's debug lines go to stderr.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <jansson.h>
#include <openssl/sha.h>

#include "check.h"
#include "popfetchd/config.h"
#include "popfetchd/fetch.h"
#include "popfetchd/log.h"
#include "popfetchd/mime.h"
#include "popfetchd/pop3.h"
#include "popfetchd/runtime.h"
#include "popfetchd/store.h"
#include "popfetchd/util.h"
#include "popfetchd/worker.h"

#ifndef TRANSCRIPT_DIR
#define TRANSCRIPT_DIR "tests/unit/transcripts"
#endif

#define MAX_POLLS    8
#define MAX_PEERS    16
#define MAX_PENDING  128
#define WATCHDOG_SEC 5

enum step_kind { STEP_S, STEP_C, STEP_DROP, STEP_SESSION, STEP_POLL };

struct step {
	enum step_kind kind;
	char *text;
	int lineno;
};

struct tcase {
	char *path;
	const char *name;
	bool pop3_only; /* run: pop3 */
	bool drops;	/* drops: every */
	char *config;	/* YAML lines of conf.d/box.yaml */
	char *daemon;	/* YAML lines of popfetchd.yaml */
	int exit[MAX_POLLS];
	size_t nexit;
	char *events, *saved, *state; /* NULL: not checked */
	long deleted;		      /* -1: not checked */
	struct step *steps;
	size_t nsteps;
};

/* What the server sent of one message: its UIDL, its data (unstuffed). */
struct sent_msg {
	unsigned session; /* numbers are the session's */
	unsigned long num;
	char *uid;
	char *data;
	size_t len;
};

struct peer;

/* One replay of a case. */
struct run {
	const struct tcase *tc;
	char dir[64], save[96], state_file[128];
	const struct conf_mailbox *mb;
	struct event_base *base;
	struct worker_pool *workers; /* seals and commits on threads; NULL: on the loop */
	struct gate *gate;	     /* check_overlap: the worker held at the first RETR */
	struct event *watchdog;
	unsigned watchdog_fired;
	size_t next_step; /* where the next session's dialogue begins */
	size_t s_count;	  /* S: lines sent so far */
	size_t cut;	  /* the S: line the server closes at instead (SIZE_MAX: none) */
	bool cut_done, quit_read;
	size_t deles_read;
	unsigned sessions;
	struct peer *peers[MAX_PEERS];
	bool finished; /* the owner (fetch, or the pop3 run) is done */
	struct pop3_session *p3;
	char trace[512];
	struct sent_msg *msgs;
	size_t nmsgs;
	int failures;
};

/* The server's end of one session. */
struct peer {
	struct run *run;
	struct bufferevent *bev;
	unsigned session;
	size_t pos, end;	    /* the session's steps */
	char *pending[MAX_PENDING]; /* commands read, not answered yet */
	size_t phead, plen;
	enum { BODY_NONE, BODY_RETR, BODY_UIDL, BODY_OTHER } body;
	unsigned long body_num;
	struct evbuffer *data;
};

static void report(struct run *r, int lineno, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void
report(struct run *r, int lineno, const char *fmt, ...)
{
	va_list ap;

	check_count++;
	check_failures++;
	r->failures++;
	fprintf(stderr, "%s:%d: ", r->tc->path, lineno);
	if (r->cut != SIZE_MAX)
		fprintf(stderr, "(dropped at S: line %zu) ", r->cut + 1);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void
append(char **buf, const char *text)
{
	char *s = xasprintf("%s%s", *buf ? *buf : "", text);

	free(*buf);
	*buf = s;
}

/* ---- reading a case ---------------------------------------------------- */

static char *
slurp(const char *path, size_t *ret_len)
{
	FILE *f = fopen(path, "rb");
	char *buf = NULL;
	size_t len = 0;

	if (f == NULL)
		return NULL;
	FILE *m = open_memstream(&buf, &len);
	char chunk[4096];
	size_t n;
	while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
		fwrite(chunk, 1, n, m);
	fclose(m);
	fclose(f);
	if (ret_len != NULL)
		*ret_len = len;
	return buf;
}

static int
parse_expect(struct tcase *tc, const char *key, const char *value)
{
	if (strcmp(key, "exit") == 0) {
		char *end;
		for (const char *p = value; *p != '\0' && tc->nexit < MAX_POLLS; p = end) {
			tc->exit[tc->nexit++] = (int)strtol(p, &end, 10);
			if (end == p)
				return -1;
			end += strspn(end, " ");
		}
	} else if (strcmp(key, "events") == 0) {
		tc->events = xstrdup(value);
	} else if (strcmp(key, "saved") == 0) {
		tc->saved = xstrdup(value);
	} else if (strcmp(key, "state") == 0) {
		tc->state = xstrdup(value);
	} else if (strcmp(key, "deleted") == 0) {
		tc->deleted = strtol(value, NULL, 10);
	} else {
		return -1;
	}
	return 0;
}

static void
add_step(struct tcase *tc, enum step_kind kind, const char *text, int lineno)
{
	tc->steps = xrealloc(tc->steps, (tc->nsteps + 1) * sizeof(*tc->steps));
	tc->steps[tc->nsteps++] = (struct step){kind, xstrdup(text), lineno};
}

/* One line of the dialogue section. */
static int
parse_dialogue_line(struct tcase *tc, const char *line, int lineno)
{
	if ((line[0] == 'S' || line[0] == 'C') && line[1] == ':') {
		const char *text = line + 2 + (line[2] == ' ');
		add_step(tc, line[0] == 'S' ? STEP_S : STEP_C, text, lineno);
	} else if (strcmp(line, "drop") == 0) {
		add_step(tc, STEP_DROP, "", lineno);
	} else if (strcmp(line, "--- session") == 0) {
		add_step(tc, STEP_SESSION, "", lineno);
	} else if (strcmp(line, "=== poll") == 0) {
		add_step(tc, STEP_POLL, "", lineno);
	} else if (line[0] != '#' && line[0] != '\0') {
		return -1;
	}
	return 0;
}

/* One line of the header: "key: value", or a block's indented line. */
static int
parse_header_line(struct tcase *tc, char *line, char **section)
{
	char *value;

	if (line[0] == '#' || line[0] == '\0')
		return 0;
	if (line[0] == ' ') {
		if (*section == NULL)
			return -1;
		if (strcmp(*section, "expect") != 0) {
			append(strcmp(*section, "config") == 0 ? &tc->config : &tc->daemon,
			       line + 2);
			append(strcmp(*section, "config") == 0 ? &tc->config : &tc->daemon, "\n");
			return 0;
		}
		line += strspn(line, " ");
		if ((value = strchr(line, ':')) == NULL)
			return -1;
		*value++ = '\0';
		return parse_expect(tc, line, value + strspn(value, " "));
	}
	if ((value = strchr(line, ':')) == NULL)
		return -1;
	*value++ = '\0';
	value += strspn(value, " ");
	*section = NULL;
	if (strcmp(line, "run") == 0 && strcmp(value, "pop3") == 0)
		tc->pop3_only = true;
	else if (strcmp(line, "run") == 0 && strcmp(value, "fetch") == 0)
		tc->pop3_only = false;
	else if (strcmp(line, "drops") == 0 && strcmp(value, "every") == 0)
		tc->drops = true;
	else if (strcmp(line, "config") == 0 || strcmp(line, "daemon") == 0 ||
		 strcmp(line, "expect") == 0 || strcmp(line, "dialogue") == 0)
		*section = line;
	else
		return -1;
	return 0;
}

static struct tcase *
tcase_load(const char *path)
{
	struct tcase *tc = xcalloc(1, sizeof(*tc));
	char *text = slurp(path, NULL), *rest = text, *line, *section = NULL;
	bool dialogue = false;
	int lineno = 0, polls = 1;

	tc->path = xstrdup(path);
	tc->name = strrchr(tc->path, '/') ? strrchr(tc->path, '/') + 1 : tc->path;
	tc->deleted = -1;
	if (text == NULL) {
		fprintf(stderr, "%s: %s\n", path, strerror(errno));
		exit(1);
	}
	while ((line = strsep(&rest, "\n")) != NULL) {
		lineno++;
		int r = dialogue ? parse_dialogue_line(tc, line, lineno)
				 : parse_header_line(tc, line, &section);
		if (r < 0) {
			fprintf(stderr, "%s: cannot read this line: %s\n", path, line);
			exit(1);
		}
		dialogue = dialogue || (section != NULL && strcmp(section, "dialogue") == 0);
	}
	free(text);
	for (size_t i = 0; i < tc->nsteps; i++)
		polls += tc->steps[i].kind == STEP_POLL;
	if (tc->nsteps == 0 || (tc->drops && polls > 1)) {
		fprintf(stderr, "%s: no dialogue, or drops with more than one poll\n", path);
		exit(1);
	}
	return tc;
}

static void
tcase_free(struct tcase *tc)
{
	for (size_t i = 0; i < tc->nsteps; i++)
		free(tc->steps[i].text);
	free(tc->steps);
	free(tc->config);
	free(tc->daemon);
	free(tc->events);
	free(tc->saved);
	free(tc->state);
	free(tc->path);
	free(tc);
}

/* ---- what the server sent, and the files on disk ------------------------ */

static struct sent_msg *
msg_for(struct run *r, unsigned session, unsigned long num)
{
	for (size_t i = 0; i < r->nmsgs; i++)
		if (r->msgs[i].session == session && r->msgs[i].num == num)
			return &r->msgs[i];
	r->msgs = xrealloc(r->msgs, (r->nmsgs + 1) * sizeof(*r->msgs));
	r->msgs[r->nmsgs] = (struct sent_msg){.session = session, .num = num};
	return &r->msgs[r->nmsgs++];
}

/* "h" and the SHA-256 of the data: the key of a message without UIDL. */
static void
content_key(const struct sent_msg *m, char out[2 + 2 * SHA256_DIGEST_LENGTH])
{
	unsigned char d[SHA256_DIGEST_LENGTH];

	SHA256((const unsigned char *)m->data, m->len, d);
	out[0] = 'h';
	util_hex(d, sizeof(d), out + 1);
}

/* A message the server sent that the state knows by this key (a UIDL or
 * a content key). */
static const struct sent_msg *
msg_by_key(const struct run *r, const char *key)
{
	char ck[2 + 2 * SHA256_DIGEST_LENGTH];

	for (size_t i = 0; i < r->nmsgs; i++) {
		const struct sent_msg *m = &r->msgs[i];
		if (m->data == NULL)
			continue;
		if (m->uid != NULL && strcmp(m->uid, key) == 0)
			return m;
		if (m->uid == NULL) {
			content_key(m, ck);
			if (strcmp(ck, key) == 0)
				return m;
		}
	}
	return NULL;
}

/* The keys of the state file's records, in order, space-separated. */
static char *
state_keys(const struct run *r)
{
	char *text = slurp(r->state_file, NULL), *rest = text, *line, *keys = xstrdup("");
	bool header = true;

	while (text != NULL && (line = strsep(&rest, "\n")) != NULL) {
		if (header || line[0] == '\0') {
			header = false;
			continue;
		}
		line[strcspn(line, " ")] = '\0';
		append(&keys, keys[0] ? " " : "");
		append(&keys, line);
	}
	free(text);
	return keys;
}

static bool
has_word(const char *words, const char *word)
{
	size_t n = strlen(word);

	for (const char *p = words; (p = strstr(p, word)) != NULL; p += n)
		if ((p == words || p[-1] == ' ') && (p[n] == '\0' || p[n] == ' '))
			return true;
	return false;
}

/* The folder in save_directory of the message with this key, or NULL. */
static char *
folder_of(const struct run *r, const char *key)
{
	char name[80];
	const char *suffix;
	DIR *d = opendir(r->save);
	struct dirent *e;
	char *found = NULL;

	store_folder_name(r->mb->id, key, 0, name, sizeof(name));
	suffix = strchr(name, '-');
	while (d != NULL && found == NULL && (e = readdir(d)) != NULL) {
		size_t n = strlen(e->d_name);
		if (e->d_name[0] != '.' && n > strlen(suffix) &&
		    strcmp(e->d_name + n - strlen(suffix), suffix) == 0)
			found = xasprintf("%s/%s", r->save, e->d_name);
	}
	if (d != NULL)
		closedir(d);
	return found;
}

static bool
exists_in(const char *dir, const char *name)
{
	char *path = xasprintf("%s/%s", dir, name);
	struct stat sb;
	bool ok = lstat(path, &sb) == 0;

	free(path);
	return ok;
}

/* Commit before DELE: the server reads "DELE num" now. */
static void
check_dele(struct run *r, unsigned session, unsigned long num, int lineno)
{
	const struct sent_msg *m = msg_for(r, session, num);
	char key[2 + 2 * SHA256_DIGEST_LENGTH], *keys, *folder;

	r->deles_read++;
	if (m->uid != NULL) {
		snprintf(key, sizeof(key), "%s", m->uid);
	} else if (m->data != NULL) {
		content_key(m, key);
	} else {
		report(r, lineno, "DELE %lu: the server gave it no UIDL and did not send it", num);
		return;
	}
	keys = state_keys(r);
	folder = folder_of(r, key);
	check_count++;
	if (!has_word(keys, key))
		report(r, lineno, "DELE %lu (%s) before its key is in the state file", num, key);
	else if (folder == NULL || !exists_in(folder, "meta.json"))
		report(r, lineno, "DELE %lu (%s) before its folder is in save_directory", num, key);
	free(keys);
	free(folder);
}

/* Every folder in save_directory is complete. */
static void
check_tree(struct run *r)
{
	DIR *d = opendir(r->save);
	struct dirent *e;

	while (d != NULL && (e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		char *folder = xasprintf("%s/%s", r->save, e->d_name);
		check_count++;
		if (!exists_in(folder, "meta.json") ||
		    (r->mb->save_text && !exists_in(folder, "message.eml")))
			report(r, 0, "%s is not complete", folder);
		free(folder);
	}
	if (d != NULL)
		closedir(d);
}

/* message.eml holds the bytes the server sent for the message. */
static void
check_saved_bytes(struct run *r, const char *uid, const char *folder)
{
	const struct sent_msg *m = msg_by_key(r, uid);
	char *path, *bytes;
	size_t len = 0;

	if (folder == NULL || !r->mb->save_text)
		return;
	if (m == NULL) {
		report(r, 0, "saved %s, which the server did not send", uid);
		return;
	}
	path = xasprintf("%s/message.eml", folder);
	bytes = slurp(path, &len);
	check_count++;
	if (bytes == NULL || len != m->len || memcmp(bytes, m->data, len) != 0)
		report(r, 0, "%s: %zu bytes, not the %zu the server sent for message %lu", path,
		       len, m->len, m->num);
	free(bytes);
	free(path);
}

/* ---- a worker held back (check_overlap) ---------------------------------- */

/*
 * At the first RETR the server reads, the one worker thread is given a job
 * that waits for the gate: every seal queues behind it. The gate opens once
 * the client has read its three messages (three seals out behind the
 * gate's job): it read on while the first message's seal could not run.
 * Should it not, the gate opens after GATE_TICKS and the case fails.
 */
#define GATE_TICKS 200 /* of 10 ms */

struct gate {
	pthread_mutex_t lock;
	pthread_cond_t opened;
	bool open, armed, read_on;
	unsigned ticks;
	struct event *tick;
	struct run *run;
};

static void
gate_work(void *arg)
{
	struct gate *g = arg;

	pthread_mutex_lock(&g->lock);
	while (!g->open)
		pthread_cond_wait(&g->opened, &g->lock);
	pthread_mutex_unlock(&g->lock);
}

static void
gate_done(void *arg)
{
	(void)arg;
}

static void
gate_open(struct gate *g)
{
	pthread_mutex_lock(&g->lock);
	g->open = true;
	pthread_cond_signal(&g->opened);
	pthread_mutex_unlock(&g->lock);
}

static void
on_gate_tick(evutil_socket_t fd, short what, void *arg)
{
	struct gate *g = arg;
	struct timeval tv = {0, 10 * 1000};

	(void)fd;
	(void)what;
	if (worker_outstanding(g->run->workers) >= 1 + 3) {
		g->read_on = true;
		gate_open(g);
	} else if (++g->ticks == GATE_TICKS) {
		gate_open(g);
	} else {
		evtimer_add(g->tick, &tv);
	}
}

/* The server reads RETR: at the first, the worker is held. */
static void
gate_arm(struct run *r)
{
	struct gate *g = r->gate;
	struct timeval tv = {0, 10 * 1000};

	if (g == NULL || g->armed)
		return;
	g->armed = true;
	worker_submit(r->workers, gate_work, gate_done, g);
	evtimer_add(g->tick, &tv);
}

/* ---- the server ---------------------------------------------------------- */

/* What the answer to cmd carries after a +OK line. */
static int
body_of(const char *cmd, unsigned long *num)
{
	if (strncmp(cmd, "RETR ", 5) == 0) {
		*num = strtoul(cmd + 5, NULL, 10);
		return BODY_RETR;
	}
	if (strcmp(cmd, "UIDL") == 0)
		return BODY_UIDL;
	if (strcmp(cmd, "CAPA") == 0 || strcmp(cmd, "LIST") == 0 || strncmp(cmd, "TOP ", 4) == 0)
		return BODY_OTHER;
	return BODY_NONE;
}

/* The server sent this line: learn the messages from it. */
static void
model_sent(struct peer *pe, const char *text)
{
	struct run *r = pe->run;
	unsigned long num;
	char uid[128];

	if (pe->body == BODY_NONE) {
		char *cmd = pe->plen > 0 ? pe->pending[pe->phead] : NULL;
		if (cmd != NULL) {
			pe->phead = (pe->phead + 1) % MAX_PENDING;
			pe->plen--;
		}
		if (cmd != NULL && strncmp(text, "+OK", 3) == 0)
			pe->body = body_of(cmd, &pe->body_num);
		free(cmd);
		return;
	}
	if (strcmp(text, ".") == 0) {
		if (pe->body == BODY_RETR) {
			struct sent_msg *m = msg_for(r, pe->session, pe->body_num);
			free(m->data);
			m->len = evbuffer_get_length(pe->data);
			m->data = xcalloc(1, m->len + 1);
			evbuffer_remove(pe->data, m->data, m->len);
		}
		pe->body = BODY_NONE;
		return;
	}
	if (pe->body == BODY_RETR) {
		evbuffer_add_printf(pe->data, "%s\r\n", text[0] == '.' ? text + 1 : text);
	} else if (pe->body == BODY_UIDL && sscanf(text, "%lu %127s", &num, uid) == 2) {
		struct sent_msg *m = msg_for(r, pe->session, num);
		free(m->uid);
		m->uid = xstrdup(uid);
	}
}

/* The server read this command (it matched its C: line). */
static void
model_read(struct peer *pe, char *line, int lineno)
{
	struct run *r = pe->run;

	if (strncmp(line, "DELE ", 5) == 0)
		check_dele(r, pe->session, strtoul(line + 5, NULL, 10), lineno);
	if (strncmp(line, "RETR ", 5) == 0)
		gate_arm(r);
	if (strcmp(line, "QUIT") == 0)
		r->quit_read = true;
	if (pe->plen == MAX_PENDING) {
		report(r, lineno, "more than %d commands unanswered", MAX_PENDING);
		free(line);
		return;
	}
	pe->pending[(pe->phead + pe->plen++) % MAX_PENDING] = line;
}

/* A C: line: '*' stands for any text, "\*" for a star. */
static bool
line_matches(const char *p, const char *s)
{
	for (;; p++, s++) {
		if (*p == '*') {
			for (p++;; s++) {
				if (line_matches(p, s))
					return true;
				if (*s == '\0')
					return false;
			}
		}
		if (p[0] == '\\' && p[1] == '*')
			p++;
		if (*p != *s)
			return false;
		if (*p == '\0')
			return true;
	}
}

static void maybe_stop(struct run *r);

static void
peer_close(struct peer *pe)
{
	struct run *r = pe->run;

	struct evbuffer *out = bufferevent_get_output(pe->bev);

	for (size_t i = 0; i < MAX_PEERS; i++)
		if (r->peers[i] == pe)
			r->peers[i] = NULL;
	/* what the server sent before the close reaches the client first (the
	 * bufferevent's own writes are not done before it is freed) */
	size_t len = evbuffer_get_length(out);
	if (len > 0 && write(bufferevent_getfd(pe->bev), evbuffer_pullup(out, -1), len) < 0)
		report(r, 0, "cannot send the last lines before a drop: %s", strerror(errno));
	bufferevent_free(pe->bev);
	for (size_t i = 0; i < pe->plen; i++)
		free(pe->pending[(pe->phead + i) % MAX_PENDING]);
	evbuffer_free(pe->data);
	free(pe);
	maybe_stop(r);
}

/*
 * About to send an S: line, the server has read every C: line before it: a
 * whole line already waiting is one the client sent before this answer
 * could reach it, where the transcript has it after. A client asking one
 * command at a time is held to that; a pipelining one is written with its
 * commands together before the answers. False (the peer is closed) when
 * the client did not wait.
 */
static bool
client_waited(struct peer *pe, const struct step *st)
{
	struct evbuffer *in = bufferevent_get_input(pe->bev);
	size_t n;
	char *line;

	if (evbuffer_search_eol(in, NULL, &n, EVBUFFER_EOL_CRLF_STRICT).pos < 0)
		return true;
	line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF_STRICT);
	report(pe->run, st->lineno,
	       "the client sent \"%s\" before this answer, where the transcript has it after",
	       line);
	free(line);
	peer_close(pe);
	return false;
}

/*
 * Play the session's dialogue as far as the client's lines go: send the S:
 * lines, check each line the client sent against its C: line. False when
 * the server closed the connection (the peer is gone).
 */
static bool
peer_advance(struct peer *pe)
{
	struct run *r = pe->run;
	struct evbuffer *in = bufferevent_get_input(pe->bev);
	char *line;
	size_t n;

	for (; pe->pos < pe->end; pe->pos++) {
		const struct step *st = &r->tc->steps[pe->pos];
		if (st->kind == STEP_DROP || (st->kind == STEP_S && r->s_count == r->cut)) {
			r->cut_done = r->cut_done || st->kind == STEP_S;
			peer_close(pe);
			return false;
		}
		if (st->kind == STEP_S && !client_waited(pe, st))
			return false;
		if (st->kind == STEP_S) {
			r->s_count++;
			bufferevent_write(pe->bev, st->text, strlen(st->text));
			bufferevent_write(pe->bev, "\r\n", 2);
			model_sent(pe, st->text);
			continue;
		}
		if ((line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF_STRICT)) == NULL)
			return true;
		if (!line_matches(st->text, line)) {
			report(r, st->lineno, "the client sent \"%s\", the transcript says \"%s\"",
			       line, st->text);
			free(line);
			peer_close(pe);
			return false;
		}
		model_read(pe, line, st->lineno);
	}
	if ((line = evbuffer_readln(in, &n, EVBUFFER_EOL_CRLF_STRICT)) != NULL) {
		report(r, r->tc->steps[pe->end - 1].lineno,
		       "the client sent \"%s\" after the end of its session's dialogue", line);
		free(line);
		peer_close(pe);
		return false;
	}
	return true;
}

static void
on_peer_read(struct bufferevent *bev, void *arg)
{
	(void)bev;
	peer_advance(arg);
}

static void
on_peer_event(struct bufferevent *bev, short what, void *arg)
{
	struct peer *pe = arg;
	struct run *r = pe->run;

	(void)bev;
	if (!(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) || !peer_advance(pe))
		return;
	if (pe->pos < pe->end && !r->cut_done)
		report(r, r->tc->steps[pe->pos].lineno,
		       "the client closed the connection here, before its session's dialogue "
		       "ended");
	peer_close(pe);
}

/* pop3_params.open_socket: the next session of the dialogue. */
static int
open_test_socket(void *arg)
{
	struct run *r = arg;
	size_t i = r->next_step, end = i, slot = 0;
	struct peer *pe;
	int sv[2];

	if (r->cut_done)
		return -1;
	if (i >= r->tc->nsteps || r->tc->steps[i].kind == STEP_POLL) {
		report(r, i > 0 ? r->tc->steps[i - 1].lineno : 0,
		       "the client opens a session more than the transcript has here");
		return -1;
	}
	while (end < r->tc->nsteps && r->tc->steps[end].kind != STEP_SESSION &&
	       r->tc->steps[end].kind != STEP_POLL)
		end++;
	r->next_step =
		end < r->tc->nsteps && r->tc->steps[end].kind == STEP_SESSION ? end + 1 : end;
	r->quit_read = false;
	r->deles_read = 0;
	while (slot < MAX_PEERS && r->peers[slot] != NULL)
		slot++;
	if (slot == MAX_PEERS || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	pe = xcalloc(1, sizeof(*pe));
	*pe = (struct peer){
		.run = r, .session = r->sessions++, .pos = i, .end = end, .data = evbuffer_new()};
	pe->bev = bufferevent_socket_new(r->base, sv[0], BEV_OPT_CLOSE_ON_FREE);
	if (pe->bev == NULL || pe->data == NULL)
		abort();
	bufferevent_setcb(pe->bev, on_peer_read, NULL, on_peer_event, pe);
	bufferevent_enable(pe->bev, EV_READ | EV_WRITE);
	r->peers[slot] = pe;
	peer_advance(pe);
	return sv[1];
}

/* ---- one replay ------------------------------------------------------------ */

static void
maybe_stop(struct run *r)
{
	for (size_t i = 0; i < MAX_PEERS; i++)
		if (r->peers[i] != NULL)
			return;
	/* the loop ends once what the sessions left behind has run */
	if (r->finished)
		evtimer_del(r->watchdog);
}

/* Something waits for a line that does not come: close every connection;
 * should the client still not end, give up. */
static void
on_watchdog(evutil_socket_t fd, short what, void *arg)
{
	struct run *r = arg;
	struct timeval tv = {WATCHDOG_SEC, 0};

	(void)fd;
	(void)what;
	if (++r->watchdog_fired > 1) {
		report(r, 0, "the client does not end after its connections were closed");
		exit(1);
	}
	for (size_t i = 0; i < MAX_PEERS; i++) {
		struct peer *pe = r->peers[i];
		if (pe == NULL)
			continue;
		report(r, pe->pos < pe->end ? r->tc->steps[pe->pos].lineno : 0,
		       "nothing happened for %d s: the client does not send this line",
		       WATCHDOG_SEC);
		peer_close(pe);
	}
	evtimer_add(r->watchdog, &tv);
}

static void
loop(struct run *r)
{
	struct timeval tv = {WATCHDOG_SEC, 0};

	evtimer_add(r->watchdog, &tv);
	event_base_dispatch(r->base);
}

static void
trace(struct run *r, const char *fmt, ...)
{
	size_t used = strlen(r->trace);
	va_list ap;

	if (used > 0 && used < sizeof(r->trace) - 1)
		r->trace[used++] = ' ';
	va_start(ap, fmt);
	vsnprintf(r->trace + used, sizeof(r->trace) - used, fmt, ap);
	va_end(ap);
}

static const char *
failure_name(enum pop3_failure fail)
{
	static const char *const names[] = {
		[POP3_FAIL_RESOLVE] = "resolve", [POP3_FAIL_CONNECT] = "connect",
		[POP3_FAIL_LOST] = "lost",	 [POP3_FAIL_TIMEOUT] = "timeout",
		[POP3_FAIL_TEMP] = "temp",	 [POP3_FAIL_PROTOCOL] = "protocol",
		[POP3_FAIL_TLS] = "tls",	 [POP3_FAIL_AUTH] = "auth",
	};
	return names[fail];
}

static void
p3_end(struct run *r)
{
	pop3_session_free_deferred(r->p3);
	r->p3 = NULL;
	r->finished = true;
	maybe_stop(r);
}

static void
p3_ready(void *arg)
{
	struct run *r = arg;

	trace(r, "ready %s", pop3_mechanism(r->p3));
	pop3_quit(r->p3);
}

static void
p3_quit(void *arg, bool ok)
{
	struct run *r = arg;

	trace(r, "quit %s", ok ? "ok" : "unanswered");
	p3_end(r);
}

static void
p3_failed(void *arg, const struct pop3_error *err)
{
	struct run *r = arg;

	trace(r, "failed %s", failure_name(err->fail));
	if (getenv("TRANSCRIPT_DEBUG") != NULL)
		fprintf(stderr, "pop3 failed: %s\n", err->detail);
	p3_end(r);
}

static void
p3_listing(void *arg, const struct pop3_msg *msgs, size_t n, bool have_uidl)
{
	(void)msgs;
	(void)have_uidl;
	trace(arg, "listing %zu", n);
}

static void
p3_data(void *arg, const char *buf, size_t len)
{
	(void)buf;
	(void)len;
	trace(arg, "data");
}

static void
p3_num(void *arg, unsigned long num, const char *error)
{
	(void)error;
	trace(arg, "answer %lu", num);
}

static void
p3_deleted(void *arg, unsigned long num, bool ok)
{
	(void)ok;
	trace(arg, "deleted %lu", num);
}

static void
p3_stat(void *arg, unsigned long count, uint64_t size)
{
	(void)size;
	trace(arg, "stat %lu", count);
}

/* run: pop3 — log in, QUIT; the trace of the owner's callbacks. */
static const struct pop3_events p3_events = {
	.ready = p3_ready,
	.listing = p3_listing,
	.data = p3_data,
	.retrieved = p3_num,
	.deleted = p3_deleted,
	.quit = p3_quit,
	.failed = p3_failed,
	.stat = p3_stat,
};

static void
run_pop3(struct run *r, const struct conf_set *set)
{
	struct runtime rt;
	struct pop3_params pp;
	const char **mechs = runtime_mechanisms(r->mb);
	char why[256];

	if (runtime_init(&rt, set, r->mb, NULL, false, why, sizeof(why)) < 0) {
		report(r, 0, "runtime_init: %s", why);
		free(mechs);
		return;
	}
	fetch_pop3_params(r->mb, rt.tls, mechs, NULL, &pp);
	pp.open_socket = open_test_socket;
	pp.open_arg = r;
	r->p3 = pop3_session_new(r->base, NULL, &pp, &p3_events, r);
	pop3_session_start(r->p3);
	loop(r);
	check_count++;
	if (r->tc->events != NULL && r->cut == SIZE_MAX && strcmp(r->trace, r->tc->events) != 0)
		report(r, 0, "events \"%s\", the transcript expects \"%s\"", r->trace,
		       r->tc->events);
	if (r->cut != SIZE_MAX && strstr(r->trace, "quit ok") != NULL)
		report(r, 0, "a session cut short ended well: %s", r->trace);
	runtime_clear(&rt);
	free(mechs);
}

static void
on_fetch_done(struct fetch *f, void *arg)
{
	struct run *r = arg;

	(void)f;
	r->finished = true;
	maybe_stop(r);
}

/* A poll of a replay cut short: a failure, unless the cut came after the
 * last session's QUIT and that session sent no DELE (then nothing is lost
 * either way). */
static void
check_cut_exit(struct run *r, int exit_code)
{
	check_count++;
	if (!r->quit_read && exit_code == 0)
		report(r, 0, "exit 0 although the server closed the connection before QUIT");
	if (r->quit_read && exit_code != (r->deles_read ? EX_TEMPFAIL : 0))
		report(r, 0, "exit %d after a cut after QUIT, with %zu DELE(s) sent", exit_code,
		       r->deles_read);
}

/* What the last poll left: its result, the state, the folders. */
static void
check_outcome(struct run *r, const struct fetch_result *res)
{
	char *saved = xstrdup(""), *keys = state_keys(r);

	for (size_t i = 0; i < res->nsaved; i++) {
		append(&saved, i ? " " : "");
		append(&saved, res->saved[i].uid);
		check_saved_bytes(r, res->saved[i].uid, res->saved[i].folder);
	}
	check_tree(r);
	if (r->cut == SIZE_MAX) {
		check_count += 3;
		if (r->tc->saved != NULL && strcmp(saved, r->tc->saved) != 0)
			report(r, 0, "saved \"%s\", the transcript expects \"%s\"", saved,
			       r->tc->saved);
		if (r->tc->state != NULL && strcmp(keys, r->tc->state) != 0)
			report(r, 0, "state \"%s\", the transcript expects \"%s\"", keys,
			       r->tc->state);
		if (r->tc->deleted >= 0 && (long)res->deleted != r->tc->deleted)
			report(r, 0, "%zu deleted, the transcript expects %ld", res->deleted,
			       r->tc->deleted);
	}
	free(saved);
	free(keys);
}

/* One poll, from the dialogue at r->next_step; true when it was the last. */
static bool
run_poll(struct run *r, const struct conf_set *set, size_t poll)
{
	struct runtime rt;
	struct fetch_params fp;
	struct fetch *f;
	char why[256];
	int failures = r->failures;
	bool last;

	if (runtime_init(&rt, set, r->mb, NULL, false, why, sizeof(why)) < 0) {
		report(r, 0, "runtime_init: %s", why);
		return true;
	}
	fetch_params_from_runtime(&rt, r->mb->receive == CONF_RECEIVE_ONE ? FETCH_ONE : FETCH_ALL,
				  &fp);
	fp.open_socket = open_test_socket;
	fp.open_arg = r;
	fp.workers = r->workers;
	r->finished = false;
	f = fetch_start(r->base, NULL, &fp, on_fetch_done, r);
	loop(r);
	const struct fetch_result *res = fetch_result(f);
	size_t i = r->next_step;
	/* a replay cut short ends with its poll */
	last = r->cut != SIZE_MAX || i >= r->tc->nsteps;
	check_count++;
	if (r->cut != SIZE_MAX)
		check_cut_exit(r, res->exit_code);
	else if (!last && r->tc->steps[i].kind != STEP_POLL)
		report(r, r->tc->steps[i].lineno, "the poll ended before this session");
	else if (poll < r->tc->nexit && res->exit_code != r->tc->exit[poll])
		report(r, 0, "poll %zu: exit %d, the transcript expects %d", poll + 1,
		       res->exit_code, r->tc->exit[poll]);
	r->next_step = last ? i : i + 1;
	if (last)
		check_outcome(r, res);
	for (size_t k = 0; r->failures > failures && k < res->nerrors; k++)
		fprintf(stderr, "    poll %zu said: %s\n", poll + 1, res->errors[k]);
	fetch_free(f);
	runtime_clear(&rt);
	return last;
}

/* ---- the directory of a replay --------------------------------------------- */

static void
write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

	if (fd < 0 || util_write_all(fd, text, strlen(text)) < 0 || close(fd) < 0)
		abort();
}

/* The case's keys over these: a key the case sets is not repeated. */
static const char *const base_keys[][2] = {
	{"id", "box"},	   {"server", "pop.example"}, {"port", "110"},		{"tls", "none"},
	{"user", "alice"}, {"password", "secret"},    {"save_directory", NULL},
};

static char *
box_yaml(const struct run *r)
{
	const char *mine = r->tc->config ? r->tc->config : "";
	char *yaml = xstrdup(mine);

	for (size_t i = 0; i < sizeof(base_keys) / sizeof(base_keys[0]); i++) {
		char *key = xasprintf("%s:", base_keys[i][0]);
		bool set = strncmp(mine, key, strlen(key)) == 0;
		char *nl = xasprintf("\n%s", key);
		set = set || strstr(mine, nl) != NULL;
		if (!set) {
			char *line = xasprintf("%s %s\n", key,
					       base_keys[i][1] ? base_keys[i][1] : r->save);
			append(&yaml, line);
			free(line);
		}
		free(key);
		free(nl);
	}
	return yaml;
}

/* A fresh directory, its configuration loaded. */
static struct conf_set *
setup(struct run *r)
{
	struct conf_set *set = NULL;
	struct conf_errors errs = {0};
	char *path, *yaml;

	snprintf(r->dir, sizeof(r->dir), "/tmp/pfd-transcript-XXXXXX");
	if (mkdtemp(r->dir) == NULL)
		abort();
	snprintf(r->save, sizeof(r->save), "%s/save", r->dir);
	snprintf(r->state_file, sizeof(r->state_file), "%s/state/box/uidl", r->dir);
	path = xasprintf("%s/conf.d", r->dir);
	if (mkdir(path, 0700) < 0)
		abort();
	free(path);
	path = xasprintf("%s/popfetchd.yaml", r->dir);
	yaml = xasprintf("state_directory: %s/state\n%s", r->dir,
			 r->tc->daemon ? r->tc->daemon : "");
	write_file(path, yaml);
	free(path);
	free(yaml);
	path = xasprintf("%s/conf.d/box.yaml", r->dir);
	yaml = box_yaml(r);
	write_file(path, yaml);
	free(path);
	free(yaml);
	if (conf_load(r->dir, &set, &errs) < 0) {
		for (size_t i = 0; i < errs.n; i++)
			report(r, 0, "configuration: %s", errs.lines[i]);
		conf_errors_clear(&errs);
		return NULL;
	}
	r->mb = conf_find(set, "box");
	return set;
}

static int
remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(path);
}

/* Replay the case; cut: the S: line the server closes at (SIZE_MAX: none);
 * threads: seals and commits on a worker pool of so many, as the daemon
 * does (0: on the loop); gate: its one worker held at the first RETR. */
static int
replay_in(const struct tcase *tc, size_t cut, unsigned threads, struct gate *gate)
{
	struct run r = {.tc = tc, .cut = cut, .gate = gate};
	struct conf_set *set;

	r.base = event_base_new();
	r.watchdog = evtimer_new(r.base, on_watchdog, &r);
	if (r.base == NULL || r.watchdog == NULL ||
	    (threads > 0 && (r.workers = worker_pool_new(r.base, threads)) == NULL))
		abort();
	if (gate != NULL && (gate->tick = evtimer_new(r.base, on_gate_tick, gate)) == NULL)
		abort();
	if (gate != NULL)
		gate->run = &r;
	if ((set = setup(&r)) != NULL) {
		if (tc->pop3_only)
			run_pop3(&r, set);
		else
			for (size_t poll = 0; !run_poll(&r, set, poll); poll++)
				;
	}
	if (gate != NULL) {
		check_count++;
		if (!gate->read_on)
			report(&r, 0,
			       "while the first message's seal waited for a worker, the "
			       "session did not read on to the third message");
		gate_open(gate);
		event_free(gate->tick);
	}
	if (r.failures > 0)
		fprintf(stderr, "    (the files are left in %s)\n", r.dir);
	else
		nftw(r.dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
	for (size_t i = 0; i < r.nmsgs; i++) {
		free(r.msgs[i].uid);
		free(r.msgs[i].data);
	}
	free(r.msgs);
	conf_set_free(set);
	worker_pool_free(r.workers);
	event_free(r.watchdog);
	event_base_free(r.base);
	if (r.failures > 0)
		fprintf(stderr, "    (%s, %s)\n", threads ? "on worker threads" : "on the loop",
			cut == SIZE_MAX ? "whole" : "cut short");
	return r.failures;
}

static int
replay(const struct tcase *tc, size_t cut, bool threaded)
{
	return replay_in(tc, cut, threaded ? WORKER_POOL_SIZE : 0, NULL);
}

/* A session reads on while a message's seal waits (struct gate): the
 * pipelined case, with one worker thread, held at the first RETR. */
static void
check_overlap(void)
{
	char *path = xasprintf("%s/fetch-pipelined.pop3", TRANSCRIPT_DIR);
	struct tcase *tc = tcase_load(path);
	struct gate g = {.lock = PTHREAD_MUTEX_INITIALIZER, .opened = PTHREAD_COND_INITIALIZER};
	int failures = replay_in(tc, SIZE_MAX, 1, &g);

	fprintf(stderr, "reading on while a seal waits (%s): %s\n", tc->name,
		failures ? "FAILED" : "ok");
	tcase_free(tc);
	free(path);
}

static size_t
server_lines(const struct tcase *tc)
{
	size_t n = 0;

	for (size_t i = 0; i < tc->nsteps; i++)
		n += tc->steps[i].kind == STEP_S;
	return n;
}

static void
run_case(const char *path)
{
	struct tcase *tc = tcase_load(path);
	int failures = replay(tc, SIZE_MAX, false) + replay(tc, SIZE_MAX, true);
	/* cut short, a case that fails whole would say the same many times */
	size_t cuts = tc->drops && failures == 0 ? server_lines(tc) : 0;

	for (size_t k = 0; k < cuts; k++)
		failures += replay(tc, k, false) + replay(tc, k, true);
	fprintf(stderr, "%s: %s", tc->name, failures ? "FAILED" : "ok");
	if (cuts > 0)
		fprintf(stderr, " (and cut at each of its %zu server lines)", cuts);
	fputc('\n', stderr);
	tcase_free(tc);
}

static int
is_case(const struct dirent *e)
{
	size_t n = strlen(e->d_name);

	return n > 5 && strcmp(e->d_name + n - 5, ".pop3") == 0;
}

int
main(int argc, char **argv)
{
	struct dirent **names;
	int n;

	signal(SIGPIPE, SIG_IGN);
	log_set_level(getenv("TRANSCRIPT_DEBUG") ? LOG_LVL_DEBUG : (enum log_level)0);
	mime_init();
	if (argc > 1) {
		for (int i = 1; i < argc; i++)
			run_case(argv[i]);
		CHECK_DONE();
	}
	if ((n = scandir(TRANSCRIPT_DIR, &names, is_case, alphasort)) <= 0) {
		fprintf(stderr, "%s: no *.pop3 cases\n", TRANSCRIPT_DIR);
		return 1;
	}
	for (int i = 0; i < n; i++) {
		char *path = xasprintf("%s/%s", TRANSCRIPT_DIR, names[i]->d_name);
		run_case(path);
		free(path);
		free(names[i]);
	}
	free(names);
	check_overlap();
	CHECK_DONE();
}
