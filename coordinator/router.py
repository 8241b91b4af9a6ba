"""Dispatch one MoE layer's token rows to remote experts: one RPC per peer per layer.

Rows are grouped by expert, experts by the replica chosen for them, and each peer gets a
single Forward with all its segments. Outputs come back in request order and are placed
at their (token, slot) positions, so the caller combines them in the original order.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import grpc
import torch

from protos import expert_service_pb2 as pb
from protos import tensors
from protos.records import parse_expert_uid

from .swarm import Replica, SwarmView
from .transport import Channels


class DispatchError(RuntimeError):
    """A layer call could not be completed; the message names the experts and peers."""


class ExpertUnavailableError(DispatchError):
    pass


class RemoteExpertError(DispatchError):
    def __init__(self, message: str, code: grpc.StatusCode | None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PeerCall:
    """The rows one peer computes in one layer call."""

    replica: Replica
    segments: list[tuple[str, int]] = field(default_factory=list)
    positions: list[torch.Tensor] = field(default_factory=list)  # indices into the slot-major (slot, token) list


@dataclass
class DispatchStats:
    """Counters over the life of a dispatcher; every routed (token, slot) is counted."""

    layer_calls: int = 0
    rpcs: int = 0
    routed: int = 0
    exact: int = 0
    rerouted: int = 0  # the fallback policies (next issue) count here; never silently
    dropped: int = 0
    rpc_ms: list[float] = field(default_factory=list)
    layer_ms: dict[int, list[float]] = field(default_factory=dict)  # whole layer calls, by layer
    peer_compute_ms: list[float] = field(default_factory=list)  # as reported by the peers
    rpcs_by_peer: Counter = field(default_factory=Counter)
    rows_by_peer: Counter = field(default_factory=Counter)
    endpoints: dict[str, str] = field(default_factory=dict)  # peer id -> endpoint it was reached at


class Dispatcher:
    def __init__(self, swarm: SwarmView, channels: Channels, timeout: float = 30.0) -> None:
        self.swarm = swarm
        self.channels = channels
        self.timeout = timeout
        self.stats = DispatchStats()

    def plan(self, flat_experts: torch.Tensor, uids: list[str]) -> list[PeerCall]:
        """Group (token, slot) positions by expert, then by chosen replica."""
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=len(uids)).tolist()
        calls: dict[str, PeerCall] = {}
        start = 0
        for expert, rows in enumerate(counts):
            if rows == 0:
                continue
            uid = uids[expert]
            replica = self.choose(uid, calls)
            call = calls.setdefault(replica.peer_id, PeerCall(replica))
            call.segments.append((uid, rows))
            call.positions.append(order[start : start + rows])
            start += rows
        return list(calls.values())

    def choose(self, uid: str, already: dict[str, PeerCall]) -> Replica:
        replicas = self.swarm.replicas(uid)
        if not replicas:
            raise ExpertUnavailableError(f"no live replica of expert {uid} in the swarm")
        # prefer a peer this call already uses (fewer RPCs), else the least loaded
        in_call = [r for r in replicas if r.peer_id in already]
        if in_call:
            return in_call[0]
        least = min(r.record.load for r in replicas)
        return random.choice([r for r in replicas if r.record.load == least])

    async def _call(self, call: PeerCall, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        positions = torch.cat(call.positions)
        rows = x.index_select(0, positions % x.shape[0]).to(dtype)
        request = pb.ForwardRequest(
            request_id=uuid.uuid4().hex,
            segments=[pb.Segment(expert_uid=u, num_rows=n) for u, n in call.segments],
            inputs=tensors.encode(rows),
        )
        endpoint = call.replica.record.endpoint
        started = time.perf_counter()
        try:
            response = await self.channels.stub(endpoint).Forward(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            uids = ", ".join(u for u, _ in call.segments)
            raise RemoteExpertError(
                f"peer {call.replica.peer_id} at {endpoint} failed experts [{uids}]: {e.code().name}: {e.details()}",
                e.code(),
            ) from None
        self.stats.rpc_ms.append((time.perf_counter() - started) * 1e3)
        self.stats.peer_compute_ms.append(response.compute_ms)
        out = tensors.decode(response.outputs)
        if tuple(out.shape) != tuple(rows.shape) or out.dtype != dtype:
            raise RemoteExpertError(
                f"peer {call.replica.peer_id} returned {out.dtype} {list(out.shape)}, expected {dtype} "
                f"{list(rows.shape)}",
                None,
            )
        return out

    async def dispatch(
        self, x: torch.Tensor, experts: torch.Tensor, uids: list[str], dtype: torch.dtype
    ) -> torch.Tensor:
        """x [T, H], experts [T, k] -> expert outputs [T, k, H] (row t, slot j = expert experts[t, j] of x[t]).

        Each expert's rows are sent slot-major ((slot, token) order), the order in which
        transformers' eager MoE gathers them, so a peer runs the very GEMM a local model would.
        """
        started = time.perf_counter()
        num_tokens, k = experts.shape
        flat = experts.T.reshape(-1)
        calls = self.plan(flat, uids)
        outputs = await asyncio.gather(*(self._call(c, x, dtype) for c in calls))
        result = torch.empty(k * num_tokens, x.shape[-1], dtype=dtype)
        for call, out in zip(calls, outputs, strict=True):
            result.index_copy_(0, torch.cat(call.positions), out)
            self.stats.rpcs_by_peer[call.replica.peer_id] += 1
            self.stats.rows_by_peer[call.replica.peer_id] += out.shape[0]
            self.stats.endpoints[call.replica.peer_id] = call.replica.record.endpoint
        self.stats.layer_calls += 1
        self.stats.rpcs += len(calls)
        self.stats.routed += flat.numel()
        self.stats.exact += flat.numel()
        layer = parse_expert_uid(uids[0])[1]
        self.stats.layer_ms.setdefault(layer, []).append((time.perf_counter() - started) * 1e3)
        return result.view(k, num_tokens, -1).transpose(0, 1)
