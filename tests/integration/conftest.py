"""Fixtures for popfetchd's integration tests.

Run as root on Debian 12:  cd ROOT && /usr/bin/python3 -m pytest -q tests/integration

Environment:
    POPFETCHD           the binary to test (default ROOT/build/daemon/popfetchd)
    ASAN_OPTIONS, UBSAN_OPTIONS, LSAN_OPTIONS
                        passed on to popfetchd; a sanitizer report on its
                        stderr fails the test whatever the exit code
    PFD_KEEP_DOVECOT=1  keep the session's Dovecot directory (/tmp/pfd-*)

Fixtures:
    root                     Path of the repository
    popfetchd_bin            str, path of the binary (fails clearly if missing)
    dovecot                  session-wide tools/dovecot.py Dovecot (started once)
    mailbox                  a fresh, empty Dovecot user per test (dovecot.Mailbox:
                             .user .password .maildir .deliver(*bytes) .count()
                             .messages() .reset())
    confdir(*configs, daemon=None) -> ConfDir   writes popfetchd.yaml + conf.d/ID.yaml
                             (as JSON, which is YAML; mode 600)
    dovecot_config(mailbox, id="dv", **keys) -> dict   a configuration for the fixture
    fake_pop3(messages=(), **kw) -> FakePOP3            a started fake server
    fake_config(server, id="fake", **keys) -> dict      a configuration for it
    run_popfetchd(args, confdir=None, timeout=60, env=None) -> Result(returncode, stdout, stderr)
    read_saved(save_dir) -> [SavedMessage]  the message folders in a save directory

OAuth2 (tools/tokenserver.py, DESIGN.md §1 oauth2.*):
    tokenserver              the session's token + introspection endpoint, reset
                             before and after each test (tokenserver.TokenServer:
                             .add_client() .refuse() .fail() .stall() .down() ...)
    oauth_dovecot            a second session-wide Dovecot whose oauth2 passdb asks
                             the tokenserver (XOAUTH2, OAUTHBEARER; passwords work too)
    oauth_mailbox            a fresh user on oauth_dovecot per test
    oauth_config(mailbox, id="oa", mechanism="XOAUTH2", grant="client_credentials",
                 client=None, public=False, oauth2={...}, **keys) -> OAuthConfig (a dict; .client,
                 .refresh_token_file)   pop3s + oauth2 against oauth_dovecot
    token_cache_path(confdir, id) -> Path   state_directory/ID/oauth2-token
    secret_registry          (autouse) .add(*secrets) .add_source(fn) .record(label, text);
                             every popfetchd run's stdout and stderr is recorded, and
                             at teardown no registered secret (nor a 12-character piece
                             of it, nor its base64) may appear in any of them. The
                             tokenserver registers every client secret, refresh token
                             and access token it knows.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "tools"))

import dovecot as dovecot_tool  # noqa: E402  (tests/tools)
import fakepop3  # noqa: E402
import tokenserver as tokenserver_tool  # noqa: E402  (tests/tools)

# the helpers live in modules of their own; tests import them from here
from pfdconfig import ConfDir, config_with, to_yaml, write_secret  # noqa: E402,F401
from pfdrun import (RUN_TIMEOUT, SANITIZER_MARKERS, SCRUBBED_ENV,  # noqa: E402,F401
                    Result, _check_sanitizers, _popfetchd_env)
from pfdsaved import FOLDER_RE, SavedMessage, read_saved_messages  # noqa: E402,F401
from pfdsecrets import SecretRegistry  # noqa: E402


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="session")
def popfetchd_bin():
    path = Path(os.environ.get("POPFETCHD") or ROOT / "build" / "daemon" / "popfetchd")
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"popfetchd binary not found at {path}: build it "
                    f"(meson setup build && ninja -C build) or set POPFETCHD=/path/to/popfetchd",
                    pytrace=False)
    return str(path)


@pytest.fixture(scope="session")
def dovecot():
    """A private Dovecot for the whole session, in a short /tmp/pfd-XXXX."""
    tmp = tempfile.mkdtemp(prefix="pfd-", dir="/tmp")
    server = dovecot_tool.Dovecot(tmp, users=2, pool=1000)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if not os.environ.get("PFD_KEEP_DOVECOT"):
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def mailbox(dovecot):
    """A new Dovecot user with an empty Maildir: tests never see each other's mail."""
    box = dovecot.mailbox(dovecot.add_user())
    yield box
    box.reset()


@pytest.fixture
def confdir(tmp_path):
    """Factory: confdir(*configs, daemon=None) -> ConfDir in a new directory.

    configs: dicts written to conf.d/ID.yaml; daemon: extra popfetchd.yaml
    settings (state_directory is set to a fresh directory). Mode 600.
    """
    made = []

    def make(*configs, daemon=None):
        n = len(made) + 1
        cd = ConfDir(tmp_path / f"conf{n}", tmp_path / f"state{n}")
        (cd.path / "conf.d").mkdir(parents=True)
        cd.state_directory.mkdir()
        cd.write_main(daemon)
        for config in configs:
            cd.add(config)
        made.append(cd)
        return cd
    return make


@pytest.fixture
def dovecot_config(dovecot, tmp_path):
    """Factory: dovecot_config(mailbox, id="dv", **keys) -> dict.

    A plain-POP3 (tls: none) configuration for the Dovecot fixture, with a
    fresh save_directory (created) under tmp_path; keys override (None drops).
    """
    def make(mailbox, id="dv", **overrides):
        save = tmp_path / f"save-{id}"
        save.mkdir(exist_ok=True)
        base = {"id": id, "server": dovecot.host, "port": dovecot.pop3_port, "tls": "none",
                "user": mailbox.user, "password": mailbox.password,
                "save_directory": str(save), "remove_after_read": True,
                "timeouts": {"connect": "10s", "command": "20s"}}
        return config_with(base, overrides)
    return make


@pytest.fixture
def fake_pop3():
    """Factory: fake_pop3(messages=(), **FakePOP3 kwargs) -> started FakePOP3."""
    servers = []

    def make(messages=(), **kwargs):
        server = fakepop3.FakePOP3(messages, **kwargs).start()
        servers.append(server)
        return server
    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def fake_config(tmp_path):
    """Factory: fake_config(server, id="fake", **keys) -> dict for a FakePOP3
    (tls: none, short timeouts: connect 5s, command 5s)."""
    def make(server, id="fake", **overrides):
        save = tmp_path / f"save-{id}"
        save.mkdir(exist_ok=True)
        base = {"id": id, "server": server.host, "port": server.port, "tls": "none",
                "user": server.user, "password": server.password,
                "save_directory": str(save), "remove_after_read": True,
                "timeouts": {"connect": "5s", "command": "5s"}}
        return config_with(base, overrides)
    return make


@pytest.fixture
def run_popfetchd(popfetchd_bin, secret_registry):
    """Factory: run_popfetchd(args, confdir=None, timeout=60, env=None) -> Result.

    With confdir, "-c DIR" goes first; otherwise args are passed as given.
    Fails the test on a timeout or a sanitizer report. Every run's output
    goes to the secret_registry (scanned at teardown).
    """
    def run(args, confdir=None, timeout=RUN_TIMEOUT, env=None):
        cmd = [popfetchd_bin] + (["-c", str(confdir)] if confdir is not None else [])
        cmd += [str(a) for a in args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=_popfetchd_env(env), stdin=subprocess.DEVNULL,
                                  errors="replace")
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            secret_registry.record(" ".join(cmd) + " (timed out)", (out or "") + (err or ""))
            pytest.fail(f"popfetchd did not finish within {timeout} s: {' '.join(cmd)}\n"
                        f"--- stdout\n{out or ''}--- stderr\n{err or ''}", pytrace=False)
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        result.cmd = cmd
        secret_registry.record(" ".join(cmd) + " (stdout)", proc.stdout)
        secret_registry.record(" ".join(cmd) + " (stderr)", proc.stderr)
        print(result.describe())  # shown by pytest when the test fails
        _check_sanitizers(result)
        return result
    return run


@pytest.fixture
def read_saved():
    """read_saved(save_dir) -> [SavedMessage], the folders in save_dir."""
    return read_saved_messages


# --------------------------------------------------------------------------
# secrets must never be printed (pfdsecrets.py)


@pytest.fixture(autouse=True)
def secret_registry():
    """The test's SecretRegistry; checked when the test ends."""
    registry = SecretRegistry()
    yield registry
    registry.check()


# --------------------------------------------------------------------------
# OAuth2: a token endpoint and a Dovecot that asks it


@pytest.fixture(scope="session")
def _oauth_dir():
    """A short directory for the OAuth2 Dovecot; its tls/ holds the test PKI
    that the token server uses too."""
    tmp = tempfile.mkdtemp(prefix="pfd-o", dir="/tmp")
    os.chmod(tmp, 0o755)
    os.makedirs(os.path.join(tmp, "tls"), exist_ok=True)
    dovecot_tool.make_test_pki(os.path.join(tmp, "tls"))
    yield tmp
    if not os.environ.get("PFD_KEEP_DOVECOT"):
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def tokenserver_session(_oauth_dir):
    """The session's TokenServer (use `tokenserver`: it resets between tests)."""
    server = tokenserver_tool.TokenServer.for_tls_dir(os.path.join(_oauth_dir, "tls")).start()
    yield server
    server.stop()


@pytest.fixture
def tokenserver(tokenserver_session, secret_registry):
    """The token endpoint, fresh for this test: no clients, no tokens, no
    fault, token port up. Everything it knows or issues is a secret."""
    tokenserver_session.reset()
    secret_registry.add_source(tokenserver_session.secrets)
    yield tokenserver_session
    # release stalled requests and bring the port up for the next test; the
    # secrets are read before (the registry checks after this teardown)
    known = tokenserver_session.secrets()
    secret_registry.add(*known)
    tokenserver_session.reset()


@pytest.fixture(scope="session")
def oauth_dovecot(_oauth_dir, tokenserver_session):
    """A private Dovecot with both passdbs: passwd-file (passwords) and
    oauth2 (XOAUTH2, OAUTHBEARER) asking the token server's introspection
    endpoint."""
    server = dovecot_tool.Dovecot(_oauth_dir, users=1, pool=300,
                                  oauth2_introspection_url=tokenserver_session.introspect_url)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def oauth_mailbox(oauth_dovecot):
    """A new user with an empty Maildir on the OAuth2 Dovecot."""
    box = oauth_dovecot.mailbox(oauth_dovecot.add_user())
    yield box
    box.reset()


class OAuthConfig(dict):
    """A configuration dict, plus what the test needs to know about it:
    .client (tokenserver.Client) and .refresh_token_file (Path or None)."""
    client = None
    refresh_token_file = None


OAUTH_SCOPE = "https://outlook.office365.com/.default"


@pytest.fixture
def oauth_config(oauth_dovecot, tokenserver, tmp_path, secret_registry):
    """Factory: oauth_config(mailbox, id="oa", mechanism="XOAUTH2",
    grant="client_credentials", client=None, public=False, oauth2=None,
    **keys) -> OAuthConfig.

    pop3s (tls: implicit, the test CA) with auth: oauth2 against
    oauth_dovecot. Without `client`, one is registered on the token server
    for mailbox.user (a public client, without secret, if `public`). For
    grant refresh_token a fresh refresh token is written to
    tmp_path/refresh-ID/refresh-token (mode 600, its own directory).
    `oauth2` entries override the oauth2 mapping (None drops a key); other
    keys override the top level.
    """
    def make(mailbox, id="oa", mechanism="XOAUTH2", grant="client_credentials", client=None,
             public=False, oauth2=None, **overrides):
        if client is None:
            client = tokenserver.add_client(client_secret=None if public else "",
                                            username=mailbox.user)
        save = tmp_path / f"save-{id}"
        save.mkdir(exist_ok=True)
        o = {"token_endpoint": tokenserver.token_url, "client_id": client.client_id,
             "client_secret": client.client_secret, "scope": OAUTH_SCOPE, "grant": grant,
             "mechanism": mechanism, "ca_file": tokenserver.ca_file}
        rt_file = None
        if grant == "refresh_token":
            rt_dir = tmp_path / f"refresh-{id}"
            rt_dir.mkdir(exist_ok=True)
            rt_file = rt_dir / "refresh-token"
            write_secret(rt_file, tokenserver.add_refresh_token(client) + "\n")
            o["refresh_token_file"] = str(rt_file)
            o["scope"] = None
        o.update(oauth2 or {})
        base = {"id": id, "server": oauth_dovecot.host, "port": oauth_dovecot.pop3s_port,
                "tls": "implicit", "tls_ca_file": oauth_dovecot.ca_file,
                "user": mailbox.user, "auth": "oauth2",
                "oauth2": {k: v for k, v in o.items() if v is not None},
                "save_directory": str(save), "remove_after_read": True,
                "timeouts": {"connect": "10s", "command": "20s"}}
        config = OAuthConfig(config_with(base, overrides))
        config.client, config.refresh_token_file = client, rt_file
        secret_registry.add(client.client_secret)
        return config
    return make


def token_cache_path(confdir, config_id):
    """Where popfetchd caches a configuration's token (DESIGN.md §3)."""
    return Path(confdir.state_directory) / config_id / "oauth2-token"


@pytest.fixture(name="token_cache_path")
def _token_cache_path_fixture():
    """token_cache_path(confdir, id) -> Path of state_directory/ID/oauth2-token."""
    return token_cache_path
