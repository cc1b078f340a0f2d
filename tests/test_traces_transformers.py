"""Step traces from HF Transformers `generate`: static batches, a contiguous cache growing per step, padding."""

from __future__ import annotations

import pytest

import workbench as wb
from workbench.trace import Trace
from workbench.workload import Request


@pytest.fixture(scope="module")
def static_pairs():
    with wb.load("transformers", model="smollm2-135m", max_batch_size=2) as engine:
        yield engine


def test_static_batch_makes_late_requests_wait_and_counts_padding(static_pairs, tmp_path):
    requests = [Request("Hi", max_tokens=6, ignore_eos=True),
                Request("Tell me a long story about dragons and knights", max_tokens=3, ignore_eos=True),
                Request("Late one", max_tokens=4, arrival_s=0.2, ignore_eos=True)]
    trace = static_pairs.run(requests)
    table = trace.requests_df().set_index("request_id")
    # r2 arrived while the first batch decoded, but a static batch admits nobody until it ends
    assert table.loc["r2", "first_step"] == table.loc["r0", "finish_step"] + 1
    rows = trace.request_steps_df()
    assert set(rows[rows["state"] == "waiting"]["reason"]) == {
        "static batching: a batch of 2 is running; it waits for the next batch"}
    assert [len(r.token_ids) for r in trace.results] == [6, 3, 4]
    first = trace.steps[0]
    r0, r1 = first.request("r0"), first.request("r1")
    prompt = {q.request_id: q.prompt_tokens for q in trace.requests}
    assert r0.padding_tokens == prompt["r1"] - prompt["r0"] > 0 and r1.padding_tokens == 0  # left padding
    assert r0.computed_tokens == r1.computed_tokens  # one padded width for the whole batch
    # the cache grows by one slot per step; r1 finished after 3 tokens but rides along as padding
    grows = [s.request("r0").computed_tokens for s in trace.steps if s.request("r0")]
    assert grows == list(range(grows[0], grows[0] + 6))
    assert trace.steps[5].request("r1").state == "finished" and trace.steps[5].request("r1").padding_tokens == 3
    steps = trace.steps_df()
    assert (steps["kv_used_bytes"] <= steps["kv_reserved_bytes"]).all()
    assert Trace.load(trace.save(tmp_path / "t.jsonl")) == trace
