"""FastAPI routes of ``kvtier serve``: OpenAI's completions, chat, models; health, metrics, version,
tokenize, detokenize. Each route is one small function over ``ServerState``; ``add_routes`` is the place
to add more (the result cache's embeddings route goes there too).

Errors leave in OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
parameter or a prompt over the context, 401 for a bad key, 404 for an unknown model, 422 for a body of
the wrong shape, 503 with Retry-After when the bounded queue is full or the server is stopping, 500
(in that body too) for anything unexpected. The API key is checked before the body is read
(``KeyFirst``): a client without one makes the server parse nothing and learns nothing of the schema.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import kvtier
from kvtier.engine.engine import Engine
from kvtier.engine.request import InvalidRequestError, SamplingParams
from kvtier.metrics import CONTENT_TYPE_LATEST
from kvtier.server import completions as cmpl
from kvtier.server.auth import AuthError, Tenants, cache_salt
from kvtier.server.loop import EngineLoop, QueueFull, ShuttingDown
from kvtier.server.outputs import EngineInfo
from kvtier.server.proc_loop import EngineAddFailed, ProcessEngineLoop
from kvtier.server.protocol import (
    BadParam,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_utf8,
    error_body,
    template_messages,
)
from kvtier.server.stages import ARRIVE_KEY, StageLog, StampArrival


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    api_keys_file: str | None = None
    served_model_name: str | None = None  # default: the model setting (folder or synthetic:<name>)
    max_pending_requests: int = 1024  # accepted and unfinished; one more gets 503
    max_request_bytes: int = 32 << 20  # a larger body gets 413 before it is read
    retry_after_s: int = 1
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    # after a step, the engine thread waits for its outputs to be sent, at most this x the step's time;
    # None: 1.0 on a CPU engine (the threads only contend for the interpreter lock), 0 on CUDA (the
    # loop writes while the GPU computes the next step: waiting would idle the GPU)
    step_handoff: float | None = None
    # where the engine runs: "on", its own process (the HTTP process only parses, formats and
    # streams); "off", a thread of this process; "auto": see engine_process_for
    engine_process: str = "auto"
    # stamp every request at each stage, both processes; GET /debug/stages (kvtier/server/stages.py)
    trace_stages: bool = False
    # engine process: between two steps, wait for new requests up to this fraction of the time the
    # last steps waited for the device (server/engine_proc.join_window_s; 0 or None: never). Off: on
    # the H200 (256 streams, 8B) 0.5 made the cached TTFT 1.67x offline against 1.37x without it
    # (docs/benchmarks.md "Serving"); nothing on a CPU engine either way.
    join_window: float | None = None

    def __post_init__(self) -> None:
        if self.step_handoff is not None and not 0 <= self.step_handoff <= 10:
            raise ValueError(f"step_handoff must be between 0 and 10 (times a step), got {self.step_handoff}")
        if self.join_window is not None and not 0 <= self.join_window <= 1:
            raise ValueError(
                f"join_window must be between 0 and 1 (of the device wait), got {self.join_window}"
            )
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}")
        if self.engine_process not in ENGINE_PROCESS_CHOICES:
            choices = ", ".join(ENGINE_PROCESS_CHOICES)
            raise ValueError(f"engine_process must be one of {choices}, got {self.engine_process!r}")

    def engine_process_for(self, device_type: str) -> bool:
        """auto: on (docs/architecture.md "Server processes" says why, with the measurement)."""
        return self.engine_process != "off"

    def join_window_fraction(self) -> float:
        return 0.0 if self.join_window is None else self.join_window

    def handoff_for(self, device_type: str) -> float:
        if self.step_handoff is None:
            return 1.0 if device_type == "cpu" else 0.0
        return self.step_handoff


ENGINE_PROCESS_CHOICES = ("auto", "on", "off")


class UnknownModel(Exception):
    pass


class BodyTooLarge(Exception):
    pass


# a text prompt this long is tokenized on a thread of its own, not the event loop (~10 ms and more
# for a fast tokenizer: every stream would stall for it)
LONG_PROMPT_CHARS = 100_000
# a text prompt over (this x the context x the longest token's characters) cannot fit: refused
# before it is tokenized. 4: room for normalizers that merge characters (NFKC composes pairs)
PROMPT_CHARS_SLACK = 4


def prompt_char_limit(tokenizer: Any, max_model_len: int) -> int | None:
    """The most characters a text prompt that fits the context can have, or None (unknown): no
    token's text is longer than its vocabulary entry (byte-level BPE: a character a byte)."""
    vocab = getattr(tokenizer, "get_vocab", None)
    if vocab is None:
        return None
    longest = max((len(k) for k in vocab()), default=0)
    return PROMPT_CHARS_SLACK * max_model_len * longest if longest else None


@dataclass
class ServerState:
    info: EngineInfo
    settings: ServerSettings
    loop: EngineLoop | ProcessEngineLoop
    tenants: Tenants
    tokenizer: Any  # the HTTP side's own copy: a tokenizer object is not safe to share across threads
    model_names: list[str]
    max_prompt_chars: int | None = None
    # long prompts are tokenized here, on one thread with its own copy of the tokenizer
    long_prompts: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="kvtier-tokenize")
    )
    long_tokenizer: Any = None

    def __post_init__(self) -> None:
        self.max_prompt_chars = prompt_char_limit(self.tokenizer, self.info.max_model_len)
        self.long_tokenizer = copy.deepcopy(self.tokenizer)

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    def token_text(self, token_id: int) -> str:
        return _token_text(self.tokenizer, token_id)


@lru_cache(maxsize=65536)
def _token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id])) if tokenizer is not None else str(token_id)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The app over an engine in this process, driven by a thread (``engine_process=off``)."""
    settings = settings or ServerSettings()
    stages = StageLog() if settings.trace_stages else None
    loop = EngineLoop(
        engine,
        settings.max_pending_requests,
        settings.handoff_for(engine.device.type),
        stages,
        settings.served_model_name or EngineInfo.of(engine).model_name,
    )
    tokenizer = copy.deepcopy(engine.tokenizer)
    return create_app_for(loop, EngineInfo.of(engine), tokenizer, settings)


def create_app_for(
    loop: EngineLoop | ProcessEngineLoop, info: EngineInfo, tokenizer: Any, settings: ServerSettings
) -> FastAPI:
    """The app over either loop: a thread over an Engine here, or the engine's own process."""
    state = ServerState(
        info=info,
        settings=settings,
        loop=loop,
        tenants=Tenants.build(settings.api_key, settings.api_keys_file),
        tokenizer=tokenizer,
        model_names=[settings.served_model_name or info.model_name],
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop.start()
        yield
        await asyncio.to_thread(state.loop.shutdown)  # after uvicorn let in-flight requests finish
        state.long_prompts.shutdown(wait=False)

    app = FastAPI(title="kvtier", version=kvtier.__version__, lifespan=lifespan)
    app.state.kvtier = state
    add_error_handlers(app, settings)
    add_routes(app, state)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(KeyFirst, tenants=state.tenants)
    if loop.stages is not None:
        app.add_middleware(StampArrival)
        app.get("/debug/stages")(_stages(state, loop.stages))
    return app


def _too_large(max_bytes: int) -> JSONResponse:
    message = f"the request body is over this server's limit of {max_bytes} bytes (--max-request-bytes)"
    return _error(413, "invalid_request_error", message)


OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})  # a load balancer's and a scraper's


TENANT_KEY = "kvtier.tenant"  # the ASGI scope's entry KeyFirst fills: the request's tenant or None


class KeyFirst:
    """ASGI middleware, the one place keys are checked: with keys configured, a request to any
    route but ``OPEN_PATHS`` without a valid key gets 401 before its body is read (a check in the
    route ran after FastAPI parsed the body: an unauthenticated client could make the server read
    and parse 32 MiB). The tenant goes into the scope (``TENANT_KEY``) for the routes."""

    def __init__(self, app: Any, tenants: Tenants) -> None:
        self.app = app
        self.tenants = tenants

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization")
            try:
                scope[TENANT_KEY] = self.tenants.authenticate(
                    header.decode("latin-1") if header is not None else None
                )
            except AuthError as e:
                await _error(401, "authentication_error", str(e))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before it is read (by its Content-Length)
    or as soon as it is (a chunked one raises ``BodyTooLarge`` from the route's read; FastAPI makes
    that a 400 "error parsing the body", which the error handler turns back into the 413)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await _too_large(self.max_bytes)(scope, receive, send)
            return
        received = 0

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        await self.app(scope, counted, send)


# -- errors ---------------------------------------------------------------------------------------


def _error(status: int, kind: str, message: str, param: str | None = None, **headers: str) -> JSONResponse:
    return JSONResponse(error_body(message, kind, status, param), status_code=status, headers=headers)


# The engine's InvalidRequestError names its parameter first ("temperature must be ..."): these
# are the names it can start with; the messages that start otherwise, by their opening words.
_ENGINE_PARAMS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) | {"cache_salt"}
_OPENINGS = (
    ("the prompt ", "prompt"),
    ("a prompt ", "prompt"),
    ("token id", "prompt"),
    ("stop token id ", "stop_token_ids"),
    ("stop strings ", "stop"),
    ("a stop string ", "stop"),
)


def engine_error_param(message: str, path: str) -> str | None:
    """The request parameter an engine error names, or None: a chat request's prompt is its
    ``messages``."""
    param = next((p for opening, p in _OPENINGS if message.startswith(opening)), None)
    if param is None:
        first = message.split(" ", 1)[0]
        param = first if first in _ENGINE_PARAMS else None
    if param == "prompt" and path.endswith("/chat/completions"):
        return "messages"
    return param


def add_error_handlers(app: FastAPI, settings: ServerSettings) -> None:
    retry = {"Retry-After": str(settings.retry_after_s)}

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """An unknown route (404) or method (405): OpenAI's error body, not FastAPI's ``detail``."""
        if isinstance(e.__cause__, BodyTooLarge):  # FastAPI's "error parsing the body", from our read
            return _too_large(settings.max_request_bytes)
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _error(e.status_code, kind, message, **(e.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in err['loc'] if x != 'body')}: {err['msg']}" for err in e.errors()]
        return _error(422, "invalid_request_error", "malformed request body: " + "; ".join(parts), _field(e))

    @app.exception_handler(BadParam)
    async def bad_param(_: Request, e: BadParam) -> JSONResponse:
        return _error(400, "invalid_request_error", str(e), e.param)

    @app.exception_handler(InvalidRequestError)
    async def invalid(request: Request, e: InvalidRequestError) -> JSONResponse:
        return _error(400, "invalid_request_error", str(e), engine_error_param(str(e), request.url.path))

    @app.exception_handler(AuthError)
    async def unauthorized(_: Request, e: AuthError) -> JSONResponse:
        return _error(401, "authentication_error", str(e))

    @app.exception_handler(UnknownModel)
    async def unknown_model(_: Request, e: UnknownModel) -> JSONResponse:
        return _error(404, "not_found_error", str(e), "model")

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, e: QueueFull) -> JSONResponse:
        return _error(503, "server_overloaded", str(e), **retry)

    @app.exception_handler(cmpl.ClientDisconnected)
    async def client_gone(_: Request, e: cmpl.ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(cmpl.EngineFailure)
    async def engine_failure(_: Request, e: cmpl.EngineFailure) -> JSONResponse:
        return _error(500, "internal_error", str(e))

    @app.exception_handler(EngineAddFailed)
    async def add_failed(_: Request, e: EngineAddFailed) -> JSONResponse:
        return _error(500, "internal_error", str(e))

    @app.exception_handler(ShuttingDown)
    async def stopping(_: Request, e: ShuttingDown) -> JSONResponse:
        return _error(503, "server_unavailable", str(e), **retry)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        """A bug, not a bad request: OpenAI's body with a 500 (Starlette then logs the traceback)."""
        message = f"{request.method} {request.url.path} failed: {type(e).__name__}: {e}"
        return _error(500, "internal_error", message)


def _field(e: RequestValidationError) -> str | None:
    """The top-level body field a validation error is about (``messages`` for ``messages.0.content``);
    None for a body that is not JSON (its location is a character offset) or not an object."""
    for err in e.errors():
        loc = [x for x in err.get("loc", ()) if x != "body"]
        if loc and isinstance(loc[0], str):
            return loc[0]
    return None


# -- routes ---------------------------------------------------------------------------------------


def add_routes(app: FastAPI, state: ServerState) -> None:
    app.post("/v1/completions", response_model=None)(_completions(state))
    app.post("/v1/chat/completions", response_model=None)(_chat(state))
    app.get("/v1/models")(_models(state))
    app.get("/v1/models/{model_id:path}")(_model(state))
    app.get("/health")(_health(state))
    app.get("/metrics")(_metrics(state))
    app.get("/version")(_version)
    app.post("/tokenize")(_tokenize(state))
    app.post("/detokenize")(_detokenize(state))


def tenant_of(request: Request) -> str | None:
    """The request's tenant, as ``KeyFirst`` found it (None: the server is open)."""
    tenant: str | None = request.scope.get(TENANT_KEY)
    return tenant


def check_sequences(state: ServerState, n: int, num_prompts: int) -> None:
    """One request may not ask for more sequences than the server takes in flight: it could never
    be admitted, so a 503 (retry later) would be a lie."""
    limit = state.settings.max_pending_requests
    if n * num_prompts > limit:
        asked = f"n={n}" if num_prompts == 1 else f"n={n} x {num_prompts} prompts"
        raise BadParam(
            f"the request asks for {n * num_prompts} sequences ({asked}): over this server's limit "
            f"of {limit} requests in flight",
            "n" if num_prompts == 1 else "prompt",
        )


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.model_names:
        shown = model if len(model) <= 100 else model[:100] + "..."
        raise UnknownModel(f"the model {shown!r} does not exist; this server serves {state.model_names}")


async def encode(
    state: ServerState, prompt: str | list[int], param: str, add_special_tokens: bool = True
) -> list[int]:
    if isinstance(prompt, str):
        if state.tokenizer is None:
            raise BadParam("this model has no tokenizer: send token ids", param)
        text = prompt
        ids = await _tokenized(
            state,
            len(text),
            param,
            "the prompt",
            lambda tok: tok.encode(text, add_special_tokens=add_special_tokens),
        )
        return list(ids)
    vocab = state.info.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise BadParam(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param)
    return list(prompt)


async def _tokenized(
    state: ServerState, chars: int, param: str, what: str, work: Callable[[Any], Any]
) -> Any:
    """``work(tokenizer)`` for a text of ``chars`` characters: refused if it cannot fit the context
    whatever it says, on the tokenizing thread if long, else here."""
    limit = state.max_prompt_chars
    if limit is not None and chars > limit:
        raise BadParam(
            f"{what} has {chars} characters: more than a context of {state.max_model_len} tokens can "
            f"hold (at most {limit} characters with this tokenizer)",
            param,
        )
    if chars > LONG_PROMPT_CHARS:
        tok = state.long_tokenizer
        return await asyncio.get_running_loop().run_in_executor(state.long_prompts, lambda: work(tok))
    return work(state.tokenizer)


async def apply_chat_template(state: ServerState, messages: list[dict[str, str]]) -> list[int]:
    if state.tokenizer is None or not getattr(state.tokenizer, "chat_template", None):
        raise BadParam("this model has no chat template: use /v1/completions", "messages")

    def render(tok: Any) -> Any:
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # jinja2's TemplateError: the model's template refused these messages
            if type(e).__module__.split(".")[0] != "jinja2":
                raise
            raise BadParam(f"the model's chat template refused the messages: {e}", "messages") from None

    chars = sum(len(m["content"]) for m in messages)
    out = await _tokenized(state, chars, "messages", "the messages", render)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


async def _respond(job: cmpl.Job, request: Request) -> Any:
    if job.streaming:
        return StreamingResponse(cmpl.stream_events(job, request), media_type="text/event-stream")
    body = await cmpl.collect(job, request)
    served = body.get("usage", {}).get("kvtier_served_from")
    if served is None:
        return body
    # the result cache's answer says so in a header too (a stream's headers leave before any answer)
    return JSONResponse(body, headers={"X-Kvtier-Served-From": str(served)})


def _completions(state: ServerState) -> Any:
    async def create_completion(body: CompletionRequest, request: Request) -> Any:
        parsed = time.perf_counter()
        check_model(state, body.model)
        body.refuse_unsupported()
        texts = body.prompts()
        check_sequences(state, body.n, len(texts))
        prompts = [await encode(state, p, "prompt") for p in texts]
        logprobs = body.logprobs_count()
        L = state.max_model_len
        params = [
            body.sampling_params(cmpl.resolve_max_tokens(body.max_tokens, len(ids), L, "prompt"), logprobs)
            for ids in prompts
        ]
        job = cmpl.Job(
            state, False, body.model, body.include_usage, body.n, logprobs is not None, body.stream
        )
        _trace(state, request, job.rid, parsed)
        await cmpl.submit_all(job, prompts, params, cache_salt(tenant_of(request), body.cache_salt))
        return await _respond(job, request)

    return create_completion


def _chat(state: ServerState) -> Any:
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Any:
        parsed = time.perf_counter()
        check_model(state, body.model)
        body.refuse_unsupported()
        check_sequences(state, body.n, 1)
        ids = await apply_chat_template(state, body.chat())
        logprobs = body.logprobs_count()
        requested, name = body.requested_max_tokens()
        max_tokens = cmpl.resolve_max_tokens(requested, len(ids), state.max_model_len, "messages", name)
        params = body.sampling_params(max_tokens, logprobs)
        job = cmpl.Job(state, True, body.model, body.include_usage, body.n, logprobs is not None, body.stream)
        job.rid = job.rid.replace("cmpl-", "chatcmpl-", 1)
        _trace(state, request, job.rid, parsed)
        await cmpl.submit_all(job, [ids], [params], cache_salt(tenant_of(request), body.cache_salt))
        return await _respond(job, request)

    return create_chat_completion


def _trace(state: ServerState, request: Request, request_id: str, parsed: float) -> None:
    """--trace-stages: the HTTP side's first stamps (a list of prompts: the engine's stamps are
    under each prompt's own id, ``<id>-<i>``)."""
    stages = state.loop.stages
    if stages is None:
        return
    stamps = {"parsed": parsed, "prepared": time.perf_counter()}
    if (arrive := request.scope.get(ARRIVE_KEY)) is not None:
        stamps["arrive"] = arrive
    stages.update(request_id, stamps)


def _stages(state: ServerState, stages: StageLog) -> Any:
    async def debug_stages() -> dict[str, Any]:
        return stages.body()

    return debug_stages


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "kvtier",
        "max_model_len": state.max_model_len,
    }


def _models(state: ServerState) -> Any:
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state, name) for name in state.model_names]}

    return list_models


def _model(state: ServerState) -> Any:
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        check_model(state, model_id)
        return _model_card(state, model_id)

    return retrieve_model


def _health(state: ServerState) -> Any:
    async def health() -> Response:
        why = state.loop.unavailable() or (None if state.loop.accepting else "the server is shutting down")
        if why is not None:  # a load balancer takes this instance out of rotation
            return _error(503, "server_unavailable", why)
        return JSONResponse({"status": "ok", "pending_requests": state.loop.num_pending})

    return health


def _metrics(state: ServerState) -> Any:
    async def metrics() -> Response:
        return Response(await state.loop.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return metrics


async def _version() -> dict[str, str]:
    return {"version": kvtier.__version__}


def _tokenize(state: ServerState) -> Any:
    async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
        check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadParam("send exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            ids = await apply_chat_template(state, template_messages(body.messages))
        else:
            check_utf8("the prompt", body.prompt or "", "prompt")
            ids = await encode(state, body.prompt or "", "prompt", body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    return tokenize


def _detokenize(state: ServerState) -> Any:
    async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
        check_model(state, body.model)
        ids = await encode(state, body.tokens, "tokens")
        if state.tokenizer is None:
            raise BadParam("this model has no tokenizer", "tokens")
        return {"prompt": state.tokenizer.decode(ids)}

    return detokenize
