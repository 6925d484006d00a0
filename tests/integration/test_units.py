"""The systemd side (DESIGN.md §5): units/popfetchd.service.in is configured by
meson into popfetchd.service and popfetchd@.service, installed with the
sysusers.d entry units/popfetchd.sysusers beside the conf.d examples.

The units are configured by `meson setup` in a fresh build directory (no
compiler runs; /work/main/build is left alone) and installed from it with
`meson install --tags systemd,config --destdir`. For `systemd-analyze verify`,
which checks that ExecStart= is executable, ExecStart= is pointed at the
binary under test (POPFETCHD). verify does not look the popfetchd user up
(systemd 252 says nothing of a missing User=); the sysusers test checks that
the entry creates exactly the user and group the units name.

systemd-analyze verify exits 0 even for an unknown key or a bad value (it
logs "Unknown key ..., ignoring"): a unit passes here only when verify also
prints nothing, and test_verify_rejects_broken_unit proves that a typo fails.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("popfetchd.service", "popfetchd@.service")
# every mailbox once (receive-all --all), by a timer instead of the daemon
ONCE = ("popfetchd-once.service", "popfetchd-once.timer")

# `systemd-analyze security --offline=true` on systemd 252 (Debian 12)
# measured 1.1 for both units; a higher level means a hardening line was lost.
EXPOSURE_MAX = 1.1
# ... and these are the only checks it may flag: what a network client
# that writes files cannot avoid (the reasons are in the README).
ACCEPTED_EXPOSURES = {
    "PrivateNetwork=",                          # it talks to POP3 servers
    "RestrictAddressFamilies=~AF_(INET|INET6)",  # ... over inet sockets
    "IPAddressDeny=",                           # to any address the admin configures
    "RestrictAddressFamilies=~AF_UNIX",         # sd_notify
    "RootDirectory=/RootImage=",                # the host's libraries and CA store
    "DeviceAllow=",                             # char-rtc:r, implied by ProtectClock=
    "UMask=",                                   # 0027: saved folders group-readable
}

# the drop-in the README documents
DROPIN = """\
[Service]
ReadWritePaths=/srv/mail
LoadCredential=invoices-password:/etc/credstore/invoices-password
LoadCredentialEncrypted=m365-secret:/etc/credstore.encrypted/m365-secret
"""

ENV = dict(os.environ, SYSTEMD_PAGER="cat", SYSTEMD_COLORS="0", LC_ALL="C.UTF-8")


def tool(name):
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.fail(f"{name} not found: run scripts/install-deps (Debian package "
                    f"{'systemd' if name.startswith('systemd') else name})", pytrace=False)
    return path


def run(cmd, input=None):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=ENV,
                          errors="replace", timeout=120, input=input,
                          stdin=subprocess.DEVNULL if input is None else None)


def meson_setup(builddir, *options):
    r = run([tool("meson"), "setup", builddir, ROOT, *options])
    assert r.returncode == 0, f"meson setup failed:\n{r.stdout}\n{r.stderr}"
    return r


def meson_install(builddir, destdir):
    # only what the units need: no compiler, no binary (tag runtime)
    r = run([tool("meson"), "install", "-C", builddir, "--no-rebuild",
             "--tags", "systemd,config", "--destdir", destdir])
    assert r.returncode == 0, f"meson install failed:\n{r.stdout}\n{r.stderr}"
    return r


def pkgconfig_dir(variable, fallback):
    """Where meson installs to by default: pkg-config systemd's variable, else
    PREFIX/... (here PREFIX is /usr)."""
    pc = shutil.which("pkg-config")
    if pc:
        r = run([pc, "--variable=" + variable, "systemd"])
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    return fallback


def unit_settings(path):
    """[(section, key, value)] of a unit file, in order."""
    out, section = [], None
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def setting(path, key):
    values = [v for _, k, v in unit_settings(path) if k == key]
    assert len(values) == 1, f"{path}: {key}= set {len(values)} times"
    return values[0]


def verify_problems(unit):
    """What `systemd-analyze verify` says about a unit file: [] when clean."""
    # --man=no: Documentation= names man pages that are not installed where
    # man(1) looks (test_package.py verifies the packaged units with them)
    r = run([tool("systemd-analyze"), "verify", "--man=no", unit])
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    if r.returncode != 0 and not lines:
        lines = [f"exit code {r.returncode}"]
    return lines


def exposure(unit):
    """(overall level, {check name: exposure} of every check not passed)."""
    analyze = tool("systemd-analyze")
    r = run([analyze, "security", "--offline=true", unit])
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, f"no overall exposure level in:\n{r.stdout}\n{r.stderr}"
    j = run([analyze, "security", "--offline=true", "--json=short", unit])
    assert j.returncode == 0, j.stderr
    failed = {c["name"]: float(c["exposure"]) for c in json.loads(j.stdout)
              if not c["set"] and c["exposure"] is not None and float(c["exposure"]) > 0}
    return float(m.group(1)), failed


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """meson setup --prefix=/usr in a fresh directory, then meson install
    --destdir: the DESTDIR (Path)."""
    tmp = tmp_path_factory.mktemp("units")
    meson_setup(tmp / "build", "--prefix=/usr")
    meson_install(tmp / "build", tmp / "dest")
    return tmp / "dest"


@pytest.fixture(scope="module")
def unitdir(installed):
    return installed / pkgconfig_dir("systemdsystemunitdir", "/usr/lib/systemd/system").lstrip("/")


@pytest.fixture
def units(unitdir, popfetchd_bin, tmp_path):
    """The installed units, copied to a directory of their own with ExecStart=
    running the binary under test: {name: Path}."""
    d = tmp_path / "units"
    d.mkdir()
    out = {}
    for name in UNITS + ONCE:
        text = (unitdir / name).read_text()
        text, n = re.subn(r"(?m)^ExecStart=/usr/sbin/popfetchd ",
                          f"ExecStart={popfetchd_bin} ", text)
        assert n == (0 if name.endswith(".timer") else 1), \
            f"{name}: no ExecStart=/usr/sbin/popfetchd"
        (d / name).write_text(text)
        out[name] = d / name
    return out


# --------------------------------------------------------------------------
# installation


def test_meson_install_puts_everything_in_place(installed, unitdir):
    sysusers = installed / pkgconfig_dir("sysusersdir", "/usr/lib/sysusers.d").lstrip("/")
    for name in UNITS + ONCE:
        assert (unitdir / name).is_file(), f"{name} not installed in {unitdir}"
    assert (sysusers / "popfetchd.conf").read_text() == \
        (ROOT / "units" / "popfetchd.sysusers").read_text()
    for example in ("conf.d/invoices.yaml.example", "conf.d/m365-orders.yaml.example",
                    "conf.d/archive-keep.yaml.example", "popfetchd.yaml.example"):
        assert (installed / "etc/popfetchd" / example).is_file(), f"{example} not installed"
    # with --prefix=/usr the units run /usr/sbin/popfetchd on /etc/popfetchd
    assert setting(unitdir / "popfetchd.service", "ExecStart") == \
        "/usr/sbin/popfetchd -c /etc/popfetchd run"
    assert setting(unitdir / "popfetchd@.service", "ExecStart") == \
        "/usr/sbin/popfetchd -c /etc/popfetchd/%i run"
    assert setting(unitdir / "popfetchd-once.service", "ExecStart") == \
        "/usr/sbin/popfetchd -c /etc/popfetchd receive-all --all"
    for name in UNITS + ONCE:
        left = re.findall(r"@[A-Za-z_][A-Za-z0-9_]*@", (unitdir / name).read_text())
        assert not left, f"{name}: unsubstituted {left}"


def test_meson_options_choose_the_directories(tmp_path):
    meson_setup(tmp_path / "build", "--prefix=/opt/pfd", "--sysconfdir=/etc",
                "-Dsystemdsystemunitdir=/opt/pfd/units", "-Dsysusersdir=/opt/pfd/sysusers")
    meson_install(tmp_path / "build", tmp_path / "dest")
    dest = tmp_path / "dest"
    assert sorted(p.name for p in (dest / "opt/pfd/units").iterdir()) == sorted(UNITS + ONCE)
    assert (dest / "opt/pfd/sysusers/popfetchd.conf").is_file()
    assert setting(dest / "opt/pfd/units/popfetchd.service", "ExecStart") == \
        "/opt/pfd/sbin/popfetchd -c /etc/popfetchd run"


def test_units_differ_only_by_instance(unitdir):
    """One template: the instance unit is the plain one with its own
    configuration and state directories."""
    plain = unit_settings(unitdir / "popfetchd.service")
    inst = unit_settings(unitdir / "popfetchd@.service")
    assert [(s, k) for s, k, _ in plain] == [(s, k) for s, k, _ in inst]
    differ = [(k, a, b) for (_, k, a), (_, _, b) in zip(plain, inst) if a != b]
    assert differ == [
        ("Description", "POP3 fetch daemon", "POP3 fetch daemon (%i)"),
        ("ConditionPathExistsGlob", "|/etc/popfetchd/conf.d/*.yaml",
         "|/etc/popfetchd/%i/conf.d/*.yaml"),
        ("ConditionPathExistsGlob", "|/etc/popfetchd/conf.d/*.yml",
         "|/etc/popfetchd/%i/conf.d/*.yml"),
        ("ExecStart", "/usr/sbin/popfetchd -c /etc/popfetchd run",
         "/usr/sbin/popfetchd -c /etc/popfetchd/%i run"),
        ("StateDirectory", "popfetchd", "popfetchd/%i"),
        ("ConfigurationDirectory", "popfetchd", "popfetchd/%i"),
    ]


@pytest.mark.parametrize("name", UNITS)
def test_unit_waits_for_a_configuration(unitdir, name, tmp_path):
    """The daemon is not started (systemd skips it) while its conf.d has no
    *.yaml or *.yml: the Debian package enables it at install time, before
    the admin has written one. `systemd-analyze condition` evaluates the
    unit's conditions, pointed at a directory of the test's."""
    confdir = tmp_path / "etc-popfetchd" / ("inst" if "@" in name else "")
    conditions = [f"{k}={v}" for s, k, v in unit_settings(unitdir / name)
                  if s == "Unit" and k.startswith("Condition")]
    assert conditions, f"{name}: no Condition*= line: it starts without a configuration"
    conditions = [c.replace("/etc/popfetchd/%i", str(confdir))
                  .replace("/etc/popfetchd", str(confdir)) for c in conditions]

    def starts():
        r = run([tool("systemd-analyze"), "condition", *conditions])
        assert r.returncode in (0, 1), r.stdout + r.stderr
        return r.returncode == 0

    assert not starts(), "no configuration directory"
    (confdir / "conf.d").mkdir(parents=True)
    (confdir / "popfetchd.yaml").write_text("log_level: info\n")
    (confdir / "conf.d" / "invoices.yaml.example").write_text("")
    (confdir / "conf.d" / "notes.txt").write_text("")
    assert not starts(), "examples and daemon settings are no configuration"
    for first in ("a.yml", "b.yaml"):
        (confdir / "conf.d" / first).write_text("")
        assert starts(), f"conf.d/{first} is a configuration"
        (confdir / "conf.d" / first).unlink()


@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_the_daemon_as_designed(unitdir, name):
    unit = unitdir / name
    expect = {
        "Type": "notify",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "60s",
        "Restart": "on-failure",
        "TimeoutStopSec": "90s",
        "LimitCORE": "0",
        "User": "popfetchd",
        "Group": "popfetchd",
        "StateDirectoryMode": "0750",
        "UMask": "0027",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    for key, value in expect.items():
        assert setting(unit, key) == value, f"{name}: {key}="
    # the secrets and save directories are the admin's: commented examples only
    text = unit.read_text()
    assert re.search(r"(?m)^#LoadCredential=\S+:\S+", text)
    assert re.search(r"(?m)^#ReadWritePaths=/", text)
    assert not re.search(r"(?m)^(LoadCredential|ReadWritePaths)", text)


def test_once_service_is_the_daemon_run_once(unitdir):
    """popfetchd-once.service polls every mailbox once, as the daemon's user,
    on the daemon's state, in the daemon's sandbox; the timer starts it."""
    once, daemon = unitdir / "popfetchd-once.service", unitdir / "popfetchd.service"
    for key, value in {"Type": "oneshot", "User": "popfetchd", "Group": "popfetchd",
                       "StateDirectory": "popfetchd", "StateDirectoryMode": "0750",
                       "ConfigurationDirectory": "popfetchd", "LimitCORE": "0"}.items():
        assert setting(once, key) == value, key
    sandbox = [(s, k, v) for s, k, v in unit_settings(daemon)
               if s == "Service" and k not in ("User", "Group")]
    sandbox = sandbox[[k for _, k, _ in sandbox].index("UMask"):]
    assert sandbox and all(x in unit_settings(once) for x in sandbox), \
        "the sandbox of popfetchd.service, every line of it"
    timer = unitdir / "popfetchd-once.timer"
    assert setting(timer, "WantedBy") == "timers.target"
    assert not any(s == "Install" for s, _, _ in unit_settings(once)), "the timer starts it"
    assert setting(timer, "OnUnitInactiveSec"), "no run overlaps the next"


@pytest.mark.parametrize("name", UNITS + ONCE[:1])
def test_unit_opens_enough_files_for_the_most_sessions(unitdir, name):
    """The unit's LimitNOFILE= fits the largest max_sessions (10000) by the
    daemon's own count (runtime.h; test_fd_limit shows the count at work): the
    limit never refuses a valid configuration. (A hard limit above this
    machine's cannot be set here to run `check` under it.)"""
    header = (ROOT / "include" / "popfetchd" / "runtime.h").read_text()
    per = int(re.search(r"#define RUNTIME_FDS_PER_SESSION\s+(\d+)", header).group(1))
    reserved = int(re.search(r"#define RUNTIME_FDS_RESERVED\s+(\d+)", header).group(1))
    most = int(re.search(r"sessions_num = \{parse_uint, 1, (\d+),",
                         (ROOT / "daemon" / "config.c").read_text()).group(1))
    assert most == 10000
    assert int(setting(unitdir / name, "LimitNOFILE")) >= most * per + reserved


# --------------------------------------------------------------------------
# systemd-analyze verify


@pytest.mark.parametrize("name", UNITS + ONCE)
def test_verify_passes(units, name):
    problems = verify_problems(units[name])
    assert not problems, "\n".join(problems)


BROKEN = {
    "typo in a key": ("ProtectSystem=strict", "ProtectSytem=strict"),
    "bad value": ("Type=notify", "Type=notfy"),
    "bad section": ("[Service]", "[Servcie]"),
}


@pytest.mark.parametrize("name", UNITS)
@pytest.mark.parametrize("how", sorted(BROKEN))
def test_verify_rejects_broken_unit(units, name, how):
    good, bad = BROKEN[how]
    path = units[name]
    text = path.read_text()
    assert f"\n{good}\n" in text
    path.write_text(text.replace(f"\n{good}\n", f"\n{bad}\n"))
    problems = verify_problems(path)
    assert problems, f"verify accepted a unit with a {how}: {bad}"
    assert any(path.name in line for line in problems), problems


def test_verify_rejects_missing_binary(units, tmp_path):
    path = units["popfetchd.service"]
    missing = tmp_path / "no-such-popfetchd"
    path.write_text(re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={missing}", path.read_text()))
    assert any("not executable" in line for line in verify_problems(path))


@pytest.mark.parametrize("name", UNITS)
def test_verify_passes_with_documented_dropin(units, name):
    """The README's drop-in (save directory, credentials) is valid; a typo in
    a drop-in is caught too."""
    dropin = units[name].parent / f"{name}.d"
    dropin.mkdir()
    (dropin / "override.conf").write_text(DROPIN)
    problems = verify_problems(units[name])
    assert not problems, "\n".join(problems)
    (dropin / "override.conf").write_text(DROPIN.replace("ReadWritePaths=", "ReadWritePath="))
    assert any("override.conf" in line for line in verify_problems(units[name]))


# --------------------------------------------------------------------------
# systemd-analyze security


@pytest.mark.parametrize("name", UNITS + ONCE[:1])
def test_security_exposure(units, name):
    level, failed = exposure(units[name])
    assert level <= EXPOSURE_MAX, f"{name}: exposure {level} > {EXPOSURE_MAX}: {failed}"
    assert set(failed) <= ACCEPTED_EXPOSURES, \
        f"{name}: new exposures {sorted(set(failed) - ACCEPTED_EXPOSURES)}"
    r = run([tool("systemd-analyze"), "security", "--offline=true",
             f"--threshold={round(EXPOSURE_MAX * 10)}", units[name]])
    assert r.returncode == 0, r.stdout + r.stderr


def test_security_notices_weakened_unit(units):
    """The check has teeth: without ProtectSystem=strict the level rises."""
    path = units["popfetchd.service"]
    path.write_text(path.read_text().replace("\nProtectSystem=strict\n", "\n"))
    level, failed = exposure(path)
    assert level > EXPOSURE_MAX
    assert "ProtectSystem=" in failed


# --------------------------------------------------------------------------
# sysusers.d


def test_sysusers_creates_the_units_user(installed, unitdir):
    """systemd-sysusers --root=DESTDIR reads the installed popfetchd.conf and
    creates exactly the system user and group the units run as."""
    root = installed
    (root / "etc").mkdir(exist_ok=True)
    r = run([tool("systemd-sysusers"), f"--root={root}", "popfetchd.conf"])
    assert r.returncode == 0 and "Failed" not in r.stderr, r.stdout + r.stderr
    users = {f[0]: f for f in (l.split(":") for l in (root / "etc/passwd").read_text().splitlines())}
    groups = {f[0]: f for f in (l.split(":") for l in (root / "etc/group").read_text().splitlines())}
    for name in UNITS:
        assert setting(unitdir / name, "User") in users
        assert setting(unitdir / name, "Group") in groups
    user = users["popfetchd"]
    assert 0 < int(user[2]) < 1000, "not a system user"
    assert user[3] == groups["popfetchd"][2], "primary group is not popfetchd"
    assert user[5] == "/var/lib/popfetchd"
    assert user[6].endswith("/nologin")


def test_sysusers_rejects_broken_entry(tmp_path):
    (tmp_path / "etc").mkdir()
    text = (ROOT / "units" / "popfetchd.sysusers").read_text()
    good = run([tool("systemd-sysusers"), "--dry-run", f"--root={tmp_path}", "-"], input=text)
    assert good.returncode == 0, good.stderr
    bad = run([tool("systemd-sysusers"), "--dry-run", f"--root={tmp_path}", "-"],
              input=text.replace("\nu ", "\nU ", 1))
    assert bad.returncode != 0
