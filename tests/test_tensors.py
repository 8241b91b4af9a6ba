from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import tensors
from protos.limits import MAX_NDIM
from protos.tensors import TensorCodecError

pytestmark = pytest.mark.unit  # pure logic: the fast subset


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(sorted(tensors.DTYPES)),
    shape=st.lists(st.integers(0, 17), min_size=0, max_size=MAX_NDIM),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_is_bit_exact(dtype, shape, seed):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(tensors.DTYPES[dtype])
    back = tensors.decode(tensors.encode(t))
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_non_contiguous_input_is_encoded_in_logical_order():
    t = torch.arange(12, dtype=torch.float32).view(3, 4).T
    assert torch.equal(tensors.decode(tensors.encode(t)), t)


@pytest.mark.parametrize(
    ("msg", "words"),
    [
        (dict(dtype="int64", shape=[1], data=b"\0" * 8), "unknown dtype"),
        (dict(dtype="float32", shape=[2, 2], data=b"\0" * 12), "needs 16 bytes, got 12"),
        (dict(dtype="float32", shape=[1, 1, 1, 1, 1], data=b"\0" * 4), "dimensions"),
        (dict(dtype="float32", shape=[-1, 4], data=b""), "negative"),
        (dict(dtype="float32", shape=[1 << 20, 1 << 20], data=b""), "limit"),
    ],
)
def test_decode_refuses_inconsistent_messages(msg, words):
    from protos import expert_service_pb2 as pb

    with pytest.raises(TensorCodecError, match=words):
        tensors.decode(pb.Tensor(**msg), max_bytes=1 << 30)


def test_unsupported_dtype_is_refused_on_encode():
    with pytest.raises(TensorCodecError, match="not supported"):
        tensors.encode(torch.zeros(2, dtype=torch.int64))


@settings(max_examples=80, deadline=None)
@given(
    dtype=st.sampled_from(sorted(tensors.DTYPES)),
    size=st.integers(0, 300),
    bad=st.lists(st.tuples(st.integers(0, 299), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_all_finite_agrees_with_torch_for_every_wire_dtype(dtype, size, bad, seed):
    """The bytes check a coordinator runs on every answer: the same verdict as torch.isfinite,
    for NaN and both infinities, including bfloat16 (whose bits numpy reads as integers)."""
    t = (torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 1e3).to(tensors.DTYPES[dtype])
    for i, value in bad:
        if i < size:
            t[i] = value
    _, _, data = tensors.payload(t)
    assert tensors.all_finite(data, t.dtype) == bool(torch.isfinite(t).all())
