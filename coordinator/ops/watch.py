"""What happens to the swarm while a person watches one run: experts losing their last
usable replica (and getting one back) are said as they happen, and every peer seen is
remembered with what it hosted and, at the end, why it is gone if it is.

A thread reads the client's swarm view and health cache (both swapped or updated whole by
the I/O loop), so the run itself pays nothing for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.dispatch.health import HealthCache
from coordinator.dispatch.swarm import SwarmView
from protos.expert_spec import format_expert_spec
from protos.records import PeerState, parse_expert_uid

WATCH_PERIOD_S = 0.5
FALLBACK_SAYS = {
    "reroute": "their tokens go to each token's next-best expert",
    "drop": "their tokens skip them",
    "error": "a call that needs them fails",
}


@dataclass
class SeenPeer:
    endpoint: str
    uids: set[str] = field(default_factory=set)
    state: PeerState = PeerState.ONLINE


class SwarmWatch:
    def __init__(
        self,
        swarm: SwarmView,
        health: HealthCache,
        say: Callable[[str], None],
        fallback: str,
        period: float = WATCH_PERIOD_S,
    ) -> None:
        self.swarm, self.health, self.say, self.fallback = swarm, health, say, fallback
        self.period = period
        self.peers: dict[str, SeenPeer] = {}
        self.orphaned: set[str] = set()  # uids with no usable replica right now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe-swarm-watch", daemon=True)

    def start(self) -> SwarmWatch:
        self.check(say=False)  # the starting point: what is missing already was said by the coverage wait
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.period)
        self.check()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.check()

    def check(self, say: bool = True) -> None:
        orphaned = set()
        for uid in self.swarm.uids:
            usable = False
            for r in self.swarm.announced(uid):
                seen = self.peers.setdefault(r.peer_id, SeenPeer(r.record.endpoint))
                seen.state = r.record.state
                if r.record.state.serving:
                    seen.uids.add(uid)
            for r in self.swarm.replicas(uid):
                usable |= self._answering(r.peer_id)
            if not usable:
                orphaned.add(uid)
        lost, back = sorted(orphaned - self.orphaned), sorted(self.orphaned - orphaned)
        if lost and say:
            self.say(
                f"{len(lost)} experts lost their last usable replica (e.g. {lost[0]}): until one comes back, "
                f"{FALLBACK_SAYS.get(self.fallback, self.fallback)}"
            )
        if back and say:
            self.say(f"{len(back)} experts have a usable replica again (e.g. {back[0]})")
        self.orphaned = orphaned

    def _answering(self, peer_id: str) -> bool:
        """Not banned, and its last call did not fail: a dead peer's record outlives it, and its
        bans come and go as retries probe it, so a ban alone would say "usable" between them."""
        health = self.health.peers.get(peer_id)
        return health is None or (health.failures == 0 and not self.health.banned(peer_id))

    def hosted(self) -> dict[str, str]:
        """peer id -> the compact --experts spec of what it was seen hosting."""
        per_layer: dict[int, set[int]] = {}
        for uid in self.swarm.uids:
            _, layer, expert = parse_expert_uid(uid)
            per_layer.setdefault(layer, set()).add(expert)
        every = {(layer, e) for layer, experts in per_layer.items() for e in experts}
        return {
            peer_id: "*" if (pairs := {parse_expert_uid(u)[1:] for u in seen.uids}) == every
            else format_expert_spec(pairs, per_layer)
            for peer_id, seen in self.peers.items()
        }

    def fates(self) -> dict[str, str]:
        """peer id -> what became of it: serving, banned, left (said so) or gone (its record expired:
        a crash, or it can no longer reach the DHT)."""
        live = {r.peer_id: r.record.state for uid in self.swarm.uids for r in self.swarm.replicas(uid)}
        return {peer_id: self._fate(peer_id, live.get(peer_id), seen) for peer_id, seen in self.peers.items()}

    def _fate(self, peer_id: str, state: PeerState | None, seen: SeenPeer) -> str:
        if self.health.banned(peer_id):
            return "banned (failed or wrong answers)"
        if state is not None:
            return "serving"
        if seen.state != PeerState.ONLINE:
            return f"left ({seen.state.value})"
        return "gone: its record expired (crashed or unreachable)"

