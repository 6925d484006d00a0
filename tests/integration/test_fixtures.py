"""Checks of the test infrastructure itself: the Dovecot fixture, mailgen,
the fake POP3 server and the configuration writer. They need no popfetchd binary."""

import json
import os
import poplib
import re
import ssl
import subprocess
import tempfile
import time

import pytest

import dovecot as dovecot_tool
import fakepop3
import mailgen
from conftest import ConfDir, to_yaml
from fakepop3 import Close, Reply, Script, Truncate

TIMEOUT = 10


def pop3_login(server, mailbox, mode="plain"):
    """A logged-in poplib client: plain, stls or pop3s."""
    ctx = ssl.create_default_context(cafile=server.ca_file)
    if mode == "pop3s":
        client = poplib.POP3_SSL(server.host, server.pop3s_port, context=ctx, timeout=TIMEOUT)
    else:
        client = poplib.POP3(server.host, server.pop3_port, timeout=TIMEOUT)
        if mode == "stls":
            client.stls(ctx)
    client.user(mailbox.user)
    client.pass_(mailbox.password)
    return client


def retr_bytes(client, n):
    """RETR n as the bytes the server sent (CRLF, dot-unstuffed)."""
    return b"".join(line + b"\r\n" for line in client.retr(n)[1])


# --------------------------------------------------------------------------
# Dovecot


@pytest.mark.parametrize("mode", ["plain", "stls", "pop3s"])
def test_dovecot_serves_delivered_messages(dovecot, mailbox, mode):
    messages = mailgen.generate(3, 4096, seed=7)
    mailbox.deliver(*messages)
    assert mailbox.count() == 3
    client = pop3_login(dovecot, mailbox, mode)
    try:
        count, size = client.stat()
        assert count == 3
        assert size == sum(len(mailgen.to_crlf(m)) for m in messages)
        for n, m in enumerate(messages, 1):
            assert retr_bytes(client, n) == mailgen.to_crlf(m)
        uidls = [l.split()[1].decode() for l in client.uidl()[1]]
        assert all(re.fullmatch(r"[0-9A-Fa-f]{16}", u) for u in uidls)
        assert len(set(uidls)) == 3
    finally:
        client.quit()


def test_dovecot_capabilities(dovecot, mailbox):
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    try:
        caps = client.capa()
        assert "STLS" in caps and "UIDL" in caps and "USER" in caps
        for mech in ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"):
            assert mech in caps["SASL"]
        assert re.search(rb"<[^>]+@[^>]+>", client.getwelcome()), "APOP timestamp"
        client.apop(mailbox.user, mailbox.password)
        assert client.stat() == (0, 0)
    finally:
        client.quit()
    # Dovecot's log process writes the login line asynchronously
    deadline = time.monotonic() + 5
    while not dovecot.login_methods(mailbox.user) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dovecot.login_methods(mailbox.user) == ["APOP"]


def test_dovecot_rejects_wrong_password(dovecot, mailbox):
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=TIMEOUT)
    client.user(mailbox.user)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("wrong")
    client.close()


def test_mailboxes_are_isolated(dovecot, mailbox):
    mailbox.deliver(b"Subject: one\n\nbody\n")
    other = dovecot.mailbox(dovecot.add_user())
    assert other.count() == 0 and mailbox.count() == 1
    client = pop3_login(dovecot, other)
    assert client.stat() == (0, 0)
    client.quit()
    assert mailbox.messages() == [b"Subject: one\n\nbody\n"]


def test_delivery_order_is_pop3_order(dovecot, mailbox):
    messages = [b"Subject: m%d\n\nbody %d\n" % (i, i) for i in range(25)]
    mailbox.deliver(*messages)
    assert mailbox.messages() == messages
    client = pop3_login(dovecot, mailbox)
    try:
        assert [retr_bytes(client, n + 1) for n in range(25)] == [mailgen.to_crlf(m) for m in messages]
        client.dele(1)
    finally:
        client.quit()
    assert mailbox.messages() == messages[1:]


def test_mailbox_reset(dovecot, mailbox):
    mailbox.deliver(b"Subject: x\n\nbody\n")
    pop3_login(dovecot, mailbox).quit()  # creates Dovecot's index files
    mailbox.reset()
    assert mailbox.count() == 0
    assert not [f for f in os.listdir(mailbox.maildir) if f.startswith("dovecot")]
    client = pop3_login(dovecot, mailbox)
    assert client.stat() == (0, 0)
    client.quit()


def test_dovecot_restart_after_kill_and_stop():
    """A killed master leaves a stale pid file; start() copes, stop() stops all."""
    with tempfile.TemporaryDirectory(prefix="pfd-", dir="/tmp") as tmp:
        server = dovecot_tool.Dovecot(tmp, users=1).start()
        try:
            pid = server.pid()
            family = [pid] + dovecot_tool._descendants(pid)
            for p in family:
                try:
                    os.kill(p, 9)
                except ProcessLookupError:
                    pass  # a child that went with its master already
            assert dovecot_tool._wait_gone(family, 5)
            assert os.path.exists(server.pid_path) and server.pid() is None
            server.start()
            assert server.pid() not in (None, pid)
            client = poplib.POP3(server.host, server.pop3_port, timeout=TIMEOUT)
            client.user("user1")
            client.pass_(server.password("user1"))
            client.quit()
        finally:
            pid = server.pid()
            family = [pid] + dovecot_tool._descendants(pid) if pid else []
            server.stop()
        assert server.pid() is None
        # a service process SIGKILLed by stop() may take a moment to go; a pid
        # the system gave to another program since is not Dovecot's
        left = [p for p in family if dovecot_tool._is_dovecot(p)]
        assert dovecot_tool._wait_gone(left, 5), f"Dovecot processes left: {left}"


def test_command_line_up_and_down():
    with tempfile.TemporaryDirectory(prefix="pfd-", dir="/tmp") as tmp:
        script = os.path.join(os.path.dirname(dovecot_tool.__file__), "dovecot.py")
        subprocess.run(["/usr/bin/python3", script, "up", tmp, "--users", "3"],
                       check=True, capture_output=True, timeout=60)
        try:
            server = dovecot_tool.Dovecot.attach(tmp)
            assert server.running() and server.users == ["user1", "user2", "user3"]
        finally:
            subprocess.run(["/usr/bin/python3", script, "down", tmp], check=True, timeout=60)
        assert not server.running()


@pytest.mark.parametrize("name, error", [
    ("server", None), ("expired", "certificate has expired"), ("wronghost", "hostname mismatch")])
def test_test_certificates(dovecot, name, error):
    res = subprocess.run(["openssl", "verify", "-CAfile", dovecot.ca_file,
                          "-verify_hostname", "localhost", "-verify_ip", "127.0.0.1",
                          dovecot.cert_path(name)], capture_output=True, text=True)
    if error is None:
        assert res.returncode == 0, res.stdout + res.stderr
    else:
        assert res.returncode != 0 and error in (res.stdout + res.stderr).lower()


# --------------------------------------------------------------------------
# mailgen


def test_mailgen_is_deterministic_and_decodable():
    messages = mailgen.generate_messages(40, 8192, seed=3)
    assert [m.data for m in messages] == mailgen.generate(40, 8192, seed=3)
    assert mailgen.generate(5, 8192, seed=4) != mailgen.generate(5, 8192, seed=3)
    assert {m.kind for m in messages[:5]} == set(mailgen.KINDS)
    for m in messages:
        assert b"\r" not in m.data
        assert mailgen.expected_subject(m.data) == m.subject
        headers = mailgen.expected_headers(m.data)
        assert headers["message_id"] == m.message_id
        assert headers["from_addresses"] == [(m.from_name, m.from_addr)]
    assert any(b"=?" in m.data.split(b"\n\n")[0] for m in messages), "RFC 2047 headers"
    assert any(m.dot_lines for m in messages)
    mean = sum(len(m.data) for m in messages) / len(messages)
    assert 0.7 * 8192 < mean < 1.3 * 8192


def test_mailgen_cli_fills_a_maildir(dovecot, mailbox, root):
    subprocess.run(["/usr/bin/python3", str(root / "tests/tools/mailgen.py"), "--count", "4",
                    "--size", "2k", "--seed", "5", "--maildir", mailbox.maildir, "--owner", "nobody"],
                   check=True, capture_output=True, timeout=60)
    assert mailbox.messages() == mailgen.generate(4, 2048, 5)
    client = pop3_login(dovecot, mailbox)
    assert client.stat()[0] == 4
    client.quit()


# --------------------------------------------------------------------------
# the fake server


def fake_client(server):
    client = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    client.user(server.user)
    client.pass_(server.password)
    return client


def test_fake_good_mode(fake_pop3):
    messages = [mailgen.dot_message(1)] + mailgen.generate(2, 2048, seed=9)
    server = fake_pop3(messages)
    client = fake_client(server)
    assert client.stat() == (3, sum(len(mailgen.to_crlf(m)) for m in messages))
    assert [retr_bytes(client, n) for n in (1, 2, 3)] == [mailgen.to_crlf(m) for m in messages]
    assert [l.split()[1].decode() for l in client.uidl()[1]] == server.uidls()
    client.dele(1)
    client.dele(3)
    assert client.stat()[0] == 1
    client.quit()
    assert server.wait_idle()
    assert server.remaining() == [mailgen.to_crlf(messages[1])]
    assert server.sessions[0].quit_ok
    assert server.commands()[-4:] == ["DELE 1", "DELE 3", "STAT", "QUIT"]
    assert server.errors == []


def test_fake_maildrop_is_fixed_at_login(fake_pop3):
    """Mail that arrives after the greeting but before the login is in the
    session's maildrop (as in a real server); after the login it is not. The
    record keeps that maildrop: the fault tests map DELE n through it."""
    first, second, third = mailgen.generate(3, 700, seed=12)
    server = fake_pop3([first])
    client = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    server.add(second)                     # after the greeting
    client.user(server.user)
    client.pass_(server.password)
    server.add(third)                      # after the login
    assert client.stat()[0] == 2
    client.quit()
    assert server.wait_idle()
    rec = server.sessions[0]
    assert [d for _, d in rec.maildrop] == [mailgen.to_crlf(m) for m in (first, second)]
    assert [u for u, _ in rec.maildrop] == server.uidls()[:2]


def test_fake_deletions_need_quit(fake_pop3):
    server = fake_pop3([b"Subject: a\n\nx\n", b"Subject: b\n\ny\n"])
    client = fake_client(server)
    client.dele(1)
    client.close()  # no QUIT
    assert server.wait_idle()
    assert len(server.remaining()) == 2
    server.inject("QUIT", Reply(b"-ERR [SYS/TEMP] update failed\r\n"))
    client = fake_client(server)
    client.dele(2)
    with pytest.raises(poplib.error_proto):
        client.quit()
    assert server.wait_idle()
    assert len(server.remaining()) == 2 and not server.sessions[1].quit_ok


def test_fake_fault_injection(fake_pop3):
    server = fake_pop3([b"Subject: a\n\n" + (b"x" * 70 + b"\n") * 100])
    server.inject("RETR", Truncate(0.5))
    client = fake_client(server)
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.retr(1)
    assert server.wait_idle()
    assert server.sent("RETR 1") and not server.sent("DELE")
    client = fake_client(server)          # the fault fired once
    assert len(retr_bytes(client, 1)) > 5000
    client.quit()


def test_fake_in_use_and_sasl_plain(fake_pop3):
    server = fake_pop3([b"Subject: a\n\nx\n"], sasl=["PLAIN"])
    first = fake_client(server)
    second = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    second.user(server.user)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(server.password)
    second.close()
    first.quit()
    third = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    assert "SASL" in third.capa()
    third._shortcmd("AUTH PLAIN " + fakepop3.base64.b64encode(
        f"\0{server.user}\0{server.password}".encode()).decode())
    assert third.stat()[0] == 1
    third.quit()


def test_fake_apop(fake_pop3):
    default = fake_pop3()
    plain = poplib.POP3(default.host, default.port, timeout=TIMEOUT)
    assert b"<" not in plain.getwelcome(), "no APOP timestamp unless asked"
    plain.quit()
    server = fake_pop3([b"Subject: a\n\nx\n"], apop=True)
    client = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    client.apop(server.user, server.password)
    assert client.stat()[0] == 1
    client.quit()


def test_fake_scripted_mode(fake_pop3):
    server = fake_pop3(script=Script(greeting=b"+OK scripted\r\n", steps=[
        ("USER", b"+OK\r\n"),
        ("PASS", b"-ERR [AUTH] bad\r\n"),
        ("QUIT", Close()),
    ]))
    client = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    assert client.getwelcome() == b"+OK scripted"
    with pytest.raises(poplib.error_proto):
        client.capa()  # not in the script: -ERR, recorded as an error
    client.user("u")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] bad"):
        client.pass_("p")
    with pytest.raises((poplib.error_proto, EOFError, OSError)):
        client.quit()
    assert server.wait_idle()
    assert server.commands() == ["CAPA", "USER u", "PASS p", "QUIT"]
    assert len(server.errors) == 1 and "CAPA" in server.errors[0]


def test_fake_overlong_and_garbage(fake_pop3):
    overlong = fake_pop3(script=Script(greeting=fakepop3.Overlong(3000, then="close")))
    with pytest.raises((poplib.error_proto, EOFError, OSError)):
        poplib.POP3(overlong.host, overlong.port, timeout=TIMEOUT)
    garbage = fake_pop3(script=Script(greeting=fakepop3.Garbage(40)))
    with pytest.raises((poplib.error_proto, EOFError, OSError)):
        poplib.POP3(garbage.host, garbage.port, timeout=TIMEOUT)


def test_fake_stls(fake_pop3, dovecot):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(dovecot.cert_path("server"), dovecot.key_path("server"))
    server = fake_pop3([b"Subject: a\n\nx\n"], stls_context=ctx)
    client = poplib.POP3(server.host, server.port, timeout=TIMEOUT)
    assert "STLS" in client.capa()
    client.stls(ssl.create_default_context(cafile=dovecot.ca_file))
    assert "STLS" not in client.capa()
    client.user(server.user)
    client.pass_(server.password)
    assert client.stat()[0] == 1
    client.quit()
    assert server.wait_idle() and server.sessions[0].tls


# --------------------------------------------------------------------------
# the configuration writer (JSON, which is YAML)


def test_yaml_writer(tmp_path):
    config = {"id": "a-1", "port": 110, "remove_after_read": False, "password": "p: #x",
              "tls": "none", "user": "yes", "poll_interval": "5m", "n": "007",
              "sasl_mechanisms": ["SCRAM-SHA-256", "PLAIN"], "timeouts": {"connect": "5s"},
              "description": "Grüße \"q\" \U0001F600", "empty": [], "save_directory": tmp_path}
    text = to_yaml(config)
    assert json.loads(text) == {**config, "save_directory": str(tmp_path)}
    assert '\n  "port": 110,\n' in text and text.endswith("}\n")
    assert "Grüße" in text and "\U0001F600" in text   # no \\u escapes: libyaml would not join surrogates
    cd = ConfDir(tmp_path / "conf", tmp_path / "state")
    path = cd.add(config)
    assert path == cd.files["a-1"] == tmp_path / "conf" / "conf.d" / "a-1.yaml"
    assert oct(path.stat().st_mode & 0o777) == "0o600" and path.read_text() == text
    yaml = pytest.importorskip("yaml")  # a cross-check where PyYAML happens to exist
    assert yaml.safe_load(text)["password"] == "p: #x"
    assert yaml.safe_load(text)["user"] == "yes"
    assert yaml.safe_load(text)["n"] == "007"
