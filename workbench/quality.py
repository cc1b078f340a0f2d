"""How close a changed model (another precision, a quantization) stays to its reference, three ways: perplexity on a
fixed passage, agreement of the first choice position by position, and how long greedy decoding keeps the same
tokens."""

from __future__ import annotations

from typing import Sequence

from workbench.types import TokenScores

#: the passage quality is measured on: plain English prose, written for this project (no model has seen it verbatim)
PASSAGE = (
    "Before the printing press, a book was copied by hand, one page at a time. A monastery might spend a year on a "
    "single volume, and a scribe who misread a word passed the mistake on to every copy made from his. Around 1450, "
    "a goldsmith in Mainz combined several older ideas into one working system: letters cast in metal, an oil-based "
    "ink that clung to them, and a screw press adapted from the ones used to make wine. Each letter could be set "
    "into a line, inked, pressed onto paper, and then taken apart and used again. A shop with a few workers could "
    "now print hundreds of identical pages in a day. Within fifty years there were presses in more than two hundred "
    "European cities, and millions of books had been printed. Prices fell, and people who had never owned a book "
    "could buy a pamphlet or an almanac. Scholars in distant cities could read the same edition and refer to the same "
    "page, which made it easier to argue about a text and to correct it. Printers also began to standardize spelling "
    "and punctuation, simply because a consistent style was faster to set in type. The press did not change the world "
    "overnight, but it made copying cheap and exact, and that changed what people could learn and share."
)


def compare(scores: TokenScores, reference: TokenScores, tokens: Sequence[int],
            reference_tokens: Sequence[int]) -> dict:
    """A model's quality against its reference's: both scored on the same text (`Engine.score`), and both greedy on
    the same prompt (`tokens`, `reference_tokens`: their generated token ids).

    >>> compare(int8.score(PASSAGE), fp32.score(PASSAGE), int8_out.token_ids, fp32_out.token_ids)  # doctest: +SKIP
    {'perplexity': 29.76, 'reference_perplexity': 29.43, ..., 'top1_agreement': 0.977, 'greedy_agreement': 1.0}
    """
    if scores.token_ids != reference.token_ids:
        raise ValueError("the two scores are of different texts (or tokenizers): score the same text with both.")
    if not reference_tokens:
        raise ValueError("the reference generated no tokens: greedy agreement needs some.")
    same = sum(a == b for a, b in zip(scores.top1_ids, reference.top1_ids))
    matching = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b),
                    min(len(tokens), len(reference_tokens)))
    return {"perplexity": scores.perplexity, "reference_perplexity": reference.perplexity,
            "perplexity_change_pct": 100 * (scores.perplexity / reference.perplexity - 1),
            "top1_agreement": same / len(reference.top1_ids),
            "greedy_matching_tokens": matching, "greedy_tokens": len(reference_tokens),
            "greedy_agreement": matching / len(reference_tokens)}
