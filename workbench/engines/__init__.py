"""The registry of engines: the one place an engine's name is written, which are installed here, and how to get the
others.

Adapters are imported only when loaded, so `import workbench` stays quick and works with no engine installed. Each
adapter's module is named after its engine (`transformers-paged` -> `transformers_paged.py`).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import EngineNotInstalledError, UnknownEngineError, UnsupportedOptionError


@dataclass(frozen=True)
class EngineSpec:
    """A known engine: its adapter class, the modules it needs, and the extra that installs them."""

    name: str
    adapter: str  # the class in workbench/engines/<name, with _ for ->.py
    requires: tuple[str, ...]
    extra: str
    description: str
    remote: bool = False  # a server reached over HTTP: its model lives there, not in this process
    nvidia_only: bool = False  # runs on NVIDIA GPUs and nowhere else

    @property
    def module(self) -> str:
        return f"workbench.engines.{self.name.replace('-', '_')}"


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
        EngineSpec("transformers", "TransformersEngine", ("torch", "transformers"), "",
                   "HF Transformers generate: static batches, left padding, contiguous KV cache"),
        EngineSpec("transformers-paged", "TransformersPagedEngine", ("torch", "transformers"), "",
                   "HF Transformers continuous batching with its paged KV cache"),
        EngineSpec("vllm", "VLLMEngine", ("vllm",), "vllm",
                   "vLLM in-process: PagedAttention, continuous batching, prefix caching"),
        EngineSpec("deepspeed", "DeepSpeedEngine", ("deepspeed", "torch", "transformers"), "deepspeed",
                   "DeepSpeed inference around the HF model (kernel injection and tensor parallelism on GPUs)"),
        EngineSpec("tensorrt-llm", "TensorRTLLMEngine", ("tensorrt_llm",), "tensorrt",
                   "NVIDIA TensorRT-LLM's LLM API (PyTorch backend): NVIDIA GPUs only", nvidia_only=True),
        EngineSpec("openai", "OpenAIEngine", ("aiohttp", "httpx", "prometheus_client"), "",
                   "any OpenAI-compatible server over HTTP (vLLM, SGLang, trtllm-serve, llama.cpp, TGI's /v1); "
                   "traces from its /metrics", remote=True),
        EngineSpec("tgi", "TGIEngine", ("aiohttp", "httpx", "prometheus_client"), "",
                   "a Hugging Face TGI server over HTTP: /generate_stream with token ids, /info; traces from /metrics",
                   remote=True),
    )
}


def has_nvidia_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU with its driver (without importing torch)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def _unavailable(spec: EngineSpec) -> tuple[str, str]:
    """(why the engine cannot be loaded here, how to get it), or ("", "") when it can."""
    hint = f"pip install 'workbench[{spec.extra}]'" if spec.extra else "pip install workbench"
    if spec.nvidia_only and not has_nvidia_gpu():
        return ("it runs on NVIDIA GPUs only, and this machine has none (no NVIDIA driver found)",
                f"on a machine with an NVIDIA GPU: {hint}")
    missing = [module for module in spec.requires if importlib.util.find_spec(module) is None]
    if missing:
        return f"missing Python package(s): {', '.join(missing)}", hint
    return "", ""


def engine_statuses() -> list[EngineStatus]:
    """Every known engine, installed or not; for those that are not, why and how to install them."""
    statuses = []
    for spec in SPECS.values():
        reason, install = _unavailable(spec)
        statuses.append(EngineStatus(spec.name, not reason, spec.description, reason, install, spec.remote))
    return statuses


def adapter_class(name: str):
    """The adapter class for an engine name, with a clear error when unknown or not installed."""
    spec = SPECS.get(name)
    if spec is None:
        raise UnknownEngineError(f"unknown engine {name!r}: the known engines are {', '.join(SPECS)}.")
    reason, install = _unavailable(spec)
    if reason:
        raise EngineNotInstalledError(f"engine {name!r} cannot be loaded here: {reason}. To get it: {install}.")
    cls = getattr(importlib.import_module(spec.module), spec.adapter)
    cls.name = name
    return cls


def accepted_options(name: str) -> tuple[str, ...]:
    """The options `workbench.load(name, ...)` accepts: dtype, max_model_len and the engine's own."""
    return ("dtype", "max_model_len", *adapter_class(name).extra_options)


def load(engine: str, model: str | None = None, isolate: bool = True, **options: Any):
    """Load `model` in `engine` and return the engine, ready to generate.

    `model` is an alias (see `workbench.list_models()`, default the bundled SmolLM2), a local Hugging Face folder or
    a hub id; for a server engine (`openai`), the name the server serves it under (default: its only model).
    `options` go to the engine: `dtype`, `max_model_len`, and the engine's own (for vLLM: `block_size`,
    `num_blocks`, `enable_prefix_caching`, `max_batch_size`, `kv_cache_gb`, ...; for `openai`: `url`,
    `api_key_env`, `timeout_s`).

    An engine runs in a worker process of its own (`engines/host.py`): a crash there is an error here, and `close()`
    gives all its memory back; the next load of the same engine takes a spare worker that imported its libraries
    meanwhile. `isolate=False` loads it into this process instead (its internals are then at hand, for debugging,
    or where a process cannot be started).

    >>> with wb.load("transformers", model="tiny-llama") as e:           # doctest: +SKIP
    ...     e.generate("Hello", max_tokens=4)
    >>> wb.load("openai", url="http://127.0.0.1:8000/v1")               # doctest: +SKIP
    """
    from workbench.models import DEFAULT_MODEL, resolve_model

    cls = adapter_class(engine)  # unknown or missing engines fail before any model is built
    if cls.remote:  # a server: the model is a name on it, nothing to resolve here
        remote = cls(model, **options)
        remote.connect()
        return remote
    unknown = sorted(set(options) - {"dtype", "max_model_len", *cls.extra_options})
    if unknown:  # before a process is started for nothing
        accepted = ", ".join(("dtype", "max_model_len", *cls.extra_options))
        raise UnsupportedOptionError(f"engine {engine!r} has no option {', '.join(unknown)}; it accepts {accepted}.")
    resolved = resolve_model(model or DEFAULT_MODEL)
    if isolate:
        from workbench.engines.host import EngineProxy

        return EngineProxy(cls, resolved, options, SPECS[engine].requires)
    return cls(resolved, **options)
