"""`popfetchd receive` / `receive-all` against the contract (DESIGN.md §1-§4).

Against the Dovecot fixture: what is saved (folder names, message.eml
byte-exact, meta.json), removal from the server, UIDL state, exit codes,
--json. Against the fake server: dropped connections, hostile responses,
resp-codes, dot-stuffing, an unanswered QUIT.
"""

import datetime
import email.utils
import hashlib
import json
import poplib
import re
import time
from pathlib import Path

import pytest

import dovecot as dovecot_tool
import mailgen
from fakepop3 import Close, Garbage, Overlong, Reply, Script, Stall, Truncate

EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_IOERR = 0, 64, 69, 74
EX_TEMPFAIL, EX_PROTOCOL, EX_NOPERM, EX_CONFIG = 75, 76, 77, 78

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]00:00)$")
FOLDER_NAME = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{12}$")
JSON_KEYS = {"configuration": str, "saved": list, "skipped": int, "deleted": int,
             "errors": list, "exit_code": int}


# --------------------------------------------------------------------------
# helpers


def server_listing(dovecot, mailbox):
    """[(uidl, message bytes as POP3 sends them)] of a Dovecot mailbox, in order."""
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        client.user(mailbox.user)
        client.pass_(mailbox.password)
        uidls = [line.split()[1].decode() for line in client.uidl()[1]]
        bodies = [b"".join(l + b"\r\n" for l in client.retr(n)[1]) for n in range(1, len(uidls) + 1)]
    finally:
        client.quit()
    return list(zip(uidls, bodies))


def folder_hash(config_id, uidl):
    """The hash part of a message folder's name (DESIGN.md §3)."""
    return hashlib.sha256(f"{config_id}\0{uidl}".encode()).hexdigest()[:12]


def folder_time(saved):
    return datetime.datetime.strptime(saved.received, "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)


def parse_rfc3339(text):
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def parse_any_date(text):
    """A date as RFC 5322 or RFC 3339, as an aware datetime (None if neither)."""
    try:
        return email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        pass
    try:
        return parse_rfc3339(text)
    except ValueError:
        return None


def as_text(value):
    """A meta.json value (string, list or object) as one string to search in."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def check_addresses(meta_value, expected, field):
    """Every expected (display name, address) appears, decoded, in the meta value."""
    if not expected:
        assert not meta_value, f"{field}: expected empty, got {meta_value!r}"
        return
    text = as_text(meta_value)
    for name, addr in expected:
        assert addr in text, f"{field}: {addr} not in {text!r}"
        if name:
            assert name in text, f"{field}: display name {name!r} not decoded in {text!r}"


def check_meta(saved, config_id, uidl, data, run_window):
    """meta.json of one folder against the message's own headers."""
    meta, expected = saved.meta, mailgen.expected_headers(data)
    assert meta is not None, f"{saved.path}: no meta.json"
    assert meta["configuration"] == config_id
    assert meta["uidl"] == uidl
    assert meta["size"] == len(saved.eml)
    assert RFC3339_UTC.match(meta["received_at"]), meta["received_at"]
    received = parse_rfc3339(meta["received_at"])
    assert run_window[0] - 1 <= received.timestamp() <= run_window[1] + 1
    assert abs((received - folder_time(saved)).total_seconds()) < 2, "folder name != received_at"
    assert meta["subject"] == mailgen.expected_subject(data)
    assert meta["message_id"].strip("<>") == expected["message_id"].strip("<>")
    assert parse_any_date(meta["date"]) == parse_any_date(expected["date"]), meta["date"]
    check_addresses(meta["from"], expected["from_addresses"], "from")
    check_addresses(meta["to"], expected["to_addresses"], "to")
    check_addresses(meta.get("cc"), expected["cc_addresses"], "cc")


def assert_saved_exactly(saved, config_id, expected, run_window=(0, 2 ** 40)):
    """saved holds exactly one folder per (uidl, bytes) in expected: right
    name, byte-exact message.eml, correct meta.json."""
    by_uidl = {}
    for s in saved:
        assert s.uidl is not None, f"{s.path}: no meta.json or no uidl"
        assert s.uidl not in by_uidl, f"UIDL {s.uidl} saved twice: {by_uidl.get(s.uidl)} {s.path}"
        by_uidl[s.uidl] = s
    assert sorted(by_uidl) == sorted(u for u, _ in expected)
    for uidl, data in expected:
        s = by_uidl[uidl]
        assert s.hash12 == folder_hash(config_id, uidl), s.path.name
        assert s.eml == data, f"{s.path}/message.eml differs from the message sent"
        check_meta(s, config_id, uidl, data, run_window)


def assert_no_staging_leftovers(save_dir):
    """save_directory/.tmp may exist, and hold empty staging directories,
    but no message folder and no file."""
    tmp = Path(save_dir) / ".tmp"
    if tmp.exists():
        leftovers = [p for p in tmp.rglob("*") if p.is_file() or FOLDER_NAME.match(p.name)]
        assert leftovers == [], f"leftovers in {tmp}"


def check_json_shape(doc, config_id):
    for key, kind in JSON_KEYS.items():
        assert key in doc, f"--json output lacks {key!r}: {doc}"
        assert isinstance(doc[key], kind) and not isinstance(doc[key], bool), (key, doc[key])
    assert doc["configuration"] == config_id
    for entry in doc["saved"]:
        assert isinstance(entry["uidl"], str) and isinstance(entry["size"], int)
        folder = Path(entry["folder"])
        assert folder.is_absolute() and folder.is_dir(), entry
        assert (folder / "message.eml").stat().st_size == entry["size"]
    assert all(isinstance(e, str) for e in doc["errors"])


def deliver_generated(mailbox, count, size, seed, with_dots=True):
    """Deliver generated messages (and a dot-stuffing one); returns the bytes."""
    messages = mailgen.generate(count, size, seed)
    if with_dots:
        messages.append(mailgen.dot_message(seed))
    mailbox.deliver(*messages)
    return messages


# --------------------------------------------------------------------------
# against Dovecot


def test_receive_all_saves_every_message(dovecot, mailbox, dovecot_config, confdir,
                                         run_popfetchd, read_saved):
    messages = deliver_generated(mailbox, 10, 6000, seed=11)
    listing = server_listing(dovecot, mailbox)
    assert [data for _, data in listing] == [mailgen.to_crlf(m) for m in messages]
    config = dovecot_config(mailbox)
    cd = confdir(config)

    start = time.time()
    res = run_popfetchd(["receive-all", "dv"], confdir=cd)
    window = (start, time.time())

    assert res.returncode == EX_OK
    saved = read_saved(config["save_directory"])
    assert_saved_exactly(saved, "dv", listing, window)
    assert sorted(Path(l).resolve() for l in res.lines) == sorted(s.path.resolve() for s in saved)
    assert mailbox.count() == 0, "remove_after_read: true leaves the server empty"
    assert_no_staging_leftovers(config["save_directory"])
    assert mailbox.password not in res.stdout + res.stderr, "a secret in the output"


def test_keep_on_server_then_nothing_new(dovecot, mailbox, dovecot_config, confdir,
                                         run_popfetchd, read_saved):
    deliver_generated(mailbox, 6, 4000, seed=12)
    listing = server_listing(dovecot, mailbox)
    config = dovecot_config(mailbox, remove_after_read=False)
    cd = confdir(config)

    first = run_popfetchd(["receive-all", "dv", "--json"], confdir=cd)
    assert first.returncode == EX_OK
    doc = first.json()
    assert (len(doc["saved"]), doc["skipped"], doc["deleted"]) == (len(listing), 0, 0)
    assert mailbox.count() == len(listing), "remove_after_read: false leaves mail alone"
    saved = read_saved(config["save_directory"])
    assert_saved_exactly(saved, "dv", listing)

    second = run_popfetchd(["receive-all", "dv", "--json"], confdir=cd)
    assert second.returncode == EX_OK
    doc = second.json()
    assert (doc["saved"], doc["skipped"], doc["deleted"]) == ([], len(listing), 0)
    assert [s.path for s in read_saved(config["save_directory"])] == [s.path for s in saved]
    assert mailbox.count() == len(listing)


@pytest.mark.parametrize("remove", [True, False], ids=["remove", "keep"])
def test_receive_takes_the_oldest_message_per_run(dovecot, mailbox, dovecot_config, confdir,
                                                  run_popfetchd, read_saved, remove):
    deliver_generated(mailbox, 3, 3000, seed=13, with_dots=False)
    listing = server_listing(dovecot, mailbox)
    config = dovecot_config(mailbox, remove_after_read=remove)
    cd = confdir(config)

    for k, (uidl, data) in enumerate(listing):
        res = run_popfetchd(["receive", "dv"], confdir=cd)
        assert res.returncode == EX_OK
        assert len(res.lines) == 1, "receive saves exactly one message"
        saved = read_saved(config["save_directory"])
        assert len(saved) == k + 1
        newest = next(s for s in saved if s.path.resolve() == Path(res.lines[0]).resolve())
        assert (newest.uidl, newest.eml) == (uidl, data), "not the oldest message"
        assert mailbox.count() == (len(listing) - k - 1 if remove else len(listing))

    res = run_popfetchd(["receive", "dv"], confdir=cd)
    assert res.returncode == EX_OK and res.lines == []
    assert_saved_exactly(read_saved(config["save_directory"]), "dv", listing)


def test_empty_mailbox_is_success(mailbox, dovecot_config, confdir, run_popfetchd, read_saved):
    config = dovecot_config(mailbox)
    cd = confdir(config)
    res = run_popfetchd(["receive-all", "dv"], confdir=cd)
    assert res.returncode == EX_OK and res.stdout == ""
    doc = run_popfetchd(["receive-all", "dv", "--json"], confdir=cd).json()
    assert (doc["saved"], doc["exit_code"], doc["errors"]) == ([], EX_OK, [])
    assert read_saved(config["save_directory"]) == []


def test_wrong_password(mailbox, dovecot_config, confdir, run_popfetchd, read_saved):
    deliver_generated(mailbox, 2, 2000, seed=14, with_dots=False)
    secret = "Wrong-Secret-4711"
    config = dovecot_config(mailbox, password=secret)
    cd = confdir(config)
    res = run_popfetchd(["receive-all", "dv"], confdir=cd)
    assert res.returncode == EX_NOPERM
    assert read_saved(config["save_directory"]) == []
    assert mailbox.count() == 2
    assert secret not in res.stdout + res.stderr, "a secret in the output"


def test_json_on_failure(mailbox, dovecot_config, confdir, run_popfetchd):
    cd = confdir(dovecot_config(mailbox, password="wrong"))
    res = run_popfetchd(["receive-all", "dv", "--json"], confdir=cd)
    assert res.returncode == EX_NOPERM
    doc = res.json()
    check_json_shape(doc, "dv")
    assert doc["exit_code"] == EX_NOPERM and doc["saved"] == [] and doc["errors"]


def test_connection_refused(mailbox, dovecot_config, confdir, run_popfetchd, read_saved):
    port = dovecot_tool.free_ports(1)[0]
    config = dovecot_config(mailbox, port=port)
    res = run_popfetchd(["receive-all", "dv"], confdir=confdir(config))
    assert res.returncode == EX_UNAVAILABLE
    assert read_saved(config["save_directory"]) == []


def test_unknown_key_is_a_config_error(mailbox, dovecot_config, confdir, run_popfetchd):
    cd = confdir(dovecot_config(mailbox, remove_after_raed=True))
    res = run_popfetchd(["receive-all", "dv"], confdir=cd)
    assert res.returncode == EX_CONFIG
    assert "remove_after_raed" in res.stderr, "the error names the key"
    assert "dv.yaml" in res.stderr, "the error names the file"


def test_unknown_id_is_a_config_error(mailbox, dovecot_config, confdir, run_popfetchd):
    cd = confdir(dovecot_config(mailbox))
    res = run_popfetchd(["receive-all", "no-such-id"], confdir=cd)
    assert res.returncode == EX_CONFIG
    assert run_popfetchd(["receive", "no-such-id"], confdir=cd).returncode == EX_CONFIG


@pytest.mark.parametrize("args", [["receive-all"], ["receive", "a", "b"], ["--no-such-option"]],
                         ids=["no-id", "two-ids", "bad-option"])
def test_usage_errors(mailbox, dovecot_config, confdir, run_popfetchd, args):
    cd = confdir(dovecot_config(mailbox))
    assert run_popfetchd(args, confdir=cd).returncode == EX_USAGE


@pytest.mark.parametrize("order", ["before", "after", "mixed"])
def test_json_output(mailbox, dovecot_config, confdir, run_popfetchd, read_saved, order):
    deliver_generated(mailbox, 3, 2000, seed=15, with_dots=False)
    config = dovecot_config(mailbox)
    cd = confdir(config)
    args = {"before": ["-c", cd, "--json", "receive-all", "dv"],
            "after": ["receive-all", "dv", "--json", "-c", cd],
            "mixed": ["--json", "receive-all", "-c", cd, "dv"]}[order]
    res = run_popfetchd(args)
    assert res.returncode == EX_OK
    doc = res.json()
    check_json_shape(doc, "dv")
    assert (doc["exit_code"], doc["skipped"], doc["deleted"], doc["errors"]) == (EX_OK, 0, 3, [])
    saved = read_saved(config["save_directory"])
    assert sorted(Path(e["folder"]).resolve() for e in doc["saved"]) == sorted(
        s.path.resolve() for s in saved)
    assert {e["uidl"] for e in doc["saved"]} == {s.uidl for s in saved}


# --------------------------------------------------------------------------
# against the fake server


def fake_expected(server):
    """[(uidl, bytes)] as the fake server holds them now."""
    return list(zip(server.uidls(), server.remaining()))


def test_drop_in_the_middle_of_retr(fake_pop3, fake_config, confdir, run_popfetchd, read_saved):
    server = fake_pop3(mailgen.generate(3, 4000, seed=21))
    expected = fake_expected(server)
    server.inject("RETR", Truncate(0.5))
    config = fake_config(server)
    cd = confdir(config)

    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_TEMPFAIL
    assert server.wait_idle()
    assert read_saved(config["save_directory"]) == [], "a partial message was saved"
    assert not server.sent("DELE")
    assert_no_staging_leftovers(config["save_directory"])

    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_OK
    assert server.wait_idle()
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert server.remaining() == []


def test_drop_in_a_later_retr_saves_each_once(fake_pop3, fake_config, confdir, run_popfetchd,
                                              read_saved):
    server = fake_pop3(mailgen.generate(4, 3000, seed=22))
    expected = fake_expected(server)
    server.inject("RETR 3", Truncate(0.3))
    config = fake_config(server)
    cd = confdir(config)

    res = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert res.returncode == EX_TEMPFAIL
    assert server.wait_idle()
    assert not any(server.sent(f"DELE {n}") for n in (3, 4)), "DELE of an unsaved message"
    assert len(read_saved(config["save_directory"])) <= 2
    assert_no_staging_leftovers(config["save_directory"])

    assert run_popfetchd(["receive-all", "fake"], confdir=cd).returncode == EX_OK
    assert server.wait_idle()
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert server.remaining() == []


@pytest.mark.parametrize("where", ["greeting", "PASS", "RETR"])
def test_overlong_status_line(fake_pop3, fake_config, confdir, run_popfetchd, read_saved, where):
    overlong = Overlong(2000, then="stall")
    if where == "greeting":
        server = fake_pop3(script=Script(greeting=overlong))
    else:
        server = fake_pop3(mailgen.generate(1, 2000, seed=23))
        server.inject(where, overlong)
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_PROTOCOL
    assert read_saved(config["save_directory"]) == []
    assert not server.sent("DELE")


@pytest.mark.parametrize("greeting", [
    Garbage(64, seed=1, then="stall"),
    Stall(data=b"HTTP/1.1 400 Bad Request\r\n\r\n"),
    Stall(data=b"* OK [CAPABILITY IMAP4rev1] IMAP server ready\r\n"),
    Stall(data=b"\x00\x00\x00\x00\r\n"),
], ids=["random", "http", "imap", "nul"])
def test_garbage_greeting(fake_pop3, fake_config, confdir, run_popfetchd, greeting):
    server = fake_pop3(script=Script(greeting=greeting))
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(fake_config(server)))
    assert res.returncode == EX_PROTOCOL
    assert server.wait_idle()
    assert not server.sent("PASS") and not server.sent("AUTH"), "credentials sent to a non-POP3 server"


@pytest.mark.parametrize("response", [
    b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n",
    b"-ERR [LOGIN-DELAY] Minimum time between logins not yet elapsed\r\n",
    b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n",
], ids=["in-use", "login-delay", "sys-temp"])
def test_temporary_login_failure(fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                                 response):
    server = fake_pop3(mailgen.generate(2, 2000, seed=24))
    server.inject("PASS", Reply(response))
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_TEMPFAIL
    assert read_saved(config["save_directory"]) == []
    assert not server.sent("RETR") and not server.sent("DELE")


@pytest.mark.parametrize("response", [
    b"-ERR [AUTH] bad\r\n",
    b"-ERR Login failed.\r\n",           # Courier: no resp-code
], ids=["auth-code", "courier"])
def test_authentication_refused(fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                                response):
    server = fake_pop3(mailgen.generate(2, 2000, seed=25))
    server.inject("PASS", Reply(response))
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_NOPERM
    assert read_saved(config["save_directory"]) == []
    assert not server.sent("RETR")


def test_dot_lines_round_trip(fake_pop3, fake_config, confdir, run_popfetchd, read_saved):
    edge = (b"From: a@example.org\nTo: b@example.org\nSubject: dots\n"
            b"Message-ID: <edge@example.org>\nDate: Tue, 14 Nov 2023 22:13:20 +0000\n\n"
            b".\n..\n...\n. \n.x\nend\n.\n")
    server = fake_pop3([mailgen.dot_message(31), mailgen.dot_message(32), edge])
    expected = fake_expected(server)
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)


@pytest.mark.parametrize("quit_action", [
    Reply(b"-ERR [SYS/TEMP] Could not commit deletions\r\n"),
    Close(),
], ids=["err", "closed"])
def test_unanswered_quit_deletes_next_time_without_saving_twice(
        fake_pop3, fake_config, confdir, run_popfetchd, read_saved, quit_action):
    server = fake_pop3(mailgen.generate(3, 3000, seed=26))
    expected = fake_expected(server)
    server.inject("QUIT", quit_action)
    config = fake_config(server)
    cd = confdir(config)

    first = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert first.returncode in (EX_OK, EX_TEMPFAIL)
    assert server.wait_idle()
    assert len(server.remaining()) == 3, "the fake server committed nothing"
    saved = read_saved(config["save_directory"])
    assert_saved_exactly(saved, "fake", expected)

    second = run_popfetchd(["receive-all", "fake", "--json"], confdir=cd)
    assert second.returncode == EX_OK
    assert server.wait_idle()
    assert [s.path for s in read_saved(config["save_directory"])] == [s.path for s in saved]
    assert not server.sent("RETR", session=1), "already saved messages retrieved again"
    assert server.count("DELE", session=1) == 3
    assert server.remaining() == []
    doc = second.json()
    assert (doc["saved"], doc["skipped"], doc["deleted"]) == ([], 3, 3)


def test_session_lost_mid_retr_after_old_deletions_saves_each_whole(
        fake_pop3, fake_config, confdir, run_popfetchd, read_saved):
    """A session that sent the DELE of a message saved before is lost in the
    middle of a RETR: the poll goes on in a new session (fewer deletions at
    once). What the lost session had of the message is dropped, never
    continued with the bytes of the new session's RETR."""
    server = fake_pop3(mailgen.generate(3, 3000, seed=27))
    expected = fake_expected(server)
    server.inject("QUIT", Close())
    config = fake_config(server)
    cd = confdir(config)

    first = run_popfetchd(["receive", "fake"], confdir=cd)
    assert first.returncode in (EX_OK, EX_TEMPFAIL), first.stderr
    assert server.wait_idle()
    assert len(server.remaining()) == 3, "the fake server committed nothing"

    server.inject("RETR 2", Truncate(0.5))
    second = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert second.returncode == EX_OK, second.stderr
    assert server.wait_idle()
    assert "going on in a new session" in second.stderr
    assert server.count("DELE 1", session=1) == 1
    assert server.sent("RETR 2", session=2)
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert_no_staging_leftovers(config["save_directory"])
    assert server.remaining() == []
