"""The two completion endpoints' flow: prompts -> engine requests -> an OpenAI body or an SSE stream.

Every check that can fail (model, parameters, prompt length, queue room) runs before the first byte
of a stream is sent, so a bad request always gets its proper status. A request's completions (``n``)
and prompts (a list of prompts) run concurrently in the engine; their choices are indexed
``prompt_index * n + completion_index`` as OpenAI does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from kvtier.engine.request import SamplingParams, TokenLogprob
from kvtier.server.loop import RequestStream, ShuttingDown
from kvtier.server.outputs import Delta
from kvtier.server.protocol import BadParam, envelope, error_body, new_id, usage

if TYPE_CHECKING:
    from kvtier.server.app import ServerState


class ClientDisconnected(Exception):
    """The client of a non-streaming request went away; its requests were aborted."""


class EngineFailure(RuntimeError):
    """The engine finished a request with an error (its own failure; others keep running): HTTP 500."""


@dataclass
class Job:
    """One HTTP request's engine requests (one per prompt), and how to format what they produce."""

    state: ServerState
    chat: bool
    model: str
    include_usage: bool
    n: int
    want_logprobs: bool
    streaming: bool = False
    rid: str = field(default_factory=lambda: new_id("cmpl"))
    streams: list[RequestStream] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.chat:
            return "chat.completion.chunk" if self.streaming else "chat.completion"
        return "text_completion"


def resolve_max_tokens(
    requested: int | None, prompt_len: int, max_model_len: int, prompt_param: str, name: str = "max_tokens"
) -> int:
    """The tokens to generate: ``requested`` (the parameter ``name``), or what the context leaves."""
    if prompt_len >= max_model_len:
        raise BadParam(
            f"the prompt has {prompt_len} tokens; the model's context is {max_model_len} tokens, "
            "and at least one must be left to generate",
            prompt_param,
        )
    if requested is None:
        return max_model_len - prompt_len
    if requested < 1:
        raise BadParam(f"{name} must be >= 1, got {requested}", name)
    if prompt_len + requested > max_model_len:
        raise BadParam(
            f"{name}={requested} plus the prompt's {prompt_len} tokens is more than the model's "
            f"context of {max_model_len} tokens",
            name,
        )
    return requested


async def submit_all(
    job: Job, prompts: list[list[int]], params: list[SamplingParams], salt: str | None
) -> None:
    """Queue every prompt; if one is refused, the ones already queued are aborted. A stream's
    prompts share one queue: their deltas reach the handler in the order they are made."""
    queue: asyncio.Queue[Delta | None] = asyncio.Queue()
    try:
        for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            rid = job.rid if len(prompts) == 1 else f"{job.rid}-{i}"
            shared = queue if job.streaming else None
            job.streams.append(await job.state.loop.submit(rid, ids, p, salt, not job.streaming, shared))
    except BaseException:
        release_all(job)
        raise


def release_all(job: Job) -> None:
    for s in job.streams:
        job.state.loop.release(s)
    job.streams.clear()


# -- non-streaming ------------------------------------------------------------------------------


async def collect(job: Job, request: Request) -> dict[str, Any]:
    """Wait for every completion; a client that disconnects meanwhile cancels this (and aborts):
    ``ClientDisconnected``, which the app answers quietly (no traceback logged per client)."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, asyncio.current_task()))
    finals: list[list[Finished]] = []
    try:
        for stream in job.streams:
            done: dict[int, Finished] = {}
            while (d := await stream.queue.get()) is not None:
                _raise_if_failed(stream, d)
                done.setdefault(d.completion, Finished(d.completion)).add(d)
            _raise_if_failed(stream)
            finals.append([done[i] for i in sorted(done)])
    except asyncio.CancelledError:
        if not getattr(request.state, "client_gone", False):
            raise  # the server cancels it (shutdown): not ours to swallow
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        raise ClientDisconnected("the client closed its connection before the answer") from None
    finally:
        watcher.cancel()
        release_all(job)
    choices = []
    for p, outs in enumerate(finals):
        for f in outs:
            text = "".join(f.text)
            choices.append(_choice(job, p * job.n + f.index, text, f.logprobs, f.finish_reason))
    return envelope(job.kind, job.rid, job.model, choices, usage=_usage(finals))


@dataclass
class Finished:
    """One completion, put together from its deltas."""

    index: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    served_from: str = "model"
    text_offset: int = 0  # a stream's logprobs: where the next token's text starts in the completion

    def add(self, d: Delta) -> None:
        self.text.append(d.text)
        self.logprobs += d.logprobs or []
        self.count(d)

    def count(self, d: Delta) -> None:
        """What the usage needs (a stream sends the text and logprobs as they come: not kept)."""
        self.num_tokens += len(d.token_ids)
        self.finish_reason = d.finish_reason
        self.num_prompt_tokens, self.num_cached_tokens = d.num_prompt_tokens, d.num_cached_tokens
        self.served_from = d.served_from


# -- streaming ----------------------------------------------------------------------------------


async def stream_events(job: Job, request: Request) -> AsyncIterator[str]:
    """Server-sent events: the new text of each completion as it is generated, then [DONE]. A list
    of prompts streams its completions interleaved, as they come (as vLLM does).

    Everything ready is sent in one write: events pile up in ``pending`` and leave only when the next
    output is not there yet. Each write releases the interpreter lock and takes it back from the engine
    thread (~0.15 ms on a busy 2-core machine, bench/probe_serve.py); a chat's first token (role, then
    content), its last (finish, usage, [DONE]) and a handler that fell behind by several steps each
    cost one write, not one per event."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, asyncio.current_task()))
    deltas = _Deltas(job.streams)
    # per prompt: completion index -> its counts (text is not kept)
    seen: list[dict[int, Finished]] = [{} for _ in job.streams]
    pending: list[str] = []
    stages = job.state.loop.stages  # --trace-stages: the first delta's "got" and "written"
    try:
        while deltas.open:
            if pending and deltas.empty():
                if stages is not None:
                    stages.stamp(job.rid, "written")
                yield "".join(pending)
                pending.clear()
            p, d = await deltas.get()
            if d is None:  # a stream ended: finished, or failed (the engine, or the drain ran out)
                if (error := deltas.error()) is not None:
                    yield "".join([*pending, _sse(_stream_error_body(error)), "data: [DONE]\n\n"])
                    return
                continue
            if stages is not None:
                stages.stamp(job.rid, "got")
            if d.error:  # headers are sent: the error goes in the stream, as vLLM does
                pending += [_sse(error_body(f"the request failed: {d.error}", "internal_error", 500))]
                yield "".join([*pending, "data: [DONE]\n\n"])
                return
            index = p * job.n + d.completion
            first = d.completion not in seen[p]
            counts = seen[p].setdefault(d.completion, Finished(d.completion))
            counts.count(d)
            lps = d.logprobs or []
            if first and job.chat:  # sent with the first token, as OpenAI does: a client's TTFT
                role = {"role": "assistant", "content": ""}
                pending.append(_sse(_chunk(job, [_delta_choice(job, index, role, None, None)])))
            # the first token always makes a chunk, even before it makes text (a partial character)
            if d.text or d.finished or (lps and job.want_logprobs) or (first and not job.chat):
                choice = _choice(job, index, d.text, lps, d.finish_reason, counts.text_offset)
                pending.append(_sse(_chunk(job, [choice])))
                if lps and job.want_logprobs and not job.chat:  # the texts _choice made, not again
                    counts.text_offset += sum(len(t) for t in choice["logprobs"]["tokens"])
        if job.include_usage:
            finals = [[done[i] for i in sorted(done)] for done in seen]
            pending.append(_sse(envelope(job.kind, job.rid, job.model, [], usage=_usage(finals))))
        if stages is not None:  # a stream whose first event leaves with its last
            stages.stamp(job.rid, "written")
        yield "".join([*pending, "data: [DONE]\n\n"])
    finally:
        watcher.cancel()
        release_all(job)


class _Deltas:
    """The deltas of a job's streams, which share one queue (``submit_all``), each with its
    prompt's index, as they are made; ``(-1, None)`` when a stream ended (each puts one None,
    finished or failed), ``open`` counting the others."""

    def __init__(self, streams: list[RequestStream]) -> None:
        self.streams = streams
        self.open = len(streams)
        self._queue = streams[0].queue
        self._prompt = {rid: p for p, s in enumerate(streams) for rid in s.ids}

    def empty(self) -> bool:
        return self._queue.empty()

    async def get(self) -> tuple[int, Delta | None]:
        d = await self._queue.get()
        if d is None:
            self.open -= 1
            return -1, None
        return self._prompt[d.request_id], d

    def error(self) -> BaseException | None:
        """Why a stream failed (the engine, or the shutdown's drain time), if one did."""
        return next((s.error for s in self.streams if s.error is not None), None)


def _chunk(job: Job, choices: list[dict[str, Any]]) -> dict[str, Any]:
    extra = {"usage": None} if job.include_usage else {}
    return envelope(job.kind, job.rid, job.model, choices, **extra)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


# -- shapes ---------------------------------------------------------------------------------------


def _choice(
    job: Job,
    index: int,
    text: str,
    lps: list[TokenLogprob],
    finish_reason: str | None,
    text_offset: int = 0,
) -> dict[str, Any]:
    """One choice; ``text_offset``: where ``lps``' first token starts in its completion's text."""
    logprobs = None
    if job.want_logprobs:
        logprobs = _chat_logprobs(job, lps) if job.chat else _completion_logprobs(job, lps, text_offset)
    if not job.chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if job.streaming:
        return _delta_choice(job, index, {"content": text} if text else {}, logprobs, finish_reason)
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def _delta_choice(
    job: Job, index: int, delta: dict[str, Any], logprobs: Any, finish_reason: str | None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _chat_logprobs(job: Job, lps: list[TokenLogprob]) -> dict[str, Any]:
    text = job.state.token_text

    def entry(token: int, logprob: float) -> dict[str, Any]:
        t = text(token)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode())}

    content = [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
    ]
    return {"content": content}


def _completion_logprobs(job: Job, lps: list[TokenLogprob], at: int = 0) -> dict[str, Any]:
    text = job.state.token_text
    tokens = [text(lp.token_id) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [_top_dict(text, lp.top) for lp in lps],
        "text_offset": offsets,
    }


def _top_dict(text: Any, top: list[tuple[int, float]]) -> dict[str, float]:
    """OpenAI's token text -> logprob; two tokens with one text (partial bytes) keep the likelier."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(text(token), logprob)
    return out


def _usage(finals: list[list[Finished]]) -> dict[str, Any]:
    prompt = sum(outs[0].num_prompt_tokens for outs in finals if outs)
    cached = sum(outs[0].num_cached_tokens for outs in finals if outs)
    completion = sum(f.num_tokens for outs in finals for f in outs)
    body = usage(prompt, completion, cached)
    served = {f.served_from for outs in finals for f in outs}
    if served:  # "model", or the result cache's answer: where the completions came from
        body["kvtier_served_from"] = served.pop() if len(served) == 1 else "mixed"
    return body


def _raise_if_failed(stream: RequestStream, d: Delta | None = None) -> None:
    if d is not None and d.error:
        raise EngineFailure(f"the request failed: {d.error}")
    if isinstance(stream.error, ShuttingDown):  # 503 with Retry-After: another instance may serve it
        raise ShuttingDown(str(stream.error))
    if stream.error is not None:
        raise EngineFailure(f"the engine failed: {stream.error}")


def _stream_error_body(error: BaseException) -> dict[str, Any]:
    if isinstance(error, ShuttingDown):
        return error_body(str(error), "server_unavailable", 503)
    return error_body(f"the engine failed: {error}", "internal_error", 500)


async def _cancel_on_disconnect(request: Request, task: asyncio.Task[Any] | None) -> None:
    """Cancel the handler's task when the client goes away (its finally then aborts the requests)."""
    with contextlib.suppress(Exception):
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                break
        request.state.client_gone = True
        if task is not None:
            task.cancel()
