"""Step traces from HF Transformers continuous batching (its paged cache and scheduler)."""

from __future__ import annotations

import workbench as wb
from workbench.trace import Trace
from workbench.workload import Request


def test_late_request_joins_the_running_batch_with_its_own_blocks(tmp_path):
    with wb.load("transformers-paged", model="smollm2-135m") as engine:
        # The first step of a fresh model pays one-time costs (seconds on a busy machine): pay them before the
        # clock matters, and give r0 enough tokens to be still decoding when r1 arrives.
        engine.generate("Hi", max_tokens=2)
        requests = [Request("Count from one to forty.", max_tokens=80, ignore_eos=True),
                    Request("Name three colors.", max_tokens=8, arrival_s=1.0, ignore_eos=True)]
        seen = []
        trace = engine.run(requests, on_step=seen.append)
    assert len(seen) == len(trace.steps) >= 30  # one step per token of the longest request, at least
    joined = next(s for s in trace.steps if s.request("r1") and s.request("r1").state == "prefill")
    assert joined.step > 0 and joined.time_s >= 1.0
    assert joined.request("r0").state == "decode"  # r0 kept decoding in the step r1 was prefilled
    r0, r1 = joined.request("r0"), joined.request("r1")
    assert r0.block_ids and r1.block_ids and not set(r0.block_ids) & set(r1.block_ids)
    assert joined.blocks_used == len(r0.block_ids) + len(r1.block_ids)
    table = trace.requests_df().set_index("request_id")
    assert table.loc["r1", "finish_step"] < table.loc["r0", "finish_step"]  # it left before r0: no static batch
    assert [len(r.token_ids) for r in trace.results] == [80, 8]
    assert trace.results[1].metrics.ttft_s < 1.0  # timed from its own arrival
    # each request's cache grows by one token per decode step
    grows = [s.request("r0").computed_tokens for s in trace.steps if s.request("r0")
             and s.request("r0").state == "decode"]
    assert all(b - a == 1 for a, b in zip(grows, grows[1:]))
    assert Trace.load(trace.save(tmp_path / "paged.jsonl")) == trace


def test_the_cache_facts_are_the_real_pool_read_from_the_engine():
    with wb.load("transformers-paged", model="smollm2-135m", num_blocks=24, block_size=32) as engine:
        before = engine.cache_facts.num_blocks  # read from the pool transformers allocates, not from the option
        trace = engine.run([Request("Name three colors.", max_tokens=4)])
    assert before == trace.facts.num_blocks > 24  # the pool's reserved blocks come first
    assert all(len(step.blocks) == trace.facts.num_blocks for step in trace.steps)
