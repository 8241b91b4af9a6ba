"""`moe-swarm status`: what the DHT says about one model's experts, as rich tables or JSON.

Per expert: every peer record under its key (state, load, throughput, device, version and
how long until the record expires), and how many replicas serve it now; experts nobody
serves are highlighted. Per peer: what it hosts. One `latest=True` read of every expert key
through a client-mode DHT node (it stores nobody's records).

Which experts to ask about comes from a checkpoint (`--checkpoint` toy folder, or `--model`
given a Hugging Face / toy folder), or from `--model ID` plus `--layers/--experts`. A bare
`--model ID` without them scans the DHT for the grid (see `scan_grid`): layers from their
first few experts, the expert count from a few of those layers. Experts past the highest
announced index, or trailing layers whose first experts nobody hosts, are invisible to a
scan. Give the sizes to see those gaps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from coordinator.ops.console import console, safe_text
from protos import toy_model
from protos.expert_spec import format_expert_spec
from protos.plumbing.dht import fetch_latest
from protos.records import PeerRecord, expert_uid, parse_expert_uid

if TYPE_CHECKING:
    from hivemind import DHT

# a scan for the grid of a bare model id (each DHT key probed costs a lookup: keep rounds small)
SCAN_LAYER_CHUNK = 16  # layers probed per round
SCAN_LAYER_EXPERTS = 4  # experts probed in each of them
SCAN_LEADING_LAYERS = 64  # give up when none of the first this many layers is announced
SCAN_EXPERT_CHUNK = 32  # experts probed per round, in
SCAN_SAMPLE_LAYERS = 4  # this many of the layers found
SCAN_LIMIT = 4096  # never past this layer / expert index


def add_swarm_view_args(p: argparse.ArgumentParser) -> None:
    """Which swarm and which model's experts to look at (shared by `status` and `dashboard`)."""
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of DHT nodes of the swarm")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        help="a model id as peers announce it (e.g. mixtral-0123456789abcdef), a Hugging Face / moe-swarm "
        "checkpoint folder, or a Hub repo id org/name (reads its config and file headers only) to take the id "
        "and expert list from",
    )
    src.add_argument("--checkpoint", type=Path, help="moe-swarm toy checkpoint folder (moe_swarm.json)")
    p.add_argument("--revision", default=None, help="with a Hub repo id: branch, tag or commit (default: main)")
    p.add_argument("--layers", type=int, default=None, help="with --model ID: MoE layers 0..N-1 (default: scan)")
    p.add_argument("--experts", type=int, default=None, help="with --model ID: experts per layer (default: scan)")


def add_status_args(p: argparse.ArgumentParser) -> None:
    add_swarm_view_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


@dataclass
class ReplicaStatus:
    peer_id: str
    expires_in: float  # seconds until the record expires (a peer refreshes it every announce period)
    endpoint: str | None = None
    state: str | None = None  # joining | online | draining | left; None when the record is malformed
    load: int | None = None
    throughput: float | None = None
    device: str | None = None
    version: str | None = None
    reach: str | None = None  # "direct", or "relayed via <relay address>/..<end of its id>"
    error: str | None = None  # why the record was rejected

    @property
    def serving(self) -> bool:
        return self.error is None and self.state == "online" and self.expires_in > 0


@dataclass
class ExpertStatus:
    uid: str
    layer: int
    expert: int
    replicas: list[ReplicaStatus] = field(default_factory=list)

    @property
    def serving(self) -> int:
        return sum(r.serving for r in self.replicas)


@dataclass
class SwarmStatus:
    model_id: str
    grid: str  # where the expert list came from: checkpoint | flags | scan
    experts: list[ExpertStatus]

    @property
    def missing(self) -> list[str]:
        return [e.uid for e in self.experts if not e.serving]

    def peers(self) -> list[dict[str, Any]]:
        """One entry per peer seen under any expert key, with the experts it announces."""
        by_peer: dict[str, dict[str, Any]] = {}
        for e in self.experts:
            for r in e.replicas:
                entry = by_peer.setdefault(r.peer_id, {**asdict(r), "experts": [], "serving_experts": 0})
                entry["experts"].append(e.uid)
                entry["serving_experts"] += r.serving
                if r.error is None and (entry["error"] is not None or r.expires_in > entry["expires_in"]):
                    entry.update(asdict(r))  # show the freshest valid record
        return sorted(by_peer.values(), key=lambda p: (p["endpoint"] or "", p["peer_id"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "grid": self.grid,
            "layers": sorted({e.layer for e in self.experts}),
            "experts": [
                {
                    **asdict(e),
                    "serving": e.serving,
                    "replicas": [{**asdict(r), "serving": r.serving} for r in e.replicas],
                }
                for e in self.experts
            ],
            "missing": self.missing,
            "peers": [{**p, "hosts": hosted_spec(p["experts"], self.experts)} for p in self.peers()],
        }


def parse_replicas(subkeys: dict[Any, tuple[object, float]], now: float) -> list[ReplicaStatus]:
    out = []
    for owner, (value, expiration) in subkeys.items():
        expires_in = round(expiration - now, 3)
        try:
            rec = PeerRecord.from_dict(value)
        except (
            ValueError,
            KeyError,
            TypeError,
        ) as e:  # validators drop these; if one slips by, show it, never count it
            out.append(ReplicaStatus(f"?{hash(owner) & 0xFFFFFFFF:08x}", expires_in, error=str(e)[:200]))
            continue
        out.append(
            ReplicaStatus(
                rec.peer_id,  # the identity's fingerprint, as peers log it (the subkey is the DHT owner marker)
                expires_in,
                endpoint=rec.endpoint,
                state=rec.state.value,
                load=rec.load,
                throughput=rec.throughput,
                device=rec.device,
                version=rec.version,
                reach=rec.reach.describe() if rec.reach is not None else "direct",
            )
        )
    return sorted(out, key=lambda r: (not r.serving, r.endpoint or "", r.peer_id))


async def scan_grid(dht, model_id: str, layers: int | None, experts: int | None) -> tuple[int, int]:
    """(layers, experts per layer) from the highest indices anybody announces.

    Layers: probe the first few experts of each layer, in chunks of layers, until a chunk
    past the last hit is empty (leading dense layers are skipped over). Experts: probe a few
    of the layers found, in chunks of experts, the same way. A few get_many calls for real
    model sizes; blind past the last announced index, as the module docstring says."""

    async def announced(uids: list[str]) -> set[tuple[int, int]]:
        raw = await fetch_latest(dht, uids)
        return {parse_expert_uid(uid)[1:] for uid, subkeys in raw.items() if subkeys}

    found: set[tuple[int, int]] = set()
    if layers is None:
        probe = range(min(experts or SCAN_LAYER_EXPERTS, SCAN_LAYER_EXPERTS))
        for start in range(0, SCAN_LIMIT, SCAN_LAYER_CHUNK):
            if not found and start >= SCAN_LEADING_LAYERS:
                break
            hits = await announced(
                [expert_uid(model_id, la, e) for la in range(start, start + SCAN_LAYER_CHUNK) for e in probe]
            )
            if not hits and found:
                break
            found |= hits
        layers = max((la for la, _ in found), default=-1) + 1
    if experts is None:
        sample = sorted({la for la, _ in found})[:SCAN_SAMPLE_LAYERS] or range(min(layers, SCAN_SAMPLE_LAYERS))
        for start in range(0, SCAN_LIMIT, SCAN_EXPERT_CHUNK):
            hits = await announced(
                [expert_uid(model_id, la, e) for la in sample for e in range(start, start + SCAN_EXPERT_CHUNK)]
            )
            if not hits:
                break
            found |= hits
        experts = max((e for _, e in found), default=-1) + 1
    return layers, experts


def resolve_uids(args: argparse.Namespace) -> tuple[str, list[str] | None, str]:
    """(model id, expert uids or None when they must be scanned, where they came from)."""
    if args.checkpoint is not None:
        manifest = toy_model.read_manifest(args.checkpoint)
        return manifest.model_id, manifest.uids(), "checkpoint"
    from protos.weights import is_hub_id

    if is_hub_id(args.model):
        from coordinator.models.hf import checkpoint_info

        info = checkpoint_info(args.model, args.revision, weights=False)
        return info.manifest.model_id, info.uids, "checkpoint"
    folder = Path(args.model)
    if folder.is_dir():
        if (folder / toy_model.MANIFEST).is_file():
            manifest = toy_model.read_manifest(folder)
            return manifest.model_id, manifest.uids(), "checkpoint"
        from coordinator.models.hf import checkpoint_info

        info = checkpoint_info(folder)
        return info.manifest.model_id, info.uids, "checkpoint"
    model_id = args.model
    if "/" in model_id or model_id.startswith((".", "~")):  # a path, not a model id: say which is missing
        raise ValueError(f"{model_id}: no such folder (--model takes a checkpoint folder, a Hub repo id or a model id)")
    expert_uid(model_id, 0, 0)  # ValueError naming the bad id
    if args.layers is not None and args.experts is not None:
        uids = [expert_uid(model_id, la, e) for la in range(args.layers) for e in range(args.experts)]
        return model_id, uids, "flags"
    return model_id, None, "scan"


async def collect(
    dht, model_id: str, uids: list[str] | None, grid: str, layers: int | None = None, experts: int | None = None
) -> SwarmStatus:
    from hivemind.utils import get_dht_time

    if uids is None:
        layers, experts = await scan_grid(dht, model_id, layers, experts)
        if not layers or not experts:
            raise ValueError(f"nobody announces experts of {model_id} in this swarm (scanned the DHT)")
        uids = [expert_uid(model_id, la, e) for la in range(layers) for e in range(experts)]
    now = get_dht_time()
    raw = await fetch_latest(dht, uids)
    experts = []
    for uid in uids:
        _, layer, e = parse_expert_uid(uid)
        experts.append(ExpertStatus(uid, layer, e, parse_replicas(raw.get(uid, {}), now)))
    return SwarmStatus(model_id, grid, experts)


def hosted_spec(uids: Iterable[str], experts: Sequence[ExpertStatus]) -> str:
    """Compact LAYER:EXPERTS list of what a peer hosts, in `moe-peer serve --experts` syntax."""
    layer_experts: dict[int, set[int]] = {}
    for x in experts:
        layer_experts.setdefault(x.layer, set()).add(x.expert)
    return format_expert_spec((parse_expert_uid(uid)[1:] for uid in uids), layer_experts)


_STATE_STYLE = {"online": "green", "joining": "yellow", "draining": "yellow", "left": "dim"}


def _replica_line(r: ReplicaStatus) -> Text:
    if r.error is not None:
        return safe_text(f"{r.peer_id[-8:]} invalid record: {r.error}", style="red")
    state = r.state if r.expires_in > 0 else "expired"
    return Text.assemble(
        safe_text(f"{r.peer_id} {r.endpoint if r.reach == 'direct' else r.reach} "),
        (state or "", _STATE_STYLE.get(state or "", "dim")),
        f" load {r.load} {r.throughput:.0f} tok/s {r.expires_in:.0f}s",
    )


def experts_table(status: SwarmStatus) -> Table:
    table = Table(title=f"experts of {status.model_id}", caption="last column: seconds until the record expires")
    for col, justify in (("layer", "right"), ("expert", "right"), ("replicas", "right"), ("peers", "left")):
        table.add_column(col, justify=justify)
    for e in status.experts:
        if e.serving:
            lines = Text("\n").join(_replica_line(r) for r in e.replicas)
            table.add_row(str(e.layer), str(e.expert), str(e.serving), lines)
        else:
            others = [_replica_line(r) for r in e.replicas]
            lines = Text("\n").join([Text("NO REPLICA", style="bold red"), *others])
            table.add_row(str(e.layer), str(e.expert), "0", lines, style="bold red")
    return table


def peers_table(status: SwarmStatus) -> Table:
    table = Table(title="peers")
    for col in ("peer", "endpoint", "reach", "state", "hosts", "load", "tok/s", "device", "version", "expires in"):
        table.add_column(col, justify="right" if col in ("load", "tok/s", "expires in") else "left")
    for p in status.peers():
        if p["error"] is not None:
            table.add_row(
                safe_text(p["peer_id"]),
                "",
                Text("invalid record", style="red"),
                safe_text(hosted_spec(p["experts"], [])),
            )
            continue
        state = p["state"] if p["expires_in"] > 0 else "expired"
        table.add_row(
            safe_text(p["peer_id"]),
            safe_text(p["endpoint"]),
            safe_text(p["reach"]),
            Text(state, style=_STATE_STYLE.get(state, "dim")),
            safe_text(hosted_spec(p["experts"], status.experts)),
            str(p["load"]),
            f"{p['throughput']:.0f}",
            safe_text(p["device"]),
            safe_text(p["version"]),
            f"{p['expires_in']:.1f}s",
        )
    return table


def print_status(console: Console, status: SwarmStatus) -> None:
    console.print(experts_table(status))
    console.print(peers_table(status))
    n, missing = len(status.experts), status.missing
    covered = f"{n - len(missing)}/{n} experts have a serving replica, {len(status.peers())} peers"
    if missing:
        console.print(f"[bold red]{covered}; no replica: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    else:
        console.print(f"[green]{covered}")
    if status.grid == "scan":
        layers = sorted({e.layer for e in status.experts})
        console.print(
            f"[yellow]note:[/] layers and expert count found by scanning the DHT ({len(layers)} layers x "
            f"{len({e.expert for e in status.experts})} experts); experts past the last announced one are not "
            "listed: pass --layers and --experts (or a checkpoint) to see every gap"
        )


def join_swarm(initial_peers: Sequence[str]) -> DHT | None:
    """A client-mode DHT node for reading expert records; None (after one error line) when no initial peer answers."""
    from protos.plumbing.dht import SwarmJoinError, start_dht

    # client_mode: reads the DHT and stores nobody's records, like the coordinator's SwarmClient
    try:
        return start_dht(initial_peers, client_mode=True)
    except SwarmJoinError as e:  # no initial peer answered: say so instead of a traceback
        print(f"moe-swarm: error: {e}", file=sys.stderr)
        return None


def run_status(args: argparse.Namespace) -> int:
    model_id, uids, grid = resolve_uids(args)  # checkpoint/model-id errors before joining the swarm
    dht = join_swarm(args.initial_peers)
    if dht is None:
        return 1
    try:
        status = asyncio.run(collect(dht, model_id, uids, grid, args.layers, args.experts))
    finally:
        dht.shutdown()
    if args.json:
        print(json.dumps(status.to_json(), indent=1))
    else:
        print_status(console(), status)
    return 0
