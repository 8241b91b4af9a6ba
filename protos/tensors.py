"""torch tensor <-> wire Tensor message, with explicit dtype, shape and size checks.

Encoding costs one copy (protobuf `bytes` must own its buffer); decoding wraps the
message's bytes without another copy.
"""

from __future__ import annotations

import math
import warnings

import torch

from protos import expert_service_pb2 as pb

# Wire names are stable; never reuse one for another dtype.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_NDIM = 4
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
    """(dtype name, shape, a zero-copy view of the raw bytes) of a CPU tensor."""
    name = dtype_name(tensor.dtype)
    t = tensor.detach().to("cpu").contiguous()
    # view as bytes (1-D first: 0-dim tensors cannot change element size); works for bfloat16,
    # which numpy cannot represent
    data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
    return name, list(t.shape), data


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
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if max_bytes is not None and expected > max_bytes:
        raise TensorCodecError(f"tensor of shape {list(shape)} needs {expected} bytes; the limit is {max_bytes}")
    return dtype, shape, expected


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
