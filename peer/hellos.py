"""What a hello may cost before it is believed: the cheap checks a peer runs before any
signature or key-exchange work, and the memory of hellos already used.

- A hello is accepted once. Its ephemeral key (which the session id is derived from) is
  remembered until the hello's timestamp leaves the freshness window, so a recorded hello
  replayed later is refused, also after its session was evicted or expired; after the
  window the timestamp check refuses it.
- Hellos per address are a token bucket, charged before the signature is checked, so an
  address pays for the peer's verification work with its own rate.
- The memory of used hellos has a fixed size; when it is full, new hellos are refused
  (RESOURCE_EXHAUSTED) rather than forgetting a key that could then be replayed.
"""

from __future__ import annotations

from collections import OrderedDict

from protos.envelope import MAX_CLOCK_SKEW_S, wall_ms

from .sessions import RateLimiter

DEFAULT_HELLOS_PER_S = 10.0  # per client address
DEFAULT_HELLO_BURST = 100.0
DEFAULT_MAX_REMEMBERED = 65536  # used hellos kept (about 100 bytes each): ~545 accepted hellos/s at most


class HelloRefused(Exception):
    """A hello refused before any crypto; `replay` tells a used hello from a rate refusal."""

    def __init__(self, message: str, replay: bool) -> None:
        super().__init__(message)
        self.replay = replay


class HelloGuard:
    def __init__(
        self,
        per_address_rate: float = DEFAULT_HELLOS_PER_S,
        burst: float = DEFAULT_HELLO_BURST,
        max_remembered: int = DEFAULT_MAX_REMEMBERED,
    ) -> None:
        self.rate = RateLimiter(per_address_rate, burst)
        self.max_remembered = max_remembered
        self._used: OrderedDict[bytes, float] = OrderedDict()  # ephemeral key -> wall ms it may be forgotten

    def __len__(self) -> int:
        return len(self._used)

    def admit(self, ephemeral: bytes, address: str) -> None:
        """Before any crypto: HelloRefused for a used hello, an address over its rate, or a full memory."""
        self._forget_old()
        if ephemeral in self._used:
            raise HelloRefused("hello already used (replayed)", replay=True)
        if not self.rate.allow(address, 1):
            raise HelloRefused("too many hellos from this address; retry later", replay=False)
        if len(self._used) >= self.max_remembered:
            raise HelloRefused("too many recent hellos; retry later", replay=False)

    def used(self, ephemeral: bytes, timestamp_ms: int) -> None:
        """Remember an accepted hello until its timestamp can no longer pass the freshness check."""
        self._used[ephemeral] = timestamp_ms + MAX_CLOCK_SKEW_S * 1000 + 1000

    def _forget_old(self) -> None:
        # entries arrive in about timestamp order; a skewed one stays a little longer, never less
        now = wall_ms()
        while self._used:
            key, until = next(iter(self._used.items()))
            if until > now:
                break
            del self._used[key]
