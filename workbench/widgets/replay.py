"""Replay recorded traces: a slider and a play button that drive any views.

One trace is scrubbed step by step. Several (the same workload on two engines, say) are scrubbed together on one time
axis: a column of views per trace, each showing its engine as it was at the slider's time.

>>> Replay(Trace.load("run.jsonl"))      # KV map, timeline, memory and throughput, scrubbed together  # doctest: +SKIP
>>> Replay([static_trace, paged_trace])  # side by side, one time axis                              # doctest: +SKIP
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import ipywidgets as widgets

from workbench.trace import Trace
from workbench.widgets.views import ALL_VIEWS, TraceView


class Replay:
    """A slider with a play button over one trace (by step) or several (by time); every view follows the slider.

    `views` are the views of one trace; with several traces each gets views of the same kinds (`columns` holds
    them, one list per trace).
    """

    def __init__(self, trace: Trace | Sequence[Trace] | None = None, views: Sequence[TraceView] | None = None,
                 frames_per_s: float = 8.0) -> None:
        self.views = list(views) if views is not None else [cls() for cls in ALL_VIEWS]
        self.columns: list[list[TraceView]] = [self.views]
        self.slider = widgets.IntSlider(description="step", min=0, max=0, value=0, continuous_update=True,
                                        layout=widgets.Layout(width="60%"))
        self.play = widgets.Play(min=0, max=0, interval=int(1000 / frames_per_s), description="play")
        widgets.jslink((self.play, "value"), (self.slider, "value"))  # in the browser
        self.play.observe(lambda change: setattr(self.slider, "value", change["new"]), names="value")  # in a kernel
        self.slider.observe(lambda change: self._show(change["new"]), names="value")
        self.label = widgets.HTML()
        self.controls = widgets.HBox([self.play, self.slider, self.label])
        self.panel = widgets.VBox([v.widget for v in self.views])
        self.widget = widgets.VBox([self.controls, self.panel])
        self.traces: list[Trace] = []
        self._times: list[float] = []  # with several traces: the slider's positions, in seconds
        if trace is not None:
            self.load(trace)

    @property
    def trace(self) -> Trace | None:
        """The (first) trace replayed."""
        return self.traces[0] if self.traces else None

    def load(self, trace: Trace | Sequence[Trace]) -> None:
        """Replay `trace` (or several) from the end (the slider goes back from there)."""
        self.traces = [trace] if isinstance(trace, Trace) else list(trace)
        while len(self.columns) < len(self.traces):  # views of the same kinds for every further trace
            self.columns.append([type(view)() for view in self.views])
        if len(self.traces) > 1:
            self._times = sorted({s.time_s for t in self.traces for s in t.steps})
            self.slider.description = "time"
            self.panel.children = [widgets.HBox([column[k].widget for column in self.columns[: len(self.traces)]])
                                   for k in range(len(self.views))]
            last = max(0, len(self._times) - 1)
        else:
            self.slider.description = "step"
            self.panel.children = [v.widget for v in self.views]
            last = max(0, len(self.traces[0].steps) - 1)
        self.play.max = self.slider.max = last
        if self.slider.value == last:
            self._show(last)
        else:
            self.slider.value = last

    def _show(self, index: int) -> None:
        if not self.traces:
            return
        if len(self.traces) == 1:
            trace = self.traces[0]
            if not trace.steps:
                return
            snap = trace.steps[index]
            self.label.value = f"engine step {snap.step}, {snap.time_s:.2f} s"
            for view in self.views:
                view.show(trace, index)
            return
        if not self._times:
            return
        now = self._times[index]
        self.label.value = f"{now:.2f} s since the start"
        for trace, column in zip(self.traces, self.columns):
            step = max(0, bisect_right([s.time_s for s in trace.steps], now) - 1)  # as the engine was at that time
            for view in column:
                view.show(trace, step)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
