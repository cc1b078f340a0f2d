"""Streaming HTTP requests sent from one asyncio event loop in its own thread, each stamped at the socket.

A benchmark client is only as exact as its clock readings: a request's send time is read as its body is written to
the socket (aiohttp's request tracing), and each server-sent event is stamped when its bytes are read, before any
parsing. One event loop serves every stream of an engine, so no thread pool stands between a server's bytes and
their stamp. aiohttp is the client vLLM's own `bench serve` uses: at 64 requests sent at once it spends a fifth of
the time httpx's async client does before the last one is out (measured here with `bench/client_ceiling.py`'s
server), and on a machine the server shares, the client's time is the server's loss.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

T = TypeVar("T")


@dataclass
class Stamps:
    """When a request's body was written to the socket (a `time.perf_counter()` reading)."""

    sent: float | None = None


class HTTPStatusError(Exception):
    """A server answered with an error status; `body` is its JSON (or its text)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class StreamClient:
    """An asyncio event loop running in a daemon thread, with one `aiohttp.ClientSession` that lives in it.

    >>> client = StreamClient(timeout_s=60)                                          # doctest: +SKIP
    >>> client.call(get_json(client.http, "http://127.0.0.1:8000/v1/models", {}))    # doctest: +SKIP
    """

    def __init__(self, timeout_s: float) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="workbench-http", daemon=True)
        self._thread.start()
        self.http = self.call(self._open(timeout_s))

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @staticmethod
    async def _open(timeout_s: float):
        import aiohttp

        tracing = aiohttp.TraceConfig()
        tracing.on_request_chunk_sent.append(_stamp_sent)
        # No cap on connections: a run may hold hundreds of streams at once. `sock_read` bounds the wait for each
        # read, not the whole answer, which may stream for minutes. An idle connection is dropped after 4 s, before
        # the servers drop it themselves (llama.cpp's and uvicorn's after 5 s): a request sent on a connection the
        # server has just closed fails with "Server disconnected".
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=4),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s),
            trace_configs=[tracing])

    def submit(self, coroutine: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Run `coroutine` in the client's loop; the future is resolved there."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Awaitable[T]) -> T:
        """Run `coroutine` in the client's loop and wait for its result in this thread."""
        return self.submit(coroutine).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self.http.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _stamp_sent(session, context, params) -> None:
    stamps = context.trace_request_ctx
    if isinstance(stamps, Stamps):
        stamps.sent = time.perf_counter()


async def _raise_for_status(response) -> None:
    if response.status >= 400:
        text = await response.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text[:200]
        raise HTTPStatusError(response.status, body)


async def get_json(http, url: str, headers: dict[str, str]) -> Any:
    """GET `url` and return its JSON; a status of 400 or more raises `HTTPStatusError`."""
    async with http.get(url, headers=headers) as response:
        await _raise_for_status(response)
        return await response.json(content_type=None)


async def _post(http, url: str, body: dict[str, Any], headers: dict[str, str], stamps: Stamps):
    """POST, and once more if the pooled connection it went out on was one the server had just closed (a server
    drops idle connections after a few seconds, and on a busy machine that can beat the pool's own 4 s): no byte of
    an answer came back, and `stamps.sent` is taken again as the second request is written."""
    import aiohttp

    try:
        return await http.post(url, json=body, headers=headers, trace_request_ctx=stamps)
    except aiohttp.ServerDisconnectedError:
        return await http.post(url, json=body, headers=headers, trace_request_ctx=stamps)


async def server_sent_events(http, url: str, body: dict[str, Any], headers: dict[str, str],
                             stamps: Stamps) -> AsyncIterator[tuple[float, bytes]]:
    """POST `body` as JSON to `url` and yield `(arrival time, data)` for each server-sent event of the answer.

    `stamps.sent` is set as the request's body is written to the socket; an event's arrival time is when the bytes
    that completed it were read. A status of 400 or more raises `HTTPStatusError`. Leaving the iteration early
    closes the connection, which makes a server abort the request.
    """
    async with await _post(http, url, body, headers, stamps) as response:
        await _raise_for_status(response)
        buffer = b""
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            buffer = (buffer + chunk).replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        data = line[5:].strip()
                        if data and data != b"[DONE]":
                            yield now, data
