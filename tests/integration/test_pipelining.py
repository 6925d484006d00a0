"""RFC 2449 PIPELINING and group commit (DESIGN.md §4, README "Performance").

With a server that lists PIPELINING, popfetchd keeps a window of RETRs in
flight (at most 16, and at most 4 MiB as LIST counts beyond the first) and
sends the DELEs of committed messages behind them; QUIT goes out alone. A
server that does not list it is asked one command at a time. Messages are
made durable per batch: one syncfs, one state fdatasync, one fsync of
save_directory for up to commit_batch messages, 32 MiB, or 1 s."""

import re
from pathlib import Path

import pytest

import mailgen
from test_crash import run_traced  # noqa: F401  (a fixture)
from test_receive import EX_OK, assert_saved_exactly, fake_expected

RETR_WINDOW = 16


def pipelined(server, verb):
    """For each command `verb` the server read: how many of the same verb
    were already waiting behind it."""
    return [sum(w.startswith(verb) for w in waiting)
            for line, waiting in server.sessions[0].ahead if line.startswith(verb)]


def small(n, seed):
    return [m.data for m in mailgen.generate_messages(n, 3000, seed=seed)]


def test_retr_and_dele_are_pipelined_when_offered(fake_pop3, fake_config, confdir,
                                                  run_popfetchd, read_saved):
    server = fake_pop3(small(40, seed=901))
    expected = fake_expected(server)
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config, daemon={
        "commit_batch": 10}))
    assert res.returncode == EX_OK, res.describe()
    assert server.wait_idle() and server.remaining() == []
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    retr = pipelined(server, "RETR")
    assert max(retr) == RETR_WINDOW - 1, f"RETRs waiting behind each RETR: {retr}"
    # DELEs went out while RETRs were still in flight, not all at the end
    order = server.commands()
    assert order.index("DELE 1") < order.index("RETR 40"), order
    # QUIT alone: nothing was waiting behind the command before it
    ahead = server.sessions[0].ahead
    assert ahead[-1][0] == "QUIT" and ahead[-2][1] == [], ahead[-2:]
    assert sorted(int(c.split()[1]) for c in order if c.startswith("DELE")) == \
        list(range(1, 41))


def test_one_command_at_a_time_without_pipelining(fake_pop3, fake_config, confdir,
                                                  run_popfetchd, read_saved):
    server = fake_pop3(small(20, seed=902), pipelining=False)
    expected = fake_expected(server)
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK, res.describe()
    assert server.wait_idle() and server.remaining() == []
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    waiting = [w for _, w in server.sessions[0].ahead if w]
    assert waiting == [], f"commands sent before the answer to the one before: {waiting}"


def test_window_is_bounded_by_bytes(fake_pop3, fake_config, confdir, run_popfetchd, read_saved):
    """Messages of about 1.2 MB: RETRs are pipelined, but those in flight
    together (the one being answered and those waiting behind it) never add
    up to more than 4 MiB as LIST counts them."""
    big = [m.data for m in mailgen.generate_messages(8, 1_200_000, seed=903)]
    server = fake_pop3(big)
    expected = fake_expected(server)
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK, res.describe()
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    size = {i + 1: len(data) for i, (_, data) in enumerate(expected)}
    flights = [[int(line.split()[1])] + [int(w.split()[1]) for w in waiting
                                          if w.startswith("RETR")]
               for line, waiting in server.sessions[0].ahead if line.startswith("RETR")]
    assert max(len(f) for f in flights) >= 2, f"never pipelined: {flights}"
    for f in flights:
        assert len(f) == 1 or sum(size[n] for n in f) <= 4 * 1024 * 1024, (f, size)


def syncfs_calls(log):
    return len(re.findall(r"\bsyncfs\(", log))


def renamed_per_syncfs(log):
    """The folders renamed after each syncfs of a strace log: one batch
    each, in order."""
    batches = []
    for line in log.splitlines():
        if re.search(r"\bsyncfs\(", line):
            batches.append(0)
        elif re.search(r"\brenameat2\(", line) and batches:
            batches[-1] += 1
    return batches


@pytest.mark.parametrize("batch, n, commits", [(4, 10, 3), (1, 5, 5), (None, 10, 1)],
                         ids=["batch-4", "batch-1", "default"])
def test_commits_per_batch_of_messages(fake_pop3, fake_config, confdir, run_traced, read_saved,
                                       batch, n, commits):
    """commit_batch bounds a batch: N messages take ceil(N / batch) flushes
    (syncfs) and as many state fdatasyncs and save_directory fsyncs."""
    server = fake_pop3(small(n, seed=904))
    expected = fake_expected(server)
    config = fake_config(server)
    cd = confdir(config, daemon={"commit_batch": batch} if batch else None)
    save = config["save_directory"]
    res, log = run_traced(["-y", "-e", "trace=syncfs,fdatasync,fsync"], ["receive-all", "fake"],
                          cd)
    assert res.returncode == EX_OK, res.describe()
    assert server.wait_idle() and server.remaining() == []
    assert_saved_exactly(read_saved(save), "fake", expected)
    assert syncfs_calls(log) == commits, log
    assert len(re.findall(r"\bfdatasync\(\d+<[^>]*/uidl>", log)) == commits, log
    # save_directory: once per batch, after its renames (and once when the
    # staging directory under it is first made)
    assert len(re.findall(rf"\bfsync\(\d+<{re.escape(save)}>\)", log)) - \
        len(re.findall(rf"\bfsync\(\d+<{re.escape(save)}/\.tmp>\)", log)) in \
        (commits, commits + 1), log


def test_a_batch_is_bounded_by_bytes(fake_pop3, fake_config, confdir, run_traced, read_saved):
    """40 messages of 1 MiB, commit_batch 1000, commit_interval 1h: the
    first batch ends with the message that takes it to 32 MiB, the rest is
    the second."""
    body = [m.data for m in mailgen.generate_messages(40, 1024 * 1024, seed=905)]
    server = fake_pop3(body)
    expected = fake_expected(server)
    config = fake_config(server, timeouts={"connect": "5s", "command": "30s"})
    cd = confdir(config, daemon={"commit_batch": 1000, "commit_interval": "1h"})
    res, log = run_traced(["-e", "trace=syncfs,renameat2"], ["receive-all", "fake"], cd,
                          timeout=120)
    assert res.returncode == EX_OK, res.describe()
    assert server.wait_idle() and server.remaining() == []
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    # the folders renamed after each syncfs: one batch each, in message order
    batches = renamed_per_syncfs(log)
    sizes = [len(data) for _, data in expected]
    first = next(k for k in range(1, 41) if sum(sizes[:k]) >= 32 * 1024 * 1024)
    assert batches == [first, 40 - first], batches


def test_session_reads_on_while_a_batch_commits(fake_pop3, fake_config, confdir, run_traced,
                                                 read_saved):
    """A batch's commit runs on a worker while the session reads on into a
    new batch. One command at a time, commit_batch 4, each syncfs held
    0.5 s (strace): the four RETRs of the second batch are answered (each
    RETR goes out once the one before is read) before the first batch's
    DELEs go out. And no DELE comes before its message's folder is in
    save_directory and its UIDL in the state."""
    where, early = {}, []

    def check_durable(session, line):
        if line.startswith("DELE ") and where:
            n = int(line.split()[1])
            uidl = where["uidls"][n - 1]
            records = where["state"].read_text().splitlines()[1:]
            folders = [p for p in Path(where["save"]).iterdir() if p.name != ".tmp"]
            if not any(r.split(" ")[0] == uidl for r in records) or len(folders) < n:
                early.append((line, len(folders), records))
        return None

    server = fake_pop3(small(8, seed=906), pipelining=False, hook=check_durable)
    expected = fake_expected(server)
    config = fake_config(server)
    cd = confdir(config, daemon={"commit_batch": 4, "commit_interval": "1h"})
    where.update(uidls=[u for u, _ in expected], save=config["save_directory"],
                 state=Path(cd.state_directory) / "fake" / "uidl")
    res, log = run_traced(["-e", "trace=syncfs", "-e", "inject=syncfs:delay_enter=500000"],
                          ["receive-all", "fake"], cd)
    assert res.returncode == EX_OK, res.describe()
    assert server.wait_idle() and server.remaining() == []
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert syncfs_calls(log) == 2, log
    order = server.commands()
    assert order.index("RETR 8") < order.index("DELE 1"), order
    assert early == [], early


def test_a_due_batch_keeps_its_bound(fake_pop3, fake_config, confdir, run_traced, read_saved):
    """commit_batch 1 with each syncfs held 0.3 s (strace): while message
    1's commit runs, message 2 fills the next batch and message 3 is sealed
    too; message 3 waits for a batch of its own: 5 messages, 5 syncfs, one
    folder renamed after each."""
    server = fake_pop3(small(5, seed=907))
    expected = fake_expected(server)
    config = fake_config(server)
    cd = confdir(config, daemon={"commit_batch": 1, "commit_interval": "1h"})
    res, log = run_traced(["-e", "trace=syncfs,renameat2", "-e",
                           "inject=syncfs:delay_enter=300000"], ["receive-all", "fake"], cd)
    assert res.returncode == EX_OK, res.describe()
    assert server.wait_idle() and server.remaining() == []
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    batches = renamed_per_syncfs(log)
    assert batches == [1, 1, 1, 1, 1], log
