"""Rendered conversation → token ids and labels.

The whole rendered text is tokenised in one call, exactly as `apply_chat_template(tokenize=True)`
would, so the ids are what the model sees at inference. Labels are projected from the renderer's
character spans: a token is trained when its characters lie inside one trained segment. A token
that straddles a trained/untrained boundary (possible when assistant content starts with a
newline that BPE merges with the header's newline) is masked and counted in
`Encoded.boundary_tokens`, so the audit can show it.

Token offsets are in text order (non-decreasing starts and ends: they tile the text, see
`engine.tokenizer`), so the tokens inside a span, and those overlapping it, are contiguous runs
found by bisection; no per-token Python work.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from engine.chat.base import Rendered
from engine.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    boundary_tokens: int = 0

    @property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def encode(tokenizer: Tokenizer, rendered: Rendered) -> Encoded:
    return encode_batch(tokenizer, [rendered])[0]


def encode_batch(tokenizer: Tokenizer, rendered: Sequence[Rendered]) -> list[Encoded]:
    """`encode` of many conversations, tokenised in one batch (in parallel where cores allow)."""
    encodings = tokenizer.encode_batch_with_offsets([r.text for r in rendered])
    return [_project(ids, offsets, _trained_spans(r)) for r, (ids, offsets) in zip(rendered, encodings)]


def _trained_spans(rendered: Rendered) -> list[tuple[int, int]]:
    """Character spans [start, end) of the trained segments, in order."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for s in rendered.segments:
        if s.trained and s.text:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    return spans


def _project(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> Encoded:
    """Labels: a token (a, b) is trained when a span [A, B) holds it (A <= a < B, b <= B); a masked
    token overlapping a span (a < B, b > A) is a boundary token."""
    starts, ends = zip(*offsets) if offsets else ((), ())
    labels = [IGNORE_INDEX] * len(ids)
    boundary = 0
    covered = 0  # end of the overlapping runs counted so far (one token may overlap two spans)
    for start, end in spans:
        lo = bisect_left(starts, start)
        hi = min(bisect_left(starts, end), bisect_right(ends, end))
        labels[lo:hi] = ids[lo:hi]
        first, last = bisect_right(ends, start), bisect_left(starts, end)
        boundary += max(0, last - max(first, covered)) - max(0, hi - max(lo, first))
        covered = max(covered, last)
    return Encoded(ids, labels, boundary)
