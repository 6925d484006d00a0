/*
 * floor-client — the least any POP3 client can do for "fetch all, delete":
 * log in, keep a window of RETR and DELE commands in flight (pipelined,
 * whether or not the server offers PIPELINING: Dovecot reads them in order),
 * read the answers in large pieces, QUIT and wait for its +OK (the server
 * expunges before it answers). Nothing is parsed beyond the framing and
 * nothing is made durable: what it takes is the server's own time plus the
 * network's and TLS's, the floor under every tool that tests/bench/peers
 * measures against the same server. In C with OpenSSL, like the fetchers it
 * is compared with (the Python one it replaces was slower than mpop over TLS:
 * it measured Python, not the server).
 *
 * What it received goes into one file (DEST/all.bin: for each message a
 * 10-digit length, a newline and the bytes as they came, dot-stuffed) so that
 * peers can verify it like the others' deliveries, without an inode per
 * message.
 *
 * With a last argument `files` it is the floor of what popfetchd's contract
 * asks of each message instead ("floor-files" in peers): the message
 * dot-unstuffed and parsed by GMime (as popfetchd must, DESIGN §6), then a
 * folder made beside the others (DEST/.stage-N) holding message.eml, the
 * files of DESIGN §3 (text.txt, text.html, attachments/NAME: each part
 * decoded by GMime, in one write) and a short meta.json, renamed to
 * DEST/msg-NNNNNN; a syncfs every 64 messages (commit_batch's default) and
 * one at the end. No charset conversion, no checks of names or limits, no
 * digests, no state file: less than the contract, so no implementation of
 * it that uses GMime can take less than this on the same machine.
 *
 * Usage: floor-client HOST PORT plain|stls|tls CA_FILE USER PASSWORD DEST [files]
 * Build: cc -O2 -o floor-client floor-client.c $(pkg-config --cflags --libs
 *        gmime-3.0) -lssl -lcrypto
 */
#define _GNU_SOURCE /* memmem */
#include <err.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gmime/gmime.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#define WINDOW 64 /* messages asked for ahead of the answers */

struct conn {
	int fd;
	SSL *ssl;
	char *buf; /* unread bytes: buf[0 .. len) */
	char *mem; /* buf lies in mem[0 .. cap) */
	size_t len, cap;
};

static void
fill(struct conn *c)
{
	size_t room = c->cap - (c->buf - c->mem) - c->len;
	ssize_t n;

	if (room < 65536 && c->buf != c->mem) { /* move what is left down */
		memmove(c->mem, c->buf, c->len);
		c->buf = c->mem;
		room = c->cap - c->len;
	}
	if (room < 65536) {
		c->cap = c->cap ? c->cap * 2 : 1 << 20;
		if ((c->mem = c->buf = realloc(c->mem, c->cap)) == NULL)
			err(1, "realloc");
		room = c->cap - c->len;
	}
	if (c->ssl)
		n = SSL_read(c->ssl, c->buf + c->len, room);
	else
		n = read(c->fd, c->buf + c->len, room);
	if (n <= 0)
		errx(1, "the server closed the connection");
	c->len += n;
}

static void
put(struct conn *c, const char *s, size_t n)
{
	if (c->ssl ? SSL_write(c->ssl, s, n) != (int)n : write(c->fd, s, n) != (ssize_t)n)
		errx(1, "write failed");
}

static void
consume(struct conn *c, size_t n)
{
	c->buf += n;
	c->len -= n;
}

/* the first line of the buffer, waiting for it; returns its length + 2 */
static size_t
line(struct conn *c, const char *what)
{
	char *eol;

	while ((eol = memmem(c->buf, c->len, "\r\n", 2)) == NULL)
		fill(c);
	if (c->len < 3 || memcmp(c->buf, "+OK", 3) != 0)
		errx(1, "%s: %.*s", what, (int)(eol - c->buf), c->buf);
	return eol - c->buf + 2;
}

static void
command(struct conn *c, const char *cmd, char *reply, size_t size)
{
	size_t n;

	put(c, cmd, strlen(cmd));
	n = line(c, cmd);
	if (reply)
		snprintf(reply, size, "%.*s", (int)n, c->buf);
	consume(c, n);
}

static void
start_tls(struct conn *c, const char *host, const char *ca)
{
	SSL_CTX *ctx;

	if ((ctx = SSL_CTX_new(TLS_client_method())) == NULL ||
	    SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
		errx(1, "TLS context");
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	c->ssl = SSL_new(ctx);
	SSL_set_fd(c->ssl, c->fd);
	SSL_set_tlsext_host_name(c->ssl, host);
	SSL_set1_host(c->ssl, host);
	if (SSL_connect(c->ssl) != 1) {
		ERR_print_errors_fp(stderr);
		errx(1, "TLS handshake");
	}
}

static int
dial(const char *host, const char *port)
{
	struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *ai;
	int fd, one = 1;

	if (getaddrinfo(host, port, &hints, &ai) != 0)
		errx(1, "%s: no address", host);
	if ((fd = socket(ai->ai_family, SOCK_STREAM, 0)) == -1 ||
	    connect(fd, ai->ai_addr, ai->ai_addrlen) == -1)
		err(1, "connect %s:%s", host, port);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	freeaddrinfo(ai);
	return fd;
}

/* asks for messages next .. last (RETR and DELE of each) in one write */
static int
ask(struct conn *c, int next, int last)
{
	char cmds[WINDOW * 32];
	size_t n = 0;

	for (; next <= last; next++)
		n += snprintf(cmds + n, sizeof(cmds) - n, "RETR %d\r\nDELE %d\r\n", next, next);
	if (n)
		put(c, cmds, n);
	return next;
}

static int files_dir = -1; /* DEST, in the mode `files` */
static int files_n;	   /* messages kept there */

/* in[0 .. n) without the dot-stuffing of RFC 1939 §3; returns its length */
static size_t
unstuff(const char *in, size_t n, char *out)
{
	size_t o = 0;

	for (size_t i = 0; i < n; i++) {
		out[o++] = in[i];
		if (in[i] == '.' && i + 1 < n && in[i + 1] == '.' &&
		    (i == 0 || (i >= 2 && in[i - 1] == '\n' && in[i - 2] == '\r')))
			i++;
	}
	return o;
}

static void
put_file(int dir, const char *name, const char *p, size_t n)
{
	int fd = openat(dir, name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);

	if (fd < 0 || write(fd, p, n) != (ssize_t)n || close(fd) != 0)
		err(1, "%s", name);
}

/* A message's folder being filled: its descriptor, attachments/ once made. */
struct folder {
	int dir, att, natt;
	bool text, html;
};

/* part decoded, into one file of the folder: text.txt or text.html (the
 * first of each that is not an attachment), or attachments/NAME */
static void
put_part(GMimeObject *parent, GMimeObject *part, gpointer arg)
{
	struct folder *f = arg;
	GMimeContentType *ct = g_mime_object_get_content_type(part);
	GMimeDataWrapper *dw;
	GByteArray *bytes;
	GMimeStream *mem;
	const char *fn;
	char name[64];
	bool attached;
	int dir;

	(void)parent;
	if (!GMIME_IS_PART(part) || (dw = g_mime_part_get_content(GMIME_PART(part))) == NULL)
		return;
	attached = g_mime_part_is_attachment(GMIME_PART(part));
	dir = f->dir;
	if (!attached && !f->text && g_mime_content_type_is_type(ct, "text", "plain")) {
		f->text = true;
		snprintf(name, sizeof(name), "text.txt");
	} else if (!attached && !f->html && g_mime_content_type_is_type(ct, "text", "html")) {
		f->html = true;
		snprintf(name, sizeof(name), "text.html");
	} else {
		if (f->att < 0 && (mkdirat(f->dir, "attachments", 0750) != 0 ||
				   (f->att = openat(f->dir, "attachments",
						    O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0))
			err(1, "attachments");
		fn = g_mime_part_get_filename(GMIME_PART(part));
		if (fn != NULL && strlen(fn) < 48 && strchr(fn, '/') == NULL)
			snprintf(name, sizeof(name), "%d-%s", ++f->natt, fn);
		else
			snprintf(name, sizeof(name), "%d-part", ++f->natt);
		dir = f->att;
	}
	bytes = g_byte_array_new();
	mem = g_mime_stream_mem_new_with_byte_array(bytes);
	if (g_mime_data_wrapper_write_to_stream(dw, mem) < 0)
		errx(1, "message %d: cannot decode a part", files_n + 1);
	put_file(dir, name, (const char *)bytes->data, bytes->len);
	g_object_unref(mem); /* and bytes, which it owns */
}

/* the least popfetchd's contract asks of one message (see the top) */
static void
keep(const char *raw, size_t n)
{
	char *msg = malloc(n + 1), stage[32], name[32], meta[256];
	size_t len = unstuff(raw, n, msg);
	GByteArray *bytes = g_byte_array_new_take((guint8 *)msg, len);
	GMimeStream *s = g_mime_stream_mem_new_with_byte_array(bytes);
	GMimeParser *p = g_mime_parser_new_with_stream(s);
	GMimeMessage *m = g_mime_parser_construct_message(p, NULL);
	struct folder f = {.att = -1};
	int k;

	if (m == NULL)
		errx(1, "message %d: cannot parse it", files_n + 1);
	snprintf(stage, sizeof(stage), ".stage-%d", files_n);
	snprintf(name, sizeof(name), "msg-%06d", files_n);
	if (mkdirat(files_dir, stage, 0750) != 0 ||
	    (f.dir = openat(files_dir, stage, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
		err(1, "%s", stage);
	put_file(f.dir, "message.eml", msg, len);
	g_mime_message_foreach(m, put_part, &f);
	k = snprintf(meta, sizeof(meta),
		     "{\"configuration\": \"bench\", \"uidl\": \"%d\", "
		     "\"size\": %zu, \"attachments\": %d}\n",
		     files_n + 1, len, f.natt);
	put_file(f.dir, "meta.json", meta, (size_t)k);
	if ((f.att >= 0 && close(f.att) != 0) || close(f.dir) != 0 ||
	    renameat(files_dir, stage, files_dir, name) != 0)
		err(1, "%s", name);
	if (++files_n % 64 == 0 && syncfs(files_dir) != 0)
		err(1, "syncfs");
	g_object_unref(m);
	g_object_unref(p);
	g_object_unref(s); /* and msg, which it owns */
}

/* one RETR's answer: its body (still dot-stuffed) to out, or kept as the
 * contract asks in the mode `files`; then DELE's +OK */
static void
receive(struct conn *c, FILE *out)
{
	size_t start = 0, body, size;
	char *end;

	consume(c, line(c, "RETR"));
	for (;;) {
		if (c->len >= 3 && memcmp(c->buf, ".\r\n", 3) == 0) {
			size = 0, body = 3;
			break;
		}
		if ((end = memmem(c->buf + start, c->len - start, "\r\n.\r\n", 5))) {
			size = end - c->buf + 2, body = size + 3;
			break;
		}
		start = c->len > 4 ? c->len - 4 : 0;
		fill(c);
	}
	if (files_dir >= 0) {
		keep(c->buf, size);
	} else {
		fprintf(out, "%010zu\n", size);
		fwrite(c->buf, 1, size, out);
	}
	consume(c, body);
	consume(c, line(c, "DELE"));
}

int
main(int argc, char **argv)
{
	struct conn c = {0};
	char cmd[512], reply[512], path[4096];
	int count, next, done;
	FILE *out;

	if (argc != 8 && !(argc == 9 && strcmp(argv[8], "files") == 0))
		errx(2, "usage: floor-client HOST PORT plain|stls|tls CA USER PASS DEST [files]");
	if (argc == 9) {
		g_mime_init();
		if ((files_dir = open(argv[7], O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
			err(1, "%s", argv[7]);
	}
	c.fd = dial(argv[1], argv[2]);
	if (strcmp(argv[3], "tls") == 0)
		start_tls(&c, argv[1], argv[4]);
	consume(&c, line(&c, "greeting"));
	if (strcmp(argv[3], "stls") == 0) {
		command(&c, "STLS\r\n", NULL, 0);
		start_tls(&c, argv[1], argv[4]);
	}
	snprintf(cmd, sizeof(cmd), "USER %s\r\n", argv[5]);
	command(&c, cmd, NULL, 0);
	snprintf(cmd, sizeof(cmd), "PASS %s\r\n", argv[6]);
	command(&c, cmd, NULL, 0);
	command(&c, "STAT\r\n", reply, sizeof(reply));
	count = atoi(reply + 4);
	snprintf(path, sizeof(path), "%s/all.bin", argv[7]);
	if (files_dir >= 0)
		out = NULL;
	else if ((out = fopen(path, "w")) == NULL)
		err(1, "%s", path);
	next = ask(&c, 1, count < WINDOW ? count : WINDOW);
	for (done = 0; done < count; done++) {
		if (next <= count && next - done <= WINDOW / 2)
			next = ask(&c, next, next + WINDOW / 2 > count ? count : next + WINDOW / 2);
		receive(&c, out);
	}
	if (files_dir >= 0 ? syncfs(files_dir) != 0 : fclose(out) != 0)
		err(1, "%s", argv[7]);
	command(&c, "QUIT\r\n", NULL, 0);
	return 0;
}
