"""The fused path (Triton attention, fused projections and element-wise kernels, CUDA graphs) against
the torch reference, end to end through the engine, on tiny random HF checkpoints.

On CUDA: float32 must give the reference's greedy tokens; bfloat16 nearly all of them, with close
logits; graphs must give what eager gives; an fp8 pool stays close. Without CUDA the kernels run in
Triton's interpreter (float32 only), when triton is installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvtier import LLM, SamplingParams
from tests.models import make_hf_model, random_prompt, save_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ARCHS: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama"),
    "mistral-window": dict(arch="mistral", sliding_window=24),
    "qwen2-bias": dict(arch="qwen2"),
    "qwen3-qknorm": dict(arch="qwen3", head_dim=32),
}
NEW_TOKENS = 6 if not CUDA else 24


@pytest.fixture(scope="module", params=list(ARCHS))
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    spec = dict(ARCHS[request.param])
    arch = spec.pop("arch")
    if CUDA:  # a shape the GPU kernels meet in real models: head_dim 64, 4 query heads per KV head
        spec = {
            "hidden_size": 256,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 64,
            **spec,
        }
        spec["head_dim"] = 64
    return save_model(make_hf_model(arch, seed=7, **spec), tmp_path_factory.mktemp(request.param))


def _interpreter_fix() -> None:
    from tests.test_kernels import _interpreter_numpy2_fix

    _interpreter_numpy2_fix()


if not CUDA and importlib.util.find_spec("triton") is not None:
    _interpreter_fix()


def generate(folder: str, backend: str, prompts: list[list[int]], **settings: Any) -> list[Any]:
    llm = LLM(
        folder,
        device=DEVICE,
        attention_backend=backend,
        kv_cache_memory=16 << 20,
        block_size=8,
        tiers="none",
        **settings,
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, return_logits=True)
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    llm.engine.pool.assert_idle()
    return outs


def prompts(n: int) -> list[list[int]]:
    return [random_prompt(5 + 9 * i, seed=i) for i in range(n)]  # ragged: 5, 14, 23, ... tokens


def test_float32_greedy_tokens_equal_the_reference(folder: str) -> None:
    ps = prompts(2 if not CUDA else 6)
    ref = generate(folder, "torch", ps, dtype="float32")
    got = generate(folder, "triton", ps, dtype="float32")
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids
        assert (g.logits - r.logits).abs().max().item() < 1e-3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.skipif(not CUDA, reason="bfloat16 and CUDA graphs need the GPU")
def test_bfloat16_graphs_and_eager_are_as_accurate_as_the_reference(folder: str) -> None:
    """Against a float32 oracle, the fused bf16 path is no less accurate than the bf16 reference.

    (Random models amplify rounding: two correct bf16 paths differ by ~1% in logits, so the fused
    path is compared with the oracle, not with the other bf16 path.)"""
    ps = prompts(9)
    oracle = generate(folder, "torch", ps, dtype="float32")
    ref = generate(folder, "torch", ps, dtype="bfloat16")
    eager = generate(folder, "triton", ps, dtype="bfloat16", cuda_graph_max_batch=0)
    graphs = generate(folder, "triton", ps, dtype="bfloat16")
    for o, r, e, g in zip(oracle, ref, eager, graphs, strict=True):
        assert g.token_ids == e.token_ids  # the same kernels, replayed
        assert rel(e.logits[0], o.logits[0]) < 2 * rel(r.logits[0], o.logits[0]) + 2e-3


@pytest.mark.skipif(not CUDA, reason="fp8 needs the GPU")
def test_fp8_pool_stays_close_to_bfloat16(folder: str) -> None:
    ps = prompts(6)
    ref = generate(folder, "triton", ps, dtype="bfloat16")
    for backend in ("torch", "triton"):
        got = generate(folder, backend, ps, dtype="bfloat16", kv_cache_dtype="fp8")
        for r, g in zip(ref, got, strict=True):
            err = rel(g.logits[0], r.logits[0])
            assert err < 0.25, f"{backend}: first-step logit error {err:.3f}"


def test_triton_backend_refuses_a_cpu_without_the_interpreter(tmp_path: Path, monkeypatch: Any) -> None:
    from kvtier.model.attention import make_attention_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_attention_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="supported: auto, torch, triton"):
        make_attention_backend("flash", torch.device("cpu"))
    assert type(make_attention_backend("auto", torch.device("cpu"))).__name__ == "TorchReferenceAttention"
