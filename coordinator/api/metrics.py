"""Prometheus metrics of the gateway, with the dispatcher's own (coordinator/ops/metrics.py) in
the same registry: GET /metrics on the API's port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from coordinator.dispatch.stats import DispatchStats
from coordinator.ops.metrics import DispatchCollector

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ApiMetrics:
    def __init__(self, stats: DispatchStats | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moe_swarm_api_requests", "API requests answered, by endpoint and HTTP status", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("moe_swarm_api_prompt_tokens", "prompt tokens admitted", registry=r)
        self.completion_tokens = Counter("moe_swarm_api_completion_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("moe_swarm_api_cancelled", "sequences whose client went away mid-way", registry=r)
        self.steps = Counter("moe_swarm_api_steps", "batch steps run (one forward per active sequence)", registry=r)
        self.ttft = Histogram(
            "moe_swarm_api_ttft_seconds", "time to first token (queue + prefill + first step)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token = Histogram(
            "moe_swarm_api_inter_token_seconds", "time between a sequence's successive tokens",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "moe_swarm_api_batch_size", "sequences in a step", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "moe_swarm_api_batch_rows", "tokens fed in a step (decode + prefill chunks)", buckets=_SIZE_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("moe_swarm_api_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("moe_swarm_api_active_sequences", "sequences in the running batch", registry=r)
        self.kv_reserved = Gauge(
            "moe_swarm_api_kv_reserved_tokens", "KV cache positions reserved by active sequences", registry=r
        )
        if stats is not None:
            r.register(DispatchCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
