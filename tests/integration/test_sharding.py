"""Sharding (popfetchd.yaml `shard: K/N`, DESIGN.md §1): processes sharing
one configuration tree each poll the configurations whose FNV-1a 64 hash of
the id, mod N, + 1 is their K — disjoint sets whose union is every
configuration."""

import os
import re

import mailgen
from daemonutil import daemon, wait_for  # noqa: F401  (daemon: a fixture)
from pfdconfig import to_yaml, write_secret

EX_OK = 0
IDS = ["invoices", "support", "sales", "billing-2", "m001", "m002"]


def fnv1a64(text):
    h = 0xcbf29ce484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def shard_of(id, n):
    return fnv1a64(id) % n + 1


def polled_ids(output):
    return set(re.findall(r"^popfetchd: ([A-Za-z0-9_.-]+): poll starts", output, re.M))


def test_two_shards_poll_disjoint_sets_covering_all(fake_pop3, fake_config, confdir, daemon,
                                                    run_popfetchd, tmp_path):
    servers = {i: fake_pop3([m.data for m in mailgen.generate_messages(
        1, 1000, seed=1900 + n)]) for n, i in enumerate(IDS)}
    configs = [fake_config(servers[i], id=i, poll_interval="1s") for i in IDS]
    # instance 1: the tree itself; instance 2: its own popfetchd.yaml, the
    # same conf.d and state directory (what the per-configuration lock is in)
    one = confdir(*configs, daemon={"shard": "1/2"})
    two = tmp_path / "instance2"
    two.mkdir()
    (two / "conf.d").symlink_to(one.path / "conf.d")
    write_secret(two / "popfetchd.yaml",
                 to_yaml({"state_directory": str(one.state_directory), "shard": "2/2"}))
    want = {k: {i for i in IDS if shard_of(i, 2) == k} for k in (1, 2)}
    assert want[1] and want[2], "the ids do not exercise both shards"

    # check says whose each configuration is
    res = run_popfetchd(["check"], confdir=one)
    assert res.returncode == EX_OK
    shards = {line.split("\t")[0]: line.split("\t")[-1] for line in res.lines}
    for i in IDS:
        mine = shard_of(i, 2) == 1
        assert shards[i] == f"shard={shard_of(i, 2)}/2" + ("" if mine else " (another process's)")
    doc = run_popfetchd(["--json", "check"], confdir=two).json()
    assert {c["id"]: (c["shard"], c["in_shard"]) for c in doc["configurations"]} == \
        {i: (shard_of(i, 2), shard_of(i, 2) == 2) for i in IDS}

    d1 = daemon(one, args=["-v"])
    d2 = daemon(str(two), args=["-v"])
    d1.wait_ready()
    d2.wait_ready()
    wait_for(lambda: all(not s.remaining() for s in servers.values()), 30, "all mail fetched")
    # a few more rounds: a configuration of the other shard would show up
    wait_for(lambda: all(len(s.sessions) >= 3 for s in servers.values()), 30,
             "three polls of each")
    assert d1.stop() == EX_OK and d2.stop() == EX_OK
    got1, got2 = polled_ids(d1.output), polled_ids(d2.output)
    print("shard 1/2:", sorted(got1), "shard 2/2:", sorted(got2))
    assert got1 == want[1]
    assert got2 == want[2]
    assert got1 | got2 == set(IDS) and not got1 & got2
    assert "shard 1/2: polling only this shard's configurations" in d1.output
    for c in configs:
        assert len([p for p in os.listdir(c["save_directory"]) if not p.startswith(".")]) == 1
