"""`popfetchd test ID`, the Test button, against the contract (DESIGN.md §2
"test ID" and the exit codes).

It reports, one line per step on stdout (`STEP RESULT DETAIL`, RESULT one
of ok, FAILED, skipped, warning): config, connect, tls, capa, token, auth,
stat, smime, save. Network steps after a failed one are skipped; the local
steps (smime, save) always run. The exit code is that of the first failed
step: 69 connect, 76 TLS or protocol, 77 authentication or token refused,
75 temporary, 74 save directory, 78 configuration or S/MIME key. With
--json: exactly one object {"configuration", "ok", "exit_code", "steps":
[{"step", "result", "detail", ...}]}.

Against the Dovecot fixture: a good configuration over implicit TLS and over
STLS (every step ok, STAT right, every message still on the server, and
Dovecot's logout line says top=0/0, retr=0/0, del=0/N); an untrusted
certificate; a wrong password; OAuth2 with the token endpoint issuing and
refusing. Against the fake server: the exact transcript (never RETR, TOP,
DELE, UIDL or LIST; QUIT at the end), STLS, a wrong host name in the
certificate, STAT refused, [IN-USE]. Locally: a refused port, a name that
does not resolve, S/MIME keys (good, wrong password, missing), save
directories root cannot write to, unknown, inactive and invalid
configurations. The autouse secret_registry checks that no password,
PKCS#12 password, client secret or token appears in any output.
"""

import datetime
import os
import socket
import ssl
import time

import pytest

import mailgen
from fakepop3 import Reply
from test_receive import (EX_CONFIG, EX_IOERR, EX_NOPERM, EX_OK, EX_PROTOCOL, EX_TEMPFAIL,
                          EX_UNAVAILABLE)
from test_smime import P12_PASSWORD, PKI
from test_tls import fingerprint_of, server_context, wait_for

STEPS = ["config", "connect", "tls", "capa", "token", "auth", "stat", "smime", "save"]
NETWORK = ["connect", "tls", "capa", "token", "auth", "stat"]
RESULTS = {"ok", "FAILED", "skipped", "warning"}
RETRIEVING = ("RETR", "TOP", "DELE", "UIDL", "LIST")


# --------------------------------------------------------------------------
# helpers


def run_test(run_popfetchd, cd, config_id, *options, env=None):
    return run_popfetchd([*options, "test", config_id], confdir=cd, env=env)


def steps_of(res):
    """{step: (result, detail)} from the text report; checks its form: one
    line per step, in order, nothing else on stdout."""
    lines = res.stdout.splitlines()
    assert len(lines) == len(STEPS), f"expected {len(STEPS)} lines:\n{res.stdout}"
    found = {}
    for line, name in zip(lines, STEPS):
        parts = line.split(None, 2)
        assert len(parts) == 3, f"not 'STEP RESULT DETAIL': {line!r}"
        assert parts[0] == name, f"expected step {name}, got {line!r}"
        assert parts[1] in RESULTS, f"unknown result in {line!r}"
        found[name] = (parts[1], parts[2])
    return found


def results(steps):
    return {name: steps[name][0] for name in STEPS}


def passed(steps, *names):
    """The steps passed: ok, or a warning (the fake server speaks plain POP3,
    where the login step warns of a password sent in clear)."""
    return all(steps[n][0] in ("ok", "warning") for n in names)


def json_steps(res):
    """{step: object} from --json output, after checking its shape."""
    doc = res.json()
    assert list(doc) == ["configuration", "ok", "exit_code", "steps"], doc
    assert doc["exit_code"] == res.returncode
    assert doc["ok"] is (res.returncode == 0)
    assert [s["step"] for s in doc["steps"]] == STEPS
    for s in doc["steps"]:
        assert s["result"] in RESULTS and isinstance(s["detail"], str) and s["detail"], s
        if s["result"] == "FAILED":
            assert isinstance(s["exit_code"], int), s
    first_failed = next((s for s in doc["steps"] if s["result"] == "FAILED"), None)
    assert doc["exit_code"] == (first_failed["exit_code"] if first_failed else 0)
    return {s["step"]: s for s in doc["steps"]}


def assert_network_skipped_after(steps, failed):
    """Every network step after `failed` is skipped; the local ones ran."""
    after = NETWORK[NETWORK.index(failed) + 1:]
    for name in after:
        assert steps[name][0] == "skipped", f"{name} after a failed {failed}: {steps[name]}"
    assert steps["save"][0] == "ok", "the save directory was not checked"
    assert "not tried" not in steps["smime"][1] and "not tried" not in steps["save"][1]


def cert_not_after(path):
    """The certificate's notAfter as RFC 3339 UTC ("2036-11-23T10:06:32Z")."""
    text = ssl._ssl._test_decode_cert(str(path))["notAfter"]
    when = datetime.datetime.strptime(text, "%b %d %H:%M:%S %Y %Z")
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def vsize(message):
    """The size Dovecot gives a message delivered with LF line ends (CRLF counted)."""
    return len(message) + message.count(b"\n") - message.count(b"\r\n")


def logouts(dovecot, user):
    """Dovecot's logout lines of a user's POP3 sessions ("top=0/0, retr=..., del=...")."""
    return [l for l in dovecot.log_text().splitlines()
            if f"pop3({user})" in l and "Disconnected" in l]


def closed_port():
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_fake_untouched(server, messages_before, quit=True):
    """The fake server: nothing retrieved or listed, nothing deleted, every
    message still there; with quit, the session ended STAT, QUIT."""
    assert server.wait_idle(), "the session did not end"
    commands = [c.split()[0].upper() for c in server.commands()]
    for verb in RETRIEVING:
        assert verb not in commands, f"{verb} sent: {server.transcript}"
    if quit:
        assert commands[-2:] == ["STAT", "QUIT"], commands
    assert server.remaining() == messages_before
    assert all(not r.committed for r in server.sessions)


# --------------------------------------------------------------------------
# a good configuration


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_good_configuration_against_dovecot(dovecot, mailbox, dovecot_config, confdir,
                                            run_popfetchd, mode):
    messages = mailgen.generate(4, 3000, seed=301)
    mailbox.deliver(*messages)
    config = dovecot_config(mailbox, server="localhost", tls=mode, tls_ca_file=dovecot.ca_file,
                            port=dovecot.pop3s_port if mode == "implicit" else dovecot.pop3_port)
    cd = confdir(config)

    res = run_test(run_popfetchd, cd, "dv")
    steps = steps_of(res)
    assert res.returncode == EX_OK
    assert results(steps) == {"config": "ok", "connect": "ok", "tls": "ok", "capa": "ok",
                              "token": "skipped", "auth": "ok", "stat": "ok",
                              "smime": "skipped", "save": "ok"}
    assert "127.0.0.1" in steps["connect"][1] and str(config["port"]) in steps["connect"][1]
    tls = steps["tls"][1]
    assert "TLSv1." in tls and "CN=localhost" in tls and "CN=popfetchd test CA" in tls
    assert cert_not_after(dovecot.cert_file) in tls, "the certificate's expiry is not shown"
    assert "verified" in tls
    assert ("STLS" in tls) == (mode == "explicit")
    assert "UIDL" in steps["capa"][1] and "SASL" in steps["capa"][1]
    assert "SCRAM-SHA-256" in steps["auth"][1] and mailbox.user in steps["auth"][1]
    size = sum(vsize(m) for m in messages)
    assert steps["stat"][1].startswith(f"4 messages, {size} octets"), steps["stat"]
    assert config["save_directory"] in steps["save"][1]

    # nothing retrieved, nothing deleted
    assert mailbox.messages() == messages
    assert wait_for(lambda: len(logouts(dovecot, mailbox.user)) == 1), \
        logouts(dovecot, mailbox.user)
    [logout] = logouts(dovecot, mailbox.user)
    assert "Logged out" in logout, logout
    assert "top=0/0, retr=0/0, del=0/4" in logout, logout
    assert os.listdir(config["save_directory"]) == [], "the probe file was left behind"


def test_good_configuration_json(dovecot, mailbox, dovecot_config, confdir, run_popfetchd):
    messages = mailgen.generate(2, 2000, seed=302)
    mailbox.deliver(*messages)
    config = dovecot_config(mailbox, tls="implicit", port=dovecot.pop3s_port,
                            tls_ca_file=dovecot.ca_file, sasl_mechanisms=["CRAM-MD5"])
    res = run_test(run_popfetchd, confdir(config), "dv", "--json")

    assert res.returncode == EX_OK
    assert res.stdout.count("\n") == 1, "not exactly one line of JSON"
    doc = res.json()
    assert doc["configuration"] == "dv" and doc["ok"] is True and doc["exit_code"] == 0
    steps = json_steps(res)
    assert [s["result"] for s in steps.values()] == \
        ["ok", "ok", "ok", "ok", "skipped", "ok", "ok", "skipped", "ok"]
    assert steps["connect"]["address"] == "127.0.0.1"
    assert steps["connect"]["port"] == dovecot.pop3s_port
    tls = steps["tls"]
    assert tls["protocol"].startswith("TLSv1.") and tls["cipher"]
    assert tls["subject"] == "CN=localhost" and tls["issuer"] == "CN=popfetchd test CA"
    assert tls["not_after"] == cert_not_after(dovecot.cert_file)
    assert tls["verified"] is True and tls["stls"] is False
    assert tls["sha256"].replace(":", "").lower() == fingerprint_of(dovecot.cert_file)
    assert "UIDL" in steps["capa"]["capabilities"]
    assert "CRAM-MD5" in steps["capa"]["sasl"]
    assert steps["auth"]["mechanism"] == "CRAM-MD5"
    assert steps["stat"]["count"] == 2
    assert steps["stat"]["size"] == sum(vsize(m) for m in messages)
    assert steps["save"]["path"] == config["save_directory"]
    assert mailbox.messages() == messages
    assert wait_for(lambda: "top=0/0, retr=0/0, del=0/2" in "".join(logouts(dovecot,
                                                                             mailbox.user)))


def test_fake_server_transcript(fake_pop3, fake_config, confdir, run_popfetchd):
    """Plain POP3: the exact commands, and a warning (not a failure) for tls: none."""
    server = fake_pop3(mailgen.generate(3, 2000, seed=303))
    before = server.remaining()
    res = run_test(run_popfetchd, confdir(fake_config(server)), "fake")

    steps = steps_of(res)
    assert res.returncode == EX_OK
    assert steps["tls"][0] == "warning" and "tls: none" in steps["tls"][1]
    assert steps["auth"][0] == "warning" and "USER" in steps["auth"][1]
    assert steps["stat"][1].startswith(f"3 messages, {sum(len(m) for m in before)} octets")
    assert_fake_untouched(server, before)
    assert [c.split()[0].upper() for c in server.commands()] == \
        ["CAPA", "USER", "PASS", "STAT", "QUIT"]
    assert server.sessions[0].quit_ok, "QUIT was not answered (or not sent)"
    assert len(server.sessions) == 1


def test_explicit_stls_against_fake(dovecot, fake_pop3, fake_config, confdir, run_popfetchd):
    server = fake_pop3(mailgen.generate(2, 2000, seed=304), stls_context=server_context(dovecot))
    before = server.remaining()
    config = fake_config(server, tls="explicit", tls_ca_file=dovecot.ca_file)
    res = run_test(run_popfetchd, confdir(config), "fake", "--json")

    assert res.returncode == EX_OK
    steps = json_steps(res)
    assert steps["tls"]["result"] == "ok" and steps["tls"]["stls"] is True
    assert "STLS" in steps["tls"]["detail"]
    assert "STLS" not in steps["capa"]["capabilities"], "the CAPA shown is not the one inside TLS"
    assert_fake_untouched(server, before)
    assert [c.split()[0].upper() for c in server.commands()] == \
        ["CAPA", "STLS", "CAPA", "USER", "PASS", "STAT", "QUIT"]
    assert server.sessions[0].tls_since == 2


def test_no_save_directory_and_tls_verify_false(dovecot, fake_pop3, fake_config, confdir,
                                                 run_popfetchd):
    """Warnings and not-applicable steps do not fail the test."""
    server = fake_pop3(mailgen.generate(1, 2000, seed=305),
                       tls_context=server_context(dovecot, "expired"))
    config = fake_config(server, tls="implicit", tls_verify=False, save_directory=None,
                         save_text=False, save_attachments=False)
    res = run_test(run_popfetchd, confdir(config), "fake")

    steps = steps_of(res)
    assert res.returncode == EX_OK
    assert steps["tls"][0] == "warning"
    assert "tls_verify" in steps["tls"][1] and "expired" in steps["tls"][1]
    assert steps["save"][0] == "skipped" and "save_directory" in steps["save"][1]


# --------------------------------------------------------------------------
# the server cannot be reached


@pytest.mark.parametrize("mode", ["implicit", "none"])
def test_refused_port(mailbox, dovecot_config, confdir, run_popfetchd, mode):
    config = dovecot_config(mailbox, port=closed_port(), tls=mode)
    res = run_test(run_popfetchd, confdir(config), "dv")

    steps = steps_of(res)
    assert res.returncode == EX_UNAVAILABLE
    assert steps["connect"][0] == "FAILED"
    assert "refused" in steps["connect"][1].lower(), steps["connect"]
    assert_network_skipped_after(steps, "connect")
    assert steps["smime"][0] == "skipped"


def test_name_that_does_not_resolve(mailbox, dovecot_config, confdir, run_popfetchd):
    config = dovecot_config(mailbox, server="no-such-host.invalid",
                            timeouts={"connect": "3s", "command": "3s"})
    res = run_test(run_popfetchd, confdir(config), "dv", "--json")

    assert res.returncode == EX_UNAVAILABLE
    steps = json_steps(res)
    assert steps["connect"]["result"] == "FAILED" and steps["connect"]["exit_code"] == 69
    assert all(steps[n]["result"] == "skipped" for n in NETWORK[1:])
    assert steps["save"]["result"] == "ok"


# --------------------------------------------------------------------------
# certificates


def test_untrusted_certificate(dovecot, mailbox, dovecot_config, confdir, run_popfetchd):
    """Without tls_ca_file the system store is used: it does not know the test CA."""
    mailbox.deliver(*mailgen.generate(1, 2000, seed=306))
    config = dovecot_config(mailbox, tls="implicit", port=dovecot.pop3s_port)
    cd = confdir(config)
    res = run_test(run_popfetchd, cd, "dv")

    steps = steps_of(res)
    assert res.returncode == EX_PROTOCOL
    assert steps["connect"][0] == "ok"
    result, detail = steps["tls"]
    assert result == "FAILED"
    assert "CN=localhost" in detail and "popfetchd test CA" in detail, "what was presented"
    assert "local issuer" in detail, "why it was refused"
    assert fingerprint_of(dovecot.cert_file) in detail.lower().replace(":", "")
    assert_network_skipped_after(steps, "tls")
    assert [l for l in dovecot.log_text().splitlines()
            if f"Login: user=<{mailbox.user}>" in l] == []

    doc = json_steps(run_test(run_popfetchd, cd, "dv", "--json"))
    tls = doc["tls"]
    assert tls["verified"] is False and tls["subject"] == "CN=localhost"
    assert tls["issuer"] == "CN=popfetchd test CA" and tls["exit_code"] == EX_PROTOCOL
    assert tls["not_after"] == cert_not_after(dovecot.cert_file)


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_wrong_host_name(dovecot, fake_pop3, fake_config, confdir, run_popfetchd, mode):
    ctx = server_context(dovecot, "wronghost")
    server = fake_pop3(mailgen.generate(1, 2000, seed=307),
                       **{"tls_context" if mode == "implicit" else "stls_context": ctx})
    config = fake_config(server, tls=mode, tls_ca_file=dovecot.ca_file)
    res = run_test(run_popfetchd, confdir(config), "fake", "--json")

    assert res.returncode == EX_PROTOCOL
    steps = json_steps(res)
    tls = steps["tls"]
    assert tls["result"] == "FAILED"
    assert tls["subject"] == "CN=wrong.example" and tls["verified"] is False
    assert "not for 127.0.0.1" in tls["detail"] and "wrong.example" in tls["detail"]
    assert tls["stls"] is (mode == "explicit")
    assert all(steps[n]["result"] == "skipped" for n in ("capa", "token", "auth", "stat"))
    assert server.wait_idle()
    assert not any(server.sent(v) for v in ("USER", "PASS", "AUTH", "APOP", "STAT"))


# --------------------------------------------------------------------------
# logging in


def test_wrong_password(dovecot, mailbox, dovecot_config, confdir, run_popfetchd,
                        secret_registry):
    wrong = "Wrong-pass-for-the-test-6621"
    secret_registry.add(wrong, mailbox.password)
    mailbox.deliver(*mailgen.generate(1, 2000, seed=308))
    config = dovecot_config(mailbox, tls="implicit", port=dovecot.pop3s_port,
                            tls_ca_file=dovecot.ca_file, password=wrong)
    res = run_test(run_popfetchd, confdir(config), "dv", "-v")

    steps = steps_of(res)
    assert res.returncode == EX_NOPERM
    assert results(steps)["tls"] == "ok" and results(steps)["capa"] == "ok"
    assert steps["auth"][0] == "FAILED"
    assert "Authentication failed" in steps["auth"][1], "the server's refusal is not shown"
    assert_network_skipped_after(steps, "auth")
    assert mailbox.count() == 1


def test_server_in_use_is_temporary(fake_pop3, fake_config, confdir, run_popfetchd):
    server = fake_pop3(mailgen.generate(1, 2000, seed=309))
    server.inject("PASS", Reply(b"-ERR [IN-USE] Mailbox is locked by another session\r\n"))
    res = run_test(run_popfetchd, confdir(fake_config(server)), "fake")

    steps = steps_of(res)
    assert res.returncode == EX_TEMPFAIL
    assert steps["auth"][0] == "FAILED" and "locked" in steps["auth"][1]
    assert steps["stat"][0] == "skipped"


@pytest.mark.parametrize("answer, code", [
    (b"-ERR [SYS/TEMP] try again later\r\n", EX_TEMPFAIL),
    (b"+OK what is a maildrop\r\n", EX_PROTOCOL),
], ids=["refused", "malformed"])
def test_stat_failure(fake_pop3, fake_config, confdir, run_popfetchd, answer, code):
    server = fake_pop3(mailgen.generate(1, 2000, seed=310))
    before = server.remaining()
    server.inject("STAT", Reply(answer))
    res = run_test(run_popfetchd, confdir(fake_config(server)), "fake")

    steps = steps_of(res)
    assert res.returncode == code
    assert passed(steps, "auth") and steps["stat"][0] == "FAILED"
    assert "STAT" in steps["stat"][1]
    assert_fake_untouched(server, before, quit=False)


# --------------------------------------------------------------------------
# OAuth2


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_oauth2_good(oauth_dovecot, oauth_mailbox, oauth_config, tokenserver, confdir,
                     run_popfetchd, token_cache_path, tmp_path, mechanism):
    messages = mailgen.generate(2, 2000, seed=311)
    oauth_mailbox.deliver(*messages)
    config = oauth_config(oauth_mailbox, mechanism=mechanism)
    cd = confdir(config)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()

    res = run_test(run_popfetchd, cd, "oa", "--json", env={"TMPDIR": str(tmpdir)})
    assert res.returncode == EX_OK
    steps = json_steps(res)
    token = steps["token"]
    assert token["result"] == "ok"
    assert token["token_endpoint"] == tokenserver.token_url
    expires = datetime.datetime.strptime(token["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert expires.replace(tzinfo=datetime.timezone.utc) > datetime.datetime.now(
        datetime.timezone.utc)
    assert token["expires_in"] > 60 and token["expires_at"] in token["detail"]
    assert steps["auth"]["mechanism"] == mechanism
    assert steps["stat"]["count"] == 2
    assert tokenserver.token_count == 1, "the token endpoint was not asked exactly once"
    assert oauth_mailbox.messages() == messages
    # the test's token lived in a temporary cache of its own, now gone
    assert not token_cache_path(cd, "oa").exists(), "the daemon's token cache was touched"
    assert list(tmpdir.iterdir()) == [], "the temporary token cache was left behind"

    # a second test asks the endpoint again: it tests the endpoint, not a cache
    assert run_test(run_popfetchd, cd, "oa").returncode == EX_OK
    assert tokenserver.token_count == 2


def test_oauth2_refused(oauth_dovecot, oauth_mailbox, oauth_config, tokenserver, confdir,
                        run_popfetchd):
    oauth_mailbox.deliver(*mailgen.generate(1, 2000, seed=312))
    config = oauth_config(oauth_mailbox)
    description = "AADSTS7000215: Invalid client secret provided."
    tokenserver.refuse("invalid_client", description)
    res = run_test(run_popfetchd, confdir(config), "oa")

    steps = steps_of(res)
    assert res.returncode == EX_NOPERM
    assert [steps[n][0] for n in ("connect", "tls", "capa")] == ["ok", "ok", "ok"]
    assert steps["token"][0] == "FAILED"
    assert description in steps["token"][1] and "invalid_client" in steps["token"][1]
    assert_network_skipped_after(steps, "token")
    assert tokenserver.issued == [] and tokenserver.presented == []
    assert oauth_mailbox.count() == 1


def test_oauth2_endpoint_down_is_temporary(oauth_dovecot, oauth_mailbox, oauth_config,
                                           tokenserver, confdir, run_popfetchd):
    config = oauth_config(oauth_mailbox)
    tokenserver.fail(500)
    res = run_test(run_popfetchd, confdir(config), "oa")

    steps = steps_of(res)
    assert res.returncode == EX_TEMPFAIL
    assert steps["token"][0] == "FAILED" and "500" in steps["token"][1]


# --------------------------------------------------------------------------
# S/MIME


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


def with_key(confdir, config, pki):
    cd = confdir(config)
    keys = cd.path / "keys"
    keys.mkdir()
    (keys / "alice.p12").write_bytes((pki.dir / "alice.p12").read_bytes())
    (keys / "alice.p12").chmod(0o600)
    return cd


@pytest.mark.parametrize("case", ["good", "wrong-password", "missing-file"])
def test_smime_key(fake_pop3, fake_config, confdir, run_popfetchd, secret_registry, pki, case):
    wrong = "not-the-p12-password-9931"
    secret_registry.add(P12_PASSWORD, wrong)
    smime = {"good": {"key_name": "alice", "key_password": P12_PASSWORD},
             "wrong-password": {"key_name": "alice", "key_password": wrong},
             "missing-file": {"key_name": "carol", "key_password": P12_PASSWORD}}[case]
    server = fake_pop3(mailgen.generate(1, 2000, seed=313))
    config = fake_config(server, smime=smime)
    cd = with_key(confdir, config, pki)

    res = run_test(run_popfetchd, cd, "fake")
    steps = steps_of(res)
    assert passed(steps, "connect", "capa", "auth", "stat", "save")
    result, detail = steps["smime"]
    if case == "good":
        assert res.returncode == EX_OK and result == "ok"
        assert "CN=alice" in detail and "alice.p12" in detail
    else:
        assert res.returncode == EX_CONFIG and result == "FAILED"
        if case == "wrong-password":
            assert "alice.p12" in detail and "wrong password" in detail
        else:
            assert "carol.p12" in detail and "no such file" in detail

    doc = json_steps(run_test(run_popfetchd, cd, "fake", "--json"))["smime"]
    assert doc["path"] == str(cd.path / "keys" / f"{smime['key_name']}.p12")
    if case == "good":
        assert "CN=alice" in doc["subject"]
        assert datetime.datetime.strptime(doc["not_after"], "%Y-%m-%dT%H:%M:%SZ")
    else:
        assert doc["exit_code"] == EX_CONFIG


# --------------------------------------------------------------------------
# the save directory (the tests run as root: permission bits stop nobody)


@pytest.mark.parametrize("case", ["under-a-file", "is-a-file", "tmp-is-a-file"])
def test_save_directory_not_writable(fake_pop3, fake_config, confdir, run_popfetchd, tmp_path,
                                     case):
    server = fake_pop3(mailgen.generate(1, 2000, seed=314))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    if case == "under-a-file":
        save = blocker / "save"
    elif case == "is-a-file":
        save = blocker
    else:
        save = tmp_path / "save-ok"
        save.mkdir()
        (save / ".tmp").write_text("not a directory\n")
    config = fake_config(server, save_directory=str(save))
    res = run_test(run_popfetchd, confdir(config), "fake")

    steps = steps_of(res)
    assert res.returncode == EX_IOERR
    assert steps["save"][0] == "FAILED" and "not a directory" in steps["save"][1]
    assert str(save) in steps["save"][1]
    assert passed(steps, "connect", "auth", "stat")
    assert blocker.read_text() == "not a directory\n"


def test_save_directory_staging_is_a_symlink(fake_pop3, fake_config, confdir, run_popfetchd,
                                             tmp_path):
    """save_directory/.tmp made a symlink (by whoever can write there): the
    test says so and writes nothing where it points."""
    server = fake_pop3(mailgen.generate(1, 2000, seed=316))
    victim = tmp_path / "victim"
    victim.mkdir()
    save = tmp_path / "save"
    save.mkdir()
    (save / ".tmp").symlink_to(victim)
    res = run_test(run_popfetchd, confdir(fake_config(server, save_directory=str(save))), "fake")

    steps = steps_of(res)
    assert res.returncode == EX_IOERR
    assert steps["save"][0] == "FAILED"
    assert f"{save}/.tmp is a symbolic link" in steps["save"][1]
    assert list(victim.iterdir()) == []


def test_save_directory_created_later(fake_pop3, fake_config, confdir, run_popfetchd, tmp_path):
    """A save_directory that does not exist yet is created by the first
    receive: the test checks its parent, and creates nothing."""
    server = fake_pop3(mailgen.generate(1, 2000, seed=315))
    save = tmp_path / "not-yet" / "save"
    res = run_test(run_popfetchd, confdir(fake_config(server, save_directory=str(save))), "fake")

    steps = steps_of(res)
    assert res.returncode == EX_OK and steps["save"][0] == "ok"
    assert "does not exist yet" in steps["save"][1]
    assert not save.parent.exists()
    assert list(tmp_path.glob(".popfetchd-test-*")) == []


# --------------------------------------------------------------------------
# configurations that cannot be tested


@pytest.mark.parametrize("case", ["unknown", "inactive", "invalid"])
def test_configuration_errors(fake_pop3, fake_config, confdir, run_popfetchd, case):
    server = fake_pop3(mailgen.generate(1, 2000, seed=316))
    config = fake_config(server, status="inactive" if case == "inactive" else "active")
    cd = confdir(config)
    if case == "invalid":
        cd.write_raw("broken.yaml", "id: broken\nserver: [unclosed\n")
    config_id = "nope" if case == "unknown" else "fake"

    res = run_test(run_popfetchd, cd, config_id)
    steps = steps_of(res)
    assert res.returncode == EX_CONFIG
    assert steps["config"][0] == "FAILED"
    assert {"unknown": "no configuration", "inactive": "inactive",
            "invalid": "configuration error"}[case] in steps["config"][1]
    assert all(steps[n][0] == "skipped" for n in STEPS[1:])

    js = run_test(run_popfetchd, cd, config_id, "--json")
    assert js.returncode == EX_CONFIG
    doc = js.json()
    assert doc["configuration"] == config_id and doc["ok"] is False
    steps = json_steps(js)
    assert steps["config"]["exit_code"] == EX_CONFIG
    if case == "invalid":
        assert any("broken.yaml" in e for e in steps["config"]["errors"])
    time.sleep(0.2)
    assert server.sessions == [], "a configuration that cannot be used was connected to"


def test_usage(run_popfetchd, confdir):
    res = run_popfetchd(["test"], confdir=confdir())
    assert res.returncode == 64 and res.stdout == ""


def test_unloadable_ca_file(fake_pop3, fake_config, confdir, run_popfetchd, tmp_path):
    """tls_ca_file that holds no certificate: a configuration error (78); the
    network is not tried, the local steps still run."""
    server = fake_pop3(mailgen.generate(1, 2000, seed=317))
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("garbage\n")
    config = fake_config(server, tls="implicit", tls_ca_file=str(bad))
    res = run_test(run_popfetchd, confdir(config), "fake")

    steps = steps_of(res)
    assert res.returncode == EX_CONFIG
    assert steps["config"][0] == "FAILED" and "tls_ca_file" in steps["config"][1]
    assert all(steps[n][0] == "skipped" for n in NETWORK)
    assert steps["save"][0] == "ok"
    time.sleep(0.2)
    assert server.sessions == []
