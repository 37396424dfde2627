"""A lean HTTP/1.1 client for the load generator: POST a JSON body, read the answer's lines as they come.

Why not httpx: at 100 concurrent streams on a small CPU machine, httpx (connection pool bookkeeping,
its h11 state machine, line decoding) spent ~0.4 ms of CPU per streamed chunk, which put the *client*
behind: chunks sat in socket buffers for ~100 ms and new requests waited ~1.5 s for a connection and
for their bytes to be written (bench/probe_serve.py measured it). Those delays are the load generator's,
not the server's, yet they land in the server's TTFT and throughput. This client writes a request in one
``write`` and decodes chunked bodies with ``readuntil``/``readexactly``: a few microseconds of Python per
chunk. It speaks plain ``http://`` with keep-alive, nothing else (no TLS, redirects or proxies): use
httpx (``--client httpx``) for anything but a loopback or LAN server.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 << 10


class HTTPError(Exception):
    """A malformed answer or a connection lost mid-answer."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    _reader: asyncio.StreamReader
    _chunked: bool
    _remaining: int | None  # Content-Length left to read (None: until the connection closes)
    _done: bool = False
    reusable: bool = True
    written_at: float = 0.0  # time.perf_counter as the request was written (after a connection)

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines (without their line ends), each as soon as its bytes arrive."""
        buf = b""
        async for data in self._chunks():
            buf += data
            *complete, buf = buf.split(b"\n")
            for line in complete:
                yield line.rstrip(b"\r").decode()
        if buf:
            yield buf.rstrip(b"\r").decode()

    async def read(self) -> bytes:
        return b"".join([data async for data in self._chunks()])

    async def _chunks(self) -> AsyncIterator[bytes]:
        r = self._reader
        try:
            if self._chunked:
                while True:
                    size = int((await r.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    if size == 0:
                        while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                            pass
                        break
                    data = await r.readexactly(size + 2)
                    yield data[:-2]
            elif self._remaining is not None:
                while self._remaining > 0:
                    data = await r.read(min(self._remaining, 1 << 16))
                    if not data:
                        raise HTTPError("the connection closed before the end of the body")
                    self._remaining -= len(data)
                    yield data
            else:
                self.reusable = False
                while data := await r.read(1 << 16):
                    yield data
        except (asyncio.IncompleteReadError, ValueError, ConnectionError) as e:
            self.reusable = False
            raise HTTPError(f"bad or cut answer: {e}") from e
        self._done = True


@dataclass
class SSEClient:
    """Keep-alive connections to one ``http://host:port``; ``stream`` borrows one per request."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    _idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)

    def __post_init__(self) -> None:
        u = urlsplit(self.url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"the lean client speaks plain http://host:port only, not {self.url!r}")
        self.host, self.port, self.root = u.hostname, u.port or 80, u.path.rstrip("/")

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> AsyncIterator[Response]:
        payload = json.dumps(body, separators=(",", ":")).encode()
        extra = {**self.headers, **(headers or {})}
        reader, writer = self._idle.pop() if self._idle else await self._connect()
        head = [f"{method} {self.root}{path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                "Content-Type: application/json", f"Content-Length: {len(payload)}",
                "Accept: text/event-stream", *(f"{k}: {v}" for k, v in extra.items())]  # fmt: skip
        response: Response | None = None
        try:
            written_at = time.perf_counter()  # before: the server may read it before write() returns
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)  # one write: one packet
            response = await _read_head(reader)
            response.written_at = written_at
            yield response
        finally:
            if response is not None and response._done and response.reusable and not writer.is_closing():
                self._idle.append((reader, writer))
            else:
                writer.close()

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port, limit=MAX_HEADER_BYTES)


async def _read_head(reader: asyncio.StreamReader) -> Response:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as e:
        raise HTTPError(f"no answer head: {e}") from e
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HTTPError(f"not an HTTP/1.x answer: {status_line!r}")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    length = None if chunked or "content-length" not in headers else int(headers["content-length"])
    response = Response(int(parts[1]), headers, reader, chunked, length)
    response.reusable = headers.get("connection", "").lower() != "close" and (chunked or length is not None)
    return response


# (status, the body's lines, read the whole body, when it was written or None) of one streamed POST
# to /v1/chat/completions
Opener = Callable[[dict[str, Any]], Any]
CHAT = "/v1/chat/completions"


@asynccontextmanager
async def open_streamer(
    kind: str, url: str, headers: dict[str, str], timeout: float
) -> AsyncIterator[Opener]:
    """``open(body)``: a context manager giving (status, the body's lines, read the whole body, when
    the request was written: None with httpx) of one streamed POST to /v1/chat/completions, through
    the lean client or httpx."""
    if kind == "lean":
        lean = SSEClient(url, headers)

        @asynccontextmanager
        async def open_lean(body: dict[str, Any]) -> AsyncIterator[tuple[int, Any, Any, float | None]]:
            async with lean.stream("POST", CHAT, body) as r:
                yield r.status, r.lines(), r.read, r.written_at

        try:
            yield open_lean
        finally:
            await lean.aclose()
        return
    if kind != "httpx":
        raise ValueError(f"client must be 'lean' or 'httpx', not {kind!r}")
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as hc:

        @asynccontextmanager
        async def open_httpx(body: dict[str, Any]) -> AsyncIterator[tuple[int, Any, Any, float | None]]:
            async with hc.stream("POST", CHAT, json=body) as r:
                yield r.status_code, r.aiter_lines(), r.aread, None

        yield open_httpx
