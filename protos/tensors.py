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


def encode(tensor: torch.Tensor) -> pb.Tensor:
    name = dtype_name(tensor.dtype)
    t = tensor.detach().to("cpu").contiguous()
    # view as bytes (1-D first: 0-dim tensors cannot change element size); works for bfloat16,
    # which numpy cannot represent
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=name, shape=list(t.shape), data=data)


def decode(msg: pb.Tensor, *, max_bytes: int | None = None) -> torch.Tensor:
    """Rebuild a tensor, refusing anything whose header and bytes disagree."""
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
    data = msg.data
    if len(data) != expected:
        raise TensorCodecError(
            f"tensor of shape {list(shape)} and dtype {msg.dtype} needs {expected} bytes, got {len(data)}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # the buffer is read-only protobuf bytes; nothing writes into a decoded input
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).view(shape)
