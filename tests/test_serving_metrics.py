"""`serving_metrics` and `engine_state` on traces made here, and against vLLM's own `calculate_metrics`."""

from __future__ import annotations

import importlib.util
import math

import pytest

from workbench.analysis import engine_state, serving_metrics, trace_duration
from workbench.errors import InvalidRequestError
from workbench.trace import CacheFacts, MemorySnapshot, RequestSnapshot, StepSnapshot, Trace, TraceRequest
from workbench.types import GenerationResult, RequestMetrics

FACTS = CacheFacts(True, 16, 64, 16 * 46080, 30, 3, 64, "float32", 1000, 2048)
# (arrival, queue, prompt tokens, ttft, gaps after the first token, finish reason)
RUNS = [(0.0, 0.0, 20, 0.10, [0.05, 0.05, 0.06], "length"),
        (0.1, 0.2, 30, 0.30, [0.04, 0.08], "length"),
        (0.5, 0.0, 25, 0.20, [], "stop"),
        (0.7, 0.1, 40, 0.90, [0.10, 0.02, 0.03, 0.20, 0.05], "length"),
        (1.0, 0.0, 10, 0.00, [], "error")]


def made_trace(runs=RUNS, steps=()) -> Trace:
    trace = Trace("vllm", "m", FACTS, [TraceRequest(f"r{i}", p, 8, a) for i, (a, _, p, *_rest) in enumerate(runs)],
                  list(steps))
    for _, queue, prompt, ttft, gaps, finish in runs:
        latencies = [ttft, *gaps] if finish != "error" else []
        metrics = RequestMetrics(prompt, len(latencies), ttft, latencies, sum(latencies), queue)
        trace.results.append(GenerationResult("p", "t", [], finish, metrics))
    return trace


def test_definitions_are_vllm_bench_serves():
    m = serving_metrics(made_trace(), slos={"ttft": 250, "e2el": 500})
    assert (m["completed"], m["failed"], m["aborted"]) == (4, 1, 0)
    assert m["duration"] == pytest.approx(0.7 + 0.1 + 1.30)  # r3 ends last: sent at 0.8, answered in 1.3 s
    assert m["total_output_tokens"] == 4 + 3 + 1 + 6 and m["total_input_tokens"] == 20 + 30 + 25 + 40
    assert m["mean_ttft_ms"] == pytest.approx(1000 * (0.1 + 0.3 + 0.2 + 0.9) / 4)
    # TPOT: (e2el - ttft) / (output - 1), over requests with more than one token
    assert m["mean_tpot_ms"] == pytest.approx(1000 * (0.16 / 3 + 0.12 / 2 + 0.40 / 5) / 3)
    # ITL: every gap of every request
    assert m["mean_itl_ms"] == pytest.approx(1000 * (0.16 + 0.12 + 0.40) / 10)
    assert m["median_e2el_ms"] == pytest.approx(1000 * (0.26 + 0.42) / 2)
    assert m["mean_client_queue_time_ms"] == pytest.approx(1000 * 0.3 / 4)
    # goodput: r0 (ttft 100 ms, e2el 260 ms) and r2 (200, 200) meet both SLOs; r1 (ttft 300) and r3 (900) do not
    assert m["request_goodput"] == pytest.approx(2 / m["duration"])
    assert m["request_goodput"] <= m["request_throughput"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert m[f"p99_{name}_ms"] >= m[f"p95_{name}_ms"] >= m[f"p90_{name}_ms"] >= m[f"median_{name}_ms"]
    assert serving_metrics(made_trace())["request_goodput"] is None  # without SLOs, as vLLM reports it


@pytest.mark.slow  # importing vLLM's benchmark module takes seconds
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_equal_to_vllms_own_calculate_metrics():
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    trace = made_trace()
    outputs = [RequestFuncOutput(success=r.finish_reason != "error", latency=r.metrics.total_s,
                                 output_tokens=r.metrics.generated_tokens, ttft=r.metrics.ttft_s,
                                 itl=r.metrics.token_latencies_s[1:], prompt_len=r.metrics.prompt_tokens,
                                 start_time=q.arrival_s + r.metrics.queue_s)
               for q, r in zip(trace.requests, trace.results)]
    slos = {"ttft": 250, "tpot": 60, "e2el": 500}
    theirs, _ = calculate_metrics([], outputs, trace_duration(trace), None, [90, 95, 99], slos)
    ours = serving_metrics(trace, slos)
    for key in ("completed", "failed", "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests"):
        assert ours[key] == pytest.approx(getattr(theirs, key)), key
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            assert ours[f"{stat}_{name}_ms"] == pytest.approx(getattr(theirs, f"{stat}_{name}_ms")), (stat, name)
        for p, value in getattr(theirs, f"percentiles_{name}_ms"):
            assert ours[f"p{int(p)}_{name}_ms"] == pytest.approx(value), (p, name)


@pytest.mark.parametrize("slos, message", [
    ({"latency": 100}, "no SLO on 'latency'"),
    ({"ttft": -1}, "must be a number of milliseconds >= 0"),
    ({"e2el": "fast"}, "must be a number of milliseconds >= 0"),
    ([100], "slos must be a dict"),
])
def test_bad_slos_are_refused_in_one_line(slos, message):
    with pytest.raises(InvalidRequestError, match=message) as error:
        serving_metrics(made_trace(), slos)
    assert "\n" not in str(error.value)


def step(k: int, states: list[str], kv: float, **counters) -> StepSnapshot:
    requests = tuple(RequestSnapshot(f"r{i}", s, 1 if s in ("prefill", "decode") else 0, 0, 0, (), 0)
                     for i, s in enumerate(states))
    return StepSnapshot(k, 0.1 * k, requests, "", MemorySnapshot(0, 0, 0, 0, 0), {"kv_usage": kv, **counters})


def test_engine_state_from_the_steps_of_an_in_process_engine():
    steps = [step(0, ["prefill", "waiting", "waiting"], 0.2), step(1, ["decode", "decode", "waiting"], 0.5),
             step(2, ["decode", "preempted", "decode"], 0.9), step(3, ["finished", "decode", "decode"], 0.4)]
    trace = made_trace(steps=steps)
    trace.engine_counters = {"vllm:num_preemptions": 1, "vllm:prefix_cache_queries": 200,
                             "vllm:prefix_cache_hits": 50}
    state = engine_state(trace)
    assert state["running_max"] == 2 and state["running_mean"] == pytest.approx((1 + 2 + 2 + 2) / 4)
    assert state["waiting_max"] == 2 and state["waiting_mean"] == pytest.approx((2 + 1 + 1 + 0) / 4)
    assert state["kv_usage_peak"] == 0.9 and state["kv_usage_mean"] == pytest.approx(0.5)
    assert state["preemptions"] == 1 and state["prefix_cache_hit_rate"] == 0.25
    assert state["tokens_per_step"] == pytest.approx((1 + 2 + 2 + 2) / 4)


def test_engine_state_of_a_server_comes_from_its_metrics():
    steps = [step(k, [], kv, server_running=run, server_waiting=wait)
             for k, (kv, run, wait) in enumerate([(0.1, 1, 0), (0.6, 4, 3), (0.3, 2, 0)])]
    trace = made_trace(steps=steps)
    trace.engine_counters = {"preemptions": 2, "step_tokens_sum": 300, "step_tokens_count": 60}
    state = engine_state(trace)
    assert (state["running_max"], state["waiting_max"], state["preemptions"]) == (4, 3, 2)
    assert state["tokens_per_step"] == 5 and state["prefix_cache_hit_rate"] is None  # not exposed: None, no guess
    assert math.isclose(state["kv_usage_mean"], 1 / 3)
