"""popa3d as a server of the interop suite (tests/tools/popservers.py).

popa3d (Openwall; Debian package `popa3d`) serves system accounts: it checks
the password with PAM and reads the mbox /var/mail/USER. Its package conflicts
with dovecot-pop3d (both provide pop3-server), so scripts/install-deps only
extracts it under /var/cache/popfetchd-test/popa3d/root; nothing of it is
installed, enabled or started on the machine.

The instance runs in a private mount namespace (`unshare -m`) in which the
files popa3d and pam_unix read are this instance's own, bound over the real
ones: etc/passwd, etc/shadow, etc/group, pam.d (only a `popa3d` service with
pam_unix), spool over /var/mail, and varlib over /var/lib so that popa3d's
privilege-separation chroot /var/lib/popa3d exists (its process checking the
password chroots there and runs as the user `popa3d`, which is in the
temporary passwd). popa3d is an inetd service: a small listener in the
namespace (this file, run as `--serve`) accepts on a loopback port and runs one
popa3d per connection with the socket as stdin and stdout, inetd "nowait"
style. Its standalone mode (-D) is not used: it binds 0.0.0.0:110.

The temporary passwd/shadow are bound by inode: new users are appended in
place, and the running namespace sees them.
"""

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import dovecot as dovecot_tool  # noqa: E402  (free_ports, process helpers)
import serverutil  # noqa: E402

EXTRACTED = "/var/cache/popfetchd-test/popa3d"
MAIL_GID = 8
FIRST_UID = 61100  # test users and `popa3d` get ids from here (unused on Debian)
PAM_SERVICE = "auth required pam_unix.so\naccount required pam_unix.so\n"


def program():
    """The popa3d binary: extracted by scripts/install-deps, or installed."""
    for path in (os.path.join(EXTRACTED, "root/usr/sbin/popa3d"), "/usr/sbin/popa3d"):
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"popa3d not found in {EXTRACTED}/root (run scripts/install-deps as root)")


def package_version():
    try:
        with open(os.path.join(EXTRACTED, "root/.packages")) as f:
            return f.read().split()[1]
    except OSError:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "popa3d"],
                             capture_output=True, text=True)
        return out.stdout.strip() or "unknown"


class Mailbox(serverutil.MboxMailbox):
    lock = fcntl.lockf  # popa3d locks the mbox with fcntl

    def __init__(self, server, user, password, uid):
        self.server, self.user, self.password, self.uid = server, user, password, uid
        self.path = os.path.join(server.spool, user)

    def __repr__(self):
        return f"Mailbox({self.user!r} on popa3d {self.server.host}:{self.server.pop3_port})"


class Server:
    name = "popa3d"
    host = dovecot_tool.HOST
    pop3s_port = None
    ca_file = None
    features = {"uidl", "top"}
    mechanisms = ["USER"]
    quirks = [
        ("no CAPA (-ERR), so no STLS and no SASL; no implicit TLS port",
         "logs in with USER/PASS; `tls: explicit` fails closed after CAPA (exit 76), "
         "before the user name is sent"),
        ("no APOP (no timestamp in the greeting)",
         "`sasl_mechanisms: [APOP]` alone: \"no usable login mechanism\" (exit 77), "
         "nothing sent"),
        ("UIDL is 16 hex digits of an MD5 of the Received, Delivered-To, Date, "
         "Message-ID and X-Delivery-ID header fields only: messages alike in those "
         "share a UIDL (every message without any of them: d98c1dd404b2008f)",
         "messages that share a UIDL are known by their content: each saved once"),
        ("mbox spool: any line \"From \" after a blank line starts a new message; "
         "\">From \" lines are sent as stored (no unquoting)",
         "saves what the server sends, byte-exact (the MDA's \">From \" stays)"),
        ("message lines are sent as stored, of any length (20000 bytes tried), "
         "NUL and bare CR included",
         "saved byte-exact"),
        ("a wrong password: \"-ERR Authentication failed (bad password?)\" after "
         "about 2 s (PAM's delay)",
         "exit 77"),
    ]

    def __init__(self, dir):
        self.dir = os.path.abspath(dir)
        self.etc = os.path.join(self.dir, "etc")
        self.spool = os.path.join(self.dir, "spool")
        self.log_path = os.path.join(self.dir, "popa3d.log")
        self.pop3_port = None
        self.proc = None
        self._users = 0

    @property
    def version(self):
        return package_version()

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout=10):
        serverutil.require_root("popa3d needs root: a private mount namespace and PAM "
                                "against a temporary /etc/shadow")
        binary = program()
        self._prepare()
        self.pop3_port = dovecot_tool.free_ports(1)[0]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", sys.executable,
                 os.path.abspath(__file__), "--serve", self.dir, str(self.pop3_port), binary],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def stop(self, timeout=5):
        if self.proc is None:
            return
        family = [self.proc.pid] + dovecot_tool._descendants(self.proc.pid)
        for pid in family:
            dovecot_tool._kill(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        if not dovecot_tool._wait_gone(family, timeout):
            for pid in family:
                dovecot_tool._kill(pid, signal.SIGKILL)
            self.proc.wait(timeout)
        self.proc = None

    def new_mailbox(self):
        """A fresh system account (in the namespace's passwd and shadow only)
        with an empty /var/mail/USER."""
        self._users += 1
        user, password = f"pa{self._users}", f"pa3d-secret-{self._users}"
        uid = FIRST_UID + self._users
        hashed = serverutil.hash_password(password)
        self._append("passwd", f"{user}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n")
        self._append("group", f"{user}:x:{uid}:\n")
        self._append("shadow", f"{user}:{hashed}:20000:0:99999:7:::\n")
        path = os.path.join(self.spool, user)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchown(fd, uid, uid)
        os.close(fd)
        return Mailbox(self, user, password, uid)

    # -- helpers -------------------------------------------------------------

    def _prepare(self):
        """etc/{passwd,shadow,group}, pam.d/popa3d, spool and the chroot."""
        for sub in ("etc", "pam.d", "spool", "varlib/popa3d"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        os.chown(self.spool, 0, MAIL_GID)  # as Debian's /var/mail: root:mail 2775
        os.chmod(self.spool, 0o2775)
        os.chmod(os.path.join(self.dir, "varlib/popa3d"), 0o755)
        pid = FIRST_UID
        files = {
            "passwd": ("root:x:0:0:root:/root:/bin/sh\n"
                       f"popa3d:x:{pid}:{pid}::/var/lib/popa3d:/usr/sbin/nologin\n"),
            "group": f"root:x:0:\nmail:x:{MAIL_GID}:\npopa3d:x:{pid}:\n",
            "shadow": "root:*:20000:0:99999:7:::\npopa3d:*:20000:0:99999:7:::\n",
        }
        for name, text in files.items():
            with open(os.path.join(self.etc, name), "w") as f:
                f.write(text)
        os.chmod(os.path.join(self.etc, "shadow"), 0o600)
        with open(os.path.join(self.dir, "pam.d", "popa3d"), "w") as f:
            f.write(PAM_SERVICE)

    def _append(self, name, line):
        with open(os.path.join(self.etc, name), "a") as f:
            f.write(line)

    def _wait_ready(self, timeout):
        serverutil.wait_ready(lambda: serverutil.greetings(self), timeout,
                              f"popa3d listener on port {self.pop3_port}", self.proc,
                              lambda: serverutil.log_tail(self.log_path))


def make(dir):
    return Server(dir)


# --------------------------------------------------------------------------
# the listener, run by `unshare -m` in the instance's own mount namespace


BINDS = (("etc/passwd", "/etc/passwd"), ("etc/shadow", "/etc/shadow"),
         ("etc/group", "/etc/group"), ("pam.d", "/etc/pam.d"),
         ("spool", "/var/mail"), ("varlib", "/var/lib"))


def _serve(dir, port, binary):
    for src, dst in BINDS:
        subprocess.run(["mount", "--bind", os.path.join(dir, src), dst], check=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the sessions
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((dovecot_tool.HOST, port))
    listener.listen(64)
    while True:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            raise
        with conn:
            subprocess.Popen([binary], stdin=conn, stdout=conn, close_fds=True,
                             cwd="/", env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        _serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"usage: {sys.argv[0]} --serve DIR PORT POPA3D")
