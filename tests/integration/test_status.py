"""What each configuration last did (DESIGN.md §7): status.json after every
poll of receive/receive-all and of the daemon, and `popfetchd status`
(table, --json, exit codes), also for an operator who is not root."""

import datetime
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import mailgen
from conftest import SANITIZER_MARKERS, ConfDir
from daemonutil import daemon, wait_for  # noqa: F401  (daemon: a fixture)

EX_OK, EX_IOERR, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 0, 74, 75, 77, 78
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
FIELDS = ["configuration", "state", "last_poll", "last_success_at", "consecutive_failures",
          "next_poll_at", "totals", "tls_certificate_expires_at"]
POLL_FIELDS = ["started_at", "finished_at", "result", "exit_code", "error", "messages_saved",
               "bytes_saved", "messages_deleted"]


def status_json(cd, id):
    return json.loads((cd.state_directory / id / "status.json").read_text())


def when(text):
    assert RFC3339_UTC.match(text), text
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc)


def deliver(mailbox, n, seed):
    mailbox.deliver(*[m.data for m in mailgen.generate_messages(n, 2000, seed=seed)])


def saved_bytes(save_dir):
    return sum((p / "message.eml").stat().st_size
               for p in Path(save_dir).iterdir() if not p.name.startswith("."))


def table_row(stdout, id):
    rows = [l.split() for l in stdout.splitlines() if l.split()[:1] == [id]]
    assert len(rows) == 1, stdout
    return rows[0]


# --------------------------------------------------------------------------
# status.json from receive-all


def test_receive_all_writes_status_json(dovecot_config, mailbox, confdir, run_popfetchd):
    deliver(mailbox, 2, seed=1701)
    config = dovecot_config(mailbox)
    cd = confdir(config)
    r = run_popfetchd(["receive-all", "dv"], confdir=cd)
    assert r.returncode == EX_OK, r.describe()
    s = status_json(cd, "dv")
    assert list(s) == FIELDS
    assert list(s["last_poll"]) == POLL_FIELDS
    poll = s["last_poll"]
    assert s["configuration"] == "dv" and s["state"] == "active"
    assert poll["result"] == "ok" and poll["exit_code"] == 0 and poll["error"] is None
    assert poll["messages_saved"] == 2 and poll["messages_deleted"] == 2
    assert poll["bytes_saved"] == saved_bytes(config["save_directory"]) > 0
    started, finished = when(poll["started_at"]), when(poll["finished_at"])
    now = datetime.datetime.now(datetime.timezone.utc)
    assert now - datetime.timedelta(seconds=60) < started <= finished <= now
    assert s["last_success_at"] == poll["finished_at"]
    assert s["consecutive_failures"] == 0
    assert s["next_poll_at"] is None                  # a one-shot plans none
    assert s["totals"] == {"messages_saved": 2, "bytes_saved": poll["bytes_saved"]}
    assert s["tls_certificate_expires_at"] is None    # tls: none
    mode = (cd.state_directory / "dv" / "status.json").stat().st_mode & 0o777
    assert mode == 0o640, oct(mode)

    deliver(mailbox, 1, seed=1702)
    assert run_popfetchd(["receive", "dv"], confdir=cd).returncode == EX_OK
    s2 = status_json(cd, "dv")
    assert s2["last_poll"]["messages_saved"] == 1
    assert s2["totals"]["messages_saved"] == 3
    assert s2["totals"]["bytes_saved"] == saved_bytes(config["save_directory"])


def test_failed_poll_keeps_last_success(dovecot_config, mailbox, confdir, run_popfetchd,
                                        secret_registry):
    """A refused login (exit 77): counted, its error recorded, the last
    success kept; neither password is in status.json."""
    config = dovecot_config(mailbox)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "dv"], confdir=cd).returncode == EX_OK
    before = status_json(cd, "dv")
    wrong = "wrong-Passw0rd-for-status"
    secret_registry.add(mailbox.password, wrong)
    cd.add({**config, "password": wrong})
    r = run_popfetchd(["receive-all", "dv"], confdir=cd)
    assert r.returncode == EX_NOPERM, r.describe()
    s = status_json(cd, "dv")
    assert s["last_poll"]["result"] == "failed" and s["last_poll"]["exit_code"] == EX_NOPERM
    assert s["last_poll"]["error"] and "auth" in s["last_poll"]["error"].lower(), s
    assert s["consecutive_failures"] == 1
    assert s["last_success_at"] == before["last_success_at"] is not None
    assert s["totals"] == before["totals"]
    assert run_popfetchd(["receive-all", "dv"], confdir=cd).returncode == EX_NOPERM
    assert status_json(cd, "dv")["consecutive_failures"] == 2
    text = (cd.state_directory / "dv" / "status.json").read_text()
    secret_registry.record("status.json", text)
    assert secret_registry.leaks([("status.json", text)]) == []


def test_tls_certificate_expiry(dovecot, dovecot_config, mailbox, confdir, run_popfetchd):
    config = dovecot_config(mailbox, server="127.0.0.1", port=dovecot.pop3s_port,
                            tls="implicit", tls_ca_file=dovecot.ca_file)
    cd = confdir(config)
    r = run_popfetchd(["receive-all", "dv"], confdir=cd)
    assert r.returncode == EX_OK, r.describe()
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", dovecot.cert_file],
                         capture_output=True, text=True, check=True).stdout
    not_after = datetime.datetime.strptime(out.strip().split("=", 1)[1],
                                           "%b %d %H:%M:%S %Y GMT").replace(
                                               tzinfo=datetime.timezone.utc)
    assert when(status_json(cd, "dv")["tls_certificate_expires_at"]) == not_after


# --------------------------------------------------------------------------
# popfetchd status


def test_status_table_json_and_exit_codes(dovecot_config, mailbox, confdir, run_popfetchd):
    deliver(mailbox, 2, seed=1703)
    good = dovecot_config(mailbox, id="good")
    bad = dovecot_config(mailbox, id="bad", password="not-the-password")
    off = dovecot_config(mailbox, id="off", status="inactive")
    cd = confdir(good, off)
    assert run_popfetchd(["receive-all", "good"], confdir=cd).returncode == EX_OK

    r = run_popfetchd(["status"], confdir=cd)
    print(r.stdout)
    assert r.returncode == EX_OK, r.describe()
    lines = r.stdout.splitlines()
    assert lines[0] == f"daemon: not running on {cd.state_directory}"
    assert lines[2].split()[:3] == ["ID", "STATE", "LAST"], r.stdout
    row = table_row(r.stdout, "good")
    assert row[1] == "active" and "ok" in row and row[-1] == "-", row
    assert table_row(r.stdout, "off")[1] == "inactive"
    # columns line up: every row's STATE starts where the header's does
    col = lines[2].index("STATE")
    assert all(l[col - 2:col] == "  " and l[col] != " " for l in lines[3:]), r.stdout

    j = run_popfetchd(["status", "--json"], confdir=cd)
    assert j.returncode == EX_OK
    out = j.json()
    assert out["daemon"] == {"running": False, "pid": None}
    assert [c["configuration"] for c in out["configurations"]] == ["good", "off"]
    assert out["configurations"][0] == status_json(cd, "good")
    assert out["configurations"][1]["state"] == "inactive"

    cd.add(bad)         # never polled: not a success
    r = run_popfetchd(["status", "bad"], confdir=cd)
    assert r.returncode == EX_TEMPFAIL and "never polled" in r.stdout, r.describe()
    assert run_popfetchd(["receive-all", "bad"], confdir=cd).returncode == EX_NOPERM
    r = run_popfetchd(["status"], confdir=cd)
    assert r.returncode == EX_TEMPFAIL, r.describe()
    assert "failed (77)" in " ".join(table_row(r.stdout, "bad"))
    assert run_popfetchd(["status", "good"], confdir=cd).returncode == EX_OK
    r = run_popfetchd(["status", "nosuch"], confdir=cd)
    assert r.returncode == EX_CONFIG and "nosuch" in r.stderr, r.describe()
    assert run_popfetchd(["status", "a", "b"], confdir=cd).returncode == 64


def test_daemon_writes_status_and_is_seen_running(dovecot_config, mailbox, confdir,
                                                  run_popfetchd, daemon):
    deliver(mailbox, 2, seed=1704)
    cd = confdir(dovecot_config(mailbox, poll_interval="1s"))
    d = daemon(cd)
    d.wait_ready()
    wait_for(lambda: (cd.state_directory / "dv" / "status.json").exists() and
             status_json(cd, "dv")["totals"]["messages_saved"] == 2, 20, "status.json")
    s = status_json(cd, "dv")
    assert s["last_poll"]["result"] == "ok"
    assert when(s["next_poll_at"]) >= when(s["last_poll"]["finished_at"])
    r = run_popfetchd(["status"], confdir=cd)
    assert r.returncode == EX_OK, r.describe()
    assert r.stdout.splitlines()[0] == \
        f"daemon: running on {cd.state_directory} (pid {d.proc.pid})"
    assert run_popfetchd(["status", "--json"], confdir=cd).json()["daemon"] == \
        {"running": True, "pid": d.proc.pid}
    assert d.stop() == EX_OK
    r = run_popfetchd(["status"], confdir=cd)
    assert r.stdout.startswith("daemon: not running"), r.stdout


def test_broken_configuration_shows_broken(dovecot, dovecot_config, mailbox, confdir,
                                           run_popfetchd, daemon, tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    config = dovecot_config(mailbox, id="tlsca", server="127.0.0.1", port=dovecot.pop3s_port,
                            tls="implicit", tls_ca_file=str(ca), poll_interval="1m")
    cd = confdir(config)
    d = daemon(cd)
    d.wait_ready()
    path = cd.state_directory / "tlsca" / "status.json"
    wait_for(path.exists, 10, f"status.json\n{d.output}")
    s = status_json(cd, "tlsca")
    assert s["state"].startswith("broken: ") and str(ca) in s["state"], s
    assert s["next_poll_at"] is not None and s["last_poll"] is None
    r = run_popfetchd(["status"], confdir=cd)
    assert r.returncode == EX_TEMPFAIL, r.describe()
    row = table_row(r.stdout, "tlsca")
    assert row[1] == "broken" and str(ca) in r.stdout, r.stdout
    assert d.stop() == EX_OK


# --------------------------------------------------------------------------
# an operator who is not root


OPERATOR_GID = 4242     # stands for the popfetchd group


@pytest.fixture
def shared_dir():
    """A directory others can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pfd-status-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(popfetchd_bin, confdir, args, groups):
    """popfetchd as user nobody with these supplementary groups."""
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup",
           f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
           popfetchd_bin, "-c", str(confdir), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                       env={"PATH": os.environ["PATH"], **{k: v for k, v in os.environ.items()
                                                           if k.endswith("SAN_OPTIONS")}})
    assert not any(m in r.stderr for m in SANITIZER_MARKERS), r.stderr
    return r


def test_operator_in_the_group_reads_status(dovecot_config, mailbox, run_popfetchd,
                                            popfetchd_bin, shared_dir, daemon):
    """The configurations hold secrets (0600, root's): the operator cannot
    read them, yet sees every status.json when in the daemon's group; not in
    the group, nothing."""
    cd = ConfDir(shared_dir / "conf", shared_dir / "state")
    (cd.path / "conf.d").mkdir(parents=True)
    cd.state_directory.mkdir()
    cd.write_main(None)
    cd.main.chmod(0o644)                   # no secret in it
    cd.path.chmod(0o755)
    (cd.path / "conf.d").chmod(0o755)
    cd.add(dovecot_config(mailbox, poll_interval="1m"))
    assert run_popfetchd(["receive-all", "dv"], confdir=cd).returncode == EX_OK
    # a daemon running as popfetchd:popfetchd: its group on what it writes
    # (a poll of its own may rewrite status.json at any moment), and on what
    # the one-shot before it wrote
    as_group = shared_dir / "popfetchd-operator-group"
    as_group.write_text(f"#!/bin/sh\nexec setpriv --regid {OPERATOR_GID} --clear-groups -- "
                        f"{popfetchd_bin} \"$@\"\n")
    as_group.chmod(0o755)
    d = daemon(cd, binary=str(as_group))
    d.wait_ready()
    wait_for(lambda: (cd.state_directory / "popfetchd.pid").exists(), 10, "popfetchd.pid")
    for p in [cd.state_directory, *cd.state_directory.rglob("*")]:
        os.chown(p, -1, OPERATOR_GID)
    cd.state_directory.chmod(0o750)        # StateDirectoryMode=0750
    assert (cd.state_directory / "dv").stat().st_mode & 0o777 == 0o750

    r = as_nobody(popfetchd_bin, cd, ["status"], [OPERATOR_GID])
    print(r.stdout, r.stderr)
    assert r.returncode == EX_OK, (r.stdout, r.stderr)
    assert "cannot be loaded" in r.stderr and "Permission denied" in r.stderr
    assert r.stdout.splitlines()[0] == \
        f"daemon: running on {cd.state_directory} (pid {d.proc.pid})"
    assert table_row(r.stdout, "dv")[1] == "active" and "ok" in table_row(r.stdout, "dv")
    r = as_nobody(popfetchd_bin, cd, ["status", "--json"], [OPERATOR_GID])
    assert json.loads(r.stdout)["configurations"][0] == status_json(cd, "dv")

    r = as_nobody(popfetchd_bin, cd, ["status"], [])
    assert r.returncode == EX_IOERR and "dv" not in r.stdout, (r.stdout, r.stderr)
    assert f"cannot read the state directory {cd.state_directory}" in r.stderr
    assert d.stop() == EX_OK
