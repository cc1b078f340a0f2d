"""A server's Prometheus `/metrics`, read into one sample of what the workbench draws: requests running and waiting,
KV cache usage, tokens generated, the server process's memory, and the cache's layout where the server says it.

Metric names differ by server; each quantity lists the names vLLM, TGI, SGLang and llama.cpp give it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from workbench.errors import WorkbenchError

# quantity -> the metric (sample) names servers report it under; gauges, and counters with their _total suffix
_NAMES = {
    "running": ("vllm:num_requests_running", "tgi_batch_current_size", "sglang:num_running_reqs",
                "llamacpp:requests_processing"),
    "waiting": ("vllm:num_requests_waiting", "tgi_queue_size", "sglang:num_queue_reqs", "llamacpp:requests_deferred"),
    "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"),
    "generation_tokens": ("vllm:generation_tokens_total", "tgi_request_generated_tokens_sum",
                          "sglang:generation_tokens_total", "llamacpp:tokens_predicted_total"),
    # llama.cpp counts the prompt tokens it computed, not those its prompt cache served
    "prompt_tokens": ("vllm:prompt_tokens_total", "tgi_request_input_length_sum", "sglang:prompt_tokens_total",
                      "llamacpp:prompt_tokens_total"),
    "preemptions": ("vllm:num_preemptions_total",),
    "rss_bytes": ("process_resident_memory_bytes",),
}
_KINDS = {"vllm:": "vllm", "tgi_": "tgi", "sglang:": "sglang", "llamacpp:": "llamacpp"}


@dataclass
class ServerSample:
    """One reading of /metrics (sums over label sets, e.g. one per engine or model)."""

    time_s: float
    kind: str = "unknown"
    values: dict[str, float] = field(default_factory=dict)
    block_size: int = 0
    num_blocks: int = 0

    def __getattr__(self, name: str) -> float:
        if name in _NAMES:
            return self.values.get(name, 0.0)
        raise AttributeError(name)

    def counters(self) -> dict[str, float]:
        """The sample as a step's counters: server_running, server_waiting, kv_usage, generation_tokens, ..."""
        return {("server_" + k if k in ("running", "waiting") else k): v for k, v in self.values.items()}


def parse_metrics(text: str, time_s: float = 0.0) -> ServerSample:
    """Read Prometheus exposition text into a ServerSample."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    sample = ServerSample(time_s)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sums[s.name] = sums.get(s.name, 0.0) + s.value
            if s.name == "vllm:cache_config_info":
                sample.block_size = int(float(s.labels.get("block_size", 0) or 0))
                sample.num_blocks = int(float(s.labels.get("num_gpu_blocks", 0) or 0))
        if sample.kind == "unknown":
            sample.kind = next((kind for prefix, kind in _KINDS.items() if family.name.startswith(prefix)), "unknown")
    for quantity, names in _NAMES.items():
        found = [sums[n] for n in names if n in sums]
        if found:
            sample.values[quantity] = found[0]
    return sample


def read_metrics(url: str, timeout_s: float = 5.0) -> ServerSample:
    """GET `url` (a server's /metrics) once."""
    import httpx

    start = time.perf_counter()
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise WorkbenchError(f"cannot read metrics from {url}: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise WorkbenchError(f"{url} answered {response.status_code}: the server exposes no Prometheus metrics there.")
    return parse_metrics(response.text, start)


class MetricsPoller:
    """Reads /metrics every `poll_s` seconds in its own thread and hands each sample to `on_sample`.

    A failed read hands over the newest sample again (a busy server may answer late), and a server without
    /metrics hands over None every time: the trace then has the client's view only. `last` is the newest sample.
    """

    def __init__(self, url: str, poll_s: float = 0.1, on_sample=None) -> None:
        self.url, self.poll_s, self.on_sample = url, poll_s, on_sample
        self.first: ServerSample | None = None
        self.last: ServerSample | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="workbench-metrics", daemon=True)

    def start(self) -> None:
        self.first = self.last = self._read()  # before anything is sent: the counters' starting point
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.last = self._read() or self.last  # the counters after the last answer

    def _read(self) -> ServerSample | None:
        try:
            return read_metrics(self.url, timeout_s=max(1.0, self.poll_s * 10))
        except WorkbenchError:
            return None  # a busy server may answer late; some servers have no /metrics at all

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = self._read()
            if sample is not None:
                self.first = self.first or sample
                self.last = sample
            if self.on_sample is not None:
                self.on_sample(self.last)
            self._stop.wait(self.poll_s)

    def totals_since_start(self) -> dict[str, float]:
        """How much the server's counters grew during the run (tokens generated, preemptions, ...)."""
        if self.first is None or self.last is None:
            return {}
        return {name: self.last.values.get(name, 0.0) - self.first.values.get(name, 0.0)
                for name in ("generation_tokens", "prompt_tokens", "preemptions") if name in self.last.values}
