"""OAuth2 logins against the contract (DESIGN.md §1 oauth2.*, §2 exit codes,
§3 the token cache, §4 step 2).

Against the OAuth2 Dovecot (oauth2 passdb asking tools/tokenserver.py's
introspection endpoint) and the token server: XOAUTH2 and OAUTHBEARER end
to end, the cached token reused by later runs, a cached token the server
rejects (one new token, one retry), a token that is always rejected
(exactly one retry, then 77), refresh-token rotation written back, and
the endpoint refusing the client (77), failing (500), down or stalling
(75). Against the fake POP3 server: the exact SASL exchange, including
the answer to the failure challenge and the retry on a new connection.

What popfetchd must do (the contract these tests hold it to):
  - get a token from oauth2.token_endpoint (grant client_credentials with
    client_id, client_secret, scope; or refresh_token with the token from
    oauth2.refresh_token_file), POSTed form-encoded, trusting oauth2.ca_file;
  - XOAUTH2: send "AUTH XOAUTH2", wait for the "+ " continuation, send
    base64("user=USER\\x01auth=Bearer TOKEN\\x01\\x01"); OAUTHBEARER: the same
    with base64("n,a=USER,\\x01auth=Bearer TOKEN\\x01\\x01") (RFC 7628);
  - a failure challenge ("+ " base64 JSON) is answered with an empty line
    (XOAUTH2) or "AQ==" (OAUTHBEARER); then, on the -ERR: fetch a new token
    once, retry once on a new connection, and if that fails too exit 77;
  - cache the token in state_directory/ID/oauth2-token (mode 0600) and reuse
    it while it has more than a minute to live (the endpoint sees one
    request for several runs);
  - the endpoint refusing the client (invalid_client, invalid_grant) is
    exit 77 and the endpoint's error_description is in stderr; the endpoint
    down, answering 500 or stalling past the request timeout is exit 75;
  - a rotated refresh token is written back to oauth2.refresh_token_file
    (atomically, mode 0600) and used by the next run;
  - no output ever holds the client secret, a refresh token or an access
    token (conftest's secret_registry scans every run of every test).
"""

import base64
import collections
import json
import os
import stat
import time
import types
from pathlib import Path

import signal

import pytest

from conftest import OAUTH_SCOPE
from daemonutil import daemon  # noqa: F401  (a fixture)
from daemonutil import wait_for as wait_until
from fakepop3 import Script, SendThenClose
from test_receive import (EX_NOPERM, EX_OK, EX_TEMPFAIL, assert_no_staging_leftovers,
                          assert_saved_exactly, deliver_generated, server_listing)
from test_tls import server_context, wait_for

MECHANISMS = ["XOAUTH2", "OAUTHBEARER"]
# popfetchd's default timeout for one token request (oauth2_params.timeout);
# there is no configuration key for it, so a stalled endpoint costs this long
TOKEN_REQUEST_TIMEOUT = 30
STALL_SECONDS = 90
XOAUTH2_CHALLENGE = {"status": "401", "schemes": "bearer", "scope": "mail"}
OAUTHBEARER_CHALLENGE = {"status": "invalid_token"}


# --------------------------------------------------------------------------
# helpers


def receive_all(run_popfetchd, cd, config, *options, timeout=60):
    return run_popfetchd([*options, "receive-all", config["id"]], confdir=cd, timeout=timeout)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def assert_untouched(res, config, mailbox, count, read_saved, code):
    """Exit `code`, nothing saved, the mailbox as it was."""
    assert res.returncode == code, f"expected exit {code}, got {res.returncode}"
    assert read_saved(config["save_directory"]) == [], "saved something without logging in"
    assert_no_staging_leftovers(config["save_directory"])
    assert mailbox.count() == count, "messages left the server"


def xoauth2_payload(user, token):
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def oauthbearer_payload(user, token):
    return base64.b64encode(f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()).decode()


def oauth2_failures(dovecot, user):
    """Dovecot's log lines about tokens it did not accept for this user."""
    return [l for l in dovecot.log_text().splitlines()
            if f"oauth2({user}," in l and "oauth2 failed" in l]


def logins(dovecot, user):
    return dovecot.login_methods(user)


# --------------------------------------------------------------------------
# end to end against Dovecot


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_receive_all_with_oauth2(oauth_dovecot, oauth_mailbox, oauth_config, tokenserver,
                                 confdir, run_popfetchd, read_saved, token_cache_path,
                                 mechanism):
    deliver_generated(oauth_mailbox, 3, 6000, seed=71)
    listing = server_listing(oauth_dovecot, oauth_mailbox)    # USER/PASS: logs PLAIN
    config = oauth_config(oauth_mailbox, mechanism=mechanism)
    cd = confdir(config)

    start = time.time()
    res = receive_all(run_popfetchd, cd, config)
    window = (start, time.time())

    assert res.returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "oa", listing, window)
    assert oauth_mailbox.count() == 0, "remove_after_read: true leaves the server empty"

    assert tokenserver.token_count == 1, tokenserver.token_requests
    req = tokenserver.token_requests[0]
    assert req["grant_type"] == "client_credentials"
    assert req["client_id"] == config.client.client_id
    assert req["client_auth"] in ("post", "basic"), "the client secret was not sent"
    assert req["scope"] == OAUTH_SCOPE
    assert req["content_type"] == "application/x-www-form-urlencoded"
    assert tokenserver.presented_tokens() == tokenserver.issued, \
        "Dovecot was not shown exactly the one token issued"
    assert wait_for(lambda: logins(oauth_dovecot, oauth_mailbox.user) == ["PLAIN", mechanism]), \
        f"Dovecot's logins: {logins(oauth_dovecot, oauth_mailbox.user)}"
    assert oauth2_failures(oauth_dovecot, oauth_mailbox.user) == []

    cache = token_cache_path(cd, "oa")
    assert cache.is_file(), f"no token cache at {cache}"
    assert mode_of(cache) == 0o600, f"{cache} has mode {oct(mode_of(cache))}"


def test_cached_token_is_reused_by_later_runs(oauth_dovecot, oauth_mailbox, oauth_config,
                                              tokenserver, confdir, run_popfetchd, read_saved,
                                              token_cache_path):
    config = oauth_config(oauth_mailbox)
    cd = confdir(config)
    for run in range(3):
        deliver_generated(oauth_mailbox, 1, 2000, seed=80 + run, with_dots=False)
        res = receive_all(run_popfetchd, cd, config)
        assert res.returncode == EX_OK, f"run {run + 1}"
        assert len(read_saved(config["save_directory"])) == run + 1
        assert mode_of(token_cache_path(cd, "oa")) == 0o600
    assert tokenserver.token_count == 1, "the endpoint was asked again instead of using the cache"
    assert len(tokenserver.issued) == 1
    assert tokenserver.presented_tokens() == tokenserver.issued * 3
    assert oauth_mailbox.count() == 0


def test_token_about_to_expire_is_renewed_before_use(oauth_dovecot, oauth_mailbox,
                                                     oauth_config, tokenserver, confdir,
                                                     run_popfetchd, read_saved):
    """A cached token with less than a minute to live is not presented: a
    new one is fetched first (no login fails)."""
    tokenserver.set_expires_in(30)
    config = oauth_config(oauth_mailbox)
    cd = confdir(config)
    for run in range(2):
        deliver_generated(oauth_mailbox, 1, 1500, seed=90 + run, with_dots=False)
        assert receive_all(run_popfetchd, cd, config).returncode == EX_OK
    assert tokenserver.token_count == 2
    assert tokenserver.presented_tokens() == tokenserver.issued
    assert all(p["active"] for p in tokenserver.presented)
    assert len(read_saved(config["save_directory"])) == 2


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_rejected_cached_token_is_refreshed_once(oauth_dovecot, oauth_mailbox, oauth_config,
                                                 tokenserver, confdir, run_popfetchd,
                                                 read_saved, token_cache_path, mechanism):
    config = oauth_config(oauth_mailbox, mechanism=mechanism)
    cd = confdir(config)
    deliver_generated(oauth_mailbox, 1, 3000, seed=101, with_dots=False)
    assert receive_all(run_popfetchd, cd, config).returncode == EX_OK
    cache = token_cache_path(cd, "oa")
    cached = cache.read_bytes()

    # the server forgets the token; the cache still says it is good for an hour
    tokenserver.expire_all()
    assert cache.read_bytes() == cached
    deliver_generated(oauth_mailbox, 2, 3000, seed=102, with_dots=False)
    listing = server_listing(oauth_dovecot, oauth_mailbox)
    res = receive_all(run_popfetchd, cd, config)

    assert res.returncode == EX_OK
    assert tokenserver.token_count == 2, "expected exactly one new token"
    t1, t2 = tokenserver.issued
    assert tokenserver.presented_tokens() == [t1, t1, t2], \
        "expected: the cached token, then (one retry) the new one"
    assert [p["active"] for p in tokenserver.presented] == [True, False, True]
    assert len(oauth2_failures(oauth_dovecot, oauth_mailbox.user)) == 1
    saved = read_saved(config["save_directory"])
    assert len(saved) == 3
    assert_saved_exactly([s for s in saved if s.uidl in dict(listing)], "oa", listing)
    assert oauth_mailbox.count() == 0
    assert cache.read_bytes() != cached, "the new token was not cached"
    assert mode_of(cache) == 0o600


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_token_always_rejected_is_retried_exactly_once(oauth_dovecot, oauth_mailbox,
                                                       oauth_config, tokenserver, confdir,
                                                       run_popfetchd, read_saved, mechanism):
    tokenserver.reject_tokens(True)
    deliver_generated(oauth_mailbox, 2, 2000, seed=111, with_dots=False)
    config = oauth_config(oauth_mailbox, mechanism=mechanism)
    res = receive_all(run_popfetchd, confdir(config), config)

    assert_untouched(res, config, oauth_mailbox, 2, read_saved, EX_NOPERM)
    assert tokenserver.token_count == 2, "one token, then exactly one new one"
    t1, t2 = tokenserver.issued
    assert t1 != t2
    assert tokenserver.presented_tokens() == [t1, t2], "exactly two login attempts"
    assert wait_for(lambda: len(oauth2_failures(oauth_dovecot, oauth_mailbox.user)) == 2)
    assert logins(oauth_dovecot, oauth_mailbox.user) == []


# --------------------------------------------------------------------------
# refresh tokens


@pytest.mark.parametrize("public", [True, False], ids=["public-client", "confidential-client"])
def test_rotated_refresh_token_is_written_back_and_used(oauth_dovecot, oauth_mailbox,
                                                        oauth_config, tokenserver, confdir,
                                                        run_popfetchd, read_saved, public):
    tokenserver.rotate_refresh_tokens(True)
    config = oauth_config(oauth_mailbox, grant="refresh_token", public=public)
    rt_file = config.refresh_token_file
    rt0 = rt_file.read_text().strip()
    cd = confdir(config)

    deliver_generated(oauth_mailbox, 1, 2500, seed=121, with_dots=False)
    assert receive_all(run_popfetchd, cd, config).returncode == EX_OK
    req = tokenserver.token_requests[0]
    assert (req["grant_type"], req["refresh_token"]) == ("refresh_token", rt0)
    assert req["client_id"] == config.client.client_id
    if not public:
        assert req["client_auth"] in ("post", "basic"), "the client secret was not sent"
    rt1 = tokenserver.issued_refresh[0]
    assert rt_file.read_text().strip() == rt1, "the rotated refresh token was not written back"
    assert mode_of(rt_file) == 0o600
    assert sorted(os.listdir(rt_file.parent)) == [rt_file.name], "leftovers beside the file"

    # the next token must come from the rotated refresh token (rt0 is used up)
    tokenserver.expire_all()
    deliver_generated(oauth_mailbox, 1, 2500, seed=122, with_dots=False)
    assert receive_all(run_popfetchd, cd, config).returncode == EX_OK
    assert [r["refresh_token"] for r in tokenserver.token_requests] == [rt0, rt1]
    assert all(r["result"] == "ok" for r in tokenserver.token_requests)
    rt2 = tokenserver.issued_refresh[1]
    assert rt_file.read_text().strip() == rt2
    assert mode_of(rt_file) == 0o600
    assert sorted(os.listdir(rt_file.parent)) == [rt_file.name]
    assert len(read_saved(config["save_directory"])) == 2
    assert oauth_mailbox.count() == 0


def test_revoked_refresh_token_is_an_authentication_failure(oauth_dovecot, oauth_mailbox,
                                                            oauth_config, tokenserver, confdir,
                                                            run_popfetchd, read_saved):
    config = oauth_config(oauth_mailbox, grant="refresh_token")
    tokenserver.revoke_refresh_token(config.refresh_token_file.read_text().strip())
    deliver_generated(oauth_mailbox, 1, 1000, seed=131, with_dots=False)
    res = receive_all(run_popfetchd, confdir(config), config)

    assert_untouched(res, config, oauth_mailbox, 1, read_saved, EX_NOPERM)
    assert "invalid_grant" in res.stderr
    assert "AADSTS70000: The provided refresh token is invalid, expired or revoked." in res.stderr
    assert tokenserver.presented == [], "logged in without a token"


# --------------------------------------------------------------------------
# the token endpoint failing


@pytest.mark.parametrize("how", ["wrong secret", "refused"])
def test_endpoint_refusing_the_client_is_an_authentication_failure(
        oauth_dovecot, oauth_mailbox, oauth_config, tokenserver, confdir, run_popfetchd,
        read_saved, secret_registry, how):
    deliver_generated(oauth_mailbox, 1, 1000, seed=141, with_dots=False)
    if how == "wrong secret":
        wrong = "pfdcs_not-the-right-secret-0123456789"
        secret_registry.add(wrong)
        config = oauth_config(oauth_mailbox, oauth2={"client_secret": wrong})
        description = "AADSTS7000215: Invalid client secret provided."
    else:
        config = oauth_config(oauth_mailbox)
        description = "AADSTS7000222: The provided client secret keys for app 'pfd-test' are expired."
        tokenserver.refuse("invalid_client", description)
    res = receive_all(run_popfetchd, confdir(config), config)

    assert_untouched(res, config, oauth_mailbox, 1, read_saved, EX_NOPERM)
    assert description in res.stderr, "the endpoint's error_description is not in the log"
    assert tokenserver.issued == [] and tokenserver.presented == []


def test_endpoint_answering_500_is_temporary(oauth_dovecot, oauth_mailbox, oauth_config,
                                             tokenserver, confdir, run_popfetchd, read_saved):
    deliver_generated(oauth_mailbox, 1, 1000, seed=151, with_dots=False)
    config = oauth_config(oauth_mailbox)
    tokenserver.fail(500)
    res = receive_all(run_popfetchd, confdir(config), config)

    assert_untouched(res, config, oauth_mailbox, 1, read_saved, EX_TEMPFAIL)
    assert "500" in res.stderr, "the log does not say what the endpoint answered"
    assert tokenserver.stats().get("token_failed", 0) >= 1
    assert tokenserver.presented == []


def test_endpoint_down_is_temporary(oauth_dovecot, oauth_mailbox, oauth_config, tokenserver,
                                    confdir, run_popfetchd, read_saved, token_cache_path):
    deliver_generated(oauth_mailbox, 1, 1000, seed=161, with_dots=False)
    config = oauth_config(oauth_mailbox)
    cd = confdir(config)
    tokenserver.down()
    res = receive_all(run_popfetchd, cd, config)

    assert_untouched(res, config, oauth_mailbox, 1, read_saved, EX_TEMPFAIL)
    assert tokenserver.presented == []
    # and once it is back, the next run works
    tokenserver.up()
    assert receive_all(run_popfetchd, cd, config).returncode == EX_OK
    assert oauth_mailbox.count() == 0 and tokenserver.token_count == 1


@pytest.mark.parametrize("phase", ["request", "handshake"])
def test_stalled_endpoint_times_out_as_temporary(oauth_dovecot, oauth_mailbox, oauth_config,
                                                 tokenserver, confdir, run_popfetchd,
                                                 read_saved, phase):
    """The endpoint accepts and never answers (for STALL_SECONDS, far past
    popfetchd's token request timeout, TOKEN_REQUEST_TIMEOUT): popfetchd
    gives up on its own. Slow: up to TOKEN_REQUEST_TIMEOUT seconds."""
    deliver_generated(oauth_mailbox, 1, 1000, seed=171, with_dots=False)
    config = oauth_config(oauth_mailbox, timeouts={"connect": "5s", "command": "10s"})
    tokenserver.stall(STALL_SECONDS, phase=phase)
    start = time.monotonic()
    res = receive_all(run_popfetchd, confdir(config), config, timeout=STALL_SECONDS - 5)
    elapsed = time.monotonic() - start

    assert_untouched(res, config, oauth_mailbox, 1, read_saved, EX_TEMPFAIL)
    assert elapsed < TOKEN_REQUEST_TIMEOUT + 15, \
        f"took {elapsed:.0f} s: the request to the endpoint has no timeout of its own"
    assert tokenserver.stats().get("token_stalled", 0) >= 1, "the endpoint was never reached"
    assert tokenserver.presented == []


# --------------------------------------------------------------------------
# the SASL exchange on the wire (fake POP3 server over implicit TLS)


def failing_login_script(mechanism, challenge):
    """CAPA, AUTH MECH -> "+ ", payload -> failure challenge, answer -> -ERR."""
    capa = (b"+OK\r\nSASL XOAUTH2 OAUTHBEARER\r\nUIDL\r\nTOP\r\n.\r\n")
    encoded = base64.b64encode(json.dumps(challenge, separators=(",", ":")).encode())
    return Script(steps=[
        ("CAPA", capa),
        ("AUTH", b"+ \r\n"),
        ("*", b"+ " + encoded + b"\r\n"),
        ("*", b"-ERR [AUTH] Authentication failed.\r\n"),
    ], then=SendThenClose(b"+OK bye\r\n"))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_sasl_exchange_answers_the_challenge_and_retries_once(
        oauth_dovecot, fake_pop3, oauth_config, tokenserver, confdir, run_popfetchd,
        read_saved, mechanism):
    challenge = XOAUTH2_CHALLENGE if mechanism == "XOAUTH2" else OAUTHBEARER_CHALLENGE
    server = fake_pop3(script=failing_login_script(mechanism, challenge),
                       tls_context=server_context(oauth_dovecot))
    account = types.SimpleNamespace(user="fakeuser@example.org")
    config = oauth_config(account, id="wire", mechanism=mechanism, server=server.host,
                          port=server.port, timeouts={"connect": "5s", "command": "10s"})
    res = receive_all(run_popfetchd, confdir(config), config)

    assert res.returncode == EX_NOPERM
    assert server.wait_idle()
    assert len(server.sessions) == 2, f"expected one retry on a new connection: {server.transcript}"
    assert tokenserver.token_count == 2
    t1, t2 = tokenserver.issued
    assert t1 != t2
    payload = xoauth2_payload if mechanism == "XOAUTH2" else oauthbearer_payload
    answer = "" if mechanism == "XOAUTH2" else "AQ=="
    for session, token in ((0, t1), (1, t2)):
        commands = server.commands(session)
        assert commands[:4] == ["CAPA", f"AUTH {mechanism}", payload(account.user, token), answer], \
            f"session {session}: {commands}"
        assert all(c.upper() in ("QUIT",) for c in commands[4:]), commands
    assert read_saved(config["save_directory"]) == []


# --------------------------------------------------------------------------
# secrets


def test_no_secret_in_any_output(oauth_dovecot, oauth_mailbox, oauth_config, tokenserver,
                                 confdir, run_popfetchd, secret_registry):
    """Every kind of run, at the most verbose log level and with --json:
    no client secret, refresh token or access token (nor a piece of one, nor
    its base64) in stdout or stderr. (Every other test is scanned as well.)"""
    deliver_generated(oauth_mailbox, 1, 1000, seed=181, with_dots=False)
    config = oauth_config(oauth_mailbox)
    cd = confdir(config)
    assert receive_all(run_popfetchd, cd, config, "-v").returncode == EX_OK
    tokenserver.expire_all()                          # rejected, refreshed, retried
    deliver_generated(oauth_mailbox, 1, 1000, seed=182, with_dots=False)
    assert receive_all(run_popfetchd, cd, config, "-v", "--json").returncode == EX_OK
    tokenserver.reject_tokens(True)                   # rejected twice
    deliver_generated(oauth_mailbox, 1, 1000, seed=183, with_dots=False)
    assert receive_all(run_popfetchd, cd, config, "-v").returncode == EX_NOPERM
    assert receive_all(run_popfetchd, cd, config, "-v", "--json").returncode == EX_NOPERM
    tokenserver.reject_tokens(False)

    tokenserver.rotate_refresh_tokens(True)           # a refresh token, rotated
    rt_config = oauth_config(oauth_mailbox, id="rt", grant="refresh_token")
    rt_cd = confdir(rt_config)
    assert receive_all(run_popfetchd, rt_cd, rt_config, "-v").returncode == EX_OK
    tokenserver.refuse("invalid_client", "AADSTS7000215: Invalid client secret provided.")
    assert receive_all(run_popfetchd, cd, config, "-v").returncode in (EX_OK, EX_NOPERM)
    assert receive_all(run_popfetchd, rt_cd, rt_config, "-v", "--json").returncode in \
        (EX_OK, EX_NOPERM)
    # the test command always asks the endpoint: refused now
    assert run_popfetchd(["-v", "test", "oa"], confdir=cd).returncode == EX_NOPERM
    tokenserver.normal()
    assert run_popfetchd(["-v", "check"], confdir=cd).returncode == EX_OK
    assert run_popfetchd(["-v", "test", "oa"], confdir=cd).returncode == EX_OK
    assert run_popfetchd(["-v", "--json", "test", "rt"], confdir=rt_cd).returncode == EX_OK

    assert len(secret_registry.secrets()) >= 6
    assert len(secret_registry.outputs) >= 16
    secret_registry.check()


def test_slow_token_endpoint_holds_no_session_slot(oauth_dovecot, oauth_mailbox, oauth_config,
                                                   tokenserver, fake_pop3, fake_config,
                                                   confdir, daemon):
    """max_sessions: 1. An OAuth2 poll waits for a token endpoint that
    stalls 10 s before it takes a session slot, so a password configuration
    beside it keeps polling every second meanwhile; then the OAuth2 one saves
    its mail too (the endpoint answered nothing the first time: the poll asks
    again). The OAuth2 configuration polls every 5 s so that its first poll
    (spread at random over the first interval) surely falls in the stall."""
    deliver_generated(oauth_mailbox, 2, 4000, seed=75)
    waiting = oauth_mailbox.count()
    other = fake_pop3([])
    oa = oauth_config(oauth_mailbox, poll_interval="5s")
    pw = fake_config(other, id="pw", poll_interval="1s")
    cd = confdir(oa, pw, daemon={"max_sessions": 1})
    tokenserver.stall(seconds=10, times=1)
    d = daemon(cd)
    d.wait_ready()
    assert wait_for(lambda: tokenserver.stats().get("token_stalled", 0) >= 1, 10), d.output
    t0 = time.monotonic()
    # 5 s after the start the OAuth2 poll is due and waits for its token;
    # the stall lasts 10 s: between the two the password one must go on
    time.sleep(max(0.0, t0 + 5.3 - time.monotonic()))
    n = len(other.sessions)
    assert wait_for(lambda: len(other.sessions) >= n + 3, t0 + 9.5 - time.monotonic()), \
        f"the password configuration waited: {len(other.sessions) - n} sessions between " \
        f"5.3 s and {time.monotonic() - t0:.1f} s into the stall\n{d.output}"
    assert oauth_mailbox.count() == waiting, "the OAuth2 poll had its token already?"
    assert wait_for(lambda: oauth_mailbox.count() == 0, 30), d.output
    assert d.stop() == EX_OK, d.output
    assert len([p for p in Path(oa["save_directory"]).iterdir()
                if not p.name.startswith(".")]) == waiting


def test_token_that_cannot_be_had_takes_no_session_slot(oauth_dovecot, oauth_mailbox,
                                                        oauth_config, tokenserver, fake_pop3,
                                                        fake_config, confdir, daemon):
    """max_sessions: 1, a token endpoint that never answers (each request
    gives up after timeouts.connect, 3 s). The OAuth2 configuration's polls
    fail without a session: the password configuration beside it polls every
    second all along, the OAuth2 one is not asked for a token again inside a
    slot, its failures back off (1 s interval: ~2 s, ~4 s, ~8 s), each
    logged once, and STATUS counts it as failing."""
    deliver_generated(oauth_mailbox, 1, 2000, seed=77, with_dots=False)
    other = fake_pop3([])
    oa = oauth_config(oauth_mailbox, poll_interval="1s",
                      timeouts={"connect": "3s", "command": "5s"})
    pw = fake_config(other, id="pw", poll_interval="1s")
    cd = confdir(oa, pw, daemon={"max_sessions": 1})
    tokenserver.stall(seconds=120)
    d = daemon(cd)
    d.wait_ready()
    t0 = time.monotonic()
    time.sleep(16)
    starts = [s.started for s in other.sessions if s.started >= t0 + 1]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    stalled = tokenserver.stats().get("token_stalled", 0)
    assert d.stop() == EX_OK, d.output
    assert len(starts) >= 9 and max(gaps) < 2.5, \
        f"the password configuration waited for a slot: gaps {gaps}\n{d.output}"
    # 16 s: polls fail at ~3, ~8, ~14.5 (3 s each, then 2 s, 4 s... later);
    # the background refresh retries on its own (after ~10 s) and may add one
    assert 2 <= stalled <= 5, f"{stalled} token requests in 16 s\n{d.output}"
    failed = [l for l in d.output.splitlines() if "oa:" in l and "poll failed" in l]
    assert 2 <= len(failed) <= stalled, d.output
    assert not any("oa: oauth2:" in l for l in d.output.splitlines()), \
        f"a poll asked for the token inside a session slot\n{d.output}"
    assert all("no access token" in l and "(exit 75)" in l for l in failed), failed
    delays = [float(l.rsplit("next try in ", 1)[1].split()[0]) for l in failed]
    assert delays == sorted(delays) and delays[-1] > delays[0], delays
    status = [f["STATUS"] for f in d.notify.fields("STATUS")]
    assert any("1 failing" in s and "last error: oa: no access token" in s for s in status), \
        status
    assert tokenserver.presented == [] and oauth_mailbox.count() == 1


# --------------------------------------------------------------------------
# refresh tokens across a reload and across processes


def start_refreshing_daemon(oauth_mailbox, oauth_config, tokenserver, confdir, daemon):
    """A daemon keeping a rotated refresh-token grant fresh: 4 s tokens are
    refreshed every ~2 s, and the endpoint takes 1 s to answer, so that a
    refresh is in flight a third of the time. No poll is due (1 h)."""
    tokenserver.rotate_refresh_tokens(True)
    tokenserver.set_expires_in(4)
    tokenserver.delay(1.0)
    config = oauth_config(oauth_mailbox, grant="refresh_token", poll_interval="1h")
    cd = confdir(config)
    d = daemon(cd)
    d.wait_ready()
    return config, cd, d


def new_refresh_in_flight(tokenserver, seen):
    """A request to /token is in its delay, and it is not among the first
    `seen` delayed ones."""
    st = tokenserver.stats()
    delayed = st.get("token_delayed", 0)
    return delayed > st.get("token", 0) and delayed > seen


def assert_refresh_tokens_used_once(tokenserver, min_requests):
    reqs = [r for r in tokenserver.token_requests if r.get("grant_type") == "refresh_token"]
    used = collections.Counter(r["refresh_token"] for r in reqs)
    assert len(reqs) >= min_requests, reqs
    assert max(used.values()) == 1, f"a refresh token presented twice: {used.values()}"
    assert all(r["result"] == "ok" for r in reqs), [r["result"] for r in reqs]


def test_reload_during_a_refresh_keeps_the_rotated_refresh_token(
        oauth_dovecot, oauth_mailbox, oauth_config, tokenserver, confdir, daemon):
    """SIGHUP while a refresh is in flight (three times): the token source
    and its refresh carry over, the rotated refresh token is written back,
    and the refreshes after the reload keep working."""
    config, cd, d = start_refreshing_daemon(oauth_mailbox, oauth_config, tokenserver, confdir,
                                            daemon)
    for k in range(3):
        wait_until(lambda: new_refresh_in_flight(tokenserver, k), 10,
                   f"refresh #{k + 1} in flight\n{d.output}")
        d.signal(signal.SIGHUP)
        d.wait_ready(2 + k)
    wait_until(lambda: tokenserver.token_count >= 5, 15, f"two more refreshes\n{d.output}")
    assert_refresh_tokens_used_once(tokenserver, 5)
    assert config.refresh_token_file.read_text().strip() in tokenserver.issued_refresh[-2:]
    assert "invalid_grant" not in d.output
    assert d.stop() == EX_OK, d.output


def test_receive_beside_the_daemon_never_reuses_a_refresh_token(
        oauth_dovecot, oauth_mailbox, oauth_config, tokenserver, confdir, daemon,
        run_popfetchd):
    """`receive-all` started while the daemon's refresh is in flight (five
    times): it waits for the daemon's lock and takes the token it cached
    (or refreshes with the rotated refresh token), never presenting the
    refresh token the daemon is using."""
    config, cd, d = start_refreshing_daemon(oauth_mailbox, oauth_config, tokenserver, confdir,
                                            daemon)
    deliver_generated(oauth_mailbox, 1, 2000, seed=78, with_dots=False)
    for _ in range(5):
        seen = tokenserver.stats().get("token_delayed", 0)
        wait_until(lambda: new_refresh_in_flight(tokenserver, seen), 10,
                   f"a refresh of the daemon in flight\n{d.output}")
        res = receive_all(run_popfetchd, cd, config)
        assert res.returncode == EX_OK, res.stderr
    assert oauth_mailbox.count() == 0
    assert_refresh_tokens_used_once(tokenserver, 5)
    assert "invalid_grant" not in d.output
    assert d.stop() == EX_OK, d.output


def test_secret_echoed_by_the_endpoint_is_redacted_before_the_cut(
        oauth_dovecot, oauth_mailbox, oauth_config, tokenserver, confdir, run_popfetchd,
        read_saved, secret_registry):
    """An endpoint that quotes the client secret at the end of a long
    error_description: the text is cut for the log, and the cut must not
    leave a piece of the secret that no longer matches it whole."""
    deliver_generated(oauth_mailbox, 1, 1000, seed=143, with_dots=False)
    secret = "pfdcs_echoed-back-0123456789abcdef"
    secret_registry.add(secret)
    config = oauth_config(oauth_mailbox, oauth2={"client_secret": secret})
    # the log keeps about 240 bytes of the description: the secret straddles the cut
    tokenserver.refuse("invalid_client", "AADSTS7000215: " + "x" * 190 + " secret=" + secret)
    res = receive_all(run_popfetchd, confdir(config), config)

    assert_untouched(res, config, oauth_mailbox, 1, read_saved, EX_NOPERM)
    assert "AADSTS7000215" in res.stderr
    assert secret[:12] not in res.stderr, "a piece of the client secret reached the log"
