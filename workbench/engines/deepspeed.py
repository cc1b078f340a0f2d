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

from workbench.engines.hf_common import pick_device, torch_dtype
from workbench.engines.transformers import TransformersEngine
from workbench.errors import UnsupportedOptionError
from workbench.servers import free_port
from workbench.types import EngineInfo, OffloadFacts, RankFacts


class DeepSpeedEngine(TransformersEngine):
    rank_kv_bytes_per_token: int | None = None  # under AutoTP: this rank's, measured at load
    extra_options = ("device", "max_batch_size", "tensor_parallel_size", "kernel_inject", "offload_param",
                     "nvme_path")

    def _load(self) -> None:
        import deepspeed

        self.offload_param = self.options.get("offload_param")
        if self.offload_param is not None:
            self._load_zero_inference(deepspeed)
            return
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
        # AutoTP gives each rank its share of the KV heads, so its cache holds that share of every token's keys and
        # values: measured once from this rank's own cache tensors, for the traces' memory.
        if tp_size > 1:
            cache = self._measure_kv_cache()
            self.rank_kv_bytes_per_token = cache.bytes // cache.token_slots
        self.forward_passes = 0

        def count_pass(*_):
            self.forward_passes += 1

        self.hf_model.register_forward_pre_hook(count_pass)

    def _load_zero_inference(self, deepspeed) -> None:
        """ZeRO stage 3 for inference (ZeRO-Inference): each parameter's partition kept where `offload_param` says
        ("cpu" or "nvme", a folder at `nvme_path`), a module's parameters gathered for its forward pass only."""
        import tempfile

        from transformers.integrations import HfDeepSpeedConfig

        where = self.offload_param
        self.device = pick_device(self.options.get("device"))
        if where not in ("cpu", "nvme"):
            raise UnsupportedOptionError(f"offload_param={where!r} is not a place DeepSpeed offloads to: use 'cpu' or "
                                         f"'nvme' (with nvme_path, a folder).")
        if self.options.get("kernel_inject") or int(self.options.get("tensor_parallel_size") or 1) > 1:
            raise UnsupportedOptionError("offload_param (ZeRO stage 3) is used here without kernel_inject and "
                                         "tensor_parallel_size: load with one or the other.")
        param: dict = {"device": where, "pin_memory": False}
        if where == "nvme":
            from deepspeed.ops.op_builder import AsyncIOBuilder

            if not AsyncIOBuilder().is_compatible():  # DeepSpeed's own check, before anything is loaded
                raise UnsupportedOptionError(
                    "offload_param='nvme' needs DeepSpeed's async_io op, which needs libaio's headers and library "
                    "(`apt install libaio-dev`); they are not on this machine. offload_param='cpu' runs here.")
            param["nvme_path"] = self.options.get("nvme_path") or tempfile.mkdtemp(prefix="workbench-zero-")
        # Gathered parameters released after each module and none kept for reuse or prefetched: DeepSpeed's
        # defaults keep up to 1e9 of them live, which for a small model is all of it, beside its partitions.
        config = {"train_micro_batch_size_per_gpu": 1,
                  "zero_optimization": {"stage": 3, "offload_param": param, "stage3_param_persistence_threshold": 0,
                                        "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
                                        "stage3_prefetch_bucket_size": 0}}
        if self.dtype in ("bfloat16", "bf16"):
            config["bf16"] = {"enabled": True}
        elif self.dtype in ("float16", "fp16"):
            config["fp16"] = {"enabled": True}
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                            ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(name, value)  # one rank: no launcher needed
        on_gpu = self.device.startswith("cuda")
        if not on_gpu:
            _gloo_on_cpu()
        deepspeed.init_distributed(dist_backend=None if on_gpu else "gloo")
        # While it lives, transformers partitions every model it loads in this process (its reference is global):
        # kept for this load only, so that other engines loaded here later get whole models.
        zero_config = HfDeepSpeedConfig(config)
        try:
            TransformersEngine._load(self)
        finally:
            del zero_config
        self.ds_engine = deepspeed.initialize(model=self.hf_model, config_params=config)[0]
        self.hf_model = self.ds_engine.module.eval()
        self.kernel_inject, self.kernel_note = False, f"off: ZeRO stage 3, parameters offloaded to {where}"
        self.tp_note, self.collectives, self.forward_passes = "off", {}, 0
        partitions = self._zero_partitions_held()
        gathered: dict[int, int] = {}  # module -> bytes of its own parameters gathered when last seen
        resident = [partitions]  # the partitions and every module's gathered bytes, kept as a sum
        self.resident_peak_bytes = partitions

        def see(module, *_):  # after ZeRO's own hooks: gathered on the way in, released on the way out
            held = sum(p.data.nbytes for p in module.parameters(recurse=False))
            resident[0] += held - gathered.get(id(module), 0)
            gathered[id(module)] = held
            self.resident_peak_bytes = max(self.resident_peak_bytes, resident[0])

        for module in self.hf_model.modules():
            if next(module.parameters(recurse=False), None) is not None:
                module.register_forward_pre_hook(see)
                module.register_forward_hook(see)

    def _zero_partitions_held(self) -> int:
        """Bytes of the parameters' partitions kept in this process's memory (all of them, offloaded to "cpu")."""
        from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

        held = 0
        for p in self.hf_model.parameters():
            partition = getattr(p, "ds_tensor", None)
            if partition is not None and getattr(partition, "status", None) != PartitionedParamStatus.NOT_AVAILABLE:
                held += partition.nbytes
        return held

    def _zero_weights(self) -> tuple[int, int, int]:
        """(parameters, their elements, their bytes) under ZeRO-3, which leaves an empty placeholder in each."""
        params = list(self.hf_model.parameters())
        return len(params), sum(p.ds_numel for p in params), sum(p.ds_numel * p.element_size() for p in params)

    def _offload(self) -> OffloadFacts:
        if self.offload_param is None:
            return super()._offload()
        count, _, total = self._zero_weights()
        return OffloadFacts(None, {self.offload_param: count}, total, total, self.resident_peak_bytes)

    def _info(self) -> EngineInfo:
        info = super()._info()
        if self.offload_param is not None:
            _, elements, total = self._zero_weights()
            info = replace(info, parameters=elements, weight_bytes=total)
        engine_version = f"deepspeed {version('deepspeed')} (transformers {version('transformers')})"
        return replace(info, engine_version=engine_version, options={**info.options, "kernel_inject": self.kernel_note,
                                                                   "tensor_parallel": self.tp_note})

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take in this rank's cache: the config's figure, or under AutoTP this
        rank's share of it, measured from its cache at load."""
        return self.rank_kv_bytes_per_token or super().kv_bytes_per_token

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


def _gloo_on_cpu() -> None:
    """Keep DeepSpeed's collectives on torch.distributed's gloo: its shared-memory all-reduce kernel segfaulted on
    an AVX2 CPU (0.19.8, float32); marked incompatible before the process group starts, DeepSpeed does not use it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _join_ranks(deepspeed, tp_size: int, on_gpu: bool) -> str:
    """Join the process group a launcher set up (one process per rank); the note for `info` says which rank this is."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world != tp_size:
        raise UnsupportedOptionError(
            f"tensor_parallel_size={tp_size} needs {tp_size} processes, one per rank, and this one was started with "
            f"WORLD_SIZE={world}: run the script with `torchrun --nproc-per-node {tp_size} script.py` (or the "
            f"deepspeed launcher), every rank loading with tensor_parallel_size={tp_size}.")
    if not on_gpu:
        _gloo_on_cpu()
    deepspeed.init_distributed()  # a no-op when the launcher's script already did it
    return f"AutoTP, rank {deepspeed.comm.get_rank()} of {tp_size}"
