"""The clock of a run: which requests may be sent now, when each was sent, and waiting for the next arrival."""

from __future__ import annotations

import threading
import time


class RunClock:
    """Releases request indexes as their arrival times (seconds after the start) pass, and, in a closed loop
    (`max_concurrency=N`), only while fewer than N released requests are unfinished: a request then waits for a
    slot, as vLLM's `bench serve --max-concurrency` makes it wait.

    `sent[i]` is when request i was released to the engine (seconds after the start): a request's timings count
    from there, and `sent[i] - arrival` is how long it waited on the client's side.
    """

    def __init__(self, arrivals: list[float], interrupt: threading.Event | None = None,
                 max_concurrency: int | None = None) -> None:
        self.interrupt = interrupt or threading.Event()  # set: stop waiting for arrivals (the engine's stop())
        self.start = time.perf_counter()
        self.max_concurrency = max_concurrency
        self.sent: list[float | None] = [None] * len(arrivals)
        self._order = sorted(range(len(arrivals)), key=lambda i: arrivals[i])
        self._arrivals = arrivals
        self._next = 0
        self._finished: set[int] = set()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def restart(self) -> None:
        """Count from now: the engine is ready. Opening a session can start threads or allocate a cache, and a
        benchmark's requests arrive at a server that is already up, so no request's latency includes that."""
        self.start = time.perf_counter()

    def arrived(self) -> list[int]:
        """Indexes of the requests released since the last call: arrived, and a slot free in a closed loop."""
        now = self.now()
        released = []
        while (self._next < len(self._order) and self._arrivals[self._order[self._next]] <= now
               and (self.max_concurrency is None or self.in_flight < self.max_concurrency)):
            i = self._order[self._next]
            self.sent[i] = now
            released.append(i)
            self._next += 1
        return released

    def done(self, i: int) -> None:
        """Request `i` finished: in a closed loop its slot goes to the next request."""
        self._finished.add(i)

    @property
    def in_flight(self) -> int:
        """Released requests not finished yet."""
        return self._next - len(self._finished)

    @property
    def pending(self) -> int:
        """Requests not released yet."""
        return len(self._order) - self._next

    def wait_for_next(self) -> None:
        """Sleep until the next request arrives (the engine has nothing to do meanwhile), or until interrupted."""
        if self._next < len(self._order):
            self.interrupt.wait(max(0.0, self._arrivals[self._order[self._next]] - self.now()))
