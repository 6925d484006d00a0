"""Replay each fuzz harness over its seed corpus (a regression test; real
fuzzing: see tests/fuzz/README.md)."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD = pathlib.Path(os.environ.get("POPFETCHD_BUILD", ROOT / "build"))
CORPUS = ROOT / "tests" / "fuzz" / "corpus"


@pytest.mark.parametrize("name", ["pop3_parse", "mime_headers", "config", "mime_extract"])
def test_fuzz_corpus(name):
    exe = BUILD / "tests" / f"fuzz_{name}"
    inputs = sorted(str(p) for p in (CORPUS / name).iterdir())
    assert inputs, f"no seed corpus in {CORPUS / name}"
    r = subprocess.run([str(exe), *inputs], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"{len(inputs)} inputs" in r.stdout
