"""Running `popfetchd run` under test: a NOTIFY_SOCKET the test owns
(NotifySocket), the daemon in the background (Daemon), and the `daemon`
fixture that starts them and checks their output at teardown. Shared by
test_daemon.py and test_faults.py; a test module uses the fixture by
importing it (`from daemonutil import daemon`)."""

import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import SANITIZER_MARKERS, _popfetchd_env


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET; every
    datagram is kept as (monotonic time, {FIELD: value})."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def events(self):
        """The messages as event names, in order: READY, RELOADING, STOPPING,
        WATCHDOG, or STATUS for a message that only carries a status."""
        out = []
        with self._lock:
            for _, f in self.messages:
                kinds = [k for k in ("RELOADING", "READY", "STOPPING", "WATCHDOG") if k in f]
                out.extend(kinds or ["STATUS"])
        return out

    def fields(self, name):
        with self._lock:
            return [f for _, f in self.messages if name in f]

    def status(self):
        with self._lock:
            for _, f in reversed(self.messages):
                if "STATUS" in f:
                    return f["STATUS"]
        return None

    def settle(self, quiet=0.3, timeout=5):
        """Wait until no datagram has come for `quiet` seconds: the last
        ones a process sent just before it exited are read."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                last = self.messages[-1][0] if self.messages else 0
            if time.monotonic() - last >= quiet:
                return
            time.sleep(0.05)

    def close(self):
        self._stop.set()
        self.sock.close()
        self._thread.join(2)


def wait_for(predicate, timeout=30, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


class Daemon:
    """`popfetchd -c DIR run` in the background, talking to a NotifySocket."""

    def __init__(self, binary, confdir, notify, env=None, args=()):
        self.log = Path(confdir) / "daemon.log"
        self.logf = open(self.log, "w")
        extra = {"NOTIFY_SOCKET": notify.path, **(env or {})}
        self.proc = subprocess.Popen([binary, "-c", str(confdir), *args, "run"],
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=_popfetchd_env(extra))
        self.notify = notify

    @property
    def output(self):
        return self.log.read_text(errors="replace")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_ready(self, count=1, timeout=20):
        wait_for(lambda: self.notify.events().count("READY") >= count, timeout,
                 f"READY=1 #{count}\n{self.output}")

    def stop(self, timeout=30):
        """SIGTERM and wait: the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
            self.notify.settle()
            return code
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the daemon did not stop within {timeout} s after SIGTERM:\n"
                        f"{self.output}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


@pytest.fixture
def daemon(popfetchd_bin, tmp_path, secret_registry):
    """Factory: daemon(confdir, env=None, args=(), binary=None) -> a running
    Daemon (binary: a wrapper that runs popfetchd, by default popfetchd).

    At teardown it is killed if still running, its output is scanned for
    secrets and sanitizer reports."""
    started = []

    def start(confdir, env=None, args=(), binary=None):
        notify = NotifySocket(tmp_path / f"notify{len(started)}.sock")
        d = Daemon(binary or popfetchd_bin, confdir, notify, env=env, args=args)
        started.append(d)
        return d
    yield start
    for d in started:
        d.close()
        d.notify.close()
        out = d.output
        secret_registry.record("popfetchd run", out)
        for marker in SANITIZER_MARKERS:
            assert marker not in out, f"sanitizer report in the daemon's output:\n{out}"
