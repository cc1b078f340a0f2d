"""An engine in this process: the model's tokenizer and config here, every request checked and fitted to the context,
and `generate`, `stream` and `run` all served by the one run loop (`loop.py`) through the `Session` an adapter opens.

An adapter supplies `_load`, `_info`, `_cache_facts`, `_open_session` and, where it can, `_measure_kv_cache` and
`_release`: talking to its engine, nothing else.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

from workbench.engines.arrivals import RunClock
from workbench.engines.interface import Engine, final_pieces, first_stop
from workbench.engines.loop import RawOutput, Session, StepOutput, serve, steps
from workbench.errors import InvalidRequestError, UnsupportedOptionError
from workbench.models import ResolvedModel
from workbench.trace import StepSnapshot, Trace, TraceRecorder, TraceRequest
from workbench.types import GenerationResult, RequestMetrics, SamplingOptions, TokenScores
from workbench.workload import Request, shared_prefix_lengths


class LocalEngine(Engine):
    """A model loaded in an engine in this Python process."""

    def __init__(self, model: ResolvedModel, dtype: str = "float32", max_model_len: int | None = None,
                 **options: Any) -> None:
        unknown = sorted(set(options) - set(self.extra_options))
        if unknown:
            accepted = ", ".join(("dtype", "max_model_len", *self.extra_options))
            raise UnsupportedOptionError(f"engine {self.name!r} has no option {', '.join(unknown)}; "
                                         f"it accepts {accepted}.")
        from transformers import AutoConfig, AutoTokenizer

        self.model = model
        self.dtype = dtype
        self.options = options
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.config = AutoConfig.from_pretrained(model.path)
        self.max_model_len = max_model_len or getattr(self.config, "max_position_embeddings", None) or 2048
        self._open()

    @abstractmethod
    def _open_session(self, prompts: list[list[int]], options: list[SamplingOptions], clock: RunClock,
                      recorder: TraceRecorder, streaming: bool) -> Session:
        """Prepare the engine for a run of these prompts (all of them known up front, each submitted when the
        clock releases it). `streaming`: someone shows tokens as they come, so hand them over every step."""

    # ---- the public API, served by the loop ------------------------------------------------------------------
    def _generate(self, texts: list[str], options: SamplingOptions, chat: bool) -> list[GenerationResult]:
        token_ids = [self._encode(text, chat) for text in texts]
        per_prompt = [self._fit_to_context(ids, options) for ids in token_ids]
        with self._busy():
            clock = RunClock([0.0] * len(texts), self._stop_requested)
            recorder = TraceRecorder.silent(len(texts))
            session = self._open_session(token_ids, per_prompt, clock, recorder, streaming=False)
            clock.restart()
            raw = serve(session, token_ids, per_prompt, clock, recorder, lambda: self.stopping)
            total = clock.now()
        return [self._result(text, ids, out, options.stop, total) for text, ids, out in zip(texts, token_ids, raw)]

    def _stream(self, text: str, options: SamplingOptions, chat: bool) -> Iterator[str]:
        ids = self._encode(text, chat)
        return self._stream_text(ids, self._fit_to_context(ids, options))

    def _stream_text(self, ids: list[int], options: SamplingOptions) -> Iterator[str]:
        with self._busy():
            clock = RunClock([0.0], self._stop_requested)
            recorder = TraceRecorder.silent(1)
            session = self._open_session([ids], [options], clock, recorder, streaming=True)
            clock.restart()
            outputs = [RawOutput([], "length")]
            run = steps(session, [ids], [options], clock, recorder, lambda: self.stopping, outputs)

            def texts() -> Iterator[str]:  # the whole answer so far, after each step that added to it
                # Detokenize the whole answer each time: byte-level tokens can split a character.
                for out in run:
                    if out.tokens.get(0):
                        yield self.tokenizer.decode(outputs[0].token_ids, skip_special_tokens=True)

            try:
                yield from final_pieces(texts(), options.stop, lambda: self.stopping)
            finally:
                run.close()  # an abandoned stream is aborted in the engine

    def run(self, requests: Sequence[Request | str], record: bool = True,
            on_step: Callable[[StepSnapshot], None] | None = None,
            on_tokens: Callable[[int, list[int]], None] | None = None,
            on_start: Callable[[Trace], None] | None = None, *, rate: float | None = None,
            burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0) -> Trace:
        self._check_open()
        items, load = self._load_plan(requests, rate, burstiness, max_concurrency, seed)
        prompts, options = [], []
        for request in items:
            opts = SamplingOptions(request.max_tokens, request.temperature, request.top_p, request.top_k,
                                   request.seed, request.stop, request.ignore_eos)
            ids = self._encode(request.prompt, request.chat, request.system)
            prompts.append(ids)
            options.append(self._fit_to_context(ids, opts))
        shared = shared_prefix_lengths(prompts)
        trace = Trace(self.name, self.model.name, self.cache_facts,
                      [TraceRequest(f"r{i}", len(ids), opts.max_tokens, float(r.arrival_s), common)
                       for i, (ids, opts, r, common) in enumerate(zip(prompts, options, items, shared))],
                      load_profile=load)
        recorder = TraceRecorder(trace, record, on_step, on_tokens)
        if on_start is not None:
            on_start(trace)
        with self._busy():
            clock = RunClock([float(r.arrival_s) for r in items], self._stop_requested, max_concurrency)
            session = self._open_session(prompts, options, clock, recorder, streaming=on_tokens is not None)
            clock.restart()
            raw = serve(session, prompts, options, clock, recorder, lambda: self.stopping)
        for request, ids, out, opts, sent in zip(items, prompts, raw, options, clock.sent):
            sent = request.arrival_s if sent is None else sent  # never sent: stopped before it arrived
            out.token_times = [t - sent for t in out.token_times]
            trace.results.append(self._result(request.prompt, ids, out, opts.stop, 0.0, sent - request.arrival_s))
        return trace

    def _score(self, text: str | Sequence[int]) -> TokenScores:
        ids = self._encode(text, chat=False)
        if not 2 <= len(ids) <= self.max_model_len:
            raise InvalidRequestError(f"score() needs 2 to {self.max_model_len} tokens (the context); this text "
                                      f"has {len(ids)}.")
        return self._score_ids(ids)

    def _score_ids(self, ids: list[int]) -> TokenScores:
        return super()._score(ids)

    # ---- requests ----------------------------------------------------------------------------------------------
    def _encode(self, text: str | Sequence[int], chat: bool, system: str | None = None) -> list[int]:
        if not isinstance(text, str):  # token ids, sent as they are
            ids = list(text)
            vocab = len(self.tokenizer)
            bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"a prompt's token id {bad!r} is not in this model's vocabulary (0 to "
                                          f"{vocab - 1}).")
        elif chat:
            if not self.tokenizer.chat_template:
                raise InvalidRequestError(f"model {self.model.name!r} has no chat template: pass chat=False.")
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": text})
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
        else:
            ids = self.tokenizer((system + "\n" if system else "") + text).input_ids
        ids = list(ids)
        if not ids:
            raise InvalidRequestError("a prompt is empty: with chat=False every prompt needs some text.")
        return ids

    def _fit_to_context(self, ids: list[int], options: SamplingOptions) -> SamplingOptions:
        room = self.max_model_len - len(ids)
        if room < 1:
            raise InvalidRequestError(
                f"a prompt has {len(ids)} tokens but the context holds {self.max_model_len}: shorten it "
                f"or load the engine with a larger max_model_len."
            )
        if options.max_tokens <= room:
            return options
        return replace(options, max_tokens=room)

    def _result(self, prompt: str | Sequence[int], prompt_ids: list[int], out: RawOutput, stop: tuple[str, ...],
                total: float, queue_s: float = 0.0) -> GenerationResult:
        text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        cut = first_stop(text, stop)
        finish = out.finish_reason
        if cut is not None:
            text, finish = text[:cut], "stop"
        end = out.token_times[-1] if out.token_times else total
        metrics = RequestMetrics.from_token_times(len(prompt_ids), out.token_times, end, queue_s)
        metrics.engine = out.engine
        return GenerationResult(prompt, text, list(out.token_ids), finish, metrics)


__all__ = ["LocalEngine", "RawOutput", "Session", "StepOutput"]
