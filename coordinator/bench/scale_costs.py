"""Per-peer costs that docs/scale.md extrapolates from: DHT announcement and lookup bytes, RPCs
and latency (real hivemind DHT nodes with our validators, on 127.0.0.1), and the Forward
request/response bytes per token of one layer call.

    python -m coordinator.bench.scale_costs --nodes 16 --experts-per-peer 16 --json scale.json

Bytes are protobuf payloads of hivemind's DHT RPCs, counted where P2P serializes them
(libp2p framing and Noise encryption add a few percent); hop counts and latencies on
loopback measure the protocol, not an internet path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from hivemind.dht.node import DHTNode
from hivemind.dht.validation import CompositeValidator
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from protos import expert_service_pb2 as pb
from protos import tensors
from protos.envelope import Identity
from protos.records import PeerRecord, PeerState, expert_uid
from protos.validation import dht_validators, owner_subkey

CALLS: Counter = Counter()
BYTES: Counter = Counter()


def count_dht_rpcs() -> None:
    """Count every DHT RPC and its payload bytes in this process (instrumentation, not a mock)."""
    original = P2P._call_unary_protobuf_handler
    if getattr(original, "counting", False):
        return

    async def counting(self, peer_id, handle_name, input, output_protobuf_type):
        response = await original(self, peer_id, handle_name, input, output_protobuf_type)
        name = handle_name.rsplit(".", 1)[-1]
        CALLS[name] += 1
        BYTES[name + ".request"] += input.ByteSize()
        BYTES[name + ".response"] += response.ByteSize()
        return response

    counting.counting = True
    P2P._call_unary_protobuf_handler = counting


def snapshot() -> tuple[Counter, Counter]:
    return Counter(CALLS), Counter(BYTES)


def diff(before: tuple[Counter, Counter]) -> dict:
    calls = CALLS - before[0]
    nbytes = BYTES - before[1]
    return {
        "rpcs": dict(calls),
        "bytes": dict(nbytes),
        "total_rpcs": sum(calls.values()),
        "total_bytes": sum(nbytes.values()),
    }


def peer_record(identity: Identity, owner: bytes) -> PeerRecord:
    return PeerRecord.signed(
        identity,
        owner,
        endpoint="203.0.113.17:31337",
        state=PeerState.ONLINE,
        load=12,
        throughput=180421.5,
        device="cuda",
        version="0.1.0",
    )


async def _start_nodes(keys: list[RSAPrivateKey]) -> list[DHTNode]:
    """One DHT node per key on 127.0.0.1, the first the others' bootstrap."""
    dhts = [
        await DHTNode.create(
            record_validator=CompositeValidator(dht_validators(keys[0])), host_maddrs=["/ip4/127.0.0.1/tcp/0"]
        )
    ]
    boot = [str(m) for m in await dhts[0].get_visible_maddrs()]
    for key in keys[1:]:
        dhts.append(
            await DHTNode.create(
                initial_peers=boot,
                record_validator=CompositeValidator(dht_validators(key)),
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                cache_locally=False,  # a lookup must go to the network, as the first one of a fresh coordinator does
            )
        )
    return dhts


async def _lookups(dhts: list[DHTNode], keys_of: Callable[[int], list[str]], lookups: int, must_find: bool) -> dict:
    """`lookups` lookups from the nodes past the two that stored (the coordinator's swarm refresh):
    RPCs and bytes per lookup, and the median ms."""
    ms = []
    before = snapshot()
    for i in range(lookups):
        node, keys = dhts[2 + i % (len(dhts) - 2)], keys_of(i)
        start = time.perf_counter()
        found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
        ms.append((time.perf_counter() - start) * 1e3)
        assert not must_find or found[keys[0]] is not None
    per_lookup = {k: v / lookups if isinstance(v, int) else v for k, v in diff(before).items()}
    return {**per_lookup, "ms_median": round(statistics.median(ms), 2)}


async def measure_dht(nodes: int, experts_per_peer: int, lookups: int, replicas: int = 1) -> dict:
    from hivemind.utils import MSGPackSerializer

    keys = [RSAPrivateKey() for _ in range(nodes)]
    dhts = await _start_nodes(keys)
    try:
        uids = [expert_uid("mixtral-0123456789abcdef", layer, e) for layer in range(32) for e in range(8)]
        owner = owner_subkey(keys[1])
        record = peer_record(Identity.generate(), owner)
        mine = uids[:experts_per_peer]
        # other peers (owners) already serve these experts: each adds one entry to every key's value
        exp = get_dht_time() + 120
        for j in range(2, 1 + replicas):
            node_owner = owner_subkey(keys[j])
            rec = peer_record(Identity.generate(), node_owner).to_dict()
            await dhts[j].store_many(mine, [rec] * len(mine), exp, subkeys=[node_owner] * len(mine))
        # one announcement of `experts_per_peer` experts (what a peer sends every period)
        before, start = snapshot(), time.perf_counter()
        ok = await dhts[1].store_many(
            mine, [record.to_dict()] * len(mine), get_dht_time() + 30, subkeys=[owner] * len(mine)
        )
        store_ms = (time.perf_counter() - start) * 1e3
        announce = diff(before)
        assert all(ok.values()), ok
        lookup_one = await _lookups(dhts, lambda i: [mine[i % len(mine)]], lookups, must_find=True)
        lookup_all = await _lookups(dhts, lambda _: mine, lookups, must_find=False)
        return {
            "nodes": nodes,
            "replicas": replicas,
            "experts_per_peer": experts_per_peer,
            "record_value_bytes_unsigned": len(MSGPackSerializer.dumps(record.to_dict())),
            "subkey_bytes": len(MSGPackSerializer.dumps(owner)),
            "announce": {**announce, "ms": round(store_ms, 2), "per_expert_bytes": announce["total_bytes"] / len(mine)},
            "lookup_one_key": lookup_one,
            "lookup_all_keys": lookup_all,
        }
    finally:
        for node in dhts:
            await node.shutdown()


def measure_validation(repeats: int = 200) -> dict:
    """CPU to sign (peer) and validate (every reader, per replica entry) one record, as every node runs it."""
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer

    key = RSAPrivateKey()
    validator = CompositeValidator(dht_validators(key))
    owner = owner_subkey(key)
    record = DHTRecord(
        key=DHTID.generate(source="x").to_bytes(),
        subkey=MSGPackSerializer.dumps(owner),
        value=MSGPackSerializer.dumps(peer_record(Identity.generate(), owner).to_dict()),
        expiration_time=get_dht_time() + 30,
    )
    start = time.perf_counter()
    for _ in range(repeats):
        signed = validator.sign_value(record)
    sign_us = (time.perf_counter() - start) / repeats * 1e6
    stored = DHTRecord(record.key, record.subkey, signed, record.expiration_time)
    start = time.perf_counter()
    for _ in range(repeats):
        assert validator.validate(stored)
    validate_us = (time.perf_counter() - start) / repeats * 1e6
    return {
        "signed_value_bytes": len(signed),
        "entry_bytes": len(signed) + len(record.subkey),  # what one replica adds to an expert's DHT value
        "sign_us": round(sign_us, 1),
        "validate_us": round(validate_us, 1),
    }


def measure_rpc(hidden: int, k: int, dtype: torch.dtype) -> dict:
    """Forward bytes for one token through one layer: k segments (worst case: k different peers)."""
    out = {}
    for tokens in (1, 64):
        x = torch.zeros(tokens, hidden, dtype=dtype)
        request = pb.ForwardRequest(
            request_id="0" * 32,
            segments=[
                pb.Segment(expert_uid=expert_uid("mixtral-0123456789abcdef", 31, e), num_rows=tokens) for e in range(k)
            ],
            inputs=tensors.encode(torch.cat([x] * k)),
        )
        response = pb.ForwardResponse(
            request_id="0" * 32, outputs=tensors.encode(torch.cat([x] * k)), queue_ms=1.0, compute_ms=1.0
        )
        out[f"{tokens}_tokens"] = {"request_bytes": request.ByteSize(), "response_bytes": response.ByteSize()}
    out["payload_bytes_per_token_each_way"] = k * hidden * dtype.itemsize
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m coordinator.bench.scale_costs", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--experts-per-peer", type=int, default=16)
    p.add_argument("--lookups", type=int, default=20)
    p.add_argument("--replicas", type=int, default=1, help="peers serving each measured expert (< nodes)")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    count_dht_rpcs()
    result = {
        "record": measure_validation(),
        "dht": asyncio.run(measure_dht(args.nodes, args.experts_per_peer, args.lookups, args.replicas)),
        "rpc_mixtral_8x7b_bf16": measure_rpc(4096, 2, torch.bfloat16),
        "rpc_tiny_fp32": measure_rpc(64, 2, torch.float32),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
