"""The gateway's pure logic: request validation, sampling, stops, admission, the step rendezvous."""

from __future__ import annotations

import threading

import pytest
import torch

from coordinator.api.admission import Admission, Limits
from coordinator.api.engine import plan_step
from coordinator.api.errors import ApiError
from coordinator.api.params import RequestParser, Sampling
from coordinator.api.rendezvous import StepRendezvous
from coordinator.api.sampling import make_generator, next_token
from coordinator.api.sequence import Event, Sequence, Tally
from coordinator.dispatch.dispatcher import DispatchResult
from coordinator.models.tiny import build_tokenizer

pytestmark = pytest.mark.unit

CONTEXT = 64


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def parser(tokenizer):
    return RequestParser(tokenizer, ("tiny", "mixtral-0123"), CONTEXT)


def error_of(call, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        call(*args)
    return e.value


def test_completion_defaults_and_prompt_forms(parser, tokenizer):
    text = parser.completion({"model": "tiny", "prompt": "the swarm"})
    assert text.prompt_ids == tuple(tokenizer("the swarm").input_ids)
    assert text.sampling == Sampling(max_tokens=16) and text.model == "tiny" and not text.stream
    assert parser.completion({"model": "mixtral-0123", "prompt": ["the swarm"]}).prompt_ids == text.prompt_ids
    assert parser.completion({"model": "tiny", "prompt": [5, 6, 7]}).prompt_ids == (5, 6, 7)
    req = parser.completion(
        {"model": "tiny", "prompt": "x", "max_tokens": 3, "temperature": 0, "top_p": 0.5, "seed": 9, "stop": "\n",
         "stream": True, "stream_options": {"include_usage": True}, "n": 1, "user": "ignored"}
    )  # fmt: skip
    assert req.sampling == Sampling(3, 0.0, 0.5, 9, ("\n",)) and req.stream and req.include_usage


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "other", "prompt": "x"}, 404, "model", "model_not_found"),
        ({"prompt": "x"}, 400, "model", "missing_required_parameter"),
        ({"model": "tiny", "prompt": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
        ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_type"),
        ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({"model": "tiny", "prompt": "x", "max_tokens": True}, 400, "max_tokens", "invalid_type"),
        ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n", "invalid_value"),
        ({"model": "tiny", "prompt": "x", "stop": ["a"] * 5}, 400, "stop", "invalid_value"),
        ({"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop", "invalid_value"),
        ({"model": "tiny", "prompt": "x", "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
        ({"model": "tiny", "prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type"),
        ({"model": "tiny", "prompt": ""}, 400, "prompt", "invalid_value"),
        ({"model": "tiny", "prompt": [1, 999]}, 400, "prompt", "invalid_value"),
        ({"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt", "invalid_type"),
        ({"model": "tiny", "prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens", "context_length_exceeded"),
        ({"model": "tiny", "prompt": list(range(CONTEXT))}, 400, "prompt", "context_length_exceeded"),
        ({"model": "tiny", "prompt": "x" * (CONTEXT * 64 + 1)}, 400, "prompt", "context_length_exceeded"),
    ],
)
def test_bad_completion_bodies_name_the_field(parser, body, status, param, code):
    e = error_of(parser.completion, body)
    assert (e.status, e.param, e.code) == (status, param, code)
    assert e.body()["error"]["type"] == "invalid_request_error" and e.body()["error"]["message"]


def test_chat_without_template_and_with_one(parser, tokenizer):
    parts = [{"type": "text", "text": "hi"}]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]
    plain = parser.chat({"model": "tiny", "messages": messages})
    assert plain.prompt_ids == tuple(tokenizer("system: be brief\nuser: hi\nassistant:").input_ids)
    assert plain.sampling.max_tokens == CONTEXT - len(plain.prompt_ids)  # default: the rest of the context
    templated = build_tokenizer()
    templated.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    req = RequestParser(templated, ("tiny",), CONTEXT).chat(
        {"model": "tiny", "messages": messages, "max_completion_tokens": 2}
    )
    assert req.prompt_ids == tuple(templated("[system]be brief[user]hi[assistant]", add_special_tokens=False).input_ids)
    assert req.sampling.max_tokens == 2
    for bad in ([], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}], "hi"):
        assert error_of(parser.chat, {"model": "tiny", "messages": bad}).status == 400


def test_sampling_greedy_top_p_and_seed():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert next_token(logits, 0.0, 1.0, make_generator(0)) == 1
    # top_p 0.5 keeps only the best token (its mass alone exceeds 0.5)
    assert {next_token(logits, 1.0, 0.5, make_generator(s)) for s in range(20)} == {1}
    draws = [next_token(logits, 1.0, 1.0, make_generator(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # the same seed, the same draw
    assert len({next_token(logits, 2.0, 1.0, make_generator(s)) for s in range(40)}) > 1


def sequence(tokenizer, prompt=(5, 6), events=None, **sampling) -> Sequence:
    from coordinator.api.params import GenerationRequest

    sampling = {"max_tokens": 8, "temperature": 0.0, **sampling}
    req = GenerationRequest("completion", "tiny", tuple(prompt), Sampling(**sampling))
    sink = events.append if events is not None else (lambda e: None)
    return Sequence(req, tokenizer, frozenset({1}), sink)


def one_hot(token: int, vocab: int = 320) -> torch.Tensor:
    logits = torch.zeros(vocab)
    logits[token] = 1.0
    return logits


def test_stop_string_is_held_back_then_cut(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(c) for c in ("a", "b", "c", "d")]
    events: list[Event] = []
    seq = sequence(tokenizer, events=events, stop=("bc",))
    for t in ids[:3]:
        seq.accept(one_hot(t))
    # "a" went out; "b" was held (a stop could begin there); "bc" ended it without being sent
    assert [e.text for e in events] == ["a", ""] and events[-1].finish_reason == "stop"
    assert seq.done and seq.usage()["completion_tokens"] == 3


def test_eos_and_length_finish(tokenizer):
    events: list[Event] = []
    seq = sequence(tokenizer, events=events)
    seq.accept(one_hot(1))  # eos
    assert seq.finish_reason == "stop" and events[-1].finish_reason == "stop"
    seq = sequence(tokenizer, max_tokens=2)
    seq.fed(len(seq.take(64)))  # the prompt went in whole
    seq.accept(one_hot(70))
    assert not seq.done and seq.pending == [70]  # fed back next step
    seq.accept(one_hot(71))
    assert seq.finish_reason == "length"


def test_admission_queue_limits_and_order(tokenizer):
    admission = Admission(Limits(max_active=2, max_queue=1, kv_tokens=30))
    a, b, c, d = (sequence(tokenizer, max_tokens=8) for _ in range(4))  # 10 positions each
    admission.offer(a)
    assert admission.admit() == [a]
    admission.offer(b)
    assert error_of(admission.offer, c).status == 429  # b waits (not yet admitted): the queue is full
    assert admission.admit() == [b]
    admission.offer(c)
    e = error_of(admission.offer, d)
    assert (e.status, e.code, e.retry_after) == (429, "rate_limit_exceeded", 1.0)
    assert admission.admit() == [] and list(admission.queue) == [c]  # max_active
    big = sequence(tokenizer, max_tokens=29)
    e = error_of(admission.offer, big)
    assert (e.status, e.code) == (400, "context_length_exceeded")  # could never fit the KV budget
    a.cancelled = True
    assert admission.drop_cancelled() == [a] and admission.admit() == [c]
    assert admission.reserved == 20 and not admission.idle


def test_prefill_is_chunked_and_never_stalls_decoders(tokenizer):
    decoder = sequence(tokenizer, prompt=(5, 6))
    decoder.fed(2)
    decoder.accept(one_hot(70))  # decoding: its next input is 70
    long = sequence(tokenizer, prompt=tuple(range(10, 35)))  # 25 prompt tokens
    short = sequence(tokenizer, prompt=(7, 8, 9))
    steps = []
    for _ in range(4):
        plan = plan_step([decoder, long, short], prefill_chunk=10)
        steps.append([(s is decoder, s is long, len(ids)) for s, ids in plan])
        for s, ids in plan:
            s.fed(len(ids))
            if s is decoder:
                s.pending.append(71)  # as accept() would
    # the decoder feeds one token every step; the prompts share 10 tokens per step, in arrival order
    assert steps == [
        [(True, False, 1), (False, True, 10)],
        [(True, False, 1), (False, True, 10)],
        [(True, False, 1), (False, True, 5), (False, False, 3)],
        [(True, False, 1)],
    ]


class CountingExecutor:
    """Answers each row with its own input times (expert + 1); counts the rows of each call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def dispatch(self, x, experts, uids, dtype, scores=None) -> DispatchResult:
        self.calls.append(x.shape[0])
        outputs = x[:, None, :] * (experts[..., None] + 1)
        answered = torch.ones_like(experts, dtype=torch.bool)
        answered[x[:, 0] == 1.0, -1] = False  # member a's last slot is dropped: counted for a only
        return DispatchResult(outputs, answered, experts)


def test_rendezvous_merges_one_call_per_layer_and_splits_back():
    executor = CountingExecutor()
    rendezvous = StepRendezvous(executor)
    sizes = [("a", 1), ("b", 3), ("c", 2)]
    members = {name: torch.full((rows, 4), float(i + 1)) for i, (name, rows) in enumerate(sizes)}
    tallies = {name: Tally() for name in members}
    results: dict[str, list[torch.Tensor]] = {name: [] for name in members}

    def forward(name: str, layers: int) -> None:
        x = members[name]
        with rendezvous.seat(name, tallies[name]):
            for _ in range(layers):
                experts = torch.zeros(x.shape[0], 2, dtype=torch.long)
                results[name].append(rendezvous.dispatch(x, experts, ["m/0/0"], torch.float32).outputs)

    rendezvous.open(list(members))
    layers = {"a": 2, "b": 2, "c": 1}  # c leaves after one layer: the others must not wait for it
    threads = [threading.Thread(target=forward, args=(n, layers[n])) for n in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert executor.calls == [6, 4]  # one merged call per layer: all rows, then a + b
    for name, x in members.items():
        assert all(torch.equal(out, x[:, None, :].expand(-1, 2, -1)) for out in results[name])
    assert tallies["a"].as_dict() == {"exact": 2, "rerouted": 0, "dropped": 2}  # its last slot, both calls
    assert tallies["b"].as_dict() == {"exact": 12, "rerouted": 0, "dropped": 0}
    assert tallies["c"].as_dict() == {"exact": 4, "rerouted": 0, "dropped": 0}


def test_rendezvous_error_reaches_every_member():
    class Failing:
        def dispatch(self, *args, **kwargs):
            raise RuntimeError("no replica")

    rendezvous = StepRendezvous(Failing())
    errors: list[str] = []

    def forward(name: str) -> None:
        try:
            with rendezvous.seat(name, None):
                rendezvous.dispatch(torch.ones(1, 2), torch.zeros(1, 1, dtype=torch.long), ["m/0/0"], torch.float32)
        except RuntimeError as e:
            errors.append(str(e))

    rendezvous.open(["a", "b"])
    threads = [threading.Thread(target=forward, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == ["no replica", "no replica"]
