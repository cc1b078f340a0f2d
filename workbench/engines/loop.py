"""The one run loop of every engine in this process, and the hooks an engine supplies to it.

nano-vllm's `LLMEngine.step` in a few lines: release the requests that arrived, let the engine step, hand its new
tokens on, snapshot its state. `generate`, `stream` and `run` are all this loop; an adapter only opens a `Session`
on its engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Iterator

from workbench.engines.arrivals import RunClock
from workbench.trace import StepSnapshot, TraceRecorder
from workbench.types import SamplingOptions


@dataclass
class RawOutput:
    """What a run produced for one request: tokens, why it ended, when each token came (`RunClock` readings), and the
    engine's own figures for it where it keeps them."""

    token_ids: list[int]
    finish_reason: str
    token_times: list[float] = field(default_factory=list)
    engine: dict = field(default_factory=dict)


@dataclass
class StepOutput:
    """What one engine step produced. Requests are their indexes in the run."""

    tokens: dict[int, list[int]] = field(default_factory=dict)  # new token ids
    finished: dict[int, str] = field(default_factory=dict)  # requests that ended: "stop" or "length"
    times: dict[int, list[float]] = field(default_factory=dict)  # clock readings the engine stamped new tokens with
    stamps: dict[int, list[float]] = field(default_factory=dict)  # every token time of a finished request, replacing
    engine: dict[int, dict] = field(default_factory=dict)  # the engine's own figures of requests that finished


class Session(ABC):
    """One run on an engine in this process, driven by `steps`. What each hook must do:

    - `submit(i, prompt, options)`: hand request `i` to the engine; called once per request, when the run clock
      releases it (it arrived and, in a closed loop, a slot is free). It must not wait for the engine's work.
    - `step()`: let the engine take one scheduler step, or, where the engine steps in its own thread, wait a short
      while for what it produced; return the new tokens, the requests that finished and why. Called only while a
      submitted request is unfinished; an empty `StepOutput` is fine. An engine that takes several steps in one
      call (a static batch's `generate`) calls `self.admit()` between them, so that requests arriving meanwhile
      are submitted on time.
    - `snapshot(step, now)`: the engine's state after the step just taken, read from the engine itself, or None
      where the engine's own thread hands its snapshots to the recorder.
    - `abort(indexes)`: cancel these unfinished requests in the engine, which stays usable.
    - `close()`: end the run and release what it set up; called once, however the run ended.
    """

    #: releases and submits the requests that arrived since the last call (set by the loop)
    admit: Callable[[], None] = staticmethod(lambda: None)

    @abstractmethod
    def submit(self, i: int, prompt: list[int], options: SamplingOptions) -> None: ...

    @abstractmethod
    def step(self) -> StepOutput: ...

    def snapshot(self, step: int, now: float) -> StepSnapshot | None:
        return None

    @abstractmethod
    def abort(self, indexes: list[int]) -> None: ...

    def close(self) -> None:
        return None


def steps(session: Session, prompts: list[list[int]], options: list[SamplingOptions], clock: RunClock,
          recorder: TraceRecorder, stopping: Callable[[], bool], outputs: list[RawOutput]) -> Iterator[StepOutput]:
    """Serve `prompts` on `session` as `clock` releases them, filling `outputs`; yields after every engine step.

    `stopping()` is looked at once per step: when it says so, the unfinished requests are aborted and end with
    finish reason "abort". Closing the iterator early aborts them too.
    """
    live: set[int] = set()
    done: set[int] = set()
    step = 0

    def admit() -> None:
        for i in clock.arrived():
            session.submit(i, prompts[i], options[i])
            live.add(i)

    session.admit = admit
    try:
        while len(done) < len(prompts):
            if stopping():
                for i in set(range(len(prompts))) - done:
                    outputs[i].finish_reason = "abort"
                break
            admit()
            if not live:  # nothing in flight: wait for the next arrival
                clock.wait_for_next()
                continue
            out = session.step()
            now = clock.now()
            for i, ids in out.tokens.items():
                outputs[i].token_ids.extend(ids)
                outputs[i].token_times.extend(out.times.get(i) or [now] * len(ids))
                recorder.tokens(i, ids)
            for i, reason in out.finished.items():
                outputs[i].finish_reason = reason
                outputs[i].engine = out.engine.get(i, {})
                if i in out.stamps:
                    outputs[i].token_times = list(out.stamps[i])
                live.discard(i)
                done.add(i)
                clock.done(i)
            if recorder.wanted:
                snapshot = session.snapshot(step, now)
                if snapshot is not None:
                    recorder.add(snapshot)
            step += 1
            yield out
    finally:
        try:
            if live:
                session.abort(sorted(live))
        finally:
            session.close()


def serve(session: Session, prompts: list[list[int]], options: list[SamplingOptions], clock: RunClock,
          recorder: TraceRecorder, stopping: Callable[[], bool]) -> list[RawOutput]:
    """Serve every prompt to the end (or until `stopping()`) and return what each produced."""
    outputs = [RawOutput([], "length") for _ in prompts]
    for _ in steps(session, prompts, options, clock, recorder, stopping, outputs):
        pass
    return outputs
