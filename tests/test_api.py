"""moe-swarm api against a real local swarm, through the real openai client.

One swarm (bootstrap + two peers) and two gateways per module: `wide` (8 slots) and
`narrow` (1 slot, a queue of 1) for the limits, disconnects and the SIGTERM drain. Both
start before any peer, so their first answers are 503s.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoTokenizer

from coordinator.bench.harness import local_hf_model
from coordinator.models.tiny import save_tiny_checkpoint
from coordinator.sim.local_swarm import LocalSwarm, Process

MODEL = "tiny-mixtral"
LAYERS = 2  # MoE layers of the tiny Mixtral
TOP_K = 2
TEMPLATE = "{% for m in messages %}<s>{{ m.role }}: {{ m.content }}</s>{% endfor %}<s>assistant:"
PROMPTS = ["the swarm of experts", "a mixture", "volunteers host experts on home", "tokens", "routes each token",
           "coordinators run", "the dense trunk and", "every token it is given"]  # fmt: skip


@dataclass
class Gateway:
    proc: Process
    url: str
    first_answer: tuple[int, Message, dict]  # status, headers, body of a request sent before any peer

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120, **kw)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float:
        """The value of one unlabelled sample of /metrics."""
        text = self.get("/metrics")[1]
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert found, f"{name} not in /metrics"
        return float(found.group(1))


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, Message, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def start_gateways(swarm: LocalSwarm, ckpt: Path, flags: dict[str, list[str]]) -> list[Gateway]:
    """Gateways by name, started together; each sends one request at once (before any peer: 503)."""
    argv = ["-m", "coordinator", "api", "--model", str(ckpt), "--served-model-name", MODEL, "--port", "0"]
    tail = ["--threads", "1", "--initial-peers", *swarm.initial_peers]
    procs = swarm.start_processes({name: [*argv, *extra, *tail] for name, extra in flags.items()})
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    urls = [f"http://127.0.0.1:{proc.info['port']}" for proc in procs]
    return [Gateway(proc, url, post(f"{url}/v1/completions", body)) for proc, url in zip(procs, urls, strict=True)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("api") / "ckpt", "mixtral", seed=1)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gateways(tmp_path_factory, ckpt):
    with LocalSwarm(tmp_path_factory.mktemp("api-swarm")) as swarm:
        swarm.start_bootstrap()
        wide, narrow = start_gateways(
            swarm, ckpt, {"api-wide": ["--max-active", "8"], "api-narrow": ["--max-active", "1", "--max-queue", "1"]}
        )
        specs = {"peer0": "*:0-3", "peer1": "*:4-7"}
        swarm.start_peers({name: ["--model", str(ckpt), "--experts", s, "--threads", "1"] for name, s in specs.items()})
        for gw in (wide, narrow):
            deadline = time.monotonic() + 60
            while gw.get("/health")[0] != 200:  # the gateway's swarm view refreshes every 5 s
                assert time.monotonic() < deadline, gw.get("/health")
                time.sleep(0.2)
        yield swarm, wide, narrow


@pytest.fixture(scope="module")
def wide(gateways) -> Gateway:
    return gateways[1]


@pytest.fixture(scope="module")
def narrow(gateways) -> Gateway:
    return gateways[2]


@pytest.fixture(scope="module")
def local_greedy(ckpt):
    model = local_hf_model(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)

    def run(prompt: str, max_tokens: int) -> str:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(ids))
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return run


def test_503_with_retry_after_until_every_expert_has_a_replica(wide):
    status, headers, body = wide.first_answer
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert body["error"]["type"] == "service_unavailable" and body["error"]["code"] == "experts_unavailable"
    assert "0 of this model's 16 experts" in body["error"]["message"]
    assert [m.id for m in wide.client().models.list().data] == [MODEL]


def test_completion_equals_the_local_model_and_counts_every_pair(wide, local_greedy):
    answer = wide.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert answer.choices[0].text == local_greedy(PROMPTS[0], 12)
    assert answer.choices[0].finish_reason == "length" and answer.object == "text_completion"
    usage = answer.usage
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12
    fed = usage.prompt_tokens + 12 - 1  # every token but the last went through the model
    assert answer.x_moe_swarm == {"exact": fed * LAYERS * TOP_K, "rerouted": 0, "dropped": 0}


def test_streaming_equals_whole_answers_chat_uses_the_template(wide, ckpt):
    client = wide.client()
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].x_moe_swarm == whole.x_moe_swarm

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False).input_ids)
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens and not chunks[-1].choices


def test_stop_and_seed(wide):
    client = wide.client()
    free = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0).choices[0].text
    stop = free[3:5]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"
    hot = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 1.5}
    sampled = [client.completions.create(**hot, seed=s).choices[0].text for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2]


def ask(client: openai.OpenAI, i: int) -> str:
    """Request i of the concurrency test: chat or completion, streamed or not, greedy or seeded."""
    sampling = {"temperature": 0} if i % 3 else {"temperature": 1.0, "seed": i, "top_p": 0.9}
    if i % 2:
        messages = [{"role": "user", "content": PROMPTS[i]}]
        if i % 4 == 1:
            return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, **sampling)\
                .choices[0].message.content  # fmt: skip
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, stream=True, **sampling)
        return "".join(c.choices[0].delta.content or "" for c in stream)
    if i % 4 == 0:
        return client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=16, **sampling).choices[0].text
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[i], max_tokens=16, stream=True, **sampling)
    return "".join(c.choices[0].text for c in stream)


def test_eight_concurrent_clients_each_get_their_solo_answer(wide):
    client = wide.client()
    solo = [ask(client, i) for i in range(8)]
    steps_before, calls_before = wide.metric("moe_swarm_api_steps_total"), wide.metric("moe_swarm_layer_calls_total")
    together: list[str | None] = [None] * 8
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        barrier.wait()
        together[i] = ask(wide.client(), i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == solo  # none lost, none changed
    steps = wide.metric("moe_swarm_api_steps_total") - steps_before
    calls = wide.metric("moe_swarm_layer_calls_total") - calls_before
    assert calls == steps * LAYERS  # the swarm saw one layer call per MoE layer per step, all rows in it
    assert steps < 8 * 16  # sequences shared steps: fewer steps than tokens generated
    assert wide.metric("moe_swarm_api_batch_size_bucket{le=\"4.0\"}") < wide.metric("moe_swarm_api_batch_size_count")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "gpt-4", "prompt": "x"}, 404, "model_not_found"),
        ({"model": MODEL, "prompt": "x" * 2000, "max_tokens": 8}, 400, "context_length_exceeded"),
        ({"model": MODEL, "prompt": "x", "temperature": 9}, 400, "invalid_value"),
        ({"model": MODEL, "prompt": "x", "n": 3}, 400, "invalid_value"),
        ({"model": MODEL, "messages": "hi"}, 400, "invalid_type"),
    ],
)
def test_bad_requests_get_openai_error_objects(wide, body, status, code):
    path = "chat/completions" if "messages" in body else "completions"
    got, _, answer = post(f"{wide.url}/v1/{path}", json.dumps(body).encode())
    assert got == status and answer["error"]["code"] == code and answer["error"]["message"]
    errors = {404: openai.NotFoundError, 400: openai.BadRequestError}
    with pytest.raises(errors[status]) as e:
        wide.client().post(f"/{path}", body=body, cast_to=object)
    assert e.value.code == code


def test_malformed_and_oversized_bodies(wide):
    status, _, answer = post(f"{wide.url}/v1/completions", b"{not json")
    assert status == 400 and answer["error"]["code"] == "invalid_json"
    # a body larger than any valid request is refused from its declared length, unread
    conn = http.client.HTTPConnection("127.0.0.1", int(wide.url.rpartition(":")[2]), timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["type"] == "invalid_request_error"
    conn.close()
    assert wide.get("/v1/nothing")[0] == 404


def test_full_queue_429_and_a_disconnect_frees_the_slot(narrow):
    client = narrow.client()
    tokens_before = narrow.metric("moe_swarm_api_completion_tokens_total")
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True)
    next(iter(stream))  # running: the only slot is taken
    queued: list[str] = []
    waiter = threading.Thread(
        target=lambda: queued.append(
            client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=4, temperature=0).choices[0].text
        )
    )
    waiter.start()
    deadline = time.monotonic() + 30
    while narrow.metric("moe_swarm_api_queue_depth") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.code == "rate_limit_exceeded" and int(e.value.response.headers["Retry-After"]) >= 1
    stream.close()  # the client goes away mid-stream
    waiter.join(60)
    assert len(queued) == 1  # the queued request ran in the freed slot
    assert narrow.metric("moe_swarm_api_cancelled_total") == 1
    assert narrow.metric("moe_swarm_api_active_sequences") == 0
    # the abandoned stream stopped early: far fewer than its 200 tokens were generated
    assert narrow.metric("moe_swarm_api_completion_tokens_total") - tokens_before < 100


def test_sigterm_drains_in_flight_streams_and_refuses_new_requests(wide, narrow):
    expected = wide.client().completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=40, temperature=0)
    client = narrow.client()
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=40, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    narrow.proc.signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while narrow.get("/health")[0] != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.status_code == 503 and "shutting down" in str(e.value)
    rest = list(chunks)  # the stream goes on to its end
    assert rest[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert first.choices[0].text + "".join(c.choices[0].text for c in rest) == expected.choices[0].text
    assert narrow.proc.popen.wait(60) == 0 and "drained" in narrow.proc.log_tail()


def test_a_dead_peer_is_rerouted_and_the_answer_says_so(gateways, wide):
    """Last: it kills a peer. Until its DHT record expires the gateway still accepts requests;
    the dispatcher reroutes the dead peer's experts and x_moe_swarm reports it."""
    swarm = gateways[0]
    dead = next(p for p in swarm.processes if p.name == "peer1")  # experts 4-7 of every layer
    swarm.stop(dead, signal.SIGKILL)
    answer = wide.client().completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=8, temperature=0)
    honesty = answer.x_moe_swarm
    fed = answer.usage.prompt_tokens + answer.usage.completion_tokens - 1
    assert honesty["rerouted"] > 0 and honesty["dropped"] == 0
    assert honesty["exact"] + honesty["rerouted"] == fed * LAYERS * TOP_K
