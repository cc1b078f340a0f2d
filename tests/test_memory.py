"""Memory figures (config against the engines' real KV tensors, budgets), measured KV waste, the survey's claims."""

from __future__ import annotations

import math

import pytest

import workbench as wb
from workbench.analysis import kv_waste_measured
from workbench.memory import kv_bytes_per_token, measure_memory, requests_that_fit
from workbench.report import _json_safe
from workbench.survey import CLAIMS, ENGINES, availability, check_claims
from workbench.trace import CacheFacts, MemorySnapshot, RequestSnapshot, StepSnapshot, Trace


@pytest.mark.parametrize("engine", ["transformers", "transformers-paged"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_kv_tensors_hold_the_configs_bytes_per_token(engine, dtype):
    with wb.load(engine, model="tiny-llama", dtype=dtype) as e:
        measured = e.measure_kv_cache()
        assert e.kv_bytes_per_token == kv_bytes_per_token("tiny-llama", dtype)
        assert measured.bytes_per_token == e.kv_bytes_per_token
        assert e.load_seconds > 0
        assert e.generate("Hello", max_tokens=2)[0].metrics.generated_tokens >= 1  # still usable afterwards


def test_requests_that_fit():
    gib, per_token = 2**30, 1000
    assert requests_that_fit(gib + 10_000 * per_token, gib, per_token, 100) == 100
    assert requests_that_fit(gib + 10_000 * per_token, gib, per_token, 100, block_size=64) == 78  # 128 slots each
    assert requests_that_fit(gib + 10_000 * per_token, gib, per_token, 100, reserve_tokens=2048) == 4
    assert requests_that_fit(gib, 2 * gib, per_token, 100) == 0  # the weights alone do not fit


def test_measure_memory_reports_an_engine_error_in_its_row():
    row = measure_memory("transformers", model="tiny-llama", dtype="float64")
    assert "float64" in row["error"] and "float32" in row["error"]


def _trace(paged: bool, steps: list[tuple[RequestSnapshot, ...]], memory: list[tuple[int, int]]) -> Trace:
    facts = CacheFacts(paged, 4 if paged else 1, 8, 4 if paged else 1, 1, 1, 1, "float32", 0, 64)
    trace = Trace("test", "test", facts, [])
    for i, (requests, (reserved, used)) in enumerate(zip(steps, memory)):
        trace.steps.append(StepSnapshot(i, float(i), requests, "", MemorySnapshot(0, reserved, used, 0, 0)))
    return trace


def test_kv_waste_measured_counts_unfilled_slots_of_allocated_blocks():
    # Block size 4. Step 0: r0 holds 5 tokens in blocks (0, 1); r1 shares block 0 and holds 6 in (0, 2).
    # Allocated: blocks 0, 1, 2 = 12 slots; held: 4 + 1 + 2 = 7. Step 1: r0 alone, 8 tokens in (0, 1): 8 of 8.
    step0 = (RequestSnapshot("r0", "decode", 1, 5, 1, (0, 1), 0), RequestSnapshot("r1", "decode", 1, 6, 1, (0, 2), 4))
    step1 = (RequestSnapshot("r0", "decode", 1, 8, 4, (0, 1), 0),)
    paged = _trace(True, [step0, step1], [(0, 0), (0, 0)])
    assert kv_waste_measured(paged) == pytest.approx(100 * (20 - 15) / 20)
    contiguous = _trace(False, [(), ()], [(10, 6), (30, 24)])  # padded slots against real tokens, per step
    assert kv_waste_measured(contiguous) == pytest.approx(100 * 10 / 40)


def test_availability_lists_every_surveyed_engine_with_a_reason_when_missing():
    rows = availability()
    assert {row["engine"] for row in rows} == {engine.name for engine in ENGINES}
    installed = {s.name for s in wb.engines() if s.installed and not s.remote}
    for row in rows:
        assert row["available"] == (row["workbench engine"] in installed)
        if not row["available"]:
            assert row["why not"] and row["how to get it"]


def test_check_claims_sets_each_claim_beside_the_measurement():
    claims = check_claims({"vllm": 60.0, "transformers": 3.0}, {"vllm": 2.0, "contiguous": 95.0}).set_index("claim")
    assert claims.loc[CLAIMS[0].text, "measured here"] == 20.0
    assert claims.loc[CLAIMS[0].text, "verdict"] == "within the claim"
    assert claims.loc[CLAIMS[1].text, "verdict"] == "not measured here: tgi did not run"
    assert claims.loc[CLAIMS[2].text, "verdict"] == "above the claim"
    assert claims.loc[CLAIMS[3].text, "verdict"] == "within the claim"


def test_recorded_values_hold_no_nan():
    assert _json_safe({"a": [math.nan, 1.0], "b": {"c": math.inf}}) == {"a": [None, 1.0], "b": {"c": None}}
