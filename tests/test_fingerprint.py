"""The model fingerprint covers every weight byte, and a restart does not re-read the weights.

The old fingerprint hashed 64 windows of 64 KiB per file: an edit between them kept the fingerprint,
and the edited model served the old model's KV. Here one byte is flipped at an offset outside every
such window, and the edited model must get a new fingerprint and load none of the old KV.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.model.fingerprint import DIGEST_CACHE_NAME, weight_identity
from kvtier.model.loader import load_model
from tests.models import make_hf_model, random_prompt, save_model

OLD_WINDOWS, OLD_WINDOW_BYTES = 64, 1 << 16  # what the sampled fingerprint read of each file
CPU = torch.device("cpu")


def _gap_offset(size: int) -> int:
    """An offset inside the tensor data that none of the old sampled windows covered."""
    starts = [size * i // OLD_WINDOWS for i in range(OLD_WINDOWS)]
    for s in starts[1:-1]:
        offset = s + OLD_WINDOW_BYTES + 16
        if all(not st <= offset < st + OLD_WINDOW_BYTES for st in starts):
            return offset
    raise AssertionError("the file is too small to have gaps between the sampled windows")


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))  # the low mantissa bit of one float32 weight


@pytest.fixture()
def big(tmp_path: Path) -> tuple[Any, Path]:
    """A 10 MB checkpoint (a 20,000-token vocabulary), large enough for gaps between windows."""
    hf = make_hf_model("llama", seed=31, vocab_size=20000)
    return hf, Path(save_model(hf, tmp_path / "model"))


def _llm(folder: Path, disk: Path) -> LLM:
    return LLM(str(folder), kv_cache_memory=4 << 20, block_size=16, tiers="disk", disk_path=str(disk))


def test_one_edited_byte_outside_the_old_windows_changes_the_fingerprint_and_misses(
    big: tuple[Any, Path], tmp_path: Path
) -> None:
    _, folder = big
    prompt = random_prompt(64, seed=5, vocab=20000)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with _llm(folder, tmp_path / "disk") as llm:
        before = llm.engine.fingerprint
        llm.generate([prompt], params)
    with _llm(folder, tmp_path / "disk") as again:  # the same model: its KV is found
        assert again.engine.fingerprint == before
        assert again.generate([prompt], params)[0].num_cached_tokens == 48  # the last block is computed
    weights = folder / "model.safetensors"
    _flip_byte(weights, _gap_offset(weights.stat().st_size))
    with _llm(folder, tmp_path / "disk") as edited:
        assert edited.engine.fingerprint != before
        out = edited.generate([prompt], params)[0]
        assert out.num_cached_tokens == 0
        assert out.metrics["num_loaded_tokens"] == 0


def test_a_restart_reads_the_remembered_digest_not_the_weights(big: tuple[Any, Path]) -> None:
    _, folder = big
    files = [folder / "model.safetensors"]
    first = weight_identity(files)
    cache = folder / DIGEST_CACHE_NAME
    data = json.loads(cache.read_text())
    entry = data["files"]["model.safetensors"]
    assert entry["size"] == files[0].stat().st_size
    # Forge the remembered digest (stamps kept): a restart that trusts it never read the weights.
    entry["blake2b"] = "00" * 32
    cache.write_text(json.dumps(data))
    assert weight_identity(files) != first
    # A damaged cache file is not trusted: the digests are recomputed, and written again.
    cache.write_text("{ broken")
    assert weight_identity(files) == first
    assert json.loads(cache.read_text())["files"]["model.safetensors"]["blake2b"] != "00" * 32


def test_an_edit_that_restores_mtime_is_still_seen(big: tuple[Any, Path]) -> None:
    _, folder = big
    weights = folder / "model.safetensors"
    first = load_model(str(folder), CPU).fingerprint
    st = weights.stat()
    _flip_byte(weights, _gap_offset(st.st_size))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before; ctime moved
    assert weights.stat().st_mtime_ns == st.st_mtime_ns
    assert load_model(str(folder), CPU).fingerprint != first


def test_a_folder_that_cannot_hold_the_cache_uses_the_kvtier_cache_dir(
    big: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, folder = big
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # Root can write into a chmod'ed folder, so block the one path instead: a directory where the
    # cache file would go makes the write fail as a read-only folder does.
    (folder / DIGEST_CACHE_NAME).mkdir()
    first = load_model(str(folder), CPU).fingerprint
    remembered = list((tmp_path / "xdg" / "kvtier" / "weight-digests").glob("*.json"))
    assert len(remembered) == 1
    assert "model.safetensors" in json.loads(remembered[0].read_text())["files"]
    assert load_model(str(folder), CPU).fingerprint == first
    assert not list(folder.glob("*.tmp"))


def test_sharded_checkpoints_cover_every_shard(tmp_path: Path) -> None:
    hf = make_hf_model("llama", seed=32)
    folder = Path(save_model(hf, tmp_path / "sharded", max_shard_size="60KB"))
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 2
    first = load_model(str(folder), CPU).fingerprint
    _flip_byte(shards[-1], shards[-1].stat().st_size - 3)  # the last byte region of the last shard
    assert load_model(str(folder), CPU).fingerprint != first


def test_synthetic_fingerprint_names_what_draws_the_weights() -> None:
    a = load_model("synthetic:tiny", CPU, seed=0)
    b = load_model("synthetic:tiny", CPU, seed=0)
    c = load_model("synthetic:tiny", CPU, seed=1)
    d = load_model("synthetic:tiny", CPU, torch.float16, seed=0)
    assert a.fingerprint == b.fingerprint
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)  # deterministic from name, seed, dtype and the generator
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3
