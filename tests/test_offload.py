"""A weights budget smaller than the bundled model's weights: accelerate's offload in the `transformers` engine."""

from __future__ import annotations

import pytest

import workbench as wb

QUESTION = "What is the capital of France?"
MiB = 2**20


def test_a_budget_smaller_than_the_weights_offloads_layers_and_keeps_the_tokens(load_shared, tmp_path):
    whole = load_shared("transformers")
    plain = whole.generate(QUESTION, max_tokens=8, temperature=0)[0]
    unbudgeted = whole.offload()
    assert unbudgeted.budget_bytes is None and unbudgeted.offloaded_bytes == 0
    assert unbudgeted.resident_peak_bytes == unbudgeted.weight_bytes
    with wb.load("transformers", max_memory="150MiB", offload_folder=str(tmp_path)) as engine:
        result = engine.generate(QUESTION, max_tokens=8, temperature=0)[0]
        facts = engine.offload()
    assert result.token_ids == plain.token_ids
    assert facts.budget_bytes == 150 * MiB and facts.weight_bytes == unbudgeted.weight_bytes
    assert facts.placement.get("disk", 0) > 0 and facts.offloaded_bytes > facts.weight_bytes / 2
    at_rest = facts.weight_bytes - facts.offloaded_bytes
    # measured while a layer's weights were paged in: more than at rest, and within the budget
    assert at_rest < facts.resident_peak_bytes <= facts.budget_bytes


@pytest.mark.parametrize("budget", ["lots", -5])
def test_a_budget_that_is_not_a_size_is_a_clear_error(budget):
    with pytest.raises(wb.WorkbenchError, match=f"max_memory={budget!r}"):
        wb.load("transformers", max_memory=budget, isolate=False)


def test_an_engine_that_does_not_offload_says_which_does(load_shared):
    with pytest.raises(wb.WorkbenchError, match="does not offload.*transformers engine"):
        load_shared("transformers-paged").offload()

