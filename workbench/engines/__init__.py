"""The registry of engines: which exist, which are installed here, and how to get the others.

Adapters are imported only when loaded, so `import workbench` stays quick and works with no engine installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from workbench.errors import EngineNotInstalledError, UnknownEngineError


@dataclass(frozen=True)
class EngineSpec:
    """A known engine: its adapter, the modules it needs, and the extra that installs them."""

    name: str
    adapter: str  # "module:Class" under workbench.engines
    requires: tuple[str, ...]
    extra: str
    description: str
    remote: bool = False  # a server reached over HTTP: its model lives there, not in this process


@dataclass(frozen=True)
class EngineStatus:
    """Whether an engine can be loaded here, and if not, why and how to install it. `remote`: a server engine."""

    name: str
    installed: bool
    description: str
    reason: str = ""
    install: str = ""
    remote: bool = False


SPECS: dict[str, EngineSpec] = {
    spec.name: spec
    for spec in (
        EngineSpec("transformers", "transformers_static:TransformersEngine", ("torch", "transformers"), "",
                   "HF Transformers generate: static batches, left padding, contiguous KV cache"),
        EngineSpec("transformers-paged", "transformers_paged:TransformersPagedEngine", ("torch", "transformers"), "",
                   "HF Transformers continuous batching with its paged KV cache"),
        EngineSpec("vllm", "vllm:VLLMEngine", ("vllm",), "vllm",
                   "vLLM in-process: PagedAttention, continuous batching, prefix caching"),
        EngineSpec("deepspeed", "deepspeed_inference:DeepSpeedEngine", ("deepspeed", "torch", "transformers"),
                   "deepspeed", "DeepSpeed inference around the HF model (kernel injection and tensor parallelism "
                   "on GPUs)"),
        EngineSpec("tensorrt-llm", "trtllm:TensorRTLLMEngine", ("tensorrt_llm",), "tensorrt",
                   "NVIDIA TensorRT-LLM's LLM API (PyTorch backend): NVIDIA GPUs only"),
        EngineSpec("openai", "openai_server:OpenAIEngine", ("aiohttp", "httpx", "prometheus_client"), "",
                   "any OpenAI-compatible server over HTTP (vLLM, SGLang, trtllm-serve, llama.cpp, TGI's /v1); "
                   "traces from its /metrics", remote=True),
        EngineSpec("tgi", "tgi:TGIEngine", ("aiohttp", "httpx", "prometheus_client"), "",
                   "a Hugging Face TGI server over HTTP: /generate_stream with token ids, /info; traces from /metrics",
                   remote=True),
    )
}


def _missing(spec: EngineSpec) -> list[str]:
    return [module for module in spec.requires if importlib.util.find_spec(module) is None]


def _install_hint(spec: EngineSpec) -> str:
    return f"pip install 'workbench[{spec.extra}]'" if spec.extra else "pip install workbench"


def engine_statuses() -> list[EngineStatus]:
    """Every known engine, installed or not; for those that are not, why and how to install them."""
    statuses = []
    for spec in SPECS.values():
        missing = _missing(spec)
        reason = f"missing Python package(s): {', '.join(missing)}" if missing else ""
        statuses.append(EngineStatus(spec.name, not missing, spec.description, reason,
                                     _install_hint(spec) if missing else "", spec.remote))
    return statuses


def adapter_class(name: str):
    """The adapter class for an engine name, with a clear error when unknown or not installed."""
    spec = SPECS.get(name)
    if spec is None:
        raise UnknownEngineError(f"unknown engine {name!r}: the known engines are {', '.join(SPECS)}.")
    missing = _missing(spec)
    if missing:
        raise EngineNotInstalledError(
            f"engine {name!r} is not installed here (missing {', '.join(missing)}): run `{_install_hint(spec)}`."
        )
    module_name, class_name = spec.adapter.split(":")
    module = importlib.import_module(f"workbench.engines.{module_name}")
    return getattr(module, class_name)


def accepted_options(name: str) -> tuple[str, ...]:
    """The options `workbench.load(name, ...)` accepts: dtype, max_model_len and the engine's own."""
    return ("dtype", "max_model_len", *adapter_class(name).extra_options)

