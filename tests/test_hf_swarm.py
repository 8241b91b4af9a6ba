"""Real Hugging Face MoE families across real peer processes: the swarm equals the local model."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch

from coordinator.client import SwarmClient
from coordinator.dispatch.dispatcher import DispatchResult, ExpertUnavailableError
from coordinator.models.hf import checkpoint_info, load_swarm_model
from coordinator.models.tiny import FAMILIES, VOCAB, save_tiny_checkpoint
from coordinator.sim.local_swarm import LocalSwarm
from peer.backends.hf import HFHostedExperts

from .conftest import CUDA, greedy, local_model

SPECS = ["*:0-2", "*:3-5", "*:6-7"]  # three peers, each a different part of every layer's experts


@contextmanager
def peers_serving(
    swarm: LocalSwarm, ckpt: Path, specs: list[str], tag: str, *extra: str, env: list[dict[str, str]] | None = None
):
    """Peers hosting `specs` of `ckpt`, all started at once; `env[i]`: extra environment of peer i."""
    procs = swarm.start_peers(
        {
            f"{tag}-{i}": ["--model", str(ckpt), "--experts", spec, "--threads", "1", *extra]
            for i, spec in enumerate(specs)
        },
        env={f"{tag}-{i}": extra_env for i, extra_env in enumerate(env or [])},
    )
    try:
        yield procs
    finally:
        swarm.stop_many(procs, signal.SIGTERM)


PROMPTS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


# the per-expert layout for some families, stacked (save_original_format=False) for others;
# GPT-OSS, Granite and Llama4 are stacked on disk either way
@pytest.mark.parametrize(("family", "stacked"), [(f, i % 2 == 1) for i, f in enumerate(FAMILIES)] + [("mixtral", True)])
def test_family_through_swarm_equals_local(swarm, tmp_path, family, stacked):
    ckpt = save_tiny_checkpoint(tmp_path / family, family, seed=1, stacked=stacked)
    info = checkpoint_info(ckpt)
    with (
        peers_serving(swarm, ckpt, SPECS, family) as procs,
        SwarmClient(swarm.initial_peers, info.uids, timeout=30) as client,
    ):
        client.wait_for_experts(timeout=60)
        remote = load_swarm_model(ckpt, client, info=info)
        assert_matches_local(remote, local_model(ckpt))
        stats = client.dispatcher.stats
        assert stats.exact == stats.routed > 0 and stats.rerouted == stats.dropped == 0
        assert set(stats.rpcs_by_peer) == {p.info["peer_id"] for p in procs}  # every peer took part


class InProcessExperts:
    """An executor computing every expert in this process with the peer's code: no network."""

    def __init__(self, hosted: HFHostedExperts) -> None:
        self.hosted = hosted
        self.calls = 0

    def dispatch(self, x, experts, uids, dtype, scores=None) -> DispatchResult:
        self.calls += 1
        num_tokens, k = experts.shape
        flat = experts.T.reshape(-1)  # slot-major, as the dispatcher sends
        out = torch.zeros(k * num_tokens, x.shape[-1], dtype=dtype)
        for e in flat.unique().tolist():
            positions = (flat == e).nonzero()[:, 0]
            rows = x[positions % num_tokens].to(dtype)
            out[positions] = self.hosted.forward(rows, [(uids[e], len(positions))])
        answered = torch.ones(num_tokens, k, dtype=torch.bool)
        return DispatchResult(out.view(k, num_tokens, -1).transpose(0, 1), answered, experts)


@pytest.mark.unit
def test_llama4_top2_sends_each_slot_scaled(tmp_path):
    # Llama4 routes top-1; with top-2 each token's input differs per chosen expert (one
    # dispatch per slot) and the answers add in ascending expert order, as transformers sums
    ckpt = save_tiny_checkpoint(tmp_path / "llama4-top2", "llama4_text", seed=7, num_experts_per_tok=2)
    info = checkpoint_info(ckpt)
    executor = InProcessExperts(HFHostedExperts.from_checkpoint(ckpt, "*", torch.device("cpu"), progress=False))
    remote = load_swarm_model(ckpt, executor, info=info)
    assert_matches_local(remote, local_model(ckpt))
    calls = executor.calls
    with torch.inference_mode():
        remote(PROMPTS)
    assert executor.calls - calls == 2 * len(info.checkpoint.layers)  # two slots, two MoE layers


def test_bfloat16_greedy_tokens_identical(swarm, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "bf16", "mixtral", seed=2, dtype=torch.bfloat16)
    info = checkpoint_info(ckpt)
    with peers_serving(swarm, ckpt, SPECS, "bf16"), SwarmClient(swarm.initial_peers, info.uids) as client:
        client.wait_for_experts(timeout=60)
        remote = load_swarm_model(ckpt, client, info=info)
        local = local_model(ckpt)
        assert next(remote.parameters()).dtype == torch.bfloat16
        assert torch.equal(greedy(remote, PROMPTS[:1]), greedy(local, PROMPTS[:1]))


def test_peer_with_other_expert_weights_is_never_used(swarm, tmp_path):
    ours = save_tiny_checkpoint(tmp_path / "ours", "mixtral", seed=3)
    theirs = save_tiny_checkpoint(tmp_path / "theirs", "mixtral", seed=4)  # same config, same layer/expert numbers
    info = checkpoint_info(ours)
    assert checkpoint_info(theirs).manifest.model_id != info.manifest.model_id
    with (
        peers_serving(swarm, theirs, ["*"], "impostor") as impostors,
        SwarmClient(swarm.initial_peers, info.uids, refresh_period=0.5) as client,
    ):
        # only a peer with other weights: our experts have no replica at all
        with pytest.raises(TimeoutError):
            client.wait_for_experts(timeout=4)
        remote = load_swarm_model(ours, client, info=info)
        with pytest.raises(ExpertUnavailableError), torch.inference_mode():
            remote(PROMPTS)
        with peers_serving(swarm, ours, ["*"], "honest"):
            client.wait_for_experts(timeout=60)
            assert torch.equal(greedy(remote, PROMPTS[:1]), greedy(local_model(ours), PROMPTS[:1]))
        assert impostors[0].info["peer_id"] not in client.dispatcher.stats.rpcs_by_peer


def _peer_memory(pid: int, device: str) -> int:
    """Bytes a peer process holds where its weights live: host RSS, or its CUDA memory (nvidia-smi)."""
    if device == "cpu":
        return psutil.Process(pid).memory_info().rss
    import subprocess

    rows = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    used = {int(p): int(mib) for p, mib in (r.split(",") for r in rows if r.strip())}
    return used[pid] * 2**20


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_peer_memory_grows_with_its_experts_only(swarm, tmp_path, device):
    # hidden 1024: one expert is 3 x 1024 x 1024 fp32 = 12 MiB, the model's 16 experts 192 MiB
    ckpt = save_tiny_checkpoint(
        tmp_path / "big",
        "mixtral",
        seed=5,
        hidden_size=1024,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    expert_bytes = 3 * 1024 * 1024 * 4
    # each peer gets its own throughput cache, so both run their self-benchmark: on CUDA its
    # first GEMM loads cuBLAS (100-200 MiB), which must count for both peers or for neither
    caches = [{"MOE_SWARM_CACHE": str(tmp_path / f"cache-{i}")} for i in range(2)]
    with peers_serving(swarm, ckpt, ["0:0", "*"], f"mem-{device}", "--device", device, env=caches) as procs:
        one, everything = procs
        grown = _peer_memory(everything.pid, device) - _peer_memory(one.pid, device)  # 15 experts more
    assert all((tmp_path / f"cache-{i}" / "throughput.json").exists() for i in range(2))  # both measured
    assert 0.8 * 15 * expert_bytes <= grown <= 1.5 * 15 * expert_bytes, grown / expert_bytes


def assert_matches_local(remote, local) -> None:
    """No expert weights on the coordinator, logits within 1e-5 of the local model, same greedy tokens."""
    assert sum(p.numel() for n, p in remote.named_parameters() if ".experts." in n) == 0
    with torch.inference_mode():
        diff = (remote(PROMPTS).logits - local(PROMPTS).logits).abs().max().item()
    assert diff <= 1e-5
    assert torch.equal(greedy(remote, PROMPTS[:1]), greedy(local, PROMPTS[:1]))


@pytest.mark.parametrize("policy", ["reroute", "drop"])
def test_generation_completes_without_an_expert_and_says_so(swarm, tmp_path, policy):
    ckpt = save_tiny_checkpoint(tmp_path / "partial", "qwen3_moe", seed=6)
    info = checkpoint_info(ckpt)
    with (
        peers_serving(swarm, ckpt, ["*:0-6"], f"partial-{policy}"),
        SwarmClient(swarm.initial_peers, info.uids, timeout=5, fallback=policy) as client,
    ):
        client.wait_for_experts([u for u in info.uids if not u.endswith("/7")], timeout=60)
        remote = load_swarm_model(ckpt, client, info=info)
        out = greedy(remote, PROMPTS[:1], 12)
        stats = client.dispatcher.stats
    assert out.shape[-1] == PROMPTS.shape[-1] + 12
    assert stats.routed == stats.exact + stats.rerouted + stats.dropped
    if policy == "reroute":
        assert stats.rerouted > 0 and stats.dropped == 0
    else:
        assert stats.dropped > 0 and stats.rerouted == 0
