"""Linear + cross-entropy: loss = CE(hidden @ weightᵀ, targets), summed over trained rows.

The single dispatch point the model calls for its training loss. Today it holds the pure-torch
reference; the fused Triton kernel (chunked online log-sum-exp, no (tokens × vocab) logits)
plugs in here.

Rows whose target is IGNORE_INDEX cost nothing: they are dropped before the LM-head matmul.
For the paper's self-recognition data (~2 trained tokens of ~700) that is most of the work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token losses over rows with a target, in fp32.

    hidden (..., h), weight (v, h), targets (...) with IGNORE_INDEX for untrained rows.
    Returns a 0-dim fp32 tensor (0.0, still attached to the graph, when no row is trained).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (n, h)
    targets = targets.reshape(-1)  # (n,)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    logits = hidden.index_select(0, rows) @ weight.t()  # (trained, v) in the activation dtype
    return F.cross_entropy(logits.float(), targets.index_select(0, rows), reduction="sum")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return linear_cross_entropy_ref(hidden, weight, targets)
