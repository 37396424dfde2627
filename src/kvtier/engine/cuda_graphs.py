"""CUDA graphs of the decode step, one per bucketed batch size, and of a short extend step, one per
bucketed token count, captured at start-up.

A batch-1 decode step of a small model is a few hundred kernels of a few microseconds each; launched
one by one from Python the launches, not the GPU, set the pace. A graph replays them all with one
launch. Its inputs live in static buffers that each step overwrites: token ids, positions, the
slots the new K/V go to, context lengths and block tables. A batch is padded up to the next bucket:
padding rows write no K/V (slot -1) and attend to nothing (length 0), and their logits are dropped.
Batches larger than the largest bucket run eagerly, and so does a batch with a prefill row unless
it fits an extend or mixed graph (below).

The decode kernel's grid is frozen at capture, so each graph is captured for the longest context
the engine allows (``decode_splits`` for that length); the kernel cuts each row's own keys into
those splits, so short rows do not pay for it.

A step that is one prefill row of a few tokens (a follow-up turn whose prefix is cached) is also a
few hundred launches: on the H200's host, ~80 us each, 25-35 ms for the 8B where the device needs
~8. ``ExtendGraphs`` replays it. The row's tokens are padded to the bucket: padding tokens write
no K/V (slot -1), the prefill kernel masks them out of attention (it reads the row's real length
from ``query_start``), and only the last real token's logits are taken.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvtier.model.attention import AttentionMetadata
from kvtier.model.llama import CausalLM

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def buckets_up_to(max_batch: int) -> list[int]:
    sizes = [b for b in BUCKETS if b <= max_batch]
    if max_batch > 0 and (not sizes or sizes[-1] != max_batch) and max_batch < BUCKETS[-1]:
        sizes.append(max_batch)
    return sizes


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` (the first maximal index of each row), in two stages.

    torch's argmax reduces a [1, 128k] row in one thread block (~28 us on an H200); a max over
    chunks, then an argmax over the chunk maxima, spreads the row over the GPU. Exact: max and
    argmax both return the first maximal index, so the first chunk holding the maximum wins.
    """
    rows, vocab = logits.shape
    chunk = next((c for c in (512, 256, 128) if vocab % c == 0 and vocab // c >= 2), None)
    if chunk is None:
        return logits.argmax(-1)
    values, index = logits.view(rows, vocab // chunk, chunk).max(-1)
    best = values.argmax(-1, keepdim=True)
    return (index.gather(1, best) + best * chunk).squeeze(1)


def capture_graph(
    model: CausalLM, args: tuple[Any, ...], stream: torch.cuda.Stream, pool: Any
) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
    """One step's graph: (graph, its logits, their argmax), read from static buffers after each
    replay. One eager run first, on the side stream as torch asks: it compiles the kernels of this
    shape outside the capture."""
    engine_stream = torch.cuda.current_stream(stream.device)
    stream.wait_stream(engine_stream)
    with torch.cuda.stream(stream):
        model(*args)
    engine_stream.wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        logits = model(*args)
        greedy = argmax_rows(logits)
    return graph, logits, greedy


class _StepGraphs:
    """What both kinds of graphs hold: one graph per bucket, each with static token inputs (ids,
    positions, K/V slots) for the largest bucket, and its outputs (logits, greedy tokens)."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        buckets: list[int],
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.buckets = buckets
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // kv_cache.shape[3])
        n = self.largest
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.greedy: dict[int, torch.Tensor] = {}  # each row's argmax, computed in the graph too
        self.capture_seconds = 0.0

    @property
    def largest(self) -> int:
        return self.buckets[-1] if self.buckets else 0

    def bucket(self, size: int) -> int | None:
        return next((b for b in self.buckets if b >= size), None)


class DecodeGraphs(_StepGraphs):
    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        max_batch: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        super().__init__(model, kv_cache, buckets_up_to(max_batch), max_model_len, device)
        n = self.largest
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=device)
        self.pool: Any = None  # the graphs' memory pool, once captured

    @property
    def max_batch(self) -> int:
        return self.largest

    def _meta(self, batch: int) -> AttentionMetadata:
        from kvtier.model.kernels.paged_decode import block_n_for, choose_splits

        cfg = self.model.config
        splits = choose_splits(
            batch, cfg.num_kv_heads, self.max_model_len, block_n_for(cfg.head_dim), self.device
        )
        return AttentionMetadata(
            slot_mapping=self.slots[:batch],
            query_start_loc=self.query_start[: batch + 1],
            context_lens=self.context_lens[:batch],
            block_tables=self.block_tables[:batch],
            query_lens_host=[1] * batch,
            context_lens_host=[self.max_model_len] * batch,
            num_decodes=batch,
            decode_splits=splits,
        )

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket, largest first (the others reuse its memory pool). Returns seconds."""
        from rich.progress import track

        start = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream(self.device)
        sizes = list(reversed(self.buckets))
        show = sys.stderr.isatty()
        for b in track(sizes, description="capturing CUDA graphs", disable=not show, transient=True):
            args = (self.ids[:b], self.positions[:b], self.kv_cache, self._meta(b))
            graph, self.logits[b], self.greedy[b] = capture_graph(self.model, args, stream, pool)
            pool = graph.pool()
            self.graphs[b] = graph
        self.pool = pool
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        log.info(
            "captured %d CUDA graphs (batch %s) in %.2f s", len(sizes), self.buckets, self.capture_seconds
        )
        return self.capture_seconds

    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        batch: int,
        fill: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs are host tensors (pinned) already padded to ``bucket(batch)`` rows, except the
        block tables ([batch, width]). ``fill`` (rows, tokens on the device) overwrites the ids of
        rows whose token the step before sampled. Returns views of the [batch, vocab] float32
        logits and of their [batch] argmax (the greedy tokens)."""
        b = ids.shape[0]
        self.ids[:b].copy_(ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slots[:b].copy_(slots, non_blocking=True)
        self.context_lens[:b].copy_(context_lens, non_blocking=True)
        self.block_tables[:batch, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        if fill is not None:
            self.ids.index_copy_(0, fill.rows, fill.tokens)
        self.graphs[b].replay()
        return self.logits[b][:batch], self.greedy[b][:batch]


EXTEND_BUCKETS = (16, 32, 64, 128, 256)


class ExtendGraphs(_StepGraphs):
    """Graphs of a step that is a single prefill / extend row of up to ``max_tokens`` new tokens."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        max_tokens: int,
        max_model_len: int,
        device: torch.device,
        layer_ready: Sequence[torch.cuda.Event] = (),
    ) -> None:
        """``layer_ready``: external events the graphs wait for before each layer (a load copied
        layer by layer records them; ``ModelRunner.layer_ready``)."""
        buckets = [b for b in EXTEND_BUCKETS if b <= max_tokens] or ([max_tokens] if max_tokens > 1 else [])
        super().__init__(model, kv_cache, buckets, max_model_len, device)
        self.layer_ready = list(layer_ready) or None
        self.row = torch.zeros(3, dtype=torch.int32, device=device)  # query start 0, query end, context
        self.logits_row = torch.zeros(1, dtype=torch.int64, device=device)  # the last real token
        self.block_tables = torch.zeros((1, self.max_blocks), dtype=torch.int32, device=device)
        self.replays = 0

    @property
    def max_tokens(self) -> int:
        return self.largest

    def _meta(self, tokens: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:tokens],
            query_start_loc=self.row[:2],
            context_lens=self.row[2:3],
            block_tables=self.block_tables,
            query_lens_host=[tokens],  # the grid's tiles, for the bucket's every token
            context_lens_host=[self.max_model_len],  # the key splits, for the longest context
            num_decodes=0,
        )

    @torch.inference_mode()
    def capture(self, pool: Any = None) -> float:
        """Capture every bucket, largest first, into ``pool`` (the decode graphs'). Returns seconds."""
        start = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        for t in reversed(self.buckets):
            self.row.copy_(torch.tensor([0, t, t], dtype=torch.int32))
            self.logits_row.fill_(t - 1)
            meta = self._meta(t)
            args = (self.ids[:t], self.positions[:t], self.kv_cache, meta, self.logits_row, self.layer_ready)
            graph, self.logits[t], self.greedy[t] = capture_graph(self.model, args, stream, pool)
            pool = graph.pool()
            self.graphs[t] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        log.info(
            "captured %d extend CUDA graphs (tokens %s) in %.2f s",
            len(self.buckets),
            self.buckets,
            self.capture_seconds,
        )
        return self.capture_seconds

    def run(
        self, tokens: torch.Tensor, row: torch.Tensor, block_table: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens``: host [4, bucket] int64 (ids, positions, slots with -1 for padding, and the
        last real token's index first in the fourth); ``row``: host [3] int32 (0, new tokens, context
        length); ``block_table``: host [1, width]. Returns the last real token's [1, vocab] float32
        logits and its argmax."""
        t = tokens.shape[1]
        self.ids[:t].copy_(tokens[0], non_blocking=True)
        self.positions[:t].copy_(tokens[1], non_blocking=True)
        self.slots[:t].copy_(tokens[2], non_blocking=True)
        self.logits_row.copy_(tokens[3, :1], non_blocking=True)
        self.row.copy_(row, non_blocking=True)
        self.block_tables[:, : block_table.shape[1]].copy_(block_table, non_blocking=True)
        self.graphs[t].replay()
        self.replays += 1
        return self.logits[t], self.greedy[t]


class MixedGraphs:
    """Graphs of a step of up to ``max_decodes`` decode rows and one extend row of up to
    ``max_tokens`` new tokens: a follow-up turn (its prefix cached or just loaded) joining the
    decodes of other requests, the common step of a multi-turn chat. Eager, such a step is the same
    few hundred launches as an extend step alone; in the H200's 8B chat with tiers the engine thread,
    not the device, set the pace of those steps.

    One graph per (decode bucket, token bucket). The flat batch is the decode rows, padded to their
    bucket (slot -1, length 0: they write and read nothing), then the extend row's tokens padded to
    theirs (slot -1, masked by the row's real end in ``query_start``). Logits are taken for every
    decode row and the extend row's last real token; the caller keeps the real rows.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        max_decodes: int,
        max_tokens: int,
        max_model_len: int,
        device: torch.device,
        layer_ready: Sequence[torch.cuda.Event] = (),
    ) -> None:
        """``layer_ready``: as ``ExtendGraphs``'s (a follow-up turn whose prefix is loaded layer by
        layer joins the decodes)."""
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.max_model_len = max_model_len
        self.layer_ready = list(layer_ready) or None
        self.decode_buckets = buckets_up_to(max_decodes)
        self.token_buckets = [t for t in EXTEND_BUCKETS if t <= max_tokens]
        nd = self.max_decodes
        n = nd + self.max_tokens
        max_blocks = -(-max_model_len // kv_cache.shape[3])
        self.ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.query_start = torch.zeros(nd + 2, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(nd + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((nd + 1, max_blocks), dtype=torch.int32, device=device)
        self.logits_rows = torch.zeros(nd + 1, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.greedy: dict[tuple[int, int], torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.replays = 0

    @property
    def max_decodes(self) -> int:
        return self.decode_buckets[-1] if self.decode_buckets else 0

    @property
    def max_tokens(self) -> int:
        return self.token_buckets[-1] if self.token_buckets else 0

    def bucket(self, decodes: int, tokens: int) -> tuple[int, int] | None:
        b = next((x for x in self.decode_buckets if x >= decodes), None)
        t = next((x for x in self.token_buckets if x >= tokens), None)
        return None if b is None or t is None else (b, t)

    def _meta(self, b: int, t: int) -> AttentionMetadata:
        from kvtier.model.kernels.paged_decode import block_n_for, choose_splits

        cfg = self.model.config
        block_n = block_n_for(cfg.head_dim)
        splits = choose_splits(b, cfg.num_kv_heads, self.max_model_len, block_n, self.device)
        return AttentionMetadata(
            slot_mapping=self.slots[: b + t],
            query_start_loc=self.query_start[: b + 2],
            context_lens=self.context_lens[: b + 1],
            block_tables=self.block_tables[: b + 1],
            query_lens_host=[1] * b + [t],  # the extend row's grid covers the bucket's every token
            context_lens_host=[self.max_model_len] * (b + 1),  # splits for the longest context
            num_decodes=b,
            decode_splits=splits,
        )

    @torch.inference_mode()
    def capture(self, pool: Any = None) -> float:
        """Capture every (decodes, tokens) bucket, largest first, into ``pool``. Returns seconds."""
        start = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.decode_buckets):
            for t in reversed(self.token_buckets):
                self.query_start[: b + 2].copy_(torch.tensor([*range(b + 1), b + t], dtype=torch.int32))
                self.context_lens[:b].zero_()
                self.context_lens[b] = t
                self.logits_rows[: b + 1].copy_(torch.tensor([*range(b), b + t - 1]))
                args = (
                    self.ids[: b + t],
                    self.positions[: b + t],
                    self.kv_cache,
                    self._meta(b, t),
                    self.logits_rows[: b + 1],
                    self.layer_ready,
                )
                graph, self.logits[b, t], self.greedy[b, t] = capture_graph(self.model, args, stream, pool)
                pool = graph.pool()
                self.graphs[b, t] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        log.info(
            "captured %d mixed CUDA graphs (decodes %s x tokens %s) in %.2f s",
            len(self.graphs),
            self.decode_buckets,
            self.token_buckets,
            self.capture_seconds,
        )
        return self.capture_seconds

    def run(
        self,
        tokens: torch.Tensor,
        rows: torch.Tensor,
        block_tables: torch.Tensor,
        fill: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens``: host [4, b + t] int64: ids, positions, slots (the decode rows padded to b,
        then the extend row padded to t) and, first in the fourth, the b + 1 rows whose logits are
        taken (decode rows, then the extend row's last real token); ``rows``: host [2b + 3] int32:
        query start ([b + 2]) and context lengths ([b + 1]); ``block_tables``: host [b + 1, width].
        ``fill`` overwrites the ids of decode rows whose token the step before sampled. Returns the
        [b + 1, vocab] logits and their argmax; the caller drops the padding rows."""
        n = tokens.shape[1]
        b = (rows.shape[0] - 3) // 2
        key = (b, n - b)
        self.ids[:n].copy_(tokens[0], non_blocking=True)
        self.positions[:n].copy_(tokens[1], non_blocking=True)
        self.slots[:n].copy_(tokens[2], non_blocking=True)
        self.logits_rows[: b + 1].copy_(tokens[3, : b + 1], non_blocking=True)
        self.query_start[: b + 2].copy_(rows[: b + 2], non_blocking=True)
        self.context_lens[: b + 1].copy_(rows[b + 2 :], non_blocking=True)
        self.block_tables[: b + 1, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        if fill is not None:
            self.ids.index_copy_(0, fill.rows, fill.tokens)
        self.graphs[key].replay()
        self.replays += 1
        return self.logits[key], self.greedy[key]
