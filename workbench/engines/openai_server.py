"""Any OpenAI-compatible server (vLLM, SGLang, trtllm-serve, llama.cpp's server, TGI's /v1), over HTTP.

Requests stream through the `openai` client. During `run`, a thread polls the server's Prometheus `/metrics` and
turns what it reports (requests running and waiting, KV cache usage, tokens generated, its process memory) into the
steps of a Trace, so the batching, memory and throughput views work against a server on another machine.

A server serves text: results carry the server's token counts (`usage`) and no token ids, and the request states in
a trace are seen from the client (waiting until the first token arrives), beside the server's own counts.
The API key is read from an environment variable when needed and kept nowhere else.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from workbench.engines.arrivals import RunClock
from workbench.engines.base import Engine, _first_stop, final_pieces
from workbench.engines.server_metrics import MetricsPoller, ServerSample, read_metrics
from workbench.errors import InvalidRequestError, UnsupportedOptionError, WorkbenchError
from workbench.memory import bytes_per_element
from workbench.trace import (BLOCK_FREE, BLOCK_USED, CacheFacts, MemorySnapshot, StepSnapshot, Trace,
                             TraceRecorder, TraceRequest)
from workbench.types import EngineInfo, GenerationResult, KVCacheMeasurement, RequestMetrics, SamplingOptions
from workbench.workload import Request, as_requests


@dataclass(frozen=True)
class ServedModel:
    """A model as a server names it (it need not exist on this machine)."""

    name: str
    path: Path | None = None
    max_model_len: int | None = None


@dataclass
class _Reply:
    text: str = ""
    chunk_times: list[float] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    token_ids: list[int] = field(default_factory=list)  # where the server sends them (TGI's native stream)


class OpenAIEngine(Engine):
    """A model served by an OpenAI-compatible server.

    >>> engine = wb.load("openai", url="http://127.0.0.1:8000/v1", model="smollm2-135m")      # doctest: +SKIP
    >>> engine.generate("What is the capital of France?", temperature=0)[0].text                # doctest: +SKIP
    'The capital of France is Paris.'
    """

    name = "openai"
    remote = True
    api_name = "OpenAI-compatible API"
    extra_options = ("url", "api_key_env", "timeout_s", "metrics_url", "poll_s")

    def __init__(self, model: str | None = None, dtype: str = "float32", max_model_len: int | None = None,
                 url: str = "http://127.0.0.1:8000/v1", api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 metrics_url: str | None = None, poll_s: float = 0.1, **unknown: Any) -> None:
        if unknown:
            accepted = ", ".join(("model", "dtype", "max_model_len", *self.extra_options))
            raise UnsupportedOptionError(f"engine {self.name!r} has no option {', '.join(sorted(unknown))}; "
                                         f"it accepts {accepted}.")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"url must start with http:// or https://, got {url!r}.")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise InvalidRequestError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
        self.url = url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        root = self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url
        self.metrics_url = metrics_url or f"{root}/metrics"
        self.poll_s = poll_s
        self.dtype = dtype
        self.options = {"url": self.url, "timeout_s": self.timeout_s}  # never the key
        self.tokenizer = None  # the server tokenizes; the base class's tokenizer and config are not loaded here
        self._requested_model = model
        self._requested_len = max_model_len
        self._open()

    # ---- connecting ------------------------------------------------------------------------------------------
    def _client(self, timeout_s: float | None = None):
        import openai

        key = os.environ.get(self.api_key_env) or "none"  # servers without a key accept any
        return openai.OpenAI(base_url=self.url, api_key=key, timeout=timeout_s or self.timeout_s, max_retries=0)

    def _load(self) -> None:
        name, server_len = self._connect()
        self.model = ServedModel(name, _local_folder(name), server_len)
        self.config = _local_config(self.model.path)
        # what the server says, else what the model's config allows (the server may have been started with less)
        self.max_model_len = (self._requested_len or server_len
                              or getattr(self.config, "max_position_embeddings", None) or 0)
        self.server_kind = "unknown"
        try:
            first = read_metrics(self.metrics_url, timeout_s=min(self.timeout_s, 10))
            self.server_kind = first.kind
            self._cache = (first.block_size, first.num_blocks)
        except WorkbenchError:
            self._cache = (0, 0)  # no /metrics: traces keep the client's view only

    def _connect(self) -> tuple[str, int | None]:
        """Check the server answers and serves the model: (its name for the model, its context length if known)."""
        try:
            served = list(self._client().models.list())
        except Exception as exc:  # noqa: BLE001 - every failure becomes one short message
            raise self._explain(exc, "listing the served models") from None
        names = [m.id for m in served]
        wanted = self._requested_model or (names[0] if len(names) == 1 else None)
        if wanted is None:
            listed = f"serves several models ({', '.join(names)})" if names else "lists no models"
            raise InvalidRequestError(f"the server {listed}: pass model= (the name the server knows it by).")
        if not names:  # servers that load models on demand (`transformers serve`) may list none
            return wanted, None
        if wanted not in names:
            raise InvalidRequestError(f"the server at {self.url} does not serve model {wanted!r}; "
                                      f"it serves: {', '.join(names) or 'nothing'}.")
        entry = next(m for m in served if m.id == wanted)
        return wanted, getattr(entry, "max_model_len", None) or (entry.model_extra or {}).get("max_model_len")

    def _explain(self, exc: BaseException, doing: str, midstream: bool = False) -> WorkbenchError:
        """One short message for what went wrong talking to the server."""
        import httpx
        import openai

        if isinstance(exc, WorkbenchError):
            return exc
        status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401 or isinstance(exc, openai.AuthenticationError):
            return WorkbenchError(f"the server at {self.url} refused the API key (401) while {doing}: put the key in "
                                  f"the environment variable {self.api_key_env} (or name another with api_key_env=).")
        if status == 404:
            detail = _server_message(exc)
            if "model" in detail.lower():
                return InvalidRequestError(f"the server does not serve that model: {detail}")
            return WorkbenchError(f"no {self.api_name} at {self.url} (404 while {doing}): check the URL"
                                  f"{'; it usually ends in /v1' if self.api_name.startswith('OpenAI') else ''}.")
        if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException)):
            return WorkbenchError(f"the server at {self.url} did not answer within {self.timeout_s:g} s while {doing}"
                                  f": raise timeout_s= or ask for fewer tokens.")
        if midstream and isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
            return WorkbenchError(f"the server at {self.url} cut the stream off while {doing} ({_root_cause(exc)}): "
                                  f"the answer is incomplete; check the server.")
        if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
            return WorkbenchError(f"cannot reach a server at {self.url} while {doing}: is it running, and is the "
                                  f"URL right? ({_root_cause(exc)})")
        if status is not None:
            return InvalidRequestError(f"the server refused the request ({status}) while {doing}: "
                                       f"{_server_message(exc)}")
        return WorkbenchError(f"talking to {self.url} failed while {doing}: {_root_cause(exc)}")

    # ---- facts -----------------------------------------------------------------------------------------------
    def _info(self) -> EngineInfo:
        params = _count_parameters(self.model.path)
        return EngineInfo(self.name, f"{self.server_kind} server", self.url, self.dtype, self.model.name,
                          str(self.model.path or ""), params, params * bytes_per_element(self.dtype),
                          self.max_model_len, dict(self.options))

    def _kv_bytes_per_token(self) -> int:
        return super()._kv_bytes_per_token() if self.config is not None else 0

    def _cache_facts(self) -> CacheFacts:
        block_size, num_blocks = self._cache
        per_token = self._kv_bytes_per_token()
        layers, kv_heads, head_dim = self._kv_shape()[:3] if self.config is not None else (0, 0, 0)
        return CacheFacts(True, block_size or 1, num_blocks, per_token * (block_size or 1), layers, kv_heads,
                          head_dim, self.dtype, self.info.weight_bytes, self.max_model_len)

    def _measure_kv_cache(self) -> KVCacheMeasurement:
        raise WorkbenchError("a server's KV tensors live in its own process: they cannot be measured from here "
                             "(its /metrics reports the cache's usage; see a run's trace).")

    def _release(self) -> None:
        pass  # the server keeps running: it is not ours to stop

    def _stream(self, prompt, options):  # pragma: no cover - the public methods below serve text
        raise NotImplementedError

    def _run(self, prompts, options, arrivals, recorder):  # pragma: no cover
        raise NotImplementedError

    # ---- serving ---------------------------------------------------------------------------------------------
    def _request(self, prompt: str, options: SamplingOptions, chat: bool, system: str | None = None,
                 timeout_s: float | None = None):
        """Open a streaming request; the returned stream yields the server's chunks."""
        kwargs = self._request_options(options)
        client = self._client(timeout_s)
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user",
                                                                                       "content": prompt}]
            return client.chat.completions.create(messages=messages, **kwargs)
        return client.completions.create(prompt=(system + "\n" if system else "") + prompt, **kwargs)

    def _check_options(self, options: SamplingOptions, chat: bool) -> None:
        """Refuse, before anything is sent, what this server cannot do (a plain OpenAI server takes everything)."""

    def _request_options(self, options: SamplingOptions) -> dict[str, Any]:
        """The request's fields besides the prompt, as the OpenAI API names them."""
        kwargs: dict[str, Any] = {"model": self.model.name, "stream": True, "max_tokens": options.max_tokens,
                                  "temperature": options.temperature, "top_p": options.top_p,
                                  "stream_options": {"include_usage": True}}
        if options.seed is not None:
            kwargs["seed"] = options.seed
        if options.stop:
            kwargs["stop"] = list(options.stop)
        extra = {}  # vLLM's and SGLang's extensions, sent only when asked for (plain OpenAI refuses them)
        if options.top_k:
            extra["top_k"] = options.top_k
        if options.ignore_eos:
            extra["ignore_eos"] = True
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    def _pieces(self, prompt: str, options: SamplingOptions, chat: bool, system: str | None, reply: _Reply,
                start: float) -> Iterator[str]:
        """Stream one request: yield text pieces, fill `reply` with timings, counts and the finish reason."""
        reply.chunk_times = []
        try:
            for piece in self._chunks(prompt, options, chat, system, reply):
                if piece:
                    reply.chunk_times.append(time.perf_counter() - start)
                    reply.text += piece
                    yield piece
                if self.stopping:
                    reply.finish_reason = "abort"
                    return
        except WorkbenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes one short message
            doing = f"streaming an answer ({len(reply.chunk_times)} pieces received)" if reply.chunk_times else \
                "sending a request"
            raise self._explain(exc, doing, midstream=bool(reply.chunk_times)) from None

    def _chunks(self, prompt: str, options: SamplingOptions, chat: bool, system: str | None,
                reply: _Reply) -> Iterator[str]:
        """The server's stream for one request as text pieces; counts and the finish reason go into `reply`.
        Closing it closes the connection, which makes the server abort the request."""
        stream = self._request(prompt, options, chat, system)
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    reply.prompt_tokens = chunk.usage.prompt_tokens
                    reply.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    yield choice.delta.content if chat else choice.text
                    if choice.finish_reason:
                        reply.finish_reason = "length" if choice.finish_reason == "length" else "stop"
        finally:
            stream.close()

    def _finish(self, prompt: str, reply: _Reply, stop: tuple[str, ...], total: float) -> GenerationResult:
        text, finish = reply.text, reply.finish_reason
        cut = _first_stop(text, stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        times = reply.chunk_times or []
        latencies = [t - prev for prev, t in zip([0.0, *times[:-1]], times)]
        generated = reply.completion_tokens or len(times)
        metrics = RequestMetrics(reply.prompt_tokens, generated, times[0] if times else total, latencies,
                                 times[-1] if times else total)
        return GenerationResult(prompt, text, list(reply.token_ids), finish, metrics)

    def generate(self, prompts: str | Sequence[str], max_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, chat: bool = True) -> list[GenerationResult]:
        """Generate a completion for each prompt, all sent at once; one result per prompt, in order."""
        self._check_open()
        texts = self._check_prompts(prompts)
        options = SamplingOptions(max_tokens, temperature, top_p, top_k, seed, stop)
        trace = self.run([Request(t, max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                  stop=options.stop, chat=chat) for t in texts], record=False)
        return trace.results

    def stream(self, prompt: str, max_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: str | Sequence[str] | None = None,
               chat: bool = True) -> Iterator[str]:
        """Yield the answer's text in pieces as the server sends them."""
        self._check_open()
        (text,) = self._check_prompts([prompt])
        options = SamplingOptions(max_tokens, temperature, top_p, top_k, seed, stop)
        self._check_options(options, chat)
        return self._stream_pieces(text, options, chat)

    def _stream_pieces(self, text: str, options: SamplingOptions, chat: bool) -> Iterator[str]:
        reply = _Reply()
        pieces = self._pieces(text, options, chat, None, reply, time.perf_counter())
        try:
            with self._busy():
                yield from final_pieces((reply.text for _ in pieces), options.stop, lambda: self.stopping)
        finally:
            pieces.close()  # closes the connection when the stream ended early: the server aborts the request

    def run(self, requests: Sequence[Request | str], record: bool = True,
            on_step: Callable[[StepSnapshot], None] | None = None,
            on_tokens: Callable[[int, list[int]], None] | None = None,
            on_start: Callable[[Trace], None] | None = None) -> Trace:
        """Send `requests` as they arrive, each streaming on its own connection, while a thread polls the server's
        /metrics into the trace's steps. `on_tokens` is not called: a server sends text, not token ids."""
        self._check_open()
        items = as_requests(requests)
        if not items:
            raise InvalidRequestError("the request list is empty: give at least one request.")
        options = [SamplingOptions(r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.stop, r.ignore_eos)
                   for r in items]
        for request, option in zip(items, options):
            self._check_options(option, request.chat)
        trace = Trace(self.name, self.model.name, self.cache_facts,
                      [TraceRequest(f"r{i}", 0, o.max_tokens, float(r.arrival_s))
                       for i, (r, o) in enumerate(zip(items, options))])
        recorder = TraceRecorder(trace, record, on_step)
        replies = [_Reply() for _ in items]
        if on_start is not None:
            on_start(trace)
        with self._busy():
            clock = RunClock([float(r.arrival_s) for r in items], self._stop_requested)
            watcher = _ClientView(recorder, replies, clock) if recorder.wanted else None
            poller = MetricsPoller(self.metrics_url, self.poll_s, watcher.step) if watcher else None
            failures: list[BaseException] = []

            def serve(i: int) -> None:
                request = items[i]
                wait = request.arrival_s - clock.now()
                if wait > 0 and self._stop_requested.wait(wait):
                    replies[i].finish_reason = "abort"
                    return
                if watcher is not None:
                    watcher.sent(i)
                try:
                    start = clock.start + request.arrival_s
                    for _ in self._pieces(request.prompt, options[i], request.chat, request.system, replies[i], start):
                        pass
                except WorkbenchError as exc:
                    failures.append(exc)
                    self._stop_requested.set()  # one failed request ends the run: report it, keep the engine
                finally:
                    if watcher is not None:
                        watcher.done(i)

            if poller is not None:
                poller.start()
            try:
                with ThreadPoolExecutor(max_workers=min(64, len(items)), thread_name_prefix="workbench-openai") as pool:
                    list(pool.map(serve, range(len(items))))
            finally:
                if poller is not None:
                    poller.stop()
                    watcher.step(poller.last)  # the state after the last answer
        if failures:
            raise failures[0]
        for i, (request, reply) in enumerate(zip(items, replies)):
            trace.results.append(self._finish(request.prompt, reply, options[i].stop, 0.0))
            trace.requests[i] = replace(trace.requests[i], prompt_tokens=reply.prompt_tokens)
        if poller is not None:
            trace.engine_counters = poller.totals_since_start()
        return trace


class _ClientView:
    """Each poll of /metrics becomes one step: the requests as the client sees them, beside the server's counts."""

    def __init__(self, recorder: TraceRecorder, replies: list[_Reply], clock: RunClock) -> None:
        self.recorder, self.replies, self.clock = recorder, replies, clock
        self.in_flight: set[int] = set()
        self.finished: set[int] = set()
        self.peak_rss = 0
        self.step_index = 0
        self.lock = threading.Lock()

    def sent(self, i: int) -> None:
        with self.lock:
            self.in_flight.add(i)

    def done(self, i: int) -> None:
        with self.lock:
            self.in_flight.discard(i)
            self.finished.add(i)

    def step(self, sample: ServerSample | None) -> None:
        facts = self.recorder.trace.facts
        with self.lock:
            snaps = self.recorder.seen_from_client(self.in_flight | self.finished, self.finished,
                                                   lambda i: len(self.replies[i].chunk_times or []))
        counters, blocks, memory = {}, "", MemorySnapshot(facts.weight_bytes, 0, 0, 0, 0)
        if sample is not None:
            counters = sample.counters()
            used = round(sample.kv_usage * facts.num_blocks)
            blocks = BLOCK_USED * used + BLOCK_FREE * (facts.num_blocks - used)
            reserved = facts.num_blocks * facts.bytes_per_block
            self.peak_rss = max(self.peak_rss, sample.rss_bytes)
            memory = MemorySnapshot(facts.weight_bytes, reserved, round(sample.kv_usage * reserved),
                                    sample.rss_bytes, self.peak_rss)
        self.recorder.add(StepSnapshot(self.step_index, self.clock.now(), tuple(snaps), blocks, memory, counters))
        self.step_index += 1


def _local_folder(name: str) -> Path | None:
    """The served model's folder on this machine when the name is a workbench alias or a folder here (for its
    config); a hub id is not fetched: the weights are the server's business."""
    from workbench.models import list_models, resolve_model

    if name not in list_models() and not Path(name).is_dir():
        return None
    try:
        return resolve_model(name).path
    except WorkbenchError:
        return None


def _count_parameters(path: Path | None) -> int:
    if path is None:
        return 0  # the weights are only on the server
    from workbench.models import count_parameters

    return count_parameters(path)


def _local_config(path: Path | None):
    if path is None:
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _server_message(exc: BaseException) -> str:
    """The server's own words from an error response (`{"message": ...}` or `{"error": {"message": ...}}`)."""
    body = getattr(exc, "body", None)
    if body is None and getattr(exc, "response", None) is not None:  # an httpx error: read the JSON body
        try:
            body = exc.response.json()
        except Exception:  # noqa: BLE001 - not JSON: use the text
            return exc.response.text[:200]
    if isinstance(body, dict):
        inner = body.get("error")
        message = inner.get("message") if isinstance(inner, dict) else body.get("message") or body.get("detail")
        if message:
            return str(message)
    return str(getattr(exc, "message", exc))


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
