"""Engine invariants on a tiny random Llama checkpoint (CPU, float32).

Caching on or off, chunked or whole prefill, preempted or not: the same greedy tokens and logits.
Prefix reuse reports exact cached-token counts; salts and models never share; n > 1 shares the
prompt; seeds reproduce; finish reasons; streaming; abort; bad input raises InvalidRequestError and
leaves the engine serving. After every workload the pool is idle.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from kvtier import LLM, InvalidRequestError, RequestOutput, SamplingParams
from kvtier.cache.keys import chain_keys
from tests.models import bytes_per_block, hf_greedy, make_hf_model, random_prompt, save_model

BS = 16
NEW = 24
ATOL = 1e-4
AMPLE = 4 << 20


@dataclass
class Model:
    hf: PreTrainedModel
    folder: str

    def llm(self, blocks: int | None = None, block_size: int = BS, **settings: Any) -> LLM:
        memory = blocks * bytes_per_block(self.hf, block_size) if blocks is not None else AMPLE
        return LLM(self.folder, kv_cache_memory=memory, block_size=block_size, tiers="none", **settings)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    hf = make_hf_model("llama", seed=11)
    return Model(hf, save_model(hf, tmp_path_factory.mktemp("llama")))


def greedy(max_tokens: int = NEW, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, return_logits=True, **kw)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, **kw: Any) -> list[RequestOutput]:
    outs = llm.generate(prompts, params, **kw)
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_idle()
    return outs


# -- one workload, many configurations ----------------------------------------------------------

BASE = random_prompt(40, seed=1)
WORKLOAD = [
    BASE + random_prompt(9, seed=10),  # 49 tokens: shares 2 full blocks with the next two
    BASE + random_prompt(23, seed=11),  # 63
    BASE[:20] + random_prompt(30, seed=12),  # 50: shares 1 full block
    random_prompt(37, seed=13),  # 37: shares nothing
    BASE + random_prompt(9, seed=10) + random_prompt(5, seed=14),  # 54: extends the first
]


@pytest.fixture(scope="module")
def reference(model: Model) -> list[RequestOutput]:
    """No caching, whole prefills, ample pool and budget: the plain computation."""
    llm = model.llm(enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=4096)
    outs = run(llm, WORKLOAD, greedy())
    assert llm.engine.scheduler.num_preemptions == 0
    hf_tokens, hf_logits = hf_greedy(model.hf, WORKLOAD[0], NEW)  # anchor the reference to HF
    assert outs[0].outputs[0].token_ids == hf_tokens
    torch.testing.assert_close(outs[0].outputs[0].logits, hf_logits, atol=ATOL, rtol=1e-4)
    return outs


def assert_same(outs: list[RequestOutput], ref: list[RequestOutput]) -> None:
    assert len(outs) == len(ref)
    for got, want in zip(outs, ref, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        torch.testing.assert_close(got.outputs[0].logits, want.outputs[0].logits, atol=ATOL, rtol=1e-4)
        assert got.outputs[0].finish_reason == "length"


VARIANTS: dict[str, dict[str, Any]] = {
    "caching": dict(enable_prefix_caching=True),
    "chunked-16": dict(max_num_batched_tokens=16, enable_chunked_prefill=True),
    "chunked-24-nocache": dict(max_num_batched_tokens=24, enable_prefix_caching=False),
    "whole-prefill-small-budget": dict(enable_chunked_prefill=False, max_num_batched_tokens=16),
    "max-2-seqs": dict(max_num_seqs=2),
    "preempt": dict(blocks=12),
    "preempt-chunked": dict(blocks=8, max_num_batched_tokens=24),
    "preempt-nocache": dict(blocks=8, enable_prefix_caching=False),
    "block-4-preempt-chunked": dict(block_size=4, blocks=40, max_num_batched_tokens=13),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_tokens_and_logits_in_every_configuration(
    model: Model, reference: list[RequestOutput], variant: str
) -> None:
    llm = model.llm(**VARIANTS[variant])
    outs = run(llm, WORKLOAD, greedy())
    assert_same(outs, reference)
    if "preempt" in variant:
        assert llm.engine.scheduler.num_preemptions > 0
        assert sum(o.metrics["num_preemptions"] for o in outs) == llm.engine.scheduler.num_preemptions
    if variant in ("chunked-16", "whole-prefill-small-budget", "max-2-seqs"):
        # Prompts admitted in later steps find their shared prefix.
        assert sum(o.num_cached_tokens for o in outs) > 0
    if not llm.config.pool.enable_prefix_caching:
        assert all(o.num_cached_tokens == 0 for o in outs)


def test_warm_cache_reuses_every_full_prompt_block(model: Model, reference: list[RequestOutput]) -> None:
    llm = model.llm()
    run(llm, WORKLOAD, greedy())
    warm = run(llm, WORKLOAD, greedy())
    assert_same(warm, reference)
    # The last prompt token is always computed; every full block before it is a hit.
    assert [o.num_cached_tokens for o in warm] == [(len(p) - 1) // BS * BS for p in WORKLOAD]
    assert llm.engine.stats.cached_prompt_tokens >= sum(o.num_cached_tokens for o in warm)


# -- prefix reuse, salts, models -----------------------------------------------------------------


def test_shared_prefix_reports_exact_cached_tokens(model: Model) -> None:
    llm = model.llm()
    first = run(llm, [BASE + random_prompt(9, seed=20)], greedy(4))[0]
    assert first.num_cached_tokens == 0
    second = run(llm, [BASE + random_prompt(20, seed=21)], greedy(4))[0]
    assert second.num_cached_tokens == 32  # 40 shared tokens: two full blocks of 16
    third = run(llm, [BASE[:16] + random_prompt(20, seed=22)], greedy(4))[0]
    assert third.num_cached_tokens == 16
    fourth = run(llm, [random_prompt(30, seed=23)], greedy(4))[0]
    assert fourth.num_cached_tokens == 0


def test_cache_salts_never_share(model: Model, reference: list[RequestOutput]) -> None:
    llm = model.llm()
    run(llm, [WORKLOAD[0]], greedy(4), cache_salt="tenant-a")
    other = run(llm, [WORKLOAD[1]], greedy(), cache_salt="tenant-b")[0]
    assert other.num_cached_tokens == 0
    unsalted = run(llm, [WORKLOAD[1]], greedy(), cache_salt=None)[0]
    assert unsalted.num_cached_tokens == 0
    same = run(llm, [WORKLOAD[1]], greedy(), cache_salt="tenant-a")[0]
    assert same.num_cached_tokens == 32
    for out in (other, unsalted, same):
        assert_same([out], [reference[1]])
    engine = llm.engine
    assert engine.root_key("tenant-a") != engine.root_key("tenant-b") != engine.root_key(None)


def test_different_weights_different_keys(model: Model, tmp_path: Path) -> None:
    other_hf = make_hf_model("llama", seed=12)  # same shapes, other weights
    other = LLM(save_model(other_hf, tmp_path / "other"), kv_cache_memory=AMPLE, block_size=BS, tiers="none")
    copy = LLM(save_model(model.hf, tmp_path / "copy"), kv_cache_memory=AMPLE, block_size=BS, tiers="none")
    llm = model.llm()
    a, b = llm.engine, other.engine
    assert a.layout == b.layout
    assert a.fingerprint != b.fingerprint
    assert a.root_key(None) != b.root_key(None)
    # The same weights saved again elsewhere are the same model: instances can share.
    assert copy.engine.fingerprint == a.fingerprint

    prompt = WORKLOAD[0]
    run(llm, [prompt], greedy(4))
    blocks = [prompt[i * BS : (i + 1) * BS] for i in range(len(prompt) // BS)]
    keys_a = chain_keys(a.root_key(None), prompt, BS)
    keys_b = chain_keys(b.root_key(None), prompt, BS)
    assert not set(keys_a) & set(keys_b)
    assert len(a.pool.match_prefix(keys_a, blocks)) == 3  # the model's own keys hit...
    assert a.pool.match_prefix(keys_b, blocks) == []  # ...the other model's never do
    assert not any(a.pool.contains(k) for k in keys_b)


def test_multi_turn_reuses_the_output_blocks(model: Model) -> None:
    llm = model.llm()
    p1 = random_prompt(40, seed=30)
    out1 = run(llm, [p1], greedy(30))[0]
    p2 = p1 + out1.outputs[0].token_ids + random_prompt(10, seed=31)
    out2 = run(llm, [p2], greedy(12))[0]
    # KV exists for 40 + 30 - 1 tokens (the last output token was never fed back): 4 full blocks.
    assert out2.num_cached_tokens == 64
    assert out2.num_cached_tokens > len(p1) // BS * BS  # more than the first prompt alone
    cold = run(model.llm(enable_prefix_caching=False), [p2], greedy(12))[0]
    assert_same([out2], [cold])


# -- sampling: n > 1, seeds ----------------------------------------------------------------------


def _collect(llm: LLM) -> dict[str, RequestOutput]:
    final = {o.request_id: o for o in llm.engine.run_until_done() if o.finished}
    llm.engine.pool.assert_idle()
    return final


def test_n_siblings_share_the_prompt_and_seeds_reproduce(model: Model) -> None:
    prompt = random_prompt(40, seed=40)
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=12, ignore_eos=True)
    llm = model.llm()
    ids = llm.engine.add_request(prompt, params)
    assert ids == [f"{ids[0].split('#')[0]}#{i}" for i in range(3)]
    final = _collect(llm)
    assert final[ids[0]].num_cached_tokens == 0
    assert [final[i].num_cached_tokens for i in ids[1:]] == [32, 32]
    completions = [final[i].outputs[0].token_ids for i in ids]
    assert all(len(c) == 12 for c in completions)
    assert len({tuple(c) for c in completions}) > 1  # seed + i: different draws per completion

    again = run(model.llm(), [prompt], params)[0]
    assert [c.index for c in again.outputs] == [0, 1, 2]
    assert [c.token_ids for c in again.outputs] == completions


def test_same_seed_same_output_whatever_the_batch(model: Model) -> None:
    prompt = random_prompt(33, seed=50)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=16, ignore_eos=True)
    alone = run(model.llm(), [prompt], params)[0].outputs[0].token_ids
    again = run(model.llm(), [prompt], params)[0].outputs[0].token_ids
    assert alone == again
    # In a crowd, chunked, and preempted (recomputed from its tokens, its generator carried over).
    crowd = [random_prompt(30 + i, seed=60 + i) for i in range(3)]
    tight = model.llm(blocks=8, max_num_batched_tokens=24)
    mixed = run(
        tight,
        [*crowd, prompt],
        [SamplingParams(temperature=1.0, max_tokens=16), greedy(), SamplingParams(seed=5), params],
    )
    assert mixed[3].metrics["num_preemptions"] > 0
    assert mixed[3].outputs[0].token_ids == alone
    other_seed = run(model.llm(), [prompt], SamplingParams(temperature=1.0, seed=124, max_tokens=16))
    assert other_seed[0].outputs[0].token_ids != alone


# -- finish reasons, text, streaming ------------------------------------------------------------

STOP_PROMPT = random_prompt(40, seed=33)


@pytest.fixture(scope="module")
def stop_ref(model: Model) -> Any:
    out = run(model.llm(), [STOP_PROMPT], greedy())[0].outputs[0]
    assert len(out.token_ids) == NEW and out.finish_reason == "length"
    return out


def test_max_tokens_finishes_with_length(model: Model, stop_ref: Any) -> None:
    out = run(model.llm(), [STOP_PROMPT], greedy(7))[0].outputs[0]
    assert out.finish_reason == "length"
    assert out.token_ids == stop_ref.token_ids[:7]


def test_max_model_len_finishes_with_length(model: Model, stop_ref: Any) -> None:
    out = run(model.llm(max_model_len=48), [STOP_PROMPT], greedy(30))[0].outputs[0]
    assert out.finish_reason == "length"
    assert out.token_ids == stop_ref.token_ids[:8]  # 40 + 8 = the context


def test_stop_token_ids(model: Model, stop_ref: Any) -> None:
    ref = stop_ref.token_ids
    stop = ref[5]
    first = ref.index(stop)
    out = run(model.llm(), [STOP_PROMPT], greedy(stop_token_ids=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref[: first + 1]


def test_eos_and_ignore_eos(model: Model, stop_ref: Any, tmp_path: Path) -> None:
    ref = stop_ref.token_ids
    eos = ref[6]
    first = ref.index(eos)
    folder = Path(save_model(model.hf, tmp_path / "eos"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (folder / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(folder), kv_cache_memory=AMPLE, block_size=BS, tiers="none")
    stopped = run(llm, [STOP_PROMPT], SamplingParams(max_tokens=NEW, temperature=0))[0].outputs[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == ref[: first + 1]
    ignored = run(llm, [STOP_PROMPT], SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))
    assert ignored[0].outputs[0].finish_reason == "length"
    assert ignored[0].outputs[0].token_ids == ref


def _ascii_stop(text: str) -> tuple[str, int]:
    """A two-character printable stop string whose first occurrence is past the start."""
    for i in range(2, len(text) - 1):
        s = text[i : i + 2]
        if s.isascii() and s.isprintable() and text.find(s) == i:
            return s, i
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings(model: Model, stop_ref: Any) -> None:
    stop, idx = _ascii_stop(stop_ref.text)
    llm = model.llm()
    out = run(llm, [STOP_PROMPT], greedy(stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == stop_ref.text[:idx]
    assert len(out.token_ids) < NEW
    assert out.token_ids == stop_ref.token_ids[: len(out.token_ids)]
    kept = run(llm, [STOP_PROMPT], greedy(stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == stop_ref.text[: idx + len(stop)]
    assert kept.finish_reason == "stop"


def _stream(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[str, list[int], list[Any]]:
    deltas = list(llm.stream(prompt, params))
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


def test_stream_deltas_add_up_to_the_final_output(model: Model, stop_ref: Any) -> None:
    llm = model.llm()
    text, tokens, deltas = _stream(llm, STOP_PROMPT, greedy())
    assert tokens == stop_ref.token_ids
    assert text == stop_ref.text
    assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].output.outputs[0].text == text
    llm.engine.pool.assert_idle()


def test_stream_with_a_stop_string_never_sends_text_it_takes_back(model: Model, stop_ref: Any) -> None:
    stop, idx = _ascii_stop(stop_ref.text)
    llm = model.llm()
    text, tokens, deltas = _stream(llm, STOP_PROMPT, greedy(stop=[stop]))
    final = deltas[-1].output.outputs[0]
    assert final.finish_reason == "stop"
    assert text == final.text == stop_ref.text[:idx]
    assert tokens == final.token_ids
    llm.engine.pool.assert_idle()


# -- abort --------------------------------------------------------------------------------------


def test_abort_frees_blocks_and_keeps_the_cache(model: Model, reference: list[RequestOutput]) -> None:
    llm = model.llm()
    engine = llm.engine
    engine.add_request(WORKLOAD[1], greedy(50), request_id="running")
    engine.add_request(WORKLOAD[3], greedy(50), request_id="waiting")
    engine.add_request(WORKLOAD[2], SamplingParams(n=2, seed=1, max_tokens=50), request_id="group")
    for _ in range(3):
        engine.step()
    assert any(engine.pool.ref_counts)
    for rid in ("running", "waiting", "group", "never-existed"):
        engine.abort(rid)
    assert not engine.has_unfinished()
    engine.pool.assert_idle()
    assert engine.pool.num_available == engine.num_blocks
    # The aborted request's computed blocks stay cached (evictable), and the engine still serves.
    again = run(llm, [WORKLOAD[1]], greedy())[0]
    assert again.num_cached_tokens == 48
    assert_same([again], [reference[1]])


def test_abort_a_request_before_it_runs(model: Model) -> None:
    llm = model.llm()
    llm.engine.add_request(WORKLOAD[0], greedy(), request_id="x")
    llm.engine.abort("x")
    assert not llm.engine.has_unfinished()
    assert llm.engine.step() == []
    llm.engine.pool.assert_idle()


def test_closing_a_stream_early_frees_blocks(model: Model, stop_ref: Any) -> None:
    llm = model.llm()
    stream = llm.stream(STOP_PROMPT, greedy())
    assert isinstance(stream, Generator)
    first = next(stream)
    next(stream)
    assert any(llm.engine.pool.ref_counts)
    stream.close()
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_idle()
    assert first.token_ids == stop_ref.token_ids[:1]


# -- bad input ----------------------------------------------------------------------------------

POOL_BLOCKS = 6  # 96 tokens
CONTEXT = 120


@pytest.fixture(scope="module")
def strict(model: Model) -> LLM:
    """One engine for every bad request: each must leave it serving and idle."""
    return model.llm(blocks=POOL_BLOCKS, max_model_len=CONTEXT)


BAD_REQUESTS: dict[str, tuple[Any, SamplingParams, tuple[str, ...]]] = {
    "empty-prompt": ([], greedy(), ("empty",)),
    "empty-text": ("", greedy(), ("empty",)),
    "beyond-context": (random_prompt(CONTEXT, seed=70), greedy(), (f"{CONTEXT} tokens", "context")),
    "beyond-pool": (random_prompt(100, seed=71), greedy(), ("7 KV blocks", f"{POOL_BLOCKS} blocks")),
    "negative-temperature": ([1, 2, 3], SamplingParams(temperature=-0.5), ("temperature", ">= 0")),
    "top-p-zero": ([1, 2, 3], SamplingParams(top_p=0.0), ("top_p", "(0, 1]")),
    "top-p-above-one": ([1, 2, 3], SamplingParams(top_p=1.5), ("top_p", "(0, 1]")),
    "max-tokens-zero": ([1, 2, 3], SamplingParams(max_tokens=0), ("max_tokens", ">= 1")),
    "token-out-of-vocab": ([1, 300, 2], greedy(), ("300", "[0, 300)")),
    "negative-token": ([1, -1, 2], greedy(), ("-1", "[0, 300)")),
    "stop-token-out-of-vocab": ([1, 2], greedy(stop_token_ids=[999]), ("999", "[0, 300)")),
    "n-zero": ([1, 2], SamplingParams(n=0), ("n must be >= 1",)),
}


def _still_serves(llm: LLM, reference: list[RequestOutput]) -> None:
    out = run(llm, [WORKLOAD[3]], greedy())[0]
    assert_same([out], [reference[3]])


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_raises_and_the_engine_keeps_serving(
    strict: LLM, reference: list[RequestOutput], case: str
) -> None:
    prompt, params, fragments = BAD_REQUESTS[case]
    with pytest.raises(InvalidRequestError) as info:
        strict.engine.add_request(prompt, params)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert not strict.engine.has_unfinished()
    strict.engine.pool.assert_idle()
    _still_serves(strict, reference)


def test_bad_prompt_in_a_batch_queues_nothing(strict: LLM, reference: list[RequestOutput]) -> None:
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        strict.generate([WORKLOAD[0], [1, 400]], greedy())
    assert not strict.engine.has_unfinished()
    strict.engine.pool.assert_idle()
    _still_serves(strict, reference)


def test_text_features_without_a_tokenizer_are_refused(tmp_path: Path) -> None:
    hf = make_hf_model("llama", seed=5, vocab_size=200)  # too small for the byte-level fallback
    llm = LLM(save_model(hf, tmp_path / "notok"), kv_cache_memory=AMPLE, block_size=BS, tiers="none")
    assert llm.tokenizer is None
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        llm.engine.add_request([1, 2, 3], greedy(stop=["a"]))
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        llm.engine.add_request("text", greedy())
    prompt = random_prompt(20, seed=80, vocab=200)
    out = run(llm, [prompt], greedy(6))[0].outputs[0]
    assert out.token_ids == hf_greedy(hf, prompt, 6)[0]
    assert out.text == ""


def test_duplicate_request_id(strict: LLM, reference: list[RequestOutput]) -> None:
    engine = strict.engine
    engine.add_request(WORKLOAD[3], greedy(), request_id="dup")
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request(WORKLOAD[0], greedy(), request_id="dup")
    final = _collect(strict)
    assert list(final) == ["dup"]
    assert_same([final["dup"]], [reference[3]])
    engine.add_request(WORKLOAD[3], greedy(), request_id="dup")  # free again once finished
    assert_same([_collect(strict)["dup"]], [reference[3]])


def test_outgrowing_the_pool_during_decode_ends_with_length(model: Model) -> None:
    longest = 64 - len(STOP_PROMPT) + 1  # 64 tokens of KV, the last output sampled from position 63
    ref = run(model.llm(), [STOP_PROMPT], greedy(longest))[0].outputs[0].token_ids
    llm = model.llm(blocks=4)  # 64 tokens
    engine = llm.engine
    for i in range(2):  # two at once: they must not take turns preempting each other forever
        engine.add_request(STOP_PROMPT, greedy(100), request_id=f"big{i}")
    final: dict[str, RequestOutput] = {}
    for _ in range(200):
        if not engine.has_unfinished():
            break
        final.update({o.request_id: o for o in engine.step() if o.finished})
    assert not engine.has_unfinished(), "livelock: the requests never finished"
    engine.pool.assert_idle()
    for out in final.values():
        c = out.outputs[0]
        assert c.finish_reason == "length"
        assert out.error and "KV pool" in out.error
        assert c.token_ids == ref  # as long as the pool allows, and right
    assert sorted(final) == ["big0", "big1"]
    out = run(llm, [STOP_PROMPT], greedy(8))[0]  # still serves
    assert out.outputs[0].token_ids == ref[:8]
