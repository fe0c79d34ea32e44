"""Causal self-attention: the single dispatch point every decoder layer calls.

The model only ever calls :func:`attention`. On CUDA (``kernels.backend.use_triton``) it runs the
Triton varlen flash-attention kernel (``kernels.attention.flash_attention_varlen``); elsewhere the
torch reference built on ``F.scaled_dot_product_attention`` (the same call transformers' "sdpa"
path makes).

Layout is (batch, seq, heads, head_dim), flash-attention's layout, so a packed row
(1, total_tokens, heads, head_dim) is one reshape away from a varlen kernel's
(total_tokens, heads, head_dim).

Padding-free packing: several samples are concatenated into one (1, total_tokens) row and
``cu_seqlens`` (int tensor, shape (num_samples + 1,), starting at 0 and ending at total_tokens)
marks their boundaries. Attention never crosses a boundary, and the caller restarts
position_ids at 0 for each sample (:func:`position_ids_from_cu_seqlens`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import use_triton


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 in every packed sample: (num_samples + 1,) -> (1, total_tokens).

    E.g. cu_seqlens [0, 3, 5] -> [[0, 1, 2, 0, 1]].
    """
    cu_seqlens = cu_seqlens.long()
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    total = int(cu_seqlens[-1])
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=total)  # sample start, per token
    return (torch.arange(total, device=cu_seqlens.device) - starts).unsqueeze(0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention.

    q: (batch, seq, n_heads, head_dim); k, v: (batch, seq, n_kv_heads, head_dim), where n_heads is
    a multiple of n_kv_heads (query head h reads KV head h // (n_heads // n_kv_heads), as HF's
    repeat_kv). With ``cu_seqlens``, batch must be 1 and each sample attends only within itself.
    ``dropout_p`` applies to the attention probabilities; callers pass 0.0 outside training.
    Returns (batch, seq, n_heads, head_dim).
    """
    if use_triton(q, k, v):
        return _flash_attention(q, k, v, cu_seqlens=cu_seqlens, dropout_p=dropout_p, scale=scale)
    gqa = q.shape[2] != k.shape[2]
    # SDPA wants (batch, heads, seq, head_dim).
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=gqa
        )

    if cu_seqlens is None:
        out = sdpa(q, k, v)
    else:
        bounds = _check_cu_seqlens(cu_seqlens, batch=q.shape[0], seq=q.shape[2])
        # Reference path: one causal SDPA per sample, i.e. a block-diagonal causal mask without
        # materialising the (total, total) mask. Empty samples contribute nothing.
        out = torch.cat(
            [sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in zip(bounds[:-1], bounds[1:]) if e > s],
            dim=2,
        )
    return out.transpose(1, 2)


@torch.compiler.disable  # a graph break under torch.compile: the kernels launch eagerly
def _flash_attention(q, k, v, *, cu_seqlens, dropout_p, scale):
    """The Triton kernel over (total_tokens, heads, head_dim): a packed row is already one; a plain
    batch becomes b samples of s tokens."""
    from kernels.attention import flash_attention_varlen

    b, s, n_heads, d = q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
        max_seqlen = s
    else:
        cu_seqlens, max_seqlen = _varlen_bounds(cu_seqlens, batch=b, seq=s, device=q.device)
    out = flash_attention_varlen(
        q.reshape(b * s, n_heads, d),
        k.reshape(b * s, k.shape[2], d),
        v.reshape(b * s, v.shape[2], d),
        cu_seqlens,
        max_seqlen,
        causal=True,
        scale=scale,
        dropout_p=dropout_p,
    )
    return out.view(b, s, n_heads, d)


# (cu_seqlens, its version, row length, device) -> (int32 cu_seqlens on device, longest sample).
# Every layer of a step gets the same cu_seqlens tensor: validating it and finding the longest
# sample reads it on the host, so do that once per step rather than once per layer.
_bounds_cache: tuple | None = None


def _varlen_bounds(
    cu_seqlens: torch.Tensor, *, batch: int, seq: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    global _bounds_cache
    key = (cu_seqlens._version, seq, device)
    cached = _bounds_cache
    if cached is not None and cached[0] is cu_seqlens and cached[1] == key:
        return cached[2], cached[3]
    bounds = _check_cu_seqlens(cu_seqlens, batch=batch, seq=seq)
    max_seqlen = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    cu32 = cu_seqlens.to(device=device, dtype=torch.int32)
    _bounds_cache = (cu_seqlens, key, cu32, max_seqlen)
    return cu32, max_seqlen


def _check_cu_seqlens(cu_seqlens: torch.Tensor, *, batch: int, seq: int) -> list[int]:
    if batch != 1:
        raise ValueError(f"cu_seqlens needs a single packed row (batch 1), got batch {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seq or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the row length {seq}, got {bounds}")
    return bounds
