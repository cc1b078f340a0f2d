"""Analyses of a trace. `kv_waste` is the PagedAttention paper's comparison, redone on the user's own requests;
`serving_metrics` is vLLM's `bench serve` report of a run, and `engine_state` what the engine did meanwhile.

>>> from workbench.analysis import kv_waste, serving_metrics
>>> kv_waste(trace)        # doctest: +SKIP
>>> serving_metrics(trace, slos={"ttft": 500})        # doctest: +SKIP
"""

from __future__ import annotations

from math import ceil
from typing import Sequence

from workbench.errors import InvalidRequestError
from workbench.trace import Trace, tokens_in_block


def kv_waste(trace: Trace, block_sizes: Sequence[int] = (16, 32, 64, 128)):
    """KV memory each allocation scheme would reserve for the trace's requests, at their real final lengths.

    Rows: contiguous allocation of the whole context per request (what static systems reserve), contiguous
    allocation of prompt + max_tokens (a reservation sized to the request), exact per-sequence allocation (no
    waste, the lower bound), and paging with each block size (waste only in each request's last block).
    `internal_fragmentation` is the part of reserved slots after the last token of a full block scheme;
    `reserved_unused` is the part reserved for tokens that were never generated.
    """
    import pandas as pd

    by_id = {q.request_id: q for q in trace.requests}
    lengths, reservations = [], []
    for q, result in zip(trace.requests, trace.results):
        lengths.append(q.prompt_tokens + result.metrics.generated_tokens)
        reservations.append(q.prompt_tokens + by_id[q.request_id].max_tokens)
    used = sum(lengths)
    per_token = trace.facts.bytes_per_token
    context = trace.facts.max_model_len

    def row(scheme: str, reserved: int, fragmentation: int, unused: int) -> dict:
        return {"scheme": scheme, "reserved_tokens": reserved, "used_tokens": used,
                "internal_fragmentation": fragmentation, "reserved_unused": unused,
                "waste_pct": 100.0 * (reserved - used) / reserved if reserved else 0.0,
                "reserved_bytes": reserved * per_token}

    rows = [
        row(f"contiguous, max context ({context})", context * len(lengths), 0, context * len(lengths) - used),
        row("contiguous, prompt + max_tokens", sum(reservations), 0, sum(reservations) - used),
        row("exact per sequence", used, 0, 0),
    ]
    for size in block_sizes:
        reserved = sum(ceil(n / size) * size for n in lengths)
        rows.append(row(f"paged, block {size}", reserved, reserved - used, 0))
    return pd.DataFrame(rows)


def run_summary(trace: Trace) -> dict:
    """The measured figures of one run: output tokens per second over the run's span (first arrival to last token),
    time to first token (mean, p50, p95), mean time per output token, steps, the process's peak memory, and the
    peak of torch's allocations on the GPU (0 on a CPU).

    >>> pd.DataFrame([run_summary(t) for t in traces])      # one row per engine      # doctest: +SKIP
    """
    import numpy as np

    pairs = list(zip(trace.requests, trace.results))
    span = max(q.arrival_s + r.metrics.total_s for q, r in pairs) - min(q.arrival_s for q, _ in pairs)
    tokens = sum(r.metrics.generated_tokens for _, r in pairs)  # a server's count where no ids came
    ttft = np.array([r.metrics.ttft_s for _, r in pairs])
    tpot = [r.metrics.tpot_s for _, r in pairs if r.metrics.generated_tokens > 1]
    return {"engine": trace.engine, "requests": len(pairs), "output_tokens": tokens,
            "tokens_per_s": tokens / span if span > 0 else 0.0,
            "ttft_mean_s": float(ttft.mean()), "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p95_s": float(np.percentile(ttft, 95)),
            "tpot_mean_s": float(np.mean(tpot)) if tpot else 0.0, "steps": len(trace.steps),
            "peak_memory_gib": max((s.memory.process_peak_bytes for s in trace.steps), default=0) / 2**30,
            "peak_gpu_memory_gib": max((s.memory.device_peak_bytes for s in trace.steps), default=0) / 2**30}


def kv_waste_measured(trace: Trace) -> float:
    """Percent of the KV slots the engine had allocated to requests that held no token, over the whole run (each
    step weighs by its allocated slots), read from the engine's own state in the trace.

    Paged engines: slots of the blocks in requests' block tables (a shared block counted once) against the tokens in
    them, so only the partly filled last blocks waste. A contiguous static batch: every row's padded width plus the
    steps a finished row rides along, against its real tokens.
    """
    size = trace.facts.block_size
    allocated = held = 0
    for snap in trace.steps:
        if not trace.facts.paged:
            allocated += snap.memory.kv_reserved_bytes
            held += snap.memory.kv_used_bytes
            continue
        blocks: dict[int, int] = {}
        for r in snap.requests:
            for logical, block in enumerate(r.block_ids):
                blocks[block] = max(blocks.get(block, 0), tokens_in_block(r.computed_tokens, logical, size))
        allocated += len(blocks) * size
        held += sum(blocks.values())
    return 100.0 * (allocated - held) / allocated if allocated else 0.0


def speculation(trace: Trace) -> dict:
    """Speculative decoding over a run, from the trace's steps, in vLLM's terms (its spec-decode metrics): `drafts`
    (request-steps that verified draft tokens), `draft_tokens`, `accepted_tokens`, `acceptance_rate` (accepted /
    draft tokens) and `mean_acceptance_length` (tokens a drafting step produced on average: 1 + accepted / drafts).

    >>> speculation(engine.run(requests))["acceptance_rate"]      # doctest: +SKIP
    0.62
    """
    steps = [r for s in trace.steps for r in s.requests if r.draft_tokens]
    drafted = sum(r.draft_tokens for r in steps)
    accepted = sum(r.accepted_tokens for r in steps)
    return {"drafts": len(steps), "draft_tokens": drafted, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_acceptance_length": 1 + accepted / len(steps) if steps else 1.0}


def prefix_cache_note(trace: Trace) -> str:
    """A warning when the requests share a prompt prefix shorter than one KV block, "" otherwise: a prefix cache
    reuses whole blocks only, so such a run rightly shows no hit, which reads like prefix caching not working.

    >>> prefix_cache_note(trace)      # doctest: +SKIP
    'The prompts share at most 20 leading tokens, less than one KV block (32 tokens): ...'
    """
    size = trace.facts.block_size
    longest = max((q.shared_prefix_tokens for q in trace.requests), default=0)
    if not trace.facts.paged or size <= 1 or not 0 < longest < size:
        return ""
    return (f"The prompts share at most {longest} leading tokens, less than one KV block ({size} tokens): a prefix "
            f"cache reuses whole blocks only, so no block can be shared here and a 0% hit rate is correct. Share a "
            f"longer prefix, or use smaller blocks, to see it.")


# ---- serving under load: the metrics of vLLM's `bench serve`, computed from a trace ------------------------------
SLO_METRICS = ("ttft", "tpot", "e2el")
PERCENTILES = (90, 95, 99)


def check_slos(slos: dict | None) -> dict[str, float]:
    """SLOs as vLLM's `bench serve --goodput` takes them: {"ttft": ms, "tpot": ms, "e2el": ms}, any of the three."""
    if not slos:
        return {}
    if not isinstance(slos, dict):
        raise InvalidRequestError(f"slos must be a dict such as {{'ttft': 500, 'e2el': 4000}} (milliseconds), got "
                                  f"{slos!r}.")
    for name, bound in slos.items():
        if name not in SLO_METRICS:
            raise InvalidRequestError(f"no SLO on {name!r}: the metrics with SLOs are {', '.join(SLO_METRICS)} "
                                      f"(milliseconds).")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound >= 0:
            raise InvalidRequestError(f"the SLO on {name} must be a number of milliseconds >= 0, got {bound!r}.")
    return {name: float(bound) for name, bound in slos.items()}


def serving_metrics(trace: Trace, slos: dict | None = None) -> dict:
    """The serving metrics of a run, with the names and definitions of vLLM's `bench serve` (its result JSON keys):

    - `completed`, `failed` (a server failed them) and `aborted` (stopped) requests; `duration` (s) from the run's
      start to its last answer; `total_input_tokens`, `total_output_tokens`;
    - `request_throughput` (completed/s), `output_throughput` and `total_token_throughput` (tokens/s),
      `request_goodput` (completed requests/s meeting every SLO; None without SLOs);
    - for `ttft` (time to first token), `tpot` (time per output token after the first: (e2el - ttft) / (output - 1)),
      `itl` (every gap between tokens, or between a server's chunks) and `e2el` (end-to-end latency): `mean_*_ms`,
      `median_*_ms`, `std_*_ms`, `p90_*_ms`, `p95_*_ms`, `p99_*_ms`, each from the moment a request was sent;
    - `*_client_queue_time_ms`: how long requests waited between their scheduled arrival and their sending (a closed
      loop's wait for a slot, or a client behind its schedule), as vLLM reports it under `--max-concurrency`;
    - `max_output_tokens_per_s` and `max_concurrent_requests` in any one-second bucket of the run.

    Where the engine kept its own figures (a vLLM server's histograms, read from /metrics before and after; vLLM
    in-process, per request), `engine_mean_ttft_ms`, `engine_mean_itl_ms`, `engine_mean_e2el_ms` give them beside.

    >>> serving_metrics(trace, slos={"ttft": 500, "e2el": 4000})["request_goodput"]      # doctest: +SKIP
    """
    import numpy as np

    bounds = check_slos(slos)
    done = [(q, r) for q, r in zip(trace.requests, trace.results) if r.finish_reason in ("stop", "length")]
    failed = sum(r.finish_reason == "error" for r in trace.results)
    aborted = sum(r.finish_reason == "abort" for r in trace.results)
    duration = trace_duration(trace)
    ttfts = [r.metrics.ttft_s for _, r in done]
    e2els = [r.metrics.total_s for _, r in done]
    outputs = [r.metrics.generated_tokens for _, r in done]
    # vLLM: tpot over requests with more than one output token; 0 for the others when judging goodput
    all_tpots = [(e - t) / (n - 1) if n > 1 else 0.0 for t, e, n in zip(ttfts, e2els, outputs)]
    tpots = [tpot for tpot, n in zip(all_tpots, outputs) if n > 1]
    itls = [gap for _, r in done for gap in r.metrics.token_latencies_s[1:]]
    queues = [r.metrics.queue_s for _, r in done]
    total_input = sum(q.prompt_tokens or r.metrics.prompt_tokens for q, r in done)
    good = None
    if bounds:
        values = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        good = sum(all(values[name][i] <= bound / 1000 for name, bound in bounds.items()) for i in range(len(done)))
    result = {"completed": len(done), "failed": failed, "aborted": aborted, "duration": duration,
              "total_input_tokens": total_input, "total_output_tokens": sum(outputs),
              "request_throughput": len(done) / duration if duration else 0.0,
              "request_goodput": good / duration if good is not None and duration else None,
              "output_throughput": sum(outputs) / duration if duration else 0.0,
              "total_token_throughput": (total_input + sum(outputs)) / duration if duration else 0.0}
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els),
                         ("client_queue_time", queues)):
        data = np.array(values or [0.0]) * 1000  # vLLM reports 0 for a metric with no values
        result.update({f"mean_{name}_ms": float(data.mean()), f"median_{name}_ms": float(np.median(data)),
                       f"std_{name}_ms": float(data.std())})
        result.update({f"p{p}_{name}_ms": float(np.percentile(data, p)) for p in PERCENTILES})
    result.update(_peaks(trace, done))
    result.update(_engine_latencies(trace, done))
    return result


def trace_duration(trace: Trace) -> float:
    """Seconds from the run's start to its last answer (vLLM's benchmark duration)."""
    ends = [q.arrival_s + r.metrics.queue_s + r.metrics.total_s for q, r in zip(trace.requests, trace.results)]
    return max(ends, default=0.0)


def _peaks(trace: Trace, done: list) -> dict:
    """vLLM's peak figures: the most output tokens, and requests in flight, in any one-second bucket of the run."""
    import numpy as np

    if not done:
        return {"max_output_tokens_per_s": 0.0, "max_concurrent_requests": 0}
    sent = [q.arrival_s + r.metrics.queue_s for q, r in done]
    buckets = int(np.ceil(max(s + r.metrics.total_s for s, (_, r) in zip(sent, done)) - min(sent))) + 1
    tokens, concurrent = np.zeros(buckets), np.zeros(buckets)
    first = min(sent)
    for start, (_, r) in zip(sent, done):
        times = np.cumsum(r.metrics.token_latencies_s) + start - first
        np.add.at(tokens, np.clip(times.astype(int), 0, buckets - 1), 1)
        concurrent[int(start - first): int(start + r.metrics.total_s - first) + 1] += 1
    return {"max_output_tokens_per_s": float(tokens.max()), "max_concurrent_requests": int(concurrent.max())}


def _engine_latencies(trace: Trace, done: list) -> dict:
    """The engine's own mean latencies for the run: a server's histograms (their growth during the run), or the
    per-request figures an in-process engine kept."""
    counters = trace.engine_counters
    out = {}
    for name in ("ttft", "itl", "e2el"):
        if counters.get(f"{name}_count"):
            out[f"engine_mean_{name}_ms"] = 1000 * counters[f"{name}_sum"] / counters[f"{name}_count"]
    stats = [r.metrics.engine for _, r in done if r.metrics.engine]
    if stats and not out:
        out["engine_mean_ttft_ms"] = 1000 * sum(s["ttft_s"] for s in stats) / len(stats)
        gaps = sum(s["generated_tokens"] - 1 for s in stats)
        if gaps:
            out["engine_mean_itl_ms"] = 1000 * sum(s["decode_s"] for s in stats) / gaps
    return out


def engine_state(trace: Trace) -> dict:
    """What the engine did during a run, from its own state in the trace: requests running (`running_mean`,
    `running_max`) and waiting (`waiting_mean`, `waiting_max`; preempted ones count as waiting), KV cache usage
    (`kv_usage_mean`, `kv_usage_peak`, 0 to 1), `preemptions`, `prefix_cache_hit_rate` (prompt tokens served from
    the cache, 0 to 1) and `tokens_per_step` (tokens computed per engine step).

    For an in-process engine each step is one scheduler step; for a server each step is one poll of its /metrics,
    and the figures are its own gauges and counters (tokens per step from vLLM's iteration histogram). A figure the
    engine does not expose is None.
    """
    steps = trace.steps_df()
    if steps.empty:
        return {k: None for k in ("running_mean", "running_max", "waiting_mean", "waiting_max", "kv_usage_mean",
                                  "kv_usage_peak", "preemptions", "prefix_cache_hit_rate", "tokens_per_step")}
    counters = trace.engine_counters
    server = "server_running" in steps
    running = steps["server_running"] if server else steps["running"]
    waiting = steps["server_waiting"] if "server_waiting" in steps else steps["waiting"] + steps["preempted"]
    kv = steps["kv_usage"] if "kv_usage" in steps else None
    if server:
        preemptions = counters.get("preemptions")
        queries = counters.get("prefix_cache_queries")
        hit_rate = counters["prefix_cache_hits"] / queries if queries else None
        count = counters.get("step_tokens_count")
        per_step = counters["step_tokens_sum"] / count if count else None
    else:
        preemptions = (counters["vllm:num_preemptions"] if "vllm:num_preemptions" in counters
                       else int(trace.requests_df()["preemptions"].sum()))
        queries = counters.get("vllm:prefix_cache_queries")  # only vLLM counts its prefix cache's hits
        hit_rate = counters["vllm:prefix_cache_hits"] / queries if queries else None
        per_step = float(steps["scheduled_tokens"].mean()) if steps["scheduled_tokens"].any() else None
    return {"running_mean": float(running.mean()), "running_max": float(running.max()),
            "waiting_mean": float(waiting.mean()), "waiting_max": float(waiting.max()),
            "kv_usage_mean": float(kv.mean()) if kv is not None else None,
            "kv_usage_peak": float(kv.max()) if kv is not None else None,
            "preemptions": preemptions, "prefix_cache_hit_rate": hit_rate, "tokens_per_step": per_step}
