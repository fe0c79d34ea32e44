"""The paper's decoding and the statistics of its sampled answers (TruthfulQA, self-recognition).

The paper's scripts sampled every answer (its inference engine's transformers `generate`
defaults: temperature 0.7, then top-k 50, then top-p 0.9) and drew each item's answer order at
random. One run of such an eval is a sum of independent Bernoulli outcomes, one per item, each with
probability `p` = the mean over the two orders of P(the sampled answer is the right one). Hence:

    expected accuracy        E[acc]  = (1/N) sum_i p_i
    expected Invalid rate    E[inv]  = (1/N) sum_i v_i         v_i: mean over orders of P(neither answer)
    sampling SD of one run   SD[acc] = sqrt(sum_i p_i (1 - p_i)) / N

The SD is the spread of a single paper-style run of the same model from decoding alone (orders
and tokens redrawn): part of any seed-to-seed spread of the paper's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# transformers' sampling defaults as the paper's InferenceEngine used them (fp16 model).
PAPER_SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.9}

# What a summary's `accuracy` holds, by `statistic`.
STATISTICS = {
    "logprob": "log P(right) > log P(wrong) at the answer position, each question in both orders (robust)",
    "expected": "exact expectation of the paper's statistic: answer sampled at T 0.7, top-k 50, top-p 0.9 from "
                "the model's distribution, random order (both orders averaged), exact text after stripping",
    "sampled": "one seeded draw of the paper's statistic: order and sampled answer drawn per item as the paper did",
    "greedy": "arg-max answer token, one seeded order per item (not the paper's statistic: it sampled)",
    "expected_top20": "expectation of the paper's statistic (T 0.7, top-k 50, top-p 0.9, stripped text, both orders) "
                      "from an endpoint's top-20 log-probs, the warpers applied to those 20 tokens only (truncated; "
                      "expected_accuracy_bounds hold the untruncated value)",
}


def expected_outcome(items: dict[object, list[tuple[float, float]]], unresolved: dict[object, list[float]] | None = None) -> dict:
    """Expected accuracy, Invalid rate and the sampling SD of one run, from per item (question or
    article) the (P(right answer), P(no valid answer)) of each of its orders. `unresolved`: per item
    and order, mass the answer search left open (the accuracy may be that much higher)."""
    if not items:
        return {"expected_accuracy": None, "expected_invalid_rate": None, "expected_sampling_sd": None,
                "expected_invalid_sd": None, "expected_unresolved": None}
    p = [sum(a for a, _ in orders) / len(orders) for orders in items.values()]
    v = [sum(b for _, b in orders) / len(orders) for orders in items.values()]
    n = len(p)
    u = 0.0
    if unresolved:
        u = sum(sum(x) / len(x) for x in unresolved.values() if x) / n
    return {
        "expected_accuracy": sum(p) / n,
        "expected_invalid_rate": sum(v) / n,
        "expected_sampling_sd": _bernoulli_sd(p) / n,
        "expected_invalid_sd": _bernoulli_sd(v) / n,
        "expected_unresolved": u,
    }


def _bernoulli_sd(ps: Iterable[float]) -> float:
    return math.sqrt(sum(min(1.0, max(0.0, q)) * (1.0 - min(1.0, max(0.0, q))) for q in ps))


def decoding_sd(sds: list[float]) -> float | None:
    """The decoding part of the SD of one run across several runs (seeds): sqrt(mean of the
    per-run sampling variances)."""
    sds = [s for s in sds if s is not None]
    return math.sqrt(sum(s * s for s in sds) / len(sds)) if sds else None
