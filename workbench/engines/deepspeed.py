"""DeepSpeed inference: `deepspeed.init_inference` around the Hugging Face model, then `generate` on what it wraps.

Kernel injection (DeepSpeed's fused transformer kernels replacing the model's layers) needs a GPU, a model its
policies cover with full multi-head attention, and a transformers whose decoder layers its fused layer fits: it is
on by default where it can run, off elsewhere, and `engine.info.options["kernel_inject"]` says which and why.
Tensor parallelism (DeepSpeed's AutoTP: attention and MLP weights split by rows/columns, an all-reduce after each
split layer) needs one process per rank, started by a launcher (`torchrun --nproc-per-node N script.py` or
`deepspeed --num_gpus N script.py`); every rank loads the engine with `tensor_parallel_size=N` and gets the same
tokens.
Generation, batching and traces are those of the `transformers` engine (static batches, a cache that grows per step).
"""

from __future__ import annotations

import os
from dataclasses import replace
from importlib.metadata import version

from workbench.engines.hf_common import torch_dtype
from workbench.engines.transformers import TransformersEngine
from workbench.errors import UnsupportedOptionError
from workbench.types import EngineInfo, RankFacts


class DeepSpeedEngine(TransformersEngine):
    extra_options = ("device", "max_batch_size", "tensor_parallel_size", "kernel_inject")

    def _load(self) -> None:
        import deepspeed

        super()._load()  # the Hugging Face model, tokenizer settings and end-of-sequence ids
        wanted = self.options.get("kernel_inject")
        on_gpu = self.device.startswith("cuda")
        blocker = injection_blocker(self.hf_model.config) if on_gpu else "DeepSpeed's inference kernels need a CUDA GPU"
        if wanted and blocker:
            raise UnsupportedOptionError(f"kernel_inject=True cannot be used here: {blocker}. Load with "
                                         "kernel_inject=False (the default for this model here).")
        self.kernel_inject = not blocker if wanted is None else bool(wanted)
        self.kernel_note = ("fused inference kernels replace the model's layers" if self.kernel_inject else
                            "off (asked)" if wanted is False else f"off: {blocker}")
        tp_size = int(self.options.get("tensor_parallel_size") or 1)
        self.tp_note = "off"
        self.collectives: dict[str, int] = {}
        if tp_size > 1:
            self.tp_note = _join_ranks(deepspeed, tp_size, on_gpu)
            self.collectives = _count_calls(deepspeed.comm, _COLLECTIVES)
        try:
            self.ds_engine = deepspeed.init_inference(self.hf_model, dtype=torch_dtype(self.dtype),
                                                      tensor_parallel={"tp_size": tp_size},
                                                      replace_with_kernel_inject=self.kernel_inject)
        except (ValueError, RuntimeError, AssertionError, ImportError) as exc:
            raise UnsupportedOptionError(f"DeepSpeed refused these options: {str(exc).splitlines()[0]}") from None
        self.hf_model = self.ds_engine.module
        self.forward_passes = 0

        def count_pass(*_):
            self.forward_passes += 1

        self.hf_model.register_forward_pre_hook(count_pass)

    def _info(self) -> EngineInfo:
        info = super()._info()
        engine_version = f"deepspeed {version('deepspeed')} (transformers {version('transformers')})"
        return replace(info, engine_version=engine_version, options={**info.options, "kernel_inject": self.kernel_note,
                                                                   "tensor_parallel": self.tp_note})

    def _ranks(self) -> list[RankFacts]:
        """This process's rank only: DeepSpeed runs one process per rank, each with an engine of its own. Its KV
        cache is 0: generate's cache lives only during a call."""
        import torch.distributed as dist

        model = self.hf_model
        first = next((m for name, m in model.named_modules() if name.endswith("layers.0")), None)
        projections = {name: (m.weight.shape[1], m.weight.shape[0]) for name, m in first.named_modules()
                       if getattr(m, "weight", None) is not None and m.weight.dim() == 2} if first else {}
        grouped = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return [RankFacts(rank, world, rank, 0, weight_bytes, (0, self.config.num_hidden_layers), 0, projections,
                          dict(self.collectives), self.forward_passes)]

    def _release(self) -> None:
        del self.ds_engine
        super()._release()


# Hugging Face model types that DeepSpeed's kernel-injection policies cover (its module_inject/containers).
_INJECTABLE = ("bert", "bloom", "distilbert", "gpt2", "gptj", "gpt_neo", "gpt_neox", "internlm", "llama", "opt")


def injection_blocker(config) -> str | None:
    """Why DeepSpeed's fused kernels cannot serve this model, or None when they can.

    >>> injection_blocker(LlamaConfig(num_attention_heads=4, num_key_value_heads=2))   # doctest: +SKIP
    "DeepSpeed's fused kernels have no grouped-query attention (this model: 4 heads, 2 KV heads)"
    """
    if config.model_type not in _INJECTABLE:
        return f"DeepSpeed has no kernel-injection policy for {config.model_type!r} models"
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if kv_heads != heads:
        # Its attention takes q, k and v of one width: a GQA model's narrower k/v fail while copying the weights
        # ("Merging tensors is not allowed here!", seen with DeepSpeed 0.19.8 on an H200).
        return (f"DeepSpeed's fused kernels have no grouped-query attention (this model: {heads} heads, "
                f"{kv_heads} KV heads)")
    if _at_least(version("transformers"), 5) and not _at_least(version("deepspeed"), 0, 19, 9):
        # Seen on an H200 (DeepSpeed 0.19.8, transformers 5.19, Llama): the fused layer returns (hidden, presents)
        # where transformers 5's decoder loop expects the hidden states alone, so the second layer fails.
        return (f"DeepSpeed {version('deepspeed')}'s fused layers do not fit transformers "
                f"{version('transformers')}'s decoder layers (they return a tuple where a tensor is expected)")
    return None


def _at_least(installed: str, *wanted: int) -> bool:
    from packaging.version import Version

    return Version(installed).release[:len(wanted)] >= wanted


# deepspeed.comm's collectives, through which AutoTP's split layers meet (an all-reduce after each row-split one).
_COLLECTIVES = ("inference_all_reduce", "all_reduce", "all_gather", "all_gather_into_tensor")


def _count_calls(module, names: tuple[str, ...]) -> dict[str, int]:
    """Count calls of `module`'s functions `names` from now on, in the dict returned (once per process)."""
    counts = getattr(module, "workbench_counts", None)
    if counts is not None:
        return counts
    counts = module.workbench_counts = {}
    for name in names:
        original = getattr(module, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        setattr(module, name, counted)
    return counts


def _join_ranks(deepspeed, tp_size: int, on_gpu: bool) -> str:
    """Join the process group a launcher set up (one process per rank); the note for `info` says which rank this is."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world != tp_size:
        raise UnsupportedOptionError(
            f"tensor_parallel_size={tp_size} needs {tp_size} processes, one per rank, and this one was started with "
            f"WORLD_SIZE={world}: run the script with `torchrun --nproc-per-node {tp_size} script.py` (or the "
            f"deepspeed launcher), every rank loading with tensor_parallel_size={tp_size}.")
    if not on_gpu:
        # DeepSpeed's shared-memory all-reduce kernel segfaulted on this AVX2 CPU (0.19.8, float32); marking it
        # incompatible before the process group starts makes DeepSpeed use torch.distributed's gloo all_reduce.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()  # a no-op when the launcher's script already did it
    return f"AutoTP, rank {deepspeed.comm.get_rank()} of {tp_size}"
