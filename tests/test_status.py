"""`moe-swarm status` against a real local swarm: every peer and expert, and the expert nobody serves."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.ops.status import resolve_uids
from protos import toy_model
from protos.records import expert_uid

from .conftest import TINY

ANNOUNCE_PERIOD = 2.0
# layer 0: experts 0-3 twice, 4-7 once; layer 1: expert 3 by nobody
HOSTS = {"status-a": "0:*,1:0-2", "status-b": "0:0-3,1:4-7"}
MISSING = (1, 3)


def status(swarm, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "220"}  # rich wraps to the terminal width: keep rows on one line
    return subprocess.run(
        [sys.executable, "-m", "coordinator", "status", "--initial-peers", *swarm.initial_peers, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def status_json(swarm, *args: str) -> dict:
    proc = status(swarm, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def gappy(swarm, tmp_path_factory):
    """A model of its own (the session swarm's peers serve another one) with one expert nobody hosts."""
    ckpt = tmp_path_factory.mktemp("status") / "ckpt"
    manifest = toy_model.save_checkpoint(ckpt, TINY, seed=41)
    common = ["--checkpoint", str(ckpt), "--threads", "1", "--announce-period", str(ANNOUNCE_PERIOD)]
    procs = swarm.start_peers({name: [*common, "--experts", spec] for name, spec in HOSTS.items()})
    yield ckpt, manifest.model_id, {p.name: p for p in procs}
    swarm.stop_many([p for p in procs if p.alive()])


def expected_hosts(model_id: str, procs) -> dict[str, set[str]]:
    """uid -> peer ids that should serve it, from the --experts specs above."""
    out = {expert_uid(model_id, la, e): set() for la in range(TINY.num_layers) for e in range(TINY.num_experts)}
    for name, spec in HOSTS.items():
        for item in spec.split(","):
            layer, experts = item.split(":")
            lo, hi = (0, TINY.num_experts - 1) if experts == "*" else map(int, experts.split("-"))
            for e in range(lo, hi + 1):
                out[expert_uid(model_id, int(layer), e)].add(procs[name].info["peer_id"])
    return out


def test_json_lists_every_peer_and_expert(swarm, gappy):
    ckpt, model_id, procs = gappy
    doc = status_json(swarm, "--checkpoint", str(ckpt))
    assert doc["model_id"] == model_id and doc["grid"] == "checkpoint"
    expected = expected_hosts(model_id, procs)
    assert [e["uid"] for e in doc["experts"]] == list(expected)  # every expert, in order, with or without replica
    for e in doc["experts"]:
        assert {r["peer_id"] for r in e["replicas"] if r["serving"]} == expected[e["uid"]], e["uid"]
        assert e["serving"] == len(expected[e["uid"]])
        for r in e["replicas"]:
            assert r["state"] == "online" and r["load"] >= 0 and r["throughput"] > 0 and r["device"] == "cpu"
            # a live record expires 3 announce periods after its last refresh
            assert 0 < r["expires_in"] <= 3 * ANNOUNCE_PERIOD + 1
    assert doc["missing"] == [expert_uid(model_id, *MISSING)]
    # exactly our two peers: the session swarm's peers serve another model id
    peers = {p["peer_id"]: p for p in doc["peers"]}
    assert set(peers) == {p.info["peer_id"] for p in procs.values()}
    for name, proc in procs.items():
        p = peers[proc.info["peer_id"]]
        assert p["endpoint"] == proc.info["endpoint"] and p["state"] == "online"
        assert p["hosts"] == HOSTS[name] and sorted(p["experts"]) == sorted(proc.info["experts"])


def test_table_highlights_the_expert_without_replica(swarm, gappy):
    _, model_id, procs = gappy
    proc = status(swarm, "--model", model_id, "--layers", "2", "--experts", "8")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = [line for line in out.splitlines() if "NO REPLICA" in line]
    assert len(rows) == 1 and rows[0].split("│")[1:3] == [f" {MISSING[0]} ".rjust(7), f" {MISSING[1]} ".rjust(8)], out
    assert "15/16 experts have a serving replica, 2 peers" in out
    assert f"no replica: {expert_uid(model_id, *MISSING)}" in out
    for p in procs.values():
        assert p.info["peer_id"] in out and p.info["endpoint"] in out


def test_bare_model_id_scans_the_dht_for_the_grid(swarm, gappy):
    _, model_id, _ = gappy
    doc = status_json(swarm, "--model", model_id)
    assert doc["grid"] == "scan" and doc["layers"] == [0, 1] and len(doc["experts"]) == 16
    assert doc["missing"] == [expert_uid(model_id, *MISSING)]


def test_bad_model_id_is_a_cli_error(swarm):
    proc = status(swarm, "--model", "no such model")
    assert proc.returncode == 1
    assert "moe-swarm: error: invalid model id 'no such model'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.unit
@pytest.mark.parametrize("typo", ["/srv/models/Mixtrl-8x7B", "./tiny-mixtrl", "no such/model"])
def test_a_mistyped_folder_is_named_as_a_missing_folder(typo):
    args = argparse.Namespace(checkpoint=None, model=typo, revision=None, layers=None, experts=None)
    with pytest.raises(ValueError, match=f"{re.escape(typo)}: no such folder"):
        resolve_uids(args)


def test_a_peer_that_left_shows_as_left_and_its_experts_as_missing(swarm, gappy):
    ckpt, model_id, procs = gappy
    leaver = procs["status-b"]
    assert swarm.stop(leaver, signal.SIGTERM) == 0  # graceful: writes LEFT tombstones
    doc = status_json(swarm, "--checkpoint", str(ckpt))
    missing = {expert_uid(model_id, 1, e) for e in (3, 4, 5, 6, 7)}
    assert set(doc["missing"]) == missing
    # readers see its LEFT tombstone, or nothing where the DHT node they asked kept a newer dictionary without it
    left = {p["peer_id"]: p for p in doc["peers"]}.get(leaver.info["peer_id"])
    assert left is None or (left["state"] == "left" and left["serving_experts"] == 0), left
    for e in doc["experts"]:  # layer 0 keeps status-a's replica
        assert e["serving"] == (0 if e["uid"] in missing else 1)


def test_checkpoint_folder_via_model_flag(swarm, gappy):
    ckpt, model_id, _ = gappy
    assert status_json(swarm, "--model", str(Path(ckpt)))["model_id"] == model_id


def test_unreachable_initial_peers_is_a_cli_error(tmp_path):
    # nothing listens on port 1: p2pd gives up on the bootstrap and status says so in one line
    nowhere = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDxhGpkbFXCWAhJHHLMCLMDYAKFbBqJzQW6JhvwUMY1yD"
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator", "status", "--model", "toy-abc", "--initial-peers", nowhere],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "moe-swarm: error: cannot join the swarm through --initial-peers" in proc.stderr
    assert "Traceback" not in proc.stderr
