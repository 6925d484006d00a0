"""Checks of the OAuth2 test infrastructure itself: tools/tokenserver.py, the
OAuth2 Dovecot (oauth2 passdb asking the token server), the oauth_config
factory and the secret registry. They need no popfetchd binary.

What Dovecot 2.3 does (checked here, relied upon by test_oauth2.py):
  - `AUTH XOAUTH2` alone is answered "+ " (empty continuation); an initial
    response on the AUTH line works too; so does OAUTHBEARER.
  - it asks the introspection endpoint with POST, form-encoded token=TOKEN,
    once per login attempt (auth_cache_size = 0);
  - a token it does not accept (inactive, or for another user) is answered
    with a challenge: XOAUTH2 "+ " base64({"status":"401","schemes":"bearer",
    "scope":"mail"}), OAUTHBEARER "+ " base64({"status":"invalid_token"});
    the client answers it with an empty line (XOAUTH2) or "AQ==" (base64 of
    \\x01, OAUTHBEARER), and only then, after auth_failure_delay (2 s), comes
    "-ERR [AUTH] Authentication failed.".
"""

import base64
import json
import os
import poplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error

import pytest

import tokenserver as ts_tool
from conftest import ROOT, SecretRegistry, to_yaml

TIMEOUT = 15
XOAUTH2_CHALLENGE = {"status": "401", "schemes": "bearer", "scope": "mail"}
OAUTHBEARER_CHALLENGE = {"status": "invalid_token"}


# --------------------------------------------------------------------------
# helpers


def get_token(ts, client, scope="s", **extra):
    fields = {"grant_type": "client_credentials", "client_id": client.client_id,
              "client_secret": client.client_secret, "scope": scope, **extra}
    return ts_tool.post_form(ts.token_url, {k: v for k, v in fields.items() if v is not None},
                             ca_file=ts.ca_file)


def refresh(ts, client, refresh_token, secret=True):
    fields = {"grant_type": "refresh_token", "client_id": client.client_id,
              "refresh_token": refresh_token}
    if secret and client.client_secret:
        fields["client_secret"] = client.client_secret
    return ts_tool.post_form(ts.token_url, fields, ca_file=ts.ca_file)


def introspect(ts, token, how="post"):
    if how == "post":
        return ts_tool.post_form(ts.introspect_url, {"token": token}, ca_file=ts.ca_file)[1]
    ctx = ssl.create_default_context(cafile=ts.ca_file)
    import urllib.request
    if how == "get":
        req = urllib.request.Request(ts.introspect_url + "?token=" + token)
    else:
        req = urllib.request.Request(ts.introspect_url, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, context=ctx, timeout=TIMEOUT) as resp:
        return json.loads(resp.read())


def xoauth2(user, token):
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def oauthbearer(user, token):
    return base64.b64encode(f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()).decode()


class Session:
    """A raw POP3S connection to a Dovecot: send a line, read one line."""

    def __init__(self, dovecot):
        ctx = ssl.create_default_context(cafile=dovecot.ca_file)
        raw = socket.create_connection((dovecot.host, dovecot.pop3s_port), timeout=TIMEOUT)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")
        self.greeting = self.readline()

    def readline(self):
        return self.file.readline().decode()

    def send(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.readline()

    def close(self):
        try:
            self.send("QUIT")
        except OSError:
            pass
        self.sock.close()


def login(dovecot, mechanism, user, token, initial_response=False):
    """One login attempt as the contract says (continuation form unless
    initial_response); returns (transcript [(sent, received)], logged in)."""
    payload = (xoauth2 if mechanism == "XOAUTH2" else oauthbearer)(user, token)
    s = Session(dovecot)
    steps = []
    try:
        if initial_response:
            reply = s.send(f"AUTH {mechanism} {payload}")
            steps.append((f"AUTH {mechanism} {payload}", reply))
        else:
            reply = s.send(f"AUTH {mechanism}")
            steps.append((f"AUTH {mechanism}", reply))
            assert reply == "+ \r\n", f"no empty continuation: {reply!r}"
            reply = s.send(payload)
            steps.append((payload, reply))
        if reply.startswith("+ "):       # the failure challenge: answer it
            answer = "" if mechanism == "XOAUTH2" else "AQ=="
            reply = s.send(answer)
            steps.append((answer, reply))
        ok = reply.startswith("+OK")
        if ok:
            stat = s.send("STAT")
            steps.append(("STAT", stat))
        return steps, ok
    finally:
        s.close()


def challenge_of(line):
    assert line.startswith("+ ") and line.endswith("\r\n"), line
    return json.loads(base64.b64decode(line[2:].strip()))


def wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --------------------------------------------------------------------------
# the token endpoint


def test_client_credentials_and_introspection(tokenserver):
    ts = tokenserver
    client = ts.add_client(username="alice")
    status, answer = get_token(ts, client, scope="https://outlook.office365.com/.default")
    assert status == 200, answer
    token = answer["access_token"]
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 3600
    assert token.startswith("pfdat_") and "refresh_token" not in answer
    assert ts.issued == [token]
    req = ts.token_requests[-1]
    assert (req["grant_type"], req["client_id"], req["client_auth"], req["scope"]) == \
        ("client_credentials", client.client_id, "post", "https://outlook.office365.com/.default")
    assert req["content_type"] == "application/x-www-form-urlencoded"

    for how in ("post", "get", "bearer"):
        info = introspect(ts, token, how)
        assert info["active"] is True and info["username"] == "alice", (how, info)
        assert info["exp"] > time.time() + 3500
    assert introspect(ts, "pfdat_nonsense") == {"active": False}
    assert [p["how"] for p in ts.presented] == ["post", "get", "bearer", "post"]
    assert ts.presented_tokens() == [token] * 3 + ["pfdat_nonsense"]
    assert ts.stats() == {"connections": 1, "token": 1, "grant:client_credentials": 1,
                          "token_ok": 1, "introspect": 4, "introspect_active": 3,
                          "introspect_inactive": 1}
    assert client.client_secret in ts.secrets() and token in ts.secrets()


def test_client_secret_basic(tokenserver):
    ts = tokenserver
    client = ts.add_client(client_secret="s3cr:et/with+chars", username="bob")
    basic = base64.b64encode(f"{client.client_id}:s3cr%3Aet%2Fwith%2Bchars".encode()).decode()
    status, answer = ts_tool.post_form(ts.token_url, {"grant_type": "client_credentials",
                                                      "scope": "s"},
                                       ca_file=ts.ca_file,
                                       headers={"Authorization": "Basic " + basic})
    assert status == 200, answer
    assert ts.token_requests[-1]["client_auth"] == "basic"


@pytest.mark.parametrize("case, error, status", [
    ("wrong secret", "invalid_client", 401),
    ("unknown client", "invalid_client", 401),
    ("public client", "invalid_client", 401),
    ("no scope", "invalid_scope", 400),
    ("bad grant", "unsupported_grant_type", 400),
])
def test_token_endpoint_errors(tokenserver, case, error, status):
    ts = tokenserver
    client = ts.add_client(username="u")
    public = ts.add_client(client_secret=None, username="u")
    if case == "wrong secret":
        got = get_token(ts, client, client_secret="wrong-secret-value")
    elif case == "unknown client":
        got = get_token(ts, ts_tool.Client("nobody-knows-me", "x", "u"))
    elif case == "public client":
        got = get_token(ts, public)
    elif case == "no scope":
        got = get_token(ts, client, scope=None)
    else:
        got = get_token(ts, client, grant_type="password")
    assert got[0] == status and got[1]["error"] == error, got
    assert got[1]["error_description"]
    assert ts.issued == []
    assert ts.stats()["token_error"] == 1


@pytest.mark.parametrize("public", [False, True])
def test_refresh_grant_with_and_without_rotation(tokenserver, public):
    ts = tokenserver
    client = ts.add_client(client_secret=None if public else "", username="carol")
    rt0 = ts.add_refresh_token(client)
    status, answer = refresh(ts, client, rt0)
    assert status == 200 and "refresh_token" not in answer, answer
    assert introspect(ts, answer["access_token"])["username"] == "carol"
    # without rotation the refresh token stays valid
    assert refresh(ts, client, rt0)[0] == 200

    ts.rotate_refresh_tokens(True)
    status, answer = refresh(ts, client, rt0)
    rt1 = answer["refresh_token"]
    assert status == 200 and rt1 != rt0 and ts.issued_refresh == [rt1]
    status, answer = refresh(ts, client, rt0)        # used up
    assert (status, answer["error"]) == (400, "invalid_grant"), answer
    assert "refresh token is invalid" in answer["error_description"]
    status, answer = refresh(ts, client, rt1)
    assert status == 200 and answer["refresh_token"] not in (rt0, rt1)
    assert [r["refresh_token"] for r in ts.token_requests] == [rt0, rt0, rt0, rt0, rt1]
    assert {rt0, rt1, answer["refresh_token"]} <= set(ts.secrets())
    if not public:
        assert refresh(ts, client, answer["refresh_token"], secret=False)[1]["error"] == \
            "invalid_client"


def test_expiry_controls(tokenserver):
    ts = tokenserver
    client = ts.add_client(username="dave")
    t1 = get_token(ts, client)[1]["access_token"]
    ts.expire_all()
    assert introspect(ts, t1) == {"active": False} and not ts.valid(t1)
    t2 = get_token(ts, client)[1]["access_token"]
    assert introspect(ts, t2)["active"] is True
    ts.set_expires_in(1)
    status, answer = get_token(ts, client)
    assert answer["expires_in"] == 1
    t3 = answer["access_token"]
    assert ts.valid(t3)
    time.sleep(1.2)
    assert not ts.valid(t3) and introspect(ts, t3) == {"active": False}
    ts.reject_tokens(True)
    assert introspect(ts, t2) == {"active": False}
    ts.reject_tokens(False)
    assert introspect(ts, t2)["active"] is True
    ts.set_token_bytes(1100)
    long_token = get_token(ts, client)[1]["access_token"]
    assert len(long_token) > 1400


def test_faults_and_times(tokenserver):
    ts = tokenserver
    client = ts.add_client(username="erin")
    ts.fail(500, times=1)
    status, answer = get_token(ts, client)
    assert status == 500 and answer == {"error": "server_error"}
    assert get_token(ts, client)[0] == 200, "times=1: the next request is normal"
    ts.fail(503, body="<html>maintenance</html>")
    assert get_token(ts, client) == (503, "<html>maintenance</html>")
    ts.refuse("invalid_client", "AADSTS7000222: The provided client secret keys are expired.")
    status, answer = get_token(ts, client)
    assert status == 401 and answer["error_description"].startswith("AADSTS7000222")
    ts.refuse("invalid_grant", "revoked")
    assert get_token(ts, client)[0] == 400
    ts.drop()
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        get_token(ts, client)
    ts.normal()
    assert get_token(ts, client)[0] == 200
    # introspection is never faulted
    ts.fail(500)
    assert introspect(ts, ts.issued[0])["active"] is True


@pytest.mark.parametrize("phase", ["request", "handshake"])
def test_stall_holds_the_client_until_released(tokenserver, phase):
    ts = tokenserver
    client = ts.add_client(username="frank")
    ts.stall(60, phase=phase)
    start = time.monotonic()
    with pytest.raises((urllib.error.URLError, socket.timeout, TimeoutError, OSError)):
        ts_tool.post_form(ts.token_url, {"grant_type": "client_credentials",
                                         "client_id": client.client_id,
                                         "client_secret": client.client_secret, "scope": "s"},
                          ca_file=ts.ca_file, timeout=1.5)
    assert 1.4 < time.monotonic() - start < 5
    assert ts.stats()["token_stalled"] == 1
    # a stalled request is released (closed unanswered) by normal()/reset()
    result = {}

    def stalled_call():
        try:
            result["answer"] = get_token(ts, client)
        except Exception as e:  # noqa: BLE001 - what happened is the result
            result["error"] = e
    t = threading.Thread(target=stalled_call)
    t.start()
    assert wait_for(lambda: ts.stats()["token_stalled"] == 2)
    released = time.monotonic()
    ts.normal()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - released < 3
    assert "error" in result, result
    assert get_token(ts, client)[0] == 200


def test_down_and_up(tokenserver):
    ts = tokenserver
    client = ts.add_client(username="gina")
    port = ts.port
    ts.down()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ts.host, port), timeout=2).close()
    # the introspection listener stays up (Dovecot needs it)
    assert introspect(ts, "x") == {"active": False}
    ts.up()
    assert ts.port == port and get_token(ts, client)[0] == 200
    ts.down(seconds=0.5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ts.host, port), timeout=2).close()
    assert wait_for(lambda: ts.running("token"), 5)
    assert get_token(ts, client)[0] == 200
    ts.down()
    ts.reset()            # reset brings it back too
    assert ts.running("token")


def test_control_and_stats_over_http(tokenserver):
    ts = tokenserver
    status, answer = ts_tool.post_json(ts.control_url, {"action": "add_client",
                                                        "client_id": "web", "client_secret": "websecret1",
                                                        "username": "hank"}, ts.ca_file)
    assert status == 200 and answer["result"]["client_id"] == "web"
    client = ts.clients["web"]
    assert ts_tool.post_json(ts.control_url, {"action": "fail", "status": 502}, ts.ca_file)[0] == 200
    assert get_token(ts, client)[0] == 502
    assert ts_tool.post_json(ts.control_url, {"action": "normal"}, ts.ca_file)[0] == 200
    assert get_token(ts, client)[0] == 200
    assert ts_tool.post_json(ts.control_url, {"action": "rm -rf"}, ts.ca_file)[0] == 400
    status, answer = ts_tool.post_json(ts.control_url, {"action": "stats"}, ts.ca_file)
    assert answer["result"]["token"] == 2
    ctx = ssl.create_default_context(cafile=ts.ca_file)
    import urllib.request
    with urllib.request.urlopen(ts.stats_url + "?full=1", context=ctx, timeout=TIMEOUT) as resp:
        full = json.loads(resp.read())
    assert full["counts"]["token"] == 2 and len(full["issued"]) == 1
    # over HTTP, down comes back by itself
    assert ts_tool.post_json(ts.control_url, {"action": "down", "seconds": 0.3}, ts.ca_file)[0] == 200
    assert not ts.running("token")
    assert wait_for(lambda: ts.running("token"))


def test_command_line_serve_and_ctl(_oauth_dir):
    tls = os.path.join(_oauth_dir, "tls")
    tool = str(ROOT / "tests" / "tools" / "tokenserver.py")
    proc = subprocess.Popen([sys.executable, tool, "serve", "--tls-dir", tls, "--quiet",
                             "--client", "cli:clisecret1:ivy"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["clients"][0]["client_id"] == "cli"
        fields = {"grant_type": "client_credentials", "client_id": "cli",
                  "client_secret": "clisecret1", "scope": "s"}
        status, answer = ts_tool.post_form(info["token_url"], fields, ca_file=info["ca_file"])
        assert status == 200 and answer["access_token"].startswith("pfdat_")
        url = f"https://127.0.0.1:{info['introspect_port']}"
        ctl = subprocess.run([sys.executable, tool, "ctl", url, "fail", "status=500",
                              "--ca", info["ca_file"]], capture_output=True, text=True, timeout=20)
        assert ctl.returncode == 0, ctl.stderr
        assert ts_tool.post_form(info["token_url"], fields, ca_file=info["ca_file"])[0] == 500
        ctl = subprocess.run([sys.executable, tool, "ctl", url, "stats", "--ca", info["ca_file"]],
                             capture_output=True, text=True, timeout=20)
        assert json.loads(ctl.stdout)["result"]["token"] == 2
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0


# --------------------------------------------------------------------------
# the OAuth2 Dovecot


def test_oauth_dovecot_configuration(oauth_dovecot, tokenserver_session):
    conf = open(oauth_dovecot.oauth2_conf_path).read()
    for line in ("introspection_mode = post",
                 f"introspection_url = {tokenserver_session.introspect_url}",
                 "username_attribute = username", "active_attribute = active",
                 "active_value = true", f"tls_ca_cert_file = {oauth_dovecot.ca_file}"):
        assert line + "\n" in conf
    res = subprocess.run(["doveconf", "-c", oauth_dovecot.conf_path, "-n"],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr
    assert "driver = oauth2" in res.stdout and "driver = passwd-file" in res.stdout
    assert "xoauth2 oauthbearer" in res.stdout


def test_oauth_dovecot_offers_both_kinds_of_login(oauth_dovecot, oauth_mailbox):
    ctx = ssl.create_default_context(cafile=oauth_dovecot.ca_file)
    client = poplib.POP3_SSL(oauth_dovecot.host, oauth_dovecot.pop3s_port, context=ctx,
                             timeout=TIMEOUT)
    try:
        sasl = client.capa()["SASL"]
        for mech in ("PLAIN", "SCRAM-SHA-256", "XOAUTH2", "OAUTHBEARER"):
            assert mech in sasl, sasl
        client.user(oauth_mailbox.user)
        client.pass_(oauth_mailbox.password)       # the passwd-file passdb still works
        assert client.stat() == (0, 0)
    finally:
        client.quit()


@pytest.mark.parametrize("initial_response", [False, True])
@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_oauth_dovecot_accepts_a_valid_token(oauth_dovecot, oauth_mailbox, tokenserver,
                                             mechanism, initial_response):
    client = tokenserver.add_client(username=oauth_mailbox.user)
    token = get_token(tokenserver, client)[1]["access_token"]
    oauth_mailbox.deliver(b"Subject: x\n\nbody\n")
    steps, ok = login(oauth_dovecot, mechanism, oauth_mailbox.user, token, initial_response)
    assert ok, steps
    assert steps[-1][1].startswith("+OK 1 ")
    assert tokenserver.presented_tokens() == [token]
    assert tokenserver.presented[0]["how"] == "post"
    assert wait_for(lambda: oauth_dovecot.login_methods(oauth_mailbox.user) == [mechanism])


@pytest.mark.parametrize("mechanism, challenge", [("XOAUTH2", XOAUTH2_CHALLENGE),
                                                  ("OAUTHBEARER", OAUTHBEARER_CHALLENGE)])
@pytest.mark.parametrize("case", ["unknown", "expired", "rejected", "other user"])
def test_oauth_dovecot_refuses_a_bad_token(oauth_dovecot, oauth_mailbox, tokenserver,
                                           mechanism, challenge, case):
    client = tokenserver.add_client(username="someone-else" if case == "other user"
                                    else oauth_mailbox.user)
    token = get_token(tokenserver, client)[1]["access_token"]
    if case == "unknown":
        token = "pfdat_" + "A" * 43
    elif case == "expired":
        tokenserver.expire_all()
    elif case == "rejected":
        tokenserver.reject_tokens(True)
    start = time.monotonic()
    steps, ok = login(oauth_dovecot, mechanism, oauth_mailbox.user, token)
    assert not ok
    # AUTH -> "+ ", payload -> challenge, answer ("" or AQ==) -> -ERR [AUTH]
    assert [s for s, _ in steps][2] == ("" if mechanism == "XOAUTH2" else "AQ==")
    assert challenge_of(steps[1][1]) == challenge
    assert steps[2][1] == "-ERR [AUTH] Authentication failed.\r\n"
    # Dovecot holds failures until delay_until (whole seconds of its ioloop
    # clock) and checks them every 500 ms: 2 s is seen as 1 to 2.5 s
    assert time.monotonic() - start > 0.9, "Dovecot delays a failure by auth_failure_delay (2 s)"
    assert tokenserver.presented_tokens() == [token]


def test_contract_flow_with_a_reference_client(oauth_dovecot, oauth_mailbox, tokenserver):
    """What test_oauth2.py expects of popfetchd, done in Python against the
    same fixtures: cached token rejected -> one new token -> one retry."""
    ts = tokenserver
    client = ts.add_client(username=oauth_mailbox.user)

    def run(cached):
        token = cached or get_token(ts, client)[1]["access_token"]
        _, ok = login(oauth_dovecot, "XOAUTH2", oauth_mailbox.user, token)
        if not ok:
            token = get_token(ts, client)[1]["access_token"]
            _, ok = login(oauth_dovecot, "XOAUTH2", oauth_mailbox.user, token)
        return token, ok

    cached, ok = run(None)
    assert ok and ts.token_count == 1
    cached, ok = run(cached)
    assert ok and ts.token_count == 1, "a cached token is reused"
    ts.expire_all()
    cached, ok = run(cached)
    assert ok and ts.token_count == 2
    assert [p["active"] for p in ts.presented] == [True, True, False, True]
    assert ts.presented_tokens()[-1] == ts.issued[-1] != ts.presented_tokens()[-2]
    ts.reject_tokens(True)
    _, ok = run(cached)
    assert not ok and ts.token_count == 3


# --------------------------------------------------------------------------
# configuration factory and secret registry


def test_oauth_config_factory(oauth_config, oauth_mailbox, oauth_dovecot, tokenserver,
                              token_cache_path, confdir):
    config = oauth_config(oauth_mailbox)
    assert config["auth"] == "oauth2" and config["tls"] == "implicit"
    assert config["port"] == oauth_dovecot.pop3s_port
    o = config["oauth2"]
    assert o["token_endpoint"] == tokenserver.token_url
    assert o["client_secret"] == config.client.client_secret
    assert (o["grant"], o["mechanism"]) == ("client_credentials", "XOAUTH2")
    assert tokenserver.clients[o["client_id"]].username == oauth_mailbox.user
    yaml = to_yaml(config)
    assert json.loads(yaml)["oauth2"]["token_endpoint"] == tokenserver.token_url
    assert '"client_secret"' in yaml

    rt_config = oauth_config(oauth_mailbox, id="rt", grant="refresh_token", public=True,
                             mechanism="OAUTHBEARER", oauth2={"ca_file": None})
    o = rt_config["oauth2"]
    assert "client_secret" not in o and "scope" not in o and "ca_file" not in o
    path = rt_config.refresh_token_file
    assert o["refresh_token_file"] == str(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert path.read_text().strip() in tokenserver.refresh_tokens
    cd = confdir(config)
    assert token_cache_path(cd, "oa") == cd.state_directory / "oa" / "oauth2-token"


def test_secret_registry_finds_leaks():
    reg = SecretRegistry()
    secret = "pfdat_" + "Zq3xY8wVb2nT5mK7pL4rS9dF6gH1jC0aE"
    reg.add(secret, "short", None, "clientsecret-xyz")
    reg.add_source(lambda: ["pfdrt_from-a-source-1234567890abcdef"])
    reg.record("clean", "oauth2: token fetched (expires in 3599 s)\nlogged in with XOAUTH2\n")
    assert reg.leaks() == []
    cases = {
        "full": f"token {secret}",
        "piece": f"token {secret[10:24]}...",
        "base64": "C: " + base64.b64encode(f"user=u\x01auth=Bearer {secret}\x01\x01".encode()).decode(),
        "source": "refresh pfdrt_from-a-source-1234567890abcdef",
        "client secret": "secret=clientsecret-xyz",
    }
    for label, text in cases.items():
        found = reg.leaks([(label, text)])
        assert len(found) == 1 and found[0][1] == label, (label, found)
        assert secret not in str(found), "a leak report must not print the secret"
    assert reg.leaks([("x", "short")]) == [], "values under 8 characters are not scanned"
