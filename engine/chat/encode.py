"""Rendered conversation → token ids and labels.

The whole rendered text is tokenised in one call, exactly as `apply_chat_template(tokenize=True)`
would, so the ids are what the model sees at inference. Labels are projected from the renderer's
character spans: a token is trained when its characters lie inside one trained segment.

A token can straddle a trained span's start: when assistant content starts with a newline, BPE
merges it with the header's newline (``<|im_start|>assistant\\n`` + ``\\n...`` → one ``\\n\\n``
token). With ``boundary="train"`` (the default) such a token is trained, as Axolotl trains it;
with ``boundary="mask"`` it is masked. Either way it is counted (`Encoded.boundary_trained` /
`Encoded.boundary_tokens`) so the audit can show it. Any other token that overlaps a trained span
without lying inside it (none can with the shipped templates, whose trained spans end with an
atomic end-of-turn token) is masked and counted in `boundary_tokens`.

Token offsets are in text order (non-decreasing starts and ends: they tile the text, see
`engine.tokenizer`), so the tokens inside a span, and the few overlapping its edges, are runs
found by bisection; no per-token Python work.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from engine.chat.base import Rendered
from engine.errors import ConfigError
from engine.tokenizer import Tokenizer

IGNORE_INDEX = -100
BOUNDARY_POLICIES = ("train", "mask")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    boundary_tokens: int = 0  # tokens straddling a trained span's edge, masked
    boundary_trained: int = 0  # tokens straddling a trained span's start, trained (boundary="train")

    @property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def encode(tokenizer: Tokenizer, rendered: Rendered, boundary: str = "train") -> Encoded:
    return encode_batch(tokenizer, [rendered], boundary)[0]


def encode_batch(tokenizer: Tokenizer, rendered: Sequence[Rendered], boundary: str = "train") -> list[Encoded]:
    """`encode` of many conversations, tokenised in one batch (in parallel where cores allow)."""
    if boundary not in BOUNDARY_POLICIES:
        raise ConfigError(f"boundary tokens must be one of {', '.join(BOUNDARY_POLICIES)}, got {boundary!r}")
    encodings = tokenizer.encode_batch_with_offsets([r.text for r in rendered])
    return [_project(ids, offsets, _trained_spans(r), boundary) for r, (ids, offsets) in zip(rendered, encodings)]


def _trained_spans(rendered: Rendered) -> list[tuple[int, int]]:
    """Character spans [start, end) of the trained segments, in order."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for s in rendered.segments:
        if s.trained and s.text:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    return spans


def _project(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], boundary: str) -> Encoded:
    """Labels: a token (a, b) is trained when a span [A, B) holds it (A <= a < B, b <= B). A token
    overlapping a span without lying inside it (a < B, b > A) is a boundary token: trained when it
    straddles the start of the last span beginning before its end (a < A, b <= B) and
    `boundary == "train"`, else masked."""
    starts, ends = zip(*offsets) if offsets else ((), ())
    labels = [IGNORE_INDEX] * len(ids)
    edges: set[int] = set()  # overlapping but not inside: at most one run at each end of a span
    for start, end in spans:
        lo = bisect_left(starts, start)
        hi = min(bisect_left(starts, end), bisect_right(ends, end))
        labels[lo:hi] = ids[lo:hi]
        first, last = bisect_right(ends, start), bisect_left(starts, end)
        edges.update(range(first, max(first, lo)))
        edges.update(range(max(hi, first), last))
    masked = trained = 0
    span_starts = [a for a, _ in spans]
    for i in sorted(edges):
        a, b = offsets[i]
        span_start, span_end = spans[bisect_left(span_starts, b) - 1]  # the last span starting before b
        if boundary == "train" and a < span_start and b <= span_end:
            labels[i] = ids[i]
            trained += 1
        else:
            masked += 1
    return Encoded(ids, labels, masked, trained)
