"""Cyrus pop3d with the settings of its quirks that the interop suite turns
off (tests/tools/server_cyrus.py): popfetchd's answer to each, as the
compatibility table states it. Each test starts its own instance."""

import poplib
import shutil
import tempfile

import pytest

import mailgen
import server_cyrus
from test_interop import EIGHT_BIT

EX_OK, EX_TEMPFAIL = 0, 75


@pytest.fixture
def cyrus_with():
    """cyrus_with(**imapd_conf) -> a started Cyrus with those settings."""
    started = []

    def start(**settings):
        tmp = tempfile.mkdtemp(prefix="pfd-cyq-", dir="/tmp")
        server = server_cyrus.make(tmp, {k: str(v) for k, v in settings.items()})
        started.append((server, tmp))
        return server.start()
    yield start
    for server, tmp in started:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def plain_config(server, mailbox, save_dir):
    return {"id": "cq", "server": server.host, "port": server.pop3_port, "tls": "none",
            "user": mailbox.user, "password": mailbox.password,
            "save_directory": str(save_dir), "remove_after_read": True,
            "timeouts": {"connect": "10s", "command": "30s"}}


def test_login_delay_ends_the_poll_as_temporary(cyrus_with, confdir, run_popfetchd, tmp_path,
                                                read_saved):
    """popminpoll: a second login within the minute is refused with a bare
    [LOGIN-DELAY] after the password was accepted: 75, nothing deleted."""
    server = cyrus_with(popminpoll="1m")
    box = server.new_mailbox()
    box.deliver(*mailgen.generate(1, seed=1510))
    client = poplib.POP3(server.host, server.pop3_port, timeout=30)
    assert client.capa()["LOGIN-DELAY"] == ["60"]
    client.user(box.user)
    client.pass_(box.password)
    client.quit()
    cfg = plain_config(server, box, tmp_path / "save")
    (tmp_path / "save").mkdir()
    r = run_popfetchd(["receive-all", "cq"], confdir=confdir(cfg))
    assert r.returncode == EX_TEMPFAIL, r.describe()
    assert "Logins must be at least 1 minute apart" in r.stderr
    assert read_saved(cfg["save_directory"]) == []


def test_munged_eight_bit_header_is_saved_as_sent(cyrus_with, confdir, run_popfetchd, tmp_path,
                                                  read_saved):
    """Cyrus's default munge8bit turns each 8-bit header byte into 'X' at
    delivery; popfetchd saves and indexes what the server sends."""
    server = cyrus_with(munge8bit="yes")
    box = server.new_mailbox()
    box.deliver(EIGHT_BIT)
    client = poplib.POP3(server.host, server.pop3_port, timeout=30)
    client.user(box.user)
    client.pass_(box.password)
    sent = b"".join(line + b"\r\n" for line in client.retr(1)[1])
    client.quit()
    assert b"Subject: GrXXXXe aus KXXln XXX Rechnung Nr. 7\r\n" in sent
    assert "Schöne Grüße".encode() in sent  # the body is left alone
    cfg = plain_config(server, box, tmp_path / "save")
    (tmp_path / "save").mkdir()
    r = run_popfetchd(["receive-all", "cq"], confdir=confdir(cfg))
    assert r.returncode == EX_OK, r.describe()
    saved = read_saved(cfg["save_directory"])
    assert [s.eml for s in saved] == [sent]
    assert saved[0].meta["subject"] == "GrXXXXe aus KXXln XXX Rechnung Nr. 7"
    assert saved[0].meta["from"] == "JXXrgen MXXller <jm@example.org>"
    assert box.count() == 0
