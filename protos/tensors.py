"""torch tensor <-> wire Tensor message, with explicit dtype, shape and size checks.

Encoding costs one copy (protobuf `bytes` must own its buffer); decoding wraps the
message's bytes without another copy.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from protos import expert_service_pb2 as pb
from protos.limits import MAX_NDIM

# Wire names are stable; never reuse one for another dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# Decoded inputs wrap the message's read-only bytes and nothing writes into them. Filtered
# once here: catch_warnings() per call would race between the loop and compute threads.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class TensorCodecError(ValueError):
    """The message does not describe a valid tensor; the text says why."""


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TensorCodecError(f"dtype {dtype} is not supported on the wire; use one of {sorted(DTYPES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise TensorCodecError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def payload(tensor: torch.Tensor) -> tuple[str, list[int], memoryview]:
    """(dtype name, shape, a zero-copy view of the raw bytes) of a tensor (copied off a device
    or out of a strided view first). Few ops: this runs twice per request on a peer."""
    name = dtype_name(tensor.dtype)
    t = tensor if tensor.device.type == "cpu" and tensor.is_contiguous() else tensor.detach().cpu().contiguous()
    if not t.numel():
        return name, list(t.shape), memoryview(b"")
    if t.requires_grad:
        t = t.detach()
    # numpy has no bfloat16: its bits go out as int16, same bytes
    array = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return name, list(t.shape), memoryview(array.reshape(-1)).cast("B")


def encode(tensor: torch.Tensor) -> pb.Tensor:
    name, shape, data = payload(tensor)
    return pb.Tensor(dtype=name, shape=shape, data=data.tobytes())


def check_header(msg: pb.Tensor, *, max_bytes: int | None = None) -> tuple[torch.dtype, tuple[int, ...], int]:
    """(dtype, shape, payload bytes) a tensor message announces, refusing impossible headers."""
    dtype = dtype_from_name(msg.dtype)
    shape = tuple(msg.shape)
    if len(shape) > MAX_NDIM:
        raise TensorCodecError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} are allowed")
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"tensor shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    if max_bytes is not None and expected > max_bytes:
        raise TensorCodecError(f"tensor of shape {list(shape)} needs {expected} bytes; the limit is {max_bytes}")
    return dtype, shape, expected


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float16: np.float16}
_BF16_EXPONENT = 0x7F80  # all ones: inf or NaN (numpy has no bfloat16, so its bits are read)


def all_finite(data: bytes | memoryview, dtype: torch.dtype) -> bool:
    """No NaN or inf among the raw values of `data`. numpy's check on the bytes as they came:
    a tenth of the cost of torch.isfinite(...).all(), at any size."""
    if dtype == torch.bfloat16:
        return not bool((np.frombuffer(data, np.uint16) & _BF16_EXPONENT == _BF16_EXPONENT).any())
    return bool(np.isfinite(np.frombuffer(data, _NUMPY_FLOATS[dtype])).all())


def from_bytes(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Wraps `data` (whose length the caller checked) without a copy."""
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).view(shape)


def decode(msg: pb.Tensor, *, max_bytes: int | None = None) -> torch.Tensor:
    """Rebuild a tensor, refusing anything whose header and bytes disagree."""
    dtype, shape, expected = check_header(msg, max_bytes=max_bytes)
    if len(msg.data) != expected:
        raise TensorCodecError(
            f"tensor of shape {list(shape)} and dtype {msg.dtype} needs {expected} bytes, got {len(msg.data)}"
        )
    return from_bytes(msg.data, dtype, shape)
