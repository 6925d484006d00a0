"""Running popfetchd in the integration tests: its environment, its
Result, and the sanitizer check of its stderr."""

import collections
import json
import os

import pytest

RUN_TIMEOUT = 60
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                     "runtime error:", "WARNING: ThreadSanitizer", "ERROR: MemorySanitizer")
# inherited settings that would change where popfetchd keeps state or secrets
SCRUBBED_ENV = ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY", "CONFIGURATION_DIRECTORY",
                "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


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
