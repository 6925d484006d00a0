/*
 * notify — the daemon's side of sd_notify(3): readiness, reloads, stopping,
 * a one-line status, and the watchdog. Without $NOTIFY_SOCKET every call
 * does nothing.
 */
#ifndef POPFETCHD_NOTIFY_H
#define POPFETCHD_NOTIFY_H

#include <stdint.h>

void notify_ready(const char *status);
/* RELOADING=1 with MONOTONIC_USEC, as systemd's Type=notify-reload expects. */
void notify_reloading(void);
void notify_stopping(void);
void notify_status(const char *status);
/* The watchdog interval systemd set (WatchdogSec=), in microseconds; 0: none. */
uint64_t notify_watchdog_usec(void);
void notify_watchdog(void);

#endif
