"""Continuous batching with a per-step token budget, chunked prefill, preemption by recompute.

Each step the scheduler gives every running request its next tokens (one for a decode, a chunk for a
prompt still being prefilled), then admits waiting requests in arrival order while blocks and budget
last. A prompt's leading full blocks that the pool already holds (same chained key, same tokens) are
pinned instead of computed. When blocks run out, the most recently admitted running request is
preempted: its blocks are released (they keep their keys, so its re-admission usually hits them) and
it goes back to the head of the queue. A request is never larger than the pool: that is rejected at
admission with a clear error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.cache.blocks import BlockPool
from kvtier.cache.hierarchy import KVHierarchy, LoadPlan
from kvtier.cache.keys import BlockKey, chain_keys
from kvtier.engine.request import FinishReason, InvalidRequestError, Request, RequestState


@dataclass
class ScheduledChunk:
    """Tokens ``start .. start + num_new_tokens`` of one request, computed in one step. ``start``
    and ``samples`` are fixed when the chunk is made: the request's counts move on at launch."""

    request: Request
    num_new_tokens: int
    start: int = field(init=False)
    samples: bool = field(init=False)  # it reaches the end of the tokens: a token is sampled

    def __post_init__(self) -> None:
        self.start = self.request.num_computed_tokens
        self.samples = self.start + self.num_new_tokens == self.request.num_tokens_with_pending

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self.samples

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes first, then prefills
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


@dataclass
class SchedulerLimits:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    enable_chunked_prefill: bool = True


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        limits: SchedulerLimits,
        root_key: Callable[[str | None], BlockKey],
        hierarchy: KVHierarchy | None = None,
    ) -> None:
        self.pool = pool
        self.hierarchy = hierarchy
        self.loading: list[Request] = []
        self.limits = limits
        self.block_size = pool.block_size
        self._root_key = root_key
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # (block ids, plan, block tokens) -> blocks that arrived verified: the engine's load from its
        # own memory into the pool, run inside ``schedule`` (KVTransfer.load_now); None: every load
        # goes through the I/O threads and the LOADING state
        self.load_now: Callable[[list[int], LoadPlan, list[list[int]]], int] | None = None

    # -- admission control ----------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int) -> None:
        """Raise InvalidRequestError for a prompt that can never run; say which limit it breaks."""
        if num_prompt_tokens == 0:
            raise InvalidRequestError("the prompt is empty: at least one token is needed")
        if num_prompt_tokens >= self.limits.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {num_prompt_tokens} tokens; the model's context is "
                f"{self.limits.max_model_len} tokens, and at least one must be left to generate"
            )
        blocks = self._blocks_for(num_prompt_tokens + 1)
        if blocks > self.pool.num_blocks:
            raise InvalidRequestError(
                f"the prompt needs {blocks} KV blocks of {self.block_size} tokens; the KV pool holds "
                f"{self.pool.num_blocks} blocks ({self.pool.num_blocks * self.block_size} tokens): "
                f"raise --kv-cache-memory or shorten the prompt"
            )

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    # -- the step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.limits.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:  # after a preemption the pool is tight: let running requests drain
            self._admit_waiting(out, budget)
        decodes = [c for c in out.chunks if c.is_decode]
        prefills = [c for c in out.chunks if not c.is_decode]
        out.chunks = decodes + prefills
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            remaining = req.num_tokens_with_pending - req.num_computed_tokens
            if remaining <= 0 or req.ends_with_pending(self.limits.max_model_len):
                i += 1  # its last token is still on the device (a step launched, not read back)
                continue
            num_new = min(remaining, budget)
            if not self.limits.enable_chunked_prefill and num_new < remaining:
                break
            total = self._blocks_for(req.num_computed_tokens + num_new)
            if total <= len(req.block_table):  # most decodes: the last block has room
                out.chunks.append(ScheduledChunk(req, num_new))
                budget -= num_new
                i += 1
                continue
            if total > self.pool.num_blocks and req.num_pending:
                i += 1  # it outgrew the pool: it stops once its last token is read back
                continue
            if total > self.pool.num_blocks:  # it outgrew the whole pool: stop it, never livelock
                self.finish(req, FinishReason.LENGTH)
                req.error = f"the KV pool ({self.pool.num_blocks} blocks) is full at {req.num_tokens} tokens"
                out.failed.append(req)
                continue
            needed = total - len(req.block_table)
            while needed > self.pool.num_available:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.state is not RequestState.RUNNING:
                break
            req.block_table.extend(self.pool.allocate(needed))
            out.chunks.append(ScheduledChunk(req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self._restart(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(req)

    def _restart(self, req: Request) -> None:
        """Back to the front of the queue with nothing computed (its cached blocks stay cached)."""
        self.running.remove(req)
        self.pool.release(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0
        req.num_committed_blocks = 0
        req.state = RequestState.WAITING
        self.waiting.appendleft(req)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        skipped: list[Request] = []
        while (
            self.waiting and budget > 0 and len(self.running) + len(self.loading) < self.limits.max_num_seqs
        ):
            req = self.waiting[0]
            if req.wait_for is not None and not _prefilled(req.wait_for):
                skipped.append(self.waiting.popleft())  # a sibling of n > 1 waits to share blocks
                continue
            scheduled = self._try_admit(req, out, budget, first=not out.chunks)
            if scheduled is None:
                break
            self.waiting.popleft()
            budget -= scheduled
        self.waiting.extendleft(reversed(skipped))

    def _try_admit(self, req: Request, out: SchedulerOutput, budget: int, first: bool) -> int | None:
        """Admit ``req``: returns the tokens scheduled now (0 while it loads), None if it must wait."""
        hits = self._match(req)
        pinned = False
        if self.hierarchy is not None:
            loads = self._try_load(req, hits, budget, first)
            if isinstance(loads, list):  # loaded now: the device hits and the loaded blocks, pinned
                hits, pinned = loads, True
            elif loads is not None:
                return 0 if loads else None
        num_cached = len(hits) * self.block_size
        admission = self._admission(req, hits, num_cached, budget, first)
        if admission is None:
            self._let_go_of_loaded(req, hits, pinned)
            return None
        num_new, new_blocks = admission
        if not pinned:
            self._pin_hits(hits)
        req.block_table = hits + self.pool.allocate(new_blocks)
        req.num_computed_tokens = num_cached
        req.num_committed_blocks = len(hits)
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = min(num_cached, len(req.prompt_token_ids))
        req.state = RequestState.RUNNING
        self.running.append(req)
        out.chunks.append(ScheduledChunk(req, num_new))
        return num_new

    def _try_load(self, req: Request, hits: list[int], budget: int, first: bool) -> bool | list[int] | None:
        """Start loading the blocks after the device hit from the tiers below, when that beats
        recomputing them. None: nothing worth loading (admit normally); False: no room yet; True:
        loading (the request waits in LOADING); a list: loaded at once (``load_now``), the device
        hits and the loaded blocks, pinned, to admit now (``budget`` and ``first`` as in
        ``_try_admit``, which admits it)."""
        assert self.hierarchy is not None
        max_blocks = (req.num_tokens - 1) // self.block_size
        if len(hits) >= max_blocks:
            return None
        # A request that waits for room keeps its plan: asking the tiers again every step would
        # repeat a Redis round trip per step and count one decision many times.
        if req.tier_plan is None or req.tier_plan[0] != len(hits):
            req.tier_plan = (len(hits), self.hierarchy.plan(req.block_keys[len(hits) : max_blocks]))
        plan = req.tier_plan[1]
        if not plan.num_blocks:
            req.tier_plan = None
            return None
        if not self._room_for(hits, plan.num_blocks):
            return False
        if self.load_now is not None and not self._admits_after_load(req, hits, plan, budget, first):
            return False  # loaded now, it would be let go (a layered one planned and counted again)
        req.tier_plan = None
        self._pin_hits(hits)
        req.block_table = hits + self.pool.allocate(plan.num_blocks)
        req.num_computed_tokens = len(hits) * self.block_size
        req.num_committed_blocks = len(hits)
        tokens, bs = req.all_token_ids, self.block_size
        base = len(hits)
        block_tokens = [tokens[i * bs : (i + 1) * bs] for i in range(base, base + plan.num_blocks)]
        if self.load_now is not None and self.hierarchy.loads_layered(plan):
            layered = self._reserve_layered(req, hits, plan, block_tokens)
            if layered is not None:
                return layered
        if self.load_now is not None and self.hierarchy.loads_at_once(plan):
            return self._load_now(req, hits, plan, block_tokens)
        if self.hierarchy.loads_on_device(plan):
            req.load_future = self.hierarchy.load_on_device(plan, block_tokens)
        else:
            req.load_future = self.hierarchy.load_async(plan, block_tokens)
        req.state = RequestState.LOADING
        self.loading.append(req)
        return True

    def _admission(
        self, req: Request, hits: list[int], num_cached: int, budget: int, first: bool
    ) -> tuple[int, int] | None:
        """(tokens scheduled, new blocks) of a step that admits ``req`` with its device ``hits``
        and ``num_cached`` tokens cached; None when it cannot run in this step: chunked prefill is
        off and the rest is over ``budget`` (it waits for a step of its own; ``first``: this one
        is, and may exceed the budget for one long prompt), or the pool has no room."""
        remaining = req.num_tokens - num_cached
        if remaining <= budget or self.limits.enable_chunked_prefill:
            num_new = min(remaining, budget)
        elif first:
            num_new = remaining
        else:
            return None
        new_blocks = self._blocks_for(num_cached + num_new) - len(hits)
        return (num_new, new_blocks) if self._room_for(hits, new_blocks) else None

    def _room_for(self, hits: list[int], new_blocks: int) -> bool:
        """Whether the pool can give ``new_blocks`` besides pinning the device ``hits`` (those no
        request holds are evictable: pinning them takes them out of the available count)."""
        hits_evictable = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        return new_blocks + hits_evictable <= self.pool.num_available

    def _admits_after_load(
        self, req: Request, hits: list[int], plan: LoadPlan, budget: int, first: bool
    ) -> bool:
        """Whether ``_try_admit`` will admit ``req`` in this step if ``plan`` is loaded now (at once
        or layered, the roads that admit it in the loading step): its step fits and the pool has
        room for the loaded blocks and the tail computed now. A load that goes on while its
        request waits (LOADING) is not asked: it holds only what it loads."""
        assert self.hierarchy is not None
        if not (self.hierarchy.loads_layered(plan) or self.hierarchy.loads_at_once(plan)):
            return True
        num_cached = (len(hits) + plan.num_blocks) * self.block_size
        return self._admission(req, hits, num_cached, budget, first) is not None

    def _load_now(
        self, req: Request, hits: list[int], plan: LoadPlan, block_tokens: list[list[int]]
    ) -> list[int]:
        """Load ``plan`` into the request's new blocks on this thread and commit the blocks that
        arrived. The request stays WAITING: the caller admits it with the returned blocks (pinned)
        as its cached prefix, in this same step."""
        assert self.load_now is not None
        num_loaded = self.load_now(req.block_table[len(hits) :], plan, block_tokens)
        self._commit_loaded(req, num_loaded)
        cached = req.block_table
        req.block_table = []
        req.num_computed_tokens = req.num_committed_blocks = 0
        return cached

    def _reserve_layered(
        self, req: Request, hits: list[int], plan: LoadPlan, block_tokens: list[list[int]]
    ) -> list[int] | None:
        """Reserve the tier's blocks of ``plan`` for a load layer by layer with the step that admits
        ``req`` (``Request.layered_load``): as ``_load_now``, the returned device hits and blocks to
        fill, pinned, are its cached prefix this step, but the blocks are committed only once the
        load's verdict is read (``settle_layered``). None: the tier no longer holds the first."""
        assert self.hierarchy is not None
        load = self.hierarchy.reserve_layered(plan, block_tokens)
        if load is None:
            return None
        base = len(hits)
        load.block_ids = req.block_table[base : base + load.count]
        self.pool.release(req.block_table[base + load.count :])
        req.layered_load = load
        if req.num_cached_tokens < 0:
            req.num_loaded_tokens = load.count * self.block_size
        cached = hits + load.block_ids
        req.block_table = []
        req.num_computed_tokens = req.num_committed_blocks = 0
        return cached

    def _let_go_of_loaded(self, req: Request, hits: list[int], pinned: bool) -> None:
        """``req`` is not admitted this step after its load ran or was reserved (``pinned``): the
        loaded blocks stay cached (device hits when it is admitted), reserved ones are freed."""
        if pinned:
            self.pool.release(hits)
            self._cancel_layered(req)

    def _cancel_layered(self, req: Request) -> None:
        """The request reserved a layered load but was not admitted: nothing was copied."""
        if req.layered_load is not None:
            req.layered_load.cancel()
            req.layered_load = None
            if req.num_cached_tokens < 0:  # as _reserve_layered counted it: on first admission only
                req.num_loaded_tokens = 0

    def settle_layered(self, req: Request, num_intact: int) -> bool:
        """The step that ran ``req`` with its layered load was collected and ``num_intact`` leading
        blocks passed their check. All of them: they are committed to the pool's cache and the
        request goes on (True). Fewer: what the step computed from them is wrong, so the intact
        ones are committed and the request starts again from the pool (False: drop its token)."""
        load = req.layered_load
        assert load is not None
        req.layered_load = None
        first = req.block_table.index(load.block_ids[0]) if load.block_ids else 0
        tokens, bs = req.all_token_ids, self.block_size
        for i in range(first, first + num_intact):
            self.pool.commit(req.block_table[i], req.block_keys[i], tokens[i * bs : (i + 1) * bs])
        if num_intact == load.count:
            return True
        self._restart(req)
        req.num_cached_tokens = -1  # counted again when it is admitted again
        req.num_loaded_tokens = 0
        return False

    def complete_load(self, req: Request, num_loaded: int) -> list[int]:
        """The request's load finished with ``num_loaded`` verified blocks (installed by the engine):
        commit them, free the blocks that stayed empty, and let the request run. Returns the
        loaded block ids."""
        loaded = self._commit_loaded(req, num_loaded)
        req.num_committed_blocks = len(req.block_table)
        req.num_computed_tokens = len(req.block_table) * self.block_size
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = min(req.num_computed_tokens, len(req.prompt_token_ids))
        req.load_future = None
        self.loading.remove(req)
        req.state = RequestState.RUNNING
        self.running.append(req)
        return loaded

    def _commit_loaded(self, req: Request, num_loaded: int) -> list[int]:
        """A tier load filled the first ``num_loaded`` blocks after the request's committed ones:
        commit them to the pool's cache, free the blocks after them. Returns the loaded block ids."""
        base = req.num_committed_blocks
        loaded = req.block_table[base : base + num_loaded]
        self.pool.release(req.block_table[base + num_loaded :])
        req.block_table = req.block_table[: base + num_loaded]
        tokens, bs = req.all_token_ids, self.block_size
        for i in range(base, base + num_loaded):
            self.pool.commit(req.block_table[i], req.block_keys[i], tokens[i * bs : (i + 1) * bs])
        if req.num_cached_tokens < 0:
            req.num_loaded_tokens = num_loaded * bs
        return loaded

    def _pin_hits(self, hits: list[int]) -> None:
        """Take a reference on the device hits; selective writing counts them as reuses."""
        if self.hierarchy is not None:
            for b in hits:
                key = self.pool.key_of(b)
                if key is not None:
                    self.hierarchy.note_hit(key)
        self.pool.pin(hits)

    def _match(self, req: Request) -> list[int]:
        self.extend_keys(req)
        # The last token is always computed: its logits give the next token.
        max_blocks = (req.num_tokens - 1) // self.block_size
        tokens = req.all_token_ids
        bs = self.block_size
        block_tokens = [tokens[i * bs : (i + 1) * bs] for i in range(max_blocks)]
        return self.pool.match_prefix(req.block_keys[:max_blocks], block_tokens)

    # -- after the model ran ---------------------------------------------------------------------
    def extend_keys(self, req: Request) -> None:
        """Key every full block of the request's tokens not keyed yet (chained from the last)."""
        full = req.num_tokens // self.block_size
        have = len(req.block_keys)
        if full > have:
            parent = req.block_keys[-1] if have else None
            root = self._root_key(req.cache_salt)
            req.block_keys.extend(
                chain_keys(root, req.all_token_ids, self.block_size, start=have, parent=parent)
            )

    def commit_computed_blocks(self, req: Request, computed: int | None = None) -> list[int]:
        """Full blocks whose KV is now computed (up to token ``computed``, default all the request
        counts) get their key and become shareable. Returns the ids of blocks that became shareable
        now (write-through stores them down the hierarchy)."""
        upto = req.num_computed_tokens if computed is None else computed
        full_computed = min(upto // self.block_size, len(req.block_table), req.num_tokens // self.block_size)
        if full_computed <= req.num_committed_blocks:
            return []
        self.extend_keys(req)
        tokens = req.all_token_ids
        bs = self.block_size
        shared = []
        for i in range(req.num_committed_blocks, full_computed):
            if self.pool.commit(req.block_table[i], req.block_keys[i], tokens[i * bs : (i + 1) * bs]):
                shared.append(req.block_table[i])
        req.num_committed_blocks = full_computed
        return shared

    def finish(self, req: Request, reason: FinishReason) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.loading:
            self.loading.remove(req)
            if req.load_future is not None:
                req.load_future.cancel()  # a device load's slots are released once it has run
            req.load_future = None
        elif req in self.waiting:
            self.waiting.remove(req)
        if req.block_table:
            self.pool.release(req.block_table)
            req.block_table = []
        req.state = RequestState.FINISHED
        req.finish_reason = reason

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


def _prefilled(req: Request) -> bool:
    """Its prompt's blocks are committed: its first token has been read back (a launched prefill
    counts its tokens computed before they are, and commits them only when its step is read)."""
    return req.is_finished or (req.state is RequestState.RUNNING and bool(req.output_token_ids))
