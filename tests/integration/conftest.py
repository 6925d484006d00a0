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
"""

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
def run_popfetchd(popfetchd_bin):
    """Factory: run_popfetchd(args, confdir=None, timeout=60, env=None) -> Result.

    With confdir, "-c DIR" goes first; otherwise args are passed as given.
    Fails the test on a timeout or a sanitizer report.
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
            pytest.fail(f"popfetchd did not finish within {timeout} s: {' '.join(cmd)}\n"
                        f"--- stdout\n{out or ''}--- stderr\n{err or ''}", pytrace=False)
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        result.cmd = cmd
        print(result.describe())  # shown by pytest when the test fails
        _check_sanitizers(result)
        return result
    return run


@pytest.fixture
def read_saved():
    """read_saved(save_dir) -> [SavedMessage], the folders in save_dir."""
    return read_saved_messages
