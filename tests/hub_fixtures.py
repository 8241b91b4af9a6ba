"""Shared by the Hub tests: tiny checkpoints served by tests/hub_server.py to the real client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.models.tiny import build_tiny_model, build_tokenizer
from protos.hf_checkpoint import HFCheckpoint
from protos.weights.header import PREFIX, TensorEntry, header_length, parse_header
from protos.weights.spans import Span, coalesce, overlap

from .hub_server import HubServer, Transfer

SHARD = "300KB"  # a tiny Mixtral (~670 kB) in three shards


def save_sharded(path: Path, family: str = "mixtral", seed: int = 1, stacked: bool = False) -> Path:
    model = build_tiny_model(family, seed)
    model.save_pretrained(path, max_shard_size=SHARD, save_original_format=not stacked)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(name="hub")
def hub_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """A running server, and huggingface_hub in this process pointed at it (its constants are
    read at import: patched here as its own tests do; subprocess tests set HF_ENDPOINT)."""
    from huggingface_hub import constants

    with HubServer() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no stored login either
        yield server


def tensors_of(folder: Path) -> dict[str, dict[str, TensorEntry]]:
    """File -> tensor -> absolute byte span, from the real files' headers."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            n = header_length(f.read(PREFIX), file.stat().st_size, file.name)
            f.seek(0)
            out[file.name] = parse_header(f.read(n), file.name)
    return out


def expert_spans(folder: Path, pairs: list[tuple[int, int]] | None = None) -> dict[str, list[Span]]:
    """File -> byte spans of the routed experts (`pairs` only, or all)."""
    ckpt = HFCheckpoint(folder)
    entries = tensors_of(folder)
    out: dict[str, list[Span]] = {}
    for (layer, e), sources in ckpt.experts.items():
        if pairs is not None and (layer, e) not in pairs:
            continue
        for srcs in sources.values():
            for src in srcs:
                file = ckpt.key_files[src.key]
                entry = entries[file][src.key]
                out.setdefault(file, []).append(entry.slice_span(e) if src.stacked else entry.span)
    return {f: coalesce(s) for f, s in out.items()}


def header_bytes(folder: Path) -> int:
    return sum(min(e.span[0] for e in t.values()) for t in tensors_of(folder).values())


def sent_to(log: list[Transfer], suffix: str = ".safetensors") -> int:
    return sum(t.sent for t in log if t.file.endswith(suffix))


def sent_inside(log: list[Transfer], spans: dict[str, list[Span]]) -> int:
    """Bytes sent that fall inside `spans` (of their file)."""
    return sum(overlap([(t.start, t.start + t.sent)], spans.get(t.file, [])) for t in log)
