"""The run clock: arrivals released on time, and a closed loop that sends the next request when one finishes."""

from __future__ import annotations

import time

from workbench.engines.arrivals import RunClock


def test_requests_are_released_when_they_arrive_and_stamped_when_sent():
    clock = RunClock([0.0, 0.05, 0.0])
    assert clock.arrived() == [0, 2] and clock.pending == 1
    assert clock.arrived() == []
    clock.wait_for_next()
    assert clock.arrived() == [1]
    assert clock.sent[1] >= 0.05 and clock.sent[0] < 0.05


def test_a_closed_loop_keeps_at_most_n_requests_in_flight():
    clock = RunClock([0.0] * 5, max_concurrency=2)
    assert clock.arrived() == [0, 1] and clock.in_flight == 2
    assert clock.arrived() == []  # no slot free
    time.sleep(0.01)
    clock.done(1)
    assert clock.arrived() == [2]
    assert clock.sent[2] > clock.sent[0]  # it waited for its slot: that wait is its client queue time
    clock.done(0)
    clock.done(2)
    assert clock.arrived() == [3, 4] and clock.pending == 0


def test_an_interrupt_ends_the_wait_for_the_next_arrival():
    clock = RunClock([0.0, 30.0])
    clock.arrived()
    clock.interrupt.set()
    start = time.perf_counter()
    clock.wait_for_next()
    assert time.perf_counter() - start < 1


def test_a_restart_counts_arrivals_from_when_the_engine_is_ready():
    clock = RunClock([0.0, 0.05])
    time.sleep(0.1)  # opening the session took this long: no request waited for it
    clock.restart()
    assert clock.arrived() == [0] and clock.sent[0] < 0.05
    assert clock.now() < 0.05
