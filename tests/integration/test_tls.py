"""TLS against the contract (DESIGN.md §1 tls, tls_ca_file, tls_fingerprint,
tls_verify; §2 exit codes; §4 step 1).

Against the Dovecot fixture: receive-all over STLS and over POP3S, by IP
literal and by name; a CA the system store does not trust; a plain port
configured as implicit TLS.

Against the fake server (which presents any of the fixture's certificates:
server.crt for localhost/127.0.0.1/::1, wronghost.crt for wrong.example,
expired.crt): the STLS transcript (CAPA asked again inside TLS), host name
and expiry checks, fingerprint pins, tls_verify: false, STLS refused or not
offered, bytes injected after the +OK to STLS, TLS below 1.2, and a server
that closes without close_notify after QUIT.

Every refusal is exit 76 with nothing saved, nothing deleted, and no USER,
PASS, AUTH or APOP ever reaching the server.
"""

import hashlib
import socket
import ssl
import time
import warnings

import pytest

import mailgen
from fakepop3 import Action, Reply
from test_receive import (EX_OK, EX_PROTOCOL, EX_TEMPFAIL, EX_UNAVAILABLE,
                          assert_no_staging_leftovers,
                          assert_saved_exactly, deliver_generated, fake_expected,
                          server_listing)

MODES = ["implicit", "explicit"]
CREDENTIAL_COMMANDS = ("USER", "PASS", "AUTH", "APOP")


# --------------------------------------------------------------------------
# helpers


def server_context(dovecot, cert="server"):
    """A server-side SSLContext presenting the fixture's certificate `cert`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(dovecot.cert_path(cert), dovecot.key_path(cert))
    return ctx


def fingerprint_of(cert_file):
    """SHA-256 of a PEM certificate's DER, as lower-case hex without colons."""
    with open(cert_file) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return hashlib.sha256(der).hexdigest()


def pin(hex_digest, colons=False, upper=False):
    """A tls_fingerprint value: sha256:HEX, optionally AB:CD:... and/or upper case."""
    text = hex_digest.upper() if upper else hex_digest.lower()
    if colons:
        text = ":".join(text[i:i + 2] for i in range(0, len(text), 2))
    return "sha256:" + text


def normalized(text):
    """For finding a fingerprint in a message: lower case, colons removed."""
    return text.lower().replace(":", "")


def tls_fake(fake_pop3, dovecot, mode, cert="server", messages=(), context=None, **kw):
    """A started fake server presenting `cert`: TLS from the first byte
    (mode "implicit") or offering STLS (mode "explicit")."""
    ctx = context or server_context(dovecot, cert)
    key = "tls_context" if mode == "implicit" else "stls_context"
    return fake_pop3(messages, **{key: ctx}, **kw)


def receive_all(run_popfetchd, confdir, config):
    return run_popfetchd(["receive-all", config["id"]], confdir=confdir(config))


def assert_nothing_leaked(server):
    """The fake server never saw a credential (in clear or not), a RETR or a DELE."""
    assert server.wait_idle(), "the fake server's sessions did not end"
    for verb in CREDENTIAL_COMMANDS:
        assert not server.sent(verb), f"{verb} reached the server: {server.transcript}"
    assert not server.sent("RETR") and not server.sent("DELE"), server.transcript


def assert_refused(res, config, read_saved, server=None):
    """Exit 76, nothing saved, nothing leaked to the fake server (if any)."""
    assert res.returncode == EX_PROTOCOL, f"expected exit {EX_PROTOCOL}, got {res.returncode}"
    assert read_saved(config["save_directory"]) == [], "saved something over a refused session"
    assert_no_staging_leftovers(config["save_directory"])
    if server is not None:
        assert_nothing_leaked(server)
        assert not any(r.committed for r in server.sessions), "deletions committed"


def assert_names_certificate(res, fingerprint, host=None):
    """A verification failure names what was presented: the word
    "certificate", its SHA-256 fingerprint and, for a name mismatch, the
    host name that was expected."""
    assert "certificate" in res.stderr.lower(), "the message does not say 'certificate'"
    assert fingerprint in normalized(res.stderr), \
        f"the presented certificate's fingerprint {fingerprint} is not in the message"
    if host is not None:
        assert host in res.stderr, f"the expected host name {host} is not in the message"


def wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def dovecot_logins(dovecot, user):
    """Dovecot's "Login:" log lines for a user (", TLS," in those over TLS;
    plain logins from 127.0.0.1 say "secured")."""
    return [l for l in dovecot.log_text().splitlines() if f"Login: user=<{user}>" in l]


def dovecot_port(dovecot, mode):
    return dovecot.pop3s_port if mode == "implicit" else dovecot.pop3_port


# --------------------------------------------------------------------------
# the fake server itself (the premise of the close_notify test)


def test_fake_tls_server_closes_without_close_notify(dovecot, fake_pop3):
    """The fake server ends a TLS session by closing the TCP connection
    without a TLS close_notify (test_no_close_notify_after_quit relies on it)."""
    server = fake_pop3(tls_context=server_context(dovecot))
    client_ctx = ssl.create_default_context(cafile=dovecot.ca_file)
    client_ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    with socket.create_connection((server.host, server.port), timeout=10) as raw:
        with client_ctx.wrap_socket(raw, server_hostname=server.host) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"+OK")
            sock.sendall(b"QUIT\r\n")
            assert reader.readline().startswith(b"+OK")
            with pytest.raises(ssl.SSLError, match="(?i)unexpected eof"):
                while sock.recv(100):
                    pass
    assert server.sessions[0].tls_since == 0


# --------------------------------------------------------------------------
# receiving over TLS


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest.mark.parametrize("mode", MODES)
def test_dovecot_receive_all_over_tls(dovecot, mailbox, dovecot_config, confdir, run_popfetchd,
                                      read_saved, mode, host):
    deliver_generated(mailbox, 4, 5000, seed=61)
    listing = server_listing(dovecot, mailbox)
    config = dovecot_config(mailbox, server=host, port=dovecot_port(dovecot, mode), tls=mode,
                            tls_ca_file=dovecot.ca_file)

    start = time.time()
    res = receive_all(run_popfetchd, confdir, config)
    window = (start, time.time())

    assert res.returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "dv", listing, window)
    assert mailbox.count() == 0, "remove_after_read: true leaves the server empty"
    assert "tls: none" not in res.stderr
    assert mailbox.password not in res.stdout + res.stderr, "a secret in the output"
    # server_listing logged in in clear ("secured"); popfetchd's login is over TLS
    assert wait_for(lambda: any(", TLS," in l for l in dovecot_logins(dovecot, mailbox.user))), \
        f"no TLS login in Dovecot's log: {dovecot_logins(dovecot, mailbox.user)}"


def test_explicit_asks_capabilities_again_inside_tls(dovecot, fake_pop3, fake_config, confdir,
                                                    run_popfetchd, read_saved):
    server = tls_fake(fake_pop3, dovecot, "explicit", messages=mailgen.generate(2, 3000, seed=62))
    expected = fake_expected(server)
    config = fake_config(server, tls="explicit", tls_ca_file=dovecot.ca_file)

    res = receive_all(run_popfetchd, confdir, config)
    assert res.returncode == EX_OK
    assert server.wait_idle()
    assert len(server.sessions) == 1
    record = server.sessions[0]
    commands = record.commands
    login = next(i for i, c in enumerate(commands) if c.split()[0].upper() == "USER")
    assert [c.upper() for c in commands[:login]] == ["CAPA", "STLS", "CAPA"], commands
    assert record.tls and record.tls_since == 2, "TLS did not begin right after STLS"
    assert commands[login] == f"USER {server.user}"
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert server.remaining() == []


@pytest.mark.parametrize("mode", MODES)
def test_no_close_notify_after_quit_is_not_an_error(dovecot, fake_pop3, fake_config, confdir,
                                                    run_popfetchd, read_saved, mode):
    """The fake server answers QUIT +OK and closes TCP without close_notify
    (see test_fake_tls_server_closes_without_close_notify): that is success."""
    server = tls_fake(fake_pop3, dovecot, mode, messages=mailgen.generate(3, 3000, seed=63))
    expected = fake_expected(server)
    config = fake_config(server, tls=mode, tls_ca_file=dovecot.ca_file)

    res = receive_all(run_popfetchd, confdir, config)
    assert res.returncode == EX_OK
    assert server.wait_idle()
    record = server.sessions[0]
    assert record.quit_ok and record.tls
    assert record.tls_since == (0 if mode == "implicit" else 2)
    if mode == "implicit":
        assert not server.sent("STLS"), "STLS inside implicit TLS"
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert server.remaining() == []


# --------------------------------------------------------------------------
# certificate verification failures


@pytest.mark.parametrize("mode", MODES)
def test_untrusted_ca_is_refused(dovecot, mailbox, dovecot_config, confdir, run_popfetchd,
                                 read_saved, mode):
    """Without tls_ca_file the system store is used, and it does not trust the test CA."""
    mailbox.deliver(*mailgen.generate(1, 2000, seed=64))
    config = dovecot_config(mailbox, port=dovecot_port(dovecot, mode), tls=mode,
                            tls_ca_file=None)

    res = receive_all(run_popfetchd, confdir, config)
    assert_refused(res, config, read_saved)
    assert_names_certificate(res, fingerprint_of(dovecot.cert_file))
    assert mailbox.count() == 1
    assert dovecot_logins(dovecot, mailbox.user) == [], "logged in over an untrusted connection"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cert, host", [
    ("wronghost", "127.0.0.1"),     # an IP literal is checked against the IP SANs
    ("wronghost", "localhost"),     # a name against the DNS SANs
    ("expired", "127.0.0.1"),
], ids=["wronghost-ip", "wronghost-name", "expired"])
def test_certificate_refused(dovecot, fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                             mode, cert, host):
    server = tls_fake(fake_pop3, dovecot, mode, cert, messages=mailgen.generate(1, 2000, seed=65))
    config = fake_config(server, tls=mode, tls_ca_file=dovecot.ca_file)
    config["server"] = host     # (fake_config's first parameter is called server)

    res = receive_all(run_popfetchd, confdir, config)
    assert_refused(res, config, read_saved, server)
    assert_names_certificate(res, fingerprint_of(dovecot.cert_path(cert)),
                             host if cert == "wronghost" else None)
    assert len(server.remaining()) == 1


@pytest.mark.parametrize("mode", MODES)
def test_fingerprint_mismatch_is_refused(dovecot, fake_pop3, fake_config, confdir,
                                         run_popfetchd, read_saved, mode):
    """A pin replaces CA verification: a certificate the CA would accept is
    refused when its fingerprint is not the pinned one."""
    server = tls_fake(fake_pop3, dovecot, mode, "server",
                      messages=mailgen.generate(1, 2000, seed=66))
    presented = fingerprint_of(dovecot.cert_path("server"))
    pinned = fingerprint_of(dovecot.cert_path("expired"))
    config = fake_config(server, tls=mode, tls_ca_file=dovecot.ca_file,
                         tls_fingerprint=pin(pinned))

    res = receive_all(run_popfetchd, confdir, config)
    assert_refused(res, config, read_saved, server)
    assert_names_certificate(res, presented)
    assert pinned in normalized(res.stderr), "the expected (pinned) fingerprint is not in the message"


@pytest.mark.parametrize("mode", MODES)
def test_tls_below_1_2_is_refused(dovecot, fake_pop3, fake_config, confdir, run_popfetchd,
                                  read_saved, mode):
    ctx = server_context(dovecot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        except (ssl.SSLError, ValueError) as e:
            pytest.skip(f"this Python/OpenSSL cannot serve TLS 1.1: {e}")
    server = tls_fake(fake_pop3, dovecot, mode, context=ctx,
                      messages=mailgen.generate(1, 2000, seed=67))
    config = fake_config(server, tls=mode, tls_ca_file=dovecot.ca_file)

    res = receive_all(run_popfetchd, confdir, config)
    assert_refused(res, config, read_saved, server)


# --------------------------------------------------------------------------
# STLS refused, not offered, or followed by injected bytes


@pytest.mark.parametrize("case", ["not-offered", "err", "injected"])
def test_stls_failure_never_continues_in_clear(dovecot, fake_pop3, fake_config, confdir,
                                               run_popfetchd, read_saved, case):
    messages = mailgen.generate(1, 2000, seed=68)
    if case == "not-offered":
        server = fake_pop3(messages)                       # CAPA without STLS
    else:
        server = tls_fake(fake_pop3, dovecot, "explicit", messages=messages)
        if case == "err":
            server.inject("STLS", Reply(b"-ERR TLS not available right now\r\n"))
        else:
            # a man in the middle appends a response to the +OK; the server
            # then waits for the handshake (commit=True)
            server.inject("STLS", Reply(b"+OK Begin TLS\r\n+OK injected\r\n", commit=True))
    config = fake_config(server, tls="explicit", tls_ca_file=dovecot.ca_file)

    res = receive_all(run_popfetchd, confdir, config)
    assert_refused(res, config, read_saved, server)
    assert len(server.remaining()) == 1
    if case == "injected":
        assert [c.upper() for c in server.commands()] == ["CAPA", "STLS"], \
            "something was sent after the injected bytes"
        assert not server.sessions[0].tls


class TlsNeverStarts(Action):
    """Courier when its couriertls cannot start: `+OK` to STLS at once, then,
    once the ClientHello is in, a plain-text -ERR, and the end."""

    def perform(self, conn, default):
        conn.send(b"+OK Begin SSL/TLS negotiation now.\r\n")
        conn._recv()
        conn.send(b"-ERR STARTTLS failed: 500 Error starting couriertls.\r\n")
        return False


def test_stls_accepted_but_tls_never_starts(dovecot, fake_pop3, fake_config, confdir,
                                            run_popfetchd, read_saved):
    """76, nothing sent in clear, and the message says what happened: the
    server said +OK to STLS and then answered in clear (not the hint for a
    plain port configured as implicit TLS)."""
    server = tls_fake(fake_pop3, dovecot, "explicit", messages=mailgen.generate(1, 2000, seed=71))
    server.inject("STLS", TlsNeverStarts())
    config = fake_config(server, tls="explicit", tls_ca_file=dovecot.ca_file)

    res = receive_all(run_popfetchd, confdir, config)
    assert_refused(res, config, read_saved, server)
    assert "STLS" in res.stderr and "did not start TLS" in res.stderr, res.stderr
    assert "tls: explicit" not in res.stderr, res.stderr


def test_refused_port_with_implicit_tls_is_unreachable(mailbox, dovecot_config, confdir,
                                                       run_popfetchd, read_saved):
    """A refused TCP connection is exit 69 with implicit TLS too (libevent
    reports it as the end of a TLS handshake that never began)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = dovecot_config(mailbox, port=port, tls="implicit")

    res = receive_all(run_popfetchd, confdir, config)
    assert res.returncode == EX_UNAVAILABLE, res.stderr
    assert "refused" in res.stderr.lower() and "handshake" not in res.stderr.lower()
    assert read_saved(config["save_directory"]) == []


@pytest.mark.parametrize("where", ["fake", "dovecot"])
def test_plain_server_on_implicit_port(dovecot, mailbox, fake_pop3, fake_config, dovecot_config,
                                       confdir, run_popfetchd, read_saved, where):
    """A server that sends a plain greeting where TLS was configured: the
    handshake fails, exit 76."""
    if where == "fake":
        server = fake_pop3(mailgen.generate(1, 2000, seed=69))
        config = fake_config(server, tls="implicit", tls_ca_file=dovecot.ca_file)
    else:
        server = None
        mailbox.deliver(*mailgen.generate(1, 2000, seed=69))
        config = dovecot_config(mailbox, port=dovecot.pop3_port, tls="implicit",
                                tls_ca_file=dovecot.ca_file)

    res = receive_all(run_popfetchd, confdir, config)
    assert_refused(res, config, read_saved, server)
    if server is None:
        assert mailbox.count() == 1
        assert dovecot_logins(dovecot, mailbox.user) == []


@pytest.mark.parametrize("where", ["fake", "dovecot"])
def test_tls_server_on_explicit_port(dovecot, mailbox, fake_pop3, fake_config, dovecot_config,
                                     confdir, run_popfetchd, read_saved, where):
    """A TLS server where explicit (plain, then STLS) was configured: it waits
    for a ClientHello and never sends a greeting, so the greeting fails. The
    client cannot tell it from a stalled plain server (75, see
    test_storage.test_stalled_server_times_out), hence 76 or 75. Never a
    credential."""
    timeouts = {"connect": "5s", "command": "1s"}
    if where == "fake":
        server = tls_fake(fake_pop3, dovecot, "implicit", messages=mailgen.generate(1, 2000, seed=70))
        config = fake_config(server, tls="explicit", tls_ca_file=dovecot.ca_file, timeouts=timeouts)
    else:
        server = None
        mailbox.deliver(*mailgen.generate(1, 2000, seed=70))
        config = dovecot_config(mailbox, port=dovecot.pop3s_port, tls="explicit",
                                tls_ca_file=dovecot.ca_file, timeouts=timeouts)

    start = time.time()
    res = receive_all(run_popfetchd, confdir, config)
    assert res.returncode in (EX_PROTOCOL, EX_TEMPFAIL)
    assert time.time() - start < 8
    assert read_saved(config["save_directory"]) == []
    if server is not None:
        assert_nothing_leaked(server)
        assert not server.sessions[0].tls
    else:
        assert mailbox.count() == 1
        assert dovecot_logins(dovecot, mailbox.user) == []


# --------------------------------------------------------------------------
# pins and tls_verify: false


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("colons, upper", [(False, False), (True, True), (True, False)],
                         ids=["plain", "colons-upper", "colons"])
def test_fingerprint_pin_replaces_ca_and_name_checks(dovecot, fake_pop3, fake_config, confdir,
                                                     run_popfetchd, read_saved, mode, colons,
                                                     upper):
    """wronghost.crt is for wrong.example and its CA is not in the system
    store: only the pin lets it through."""
    server = tls_fake(fake_pop3, dovecot, mode, "wronghost",
                      messages=mailgen.generate(2, 3000, seed=71))
    expected = fake_expected(server)
    fp = pin(fingerprint_of(dovecot.cert_path("wronghost")), colons=colons, upper=upper)
    config = fake_config(server, tls=mode, tls_fingerprint=fp)

    res = receive_all(run_popfetchd, confdir, config)
    assert res.returncode == EX_OK
    assert server.wait_idle()
    assert server.sessions[0].tls
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert server.remaining() == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cert", ["expired", "wronghost"])
def test_tls_verify_false_accepts_any_certificate_and_warns(dovecot, fake_pop3, fake_config,
                                                           confdir, run_popfetchd, read_saved,
                                                           mode, cert):
    server = tls_fake(fake_pop3, dovecot, mode, cert, messages=mailgen.generate(2, 3000, seed=72))
    expected = fake_expected(server)
    config = fake_config(server, tls=mode, tls_verify=False)
    cd = confdir(config)

    first = run_popfetchd(["receive-all", "fake"], confdir=cd)
    assert first.returncode == EX_OK
    assert "tls_verify" in first.stderr, "no warning about tls_verify: false"
    assert server.wait_idle()
    assert server.sessions[0].tls
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert server.remaining() == []

    second = run_popfetchd(["receive-all", "fake"], confdir=cd)    # the warning at every connect
    assert second.returncode == EX_OK
    assert "tls_verify" in second.stderr


# --------------------------------------------------------------------------
# tls: none


def test_tls_none_warns_every_session(fake_pop3, fake_config, confdir, run_popfetchd,
                                      read_saved):
    server = fake_pop3(mailgen.generate(1, 2000, seed=73))
    expected = fake_expected(server)
    config = fake_config(server, tls="none")
    cd = confdir(config)

    for _ in range(2):
        res = run_popfetchd(["receive-all", "fake"], confdir=cd)
        assert res.returncode == EX_OK
        assert "tls: none" in res.stderr, "no warning about tls: none"
    assert server.wait_idle()
    assert not server.sent("STLS")
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
