"""The CUDA paths, where a GPU is present (skipped elsewhere): the Hugging Face engines on `device="cuda"`, GPU memory
figures in traces and `measure_memory`, and DeepSpeed with and without kernel injection.

Run on a GPU machine with `pytest tests/test_cuda.py` (tiny-llama: random weights, so what is compared is that
engines agree with each other, not what they say).
"""

from __future__ import annotations

import functools
import importlib.util

import pytest

import workbench as wb
from workbench.analysis import run_summary
from workbench.memory import measure_memory
from workbench.workload import make_workload

load = functools.partial(wb.load, isolate=False)  # in this process: the tests read the engines' internals

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA is not available)")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

MODEL = "tiny-llama"
PROMPTS = ["The quick brown fox", "Paged attention splits", "Once upon a time"]


def greedy(engine: wb.Engine, max_tokens: int = 12) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(PROMPTS, max_tokens=max_tokens, temperature=0, chat=False)]


def last_logits(engine: wb.Engine):
    ids = engine.tokenizer(PROMPTS[0], return_tensors="pt").input_ids.to(engine.device)
    with torch.no_grad():
        return engine.hf_model(ids).logits[0, -1].float().cpu()


@pytest.fixture(scope="module")
def cpu_tokens() -> list[list[int]]:
    with load("transformers", model=MODEL, device="cpu") as engine:
        return greedy(engine)


def test_transformers_on_cuda_gives_the_cpu_tokens_and_gpu_memory_figures(cpu_tokens):
    with load("transformers", model=MODEL, device="cuda") as engine:
        assert engine.info.device.startswith("cuda")
        assert greedy(engine) == cpu_tokens  # float32 on both: the same greedy path
        trace = engine.run(make_workload(n=4, prompt_words=(8, 24), output_tokens=(8, 16), seed=1))
        weights = engine.info.weight_bytes
    for step in trace.steps:
        m = step.memory
        # torch's allocations on the GPU hold the weights and the step's KV cache; RAM does not show them
        assert m.device_allocated_bytes >= weights + m.kv_used_bytes
        assert m.device_peak_bytes >= m.device_allocated_bytes
    assert run_summary(trace)["peak_gpu_memory_gib"] * 2**30 >= weights


def test_transformers_paged_on_cuda_gives_the_same_tokens_and_a_block_map(cpu_tokens):
    with load("transformers-paged", model=MODEL, device="cuda", num_blocks=256, block_size=16) as engine:
        assert greedy(engine) == cpu_tokens
        trace = engine.run(make_workload(n=6, prompt_words=(8, 24), output_tokens=(8, 16), seed=2))
    assert max(s.blocks.count("u") for s in trace.steps) > 0
    assert all(s.memory.device_allocated_bytes > s.memory.kv_reserved_bytes for s in trace.steps)


def test_an_engine_in_its_worker_gives_the_gpu_back_when_closed(cpu_tokens):
    from workbench.engines.host import gpu_memory_used

    before = gpu_memory_used()
    engine = wb.load("transformers-paged", model=MODEL, device="cuda", num_blocks=256, block_size=16)
    assert greedy(engine) == cpu_tokens
    assert gpu_memory_used() > before  # the worker's CUDA context, weights and cache
    report = engine.close()
    assert report.gpu_used_before_load == before and report.worker_exit_code == 0
    assert report.gpu_used_after_close <= before + (64 << 20), report  # all of it came back


def test_measure_memory_on_cuda_counts_the_weights_in_gpu_memory():
    row = measure_memory("transformers", model=MODEL, device="cuda", max_tokens=8)
    assert "error" not in row, row
    assert row["device"].startswith("cuda")
    # once loaded, torch holds the weights on the GPU and little else
    assert row["weights_bytes"] <= row["gpu_loaded_bytes"] < row["weights_bytes"] * 1.1 + 2**20
    assert row["gpu_peak_bytes"] >= row["gpu_loaded_bytes"] and row["rest_bytes"] >= 0


@needs_deepspeed
def test_deepspeed_without_injection_on_cuda_gives_the_transformers_tokens(cpu_tokens):
    with load("deepspeed", model=MODEL, device="cuda", kernel_inject=False) as engine:
        assert engine.info.options["kernel_inject"] == "off (asked)"
        assert greedy(engine) == cpu_tokens


@needs_deepspeed
def test_deepspeed_on_cuda_leaves_injection_off_for_grouped_query_attention():
    with load("deepspeed", model=MODEL, device="cuda", dtype="float16") as engine:  # tiny-llama: 4 heads, 2 KV
        assert "grouped-query" in engine.info.options["kernel_inject"]
        assert type(engine.hf_model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    with pytest.raises(wb.UnsupportedOptionError, match="grouped-query"):
        load("deepspeed", model=MODEL, device="cuda", kernel_inject=True)


@pytest.fixture(scope="module")
def multi_head_llama(tmp_path_factory) -> str:
    """tiny-llama with as many KV heads as heads (random weights): a model DeepSpeed's fused kernels can serve."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    source = wb.resolve_model(MODEL).path
    out = tmp_path_factory.mktemp("tiny-llama-mha")
    config = AutoConfig.from_pretrained(source)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(source / name, out / name)
    return str(out)


@needs_deepspeed
def test_deepspeed_kernel_injection_on_cuda_replaces_the_layers_or_says_why_not(multi_head_llama):
    from transformers import AutoConfig

    from workbench.engines.deepspeed import injection_blocker

    blocker = injection_blocker(AutoConfig.from_pretrained(multi_head_llama))
    if blocker:  # DeepSpeed 0.19.8 under transformers 5: refused up front, rather than failing in the second layer
        with pytest.raises(wb.UnsupportedOptionError, match="do not fit transformers"):
            load("deepspeed", model=multi_head_llama, device="cuda", dtype="float16", kernel_inject=True)
        with load("deepspeed", model=multi_head_llama, device="cuda", dtype="float16") as engine:
            assert engine.info.options["kernel_inject"] == f"off: {blocker}"
            assert len(greedy(engine)[0]) == 12
        return
    with load("transformers", model=multi_head_llama, device="cuda", dtype="float16") as engine:
        reference = {"tokens": greedy(engine), "logits": last_logits(engine)}
    with load("deepspeed", model=multi_head_llama, device="cuda", dtype="float16") as engine:
        assert engine.info.options["kernel_inject"].startswith("fused")  # the default on a GPU, for this model
        layer = type(engine.hf_model.model.layers[0]).__name__
        assert layer.startswith("DeepSpeed"), layer  # DeepSpeed's fused transformer layer, not LlamaDecoderLayer
        logits = last_logits(engine)
        tokens = greedy(engine)
    assert torch.allclose(logits, reference["logits"], atol=5e-2, rtol=5e-2)
    assert [t[:4] for t in tokens] == [t[:4] for t in reference["tokens"]]
