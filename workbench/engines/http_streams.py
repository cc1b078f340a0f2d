"""Streaming HTTP requests sent from one asyncio event loop in its own thread, each stamped at the socket.

A benchmark client is only as exact as its clock readings: here a request's send time is read when its body has been
written to the socket (httpcore's trace hook), and each server-sent event is stamped when its bytes are read, before
any parsing. One event loop serves every stream of an engine, so no thread pool stands between a server's bytes and
their stamp.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

T = TypeVar("T")


@dataclass
class Stamps:
    """When a request's body had been written to the socket (a `time.perf_counter()` reading)."""

    sent: float | None = None


class StreamClient:
    """An asyncio event loop running in a daemon thread, with one `httpx.AsyncClient` that lives in it.

    >>> client = StreamClient(timeout_s=60)                                  # doctest: +SKIP
    >>> client.call(client.http.get("http://127.0.0.1:8000/health"))         # doctest: +SKIP
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
        import httpx

        # No cap on connections: a run may hold hundreds of streams at once.
        return httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=None,
                                                                        max_keepalive_connections=256))

    def submit(self, coroutine: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Run `coroutine` in the client's loop; the future is resolved there."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def call(self, coroutine: Awaitable[T]) -> T:
        """Run `coroutine` in the client's loop and wait for its result in this thread."""
        return self.submit(coroutine).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.call(self.http.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def server_sent_events(http, url: str, body: dict[str, Any], headers: dict[str, str],
                             stamps: Stamps) -> AsyncIterator[tuple[float, bytes]]:
    """POST `body` as JSON to `url` and yield `(arrival time, data)` for each server-sent event of the answer.

    `stamps.sent` is set when the request's body has been written to the socket; an event's arrival time is when the
    bytes that completed it were read. A status of 400 or more raises `httpx.HTTPStatusError` with the body read.
    Leaving the iteration early closes the connection, which makes a server abort the request.
    """
    async def trace(name: str, info: dict) -> None:
        if name == "http11.send_request_body.complete":
            stamps.sent = time.perf_counter()

    async with http.stream("POST", url, json=body, headers=headers, extensions={"trace": trace}) as response:
        if response.status_code >= 400:
            await response.aread()
            response.raise_for_status()
        buffer = b""
        async for chunk in response.aiter_raw():
            now = time.perf_counter()
            buffer = (buffer + chunk).replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        data = line[5:].strip()
                        if data and data != b"[DONE]":
                            yield now, data
