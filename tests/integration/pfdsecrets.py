"""The secret registry of popfetchd's integration tests: the secrets of
one test, the output of every program run in it, and the scan for leaks
(the autouse fixture `secret_registry` in conftest.py checks it).
"""

import base64

import pytest


SECRET_MIN_LEN = 8        # shorter values are not scanned (too many false alarms)
SECRET_PIECE_LEN = 12     # a secret of 24+ characters: no piece this long may appear


def _aligned_base64(secret):
    """How `secret` shows inside any longer base64 text: for each of the three
    alignments, the encoding of its bytes from offset k cut to whole 3-byte
    groups (characters that do not depend on the neighbouring bytes)."""
    raw = secret.encode()
    forms = []
    for k in range(3):
        body = raw[k:]
        body = body[:len(body) // 3 * 3]
        if len(body) >= 9:
            forms.append(base64.b64encode(body).decode())
    return forms


class SecretRegistry:
    """Secrets of one test and the output of every program run in it.

    add(*secrets) registers values; add_source(fn) a callable returning
    more (evaluated at check time: tokens issued later count too);
    record(label, text) adds output. leaks() -> [(masked secret, label,
    how)]; check() fails the test if there is any. A secret of 24 or more
    characters also leaks through any 12-character piece of it (a log line
    that prints "the first few" characters), and through its base64 (an
    XOAUTH2 line in a debug log).
    """

    def __init__(self):
        self._secrets, self._sources, self.outputs = set(), [], []
        self._reported = set()

    def add(self, *secrets):
        for value in secrets:
            if value:
                self._secrets.add(str(value))
        return self

    def add_source(self, fn):
        self._sources.append(fn)
        return self

    def record(self, label, text):
        if text:
            self.outputs.append((label, text))

    def secrets(self):
        found = set(self._secrets)
        for fn in self._sources:
            found.update(str(v) for v in fn() if v)
        return sorted(v for v in found if len(v) >= SECRET_MIN_LEN)

    @staticmethod
    def mask(secret):
        return f"{secret[:4]}...({len(secret)} characters)"

    def leaks(self, outputs=None):
        found = []
        for secret in self.secrets():
            needles = [(secret, "in full")]
            if len(secret) >= 2 * SECRET_PIECE_LEN:
                needles += [(secret[i:i + SECRET_PIECE_LEN], f"a piece at offset {i}")
                            for i in range(len(secret) - SECRET_PIECE_LEN + 1)]
            needles += [(form, "as base64") for form in _aligned_base64(secret)]
            for label, text in (outputs if outputs is not None else self.outputs):
                for needle, how in needles:
                    if needle in text:
                        found.append((self.mask(secret), label, how))
                        break
        return found

    def check(self):
        """Fail if a secret is in the output (each leak is reported once)."""
        leaks = [leak for leak in self.leaks() if leak not in self._reported]
        self._reported.update(leaks)
        if leaks:
            pytest.fail("secrets in popfetchd's output:\n" + "\n".join(
                f"  {secret} {how} in: {label}" for secret, label, how in leaks), pytrace=False)
