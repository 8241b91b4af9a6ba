"""The peer's expert compute equals Mixtral's SwiGLU expert for any segment layout."""

from __future__ import annotations

import pytest
import torch

from peer.backends.toy import HostedExperts, padded_span
from protos import toy_model
from protos.records import expert_uid
from protos.toy_model import ToyConfig

from .conftest import CUDA


@pytest.fixture
def torch_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.unit
@pytest.mark.parametrize("ffn", [48, 30])  # 30: not 16-byte aligned, takes the per-expert loop
@pytest.mark.parametrize(
    "layout",
    [
        [(0, 0, 3), (0, 2, 1), (0, 3, 5)],  # what coordinators send: one layer, increasing experts
        [(0, 3, 2), (0, 1, 4)],  # out of order
        [(0, 1, 2), (0, 1, 3)],  # the same expert twice
        [(1, 0, 2), (0, 2, 2), (1, 3, 1)],  # several layers in one request
        [(0, 0, 4), (0, 1, 3), (0, 2, 4), (0, 3, 4)],  # balanced: one padded batched GEMM on CPU threads
        [(0, 0, 6), (0, 1, 6), (0, 3, 6)],  # padded, with an expert without rows inside the span
    ],
)
@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True)  # 2: padded batched GEMMs where they pay
def test_forward_equals_reference(ffn, layout, torch_threads):
    cfg = ToyConfig(num_layers=2, num_experts=4, hidden_dim=16, ffn_dim=ffn)
    got, want = _forward_and_reference(cfg, layout, "cpu")
    assert (got - want).abs().max().item() <= 1e-5


def _forward_and_reference(cfg: ToyConfig, layout, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The peer's output for `layout` ((layer, expert, rows) segments) on `device`, and Mixtral's
    SwiGLU expert in float64 on the same (dtype-rounded) weights and inputs."""
    state = toy_model.build_state_dict(cfg, seed=3)
    hosted = HostedExperts.from_seed(cfg, 3, "*:0-3", torch.device(device))
    segments = [(expert_uid(hosted.model_id, layer, e), rows) for layer, e, rows in layout]
    x = torch.randn(sum(r for _, _, r in layout), cfg.hidden_dim, generator=torch.Generator().manual_seed(0))
    x = x.to(cfg.torch_dtype)
    got = hosted.forward(x, segments)
    assert got.device.type == "cpu" and got.dtype == cfg.torch_dtype  # answers leave the device
    want, start = [], 0
    for layer, e, rows in layout:
        ws = [state[toy_model.expert_key(layer, e, p)].double() for p in toy_model.EXPERT_PARAMS]
        want.append(toy_model.swiglu_expert(x[start : start + rows].double(), *ws))
        start += rows
    return got.double(), torch.cat(want)


# Half-precision experts on CPU and, where there is one, the CUDA path (grouped GEMM for aligned
# widths, the per-expert loop for others): output within the dtype's rounding of the float64 math.
@pytest.mark.unit
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("ffn", [64, 30])
@pytest.mark.parametrize(
    "layout",
    [
        [(0, 0, 3), (0, 2, 1), (0, 3, 5)],
        [(0, 3, 2), (0, 1, 4)],
        [(1, 0, 40), (0, 2, 1), (1, 3, 17)],
        [(0, 0, 6), (0, 1, 6), (0, 3, 6)],
    ],
)
def test_forward_on_each_device_and_dtype(device, dtype, ffn, layout):
    cfg = ToyConfig(num_layers=2, num_experts=4, hidden_dim=64, ffn_dim=ffn, dtype=dtype)
    got, want = _forward_and_reference(cfg, layout, device)
    # float32: the 1e-5 the swarm promises; 16-bit: a few ulps of the output's scale
    tolerance = 1e-5 if dtype == "float32" else 3 * torch.finfo(cfg.torch_dtype).eps * want.abs().max().item()
    assert (got - want).abs().max().item() <= tolerance


@pytest.mark.unit
def test_padding_is_bounded():
    assert padded_span([4, 3, 4, 4], threads=2) == (0, 4, 4)
    assert padded_span([6, 6, 0, 6], threads=2) == (0, 4, 6)  # 24 padded rows for 18 real ones
    assert padded_span([0, 5, 0, 4, 0], threads=2) is None  # 15 for 9: over the 1.5x bound
    assert padded_span([4, 3, 4, 4], threads=1) is None  # one thread: nothing runs side by side
    assert padded_span([0, 7, 0], threads=2) is None  # one expert: nothing to batch
    assert padded_span([1, 1, 1, 12], threads=2) is None  # 48 padded rows for 15 real ones


@pytest.mark.unit
def test_only_assigned_experts_are_loaded(tmp_path):
    cfg = ToyConfig(num_layers=2, num_experts=4, hidden_dim=16, ffn_dim=32)
    toy_model.save_checkpoint(tmp_path, cfg, seed=1)
    hosted = HostedExperts.from_checkpoint(tmp_path, "1:2-3", torch.device("cpu"))
    assert [toy_model.read_manifest(tmp_path).uids().index(u) for u in hosted.uids] == [6, 7]
    assert list(hosted.layers) == [1] and hosted.layers[1].w13.shape == (2, 16, 64)


@pytest.mark.unit
def test_tampered_weights_are_refused(tmp_path):
    cfg = ToyConfig(num_layers=1, num_experts=2, hidden_dim=8, ffn_dim=8)
    toy_model.save_checkpoint(tmp_path, cfg, seed=1)
    other = toy_model.build_state_dict(cfg, seed=2)
    from safetensors.torch import save_file

    save_file(other, str(tmp_path / toy_model.WEIGHTS))  # same names and shapes, other values
    with pytest.raises(ValueError, match="manifest digest"):
        HostedExperts.from_checkpoint(tmp_path, "*", torch.device("cpu"))


@pytest.mark.unit
def test_merged_requests_equal_separate_ones():
    from peer.batcher import merged_forward

    cfg = ToyConfig(num_layers=2, num_experts=4, hidden_dim=16, ffn_dim=32)
    hosted = HostedExperts.from_seed(cfg, 3, "*", torch.device("cpu"))
    uid = lambda layer, e: expert_uid(hosted.model_id, layer, e)  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    requests = [
        (torch.randn(5, 16, generator=gen), [(uid(0, 1), 2), (uid(0, 3), 3)]),
        (torch.randn(4, 16, generator=gen), [(uid(0, 0), 1), (uid(0, 1), 3)]),
        (torch.randn(3, 16, generator=gen), [(uid(1, 2), 3)]),
    ]
    merged = merged_forward(hosted, requests)
    for (x, segments), got in zip(requests, merged, strict=True):
        assert (got - hosted.forward(x, segments)).abs().max().item() <= 1e-5


@pytest.mark.unit
def test_micro_batcher_merges_what_queues_while_busy():
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from peer.batcher import MicroBatcher

    cfg = ToyConfig(num_layers=1, num_experts=4, hidden_dim=64, ffn_dim=256)
    hosted = HostedExperts.from_seed(cfg, 3, "*", torch.device("cpu"))
    uids = hosted.uids
    xs = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)) for i in range(12)]

    async def run():
        batcher = MicroBatcher(hosted, ThreadPoolExecutor(1), max_batch_rows=4096)
        outs = await asyncio.gather(*(batcher.submit(x, [(uids[i % 4], 64)], None) for i, x in enumerate(xs)))
        batcher.cancel()
        return batcher, outs

    batcher, outs = asyncio.run(run())
    assert batcher.batched_requests == 12 and batcher.batches < 12  # requests shared batches
    for i, (x, (out, _, _)) in enumerate(zip(xs, outs, strict=True)):
        assert (out - hosted.forward(x, [(uids[i % 4], 64)])).abs().max().item() <= 1e-5



@pytest.mark.unit
def test_an_idle_batcher_answers_a_small_cpu_request_without_queueing_it():
    """Once the per-row cost is known, a decode step's request on an idle CPU peer is computed
    inside submit (the coroutine finishes without yielding to the loop); a request that arrives
    while a batch computes still queues and joins the next batch."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from peer.batcher import MicroBatcher

    cfg = ToyConfig(num_layers=1, num_experts=4, hidden_dim=16, ffn_dim=32)
    hosted = HostedExperts.from_seed(cfg, 3, "*", torch.device("cpu"))
    uids = hosted.uids
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    segments = [(uids[1], 1), (uids[3], 1)]
    gate = threading.Event()

    async def run():
        batcher = MicroBatcher(hosted, ThreadPoolExecutor(1))
        for _ in range(50):  # the first batches teach it the per-row cost
            await batcher.submit(x, segments, None)
        coro = batcher.submit(x, segments, None)
        with pytest.raises(StopIteration) as finished:
            coro.send(None)  # done on the first step: never queued, never waited
        inline = finished.value.value
        # a batch computing on the executor makes the batcher busy: what arrives meanwhile queues
        batcher.experts = _Blocking(hosted, gate)
        big = asyncio.ensure_future(batcher.submit(torch.randn(4096, 16), [(uids[0], 4096)], None))
        await asyncio.sleep(0.05)
        small = asyncio.ensure_future(batcher.submit(x, segments, None))
        await asyncio.sleep(0.05)
        assert not small.done()  # waiting in the queue behind the busy device
        gate.set()
        await asyncio.gather(big, small)
        batcher.cancel()
        return inline, small.result()

    inline, queued = asyncio.run(run())
    for out, _, _ in (inline, queued):
        assert torch.equal(out, hosted.forward(x, segments))
    assert inline[1] < queued[1]


class _Blocking:
    """Experts whose forward waits for `gate` (to hold a batch on the executor)."""

    def __init__(self, experts, gate) -> None:
        self._experts, self._gate = experts, gate
        self.device = experts.device
        self.slots = experts.slots

    def forward(self, x, segments):
        if x.shape[0] > 64:
            self._gate.wait(10)
        return self._experts.forward(x, segments)

def test_throughput_is_measured_once_per_device_and_shape(tmp_path):
    from peer.selfbench import cached_throughput

    cfg = ToyConfig(num_layers=1, num_experts=2, hidden_dim=16, ffn_dim=32)
    hosted = HostedExperts.from_seed(cfg, 3, "*", torch.device("cpu"))
    calls = []  # full measurements (the start-up probe is one repeat)
    hosted.measure_throughput = lambda rows=128, repeats=3: (repeats > 1 and calls.append(1)) or 1000.0
    cache = tmp_path / "throughput.json"
    first = cached_throughput(hosted, cache)
    assert first > 0 and cached_throughput(hosted, cache) == first and len(calls) == 1
    other = HostedExperts.from_seed(
        ToyConfig(num_layers=1, num_experts=2, hidden_dim=16, ffn_dim=64), 3, "*", torch.device("cpu")
    )
    cached_throughput(other, cache)  # another shape: measured, stored beside the first
    assert len(__import__("json").loads(cache.read_text())) == 2


def test_a_stale_or_implausible_throughput_is_measured_again(tmp_path):
    import json

    from peer.selfbench import MAX_AGE_S, cached_throughput

    cfg = ToyConfig(num_layers=1, num_experts=2, hidden_dim=16, ffn_dim=32)
    hosted = HostedExperts.from_seed(cfg, 3, "*", torch.device("cpu"))
    full = []  # full measurements; the probe (one repeat) agrees with them: timing noise is not under test here
    hosted.measure_throughput = lambda rows=128, repeats=3: (repeats > 1 and full.append(1)) or 1000.0
    cache = tmp_path / "throughput.json"
    now = 1e9
    value = cached_throughput(hosted, cache, now=now)
    assert cached_throughput(hosted, cache, now=now + 60) == value and len(full) == 1  # fresh and plausible
    cached_throughput(hosted, cache, now=now + MAX_AGE_S + 1)  # a week later
    assert len(full) == 2
    cached_throughput(hosted, cache, now=now + MAX_AGE_S + 2, remeasure=True)  # asked to
    assert len(full) == 3
    (key,) = json.loads(cache.read_text())
    for wrong in ({"tokens_per_s": value * 100, "measured_at": now}, value):  # 100x off; a bare number, undated
        cache.write_text(json.dumps({key: wrong}))
        assert cached_throughput(hosted, cache, now=now + 1) == 1000.0
    assert len(full) == 5
