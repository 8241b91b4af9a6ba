"""A small seeded MoE layer stack: the demo/test model format both sides agree on.

Each layer has a router (`layers.{l}.gate.weight`, [E, H]) and E SwiGLU experts
(`layers.{l}.experts.{e}.{w1,w3,w2}.weight`, Mixtral's names). A checkpoint is a folder
with `model.safetensors` and `moe_swarm.json` (config, per-expert digests, model id), so a
peer can read only its experts' tensors and check them against the manifest, and a
coordinator can read only the routers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from protos.records import expert_uid
from protos.tensors import dtype_from_name

MANIFEST = "moe_swarm.json"
WEIGHTS = "model.safetensors"
FORMAT = "moe-swarm-toy/1"
EXPERT_PARAMS = ("w1", "w3", "w2")


@dataclass(frozen=True)
class ToyConfig:
    num_layers: int = 2
    num_experts: int = 8
    hidden_dim: int = 256
    ffn_dim: int = 512
    top_k: int = 2
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_experts, self.hidden_dim, self.ffn_dim, self.top_k) < 1:
            raise ValueError(f"all sizes must be >= 1: {self}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        dtype_from_name(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)


def gate_key(layer: int) -> str:
    return f"layers.{layer}.gate.weight"


def expert_key(layer: int, expert: int, param: str) -> str:
    return f"layers.{layer}.experts.{expert}.{param}.weight"


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Mixtral's expert: w2(silu(w1 x) * w3 x)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def build_state_dict(config: ToyConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights (CPU generator), scaled so activations stay O(1) through layers."""
    gen = torch.Generator().manual_seed(seed)
    h, f = config.hidden_dim, config.ffn_dim

    def rand(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) / fan_in**0.5).to(config.torch_dtype)

    state: dict[str, torch.Tensor] = {}
    for layer in range(config.num_layers):
        state[gate_key(layer)] = rand(config.num_experts, h, fan_in=h)
        for e in range(config.num_experts):
            state[expert_key(layer, e, "w1")] = rand(f, h, fan_in=h)
            state[expert_key(layer, e, "w3")] = rand(f, h, fan_in=h)
            state[expert_key(layer, e, "w2")] = rand(h, f, fan_in=f)
    return state


def expert_digest(weights: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for w in weights:
        h.update(w.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_id_for(config: ToyConfig, digests: dict[str, str]) -> str:
    """Short name + digest of config and expert manifest: other weights never mix in."""
    blob = json.dumps({"config": asdict(config), "experts": digests}, sort_keys=True).encode()
    return f"toy-{hashlib.sha256(blob).hexdigest()[:16]}"


def expert_digests(config: ToyConfig, state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        f"{layer}/{e}": expert_digest(state[expert_key(layer, e, p)] for p in EXPERT_PARAMS)
        for layer in range(config.num_layers)
        for e in range(config.num_experts)
    }


@dataclass(frozen=True)
class Manifest:
    config: ToyConfig
    model_id: str
    digests: dict[str, str]  # "layer/expert" -> sha256 of (w1, w3, w2) bytes

    def uids(self) -> list[str]:
        cfg = self.config
        return [expert_uid(self.model_id, layer, e) for layer in range(cfg.num_layers) for e in range(cfg.num_experts)]


def manifest_for(config: ToyConfig, state: dict[str, torch.Tensor]) -> Manifest:
    digests = expert_digests(config, state)
    return Manifest(config=config, model_id=model_id_for(config, digests), digests=digests)


def save_checkpoint(path: str | Path, config: ToyConfig, seed: int) -> Manifest:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = build_state_dict(config, seed)
    manifest = manifest_for(config, state)
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
    doc = {
        "format": FORMAT,
        "seed": seed,
        "config": asdict(config),
        "model_id": manifest.model_id,
        "experts": manifest.digests,
    }
    (path / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True))
    return manifest


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a moe-swarm checkpoint: {MANIFEST} is missing")
    doc = json.loads(file.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{file}: unsupported format {doc.get('format')!r}, expected {FORMAT!r}")
    config = ToyConfig(**doc["config"])
    if model_id_for(config, doc["experts"]) != doc["model_id"]:
        raise ValueError(f"{file}: model id does not match its config and expert digests")
    return Manifest(config=config, model_id=doc["model_id"], digests=doc["experts"])


def read_tensors(path: str | Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read just these tensors (safetensors reads each one's bytes, not the whole file)."""
    with safe_open(str(Path(path) / WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}
