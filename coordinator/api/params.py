"""OpenAI request bodies -> validated generation requests (or one ApiError naming the field).

Every limit follows from what a valid request can be: the prompt and its completion fit
the model's context, at most four stop strings (OpenAI's own limit), n = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.api.errors import ApiError, bad_param

MAX_STOPS = 4
MAX_STOP_CHARS = 256
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ROLES = ("system", "developer", "user", "assistant", "tool")
# fields the gateway does not implement: accepted only at their neutral values
_NEUTRAL: dict[str, tuple] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "best_of": (None, 1),
}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    kind: str  # "completion" or "chat"
    model: str  # the name the answer carries
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_param(name, f"{name} must be a number, got {type(value).__name__}", "invalid_type")
    if value > hi or value < lo or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise bad_param(name, f"{name} must be in {interval}, got {value}")
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad_param(name, f"{name} must be an integer, got {type(value).__name__}", "invalid_type")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_param(name, f"{name} must be true or false", "invalid_type")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_param("stop", "stop must be a string or a list of strings", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise bad_param("stop", f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_param("stop", f"each stop sequence is 1 to {MAX_STOP_CHARS} characters")
    return tuple(stops)


class RequestParser:
    """Validates bodies against one served model: its names, tokenizer and context length."""

    def __init__(self, tokenizer: Any, names: tuple[str, ...], context_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.names = names  # the first is the name answers carry
        self.context_tokens = context_tokens
        self.vocab = len(tokenizer)

    def completion(self, body: Any) -> GenerationRequest:
        body = self._common(body)
        ids = self._prompt_ids(body.get("prompt"))
        return self._request("completion", body, ids, COMPLETION_DEFAULT_MAX_TOKENS)

    def chat(self, body: Any) -> GenerationRequest:
        body = self._common(body)
        ids = self._chat_ids(body.get("messages"))
        return self._request("chat", body, ids, None, body.get("max_completion_tokens"))

    def _common(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise bad_param("model", "model is required: the name /v1/models lists", "missing_required_parameter")
        if model not in self.names:
            raise ApiError(
                404, f"The model {model!r} does not exist; this gateway serves {self.names[0]!r}",
                param="model", code="model_not_found",
            )  # fmt: skip
        if body.get("n") not in (None, 1):
            raise bad_param("n", f"n must be 1 (one choice per request), got {body.get('n')!r}")
        for name, neutral in _NEUTRAL.items():
            if body.get(name) not in neutral:
                raise bad_param(name, f"{name} is not supported by this gateway", "unsupported_parameter")
        return body

    def _request(
        self, kind: str, body: dict, ids: list[int], default_max: int | None, alias: Any = None
    ) -> GenerationRequest:
        room = self.context_tokens - len(ids)
        max_tokens = _integer(body, "max_tokens")
        if max_tokens is None and alias is not None:
            max_tokens = _integer({"max_completion_tokens": alias}, "max_completion_tokens")
        if max_tokens is not None and max_tokens < 1:
            raise bad_param("max_tokens", f"max_tokens must be at least 1, got {max_tokens}")
        wanted = max_tokens if max_tokens is not None else (default_max or room)
        if len(ids) + max(wanted, 1) > self.context_tokens or room < 1:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context_tokens} tokens; the prompt has {len(ids)} "
                f"and {wanted} more were requested",
                param="max_tokens" if room >= 1 else ("prompt" if kind == "completion" else "messages"),
                code="context_length_exceeded",
            )
        seed = _integer(body, "seed")
        if seed is not None and not -(2**63) <= seed < 2**63:
            raise bad_param("seed", "seed must fit in 64 bits")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise bad_param("stream_options", "stream_options must be an object", "invalid_type")
        sampling = Sampling(
            max_tokens=min(wanted, room),
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
            seed=seed,
            stop=_stops(body),
        )
        return GenerationRequest(
            kind, self.names[0], tuple(ids), sampling, _flag(body, "stream"), _flag(options, "include_usage")
        )

    # ---- prompts --------------------------------------------------------------------------
    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            ids = self._encode(prompt, True, "prompt")
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if any(not 0 <= t < self.vocab for t in prompt):
                raise bad_param("prompt", f"token ids must be in [0, {self.vocab})")
            ids = list(prompt)
        else:
            raise bad_param(
                "prompt", "prompt must be a string or a list of token ids (one prompt per request)", "invalid_type"
            )
        if not ids:
            raise bad_param("prompt", "the prompt is empty")
        return ids

    def _encode(self, text: str, special: bool, param: str) -> list[int]:
        if len(text) > self.context_tokens * 64:  # no prompt that fits is this long (no token is 64 characters)
            raise ApiError(
                400, f"This model's maximum context length is {self.context_tokens} tokens; the prompt is longer",
                param=param, code="context_length_exceeded",
            )  # fmt: skip
        return list(self.tokenizer(text, add_special_tokens=special).input_ids)

    def _chat_ids(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise bad_param("messages", "messages must be a non-empty list", "invalid_type")
        plain = [self._message(i, m) for i, m in enumerate(messages)]
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # the template's own raise_exception (e.g. roles out of order)
                raise bad_param("messages", f"the model's chat template refused the messages: {e}") from None
            return self._encode(text, False, "messages") or self._missing("messages")
        # no template: one "role: content" line per message, then the assistant's turn
        text = "".join(f"{m['role']}: {m['content']}\n" for m in plain) + "assistant:"
        return self._encode(text, True, "messages")

    @staticmethod
    def _missing(param: str) -> list[int]:
        raise bad_param(param, "the messages give an empty prompt")

    @staticmethod
    def _message(index: int, message: Any) -> dict[str, str]:
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad_param(where, f"{where} needs a role among {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise bad_param(where, f"{where}: only text content parts are supported", "unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad_param(where, f"{where}.content must be a string or a list of text parts", "invalid_type")
        return {"role": message["role"], "content": content}
