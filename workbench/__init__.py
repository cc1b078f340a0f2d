"""workbench: load a model in any inference engine, generate, and watch what the engine does.

>>> import workbench as wb
>>> engine = wb.load("vllm", model="smollm2-135m")                      # doctest: +SKIP
>>> engine.generate(["What is the capital of France?"], max_tokens=16, temperature=0)[0].text  # doctest: +SKIP
'The capital of France is Paris.'
>>> wb.sweep(engine, make_workload(n=32), concurrencies=[1, 4, 16])      # a row per load point  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from workbench.engines import EngineStatus, accepted_options, adapter_class, engine_statuses
from workbench.engines.base import Engine
from workbench.errors import (
    EngineNotInstalledError,
    InvalidRequestError,
    ModelNotFoundError,
    UnknownEngineError,
    UnsupportedOptionError,
    WorkbenchError,
)
from workbench.models import DEFAULT_MODEL, list_models, resolve_model
from workbench.sweeps import sweep
from workbench.types import EngineInfo, GenerationResult, KVCacheMeasurement, RequestMetrics, SamplingOptions

__version__ = "0.1.0"


def load(engine: str, model: str | None = None, **options: Any) -> Engine:
    """Load `model` in `engine` and return the engine, ready to generate.

    `model` is an alias (see `workbench.list_models()`, default the bundled SmolLM2), a local Hugging Face folder or
    a hub id; for a server engine (`openai`), the name the server serves it under (default: its only model).
    `options` go to the engine: `dtype`, `max_model_len`, and the engine's own (for vLLM: `block_size`,
    `num_blocks`, `enable_prefix_caching`, `max_batch_size`, `kv_cache_gb`, ...; for `openai`: `url`,
    `api_key_env`, `timeout_s`).

    >>> with wb.load("transformers", model="tiny-llama") as e:           # doctest: +SKIP
    ...     e.generate("Hello", max_tokens=4)
    >>> wb.load("openai", url="http://127.0.0.1:8000/v1")               # doctest: +SKIP
    """
    cls = adapter_class(engine)  # unknown or missing engines fail before any model is built
    if cls.remote:  # a server: the model is a name on it, nothing to resolve here
        return cls(model, **options)
    return cls(resolve_model(model or DEFAULT_MODEL), **options)


def engine_options(engine: str) -> tuple[str, ...]:
    """The options `load(engine, ...)` accepts, e.g. to pass `block_size` only to the engines that have one.

    >>> "block_size" in wb.engine_options("vllm")      # doctest: +SKIP
    True
    """
    return accepted_options(engine)


def engines() -> list[EngineStatus]:
    """Every engine the workbench knows, installed or not, with the reason and the install command when not."""
    return engine_statuses()


__all__ = [
    "DEFAULT_MODEL", "Engine", "EngineInfo", "EngineNotInstalledError", "EngineStatus", "GenerationResult",
    "InvalidRequestError", "KVCacheMeasurement", "ModelNotFoundError", "RequestMetrics", "SamplingOptions",
    "UnknownEngineError", "UnsupportedOptionError", "WorkbenchError", "engine_options", "engines", "list_models",
    "load", "resolve_model", "sweep",
]
