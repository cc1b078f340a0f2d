"""What every engine shares, without an engine: streamed text made final piece by piece, stop strings, sampling
options checked once, and the requests a trace shows for an engine whose scheduler cannot be read."""

from __future__ import annotations

import pytest

from workbench.engines.interface import final_pieces, first_stop
from workbench.errors import InvalidRequestError
from workbench.trace import CacheFacts, Trace, TraceRecorder, TraceRequest
from workbench.types import SamplingOptions


def pieces(updates, stop=(), stopped=lambda: False) -> list[str]:
    return list(final_pieces(iter(updates), tuple(stop), stopped))


def test_pieces_add_up_to_the_answer():
    assert "".join(pieces(["The", "The cap", "The capital is Paris."])) == "The capital is Paris."


def test_a_stop_string_across_two_updates_ends_the_answer_before_it():
    out = pieces(["The capital i", "The capital is Paris."], stop=[" is"])
    assert "".join(out) == "The capital" and all(" i" not in p for p in out)


def test_an_incomplete_character_is_held_back_until_complete():
    out = pieces(["caf", "caf\ufffd", "café"])
    assert "\ufffd" not in "".join(out) and "".join(out) == "café"


def test_nothing_more_once_stopped():
    calls = iter([False, True, True, True])
    assert pieces(["a", "ab", "abc"], stopped=lambda: next(calls)) == ["a"]


def test_first_stop_is_the_earliest_of_several():
    assert first_stop("a, b. c", (".", ",")) == 1 and first_stop("abc", ("x",)) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be an integer of at least 1"),
    (dict(temperature=-0.1), "temperature must be a number >= 0"),
    (dict(top_p=0), "top_p must be in"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(seed="7"), "seed must be an integer or None"),
    (dict(stop=[""]), "each stop string must be a non-empty string"),
])
def test_bad_sampling_options_are_refused_in_one_line(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message) as error:
        SamplingOptions(**kwargs)
    assert "\n" not in str(error.value)


def test_requests_seen_from_the_client_wait_then_decode_then_finish_once():
    facts = CacheFacts(True, 1, 0, 0, 0, 0, 0, "float32", 0, 0)
    recorder = TraceRecorder(Trace("openai", "m", facts, [TraceRequest(f"r{i}", 0, 4, 0.0) for i in range(3)]))
    produced = {0: 0, 1: 2}
    first = recorder.seen_from_client({0, 1}, set(), produced.get)
    assert [(r.request_id, r.state) for r in first] == [("r0", "waiting"), ("r1", "decode")]
    second = recorder.seen_from_client({0, 1}, {1}, produced.get)
    assert [(r.request_id, r.state) for r in second] == [("r0", "waiting"), ("r1", "finished")]
    assert second[0] is first[0]  # an unchanged request shares its snapshot
    assert [r.request_id for r in recorder.seen_from_client({0, 1}, {1}, produced.get)] == ["r0"]
