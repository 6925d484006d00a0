"""What the adapters of the interop suite (tests/tools/server_*.py) share:
skipping without root, waiting for a server's greeting, stopping a process
group, reading a log's tail, hashing a password for a shadow or passwd
file, and mbox spools as an MDA writes them."""

import contextlib
import fcntl
import os
import poplib
import re
import signal
import socket
import ssl
import subprocess
import time

MBOX_FROM = re.compile(rb"^From ", re.M)
MBOXRD_FROM = re.compile(rb"^(>*From )", re.M)
MBOX_SEPARATOR = re.compile(rb"(?:\A|\n\n)From ")


def require_root(why):
    """Skip the test (with `why`) unless this process is root."""
    if os.geteuid() != 0:
        import pytest
        pytest.skip(why)


def hash_password(password):
    """`password` as a SHA-512 crypt(3) hash (for shadow or passwd files)."""
    out = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def log_tail(path, lines=20):
    """The last lines of a log file, headed by its name; "" for no or an empty file."""
    try:
        with open(path, errors="replace") as f:
            text = f.read().splitlines()[-lines:]
    except OSError:
        return ""
    return ("\n--- " + path + " ---\n" + "\n".join(text)) if text else ""


# --------------------------------------------------------------------------
# starting and stopping


class BadGreeting(OSError):
    """A server answered a connection with something other than +OK."""


def greeting(host, port, ssl_context=None):
    """Connect (with TLS first when `ssl_context` is given) and read a +OK greeting."""
    with socket.create_connection((host, port), timeout=2) as s:
        if ssl_context:
            s = ssl_context.wrap_socket(s, server_hostname="localhost")
        line = s.recv(512)
        if not line.startswith(b"+OK"):
            raise BadGreeting(f"bad greeting on port {port}: {line!r}")


def greetings(server):
    """A +OK greeting on the server's POP3 port and, where it has one, its
    POP3S port (checked against its ca_file)."""
    greeting(server.host, server.pop3_port)
    if server.pop3s_port is not None:
        greeting(server.host, server.pop3s_port,
                 ssl.create_default_context(cafile=server.ca_file))


def wait_ready(ready, timeout, what, proc=None, details=lambda: ""):
    """Call ready() until it returns without OSError or RuntimeError; give
    up with RuntimeError (what failed, then details()) after `timeout`
    seconds or as soon as `proc` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            last = f"exited with {proc.returncode}"
            break
        try:
            ready()
            return
        except (OSError, RuntimeError) as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready: {last}{details()}")


def stop_process_group(proc, timeout=10):
    """SIGTERM to the process group `proc` leads (started with
    start_new_session=True: the server and its sessions), SIGKILL to what is
    left of it after `timeout` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@contextlib.contextmanager
def pop3_session(server, user, password):
    """A poplib client logged in with USER/PASS on the server's POP3 port; QUIT at the end."""
    client = poplib.POP3(server.host, server.pop3_port, timeout=30)
    try:
        client.user(user)
        client.pass_(password)
        yield client
    finally:
        client.quit()


# --------------------------------------------------------------------------
# mbox spools


def mbox_entry(data, from_line, mboxrd=False):
    """`data` (LF or CRLF) as an MDA appends it to an mbox: `from_line`, the
    message with LF line ends and its lines that begin "From " quoted with a
    '>' (mboxo; with mboxrd, also those that begin ">From ", ">>From ", ...),
    and the blank line that ends it."""
    data = data.replace(b"\r\n", b"\n")
    if not data.endswith(b"\n"):
        data += b"\n"
    if mboxrd:
        data = MBOXRD_FROM.sub(rb">\1", data)
    else:
        data = MBOX_FROM.sub(b">From ", data)
    return from_line + data + b"\n"


def mbox_count(data):
    """Messages in an mbox: From_ lines at the start or after a blank line."""
    return len(MBOX_SEPARATOR.findall(data))


class MboxMailbox:
    """A Mailbox (tests/tools/popservers.py) that is an mbox file, `path`,
    which the server locks with `lock` (fcntl.flock or fcntl.lockf; None:
    it takes no lock). Messages are appended with `from_line` and mboxo
    quoting (mboxrd where `mboxrd`). A subclass sets `path`."""

    lock = None
    from_line = b"From MAILER-DAEMON Fri Dec  4 10:00:00 2026\n"
    mboxrd = False

    def entry(self, data):
        return mbox_entry(data, self.from_line, self.mboxrd)

    def _open(self, mode):
        f = open(self.path, mode)
        if self.lock is not None:
            self.lock(f, fcntl.LOCK_EX)
        return f

    def deliver(self, *messages):
        self.append(*messages)

    def append(self, *messages):
        """Write the messages to the end of the mbox, as an MDA does."""
        with self._open("ab") as f:
            for m in messages:
                f.write(self.entry(m))
            f.flush()
            os.fsync(f.fileno())

    def count(self):
        try:
            with self._open("rb+") as f:
                return mbox_count(f.read())
        except FileNotFoundError:
            return 0

    def reset(self):
        with self._open("ab") as f:
            f.truncate(0)
