"""Open files and max_sessions (issue 19): popfetchd raises its soft
RLIMIT_NOFILE to the hard limit, and refuses a max_sessions whose sessions
would need more descriptors than the limit allows (12 per session, 64 for
the process: runtime.h), at `check`, at `run` (exit 78) and on a reload (the
previous set keeps running), with an error that names popfetchd.yaml and
max_sessions and says what to do.

The limits are set by prlimit(1) around the binary: the process is
popfetchd itself (prlimit execs it), started with the limits given."""

import json
import os
import signal
import subprocess

import pytest

from conftest import _popfetchd_env
from daemonutil import daemon, wait_for  # noqa: F401  (daemon: a fixture)
from pfdrun import Result, _check_sanitizers

EX_CONFIG = 78
# with 256 descriptors: (256 - 64) / 12 = 16 sessions
LIMIT, FITS = 256, 16


@pytest.fixture
def limited(popfetchd_bin, tmp_path):
    """limited(soft, hard) -> a script that runs popfetchd with these limits."""
    def make(soft, hard):
        path = tmp_path / f"popfetchd-nofile-{soft}-{hard}"
        path.write_text(f'#!/bin/sh\nexec prlimit --nofile={soft}:{hard} -- "{popfetchd_bin}" "$@"\n')
        path.chmod(0o755)
        return path
    if not os.path.exists("/usr/bin/prlimit"):
        pytest.fail("prlimit (util-linux) is needed")
    return make


def run(binary, *args):
    proc = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=_popfetchd_env(None), stdin=subprocess.DEVNULL)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    result.cmd = [binary, *args]
    print(result.describe())
    _check_sanitizers(result)
    return result


def expect_fd_error(text, cd, sessions, fits):
    want = f"{cd.main}: max_sessions: {sessions} session(s) at once need up to"
    assert want in text, text
    assert f"may open only {LIMIT} (RLIMIT_NOFILE)" in text, text
    assert f"set max_sessions to at most {fits}" in text, text
    assert "LimitNOFILE=" in text, text


def test_check_refuses_more_sessions_than_the_limit_allows(fake_pop3, fake_config, confdir,
                                                           limited):
    box = fake_config(fake_pop3())
    tight = limited(LIMIT, LIMIT)
    cd = confdir(box, daemon={"max_sessions": FITS + 1})
    r = run(tight, "-c", cd, "check")
    assert r.returncode == EX_CONFIG
    expect_fd_error(r.stderr, cd, FITS + 1, FITS)
    r = run(tight, "-c", cd, "--json", "check")
    out = json.loads(r.stdout)
    assert r.returncode == EX_CONFIG and out["valid"] is False
    expect_fd_error(out["errors"][0], cd, FITS + 1, FITS)
    # the default, 64 sessions, as well; and the most that fit pass
    cd.write_main({})
    expect_fd_error(run(tight, "-c", cd, "check").stderr, cd, 64, FITS)
    cd.write_main({"max_sessions": FITS})
    assert run(tight, "-c", cd, "check").returncode == 0


def test_run_raises_the_soft_limit_to_the_hard_one(fake_pop3, fake_config, confdir, daemon,
                                                   limited):
    """A soft limit too low for 64 sessions under a hard one high enough."""
    cd = confdir(fake_config(fake_pop3(), poll_interval="1h"))
    assert run(limited(LIMIT, 4096), "-c", cd, "check").returncode == 0
    d = daemon(cd, binary=limited(LIMIT, 4096))
    d.wait_ready()
    limits = open(f"/proc/{d.proc.pid}/limits").read()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line
    assert d.stop() == 0


def test_run_exits_78_with_more_sessions_than_the_limit_allows(fake_pop3, fake_config,
                                                               confdir, daemon, limited):
    cd = confdir(fake_config(fake_pop3()), daemon={"max_sessions": 100})
    d = daemon(cd, binary=limited(LIMIT, LIMIT))
    assert d.proc.wait(30) == EX_CONFIG
    expect_fd_error(d.output, cd, 100, FITS)
    assert "READY" not in d.notify.events()


def test_reload_refuses_more_sessions_than_the_limit_allows(fake_pop3, fake_config, confdir,
                                                            daemon, limited):
    server = fake_pop3()
    cd = confdir(fake_config(server, poll_interval="1s"), daemon={"max_sessions": FITS})
    d = daemon(cd, binary=limited(LIMIT, LIMIT))
    d.wait_ready()
    cd.write_main({"max_sessions": 500})
    d.signal(signal.SIGHUP)
    d.wait_ready(2)
    ready = d.notify.fields("READY")[-1]["STATUS"]
    assert "reload refused" in ready and "max_sessions" in ready, ready
    expect_fd_error(d.output, cd, 500, FITS)
    # the previous set keeps polling
    polls = len(server.sessions)
    wait_for(lambda: len(server.sessions) > polls, 10, "a poll after the refused reload")
    assert d.stop() == 0
