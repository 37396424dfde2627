"""The small-M projection kernel (``kernels/gemv.py``) against ``F.linear``, its dispatch, its setting,
and the decoder with it on against it off.

On a CUDA machine the kernel runs on the GPU; without one in Triton's interpreter (small shapes,
``TRITON_INTERPRET=1`` set before triton is imported); without triton the file is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import random
from typing import Any

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

if not CUDA and importlib.util.find_spec("triton") is not None:
    from tests.test_kernels import _interpreter_numpy2_fix

    _interpreter_numpy2_fix()

# per dtype: the kernel's error against a float64 product, as a multiple of F.linear's own
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    bias: bool,
    config: Any = None,
    seed: int = 0,
) -> None:
    from kvtier.model.kernels.gemv import gemv

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    y = gemv(x, w, b, config)
    assert y.shape == (m, n) and y.dtype == dtype
    err = rel_err(y, exact)
    assert err < TOL[dtype], f"M={m} N={n} K={k} {dtype} bias={bias} {config}: rel err {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_shapes_equal_f_linear(dtype: torch.dtype) -> None:
    """M 1..16, N and K not multiples of any block, with and without bias, the auto config."""
    rng = random.Random(str(dtype))
    for i in range(6):
        m = rng.choice([1, 2, 3, 5, 8, 11, 16]) if i else 1
        n, k = rng.randrange(1, 90), rng.randrange(1, 300)
        check(m, n, k, dtype, bias=i % 2 == 0, seed=i)


@pytest.mark.parametrize(
    "config",
    [
        dict(block_n=8, block_k=64, split_k=4),  # split-K: the last program of a tile sums the splits
        dict(block_n=4, block_k=32, split_k=3),  # a split count that does not divide K's blocks
        dict(block_n=16, block_k=32, split_k=2, dot=True),  # tl.dot on M padded to 16
        dict(block_n=16, block_k=64, split_k=1, dot=True),
        dict(block_n=2, block_k=128, split_k=1, num_warps=2),
    ],
)
def test_explicit_configs_equal_f_linear(config: dict[str, Any]) -> None:
    from kvtier.model.kernels.gemv import GemvConfig

    cfg = GemvConfig(**config)
    for i, (m, n, k) in enumerate([(1, 37, 300), (6, 50, 257), (16, 19, 130)]):
        check(m, n, k, torch.float32, bias=i != 1, config=cfg, seed=i)


def test_split_k_counters_are_reset_for_the_next_call() -> None:
    """The per-tile arrival counters are shared by every call: a call that left one non-zero
    would make the next call's tile finish early (or never) and give a wrong row."""
    from kvtier.model.kernels.gemv import GemvConfig

    cfg = GemvConfig(block_n=8, block_k=32, split_k=4)
    for seed in range(3):
        check(2, 40, 256, torch.float32, bias=True, config=cfg, seed=seed)


def test_leading_dims_strides_and_empty_batches() -> None:
    from kvtier.model.kernels.gemv import gemv

    x = torch.randn(2, 3, 40, device=DEVICE)
    w = torch.randn(24, 80, device=DEVICE)[:, ::2]  # a strided weight is made contiguous
    assert torch.allclose(gemv(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert gemv(x[:0], w).shape == (0, 3, 24)
    with pytest.raises(ValueError, match="x has 40 features, w is"):
        gemv(x, torch.randn(5, 41, device=DEVICE))


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 4, 16])
def test_model_sized_shapes(m: int) -> None:
    """A 1B-sized projection (K 2048) with its auto config: split-K and many tiles."""
    from kvtier.model.kernels.gemv import choose_config, num_sms

    n, k = (3072, 2048) if CUDA else (200, 2048)
    cfg = choose_config(m, n, k, num_sms(0))
    check(m, n, k, torch.bfloat16, bias=False, config=cfg)


def test_choose_config_spreads_small_projections_over_the_sms() -> None:
    """The 1B's projections get at least 4 programs per SM of an H200 (132 SMs) at M = 1."""
    import triton

    from kvtier.model.kernels.gemv import choose_config

    for n, k in [
        (3072, 2048),
        (2048, 2048),
        (16384, 2048),
        (2048, 8192),
        (128256, 2048),
    ]:
        cfg = choose_config(1, n, k, 132)
        programs = triton.cdiv(n, cfg.block_n) * cfg.split_k
        assert programs >= 4 * 132 or k // (2 * cfg.split_k) < cfg.block_k, (n, k, cfg)
    assert choose_config(4, 2048, 2048, 132).dot and not choose_config(2, 2048, 2048, 132).dot


def test_measured_table_configs_compute_f_linear() -> None:
    """Every config of the measured table (``TUNED``) at its own M and K (N cut to 40 rows here:
    the interpreter is slow; the H200 run checked the full shapes)."""
    from kvtier.model.kernels.gemv import TUNED, tuned_config

    for i, (m, n, k) in enumerate(TUNED):
        cfg = tuned_config(m, n, k)
        assert cfg is not None and (not cfg.dot or cfg.block_n >= 16)
        check(m, min(n, 40), k, torch.bfloat16, bias=i % 2 == 0, config=cfg, seed=i)


# -- dispatch and setting ----------------------------------------------------------------------------
def test_linear_dispatch_uses_the_kernel_only_up_to_the_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kvtier.model.kernels import gemv as mod

    calls: list[int] = []
    real = mod.gemv
    monkeypatch.setattr(
        mod,
        "gemv",
        lambda x, w, b=None, config=None: calls.append(x.shape[0]) or real(x, w, b, config),
    )
    w, b = torch.randn(30, 20, device=DEVICE), torch.randn(30, device=DEVICE)
    for m in (1, 4, 5):
        x = torch.randn(m, 20, device=DEVICE)
        assert torch.allclose(mod.linear(x, w, b, 4), F.linear(x, w, b), atol=1e-5)
        assert torch.equal(mod.linear(x, w, b, 0), F.linear(x, w, b))
    assert calls == [1, 4]  # 5 rows > 4, and max_m 0 never
    x2 = torch.randn(2, 20, device=DEVICE)
    mod.linear(x2, w, b, 8, auto=True)
    assert calls == [1, 4], "auto: only shapes in the measured table (none of this size)"
    monkeypatch.setitem(mod.TUNED, (2, 30, 20), (8, 16, 2, 4, 1, False))
    assert torch.allclose(mod.linear(x2, w, b, 8, auto=True), F.linear(x2, w, b), atol=1e-5)
    assert calls == [1, 4, 2], "with the measured config (split-K over 16-long K blocks)"
    x1 = torch.randn(1, 20, device=DEVICE)
    assert torch.allclose(mod.linear(x1, w, None, 8, auto=True), F.linear(x1, w), atol=1e-5)
    assert calls == [1, 4, 2, 1], "auto: any shape at M = 1 (AUTO_ALL_ROWS)"


def test_resolve_modes() -> None:
    from kvtier.model.kernels.gemv import resolve

    assert resolve("off", DEVICE, 8) == (0, False)
    assert resolve("on", DEVICE, 8) == (8, False)  # CUDA, or the interpreter here
    assert resolve("auto", DEVICE, 8) == ((8, True) if CUDA else (0, False))
    with pytest.raises(ValueError, match="decode_gemv must be one of auto, on, off, got 'fast'"):
        resolve("fast", DEVICE, 8)


def test_setting_is_validated_by_name_and_range() -> None:
    from kvtier.config import ConfigError, EngineConfig

    cfg = EngineConfig.load({"decode_gemv": "on", "decode_gemv_max_m": 16}, env={})
    assert (cfg.model.decode_gemv, cfg.model.decode_gemv_max_m) == ("on", 16)
    with pytest.raises(ConfigError, match="decode_gemv must be one of auto, on, off"):
        EngineConfig.load({"decode_gemv": "yes"}, env={})
    with pytest.raises(ConfigError, match=r"decode_gemv_max_m must be in \[0, 64\], got 65"):
        EngineConfig.load({"decode_gemv_max_m": 65}, env={})


def test_gemv_bench_part_shapes_and_cpu_skip(tmp_path: Any) -> None:
    import json

    from typer.testing import CliRunner

    from kvtier.bench.gpu_timing import projection_shapes
    from kvtier.cli import app

    assert projection_shapes("synthetic:llama-3.2-1b") == [
        ("qkv", 3072, 2048, 16),
        ("o", 2048, 2048, 16),
        ("gate_up", 16384, 2048, 16),
        ("down", 2048, 8192, 16),
        ("lm_head", 128256, 2048, 1),
    ]
    assert projection_shapes("synthetic:llama-3.1-8b")[0] == ("qkv", 6144, 4096, 32)
    out = tmp_path / "g.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "gpu-decode",
            "--device",
            "cpu",
            "--parts",
            "gemv",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["gemv_skipped"] == "needs CUDA"


# -- the decoder with the kernel on and off ----------------------------------------------------------
def test_decoder_with_gemv_equals_without(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32, the fused path, 3 sequences (decode steps of 3 rows, prefill chunks of more):
    the same greedy tokens and logits within 1e-4 with every small projection on the kernel."""
    from kvtier import LLM, SamplingParams
    from kvtier.model.kernels import gemv as mod
    from tests.models import make_hf_model, random_prompt, save_model

    folder = save_model(make_hf_model("llama", seed=3), tmp_path / "m")
    llm = LLM(
        folder,
        device=str(DEVICE),
        dtype="float32",
        attention_backend="triton",
        kv_cache_memory=16 << 20,
        block_size=8,
        tiers="none",
        cuda_graph_max_batch=0,  # eager: switching the kernel after start takes effect
        result_cache=False,
    )
    model = llm.engine.model
    prompts = [random_prompt(4 + 7 * i, seed=i) for i in range(3)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, return_logits=True)
    model.use_fused_kernels(gemv="off")
    off = [o.outputs[0] for o in llm.generate(prompts, params)]
    rows: list[int] = []
    real = mod.gemv
    monkeypatch.setattr(
        mod,
        "gemv",
        lambda x, w, b=None, config=None: rows.append(x.shape[0]) or real(x, w, b),
    )
    model.use_fused_kernels(gemv="on", gemv_max_m=16)
    assert model.gemv == (16, False)
    on = [o.outputs[0] for o in llm.generate(prompts, params)]
    assert rows and max(rows) <= 16  # the kernel ran, only on small batches
    for a, b in zip(off, on, strict=True):
        assert a.token_ids == b.token_ids
        assert (a.logits - b.logits).abs().max().item() < 1e-4
