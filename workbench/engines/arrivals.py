"""The clock of a run: which requests have arrived by now, and waiting for the next one when the engine is idle."""

from __future__ import annotations

import threading
import time


class RunClock:
    """Releases request indexes as their arrival times (seconds after the start) pass."""

    def __init__(self, arrivals: list[float], interrupt: threading.Event | None = None) -> None:
        self.interrupt = interrupt or threading.Event()  # set: stop waiting for arrivals (the engine's stop())
        self.start = time.perf_counter()
        self._order = sorted(range(len(arrivals)), key=lambda i: arrivals[i])
        self._arrivals = arrivals
        self._next = 0

    def now(self) -> float:
        return time.perf_counter() - self.start

    def arrived(self) -> list[int]:
        """Indexes of the requests that arrived since the last call."""
        now = self.now()
        released = []
        while self._next < len(self._order) and self._arrivals[self._order[self._next]] <= now:
            released.append(self._order[self._next])
            self._next += 1
        return released

    @property
    def pending(self) -> int:
        return len(self._order) - self._next

    def wait_for_next(self) -> None:
        """Sleep until the next request arrives (the engine has nothing to do meanwhile), or until interrupted."""
        if self._next < len(self._order):
            self.interrupt.wait(max(0.0, self._arrivals[self._order[self._next]] - self.now()))
