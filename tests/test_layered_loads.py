"""Loads from the host tier copied layer by layer under the compute of the step that runs their
request (``layered_loads``): the kernel's copy and integrity sums against the CPU reference
(``integrity_sums``, on the CPU in Triton's interpreter), and on CUDA the engine's tokens against a
cold run, a corrupt slot that must be recomputed, two loads in one step, and an abort mid-step.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.cache.codec import integrity_sums

from .models import make_hf_model, random_prompt, save_model

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and importlib.util.find_spec("triton") is not None:
    from tests.test_kernels import _interpreter_numpy2_fix

    _interpreter_numpy2_fix()  # the copy's loop over tiles reads a scalar the interpreter keeps as an array


@needs_triton
@pytest.mark.parametrize(
    ("layers", "heads", "dim", "dtype", "programs"),
    [
        (3, 2, 64, torch.float32, 16),  # 8 KiB pieces: one tile a piece, more programs than tiles
        (2, 1, 128, torch.bfloat16, 16),
        (2, 4, 128, torch.float32, 5),  # 32 KiB pieces (the 8B's): two tiles a piece, 5 programs loop
        (2, 8, 128, torch.bfloat16, 3),  # the 8B's own piece shape
    ],
)
def test_the_layer_gather_copies_each_layer_and_sums_what_it_moved(
    layers: int, heads: int, dim: int, dtype: torch.dtype, programs: int
) -> None:
    """Layer by layer, scattered slots land in scattered pool blocks byte for byte, other blocks
    and other layers are untouched until their turn, and the sums are ``integrity_sums``'s."""
    from kvtier.cache.tiers.host_gather import LayerGather, layer_rows_align

    bs, num_pool_blocks = 16, 9
    pool = torch.zeros((layers, 2, num_pool_blocks, bs, heads, dim), dtype=dtype, device=DEVICE)
    piece_bytes = bs * heads * dim * pool.element_size()
    assert layer_rows_align(piece_bytes) and not layer_rows_align(piece_bytes + 8)
    gen = torch.Generator().manual_seed(7)
    block_words = layers * 2 * piece_bytes // 8
    slab = torch.randint(-(2**62), 2**62, (6, block_words), dtype=torch.int64, generator=gen)
    if DEVICE == "cuda":
        slab = slab.pin_memory()
    slots, blocks = [4, 0, 5], [8, 2, 3]
    rows = torch.tensor([slab[s].data_ptr() for s in slots], dtype=torch.int64, device=DEVICE)
    gather = LayerGather(pool, rows, torch.tensor(blocks, dtype=torch.int64, device=DEVICE), programs)
    words = pool.view(torch.uint8).view(torch.int64).view(layers, 2, num_pool_blocks, -1)
    expected = slab[slots].view(len(slots), layers, 2, -1)
    for layer in range(layers):
        gather.copy_layer(layer)
        got = words.cpu()
        assert torch.equal(got[layer][:, blocks].permute(1, 0, 2), expected[:, layer])
        if layer + 1 < layers:
            assert not got[layer + 1 :].any()  # later layers wait for their own launch
        others = [b for b in range(num_pool_blocks) if b not in blocks]
        assert not got[:, :, others].any()
    assert torch.equal(gather.sums().cpu(), integrity_sums(slab[slots].view(torch.uint8)))


def _model_folder(tmp_path: object) -> str:
    """A tiny Llama whose K (or V) piece of a 16-token block is 8 KiB in float32: whole rows."""
    model = make_hf_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64)
    return save_model(model, tmp_path)  # type: ignore[arg-type]


def _llm(folder: str, pool_blocks: int, **settings: object) -> LLM:
    block_bytes = 2 * 2 * 2 * 64 * 4 * 16  # layers, K+V, heads, dim, float32, tokens
    chosen: dict[str, object] = {"tiers": "host", "load_policy": "always", **settings}
    return LLM(folder, device="cuda", dtype="float32", kv_cache_memory=pool_blocks * block_bytes, **chosen)


GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _cold_tokens(folder: str, prompts: list[list[int]]) -> list[list[int]]:
    cold = _llm(folder, 64, tiers="none", enable_prefix_caching=False)
    try:
        return [o.outputs[0].token_ids for o in cold.generate(prompts, GREEDY)]
    finally:
        cold.close()


def _push_down(llm: LLM) -> None:
    """Evict every cached pool block to the host tier (its write-back) and wait for the copies."""
    llm.engine.pool.evict_all()
    assert llm.engine.kv is not None
    llm.engine.kv.flush()
    torch.cuda.synchronize()


@needs_cuda
def test_layered_loads_give_the_cold_runs_tokens(tmp_path: object) -> None:
    folder = _model_folder(tmp_path)
    prompts = [random_prompt(150, seed) for seed in range(4)]
    ref = _cold_tokens(folder, prompts)
    llm = _llm(folder, 24)
    try:
        hierarchy = llm.engine.hierarchy
        assert hierarchy is not None and hierarchy.tiers[0].takes_layered_loads
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == ref
        _push_down(llm)
        again = llm.generate(prompts[:1], GREEDY)[0]
        assert again.outputs[0].token_ids == ref[0]
        assert again.metrics["num_loaded_tokens"] == 144
        assert hierarchy.stats.loads_layered == 1 and hierarchy.stats.per_tier_loaded["host"] == 9
        both = llm.generate(prompts[2:4], GREEDY)  # admitted together: one launch a layer for both
        assert [o.outputs[0].token_ids for o in both] == ref[2:4]
        assert hierarchy.stats.loads_layered == 3 and hierarchy.stats.per_tier_loaded["host"] == 27
        llm.engine.pool.assert_idle()
        assert not hierarchy.tiers[0]._pins  # type: ignore[attr-defined]
    finally:
        llm.close()


@contextlib.contextmanager
def _prompt_in_host(tmp_path: object, seed: int) -> Iterator[tuple[LLM, list[int], list[int]]]:
    """A 12-block engine whose host tier holds a 150-token prompt's 9 full blocks (and the pool
    none), the prompt, and the cold run's tokens for it."""
    folder = _model_folder(tmp_path)
    prompt = random_prompt(150, seed)
    ref = _cold_tokens(folder, [prompt])[0]
    llm = _llm(folder, 12)
    try:
        llm.generate([prompt], GREEDY)
        _push_down(llm)
        yield llm, prompt, ref
    finally:
        llm.close()


@needs_cuda
def test_a_corrupt_slot_in_a_layered_load_is_recomputed(tmp_path: object) -> None:
    """A flipped bit in the fourth block: the step that ran on it is dropped, the three intact
    blocks stay cached, the rest is recomputed, and the tokens are still the cold run's."""
    with _prompt_in_host(tmp_path, 1) as (llm, prompt, ref):
        engine, hierarchy = llm.engine, llm.engine.hierarchy
        assert hierarchy is not None
        host = hierarchy.tiers[0]
        keys = _block_keys(engine, prompt)
        assert len(keys) == 9 and host.lookup(keys) == 9
        slot = host._slot_of[(host.namespace, keys[3])]  # type: ignore[attr-defined]
        host._row(slot)[100] ^= 0x10  # type: ignore[attr-defined]
        again = llm.generate([prompt], GREEDY)[0]
        assert again.outputs[0].token_ids == ref
        assert hierarchy.stats.loads_layered == 1 and hierarchy.stats.corrupt == 1
        assert host.lookup(keys) == 3  # the corrupt block is gone, the ones before it stay
        tokens = [prompt[i * 16 : i * 16 + 16] for i in range(9)]
        assert len(engine.pool.match_prefix(keys, tokens)) == 9  # recomputed, committed again
        engine.pool.assert_idle()
        assert not host._pins  # type: ignore[attr-defined]


@needs_cuda
def test_a_request_aborted_during_its_layered_step_leaves_nothing_held(tmp_path: object) -> None:
    with _prompt_in_host(tmp_path, 3) as (llm, prompt, ref):
        engine, hierarchy = llm.engine, llm.engine.hierarchy
        assert hierarchy is not None
        (request_id,) = engine.add_request(prompt, GREEDY)
        engine.step()  # admitted, its load and its first step launched together
        assert hierarchy.stats.loads_layered == 1 and engine._in_flight is not None
        engine.abort(request_id)
        while engine.has_unfinished() or engine._in_flight is not None:
            engine.step()
        engine.pool.assert_idle()
        assert not hierarchy.tiers[0]._pins  # type: ignore[attr-defined]
        assert llm.generate([prompt], GREEDY)[0].outputs[0].token_ids == ref


def _block_keys(engine: object, prompt: list[int]) -> list[bytes]:
    from kvtier.cache.keys import chain_keys

    root = engine.root_key(None)  # type: ignore[attr-defined]
    return chain_keys(root, prompt[:144], 16)
