"""Prometheus metrics of a coordinator, read from its DispatchStats at scrape time (nothing
is added to the dispatch hot path)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.dispatch.stats import DispatchStats, percentile

_COUNTERS = {
    "layer_calls": "MoE layer calls dispatched",
    "rpcs": "Forward RPCs answered",
    "retries": "experts re-sent after a failed or refused call",
    "hedges": "hedged duplicate calls sent",
    "bans": "peers banned: failed calls, bad receipts and proven cheaters",
    "refusals": "RESOURCE_EXHAUSTED answers (retried elsewhere)",
    "leaving": "answers of peers that are draining or joining (retried elsewhere, no ban)",
    "spot_checks": "experts recomputed on a second replica",
    "spot_unresolved": "spot-check disputes nothing settled (the disputed answer was not used)",
    "spot_resolved_locally": "spot-check disputes settled by recomputing the expert on the coordinator",
    "spot_unverified": "sampled experts with no independent replica to check them",
    "nonfinite": "answers holding NaN or inf (refused)",
    "cheaters_banned": "peers proven wrong by spot checks",
    "banned_at_start": "peers still banned by earlier runs (trust store)",
    "bad_receipts": "answers whose signed receipt did not verify",
}


class DispatchCollector(Collector):
    def __init__(self, stats: DispatchStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"moe_swarm_{name}", doc, value=getattr(s, name))
        tokens = CounterMetricFamily("moe_swarm_tokens", "routed (token, slot) pairs by outcome", labels=["outcome"])
        for outcome in ("exact", "rerouted", "dropped"):
            tokens.add_metric([outcome], getattr(s, outcome))
        yield tokens
        latency = GaugeMetricFamily(
            "moe_swarm_layer_ms", "layer-call latency over the recent calls (ms)", labels=["layer", "quantile"]
        )
        for layer, recent in sorted(s.layer_ms.items()):
            for q in (50, 95, 99):
                latency.add_metric([str(layer), f"0.{q}"], percentile(recent, q))
        yield latency


def serve_metrics(stats: DispatchStats, port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics for `stats`; returns the bound port (0 picks one)."""
    registry = CollectorRegistry()
    registry.register(DispatchCollector(stats))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port
