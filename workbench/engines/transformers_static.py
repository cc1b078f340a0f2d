"""HF Transformers `generate`: static batches, left padding, one contiguous KV cache per sequence.

Every sequence of a batch steps together until the longest one finishes, which is what the paged and continuously
batching engines improve on. Timings come from a stopping criterion, called by `generate` once per decoding step.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

from workbench.engines.arrivals import RunClock
from workbench.engines.base import Engine, RawOutput, finish_from_eos
from workbench.engines.hf_common import eos_token_ids, generation_config, hf_info, load_causal_lm, pick_device
from workbench.sysmem import device_memory, process_memory
from workbench.trace import CacheFacts, MemorySnapshot, RequestSnapshot, StepSnapshot, TraceRecorder
from workbench.types import EngineInfo, KVCacheMeasurement, SamplingOptions


class _StepClock:
    """A stopping criterion that never stops: it notes when each decoding step produced its tokens."""

    def __init__(self, start: float, abort: threading.Event | None = None) -> None:
        self.start = start
        self.times: list[float] = []
        self.abort = abort

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.times.append(time.perf_counter() - self.start)
        stop = self.abort is not None and self.abort.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _TokenQueue:
    """A `generate` streamer that hands new token ids to another thread."""

    def __init__(self) -> None:
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first sends the prompt
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class _BatchSteps:
    """A stopping criterion that snapshots a static batch after each decoding step (it never stops generation).

    The cache is contiguous: every row holds the batch's padded width plus one slot per step, so left padding and
    the steps a finished row keeps riding along are counted as padding (waste).
    """

    def __init__(self, engine: TransformersEngine, batch: list[int], width: int, prompts: list[list[int]],
                 options: list[SamplingOptions], queue: list[int], clock: RunClock, recorder: TraceRecorder,
                 first_step: int) -> None:
        self.engine, self.batch, self.width = engine, batch, width
        self.prompts, self.options, self.queue, self.clock, self.recorder = prompts, options, queue, clock, recorder
        self.names = recorder.names
        self.step = first_step
        self.times: list[float] = []
        self.finished_at: dict[int, int] = {}  # request index -> number of tokens it really produced

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        now = self.clock.now()
        self.times.append(now)
        k = input_ids.shape[1] - self.width  # tokens generated so far
        last = input_ids[:, -1].tolist()
        for row, i in enumerate(self.batch):
            if i in self.finished_at:
                continue
            self.recorder.tokens(i, [last[row]])
            if (not self.options[i].ignore_eos and last[row] in self.engine.eos_ids) or k >= self.options[i].max_tokens:
                self.finished_at[i] = k
                self.clock.done(i)
        self.queue.extend(self.clock.arrived())  # requests arriving now wait for the next batch
        if self.recorder.wanted:
            self._snapshot(k, now)
        self.step += 1
        stop = self.engine.stopping  # `generate` ends the whole batch at this step
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    def _snapshot(self, k: int, now: float) -> None:
        facts = self.recorder.trace.facts
        snaps, real_tokens = [], 0
        for i in self.batch:
            produced = min(k, self.finished_at.get(i, k))
            done_since = self.finished_at.get(i)
            state = "prefill" if k == 1 else "decode"
            if done_since is not None and done_since < k:
                state = "finished"  # still occupies its row until the whole batch ends
            elif done_since == k:
                state = "finished"
            padding = (self.width - len(self.prompts[i])) + (k - done_since if done_since is not None else 0)
            real_tokens += len(self.prompts[i]) + min(produced, k - 1)  # the newest token has no KV yet
            snaps.append(self.recorder.dedupe(RequestSnapshot(
                self.names[i], state, self.width if k == 1 else 1, self.width + k - 1, produced, (), 0, padding)))
        for i in self.queue:
            snaps.append(self.recorder.dedupe(RequestSnapshot(self.names[i], "waiting", 0, 0, 0, (), 0)))
        slots = len(self.batch) * (self.width + k - 1)
        memory = MemorySnapshot(facts.weight_bytes, slots * facts.bytes_per_token,
                                real_tokens * facts.bytes_per_token, *process_memory(),
                                *device_memory(self.engine.device))
        self.recorder.add(StepSnapshot(self.step, now, tuple(snaps), "", memory,
                                       {"batch_rows": len(self.batch), "padded_width": self.width}))


class TransformersEngine(Engine):
    name = "transformers"
    extra_options = ("device", "max_batch_size", "attn_implementation")

    def _load(self) -> None:
        self.device = pick_device(self.options.get("device"))
        kwargs = {}
        if self.options.get("attn_implementation"):
            kwargs["attn_implementation"] = self.options["attn_implementation"]
        self.hf_model = load_causal_lm(self.model.path, self.dtype, self.device, **kwargs)
        self.eos_ids = eos_token_ids(self.hf_model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.tokenizer.padding_side = "left"

    def _info(self) -> EngineInfo:
        return hf_info(self.name, self.hf_model, self.model, self.dtype, self.device, self.max_model_len, self.options)

    def _release(self) -> None:
        del self.hf_model

    def _batch_inputs(self, prompts: list[list[int]]):
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device), width

    def _generate_kwargs(self, options: SamplingOptions, max_new_tokens: int) -> dict:
        config = generation_config(options, self.eos_ids, self.pad_id, max_new_tokens)
        return dict(generation_config=config, tokenizer=self.tokenizer if options.stop else None)

    def _stream(self, prompt: list[int], options: SamplingOptions) -> Iterator[list[int]]:
        import torch

        if options.seed is not None:
            torch.manual_seed(options.seed)
        ids, mask, _ = self._batch_inputs([prompt])
        streamer = _TokenQueue()
        abort = threading.Event()
        clock = _StepClock(time.perf_counter(), abort)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.hf_model.generate(input_ids=ids, attention_mask=mask, streamer=streamer,
                                           stopping_criteria=[clock],
                                           **self._generate_kwargs(options, options.max_tokens))
            except BaseException as exc:  # re-raised in the caller's thread below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="workbench-transformers-stream", daemon=True)
        worker.start()
        try:
            while (new := streamer.queue.get()) is not None:
                yield new
                if any(t in self.eos_ids for t in new):
                    break
            if failure:
                raise failure[0]
        finally:
            abort.set()  # the stopping criterion ends generate at its next step
            worker.join()

    # ---- step traces ---------------------------------------------------------------------------------------------
    def _cache_facts(self) -> CacheFacts:
        return self._layout(paged=False, block_size=1, num_blocks=0)  # contiguous: a "block" is one token slot

    def _measure_kv_cache(self) -> KVCacheMeasurement:
        # `generate` keeps no cache between calls: measure the one a prefill builds, as generate's first step does.
        import torch

        tokens = 16
        ids = torch.full((1, tokens), self.pad_id, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            cache = self.hf_model(input_ids=ids, use_cache=True).past_key_values
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return KVCacheMeasurement(sum(t.nbytes for t in tensors), tokens,
                                  f"{type(cache).__name__} after a {tokens}-token prefill ({len(tensors)} tensors)")

    def _run(self, prompts: list[list[int]], options: list[SamplingOptions], clock: RunClock,
             recorder: TraceRecorder) -> list[RawOutput]:
        import torch

        size = self.options.get("max_batch_size") or len(prompts)
        raw: list[RawOutput | None] = [None] * len(prompts)
        queue: list[int] = []
        step = 0
        while any(out is None for out in raw):
            if self.stopping:
                raw = [out or RawOutput([], "abort") for out in raw]
                break
            queue.extend(clock.arrived())
            if not queue:
                clock.wait_for_next()
                continue
            batch = queue[:size]
            del queue[:size]
            ids, mask, width = self._batch_inputs([prompts[i] for i in batch])
            opts = options[batch[0]]  # a static batch shares one sampling setting
            if opts.seed is not None:
                torch.manual_seed(opts.seed)
            steps = _BatchSteps(self, batch, width, prompts, options, queue, clock, recorder, step)
            with torch.inference_mode():
                out = self.hf_model.generate(
                    input_ids=ids, attention_mask=mask, stopping_criteria=[steps],
                    **self._generate_kwargs(opts, max(options[i].max_tokens for i in batch)))
            step = steps.step
            for row, i in enumerate(batch):
                tokens = out[row, width:].tolist()[: steps.finished_at.get(i, options[i].max_tokens)]
                if self.pad_id not in self.eos_ids:  # a row ended by a stop string is padded to the batch's end
                    while tokens and tokens[-1] == self.pad_id:
                        tokens.pop()
                eos = set() if options[i].ignore_eos else set(self.eos_ids)
                tokens, finish = finish_from_eos(tokens, eos, options[i].max_tokens)
                if i not in steps.finished_at and self.stopping:
                    finish = "abort"
                raw[i] = RawOutput(tokens, finish, steps.times[: len(tokens)])
                clock.done(i)  # rows a stop string ended were not seen finishing step by step
        return raw
