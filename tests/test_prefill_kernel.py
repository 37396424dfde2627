"""The paged prefill / extend kernel against a float64 reference, on random ragged batches.

Runs on the GPU, or in Triton's interpreter without one (see tests/test_kernels.py).
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from tests.test_kernels import DEVICE, SMALL, random_pool, rel_err

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def reference_prefill(
    q: torch.Tensor,
    pool: torch.Tensor,
    table: torch.Tensor,
    qlens: list[int],
    ctx: list[int],
    scale: float,
    window: int | None,
) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    page, group = pool.shape[2], q.shape[1] // pool.shape[3]
    at = 0
    for r, (n, c) in enumerate(zip(qlens, ctx, strict=True)):
        blocks = table[r, : -(-c // page)].long().cpu()
        kv = pool.cpu()[:, blocks].double().flatten(1, 2)[:, :c]
        k, v = kv[0].repeat_interleave(group, 1), kv[1].repeat_interleave(group, 1)  # [c, H, D]
        qq = q[at : at + n].cpu().double()
        s = torch.einsum("thd,khd->htk", qq, k) * scale
        qpos = torch.arange(c - n, c)[:, None]
        kpos = torch.arange(c)[None, :]
        mask = kpos <= qpos
        if window:
            mask &= kpos > qpos - window
        s = s.masked_fill(~mask[None], float("-inf"))
        out[at : at + n] = torch.einsum("htk,khd->thd", s.softmax(-1), v)
        at += n
    return out


CASES = [
    # rows, heads, kv_heads, dim, page, window, dtype
    (3, 4, 2, 16, 4, None, torch.float32),
    (2, 6, 2, 32, 8, 7, torch.float32),
    (3, 4, 4, 16, 16, None, torch.float16),
]
if not SMALL:
    CASES += [
        (5, 32, 8, 128, 16, None, torch.bfloat16),
        (4, 28, 4, 128, 16, 300, torch.bfloat16),
        (3, 32, 8, 64, 32, None, torch.float16),
    ]


@pytest.mark.parametrize("split", [False, True], ids=["one-span", "split-keys"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_paged_prefill_matches_reference(case: tuple, split: bool) -> None:
    from kvtier.model.kernels.paged_prefill import paged_prefill

    rows, heads, kv_heads, dim, page, window, dtype = case
    rng = random.Random(hash(case) & 0xFFFF)
    big = 40 if SMALL else 700
    qlens = [rng.randint(1, big) for _ in range(rows)]
    cached = [rng.choice([0, rng.randint(1, big)]) for _ in range(rows)]
    ctx = [n + c for n, c in zip(qlens, cached, strict=True)]
    pool, table = random_pool(rng, ctx, page, kv_heads, dim, dtype)
    q = torch.randn((sum(qlens), heads, dim)).to(dtype).to(DEVICE)
    starts = [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    # one decode-like row in front: the kernel must start at first_row
    qsl = torch.tensor([0, *starts], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([1, *ctx], dtype=torch.int32, device=DEVICE)
    tables = torch.cat([table[:1], table])
    out = torch.full_like(q, float("nan"))
    # split: the host says where the rows' tokens are, so a batch of few tiles may split its keys
    where = {"token_span": (0, sum(qlens)), "max_context": max(ctx)} if split else {}
    paged_prefill(q, pool, tables, qsl, lens, 1, rows, max(qlens), dim**-0.5, window, out, **where)
    assert not out.isnan().any()
    ref = reference_prefill(q, pool, table, qlens, ctx, dim**-0.5, window)
    assert rel_err(out.cpu(), ref) < (2e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("window", [None, 50])
def test_a_short_extend_over_a_long_prefix_splits_its_keys(window: int | None) -> None:
    """A few new tokens after a long cached prefix (a follow-up turn): one row, one tile, so the
    keys are split across programs; the merged result equals the reference. Decode rows in front
    (one token each) put the extend's tokens at an offset."""
    from kvtier.model.kernels.paged_prefill import _splits, paged_prefill

    rng = random.Random(7)
    heads, kv_heads, dim, page, dtype = 4, 2, 16, 8, torch.float32
    decodes, qlen, cached = 2, 5, 300 if SMALL else 3000
    ctx = [17, 9, qlen + cached]
    pool, table = random_pool(rng, ctx, page, kv_heads, dim, dtype)
    q = torch.randn((decodes + qlen, heads, dim)).to(dtype).to(DEVICE)
    qsl = torch.tensor([0, 1, 2, 2 + qlen], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    span = (decodes, qlen)
    assert _splits(1, kv_heads, heads, 16, 64, span, ctx[-1], q.device) > 1
    out = torch.full_like(q, float("nan"))
    paged_prefill(
        q, pool, table, qsl, lens, decodes, 1, qlen, dim**-0.5, window, out,
        token_span=span, max_context=ctx[-1],
    )  # fmt: skip
    assert out[:decodes].isnan().all()  # the decode rows' outputs are not the prefill's to write
    ref = reference_prefill(q[decodes:], pool, table[decodes:], [qlen], ctx[decodes:], dim**-0.5, window)
    assert rel_err(out[decodes:].cpu(), ref) < 2e-5


@pytest.mark.parametrize("splits", [1, 2, 8, 64])
def test_every_forced_split_count_gives_the_reference(splits: int) -> None:
    """``num_splits`` fixes the split count (what ``precompile_splits`` compiles ahead): any count
    from one to the most ``choose_splits`` picks, more splits than key tiles included, is exact."""
    from kvtier.model.kernels.paged_prefill import paged_prefill

    rng = random.Random(splits)
    heads, kv_heads, dim, page, dtype = 4, 2, 16, 8, torch.float32
    qlens, ctx = [3, 6], [70, 6]
    pool, table = random_pool(rng, ctx, page, kv_heads, dim, dtype)
    q = torch.randn((sum(qlens), heads, dim)).to(dtype).to(DEVICE)
    qsl = torch.tensor([0, 3, 9], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    paged_prefill(
        q, pool, table, qsl, lens, 0, 2, max(qlens), dim**-0.5, None, out,
        token_span=(0, sum(qlens)), max_context=max(ctx), num_splits=splits,
    )  # fmt: skip
    ref = reference_prefill(q, pool, table, qlens, ctx, dim**-0.5, None)
    assert rel_err(out.cpu(), ref) < 2e-5


def test_precompile_splits_leaves_the_pool_as_it_was() -> None:
    from kvtier.model.kernels.paged_prefill import precompile_splits

    rng = random.Random(3)
    pool, _ = random_pool(rng, [16], 8, 2, 16, torch.float32)
    before = pool.clone()
    precompile_splits(pool, 4, torch.float32)
    assert torch.equal(pool, before)
