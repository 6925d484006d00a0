"""A hostile or broken server against the session (issue 14): what a
timeout says, connecting when one address of a host does not answer, the
memory a large listing costs, and a message that begins like a status line
over a pipelined session.

Run with Debian's python from the repository root:
    /usr/bin/python3 -m pytest tests/integration/test_pop3_hardening.py -q
"""

import os
import socket
import subprocess
import time

import pytest

from conftest import SANITIZER_MARKERS, _popfetchd_env, read_saved_messages
from fakepop3 import Action, Script, Stall, matches
from test_faults import (check_invariants, pki, pop3, receive_all, server_context,  # noqa: F401
                         small_messages, snapshot, tls_keys)
from test_receive import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, assert_saved_exactly


def sanitized(binary):
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return "libasan" in ldd or "libubsan" in ldd


def errors_of(res):
    return " | ".join(res.json()["errors"])


def stalled_errors(server, fake_config, confdir, run_popfetchd):
    """A poll with a 1 s command timeout, which must end in exit 75: its errors."""
    config = fake_config(server, timeouts={"connect": "5s", "command": "1s"})
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_TEMPFAIL, res.describe()
    return errors_of(res)


# ==========================================================================
# a timeout says what was waited for (DESIGN.md §2: once TCP is up, 75)
# ==========================================================================


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_stalled_tls_handshake_is_a_timeout_that_names_the_handshake(
        fake_pop3, fake_config, confdir, run_popfetchd, pki, mode):
    """implicit: the server accepts TCP and never speaks TLS; explicit: it
    answers STLS +OK and then says nothing. The handshake is part of
    timeouts.connect (DESIGN.md §1): it fails after the connect timeout, not
    after the (longer) command timeout. TCP was up: exit 75 (not 69, "no
    connection"), and the message names the TLS handshake."""
    _, config_kw = tls_keys(pki, mode)
    if mode == "implicit":
        server = pop3(fake_pop3, script=Script(greeting=Stall()))
    else:
        server = pop3(fake_pop3, small_messages(1, seed=1401), stls_context=server_context(pki))
        server.inject("STLS", Stall(data=b"+OK Begin TLS negotiation now\r\n"))
    config = fake_config(server, timeouts={"connect": "1s", "command": "10s"}, **config_kw)
    start = time.monotonic()
    res = receive_all(run_popfetchd, confdir(config))
    elapsed = time.monotonic() - start
    assert res.returncode == EX_TEMPFAIL, res.describe()
    assert 0.9 < elapsed < 4, elapsed
    errors = errors_of(res)
    assert "TLS handshake" in errors and "did not complete within 1 s" in errors, errors
    assert "timeouts.connect" in errors, errors
    assert "no connection" not in errors, errors
    check_invariants(server, config)
    assert not server.sent("USER") and not server.sent("PASS")


# (the command whose answer never comes, what the message must say)
STALLS = [
    ("GREETING", "waiting for the server's greeting"),
    ("CAPA", "waiting for the answer to CAPA"),
    ("USER", "waiting for the answer to USER"),
    ("PASS", "waiting for the answer to PASS"),
    ("UIDL", "waiting for the answer to UIDL"),
    ("LIST", "waiting for the answer to LIST"),
    ("RETR", "waiting for the answer to RETR 1"),
    ("QUIT", "waiting for the answer to QUIT"),
]


@pytest.mark.parametrize("where, words", STALLS, ids=[s[0] for s in STALLS])
def test_a_stall_names_what_was_waited_for(fake_pop3, fake_config, confdir, run_popfetchd,
                                           where, words):
    """Whatever the step, a response that does not come is exit 75 and the
    message says what was waited for (not only a state name)."""
    server = pop3(fake_pop3, small_messages(1, seed=1402), pipelining=False)
    server.inject(where, Stall())
    errors = stalled_errors(server, fake_config, confdir, run_popfetchd)
    assert words in errors and "nothing within 1 s (timeouts.command)" in errors, errors


class TrickleAfterStatus(Action):
    """The status line at once, then the rest a byte every 0.1 s."""
    commit = True

    def perform(self, conn, default):
        head, _, rest = default.partition(b"\r\n")
        if not conn.send(head + b"\r\n"):
            return False
        for k in range(len(rest)):
            if not conn.send(rest[k:k + 1]) or conn.server.stopping.wait(0.1):
                return False
        return True


@pytest.mark.parametrize("where, words", [
    ("UIDL", "waiting for the rest of the UIDL listing"),
    ("RETR", "waiting for the data of message 1 (RETR 1)")])
def test_trickled_data_names_what_stalled(fake_pop3, fake_config, confdir, run_popfetchd,
                                          where, words):
    """Multi-line data that trickles (less than 1 KiB per command timeout):
    the message names the listing or the message, and how little came."""
    server = pop3(fake_pop3, small_messages(1, seed=1403, size=3000), pipelining=False)
    server.inject(where, TrickleAfterStatus())
    errors = stalled_errors(server, fake_config, confdir, run_popfetchd)
    assert words in errors and "bytes in 1 s" in errors, errors


# ==========================================================================
# the memory a listing costs
# ==========================================================================


LISTED = 200_000
RSS_BOUND_MB = 64


def tiny_messages(n):
    return [(f"m{i:06d}", b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(n)]


def test_a_listing_of_200000_messages_stays_well_under_64_mb(fake_pop3, fake_config, confdir,
                                                             popfetchd_bin):
    """200 000 messages listed (UIDL and LIST), one received (receive: the
    oldest): the listing is kept compact, and popfetchd's peak RSS stays
    under 64 MB (the fake server's maildrop costs the test, not popfetchd)."""
    if sanitized(popfetchd_bin):
        pytest.skip("a sanitizer build's memory is not the program's")
    if not os.access("/usr/bin/time", os.X_OK):
        pytest.skip("GNU time is not installed (scripts/install-deps)")
    server = fake_pop3(tiny_messages(LISTED))
    config = fake_config(server, remove_after_read=False,
                         timeouts={"connect": "5s", "command": "30s"})
    cd = confdir(config)
    # GNU time forks popfetchd from a small process: a child forked from
    # this one (which holds the fake maildrop) would count its pages too
    rss_file = cd.path / "maxrss"
    cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file, popfetchd_bin, "-c", cd, "receive",
           "fake"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                          env=_popfetchd_env(None), stdin=subprocess.DEVNULL, errors="replace")
    assert proc.returncode == EX_OK, proc.stderr[-3000:]
    saved = read_saved_messages(config["save_directory"])
    assert [s.uidl for s in saved] == ["m000000"]
    peak_mb = int(rss_file.read_text().split()[-1]) / 1024    # KiB
    print(f"popfetchd peak RSS {peak_mb:.1f} MB for {LISTED} listed messages")
    assert peak_mb < RSS_BOUND_MB, f"peak RSS {peak_mb:.1f} MB"


# ==========================================================================
# connecting: one address that never answers does not take the budget
# ==========================================================================


DUAL = "dual.pfd.test"


def can_unshare():
    return os.geteuid() == 0 and subprocess.run(["unshare", "-m", "true"]).returncode == 0


def run_with_hosts(binary, hosts_text, tmp_path, args, timeout=60):
    """popfetchd in a private mount namespace whose /etc/hosts is
    hosts_text (evdns reads it, and keeps its order); returns
    (returncode, stdout, stderr)."""
    hosts = tmp_path / "hosts"
    hosts.write_text(hosts_text)
    cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
           str(binary), *[str(a) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=_popfetchd_env(None), stdin=subprocess.DEVNULL, errors="replace")
    for marker in SANITIZER_MARKERS:
        assert marker not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


class SilentListener:
    """A listening socket on host:port whose accept queue is full: the
    kernel drops further SYNs, so a connect there neither succeeds nor
    fails (a host that does not answer). A closed port would refuse at once."""

    def __init__(self, family, host, port):
        self.sock = socket.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(0)
        self.fill = []
        for _ in range(3):
            c = socket.socket(family)
            c.setblocking(False)
            try:
                c.connect((host, port))
            except BlockingIOError:
                pass
            self.fill.append(c)
        time.sleep(0.2)
        probe = socket.socket(family)
        probe.settimeout(0.5)
        try:
            probe.connect((host, port))
            raise AssertionError("the silent listener accepted a connection")
        except socket.timeout:
            pass
        finally:
            probe.close()

    def close(self):
        for c in self.fill:
            c.close()
        self.sock.close()


@pytest.fixture
def needs_unshare():
    if not can_unshare():
        pytest.skip("needs root and unshare -m (a private /etc/hosts)")


def test_an_address_that_does_not_answer_is_passed_over(needs_unshare, fake_pop3, fake_config,
                                                        confdir, popfetchd_bin, tmp_path):
    """The host name has [::1] (tried first: the resolver's order) and
    127.0.0.1. [::1] never completes the TCP handshake; 127.0.0.1 serves.
    With timeouts.connect 10 s the poll is done in well under 3 s: the
    second address is tried while the first is still pending."""
    server = pop3(fake_pop3, small_messages(2, seed=1404))
    expected = snapshot(server)
    silent = SilentListener(socket.AF_INET6, "::1", server.port)
    try:
        config = fake_config(server, timeouts={"connect": "10s", "command": "10s"})
        config["server"] = DUAL
        start = time.monotonic()
        code, out, err = run_with_hosts(popfetchd_bin, f"::1 {DUAL}\n127.0.0.1 {DUAL}\n",
                                        tmp_path, ["-c", confdir(config), "-v", "receive-all",
                                                   "fake"])
        elapsed = time.monotonic() - start
    finally:
        silent.close()
    assert code == EX_OK, err[-3000:]
    tried = [line.split("connecting to ")[1].split()[0] for line in err.splitlines()
             if "connecting to " in line]
    assert tried == ["[::1]", "127.0.0.1"], err[-3000:]
    assert elapsed < 3, f"{elapsed:.1f} s: the silent address held up the poll"
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "fake", expected)


def test_every_address_refused_is_69_at_once(needs_unshare, fake_config, confdir, popfetchd_bin,
                                             tmp_path):
    """Nothing listens on either address: exit 69 without waiting for the
    connect timeout, and the message names each address and why."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()

    class Nowhere:
        host, user, password = DUAL, "u", "p"
    Nowhere.port = port
    config = fake_config(Nowhere, timeouts={"connect": "10s", "command": "10s"})
    start = time.monotonic()
    code, out, err = run_with_hosts(popfetchd_bin, f"::1 {DUAL}\n127.0.0.1 {DUAL}\n", tmp_path,
                                    ["-c", confdir(config), "receive-all", "fake"])
    assert code == EX_UNAVAILABLE, err
    assert time.monotonic() - start < 3
    assert "[::1]: Connection refused" in err and "127.0.0.1: Connection refused" in err, err


# ==========================================================================
# a message that begins like a status line, pipelined
# ==========================================================================


def status_like_messages():
    """Five messages; the 2nd begins with "+OK ", the 4th with "-ERR "
    (odd, or hostile, mail: a line like any other)."""
    plain = small_messages(3, seed=1405)
    return [plain[0],
            b"+OK this line is part of the message\nFrom: a@example.org\nSubject: odd\n\nbody\n",
            plain[1],
            b"-ERR so is this one\nFrom: b@example.org\nSubject: odder\n\nbody\n",
            plain[2]]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
def test_a_message_beginning_with_a_status_line_is_saved(fake_pop3, fake_config, confdir,
                                                         run_popfetchd, pipelining):
    """Pipelined, such a message cannot be told from the answers of a
    server out of step with the commands: the session asks again one
    command at a time, and every message is saved byte-exact, once."""
    server = pop3(fake_pop3, status_like_messages(), pipelining=pipelining)
    expected = snapshot(server)
    config = fake_config(server)
    res = receive_all(run_popfetchd, confdir(config))
    assert res.returncode == EX_OK, res.describe()
    saved = check_invariants(server, config)
    # (meta.json's header fields are another matter: such a first line
    # is not a header field)
    assert sorted(s.uidl for s in saved) == sorted(u for u, _ in expected)
    assert {s.uidl: s.eml for s in saved} == dict(expected)
    assert server.remaining() == []
    if pipelining:
        # one RETR of each message in the session that saved it, none twice
        assert len(server.sessions) == 2, server.transcript
        assert server.sessions[1].commands.count("RETR 1") == 1


def test_a_server_out_of_step_is_still_caught(fake_pop3, fake_config, confdir, run_popfetchd):
    """A server that adds a line to every DELE answer: pipelined, the next
    RETR's real status line comes as its data; one command at a time the
    extra line is waiting when the next command is due. Exit 76, nothing
    saved under a wrong UIDL, no deletion committed after the shift."""
    from test_faults import Append
    server = pop3(fake_pop3, small_messages(6, seed=1406))
    expected = snapshot(server)
    server.inject("DELE", Append(b"+OK extra\r\n"), times=None)
    config = fake_config(server, timeouts={"connect": "5s", "command": "3s"})
    cd = confdir(config, daemon={"commit_batch": 1})
    res = receive_all(run_popfetchd, cd)
    assert res.returncode == 76, res.describe()
    saved = check_invariants(server, config)
    assert_saved_exactly(saved, "fake", [e for e in expected if e[0] in {s.uidl for s in saved}])
