"""Any OpenAI-compatible server (vLLM, SGLang, trtllm-serve, llama.cpp's server, TGI's /v1), over HTTP, one or several
replicas of it.

Every request streams from one asyncio event loop in its own thread (`http_streams`): a request is stamped when its
body has been written to the socket and each chunk of its answer when its bytes are read, so its time to first
token, inter-token latency and end-to-end latency are what vLLM's `bench serve` would read. During `run`, a thread
polls each server's Prometheus `/metrics` and turns what it reports (requests running and waiting, KV cache usage,
tokens generated, its process memory) into the steps of a Trace, and the run's growth of the server's own latency
histograms into `trace.engine_counters`.

A server serves text: results carry the server's token counts (`usage`) and no token ids, and the request states in
a trace are seen from the client (waiting until the first chunk arrives), beside the server's own counts.
The API key is read from an environment variable when needed and kept nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from workbench.engines.http_streams import HTTPStatusError, Stamps, StreamClient, get_json, server_sent_events
from workbench.engines.interface import Engine, final_pieces, first_stop
from workbench.engines.server_metrics import MetricsPoller, ServerSample, read_metrics
from workbench.errors import InvalidRequestError, UnsupportedOptionError, WorkbenchError
from workbench.kv_sizes import bytes_per_element, kv_shape
from workbench.trace import (
    BLOCK_FREE,
    BLOCK_USED,
    CacheFacts,
    MemorySnapshot,
    StepSnapshot,
    Trace,
    TraceRecorder,
    TraceRequest,
)
from workbench.types import EngineInfo, GenerationResult, KVCacheMeasurement, RequestMetrics, SamplingOptions
from workbench.workload import Request


@dataclass(frozen=True)
class ServedModel:
    """A model as a server names it (it need not exist on this machine)."""

    name: str
    path: Path | None = None
    max_model_len: int | None = None


@dataclass
class Replica:
    """One server of the model: the URL of its API, that of its /metrics, and whether it answered in this run."""

    url: str
    metrics_url: str
    up: bool = True


@dataclass
class _Reply:
    """One request's answer as it streams in; times are `time.perf_counter()` readings."""

    text: str = ""
    sent: float | None = None  # when its body had been written to the socket
    chunk_times: list[float] = field(default_factory=list)  # when each chunk carrying output arrived
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # None until the stream ends: a request that never ran was aborted
    token_ids: list[int] = field(default_factory=list)  # where the server sends them (TGI's native stream)
    error: WorkbenchError | None = None
    replica: int = 0


class OpenAIEngine(Engine):
    """A model served by an OpenAI-compatible server, or by several replicas of it (requests go round robin).

    >>> engine = wb.load("openai", url="http://127.0.0.1:8000/v1", model="smollm2-135m")      # doctest: +SKIP
    >>> engine.generate("What is the capital of France?", temperature=0)[0].text                # doctest: +SKIP
    'The capital of France is Paris.'
    >>> wb.load("openai", url=["http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1"])        # doctest: +SKIP
    """

    remote = True
    api_name = "OpenAI-compatible API"
    extra_options = ("url", "api_key_env", "timeout_s", "metrics_url", "poll_s")

    def __init__(self, model: str | None = None, dtype: str = "float32", max_model_len: int | None = None,
                 url: str | Sequence[str] = "http://127.0.0.1:8000/v1", api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, metrics_url: str | Sequence[str] | None = None, poll_s: float = 0.1,
                 **unknown: Any) -> None:
        if unknown:
            accepted = ", ".join(("model", "dtype", "max_model_len", *self.extra_options))
            raise UnsupportedOptionError(f"engine {self.name!r} has no option {', '.join(sorted(unknown))}; "
                                         f"it accepts {accepted}.")
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise InvalidRequestError("url is an empty list: give the URL of at least one server.")
        for u in urls:
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise InvalidRequestError(f"url must start with http:// or https://, got {u!r}.")
        metrics = [metrics_url] if isinstance(metrics_url, str) or metrics_url is None else list(metrics_url)
        if metrics_url is not None and len(metrics) != len(urls):
            raise InvalidRequestError(f"metrics_url names {len(metrics)} URLs for {len(urls)} servers: give one "
                                      f"per server, or none.")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise InvalidRequestError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
        urls = [self._api_url(u.rstrip("/")) for u in urls]
        self.replicas = [Replica(u, m or f"{self._root(u)}/metrics")
                         for u, m in zip(urls, metrics * len(urls) if metrics_url is None else metrics)]
        self.url = urls[0]
        self.metrics_url = self.replicas[0].metrics_url
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.poll_s = poll_s
        self.dtype = dtype
        self.options = {"url": urls if len(urls) > 1 else urls[0], "timeout_s": self.timeout_s}  # never the key
        self.tokenizer = None  # the server tokenizes
        self.model = ServedModel(model or "")  # until the server says what it serves
        self._requested_model = model
        self._requested_len = max_model_len
        self._tasks: list[asyncio.Task] = []
        self._next_replica = 0
        self._http: StreamClient | None = None
        self._open(load=False)  # no network in the constructor: `connect()`, or the first use, connects

    def connect(self) -> None:
        """Check the server answers and serves the model, and read what it says about it; done once, on first use
        (`workbench.load` does it at once, so a wrong URL is an error there)."""
        self._ensure_loaded()

    def _check_open(self) -> None:
        super()._check_open()
        self._ensure_loaded()

    @staticmethod
    def _api_url(url: str) -> str:
        """The URL requests are sent under (the OpenAI API's root, ending in /v1)."""
        return url

    @staticmethod
    def _root(url: str) -> str:
        return url[: -len("/v1")] if url.endswith("/v1") else url

    def _openai_root(self, replica: Replica) -> str:
        """Where the replica's OpenAI API lives (its chat and completions endpoints are below it)."""
        return replica.url

    # ---- connecting ------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _load(self) -> None:
        self._http = StreamClient(self.timeout_s)
        try:
            served = [self._connect(replica) for replica in self.replicas]
        except BaseException:
            self._http.close()
            self._http = None
            raise
        names = sorted({name for name, _ in served})
        if len(names) > 1:
            raise InvalidRequestError(f"the servers serve different models ({', '.join(names)}): replicas must "
                                      f"serve the same one.")
        name, server_len = served[0]
        self.model = ServedModel(name, _local_folder(name), server_len)
        self.config = _local_config(self.model.path)
        # what the server says, else what the model's config allows (the server may have been started with less)
        self.max_model_len = (self._requested_len or server_len
                              or getattr(self.config, "max_position_embeddings", None) or 0)
        self.server_kind = "unknown"
        self._cache = []
        for replica in self.replicas:
            try:
                first = read_metrics(replica.metrics_url, timeout_s=min(self.timeout_s, 10))
                self.server_kind = first.kind if self.server_kind == "unknown" else self.server_kind
                self._cache.append((first.block_size, first.num_blocks))
            except WorkbenchError:
                self._cache.append((0, 0))  # no /metrics: traces keep the client's view only

    def _get_json(self, url: str, doing: str) -> Any:
        try:
            return self._http.call(get_json(self._http.http, url, self._headers()))
        except Exception as exc:  # noqa: BLE001 - every failure becomes one short message
            raise self._explain(exc, doing, url=url) from None

    def _connect(self, replica: Replica) -> tuple[str, int | None]:
        """Check the server answers and serves the model: (its name for the model, its context length if known)."""
        served = self._get_json(f"{replica.url}/models", "listing the served models").get("data") or []
        names = [m.get("id") for m in served]
        wanted = self._requested_model or (names[0] if len(names) == 1 else None)
        if wanted is None:
            listed = f"serves several models ({', '.join(names)})" if names else "lists no models"
            raise InvalidRequestError(f"the server {listed}: pass model= (the name the server knows it by).")
        if not names:  # servers that load models on demand (`transformers serve`) may list none
            return wanted, None
        if wanted not in names:
            raise InvalidRequestError(f"the server at {replica.url} does not serve model {wanted!r}; "
                                      f"it serves: {', '.join(names) or 'nothing'}.")
        return wanted, next(m for m in served if m.get("id") == wanted).get("max_model_len")

    def _explain(self, exc: BaseException, doing: str, midstream: bool = False, url: str | None = None
                 ) -> WorkbenchError:
        """One short message for what went wrong talking to the server at `url`."""
        import aiohttp

        url = url or self.url
        if isinstance(exc, WorkbenchError):
            return exc
        status = exc.status if isinstance(exc, HTTPStatusError) else None
        if status == 401:
            return WorkbenchError(f"the server at {url} refused the API key (401) while {doing}: put the key in "
                                  f"the environment variable {self.api_key_env} (or name another with api_key_env=).")
        if status == 404:
            detail = _message_of(exc.body)
            if "model" in detail.lower():
                return InvalidRequestError(f"the server does not serve that model: {detail}")
            return WorkbenchError(f"no {self.api_name} at {url} (404 while {doing}): check the URL"
                                  f"{'; it usually ends in /v1' if self.api_name.startswith('OpenAI') else ''}.")
        if status is not None:
            return InvalidRequestError(f"the server refused the request ({status}) while {doing}: "
                                       f"{_message_of(exc.body)}")
        if isinstance(exc, asyncio.TimeoutError):
            return WorkbenchError(f"the server at {url} did not answer within {self.timeout_s:g} s while {doing}"
                                  f": raise timeout_s= or ask for fewer tokens.")
        if _cut_off(exc) and midstream:
            return WorkbenchError(f"the server at {url} cut the stream off while {doing} ({_root_cause(exc)}): "
                                  f"the answer is incomplete; check the server.")
        if isinstance(exc, (aiohttp.ClientError, OSError)):
            return WorkbenchError(f"cannot reach a server at {url} while {doing}: is it running, and is the "
                                  f"URL right? ({_root_cause(exc)})")
        return WorkbenchError(f"talking to {url} failed while {doing}: {_root_cause(exc)}")

    # ---- facts -----------------------------------------------------------------------------------------------
    def _info(self) -> EngineInfo:
        params = _count_parameters(self.model.path)
        device = ", ".join(r.url for r in self.replicas)
        return EngineInfo(self.name, f"{self.server_kind} server", device, self.dtype, self.model.name,
                          str(self.model.path or ""), params, params * bytes_per_element(self.dtype),
                          self.max_model_len, dict(self.options))

    def _cache_facts(self) -> CacheFacts:
        """The servers' KV caches laid end to end: one block map holds every replica's pool."""
        block_size = next((size for size, _ in self._cache if size), 0)
        num_blocks = sum(blocks for _, blocks in self._cache)
        per_token = self.kv_bytes_per_token
        layers, kv_heads, head_dim = kv_shape(self.config, self.dtype)[:3] if self.config is not None else (0, 0, 0)
        return CacheFacts(True, block_size or 1, num_blocks, per_token * (block_size or 1), layers, kv_heads,
                          head_dim, self.dtype, self.info.weight_bytes, self.max_model_len)

    def _measure_kv_cache(self) -> KVCacheMeasurement:
        raise WorkbenchError("a server's KV tensors live in its own process: they cannot be measured from here "
                             "(its /metrics reports the cache's usage; see a run's trace).")

    def _release(self) -> None:
        if self._http is not None:  # the server keeps running: it is not ours to stop
            self._http.close()

    # ---- one request -----------------------------------------------------------------------------------------
    def _check_options(self, options: SamplingOptions, chat: bool) -> None:
        """Refuse, before anything is sent, what this server cannot do (a plain OpenAI server takes everything)."""

    def _request_options(self, options: SamplingOptions) -> dict[str, Any]:
        """The request's fields besides the prompt, as the OpenAI API names them."""
        body: dict[str, Any] = {"model": self.model.name, "stream": True, "max_tokens": options.max_tokens,
                                "temperature": options.temperature, "top_p": options.top_p,
                                "stream_options": {"include_usage": True}}
        if options.seed is not None:
            body["seed"] = options.seed
        if options.stop:
            body["stop"] = list(options.stop)
        # vLLM's and SGLang's extensions, sent only when asked for (plain OpenAI refuses them)
        if options.top_k:
            body["top_k"] = options.top_k
        if options.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def _chunks(self, replica: Replica, prompt: str | Sequence[int], options: SamplingOptions, chat: bool,
                      system: str | None, reply: _Reply) -> AsyncIterator[str]:
        """The server's stream for one request as text pieces, each with its arrival in `reply.chunk_times`;
        counts and the finish reason go into `reply`."""
        body = self._request_options(options)
        if chat:
            messages = [{"role": "system", "content": system}] if system else []
            body["messages"] = [*messages, {"role": "user", "content": prompt}]
            path = "/chat/completions"
        else:
            body["prompt"] = list(prompt) if not isinstance(prompt, str) else (system + "\n" if system else "") + prompt
            path = "/completions"
        stamps = Stamps()
        url = self._openai_root(replica) + path
        async for now, data in server_sent_events(self._http.http, url, body, self._headers(), stamps):
            reply.sent = stamps.sent
            event = json.loads(data)
            if "error" in event:
                raise InvalidRequestError(f"the server stopped the request: {_message_of(event['error'])}")
            usage = event.get("usage")
            if usage:
                reply.prompt_tokens = usage.get("prompt_tokens") or reply.prompt_tokens
                reply.completion_tokens = usage.get("completion_tokens") or reply.completion_tokens
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if piece:  # a chunk of output; the role-only first chunk and a bare finish chunk carry none
                    reply.chunk_times.append(now)
                    yield piece
                if choice.get("finish_reason"):
                    reply.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"

    async def _send(self, i: int, request: Request, options: SamplingOptions, reply: _Reply, scheduled: float,
                    slots: asyncio.Semaphore | None, watcher: _ClientView | None,
                    on_text: Callable[[str], None] | None = None) -> None:
        """Send request `i` at its scheduled time (a `perf_counter` reading), once a slot is free in a closed loop,
        to the next replica that is up; stream its answer into `reply`. Failures are kept in `reply.error`."""
        replica = None
        try:
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            async with slots or contextlib.nullcontext():
                if self.stopping:  # stop() came before this request's task could be cancelled
                    raise asyncio.CancelledError
                replica = self._pick_replica(reply)
                if watcher is not None:
                    watcher.sent(i)
                try:
                    async for piece in self._chunks(replica, request.prompt, options, request.chat, request.system,
                                                    reply):
                        reply.text += piece
                        if on_text is not None:
                            on_text(reply.text)
                finally:
                    if watcher is not None:
                        watcher.done(i)
            reply.finish_reason = reply.finish_reason or "stop"
        except asyncio.CancelledError:
            reply.finish_reason = "abort"
        except Exception as exc:  # noqa: BLE001 - kept, and told once the run is over
            doing = (f"streaming an answer ({len(reply.chunk_times)} pieces received)" if reply.chunk_times
                     else "sending a request")
            reply.error = self._explain(exc, doing, midstream=bool(reply.chunk_times),
                                        url=replica.url if replica else None)
            reply.finish_reason = "error"
            if replica is not None and _cut_off(exc):
                replica.up = False  # the rest of this run goes to the other replicas
            if isinstance(reply.error, InvalidRequestError) or not any(r.up for r in self.replicas):
                self._cancel_all()  # the request itself was refused, or no server is left: end the run

    def _check_replicas(self) -> None:
        """Ask each replica that stopped answering in an earlier run whether it is back; fail when none is up."""
        failure = None
        for replica in self.replicas:
            if not replica.up:
                try:
                    self._connect(replica)
                    replica.up = True
                except WorkbenchError as exc:
                    failure = exc
        if not any(r.up for r in self.replicas):
            raise failure

    def _pick_replica(self, reply: _Reply) -> Replica:
        """The next replica that is up, round robin."""
        for _ in range(len(self.replicas)):
            k = self._next_replica % len(self.replicas)
            self._next_replica += 1
            if self.replicas[k].up:
                reply.replica = k
                return self.replicas[k]
        raise WorkbenchError(f"no server is left to send to: {', '.join(r.url for r in self.replicas)} stopped "
                             f"answering during this run.")

    def _cancel_all(self) -> None:
        """Abort every request of the current run (in the client's loop): their connections close, and the server
        aborts them."""
        for task in self._tasks:
            task.cancel()

    # ---- serving ---------------------------------------------------------------------------------------------
    def _serve(self, items: list[Request], options: list[SamplingOptions], recorder: TraceRecorder,
               max_concurrency: int | None, watch: bool) -> tuple[list[_Reply], float, MetricsPoller | None]:
        """Send every request on its schedule from the client's loop and wait for all; polls /metrics meanwhile
        when `watch`. Returns the replies, the run's start (a perf_counter reading) and the poller."""
        replies = [_Reply() for _ in items]
        self._check_replicas()
        poller = MetricsPoller([r.metrics_url for r in self.replicas], self.poll_s) if watch else None
        if poller is not None:
            poller.start()  # before anything is sent: the counters' starting point
        start = time.perf_counter()
        watcher = _ClientView(recorder, replies, start, self._cache) if recorder.wanted else None
        if poller is not None and watcher is not None:
            poller.watch(watcher.step)

        async def serve_all() -> None:
            slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
            self._tasks = [asyncio.create_task(self._send(i, r, o, reply, start + r.arrival_s, slots, watcher))
                           for i, (r, o, reply) in enumerate(zip(items, options, replies))]
            await asyncio.wait(self._tasks)

        try:
            self._wait(self._http.submit(serve_all()))
        finally:
            self._tasks = []
            if poller is not None:
                poller.stop()
                if watcher is not None:
                    watcher.step(poller.last)  # the state after the last answer
        return replies, start, poller

    def _wait(self, future) -> None:
        """Wait for the client's loop; an interrupt (Ctrl-C, a notebook's stop button) aborts the requests first."""
        try:
            future.result()
        except BaseException:
            self._http.loop.call_soon_threadsafe(self._cancel_all)
            with contextlib.suppress(BaseException):
                future.result(timeout=30)
            raise

    def stop(self) -> None:
        """Abort what the engine is serving now: open streams are closed (the server aborts those requests) and
        requests not sent yet are not sent. Their results end with finish_reason "abort"."""
        super().stop()
        if not self._closed and self._http is not None:
            self._http.loop.call_soon_threadsafe(self._cancel_all)

    def run(self, requests: Sequence[Request | str], record: bool = True,
            on_step: Callable[[StepSnapshot], None] | None = None,
            on_tokens: Callable[[int, list[int]], None] | None = None,
            on_start: Callable[[Trace], None] | None = None, *, rate: float | None = None,
            burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0) -> Trace:
        """Send `requests` under the load asked for (see `Engine.run`), each streaming on its own connection, while a
        thread polls the servers' /metrics into the trace's steps. `on_tokens` is not called: a server sends text.

        A request a server fails (it went down, cut the stream, timed out) ends with finish_reason "error" and its
        `error`; the others are served on, by the replicas still up, and a warning says what failed. A request the
        server refuses (400: bad input) ends the run with that error; so does a run where nothing was answered.
        """
        self._check_open()
        items, load = self._load_plan(requests, rate, burstiness, max_concurrency, seed)
        options = [SamplingOptions(r.max_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.stop, r.ignore_eos)
                   for r in items]
        for request, option in zip(items, options):
            self._check_options(option, request.chat)
        trace = Trace(self.name, self.model.name, self.cache_facts,
                      [TraceRequest(f"r{i}", 0, o.max_tokens, float(r.arrival_s))
                       for i, (r, o) in enumerate(zip(items, options))], load_profile=load)
        recorder = TraceRecorder(trace, record, on_step)
        if on_start is not None:
            on_start(trace)
        with self._busy():
            replies, start, poller = self._serve(items, options, recorder, max_concurrency, watch=True)
        self._raise_if_failed(replies, every=False)
        for i, (request, reply) in enumerate(zip(items, replies)):
            trace.results.append(self._finish(request.prompt, reply, options[i].stop, start + request.arrival_s))
            trace.requests[i] = replace(trace.requests[i], prompt_tokens=reply.prompt_tokens)
        trace.engine_counters = poller.totals_since_start()
        return trace

    def _raise_if_failed(self, replies: list[_Reply], every: bool) -> None:
        """Raise a run's failure: any (`every=False`: when the servers answered nothing, or refused a request) and
        warn of the rest."""
        failed = [r for r in replies if r.error is not None]
        if not failed:
            return
        refused = next((r.error for r in failed if isinstance(r.error, InvalidRequestError)), None)
        if refused is not None:
            raise refused
        if every or len(failed) == len(replies) or not any(r.chunk_times for r in replies):
            raise failed[0].error
        down = [r.url for r in self.replicas if not r.up]
        where = f"; {', '.join(down)} stopped answering and the rest went to the others" if down else ""
        warnings.warn(f"{len(failed)} of {len(replies)} requests failed{where}: {failed[0].error}", stacklevel=3)

    def _finish(self, prompt: str | Sequence[int], reply: _Reply, stop: tuple[str, ...],
                scheduled: float) -> GenerationResult:
        text, finish = reply.text, reply.finish_reason or "abort"
        cut = first_stop(text, stop)
        if cut is not None and finish != "error":
            text, finish = text[:cut], "stop"
        sent = reply.sent if reply.sent is not None else scheduled
        times = [t - sent for t in reply.chunk_times]
        latencies = [t - prev for prev, t in zip([0.0, *times[:-1]], times)]
        metrics = RequestMetrics(reply.prompt_tokens, reply.completion_tokens or len(times),
                                 times[0] if times else 0.0, latencies, times[-1] if times else 0.0,
                                 max(0.0, sent - scheduled))
        return GenerationResult(prompt, text, list(reply.token_ids), finish, metrics,
                                str(reply.error) if reply.error else "")

    def _generate(self, texts: list[str], options: SamplingOptions, chat: bool) -> list[GenerationResult]:
        self._check_options(options, chat)
        items = [Request(t, options.max_tokens, temperature=options.temperature, top_p=options.top_p,
                         top_k=options.top_k, seed=options.seed, stop=options.stop, chat=chat) for t in texts]
        with self._busy():
            replies, start, _ = self._serve(items, [options] * len(items), TraceRecorder.silent(len(items)), None,
                                            watch=False)
        self._raise_if_failed(replies, every=True)
        return [self._finish(t, reply, options.stop, start) for t, reply in zip(texts, replies)]

    def _stream(self, text: str, options: SamplingOptions, chat: bool) -> Iterator[str]:
        self._check_options(options, chat)
        return self._stream_pieces(Request(text, options.max_tokens, chat=chat), options)

    def _stream_pieces(self, request: Request, options: SamplingOptions) -> Iterator[str]:
        texts: queue.Queue = queue.Queue()
        reply = _Reply()

        self._check_replicas()

        async def one() -> None:
            try:
                await self._send(0, request, options, reply, time.perf_counter(), None, None, texts.put)
            finally:
                texts.put(None)

        with self._busy():
            future = self._http.submit(one())
            try:
                yield from final_pieces(iter(texts.get, None), options.stop, lambda: self.stopping)
                future.result()
                if reply.error is not None:
                    raise reply.error
            finally:
                future.cancel()  # closes the connection when the stream ended early: the server aborts the request


class _ClientView:
    """Each poll of the servers' /metrics becomes one step: the requests as the client sees them, beside the servers'
    counts (summed over replicas; with several, each replica's under "replica{k}:")."""

    def __init__(self, recorder: TraceRecorder, replies: list[_Reply], start: float,
                 pools: list[tuple[int, int]]) -> None:
        self.recorder, self.replies, self.start, self.pools = recorder, replies, start, pools
        self.in_flight: set[int] = set()
        self.finished: set[int] = set()
        self.peak_rss = 0
        self.step_index = 0
        self.lock = threading.Lock()  # the client's loop changes the sets while the poller's thread reads them

    def sent(self, i: int) -> None:
        with self.lock:
            self.in_flight.add(i)

    def done(self, i: int) -> None:
        with self.lock:
            self.in_flight.discard(i)
            self.finished.add(i)

    def step(self, samples: list[ServerSample | None]) -> None:
        facts = self.recorder.trace.facts
        with self.lock:
            finished = set(self.finished)
            sent = self.in_flight | finished
        snaps = self.recorder.seen_from_client(sent, finished, lambda i: len(self.replies[i].chunk_times))
        counters, blocks, memory = _merge(samples, self.pools), "", MemorySnapshot(facts.weight_bytes, 0, 0, 0, 0)
        if any(s is not None for s in samples):
            used = [round(s.kv_usage * n) if s is not None else 0 for s, (_, n) in zip(samples, self.pools)]
            blocks = "".join(BLOCK_USED * u + BLOCK_FREE * (n - u) for u, (_, n) in zip(used, self.pools))
            reserved = facts.num_blocks * facts.bytes_per_block
            rss = int(counters.get("rss_bytes", 0))
            self.peak_rss = max(self.peak_rss, rss)
            memory = MemorySnapshot(facts.weight_bytes, reserved, sum(used) * facts.bytes_per_block, rss,
                                    self.peak_rss)
        self.recorder.add(StepSnapshot(self.step_index, time.perf_counter() - self.start, tuple(snaps), blocks,
                                       memory, counters))
        self.step_index += 1


def _merge(samples: list[ServerSample | None], pools: list[tuple[int, int]]) -> dict[str, float]:
    """One step's counters from every replica's sample: running, waiting, tokens and memory summed, KV usage over
    all the pools together; with several replicas, each one's own under "replica{k}:"."""
    merged: dict[str, float] = {}
    present = [(k, s) for k, s in enumerate(samples) if s is not None]
    for k, sample in present:
        for name, value in sample.counters().items():
            if name != "kv_usage":
                merged[name] = merged.get(name, 0.0) + value
            if len(samples) > 1:
                merged[f"replica{k}:{name}"] = value
    if any("kv_usage" in s.values for _, s in present):
        blocks = [pools[k][1] for k, _ in present]
        usage = [s.kv_usage for _, s in present]
        merged["kv_usage"] = (sum(u * n for u, n in zip(usage, blocks)) / sum(blocks) if sum(blocks)
                              else sum(usage) / len(usage))
    return merged


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


def _message_of(body: Any) -> str:
    """The server's own words in an error body: `{"message": ...}`, `{"error": {"message": ...}}`, `{"detail": ...}`."""
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, (dict, str)) and inner:
            return _message_of(inner)
        message = body.get("message") or body.get("detail")
        if message:
            return str(message)
    return str(body)


def _cut_off(exc: BaseException) -> bool:
    """Whether the connection itself failed (refused, reset, cut mid-answer), rather than the request."""
    import aiohttp

    return (isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError))
            and not isinstance(exc, asyncio.TimeoutError))


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
