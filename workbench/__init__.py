"""workbench: load a model in any inference engine, generate, and watch what the engine does.

>>> import workbench as wb
>>> engine = wb.load("vllm", model="smollm2-135m")                      # doctest: +SKIP
>>> engine.generate(["What is the capital of France?"], max_tokens=16, temperature=0)[0].text  # doctest: +SKIP
'The capital of France is Paris.'
>>> wb.sweep(engine, make_workload(n=32), concurrencies=[1, 4, 16])      # a row per load point  # doctest: +SKIP
"""

from __future__ import annotations

from workbench.engines import EngineStatus, accepted_options, engine_statuses, load
from workbench.engines.interface import Engine
from workbench.errors import (
    EngineCrashedError,
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
    "DEFAULT_MODEL", "Engine", "EngineCrashedError", "EngineInfo", "EngineNotInstalledError", "EngineStatus",
    "GenerationResult", "InvalidRequestError", "KVCacheMeasurement", "ModelNotFoundError", "RequestMetrics",
    "SamplingOptions", "UnknownEngineError", "UnsupportedOptionError", "WorkbenchError", "engine_options", "engines",
    "list_models", "load", "resolve_model", "sweep",
]
