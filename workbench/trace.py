"""Traces: the engine's real state after every scheduler step, saved to one file and read as DataFrames.

A `Trace` holds the cache's static facts, the requests, one `StepSnapshot` per step and the results. Data flows one
way: an engine adapter fills a trace; views and analyses only read it.

>>> trace = engine.run(make_workload(n=8, shared_prefix_tokens=200))      # doctest: +SKIP
>>> trace.steps_df()[["step", "running", "blocks_used"]].tail()           # doctest: +SKIP
>>> trace.save("run.jsonl"); Trace.load("run.jsonl") == trace             # doctest: +SKIP
True
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Collection, Iterable

from workbench.types import GenerationResult, RequestMetrics

STATES = ("waiting", "prefill", "decode", "preempted", "finished")

# One character per physical block in `StepSnapshot.blocks`.
BLOCK_FREE, BLOCK_CACHED, BLOCK_USED, BLOCK_RESERVED = ".", "c", "u", "x"


def tokens_in_block(computed_tokens: int, logical: int, block_size: int) -> int:
    """Tokens of a sequence with `computed_tokens` in the cache that sit in its logical block `logical` (the last
    block of a sequence is partly filled)."""
    return max(0, min(block_size, computed_tokens - logical * block_size))


@dataclass(frozen=True)
class CacheFacts:
    """What does not change during a run: how the KV cache is laid out."""

    paged: bool
    block_size: int  # tokens per block (1 for a contiguous cache: a "block" is a token slot)
    num_blocks: int
    bytes_per_block: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    weight_bytes: int
    max_model_len: int

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size


@dataclass(frozen=True)
class TraceRequest:
    """A request as it was submitted."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    arrival_s: float
    shared_prefix_tokens: int = 0  # leading prompt tokens it shares with another request of the run


@dataclass(frozen=True, slots=True)
class RequestSnapshot:
    """One request after one step. Unchanged snapshots are shared between steps, which keeps long traces small."""

    request_id: str
    state: str
    scheduled_tokens: int  # tokens computed for it in this step
    computed_tokens: int  # tokens whose keys and values are in the cache after this step
    output_tokens: int
    block_ids: tuple[int, ...]  # its block table: logical block i is physical block block_ids[i]
    cached_tokens: int  # prompt tokens served from the prefix cache
    padding_tokens: int = 0  # slots a static batch spends on padding for it
    reason: str = ""  # why it waits or was preempted, in words, where the engine's state says ("" otherwise)
    # speculative decoding: tokens proposed for it and verified in this step, and how many of those were accepted
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class RankMemory:
    """One rank's memory at a step, in an engine split over ranks: its own weights and KV cache (from its tensors),
    the part of that cache in use, and its process's resident bytes."""

    rank: int
    weights_bytes: int
    kv_reserved_bytes: int
    kv_used_bytes: int
    process_rss_bytes: int
    process_peak_bytes: int
    device_allocated_bytes: int = 0  # torch's allocations on the rank's GPU, where it has one


@dataclass(frozen=True)
class MemorySnapshot:
    weights_bytes: int
    kv_reserved_bytes: int
    kv_used_bytes: int
    process_rss_bytes: int
    process_peak_bytes: int
    # torch's allocations on the engine's GPU (0 on a CPU), where weights and KV cache live there
    device_allocated_bytes: int = 0
    device_peak_bytes: int = 0
    ranks: tuple[RankMemory, ...] = ()  # each rank's share where the engine is split over ranks (TP, PP)


@dataclass(frozen=True)
class StepSnapshot:
    step: int
    time_s: float
    requests: tuple[RequestSnapshot, ...]
    blocks: str  # one character per physical block: "." free, "c" cached and evictable, "u" in use, "x" reserved
    memory: MemorySnapshot
    counters: dict = field(default_factory=dict)

    def request(self, request_id: str) -> RequestSnapshot | None:
        return next((r for r in self.requests if r.request_id == request_id), None)

    @property
    def blocks_used(self) -> int:
        return self.blocks.count(BLOCK_USED)

    def block_owners(self) -> dict[int, list[str]]:
        """Physical block id -> the requests whose block tables hold it (more than one: a shared prefix)."""
        owners: dict[int, list[str]] = {}
        for r in self.requests:
            for block in r.block_ids:
                owners.setdefault(block, []).append(r.request_id)
        return owners


@dataclass
class Trace:
    """A recorded run of one engine."""

    engine: str
    model: str
    facts: CacheFacts
    requests: list[TraceRequest]
    steps: list[StepSnapshot] = field(default_factory=list)
    results: list[GenerationResult] = field(default_factory=list)
    engine_counters: dict = field(default_factory=dict)  # the engine's own totals for the run, where it has them
    load_profile: dict = field(default_factory=dict)  # how requests were sent: rate, burstiness, max_concurrency

    def __repr__(self) -> str:
        return (f"<Trace {self.engine} {self.model}: {len(self.requests)} requests, {len(self.steps)} steps, "
                f"{len(self.results)} results>")

    # ---- saving and loading (JSON lines: a header, then one line per step) -----------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the trace to one JSON-lines file."""
        path = Path(path)
        with path.open("w", encoding="utf-8") as f:
            header = {"engine": self.engine, "model": self.model, "facts": asdict(self.facts),
                      "requests": [asdict(r) for r in self.requests], "results": [asdict(r) for r in self.results],
                      "engine_counters": self.engine_counters, "load_profile": self.load_profile}
            f.write(json.dumps(header) + "\n")
            for step in self.steps:
                f.write(json.dumps(_step_to_json(step)) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by `save`."""
        with Path(path).open(encoding="utf-8") as f:
            header = json.loads(f.readline())
            steps = [_step_from_json(json.loads(line)) for line in f if line.strip()]
        results = [GenerationResult(**{**r, "metrics": RequestMetrics(**r["metrics"])}) for r in header["results"]]
        return cls(header["engine"], header["model"], CacheFacts(**header["facts"]),
                   [TraceRequest(**r) for r in header["requests"]], steps, results, header["engine_counters"],
                   header.get("load_profile", {}))

    def to_perfetto(self, path: str | Path) -> Path:
        """Write the trace as Chrome trace-event JSON, which Perfetto (ui.perfetto.dev) and chrome://tracing open:
        a track per request with a slice for each state it was in (waiting, prefill, decode, preempted), and counter
        tracks for the engine's queue, batch, KV cache usage and tokens per step.

        >>> trace.to_perfetto("run.json")      # then open it in ui.perfetto.dev      # doctest: +SKIP
        """
        events: list[dict] = [{"ph": "M", "pid": 1, "name": "process_name",
                               "args": {"name": f"{self.engine} {self.model}"}}]
        index = {q.request_id: k for k, q in enumerate(self.requests)}
        for q, k in index.items():
            events.append({"ph": "M", "pid": 1, "tid": k + 1, "name": "thread_name", "args": {"name": q}})
        spans: dict[str, tuple[str, float]] = {}  # request -> (state, since when)

        def close(rid: str, end: float) -> None:
            state, since = spans.pop(rid)
            events.append({"ph": "X", "pid": 1, "tid": index[rid] + 1, "name": state, "cat": "request",
                           "ts": round(since * 1e6, 1), "dur": round(max(0.0, end - since) * 1e6, 1)})

        for s in self.steps:
            for r in s.requests:
                if r.request_id not in index:
                    continue
                current = spans.get(r.request_id)
                if current is not None and current[0] != r.state:
                    close(r.request_id, s.time_s)
                if r.state != "finished" and r.request_id not in spans:
                    spans[r.request_id] = (r.state, s.time_s)
            states = [r.state for r in s.requests]
            counters = {"waiting": states.count("waiting") + states.count("preempted"),
                        "running": states.count("prefill") + states.count("decode"),
                        "tokens this step": sum(r.scheduled_tokens for r in s.requests)}
            for name in ("server_running", "server_waiting"):
                if name in s.counters:
                    counters[name] = s.counters[name]
            if "kv_usage" in s.counters:
                counters["KV cache used %"] = round(100 * s.counters["kv_usage"], 2)
            for name, value in counters.items():
                events.append({"ph": "C", "pid": 1, "name": name, "ts": round(s.time_s * 1e6, 1),
                               "args": {name: value}})
        end = self.steps[-1].time_s if self.steps else 0.0
        for rid in list(spans):
            close(rid, end)
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}), encoding="utf-8")
        return path

    # ---- DataFrames -------------------------------------------------------------------------------------------
    def steps_df(self):
        """One row per step: batch composition, tokens, blocks, memory and counters."""
        import pandas as pd

        rows = []
        for s in self.steps:
            states = [r.state for r in s.requests]
            row = {"step": s.step, "time_s": s.time_s,
                   **{state: states.count(state) for state in STATES},
                   "running": states.count("prefill") + states.count("decode"),
                   "scheduled_tokens": sum(r.scheduled_tokens for r in s.requests),
                   "padding_tokens": sum(r.padding_tokens for r in s.requests),
                   "blocks_used": s.blocks.count(BLOCK_USED), "blocks_cached": s.blocks.count(BLOCK_CACHED),
                   "blocks_free": s.blocks.count(BLOCK_FREE), **_memory_columns(s.memory), **s.counters}
            rows.append(row)
        return pd.DataFrame(rows)

    def request_steps_df(self):
        """One row per request per step (long form): what the batching timeline draws. `reason`: why a waiting or
        preempted request was not running, in words; "unknown" where the engine does not expose enough to say."""
        import pandas as pd

        return pd.DataFrame([{"step": s.step, "time_s": s.time_s, **{f.name: getattr(r, f.name)
                                                                     for f in fields(RequestSnapshot)},
                              "num_blocks": len(r.block_ids), "reason": reason_of(r)}
                             for s in self.steps for r in s.requests])

    def requests_df(self):
        """One row per request: arrival, lengths, when it was first scheduled and finished, preemptions, timings."""
        import pandas as pd

        first, last, cached, preemptions, previous = {}, {}, {}, {}, {}
        for s in self.steps:
            for r in s.requests:
                rid = r.request_id
                if r.state in ("prefill", "decode"):
                    first.setdefault(rid, s.step)
                elif r.state == "finished":
                    last.setdefault(rid, s.step)
                elif r.state == "preempted" and previous.get(rid) != "preempted":
                    preemptions[rid] = preemptions.get(rid, 0) + 1
                previous[rid] = r.state
                cached[rid] = max(cached.get(rid, 0), r.cached_tokens)
        by_id = {res_id: res for res_id, res in zip((q.request_id for q in self.requests), self.results)}
        rows = []
        for q in self.requests:
            res = by_id.get(q.request_id)
            rows.append({**asdict(q), "first_step": first.get(q.request_id), "finish_step": last.get(q.request_id),
                         "preemptions": preemptions.get(q.request_id, 0),
                         "cached_tokens": cached.get(q.request_id, 0),
                         "output_tokens": res.metrics.generated_tokens if res else None,
                         "ttft_s": res.metrics.ttft_s if res else None,
                         "tpot_s": res.metrics.tpot_s if res else None,
                         "finish_reason": res.finish_reason if res else None})
        return pd.DataFrame(rows)

    def blocks_df(self, step: int = -1):
        """One row per physical block at one step: its state and the requests holding it."""
        import pandas as pd

        s = self.steps[step]
        owners = s.block_owners()
        names = {BLOCK_FREE: "free", BLOCK_CACHED: "cached", BLOCK_USED: "used", BLOCK_RESERVED: "reserved"}
        return pd.DataFrame([{"block_id": i, "state": names[c], "owners": owners.get(i, []),
                              "shared": len(owners.get(i, [])) > 1} for i, c in enumerate(s.blocks)])


def _memory_columns(memory: MemorySnapshot) -> dict:
    """The memory of a step as flat columns: each rank's as `rank0_weights_bytes`, `rank1_process_rss_bytes`, ..."""
    columns = {f.name: getattr(memory, f.name) for f in fields(MemorySnapshot) if f.name != "ranks"}
    for r in memory.ranks:
        columns.update({f"rank{r.rank}_{f.name}": getattr(r, f.name) for f in fields(RankMemory) if f.name != "rank"})
    return columns


def merge_ranks(traces: list[Trace]) -> Trace:
    """One trace of a run split over ranks that each recorded their own (DeepSpeed: one process per rank, all
    stepping together): the first rank's trace, with every rank's memory at each step in `memory.ranks`.

    >>> trace = merge_ranks([Trace.load("rank0.jsonl"), Trace.load("rank1.jsonl")])  # doctest: +SKIP
    >>> MemoryView(trace)                                             # a panel per rank  # doctest: +SKIP
    """
    counts = {len(t.steps) for t in traces}
    if len(counts) != 1:
        raise ValueError(f"the ranks' traces have different step counts ({sorted(counts)}): they are not one run.")
    steps = []
    for at, step in enumerate(traces[0].steps):
        ranks = tuple(RankMemory(rank, m.weights_bytes, m.kv_reserved_bytes, m.kv_used_bytes, m.process_rss_bytes,
                                 m.process_peak_bytes, m.device_allocated_bytes)
                      for rank, m in enumerate(t.steps[at].memory for t in traces))
        steps.append(replace(step, memory=replace(step.memory, ranks=ranks)))
    return replace(traces[0], steps=steps)


def _step_to_json(step: StepSnapshot) -> dict:
    return {"step": step.step, "time_s": step.time_s, "blocks": step.blocks, "memory": asdict(step.memory),
            "counters": step.counters,
            "requests": [[getattr(r, f.name) for f in fields(RequestSnapshot)] for r in step.requests]}


def reason_of(snapshot: RequestSnapshot) -> str:
    """Why a request was waiting or preempted at a step ("unknown" where its engine does not say); "" if it ran."""
    if snapshot.state in ("waiting", "preempted"):
        return snapshot.reason or "unknown"
    return ""


def _step_from_json(data: dict) -> StepSnapshot:
    names = [f.name for f in fields(RequestSnapshot)]
    requests = []
    for values in data["requests"]:
        kwargs = dict(zip(names, values))
        kwargs["block_ids"] = tuple(kwargs["block_ids"])
        requests.append(RequestSnapshot(**kwargs))
    memory = {**data["memory"], "ranks": tuple(RankMemory(**r) for r in data["memory"].get("ranks", ()))}
    return StepSnapshot(data["step"], data["time_s"], tuple(requests), data["blocks"], MemorySnapshot(**memory),
                        data["counters"])


class TraceRecorder:
    """Collects snapshots as an adapter takes them: keeps them when recording, passes each to `on_step`.

    Reuses the previous step's `RequestSnapshot` when a request did not change (a waiting request, typically), so
    a long queue costs a pointer per step, not an object.
    """

    def __init__(self, trace: Trace | None, record: bool = True,
                 on_step: Callable[[StepSnapshot], None] | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> None:
        self.trace = trace
        self.names = [r.request_id for r in trace.requests] if trace is not None else []
        self.record = record and trace is not None
        self.on_step = on_step
        self.on_tokens = on_tokens
        self._previous: dict[str, RequestSnapshot] = {}
        self._shown_finished: set[int] = set()

    @classmethod
    def silent(cls, count: int) -> TraceRecorder:
        """A recorder that takes nothing: what `generate` hands the adapters."""
        recorder = cls(None, record=False)
        recorder.names = [f"r{i}" for i in range(count)]
        return recorder

    @property
    def wanted(self) -> bool:
        """Whether taking a snapshot is worth it at all."""
        return self.record or self.on_step is not None

    def dedupe(self, snapshot: RequestSnapshot) -> RequestSnapshot:
        previous = self._previous.get(snapshot.request_id)
        if previous == snapshot:
            return previous
        self._previous[snapshot.request_id] = snapshot
        return snapshot

    def seen_from_client(self, sent: Iterable[int], finished: Collection[int],
                         produced: Callable[[int], int]) -> tuple[RequestSnapshot, ...]:
        """The requests of a step, for an engine whose scheduler cannot be read (a server, TensorRT-LLM's C++
        executor): a sent request waits until its first token arrives, then decodes; a finished one is shown as
        finished in one step, then no more. `produced(i)` is how many tokens (or pieces) request `i` has so far."""
        snaps = []
        for i in sorted(set(sent) - self._shown_finished):
            if i in finished:
                state = "finished"
                self._shown_finished.add(i)
            else:
                state = "decode" if produced(i) else "waiting"
            snaps.append(self.dedupe(RequestSnapshot(self.names[i], state, 0, 0, produced(i), (), 0)))
        return tuple(snaps)

    def tokens(self, index: int, token_ids: list[int]) -> None:
        """Hand request `index`'s newest tokens to `on_tokens` (streaming text per request)."""
        if self.on_tokens is not None and token_ids:
            self.on_tokens(index, list(token_ids))

    def add(self, step: StepSnapshot) -> None:
        if self.record:
            self.trace.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
