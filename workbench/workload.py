"""Workloads: requests with prompts, sampling settings and arrival times, made in one line.

>>> from workbench.workload import make_workload
>>> requests = make_workload(n=8, output_tokens=32, shared_prefix_tokens=200, rate=4.0, seed=0)  # doctest: +SKIP
>>> trace = engine.run(requests)                                                                   # doctest: +SKIP

Recorded workloads (ShareGPT conversations, Mooncake request traces) are read by `workbench.datasets`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Sequence

from workbench.errors import InvalidRequestError

_WORDS = ("the engine reads each prompt in blocks of tokens and keeps their keys and values in a cache so that "
          "every new token attends to all earlier ones without computing them again while other requests wait "
          "their turn in the queue until memory frees").split()
_TOPICS = ("rivers", "bread", "chess", "volcanoes", "bees", "glass", "trains", "tea", "maps", "clocks", "snow",
           "bridges", "whales", "copper", "kites", "deserts", "owls", "forests", "cotton", "stars")


@dataclass(frozen=True)
class Request:
    """One request of a workload. `arrival_s` is seconds after the run starts; `system` is a system prompt.

    `prompt` is text, or token ids sent as they are (with `chat=False`), as request traces replay them.
    """

    prompt: str | tuple[int, ...]
    max_tokens: int = 64
    arrival_s: float = 0.0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    system: str | None = None
    chat: bool = True
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.arrival_s, (int, float)) or self.arrival_s < 0:
            raise InvalidRequestError(f"arrival_s must be a number >= 0, got {self.arrival_s!r}.")
        if isinstance(self.prompt, (list, tuple)):
            object.__setattr__(self, "prompt", tuple(self.prompt))
            if self.chat:
                raise InvalidRequestError("a prompt of token ids is sent as it is: make the request with chat=False.")


def _text_of(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def _draw(spec: int | tuple[int, int], rng: random.Random) -> int:
    """A length: a fixed number, or a (low, high) range drawn uniformly."""
    if isinstance(spec, int):
        return spec
    low, high = spec
    return rng.randint(low, high)


def check_rate(rate: float, burstiness: float = 1.0) -> None:
    """Refuse a request rate or burstiness that is not a positive number (a rate may be inf: all at once)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise InvalidRequestError(f"rate must be a positive number of requests per second, got {rate!r}.")
    if isinstance(burstiness, bool) or not isinstance(burstiness, (int, float)) or not 0 < burstiness < math.inf:
        raise InvalidRequestError(f"burstiness must be a positive number (1: Poisson arrivals), got {burstiness!r}.")


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival times of `n` requests at `rate` per second, the first at 0: gaps drawn from a gamma distribution of
    shape `burstiness` and mean 1/rate, as vLLM's `bench serve` draws them. 1 is a Poisson process; below 1 requests
    come in bursts, above 1 more evenly. `rate=inf`: all at once.

    >>> arrival_times(4, rate=2.0, seed=0)
    [0.0, 0.9303, 1.6396, 1.9125]
    """
    check_rate(rate, burstiness)
    rng = random.Random(seed)
    times, clock = [], 0.0
    for i in range(n):
        clock += _gap(rng, rate, burstiness) if i else 0.0
        times.append(round(clock, 4))
    return times


def _gap(rng: random.Random, rate: float, burstiness: float) -> float:
    if rate == math.inf:
        return 0.0
    if burstiness == 1:  # the exponential distribution, drawn as such (the same draws as before burstiness existed)
        return rng.expovariate(rate)
    return rng.gammavariate(burstiness, 1 / (rate * burstiness))


def with_arrivals(requests: Sequence[Request], arrivals: Sequence[float]) -> list[Request]:
    """The same requests arriving at new times (seconds after the run starts)."""
    return [replace(r, arrival_s=t) for r, t in zip(requests, arrivals)]


def make_workload(
    n: int = 8,
    prompt_words: int | tuple[int, int] = (8, 24),
    output_tokens: int | tuple[int, int] = 32,
    shared_prefix_tokens: int = 0,
    rate: float | None = None,
    seed: int = 0,
    ignore_eos: bool = True,
    temperature: float = 0.0,
    burstiness: float = 1.0,
) -> list[Request]:
    """`n` requests with prompt and output lengths drawn from ranges, an optional shared system prompt, and arrivals
    at `rate` requests per second (None: all arrive at once), Poisson by default (see `arrival_times` for
    `burstiness`).

    `shared_prefix_tokens` is about how long the shared system prompt is (one word is about one token here).
    `ignore_eos=True` makes each request produce exactly its output length, so runs are comparable across engines.
    """
    if n < 1:
        raise InvalidRequestError(f"n must be at least 1, got {n}.")
    if rate is not None:
        check_rate(rate, burstiness)
    rng = random.Random(seed)
    system = _text_of(shared_prefix_tokens, rng) if shared_prefix_tokens > 0 else None
    requests, clock = [], 0.0
    for i in range(n):
        if rate is not None and i > 0:
            clock += _gap(rng, rate, burstiness)
        topic = _TOPICS[i % len(_TOPICS)]
        prompt = f"Request {i}: tell me about {topic}. {_text_of(_draw(prompt_words, rng), rng)}"
        requests.append(Request(prompt, max_tokens=_draw(output_tokens, rng), arrival_s=round(clock, 4),
                                system=system, ignore_eos=ignore_eos, temperature=temperature, seed=seed + i))
    return requests


def shared_prefix_lengths(prompts: Sequence[Sequence[int]]) -> list[int]:
    """For each prompt (token ids), the longest run of leading tokens it shares with any other prompt: what a prefix
    cache could reuse for it, before rounding down to whole blocks.

    >>> shared_prefix_lengths([[1, 2, 3, 4], [1, 2, 9], [7]])
    [2, 2, 0]
    """
    # A prompt's longest common prefix with any other is reached at a neighbour in sorted order.
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    shared = [0] * len(prompts)
    for a, b in zip(order, order[1:]):
        common = 0
        for x, y in zip(prompts[a], prompts[b]):
            if x != y:
                break
            common += 1
        shared[a], shared[b] = max(shared[a], common), max(shared[b], common)
    return shared


def as_requests(items: Sequence[Request | str], max_tokens: int = 64) -> list[Request]:
    """Accept plain prompt strings beside Requests."""
    return [item if isinstance(item, Request) else Request(item, max_tokens=max_tokens) for item in items]
