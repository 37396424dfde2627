"""Every Triton kernel against its torch reference, on random shapes.

On a CUDA machine the kernels run on the GPU. Without one they run in Triton's interpreter when
triton is installed (``TRITON_INTERPRET=1`` is set here before triton is imported, so CI checks the
kernels' logic on the CPU); without triton the file is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter runs each program in numpy: keep the CPU shapes small.
SMALL = DEVICE.type == "cpu"


def _interpreter_numpy2_fix() -> None:
    """Triton 3.6's interpreter turns a scalar (kept as a 1-element array) into a loop bound with
    ``int(array)``, which NumPy >= 2.? refuses for 1-d arrays: read the element instead."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


if SMALL and importlib.util.find_spec("triton") is not None:
    _interpreter_numpy2_fix()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def random_pool(
    rng: random.Random, lens: list[int], page: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool whose blocks are handed out to rows in shuffled order, and the rows' block tables."""
    need = [-(-n // page) for n in lens]
    num_blocks = sum(need) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    width = max(need) + 2  # padded tables, wider than any row needs
    table = torch.zeros((len(lens), width), dtype=torch.int32)
    at = 0
    for r, n in enumerate(need):
        table[r, :n] = torch.tensor(ids[at : at + n], dtype=torch.int32)
        at += n
    pool = torch.randn(
        (2, num_blocks, page, kv_heads, dim), generator=torch.Generator().manual_seed(rng.randrange(1 << 30))
    )
    return pool.to(dtype).to(DEVICE), table.to(DEVICE)


def reference_decode(
    q: torch.Tensor,
    pool: torch.Tensor,
    table: torch.Tensor,
    lens: list[int],
    scale: float,
    window: int | None,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64 attention of each row's single query over its gathered context."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    page = pool.shape[2]
    group = q.shape[1] // pool.shape[3]
    for r, n in enumerate(lens):
        blocks = table[r, : -(-n // page)].long().cpu()
        kv = pool.cpu()[:, blocks].double().flatten(1, 2)[:, :n]  # [2, n, Hkv, D]
        if kv_scales is not None:
            kv = kv * kv_scales.cpu().double()[:, None, :, None]
        lo = max(0, n - window) if window else 0
        k = kv[0, lo:].repeat_interleave(group, dim=1)  # [n, H, D]
        v = kv[1, lo:].repeat_interleave(group, dim=1)
        if n == 0:
            continue
        s = torch.einsum("hd,nhd->hn", q[r].cpu().double(), k) * scale
        out[r] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


CASES = [
    # rows, heads, kv_heads, dim, page, max_len, window, dtype
    (1, 4, 2, 16, 4, 30, None, torch.float32),  # one row: one-element length and slot tensors
    (3, 4, 2, 16, 4, 40, None, torch.float32),
    (4, 8, 1, 32, 8, 70, 9, torch.float32),
    (2, 6, 6, 24, 16, 50, None, torch.float16),
    (5, 8, 2, 64, 16, 300, None, torch.bfloat16),
]
if not SMALL:
    CASES += [
        (7, 32, 8, 128, 16, 3000, None, torch.bfloat16),
        (64, 32, 8, 64, 16, 1100, None, torch.bfloat16),
        (9, 28, 4, 128, 32, 2000, 700, torch.float16),
        (3, 16, 2, 80, 16, 500, None, torch.bfloat16),
        (2, 64, 8, 256, 16, 1500, None, torch.bfloat16),
    ]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_paged_decode_matches_reference(case: tuple) -> None:
    from kvtier.model.kernels.paged_decode import choose_splits, paged_decode

    rows, heads, kv_heads, dim, page, max_len, window, dtype = case
    if SMALL and dtype == torch.bfloat16:
        pytest.skip("the interpreter computes bfloat16 wrongly (numpy has no bfloat16)")
    rng = random.Random(hash(case) & 0xFFFF)
    lens = [rng.randint(1, max_len) for _ in range(rows)]
    lens[0] = max_len  # one full row, and a row of length 1 when there are several
    if rows > 1:
        lens[1] = 1
    pool, table = random_pool(rng, lens, page, kv_heads, dim, dtype)
    q = torch.randn((rows, heads, dim)).to(dtype).to(DEVICE)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = dim**-0.5
    ref = reference_decode(q, pool, table, lens, scale, window)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for splits in sorted({1, 4, choose_splits(rows, kv_heads, max_len, 64, DEVICE)}):
        out = torch.full_like(q, float("nan"))  # every element must be written
        paged_decode(q, pool, table, ctx, scale, window, splits, out=out)
        assert not out.isnan().any(), f"unwritten output with {splits} splits"
        assert rel_err(out.cpu(), ref) < tol, f"{splits} splits: error {rel_err(out.cpu(), ref)}"


def test_paged_decode_zero_length_rows_give_zeros() -> None:
    """Padding rows of a CUDA-graph batch have length 0: zeros, never NaN."""
    from kvtier.model.kernels.paged_decode import paged_decode

    rng = random.Random(3)
    pool, table = random_pool(rng, [20, 1], 4, 2, 16, torch.float32)
    q = torch.randn((2, 4, 16), device=DEVICE)
    ctx = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    for splits in (1, 4):
        out = paged_decode(q, pool, table, ctx, 0.25, None, splits)
        assert out[1].abs().max().item() == 0.0
        ref = reference_decode(q, pool, table, [20], 0.25, None)
        assert rel_err(out[:1].cpu(), ref[:1]) < 2e-5


def test_paged_decode_rejects_bad_arguments() -> None:
    from kvtier.model.kernels.paged_decode import paged_decode

    pool, table = random_pool(random.Random(0), [8], 4, 3, 16, torch.float32)
    q = torch.randn((1, 4, 16), device=DEVICE)
    ctx = torch.tensor([8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple of 3 KV heads"):
        paged_decode(q, pool, table, ctx, 0.25, None, 1)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode(torch.randn((1, 6, 16), device=DEVICE), pool, table, ctx, 0.25, None, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_matches_index_copy_and_skips_padding(dtype: torch.dtype) -> None:
    if SMALL and dtype == torch.bfloat16:
        pytest.skip("the interpreter computes bfloat16 wrongly (numpy has no bfloat16)")
    from kvtier.model.attention import write_kv as reference_write
    from kvtier.model.kernels.paged_decode import write_kv

    pool = torch.randn((2, 6, 4, 3, 24)).to(dtype).to(DEVICE)
    expect = pool.clone()
    qkv = torch.randn((5, 9, 24)).to(dtype).to(DEVICE)  # k and v as strided views of a wider tensor
    k, v = qkv[:, 2:5], qkv[:, 5:8]
    slots = torch.tensor([3, 17, -1, 0, 23], device=DEVICE)
    keep = slots >= 0
    reference_write(expect, k[keep], v[keep], slots[keep])
    write_kv(pool, k, v, slots)
    assert torch.equal(pool, expect)
    write_kv(pool, k[:1], v[:1], slots[:1])  # a single token (a batch-1 decode step)
    assert torch.equal(pool, expect)


def test_fp8_write_and_decode_match_the_dequantized_reference() -> None:
    from kvtier.model.kernels.paged_decode import paged_decode, write_kv

    if DEVICE.type == "cpu":
        pytest.skip("fp8 needs the GPU (numpy has no e4m3)")
    rng = random.Random(5)
    lens = [rng.randint(1, 600) for _ in range(6)]
    page, kv_heads, dim, heads = 16, 4, 128, 16
    src, table = random_pool(rng, lens, page, kv_heads, dim, torch.bfloat16)
    scales = torch.tensor([[0.5, 1.0, 2.0, 0.25], [1.0, 0.125, 4.0, 0.5]], device=DEVICE)
    src = src * scales[:, None, None, :, None].to(src.dtype)
    pool = torch.empty(src.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    flat = src.flatten(1, 2)  # [2, slots, Hkv, D]
    write_kv(pool, flat[0], flat[1], torch.arange(flat.shape[1], device=DEVICE), scales)
    expect = (src.float() / scales[:, None, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(pool.view(torch.uint8), expect.view(torch.uint8))
    q = torch.randn((6, heads, dim), device=DEVICE, dtype=torch.bfloat16)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    ref = reference_decode(q, pool.float(), table, lens, dim**-0.5, None, scales)
    for splits in (1, 8):
        out = paged_decode(q, pool, table, ctx, dim**-0.5, None, splits, kv_scales=scales)
        assert rel_err(out.cpu(), ref) < 1e-2


ELEMENTWISE_DTYPES = [torch.float32, torch.float16] + ([] if SMALL else [torch.bfloat16])


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_add_rmsnorm_matches_the_reference_module(dtype: torch.dtype) -> None:
    from kvtier.model.kernels.elementwise import add_rmsnorm
    from kvtier.model.layers import RMSNorm

    for n in (64, 200) if SMALL else (64, 2048, 4096, 5120):
        norm = RMSNorm(n, 1e-5).to(dtype).to(DEVICE)
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
        x = torch.randn((7, n)).to(dtype).to(DEVICE)
        res = torch.randn((7, n)).to(dtype).to(DEVICE)
        expect_res = x + res
        with torch.no_grad():
            expect = norm(expect_res)
            got = add_rmsnorm(x, res, norm.weight, 1e-5)
            assert torch.equal(res, expect_res)
            assert rel_err(got, expect) < (1e-6 if dtype == torch.float32 else 1e-3)
            assert rel_err(add_rmsnorm(x, None, norm.weight, 1e-5), norm(x)) < (
                1e-6 if dtype == torch.float32 else 1e-3
            )


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_rotary_in_place_matches_apply_rotary(dtype: torch.dtype) -> None:
    from transformers import LlamaConfig

    from kvtier.model.kernels.elementwise import rotary_
    from kvtier.model.layers import RotaryEmbedding, apply_rotary

    dim = 32 if SMALL else 128
    rope = RotaryEmbedding(LlamaConfig(head_dim=dim, rope_theta=10000.0), dim).to(DEVICE)
    cos, sin = rope.table(64, dtype)
    positions = torch.tensor([0, 5, 63, 17, 2], device=DEVICE)
    qkv = torch.randn((5, 7, dim)).to(dtype).to(DEVICE)  # q: heads 0..3, k: 4..5, v: 6
    c, s = rope(positions, dtype)
    expect_q, expect_k = apply_rotary(qkv[:, :4], c, s), apply_rotary(qkv[:, 4:6], c, s)
    v = qkv[:, 6].clone()
    rotary_(qkv[:, :4], positions, cos, sin)
    rotary_(qkv[:, 4:6], positions, cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(qkv[:, :4], expect_q) < tol and rel_err(qkv[:, 4:6], expect_k) < tol
    assert torch.equal(qkv[:, 6], v)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    from kvtier.model.kernels.elementwise import silu_mul

    n = 300 if SMALL else 8192
    gu = (torch.randn((3, 2 * n)) * 3).to(dtype).to(DEVICE)
    expect = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
    assert rel_err(silu_mul(gu), expect) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_rotary_write_kv_matches_rotary_then_write(dtype: torch.dtype) -> None:
    from transformers import LlamaConfig

    from kvtier.model.attention import write_kv as reference_write
    from kvtier.model.kernels.elementwise import rotary_
    from kvtier.model.kernels.paged_decode import rotary_write_kv
    from kvtier.model.layers import RotaryEmbedding

    dim, heads, kv_heads = (32, 6, 2) if SMALL else (128, 32, 8)
    rope = RotaryEmbedding(LlamaConfig(head_dim=dim, rope_theta=10000.0), dim).to(DEVICE)
    cos, sin = rope.table(64, dtype)
    positions = torch.tensor([3, 0, 63, 17, 9], device=DEVICE)
    slots = torch.tensor([5, -1, 0, 30, 12], device=DEVICE)
    qkv = torch.randn((5, heads + 2 * kv_heads, dim)).to(dtype).to(DEVICE)
    pool = torch.randn((2, 4, 8, kv_heads, dim)).to(dtype).to(DEVICE)
    expect_qkv, expect_pool = qkv.clone(), pool.clone()
    rotary_(expect_qkv[:, :heads], positions, cos, sin)
    rotary_(expect_qkv[:, heads : heads + kv_heads], positions, cos, sin)
    keep = slots >= 0
    k, v = expect_qkv[:, heads : heads + kv_heads], expect_qkv[:, heads + kv_heads :]
    reference_write(expect_pool, k[keep], v[keep], slots[keep])
    rotary_write_kv(qkv, heads, positions, cos, sin, pool, slots)
    # the same roundings as rotary_; the GPU compiler may still order a product and a sum
    # differently between the two kernels, so allow one unit in the last place
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(qkv[:, :heads], expect_qkv[:, :heads], **tol)
    torch.testing.assert_close(pool, expect_pool, **tol)
