"""What one side needs of a checkpoint, as byte spans per file, and how it reads in a dry run."""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.weights.spans import Span, total

COORDINATOR, PEER = "coordinator", "peer"


@dataclass
class FilePlan:
    name: str
    size: int
    header: Span  # the 8-byte length and the JSON header
    spans: list[Span]  # the tensor bytes this side needs, coalesced
    missing: list[Span]  # of header + spans, what the cache does not hold yet

    @property
    def need(self) -> int:
        return self.header[1] + total(self.spans)


@dataclass
class FetchPlan:
    repo: str
    commit: str
    side: str
    files: list[FilePlan]
    small: dict[str, int]  # whole small files (config, index, tokenizer): name -> size
    small_missing: list[str]
    checkpoint_bytes: int  # every weight file, whole
    experts: list[tuple[int, int]] = field(default_factory=list)  # a peer's (layer, expert) pairs

    @property
    def need(self) -> int:
        """Weight-file bytes this side needs (headers included)."""
        return sum(f.need for f in self.files)

    @property
    def missing(self) -> int:
        return sum(total(f.missing) for f in self.files)

    @property
    def small_missing_bytes(self) -> int:
        return sum(self.small[n] for n in self.small_missing)

    @property
    def requests(self) -> int:
        return sum(len(f.missing) for f in self.files)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def summary_line(plan: FetchPlan) -> str:
    return f"this side needs {human(plan.need)} of the checkpoint's {human(plan.checkpoint_bytes)} " + (
        f"({percent(plan.need, plan.checkpoint_bytes)})"
    )


def describe(plan: FetchPlan, spans: bool = False) -> str:
    """The dry run's report: per file the spans, bytes and share; totals; nothing fetched."""
    who = plan.side if not plan.experts else f"{plan.side} hosting {len(plan.experts)} experts"
    lines = [f"{plan.repo}@{plan.commit[:12]}, {who}: would fetch"]
    width = max((len(f.name) for f in plan.files), default=10)
    for f in plan.files:
        lines.append(
            f"  {f.name:<{width}}  {len(f.spans):>5} spans  {human(f.need):>10} of {human(f.size):>10}  "
            f"({percent(f.need, f.size):>7})  missing {human(total(f.missing))}"
        )
        if spans:
            lines.extend(f"      {a}-{b - 1}" for a, b in f.spans)
    small = ", ".join(sorted(plan.small))
    lines.append(f"  small files, whole: {human(sum(plan.small.values()))} ({small})")
    lines.append(
        f"  {summary_line(plan)}; headers {human(sum(f.header[1] for f in plan.files))}; "
        f"not in the cache yet: {human(plan.missing + plan.small_missing_bytes)} in {plan.requests} ranged requests"
    )
    return "\n".join(lines)
