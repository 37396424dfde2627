"""Engine: add_request / step / abort / close, and the step loop.

Kept in one file because the step loop's parts (launch, collect, postprocess, finish, the
failure paths) share the engine's state (the step in flight, the requests, their detokenizers)
and read as one sequence; set-up, pool sizing (``memory.py``), KV movement (``kv_transfer.py``),
outputs (``output.py``) and the front (``llm.py``) live elsewhere.

The engine owns one model, one block pool and one scheduler. ``step`` is
``install loads -> schedule -> write down -> launch -> postprocess the step before``: it returns
the outputs of the requests that moved. Bad input raises ``InvalidRequestError`` from
``add_request`` before anything is allocated, so one bad request never disturbs the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kvtier.cache.blocks import BlockPool
from kvtier.cache.codec import secret_from_env
from kvtier.cache.keys import BlockKey, KVLayout, root_key, tier_namespace
from kvtier.config import EngineConfig
from kvtier.engine import shutdown
from kvtier.engine.detokenizer import DetokenizerState
from kvtier.engine.kv_transfer import KVTransfer
from kvtier.engine.memory import max_model_len, pool_blocks
from kvtier.engine.output import EngineStats, check_stop, finish_text, make_output
from kvtier.engine.request import (
    FinishReason,
    InvalidRequestError,
    Request,
    RequestOutput,
    RequestState,
    SamplingParams,
    check_cache_salt,
    check_params,
    check_prompt_ids,
    check_request_id,
    check_text,
    completion_ids,
)
from kvtier.engine.results import ResultCache
from kvtier.engine.runner import InFlight, ModelRunner, StepResult
from kvtier.engine.scheduler import ScheduledChunk, Scheduler, SchedulerLimits, SchedulerOutput
from kvtier.engine.tiers import build_hierarchy
from kvtier.model.attention import TritonPagedAttention, make_attention_backend
from kvtier.model.kv_fp8 import calibrate_kv_scales, scales_digest
from kvtier.model.loader import LoadedModel, load_model

if TYPE_CHECKING:
    from kvtier.engine.llm import LLM, StreamDelta

__all__ = ["LLM", "Engine", "EngineStats", "Prompt", "StreamDelta", "resolve_device"]

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


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
        config.validate()  # a config built by hand has not been through EngineConfig.load
        self.config = config
        ms, ps, ss = config.model, config.pool, config.scheduler
        self.device = resolve_device(ms.device)
        self.loaded = loaded or load_model(ms.model, self.device, _dtype(ms.dtype), ms.seed)
        self.model = self.loaded.model
        backend = make_attention_backend(ms.attention_backend, self.device)
        self.model.attention_backend = backend
        if isinstance(backend, TritonPagedAttention):
            self.model.use_fused_kernels(gemv=ms.decode_gemv, gemv_max_m=ms.decode_gemv_max_m)
        self.tokenizer = self.loaded.tokenizer
        mc = self.loaded.config
        # fp8 pool: scales measured once (before the hierarchy: they are part of the fingerprint)
        self.kv_scales = (
            calibrate_kv_scales(self.model, ps.block_size) if ps.kv_cache_dtype == "fp8" else None
        )
        self.model.set_kv_scales(self.kv_scales)
        kv_dtype = "float8_e4m3fn" if self.kv_scales is not None else str(mc.dtype).removeprefix("torch.")
        self.layout = KVLayout(mc.num_layers, mc.num_kv_heads, mc.head_dim, ps.block_size, kv_dtype)
        max_len = max_model_len(config, mc)
        self.num_blocks = pool_blocks(config, self.model, self.layout, self.device, max_len)
        self.pool = BlockPool(self.num_blocks, ps.block_size, ps.eviction_policy, ps.enable_prefix_caching)
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
        self.runner = ModelRunner(
            self.model,
            self.layout,
            self.num_blocks,
            self.device,
            max_model_len=max_len,
            graph_max_batch=min(ms.cuda_graph_max_batch, ss.max_num_seqs),
            graph_extend_tokens=min(ms.cuda_graph_extend_tokens, ss.max_num_batched_tokens),
            graph_mixed_decodes=min(ms.cuda_graph_mixed_decodes, ss.max_num_seqs - 1),
        )
        self.kv = (
            KVTransfer(self.hierarchy, self.pool, self.runner.kv_cache)
            if self.hierarchy is not None
            else None
        )
        if self.kv is not None:  # queued writes are stored at exit or SIGTERM, even without close()
            self.scheduler.load_now = self.kv.load_now
            shutdown.register(self, config.tiers.exit_flush_timeout)
        self.results = (
            ResultCache(config, self.fingerprint, mc.eos_token_ids, max_len)
            if config.results.result_cache
            else None
        )
        self.requests: dict[str, Request] = {}
        self._detok: dict[str, DetokenizerState] = {}
        self._ids = itertools.count()
        self.stats = EngineStats()
        self._in_flight: InFlight | None = None  # the launched step whose tokens are not read yet
        self._last_ready: torch.cuda.Event | None = None  # the end of the last step read back

    # -- set-up ---------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The model's, and with an fp8 pool its KV scales' too: blocks quantised with other
        scales must never be mixed in."""
        if self.kv_scales is None:
            return self.loaded.fingerprint
        return f"{self.loaded.fingerprint}+kvfp8-{scales_digest(self.kv_scales)}"

    @property
    def namespace(self) -> str:
        """The tiers' namespace: the fingerprint, plus the cache secret's key id when one is set."""
        secret = self.hierarchy.secret if self.hierarchy is not None else secret_from_env()
        return tier_namespace(self.fingerprint, secret)

    def root_key(self, salt: str | None) -> BlockKey:
        if salt not in self._roots:
            self._roots[salt] = root_key(self.fingerprint, self.layout, salt)
        return self._roots[salt]

    # -- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass token ids")
            check_text("the prompt", prompt)
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return check_prompt_ids(prompt, self.loaded.config.vocab_size)

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
        stream: bool = True,
    ) -> list[str]:
        """Queue a request (n > 1: one per completion). Returns the ids. Raises InvalidRequestError.

        ``stream``: ``step()`` reports the request after every token (True), or only once it has
        finished (False: no text is decoded on the way unless a stop string needs it)."""
        params = check_params(params)
        params.validate(self.loaded.config.vocab_size)
        cache_salt = check_cache_salt(cache_salt)
        request_id = check_request_id(request_id)
        if params.stop and self.tokenizer is None:  # without text they would be ignored silently
            raise InvalidRequestError(
                "stop strings need a tokenizer and this model has none: use stop_token_ids"
            )
        token_ids = self.tokenize(prompt)
        self.scheduler.check_fits(len(token_ids))
        base = request_id or f"req-{next(self._ids)}"
        if base in self.requests or any(k.startswith(base + "#") for k in self.requests):
            raise InvalidRequestError(f"request id {base!r} is already in use")
        result_key = self.results.key(token_ids, params, cache_salt) if self.results else None
        text = prompt if isinstance(prompt, str) else None
        if result_key is not None and self.results and self.results.serve(result_key, base, text, token_ids):
            return [base]  # answered: no model work; the next step returns it
        ids: list[str] = []
        first: Request | None = None
        for i, rid in enumerate(completion_ids(base, params.n)):
            child = params
            if params.n > 1 and params.seed is not None:
                child = dataclasses.replace(params, seed=params.seed + i)
            req = Request(
                rid,
                token_ids,
                child,
                self.loaded.config.eos_token_ids,
                cache_salt,
                prompt=text,
                wait_for=first,
                result_key=result_key,
                stream=stream,
            )
            first = first or req
            self.requests[rid] = req
            self._detok[rid] = DetokenizerState()
            self.scheduler.add(req)
            ids.append(rid)
        return ids

    def abort(self, request_id: str) -> None:
        if self.results is not None:
            self.results.drop(request_id)
        for rid in [k for k in self.requests if k == request_id or k.startswith(request_id + "#")]:
            req = self.requests.pop(rid)
            self._detok.pop(rid, None)
            self.runner.tables.forget(rid)
            self.scheduler.finish(req, FinishReason.ABORT)
        step = self._in_flight
        if step is not None and not any(self._owns(c.request) for c in step.chunks):
            self._collect()  # nobody waits for it: read it now, so nothing looks unfinished

    def has_unfinished(self) -> bool:
        return (
            self.scheduler.has_work()
            or self._in_flight is not None
            or bool(self.results and self.results.ready)
        )

    def run_until_done(self) -> Iterator[RequestOutput]:
        while self.has_unfinished():
            yield from self.step()

    def close(self, timeout: float | None = 30.0) -> bool:
        """Write what the device still caches to the write-back tiers that outlive the process,
        wait for the queued writes (at most ``timeout`` seconds: the rest is dropped and
        counted), and close the tiers. Returns whether every write made it. Called at exit too."""
        if self._in_flight is not None:
            self._collect()  # its blocks are committed, so they are written down below
        if self.results is not None:
            self.results.close()
        if self.kv is None:
            return True
        shutdown.forget(self)
        done = self.kv.close(timeout)
        self.kv.install_loads(self.scheduler)  # loads the close waited for: their requests run
        self.kv = None
        self.hierarchy = None
        self.scheduler.hierarchy = None
        return done

    def flush_writes(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds) until every queued block is stored: what SIGTERM
        does. Thread-safe: it touches only the write queue."""
        hierarchy = self.hierarchy
        return True if hierarchy is None else hierarchy.flush(timeout)

    # -- the loop: install loads -> schedule -> write down -> launch -> postprocess the step before --
    def step(self) -> list[RequestOutput]:
        """Launch one batch and return the outputs of the requests that moved: those of the batch
        launched by the step before, read back while this one runs on the device (answers from
        the result cache first: they finished without a batch).

        With ``overlap_steps`` the device never waits for the host between two steps: scheduling
        and input building for step N+1 run while it computes step N, whose sampled ids are read
        only after N+1 is queued (a decode of N+1 takes its input token from N on the device). A
        request that stops on an EOS or a stop string has then computed one token too many, which
        is dropped. Requests whose sampling reads their own history (penalties) wait for it."""
        start = time.perf_counter()
        try:
            return self._step()
        finally:
            self.stats.step_seconds += time.perf_counter() - start

    def _step(self) -> list[RequestOutput]:
        served = self.results.take_ready() if self.results is not None else []
        if served and not self.scheduler.has_work() and self._in_flight is None:
            return served
        if self.kv is not None:
            self.kv.install_loads(self.scheduler)
        outputs = served
        if self._in_flight is not None and not self._can_overlap(self._in_flight):
            outputs += self._collect()
        sched = self.scheduler.schedule()
        if self.kv is not None:
            # Before anything can overwrite a block evicted by this schedule: the forward pass, or
            # the next step's installation of a load into a block allocated here.
            self.kv.flush()
        outputs += self._fail(sched.failed)
        if not sched.chunks:
            if self._in_flight is not None:
                outputs += self._collect()
                self._last_ready = None  # the device goes idle because there is no work: not counted
                return outputs
            if self.scheduler.loading:
                time.sleep(0.0005)  # only loads are in flight: let the I/O thread run
            return outputs
        try:
            launched = self._launch(sched)
        except torch.OutOfMemoryError as e:  # the step was too large for the memory left
            outputs += self._collect()
            if self._shrink_steps(e):
                return outputs  # the same requests go on next step, in smaller steps
            return outputs + self._run_alone(sched, e)
        except Exception as e:  # not KeyboardInterrupt: an interrupted generate() aborts its own
            outputs += self._collect()
            return outputs + self._run_alone(sched, e)
        outputs += self._collect()
        self._in_flight = launched
        if not self.config.scheduler.overlap_steps:
            outputs += self._collect()
        return outputs

    def _shrink_steps(self, error: torch.OutOfMemoryError) -> bool:
        """A step ran out of device memory (the pool is fixed: only activations grow): halve the
        tokens a step may take, so the requests go on in smaller steps instead of failing. False
        when steps are as small as they can be."""
        limits = self.scheduler.limits
        smallest = self.config.pool.block_size
        if limits.max_num_batched_tokens <= smallest:
            return False
        limits.max_num_batched_tokens = max(smallest, limits.max_num_batched_tokens // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.stats.oom_steps += 1
        log.warning(
            "a step ran out of device memory (%s); steps now take at most %d tokens",
            str(error).split(".")[0],
            limits.max_num_batched_tokens,
        )
        return True

    def _can_overlap(self, step: InFlight) -> bool:
        """Whether the next step may be scheduled before ``step``'s tokens are known: not when
        overlap is off, and not when a request's sampling reads its full history (penalties)."""
        if step.layered:  # its tokens stand only once its loads' integrity verdict is read
            return False
        return self.config.scheduler.overlap_steps and not any(_reads_history(r) for r in step.sampling)

    def _launch(self, sched: SchedulerOutput) -> InFlight:
        """Start the batch on the device; the requests' counts move on as if it had run."""
        began = time.perf_counter()
        layered: list[Request] = []
        try:
            if self.kv is not None:
                layered = self.kv.start_layered(sched.chunks, self.runner.layer_ready)
            launched = self.runner.launch(sched.chunks, self._in_flight, wait_layers=bool(layered))
        except BaseException:  # its loads are settled now: a failed one restarts its request
            self._settle_layered([c.request for c in sched.chunks if c.request.layered_load is not None])
            raise
        launched.layered = layered
        launched.launched_at = began
        launched.launch_seconds = time.perf_counter() - began
        for c in sched.chunks:
            c.request.num_computed_tokens = c.end
            if c.samples:
                c.request.num_pending += 1
        self.stats.steps += 1
        self.stats.computed_tokens += sched.num_tokens
        return launched

    def _settle_layered(self, reqs: list[Request]) -> set[str]:
        """Read the verdicts of the requests' layered loads (waiting for their copies): a request
        whose blocks all arrived intact goes on; one that had a corrupt block starts again
        (``Scheduler.settle_layered``): returns their ids, whose step's tokens are dropped."""
        restarted: set[str] = set()
        for req in reqs:
            load = req.layered_load
            if load is None:
                continue
            intact = load.finish()
            if not self._owns(req):  # aborted while its step ran: its blocks were freed
                req.layered_load = None
                continue
            if not self.scheduler.settle_layered(req, intact):
                req.num_pending = 0
                restarted.add(req.request_id)
                log.warning(
                    "request %s: %d of %d blocks loaded from the %s tier failed their check; recomputing",
                    req.request_id,
                    load.count - intact,
                    load.count,
                    self.hierarchy.tiers[load.tier].name if self.hierarchy is not None else "?",
                )
        return restarted

    def _collect(self) -> list[RequestOutput]:
        """Wait for the step in flight (if any), then advance its requests."""
        step, self._in_flight = self._in_flight, None
        if step is None:
            return []
        try:
            waited = time.perf_counter()
            result = self.runner.collect(step)
            restarted = self._settle_layered(step.layered)
            done = time.perf_counter()
            step.wait_seconds = done - waited
            self.stats.wait_seconds += step.wait_seconds
            num_tokens = sum(c.num_new_tokens for c in step.chunks)
            busy = self._time_device(step, num_tokens)
        except KeyboardInterrupt:  # generate() aborts the requests; their loads' slots go here
            with contextlib.suppress(BaseException):
                self._settle_layered(step.layered)
            raise
        except Exception as e:  # the device failed the step: its requests fail, the engine goes on
            with contextlib.suppress(Exception):  # (their loads' slots are let go whatever it says)
                self._settle_layered(step.layered)
            failed: list[RequestOutput] = []
            for c in step.chunks:
                if self._owns(c.request):
                    failed += self._fail_with(c.request, e)
            return failed
        if self.hierarchy is not None and not step.layered:
            # What the step cost the device (CUDA events), else its launch to the end of its read
            # back (the CPU computes in launch). Not the time since the latest launch: with overlap
            # that is the next step's, and the cost model would learn steps as nearly free. Not a
            # step that carried layered loads: it waited for their copies, which is not compute.
            self.hierarchy.observe_step(num_tokens, busy or done - step.launched_at)
        chunks = [c for c in step.chunks if c.request.request_id not in restarted]
        return self._postprocess(chunks, result)

    def _time_device(self, step: InFlight, num_tokens: int) -> float:
        """Add the step's device time, and the device's idle time since the step before ended.
        Returns the device time (0 without CUDA events)."""
        busy = idle = 0.0
        if step.begin is not None and step.ready is not None:
            busy = step.begin.elapsed_time(step.ready) / 1e3
            if self._last_ready is not None:
                idle = max(0.0, self._last_ready.elapsed_time(step.begin) / 1e3)
            self._last_ready = step.ready
        self.stats.device_busy_seconds += busy
        self.stats.device_idle_seconds += idle
        if self.stats.step_trace is not None:
            row = (len(step.chunks), num_tokens, step.launch_seconds, step.wait_seconds, busy, idle)
            self.stats.step_trace.append(row)
        return busy

    def _run_alone(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """The batch failed to launch: run each chunk by itself, so the request at fault fails with
        its error and the others get their tokens. Re-running a chunk rewrites the same KV into the
        same slots (its blocks are not committed yet), so nothing computed twice differs."""
        log.warning("a step of %d requests failed (%s); running them one by one", len(sched.chunks), error)
        outputs: list[RequestOutput] = []
        for chunk in sched.chunks:
            if chunk.request.state is not RequestState.RUNNING:
                continue  # its layered load failed its check when the batch failed: it starts again
            try:
                if len(sched.chunks) == 1:
                    raise error
                self._in_flight = self._launch(SchedulerOutput([chunk]))
                outputs += self._collect()
            except Exception as e:
                if chunk.samples and chunk.request.num_computed_tokens == chunk.end:
                    chunk.request.num_pending = 0  # it launched, then failed
                outputs += self._fail_with(chunk.request, e)
        return outputs

    def _owns(self, req: Request) -> bool:
        """Still one of ours (not finished or aborted while its step was in flight)."""
        return self.requests.get(req.request_id) is req

    def _fail_with(self, req: Request, error: BaseException) -> list[RequestOutput]:
        """Finish ``req`` with its error (the caller sees finish_reason "error" and the message)."""
        log.error("request %s failed: %s: %s", req.request_id, type(error).__name__, error, exc_info=error)
        req.error = f"{type(error).__name__}: {error}"
        self._finish(req, FinishReason.ERROR, time.monotonic())
        return [make_output(req)]

    def _postprocess(self, chunks: list[ScheduledChunk], result: StepResult) -> list[RequestOutput]:
        """Advance each request of a step that ran: commit its full blocks, append its token,
        check stops."""
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for chunk in chunks:
            req = chunk.request
            if not self._owns(req):
                continue  # finished (an EOS one step late) or aborted while the step ran: dropped
            try:
                out = self._advance(chunk, result, now)
            except Exception as e:  # one request's bad text or stop check: it alone fails
                outputs += self._fail_with(req, e)
                continue
            if out is not None:
                outputs.append(out)
        if self.kv is not None:
            # the step's newly full blocks, staged for the write-through tiers in one batch (once per
            # request was ~1,000 stage calls of ~0.6 ms in the H200's 8B chat run)
            self.kv.flush()
        return outputs

    def _advance(self, chunk: ScheduledChunk, result: StepResult, now: float) -> RequestOutput | None:
        """One request after its step: its output, or None when there is nothing to report (a
        prefill chunk that samples nothing, a token of a request that reports only at the end)."""
        req = chunk.request
        if req.state is RequestState.RUNNING:  # not preempted since the step was launched
            shared = self.scheduler.commit_computed_blocks(req, chunk.end)
            if shared and self.kv is not None:
                self.kv.write_through(shared)
        if not chunk.samples:
            return None  # a prefill chunk that did not reach the prompt's end
        req.num_pending -= 1
        token = result.sampled[req.request_id]
        req.output_token_ids.append(token)
        if req.request_id in result.logits:
            req.step_logits.append(result.logits[req.request_id])
        if req.request_id in result.logprobs:
            req.output_logprobs.append(result.logprobs[req.request_id])
        if req.first_token_time is None:
            req.first_token_time = now
        self.stats.generated_tokens += 1
        max_len = self.scheduler.limits.max_model_len
        reason = check_stop(req, token, self.tokenizer, self._detok[req.request_id], max_len)
        if reason is not None:
            self._finish(req, reason, now)
        elif not req.stream:
            return None
        return make_output(req)

    def _fail(self, requests: list[Request]) -> list[RequestOutput]:
        """Requests the scheduler could not place, however long they wait: finished by length."""
        now = time.monotonic()
        for req in requests:
            self._finish(req, FinishReason.LENGTH, now)
        return [make_output(req) for req in requests]

    def _finish(self, req: Request, reason: FinishReason, now: float) -> None:
        self.scheduler.finish(req, reason)
        req.finish_time = now
        req.num_pending = 0
        detok = self._detok.pop(req.request_id, None)
        if detok is not None and self.tokenizer is not None:
            finish_text(req, self.tokenizer, detok)
        self.requests.pop(req.request_id, None)
        self.runner.tables.forget(req.request_id)
        self.stats.record_finish(req)
        if self.results is not None:
            self.results.remember(req, reason)


def _reads_history(req: Request) -> bool:
    """Its sampling reads every token it has (penalties): the last one must be on the host."""
    p = req.params
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


def __getattr__(name: str) -> Any:
    """``from kvtier.engine.engine import LLM`` keeps working (the front lives in llm.py, which
    imports this module, hence the lazy import)."""
    if name in ("LLM", "StreamDelta"):
        from kvtier.engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
