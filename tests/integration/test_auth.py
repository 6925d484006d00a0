"""Logging in against the contract (DESIGN.md §1 sasl_mechanisms, §2 exit
codes, §4 step 2).

Against the Dovecot fixture over POP3S: every mechanism alone (and the
mechanism Dovecot logs), a wrong password with each, the default order of
preference, and a configuration that allows nothing the server offers.

Against the fake server (fakepop3's SASL server: PLAIN, LOGIN, CRAM-MD5,
SCRAM-SHA-1/-256 and -PLUS with tls-unique): SCRAM verified both ways (a
server-final "v=" that does not verify is cancelled with "*"; a +OK without
a server-final that verifies, in a continuation or on the +OK, is no
login), channel
binding under TLS 1.2 (and its type under TLS 1.3), the RFC 5034 framing
of the initial response (the 255-octet limit), resp-codes to AUTH, the
warning for a password sent in clear, and that no password and no SASL
response ever appears in popfetchd's output, even with -v.
"""

import base64
import concurrent.futures
import hashlib
import hmac
import os
import re
import socket
import ssl
import time

import pytest

import mailgen
from daemonutil import daemon, wait_for  # noqa: F401 (daemon: a fixture)
from fakepop3 import Reply
from test_receive import EX_NOPERM, EX_OK, EX_TEMPFAIL, assert_no_staging_leftovers, \
    assert_saved_exactly, fake_expected

# the mechanisms of the matrix, as in sasl_mechanisms
DOVECOT_MECHS = ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN", "APOP", "USER"]
# what Dovecot writes as method= for each (USER/PASS is logged as PLAIN)
DOVECOT_METHOD = {m: m for m in DOVECOT_MECHS} | {"USER": "PLAIN"}
# what Dovecot 2.3 offers (auth_mechanisms of tests/tools/dovecot.py)
DOVECOT_SASL = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]
# the fake server's SASL mechanisms
FAKE_SASL = ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN"]
CLEARTEXT_MECHS = ["PLAIN", "LOGIN", "USER"]
LOGIN_VERBS = ("USER", "PASS", "AUTH", "APOP")
FAKE_PASSWORD = "Fake-S3cret-pw-8814"


# --------------------------------------------------------------------------
# helpers


def tls_context(dovecot, maximum=None):
    """A server-side SSLContext with the fixture's certificate (for the fake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(dovecot.cert_path("server"), dovecot.key_path("server"))
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def pop3s_config(dovecot, dovecot_config, mailbox, id="dv", **keys):
    """A configuration for the Dovecot fixture over implicit TLS."""
    return dovecot_config(mailbox, id=id, port=dovecot.pop3s_port, tls="implicit",
                          tls_ca_file=dovecot.ca_file, **keys)


def mechs(*names):
    """sasl_mechanisms as a configuration value (None: the key is left out)."""
    return list(names) if names else None


def b64(data):
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def secret_forms(*secrets):
    """The secrets as they could leak: as they are and in base64 (at each of
    the three alignments a secret can have inside a longer base64 text)."""
    forms = set()
    for s in secrets:
        if not s:
            continue
        raw = s.encode() if isinstance(s, str) else s
        forms.add(raw.decode(errors="replace"))
        for pad in range(3):
            text = base64.b64encode(b"\0" * pad + raw).decode()
            # drop the characters that depend on what precedes or follows
            inner = text[4 if pad else 0:].rstrip("=")[:-4]
            if len(inner) >= 8:
                forms.add(inner)
    return forms


def sasl_lines(server):
    """Everything the client sent as login data to the fake server: the
    initial responses, the responses to "+" challenges, the PASS argument
    and the APOP digest (SASL lines that are "*" or empty excluded)."""
    out = []
    for record in list(server.sessions):
        in_auth = False
        for line in record.commands:
            verb, _, arg = line.partition(" ")
            if verb.upper() == "AUTH":
                initial = arg.partition(" ")[2]
                if initial and initial != "=":
                    out.append(initial)
                in_auth = True
            elif verb.upper() in ("PASS", "APOP"):
                out.append(arg.split()[-1] if arg else arg)
                in_auth = False
            elif in_auth and re.fullmatch(r"[A-Za-z0-9+/]+=*", line) and len(line) >= 8:
                out.append(line)
            elif not re.fullmatch(r"[A-Za-z0-9+/]*=*|\*", line):
                in_auth = False
    return [s for s in out if s]


def assert_no_secrets(res, *secrets, server=None):
    """Neither a password (as it is or in base64) nor anything the client
    sent as login data appears on popfetchd's stdout or stderr."""
    output = res.stdout + res.stderr
    leaks = sorted(f for f in secret_forms(*secrets) if f in output)
    if server is not None:
        leaks += [s for s in sasl_lines(server) if s in output]
    assert not leaks, f"secrets in popfetchd's output: {leaks}"


def run_receive(run_popfetchd, cd, config, verbose=True):
    args = ["receive-all", config["id"]] + (["-v"] if verbose else [])
    return run_popfetchd(args, confdir=cd)


def assert_mechanism_used(res, mech):
    """-v names the mechanism chosen: "pop3: logging in with MECH"."""
    used = re.findall(r"logging in with (\S+)", res.stderr)
    assert used == [mech], f"expected 'logging in with {mech}' once on stderr, found {used}"


def new_logins(dovecot, user, before, count=1, timeout=5.0):
    """The methods of the user's Dovecot logins since `before` (a list from
    login_methods), waiting up to `timeout` for `count` of them (the log
    is written asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        methods = dovecot.login_methods(user)[len(before):]
        if len(methods) >= count or time.monotonic() > deadline:
            return methods
        time.sleep(0.05)


def deliver(mailbox, seed, count=2):
    """Deliver generated messages; returns them as POP3 sends them (CRLF)."""
    messages = mailgen.generate(count, 3000, seed=seed)
    mailbox.deliver(*messages)
    return [mailgen.to_crlf(m) for m in messages]


def assert_saved_bytes(read_saved, config, expected):
    """The save directory holds exactly these messages, byte for byte."""
    saved = read_saved(config["save_directory"])
    assert sorted(s.eml for s in saved) == sorted(expected), \
        "the saved message.eml files differ from the messages on the server"
    assert_no_staging_leftovers(config["save_directory"])


def assert_refused(res, config, read_saved, code=EX_NOPERM, server=None):
    """The run failed with `code`, saved nothing, and (fake server) never
    went past the login."""
    assert res.returncode == code, f"expected exit {code}, got {res.returncode}"
    assert read_saved(config["save_directory"]) == [], "saved something without logging in"
    assert_no_staging_leftovers(config["save_directory"])
    if server is not None:
        assert server.wait_idle(), "the fake server's sessions did not end"
        for verb in ("UIDL", "LIST", "STAT", "RETR", "DELE"):
            assert not server.sent(verb), f"{verb} after a failed login: {server.transcript}"
        assert not any(r.committed for r in server.sessions)


def exchanges(server):
    """Every SASL exchange the fake server saw, in order."""
    assert server.wait_idle(), "the fake server's sessions did not end"
    return [ex for record in server.sessions for ex in record.sasl]


def fake_for(fake_pop3, mech, seed=0, count=2, **kw):
    """A fake server offering exactly `mech` (and no USER unless mech is USER)."""
    caps_extra = {}
    if mech == "USER":
        kw.setdefault("sasl", ())
    elif mech == "APOP":
        kw.setdefault("apop", True)
        kw.setdefault("sasl", ())
    else:
        kw.setdefault("sasl", (mech,))
    if mech != "USER":
        sasl = kw["sasl"]
        caps_extra["capabilities"] = (["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE"]
                                      + (["SASL " + " ".join(sasl)] if sasl else []))
    kw = {**caps_extra, **kw}
    kw.setdefault("password", FAKE_PASSWORD)
    return fake_pop3(mailgen.generate(count, 2500, seed=seed) if count else (), **kw)


# --------------------------------------------------------------------------
# an independent SCRAM client (for the premise: the fake server's SCRAM is
# the one Dovecot speaks)


def scram_login(host, port, user, password, hash_name, context=None):
    """Log in with SCRAM-SHA-1/-256 (no channel binding) over raw POP3.
    Returns (logged in, server signature verified)."""
    def H(data):
        return hashlib.new(hash_name, data).digest()

    def HMAC(key, data):
        return hmac.new(key, data, hash_name).digest()

    mech = "SCRAM-SHA-256" if hash_name == "sha256" else "SCRAM-SHA-1"
    with socket.create_connection((host, port), timeout=10) as raw:
        sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        f = sock.makefile("rb")

        def cmd(line):
            sock.sendall(line.encode() + b"\r\n")
            return f.readline().decode().rstrip("\r\n")

        assert f.readline().startswith(b"+OK")
        bare = f"n={user},r={b64(os.urandom(18))}"
        reply = cmd(f"AUTH {mech} {b64('n,,' + bare)}")
        if not reply.startswith("+ "):
            return False, False
        server_first = base64.b64decode(reply[2:]).decode()
        attrs = dict(a.split("=", 1) for a in server_first.split(","))
        salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), base64.b64decode(attrs["s"]),
                                     int(attrs["i"]))
        without_proof = f"c={b64('n,,')},r={attrs['r']}"
        auth_message = f"{bare},{server_first},{without_proof}".encode()
        client_key = HMAC(salted, b"Client Key")
        proof = bytes(a ^ b for a, b in zip(client_key, HMAC(H(client_key), auth_message)))
        reply = cmd(f"{b64(without_proof + ',p=' + b64(proof))}")
        if not reply.startswith("+ "):
            return False, False
        final = base64.b64decode(reply[2:]).decode()
        verified = final == "v=" + b64(HMAC(HMAC(salted, b"Server Key"), auth_message))
        reply = cmd("")
        cmd("QUIT")
        return reply.startswith("+OK"), verified


@pytest.mark.parametrize("hash_name", ["sha256", "sha1"])
def test_fake_scram_server_agrees_with_dovecot(dovecot, mailbox, fake_pop3, hash_name):
    """The premise of the fake-server SCRAM tests: one SCRAM client logs in
    to both Dovecot and the fake server, verifies both servers' signatures,
    and is refused by the fake server with a wrong password."""
    mech = "SCRAM-SHA-256" if hash_name == "sha256" else "SCRAM-SHA-1"
    ctx = ssl.create_default_context(cafile=dovecot.ca_file)
    assert scram_login(dovecot.host, dovecot.pop3s_port, mailbox.user, mailbox.password,
                       hash_name, ctx) == (True, True)
    server = fake_pop3(sasl=(mech,), password=FAKE_PASSWORD)
    assert scram_login(server.host, server.port, server.user, FAKE_PASSWORD,
                       hash_name) == (True, True)
    assert scram_login(server.host, server.port, server.user, "wrong", hash_name)[0] is False
    assert [ex.outcome for ex in exchanges(server)] == ["ok", "wrong user or proof"]


# --------------------------------------------------------------------------
# against Dovecot


@pytest.mark.parametrize("mech", DOVECOT_MECHS)
def test_dovecot_each_mechanism(dovecot, mailbox, dovecot_config, confdir, run_popfetchd,
                                read_saved, mech):
    expected = deliver(mailbox, seed=100 + DOVECOT_MECHS.index(mech))
    config = pop3s_config(dovecot, dovecot_config, mailbox, sasl_mechanisms=mechs(mech))
    before = dovecot.login_methods(mailbox.user)

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK
    assert_saved_bytes(read_saved, config, expected)
    assert mailbox.count() == 0
    assert_mechanism_used(res, mech)
    assert new_logins(dovecot, mailbox.user, before) == [DOVECOT_METHOD[mech]], \
        "Dovecot's log does not show the mechanism"
    assert_no_secrets(res, mailbox.password)


def test_dovecot_wrong_password_with_each_mechanism(dovecot, mailbox, dovecot_config, confdir,
                                                    run_popfetchd, read_saved):
    """All mechanisms at once (Dovecot delays every failed login by its
    auth_failure_delay): exit 77, nothing saved, the mail left alone."""
    deliver(mailbox, seed=120)
    wrong = "Wrong-Passw0rd-3141"
    configs = [pop3s_config(dovecot, dovecot_config, mailbox, id=f"wrong-{m.lower()}",
                            password=wrong, sasl_mechanisms=mechs(m)) for m in DOVECOT_MECHS]
    cd = confdir(*configs)
    with concurrent.futures.ThreadPoolExecutor(len(configs)) as pool:
        results = list(pool.map(lambda c: run_receive(run_popfetchd, cd, c), configs))

    failures = []
    for mech, config, res in zip(DOVECOT_MECHS, configs, results):
        if res.returncode != EX_NOPERM:
            failures.append(f"{mech}: exit {res.returncode}, expected {EX_NOPERM}\n{res.stderr}")
        if read_saved(config["save_directory"]):
            failures.append(f"{mech}: saved something")
        if f"logging in with {mech}" not in res.stderr:
            failures.append(f"{mech}: not the mechanism used")
        assert_no_secrets(res, wrong, mailbox.password)
    assert not failures, "\n".join(failures)
    assert mailbox.count() == 2
    assert dovecot.login_methods(mailbox.user) == []


@pytest.mark.parametrize("allowed, chosen", [
    ((), "SCRAM-SHA-256"),
    (("LOGIN", "CRAM-MD5"), "LOGIN"),
    (("APOP", "PLAIN"), "APOP"),
    (("SCRAM-SHA-256-PLUS", "CRAM-MD5", "SCRAM-SHA-256"), "CRAM-MD5"),
], ids=["default", "login-before-cram", "apop-before-plain", "plus-not-offered"])
def test_dovecot_order_of_preference(dovecot, mailbox, dovecot_config, confdir, run_popfetchd,
                                     read_saved, allowed, chosen):
    """The first allowed mechanism the server offers; by default the
    strongest (Dovecot 2.3 has no -PLUS: SCRAM-SHA-256)."""
    expected = deliver(mailbox, seed=130, count=1)
    config = pop3s_config(dovecot, dovecot_config, mailbox, sasl_mechanisms=mechs(*allowed))
    before = dovecot.login_methods(mailbox.user)

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK
    assert_mechanism_used(res, chosen)
    assert new_logins(dovecot, mailbox.user, before) == [DOVECOT_METHOD[chosen]]
    assert_saved_bytes(read_saved, config, expected)
    assert_no_secrets(res, mailbox.password)


def test_dovecot_no_usable_mechanism(dovecot, mailbox, dovecot_config, confdir, run_popfetchd,
                                     read_saved):
    """SCRAM-SHA-256-PLUS only, and Dovecot 2.3 does not offer it: exit 77,
    and the message names both lists."""
    deliver(mailbox, seed=140, count=1)
    config = pop3s_config(dovecot, dovecot_config, mailbox,
                          sasl_mechanisms=mechs("SCRAM-SHA-256-PLUS"))
    before = dovecot.login_methods(mailbox.user)

    res = run_receive(run_popfetchd, confdir(config), config, verbose=False)

    assert_refused(res, config, read_saved)
    assert mailbox.count() == 1
    assert new_logins(dovecot, mailbox.user, before, timeout=0.5) == []
    line = next((l for l in res.stderr.splitlines() if "no usable login mechanism" in l), None)
    assert line is not None, "stderr does not say that no mechanism fits"
    offers, _, allows = line.partition("allows")
    for mech in DOVECOT_SASL:
        assert re.search(rf"(?<![\w-]){mech}(?![\w-])", offers), \
            f"the server's {mech} is not named among its offers: {line}"
    assert "APOP" in offers and "USER" in offers, line
    assert "SCRAM-SHA-256-PLUS" in allows, f"the allowed mechanisms are not named: {line}"
    assert_no_secrets(res, mailbox.password)


# --------------------------------------------------------------------------
# against the fake server: the mechanisms, no-fit cases, the order


@pytest.mark.parametrize("mech", FAKE_SASL + ["APOP", "USER"])
def test_fake_each_mechanism(fake_pop3, fake_config, confdir, run_popfetchd, read_saved, mech):
    server = fake_for(fake_pop3, mech, seed=200)
    expected = fake_expected(server)
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=mechs(mech))

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    assert server.remaining() == []
    assert_mechanism_used(res, mech)
    assert_no_secrets(res, FAKE_PASSWORD, server=server)
    if mech in FAKE_SASL:
        assert [(ex.mechanism, ex.outcome) for ex in exchanges(server)] == [(mech, "ok")]


@pytest.mark.parametrize("mech", FAKE_SASL + ["APOP", "USER"])
def test_fake_wrong_password(fake_pop3, fake_config, confdir, run_popfetchd, read_saved, mech):
    server = fake_for(fake_pop3, mech, seed=210)
    wrong = "Not-The-Passw0rd-2718"
    config = fake_config(server, password=wrong, sasl_mechanisms=mechs(mech))

    res = run_receive(run_popfetchd, confdir(config), config)

    assert_refused(res, config, read_saved, server=server)
    assert len(server.remaining()) == 2
    assert_no_secrets(res, wrong, FAKE_PASSWORD, server=server)
    if mech in FAKE_SASL:
        assert [ex.outcome for ex in exchanges(server)] != ["ok"]


@pytest.mark.parametrize("offered, apop, chosen", [
    (("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1"), True, "SCRAM-SHA-1"),
    (("PLAIN", "LOGIN", "CRAM-MD5"), True, "CRAM-MD5"),
    (("PLAIN", "LOGIN"), True, "APOP"),
    (("LOGIN", "PLAIN"), False, "PLAIN"),
    (("LOGIN",), False, "LOGIN"),
    ((), False, "USER"),
], ids=["scram-sha-1", "cram-md5", "apop", "plain", "login", "user"])
def test_fake_default_order(fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                            offered, apop, chosen):
    """Without sasl_mechanisms: SCRAM-SHA-256-PLUS SCRAM-SHA-256 SCRAM-SHA-1
    CRAM-MD5 APOP PLAIN LOGIN USER, whatever order the server lists."""
    server = fake_pop3(mailgen.generate(1, 2000, seed=220), sasl=offered, apop=apop,
                       password=FAKE_PASSWORD)
    config = fake_config(server, password=FAKE_PASSWORD)

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK
    assert_mechanism_used(res, chosen)
    assert server.wait_idle()
    login = [c.split()[0].upper() + (" " + c.split()[1] if c.upper().startswith("AUTH ") else "")
             for c in server.commands() if c.split() and c.split()[0].upper() in LOGIN_VERBS]
    want = {"APOP": ["APOP"], "USER": ["USER", "PASS"]}.get(chosen, [f"AUTH {chosen}"])
    assert login == want, f"login commands {login}, expected {want}"
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


@pytest.mark.parametrize("offered, apop, user, allowed", [
    (("PLAIN", "LOGIN"), False, True, ("APOP",)),
    (("PLAIN",), False, False, ("SCRAM-SHA-256", "LOGIN", "USER")),
    (("SCRAM-SHA-256-PLUS",), False, False, ("SCRAM-SHA-256-PLUS",)),
    ((), True, False, ("CRAM-MD5", "PLAIN")),
], ids=["apop-not-offered", "user-not-in-capa", "plus-without-tls", "apop-only-server"])
def test_fake_no_usable_mechanism(fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                                  offered, apop, user, allowed):
    """Exit 77 before any credential is sent; stderr names what the server
    offers and what the configuration allows."""
    caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE"] + (["USER"] if user else []) \
        + (["SASL " + " ".join(offered)] if offered else [])
    server = fake_pop3(mailgen.generate(1, 2000, seed=230), sasl=offered, apop=apop,
                       capabilities=caps, password=FAKE_PASSWORD)
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=list(allowed))

    res = run_receive(run_popfetchd, confdir(config), config, verbose=False)

    assert_refused(res, config, read_saved, server=server)
    for verb in LOGIN_VERBS:
        assert not server.sent(verb), f"{verb} sent although nothing fits: {server.transcript}"
    line = next((l for l in res.stderr.splitlines() if "no usable login mechanism" in l), None)
    assert line is not None, "stderr does not say that no mechanism fits"
    assert re.search(r"offers [A-Za-z]", line), f"a malformed list of offers: {line}"
    offers, _, allows = line.partition("allows")
    for mech in offered:
        assert mech in offers, f"the server's {mech} is not named: {line}"
    if apop:
        assert "APOP" in offers, line
    if user:
        assert "USER" in offers, line
    for mech in allowed:
        assert mech in allows, f"the allowed {mech} is not named: {line}"
    assert_no_secrets(res, FAKE_PASSWORD)


# --------------------------------------------------------------------------
# SCRAM against the fake server


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_exchange(fake_pop3, fake_config, confdir, run_popfetchd, read_saved, mech):
    """RFC 5802 as the fake server sees it: gs2 header "n,,", the
    client-first on the AUTH line, c=biws, the empty answer to "v="."""
    server = fake_for(fake_pop3, mech, seed=240)
    expected = fake_expected(server)
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=[mech])

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    [ex] = exchanges(server)
    assert ex.outcome == "ok" and ex.initial_response
    assert ex.gs2_header == "n,,"
    assert ex.channel_binding == b"n,,"
    first, final, last = ex.client_messages
    assert re.fullmatch(rb"n,,n=fakeuser,r=[\x21-\x2b\x2d-\x7e]{16,}", first), first
    assert final.startswith(b"c=biws,r=") and b",p=" in final, final
    assert last == b"", "the answer to the server-final message is not empty"
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_server_signature_wrong(fake_pop3, fake_config, confdir, run_popfetchd,
                                      read_saved, mech):
    """A server whose "v=" does not verify does not know the password (or
    is not the server): the client answers "*", exits 77, never RETRs."""
    server = fake_for(fake_pop3, mech, seed=250, sasl_faults={"bad-server-signature"})
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=[mech])

    res = run_receive(run_popfetchd, confdir(config), config)

    assert_refused(res, config, read_saved, server=server)
    [ex] = exchanges(server)
    assert ex.aborted, f"the client did not cancel with '*' ({ex.outcome})"
    auth = server.commands()
    i = next(k for k, c in enumerate(auth) if c.upper().startswith("AUTH "))
    assert auth[i + 2:i + 3] == ["*"], f"'*' is not the answer to 'v=': {auth}"
    assert len(server.remaining()) == 2
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
@pytest.mark.parametrize("faults", [("no-server-final",),
                                    ("server-final-in-ok", "bad-server-signature")],
                         ids=["no-server-final", "wrong-signature-on-ok"])
def test_scram_ok_without_server_proof(fake_pop3, fake_config, confdir, run_popfetchd,
                                       read_saved, mech, faults):
    """+OK to the client's proof is no login while the server has not proved
    it knows the password: no server-final message at all, or one on the
    +OK (RFC 5034 additional data) that does not verify. Exit 77, and
    nothing more is sent (no STAT, no QUIT)."""
    server = fake_for(fake_pop3, mech, seed=255, sasl_faults=set(faults))
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=[mech])

    res = run_receive(run_popfetchd, confdir(config), config)

    assert_refused(res, config, read_saved, server=server)
    [ex] = exchanges(server)
    assert ex.outcome == "ok", "the premise: the fake server accepted the proof"
    commands = server.commands()
    i = next(k for k, c in enumerate(commands) if c.upper().startswith("AUTH "))
    assert commands[i + 2:] == [], f"sent after the unproven +OK: {commands[i + 2:]}"
    assert "did not prove it knows the password" in res.stderr, res.stderr
    assert len(server.remaining()) == 2
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_server_final_on_ok(fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                                  mech):
    """A server-final message that verifies is as good on the +OK (RFC 5034
    additional data) as in a "+" continuation: the login counts, and no
    empty answer goes out for it."""
    server = fake_for(fake_pop3, mech, seed=256, sasl_faults={"server-final-in-ok"})
    expected = fake_expected(server)
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=[mech])

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK, res.stderr
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    [ex] = exchanges(server)
    assert ex.outcome == "ok" and ex.success_data
    assert len(ex.client_messages) == 2, ex.client_messages
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


@pytest.mark.parametrize("fault", [None, "bad-channel-binding"], ids=["good", "wrong-binding"])
def test_scram_plus_tls12(dovecot, fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                          fault):
    """SCRAM-SHA-256-PLUS under TLS 1.2: tls-unique, gs2 header
    "p=tls-unique,,", c= = gs2 header + the server's tls-unique; a server
    that sees other binding data (a man in the middle) refuses: 77."""
    server = fake_for(fake_pop3, "SCRAM-SHA-256-PLUS", seed=260,
                      tls_context=tls_context(dovecot, ssl.TLSVersion.TLSv1_2),
                      sasl_faults={fault} if fault else ())
    expected = fake_expected(server)
    config = fake_config(server, password=FAKE_PASSWORD, tls="implicit",
                         tls_ca_file=dovecot.ca_file, sasl_mechanisms=["SCRAM-SHA-256-PLUS"])

    res = run_receive(run_popfetchd, confdir(config), config)

    [ex] = exchanges(server)
    assert server.sessions[0].tls
    assert ex.gs2_header == "p=tls-unique,,", f"gs2 header {ex.gs2_header!r}"
    assert ex.channel_binding is not None and ex.channel_binding.startswith(b"p=tls-unique,,")
    cb_data = ex.channel_binding[len(b"p=tls-unique,,"):]
    assert len(cb_data) == 12, f"tls-unique under TLS 1.2 is a 12-byte Finished: {cb_data!r}"
    if fault is None:
        assert ex.channel_binding == ex.expected_binding, "c= is not the server's tls-unique"
        assert res.returncode == EX_OK
        assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
        assert_mechanism_used(res, "SCRAM-SHA-256-PLUS")
    else:
        assert ex.outcome == "channel bindings do not match"
        assert_refused(res, config, read_saved, server=server)
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


def test_scram_plus_preferred_by_default_under_tls(dovecot, fake_pop3, fake_config, confdir,
                                                   run_popfetchd, read_saved):
    server = fake_for(fake_pop3, "SCRAM-SHA-256-PLUS", seed=270,
                      sasl=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"),
                      tls_context=tls_context(dovecot, ssl.TLSVersion.TLSv1_2))
    config = fake_config(server, password=FAKE_PASSWORD, tls="implicit",
                         tls_ca_file=dovecot.ca_file)

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK
    assert_mechanism_used(res, "SCRAM-SHA-256-PLUS")
    assert [(ex.mechanism, ex.outcome) for ex in exchanges(server)] == [("SCRAM-SHA-256-PLUS", "ok")]


def test_scram_plus_tls13_binds_to_tls_exporter(dovecot, fake_pop3, fake_config, confdir,
                                                run_popfetchd, read_saved):
    """Under TLS 1.3 the binding type is tls-exporter (RFC 9266), 32 bytes.
    Python cannot export keying material, so the fake server cannot check
    the value and refuses: only the type and size are checked here."""
    server = fake_for(fake_pop3, "SCRAM-SHA-256-PLUS", seed=280,
                      tls_context=tls_context(dovecot, ssl.TLSVersion.TLSv1_3))
    config = fake_config(server, password=FAKE_PASSWORD, tls="implicit",
                         tls_ca_file=dovecot.ca_file, sasl_mechanisms=["SCRAM-SHA-256-PLUS"])

    res = run_receive(run_popfetchd, confdir(config), config)

    assert_refused(res, config, read_saved, server=server)
    [ex] = exchanges(server)
    assert ex.gs2_header == "p=tls-exporter,,", f"gs2 header {ex.gs2_header!r}"
    assert ex.channel_binding.startswith(b"p=tls-exporter,,")
    assert len(ex.channel_binding) == len(b"p=tls-exporter,,") + 32
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


SALT_A, SALT_B = b"salt of account", b"account made again"


def daemon_logins(output):
    """The daemon's logins in its -v log, in order: True for each that took
    SCRAM's salted password from memory, False for each that computed it."""
    logins = []
    for line in output.splitlines():
        if "pop3: logging in with" in line:
            logins.append(False)
        elif "with the salted password of an earlier login" in line:
            assert logins and not logins[-1], f"a second cache line for a login: {line}"
            logins[-1] = True
    return logins


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_salted_password_kept(fake_pop3, fake_config, confdir, daemon, mech):
    """A server that stores SCRAM credentials sends the same salt and
    iteration count at every login: the daemon computes the salted password
    (PBKDF2, most of a login's CPU) at the first login and takes it from
    memory at the next. The account made again (a new salt) logs in too:
    computed anew, then kept. The salted password never reaches the log."""
    server = fake_for(fake_pop3, mech, seed=257, count=0, scram_salt=SALT_A)
    d = daemon(confdir(fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=[mech],
                                   poll_interval="1s")), args=("-v",))
    d.wait_ready()
    wait_for(lambda: daemon_logins(d.output).count(True) >= 2, 30, "two logins from memory")
    server.scram_salt = SALT_B
    wait_for(lambda: sum(ex.salt == SALT_B for rec in server.sessions for ex in rec.sasl) >= 3,
             30, "three logins with the new salt")
    assert d.stop() == EX_OK, d.output

    salts = [ex.salt for ex in exchanges(server)]
    # every login ended well; the last may have been cut by the stop
    *done, last = exchanges(server)
    assert all(ex.outcome == "ok" for ex in done), exchanges(server)
    assert last.outcome in ("ok", "connection closed"), exchanges(server)
    logins = daemon_logins(d.output)
    # the server's exchanges are the daemon's logins, one by one; the last
    # may have been cut by the stop
    n = min(len(salts), len(logins)) - 1
    assert n >= 4 and SALT_B in salts[:n], (salts, logins)
    assert logins[:n] == [i > 0 and salts[i] == salts[i - 1] for i in range(n)], (salts, logins)
    hash_name = "sha256" if mech == "SCRAM-SHA-256" else "sha1"
    for salt in (SALT_A, SALT_B):
        salted = hashlib.pbkdf2_hmac(hash_name, FAKE_PASSWORD.encode(), salt, 4096)
        for form in (salted.hex(), salted.hex().upper(), base64.b64encode(salted).decode()):
            assert form not in d.output, "the salted password is in the log"


# --------------------------------------------------------------------------
# RFC 5034 framing


@pytest.mark.parametrize("length, inline", [(10, True), (178, True), (179, False), (400, False)])
def test_plain_initial_response_framing(fake_pop3, fake_config, confdir, run_popfetchd,
                                        read_saved, length, inline):
    """The initial response goes on the AUTH line when the line (with its
    CRLF) fits in 255 octets, else after the "+ " continuation.
    len(user) + len(password) = 178 makes a 253-octet line, 179 one of 257."""
    user = "u" * (length // 2)
    password = "P" + "w" * (length - len(user) - 1)
    server = fake_for(fake_pop3, "PLAIN", seed=290, count=1, user=user, password=password)
    config = fake_config(server, password=password, sasl_mechanisms=["PLAIN"])

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK
    [ex] = exchanges(server)
    assert ex.client_messages == [f"\0{user}\0{password}".encode()]
    commands = server.commands()
    i = next(k for k, c in enumerate(commands) if c.upper().startswith("AUTH"))
    response = b64(f"\0{user}\0{password}")
    if inline:
        assert commands[i] == f"AUTH PLAIN {response}"
        assert len(commands[i]) + 2 <= 255
        assert ex.initial_response
    else:
        assert len("AUTH PLAIN ") + len(response) + 2 > 255
        assert commands[i:i + 2] == ["AUTH PLAIN", response], commands
        assert not ex.initial_response
    assert_no_secrets(res, password, server=server)


def test_scram_long_user_sends_client_first_after_continuation(fake_pop3, fake_config, confdir,
                                                               run_popfetchd, read_saved):
    user = "scram-" + "x" * 250
    server = fake_for(fake_pop3, "SCRAM-SHA-256", seed=300, count=1, user=user)
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=["SCRAM-SHA-256"])

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK
    [ex] = exchanges(server)
    assert not ex.initial_response and ex.outcome == "ok"
    assert "AUTH SCRAM-SHA-256" in server.commands()
    assert ex.client_messages[0].startswith(f"n,,n={user},r=".encode())


@pytest.mark.parametrize("mech", ["LOGIN", "CRAM-MD5"])
def test_server_first_mechanisms_wait_for_the_challenge(fake_pop3, fake_config, confdir,
                                                        run_popfetchd, read_saved, mech):
    server = fake_for(fake_pop3, mech, seed=310, count=1)
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=[mech])

    res = run_receive(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_OK
    [ex] = exchanges(server)
    assert not ex.initial_response
    assert f"AUTH {mech}" in server.commands(), server.commands()
    if mech == "LOGIN":
        assert ex.client_messages == [b"fakeuser", FAKE_PASSWORD.encode()]
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


# --------------------------------------------------------------------------
# resp-codes to the login


@pytest.mark.parametrize("response, code", [
    (b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n", EX_TEMPFAIL),
    (b"-ERR [LOGIN-DELAY] Minimum time between logins not yet elapsed\r\n", EX_TEMPFAIL),
    (b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n", EX_TEMPFAIL),
    (b"-ERR [AUTH] Authentication failed.\r\n", EX_NOPERM),
    (b"-ERR Login failed.\r\n", EX_NOPERM),
], ids=["in-use", "login-delay", "sys-temp", "auth", "no-code"])
@pytest.mark.parametrize("mech", ["PLAIN", "SCRAM-SHA-256", "APOP"])
def test_login_refused_with_resp_code(fake_pop3, fake_config, confdir, run_popfetchd,
                                      read_saved, mech, response, code):
    server = fake_for(fake_pop3, mech, seed=320)
    server.inject("APOP" if mech == "APOP" else "AUTH", Reply(response))
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=[mech])

    res = run_receive(run_popfetchd, confdir(config), config, verbose=False)

    assert_refused(res, config, read_saved, code=code, server=server)
    assert len(server.remaining()) == 2
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


# --------------------------------------------------------------------------
# tls: none


@pytest.mark.parametrize("mech", CLEARTEXT_MECHS + ["SCRAM-SHA-256", "CRAM-MD5", "APOP"])
def test_password_in_clear_warning(fake_pop3, fake_config, confdir, run_popfetchd, read_saved,
                                   mech):
    """tls: none works; PLAIN, LOGIN and USER log a warning that the
    password itself went to the server in clear (naming the mechanism);
    SCRAM, CRAM-MD5 and APOP do not send it, and are not so warned."""
    server = fake_for(fake_pop3, mech, seed=330)
    expected = fake_expected(server)
    config = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=[mech])

    res = run_receive(run_popfetchd, confdir(config), config, verbose=False)

    assert res.returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "fake", expected)
    warned = [l for l in res.stderr.splitlines()
              if re.search(rf"(?<![\w-]){re.escape(mech)}(?![\w-])", l) and "clear" in l.lower()]
    if mech in CLEARTEXT_MECHS:
        assert warned, f"no warning that the password went in clear with {mech}:\n{res.stderr}"
        assert all("password" in l.lower() for l in warned), warned
    else:
        assert not warned, f"{mech} does not send the password, yet: {warned}"
    assert_no_secrets(res, FAKE_PASSWORD, server=server)


# --------------------------------------------------------------------------
# secrets


def test_no_secret_in_any_output(dovecot, fake_pop3, fake_config, confdir, run_popfetchd):
    """With -v and --json, on success and on failure, for every mechanism:
    neither the password nor any login data the client sent is printed."""
    results = []
    for k, mech in enumerate(FAKE_SASL + ["APOP", "USER"]):
        for password in (FAKE_PASSWORD, "Wr0ng-" + FAKE_PASSWORD[::-1]):
            server = fake_for(fake_pop3, mech, seed=340 + k, count=1)
            config = fake_config(server, id=f"s{k}", password=password, sasl_mechanisms=[mech])
            cd = confdir(config)
            for extra in (["-v"], ["-v", "--json"]):
                res = run_popfetchd(["receive-all", config["id"], *extra], confdir=cd)
                results.append((mech, password, res, server))
    for mech, password, res, server in results:
        assert "logging in with" in res.stderr, f"{mech}: -v did not log the mechanism"
        assert_no_secrets(res, password, FAKE_PASSWORD, server=server)


@pytest.mark.parametrize("iterations, ok", [(100000, True), (100001, False), (10**9, False)])
def test_scram_iteration_count_is_bounded(fake_pop3, fake_config, confdir, run_popfetchd,
                                          iterations, ok):
    """PBKDF2 runs on the event loop: a server asking for more than 100 000
    SCRAM iterations (a billion would hold every other mailbox for minutes)
    is refused at once, with a line that says why; 100 000 still logs in."""
    server = fake_for(fake_pop3, "SCRAM-SHA-256", seed=258, count=1,
                      scram_iterations=iterations)
    cfg = fake_config(server, password=FAKE_PASSWORD, sasl_mechanisms=["SCRAM-SHA-256"])
    started = time.monotonic()
    r = run_popfetchd(["receive-all", cfg["id"]], confdir=confdir(cfg))
    if ok:
        assert r.returncode == 0, r.describe()
    else:
        assert r.returncode == 77, r.describe()
        assert (f"the server asks for {iterations} SCRAM iterations, more than 100000: "
                "refused") in r.stderr, r.describe()
        assert time.monotonic() - started < 10
