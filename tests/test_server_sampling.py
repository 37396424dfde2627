"""Sampling parameters through the official openai client against a real ``kvtier serve`` on loopback.

Covers, on /v1/completions and /v1/chat/completions: top_k=1, a tiny top_p and min_p=1 at temperature
1 give the greedy text; repetition, frequency and presence penalties remove the repeats
of a greedy text that repeats; ``user`` is accepted and changes nothing; chat seeds; chat stop
strings; streamed logprobs equal the non-streamed ones; max_completion_tokens; chat usage chunks.

synthetic:tiny has a byte-level tokenizer (one token per byte) and near-uniform logits (every token
about -5.3), so a sampled text differs from the greedy one and any penalty changes the greedy choice;
it also means min_p=0.999 may keep a near-tie (seen with an unseeded draw), hence min_p=1.
A byte >= 0x80 that is not part of a whole character shows as U+FFFD, so repeats are counted over
the other characters, each of which stands for one byte sequence (its tokens).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.kvtier_servers import KvtierServer

MODEL = "synthetic:tiny"
EOS = {"ignore_eos": True}
GREEDY: dict[str, Any] = dict(temperature=0, max_tokens=24, extra_body=EOS)
SAMPLED: dict[str, Any] = dict(temperature=1.0, max_tokens=24, seed=11)
PROMPT = "The tiered cache"
MESSAGES: list[Any] = [{"role": "user", "content": "sample me"}]


@pytest.fixture(scope="module")
def c() -> Iterator[openai.OpenAI]:
    """One server; conftest turns the result cache off, so every request runs the sampler."""
    srv = KvtierServer("--model", MODEL, "--kv-cache-memory", str(8 << 20), "--max-model-len", "1024")
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert srv.stop() == 0, srv.output()


def text(c: openai.OpenAI, chat: bool, prompt: str | None = None, **kw: Any) -> str:
    if chat:
        msgs: list[Any] = [{"role": "user", "content": prompt}] if prompt else MESSAGES
        return c.chat.completions.create(model=MODEL, messages=msgs, **kw).choices[0].message.content or ""
    return c.completions.create(model=MODEL, prompt=prompt or PROMPT, **kw).choices[0].text


def repeats(s: str) -> int:
    chars = [ch for ch in s if ch != "\ufffd"]
    return len(chars) - len(set(chars))


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("extra", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}], ids=str)
def test_a_filter_that_keeps_one_token_samples_the_greedy_text(
    c: openai.OpenAI, chat: bool, extra: dict[str, Any]
) -> None:
    greedy = text(c, chat, **GREEDY)
    assert text(c, chat, **SAMPLED, extra_body=EOS) != greedy  # the seed alone does not give it
    top_p, body = extra.get("top_p", openai.NOT_GIVEN), {k: v for k, v in extra.items() if k != "top_p"}
    for seed in (11, 12):
        assert text(c, chat, **{**SAMPLED, "seed": seed}, top_p=top_p, extra_body={**EOS, **body}) == greedy


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize(
    "penalty",
    [
        {"extra_body": {**EOS, "repetition_penalty": 10.0}},
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
    ],
    ids=["repetition", "frequency", "presence"],
)
def test_penalties_remove_the_repeats_of_greedy(
    c: openai.OpenAI, chat: bool, penalty: dict[str, Any]
) -> None:
    kw: dict[str, Any] = dict(temperature=0, max_tokens=40, extra_body=EOS)
    greedy = text(c, chat, "hello", **kw)  # '\x10\ufffd~)~)~)~\ufffd)~...' on completions
    assert text(c, chat, "hello", **kw) == greedy and repeats(greedy) >= 6, repr(greedy)
    penalised = text(c, chat, "hello", **{**kw, **penalty})
    assert repeats(penalised) < repeats(greedy), (greedy, penalised)
    assert repeats(penalised) <= 1, repr(penalised)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_logit_bias_forces_and_forbids_tokens(c: openai.OpenAI, chat: bool) -> None:
    kw: dict[str, Any] = dict(temperature=0, max_tokens=12, extra_body=EOS)
    (z,) = tokenize(c, "Z")
    assert text(c, chat, **kw, logit_bias={str(z): 100}) == "Z" * 12
    assert (
        text(c, chat, **{**SAMPLED, "max_tokens": 12}, logit_bias={str(z): 100}, extra_body=EOS) == "Z" * 12
    )
    (y,) = tokenize(c, "Y")
    assert text(c, chat, **kw, logit_bias={str(z): 100, str(y): 100.0 - 1e-3}) == "Z" * 12
    assert text(c, chat, **kw, logit_bias={str(z): -100, str(y): 99}) == "Y" * 12
    for bias, message in (
        ({"x": 1}, "logit_bias keys must be token ids, got 'x'"),
        ({"100000": 1}, "logit_bias token id int 100000 is outside the vocabulary"),
        ({str(z): 101}, "logit_bias values must be in [-100, 100]; got 101"),
    ):
        with pytest.raises(openai.BadRequestError, match=re.escape(message)) as raised:
            text(c, chat, **kw, logit_bias=bias)
        assert raised.value.param == "logit_bias"  # type: ignore[attr-defined]


def tokenize(c: openai.OpenAI, s: str) -> list[int]:
    url = str(c.base_url).removesuffix("/v1/")
    ids: list[int] = httpx.post(url + "/tokenize", json={"prompt": s, "add_special_tokens": False}).json()[
        "tokens"
    ]
    return ids


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_user_is_accepted_and_changes_nothing(c: openai.OpenAI, chat: bool) -> None:
    assert text(c, chat, **GREEDY, user="user-1234") == text(c, chat, **GREEDY)


def test_chat_seeds(c: openai.OpenAI) -> None:
    first = text(c, True, **SAMPLED)
    assert text(c, True, **SAMPLED) == first
    others = [text(c, True, **{**SAMPLED, "seed": s}) for s in (1, 2, 3, 4)]
    assert any(o != first for o in others)


def test_chat_stop_strings(c: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(temperature=0, max_tokens=40, extra_body=EOS)
    msgs: list[Any] = [{"role": "user", "content": "stop here"}]
    full = c.chat.completions.create(model=MODEL, messages=msgs, **kw).choices[0].message.content or ""
    ok = [
        i
        for i in range(len(full) // 2, len(full) - 1)
        if full[i : i + 2].isprintable() and "\ufffd" not in full[i : i + 2]
    ]
    stop = full[ok[0] : ok[0] + 2]  # two characters from the middle of the text
    expected = full[: full.index(stop)]
    assert expected and len(expected) < len(full) - 2, (full, stop)
    out = c.chat.completions.create(model=MODEL, messages=msgs, stop=stop, **kw)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (expected, "stop")
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, stop=[stop], stream=True, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_streamed_logprobs_equal_the_whole(c: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, logprobs=2, **GREEDY)
    whole = c.completions.create(**kw).choices[0].logprobs
    assert whole is not None and whole.tokens is not None and whole.token_logprobs is not None
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float]] = []
    for ch in c.completions.create(stream=True, **kw):
        lp = ch.choices[0].logprobs
        if lp is not None:
            tokens += lp.tokens or []
            values += lp.token_logprobs or []
            tops += lp.top_logprobs or []
    assert len(tokens) == 24 and tokens == whole.tokens
    assert values == pytest.approx(whole.token_logprobs, abs=1e-4)
    assert len(tops) == 24 and whole.top_logprobs is not None
    for got, want in zip(tops, whole.top_logprobs, strict=True):
        assert got.keys() == want.keys() and list(got.values()) == pytest.approx(
            list(want.values()), abs=1e-4
        )
        # two tokens may share one text (U+FFFD; "" for ids past the tokenizer's 264): the dict merges them
        assert 1 <= len(got) <= 2 and (len(got) == 2 or set(got) <= {"\ufffd", ""})


def test_chat_streamed_logprobs_equal_the_whole(c: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2, **GREEDY)
    whole = c.chat.completions.create(**kw).choices[0].logprobs
    assert whole is not None and whole.content is not None and len(whole.content) == 24
    streamed = [e for ch in c.chat.completions.create(stream=True, **kw) if ch.choices
                for e in (ch.choices[0].logprobs and ch.choices[0].logprobs.content) or []]  # fmt: skip
    assert [e.token for e in streamed] == [e.token for e in whole.content]
    for got, want in zip(streamed, whole.content, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4) and got.bytes == want.bytes
        assert len(got.top_logprobs) == len(want.top_logprobs) == 2
        assert [t.token for t in got.top_logprobs] == [t.token for t in want.top_logprobs]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            [t.logprob for t in want.top_logprobs], abs=1e-4
        )


def test_chat_max_completion_tokens(c: openai.OpenAI) -> None:
    for n in (1, 7):
        out = c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_completion_tokens=n, max_tokens=30, extra_body=EOS
        )
        assert out.usage is not None and out.usage.completion_tokens == n
        assert out.choices[0].finish_reason == "length"


def test_chat_stream_usage(c: openai.OpenAI) -> None:
    whole = c.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    chunks = list(
        c.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert all(ch.usage is None for ch in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (whole.usage.prompt_tokens, 24)
    assert last.usage.total_tokens == whole.usage.total_tokens
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (
        whole.choices[0].message.content
    )
