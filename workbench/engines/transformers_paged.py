"""HF Transformers continuous batching: a paged KV cache and a scheduler that admits requests between steps.

Drives `ContinuousBatchingManager` (what `model.generate_batch` wraps) directly, so requests are added as they
arrive and their results collected as they finish, and a request can be cancelled. The manager steps in its own
thread; a wrapper around its loop body snapshots the scheduler and the cache after each step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

from workbench.engines.arrivals import RunClock
from workbench.engines.hf_common import eos_token_ids, generation_config, hf_info, load_causal_lm, pick_device
from workbench.engines.local import LocalEngine, Session, StepOutput
from workbench.errors import WorkbenchError
from workbench.sysmem import device_memory, process_memory
from workbench.trace import (
    BLOCK_CACHED,
    BLOCK_FREE,
    BLOCK_RESERVED,
    BLOCK_USED,
    CacheFacts,
    MemorySnapshot,
    RequestSnapshot,
    StepSnapshot,
    TraceRecorder,
)
from workbench.types import EngineInfo, KVCacheMeasurement, SamplingOptions

# Where the manager sizes its cache and batches from free GPU memory, a CPU has none to read: bound them ourselves.
_CPU_DEFAULT_KV_BYTES = 1 << 30
_CPU_MAX_BLOCKS = 4096
_CPU_MAX_BATCH_TOKENS = 1024


@dataclass(frozen=True)
class _Pool:
    """The block pool a manager really allocates: its reserved blocks come first, then those it hands out."""

    reserved: int
    blocks: int
    block_size: int
    tensor_bytes: int

    @property
    def total(self) -> int:
        return self.reserved + self.blocks


class TransformersPagedEngine(LocalEngine):
    extra_options = ("device", "block_size", "num_blocks", "max_batch_tokens", "max_batch_size")

    def _load(self) -> None:
        self.device = pick_device(self.options.get("device"))
        self.hf_model = load_causal_lm(self.model.path, self.dtype, self.device, attn_implementation="paged|sdpa")
        self.eos_ids = eos_token_ids(self.hf_model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._counter = 0
        self._pool_read: _Pool | None = None

    def _info(self) -> EngineInfo:
        return hf_info(self.name, self.hf_model, self.model, self.dtype, self.device, self.max_model_len, self.options)

    def _release(self) -> None:
        del self.hf_model

    def _cb_config(self, seed: int | None):
        from transformers import ContinuousBatchingConfig

        block_size = self.options.get("block_size") or 32
        num_blocks = self.options.get("num_blocks")
        if num_blocks is None and self.device == "cpu":
            block_bytes = self.kv_bytes_per_token * block_size
            num_blocks = max(16, min(_CPU_MAX_BLOCKS, _CPU_DEFAULT_KV_BYTES // block_bytes))
        max_batch_tokens = self.options.get("max_batch_tokens")
        if max_batch_tokens is None and self.device == "cpu":
            max_batch_tokens = _CPU_MAX_BATCH_TOKENS
        return ContinuousBatchingConfig(
            page_size=block_size,
            num_blocks=num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=self.options.get("max_batch_size"),
            seed=seed,
        )

    @contextmanager
    def _manager(self, options: SamplingOptions, max_new_tokens: int, prompts: list[list[int]], on_step=None):
        """A started manager for this workload; `on_step(batch_processor)` runs in its thread after each step."""
        from transformers.generation.continuous_batching.utils import WorkloadHints

        gen = generation_config(options, self.eos_ids, self.pad_id, max_new_tokens)
        # The hints size the batch for this workload, as `generate_batch` does; without them a batch holds fewer.
        hints = WorkloadHints(max(len(p) for p in prompts), max_new_tokens, len(prompts))
        manager = self.hf_model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=self._cb_config(options.seed), workload_hints=hints)
        if on_step is not None:
            # The manager has no per-step callback: wrap this manager's loop body, which runs one step per call.
            body = manager._generation_loop_body

            def body_then_snapshot(batch_processor, bootstrapping):
                before = manager.current_batch
                keep_going = body(batch_processor, bootstrapping)
                if manager.current_batch != before:
                    on_step(batch_processor)
                return keep_going

            manager._generation_loop_body = body_then_snapshot
        if self.device != "cpu" and not manager.warmed_up:
            manager.warmup()
        manager.start()
        try:
            deadline = time.monotonic() + 60
            # The manager allocates its cache in its own thread: wait for it, so the run starts on a ready engine.
            while manager.batch_processor is None and manager.is_running() and time.monotonic() < deadline:
                time.sleep(0.01)
            if manager.batch_processor is None:
                raise WorkbenchError("transformers continuous batching did not start its cache: see the log.")
            yield manager
        finally:
            manager.stop(block=True, timeout=30)
            manager.destroy()

    def _next_id(self) -> str:
        self._counter += 1
        return f"wb-{self._counter}"

    def _pool(self) -> _Pool:
        """The pool the manager allocates, read from a manager started for it once (it allocates when started)."""
        if self._pool_read is None:
            with self._manager(SamplingOptions(max_tokens=1), 1, [[self.pad_id]]) as manager:
                cache = manager.batch_processor.cache
                allocator = next(iter(cache.cache_allocators.values()))
                self._pool_read = _Pool(cache.pool.num_reserved_sectors * allocator.blocks_per_sector,
                                        allocator.num_blocks, allocator.tokens_per_page, cache.cache_tensor.nbytes)
        return self._pool_read

    def _cache_facts(self) -> CacheFacts:
        pool = self._pool()
        return self._layout(paged=True, block_size=pool.block_size, num_blocks=pool.total)

    def _measure_kv_cache(self) -> KVCacheMeasurement:
        pool = self._pool()
        return KVCacheMeasurement(pool.tensor_bytes, pool.total * pool.block_size,
                                  f"PagedAttentionCache.cache_tensor ({pool.blocks} blocks + {pool.reserved} reserved)")

    def _open_session(self, prompts: list[list[int]], options: list[SamplingOptions], clock: RunClock,
                      recorder: TraceRecorder, streaming: bool) -> Session:
        return _ContinuousBatches(self, prompts, options, clock, recorder, streaming)


class _ContinuousBatches(Session):
    """A run on one manager, started for this workload: requests added as the clock releases them, results taken as
    they come (every step's tokens when `streaming`, else all at once when a request ends, with the manager's own
    timestamps)."""

    def __init__(self, engine: TransformersPagedEngine, prompts: list[list[int]], options: list[SamplingOptions],
                 clock: RunClock, recorder: TraceRecorder, streaming: bool) -> None:
        self.engine, self.options, self.clock, self.streaming = engine, options, clock, streaming
        self.ids = [f"{engine._next_id()}-{name}" for name in recorder.names]
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        self.sent: dict[int, int] = {}
        self.watcher = (_PagedSteps(recorder, self.index, clock, engine.device) if recorder.wanted else None)
        self._context = engine._manager(options[0], max(o.max_tokens for o in options), prompts, self.watcher)
        self.manager = self._context.__enter__()

    def submit(self, i: int, prompt: list[int], options: SamplingOptions) -> None:
        if self.watcher is not None:
            self.watcher.submitted.add(self.ids[i])
        eos = -1 if options.ignore_eos else None
        self.manager.add_request(prompt, request_id=self.ids[i], max_new_tokens=options.max_tokens,
                                 record_timestamps=True, eos_token_id=eos, streaming=self.streaming)

    def step(self) -> StepOutput:
        out = self.manager.get_result(timeout=0.02)
        if out is None:
            if not self.manager.is_running():
                raise WorkbenchError("transformers continuous batching stopped unexpectedly: see the log.")
            return StepOutput()
        i = self.index.get(out.request_id)
        if i is None:
            return StepOutput()
        if out.error:
            raise WorkbenchError(f"transformers continuous batching failed a request: {out.error}")
        tokens = list(out.generated_tokens)
        step = StepOutput(tokens={i: tokens[self.sent.get(i, 0):]})
        self.sent[i] = len(tokens)
        if out.is_finished():
            ended_by_eos = not self.options[i].ignore_eos and tokens and tokens[-1] in self.engine.eos_ids
            step.finished[i] = "stop" if ended_by_eos else "length"
            step.stamps[i] = [t - self.clock.start for t in (out.timestamps or [])][: len(tokens)]
        return step

    def abort(self, indexes: list[int]) -> None:
        for i in indexes:
            self.manager.cancel_request(self.ids[i])

    def close(self) -> None:
        self._context.__exit__(None, None, None)


class _PagedSteps:
    """Called in the manager's thread after each step: reads its scheduler and paged cache into a snapshot."""

    def __init__(self, recorder: TraceRecorder, index: dict[str, int], clock: RunClock, device: str) -> None:
        self.recorder, self.index, self.clock, self.device = recorder, index, clock, device
        self.names = recorder.names
        self.submitted: set[str] = set()
        self.done: set[str] = set()
        self.was_active: set[str] = set()
        self.offsets: dict[str, int] = {}
        self.step = 0

    def __call__(self, batch_processor) -> None:
        from transformers.generation.continuous_batching.requests import RequestStatus

        now = self.clock.now()
        scheduler, cache = batch_processor.scheduler, batch_processor.cache
        allocator = next(iter(cache.cache_allocators.values()))
        # Block ids count the pool's reserved (trash) sectors first: those ids are never handed to a request.
        reserved = cache.pool.num_reserved_sectors * allocator.blocks_per_sector
        facts = self.recorder.trace.facts
        if facts.num_blocks != reserved + allocator.num_blocks:  # a pool other than the one read at load
            facts = self.recorder.trace.facts = replace(facts, num_blocks=reserved + allocator.num_blocks)
        active, waiting = scheduler.active_requests, scheduler.waiting_requests
        snaps = []
        for rid in sorted(self.submitted - self.done, key=self.index.__getitem__):
            state_obj = active.get(rid) or waiting.get(rid)
            name = self.names[self.index[rid]]
            if state_obj is None:  # not queued yet, or just finished (its request left the scheduler)
                if rid in self.was_active:
                    self.done.add(rid)
                    snaps.append(self.recorder.dedupe(RequestSnapshot(
                        name, "finished", 0, self.offsets.get(rid, 0), 0, (), 0)))
                else:
                    snaps.append(self.recorder.dedupe(RequestSnapshot(name, "waiting", 0, 0, 0, (), 0)))
                continue
            offset = state_obj.position_offset
            scheduled = max(0, offset - self.offsets.get(rid, 0))
            self.offsets[rid] = offset
            if rid in active and state_obj.status in (RequestStatus.PREFILLING, RequestStatus.DECODING):
                state = "prefill" if state_obj.status == RequestStatus.PREFILLING or scheduled > 1 else "decode"
                self.was_active.add(rid)
            elif rid in self.was_active:
                state = "preempted"  # sent back to the waiting queue after it had run
            else:
                state = "waiting"
            if state_obj.status == RequestStatus.FINISHED:
                state = "finished"
                self.done.add(rid)
            blocks = tuple(allocator.block_table.get(rid, ()))
            snaps.append(self.recorder.dedupe(RequestSnapshot(
                name, state, scheduled, offset, len(state_obj.generated_tokens), blocks, 0)))
        blocks = [BLOCK_RESERVED] * reserved + [BLOCK_FREE] * allocator.num_blocks
        for block in allocator.ledger.cached_blocks:
            blocks[block] = BLOCK_CACHED
        for table in allocator.block_table.values():
            for block in table:
                blocks[block] = BLOCK_USED
        used = sum(1 for b in blocks if b == BLOCK_USED)
        memory = MemorySnapshot(facts.weight_bytes, allocator.num_blocks * facts.bytes_per_block,
                                used * facts.bytes_per_block, *process_memory(), *device_memory(self.device))
        self.recorder.add(StepSnapshot(self.step, now, tuple(snaps), "".join(blocks), memory,
                                       {"kv_usage": used / max(1, allocator.num_blocks)}))
        self.step += 1
