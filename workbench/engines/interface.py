"""The public engine API, the same for an engine in this process and for a server reached over HTTP.

Everything a user can get wrong (prompts, sampling arguments, a run's load) is checked here once, and every engine
answers with the types of `workbench.types` and a `Trace`. How it serves is its own: `LocalEngine` drives an engine
in this process through the one run loop, `OpenAIEngine` streams from a server.
"""

from __future__ import annotations

import gc
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

from workbench.errors import InvalidRequestError, WorkbenchError
from workbench.kv_sizes import kv_bytes_per_token, kv_shape
from workbench.trace import CacheFacts, StepSnapshot, Trace
from workbench.types import (
    CompileFacts,
    EngineInfo,
    GenerationResult,
    KVCacheMeasurement,
    OffloadFacts,
    RankFacts,
    SamplingOptions,
    TokenScores,
)
from workbench.workload import Request, arrival_times, as_requests, with_arrivals


class Engine(ABC):
    """A loaded model in one inference engine.

    >>> import workbench as wb
    >>> with wb.load("transformers", model="smollm2-135m") as engine:      # doctest: +SKIP
    ...     print(engine.generate(["What is the capital of France?"], max_tokens=16, temperature=0)[0].text)
    The capital of France is Paris.
    """

    #: the name `workbench.load` knows the engine by (set by the registry, the one place it is written)
    name: str = ""
    #: engine options this engine accepts besides `dtype` and `max_model_len`
    extra_options: tuple[str, ...] = ()
    #: a server reached over HTTP: `workbench.load` passes the model's name as the server knows it
    remote: bool = False
    config: Any = None
    dtype: str = "float32"
    max_model_len: int = 0

    def _open(self, load: bool = True) -> None:
        """Set up the state every engine shares, then (with `load`) load the engine and time it."""
        self._closed = False
        # One request at a time per engine object: a local engine is driven from the calling thread.
        self._lock = threading.Lock()
        # Set by `stop()` from another thread; looked at once per engine step.
        self._stop_requested = threading.Event()
        self._loaded = False
        #: seconds the engine's own load took (weights, cache, warm-up; a server: connecting to it)
        self.load_seconds = 0.0
        if load:
            self._ensure_loaded()

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            start = time.perf_counter()
            self._load()
            self.load_seconds = time.perf_counter() - start
            self._loaded = True

    # ---- what every engine supplies ----------------------------------------------------------------------------
    @abstractmethod
    def _load(self) -> None:
        """Load the model into the engine, or connect to the server (called once, from the constructor)."""

    @abstractmethod
    def _info(self) -> EngineInfo:
        """Static facts about the loaded engine."""

    @abstractmethod
    def _cache_facts(self) -> CacheFacts:
        """How this engine lays out its KV cache."""

    def _measure_kv_cache(self) -> KVCacheMeasurement:
        raise WorkbenchError(f"the {self.name!r} engine cannot measure its KV cache tensors.")

    def _release(self) -> None:  # noqa: B027 - an engine with nothing to release keeps this
        """Free the engine's memory (called once, from close)."""

    def generate(self, prompts: str | Sequence[str], max_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, chat: bool = True) -> list[GenerationResult]:
        """Generate a completion for each prompt; one result per prompt, in order.

        `chat=True` wraps each prompt as a user message in the model's chat template. `temperature=0` is greedy.

        >>> engine.generate(["What is the capital of France?"], max_tokens=16, temperature=0)[0].text  # doctest: +SKIP
        'The capital of France is Paris.'
        """
        self._check_open()
        texts = self._check_prompts(prompts)
        return self._generate(texts, SamplingOptions(max_tokens, temperature, top_p, top_k, seed, stop), chat)

    def stream(self, prompt: str, max_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None,
               chat: bool = True) -> Iterator[str]:
        """Yield the answer's text in pieces as the engine produces them.

        >>> for piece in engine.stream("Tell me a joke", max_tokens=32):      # doctest: +SKIP
        ...     print(piece, end="", flush=True)
        """
        self._check_open()
        (text,) = self._check_prompts([prompt])
        return self._stream(text, SamplingOptions(max_tokens, temperature, top_p, top_k, seed, stop), chat)

    @abstractmethod
    def _generate(self, texts: list[str], options: SamplingOptions, chat: bool) -> list[GenerationResult]:
        """Serve these checked prompts, all at once, with one set of options."""

    @abstractmethod
    def _stream(self, text: str, options: SamplingOptions, chat: bool) -> Iterator[str]:
        """The pieces of one checked prompt's answer, as `final_pieces` makes them; closing it aborts the request."""

    @abstractmethod
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
        request i's new token ids as they come; `record=False` keeps no snapshots. Results are in `trace.results`,
        in request order; after `stop()` the unfinished ones end with finish_reason "abort".

        >>> from workbench.workload import make_workload
        >>> trace = engine.run(make_workload(n=8, shared_prefix_tokens=64, rate=4.0))      # doctest: +SKIP
        >>> trace = engine.run(make_workload(n=32), max_concurrency=4)                      # doctest: +SKIP
        """

    # ---- facts -------------------------------------------------------------------------------------------------
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
        2 (K and V) x layers x KV heads x head dim x bytes per element (0 when the config is not at hand).

        >>> engine.kv_bytes_per_token      # SmolLM2-135M in float32: 2 * 30 * 3 * 64 * 4      # doctest: +SKIP
        46080
        """
        return kv_bytes_per_token(self.config, self.dtype) if self.config is not None else 0

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

    def score(self, text: str | Sequence[int]) -> TokenScores:
        """Run `text` (plain, no chat template; or token ids) through the model once, teacher-forced: the
        log-probability of each next token and the token the model ranked first there. Perplexity, and comparing
        two precisions of one model position by position, start from it.

        >>> engine.score("The quick brown fox jumps over the lazy dog.").perplexity      # doctest: +SKIP
        """
        self._check_open()
        if isinstance(text, str) and not text.strip():
            raise InvalidRequestError("score() needs a text of two tokens or more: it was empty.")
        with self._busy():
            return self._score(text)

    def _score(self, text: str | Sequence[int]) -> TokenScores:
        raise WorkbenchError(f"the {self.name!r} engine does not score texts: the transformers and vllm engines do.")

    def ranks(self) -> list[RankFacts]:
        """What each rank of the engine holds (one rank when it does not split the model): its bytes of weights,
        its decoder layers, its KV cache, its first layer's projections as it holds them, and the communication
        calls and forward passes it has made since loading (take both around a call: calls per forward pass).

        >>> [(r.rank, r.layers) for r in engine.ranks()]      # vllm, pipeline_parallel_size=2      # doctest: +SKIP
        [(0, (0, 15)), (1, (15, 30))]
        """
        self._check_open()
        with self._busy():
            return self._ranks()

    def _ranks(self) -> list[RankFacts]:
        raise WorkbenchError(f"the {self.name!r} engine does not say what its ranks hold: the vllm and deepspeed "
                             f"engines do.")

    def compilation(self) -> CompileFacts:
        """What the engine's compiler did at load, from its own counters: graphs captured, graph breaks, kernels
        generated and IR nodes before fusion, compile seconds ("eager" and zeros where nothing was compiled).

        >>> wb.load("transformers", compile="layers").compilation().kernels      # doctest: +SKIP
        144
        """
        self._check_open()
        with self._busy():
            return self._compilation()

    def _compilation(self) -> CompileFacts:
        raise WorkbenchError(f"the {self.name!r} engine does not report compilation: the transformers engine "
                             f"(its compile option) and vllm (enforce_eager=False) do.")

    def offload(self) -> OffloadFacts:
        """Where the weights are placed under the engine's memory budget (`max_memory`), and the most of them
        resident at once during the forward passes since loading, measured on the model's tensors.

        >>> e = wb.load("transformers", max_memory="200MiB")  # layers past 200 MiB wait on disk   # doctest: +SKIP
        >>> e.generate("Hello", max_tokens=8); e.offload().resident_peak_bytes < 200 * 2**20       # doctest: +SKIP
        True
        """
        self._check_open()
        with self._busy():
            return self._offload()

    def _offload(self) -> OffloadFacts:
        raise WorkbenchError(f"the {self.name!r} engine does not offload its weights: the transformers engine does "
                             f"(its max_memory, device_map and offload_folder options).")

    def _layout(self, paged: bool, block_size: int, num_blocks: int) -> CacheFacts:
        """The cache facts of this model in this engine, for a cache of `num_blocks` blocks of `block_size` tokens."""
        layers, kv_heads, head_dim = kv_shape(self.config, self.dtype)[:3] if self.config is not None else (0, 0, 0)
        return CacheFacts(paged, block_size, num_blocks, self.kv_bytes_per_token * block_size, layers, kv_heads,
                          head_dim, self.info.dtype, self.info.weight_bytes, self.max_model_len)

    # ---- stopping and closing ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Abort what the engine is serving now (a `generate`, `run` or `stream` in another thread) at its next step.

        Requests not finished end with finish_reason "abort"; the engine stays usable.
        A call while nothing runs does nothing.

        >>> threading.Timer(2.0, engine.stop).start(); trace = engine.run(long_workload)      # doctest: +SKIP
        """
        self._stop_requested.set()

    @property
    def stopping(self) -> bool:
        """Whether `stop()` was called during the current request."""
        return self._stop_requested.is_set()

    def close(self) -> None:
        """Free the engine's memory. The engine cannot be used afterwards; load a new one."""
        if not self._closed:
            self._closed = True
            self._release()
            gc.collect()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"model={self.model.name!r}, dtype={self.dtype!r}"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    # ---- shared checks -----------------------------------------------------------------------------------------
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

    @staticmethod
    def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise InvalidRequestError("the prompt list is empty: give at least one prompt.")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequestError(f"prompt {i} is a {type(text).__name__}, not a string.")
        return texts

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
