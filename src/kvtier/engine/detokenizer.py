"""Incremental detokenization and stop strings.

Decoding the whole output every step is quadratic; decoding only the new token breaks multi-byte
characters and tokenizers that merge spaces. The usual middle way: decode a short window twice (with
and without the new tokens) and emit the difference once it no longer ends in a partial character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DetokenizerState:
    prefix_offset: int = 0
    read_offset: int = 0


def decode_delta(tokenizer: Any, token_ids: list[int], state: DetokenizerState) -> str:
    """Text that ``token_ids[state.read_offset:]`` adds; advances the state when text is complete."""
    prefix = tokenizer.decode(token_ids[state.prefix_offset : state.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(token_ids[state.prefix_offset :], skip_special_tokens=True)
    if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
        return ""
    state.prefix_offset = state.read_offset
    state.read_offset = len(token_ids)
    return full[len(prefix) :]


def decode_rest(tokenizer: Any, token_ids: list[int], state: DetokenizerState) -> str:
    """Text of every token after ``state.read_offset``, at once (the end of the output: a last
    incomplete character is dropped, as the incremental decoding never emits one)."""
    prefix = tokenizer.decode(token_ids[state.prefix_offset : state.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(token_ids[state.prefix_offset :], skip_special_tokens=True)
    state.prefix_offset = state.read_offset = len(token_ids)
    return full[len(prefix) :].rstrip(REPLACEMENT_CHAR) if len(full) > len(prefix) else ""


def find_stop(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """First stop string that ends in the new part of ``text``: (start index, stop)."""
    best: tuple[int, str] | None = None
    for s in stops:
        idx = text.find(s, max(0, new_from - len(s) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best
