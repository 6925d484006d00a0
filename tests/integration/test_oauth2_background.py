"""The token source on its own event loop (tests/tools/oauth2-probe): tokens
refreshed in the background before they expire, with no poll asking, and a
stalled endpoint holding up no other configuration's token."""

import os
import socket
import subprocess
from pathlib import Path

from conftest import OAUTH_SCOPE

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("POPFETCHD_BUILD", ROOT / "build"))
PROBE = BUILD / "tests" / "oauth2-probe"


def probe(tokenserver, client, state, *args, timeout=60):
    cmd = [str(PROBE), "--endpoint", tokenserver.token_url, "--client-id", client.client_id,
           "--client-secret", client.client_secret, "--ca", tokenserver.ca_file,
           "--scope", OAUTH_SCOPE, "--state", str(state), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    assert client.client_secret not in r.stdout + r.stderr
    return r.stdout.splitlines()


def test_token_refreshed_before_expiry_without_anyone_asking(tokenserver, tmp_path):
    client = tokenserver.add_client()
    tokenserver.set_expires_in(6)
    lines = probe(tokenserver, client, tmp_path / "state", "--keep-fresh", "9")
    requests = [l for l in lines if l.startswith("request ")]
    tokens = [l for l in lines if l.startswith("token OK")]
    # one at the start, then one each time 80% (at least half) of 6 s has passed
    assert len(requests) >= 2, lines
    assert len({t.split()[2] for t in tokens}) >= 2, "the token never changed"
    times = [float(l.split()[2]) for l in requests]
    assert all(b - a < 6 for a, b in zip(times, times[1:])), "refreshed only after expiry"
    # the first request (the initial get) is not among the "request" lines
    assert lines[-1] == f"requests {len(requests) + 1}"


def test_cached_token_is_reused(tokenserver, tmp_path):
    client = tokenserver.add_client()
    state = tmp_path / "state"
    first = probe(tokenserver, client, state)
    second = probe(tokenserver, client, state, "--get", "3")
    assert first[-1] == "requests 1" and second[-1] == "requests 0"
    assert oct((state / "oauth2-token").stat().st_mode & 0o777) == "0o600"


def test_stalled_endpoint_delays_no_other_source(tokenserver, tmp_path):
    client = tokenserver.add_client()
    silent = socket.socket()          # accepts (backlog), never answers: a stall
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/token"
        lines = probe(tokenserver, client, tmp_path / "state", "--timeout", "3",
                      "--second-endpoint", url)
    finally:
        silent.close()
    finished = [l.split() for l in lines if l.startswith("finished ")]
    assert [f[1] for f in finished] == ["main", "second"], lines
    assert float(finished[0][2]) < 1.0, "the good endpoint waited for the stalled one"
    assert float(finished[1][2]) >= 2.5
    assert any(l.startswith("second token UNAVAILABLE") for l in lines), lines
