"""The fast layer: traces recorded from real engines (tests/data, made by tests/data/make_traces.py) read back, and
what reads traces tested on them without loading an engine: Trace, its DataFrames and Perfetto export, the analyses,
the figures and the views."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from workbench.analysis import (
    engine_state,
    kv_waste,
    kv_waste_measured,
    prefix_cache_note,
    run_summary,
    serving_metrics,
    speculation,
)
from workbench.trace import BLOCK_CACHED, BLOCK_FREE, BLOCK_USED, STATES, Trace, merge_ranks, reason_of
from workbench.widgets import figures
from workbench.widgets.replay import Replay
from workbench.widgets.views import BatchTimeline, KVCacheView, MemoryView, ThroughputView

DATA = Path(__file__).resolve().parent / "data"
NAMES = ["vllm_prefix_preemption", "transformers_paged", "transformers_static", "vllm_server", "vllm_tensor_parallel",
         "vllm_ngram"]


@pytest.fixture(scope="module", params=NAMES)
def trace(request) -> Trace:
    return Trace.load(DATA / f"{request.param}.jsonl")


@pytest.fixture(scope="module")
def preempted() -> Trace:
    return Trace.load(DATA / "vllm_prefix_preemption.jsonl")


def test_a_saved_trace_loads_back_equal(trace, tmp_path):
    assert Trace.load(trace.save(tmp_path / "again.jsonl")) == trace
    assert len(trace.results) == len(trace.requests) > 0 and trace.steps
    assert repr(trace).startswith(f"<Trace {trace.engine} ")


def test_steps_are_in_time_order_and_every_state_is_known(trace):
    times = [s.time_s for s in trace.steps]
    assert times == sorted(times)
    assert {r.state for s in trace.steps for r in s.requests} <= set(STATES)


def test_steps_df_counts_what_the_snapshots_hold(trace):
    steps = trace.steps_df()
    assert len(steps) == len(trace.steps)
    for row, snap in zip(steps.itertuples(), trace.steps):
        assert row.blocks_used == snap.blocks.count(BLOCK_USED)
        assert row.running == sum(r.state in ("prefill", "decode") for r in snap.requests)


def test_requests_df_has_a_row_per_request_with_its_result(trace):
    requests = trace.requests_df()
    assert list(requests["request_id"]) == [q.request_id for q in trace.requests]
    assert list(requests["output_tokens"]) == [r.metrics.generated_tokens for r in trace.results]


def test_the_paged_traces_block_tables_fit_their_pool(trace):
    if not trace.facts.paged or trace.engine == "openai":
        pytest.skip("a contiguous cache, or a server's (no block tables)")
    for snap in trace.steps:
        assert len(snap.blocks) == trace.facts.num_blocks
        for r in snap.requests:
            assert all(0 <= b < trace.facts.num_blocks for b in r.block_ids)
            assert all(snap.blocks[b] == BLOCK_USED for b in r.block_ids), (snap.step, r)


def test_blocks_df_names_owners_and_shared_blocks(preempted):
    shared_steps = [i for i, s in enumerate(preempted.steps) if any(len(o) > 1 for o in s.block_owners().values())]
    assert shared_steps  # the shared system prompt's blocks
    blocks = preempted.blocks_df(shared_steps[0])
    assert len(blocks) == preempted.facts.num_blocks and blocks["shared"].any()


def test_preemption_shows_in_the_trace_and_agrees_with_vllms_counter(preempted):
    requests = preempted.requests_df()
    assert requests["preemptions"].sum() == preempted.engine_counters["vllm:num_preemptions"] > 0
    assert requests["cached_tokens"].max() >= preempted.facts.block_size  # prefix cache hits on the system prompt


def test_kv_waste_of_paging_is_below_contiguous_reservation(trace):
    waste = kv_waste(trace).set_index("scheme")
    contiguous = waste.iloc[0]["waste_pct"]
    assert waste.loc["exact per sequence", "waste_pct"] == 0
    assert waste.loc["paged, block 16", "waste_pct"] < contiguous
    assert 0 <= kv_waste_measured(trace) < 100


def test_run_summary_and_serving_metrics_agree(trace):
    summary, metrics = run_summary(trace), serving_metrics(trace)
    assert metrics["completed"] == len(trace.results) == summary["requests"]
    assert metrics["total_output_tokens"] == summary["output_tokens"]
    assert metrics["mean_ttft_ms"] == pytest.approx(1000 * np.mean([r.metrics.ttft_s for r in trace.results]))
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert metrics[f"p99_{name}_ms"] >= metrics[f"p90_{name}_ms"] >= metrics[f"median_{name}_ms"] >= 0


def test_engine_state_reads_the_engines_own_figures(trace):
    state = engine_state(trace)
    assert state["running_max"] >= 1 and state["running_max"] >= state["running_mean"] > 0
    if trace.engine == "vllm":
        assert state["preemptions"] == trace.engine_counters["vllm:num_preemptions"]
        if trace.engine_counters["vllm:num_preemptions"]:  # the shared system prompt in a pool too small
            assert 0 < state["prefix_cache_hit_rate"] < 1 and state["kv_usage_peak"] > 0.5
    if trace.engine == "openai":  # the server's own gauges and its iteration histogram
        assert state["tokens_per_step"] == pytest.approx(
            trace.engine_counters["step_tokens_sum"] / trace.engine_counters["step_tokens_count"])


def test_the_servers_histograms_grew_by_its_answers(trace):
    if trace.engine != "openai":
        pytest.skip("a server's trace")
    counters = trace.engine_counters
    assert counters["ttft_count"] == counters["e2el_count"] == len(trace.results)
    assert counters["generation_tokens"] == sum(r.metrics.generated_tokens for r in trace.results)
    assert serving_metrics(trace)["engine_mean_ttft_ms"] == pytest.approx(
        1000 * counters["ttft_sum"] / counters["ttft_count"])


def test_perfetto_export_has_a_track_per_request(trace, tmp_path):
    events = json.loads(trace.to_perfetto(tmp_path / "t.json").read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert tracks == {q.request_id for q in trace.requests}
    slices = [e for e in events if e["ph"] == "X"]
    assert slices and all(e["dur"] >= 0 and e["name"] in STATES for e in slices)
    assert {"waiting", "running"} <= {e["name"] for e in events if e["ph"] == "C"}


def test_timeline_matrix_places_every_request_at_every_step(trace):
    names, steps, z = figures.timeline_matrix(trace)
    assert names == [q.request_id for q in trace.requests] and len(steps) == len(trace.steps)
    for column, snap in enumerate(trace.steps):
        for r in snap.requests:
            assert z[names.index(r.request_id)][column] == figures.STATE_CODES[r.state]


def test_kv_cache_points_and_block_tables_agree_with_the_snapshot(trace):
    if not trace.facts.paged or trace.engine == "openai":
        pytest.skip("no block tables")
    step = max(range(len(trace.steps)), key=lambda i: trace.steps[i].blocks_used)
    snap = trace.steps[step]
    points = figures.kv_cache_points(trace, step)
    owners = snap.block_owners()
    assert {p["block"]: p["owners"] for p in points if p["owners"]} == owners
    busiest = max(snap.requests, key=lambda r: len(r.block_ids))
    table = figures.block_table(trace, busiest.request_id, step)
    assert [row["physical"] for row in table] == list(busiest.block_ids)


def test_every_figure_draws(trace):
    for draw in (figures.kv_cache_figure, figures.batch_timeline_figure, figures.memory_figure,
                 figures.throughput_figure):
        figure = draw(trace)
        assert figure.data and figure.layout.title.text
    assert len(figures.replay_figure(figures.kv_cache_figure, trace, max_frames=5).frames) <= 5


def test_memory_series_stacks_what_the_snapshots_hold(trace):
    series = figures.memory_series(trace)
    steps = trace.steps_df()
    assert np.allclose(series["KV in use"], steps["kv_used_bytes"])
    assert np.allclose(series["weights"], steps["weights_bytes"])


@pytest.fixture(scope="module")
def split() -> Trace:
    return Trace.load(DATA / "vllm_tensor_parallel.jsonl")


def test_a_split_engines_trace_carries_each_ranks_memory(split):
    assert all([r.rank for r in s.memory.ranks] == [0, 1] for s in split.steps)
    steps = split.steps_df()
    for rank in (0, 1):
        shares = [s.memory.ranks[rank] for s in split.steps]
        assert list(steps[f"rank{rank}_kv_used_bytes"]) == [m.kv_used_bytes for m in shares]
        assert list(steps[f"rank{rank}_process_rss_bytes"]) == [m.process_rss_bytes for m in shares]
        # each rank's cache is the pool's blocks in its own tensors: its share of the whole, per block
        assert all(m.kv_used_bytes * split.facts.num_blocks == m.kv_reserved_bytes * u for m, u in
                   zip(shares, [s.blocks.count(BLOCK_USED) for s in split.steps]))
    assert "ranks" not in steps  # flat columns, not a column of tuples


def test_the_memory_view_draws_a_panel_per_rank(split):
    figure = MemoryView(split).figure()
    assert len(figure.data) == 2 * len(figures.MEMORY_PARTS)
    assert {t.yaxis for t in figure.data[:4]} == {"y"} and {t.yaxis for t in figure.data[4:]} == {"y2"}
    assert figure.layout.yaxis.title.text == "rank 0, MiB" and figure.layout.yaxis2.title.text == "rank 1, MiB"
    assert figure.layout.yaxis2.domain[1] < figure.layout.yaxis.domain[0]  # rank 1 below rank 0, apart
    assert [t.showlegend for t in figure.data] == [True] * 4 + [False] * 4  # one legend entry per part
    rank1 = figures.memory_series(split, rank=1)
    assert np.allclose(figure.data[4].y, np.array(rank1["weights"]) / 2**20)
    assert rank1["weights"][0] == split.steps[0].memory.ranks[1].weights_bytes
    assert "per rank" in figure.layout.title.text


def test_merging_each_ranks_own_trace_gives_one_trace_with_every_ranks_memory(split):
    def own(rank: int) -> Trace:  # what rank `rank`'s process records when each rank runs an engine of its own
        steps = []
        for s in split.steps:
            m = s.memory.ranks[rank]
            steps.append(replace(s, memory=replace(s.memory, weights_bytes=m.weights_bytes, ranks=(),
                                                   kv_reserved_bytes=m.kv_reserved_bytes,
                                                   kv_used_bytes=m.kv_used_bytes,
                                                   process_rss_bytes=m.process_rss_bytes,
                                                   process_peak_bytes=m.process_peak_bytes)))
        return replace(split, steps=steps)

    merged = merge_ranks([own(0), own(1)])
    assert [s.memory.ranks for s in merged.steps] == [s.memory.ranks for s in split.steps]
    assert merged.steps[0].memory.weights_bytes == split.steps[0].memory.ranks[0].weights_bytes  # rank 0's own
    with pytest.raises(ValueError, match="different step counts"):
        merge_ranks([own(0), replace(own(1), steps=own(1).steps[:-1])])


@pytest.fixture(scope="module")
def drafted() -> Trace:
    return Trace.load(DATA / "vllm_ngram.jsonl")


def test_the_traces_draft_counts_are_vllms_own_spec_decode_counters(drafted):
    summary, counters = speculation(drafted), drafted.engine_counters
    assert summary["draft_tokens"] == counters["vllm:spec_decode_num_draft_tokens"] > 0
    assert summary["accepted_tokens"] == counters["vllm:spec_decode_num_accepted_tokens"] > 0
    assert summary["drafts"] == counters["vllm:spec_decode_num_drafts"]
    assert summary["acceptance_rate"] == summary["accepted_tokens"] / summary["draft_tokens"]
    assert summary["mean_acceptance_length"] == 1 + summary["accepted_tokens"] / summary["drafts"]
    for s in drafted.steps:
        for r in s.requests:
            assert 0 <= r.accepted_tokens <= r.draft_tokens <= 4
            if r.draft_tokens and r.state == "decode":  # the step computed the last token and every draft
                assert r.scheduled_tokens == 1 + r.draft_tokens
    plain = Trace.load(DATA / "vllm_prefix_preemption.jsonl")
    assert speculation(plain) == {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0, "acceptance_rate": 0.0,
                                  "mean_acceptance_length": 1.0}  # a trace saved before drafts were recorded


def test_the_speculation_figure_and_the_timeline_show_each_steps_drafts(drafted):
    figure = figures.speculation_figure(drafted)
    accepted, rejected, rate = figure.data
    summary = speculation(drafted)
    assert sum(accepted.y) == summary["accepted_tokens"]
    assert sum(accepted.y) + sum(rejected.y) == summary["draft_tokens"]
    assert [v for v in rate.y if v is not None][-1] == pytest.approx(summary["acceptance_rate"])
    hover = figures.batch_timeline_traces(drafted)[0][0]["customdata"]
    step, r = next((i, r) for i, s in enumerate(drafted.steps) for r in s.requests
                   if r.draft_tokens and r.state == "decode")
    row = [q.request_id for q in drafted.requests].index(r.request_id)
    assert hover[row][step].endswith(f", {r.accepted_tokens} of {r.draft_tokens} drafted accepted")


def test_views_show_a_saved_trace_and_move_between_steps(trace):
    for view in (KVCacheView(trace), BatchTimeline(trace), MemoryView(trace), ThroughputView(trace)):
        assert view.figure().data
        view.show(trace, step=0)
        view.show(trace, step=-1)


def test_replay_of_two_traces_shows_each_as_it_was_at_the_sliders_time():
    paged, static = (Trace.load(DATA / f"{name}.jsonl") for name in ("transformers_paged", "transformers_static"))
    replay = Replay([paged, static])
    assert len(replay.columns) == 2 and replay.slider.description == "time"
    times = sorted({s.time_s for t in (paged, static) for s in t.steps})
    assert replay.slider.max == len(times) - 1
    for index in (0, len(times) // 2, len(times) - 1):
        replay.slider.value = index
        for trace, column in zip((paged, static), replay.columns):
            shown = sum(s.time_s <= times[index] for s in trace.steps)  # steps taken by then, at least the first
            timeline = column[1]
            assert len(timeline.figure_widget.data[0].x) == max(1, shown)
    replay.load(paged)  # back to one trace: by step
    assert replay.slider.description == "step" and replay.slider.max == len(paged.steps) - 1


def test_request_spans_put_each_engines_requests_on_one_time_axis():
    paged, static = (Trace.load(DATA / f"{name}.jsonl") for name in ("transformers_paged", "transformers_static"))
    figure = figures.request_spans_figure({"paged": paged, "static": static})
    assert len(figure.data) == 4  # waiting and generating, per engine
    generating = figure.data[1]
    first, results = paged.requests, paged.results
    expected = [q.arrival_s + r.metrics.queue_s + r.metrics.ttft_s for q, r in zip(first, results)]
    assert np.allclose(generating.base, expected)
    assert np.allclose(generating.x, [r.metrics.total_s - r.metrics.ttft_s for r in results])


def test_a_waiting_or_preempted_request_says_why_or_unknown(trace):
    rows = trace.request_steps_df()
    idle = rows["state"].isin(["waiting", "preempted"])
    assert (rows.loc[~idle, "reason"] == "").all() and (rows.loc[idle, "reason"] != "").all()
    snap = next((s for s in trace.steps if any(r.state == "waiting" for r in s.requests)), None)
    if snap is None:
        pytest.skip("no request waited in this trace")
    waiting = next(r for r in snap.requests if r.state == "waiting")
    told = replace(waiting, reason="batch full: 2 requests running, max_num_seqs is 2")
    steps = [replace(s, requests=tuple(told if r is waiting else r for r in s.requests)) for s in trace.steps]
    heatmap = figures.batch_timeline_traces(replace(trace, steps=steps))[0][0]
    names = [q.request_id for q in trace.requests]
    cell = heatmap["customdata"][names.index(waiting.request_id)][trace.steps.index(snap)]
    assert cell == "waiting: batch full: 2 requests running, max_num_seqs is 2"


def test_the_kv_maps_free_blocks_say_who_waits_and_why(preempted):
    snap = next(s for s in preempted.steps if any(r.state in ("waiting", "preempted") for r in s.requests))
    index = preempted.steps.index(snap)
    blocks = figures.kv_cache_traces(preempted, index)[0][0]
    idle = [r for r in snap.requests if r.state in ("waiting", "preempted")]
    for state, custom in zip(snap.blocks, blocks["customdata"]):
        if state in (BLOCK_FREE, BLOCK_CACHED):
            assert f"{idle[0].request_id} {idle[0].state}: {reason_of(idle[0])}" in custom[5]
        else:
            assert custom[5] == ""


def test_a_shared_prefix_shorter_than_a_block_is_pointed_out(preempted):
    size = preempted.facts.block_size
    assert prefix_cache_note(preempted) == ""  # its system prompt spans whole blocks
    short = replace(preempted, requests=[replace(q, shared_prefix_tokens=size - 1) for q in preempted.requests])
    assert f"at most {size - 1} leading tokens, less than one KV block ({size} tokens)" in prefix_cache_note(short)
    assert "no block can be shared" in figures.kv_cache_traces(short)[1]
    static = Trace.load(DATA / "transformers_static.jsonl")  # no blocks, nothing to say
    static = replace(static, requests=[replace(q, shared_prefix_tokens=5) for q in static.requests])
    assert prefix_cache_note(static) == ""


def test_scheduled_tokens_figure_stacks_each_requests_tokens_per_step(trace):
    figure = figures.scheduled_tokens_figure(trace, budget=64)
    drawn = {(bar.name, step): tokens for bar in figure.data for step, tokens in zip(bar.x, bar.y)}
    expected = {(r.request_id, s.step): r.scheduled_tokens for s in trace.steps for r in s.requests
                if r.scheduled_tokens}
    assert drawn == expected
    assert figure.layout.shapes[0].y0 == 64  # the budget line
