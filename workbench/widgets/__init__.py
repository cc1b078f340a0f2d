"""Widgets for notebooks: the Workbench, and views of engine traces that work live, replayed, or as static figures.

>>> from workbench.widgets import Workbench, KVCacheView, Replay
>>> Workbench()                                   # load, run, watch                      # doctest: +SKIP
>>> Replay(trace)                                 # scrub a recorded run step by step     # doctest: +SKIP
>>> KVCacheView(trace).show_static()              # a figure that survives an HTML export # doctest: +SKIP
"""

from workbench.widgets.app import Workbench
from workbench.widgets.live import LiveFeed
from workbench.widgets.replay import Replay
from workbench.widgets.static import show_figure
from workbench.widgets.views import BatchTimeline, KVCacheView, MemoryView, ThroughputView, TraceView

__all__ = ["BatchTimeline", "KVCacheView", "LiveFeed", "MemoryView", "Replay", "ThroughputView", "TraceView",
           "Workbench", "show_figure"]
