"""The one-shot commands under valgrind memcheck: representative runs of
receive-all (Dovecot over POP3S and STLS), receive --json, S/MIME (decrypted,
unwrapped, for someone else), check, test ID and a few faults (wrong
password, connection refused, untrusted certificate, a connection dropped
in a RETR, an overlong line), each with no memcheck error: no invalid read or
write, no use of uninitialised memory, no definite leak.

The binary is the plain build (build/daemon/popfetchd, or
POPFETCHD_VALGRIND_BIN): valgrind cannot run an ASan build, and the plain
build is the one the sanitizers do not see. Skipped when valgrind is not
installed (scripts/install-deps installs it) or that binary is not built
(scripts/test with SANITIZE=1 builds it).

Here `popfetchd_bin` is a wrapper that runs the binary under
    valgrind -q --error-exitcode=97 --leak-check=full
             --errors-for-leak-kinds=definite --log-file=...
and `run_popfetchd` fails the test on any valgrind report, besides what the
test asserts about the run itself.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import dovecot as dovecot_tool
import mailgen
from fakepop3 import Overlong, Truncate
from test_receive import (EX_CONFIG, EX_NOPERM, EX_OK, EX_PROTOCOL, EX_TEMPFAIL,
                          EX_UNAVAILABLE, assert_saved_exactly, deliver_generated,
                          server_listing)
from test_smime import (P12_PASSWORD, PKI, assert_content_extracted, content_entity,
                        keystore_conf, message)

ROOT = Path(__file__).resolve().parents[2]
VALGRIND = shutil.which("valgrind")
PLAIN = Path(os.environ.get("POPFETCHD_VALGRIND_BIN") or ROOT / "build" / "daemon" / "popfetchd")
EX_VALGRIND = 97
# valgrind is 20-50 times slower: room for it
TIMEOUT = 180

pytestmark = pytest.mark.skipif(VALGRIND is None,
                                reason="valgrind is not installed (scripts/install-deps)")


@pytest.fixture(scope="module")
def valgrind_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("valgrind")


@pytest.fixture(scope="module")
def popfetchd_bin(valgrind_logs):
    """A wrapper that runs the plain binary under valgrind memcheck."""
    if not (PLAIN.is_file() and os.access(PLAIN, os.X_OK)):
        pytest.skip(f"{PLAIN} is not built (scripts/build build)")
    ldd = subprocess.run(["ldd", str(PLAIN)], capture_output=True, text=True).stdout
    if "libasan" in ldd or "libubsan" in ldd:
        pytest.skip(f"{PLAIN} is a sanitizer build: valgrind needs a plain one")
    wrapper = valgrind_logs / "popfetchd-under-valgrind"
    # GLib (GMime) allocates from its slice allocator unless told otherwise
    wrapper.write_text(
        "#!/bin/sh\n"
        "G_SLICE=always-malloc G_DEBUG=gc-friendly exec "
        f"{VALGRIND} -q --error-exitcode={EX_VALGRIND} --leak-check=full "
        "--errors-for-leak-kinds=definite --show-leak-kinds=definite --num-callers=40 "
        f"--log-file={valgrind_logs}/memcheck.%p.log {PLAIN} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def run_popfetchd(run_popfetchd, valgrind_logs):
    """conftest's run_popfetchd (through the wrapper), and no valgrind report."""
    def run(args, confdir=None, timeout=TIMEOUT, env=None):
        for old in valgrind_logs.glob("memcheck.*.log"):
            old.unlink()
        res = run_popfetchd(args, confdir=confdir, timeout=timeout, env=env)
        logs = sorted(valgrind_logs.glob("memcheck.*.log"))
        assert logs, "no valgrind log: popfetchd did not run under valgrind"
        reports = [f"--- {p.name}\n{p.read_text()}" for p in logs if p.read_text().strip()]
        assert res.returncode != EX_VALGRIND and not reports, \
            "valgrind memcheck reports:\n" + "\n".join(reports) + "\n" + res.describe()
        return res
    return run


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------
# receiving


@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_receive_all_over_tls(dovecot, mailbox, dovecot_config, confdir, run_popfetchd,
                              read_saved, mode):
    deliver_generated(mailbox, 3, 6000, seed=901)
    listing = server_listing(dovecot, mailbox)
    config = dovecot_config(mailbox, server="localhost", tls=mode, tls_ca_file=dovecot.ca_file,
                            port=dovecot.pop3s_port if mode == "implicit" else dovecot.pop3_port)
    res = run_popfetchd(["receive-all", "dv"], confdir=confdir(config))
    assert res.returncode == EX_OK
    assert_saved_exactly(read_saved(config["save_directory"]), "dv", listing)
    assert mailbox.count() == 0


def test_receive_one_json(mailbox, dovecot_config, confdir, run_popfetchd, read_saved):
    deliver_generated(mailbox, 2, 3000, seed=902)
    config = dovecot_config(mailbox)
    res = run_popfetchd(["--json", "receive", "dv"], confdir=confdir(config))
    assert res.returncode == EX_OK
    doc = res.json()
    assert len(doc["saved"]) == 1 and doc["exit_code"] == EX_OK
    assert len(read_saved(config["save_directory"])) == 1


def test_smime(fake_pop3, fake_config, confdir, run_popfetchd, pki, secret_registry):
    """Decrypted (then extracted), unwrapped, and one for someone else saved raw."""
    secret_registry.add(P12_PASSWORD)
    entity = content_entity()
    server = fake_pop3([message(pki.encrypt(entity), subject="encrypted"),
                        message(pki.sign(entity, opaque=True), subject="signed"),
                        message(pki.encrypt(entity, to="bob"), subject="for bob")])
    config = fake_config(server, smime={"key_name": "alice", "key_password": P12_PASSWORD})
    res = run_popfetchd(["receive-all", "fake"], confdir=keystore_conf(confdir, config, pki))
    assert res.returncode == EX_OK
    assert server.remaining() == []
    metas = {}
    for line in res.lines:
        meta = json.loads((Path(line) / "meta.json").read_text())
        metas[meta["subject"]] = (Path(line), meta)
    folder, meta = metas["encrypted"]
    assert meta["smime"] == "decrypted"
    assert_content_extracted(folder, meta)
    assert metas["signed"][1]["smime"] == "signed"
    assert metas["for bob"][1]["smime"].startswith("not-decrypted: not for this key")


# --------------------------------------------------------------------------
# check and test


def test_check(mailbox, dovecot_config, confdir, run_popfetchd):
    cd = confdir(dovecot_config(mailbox))
    res = run_popfetchd(["check"], confdir=cd)
    assert res.returncode == EX_OK
    cd.add(dovecot_config(mailbox, id="broken", port=0, remove_after_raed=True))
    res = run_popfetchd(["--json", "check"], confdir=cd)
    assert res.returncode == EX_CONFIG
    doc = res.json()
    assert doc["valid"] is False and doc["errors"]


def test_test_command(dovecot, mailbox, dovecot_config, confdir, run_popfetchd):
    mailbox.deliver(*mailgen.generate(2, 2000, seed=903))
    config = dovecot_config(mailbox, server="localhost", tls="implicit",
                            port=dovecot.pop3s_port, tls_ca_file=dovecot.ca_file)
    res = run_popfetchd(["test", "dv"], confdir=confdir(config))
    assert res.returncode == EX_OK
    assert mailbox.count() == 2


# --------------------------------------------------------------------------
# faults


def test_wrong_password(mailbox, dovecot_config, confdir, run_popfetchd):
    config = dovecot_config(mailbox, password="Wrong-Secret-4711")
    res = run_popfetchd(["receive-all", "dv"], confdir=confdir(config))
    assert res.returncode == EX_NOPERM


def test_connection_refused(mailbox, dovecot_config, confdir, run_popfetchd):
    config = dovecot_config(mailbox, port=dovecot_tool.free_ports(1)[0])
    res = run_popfetchd(["receive-all", "dv"], confdir=confdir(config))
    assert res.returncode == EX_UNAVAILABLE


def test_untrusted_certificate(dovecot, mailbox, dovecot_config, confdir, run_popfetchd):
    config = dovecot_config(mailbox, tls="implicit", port=dovecot.pop3s_port, tls_ca_file=None)
    res = run_popfetchd(["receive-all", "dv"], confdir=confdir(config))
    assert res.returncode == EX_PROTOCOL


def test_drop_in_retr(fake_pop3, fake_config, confdir, run_popfetchd, read_saved):
    server = fake_pop3(mailgen.generate(2, 4000, seed=904))
    server.inject("RETR 2", Truncate(0.5))
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_TEMPFAIL
    assert len(read_saved(config["save_directory"])) == 1


def test_overlong_line(fake_pop3, fake_config, confdir, run_popfetchd, read_saved):
    server = fake_pop3(mailgen.generate(1, 2000, seed=905))
    server.inject("RETR", Overlong(2000, then="stall"))
    config = fake_config(server)
    res = run_popfetchd(["receive-all", "fake"], confdir=confdir(config))
    assert res.returncode == EX_PROTOCOL
    assert read_saved(config["save_directory"]) == []
