"""What recording a step trace costs: throughput with and without recording, and the memory a large trace takes.

1. vLLM with the bundled SmolLM2-135M, 32 requests x 64 tokens: `engine.run(record=False)` against
   `engine.run(record=True)` on the same loaded engine, alternating, best of the repeats.
2. A 2,000-request trace (vLLM, tiny-llama, 16 tokens each): its size in memory, every object counted once.

    .venv/bin/python bench/trace_overhead.py [--repeats 5] [--requests 2000]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import workbench as wb  # noqa: E402
from workbench.workload import make_workload  # noqa: E402


def deep_size(root: object) -> int:
    """Bytes held by `root` and everything it references, each object once (shared snapshots count once)."""
    seen, stack, total = set(), [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total


def throughput(engine: wb.Engine, record: bool) -> float:
    requests = make_workload(n=32, output_tokens=64, seed=0)
    start = time.perf_counter()
    trace = engine.run(requests, record=record)
    seconds = time.perf_counter() - start
    return sum(len(r.token_ids) for r in trace.results) / seconds, len(trace.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()

    with wb.load("vllm", model="smollm2-135m") as engine:
        throughput(engine, True)  # warm-up
        best = {False: 0.0, True: 0.0}
        steps = 0
        for repeat in range(args.repeats):
            for record in ((False, True) if repeat % 2 == 0 else (True, False)):  # neither always goes first
                tps, n = throughput(engine, record)
                best[record] = max(best[record], tps)
                steps = max(steps, n)

    with wb.load("vllm", model="tiny-llama", max_model_len=512) as engine:
        start = time.perf_counter()
        big = engine.run(make_workload(n=args.requests, output_tokens=16, seed=0))
        seconds = time.perf_counter() - start
        size = deep_size(big.steps) + deep_size(big.requests) + deep_size(big.results)

    print(f"\nvLLM, smollm2-135m float32, 32 requests x 64 tokens, best of {args.repeats}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n")
    print("| recording | tokens/s | steps |")
    print("| --- | --- | --- |")
    print(f"| off | {best[False]:.1f} | {steps} |")
    print(f"| every step | {best[True]:.1f} | {steps} |")
    print(f"\nratio recorded / not recorded: {best[True] / best[False]:.3f}")
    print(f"\n{args.requests}-request trace (vLLM, tiny-llama, 16 tokens each): {len(big.steps)} steps, "
          f"{size / 2**20:.1f} MiB in memory, run took {seconds:.1f} s")


if __name__ == "__main__":
    main()
