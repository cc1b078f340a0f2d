"""Analyses of a trace. `kv_waste` is the PagedAttention paper's comparison, redone on the user's own requests.

>>> from workbench.analysis import kv_waste
>>> kv_waste(trace)        # doctest: +SKIP
"""

from __future__ import annotations

from math import ceil
from typing import Sequence

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
