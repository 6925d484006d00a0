"""Fault injection: the reliability suite (DESIGN.md §2 exit codes, §4 the
session and "nothing lost").

Each case runs popfetchd against the fake POP3 server with one fault and
checks, besides the exit code (or, for the daemon, that it keeps serving):

  the disk    every folder holds a message the server has or had, byte for
              byte, none twice; no partial folder, nothing left in staging;
  the server  no DELE for a message that is not saved, deletions committed
              only by a QUIT answered +OK, no message gone from the server
              without being saved;

and, where the fault left mail behind, that a run without the fault saves
the rest exactly once and empties the maildrop (`recover`).

Sections (each a parametrized table):
  transport   a drop at every protocol state, mid-RETR at several offsets,
              a trickling server, a stalled or dropped TLS handshake, TLS
              closed without close_notify in the middle of a message;
  framing     responses split at every byte offset, dot-stuffing edges,
              overlong lines, responses that never end, NUL / bare CR /
              bare LF, unsolicited lines;
  content     UIDL (malformed, blank, duplicated, over-long), UIDL and
              LIST that disagree, huge STAT / LIST numbers, -ERR to DELE
              and to QUIT;
  logs        the server's text (responses, SASL names, certificate names)
              is escaped and length-capped on stderr and stdout;
  daemon      one configuration's broken server never disturbs another's.

Run with Debian's python from the repository root:
    /usr/bin/python3 -m pytest tests/integration/test_faults.py -q

Messages without a valid UIDL are fetched and keyed by their content
(DESIGN.md §4.3: "UIDL (or, where the server has none, a key from the
message itself)"): the UIDL cases expect that, saved once and never again.
"""

import json
import socket
import ssl
import subprocess
import time
import unicodedata
from pathlib import Path

import pytest

import dovecot as dovecot_tool
import mailgen
from conftest import SANITIZER_MARKERS, _popfetchd_env, read_saved_messages
from daemonutil import daemon, wait_for  # noqa: F401  (daemon: a fixture)
from fakepop3 import (Action, Close, Garbage, Overlong, Reply, Script, SendThenClose, Stall,
                      Trickle, Truncate, dot_stuff, matches)
from test_receive import (EX_NOPERM, EX_OK, EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE,
                          assert_no_staging_leftovers, assert_saved_exactly)


# --------------------------------------------------------------------------
# faults the fake server does not have


def _nodelay(conn):
    """Nagle off on the fake server's socket: each send is its own segment."""
    try:
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class Chunked(Action):
    """The good response (or `data`) in pieces of `size` bytes, `delay`
    seconds apart, the first cut at `phase` (when not 0): over the phases
    0..size-1 every byte offset of a response is a cut once."""
    commit = True

    def __init__(self, size=1, delay=0.001, phase=0, data=None):
        self.size, self.delay, self.phase, self.data = size, delay, phase, data

    def perform(self, conn, default):
        data = self.data if self.data is not None else (default or b"")
        _nodelay(conn)
        cuts = [0] + list(range(self.phase or self.size, len(data), self.size)) + [len(data)]
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                if not conn.send(data[a:b]):
                    return False
                time.sleep(self.delay)
        return True


class Corked(Action):
    """The good response in pieces of `size` bytes, each its own TLS record
    (over TLS), held back by TCP_CORK until the last: the client's socket
    gets them all at once."""
    commit = True

    def __init__(self, size):
        self.size = size

    def perform(self, conn, default):
        data = default or b""
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            for a in range(0, len(data), self.size):
                if not conn.send(data[a:a + self.size]):
                    return False
        finally:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        return True


class Append(Action):
    """The good response followed, in the same send, by `extra`."""
    commit = True

    def __init__(self, extra):
        self.extra = extra

    def perform(self, conn, default):
        return conn.send((default or b"") + self.extra)


class Transform(Action):
    """The good response passed through fn(bytes) -> bytes."""
    commit = True

    def __init__(self, fn):
        self.fn = fn

    def perform(self, conn, default):
        return conn.send(self.fn(default or b""))


class HandshakeDrop(Action):
    """Send `prefix` (the +OK to STLS, or nothing for implicit TLS), read
    the client's ClientHello, answer it with `share` of the server's first
    flight (0.0: nothing), then close without a TLS alert."""

    def __init__(self, context, share=0.0, prefix=b""):
        self.context, self.share, self.prefix = context, share, prefix

    def perform(self, conn, default):
        if self.prefix and not conn.send(self.prefix):
            return False
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not conn.server.stopping.is_set():
            try:
                chunk = conn.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return False
            if not chunk:
                return False
            incoming.write(chunk)
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                flight = outgoing.read()
                if flight:      # the ClientHello is complete: the answer is ready
                    conn.send(flight[:int(len(flight) * self.share)])
                    return False
            except ssl.SSLError:
                return False
        return False


# --------------------------------------------------------------------------
# the fake server, watched


class Views:
    """The maildrop each session saw, as the server fixed it at login (mail
    added during the session's greeting is in it or not, as the server
    decided), so that "DELE n" can be mapped to its message. As the fake
    server's hook it passes every call on to `inner` (an Action for the
    command, or None)."""

    def __init__(self, inner=None):
        self.server, self.inner = None, inner

    @property
    def by_session(self):
        return {rec.index: rec.maildrop for rec in self.server.sessions
                if rec.maildrop is not None}

    def __call__(self, record, line):
        return self.inner(record, line) if self.inner else None


def pop3(fake_pop3, messages=(), hook=None, **kw):
    """A started fake server whose sessions' maildrops are noted (.views)."""
    views = Views(hook)
    server = fake_pop3(messages, hook=views, **kw)
    views.server = server
    server.views = views
    return server


def served(data):
    """A message's bytes as a client must save them: RETR carries a final
    CRLF even when the message has none (RFC 1939 §3)."""
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def snapshot(server):
    """[(uidl, bytes)] on the server now."""
    return list(zip(server.uidls(), server.remaining()))


def small_messages(count, seed, size=700):
    """`count` distinct generated messages (LF; the fake server sends CRLF)."""
    return mailgen.generate(count, size, seed)


# --------------------------------------------------------------------------
# the invariants every case checks


def check_invariants(server, config, as_saved=served):
    """What holds after any run, whatever the fault; returns the saved folders.

    as_saved(bytes on the server) -> the bytes a client saves for it."""
    assert server.wait_idle(), "the fake server's sessions did not end"
    views = server.views.by_session
    known = {as_saved(d) for view in views.values() for _, d in view}
    saved = read_saved_messages(config["save_directory"])
    emls = [s.eml for s in saved]
    for s in saved:
        assert s.eml is not None and s.meta is not None, f"{s.path}: an incomplete folder"
        assert s.eml in known, f"{s.path}/message.eml is not byte-exact any message the server had"
        assert s.meta["size"] == len(s.eml)
    twice = [s.path.name for s in saved if emls.count(s.eml) > 1]
    assert not twice, f"a message saved more than once: {twice}"
    keys = [s.uidl for s in saved]
    assert len(set(keys)) == len(keys), f"a key recorded twice: {keys}"
    assert_no_staging_leftovers(config["save_directory"])

    saved_bytes = set(emls)
    for rec in server.sessions:
        view = views.get(rec.index, [])
        for command in rec.commands:
            if matches("DELE", command):
                n = int(command.split()[1])
                assert 1 <= n <= len(view), f"DELE {n} of a {len(view)}-message maildrop"
                assert as_saved(view[n - 1][1]) in saved_bytes, \
                    f"session {rec.index}: DELE {n} of a message that is not saved"
        if rec.committed:
            assert rec.quit_ok
    remaining = {as_saved(d) for d in server.remaining()}
    lost = [u for view in views.values() for u, d in view
            if as_saved(d) not in remaining and as_saved(d) not in saved_bytes]
    assert not lost, f"gone from the server without being saved: {lost}"
    return saved


def receive_all(run_popfetchd, cd, config_id="fake", *extra):
    return run_popfetchd(["receive-all", config_id, "--json", *extra], confdir=cd)


def run_fault(run_popfetchd, cd, server, config, code):
    """One receive-all with the fault: the exit code, the invariants; the
    saved folders. Deletions count only when the server answered QUIT +OK."""
    first = len(server.sessions)
    res = receive_all(run_popfetchd, cd)
    assert res.returncode == code, f"exit {res.returncode}, expected {code}"
    doc = res.json()
    assert doc["exit_code"] == code
    assert (doc["errors"] != []) == (code != EX_OK), doc["errors"]
    saved = check_invariants(server, config)
    if not any(r.quit_ok for r in server.sessions[first:]):
        assert doc["deleted"] == 0, "deletions reported that the server never committed"
    return saved


def recover(run_popfetchd, cd, server, config, expected):
    """The fault is gone: one run saves what is left exactly once, deletes
    everything, and the folders hold exactly `expected` ([(uidl, bytes)])."""
    before = len(read_saved_messages(config["save_directory"]))
    server.clear_faults()
    res = receive_all(run_popfetchd, cd)
    assert res.returncode == EX_OK
    doc = res.json()
    assert len(doc["saved"]) == len(expected) - before, "saved again, or not at all"
    check_invariants(server, config)
    assert_saved_exactly(read_saved_messages(config["save_directory"]), config["id"], expected)
    assert server.remaining() == []
    return doc


# --------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The test PKI (tests/tools/dovecot.py): ca.crt, server.crt/.key for
    127.0.0.1 and localhost."""
    tls_dir = tmp_path_factory.mktemp("pki")
    dovecot_tool.make_test_pki(str(tls_dir))
    return tls_dir


def server_context(pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    return ctx


def tls_keys(pki, mode):
    """fake server keyword and configuration keys for a TLS mode."""
    server_kw = {"implicit": {"tls_context": server_context(pki)},
                 "explicit": {"stls_context": server_context(pki)}, "none": {}}[mode]
    config_kw = {"tls": mode}
    if mode != "none":
        config_kw["tls_ca_file"] = str(pki / "ca.crt")
    return server_kw, config_kw


# ==========================================================================
# transport
# ==========================================================================

# (id, command, fault, fake server keywords, configuration keys, messages saved by the faulty run)
DROPS = [
    ("greeting-closed", "GREETING", Close(), {}, {}, 0),
    ("greeting-half-line", "GREETING", Truncate(10), {}, {}, 0),
    ("capa-closed", "CAPA", Close(), {}, {}, 0),
    ("capa-mid-listing", "CAPA", Truncate(0.6), {}, {}, 0),
    ("user-closed", "USER", Close(), {}, {}, 0),
    ("pass-closed", "PASS", Close(), {}, {}, 0),
    ("pass-status-without-crlf", "PASS", Truncate(3), {}, {}, 0),
    ("auth-plain-closed", "AUTH", Close(), {"sasl": ["PLAIN"]}, {}, 0),
    ("auth-scram-closed-before-outcome", "AUTH", Close(), {"sasl": ["SCRAM-SHA-256"]}, {}, 0),
    ("apop-closed", "APOP", Close(), {"apop": True}, {"sasl_mechanisms": ["APOP"]}, 0),
    ("utf8-closed", "UTF8", Close(), {"capabilities": ["UIDL", "USER", "UTF8"]}, {}, 0),
    ("uidl-closed", "UIDL", Close(), {}, {}, 0),
    ("uidl-mid-listing", "UIDL", Truncate(0.5), {}, {}, 0),
    ("list-closed", "LIST", Close(), {}, {}, 0),
    ("list-mid-listing", "LIST", Truncate(0.5), {}, {}, 0),
    # the three are committed as one batch before the first DELE
    ("dele-closed", "DELE 1", Close(), {}, {}, 3),
    ("between-dele-and-quit", "DELE 3", SendThenClose(b"+OK Marked to be deleted.\r\n"), {}, {}, 3),
    ("quit-status-without-crlf", "QUIT", Truncate(3), {}, {}, 3),
    ("quit-half-line", "QUIT", Truncate(10), {}, {}, 3),
]


@pytest.mark.parametrize("where, fault, server_kw, config_kw, nsaved",
                         [d[1:] for d in DROPS], ids=[d[0] for d in DROPS])
def test_drop_at_every_state(fake_pop3, fake_config, confdir, run_popfetchd,
                             where, fault, server_kw, config_kw, nsaved):
    """A connection lost anywhere is exit 75; what is saved is whole, and
    nothing the server deletes is unsaved; the next run completes the job."""
    server = pop3(fake_pop3, small_messages(3, seed=101), **server_kw)
    expected = snapshot(server)
    server.inject(where, fault)
    config = fake_config(server, **config_kw)
    cd = confdir(config)

    saved = run_fault(run_popfetchd, cd, server, config, EX_TEMPFAIL)
    assert len(saved) == nsaved
    assert server.sent(where) or where == "GREETING", "the fault never fired"
    assert not any(r.committed for r in server.sessions), "deletions committed without QUIT +OK"
    recover(run_popfetchd, cd, server, config, expected)


def retr_response(data):
    return f"+OK {len(data)} octets\r\n".encode() + dot_stuff(data)


# where the response to RETR 2 (of 3) ends: a byte count, from its start (>= 0) or its end (< 0)
RETR_CUTS = {
    "nothing": 0,
    "in-status": 3,
    "after-status": "status",
    "one-data-byte": "status+1",
    "mid-data": 0.5,
    "before-terminator": -3,       # ...CRLF
    "crlf-dot": -2,                # ...CRLF "."
    "crlf-dot-cr": -1,             # ...CRLF "." CR
}


@pytest.mark.parametrize("mode", ["none", "implicit"])
@pytest.mark.parametrize("cut", RETR_CUTS.values(), ids=RETR_CUTS.keys())
def test_drop_mid_retr(fake_pop3, fake_config, confdir, run_popfetchd, pki, cut, mode):
    """The connection ends inside the second RETR (over TLS: without
    close_notify): exit 75, the first message saved, nothing of the second."""
    server_kw, config_kw = tls_keys(pki, mode)
    server = pop3(fake_pop3, small_messages(3, seed=102, size=1500), **server_kw)
    expected = snapshot(server)
    response = retr_response(expected[1][1])
    status = response.index(b"\r\n") + 2
    n = {"status": status, "status+1": status + 1}.get(cut, cut)
    n = int(len(response) * n) if isinstance(n, float) else n if n >= 0 else len(response) + n
    server.inject("RETR 2", Truncate(n))
    config = fake_config(server, **config_kw)
    cd = confdir(config)

    saved = run_fault(run_popfetchd, cd, server, config, EX_TEMPFAIL)
    assert [s.uidl for s in saved] == [expected[0][0]]
    assert server.count("DELE") <= 1 and not server.sent("DELE 2")
    recover(run_popfetchd, cd, server, config, expected)


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
@pytest.mark.parametrize("share", [0.3, 0.9])
def test_tls_closed_without_close_notify_mid_message(fake_pop3, fake_config, confdir,
                                                     run_popfetchd, pki, mode, share):
    """TLS ends (TCP closed, no close_notify) inside the first message:
    exit 75, nothing of that message kept, nothing deleted."""
    server_kw, config_kw = tls_keys(pki, mode)
    server = pop3(fake_pop3, small_messages(2, seed=103, size=20000), **server_kw)
    expected = snapshot(server)
    server.inject("RETR 1", Truncate(share))
    config = fake_config(server, **config_kw)
    cd = confdir(config)

    saved = run_fault(run_popfetchd, cd, server, config, EX_TEMPFAIL)
    assert saved == [] and not server.sent("DELE")
    assert server.sessions[0].tls
    recover(run_popfetchd, cd, server, config, expected)


STLS_OK = b"+OK Begin TLS negotiation now\r\n"

# (id, TLS mode, where: a command, "HELLO" (the first bytes of implicit TLS)
# or "CAPA-IN-TLS" (the CAPA after STLS), the fault: fn(server context), exit)
TLS_OPENINGS = [
    ("stls-closed", "explicit", "STLS", lambda ctx: Close(), EX_TEMPFAIL),
    ("stls-ok-then-closed", "explicit", "STLS", lambda ctx: SendThenClose(STLS_OK), EX_PROTOCOL),
    ("explicit-handshake-no-answer", "explicit", "STLS",
     lambda ctx: HandshakeDrop(ctx, 0.0, STLS_OK), EX_PROTOCOL),
    ("explicit-handshake-half-flight", "explicit", "STLS",
     lambda ctx: HandshakeDrop(ctx, 0.5, STLS_OK), EX_PROTOCOL),
    ("capa-inside-tls-closed", "explicit", "CAPA-IN-TLS", lambda ctx: Close(), EX_TEMPFAIL),
    ("implicit-handshake-no-answer", "implicit", "HELLO", lambda ctx: HandshakeDrop(ctx, 0.0),
     EX_PROTOCOL),
    ("implicit-handshake-half-flight", "implicit", "HELLO", lambda ctx: HandshakeDrop(ctx, 0.5),
     EX_PROTOCOL),
    ("greeting-inside-tls-closed", "implicit", "GREETING", lambda ctx: Close(), EX_TEMPFAIL),
]


@pytest.mark.parametrize("mode, where, fault, code", [t[1:] for t in TLS_OPENINGS],
                         ids=[t[0] for t in TLS_OPENINGS])
def test_drop_in_tls_opening(fake_pop3, fake_config, confdir, run_popfetchd, pki, mode, where,
                             fault, code):
    """A drop at STLS, or once TLS is up, is a lost connection (75). One in
    the TLS handshake — before the server's answer, or in the middle of its
    first flight — is a handshake that failed (76, DESIGN.md §2), with
    implicit TLS too (not "cannot connect", 69: TCP was up). Never a
    credential, at once, nothing saved."""
    ctx = server_context(pki)
    server_kw, config_kw = tls_keys(pki, mode)
    action = fault(ctx)
    if where == "HELLO":
        server = pop3(fake_pop3, script=Script(greeting=action))
    elif where == "CAPA-IN-TLS":
        server = pop3(fake_pop3, small_messages(1, seed=104), stls_context=ctx,
                      hook=lambda rec, line: action if rec.tls and matches("CAPA", line) else None)
    else:
        server = pop3(fake_pop3, small_messages(1, seed=104), **server_kw)
        server.inject(where, action)
    config = fake_config(server, **config_kw)
    start = time.monotonic()
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == code
    assert time.monotonic() - start < 4, "the failure waited for a timeout"
    check_invariants(server, config)
    assert read_saved_messages(config["save_directory"]) == []
    for verb in ("USER", "PASS", "AUTH", "APOP", "RETR"):
        assert not server.sent(verb), f"{verb} after a failed TLS opening"


@pytest.mark.parametrize("where", ["GREETING", "CAPA", "UIDL", "LIST", "RETR"])
def test_one_byte_at_a_time_is_a_stall(fake_pop3, fake_config, confdir, run_popfetchd, where):
    """A server trickling one byte every 100 ms: the command timeout (1 s)
    fires — for a status line because its first line did not arrive in
    time, for data because less than 1 KiB came in a window: exit 75."""
    server = pop3(fake_pop3, small_messages(2, seed=106, size=3000))
    expected = snapshot(server)
    server.inject(where, Trickle(delay=0.1, chunk=1))
    config = fake_config(server, timeouts={"connect": "5s", "command": "1s"})
    cd = confdir(config)
    start = time.monotonic()
    saved = run_fault(run_popfetchd, cd, server, config, EX_TEMPFAIL)
    assert time.monotonic() - start < 4
    assert saved == [] and not server.sent("DELE")
    recover(run_popfetchd, cd, server, config, expected)


# ==========================================================================
# framing
# ==========================================================================


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_every_response_in_small_chunks(fake_pop3, fake_config, confdir, run_popfetchd, size):
    """Every response (greeting, CAPA, USER, PASS, UIDL, LIST, RETR, DELE,
    QUIT) arrives in pieces of 1..8 bytes: with size 1 every byte offset is
    a read boundary, inside CRLF, "CRLF.." and "CRLF.CRLF" too."""
    messages = [mailgen.dot_message(107), *small_messages(2, seed=107, size=600)]
    server = pop3(fake_pop3, messages, hook=lambda rec, line: Chunked(size))
    expected = snapshot(server)
    config = fake_config(server)
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_OK
    check_invariants(server, config)
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "fake", expected)
    assert server.remaining() == []


@pytest.mark.parametrize("size", [5, 300])
def test_tls_records_back_to_back(fake_pop3, fake_config, confdir, run_popfetchd, pki, size):
    """Over implicit TLS every response comes as records of `size` bytes
    that reach the client's socket at once, then nothing until the next
    command. popfetchd has OpenSSL read ahead (all the records the socket
    holds in one read): it must read on from OpenSSL's buffer, not wait for
    the quiet socket until the command timeout ends the session."""
    messages = [mailgen.dot_message(108), *small_messages(3, seed=108, size=20000)]
    server_kw, config_kw = tls_keys(pki, "implicit")
    server = pop3(fake_pop3, messages, hook=lambda rec, line: Corked(size), **server_kw)
    expected = snapshot(server)
    config = fake_config(server, **config_kw, timeouts={"connect": "5s", "command": "2s"})
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_OK, res.stderr
    check_invariants(server, config)
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "fake", expected)
    assert server.remaining() == []


class CorkedHandshake(ssl.SSLContext):
    """A server context whose handshake waits (TCP_CORK) to go out with
    what follows it: TLS 1.2's last flight and the greeting in one piece."""

    def wrap_socket(self, sock, *args, **kw):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        return super().wrap_socket(sock, *args, **kw)


def test_tls12_greeting_with_the_handshake_end(fake_pop3, fake_config, confdir, run_popfetchd,
                                               pki):
    """TLS 1.2 over implicit TLS: the server's last handshake flight and the
    greeting arrive together, and OpenSSL reads both ahead while it ends the
    handshake. The greeting waits in its buffer with the socket quiet: the
    session must read it there, not time out waiting for it."""
    ctx = CorkedHandshake(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server = pop3(fake_pop3, small_messages(2, seed=109), tls_context=ctx)
    server.inject("GREETING", Corked(1 << 20))
    expected = snapshot(server)
    _, config_kw = tls_keys(pki, "implicit")
    config = fake_config(server, **config_kw, timeouts={"connect": "5s", "command": "2s"})
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_OK, res.stderr
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "fake", expected)


EDGE_HEADER = (b"From: a@example.org\r\nTo: b@example.org\r\nSubject: edge %02d\r\n"
               b"Message-ID: <edge-%02d@example.org>\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\n")


@pytest.mark.parametrize("period", [7, 11])
def test_retr_split_at_every_offset(fake_pop3, fake_config, confdir, run_popfetchd, period):
    """`period` messages of the same shape; the RETR response of message j
    is cut at every offset = j (mod period): together, every byte offset of
    the response — in the status line, in "CRLF..", in "CRLF.CRLF" — is a
    read boundary once."""
    body = b"line\r\n.\r\n..\r\n...\r\n. x\r\nend\r\n.\r\n"
    messages = [EDGE_HEADER % (j, j) + body for j in range(period)]

    def hook(record, line):
        if matches("RETR", line):
            return Chunked(period, delay=0.002, phase=(int(line.split()[1]) - 1) % period)
        return None
    server = pop3(fake_pop3, messages, hook=hook, crlf=False)
    expected = snapshot(server)
    config = fake_config(server)
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_OK
    check_invariants(server, config)
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "fake", expected)


# message bodies after EDGE_HEADER, as the maildrop holds them (CRLF, unstuffed)
DOT_EDGES = {
    "dot-line": b"before\r\n.\r\nafter\r\n",
    "dotdot-line": b"..\r\n",
    "dotdotdot-line": b"...\r\n",
    "dot-space-and-dot-x": b". \r\n.x\r\n",
    "last-line-dot": b"text\r\n.\r\n",                  # on the wire: CRLF "..", then CRLF.CRLF
    "last-line-dotdot": b"text\r\n..\r\n",
    "only-dot-lines": b".\r\n" * 5,
    "no-final-crlf": b"the last line has no CRLF",
    "no-final-crlf-dot": b"text\r\n.",                 # saved with the CRLF RETR adds
    "empty-body": b"",
    "lf-then-dot-crlf": b"a\n.\r\nb\r\n",              # bare LF: "\n.\r\n" ends nothing
    "cr-then-dot-crlf": b"a\r.\r\nb\r\n",
    "dot-bare-cr": b".\rx\r\n",
    "dot-bare-lf": b".\n.\nend\r\n",
    "nul-bytes": b"a\x00b\r\n\x00\r\n",
    "8bit-bytes": bytes(range(0x80, 0x100)) + b"\r\n",
    "line-of-100k": b"x" * 100000 + b"\r\n",
}


@pytest.mark.parametrize("body", DOT_EDGES.values(), ids=DOT_EDGES.keys())
def test_dot_stuffing_edges(fake_pop3, fake_config, confdir, run_popfetchd, body):
    """The message is saved exactly as the server holds it (plus the final
    CRLF that RETR adds when it has none), whatever its lines."""
    first = EDGE_HEADER % (1, 1) + body
    other = EDGE_HEADER % (2, 2) + b"a plain one\r\n"
    server = pop3(fake_pop3, [first, other], crlf=False)
    config = fake_config(server)
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_OK
    check_invariants(server, config)
    saved = read_saved_messages(config["save_directory"])
    assert sorted(s.eml for s in saved) == sorted([served(first), other])
    assert server.remaining() == []


def test_starts_with_a_dot_and_an_empty_message(fake_pop3, fake_config, confdir, run_popfetchd):
    """A message whose very first line starts with "." (stuffed at the
    first byte of the data), and one of zero octets ("+OK" then "."): both
    saved as they are."""
    dotted = b".first line\r\n" + EDGE_HEADER % (3, 3) + b"body\r\n"
    server = pop3(fake_pop3, [dotted, b""], crlf=False)
    server.inject("RETR 2", Reply(b"+OK 0 octets\r\n.\r\n"))
    config = fake_config(server)
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_OK
    check_invariants(server, config, as_saved=lambda d: d if d == b"" else served(d))
    saved = read_saved_messages(config["save_directory"])
    assert sorted(s.eml for s in saved) == [b"", dotted]
    assert server.remaining() == []


def _long_listing(prefix, line):
    return Reply(b"+OK\r\n" + prefix + line + b"\r\n.\r\n")


# (id, command, response, expected exit); an X is 1 octet, a line's limit is
# 512 octets with its CRLF (RFC 2449 §4 for the first line; popfetchd holds
# every response line to it)
OVERLONG = [
    ("retr-status-512", "RETR 1", "status:506", EX_OK),
    ("retr-status-513", "RETR 1", "status:507", EX_PROTOCOL),
    ("greeting-513", "GREETING", Reply(b"+OK " + b"x" * 507 + b"\r\n"), EX_PROTOCOL),
    ("user-100k-then-close", "USER", Overlong(100000, then="close"), EX_PROTOCOL),
    ("capa-line-600", "CAPA", _long_listing(b"X-LONG ", b"x" * 593), EX_PROTOCOL),
    ("uidl-line-600", "UIDL", _long_listing(b"1 ", b"u" * 598), EX_PROTOCOL),
    ("list-line-600", "LIST", _long_listing(b"1 ", b"1" * 598), EX_PROTOCOL),
    ("uidl-line-without-end", "UIDL", Overlong(5000, prefix=b"+OK\r\n1 ", then="close"),
     EX_PROTOCOL),
    ("retr-status-100k-then-close", "RETR 1", Overlong(100000, then="close"), EX_PROTOCOL),
]


@pytest.mark.parametrize("where, response, code", [o[1:] for o in OVERLONG],
                         ids=[o[0] for o in OVERLONG])
def test_overlong_lines(fake_pop3, fake_config, confdir, run_popfetchd, where, response, code):
    """A status or listing line over 512 octets is a protocol failure (76)
    — also when the server closes after it — with nothing saved; at 512 it
    is fine. (Long lines inside a message are content: DOT_EDGES.)"""
    server = pop3(fake_pop3, small_messages(2, seed=108))
    expected = snapshot(server)
    if isinstance(response, str):
        width = int(response.split(":")[1])
        data = expected[0][1]
        response = Reply(b"+OK " + b"x" * width + b"\r\n" + dot_stuff(data))
    server.inject(where, response)
    config = fake_config(server)
    cd = confdir(config)
    saved = run_fault(run_popfetchd, cd, server, config, code)
    if code == EX_OK:
        assert len(saved) == 2 and server.remaining() == []
        return
    assert saved == [] and not server.sent("DELE")
    recover(run_popfetchd, cd, server, config, expected)


class Endless(Action):
    """`first`, then `line` over and over (~100 KB/s: never a stall) until
    the client hangs up."""

    def __init__(self, first, line):
        self.first, self.line = first, line

    def perform(self, conn, default):
        ok = conn.send(self.first)
        while ok and not conn.server.stopping.is_set():
            ok = conn.send(self.line)
            time.sleep(0.0005)
        return False


def _sasl_forever(mechanism):
    """A server offering only `mechanism` that answers every line of the
    exchange with another "+ " continuation."""
    return Script(steps=[("CAPA", b"+OK\r\nSASL %s\r\n.\r\n" % mechanism)],
                  then=Reply(b"+ \r\n"))


# (id, the server's script or (command, fault))
ENDLESS = [
    ("capa-listing", ("CAPA", Endless(b"+OK\r\n", b"X-CAPABILITY " + b"x" * 50 + b"\r\n"))),
    ("sasl-plain", _sasl_forever(b"PLAIN")),
    ("sasl-login", _sasl_forever(b"LOGIN")),
    ("sasl-cram-md5", _sasl_forever(b"CRAM-MD5")),
    ("sasl-scram-sha-256", _sasl_forever(b"SCRAM-SHA-256")),
]


@pytest.mark.parametrize("how", [e[1] for e in ENDLESS], ids=[e[0] for e in ENDLESS])
def test_response_that_never_ends(fake_pop3, fake_config, confdir, run_popfetchd, how):
    """A server that keeps a response going — capability lines fast enough
    never to be a stall, SASL continuations answered for ever — is cut
    short: exit 76 at once, not a session that never ends (in the daemon,
    a configuration never polled again and a session slot taken for good).
    A RETR or listing that never ends is bounded by LIST's size and by
    POP3_MAX_MESSAGES (test_storage.py, HUGE)."""
    if isinstance(how, Script):
        server = pop3(fake_pop3, script=how)
    else:
        server = pop3(fake_pop3, small_messages(1, seed=123))
        server.inject(*how)
    config = fake_config(server, timeouts={"connect": "5s", "command": "5s"})
    start = time.monotonic()
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_PROTOCOL
    assert time.monotonic() - start < 4, "ended by a timeout, not by a bound"
    check_invariants(server, config)
    assert read_saved_messages(config["save_directory"]) == []
    assert not server.sent("RETR") and not server.sent("DELE")


def _lf_lines(data):
    return data.replace(b"\r\n", b"\n")


def _lf_status_only(data):
    status, _, rest = data.partition(b"\r\n")
    return status + b"\n" + rest


# (id, command, response, expected exit). Decided: a NUL or bare CR inside a
# status line's text is harmless (the text is only logged, escaped); bare LF
# ends a status or listing line (old servers do that); "+OK" must be
# followed by a space or the line's end; a LIST line must be numbers.
# Message data is framed strictly: a line ends only at CRLF, the message
# only at CRLF.CRLF (DOT_EDGES).
ODD_BYTES = [
    ("greeting-nul", "GREETING", Reply(b"+OK hello\x00world\r\n"), EX_OK),
    ("greeting-bare-cr", "GREETING", Reply(b"+OK hello\rworld\r\n"), EX_OK),
    ("greeting-bare-lf", "GREETING", Reply(b"+OK hello\n"), EX_OK),
    ("status-and-listings-bare-lf", "*", None, EX_OK),
    ("retr-status-bare-lf", "RETR", Transform(_lf_status_only), EX_OK),
    ("ok-then-nul", "USER", Reply(b"+OK\x00\r\n"), EX_PROTOCOL),
    ("nul-status", "PASS", Reply(b"\x00+OK\r\n"), EX_PROTOCOL),
    ("bare-cr-status", "UIDL", Reply(b"\r+OK\r\n1 a\r\n.\r\n"), EX_PROTOCOL),
    ("list-size-nul", "LIST", Reply(b"+OK\r\n1 700\x00\r\n.\r\n"), EX_PROTOCOL),
]


@pytest.mark.parametrize("where, response, code", [o[1:] for o in ODD_BYTES],
                         ids=[o[0] for o in ODD_BYTES])
def test_nul_bare_cr_bare_lf(fake_pop3, fake_config, confdir, run_popfetchd, where, response,
                             code):
    """NUL, bare CR and bare LF in responses (decisions above ODD_BYTES):
    byte-exact messages, or exit 76 with nothing saved."""
    server = pop3(fake_pop3, small_messages(2, seed=109),
                  hook=(lambda rec, line: None if matches("RETR", line) else Transform(_lf_lines))
                  if where == "*" else None)
    expected = snapshot(server)
    if response is not None:
        server.inject(where, response)
    config = fake_config(server)
    cd = confdir(config)
    saved = run_fault(run_popfetchd, cd, server, config, code)
    if code == EX_OK:
        assert_saved_exactly(saved, "fake", expected)
        assert server.remaining() == []
        return
    assert saved == [] and not server.sent("DELE")
    recover(run_popfetchd, cd, server, config, expected)


# (id, command, extra line after its response, expected exit, messages saved)
# Both messages are committed as one batch before the first DELE.
UNSOLICITED = [
    ("after-greeting", "GREETING", b"+OK extra\r\n", EX_PROTOCOL, 0),
    ("after-capa", "CAPA", b"+OK extra\r\n", EX_PROTOCOL, 0),
    ("after-user", "USER", b"+OK\r\n", EX_PROTOCOL, 0),
    ("after-pass", "PASS", b"+OK\r\n", EX_PROTOCOL, 0),
    ("after-uidl", "UIDL", b"+OK\r\n", EX_PROTOCOL, 0),
    ("after-list", "LIST", b"-ERR extra\r\n", EX_PROTOCOL, 0),
    ("after-retr", "RETR 1", b"+OK\r\n", EX_PROTOCOL, 1),
    ("after-retr-err", "RETR 1", b"-ERR extra\r\n", EX_PROTOCOL, 1),
    ("after-dele", "DELE 2", b"+OK 20 octets\r\n", EX_PROTOCOL, 2),
    ("after-quit", "QUIT", b"+OK extra\r\n", EX_OK, 2),
]


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
@pytest.mark.parametrize("mode", ["none", "implicit"])
@pytest.mark.parametrize("where, extra, code, nsaved", [u[1:] for u in UNSOLICITED],
                         ids=[u[0] for u in UNSOLICITED])
def test_unsolicited_line_after_a_response(fake_pop3, fake_config, confdir, run_popfetchd, pki,
                                           where, extra, code, nsaved, mode, pipelining):
    """A line nobody asked for, sent with a response. Taking it for the
    answer to the next command would shift every later response by one —
    e.g. the real answer to RETR saved as part of the message, or one
    message saved under the next one's UIDL. popfetchd sends no command
    while unread bytes wait, and QUIT never pipelined; with PIPELINING a
    refused pipelined RETR, or one whose data begins with a status line,
    makes it save nothing more and QUIT (where the shift shows). Exit 76,
    no QUIT; after QUIT it does not matter. An extra +OK after a pipelined
    RETR only puts the next RETR's real status line in its data: the
    session asks again one command at a time, and all is saved as sent."""
    if pipelining and where.startswith("RETR") and extra.startswith(b"+OK"):
        code, nsaved = EX_OK, 3
    server_kw, config_kw = tls_keys(pki, mode)
    server = pop3(fake_pop3, small_messages(3 if "retr" in where.lower() else 2, seed=110),
                  pipelining=pipelining, **server_kw)
    expected = snapshot(server)
    server.inject(where, Append(extra))
    config = fake_config(server, **config_kw)
    cd = confdir(config)
    saved = run_fault(run_popfetchd, cd, server, config, code)
    assert len(saved) == nsaved
    assert_saved_exactly(saved, "fake", expected[:nsaved])
    if code != EX_OK:
        assert not server.sent("QUIT"), "the session went on after the unsolicited line"
        recover(run_popfetchd, cd, server, config, expected)


# ==========================================================================
# content of responses
# ==========================================================================


def uidl_listing(lines):
    return Reply(b"+OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n")


U1, U2, U3 = b"uid-one", b"uid-two", b"uid-three"

# the UIDL listing of three messages, message 2's entry bad; the messages
# that keep their UIDL (a UIDL that two messages share is no key for either)
BAD_UIDLS = {
    "two-words": ([b"1 " + U1, b"2 two words", b"3 " + U3], (1, 3)),
    "control-char": ([b"1 " + U1, b"2 ab\x01cd", b"3 " + U3], (1, 3)),
    "nul": ([b"1 " + U1, b"2 ab\x00cd", b"3 " + U3], (1, 3)),
    "bare-cr": ([b"1 " + U1, b"2 ab\rcd", b"3 " + U3], (1, 3)),
    "non-ascii": ([b"1 " + U1, "2 caf\u00e9".encode(), b"3 " + U3], (1, 3)),
    "blank-uid": ([b"1 " + U1, b"2 ", b"3 " + U3], (1, 3)),
    "number-only": ([b"1 " + U1, b"2", b"3 " + U3], (1, 3)),
    "empty-line": ([b"1 " + U1, b"", b"3 " + U3], (1, 3)),
    "not-a-number": ([b"1 " + U1, b"two " + U2, b"3 " + U3], (1, 3)),
    "duplicate-of-another": ([b"1 " + U1, b"2 " + U1, b"3 " + U3], (3,)),
    "number-twice": ([b"1 " + U1, b"2 " + U2, b"2 other", b"3 " + U3], (1, 3)),
    "71-characters": ([b"1 " + U1, b"2 " + b"u" * 71, b"3 " + U3], (1, 3)),
    "400-characters": ([b"1 " + U1, b"2 " + b"u" * 400, b"3 " + U3], (1, 3)),
    "missing-from-uidl": ([b"1 " + U1, b"3 " + U3], (1, 3)),     # UIDL and LIST disagree
}


def three_messages(fake_pop3, seed, **kw):
    return pop3(fake_pop3, small_messages(3, seed=seed), uidls=[U1.decode(), U2.decode(),
                                                                U3.decode()], **kw)


@pytest.mark.parametrize("listing, keyed", BAD_UIDLS.values(), ids=BAD_UIDLS.keys())
def test_message_without_valid_uidl_is_keyed_by_content(fake_pop3, fake_config, confdir,
                                                        run_popfetchd, listing, keyed):
    """Message 2 has no valid UIDL: it is fetched and known by its content
    (DESIGN.md §4.3) — saved once, never again at the next polls, deleted
    when remove_after_read says so; the others keep their UIDLs."""
    server = three_messages(fake_pop3, seed=111)
    expected = snapshot(server)
    server.inject("UIDL", uidl_listing(listing), times=None)
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)

    saved = run_fault(run_popfetchd, cd, server, config, EX_OK)
    assert sorted(s.eml for s in saved) == sorted(d for _, d in expected), \
        "every message saved once, byte-exact"
    keys = [{s.eml: s.uidl for s in saved}[data] for _, data in expected]
    for n, (uidl, _) in enumerate(expected, 1):
        assert (keys[n - 1] == uidl) == (n in keyed), f"message {n}: key {keys[n - 1]}"

    second = receive_all(run_popfetchd, cd)
    assert (second.returncode, second.json()["saved"]) == (EX_OK, []), "saved twice"
    check_invariants(server, config)

    cd.add({**config, "remove_after_read": True})
    third = receive_all(run_popfetchd, cd)
    assert (third.returncode, third.json()["saved"]) == (EX_OK, []), "saved twice"
    check_invariants(server, config)
    assert len(read_saved_messages(config["save_directory"])) == 3
    assert server.remaining() == [], "a message that is saved is deleted, keyed or not"


def test_valid_uidl_edges(fake_pop3, fake_config, confdir, run_popfetchd):
    """A UIDL of exactly 70 characters, one of only "!" and "~", and an
    entry for a message 4 that LIST does not have (ignored: LIST says what
    there is): the three messages are saved under their UIDLs."""
    long_uid, odd_uid = "u" * 70, "!~!~"
    server = pop3(fake_pop3, small_messages(3, seed=112), uidls=[long_uid, odd_uid, "u3"])
    expected = snapshot(server)
    server.inject("UIDL", uidl_listing([b"1 " + long_uid.encode(), b"2 " + odd_uid.encode(),
                                        b"3 u3", b"4 u4"]))
    config = fake_config(server)
    saved = run_fault(run_popfetchd, confdir(config), server, config, EX_OK)
    assert_saved_exactly(saved, "fake", expected)
    assert not server.sent("RETR 4") and server.remaining() == []


@pytest.mark.parametrize("remove", [False, True], ids=["keep", "remove"])
def test_new_message_with_the_uidl_of_a_received_one(fake_pop3, fake_config, confdir,
                                                     run_popfetchd, remove):
    """A message already received (kept on the server), then new mail that
    the server lists under the same UIDL (RFC 1939 forbids it). Which of the
    two was received cannot be told from the listing, so both are known by
    their content: the new one is saved, nothing is deleted unsaved, and the
    one received before may be saved once more (README: servers without
    UIDL) — never lost, and settled from then on."""
    first, second = small_messages(2, seed=113)
    server = pop3(fake_pop3, [first], uidls=["same"])
    config = fake_config(server, remove_after_read=False)
    cd = confdir(config)
    assert run_fault(run_popfetchd, cd, server, config, EX_OK)[0].uidl == "same"

    server.add(second, uidl="same")
    cd.add({**config, "remove_after_read": remove})
    res = receive_all(run_popfetchd, cd)
    assert res.returncode == EX_OK and res.json()["errors"] == []
    assert "share UIDLs" in res.stderr
    emls = [s.eml for s in read_saved_messages(config["save_directory"])]
    assert emls.count(mailgen.to_crlf(second)) == 1
    assert 1 <= emls.count(mailgen.to_crlf(first)) <= 2
    assert len(server.remaining()) == (0 if remove else 2)
    res = receive_all(run_popfetchd, cd)
    assert (res.returncode, res.json()["saved"]) == (EX_OK, [])


class Listing(Action):
    """A listing of `count` entries, line(n) each, built when sent (~12 MB
    for a million)."""

    def __init__(self, count, line):
        self.count, self.line = count, line

    def perform(self, conn, default):
        data = b"+OK\r\n" + b"".join(self.line(n) for n in range(1, self.count + 1)) + b".\r\n"
        conn.sock.settimeout(30)    # the client may take its time (sanitizers)
        try:
            return conn.send(data)
        finally:
            conn.sock.settimeout(0.2)


# (id, command, response, expected exit, messages saved)
HUGE = [
    ("list-size-10^12", "LIST", "sizes:1000000000000", EX_OK, 3),
    ("list-size-2^60", "LIST", "sizes:%d" % (2 ** 64 // 16 - 1), EX_OK, 3),
    ("list-size-2^63", "LIST", "sizes:%d" % 2 ** 63, EX_PROTOCOL, 0),
    ("list-size-2^64-1", "LIST", "sizes:%d" % (2 ** 64 - 1), EX_PROTOCOL, 0),
    ("list-size-2^64", "LIST", "sizes:%d" % 2 ** 64, EX_PROTOCOL, 0),
    ("list-number-2^32", "LIST", Reply(b"+OK\r\n4294967296 700\r\n.\r\n"), EX_PROTOCOL, 0),
    ("list-1000001-messages", "LIST",
     Listing(1000001, lambda n: b"%d 700\r\n" % n), EX_PROTOCOL, 0),
    ("uidl-1000001-messages", "UIDL",
     Listing(1000001, lambda n: b"%d u%d\r\n" % (n, n)), EX_PROTOCOL, 0),
]


@pytest.mark.parametrize("where, response, code, nsaved", [h[1:] for h in HUGE],
                         ids=[h[0] for h in HUGE])
def test_huge_listing_numbers(fake_pop3, fake_config, confdir, run_popfetchd, where, response,
                              code, nsaved):
    """A size is a hint (a message may be fetched whatever LIST says, within
    what the parser holds: 2^60); a number no 64-bit size can hold, or more
    than a million messages (POP3_MAX_MESSAGES), is a clean protocol
    failure: exit 76, nothing saved, nothing deleted."""
    server = pop3(fake_pop3, small_messages(3, seed=114))
    expected = snapshot(server)
    if isinstance(response, str):
        size = int(response.split(":")[1])
        response = Reply(b"+OK\r\n" + b"".join(b"%d %d\r\n" % (n, size) for n in (1, 2, 3))
                         + b".\r\n")
    server.inject(where, response)
    config = fake_config(server)
    cd = confdir(config)
    saved = run_fault(run_popfetchd, cd, server, config, code)
    assert len(saved) == nsaved
    if code == EX_OK:
        assert_saved_exactly(saved, "fake", expected)
        return
    assert not server.sent("RETR") and not server.sent("DELE")
    recover(run_popfetchd, cd, server, config, expected)


def test_size_over_max_message_size_stays(fake_pop3, fake_config, confdir, run_popfetchd):
    """LIST says 10^12 octets and max_message_size is 10M: that message is
    left on the server (and counted), the others are saved."""
    server = pop3(fake_pop3, small_messages(3, seed=115))
    expected = snapshot(server)
    server.inject("LIST", Reply(b"+OK\r\n1 700\r\n2 1000000000000\r\n3 700\r\n.\r\n"))
    config = fake_config(server, max_message_size="10M")
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_OK and res.json()["left_too_big"] == 1
    saved = check_invariants(server, config)
    assert_saved_exactly(saved, "fake", [expected[0], expected[2]])
    assert server.remaining() == [expected[1][1]] and not server.sent("RETR 2")


# (id, response to STAT, expected exit, words the report shows)
STATS = [
    ("million-and-one-messages-10^12-octets", b"+OK 1000001 1000000000000\r\n", EX_OK,
     ["1000001 messages", "1000000000000 octets"]),
    ("2^32-1-messages", b"+OK 4294967295 0\r\n", EX_OK, ["4294967295 messages"]),
    ("2^32-messages", b"+OK 4294967296 0\r\n", EX_PROTOCOL, []),
    ("size-2^64-1", b"+OK 2 18446744073709551615\r\n", EX_PROTOCOL, []),
    ("negative", b"+OK -1 -1\r\n", EX_PROTOCOL, []),
]


@pytest.mark.parametrize("response, code, words", [s[1:] for s in STATS],
                         ids=[s[0] for s in STATS])
def test_huge_stat_in_the_test_command(fake_pop3, fake_config, confdir, run_popfetchd,
                                       response, code, words):
    """`test ID` reports STAT: big numbers exactly (no wrap, no sign), numbers
    no counter holds as a protocol failure."""
    server = pop3(fake_pop3, small_messages(1, seed=116))
    server.inject("STAT", Reply(response))
    config = fake_config(server)
    res = run_popfetchd(["test", "fake"], confdir=confdir(config))
    assert res.returncode == code
    for word in words:
        assert word in res.stdout
    assert not server.sent("RETR") and not server.sent("DELE")
    assert len(server.remaining()) == 1


@pytest.mark.parametrize("response", [b"-ERR\r\n", b"-ERR [SYS/PERM] cannot delete\r\n",
                                      b"-ERR [IN-USE] busy\r\n"], ids=["bare", "sys-perm", "in-use"])
def test_dele_refused_for_one_message(fake_pop3, fake_config, confdir, run_popfetchd, response):
    """-ERR to DELE 2: the others are deleted at QUIT, message 2 stays,
    recorded: the next poll does not save it again and deletes it."""
    server = pop3(fake_pop3, small_messages(3, seed=117))
    expected = snapshot(server)
    server.inject("DELE 2", Reply(response))
    config = fake_config(server)
    cd = confdir(config)
    res = receive_all(run_popfetchd, cd)
    assert res.returncode == EX_OK
    assert res.json()["deleted"] == 2
    check_invariants(server, config)
    assert server.sessions[0].quit_ok
    assert sorted(server.sessions[0].committed) == sorted([expected[0][0], expected[2][0]])
    assert server.remaining() == [expected[1][1]]

    doc = recover(run_popfetchd, cd, server, config, expected)
    assert (doc["skipped"], doc["deleted"]) == (1, 1)
    assert not server.sent("RETR", session=1), "a saved message fetched again"


@pytest.mark.parametrize("response", [b"-ERR\r\n", b"-ERR [SYS/TEMP] commit failed\r\n"],
                         ids=["bare", "sys-temp"])
@pytest.mark.parametrize("remove", [True, False], ids=["remove", "keep"])
def test_quit_refused(fake_pop3, fake_config, confdir, run_popfetchd, response, remove):
    """-ERR to QUIT: no deletion is committed. With deletions pending that
    is exit 75 (they did not happen); without, 0. The next poll finds the
    messages, saves none again, and deletes them."""
    server = pop3(fake_pop3, small_messages(3, seed=118))
    expected = snapshot(server)
    server.inject("QUIT", Reply(response))
    config = fake_config(server, remove_after_read=remove)
    cd = confdir(config)
    saved = run_fault(run_popfetchd, cd, server, config, EX_TEMPFAIL if remove else EX_OK)
    assert_saved_exactly(saved, "fake", expected)
    assert len(server.remaining()) == 3 and not server.sessions[0].committed
    if not remove:
        cd.add({**config, "remove_after_read": True})
    doc = recover(run_popfetchd, cd, server, config, expected)
    assert (doc["skipped"], doc["deleted"]) == (3, 3)
    assert not server.sent("RETR", session=1)


# ==========================================================================
# the server's text in the logs
# ==========================================================================

HOSTILE = (b"\x1b[31mRED\x1b[0m \x1b]0;owned\x07 \x1b]8;;http://evil.example/\x1b\\link\x1b]8;;\x1b\\"
           b" bell\x07 bs\x08\x08\x08 del\x7f nul\x00 cr\r tab\t bad-utf8\xff\xfe\xc3\x28\xc0\xaf"
           b" c1\x9b31m utf8-c1\xc2\x9b31m rlo\xe2\x80\xaeevil\xe2\x81\xa6 end")
BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
LOG_LINE_MAX = 1024


def run_bytes(popfetchd_bin, secret_registry, args, cd):
    """popfetchd with stdout and stderr as bytes (nothing replaced)."""
    cmd = [popfetchd_bin, "-c", str(cd), *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=60, env=_popfetchd_env(None),
                          stdin=subprocess.DEVNULL)
    for name, data in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        text = data.decode(errors="replace")
        secret_registry.record(f"{' '.join(cmd)} ({name})", text)
        for marker in SANITIZER_MARKERS:
            assert marker not in text, f"sanitizer report:\n{text}"
    print(f"$ {' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout!r}\n"
          f"--- stderr\n{proc.stderr!r}")
    return proc


def assert_clean_output(data, what, allowed=b"\n", line_max=LOG_LINE_MAX):
    """No control byte but LF (and `allowed`), no invalid UTF-8, no C1
    control or bidi override, no line longer than line_max."""
    bad = sorted({b for b in data if (b < 0x20 and b not in allowed) or b == 0x7F})
    assert not bad, f"control bytes {[hex(b) for b in bad]} in {what}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        pytest.fail(f"invalid UTF-8 in {what}: {e}")
    c1 = sorted({hex(ord(c)) for c in text
                 if unicodedata.category(c) == "Cc" and c.encode() not in allowed})
    assert not c1, f"C1 controls {c1} in {what}"
    assert not BIDI & set(text), f"bidi overrides in {what}"
    longest = max((len(line) for line in data.split(b"\n")), default=0)
    assert longest <= line_max, f"a line of {longest} bytes in {what}"


def json_strings(value):
    """Every string in a JSON document (keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_strings(v)


# (id, command, response, command line, expected exit, whether the text shows)
HOSTILE_CASES = [
    ("greeting-err", "GREETING", b"-ERR " + HOSTILE + b"\r\n", "receive-all", EX_TEMPFAIL, True),
    ("pass-err", "PASS", b"-ERR " + HOSTILE + b"\r\n", "receive-all", EX_NOPERM, True),
    ("retr-err", "RETR 1", b"-ERR " + HOSTILE + b"\r\n", "receive-all", EX_TEMPFAIL, True),
    ("list-err", "LIST", b"-ERR " + HOSTILE + b"\r\n", "receive-all", EX_PROTOCOL, True),
    ("garbage-status", "UIDL", HOSTILE + b"\r\n", "receive-all", EX_PROTOCOL, True),
    ("sasl-names", "CAPA", b"+OK\r\nSASL X-" + HOSTILE.replace(b"\x00", b"") + b"\r\n.\r\n",
     "receive-all", EX_NOPERM, False),
    ("greeting-100k", "GREETING", b"-ERR " + b"\x1b[31m" * 20000 + b"\r\n", "receive-all",
     EX_PROTOCOL, False),
    ("retr-err-100k", "RETR 1", b"-ERR " + b"A\x07" * 50000 + b"\r\n", "receive-all",
     EX_PROTOCOL, False),
    ("test-greeting", "GREETING", b"+OK " + HOSTILE + b"\r\n", "test", EX_OK, True),
    ("test-stat-err", "STAT", b"-ERR " + HOSTILE + b"\r\n", "test", EX_PROTOCOL, True),
]


@pytest.mark.parametrize("where, response, command, code, shown", [h[1:] for h in HOSTILE_CASES],
                         ids=[h[0] for h in HOSTILE_CASES])
@pytest.mark.parametrize("json_out", [False, True], ids=["text", "json"])
def test_server_text_is_escaped_and_capped(fake_pop3, fake_config, confdir, popfetchd_bin,
                                           secret_registry, where, response, command, code,
                                           shown, json_out):
    """Whatever the server says — terminal escapes (CSI, OSC, BEL, BS), NUL,
    bare CR, invalid UTF-8, C1 controls, bidi overrides, 100 KB lines —
    reaches stderr (at debug level too) and stdout escaped, printable and
    capped; the harmless part of it is still there for the operator."""
    server = pop3(fake_pop3, small_messages(2, seed=119))
    # twice: a RETR refused among pipelined ones is asked again alone
    server.inject(where, Reply(response), times=2 if where.startswith("RETR") else 1)
    config = fake_config(server)
    args = ["-v", command, "fake"] + (["--json"] if json_out else [])
    proc = run_bytes(popfetchd_bin, secret_registry, args, confdir(config))
    assert proc.returncode == code
    assert_clean_output(proc.stderr, "stderr")
    if json_out:    # one line; each value a line of its own for the reader
        assert_clean_output(proc.stdout, "stdout", line_max=1 << 20)
        for value in json_strings(json.loads(proc.stdout)):
            assert_clean_output(value.encode(), f"the JSON value {value[:40]!r}...")
    else:           # `test` prints columns
        assert_clean_output(proc.stdout, "stdout", allowed=b"\n\t")
    if shown:
        assert b"RED" in proc.stderr + proc.stdout, "the server's text is not reported at all"
    check_invariants(server, config)


def test_certificate_names_are_escaped(fake_pop3, fake_config, confdir, popfetchd_bin,
                                       secret_registry, pki):
    """The server also chooses its certificate's names, and a refused
    certificate is described (subject, issuer) on stderr: escaped too."""
    subject = "/CN=evil\u202e\u009b31m\x1b[31mRED/O=x\x07y"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", pki / "evil.key",
                    "-out", pki / "evil.crt", "-days", "2", "-utf8", "-subj", subject,
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "evil.crt", pki / "evil.key")
    server = pop3(fake_pop3, small_messages(1, seed=122), tls_context=ctx)
    config = fake_config(server, tls="implicit", tls_ca_file=str(pki / "ca.crt"))
    proc = run_bytes(popfetchd_bin, secret_registry, ["-v", "receive-all", "fake"],
                     confdir(config))
    assert proc.returncode == EX_PROTOCOL
    assert b"RED" in proc.stderr, "the certificate is not described"
    assert_clean_output(proc.stderr, "stderr")
    assert not server.sent("USER") and not server.sent("PASS")


# ==========================================================================
# the daemon: one broken server, one good one
# ==========================================================================


# how the broken server misbehaves, at every session; whether its polls fail
# within the test (a stalled or trickling session lasts the command timeout, 20 s)
BROKEN = {
    "stalls": ("GREETING", Stall(), False),
    "drops": ("GREETING", Close(), True),
    "garbage": ("GREETING", Garbage(64, then="close"), True),
    "overlong": ("GREETING", Overlong(100000, then="stall"), True),
    "trickles": ("RETR", Trickle(delay=0.2, chunk=1), False),
    "drops-mid-retr": ("RETR", Truncate(0.5), True),
    "hostile-err": ("PASS", Reply(b"-ERR " + HOSTILE + b"\r\n"), True),
}


@pytest.mark.parametrize("where, fault, fails", BROKEN.values(), ids=BROKEN.keys())
def test_broken_server_never_disturbs_another(fake_pop3, fake_config, confdir, daemon,
                                              where, fault, fails):
    """Two configurations polled every second: one server misbehaves at
    every session, the other gets new mail between polls. Each new message
    arrives within a few seconds, the daemon keeps running and stops
    cleanly, the broken one loses nothing and has nothing deleted."""
    bad = pop3(fake_pop3, small_messages(1, seed=120, size=5000))
    bad.inject(where, fault, times=None)
    good = pop3(fake_pop3)
    bad_config = fake_config(bad, id="bad", poll_interval="1s",
                             timeouts={"connect": "5s", "command": "20s"})
    good_config = fake_config(good, id="good", poll_interval="1s")
    d = daemon(confdir(bad_config, good_config, daemon={"stop_timeout": "2s"}))
    d.wait_ready()
    wait_for(lambda: bad.sessions, 10, "the broken server's first session")

    new = small_messages(4, seed=121)
    for k, message in enumerate(new):
        good.add(message)
        added = time.monotonic()
        wait_for(lambda: len(read_saved_messages(good_config["save_directory"])) == k + 1, 8,
                 f"new message {k + 1} saved\n{d.output}")
        assert time.monotonic() - added < 4, "a poll of the good configuration was late"
        assert d.proc.poll() is None, f"the daemon ended:\n{d.output}"
    wait_for(lambda: good.remaining() == [], 5, "the good server emptied")

    assert d.stop() == EX_OK, d.output
    saved = read_saved_messages(good_config["save_directory"])
    assert sorted(s.eml for s in saved) == sorted(mailgen.to_crlf(m) for m in new)
    check_invariants(good, good_config)
    check_invariants(bad, bad_config)
    assert read_saved_messages(bad_config["save_directory"]) == []
    assert len(bad.remaining()) == 1 and not bad.sent("DELE")
    if fails:
        status = [f["STATUS"] for f in d.notify.fields("STATUS")]
        assert any("1 failing" in s and "last error: bad:" in s for s in status), status
        assert "bad: poll failed" in d.output, "the broken configuration's failures are not logged"
    assert_clean_output(Path(d.log).read_bytes(), "the daemon's log")
