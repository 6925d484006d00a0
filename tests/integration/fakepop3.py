"""A fake POP3 server for fault and hostile-input tests (stdlib only).

It listens on 127.0.0.1 (a free port), serves any number of connections,
each in its own thread, and records every command line it receives.

Two modes:

Good mode (the default) -- a correct RFC 1939 server holding a list of
messages: CAPA, USER/PASS, APOP (if `apop`), AUTH (RFC 5034) with PLAIN,
LOGIN, CRAM-MD5, SCRAM-SHA-1, SCRAM-SHA-256 and their -PLUS variants (those
that `sasl` lists; SCRAM per RFC 5802/7677, -PLUS with tls-unique channel
binding, so under TLS 1.2 only), XOAUTH2 and OAUTHBEARER (RFC 7628; the
token checked by `oauth`), STLS (if given `stls_context`), STAT,
LIST, UIDL, RETR and TOP (dot-stuffed), DELE, RSET, NOOP, QUIT. Deletions
are committed only when QUIT is answered +OK; a second concurrent login gets
-ERR [IN-USE]. Faults are injected per command with `inject()`:

    with FakePOP3([msg1, msg2]) as srv:
        srv.inject("RETR", Truncate(0.5))      # drop in the middle of the first RETR
        ... run the client against srv.port ...
        assert not srv.sent("DELE")

Scripted mode -- a greeting and a list of (expected command, response) steps:

    srv = FakePOP3(script=Script(greeting=b"+OK hi\\r\\n", steps=[
        ("USER", b"+OK\\r\\n"),
        ("PASS", b"-ERR [IN-USE] locked\\r\\n"),
    ]))

A command that does not match the next step (e.g. a CAPA the script does
not mention) is answered -ERR without consuming the step and recorded in
`errors`; QUIT is then answered +OK. Once the steps are used up, the same
applies (or `Script(then=...)` runs an action).

Responses are bytes or actions: Reply, Default, Close, Truncate,
SendThenClose, Overlong, Garbage, Stall, Trickle.
"""

import base64
import dataclasses
import hashlib
import hmac
import os
import random
import socket
import ssl
import threading
import time

HOST = "127.0.0.1"
MAX_COMMAND = 8192

# --------------------------------------------------------------------------
# actions


class Action:
    """What the server does instead of (or as) a response.

    perform(conn, default) sends something; `default` is the response the
    good server would have sent (None in scripted mode). It returns True if
    the session goes on, False if it ends (the connection is closed).
    `commit` says whether the good server applies the command's effect
    (e.g. a DELE mark, the QUIT commit, the STLS handshake).
    """
    commit = False

    def perform(self, conn, default):
        raise NotImplementedError


class Default(Action):
    """The good server's normal response (useful in a hook or a script)."""
    commit = True

    def perform(self, conn, default):
        if default is not None:
            conn.send(default)
        return True


class Reply(Action):
    """Send these bytes instead of the normal response."""

    def __init__(self, data, commit=False):
        self.data, self.commit = _bytes(data), commit

    def perform(self, conn, default):
        conn.send(self.data)
        return True


class Close(Action):
    """Close the connection without a response."""

    def perform(self, conn, default):
        return False


class SendThenClose(Action):
    """Send these bytes, then close."""

    def __init__(self, data):
        self.data = _bytes(data)

    def perform(self, conn, default):
        conn.send(self.data)
        return False


class Truncate(Action):
    """Send only the first part of the response, then close.

    `amount`: a byte count (int) or a share of the response (float in 0..1).
    `data`: the full response to cut (default: the good server's response).
    """

    def __init__(self, amount=0.5, data=None):
        self.amount, self.data = amount, (None if data is None else _bytes(data))

    def perform(self, conn, default):
        data = self.data if self.data is not None else (default or b"")
        n = int(len(data) * self.amount) if isinstance(self.amount, float) else self.amount
        conn.send(data[:n])
        return False


class Overlong(Action):
    """An overlong line without CRLF: prefix + n filler bytes.

    then: "stall" (keep the connection open until the client closes it or
    the server stops) or "close".
    """

    def __init__(self, n=2000, prefix=b"+OK ", fill=b"x", then="stall"):
        self.n, self.prefix, self.fill, self.then = n, _bytes(prefix), _bytes(fill), then

    def perform(self, conn, default):
        conn.send(self.prefix + (self.fill * self.n)[: self.n])
        if self.then == "stall":
            conn.wait_closed()
        return False


class Garbage(Action):
    """n random bytes (never a valid status) and CRLF; then go on or close."""

    def __init__(self, n=64, seed=0, then="close", data=None):
        self.n, self.seed, self.then, self.data = n, seed, then, data

    def payload(self):
        if self.data is not None:
            return _bytes(self.data)
        r = random.Random(self.seed)
        body = bytes(r.choice([b for b in range(256) if b not in (10, 13)]) for _ in range(self.n))
        return b"\x00\xff" + body + b"\r\n"

    def perform(self, conn, default):
        conn.send(self.payload())
        if self.then == "stall":
            conn.wait_closed()
            return False
        return self.then == "continue"


class Stall(Action):
    """Send nothing for `seconds` (None: until the client closes or the
    server stops), then close."""

    def __init__(self, seconds=None, data=b""):
        self.seconds, self.data = seconds, _bytes(data)

    def perform(self, conn, default):
        if self.data:
            conn.send(self.data)
        conn.wait_closed(self.seconds)
        return False


class Trickle(Action):
    """Send the response (or `data`) `chunk` bytes every `delay` seconds."""
    commit = True

    def __init__(self, data=None, delay=0.2, chunk=1):
        self.data, self.delay, self.chunk = (None if data is None else _bytes(data)), delay, chunk

    def perform(self, conn, default):
        data = self.data if self.data is not None else (default or b"")
        for k in range(0, len(data), self.chunk):
            if not conn.send(data[k:k + self.chunk]) or conn.server.stopping.wait(self.delay):
                return False
        return True


def _bytes(data):
    return data.encode() if isinstance(data, str) else bytes(data)


def _as_action(response):
    return response if isinstance(response, Action) else Reply(response)


# --------------------------------------------------------------------------
# scripts and faults


@dataclasses.dataclass
class Script:
    """A scripted session: greeting, then (command prefix, response) steps.

    A prefix matches word by word, the verb case-insensitively ("RETR"
    matches "RETR 2", "RETR 2" does not match "RETR 20"); "*" matches any
    command. `then`: an action once the steps are used up (default: answer
    -ERR, QUIT +OK).
    """
    greeting: object = b"+OK fake POP3 server ready\r\n"
    steps: list = dataclasses.field(default_factory=list)
    then: object = None


@dataclasses.dataclass
class Fault:
    match: str
    action: Action
    times: object = 1          # how often it fires (None: always)
    session: object = None     # only in this session (0-based; None: any)


def matches(pattern, line):
    """True if the command line matches the pattern word by word."""
    if pattern == "*":
        return True
    p, c = pattern.split(), line.split()
    return (len(c) >= len(p) > 0 and c[0].upper() == p[0].upper()
            and c[1:len(p)] == p[1:])


# --------------------------------------------------------------------------
# connections and sessions


class _Conn:
    """One client connection: line reading, sending, STLS, waiting."""

    def __init__(self, sock, server):
        self.sock, self.server, self.buf, self.closed = sock, server, b"", False
        sock.settimeout(0.2)

    def send(self, data):
        """All of data, however long the client takes to read it (a client
        that holds its session while it commits stops reading for a while):
        sendall's 0.2 s timeout would drop it mid-message."""
        view = memoryview(data)
        while view and not self.closed:
            if self.server.stopping.is_set():
                self.closed = True
                break
            try:
                view = view[self.sock.send(view):]
            except socket.timeout:
                continue
            except OSError:
                self.closed = True
        return not self.closed

    def readline(self):
        """The next line without CRLF (bytes), or None at EOF or on stop."""
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_COMMAND:
                return None
            chunk = self._recv()
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def _recv(self):
        while not self.closed and not self.server.stopping.is_set():
            try:
                return self.sock.recv(65536)
            except socket.timeout:
                continue
            except (OSError, ssl.SSLError):
                break
        return b""

    def wait_closed(self, seconds=None):
        """Wait until the client closes, the server stops or `seconds` pass;
        whatever the client sends meanwhile is recorded but not answered."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self.closed and not self.server.stopping.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                if not self.sock.recv(65536):
                    return
            except socket.timeout:
                continue
            except OSError:
                return

    def starttls(self, context):
        """Server-side TLS handshake on this connection."""
        self.sock.settimeout(10)
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.sock.settimeout(0.2)

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Meter:
    """Counts connections open at once across the servers that share it
    (FakePOP3(meter=...)): `current`, and `peak` since it was made."""

    def __init__(self):
        self._lock = threading.Lock()
        self.current = self.peak = self.total = 0

    def enter(self):
        with self._lock:
            self.current += 1
            self.total += 1
            self.peak = max(self.peak, self.current)

    def leave(self):
        with self._lock:
            self.current -= 1


@dataclasses.dataclass
class SessionRecord:
    """What happened in one connection."""
    index: int
    commands: list = dataclasses.field(default_factory=list)
    user: str = None
    authenticated: bool = False
    quit_ok: bool = False          # QUIT answered +OK (deletions committed)
    committed: list = dataclasses.field(default_factory=list)   # UIDLs deleted
    tls: bool = False
    tls_error: str = None
    tls_since: int = None          # commands received before TLS began (0: implicit TLS)
    ended: bool = False
    maildrop: list = None          # [(uidl, bytes)] fixed at login: what this session sees
    sasl: list = dataclasses.field(default_factory=list)   # SaslExchange per AUTH
    started: float = dataclasses.field(default_factory=time.monotonic)  # accepted at
    # per command read: the command lines that were already waiting behind
    # it (sent before its answer: pipelined), as received
    ahead: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class SaslExchange:
    """One AUTH exchange as the fake server saw it."""
    mechanism: str
    initial_response: bool = False   # the client's first message came on the AUTH line
    client_messages: list = dataclasses.field(default_factory=list)   # decoded, in order
    gs2_header: str = None           # SCRAM: e.g. "n,," or "p=tls-unique,,"
    channel_binding: bytes = None    # SCRAM: the decoded c= attribute the client sent
    expected_binding: bytes = None   # SCRAM: what the server expected in c=
    aborted: bool = False            # the client cancelled with "*"
    outcome: str = None              # "ok", "aborted" or why the server refused
    success_data: bytes = None       # base64 sent on the +OK (SCRAM's server-final)
    salt: bytes = None               # SCRAM: the salt of the server-first message
    token: str = None                # XOAUTH2 / OAUTHBEARER: the bearer token presented
    error_answer: bytes = None       # the client's answer to an error challenge (decoded)


@dataclasses.dataclass
class FakeMessage:
    uidl: str
    data: bytes


def dot_stuff(data):
    """A message as RETR sends it: CRLF-terminated, dot-stuffed, with ".\\r\\n"."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + l if l.startswith(b".") else l for l in lines) + b".\r\n"


def to_crlf(data):
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# --------------------------------------------------------------------------
# the server


class FakePOP3:
    """The fake server. See the module docstring."""

    def __init__(self, messages=(), *, script=None, scripts=None, user="fakeuser",
                 password="fakepass", sasl=(), capabilities=None, uidls=None,
                 crlf=True, apop=False, tls_context=None, stls_context=None, hook=None,
                 scram_iterations=4096, scram_salt=None, sasl_faults=(), meter=None, pipelining=True,
                 oauth=None, oauth_error=None, auth_refusal=None):
        """messages: bytes (LF is turned into CRLF unless crlf=False) or
        (uidl, bytes) pairs; uidls: explicit UIDLs; script/scripts: scripted
        mode (scripts[i] serves connection i, the last one the rest);
        sasl: SASL mechanisms offered (see above for those
        implemented; others are listed but refused); apop: put an
        APOP timestamp in the greeting and accept APOP (off by default, so
        that a client has nothing but USER/PASS unless asked);
        capabilities: the exact CAPA lines (default: derived);
        pipelining: list PIPELINING among the derived capabilities (commands
          are answered in order either way);
        tls_context: implicit TLS; stls_context: offer STLS;
        hook(session_record, line) -> Action or None: a fault decided per call;
        scram_iterations: the i= of SCRAM's server-first message;
        scram_salt: bytes: the salt of every SCRAM exchange, as a server that
          stores SCRAM credentials has (an attribute: change it to make the
          account again); None: a new random one each time;
        sasl_faults: misbehaviours of the SASL server, any of
          "bad-server-signature"  SCRAM's server-final "v=" does not verify
          "no-server-final"       SCRAM: +OK right after the client's proof,
                                  without the server-final message
          "server-final-in-ok"    SCRAM: the server-final message as the
                                  +OK's additional data (RFC 5034), not in
                                  a "+" continuation
          "bad-channel-binding"   the server expects other channel-binding
                                  data (as if a man in the middle ran TLS)
        Each AUTH is recorded in SessionRecord.sasl (SaslExchange);
        meter: a Meter counting this server's open connections;
        oauth(user, token) -> bool: whether XOAUTH2 / OAUTHBEARER accept
          that bearer token for that user (default: none is accepted);
        oauth_error: bytes: a refused token first gets "+ BASE64(oauth_error)"
          (an error challenge, e.g. Gmail's JSON; RFC 7628 §3.2.2) and the
          client's answer, then the -ERR; None: the -ERR at once (Microsoft
          365);
        auth_refusal: the -ERR line of a refused AUTH (default
          "-ERR [AUTH] Authentication failed.")."""
        self.meter = meter
        self.oauth, self.oauth_error = oauth, oauth_error
        self.auth_refusal = _bytes(auth_refusal or b"-ERR [AUTH] Authentication failed.\r\n")
        self.user, self.password, self.apop = user, password, apop
        self.sasl = [m.upper() for m in sasl]
        self.scram_iterations, self.sasl_faults = scram_iterations, set(sasl_faults)
        self.scram_salt = scram_salt
        self.capabilities = capabilities
        self.pipelining = pipelining
        self.tls_context, self.stls_context, self.hook = tls_context, stls_context, hook
        self.scripts = list(scripts or ([script] if script else []))
        self.mailbox = self._make_mailbox(messages, uidls, crlf)
        self.faults = []
        self.sessions = []
        self.errors = []
        self.stopping = threading.Event()
        self._lock = threading.RLock()
        self._locked_by = None
        self._threads = []
        self._conns = []
        self._sock = None
        self.port = None

    host = HOST

    @staticmethod
    def _make_mailbox(messages, uidls, crlf):
        box = []
        for i, m in enumerate(messages):
            uidl, data = m if isinstance(m, tuple) else (None, m)
            data = to_crlf(data) if crlf else data
            if uidl is None:
                uidl = uidls[i] if uidls else f"fake-{i:04d}-{hashlib.sha256(data).hexdigest()[:12]}"
            box.append(FakeMessage(uidl, data))
        return box

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((HOST, 0))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name=f"fakepop3-{self.port}", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self):
        """Stop accepting, close every connection, join the threads."""
        self.stopping.set()
        if self._sock:
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait_idle(self, timeout=10):
        """Wait until every connection so far has ended; True if so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(s.ended for s in self.sessions):
                    return True
            time.sleep(0.02)
        return False

    # -- faults and inspection -----------------------------------------------

    def inject(self, match, action, times=1, session=None):
        """Replace the response to the next `times` commands matching `match`
        ("GREETING" for the greeting) with `action` (bytes or an Action)."""
        with self._lock:
            self.faults.append(Fault(match, _as_action(action), times, session))

    def clear_faults(self):
        with self._lock:
            self.faults.clear()

    def commands(self, session=None):
        """Command lines received (str), in one session or in all."""
        with self._lock:
            recs = self.sessions if session is None else [self.sessions[session]]
            return [c for r in recs for c in r.commands]

    @property
    def transcript(self):
        """[(session index, command line)] for every command received."""
        with self._lock:
            return [(r.index, c) for r in self.sessions for c in r.commands]

    def count(self, pattern, session=None):
        return sum(matches(pattern, c) for c in self.commands(session))

    def sent(self, pattern, session=None):
        """True if the client sent a command matching the pattern."""
        return self.count(pattern, session) > 0

    def add(self, data, uidl=None):
        """Put one more message into the maildrop (as new mail arrives)."""
        with self._lock:
            [m] = self._make_mailbox([(uidl, data)], None, True)
            if uidl is None:
                m.uidl = f"fake-add-{len(self.mailbox)}-{hashlib.sha256(m.data).hexdigest()[:12]}"
            self.mailbox.append(m)

    def remaining(self):
        """The messages still on the server (bytes, as served)."""
        with self._lock:
            return [m.data for m in self.mailbox]

    def uidls(self):
        with self._lock:
            return [m.uidl for m in self.mailbox]

    # -- connection handling ---------------------------------------------------

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                record = SessionRecord(index=len(self.sessions))
                self.sessions.append(record)
                conn = _Conn(sock, self)
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, record), daemon=True,
                                 name=f"fakepop3-{self.port}-{record.index}")
            t.start()
            self._threads.append(t)

    def _serve(self, conn, record):
        if self.meter:
            self.meter.enter()
        try:
            if self.tls_context:
                try:
                    conn.starttls(self.tls_context)
                    record.tls, record.tls_since = True, 0
                except (OSError, ssl.SSLError) as e:
                    record.tls_error = str(e)
                    return
            if self.scripts:
                self._serve_script(conn, record)
            else:
                _GoodSession(self, conn, record).run()
        except Exception as e:  # a bug in the fake server: make it visible
            self.errors.append(f"session {record.index}: {type(e).__name__}: {e}")
            raise
        finally:
            conn.close()
            if self.meter:
                self.meter.leave()
            with self._lock:
                if self._locked_by is record:
                    self._locked_by = None
                record.ended = True

    def _record(self, record, line):
        text = line.decode("utf-8", "replace")
        with self._lock:
            record.commands.append(text)
        return text

    def _fault_for(self, record, line):
        """The injected action for this command (consumed), or None."""
        if self.hook:
            action = self.hook(record, line)
            if action is not None:
                return _as_action(action)
        with self._lock:
            for f in self.faults:
                if (f.times is None or f.times > 0) and f.session in (None, record.index) \
                        and matches(f.match, line):
                    if f.times is not None:
                        f.times -= 1
                    return f.action
        return None

    # -- scripted mode -----------------------------------------------------------

    def _serve_script(self, conn, record):
        script = self.scripts[min(record.index, len(self.scripts) - 1)]
        if not _as_action(script.greeting).perform(conn, None):
            return
        steps = list(script.steps)
        while True:
            raw = conn.readline()
            if raw is None:
                return
            line = self._record(record, raw)
            if steps and matches(steps[0][0], line):
                if not _as_action(steps.pop(0)[1]).perform(conn, None):
                    return
                continue
            if not steps and script.then is not None:
                if not _as_action(script.then).perform(conn, None):
                    return
                continue
            self.errors.append(f"session {record.index}: unexpected command {line!r}"
                               + (f" (expected {steps[0][0]!r})" if steps else " (script done)"))
            if matches("QUIT", line):
                conn.send(b"+OK bye\r\n")
                return
            conn.send(b"-ERR unexpected command\r\n")


class _SaslAbort(Exception):
    """The client cancelled the exchange with "*"."""


class _SaslGone(Exception):
    """The connection ended in the middle of an exchange."""


def _sasl_decode(text):
    """An initial response: base64, "=" for an empty one (RFC 5034)."""
    return b"" if text.strip() == "=" else base64.b64decode(text.strip(), validate=True)


class _GoodSession:
    """One session of the good server: RFC 1939 + CAPA, STLS, AUTH (RFC 5034)."""

    def __init__(self, server, conn, record):
        self.srv, self.conn, self.rec = server, conn, record
        self.user = None
        self.view = []        # the maildrop as seen by this session (FakeMessage)
        self.marked = set()   # 1-based numbers marked deleted
        self.timestamp = f"<{os.getpid()}.{record.index}.{int(time.time())}@fakepop3.example>"

    def run(self):
        stamp = f" {self.timestamp}" if self.srv.apop else ""
        greeting = f"+OK fake POP3 server ready{stamp}\r\n".encode()
        if not self._respond("GREETING", greeting, None):
            return
        while True:
            raw = self.conn.readline()
            if raw is None:
                return
            line = self.srv._record(self.rec, raw)
            waiting = self.conn.buf.split(b"\n")[:-1]
            self.rec.ahead.append((line, [w.rstrip(b"\r").decode("latin-1") for w in waiting]))
            verb, _, arg = line.partition(" ")
            handler = getattr(self, f"cmd_{verb.upper()}", None)
            if handler is None or not verb.isalnum():
                response, effect = b"-ERR unknown command\r\n", None
            else:
                response, effect = handler(arg.strip())
            if not self._respond(line, response, effect) or verb.upper() == "QUIT":
                return

    def _respond(self, line, response, effect):
        """Send the response (or the injected action); apply the effect if the
        action commits. False when the session ends."""
        action = self.srv._fault_for(self.rec, line) or Default()
        # a real server has committed QUIT's deletions when it answers: so
        # has this one (a client that exits on the +OK finds them done)
        early = line.upper() == "QUIT" and action.commit and effect is not None
        if early:
            effect()
        go_on = action.perform(self.conn, response)
        if action.commit and effect is not None and not early:
            go_on = effect() is not False and go_on
        return go_on

    # -- helpers ----------------------------------------------------------------

    @property
    def in_transaction(self):
        return self.rec.authenticated

    def _login(self, user):
        """Enter the TRANSACTION state; [IN-USE] if another session holds the lock."""
        srv = self.srv
        with srv._lock:
            if srv._locked_by is not None and not srv._locked_by.ended:
                return b"-ERR [IN-USE] Mailbox is locked by another session\r\n", None
            # The maildrop is the one the +OK describes: taken here, before
            # the reply goes out, not in the effect (which runs after it, when
            # the client may already have had more mail added).
            view = list(srv.mailbox)
            count, size = len(view), sum(len(m.data) for m in view)

        def effect():
            with srv._lock:
                srv._locked_by = self.rec
                self.view = view
                self.rec.maildrop = [(m.uidl, m.data) for m in view]
            self.rec.authenticated, self.rec.user = True, user
        return f"+OK Logged in, {count} messages ({size} octets)\r\n".encode(), effect

    def _release(self):
        with self.srv._lock:
            if self.srv._locked_by is self.rec:
                self.srv._locked_by = None

    def _message(self, arg):
        """(number, FakeMessage) or (None, error response)."""
        if not self.in_transaction:
            return None, b"-ERR Not logged in\r\n"
        if not arg.split() or not arg.split()[0].isdigit():
            return None, b"-ERR Invalid message number\r\n"
        n = int(arg.split()[0])
        if not 1 <= n <= len(self.view):
            return None, b"-ERR No such message\r\n"
        if n in self.marked:
            return None, b"-ERR Message is deleted\r\n"
        return n, self.view[n - 1]

    def _listing(self, arg, value):
        """LIST / UIDL: one message or all not marked deleted."""
        if arg:
            n, m = self._message(arg)
            if n is None:
                return m, None
            return f"+OK {n} {value(m)}\r\n".encode(), None
        if not self.in_transaction:
            return b"-ERR Not logged in\r\n", None
        lines = [f"{n} {value(m)}\r\n" for n, m in enumerate(self.view, 1) if n not in self.marked]
        return ("+OK\r\n" + "".join(lines) + ".\r\n").encode(), None

    def capabilities(self):
        srv = self.srv
        if srv.capabilities is not None:
            return list(srv.capabilities)
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "USER"]
        if not srv.pipelining:
            caps.remove("PIPELINING")
        if srv.sasl:
            caps.append("SASL " + " ".join(srv.sasl))
        if srv.stls_context and not self.rec.tls:
            caps.append("STLS")
        return caps

    # -- commands: each returns (response bytes, effect or None) ------------------

    def cmd_CAPA(self, arg):
        return ("+OK Capability list follows\r\n"
                + "".join(c + "\r\n" for c in self.capabilities()) + ".\r\n").encode(), None

    def cmd_NOOP(self, arg):
        return (b"+OK\r\n" if self.in_transaction else b"-ERR Not logged in\r\n"), None

    def cmd_STLS(self, arg):
        if not self.srv.stls_context or self.rec.tls or self.in_transaction:
            return b"-ERR STLS not available\r\n", None

        def effect():
            try:
                self.conn.starttls(self.srv.stls_context)
                self.rec.tls, self.rec.tls_since = True, len(self.rec.commands)
            except (OSError, ssl.SSLError) as e:
                self.rec.tls_error = str(e)
                return False
        return b"+OK Begin TLS negotiation now\r\n", effect

    def cmd_USER(self, arg):
        if self.in_transaction:
            return b"-ERR Already logged in\r\n", None
        self.user = arg

        def effect():
            self.rec.user = arg
        return b"+OK\r\n", effect

    def cmd_PASS(self, arg):
        if self.in_transaction or self.user is None:
            return b"-ERR USER first\r\n", None
        if self.user != self.srv.user or arg != self.srv.password:
            return b"-ERR [AUTH] Authentication failed.\r\n", None
        return self._login(self.user)

    def cmd_APOP(self, arg):
        parts = arg.split()
        if not self.srv.apop:
            return b"-ERR APOP not supported\r\n", None
        if self.in_transaction or len(parts) != 2:
            return b"-ERR Invalid APOP\r\n", None
        digest = hashlib.md5((self.timestamp + self.srv.password).encode()).hexdigest()
        if parts[0] != self.srv.user or parts[1].lower() != digest:
            return b"-ERR [AUTH] Authentication failed.\r\n", None
        return self._login(parts[0])

    def cmd_AUTH(self, arg):
        if not arg:
            return ("+OK\r\n" + "".join(m + "\r\n" for m in self.srv.sasl) + ".\r\n").encode(), None
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        handler = _SASL_SERVERS.get(mech.removesuffix("-PLUS").replace("-", "_"))
        if mech not in self.srv.sasl or handler is None or self.in_transaction \
                or (mech.endswith("-PLUS") and not mech.startswith("SCRAM-")):
            return b"-ERR Unsupported authentication mechanism\r\n", None
        ex = SaslExchange(mech, initial_response=bool(initial))
        with self.srv._lock:
            self.rec.sasl.append(ex)
        try:
            if initial == "*":
                raise _SaslAbort()
            first = _sasl_decode(initial) if initial else None
            if first is not None:
                ex.client_messages.append(first)
            refusal = handler(self, ex, first)
        except _SaslAbort:
            ex.aborted, ex.outcome = True, "aborted"
            return b"-ERR Authentication aborted\r\n", None
        except _SaslGone:
            ex.outcome = "connection closed"
            return b"", None
        except (ValueError, UnicodeDecodeError) as e:
            ex.outcome = f"invalid message: {e}"
            return b"-ERR Invalid base64 data\r\n", None
        if refusal is not None:
            ex.outcome = refusal
            return self.srv.auth_refusal, None
        ex.outcome = "ok"
        response, effect = self._login(self.srv.user)
        if ex.success_data is not None and response.startswith(b"+OK"):
            response = b"+OK " + ex.success_data + b"\r\n"
        return response, effect

    # -- SASL (each returns None when the credentials are right, else why not) --

    def _challenge(self, ex, data=b""):
        """Send "+ BASE64(data)"; the client's answer, decoded."""
        if not self.conn.send(b"+ " + base64.b64encode(data) + b"\r\n"):
            raise _SaslGone()
        raw = self.conn.readline()
        if raw is None:
            raise _SaslGone()
        line = self.srv._record(self.rec, raw)
        if line.strip() == "*":
            raise _SaslAbort()
        message = base64.b64decode(line.strip(), validate=True)
        ex.client_messages.append(message)
        return message

    def _sasl_PLAIN(self, ex, first):
        message = first if first is not None else self._challenge(ex)
        _authzid, user, password = message.decode().split("\0")
        if user != self.srv.user or password != self.srv.password:
            return "wrong user or password"
        return None

    def _sasl_LOGIN(self, ex, first):
        user = first if first is not None else self._challenge(ex, b"Username:")
        password = self._challenge(ex, b"Password:")
        if user.decode() != self.srv.user or password.decode() != self.srv.password:
            return "wrong user or password"
        return None

    def _sasl_CRAM_MD5(self, ex, first):
        if first is not None:
            raise ValueError("CRAM-MD5 has no initial response")
        challenge = f"<{os.getpid()}.{time.time_ns()}@fakepop3.example>".encode()
        user, _, digest = self._challenge(ex, challenge).decode().rpartition(" ")
        expected = hmac.new(self.srv.password.encode(), challenge, hashlib.md5).hexdigest()
        if user != self.srv.user or not hmac.compare_digest(digest.lower(), expected):
            return "wrong user or digest"
        return None

    def _sasl_XOAUTH2(self, ex, first):
        message = first if first is not None else self._challenge(ex)
        fields = dict(f.split("=", 1) for f in message.decode().split("\x01") if "=" in f)
        return self._bearer(ex, fields.get("user"), fields.get("auth", ""))

    def _sasl_OAUTHBEARER(self, ex, first):
        message = (first if first is not None else self._challenge(ex)).decode()
        gs2, _, rest = message.partition("\x01")
        authzid = [a[2:] for a in gs2.split(",") if a.startswith("a=")]
        fields = dict(f.split("=", 1) for f in rest.split("\x01") if "=" in f)
        return self._bearer(ex, authzid[0] if authzid else None, fields.get("auth", ""))

    def _bearer(self, ex, user, auth):
        """Check "Bearer TOKEN" for user; on refusal, the error challenge
        (if the server has one) and the client's answer to it first."""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        ex.token = token
        if token and self.srv.oauth is not None and self.srv.oauth(user, token):
            if user != self.srv.user:
                return f"token accepted, but for {user!r}"
            return None
        if self.srv.oauth_error is not None:
            ex.error_answer = self._challenge(ex, self.srv.oauth_error)
        return "token refused"

    def _sasl_SCRAM_SHA_1(self, ex, first):
        return self._scram(ex, first, "sha1")

    def _sasl_SCRAM_SHA_256(self, ex, first):
        return self._scram(ex, first, "sha256")

    def _channel_binding(self, cb_type):
        """This connection's channel-binding data of that type, or None."""
        sock = self.conn.sock
        if not isinstance(sock, ssl.SSLSocket):
            return None
        try:
            data = sock.get_channel_binding(cb_type)   # Python has tls-unique only
        except ValueError:
            return None
        if data is not None and "bad-channel-binding" in self.srv.sasl_faults:
            data = bytes(b ^ 0x5A for b in data)
        return data

    def _scram(self, ex, first, hash_name):
        """RFC 5802 server side. Goes through the whole exchange, then refuses
        (with the reason) or sends the server-final "v=" and accepts."""
        def H(data):
            return hashlib.new(hash_name, data).digest()

        def HMAC(key, data):
            return hmac.new(key, data, hash_name).digest()

        message = (first if first is not None else self._challenge(ex)).decode()
        cb_flag, authzid, bare = message.split(",", 2)
        ex.gs2_header = f"{cb_flag},{authzid},"
        refusal = None
        if ex.mechanism.endswith("-PLUS"):
            cb_data = self._channel_binding(cb_flag[2:]) if cb_flag.startswith("p=") else None
            if cb_data is None:
                refusal = f"no usable channel binding in {cb_flag!r}"
                cb_data = b""
        else:
            cb_data = b""
            if cb_flag == "y" and self.rec.tls and any(m.endswith("-PLUS") for m in self.srv.sasl):
                refusal = "'y' flag although the server offers -PLUS (a downgrade)"
            elif cb_flag not in ("n", "y"):
                refusal = f"channel binding {cb_flag!r} with a mechanism without -PLUS"
        ex.expected_binding = ex.gs2_header.encode() + cb_data
        attrs = dict(a.split("=", 1) for a in bare.split(","))
        user = attrs["n"].replace("=2C", ",").replace("=3D", "=")
        salt = ex.salt = self.srv.scram_salt or os.urandom(16)
        nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
        server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i={self.srv.scram_iterations}"

        final = self._challenge(ex, server_first.encode()).decode()
        without_proof, _, proof = final.rpartition(",p=")
        fattrs = dict(a.split("=", 1) for a in without_proof.split(","))
        ex.channel_binding = base64.b64decode(fattrs["c"], validate=True)
        salted = hashlib.pbkdf2_hmac(hash_name, self.srv.password.encode(), salt,
                                     self.srv.scram_iterations)
        client_key = HMAC(salted, b"Client Key")
        auth_message = f"{bare},{server_first},{without_proof}".encode()
        signature = HMAC(H(client_key), auth_message)
        proof = base64.b64decode(proof, validate=True)
        recovered = bytes(a ^ b for a, b in zip(proof, signature))
        if refusal is None and fattrs.get("r") != nonce:
            refusal = "the client's final nonce differs"
        if refusal is None and ex.channel_binding != ex.expected_binding:
            refusal = "channel bindings do not match"
        if refusal is None and (user != self.srv.user or len(proof) != len(signature)
                                or H(recovered) != H(client_key)):
            refusal = "wrong user or proof"
        if refusal is not None:
            return refusal
        server_signature = HMAC(HMAC(salted, b"Server Key"), auth_message)
        if "bad-server-signature" in self.srv.sasl_faults:
            server_signature = HMAC(b"not the server key", auth_message)
        server_final = b"v=" + base64.b64encode(server_signature)
        if "no-server-final" in self.srv.sasl_faults:
            return None
        if "server-final-in-ok" in self.srv.sasl_faults:
            ex.success_data = base64.b64encode(server_final)
            return None
        last = self._challenge(ex, server_final)
        if last:
            return f"a non-empty answer to the server-final message: {last!r}"
        return None

    def cmd_STAT(self, arg):
        if not self.in_transaction:
            return b"-ERR Not logged in\r\n", None
        live = [m for n, m in enumerate(self.view, 1) if n not in self.marked]
        return f"+OK {len(live)} {sum(len(m.data) for m in live)}\r\n".encode(), None

    def cmd_LIST(self, arg):
        return self._listing(arg, lambda m: len(m.data))

    def cmd_UIDL(self, arg):
        return self._listing(arg, lambda m: m.uidl)

    def cmd_RETR(self, arg):
        n, m = self._message(arg)
        if n is None:
            return m, None
        return f"+OK {len(m.data)} octets\r\n".encode() + dot_stuff(m.data), None

    def cmd_TOP(self, arg):
        parts = arg.split()
        n, m = self._message(arg)
        if n is None:
            return m, None
        if len(parts) != 2 or not parts[1].isdigit():
            return b"-ERR Invalid arguments\r\n", None
        head, sep, body = m.data.partition(b"\r\n\r\n")
        lines = body.split(b"\r\n")[: int(parts[1])]
        top = head + sep + b"".join(l + b"\r\n" for l in lines)
        return b"+OK\r\n" + dot_stuff(top), None

    def cmd_DELE(self, arg):
        n, m = self._message(arg)
        if n is None:
            return m, None
        return b"+OK Marked to be deleted.\r\n", lambda: self.marked.add(n)

    def cmd_RSET(self, arg):
        if not self.in_transaction:
            return b"-ERR Not logged in\r\n", None
        return b"+OK\r\n", self.marked.clear

    def cmd_QUIT(self, arg):
        if not self.in_transaction:
            return b"+OK Logging out\r\n", None

        def commit():
            gone = {id(self.view[n - 1]) for n in self.marked}
            with self.srv._lock:
                self.rec.committed = [m.uidl for m in self.srv.mailbox if id(m) in gone]
                self.srv.mailbox = [m for m in self.srv.mailbox if id(m) not in gone]
                self.rec.quit_ok = True
            self._release()
        return b"+OK Logging out, messages deleted.\r\n", commit


# mechanism (without -PLUS, "-" as "_") -> the _GoodSession method serving it
_SASL_SERVERS = {name[len("_sasl_"):]: getattr(_GoodSession, name)
                 for name in dir(_GoodSession) if name.startswith("_sasl_")}
