"""Speculative decoding through a real swarm (the trained tiny MoE, 8 MoE layers, experts over
4 peers): greedy output is token-for-token the plain greedy output for every draft kind, and
the adaptive draft length falls to zero against a draft that is always wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coordinator.client import SwarmClient
from coordinator.commands.generate import greedy
from coordinator.models.hf import checkpoint_info, load_swarm_model
from coordinator.models.trained import ensure_trained
from coordinator.sim.local_swarm import LocalSwarm
from coordinator.speculate import DraftLength, FixedLength, speculative_generate
from coordinator.speculate.drafts import DRAFT_KINDS
from coordinator.speculate.options import make_draft
from protos.expert_spec import expert_slices

PROMPT = "def __init__(self, name, value):\n        self.name = name\n        self."
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def trained() -> tuple[Path, Path]:
    return ensure_trained(Path(".cache"))


@pytest.fixture(scope="module")
def target(trained, tmp_path_factory):
    """(swarm model, prompt ids, plain greedy output)."""
    from transformers import AutoTokenizer

    moe, _ = trained
    info = checkpoint_info(moe)
    with LocalSwarm(tmp_path_factory.mktemp("spec-swarm")) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers(
            {
                f"spec-{i}": ["--model", str(moe), "--experts", spec, "--threads", "1"]
                for i, spec in enumerate(expert_slices(info.checkpoint.num_experts, 4))
            }
        )
        with SwarmClient(swarm.initial_peers, info.uids) as client:
            client.wait_for_experts()
            model = load_swarm_model(moe, client, info=info)
            ids = AutoTokenizer.from_pretrained(moe)(PROMPT, return_tensors="pt").input_ids
            yield model, ids, greedy(model, ids, NEW_TOKENS).output_ids


@pytest.mark.parametrize("kind", DRAFT_KINDS)
def test_greedy_output_is_identical_with_every_draft(target, trained, kind):
    model, ids, want = target
    draft = make_draft(kind, model, trained[1])
    # a fixed length makes every pass verify several drafted tokens, accepted or not
    run = speculative_generate(model, ids, draft, NEW_TOKENS, controller=FixedLength(max_tokens=4))
    assert run.output_ids.tolist() == want.tolist()
    assert run.stats.drafted > run.stats.accepted  # passes verified drafted tokens, and rejected some
    if kind != "trunk":  # the trunk alone (experts skipped) rarely agrees with this small model: see benchmarks.md
        assert run.stats.accepted > 0  # accepted drafts took the multi-token path (cache crop included)
        assert run.stats.passes < NEW_TOKENS  # fewer passes than tokens: speculation did something
    assert min(run.stats.peers_per_pass) >= 1 and max(run.stats.experts_per_pass) >= 2


def test_adaptive_length_keeps_greedy_output(target, trained):
    model, ids, want = target
    run = speculative_generate(model, ids, make_draft("draft-model", model, trained[1]), NEW_TOKENS)
    assert run.output_ids.tolist() == want.tolist()
    assert run.stats.passes == len(run.stats.lengths)


class AlwaysWrong:
    """Proposes, at every position, a token the target will not choose (its greedy choice + 1)."""

    name = "always-wrong"

    def __init__(self, reference: torch.Tensor, vocab: int) -> None:
        self.reference, self.vocab = reference, vocab

    def candidates(self, target, setup):
        return _WrongCandidates(self.reference, self.vocab)


class _WrongCandidates:
    def __init__(self, reference: torch.Tensor, vocab: int) -> None:
        self.reference, self.vocab, self.length = reference, vocab, 1

    def set_length(self, tokens: int) -> None:
        self.length = tokens

    def get_candidates(self, input_ids, **kwargs):
        n = input_ids.shape[1]
        wrong = (self.reference[:, n : n + self.length] + 1) % self.vocab
        return torch.cat([input_ids, wrong], dim=1), None


def test_adaptive_length_falls_to_zero_against_a_wrong_draft(target):
    model, ids, _ = target
    controller = DraftLength(max_tokens=6)
    longer = greedy(model, ids, 2 * NEW_TOKENS).output_ids
    run = speculative_generate(
        model, ids, AlwaysWrong(longer, model.config.vocab_size), 2 * NEW_TOKENS, controller=controller
    )
    assert run.output_ids.tolist() == longer.tolist()
    assert run.stats.accepted == 0 and run.stats.drafted > 0
    lengths = run.stats.lengths
    assert controller.best() == 0, (lengths, controller)  # it would draft nothing now
    late = lengths[len(lengths) // 2 :]
    assert sum(1 for k in late if k > 0) <= 2, lengths  # the second half: plain decoding, a rare probe


def _exact_pairs(model, ids: torch.Tensor, temperature: float, min_p: float) -> dict[tuple[int, int], float]:
    """P(first two new tokens) under the target at `temperature`, for every pair whose first
    token has probability >= min_p (their second tokens all of the vocabulary)."""
    with torch.inference_mode():
        first = torch.softmax(model(ids).logits[0, -1].float() / temperature, -1)
        t1 = torch.nonzero(first >= min_p).flatten()
        batch = torch.cat([ids.repeat(len(t1), 1), t1[:, None]], dim=1)
        second = torch.softmax(model(batch).logits[:, -1].float() / temperature, -1)
    return {
        (a, b): first[a].item() * second[i, b].item()
        for i, a in enumerate(t1.tolist())
        for b in range(second.shape[-1])
    }


def test_sampling_with_a_draft_keeps_the_target_distribution(target, trained):
    """The second new token is the one a drafted token is checked for (speculative sampling):
    the joint distribution of the first two, over many seeded runs, is the target's exact one
    (Pearson's chi-square over the pairs expected at least 5 times, the rest one bin)."""
    from scipy.stats import chi2

    model, ids, _ = target
    draft, temperature, runs = make_draft("draft-model", model, trained[1]), 0.5, 400
    exact = _exact_pairs(model, ids, temperature, min_p=0.005)
    bins = [pair for pair, p in exact.items() if p * runs >= 5]
    counts = dict.fromkeys([*bins, "rest"], 0)
    torch.manual_seed(0)
    drafted = accepted = 0
    for _ in range(runs):
        run = speculative_generate(
            model, ids, draft, 3, controller=FixedLength(max_tokens=2), do_sample=True,
            temperature=temperature, top_k=0, top_p=1.0,
        )  # fmt: skip
        drafted, accepted = drafted + run.stats.drafted, accepted + run.stats.accepted
        pair = tuple(run.output_ids[0, ids.shape[1] : ids.shape[1] + 2].tolist())
        counts[pair if pair in counts else "rest"] += 1
    assert drafted >= runs and 0 < accepted < drafted  # drafts were checked, some taken and some not
    expected = {b: exact[b] * runs for b in bins}
    expected["rest"] = runs - sum(expected.values())
    assert len(bins) >= 5 and expected["rest"] >= 5, expected  # the test has something to tell apart
    stat = sum((counts[b] - e) ** 2 / e for b, e in expected.items())
    p_value = chi2.sf(stat, df=len(expected) - 1)
    assert p_value > 1e-3, (p_value, counts, expected)
