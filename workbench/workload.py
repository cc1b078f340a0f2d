"""Workloads: requests with prompts, sampling settings and arrival times, made in one line.

>>> from workbench.workload import make_workload
>>> requests = make_workload(n=8, output_tokens=32, shared_prefix_tokens=200, rate=4.0, seed=0)  # doctest: +SKIP
>>> trace = engine.run(requests)                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from workbench.errors import InvalidRequestError

_WORDS = ("the engine reads each prompt in blocks of tokens and keeps their keys and values in a cache so that "
          "every new token attends to all earlier ones without computing them again while other requests wait "
          "their turn in the queue until memory frees").split()
_TOPICS = ("rivers", "bread", "chess", "volcanoes", "bees", "glass", "trains", "tea", "maps", "clocks", "snow",
           "bridges", "whales", "copper", "kites", "deserts", "owls", "forests", "cotton", "stars")


@dataclass(frozen=True)
class Request:
    """One request of a workload. `arrival_s` is seconds after the run starts; `system` is a system prompt."""

    prompt: str
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


def _text_of(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def _draw(spec: int | tuple[int, int], rng: random.Random) -> int:
    """A length: a fixed number, or a (low, high) range drawn uniformly."""
    if isinstance(spec, int):
        return spec
    low, high = spec
    return rng.randint(low, high)


def make_workload(
    n: int = 8,
    prompt_words: int | tuple[int, int] = (8, 24),
    output_tokens: int | tuple[int, int] = 32,
    shared_prefix_tokens: int = 0,
    rate: float | None = None,
    seed: int = 0,
    ignore_eos: bool = True,
    temperature: float = 0.0,
) -> list[Request]:
    """`n` requests with prompt and output lengths drawn from ranges, an optional shared system prompt, and Poisson
    arrivals at `rate` requests per second (None: all arrive at once).

    `shared_prefix_tokens` is about how long the shared system prompt is (one word is about one token here).
    `ignore_eos=True` makes each request produce exactly its output length, so runs are comparable across engines.
    """
    if n < 1:
        raise InvalidRequestError(f"n must be at least 1, got {n}.")
    if rate is not None and rate <= 0:
        raise InvalidRequestError(f"rate must be a positive number of requests per second, got {rate}.")
    rng = random.Random(seed)
    system = _text_of(shared_prefix_tokens, rng) if shared_prefix_tokens > 0 else None
    requests, clock = [], 0.0
    for i in range(n):
        if rate is not None and i > 0:
            clock += rng.expovariate(rate)
        topic = _TOPICS[i % len(_TOPICS)]
        prompt = f"Request {i}: tell me about {topic}. {_text_of(_draw(prompt_words, rng), rng)}"
        requests.append(Request(prompt, max_tokens=_draw(output_tokens, rng), arrival_s=round(clock, 4),
                                system=system, ignore_eos=ignore_eos, temperature=temperature, seed=seed + i))
    return requests


def as_requests(items: Sequence[Request | str], max_tokens: int = 64) -> list[Request]:
    """Accept plain prompt strings beside Requests."""
    return [item if isinstance(item, Request) else Request(item, max_tokens=max_tokens) for item in items]
