"""What watching costs: generation throughput with and without live views attached, and their frame rate.

vLLM with the bundled SmolLM2-135M, 16 requests x 64 tokens arriving at once, on one loaded engine, alternating
which mode goes first, the median per-repeat ratio reported:

- no views: `engine.run(requests)` (recording, as the Workbench always does);
- Workbench: a `LiveFeed` at 10 frames/s drawing the view on screen (the Workbench redraws only its selected tab)
  and decoding each request's text every frame;
- all four views: a `LiveFeed` at 10 frames/s redrawing the KV map, timeline, memory and throughput every frame.

Run outside a kernel, the widgets serialize their updates but nothing carries them to a browser: the cost of the
kernel's own message sending is not in these figures.

    .venv/bin/python bench/live_views.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

import workbench as wb  # noqa: E402
from workbench.widgets import BatchTimeline, KVCacheView, LiveFeed, MemoryView, ThroughputView  # noqa: E402
from workbench.workload import make_workload  # noqa: E402

MODES = ("no views", "Workbench (selected tab + texts)", "all four views")


def one_run(engine: wb.Engine, mode: str) -> tuple[float, float, int]:
    """(tokens/s, frames/s, frames) of one run in `mode`."""
    requests = make_workload(n=16, output_tokens=64, seed=0)
    views = [KVCacheView(), BatchTimeline(), MemoryView(), ThroughputView()]
    tokens: dict[int, list[int]] = {}

    def decode_texts(trace) -> None:
        for ids in list(tokens.values()):
            engine.tokenizer.decode(ids, skip_special_tokens=True)

    if mode == MODES[0]:
        feed, callbacks = None, {}
    elif mode == MODES[1]:
        feed = LiveFeed(views, fps=10, on_frame=decode_texts, visible=lambda view: view is views[0])
        callbacks = {**feed.callbacks, "on_tokens": lambda i, ids: tokens.setdefault(i, []).extend(ids)}
    else:
        feed = LiveFeed(views, fps=10)
        callbacks = feed.callbacks
    start = time.perf_counter()
    trace = engine.run(requests, **callbacks)
    seconds = time.perf_counter() - start
    if feed is not None:
        feed.close()
    produced = sum(len(r.token_ids) for r in trace.results)
    frames = feed.frames if feed is not None else 0
    return produced / seconds, frames / seconds, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float, int]]] = {mode: [] for mode in MODES}
    with wb.load("vllm", model="smollm2-135m") as engine:
        one_run(engine, MODES[2])  # warm-up
        for repeat in range(args.repeats):
            order = MODES if repeat % 2 == 0 else tuple(reversed(MODES))  # no mode always goes first
            for mode in order:
                results[mode].append(one_run(engine, mode))

    base = [r[0] for r in results[MODES[0]]]
    print(f"\nvLLM, smollm2-135m float32, 16 requests x 64 tokens, {args.repeats} repeats, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n")
    print("| mode | tokens/s (median) | frames/s (median) | median ratio to no views |")
    print("| --- | --- | --- | --- |")
    for mode in MODES:
        runs = results[mode]
        ratio = statistics.median(r[0] / b for r, b in zip(runs, base))
        print(f"| {mode} | {statistics.median(r[0] for r in runs):.1f} | "
              f"{statistics.median(r[1] for r in runs):.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
