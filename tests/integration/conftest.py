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

import base64
import collections
import dataclasses
import json
import os
import re
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

RUN_TIMEOUT = 60
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                     "runtime error:", "WARNING: ThreadSanitizer", "ERROR: MemorySanitizer")
# inherited settings that would change where popfetchd keeps state or secrets
SCRUBBED_ENV = ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY", "CONFIGURATION_DIRECTORY",
                "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
FOLDER_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{12})(?:-[2-9]|-[1-9][0-9]+)?$")  # -N: a name taken already


# --------------------------------------------------------------------------
# YAML writing (the configurations are simple: mappings, lists, scalars)


_YAML_KEYWORDS = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~", ""}
_PLAIN_RE = re.compile(r"^[A-Za-z0-9_/][A-Za-z0-9_./@+=-]*$")
_NUMBER_RE = re.compile(r"^[-+]?(\d[\d_]*(\.\d*)?([eE][-+]?\d+)?|0[xXoObB][\da-fA-F_]+|\.\d+)$")


def yaml_scalar(value):
    """A scalar in YAML syntax: plain when unambiguous, else double-quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    text = str(value)
    if (_PLAIN_RE.match(text) and text.lower() not in _YAML_KEYWORDS
            and not _NUMBER_RE.match(text)):
        return text
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML string


def _yaml_lines(value, indent):
    pad = "  " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines += _yaml_lines(item, indent + 1)
            else:
                empty = "{}" if isinstance(item, dict) else "[]"
                lines.append(f"{pad}{key}: "
                             + (empty if isinstance(item, (dict, list)) else yaml_scalar(item)))
    else:
        for item in value:
            if isinstance(item, dict) and item:
                sub = _yaml_lines(item, indent + 1)
                lines.append(f"{pad}- " + sub[0].lstrip())
                lines += sub[1:]
            elif isinstance(item, list) and item:
                raise ValueError("nested lists are not supported")
            else:
                lines.append(f"{pad}- {yaml_scalar(item)}")
    return lines


def to_yaml(mapping):
    """A dict as a YAML document."""
    return "\n".join(_yaml_lines(mapping, 0)) + "\n"


# --------------------------------------------------------------------------
# configuration directories


@dataclasses.dataclass
class ConfDir:
    """A popfetchd configuration directory (what `-c DIR` reads)."""
    path: Path
    state_directory: Path
    files: dict = dataclasses.field(default_factory=dict)   # id -> Path

    @property
    def main(self):
        return self.path / "popfetchd.yaml"

    def __str__(self):
        return str(self.path)

    def __fspath__(self):
        return str(self.path)

    def write_main(self, settings):
        """Write popfetchd.yaml (state_directory is always set)."""
        data = {"state_directory": str(self.state_directory), **(settings or {})}
        return _write_secret(self.main, to_yaml(data))

    def add(self, config, filename=None):
        """Write conf.d/ID.yaml (or `filename`) from a dict; returns its path."""
        path = self.path / "conf.d" / (filename or f"{config['id']}.yaml")
        self.files[config.get("id", path.stem)] = path
        return _write_secret(path, to_yaml(config))

    def write_raw(self, filename, text, mode=0o600):
        """Write any file under conf.d/ (for invalid YAML and the like)."""
        path = self.path / "conf.d" / filename
        path.write_text(text)
        path.chmod(mode)
        return path


def _write_secret(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------
# running popfetchd


class Result(collections.namedtuple("Result", "returncode stdout stderr")):
    """(returncode, stdout, stderr) of one popfetchd run; also .cmd, .json()."""

    def json(self):
        """stdout parsed as exactly one JSON object."""
        try:
            value = json.loads(self.stdout)
        except ValueError as e:
            pytest.fail(f"stdout is not one JSON object ({e}):\n{self.stdout}\nstderr:\n{self.stderr}")
        assert isinstance(value, dict), f"stdout JSON is not an object: {self.stdout}"
        return value

    @property
    def lines(self):
        return [l for l in self.stdout.splitlines() if l.strip()]

    def describe(self):
        return (f"$ {' '.join(map(str, getattr(self, 'cmd', [])))}\nexit {self.returncode}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


def _popfetchd_env(extra):
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.update(extra or {})
    return env


def _check_sanitizers(result):
    for marker in SANITIZER_MARKERS:
        if marker in result.stderr:
            pytest.fail(f"sanitizer report ({marker}):\n{result.describe()}", pytrace=False)


# --------------------------------------------------------------------------
# saved messages


@dataclasses.dataclass
class SavedMessage:
    """One message folder in a save directory."""
    path: Path
    received: str          # the YYYYMMDDTHHMMSSZ part of the name
    hash12: str            # the hash part of the name
    eml: bytes             # message.eml (None if absent)
    meta: dict             # meta.json (None if absent)

    @property
    def uidl(self):
        return self.meta.get("uidl") if self.meta else None


def read_saved_messages(save_dir):
    """Every message folder in save_dir (excluding .tmp), sorted by name.
    A folder whose name does not have the contract's form fails the test."""
    save_dir = Path(save_dir)
    if not save_dir.exists():
        return []
    out = []
    for entry in sorted(save_dir.iterdir()):
        if entry.name == ".tmp":
            continue
        m = FOLDER_RE.match(entry.name)
        assert m and entry.is_dir(), f"unexpected entry in save_directory: {entry}"
        eml = (entry / "message.eml").read_bytes() if (entry / "message.eml").exists() else None
        meta = json.loads((entry / "meta.json").read_text()) if (entry / "meta.json").exists() else None
        out.append(SavedMessage(entry, m.group(1), m.group(2), eml, meta))
    return out


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


def _config(base, overrides):
    """base updated with overrides; a value of None removes the key."""
    cfg = dict(base)
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


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
        return _config(base, overrides)
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
        return _config(base, overrides)
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
# secrets must never be printed


SECRET_MIN_LEN = 8        # shorter values are not scanned (too many false alarms)
SECRET_PIECE_LEN = 12     # a secret of 24+ characters: no piece this long may appear


def _aligned_base64(secret):
    """How `secret` shows inside any longer base64 text: for each of the three
    alignments, the encoding of its bytes from offset k cut to whole 3-byte
    groups (characters that do not depend on the neighbouring bytes)."""
    raw = secret.encode()
    forms = []
    for k in range(3):
        body = raw[k:]
        body = body[:len(body) // 3 * 3]
        if len(body) >= 9:
            forms.append(base64.b64encode(body).decode())
    return forms


class SecretRegistry:
    """Secrets of one test and the output of every program run in it.

    add(*secrets) registers values; add_source(fn) a callable returning
    more (evaluated at check time: tokens issued later count too);
    record(label, text) adds output. leaks() -> [(masked secret, label,
    how)]; check() fails the test if there is any. A secret of 24 or more
    characters also leaks through any 12-character piece of it (a log line
    that prints "the first few" characters), and through its base64 (an
    XOAUTH2 line in a debug log).
    """

    def __init__(self):
        self._secrets, self._sources, self.outputs = set(), [], []
        self._reported = set()

    def add(self, *secrets):
        for value in secrets:
            if value:
                self._secrets.add(str(value))
        return self

    def add_source(self, fn):
        self._sources.append(fn)
        return self

    def record(self, label, text):
        if text:
            self.outputs.append((label, text))

    def secrets(self):
        found = set(self._secrets)
        for fn in self._sources:
            found.update(str(v) for v in fn() if v)
        return sorted(v for v in found if len(v) >= SECRET_MIN_LEN)

    @staticmethod
    def mask(secret):
        return f"{secret[:4]}...({len(secret)} characters)"

    def leaks(self, outputs=None):
        found = []
        for secret in self.secrets():
            needles = [(secret, "in full")]
            if len(secret) >= 2 * SECRET_PIECE_LEN:
                needles += [(secret[i:i + SECRET_PIECE_LEN], f"a piece at offset {i}")
                            for i in range(len(secret) - SECRET_PIECE_LEN + 1)]
            needles += [(form, "as base64") for form in _aligned_base64(secret)]
            for label, text in (outputs if outputs is not None else self.outputs):
                for needle, how in needles:
                    if needle in text:
                        found.append((self.mask(secret), label, how))
                        break
        return found

    def check(self):
        """Fail if a secret is in the output (each leak is reported once)."""
        leaks = [leak for leak in self.leaks() if leak not in self._reported]
        self._reported.update(leaks)
        if leaks:
            pytest.fail("secrets in popfetchd's output:\n" + "\n".join(
                f"  {secret} {how} in: {label}" for secret, label, how in leaks), pytrace=False)


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
            _write_secret(rt_file, tokenserver.add_refresh_token(client) + "\n")
            o["refresh_token_file"] = str(rt_file)
            o["scope"] = None
        o.update(oauth2 or {})
        base = {"id": id, "server": oauth_dovecot.host, "port": oauth_dovecot.pop3s_port,
                "tls": "implicit", "tls_ca_file": oauth_dovecot.ca_file,
                "user": mailbox.user, "auth": "oauth2",
                "oauth2": {k: v for k, v in o.items() if v is not None},
                "save_directory": str(save), "remove_after_read": True,
                "timeouts": {"connect": "10s", "command": "20s"}}
        config = OAuthConfig(_config(base, overrides))
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
