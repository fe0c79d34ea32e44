"""Training samples → packed rows of torch tensors (the one torch-dependent step of the data path).

Samples (`engine.data.Sample`) are concatenated into one row per micro-batch; `cu_seqlens` marks
the sample boundaries, where attention and positions restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.data import Sample


@dataclass
class PackedBatch:
    """Samples concatenated into one row; attention and positions restart at every boundary."""

    input_ids: torch.Tensor  # (1, T) int64
    targets: torch.Tensor  # (1, T) int64, IGNORE_INDEX where nothing is trained
    position_ids: torch.Tensor  # (1, T) int64, 0.. per sample
    cu_seqlens: torch.Tensor  # (n + 1,) int32, sample boundaries
    num_targets: int
    sources: list[str]

    def to(self, device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.targets), move(self.position_ids),
                           move(self.cu_seqlens), self.num_targets, self.sources)


def pack(samples: Sequence[Sample], max_tokens: int) -> list[list[Sample]]:
    """Greedy, order-preserving packing into rows of at most `max_tokens` tokens.

    A sample longer than the budget gets a row of its own (it is never split: a split sample
    would lose the attention context of its first part).
    """
    rows: list[list[Sample]] = []
    used = max_tokens  # forces a new row for the first sample
    for s in samples:
        n = len(s.input_ids)
        if used + n > max_tokens:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += n
    return rows


def collate_packed(samples: Sequence[Sample]) -> PackedBatch:
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    ids = [t for s in samples for t in s.input_ids]
    targets = [t for s in samples for t in s.targets]
    positions = [p for s in samples for p in range(len(s.input_ids))]
    bounds = [0]
    for s in samples:
        bounds.append(bounds[-1] + len(s.input_ids))
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        targets=torch.tensor([targets], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        num_targets=sum(s.num_targets for s in samples),
        sources=[s.source for s in samples],
    )
