"""Recomputing an expert on the coordinator, to settle a spot check's dispute by proof.

A coordinator that holds an expert's weights (a local toy checkpoint) needs no majority of
replicas to know which of two answers is right: it computes the expert on the same rows and
compares. A `Referee` is any callable (uid, rows) -> outputs, or None for an expert it does
not hold; the dispatcher calls it off its event loop, only when replicas disagree.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from protos import toy_model
from protos.records import parse_expert_uid

Referee = Callable[[str, torch.Tensor], "torch.Tensor | None"]

CACHED_EXPERTS = 16  # weights of this many experts stay in memory between disputes


class ToyReferee:
    """Computes the experts of a local toy checkpoint (protos/toy_model), read on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = toy_model.read_manifest(self.path)
        self._weights: OrderedDict[tuple[int, int], list[torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, uid: str, rows: torch.Tensor) -> torch.Tensor | None:
        model_id, layer, expert = parse_expert_uid(uid)
        cfg = self.manifest.config
        if model_id != self.manifest.model_id or layer >= cfg.num_layers or expert >= cfg.num_experts:
            return None
        w1, w3, w2 = self._expert(layer, expert)
        with torch.inference_mode():
            return toy_model.swiglu_expert(rows.to(w1.dtype), w1, w3, w2).to(rows.dtype)

    def _expert(self, layer: int, expert: int) -> list[torch.Tensor]:
        with self._lock:
            key = (layer, expert)
            if key not in self._weights:
                names = [toy_model.expert_key(layer, expert, p) for p in toy_model.EXPERT_PARAMS]
                got = toy_model.read_tensors(self.path, names)
                self._weights[key] = [got[n] for n in names]
                if len(self._weights) > CACHED_EXPERTS:
                    self._weights.popitem(last=False)
            self._weights.move_to_end(key)
            return self._weights[key]
