"""Crash and durability, proven (DESIGN.md §3 "what is written" and the State
paragraph, §4 "nothing lost"; README "How nothing lost works", "State").

1. Kill loops: `receive-all`, then the daemon, SIGKILLed at random moments
   (and right after the first folder appears) while fetching a few hundred
   realistic messages from the real Dovecot, restarted until the mailbox is
   empty. Then every message is saved exactly once (by Message-ID, and
   message.eml byte for byte), every folder is complete, and one more clean
   run leaves no staging behind. The delays come from a seeded generator:
   PFD_CRASH_SEED=N replays a loop's choices (the seed is printed).
   And a SIGKILL at each step of a message's commit, not by chance: strace
   holds popfetchd at the entry of one system call (inject=...:delay_enter)
   and the state of the disk is checked before the kill.
2. Disk faults injected at the syscalls: strace's fault injection where a
   call can be picked by its number or its exact path (the UIDL state, the
   folder rename, save_directory), and tests/tools/faultfs.c (LD_PRELOAD)
   where it must be picked by a path nobody knows in advance (a message's
   staging folder, one configuration's save directory in a daemon). Each
   fault: exit 74, no DELE for the message it hit, nothing partial visible,
   and a clean run then saves everything exactly once.
3. A damaged UIDL state (truncated, garbage, noise, wrong header, empty, a
   directory): no crash, a warning naming the file, at worst a re-download.
4. Two processes on one configuration never fetch the same message.

test_storage.py has the single-kill, stale-staging, damaged-state and lock
basics; this file goes further.
"""

import collections
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import fakepop3
import mailgen
from conftest import SANITIZER_MARKERS, _popfetchd_env, read_saved_messages
from daemonutil import daemon, wait_for  # noqa: F401  (daemon: a fixture)
from fakepop3 import Trickle
from test_receive import EX_IOERR, EX_OK, EX_TEMPFAIL, assert_saved_exactly, fake_expected, \
    folder_hash

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("PFD_CRASH_SEED") or 20261126)
LOCK_LINE = "another popfetchd process is working on this configuration"


# --------------------------------------------------------------------------
# helpers


def report(capsys, text):
    """A figure for the reader of the test run (shown even without -s)."""
    with capsys.disabled():
        print(f"\n[test_crash] {text}")


def start(popfetchd_bin, confdir, *args, env=None):
    return subprocess.Popen([popfetchd_bin, "-c", str(confdir), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, errors="replace",
                            env=_popfetchd_env(env))


def check_no_sanitizer_report(text, what):
    for marker in SANITIZER_MARKERS:
        assert marker not in text, f"sanitizer report ({marker}) in {what}:\n{text}"


def folder_count(save_dir):
    """How many message folders save_dir holds."""
    return sum(1 for e in os.scandir(save_dir) if not e.name.startswith("."))


def wait_for_new_folder(save_dir, before, proc=None, timeout=10):
    """Return as soon as save_dir holds more than `before` message folders
    (or proc has ended, or the time is up). The directory's link count,
    cheap to poll, says when to look."""
    end = time.monotonic() + timeout
    links = os.stat(save_dir).st_nlink
    while time.monotonic() < end and (proc is None or proc.poll() is None):
        now = os.stat(save_dir).st_nlink
        if now != links:
            links = now
            if folder_count(save_dir) > before:
                return True
        time.sleep(0.0005)
    return False


def stage_entries(save_dir, config_id):
    """What is left in save_directory/.tmp/ID."""
    stage = Path(save_dir) / ".tmp" / config_id
    return sorted(p.name for p in stage.iterdir()) if stage.exists() else []


def assert_folder_complete(saved, config_id):
    """One folder as a consumer may see it: message.eml and a parseable
    meta.json that describe each other, the listed text files, the listed
    attachments with their size and sha256, and nothing else."""
    path, meta = saved.path, saved.meta
    assert saved.eml is not None, f"{path}: no message.eml"
    assert isinstance(meta, dict), f"{path}: no meta.json"
    assert meta["configuration"] == config_id, path
    assert saved.hash12 == folder_hash(config_id, meta["uidl"]), f"{path}: name != uidl"
    assert meta["size"] == len(saved.eml), f"{path}: meta.json size != message.eml"
    want = {"message.eml", "meta.json", *meta["text"]}
    want |= {f"attachments/{a['name']}" for a in meta["attachments"]}
    have = {str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()}
    assert have == want, f"{path}: files {sorted(have)} != listed {sorted(want)}"
    for name in meta["text"]:
        (path / name).read_bytes().decode("utf-8")
    for a in meta["attachments"]:
        data = (path / "attachments" / a["name"]).read_bytes()
        assert len(data) == a["size"], f"{path}/attachments/{a['name']}: size"
        assert hashlib.sha256(data).hexdigest() == a["sha256"], \
            f"{path}/attachments/{a['name']}: sha256"


def audit(save_dir, config_id):
    """Every message folder of save_dir, each checked complete."""
    saved = read_saved_messages(save_dir)
    for s in saved:
        assert_folder_complete(s, config_id)
    return saved


def tally(saved, generated):
    """Match folders against the generated messages by Message-ID and by
    message.eml bytes. -> (lost, duplicated, strangers, wrong): Message-IDs
    never saved, {Message-ID: folders} saved more than once, folders of no
    generated message, folders whose message.eml is not what was delivered."""
    expected = {m.message_id.strip("<>"): mailgen.to_crlf(m.data) for m in generated}
    by_id = collections.defaultdict(list)
    for s in saved:
        by_id[(s.meta.get("message_id") or "").strip("<>")].append(s)
    lost = sorted(set(expected) - set(by_id))
    duplicated = {mid: len(v) for mid, v in by_id.items() if len(v) > 1}
    strangers = [s.path for mid, v in by_id.items() if mid not in expected for s in v]
    wrong = [s.path for mid, v in by_id.items() if mid in expected for s in v
             if s.eml != expected[mid]]
    return lost, duplicated, strangers, wrong


def assert_attachments_match(saved, generated):
    """The decoded attachments are the generator's, byte for byte."""
    truth = {m.message_id.strip("<>"): sorted(hashlib.sha256(a.data).hexdigest()
                                              for a in m.attachments) for m in generated}
    with_att = 0
    for s in saved:
        got = sorted(a["sha256"] for a in s.meta["attachments"])
        assert got == truth[s.meta["message_id"].strip("<>")], f"{s.path}: attachments"
        with_att += bool(got)
    return with_att


def assert_clean_run_finds_nothing(run_popfetchd, cd, config_id, save_dir):
    """One more run: nothing new, nothing left in staging, and the state
    compacted to its header (the server is empty)."""
    res = run_popfetchd(["receive-all", config_id, "--json"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    assert res.json()["saved"] == [], "a message was saved again"
    assert stage_entries(save_dir, config_id) == [], "stale staging was not cleaned"
    lines = (Path(cd.state_directory) / config_id / "uidl").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("popfetchd-uidl "), lines


# --------------------------------------------------------------------------
# 1. kill loops against Dovecot


def test_receive_all_killed_at_random_moments(dovecot, mailbox, dovecot_config, confdir,
                                              popfetchd_bin, run_popfetchd, capsys):
    """300 messages (a fifth with attachments), `receive-all` SIGKILLed at
    random moments and right after a folder appears (inside a group commit's
    renames), restarted until the mailbox is empty: each message saved
    exactly once, every folder whole. Batches of 10: several per run."""
    rng = random.Random(SEED)
    generated = mailgen.generate_messages(300, 5000, seed=601)
    # in twelve deliveries, the next once the mailbox is empty: more kills
    batches = [generated[k:k + 25] for k in range(0, 300, 25)]
    config = dovecot_config(mailbox)
    cd = confdir(config, daemon={"commit_batch": 10})
    save = config["save_directory"]

    kills, runs, how_many = 0, 0, collections.Counter()
    deadline = time.monotonic() + 90
    while batches or mailbox.count() > 0:
        assert time.monotonic() < deadline, f"no end after {runs} runs (seed {SEED})"
        if mailbox.count() == 0:
            mailbox.deliver(*[m.data for m in batches.pop(0)])
        runs += 1
        # the first run, and some later ones: as soon as a folder appears;
        # the others mostly soon (a run of 25 takes ~0.05-0.1 s), some later
        r = rng.random()
        how = "after-first-folder" if runs == 1 or r < 0.2 else "random"
        delay = rng.uniform(0.0, 0.04) if r < 0.85 else rng.uniform(0.04, 0.3)
        before = folder_count(save)
        proc = start(popfetchd_bin, cd, "receive-all", "dv")
        if kills >= 80:
            proc.wait(60)  # enough: on a slow machine the loop must still end
        elif how == "after-first-folder":
            wait_for_new_folder(save, before, proc)
        else:
            try:
                proc.wait(delay)
            except subprocess.TimeoutExpired:
                pass
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            how_many[how] += 1
        out, err = proc.communicate(timeout=30)
        check_no_sanitizer_report(err, "receive-all")
        if not killed:
            assert proc.returncode == EX_OK, f"run {runs} (seed {SEED}): exit " \
                f"{proc.returncode}\n{err}"

    assert_clean_run_finds_nothing(run_popfetchd, cd, "dv", save)
    saved = audit(save, "dv")
    lost, duplicated, strangers, wrong = tally(saved, generated)
    with_att = assert_attachments_match(saved, generated)
    report(capsys, f"receive-all kill loop (PFD_CRASH_SEED={SEED}): {kills} kills "
                   f"({dict(how_many)}) in {runs} runs; {len(generated)} messages "
                   f"({with_att} with attachments), {len(saved)} folders; "
                   f"lost {len(lost)}, duplicated {len(duplicated)}")
    assert (lost, duplicated, strangers, wrong) == ([], {}, [], [])
    assert len({s.uidl for s in saved}) == len(saved) == len(generated)
    assert kills >= 15 and how_many["after-first-folder"] >= 1, \
        f"too few kills to prove anything: {kills} {dict(how_many)} (seed {SEED})"


def test_daemon_killed_at_random_moments(dovecot, mailbox, dovecot_config, confdir, daemon,
                                         run_popfetchd, capsys):
    """The daemon (poll_interval 1s) SIGKILLed at random moments, and right
    after a folder appears, while 150 messages arrive in batches; restarted
    each time, then stopped once the mailbox is empty."""
    rng = random.Random(SEED + 1)
    generated = mailgen.generate_messages(150, 5000, seed=602)
    batches = [generated[:90]] + [generated[k:k + 15] for k in range(90, 150, 15)]
    mailbox.deliver(*[m.data for m in batches.pop(0)])
    config = dovecot_config(mailbox, poll_interval="1s")
    cd = confdir(config)
    save = config["save_directory"]

    kills, how_many, outputs, mid_poll = 0, collections.Counter(), [], 0
    while kills < 14 and (batches or mailbox.count() > 0):
        how = "after-first-folder" if kills == 0 or rng.random() < 0.4 else "random"
        before = folder_count(save)
        d = daemon(cd)
        if how == "after-first-folder":
            if not wait_for_new_folder(save, before, timeout=3):
                how = "no-folder-within-3s"
            time.sleep(rng.uniform(0.0, 0.02))
        else:
            time.sleep(rng.uniform(0.0, 1.6))
        assert d.proc.poll() is None, f"the daemon exited by itself:\n{d.output}"
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        kills += 1
        how_many[how] += 1
        # it had saved some and the server still held mail: killed in a poll
        mid_poll += folder_count(save) > before and mailbox.count() > 0
        outputs.append(d.output)
        check_no_sanitizer_report(outputs[-1], "the daemon")
        if batches and kills % 3 == 0:
            mailbox.deliver(*[m.data for m in batches.pop(0)])  # mail arrives meanwhile
    while batches:
        mailbox.deliver(*[m.data for m in batches.pop(0)])

    d = daemon(cd)  # let it finish, then stop it the proper way
    wait_for(lambda: mailbox.count() == 0, 30, f"the mailbox emptied (seed {SEED})")
    time.sleep(0.2)
    assert d.stop() == EX_OK, d.output

    assert_clean_run_finds_nothing(run_popfetchd, cd, "dv", save)
    saved = audit(save, "dv")
    lost, duplicated, strangers, wrong = tally(saved, generated)
    assert_attachments_match(saved, generated)
    report(capsys, f"daemon kill loop (PFD_CRASH_SEED={SEED}): {kills} kills "
                   f"({dict(how_many)}; {mid_poll} in the middle of a poll); "
                   f"{len(generated)} messages, {len(saved)} folders; "
                   f"lost {len(lost)}, duplicated {len(duplicated)}")
    assert (lost, duplicated, strangers, wrong) == ([], {}, [], [])
    assert len({s.uidl for s in saved}) == len(saved) == len(generated)
    assert how_many["after-first-folder"] >= 1


def process_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def traced_child(strace_pid):
    try:
        with open(f"/proc/{strace_pid}/task/{strace_pid}/children") as f:
            kids = f.read().split()
    except FileNotFoundError:
        return None
    return int(kids[0]) if kids else None


# Where a message's commit can be cut (DESIGN.md §4, README "How nothing
# lost works"): popfetchd is held at the entry of one system call by strace
# (inject=SYSCALL:delay_enter), the state of the disk at that moment is
# checked, and it is SIGKILLed there. (id, strace options ({save},
# {state}), at the kill: (records in the state, folders visible, staging
# folders), the server has committed QUIT). KILL_POINTS commit one message
# at a time (commit_batch: 1); BATCH_KILL_POINTS the four as one batch. The
# staging folders are at least as many: a message's extraction runs on a
# worker while the session reads on, so the messages after the one being
# committed may be staged too (never more than those not renamed yet).
HOLD = "delay_enter=20000000"
BATCH_KILL_POINTS = [
    ("batch-sealed-nothing-synced",
     ["-e", "trace=syncfs", "-e", f"inject=syncfs:{HOLD}:when=1"], (0, 0, 4), False),
    ("batch-records-written-not-synced",
     ["-e", "trace=fdatasync", "-e", f"inject=fdatasync:{HOLD}:when=1"], (4, 0, 4), False),
    ("batch-two-of-four-renamed",
     ["-e", "trace=renameat2", "-e", f"inject=renameat2:{HOLD}:when=3"], (4, 2, 2), False),
    ("batch-renamed-save-directory-not-synced",
     ["-P", "{save}", "-e", "trace=fsync", "-e", f"inject=fsync:{HOLD}:when=1"], (4, 4, 0),
     False),
]
KILL_POINTS = [
    ("message-1-staged-nothing-recorded",
     ["-P", "{state}/uidl", "-e", "trace=openat", "-e", f"inject=openat:{HOLD}:when=2"],
     (0, 0, 1), False),
    ("message-2-staged-not-recorded",
     ["-P", "{state}/uidl", "-e", "trace=write", "-e", f"inject=write:{HOLD}:when=2"],
     (1, 1, 1), False),
    ("record-written-not-synced",
     ["-e", "trace=fdatasync", "-e", f"inject=fdatasync:{HOLD}:when=2"], (2, 1, 1), False),
    ("record-synced-folder-not-renamed",
     ["-e", "trace=renameat2", "-e", f"inject=renameat2:{HOLD}:when=2"], (2, 1, 1), False),
    ("folder-renamed-save-directory-not-synced",
     ["-P", "{save}", "-e", "trace=fsync", "-e", f"inject=fsync:{HOLD}:when=2"], (2, 2, 0),
     False),
    ("quit-committed-state-not-compacted",
     ["-P", "{state}/uidl.tmp", "-e", "trace=rename", "-e", f"inject=rename:{HOLD}:when=2"],
     (4, 4, 0), True),
]


@pytest.mark.parametrize("case, batch", [(c, 1) for c in KILL_POINTS] +
                         [(c, None) for c in BATCH_KILL_POINTS],
                         ids=[c[0] for c in KILL_POINTS + BATCH_KILL_POINTS])
def test_sigkill_at_each_step_of_a_commit(fake_pop3, fake_config, confdir, popfetchd_bin,
                                          run_popfetchd, read_saved, tmp_path, case, batch):
    """SIGKILL at a chosen step of a message's life, not by chance: the
    next run saves every message exactly once and deletes each only then."""
    name, options, (records, folders, staged), committed = case
    server = fake_pop3(fault_messages())
    expected = fake_expected(server)
    config = fake_config(server)
    cd = confdir(config, daemon={"commit_batch": batch} if batch else None)
    save, state = config["save_directory"], cd.state_directory / "fake"
    paths = {"save": save, "state": state}
    # strace prints each traced call at its entry, its result at its exit:
    # the held call is the last line, without its result
    log = tmp_path / "strace.log"
    when = int(re.search(r"when=(\d+)", " ".join(options)).group(1))
    cmd = ["strace", "-f", "-qq", "-o", str(log), *[o.format(**paths) for o in options],
           popfetchd_bin, "-c", str(cd), "receive-all", "fake"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=traced_env(), stdin=subprocess.DEVNULL)

    def now():
        lines = state.joinpath("uidl").read_text().splitlines() if state.joinpath(
            "uidl").exists() else []
        return (len(lines[1:]), folder_count(save), len(stage_entries(save, "fake")))
    def held():
        text = log.read_text(errors="replace") if log.exists() else ""
        return text.count("\n") == when - 1 and text and not text.endswith("\n")
    child = None
    try:
        end = time.monotonic() + 15
        while not held() and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.01)
        child = traced_child(proc.pid)
        assert held() and child, f"{name}: popfetchd was never held ({proc.poll()})"
        moment = now()
        assert moment[:2] == (records, folders) and staged <= moment[2] <= 4 - folders, \
            f"{name}: not the moment wanted: {moment}"
        # the kill is pending in popfetchd, held by strace; once strace is
        # gone it takes effect before the held call runs
        os.kill(child, signal.SIGKILL)
    finally:
        if child is not None:
            os.kill(child, signal.SIGKILL)
        proc.kill()
        check_no_sanitizer_report(proc.communicate(timeout=30)[1], "popfetchd under strace")
    wait_for(lambda: process_state(child) in (None, "Z", "X"), 10, "popfetchd gone")
    assert now() == moment, f"{name}: the held call ran: {now()} (held at {moment})"
    assert server.wait_idle()
    assert server.sessions[0].quit_ok == committed
    assert len(server.remaining()) == (0 if committed else 4)
    assert all(s.uidl for s in audit(save, "fake")), "a partial folder is visible"

    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    assert server.wait_idle() and server.remaining() == []
    assert_saved_exactly(read_saved(save), "fake", expected)
    assert stage_entries(save, "fake") == []
    saved_now = len(res.json()["saved"])
    assert saved_now == 4 - folders, f"{saved_now} saved again, {folders} were there"


# --------------------------------------------------------------------------
# 2. disk faults


@pytest.fixture(scope="session")
def faultfs(tmp_path_factory):
    """tests/tools/faultfs.c built as an LD_PRELOAD shim; its path."""
    out = tmp_path_factory.mktemp("faultfs") / "faultfs.so"
    src = ROOT / "tests" / "tools" / "faultfs.c"
    res = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(src),
                          "-ldl"], capture_output=True, text=True)
    assert res.returncode == 0, f"cannot build {src}:\n{res.stderr}"
    return str(out)


def traced_env():
    """popfetchd's environment under strace: LeakSanitizer cannot run under
    ptrace (it would fail every run of the ASan build), so leaks are left to
    the untraced runs."""
    env = {}
    if os.environ.get("ASAN_OPTIONS") is not None or "asan" in os.environ.get("POPFETCHD", ""):
        env["ASAN_OPTIONS"] = os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0"
    return _popfetchd_env(env)


def faultfs_env(shim, *rules):
    """The environment that makes popfetchd fail these calls
    (faultfs rules: OP:ERRNO:NTH:COUNT:GLOB)."""
    env = {"LD_PRELOAD": shim, "PFD_FAULTS": ";".join(rules)}
    if "asan" in os.environ.get("POPFETCHD", ""):
        env["ASAN_OPTIONS"] = os.environ.get("ASAN_OPTIONS", "") + ":verify_asan_link_order=0"
    return env


@pytest.fixture
def run_traced(popfetchd_bin, secret_registry, tmp_path):
    """Factory: run_traced(strace_args, args, confdir) -> (Result, strace log text):
    popfetchd under `strace -f` with these options (fault injection)."""
    from conftest import Result
    count = [0]

    def run(strace_args, args, confdir, timeout=60):
        count[0] += 1
        log = tmp_path / f"strace{count[0]}.log"
        cmd = ["strace", "-f", "-qq", "-o", str(log), *strace_args, popfetchd_bin, "-c",
               str(confdir), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=traced_env(), stdin=subprocess.DEVNULL,
                              errors="replace")
        res = Result(proc.returncode, proc.stdout, proc.stderr)
        res.cmd = cmd
        secret_registry.record(" ".join(cmd), proc.stdout + proc.stderr)
        print(res.describe())
        check_no_sanitizer_report(proc.stderr, "popfetchd under strace")
        return res, log.read_text(errors="replace") if log.exists() else ""
    return run


def fault_messages():
    """Four messages; the second has attachments (the one the faults hit)."""
    pool = mailgen.generate_messages(5, 3000, seed=71)
    mixed = next(m for m in pool if m.attachments)
    rest = [m for m in pool if m is not mixed]
    return [rest[0].data, mixed.data, rest[1].data, rest[2].data]


# (id, how, fault, the message it hits (1-based; None: before any), the
# words of the error, the hit message's folder is visible (renamed) after)
# how "strace": the fault is strace options, from {save} {stage} {state}
# how "shim": faultfs rules, {stage} and {hit} (the hash part of the name
# of the message's folder) filled in
DISK_FAULTS = [
    ("eml-write-enospc", "shim", ["write:ENOSPC:1:1:{stage}/*-{hit}.*/message.eml"], 2,
     "No space left on device", False),
    # message 2's commit: the flush of its files (one syncfs)
    ("syncfs-eio", "shim", ["syncfs:EIO:2:1:{save}"], 2, "Input/output error", False),
    ("attachment-write-enospc", "shim", ["write:ENOSPC:1:1:{stage}/*-{hit}.*/attachments/*"],
     2, "No space left on device", False),
    ("attachments-mkdir-eio", "shim", ["mkdir:EIO:1:1:{stage}/*-{hit}.*/attachments"], 2,
     "Input/output error", False),
    ("text-create-enospc", "shim", ["open:ENOSPC:1:1:{stage}/*-{hit}.*/text.txt"], 2,
     "No space left on device", False),
    ("meta-create-eio", "shim", ["open:EIO:1:1:{stage}/*-{hit}.*/meta.json"], 2,
     "Input/output error", False),
    ("meta-write-enospc", "shim", ["write:ENOSPC:1:1:{stage}/*-{hit}.*/meta.json"], 2,
     "No space left on device", False),
    ("staging-mkdir-eio", "shim", ["mkdir:EIO:1:1:{stage}/*-{hit}.*"], 2,
     "Input/output error", False),
    ("stage-dir-mkdir-eio", "shim", ["mkdir:EIO:1:1:{stage}"], None, "Input/output error",
     False),
    ("state-create-rename-eio", "strace",
     ["-P", "{state}/uidl.tmp", "-e", "trace=rename", "-e", "inject=rename:error=EIO:when=1"],
     None, "Input/output error", False),
    ("state-open-eio", "strace",
     ["-P", "{state}/uidl", "-e", "trace=openat", "-e", "inject=openat:error=EIO:when=2"], 1,
     "Input/output error", False),
    ("state-append-enospc", "strace",
     ["-P", "{state}/uidl", "-e", "trace=write", "-e", "inject=write:error=ENOSPC:when=2"], 2,
     "No space left on device", False),
    ("state-fdatasync-eio", "strace",
     ["-e", "trace=fdatasync", "-e", "inject=fdatasync:error=EIO:when=2"], 2,
     "Input/output error", False),
    ("folder-rename-eio", "strace",
     ["-e", "trace=renameat2", "-e", "inject=renameat2:error=EIO:when=2"], 2,
     "Input/output error", False),
    ("folder-rename-enospc", "strace",
     ["-e", "trace=renameat2", "-e", "inject=renameat2:error=ENOSPC:when=2"], 2,
     "No space left on device", False),
    # the rename happened: the folder is there, complete, but not durable
    ("save-dir-fsync-eio", "strace",
     ["-P", "{save}", "-e", "trace=fsync", "-e", "inject=fsync:error=EIO:when=2"], 2,
     "Input/output error", True),
]


# The same with the four messages in one batch (the default commit_batch):
# a fault in the batch's commit; hit = the first message not committed.
BATCH_DISK_FAULTS = [
    ("batch-syncfs-eio", "shim", ["syncfs:EIO:1:1:{save}"], 1, "Input/output error", False),
    ("batch-state-fdatasync-eio", "strace",
     ["-e", "trace=fdatasync", "-e", "inject=fdatasync:error=EIO:when=1"], 1,
     "Input/output error", False),
    ("batch-state-append-enospc", "strace",
     ["-P", "{state}/uidl", "-e", "trace=write", "-e", "inject=write:error=ENOSPC:when=1"], 1,
     "No space left on device", False),
    # messages 1 and 2 renamed, save_directory fsync'd: those two committed
    ("batch-third-rename-eio", "strace",
     ["-e", "trace=renameat2", "-e", "inject=renameat2:error=EIO:when=3"], 3,
     "Input/output error", False),
]


@pytest.mark.parametrize("case, batch", [(c, 1) for c in DISK_FAULTS] +
                         [(c, None) for c in BATCH_DISK_FAULTS],
                         ids=[c[0] for c in DISK_FAULTS + BATCH_DISK_FAULTS])
def test_disk_fault_loses_nothing(fake_pop3, fake_config, confdir, run_popfetchd, run_traced,
                                  faultfs, read_saved, case, batch):
    """One fault on the way of message 2 (or before the first): exit 74, no
    DELE for the message it hit, the messages before it committed, nothing
    partial visible; a clean run then saves everything exactly once."""
    name, how, fault, hit, words, visible = case
    server = fake_pop3(fault_messages())
    expected = fake_expected(server)
    uidls = [u for u, _ in expected]
    config = fake_config(server)
    cd = confdir(config, daemon={"commit_batch": batch} if batch else None)
    save = config["save_directory"]
    paths = {"save": save, "stage": f"{save}/.tmp/fake", "state": f"{cd.state_directory}/fake",
             "hit": folder_hash("fake", uidls[(hit or 1) - 1])}

    if how == "shim":
        rules = [r.format(**paths) for r in fault]
        res = run_popfetchd(["receive-all", "fake"], confdir=cd, env=faultfs_env(faultfs, *rules))
        fired = "faultfs: " in res.stderr
    else:
        res, log = run_traced([a.format(**paths) for a in fault], ["receive-all", "fake"], cd)
        fired = "(INJECTED)" in log
    assert fired, f"{name}: the fault never fired\n{res.describe()}"
    assert res.returncode == EX_IOERR, res.describe()
    assert words in res.stderr, res.describe()
    assert server.wait_idle()
    committed = 0 if hit is None else hit - 1
    deleted = sorted(int(c.split()[1]) for c in server.commands() if c.startswith("DELE"))
    assert deleted == list(range(1, committed + 1)), f"DELE sent for {deleted}"
    if hit is not None:
        assert server.sessions[0].quit_ok, "what is durable must be committed with QUIT"
    assert server.uidls() == uidls[committed:], "the server lost mail it should keep"
    # nothing partial: every visible folder complete; only what was saved
    shown = audit(save, "fake")
    assert sorted(s.uidl for s in shown) == sorted(uidls[:committed + visible])

    server.clear_faults()
    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    assert server.wait_idle()
    assert server.remaining() == []
    assert_saved_exactly(read_saved(save), "fake", expected)
    audit(save, "fake")
    assert stage_entries(save, "fake") == [], "staging left behind"


def test_unsynced_folder_is_not_deleted_before_save_directory_is_synced(
        fake_pop3, fake_config, confdir, run_popfetchd, run_traced, read_saved):
    """The fsync of save_directory after message 2's rename fails: its folder
    is visible but perhaps not durable. While save_directory cannot be
    fsync'd, no later run may take that message for saved and DELE it."""
    server = fake_pop3(fault_messages())
    expected = fake_expected(server)
    uidls = [u for u, _ in expected]
    config = fake_config(server)
    cd = confdir(config, daemon={"commit_batch": 1})
    save = config["save_directory"]
    fsync_save = ["-P", save, "-e", "trace=fsync", "-e", "inject=fsync:error=EIO:when={}"]

    res, log = run_traced([a.format(2) for a in fsync_save], ["receive-all", "fake"], cd)
    assert "(INJECTED)" in log and res.returncode == EX_IOERR, res.describe()
    assert server.wait_idle() and server.uidls() == uidls[1:]

    # save_directory still cannot be synced: message 2 must stay on the server
    res, log = run_traced([a.format("1+") for a in fsync_save], ["receive-all", "fake"], cd)
    assert "(INJECTED)" in log, res.describe()
    assert res.returncode == EX_IOERR, res.describe()
    assert server.wait_idle()
    assert not any(c.startswith("DELE") for i in range(1, len(server.sessions))
                   for c in server.commands(i)), "a message went before it was durable"
    assert server.uidls() == uidls[1:]

    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    assert server.wait_idle() and server.remaining() == []
    assert_saved_exactly(read_saved(save), "fake", expected)


@pytest.mark.parametrize("record", ["current", "previous-version"])
def test_recovered_record_without_its_folder_is_received_again(
        fake_pop3, fake_config, confdir, run_popfetchd, read_saved, record):
    """A crash between the records and the renames, then the staging is
    cleaned (or save_directory changed): the records remain, the staging
    folders are gone, and the folders they name are nowhere. Those messages
    are not received: they are fetched again, saved, and only then deleted;
    none is deleted while it is on disk nowhere. A record of the previous
    version names no folder: nothing proves its rename, so the same."""
    server = fake_pop3(fault_messages())
    expected = fake_expected(server)
    uidls = [u for u, _ in expected]
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    save = Path(config["save_directory"])
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    names = {s.uidl: s.path.name for s in read_saved(save)}
    shutil.rmtree(save)  # the staging cleaned, the folders gone with it

    state = cd.state_directory / "fake" / "uidl"
    header = state.read_text().splitlines()[0]
    lines = [header]
    for i, u in enumerate(uidls):
        stage = f"{names[u]}.77.{i}"
        if i >= 2:
            lines.append(u)  # committed before the crash
        elif record == "current":
            lines.append(f"{u} {stage} {names[u]}")
        else:
            lines.append(f"{u} {stage}")
    state.write_text("\n".join(lines) + "\n")
    config["remove_after_read"] = True
    cd.add(config)

    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    doc = res.json()
    assert [s["uidl"] for s in doc["saved"]] == uidls[:2], "not fetched again"
    assert server.wait_idle() and server.remaining() == []
    commands = server.commands(1)
    for num in (1, 2):
        assert commands.index(f"RETR {num}") < commands.index(f"DELE {num}"), commands
    assert_saved_exactly(read_saved(save), "fake", expected[:2])


def test_failed_compaction_is_an_io_error(fake_pop3, fake_config, confdir, run_traced,
                                          run_popfetchd, read_saved):
    """After QUIT the state is rewritten to what is left on the server; if
    that fails (the state is not writable: DESIGN.md §2, exit 74) nothing is
    lost and nothing is saved twice, and the run says so."""
    server = fake_pop3(fault_messages())
    expected = fake_expected(server)
    config = fake_config(server)
    cd = confdir(config)
    state = f"{cd.state_directory}/fake"
    # rename #1 creates the state at the start, #2 is the compaction
    res, log = run_traced(["-P", f"{state}/uidl.tmp", "-e", "trace=rename", "-e",
                           "inject=rename:error=EIO:when=2"], ["receive-all", "fake"], cd)
    assert "(INJECTED)" in log, res.describe()
    assert server.wait_idle() and server.remaining() == []
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert f"{state}/uidl.tmp" in res.stderr, res.describe()
    res2 = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert (res2.returncode, res2.json()["saved"]) == (EX_OK, [])
    assert res.returncode == EX_IOERR, \
        f"the state could not be written, yet exit {res.returncode}\n{res.describe()}"


@pytest.mark.parametrize("fault", ["enospc-everywhere", "save-dir-fsync-eio", "staging-mkdir-eio"])
def test_daemon_keeps_serving_the_healthy_configuration(fake_pop3, fake_config, confdir, daemon,
                                                        faultfs, read_saved, fault):
    """Two configurations in one daemon; the disk fails under one of them
    only (faultfs keyed on its save directory). The daemon keeps running and
    keeps serving the other; the sick one deletes nothing it did not save,
    shows nothing partial, and catches up once the disk is well."""
    sick = fake_pop3([m.data for m in mailgen.generate_messages(4, 3000, seed=81)])
    well = fake_pop3([m.data for m in mailgen.generate_messages(3, 3000, seed=82)])
    sick_expected = fake_expected(sick)
    cs = fake_config(sick, id="sick", poll_interval="1s")
    cw = fake_config(well, id="well", poll_interval="1s")
    cd = confdir(cs, cw)
    s_save, w_save = cs["save_directory"], cw["save_directory"]
    rule = {"enospc-everywhere": f"write:ENOSPC:1:0:{s_save}/*",
            "save-dir-fsync-eio": f"fsync:EIO:1:0:{s_save}",
            "staging-mkdir-eio": f"mkdir:EIO:1:0:{s_save}/.tmp/sick/*"}[fault]

    d = daemon(cd, env=faultfs_env(faultfs, rule))
    d.wait_ready()
    later = mailgen.generate_messages(6, 3000, seed=83)
    for m in later:  # the healthy one keeps getting mail, and keeps fetching it
        time.sleep(0.5)
        well.add(m.data)
    wait_for(lambda: not well.remaining(), 15, "the healthy configuration served")
    wait_for(lambda: "faultfs: " in d.output, 10, "the fault to fire")
    assert d.proc.poll() is None, f"the daemon died:\n{d.output}"
    assert re.search(r"sick: .*(No space left on device|Input/output error)", d.output), d.output
    assert not re.search(r"well: .*poll failed", d.output), d.output
    assert any("last error: sick:" in f["STATUS"] for f in d.notify.fields("STATUS")), \
        d.notify.fields("STATUS")
    assert d.stop() == EX_OK, d.output

    well_saved = audit(w_save, "well")
    assert len(well_saved) == 9 and len({s.uidl for s in well_saved}) == 9
    # the sick one: only complete folders, and the server kept all it did not
    # save (a batch renamed before its directory fsync failed stays there)
    shown = audit(s_save, "sick")
    assert len(shown) <= 4
    deleted = [c for i in range(len(sick.sessions)) for c in sick.commands(i)
               if c.startswith("DELE")]
    assert deleted == [] and len(sick.remaining()) == 4, deleted

    d = daemon(cd)  # the disk is well again
    wait_for(lambda: not sick.remaining(), 15, "the sick configuration catching up")
    assert d.stop() == EX_OK, d.output
    assert_saved_exactly(read_saved(s_save), "sick", sick_expected)
    assert stage_entries(s_save, "sick") == []


# --------------------------------------------------------------------------
# 3. a damaged UIDL state


def _noise(n, seed):
    r = random.Random(seed)
    return bytes(r.randrange(256) for _ in range(n))


def _cut_in(text, record, offset):
    """text cut `offset` bytes into record `record` (0-based, after the header)."""
    lines = text.split(b"\n")
    return b"\n".join(lines[:record + 1]) + b"\n" + lines[record + 1][:offset]


# (id, damage(text) -> bytes, records (0-based) whose message is saved again
# (None: all), a warning about damage expected)
STATE_DAMAGE = [
    ("truncated-in-header", lambda t: t[:10], None, True),
    ("truncated-after-header", lambda t: t[:t.index(b"\n") + 1], None, False),
    ("truncated-in-record-3", lambda t: _cut_in(t, 2, 9), [2, 3, 4, 5], True),
    ("truncated-in-stage-name", lambda t: _cut_in(t, 4, 30), [4, 5], True),
    ("truncated-last-newline", lambda t: t[:-1], [5], True),
    ("truncated-at-record-boundary", lambda t: b"\n".join(t.split(b"\n")[:4]) + b"\n",
     [3, 4, 5], False),
    ("garbage-appended", lambda t: t + b"\x00\xff\xfe not a record \x01\n\tjunk\njunk-no-eol",
     [], True),
    ("binary-noise-appended", lambda t: t + _noise(300, 1), [], True),
    ("binary-noise-instead", lambda t: _noise(300, 2), None, True),
    ("nul-inside-a-record", lambda t: t.replace(b"fake-0001", b"fake\x000001"), [1], True),
    ("header-missing", lambda t: t[t.index(b"\n") + 1:], None, True),
    ("header-other-version", lambda t: t.replace(b"popfetchd-uidl 1 ", b"popfetchd-uidl 9 ", 1),
     None, True),
    ("header-garbled", lambda t: t.replace(b"popfetchd-uidl 1 ", b"popfetchd-uidl 1 zz", 1),
     None, True),
    ("zero-length", lambda t: b"", None, True),
]


@pytest.mark.parametrize("case", STATE_DAMAGE, ids=[c[0] for c in STATE_DAMAGE])
def test_damaged_state_is_reported_and_repaired(fake_pop3, fake_config, confdir, run_popfetchd,
                                                read_saved, case):
    """Six messages kept on the server, recorded in the state; the state is
    damaged. No crash; a warning that names the state file whenever the
    damage can be seen; only the messages whose records were destroyed are
    saved again (DESIGN.md §3: "at worst a re-download" — a second folder of
    such a message, since nothing else tells popfetchd it has one: a scan of
    save_directory by folder hash was removed because it deleted another
    mailbox's mail unsaved), never one whose record survived, never a loss;
    and the file is repaired: the run after saves nothing."""
    name, damage, again, warned = case
    server = fake_pop3(mailgen.generate(6, 2500, seed=91))
    expected = fake_expected(server)
    uidls = [u for u, _ in expected]
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    state = cd.state_directory / "fake" / "uidl"
    text = state.read_bytes()
    assert [l.split(b" ")[0] for l in text.splitlines()[1:]] == [u.encode() for u in uidls]
    state.write_bytes(damage(text))

    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    want = uidls if again is None else [uidls[i] for i in again]
    assert sorted(s["uidl"] for s in res.json()["saved"]) == sorted(want), res.describe()
    if warned:
        warning = rf"fake: the UIDL state {re.escape(str(state))} (is|has) .*(damaged|empty)"
        assert re.search(warning, res.stderr), f"no warning naming the file\n{res.describe()}"
    saved = audit(config["save_directory"], "fake")
    counts = collections.Counter(s.uidl for s in saved)
    assert {u: counts[u] for u in uidls} == {u: 1 + (u in want) for u in uidls}
    assert server.uidls() == uidls, "the server lost mail"

    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert (res.returncode, res.json()["saved"]) == (EX_OK, []), res.describe()
    assert "damaged" not in res.stderr and "empty" not in res.stderr, "not repaired"


def test_state_of_another_binding_is_a_notice_not_damage(fake_pop3, fake_config, confdir,
                                                         run_popfetchd):
    """A well-formed header of another server or user: the state starts
    afresh (DESIGN.md §3) with a notice naming the file."""
    server = fake_pop3(mailgen.generate(2, 2500, seed=92))
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    state = cd.state_directory / "fake" / "uidl"
    lines = state.read_text().split("\n")
    lines[0] = "popfetchd-uidl 1 " + "0" * 64
    state.write_text("\n".join(lines))
    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_OK and len(res.json()["saved"]) == 2, res.describe()
    assert f"server or user changed: starting a fresh UIDL state in {state}" in res.stderr
    assert "damaged" not in res.stderr


def test_directory_in_place_of_the_state(fake_pop3, fake_config, confdir, run_popfetchd,
                                         read_saved):
    """A directory where the state file belongs: exit 74 with a line naming
    it, nothing fetched or deleted (popfetchd does not remove what it did not
    make); once it is gone, all is well."""
    server = fake_pop3(mailgen.generate(2, 2500, seed=93))
    expected = fake_expected(server)
    config = fake_config(server)
    cd = confdir(config)
    state = cd.state_directory / "fake" / "uidl"
    (state / "something").mkdir(parents=True)
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_IOERR, res.describe()
    assert str(state) in res.stderr and "Is a directory" in res.stderr, res.describe()
    assert not any(c.startswith(("RETR", "DELE")) for c in server.commands())
    assert len(server.remaining()) == 2 and read_saved(config["save_directory"]) == []
    (state / "something").rmdir()
    state.rmdir()
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)


# --------------------------------------------------------------------------
# 4. two processes on one configuration


@pytest.fixture
def retr_log(monkeypatch):
    """Every RETR the fake servers answer, as (port, session, uidl, time).
    The fake servers stop locking the maildrop ([IN-USE]): two sessions at
    once are served, so only popfetchd's own lock keeps them apart."""
    log, lock = [], threading.Lock()
    orig_retr, orig_login = fakepop3._GoodSession.cmd_RETR, fakepop3._GoodSession._login

    def cmd_retr(self, arg):
        n, m = self._message(arg)
        if n is not None:
            with lock:
                log.append((self.srv.port, self.rec.index, m.uidl, time.monotonic()))
        return orig_retr(self, arg)

    def login(self, user):
        with self.srv._lock:
            self.srv._locked_by = None
        return orig_login(self, user)
    monkeypatch.setattr(fakepop3._GoodSession, "cmd_RETR", cmd_retr)
    monkeypatch.setattr(fakepop3._GoodSession, "_login", login)
    return log


def assert_each_retrieved_once(log, server):
    by_uidl = collections.defaultdict(list)
    for port, session, uidl, _ in log:
        if port == server.port:
            by_uidl[uidl].append(session)
    twice = {u: s for u, s in by_uidl.items() if len(s) > 1}
    assert twice == {}, f"messages retrieved more than once (uidl: sessions): {twice}"
    return by_uidl


def test_two_receive_all_at_once(fake_pop3, fake_config, confdir, popfetchd_bin, retr_log,
                                 read_saved):
    """Two `receive-all` started together against a slow server, three times
    over: one fetches, the other exits 75 with a clear line and never
    connects; no message is retrieved by both."""
    server = fake_pop3()
    server.inject("RETR", Trickle(delay=0.05, chunk=1000), times=None)  # ~0.2 s a message
    config = fake_config(server, timeouts={"connect": "5s", "command": "10s"})
    cd = confdir(config)
    every = []
    for round_ in range(3):
        batch = mailgen.generate(3, 3000, seed=100 + round_)
        every += batch
        for data in batch:
            server.add(data)
        sessions = len(server.sessions)
        procs = [start(popfetchd_bin, cd, "receive-all", "fake") for _ in range(2)]
        results = [(p.wait(60), *p.communicate()) for p in procs]
        codes = sorted(code for code, _, _ in results)
        assert codes == [EX_OK, EX_TEMPFAIL], results
        loser = next(err for code, _, err in results if code == EX_TEMPFAIL)
        assert LOCK_LINE in loser, loser
        assert len(server.sessions) == sessions + 1, "the second process connected too"
        assert server.wait_idle() and server.remaining() == []
    assert len(assert_each_retrieved_once(retr_log, server)) == 9
    saved = audit(config["save_directory"], "fake")
    assert sorted(s.eml for s in saved) == sorted(mailgen.to_crlf(m) for m in every)


def test_receive_all_beside_a_running_daemon(fake_pop3, fake_config, confdir, daemon,
                                             popfetchd_bin, run_popfetchd, retr_log, read_saved):
    """The daemon polls a slow server every second while `receive-all` runs
    again and again beside it and mail keeps coming: each run either fetches
    (the daemon is idle) or exits 75 with a clear line; a poll that finds a
    receive-all at work waits for its next turn; no message is retrieved by
    both."""
    server = fake_pop3()
    server.inject("RETR", Trickle(delay=0.05, chunk=1000), times=None)
    config = fake_config(server, poll_interval="1s",
                         timeouts={"connect": "5s", "command": "10s"})
    cd = confdir(config)
    every = mailgen.generate(24, 3000, seed=110)
    d = daemon(cd)
    d.wait_ready()

    # 1. the daemon in a session: receive-all stands aside
    for data in every[:4]:
        server.add(data)
    wait_for(lambda: any(p == server.port for p, *_ in retr_log), 10, "the daemon's first RETR")
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_TEMPFAIL and LOCK_LINE in res.stderr, res.describe()
    wait_for(lambda: not server.remaining(), 15, "the daemon's poll")

    # 2. a long receive-all right after the daemon's poll (its next is 1 s
    # away): the daemon's polls meanwhile stand aside
    for data in every[4:16]:
        server.add(data)
    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)  # ~2.5 s
    assert res.returncode == EX_OK and len(res.json()["saved"]) == 12, res.describe()
    assert LOCK_LINE in d.output, f"no poll of the daemon met the lock\n{d.output}"

    # 3. both at random beside new mail
    codes = collections.Counter()
    rng = random.Random(SEED + 2)
    for data in every[16:]:
        server.add(data)
        time.sleep(rng.uniform(0.0, 0.4))
        res = run_popfetchd(["receive-all", "fake"], confdir=cd)
        codes[res.returncode] += 1
        assert res.returncode in (EX_OK, EX_TEMPFAIL), res.describe()
        if res.returncode == EX_TEMPFAIL:
            assert LOCK_LINE in res.stderr, res.describe()
    wait_for(lambda: not server.remaining(), 15, "everything fetched")
    time.sleep(0.3)
    assert d.proc.poll() is None, d.output
    assert d.stop() == EX_OK, d.output
    print("receive-all beside the daemon:", dict(codes))

    assert len(assert_each_retrieved_once(retr_log, server)) == len(every)
    saved = audit(config["save_directory"], "fake")
    assert sorted(s.eml for s in saved) == sorted(mailgen.to_crlf(m) for m in every)
    assert len({s.uidl for s in saved}) == len(saved) == len(every)
