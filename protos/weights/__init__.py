"""Weights from the Hugging Face Hub: each side downloads only the bytes it serves.

`--model` is a local checkpoint folder or a Hub repo id (`org/name`, with a revision). From
the Hub a coordinator gets config, tokenizer and every non-expert tensor; a peer its experts'
tensors; both by ranged reads into a partial local folder that any checkpoint reader opens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from protos.weights.errors import WeightsError
from protos.weights.plan import COORDINATOR, PEER, FetchPlan, describe
from protos.weights.remote import HubCheckpoint

__all__ = [
    "COORDINATOR",
    "PEER",
    "FetchPlan",
    "HubCheckpoint",
    "WeightsError",
    "describe",
    "fetch_for_coordinator",
    "fetch_for_peer",
    "is_hub_id",
    "open_checkpoint",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(model: str | Path) -> bool:
    """A Hub repo id rather than a folder: `org/name`, and no such folder here (a folder wins)."""
    return not Path(model).exists() and bool(_REPO_ID.match(str(model))) and ".." not in str(model)


def open_checkpoint(repo: str, revision: str | None = None, cache_dir: str | Path | None = None) -> HubCheckpoint:
    """The repo pinned to a commit, with config, index and headers cached: its model id, experts
    and their sizes are known, and no tensor byte was downloaded."""
    return HubCheckpoint(repo, revision, cache_dir)


def fetch_for_peer(
    repo_or_path: str | Path,
    revision: str | None,
    experts: Iterable[tuple[int, int]],
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """A checkpoint folder holding (at least) the tensors of `experts` ((layer, expert) pairs).

    A local folder is returned as it is. From the Hub only the experts' byte spans are
    downloaded, those already cached are not: call it again with a new placement and it
    downloads the new experts only."""
    if not is_hub_id(repo_or_path):
        return Path(repo_or_path)
    hub = HubCheckpoint(str(repo_or_path), revision, cache_dir)
    hub.fetch(PEER, list(experts), progress)
    return hub.folder


def fetch_for_coordinator(
    repo_or_path: str | Path, revision: str | None, cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
    """A checkpoint folder with config, tokenizer and every tensor but the routed experts'."""
    if not is_hub_id(repo_or_path):
        return Path(repo_or_path)
    hub = HubCheckpoint(str(repo_or_path), revision, cache_dir)
    hub.fetch(COORDINATOR, progress=progress)
    return hub.folder
