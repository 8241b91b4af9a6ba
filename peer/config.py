"""Everything `moe-peer serve` takes, as one typed value.

The CLI maps argv (and MOE_PEER_* variables, and --config files) to a PeerConfig; PeerNode
runs from one, so tests and tools start a peer in-process without argv. Defaults are the
CLI's; values are checked on construction, so a bad one fails before anything starts.
Reading files (identity, allowlist, checkpoint) is left to the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protos.limits import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_QUEUE_ROWS, DEFAULT_MAX_ROWS
from protos.toy_model import ToyConfig

from .backends.faults import Impairment
from .placement import parse_bytes
from .service.gate import DEFAULT_REQUEST_MEMORY
from .service.settings import Batching, ServiceLimits
from .sessions import RateLimiter

ADDRESS_SHARE_OF_RATE = 4  # an address (a NAT may hide several coordinators) gets 4x one identity's rate

DTYPES = ("float32", "bfloat16", "float16")
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")  # bind addresses that announce nothing dialable
AUTO = "auto"  # --experts auto: the least-covered experts that fit the memory budget


RELAY_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class PeerConfig:
    # the model: exactly one source
    model: str | None = None  # Hugging Face MoE checkpoint: a Hub repo id (org/name) or a local folder
    revision: str | None = None  # with a Hub repo id: branch, tag or commit
    checkpoint: Path | None = None  # moe-swarm toy checkpoint folder
    seed: int | None = None  # build the toy model from this seed
    layers: int = 2  # with seed: MoE layers, experts per layer, hidden and FFN sizes
    num_experts: int = 8
    hidden: int = 256
    ffn: int = 512
    dtype: str | None = None  # compute dtype (None: the checkpoint's; float32 with seed)
    # which experts
    experts: str = "*"  # the --experts grammar (protos/expert_spec.py), or "auto"
    memory_budget: str | None = None  # with auto: bytes of expert weights, e.g. "8GiB"
    placement_delay: float = 2.0  # with auto: random wait (s) before reading the swarm's coverage
    placement_check: float = 60.0  # with auto: re-read coverage this often (s); 0: never move
    # network and DHT
    host: str = "127.0.0.1"
    port: int = 0  # gRPC port (0 picks a free one)
    announce_host: str | None = None  # what others dial (None: host)
    announce_port: int | None = None  # None: the bound port
    dht_port: int = 0
    initial_peers: tuple[str, ...] = ()
    skip_reachability_check: bool = False
    remeasure: bool = False  # throughput: measure again, ignoring the cache
    relay: str = "auto"  # auto: through relays when not directly reachable; always; never
    announce_period: float = 10.0
    drain_timeout: float = 10.0
    ready_file: Path | None = None  # endpoint/peer id JSON, written once serving (for launchers)
    # compute
    device: str | None = None  # None: cuda if available, else cpu
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    compute_cpus: frozenset[int] | None = None  # CPUs for the expert math only
    max_batch_rows: int = 4096
    batch_wait_ms: float = 0.0
    # limits
    max_rows: int = DEFAULT_MAX_ROWS
    max_queue_rows: int = DEFAULT_MAX_QUEUE_ROWS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    request_memory: str | None = None  # bytes of requests being received at once (None: 1 GiB)
    # security
    key_file: Path | None = None  # None: a fresh identity each run
    allow_clients: Path | None = None  # private peer: file of coordinator public keys
    rate_limit: float | None = None  # public peer: token rows/s per client
    rate_burst: float | None = None
    address_rate_limit: float | None = None  # token rows/s per client address (None: 4 x rate_limit)
    allow_plaintext: bool = False
    # observability
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a port
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    # simulation (moe-swarm simulate) and tests of spot checks: a misbehaving peer on purpose
    sim_slowdown: float = 1.0
    sim_latency_ms: float = 0.0
    sim_jitter_ms: float = 0.0
    sim_loss: float = 0.0
    sim_corrupt: float = 0.0  # scale outputs by (1 + this), signed as if correct
    sim_seed: int | None = None

    def __post_init__(self) -> None:
        sources = [s for s in (self.model, self.checkpoint, self.seed) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one model source: --model, --checkpoint or --seed")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.auto_placement:
            if not self.memory_budget:
                raise ValueError("--experts auto needs --memory-budget (e.g. 8GiB)")
            parse_bytes(self.memory_budget)
        if self.host in WILDCARD_HOSTS and not self.announce_host:
            raise ValueError(
                f"--host {self.host} listens on every interface but is no address to dial: add --announce-host "
                "with the address others reach this machine at (its public IP or DNS name)"
            )
        if self.relay not in RELAY_MODES:
            raise ValueError(f"--relay {self.relay!r} is not one of {', '.join(RELAY_MODES)}")
        self.impairment()
        self.rate_limiter()
        self.limits()

    @property
    def auto_placement(self) -> bool:
        return self.experts == AUTO

    @property
    def budget_bytes(self) -> int | None:
        return parse_bytes(self.memory_budget) if self.memory_budget else None

    def toy_config(self) -> ToyConfig:
        return ToyConfig(
            num_layers=self.layers,
            num_experts=self.num_experts,
            hidden_dim=self.hidden,
            ffn_dim=self.ffn,
            dtype=self.dtype or "float32",
        )

    def impairment(self) -> Impairment | None:
        """A fresh simulated impairment (its own seeded draws), None when nothing is impaired."""
        imp = Impairment(self.sim_slowdown, self.sim_latency_ms, self.sim_jitter_ms, self.sim_loss, self.sim_seed)
        return imp if imp.active else None

    def rate_limiter(self) -> RateLimiter | None:
        if self.rate_limit is None:
            return None
        return RateLimiter(self.rate_limit, self.rate_burst or max(self.rate_limit, self.max_rows))

    def address_limiter(self) -> RateLimiter | None:
        """Rows per client address, whatever identities it uses: fresh identities cost nothing."""
        rate = self.address_rate_limit or (ADDRESS_SHARE_OF_RATE * self.rate_limit if self.rate_limit else None)
        if rate is None:
            return None
        burst = self.rate_burst or max(self.rate_limit or rate, self.max_rows)  # as one identity's, below
        return RateLimiter(rate, ADDRESS_SHARE_OF_RATE * burst)

    def limits(self) -> ServiceLimits:
        memory = parse_bytes(self.request_memory) if self.request_memory else DEFAULT_REQUEST_MEMORY
        return ServiceLimits(
            max_rows=self.max_rows,
            max_queue_rows=self.max_queue_rows,
            max_message_bytes=self.max_message_bytes,
            request_memory=memory,
        )

    def batching(self) -> Batching:
        return Batching(self.max_batch_rows, self.batch_wait_ms, self.compute_cpus)
