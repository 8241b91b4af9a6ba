"""One weight file of a partial download: a sparse local file of the full size plus a ledger.

The file holds the real bytes where they were downloaded and holes elsewhere, so safetensors
and transformers open the folder as a normal checkpoint and touch only the bytes they read.
The ledger (JSON, written atomically) lists the byte ranges held: a restart resumes from it
and never downloads them again. It is written after the bytes it lists are synced, so a crash
can lose the record of some bytes (they are downloaded again), never claim bytes that are not there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from protos.plumbing.files import write_json_atomic
from protos.weights.spans import Span, coalesce, subtract, total

LEDGER_DIR = ".moe-swarm"


class PartialFile:
    def __init__(self, folder: Path, name: str, size: int, sha256: str) -> None:
        self.path = folder / name
        self.ledger = folder / LEDGER_DIR / f"{name}.json"
        self.name, self.size, self.sha256 = name, size, sha256
        self.header_len: int | None = None
        self.held: list[Span] = []
        self._fd: int | None = None  # open while bytes stream in; closed by save()
        if self.ledger.is_file():
            doc = json.loads(self.ledger.read_text())
            if (doc["size"], doc["sha256"]) != (size, sha256):
                from protos.weights.errors import WeightsError

                raise WeightsError(
                    f"{self.ledger}: cached for a file of {doc['size']} bytes, sha256 {doc['sha256'][:12]}; the "
                    f"pinned commit says {size} bytes, sha256 {sha256[:12]} (remove the cache folder to start over)"
                )
            self.header_len = doc["header_len"]
            self.held = [tuple(s) for s in doc["held"]]  # type: ignore[misc]
            if not self.path.is_file() or self.path.stat().st_size != size:
                self.held, self.header_len = [], None  # the data file went away: the ledger means nothing

    def missing(self, spans: list[Span]) -> list[Span]:
        return subtract(spans, self.held)

    @property
    def held_bytes(self) -> int:
        return total(self.held)

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size != self.size:
                os.ftruncate(self._fd, self.size)  # sparse: takes no disk until written
        return self._fd

    def write(self, offset: int, data: bytes | memoryview) -> None:
        fd = self._open()
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
        self.held = coalesce([*self.held, (offset, offset + len(data))])

    def read(self, span: Span) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(span[0])
            return f.read(span[1] - span[0])

    def save(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)  # the bytes reach the disk before the ledger that lists them
            os.close(self._fd)
            self._fd = None
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        doc = {"size": self.size, "sha256": self.sha256, "header_len": self.header_len, "held": self.held}
        write_json_atomic(self.ledger, doc)
