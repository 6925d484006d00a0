"""Servers without UIDL (DESIGN.md §4.3): "UIDL (or, where the server has
none, a key from the message itself)". A message without a valid UIDL is
downloaded and known by its content ("h" + the SHA-256 of its bytes): it is
saved once, never twice, whatever happens to the session. Kept on the server
(remove_after_read: false) it is known by its headers instead where the
server has TOP ("t" + the SHA-256 of its LIST size and the header block of
TOP n 0), so that it is not downloaded again at every poll."""

import hashlib
import json
import re
from pathlib import Path

import fakepop3
import mailgen
from fakepop3 import Close, Reply

EX_OK = 0

NO_UIDL = b"-ERR unknown command\r\n"


def msgs(n, seed):
    return [m.data for m in mailgen.generate_messages(n, 4000, seed=seed)]


def key(data):
    return "h" + hashlib.sha256(fakepop3.to_crlf(data)).hexdigest()


def head_key(data):
    """The header key: LIST size, NUL, the header block through its empty line."""
    data = fakepop3.to_crlf(data)
    block = data[:data.index(b"\r\n\r\n") + 4]
    return "t" + hashlib.sha256(str(len(data)).encode() + b"\0" + block).hexdigest()


def folders(config):
    return sorted(p for p in Path(config["save_directory"]).iterdir()
                  if not p.name.startswith("."))


def metas(config):
    return [json.loads((p / "meta.json").read_text()) for p in folders(config)]


def no_uidl_server(fake_pop3, data, top=True, pipelining=False, **kw):
    """UIDL neither listed in CAPA nor answered; TOP listed (top) or neither
    listed nor answered."""
    caps = ["USER", "RESP-CODES"] + (["TOP"] if top else []) \
        + (["PIPELINING"] if pipelining else [])
    server = fake_pop3(data, capabilities=caps, **kw)
    server.inject("UIDL", NO_UIDL, times=None)
    if not top:
        server.inject("TOP", NO_UIDL, times=None)
    return server


def poll_kept(server, fake_config, confdir, run_popfetchd, polls=2):
    """`polls` runs of receive-all, keeping the messages on the server, each
    exit 0: the configuration and the last run."""
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    for _ in range(polls):
        res = run_popfetchd(["receive-all", "fake"], confdir=cd)
        assert res.returncode == EX_OK, res.describe()
    return config, res


def retrs(server):
    """The RETRs of each session, in order."""
    return [server.count("RETR", session=i) for i in range(len(server.sessions))]


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


def test_kept_without_top_is_downloaded_again_but_saved_once(fake_pop3, fake_config, confdir,
                                                               run_popfetchd):
    """Neither UIDL nor TOP: known by content, downloaded at every poll."""
    data = msgs(3, seed=401)
    server = no_uidl_server(fake_pop3, data, top=False)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    assert len(folders(config)) == 3
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
    out = res.json()
    assert res.returncode == EX_OK and out["saved"] == [] and out["skipped"] == 3
    assert server.count("RETR") == 6, "the second run must look at every message"
    assert server.count("TOP") == 0, "TOP is not asked of a server that does not list it"
    assert len(folders(config)) == 3 and len(server.remaining()) == 3
    assert sorted(m["uidl"] for m in metas(config)) == sorted(key(d) for d in data)


def test_kept_messages_are_known_by_their_headers(fake_pop3, fake_config, confdir,
                                                  run_popfetchd):
    """UIDL disabled, TOP offered (pipelined): over three polls each message
    is saved once and downloaded once, in the first poll only; every poll
    asks TOP n 0 of each."""
    data = msgs(3, seed=408)
    server = no_uidl_server(fake_pop3, data, pipelining=True)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    assert "3 message(s) are known by their headers (TOP)" in res.stderr
    assert sorted(m["uidl"] for m in metas(config)) == sorted(head_key(d) for d in data)
    for i in (1, 2):
        res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
        out = res.json()
        assert res.returncode == EX_OK, res.describe()
        assert out["saved"] == [] and out["skipped"] == 3
    assert retrs(server) == [3, 0, 0], server.transcript
    for i in range(3):
        assert [c for c in server.commands(i) if c.startswith("TOP")] == \
            ["TOP 1 0", "TOP 2 0", "TOP 3 0"]
    # pipelined: the TOPs went out together, before any answer
    assert any(line == "TOP 1 0" and "TOP 2 0" in ahead
               for line, ahead in server.sessions[0].ahead), server.sessions[0].ahead
    assert len(folders(config)) == 3 and len(server.remaining()) == 3


def test_uidl_refused_though_listed(fake_pop3, fake_config, confdir, run_popfetchd):
    """CAPA lists UIDL, UIDL is refused: the same, one command at a time."""
    data = msgs(2, seed=409)
    server = fake_pop3(data, pipelining=False)
    server.inject("UIDL", NO_UIDL, times=None)
    config, _ = poll_kept(server, fake_config, confdir, run_popfetchd)
    assert sorted(m["uidl"] for m in metas(config)) == sorted(head_key(d) for d in data)
    assert retrs(server) == [2, 0]


def test_top_refused_falls_back_to_content(fake_pop3, fake_config, confdir, run_popfetchd):
    """No CAPA at all: TOP is tried; refused, it is not asked again in that
    poll, and the messages are known by their content."""
    data = msgs(3, seed=410)
    server = no_uidl_server(fake_pop3, data, top=False)
    server.inject("CAPA", b"-ERR unknown command\r\n", times=None)
    config, res = poll_kept(server, fake_config, confdir, run_popfetchd)
    assert "the server refused TOP 1" in res.stderr
    assert [server.count("TOP", session=i) for i in range(2)] == [1, 1]
    assert retrs(server) == [3, 3]
    assert sorted(m["uidl"] for m in metas(config)) == sorted(key(d) for d in data)


def test_equal_headers_are_known_by_content(fake_pop3, fake_config, confdir, run_popfetchd):
    """Two messages with the same headers and size but other bodies share a
    header key: both are saved, known by their content (downloaded at every
    poll); one with the same headers and another size has a key of its own."""
    head = b"From: a@example.org\r\nSubject: same\r\nMessage-ID: <same@example.org>\r\n\r\n"
    a, b, c = head + b"body one\r\n", head + b"body two\r\n", head + b"a longer body\r\n"
    server = no_uidl_server(fake_pop3, [a, b, c])
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK, res.describe()
    assert "2 messages without UIDL have the same headers and size" in res.stderr
    assert sorted(m["uidl"] for m in metas(config)) == sorted([key(a), key(b), head_key(c)])
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK and res.json()["saved"] == [] and res.json()["skipped"] == 3
    assert retrs(server) == [3, 2]
    assert len(folders(config)) == 3


def test_saved_by_content_is_downloaded_once_more(fake_pop3, fake_config, confdir,
                                                  run_popfetchd):
    """Messages saved by their content (by a version without header keys, or
    while the server had no TOP) are downloaded once more, not saved again,
    and known by their headers from then on."""
    data = msgs(3, seed=411)
    server = no_uidl_server(fake_pop3, data, top=False)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    server.clear_faults()
    server.inject("UIDL", NO_UIDL, times=None)
    server.capabilities = ["USER", "TOP"]
    for _ in range(2):
        res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
        assert res.returncode == EX_OK, res.describe()
        assert res.json()["saved"] == [] and res.json()["skipped"] == 3
    assert retrs(server) == [3, 3, 0]
    assert sorted(m["uidl"] for m in metas(config)) == sorted(key(d) for d in data)
    state = (cd.state_directory / "fake" / "uidl").read_text()
    assert all(head_key(d) in state for d in data) and not any(key(d) in state for d in data)


def test_long_header_block_is_known_by_content(fake_pop3, fake_config, confdir, run_popfetchd):
    """A header block over 256 KiB gives no header key: that message is
    known by its content, the others by their headers."""
    big = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"y" * 60) for i in range(3500))
    long_head = b"From: a@example.org\r\n" + big + b"Subject: big\r\n\r\nbody\r\n"
    assert len(long_head) > 256 * 1024
    data = [long_head] + msgs(1, seed=412)
    server = no_uidl_server(fake_pop3, data)
    config, res = poll_kept(server, fake_config, confdir, run_popfetchd)
    assert "header block over 256 KiB" in res.stderr
    assert sorted(m["uidl"] for m in metas(config)) == sorted([key(data[0]), head_key(data[1])])
    assert retrs(server) == [2, 1]


def test_top_with_body_lines_keys_the_header_block(fake_pop3, fake_config, confdir,
                                                   run_popfetchd):
    """A server that sends the whole message for TOP n 0: the key is the
    header block's all the same."""
    data = msgs(2, seed=413)

    def whole_message(rec, line):
        if line.upper().startswith("TOP "):
            n = int(line.split()[1])
            return b"+OK\r\n" + fakepop3.dot_stuff(server.mailbox[n - 1].data)
        return None
    server = no_uidl_server(fake_pop3, data, hook=whole_message)
    config, _ = poll_kept(server, fake_config, confdir, run_popfetchd)
    assert sorted(m["uidl"] for m in metas(config)) == sorted(head_key(d) for d in data)
    assert retrs(server) == [2, 0]


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
        [head_key(data[0]), "only-two", head_key(data[2])])
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    assert len(folders(config)) == 3
    assert retrs(server) == [3, 0]


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
    committed): the next run downloads it again, knows it by its content,
    deletes it, and saves only the others."""
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
    # with a record in the state the second poll asks TOP: the first message
    # is downloaded once more and known by its content, the others are saved
    # under their header keys
    assert sorted(m["uidl"] for m in metas(config)) == sorted(
        [key(data[0]), head_key(data[1]), head_key(data[2])])
    assert server.remaining() == []


def test_receive_one_without_uidl(fake_pop3, fake_config, confdir, run_popfetchd):
    """MAIL_RECEIVE: each run saves the oldest message not saved before,
    downloading only that one (the others are known by their headers)."""
    data = msgs(3, seed=405)
    server = no_uidl_server(fake_pop3, data)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    for i in range(3):
        res = run_popfetchd(["--json", "receive", "fake"], confdir=cd)
        assert res.returncode == EX_OK, res.describe()
        assert len(res.json()["saved"]) == 1
        assert [m["uidl"] for m in metas(config)].count(head_key(data[i])) == 1
    res = run_popfetchd(["--json", "receive", "fake"], confdir=cd)
    assert res.json()["saved"] == [] and res.json()["skipped"] == 3
    assert len(folders(config)) == 3
    assert retrs(server) == [1, 1, 1, 0]


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


def test_pipelined_top_refused_starts_over_one_at_a_time(fake_pop3, fake_config, confdir,
                                                          run_popfetchd):
    """Pipelined, an -ERR may answer nothing (a line the server added): the
    keys would go to the wrong messages. The poll goes on in a new session,
    one command at a time."""
    data = msgs(3, seed=414)
    server = no_uidl_server(fake_pop3, data, pipelining=True)
    server.inject("TOP 2", NO_UIDL, session=0)
    config = fake_config(server, remove_after_read=False)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK, res.describe()
    assert "refused TOP 2 among pipelined commands" in res.stderr
    assert retrs(server) == [0, 3]
    assert sorted(m["uidl"] for m in metas(config)) == sorted(head_key(d) for d in data)


def test_kept_then_deleted_is_not_saved_again(fake_pop3, fake_config, confdir, run_popfetchd):
    """Known by their headers while kept; once remove_after_read is on, the
    next poll deletes them without downloading them again. A poll in delete
    mode with an empty state asks no TOP (there is nothing to know)."""
    data = msgs(3, seed=415)
    server = no_uidl_server(fake_pop3, data, pipelining=True)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    cd.add({**config, "remove_after_read": True})
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
    out = res.json()
    assert res.returncode == EX_OK, res.describe()
    assert out["saved"] == [] and out["skipped"] == 3 and out["deleted"] == 3
    assert retrs(server) == [3, 0] and server.remaining() == []
    new = msgs(1, seed=416)
    server.add(new[0])
    res = run_popfetchd(["--json", "receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK and len(res.json()["saved"]) == 1
    assert server.count("TOP", session=2) == 0 and server.remaining() == []
    assert sorted(m["uidl"] for m in metas(config)) == sorted(
        [head_key(d) for d in data] + [key(new[0])])


def test_deletions_left_for_a_later_session_beside_unkeyed_messages(
        fake_pop3, fake_config, confdir, run_popfetchd):
    """A poll goes on in a new session that deletes fewer messages saved
    before at once (the first was lost after their DELEs), and leaves some of
    those DELEs for a third: the second session only deletes and QUITs, also
    when the listing holds a message without UIDL (it is not asked TOP
    there, so the session does not wait for answers to TOPs never sent)."""
    data = msgs(4, seed=406)
    server = fake_pop3(data, uidls=["a", "b", "c", ""])
    server.inject("QUIT", Close(), session=0)
    config = fake_config(server)
    cd = confdir(config)
    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == 75, res.describe()
    assert len(folders(config)) == 4 and len(server.remaining()) == 4

    server.inject("DELE 3", Close(), session=1)
    res = run_popfetchd(["receive-all", "fake"], confdir=cd, timeout=30)
    assert res.returncode == EX_OK, res.describe()
    assert "deletes at most 1 at once" in res.stderr
    assert server.count("DELE", session=2) == 1 and not server.sent("TOP", session=2)
    assert len(folders(config)) == 4
    assert server.remaining() == []
