"""Servers without UIDL (DESIGN.md §4.3): "UIDL (or, where the server has
none, a key from the message itself)". A message without a valid UIDL is
downloaded and known by its content ("h" + the SHA-256 of its bytes): it is
saved once, never twice, whatever happens to the session — at the cost of
downloading it again while it stays on the server."""

import hashlib
import json
import re
from pathlib import Path

import mailgen
from fakepop3 import Close, Reply

EX_OK = 0

NO_UIDL = b"-ERR unknown command\r\n"


def msgs(n, seed):
    return [m.data for m in mailgen.generate_messages(n, 4000, seed=seed)]


def key(data):
    return "h" + hashlib.sha256(data.replace(b"\n", b"\r\n")).hexdigest()


def folders(config):
    return sorted(p for p in Path(config["save_directory"]).iterdir()
                  if not p.name.startswith("."))


def metas(config):
    return [json.loads((p / "meta.json").read_text()) for p in folders(config)]


def no_uidl_server(fake_pop3, data, **kw):
    server = fake_pop3(data, capabilities=["TOP", "USER", "RESP-CODES"], **kw)
    server.inject("UIDL", NO_UIDL, times=None)
    return server


def test_server_without_uidl_is_fetched(fake_pop3, fake_config, confdir, run_popfetchd):
    data = msgs(3, seed=400)
    server = no_uidl_server(fake_pop3, data)
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK, res.describe()
    assert "the server does not support UIDL" in res.stderr
    assert sorted(m["uidl"] for m in metas(config)) == sorted(key(d) for d in data)
    for f in folders(config):
        meta = json.loads((f / "meta.json").read_text())
        assert re.fullmatch(r"h[0-9a-f]{64}", meta["uidl"])
        assert "h" + hashlib.sha256((f / "message.eml").read_bytes()).hexdigest() == meta["uidl"]
    assert server.remaining() == []


def test_kept_on_server_is_downloaded_again_but_saved_once(fake_pop3, fake_config, confdir,
                                                           run_popfetchd):
    data = msgs(3, seed=401)
    server = no_uidl_server(fake_pop3, data)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    assert len(folders(config)) == 3
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
    out = res.json()
    assert res.returncode == EX_OK and out["saved"] == [] and out["skipped"] == 3
    assert server.count("RETR") == 6, "the second run must look at every message"
    assert len(folders(config)) == 3 and len(server.remaining()) == 3


def test_uidl_and_list_disagree(fake_pop3, fake_config, confdir, run_popfetchd):
    """UIDL names only message 2: messages 1 and 3 are keyed by content,
    and a second run saves nothing twice."""
    data = msgs(3, seed=402)
    server = fake_pop3(data)
    server.inject("UIDL", b"+OK\r\n2 only-two\r\n7 not-listed\r\n.\r\n", times=None)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    assert "some messages have no valid UIDL" in res.stderr
    assert sorted(m["uidl"] for m in metas(config)) == sorted(
        [key(data[0]), "only-two", key(data[2])])
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    assert len(folders(config)) == 3


def test_invalid_uidls_are_keyed_by_content(fake_pop3, fake_config, confdir, run_popfetchd):
    """Blank, over-long (71 characters), non-printable and duplicated UIDLs
    are no keys: those messages are known by their content instead."""
    data = msgs(4, seed=403)
    server = fake_pop3(data)
    server.inject("UIDL", b"+OK\r\n1 \r\n2 " + b"x" * 71 + b"\r\n3 dup\r\n4 dup\r\n.\r\n",
                  times=None)
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK, res.describe()
    got = sorted(m["uidl"] for m in metas(config))
    assert len(got) == 4 and len(set(got)) == 4, got
    assert key(data[0]) in got and key(data[1]) in got
    assert server.remaining() == []


def test_drop_after_saving_does_not_save_twice(fake_pop3, fake_config, confdir, run_popfetchd):
    """The session dies after the first message was saved (its DELE never
    committed): the next run downloads it again, knows it, deletes it, and
    saves only the others."""
    data = msgs(3, seed=404)
    server = no_uidl_server(fake_pop3, data)
    server.inject("RETR 2", Close(), session=0)
    config = fake_config(server)
    cd = confdir(config)
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == 75
    assert len(folders(config)) == 1 and len(server.remaining()) == 3
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
    out = res.json()
    assert res.returncode == EX_OK, res.describe()
    assert len(out["saved"]) == 2 and out["skipped"] == 1 and out["deleted"] == 3
    assert sorted(m["uidl"] for m in metas(config)) == sorted(key(d) for d in data)
    assert server.remaining() == []


def test_receive_one_without_uidl(fake_pop3, fake_config, confdir, run_popfetchd):
    """MAIL_RECEIVE: each run saves the oldest message not saved before, over
    the ones it must download again to know them."""
    data = msgs(3, seed=405)
    server = no_uidl_server(fake_pop3, data)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    for i in range(3):
        res = run_popfetchd(["--json", "receive", "fake"], confdir=cd)
        assert res.returncode == EX_OK, res.describe()
        assert len(res.json()["saved"]) == 1
        assert [m["uidl"] for m in metas(config)].count(key(data[i])) == 1
    res = run_popfetchd(["--json", "receive", "fake"], confdir=cd)
    assert res.json()["saved"] == [] and res.json()["skipped"] == 3
    assert len(folders(config)) == 3


def test_byte_identical_messages_are_one(fake_pop3, fake_config, confdir, run_popfetchd):
    data = msgs(1, seed=406)
    server = no_uidl_server(fake_pop3, [data[0], data[0]])
    config = fake_config(server)
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK
    assert len(res.json()["saved"]) == 1 and res.json()["skipped"] == 1
    assert server.remaining() == []


def test_state_keeps_records_it_cannot_check(fake_pop3, fake_config, confdir, run_popfetchd):
    """With messages left undownloaded (receive one, keep on server), the
    state is not compacted: their records must survive."""
    data = msgs(3, seed=407)
    server = no_uidl_server(fake_pop3, data)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    for _ in range(2):
        assert run_popfetchd(["receive", "fake"], confdir=cd).returncode == EX_OK
    # a third message arrives first in the list: the two known ones stay known
    server.mailbox.insert(0, server.mailbox.pop())
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
    assert res.json()["saved"] == [] or len(res.json()["saved"]) == 1
    assert len(folders(config)) == 3
    assert len({m["uidl"] for m in metas(config)}) == 3
