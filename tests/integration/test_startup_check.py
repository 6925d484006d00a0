"""The start-up check of `run` (DESIGN.md §7): at start and on reload every
configuration's save_directory (and the directory of its
oauth2.refresh_token_file) must take new files; one that does not is
logged in one line naming ReadWritePaths= when the file system is
read-only, is broken (not polled, retried with backoff), and the others
run.

Root ignores permission bits, so the save directory is made read-only as a
mount: the daemon runs in a private mount namespace (unshare -m) where the
directory is bind-mounted read-only, as ProtectSystem=strict does to every
path not in ReadWritePaths=.
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest

import mailgen
from daemonutil import daemon, wait_for  # noqa: F401  (daemon: a fixture)

pytestmark = pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                reason="needs unshare(1) and root for a mount namespace")

EX_OK = 0

# popfetchd with the directories of $RO_DIRS (colon-separated) read-only
WRAPPER = """#!/bin/sh
set -e
IFS=:
for d in $RO_DIRS; do mount --bind "$d" "$d"; mount -o remount,bind,ro "$d"; done
unset IFS
exec "$POPFETCHD_REAL" "$@"
"""


@pytest.fixture
def ro_daemon(popfetchd_bin, tmp_path, daemon):
    """Factory: ro_daemon(confdir, ro_dirs) -> a running Daemon in a mount
    namespace where ro_dirs are read-only."""
    wrapper = tmp_path / "popfetchd-ro"
    inner = tmp_path / "popfetchd-ro-inner"
    inner.write_text(WRAPPER)
    inner.chmod(0o755)
    # unshare execs the wrapper in the new namespace; the Daemon runs this
    wrapper.write_text(f"#!/bin/sh\nexec unshare -m --propagation private {inner} \"$@\"\n")
    wrapper.chmod(0o755)

    def start(confdir, ro_dirs):
        env = {"RO_DIRS": ":".join(map(str, ro_dirs)), "POPFETCHD_REAL": popfetchd_bin}
        return daemon(confdir, env=env, binary=str(wrapper))
    return start


def saved(save_dir):
    return [p for p in os.listdir(save_dir) if not p.startswith(".")]


def test_read_only_save_directory_is_named_and_the_others_run(
        ro_daemon, fake_pop3, fake_config, confdir, tmp_path):
    ro_server = fake_pop3([m.data for m in mailgen.generate_messages(1, 1000, seed=1801)])
    ok_server = fake_pop3([m.data for m in mailgen.generate_messages(2, 1000, seed=1802)])
    ro_cfg = fake_config(ro_server, id="archive", poll_interval="1s")
    ok_cfg = fake_config(ok_server, id="invoices", poll_interval="1s")
    ro_save = ro_cfg["save_directory"]
    cd = confdir(ro_cfg, ok_cfg)
    d = ro_daemon(cd, [ro_save])
    d.wait_ready()
    line = (f"archive: cannot be polled: save_directory {ro_save} is not writable: "
            f"Read-only file system; under systemd add it to ReadWritePaths= "
            f"(systemctl edit popfetchd)")
    wait_for(lambda: line in d.output, 10, f"the start-up check's line\n{d.output}")
    # the other configuration runs, poll after poll
    wait_for(lambda: len(saved(ok_cfg["save_directory"])) == 2, 20, "invoices' mail")
    wait_for(lambda: len(ok_server.sessions) >= 3, 20, "invoices polled again")
    assert "1 broken" in d.notify.status(), d.notify.status()
    assert "archive: save_directory" in d.notify.status()
    # broken is retried with backoff (1 s interval: about 2 s, 4 s, ...)
    wait_for(lambda: d.output.count(line) >= 2, 15, "a retry of the check")
    # and checked again on reload
    before = d.output.count(line)
    d.signal(signal.SIGHUP)
    d.wait_ready(2)
    wait_for(lambda: d.output.count(line) > before, 10, "the check on reload")
    assert ro_server.sessions == [], "a broken configuration was polled"
    assert saved(ro_save) == []

    # made writable (in the daemon's namespace): polled at its next try
    subprocess.run(["nsenter", "-t", str(d.proc.pid), "-m", "mount", "-o",
                    "remount,bind,rw", ro_save], check=True)
    wait_for(lambda: len(saved(ro_save)) == 1, 90, f"archive's mail once writable\n{d.output}")
    assert "archive: set up now: polled again" in d.output
    assert d.stop() == EX_OK
    print(d.output, file=sys.stderr)
    # one line per configuration per check: the other one is never named
    assert "invoices: cannot be polled" not in d.output


def test_unwritable_refresh_token_directory(ro_daemon, fake_pop3, fake_config, confdir,
                                            tmp_path, secret_registry):
    """The refresh-token file is rewritten beside itself when the endpoint
    rotates it: its directory must take new files too."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "m365.token").write_text("not-a-real-refresh-token\n")
    (tokens / "m365.token").chmod(0o600)
    secret_registry.add("not-a-real-refresh-token")
    server = fake_pop3([])
    cfg = fake_config(server, id="m365", poll_interval="1s", auth="oauth2", password=None,
                      oauth2={"token_endpoint": "https://127.0.0.1:9/token",
                              "client_id": "popfetchd-test", "grant": "refresh_token",
                              "refresh_token_file": str(tokens / "m365.token")})
    ok_server = fake_pop3([])
    cd = confdir(cfg, fake_config(ok_server, id="plain", poll_interval="1s"))
    d = ro_daemon(cd, [tokens])
    d.wait_ready()
    line = (f"m365: cannot be polled: the directory of oauth2.refresh_token_file {tokens} is "
            f"not writable: Read-only file system; under systemd add it to ReadWritePaths=")
    wait_for(lambda: line in d.output, 10, f"the check's line\n{d.output}")
    wait_for(lambda: len(ok_server.sessions) >= 2, 20, "the other configuration polled")
    assert d.stop() == EX_OK
    assert server.sessions == []
