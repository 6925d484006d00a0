/*
 * notify — sd_notify(3) messages of the daemon (see notify.h).
 */
#include <stdio.h>
#include <time.h>

#include <systemd/sd-daemon.h>

#include "popfetchd/log.h"
#include "popfetchd/notify.h"

static void
notify_send(const char *msg)
{
	int r = sd_notify(0, msg);

	if (r < 0)
		log_debug(NULL, "sd_notify failed: %d", r);
}

void
notify_ready(const char *status)
{
	char buf[1100];

	snprintf(buf, sizeof(buf), "READY=1\nSTATUS=%s", status);
	notify_send(buf);
}

void
notify_reloading(void)
{
	struct timespec ts;
	char buf[128];

	clock_gettime(CLOCK_MONOTONIC, &ts);
	snprintf(buf, sizeof(buf), "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading",
		 (unsigned long long)ts.tv_sec * 1000000ULL +
			 (unsigned long long)ts.tv_nsec / 1000);
	notify_send(buf);
}

void
notify_stopping(void)
{
	notify_send("STOPPING=1\nSTATUS=stopping: running sessions finish the message in hand");
}

void
notify_status(const char *status)
{
	char buf[1100];

	snprintf(buf, sizeof(buf), "STATUS=%s", status);
	notify_send(buf);
}

uint64_t
notify_watchdog_usec(void)
{
	uint64_t usec = 0;

	return sd_watchdog_enabled(0, &usec) > 0 ? usec : 0;
}

void
notify_watchdog(void)
{
	notify_send("WATCHDOG=1");
}
