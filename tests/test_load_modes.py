"""Load modes on every in-process engine with the real model: a closed loop of N requests in flight, and arrivals
at a rate with burstiness."""

from __future__ import annotations

import pytest

import workbench as wb
from workbench.workload import arrival_times, make_workload


def test_a_closed_loop_never_has_more_than_n_requests_in_the_engine(smollm2):
    trace = smollm2.run(make_workload(n=6, output_tokens=8, seed=1), max_concurrency=2)
    assert trace.load_profile == {"rate": None, "burstiness": None, "max_concurrency": 2}
    for step in trace.steps:  # the engine's own state: requests it holds, waiting or running
        assert sum(r.state != "finished" for r in step.requests) <= 2, step
    assert [r.metrics.generated_tokens for r in trace.results] == [8] * 6
    waited = [r.metrics.queue_s for r in trace.results]
    assert max(waited[:2]) < 0.1 and min(waited[2:]) > 0  # the later ones waited on the client for a slot
    assert all(r.metrics.ttft_s > 0 for r in trace.results)  # timed from their sending, not their arrival


def test_arrivals_at_a_rate_with_burstiness(load_shared):
    engine = load_shared("vllm")
    trace = engine.run(make_workload(n=5, output_tokens=4, seed=2), rate=20.0, burstiness=0.5, seed=7)
    assert [q.arrival_s for q in trace.requests] == arrival_times(5, 20.0, 0.5, seed=7)
    assert trace.load_profile == {"rate": 20.0, "burstiness": 0.5, "max_concurrency": None}
    # each request was sent once it arrived, within one engine step of its time
    for r in trace.results:
        assert 0 <= r.metrics.queue_s < 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_concurrency=0), "max_concurrency must be an integer of at least 1"),
    (dict(max_concurrency=2.5), "max_concurrency must be an integer of at least 1"),
    (dict(rate=0.0), "rate must be a positive number"),
    (dict(rate=4.0, burstiness=-1), "burstiness must be a positive number"),
])
def test_bad_loads_are_refused_and_the_engine_stays_usable(load_shared, kwargs, message):
    engine = load_shared("transformers")
    with pytest.raises(wb.InvalidRequestError, match=message):
        engine.run(["Hello"], **kwargs)
    assert "Paris" in engine.generate("What is the capital of France?", max_tokens=12, temperature=0)[0].text
