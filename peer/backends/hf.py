"""Experts of a Hugging Face MoE checkpoint, computed by the family's own transformers module.

The peer instantiates the family's `...Experts` class (on the meta device, so nothing is
allocated for the experts it does not host), gives it stacked parameters holding only its
experts, and calls it with each row routed to its slot with weight 1. The math is thus
exactly transformers' (GPT-OSS clamping and biases included), and because a coordinator
sends each expert's rows in the order transformers' eager loop gathers them, the GEMMs
match a local run row for row.

Llama4's experts module takes no routing arguments: the coordinator sends each chosen
(token, expert) row already multiplied by its router score, and the peer runs every hosted
expert's rows through its own one-expert instance of the module (parameters: views of the
stacks), so that the module's equal-rows-per-expert reshape sees one expert at a time.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from protos.expert_spec import parse_expert_spec
from protos.hf_checkpoint import HFCheckpoint, experts_class, load_manifest, takes_scaled_inputs
from protos.records import expert_uid

from .base import ExpertBackend, time_throughput


class HFLayerExperts:
    """The hosted experts of one layer inside one instance of the family's experts module
    (Llama4: one instance per hosted expert, see the module docstring)."""

    def __init__(self, cls: type[nn.Module], config, stacked: dict[str, torch.Tensor]) -> None:
        num = len(next(iter(stacked.values())))
        self.module: nn.Module | None = None
        self.per_expert: list[nn.Module] | None = None
        if takes_scaled_inputs(cls):
            self.per_expert = [_module(cls, config, {k: v[i : i + 1] for k, v in stacked.items()}) for i in range(num)]
        else:
            self.module = _module(cls, config, stacked)
            self.module.num_experts = num  # slots 0..n-1 index the hosted experts only

    @torch.inference_mode()
    def run(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
            return self.module(x, slots.view(-1, 1), ones)
        # rows arrive grouped by expert (a segment per expert): one GEMM per run of equal slots
        values, counts = torch.unique_consecutive(slots, return_counts=True)
        if len(values) == 1:
            return self.per_expert[int(values[0])](x)
        out = torch.empty_like(x)
        start = 0
        for slot, rows in zip(values.tolist(), counts.tolist(), strict=True):
            out[start : start + rows] = self.per_expert[slot](x[start : start + rows])
            start += rows
        return out


def _module(cls: type[nn.Module], config, stacked: dict[str, torch.Tensor]) -> nn.Module:
    """An instance of the experts module (built on the meta device) holding `stacked`."""
    with torch.device("meta"):
        module = cls(config)
    names = {name for name, _ in module.named_parameters(recurse=False)}
    if names != set(stacked):
        raise ValueError(f"{cls.__name__} has parameters {sorted(names)}; checkpoint gives {sorted(stacked)}")
    for name in names:
        setattr(module, name, nn.Parameter(stacked[name], requires_grad=False))
    return module.eval()


class HFHostedExperts(ExpertBackend):
    """The hosted experts of a Hugging Face checkpoint."""

    def __init__(
        self,
        model_id: str,
        model_type: str,
        hidden_dim: int,
        ffn_dim: int,
        dtype: torch.dtype,
        layers: dict[int, HFLayerExperts],
        slots: dict[str, tuple[int, int]],
        device: torch.device,
    ) -> None:
        self.model_id = model_id
        self.kind = model_type
        self.hidden_dim = hidden_dim
        self.ffn_dim = ffn_dim
        self.dtype = dtype
        self.layers = layers
        self.slots = slots
        self.device = device

    @property
    def uids(self) -> list[str]:
        return list(self.slots)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, spec: str, device: torch.device, dtype: torch.dtype | None = None, progress: bool = True
    ) -> HFHostedExperts:
        from tqdm import tqdm
        from transformers import AutoConfig

        ckpt = HFCheckpoint(path)
        manifest = load_manifest(ckpt)
        config = AutoConfig.from_pretrained(path)
        config = getattr(config, "text_config", None) or config
        config._experts_implementation = "eager"  # the reference semantics; see module docstring
        experts_cls = experts_class(config)
        chosen = [
            (layer, e)
            for layer, e in parse_expert_spec(spec, max(ckpt.layers) + 1, ckpt.num_experts)
            if (layer, e) in ckpt.experts
        ]
        if not chosen:
            raise ValueError(f"expert spec {spec!r} selects none of the MoE layers {ckpt.layers}")
        per_layer = Counter(layer for layer, _ in chosen)
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        slots: dict[str, tuple[int, int]] = {}
        filled = dict.fromkeys(per_layer, 0)
        want_dtype = dtype
        for layer, e in tqdm(chosen, desc="loading experts", unit="expert", disable=not progress, file=sys.stderr):
            tensors = ckpt.read_expert(layer, e)
            want_dtype = want_dtype or next(iter(tensors.values())).dtype
            if layer not in by_layer:  # stacked in place: peak memory is the experts plus one being read
                by_layer[layer] = {
                    k: torch.empty((per_layer[layer], *v.shape), dtype=want_dtype, device=device)
                    for k, v in tensors.items()
                }
            slot = filled[layer]
            filled[layer] += 1
            for k, v in tensors.items():
                by_layer[layer][k][slot].copy_(v)
            slots[expert_uid(manifest.model_id, layer, e)] = (layer, slot)
        layers = {layer: HFLayerExperts(experts_cls, config, ts) for layer, ts in by_layer.items()}
        ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        return cls(manifest.model_id, config.model_type, config.hidden_size, ffn, want_dtype, layers, slots, device)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, segments: list[tuple[str, int]]) -> torch.Tensor:
        """Each segment's rows through its expert; a segment's rows form one GEMM, in order."""
        x = x.to(self.device, non_blocking=True)
        out = torch.empty_like(x)
        by_layer: dict[int, list[tuple[int, int, int]]] = {}
        start = 0
        for uid, rows in segments:
            layer, slot = self.slots[uid]
            by_layer.setdefault(layer, []).append((start, rows, slot))
            start += rows
        for layer, parts in by_layer.items():
            if len(parts) == 1 and parts[0][1] == x.shape[0]:
                index = None
                rows_x = x
            else:
                index = torch.cat([torch.arange(s, s + n, device=x.device) for s, n, _ in parts])
                rows_x = x.index_select(0, index)
            slots = torch.cat([torch.full((n,), slot, dtype=torch.long, device=x.device) for _, n, slot in parts])
            y = self.layers[layer].run(rows_x, slots)
            if index is None:
                out = y
            else:
                out.index_copy_(0, index, y)
        return out.cpu() if out.device.type != "cpu" else out

    def measure_throughput(self, rows: int = 128, repeats: int = 3) -> float:
        layer = next(iter(self.layers.values()))
        x = torch.randn(rows, self.hidden_dim).to(self.device, self.dtype)
        slots = torch.zeros(rows, dtype=torch.long, device=self.device)
        return time_throughput(lambda: layer.run(x, slots), rows, repeats, self.device)
