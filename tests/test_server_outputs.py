"""``DeltaTracker``: what a handler gets of a running completion, and when it gets nothing."""

from __future__ import annotations

from kvtier.engine.request import CompletionOutput, RequestOutput, TokenLogprob
from kvtier.server.outputs import DeltaTracker


def out(tokens: list[int], text: str, finished: bool = False, logprobs: bool = False) -> RequestOutput:
    lps = [TokenLogprob(t, -1.0, []) for t in tokens] if logprobs else None
    c = CompletionOutput(0, tokens, text, "length" if finished else None, logprobs=lps)
    return RequestOutput("r", None, [1, 2], [c], finished, 0)


def test_tokens_without_text_ride_with_the_next_delta() -> None:
    t = DeltaTracker()
    first = t.delta(out([5], ""))  # the first token always goes (the client's first chunk: its TTFT)
    assert first is not None and first.token_ids == [5] and first.text == ""
    assert t.delta(out([5, 6], "")) is None  # no text yet (a partial character, a held stop string)
    assert t.delta(out([5, 6, 7], "")) is None
    d = t.delta(out([5, 6, 7, 8], "ab"))
    assert d is not None and d.token_ids == [6, 7, 8] and d.text == "ab"
    assert t.delta(out([5, 6, 7, 8, 9], "ab")) is None
    last = t.delta(out([5, 6, 7, 8, 9, 10], "ab", finished=True))  # the last always goes, text or not
    assert last is not None and last.token_ids == [9, 10] and last.text == "" and last.finished


def test_with_logprobs_every_token_is_delivered_when_computed() -> None:
    t = DeltaTracker()
    assert t.delta(out([5], "", logprobs=True)) is not None
    d = t.delta(out([5, 6], "", logprobs=True))
    assert d is not None and d.token_ids == [6] and d.logprobs is not None and len(d.logprobs) == 1
