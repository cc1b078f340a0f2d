"""Engine options pass through to the engines' own distributed settings: tensor parallel size 2 on this CPU, for
vLLM (its own worker processes) and DeepSpeed (AutoTP, one process per rank started by torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAVE_DEEPSPEED, HAVE_VLLM

SCRIPT = Path(__file__).with_name("tensor_parallel_run.py")
TWO_CORES = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel size 2 wants two cores")


def _run(engine: str, size: int, ranks: int = 1) -> list[dict]:
    """The JSON line each process printed (one per rank when torchrun starts `ranks` processes)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(ranks)] if ranks > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(SCRIPT), engine, str(size)], capture_output=True, text=True,
                          timeout=300, env=env)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == ranks, done.stderr[-2000:]
    return lines


@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")
@TWO_CORES
def test_vllm_tensor_parallel_2_on_cpu_gives_the_same_tokens():
    [split], [whole] = _run("vllm", 2), _run("vllm", 1)
    assert split["tensor_parallel_size"] == 2 and split["world_size"] == 2  # two workers, each half the heads
    assert split["tokens"] == whole["tokens"]


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed")
@TWO_CORES
def test_deepspeed_tensor_parallel_2_under_torchrun_gives_the_same_tokens():
    ranks, [whole] = _run("deepspeed", 2, ranks=2), _run("deepspeed", 1)
    assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["q_proj_rows"] * 2 == whole["q_proj_rows"] for r in ranks)  # each rank holds half the heads
    assert all(r["tensor_parallel"].startswith("AutoTP, rank") for r in ranks)
    assert all(r["tokens"] == whole["tokens"] for r in ranks)
    assert all(r["logits"] == pytest.approx(whole["logits"], rel=1e-4, abs=1e-5) for r in ranks)
