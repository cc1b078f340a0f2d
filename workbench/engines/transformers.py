"""HF Transformers `generate`: static batches, left padding, one contiguous KV cache per sequence.

Every sequence of a batch steps together until the longest one finishes, which is what the paged and continuously
batching engines improve on. A stopping criterion, called by `generate` once per decoding step, takes that step's
tokens, ends each row when its request is done, lets requests that arrived meanwhile queue for the next batch, and
snapshots the batch. `generate` runs in the caller's thread, where it is fastest (in a worker thread the same batch
took 30% longer here); only when tokens must be handed over as they come (a stream, a live text view) does a batch
run in a worker thread, handing each step over through a queue.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace

from workbench.engines.arrivals import RunClock
from workbench.engines.compilation import check_compile, compile_model, torch_facts
from workbench.engines.hf_common import (
    eos_token_ids,
    generation_config,
    hf_info,
    load_causal_lm,
    pick_device,
    score_tokens,
    torch_dtype,
)
from workbench.engines.interface import first_stop
from workbench.engines.local import LocalEngine, Session, StepOutput
from workbench.engines.offload import Offload
from workbench.engines.quantization import check_quantization, quantization_config
from workbench.errors import UnsupportedOptionError, WorkbenchError
from workbench.sysmem import device_memory, process_memory
from workbench.trace import CacheFacts, MemorySnapshot, RequestSnapshot, StepSnapshot, TraceRecorder
from workbench.types import (
    CompileFacts,
    EngineInfo,
    KVCacheMeasurement,
    OffloadFacts,
    SamplingOptions,
    TokenScores,
)


class _PromptLookup:
    """generate's prompt lookup decoding (`prompt_lookup_num_tokens`): each step proposes the tokens that followed
    an earlier occurrence of the sequence's last n-gram (the first found, longest n-gram first), and one forward pass
    verifies them all; greedy, the tokens are generate's plain ones. transformers runs it one sequence at a time, so
    a batch is one request. Its candidate generator is watched on this model only, to count each step's proposed
    and accepted tokens."""

    def __init__(self, options: dict) -> None:
        self.tokens = options.get("prompt_lookup_num_tokens")
        self.ngram = options.get("max_matching_ngram_size")
        self.on = bool(self.tokens)
        self.drafted = self.accepted = 0
        if not self.on:
            if self.ngram:
                raise UnsupportedOptionError("max_matching_ngram_size needs prompt_lookup_num_tokens (how many "
                                             "tokens each step proposes), e.g. prompt_lookup_num_tokens=4.")
            return
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise UnsupportedOptionError(f"prompt_lookup_num_tokens must be a whole number of tokens >= 1, not "
                                         f"{self.tokens!r}.")
        if (options.get("max_batch_size") or 1) != 1:
            raise UnsupportedOptionError("transformers' prompt lookup decoding runs one sequence at a time: drop "
                                         "max_batch_size or set it to 1.")

    def watch(self, model) -> None:
        """Count each step's proposed and accepted tokens, on `model`'s generate calls only."""
        if not self.on:
            return
        propose = model._get_candidate_generator

        def watched(*args, **kwargs):  # one candidate generator per generate call
            generator = propose(*args, **kwargs)
            get, update = generator.get_candidates, generator.update_candidate_strategy

            def get_candidates(input_ids, *a, **k):
                candidates, logits = get(input_ids, *a, **k)
                self.drafted = candidates.shape[1] - input_ids.shape[1]
                return candidates, logits

            def update_candidate_strategy(input_ids, scores, num_matches):
                self.accepted = int(num_matches)  # after generate's own cut at max length and end of sequence
                return update(input_ids, scores, num_matches)

            generator.get_candidates, generator.update_candidate_strategy = get_candidates, update_candidate_strategy
            return generator

        model._get_candidate_generator = watched

    def configure(self, config) -> None:
        if self.on:
            config.prompt_lookup_num_tokens = self.tokens
            if self.ngram:
                config.max_matching_ngram_size = self.ngram

    def step(self) -> tuple[int, int]:
        """(tokens proposed, tokens accepted) in the step generate just ran, then reset."""
        counts = (self.drafted, self.accepted)
        self.drafted = self.accepted = 0
        return counts


class TransformersEngine(LocalEngine):
    # max_memory, device_map, offload_folder: accelerate's big-model offload, named as `from_pretrained` names them
    # prompt_lookup_num_tokens, max_matching_ngram_size: generate's prompt lookup (n-gram speculative) decoding
    # quantization: the weights quantized as they load (`workbench.engines.quantization.QUANTIZATIONS`)
    # compile: torch.compile on the model (`workbench.engines.compilation.COMPILE_SCOPES`), with a static cache
    extra_options = ("device", "max_batch_size", "attn_implementation", "max_memory", "device_map", "offload_folder",
                     "prompt_lookup_num_tokens", "max_matching_ngram_size", "quantization", "compile")
    compile_scope: str | None = None
    speculation = _PromptLookup({})  # off, for subclasses that load their model another way

    def _load(self) -> None:
        self.speculation = _PromptLookup(self.options)
        self.compile_scope = check_compile(self.options)
        self.device = pick_device(self.options.get("device"))
        quantization = self.options.get("quantization")
        check_quantization(quantization)
        offload_options = ("max_memory", "device_map", "offload_folder")
        if quantization and any(self.options.get(k) is not None for k in offload_options):
            raise UnsupportedOptionError("quantization cannot be combined with max_memory, device_map or "
                                         "offload_folder here: load with one or the other.")
        self.offloading = Offload(self.options, self.device)
        kwargs = dict(self.offloading.kwargs)
        if quantization:
            kwargs["quantization_config"] = quantization_config(quantization, torch_dtype(self.dtype))
            kwargs["device_map"] = self.device  # the quantizer places each weight as it loads it
        if self.options.get("attn_implementation"):
            kwargs["attn_implementation"] = self.options["attn_implementation"]
        try:
            self.hf_model = load_causal_lm(self.model.path, self.dtype, self.device, **kwargs)
        except BaseException:
            self.offloading.release()
            raise
        self.offloading.attach(self.hf_model)
        self.eos_ids = eos_token_ids(self.hf_model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.speculation.watch(self.hf_model)
        if self.compile_scope:  # compile now, as vLLM does at load, not in the first request's time
            import torch

            compile_model(self.hf_model, self.compile_scope)
            config = generation_config(SamplingOptions(2, 0.0, ignore_eos=True), self.eos_ids, self.pad_id, 2)
            config.cache_implementation = "static"
            with torch.inference_mode():
                self.hf_model.generate(input_ids=torch.tensor([self.eos_ids[:1] * 4], device=self.device),
                                       generation_config=config)

    def _info(self) -> EngineInfo:
        return hf_info(self.name, self.hf_model, self.model, self.dtype, self.device, self.max_model_len, self.options)

    def _release(self) -> None:
        del self.hf_model
        self.offloading.release()

    def _offload(self) -> OffloadFacts:
        return self.offloading.facts()

    def _compilation(self) -> CompileFacts:
        if not self.compile_scope:
            return CompileFacts("eager", 0.0, 0, 0, 0, 0, 0, "nothing compiled (load with compile='layers')")
        return torch_facts(f"torch.compile ({self.compile_scope})")

    def _score_ids(self, ids: list[int]) -> TokenScores:
        return score_tokens(self.hf_model, ids)

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

    def _open_session(self, prompts: list[list[int]], options: list[SamplingOptions], clock: RunClock,
                      recorder: TraceRecorder, streaming: bool) -> Session:
        return _StaticBatches(self, prompts, options, clock, recorder, streaming)

    def _batch_inputs(self, prompts: list[list[int]]):
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device), width


class _StaticBatches(Session):
    """Static batching: the requests waiting when a batch starts run together in one `generate` call until every
    row is done; requests submitted meanwhile wait for the next batch. A batch shares the first row's sampling
    settings."""

    def __init__(self, engine: TransformersEngine, prompts: list[list[int]], options: list[SamplingOptions],
                 clock: RunClock, recorder: TraceRecorder, streaming: bool) -> None:
        self.engine, self.prompts, self.options, self.clock, self.recorder = engine, prompts, options, clock, recorder
        self.streaming = streaming
        self.size = 1 if engine.speculation.on else engine.options.get("max_batch_size") or len(prompts)
        self.waiting: list[int] = []
        self.lock = threading.Lock()  # the batch's thread reads the waiting list for its snapshots
        self.events: queue.Queue = queue.Queue()
        self.worker: threading.Thread | None = None
        self.abort_batch = threading.Event()
        self.step_index = 0

    def submit(self, i: int, prompt: list[int], options: SamplingOptions) -> None:
        with self.lock:
            self.waiting.append(i)

    def step(self) -> StepOutput:
        if not self.streaming:  # the whole batch, here: its steps' tokens come back together, with their times
            with self.lock:
                batch, self.waiting = self.waiting[: self.size], self.waiting[self.size:]
            self.abort_batch.clear()
            merged = StepOutput()
            end = self._generate(batch, merged)
            if end.error is not None:
                raise end.error
            merged.finished.update(end.leftover.finished)
            return merged
        if self.worker is None:
            with self.lock:
                batch, self.waiting = self.waiting[: self.size], self.waiting[self.size:]
            self.abort_batch.clear()
            self.worker = threading.Thread(target=lambda: self.events.put(self._generate(batch)), daemon=True,
                                           name="workbench-transformers-batch")
            self.worker.start()
        event = self.events.get()
        if isinstance(event, _BatchEnd):  # `generate` returned: rows it ended without our criterion end here
            self.worker.join()
            self.worker = None
            if event.error is not None:
                raise event.error
            return event.leftover
        return event

    def abort(self, indexes: list[int]) -> None:
        with self.lock:
            self.waiting = [i for i in self.waiting if i not in indexes]
        self.abort_batch.set()

    def close(self) -> None:
        if self.worker is not None:
            self.abort_batch.set()  # the criterion ends `generate` at its next step
            self.worker.join()
            self.worker = None

    def _generate(self, batch: list[int], merged: StepOutput | None = None) -> _BatchEnd:
        """Run one batch. Each step's tokens go into `merged`, or, without it, to the loop's thread as they come."""
        import torch

        engine = self.engine
        criterion = _BatchSteps(self, batch, merged)
        try:
            ids, mask, criterion.width = engine._batch_inputs([self.prompts[i] for i in batch])
            first = self.options[batch[0]]
            if first.seed is not None:
                torch.manual_seed(first.seed)
            config = generation_config(replace(first, stop=()), engine.eos_ids, engine.pad_id,
                                       max(self.options[i].max_tokens for i in batch))
            engine.speculation.configure(config)
            if engine.compile_scope:
                config.cache_implementation = "static"  # fixed-shape cache tensors: what the compiled graphs take
            with torch.inference_mode():
                engine.hf_model.generate(input_ids=ids, attention_mask=mask, stopping_criteria=[criterion],
                                         generation_config=config)
            error = None
        except Exception as exc:  # noqa: BLE001 - raised in the loop's thread
            error = exc if isinstance(exc, WorkbenchError) else WorkbenchError(
                f"transformers generate failed: {type(exc).__name__}: {exc}")
        # rows `generate` ended itself (its own end-of-sequence check), or that a stop cut short
        reason = "abort" if self.abort_batch.is_set() or engine.stopping else "stop"
        leftover = StepOutput(finished={i: reason for i in batch if i not in criterion.finished_at})
        return _BatchEnd(leftover, error)


class _BatchEnd:
    def __init__(self, leftover: StepOutput, error: BaseException | None) -> None:
        self.leftover, self.error = leftover, error


class _BatchSteps:
    """A stopping criterion called by `generate` after each decoding step: it hands the step's tokens over, ends each
    row when its request is done (end of sequence, max_tokens, a stop string), and snapshots the batch.

    The cache is contiguous: every row holds the batch's padded width plus one slot per step, so left padding and
    the steps a finished row keeps riding along are counted as padding (waste).
    """

    def __init__(self, batches: _StaticBatches, batch: list[int], merged: StepOutput | None) -> None:
        self.batches, self.batch, self.merged = batches, batch, merged
        self.width = 0
        self.seen = 0  # the sequences' length at the last call
        self.calls = 0
        self.generated: dict[int, list[int]] = {i: [] for i in batch}
        self.finished_at: dict[int, int] = {}  # request index -> the step it ended at

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        batches, engine = self.batches, self.batches.engine
        now = batches.clock.now()
        k = input_ids.shape[1] - self.width  # tokens generated so far: one more a step, or more with speculation
        new = input_ids[:, self.seen or self.width:].tolist()
        self.seen = input_ids.shape[1]
        self.calls += 1
        out = StepOutput()
        for row, i in enumerate(self.batch):
            if i in self.finished_at:
                continue
            for at, token in enumerate(new[row], start=k - len(new[row]) + 1):
                self.generated[i].append(token)
                out.tokens.setdefault(i, []).append(token)
                out.times.setdefault(i, []).append(now)
                reason = self._done(i, token, at)
                if reason is not None:
                    self.finished_at[i] = at
                    out.finished[i] = reason
                    break
        if self.merged is None:
            batches.events.put(out)
        else:  # in the caller's thread: keep the step, and let requests that arrived meanwhile queue
            for i, tokens in out.tokens.items():
                self.merged.tokens.setdefault(i, []).extend(tokens)
                self.merged.times.setdefault(i, []).extend(out.times[i])
            self.merged.finished.update(out.finished)
            batches.admit()
        if batches.recorder.wanted:
            batches.recorder.add(self._snapshot(k, now))
        batches.step_index += 1
        stop_all = batches.abort_batch.is_set() or engine.stopping
        done = [stop_all or i in self.finished_at for i in self.batch]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _done(self, i: int, token: int, k: int) -> str | None:
        options, engine = self.batches.options[i], self.batches.engine
        if not options.ignore_eos and token in engine.eos_ids:
            return "stop"
        if options.stop and first_stop(engine.tokenizer.decode(self.generated[i]), options.stop) is not None:
            return "stop"
        return "length" if k >= options.max_tokens else None

    def _snapshot(self, k: int, now: float) -> StepSnapshot:
        batches = self.batches
        facts, recorder = batches.recorder.trace.facts, batches.recorder
        snaps, real_tokens = [], 0
        drafted, accepted = batches.engine.speculation.step()
        first = self.calls == 1
        for i in self.batch:
            done_at = self.finished_at.get(i)
            produced = min(k, done_at if done_at is not None else k)
            state = "finished" if done_at is not None else "prefill" if first else "decode"
            prompt = len(batches.prompts[i])
            padding = (self.width - prompt) + (k - done_at if done_at is not None else 0)
            real_tokens += prompt + min(produced, k - 1)  # the newest token has no KV yet
            snaps.append(recorder.dedupe(RequestSnapshot(
                recorder.names[i], state, (self.width if first else 1) + drafted, self.width + k - 1, produced, (),
                0, padding, draft_tokens=drafted, accepted_tokens=accepted)))
        with batches.lock:
            waiting = list(batches.waiting)
        why = f"static batching: a batch of {len(self.batch)} is running; it waits for the next batch"
        for i in waiting:
            snaps.append(recorder.dedupe(RequestSnapshot(recorder.names[i], "waiting", 0, 0, 0, (), 0, reason=why)))
        slots = len(self.batch) * (self.width + k - 1)
        memory = MemorySnapshot(facts.weight_bytes, slots * facts.bytes_per_token, real_tokens * facts.bytes_per_token,
                                *process_memory(), *device_memory(batches.engine.device))
        return StepSnapshot(batches.step_index, now, tuple(snaps), "", memory,
                            {"batch_rows": len(self.batch), "padded_width": self.width})
