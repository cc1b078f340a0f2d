"""NVIDIA TensorRT-LLM through its `LLM` API (PyTorch backend, the default since 1.0), on an NVIDIA GPU.

Written against TensorRT-LLM 1.2.1's LLM API: `LLM(model, dtype, tensor_parallel_size, pipeline_parallel_size,
max_batch_size, max_num_tokens, max_seq_len, kv_cache_config=KvCacheConfig(...), enable_iter_perf_stats=True)`,
`generate_async(prompt_token_ids, SamplingParams, streaming=True)` whose outputs carry `token_ids_diff`, `abort()`,
`get_stats(timeout)` (per iteration: numActiveRequests, numQueuedRequests, inflightBatchingStats, kvCacheStats) and
`get_kv_cache_events(timeout)` (blocks stored into and removed from the reuse cache).

A run streams each request in its own thread and, between, reads the iteration stats into trace steps: the engine's
own counts of active, queued, context and generation requests, its block pool's used and free blocks, and the
blocks its reuse cache stored and evicted. The executor hands stats over in batches (every 0.2 s or so), so a step's
time is when the workbench read it; each iteration still becomes its own step.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from workbench.engines.arrivals import RunClock
from workbench.engines.local import LocalEngine, Session, StepOutput
from workbench.errors import UnsupportedOptionError, WorkbenchError
from workbench.kv_sizes import bytes_per_element
from workbench.models import ResolvedModel
from workbench.sysmem import process_memory
from workbench.trace import BLOCK_FREE, BLOCK_USED, CacheFacts, MemorySnapshot, StepSnapshot, TraceRecorder
from workbench.types import EngineInfo, KVCacheMeasurement, SamplingOptions

_OPTION_TO_LLM = {"max_batch_size": "max_batch_size", "max_num_tokens": "max_num_tokens",
                  "tensor_parallel_size": "tensor_parallel_size", "pipeline_parallel_size": "pipeline_parallel_size"}
_STATS_TIMEOUT_S = 0.05  # get_stats waits this long when no new iteration is queued
_EVENT_BUFFER = 4096  # KV cache events TensorRT-LLM keeps until read; each run reads them all


class TensorRTLLMEngine(LocalEngine):
    extra_options = (*_OPTION_TO_LLM, "block_size", "kv_cache_memory_fraction", "enable_block_reuse")

    def __init__(self, model: ResolvedModel, dtype: str = "float16", max_model_len: int | None = None,
                 **options: Any) -> None:
        super().__init__(model, dtype, max_model_len, **options)  # float16 by default: its kernels lack float32

    def _load(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise UnsupportedOptionError("TensorRT-LLM runs on NVIDIA GPUs only, and this machine has none (CUDA is "
                                         "not available): use vllm or transformers here.")
        if self.dtype in ("float32", "fp32"):
            raise UnsupportedOptionError("TensorRT-LLM's kernels do not run float32: load with dtype='float16' or "
                                         "dtype='bfloat16'.")
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig

        self.block_size = int(self.options.get("block_size") or 32)
        cache = KvCacheConfig(free_gpu_memory_fraction=self.options.get("kv_cache_memory_fraction", 0.9),
                              enable_block_reuse=self.options.get("enable_block_reuse", True),
                              tokens_per_block=self.block_size, event_buffer_max_size=_EVENT_BUFFER)
        kwargs = {name: self.options[option] for option, name in _OPTION_TO_LLM.items() if option in self.options}
        # The LLM is built and requests are submitted from a thread with no asyncio loop: in a Jupyter kernel's
        # thread (which has one) the LLM API switches its result queues to async mode and polls them every 10 ms.
        self._submitter = ThreadPoolExecutor(1, thread_name_prefix="workbench-trtllm")
        try:
            self.llm = self._submitter.submit(LLM, model=str(self.model.path), dtype=self.dtype,
                                              max_seq_len=self.max_model_len, kv_cache_config=cache,
                                              enable_iter_perf_stats=True, **kwargs).result()
        except Exception as exc:  # noqa: BLE001 - TensorRT-LLM raises many kinds; each becomes one short message
            self._submitter.shutdown()
            raise UnsupportedOptionError(f"TensorRT-LLM refused these options: {str(exc).splitlines()[0]}") from None
        self._pool = {"maxNumBlocks": 0, "usedNumBlocks": 0, "freeNumBlocks": 0}
        self._events = {"stored_blocks": 0, "removed_blocks": 0}
        # One token, so the iteration stats report the block pool's size before the first run.
        self._submit([self.tokenizer.bos_token_id or 0], SamplingParams(max_tokens=1), streaming=False).result()
        self._read_stats(timeout_s=1.0)
        self._read_events()

    def _submit(self, prompt: list[int], params, streaming: bool = True):
        return self._submitter.submit(self.llm.generate_async, prompt, params, streaming=streaming).result()

    def _info(self) -> EngineInfo:
        import tensorrt_llm

        from workbench.models import count_parameters

        params = count_parameters(self.model.path)
        return EngineInfo(self.name, f"tensorrt_llm {tensorrt_llm.__version__}", "cuda", self.dtype, self.model.name,
                          str(self.model.path), params, params * bytes_per_element(self.dtype), self.max_model_len,
                          dict(self.options))

    def _release(self) -> None:
        self.llm.shutdown()
        self._submitter.shutdown()
        del self.llm

    def _sampling_params(self, options: SamplingOptions):
        from tensorrt_llm import SamplingParams

        sampling = dict(max_tokens=options.max_tokens, seed=options.seed, stop=list(options.stop) or None,
                        ignore_eos=options.ignore_eos)
        if options.greedy:
            sampling["top_k"] = 1
        else:
            sampling.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k or None)
        return SamplingParams(**sampling)

    def _read_stats(self, timeout_s: float = _STATS_TIMEOUT_S) -> list[dict]:
        _rearm(getattr(getattr(self.llm, "_executor", None), "_iter_stats_result", None))
        stats = self.llm.get_stats(timeout=timeout_s)
        for iteration in stats:
            self._pool.update(iteration.get("kvCacheStats") or {})
        return stats

    def _read_events(self) -> dict[str, int]:
        """Count the blocks the reuse cache stored and evicted since the load (KV cache events)."""
        _rearm(getattr(getattr(self.llm, "_executor", None), "_iter_kv_events_result", None))
        for event in self.llm.get_kv_cache_events(timeout=_STATS_TIMEOUT_S):
            data = event.get("data") or {}
            if data.get("type") == "stored":
                self._events["stored_blocks"] += len(data.get("blocks") or ())
            elif data.get("type") == "removed":
                self._events["removed_blocks"] += len(data.get("block_hashes") or ())
        return self._events

    def _cache_facts(self) -> CacheFacts:
        return self._layout(paged=True, block_size=self.block_size, num_blocks=int(self._pool["maxNumBlocks"]))

    def _measure_kv_cache(self) -> KVCacheMeasurement:
        # The pool's tensors live in TensorRT-LLM's C++ KV cache manager: its own block count is what is reachable.
        self._read_stats()
        blocks = int(self._pool["maxNumBlocks"])
        return KVCacheMeasurement(blocks * self.block_size * self.kv_bytes_per_token, blocks * self.block_size,
                                  f"TensorRT-LLM kvCacheStats.maxNumBlocks ({blocks} blocks x config bytes)")

    def _open_session(self, prompts: list[list[int]], options: list[SamplingOptions], clock: RunClock,
                      recorder: TraceRecorder, streaming: bool) -> Session:
        return _IterationStats(self, clock, recorder)


class _IterationStats(Session):
    """A run on the LLM API: each request streams in a thread of its own into a queue, and each step reads the
    executor's iteration stats (one snapshot per iteration) and takes what the streams brought."""

    def __init__(self, engine: TensorRTLLMEngine, clock: RunClock, recorder: TraceRecorder) -> None:
        self.engine, self.clock, self.recorder = engine, clock, recorder
        self.handles: dict[int, Any] = {}
        self.produced: dict[int, int] = {}
        self.done: set[int] = set()
        self.arrivals: queue.Queue = queue.Queue()  # (request, new tokens, finish reason or None, time) or an error
        self.threads: list[threading.Thread] = []
        self.step_index = 0

    def submit(self, i: int, prompt: list[int], options: SamplingOptions) -> None:
        self.handles[i] = handle = self.engine._submit(prompt, self.engine._sampling_params(options))
        thread = threading.Thread(target=self._consume, args=(i, handle), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _consume(self, i: int, handle) -> None:
        try:
            for output in handle:
                completion = output.outputs[0]
                reason = None
                if output.finished:  # TensorRT-LLM says "cancelled" for an aborted request
                    reason = {"length": "length", "cancelled": "abort"}.get(completion.finish_reason, "stop")
                self.arrivals.put((i, list(completion.token_ids_diff), reason, self.clock.now()))
        except Exception as exc:  # noqa: BLE001 - raised in the loop's thread
            self.arrivals.put(exc)

    def step(self) -> StepOutput:
        iterations = self.engine._read_stats()
        if not iterations:
            time.sleep(_STATS_TIMEOUT_S)  # get_stats can return at once with nothing: do not spin
        out = StepOutput()
        while True:
            try:
                item = self.arrivals.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BaseException):
                raise WorkbenchError(f"TensorRT-LLM failed a request: {item}")
            i, new, reason, when = item
            out.tokens.setdefault(i, []).extend(new)
            out.times.setdefault(i, []).extend([when] * len(new))
            self.produced[i] = self.produced.get(i, 0) + len(new)
            if reason is not None:
                out.finished[i] = reason
                self.done.add(i)
        if self.recorder.wanted and iterations:
            events = self.engine._read_events()
            for stats in iterations:
                self.recorder.add(self._snapshot(self.clock.now(), stats, events))
        return out

    def _snapshot(self, now: float, stats: dict, events: dict[str, int]) -> StepSnapshot:
        recorder = self.recorder
        facts = recorder.trace.facts
        pool = stats.get("kvCacheStats") or {}
        total, used = int(pool.get("maxNumBlocks", 0)), int(pool.get("usedNumBlocks", 0))
        if total and facts.num_blocks != total:
            facts = recorder.trace.facts = replace(facts, num_blocks=total)
        snaps = recorder.seen_from_client(self.handles, self.done, lambda i: self.produced.get(i, 0))
        batching = stats.get("inflightBatchingStats") or {}
        counters = {"engine_active": stats.get("numActiveRequests", 0),
                    "engine_queued": stats.get("numQueuedRequests", 0),
                    "context_requests": batching.get("numContextRequests", 0),
                    "generation_requests": batching.get("numGenRequests", 0),
                    "paused_requests": batching.get("numPausedRequests", 0),
                    "kv_usage": used / total if total else 0.0, "reused_blocks": pool.get("reusedBlocks", 0),
                    "cache_hit_rate": pool.get("cacheHitRate", 0.0), **events}
        memory = MemorySnapshot(facts.weight_bytes, total * facts.bytes_per_block, used * facts.bytes_per_block,
                                *process_memory())
        snapshot = StepSnapshot(self.step_index, now, tuple(snaps), BLOCK_USED * used + BLOCK_FREE * (total - used),
                                memory, counters)
        self.step_index += 1
        return snapshot

    def abort(self, indexes: list[int]) -> None:
        for i in indexes:
            if i in self.handles and i not in self.done:
                self.handles[i].abort()

    def close(self) -> None:
        for thread in self.threads:
            thread.join()


def _rearm(pending) -> None:
    """Let the next get_stats / get_kv_cache_events wait again.

    The LLM API's result queue marks itself done after one empty wait and then returns nothing until the next
    request is submitted; a run reads it many times while its requests are in flight. Private, so guarded.
    """
    if pending is not None and hasattr(pending, "mark_undone"):
        pending.mark_undone()
