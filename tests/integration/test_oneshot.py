"""The one-shot commands for many configurations (DESIGN.md §2): `receive-all
ID...` and `receive-all --all` poll each configuration once, at most
max_sessions at a time, and exit with the most urgent of their failures
(78, 74, 77, 76, 75, 69); the progress line on a terminal; and, as root,
no state files in a state directory that belongs to another user.
"""

import os
import pty
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

import dovecot as dovecot_tool
import mailgen
from conftest import SANITIZER_MARKERS, _popfetchd_env
from fakepop3 import Action, Meter
from test_core_dumps import NOBODY, nobody_confdir, workdir  # noqa: F401 (a fixture)

EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_IOERR = 0, 64, 69, 74
EX_TEMPFAIL, EX_PROTOCOL, EX_NOPERM, EX_CONFIG = 75, 76, 77, 78
RESULT_KEYS = {"configuration", "saved", "skipped", "left_too_big", "deleted", "errors",
               "exit_code"}


class Slow(Action):
    """The good answer, then nothing more read for `seconds`: the session
    lasts at least that long."""
    commit = True

    def __init__(self, seconds):
        self.seconds = seconds

    def perform(self, conn, default):
        conn.send(default)
        time.sleep(self.seconds)
        return True


def folders(save_dir):
    return sorted(p for p in Path(save_dir).iterdir() if not p.name.startswith("."))


# --------------------------------------------------------------------------
# several configurations


def test_several_ids_each_polled_once(fake_pop3, fake_config, confdir, run_popfetchd):
    servers = {i: fake_pop3(mailgen.generate(2, 3000, seed=n)) for n, i in enumerate("abc")}
    configs = {i: fake_config(s, id=i) for i, s in servers.items()}
    cd = confdir(*configs.values())

    res = run_popfetchd(["receive-all", "a", "c", "a"], confdir=cd)

    assert res.returncode == EX_OK, res.stderr
    saved = folders(configs["a"]["save_directory"]) + folders(configs["c"]["save_directory"])
    assert len(saved) == 4
    assert sorted(Path(l) for l in res.lines) == saved, "one line per saved folder"
    assert len(servers["a"].sessions) == 1, "an ID named twice is polled once"
    assert servers["b"].sessions == [] and folders(configs["b"]["save_directory"]) == []


def test_all_polls_every_active_configuration(fake_pop3, fake_config, confdir, run_popfetchd):
    servers = {i: fake_pop3(mailgen.generate(1, 2000, seed=n)) for n, i in enumerate("abc")}
    configs = [fake_config(servers["a"], id="a"), fake_config(servers["b"], id="b"),
               fake_config(servers["c"], id="c", status="inactive")]
    cd = confdir(*configs)

    res = run_popfetchd(["receive-all", "--all", "--json"], confdir=cd)

    assert res.returncode == EX_OK, res.stderr
    doc = res.json()
    assert set(doc) == {"results", "errors", "exit_code"} and doc["exit_code"] == EX_OK
    assert [r["configuration"] for r in doc["results"]] == ["a", "b"]
    for r in doc["results"]:
        assert set(r) == RESULT_KEYS and r["exit_code"] == EX_OK and len(r["saved"]) == 1
        assert Path(r["saved"][0]["folder"]).parent == Path(configs["ab".index(
            r["configuration"])]["save_directory"])
    assert servers["c"].sessions == [], "an inactive configuration is not polled"


def test_all_with_nothing_active_is_success(fake_pop3, fake_config, confdir, run_popfetchd):
    cd = confdir(fake_config(fake_pop3(), id="a", status="inactive"))
    res = run_popfetchd(["receive-all", "--all", "--json"], confdir=cd)
    assert res.returncode == EX_OK
    assert res.json() == {"results": [], "errors": [], "exit_code": EX_OK}


def failing_configs(fake_pop3, fake_config):
    """Configurations that fail with 77, 69 and 0 (one message saved)."""
    refused_port = dovecot_tool.free_ports(1)[0]
    good = fake_pop3(mailgen.generate(1, 2000, seed=3))
    return {
        "auth": fake_config(fake_pop3(), id="auth", password="wrong"),
        "down": fake_config(good, id="down", port=refused_port),
        "good": fake_config(good, id="good"),
    }


@pytest.mark.parametrize("ids,expected", [
    (["good", "down"], EX_UNAVAILABLE),
    (["down", "auth", "good"], EX_NOPERM),
    (["good", "auth", "no-such-id", "down"], EX_CONFIG),
    (["good"], EX_OK),
])
def test_exit_code_is_the_most_urgent(fake_pop3, fake_config, confdir, run_popfetchd, ids,
                                      expected):
    configs = failing_configs(fake_pop3, fake_config)
    cd = confdir(*configs.values())

    res = run_popfetchd(["receive-all", "--json", *ids], confdir=cd)

    assert res.returncode == expected
    doc = res.json()
    if len(ids) == 1:
        assert set(doc) == RESULT_KEYS, "one ID: the output of receive-all as it always was"
        return
    assert doc["exit_code"] == expected
    codes = {r["configuration"]: r["exit_code"] for r in doc["results"]}
    want = {"good": EX_OK, "down": EX_UNAVAILABLE, "auth": EX_NOPERM, "no-such-id": EX_CONFIG}
    assert codes == {i: want[i] for i in ids}, "every ID polled, each with its own result"
    assert len(next(r for r in doc["results"] if r["configuration"] == "good")["saved"]) == 1
    for r in doc["results"]:
        assert (r["errors"] != []) == (r["exit_code"] != EX_OK), r


def test_errors_on_stderr_name_the_configuration(fake_pop3, fake_config, confdir,
                                                 run_popfetchd):
    configs = failing_configs(fake_pop3, fake_config)
    res = run_popfetchd(["receive-all", "good", "auth", "nope"], confdir=confdir(*configs.values()))
    assert res.returncode == EX_CONFIG
    lines = res.stderr.splitlines()
    assert any(l.startswith("popfetchd: auth: ") for l in lines), res.stderr
    assert any(l.startswith("popfetchd: nope: ") for l in lines), res.stderr
    assert len(res.lines) == 1 and Path(res.lines[0]).parent == Path(
        configs["good"]["save_directory"])


def test_invalid_configuration_set_with_several_ids(fake_pop3, fake_config, confdir,
                                                    run_popfetchd):
    cd = confdir(fake_config(fake_pop3(), id="a", remove_after_raed=True))
    res = run_popfetchd(["receive-all", "--all", "--json"], confdir=cd)
    assert res.returncode == EX_CONFIG
    doc = res.json()
    assert doc["results"] == [] and doc["exit_code"] == EX_CONFIG
    assert any("remove_after_raed" in e for e in doc["errors"])


@pytest.mark.parametrize("limit,peak", [(2, 2), (None, 4)])
def test_concurrency_within_max_sessions(fake_pop3, fake_config, confdir, run_popfetchd,
                                         limit, peak):
    meter = Meter()
    configs = []
    for i in range(4):
        server = fake_pop3(mailgen.generate(1, 2000, seed=i), meter=meter)
        server.inject("LIST", Slow(0.4), times=None)
        server.inject("UIDL", Slow(0.4), times=None)
        configs.append(fake_config(server, id=f"m{i}"))
    cd = confdir(*configs, daemon={"max_sessions": limit} if limit else None)

    res = run_popfetchd(["receive-all", "--all"], confdir=cd)

    assert res.returncode == EX_OK, res.stderr
    assert len(res.lines) == 4 and meter.total == 4
    assert meter.peak == peak, f"at most max_sessions at once, and that many ({meter.peak})"


@pytest.mark.parametrize("args", [["receive-all", "--all", "a"], ["receive", "--all"],
                                  ["receive", "a", "b"], ["test", "a", "b"], ["check", "--all"]],
                         ids=["all-and-id", "receive-all", "receive-two", "test-two", "check-all"])
def test_usage_errors(fake_pop3, fake_config, confdir, run_popfetchd, args):
    cd = confdir(fake_config(fake_pop3(), id="a"), fake_config(fake_pop3(), id="b"))
    res = run_popfetchd(args, confdir=cd)
    assert res.returncode == EX_USAGE
    assert res.stdout == ""


# --------------------------------------------------------------------------
# progress on a terminal


def slow_mailbox(fake_pop3, count=12, size=3000):
    server = fake_pop3(mailgen.generate(count, size, seed=7), pipelining=False)
    server.inject("RETR", Slow(0.12), times=None)
    return server


def run_on_pty(cmd, cols=200):
    """cmd with stderr on a pseudo-terminal, stdout on a pipe: (exit, stdout, tty bytes)."""
    master, slave = pty.openpty()
    os.set_blocking(master, True)
    subprocess.run(["stty", "cols", str(cols)], stdin=slave, check=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                            env=_popfetchd_env({}))
    os.close(slave)
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal's last writer has gone
                return
            if not data:
                return
            chunks.append(data)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=60)
    reader.join(10)
    os.close(master)
    tty = b"".join(chunks).decode(errors="replace")
    assert not any(m in tty for m in SANITIZER_MARKERS), tty
    return proc.returncode, out.decode(), tty


PROGRESS = re.compile(r"\r(?:fake: )?(\d+)/(\d+) messages, ([\d.]+)/([\d.]+) kB(?:, [\d.]+ [kM]B/s)?\x1b\[K")


def test_progress_line_on_a_terminal(fake_pop3, fake_config, confdir, popfetchd_bin):
    server = slow_mailbox(fake_pop3)
    total = sum(len(m.data) for m in server.mailbox)
    config = fake_config(server)
    cd = confdir(config)

    code, out, tty = run_on_pty([popfetchd_bin, "-c", str(cd), "receive-all", "fake"])

    assert code == EX_OK, tty
    assert len(out.splitlines()) == 12, "the folders still go to stdout"
    shown = PROGRESS.findall(tty)
    assert shown, f"no progress line on the terminal: {tty!r}"
    assert {(int(t), float(b)) for _, t, _, b in shown} == {(12, round(total / 1000, 1))}, \
        "the totals are the listing's"
    done = [int(d) for d, _, _, _ in shown]
    assert done == sorted(done) and done[-1] > 0, "messages done only grow"
    assert "fake: " in tty
    assert tty.rstrip("\n").endswith("\r\x1b[K") or "\r\x1b[K" in tty, "the line is cleared"
    assert "\n" not in re.sub(r"popfetchd: [^\r\n]*\r?\n", "", tty), \
        "the progress line never ends a line; only log lines do"


def test_progress_line_for_several(fake_pop3, fake_config, confdir, popfetchd_bin):
    configs = [fake_config(slow_mailbox(fake_pop3, count=6), id=i) for i in ("a", "b")]
    cd = confdir(*configs)
    code, out, tty = run_on_pty([popfetchd_bin, "-c", str(cd), "receive-all", "--all"])
    assert code == EX_OK, tty
    assert re.search(r"\r\d/2 configurations done, \d+/12 messages", tty), tty


@pytest.mark.parametrize("extra", [[], ["--json"], ["-q"]], ids=["pipe", "json", "quiet"])
def test_no_progress_line_elsewhere(fake_pop3, fake_config, confdir, popfetchd_bin,
                                    run_popfetchd, extra):
    cd = confdir(fake_config(slow_mailbox(fake_pop3)))
    if extra:  # on a terminal, but asked not to
        code, _, tty = run_on_pty([popfetchd_bin, "-c", str(cd), "receive-all", "fake", *extra])
        assert code == EX_OK and "messages," not in tty and "\r" not in tty.replace("\r\n", ""), tty
        return
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK
    assert "\r" not in res.stderr and "\x1b" not in res.stderr and "messages," not in res.stderr


# --------------------------------------------------------------------------
# root beside another user's state


def nobody_setup(workdir, *servers):
    """Configurations, state and save directories, all nobody's."""
    configs = []
    for i, server in enumerate(servers):
        save = workdir / f"save{i}"
        save.mkdir()
        configs.append({"id": f"m{i}", "server": server.host, "port": server.port,
                        "tls": "none", "user": server.user, "password": server.password,
                        "save_directory": str(save), "timeouts": {"connect": "5s"}})
    return nobody_confdir(workdir, *configs), configs


def owners(path):
    return {(p.relative_to(path), p.stat().st_uid) for p in Path(path).rglob("*")}


def test_root_refuses_to_write_in_another_users_state(fake_pop3, workdir, run_popfetchd,
                                                      popfetchd_bin):
    server = fake_pop3(mailgen.generate(2, 2000, seed=9))
    cd, configs = nobody_setup(workdir, server)
    before = owners(cd.state_directory)

    res = run_popfetchd(["receive-all", "m0"], confdir=cd)

    assert res.returncode == EX_IOERR
    assert f"state directory {cd.state_directory} belongs to nobody" in res.stderr
    assert "runuser -u nobody -- popfetchd" in res.stderr
    assert owners(cd.state_directory) == before, "nothing created as root"
    assert server.sessions == [] and folders(configs[0]["save_directory"]) == []
    for args in (["receive", "m0"], ["test", "m0"]):
        assert run_popfetchd(args, confdir=cd).returncode == EX_IOERR, args
    assert owners(cd.state_directory) == before

    # the daemon's user itself reads and writes all of it
    proc = subprocess.run(["runuser", "-u", "nobody", "--", popfetchd_bin, "-c", str(cd),
                           "receive-all", "--all"], capture_output=True, text=True, timeout=60,
                          env=_popfetchd_env({}))
    assert proc.returncode == EX_OK, proc.stderr
    assert not any(m in proc.stderr for m in SANITIZER_MARKERS), proc.stderr
    assert len(folders(configs[0]["save_directory"])) == 2
    assert {uid for _, uid in owners(cd.state_directory)} == {NOBODY}


def test_root_refuses_a_configuration_whose_state_is_another_users(
        fake_pop3, fake_config, confdir, run_popfetchd):
    servers = [fake_pop3(mailgen.generate(1, 2000, seed=i)) for i in range(2)]
    cd = confdir(fake_config(servers[0], id="mine"), fake_config(servers[1], id="theirs"))
    theirs = cd.state_directory / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)

    res = run_popfetchd(["receive-all", "--all", "--json"], confdir=cd)

    assert res.returncode == EX_IOERR
    codes = {r["configuration"]: r["exit_code"] for r in res.json()["results"]}
    assert codes == {"mine": EX_OK, "theirs": EX_IOERR}
    assert list(theirs.iterdir()) == [] and servers[1].sessions == []
    assert "popfetchd: theirs: the state directory" in res.stderr
