"""What running an engine in its own process costs, against running it in the kernel's process, in one run:

1. throughput of `generate` (32 chat prompts x 64 new tokens, greedy) through the worker and in-process;
2. the four live views attached to a run (16 requests x 64 tokens): tokens/s with them and without;
3. the wall time of a second load of the same engine: in-process (its libraries already imported), in a fresh
   worker (a new interpreter that imports them) and in the spare worker the first load left behind;
4. the kernel's memory over 20 load/close cycles of vLLM in a worker.

    .venv/bin/python bench/engine_host.py [--engines vllm transformers] [--repeats 3] [--cycles 20]
                                          [--cycle-engine vllm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import workbench as wb  # noqa: E402
from workbench.engines import host  # noqa: E402
from workbench.sysmem import process_memory  # noqa: E402
from workbench.widgets import BatchTimeline, KVCacheView, LiveFeed, MemoryView, ThroughputView  # noqa: E402
from workbench.workload import make_workload  # noqa: E402

PROMPTS = [f"Write a short paragraph about topic number {i}." for i in range(32)]


def tokens_per_s(engine) -> float:
    start = time.perf_counter()
    results = engine.generate(PROMPTS, max_tokens=64, temperature=0)
    return sum(len(r.token_ids) or r.metrics.generated_tokens for r in results) / (time.perf_counter() - start)


def with_views(engine, views: bool) -> float:
    workload = make_workload(n=16, output_tokens=64, seed=0)
    start = time.perf_counter()
    if views:
        with LiveFeed([KVCacheView(), BatchTimeline(), MemoryView(), ThroughputView()], fps=10) as feed:
            trace = engine.run(workload, **feed.callbacks)
    else:
        trace = engine.run(workload)
    return sum(r.metrics.generated_tokens for r in trace.results) / (time.perf_counter() - start)


def timed_load(name: str, isolate: bool) -> float:
    start = time.perf_counter()
    engine = wb.load(name, isolate=isolate)
    seconds = time.perf_counter() - start
    engine.close()
    return seconds


def second_loads(name: str) -> dict[str, float]:
    """A second load's wall time: in this process (the libraries imported by the first), in a fresh worker (a new
    interpreter imports them), and in the spare worker the first load left (it imported them meanwhile)."""
    timed_load(name, False)
    loads = {"in-process": timed_load(name, False)}
    host.end_spare_workers()
    loads["fresh worker"] = timed_load(name, True)
    host.wait_for_spare(name)
    loads["spare worker"] = timed_load(name, True)
    return loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=[s.name for s in wb.engines()
                                                         if s.installed and not s.remote and s.name != "tensorrt-llm"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--cycle-engine", default="vllm")
    args = parser.parse_args()
    rows = []
    for name in args.engines:
        isolated, local = wb.load(name), wb.load(name, isolate=False)
        for engine in (isolated, local):
            engine.generate(PROMPTS[:2], max_tokens=4, temperature=0)  # first-call costs
        ratios, views = [], {"worker": [], "in-process": []}
        for repeat in range(args.repeats):
            order = (isolated, local) if repeat % 2 == 0 else (local, isolated)
            speeds = {id(engine): tokens_per_s(engine) for engine in order}
            ratios.append(speeds[id(isolated)] / speeds[id(local)])
            for where, engine in (("worker", isolated), ("in-process", local))[::1 if repeat % 2 == 0 else -1]:
                plain, watched = with_views(engine, False), with_views(engine, True)
                views[where].append(watched / plain)
        isolated.close()
        local.close()
        loads = second_loads(name)
        rows.append((name, statistics.median(ratios), statistics.median(views["worker"]),
                     statistics.median(views["in-process"]), loads))
        print(f"{name}: worker/in-process {rows[-1][1]:.3f}, views {rows[-1][2]:.3f} (worker) "
              f"{rows[-1][3]:.3f} (in-process), second load {loads}", flush=True)

    rss = []
    for _ in range(args.cycles):
        with wb.load(args.cycle_engine) as engine:
            engine.generate("Hello", max_tokens=4)
        rss.append(process_memory()[0])

    print(f"\nSmolLM2-135M float32, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, median of {args.repeats}\n")
    print("| engine | throughput, worker / in-process | live views on / off, worker | live views on / off, "
          "in-process | second load in-process s | in a fresh worker s | in the spare worker s | spare / "
          "in-process |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, ratio, view, local_view, loads in rows:
        print(f"| {name} | {ratio:.3f} | {view:.3f} | {local_view:.3f} | {loads['in-process']:.1f} | "
              f"{loads['fresh worker']:.1f} | {loads['spare worker']:.1f} | "
              f"{loads['spare worker'] / loads['in-process']:.2f} |")
    print(f"\n{args.cycles} load/close cycles of {args.cycle_engine} in a worker: the kernel held "
          f"{rss[0] / 2**20:.0f} MiB after the first, {rss[-1] / 2**20:.0f} MiB after the last "
          f"({(rss[-1] - rss[0]) / 2**20:+.0f} MiB).")


if __name__ == "__main__":
    main()
