"""``kvtier serve --model <sentence-transformers folder>``: OpenAI's ``POST /v1/embeddings``.

An encoder model gets this app instead of the completions one (it has no generate): embeddings,
models, health, version. Inputs are strings (one or a list; token-id inputs are refused: the cache
is keyed by text). Each text is looked up in the embedding cache first, so a corpus sent again
computes only what changed; ``usage.kvtier_cached_inputs`` says how many came from the cache.
Vectors go out as floats or, as the openai client asks by default, base64 little-endian float32.
One encoder, one batch at a time (a lock); the work runs off the event loop, in a thread.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

import kvtier
from kvtier.engine.embedder import Embedder
from kvtier.server.app import BodyLimit, KeyFirst, ServerSettings, UnknownModel, add_error_handlers, tenant_of
from kvtier.server.auth import Tenants, cache_salt
from kvtier.server.loop import OpenStreams, QueueFull, ShuttingDown
from kvtier.server.protocol import BadParam, Int, check_utf8

MAX_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[Int] | list[list[Int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Int | None = None
    user: str | None = None

    def texts(self) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        if not items:
            raise BadParam("input must not be empty", "input")
        if len(items) > MAX_INPUTS:
            raise BadParam(f"input has {len(items)} items; at most {MAX_INPUTS} per request", "input")
        if not all(isinstance(t, str) for t in items):
            raise BadParam("input must be text (a string or a list of strings), not token ids", "input")
        for i, text in enumerate(items):
            check_utf8("the input" if len(items) == 1 else f"input {i}", str(text), "input")
        return [str(t) for t in items]


class EmbedGate:
    """What ``serve``'s SIGTERM handling and the 503 answers need: a bounded count of requests
    in flight and a switch that refuses new ones."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.pending = 0
        self.accepting = True
        self.lock = threading.Lock()
        # serve.py's drain deadline ends the streams left; embeddings answer whole: never any
        self.open_streams = OpenStreams()

    def stop_accepting(self) -> None:
        self.accepting = False

    def enter(self) -> None:
        with self.lock:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down")
            if self.pending >= self.max_pending:
                raise QueueFull(f"{self.pending} requests pending; the limit is {self.max_pending}")
            self.pending += 1

    def leave(self) -> None:
        with self.lock:
            self.pending -= 1


class EmbeddingState:
    def __init__(self, embedder: Embedder, settings: ServerSettings, name: str) -> None:
        self.embedder = embedder
        self.settings = settings
        self.loop = EmbedGate(settings.max_pending_requests)  # ``loop``: the name serve.py looks for
        self.tenants = Tenants.build(settings.api_key, settings.api_keys_file)
        self.model_names = [settings.served_model_name or name]
        self.work_lock = threading.Lock()

    def embed(self, texts: list[str], salt: str | None = None) -> tuple[Any, int, int]:
        """Vectors, prompt tokens, inputs served from the cache (one batch at a time); ``salt``: the
        tenant's, so no tenant learns from ``kvtier_cached_inputs`` (or timing) what another embedded."""
        with self.work_lock:
            stats = self.embedder.stats
            before = stats.cached
            vectors = self.embedder.embed(texts, salt=salt)
            cached = stats.cached - before
        enc = self.embedder.encoder
        tokens = enc.tokenizer(texts, truncation=True, max_length=enc.max_seq_length)["input_ids"]
        return vectors, sum(len(t) for t in tokens), cached


def create_embedding_app(embedder: Embedder, settings: ServerSettings, name: str) -> FastAPI:
    state = EmbeddingState(embedder, settings, name)
    app = FastAPI(title="kvtier embeddings", version=kvtier.__version__)
    app.state.kvtier = state
    add_error_handlers(app, settings)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(KeyFirst, tenants=state.tenants)

    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
        tenant = tenant_of(request)
        if body.model is not None and body.model not in state.model_names:
            raise UnknownModel(
                f"the model {body.model!r} does not exist; this server serves {state.model_names}"
            )
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise BadParam(
                f"dimensions={body.dimensions}: this model's vectors have {embedder.dim}", "dimensions"
            )
        texts = body.texts()
        state.loop.enter()
        try:
            vectors, prompt_tokens, cached = await asyncio.to_thread(
                state.embed, texts, cache_salt(tenant, None)
            )
        finally:
            state.loop.leave()
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        usage["kvtier_cached_inputs"] = cached
        body_out = {
            "object": "list",
            "data": data,
            "model": body.model or state.model_names[0],
            "usage": usage,
        }
        return JSONResponse(body_out, headers={"X-Kvtier-Cached-Inputs": str(cached)})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "kvtier"} for n in state.model_names]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "pending_requests": state.loop.pending}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": kvtier.__version__}

    return app


def _encode(vector: Any, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]
