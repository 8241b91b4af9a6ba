"""The backend a peer's configuration names: which model source, which experts, which dtype."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from protos import tensors, toy_model

from .base import ExpertBackend
from .toy import HostedExperts

if TYPE_CHECKING:
    from ..config import PeerConfig


def load_backend(config: PeerConfig, spec: str, device: torch.device) -> ExpertBackend:
    """The experts of `spec` (the --experts grammar) from the configured model, on `device`."""
    if config.model is not None:
        from .hf import HFHostedExperts

        dtype = tensors.dtype_from_name(config.dtype) if config.dtype else None
        return HFHostedExperts.from_checkpoint(config.model, spec, device, dtype)
    if config.checkpoint is not None:
        return HostedExperts.from_checkpoint(config.checkpoint, spec, device)
    return HostedExperts.from_seed(config.toy_config(), config.seed, spec, device)


def describe_model(config: PeerConfig) -> tuple[str, list[tuple[int, int]], int]:
    """(model id, every (layer, expert), bytes of one expert at the serving dtype), reading no expert but one."""
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
