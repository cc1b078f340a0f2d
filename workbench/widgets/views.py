"""The views: each shows a Trace at one step in a plotly FigureWidget, live (a trace still filling in), replayed,
or as a static figure for reports. Views read traces only; they never touch an engine.

>>> view = KVCacheView(trace)                 # a saved or finished trace: shows its last step    # doctest: +SKIP
>>> view.show(step=12)                                                                           # doctest: +SKIP
>>> view.show_static()                        # a plain figure that survives an HTML export       # doctest: +SKIP
"""

from __future__ import annotations

import html
import threading
from typing import Callable

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from workbench.trace import Trace
from workbench.widgets import figures
from workbench.widgets.static import show_figure


class _FigureWidget(go.FigureWidget):
    """A FigureWidget whose frontend messages wait for the view's lock.

    The browser answers every edit with layout and trace deltas, which the kernel's main thread applies while
    holding the widget's trait notifications; an edit sent meanwhile from the live feed's thread would be sent as
    None and lost (a blank plot). Taking one lock for both keeps them apart.
    """

    def __init__(self, lock: threading.RLock) -> None:
        super().__init__()
        self._workbench_lock = lock

    def set_state(self, sync_data):
        with self._workbench_lock:
            super().set_state(sync_data)


class TraceView:
    """A figure of a trace at one step. Subclasses name the figure's frame (`layout_of`, fixed for a trace) and its
    traces at a step (`traces_of`), both from `workbench.widgets.figures`."""

    layout_of: Callable[[Trace], dict]
    traces_of: Callable[..., tuple[list[dict], str]]

    def __init__(self, trace: Trace | None = None, step: int = -1) -> None:
        self.trace = trace
        self.step = step
        self._lock = threading.RLock()  # the live feed draws from its own thread; a pick redraws inside a draw
        self.figure_widget = _FigureWidget(self._lock)
        self._framed: Trace | None = None  # the trace whose frame the widget has
        self._sent: list[dict] = []  # the traces as last drawn
        self.widget = widgets.VBox([self.figure_widget, *self._controls()])
        if trace is not None:
            self.show(trace, step)

    def _controls(self) -> list[widgets.Widget]:
        return []

    def _traces(self, step: int) -> tuple[list[dict], str]:
        return type(self).traces_of(self._require_trace(), step)

    def figure(self, step: int | None = None) -> go.Figure:
        """The view as a plain plotly figure (what a static report shows)."""
        traces, title = self._traces(self.step if step is None else step)
        return go.Figure(data=traces, layout={**type(self).layout_of(self._require_trace()), "title": title})

    def replay_figure(self, max_frames: int = 60) -> go.Figure:
        """The whole trace as an animated figure with play button and step slider: a replay without a kernel."""
        return figures.replay_figure(lambda trace, step: self.figure(step), self._require_trace(), max_frames)

    def show(self, trace: Trace | None = None, step: int = -1) -> None:
        """Draw `trace` (default: the one shown) at step index `step` (-1: the last) into the widget."""
        with self._lock:
            if trace is not None:
                self.trace = trace
            self.step = step
            if self.trace is None:
                return
            traces, title = self._traces(step)
            widget = self.figure_widget
            if self._framed is not self.trace or len(widget.data) != len(traces):
                # A new trace: lay out the frame once (subplots and templates are slow to build and to send).
                with widget.batch_update():
                    widget.data = ()
                    widget.layout = type(self).layout_of(self.trace)
                widget.add_traces(traces)
                self._framed = self.trace
            else:
                # The same trace a step later: send only what changed since the last frame (validating and sending
                # a plotly property costs far more than comparing it), ten times a second if need be.
                with widget.batch_update():
                    for shown, previous, new in zip(widget.data, self._sent, traces):
                        changed = {k: v for k, v in new.items() if k != "type" and not _same(previous.get(k), v)}
                        if changed:
                            shown.update(changed, overwrite=True)
            self._sent = traces
            if widget.layout.title.text != title:
                widget.layout.title.text = title
            self._after_show()

    def _after_show(self) -> None:
        pass

    def show_static(self, step: int | None = None) -> None:
        """Display the view as a static figure, drawn even in an HTML export opened offline."""
        show_figure(self.figure(step))

    def _require_trace(self) -> Trace:
        if self.trace is None:
            raise ValueError(f"{type(self).__name__} has no trace yet: pass one, or run an engine with it live.")
        return self.trace

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def _same(a, b) -> bool:
    """Whether two plotly property values are equal: numbers, strings, lists, dicts or numpy arrays."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
        return a.shape == b.shape and bool((a == b).all())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class KVCacheView(TraceView):
    """The physical block grid: which request holds each block, shared prefix blocks, free and evictable blocks.
    Picking a request shows its block table (logical block -> physical block)."""

    layout_of = staticmethod(figures.kv_cache_layout)

    def _controls(self) -> list[widgets.Widget]:
        self.request_picker = widgets.Dropdown(description="request", options=[("none", "")], value="")
        self.request_picker.observe(lambda change: self.show(step=self.step), names="value")
        self.block_table = widgets.HTML()
        return [widgets.HBox([self.request_picker]), self.block_table]

    def _traces(self, step: int) -> tuple[list[dict], str]:
        return figures.kv_cache_traces(self._require_trace(), step, self.request_picker.value or None)

    def _after_show(self) -> None:
        trace = self.trace
        snap = trace.steps[self.step] if trace.steps else None
        names = [r.request_id for r in snap.requests if r.block_ids] if snap else []
        current = self.request_picker.value
        options = [("none", "")] + [(n, n) for n in names]
        if current and current not in names:
            options.append((current, current))  # keep the pick while its request waits or is preempted
        if [o[1] for o in self.request_picker.options] != [o[1] for o in options]:
            with self.request_picker.hold_trait_notifications():
                self.request_picker.options = options
                self.request_picker.value = current
        self.block_table.value = _block_table_html(figures.block_table(trace, current, self.step)) if current else ""


def _block_table_html(rows: list[dict]) -> str:
    if not rows:
        return "<i>no blocks held at this step</i>"
    cells = "".join(f"<tr><td>{r['logical']}</td><td>{r['physical']}</td><td>{r['tokens']}</td>"
                    f"<td>{html.escape(', '.join(r['shared_with']))}</td></tr>" for r in rows)
    return ("<table><tr><th>logical</th><th>physical</th><th>tokens</th><th>shared with</th></tr>"
            f"{cells}</table>")


class BatchTimeline(TraceView):
    """Requests x steps colored by state (waiting, prefill, decode, preempted, finished), with batch size and
    tokens computed per step."""

    layout_of = staticmethod(figures.batch_timeline_layout)
    traces_of = staticmethod(figures.batch_timeline_traces)


class MemoryView(TraceView):
    """Weights, KV cache in use, KV reserved but unused, and the rest of the process, over time."""

    layout_of = staticmethod(figures.memory_layout)
    traces_of = staticmethod(figures.memory_traces)


class ThroughputView(TraceView):
    """Output tokens/s over time; time to first token and time per output token per request."""

    layout_of = staticmethod(figures.throughput_layout)
    traces_of = staticmethod(figures.throughput_traces)


ALL_VIEWS = (KVCacheView, BatchTimeline, MemoryView, ThroughputView)
