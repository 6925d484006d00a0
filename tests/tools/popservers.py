"""The real POP3 servers of the interop suite, behind one interface.

Each server has a module tests/tools/server_NAME.py with a function

    make(dir) -> PopServer      prepare (not start) an instance rooted in dir

where dir is a fresh, short directory (at most 60 characters) that the
instance owns. A PopServer has:

    name          "dovecot", "mailutils", ...
    version       the server's version, as its package gives it
    host          "127.0.0.1"
    pop3_port     plain POP3 (with STLS when "stls" is in features)
    pop3s_port    implicit TLS, or None
    ca_file       the CA that signed the served certificate, or None
    features      a set of: "capa", "stls", "pop3s", "apop", "uidl", "top"
    mechanisms    the sasl_mechanisms values popfetchd can use with it
                  (e.g. ["USER"], ["APOP"], ["PLAIN", "SCRAM-SHA-256"])
    start() / stop()            stop() also when start() failed half-way
    new_mailbox() -> Mailbox    a fresh user with an empty mailbox
    quirks        [(what it does, what popfetchd does about it)] for the
                  README's compatibility table
    stable(data)  optional: the message with what the server rewrites between
                  sessions made constant (e.g. mailutils' X-IMAPbase), for
                  comparing what one session saved with what a later sends

and a Mailbox has `user`, `password`, `deliver(*messages)` (bytes, LF or
CRLF line ends; delivered in order, oldest first), `count()` (messages in
the mailbox now) and `reset()` (empty it).

`names()` lists the servers; `make(name, dir)` builds one.
"""

import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def names():
    """Every server with an adapter here, in a stable order (dovecot first)."""
    found = sorted(f[len("server_"):-3] for f in os.listdir(HERE)
                   if f.startswith("server_") and f.endswith(".py"))
    return sorted(found, key=lambda n: (n != "dovecot", n))


def make(name, dir):
    return importlib.import_module(f"server_{name}").make(dir)
