"""OpenAI request and response bodies (pydantic), and their mapping to kvtier's SamplingParams.

A body of the wrong shape (a string where a number goes, no ``messages``) fails pydantic: 422. Integer
and boolean fields are strict (``"5"`` or ``true`` for ``max_tokens`` is a 422, not 5 or 1 token), as
are numbers (``true`` is no temperature). A body of the right shape with a value out of range fails
here or in ``SamplingParams.validate``: 400, with a message that names the parameter and its limit.
OpenAI parameters that would change the answer but that kvtier does not implement
(``response_format``, ``tools``, ``best_of``, ``suffix``) are refused with a 400 naming them, never
ignored. Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send newer
fields keep working.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict

from kvtier.engine.request import MAX_LOGPROBS, InvalidRequestError, SamplingParams, check_text

Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Strict()]  # an int is taken (1 is 1.0), a bool or a string is not
ROLES = ("system", "developer", "user", "assistant", "tool")
_TOKEN_ID = re.compile(r"-?[0-9]{1,18}")  # a logit_bias key: an int64, and never 4,300 digits to parse


class BadParam(ValueError):
    """A value out of range: HTTP 400 naming ``param``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


def check_utf8(what: str, text: str, param: str) -> None:
    """``text`` must be encodable (a lone surrogate, from a string cut inside an emoji, is not)."""
    try:
        check_text(what, text)
    except InvalidRequestError as e:
        raise BadParam(str(e), param) from None


class StreamOptions(_Body):
    include_usage: Bool = False


class _Sampling(_Body):
    """Fields both completion endpoints share (OpenAI's, then vLLM's extras)."""

    model: str
    max_tokens: Int | None = None
    temperature: Float | None = None
    top_p: Float | None = None
    n: Int = 1
    stream: Bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    user: str | None = None
    logit_bias: dict[str, Float] | None = None  # token id (a JSON key: a string) -> bias
    # OpenAI's, not implemented: refused when they would change the answer (refuse_unsupported)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    # extras
    top_k: Int = 0
    min_p: Float = 0.0
    repetition_penalty: Float = 1.0
    ignore_eos: Bool = False
    stop_token_ids: list[Int] = Field(default_factory=list)
    include_stop_str_in_output: Bool = False
    cache_salt: str | None = None

    def refuse_unsupported(self) -> None:
        """A 400 for what kvtier does not do, rather than an answer that silently ignores it."""
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise BadParam(f"response_format {kind!r} is not supported: only 'text'", "response_format")
        if self.tools or self.functions:
            raise BadParam("tools and function calling are not supported by this server", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise BadParam("tool_choice is not supported: there are no tools", "tool_choice")
        if self.stream_options is not None and not self.stream:
            raise BadParam("stream_options is only allowed with stream=true", "stream_options")

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's params; it checks their ranges (InvalidRequestError: 400 naming the field)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stops(),
            stop_token_ids=list(self.stop_token_ids),
            logit_bias=self.token_biases(),
            ignore_eos=self.ignore_eos,
            n=self.n,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
        )

    def token_biases(self) -> dict[int, float]:
        """``logit_bias`` with its keys as token ids (the engine checks their range and values)."""
        out: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise BadParam(f"logit_bias keys must be token ids, got {key[:40]!r}", "logit_bias")
            out[int(key)] = bias
        return out

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = 16
    logprobs: Int | None = None
    echo: Bool = False
    best_of: Int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise BadParam("prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        for i, text in enumerate(p):
            if isinstance(text, str):
                check_utf8("the prompt" if len(p) == 1 else f"prompt {i}", text, "prompt")
        return list(p)  # type: ignore[arg-type]

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise BadParam(f"best_of is not supported (only best_of = n = {self.n})", "best_of")
        if self.suffix:
            raise BadParam("suffix is not supported by this server", "suffix")

    def logprobs_count(self) -> int | None:
        if self.echo:
            raise BadParam("echo is not supported", "echo")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise BadParam(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")
        return self.logprobs


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, where: str) -> str:
        """The message's text (its text parts joined); ``where`` names it in errors."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise BadParam(
                    f"{where}.content[{j}] is a {part.type!r} part: this model takes text parts only",
                    "messages",
                )
        return "".join(p.text or "" for p in self.content)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the chat template takes them, each role one of ``ROLES`` (a role is pasted
    into the template: an unchecked one could open a turn of its own) and all text encodable."""
    if not messages:
        raise BadParam("messages is empty: at least one message is needed", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role not in ROLES:
            raise BadParam(f"{where}.role must be one of {', '.join(ROLES)}, got {m.role!r}", "messages")
        text = m.text(where)
        check_utf8(f"{where}.content", text, "messages")
        out.append({"role": m.role, "content": text})
    return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = None
    logprobs: Bool = False
    top_logprobs: Int | None = None

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise BadParam(
                f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}", "top_logprobs"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise BadParam("top_logprobs needs logprobs=true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The tokens asked for, and the parameter that asked (the newer name wins)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def chat(self) -> list[dict[str, str]]:
        return template_messages(self.messages)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Int]


# -- responses: plain dicts in OpenAI's shapes (built per token when streaming, so kept cheap) -------


# ids are unique, not secret (no route takes one): a random process prefix and a counter. uuid4 read
# os.urandom per request, a syscall that hands the interpreter lock to the engine thread and waits
# to get it back (~0.4 ms a request under load, bench/probe_serve.py's profile).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def envelope(kind: str, rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


def error_body(message: str, kind: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
