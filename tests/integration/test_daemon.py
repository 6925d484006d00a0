"""The daemon (`popfetchd run`, DESIGN.md §5): scheduling against real and
fake servers, the sd_notify conversation with systemd (a NOTIFY_SOCKET the
test owns), reload on SIGHUP, and the graceful stop on SIGTERM."""

import os
import re
import signal
import time
from pathlib import Path

import pytest

import mailgen
from daemonutil import daemon, wait_for  # noqa: F401  (daemon: a fixture)
from fakepop3 import Meter, Trickle

EX_OK = 0


def saved_folders(save_dir):
    return sorted(p for p in Path(save_dir).iterdir() if not p.name.startswith("."))


def messages(n, seed, size=3000):
    return [m.data for m in mailgen.generate_messages(n, size, seed=seed)]


# --------------------------------------------------------------------------
# sd_notify


def test_notify_sequence(fake_pop3, fake_config, confdir, daemon):
    """READY=1 once loaded (with STATUS), WATCHDOG=1 at half the interval,
    RELOADING=1 with MONOTONIC_USEC then READY=1 on SIGHUP, STOPPING=1 on
    SIGTERM, exit 0 — in that order."""
    server = fake_pop3(messages(2, seed=301))
    cd = confdir(fake_config(server, poll_interval="1s"))
    d = daemon(cd, env={"WATCHDOG_USEC": "400000"})
    d.wait_ready()
    wait_for(lambda: d.notify.events().count("WATCHDOG") >= 3, 10, "three WATCHDOG=1")
    wait_for(lambda: len(server.remaining()) == 0, 20, "the messages fetched")
    d.signal(signal.SIGHUP)
    d.wait_ready(2)
    assert d.stop() == EX_OK, d.output
    events = [e for e in d.notify.events() if e not in ("WATCHDOG", "STATUS")]
    print("notify sequence:", events)
    assert events == ["READY", "RELOADING", "READY", "STOPPING"], d.notify.messages
    [reloading] = d.notify.fields("RELOADING")
    assert int(reloading["MONOTONIC_USEC"]) > 0
    ready = d.notify.fields("READY")
    assert all("STATUS" in f for f in ready)
    assert "1 configuration(s)" in ready[0]["STATUS"]
    assert "2 message(s) saved since start" in d.notify.status() or \
        "2 message(s) saved since start" in ready[-1]["STATUS"]
    # the watchdog keeps its rhythm: 400 ms interval, a ping every ~200 ms
    times = [t for t, f in d.notify.messages if "WATCHDOG" in f]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps[:5]) < 0.6, gaps


def test_no_watchdog_unless_asked(fake_pop3, fake_config, confdir, daemon):
    server = fake_pop3([])
    d = daemon(confdir(fake_config(server, poll_interval="1s")))
    d.wait_ready()
    time.sleep(1.2)
    assert d.stop() == EX_OK
    assert "WATCHDOG" not in d.notify.events()


def test_invalid_configuration_at_start_exits_78(fake_pop3, fake_config, confdir, daemon):
    server = fake_pop3([])
    cd = confdir(fake_config(server, poll_interval="soon"))
    d = daemon(cd)
    assert d.proc.wait(20) == 78
    assert "poll_interval" in d.output and str(cd.files["fake"]) in d.output
    assert "READY" not in d.notify.events()


# --------------------------------------------------------------------------
# scheduling


def test_polls_deliver_everything_and_later_mail(dovecot, dovecot_config, confdir, daemon,
                                                 fake_pop3, fake_config):
    """Three configurations on one Dovecot, polled every second: all mail
    arrives, mail delivered later arrives at the next poll, an inactive
    configuration is never contacted."""
    boxes = [dovecot.mailbox(dovecot.add_user()) for _ in range(3)]
    configs = []
    for i, box in enumerate(boxes):
        box.deliver(*messages(5, seed=310 + i))
        configs.append(dovecot_config(box, id=f"dv{i}", poll_interval="1s"))
    never = fake_pop3(messages(1, seed=319))
    configs.append(fake_config(never, id="sleeping", status="inactive", poll_interval="1s"))
    cd = confdir(*configs)
    d = daemon(cd)
    d.wait_ready()
    saves = [c["save_directory"] for c in configs[:3]]
    wait_for(lambda: all(len(saved_folders(s)) == 5 for s in saves), 30, "15 messages saved")
    # a folder is renamed into place before its DELE goes out and QUIT commits it
    wait_for(lambda: all(b.count() == 0 for b in boxes), 10, "the 15 messages deleted")
    boxes[1].deliver(*messages(2, seed=318))
    wait_for(lambda: len(saved_folders(saves[1])) == 7, 15, "later mail saved")
    wait_for(lambda: "17 message(s) saved since start" in (d.notify.status() or ""), 10,
             "the status to count 17")
    assert "3 configuration(s)" in d.notify.status()
    assert d.stop() == EX_OK
    assert never.sessions == [], "an inactive configuration was contacted"
    for b in boxes:
        b.reset()


def test_max_sessions_bounds_concurrent_sessions(fake_pop3, fake_config, confdir, daemon):
    """Ten configurations, max_sessions: 2, slow servers: never more than two
    sessions open at once (counted by the servers), and all mail arrives."""
    meter = Meter()
    servers, configs = [], []
    for i in range(10):
        srv = fake_pop3(messages(2, seed=320 + i), meter=meter)
        srv.inject("RETR", Trickle(delay=0.02, chunk=400), times=2)
        servers.append(srv)
        configs.append(fake_config(srv, id=f"slow{i}", poll_interval="1s"))
    d = daemon(confdir(*configs, daemon={"max_sessions": 2}))
    d.wait_ready()
    wait_for(lambda: all(not s.remaining() for s in servers), 60, "all 20 messages fetched")
    assert d.stop() == EX_OK
    print(f"peak concurrent sessions: {meter.peak} of {meter.total}")
    assert meter.peak <= 2, meter.peak
    assert meter.peak == 2, "the limit was never reached: the test proves nothing"
    for c in configs:
        assert len(saved_folders(c["save_directory"])) == 2


def test_failing_configuration_backs_off(fake_pop3, fake_config, confdir, daemon):
    """A server refusing the password is not hammered every second: the
    retries spread out (1 s interval: 2 s, 4 s... with jitter), and the
    STATUS names it as failing with its error."""
    server = fake_pop3([], password="other")
    d = daemon(confdir(fake_config(server, poll_interval="1s", password="wrongpass1")))
    d.wait_ready()
    time.sleep(6)
    n = len(server.sessions)
    assert d.stop() == EX_OK
    # without backoff: ~6 sessions; with it: 1 (t~0.5), 2 (+1.5..2), 3 (+3..4)
    assert 1 <= n <= 4, n
    status = [f["STATUS"] for f in d.notify.fields("STATUS")]
    assert any("1 failing" in s and "last error: fake:" in s for s in status), status


# --------------------------------------------------------------------------
# reload


def test_reload_adds_removes_and_changes(fake_pop3, fake_config, confdir, daemon, tmp_path):
    a = fake_pop3(messages(1, seed=330))
    b = fake_pop3(messages(1, seed=331))
    c = fake_pop3(messages(2, seed=332))
    ca, cb = fake_config(a, id="a", poll_interval="1s"), fake_config(b, id="b", poll_interval="1s")
    cd = confdir(ca, cb)
    d = daemon(cd)
    d.wait_ready()
    wait_for(lambda: not a.remaining() and not b.remaining(), 20, "a and b fetched")
    # change a (a new save directory), remove b, add c
    new_save = tmp_path / "a-moved"
    new_save.mkdir()
    cd.add({**ca, "save_directory": str(new_save)})
    os.unlink(cd.files["b"])
    cd.add(fake_config(c, id="c", poll_interval="1s"))
    d.signal(signal.SIGHUP)
    d.wait_ready(2)
    b_sessions = len(b.sessions)
    a.add(messages(1, seed=333)[0])
    b.add(messages(1, seed=334)[0])
    wait_for(lambda: not c.remaining(), 20, "c fetched")
    wait_for(lambda: len(saved_folders(new_save)) == 1, 20, "a's new mail in its new folder")
    time.sleep(2.5)
    assert d.stop() == EX_OK
    assert len(b.sessions) <= b_sessions + 1 and len(b.remaining()) == 1, "b still polled"
    assert len(saved_folders(ca["save_directory"])) == 1
    assert "2 configuration(s)" in d.notify.status()


def test_broken_file_on_reload_keeps_the_old_set(fake_pop3, fake_config, confdir, daemon):
    a = fake_pop3(messages(1, seed=340))
    ca = fake_config(a, id="a", poll_interval="1s")
    cd = confdir(ca)
    d = daemon(cd)
    d.wait_ready()
    wait_for(lambda: not a.remaining(), 20, "a fetched")
    bad = cd.write_raw("bad.yaml", "id: bad\nserver: mail.example.org\nport: 70000\n"
                                   "user: u\npassword: p\nsave_directory: /tmp\n")
    d.signal(signal.SIGHUP)
    d.wait_ready(2)
    ready = d.notify.fields("READY")[-1]["STATUS"]
    assert "reload refused" in ready and "bad.yaml" in ready, ready
    assert f"{bad}:3:7: port" in d.output, d.output
    # the old set keeps running
    a.add(messages(1, seed=341)[0])
    wait_for(lambda: not a.remaining(), 20, "a still polled after the refused reload")
    bad.unlink()
    d.signal(signal.SIGHUP)
    d.wait_ready(3)
    assert "reload refused" not in d.notify.fields("READY")[-1]["STATUS"]
    assert d.stop() == EX_OK


def test_status_counts_follow_reloads(fake_pop3, fake_config, confdir, daemon, tmp_path):
    """STATUS= counts the configurations, the failing and the broken ones as
    reloads remove them, bring them back and mend them (the scheduler keeps
    the counts as jobs change instead of counting 10 000 jobs each time)."""
    ok = fake_pop3()
    down = fake_pop3()
    down.stop()  # nothing listens there: every poll fails
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    good = fake_config(ok, id="good", poll_interval="1s")
    failing = fake_config(down, id="failing", poll_interval="1s")
    broken = fake_config(ok, id="broken", save_directory=str(blocker / "save"))
    cd = confdir(good, failing, broken)
    d = daemon(cd)
    d.wait_ready()
    counts = lambda: re.search(r"(\d+) configuration\(s\).* (\d+) failing, (\d+) broken",
                               d.notify.status() or "").groups()
    wait_for(lambda: counts() == ("3", "1", "1"), 15, f"3, 1 failing, 1 broken\n{d.output}")
    for name in ("failing", "broken"):
        os.unlink(cd.files[name])
    d.signal(signal.SIGHUP)
    d.wait_ready(2)
    assert counts() == ("1", "0", "0"), d.notify.status()
    cd.add(failing)
    cd.add({**broken, "save_directory": str(tmp_path / "mended")})
    d.signal(signal.SIGHUP)
    d.wait_ready(3)
    wait_for(lambda: counts() == ("3", "1", "0"), 15, f"3, 1 failing, 0 broken\n{d.output}")
    cd.add({**failing, "port": ok.port})
    d.signal(signal.SIGHUP)
    d.wait_ready(4)
    wait_for(lambda: counts() == ("3", "0", "0"), 15, f"3, 0 failing\n{d.output}")
    assert d.stop() == EX_OK


def test_sighup_burst_is_coalesced(fake_pop3, fake_config, confdir, daemon):
    a = fake_pop3(messages(1, seed=350))
    d = daemon(confdir(fake_config(a, id="a", poll_interval="1s")))
    d.wait_ready()
    for _ in range(50):
        d.signal(signal.SIGHUP)
        time.sleep(0.002)
    wait_for(lambda: d.notify.events().count("READY") >= 2, 10, "READY after the burst")
    time.sleep(1)
    reloads = d.notify.events().count("RELOADING")
    print(f"50 SIGHUPs -> {reloads} reload(s)")
    assert 1 <= reloads <= 5, reloads
    assert d.notify.events().count("READY") == reloads + 1
    a.add(messages(1, seed=351)[0])
    wait_for(lambda: not a.remaining(), 20, "polls go on after the burst")
    assert d.stop() == EX_OK


# --------------------------------------------------------------------------
# stop


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
def test_sigterm_finishes_the_message_in_hand(fake_pop3, fake_config, confdir, daemon,
                                              run_popfetchd, pipelining):
    """SIGTERM during a RETR: that message (pipelined: the messages whose
    RETR is in flight, at most 4 MiB beyond the first) is saved and deleted,
    the session QUITs, nothing else is taken; the next run saves the rest
    once."""
    data = messages(3, seed=360, size=20000)
    server = fake_pop3(data, pipelining=pipelining)
    server.inject("RETR", Trickle(delay=0.05, chunk=1000))  # ~1 s a message
    config = fake_config(server, poll_interval="1s")
    cd = confdir(config)
    d = daemon(cd)
    d.wait_ready()
    wait_for(lambda: server.sent("RETR"), 20, "the first RETR")
    d.signal(signal.SIGTERM)
    assert d.stop() == EX_OK, d.output
    assert "STOPPING" in d.notify.events()
    taken = 3 if pipelining else 1
    assert server.count("RETR") == taken and server.sent("QUIT")
    assert len(server.remaining()) == 3 - taken
    folders = saved_folders(config["save_directory"])
    assert sorted((f / "message.eml").read_bytes() for f in folders) == \
        sorted(m.replace(b"\n", b"\r\n") for m in data[:taken])
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK
    assert len(saved_folders(config["save_directory"])) == 3 and not server.remaining()


def test_sigterm_past_stop_timeout_leaves_nothing_partial(fake_pop3, fake_config, confdir,
                                                          daemon, run_popfetchd):
    """A RETR slower than stop_timeout: the session is cut without QUIT —
    nothing partial is visible, nothing is deleted — and the next run saves
    the message exactly once."""
    data = messages(1, seed=370, size=60000)
    server = fake_pop3(data)
    server.inject("RETR", Trickle(delay=0.1, chunk=500))  # ~12 s
    config = fake_config(server, poll_interval="1s", timeouts={"connect": "5s", "command": "30s"})
    cd = confdir(config, daemon={"stop_timeout": "1s"})
    d = daemon(cd)
    d.wait_ready()
    wait_for(lambda: server.sent("RETR"), 20, "the RETR")
    time.sleep(0.5)
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.stop() == EX_OK, d.output
    assert time.monotonic() - started < 5
    assert "ended without QUIT" in d.output
    assert saved_folders(config["save_directory"]) == []
    assert not server.sent("DELE") and not server.sent("QUIT")
    assert len(server.remaining()) == 1
    server.clear_faults()
    server.wait_idle(20)  # the server notices the cut connection and unlocks
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK
    [folder] = saved_folders(config["save_directory"])
    assert (folder / "message.eml").read_bytes() == data[0].replace(b"\n", b"\r\n")
    assert not server.remaining()


def test_stop_timeout_is_validated(fake_pop3, fake_config, confdir, run_popfetchd):
    cd = confdir(fake_config(fake_pop3([])), daemon={"stop_timeout": "2h"})
    res = run_popfetchd(["check"], confdir=cd)
    assert res.returncode == 78
    assert f"{cd.main}:" in res.stderr and "stop_timeout" in res.stderr and "1h" in res.stderr


def test_first_polls_are_spread(fake_pop3, fake_config, confdir, daemon):
    """Twenty configurations with a 4 s interval do not all connect at once:
    their first sessions spread over the first interval."""
    servers = [fake_pop3([]) for _ in range(20)]
    configs = [fake_config(s, id=f"s{i}", poll_interval="4s") for i, s in enumerate(servers)]
    d = daemon(confdir(*configs))
    d.wait_ready()
    t0 = time.monotonic()
    wait_for(lambda: all(s.sessions for s in servers), 10, "every first poll")
    assert d.stop() == EX_OK
    firsts = sorted(s.sessions[0].started - t0 for s in servers)
    print("first polls at", [round(t, 2) for t in firsts])
    assert firsts[-1] < 4.5
    assert firsts[-1] - firsts[0] > 1.5, firsts     # spread, not a burst
    # no quarter of the interval holds most of them (a burst puts all 20 in
    # one; a uniform spread puts 14 or more in one once in 65000 runs)
    for q in range(4):
        assert sum((q == 0 or q <= t) and t < q + 1 for t in firsts) <= 13, firsts


def test_login_delay_is_honoured(fake_pop3, fake_config, confdir, daemon):
    """-ERR [LOGIN-DELAY 4]: the next try waits 4 s although the interval is
    1 s; after a success the interval is 1 s again."""
    server = fake_pop3([])
    server.inject("PASS", b"-ERR [LOGIN-DELAY 4] not so often\r\n")
    d = daemon(confdir(fake_config(server, poll_interval="1s")))
    d.wait_ready()
    wait_for(lambda: len(server.sessions) >= 4, 20, "four sessions")
    assert d.stop() == EX_OK
    t = [s.started for s in server.sessions]
    assert t[1] - t[0] >= 3.9, t
    assert t[2] - t[1] < 1.5 and t[3] - t[2] < 1.5, t   # back to the interval


# --------------------------------------------------------------------------
# a configuration that cannot be set up


def broken_ca_config(dovecot, dovecot_config, mailbox, tmp_path, **keys):
    """pop3s to Dovecot, trusting a CA file that holds garbage for now."""
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    return ca, dovecot_config(mailbox, id="tlsca", server="127.0.0.1", port=dovecot.pop3s_port,
                              tls="implicit", tls_ca_file=str(ca), **keys)


def broken_lines(output):
    return [l for l in output.splitlines() if "tlsca" in l and "cannot be polled" in l]


@pytest.mark.parametrize("how", ["reload", "retry"])
def test_broken_configuration_is_polled_once_fixed(dovecot, dovecot_config, mailbox, confdir,
                                                   daemon, tmp_path, how):
    """A tls_ca_file that cannot be loaded: the configuration shows as
    broken (STATUS, an error line naming it and the reason at every retry),
    is retried with backoff, and once the file is fixed it is polled and its
    mail saved: at once after SIGHUP (how=reload; a 1 min interval puts the
    first retry 90 s away), or at its next retry (how=retry; 1 s interval:
    retries after ~2 s, ~4 s, ...)."""
    from test_receive import deliver_generated
    deliver_generated(mailbox, 2, 3000, seed=351, with_dots=False)
    ca, config = broken_ca_config(dovecot, dovecot_config, mailbox, tmp_path,
                                  poll_interval="1m" if how == "reload" else "1s")
    d = daemon(confdir(config))
    d.wait_ready()
    wait_for(lambda: "1 broken" in (d.notify.status() or ""), 10, f"STATUS: 1 broken\n{d.output}")
    assert "last error: tlsca:" in d.notify.status()
    assert broken_lines(d.output), d.output
    assert str(ca) in broken_lines(d.output)[0], d.output
    if how == "retry":
        wait_for(lambda: len(broken_lines(d.output)) >= 2, 10, f"a second try\n{d.output}")
        delays = [float(l.rsplit("next try in ", 1)[1].split()[0]) for l in broken_lines(d.output)]
        assert delays[1] > delays[0], f"no backoff: {delays}"
    assert mailbox.count() == 2
    ca.write_bytes(Path(dovecot.ca_file).read_bytes())
    if how == "reload":
        d.signal(signal.SIGHUP)
        d.wait_ready(2)
    wait_for(lambda: mailbox.count() == 0, 15, f"the mail fetched\n{d.output}")
    assert len(saved_folders(config["save_directory"])) == 2
    wait_for(lambda: "0 broken" in (d.notify.status() or ""), 5, f"STATUS: 0 broken\n{d.output}")
    assert d.stop() == EX_OK, d.output
