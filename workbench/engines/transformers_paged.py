"""HF Transformers continuous batching: a paged KV cache and a scheduler that admits requests between steps.

Drives `ContinuousBatchingManager` (what `model.generate_batch` wraps) directly, so requests are added and their
results collected as they finish, and a stream can be cancelled.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from workbench.engines.base import Engine, RawOutput
from workbench.engines.hf_common import eos_token_ids, generation_config, hf_info, load_causal_lm, pick_device
from workbench.errors import WorkbenchError
from workbench.types import EngineInfo, SamplingOptions

# Where the manager sizes its cache and batches from free GPU memory, a CPU has none to read: bound them ourselves.
_CPU_DEFAULT_KV_BYTES = 1 << 30
_CPU_MAX_BLOCKS = 4096
_CPU_MAX_BATCH_TOKENS = 1024


class TransformersPagedEngine(Engine):
    name = "transformers-paged"
    extra_options = ("device", "block_size", "num_blocks", "max_batch_tokens", "max_batch_size")

    def _load(self) -> None:
        self.device = pick_device(self.options.get("device"))
        self.hf_model = load_causal_lm(self.model.path, self.dtype, self.device, attn_implementation="paged|sdpa")
        self.eos_ids = eos_token_ids(self.hf_model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._counter = 0

    def _info(self) -> EngineInfo:
        return hf_info(self.name, self.hf_model, self.model, self.dtype, self.device, self.max_model_len, self.options)

    def _release(self) -> None:
        del self.hf_model

    def _cb_config(self, seed: int | None):
        from transformers import ContinuousBatchingConfig

        block_size = self.options.get("block_size") or 32
        num_blocks = self.options.get("num_blocks")
        if num_blocks is None and self.device == "cpu":
            cfg = self.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            itemsize = self.hf_model.dtype.itemsize
            block_bytes = 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize * block_size
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
    def _manager(self, options: SamplingOptions, max_new_tokens: int, prompts: list[list[int]]):
        from transformers.generation.continuous_batching.utils import WorkloadHints

        gen = generation_config(options, self.eos_ids, self.pad_id, max_new_tokens)
        # The hints size the batch for this workload, as `generate_batch` does; without them a batch holds fewer.
        hints = WorkloadHints(max(len(p) for p in prompts), max_new_tokens, len(prompts))
        with self.hf_model.continuous_batching_context_manager(
            generation_config=gen, continuous_batching_config=self._cb_config(options.seed),
            block=True, timeout=30, warmup=self.device != "cpu", workload_hints=hints,
        ) as manager:
            yield manager

    def _next_id(self) -> str:
        self._counter += 1
        return f"wb-{self._counter}"

    def _generate(self, prompts: list[list[int]], options: list[SamplingOptions]) -> list[RawOutput]:
        start = time.perf_counter()
        first = options[0]
        by_id: dict[str, int] = {}
        results = {}
        with self._manager(first, max(o.max_tokens for o in options), prompts) as manager:
            for index, (prompt, opts) in enumerate(zip(prompts, options)):
                rid = manager.add_request(prompt, request_id=self._next_id(), max_new_tokens=opts.max_tokens,
                                          record_timestamps=True)
                by_id[rid] = index
            while len(results) < len(prompts):
                out = manager.get_result(timeout=1)
                if out is None:
                    if not manager.is_running():
                        raise WorkbenchError("transformers continuous batching stopped unexpectedly: see the log.")
                    continue
                if out.request_id in by_id and out.is_finished():
                    if out.error:
                        raise WorkbenchError(f"transformers continuous batching failed a request: {out.error}")
                    results[out.request_id] = out
        raw = [None] * len(prompts)
        for rid, out in results.items():
            index = by_id[rid]
            tokens = list(out.generated_tokens)
            finish = "stop" if tokens and tokens[-1] in self.eos_ids else "length"
            times = [t - start for t in (out.timestamps or [])][: len(tokens)]
            raw[index] = RawOutput(tokens, finish, times)
        return raw

    def _stream(self, prompt: list[int], options: SamplingOptions) -> Iterator[list[int]]:
        with self._manager(options, options.max_tokens, [prompt]) as manager:
            rid = manager.add_request(prompt, request_id=self._next_id(), max_new_tokens=options.max_tokens,
                                      streaming=True)
            sent = 0
            finished = False
            try:
                for out in manager.request_id_iter(rid):
                    if out.error:
                        raise WorkbenchError(f"transformers continuous batching failed the request: {out.error}")
                    tokens = out.generated_tokens
                    if len(tokens) > sent:
                        yield list(tokens[sent:])
                        sent = len(tokens)
                    finished = out.is_finished()
            finally:
                if not finished:
                    manager.cancel_request(rid)
