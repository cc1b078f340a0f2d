"""A server's Prometheus `/metrics`, read into one sample of what the workbench draws: requests running and waiting,
KV cache usage, tokens generated, the server process's memory, and the cache's layout where the server says it.

Metric names differ by server; each quantity lists the names vLLM, TGI, SGLang and llama.cpp give it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from workbench.errors import WorkbenchError

# quantity -> the metric (sample) names servers report it under; gauges, counters with their _total suffix, and
# histograms by their _sum and _count (a histogram's mean over a run is the difference of sums over that of counts)
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
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total",),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total",),
    "ttft_sum": ("vllm:time_to_first_token_seconds_sum", "sglang:time_to_first_token_seconds_sum"),
    "ttft_count": ("vllm:time_to_first_token_seconds_count", "sglang:time_to_first_token_seconds_count"),
    "itl_sum": ("vllm:inter_token_latency_seconds_sum", "sglang:inter_token_latency_seconds_sum"),
    "itl_count": ("vllm:inter_token_latency_seconds_count", "sglang:inter_token_latency_seconds_count"),
    "e2el_sum": ("vllm:e2e_request_latency_seconds_sum", "sglang:e2e_request_latency_seconds_sum"),
    "e2el_count": ("vllm:e2e_request_latency_seconds_count", "sglang:e2e_request_latency_seconds_count"),
    "queue_sum": ("vllm:request_queue_time_seconds_sum",),
    "queue_count": ("vllm:request_queue_time_seconds_count",),
    "step_tokens_sum": ("vllm:iteration_tokens_total_sum",),
    "step_tokens_count": ("vllm:iteration_tokens_total_count",),
    "rss_bytes": ("process_resident_memory_bytes",),
}
# What grows during a run: its difference between the first and the last reading is the run's own total.
COUNTERS = ("generation_tokens", "prompt_tokens", "preemptions", "prefix_cache_queries", "prefix_cache_hits",
            "ttft_sum", "ttft_count", "itl_sum", "itl_count", "e2el_sum", "e2el_count", "queue_sum", "queue_count",
            "step_tokens_sum", "step_tokens_count")
# Gauges a trace step shows, under the names the views read.
_STEP_NAMES = {"running": "server_running", "waiting": "server_waiting", "kv_usage": "kv_usage",
               "generation_tokens": "generation_tokens", "prompt_tokens": "prompt_tokens",
               "preemptions": "preemptions", "rss_bytes": "rss_bytes"}
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
        return {_STEP_NAMES[k]: v for k, v in self.values.items() if k in _STEP_NAMES}


_WANTED = tuple({name for names in _NAMES.values() for name in names} | {"vllm:cache_config_info"})


def parse_metrics(text: str, time_s: float = 0.0) -> ServerSample:
    """Read Prometheus exposition text into a ServerSample."""
    from prometheus_client.parser import text_string_to_metric_families

    # Only the lines of the metrics wanted: a vLLM server publishes about 600, and this runs ten times a second.
    lines = [line for line in text.splitlines() if line.startswith(_WANTED)]
    sums: dict[str, float] = {}
    sample = ServerSample(time_s)
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
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


def read_metrics(url: str, timeout_s: float = 5.0, client=None) -> ServerSample:
    """GET `url` (a server's /metrics) once, with `client` (an `httpx.Client`) when given."""
    import httpx

    start = time.perf_counter()
    try:
        response = (client or httpx).get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise WorkbenchError(f"cannot read metrics from {url}: {type(exc).__name__}") from None
    if response.status_code != 200:
        raise WorkbenchError(f"{url} answered {response.status_code}: the server exposes no Prometheus metrics there.")
    return parse_metrics(response.text, start)


class MetricsPoller:
    """Reads each server's /metrics every `poll_s` seconds in its own thread and hands the samples (one per URL, in
    order) to `on_sample`.

    A failed read hands over that server's newest sample again (a busy server may answer late), and a server
    without /metrics gives None every time: the trace then has the client's view only. `last` holds the newest
    samples.
    """

    def __init__(self, urls: list[str], poll_s: float = 0.1) -> None:
        import httpx

        self.urls, self.poll_s = list(urls), poll_s
        # One client for every read: a new one loads the TLS certificates each time, a CPU cost ten times a second.
        self._client = httpx.Client()
        self.on_sample = None
        self.first: list[ServerSample | None] = [None] * len(self.urls)
        self.last: list[ServerSample | None] = [None] * len(self.urls)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="workbench-metrics", daemon=True)

    def start(self) -> None:
        """Read every server once: the counters' starting point."""
        self.first = self._read_all()
        self.last = list(self.first)

    def watch(self, on_sample) -> None:
        """Poll in the background, handing each round of samples to `on_sample`."""
        self.on_sample = on_sample
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.last = [new or old for new, old in zip(self._read_all(), self.last)]  # after the last answer
        self._client.close()

    def _read_all(self) -> list[ServerSample | None]:
        samples = []
        for url in self.urls:
            try:
                samples.append(read_metrics(url, max(5.0, self.poll_s * 10), self._client))  # a busy server is late
            except WorkbenchError:
                samples.append(None)  # a busy server may answer late; some servers have no /metrics at all
        return samples

    def _loop(self) -> None:
        # start() has just read every server: the first poll waits its turn, so that it does not land on the server
        # with the requests a run sends first
        while not self._stop.wait(self.poll_s):
            for k, sample in enumerate(self._read_all()):
                if sample is not None:
                    self.first[k] = self.first[k] or sample
                    self.last[k] = sample
            if self.on_sample is not None:
                self.on_sample(list(self.last))

    def totals_since_start(self) -> dict[str, float]:
        """How much the servers' counters grew during the run (tokens generated, preemptions, their latency
        histograms' sums and counts, ...), summed over the servers; with several, each one's under "replica{k}:"."""
        totals: dict[str, float] = {}
        for k, (first, last) in enumerate(zip(self.first, self.last)):
            if first is None or last is None:
                continue
            for name in COUNTERS:
                if name in last.values:
                    grown = last.values[name] - first.values.get(name, 0.0)
                    totals[name] = totals.get(name, 0.0) + grown
                    if len(self.urls) > 1:
                        totals[f"replica{k}:{name}"] = grown
        return totals
