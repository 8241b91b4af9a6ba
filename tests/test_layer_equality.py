"""RemoteMoE through real peer processes equals the same layer computed in-process."""

from __future__ import annotations

import grpc
import pytest
import torch
import torch.nn.functional as F

from coordinator.models.toy_stack import ToyMoEStack
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos import toy_model
from protos.limits import grpc_options

from .conftest import PEER_SPECS, TINY, peer


def reference_layer(state: dict[str, torch.Tensor], layer: int, x: torch.Tensor) -> torch.Tensor:
    """Written independently of the coordinator: token by token, Mixtral's rule."""
    gate = state[toy_model.gate_key(layer)]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ gate.T, dim=-1)
        top = torch.topk(probs, TINY.top_k)
        weights = top.values / top.values.sum()
        for w, e in zip(weights.tolist(), top.indices.tolist(), strict=True):
            w1, w3, w2 = (state[toy_model.expert_key(layer, e, p)] for p in ("w1", "w3", "w2"))
            out[t] += w * (w2 @ (F.silu(w1 @ x[t]) * (w3 @ x[t])))
    return out


def requests_served(endpoint: str) -> int:
    with grpc.insecure_channel(endpoint, options=grpc_options()) as channel:
        return pb_grpc.ExpertServiceStub(channel).Info(pb.InfoRequest(), timeout=5).requests_served


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("layer", [0, 1])
def test_remote_layer_equals_local(swarm, client, tiny_checkpoint, tokens, layer):
    state = toy_model.build_state_dict(TINY, seed=7)
    stack = ToyMoEStack.from_checkpoint(tiny_checkpoint, client)
    x = torch.randn(tokens, TINY.hidden_dim, generator=torch.Generator().manual_seed(tokens + layer))
    endpoints = {name: peer(swarm, name).info["endpoint"] for name in PEER_SPECS}
    before = {name: requests_served(ep) for name, ep in endpoints.items()}

    with torch.inference_mode():
        got = stack.layers[layer](x)
    want = reference_layer(state, layer, x)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-5

    # each peer hosting a chosen expert got exactly one Forward for this layer call, the others none
    chosen = set(torch.topk(x @ state[toy_model.gate_key(layer)].T, TINY.top_k).indices.flatten().tolist())
    expected = {"peer-a": int(any(e < 4 for e in chosen)), "peer-b": int(any(e >= 4 for e in chosen))}
    served = {name: requests_served(ep) - before[name] for name, ep in endpoints.items()}
    assert served == expected


def test_stack_through_swarm_equals_local_stack(client, tiny_checkpoint):
    from coordinator.models.toy_stack import LocalExperts

    remote = ToyMoEStack.from_checkpoint(tiny_checkpoint, client)
    local = ToyMoEStack.from_checkpoint(tiny_checkpoint, LocalExperts.from_checkpoint(tiny_checkpoint))
    x = torch.randn(3, 5, TINY.hidden_dim, generator=torch.Generator().manual_seed(3))  # batch dims are kept
    rpcs = client.dispatcher.stats.rpcs
    got, want = remote(x), local(x)
    assert got.shape == x.shape
    assert (got - want).abs().max().item() <= 1e-5
    assert client.dispatcher.stats.rpcs - rpcs <= TINY.num_layers * len(PEER_SPECS)


def test_megabyte_requests_hash_off_the_loop_and_still_match(client, tiny_checkpoint):
    """Payloads from DIGEST_OFFLOAD_BYTES up are hashed in a worker thread on both sides (the
    smaller ones inline): the receipts must verify and the outputs match either way."""
    from coordinator.models.toy_stack import LocalExperts
    from protos.envelope import DIGEST_OFFLOAD_BYTES

    uids = toy_model.read_manifest(tiny_checkpoint).uids()[: TINY.num_experts]
    tokens = DIGEST_OFFLOAD_BYTES // (4 * TINY.hidden_dim * 2)  # x 2 experts of peer-a = 1 MiB of float32
    x = torch.randn(tokens, TINY.hidden_dim, generator=torch.Generator().manual_seed(5))
    experts = torch.tensor([[0, 1]] * tokens)
    rpcs = client.dispatcher.stats.rpcs
    got = client.dispatch(x, experts, uids, torch.float32)
    want = LocalExperts.from_checkpoint(tiny_checkpoint).dispatch(x, experts, uids, torch.float32)
    assert client.dispatcher.stats.rpcs - rpcs == 1  # one request carrying all 2 x tokens rows
    assert got.answered.all()
    assert (got.outputs - want.outputs).abs().max().item() <= 1e-5
