"""Solid POP3 (Debian's solid-pop3d) as a server of the interop suite
(tests/tools/popservers.py).

solid-pop3d authenticates system accounts through PAM and reads the mbox
spool /var/mail/USER; it has no TLS and no CAPA, runs from inetd (its
standalone mode binds port 110 on every address) and reads a per-user APOP
secret from ~/.spop3d. The package conflicts with dovecot-pop3d, so
scripts/install-deps extracts it under SOLID_ROOT instead of installing it.

Nothing on the machine changes: a listener started with `unshare --mount`
bind-mounts a private passwd, shadow and group over /etc, a PAM directory
over /etc/pam.d and a spool directory over /var/mail — all in the instance's
directory, visible only inside that mount namespace — and then runs
solid-pop3d once per accepted connection with the socket as its standard
input and output, as inetd's "nowait" does.

    python3 server_solid.py serve DIR     the listener (inside the namespace)
"""

import fcntl
import gzip
import os
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import time

import serverutil

HOST = "127.0.0.1"
SOLID_ROOT = os.environ.get("POPFETCHD_SOLID_ROOT", "/var/cache/popfetchd-test/solid-pop3d/root")
PROGRAM = os.path.join(SOLID_ROOT, "usr/sbin/solid-pop3d")
FIRST_UID = 62000
POPUSER = "spop3d"  # solid-pop3d parses its configuration as this user
MAIL_GID = 8

CONF = """/* written by tests/tools/server_solid.py */
<Global>
\tMailDropName\t"/var/mail/%s"
\tMailDropType\tmailbox
\tAllowAPOP\tyes
\tAPOPServerName\t"localhost"
\tUserOverride\tyes
\tAddBulletins\tno
\tLogStatistics\tno
\tAutoLogoutTime\t2m
</Global>
"""

PAM = "auth\trequired\tpam_unix.so\naccount\trequired\tpam_unix.so\n"

# (what solid-pop3d does, what popfetchd does about it)
QUIRKS = [
    ("No TLS at all (no STLS, no POP3S).",
     "`tls: explicit` fails closed (exit 76) before USER/PASS; `tls: none` only "
     "over a trusted network."),
    ("No CAPA: answers `-ERR unknown command`, and counts it towards its limit "
     "of 5 wrong commands per session.",
     "Falls back to the RFC 1939 commands (USER/PASS or APOP from the "
     "greeting's timestamp); one CAPA stays well below the limit."),
    ("UIDL is the MD5 of the message's `Received:`, `Date:`, `Message-Id:` and "
     "`Subject:` header lines (case-sensitive names, so `Message-ID:` is left "
     "out): two messages with the same such headers share a UIDL.",
     "Messages that share a UIDL are known by their content, each saved once "
     "(one saved before under that UIDL too: its content key is recorded "
     "beside the UIDL)."),
    ("Serves the mbox as it is: the `From ` separator line is dropped but "
     "`>From ` quoting is not undone, and the blank line that separates mbox "
     "messages is sent as the last line of each message.",
     "Saves the message byte for byte as the server sends it."),
    ("A refused USER/PASS or APOP is answered `-ERR authentication failed` "
     "after a delay (1 s of its own; with pam_unix's fail delay about 2.5 s "
     "for a wrong password), and the server closes the connection.",
     "Exit 77; the delay is well within the command timeout."),
    ("APOP only for accounts with a secret in ~/.spop3d (set with pop_auth); "
     "the login password is not the APOP secret.",
     "`sasl_mechanisms: [APOP]` needs that secret as `password`."),
]


def program():
    if not os.access(PROGRAM, os.X_OK):
        raise RuntimeError(f"{PROGRAM} not found (run scripts/install-deps as root)")
    return PROGRAM


def package_version():
    """The Debian version of the extracted package, from its changelog."""
    path = os.path.join(SOLID_ROOT, "usr/share/doc/solid-pop3d/changelog.Debian.gz")
    with gzip.open(path, "rt") as f:
        m = re.match(r"solid-pop3d \(([^)]+)\)", f.readline())
    return m.group(1) if m else "unknown"


def _apop_secret(password):
    """The form pop_auth(1) stores in ~/.spop3d: hex of each byte xor 0xff."""
    return bytes(b ^ 0xFF for b in password.encode()).hex()


def _rewrite(path, text):
    """Replace a file's content in place: the namespace has it bind-mounted,
    and a new inode would not be seen there."""
    with open(path, "r+") as f:
        f.seek(0)
        f.write(text)
        f.truncate()


class Mailbox(serverutil.MboxMailbox):
    lock = fcntl.flock  # solid-pop3d flock()s the spool file too

    def __init__(self, server, user, password, uid):
        self.server, self.user, self.password, self.uid = server, user, password, uid
        self.path = os.path.join(server.spool, user)

    def entry(self, data):
        """With a From_ line of the time of delivery."""
        stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime()).encode()
        return serverutil.mbox_entry(data, b"From popfetchd-test@example.org " + stamp + b"\n")

    def __repr__(self):
        return f"Mailbox({self.user!r})"


class Server:
    name = "solid"
    features = {"apop", "uidl", "top"}
    # USER first: the cases then log in through PAM against the namespace's
    # shadow, as every account can; test_apop covers APOP (~/.spop3d secret)
    mechanisms = ["USER", "APOP"]
    quirks = QUIRKS
    host = HOST
    pop3s_port = None
    ca_file = None

    def __init__(self, dir):
        self.dir = dir
        self.etc = os.path.join(dir, "etc")
        self.home = os.path.join(dir, "home")
        self.spool = os.path.join(dir, "mail")
        self.pop3_port = None
        self.listener = None
        self.users = []

    @property
    def version(self):
        return f"solid-pop3d {package_version()}"

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout=10):
        serverutil.require_root("solid-pop3d authenticates system accounts: it needs root "
                                "for a private mount namespace over /etc/passwd and /etc/shadow")
        program()
        self._prepare()
        # stdin stays open while the listener should run: it ends when the
        # test process does, even one that dies without stop()
        with open(os.path.join(self.dir, "listener.err"), "w") as err:
            self.listener = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--",
                 sys.executable, os.path.abspath(__file__), "serve", self.dir],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        line = self.listener.stdout.readline().decode().strip()
        if not line.startswith("port "):
            self.listener.wait(timeout)
            raise RuntimeError(f"solid-pop3d listener failed: {self._err()}")
        self.pop3_port = int(line.split()[1])
        self._wait_ready(timeout)
        return self

    def stop(self, timeout=10):
        if self.listener is None:
            return
        if self.listener.poll() is None:
            self.listener.terminate()  # the listener ends its sessions first
            try:
                self.listener.wait(timeout)
            except subprocess.TimeoutExpired:
                self.listener.kill()
                self.listener.wait()
        self.listener.stdin.close()
        self.listener.stdout.close()
        self.listener = None

    def new_mailbox(self):
        n = len(self.users)
        user, password = f"solid{n:03d}", "pw-" + secrets.token_hex(8)
        uid = self._free_uid(FIRST_UID + n)
        home = os.path.join(self.home, user)
        os.mkdir(home, 0o700)
        os.chown(home, uid, uid)
        with open(os.path.join(home, ".spop3d"), "w") as f:
            f.write(f"APOPSecret {_apop_secret(password)}\n")
            os.fchmod(f.fileno(), 0o600)
            os.fchown(f.fileno(), uid, uid)
        with open(os.path.join(self.spool, user), "w") as f:
            os.fchmod(f.fileno(), 0o600)
            os.fchown(f.fileno(), uid, uid)
        # the interface has one password: it is both the login password and
        # the APOP secret
        self.users.append((user, uid, serverutil.hash_password(password)))
        self._write_accounts()
        return Mailbox(self, user, password, uid)

    # -- files -----------------------------------------------------------------

    def _prepare(self):
        os.chmod(self.dir, 0o755)  # the users' sessions must reach their homes
        for sub, mode in ((self.etc, 0o755), (self.home, 0o755), (self.spool, 0o1777),
                          (os.path.join(self.etc, "pam.d"), 0o755)):
            os.makedirs(sub, exist_ok=True)
            os.chmod(sub, mode)
        for name in ("passwd", "shadow", "group"):
            open(os.path.join(self.etc, name), "a").close()
        os.chmod(os.path.join(self.etc, "shadow"), 0o640)
        with open(os.path.join(self.etc, "pam.d", "solid-pop3d"), "w") as f:
            f.write(PAM)
        with open(os.path.join(self.etc, "spop3d.conf"), "w") as f:
            f.write(CONF)
        os.chmod(os.path.join(self.etc, "spop3d.conf"), 0o644)
        self._write_accounts()

    def _free_uid(self, uid):
        taken = {int(line.split(":")[2]) for line in open("/etc/passwd") if line.count(":") >= 3}
        taken |= {u for _, u, _ in self.users}
        while uid in taken:
            uid += 1
        return uid

    def _write_accounts(self):
        """The machine's accounts, the POP user solid-pop3d runs as and the
        test users, each with a group of its own."""
        passwd = open("/etc/passwd").read()
        group = open("/etc/group").read()
        shadow = "".join(f"{line.split(':', 1)[0]}:*:19000:0:99999:7:::\n"
                         for line in passwd.splitlines() if line)
        days = int(time.time() // 86400)
        if not re.search(rf"^{POPUSER}:", passwd, re.M):
            uid = self._free_uid(FIRST_UID - 100)
            passwd += f"{POPUSER}:x:{uid}:{MAIL_GID}:Solid POP3:{self.dir}:/usr/sbin/nologin\n"
        for user, uid, hashed in self.users:
            passwd += f"{user}:x:{uid}:{uid}:{user}:{self.home}/{user}:/usr/sbin/nologin\n"
            group += f"{user}:x:{uid}:\n"
            shadow += f"{user}:{hashed}:{days}:0:99999:7:::\n"
        _rewrite(os.path.join(self.etc, "passwd"), passwd)
        _rewrite(os.path.join(self.etc, "group"), group)
        _rewrite(os.path.join(self.etc, "shadow"), shadow)

    def _err(self):
        try:
            with open(os.path.join(self.dir, "listener.err")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def _wait_ready(self, timeout):
        serverutil.wait_ready(lambda: serverutil.greetings(self), timeout, "solid-pop3d",
                              details=lambda: "\n" + self._err())


def make(dir):
    return Server(dir)


# --------------------------------------------------------------------------
# the listener, inside the private mount namespace


def _bind(source, target):
    subprocess.run(["mount", "--bind", source, target], check=True)


def serve(dir):
    """Bind the instance's accounts, PAM and spool over the machine's, then run
    solid-pop3d for every connection to a fresh loopback port, announced on
    stdout as "port N"."""
    etc = os.path.join(dir, "etc")
    for name in ("passwd", "shadow", "group"):
        _bind(os.path.join(etc, name), f"/etc/{name}")
    _bind(os.path.join(etc, "pam.d"), "/etc/pam.d")
    _bind(os.path.join(dir, "mail"), "/var/mail")
    sessions = set()

    def end(signum, frame):
        for p in sessions:
            if p.poll() is None:
                p.kill()
        for p in sessions:
            p.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, end)
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(64)
    print(f"port {listener.getsockname()[1]}", flush=True)
    command = [program(), "-f", os.path.join(etc, "spop3d.conf")]
    events = selectors.DefaultSelector()
    events.register(listener, selectors.EVENT_READ)
    events.register(sys.stdin, selectors.EVENT_READ)
    with open(os.path.join(dir, "sessions.err"), "ab") as err:
        while True:
            for key, _ in events.select():
                if key.fileobj is sys.stdin:
                    end(None, None)  # the test process is gone
                conn, _ = listener.accept()
                with conn:
                    sessions.add(subprocess.Popen(command, stdin=conn, stdout=conn,
                                                  stderr=err, cwd="/"))
            sessions -= {p for p in sessions if p.poll() is not None}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} serve DIR")
