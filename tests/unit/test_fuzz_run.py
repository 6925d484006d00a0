"""Fuzz every harness for a bounded time (what `meson test --suite fuzz`
does in a -Dfuzz=true build), as part of the test suite: one test per
harness, failing on any crash, leak, sanitizer report or slow input.

Runs only when POPFETCHD_FUZZ_SECONDS is set (scripts/test sets it when
SANITIZE=1, i.e. in CI, after building POPFETCHD_FUZZ_BUILD with clang); the
plain `scripts/test` stays quick. The harnesses run side by side, as many at
a time as there are CPUs; each test waits for its own. Each works in
POPFETCHD_FUZZ_BUILD/tests/fuzz-ci/NAME/ (tests/fuzz/run-fuzzer says what is
there); `tests/fuzz/run-fuzzer --summary --work .../fuzz-ci NAME...` prints
the executions of each, as scripts/test does at the end.
"""
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import pytest

from test_fuzz_corpus import HARNESSES

ROOT = pathlib.Path(__file__).resolve().parents[2]
SECONDS = int(os.environ.get("POPFETCHD_FUZZ_SECONDS") or 0)
FUZZ_BUILD = pathlib.Path(os.environ.get("POPFETCHD_FUZZ_BUILD", ROOT / "build-fuzz"))
WORK = FUZZ_BUILD / "tests" / "fuzz-ci"
RUNNER = ROOT / "tests" / "fuzz" / "run-fuzzer"

pytestmark = pytest.mark.skipif(
    SECONDS <= 0, reason="fuzzing runs when POPFETCHD_FUZZ_SECONDS is set (SANITIZE=1 scripts/test)")


def fuzz(name):
    exe = FUZZ_BUILD / "tests" / f"fuzz_{name}"
    if not exe.exists():
        return None
    return subprocess.run(
        [sys.executable, str(RUNNER), "--seconds", str(SECONDS),
         "--corpus", str(ROOT / "tests" / "fuzz" / "corpus" / name), "--work", str(WORK),
         str(exe)],
        capture_output=True, text=True, timeout=2 * SECONDS + 600)


@pytest.fixture(scope="module")
def campaigns(request):
    """name -> Future of its run-fuzzer process, for every selected test,
    all submitted at once."""
    names = [item.callspec.params["name"] for item in request.session.items
             if getattr(item, "originalname", None) == "test_fuzz_run"]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    futures = {name: pool.submit(fuzz, name) for name in names}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz_run(campaigns, name):
    proc = campaigns[name].result()
    assert proc is not None, (f"{FUZZ_BUILD}/tests/fuzz_{name} is not built (CC=clang meson "
                              f"setup {FUZZ_BUILD} -Dfuzz=true ...: README.md, Fuzzing)")
    print(proc.stdout)
    assert proc.returncode == 0, f"fuzz_{name} failed:\n{proc.stdout[-8000:]}{proc.stderr[-2000:]}"
    assert " Done " in proc.stdout
