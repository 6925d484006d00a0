"""The Prometheus endpoint (metrics_listen, DESIGN.md §7): GET /metrics of a
daemon polling the real Dovecot fixture, checked by promtool and scraped by
a real Prometheus server; other paths and methods; slow, silent and
oversized clients, which must never delay a poll; listening again on
reload; the alert rules in contrib/prometheus."""

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import mailgen
from daemonutil import daemon, wait_for  # noqa: F401  (daemon: a fixture)

EX_OK = 0
DEADLINE = 5         # METRICS_DEADLINE: seconds a connection may live
MAX_CONNECTIONS = 16  # METRICS_MAX_CONNECTIONS

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing: scripts/install-deps (prometheus)")


def free_port(family=socket.AF_INET, host="127.0.0.1"):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def get(port, path="/metrics", method="GET", host="127.0.0.1", headers=None, timeout=5):
    """(status, headers, body text)."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        c.close()


def sample(text, name, **labels):
    """The value of the sample name{labels} (exact label set), or None."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    line = f"{name}{{{want}}}" if labels else name
    for row in text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return None


def messages(n, seed, size=3000):
    return [m.data for m in mailgen.generate_messages(n, size, seed=seed)]


def metrics_daemon(confdir, daemon, configs, listen=None, **settings):
    """A daemon with metrics_listen on a free loopback port: (Daemon, port)."""
    port = free_port()
    cd = confdir(*configs, daemon={"metrics_listen": listen or f"127.0.0.1:{port}", **settings})
    d = daemon(cd)
    d.wait_ready()
    wait_for(lambda: "metrics: http://" in d.output, 10, f"the endpoint\n{d.output}")
    return d, port, cd


@pytest.fixture
def polled(dovecot, mailbox, dovecot_config, confdir, daemon):
    """A daemon polling a Dovecot mailbox every second with 3 messages in
    it, metrics on; returns (daemon, port, mailbox) once all 3 are saved."""
    mailbox.deliver(*messages(3, seed=1701))
    config = dovecot_config(mailbox, id="dv", poll_interval="1s")
    asleep = dovecot_config(mailbox, id="asleep", status="inactive")
    d, port, _ = metrics_daemon(confdir, daemon, [config, asleep])
    wait_for(lambda: sample(get(port)[2], "popfetchd_messages_saved_total", config="dv") == 3,
             30, "3 messages counted as saved")
    yield d, port, mailbox
    assert d.stop() == EX_OK, d.output


def test_metrics_after_a_poll(polled):
    """After a poll of the real Dovecot: the per-configuration counters, the
    daemon's gauges, the histograms and the process_* gauges."""
    d, port, mailbox = polled
    wait_for(lambda: mailbox.count() == 0, 10, "the messages deleted")
    wait_for(lambda: sample(get(port)[2], "popfetchd_messages_deleted_total", config="dv") == 3,
             10, "the deletions counted")
    status, headers, text = get(port)
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers.get("Connection") == "close"
    print(text)
    assert sample(text, "popfetchd_messages_saved_total", config="dv") == 3
    assert sample(text, "popfetchd_messages_deleted_total", config="dv") == 3
    assert sample(text, "popfetchd_bytes_saved_total", config="dv") > 3 * 2000
    assert sample(text, "popfetchd_polls_total", config="dv", result="ok") >= 1
    assert sample(text, "popfetchd_polls_total", config="dv", result="failed") == 0
    assert sample(text, "popfetchd_consecutive_failures", config="dv") == 0
    assert abs(sample(text, "popfetchd_last_success_timestamp_seconds", config="dv")
               - time.time()) < 30
    assert sample(text, "popfetchd_configurations", state="active") == 1
    assert sample(text, "popfetchd_configurations", state="inactive") == 1
    assert sample(text, "popfetchd_configurations", state="broken") == 0
    assert sample(text, "popfetchd_sessions", state="queued") is not None
    # an inactive configuration has no series
    assert 'config="asleep"' not in text
    polls = sample(text, "popfetchd_poll_duration_seconds_count")
    assert polls >= 1 and sample(text, "popfetchd_poll_duration_seconds_bucket", le="+Inf") == polls
    # the 10 ms timer's lateness: see test_loop_lag_sampled_every_10ms
    assert sample(text, "popfetchd_event_loop_lag_seconds_count") >= 1
    assert sample(text, "popfetchd_event_loop_lag_max_seconds") >= 0
    assert sample(text, "popfetchd_build_info", version=build_version(d)) == 1
    assert sample(text, "process_open_fds") > 3
    assert sample(text, "process_resident_memory_bytes") > 1e6
    assert abs(sample(text, "process_start_time_seconds") - time.time()) < 120
    for family in ("popfetchd_polls_total", "popfetchd_poll_duration_seconds",
                   "popfetchd_event_loop_lag_seconds", "popfetchd_event_loop_lag_max_seconds",
                   "process_cpu_seconds_total"):
        assert f"# HELP {family} " in text and f"# TYPE {family} " in text


def test_loop_lag_sampled_every_10ms(polled):
    """popfetchd_event_loop_lag_seconds counts a 10 ms timer's lateness: over
    2 s of an idle daemon some 200 samples (at least 40 even on a loaded
    machine: a 1 s timer would give 2), each in a bucket, the worst in the
    max gauge."""
    d, port, _ = polled
    before = sample(get(port)[2], "popfetchd_event_loop_lag_seconds_count")
    time.sleep(2)
    text = get(port)[2]
    count = sample(text, "popfetchd_event_loop_lag_seconds_count")
    assert count - before >= 40, (before, count)
    assert sample(text, "popfetchd_event_loop_lag_seconds_bucket", le="+Inf") == count
    worst = sample(text, "popfetchd_event_loop_lag_max_seconds")
    assert 0 <= worst <= 60, worst  # seconds; a sample is one timer's lateness
    assert worst * count >= sample(text, "popfetchd_event_loop_lag_seconds_sum") - 1e-6


def build_version(d):
    return re.search(r"popfetchd (\S+): ", d.output).group(1)


@needs_promtool
def test_promtool_accepts_the_output(polled):
    d, port, _ = polled
    text = get(port)[2]
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_other_paths_and_methods(polled):
    d, port, _ = polled
    assert get(port, "/other")[0] == 404
    assert get(port, "/")[0] == 404
    assert get(port, "/metrics/x")[0] == 404
    status, headers, _ = get(port, method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert get(port, method="DELETE")[0] == 405
    status, headers, body = get(port, method="HEAD")
    assert status == 200 and body == ""
    # a query string is still /metrics
    assert get(port, "/metrics?x=1")[0] == 200


def test_oversized_headers_refused(polled):
    d, port, _ = polled
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    status = answer.split(b"\r\n", 1)[0]
    assert b" 200 " not in status and b"popfetchd_" not in answer, answer[:300]
    assert status == b"" or re.match(rb"HTTP/1\.[01] (400|413|431) ", status), status
    assert get(port)[0] == 200


def test_slow_clients_never_delay_polls(dovecot, mailbox, dovecot_config, confdir, daemon):
    """More silent connections than the endpoint takes at once, a client
    that trickles a header line byte by byte and one that never reads its
    answer: mail delivered meanwhile is saved at the next 1 s poll, and
    every one of them is cut within the deadline (those that waited for a
    free place: within two)."""
    config = dovecot_config(mailbox, id="dv", poll_interval="1s")
    d, port, _ = metrics_daemon(confdir, daemon, [config])
    save = config["save_directory"]
    t0 = time.monotonic()
    trickler = socket.create_connection(("127.0.0.1", port))
    trickler.sendall(b"GET /metrics HTTP/1.1\r\n")
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS + 4)]
    closed = {}
    try:
        # mail arrives while they hold the endpoint: saved at the next poll
        for round_ in range(3):
            mailbox.deliver(*messages(1, seed=1710 + round_))
            t = time.monotonic()
            wait_for(lambda: len(saved(save)) == round_ + 1, 10, "the message saved")
            took = time.monotonic() - t
            print(f"delivered -> saved in {took:.2f} s with slow clients holding the endpoint")
            assert took < 3.5, took
            trickler.sendall(b"X")
        for s in silent + [trickler]:
            s.settimeout(0.1)
        while time.monotonic() - t0 < 3 * DEADLINE and len(closed) < len(silent) + 1:
            for i, s in enumerate(silent + [trickler]):
                if i in closed:
                    continue
                try:
                    if s.recv(4096) == b"":
                        closed[i] = time.monotonic() - t0
                except socket.timeout:
                    if i == len(silent):
                        s.sendall(b"X")  # the trickler goes on
                except ConnectionResetError:
                    closed[i] = time.monotonic() - t0
    finally:
        for s in silent + [trickler]:
            s.close()
    print("closed after:", sorted(round(v, 1) for v in closed.values()))
    assert len(closed) == len(silent) + 1, f"{len(silent) + 1 - len(closed)} never cut"
    first = sorted(closed.values())[:MAX_CONNECTIONS]  # the trickler among them
    assert all(DEADLINE - 0.5 <= v <= DEADLINE + 2 for v in first), first
    assert max(closed.values()) <= 2 * DEADLINE + 3, closed
    assert closed[len(silent)] <= DEADLINE + 2, "the trickler outlived the deadline"
    # the endpoint answers again, and the daemon polled all along
    text = get(port)[2]
    assert sample(text, "popfetchd_messages_saved_total", config="dv") == 3
    assert sample(text, "popfetchd_polls_total", config="dv", result="ok") >= 8
    assert d.stop() == EX_OK, d.output


def test_unread_answer_is_cut(polled):
    """A client that sends its request and never reads (the answer stays in
    the socket buffers) is cut at the deadline too."""
    d, port, _ = polled
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    t0 = time.monotonic()
    time.sleep(DEADLINE + 2)
    # the server's end is closed: what it sent, then the end of the stream
    s.settimeout(5)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 200 OK"), data[:100]
    assert time.monotonic() - t0 < DEADLINE + 8


def saved(save_dir):
    return [p for p in Path(save_dir).iterdir() if not p.name.startswith(".")]


def test_ipv6_loopback(fake_pop3, fake_config, confdir, daemon):
    port = free_port(socket.AF_INET6, "::1")
    server = fake_pop3([])
    d, _, _ = metrics_daemon(confdir, daemon, [fake_config(server)], listen=f"[::1]:{port}")
    status, _, text = get(port, host="::1")
    assert status == 200 and "popfetchd_build_info" in text
    assert d.stop() == EX_OK


def test_reload_moves_and_closes_the_endpoint(fake_pop3, fake_config, confdir, daemon):
    """SIGHUP with another metrics_listen listens there (the old address is
    closed, the counters kept); without metrics_listen /metrics closes."""
    server = fake_pop3(messages(2, seed=1720))
    config = fake_config(server, poll_interval="1s")
    d, port, cd = metrics_daemon(confdir, daemon, [config])
    wait_for(lambda: sample(get(port)[2], "popfetchd_messages_saved_total", config="fake") == 2,
             20, "2 messages counted")
    port2 = free_port()
    cd.write_main({"metrics_listen": f"127.0.0.1:{port2}"})
    d.signal(signal.SIGHUP)
    d.wait_ready(2)
    assert sample(get(port2)[2], "popfetchd_messages_saved_total", config="fake") == 2
    with pytest.raises(OSError):
        get(port)
    cd.write_main({})
    d.signal(signal.SIGHUP)
    d.wait_ready(3)
    with pytest.raises(OSError):
        get(port2)
    assert "/metrics closed" in d.output
    assert d.stop() == EX_OK, d.output


def test_port_in_use_is_an_error_not_a_stop(fake_pop3, fake_config, confdir, daemon):
    """The address cannot be had: one clear error line, and mail is still fetched."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = fake_pop3(messages(1, seed=1730))
        config = fake_config(server, poll_interval="1s")
        d = daemon(confdir(config, daemon={"metrics_listen": f"127.0.0.1:{port}"}))
        d.wait_ready()
        wait_for(lambda: not server.remaining(), 20, "the message fetched")
        assert d.stop() == EX_OK
    line = next(l for l in d.output.splitlines() if "metrics_listen" in l)
    assert f"127.0.0.1:{port}" in line and "Address already in use" in line, line
    assert "no /metrics until a reload listens" in line


def test_invalid_address_is_a_configuration_error(confdir, run_popfetchd):
    cd = confdir(daemon={"metrics_listen": "localhost:9100"})
    r = run_popfetchd(["check"], confdir=cd)
    assert r.returncode == 78
    assert f"{cd.main}:" in r.stderr and "metrics_listen: must be ADDRESS:PORT" in r.stderr


def test_token_requests_counted(oauth_mailbox, oauth_config, confdir, daemon):
    """An OAuth2 configuration's requests to the token endpoint, by result."""
    oauth_mailbox.deliver(*messages(1, seed=1740))
    config = oauth_config(oauth_mailbox, poll_interval="1s")
    d, port, _ = metrics_daemon(confdir, daemon, [config])
    wait_for(lambda: sample(get(port)[2], "popfetchd_messages_saved_total", config="oa") == 1,
             30, "the message counted")
    text = get(port)[2]
    assert sample(text, "popfetchd_token_requests_total", config="oa", result="ok") >= 1
    assert d.stop() == EX_OK, d.output


# --------------------------------------------------------------------------
# a real Prometheus


def prometheus_query(port, query):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus missing: scripts/install-deps")
def test_real_prometheus_scrapes_the_daemon(polled, tmp_path, root):
    """Prometheus (Debian's) scrapes the daemon every second with the alert
    rules loaded; its HTTP API then has popfetchd_messages_saved_total."""
    d, port, _ = polled
    web = free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(f"""\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {root}/contrib/prometheus/popfetchd.rules.yml
scrape_configs:
  - job_name: popfetchd
    static_configs:
      - targets: ['127.0.0.1:{port}']
""")
    log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen(["prometheus", f"--config.file={conf}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def saved_value():
            try:
                res = prometheus_query(web, "popfetchd_messages_saved_total")
            except OSError:
                return None
            for r in res.get("data", {}).get("result", []):
                if r["metric"].get("config") == "dv":
                    return r
            return None
        r = wait_for(saved_value, 60,
                     f"Prometheus to scrape the daemon\n{(tmp_path / 'prometheus.log').read_text()}")
        print("Prometheus:", r)
        assert r["metric"]["job"] == "popfetchd"
        assert r["metric"]["instance"] == f"127.0.0.1:{port}"
        assert float(r["value"][1]) == 3
        up = prometheus_query(web, 'up{job="popfetchd"}')["data"]["result"]
        assert [float(x["value"][1]) for x in up] == [1]
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/rules", timeout=5) as resp:
            groups = json.load(resp)["data"]["groups"]
        assert [g["name"] for g in groups] == ["popfetchd"]
        assert all(rule["health"] != "err" for g in groups for rule in g["rules"]), groups
    finally:
        prom.terminate()
        try:
            prom.wait(20)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        log.close()


# --------------------------------------------------------------------------
# the alert rules


@needs_promtool
def test_alert_rules_check(root):
    r = subprocess.run(["promtool", "check", "rules",
                        str(root / "contrib/prometheus/popfetchd.rules.yml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 5 rules found" in r.stdout


@needs_promtool
def test_alert_rules_unit_tests(root):
    r = subprocess.run(["promtool", "test", "rules", "popfetchd.rules.test.yml"],
                       cwd=root / "contrib/prometheus", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_certificate_expiry_gauge(dovecot, mailbox, dovecot_config, confdir, daemon):
    """popfetchd_tls_certificate_expiry_timestamp_seconds is the notAfter of
    the certificate the server presented at the last handshake."""
    mailbox.deliver(*messages(1, seed=1709))
    config = dovecot_config(mailbox, id="tls", server="127.0.0.1", port=dovecot.pop3s_port,
                            tls="implicit", tls_ca_file=dovecot.ca_file, poll_interval="1s")
    d, port, _ = metrics_daemon(confdir, daemon, [config])
    name = "popfetchd_tls_certificate_expiry_timestamp_seconds"
    wait_for(lambda: sample(get(port)[2], name, config="tls") is not None, 15,
             f"the certificate's expiry among the metrics\n{d.output}")
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", dovecot.cert_file],
                         capture_output=True, text=True, check=True).stdout.strip()
    not_after = subprocess.run(["date", "-u", "-d", out.split("=", 1)[1], "+%s"],
                               capture_output=True, text=True, check=True).stdout
    assert sample(get(port)[2], name, config="tls") == float(not_after)
