"""GNU Mailutils pop3d on a mailbox it has not read yet.

test_interop.py runs the common cases on mailboxes that pop3d has already
read once (server_mailutils.Mailbox.deliver settles them), because pop3d
rewrites an mbox message the first time a session reads it. Here popfetchd
is the first reader: it must save what that session sends (the message as
delivered plus the X-UIDL header pop3d adds in it) and, in keep mode, not
save the message again when later sessions send it with more headers.
"""

import re
import shutil
import tempfile

import pytest

import mailgen
import server_mailutils

EX_OK = 0

FROM_LINES = (b"From: Quoted <q@example.org>\n"
              b"Subject: lines that an mbox quotes\n"
              b"Message-ID: <from-lines@example.org>\n\n"
              b"From here on\n>From there\n>>From far away\nFrom\n")


@pytest.fixture(scope="module")
def server():
    tmp = tempfile.mkdtemp(prefix="pfd-mufr-", dir="/tmp")
    s = server_mailutils.make(tmp)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def box(server):
    mailbox = server.new_mailbox()
    yield mailbox
    mailbox.reset()


def config(server, mailbox, save, **keys):
    cfg = {"id": "mu", "server": server.host, "port": server.pop3_port, "tls": "none",
           "user": mailbox.user, "password": mailbox.password,
           "sasl_mechanisms": server.mechanisms, "save_directory": str(save),
           "remove_after_read": True, "timeouts": {"connect": "10s", "command": "30s"}}
    cfg.update(keys)
    return cfg


def first_session_bytes(message, uidl):
    """What pop3d sends the first time: CRLF lines, mboxrd quoting undone,
    and its X-UIDL header added at the end of the header."""
    head, body = mailgen.to_crlf(message).split(b"\r\n\r\n", 1)
    return head + b"\r\nX-UIDL: " + uidl.encode() + b"\r\n\r\n" + body


def in_delivery_order(saved):
    """pop3d's mbox UIDLs are MD5.UIDVALIDITY.UID, the UID counting up in
    mailbox order."""
    for s in saved:
        assert re.fullmatch(r"[0-9a-f]{32}\.\d+\.\d+", s.uidl or ""), s
    return sorted(saved, key=lambda s: int(s.uidl.rsplit(".", 1)[1]))


def test_first_reader_saves_what_that_session_sends(server, box, tmp_path, confdir,
                                                    run_popfetchd, read_saved):
    messages = mailgen.generate(3, mean_size=5000, seed=1511) + [FROM_LINES]
    box.append(*messages)  # unread: not settled
    cfg = config(server, box, tmp_path / "save")
    r = run_popfetchd(["receive-all", "mu"], confdir=confdir(cfg), timeout=120)
    assert r.returncode == EX_OK, r.describe()
    saved = read_saved(cfg["save_directory"])
    assert len(saved) == len(messages)
    in_order = in_delivery_order(saved)
    assert [s.eml for s in in_order] == [first_session_bytes(m, s.uidl)
                                         for m, s in zip(messages, in_order)]
    assert box.count() == 0


def test_keep_mode_when_the_server_rewrites_messages(server, box, tmp_path, confdir,
                                                     run_popfetchd, read_saved):
    messages = mailgen.generate(3, mean_size=3000, seed=1512)
    box.append(*messages)  # unread: not settled
    cfg = config(server, box, tmp_path / "save", remove_after_read=False)
    cd = confdir(cfg)
    for _ in range(3):
        r = run_popfetchd(["receive-all", "mu"], confdir=cd)
        assert r.returncode == EX_OK, r.describe()
    saved = read_saved(cfg["save_directory"])
    assert len(saved) == 3
    with open(box.path, "rb") as f:
        assert f.read().count(b"\nStatus: O") == 3, "pop3d did not rewrite the mbox"
    in_order = in_delivery_order(saved)
    assert [s.eml for s in in_order] == [first_session_bytes(m, s.uidl)
                                         for m, s in zip(messages, in_order)]
    assert box.count() == 3
