"""The Debian package (debian/): scripts/package builds it from a clean copy
of the checkout and runs lintian; this installs it with apt-get, checks what
it installed, purges it and checks that nothing of it is left.

What the package decides, and what this checks:
- popfetchd.service is enabled at install time, but its
  ConditionPathExistsGlob= skips the start until /etc/popfetchd/conf.d has a
  *.yaml or *.yml; popfetchd-once.timer is neither enabled nor started.
- The only conffile is /etc/popfetchd/popfetchd.yaml, every line commented.
- postinst creates the popfetchd user and group (systemd-sysusers); purge
  keeps them, as Debian does with system users (files the user owns may
  remain in save directories). The test removes them afterwards when they
  did not exist before it.
- Purge removes every file of the package, its directories, the
  enable symlinks and /var/lib/popfetchd (the state directory).

It takes about a minute (the build most of it) and needs root: apt-get and
dpkg change the machine. The machine is left as it was, also when a check
fails: the fixture purges what is still installed. The other tests run the
binary under test ($POPFETCHD), never /usr/sbin/popfetchd.
"""

import os
import pwd
import grp
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "popfetchd"
UNITDIR = Path("/lib/systemd/system")
UNITS = ("popfetchd.service", "popfetchd@.service", "popfetchd-once.service",
         "popfetchd-once.timer")
EXAMPLES = "/usr/share/doc/popfetchd/examples"

# What the package contains (dpkg-deb -c), beyond the directories.
FILES = {
    "/usr/sbin/popfetchd",
    *(f"/lib/systemd/system/{u}" for u in UNITS),
    "/usr/lib/sysusers.d/popfetchd.conf",
    "/usr/share/man/man8/popfetchd.8.gz",
    "/usr/share/man/man5/popfetchd.yaml.5.gz",
    "/usr/share/bash-completion/completions/popfetchd",
    "/etc/popfetchd/popfetchd.yaml",
    f"{EXAMPLES}/popfetchd.yaml.example",
    f"{EXAMPLES}/conf.d/invoices.yaml.example",
    f"{EXAMPLES}/conf.d/m365-orders.yaml.example",
    f"{EXAMPLES}/conf.d/archive-keep.yaml.example",
    f"{EXAMPLES}/prometheus/popfetchd.rules.yml",
    f"{EXAMPLES}/prometheus/popfetchd.rules.test.yml",
    "/usr/share/doc/popfetchd/copyright",
    "/usr/share/doc/popfetchd/changelog.gz",
}

# lintian tags (any level but E) the package keeps, and why:
ACCEPTED_LINTIAN = {
    # no /etc/init.d script: the daemon needs systemd's sd_notify watchdog,
    # sandbox, StateDirectory= and credentials; it can still be run by hand
    "package-supports-alternative-init-but-no-init.d-script",
}

# Where a leftover could be: the snapshot before and after covers these
# (merged /usr: /lib is /usr/lib). dpkg's and apt's own databases change
# with every install and are left out; dpkg's record of the package is
# checked with dpkg-query.
SNAPSHOT_ROOTS = ("/etc", "/usr", "/var/lib", "/opt", "/srv")
SNAPSHOT_SKIP = ("/var/lib/dpkg", "/var/lib/apt", "/var/lib/ucf")
# new files that creating a user leaves, whoever does it: the backups of
# the user database
USERDB_BACKUPS = {"/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-"}

ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8",
           SYSTEMD_PAGER="cat", SYSTEMD_COLORS="0")


def run(cmd, timeout=300, **kwargs):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          errors="replace", env=ENV, stdin=subprocess.DEVNULL,
                          timeout=timeout, **kwargs)


def package_status():
    """dpkg's status of the package ("install ok installed", "deinstall ok
    config-files", ...), or None when dpkg does not know it."""
    r = run(["dpkg-query", "-W", "-f=${Status}", PACKAGE])
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def known_to_dpkg():
    status = package_status()
    return status is not None and not status.endswith("not-installed")


def snapshot():
    """Every path under SNAPSHOT_ROOTS (not following symbolic links)."""
    paths = set()
    for top in SNAPSHOT_ROOTS:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames
                           if os.path.join(dirpath, d) not in SNAPSHOT_SKIP]
            paths.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return paths


def user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def group_exists(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def purge():
    r = run(["apt-get", "purge", "-y", "-q", PACKAGE])
    assert r.returncode == 0, f"apt-get purge failed:\n{r.stdout}\n{r.stderr}"
    return r


def lintian_tags(text):
    """{(level, tag)} of lintian's output lines ("W: pkg: tag [where]")."""
    return {(m.group(1), m.group(2))
            for m in re.finditer(r"(?m)^([EWIPX]): \S+: (\S+)", text)}


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """scripts/package -o DIR: (the .deb, scripts/package's stdout)."""
    if os.geteuid() != 0:
        pytest.skip("the package test installs a package: it runs as root")
    out = tmp_path_factory.mktemp("dist")
    r = run([ROOT / "scripts/package", "-o", out], timeout=900)
    assert r.returncode == 0, f"scripts/package failed:\n{r.stdout}\n{r.stderr[-6000:]}"
    debs = sorted(out.glob(f"{PACKAGE}_*.deb"))
    assert len(debs) == 1, f"{out}: {[p.name for p in out.iterdir()]}"
    return debs[0], r.stdout


@pytest.fixture(scope="module")
def installed(built):
    """The package installed with apt-get; afterwards it is purged (when a
    test has not) and the machine is as it was: a dict with the .deb, the
    snapshot before and the files dpkg -L lists."""
    if known_to_dpkg():
        pytest.skip(f"a {PACKAGE} package is on this machine ({package_status()}): "
                    f"the test would remove it")
    deb, _ = built
    user_before, group_before = user_exists(PACKAGE), group_exists(PACKAGE)
    state_before = os.path.lexists("/var/lib/popfetchd")
    before = snapshot()
    # the package's paths that are there already (/usr/sbin, ...) stay
    ours = {p for p in deb_paths(deb)[0] if not os.path.lexists(p)}
    try:
        r = run(["apt-get", "install", "-y", "-q", "--no-install-recommends", f"./{deb.name}"],
                cwd=deb.parent)
        assert r.returncode == 0, f"apt-get install failed:\n{r.stdout}\n{r.stderr}"
        assert package_status() == "install ok installed"
        yield {"deb": deb, "before": before, "ours": ours,
               "user_before": user_before, "group_before": group_before}
    finally:
        if known_to_dpkg():
            run(["apt-get", "purge", "-y", "-q", PACKAGE])
        if not user_before and user_exists(PACKAGE):
            run(["userdel", PACKAGE])
        if not group_before and group_exists(PACKAGE):
            run(["groupdel", PACKAGE])
        if not state_before:
            shutil.rmtree("/var/lib/popfetchd", ignore_errors=True)


# --------------------------------------------------------------------------
# the .deb


def test_lintian_reports_no_errors(built):
    _, out = built
    tags = lintian_tags(out)
    errors = sorted(t for level, t in tags if level == "E")
    assert not errors, f"lintian errors: {errors}\n{out}"
    new = sorted(f"{level}: {t}" for level, t in tags if t not in ACCEPTED_LINTIAN)
    assert not new, f"lintian findings not accepted (fix, or accept with a reason):\n{out}"


def deb_paths(deb):
    """(the absolute paths in the .deb, dpkg-deb -c's listing)."""
    listing = run(["dpkg-deb", "-c", deb]).stdout
    entries = [line.split()[-1] if " -> " not in line else line.split()[-3]
               for line in listing.splitlines()]
    return {e[1:].rstrip("/") for e in entries if e.startswith("./")} - {""}, listing


def test_package_contents(built):
    deb, _ = built
    paths, listing = deb_paths(deb)
    missing = sorted(FILES - paths)
    assert not missing, f"not in the package: {missing}\n{listing}"
    # /etc: the conffile and the empty conf.d, no example (they are docs)
    assert {p for p in paths if p.startswith("/etc")} == \
        {"/etc", "/etc/popfetchd", "/etc/popfetchd/conf.d", "/etc/popfetchd/popfetchd.yaml"}
    assert re.search(r"(?m)^-rwxr-xr-x root/root .* \./usr/sbin/popfetchd$", listing)

    fields = {k: run(["dpkg-deb", "-f", deb, k]).stdout.strip()
              for k in ("Package", "Version", "Architecture", "Depends")}
    version = re.search(r"version\s*:\s*'([^']+)'", (ROOT / "meson.build").read_text()).group(1)
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    assert (fields["Package"], fields["Version"], fields["Architecture"]) == \
        (PACKAGE, version, arch)
    assert deb.name == f"{PACKAGE}_{version}_{arch}.deb"
    for lib in ("libevent", "libssl3", "libgmime-3.0", "libcurl", "libyaml", "libjansson"):
        assert lib in fields["Depends"], f"Depends: {fields['Depends']}"


def test_control_files(built, tmp_path):
    deb, _ = built
    run(["dpkg-deb", "-e", deb, tmp_path / "control"])
    control = tmp_path / "control"
    assert (control / "conffiles").read_text().split() == ["/etc/popfetchd/popfetchd.yaml"]
    postinst = (control / "postinst").read_text()
    assert re.search(r"(?m)^\s*systemd-sysusers .*popfetchd\.conf$", postinst)
    assert postinst.index("systemd-sysusers") < postinst.index("deb-systemd-invoke"), \
        "the user must exist before the unit may start"
    assert "deb-systemd-helper enable 'popfetchd.service'" in postinst
    assert "'popfetchd-once.timer'" in postinst
    assert "deb-systemd-helper enable 'popfetchd-once.timer'" in postinst.split(
        "was-enabled 'popfetchd-once.timer'")[1], "the timer is enabled only if it was"
    # an upgrade restarts the timer the admin started, never stops it for good
    assert "try-restart 'popfetchd-once.service' 'popfetchd-once.timer'" in postinst
    assert not (control / "preinst").exists() or \
        "stop" not in (control / "preinst").read_text()
    prerm = (control / "prerm").read_text()
    assert "deb-systemd-invoke stop popfetchd-once.timer" in prerm
    assert "deb-systemd-invoke stop 'popfetchd.service'" in prerm
    assert "rm -rf" in (control / "postrm").read_text()


def test_conffile_changes_nothing(built, tmp_path, popfetchd_bin):
    """The shipped popfetchd.yaml sets nothing (every line a comment) and is
    valid, with the empty conf.d the package ships."""
    deb, _ = built
    run(["dpkg-deb", "-x", deb, tmp_path / "root"])
    conf = tmp_path / "root/etc/popfetchd"
    text = (conf / "popfetchd.yaml").read_text()
    settings = [l for l in text.splitlines() if l.strip() and not l.startswith("#")]
    assert not settings, settings
    assert "max_sessions" in text and "defaults:" in text, "the example, commented"
    assert list((conf / "conf.d").iterdir()) == []
    r = run([popfetchd_bin, "-c", conf, "check"])
    assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------
# installed


def test_installed_binary_runs(installed):
    r = run(["/usr/sbin/popfetchd", "--version"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"popfetchd {run(['dpkg-query', '-W', '-f=${Version}', PACKAGE]).stdout}"
    # the packaged /etc/popfetchd: an empty conf.d is no error
    r = run(["/usr/sbin/popfetchd", "check"])
    assert r.returncode == 0, r.stdout + r.stderr
    for f in FILES:
        assert os.path.lexists(f), f"{f} not installed"


def test_installed_user(installed):
    u = pwd.getpwnam(PACKAGE)
    assert 0 < u.pw_uid < 1000, "not a system user"
    assert grp.getgrgid(u.pw_gid).gr_name == PACKAGE
    assert u.pw_dir == "/var/lib/popfetchd"
    assert u.pw_shell.endswith("/nologin")


@pytest.mark.parametrize("name", UNITS)
def test_installed_units_verify(installed, name):
    """systemd-analyze verify on the installed unit: ExecStart= is the
    installed binary, Documentation= the installed man pages, User= the
    created user."""
    man = [] if shutil.which("man") else ["--man=no"]
    r = run(["systemd-analyze", "verify", *man, UNITDIR / name])
    problems = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert r.returncode == 0 and not problems, "\n".join(problems)


def test_installed_service_waits_for_a_configuration(installed):
    """Enabled, but systemd would skip it now: no configuration yet. The
    timer is not enabled."""
    wants = Path("/etc/systemd/system")
    assert (wants / "multi-user.target.wants/popfetchd.service").is_symlink()
    assert not os.path.lexists(wants / "timers.target.wants/popfetchd-once.timer")
    text = (UNITDIR / "popfetchd.service").read_text()
    conditions = re.findall(r"(?m)^(Condition\w+=.*)$", text)
    assert conditions
    r = run(["systemd-analyze", "condition", *conditions])
    assert r.returncode == 1 and "Conditions failed" in r.stdout + r.stderr, \
        r.stdout + r.stderr


def test_purge_leaves_nothing(installed):
    """Purge removes every file and directory of the package, the enable
    symlinks and the state directory; it keeps the popfetchd user."""
    # the state directory systemd makes when the service first starts
    state = Path("/var/lib/popfetchd")
    state.mkdir(mode=0o750, exist_ok=True)
    (state / "status.json").write_text("{}\n")
    os.chown(state, pwd.getpwnam(PACKAGE).pw_uid, grp.getgrnam(PACKAGE).gr_gid)

    purge()
    assert not known_to_dpkg(), f"dpkg still knows {PACKAGE}: {package_status()}"
    left = sorted(p for p in installed["ours"] if os.path.lexists(p))
    assert not left, f"left by purge: {left}"
    for path in ("/etc/popfetchd", "/var/lib/popfetchd", "/usr/share/doc/popfetchd",
                 "/etc/systemd/system/multi-user.target.wants/popfetchd.service"):
        assert not os.path.lexists(path), f"{path} left by purge"
    assert not list(Path("/var/lib/dpkg/info").glob(f"{PACKAGE}.*"))
    assert user_exists(PACKAGE) and group_exists(PACKAGE), \
        "purge keeps the system user and group"

    before, after = installed["before"], snapshot()
    new = sorted(after - before - USERDB_BACKUPS)
    gone = sorted(before - after)
    assert not new, f"new after install and purge: {new}"
    assert not gone, f"gone after install and purge: {gone}"
