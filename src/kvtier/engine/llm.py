"""The offline front: ``LLM.generate`` (batch), ``LLM.stream`` (token by token), ``LLM.chat``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier.config import EngineConfig
from kvtier.engine.embedder import Embedder
from kvtier.engine.engine import Engine, Prompt
from kvtier.engine.request import InvalidRequestError, RequestOutput, SamplingParams, check_prompt_ids
from kvtier.model.bert import is_encoder_folder


@dataclass
class StreamDelta:
    """What ``LLM.stream`` yields: the text and tokens a step added to one completion."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    output: RequestOutput


class LLM:
    """Offline use: ``LLM(model="synthetic:small").generate(prompts, SamplingParams(...))``.

    Keyword arguments are settings of ``EngineConfig`` by name (block_size=..., kv_cache_memory=...).
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **settings: Any) -> None:
        if model is not None:
            settings["model"] = model
        self.config = config or EngineConfig.load(settings)
        self._engine: Engine | None = None
        self._embedder: Embedder | None = None
        if is_encoder_folder(self.config.model.model):
            self._embedder = Embedder(self.config)
        else:
            self._engine = Engine(self.config)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise InvalidRequestError(
                f"{self.config.model.model} is an embedding model: it has embed(), not generate()"
            )
        return self._engine

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            raise InvalidRequestError(
                f"{self.config.model.model} is a generative model: embed() needs a BERT-family "
                "encoder folder (as sentence-transformers publishes them)"
            )
        return self._embedder

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer if self._engine is not None else self.embedder.encoder.tokenizer

    def embed(self, texts: str | Sequence[str], use_cache: bool = True) -> np.ndarray:
        """``[len(texts), dim]`` float32 vectors, pooled and normalised as the model folder says;
        each text is looked up in the embedding cache first (``use_cache=False``: skip it)."""
        return self.embedder.embed(texts, use_cache=use_cache)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Store what is queued and what the write-back tiers still lack, close the tiers (see
        ``Engine.close``). Without it, the exit does the same within ``exit_flush_timeout``."""
        if self._embedder is not None:
            self._embedder.close()
            return True
        return self.engine.close(timeout)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order, n completions merged per prompt."""
        prompt_list = _as_prompt_list(prompts)
        param_list = (
            list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompt_list)
        )
        if len(param_list) != len(prompt_list):
            raise InvalidRequestError(f"{len(prompt_list)} prompts but {len(param_list)} SamplingParams")
        groups: list[list[str]] = []
        final: dict[str, RequestOutput] = {}
        try:
            for p, sp in zip(prompt_list, param_list, strict=True):
                groups.append(self.engine.add_request(p, sp, cache_salt=cache_salt, stream=False))
            for out in self.engine.run_until_done():
                if out.finished:
                    final[out.request_id] = out
        except BaseException:  # bad input, or KeyboardInterrupt: no orphans left to run in a later call
            for ids in groups:
                for rid in ids:
                    if rid not in final:
                        self.engine.abort(rid)
            raise
        return [_merge([final[rid] for rid in ids]) for ids in groups]

    def chat(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams | None = None,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        return self.generate([self.engine.apply_chat_template(messages)], params, cache_salt)[0]

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, cache_salt: str | None = None
    ) -> Iterator[StreamDelta]:
        """Yield each completion's new text and tokens as they are generated."""
        ids = self.engine.add_request(prompt, params, cache_salt=cache_salt)
        sent_text = dict.fromkeys(ids, 0)
        sent_tokens = dict.fromkeys(ids, 0)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id not in pending:
                        continue
                    c = out.outputs[0]
                    rid = out.request_id
                    delta = StreamDelta(
                        rid,
                        c.index,
                        c.text[sent_text[rid] :],
                        c.token_ids[sent_tokens[rid] :],
                        out.finished,
                        c.finish_reason,
                        out,
                    )
                    sent_text[rid], sent_tokens[rid] = len(c.text), len(c.token_ids)
                    if out.finished:
                        pending.discard(rid)
                    yield delta
        finally:
            for rid in pending:  # the consumer stopped early: free the blocks
                self.engine.abort(rid)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):  # an array, a tensor, bytes, a dict, None, a number
        check_prompt_ids(prompts, 0)  # raises, naming what was given
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    first = outs[0]
    if len(outs) == 1:
        return first
    base = first.request_id.rsplit("#", 1)[0]
    completions = [o.outputs[0] for o in outs]
    errors = [o.error for o in outs if o.error]
    return RequestOutput(
        base,
        first.prompt,
        first.prompt_token_ids,
        completions,
        True,
        first.num_cached_tokens,
        first.metrics,
        errors[0] if errors else None,
    )
