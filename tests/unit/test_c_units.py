"""Run the C test programs that meson builds: the modules without a session,
and the POP3 transcripts that drive pop3 and fetch."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("POPFETCHD_BUILD", ROOT / "build"))
PROGRAMS = ["util", "config", "pop3_parse", "store", "mime", "auth", "smime", "mime_extract", "tls",
            "message", "status", "metrics", "transcripts", "oneshot", "import", "worker"]


@pytest.mark.parametrize("name", PROGRAMS)
def test_c_unit(name):
    exe = BUILD / "tests" / f"test_{name}"
    assert exe.exists(), f"{exe} is not built: run scripts/build"
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{exe.name} failed:\n{r.stderr[-4000:]}"
    assert " 0 failed" in r.stderr.splitlines()[-1]
