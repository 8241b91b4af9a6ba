"""A safetensors file's header: where each tensor's bytes are, and an expert's slice of a stacked one."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from protos.weights.errors import WeightsError
from protos.weights.spans import Span

PREFIX = 8  # little-endian u64: the JSON header's length
MAX_HEADER = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    span: Span  # absolute offsets in the file

    def slice_span(self, index: int) -> Span:
        """Bytes of [index] along the first dimension: contiguous in a row-major tensor."""
        if not self.shape or not 0 <= index < self.shape[0]:
            raise WeightsError(f"slice [{index}] of a tensor of shape {list(self.shape)}")
        row = (self.span[1] - self.span[0]) // self.shape[0]
        return self.span[0] + index * row, self.span[0] + (index + 1) * row

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def header_length(prefix: bytes, file_size: int, name: str) -> int:
    """Bytes of prefix + JSON header, from the first 8 bytes."""
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER or PREFIX + n > file_size:
        raise WeightsError(f"{name}: not a safetensors file (header length {n} for a file of {file_size} bytes)")
    return PREFIX + n


def parse_header(blob: bytes, name: str) -> dict[str, TensorEntry]:
    """Tensor name -> entry, from the file's first header_length() bytes."""
    try:
        doc = json.loads(blob[PREFIX:])
    except ValueError:
        raise WeightsError(f"{name}: not a safetensors file (its header is not JSON)") from None
    base = len(blob)
    out = {}
    for key, info in doc.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[key] = TensorEntry(info["dtype"], tuple(info["shape"]), (base + start, base + end))
    return out
