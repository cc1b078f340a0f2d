"""Quality against a reference: perplexity, first-choice agreement per position, greedy agreement."""

from __future__ import annotations

import math

import pytest

from workbench.quality import compare
from workbench.types import TokenScores


def scores(logprobs, top1, ids=(1, 2, 3, 4, 5)):
    return TokenScores(ids, tuple(logprobs), tuple(top1))


def test_perplexity_is_exp_of_the_mean_negative_log_likelihood():
    assert scores([math.log(0.5)] * 4, [2, 3, 4, 5]).perplexity == pytest.approx(2.0)
    assert math.isnan(TokenScores((1,), (), ()).perplexity)


def test_a_model_against_its_reference():
    reference = scores([-1.0] * 4, [2, 3, 4, 5])
    changed = scores([-2.0] * 4, [2, 3, 9, 5])
    row = compare(changed, reference, [7, 8, 6, 6], [7, 8, 9, 9])
    assert row["top1_agreement"] == 0.75  # one position of four ranked another token first
    assert row["greedy_matching_tokens"] == 2 and row["greedy_agreement"] == 0.5  # the same until the third token
    assert row["perplexity_change_pct"] == pytest.approx(100 * (math.e - 1))  # e^2 against e^1
    assert compare(reference, reference, [7, 8], [7, 8])["greedy_agreement"] == 1.0


def test_scores_of_different_texts_are_refused():
    with pytest.raises(ValueError, match="different texts"):
        compare(scores([-1.0] * 4, [2, 3, 4, 5]), scores([-1.0] * 3, [2, 3, 4], ids=(1, 2, 3, 9)), [1], [1])
