"""TensorRT-LLM: on a machine without it (or without an NVIDIA GPU) the workbench says so; where it runs, the same
generation and trace checks as the other engines. Not yet run: see the README's GPU section."""

from __future__ import annotations

import importlib.util

import pytest

import workbench as wb
from workbench.engines import has_nvidia_gpu
from workbench.workload import make_workload

HAVE_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_engines_say_why_tensorrt_llm_is_missing_and_how_to_get_it():
    status = {s.name: s for s in wb.engines()}["tensorrt-llm"]
    assert "NVIDIA GPU" in status.description
    if not has_nvidia_gpu():  # first what no install can change: this machine has no NVIDIA GPU
        assert not status.installed and status.reason.startswith("it runs on NVIDIA GPUs only")
        assert status.install == "on a machine with an NVIDIA GPU: pip install 'workbench[tensorrt]'"
        with pytest.raises(wb.EngineNotInstalledError, match="NVIDIA GPUs only.*workbench\\[tensorrt\\]"):
            wb.load("tensorrt-llm")
    elif not HAVE_TRTLLM:
        assert not status.installed and "tensorrt_llm" in status.reason
        assert status.install == "pip install 'workbench[tensorrt]'"


needs_gpu = pytest.mark.skipif(not HAVE_TRTLLM or not _cuda(),
                               reason="TensorRT-LLM needs the tensorrt_llm package and an NVIDIA GPU")


@needs_gpu
def test_tensorrt_llm_answers_and_streams_like_the_others():
    with wb.load("tensorrt-llm", model="smollm2-135m", dtype="float16") as engine:
        result = engine.generate("What is the capital of France?", max_tokens=16, temperature=0)[0]
        assert "Paris" in result.text
        assert "".join(engine.stream("What is the capital of France?", max_tokens=16, temperature=0)) == result.text


@needs_gpu
def test_tensorrt_llm_trace_reads_its_iteration_stats():
    with wb.load("tensorrt-llm", model="smollm2-135m", dtype="float16") as engine:
        trace = engine.run(make_workload(n=8, output_tokens=64))
    steps = trace.steps_df()
    assert [r.metrics.generated_tokens for r in trace.results] == [64] * 8
    assert steps["engine_active"].max() > 1 and steps["blocks_used"].max() > 0
    assert trace.facts.num_blocks > 0
