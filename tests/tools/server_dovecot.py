"""Dovecot as a server of the interop suite (tests/tools/popservers.py)."""

import subprocess

import dovecot as dovecot_tool


class Server:
    name = "dovecot"
    features = {"capa", "stls", "pop3s", "apop", "uidl", "top"}
    mechanisms = ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN", "USER"]
    quirks = []

    def __init__(self, dir):
        self.dovecot = dovecot_tool.Dovecot(dir, users=0, pool=50)
        self.host = self.dovecot.host

    @property
    def version(self):
        out = subprocess.run([dovecot_tool.program("dovecot"), "--version"],
                             capture_output=True, text=True)
        return out.stdout.strip()

    pop3_port = property(lambda self: self.dovecot.pop3_port)
    pop3s_port = property(lambda self: self.dovecot.pop3s_port)
    ca_file = property(lambda self: self.dovecot.ca_file)

    def start(self):
        self.dovecot.start()
        return self

    def stop(self):
        self.dovecot.stop()

    def new_mailbox(self):
        return self.dovecot.mailbox(self.dovecot.add_user())


def make(dir):
    return Server(dir)
