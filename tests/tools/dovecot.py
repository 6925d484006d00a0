#!/usr/bin/env python3
"""A throwaway Dovecot POP3 server for popfetchd's tests and benchmarks.

Usage:
    python3 tests/tools/dovecot.py up DIR [--users N]   start (restarts a running one)
    python3 tests/tools/dovecot.py down DIR             stop
    python3 tests/tools/dovecot.py status DIR           print the settings, exit 1 if stopped

Everything lives in DIR (keep it short, at most 60 characters: Dovecot's
UNIX sockets live in DIR/run and sun_path is limited to 108 bytes):

    dovecot.conf  dovecot.log  run/ (base_dir)  state/  users (passwd-file)
    mail/USER/    Maildir of each user (owned by the mail user)
    tls/          test CA (ca.crt), server.crt (localhost, 127.0.0.1, ::1),
                  expired.crt (same names, expired), wronghost.crt
                  (wrong.example), each with its .key, all signed by the CA
    dovecot.json  ports and users (read by `down` and Dovecot.attach())
    env           the same as shell variables (POP3_PORT=... CA_FILE=...)

With oauth2_introspection_url (CLI: --oauth2-introspection-url URL), a
second passdb is added: driver oauth2 for the XOAUTH2 and OAUTHBEARER
mechanisms, configured in DIR/dovecot-oauth2.conf.ext to ask an RFC 7662
endpoint (introspection_mode = post: "token=T" form-encoded, trusting
the test CA) for {"active": true, "username": USER}; see
tests/tools/tokenserver.py. The password passdb keeps serving the other
mechanisms.

Listeners on free 127.0.0.1 ports: POP3 with STLS, and POP3S. Users user1..N
have {PLAIN} passwords (so CRAM-MD5, SCRAM and APOP work) in a passwd-file;
more can be added while Dovecot runs (add_user). As root, mail processes run
as `nobody` and the Maildirs belong to it; as an ordinary user everything runs
as that user. Stdlib only; needs the dovecot, doveadm and openssl programs.

As a module:

    d = Dovecot("/tmp/pfd-x", users=2)
    d.start()
    d.deliver("user1", b"From: a@example.org\\nSubject: hi\\n\\nbody\\n")
    poplib.POP3(d.host, d.pop3_port) ... d.password("user1")
    d.stop()
"""

import argparse
import json
import os
import pwd
import grp
import shutil
import signal
import socket
import subprocess
import sys
import time

import serverutil

HOST = "127.0.0.1"
MAX_DIR_LEN = 60
AUTH_MECHANISMS = "plain login cram-md5 scram-sha-1 scram-sha-256 apop"
OAUTH2_MECHANISMS = "xoauth2 oauthbearer"
SERVICE_PROCESS_PREFIX = "dovecot"


def program(name):
    """Absolute path of a Dovecot or OpenSSL program (sbin is not always on PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not found:
        raise RuntimeError(f"{name} not found (apt-get install dovecot-core dovecot-pop3d openssl)")
    return found


def free_ports(count):
    """Return `count` distinct TCP ports on 127.0.0.1 that are free right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port):
    """True if nothing listens on 127.0.0.1:port and it can be bound."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------
# processes


def _proc_stat(pid):
    """(state, ppid) of a process from /proc, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid):
    """True if pid exists and is not a zombie (PID 1 here may not reap)."""
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _descendants(pid):
    """All live descendants of pid (Dovecot's service processes)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st and st[0] not in ("Z", "X"):
                children.setdefault(st[1], []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(process_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return not any(process_alive(p) for p in pids)


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------
# Maildir


_last_stamp = [0]


def _next_stamp():
    """A strictly increasing (seconds, microseconds) pair for Maildir names.

    Dovecot gives new messages their UIDs in the order of the time in their
    file names (seconds, then the .M microseconds), so this keeps the POP3
    message order equal to the delivery order even within one second.
    """
    now = time.time_ns() // 1000
    stamp = max(now, _last_stamp[0] + 1)
    _last_stamp[0] = stamp
    return divmod(stamp, 1_000_000)


def maildir_deliver(maildir, data, uid=-1, gid=-1):
    """Deliver `data` (bytes, LF line endings as an MTA writes them) to maildir.

    Written to tmp/, fsync'd, chowned to uid/gid (when not -1) and renamed
    into new/, as a Maildir MTA does. Returns the final path.
    """
    for sub in ("tmp", "new", "cur"):
        path = os.path.join(maildir, sub)
        if not os.path.isdir(path):
            os.makedirs(path)
            os.chown(path, uid, gid)
    secs, usecs = _next_stamp()
    vsize = len(data) + data.count(b"\n") - data.count(b"\r\n")
    name = (f"{secs}.M{usecs}P{os.getpid()}.popfetchd-test"
            f",S={len(data)},W={vsize}")
    tmp = os.path.join(maildir, "tmp", name)
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.fchown(f.fileno(), uid, gid)
    final = os.path.join(maildir, "new", name)
    os.rename(tmp, final)
    return final


def _maildir_sort_key(name):
    """Dovecot's order for new mail: time in the name, then .M usecs, then name."""
    head = name.split(".", 2)
    secs = int(head[0]) if head[0].isdigit() else 0
    usecs = 0
    if len(head) > 1 and head[1].startswith("M") and head[1][1:].split("P")[0].isdigit():
        usecs = int(head[1][1:].split("P")[0])
    return secs, usecs, name


def maildir_files(maildir):
    """Paths of the messages in new/ and cur/, in Dovecot's (delivery) order."""
    found = []
    for sub in ("new", "cur"):
        path = os.path.join(maildir, sub)
        if os.path.isdir(path):
            found += [(n, os.path.join(path, n)) for n in os.listdir(path)
                      if not n.startswith(".")]
    # a message moved from new/ to cur/ gets ":2,FLAGS" appended; strip it
    found.sort(key=lambda item: _maildir_sort_key(item[0].split(":", 1)[0]))
    return [p for _, p in found]


# --------------------------------------------------------------------------
# TLS material


def _openssl(*args, cwd):
    res = subprocess.run([program("openssl"), *args], cwd=cwd,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{res.stderr}")


_CA_CONF = """\
[ ca ]
default_ca = testca
[ testca ]
database = index.txt
new_certs_dir = issued
serial = serial
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
[ policy_any ]
commonName = supplied
"""

_LEAF_EXT = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
"""

# name -> (common name, subjectAltName, validity arguments for `openssl ca`)
LEAF_CERTS = {
    "server": ("localhost", "DNS:localhost,IP:127.0.0.1,IP:::1", ["-days", "3650"]),
    "expired": ("localhost", "DNS:localhost,IP:127.0.0.1,IP:::1",
                ["-startdate", "20200101000000Z", "-enddate", "20200201000000Z"]),
    "wronghost": ("wrong.example", "DNS:wrong.example", ["-days", "3650"]),
}


def _new_key_and_csr(tlsdir, name, cn):
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
             cwd=tlsdir)


def make_test_pki(tlsdir):
    """Create the test CA and the server, expired and wronghost certificates.

    Idempotent: nothing is regenerated when tls/server.crt already exists.
    Leaf certificates are ECDSA P-256 with SKI/AKI and serverAuth, so that
    strict verifiers (OpenSSL 3, Python's VERIFY_X509_STRICT) accept them.
    """
    if os.path.exists(os.path.join(tlsdir, "wronghost.crt")):
        return
    os.makedirs(os.path.join(tlsdir, "issued"), exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-subj", "/CN=popfetchd test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=tlsdir)
    with open(os.path.join(tlsdir, "ca.cnf"), "w") as f:
        f.write(_CA_CONF)
    open(os.path.join(tlsdir, "index.txt"), "w").close()
    with open(os.path.join(tlsdir, "serial"), "w") as f:
        f.write("1000\n")
    for name, (cn, san, validity) in LEAF_CERTS.items():
        _new_key_and_csr(tlsdir, name, cn)
        with open(os.path.join(tlsdir, f"{name}.ext"), "w") as f:
            f.write(_LEAF_EXT.format(san=san))
        _openssl("ca", "-batch", "-notext", "-config", "ca.cnf", "-cert", "ca.crt",
                 "-keyfile", "ca.key", "-in", f"{name}.csr", "-out", f"{name}.crt",
                 "-extfile", f"{name}.ext", *validity, cwd=tlsdir)
        os.unlink(os.path.join(tlsdir, f"{name}.csr"))
    for entry in os.listdir(tlsdir):
        mode = 0o600 if entry.endswith(".key") else 0o644
        if os.path.isfile(os.path.join(tlsdir, entry)):
            os.chmod(os.path.join(tlsdir, entry), mode)


# --------------------------------------------------------------------------
# configuration


def _privilege_settings(mail_user):
    """The Dovecot settings that differ between running as root or not."""
    if os.geteuid() == 0:
        return "default_internal_user = dovecot\ndefault_login_user = dovenull\n"
    group = grp.getgrgid(os.getgid()).gr_name
    return (f"default_internal_user = {mail_user}\n"
            f"default_internal_group = {group}\n"
            f"default_login_user = {mail_user}\n"
            "service pop3-login {\n  chroot =\n}\n")


def oauth2_conf(d):
    """The text of DIR/dovecot-oauth2.conf.ext (the oauth2 passdb's args)."""
    return f"""\
# generated by tests/tools/dovecot.py: Dovecot's oauth2 passdb asks an RFC 7662
# introspection endpoint with POST token=TOKEN
introspection_mode = post
introspection_url = {d.oauth2_introspection_url}
username_attribute = username
active_attribute = active
active_value = true
tls_ca_cert_file = {d.oauth2_ca_file or d.ca_file}
timeout_msecs = 10000
"""


def _passdbs(d):
    """The passdb blocks: the passwd-file, plus the oauth2 one when enabled."""
    passwd = f"""\
passdb {{
  driver = passwd-file
  args = username_format=%u {d.passwd_path}
{"  mechanisms = " + AUTH_MECHANISMS + chr(10) if d.oauth2_introspection_url else ""}\
}}
"""
    if not d.oauth2_introspection_url:
        return passwd
    return passwd + f"""\
passdb {{
  driver = oauth2
  mechanisms = {OAUTH2_MECHANISMS}
  args = {d.oauth2_conf_path}
}}
"""


def dovecot_conf(d):
    """The text of dovecot.conf for the Dovecot instance `d`."""
    mechanisms = AUTH_MECHANISMS + (" " + OAUTH2_MECHANISMS if d.oauth2_introspection_url else "")
    anvil_chroot = "" if os.geteuid() == 0 else "  chroot =\n"
    dh = "ssl_dh = </usr/share/dovecot/dh.pem\n" if os.path.exists("/usr/share/dovecot/dh.pem") else ""
    return f"""\
# generated by tests/tools/dovecot.py; start by hand with: dovecot -c {d.conf_path}
instance_name = {os.path.basename(d.dir)}
base_dir = {d.dir}/run
state_dir = {d.dir}/state
log_path = {d.log_path}
protocols = pop3
listen = {HOST}
{_privilege_settings(d.mail_user)}\
first_valid_uid = 0
first_valid_gid = 0
mail_location = maildir:{d.dir}/mail/%u
ssl = yes
ssl_cert = <{d.cert_file}
ssl_key = <{d.key_file}
{dh}\
disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_verbose = yes
auth_cache_size = 0
{_passdbs(d)}\
userdb {{
  driver = static
  args = uid={d.mail_uid} gid={d.mail_gid} home={d.dir}/mail/%u
}}
mail_max_userip_connections = 100
# no growing auth penalty for 127.0.0.1 after failed logins (tests fail on purpose)
service anvil {{
{anvil_chroot}\
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {d.pop3_port}
  }}
  inet_listener pop3s {{
    address = {HOST}
    port = {d.pop3s_port}
    ssl = yes
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
protocol pop3 {{
  pop3_uidl_format = %08Xu%08Xv
}}
"""


# --------------------------------------------------------------------------
# the server


class Mailbox:
    """One user's mailbox on a Dovecot: a convenience view for tests."""

    def __init__(self, dovecot, user):
        self.dovecot = dovecot
        self.user = user
        self.password = dovecot.password(user)
        self.maildir = dovecot.maildir(user)

    def deliver(self, *messages):
        """Deliver one or more messages (bytes); returns their paths."""
        return [self.dovecot.deliver(self.user, m) for m in messages]

    def count(self):
        return self.dovecot.count(self.user)

    def messages(self):
        return self.dovecot.messages(self.user)

    def reset(self):
        self.dovecot.reset(self.user)

    def __repr__(self):
        return f"Mailbox({self.user!r} on {self.dovecot.host}:{self.dovecot.pop3_port})"


class Dovecot:
    """A private Dovecot instance rooted in `dir` (see the module docstring)."""

    host = HOST

    def __init__(self, dir, users=4, cert="server", pool=200, oauth2_introspection_url=None,
                 oauth2_ca_file=None):
        """Prepare (not start) an instance with users user1..`users` and a
        pool of `pool` users for add_user(). `cert` picks the served
        certificate: "server", "expired" or "wronghost" (same CA).
        oauth2_introspection_url: also accept XOAUTH2 and OAUTHBEARER,
        checking tokens at this RFC 7662 endpoint (https; trusted with
        oauth2_ca_file, default the test CA)."""
        self.dir = os.path.abspath(dir)
        if len(self.dir) > MAX_DIR_LEN:
            raise ValueError(f"Dovecot dir too long for UNIX sockets (> {MAX_DIR_LEN}): {self.dir}")
        if cert not in LEAF_CERTS:
            raise ValueError(f"unknown cert {cert!r}, one of {sorted(LEAF_CERTS)}")
        self.cert = cert
        self.oauth2_introspection_url, self.oauth2_ca_file = oauth2_introspection_url, oauth2_ca_file
        self.initial_users, self.pool = users, pool
        self._claimed = set()
        self.pop3_port = self.pop3s_port = None
        self.mail_user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        pw = pwd.getpwnam(self.mail_user)
        self.mail_uid, self.mail_gid = pw.pw_uid, pw.pw_gid
        self._load_state()

    # -- paths ---------------------------------------------------------------

    conf_path = property(lambda self: os.path.join(self.dir, "dovecot.conf"))
    log_path = property(lambda self: os.path.join(self.dir, "dovecot.log"))
    pid_path = property(lambda self: os.path.join(self.dir, "run", "master.pid"))
    passwd_path = property(lambda self: os.path.join(self.dir, "users"))
    state_path = property(lambda self: os.path.join(self.dir, "dovecot.json"))
    tls_dir = property(lambda self: os.path.join(self.dir, "tls"))
    ca_file = property(lambda self: os.path.join(self.tls_dir, "ca.crt"))
    cert_file = property(lambda self: os.path.join(self.tls_dir, f"{self.cert}.crt"))
    key_file = property(lambda self: os.path.join(self.tls_dir, f"{self.cert}.key"))
    oauth2_conf_path = property(lambda self: os.path.join(self.dir, "dovecot-oauth2.conf.ext"))

    def cert_path(self, name):
        """Path of the named certificate ("ca", "server", "expired", "wronghost")."""
        return os.path.join(self.tls_dir, f"{name}.crt")

    def key_path(self, name):
        return os.path.join(self.tls_dir, f"{name}.key")

    @classmethod
    def attach(cls, dir):
        """A Dovecot object for an instance started earlier (e.g. by the CLI)."""
        d = cls(dir, users=0, pool=0)
        if d.pop3_port is None:
            raise RuntimeError(f"no Dovecot state in {d.dir} (run `dovecot.py up` first)")
        return d

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout=15):
        """Start Dovecot; a running or stale instance in the same dir is stopped
        first. Ports are kept from a previous start when still free."""
        self.stop()
        self._prepare_dirs()
        make_test_pki(self.tls_dir)
        self._create_initial_users()
        self._choose_ports()
        if self.oauth2_introspection_url:
            with open(self.oauth2_conf_path, "w") as f:
                f.write(oauth2_conf(self))
            os.chmod(self.oauth2_conf_path, 0o644)
        with open(self.conf_path, "w") as f:
            f.write(dovecot_conf(self))
        self._save_state()
        # no pipes: the daemonized master would inherit them and hold them open
        with open(os.path.join(self.dir, "start.err"), "w+") as err:
            res = subprocess.run([program("dovecot"), "-c", self.conf_path],
                                 stdin=subprocess.DEVNULL, stdout=err, stderr=err)
            err.seek(0)
            if res.returncode != 0:
                raise RuntimeError(f"dovecot failed to start: {err.read()}{self._log_tail()}")
        self._wait_ready(timeout)
        return self

    def stop(self, timeout=10):
        """Stop the instance: `doveadm stop`, then SIGKILL whatever is left
        (master and service processes). Safe when not running or stale."""
        pid = self.pid()
        if pid is None:
            self._remove_pid_file()
            return
        family = [pid] + _descendants(pid)
        try:
            subprocess.run([program("doveadm"), "-c", self.conf_path, "stop"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=timeout / 2)
        except subprocess.TimeoutExpired:
            pass
        _kill(pid, signal.SIGTERM)  # in case doveadm could not (e.g. a broken config)
        if not _wait_gone([pid], timeout / 2):
            family += _descendants(pid)
            for p in family:
                _kill(p, signal.SIGKILL)
        leftovers = [p for p in family if process_alive(p) and _is_dovecot(p)]
        for p in leftovers:
            _kill(p, signal.SIGKILL)
        _wait_gone(leftovers, timeout / 2)
        self._remove_pid_file()

    def pid(self):
        """PID of this instance's running master, or None (stale files ignored)."""
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        # a stale pid file may name a reused pid: check it is our master
        if not process_alive(pid) or self.conf_path not in _cmdline(pid).split():
            return None
        return pid

    def running(self):
        return self.pid() is not None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- users and mail ------------------------------------------------------

    @property
    def users(self):
        """The users in the passwd-file, in order, without the unused pool."""
        return [u for u in self._passwd() if not u.startswith("t") or u in self._claimed]

    def password(self, user):
        return self._passwd()[user]

    def add_user(self, user=None, password=None):
        """A fresh user with an empty Maildir; returns its name.

        Without arguments, hands out the next unused user of the pool
        (t0001, t0002, ... created at start; password "pass-USER") at once.
        A named user, or one beyond the pool, is appended to the passwd-file
        while Dovecot runs; that takes a second, because Dovecot rereads the
        file at most once per second.
        """
        if user is None and password is None:
            for name in self._passwd():
                if name.startswith("t") and name not in self._claimed:
                    self._claimed.add(name)
                    self.reset(name)
                    return name
            user = self._next_pool_name()
        self._append_user(user, password)
        self._claimed.add(user)
        self._make_maildir(user)
        time.sleep(1.1)  # outlast Dovecot's passwd-file sync interval
        return user

    def _next_pool_name(self):
        existing, n = self._passwd(), 1
        while f"t{n:04d}" in existing:
            n += 1
        return f"t{n:04d}"

    def _append_user(self, user, password=None):
        if user in self._passwd():
            raise ValueError(f"user {user} exists")
        password = password if password is not None else f"pass-{user}"
        if ":" in user + password or "\n" in user + password:
            raise ValueError("user names and passwords must not contain ':' or newlines")
        with open(self.passwd_path, "a") as f:
            f.write(f"{user}:{{PLAIN}}{password}::::::\n")

    def mailbox(self, user):
        return Mailbox(self, user)

    def maildir(self, user):
        return os.path.join(self.dir, "mail", user)

    def deliver(self, user, data):
        """Write one message (bytes) into the user's Maildir new/ (via tmp/)."""
        return maildir_deliver(self.maildir(user), data, self.mail_uid, self.mail_gid)

    def count(self, user):
        """Messages in the user's Maildir (new/ + cur/)."""
        return len(maildir_files(self.maildir(user)))

    def messages(self, user):
        """The messages (bytes, as stored: LF) now in the Maildir, oldest first."""
        out = []
        for path in maildir_files(self.maildir(user)):
            with open(path, "rb") as f:
                out.append(f.read())
        return out

    def reset(self, user):
        """Empty the user's Maildir and remove Dovecot's index and UID files."""
        shutil.rmtree(self.maildir(user), ignore_errors=True)
        self._make_maildir(user)

    # -- logs ----------------------------------------------------------------

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def login_methods(self, user):
        """The SASL methods of the user's successful logins, from the log
        (e.g. ["PLAIN", "SCRAM-SHA-256"]; USER/PASS logs as PLAIN)."""
        methods = []
        for line in self.log_text().splitlines():
            if "Login: user=<%s>" % user in line and "method=" in line:
                methods.append(line.split("method=", 1)[1].split(",", 1)[0])
        return methods

    def env(self):
        """The instance's settings as a dict of shell variables."""
        return {
            "DOVECOT_DIR": self.dir, "DOVECOT_CONF": self.conf_path,
            "DOVECOT_PID": str(self.pid() or ""), "POP3_HOST": self.host,
            "POP3_PORT": str(self.pop3_port), "POP3S_PORT": str(self.pop3s_port),
            "CA_FILE": self.ca_file, "MAIL_ROOT": os.path.join(self.dir, "mail"),
            "USERS": " ".join(self.users),
        }

    # -- internals -----------------------------------------------------------

    def _prepare_dirs(self):
        for sub in ("", "run", "state", "mail", "tls"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        # the auth process (internal user) and mail processes (nobody) need
        # to traverse DIR and read the passwd-file
        for sub in ("", "run", "state", "mail"):
            os.chmod(os.path.join(self.dir, sub), 0o755)
        os.chmod(self.tls_dir, 0o755)

    def _create_initial_users(self):
        if not os.path.exists(self.passwd_path):
            open(self.passwd_path, "w").close()
        os.chmod(self.passwd_path, 0o644)
        existing = self._passwd()
        for i in range(1, self.initial_users + 1):
            if f"user{i}" not in existing:
                self._append_user(f"user{i}")
            self._make_maildir(f"user{i}")
        pool = [u for u in existing if u.startswith("t")]
        for _ in range(self.pool - len(pool)):
            self._append_user(self._next_pool_name())

    def _make_maildir(self, user):
        md = self.maildir(user)
        for sub in ("", "cur", "new", "tmp"):
            path = os.path.join(md, sub)
            os.makedirs(path, exist_ok=True)
            os.chown(path, self.mail_uid, self.mail_gid)
            os.chmod(path, 0o700)

    def _passwd(self):
        users = {}
        try:
            with open(self.passwd_path) as f:
                for line in f:
                    fields = line.rstrip("\n").split(":")
                    if len(fields) > 1 and fields[0]:
                        users[fields[0]] = fields[1].removeprefix("{PLAIN}")
        except FileNotFoundError:
            pass
        return users

    def _choose_ports(self):
        old = [self.pop3_port, self.pop3s_port]
        if None not in old and old[0] != old[1] and all(port_is_free(p) for p in old):
            return
        self.pop3_port, self.pop3s_port = free_ports(2)

    def _load_state(self):
        try:
            with open(self.state_path) as f:
                state = json.load(f)
            self.pop3_port, self.pop3s_port = state["pop3_port"], state["pop3s_port"]
        except (OSError, ValueError, KeyError):
            pass

    def _save_state(self):
        state = {"dir": self.dir, "host": self.host, "pop3_port": self.pop3_port,
                 "pop3s_port": self.pop3s_port, "ca_file": self.ca_file,
                 "cert": self.cert, "oauth2_introspection_url": self.oauth2_introspection_url,
                 "users": {u: self.password(u) for u in self.users}}
        with open(self.state_path, "w") as f:
            json.dump(state, f, indent=2)
        with open(os.path.join(self.dir, "env"), "w") as f:
            for key, value in self.env().items():
                if key != "DOVECOT_PID":
                    f.write(f"{key}='{value}'\n")

    def _wait_ready(self, timeout):
        """Wait for the pid file and a POP3 greeting on both listeners."""
        def ready():
            if self.pid() is None:
                raise OSError("no master.pid yet")
            serverutil.greetings(self)
        serverutil.wait_ready(ready, timeout, f"Dovecot in {self.dir}", details=self._log_tail)

    def _log_tail(self, lines=20):
        text = self.log_text().splitlines()[-lines:]
        return ("\n--- " + self.log_path + " ---\n" + "\n".join(text)) if text else ""

    def _remove_pid_file(self):
        try:
            os.unlink(self.pid_path)
        except FileNotFoundError:
            pass


def _is_dovecot(pid):
    """True if pid runs a Dovecot program (guards against PID reuse)."""
    program_name = os.path.basename(_cmdline(pid).split(" ", 1)[0])
    return program_name.startswith(SERVICE_PROCESS_PREFIX)


# --------------------------------------------------------------------------
# command line


def main(argv=None):
    ap = argparse.ArgumentParser(description="A throwaway Dovecot POP3 server for tests.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start (restart) Dovecot in DIR")
    up.add_argument("dir")
    up.add_argument("--users", type=int, default=4, help="users user1..N (default 4)")
    up.add_argument("--cert", default="server", choices=sorted(LEAF_CERTS))
    up.add_argument("--oauth2-introspection-url", metavar="URL",
                    help="add the oauth2 passdb (XOAUTH2, OAUTHBEARER) asking this "
                         "RFC 7662 endpoint, e.g. tokenserver.py's https://127.0.0.1:PORT/introspect")
    down = sub.add_parser("down", help="stop Dovecot in DIR")
    down.add_argument("dir")
    status = sub.add_parser("status", help="print the settings; exit 1 if not running")
    status.add_argument("dir")
    args = ap.parse_args(argv)

    if args.cmd == "up":
        d = Dovecot(args.dir, users=args.users, cert=args.cert,
                    oauth2_introspection_url=args.oauth2_introspection_url).start()
        print(f"dovecot: pid {d.pid()}, pop3 {d.host}:{d.pop3_port} (STLS), "
              f"pop3s {d.host}:{d.pop3s_port}, CA {d.ca_file}")
        print(f"dovecot: users {' '.join(d.users)} (password pass-USER), settings in {d.dir}/env")
        return 0
    d = Dovecot(args.dir, users=0, pool=0)
    if args.cmd == "down":
        d.stop()
        return 0
    for key, value in d.env().items():
        print(f"{key}={value}")
    return 0 if d.running() else 1


if __name__ == "__main__":
    sys.exit(main())
