"""Prometheus metrics scraped over HTTP from a real peer and a coordinator change as work is served."""

from __future__ import annotations

import urllib.request

import grpc
import torch
from prometheus_client.parser import text_string_to_metric_families

from coordinator.client import SwarmClient
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from protos import toy_model

from .conftest import TINY


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_peer_and_coordinator_metrics_follow_served_work(swarm, tmp_path):
    ckpt = tmp_path / "metrics"
    toy_model.save_checkpoint(ckpt, TINY, seed=51)
    uids = toy_model.read_manifest(ckpt).uids()[: TINY.num_experts]
    proc = swarm.start_peer(
        "metered", "--checkpoint", str(ckpt), "--experts", "0:*", "--metrics-port", "0", "--threads", "1"
    )
    port = proc.info["metrics_port"]
    try:
        assert ("moe_peer_requests_total", (("status", "OK"),)) not in scrape(port)  # nothing served yet
        with SwarmClient(swarm.initial_peers, uids, timeout=20, metrics_port=0) as client:
            client.wait_for_experts(timeout=30)
            x = torch.randn(5, TINY.hidden_dim)
            for _ in range(3):
                client.dispatch(x, torch.tensor([[0, 3]] * 5), uids, torch.float32)
            ours = scrape(client.metrics_port)
        with grpc.insecure_channel(proc.info["endpoint"]) as channel:  # one refusal, counted by status
            try:
                pb_grpc.ExpertServiceStub(channel).Forward(pb.ForwardRequest(), timeout=5)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        after = scrape(port)
    finally:
        swarm.stop(proc)
    assert after[("moe_peer_requests_total", (("status", "OK"),))] == 3  # one RPC per layer call
    assert after[("moe_peer_requests_total", (("status", "INVALID_ARGUMENT"),))] == 1
    assert after[("moe_peer_rows_total", (("expert", uids[0]), ("status", "OK")))] == 15
    assert after[("moe_peer_rows_total", (("expert", uids[3]), ("status", "OK")))] == 15
    assert after[("moe_peer_request_ms_count", ())] == 4
    assert after[("moe_peer_batch_rows_sum", ())] == 30
    assert after[("moe_peer_sessions", ())] == 1
    assert ours[("moe_swarm_layer_calls_total", ())] == 3
    assert ours[("moe_swarm_tokens_total", (("outcome", "exact"),))] == 30
    assert ours[("moe_swarm_layer_ms", (("layer", "0"), ("quantile", "0.50")))] > 0
