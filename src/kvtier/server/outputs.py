"""What an HTTP handler reads of a running request: ``Delta``, the new part of one completion.

The engine reports each request's whole state every step (``RequestOutput``: every token and the whole
text so far); a handler needs only what is new since its last read, and the engine process ships only
that (a pipe carries a few bytes per token, not the whole history every step). ``DeltaTracker`` turns
the engine's outputs into deltas where the engine runs: on the engine thread, or in the engine process.

Text comes from the engine (its stop-string checks decode every streamed token anyway), so the HTTP
side never detokenizes generated tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kvtier.engine.output import completion_index
from kvtier.engine.request import RequestOutput, TokenLogprob


class EngineInfo(NamedTuple):
    """What the HTTP side needs to know of its engine (sent once by an engine process when ready)."""

    model_name: str
    max_model_len: int
    vocab_size: int
    device_type: str
    num_blocks: int

    @classmethod
    def of(cls, engine: Any) -> EngineInfo:
        return cls(
            engine.loaded.name,
            engine.scheduler.limits.max_model_len,
            engine.loaded.config.vocab_size,
            engine.device.type,
            engine.num_blocks,
        )


class Delta(NamedTuple):
    """One completion's progress in one step. A NamedTuple: pickled compactly (one message a step)."""

    request_id: str  # the engine's id of this completion ("<base>#i" when n > 1)
    completion: int  # its index among its request's n completions
    token_ids: list[int]  # generated since the last delta
    text: str  # text produced since the last delta (held back while it may begin a stop string)
    logprobs: list[TokenLogprob] | None  # one per new token when logprobs were asked for
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str | None = None
    served_from: str = "model"


class DeltaTracker:
    """Per completion, how much of its tokens and text was already handed out."""

    def __init__(self) -> None:
        self._sent: dict[str, tuple[int, int]] = {}  # request id -> (tokens, text characters)

    def delta(self, out: RequestOutput) -> Delta | None:
        """What is new in ``out``; None when a handler would send nothing for it: tokens that made
        no text (yet: a partial character, text held back while it may begin a stop string, or an
        id without text), neither the completion's first nor its last, no logprobs asked for. Those
        tokens ride with the next delta, so neither the pipe nor the event loop carry or wake for
        them (the synthetic models' byte tokenizer gives text to ~260 of the 8B's 128k ids, so nearly
        every delta of its H200 run was such)."""
        c = out.outputs[0]
        k0, t0 = self._sent.get(out.request_id, (0, 0))
        if k0 and len(c.text) <= t0 and not out.finished and c.logprobs is None and out.error is None:
            return None
        tokens = c.token_ids[k0:]
        text = c.text[t0:] if len(c.text) > t0 else ""
        if out.finished:
            self._sent.pop(out.request_id, None)
        else:
            self._sent[out.request_id] = (len(c.token_ids), max(t0, len(c.text)))
        return Delta(
            out.request_id,
            c.index,
            tokens,
            text,
            c.logprobs[k0:] if c.logprobs is not None else None,
            out.finished,
            c.finish_reason,
            len(out.prompt_token_ids),
            out.num_cached_tokens,
            out.error,
            out.served_from,
        )

    def forget(self, request_id: str) -> None:
        """Drop an aborted request's counts: its own, or its completions' (``<id>#i``) when n > 1."""
        self._sent.pop(request_id, None)
        prefix = request_id + "#"
        for rid in [k for k in self._sent if k.startswith(prefix)]:
            del self._sent[rid]


def failed(request_id: str, message: str) -> Delta:
    """The last delta of a completion that can never finish (its engine is gone)."""
    return Delta(request_id, completion_index(request_id), [], "", None, True, "error", 0, 0, message)
