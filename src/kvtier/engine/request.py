"""Request, SamplingParams, RequestOutput and the states a request moves through."""

from __future__ import annotations

import enum
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.cache.hierarchy import LoadPlan
from kvtier.cache.keys import BlockKey


class InvalidRequestError(ValueError):
    """Bad input: the message names the problem and the limit. The engine keeps serving."""


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
    ignore_eos: bool = False
    n: int = 1
    include_stop_str_in_output: bool = False
    return_logits: bool = False  # keep each sampled step's logits (tests and debugging)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise bad(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {value}")
        if self.n < 1:
            raise bad(f"n must be >= 1, got {self.n}")
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise bad(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")
        if any(not s for s in self.stop):
            raise bad("stop strings must be non-empty")


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
    num_computed_tokens: int = 0  # tokens whose KV is in the pool
    block_table: list[int] = field(default_factory=list)
    block_keys: list[BlockKey] = field(default_factory=list)  # keys of full blocks, in order
    num_committed_blocks: int = 0  # leading blocks registered in the pool's key map
    num_cached_tokens: int = -1  # prompt tokens found in the cache at first admission
    num_loaded_tokens: int = 0  # of those, loaded from a tier below the device pool
    load_future: Future[torch.Tensor] | None = None
    tier_plan: tuple[int, LoadPlan] | None = None  # (device hit blocks, plan) while waiting for room
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None
    wait_for: Request | None = None  # n > 1: siblings wait for the first prefill, then share its blocks
    output_text: str = ""
    step_logits: list[torch.Tensor] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None

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
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logits: torch.Tensor | None = None  # [num_tokens, vocab] float32 when params.return_logits


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
