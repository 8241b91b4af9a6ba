"""Volunteers fail, stall and overload; the user's computation neither fails nor silently degrades."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from coordinator.client import SwarmClient
from coordinator.dispatch.dispatcher import ExpertUnavailableError
from coordinator.models.gating import combine, renormalize_answered, topk_softmax
from coordinator.models.hf import checkpoint_info, load_swarm_model
from coordinator.models.tiny import VOCAB, save_tiny_checkpoint
from coordinator.models.toy_stack import LocalExperts, ToyMoEStack
from protos import toy_model

from .conftest import TINY, greedy, local_model

TOY = ["--threads", "1", "--announce-period", "2"]


def toy_peers(swarm, ckpt, specs: dict[str, str], *extra: str):
    return swarm.start_peers(
        {name: ["--checkpoint", str(ckpt), "--experts", spec, *TOY, *extra] for name, spec in specs.items()}
    )


class KillAfter(BaseStreamer):
    """Streams tokens; after `n` new tokens SIGKILLs (with its p2pd: the whole machine) the peer
    the dispatcher prefers at that moment, so the next calls do meet the dead peer."""

    def __init__(self, procs, health, n: int) -> None:
        self.procs, self.health, self.n, self.seen = procs, health, n, -1  # the first put() is the prompt
        self.victim = None

    def put(self, value) -> None:
        self.seen += 1
        if self.seen == self.n:
            self.victim = min(self.procs, key=lambda p: self.health.expected_ms(p.info["peer_id"], 0.0))
            os.killpg(self.victim.pid, signal.SIGKILL)

    def end(self) -> None:
        pass


def test_sigkill_during_generation_with_replication_two(swarm, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "mx", "mixtral", seed=21)
    info = checkpoint_info(ckpt)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    want = greedy(local_model(ckpt), ids, 30)
    procs = swarm.start_peers({f"rep-{i}": ["--model", str(ckpt), "--experts", "*", *TOY] for i in range(2)})
    try:
        with SwarmClient(swarm.initial_peers, info.uids, timeout=20) as client:
            client.wait_for_experts(timeout=60)
            model = load_swarm_model(ckpt, client, info=info)
            killer = KillAfter(procs, client.dispatcher.health, n=6)
            with torch.inference_mode():
                got = model.generate(
                    ids, max_new_tokens=30, do_sample=False, streamer=killer, attention_mask=torch.ones_like(ids)
                )
            stats = client.dispatcher.stats
    finally:
        swarm.stop_many(procs)
    assert killer.victim is not None and killer.victim.popen.returncode == -signal.SIGKILL
    assert torch.equal(got, want)  # identical to the run with no fault
    assert stats.exact == stats.routed and stats.rerouted == stats.dropped == 0
    # the dead peer's work went elsewhere and was counted: as a retry when its call failed,
    # or as a hedge when a duplicate answered before the failure surfaced
    assert stats.retries + stats.hedges > 0


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    """Its own weights (own model id): the session's peers serving `tiny_checkpoint` must not help."""
    path = tmp_path_factory.mktemp("ft") / "toy"
    toy_model.save_checkpoint(path, TINY, seed=8)
    return path


@torch.inference_mode()
def reference(ckpt, x, layer=0):
    return ToyMoEStack.from_checkpoint(ckpt, LocalExperts.from_checkpoint(ckpt)).layers[layer](x)


def test_straggler_is_outpaced_by_hedges(swarm, toy_ckpt):
    manifest = toy_model.read_manifest(toy_ckpt)
    slow, fast = toy_peers(swarm, toy_ckpt, {"strag-slow": "*", "strag-fast": "*"})
    x = torch.randn(32, TINY.hidden_dim, generator=torch.Generator().manual_seed(2))
    try:
        with SwarmClient(swarm.initial_peers, manifest.uids(), timeout=20) as client, torch.inference_mode():
            client.wait_for_experts(timeout=60)
            layer = ToyMoEStack.from_checkpoint(toy_ckpt, client).layers[0]
            normal = []
            for _ in range(30):  # both peers answer: p95 of each is learnt
                start = time.perf_counter()
                layer(x)
                normal.append(time.perf_counter() - start)
            # stall the peer the dispatcher currently prefers (lower expected latency), so calls meet it
            health = client.dispatcher.health
            slow, fast = sorted((slow, fast), key=lambda p: health.expected_ms(p.info["peer_id"], 0.0))
            slow.signal(signal.SIGSTOP)
            stalled, want = [], reference(toy_ckpt, x)
            for _ in range(20):
                start = time.perf_counter()
                got = layer(x)
                stalled.append(time.perf_counter() - start)
                assert (got - want).abs().max().item() <= 1e-5
            stats = client.dispatcher.stats
    finally:
        slow.signal(signal.SIGCONT)
        swarm.stop_many([slow, fast])
    assert stats.hedges > 0 and stats.dropped == 0
    bound = 5 * sorted(normal)[int(0.95 * len(normal))] + 0.25
    assert max(stalled) <= bound, (max(stalled), bound)


@pytest.mark.parametrize("policy", ["reroute", "drop", "error"])
@torch.inference_mode()
def test_fallback_when_every_replica_of_an_expert_is_gone(swarm, toy_ckpt, policy):
    manifest = toy_model.read_manifest(toy_ckpt)
    (peer,) = toy_peers(swarm, toy_ckpt, {f"partial-{policy}": "*:0-6"})  # expert 7 of every layer: nobody
    x = torch.randn(64, TINY.hidden_dim, generator=torch.Generator().manual_seed(3))
    local = ToyMoEStack.from_checkpoint(toy_ckpt, LocalExperts.from_checkpoint(toy_ckpt)).layers[0]
    logits = local.gate(x)
    weights, experts = topk_softmax(logits, TINY.top_k)
    uses_7 = experts == 7
    assert uses_7.any()
    try:
        with (
            SwarmClient(swarm.initial_peers, manifest.uids(), timeout=5, fallback=policy) as client,
            torch.inference_mode(),
        ):
            client.wait_for_experts(manifest.uids()[:7], timeout=60)
            layer = ToyMoEStack.from_checkpoint(toy_ckpt, client).layers[0]
            if policy == "error":
                with pytest.raises(ExpertUnavailableError, match=f"{manifest.model_id}/0/7"):
                    layer(x)
                return
            got = layer(x)
            stats = client.dispatcher.stats
    finally:
        swarm.stop_many([peer])
    assert stats.routed == stats.exact + stats.rerouted + stats.dropped
    if policy == "reroute":
        # each slot that chose expert 7 goes to the token's best-scoring expert not already chosen
        ranked = torch.argsort(logits, dim=-1, descending=True)
        replaced = experts.clone()
        for t, j in uses_7.nonzero().tolist():
            replaced[t, j] = next(e for e in ranked[t].tolist() if e not in experts[t].tolist() and e != 7)
        want = combine(local.executor.dispatch(x, replaced, local.uids, x.dtype).outputs, weights, x.dtype)
        assert stats.rerouted == int(uses_7.sum()) and stats.dropped == 0
    else:
        kept = renormalize_answered(weights, ~uses_7)
        want = combine(local.executor.dispatch(x, experts, local.uids, x.dtype).outputs, kept, x.dtype)
        assert stats.dropped == int(uses_7.sum()) and stats.rerouted == 0
    assert (got - want).abs().max().item() <= 1e-5


def test_overloaded_peer_refuses_and_work_goes_elsewhere(swarm, toy_ckpt):
    import json
    import subprocess
    import sys

    # a small queue: 48 rows, while one 16-token top-2 call brings up to 32 rows
    (small,) = toy_peers(swarm, toy_ckpt, {"queue-small": "*"}, "--max-queue-rows", "48")
    (big,) = toy_peers(swarm, toy_ckpt, {"queue-big": "*"})
    rss_before = psutil.Process(small.pid).memory_info().rss
    start_at = str(time.time() + 25)  # every storm process is up by then, even on a loaded machine
    try:  # three coordinator processes, 32 layer calls in flight each, all at once
        storms = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.storm_client",
                    str(toy_ckpt),
                    str(seed),
                    "32",
                    start_at,
                    *swarm.initial_peers,
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for seed in range(3)
        ]
        reports = [json.loads(p.communicate(timeout=180)[0]) for p in storms]
        rss_after = psutil.Process(small.pid).memory_info().rss
    finally:
        swarm.stop_many([small, big])
    for r in reports:
        assert not r["errors"] and r["complete"]  # no error reached any caller
        assert r["max_error"] <= 1e-5
        assert r["bans"] == 0  # refused, served elsewhere, not banned
    assert sum(r["refusals"] for r in reports) > 0
    assert sum(r["rpcs_by_peer"].get(small.info["peer_id"], 0) for r in reports) > 0  # it served what it could take
    assert rss_after - rss_before < 64 << 20  # bounded queue: no pile-up in memory


def test_graceful_leave_under_load_fails_no_request(swarm, toy_ckpt):
    import threading

    manifest = toy_model.read_manifest(toy_ckpt)
    leaving, staying = toy_peers(swarm, toy_ckpt, {"leave-a": "*", "leave-b": "*"})
    x = torch.randn(32, TINY.hidden_dim, generator=torch.Generator().manual_seed(5))
    want = reference(toy_ckpt, x)
    errors, outputs, stop = [], [], threading.Event()
    with SwarmClient(swarm.initial_peers, manifest.uids(), timeout=20, fallback="error") as client:
        client.wait_for_experts(timeout=60)
        layer = ToyMoEStack.from_checkpoint(toy_ckpt, client).layers[0]

        def load():
            with torch.inference_mode():
                while not stop.is_set():
                    try:
                        outputs.append(layer(x))
                    except Exception as e:  # any failure reaching the user fails the test
                        errors.append(e)

        worker = threading.Thread(target=load)
        worker.start()
        time.sleep(1.0)
        before = len(outputs)
        assert swarm.stop(leaving, signal.SIGTERM) == 0  # drains in-flight requests, withdraws, exits 0
        time.sleep(1.0)
        stop.set()
        worker.join(30)
        stats = client.dispatcher.stats
    swarm.stop_many([staying])
    assert not errors and len(outputs) > before > 0
    assert all((out - want).abs().max().item() <= 1e-5 for out in outputs)
    assert stats.exact == stats.routed and stats.dropped == stats.rerouted == 0
    assert stats.bans == 0, "a peer that said it is leaving was banned for it"
