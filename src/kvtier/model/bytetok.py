"""The synthetic models' tokenizer: 256 byte tokens plus a few special tokens, and a chat template.

It gives exactly the ids and text of the ``PreTrainedTokenizerFast`` it replaces (a byte-level BPE
with no merges; ``tests/test_startup.py`` checks it against that one), without importing
transformers, which cost 0.75 s of every start of a synthetic model. Byte tokens need no merges:
encoding is a table lookup per byte, so text is encoded piece by piece and concatenated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import Any

SPECIAL_TOKENS = ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<pad>", "<unk>")
BYTE_VOCAB = 256 + len(SPECIAL_TOKENS)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte (``tokenizers``' ByteLevel alphabet), by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@cache
def _tables() -> tuple[list[int], list[int]]:
    """(byte -> token id, token id -> byte): ids are the byte characters' places in sorted order."""
    alphabet = _byte_level_alphabet()
    order = sorted(alphabet)
    byte_to_id = [order.index(ch) for ch in alphabet]
    id_to_byte = [0] * 256
    for b, i in enumerate(byte_to_id):
        id_to_byte[i] = b
    return byte_to_id, id_to_byte


class ByteTokenizer:
    """The subset of the transformers tokenizer interface kvtier uses (encode, decode, chat)."""

    chat_template = CHAT_TEMPLATE
    bos_token, eos_token, pad_token, unk_token = "<s>", "<|end|>", "<pad>", "<unk>"
    vocab_size = BYTE_VOCAB

    def __len__(self) -> int:
        return BYTE_VOCAB

    def _special_id(self, token: str) -> int:
        return 256 + SPECIAL_TOKENS.index(token)

    @property
    def bos_token_id(self) -> int:
        return self._special_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self._special_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self._special_id(self.pad_token)

    @property
    def unk_token_id(self) -> int:
        return self._special_id(self.unk_token)

    @property
    def all_special_ids(self) -> list[int]:
        return list(range(256, BYTE_VOCAB))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special tokens written in ``text`` are matched (as transformers does); no BOS is added
        (this tokenizer has no post-processor), whatever ``add_special_tokens`` says."""
        ids: list[int] = []
        for i, piece in enumerate(_SPECIAL_RE.split(text)):
            if i % 2:
                ids.append(self._special_id(piece))
            elif piece:
                ids.extend(self._bytes(piece))
        return ids

    def _bytes(self, text: str) -> list[int]:
        table = _tables()[0]
        return [table[b] for b in text.encode("utf-8")]

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        alphabet, id_to_byte = _byte_level_alphabet(), _tables()[1]
        return [alphabet[id_to_byte[i]] if i < 256 else SPECIAL_TOKENS[i - 256] for i in ids]

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id (the byte tokens as their ByteLevel characters), as transformers."""
        return {t: i for i, t in enumerate(self.convert_ids_to_tokens(range(BYTE_VOCAB)))}

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        """One id for a string, a list for a list; an unknown token is ``<unk>``'s id."""
        vocab = self.get_vocab()
        if isinstance(tokens, str):
            return vocab.get(tokens, self.unk_token_id)
        return [vocab.get(t, self.unk_token_id) for t in tokens]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, **_: Any) -> str:
        """Bytes decoded as UTF-8 with U+FFFD for each invalid run (Rust's ``from_utf8_lossy``); ids
        past the tokenizer's vocabulary (synthetic models have more) decode to nothing."""
        id_to_byte = _tables()[1]
        out: list[str] = []
        run = bytearray()
        for i in (int(t) for t in ids):
            if 0 <= i < 256:
                run.append(id_to_byte[i])
                continue
            if i >= BYTE_VOCAB or i < 0:  # a model's vocabulary may be larger: no text, as in tokenizers
                continue
            if not skip_special_tokens:
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()
                out.append(SPECIAL_TOKENS[i - 256])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = True,
        **_: Any,
    ) -> Any:
        """Render the template, then encode it as text (special-token text in a message becomes
        that token, as transformers' tokenizer does by default)."""
        rendered = _template().render(messages=messages, add_generation_prompt=add_generation_prompt)
        if not tokenize:
            return rendered
        ids = self.encode(rendered)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids


@cache
def _template() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE)
