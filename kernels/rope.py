"""Rotary position embedding as one Triton kernel each way, with transformers' roundings.

transformers applies RoPE as ``(x * cos) + (rotate_half(x) * sin)`` with
``rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])``: five to seven passes over q and k per layer
(multiply, negate, concatenate, multiply, add), each product rounded to the activation dtype and
the sum rounded again, and the same again in backward. Here one pass reads x (and the per-token
cos, sin) and writes the result, with exactly those roundings:

    out[:d/2] = round(round(x1·cos1) + round(−x2·sin1))
    out[d/2:] = round(round(x2·cos2) + round(x1·sin2))

and the backward is autograd's chain for the same expression:

    dx1 = round(round(dy1·cos1) + round(dy2·sin2))
    dx2 = round(round(dy2·cos2) − round(dy1·sin1))

so the results are bit-identical to torch's on the GPU (the products are single roundings of exact
fp32 products in both).

Four layers, top to bottom:

1. ``_rope_kernel`` (forward and backward, by a constexpr flag).
2. Host functions ``rope_forward`` / ``rope_backward``: x (tokens, heads, d), cos and sin
   (tokens, d).
3. ``RoPEFunction``: the autograd function over the model's layout, x (b, s, heads, d) with cos
   and sin (b, s, d); saves cos and sin only, as autograd does.
4. ``rope(x, cos, sin)``: the dispatch point the model calls — the kernels when
   ``kernels.backend.use_triton(x)`` (by default: CUDA tensors), else ``rope_ref``, transformers'
   expression under plain autograd (also the tests' oracle).

On CPU tensors the kernels run under the Triton interpreter.
"""

from __future__ import annotations

import torch

from kernels.backend import launchable, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

# --- 1. kernels --------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < HALF
        mask = (heads[:, None] < n_heads) & cmask[None, :]
        dt = out_ptr.dtype.element_ty
        cos1 = tl.load(cos_ptr + token * 2 * HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        cos2 = tl.load(cos_ptr + token * 2 * HALF + HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        sin1 = tl.load(sin_ptr + token * 2 * HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        sin2 = tl.load(sin_ptr + token * 2 * HALF + HALF + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        base = (token * n_heads + heads[:, None]) * 2 * HALF + cols[None, :]
        x1 = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + base + HALF, mask=mask, other=0.0).to(tl.float32)
        a1 = (x1 * cos1).to(dt).to(tl.float32)
        a2 = (x2 * cos2).to(dt).to(tl.float32)
        if BACKWARD:  # dx1 = dy1·cos1 + dy2·sin2, dx2 = dy2·cos2 − dy1·sin1
            b1 = (x2 * sin2).to(dt).to(tl.float32)
            b2 = -((x1 * sin1).to(dt).to(tl.float32))
        else:  # out1 = x1·cos1 − x2·sin1, out2 = x2·cos2 + x1·sin2
            b1 = -((x2 * sin1).to(dt).to(tl.float32))
            b2 = (x1 * sin2).to(dt).to(tl.float32)
        tl.store(out_ptr + base, (a1 + b1).to(dt), mask=mask)
        tl.store(out_ptr + base + HALF, (a2 + b2).to(dt), mask=mask)


# --- 2. host functions -------------------------------------------------------------------------


@torch.compiler.disable  # launched eagerly under torch.compile, as the other kernels
def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("the Triton RoPE needs triton (pip install triton)")
    tokens, n_heads, d = x.shape
    if d % 2 or cos.shape != (tokens, d) or sin.shape != (tokens, d):
        raise ValueError(f"expected x (tokens, heads, even d) and cos, sin (tokens, d); got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    x, cos, sin = x.contiguous(), cos.to(x.dtype).contiguous(), sin.to(x.dtype).contiguous()
    out = torch.empty_like(x)
    if tokens:
        block_h = min(triton.next_power_of_2(n_heads), 16)
        grid = (tokens, triton.cdiv(n_heads, block_h))
        launchable(_rope_kernel, x.device)[grid](x, cos, sin, out, n_heads, HALF=d // 2, BLOCK_H=block_h,
                                                 BLOCK_D=triton.next_power_of_2(d // 2), BACKWARD=backward,
                                                 num_warps=4, enable_fp_fusion=False)  # no FMA: torch rounds each product
    return out


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (tokens, heads, d), cos and sin (tokens, d)."""
    return _launch(x, cos, sin, backward=False)


def rope_backward(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`rope_forward` with respect to x."""
    return _launch(dy, cos, sin, backward=True)


# --- 3. autograd function ----------------------------------------------------------------------


class RoPEFunction(torch.autograd.Function):
    """(x (b, s, heads, d), cos (b, s, d), sin (b, s, d)) -> RoPE(x) on the kernels; saves cos and
    sin only, as autograd does for transformers' expression."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, h, d = x.shape
        cos, sin = cos.reshape(b * s, d), sin.reshape(b * s, d)
        ctx.save_for_backward(cos, sin)
        return rope_forward(x.reshape(b * s, h, d), cos, sin).view(b, s, h, d)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        b, s, h, d = dy.shape
        return rope_backward(dy.reshape(b * s, h, d), cos, sin).view(b, s, h, d), None, None


# --- 4. dispatch, and the reference ------------------------------------------------------------


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (b, s, heads, d), cos and sin (b, s, d) broadcast
    over heads; the kernels when ``kernels.backend.use_triton(x)``, else :func:`rope_ref` (the
    same bits on a GPU)."""
    if use_triton(x):
        return RoPEFunction.apply(x, cos, sin)
    return rope_ref(x, cos, sin)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor x (b, s, heads, d), cos and sin (b, s, d),
    under plain autograd (the torch path and the tests' oracle)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (x * cos) + (rotate_half(x) * sin)
