"""Engine log lines (vLLM's, Transformers', DeepSpeed's, torch's) kept out of a notebook and its report: they go to a
file the report links to.

>>> from workbench.logs import log_engines_to
>>> log_engines_to("reports/07_load_sweep.log")      # first thing in a notebook, before loading an engine
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

ENGINE_LOGGERS = ("vllm", "transformers", "ContinuousBatchingLogger", "DeepSpeed", "deepspeed", "torch",
                  "accelerate", "tensorrt_llm", "torchao", "bitsandbytes", "py.warnings")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_current: Path | None = None  # where this process sends engine log records, once told


def engine_log() -> Path | None:
    """The file `log_engines_to` sends this process's engine log records to, if it was called (engine workers
    started from here write theirs there too)."""
    return _current


def log_engines_to(path: str | Path, native: bool = True) -> Path:
    """From now on, write the engines' log records and Python warnings to `path` (appended) instead of the
    notebook's output. With `native`, what native code writes to the process's standard error (torch's C++
    warnings, a crash's last words) goes there too; Python's own `sys.stderr` and errors still show.

    vLLM configures its own logging when first imported, unless told not to: this tells it (for an engine loaded
    later) and takes over the loggers already configured.
    """
    global _current
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    _current = path
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old, logging.StreamHandler):  # a file handler of an earlier call too
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("vllm").setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO"))  # what vLLM would log itself
    logging.captureWarnings(True)
    _quiet_transformers()
    if native:
        os.dup2(handler.stream.fileno(), 2)  # the kernel's own streams are Python objects, not file descriptor 2
    return path


def _quiet_transformers() -> None:
    """Transformers adds its own stderr handler and progress bars the first time it logs: turn both off for it."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.disable_progress_bar()
