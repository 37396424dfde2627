"""After a step: stop checks, the ``RequestOutput`` a caller sees, and the engine's counters."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.engine.detokenizer import DetokenizerState, decode_delta, decode_rest, find_stop
from kvtier.engine.request import CompletionOutput, FinishReason, Request, RequestOutput

LATENCY_WINDOW = 10_000  # latencies kept per kind: the newest ones; the histograms see every one


class LatencyLog:
    """The newest ``keep`` latencies, in order, and how many were ever recorded.

    A list here grew by three floats per request forever (3.9 MiB over 3,000 requests with its
    neighbours). Readers that want every value (the metrics histograms) ask for ``since(n)``, the
    values recorded after the first ``n``, often enough not to miss any (each scrape or update).
    """

    def __init__(self, keep: int = LATENCY_WINDOW) -> None:
        self._values: deque[float] = deque(maxlen=keep)
        self.count = 0  # ever recorded

    def append(self, value: float) -> None:
        self._values.append(value)
        self.count += 1

    def since(self, seen: int) -> list[float]:
        """The values recorded after the first ``seen`` (those still kept: at most ``keep``)."""
        new = min(self.count - seen, len(self._values))
        return list(itertools.islice(self._values, len(self._values) - new, None)) if new > 0 else []

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[float]:
        return iter(self._values)

    def __getitem__(self, index: int) -> float:
        return self._values[index]


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # prompt tokens of finished requests
    cached_prompt_tokens: int = 0  # of those, served from the cache
    loaded_prompt_tokens: int = 0  # of those, loaded from a tier below the device pool
    computed_tokens: int = 0  # tokens run through the model (prefill chunks + decodes + recompute)
    generated_tokens: int = 0
    steps: int = 0
    finished: int = 0
    oom_steps: int = 0  # steps that ran out of device memory (the step budget was halved)
    # the step loop's own costs: wall time in step(), of it waiting for the device, and (CUDA) the
    # device's time in steps and idle between them (the host was late: what overlap must hide)
    step_seconds: float = 0.0
    wait_seconds: float = 0.0
    device_busy_seconds: float = 0.0
    device_idle_seconds: float = 0.0
    # set to a list to record every step read back: (rows, tokens, launch s, wait s, busy s, idle s)
    step_trace: list[tuple[int, int, float, float, float, float]] | None = None
    ttft: LatencyLog = field(default_factory=LatencyLog)
    e2e: LatencyLog = field(default_factory=LatencyLog)  # arrival to finish, finished requests
    tpot: LatencyLog = field(default_factory=LatencyLog)  # (finish - first token) / (tokens - 1), > 1 token

    @property
    def hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def record_finish(self, req: Request) -> None:
        self.finished += 1
        self.prompt_tokens += len(req.prompt_token_ids)
        self.cached_prompt_tokens += max(req.num_cached_tokens, 0)
        self.loaded_prompt_tokens += req.num_loaded_tokens
        if req.finish_time is not None:
            self.e2e.append(req.finish_time - req.arrival_time)
        if req.first_token_time is not None:
            self.ttft.append(req.first_token_time - req.arrival_time)
            if req.finish_time is not None and len(req.output_token_ids) > 1:
                self.tpot.append((req.finish_time - req.first_token_time) / (len(req.output_token_ids) - 1))


def check_stop(
    req: Request, token: int, tokenizer: Any, detok: DetokenizerState, max_model_len: int
) -> FinishReason | None:
    """Why ``req`` stops after ``token`` (a stop string, EOS, a stop id, a length), or None.
    Extends ``req.output_text`` by the token's text as a side effect, when there is a tokenizer."""
    p = req.params
    if tokenizer is not None and (p.stop or req.stream):  # else the text is decoded once, at the end
        before = len(req.output_text)
        req.output_text += decode_delta(tokenizer, req.output_token_ids, detok)
        found = find_stop(req.output_text, before, p.stop) if p.stop else None
        if found:
            idx, stop = found
            req.output_text = req.output_text[: idx + (len(stop) if p.include_stop_str_in_output else 0)]
            req.stop_reason = stop
            return FinishReason.STOP
    if (not p.ignore_eos and token in req.eos_token_ids) or token in p.stop_token_ids:
        req.stop_reason = token
        return FinishReason.STOP
    if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


def finish_text(req: Request, tokenizer: Any, detok: DetokenizerState) -> None:
    """A finished request's text: what the incremental decoding has not produced yet, at once
    (a request that reports only at the end decodes its whole output here, once)."""
    if not (req.params.stop or req.stream):  # the others were decoded token by token
        req.output_text += decode_rest(tokenizer, req.output_token_ids, detok)


def make_output(req: Request) -> RequestOutput:
    """The caller's view of ``req`` now (text held back while it may begin a stop string)."""
    metrics: dict[str, Any] = {
        "num_preemptions": req.num_preemptions,
        "num_loaded_tokens": req.num_loaded_tokens,
    }
    if req.first_token_time is not None:
        metrics["ttft"] = req.first_token_time - req.arrival_time
    if req.finish_time is not None:
        metrics["e2e"] = req.finish_time - req.arrival_time
    completion = CompletionOutput(
        index=completion_index(req.request_id),
        token_ids=list(req.output_token_ids),
        text=req.output_text if req.is_finished else holding_back_stops(req.output_text, req.params.stop),
        finish_reason=req.finish_reason.value if req.finish_reason else None,
        logits=torch.stack(req.step_logits) if req.step_logits else None,
        logprobs=list(req.output_logprobs) if req.params.logprobs is not None else None,
    )
    return RequestOutput(
        req.request_id,
        req.prompt,
        req.prompt_token_ids,
        [completion],
        req.is_finished,
        max(req.num_cached_tokens, 0),
        metrics,
        req.error,
    )


def holding_back_stops(text: str, stops: list[str]) -> str:
    """``text`` less its longest ending that begins a stop string: a stream must never send text
    that the stop string, once complete, would take back."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return text[: len(text) - hold]


def completion_index(request_id: str) -> int:
    """``base#i`` is completion i of a request with n > 1; a plain id is completion 0."""
    return int(request_id.rsplit("#", 1)[1]) if "#" in request_id else 0
