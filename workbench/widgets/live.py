"""Live views: an engine run feeds views at a steady frame rate, from a thread of their own.

The engine's thread does nothing extra: a drawing thread of the feed's own redraws the views at most `fps` times a
second from the trace the engine is filling in (`on_start` hands it over), so a slow browser or a large figure slows
the picture, not the engine.

>>> kv, timeline = KVCacheView(), BatchTimeline()
>>> display(kv, timeline)                                                         # doctest: +SKIP
>>> with LiveFeed([kv, timeline]) as feed:                                        # doctest: +SKIP
...     trace = engine.run(make_workload(n=16, rate=4.0), **feed.callbacks)
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

from workbench.trace import Trace
from workbench.widgets.views import TraceView


class LiveFeed:
    """Redraws `views` from a running engine's trace, at most `fps` frames a second, until closed."""

    def __init__(self, views: Sequence[TraceView], fps: float = 10.0,
                 on_frame: Callable[[Trace], None] | None = None,
                 visible: Callable[[TraceView], bool] | None = None) -> None:
        self.views = list(views)
        self.visible = visible  # views hidden (an unselected tab) are not redrawn until shown
        self.interval = 1.0 / fps
        self.on_frame = on_frame  # anything else to refresh with each frame (the Workbench's texts)
        self.trace: Trace | None = None
        self.frames = 0
        self.frame_seconds = 0.0  # time spent drawing, for the benchmark
        self._steps_drawn = -1
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def callbacks(self) -> dict:
        """The keyword arguments to give `engine.run` so that it feeds these views (it must record: the default)."""
        return {"on_start": self.on_start}

    def on_start(self, trace: Trace) -> None:
        self.trace = trace
        self._closed.clear()
        self._thread = threading.Thread(target=self._draw_loop, name="workbench-live-views", daemon=True)
        self._thread.start()

    def _draw_loop(self) -> None:
        while not self._closed.wait(self.interval):
            self.draw()

    def draw(self) -> None:
        """Redraw every view at the trace's newest step, if there is a new one."""
        trace = self.trace
        if trace is None or len(trace.steps) == self._steps_drawn:
            return
        start = time.perf_counter()
        self._steps_drawn = len(trace.steps)
        for view in self.views:
            if self.visible is None or self.visible(view):
                view.show(trace, self._steps_drawn - 1)
        if self.on_frame is not None:
            self.on_frame(trace)
        self.frames += 1
        self.frame_seconds += time.perf_counter() - start

    def close(self) -> None:
        """Stop the drawing thread and draw the final state once."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.draw()

    def __enter__(self) -> LiveFeed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
