"""The adaptive draft length as pure logic: it follows measured acceptance and pass costs."""

from __future__ import annotations

import random

import pytest

from coordinator.speculate.controller import DraftLength, expected_tokens

pytestmark = pytest.mark.unit


def feed(controller: DraftLength, passes: int, accept: float, cost_ms) -> list[int]:
    """Drive the controller: each pass drafts what it asks for; each drafted token is accepted
    with probability `accept` until the first miss (seeded)."""
    rng = random.Random(0)
    lengths = []
    for _ in range(passes):
        k = controller.next_length(budget=100)
        lengths.append(k)
        accepted = 0
        while accepted < k and rng.random() < accept:
            accepted += 1
        controller.observe(k, accepted, cost_ms(k + 1), draft_ms=0.1 * k)
    return lengths


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_a_draft_that_is_never_right_is_switched_off():
    c = DraftLength(max_tokens=8)
    lengths = feed(c, 60, accept=0.0, cost_ms=lambda n: 50.0 + 0.5 * n)
    assert c.best() == 0
    assert sum(1 for k in lengths[30:] if k > 0) <= 2  # only sparse probes, each gap twice the last


def test_a_draft_missed_twice_is_off_even_when_an_extra_token_costs_nothing():
    # loopback with a tiny model: verifying two tokens costs what one does, give or take noise
    for seed in range(8):
        c, noisy = DraftLength(max_tokens=8), random.Random(seed)
        lengths = feed(c, 60, accept=0.0, cost_ms=lambda n, noisy=noisy: 2.0 * noisy.uniform(0.9, 1.1))
        # the first pass drafts one token (nothing is measured yet), then only probes, each gap twice the last
        assert [i for i, k in enumerate(lengths) if k > 0] == [0, 4, 12, 28], seed


def test_a_good_draft_on_a_long_link_drafts_long():
    c = DraftLength(max_tokens=8)
    feed(c, 30, accept=1.0, cost_ms=lambda n: 400.0 + 1.0 * n)  # 8 layers x 50 ms: extra tokens nearly free
    assert c.best() == 8


def test_costly_verify_passes_shorten_the_draft():
    cheap, costly = DraftLength(max_tokens=8), DraftLength(max_tokens=8)
    feed(cheap, 60, accept=0.8, cost_ms=lambda n: 100.0 + 1.0 * n)
    feed(costly, 60, accept=0.8, cost_ms=lambda n: 2.0 + 1.0 * n)  # loopback: each token wakes more peers
    assert 0 < costly.best() < cheap.best()


def test_a_draft_that_comes_back_is_picked_up_by_a_probe():
    c = DraftLength(max_tokens=4)
    feed(c, 20, accept=0.0, cost_ms=lambda n: 50.0)
    assert c.best() == 0
    lengths = feed(c, 60, accept=1.0, cost_ms=lambda n: 50.0)
    assert lengths[-1] > 0


def test_speculate_flags_are_checked_before_anything_starts(tmp_path):
    from coordinator.cli import build_parser
    from coordinator.speculate.options import check_speculate_args

    def args(*extra: str):
        return build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--initial-peers", "x", *extra])

    check_speculate_args(args("--speculate", "lookup"))
    with pytest.raises(ValueError, match="needs --draft-model"):
        check_speculate_args(args("--speculate", "draft-model"))
    with pytest.raises(ValueError, match=r"no config\.json"):
        check_speculate_args(args("--speculate", "draft-model", "--draft-model", str(tmp_path)))
    with pytest.raises(ValueError, match="--max-draft must be in"):
        check_speculate_args(args("--speculate", "trunk", "--max-draft", "0"))


def test_a_longer_pass_never_looks_cheaper_than_a_shorter_one():
    """On a busy machine a 2-token pass may be timed faster than a 1-token one; a wrong draft must still go off."""
    c = DraftLength(max_tokens=6)
    noisy = iter([60.0, 40.0] * 50)
    feed(c, 40, accept=0.0, cost_ms=lambda n: next(noisy))
    assert c.costs.verify(2, c.slope_prior) >= c.costs.verify(1, c.slope_prior)
    assert c.best() == 0
