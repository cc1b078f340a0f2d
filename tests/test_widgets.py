"""The views and the Workbench on real engines: what each view drew matches the trace it was drawn from, replay
follows its slider, static figures carry their own plotly.js, and the Workbench loads, runs, streams and stops."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest

import workbench as wb
from conftest import HAVE_VLLM
from workbench.analysis import run_summary
from workbench.trace import STATES
from workbench.widgets import BatchTimeline, KVCacheView, LiveFeed, MemoryView, Replay, ThroughputView, Workbench
from workbench.widgets.figures import MEMORY_PARTS
from workbench.widgets.static import figure_bundle
from workbench.workload import make_workload

needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")


@pytest.fixture(scope="module")
def vllm_trace(load_shared):
    """A live-viewed vLLM run with a shared system prompt longer than a block, arriving over time."""
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed")
    engine = load_shared("vllm")
    views = [KVCacheView(), BatchTimeline(), MemoryView(), ThroughputView()]
    with LiveFeed(views, fps=20) as feed:
        trace = engine.run(make_workload(n=6, output_tokens=(8, 24), shared_prefix_tokens=300, rate=10.0, seed=4),
                           **feed.callbacks)
    return trace, views, feed


def drawn_owners(view: KVCacheView) -> dict[int, list[str]]:
    """Block id -> holders, read back from the figure the view drew (its hover data)."""
    owners = {}
    for block, _state, held, _tokens, _size, _waiting in view.figure_widget.data[0].customdata:
        if held != "nobody":
            owners[int(block)] = [part.split(" ")[0] for part in held.split(", ")]
    return owners


def assert_kv_view_matches(view: KVCacheView, snapshot) -> None:
    assert drawn_owners(view) == snapshot.block_owners()
    states = [row[1] for row in view.figure_widget.data[0].customdata]
    assert [s == "in use" for s in states] == [c == "u" for c in snapshot.blocks]
    shared = {b for b, owners in snapshot.block_owners().items() if len(owners) > 1}
    grid = view.figure_widget.data[1]
    assert {int(y) * 32 + int(x) for x, y in zip(grid.x, grid.y)} == shared


@needs_vllm
def test_live_views_end_on_the_traces_last_step(vllm_trace):
    trace, (kv, timeline, memory, throughput), feed = vllm_trace
    assert feed.frames >= 1
    assert_kv_view_matches(kv, trace.steps[-1])
    assert "step %d" % trace.steps[-1].step in kv.figure_widget.layout.title.text
    heat = timeline.figure_widget.data[0]
    assert list(heat.x) == [s.step for s in trace.steps]


@needs_vllm
def test_kv_view_shows_shared_prefix_blocks_and_block_tables(vllm_trace):
    trace, _, _ = vllm_trace
    both = next(i for i, s in enumerate(trace.steps)
                if sum(1 for owners in s.block_owners().values() if len(owners) > 1))
    view = KVCacheView(trace, step=both)
    assert_kv_view_matches(view, trace.steps[both])
    holder = next(r for r in trace.steps[both].requests if r.block_ids)
    view.request_picker.value = holder.request_id
    outlined = view.figure_widget.data[2]
    assert sorted(int(y) * 32 + int(x) for x, y in zip(outlined.x, outlined.y)) == sorted(holder.block_ids)
    for logical, physical in enumerate(holder.block_ids):
        assert f"<td>{logical}</td><td>{physical}</td>" in view.block_table.value


@needs_vllm
def test_timeline_draws_every_requests_state_at_every_step(vllm_trace):
    trace, _, _ = vllm_trace
    view = BatchTimeline(trace)
    heat = view.figure_widget.data[0]
    z = np.array(heat.z, dtype=float)
    table = trace.request_steps_df()
    rows = {name: i for i, name in enumerate(heat.y)}
    columns = {step: j for j, step in enumerate(heat.x)}
    drawn = {(r, s): STATES[int(z[rows[r], columns[s]])] for r, s in zip(table.request_id, table.step)}
    assert drawn == dict(zip(zip(table.request_id, table.step), table.state))
    assert int(np.sum(~np.isnan(z))) == len(table)  # nothing drawn where the trace has nothing
    batch = view.figure_widget.data[2]
    assert list(batch.y) == list(trace.steps_df()["running"])


@needs_vllm
def test_memory_and_throughput_views_match_the_trace(vllm_trace):
    trace, _, _ = vllm_trace
    memory = MemoryView(trace).figure_widget.data
    assert [t.name for t in memory] == list(MEMORY_PARTS)
    steps = trace.steps_df()
    assert np.allclose(np.array(memory[1].y) * 2**20, steps["kv_used_bytes"])
    assert np.allclose(np.array(memory[0].y) * 2**20, steps["weights_bytes"])
    ttft = dict(zip(*(ThroughputView(trace).figure_widget.data[1][k] for k in ("x", "y"))))
    for request, result in zip(trace.requests, trace.results):  # the view's is from arrival: the client's wait too
        assert math.isclose(ttft[request.request_id], result.metrics.queue_s + result.metrics.ttft_s, abs_tol=1e-6)


@needs_vllm
def test_memory_view_of_a_gpu_trace_shows_the_rest_of_gpu_memory(vllm_trace):
    trace, _, _ = vllm_trace
    # the same steps as a GPU engine records them: torch's allocations on the device beside the process's RAM
    extra = [2**20 * (i + 1) for i in range(len(trace.steps))]
    steps = [replace(s, memory=replace(s.memory, device_allocated_bytes=s.memory.weights_bytes +
                                       s.memory.kv_reserved_bytes + more, device_peak_bytes=2**30))
             for s, more in zip(trace.steps, extra)]
    figure = MemoryView(replace(trace, steps=steps)).figure_widget
    assert np.allclose(np.array(figure.data[3].y) * 2**20, extra)  # the rest is GPU memory, not RAM
    assert figure.layout.title.text.startswith("GPU memory")
    assert MemoryView(trace).figure_widget.layout.title.text.startswith("Memory: ")
    assert run_summary(replace(trace, steps=steps))["peak_gpu_memory_gib"] == 1.0


@needs_vllm
def test_replay_slider_moves_every_view_to_its_step(vllm_trace):
    trace, _, _ = vllm_trace
    replay = Replay(trace)
    kv, timeline = replay.views[0], replay.views[1]
    assert replay.slider.max == len(trace.steps) - 1
    for index in (0, len(trace.steps) // 2, len(trace.steps) - 1):
        replay.slider.value = index
        assert_kv_view_matches(kv, trace.steps[index])
        assert len(timeline.figure_widget.data[0].x) == index + 1
        assert f"engine step {trace.steps[index].step}" in replay.label.value


@needs_vllm
def test_views_send_the_frontend_json_it_can_parse(vllm_trace, monkeypatch):
    """A kernel refuses NaN in a message (JSON has none): a view stepping through a trace sends none."""
    import json

    import ipywidgets

    refused, send = [], ipywidgets.Widget._send

    def checked(widget, msg, buffers=None):
        try:
            json.dumps(msg, allow_nan=False)
        except ValueError:
            refused.append(type(widget).__name__)
        return send(widget, msg, buffers)

    monkeypatch.setattr(ipywidgets.Widget, "_send", checked)
    trace, _, _ = vllm_trace
    for view in (KVCacheView(), BatchTimeline(), MemoryView(), ThroughputView()):
        for index in range(len(trace.steps)):
            view.show(trace, index)
        json.dumps(view.figure_widget.get_state(), allow_nan=False)
    assert refused == []


@needs_vllm
def test_static_figures_and_replay_animation(vllm_trace):
    trace, (kv, timeline, memory, throughput), _ = vllm_trace
    for view in (kv, timeline, memory, throughput):
        figure = view.figure()
        assert len(figure.data) == len(view.figure_widget.data)
    animation = kv.replay_figure(max_frames=10)
    assert len(animation.frames) == min(10, len(trace.steps))
    assert animation.layout.sliders and animation.layout.updatemenus
    first, second = figure_bundle(kv.figure()), figure_bundle(timeline.figure())
    assert first["text/html"].count("<script") > second["text/html"].count("<script")  # plotly.js once
    assert len(first["text/html"]) > 1_000_000 > len(second["text/html"])
    assert "application/vnd.plotly.v1+json" in first


def test_contiguous_cache_is_drawn_as_slots_and_padding(load_shared):
    engine = load_shared("transformers")
    trace = engine.run(make_workload(n=3, prompt_words=(4, 30), output_tokens=4, seed=5))
    view = KVCacheView(trace, step=0)
    tokens, padding = view.figure_widget.data
    first = trace.steps[0]
    assert list(padding.x) == [r.padding_tokens for r in first.requests]
    assert max(padding.x) > 0  # left padding of the shorter prompts is waste


def test_workbench_loads_runs_streams_and_replays(load_shared):
    bench = Workbench(engine="transformers")
    bench.engine = load_shared("transformers")  # the session's engine: loading is tested below with a tiny model
    bench._set_buttons()
    assert not bench.run_button.disabled
    bench.prompt.value = "What is the capital of France?"
    bench.max_tokens.value = 12
    bench.run_button.click()
    bench.wait(300)
    assert "Paris" in bench.texts[0] and "Paris" in bench.output.value, bench.run_status.value
    assert bench.trace is not None and bench.replay.slider.max == len(bench.trace.steps) - 1
    assert "tokens/s" in bench.run_status.value
    bench.engine = None  # not ours to close


def test_workbench_escapes_generated_text(load_shared):
    bench = Workbench(engine="transformers")
    bench.texts = {0: "<script>alert('x')</script><b>bold</b>"}
    bench._show_texts()
    assert "<script>" not in bench.output.value and "&lt;script&gt;" in bench.output.value
    assert "&lt;b&gt;bold&lt;/b&gt;" in bench.output.value


def test_workbench_stop_aborts_and_the_engine_runs_again(load_shared):
    bench = Workbench(engine="transformers-paged")
    bench.engine = load_shared("transformers-paged")
    bench._set_buttons()
    bench.input_mode.value = "workload"
    bench.requests.value, bench.output_tokens.value = 3, (400, 400)
    bench.run()
    deadline = time.time() + 120
    while not bench.output.value and time.time() < deadline:  # streamed text shows before the run ends
        time.sleep(0.1)
    assert bench.output.value, "no text streamed"
    assert not bench.stop_button.disabled
    bench.stop_button.click()
    bench.wait(120)
    assert "3 stopped" in bench.run_status.value
    assert bench.stop_button.disabled and not bench.run_button.disabled
    bench.input_mode.value = "prompt"
    bench.max_tokens.value = 4
    bench.run()
    bench.wait(120)
    assert "stopped" not in bench.run_status.value and bench.texts[0]
    bench.engine = None


def test_workbench_bad_input_says_so_and_stays_usable():
    bench = Workbench(engine="transformers", model="no-such-model")
    bench.run()
    assert "load an engine first" in bench.run_status.value
    bench.load_button.click()
    bench.wait(120)
    assert "no-such-model" in bench.load_status.value and bench.engine is None
    assert not bench.load_button.disabled
    bench.load(model="tiny-llama")
    bench.wait(300)
    assert bench.engine is not None and "tiny-llama" in bench.load_status.value, bench.load_status.value
    assert "loaded in" in bench.load_status.value and "GiB" in bench.load_status.value
    bench.prompt.value = ""
    bench.run()
    assert "prompt box is empty" in bench.run_status.value
    bench.unload()
    assert bench.engine is None and bench.run_button.disabled


def test_engines_not_installed_are_shown_with_the_reason(monkeypatch):
    import workbench
    from workbench.engines import EngineStatus

    statuses = workbench.engines() + [EngineStatus("tensorrt-llm", False, "NVIDIA TensorRT-LLM",
                                                   "missing Python package(s): tensorrt_llm",
                                                   "pip install 'workbench[tensorrt]'")]
    monkeypatch.setattr(workbench, "engines", lambda: statuses)
    bench = Workbench(engine="tensorrt-llm")
    assert ("tensorrt-llm (not installed)", "tensorrt-llm") in bench.engine_picker.options
    assert bench.load_button.disabled and "tensorrt_llm" in bench.engine_note.value
    bench.engine_picker.value = "transformers"
    assert not bench.load_button.disabled


def test_workbench_picks_the_best_in_process_engine_and_lists_no_server_engines():
    bench = Workbench()
    installed = {s.name for s in wb.engines() if s.installed}
    assert bench.engine_picker.value == ("vllm" if "vllm" in installed else "transformers-paged")
    assert not {"openai", "tgi"} & {value for _, value in bench.engine_picker.options}


def test_workbench_compares_two_engines_on_the_same_requests():
    bench = Workbench(engine="transformers", model="tiny-llama")
    bench.compare_picker.value = "transformers-paged"
    bench.load()
    bench.wait(300)
    assert bench.engine is not None and bench.other is not None, bench.load_status.value
    assert bench.engine.process.pid != bench.other.process.pid  # each in a process of its own
    assert "beside it transformers-paged" in bench.load_status.value
    bench.input_mode.value = "workload"
    bench.requests.value, bench.output_tokens.value = 3, (8, 8)
    bench.run()
    bench.wait(300)
    first, second = bench.trace, bench.other_trace
    assert first is not None and second is not None, bench.run_status.value
    assert (first.engine, second.engine) == ("transformers", "transformers-paged")
    assert [q.request_id for q in first.requests] == [q.request_id for q in second.requests]
    # the same tiny weights, greedy or seeded: both engines give every request the same tokens
    assert [r.token_ids for r in first.results] == [r.token_ids for r in second.results]
    assert "transformers: " in bench.run_status.value and "transformers-paged: " in bench.run_status.value
    assert len(bench.replay.columns) == 2 and bench.replay.slider.description == "time"
    processes = (bench.engine.process, bench.other.process)
    bench.unload()
    assert bench.engine is None and bench.other is None
    assert all(process.poll() is not None for process in processes)
