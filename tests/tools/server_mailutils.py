"""GNU Mailutils pop3d as a server of the interop suite (tests/tools/popservers.py).

One pop3d (Debian package mailutils-pop3d) in daemon mode, in the
foreground, with its configuration file in the instance directory and two
server blocks on free 127.0.0.1 ports: plain POP3 offering STLS
(tls-mode ondemand) and implicit TLS (tls-mode connection), serving the test
CA's server certificate (dovecot.make_test_pki).

Users come from pop3d's own database, not from the system accounts: the
"virtdomain" authorization module reads a passwd-format file per mail
domain (DIR/domains/DOMAIN, crypt(3) passwords checked by the "generic"
authentication module), so the login names are user@DOMAIN and nothing of
the machine's users is read or changed. Each user's mailbox is the mbox
file DIR/mail/USER/INBOX (virtdomain's home/INBOX, pop3d's default mbox
format). The APOP secrets are in pop3d's own APOP database (a DBM made
with popauth), the same password as for USER/PASS. pop3d needs root: it
switches to the group mail at startup (it then stays root: virtdomain users
do not change uid, and everything it touches is in DIR). Without root the
tests using it are skipped.

Layout of DIR:
    pop3d.conf  pop3d.log  pop3d.pid  apop (DBM)  domains/DOMAIN
    mail/USER/INBOX    tls/ (test CA and server certificate)
"""

import os
import re
import secrets
import shutil
import subprocess

import dovecot as dovecot_tool
import serverutil

HOST = dovecot_tool.HOST
DOMAIN = "mailutils.test"

CONF = """\
logging {{ syslog false; print-severity true; }};
auth {{ authorization virtdomain; authentication generic; }};
virtdomain {{ passwd-dir "{dir}/domains"; }};
apop-database-file "{dir}/apop";
pidfile "{dir}/pop3d.pid";
mode daemon;
foreground true;
max-children 20;
timeout 120;
tcp-wrappers {{ enable false; }};
tls {{
  ssl-certificate-file "{dir}/tls/server.crt";
  ssl-key-file "{dir}/tls/server.key";
}};
server {host}:{pop3_port} {{ tls-mode ondemand; }};
server {host}:{pop3s_port} {{ tls-mode connection; }};
"""


def program(name):
    found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        return found
    reason = f"{name} not found (scripts/install-deps installs mailutils-pop3d)"
    serverutil.require_root(reason)
    raise RuntimeError(reason)


class Mailbox(serverutil.MboxMailbox):
    """An mbox written with mboxrd quoting (a '>' before every line matching
    ^>*From ): pop3d removes one '>' of such lines again."""

    from_line = b"From MAILER-DAEMON Thu Jan  1 00:00:00 2026\n"
    mboxrd = True

    def __init__(self, server, user, password, path):
        self.server, self.user, self.password, self.path = server, user, password, path

    def deliver(self, *messages):
        """Append the messages to the mbox, then read them once over POP3 so
        that pop3d adds its headers now (see quirks): afterwards every
        session sends the same bytes."""
        self.append(*messages)
        self.settle()

    def settle(self):
        with serverutil.pop3_session(self.server, self.user, self.password) as client:
            client.uidl()
            for n in range(1, len(client.list()[1]) + 1):
                client.retr(n)

    def __repr__(self):
        return f"Mailbox({self.user!r} on {self.server.host}:{self.server.pop3_port})"


class Server:
    name = "mailutils"
    host = HOST
    features = {"capa", "stls", "pop3s", "apop", "uidl", "top"}
    # no AUTH command: USER/PASS and APOP only
    mechanisms = ["USER"]
    @staticmethod
    def stable(data):
        """The first message's X-IMAPbase counts the mailbox's next UID, which
        changes whenever mail is added."""
        return re.sub(rb"(?m)^(X-IMAPbase:)[^\r\n]*", rb"\1 -", data)

    quirks = [
        ("With mbox mailboxes (its default), the first session that reads a message "
         "adds X-UIDL, X-UID and Status headers (and X-IMAPbase, whose next-UID "
         "changes when mail is added, to the first message) and writes them back: "
         "a message's bytes differ between that session and later ones; "
         "the UIDL stays the same",
         "saves the bytes of the session that fetched the message; keeps track "
         "of messages by UIDL only"),
        ("Offers no AUTH (SASL) command, only USER/PASS and APOP",
         "sasl_mechanisms USER or APOP"),
        ("USER must be followed directly by PASS (any other command after USER "
         "is refused)",
         "sends PASS right after USER"),
    ]

    def __init__(self, dir):
        self.dir = os.path.abspath(dir)
        self.pop3_port = self.pop3s_port = None
        self.ca_file = os.path.join(self.dir, "tls", "ca.crt")
        self.proc = None
        self._users = 0

    conf_path = property(lambda self: os.path.join(self.dir, "pop3d.conf"))
    log_path = property(lambda self: os.path.join(self.dir, "pop3d.log"))

    @property
    def version(self):
        """pop3d's version and, where dpkg knows it, the package's."""
        out = subprocess.run([program("pop3d"), "--version"], capture_output=True, text=True)
        version = out.stdout.splitlines()[0].split()[-1] if out.stdout else "unknown"
        try:
            pkg = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "mailutils-pop3d"],
                                 capture_output=True, text=True)
        except OSError:
            return version
        return f"{version} (mailutils-pop3d {pkg.stdout})" if pkg.returncode == 0 else version

    def start(self, timeout=15):
        serverutil.require_root("GNU pop3d needs root (it switches to the group mail "
                                "at startup)")
        pop3d = program("pop3d")
        for sub in ("domains", "mail", "tls"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        dovecot_tool.make_test_pki(os.path.join(self.dir, "tls"))
        self.pop3_port, self.pop3s_port = dovecot_tool.free_ports(2)
        with open(self.conf_path, "w") as f:
            f.write(CONF.format(dir=self.dir, host=self.host, pop3_port=self.pop3_port,
                                pop3s_port=self.pop3s_port))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([pop3d, f"--config-file={self.conf_path}"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self._wait_ready(timeout)
        return self

    def stop(self, timeout=10):
        """SIGTERM to pop3d's process group (the daemon and its session children)."""
        if self.proc is None:
            return
        serverutil.stop_process_group(self.proc, timeout)
        self.proc = None

    def new_mailbox(self):
        self._users += 1
        name = f"user{self._users}"
        user, password = f"{name}@{DOMAIN}", secrets.token_hex(12)
        home = os.path.join(self.dir, "mail", name)
        os.makedirs(home)
        hashed = serverutil.hash_password(password)
        uid, gid = os.geteuid(), os.getegid()
        with open(os.path.join(self.dir, "domains", DOMAIN), "a") as f:
            f.write(f"{name}:{hashed}:{uid}:{gid}::{home}:/bin/false\n")
        subprocess.run([program("popauth"), "--add", f"--user={user}",
                        f"--password={password}", f"--file={self.dir}/apop"],
                       capture_output=True, text=True, check=True)
        return Mailbox(self, user, password, os.path.join(home, "INBOX"))

    def _wait_ready(self, timeout):
        serverutil.wait_ready(lambda: serverutil.greetings(self), timeout,
                              f"pop3d in {self.dir}", self.proc,
                              lambda: serverutil.log_tail(self.log_path))


def make(dir):
    return Server(dir)
