"""When no replica of an expert answered in time: reroute its slots, drop them, or fail the call."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from coordinator.dispatch.layer_call import LayerCall
from coordinator.dispatch.result import ExpertUnavailableError

FALLBACK_POLICIES = ("reroute", "drop", "error")

# Router scores [T, E] (higher is better) for the reroute fallback, computed only when an
# expert could not be reached; one name for the contract every executor shares.
ScoresFn = Callable[[], torch.Tensor] | None


def unavailable(missing: list[int], first: LayerCall, timeout: float) -> ExpertUnavailableError:
    """The error for the `error` policy: each missing expert and the peers tried for it."""
    def why(e: int) -> str:
        if e in first.disputed:
            return "replicas disagreed and nothing settled which is right"
        return f"peers tried: {sorted(first.tried[e]) or 'none live'}"

    detail = "; ".join(f"{first.uids[e]} ({why(e)})" for e in missing)
    return ExpertUnavailableError(f"no replica answered within the {timeout:g}s deadline for: {detail}")


async def reroute(
    missing: list[int], first: LayerCall, flat: np.ndarray, experts: torch.Tensor, scores: torch.Tensor
) -> int:
    """Give each unanswered (token, slot) the token's best-scoring expert that is not
    already among its choices and still has a live replica; one more round.

    Answers go into `first` (work, answers) and `flat` names the new experts; returns the
    number of (token, slot) pairs rerouted."""
    work, answers, tried = first.work, first.answers, first.tried
    num_tokens = experts.shape[0]
    dead = set(missing)
    ranked = torch.argsort(scores.float(), dim=-1, descending=True)
    choose = first.dispatcher.planner.choose
    moves: dict[int, list[int]] = defaultdict(list)  # new expert -> positions
    for expert in missing:
        for pos in work.pop(expert).tolist():
            token = pos % num_tokens
            taken = set(experts[token].tolist())
            for candidate in ranked[token].tolist():
                if candidate in taken or candidate in dead:
                    continue
                if choose(first.uids[candidate], {}, tried.get(candidate, set())) is None:
                    dead.add(candidate)
                    continue
                moves[candidate].append(pos)
                break
    if not moves:
        return 0
    extra = {e: np.array(p, dtype=np.int64) for e, p in moves.items()}
    got = (await first.round(extra)).answers
    done = 0
    base = max(work, default=-1) + 1
    for i, (expert, positions) in enumerate(extra.items()):
        if expert in got:  # park under a fresh key: the same expert may also hold original slots
            work[base + i], answers[base + i] = positions, got[expert]
            flat[positions] = expert
            done += len(positions)
    return done
