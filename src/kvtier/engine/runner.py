"""Batch -> tensors -> model -> sampled tokens. Owns the KV cache tensor and the device.

``launch`` starts a step and returns at once; ``collect`` waits for its sampled token ids (the
step's one host synchronisation), so the engine can prepare and launch the next step while the
device still runs this one. A decode whose input is a token the step before sampled reads it on the
device. Inputs are built on the host in pinned memory (on CUDA) and copied without blocking.
Decode-only batches up to the largest graph bucket, a single short prefill row, and such a row after
a few decodes replay a CUDA graph (``cuda_graphs.py``) when the model runs the Triton kernels.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import numpy as np
import torch

from kvtier.cache.keys import KVLayout
from kvtier.engine.cuda_graphs import DecodeGraphs, ExtendGraphs, MixedGraphs, argmax_rows
from kvtier.engine.request import Request, TokenLogprob
from kvtier.engine.scheduler import ScheduledChunk
from kvtier.model.attention import AttentionMetadata, TritonPagedAttention
from kvtier.model.llama import CausalLM
from kvtier.model.sampler import SamplingBatch, sample


@dataclass
class InFlight:
    """A launched step: its chunks, and its sampled tokens on their way to the host."""

    chunks: list[ScheduledChunk]
    sampling: list[Request]  # the requests that sample, in the rows of ``tokens``
    tokens: torch.Tensor | None  # [len(sampling)] on the device; None: nothing sampled
    host_tokens: torch.Tensor | None  # their copy in (pinned) host memory, valid once ``ready``
    ready: torch.cuda.Event | None  # recorded after the copy (CUDA); None: the copy is done
    logprobs: _PendingLogprobs | None = None
    kept_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # return_logits rows
    begin: torch.cuda.Event | None = None  # recorded before the step's first work (CUDA)
    launched_at: float = 0.0  # perf_counter when its launch began
    launch_seconds: float = 0.0  # host time to launch it
    wait_seconds: float = 0.0  # host time waiting for it to finish
    layered: list[Request] = field(default_factory=list)  # requests whose layered load it carried

    def __post_init__(self) -> None:
        if self.ready is not None:
            self.ready.record()


@dataclass
class StepResult:
    sampled: dict[str, int]  # request id -> new token
    logits: dict[str, torch.Tensor]  # request id -> [vocab] float32 (only for return_logits requests)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # only for requests that ask


def kv_cache_shape(layout: KVLayout, num_blocks: int) -> tuple[int, ...]:
    return (layout.num_layers, 2, num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)


def allocate_kv_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The KV pool, reading as zeros everywhere.

    Unwritten slots must read as finite numbers: attention gathers whole blocks (the tail of a
    sequence's last block, block 0 behind padded block tables) and masks them, and a masked NaN
    still poisons the softmax (NaN * 0). On CUDA zero-filling is a memset at device bandwidth. On the
    CPU it touched every page of a pool of a quarter of the RAM (4.6 s for 6 GB at start-up): an
    anonymous mapping instead reads as zeros and costs a page only when the engine first writes it.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).view(shape)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        layout: KVLayout,
        num_blocks: int,
        device: torch.device,
        max_model_len: int | None = None,
        graph_max_batch: int = 0,
        graph_extend_tokens: int = 0,
        graph_mixed_decodes: int = 0,
    ) -> None:
        """``graph_max_batch`` > 0 captures decode graphs up to that batch, ``graph_extend_tokens`` > 0
        graphs of a one-row extend step up to that many tokens, and ``graph_mixed_decodes`` > 0
        graphs of that row with up to that many decodes (CUDA + Triton backend only)."""
        self.model = model
        self.layout = layout
        self.device = device
        self.dtype = getattr(torch, layout.dtype)
        self.kv_cache = allocate_kv_cache(kv_cache_shape(layout, num_blocks), self.dtype, device)
        self._pin = device.type == "cuda"
        self.tables = BlockTables()
        # One event per layer, recorded by a load copied layer by layer (``KVHierarchy.start_layered``)
        # once that layer's KV is in the pool; the model waits for event i before layer i. External
        # events: captured into the extend and mixed graphs as wait nodes, so a step carrying such
        # a load still replays a graph (eager, its ~300 launches took ~20 ms of the 8B's 4k-prefix
        # TTFT on the H200); a wait for an event already passed costs the replay nothing to speak of.
        self.layer_ready = (
            [torch.cuda.Event(external=True) for _ in range(layout.num_layers)]
            if device.type == "cuda"
            else []
        )
        self.graphs: DecodeGraphs | None = None
        self.extend_graphs: ExtendGraphs | None = None
        graphable = device.type == "cuda" and isinstance(model.attention_backend, TritonPagedAttention)
        max_len = max_model_len or model.config.max_position_embeddings
        if graph_max_batch > 0 and graphable:
            self.graphs = DecodeGraphs(model, self.kv_cache, graph_max_batch, max_len, device)
            self.graphs.capture()
        if graph_extend_tokens > 1 and graphable and model.fused:
            self.extend_graphs = ExtendGraphs(
                model, self.kv_cache, graph_extend_tokens, max_len, device, self.layer_ready
            )
            self.extend_graphs.capture(self.graphs.pool if self.graphs is not None else None)
        self.mixed_graphs: MixedGraphs | None = None
        if graph_mixed_decodes > 0 and graph_extend_tokens > 1 and graphable and model.fused:
            self.mixed_graphs = MixedGraphs(
                model,
                self.kv_cache,
                graph_mixed_decodes,
                graph_extend_tokens,
                max_len,
                device,
                self.layer_ready,
            )
            self.mixed_graphs.capture(self.graphs.pool if self.graphs is not None else None)
        compute_dtype = next(model.parameters()).dtype
        backend = model.attention_backend
        paged = isinstance(backend, TritonPagedAttention) and backend.paged_prefill
        if device.type == "cuda" and paged and self.kv_cache.dtype == compute_dtype:
            # a split variant first met mid-run compiled for ~1 s on the H200 (an fp8 pool's are not
            # compiled ahead: they take scales this has no use for). Imported here: triton is an
            # optional dependency, and a CPU install has none.
            from kvtier.model.kernels.paged_prefill import precompile_splits

            precompile_splits(self.kv_cache[0], model.config.num_heads, compute_dtype)

    def _to_device(self, data: list[int] | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(data, list):
            return to_device_async(data, dtype, self.device)
        return self._host(data, dtype).to(self.device, non_blocking=True)

    def _host(self, data: list[int] | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(data, np.ndarray):
            t = torch.from_numpy(data)
            return t.pin_memory() if self._pin else t
        return torch.tensor(data, dtype=dtype, pin_memory=self._pin)

    def build_inputs(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Token ids, positions, attention metadata and the rows whose logits are sampled. A
        decode whose input token is still on the device (sampled by the step before, not read
        back) gets a placeholder here; ``launch`` fills it in on the device."""
        bs = self.layout.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        query_lens: list[int] = []
        logits_rows: list[int] = []
        num_decodes = 0
        for c in chunks:
            req, start, n = c.request, c.start, c.num_new_tokens
            known = req.token_ids(start, start + n)
            ids.extend(known + [0] * (n - len(known)))  # the pending token, filled on the device
            table = req.block_table
            if n == 1:
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                pos = np.arange(start, start + n)
                positions.extend(pos.tolist())
                slots.extend((np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
            query_lens.append(n)
            context_lens.append(start + n)
            query_start.append(query_start[-1] + n)
            if c.samples:
                logits_rows.append(len(ids) - 1)
            if c.is_decode:
                num_decodes += 1
        width = max(-(-c.end // bs) for c in chunks)
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            query_start_loc=self._to_device(query_start, torch.int32),
            context_lens=self._to_device(context_lens, torch.int32),
            block_tables=self._to_device(self.tables.batch(chunks, width), torch.int32),
            query_lens_host=query_lens,
            context_lens_host=context_lens,
            num_decodes=num_decodes,
        )
        return self._to_device(ids, torch.int64), self._to_device(positions, torch.int64), meta, logits_rows

    def _graph_logits(
        self, chunks: list[ScheduledChunk], fill: _Fill | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Replay the decode graph of this batch's bucket: (logits, greedy tokens); None when the
        batch does not fit one."""
        g = self.graphs
        if g is None or len(chunks) > g.max_batch or not all(c.is_decode for c in chunks):
            return None
        n = len(chunks)
        b = g.bucket(n)
        assert b is not None
        bs = self.layout.block_size
        pad = b - n
        pos = [c.start for c in chunks]
        tables = [c.request.block_table for c in chunks]
        ids = [c.request.token_ids(p, p + 1) for c, p in zip(chunks, pos, strict=True)]
        width = max(-(-(p + 1) // bs) for p in pos)
        return g.run(
            self._host([t[0] if t else 0 for t in ids] + [0] * pad, torch.int64),
            self._host(pos + [0] * pad, torch.int64),
            self._host(
                [t[p // bs] * bs + p % bs for t, p in zip(tables, pos, strict=True)] + [-1] * pad, torch.int64
            ),
            self._host([p + 1 for p in pos] + [0] * pad, torch.int32),
            self._host(self.tables.batch(chunks, width), torch.int32),
            n,
            fill=fill,
        )

    def _extend_graph_logits(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Replay the extend graph of a step that is one prefill row of few tokens: (logits of its
        last token, greedy token); None when the step is not one."""
        g = self.extend_graphs
        if g is None or len(chunks) != 1 or chunks[0].is_decode or chunks[0].num_new_tokens > g.max_tokens:
            return None
        c = chunks[0]
        start, n, bs = c.start, c.num_new_tokens, self.layout.block_size
        b = g.bucket(n)
        assert b is not None
        known = c.request.token_ids(start, start + n)
        if len(known) != n:  # a token still on the device: only decodes read those (eager path)
            return None
        pos = np.arange(start, start + n)
        table = self.tables.row(c.request)
        tokens = np.zeros((4, b), dtype=np.int64)
        tokens[0, :n] = known
        tokens[1, :n] = pos
        tokens[2] = -1
        tokens[2, :n] = table[pos // bs].astype(np.int64) * bs + pos % bs
        tokens[3, 0] = n - 1
        row = np.array([0, n, start + n], dtype=np.int32)
        width = -(-(start + n) // bs)
        return g.run(
            self._host(tokens, torch.int64),
            self._host(row, torch.int32),
            self._host(np.ascontiguousarray(table[:width][None, :]), torch.int32),
        )

    def _mixed_graph_logits(
        self, chunks: list[ScheduledChunk], fill: _Fill | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Replay the mixed graph of a step that is a few decodes and then one short prefill row:
        (logits, greedy tokens) of the rows that sample; None when the step is not one."""
        g = self.mixed_graphs
        if g is None or len(chunks) < 2:
            return None
        *decodes, c = chunks
        if c.is_decode or not all(d.is_decode for d in decodes):
            return None
        key = g.bucket(len(decodes), c.num_new_tokens)
        if key is None:
            return None
        start, n, bs = c.start, c.num_new_tokens, self.layout.block_size
        known = c.request.token_ids(start, start + n)
        if len(known) != n:  # a token still on the device: only decodes read those (eager path)
            return None
        b, t = key
        nd = len(decodes)
        tokens = np.zeros((4, b + t), dtype=np.int64)
        tokens[2] = -1
        rows = np.zeros(2 * b + 3, dtype=np.int32)
        for i, d in enumerate(decodes):
            p = d.start
            tokens[0, i] = (d.request.token_ids(p, p + 1) or [0])[0]
            tokens[1, i] = p
            tokens[2, i] = d.request.block_table[p // bs] * bs + p % bs
            rows[b + 2 + i] = p + 1
        pos = np.arange(start, start + n)
        table = self.tables.row(c.request)
        tokens[0, b : b + n] = known
        tokens[1, b : b + n] = pos
        tokens[2, b : b + n] = table[pos // bs].astype(np.int64) * bs + pos % bs
        tokens[3, : b + 1] = np.arange(b + 1)
        tokens[3, b] = b + n - 1
        rows[: b + 1] = np.arange(b + 1)
        rows[b + 1] = b + n
        rows[2 * b + 2] = start + n
        width = max(-(-(start + n) // bs), *(-(-(d.start + 1) // bs) for d in decodes))
        tables = np.zeros((b + 1, width), dtype=np.int32)
        tables[:nd] = self.tables.batch(decodes, width)
        tables[b, : min(width, table.shape[0])] = table[:width]
        logits, greedy = g.run(
            self._host(tokens, torch.int64),
            self._host(rows, torch.int32),
            self._host(tables, torch.int32),
            fill=fill,
        )
        if not c.samples:  # a prefill chunk short of the prompt's end: only the decodes sample
            return logits[:nd], greedy[:nd]
        if nd == b:
            return logits, greedy
        keep = to_device_async([*range(nd), b], torch.int64, self.device)
        return logits.index_select(0, keep), greedy.index_select(0, keep)

    @torch.inference_mode()
    def launch(
        self,
        chunks: list[ScheduledChunk],
        previous: InFlight | None = None,
        wait_layers: bool = False,
    ) -> InFlight:
        """Start one step on the device and return without waiting for it. A decode whose input is
        the token ``previous`` sampled (still on the device) reads it there. ``wait_layers``: the
        step carries a load copied layer by layer, which records ``layer_ready``; its model waits
        for event i before layer i (the extend and mixed graphs always do)."""
        begin = _timing_event(self.device)
        fill = _pending_fill(chunks, previous, self.device)
        sampling = [c.request for c in chunks if c.samples]
        greedy: torch.Tensor | None = None
        # The decode graphs have no waits for layered copies: a step that carries one (its prompt
        # may have one token left, a "decode") replays an extend or mixed graph, or runs eagerly.
        replayed = (
            (None if wait_layers else self._graph_logits(chunks, fill))
            or self._extend_graph_logits(chunks)
            or self._mixed_graph_logits(chunks, fill)
        )
        layer_ready = self.layer_ready if wait_layers else None
        if replayed is not None:
            logits, greedy = replayed
        else:
            input_ids, positions, meta, logits_rows = self.build_inputs(chunks)
            if fill is not None:
                input_ids.index_copy_(0, fill.rows, fill.tokens)
            logits_index = self._to_device(logits_rows, torch.int64) if sampling else input_ids[:0]
            logits = self.model(input_ids, positions, self.kv_cache, meta, logits_index, layer_ready)
        if not sampling:  # a prefill chunk short of its prompt's end (a graph computed a row anyway)
            return InFlight(chunks, [], None, None, _timing_event(self.device, record=False), begin=begin)
        if all(_plain_greedy(r) for r in sampling):
            # computed in the graph; its buffer is overwritten by the next replay: a copy
            tokens = greedy.clone() if greedy is not None else argmax_rows(logits)
        else:
            tokens = sample(logits, self._sampling_batch(sampling))
        return InFlight(
            chunks,
            sampling,
            tokens,
            _copy_to_host(tokens, self._pin),
            _timing_event(self.device, record=False),
            _PendingLogprobs.of(logits, tokens, sampling),
            {r.request_id: logits[i].clone() for i, r in enumerate(sampling) if r.params.return_logits},
            begin,
        )

    @staticmethod
    def collect(step: InFlight) -> StepResult:
        """Wait for a launched step's sampled tokens (the step's one host synchronisation)."""
        if step.ready is not None:
            step.ready.synchronize()
        if step.tokens is None:
            return StepResult({}, {})
        assert step.host_tokens is not None
        token_ids = step.host_tokens.tolist()
        logprobs = step.logprobs.read(token_ids) if step.logprobs is not None else {}
        kept = {rid: t.cpu() for rid, t in step.kept_logits.items()}
        ids = {r.request_id: t for r, t in zip(step.sampling, token_ids, strict=True)}
        return StepResult(ids, kept, logprobs)

    def execute(self, chunks: list[ScheduledChunk]) -> StepResult:
        """One step, start to end (no token of it may still be pending)."""
        return self.collect(self.launch(chunks))

    def _sampling_batch(self, reqs: list[Request]) -> SamplingBatch:
        ps = [r.params for r in reqs]
        penalties = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in ps)
        batch = SamplingBatch.build(
            temperature=[p.temperature for p in ps],
            top_k=[p.top_k for p in ps],
            top_p=[p.top_p for p in ps],
            min_p=[p.min_p for p in ps],
            repetition_penalty=[p.repetition_penalty for p in ps],
            presence_penalty=[p.presence_penalty for p in ps],
            frequency_penalty=[p.frequency_penalty for p in ps],
            seeds=[p.seed for p in ps],
            logit_bias=[p.logit_bias for p in ps],
            prompt_tokens=[r.prompt_token_ids for r in reqs] if penalties else None,
            output_tokens=[r.output_token_ids for r in reqs] if penalties else None,
            device=self.device,
            generators=[r.generator for r in reqs],
        )
        for r, g in zip(reqs, batch.generators, strict=True):
            r.generator = g
        return batch


@dataclass
class _Fill:
    """Rows of this step's token ids that are the tokens the step before sampled, on the device."""

    rows: torch.Tensor  # [k] int64: rows of this step's ids
    tokens: torch.Tensor  # [k] int64: their tokens


def _pending_fill(
    chunks: list[ScheduledChunk], previous: InFlight | None, device: torch.device
) -> _Fill | None:
    """Where this step's decodes need a token the previous step sampled and nobody has read yet."""
    waiting = [(row, c.request.request_id) for row, c in enumerate(chunks) if c.start >= c.request.num_tokens]
    if not waiting:
        return None
    if previous is None or previous.tokens is None:
        raise RuntimeError("a decode needs a token no launched step sampled")
    where = {r.request_id: i for i, r in enumerate(previous.sampling)}
    for row, rid in waiting:  # only a decode (one token, the last) can wait for a token
        if chunks[row].num_new_tokens != 1 or rid not in where:
            raise RuntimeError(f"request {rid}: its pending token is not in the previous step")
    rows = to_device_async([row for row, _ in waiting], torch.int64, device)
    src = to_device_async([where[rid] for _, rid in waiting], torch.int64, device)
    return _Fill(rows, previous.tokens.index_select(0, src))


def to_device_async(data: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on the device without waiting: a copy from pageable memory would make the
    host wait for everything queued on the stream, the step in flight included."""
    host = torch.tensor(data, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _timing_event(device: torch.device, record: bool = True) -> torch.cuda.Event | None:
    """A CUDA event that can time the device's work (recorded now unless ``record`` is False)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    if record:
        event.record()
    return event


def _copy_to_host(tokens: torch.Tensor, pin: bool) -> torch.Tensor:
    if tokens.device.type == "cpu":
        return tokens
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=pin)
    return host.copy_(tokens, non_blocking=True)


@dataclass
class _PendingLogprobs:
    """Log-probabilities of the sampled tokens and the top alternatives, computed on the device at
    launch for the rows that ask only (a log_softmax over the vocabulary is not free), read back
    with the tokens."""

    rows: list[int]
    reqs: list[Request]
    chosen: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor

    @classmethod
    def of(cls, logits: torch.Tensor, tokens: torch.Tensor, reqs: list[Request]) -> _PendingLogprobs | None:
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if not rows:
            return None
        index = to_device_async(rows, torch.int64, logits.device)
        lp = logits.index_select(0, index).float().log_softmax(dim=-1)
        chosen = lp.gather(1, tokens.index_select(0, index).unsqueeze(1)).squeeze(1)
        k = max(int(reqs[i].params.logprobs or 0) for i in rows)
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)
        return cls(rows, reqs, chosen, top.values, top.indices)

    def read(self, token_ids: list[int]) -> dict[str, TokenLogprob]:
        chosen, values, ids = self.chosen.tolist(), self.values.tolist(), self.indices.tolist()
        out: dict[str, TokenLogprob] = {}
        for j, i in enumerate(self.rows):
            req, want = self.reqs[i], int(self.reqs[i].params.logprobs or 0)
            pairs = list(zip(ids[j][:want], values[j][:want], strict=True))
            out[req.request_id] = TokenLogprob(token_ids[i], chosen[j], pairs)
        return out


class BlockTables:
    """Each running request's block table as a numpy row, grown as its list grows, so a step's
    [batch, width] table is a few row copies instead of a Python list of every entry."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[list[int], np.ndarray, int]] = {}  # id -> (list, row, length)

    def row(self, req: Request) -> np.ndarray:
        table, n = req.block_table, len(req.block_table)
        have = self._rows.get(req.request_id)
        if have is None or have[0] is not table or have[2] > n:
            arr = np.array(table, dtype=np.int32)  # new, or a list replaced (preempted, loaded)
        else:  # the same list, grown at its end only (the scheduler only extends it)
            arr, known = have[1], have[2]
            if arr.shape[0] < n:
                arr = np.concatenate([arr[:known], np.zeros(max(n, 2 * known) - known, np.int32)])
            arr[known:n] = table[known:]
        self._rows[req.request_id] = (table, arr, n)
        return arr[:n]

    def batch(self, chunks: list[ScheduledChunk], width: int) -> np.ndarray:
        out = np.zeros((len(chunks), width), dtype=np.int32)
        for i, c in enumerate(chunks):
            row = self.row(c.request)[:width]
            out[i, : row.shape[0]] = row
        return out

    def forget(self, request_id: str) -> None:
        self._rows.pop(request_id, None)


def _plain_greedy(req: Request) -> bool:
    """Greedy without penalties or biases: the token is the argmax of the raw logits (what the
    graph computed)."""
    p = req.params
    return (
        p.temperature == 0
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
        and not p.logit_bias
    )
