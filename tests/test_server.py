"""`kvtier serve` through the official openai client against a real server process on loopback."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvtier.model.bytetok import ByteTokenizer
from tests.kvtier_servers import KvtierServer

MODEL = "synthetic:tiny"
MAX_MODEL_LEN = 1024
KEYS = {"key-a": "alpha", "key-b": "beta"}


@pytest.fixture(scope="module", params=["default", "engine-thread"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KvtierServer]:
    """Every test against the default layout (the engine in its own process) and the engine thread."""
    keys = Path(tmp_path_factory.mktemp("keys")) / "keys.yaml"
    keys.write_text("".join(f"{k}: {t}\n" for k, t in KEYS.items()))
    mode = () if request.param == "default" else ("--engine-process", "off")
    srv = KvtierServer(
        "--model", MODEL, "--kv-cache-memory", str(8 << 20), "--max-model-len", str(MAX_MODEL_LEN),
        "--api-keys-file", str(keys), *mode,
    )  # fmt: skip
    yield srv
    assert srv.stop() == 0, srv.output()


def client(server: KvtierServer, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def system_prompt(tag: str, words: int = 30) -> str:
    return f"[{tag}] " + " ".join(f"rule{i} is to be kind." for i in range(words))


def chat(tag: str, user: str = "hello") -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt(tag)}, {"role": "user", "content": user}]


GREEDY: dict[str, Any] = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def test_completions_stream_matches_non_stream(server: KvtierServer) -> None:
    c = client(server)
    full = c.completions.create(model=MODEL, prompt="The tiered cache", **GREEDY)
    assert full.object == "text_completion" and len(full.choices) == 1
    assert full.choices[0].finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == 12
    assert full.usage.prompt_tokens == len("The tiered cache")  # one byte-level token per character
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt="The tiered cache",
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_stream_matches_non_stream(server: KvtierServer) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "stream me"}]
    full = c.chat.completions.create(model=MODEL, messages=messages, **GREEDY)  # type: ignore[arg-type]
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY)  # type: ignore[arg-type]
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_sends_what_is_ready_in_one_write(server: KvtierServer) -> None:
    """Each HTTP chunk of the answer is one write of the server: a chat's first write carries the role
    and the first token, its last the finish, the usage and [DONE] (fewer writes: less time waiting for
    the interpreter lock); the events themselves are what the openai client parses above."""
    import asyncio

    from kvtier.bench.sse_client import SSEClient

    async def writes() -> list[bytes]:
        c = SSEClient(server.url, {"Authorization": "Bearer key-a"})
        body = {"model": MODEL, "messages": [{"role": "user", "content": "one write"}], "stream": True,
                "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": 5,
                "ignore_eos": True}  # fmt: skip
        try:
            async with c.stream("POST", "/v1/chat/completions", body) as r:
                assert r.status == 200
                return [chunk async for chunk in r._chunks()]
        finally:
            await c.aclose()

    chunks = asyncio.run(writes())
    events = [
        [json.loads(e[6:]) if e != b"data: [DONE]" else None for e in w.split(b"\n\n") if e] for w in chunks
    ]
    first, last = events[0], events[-1]
    assert first[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # the first token rides with the role when it made text (it may end inside a character); more
    # tokens too when they were ready before the first write (a tiny model outruns the handler)
    if len(first) >= 2:
        assert first[1]["choices"][0]["delta"]["content"]
    assert last[-1] is None and last[-2]["usage"]["completion_tokens"] == 5
    assert last[-3]["choices"][0]["finish_reason"] == "length"
    # one write per token at most, the role riding with the first: 8 writes (role, 5, usage, [DONE]) before
    assert len(chunks) <= 6


def test_n_and_seeds(server: KvtierServer) -> None:
    c = client(server)
    args: dict[str, Any] = dict(model=MODEL, prompt="sample me", max_tokens=10, temperature=1.0, n=3)
    first = c.completions.create(seed=7, **args)
    again = c.completions.create(seed=7, **args)
    other = c.completions.create(seed=8, **args)
    assert sorted(ch.index for ch in first.choices) == [0, 1, 2]
    texts = [ch.text for ch in sorted(first.choices, key=lambda ch: ch.index)]
    assert texts == [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)]
    assert texts != [ch.text for ch in sorted(other.choices, key=lambda ch: ch.index)]
    assert len(set(texts)) > 1  # each completion draws its own tokens
    assert first.usage is not None and first.usage.completion_tokens == 30
    streamed = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "n streams"}],
        n=2,
        stream=True,
        seed=1,
        max_tokens=6,
    )
    finished = {ch.choices[0].index for ch in streamed if ch.choices and ch.choices[0].finish_reason}
    assert finished == {0, 1}


def test_a_list_of_prompts_streams_interleaved(server: KvtierServer) -> None:
    """Prompts of one request run in one batch; streamed, their chunks come as they are made (a later
    prompt's first token does not wait for the first prompt's last), with the texts of one answer."""
    c = client(server)
    # long enough that the handler reads while they are made (what was made already comes in order)
    many = {**GREEDY, "max_tokens": 400}
    args: dict[str, Any] = dict(model=MODEL, prompt=["first prompt", "second prompt"], **many)
    whole = c.completions.create(**args)
    chunks = [ch for ch in c.completions.create(stream=True, **args) if ch.choices]
    order = [ch.choices[0].index for ch in chunks]
    assert set(order) == {0, 1} and order.index(1) < len(order) - 1 - order[::-1].index(0), order
    for i in (0, 1):
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == i)
        assert text == next(ch.text for ch in whole.choices if ch.index == i)


def test_stop_strings(server: KvtierServer) -> None:
    c = client(server)
    args: dict[str, Any] = dict(model=MODEL, prompt="stop here", temperature=0, max_tokens=40)
    text = c.completions.create(**args, extra_body={"ignore_eos": True}).choices[0].text
    stop = next(ch for ch in text[2:] if ch.isascii() and ch.isprintable())  # a character it does produce
    expected = text[: text.index(stop)]
    for stream in (False, True):
        out = c.completions.create(**args, stop=[stop], stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(out)  # type: ignore[arg-type]
            got = "".join(ch.choices[0].text for ch in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            got, reason = out.choices[0].text, out.choices[0].finish_reason  # type: ignore[union-attr]
        assert (got, reason) == (expected, "stop")


def test_logprobs(server: KvtierServer) -> None:
    c = client(server)
    out = c.completions.create(model=MODEL, prompt="logprobs", logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3  # token texts may repeat ('\ufffd'): the dict merges them
        assert chosen == pytest.approx(max(top.values()))  # greedy took the most likely token
    # streamed, each chunk's text_offset goes on from the chunk before: the same as in one answer
    assert lp.text_offset is not None and lp.tokens is not None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    chunks = list(c.completions.create(model=MODEL, prompt="logprobs", logprobs=3, stream=True, **GREEDY))
    offsets = [
        o
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for o in ch.choices[0].logprobs.text_offset or []
    ]
    assert offsets == lp.text_offset
    msgs = [{"role": "user", "content": "chat logprobs"}]
    out2 = c.chat.completions.create(model=MODEL, messages=msgs, logprobs=True, top_logprobs=2, **GREEDY)  # type: ignore[arg-type]
    content = out2.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 12
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_cached_system_prompt_gives_the_same_text(server: KvtierServer) -> None:
    c = client(server)
    first = c.chat.completions.create(model=MODEL, messages=chat("cache"), **GREEDY)  # type: ignore[arg-type]
    second = c.chat.completions.create(model=MODEL, messages=chat("cache"), **GREEDY)  # type: ignore[arg-type]
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens >= second.usage.prompt_tokens - 16  # all but the last partial block
    assert second.choices[0].message.content == first.choices[0].message.content
    other_user = c.chat.completions.create(model=MODEL, messages=chat("cache", "bye"), **GREEDY)  # type: ignore[arg-type]
    assert other_user.usage.prompt_tokens_details.cached_tokens > 0  # type: ignore[union-attr]


def cached(c: openai.OpenAI, tag: str, **extra: Any) -> int:
    out = c.chat.completions.create(model=MODEL, messages=chat(tag), max_tokens=2, extra_body=extra)  # type: ignore[arg-type]
    return out.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr,return-value]


def test_tenants_never_share_cached_blocks(server: KvtierServer) -> None:
    a, b = client(server, "key-a"), client(server, "key-b")
    assert cached(a, "tenants") == 0
    assert cached(a, "tenants") > 0  # tenant A hits its own blocks
    assert cached(b, "tenants") == 0  # tenant B does not hit A's
    assert cached(b, "tenants") > 0
    assert cached(a, "tenants", cache_salt="private") == 0  # a request's salt narrows A's space
    assert cached(a, "tenants", cache_salt="private") > 0


def test_tenants_never_share_blocks_through_the_host_tier(tmp_path: Path) -> None:
    """The tenant's salt holds below the device pool too: with a pool too small to keep tenant A's
    prompt, A's second call loads it from the host tier, and tenant B's same prompt loads nothing."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("".join(f"{k}: {t}\n" for k, t in KEYS.items()))
    srv = KvtierServer(
        "--model", MODEL, "--kv-cache-memory", str(1 << 20), "--max-model-len", str(MAX_MODEL_LEN),
        "--api-keys-file", str(keys), env={"KVTIER_TIERS": "host"},
    )  # fmt: skip
    try:
        a, b = client(srv, "key-a"), client(srv, "key-b")
        assert cached(a, "below") == 0
        for i in range(4):  # other prompts push A's blocks out of the 128-block pool, to the host
            cached(a, f"flood {i}")
        loads = srv.metrics()['kvtier:tier_blocks_loaded_total{tier="host"}']
        assert cached(b, "below") == 0  # B's same prompt: nothing of A's, from any tier
        assert srv.metrics()['kvtier:tier_blocks_loaded_total{tier="host"}'] == loads
        assert cached(a, "below") > 0  # A's own blocks, loaded back from the host tier
        assert srv.metrics()['kvtier:tier_blocks_loaded_total{tier="host"}'] > loads
    finally:
        assert srv.stop() == 0, srv.output()


def post(server: KvtierServer, path: str, body: Any, key: str | None = "key-a") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"]
    return err  # type: ignore[no-any-return]


def test_errors_name_the_problem(server: KvtierServer) -> None:
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert "missing API key" in error_of(post(server, "/v1/completions", ok, key=None), 401)["message"]
    assert "invalid API key" in error_of(post(server, "/v1/completions", ok, key="key-c"), 401)["message"]
    err = error_of(post(server, "/v1/completions", {**ok, "model": "gpt-9"}), 404)
    assert "gpt-9" in err["message"] and err["param"] == "model"
    err = error_of(post(server, "/v1/chat/completions", {"model": MODEL}), 422)
    assert "messages" in err["message"] and "Field required" in err["message"]
    err = error_of(post(server, "/v1/completions", {**ok, "max_tokens": "many"}), 422)
    assert "max_tokens" in err["message"]
    cases = [
        ({"temperature": -1}, "temperature", "temperature must be >= 0"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"n": 0}, "n", "n must be >= 1 and <= 256"),
        ({"stop": ["x"] * 65}, "stop", "at most 64"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids", "outside the vocabulary"),
        ({"logprobs": 21}, "logprobs", "[0, 20]"),
        ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
        ({"max_tokens": MAX_MODEL_LEN}, "max_tokens", f"context of {MAX_MODEL_LEN} tokens"),
        ({"prompt": "x" * MAX_MODEL_LEN}, "prompt", f"context is {MAX_MODEL_LEN} tokens"),
        ({"prompt": [5, 999]}, "prompt", "outside the vocabulary"),
        ({"echo": True}, "echo", "not supported"),
    ]
    for change, param, text in cases:
        err = error_of(post(server, "/v1/completions", {**ok, **change}), 400)
        assert err["param"] == param and text in err["message"], (change, err)
    chat_body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}
    err = error_of(
        post(server, "/v1/chat/completions", {**chat_body, "logprobs": True, "top_logprobs": 30}), 400
    )
    assert "[0, 20]" in err["message"]
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        client(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=MAX_MODEL_LEN
        )
    hi = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    err = error_of(post(server, "/v1/chat/completions", {**hi, "max_completion_tokens": 0}), 400)
    assert err["param"] == "max_completion_tokens" and "max_completion_tokens must be >= 1" in err["message"]
    for empty in ("", [[]]):
        err = error_of(post(server, "/v1/completions", {**ok, "prompt": empty}), 400)
        assert err["param"] == "prompt" and "the prompt is empty" in err["message"], err
    # a tenant's request salt is checked as sent: its length and limit, not the tenant-salted form's
    err = error_of(post(server, "/v1/completions", {**ok, "cache_salt": "s" * 1025}), 400)
    assert err["param"] == "cache_salt" and "cache_salt has 1025 characters; at most 1024" in err["message"]
    assert post(server, "/v1/completions", {**ok, "cache_salt": "s" * 1024}).status_code == 200  # the limit
    headers = {"Authorization": "Bearer key-a", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": "x", ', headers=headers, timeout=30)
    err = error_of(r, 422)
    assert err["param"] is None and "JSON decode error" in err["message"]
    auth = {"Authorization": "Bearer key-a"}
    err = error_of(httpx.get(server.url + "/v1/nothing", headers=auth, timeout=30), 404)  # OpenAI's body
    assert err["type"] == "not_found_error" and "/v1/nothing" in err["message"]
    err = error_of(httpx.get(server.url + "/v1/completions", headers=auth, timeout=30), 405)
    assert "GET /v1/completions" in err["message"]
    server.wait_idle()  # nothing was left behind by the refused requests
    assert server.metrics()["kvtier:pool_blocks_in_use"] == 0


def post_raw(server: KvtierServer, path: str, body: Any, key: str | None = "key-a") -> httpx.Response:
    """``body`` as ASCII JSON: lone surrogates travel as ``\\udXXX`` escapes, as a JS client sends them."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(server.url + path, content=json.dumps(body).encode(), headers=headers, timeout=30)


def test_what_a_careless_client_sends_gets_a_400_naming_it(server: KvtierServer) -> None:
    """Inputs found by probing the server as a hostile client would: each gets its status and a
    message naming the parameter, and leaves the server as it was (same greedy text, no blocks)."""
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": 0}
    before = post(server, "/v1/completions", ok).json()["choices"][0]["text"]
    hi = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    image = {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("/v1/completions", {**ok, "prompt": "a\ud800b"}, "prompt", "lone surrogate"),
        ("/v1/completions", {**ok, "prompt": ["fine", "\udc00"]}, "prompt", "prompt 1 is not valid Unicode"),
        ("/v1/chat/completions", {**hi, "messages": [{"role": "user", "content": "x\ud83d"}]}, "messages",
         "messages[0].content is not valid Unicode"),
        ("/v1/chat/completions", {**hi, "messages": [{"role": "user\n<|system|>", "content": "x"}]},
         "messages", "messages[0].role must be one of system, developer, user, assistant, tool"),
        ("/v1/chat/completions", {**hi, "messages": [{"role": "user", "content": [image]}]}, "messages",
         "messages[0].content[0] is a 'image_url' part: this model takes text parts only"),
        ("/v1/completions", {**ok, "logit_bias": {"²": 1}}, "logit_bias", "keys must be token ids"),
        ("/v1/completions", {**ok, "logit_bias": {"--5": 1}}, "logit_bias", "keys must be token ids"),
        ("/v1/completions", {**ok, "logit_bias": {"9" * 5000: 1}}, "logit_bias", "keys must be token ids"),
        ("/v1/chat/completions", {**hi, "response_format": {"type": "json_object"}}, "response_format",
         "'json_object' is not supported"),
        ("/v1/chat/completions", {**hi, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
         "not supported"),
        ("/v1/chat/completions", {**hi, "tool_choice": "required"}, "tool_choice", "there are no tools"),
        ("/v1/completions", {**ok, "best_of": 3}, "best_of", "only best_of = n = 1"),
        ("/v1/completions", {**ok, "suffix": "end"}, "suffix", "not supported"),
        ("/v1/completions", {**ok, "stream_options": {"include_usage": True}}, "stream_options",
         "only allowed with stream=true"),
        ("/v1/completions", {**ok, "prompt": ["a"] * 300, "n": 4}, "prompt",
         "1200 sequences (n=4 x 300 prompts): over this server's limit of 1024 requests in flight"),
        ("/tokenize", {"prompt": "\ud800"}, "prompt", "lone surrogate"),
    ]  # fmt: skip
    for path, body, param, text in cases:
        err = error_of(post_raw(server, path, body), 400)
        assert err["param"] == param and text in err["message"], (body, err)
    assert post(server, "/v1/completions", {**ok, "best_of": 1}).status_code == 200  # = n: nothing to ignore
    assert (
        post(server, "/v1/chat/completions", {**hi, "response_format": {"type": "text"}}).status_code == 200
    )
    for change in (
        {"max_tokens": "5"},
        {"max_tokens": True},
        {"temperature": True},
        {"n": "2"},
        {"stream": "yes"},
    ):
        err = error_of(post(server, "/v1/completions", {**ok, **change}), 422)  # no lax coercion
        assert err["param"] == next(iter(change)), (change, err)
    error_of(post(server, "/v1/completions", {"model": MODEL}, key=None), 401)  # the key before the body
    no_key = {"Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/completions", content=b"{garbage", headers=no_key, timeout=30)
    assert "missing API key" in error_of(r, 401)["message"]  # not the 422 of a parsed body
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:  # a body never sent
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 401")  # answered at once, not after a read
    assert client(server).models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-9")
    assert post(server, "/v1/completions", ok).json()["choices"][0]["text"] == before
    server.wait_idle()
    assert server.metrics()["kvtier:pool_blocks_in_use"] == 0


def test_bodies_and_prompts_too_large_to_fit_are_refused_before_they_are_read() -> None:
    """A body over ``--max-request-bytes`` gets 413 (by its Content-Length, or chunked, once read);
    a text prompt longer than any that fits the context gets 400 before it is tokenized; a long
    one that may fit is tokenized on the tokenizing thread and answered as any other."""
    srv = KvtierServer(
        "--model", MODEL, "--kv-cache-memory", str(4 << 20), "--max-model-len", "2048",
        "--max-request-bytes", "300000",
    )  # fmt: skip
    try:
        headers = {"Content-Type": "application/json"}
        big = json.dumps({"model": MODEL, "prompt": "x" * 400_000}).encode()
        for content in (big, iter([big[:1000], big[1000:]])):  # the second is sent chunked
            r = httpx.post(srv.url + "/v1/completions", content=content, headers=headers, timeout=30)
            err = error_of(r, 413)
            assert "over this server's limit of 300000 bytes (--max-request-bytes)" in err["message"]
        limit = 4 * 2048 * max(len(k) for k in ByteTokenizer().get_vocab())
        err = error_of(post(srv, "/v1/completions", {"model": MODEL, "prompt": "x" * (limit + 1)}), 400)
        assert err["param"] == "prompt" and f"{limit + 1} characters" in err["message"], err
        long_text = "ab" * 51_000  # over LONG_PROMPT_CHARS (tokenized on the thread), under the limit
        assert post(srv, "/tokenize", {"prompt": long_text}).json()["count"] >= 102_000
        err = error_of(post(srv, "/v1/completions", {"model": MODEL, "prompt": long_text}), 400)
        assert err["param"] == "prompt" and "context is 2048 tokens" in err["message"], err
        assert (
            post(srv, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200
        )
    finally:
        assert srv.stop() == 0


def test_disconnect_mid_stream_frees_blocks(server: KvtierServer) -> None:
    body = {"model": MODEL, "prompt": system_prompt("disconnect"), "max_tokens": 300, "stream": True,
            "ignore_eos": True}  # fmt: skip
    headers = {"Authorization": "Bearer key-a"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got: list[dict[str, Any]] = []
        for line in lines:
            if line.startswith("data: {"):
                got.append(json.loads(line[6:]))
            if len(got) >= 3:
                break
        assert server.metrics()["kvtier:num_requests_running"] == 1  # still generating when we leave
    m = server.wait_idle()
    assert m["kvtier:pool_blocks_in_use"] == 0 and m["kvtier:num_requests_running"] == 0
    assert m["kvtier:pool_blocks_available"] == m["kvtier:pool_blocks"]  # every block free or evictable


def test_a_client_that_gives_up_waiting_frees_the_blocks(server: KvtierServer) -> None:
    """Not streaming: a client that times out and closes its connection aborts the request."""
    asked = MAX_MODEL_LEN - 16
    body = {"model": MODEL, "prompt": "gives up", "max_tokens": asked, "ignore_eos": True}
    headers = {"Authorization": "Bearer key-a"}
    before = server.metrics()["kvtier:generated_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=0.3)
    m = server.wait_idle()
    assert m["kvtier:generated_tokens_total"] - before < asked  # stopped, not run to its end
    assert "Exception in ASGI application" not in server.output()  # a quiet end, not a traceback
    assert m["kvtier:pool_blocks_in_use"] == 0 and m["kvtier:num_requests_running"] == 0
    assert m["kvtier:pool_blocks_available"] == m["kvtier:pool_blocks"]


def test_side_routes(server: KvtierServer) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    toks = post(server, "/tokenize", {"prompt": "abc"}).json()
    assert toks["count"] == 3 and toks["max_model_len"] == MAX_MODEL_LEN
    assert post(server, "/detokenize", {"tokens": toks["tokens"]}).json()["prompt"] == "abc"
    chat_toks = post(server, "/tokenize", {"messages": [{"role": "user", "content": "abc"}]}).json()
    assert chat_toks["count"] > toks["count"]
    assert error_of(post(server, "/detokenize", {"tokens": [10**6]}), 400)["param"] == "tokens"
    text = httpx.get(server.url + "/metrics").text
    for name in ("kvtier:time_to_first_token_seconds_bucket", "kvtier:time_per_output_token_seconds_count",
                 "kvtier:e2e_request_latency_seconds_sum", "kvtier:prefix_cache_hits_total",
                 "kvtier:kv_cache_usage_perc", "kvtier:num_preemptions_total"):  # fmt: skip
        assert name in text
    samples = [line for line in text.splitlines() if line.startswith("kvtier:")]
    assert samples and all(f'model_name="{MODEL}"' in line for line in samples)  # as vLLM's are labelled


def test_the_served_model_name_is_the_one_clients_and_metrics_see() -> None:
    """``--served-model-name``: /v1/models lists it, requests name it, other names are refused,
    and every metric sample is labelled with it (the engine process is told it too)."""
    srv = KvtierServer(
        "--model", MODEL, "--kv-cache-memory", str(4 << 20), "--served-model-name", "team/chat-v2"
    )
    try:
        openai_client = client(srv)
        assert [m.id for m in openai_client.models.list().data] == ["team/chat-v2"]
        done = openai_client.completions.create(model="team/chat-v2", prompt="abc", max_tokens=2)
        assert done.model == "team/chat-v2" and done.usage is not None and done.usage.completion_tokens == 2
        assert error_of(post(srv, "/v1/completions", {"model": MODEL, "prompt": "abc"}), 404)
        samples = [
            line for line in httpx.get(srv.url + "/metrics").text.splitlines() if line.startswith("kvtier:")
        ]
        assert samples and all('model_name="team/chat-v2"' in line for line in samples)
    finally:
        assert srv.stop() == 0


def test_debug_stages_is_off_by_default(server: KvtierServer) -> None:
    auth = {"Authorization": "Bearer key-a"}
    assert (
        httpx.get(server.url + "/debug/stages", headers=auth, timeout=10).status_code == 404
    )  # --trace-stages only


def test_step_handoff_out_of_range_is_refused_before_the_model_loads() -> None:
    from typer.testing import CliRunner

    from kvtier.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", "synthetic:tiny", "--step-handoff", "-1"])
    assert isinstance(result.exception, ValueError)
    assert "step_handoff must be between 0 and 10" in str(result.exception) and "-1" in str(result.exception)


def test_a_cpu_server_leaves_a_core_to_its_event_loop(server: KvtierServer) -> None:
    import os

    from kvtier.server.serve import torch_threads_for_server

    assert torch_threads_for_server("cpu", {}, 2) == 1
    assert torch_threads_for_server("cpu", {}, 16) == 15
    assert torch_threads_for_server("cpu", {}, 1) == 1 and torch_threads_for_server("cpu", {}, None) == 1
    assert torch_threads_for_server("cpu", {"OMP_NUM_THREADS": "2"}, 8) is None  # the user's choice wins
    assert torch_threads_for_server("cuda", {}, 16) is None
    expected = torch_threads_for_server("cpu", os.environ, os.cpu_count())
    threads = expected if expected is not None else "default"
    where = "engine thread" if "--engine-process" in server.proc.args else "engine process "  # type: ignore[operator]
    assert f"KV blocks, {threads} torch threads, {where}" in server.output()
