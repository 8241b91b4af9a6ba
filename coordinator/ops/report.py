"""Human-readable summaries of what the swarm did for a run (rich tables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from coordinator.dispatch.stats import DispatchStats, percentile
from coordinator.ops.console import safe_text


def peers_table(
    stats: DispatchStats,
    names: dict[str, str] | None = None,
    hosted: dict[str, str] | None = None,
    fates: dict[str, str] | None = None,
) -> Table:
    """Which peer served what: one row per peer that answered a call or was seen serving
    (`fates`: what became of each, e.g. a peer that crashed mid-run)."""
    names, hosted, fates = names or {}, hosted or {}, fates or {}
    table = Table(title="who served what")
    for col in ("peer", "endpoint", "experts", "Forward RPCs", "token rows", *(["now"] if fates else [])):
        table.add_column(col)
    for peer_id in sorted(set(stats.rpcs_by_peer) | set(fates), key=lambda p: names.get(p, p)):
        table.add_row(
            safe_text(names.get(peer_id, peer_id)),
            safe_text(stats.endpoints.get(peer_id, "-")),
            hosted.get(peer_id, "?"),
            str(stats.rpcs_by_peer.get(peer_id, 0)),
            str(stats.rows_by_peer.get(peer_id, 0)),
            *([fates.get(peer_id, "?")] if fates else []),
        )
    return table


def latency_table(stats: DispatchStats) -> Table:
    table = Table(title="layer call latency through the swarm (ms)")
    for col in ("layer", "calls", "p50", "p95", "p99"):
        table.add_column(col, justify="right")
    for layer in sorted(stats.layer_ms):
        ms = stats.layer_ms[layer]
        calls = stats.calls_by_layer[layer]
        table.add_row(str(layer), str(calls), *(f"{percentile(ms, q):.2f}" for q in (50, 95, 99)))
    rpc = stats.rpc_ms
    table.add_row("RPCs", str(stats.rpcs), *(f"{percentile(rpc, q):.2f}" for q in (50, 95, 99)))
    return table


def counts_line(stats: DispatchStats) -> str:
    per_call = stats.rpcs / max(stats.layer_calls, 1)
    return (
        f"{stats.layer_calls} layer calls, {stats.rpcs} RPCs ({per_call:.2f} per layer call, at most one per "
        f"peer); token-expert pairs: {stats.routed} routed = {stats.exact} exact + {stats.rerouted} rerouted + "
        f"{stats.dropped} dropped; {stats.retries} retries, {stats.hedges} hedges, {stats.bans} bans "
        f"({stats.cheaters_banned} proven cheaters, {stats.bad_receipts} bad receipts), "
        f"{stats.refusals} overload refusals, {stats.leaving} answers of leaving peers; "
        f"spot checks: {stats.spot_checks} experts recomputed, {stats.spot_unresolved} disputes unresolved "
        f"(their answers not used), {stats.spot_resolved_locally} settled by recomputing locally, "
        f"{stats.spot_unverified} with no independent replica to check; {stats.nonfinite} non-finite answers; "
        f"{stats.banned_at_start} peers still banned from earlier runs"
    )


def print_swarm_summary(
    console: Console,
    stats: DispatchStats,
    names: dict[str, str] | None = None,
    hosted: dict[str, str] | None = None,
    fates: dict[str, str] | None = None,
) -> None:
    console.print(peers_table(stats, names, hosted, fates))
    console.print(latency_table(stats))
    console.print(counts_line(stats))
    if line := degraded_line(stats):
        console.print(f"[yellow]warning:[/] {line}")


def degraded_line(stats: DispatchStats) -> str | None:
    """Said whenever the output may differ from the model's: some token-expert pairs were not
    computed by the expert the router chose."""
    if not (stats.rerouted or stats.dropped):
        return None
    return (
        f"the output may differ from the model's: {stats.rerouted + stats.dropped} of {stats.routed} token-expert "
        f"pairs were not computed by their expert ({stats.rerouted} rerouted, {stats.dropped} dropped)"
    )
