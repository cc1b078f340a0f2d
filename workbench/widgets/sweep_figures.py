"""Plain plotly figures of a load sweep (`workbench.sweep`): latency against throughput with the knee marked, goodput
against offered load, and under each, on the same x axis, what the engine did (queue, batch, KV cache, preemptions).

>>> from workbench.widgets.sweep_figures import sweep_figure
>>> sweep_figure(points, "vllm").show()      # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.sweeps import saturation_point

if TYPE_CHECKING:
    import pandas as pd

LATENCIES = (("ttft", "TTFT", "#f2994a"), ("itl", "ITL", "#27ae60"), ("e2el", "E2E latency", "#2f80ed"))
# engine state column -> (legend name, color, on the right-hand axis in %)
STATE = {"waiting_max": ("queue (max waiting)", "#eb5757", False), "running_mean": ("batch (mean running)",
                                                                                    "#2f80ed", False),
         "preemptions": ("preemptions", "#9b51e0", False), "kv_usage_peak": ("KV cache peak %", "#27ae60", True)}


def sweep_figure(points: pd.DataFrame, name: str = "") -> go.Figure:
    """Left: median and p99 latencies (ms, log scale) against achieved output throughput, the knee (the lightest load
    reaching 95% of the peak throughput) marked. Right: request throughput and goodput against offered load. Under
    each, the engine's state at every point, on the same x axis."""
    figure = make_subplots(rows=2, cols=2, shared_xaxes="columns", row_heights=[0.6, 0.4], vertical_spacing=0.08,
                           horizontal_spacing=0.12, specs=[[{}, {}], [{"secondary_y": True}, {"secondary_y": True}]],
                           subplot_titles=("latency against achieved throughput", "throughput against offered load",
                                           "engine state", "engine state"))
    achieved = points["output_throughput"]
    offered = points["load"]
    for metric, label, color in LATENCIES:
        for stat, dash in (("median", "solid"), ("p99", "dash")):
            figure.add_scatter(x=achieved, y=points[f"{stat}_{metric}_ms"], name=f"{label} {stat}",
                               mode="lines+markers", line=dict(color=color, dash=dash), legendgroup="latency",
                               row=1, col=1,
                               customdata=offered, hovertemplate="%{customdata}: %{y:.0f} ms<extra></extra>")
    figure.add_scatter(x=offered, y=points["request_throughput"], name="requests/s", mode="lines+markers",
                       line=dict(color="#333333"), row=1, col=2)
    if points["request_goodput"].notna().any():
        figure.add_scatter(x=offered, y=points["request_goodput"], name="goodput (requests/s within SLOs)",
                           mode="lines+markers", line=dict(color="#27ae60"), row=1, col=2)
    for col, x in ((1, achieved), (2, offered)):
        for column, (label, color, percent) in STATE.items():
            if column not in points or points[column].isna().all():
                continue
            y = points[column] * 100 if percent else points[column]
            figure.add_scatter(x=x, y=y, name=label, mode="lines+markers", line=dict(color=color),
                               legendgroup=column, showlegend=col == 1, row=2, col=col, secondary_y=percent)
    knee = saturation_point(points)
    if knee is not None:
        figure.add_vline(x=float(achieved.loc[knee]), line=dict(color="#999999", dash="dot"), row=1, col=1)
        figure.add_annotation(x=float(achieved.loc[knee]), y=1, yref="y domain", text=f"knee: {offered.loc[knee]}",
                              showarrow=False, xanchor="left", row=1, col=1)
    figure.update_yaxes(type="log", title_text="ms", row=1, col=1)
    figure.update_yaxes(title_text="requests/s", rangemode="tozero", row=1, col=2)
    for col in (1, 2):
        figure.update_yaxes(title_text="requests", rangemode="tozero", row=2, col=col, secondary_y=False)
        figure.update_yaxes(title_text="KV %", range=[0, 105], row=2, col=col, secondary_y=True)
    figure.update_xaxes(title_text="output tokens/s", row=2, col=1)
    figure.update_xaxes(title_text="offered load", type="category", row=2, col=2)
    figure.update_layout(title=f"Load sweep{': ' + name if name else ''}", height=620,
                         legend=dict(orientation="h", y=-0.12), margin=dict(t=70, b=40))
    return figure


def sweeps_compare_figure(sweeps: dict[str, pd.DataFrame], latency: str = "p99_e2el_ms") -> go.Figure:
    """Every engine's curve of `latency` against achieved output throughput, one line per engine: further right
    serves more, lower answers sooner."""
    figure = go.Figure()
    for name, points in sweeps.items():
        figure.add_scatter(x=points["output_throughput"], y=points[latency], name=name, mode="lines+markers",
                           customdata=points["load"], hovertemplate="%{customdata}: %{y:.0f} ms<extra></extra>")
    figure.update_layout(title=f"{latency.replace('_ms', '').replace('_', ' ')} against throughput", height=380,
                         xaxis_title="output tokens/s", yaxis_title="ms", yaxis_type="log")
    return figure
