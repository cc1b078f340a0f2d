"""DeepSpeed inference: `deepspeed.init_inference` around the Hugging Face model, then `generate` on what it wraps.

Kernel injection (DeepSpeed's fused transformer kernels replacing the model's layers) needs a GPU: on a CPU the
workbench turns it off and `engine.info.options["kernel_inject"]` says why. Tensor parallelism needs one process per
rank, started by DeepSpeed's launcher (`deepspeed --num_gpus N script.py`); `tensor_parallel_size` passes through.
Generation, batching and traces are those of the `transformers` engine (static batches, a cache that grows per step).
"""

from __future__ import annotations

from dataclasses import replace
from importlib.metadata import version

from workbench.engines.hf_common import torch_dtype
from workbench.engines.transformers_static import TransformersEngine
from workbench.errors import UnsupportedOptionError
from workbench.types import EngineInfo


class DeepSpeedEngine(TransformersEngine):
    name = "deepspeed"
    extra_options = ("device", "max_batch_size", "tensor_parallel_size", "kernel_inject")

    def _load(self) -> None:
        import deepspeed

        super()._load()  # the Hugging Face model, tokenizer settings and end-of-sequence ids
        wanted = self.options.get("kernel_inject")
        on_gpu = self.device.startswith("cuda")
        if wanted and not on_gpu:
            raise UnsupportedOptionError("DeepSpeed's kernel injection needs a CUDA GPU; on this CPU load with "
                                         "kernel_inject=False (the default here).")
        self.kernel_inject = bool(on_gpu if wanted is None else wanted)
        self.kernel_note = ("fused inference kernels replace the model's layers" if self.kernel_inject else
                            "off: DeepSpeed's inference kernels need a CUDA GPU" if not on_gpu else "off (asked)")
        tp_size = int(self.options.get("tensor_parallel_size") or 1)
        try:
            self.ds_engine = deepspeed.init_inference(self.hf_model, dtype=torch_dtype(self.dtype),
                                                      tensor_parallel={"tp_size": tp_size},
                                                      replace_with_kernel_inject=self.kernel_inject)
        except (ValueError, RuntimeError, AssertionError, ImportError) as exc:
            hint = " (tensor parallelism needs the deepspeed launcher: one process per rank)" if tp_size > 1 else ""
            raise UnsupportedOptionError(f"DeepSpeed refused these options: {str(exc).splitlines()[0]}{hint}") \
                from None
        self.hf_model = self.ds_engine.module

    def _info(self) -> EngineInfo:
        info = super()._info()
        engine_version = f"deepspeed {version('deepspeed')} (transformers {version('transformers')})"
        return replace(info, engine_version=engine_version, options={**info.options, "kernel_inject": self.kernel_note})

    def _release(self) -> None:
        del self.ds_engine
        super()._release()
