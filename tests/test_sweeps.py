"""`workbench.sweep` on a real engine: load points in order, the engine's state at each, stopping, saving."""

from __future__ import annotations

import json
import math
import threading

import pytest

import workbench as wb
from workbench.sweeps import saturation_point, save_sweep
from workbench.workload import make_workload

WORKLOAD = make_workload(n=6, prompt_words=(8, 16), output_tokens=8, seed=3)


@pytest.fixture(scope="module")
def capped():
    """transformers-paged with at most 2 requests per step: more load than that queues in the engine."""
    with wb.load("transformers-paged", model="smollm2-135m", max_batch_size=2) as engine:
        engine.generate("Hello", max_tokens=2)
        yield engine


def test_a_concurrency_sweep_shows_the_queue_past_the_batch_cap(capped, tmp_path):
    points = wb.sweep(capped, WORKLOAD, concurrencies=[4, 1, 2], slos={"ttft": 2000}, progress=False,
                      stop_at_saturation=False)
    assert list(points["load"]) == ["synchronous", "concurrency 2", "concurrency 4"]  # lightest load first
    assert points["output_throughput"][1] > points["output_throughput"][0]  # two at once beat one at a time
    assert points["waiting_max"][0] == 0 and points["running_max"][0] == 1
    assert points["running_max"].max() == 2  # the engine's cap
    assert points["waiting_max"][2] > 0  # concurrency 4 on a cap of 2: requests queued in the engine
    for _, row in points.iterrows():
        assert row["completed"] == 6 and row["request_goodput"] <= row["request_throughput"]
        for name in ("ttft", "tpot", "itl", "e2el"):
            assert row[f"p99_{name}_ms"] >= row[f"p95_{name}_ms"] >= row[f"median_{name}_ms"] > 0
        assert row["trace"].load_profile["max_concurrency"] == row["offered"]
    assert saturation_point(points) in (1, 2)
    json_path, csv_path = save_sweep(points, tmp_path / "sweep")
    saved = json.loads(json_path.read_text())
    assert [p["load"] for p in saved["points"]] == list(points["load"]) and "trace" not in saved["points"][0]
    assert csv_path.read_text().startswith("load,mode,offered,completed")


def test_automatic_rates_start_with_one_at_a_time_and_all_at_once(capped):
    points = wb.sweep(capped, WORKLOAD[:4], rates="auto", points=2, progress=False, stop_at_saturation=False)
    assert list(points["mode"]) == ["concurrency", "rate", "rate", "rate"]
    assert points["load"][0] == "synchronous" and points["load"][3] == "throughput"
    assert points["offered"][3] == math.inf
    low, high = points["request_throughput"][0], points["request_throughput"][3]
    assert low < points["offered"][1] < points["offered"][2] < high  # evenly spaced between the two


def test_stop_ends_a_sweep_with_the_points_done(capped, monkeypatch):
    runs = []
    run = capped.run

    def stop_during_the_second_point(*args, **kwargs):
        runs.append(kwargs)
        if len(runs) == 2:
            threading.Timer(0.3, capped.stop).start()
        return run(*args, **kwargs)

    monkeypatch.setattr(capped, "run", stop_during_the_second_point)
    points = wb.sweep(capped, WORKLOAD, concurrencies=[1, 2, 3, 4], progress=False)
    assert points.attrs["stopped"] == "stopped" and len(runs) == 2
    assert list(points["load"]) == ["synchronous"]  # the point stopped midway is not among them
    assert points["completed"][0] == 6
    assert "Paris" in capped.generate("What is the capital of France?", max_tokens=12, temperature=0)[0].text


@pytest.mark.parametrize("kwargs, message", [
    (dict(rates=[]), "the rate list is empty"),
    (dict(concurrencies=[]), "the concurrency list is empty"),
    (dict(rates=[2.0, 0]), "rate must be a positive number"),
    (dict(concurrencies=[4, -1]), "each concurrency must be an integer of at least 1"),
    (dict(rates=[1.0], concurrencies=[1]), "either rates"),
    (dict(), "either rates"),
    (dict(rates="fast"), "rates must be a list"),
    (dict(rates=[1.0], slos={"goodness": 1}), "no SLO on 'goodness'"),
    (dict(rates=[1.0], slos={"ttft": -5}), "milliseconds >= 0"),
])
def test_bad_sweeps_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(wb.InvalidRequestError, match=message):
        wb.sweep(None, WORKLOAD, **kwargs)  # refused before the engine is used
