"""Shared fixtures: a tiny seeded checkpoint and a real local swarm (processes on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch

from coordinator.client import SwarmClient
from coordinator.sim.local_swarm import LocalSwarm
from protos import toy_model
from protos.toy_model import ToyConfig

# hidden 64 keeps compute tiny; 8 experts, top-2 like Mixtral
TINY = ToyConfig(num_layers=2, num_experts=8, hidden_dim=64, ffn_dim=128, top_k=2)
REFRESH_PERIOD = 1.0
PEER_SPECS = {"peer-a": "*:0-3", "peer-b": "*:4-7"}
MAX_ROWS = 4096
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# tests of the GPU path: they run where torch sees a CUDA device (coordinator/bench/gpu_check.sh), skip elsewhere
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # the test process shares 2 cores with the peers it starts (see coordinator/cli.py)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    toy_model.save_checkpoint(path, TINY, seed=7)
    return path


@pytest.fixture(scope="session")
def swarm(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as s:
        s.start_bootstrap()
        for name, spec in PEER_SPECS.items():
            s.start_peer(
                name,
                "--checkpoint",
                str(tiny_checkpoint),
                "--experts",
                spec,
                "--threads",
                "1",
                "--announce-period",
                "2",
                "--max-rows",
                str(MAX_ROWS),
                "--max-message-bytes",
                str(MAX_MESSAGE_BYTES),
            )
        yield s


@pytest.fixture(scope="session")
def client(swarm: LocalSwarm, tiny_checkpoint: Path):
    uids = toy_model.read_manifest(tiny_checkpoint).uids()
    with SwarmClient(swarm.initial_peers, uids, refresh_period=REFRESH_PERIOD, timeout=20) as c:
        c.wait_for_experts(timeout=60)
        yield c


def peer(swarm: LocalSwarm, name: str):
    return next(p for p in swarm.processes if p.name == name)


@pytest.fixture(scope="session")
def stub(swarm: LocalSwarm):
    """A blocking stub to peer-a; the client side allows bigger messages than the peer, so the
    peer's own limits are what refuse."""
    import grpc

    from protos import expert_service_pb2_grpc as pb_grpc
    from protos.limits import grpc_options

    channel = grpc.insecure_channel(peer(swarm, "peer-a").info["endpoint"], options=grpc_options(64 << 20))
    yield pb_grpc.ExpertServiceStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def uid(tiny_checkpoint: Path) -> str:
    return toy_model.read_manifest(tiny_checkpoint).uids()[0]  # layer 0 expert 0: hosted by peer-a


def local_model(ckpt: Path):
    """The transformers model of a checkpoint, run locally: the reference for swarm generation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, experts_implementation="eager").eval()


def greedy(model, ids: torch.Tensor, n: int = 20) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))


@contextlib.contextmanager
def _no_processes(item: pytest.Item) -> Iterator[None]:
    """`-m unit` is the fast subset (`make test-fast`): pure logic, no processes. A test marked
    unit that starts one (a subprocess, or a fork such as a DHT node's), in its body or in any
    fixture it sets up, fails here: the subset stays fast by construction, not by convention."""
    if item.get_closest_marker("unit") is None:
        yield
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{item.nodeid} is marked unit but starts a process")

    with (
        mock.patch.object(subprocess.Popen, "_execute_child", refuse),
        mock.patch.object(os, "fork", refuse),
        mock.patch.object(os, "posix_spawn", refuse),
    ):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _no_processes(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _no_processes(item):
        yield
