"""Step traces from real vLLM with the bundled model: prefix sharing, preemption, continuous batching, block counts."""

from __future__ import annotations

import pytest

import workbench as wb
from conftest import HAVE_VLLM
from workbench.analysis import kv_waste, serving_metrics
from workbench.trace import BLOCK_USED, Trace
from workbench.workload import Request, make_workload

pytestmark = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")

SYSTEM = ("You are a patient teacher of computer systems. You explain how inference engines keep the keys and "
          "values of earlier tokens in a cache split into fixed-size blocks, how requests share blocks when their "
          "prompts begin the same way, and how a scheduler admits new requests between steps. ") * 2


@pytest.fixture(scope="module")
def small_cache():
    """vLLM with 20 blocks of 32 tokens: small enough for 8 requests x 150 tokens to force preemption."""
    # in this process: a test below reads vLLM's block pool itself
    with wb.load("vllm", model="smollm2-135m", num_blocks=20, block_size=32, max_model_len=512,
                 isolate=False) as engine:
        yield engine


def test_shared_system_prompt_shares_physical_blocks(small_cache):
    # r0 runs long enough to still hold its blocks when r1 arrives, however fast the machine (8 tokens once ended
    # before 0.3 s)
    requests = [Request("What is a block?", system=SYSTEM, max_tokens=64, ignore_eos=True),
                Request("What is a scheduler?", system=SYSTEM, max_tokens=8, arrival_s=0.3)]
    trace = small_cache.run(requests)
    both = [s for s in trace.steps if {"r0", "r1"} <= {r.request_id for r in s.requests if r.block_ids}]
    assert both, "the two requests never held blocks at the same step"
    r0, r1 = both[0].request("r0"), both[0].request("r1")
    shared = [b for b in r0.block_ids if b in r1.block_ids]
    assert len(shared) >= 2 and r0.block_ids[: len(shared)] == r1.block_ids[: len(shared)]  # the first blocks
    assert all(len(owners) == 2 for block, owners in both[0].block_owners().items() if block in shared)
    assert trace.blocks_df(trace.steps.index(both[0])).query("shared").shape[0] == len(shared)
    assert trace.requests_df().set_index("request_id").loc["r1", "cached_tokens"] >= 2 * 32
    assert trace.engine_counters["vllm:prefix_cache_hits"] == trace.steps[-1].counters["prefix_cache_hit_tokens"]


def test_small_cache_preempts_and_resumes_and_counts_match_vllm(small_cache):
    trace = small_cache.run(make_workload(n=8, output_tokens=150, prompt_words=(20, 30), seed=1))
    preemptions = trace.steps[-1].counters["preemptions"]
    assert preemptions > 0
    assert preemptions == trace.engine_counters["vllm:num_preemptions"]
    per_request = trace.requests_df()
    assert per_request["preemptions"].sum() == preemptions
    resumed = per_request[per_request["preemptions"] > 0]["request_id"].iloc[0]
    states = [s.request(resumed).state for s in trace.steps if s.request(resumed)]
    first_preempted = states.index("preempted")
    assert "prefill" in states[first_preempted:] and states[-1] == "finished"  # it came back and finished
    assert all(len(r.token_ids) == 150 for r in trace.results)
    # why, in words, from the scheduler's own state at that step
    rows = trace.request_steps_df()
    idle = rows[rows["state"].isin(["waiting", "preempted"])]
    assert (idle["reason"] != "").all()
    preempted_at = rows[(rows["request_id"] == resumed) & (rows["state"] == "preempted")].iloc[0]
    assert preempted_at["reason"].startswith("preempted: a running request needed a new KV block")
    short = idle[idle["reason"].str.startswith("no free KV blocks")]
    assert len(short) > 0
    for reason in short["reason"]:  # "no free KV blocks: it needs up to N, M are free"
        need, free = (int(word.strip(",")) for word in reason.split() if word.strip(",").isdigit())
        assert need > free


def test_a_full_batch_and_a_spent_token_budget_are_the_reasons_given():
    four = [Request(f"Question number {i}: what is a KV cache?", max_tokens=16, ignore_eos=True) for i in range(4)]
    with wb.load("vllm", model="smollm2-135m", max_batch_size=2, max_model_len=1024, kv_cache_gb=0.25) as engine:
        rows = engine.run(four).request_steps_df()
    waiting = rows[rows["state"] == "waiting"]
    assert len(waiting) > 0 and (waiting["reason"] == "batch full: 2 requests running, max_num_seqs is 2").all()
    long = [Request("Tell me about paged attention. " * 20, max_tokens=8, ignore_eos=True) for _ in range(3)]
    with wb.load("vllm", model="smollm2-135m", max_num_batched_tokens=64, max_model_len=1024,
                 kv_cache_gb=0.25) as engine:
        rows = engine.run(long).request_steps_df()
    waiting = rows[rows["state"] == "waiting"]
    assert len(waiting) > 0
    assert waiting["reason"].str.startswith("token budget spent: 64 of 64 tokens scheduled this step").all()


def test_late_request_joins_the_running_batch(small_cache):
    requests = [Request("Count from one to forty.", max_tokens=120, ignore_eos=True),  # still decoding at 1 s
                Request("Name three colors.", max_tokens=8, arrival_s=1.0, ignore_eos=True)]
    trace = small_cache.run(requests)
    joined = next(s for s in trace.steps if s.request("r1") and s.request("r1").state == "prefill")
    assert joined.step > 0
    assert joined.request("r0").state == "decode"  # r0 was mid-decode and kept going in the same step
    assert joined.time_s >= 1.0
    assert trace.results[1].metrics.ttft_s < 1.0  # timed from its own arrival, not from the run's start


def test_blocks_in_use_match_the_engine_at_every_step(small_cache):
    checked = []

    def check(snapshot):
        pool = small_cache.scheduler.kv_cache_manager.block_pool
        engine_used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
        held = {b for r in snapshot.requests if r.state not in ("finished",) for b in r.block_ids}
        used = {i for i, c in enumerate(snapshot.blocks) if c == BLOCK_USED}
        checked.append((snapshot.blocks_used, engine_used, held == used))

    trace = small_cache.run(make_workload(n=6, output_tokens=(20, 60), shared_prefix_tokens=60, rate=8.0, seed=2),
                            on_step=check)
    assert len(checked) == len(trace.steps) > 10
    assert all(ours == theirs and same for ours, theirs, same in checked)
    assert max(theirs for _, theirs, _ in checked) > 3


def test_saved_trace_loads_back_equal(small_cache, tmp_path):
    trace = small_cache.run(make_workload(n=3, output_tokens=10, shared_prefix_tokens=40, seed=3))
    path = trace.save(tmp_path / "trace.jsonl")
    loaded = Trace.load(path)
    assert loaded == trace
    assert loaded.steps_df().equals(trace.steps_df())
    assert not trace.request_steps_df().empty


def test_record_false_keeps_no_steps_but_calls_on_step(small_cache):
    seen = []
    trace = small_cache.run(["Hi there"], record=False, on_step=seen.append)
    assert trace.steps == [] and len(seen) >= 1 and trace.results[0].text


def test_waste_analysis_from_real_lengths(small_cache):
    trace = small_cache.run(make_workload(n=4, output_tokens=(10, 40), seed=4))
    table = kv_waste(trace).set_index("scheme")
    lengths = [q.prompt_tokens + len(r.token_ids) for q, r in zip(trace.requests, trace.results)]
    assert table.loc["exact per sequence", "reserved_tokens"] == sum(lengths)
    assert table.loc["paged, block 16", "reserved_tokens"] == sum(-(-n // 16) * 16 for n in lengths)
    waste = table["waste_pct"]
    assert waste["exact per sequence"] == 0
    assert waste["paged, block 16"] <= waste["paged, block 32"] <= waste["paged, block 64"] <= waste["paged, block 128"]
    assert waste["paged, block 128"] < waste["contiguous, max context (512)"]


def test_request_timings_agree_with_vllms_own_request_stats(small_cache, tmp_path):
    trace = small_cache.run(make_workload(n=5, output_tokens=24, rate=6.0, seed=8))
    for result in trace.results:
        mine, vllms = result.metrics, result.metrics.engine  # vLLM's RequestStateStats for this request
        assert vllms["generated_tokens"] == mine.generated_tokens == 24
        assert mine.ttft_s == pytest.approx(vllms["ttft_s"], rel=0.05, abs=0.01)
        assert sum(mine.token_latencies_s[1:]) == pytest.approx(vllms["decode_s"], rel=0.05, abs=0.01)
    metrics = serving_metrics(trace)
    assert metrics["mean_ttft_ms"] == pytest.approx(metrics["engine_mean_ttft_ms"], rel=0.05)
    assert metrics["mean_itl_ms"] == pytest.approx(metrics["engine_mean_itl_ms"], rel=0.05)
    assert Trace.load(trace.save(tmp_path / "t.jsonl")).results[0].metrics.engine == trace.results[0].metrics.engine


def test_a_trace_opens_in_perfetto_as_request_tracks_and_engine_counters(small_cache, tmp_path):
    import json

    trace = small_cache.run(make_workload(n=3, output_tokens=8, seed=9))
    events = json.loads(trace.to_perfetto(tmp_path / "run.json").read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert tracks == {"r0", "r1", "r2"}
    slices = [e for e in events if e["ph"] == "X"]
    for tid in (1, 2, 3):
        states = [e["name"] for e in sorted((e for e in slices if e["tid"] == tid), key=lambda e: e["ts"])]
        assert states[0] in ("waiting", "prefill") and states[-1] == "decode"
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"waiting", "running", "KV cache used %", "tokens this step"} <= counters
    decode = sum(e["dur"] for e in slices if e["name"] == "decode")
    assert decode > 0
