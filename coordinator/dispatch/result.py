"""What a layer call returns (outputs at their (token, slot) positions) or raises."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
import torch

from protos.records import NOT_SERVING


class DispatchError(RuntimeError):
    """A layer call could not be completed; the message names the experts and peers."""


class ExpertUnavailableError(DispatchError):
    pass


class RemoteExpertError(DispatchError):
    def __init__(self, message: str, code: grpc.StatusCode | None, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details  # the peer's own words, for refusals that are not failures

    @property
    def not_serving(self) -> bool:
        """The peer is joining, draining or gone: it said so, it did not fail."""
        return self.code == grpc.StatusCode.UNAVAILABLE and self.details.startswith(NOT_SERVING)


@dataclass
class DispatchResult:
    outputs: torch.Tensor  # [T, k, H]; rows of slots nobody answered are zero
    answered: torch.Tensor  # [T, k] bool: False where the slot was dropped
    experts: torch.Tensor  # [T, k] the experts that computed each slot (differs where rerouted)
    dropped: int | None = None  # slots nobody answered, where the maker counted them (no pass over `answered`)

    @property
    def complete(self) -> bool:
        return self.dropped == 0 if self.dropped is not None else bool(self.answered.all())


def scatter(
    work: dict[int, np.ndarray],
    answers: dict[int, torch.Tensor],
    flat: np.ndarray,
    num_tokens: int,
    k: int,
    hidden: int,
    dtype: torch.dtype,
) -> tuple[DispatchResult, int]:
    """Put each answered expert's rows at its slot-major positions; returns the result and the
    number of (token, slot) pairs nobody answered."""
    done = [e for e in work if e in answers]
    answered = np.zeros(k * num_tokens, dtype=bool)
    if done:  # one scatter for all experts (their positions are disjoint)
        positions = np.concatenate([work[e] for e in done])
        answered[positions] = True
        outputs = answers[done[0]] if len(done) == 1 else torch.cat([answers[e] for e in done])
        allocate = torch.empty if len(positions) == len(answered) else torch.zeros  # all rows written: no fill
        result = allocate(k * num_tokens, hidden, dtype=dtype)
        result.index_copy_(0, torch.from_numpy(positions), outputs.to(dtype))
    else:
        result = torch.zeros(k * num_tokens, hidden, dtype=dtype)
    dropped = len(answered) - int(answered.sum())
    return (
        DispatchResult(
            result.view(k, num_tokens, -1).transpose(0, 1),
            torch.from_numpy(answered).view(k, num_tokens).T,
            torch.from_numpy(flat).view(k, num_tokens).T,
            dropped,
        ),
        dropped,
    )
