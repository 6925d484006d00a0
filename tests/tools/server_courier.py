"""Courier's POP3 server as a server of the interop suite (tests/tools/popservers.py).

Debian's courier-pop conflicts with dovecot-pop3d (both provide pop3-server)
and pulls in an MTA, so scripts/install-deps does not install it: it extracts
courier-pop, courier-base, courier-authlib, courier-authdaemon,
courier-authlib-userdb and the libraries of theirs that are not installed
(libcourier-unicode4, libltdl7) under COURIER_ROOT; they run from there with
LD_LIBRARY_PATH.

Some of Courier's paths are compiled in: authdaemond reads
/etc/courier/authdaemonrc and listens on /run/courier/authdaemon/socket, its
userdb module reads /etc/courier/userdb.dat, couriertls switches to the user
`courier`. So the daemons run in private mount and PID namespaces (`unshare`,
hence root only): /etc gets a read-only overlay that adds an empty courier/
(on which DIR/etc is bound) and a passwd and group with the user courier, and
DIR/run is bound over /run. The machine's /etc and /run are not changed, and
killing the namespace's first process ends every Courier process.

In DIR:
    etc/        authdaemonrc, userdb (the source), userdb.dat, userdbshadow.dat
    run/        /run inside the namespace (authdaemond's socket)
    ovl/        the overlay's top layer on /etc: courier/ (empty), passwd, group
    mail/USER/  each user's Maildir (owned by nobody, as the mail process runs)
    tls/        test PKI (dovecot.make_test_pki); pop3d.pem is key + chain
    log/        stderr of authdaemond and of the two couriertcpd listeners

The processes: authdaemond (module authuserdb); couriertcpd on the POP3 port
running courierpop3login -> courierpop3d (STLS through couriertls); and
couriertcpd on the POP3S port running couriertls -server -tcpd around the
same. The environment is what Courier's pop3d and pop3d-ssl files would
export. Users t0001.. of a pool are in the userdb from the start (passwords
"pass-USER", stored as MD5-crypt for USER/PLAIN/LOGIN and as HMAC-MD5 for
CRAM-MD5); Courier has no APOP.
"""

import os
import shlex
import shutil
import signal
import subprocess

import dovecot as dovecot_tool
import serverutil

COURIER_ROOT = os.environ.get("POPFETCHD_COURIER_ROOT", "/var/cache/popfetchd-test/courier/root")
PACKAGES_FILE = os.path.join(COURIER_ROOT, ".packages")
MAIL_UID = MAIL_GID = 65534  # nobody / nogroup
POOL = 30
AUTH_MECHANISMS = "PLAIN LOGIN CRAM-MD5"


def _root_path(*parts):
    return os.path.join(COURIER_ROOT, *parts)


def _library_path():
    return ":".join(_root_path(p) for p in ("usr/lib", "usr/lib/x86_64-linux-gnu",
                                            "usr/lib/courier-authlib"))


class Mailbox:
    def __init__(self, server, user):
        self.server = server
        self.user = user
        self.password = server.password(user)
        self.maildir = server.maildir(user)

    def deliver(self, *messages):
        return [self.server.deliver(self.user, m) for m in messages]

    def count(self):
        return len(dovecot_tool.maildir_files(self.maildir))

    def reset(self):
        self.server.make_maildir(self.user, fresh=True)

    def __repr__(self):
        return f"Mailbox({self.user!r} on courier {self.server.pop3_port})"


class Server:
    name = "courier"
    host = "127.0.0.1"
    features = {"capa", "stls", "pop3s", "uidl", "top"}
    mechanisms = ["CRAM-MD5", "PLAIN", "LOGIN", "USER"]
    quirks = [
        ("refuses a password with only `-ERR Login failed.` (no [AUTH] code)",
         "a refused login is exit 77 with or without [AUTH]"),
        ("without the UTF8 command (RFC 6856) it replaces a message with 8-bit "
         "header fields by a notice",
         "sends UTF8 after logging in when CAPA lists it, and receives the original"),
        ("has no APOP (its greeting carries no timestamp)",
         "APOP is not offered, so popfetchd uses the next configured mechanism"),
        ("answers STLS with +OK before its TLS helper couriertls runs; when "
         "couriertls cannot start, a plain-text -ERR follows the client's ClientHello",
         "the handshake fails (76), nothing goes in clear, and the message says the "
         "server said +OK to STLS but did not start TLS"),
        ("advertises LOGIN-DELAY 10 in CAPA but does not enforce it",
         "a failed poll is retried no sooner than that; successful polls keep "
         "poll_interval"),
    ]

    def __init__(self, dir):
        self.dir = os.path.abspath(dir)
        self.etc = os.path.join(self.dir, "etc")
        self.tls_dir = os.path.join(self.dir, "tls")
        self.log_dir = os.path.join(self.dir, "log")
        self.ca_file = os.path.join(self.tls_dir, "ca.crt")
        self.pop3_port = self.pop3s_port = None
        self.proc = None
        self._users = {}
        self._claimed = set()

    @property
    def version(self):
        try:
            with open(PACKAGES_FILE) as f:
                return dict(line.split() for line in f if line.strip())["courier-pop"]
        except OSError:
            return "unknown"

    # -- users ---------------------------------------------------------------

    def password(self, user):
        return self._users[user]

    def maildir(self, user):
        return os.path.join(self.dir, "mail", user)

    def make_maildir(self, user, fresh=False):
        md = self.maildir(user)
        if fresh:
            shutil.rmtree(md, ignore_errors=True)
        for sub in ("", "cur", "new", "tmp"):
            path = os.path.join(md, sub)
            os.makedirs(path, exist_ok=True)
            os.chown(path, MAIL_UID, MAIL_GID)
            os.chmod(path, 0o700)

    def deliver(self, user, data):
        """Write one message into the user's new/ (via tmp/), as an MTA does.

        Courier numbers a Maildir's messages in the order of the seconds at
        the start of their file names, then of the rest of the names compared
        byte by byte: the microseconds are zero-padded so that this order is
        the order of delivery."""
        secs, usecs = dovecot_tool._next_stamp()
        name = f"{secs}.M{usecs:06d}P{os.getpid()}.popfetchd-test,S={len(data)}"
        md = self.maildir(user)
        tmp, final = os.path.join(md, "tmp", name), os.path.join(md, "new", name)
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchown(f.fileno(), MAIL_UID, MAIL_GID)
        os.rename(tmp, final)
        return final

    def new_mailbox(self):
        for user in self._users:
            if user not in self._claimed:
                break
        else:
            user = f"t{len(self._users) + 1:04d}"
            self._users[user] = f"pass-{user}"
            self._write_userdb()
        self._claimed.add(user)
        self.make_maildir(user, fresh=True)
        return Mailbox(self, user)

    def _userdbpw(self, option, password):
        res = subprocess.run([_root_path("usr/sbin/userdbpw"), option],
                             input=f"{password}\n{password}\n", capture_output=True,
                             text=True, env={"LD_LIBRARY_PATH": _library_path()})
        if res.returncode != 0 or not res.stdout.strip():
            raise RuntimeError(f"userdbpw {option} failed: {res.stderr}")
        return res.stdout.strip()

    def _write_userdb(self):
        """Write etc/userdb and build userdb.dat/userdbshadow.dat from it the
        way makeuserdb does (its paths are compiled in: it cannot be used on
        DIR/etc), with Courier's makedatprog."""
        source, plain, shadow = [], [], []
        for user, password in self._users.items():
            md = self.maildir(user)
            account = f"uid={MAIL_UID}|gid={MAIL_GID}|home={md}|mail={md}"
            secrets = (f"systempw={self._userdbpw('-md5', password)}"
                       f"|hmac-md5pw={self._userdbpw('-hmac-md5', password)}")
            source.append(f"{user}\t{account}|{secrets}\n")
            plain.append(f"{user}\t{account}|_=\n")
            shadow.append(f"{user}\t{secrets}\n")
        path = os.path.join(self.etc, "userdb")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("".join(source))
        for name, lines, mode in (("userdb", plain, 0o644), ("userdbshadow", shadow, 0o600)):
            tmp, dat = (os.path.join(self.etc, f"{name}{ext}") for ext in (".tmp", ".dat"))
            res = subprocess.run([_root_path("usr/lib/courier/courier-authlib/makedatprog"),
                                  "-", tmp, dat], input="".join(lines) + "\n.\n",
                                 capture_output=True, text=True,
                                 env={"LD_LIBRARY_PATH": _library_path()})
            if res.returncode != 0:
                raise RuntimeError(f"makedatprog {dat} failed: {res.stdout}{res.stderr}")
            os.chmod(dat, mode)

    # -- configuration -------------------------------------------------------

    def _prepare(self):
        for sub in ("", "etc", "run/courier/authdaemon", "mail", "tls", "log", "ovl/courier"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        for sub in ("", "mail", "tls"):
            os.chmod(os.path.join(self.dir, sub), 0o755)
        self._write_passwd()
        with open(os.path.join(self.etc, "authdaemonrc"), "w") as f:
            f.write('authmodulelist="authuserdb"\nauthmodulelistorig="authuserdb"\n'
                    'daemons=2\nauthdaemonvar=/run/courier/authdaemon\n'
                    'DEBUG_LOGIN=0\nDEFAULTOPTIONS=""\nLOGGEROPTS=""\n')
        dovecot_tool.make_test_pki(self.tls_dir)
        pem = os.path.join(self.tls_dir, "pop3d.pem")
        with open(os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            for part in ("server.key", "server.crt", "ca.crt"):
                with open(os.path.join(self.tls_dir, part)) as f:
                    out.write(f.read())
        os.chown(pem, self.courier_uid, self.courier_uid)
        self._users = {f"t{n:04d}": f"pass-t{n:04d}" for n in range(1, POOL + 1)}
        self._write_userdb()

    def _write_passwd(self):
        """passwd and group for the namespace's /etc: the machine's, plus the
        user `courier` that couriertls switches to (compiled in) and that
        owns the certificate."""
        files = {}
        for name in ("passwd", "group"):
            with open(os.path.join("/etc", name)) as f:
                files[name] = f.read()
        taken = {int(line.split(":")[2]) for text in files.values()
                 for line in text.splitlines() if line.count(":") >= 3}
        self.courier_uid = next(n for n in range(64999, 1000, -1) if n not in taken)
        files["passwd"] += f"courier:x:{self.courier_uid}:{self.courier_uid}::/nonexistent:/bin/false\n"
        files["group"] += f"courier:x:{self.courier_uid}:\n"
        for name, text in files.items():
            with open(os.path.join(self.dir, "ovl", name), "w") as f:
                f.write(text)
            os.chmod(os.path.join(self.dir, "ovl", name), 0o644)

    def _pop3_env(self):
        """What Courier's pop3d and pop3d-ssl configuration files would export."""
        return {
            "PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": _library_path(),
            "POP3AUTH": AUTH_MECHANISMS, "POP3AUTH_TLS": AUTH_MECHANISMS,
            "POP3_PROXY": "0", "MIME_UNICODE_MESSAGE_TYPE": "message/global",
            "COURIERTLS": _root_path("usr/bin/couriertls"),
            "TLS_CERTFILE": os.path.join(self.tls_dir, "pop3d.pem"),
            "TLS_TRUSTCERTS": self.ca_file, "TLS_VERIFYPEER": "NONE",
            "POP3_STARTTLS": "YES", "POP3_TLS_REQUIRED": "0",
        }

    def _script(self):
        """The shell run in the private mount namespace: mounts, then the
        three daemons, each with its stderr in log/."""
        q = shlex.quote
        lib = _root_path("usr/lib/courier")
        login = [f"{lib}/courier/courierpop3login", f"{lib}/courier/courierpop3d", "Maildir"]
        tcpd = [_root_path("usr/sbin/couriertcpd"), "-address=" + self.host,
                "-maxprocs=40", "-maxperip=40", "-nodnslookup", "-noidentlookup"]
        plain = tcpd + [str(self.pop3_port)] + login
        tls = tcpd + [str(self.pop3s_port), _root_path("usr/bin/couriertls"), "-server",
                      "-tcpd", "-user=courier"] + login
        log = lambda name: q(os.path.join(self.log_dir, name))
        return "\n".join([
            "set -e",
            f"mount -t overlay overlay -o ro,lowerdir={q(self.dir + '/ovl')}:/etc /etc",
            f"mount --bind {q(self.etc)} /etc/courier",
            f"mount --bind {q(self.dir + '/run')} /run",
            f"{q(lib + '/courier-authlib/authdaemond')} 2>>{log('authdaemond.log')} &",
            f"{' '.join(map(q, plain))} 2>>{log('pop3d.log')} &",
            f"POP3_TLS=1 POP3_STARTTLS=NO {' '.join(map(q, tls))} 2>>{log('pop3d-ssl.log')} &",
            "wait",
        ])

    # -- start / stop --------------------------------------------------------

    def start(self):
        serverutil.require_root("Courier runs in a private mount namespace: needs root")
        if not os.path.exists(_root_path("usr/lib/courier/courier/courierpop3d")):
            raise RuntimeError(f"Courier is not extracted in {COURIER_ROOT}: "
                               "run scripts/install-deps")
        self._prepare()
        self.pop3_port, self.pop3s_port = dovecot_tool.free_ports(2)
        with open(os.path.join(self.log_dir, "start.log"), "ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                 "--kill-child", "/bin/sh", "-c", self._script()],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                env=self._pop3_env(), start_new_session=True)
        self._wait_ready(15)
        return self

    def stop(self):
        """SIGKILL the namespace's first process (the shell; unshare itself
        ignores SIGTERM while it waits): the kernel then kills every process
        in the PID namespace, daemons, sessions and the orphans of Courier's
        double forks alike, and unshare exits."""
        if self.proc is None:
            return
        pids = [self.proc.pid] + dovecot_tool._descendants(self.proc.pid)
        for pid in pids[1:]:
            if (dovecot_tool._proc_stat(pid) or (None, None))[1] == self.proc.pid:
                dovecot_tool._kill(pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if not dovecot_tool._wait_gone(pids, 5):
            for pid in pids:
                dovecot_tool._kill(pid, signal.SIGKILL)
        self.proc = None

    def _wait_ready(self, timeout):
        socket_path = os.path.join(self.dir, "run/courier/authdaemon/socket")

        def ready():
            if not os.path.exists(socket_path):
                raise OSError("no authdaemond socket yet")
            serverutil.greetings(self)
        serverutil.wait_ready(ready, timeout, f"Courier in {self.dir}", self.proc, self._logs)

    def _logs(self):
        return "".join(serverutil.log_tail(os.path.join(self.log_dir, name))
                       for name in sorted(os.listdir(self.log_dir)))


def make(dir):
    return Server(dir)
