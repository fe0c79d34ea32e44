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
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from engine.chat.base import Segment
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
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode(tokenizer: Tokenizer, segments: list[Segment], boundary: str = "train") -> Encoded:
    if boundary not in BOUNDARY_POLICIES:
        raise ValueError(f"boundary must be one of {BOUNDARY_POLICIES}, got {boundary!r}")
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
    masked = trained = 0
    for tid, (a, b) in zip(ids, offsets):
        i = bisect.bisect_right(starts, a) - 1
        inside = i >= 0 and b <= spans[i][1] and a < spans[i][1]
        if inside:
            labels.append(tid)
            continue
        # Not inside one: does it overlap the last trained span starting before its end?
        j = bisect.bisect_left(starts, b) - 1
        if j >= 0 and spans[j][1] > a and b > spans[j][0]:
            if boundary == "train" and a < spans[j][0] and b <= spans[j][1]:  # straddles the start
                labels.append(tid)
                trained += 1
                continue
            masked += 1
        labels.append(IGNORE_INDEX)
    return Encoded(ids, labels, masked, trained)
