"""Stopping a run from another thread, and tokens handed out as they come: what the Workbench's Stop button and
its streaming text stand on, on each real engine."""

from __future__ import annotations

import threading

from workbench.workload import make_workload


def test_tokens_stream_per_request_and_add_up_to_the_results(smollm2):
    seen: dict[int, list[int]] = {}
    trace = smollm2.run(make_workload(n=3, output_tokens=6, seed=2),
                        on_tokens=lambda i, ids: seen.setdefault(i, []).extend(ids))
    assert sorted(seen) == [0, 1, 2]
    for i, result in enumerate(trace.results):
        assert seen[i] == result.token_ids


def test_stop_from_another_thread_aborts_and_the_engine_stays_usable(smollm2):
    started = threading.Event()

    def on_step(snapshot):
        if snapshot.step == 3:
            started.set()

    requests = make_workload(n=3, output_tokens=400, seed=3)
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(trace=smollm2.run(requests, on_step=on_step)))
    worker.start()
    assert started.wait(120), "the run never reached its third step"
    smollm2.stop()
    worker.join(60)
    assert not worker.is_alive(), "stop() did not end the run"
    results = outcome["trace"].results
    assert {r.finish_reason for r in results} == {"abort"}
    assert all(len(r.token_ids) < 400 for r in results)
    answer = smollm2.generate(["What is the capital of France?"], max_tokens=12, temperature=0)[0]
    assert "Paris" in answer.text and answer.finish_reason != "abort"


def test_stop_ends_a_stream(smollm2):
    pieces = []
    for piece in smollm2.stream("Count from one to one hundred in words.", max_tokens=200, temperature=0):
        pieces.append(piece)
        if len(pieces) == 3:
            smollm2.stop()
    assert 3 <= len(pieces) <= 4
    assert smollm2.generate("Say hi", max_tokens=4)[0].token_ids
