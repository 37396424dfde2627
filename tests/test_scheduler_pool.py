"""BlockPool bookkeeping and Scheduler budgets, without a model.

The scheduler is driven the way Engine.step drives it (schedule, then advance each chunk's request,
commit full blocks, append a token when the chunk samples), and every step is checked: the token
budget, decodes first, ref counts equal to the holders, and the pool's own invariants.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from kvtier.cache.blocks import BlockPool, NoFreeBlocksError
from kvtier.cache.keys import BlockKey, KVLayout, chain_keys, root_key
from kvtier.engine.request import FinishReason, Request, RequestState, SamplingParams
from kvtier.engine.scheduler import ScheduledChunk, Scheduler, SchedulerLimits

BS = 4
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=BS, dtype="float32")
ROOT = root_key("test-model", LAYOUT)


def blocks_of(tokens: list[int]) -> list[list[int]]:
    return [tokens[i * BS : (i + 1) * BS] for i in range(len(tokens) // BS)]


def cached_chain(pool: BlockPool, tokens: list[int]) -> tuple[list[int], list[BlockKey]]:
    """Allocate, commit and release the full blocks of ``tokens``: they end up evictable."""
    keys = chain_keys(ROOT, tokens, BS)
    ids = pool.allocate(len(keys))
    for b, key, toks in zip(ids, keys, blocks_of(tokens), strict=True):
        assert pool.commit(b, key, toks)
    pool.release(ids)
    return ids, keys


# -- BlockPool ----------------------------------------------------------------------------------


def test_allocate_and_release() -> None:
    pool = BlockPool(8, BS)
    got = pool.allocate(3)
    assert len(set(got)) == 3
    assert [pool.ref_counts[b] for b in got] == [1, 1, 1]
    assert pool.num_available == 5
    pool.check_invariants()
    pool.release(got)  # never committed: back to free, no key
    assert pool.num_available == 8 and pool.num_cached == 0
    pool.assert_idle()


def test_allocate_is_all_or_nothing() -> None:
    pool = BlockPool(8, BS)
    held = pool.allocate(6)
    with pytest.raises(NoFreeBlocksError, match="need 3 KV blocks, 2 available"):
        pool.allocate(3)
    assert pool.num_available == 2
    pool.release(held)
    pool.assert_idle()


def test_commit_match_pin_release() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(100, 112))
    ids, keys = cached_chain(pool, tokens)
    assert pool.num_cached == 3
    assert pool.num_available == 8  # evictable blocks count as available
    assert pool.match_prefix(keys, blocks_of(tokens)) == ids
    pool.pin(ids[:2])
    assert [pool.ref_counts[b] for b in ids] == [1, 1, 0]
    assert pool.num_available == 6
    pool.pin(ids[:1])  # a second holder
    assert pool.ref_counts[ids[0]] == 2
    pool.check_invariants()
    pool.release(ids[:1])
    pool.release(ids[:2])
    pool.assert_idle()
    assert pool.num_cached == 3


def test_match_stops_at_the_first_miss() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(12))
    ids, _ = cached_chain(pool, tokens)
    other = [*tokens[:4], 99, *tokens[5:]]  # second block differs, so the chain diverges there
    assert pool.match_prefix(chain_keys(ROOT, other, BS), blocks_of(other)) == ids[:1]
    salted = chain_keys(root_key("test-model", LAYOUT, "tenant"), tokens, BS)
    assert pool.match_prefix(salted, blocks_of(tokens)) == []


def test_forged_key_with_other_tokens_is_a_miss() -> None:
    """A key -> block mapping whose stored tokens differ (a digest collision, or a forged key)
    must never serve that block."""
    pool = BlockPool(4, BS)
    tokens = [1, 2, 3, 4]
    key = chain_keys(ROOT, tokens, BS)[0]
    (b,) = pool.allocate(1)
    assert pool.commit(b, key, [9, 9, 9, 9])  # the key, but other tokens
    pool.release([b])
    assert pool.contains(key)
    assert pool.match_prefix([key], [tokens]) == []
    assert pool.match_prefix([key], [[9, 9, 9, 9]]) == [b]


def test_duplicate_key_stays_with_the_first_block() -> None:
    pool = BlockPool(4, BS)
    tokens = [5, 6, 7, 8]
    key = chain_keys(ROOT, tokens, BS)[0]
    a, b = pool.allocate(2)
    assert pool.commit(a, key, tokens)
    assert not pool.commit(b, key, tokens)
    pool.release([b])  # the private copy is freed, not cached
    assert pool.num_cached == 1 and pool.key_of(b) is None
    pool.release([a])
    assert pool.match_prefix([key], [tokens]) == [a]
    pool.assert_idle()


def test_pin_of_a_block_that_is_neither_cached_nor_in_use_fails() -> None:
    pool = BlockPool(4, BS)
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(RuntimeError, match="neither cached nor in use"):
        pool.pin([b])


def test_caching_disabled_never_matches() -> None:
    pool = BlockPool(4, BS, enable_caching=False)
    tokens = [1, 2, 3, 4]
    key = chain_keys(ROOT, tokens, BS)[0]
    (b,) = pool.allocate(1)
    assert not pool.commit(b, key, tokens)
    pool.release([b])
    assert pool.match_prefix([key], [tokens]) == []
    assert pool.num_cached == 0


def test_lru_eviction_order_and_on_evict() -> None:
    pool = BlockPool(4, BS, policy="lru")
    evicted: list[tuple[int, BlockKey, tuple[int, ...]]] = []
    pool.on_evict = lambda b, key, toks: evicted.append((b, key, toks))
    chains = [[10 * i + j for j in range(BS)] for i in range(4)]
    keys = [chain_keys(ROOT, t, BS)[0] for t in chains]
    ids = pool.allocate(4)
    for b, key, toks in zip(ids, keys, chains, strict=True):
        pool.commit(b, key, toks)
    for b in ids:  # released oldest first: ids[0] is least recently used
        pool.release([b])
    assert pool.allocate(1) == [ids[0]]
    assert evicted == [(ids[0], keys[0], tuple(chains[0]))]
    assert not pool.contains(keys[0])
    assert pool.match_prefix([keys[0]], [chains[0]]) == []
    # A hit refreshes recency: ids[1] is used again, so ids[2] goes next, then ids[3], then ids[1].
    pool.pin([ids[1]])
    pool.release([ids[1]])
    assert pool.allocate(3) == [ids[2], ids[3], ids[1]]
    assert [e[0] for e in evicted] == [ids[0], ids[2], ids[3], ids[1]]
    assert pool.evictions == 4
    pool.check_invariants()


def test_evict_all_hands_every_cached_block_to_on_evict_and_frees_it() -> None:
    pool = BlockPool(4, BS, policy="lru")
    evicted: list[int] = []
    pool.on_evict = lambda b, key, toks: evicted.append(b)
    chains = [[10 * i + j for j in range(BS)] for i in range(3)]
    ids = pool.allocate(3)
    for b, toks in zip(ids, chains, strict=True):
        pool.commit(b, chain_keys(ROOT, toks, BS)[0], toks)
    pool.release(ids[:2])  # ids[2] is still in use: it stays
    assert pool.evict_all() == 2
    assert sorted(evicted) == sorted(ids[:2]) and pool.evictions == 2
    assert pool.num_available == 3 and pool.cached(ids[2]) is not None
    pool.check_invariants()


def test_release_puts_a_requests_tail_before_its_head() -> None:
    """One release call frees last-first: the head (the part others share) is evicted last."""
    pool = BlockPool(3, BS, policy="lru")
    ids, _ = cached_chain(pool, list(range(12)))
    assert pool.allocate(3) == ids[::-1]


def test_double_free_is_caught() -> None:
    pool = BlockPool(4, BS)
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(RuntimeError, match="ref count 0"):
        pool.release([b])
    pool.check_invariants()  # the refused release changed nothing
    pool._free.append(b)  # forge a double free past release's own check
    with pytest.raises(AssertionError, match="twice"):
        pool.check_invariants()


def test_check_invariants_catches_a_block_free_and_in_use() -> None:
    pool = BlockPool(4, BS)
    (b,) = pool.allocate(1)
    pool.check_invariants()
    pool._free.append(b)  # in use and in the free queue at once
    with pytest.raises(AssertionError, match=f"block {b} states"):
        pool.check_invariants()


def test_assert_idle_catches_a_held_block() -> None:
    pool = BlockPool(4, BS)
    pool.allocate(1)
    with pytest.raises(AssertionError, match="still referenced"):
        pool.assert_idle()


def test_reset_cache_frees_every_evictable_block() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(16))
    ids, keys = cached_chain(pool, tokens)
    pool.pin(ids[:1])  # in use: stays cached
    assert pool.reset_cache() == 3
    assert pool.num_cached == 1
    assert pool.match_prefix(keys, blocks_of(tokens)) == ids[:1]
    pool.release(ids[:1])
    pool.assert_idle()


# -- Scheduler ----------------------------------------------------------------------------------


@dataclass
class Trace:
    steps: list[list[ScheduledChunk]] = field(default_factory=list)
    # Per step, per chunk: (request id, tokens, is a decode, samples a token).
    sizes: list[list[tuple[str, int, bool, bool]]] = field(default_factory=list)
    finished: dict[str, Request] = field(default_factory=dict)
    failed: list[Request] = field(default_factory=list)


def make_scheduler(
    num_blocks: int, budget: int, chunked: bool = True, max_seqs: int = 64, max_len: int = 4096
) -> Scheduler:
    pool = BlockPool(num_blocks, BS)
    limits = SchedulerLimits(budget, max_seqs, max_len, chunked)
    return Scheduler(pool, limits, lambda salt: root_key("test-model", LAYOUT, salt))


def check_ref_counts(sched: Scheduler) -> None:
    holders = Counter(b for r in sched.running + sched.loading for b in r.block_table)
    assert sched.pool.ref_counts == [holders[b] for b in range(sched.pool.num_blocks)]
    sched.pool.check_invariants()


def advance(
    sched: Scheduler, chunks: list[ScheduledChunk], token: Callable[[Request], int] = lambda r: 1
) -> list[Request]:
    """What Engine._postprocess does, without a model: count the computed tokens, commit full
    blocks, append ``token(r)`` where a chunk samples, finish at max_tokens. Returns the finished."""
    finished = []
    for c in chunks:
        r, samples = c.request, c.samples  # before the count moves: samples reads it
        r.num_computed_tokens += c.num_new_tokens
        sched.commit_computed_blocks(r)
        if samples:
            r.output_token_ids.append(token(r))
            if len(r.output_token_ids) >= r.params.max_tokens:
                sched.finish(r, FinishReason.LENGTH)
                finished.append(r)
    return finished


def drive(sched: Scheduler, requests: list[Request], max_steps: int = 5000) -> Trace:
    """Engine.step without a model: the sampled token is a function of the position."""
    for r in requests:
        sched.add(r)
    trace = Trace()
    for _ in range(max_steps):
        if not sched.has_work():
            break
        out = sched.schedule()
        check_ref_counts(sched)
        trace.failed += out.failed
        sizes = []
        for c in out.chunks:
            r = c.request
            assert r.state is RequestState.RUNNING
            assert 1 <= c.num_new_tokens <= r.num_tokens - r.num_computed_tokens
            assert len(r.block_table) * BS >= r.num_computed_tokens + c.num_new_tokens
            sizes.append((r.request_id, c.num_new_tokens, c.num_new_tokens == 1 and c.samples, c.samples))
        trace.steps.append(out.chunks)
        trace.sizes.append(sizes)
        for r in advance(sched, out.chunks, lambda r: (r.num_tokens * 7) % 300):
            trace.finished[r.request_id] = r
        check_ref_counts(sched)
    assert not sched.has_work(), "the scheduler did not drain"
    sched.pool.assert_idle()
    return trace


def workload(seed: int, count: int = 12) -> list[Request]:
    rng = random.Random(seed)
    shared = [rng.randrange(300) for _ in range(24)]
    reqs = []
    for i in range(count):
        prefix = shared[: rng.choice([0, 8, 13, 24])]
        prompt = prefix + [rng.randrange(300) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0)
        reqs.append(Request(f"r{i}", prompt, params))
    return reqs


def assert_decodes_first(sizes: list[tuple[str, int, bool, bool]]) -> None:
    kinds = [decode for _, _, decode, _ in sizes]
    assert kinds == sorted(kinds, reverse=True), f"a prefill before a decode: {sizes}"
    ids = [rid for rid, *_ in sizes]
    assert len(ids) == len(set(ids)), f"a request twice in one step: {sizes}"


@pytest.mark.parametrize("budget", [1, 5, 16, 24])
@pytest.mark.parametrize("num_blocks", [20, 200])
def test_chunked_steps_never_exceed_the_budget(budget: int, num_blocks: int) -> None:
    sched = make_scheduler(num_blocks, budget)
    reqs = workload(seed=budget * 1000 + num_blocks)
    trace = drive(sched, reqs)
    assert sorted(trace.finished) == sorted(r.request_id for r in reqs)
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in reqs)
    assert not trace.failed
    for sizes in trace.sizes:
        assert 0 < sum(n for _, n, _, _ in sizes) <= budget
        assert_decodes_first(sizes)
    if budget > 1:
        mixed = [s for s in trace.sizes if any(c[2] for c in s) and not all(c[2] for c in s)]
        assert mixed, "the workload never mixed decodes and prefills in one step"
    if num_blocks == 20 and budget > 1:  # (a budget of 1 runs one request at a time)
        assert sched.num_preemptions > 0


def test_running_decodes_are_scheduled_every_step() -> None:
    """With room for everyone, a request that is decoding gets its token in every step."""
    sched = make_scheduler(500, budget=16, max_seqs=8)
    for r in workload(seed=7):
        sched.add(r)
    steps = 0
    while sched.has_work():
        decoding = {r.request_id for r in sched.running if r.num_computed_tokens == r.num_tokens - 1}
        out = sched.schedule()
        assert not out.preempted
        scheduled = {c.request.request_id for c in out.chunks}
        assert decoding <= scheduled
        advance(sched, out.chunks)
        steps += 1
        assert steps < 1000
    sched.pool.assert_idle()


def test_whole_prefill_serves_every_request() -> None:
    """Chunking off with prompts longer than the budget: each long prompt gets a step of its own
    (the only case a step may exceed the budget), and no request is dropped."""
    budget = 16
    sched = make_scheduler(200, budget, chunked=False)
    reqs = workload(seed=3)
    trace = drive(sched, reqs)
    assert sorted(trace.finished) == sorted(r.request_id for r in reqs)
    assert any(sum(n for _, n, _, _ in s) > budget for s in trace.sizes)
    for sizes in trace.sizes:
        assert_decodes_first(sizes)
        if sum(n for _, n, _, _ in sizes) > budget:
            assert len(sizes) == 1
        assert all(samples for *_, samples in sizes), f"a partial prefill without chunking: {sizes}"


def test_siblings_wait_for_the_first_prefill_then_share_its_blocks() -> None:
    sched = make_scheduler(50, budget=8)
    prompt = list(range(1, 21))  # 20 tokens: 3 steps of 8
    params = SamplingParams(max_tokens=3, temperature=0.5, n=2)
    first = Request("a#0", prompt, params)
    sibling = Request("a#1", prompt, params, wait_for=first)
    sched.add(first)
    sched.add(sibling)
    shared_seen = False
    for _ in range(100):
        if not sched.has_work():
            break
        out = sched.schedule()
        if sibling.state is RequestState.RUNNING and not shared_seen:
            assert first.num_computed_tokens >= len(prompt)  # admitted only after the prefill
            assert sibling.num_cached_tokens == 16  # every full block but the last token's
            assert sibling.block_table[:4] == first.block_table[:4]
            assert all(sched.pool.ref_counts[b] == 2 for b in first.block_table[:4])
            shared_seen = True
        advance(sched, out.chunks)
        check_ref_counts(sched)
    assert shared_seen
    assert not sched.has_work()
    sched.pool.assert_idle()


def test_a_request_that_outgrows_the_pool_fails_with_length() -> None:
    sched = make_scheduler(4, budget=16)  # 16 tokens of KV
    big = Request("big", list(range(10)), SamplingParams(max_tokens=50))
    small = Request("small", list(range(50, 55)), SamplingParams(max_tokens=3))
    trace = drive(sched, [big, small])
    assert [r.request_id for r in trace.failed] == ["big"]
    assert big.finish_reason is FinishReason.LENGTH
    assert big.error and "KV pool" in big.error
    assert len(big.output_token_ids) == 16 - 10 + 1
    assert small.finish_reason is FinishReason.LENGTH and len(small.output_token_ids) == 3


def test_check_fits_names_the_limits() -> None:
    sched = make_scheduler(4, budget=16, max_len=32)
    sched.check_fits(15)
    for n, words in ((0, "empty"), (32, "32 tokens"), (16, "5 KV blocks")):
        with pytest.raises(ValueError, match=words):
            sched.check_fits(n)
