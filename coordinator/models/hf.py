"""Load a Hugging Face MoE checkpoint on the coordinator with its routed experts in the swarm.

transformers builds the model as usual, except that the family's experts module is
replaced, at construction, by `RemoteExperts`, which has no parameters: the dense trunk,
routers and shared experts load from the checkpoint, the routed experts' tensors are never
materialised here. Everything around the experts is the family's own code, so its routing
rule (top-k softmax, sigmoid + bias + groups, shared-expert gates, ...) runs unchanged and
`generate()` with its KV cache works as for the local model.

Llama4 differs: its block multiplies every token by each expert's router score (sigmoid of
the top-k logits, 0 for the experts not chosen), runs *every* expert on all of them and
sums the outputs. An expert given a zero input gives exactly zero (no biases), so its block
is swapped for one that sends only the chosen (token, expert) rows, already scaled, adds
the answers with weight 1 and the local shared expert: the family's sum, without the zeros.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from coordinator.models.gating import renormalize_answered
from coordinator.models.remote_moe import ExpertExecutor
from protos.hf_checkpoint import HFCheckpoint, HFManifest, experts_class, load_manifest, takes_scaled_inputs
from protos.records import expert_uid
from protos.weights import COORDINATOR, is_hub_id, open_checkpoint


class RemoteExperts(nn.Module):
    """Stands where the family's experts module stood; same call signature, no weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layer: int | None = None
        self.uids: list[str] = []
        self.executor: ExpertExecutor | None = None
        self.router: nn.Module | None = None  # the block's router: its scores rank reroute candidates

    def bind(self, layer: int, uids: list[str], executor: ExpertExecutor, router: nn.Module | None) -> None:
        self.layer, self.uids, self.executor = layer, uids, executor
        # a plain attribute, not a submodule: the router stays where the family put it
        object.__setattr__(self, "router", router)

    def _router_scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.router is None:
            raise ValueError(f"layer {self.layer}: no router found to rank reroute candidates")
        weight = self.router.weight
        with torch.no_grad():  # called on the dispatcher's thread, where grad mode is not the caller's
            return torch.nn.functional.linear(
                hidden_states.to(weight.dtype), weight, getattr(self.router, "bias", None)
            )

    def _check(self, top_k_index: torch.Tensor) -> ExpertExecutor:
        if self.executor is None:
            raise RuntimeError("RemoteExperts used before load_swarm_model bound it to a layer")
        num_experts = len(self.uids)
        if top_k_index.numel() and int(top_k_index.max()) >= num_experts:
            raise ValueError(f"layer {self.layer}: router chose expert {int(top_k_index.max())} of {num_experts}")
        return self.executor

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        result = self._check(top_k_index).dispatch(
            hidden_states,
            top_k_index,
            self.uids,
            hidden_states.dtype,
            scores=lambda: self._router_scores(hidden_states),
        )
        if not result.complete:  # dropped slots: renormalise over the experts that answered
            top_k_weights = renormalize_answered(top_k_weights, result.answered)
        # Same result, bit for bit, as transformers' eager loop (for each expert in ascending
        # order: final.index_add_(tokens, (out * weight).to(dtype))), without a Python loop over
        # experts: each token's contributions are added one slot at a time in ascending expert
        # order, so every row sees the same roundings in the same sequence.
        weighted = (result.outputs * top_k_weights[..., None]).to(hidden_states.dtype)
        return _sum_in_expert_order(weighted, result.experts)

    def scaled_inputs(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_scores: torch.Tensor
    ) -> torch.Tensor:
        """Llama4's rule, chosen rows only: sum over j of expert top_k_index[:, j] applied to
        hidden_states * top_k_scores[:, j]. A dropped slot contributes nothing (the scores are
        independent sigmoids: there is no mixture to renormalise)."""
        executor = self._check(top_k_index)
        outputs = []
        # one dispatch per slot (each token's input differs per chosen expert); Llama4 routes top-1
        for j in range(top_k_index.shape[1]):
            scaled = hidden_states * top_k_scores[:, j, None]  # transformers' routed_in, chosen rows
            result = executor.dispatch(
                scaled,
                top_k_index[:, j, None],
                self.uids,
                hidden_states.dtype,
                scores=lambda: self._router_scores(hidden_states),
            )
            outputs.append(result.outputs[:, 0])  # zero where dropped
        # transformers sums over the expert dimension in ascending expert order (zeros between)
        return _sum_in_expert_order(torch.stack(outputs, dim=1), top_k_index)


def _sum_in_expert_order(per_slot: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """[T, k, H] -> [T, H]: each token's k contributions added one at a time in ascending
    expert order, the order of transformers' loops over experts."""
    by_expert = experts.argsort(dim=1, stable=True)
    rows = torch.arange(per_slot.shape[0], device=per_slot.device)
    final = torch.zeros_like(per_slot[:, 0])
    for j in range(experts.shape[1]):
        final = final + per_slot[rows, by_expert[:, j]]
    return final


def _llama4_moe_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama4TextMoe.forward with the routed experts in the swarm (see the module docstring)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)  # [T, E]: sigmoid of the top-k logits, else 0
    # the router's own choice (its very topk, recomputed on the logits it returned)
    top_k_index = torch.topk(router_logits, self.top_k, dim=1).indices
    routed_out = self.experts.scaled_inputs(hidden_states, top_k_index, router_scores.gather(1, top_k_index))
    out = self.shared_expert(hidden_states)
    out.add_(routed_out)
    return out, router_logits


# blocks whose experts module takes scaled inputs (`takes_scaled_inputs`): their remote forward
_SCALED_INPUT_BLOCKS = {"Llama4TextMoe": _llama4_moe_forward}
_remote_blocks: dict[type[nn.Module], type[nn.Module]] = {}


def _make_remote_block(block: nn.Module) -> None:
    """Give `block` (in place, same submodules and parameter names) its remote forward: a
    subclass of its own class, so isinstance checks and output hooks still find it."""
    cls = type(block)
    if cls not in _remote_blocks:
        forward = _SCALED_INPUT_BLOCKS.get(cls.__name__)
        if forward is None:
            raise ValueError(f"{cls.__name__}: no remote forward for a block whose experts take scaled inputs")
        _remote_blocks[cls] = type(f"Remote{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    block.__class__ = _remote_blocks[cls]


@contextlib.contextmanager
def _experts_replaced(cls: type[nn.Module]) -> Iterator[None]:
    """While loading, constructing `cls` yields a RemoteExperts instead (transformers then
    neither allocates, initialises nor loads the experts' weights)."""
    saved = cls.__dict__.get("__new__")

    def new(klass, *args, **kwargs):
        return RemoteExperts()

    cls.__new__ = new
    try:
        yield
    finally:
        # deleting an assigned __new__ leaves CPython's slot calling object.__new__ with the
        # constructor's arguments; a plain pass-through restores normal construction
        cls.__new__ = saved if saved is not None else _plain_new


def _plain_new(klass, *args, **kwargs):
    return object.__new__(klass)


@dataclass
class SwarmModelInfo:
    checkpoint: HFCheckpoint  # a local folder: the checkpoint, or this side's part of a Hub download
    manifest: HFManifest
    uids: list[str]  # every routed expert of the model, as announced in the DHT


def checkpoint_info(
    model: str | Path,
    revision: str | None = None,
    weights: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> SwarmModelInfo:
    """A checkpoint folder, or a Hub repo id (`org/name`) at `revision` pinned to a commit.

    From the Hub, `weights` downloads what the coordinator runs (config, tokenizer, every
    tensor but the routed experts'); without it only config, index and the weight files'
    headers, enough for the model id and the expert list."""
    if is_hub_id(model):
        hub = open_checkpoint(str(model), revision, cache_dir)
        if weights:
            hub.fetch(COORDINATOR, progress=progress)
        model = hub.folder
    ckpt = HFCheckpoint(model)
    manifest = load_manifest(ckpt)
    uids = [expert_uid(manifest.model_id, layer, e) for layer, e in sorted(ckpt.experts)]
    return SwarmModelInfo(ckpt, manifest, uids)


def load_swarm_model(
    model: str | Path,
    executor: ExpertExecutor,
    dtype: torch.dtype | None = None,
    info: SwarmModelInfo | None = None,
    revision: str | None = None,
) -> nn.Module:
    """The checkpoint's causal LM with every routed-experts module running in the swarm
    (`model`: a folder or a Hub repo id, see checkpoint_info)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    info = info or checkpoint_info(model, revision)
    path = info.checkpoint.path
    config = AutoConfig.from_pretrained(path)
    cls = experts_class(getattr(config, "text_config", None) or config)
    scaled = takes_scaled_inputs(cls)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the skipped expert tensors are reported as "unexpected" keys
    try:
        with _experts_replaced(cls):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", experts_implementation="eager")
    finally:
        hf_logging.set_verbosity(verbosity)
    bound = []
    for name, module in model.named_modules():
        if isinstance(module, RemoteExperts):
            layer = _layer_index(name)
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            router = next(
                (
                    m
                    for m in (getattr(parent, "gate", None), getattr(parent, "router", None))
                    if isinstance(getattr(m, "weight", None), torch.Tensor)
                ),
                None,
            )
            module.bind(
                layer,
                [expert_uid(info.manifest.model_id, layer, e) for e in range(info.checkpoint.num_experts)],
                executor,
                router,
            )
            if scaled:
                _make_remote_block(parent)
            bound.append(layer)
    if sorted(bound) != info.checkpoint.layers:
        raise ValueError(
            f"MoE layers in the model {sorted(bound)} != layers with experts in the checkpoint {info.checkpoint.layers}"
        )
    return model.eval()


def _layer_index(module_name: str) -> int:
    parts = module_name.split(".")
    for a, b in itertools.pairwise(parts):
        if a == "layers" and b.isdigit():
            return int(b)
    raise ValueError(f"cannot tell the layer of module {module_name!r}")
