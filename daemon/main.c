/*
 * popfetchd — a POP3 fetch daemon. main.c: the command line, the one-shot
 * commands (check, receive, receive-all) and the process around them.
 */
#include <errno.h>
#include <getopt.h>
#include <malloc.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>
#include <jansson.h>

#include "build-config.h"
#include "popfetchd/config.h"
#include "popfetchd/fetch.h"
#include "popfetchd/import.h"
#include "popfetchd/log.h"
#include "popfetchd/metrics.h"
#include "popfetchd/mime.h"
#include "popfetchd/notify.h"
#include "popfetchd/oneshot.h"
#include "popfetchd/probe.h"
#include "popfetchd/runtime.h"
#include "popfetchd/scheduler.h"
#include "popfetchd/status.h"
#include "popfetchd/util.h"
#include "popfetchd/worker.h"

struct options {
	const char *confdir;
	int verbosity; /* -1 quiet, 0, 1 verbose */
	bool json;
	const char *command;
	const char *id;		/* the first of ids */
	const char *const *ids; /* the words after the command */
	size_t n_ids;
	bool all;	    /* --all */
	const char *output; /* import -o DIR */
};

/*
 * Memory holds passwords, client secrets, tokens and PKCS#12 keys: a crash
 * writes no core file, and the process is not dumpable (nor open to ptrace
 * or /proc/PID/mem by another process of the same user).
 */
static void
no_core_dumps(void)
{
	const struct rlimit none = {.rlim_cur = 0, .rlim_max = 0};

	if (setrlimit(RLIMIT_CORE, &none) < 0)
		log_warning(NULL, "cannot turn core dumps off (RLIMIT_CORE: %s)", strerror(errno));
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		log_warning(NULL, "cannot make the process non-dumpable (PR_SET_DUMPABLE: %s)",
			    strerror(errno));
}

static void
usage(FILE *f)
{
	fputs("usage: popfetchd [-c DIR] [-v|-q] [--json] [run]\n"
	      "       popfetchd [-c DIR] [--json] check\n"
	      "       popfetchd [-c DIR] [--json] test ID\n"
	      "       popfetchd [-c DIR] [-v|-q] [--json] receive ID\n"
	      "       popfetchd [-c DIR] [-v|-q] [--json] receive-all ID...\n"
	      "       popfetchd [-c DIR] [-v|-q] [--json] receive-all --all\n"
	      "       popfetchd [-c DIR] [--json] status [ID]\n"
	      "       popfetchd import mpoprc|fetchmailrc FILE [-o DIR]\n"
	      "       popfetchd --version | --help\n"
	      "\n"
	      "  -c, --config DIR  configuration directory (default " POPFETCHD_CONFDIR ")\n"
	      "  -v, --verbose     log debug lines\n"
	      "  -q, --quiet       log warnings and errors only\n"
	      "      --json        print one JSON object on stdout\n"
	      "      --all         receive-all: every active configuration\n"
	      "  -o, --output DIR  import: write DIR/ID.yaml and DIR/ID.password\n",
	      f);
}

static void
print_json(json_t *o)
{
	char *s = json_dumps(o, JSON_PRESERVE_ORDER | JSON_COMPACT);

	puts(s);
	free(s);
}

/* conf_load, then (sessions) whether max_sessions sessions fit the
 * descriptor limit: one more error when they do not. */
static int
load_set(const char *dir, bool sessions, struct conf_set **ret, struct conf_errors *errs)
{
	char why[600];

	if (conf_load(dir, ret, errs) < 0)
		return -1;
	if (!sessions || runtime_check_fd_limit(*ret, why, sizeof(why)) == 0)
		return 0;
	conf_set_free(*ret);
	*ret = NULL;
	errs->lines = xrealloc(errs->lines, (errs->n + 1) * sizeof(*errs->lines));
	errs->lines[errs->n++] = xstrdup(why);
	return -1;
}

/* Load the configuration (sessions: for as many sessions at once as
 * max_sessions); on errors print them all and return NULL. */
static struct conf_set *
load(const struct options *o, bool sessions, json_t **ret_errors)
{
	struct conf_errors errs = {0};
	struct conf_set *set = NULL;

	if (load_set(o->confdir, sessions, &set, &errs) < 0) {
		json_t *a = json_array();
		for (size_t i = 0; i < errs.n; i++) {
			fprintf(stderr, "%s\n", errs.lines[i]);
			json_array_append_new(a, json_string(errs.lines[i]));
		}
		fprintf(stderr, "popfetchd: %zu configuration error(s) in %s\n", errs.n,
			o->confdir);
		conf_errors_clear(&errs);
		if (ret_errors != NULL)
			*ret_errors = a;
		else
			json_decref(a);
		return NULL;
	}
	conf_errors_clear(&errs);
	runtime_log_level(set, o->verbosity);
	return set;
}

static json_t *
mailbox_json(const struct conf_set *set, const struct conf_mailbox *mb)
{
	json_t *c = json_object();

	json_object_set_new(c, "id", json_string(mb->id));
	json_object_set_new(c, "status", json_string(mb->active ? "active" : "inactive"));
	json_object_set_new(c, "server", json_string(mb->server));
	json_object_set_new(c, "port", json_integer(mb->port));
	json_object_set_new(c, "tls", json_string(conf_tls_name(mb->tls)));
	json_object_set_new(c, "auth", json_string(conf_auth_name(mb->auth)));
	json_object_set_new(c, "save_directory",
			    mb->save_directory ? json_string(mb->save_directory) : json_null());
	json_object_set_new(c, "shard", json_integer(conf_shard_of(mb->id, set->shards)));
	json_object_set_new(c, "in_shard", json_boolean(conf_in_shard(set, mb->id)));
	return c;
}

static int
cmd_check(const struct options *o)
{
	json_t *errors = NULL, *out;
	struct conf_set *set = load(o, true, &errors);

	if (set == NULL) {
		if (o->json) {
			out = json_object();
			json_object_set_new(out, "valid", json_false());
			json_object_set_new(out, "errors", errors);
			json_object_set_new(out, "configurations", json_array());
			print_json(out);
			json_decref(out);
		} else {
			json_decref(errors);
		}
		return EX_CONFIG;
	}
	out = json_object();
	json_t *list = json_array();
	for (size_t i = 0; i < set->n_mailboxes; i++) {
		const struct conf_mailbox *mb = set->mailboxes[i];
		if (o->json)
			json_array_append_new(list, mailbox_json(set, mb));
		else
			printf("%s\t%s\t%s:%u\ttls=%s\tauth=%s\t%s\tshard=%u/%u%s\n", mb->id,
			       mb->active ? "active" : "inactive", mb->server, mb->port,
			       conf_tls_name(mb->tls), conf_auth_name(mb->auth),
			       mb->save_directory ? mb->save_directory : "(nothing saved)",
			       conf_shard_of(mb->id, set->shards), set->shards,
			       conf_in_shard(set, mb->id) ? "" : " (another process's)");
	}
	if (!o->json && set->shards > 1)
		fprintf(stderr,
			"popfetchd: shard: %u/%u: this process serves the configurations "
			"of shard %u\n",
			set->shard, set->shards, set->shard);
	if (o->json) {
		json_object_set_new(out, "valid", json_true());
		json_object_set_new(out, "errors", json_array());
		json_object_set_new(out, "configurations", list);
		print_json(out);
	} else {
		json_decref(list);
		if (set->n_mailboxes == 0)
			fprintf(stderr, "popfetchd: no configurations in %s/conf.d\n", o->confdir);
	}
	json_decref(out);
	conf_set_free(set);
	return 0;
}

/* ---- the daemon ---- */

#define RELOAD_SETTLE 200 /* ms: a burst of SIGHUPs is one reload */

struct daemon {
	const struct options *o;
	struct event_base *base;
	struct scheduler *sched;
	struct metrics *metrics;     /* NULL: no metrics_listen */
	struct worker_pool *workers; /* seals and commits; NULL: on the loop */
	struct worker_pool *writer;  /* status.json, in order; NULL: on the loop */
	size_t inactive;	     /* configurations of the set in force */
	struct event *sig_hup, *sig_term, *sig_int, *reload, *watchdog;
	bool stopping;
	unsigned stop_timeout;	/* of the set in force */
	char reload_error[400]; /* the last reload that was refused, "" when none */
	char status[1024];
};

static void
update_status(void *arg)
{
	struct daemon *d = arg;
	struct sched_stats st;
	char line[1024];
	int n;

	if (d->sched == NULL)
		return;
	scheduler_stats(d->sched, &st);
	metrics_set_sessions(d->metrics, st.running, st.queued);
	metrics_set_configurations(d->metrics, st.configurations - st.broken, d->inactive,
				   st.broken);
	n = snprintf(line, sizeof(line),
		     "%s%zu configuration(s), %zu session(s) running, %zu queued, %llu message(s) "
		     "saved since start, %zu failing, %zu broken",
		     d->stopping ? "stopping: " : "", st.configurations, st.running, st.queued,
		     st.saved, st.failing, st.broken);
	if (st.failing + st.broken > 0 && st.last_error[0] && n > 0 && (size_t)n < sizeof(line))
		n += snprintf(line + n, sizeof(line) - (size_t)n, "; last error: %s",
			      st.last_error);
	if (d->reload_error[0] && n > 0 && (size_t)n < sizeof(line))
		snprintf(line + n, sizeof(line) - (size_t)n,
			 "; reload refused, still running the previous configuration: %s",
			 d->reload_error);
	if (strcmp(line, d->status) != 0) {
		snprintf(d->status, sizeof(d->status), "%s", line);
		notify_status(line);
	}
}

/* The /metrics endpoint as set asks: started, moved to another address, or
 * closed. A failed listen leaves the address served before (if any). */
static void
apply_metrics(struct daemon *d, const struct conf_set *set)
{
	const char *before = metrics_address(d->metrics);
	char why[300];

	d->inactive = 0;
	for (size_t i = 0; i < set->n_mailboxes; i++)
		d->inactive += !set->mailboxes[i]->active;
	if (set->metrics_listen == NULL) {
		if (d->metrics != NULL)
			log_info(NULL, "metrics: metrics_listen is gone: /metrics closed");
		scheduler_set_metrics(d->sched, NULL);
		metrics_free(d->metrics);
		d->metrics = NULL;
		return;
	}
	if (d->metrics == NULL)
		d->metrics = metrics_new(d->base, POPFETCHD_VERSION);
	if (before != NULL && strcmp(before, set->metrics_listen) == 0)
		return;
	if (metrics_listen(d->metrics, set->metrics_listen, why, sizeof(why)) < 0)
		log_error(NULL, "metrics_listen %s (%s/popfetchd.yaml): %s; %s",
			  set->metrics_listen, set->dir, why,
			  before ? "/metrics stays on the previous address"
				 : "no /metrics until a reload listens");
	else
		log_info(NULL, "metrics: http://%s/metrics", set->metrics_listen);
	scheduler_set_metrics(d->sched, d->metrics);
}

static void
do_reload(evutil_socket_t fd, short what, void *arg)
{
	struct daemon *d = arg;
	struct conf_errors errs = {0};
	struct conf_set *set = NULL;

	(void)fd;
	(void)what;
	if (d->stopping)
		return;
	notify_reloading();
	log_info(NULL, "reloading %s", d->o->confdir);
	if (load_set(d->o->confdir, true, &set, &errs) < 0) {
		for (size_t i = 0; i < errs.n; i++)
			log_error(NULL, "%s", errs.lines[i]);
		log_error(NULL,
			  "reload refused: %zu configuration error(s); the previous "
			  "configuration keeps running",
			  errs.n);
		snprintf(d->reload_error, sizeof(d->reload_error), "%zu error(s), first: %s",
			 errs.n, errs.n ? errs.lines[0] : "?");
	} else {
		d->reload_error[0] = '\0';
		runtime_log_level(set, d->o->verbosity);
		log_info(NULL, "reloaded: %zu configuration(s)", set->n_mailboxes);
		d->stop_timeout = set->stop_timeout;
		apply_metrics(d, set);
		scheduler_swap(d->sched, set);
		/* the previous set's memory back to the system, not kept as holes */
		malloc_trim(0);
	}
	conf_errors_clear(&errs);
	d->status[0] = '\0';
	update_status(d);
	notify_ready(d->status);
}

static void
on_hup(evutil_socket_t fd, short what, void *arg)
{
	struct daemon *d = arg;
	struct timeval settle = {0, RELOAD_SETTLE * 1000};

	(void)fd;
	(void)what;
	if (!d->stopping && !evtimer_pending(d->reload, NULL))
		evtimer_add(d->reload, &settle);
}

static void
on_stopped(void *arg)
{
	struct daemon *d = arg;

	event_base_loopbreak(d->base);
}

static void
on_term(evutil_socket_t fd, short what, void *arg)
{
	struct daemon *d = arg;

	(void)what;
	if (d->stopping)
		return;
	d->stopping = true;
	log_info(NULL, "%s: stopping", fd == SIGINT ? "SIGINT" : "SIGTERM");
	notify_stopping();
	evtimer_del(d->reload);
	scheduler_stop(d->sched, d->stop_timeout, on_stopped, d);
	update_status(d);
}

static void
on_watchdog(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	notify_watchdog();
}

static int
cmd_run(const struct options *o)
{
	struct daemon d = {.o = o};
	struct conf_set *set = load(o, true, NULL);
	struct evdns_base *dns;
	uint64_t wd;
	char why[512];
	int claim;

	if (set == NULL) {
		notify_status("configuration errors: see the log");
		return EX_CONFIG;
	}
	/* held while the daemon runs: `popfetchd status` tells it is running */
	if ((claim = status_daemon_claim(set->state_directory, why, sizeof(why))) < 0)
		log_warning(NULL, "%s: popfetchd status does not see this daemon", why);
	if (set->n_mailboxes == 0)
		log_warning(NULL, "no configurations in %s/conf.d: idle until a reload brings some",
			    o->confdir);
	d.base = event_base_new();
	if (d.base == NULL)
		abort();
	dns = runtime_dns_new(d.base);
	d.sig_hup = evsignal_new(d.base, SIGHUP, on_hup, &d);
	d.sig_term = evsignal_new(d.base, SIGTERM, on_term, &d);
	d.sig_int = evsignal_new(d.base, SIGINT, on_term, &d);
	d.reload = evtimer_new(d.base, do_reload, &d);
	d.watchdog = event_new(d.base, -1, EV_PERSIST, on_watchdog, &d);
	if (!d.sig_hup || !d.sig_term || !d.sig_int || !d.reload || !d.watchdog)
		abort();
	evsignal_add(d.sig_hup, NULL);
	evsignal_add(d.sig_term, NULL);
	evsignal_add(d.sig_int, NULL);
	if ((wd = notify_watchdog_usec()) > 0) {
		struct timeval half = {(time_t)(wd / 2000000), (suseconds_t)(wd / 2 % 1000000)};
		event_add(d.watchdog, &half);
	}
	log_info(NULL, "popfetchd %s: %zu configuration(s) in %s, at most %u session(s) at once",
		 POPFETCHD_VERSION, set->n_mailboxes, o->confdir, set->max_sessions);
	if (set->shards > 1)
		log_info(NULL,
			 "shard %u/%u: polling only this shard's configurations (check lists "
			 "each one's shard)",
			 set->shard, set->shards);
	d.stop_timeout = set->stop_timeout;
	d.sched = scheduler_new(d.base, dns, set, update_status, &d);
	if ((d.workers = worker_pool_new(d.base, WORKER_POOL_SIZE)) == NULL ||
	    (d.writer = worker_pool_new(d.base, 1)) == NULL)
		log_warning(NULL,
			    "cannot start worker threads (%s): messages are sealed and committed, "
			    "and status files written, on the event loop",
			    strerror(errno));
	scheduler_set_workers(d.sched, d.workers, d.writer);
	apply_metrics(&d, set);
	update_status(&d);
	notify_ready(d.status);
	event_base_dispatch(d.base);
	/* the polls' leftovers (freed from the loop), then the rest */
	event_base_loop(d.base, EVLOOP_NONBLOCK);
	scheduler_free(d.sched);
	worker_pool_free(d.workers);
	worker_pool_free(d.writer); /* its last status files written */
	metrics_free(d.metrics);
	event_base_loop(d.base, EVLOOP_NONBLOCK);
	event_free(d.sig_hup);
	event_free(d.sig_term);
	event_free(d.sig_int);
	event_free(d.reload);
	event_free(d.watchdog);
	evdns_base_free(dns, 0);
	event_base_free(d.base);
	if (claim >= 0)
		close(claim);
	log_info(NULL, "stopped");
	return 0;
}

static void
libevent_log(int severity, const char *msg)
{
	log_msg(severity >= EVENT_LOG_WARN ? LOG_LVL_WARNING : LOG_LVL_DEBUG, NULL, "libevent: %s",
		msg);
}

static int
cmd_receive(const struct options *o, enum fetch_mode mode)
{
	json_t *errors = NULL;
	struct conf_set *set = load(o, mode == FETCH_ALL, &errors);
	int code = oneshot_run(set, errors,
			       &(struct oneshot_options){.ids = o->ids,
							 .n_ids = o->n_ids,
							 .all = o->all,
							 .json = o->json,
							 .progress = o->verbosity >= 0,
							 .mode = mode});

	conf_set_free(set);
	return code;
}

static int
cmd_receive_one(const struct options *o)
{
	return cmd_receive(o, FETCH_ONE);
}

static int
cmd_receive_all(const struct options *o)
{
	return cmd_receive(o, FETCH_ALL);
}

static int
cmd_test(const struct options *o)
{
	return probe_run(&(struct probe_options){
		.confdir = o->confdir, .id = o->id, .json = o->json, .verbosity = o->verbosity});
}

/* Never contacts a server. An operator who cannot read the configurations
 * (their secrets are the daemon's) but can read the state directory sees
 * every status.json there. */
static int
cmd_status(const struct options *o)
{
	struct conf_errors errs = {0}, errs2 = {0};
	struct conf_set *set = NULL;
	char *dir = NULL;
	int code;

	if (conf_load(o->confdir, &set, &errs) == 0) {
		code = status_show(set, set->state_directory, o->id, o->json);
	} else if (conf_state_directory(o->confdir, &dir, &errs2) == 0) {
		fprintf(stderr,
			"popfetchd: the configurations cannot be loaded (%s%s): showing the "
			"status files in %s\n",
			errs.lines[0], errs.n > 1 ? ", and more" : "", dir);
		code = status_show(NULL, dir, o->id, o->json);
	} else {
		for (size_t i = 0; i < errs.n; i++)
			fprintf(stderr, "%s\n", errs.lines[i]);
		code = EX_CONFIG;
	}
	conf_errors_clear(&errs);
	conf_errors_clear(&errs2);
	conf_set_free(set);
	free(dir);
	return code;
}

static int usage_error(const char *fmt, const char *arg);

/* import KIND FILE: the words are not configuration IDs. */
static int
cmd_import(const struct options *o)
{
	if (o->n_ids != 2 || o->all)
		return usage_error("%s takes KIND FILE (mpoprc or fetchmailrc)", o->command);
	if (o->json)
		return usage_error("%s prints YAML and notes: --json does not go with it",
				   o->command);
	return import_run(o->ids[0], o->ids[1], o->output);
}

enum id_rule {
	ID_NONE,     /* takes no configuration ID */
	ID_REQUIRED, /* must have one */
	ID_OPTIONAL, /* may have one */
};

static const struct command {
	const char *name;
	enum id_rule id;
	bool many; /* several IDs, or --all instead */
	int (*run)(const struct options *o);
} commands[] = {
	{"run", ID_NONE, false, cmd_run},
	{"check", ID_NONE, false, cmd_check},
	{"receive", ID_REQUIRED, false, cmd_receive_one},
	{"receive-all", ID_REQUIRED, true, cmd_receive_all},
	{"test", ID_REQUIRED, false, cmd_test},
	{"status", ID_OPTIONAL, false, cmd_status},
	{"import", ID_REQUIRED, true, cmd_import},
};

static int
usage_error(const char *fmt, const char *arg)
{
	fprintf(stderr, "popfetchd: ");
	fprintf(stderr, fmt, arg);
	fputc('\n', stderr);
	usage(stderr);
	return EX_USAGE;
}

/* The options and the command's words into o: -1, or the exit code when
 * there is nothing to run (--version, --help, a usage error). */
static int
parse_args(int argc, char **argv, struct options *o)
{
	static const struct option longopts[] = {
		{"config", required_argument, NULL, 'c'},
		{"verbose", no_argument, NULL, 'v'},
		{"quiet", no_argument, NULL, 'q'},
		{"json", no_argument, NULL, 'J'},
		{"all", no_argument, NULL, 'A'},
		{"version", no_argument, NULL, 'V'},
		{"help", no_argument, NULL, 'h'},
		{"output", required_argument, NULL, 'o'},
		{NULL, 0, NULL, 0},
	};
	int c;

	while ((c = getopt_long(argc, argv, "c:vqho:", longopts, NULL)) != -1) {
		switch (c) {
		case 'c':
			o->confdir = optarg;
			break;
		case 'v':
		case 'q':
			o->verbosity = c == 'v' ? 1 : -1;
			break;
		case 'o':
			o->output = optarg;
			break;
		case 'J':
			o->json = true;
			break;
		case 'A':
			o->all = true;
			break;
		case 'V':
			printf("popfetchd %s\n", POPFETCHD_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return EX_USAGE;
		}
	}
	o->command = optind < argc ? argv[optind++] : "run";
	o->ids = (const char *const *)&argv[optind];
	o->n_ids = (size_t)(argc - optind);
	o->id = o->n_ids > 0 ? o->ids[0] : NULL;
	return -1;
}

/* The command's words and --all as cmd takes them: -1, or EX_USAGE. */
static int
check_words(const struct command *cmd, const struct options *o)
{
	if (o->output != NULL && cmd->run != cmd_import)
		return usage_error("-o/--output goes with import, not %s", o->command);
	if (o->all && !cmd->many)
		return usage_error("--all goes with receive-all, not %s", o->command);
	if (o->all && o->id != NULL)
		return usage_error("--all takes no configuration ID (\"%s\")", o->id);
	if (cmd->id == ID_REQUIRED && o->id == NULL && !o->all)
		return usage_error("%s needs a configuration ID", o->command);
	if (cmd->id == ID_NONE && o->id != NULL)
		return usage_error("unexpected argument \"%s\"", o->id);
	if (!cmd->many && o->n_ids > 1)
		return usage_error("unexpected argument \"%s\"", o->ids[1]);
	return -1;
}

static void
setup_process(const struct options *o)
{
	log_setup();
	if (o->verbosity > 0)
		log_set_level(LOG_LVL_DEBUG);
	else if (o->verbosity < 0)
		log_set_level(LOG_LVL_WARNING);
	no_core_dumps();
	runtime_raise_fd_limit();
	event_set_log_callback(libevent_log);
	signal(SIGPIPE, SIG_IGN);
	mime_init();
}

int
main(int argc, char **argv)
{
	struct options o = {.confdir = POPFETCHD_CONFDIR};
	int r = parse_args(argc, argv, &o);

	if (r >= 0)
		return r;
	setup_process(&o);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		const struct command *cmd = &commands[i];

		if (strcmp(o.command, cmd->name) != 0)
			continue;
		if ((r = check_words(cmd, &o)) >= 0)
			return r;
		return cmd->run(&o);
	}
	if (o.id != NULL)
		return usage_error("unexpected argument \"%s\"", o.id);
	return usage_error("unknown command \"%s\"", o.command);
}
