"""Positions of a packed row: the part of padding-free packing the model itself computes.

Several samples are concatenated into one (1, total_tokens) row and ``cu_seqlens`` (int tensor,
shape (num_samples + 1,), starting at 0 and ending at total_tokens) marks their boundaries.
Attention never crosses a boundary (``kernels.attention.attention``, the dispatch point every
decoder layer calls), and position_ids restart at 0 for each sample (:func:`position_ids_from_cu_seqlens`).
"""

from __future__ import annotations

import torch


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 in every packed sample: (num_samples + 1,) -> (1, total_tokens).

    E.g. cu_seqlens [0, 3, 5] -> [[0, 1, 2, 0, 1]].
    """
    cu_seqlens = cu_seqlens.long()
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    total = int(cu_seqlens[-1])
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=total)  # sample start, per token
    return (torch.arange(total, device=cu_seqlens.device) - starts).unsqueeze(0)
