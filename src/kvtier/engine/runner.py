"""Batch -> tensors -> model -> sampled tokens. Owns the KV cache tensor and the device.

One host synchronisation per step: reading the sampled token ids back. Inputs are built on the host
in pinned memory (on CUDA) and copied without blocking. Decode-only batches up to the largest graph
bucket replay a CUDA graph (``cuda_graphs.py``) when the model runs the Triton kernels.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field

import torch

from kvtier.cache.keys import KVLayout
from kvtier.engine.cuda_graphs import DecodeGraphs
from kvtier.engine.request import Request, TokenLogprob
from kvtier.engine.scheduler import ScheduledChunk
from kvtier.model.attention import AttentionMetadata, TritonPagedAttention
from kvtier.model.llama import CausalLM
from kvtier.model.sampler import SamplingBatch, sample


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
    ) -> None:
        """``graph_max_batch`` > 0 captures decode graphs up to that batch (CUDA + Triton backend only)."""
        self.model = model
        self.layout = layout
        self.device = device
        self.dtype = getattr(torch, layout.dtype)
        self.kv_cache = allocate_kv_cache(kv_cache_shape(layout, num_blocks), self.dtype, device)
        self._pin = device.type == "cuda"
        self.graphs: DecodeGraphs | None = None
        graphable = device.type == "cuda" and isinstance(model.attention_backend, TritonPagedAttention)
        if graph_max_batch > 0 and graphable:
            max_len = max_model_len or model.config.max_position_embeddings
            self.graphs = DecodeGraphs(model, self.kv_cache, graph_max_batch, max_len, device)
            self.graphs.capture()

    def _to_device(self, data: list[int], dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype, pin_memory=self._pin)
        return t.to(self.device, non_blocking=True)

    def build_inputs(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.layout.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        query_lens: list[int] = []
        logits_rows: list[int] = []
        max_blocks = max(-(-(c.request.num_computed_tokens + c.num_new_tokens) // bs) for c in chunks)
        tables: list[int] = []
        num_decodes = 0
        for c in chunks:
            req, start, n = c.request, c.request.num_computed_tokens, c.num_new_tokens
            ids.extend(req.token_ids(start, start + n))
            positions.extend(range(start, start + n))
            table = req.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            query_start.append(query_start[-1] + n)
            tables.extend(table[:max_blocks] + [0] * (max_blocks - min(len(table), max_blocks)))
            if c.samples:
                logits_rows.append(len(ids) - 1)
            if n == 1 and c.samples:
                num_decodes += 1
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            query_start_loc=self._to_device(query_start, torch.int32),
            context_lens=self._to_device(context_lens, torch.int32),
            block_tables=self._to_device(tables, torch.int32).view(len(chunks), max_blocks),
            query_lens_host=query_lens,
            context_lens_host=context_lens,
            num_decodes=num_decodes,
        )
        return self._to_device(ids, torch.int64), self._to_device(positions, torch.int64), meta, logits_rows

    def _graph_logits(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Replay the decode graph of this batch's bucket: (logits, greedy tokens); None when the
        batch does not fit one."""
        g = self.graphs
        if (
            g is None
            or len(chunks) > g.max_batch
            or any(c.num_new_tokens != 1 or not c.samples for c in chunks)
        ):
            return None
        n = len(chunks)
        b = g.bucket(n)
        assert b is not None
        bs = self.layout.block_size
        pos = [c.request.num_computed_tokens for c in chunks]
        tables = [c.request.block_table for c in chunks]
        width = max(-(-(p + 1) // bs) for p in pos)
        pad = b - n

        def pinned(data: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype, pin_memory=True)

        flat: list[int] = []
        for t in tables:
            flat.extend(t[:width] + [0] * (width - min(len(t), width)))
        return g.run(
            pinned(
                [c.request.token_ids(p, p + 1)[0] for c, p in zip(chunks, pos, strict=True)] + [0] * pad,
                torch.int64,
            ),
            pinned(pos + [0] * pad, torch.int64),
            pinned(
                [t[p // bs] * bs + p % bs for t, p in zip(tables, pos, strict=True)] + [-1] * pad, torch.int64
            ),
            pinned([p + 1 for p in pos] + [0] * pad, torch.int32),
            pinned(flat, torch.int32).view(n, width),
            n,
        )

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> StepResult:
        sampling = [c.request for c in chunks if c.samples]
        greedy: torch.Tensor | None = None
        replayed = self._graph_logits(chunks)
        if replayed is not None:
            logits, greedy = replayed
        else:
            input_ids, positions, meta, logits_rows = self.build_inputs(chunks)
            if not sampling:
                self.model(input_ids, positions, self.kv_cache, meta, logits_indices=input_ids[:0])
                return StepResult({}, {})
            logits = self.model(
                input_ids, positions, self.kv_cache, meta, self._to_device(logits_rows, torch.int64)
            )
        if greedy is not None and all(_plain_greedy(r) for r in sampling):
            tokens = greedy  # computed in the graph
        else:
            tokens = sample(logits, self._sampling_batch(sampling))
        token_ids = tokens.tolist()  # the step's one host synchronisation (a second when logprobs asked)
        logprobs = _logprobs(logits, tokens, token_ids, sampling)
        kept = {r.request_id: logits[i].cpu() for i, r in enumerate(sampling) if r.params.return_logits}
        return StepResult({r.request_id: t for r, t in zip(sampling, token_ids, strict=True)}, kept, logprobs)

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
            prompt_tokens=[r.prompt_token_ids for r in reqs] if penalties else None,
            output_tokens=[r.output_token_ids for r in reqs] if penalties else None,
            device=self.device,
            generators=[r.generator for r in reqs],
        )
        for r, g in zip(reqs, batch.generators, strict=True):
            r.generator = g
        return batch


def _logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, token_ids: list[int], reqs: list[Request]
) -> dict[str, TokenLogprob]:
    """Log-probabilities of the sampled tokens and the top alternatives, for the rows that ask only
    (a log_softmax over the vocabulary is not free), copied to the host in one transfer."""
    rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
    if not rows:
        return {}
    index = torch.tensor(rows, device=logits.device)
    lp = logits.index_select(0, index).float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens.index_select(0, index).unsqueeze(1)).squeeze(1)
    k = max(int(reqs[i].params.logprobs or 0) for i in rows)
    top = lp.topk(min(k, lp.shape[-1]), dim=-1)
    chosen_h, values_h, ids_h = chosen.tolist(), top.values.tolist(), top.indices.tolist()
    out: dict[str, TokenLogprob] = {}
    for j, i in enumerate(rows):
        req, want = reqs[i], int(reqs[i].params.logprobs or 0)
        pairs = list(zip(ids_h[j][:want], values_h[j][:want], strict=True))
        out[req.request_id] = TokenLogprob(token_ids[i], chosen_h[j], pairs)
    return out


def _plain_greedy(req: Request) -> bool:
    """Greedy without penalties: the token is the argmax of the raw logits (what the graph computed)."""
    p = req.params
    return (
        p.temperature == 0
        and p.repetition_penalty == 1.0
        and not p.presence_penalty
        and not p.frequency_penalty
    )
