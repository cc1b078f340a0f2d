"""Figures that still show in an HTML report opened with no kernel and no network.

A widget's output is empty in such a page (its manager comes from a CDN), and plotly's default HTML asks a CDN for
plotly.js. `show_figure` sends both the plotly mimetype (JupyterLab draws it with its plotly extension) and an HTML
rendering whose first occurrence in the kernel carries plotly.js inline, so an executed notebook exported by
nbconvert draws every figure offline.
"""

from __future__ import annotations

import json

import plotly.graph_objects as go
import plotly.io as pio

_plotlyjs_sent = False


def figure_bundle(figure: go.Figure) -> dict:
    """The display bundle of `figure`: plotly JSON for JupyterLab, self-contained HTML for reports."""
    global _plotlyjs_sent
    include = not _plotlyjs_sent
    _plotlyjs_sent = True
    html = figure.to_html(full_html=False, include_plotlyjs=include, config={"displaylogo": False})
    # numpy arrays become lists, and NaN (a gap in a heatmap) becomes null: a kernel refuses to send NaN as JSON.
    data = json.loads(pio.to_json(figure, validate=False), parse_constant=lambda constant: None)
    return {"application/vnd.plotly.v1+json": {**data, "config": {"displaylogo": False}}, "text/html": html}


def show_figure(figure: go.Figure) -> None:
    """Display `figure` so that it shows live in JupyterLab and offline in the notebook's HTML report.

    >>> show_figure(kv_cache_figure(trace))      # doctest: +SKIP
    """
    from IPython.display import display

    display(figure_bundle(figure), raw=True)
