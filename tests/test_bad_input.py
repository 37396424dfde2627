"""No input poisons the engine: every bad request, setting or checkpoint fails up front with a message
naming the problem and the limit, and the engine then serves the next valid request, pool idle.

Also the second line of defence: a request that fails inside a step anyway (here: one whose params
were broken after validation) is finished with its error and removed while the others go on, and an
interrupted ``generate()`` (KeyboardInterrupt) leaves nothing queued.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kvtier import LLM, InvalidRequestError, SamplingParams
from kvtier.config import ConfigError, EngineConfig
from kvtier.engine.engine import Engine
from kvtier.model.loader import CheckpointError
from kvtier.model.registry import ModelConfigError
from tests.models import hf_greedy, make_hf_model, random_prompt, save_model

NEW = 6
PROMPT = random_prompt(21, seed=3)


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    hf = make_hf_model("llama", seed=21)
    return hf, save_model(hf, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def expected(checkpoint: tuple[Any, str]) -> list[int]:
    return hf_greedy(checkpoint[0], PROMPT, NEW)[0]


@pytest.fixture(scope="module")
def llm(checkpoint: tuple[Any, str]) -> LLM:
    return LLM(checkpoint[1], kv_cache_memory=2 << 20, block_size=16, tiers="none", max_model_len=256)


def assert_serves(llm: LLM, expected: list[int]) -> None:
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_idle()
    out = llm.generate([PROMPT], greedy())[0]
    assert out.error is None
    assert out.outputs[0].token_ids == expected
    assert not llm.engine.has_unfinished()
    llm.engine.pool.assert_idle()


NAN, INF = math.nan, math.inf
# name -> (SamplingParams fields, fragments the message must hold)
BAD_PARAMS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "stop-not-strings": (dict(stop=[123]), ("stop must be a list of strings", "int 123")),
    "stop-a-string": (dict(stop="end"), ("stop must be a list of strings", "wrap it in a list")),
    "stop-empty-string": (dict(stop=[""]), ("non-empty",)),
    "stop-lone-surrogate": (dict(stop=["a\ud800"]), ("stop string", "surrogate")),
    "stop-too-many": (dict(stop=[f"s{i}" for i in range(65)]), ("65", "at most 64")),
    "stop-ids-not-ints": (dict(stop_token_ids=[1.5]), ("stop_token_ids", "float 1.5")),
    "seed-str": (dict(seed="abc"), ("seed must be an integer", "'abc'")),
    "seed-float": (dict(seed=1.5), ("seed must be an integer", "1.5")),
    "seed-bool": (dict(seed=True), ("seed must be an integer",)),
    "top-k-float": (dict(top_k=1.5), ("top_k must be an integer", "1.5")),
    "top-k-inf": (dict(top_k=INF), ("top_k must be an integer",)),
    "top-k-negative": (dict(top_k=-1), ("top_k", ">= 0")),
    "temperature-nan": (dict(temperature=NAN), ("temperature", "finite", "nan")),
    "temperature-inf": (dict(temperature=INF), ("temperature", "finite")),
    "temperature-str": (dict(temperature="0.5"), ("temperature", "str '0.5'")),
    "temperature-none": (dict(temperature=None), ("temperature", "NoneType")),
    "temperature-tiny": (dict(temperature=1e-30), ("temperature", "1e-05")),
    "temperature-huge": (dict(temperature=1e9), ("temperature", "10000")),
    "repetition-nan": (dict(repetition_penalty=NAN), ("repetition_penalty", "finite")),
    "repetition-inf": (dict(repetition_penalty=INF), ("repetition_penalty", "finite")),
    "repetition-zero": (dict(repetition_penalty=0.0), ("repetition_penalty", "[0.01, 100]")),
    "top-p-nan": (dict(top_p=NAN), ("top_p", "finite")),
    "min-p-nan": (dict(min_p=NAN), ("min_p", "finite")),
    "presence-inf": (dict(presence_penalty=INF), ("presence_penalty", "finite")),
    "n-float": (dict(n=2.0), ("n must be >= 1", "float 2.0")),
    "n-huge": (dict(n=10**9), ("n must be", "<= 256")),
    "max-tokens-float": (dict(max_tokens=4.0), ("max_tokens must be an integer",)),
    "max-tokens-bool": (dict(max_tokens=True), ("max_tokens must be an integer",)),
    "ignore-eos-int": (dict(ignore_eos=1), ("ignore_eos must be true or false",)),
    "temperature-int-too-large": (dict(temperature=10**400), ("temperature must be", "401 digits")),
    "logit-bias-list": (dict(logit_bias=[5, 1.0]), ("logit_bias must map token ids to numbers", "list")),
    "logit-bias-str-key": (
        dict(logit_bias={"5": 1.0}),
        ("logit_bias keys must be integer token ids", "str '5'"),
    ),
    "logit-bias-bool-key": (dict(logit_bias={True: 1.0}), ("logit_bias keys must be integer", "bool")),
    "logit-bias-vocab": (dict(logit_bias={10**6: 1.0}), ("logit_bias token id int 1000000 is outside",)),
    "logit-bias-value": (dict(logit_bias={5: 100.5}), ("logit_bias values must be in [-100, 100]",)),
    "logit-bias-huge": (dict(logit_bias={5: 10**400}), ("logit_bias values", "401 digits")),
    "logit-bias-nan": (dict(logit_bias={5: NAN}), ("logit_bias values", "finite")),
    "logit-bias-many": (dict(logit_bias=dict.fromkeys(range(1025), 1.0)), ("1025 entries; at most 1024",)),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_sampling_params(llm: LLM, expected: list[int], case: str) -> None:
    fields, fragments = BAD_PARAMS[case]
    params = greedy()
    for k, v in fields.items():
        setattr(params, k, v)  # as a client that builds the object by hand (or from JSON) would
    for call in (lambda: llm.engine.add_request(PROMPT, params), lambda: llm.generate([PROMPT], params)):
        with pytest.raises(InvalidRequestError) as info:
            call()
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))
    assert_serves(llm, expected)


# name -> (prompt, add_request keyword arguments, fragments)
BAD_REQUESTS: dict[str, tuple[Any, dict[str, Any], tuple[str, ...]]] = {
    "prompt-bytes": (b"hello", {}, ("a prompt must be a str or a list of token ids", "bytes")),
    "prompt-dict": ({"a": 1}, {}, ("a prompt must be", "dict")),
    "prompt-float": (1.5, {}, ("a prompt must be", "float")),
    "prompt-bool": (True, {}, ("a prompt must be", "bool")),
    "prompt-none": (None, {}, ("a prompt must be", "NoneType")),
    "prompt-int": (7, {}, ("a prompt must be", "int 7")),
    # made in the test, not at import: a tensor built while pytest collects touches torch's
    # dispatcher before test_fused_path sets TRITON_INTERPRET (its kernels then fail to run)
    "prompt-numpy": ("<numpy>", {}, ("ndarray", "tolist()")),
    "prompt-tensor": ("<tensor>", {}, ("Tensor", "tolist()")),
    "prompt-float-ids": ([1.0, 2.0], {}, ("integers", "float 1.0")),
    "prompt-bool-ids": ([True, 5], {}, ("integers", "token 0 is bool")),
    "prompt-lone-surrogate": ("abc\udc80def", {}, ("the prompt", "character 3", "surrogate")),
    "salt-int": (PROMPT, dict(cache_salt=123), ("cache_salt must be a string", "int 123")),
    "salt-bytes": (PROMPT, dict(cache_salt=b"x"), ("cache_salt must be a string", "bytes")),
    "salt-surrogate": (PROMPT, dict(cache_salt="t\ud800"), ("cache_salt", "surrogate")),
    "salt-huge": (PROMPT, dict(cache_salt="x" * 5000), ("cache_salt", "at most 1024")),
    "params-dict": (PROMPT, dict(params={"temperature": 0}), ("SamplingParams(**values)", "dict")),
    "params-str": (PROMPT, dict(params="greedy"), ("params must be a SamplingParams", "str")),
    "request-id-int": (PROMPT, dict(request_id=5), ("request_id must be a non-empty string",)),
    "request-id-hash": (PROMPT, dict(request_id="a#b"), ("without '#'",)),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests(llm: LLM, expected: list[int], case: str) -> None:
    prompt, kwargs, fragments = BAD_REQUESTS[case]
    prompt = {"<numpy>": lambda: np.array(PROMPT), "<tensor>": lambda: torch.tensor(PROMPT)}.get(
        prompt if isinstance(prompt, str) else "", lambda: prompt
    )()
    kwargs = {"params": greedy(), **kwargs}
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request(prompt, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    if "request_id" not in kwargs:
        gen_kwargs = {"cache_salt": kwargs["cache_salt"]} if "cache_salt" in kwargs else {}
        with pytest.raises(InvalidRequestError):
            llm.generate(prompt, kwargs["params"], **gen_kwargs)
    assert_serves(llm, expected)


def test_a_request_that_fails_inside_a_step_is_finished_and_the_others_go_on(
    llm: LLM, expected: list[int]
) -> None:
    """Validation is the first line; this is the second: a request broken after it (as a bug would)
    fails alone, with its error, and the requests batched with it are unharmed."""
    engine = llm.engine
    good = engine.add_request(PROMPT, greedy(), request_id="good")[0]
    bad = engine.add_request(PROMPT, greedy(), request_id="bad")[0]
    engine.requests[bad].params.temperature = 0.5  # sampled, not the argmax fast path...
    engine.requests[bad].params.seed = "abc"  # ...and SamplingBatch.build raises on it
    final = {o.request_id: o for o in engine.run_until_done() if o.finished}
    assert sorted(final) == ["bad", "good"]
    assert final[good].error is None and final[good].outputs[0].token_ids == expected
    assert final[bad].outputs[0].finish_reason == "error"
    assert final[bad].error and "TypeError" in final[bad].error
    assert_serves(llm, expected)


@pytest.mark.parametrize("where", ["launch", "collect"])
def test_an_interrupted_generate_leaves_nothing_queued(llm: LLM, expected: list[int], where: str) -> None:
    """Ctrl-C while the second step starts on the device, or while the engine waits for it."""
    engine = llm.engine
    original = getattr(engine.runner, where)
    calls = 0

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    setattr(engine.runner, where, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate([PROMPT, random_prompt(30, seed=4)], greedy())
    finally:
        setattr(engine.runner, where, original)
    assert calls == 2
    assert not engine.requests
    engine.pool.assert_idle()
    assert_serves(llm, expected)  # and the next call runs only its own request


# -- settings ---------------------------------------------------------------------------------------

BAD_SETTINGS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "block-size-float": (dict(block_size=1.5), ("block_size must be an integer", "1.5")),
    "block-size-bool": (dict(block_size=True), ("block_size must be an integer", "True")),
    "block-size-not-power": (dict(block_size=24), ("power of two",)),
    "max-model-len-zero": (dict(max_model_len=0), ("max_model_len must be >= 2", "got 0")),
    "max-model-len-negative": (dict(max_model_len=-5), ("max_model_len must be >= 2",)),
    "selective-hits-negative": (dict(selective_hits=-1), ("selective_hits must be >= 0",)),
    "cpu-fraction-negative": (dict(cpu_kv_cache_fraction=-0.5), ("cpu_kv_cache_fraction", "(0, 1]")),
    "cpu-fraction-nan": (dict(cpu_kv_cache_fraction=NAN), ("cpu_kv_cache_fraction", "finite")),
    "disk-path-empty": (dict(disk_path=""), ("disk_path is empty", "default folder")),
    "disk-capacity-negative": (dict(disk_capacity=-1), ("disk_capacity must be >= 0",)),
    "host-capacity-words": (
        dict(host_capacity="lots"),
        ("host_capacity must be a size in bytes", "4GiB", "'lots'"),
    ),
    "kv-memory-fraction": (dict(kv_cache_memory="1.5"), ("kv_cache_memory must be a size in bytes",)),
    "redis-timeout-zero": (dict(redis_timeout=0), ("redis_timeout must be > 0",)),
    "write-policy": (dict(write_policy="sometimes"), ("write_policy", "write-through")),
    "bool-setting-int": (dict(enable_prefix_caching=2), ("enable_prefix_caching must be true or false",)),
    "str-setting-int": (dict(eviction_policy=3), ("eviction_policy must be a string",)),
    # settings that name an implementation: checked with the config, the supported names listed
    "eviction-policy": (dict(eviction_policy="lru2"), ("eviction_policy 'lru2'", "s3fifo")),
    "tier-policy": (dict(tier_policy="mru"), ("tier_policy 'mru'", "arc")),
    "disk-codec": (dict(disk_codec="gzip"), ("'gzip'", "zstd")),
    "redis-codec": (dict(redis_codec="int4+lz4"), ("'int4'", "fp8")),
    "tier-name": (dict(tiers="host,s3"), ("unknown tier 's3'", "memcached")),
    "attention-backend": (dict(attention_backend="flash"), ("attention_backend 'flash'", "torch")),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings(case: str) -> None:
    settings, fragments = BAD_SETTINGS[case]
    with pytest.raises(ConfigError) as info:
        EngineConfig.load(settings, env={})
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_named_settings_fail_before_any_weights_load(tmp_path: Path) -> None:
    # the model folder does not exist: had weights been loaded first, that would be the error
    with pytest.raises(ConfigError, match="eviction_policy"):
        LLM(str(tmp_path / "no-such-model"), eviction_policy="lru2")


def test_settings_set_by_hand_are_checked_too(checkpoint: tuple[Any, str]) -> None:
    config = EngineConfig.load({"model": checkpoint[1], "kv_cache_memory": 1 << 20}, env={})
    config.pool.block_size = True  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="block_size must be an integer"):
        Engine(config)


def test_sizes_take_units_from_every_source() -> None:
    cfg = EngineConfig.load({"host_capacity": "64MiB"}, env={"KVTIER_DISK_CAPACITY": "2GiB"})
    assert cfg.tiers.host_capacity == 64 << 20 and cfg.tiers.disk_capacity == 2 << 30
    assert EngineConfig.load({"kv_cache_memory": "1.5GiB"}, env={}).pool.kv_cache_memory == 3 << 29
    assert EngineConfig.load({"write_queue_bytes": "2GB"}, env={}).tiers.write_queue_bytes == 2 * 10**9


def test_env_strings_still_read() -> None:
    cfg = EngineConfig.load(env={"KVTIER_BLOCK_SIZE": "32", "KVTIER_KV_CACHE_MEMORY": "1e6"})
    assert cfg.pool.block_size == 32 and cfg.pool.kv_cache_memory == 1_000_000
    assert EngineConfig.load({"kv_cache_memory": 2.0**20}, env={}).pool.kv_cache_memory == 1 << 20
    with pytest.raises(ConfigError, match="block_size must be an integer"):
        EngineConfig.load(env={"KVTIER_BLOCK_SIZE": "1.5"})


# -- checkpoints -----------------------------------------------------------------------------------


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _copy_checkpoint(hf: Any, folder: Path, **kwargs: Any) -> Path:
    save_model(hf, folder, **kwargs)
    return folder


def _broken_checkpoints(hf: Any, root: Path) -> dict[str, tuple[Path, type[Exception], tuple[str, ...]]]:
    cases: dict[str, tuple[Path, type[Exception], tuple[str, ...]]] = {}
    f = _copy_checkpoint(hf, root / "zero-heads")
    _edit_config(f, num_attention_heads=0)
    cases["zero-heads"] = (f, ModelConfigError, ("config.json", "num_attention_heads", "positive", "0"))
    f = _copy_checkpoint(hf, root / "negative-layers")
    _edit_config(f, num_hidden_layers=-2)
    cases["negative-layers"] = (f, ModelConfigError, ("config.json", "num_hidden_layers", "-2"))
    f = _copy_checkpoint(hf, root / "uneven-heads")
    _edit_config(f, num_key_value_heads=3)
    cases["uneven-heads"] = (f, ModelConfigError, ("multiple of num_key_value_heads (3)",))
    f = _copy_checkpoint(hf, root / "bad-index", max_shard_size="60KB")
    (f / "model.safetensors.index.json").write_text("{ not json")
    cases["bad-index"] = (f, CheckpointError, ("model.safetensors.index.json",))
    f = _copy_checkpoint(hf, root / "index-no-map", max_shard_size="60KB")
    (f / "model.safetensors.index.json").write_text("{}")
    cases["index-no-map"] = (f, CheckpointError, ("model.safetensors.index.json", "weight_map"))
    f = _copy_checkpoint(hf, root / "index-escapes", max_shard_size="60KB")
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    cases["index-escapes"] = (f, CheckpointError, ("outside",))
    f = _copy_checkpoint(hf, root / "truncated")
    weights = f / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    cases["truncated"] = (f, CheckpointError, (str(weights),))
    f = _copy_checkpoint(hf, root / "garbage-header")
    (f / "model.safetensors").write_bytes(b"\xff" * 64)
    cases["garbage-header"] = (f, CheckpointError, (str(f / "model.safetensors"),))
    f = _copy_checkpoint(hf, root / "wrong-shape")
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, str(f / "model.safetensors"))
    cases["wrong-shape"] = (f, ValueError, (str(f),))
    return cases


@pytest.fixture(scope="module")
def broken(
    checkpoint: tuple[Any, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, type[Exception], tuple[str, ...]]]:
    return _broken_checkpoints(checkpoint[0], tmp_path_factory.mktemp("broken"))


BROKEN = [
    "zero-heads",
    "negative-layers",
    "uneven-heads",
    "bad-index",
    "index-no-map",
    "index-escapes",
    "truncated",
    "garbage-header",
    "wrong-shape",
]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_checkpoints_name_the_file(broken: dict[str, Any], case: str) -> None:
    folder, error, fragments = broken[case]
    with pytest.raises(error) as info:
        LLM(str(folder), kv_cache_memory=1 << 20, tiers="none")
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("case", ["zero-heads", "truncated", "bad-index"])
def test_cli_run_prints_one_line_and_exits_2(broken: dict[str, Any], case: str) -> None:
    folder = broken[case][0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtier.cli",
            "run",
            "--prompt",
            "hi",
            "--model",
            str(folder),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(folder) in lines[0]
