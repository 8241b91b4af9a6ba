"""The expert tensors of a Hugging Face MoE checkpoint, read one expert at a time.

Transformers writes experts either per expert (`...experts.3.w1.weight`,
`...experts.3.gate_proj.weight`) or stacked (`...experts.gate_up_proj` [E, ...]; GPT-OSS,
Llama4 and Granite always). Both are read here into one canonical per-expert form, the
slice of transformers' in-memory stacked parameters: `gate_up_proj` (gate then up, along
the output dimension: rows, or Llama4's columns), `down_proj`, and biases where the family
has them. So the same weights give the same expert tensors in either layout.

The model id is of the files, not of the experts: the config plus the SHA-256 of each weight
file. Any side computes it without holding every expert's bytes (from the Hub, the LFS
sha256s at a pinned commit); the same weights saved in another layout are other files, hence
another id.

Reads are partial: safetensors fetches only the requested tensors (or one slice of a
stacked tensor), from whichever shard holds them (`model.safetensors.index.json`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from protos.plumbing.files import write_json_atomic

MANIFEST = "moe_swarm_manifest.json"  # SHA-256 of each weight file, by size and mtime
MANIFEST_FORMAT = "moe-swarm-hf/2"
SOURCE = "moe_swarm_source.json"  # in a partial download: where it came from, the Hub's sha256 of each file

# per-expert key names -> canonical role
_GATE, _UP, _DOWN = "gate", "up", "down"
_PER_EXPERT_NAMES = {"w1": _GATE, "gate_proj": _GATE, "w3": _UP, "up_proj": _UP, "w2": _DOWN, "down_proj": _DOWN}
_PER_EXPERT_RE = re.compile(
    r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.[A-Za-z_]+)\.experts\.(?P<expert>\d+)\."
    r"(?P<name>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_STACKED_RE = re.compile(
    r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.[A-Za-z_]+)\.experts\."
    r"(?P<name>gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias)$"
)
# Granite keeps its stacked experts outside an `experts.` module
_GRANITE_RE = re.compile(
    r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.block_sparse_moe)\."
    r"(?P<name>input_linear|output_linear)\.weight$"
)
_GRANITE_NAMES = {"input_linear": "gate_up_proj", "output_linear": "down_proj"}
_NUM_EXPERTS_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class ExpertSource:
    """Where one canonical tensor of an expert lives: a whole key, or slice [e] of a stacked key."""

    key: str
    stacked: bool


class HFLayout:
    """Which tensors of a checkpoint are routed experts, from its config and key -> file map alone
    (no weight file is opened: a remote checkpoint is planned from this before any download)."""

    def __init__(self, name: str, config: dict, key_files: dict[str, str]) -> None:
        self.name = name
        self.config = config
        self.model_type: str = config.get("model_type", "")
        self.key_files = key_files
        self.experts = self._find_experts()  # (layer, expert) -> {canonical name: [ExpertSource, ...]}
        if not self.experts:
            raise CheckpointError(
                f"{name}: no MoE expert tensors found (model_type {self.model_type!r}): not an MoE checkpoint"
            )
        self.layers = sorted({layer for layer, _ in self.experts})

    @property
    def text_config(self) -> dict:
        return self.config.get("text_config", self.config)

    @property
    def num_experts(self) -> int:
        for name in _NUM_EXPERTS_FIELDS:
            if self.text_config.get(name):
                return int(self.text_config[name])
        raise CheckpointError(f"{self.name}: config names no expert count ({', '.join(_NUM_EXPERTS_FIELDS)})")

    @property
    def weight_files(self) -> list[str]:
        return sorted(set(self.key_files.values()))

    def _find_experts(self) -> dict[tuple[int, int], dict[str, list[ExpertSource]]]:
        per_expert: dict[tuple[int, int], dict[str, str]] = defaultdict(dict)
        stacked: dict[int, dict[str, str]] = defaultdict(dict)
        for key in self.key_files:
            if m := _PER_EXPERT_RE.match(key):
                per_expert[int(m["layer"]), int(m["expert"])][_PER_EXPERT_NAMES[m["name"]]] = key
            elif m := _STACKED_RE.match(key):
                stacked[int(m["layer"])][m["name"]] = key
            elif m := _GRANITE_RE.match(key):
                stacked[int(m["layer"])][_GRANITE_NAMES[m["name"]]] = key
        found: dict[tuple[int, int], dict[str, list[ExpertSource]]] = {}
        for (layer, e), roles in per_expert.items():
            if set(roles) != {_GATE, _UP, _DOWN}:
                raise CheckpointError(f"{self.name}: expert {layer}/{e} lacks { ({_GATE, _UP, _DOWN} - set(roles)) }")
            found[layer, e] = {
                "gate_up_proj": [ExpertSource(roles[_GATE], False), ExpertSource(roles[_UP], False)],
                "down_proj": [ExpertSource(roles[_DOWN], False)],
            }
        if stacked:
            n = self.num_experts
            for layer, names in stacked.items():
                for e in range(n):
                    found[layer, e] = {name: [ExpertSource(key, True)] for name, key in sorted(names.items())}
        return found

    def expert_keys(self) -> set[str]:
        return {src.key for sources in self.experts.values() for srcs in sources.values() for src in srcs}


class HFCheckpoint(HFLayout):
    """A checkpoint folder: its layout, and its experts read one at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path} is not a Hugging Face checkpoint: config.json is missing")
        super().__init__(str(self.path), _read_json(config_file), self._index_keys())

    def _index_keys(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                return dict(_read_json(index)["weight_map"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files")
        keys = {}
        for file in files:
            with _opened(file) as f:
                keys.update(dict.fromkeys(f.keys(), file.name))
        return keys

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """The canonical tensors of one expert, reading only their bytes."""
        try:
            sources = self.experts[layer, expert]
        except KeyError:
            raise CheckpointError(f"{self.path}: no expert {layer}/{expert}") from None
        out = {}
        for name, srcs in sources.items():
            parts = [self._read(src, expert) for src in srcs]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return out

    def _read(self, src: ExpertSource, expert: int) -> torch.Tensor:
        with _opened(self.path / self.key_files[src.key]) as f:
            if src.stacked:
                return f.get_slice(src.key)[expert].contiguous()
            return f.get_tensor(src.key)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


@contextlib.contextmanager
def _opened(file: Path) -> Iterator[Any]:
    """safe_open, with a truncated or corrupt file (an interrupted download) named in one line."""
    try:
        with safe_open(str(file), framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}): download it again") from None


def _short_name(model_type: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", model_type or "model").strip("-")[:32] or "model"


def model_id_for(config: dict, file_sha256: dict[str, str], model_type: str) -> str:
    """Short name + digest of the config and the SHA-256 of each weight file.

    Any side computes it without the experts' bytes: from the Hub, the files' LFS sha256 at the
    pinned commit; from a folder, the files hashed once (see `weight_file_sha256`).
    """
    blob = json.dumps({"config": config, "files": file_sha256}, sort_keys=True).encode()
    return f"{_short_name(model_type)}-{hashlib.sha256(blob).hexdigest()[:16]}"


@dataclass(frozen=True)
class HFManifest:
    model_id: str
    files: dict[str, str]  # weight file -> SHA-256 of its bytes


def load_manifest(ckpt: HFCheckpoint, cache_dir: str | Path | None = None) -> HFManifest:
    files = weight_file_sha256(ckpt, cache_dir)
    return HFManifest(model_id_for(ckpt.config, files, ckpt.model_type), files)


def weight_file_sha256(ckpt: HFCheckpoint, cache_dir: str | Path | None = None) -> dict[str, str]:
    """SHA-256 of each weight file of the folder.

    A partial download (moe_swarm_source.json) names the Hub's sha256s: its sparse files are
    never hashed. Otherwise each file is hashed once and the result cached by size and mtime,
    in the folder when writable, else in `cache_dir` (or ~/.cache/moe-swarm).
    """
    names = ckpt.weight_files
    source = ckpt.path / SOURCE
    if source.is_file():
        known = {name: info["sha256"] for name, info in json.loads(source.read_text())["files"].items()}
        if missing := [n for n in names if n not in known]:
            raise CheckpointError(f"{source}: no sha256 for {missing}")
        return {n: known[n] for n in names}
    locations = [ckpt.path / MANIFEST]
    tag = hashlib.sha256(str(ckpt.path.resolve()).encode()).hexdigest()[:16]
    locations.append(Path(cache_dir or Path.home() / ".cache" / "moe-swarm") / f"{tag}-{MANIFEST}")
    cached: dict[str, dict] = {}
    for file in locations:
        try:
            doc = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("format") == MANIFEST_FORMAT:
            cached = doc["files"]
            break
    out, entries = {}, {}
    for name in names:
        st = os.stat(ckpt.path / name)
        entry = cached.get(name, {})
        if entry.get("size") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(ckpt.path / name)}
        entries[name] = entry
        out[name] = entry["sha256"]
    if entries != {n: cached.get(n) for n in names}:
        for file in locations:
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(file, {"format": MANIFEST_FORMAT, "files": entries}, indent=1, sort_keys=True)
                break
            except OSError:
                continue
    return out


def _sha256_file(path: Path, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def experts_class(config) -> type[nn.Module]:
    """The family's experts module class, found beside its CausalLM class."""
    from transformers import AutoModelForCausalLM

    try:
        model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no causal LM for model_type {config.model_type!r}") from None
    module = sys.modules[model_cls.__module__]
    found = [
        obj
        for name, obj in vars(module).items()
        if isinstance(obj, type)
        and issubclass(obj, nn.Module)
        and name.endswith("Experts")
        and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise ValueError(
            f"model_type {config.model_type!r}: expected one routed-experts module, found "
            f"{[c.__name__ for c in found] or 'none'}"
        )
    return found[0]


def takes_scaled_inputs(cls: type[nn.Module]) -> bool:
    """Whether the experts module is Llama4's kind: `forward(hidden_states)` with no routing
    arguments, on [E * T, H] rows (expert-major, every expert the same number of rows) that
    the block has already multiplied by the router score; outputs are summed with weight 1.

    The other families' modules take `(hidden_states, top_k_index, top_k_weights)` and
    weight the experts' outputs instead.
    """
    params = [p for p in inspect.signature(cls.forward).parameters.values() if p.name != "self"]
    return len(params) == 1
