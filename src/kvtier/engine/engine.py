"""Engine (add_request / step / abort) and LLM (generate, stream, chat).

The engine owns one model, one block pool and one scheduler; ``step`` runs one batch and returns the
outputs of the requests that moved. Bad input raises ``InvalidRequestError`` from ``add_request``
before anything is allocated, so one bad request never disturbs the others.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtier.cache.blocks import BlockPool
from kvtier.cache.keys import BlockKey, KVLayout, root_key
from kvtier.cache.tiers.host import integrity_sums
from kvtier.config import EngineConfig
from kvtier.engine.detokenizer import DetokenizerState, decode_delta, find_stop
from kvtier.engine.request import (
    CompletionOutput,
    FinishReason,
    InvalidRequestError,
    Request,
    RequestOutput,
    SamplingParams,
)
from kvtier.engine.runner import ModelRunner
from kvtier.engine.scheduler import Scheduler, SchedulerLimits, SchedulerOutput
from kvtier.engine.tiers import build_hierarchy
from kvtier.model.attention import make_attention_backend
from kvtier.model.loader import LoadedModel, load_model

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]
MIN_CPU_KV_BYTES = 64 << 20


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # prompt tokens of finished requests
    cached_prompt_tokens: int = 0  # of those, served from the cache
    computed_tokens: int = 0  # tokens run through the model (prefill chunks + decodes + recompute)
    generated_tokens: int = 0
    steps: int = 0
    finished: int = 0
    ttft: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def _dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {name!r}; supported: auto, float32, float16, bfloat16")
    return dtype


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        ms, ps, ss = config.model, config.pool, config.scheduler
        self.device = resolve_device(ms.device)
        self.loaded = loaded or load_model(ms.model, self.device, _dtype(ms.dtype), ms.seed)
        self.model = self.loaded.model
        self.model.attention_backend = make_attention_backend(ms.attention_backend, self.device)
        self.tokenizer = self.loaded.tokenizer
        mc = self.loaded.config
        self.layout = KVLayout(
            mc.num_layers, mc.num_kv_heads, mc.head_dim, ps.block_size, str(mc.dtype).removeprefix("torch.")
        )
        self.num_blocks = self._num_blocks()
        self.pool = BlockPool(self.num_blocks, ps.block_size, ps.eviction_policy, ps.enable_prefix_caching)
        max_len = min(ss.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        limits = SchedulerLimits(
            ss.max_num_batched_tokens, ss.max_num_seqs, max_len, ss.enable_chunked_prefill
        )
        self._roots: dict[str | None, BlockKey] = {}
        self.hierarchy = (
            build_hierarchy(config, self.layout, self.fingerprint, self.device)
            if ps.enable_prefix_caching
            else None
        )
        self.scheduler = Scheduler(self.pool, limits, self.root_key, self.hierarchy)
        self.runner = ModelRunner(self.model, self.layout, self.num_blocks, self.device)
        if self.hierarchy is not None:
            self.pool.on_evict = self._write_back
        self._pending_writes: list[tuple[int, BlockKey, tuple[int, ...]]] = []
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, DetokenizerState] = {}
        self._ids = itertools.count()
        self.stats = EngineStats()

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.loaded.fingerprint

    def root_key(self, salt: str | None) -> BlockKey:
        if salt not in self._roots:
            self._roots[salt] = root_key(self.fingerprint, self.layout, salt)
        return self._roots[salt]

    def _num_blocks(self) -> int:
        ps = self.config.pool
        if ps.kv_cache_memory is not None:
            budget = ps.kv_cache_memory
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * ps.gpu_memory_utilization)
        else:
            budget = max(MIN_CPU_KV_BYTES, int(_available_ram() * ps.cpu_kv_cache_fraction))
        num = budget // self.layout.bytes_per_block
        if num < 1:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no block: "
                f"one block takes {self.layout.bytes_per_block} bytes"
            )
        return int(num)

    # -- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass token ids")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        ids = [int(t) for t in prompt]
        vocab = self.loaded.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        return list(ids)

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> list[str]:
        """Queue a request (n > 1: one per completion). Returns the ids. Raises InvalidRequestError."""
        params = params or SamplingParams()
        params.validate(self.loaded.config.vocab_size)
        if params.stop and self.tokenizer is None:  # without text they would be ignored silently
            raise InvalidRequestError(
                "stop strings need a tokenizer and this model has none: use stop_token_ids"
            )
        token_ids = self.tokenize(prompt)
        self.scheduler.check_fits(len(token_ids))
        base = request_id or f"req-{next(self._ids)}"
        if base in self.requests or any(k.startswith(base + "#") for k in self.requests):
            raise InvalidRequestError(f"request id {base!r} is already in use")
        ids: list[str] = []
        first: Request | None = None
        for i in range(params.n):
            rid = base if params.n == 1 else f"{base}#{i}"
            child = params
            if params.n > 1 and params.seed is not None:
                child = _replace(params, seed=params.seed + i)
            req = Request(
                rid,
                token_ids,
                child,
                self.loaded.config.eos_token_ids,
                cache_salt,
                prompt=prompt if isinstance(prompt, str) else None,
                wait_for=first,
            )
            first = first or req
            self.requests[rid] = req
            self._detok[rid] = DetokenizerState()
            self.scheduler.add(req)
            ids.append(rid)
        return ids

    def abort(self, request_id: str) -> None:
        for rid in [k for k in self.requests if k == request_id or k.startswith(request_id + "#")]:
            req = self.requests.pop(rid)
            self._detok.pop(rid, None)
            self.scheduler.finish(req, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch; return the outputs of requests that produced a token or finished."""
        self._install_loads()
        sched = self.scheduler.schedule()
        # Before anything can overwrite a block evicted by this schedule: the forward pass, or
        # the next step's installation of a load into a block allocated here.
        self._flush_writes()
        now = time.monotonic()
        failed = []
        for req in sched.failed:
            self._finish(req, FinishReason.LENGTH, now)
            failed.append(self._output(req))
        if not sched.chunks:
            if self.scheduler.loading:
                time.sleep(0.0005)  # only loads are in flight: let the I/O thread run
            return failed
        start = time.perf_counter()
        result = self.runner.execute(sched.chunks)
        if self.hierarchy is not None:  # the step's time is real: execute ended in a host sync
            self.hierarchy.observe_step(sched.num_tokens, time.perf_counter() - start)
        self.stats.steps += 1
        self.stats.computed_tokens += sched.num_tokens
        return failed + self._update(sched, result.sampled, result.logits)

    # -- the hierarchy below the device pool ----------------------------------------------------
    def _install_loads(self) -> None:
        """Copy finished loads into their device blocks; the requests then run."""
        for req in list(self.scheduler.loading):
            future = req.load_future
            if future is None or not future.done():
                continue
            try:
                blocks = future.result()
            except Exception:  # a failed load is a miss: recompute
                log.exception("load of request %s failed; recomputing", req.request_id)
                blocks = torch.empty(0)
            n = int(blocks.shape[0]) if blocks.numel() else 0
            base = req.num_committed_blocks
            if n:
                ids = torch.tensor(req.block_table[base : base + n], device=self.device)
                if blocks.is_cuda:  # made on the I/O thread's stream: keep it alive for ours
                    blocks.record_stream(torch.cuda.current_stream(self.device))
                # already on our device (the hierarchy loads onto it): [n, L, 2, ...] -> [L, 2, n, ...]
                self.runner.kv_cache.index_copy_(2, ids, blocks.permute(1, 2, 0, 3, 4, 5))
            if self.hierarchy is not None:  # on the CPU the copy above is done: reuse its memory
                self.hierarchy.recycle(blocks)
            self.scheduler.complete_load(req, n)

    def _write_back(self, block_id: int, key: BlockKey, tokens: tuple[int, ...]) -> None:
        """An evicted block: queued, and copied out with the step's others before the model runs
        (nothing overwrites a block between its allocation in ``schedule`` and the forward pass)."""
        assert self.hierarchy is not None
        if self.hierarchy.wants_write_on_evict(key):
            self._pending_writes.append((block_id, key, tokens))

    def _write_through(self, blocks: list[int]) -> None:
        for b in blocks:
            cached = self.pool.cached(b)
            if cached is not None:
                self._pending_writes.append((b, cached.key, cached.tokens))
        self._flush_writes()

    def _flush_writes(self) -> None:
        """Copy the queued blocks to the host in one transfer (one device sync per step, not one
        per block) and hand them to the hierarchy's I/O threads."""
        if not self._pending_writes or self.hierarchy is None:
            self._pending_writes.clear()
            return
        ids = torch.tensor([b for b, _, _ in self._pending_writes], device=self.device)
        # [L, 2, n, bs, H, D] -> [n, L, 2, bs, H, D]: each block contiguous for the codec
        blocks = self.runner.kv_cache.index_select(2, ids).permute(2, 0, 1, 3, 4, 5).contiguous()
        sums = None
        if self.device.type == "cuda" and self.hierarchy.wants_sums:  # ~free here, a CPU pass there
            sums = integrity_sums(blocks.view(len(ids), -1).view(torch.uint8)).to("cpu", non_blocking=True)
        data = blocks.cpu()  # waits for the sums' copy too (same stream)
        for i, (_, key, tokens) in enumerate(self._pending_writes):
            self.hierarchy.write_async(key, tokens, data[i], None if sums is None else sums[i])
        self._pending_writes.clear()

    def close(self) -> None:
        """Write every block the device still caches down the hierarchy (so a restart or another
        instance finds it), wait for the writes, and close the tiers."""
        if self.hierarchy is None:
            return
        if not self.hierarchy.wants_write_on_commit():
            for block_id, cached in self.pool.cached_blocks():
                self._write_back(block_id, cached.key, cached.tokens)
        self._flush_writes()
        self.hierarchy.close()
        self.hierarchy = None
        self.scheduler.hierarchy = None
        self.pool.on_evict = None

    def _update(
        self, sched: SchedulerOutput, sampled: dict[str, int], logits: dict[str, torch.Tensor]
    ) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for chunk in sched.chunks:
            req = chunk.request
            req.num_computed_tokens += chunk.num_new_tokens
            shared = self.scheduler.commit_computed_blocks(req)
            if shared and self.hierarchy is not None and self.hierarchy.wants_write_on_commit():
                self._write_through(shared)
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.output_token_ids.append(token)
            if req.request_id in logits:
                req.step_logits.append(logits[req.request_id])
            if req.first_token_time is None:
                req.first_token_time = now
            self.stats.generated_tokens += 1
            reason = self._check_stop(req, token)
            if reason is not None:
                self._finish(req, reason, now)
            outputs.append(self._output(req))
        return outputs

    def _check_stop(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if self.tokenizer is not None:
            before = len(req.output_text)
            req.output_text += decode_delta(self.tokenizer, req.output_token_ids, self._detok[req.request_id])
            found = find_stop(req.output_text, before, p.stop) if p.stop else None
            if found:
                idx, stop = found
                req.output_text = req.output_text[: idx + (len(stop) if p.include_stop_str_in_output else 0)]
                req.stop_reason = stop
                return FinishReason.STOP
        if not p.ignore_eos and token in req.eos_token_ids:
            req.stop_reason = token
            return FinishReason.STOP
        if token in p.stop_token_ids:
            req.stop_reason = token
            return FinishReason.STOP
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.scheduler.limits.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, req: Request, reason: FinishReason, now: float) -> None:
        self.scheduler.finish(req, reason)
        req.finish_time = now
        self.requests.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)
        s = self.stats
        s.finished += 1
        s.prompt_tokens += len(req.prompt_token_ids)
        s.cached_prompt_tokens += max(req.num_cached_tokens, 0)
        if req.first_token_time is not None:
            s.ttft.append(req.first_token_time - req.arrival_time)

    def _output(self, req: Request) -> RequestOutput:
        metrics: dict[str, Any] = {
            "num_preemptions": req.num_preemptions,
            "num_loaded_tokens": req.num_loaded_tokens,
        }
        if req.first_token_time is not None:
            metrics["ttft"] = req.first_token_time - req.arrival_time
        if req.finish_time is not None:
            metrics["e2e"] = req.finish_time - req.arrival_time
        p = req.params
        completion = CompletionOutput(
            index=_index(req.request_id),
            token_ids=list(req.output_token_ids),
            text=req.output_text if req.is_finished else _holding_back_stops(req.output_text, p.stop),
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            logits=torch.stack(req.step_logits) if req.step_logits else None,
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

    def run_until_done(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()


def _holding_back_stops(text: str, stops: list[str]) -> str:
    """``text`` less its longest ending that begins a stop string: a stream must never send text
    that the stop string, once complete, would take back."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return text[: len(text) - hold]


def _index(request_id: str) -> int:
    return int(request_id.rsplit("#", 1)[1]) if "#" in request_id else 0


def _replace(params: SamplingParams, **changes: Any) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@dataclass
class StreamDelta:
    """What ``LLM.stream`` yields: the text and tokens a step added to one completion."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    output: RequestOutput


class LLM:
    """Offline use: ``LLM(model="synthetic:small").generate(prompts, SamplingParams(...))``.

    Keyword arguments are settings of ``EngineConfig`` by name (block_size=..., kv_cache_memory=...).
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **settings: Any) -> None:
        if model is not None:
            settings["model"] = model
        self.config = config or EngineConfig.load(settings)
        self.engine = Engine(self.config)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def close(self) -> None:
        """Persist the device cache down the hierarchy and close the tiers."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order, n completions merged per prompt."""
        prompt_list = _as_prompt_list(prompts)
        param_list = (
            list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompt_list)
        )
        if len(param_list) != len(prompt_list):
            raise InvalidRequestError(f"{len(prompt_list)} prompts but {len(param_list)} SamplingParams")
        groups: list[list[str]] = []
        try:
            for p, sp in zip(prompt_list, param_list, strict=True):
                groups.append(self.engine.add_request(p, sp, cache_salt=cache_salt))
        except InvalidRequestError:
            for ids in groups:  # all or nothing: no orphans left running in the engine
                for rid in ids:
                    self.engine.abort(rid)
            raise
        final: dict[str, RequestOutput] = {}
        for out in self.engine.run_until_done():
            if out.finished:
                final[out.request_id] = out
        return [_merge([final[rid] for rid in ids]) for ids in groups]

    def chat(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams | None = None,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        return self.generate([self.engine.apply_chat_template(messages)], params, cache_salt)[0]

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, cache_salt: str | None = None
    ) -> Iterator[StreamDelta]:
        """Yield each completion's new text and tokens as they are generated."""
        ids = self.engine.add_request(prompt, params, cache_salt=cache_salt)
        sent_text = dict.fromkeys(ids, 0)
        sent_tokens = dict.fromkeys(ids, 0)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id not in pending:
                        continue
                    c = out.outputs[0]
                    rid = out.request_id
                    delta = StreamDelta(
                        rid,
                        c.index,
                        c.text[sent_text[rid] :],
                        c.token_ids[sent_tokens[rid] :],
                        out.finished,
                        c.finish_reason,
                        out,
                    )
                    sent_text[rid], sent_tokens[rid] = len(c.text), len(c.token_ids)
                    if out.finished:
                        pending.discard(rid)
                    yield delta
        finally:
            for rid in pending:  # the consumer stopped early: free the blocks
                self.engine.abort(rid)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    first = outs[0]
    if len(outs) == 1:
        return first
    base = first.request_id.rsplit("#", 1)[0]
    completions = [o.outputs[0] for o in outs]
    errors = [o.error for o in outs if o.error]
    return RequestOutput(
        base,
        first.prompt,
        first.prompt_token_ids,
        completions,
        True,
        first.num_cached_tokens,
        first.metrics,
        errors[0] if errors else None,
    )
