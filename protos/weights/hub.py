"""The Hub side, through huggingface_hub: pin a revision to a commit, fetch small files, ranged reads.

Honours huggingface_hub's settings as it reads them: HF_ENDPOINT (constants.ENDPOINT),
HF_TOKEN / the stored login (build_hf_headers), HF_HUB_CACHE, HF_HUB_OFFLINE, timeouts.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from protos.hf_checkpoint import SOURCE
from protos.plumbing.files import write_json_atomic
from protos.weights.errors import WeightsError, changed_under_commit
from protos.weights.spans import Span

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int
    sha256: str | None  # the LFS sha256; None for a file stored in git itself


@dataclass(frozen=True)
class Pinned:
    repo: str
    revision: str
    commit: str
    files: dict[str, HubFile]

    @property
    def weight_files(self) -> dict[str, HubFile]:
        return {n: f for n, f in self.files.items() if n.endswith(".safetensors")}


def pin(repo: str, revision: str, root: Path, endpoint: str, offline: bool) -> Pinned:
    """The revision resolved to a commit and the files there (with their sha256s), remembered
    under `root` so that HF_HUB_OFFLINE can resolve it again later."""
    if offline:
        return _pinned_from_cache(repo, revision, root)
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    files = {
        s.rfilename: HubFile(s.rfilename, int(s.lfs.size if s.lfs else s.size or 0), s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    }
    pinned = Pinned(repo, revision, str(info.sha), files)
    for f in pinned.weight_files.values():
        if f.sha256 is None:
            raise WeightsError(f"{repo}@{pinned.commit[:12]}: {f.name} is not stored with LFS: no sha256 to pin it by")
    _remember(pinned, root)
    return pinned


def _ref_file(root: Path, revision: str) -> Path:
    return root / "refs" / revision  # a branch may contain "/": nested, as huggingface_hub's cache does


def _remember(pinned: Pinned, root: Path) -> None:
    folder = root / pinned.commit
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / SOURCE
    files = {n: {"size": f.size, "sha256": f.sha256} for n, f in sorted(pinned.files.items())}
    if source.is_file():
        before = json.loads(source.read_text())["files"]
        for name, info in files.items():
            if name in before and before[name] != info:
                raise changed_under_commit(
                    pinned.repo, pinned.commit, name, f"sha256 {before[name]['sha256']} then {info['sha256']}"
                )
    write_json_atomic(source, {"repo": pinned.repo, "commit": pinned.commit, "files": files}, indent=1)
    if pinned.revision != pinned.commit:
        ref = _ref_file(root, pinned.revision)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(pinned.commit)


def _pinned_from_cache(repo: str, revision: str, root: Path) -> Pinned:
    ref = _ref_file(root, revision)
    commit = revision if COMMIT_RE.match(revision) else (ref.read_text().strip() if ref.is_file() else None)
    source = root / commit / SOURCE if commit else None
    if source is None or not source.is_file():
        raise WeightsError(
            f"HF_HUB_OFFLINE is set and {repo}@{revision} was never downloaded into {root}: "
            "unset it, or run once online"
        )
    files = json.loads(source.read_text())["files"]
    return Pinned(repo, revision, commit, {n: HubFile(n, i["size"], i["sha256"]) for n, i in files.items()})


def download_small(pinned: Pinned, name: str, dest: Path, hub_cache: Path, endpoint: str) -> None:
    """A whole small file (config, tokenizer, index), through huggingface_hub's own cache."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(pinned.repo, name, revision=pinned.commit, cache_dir=hub_cache, endpoint=endpoint)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp")
    shutil.copyfile(path, tmp)
    tmp.replace(dest)


class RangeReader:
    """GETs of byte ranges of one pinned file, each checked: the file's sha256 (ETag), the commit,
    the range and size the server says it sends, and the bytes it really sends."""

    def __init__(self, pinned: Pinned, endpoint: str) -> None:
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, get_session

        self.pinned, self.endpoint = pinned, endpoint
        self._url = lambda name: f"{endpoint}/{pinned.repo}/resolve/{pinned.commit}/{quote(name)}"
        self._headers = build_hf_headers()
        self._headers["Accept-Encoding"] = "identity"  # byte offsets are of the file itself
        self._session = get_session()
        self._timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT

    @contextmanager
    def stream(self, name: str, span: Span) -> Iterator[Iterator[bytes]]:
        """Chunks of exactly `span` of `name`; raises WeightsError if the server sends anything else."""
        from huggingface_hub.utils import hf_raise_for_status

        file = self.pinned.files[name]
        start, end = span
        headers = {**self._headers, "Range": f"bytes={start}-{end - 1}"}
        with self._session.stream(
            "GET", self._url(name), headers=headers, follow_redirects=True, timeout=self._timeout
        ) as response:
            if response.status_code >= 400:
                response.read()
                hf_raise_for_status(response)
            self._check(response, file, span)
            yield self._body(response, name, span)

    def read(self, name: str, span: Span) -> bytes:
        with self.stream(name, span) as chunks:
            return b"".join(chunks)

    def _check(self, response, file: HubFile, span: Span) -> None:
        repo, commit = self.pinned.repo, self.pinned.commit
        for r in [*response.history, response]:
            served_commit = r.headers.get("X-Repo-Commit")
            if served_commit and served_commit != commit:
                raise changed_under_commit(repo, commit, file.name, f"the server answered for commit {served_commit}")
            etag = _normalize_etag(r.headers.get("X-Linked-Etag") or r.headers.get("ETag"))
            if _SHA256_RE.match(etag):
                if etag != file.sha256:
                    raise changed_under_commit(repo, commit, file.name, f"sha256 {file.sha256} then ETag {etag}")
                break
        if response.status_code != 206:
            raise WeightsError(
                f"{self.endpoint} answered {response.status_code} to a range request for {file.name}: "
                "it must serve byte ranges (206 Partial Content)"
            )
        got = response.headers.get("Content-Range", "")
        want = f"bytes {span[0]}-{span[1] - 1}/{file.size}"
        if got != want:
            if got.rsplit("/", 1)[-1] != str(file.size):
                raise changed_under_commit(repo, commit, file.name, f"{file.size} bytes, then {got!r}")
            raise WeightsError(f"{file.name}: truncated range response: asked for {want!r}, the server sent {got!r}")

    def _body(self, response, name: str, span: Span) -> Iterator[bytes]:
        want = span[1] - span[0]
        got = 0
        for chunk in response.iter_bytes():  # as received: a dropped connection loses no buffered bytes
            chunk = chunk[: want - got]
            got += len(chunk)
            yield chunk
        if got < want:
            raise WeightsError(
                f"{name}: truncated range response: {got} of {want} bytes of {span[0]}-{span[1] - 1}; "
                "run again to resume"
            )


def _normalize_etag(etag: str | None) -> str:
    return (etag or "").removeprefix("W/").strip('"')
