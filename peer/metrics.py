"""Prometheus metrics of a peer (`moe-peer serve --metrics-port`): what it served, refused,
queued and how long it took. Its own registry, so several servicers in one process (tests)
never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# milliseconds: a loopback RPC is ~0.3 ms, a big expert batch on a slow device seconds
_MS_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class PeerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("moe_peer_requests", "Forward calls answered, by status", ["status"], registry=r)
        self.rows = Counter(
            "moe_peer_rows", "token rows answered, by expert and status", ["expert", "status"], registry=r
        )
        self.queued_rows = Gauge("moe_peer_queued_rows", "token rows admitted and not yet answered", registry=r)
        self.sessions = Gauge("moe_peer_sessions", "open sealed sessions", registry=r)
        self.relayed_requests = Counter(
            "moe_peer_relayed_requests", "Forward requests that arrived through a circuit relay", registry=r
        )
        self.relayed_bytes = Counter(
            "moe_peer_relayed_bytes", "message bytes through circuit relays, by direction", ["direction"], registry=r
        )
        self.batch_rows = Histogram(
            "moe_peer_batch_rows", "rows per merged device batch", buckets=_ROW_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "moe_peer_batch_requests", "requests per merged device batch", buckets=_ROW_BUCKETS, registry=r
        )
        self.compute_ms = Histogram(
            "moe_peer_compute_ms", "device time per batch (ms)", buckets=_MS_BUCKETS, registry=r
        )
        self.request_ms = Histogram(
            "moe_peer_request_ms", "arrival to answer per Forward (ms)", buckets=_MS_BUCKETS, registry=r
        )

    def batch(self, rows: int, requests: int, compute_ms: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)
        self.compute_ms.observe(compute_ms)

    def answered(self, status: str, segments: list[tuple[str, int]], ms: float) -> None:
        self.requests.labels(status).inc()
        for uid, rows in segments:
            self.rows.labels(uid, status).inc(rows)
        self.request_ms.observe(ms)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP; returns the bound port (0 picks one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
