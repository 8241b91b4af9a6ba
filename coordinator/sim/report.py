"""The simulation's report: built from the run, printed as tables, written as JSON and a plot, shown live."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table

from coordinator.dispatch.stats import DispatchStats, percentile
from coordinator.sim.peers import Simulation
from coordinator.sim.schedule import DOWN_ACTIONS
from coordinator.sim.workload import RequestRecord


def _pcts(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": (round(percentile(values, q), 3) if values else None) for q in (50, 95, 99)}


def build_report(
    args: argparse.Namespace, sim: Simulation, records: list[RequestRecord], stats: DispatchStats, seconds: float
) -> dict:
    ok = [r for r in records if r.ok]
    tokens_key = "generated" if args.load == "generate" else "processed"
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "duration_s": round(seconds, 2),
        "setup_s": round(sim.setup_s, 2),
        "requests": _requests(records, ok),
        "tokens": {tokens_key: len(ok) * sim.workload.tokens_per_request, **_tokens(stats)},
        "dispatch": _dispatch(sim, stats),
        "faults": {a: sum(e["action"] == a for e in sim.events) for a in (*DOWN_ACTIONS, "restart", "join", "skipped")},
        "peers": _peers(sim, stats, seconds),
        "events": sim.events,
        "timeline": {
            "requests": [[round(r.t, 3), round(r.ms, 2), r.ok, r.match] for r in records],
            "peers_up": sim.peer_timeline,
        },
    }


def _requests(records: list[RequestRecord], ok: list[RequestRecord]) -> dict:
    return {
        "total": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "success_rate": len(ok) / len(records) if records else None,
        "match_local": sum(r.match for r in records),
        "latency_ms": _pcts([r.ms for r in ok]),
        "errors": sorted({r.error for r in records if r.error})[:10],
    }


def _tokens(stats: DispatchStats) -> dict:
    return {
        "routed": stats.routed,
        "exact": stats.exact,
        "rerouted": stats.rerouted,
        "dropped": stats.dropped,
        "consistent": stats.exact + stats.rerouted + stats.dropped == stats.routed,
    }


def _dispatch(sim: Simulation, stats: DispatchStats) -> dict:
    known = {pid for p in sim.peers.values() for pid in p.peer_ids}
    return {
        "layer_calls": stats.layer_calls,
        "rpcs": stats.rpcs,
        "retries": stats.retries,
        "hedges": stats.hedges,
        "bans": stats.bans,
        "refusals": stats.refusals,
        **_verification(stats),
        "layer_ms": _pcts([ms for calls in stats.layer_ms.values() for ms in calls]),
        "rpc_ms": _pcts(stats.rpc_ms),
        "rpcs_to_unknown_peers": sum(n for pid, n in stats.rpcs_by_peer.items() if pid not in known),
    }


def _verification(stats: DispatchStats) -> dict[str, int]:
    """What checking the peers found: spot checks, proven cheaters (with evidence), bad receipts."""
    return {
        "spot_checks": stats.spot_checks,
        "spot_unresolved": stats.spot_unresolved,
        "spot_resolved_locally": stats.spot_resolved_locally,
        "spot_unverified": stats.spot_unverified,
        "cheaters_banned": stats.cheaters_banned,
        "evidence": len(stats.evidence),
        "bad_receipts": stats.bad_receipts,
        "nonfinite": stats.nonfinite,
        "banned_at_start": stats.banned_at_start,
    }


def _verification_text(v: dict) -> str:
    return (
        f"{v['spot_checks']} spot checks ({v['spot_unresolved']} unresolved), {v['cheaters_banned']} cheaters "
        f"banned ({v['evidence']} evidence), {v['bad_receipts']} bad receipts; "
        f"{v['spot_resolved_locally']} disputes settled locally, {v['spot_unverified']} unverifiable, "
        f"{v['nonfinite']} non-finite answers, {v['banned_at_start']} banned from earlier runs"
    )


def _peers(sim: Simulation, stats: DispatchStats, seconds: float) -> list[dict]:
    peers = []
    for name, p in sim.peers.items():
        ids = set(p.peer_ids)
        lifetime = seconds - max(0.0, p.joined_at - sim.t0)
        peers.append(
            {
                "name": name,
                "experts": p.plan.experts,
                "impairment": p.plan.impairment,
                "restarts": p.restarts,
                "uptime_s": round(p.uptime_s, 2),
                "uptime_frac": round(min(p.uptime_s / lifetime, 1.0), 3) if lifetime > 0 else 0.0,
                "rpcs": sum(n for pid, n in stats.rpcs_by_peer.items() if pid in ids),
                "rows": sum(n for pid, n in stats.rows_by_peer.items() if pid in ids),
                "final_state": p.state,
            }
        )
    return peers


def live_view(sim: Simulation, records: list[RequestRecord], stats: DispatchStats, duration: float) -> Group:
    c = sim.counts()
    ok = sum(r.ok for r in records)
    recent = [r.ms for r in records[-50:] if r.ok]
    head = Table.grid(padding=(0, 2))
    head.add_row(
        f"[bold]t {sim.now():5.1f}/{duration:g}s",
        f"peers up {c['up']}/{len(sim.peers)} (starting {c['starting']}, stalled {c['stalled']}, down {c['down']})",
    )
    head.add_row(
        f"requests {len(records)}: {ok} ok, {len(records) - ok} failed",
        f"latency p50 {percentile(recent, 50):.0f} ms (last 50); tokens routed {stats.routed}: exact "
        f"{stats.exact}, rerouted {stats.rerouted}, dropped {stats.dropped}; retries {stats.retries}, "
        f"hedges {stats.hedges}, bans {stats.bans}",
    )
    head.add_row("", f"verification: {_verification_text(_verification(stats))}")
    events = Table("t", "event", "peer", "note", title="recent events", title_justify="left")
    for e in sim.events[-6:]:
        events.add_row(f"{e['t']:.1f}", e["action"], e["peer"], e["note"])
    return Group(head, events)


def print_report(console: Console, report: dict) -> None:
    req, tok, dis = report["requests"], report["tokens"], report["dispatch"]
    cut = " (interrupted: the report so far)" if report.get("interrupted") else ""
    summary = Table(title=f"simulation: {report['duration_s']}s of load{cut}", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    rate = "n/a" if req["success_rate"] is None else f"{100 * req['success_rate']:.1f}%"
    summary.add_row("requests", f"{req['total']} ({req['ok']} ok, {req['failed']} failed): {rate} complete")
    summary.add_row("equal to the local model", f"{req['match_local']} of {req['total']}")
    summary.add_row("request latency ms", "  ".join(f"{k} {v}" for k, v in req["latency_ms"].items()))
    summary.add_row("layer call latency ms", "  ".join(f"{k} {v}" for k, v in dis["layer_ms"].items()))
    summary.add_row(
        "token-expert pairs",
        f"{tok['routed']} routed = {tok['exact']} exact + {tok['rerouted']} rerouted + {tok['dropped']} dropped"
        + ("" if tok["consistent"] else "  [red]INCONSISTENT"),
    )
    summary.add_row(
        "dispatch",
        f"{dis['layer_calls']} layer calls, {dis['rpcs']} RPCs, {dis['retries']} retries, {dis['hedges']} hedges, "
        f"{dis['bans']} bans, {dis['refusals']} refusals",
    )
    summary.add_row("verification", _verification_text(dis))
    summary.add_row("faults", ", ".join(f"{k} {v}" for k, v in report["faults"].items()))
    if skipped := [e for e in report["events"] if e["action"] == "skipped"]:
        reasons = sorted({e["note"] for e in skipped})
        summary.add_row(
            "skipped",
            f"{len(skipped)} scheduled faults not applied (the peer did not exist or was not in a state for it, "
            f"or it would have taken an expert's last replica for longer than --max-defer): " + "; ".join(reasons),
        )
    for err in req["errors"][:3]:
        summary.add_row("[red]error", err)
    console.print(summary)
    peers = Table(title="per peer")
    for col in ("peer", "experts", "impairment", "restarts", "uptime", "RPCs", "rows", "state"):
        peers.add_column(col)
    for p in report["peers"]:
        imp = ", ".join(f"{k.removeprefix('sim-')}={v}" for k, v in p["impairment"].items() if k != "sim-seed")
        peers.add_row(
            p["name"],
            p["experts"],
            imp or "-",
            str(p["restarts"]),
            f"{100 * p['uptime_frac']:.0f}%",
            str(p["rpcs"]),
            str(p["rows"]),
            p["final_state"],
        )
    console.print(peers)


def plot_report(report: dict, path: Path) -> None:
    """Request latency and live peers over time, fault events marked."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install -e '.[sim]'") from e
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), height_ratios=[3, 1])
    reqs = report["timeline"]["requests"]
    for ok, match, style, label in (
        (True, True, dict(color="tab:blue", marker="."), "ok, equal to local"),
        (True, False, dict(color="tab:orange", marker="."), "ok, differs (rerouted/dropped)"),
        (False, False, dict(color="tab:red", marker="x"), "failed"),
    ):
        pts = [(t, ms) for t, ms, o, m in reqs if o == ok and (m == match or not ok)]
        if pts:
            ax1.scatter(*zip(*pts, strict=True), s=14, label=label, **style)
    ax1.set_ylabel("request latency (ms)")
    ax1.set_title(
        f"moe-swarm simulate: {report['config']['peers']} peers, replication {report['config']['replication']}, "
        f"seed {report['config']['seed']}"
    )
    ups = report["timeline"]["peers_up"]
    if ups:
        ax2.step(*zip(*ups, strict=True), where="post", color="tab:green")
    ax2.set_ylabel("peers up")
    ax2.set_xlabel("seconds since the load started")
    # a restart launches a process; it is "up" only once it serves again, which start-up time separates
    marks = {
        "kill": ("red", "-", "kill"),
        "stop": ("purple", "-", "stop"),
        "stall": ("orange", "-", "stall"),
        "restart": ("green", ":", "restart launched"),
        "ready": ("green", "-", "up again"),
        "join": ("blue", "-", "join"),
    }
    seen = set()
    for e in report["events"]:
        if e["action"] in marks:
            color, style, name = marks[e["action"]]
            label = name if e["action"] not in seen else None
            seen.add(e["action"])
            for ax in (ax1, ax2):
                ax.axvline(e["t"], color=color, ls=style, alpha=0.6, lw=1, label=label if ax is ax1 else None)
    ax1.legend(loc="upper right", fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_plan(console: Console, plans: list, schedule: list) -> None:
    """`simulate --dry-run`: the peers it would start and the faults it would inject, as tables."""
    peers = Table(title=f"{len(plans)} peers")
    for col in ("peer", "experts", "replica group", "impairment"):
        peers.add_column(col)
    for p in plans:
        imp = ", ".join(f"{k.removeprefix('sim-')}={v}" for k, v in p.impairment.items() if k != "sim-seed")
        peers.add_row(p.name, p.experts, str(p.group), imp or "-")
    console.print(peers)
    faults = Table(title=f"{len(schedule)} scheduled faults" if schedule else "no scheduled faults")
    for col in ("t (s)", "action", "peer", "detail"):
        faults.add_column(col)
    for e in schedule:
        d = e.to_dict()
        detail = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("at", "action", "peer"))
        faults.add_row(f"{e.at:g}", e.action, e.peer, detail or "-")
    console.print(faults)
