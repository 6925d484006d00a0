"""The same cases against every real POP3 server the suite can start.

The servers are in tests/tools/server_*.py behind one interface
(tests/tools/popservers.py). Each is started once per test session, on
loopback, without touching the machine's users or services. What a server
sends is the reference: each case reads the mailbox with Python's poplib
first (leaving it as it was) and compares popfetchd's message.eml with it,
byte for byte.
"""

import email
import email.policy
import poplib
import shutil
import tempfile

import pytest

import mailgen
import popservers

EX_OK, EX_PROTOCOL, EX_NOPERM = 0, 76, 77
SERVERS = popservers.names()
_started = {}


@pytest.fixture(scope="session")
def _servers():
    yield _started
    for server, tmp in _started.values():
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(params=SERVERS)
def server(request, _servers):
    """A started server of the interop suite (one instance per session)."""
    name = request.param
    if name not in _servers:
        tmp = tempfile.mkdtemp(prefix=f"pfd-{name[:4]}-", dir="/tmp")
        s = popservers.make(name, tmp)
        try:
            s.start()
        except BaseException:
            s.stop()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _servers[name] = (s, tmp)
    return _servers[name][0]


@pytest.fixture
def box(server):
    mailbox = server.new_mailbox()
    yield mailbox
    mailbox.reset()


@pytest.fixture
def config(server, tmp_path):
    """config(mailbox, id="io", **keys) -> a plain POP3 configuration dict."""
    def make(mailbox, id="io", **overrides):
        save = tmp_path / f"save-{id}"
        save.mkdir(exist_ok=True)
        cfg = {"id": id, "server": server.host, "port": server.pop3_port, "tls": "none",
               "user": mailbox.user, "password": mailbox.password,
               "sasl_mechanisms": server.mechanisms,
               "save_directory": str(save), "remove_after_read": True,
               "timeouts": {"connect": "10s", "command": "30s"}}
        cfg.update(overrides)
        return {k: v for k, v in cfg.items() if v is not None}
    return make


def server_messages(server, mailbox):
    """[(uidl or None, bytes as the server sends them)], read with poplib
    (no DELE: the mailbox stays as it is). Like popfetchd it asks for UTF8
    (RFC 6856) where CAPA lists it: a server may otherwise send a notice in
    place of a message with 8-bit header fields."""
    client = poplib.POP3(server.host, server.pop3_port, timeout=30)
    try:
        if "capa" in server.features and "UTF8" in client.capa():
            client.utf8()
        client.user(mailbox.user)
        client.pass_(mailbox.password)
        count = len(client.list()[1])
        uidls = [None] * count
        if "uidl" in server.features:
            uidls = [line.split()[1].decode() for line in client.uidl()[1]]
        bodies = [b"".join(l + b"\r\n" for l in client.retr(n)[1]) for n in range(1, count + 1)]
    finally:
        client.quit()
    return list(zip(uidls, bodies))


def stable(server, messages):
    """The messages sorted, with what the server rewrites between sessions
    made constant (PopServer.stable)."""
    norm = getattr(server, "stable", lambda data: data)
    return sorted(norm(m) for m in messages)


def receive_all(run_popfetchd, confdir, cfg):
    cd = confdir(cfg)
    return run_popfetchd(["receive-all", cfg["id"]], confdir=cd, timeout=120)


def receive_delivered(messages, server, box, config, confdir, run_popfetchd, read_saved):
    """Deliver the messages and receive-all (exit 0) in delete mode: what
    the server sent (server_messages, read before) and what was saved."""
    box.deliver(*messages)
    expected = server_messages(server, box)
    cfg = config(box)
    r = receive_all(run_popfetchd, confdir, cfg)
    assert r.returncode == EX_OK, r.describe()
    return expected, read_saved(cfg["save_directory"])


def test_receive_all_deletes_what_it_saved(server, box, config, confdir, run_popfetchd,
                                           read_saved):
    expected, saved = receive_delivered(mailgen.generate(4, mean_size=6000, seed=1501),
                                        server, box, config, confdir, run_popfetchd, read_saved)
    assert len(expected) == 4
    assert sorted(s.eml for s in saved) == sorted(body for _, body in expected)
    assert box.count() == 0


def test_keep_mode_saves_each_message_once(server, box, config, confdir, run_popfetchd,
                                           read_saved):
    box.deliver(*mailgen.generate(3, mean_size=4000, seed=1502))
    cfg = config(box, remove_after_read=False)
    cd = confdir(cfg)
    for _ in range(2):
        r = run_popfetchd(["receive-all", cfg["id"]], confdir=cd)
        assert r.returncode == EX_OK, r.describe()
    assert len(read_saved(cfg["save_directory"])) == 3
    assert box.count() == 3
    box.deliver(*mailgen.generate(1, mean_size=4000, seed=1503))
    r = run_popfetchd(["receive-all", cfg["id"]], confdir=cd)
    assert r.returncode == EX_OK, r.describe()
    assert len(read_saved(cfg["save_directory"])) == 4
    assert box.count() == 4


def test_explicit_tls(server, box, config, confdir, run_popfetchd, read_saved):
    """STLS where the server offers it; where it does not, `tls: explicit`
    fails closed (76) and nothing is sent in clear."""
    box.deliver(*mailgen.generate(1, seed=1504))
    cfg = config(box, tls="explicit", tls_ca_file=server.ca_file)
    r = receive_all(run_popfetchd, confdir, cfg)
    if "stls" in server.features:
        assert r.returncode == EX_OK, r.describe()
        assert len(read_saved(cfg["save_directory"])) == 1
    else:
        assert r.returncode == EX_PROTOCOL, r.describe()
        assert "STLS" in r.stderr
        assert read_saved(cfg["save_directory"]) == []
        assert box.count() == 1


def test_implicit_tls(server, box, config, confdir, run_popfetchd, read_saved):
    if "pop3s" not in server.features:
        pytest.skip(f"{server.name} has no implicit TLS port")
    box.deliver(*mailgen.generate(1, seed=1505))
    cfg = config(box, tls="implicit", port=server.pop3s_port, tls_ca_file=server.ca_file)
    r = receive_all(run_popfetchd, confdir, cfg)
    assert r.returncode == EX_OK, r.describe()
    assert len(read_saved(cfg["save_directory"])) == 1


def test_apop(server, box, config, confdir, run_popfetchd, read_saved):
    if "apop" not in server.features:
        pytest.skip(f"{server.name} offers no APOP")
    box.deliver(*mailgen.generate(1, seed=1506))
    cfg = config(box, sasl_mechanisms=["APOP"])
    r = run_popfetchd(["-v", "receive-all", cfg["id"]], confdir=confdir(cfg))
    assert r.returncode == EX_OK, r.describe()
    assert "APOP" in r.stderr
    assert len(read_saved(cfg["save_directory"])) == 1


def test_refused_password_is_77(server, box, config, confdir, run_popfetchd):
    box.deliver(*mailgen.generate(1, seed=1507))
    cfg = config(box, password=box.password + "-wrong")
    r = receive_all(run_popfetchd, confdir, cfg)
    assert r.returncode == EX_NOPERM, r.describe()
    assert box.count() == 1


def test_large_message(server, box, config, confdir, run_popfetchd, read_saved):
    big = mailgen.generate_messages(1, mean_size=20 * 1024 * 1024, seed=1508)[0].data
    expected, saved = receive_delivered([big], server, box, config, confdir, run_popfetchd,
                                        read_saved)
    assert len(saved) == 1 and len(saved[0].eml) > 20 * 1000 * 1000
    assert saved[0].eml == expected[0][1]
    assert box.count() == 0


EIGHT_BIT = ("From: Jürgen Müller <jm@example.org>\n"
             "To: Zoë <z@example.org>\n"
             "Subject: Grüße aus Köln – Rechnung Nr. 7\n"
             "Date: Fri, 04 Dec 2026 10:00:00 +0000\n"
             "Message-ID: <8bit-1@example.org>\n"
             "MIME-Version: 1.0\n"
             "Content-Type: text/plain; charset=utf-8\n"
             "Content-Transfer-Encoding: 8bit\n\n"
             "Schöne Grüße\n").encode()


def test_eight_bit_headers(server, box, config, confdir, run_popfetchd, read_saved):
    expected, saved = receive_delivered([EIGHT_BIT], server, box, config, confdir,
                                        run_popfetchd, read_saved)
    assert [s.eml for s in saved] == [expected[0][1]]
    sent = email.message_from_bytes(expected[0][1], policy=email.policy.default)
    assert saved[0].meta["subject"] == str(sent["subject"])
    assert saved[0].meta["subject"] == "Grüße aus Köln – Rechnung Nr. 7"


TWIN_HEADERS = (b"From: twins@example.org\nTo: z@example.org\n"
                b"Subject: same headers\nDate: Fri, 04 Dec 2026 10:00:00 +0000\n\n")


def test_same_headers_different_bodies(server, box, config, confdir, run_popfetchd, read_saved):
    """A message that differs from one received earlier only in its body is
    another message: saved once, the first not saved again, both deleted in
    the end (a server may derive UIDLs from headers alone and give both the
    same one)."""
    cfg = config(box, remove_after_read=False)
    cd = confdir(cfg)
    for body in (b"first\n", b"second\n", None):
        if body:
            box.deliver(TWIN_HEADERS + body)
        expected = stable(server, [body for _, body in server_messages(server, box)])
        r = run_popfetchd(["receive-all", cfg["id"]], confdir=cd)
        assert r.returncode == EX_OK, r.describe()
        assert stable(server, [s.eml for s in read_saved(cfg["save_directory"])]) == expected
    assert box.count() == 2
    cd.add(dict(cfg, remove_after_read=True))
    r = run_popfetchd(["receive-all", cfg["id"]], confdir=cd)
    assert r.returncode == EX_OK, r.describe()
    assert stable(server, [s.eml for s in read_saved(cfg["save_directory"])]) == expected
    assert box.count() == 0


def test_empty_mailbox(server, box, config, confdir, run_popfetchd, read_saved):
    cfg = config(box)
    r = receive_all(run_popfetchd, confdir, cfg)
    assert r.returncode == EX_OK, r.describe()
    assert read_saved(cfg["save_directory"]) == []
    assert r.stdout == ""



def test_messages_alike_in_their_headers(server, box, config, confdir, run_popfetchd,
                                         read_saved):
    """Messages with the same headers and no Message-ID, Date or Received,
    different bodies. A server that derives UIDLs from those headers only
    (popa3d) lists them all under one UIDL: each is still saved once,
    byte-exact, under a key of its own, not again at the next polls (also
    when one more such message arrives), and deleted when asked."""
    alike = [b"From: a@example.org\nSubject: alike\n\nbody %d\n" % n for n in range(4)]
    box.deliver(*alike[:3])
    expected = server_messages(server, box)
    shared = len({uidl for uidl, _ in expected}) < len(expected)
    cfg = config(box, remove_after_read=False)
    cd = confdir(cfg)
    for _ in range(2):
        r = run_popfetchd(["receive-all", cfg["id"]], confdir=cd)
        assert r.returncode == EX_OK, r.describe()
        assert ("share UIDLs" in r.stderr) == shared, r.describe()
    saved = read_saved(cfg["save_directory"])
    assert sorted(s.eml for s in saved) == sorted(body for _, body in expected)
    assert len({s.uidl for s in saved}) == 3
    box.deliver(alike[3])
    expected = server_messages(server, box)
    r = run_popfetchd(["receive-all", cfg["id"]], confdir=cd)
    assert r.returncode == EX_OK, r.describe()
    saved = read_saved(cfg["save_directory"])
    assert stable(server, [s.eml for s in saved]) == stable(server, [b for _, b in expected])
    assert box.count() == 4
    cd.add({**cfg, "remove_after_read": True})
    r = run_popfetchd(["receive-all", cfg["id"]], confdir=cd)
    assert r.returncode == EX_OK, r.describe()
    assert len(read_saved(cfg["save_directory"])) == 4
    assert box.count() == 0
