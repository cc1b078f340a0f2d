"""The common types every engine returns: sampling settings, results with their timings, engine facts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from workbench.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingOptions:
    """What to generate and how. Checked once here, so every engine rejects bad input the same way.

    `temperature=0` means greedy decoding. `top_k=0` and `top_p=1.0` turn those filters off (vLLM's convention).
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep generating past the end-of-sequence token, up to max_tokens

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer of at least 1, got {self.max_tokens!r}.")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}."
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an integer or None, got {self.seed!r}.")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"each stop string must be a non-empty string, got {s!r}.")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class RequestMetrics:
    """Timings of one request, in seconds from the moment it was sent: handed to an in-process engine, or written
    to a server's socket. `queue_s` is how long it waited before that, from its scheduled arrival (a closed loop's
    wait for a slot, a client falling behind its schedule, an in-process engine finishing its step).

    `token_latencies_s[0]` is the time to first token; each later entry is the gap since the previous token (from a
    server, since the previous chunk it streamed, as vLLM's `bench serve` counts inter-token latency).
    `engine` holds the engine's own figures for this request where it keeps them (vLLM: ttft_s, decode_s,
    queued_s, prefill_s, measured by vLLM itself), for checking the workbench's against.
    """

    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    token_latencies_s: list[float]
    total_s: float
    queue_s: float = 0.0
    engine: dict = field(default_factory=dict)

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 when only one token was generated)."""
        gaps = self.token_latencies_s[1:]
        return sum(gaps) / len(gaps) if gaps else 0.0

    @classmethod
    def from_token_times(cls, prompt_tokens: int, token_times: Sequence[float], total_s: float,
                         queue_s: float = 0.0) -> RequestMetrics:
        """Build from each token's arrival time, measured from the moment the request was sent."""
        latencies = [t - prev for prev, t in zip([0.0, *token_times[:-1]], token_times)]
        ttft = token_times[0] if token_times else total_s
        return cls(prompt_tokens, len(token_times), ttft, latencies, total_s, queue_s)


@dataclass
class GenerationResult:
    """One prompt's answer.

    `finish_reason` is "stop" (end of sequence or a stop string), "length" (max_tokens reached), "abort" (stopped),
    or "error" (a server failed it: `error` says how).
    `token_ids` holds every generated token, those of a stop string included, as vLLM does.
    """

    prompt: str | tuple[int, ...]
    text: str
    token_ids: list[int]
    finish_reason: str
    metrics: RequestMetrics
    error: str = ""

    def __repr__(self) -> str:
        return (f"GenerationResult(text={self.text!r}, finish_reason={self.finish_reason!r}, "
                f"tokens={len(self.token_ids)})")


@dataclass(frozen=True)
class CompileFacts:
    """What an engine's compiler did, from the compiler's own counters (torch's dynamo and inductor; vLLM's
    compilation counter and timer). `mode` is "eager" where nothing was compiled."""

    mode: str
    compile_seconds: float | None  # the compiler's own timer (dynamo's compile_inner, vLLM's compilation_time);
    # None where it keeps none (vLLM's ahead-of-time compile on CPU): compare load times instead
    graphs: int  # graphs captured: dynamo's unique graphs; vLLM: the pieces it splits the model's graph into
    graph_breaks: int  # where dynamo stopped capturing and fell back to Python
    kernels: int  # kernels inductor generated (none for a graph its cache supplied)
    nodes_before_fusion: int  # inductor's IR nodes before fusion: this against `kernels` is how much it fused
    cache_hits: int  # compiled graphs loaded from a compile cache instead of compiled
    source: str = ""


@dataclass(frozen=True)
class TokenScores:
    """A text scored by the model, teacher-forced: at each position after the first, the log-probability the model
    gave the token that really comes next, and the token it ranked first."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # logprobs[i]: of token_ids[i + 1], given token_ids[: i + 1]
    top1_ids: tuple[int, ...]  # top1_ids[i]: the model's first choice for position i + 1

    @property
    def perplexity(self) -> float:
        """exp of the mean negative log-likelihood per predicted token, as lm-eval and llama-perplexity define it."""
        return math.exp(-sum(self.logprobs) / len(self.logprobs)) if self.logprobs else math.nan


@dataclass(frozen=True)
class KVCacheMeasurement:
    """The KV cache an engine allocated, measured from its tensors: their bytes and how many tokens they hold."""

    bytes: int
    token_slots: int
    source: str  # which tensors were measured

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.token_slots if self.token_slots else 0.0


@dataclass(frozen=True)
class EngineInfo:
    """Static facts about a loaded engine."""

    engine: str
    engine_version: str
    device: str
    dtype: str
    model: str
    model_path: str
    parameters: int
    weight_bytes: int
    max_model_len: int
    options: dict = field(default_factory=dict)
    #: how the weights are quantized (the `quantization` option), and the share of them held quantized: how many
    #: parameters and the bytes they take, scales included (both are part of `parameters` and `weight_bytes`)
    quantization: str | None = None
    quantized_parameters: int = 0
    quantized_bytes: int = 0

    def _repr_markdown_(self) -> str:
        rows = [
            ("engine", f"{self.engine} {self.engine_version}"),
            ("device", self.device),
            ("dtype", self.dtype),
            ("model", self.model),
            ("parameters", f"{self.parameters:,}"),
            ("weights", f"{self.weight_bytes / 2**20:,.1f} MiB"),
            *([("quantization", f"{self.quantization}: {self.quantized_parameters:,} parameters in "
                                f"{self.quantized_bytes / 2**20:,.1f} MiB")] if self.quantization else []),
            ("context", f"{self.max_model_len:,} tokens"),
        ]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


@dataclass(frozen=True)
class OffloadFacts:
    """Where an engine placed its weights under a memory budget, and the most of them resident at once, measured
    during forward passes since loading (`placement`: device, "cpu" or "disk" -> modules placed there)."""

    budget_bytes: int | None  # the budget for the engine's device; None: no budget (or accelerate's own dict)
    placement: dict
    weight_bytes: int
    offloaded_bytes: int  # off the device between passes, paged in for each one
    resident_peak_bytes: int

    def _repr_markdown_(self) -> str:
        MiB = 2**20
        budget = "none" if self.budget_bytes is None else f"{self.budget_bytes / MiB:,.1f} MiB"
        where = ", ".join(f"{n} on {d}" for d, n in self.placement.items())
        rows = [("budget", budget), ("modules", where), ("weights", f"{self.weight_bytes / MiB:,.1f} MiB"),
                ("offloaded", f"{self.offloaded_bytes / MiB:,.1f} MiB"),
                ("resident at most", f"{self.resident_peak_bytes / MiB:,.1f} MiB")]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


@dataclass(frozen=True)
class RankFacts:
    """What one rank of an engine holds and has said to the others: its share of the weights, the decoder layers
    it runs, its KV cache, a few projections of its first layer as it holds them, and its communication calls and
    forward passes since the engine loaded (`collectives`: "tp all_reduce", "pp isend_tensor_dict", ... -> calls)."""

    rank: int
    world_size: int
    tensor_parallel_rank: int
    pipeline_parallel_rank: int
    weight_bytes: int
    layers: tuple[int, int]  # decoder layers [first, end) this rank runs
    kv_cache_bytes: int
    projections: dict = field(default_factory=dict)  # module name -> (input features, output features) held here
    collectives: dict = field(default_factory=dict)
    forward_passes: int = 0  # of its share of the model, since loading: what the collectives are per
    pid: int = 0  # its process
