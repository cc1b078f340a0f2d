"""An engine split over ranks, measured the same way at any size: the prompts' greedy tokens, what each rank holds
(`Engine.ranks()`), the communication calls each forward pass makes, and the run's time.

vLLM starts and drives its own rank processes, so `measure_ranks` loads it with `wb.load` like any engine. DeepSpeed
needs one process per rank, each loading the engine itself: `measure_ranks` then starts them with torchrun and
collects what each printed.

>>> from workbench.parallel import measure_ranks
>>> measure_ranks("vllm", "tiny-llama", prompts, tensor_parallel_size=2)      # doctest: +SKIP
>>> measure_ranks("deepspeed", "tiny-llama", prompts, tensor_parallel_size=2)  # one process per rank  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from workbench.errors import WorkbenchError
from workbench.trace import Trace, merge_ranks


def measure_ranks(engine: str, model: str, prompts: Sequence[str], max_tokens: int = 8,
                  timeout_s: float = 600, **options: Any) -> list[dict]:
    """Load `engine` with `options` (`tensor_parallel_size`, `pipeline_parallel_size`, ...), generate `max_tokens`
    greedy tokens for each raw prompt, and return one dict per process that ran a rank's engine (one for vLLM, which
    holds every rank's facts; one per rank for DeepSpeed): `tokens`, `seconds` (the run), `forward_passes` (each
    rank's, during the run), `ranks` (each rank's `RankFacts` as a dict), `collectives_per_pass` (each rank's
    communication calls during the run, per forward pass) and `trace`: the run's `Trace`, with each rank's memory at
    every step in `memory.ranks` (DeepSpeed's ranks record one trace each, merged into one that every rank's dict
    holds)."""
    spec = {"engine": engine, "model": model, "prompts": list(prompts), "max_tokens": max_tokens, "options": options}
    size = int(options.get("tensor_parallel_size") or 1)
    if engine != "deepspeed":
        return [_measure(spec, isolate=True)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(size)]
    command = [*launcher, "-m", __name__] if size > 1 else [sys.executable, "-m", __name__]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="workbench-ranks-") as traces:
        spec["trace_dir"] = traces
        done = subprocess.run([*command, json.dumps(spec)], capture_output=True, text=True, timeout=timeout_s,
                              env=env)
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or len(lines) != size:
            tail = "\n".join(done.stderr.strip().splitlines()[-6:])
            raise WorkbenchError(f"the {size} {engine} rank process(es) ended with exit code {done.returncode} and "
                                 f"{len(lines)} answer(s); their last words:\n{tail}")
        lines.sort(key=lambda line: line["ranks"][0]["rank"])
        each = [Trace.load(Path(traces) / f"rank{line['ranks'][0]['rank']}.jsonl") for line in lines]
    trace = merge_ranks(each) if size > 1 else each[0]
    return [{**line, "trace": trace} for line in lines]


def _measure(spec: dict, isolate: bool) -> dict:
    import workbench as wb
    from workbench.workload import Request

    requests = [Request(p, max_tokens=spec["max_tokens"], chat=False, ignore_eos=True) for p in spec["prompts"]]
    with wb.load(spec["engine"], model=spec["model"], isolate=isolate, **spec["options"]) as engine:
        engine.run(requests[:1])  # the first step of a fresh model pays one-time costs
        before = engine.ranks()
        trace = engine.run(requests)
        after = engine.ranks()
    per_pass = [{name: (count - b.collectives.get(name, 0)) / max(1, a.forward_passes - b.forward_passes)
                 for name, count in a.collectives.items()} for b, a in zip(before, after)]
    seconds = max(q.arrival_s + r.metrics.queue_s + r.metrics.total_s for q, r in zip(trace.requests, trace.results))
    measured = {"tokens": [r.token_ids for r in trace.results], "seconds": seconds,
                "forward_passes": [a.forward_passes - b.forward_passes for b, a in zip(before, after)],
                "ranks": [asdict(r) for r in after], "collectives_per_pass": per_pass}
    if "trace_dir" not in spec:
        return {**measured, "trace": trace}
    trace.save(Path(spec["trace_dir"]) / f"rank{after[0].rank}.jsonl")  # a rank's process hands its trace over
    return measured


if __name__ == "__main__":  # one rank's process, started by measure_ranks through torchrun
    answer = json.dumps(_measure(json.loads(sys.argv[1]), isolate=False)) + "\n"
    sys.stdout.flush()
    os.write(1, answer.encode())  # one write, under the pipe's atomic size: ranks' lines never interleave
