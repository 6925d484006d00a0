"""Replay each fuzz harness over its seed corpus (a regression test; real
fuzzing: README.md, "Fuzzing", and test_fuzz_run.py)."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("POPFETCHD_BUILD", ROOT / "build"))
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
HARNESSES = ["pop3_parse", "pop3_framing", "mime_headers", "config", "mime_extract", "smime", "import"]


@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz_corpus(name):
    exe = BUILD / "tests" / f"fuzz_{name}"
    inputs = sorted(str(p) for p in (CORPUS / name).iterdir())
    assert inputs, f"no seed corpus in {CORPUS / name}"
    r = subprocess.run([str(exe), *inputs], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"{len(inputs)} inputs" in r.stdout
