"""What this coordinator has learnt about peers across runs: bans of proven cheaters, and each
peer's verified history (answers a spot check confirmed), in a small JSON file.

A cheater banned for an hour stays banned when the coordinator restarts, and a peer that has
answered well before starts with that history (spot checks sample it at the base rate, and it
is preferred as a verifier). The file is written atomically (protos.plumbing.files), bounded
(MAX_PEERS entries: bans first, then the longest histories), and each conviction's evidence
goes next to it in `evidence/` (at most MAX_EVIDENCE_FILES files, the oldest removed first).
Without a path the store lives in memory only (tests, benchmarks).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from protos.plumbing.files import write_json_atomic

log = logging.getLogger(__name__)

MAX_PEERS = 4096  # entries kept in the file: a Sybil's throwaway identities cannot grow it without bound
MAX_EVIDENCE_FILES = 256
FORMAT = "moe-swarm-trust/1"


def default_path() -> Path:
    """$XDG_STATE_HOME/moe-swarm/trust.json (~/.local/state/moe-swarm/trust.json)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "moe-swarm" / "trust.json"


@dataclass
class PeerTrust:
    agreed: int = 0  # answers an independent replica or the coordinator confirmed
    disputed: int = 0  # disagreements nothing could settle
    convicted: int = 0  # answers proven wrong
    banned_until: float = 0.0  # wall-clock time (persisted bans outlive the process)


class TrustStore:
    def __init__(self, path: Path | None = None, clock=time.time) -> None:
        self.path = path
        self.clock = clock
        self.peers: dict[str, PeerTrust] = {}
        self.changed = False  # since the last save
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            if doc.get("format") != FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {FORMAT!r}")
            for peer, entry in list(doc["peers"].items())[:MAX_PEERS]:
                self.peers[str(peer)] = PeerTrust(**{k: type(v)(entry[k]) for k, v in asdict(PeerTrust()).items()})
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("trust store %s is unreadable (%s); starting without it", path, e)
            self.peers.clear()

    # ---- reading --------------------------------------------------------------------------
    def history(self, peer: str) -> int:
        entry = self.peers.get(peer)
        return 0 if entry is None else entry.agreed

    def bans(self) -> dict[str, float]:
        """peer -> seconds its ban still lasts, for the bans in force."""
        now = self.clock()
        return {p: e.banned_until - now for p, e in self.peers.items() if e.banned_until > now}

    # ---- recording ------------------------------------------------------------------------
    def agreed(self, peer: str) -> None:
        self._entry(peer).agreed += 1

    def disputed(self, peer: str) -> None:
        self._entry(peer).disputed += 1

    def _entry(self, peer: str) -> PeerTrust:
        if peer not in self.peers and len(self.peers) >= 2 * MAX_PEERS:
            self._prune()  # in memory too: throwaway identities cannot grow it without bound
        self.changed = True
        return self.peers.setdefault(peer, PeerTrust())

    def _prune(self) -> None:
        """Keep MAX_PEERS entries: bans in force first, then the longest histories."""
        now = self.clock()
        ranked = sorted(self.peers.items(), key=lambda kv: (kv[1].banned_until <= now, -kv[1].agreed))
        self.peers = dict(ranked[:MAX_PEERS])

    def convict(self, peer: str, ban_s: float, evidence: dict) -> None:
        """A proven-wrong answer: ban `peer`, keep the evidence, write the store now."""
        entry = self._entry(peer)
        entry.convicted += 1
        entry.banned_until = max(entry.banned_until, self.clock() + ban_s)
        self.changed = True
        if self.path is not None:
            self._write_evidence(peer, evidence)
        self.save()

    def save(self) -> None:
        """Write the store if anything changed (bans at once, histories when the client closes)."""
        if self.path is None or not self.changed:
            return
        self.changed = False
        self._prune()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"format": FORMAT, "peers": {p: asdict(e) for p, e in self.peers.items()}})
        except OSError as e:
            log.warning("could not write the trust store %s: %s", self.path, e)

    def _write_evidence(self, peer: str, evidence: dict) -> None:
        folder = self.evidence_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / f"{time.time_ns()}-{peer[:16]}.json", evidence)
            files = sorted(folder.glob("*.json"))
            for old in files[: max(len(files) - MAX_EVIDENCE_FILES, 0)]:
                old.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not keep evidence against %s in %s: %s", peer, folder, e)

    @property
    def evidence_dir(self) -> Path:
        assert self.path is not None
        return self.path.parent / "evidence"
