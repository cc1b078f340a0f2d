"""Replay a recorded trace step by step: a slider and a play button that drive any views.

>>> Replay(Trace.load("run.jsonl"))      # KV map, timeline, memory and throughput, scrubbed together  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import ipywidgets as widgets

from workbench.trace import Trace
from workbench.widgets.views import ALL_VIEWS, TraceView


class Replay:
    """A step slider with a play button over `trace`; every view follows the slider."""

    def __init__(self, trace: Trace | None = None, views: Sequence[TraceView] | None = None,
                 frames_per_s: float = 8.0) -> None:
        self.views = list(views) if views is not None else [cls() for cls in ALL_VIEWS]
        self.slider = widgets.IntSlider(description="step", min=0, max=0, value=0, continuous_update=True,
                                        layout=widgets.Layout(width="60%"))
        self.play = widgets.Play(min=0, max=0, interval=int(1000 / frames_per_s), description="play")
        widgets.jslink((self.play, "value"), (self.slider, "value"))  # in the browser
        self.play.observe(lambda change: setattr(self.slider, "value", change["new"]), names="value")  # in a kernel
        self.slider.observe(lambda change: self._show(change["new"]), names="value")
        self.label = widgets.HTML()
        self.controls = widgets.HBox([self.play, self.slider, self.label])
        self.widget = widgets.VBox([self.controls, *(v.widget for v in self.views)])
        self.trace: Trace | None = None
        if trace is not None:
            self.load(trace)

    def load(self, trace: Trace) -> None:
        """Replay `trace` from its last step (the slider goes back from there)."""
        self.trace = trace
        last = max(0, len(trace.steps) - 1)
        self.play.max = self.slider.max = last
        if self.slider.value == last:
            self._show(last)
        else:
            self.slider.value = last

    def _show(self, index: int) -> None:
        if self.trace is None or not self.trace.steps:
            return
        snap = self.trace.steps[index]
        self.label.value = f"engine step {snap.step}, {snap.time_s:.2f} s"
        for view in self.views:
            view.show(self.trace, index)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
