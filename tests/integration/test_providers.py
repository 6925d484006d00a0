"""What the big providers' POP3 servers do, played by the fake server
(tests/integration/fakepop3.py), and what popfetchd must do about it
(issue 15 item 3). Each test cites where the behaviour is documented or
was reported.

OAuth2 cases get their tokens from the real HTTPS token endpoint
(tools/tokenserver.py); the fake server accepts a bearer token only if the
token server issued it, for that user, and it has not expired, so that an
expired or wrong token is refused exactly as a provider refuses it.

Microsoft 365 (outlook.office365.com):
  - XOAUTH2 in two steps: "AUTH XOAUTH2", "+ ", then the base64 message;
    the message on the AUTH line is refused with "-ERR Protocol error.
    Connection is closed. 10";
  - a refused token (expired, revoked, or POP disabled for the mailbox, or
    an app without POP rights) is one plain -ERR, without an error
    challenge and without a response code: "-ERR Authentication failure:
    unknown user name or bad password.";
  - throttling: "-ERR Server Unavailable. 21" (no response code);
  - no RESP-CODES, no PIPELINING in its CAPA.
Gmail (pop.gmail.com):
  - CAPA: USER RESP-CODES EXPIRE 0 LOGIN-DELAY 300 TOP UIDL X-GOOGLE-RICO
    SASL PLAIN XOAUTH2 OAUTHBEARER;
  - a refused token gets an error challenge, "+ " and the base64 of
    {"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"};
    the client answers it (XOAUTH2: an empty line; OAUTHBEARER: "AQ==",
    RFC 7628 §3.2.3) and then gets the -ERR;
  - a message retrieved in a session that ended with QUIT is "popped" and
    not listed again (EXPIRE 0), DELE or not;
  - "recent mode": the user name "recent:USER" lists the last 30 days of
    mail, popped or not; to popfetchd it is just the user name.
Yahoo / GMX style: the server closes the connection after some number of
commands.
"""

import base64
import json
import types

import pytest

import mailgen
from conftest import read_saved_messages
from fakepop3 import Close, Reply, SendThenClose, matches
from test_receive import (EX_NOPERM, EX_OK, EX_TEMPFAIL, assert_no_staging_leftovers,
                          assert_saved_exactly)
from test_tls import server_context

M365_USER = "pfd-m365@contoso.example"
GMAIL_USER = "pfd.gmail.test@gmail.example"
M365_GREETING = (b"+OK The Microsoft Exchange POP3 service is ready. "
                 b"[UABBADcAUAAyADYANABDAEEAMAAxADMANwAuAEYAUgBBAFAAMgA2ADQA]\r\n")
M365_CAPA = ["TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER"]
M365_REFUSAL = b"-ERR Authentication failure: unknown user name or bad password.\r\n"
M365_PROTOCOL_ERROR = b"-ERR Protocol error. Connection is closed. 10\r\n"
M365_THROTTLED = b"-ERR Server Unavailable. 21\r\n"
GMAIL_GREETING = b"+OK Gpop ready for requests from 192.0.2.7 q5pf21484907pbh.7\r\n"
GMAIL_CAPA = ["USER", "RESP-CODES", "EXPIRE 0", "LOGIN-DELAY 300", "TOP", "UIDL",
              "X-GOOGLE-RICO", "SASL PLAIN XOAUTH2 OAUTHBEARER"]
GMAIL_ERROR = json.dumps({"status": "400", "schemes": "Bearer",
                          "scope": "https://mail.google.com/"}, separators=(",", ":")).encode()
GMAIL_REFUSAL = b"-ERR [AUTH] Invalid credentials.\r\n"


# --------------------------------------------------------------------------
# helpers


def messages(count, seed, size=900):
    """(uidl, bytes as the server sends them, CRLF) pairs."""
    return [(f"{seed:03d}-{i:04d}", mailgen.generate(1, size, seed * 100 + i)[0]
             .replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")) for i in range(count)]


def served(pairs):
    return [(u, d if d.endswith(b"\r\n") else d + b"\r\n") for u, d in pairs]


def oauth_server(fake_pop3, oauth_dovecot, tokenserver, pairs, user, **kw):
    """A fake server over implicit TLS whose XOAUTH2 / OAUTHBEARER accept a
    token the token server issued for `user` and that is still valid.
    .checked: [(user, token, accepted)] in order."""
    checked = []

    def check(u, token):
        with tokenserver._lock:
            info = tokenserver.tokens.get(token)
        ok = tokenserver.valid(token) and info is not None and info["username"] == u
        checked.append((u, token, ok))
        return ok
    server = fake_pop3(pairs, user=user, oauth=check,
                       tls_context=server_context(oauth_dovecot), **kw)
    server.checked = checked
    return server


def config_for(oauth_config, server, id, mechanism="XOAUTH2", **keys):
    account = types.SimpleNamespace(user=server.user)
    return oauth_config(account, id=id, mechanism=mechanism, server=server.host,
                        port=server.port, timeouts={"connect": "5s", "command": "10s"},
                        **keys)


def receive_all(run_popfetchd, cd, config_id, *extra):
    return run_popfetchd(["receive-all", config_id, *extra], confdir=cd)


def poll_after_expiry(server, tokenserver, run_popfetchd, cd, config_id, later):
    """The token server expires the cached token and the `later` messages
    arrive: the next poll must succeed. The two tokens issued."""
    tokenserver.expire_all()
    for uidl, data in later:
        server.add(data, uidl=uidl)
    res = receive_all(run_popfetchd, cd, config_id)
    assert res.returncode == EX_OK, res.stderr
    assert server.wait_idle()
    t1, t2 = tokenserver.issued
    return t1, t2


def auth_lines(server, session):
    """The AUTH command and the SASL lines after it, in one session."""
    cmds = server.commands(session)
    start = next(i for i, c in enumerate(cmds) if matches("AUTH", c))
    end = next((i for i, c in enumerate(cmds[start + 1:], start + 1)
                if c.split(" ")[0].upper() in ("UIDL", "LIST", "STAT", "QUIT", "UTF8")),
               len(cmds))
    return cmds[start:end]


def xoauth2(user, token):
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def oauthbearer(user, token):
    return base64.b64encode(f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()).decode()


def refuse_initial_response(rec, line):
    """Microsoft 365: the XOAUTH2 message on the AUTH line is a protocol error."""
    if line.upper().startswith("AUTH XOAUTH2 "):
        return SendThenClose(M365_PROTOCOL_ERROR)
    return None


def m365(fake_pop3, oauth_dovecot, tokenserver, pairs, **kw):
    server = oauth_server(fake_pop3, oauth_dovecot, tokenserver, pairs, M365_USER,
                          sasl=["PLAIN", "XOAUTH2"], capabilities=M365_CAPA,
                          auth_refusal=M365_REFUSAL, hook=refuse_initial_response, **kw)
    server.inject("GREETING", Reply(M365_GREETING), times=None)
    return server


def gmail(fake_pop3, oauth_dovecot, tokenserver, pairs, **kw):
    server = oauth_server(fake_pop3, oauth_dovecot, tokenserver, pairs, GMAIL_USER,
                          sasl=["PLAIN", "XOAUTH2", "OAUTHBEARER"], capabilities=GMAIL_CAPA,
                          auth_refusal=GMAIL_REFUSAL, oauth_error=GMAIL_ERROR, **kw)
    server.inject("GREETING", Reply(GMAIL_GREETING), times=None)
    return server


# --------------------------------------------------------------------------
# Microsoft 365


def test_m365_xoauth2_is_sent_in_two_steps(oauth_dovecot, fake_pop3, oauth_config, tokenserver,
                                            confdir, run_popfetchd):
    """Microsoft 365 takes the XOAUTH2 message only as the answer to the
    "+ " continuation; on the AUTH line it answers "-ERR Protocol error.
    Connection is closed. 10" and closes.

    https://learn.microsoft.com/en-us/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth#pop-protocol-exchange
    https://github.com/getmail6/getmail6/issues/256 (the one-line form fails
    with that text, the two-step form works)
    https://github.com/simonrob/email-oauth2-proxy/issues/244 (the "+ " line)"""
    pairs = messages(3, 1)
    server = m365(fake_pop3, oauth_dovecot, tokenserver, pairs)
    config = config_for(oauth_config, server, "m365")
    res = receive_all(run_popfetchd, confdir(config), "m365")

    assert res.returncode == EX_OK, res.stderr
    assert server.wait_idle()
    assert len(server.sessions) == 1
    [token] = tokenserver.issued
    assert auth_lines(server, 0) == ["AUTH XOAUTH2", xoauth2(M365_USER, token)]
    assert server.checked == [(M365_USER, token, True)]
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "m365", served(pairs))
    assert server.remaining() == []


def test_m365_refused_cached_token_is_refreshed_once(oauth_dovecot, fake_pop3, oauth_config,
                                                     tokenserver, confdir, run_popfetchd,
                                                     token_cache_path):
    """The cached token has expired on the server's side (the cache still
    gives it time): Microsoft 365 answers the XOAUTH2 message with a plain
    "-ERR Authentication failure: unknown user name or bad password." — no
    error challenge, no [AUTH]. DESIGN §4.2: an invalid token is refreshed
    once and the login retried, so the poll succeeds.

    https://github.com/simonrob/email-oauth2-proxy/issues/244 and
    https://github.com/simonrob/email-oauth2-proxy/issues/238 (the text, in
    answer to the XOAUTH2 message)"""
    first = messages(1, 2)
    server = m365(fake_pop3, oauth_dovecot, tokenserver, first)
    config = config_for(oauth_config, server, "m365")
    cd = confdir(config)
    assert receive_all(run_popfetchd, cd, "m365").returncode == EX_OK
    cached = token_cache_path(cd, "m365").read_bytes()

    later = messages(2, 3)
    t1, t2 = poll_after_expiry(server, tokenserver, run_popfetchd, cd, "m365", later)
    assert [(t, ok) for _, t, ok in server.checked] == [(t1, True), (t1, False), (t2, True)]
    assert len(server.sessions) == 3, server.transcript
    assert auth_lines(server, 1) == ["AUTH XOAUTH2", xoauth2(M365_USER, t1)]
    assert auth_lines(server, 2) == ["AUTH XOAUTH2", xoauth2(M365_USER, t2)]
    assert token_cache_path(cd, "m365").read_bytes() != cached, "the new token was not cached"
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "m365",
                         served(first + later))
    assert server.remaining() == []


def test_m365_pop_disabled_is_77_after_one_retry(oauth_dovecot, fake_pop3, oauth_config,
                                                 tokenserver, confdir, run_popfetchd):
    """POP disabled for the mailbox (or an app without POP rights, or a
    service principal not registered in Exchange Online): every token is
    refused with the same plain -ERR as an expired one. popfetchd cannot
    tell the two apart: one new token, one retry, then exit 77 with the
    server's words and what to check in the log.

    https://github.com/simonrob/email-oauth2-proxy/issues/160 ("Is POP3
    enabled for this account?"), .../issues/238 (client credentials)"""
    server = m365(fake_pop3, oauth_dovecot, tokenserver, messages(1, 4))
    server.oauth = lambda user, token: False
    config = config_for(oauth_config, server, "m365")
    res = receive_all(run_popfetchd, confdir(config), "m365")

    assert res.returncode == EX_NOPERM, res.stderr
    assert server.wait_idle()
    assert len(server.sessions) == 2 and tokenserver.token_count == 2
    assert "unknown user name or bad password" in res.stderr
    assert "a new access token was refused too" in res.stderr, res.stderr
    assert read_saved_messages(config["save_directory"]) == []
    assert len(server.remaining()) == 1


@pytest.mark.parametrize("refusal", [b"-ERR [SYS/TEMP] Server Unavailable. 21\r\n",
                                     b"-ERR [IN-USE] Too many concurrent connections\r\n",
                                     b"-ERR [LOGIN-DELAY 60] Too many logins\r\n"],
                         ids=["sys-temp", "in-use", "login-delay"])
def test_temporary_refusal_of_a_token_is_75_without_a_new_token(
        oauth_dovecot, fake_pop3, oauth_config, tokenserver, confdir, run_popfetchd, refusal):
    """A refusal with a temporary response code (RFC 2449 §8.1, RFC 3206 §4:
    [SYS/TEMP], [IN-USE], [LOGIN-DELAY]) says nothing about the token: exit
    75, the token is not thrown away, no second login."""
    server = m365(fake_pop3, oauth_dovecot, tokenserver, messages(1, 5))
    server.oauth = lambda user, token: False
    server.auth_refusal = refusal
    config = config_for(oauth_config, server, "m365")
    res = receive_all(run_popfetchd, confdir(config), "m365")

    assert res.returncode == EX_TEMPFAIL, res.stderr
    assert server.wait_idle()
    assert len(server.sessions) == 1 and tokenserver.token_count == 1
    assert read_saved_messages(config["save_directory"]) == []


def test_m365_too_many_connections_at_the_greeting(oauth_dovecot, fake_pop3, oauth_config,
                                                    tokenserver, confdir, run_popfetchd):
    """A server at its connection limit may refuse the connection at once
    (RFC 1939 §4 lets a greeting be -ERR; RFC 3206 [SYS/TEMP]): exit 75,
    nothing sent, the next poll works."""
    pairs = messages(2, 6)
    server = m365(fake_pop3, oauth_dovecot, tokenserver, pairs)
    server.clear_faults()
    server.inject("GREETING", SendThenClose(b"-ERR [SYS/TEMP] Too many concurrent connections\r\n"))
    config = config_for(oauth_config, server, "m365")
    cd = confdir(config)
    res = receive_all(run_popfetchd, cd, "m365")
    assert res.returncode == EX_TEMPFAIL, res.stderr
    assert server.wait_idle() and server.commands(0) == []

    server.inject("GREETING", Reply(M365_GREETING), times=None)
    assert receive_all(run_popfetchd, cd, "m365").returncode == EX_OK
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "m365", served(pairs))
    assert tokenserver.token_count == 1


def test_m365_throttled_retr_leaves_that_message_for_the_next_poll(
        oauth_dovecot, fake_pop3, oauth_config, tokenserver, confdir, run_popfetchd):
    """Exchange Online throttles with "-ERR Server Unavailable. 21" (no
    response code). On a RETR: that message stays on the server, the others
    are saved and deleted, exit 75; the next poll takes it.

    https://github.com/simonrob/email-oauth2-proxy/issues/379"""
    pairs = messages(3, 7)
    server = m365(fake_pop3, oauth_dovecot, tokenserver, pairs)
    server.inject("RETR 2", Reply(M365_THROTTLED))
    config = config_for(oauth_config, server, "m365")
    cd = confdir(config)
    res = receive_all(run_popfetchd, cd, "m365")
    assert res.returncode == EX_TEMPFAIL, res.stderr
    assert "Server Unavailable. 21" in res.stderr
    assert server.uidls() == [pairs[1][0]]

    assert receive_all(run_popfetchd, cd, "m365").returncode == EX_OK
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "m365", served(pairs))
    assert server.remaining() == []


# --------------------------------------------------------------------------
# Gmail


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
def test_gmail_error_challenge_is_answered_and_the_token_refreshed(
        oauth_dovecot, fake_pop3, oauth_config, tokenserver, confdir, run_popfetchd, mechanism):
    """Gmail refuses an expired token with an error challenge, "+ " and
    base64 {"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"},
    and waits for the client's answer before its -ERR: an empty line for
    XOAUTH2, "AQ==" (%x01) for OAUTHBEARER. Then popfetchd fetches one new
    token and logs in again.

    https://developers.google.com/gmail/imap/xoauth2-protocol (error
    response; the client sends an empty response)
    https://www.rfc-editor.org/rfc/rfc7628#section-3.2.3 (OAUTHBEARER: %x01)
    https://github.com/mscdex/node-imap/issues/254 (the challenge Gmail sends)"""
    first = messages(1, 8)
    server = gmail(fake_pop3, oauth_dovecot, tokenserver, first)
    config = config_for(oauth_config, server, "gm", mechanism=mechanism)
    cd = confdir(config)
    assert receive_all(run_popfetchd, cd, "gm").returncode == EX_OK

    later = messages(2, 9)
    t1, t2 = poll_after_expiry(server, tokenserver, run_popfetchd, cd, "gm", later)
    payload = xoauth2 if mechanism == "XOAUTH2" else oauthbearer
    answer = "" if mechanism == "XOAUTH2" else "AQ=="
    assert auth_lines(server, 1) == [f"AUTH {mechanism}", payload(GMAIL_USER, t1), answer]
    assert server.sessions[1].sasl[0].error_answer == (b"" if answer == "" else b"\x01")
    assert auth_lines(server, 2) == [f"AUTH {mechanism}", payload(GMAIL_USER, t2)]
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "gm",
                         served(first + later))


def popped_on_quit(server):
    """Gmail's normal mode (CAPA EXPIRE 0): a message retrieved in a session
    that ends with QUIT is not listed again, deleted or not."""
    def hook(rec, line):
        if matches("QUIT", line) and server.die_on_quit:
            server.die_on_quit = False
            return Close()
        if matches("QUIT", line) and rec.authenticated and rec.maildrop:
            retrieved = {int(c.split()[1]) for c in rec.commands if matches("RETR", c)}
            gone = {rec.maildrop[n - 1][0] for n in retrieved if n <= len(rec.maildrop)}
            with server._lock:
                server.mailbox = [m for m in server.mailbox if m.uidl not in gone]
        return None
    return hook


def test_gmail_keep_mode_with_expire_0(fake_pop3, fake_config, confdir, run_popfetchd):
    """remove_after_read: false against Gmail: it hides what was retrieved
    once the session QUITs (EXPIRE 0, RFC 2449 §6.7), so there is nothing
    to keep; popfetchd saves each message once and its state follows the
    listing. A session that dies before QUIT leaves the messages listed
    (not "popped"): the next poll knows them by UIDL and saves nothing twice.

    https://support.google.com/mail/answer/7104828 (How does POP work in
    Gmail: popped messages; a session without QUIT pops nothing)
    https://www.rfc-editor.org/rfc/rfc2449#section-6.7 (EXPIRE 0)"""
    pairs = messages(3, 10)
    server = fake_pop3(pairs, user=GMAIL_USER, capabilities=GMAIL_CAPA, sasl=["PLAIN"])
    server.hook = popped_on_quit(server)
    server.die_on_quit = True
    server.inject("GREETING", Reply(GMAIL_GREETING), times=None)
    config = fake_config(server, id="gk", remove_after_read=False,
                         sasl_mechanisms=["USER"])
    cd = confdir(config)
    assert receive_all(run_popfetchd, cd, "gk").returncode in (EX_OK, EX_TEMPFAIL)
    assert len(server.remaining()) == 3, "nothing is popped without QUIT"

    assert receive_all(run_popfetchd, cd, "gk").returncode == EX_OK
    assert server.count("RETR", session=1) == 0, "RETR of a message saved before"
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "gk", served(pairs))
    # the QUIT of a session that retrieved nothing pops nothing
    assert len(server.remaining()) == 3

    new = messages(1, 11)
    server.add(new[0][1], uidl=new[0][0])
    assert receive_all(run_popfetchd, cd, "gk").returncode == EX_OK
    assert server.remaining() == [d for u, d in pairs], "the new message was popped"
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "gk",
                         served(pairs + new))
    assert not any(matches("DELE", c) for c in server.commands())


def test_gmail_recent_mode_user_is_sent_as_given(oauth_dovecot, fake_pop3, oauth_config,
                                                tokenserver, confdir, run_popfetchd):
    """Gmail's "recent mode": the user name "recent:USER" (XOAUTH2 user= or
    USER) lists the last 30 days of mail whether popped or not. popfetchd
    sends the user name as configured, prefix and all.

    https://support.google.com/mail/answer/7104828 (normal and recent mode)"""
    user = "recent:" + GMAIL_USER
    pairs = messages(2, 12)
    server = gmail(fake_pop3, oauth_dovecot, tokenserver, pairs)
    server.user = user
    config = config_for(oauth_config, server, "gr")
    res = receive_all(run_popfetchd, confdir(config), "gr")
    assert res.returncode == EX_OK, res.stderr
    [token] = tokenserver.issued
    assert auth_lines(server, 0) == ["AUTH XOAUTH2", xoauth2(user, token)]
    assert_saved_exactly(read_saved_messages(config["save_directory"]), "gr", served(pairs))


# --------------------------------------------------------------------------
# servers that close after N commands (Yahoo / GMX style)


def close_after(n):
    """The server answers n commands per connection and closes on the next."""
    def hook(rec, line):
        return Close() if len(rec.commands) > n else None
    return hook


@pytest.mark.parametrize("remove", [True, False], ids=["delete", "keep"])
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
def test_server_closing_after_n_commands_loses_nothing_and_gets_there(
        fake_pop3, fake_config, confdir, run_popfetchd, remove, pipelining):
    """Each connection ends after 9 commands (CAPA, USER, PASS, UIDL, LIST
    and 4 more): a poll saves what it can and ends with 75; the next polls
    go on from there. Nothing is lost, nothing saved twice, and the mailbox
    is drained (delete mode) or all saved (keep mode) in a bounded number of
    polls — the DELEs left over from a dropped session must not use up the
    next session's commands forever."""
    pairs = messages(12, 13, size=600)
    server = fake_pop3(pairs, hook=close_after(9), pipelining=pipelining)
    config = fake_config(server, id="nc", remove_after_read=remove, sasl_mechanisms=["USER"])
    cd = confdir(config)
    codes = []
    for _ in range(15):
        res = receive_all(run_popfetchd, cd, "nc")
        codes.append(res.returncode)
        assert res.returncode in (EX_OK, EX_TEMPFAIL), res.stderr
        saved = read_saved_messages(config["save_directory"])
        assert len({s.uidl for s in saved}) == len(saved), "saved twice"
        if len(saved) == len(pairs) and (not remove or server.remaining() == []):
            break
    saved = read_saved_messages(config["save_directory"])
    assert_saved_exactly(saved, "nc", served(pairs))
    assert_no_staging_leftovers(config["save_directory"])
    if remove:
        assert server.remaining() == [], f"not drained after {len(codes)} polls: {codes}"
    else:
        assert len(server.remaining()) == len(pairs)
    assert EX_TEMPFAIL in codes
    assert len(codes) <= 5, codes
