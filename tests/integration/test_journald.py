"""Log records in the journal (DESIGN.md §7): when JOURNAL_STREAM names
popfetchd's stderr, each line goes through journald's native protocol with
PRIORITY, MESSAGE, SYSLOG_IDENTIFIER and the POPFETCHD_* fields.

The journal is a socket the test binds: popfetchd runs in a private mount
namespace (unshare -m) where the test's directory is mounted over
/run/systemd/journal, so that sd_journal_sendv() reaches
/run/systemd/journal/socket = the test's socket. The datagrams are parsed
as journald does (systemd's "Native Journal Protocol"): KEY=VALUE lines, or
KEY\\n + 64-bit little-endian length + value + \\n; a record too big for a
datagram comes as a memfd (SCM_RIGHTS), which is read too.
"""

import array
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

import mailgen
from conftest import _popfetchd_env
from daemonutil import wait_for

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                reason="needs unshare(1) and root for a mount namespace")

# In the namespace: the test's directory over /run/systemd/journal (a tmpfs
# first where that directory does not exist), then popfetchd.
NAMESPACE_SCRIPT = r"""
set -e
if [ ! -d /run/systemd/journal ]; then
    if [ -d /run/systemd ]; then mount -t tmpfs -o mode=755 tmpfs /run/systemd
    else mount -t tmpfs -o mode=755 tmpfs /run; fi
    mkdir -p /run/systemd/journal
fi
mount --bind "$JOURNAL_DIR" /run/systemd/journal
exec "$@"
"""


def parse_native(data):
    """One native-protocol datagram as {FIELD: value (str)}."""
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 1 + 8
            value = data[start:start + size]
            assert data[start + size:start + size + 1] == b"\n", data
            i = start + size + 1
        fields[key.decode()] = value.decode(errors="replace")
    return fields


class Journal:
    """A unix datagram socket at DIR/socket standing in for journald's."""

    def __init__(self, directory):
        self.dir = directory
        self.dir.mkdir()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.dir / "socket"))
        self.sock.settimeout(0.2)
        self.records = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _receive(self):
        fds = array.array("i")
        data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * fds.itemsize))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        for fd in fds:  # a large record: the whole datagram in a sealed memfd
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        return data

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self._receive()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.records.append(parse_native(data))

    def find(self, **want):
        with self._lock:
            return [r for r in self.records if all(r.get(k) == v for k, v in want.items())]

    def text(self):
        with self._lock:
            return "\n".join(repr(r) for r in self.records)

    def close(self):
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


@pytest.fixture
def journal(tmp_path, secret_registry):
    j = Journal(tmp_path / "journal")
    yield j
    j.close()
    secret_registry.record("journal records", j.text())


def stream_of(f):
    """JOURNAL_STREAM for an open file: its st_dev:st_ino (systemd.exec(5))."""
    st = os.fstat(f.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def popen_in_namespace(popfetchd_bin, journal, args, stderr, journal_stream):
    env = _popfetchd_env({"JOURNAL_DIR": str(journal.dir), "JOURNAL_STREAM": journal_stream})
    return subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                             NAMESPACE_SCRIPT, "sh", popfetchd_bin, *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                            env=env)


def run_in_namespace(popfetchd_bin, journal, tmp_path, args, stream="match", name="stderr"):
    """popfetchd args in the namespace, its stderr a file; JOURNAL_STREAM
    names that file ("match"), another file ("other"), or is unset.
    (exit code, stdout, stderr)."""
    err_path, other = tmp_path / name, tmp_path / f"{name}-other"
    with open(err_path, "wb") as err, open(other, "wb") as o:
        js = {"match": stream_of(err), "other": stream_of(o)}[stream]
        proc = popen_in_namespace(popfetchd_bin, journal, args, err, js)
        out, _ = proc.communicate(timeout=60)
    time.sleep(0.3)  # the last datagrams are read
    return proc.returncode, out.decode(errors="replace"), err_path.read_text(errors="replace")


def fields_of(record):
    return {k: v for k, v in record.items() if k.startswith("POPFETCHD_")}


def test_records_carry_the_configuration_folder_uidl_and_exit(
        popfetchd_bin, journal, tmp_path, fake_pop3, fake_config, confdir, secret_registry):
    msgs = [m.data for m in mailgen.generate_messages(2, 2000, seed=1701)]
    server = fake_pop3(list(zip(["uid-a", "uid-b"], msgs)))
    cd = confdir(fake_config(server, id="invoices"))
    code, out, err = run_in_namespace(popfetchd_bin, journal, tmp_path,
                                      ["-c", cd, "-v", "receive-all", "invoices"])
    secret_registry.record("stderr", err)
    print(journal.text())
    assert code == 0, err
    folders = out.split()
    assert len(folders) == 2

    # every line went to the journal, none to stderr
    assert err == ""
    for r in journal.records:
        assert r["SYSLOG_IDENTIFIER"] == "popfetchd"
        assert r["PRIORITY"] in "34567" and len(r["PRIORITY"]) == 1
        assert "\n" not in r["MESSAGE"]
    saved = journal.find(POPFETCHD_CONFIG="invoices", POPFETCHD_UIDL="uid-a")
    assert len(saved) == 1, journal.text()
    [rec] = saved
    assert rec["POPFETCHD_FOLDER"] in folders
    assert rec["PRIORITY"] == "7"
    assert rec["MESSAGE"].startswith("invoices: saved message 1 (uid-a) in ")
    assert {r["POPFETCHD_UIDL"]: r["POPFETCHD_FOLDER"]
            for r in journal.find(POPFETCHD_CONFIG="invoices") if "POPFETCHD_UIDL" in r} \
        == dict(zip(["uid-a", "uid-b"], folders))
    [end] = journal.find(POPFETCHD_CONFIG="invoices", POPFETCHD_EXIT="0")
    assert end["MESSAGE"] == "invoices: 2 saved, 0 already received, 2 deleted"
    assert end["PRIORITY"] == "6"
    assert fields_of(end) == {"POPFETCHD_CONFIG": "invoices", "POPFETCHD_EXIT": "0"}
    # a line about no configuration has no POPFETCHD_CONFIG
    assert all("POPFETCHD_CONFIG" in r or not r["MESSAGE"].startswith("invoices:")
               for r in journal.records)


def test_a_failed_poll_of_the_daemon_carries_its_exit_code(
        popfetchd_bin, journal, tmp_path, fake_pop3, fake_config, confdir, secret_registry):
    bad_server = fake_pop3([])
    good_server = fake_pop3([])
    secret_registry.add("not-the-password-4711")
    cd = confdir(fake_config(bad_server, id="refused", password="not-the-password-4711",
                             poll_interval="1s"),
                 fake_config(good_server, id="fine", poll_interval="1s"))
    with open(tmp_path / "stderr", "wb") as err:
        proc = popen_in_namespace(popfetchd_bin, journal, ["-c", cd, "run"], err,
                                  stream_of(err))
        try:
            failed = wait_for(lambda: journal.find(POPFETCHD_CONFIG="refused",
                                                   POPFETCHD_EXIT="77"), 30,
                              "a failed poll's record")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(journal.text())
    texts = [r["MESSAGE"] for r in failed]
    assert any(t.startswith("refused: poll failed (exit 77): next try in ") for t in texts), texts
    sched = [r for r in failed if "next try" in r["MESSAGE"]][0]
    assert sched["PRIORITY"] == "5"
    assert fields_of(sched) == {"POPFETCHD_CONFIG": "refused", "POPFETCHD_EXIT": "77"}
    # the refusal itself is an error record of that configuration
    assert [r for r in journal.find(POPFETCHD_CONFIG="refused", PRIORITY="3")
            if "POPFETCHD_EXIT" not in r]
    assert not journal.find(POPFETCHD_CONFIG="fine", POPFETCHD_EXIT="77")
    assert journal.find(MESSAGE="stopped", PRIORITY="6")
    assert (tmp_path / "stderr").read_text() == ""


def test_journal_stream_naming_another_file_keeps_stderr(
        popfetchd_bin, journal, tmp_path, fake_pop3, fake_config, confdir):
    """A process whose stderr was redirected (2>file in a unit's script)
    inherits JOURNAL_STREAM: its lines belong to that file, as plain lines."""
    server = fake_pop3([m.data for m in mailgen.generate_messages(1, 1000, seed=1702)])
    cd = confdir(fake_config(server, id="invoices"))
    code, out, err = run_in_namespace(popfetchd_bin, journal, tmp_path,
                                      ["-c", cd, "receive-all", "invoices"], stream="other")
    assert code == 0, err
    assert journal.records == []
    lines = err.splitlines()
    assert "popfetchd: invoices: 1 saved, 0 already received, 1 deleted" in lines, err
    assert not any(line.startswith("<") for line in lines), err


def test_journal_unreachable_falls_back_to_prefixed_stderr(
        popfetchd_bin, journal, tmp_path, fake_pop3, fake_config, confdir):
    """stderr is journald's but its socket is not there: the lines go to the
    stream with the "<N>" priority prefix journald reads."""
    server = fake_pop3([m.data for m in mailgen.generate_messages(1, 1000, seed=1703)])
    cd = confdir(fake_config(server, id="invoices"))
    (journal.dir / "socket").rename(journal.dir / "elsewhere")
    code, out, err = run_in_namespace(popfetchd_bin, journal, tmp_path,
                                      ["-c", cd, "receive-all", "invoices"])
    assert code == 0, err
    assert "<6>invoices: 1 saved, 0 already received, 1 deleted" in err.splitlines(), err
