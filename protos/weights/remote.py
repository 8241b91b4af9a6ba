"""A Hub repo at a pinned commit, downloaded into a partial local checkpoint folder.

The folder sits under huggingface_hub's cache (HF_HUB_CACHE/moe-swarm/models--org--name/
COMMIT): config, index and tokenizer files whole; each safetensors file sparse, with its
real header and only the tensor bytes some side on this machine needed (see partial.py).
HFCheckpoint, safetensors and transformers read it as any checkpoint folder.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

from protos.hf_checkpoint import HFCheckpoint, load_manifest
from protos.weights.errors import WeightsError, changed_under_commit, hub_errors
from protos.weights.header import PREFIX, TensorEntry, header_length, parse_header
from protos.weights.hub import Pinned, RangeReader, download_small, pin
from protos.weights.partial import PartialFile
from protos.weights.plan import COORDINATOR, PEER, FetchPlan, FilePlan, human, percent
from protos.weights.spans import Span, coalesce, total

INDEX = "model.safetensors.index.json"
# what a coordinator needs whole besides config and index: tokenizer and generation defaults
_COORDINATOR_FILES = re.compile(
    r"^(generation_config\.json|tokenizer[^/]*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)"
    r"|merges\.txt|[^/]*\.model|[^/]*\.tiktoken|chat_template\.(jinja|json))$"
)
SAVE_EVERY = 64 << 20  # ledger written at least this often while streaming (bytes lost to a crash, at most)
DISK_MARGIN = 256 << 20  # left free after a download


class HubCheckpoint:
    def __init__(self, repo: str, revision: str | None = None, cache_dir: str | Path | None = None) -> None:
        from huggingface_hub import constants

        self.repo, self.revision = repo, revision or "main"
        self.hub_cache = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
        self.endpoint = constants.ENDPOINT
        self.offline = constants.is_offline_mode()
        self.root = self.hub_cache / "moe-swarm" / f"models--{repo.replace('/', '--')}"
        self.retries, self.retry_wait = 2, 1.0  # transient network errors within one run
        self.fetched = 0  # bytes this instance read from the network, headers included
        self._reported = 0  # of which the last fetch() reported
        with hub_errors(repo, self.revision, self.endpoint):
            self.pinned: Pinned = pin(repo, self.revision, self.root, self.endpoint, self.offline)
        self.commit = self.pinned.commit
        self.folder = self.root / self.commit
        self._reader = None if self.offline else RangeReader(self.pinned, self.endpoint)
        self._fresh_headers: set[str] = set()  # read from the network by this instance: no need to re-check
        with self._lock():
            self._get_small(self._meta_files())
            names = self._weight_file_names()
            missing = [n for n in names if n not in self.pinned.weight_files]
            if missing:
                raise WeightsError(f"{repo}@{self.commit[:12]}: the index names files the repo lacks: {missing}")
            self.files = {
                n: PartialFile(self.folder, n, self.pinned.files[n].size, str(self.pinned.files[n].sha256))
                for n in names
            }
            for pf in self.files.values():
                self._ensure_header(pf)
        self.checkpoint = HFCheckpoint(self.folder)  # CheckpointError: not an MoE checkpoint
        self.model_id = load_manifest(self.checkpoint).model_id  # from the Hub's sha256s: no hashing
        self.tensors: dict[str, dict[str, TensorEntry]] = {
            n: parse_header(pf.read((0, pf.header_len or 0)), n) for n, pf in self.files.items()
        }

    @property
    def checkpoint_bytes(self) -> int:
        return sum(pf.size for pf in self.files.values())

    def _lock(self):
        from huggingface_hub.utils import WeakFileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return WeakFileLock(self.root / f"{self.commit}.lock")

    def _meta_files(self) -> list[str]:
        if "config.json" not in self.pinned.files:
            raise WeightsError(f"{self.repo}@{self.commit[:12]}: no config.json: not a transformers checkpoint")
        return ["config.json"] + ([INDEX] if INDEX in self.pinned.files else [])

    def _small_files(self, side: str) -> list[str]:
        extra = [n for n in self.pinned.files if _COORDINATOR_FILES.match(n)] if side == COORDINATOR else []
        return sorted(set(self._meta_files()) | set(extra))

    def _get_small(self, names: list[str]) -> int:
        todo = [n for n in names if not (self.folder / n).is_file()]
        if todo and self.offline:
            raise WeightsError(f"HF_HUB_OFFLINE is set and the cache of {self.repo}@{self.commit[:12]} lacks {todo}")
        with hub_errors(self.repo, self.revision, self.endpoint):
            for n in todo:
                download_small(self.pinned, n, self.folder / n, self.hub_cache, self.endpoint)
        return sum(self.pinned.files[n].size for n in todo)

    def _weight_file_names(self) -> list[str]:
        import json

        if (self.folder / INDEX).is_file():
            HFCheckpoint(self.folder)  # the index alone says whether this is an MoE checkpoint: before any header
            return sorted(set(json.loads((self.folder / INDEX).read_text())["weight_map"].values()))
        weights = self.pinned.weight_files
        if not weights:
            raise WeightsError(f"{self.repo}@{self.commit[:12]}: no *.safetensors files (moe-swarm reads safetensors)")
        return ["model.safetensors"] if "model.safetensors" in weights else sorted(n for n in weights if "/" not in n)

    def _ensure_header(self, pf: PartialFile) -> None:
        if pf.header_len is not None:
            return
        if self._reader is None:
            raise WeightsError(f"HF_HUB_OFFLINE is set and the cache lacks the header of {pf.name}")
        with hub_errors(self.repo, self.revision, self.endpoint):
            prefix = self._reader.read(pf.name, (0, PREFIX))
            n = header_length(prefix, pf.size, pf.name)
            rest = self._reader.read(pf.name, (PREFIX, n))
        self.fetched += n
        pf.write(0, prefix + rest)
        pf.header_len = n
        pf.save()
        self._fresh_headers.add(pf.name)

    def _recheck_header(self, pf: PartialFile) -> None:
        """Before adding bytes to a file cached by an earlier run: the server's header must be the
        cached one, or the new bytes would come from another file than the old ones."""
        if pf.name in self._fresh_headers or self._reader is None:
            return
        header = (0, pf.header_len or 0)
        served = self._reader.read(pf.name, header)
        self.fetched += len(served)
        if served != pf.read(header):
            raise changed_under_commit(self.repo, self.commit, pf.name, "its header differs from the cached header")
        self._fresh_headers.add(pf.name)

    # planning

    def expert_spans(self, layer: int, expert: int) -> dict[str, list[Span]]:
        """Weight file -> byte spans of one expert's tensors (its slice of stacked ones)."""
        try:
            sources = self.checkpoint.experts[layer, expert]
        except KeyError:
            raise WeightsError(
                f"{self.repo}: no expert {layer}/{expert} (MoE layers {self.checkpoint.layers}, "
                f"{self.checkpoint.num_experts} experts each)"
            ) from None
        out: dict[str, list[Span]] = {}
        for srcs in sources.values():
            for src in srcs:
                file, entry = self._entry(src.key)
                out.setdefault(file, []).append(entry.slice_span(expert) if src.stacked else entry.span)
        return out

    def expert_nbytes(self, layer: int, expert: int, itemsize: int | None = None) -> int:
        """Bytes of one expert in the checkpoint's dtype, or at `itemsize` bytes per element:
        what a peer's memory budget is planned with."""
        if itemsize is None:
            return sum(total(spans) for spans in self.expert_spans(layer, expert).values())
        numel = 0
        for srcs in self.checkpoint.experts[layer, expert].values():
            for src in srcs:
                entry = self._entry(src.key)[1]
                numel += entry.numel // entry.shape[0] if src.stacked else entry.numel
        return numel * itemsize

    def _entry(self, key: str) -> tuple[str, TensorEntry]:
        file = self.checkpoint.key_files[key]
        try:
            return file, self.tensors[file][key]
        except KeyError:
            raise WeightsError(
                f"{self.repo}@{self.commit[:12]}: the index puts {key} in {file}, its header does not"
            ) from None

    def plan(self, side: str, experts: list[tuple[int, int]] | None = None) -> FetchPlan:
        """What `side` needs (a peer: the tensors of `experts`), and what the cache lacks of it."""
        wanted: dict[str, list[Span]] = {}
        pairs = sorted(set(experts or []))
        if side == PEER:
            if not pairs:
                raise WeightsError("a peer's download needs at least one expert")
            for layer, e in pairs:
                for file, spans in self.expert_spans(layer, e).items():
                    wanted.setdefault(file, []).extend(spans)
        elif side == COORDINATOR:
            routed = self.checkpoint.expert_keys()
            for key in self.checkpoint.key_files:
                if key not in routed:
                    file, entry = self._entry(key)
                    wanted.setdefault(file, []).append(entry.span)
        else:
            raise ValueError(f"side must be {COORDINATOR!r} or {PEER!r}, got {side!r}")
        files = []
        for name, pf in self.files.items():
            header = (0, pf.header_len or 0)
            spans = coalesce(wanted.get(name, []))
            files.append(FilePlan(name, pf.size, header, spans, pf.missing([header, *spans])))
        small = {n: self.pinned.files[n].size for n in self._small_files(side)}
        small_missing = [n for n in small if not (self.folder / n).is_file()]
        return FetchPlan(self.repo, self.commit, side, files, small, small_missing, self.checkpoint_bytes, pairs)

    # downloading

    def fetch(self, side: str, experts: list[tuple[int, int]] | None = None, progress: bool = True) -> FetchPlan:
        """Download what `side` needs and the cache lacks; returns the plan it carried out."""
        from tqdm import tqdm

        with self._lock():  # another process on this machine may be filling the same files
            plan = self.plan(side, experts)
            if self.offline and (plan.missing or plan.small_missing):
                raise WeightsError(
                    f"HF_HUB_OFFLINE is set and the cache of {self.repo}@{self.commit[:12]} lacks "
                    f"{human(plan.missing + plan.small_missing_bytes)} of what this {side} needs"
                )
            self._check_disk(plan.missing + plan.small_missing_bytes)
            self.fetched += self._get_small(plan.small_missing)
            bar = tqdm(
                total=plan.need,
                initial=plan.need - plan.missing,
                unit="B",
                unit_scale=True,
                desc=f"{self.repo} ({side})",
                disable=not progress or not plan.missing,
                file=sys.stderr,
            )
            try:
                for f in plan.files:
                    if f.missing:
                        pf = self.files[f.name]
                        with hub_errors(self.repo, self.revision, self.endpoint):
                            self._recheck_header(pf)
                        for span in f.missing:
                            self._download(pf, span, bar)
            finally:
                bar.close()
        fetched, self._reported = self.fetched - self._reported, self.fetched
        if progress:
            now = f", {human(fetched)} of it now" if fetched < plan.need else ""
            print(
                f"{self.repo}: downloaded {human(plan.need)} of the checkpoint's {human(plan.checkpoint_bytes)} "
                f"({percent(plan.need, plan.checkpoint_bytes)}){now}",
                file=sys.stderr,
            )
        return plan

    def _check_disk(self, need: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if need and free < need + DISK_MARGIN:
            raise WeightsError(
                f"not enough disk space in {self.folder}: this download needs {human(need)} "
                f"(+{human(DISK_MARGIN)} to spare), {human(free)} free"
            )

    def _download(self, pf: PartialFile, span: Span, bar) -> None:
        """Stream `span` into the file, retrying transient network errors from where it stopped."""
        import httpx2

        assert self._reader is not None
        for attempt in range(self.retries + 1):
            try:
                for start, end in pf.missing([span]):
                    offset, saved = start, start
                    with (
                        hub_errors(self.repo, self.revision, self.endpoint, transport=False),
                        self._reader.stream(pf.name, (start, end)) as chunks,
                    ):
                        for chunk in chunks:
                            pf.write(offset, chunk)
                            offset += len(chunk)
                            self.fetched += len(chunk)
                            bar.update(len(chunk))
                            if offset - saved >= SAVE_EVERY:
                                pf.save()
                                saved = offset
                pf.save()
                return
            except httpx2.TransportError as e:
                pf.save()
                if attempt == self.retries:
                    raise WeightsError(
                        f"network lost while downloading {pf.name} from {self.endpoint} ({type(e).__name__}); "
                        f"{human(pf.held_bytes)} of it are cached: run again to resume"
                    ) from None
                time.sleep(self.retry_wait * 2**attempt)
            except BaseException:
                pf.save()
                raise
