"""What watching costs: generation throughput with and without live views attached, and their frame rate.

vLLM with the bundled SmolLM2-135M, 16 requests x 64 tokens arriving at once, on one loaded engine, alternating
which mode goes first, the median per-repeat ratio reported:

- no views: `engine.run(requests)` (recording, as the Workbench always does);
- Workbench: a `LiveFeed` at 10 frames/s drawing the view on screen (the Workbench redraws only its selected tab)
  and decoding each request's text every frame;
- all four views: a `LiveFeed` at 10 frames/s redrawing the KV map, timeline, memory and throughput every frame.

A frame is drawn only when the engine took a new step since the last one: where the engine steps fewer than 10
times a second, the views follow every step.

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


def one_run(engine: wb.Engine, mode: str) -> tuple[float, float, float, float]:
    """(tokens/s, frames/s, engine steps/s, milliseconds per frame) of one run in `mode`."""
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
    per_frame = 1000 * feed.frame_seconds / frames if frames else 0.0
    return produced / seconds, frames / seconds, len(trace.steps) / seconds, per_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float, float, float]]] = {mode: [] for mode in MODES}
    with wb.load("vllm", model="smollm2-135m") as engine:
        one_run(engine, MODES[2])  # warm-up
        for repeat in range(args.repeats):
            order = MODES if repeat % 2 == 0 else tuple(reversed(MODES))  # no mode always goes first
            for mode in order:
                results[mode].append(one_run(engine, mode))

    base = [r[0] for r in results[MODES[0]]]
    print(f"\nvLLM, smollm2-135m float32, 16 requests x 64 tokens, {args.repeats} repeats, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}\n")
    print("| mode | tokens/s | engine steps/s | frames/s | ms per frame | ratio to no views |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in MODES:
        runs = results[mode]
        ratio = statistics.median(r[0] / b for r, b in zip(runs, base))
        tokens, frames, steps, per_frame = (statistics.median(r[k] for r in runs) for k in range(4))
        print(f"| {mode} | {tokens:.1f} | {steps:.1f} | {frames:.1f} | {per_frame:.1f} | {ratio:.3f} |")
    print("\nMedians over the repeats. A view is redrawn only when the engine has taken a new step, so frames/s is")
    print("at most min(10, engine steps/s).")


if __name__ == "__main__":
    main()
