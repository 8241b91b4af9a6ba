"""The toy model's SwiGLU experts (moe-swarm checkpoints or a seed): loading only the hosted
experts' weights, and computing them with batched or grouped GEMMs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from protos import toy_model
from protos.expert_spec import parse_expert_spec
from protos.records import expert_uid
from protos.toy_model import EXPERT_PARAMS, Manifest, ToyConfig

from .base import ExpertBackend, time_throughput

# On CPU, ragged grouped GEMMs run the experts one after another, and a GEMM of a few rows
# keeps only one core busy. A batched GEMM with every expert padded to the same row capacity
# (GShard's capacity factor) runs them side by side on torch's threads instead; it is used
# while padded rows stay within this multiple of the real ones.
MAX_PADDED_ROWS = 1.5


def padded_span(rows_per_slot: list[int], threads: int) -> tuple[int, int, int] | None:
    """(first slot, end slot, row capacity) of a padded batched GEMM worth running, else None:
    the span covers every slot with rows (a contiguous view of the stacks, no weight copy)."""
    used = [slot for slot, rows in enumerate(rows_per_slot) if rows]
    if threads < 2 or len(used) < 2:
        return None
    lo, hi = used[0], used[-1] + 1
    capacity = max(rows_per_slot)
    if (hi - lo) * capacity > MAX_PADDED_ROWS * sum(rows_per_slot):
        return None
    return lo, hi, capacity


class LayerExperts:
    """The hosted experts of one layer, stacked so one batched or grouped GEMM serves all
    their segments.

    w13 [n, H, 2F] holds w1 and w3 side by side (two GEMMs per call instead of three), w2 [n, F, H].
    """

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.ffn_dim = weights[0][0].shape[0]
        self.w13 = torch.stack([torch.cat([w1, w3], dim=0).T for w1, w3, _ in weights]).contiguous()
        self.w2 = torch.stack([w2.T for _, _, w2 in weights]).contiguous()
        # torch's grouped GEMM needs 16-byte aligned rows; other widths take the per-expert loop
        align = 16 // self.w13.element_size()
        self.grouped = self.w13.shape[1] % align == 0 and self.ffn_dim % align == 0

    def _swiglu(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.split(self.ffn_dim, dim=-1)
        return F.silu(gate) * up

    def one(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        return self._swiglu(x @ self.w13[slot]) @ self.w2[slot]

    def many(self, x: torch.Tensor, rows_per_slot: list[int]) -> torch.Tensor:
        """x holds each slot's rows in slot order (0 rows allowed)."""
        if x.device.type == "cpu":
            span = padded_span(rows_per_slot, torch.get_num_threads())
            if span is not None:
                return self.padded(x, rows_per_slot, *span)
        if not self.grouped:
            out, start = [], 0
            for slot, rows in enumerate(rows_per_slot):
                if rows:
                    out.append(self.one(slot, x[start : start + rows]))
                    start += rows
            return torch.cat(out)
        offs = torch.tensor(rows_per_slot, device=x.device).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x, self.w13, offs=offs)
        return torch._grouped_mm(self._swiglu(h).contiguous(), self.w2, offs=offs)

    def padded(self, x: torch.Tensor, rows_per_slot: list[int], lo: int, hi: int, capacity: int) -> torch.Tensor:
        """Slots lo..hi-1 as one batched GEMM, each padded with zero rows to `capacity`."""
        # row i of slot s goes to s * capacity + i (index math in numpy: fewer, cheaper ops)
        rows = np.array(rows_per_slot[lo:hi])
        shift = np.arange(hi - lo) * capacity - (np.cumsum(rows) - rows)
        place = torch.from_numpy(np.arange(x.shape[0]) + np.repeat(shift, rows))
        xb = x.new_zeros((hi - lo) * capacity, x.shape[1]).index_copy_(0, place, x)
        h = torch.bmm(xb.view(hi - lo, capacity, -1), self.w13[lo:hi])
        out = torch.bmm(self._swiglu(h), self.w2[lo:hi])
        return out.view((hi - lo) * capacity, -1).index_select(0, place)


class HostedExperts(ExpertBackend):
    """Weights of the hosted experts on one device, addressed by uid."""

    kind = "swiglu"

    def __init__(
        self,
        manifest: Manifest,
        layers: dict[int, LayerExperts],
        slots: dict[str, tuple[int, int]],
        device: torch.device,
    ) -> None:
        self.manifest = manifest
        self.layers = layers
        self.slots = slots  # uid -> (layer, slot in that layer's stack)
        self.device = device

    @property
    def uids(self) -> list[str]:
        return list(self.slots)

    @property
    def config(self) -> ToyConfig:
        return self.manifest.config

    @property
    def hidden_dim(self) -> int:
        return self.config.hidden_dim

    @property
    def ffn_dim(self) -> int:
        return self.config.ffn_dim

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def dtype(self) -> torch.dtype:
        return self.config.torch_dtype

    @classmethod
    def from_checkpoint(cls, path: str | Path, spec: str, device: torch.device) -> HostedExperts:
        manifest = toy_model.read_manifest(path)
        chosen = parse_expert_spec(spec, manifest.config.num_layers, manifest.config.num_experts)
        keys = [toy_model.expert_key(layer, e, p) for layer, e in chosen for p in EXPERT_PARAMS]
        return cls._build(manifest, chosen, toy_model.read_tensors(path, keys), device)

    @classmethod
    def from_seed(cls, config: ToyConfig, seed: int, spec: str, device: torch.device) -> HostedExperts:
        state = toy_model.build_state_dict(config, seed)
        chosen = parse_expert_spec(spec, config.num_layers, config.num_experts)
        return cls._build(toy_model.manifest_for(config, state), chosen, state, device)

    @classmethod
    def _build(
        cls, manifest: Manifest, chosen: list[tuple[int, int]], state: dict[str, torch.Tensor], device: torch.device
    ) -> HostedExperts:
        by_layer: dict[int, list] = {}
        slots = {}
        for layer, e in chosen:
            ws = [state[toy_model.expert_key(layer, e, p)] for p in EXPERT_PARAMS]
            if toy_model.expert_digest(ws) != manifest.digests[f"{layer}/{e}"]:
                raise ValueError(f"expert {layer}/{e}: weights do not match the checkpoint manifest digest")
            weights = by_layer.setdefault(layer, [])
            slots[expert_uid(manifest.model_id, layer, e)] = (layer, len(weights))
            weights.append(tuple(w.to(device=device, dtype=manifest.config.torch_dtype) for w in ws))
        return cls(manifest, {layer: LayerExperts(ws) for layer, ws in by_layer.items()}, slots, device)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, segments: list[tuple[str, int]]) -> torch.Tensor:
        """x: [sum(rows), H]; each segment's rows go through its expert; row order is kept.

        A run of segments of one layer in increasing slot order (what coordinators send)
        is one grouped GEMM; anything else falls back to one expert at a time.
        """
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        parts, start, i = [], 0, 0
        while i < len(segments):
            layer = self.slots[segments[i][0]][0]
            experts = self.layers[layer]
            rows_per_slot = [0] * experts.w13.shape[0]
            run_rows, last = 0, -1
            while i < len(segments):
                seg_layer, seg_slot = self.slots[segments[i][0]]
                if seg_layer != layer or seg_slot <= last:
                    break
                rows_per_slot[seg_slot] = segments[i][1]
                run_rows += segments[i][1]
                last = seg_slot
                i += 1
            parts.append(experts.many(x[start : start + run_rows], rows_per_slot))
            start += run_rows
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.cpu() if out.device.type != "cpu" else out

    def measure_throughput(self, rows: int = 128, repeats: int = 3) -> float:
        experts = next(iter(self.layers.values()))
        x = torch.randn(rows, self.hidden_dim).to(self.device, self.dtype)
        return time_throughput(lambda: experts.one(0, x), rows, repeats, self.device)
