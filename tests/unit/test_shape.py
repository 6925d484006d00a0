"""The layering of DESIGN.md §6 and the length of functions, held against the code.

What a module "must not know about" is a header it must not include
(tests/tools/shape.py reads the includes)."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import shape  # noqa: E402

NETWORK = {"pop3", "pop3_parse", "tls", "fetch", "oauth2", "scheduler", "probe"}
# module: the modules whose headers it must not include (§6 "must not know about")
MUST_NOT_INCLUDE = {
    "config": {"pop3", "pop3_parse", "fetch", "scheduler", "runtime", "store"},
    "scheduler": {"pop3", "pop3_parse", "tls"},
    "fetch": {"tls", "mime", "mime_extract", "smime", "probe", "scheduler"},
    "message": NETWORK | {"config", "runtime"},
    "runtime": {"fetch", "pop3", "pop3_parse", "scheduler", "probe"},
    "pop3": {"store", "mime", "mime_extract", "message", "smime", "config", "fetch", "oauth2"},
    "tls": {"pop3", "pop3_parse", "fetch", "config"},
    "auth": NETWORK,
    "oauth2": {"pop3", "pop3_parse", "fetch", "tls", "scheduler"},
    "store": NETWORK,
    "mime": NETWORK | {"store"},
    "mime_extract": NETWORK | {"store"},
    "smime": NETWORK | {"store"},
    # the one-shot runner: polls through fetch and runtime, knows no session
    "oneshot": {"pop3", "pop3_parse", "tls", "store", "mime", "mime_extract", "message",
                "smime", "scheduler", "probe"},
    "status": {"pop3", "pop3_parse", "tls", "fetch"},
    # plain numbers through its own interface: no protocol, no poll
    "metrics": {"pop3", "pop3_parse", "tls", "fetch", "oauth2", "scheduler", "config",
                "runtime", "store"},
    # text in, configurations out: no connection, no message
    "import": {"pop3", "pop3_parse", "fetch", "tls", "store", "oauth2", "scheduler", "probe",
               "runtime", "message", "mime", "mime_extract", "smime"},
    # threads that run what they are given: they know no job's subject
    "worker": NETWORK | {"config", "runtime", "store", "message", "mime", "mime_extract",
                         "smime", "status", "metrics", "oneshot", "import"},
}
# modules that include nothing of the project but these
ONLY = {"pop3_parse": set(), "log": set(), "util": set(), "notify": {"log"},
        "worker": {"util"}}
LONGEST = 80


@pytest.mark.parametrize("module", sorted(MUST_NOT_INCLUDE))
def test_module_keeps_to_its_concern(module):
    if module not in shape.modules():
        pytest.fail(f"DESIGN.md §6 names a module {module}: daemon/{module}.c is missing")
    assert shape.direct(module) & MUST_NOT_INCLUDE[module] == set()


@pytest.mark.parametrize("module", sorted(ONLY))
def test_leaf_module_includes_nothing_else(module):
    assert shape.direct(module) <= ONLY[module]


def test_no_module_includes_itself_through_another():
    assert shape.cycles(shape.graph()) == []


def test_functions_read_at_once():
    long = [f"{path}: {name}, {n} lines" for n, path, name in shape.functions() if n > LONGEST]
    assert long == []


def test_function_lengths_are_measured():
    # the measure itself: a known short function is found with its length
    rows = {(path, name): n for n, path, name in shape.functions()}
    assert 3 <= rows[("daemon/log.c", "log_set_level")] <= 10
