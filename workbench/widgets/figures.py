"""Plain plotly figures drawn from a Trace at one step: what every view shows, live, replayed or in a static report.

Pure functions of the trace: no widgets, no engine. A live view calls them on a trace that is still filling in.

>>> from workbench.widgets.figures import kv_cache_figure
>>> kv_cache_figure(trace, step=10).show()      # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from workbench.analysis import prefix_cache_note
from workbench.trace import (
    BLOCK_CACHED,
    BLOCK_FREE,
    BLOCK_RESERVED,
    BLOCK_USED,
    STATES,
    StepSnapshot,
    Trace,
    reason_of,
    tokens_in_block,
)

REQUEST_COLORS = qualitative.Plotly + qualitative.D3[1:] + qualitative.Set2
BLOCK_COLORS = {BLOCK_FREE: "#eeeeee", BLOCK_CACHED: "#b7d7f0", BLOCK_RESERVED: "#555555"}
BLOCK_NAMES = {BLOCK_FREE: "free", BLOCK_CACHED: "cached (evictable)", BLOCK_USED: "in use",
               BLOCK_RESERVED: "reserved"}
STATE_COLORS = {"waiting": "#f2c94c", "prefill": "#2f80ed", "decode": "#27ae60", "preempted": "#eb5757",
                "finished": "#bdbdbd"}
STATE_CODES = {state: code for code, state in enumerate(STATES)}
GRID_COLUMNS = 32


def request_colors(trace: Trace) -> dict[str, str]:
    """A request keeps one color in every view: by its position in the trace."""
    return {r.request_id: REQUEST_COLORS[i % len(REQUEST_COLORS)] for i, r in enumerate(trace.requests)}


def _snapshot(trace: Trace, step: int) -> StepSnapshot | None:
    if not trace.steps:
        return None
    return trace.steps[step]


def _steps_upto(trace: Trace, upto: int) -> list[StepSnapshot]:
    """The steps from the first to index `upto` (negative counts from the end), inclusive."""
    return trace.steps[: (upto % len(trace.steps)) + 1] if trace.steps else []


def kv_cache_points(trace: Trace, step: int = -1) -> list[dict]:
    """One dict per physical block at `step`: id, state, owners, tokens held and the logical index in each owner.

    """
    snap = _snapshot(trace, step)
    if snap is None:
        return []
    size = trace.facts.block_size
    holders: dict[int, list[tuple[str, int, int]]] = {}
    for r in snap.requests:
        for logical, block in enumerate(r.block_ids):
            holders.setdefault(block, []).append((r.request_id, logical,
                                                  tokens_in_block(r.computed_tokens, logical, size)))
    points = []
    for block, state in enumerate(snap.blocks):
        held = holders.get(block, [])
        points.append({"block": block, "state": state, "owners": [h[0] for h in held],
                       "logical": [h[1] for h in held], "tokens": max((h[2] for h in held), default=0)})
    return points


def kv_cache_layout(trace: Trace) -> dict:
    """The block grid's frame: fixed for a trace (its size follows the number of blocks)."""
    if not trace.facts.paged:
        return dict(barmode="stack", xaxis_title="token slots", yaxis=dict(autorange="reversed"),
                    height=max(220, 60 + 18 * len(trace.requests)), margin=dict(t=40, b=30))
    rows = max(1, math.ceil(_num_blocks(trace) / GRID_COLUMNS))
    return dict(height=max(220, 60 + rows * (MARKER_SIZE + 3)), margin=dict(l=30, r=10, t=40, b=20),
                xaxis=dict(visible=False, range=[-1, GRID_COLUMNS]), yaxis=dict(visible=False, autorange="reversed"),
                plot_bgcolor="white", showlegend=False)


def _num_blocks(trace: Trace) -> int:
    return len(trace.steps[-1].blocks) if trace.steps else trace.facts.num_blocks


MARKER_SIZE = 14
_HOVER = ("block %{customdata[0]}: %{customdata[1]}<br>held by %{customdata[2]}"
          "<br>%{customdata[3]} of %{customdata[4]} tokens%{customdata[5]}<extra></extra>")


def _waiting_note(snap: StepSnapshot | None, shown: int = 2) -> str:
    """A hover line for the blocks nobody holds: who waits, and why (from the engine's state at that step)."""
    waiting = [r for r in snap.requests if r.state in ("waiting", "preempted")] if snap else []
    if not waiting:
        return ""
    lines = [f"{r.request_id} {r.state}: {reason_of(r)}" for r in waiting[:shown]]
    more = f"<br>and {len(waiting) - shown} more" if len(waiting) > shown else ""
    return "<br>" + "<br>".join(lines) + more


def kv_cache_traces(trace: Trace, step: int = -1, selected: str | None = None) -> tuple[list[dict], str]:
    """The block grid's traces at `step` and its title: every block (colored by holder), shared blocks marked with
    an x, and `selected`'s blocks outlined. Plain dicts of numpy arrays: a live view updates them ten times a
    second."""
    if not trace.facts.paged:
        return _contiguous_traces(trace, step)
    points = kv_cache_points(trace, step)
    n = len(points)
    blocks = np.arange(n)
    palette = request_colors(trace)
    colors = []
    for p in points:
        owners = p["owners"]
        colors.append(palette.get(owners[0], "#000000") if p["state"] == BLOCK_USED and owners
                      else BLOCK_COLORS.get(p["state"], "#eeeeee"))
    custom = np.empty((n, 6), dtype=object)
    waiting = _waiting_note(_snapshot(trace, step))
    for i, p in enumerate(points):
        held = ", ".join(f"{o} (logical {k})" for o, k in zip(p["owners"], p["logical"])) or "nobody"
        custom[i] = (p["block"], BLOCK_NAMES.get(p["state"], p["state"]), held, p["tokens"],
                     trace.facts.block_size, waiting if p["state"] in (BLOCK_FREE, BLOCK_CACHED) else "")
    shared = np.array([p["block"] for p in points if len(p["owners"]) > 1], dtype=int)
    picked = np.array([p["block"] for p in points if selected and selected in p["owners"]], dtype=int)
    traces = [
        dict(type="scatter", name="blocks", x=blocks % GRID_COLUMNS, y=blocks // GRID_COLUMNS, mode="markers",
             marker=dict(color=np.array(colors, dtype=object), symbol="square", size=MARKER_SIZE),
             customdata=custom, hovertemplate=_HOVER),
        dict(type="scatter", name="shared", x=shared % GRID_COLUMNS, y=shared // GRID_COLUMNS, mode="markers",
             marker=dict(color="white", symbol="x-thin", size=MARKER_SIZE * 0.6, line=dict(width=2, color="white")),
             hoverinfo="skip"),
        dict(type="scatter", name="selected", x=picked % GRID_COLUMNS, y=picked // GRID_COLUMNS, mode="markers",
             marker=dict(color="rgba(0,0,0,0)", symbol="square-open", size=MARKER_SIZE + 2,
                         line=dict(width=2, color="black")), hoverinfo="skip"),
    ]
    snap = _snapshot(trace, step)
    title = "KV cache blocks"
    if snap is not None:
        title = (f"KV cache blocks, step {snap.step}: {snap.blocks.count(BLOCK_USED)} in use of {n}, "
                 f"{len(shared)} shared, {snap.blocks.count(BLOCK_CACHED)} cached")
    note = prefix_cache_note(trace)
    if note:
        title += f"<br><sub>{note.split(':')[0]}: no block can be shared</sub>"
    return traces, title


def kv_cache_figure(trace: Trace, step: int = -1, selected: str | None = None) -> go.Figure:
    """The physical block grid at `step`: each block colored by the request holding it, shared blocks marked,
    free, cached-but-evictable and reserved blocks in greys and blue. Hover names request and tokens; `selected`
    outlines one request's blocks. A contiguous cache (no blocks) is drawn as one bar per sequence."""
    return _figure(kv_cache_layout(trace), *kv_cache_traces(trace, step, selected))


def _figure(layout: dict, traces: list[dict], title: str) -> go.Figure:
    return go.Figure(data=traces, layout={**layout, "title": title})


def _contiguous_traces(trace: Trace, step: int) -> tuple[list[dict], str]:
    snap = _snapshot(trace, step)
    requests = [r for r in snap.requests if r.state != "waiting"] if snap else []
    names = [r.request_id for r in requests]
    traces = [
        dict(type="bar", y=names, x=[r.computed_tokens - r.padding_tokens for r in requests], orientation="h",
             name="tokens", marker=dict(color=[request_colors(trace).get(n) for n in names]),
             hovertemplate="%{y}: %{x} tokens<extra></extra>"),
        dict(type="bar", y=names, x=[r.padding_tokens for r in requests], orientation="h", name="padding (waste)",
             marker=dict(color="#eb5757"), hovertemplate="%{y}: %{x} padding slots<extra></extra>"),
    ]
    waste = sum(r.padding_tokens for r in requests) * trace.facts.bytes_per_token
    title = "Contiguous KV cache per sequence"
    if snap:
        title += f", step {snap.step}: {waste / 2**20:.1f} MiB padding"
    return traces, title


def block_table(trace: Trace, request_id: str, step: int = -1) -> list[dict]:
    """`request_id`'s block table at `step`: logical block -> physical block, tokens in it, and who else holds it."""
    snap = _snapshot(trace, step)
    request = snap.request(request_id) if snap else None
    if request is None:
        return []
    owners = snap.block_owners()
    size = trace.facts.block_size
    return [{"logical": i, "physical": block,
             "tokens": tokens_in_block(request.computed_tokens, i, size),
             "shared_with": [o for o in owners.get(block, []) if o != request_id]}
            for i, block in enumerate(request.block_ids)]


def timeline_matrix(trace: Trace, upto: int = -1) -> tuple[list[str], list[int], list[list[float | None]]]:
    """(request ids, step numbers, state codes per request per step) up to step index `upto`; None where a request
    is not in the engine (not arrived yet, or gone after it finished)."""
    steps = _steps_upto(trace, upto)
    names = [r.request_id for r in trace.requests]
    row = {name: i for i, name in enumerate(names)}
    z: list[list[float | None]] = [[None] * len(steps) for _ in names]
    for column, snap in enumerate(steps):
        for r in snap.requests:
            z[row[r.request_id]][column] = STATE_CODES[r.state]
    return names, [s.step for s in steps], z


def batch_timeline_layout(trace: Trace) -> dict:
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.75, 0.25], vertical_spacing=0.04)
    figure.update_layout(height=max(300, 160 + 14 * len(trace.requests)), margin=dict(t=40, b=30),
                         legend=dict(orientation="h", y=-0.08))
    figure.update_yaxes(autorange="reversed", row=1, col=1)
    figure.update_xaxes(title_text="engine step", row=2, col=1)
    return figure.layout.to_plotly_json()


def batch_timeline_traces(trace: Trace, upto: int = -1) -> tuple[list[dict], str]:
    names, step_numbers, z = timeline_matrix(trace, upto)
    steps = trace.steps[: len(step_numbers)]
    n = len(STATES)
    scale = []
    for code, state in enumerate(STATES):
        scale += [[code / n, STATE_COLORS[state]], [(code + 1) / n, STATE_COLORS[state]]]
    codes = np.array(z, dtype=float) if step_numbers else np.zeros((len(names), 0))
    state_names = np.array([""] + list(STATES), dtype=object)[np.nan_to_num(codes, nan=-1).astype(int) + 1]
    row = {name: i for i, name in enumerate(names)}
    for column, snap in enumerate(steps):  # a waiting or preempted request's hover says why; a running one, how much
        for r in snap.requests:
            if r.state in ("waiting", "preempted"):
                state_names[row[r.request_id], column] = f"{r.state}: {reason_of(r)}"
            elif r.state in ("prefill", "decode") and r.scheduled_tokens:
                drafts = f", {r.accepted_tokens} of {r.draft_tokens} drafted accepted" if r.draft_tokens else ""
                state_names[row[r.request_id], column] = f"{r.state}, {r.scheduled_tokens} tokens computed{drafts}"
    running = [sum(r.state in ("prefill", "decode") for r in s.requests) for s in steps]
    tokens = [sum(r.scheduled_tokens for r in s.requests) for s in steps]
    # A gap (a request not yet arrived, or done) is None, not NaN: a live widget sends z as JSON, which has no NaN.
    gaps = [[None if np.isnan(code) else code for code in row] for row in codes.tolist()]
    traces = [
        dict(type="heatmap", x=step_numbers, y=names, z=gaps, zmin=-0.5, zmax=n - 0.5, colorscale=scale,
             name="state", customdata=state_names, hovertemplate="%{y}, step %{x}: %{customdata}<extra></extra>",
             colorbar=dict(tickvals=list(range(n)), ticktext=list(STATES), len=0.7, y=0.62), xaxis="x", yaxis="y"),
        dict(type="bar", x=step_numbers, y=tokens, name="tokens computed", marker=dict(color="#9b51e0"),
             opacity=0.5, xaxis="x2", yaxis="y2"),
        dict(type="scatter", x=step_numbers, y=running, name="batch size", mode="lines",
             line=dict(color="#2f80ed"), xaxis="x2", yaxis="y2"),
    ]
    return traces, f"Batching timeline: {trace.engine}"


def batch_timeline_figure(trace: Trace, upto: int = -1) -> go.Figure:
    """Requests x steps colored by state, over the batch size and tokens computed per step."""
    return _figure(batch_timeline_layout(trace), *batch_timeline_traces(trace, upto))


def speculation_figure(trace: Trace) -> go.Figure:
    """Speculative decoding, step by step: the draft tokens each step verified, how many of them were accepted, and
    the run's acceptance rate so far (accepted / drafted)."""
    steps = [s.step for s in trace.steps]
    drafted = [sum(r.draft_tokens for r in s.requests) for s in trace.steps]
    accepted = [sum(r.accepted_tokens for r in s.requests) for s in trace.steps]
    total_d, total_a, rate = 0, 0, []
    for d, a in zip(drafted, accepted):
        total_d, total_a = total_d + d, total_a + a
        rate.append(total_a / total_d if total_d else None)
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_bar(x=steps, y=accepted, name="accepted", marker_color="#27ae60")
    figure.add_bar(x=steps, y=[d - a for d, a in zip(drafted, accepted)], name="rejected", marker_color="#eb5757")
    figure.add_scatter(x=steps, y=rate, name="acceptance rate so far", mode="lines", line=dict(color="#2f80ed"),
                       secondary_y=True)
    figure.update_layout(barmode="stack", height=320, margin=dict(t=50, b=40), xaxis_title="engine step",
                         title=f"Draft tokens verified per step: {trace.engine}", legend=dict(orientation="h", y=-0.25))
    figure.update_yaxes(title_text="draft tokens", secondary_y=False)
    figure.update_yaxes(title_text="accepted / drafted", range=[0, 1.05], secondary_y=True)
    return figure


def scheduled_tokens_figure(trace: Trace, budget: int | None = None) -> go.Figure:
    """Tokens the engine computed for each request at each step, stacked: how a step's token budget was shared out.
    With chunked prefill a long prompt's prefill is a run of chunks that fill what the decoding requests leave of
    the budget (`budget`, drawn as a line when given); without it, one step carries the whole prompt."""
    palette = request_colors(trace)
    by_request: dict[str, list[tuple[int, int, str]]] = {}
    for s in trace.steps:
        for r in s.requests:
            if r.scheduled_tokens:
                by_request.setdefault(r.request_id, []).append((s.step, r.scheduled_tokens, r.state))
    figure = go.Figure()
    for q in trace.requests:
        points = by_request.get(q.request_id)
        if points:
            figure.add_bar(x=[p[0] for p in points], y=[p[1] for p in points], name=q.request_id,
                           marker_color=palette[q.request_id], customdata=[p[2] for p in points],
                           hovertemplate=f"{q.request_id}, step %{{x}}: %{{y}} tokens (%{{customdata}})<extra></extra>")
    if budget:
        figure.add_hline(y=budget, line_dash="dot", annotation_text=f"token budget per step ({budget})")
    figure.update_layout(barmode="stack", height=320, margin=dict(t=50, b=40), xaxis_title="engine step",
                         yaxis_title="tokens computed", title=f"Tokens computed per step, by request: {trace.engine}")
    return figure


MEMORY_PARTS = ("weights", "KV in use", "KV reserved, unused", "rest of the process")


def memory_series(trace: Trace, upto: int = -1, rank: int | None = None) -> dict[str, list[float]]:
    """Bytes per part of memory at each step up to `upto`, and the step times; of one rank's share with `rank`
    (an engine split over ranks: its weights, KV cache and process)."""
    steps = _steps_upto(trace, upto)
    series: dict[str, list[float]] = {"time_s": [s.time_s for s in steps]}
    for part in MEMORY_PARTS:
        series[part] = []
    for s in steps:
        m = s.memory if rank is None else next(r for r in s.memory.ranks if r.rank == rank)
        series["weights"].append(m.weights_bytes)
        series["KV in use"].append(m.kv_used_bytes)
        series["KV reserved, unused"].append(max(0, m.kv_reserved_bytes - m.kv_used_bytes))
        # On a GPU the weights and KV cache are device memory, so the rest is what else torch holds there.
        held = m.device_allocated_bytes or m.process_rss_bytes
        series["rest of the process"].append(max(0, held - m.weights_bytes - m.kv_reserved_bytes))
    return series


def memory_ranks(trace: Trace) -> list[int]:
    """The ranks whose memory the trace carries ([] for an engine in one piece)."""
    return [r.rank for r in trace.steps[0].memory.ranks] if trace.steps else []


def memory_layout(trace: Trace) -> dict:
    ranks = memory_ranks(trace)
    if not ranks:
        return dict(xaxis_title="seconds", yaxis_title="MiB", height=300, margin=dict(t=40, b=30))
    layout = dict(xaxis_title="seconds", height=120 + 200 * len(ranks), margin=dict(t=40, b=30))
    gap = 0.08
    for row, rank in enumerate(ranks):  # one panel per rank, rank 0 on top, on a shared time axis
        top = 1 - row / len(ranks)
        layout["yaxis" if row == 0 else f"yaxis{row + 1}"] = dict(
            domain=[max(0.0, top - 1 / len(ranks) + gap / 2), top - gap / 2], title=f"rank {rank}, MiB")
    return layout


def memory_traces(trace: Trace, upto: int = -1) -> tuple[list[dict], str]:
    colors = ("#828282", "#27ae60", "#a8e6bf", "#f2c94c")
    ranks = memory_ranks(trace)
    if not ranks:
        series = memory_series(trace, upto)
        return [dict(type="scatter", x=series["time_s"], y=np.array(series[part]) / 2**20, name=part,
                     stackgroup="memory", line=dict(width=0.5, color=color))
                for part, color in zip(MEMORY_PARTS, colors)], f"{_memory_place(trace)}: {trace.engine}"
    traces = []
    for row, rank in enumerate(ranks):
        series = memory_series(trace, upto, rank)
        axis = "y" if row == 0 else f"y{row + 1}"
        traces += [dict(type="scatter", x=series["time_s"], y=np.array(series[part]) / 2**20, name=part,
                        legendgroup=part, showlegend=row == 0, stackgroup=f"rank {rank}", yaxis=axis,
                        line=dict(width=0.5, color=color),
                        hovertemplate=f"rank {rank}, {part}: %{{y:.1f}} MiB<extra></extra>")
                   for part, color in zip(MEMORY_PARTS, colors)]
    return traces, f"Memory per rank ({len(ranks)} ranks, each its own process): {trace.engine}"


def _memory_place(trace: Trace) -> str:
    # An engine on a GPU holds its weights there from the first step: one step says it, at every live frame.
    on_gpu = bool(trace.steps) and trace.steps[0].memory.device_allocated_bytes > 0
    return "GPU memory (torch's allocations)" if on_gpu else "Memory"


def memory_figure(trace: Trace, upto: int = -1) -> go.Figure:
    """Weights, KV in use, KV reserved but unused, and the rest of the process, stacked over time (MiB); a panel
    per rank for an engine split over ranks.

    On a GPU the rest is what else torch holds on the device (activations, buffers), not the process's RAM."""
    return _figure(memory_layout(trace), *memory_traces(trace, upto))


def throughput_series(trace: Trace, upto: int = -1, window: int = 8) -> dict[str, list]:
    """Output tokens per second over a sliding window of steps, and each request's time to first token and time
    per output token as far as the steps up to `upto` show them (arrival times come from the trace's requests)."""
    steps = _steps_upto(trace, upto)
    produced, last = [], {}
    for s in steps:
        new = 0
        for r in s.requests:
            new += max(0, r.output_tokens - last.get(r.request_id, 0))
            last[r.request_id] = max(last.get(r.request_id, 0), r.output_tokens)
        produced.append(new)
    times = [s.time_s for s in steps]
    rate = []
    for i in range(len(steps)):
        j = max(0, i - window)
        span = times[i] - times[j] if i > j else 0.0
        rate.append(sum(produced[j + 1: i + 1]) / span if span > 0 else 0.0)
    arrival = {r.request_id: r.arrival_s for r in trace.requests}
    first, final = {}, {}
    for s in steps:
        for r in s.requests:
            if r.output_tokens > 0:
                first.setdefault(r.request_id, (s.time_s, r.output_tokens))
                final[r.request_id] = (s.time_s, r.output_tokens)
    names = [name for name in arrival if name in first]
    ttft = [first[n][0] - arrival[n] for n in names]
    tpot = [(final[n][0] - first[n][0]) / (final[n][1] - first[n][1]) if final[n][1] > first[n][1] else None
            for n in names]
    return {"time_s": times, "tokens_per_s": rate, "request_id": names, "ttft_s": ttft, "tpot_s": tpot}


def throughput_layout(trace: Trace) -> dict:
    figure = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                           subplot_titles=("output tokens/s", "per request (s)"))
    figure.update_layout(height=320, margin=dict(t=60, b=30), legend=dict(orientation="h", y=-0.2))
    figure.update_xaxes(title_text="seconds", row=1, col=1)
    return figure.layout.to_plotly_json()


def throughput_traces(trace: Trace, upto: int = -1) -> tuple[list[dict], str]:
    data = throughput_series(trace, upto)
    return [
        dict(type="scatter", x=data["time_s"], y=data["tokens_per_s"], name="tokens/s", mode="lines",
             line=dict(color="#2f80ed"), xaxis="x", yaxis="y"),
        dict(type="bar", x=data["request_id"], y=data["ttft_s"], name="time to first token (from arrival)",
             marker=dict(color="#f2994a"), xaxis="x2", yaxis="y2"),
        dict(type="bar", x=data["request_id"], y=data["tpot_s"], name="time per output token",
             marker=dict(color="#27ae60"), xaxis="x2", yaxis="y2"),
    ], f"Throughput and latency: {trace.engine}"


def throughput_figure(trace: Trace, upto: int = -1) -> go.Figure:
    """Output tokens/s over time, and time to first token (from the request's arrival, so a wait before it was sent
    counts) and time per output token for each request."""
    return _figure(throughput_layout(trace), *throughput_traces(trace, upto))


def replay_figure(draw, trace: Trace, max_frames: int = 60) -> go.Figure:
    """An animation of `draw(trace, step)` over the trace's steps (at most `max_frames`, evenly spread), with a
    play button and a step slider: a replay that needs no kernel.

    >>> replay_figure(kv_cache_figure, trace).show()      # doctest: +SKIP
    """
    if not trace.steps:
        return draw(trace, -1)
    count = len(trace.steps)
    indexes = sorted({round(i * (count - 1) / max(1, max_frames - 1)) for i in range(min(count, max_frames))})
    last = draw(trace, indexes[-1])
    frames = []
    for i in indexes:
        figure = last if i == indexes[-1] else draw(trace, i)
        frames.append(go.Frame(data=figure.data, name=str(trace.steps[i].step),
                               layout=dict(title=figure.layout.title)))
    figure = go.Figure(data=draw(trace, indexes[0]).data, layout=last.layout, frames=frames)
    play = dict(frame=dict(duration=150, redraw=True), fromcurrent=True, transition=dict(duration=0))
    figure.update_layout(
        updatemenus=[dict(type="buttons", showactive=False, x=0, y=-0.05, xanchor="left", yanchor="top",
                          buttons=[dict(label="Play", method="animate", args=[None, play]),
                                   dict(label="Pause", method="animate",
                                        args=[[None], dict(mode="immediate", frame=dict(duration=0))])])],
        sliders=[dict(active=0, x=0.12, len=0.88, y=-0.02, currentvalue=dict(prefix="step "),
                      steps=[dict(label=f.name, method="animate",
                                  args=[[f.name], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
                             for f in frames])])
    return figure


def request_spans_figure(traces: dict[str, Trace]) -> go.Figure:
    """Each engine's requests on one time axis, a row of bars per engine: from arrival to the first token (waiting,
    or prefilling) and from the first token to the last (generating). The same requests on two engines side by
    side: where one keeps a request waiting, the other is already generating it."""
    figure = make_subplots(rows=len(traces), cols=1, shared_xaxes=True, subplot_titles=list(traces),
                           vertical_spacing=0.08)
    for row, trace in enumerate(traces.values(), start=1):
        names = [q.request_id for q in trace.requests]
        sent = [q.arrival_s + r.metrics.queue_s for q, r in zip(trace.requests, trace.results)]
        first = [s + r.metrics.ttft_s for s, r in zip(sent, trace.results)]
        last = [s + r.metrics.total_s for s, r in zip(sent, trace.results)]
        arrival = [q.arrival_s for q in trace.requests]
        for label, starts, ends, color in (("waiting for its first token", arrival, first, STATE_COLORS["waiting"]),
                                           ("generating", first, last, STATE_COLORS["decode"])):
            figure.add_bar(y=names, x=[e - s for s, e in zip(starts, ends)], base=starts, orientation="h",
                           name=label, marker_color=color, legendgroup=label, showlegend=row == 1, row=row, col=1,
                           hovertemplate="%{y}: %{base:.2f} s to %{x:.2f} s later<extra></extra>")
        figure.update_yaxes(autorange="reversed", row=row, col=1)
    figure.update_xaxes(title_text="seconds since the first arrival", row=len(traces), col=1)
    figure.update_layout(barmode="overlay", height=140 + 40 * sum(len(t.requests) for t in traces.values()),
                         title="The same requests, side by side", margin=dict(t=70, b=40))
    return figure
