"""The one engine API. Adapters subclass `Engine` and implement three hooks on token ids; everything a user can get
wrong (prompts, sampling arguments, context length, stop strings) is checked and handled here, once.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

from workbench.engines.arrivals import RunClock
from workbench.errors import InvalidRequestError, UnsupportedOptionError, WorkbenchError
from workbench.memory import kv_bytes_per_token, kv_shape
from workbench.models import ResolvedModel
from workbench.trace import CacheFacts, StepSnapshot, Trace, TraceRecorder, TraceRequest
from workbench.types import EngineInfo, GenerationResult, KVCacheMeasurement, RequestMetrics, SamplingOptions
from workbench.workload import Request, arrival_times, as_requests, with_arrivals


@dataclass
class RawOutput:
    """What an adapter hands back for one request: tokens, why it ended, and when each token arrived.

    `token_times` are seconds since the run's clock started, one per token in `token_ids`.
    """

    token_ids: list[int]
    finish_reason: str
    token_times: list[float] = field(default_factory=list)
    engine: dict = field(default_factory=dict)  # the engine's own figures for this request, where it keeps them


class Engine(ABC):
    """A loaded model in one inference engine.

    >>> import workbench as wb
    >>> with wb.load("transformers", model="smollm2-135m") as engine:      # doctest: +SKIP
    ...     print(engine.generate(["What is the capital of France?"], max_tokens=16, temperature=0)[0].text)
    The capital of France is Paris.
    """

    #: the name `workbench.load` knows the engine by
    name: str = ""
    #: engine options this adapter accepts besides `dtype` and `max_model_len`
    extra_options: tuple[str, ...] = ()
    #: a server reached over HTTP: `workbench.load` passes the model's name as the server knows it
    remote: bool = False

    def __init__(self, model: ResolvedModel, dtype: str = "float32", max_model_len: int | None = None,
                 **options: Any) -> None:
        unknown = sorted(set(options) - set(self.extra_options))
        if unknown:
            accepted = ", ".join(("dtype", "max_model_len", *self.extra_options))
            raise UnsupportedOptionError(f"engine {self.name!r} has no option {', '.join(unknown)}; it accepts {accepted}.")
        from transformers import AutoConfig, AutoTokenizer

        self.model = model
        self.dtype = dtype
        self.options = options
        self.tokenizer = AutoTokenizer.from_pretrained(model.path)
        self.config = AutoConfig.from_pretrained(model.path)
        self.max_model_len = max_model_len or getattr(self.config, "max_position_embeddings", None) or 2048
        self._open()

    def _open(self) -> None:
        """Set up the state every adapter shares, then load the engine and time it."""
        self._closed = False
        # One request at a time per engine object: the adapters drive their engine from the calling thread.
        self._lock = threading.Lock()
        # Set by `stop()` from another thread; the adapters look at it once per engine step.
        self._stop_requested = threading.Event()
        start = time.perf_counter()
        self._load()
        #: seconds `__init__` spent in the engine's own load (weights, cache, warm-up), tokenizer and config excluded
        self.load_seconds = time.perf_counter() - start

    # ---- hooks an adapter implements -------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Load the model into the engine (called once from __init__)."""

    @abstractmethod
    def _stream(self, prompt: list[int], options: SamplingOptions) -> Iterator[list[int]]:
        """Yield new token ids as they come. Closing the iterator must cancel the request in the engine."""

    @abstractmethod
    def _info(self) -> EngineInfo:
        """Static facts about the loaded engine."""

    def _release(self) -> None:
        """Free the engine's memory (called once from close)."""

    @abstractmethod
    def _run(self, prompts: list[list[int]], options: list[SamplingOptions], clock: RunClock,
             recorder: TraceRecorder) -> list[RawOutput]:
        """Serve every prompt as `clock.arrived()` releases it (its arrival time passed and, in a closed loop, a slot
        is free), and tell `clock.done(i)` when prompt i finishes; `options[i]` is prompt i's, with max_tokens
        already fitted to the context. Snapshot the engine after each step when `recorder.wanted`. Token times are
        `clock.now()` readings. `generate` is a run where everything arrives at once."""

    @abstractmethod
    def _cache_facts(self) -> CacheFacts:
        """How this engine lays out its KV cache."""

    @abstractmethod
    def _measure_kv_cache(self) -> KVCacheMeasurement:
        """The KV cache tensors this engine allocates, measured from the tensors themselves."""

    def _kv_shape(self) -> tuple[int, int, int, int]:
        """(layers, KV heads, head dim, bytes per element) of the model, from its config."""
        return kv_shape(self.config, self.dtype)

    def _kv_bytes_per_token(self) -> int:
        """Bytes the keys and values of one token take in the cache, over all layers."""
        return kv_bytes_per_token(self.config, self.dtype)

    def _layout(self, paged: bool, block_size: int, num_blocks: int) -> CacheFacts:
        """The cache facts of this model in this engine, for a cache of `num_blocks` blocks of `block_size` tokens."""
        layers, kv_heads, head_dim, _ = self._kv_shape()
        info = self.info
        return CacheFacts(paged, block_size, num_blocks, self._kv_bytes_per_token() * block_size, layers, kv_heads,
                          head_dim, info.dtype, info.weight_bytes, self.max_model_len)

    # ---- public API ------------------------------------------------------------------------------------------
    @property
    def info(self) -> EngineInfo:
        """Engine name and version, device, dtype, model, parameter count and bytes of weights."""
        self._check_open()
        return self._info()

    @property
    def cache_facts(self) -> CacheFacts:
        """How this engine lays out its KV cache: block size, number of blocks, bytes per block, layers, KV heads."""
        self._check_open()
        return self._cache_facts()

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take over all layers, from the model's config:
        2 (K and V) x layers x KV heads x head dim x bytes per element.

        >>> engine.kv_bytes_per_token      # SmolLM2-135M in float32: 2 * 30 * 3 * 64 * 4      # doctest: +SKIP
        46080
        """
        return self._kv_bytes_per_token()

    def measure_kv_cache(self) -> KVCacheMeasurement:
        """Measure the KV cache the engine really allocates: bytes of its cache tensors and the token slots they hold.

        Compare `measure_kv_cache().bytes_per_token` with `kv_bytes_per_token` (the config's figure). A paged engine
        reports its whole block pool; `transformers` (no cache between calls) reports the cache of a short prefill.

        >>> engine.measure_kv_cache()      # doctest: +SKIP
        KVCacheMeasurement(bytes=1073725440, token_slots=23301, source='vLLM model runner kv_caches (30 tensors)')
        """
        self._check_open()
        with self._busy():
            return self._measure_kv_cache()

    def generate(
        self,
        prompts: str | Sequence[str],
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = True,
    ) -> list[GenerationResult]:
        """Generate a completion for each prompt; one result per prompt, in order.

        `chat=True` wraps each prompt as a user message in the model's chat template. `temperature=0` is greedy.

        >>> engine.generate(["What is the capital of France?"], max_tokens=16, temperature=0)[0].text  # doctest: +SKIP
        'The capital of France is Paris.'
        """
        self._check_open()
        texts = self._check_prompts(prompts)
        options = SamplingOptions(max_tokens, temperature, top_p, top_k, seed, stop)
        token_ids = [self._encode(text, chat) for text in texts]
        per_prompt = [self._fit_to_context(ids, options) for ids in token_ids]
        with self._busy():
            clock = RunClock([0.0] * len(texts), self._stop_requested)
            raw = self._run(token_ids, per_prompt, clock, TraceRecorder.silent(len(texts)))
            total = clock.now()
        return [self._result(text, ids, out, options.stop, total) for text, ids, out in zip(texts, token_ids, raw)]

    def stream(
        self,
        prompt: str,
        max_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = True,
    ) -> Iterator[str]:
        """Yield the answer's text in pieces as the engine produces them.

        >>> for piece in engine.stream("Tell me a joke", max_tokens=32):      # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        self._check_open()
        (text,) = self._check_prompts([prompt])
        options = SamplingOptions(max_tokens, temperature, top_p, top_k, seed, stop)
        ids = self._encode(text, chat)
        fitted = self._fit_to_context(ids, options)
        return self._stream_text(ids, fitted)

    def run(self, requests: Sequence[Request | str], record: bool = True,
            on_step: Callable[[StepSnapshot], None] | None = None,
            on_tokens: Callable[[int, list[int]], None] | None = None,
            on_start: Callable[[Trace], None] | None = None, *, rate: float | None = None,
            burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0) -> Trace:
        """Serve `requests` as they arrive and return a `Trace` of every engine step.

        The load: each request arrives at its own `arrival_s`; or, with `rate` (requests per second, `inf` for all at
        once), at gamma-distributed gaps of shape `burstiness` (1: Poisson), as vLLM's `bench serve` sends them; and
        with `max_concurrency=N` in a closed loop, where at most N requests are in flight and the next is sent when
        one finishes. Each result's timings count from when its request was sent, and `metrics.queue_s` is how
        long it waited before that.

        `on_start` is called once with the trace before the first step (live views read its cache facts and requests
        and watch its steps fill in); `on_step` with each snapshot as soon as it is taken; `on_tokens(i, ids)` with
        request i's new token ids as they come; `record=False` keeps no snapshots. The callbacks run in the thread
        the engine steps in. Results are in `trace.results`, in request order; after `stop()` the unfinished ones
        end with finish_reason "abort".

        >>> from workbench.workload import make_workload
        >>> trace = engine.run(make_workload(n=8, shared_prefix_tokens=64, rate=4.0))      # doctest: +SKIP
        >>> trace = engine.run(make_workload(n=32), max_concurrency=4)                      # doctest: +SKIP
        """
        self._check_open()
        items, load = self._load_plan(requests, rate, burstiness, max_concurrency, seed)
        prompts, options = [], []
        for request in items:
            opts = SamplingOptions(request.max_tokens, request.temperature, request.top_p, request.top_k,
                                   request.seed, request.stop, request.ignore_eos)
            ids = self._encode(request.prompt, request.chat, request.system)
            prompts.append(ids)
            options.append(self._fit_to_context(ids, opts))
        trace = Trace(self.name, self.model.name, self.cache_facts,
                      [TraceRequest(f"r{i}", len(ids), opts.max_tokens, float(r.arrival_s))
                       for i, (ids, opts, r) in enumerate(zip(prompts, options, items))], load_profile=load)
        recorder = TraceRecorder(trace, record, on_step, on_tokens)
        if on_start is not None:
            on_start(trace)
        with self._busy():
            clock = RunClock([float(r.arrival_s) for r in items], self._stop_requested, max_concurrency)
            raw = self._run(prompts, options, clock, recorder)
        for request, ids, out, opts, sent in zip(items, prompts, raw, options, clock.sent):
            sent = request.arrival_s if sent is None else sent  # never sent: stopped before it arrived
            out.token_times = [t - sent for t in out.token_times]
            trace.results.append(self._result(request.prompt, ids, out, opts.stop, 0.0, sent - request.arrival_s))
        return trace

    @staticmethod
    def _load_plan(requests: Sequence[Request | str], rate: float | None, burstiness: float,
                   max_concurrency: int | None, seed: int) -> tuple[list[Request], dict]:
        """The requests with their arrival times for this load, and the load as a trace records it."""
        items = as_requests(requests)
        if not items:
            raise InvalidRequestError("the request list is empty: give at least one request.")
        if max_concurrency is not None and (isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int)
                                            or max_concurrency < 1):
            raise InvalidRequestError(f"max_concurrency must be an integer of at least 1 (requests in flight at "
                                      f"once), got {max_concurrency!r}.")
        if rate is not None:
            items = with_arrivals(items, arrival_times(len(items), rate, burstiness, seed))
        return items, {"rate": rate, "burstiness": burstiness if rate is not None else None,
                       "max_concurrency": max_concurrency}

    def stop(self) -> None:
        """Abort what the engine is serving now (a `generate`, `run` or `stream` in another thread) at its next step.

        Requests not finished end with finish_reason "abort"; the engine stays usable.
        A call while nothing runs does nothing.

        >>> threading.Timer(2.0, engine.stop).start(); trace = engine.run(long_workload)      # doctest: +SKIP
        """
        self._stop_requested.set()

    @property
    def stopping(self) -> bool:
        """Whether `stop()` was called during the current request (adapters check it once per step)."""
        return self._stop_requested.is_set()

    def close(self) -> None:
        """Free the engine's memory. The engine cannot be used afterwards; load a new one."""
        if not self._closed:
            self._closed = True
            self._release()
            import gc

            gc.collect()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"model={self.model.name!r}, dtype={self.dtype!r}"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    # ---- shared machinery ------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise WorkbenchError(f"this {self.name!r} engine is closed: load a new one with workbench.load().")

    @contextmanager
    def _busy(self) -> Iterator[None]:
        # Refuse rather than wait: waiting on a stream left half-read in the same thread would hang the kernel.
        if not self._lock.acquire(blocking=False):
            raise WorkbenchError(
                f"this {self.name!r} engine is busy with another generate or stream: finish or close that first."
            )
        self._stop_requested.clear()
        try:
            yield
        finally:
            self._lock.release()

    def _check_prompts(self, prompts: str | Sequence[str]) -> list[str]:
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise InvalidRequestError("the prompt list is empty: give at least one prompt.")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequestError(f"prompt {i} is a {type(text).__name__}, not a string.")
        return texts

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

    def _stream_text(self, ids: list[int], options: SamplingOptions) -> Iterator[str]:
        # Detokenize the whole answer each time: byte-level tokens can split a character.
        tokens = self._stream(ids, options)

        def texts() -> Iterator[str]:
            generated: list[int] = []
            for new in tokens:
                generated.extend(new)
                yield self.tokenizer.decode(generated, skip_special_tokens=True)

        try:
            with self._busy():
                yield from final_pieces(texts(), options.stop, lambda: self.stopping)
        finally:
            tokens.close()  # cancels the request in the engine when the stream ended early


def final_pieces(texts: Iterable[str], stop: tuple[str, ...], stopped: Callable[[], bool]) -> Iterator[str]:
    """Turn "the whole answer so far", after each update, into pieces of text that are final.

    A stop string can span updates and a multi-byte character can be cut in two, so text that could still turn out
    to be either is held back until it cannot; the answer ends before the first stop string. Once `stopped()` says
    so, nothing more is yielded.
    """
    hold = max((len(s) for s in stop), default=1) - 1
    sent = 0
    text = ""
    for text in texts:
        if stopped():
            return
        cut = first_stop(text, stop)
        if cut is not None:
            if cut > sent:
                yield text[sent:cut]
            return
        safe = len(text) - hold
        while safe > sent and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
            safe -= 1
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if len(text) > sent and not stopped():
        yield text[sent:]


def first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first of the stop strings begins in `text`, or None: an answer is cut there."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def finish_from_eos(token_ids: list[int], eos_ids: set[int], max_tokens: int) -> tuple[list[int], str]:
    """Cut a static-batch row after its first end-of-sequence token and say why it ended."""
    for i, tok in enumerate(token_ids):
        if tok in eos_ids:
            return token_ids[: i + 1], "stop"
    return token_ids, "length" if len(token_ids) >= max_tokens else "stop"
