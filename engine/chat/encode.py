"""Rendered conversation → token ids and labels.

The whole rendered text is tokenised in one call, exactly as `apply_chat_template(tokenize=True)`
would, so the ids are what the model sees at inference. Labels are projected from the renderer's
character spans: a token is trained when its characters lie inside one trained segment. A token
that straddles a trained/untrained boundary (possible when assistant content starts with a
newline that BPE merges with the header's newline) is masked and counted in
`Encoded.boundary_tokens`, so the audit can show it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from engine.chat.base import Segment
from engine.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    boundary_tokens: int = 0

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode(tokenizer: Tokenizer, segments: list[Segment]) -> Encoded:
    text = "".join(s.text for s in segments)
    ids, offsets = tokenizer.encode_with_offsets(text)
    # Character spans [start, end) of trained segments, in order.
    spans: list[tuple[int, int]] = []
    pos = 0
    for s in segments:
        if s.trained and s.text:
            spans.append((pos, pos + len(s.text)))
        pos += len(s.text)
    starts = [a for a, _ in spans]
    labels: list[int] = []
    boundary = 0
    for tid, (a, b) in zip(ids, offsets):
        i = bisect.bisect_right(starts, a) - 1
        inside = i >= 0 and b <= spans[i][1] and a < spans[i][1]
        if inside:
            labels.append(tid)
            continue
        labels.append(IGNORE_INDEX)
        # Masked, but does it overlap a trained span? Then it straddles a boundary.
        j = bisect.bisect_left(starts, b) - 1
        if j >= 0 and spans[j][1] > a and b > spans[j][0]:
            boundary += 1
    return Encoded(ids, labels, boundary)
