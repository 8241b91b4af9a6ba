"""The dry run on a checkpoint shaped like Mixtral-8x7B (real names, shapes, dtype and 19 shards;
sparse files: real safetensors headers, holes for the data), served by the local Hub."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from .hub_server import HubServer

REPO = "mistralai/Mixtral-8x7B-v0.1"
H, FFN, V, LAYERS, EXPERTS, KV = 4096, 14336, 32000, 32, 8, 8 * 128
SHARD_BYTES = 5 * 10**9  # save_pretrained's greedy split, in state-dict order
CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": H,
    "intermediate_size": FFN,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": 8,
    "num_local_experts": EXPERTS,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": V,
}


def mixtral_tensors() -> list[tuple[str, list[int]]]:
    out = [("model.embed_tokens.weight", [V, H])]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", [H, H]),
            (f"{p}.self_attn.k_proj.weight", [KV, H]),
            (f"{p}.self_attn.v_proj.weight", [KV, H]),
            (f"{p}.self_attn.o_proj.weight", [H, H]),
            (f"{p}.block_sparse_moe.gate.weight", [EXPERTS, H]),
        ]
        for e in range(EXPERTS):
            m = f"{p}.block_sparse_moe.experts.{e}"
            out += [(f"{m}.w1.weight", [FFN, H]), (f"{m}.w2.weight", [H, FFN]), (f"{m}.w3.weight", [FFN, H])]
        out += [(f"{p}.input_layernorm.weight", [H]), (f"{p}.post_attention_layernorm.weight", [H])]
    return [*out, ("model.norm.weight", [H]), ("lm_head.weight", [V, H])]


def nbytes(shape: list[int]) -> int:
    n = 2  # bf16
    for d in shape:
        n *= d
    return n


def save_sparse_mixtral(folder: Path) -> Path:
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, shape in mixtral_tensors():
        if shards[-1] and size + nbytes(shape) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes(shape)
    assert len(shards) == 19
    folder.mkdir(parents=True)
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape in tensors:
            header[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes(shape)]}
            offset += nbytes(shape)
            weight_map[key] = name
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)  # holes: no disk
    total = sum(nbytes(s) for _, s in mixtral_tensors())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return save_sparse_mixtral(tmp_path_factory.mktemp("mixtral") / "Mixtral-8x7B-v0.1")


def dry_run(server: HubServer, cache: Path, *args: str) -> str:
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "protos.weights", "--model", REPO, "--dry-run", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def figures(report: str) -> tuple[float, float, float]:
    m = re.search(r"this side needs ([\d.]+) GB of the checkpoint's ([\d.]+) GB \(([\d.]+)%\)", report)
    assert m, report
    return float(m[1]), float(m[2]), float(m[3])


def test_dry_run_of_mixtral_8x7b(mixtral, tmp_path):
    experts = LAYERS * EXPERTS * 3 * nbytes([FFN, H])
    total = sum(nbytes(s) for _, s in mixtral_tensors())
    with HubServer() as server:
        server.add_repo(REPO, mixtral)
        peer = dry_run(server, tmp_path, "--side", "peer", "--experts", "*:0-3")
        sent = sum(t.sent for t in server.take_log() if t.file.endswith(".safetensors"))
        coordinator = dry_run(server, tmp_path, "--side", "coordinator")
        sent += sum(t.sent for t in server.take_log() if t.file.endswith(".safetensors"))
    print(f"\n{peer}\n{coordinator}\nheaders read by both dry runs: {sent} B")
    need, whole, _ = figures(peer)
    assert whole == pytest.approx(total / 1e9, abs=0.01)
    assert need == pytest.approx(experts / 2 / 1e9, rel=1e-3)  # 4 of 8 experts, plus headers (kB)
    need, _, _ = figures(coordinator)
    assert need == pytest.approx((total - experts) / 1e9, rel=1e-3)
    assert sent < 2_000_000  # the headers only, read once: the coordinator's run found them cached
    # the cache holds 19 sparse files of the full size, each with its header only
    cached = list(tmp_path.glob("moe-swarm/*/*/*.safetensors"))
    assert len(cached) == 19 and sum(f.stat().st_blocks * 512 for f in cached) < 19 * 256 * 1024
