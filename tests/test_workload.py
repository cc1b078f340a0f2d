"""Workloads: arrivals at a rate with burstiness, as vLLM's bench draws them, and token-id prompts."""

from __future__ import annotations

import math
import statistics

import pytest

from workbench.errors import InvalidRequestError
from workbench.workload import Request, arrival_times, make_workload, shared_prefix_lengths, with_arrivals


def test_arrivals_at_a_rate_have_its_mean_gap_and_burstiness_sets_their_spread():
    poisson = arrival_times(4001, rate=10.0, seed=1)
    bursty = arrival_times(4001, rate=10.0, burstiness=0.25, seed=1)
    even = arrival_times(4001, rate=10.0, burstiness=50.0, seed=1)
    gaps = {name: [b - a for a, b in zip(t, t[1:])] for name, t in (("poisson", poisson), ("bursty", bursty),
                                                                    ("even", even))}
    for name, g in gaps.items():
        assert statistics.mean(g) == pytest.approx(0.1, rel=0.1), name
    # a gamma of shape k has a coefficient of variation of 1/sqrt(k): 1 for Poisson, 2 in bursts, ~0.14 evenly
    cv = {name: statistics.stdev(g) / statistics.mean(g) for name, g in gaps.items()}
    assert cv["poisson"] == pytest.approx(1.0, rel=0.1)
    assert cv["bursty"] == pytest.approx(2.0, rel=0.15)
    assert cv["even"] == pytest.approx(1 / math.sqrt(50), rel=0.2)
    assert poisson[0] == 0.0 and arrival_times(3, math.inf) == [0.0, 0.0, 0.0]


def test_make_workload_arrivals_and_rearrival():
    workload = make_workload(n=6, rate=4.0, burstiness=0.5, seed=3)
    arrivals = [r.arrival_s for r in workload]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    assert arrivals != [r.arrival_s for r in make_workload(n=6, rate=4.0, seed=3)]  # burstiness draws other gaps
    assert [r.prompt for r in workload] != [r.prompt for r in make_workload(n=6, rate=4.0, seed=4)]
    moved = with_arrivals(workload, [1.0] * 6)
    assert all(r.arrival_s == 1.0 for r in moved) and moved[0].prompt == workload[0].prompt


@pytest.mark.parametrize("kwargs, message", [
    (dict(rate=0), "rate must be a positive number"),
    (dict(rate=-2.0), "rate must be a positive number"),
    (dict(rate=2.0, burstiness=0), "burstiness must be a positive number"),
])
def test_bad_rates_are_refused(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        make_workload(n=2, **kwargs)


def test_token_id_prompts_are_sent_as_they_are():
    assert Request([1, 2, 3], chat=False).prompt == (1, 2, 3)
    with pytest.raises(InvalidRequestError, match="chat=False"):
        Request([1, 2, 3])


def test_shared_prefix_lengths_are_each_prompts_longest_common_start_with_another():
    prompts = [[5, 6, 7, 8], [1, 2, 3], [5, 6, 7, 9, 9], [1, 2], [4]]
    assert shared_prefix_lengths(prompts) == [3, 2, 3, 2, 0]
    assert shared_prefix_lengths([[1, 2]]) == [0] and shared_prefix_lengths([]) == []
