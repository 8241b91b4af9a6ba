"""How many tokens to draft next: the length that maximises expected tokens per second,
from this request's measured acceptance rate and measured pass costs.

Through a swarm a verify pass of n tokens costs c(n): the MoE layers' round trips plus
compute, and c grows with n because more tokens wake more experts, hence more peers, per
layer call. A draft of K tokens, each accepted with probability a until the first miss,
yields E(K) = (1 - a^(K+1)) / (1 - a) tokens per pass (the pass's own token included), so

    rate(K) = E(K) / (c(K+1) + d(K))        d(K): the cost of drafting K tokens

and K = 0 is plain decoding, rate(0) = 1 / c(1). The controller picks the best K and drafts
nothing unless the best beats plain decoding by `margin` (a draft that would be a loss
switches itself off). While off it probes with one drafted token now and then (the gap
doubling each time the probe changes nothing), so a draft that starts to agree comes back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass
class PassCosts:
    """Measured ms of verify passes by token count, and of drafting per token."""

    decay: float = 0.8  # EWMA weight of the past: costs drift with load and with the experts in play
    verify_ms: dict[int, float] = field(default_factory=dict)
    draft_ms_per_token: float | None = None
    draft_fixed_ms: float = 0.0

    def observe_verify(self, tokens: int, ms: float) -> None:
        old = self.verify_ms.get(tokens)
        self.verify_ms[tokens] = ms if old is None else self.decay * old + (1 - self.decay) * ms

    def observe_draft(self, tokens: int, ms: float) -> None:
        if tokens <= 0:
            return
        per = ms / tokens
        old = self.draft_ms_per_token
        self.draft_ms_per_token = per if old is None else self.decay * old + (1 - self.decay) * per

    def verify(self, tokens: int, slope_prior: float) -> float | None:
        """c(tokens): measured if seen, else extrapolated from the nearest measured length below
        with the steepest slope seen (or `slope_prior` x c(1) per token); never less than c of a
        shorter pass (more tokens are never less work: a noisy cheap reading must not make a
        longer pass look free). None before any pass."""
        if not self.verify_ms:
            return None
        seen = sorted(self.verify_ms)
        slopes = [(self.verify_ms[b] - self.verify_ms[a]) / (b - a) for a, b in itertools.pairwise(seen)]
        c1 = self.verify_ms.get(1, self.verify_ms[seen[0]])
        slope = max([slope_prior * c1, *slopes])
        cost = None
        for n in range(1, tokens + 1):
            if n in self.verify_ms:
                here = self.verify_ms[n]
            elif cost is not None:
                here = cost + slope
            else:  # below the shortest pass measured: extrapolate down from it
                here = max(self.verify_ms[seen[0]] - slope * (seen[0] - n), 1e-3)
            cost = here if cost is None else max(cost, here)
        return cost

    def draft(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.draft_fixed_ms + (self.draft_ms_per_token or 0.0) * tokens


def expected_tokens(acceptance: float, drafted: int) -> float:
    """Tokens one pass yields with `drafted` draft tokens, each accepted with probability
    `acceptance` until the first miss, plus the pass's own."""
    if acceptance >= 1.0:
        return drafted + 1.0
    return (1.0 - acceptance ** (drafted + 1)) / (1.0 - acceptance)


@dataclass
class DraftLength:
    """Per request: choose the draft length, learn from each pass."""

    max_tokens: int = 8
    margin: float = 0.05  # drafting must beat plain decoding by this fraction (noise in the measurements)
    slope_prior: float = 0.05  # before two lengths are measured, each extra token is assumed to cost 5% of c(1)
    # pseudo-counts: a neutral start that two misses outweigh, so a draft that never agrees
    # cannot look worth even one token however cheap the extra token is (c(2) >= c(1))
    prior_accept: float = 0.1
    prior_reject: float = 0.1
    decay: float = 0.95  # past passes fade: acceptance changes along a text
    probe_gap_max: int = 64
    costs: PassCosts = field(default_factory=PassCosts)
    accepted_w: float = 0.0
    rejected_w: float = 0.0
    off_for: int = 0  # passes since drafting was last chosen
    probe_gap: int = 4
    probing: bool = False

    @property
    def acceptance(self) -> float:
        """Estimated probability that a drafted token is accepted (given the ones before it were)."""
        a = self.accepted_w + self.prior_accept
        return a / (a + self.rejected_w + self.prior_reject)

    def rate(self, k: int) -> float | None:
        """Expected tokens per ms with k drafted tokens; None before any cost is known."""
        verify = self.costs.verify(k + 1, self.slope_prior)
        if verify is None:
            return None
        return expected_tokens(self.acceptance, k) / (verify + self.costs.draft(k))

    def best(self) -> int:
        """The draft length with the best expected rate (0: plain decoding)."""
        plain = self.rate(0)
        if plain is None:
            return 1  # nothing measured yet: one drafted token measures both lengths cheaply
        best_k, best_rate = 0, plain * (1 + self.margin)
        for k in range(1, self.max_tokens + 1):
            r = self.rate(k)
            if r is not None and r > best_rate:
                best_k, best_rate = k, r
        return best_k

    def next_length(self, budget: int) -> int:
        """Tokens to draft for the next pass (at most `budget`)."""
        k = self.best()
        self.probing = False
        if k == 0:
            self.off_for += 1
            if self.off_for >= self.probe_gap:  # a probe: does the draft agree again?
                self.off_for = 0
                self.probe_gap = min(self.probe_gap * 2, self.probe_gap_max)
                self.probing, k = True, 1
        else:
            self.off_for = 0
            self.probe_gap = 4
        return max(0, min(k, budget))

    def observe(self, drafted: int, accepted: int, verify_ms: float, draft_ms: float, prefill: bool = False) -> None:
        """One pass: `drafted` tokens proposed, `accepted` of them kept, what verifying and drafting cost.
        A prefill pass (the prompt) teaches acceptance but not costs."""
        if drafted > 0:
            self.accepted_w = self.accepted_w * self.decay + accepted
            self.rejected_w = self.rejected_w * self.decay + (1 if accepted < drafted else 0)
            self.costs.observe_draft(drafted, draft_ms)
        if not prefill:
            self.costs.observe_verify(drafted + 1, verify_ms)


@dataclass
class FixedLength(DraftLength):
    """Always drafts `max_tokens` (within the budget): for comparing lengths, and for tests
    that need every pass to verify several tokens."""

    def next_length(self, budget: int) -> int:
        return max(0, min(self.max_tokens, budget))
