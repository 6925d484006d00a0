"""Storage and durability rules (DESIGN.md §3, §4) that need a crash, a
stalled server or a second process: a kill mid-session, a folder that was
renamed but never recorded, staging leftovers, the lock, timeouts, limits,
save flags, and `check`."""

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import mailgen
from fakepop3 import Reply, Stall, Trickle
from test_receive import (EX_CONFIG, EX_IOERR, EX_OK, EX_PROTOCOL, EX_TEMPFAIL,
                          assert_no_staging_leftovers, assert_saved_exactly, fake_expected)

ROOT = Path(__file__).resolve().parents[2]


def start_popfetchd(popfetchd_bin, confdir, *args):
    return subprocess.Popen([popfetchd_bin, "-c", str(confdir.path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)


def wait_for(predicate, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# a message larger than what popfetchd keeps in memory until it is sealed
# (4 MiB): it is streamed into its staging folder as it comes
BIG = (b"From: Big Sender <big@example.org>\r\nTo: x@example.net\r\n"
       b"Date: Sat, 05 Dec 2026 08:00:00 +0000\r\nMessage-ID: <big.41@example.org>\r\n"
       b"Subject: big\r\n\r\n" + b"".join(b"%075d\r\n" % i for i in range(70000)))


@pytest.mark.parametrize("size", ["small", "big"])
def test_killed_mid_session_loses_nothing(fake_pop3, fake_config, confdir, run_popfetchd,
                                          read_saved, popfetchd_bin, size):
    """Killed with message 3 half received: messages 1 and 2 (committed)
    are whole, nothing partial appears, and the next run saves everything
    once. A small message 3 was in memory only: nothing of it is on disk; a
    big one left its staging folder, removed by the next run."""
    messages = mailgen.generate(4, 5000, seed=41)
    if size == "big":
        messages[2] = BIG
    server = fake_pop3(messages)
    expected = fake_expected(server)
    # message 3 arrives in part, then the server goes quiet: the process is killed there
    part = len(expected[2][1]) * 9 // 10 if size == "big" else 2000
    server.inject("RETR 3", Stall(data=b"+OK\r\n" + expected[2][1][:part]))
    config = fake_config(server, timeouts={"connect": "5s", "command": "60s"})
    cd = confdir(config)

    proc = start_popfetchd(popfetchd_bin, cd, "receive-all", "fake")
    assert wait_for(lambda: server.sent("RETR 3")), "the session never reached RETR 3"
    # messages 1 and 2 wait in a batch while 3 trickles: the batch's time
    # bound (1 s) commits them, and only then are they deleted
    assert wait_for(lambda: len(read_saved(config["save_directory"])) == 2, timeout=5), \
        "the batch of messages 1 and 2 was not committed within its time bound"
    assert proc.poll() is None, "popfetchd ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)

    saved = read_saved(config["save_directory"])
    assert [s.uidl for s in saved] == [u for u, _ in expected[:2]], "only whole messages appear"
    staged = list((Path(config["save_directory"]) / ".tmp").rglob("message.eml"))
    if size == "big":
        assert staged, "the killed process left its partial message in staging (expected)"
    else:
        assert staged == [], "a message kept in memory left something on disk"
    # the deletions of messages 1 and 2 were never committed (no QUIT)
    assert len(server.remaining()) == 4

    server.clear_faults()
    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_OK
    assert server.wait_idle()
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert_no_staging_leftovers(config["save_directory"])
    doc = res.json()
    assert (len(doc["saved"]), doc["skipped"], doc["deleted"]) == (2, 2, 4)
    assert server.wait_idle()  # and the server has ended the session too
    assert server.remaining() == []


def test_record_of_an_interrupted_rename_is_settled(fake_pop3, fake_config, confdir,
                                                    run_popfetchd, read_saved):
    """The record is written just before the rename and names the staging
    folder and the folder it becomes. At the next start, a record counts as
    saved only when its staging folder is gone and its folder is in
    save_directory with its meta.json. A record whose staging folder is
    still there, whose folder is nowhere, or that names no folder (as an
    older version wrote them) means: received again."""
    server = fake_pop3(mailgen.generate(5, 3000, seed=42))
    expected = fake_expected(server)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    saved = read_saved(config["save_directory"])
    for folder in saved:
        shutil.rmtree(folder.path)  # the consumer took them all

    state = cd.state_directory / "fake" / "uidl"
    header = state.read_text().splitlines()[0]
    (u1, _), (u2, _), (u3, _), (u4, _), (u5, _) = expected
    stage = Path(config["save_directory"]) / ".tmp" / "fake" / "20261126T000000Z-000000000002.9.1"
    stage.mkdir(parents=True)
    (stage / "message.eml").write_bytes(b"half")
    in_place = Path(config["save_directory"]) / "20261126T000000Z-000000000004"
    in_place.mkdir()
    (in_place / "meta.json").write_text("{}")
    state.write_text(f"{header}\n{u1}\n{u2} {stage.name} 20261126T000000Z-000000000002\n"
                     f"{u3} 20261126T000000Z-000000000003.9.2\n"
                     f"{u4} 20261126T000000Z-000000000004.9.3 {in_place.name}\n"
                     f"{u5} 20261126T000000Z-000000000005.9.4 20261126T000000Z-000000000005\n")

    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_OK
    doc = res.json()
    assert [s["uidl"] for s in doc["saved"]] == [u2, u3, u5], "only the one in place is skipped"
    assert doc["skipped"] == 2
    assert "neither staged nor in" in res.stderr
    assert not stage.exists()
    # settled as plain records: each message's key, and beside the UIDL of
    # one saved in this run the SHA-256 of its bytes (its content key)
    records = dict((line.split(" ") + [None])[:2] for line in state.read_text().splitlines()[1:])
    content = {s.uidl: "h" + hashlib.sha256(s.eml).hexdigest()
               for s in read_saved(config["save_directory"]) if s.uidl}
    assert records == {u1: None, u4: None, **content} and sorted(content) == [u2, u3, u5]


def test_symlinked_staging_leftovers_are_removed_not_followed(fake_pop3, fake_config, confdir,
                                                               run_popfetchd, read_saved,
                                                               tmp_path):
    """Leftovers in .tmp/ID that are symlinks (or hold one) are removed as
    links: what they point at is never touched."""
    server = fake_pop3(mailgen.generate(1, 2000, seed=45))
    config = fake_config(server)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "canary").write_text("keep me")
    stage = Path(config["save_directory"]) / ".tmp" / "fake"
    stage.mkdir(parents=True)
    (stage / "20260101T000000Z-000000000000.1.1").symlink_to(victim)
    (stage / "20260101T000000Z-000000000000.1.2").mkdir()
    (stage / "20260101T000000Z-000000000000.1.2" / "attachments").symlink_to(victim)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK, res.describe()
    assert (victim / "canary").read_text() == "keep me"
    assert not stage.exists() or list(stage.iterdir()) == []
    assert len(read_saved(config["save_directory"])) == 1


@pytest.mark.parametrize("where", [".tmp", ".tmp/fake"])
def test_symlinked_staging_is_refused(fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                                      tmp_path, where):
    """Whoever can write save_directory (the consumer that removes the
    folders) can put a symlink where the staging is, pointing at, say, the
    state directory. popfetchd never follows it: nothing is fetched, nothing
    there is removed, exit 74 with a line that names the symlink."""
    server = fake_pop3(mailgen.generate(2, 2000, seed=46))
    config = fake_config(server)
    cd = confdir(config)
    victim = tmp_path / "victim"  # looks like a state directory
    (victim / "fake").mkdir(parents=True)
    (victim / "fake" / "uidl").write_text("canary\n")
    save = Path(config["save_directory"])
    save.mkdir(parents=True, exist_ok=True)
    if where == ".tmp":
        (save / ".tmp").symlink_to(victim)
    else:
        (save / ".tmp").mkdir()
        (save / ".tmp" / "fake").symlink_to(victim / "fake")

    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_IOERR, res.describe()
    assert f"{save}/{where} is a symbolic link" in res.stderr, res.describe()
    assert (victim / "fake" / "uidl").read_text() == "canary\n"
    assert sorted(p.name for p in (victim / "fake").iterdir()) == ["uidl"]
    assert read_saved(save) == []
    assert server.wait_idle()
    assert not any(c.startswith("DELE") for c in server.commands())
    assert len(server.remaining()) == 2

    (save / where).unlink()
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    assert len(read_saved(save)) == 2 and server.remaining() == []


def test_no_empty_staging_folder_is_left(fake_pop3, fake_config, confdir, run_popfetchd,
                                         read_saved):
    """After a run, save_directory/.tmp holds no staging folder of the
    configuration, not even an empty one."""
    server = fake_pop3(mailgen.generate(2, 2000, seed=47))
    config = fake_config(server)
    cd = confdir(config)
    for _ in range(2):  # with mail, and with none
        res = run_popfetchd(["receive-all", "fake"], confdir=cd)
        assert res.returncode == EX_OK, res.describe()
        assert not (Path(config["save_directory"]) / ".tmp" / "fake").exists()
    assert len(read_saved(config["save_directory"])) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_state_never_loses(fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                                   damage):
    """A damaged state is reported and repaired; at worst messages are saved
    again (DESIGN.md §3), never lost, never a crash."""
    server = fake_pop3(mailgen.generate(3, 3000, seed=43))
    expected = fake_expected(server)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    state = cd.state_directory / "fake" / "uidl"
    text = state.read_bytes()
    state.write_bytes({"truncated": text[:len(text) - 5], "garbage": b"\x00\xff junk\n",
                       "empty": b""}[damage])

    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_OK
    again = [s["uidl"] for s in res.json()["saved"]]
    assert len(again) == {"truncated": 1, "garbage": 3, "empty": 3}[damage]
    assert again == [u for u, _ in expected][-len(again):]
    if damage != "empty":
        assert "state" in res.stderr and "damaged" in res.stderr
    # repaired: a third run finds nothing new
    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert (res.returncode, res.json()["saved"]) == (EX_OK, [])


def test_stale_staging_is_removed(fake_pop3, fake_config, confdir, run_popfetchd, read_saved):
    server = fake_pop3(mailgen.generate(1, 2000, seed=44))
    config = fake_config(server)
    stale = Path(config["save_directory"]) / ".tmp" / "fake" / "20260101T000000Z-000000000000.0"
    stale.mkdir(parents=True)
    (stale / "message.eml").write_bytes(b"partial")
    other = Path(config["save_directory"]) / ".tmp" / "other-config" / "keep.0"
    other.mkdir(parents=True)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK
    assert not stale.exists()
    assert other.exists(), "another configuration's staging was touched"
    assert len(read_saved(config["save_directory"])) == 1


def test_second_process_on_the_same_configuration(fake_pop3, fake_config, confdir,
                                                  run_popfetchd, popfetchd_bin, read_saved):
    server = fake_pop3(mailgen.generate(2, 2000, seed=45))
    server.inject("GREETING", Stall())
    config = fake_config(server, timeouts={"connect": "5s", "command": "30s"})
    cd = confdir(config)
    first = start_popfetchd(popfetchd_bin, cd, "receive-all", "fake")
    try:
        assert wait_for(lambda: server.sessions), "the first process never connected"
        res = run_popfetchd(["receive-all", "fake"], confdir=cd)
        assert res.returncode == EX_TEMPFAIL
        assert "another popfetchd process" in res.stderr
        assert len(server.sessions) == 1, "the second process connected too"
    finally:
        first.kill()
        first.wait()
    server.clear_faults()
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    assert len(read_saved(config["save_directory"])) == 2


@pytest.mark.parametrize("where", ["GREETING", "UIDL", "RETR"])
def test_stalled_server_times_out(fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                                  where):
    server = fake_pop3(mailgen.generate(2, 3000, seed=46))
    server.inject(where, Stall())
    config = fake_config(server, timeouts={"connect": "5s", "command": "1s"})
    start = time.time()
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_TEMPFAIL
    assert time.time() - start < 8
    assert read_saved(config["save_directory"]) == []
    assert not server.sent("DELE")


def test_trickling_server_is_a_stalled_server(fake_pop3, fake_config, confdir, run_popfetchd,
                                              read_saved):
    """During data, fewer than 1 KiB in a command-timeout window is a stall."""
    server = fake_pop3(mailgen.generate(1, 6000, seed=47))
    server.inject("RETR", Trickle(delay=0.1, chunk=16))  # 160 bytes/s
    config = fake_config(server, timeouts={"connect": "5s", "command": "1s"})
    start = time.time()
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_TEMPFAIL
    assert "the data of message 1 (RETR 1)" in res.stderr
    assert "less than 1 KiB in that time is a stall" in res.stderr
    assert time.time() - start < 15
    assert read_saved(config["save_directory"]) == []


def test_slow_but_steady_data_is_not_a_stall(fake_pop3, fake_config, confdir, run_popfetchd,
                                             read_saved):
    server = fake_pop3(mailgen.generate(1, 12000, seed=48))
    expected = fake_expected(server)
    server.inject("RETR", Trickle(delay=0.05, chunk=200))  # 4 KB/s, ~3 s in all
    config = fake_config(server, timeouts={"connect": "5s", "command": "1s"})
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)


def test_max_message_size_leaves_big_messages(fake_pop3, fake_config, confdir, run_popfetchd,
                                              read_saved):
    small, big = mailgen.generate(1, 2000, seed=49)[0], mailgen.generate(1, 40000, seed=50)[0]
    server = fake_pop3([small, big, small.replace(b"Subject:", b"X-Copy: 2\nSubject:")])
    config = fake_config(server, max_message_size="16k")
    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=confdir(config))
    assert res.returncode == EX_OK
    doc = res.json()
    assert (len(doc["saved"]), doc["left_too_big"]) == (2, 1)
    assert len(server.remaining()) == 1 and len(server.remaining()[0]) > 16 * 1024
    assert "max_message_size" in res.stderr


def test_save_text_false_keeps_only_meta(fake_pop3, fake_config, confdir, run_popfetchd,
                                         read_saved):
    server = fake_pop3(mailgen.generate(2, 3000, seed=51))
    config = fake_config(server, save_text=False, save_attachments=False)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK
    folders = [Path(line) for line in res.lines]
    assert len(folders) == 2
    for f in folders:
        assert sorted(p.name for p in f.iterdir()) == ["meta.json"]
    assert server.wait_idle()  # and the server has ended the session too
    assert server.remaining() == []


def test_check_lists_every_configuration(fake_pop3, fake_config, confdir, run_popfetchd):
    server = fake_pop3()
    cd = confdir(fake_config(server, id="one"), fake_config(server, id="two", status="inactive"))
    res = run_popfetchd(["check"], confdir=cd)
    assert res.returncode == EX_OK
    assert [line.split("\t")[:2] for line in res.lines] == [["one", "active"],
                                                             ["two", "inactive"]]
    assert f"{server.host}:{server.port}" in res.lines[0] and "tls=none" in res.lines[0]
    doc = run_popfetchd(["check", "--json"], confdir=cd).json()
    assert doc["valid"] is True and [c["id"] for c in doc["configurations"]] == ["one", "two"]
    res = run_popfetchd(["receive-all", "two"], confdir=cd)
    assert res.returncode == EX_CONFIG and "inactive" in res.stderr


def test_check_reports_every_error_of_every_file(confdir, run_popfetchd, tmp_path):
    cd = confdir()
    cd.write_raw("a.yaml", "id: a\nserver: pop.example\nuser: u\npassword_file: /nonexistent\n"
                 "save_directory: /tmp/x\nport: 0\n")
    cd.write_raw("b.yaml", "id: b\nserver: pop.example\nuser: u\npassword: secret-b\n"
                 "save_directory: relative/dir\npoll_interval: 5 parsecs\n")
    cd.write_raw("c.yaml", "id: [unclosed\n")
    res = run_popfetchd(["check", "--json"], confdir=cd)
    assert res.returncode == EX_CONFIG
    errors = res.json()["errors"]
    for needle in ("a.yaml:6:7: port:", "a.yaml:4:16: password_file:", "b.yaml:5:17: save_directory:",
                   "b.yaml:6:16: poll_interval:", "c.yaml:"):
        assert any(needle in e for e in errors), (needle, errors)
    assert "secret-b" not in res.stdout + res.stderr


def test_example_configurations_are_valid(confdir, run_popfetchd, tmp_path):
    cd = confdir()
    creds = tmp_path / "credentials"
    creds.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    for name in ("m365-orders-secret", "archive-password", "archive-p12"):
        (creds / name).write_text("s3cret\n")
    examples = sorted((ROOT / "conf.d").glob("*.yaml.example"))
    for example in examples:
        text = example.read_text().replace("/etc/popfetchd/secrets/invoices.password", str(secret))
        if example.name == "popfetchd.yaml.example":
            text += f"state_directory: {cd.state_directory}\n"
            (cd.path / "popfetchd.yaml").write_text(text)
        else:
            cd.write_raw(example.name.replace(".example", ""), text)
    res = run_popfetchd(["check"], confdir=cd, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert res.returncode == EX_OK, res.stderr
    assert len(res.lines) == len(examples) - 1


def test_refused_dele_keeps_the_record(fake_pop3, fake_config, confdir, run_popfetchd,
                                       read_saved):
    """A message the server would not delete stays recorded, so it is not
    saved again even when a consumer has taken its folder away."""
    server = fake_pop3(mailgen.generate(2, 2000, seed=52))
    server.inject("DELE", Reply(b"-ERR [SYS/TEMP] cannot delete now\r\n"), times=2)
    config = fake_config(server)
    cd = confdir(config)
    first = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert first.returncode == EX_OK
    assert (len(first.json()["saved"]), first.json()["deleted"]) == (2, 0)
    assert len(server.remaining()) == 2
    for folder in read_saved(config["save_directory"]):
        shutil.rmtree(folder.path)  # the consumer took them

    second = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert second.returncode == EX_OK
    doc = second.json()
    assert (doc["saved"], doc["skipped"], doc["deleted"]) == ([], 2, 2)
    assert server.wait_idle()  # and the server has ended the session too
    assert server.remaining() == []


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
def test_refused_retr_does_not_block_the_others(fake_pop3, fake_config, confdir, run_popfetchd,
                                                read_saved, pipelining):
    """The server cannot send message 2 (by identity, whatever its number in a
    session): 1 and 3 are saved, 2 stays. Pipelined, the session commits
    what it has, QUITs and starts over one command at a time."""
    views, refusing = {}, [True]

    def refuse_second(record, line):
        if line == "GREETING":
            views[record.index] = server.uidls()
        elif refusing[0] and line.startswith("RETR "):
            view, n = views.get(record.index, []), int(line.split()[1])
            if 0 < n <= len(view) and view[n - 1] == expected[1][0]:
                return Reply(b"-ERR message is unavailable\r\n")
        return None

    server = fake_pop3(mailgen.generate(3, 2000, seed=53), hook=refuse_second,
                       pipelining=pipelining)
    expected = fake_expected(server)
    config = fake_config(server)
    cd = confdir(config)
    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_TEMPFAIL
    assert server.sent("QUIT"), "the session must end with QUIT"
    assert [s.uidl for s in read_saved(config["save_directory"])] == [expected[0][0],
                                                                      expected[2][0]]
    # the server applies the deletions just after its +OK to QUIT
    assert server.wait_idle()
    assert server.remaining() == [expected[1][1]]
    assert "message is unavailable" in res.stderr
    assert len(server.sessions) == (2 if pipelining else 1)
    assert res.json()["deleted"] == 2
    refusing[0] = False
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)


def test_message_far_larger_than_listed_is_refused(fake_pop3, fake_config, confdir,
                                                   run_popfetchd, read_saved):
    """A server whose LIST says 2 KB and which then streams megabytes cannot
    fill the disk."""
    server = fake_pop3(mailgen.generate(1, 2000, seed=54))
    huge = b"+OK\r\n" + (b"x" * 998 + b"\r\n") * 3000 + b".\r\n"  # 3 MB
    server.inject("RETR", Reply(huge))
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_PROTOCOL
    assert "far more than LIST" in res.stderr
    assert read_saved(config["save_directory"]) == []
    assert_no_staging_leftovers(config["save_directory"])
    assert not server.sent("DELE")


def test_same_uidls_in_another_mailbox_are_new(fake_pop3, fake_config, confdir, run_popfetchd,
                                               read_saved):
    """The state is bound to server and user: after `user` changes, equal
    UIDLs in the new mailbox are other messages, and they are saved."""
    uidls = ["UID-1", "UID-2"]
    first = fake_pop3(mailgen.generate(2, 2000, seed=55), uidls=uidls, user="alice")
    config = fake_config(first, remove_after_read=False)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    second = fake_pop3(mailgen.generate(2, 2000, seed=56), uidls=uidls, user="bob")
    cd.add(fake_config(second, remove_after_read=True))  # same id, user bob
    res = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert res.returncode == EX_OK
    assert (len(res.json()["saved"]), res.json()["skipped"]) == (2, 0)
    assert second.wait_idle()  # and the server has ended the session too
    assert second.remaining() == []
    assert len(read_saved(config["save_directory"])) == 4
