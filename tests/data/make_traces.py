"""Record the saved traces the fast tests read (tests/data/*.jsonl) from real engines and a real server.

    .venv/bin/python tests/data/make_traces.py          # a few minutes; rerun when the trace format changes

- vllm_prefix_preemption.jsonl: vLLM, a 20-block pool of 32 tokens, 8 requests sharing a system prompt longer than
  a block, arriving over time: shared blocks, preemptions and resumptions, prefix cache hits.
- transformers_paged.jsonl: HF continuous batching, 5 requests arriving over time, batches of at most 3.
- transformers_static.jsonl: HF `generate` in static batches, 5 requests arriving over time, batches of at most 3.
- vllm_server.jsonl: vLLM's OpenAI server through the `openai` engine, 6 requests at a rate: the client's view and
  the server's /metrics at each poll, and its histograms' growth in `engine_counters`.
- vllm_metrics.txt: one reading of that server's /metrics, as it publishes it.
- vllm_ngram.jsonl: vLLM with n-gram speculative decoding (4 draft tokens), 3 requests arriving over time, one
  copying a passage from its prompt: draft tokens verified and accepted per request per step, and vLLM's own
  spec-decode counters for the run.
- vllm_tensor_parallel.jsonl: vLLM with tensor_parallel_size=2 (tiny-llama, whose heads split in two; two worker
  processes), 4 requests arriving over time: each rank's memory at every step.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

import workbench as wb
from workbench.servers import start_vllm_server
from workbench.workload import Request, make_workload

HERE = Path(__file__).resolve().parent
SYSTEM_WORDS = 60  # a shared system prompt longer than one 32-token block


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    shared = make_workload(n=8, output_tokens=(40, 90), shared_prefix_tokens=SYSTEM_WORDS, rate=6.0, seed=11)
    with wb.load("vllm", num_blocks=20, block_size=32, max_model_len=512) as engine:
        trace = engine.run(shared)
        assert trace.engine_counters["vllm:num_preemptions"] > 0, "no preemption: choose another seed"
        trace.save(HERE / "vllm_prefix_preemption.jsonl")
    arriving = make_workload(n=5, output_tokens=(8, 20), rate=4.0, seed=12)
    with wb.load("transformers-paged", num_blocks=64, block_size=32, max_batch_size=3) as engine:
        engine.run(arriving).save(HERE / "transformers_paged.jsonl")
    with wb.load("transformers", max_batch_size=3) as engine:
        engine.run(arriving).save(HERE / "transformers_static.jsonl")
    with start_vllm_server("smollm2-135m", kv_cache_gb=0.25, max_model_len=1024) as server:
        with wb.load("openai", url=server.url, model="smollm2-135m", poll_s=0.2) as remote:
            remote.run(make_workload(n=6, output_tokens=24, rate=3.0, seed=13)).save(HERE / "vllm_server.jsonl")
        (HERE / "vllm_metrics.txt").write_text(httpx.get(f"{server.root}/metrics").text)
    speculative()
    tensor_parallel()
    for path in sorted(HERE.glob("*.jsonl")):
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")


def speculative() -> None:
    passage = "The keeper climbed the ninety steps, lit the great lamp, and watched the ships pass the strait."
    requests = [Request(f"Text: {passage}\n\nThe same text, copied exactly:\n{passage[:30]}", max_tokens=24,
                        chat=False, ignore_eos=True),
                Request("Write a short poem about the sea.", max_tokens=24, ignore_eos=True, arrival_s=0.2),
                Request("Name three colors.", max_tokens=16, ignore_eos=True, arrival_s=0.4)]
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    with wb.load("vllm", speculative_config=ngram, max_model_len=512, kv_cache_gb=0.25) as engine:
        trace = engine.run(requests)
        assert trace.engine_counters["vllm:spec_decode_num_accepted_tokens"] > 0, "nothing accepted"
        trace.save(HERE / "vllm_ngram.jsonl")


def tensor_parallel() -> None:
    with wb.load("vllm", model="tiny-llama", tensor_parallel_size=2, distributed_executor_backend="mp",
                 max_model_len=512, kv_cache_gb=0.0625) as engine:
        trace = engine.run(make_workload(n=4, output_tokens=(8, 16), rate=4.0, seed=14))
        assert len(trace.steps[0].memory.ranks) == 2, "no per-rank memory in the trace"
        trace.save(HERE / "vllm_tensor_parallel.jsonl")


if __name__ == "__main__":
    main()
