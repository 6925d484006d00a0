#!/usr/bin/env python3
"""An OAuth2 token endpoint (and RFC 7662 introspection endpoint) for tests.

A real HTTPS server on 127.0.0.1 with the test CA's server certificate
(tools/dovecot.py's DIR/tls/server.crt, valid for 127.0.0.1, ::1 and
localhost). Stdlib only. It has two listeners:

    token port       POST /token: what popfetchd talks to; the faults below
                     (refuse, fail, stall, drop, down) apply here only
    introspect port  POST /introspect: what Dovecot's oauth2 passdb asks;
                     never faulted, so a token endpoint that is "down" does
                     not break Dovecot. Also GET /stats and POST /control.

Both listeners answer every path (/token, /introspect, /stats, /control);
the difference is only which faults apply.

POST /token (application/x-www-form-urlencoded; client authentication in
the body, client_secret_post, or as HTTP Basic, client_secret_basic):

    grant_type=client_credentials  client_id, client_secret, scope
    grant_type=refresh_token       refresh_token, client_id[, client_secret]
                                   (required for a confidential client; a
                                   client registered without a secret is
                                   public: a secret it sends is ignored)

    -> 200 {"access_token", "token_type": "Bearer", "expires_in", "scope"
            [, "refresh_token" when rotating]}
    -> 401 {"error": "invalid_client", "error_description"}  unknown client / wrong secret
    -> 400 {"error": "invalid_grant", "error_description"}   unknown, used or revoked refresh token
    -> 400 {"error": "unsupported_grant_type" | "invalid_request", ...}

Access tokens are random and opaque ("pfdat_..."), refresh tokens too
("pfdrt_..."); every one is remembered with its user and expiry.

POST /introspect token=T (RFC 7662; also GET /introspect?token=T and
"Authorization: Bearer T", which is what Dovecot sends in its other
introspection modes):

    -> {"active": true, "username": USER, "sub": USER, "client_id", "scope",
        "exp", "iat", "token_type": "Bearer"}  for a known, unexpired token
    -> {"active": false}                      otherwise

Every token presented there is recorded (`presented`), so a test can see
which token Dovecot was given by each login attempt.

As a module (in the test process; every control is a method):

    ts = TokenServer.for_tls_dir(dovecot.tls_dir).start()
    client = ts.add_client(username="t0001")       # .client_id .client_secret .username
    ts.token_url, ts.introspect_url, ts.ca_file
    ts.refuse("invalid_client", "AADSTS7000215: Invalid client secret provided.")
    ts.fail(500); ts.stall(60); ts.stall(60, phase="handshake"); ts.drop()
    ts.delay(1.5)                                  # answer normally, but late
    ts.down(); ts.up(); ts.normal()                # faults, `times=N` for the next N only
    ts.expire_all(); ts.set_expires_in(30); ts.reject_tokens(True)
    ts.rotate_refresh_tokens(True); rt = ts.add_refresh_token(client)
    ts.stats()                                     # counts (also GET /stats)
    ts.token_requests, ts.presented, ts.issued     # what happened, in order
    ts.secrets()                                   # every secret it knows or issued
    ts.reset(); ts.stop()

As a program (controls over HTTP, POST /control with a JSON object
{"action": METHOD, ...keyword arguments}, on either port):

    python3 tests/tools/tokenserver.py serve --tls-dir DIR/tls [--client ID:SECRET:USER]
    python3 tests/tools/tokenserver.py ctl https://127.0.0.1:PORT stall seconds=60 --ca DIR/tls/ca.crt
    python3 tests/tools/tokenserver.py ctl https://127.0.0.1:PORT stats --ca DIR/tls/ca.crt

`serve` prints one JSON line (ports, URLs, clients) and runs until SIGTERM
or SIGINT. Over HTTP, "down" takes `seconds` (default 10) after which the
token port comes back by itself: nothing could bring it up otherwise.
"""

import argparse
import base64
import collections
import http.server
import json
import os
import secrets as secrets_mod
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
import urllib.request

HOST = "127.0.0.1"
DEFAULT_EXPIRES_IN = 3600
TLS_HANDSHAKE_TIMEOUT = 10
IDLE_TIMEOUT = 30
MAX_BODY = 1 << 20

# the methods POST /control may call (with the JSON object's other members
# as keyword arguments)
CONTROL_ACTIONS = ("reset", "normal", "refuse", "fail", "stall", "delay", "drop", "down", "up",
                   "expire_all", "set_expires_in", "reject_tokens", "rotate_refresh_tokens",
                   "add_client", "add_refresh_token", "revoke_refresh_token", "stats",
                   "dump")


class Client:
    """A registered OAuth2 client: client_id, client_secret (None: public
    client), username (who its tokens are for), scope (None: any)."""

    def __init__(self, client_id, client_secret, username, scope=None):
        self.client_id, self.client_secret = client_id, client_secret
        self.username, self.scope = username, scope

    def as_dict(self):
        return dict(vars(self))

    def __repr__(self):
        return f"Client({self.client_id!r}, user={self.username!r})"


class Fault:
    """What /token does instead of answering normally."""

    def __init__(self, kind, times=None, **args):
        self.kind, self.times, self.args = kind, times, args

    def as_dict(self):
        return {"kind": self.kind, "times": self.times, **self.args}


class TokenServer:
    """See the module docstring."""

    host = HOST

    def __init__(self, cert_file, key_file, ca_file=None, port=0, introspect_port=0,
                 expires_in=DEFAULT_EXPIRES_IN, token_bytes=32, log=None):
        """cert_file/key_file: the server certificate (for 127.0.0.1);
        ca_file: the CA that issued it (only reported, for clients);
        port/introspect_port: 0 picks free ports; token_bytes: random
        bytes per access token (a Microsoft token is ~1500 characters:
        try token_bytes=1100); log: a callable(str) for one line per
        request (default: none)."""
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ssl_context.load_cert_chain(cert_file, key_file)
        self._want_ports = (port, introspect_port)
        self.port = self.introspect_port = None
        self.default_expires_in = expires_in
        self.default_token_bytes = token_bytes
        self._log = log
        self._lock = threading.RLock()
        self._servers = {}          # role -> server
        self._threads = {}
        self._wake = threading.Event()
        self._auto_up = None
        self._live_conns = set()
        self._clear()

    @classmethod
    def for_tls_dir(cls, tls_dir, **kw):
        """A server presenting tools/dovecot.py's DIR/tls/server.crt."""
        return cls(os.path.join(tls_dir, "server.crt"), os.path.join(tls_dir, "server.key"),
                   ca_file=os.path.join(tls_dir, "ca.crt"), **kw)

    # -- URLs ------------------------------------------------------------------

    def url(self, path="/token", role="token"):
        port = self.port if role == "token" else self.introspect_port
        return f"https://{HOST}:{port}{path}"

    token_url = property(lambda self: self.url("/token"))
    introspect_url = property(lambda self: self.url("/introspect", "introspect"))
    control_url = property(lambda self: self.url("/control", "introspect"))
    stats_url = property(lambda self: self.url("/stats", "introspect"))

    # -- lifecycle -------------------------------------------------------------

    def start(self):
        self._listen("introspect", self._want_ports[1])
        self._listen("token", self._want_ports[0])
        return self

    def stop(self):
        """Stop both listeners, release stalled requests, close connections."""
        with self._lock:
            if self._auto_up:
                self._auto_up.cancel()
                self._auto_up = None
        self._release_stalls()
        for role in list(self._servers):
            self._close(role)
        self._close_connections(None)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def running(self, role="token"):
        return role in self._servers

    def _listen(self, role, port):
        server = _HTTPSServer((HOST, port), _Handler, self, role)
        with self._lock:
            self._servers[role] = server
            if role == "token":
                self.port = server.server_address[1]
            else:
                self.introspect_port = server.server_address[1]
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             name=f"tokenserver-{role}-{server.server_address[1]}", daemon=True)
        t.start()
        self._threads[role] = t

    def _close(self, role):
        with self._lock:
            server = self._servers.pop(role, None)
            thread = self._threads.pop(role, None)
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5)

    def _close_connections(self, role):
        with self._lock:
            conns = [c for c in self._live_conns if role is None or c[0] == role]
        for _, sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- state -----------------------------------------------------------------

    def _clear(self):
        with self._lock:
            self.clients = {}            # client_id -> Client
            self.tokens = {}             # access token -> dict
            self.refresh_tokens = {}     # refresh token -> dict
            self.fault = None
            self.expires_in = self.default_expires_in
            self.token_bytes = self.default_token_bytes
            self.rotating = False
            self.rejecting = False
            self.counts = collections.Counter()
            self.token_requests = []     # one dict per /token request (see _token)
            self.presented = []          # one dict per introspection: token, active, username
            self.issued = []             # access tokens, in order
            self.issued_refresh = []     # refresh tokens issued by rotation, in order
            self._known_secrets = []     # everything secret, for secrets()

    def reset(self):
        """Forget clients, tokens and records; no fault; token port up;
        expires_in and token size back to their defaults; no rotation."""
        with self._lock:
            if self._auto_up:
                self._auto_up.cancel()
                self._auto_up = None
        self._release_stalls()
        self._clear()
        if not self.running("token") and self.running("introspect"):
            self._listen("token", self.port)
        return self.stats()

    def add_client(self, client_id=None, client_secret="", username="user", scope=None):
        """Register a client; client_secret "" makes a random one, None a
        public client (no secret). Returns the Client."""
        with self._lock:
            client_id = client_id or f"pfd-client-{secrets_mod.token_hex(6)}"
            if client_secret == "":
                client_secret = "pfdcs_" + secrets_mod.token_urlsafe(24)
            client = Client(client_id, client_secret, username, scope)
            self.clients[client_id] = client
            if client_secret:
                self._known_secrets.append(client_secret)
            return client

    def add_refresh_token(self, client, username=None):
        """A new valid refresh token for a client (a Client or its id)."""
        client_id = getattr(client, "client_id", client)
        with self._lock:
            if client_id not in self.clients:
                raise KeyError(f"unknown client {client_id}")
            rt = self._new_refresh_token(client_id, username or self.clients[client_id].username)
            return rt

    def revoke_refresh_token(self, refresh_token):
        with self._lock:
            if refresh_token in self.refresh_tokens:
                self.refresh_tokens[refresh_token]["valid"] = False

    def _new_refresh_token(self, client_id, username):
        rt = "pfdrt_" + secrets_mod.token_urlsafe(32)
        self.refresh_tokens[rt] = {"client_id": client_id, "username": username, "valid": True}
        self._known_secrets.append(rt)
        return rt

    # -- controls --------------------------------------------------------------

    def normal(self):
        """No fault: /token answers normally again."""
        with self._lock:
            self.fault = None
        self._release_stalls()

    def refuse(self, error="invalid_client", description=None, status=None, times=None):
        """/token answers an OAuth2 error (RFC 6749 §5.2) whatever it is asked."""
        if description is None:
            description = f"{error}: refused by the test token endpoint"
        if status is None:
            status = 401 if error == "invalid_client" else 400
        self._set_fault(Fault("refuse", times, error=error, description=description,
                              status=status))

    def fail(self, status=500, body=None, times=None):
        """/token answers HTTP `status` with `body` (default a JSON
        server_error, no error_description)."""
        self._set_fault(Fault("fail", times, status=status, body=body))

    def stall(self, seconds=60.0, phase="request", times=None):
        """Accept and never answer for `seconds`, then close without a
        response. phase "request": TLS done, request read, no answer;
        "handshake": TCP accepted, no TLS handshake. reset(), normal() and
        stop() end a stall at once."""
        if phase not in ("request", "handshake"):
            raise ValueError("phase is request or handshake")
        self._set_fault(Fault("stall", times, seconds=float(seconds), phase=phase))

    def delay(self, seconds=1.0, times=None):
        """Read the request, wait `seconds`, then answer it as usual (a slow
        endpoint: a refresh stays in flight that long). Counted as
        token_delayed when the wait begins."""
        self._set_fault(Fault("delay", times, seconds=float(seconds)))

    def drop(self, times=None):
        """Read the request, then close the connection without a response."""
        self._set_fault(Fault("drop", times))

    def down(self, seconds=None):
        """Close the token port (connection refused) and every connection on
        it; `seconds`: come back up by itself after that long."""
        self._close("token")
        self._close_connections("token")
        if seconds is not None:
            with self._lock:
                if self._auto_up:
                    self._auto_up.cancel()
                self._auto_up = threading.Timer(float(seconds), self.up)
                self._auto_up.daemon = True
                self._auto_up.start()

    def up(self):
        """Listen on the token port again (the same port number)."""
        with self._lock:
            self._auto_up = None
            if self.running("token"):
                return
            port = self.port
        self._listen("token", port)

    def expire_all(self):
        """Every access token issued so far is now expired (introspection
        says inactive); new ones are fine. Clients' caches do not know."""
        with self._lock:
            now = time.time()
            for info in self.tokens.values():
                info["expires_at"] = min(info["expires_at"], now - 1)

    def set_expires_in(self, seconds):
        """Lifetime of the tokens issued from now on (and their expires_in)."""
        with self._lock:
            self.expires_in = int(seconds)

    def set_token_bytes(self, n):
        with self._lock:
            self.token_bytes = int(n)

    def reject_tokens(self, on=True):
        """Introspection says {"active": false} for every token, old or new."""
        with self._lock:
            self.rejecting = bool(on)

    def rotate_refresh_tokens(self, on=True):
        """Each refresh_token grant returns a new refresh_token and
        invalidates the one presented (off: no refresh_token in the answer,
        the old one stays valid)."""
        with self._lock:
            self.rotating = bool(on)

    def _set_fault(self, fault):
        with self._lock:
            self.fault = fault
            self._wake = threading.Event()

    def _release_stalls(self):
        with self._lock:
            wake, self._wake = self._wake, threading.Event()
        wake.set()

    def _take_fault(self):
        with self._lock:
            f = self.fault
            if f is None:
                return None, self._wake
            if f.times is not None:
                f.times -= 1
                if f.times <= 0:
                    self.fault = None
            return f, self._wake

    # -- inspection ------------------------------------------------------------

    def stats(self):
        """Counts: connections (to the token port), token (requests to
        /token that were read), token_ok, token_error (OAuth errors),
        token_failed (HTTP failures), token_stalled, token_delayed, token_dropped,
        grant:client_credentials, grant:refresh_token, introspect,
        introspect_active, introspect_inactive."""
        with self._lock:
            return dict(self.counts)

    def dump(self):
        """Everything, as JSON-able data (GET /stats?full=1)."""
        with self._lock:
            return {"counts": dict(self.counts), "token_requests": list(self.token_requests),
                    "presented": list(self.presented), "issued": list(self.issued),
                    "issued_refresh": list(self.issued_refresh),
                    "clients": [c.as_dict() for c in self.clients.values()],
                    "fault": self.fault.as_dict() if self.fault else None,
                    "expires_in": self.expires_in, "rotating": self.rotating,
                    "rejecting": self.rejecting, "token_up": self.running("token"),
                    "port": self.port, "introspect_port": self.introspect_port}

    @property
    def token_count(self):
        """Requests to /token that were read (whatever the answer)."""
        return self.stats().get("token", 0)

    def presented_tokens(self):
        """The tokens Dovecot asked about, in order."""
        with self._lock:
            return [p["token"] for p in self.presented]

    def secrets(self):
        """Every client secret, refresh token and access token this server
        knows of or issued (for scanning output for leaks)."""
        with self._lock:
            return list(self._known_secrets) + list(self.issued)

    def valid(self, token):
        with self._lock:
            info = self.tokens.get(token)
            return bool(info) and not self.rejecting and info["expires_at"] > time.time()

    def _note(self, line):
        if self._log:
            self._log(line)

    # -- request handling (called by _Handler) ---------------------------------

    def _token(self, handler, form, basic):
        """The answer to POST /token: (status, JSON object)."""
        grant = form.get("grant_type", "")
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth_style = "post" if client_secret is not None else None
        if basic is not None:
            if client_id is not None and client_id != basic[0]:
                return self._error(400, "invalid_request",
                                   "client_id in the body and in Authorization differ")
            client_id, client_secret, auth_style = basic[0], basic[1], "basic"
        record = {"time": time.time(), "grant_type": grant, "client_id": client_id,
                  "client_auth": auth_style, "scope": form.get("scope"),
                  "refresh_token": form.get("refresh_token"), "form": dict(form),
                  "content_type": handler.headers.get("Content-Type"),
                  "user_agent": handler.headers.get("User-Agent"), "result": None}
        with self._lock:
            self.token_requests.append(record)
            self.counts["token"] += 1
            self.counts[f"grant:{grant}"] += 1
            status, body = self._grant(record, grant, client_id, client_secret, form)
            record["result"] = body.get("error", "ok")
            record["access_token"] = body.get("access_token")
            self.counts["token_ok" if status == 200 else "token_error"] += 1
        return status, body

    def _grant(self, record, grant, client_id, client_secret, form):
        if grant not in ("client_credentials", "refresh_token"):
            return self._error(400, "unsupported_grant_type", f"grant_type {grant!r} is not supported")
        if not client_id:
            return self._error(400, "invalid_request", "client_id is missing")
        client = self.clients.get(client_id)
        if client is None:
            return self._error(401, "invalid_client",
                               f"AADSTS700016: client {client_id} is not known to this endpoint")
        if client.client_secret is not None and client_secret != client.client_secret:
            return self._error(401, "invalid_client",
                               "AADSTS7000215: Invalid client secret provided.")
        if grant == "client_credentials":
            if client.client_secret is None:
                return self._error(401, "invalid_client",
                                   "a public client cannot use client_credentials")
            if not form.get("scope"):
                return self._error(400, "invalid_scope", "scope is required")
            if client.scope is not None and form["scope"] != client.scope:
                return self._error(400, "invalid_scope", f"scope {form['scope']!r} is not granted")
            return 200, self._issue(client, client.username, form.get("scope"))
        rt = form.get("refresh_token")
        info = self.refresh_tokens.get(rt) if rt else None
        if not rt:
            return self._error(400, "invalid_request", "refresh_token is missing")
        if info is None or not info["valid"] or info["client_id"] != client_id:
            return self._error(400, "invalid_grant",
                               "AADSTS70000: The provided refresh token is invalid, expired or revoked.")
        body = self._issue(client, info["username"], form.get("scope"))
        if self.rotating:
            info["valid"] = False
            new = self._new_refresh_token(client_id, info["username"])
            self.issued_refresh.append(new)
            body["refresh_token"] = new
            record["rotated_to"] = new
        return 200, body

    def _issue(self, client, username, scope):
        token = "pfdat_" + secrets_mod.token_urlsafe(self.token_bytes)
        now = time.time()
        self.tokens[token] = {"username": username, "client_id": client.client_id,
                              "scope": scope, "issued_at": now,
                              "expires_at": now + self.expires_in}
        self.issued.append(token)
        body = {"token_type": "Bearer", "access_token": token, "expires_in": self.expires_in,
                "ext_expires_in": self.expires_in}
        if scope:
            body["scope"] = scope
        return body

    @staticmethod
    def _error(status, error, description):
        return status, {"error": error, "error_description": description,
                        "error_codes": [status], "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ",
                                                                            time.gmtime())}

    def _introspect(self, token, how):
        with self._lock:
            info = self.tokens.get(token) if token else None
            active = bool(info) and not self.rejecting and info["expires_at"] > time.time()
            self.counts["introspect"] += 1
            self.counts["introspect_active" if active else "introspect_inactive"] += 1
            self.presented.append({"time": time.time(), "token": token, "active": active,
                                   "how": how, "username": info["username"] if info else None})
            if not active:
                return {"active": False}
            return {"active": True, "username": info["username"], "sub": info["username"],
                    "client_id": info["client_id"], "scope": info["scope"] or "",
                    "token_type": "Bearer", "iat": int(info["issued_at"]),
                    "exp": int(info["expires_at"])}

    def _control(self, request):
        action = request.pop("action", None)
        if action not in CONTROL_ACTIONS:
            return 400, {"error": f"unknown action {action!r}", "actions": list(CONTROL_ACTIONS)}
        if action == "down":
            request.setdefault("seconds", 10)   # over HTTP nothing else could bring it back
        result = getattr(self, action)(**request)
        if isinstance(result, Client):
            result = result.as_dict()
        return 200, {"ok": True, "result": result}


# --------------------------------------------------------------------------
# HTTP plumbing


class _HTTPSServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """An HTTP server doing the TLS handshake in each connection's thread (a
    client that stalls its handshake delays nobody else)."""
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, owner, role):
        self.owner, self.role = owner, role
        super().__init__(address, handler)

    def finish_request(self, request, client_address):
        owner = self.owner
        tls = None
        try:
            if self.role == "token":
                with owner._lock:
                    owner.counts["connections"] += 1
                    f = owner.fault
                if f is not None and f.kind == "stall" and f.args["phase"] == "handshake":
                    f, wake = owner._take_fault()
                    if f is not None and f.kind == "stall":
                        with owner._lock:
                            owner.counts["token_stalled"] += 1
                        owner._note(f"stalling a connection for {f.args['seconds']} s (handshake)")
                        wake.wait(f.args["seconds"])
                        return
            request.settimeout(TLS_HANDSHAKE_TIMEOUT)
            try:
                tls = owner.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as e:
                owner._note(f"TLS handshake failed: {e}")
                return
            tls.settimeout(IDLE_TIMEOUT)
            entry = (self.role, tls)
            with owner._lock:
                owner._live_conns.add(entry)
            try:
                self.RequestHandlerClass(tls, client_address, self)
            finally:
                with owner._lock:
                    owner._live_conns.discard(entry)
        finally:
            for s in (tls, request):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def handle_error(self, request, client_address):
        # a client that goes away mid-request is no news
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError)):
            return
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pfd-tokenserver/1"

    def log_message(self, fmt, *args):
        self.server.owner._note(f"{self.server.role}: " + fmt % args)

    # -- helpers ---------------------------------------------------------------

    def _send_json(self, status, obj, extra_headers=()):
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Pragma", "no-cache")
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra_headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _form(self, body):
        pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        return dict(pairs)

    def _basic(self):
        value = self.headers.get("Authorization", "")
        if not value.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(value[6:].strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return ("", "")
        # RFC 6749 §2.3.1: both are form-urlencoded before Basic encoding
        return urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)

    def _bearer(self):
        value = self.headers.get("Authorization", "")
        return value[7:].strip() if value.lower().startswith("bearer ") else None

    # -- methods ---------------------------------------------------------------

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        owner = self.server.owner
        if url.path == "/stats":
            self._send_json(200, owner.dump() if query.get("full") else owner.stats())
        elif url.path == "/introspect":
            token = query.get("token") or query.get("access_token")
            how = "get"
            if token is None:
                token, how = self._bearer(), "bearer"
            self._send_json(200, owner._introspect(token, how))
        elif url.path == "/health":
            self._send_json(200, {"ok": True})
        else:
            self._send_json(404, {"error": "not_found"})

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        owner = self.server.owner
        try:
            body = self._body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        if url.path == "/token":
            self._post_token(body)
        elif url.path == "/introspect":
            form = self._form(body)
            token, how = form.get("token"), "post"
            if token is None:
                token, how = self._bearer(), "bearer"
            self._send_json(200, owner._introspect(token, how))
        elif url.path == "/control":
            try:
                request = json.loads(body or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                status, answer = owner._control(request)
            except (ValueError, TypeError, KeyError) as e:
                status, answer = 400, {"error": str(e)}
            self._send_json(status, answer)
        else:
            self._send_json(404, {"error": "not_found"})

    def _post_token(self, body):
        owner = self.server.owner
        if self.server.role == "token":
            if not owner.running("token"):          # went down while this connection lived
                self.close_connection = True
                return
            fault, wake = owner._take_fault()
        else:
            fault, wake = None, None
        if fault is not None:
            kind = fault.kind
            if kind == "stall":
                with owner._lock:
                    owner.counts["token_stalled"] += 1
                owner._note(f"stalling /token for {fault.args['seconds']} s")
                wake.wait(fault.args["seconds"])
                self.close_connection = True
                return
            if kind == "delay":
                with owner._lock:
                    owner.counts["token_delayed"] += 1
                wake.wait(fault.args["seconds"])
            if kind == "drop":
                with owner._lock:
                    owner.counts["token_dropped"] += 1
                self.close_connection = True
                return
            if kind == "fail":
                with owner._lock:
                    owner.counts["token"] += 1
                    owner.counts["token_failed"] += 1
                    owner.token_requests.append({"time": time.time(), "result": f"http {fault.args['status']}",
                                                 "form": self._form(body)})
                payload = fault.args["body"]
                if payload is None:
                    payload = {"error": "server_error"}
                if isinstance(payload, (dict, list)):
                    self._send_json(fault.args["status"], payload)
                else:
                    data = str(payload).encode()
                    self.send_response(fault.args["status"])
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                return
            if kind == "refuse":
                with owner._lock:
                    owner.counts["token"] += 1
                    owner.counts["token_error"] += 1
                    owner.token_requests.append({"time": time.time(), "result": fault.args["error"],
                                                 "form": self._form(body)})
                status, answer = owner._error(fault.args["status"], fault.args["error"],
                                              fault.args["description"])
                headers = [("WWW-Authenticate", 'Basic realm="token"')] if status == 401 else []
                self._send_json(status, answer, headers)
                return
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            status, answer = owner._error(400, "invalid_request",
                                          f"Content-Type must be application/x-www-form-urlencoded, not {ctype!r}")
            with owner._lock:
                owner.counts["token"] += 1
                owner.counts["token_error"] += 1
                owner.token_requests.append({"time": time.time(), "result": "invalid_request",
                                             "form": self._form(body), "content_type": ctype})
            self._send_json(status, answer)
            return
        status, answer = owner._token(self, self._form(body), self._basic())
        headers = [("WWW-Authenticate", 'Basic realm="token"')] if status == 401 else []
        self._send_json(status, answer, headers)


# --------------------------------------------------------------------------
# a client for POST /token and /control (tests and the `ctl` command)


def post_form(url, fields, ca_file=None, timeout=10, headers=None):
    """POST a form to url; returns (status, parsed JSON or text)."""
    data = urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
    return _request(req, ca_file, timeout)


def post_json(url, obj, ca_file=None, timeout=10):
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return _request(req, ca_file, timeout)


def _request(req, ca_file, timeout):
    ctx = ssl.create_default_context(cafile=ca_file)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


# --------------------------------------------------------------------------
# command line


def _parse_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(argv=None):
    ap = argparse.ArgumentParser(description="An OAuth2 token + introspection endpoint for tests.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the server in the foreground")
    serve.add_argument("--tls-dir", required=True, help="dovecot.py's DIR/tls (server.crt, server.key, ca.crt)")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--introspect-port", type=int, default=0)
    serve.add_argument("--expires-in", type=int, default=DEFAULT_EXPIRES_IN)
    serve.add_argument("--client", action="append", default=[],
                       help="ID:SECRET:USER (SECRET empty: a public client)")
    serve.add_argument("--quiet", action="store_true")
    ctl = sub.add_parser("ctl", help="call POST /control on a running server")
    ctl.add_argument("url", help="https://127.0.0.1:PORT (either port)")
    ctl.add_argument("action", choices=CONTROL_ACTIONS)
    ctl.add_argument("args", nargs="*", help="NAME=VALUE (VALUE as JSON if it parses)")
    ctl.add_argument("--ca", help="the test CA (ca.crt)")
    args = ap.parse_args(argv)

    if args.cmd == "ctl":
        request = {"action": args.action}
        for item in args.args:
            name, _, value = item.partition("=")
            request[name] = _parse_value(value)
        status, answer = post_json(args.url.rstrip("/") + "/control", request, args.ca)
        print(json.dumps(answer, indent=2))
        return 0 if status == 200 else 1

    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    ts = TokenServer.for_tls_dir(args.tls_dir, port=args.port,
                                 introspect_port=args.introspect_port,
                                 expires_in=args.expires_in, log=log).start()
    clients = []
    for spec in args.client:
        cid, secret, user = (spec.split(":", 2) + ["", ""])[:3]
        clients.append(ts.add_client(cid, secret or None, user or "user").as_dict())
    print(json.dumps({"pid": os.getpid(), "port": ts.port, "introspect_port": ts.introspect_port,
                      "token_url": ts.token_url, "introspect_url": ts.introspect_url,
                      "control_url": ts.control_url, "ca_file": ts.ca_file,
                      "clients": clients}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    ts.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
