"""The backend a peer's configuration names: which model source, which experts, which dtype."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from protos import tensors, toy_model
from protos.expert_spec import parse_expert_spec

from .base import ExpertBackend
from .toy import HostedExperts

if TYPE_CHECKING:
    from protos.weights import HubCheckpoint

    from ..config import PeerConfig


def load_backend(config: PeerConfig, spec: str, device: torch.device) -> ExpertBackend:
    """The experts of `spec` (the --experts grammar) from the configured model, on `device`."""
    if config.model is not None:
        from .hf import HFHostedExperts

        dtype = tensors.dtype_from_name(config.dtype) if config.dtype else None
        return HFHostedExperts.from_checkpoint(model_folder(config, spec), spec, device, dtype)
    if config.checkpoint is not None:
        return HostedExperts.from_checkpoint(config.checkpoint, spec, device)
    return HostedExperts.from_seed(config.toy_config(), config.seed, spec, device)


def describe_model(config: PeerConfig) -> tuple[str, list[tuple[int, int]], int]:
    """(model id, every (layer, expert), bytes of one expert at the serving dtype), reading no expert but one."""
    if config.model is not None and (hub := hub_checkpoint(config)) is not None:
        itemsize = tensors.dtype_from_name(config.dtype).itemsize if config.dtype else None
        return hub.model_id, sorted(hub.checkpoint.experts), hub.expert_nbytes(*min(hub.checkpoint.experts), itemsize)
    if config.model is not None:
        from protos.hf_checkpoint import HFCheckpoint, load_manifest

        ckpt = HFCheckpoint(config.model)
        one = ckpt.read_expert(*min(ckpt.experts))
        itemsize = tensors.dtype_from_name(config.dtype).itemsize if config.dtype else None
        nbytes = sum(t.numel() * (itemsize or t.element_size()) for t in one.values())
        return load_manifest(ckpt).model_id, sorted(ckpt.experts), nbytes
    if config.checkpoint is not None:
        manifest = toy_model.read_manifest(config.checkpoint)
    else:
        toy = config.toy_config()
        manifest = toy_model.manifest_for(toy, toy_model.build_state_dict(toy, config.seed))
    cfg = manifest.config
    pairs = [(layer, e) for layer in range(cfg.num_layers) for e in range(cfg.num_experts)]
    return manifest.model_id, pairs, 3 * cfg.hidden_dim * cfg.ffn_dim * cfg.torch_dtype.itemsize


def hub_checkpoint(config: PeerConfig) -> HubCheckpoint | None:
    """The configured Hub repo pinned to a commit (config, index and headers cached, no tensor
    bytes), or None when --model is a local folder."""
    from protos.weights import is_hub_id, open_checkpoint

    return open_checkpoint(config.model, config.revision) if is_hub_id(config.model) else None


def hub_pairs(hub: HubCheckpoint, spec: str) -> list[tuple[int, int]]:
    """The experts of `spec` that the repo's MoE layers have."""
    ckpt = hub.checkpoint
    return [p for p in parse_expert_spec(spec, max(ckpt.layers) + 1, ckpt.num_experts) if p in ckpt.experts]


def model_folder(config: PeerConfig, spec: str) -> Path:
    """The checkpoint folder `spec`'s experts are read from: the local one, or the Hub repo's
    partial download, to which only the experts it lacks are fetched (a re-placement
    downloads its new experts only)."""
    from protos.weights import PEER

    hub = hub_checkpoint(config)
    if hub is None:
        return Path(config.model)
    hub.fetch(PEER, hub_pairs(hub, spec), progress=True)
    return hub.folder


def dry_run(config: PeerConfig) -> str:
    """What `moe-peer serve` would download for its --experts, fetching no tensor byte."""
    from protos.weights import PEER, describe

    hub = hub_checkpoint(config) if config.model is not None else None
    if hub is None:
        raise ValueError("--dry-run shows what a peer would download: it needs --model with a Hub repo id")
    if config.auto_placement:
        raise ValueError("--dry-run needs the experts to host (--experts auto picks them from the live swarm)")
    return describe(hub.plan(PEER, hub_pairs(hub, config.experts)))
