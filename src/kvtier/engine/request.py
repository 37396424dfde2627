"""Request, SamplingParams, RequestOutput and the states a request moves through."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from kvtier.cache.hierarchy import LayeredLoad, LoadPlan, PendingLoad
from kvtier.cache.keys import BlockKey


class InvalidRequestError(ValueError):
    """Bad input: the message names the problem and the limit. The engine keeps serving."""


MAX_LOGPROBS = 20  # top alternatives per token, OpenAI's limit


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature and penalties, as
    vLLM and OpenAI report it) and the ``top`` most likely tokens at that step, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = disabled
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    ignore_eos: bool = False
    n: int = 1
    include_stop_str_in_output: bool = False
    return_logits: bool = False  # keep each sampled step's logits (tests and debugging)
    logprobs: int | None = None  # per generated token: its logprob and this many top alternatives
    result_cache: bool = True  # False: never served from (nor stored in) the result cache

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the parameter and its limit for anything the step could
        not run: wrong types (a str temperature, a float n, a bool top_k), NaN or infinite numbers,
        ``stop`` given as one string (it would stop at any of its characters)."""
        _integer("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature, 0.0, MAX_TEMPERATURE, TEMPERATURE_LIMIT)
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / t overflows float32: wrong tokens, not greedy
            raise InvalidRequestError(f"{TEMPERATURE_LIMIT}; got {self.temperature}")
        _number("top_p", self.top_p, 0.0, 1.0, "top_p must be in (0, 1]", open_low=True)
        _integer("top_k", self.top_k, 0, "top_k must be an integer >= 0 (0 disables it)")
        _number("min_p", self.min_p, 0.0, 1.0, "min_p must be in [0, 1]")
        _number("repetition_penalty", self.repetition_penalty, MIN_PENALTY, MAX_PENALTY, PENALTY_LIMIT)
        for name in ("presence_penalty", "frequency_penalty"):
            _number(name, getattr(self, name), -2.0, 2.0, f"{name} must be in [-2, 2]")
        _integer("n", self.n, 1, f"n must be >= 1 and <= {MAX_N}", high=MAX_N)
        if self.seed is not None:
            _integer("seed", self.seed, None, "seed must be an integer or None")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, f"logprobs must be in [0, {MAX_LOGPROBS}]", MAX_LOGPROBS)
        for f in fields(self):  # every flag, including ones added later
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise InvalidRequestError(
                    f"{f.name} must be true or false, got {_show(getattr(self, f.name))}"
                )
        self._validate_stops(vocab_size)
        self._validate_logit_bias(vocab_size)

    def _validate_logit_bias(self, vocab_size: int) -> None:
        """OpenAI's: token ids of the vocabulary, each mapped to a bias in [-100, 100]."""
        bias = self.logit_bias
        if not isinstance(bias, dict):
            raise InvalidRequestError(f"logit_bias must map token ids to numbers, got {_show(bias)}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
        for token, value in bias.items():
            if not _is_int(token):
                raise InvalidRequestError(f"logit_bias keys must be integer token ids, got {_show(token)}")
            if not 0 <= token < vocab_size:
                raise InvalidRequestError(
                    f"logit_bias token id {_show(token)} is outside the vocabulary [0, {vocab_size})"
                )
            _number(
                "logit_bias",
                value,
                -MAX_BIAS,
                MAX_BIAS,
                f"logit_bias values must be in [-{MAX_BIAS:g}, {MAX_BIAS:g}]",
            )

    def _validate_stops(self, vocab_size: int) -> None:
        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)):
            hint = " (one stop string? wrap it in a list)" if isinstance(self.stop, str) else ""
            raise InvalidRequestError(f"stop must be a list of strings{hint}, got {_show(self.stop)}")
        if len(self.stop) > MAX_STOPS:
            raise InvalidRequestError(f"stop has {len(self.stop)} strings; at most {MAX_STOPS} are allowed")
        for s in self.stop:
            if not isinstance(s, str):
                raise InvalidRequestError(f"stop must be a list of strings, got an element {_show(s)}")
            if not s:
                raise InvalidRequestError("stop strings must be non-empty")
            check_text("a stop string", s)
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(
            self.stop_token_ids, (list, tuple)
        ):
            raise InvalidRequestError(
                f"stop_token_ids must be a list of token ids, got {_show(self.stop_token_ids)}"
            )
        for t in self.stop_token_ids:
            if not _is_int(t):
                raise InvalidRequestError(f"stop_token_ids must hold integers, got an element {_show(t)}")
            if not 0 <= t < vocab_size:
                raise InvalidRequestError(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")


# Beyond these float32 sampling overflows (t -> 0 or a penalty -> 0 divides by zero) and picks token 0.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-5, 1e4
TEMPERATURE_LIMIT = f"temperature must be >= 0: 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
MIN_PENALTY, MAX_PENALTY = 1e-2, 1e2
PENALTY_LIMIT = f"repetition_penalty must be in [{MIN_PENALTY:g}, {MAX_PENALTY:g}] (1 disables it)"
MAX_N = 256  # completions per request: each is a request of its own in the scheduler
MAX_STOPS = 64  # stop strings are searched in every step's new text
MAX_LOGIT_BIAS, MAX_BIAS = 1024, 100.0  # entries a request; OpenAI's range of a bias


def _show(value: Any) -> str:
    """``value`` for an error message: its type and a short repr (never the whole of a huge input)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_int(value: Any) -> bool:
    """A true integer: bools are refused (True would silently mean 1), numpy integers accepted."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _integer(
    name: str, value: Any, low: int | None, limit: str | None = None, high: int | None = None
) -> None:
    limit = limit or f"{name} must be an integer >= {low}"
    if not _is_int(value):
        raise InvalidRequestError(f"{limit}; got {_show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidRequestError(f"{limit}; got {value}")


def _number(
    name: str, value: Any, low: float, high: float | None, limit: str, open_low: bool = False
) -> None:
    """A finite real in [low, high] ((low, high] when ``open_low``): NaN and inf are refused."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise InvalidRequestError(f"{limit}; got {_show(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400)
        raise InvalidRequestError(f"{limit}; got an integer of {len(str(value))} digits") from None
    if not finite:
        raise InvalidRequestError(f"{limit} and finite; got {value}")
    if value < low or (open_low and value == low) or (high is not None and value > high):
        raise InvalidRequestError(f"{limit}; got {value}")


def check_text(what: str, text: str) -> None:
    """Text must be encodable as UTF-8: a lone surrogate (from a broken JSON escape) is not."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{what} is not valid Unicode: character {e.start} ({text[e.start : e.end]!r}) is a lone "
            "surrogate"
        ) from None


def check_params(params: Any) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        hint = ": build one with SamplingParams(**values)" if isinstance(params, dict) else ""
        raise InvalidRequestError(f"params must be a SamplingParams{hint}, got {_show(params)}")
    return params


def check_cache_salt(salt: Any) -> str | None:
    if salt is None:
        return None
    if not isinstance(salt, str):
        raise InvalidRequestError(f"cache_salt must be a string or None, got {_show(salt)}")
    if len(salt) > MAX_SALT_CHARS:
        raise InvalidRequestError(f"cache_salt has {len(salt)} characters; at most {MAX_SALT_CHARS}")
    check_text("cache_salt", salt)
    return salt


MAX_SALT_CHARS = 1024


def check_request_id(request_id: Any) -> str | None:
    if request_id is None:
        return None
    if not isinstance(request_id, str) or not request_id or "#" in request_id:
        raise InvalidRequestError(
            f"request_id must be a non-empty string without '#' (it separates n > 1 completions), "
            f"got {_show(request_id)}"
        )
    return request_id


def completion_ids(request_id: str, n: int) -> list[str]:
    """The ids of a request's ``n`` completions: the request's own id, or ``id#0 .. id#n-1``."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


def check_prompt_ids(prompt: Any, vocab_size: int) -> list[int]:
    """A list or tuple of token ids in the vocabulary. Anything else (bytes, a dict, a float, a bool,
    None, a number, an array or tensor) is refused rather than coerced into ids."""
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        raise InvalidRequestError(
            f"a prompt must be a str or a list of token ids, got a {type(prompt).__name__}: "
            "pass prompt.tolist()"
        )
    if not isinstance(prompt, (list, tuple)):
        raise InvalidRequestError(f"a prompt must be a str or a list of token ids, got {_show(prompt)}")
    if prompt and all(type(t) is int for t in prompt) and min(prompt) >= 0 and max(prompt) < vocab_size:
        return list(prompt)  # the common case, checked at C speed: 1.7 us a token otherwise
    ids: list[int] = []
    for i, t in enumerate(prompt):
        if not _is_int(t):
            raise InvalidRequestError(f"token ids must be integers; token {i} is {_show(t)}")
        t = int(t)
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"token id {t} is outside the vocabulary [0, {vocab_size})")
        ids.append(t)
    return ids


class RequestState(enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"  # holds its blocks while the hierarchy fetches KV from a lower tier
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"
    ERROR = "error"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None

    state: RequestState = RequestState.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the pool (or being written by a launched step)
    num_pending: int = 0  # sampled by a launched step, still on the device: not in output_token_ids yet
    stream: bool = True  # step() reports its progress every step; False: its final output only
    block_table: list[int] = field(default_factory=list)
    block_keys: list[BlockKey] = field(default_factory=list)  # keys of full blocks, in order
    num_committed_blocks: int = 0  # leading blocks registered in the pool's key map
    num_cached_tokens: int = -1  # prompt tokens found in the cache at first admission
    num_loaded_tokens: int = 0  # of those, loaded from a tier below the device pool
    load_future: PendingLoad | None = None
    # a load copied layer by layer with the first step that runs the request, until that step is
    # collected and the load's integrity verdict read (Scheduler.settle_layered)
    layered_load: LayeredLoad | None = None
    tier_plan: tuple[int, LoadPlan] | None = None  # (device hit blocks, plan) while waiting for room
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    wait_for: Request | None = None  # n > 1: siblings wait for the first prefill, then share its blocks
    output_text: str = ""
    step_logits: list[torch.Tensor] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # when params.logprobs is set
    first_token_time: float | None = None
    finish_time: float | None = None
    result_key: BlockKey | None = None  # set when the answer goes to the result cache at finish

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (a decode asks for one)."""
        split = len(self.prompt_token_ids)
        if start >= split:
            return self.output_token_ids[start - split : end - split]
        if end <= split:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - split]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        """The tokens the next step may compute up to: the known ones and those still on the device."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    def ends_with_pending(self, max_model_len: int) -> bool:
        """Its pending token will finish it by length: nothing more to schedule."""
        return self.num_pending > 0 and (
            len(self.output_token_ids) + self.num_pending >= self.params.max_tokens
            or self.num_tokens_with_pending >= max_model_len
        )

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logits: torch.Tensor | None = None  # [num_tokens, vocab] float32 when params.return_logits
    logprobs: list[TokenLogprob] | None = None  # one per token when params.logprobs is set


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int  # prompt tokens that came from the cache instead of prefill
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    served_from: str = "model"  # "model", or "result-cache" for an answer stored earlier (no model work)
