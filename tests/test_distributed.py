"""Engine options pass through to the engines' own distributed settings: vLLM tensor parallel size 2 on this CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAVE_VLLM

SCRIPT = Path(__file__).with_name("tensor_parallel_run.py")


def _run(size: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_OMP_THREADS_BIND"}
    done = subprocess.run([sys.executable, str(SCRIPT), str(size)], capture_output=True, text=True, timeout=600,
                          env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stderr[-2000:]
    return json.loads(lines[-1])


@pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not installed")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel size 2 wants two cores")
def test_vllm_tensor_parallel_2_on_cpu_gives_the_same_tokens():
    split, whole = _run(2), _run(1)
    assert split["tensor_parallel_size"] == 2 and split["world_size"] == 2  # two workers, each half the heads
    assert split["tokens"] == whole["tokens"]
