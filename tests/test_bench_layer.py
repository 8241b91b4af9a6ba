"""`moe-swarm bench layer`: the issue-2 benchmark runs end to end, and its blocks alternate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coordinator.bench.timing import spread


@pytest.mark.unit
@pytest.mark.parametrize(
    ("total", "rounds", "blocks"),
    [(200, 5, [40] * 5), (7, 3, [3, 2, 2]), (15, 5, [3] * 5), (2, 4, [1, 1, 1, 1])],
)
def test_timed_calls_are_spread_over_the_rounds(total, rounds, blocks):
    assert spread(total, rounds) == blocks


def test_layer_bench_against_hivemind_in_alternating_rounds(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator",
            "bench",
            "layer",
            "--hidden",
            "64",
            "--tokens",
            "8",
            "--repeats",
            "6",
            "--hivemind-repeats",
            "2",
            "--rounds",
            "2",
            "--compare-hivemind",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    # the swarm computed what the layer computes in-process, through a real peer process
    assert report["max_abs_diff_vs_local"] <= 1e-5
    assert (report["tokens"], report["hidden"], report["ffn"], report["rounds"]) == (8, 64, 168, 2)
    assert len(report["speedup_per_round"]) == 2
    for key in ("moe_swarm_ms", "in_process_ms", "hivemind_ms", "peer_compute_ms"):
        assert report[key] > 0, key


def test_layer_bench_refuses_zero_rounds():
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "bench", "layer", "--rounds", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--rounds" in result.stderr and "Traceback" not in result.stderr


def test_relayed_layer_bench_reports_direct_and_relayed_side_by_side(tmp_path):
    out = tmp_path / "relayed.json"
    argv = ["bench", "layer", "--relayed", "--hidden", "64", "--tokens", "8", "--repeats", "4", "--rounds", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", *argv, "--json", str(out)], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["max_abs_diff_vs_local"] <= 1e-5
    assert report["direct_ms"] > 0 and report["relayed_ms"] > 0 and report["relayed_1_token_ms"] > 0
    # the relayed peer was reached through the relay, not over a direct libp2p connection
    assert report["relayed_connection"] and all(a.endswith("/p2p-circuit") for a in report["relayed_connection"])
