"""No core dumps (DESIGN.md §6, README security): memory holds passwords,
client secrets, tokens and PKCS#12 keys, so every command sets RLIMIT_CORE
to 0 (soft and hard) and PR_SET_DUMPABLE 0 before it reads a secret, and
the units say LimitCORE=0 (test_units.py).

Both are seen from outside. The kernel gives the /proc/PID entries of a
process that is not dumpable to root: popfetchd runs here as nobody, so
/proc/PID owned by root rather than nobody says "not dumpable" (the
binary is readable by nobody, so an exec alone leaves it dumpable).
RLIMIT_CORE is raised to unlimited before the exec, so "Max core file
size 0 0" in /proc/PID/limits is popfetchd's doing. The daemon is stopped
and the one-shot command ends by itself, so that LeakSanitizer (which
ptraces its own process) runs at exit in a sanitizer build.
"""

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import SANITIZER_MARKERS, ConfDir, _popfetchd_env
from daemonutil import wait_for
from fakepop3 import Script, Stall

NOBODY = 65534
EX_OK, EX_TEMPFAIL = 0, 75
SECRET = "Core-Dump-S3cret-4471"


def as_nobody_with_cores():
    """preexec_fn: core files allowed without limit, then uid/gid nobody."""
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture
def workdir():
    """A directory nobody owns (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pfd-core-"))
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nobody_confdir(workdir, *configs):
    cd = ConfDir(workdir / "conf", workdir / "state")
    (cd.path / "conf.d").mkdir(parents=True)
    cd.state_directory.mkdir()
    cd.write_main({})
    for config in configs:
        cd.add(config)
    for top, dirs, files in os.walk(workdir):
        for name in dirs + files:
            os.chown(os.path.join(top, name), NOBODY, NOBODY)
    return cd


@contextlib.contextmanager
def running(popfetchd_bin, workdir, args):
    """popfetchd as nobody with core files allowed, its output in
    workdir/output.log: (process, log). Killed if it still runs at the end;
    then its output must be clean (assert_clean)."""
    log = workdir / "output.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([popfetchd_bin, *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_popfetchd_env({}),
                                preexec_fn=as_nobody_with_cores)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_clean(log)


def assert_no_core(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    uid = next(l for l in status.splitlines() if l.startswith("Uid:")).split()
    assert uid[1:3] == [str(NOBODY)] * 2, f"the premise: popfetchd runs as nobody ({uid})"
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    core = next(l for l in limits if l.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], f"core files still allowed: {core}"
    owner = os.stat(f"/proc/{pid}/status").st_uid
    assert owner == 0, f"/proc/{pid} belongs to uid {owner}: the process is dumpable"


def assert_clean(log):
    out = log.read_text(errors="replace")
    for marker in SANITIZER_MARKERS:
        assert marker not in out, f"sanitizer report:\n{out}"
    assert SECRET not in out
    return out


def test_daemon_writes_no_core(popfetchd_bin, workdir):
    cd = nobody_confdir(workdir)  # no configuration: the daemon idles
    with running(popfetchd_bin, workdir, ["-c", cd.path, "run"]) as (proc, log):
        wait_for(lambda: "idle until a reload" in log.read_text() or proc.poll() is not None,
                 20, "the daemon to start")
        assert proc.poll() is None, log.read_text()
        assert_no_core(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == EX_OK, log.read_text()


def test_one_shot_command_writes_no_core(popfetchd_bin, workdir, fake_pop3):
    """receive, held at the greeting (with the password read by then)."""
    server = fake_pop3(script=Script(greeting=Stall()))
    (workdir / "save").mkdir()
    config = {"id": "fake", "server": server.host, "port": server.port, "tls": "none",
              "user": "fakeuser", "password": SECRET, "save_directory": str(workdir / "save"),
              "timeouts": {"connect": "5s", "command": "2s"}}
    cd = nobody_confdir(workdir, config)
    with running(popfetchd_bin, workdir, ["-c", cd.path, "receive", "fake"]) as (proc, log):
        wait_for(lambda: server.sessions or proc.poll() is not None, 20,
                 "popfetchd to connect")
        assert proc.poll() is None, log.read_text()
        assert_no_core(proc.pid)
        assert proc.wait(30) == EX_TEMPFAIL, log.read_text()
