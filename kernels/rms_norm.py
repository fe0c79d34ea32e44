"""RMSNorm as one Triton kernel each way, with transformers' numerics, and the torch path beside it.

transformers (Qwen2RMSNorm, SeedOssRMSNorm) computes ``weight * (x.float() * rsqrt(mean(x²) + eps))
.to(x.dtype)``: normalise in fp32, round to the input dtype, multiply by the weight in the promoted
dtype (rounding again). Written with torch ops that is seven passes over the row (cast, square,
mean, multiply, cast, multiply, plus the fp32 copies); here it is one read of x and one write of y
per row, with the same two roundings, plus one fp32 rstd per row saved for backward. The only
difference from torch is the order of the fp32 sum of squares (and rstd computed as a correctly
rounded 1/sqrt), which can move an output by one unit in the last place of its dtype.

Backward (the weight frozen, as in LoRA): the gradient reaching the normalised value is rounded to
the input dtype as autograd does (``dy * weight`` in the promoted dtype, cast back), then
``dx = rstd · (g − x̂ · mean(g · x̂))`` in fp32, rounded once.

Four layers, top to bottom:

1. ``_rms_norm_fwd_kernel`` / ``_rms_norm_bwd_kernel``: Triton kernels.
2. Host functions: ``rms_norm_forward`` / ``rms_norm_backward`` launch the kernels;
   ``rms_norm_forward_torch`` / ``rms_norm_backward_torch`` are the same contract in torch ops
   (transformers' forward op for op, autograd's chain written out).
3. ``RMSNormFunction``: the autograd function over either pair. Either way it saves x in its own
   dtype and one fp32 rstd per row, not the fp32 copy of x that autograd through transformers' ops
   keeps (memory accounting: ``engine.models.saved_tensors``).
4. ``rms_norm(x, weight, eps)``: the dispatch point the model calls — the kernels when
   ``kernels.backend.use_triton(x, weight)`` (by default: CUDA tensors), the torch host functions
   otherwise.

``rms_norm_ref`` is transformers' expression under plain autograd: the tests' oracle. On CPU
tensors the kernels run under the Triton interpreter.
"""

from __future__ import annotations

import torch

from kernels.backend import launchable, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

MAX_BLOCK = 65536  # widest row handled by one program (hidden sizes of the models are 5120)

# --- 1. kernels --------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / n_cols
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(var + eps))
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as HF
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + cols, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        # autograd: d(normed) = dy * w in the output's dtype, then cast to x's dtype
        g = (dy * w).to(dy_ptr.dtype.element_ty).to(x_ptr.dtype.element_ty).to(tl.float32)
        xhat = x * rstd
        mean_gx = tl.sum(g * xhat, axis=0) / n_cols
        dx = rstd * (g - xhat * mean_gx)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --- 2. host functions -------------------------------------------------------------------------


def _layout(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    if triton is None:
        raise RuntimeError("the Triton RMSNorm needs triton (pip install triton)")
    n_cols = x.shape[-1]
    if weight.shape != (n_cols,):
        raise ValueError(f"weight must have shape ({n_cols},), got {tuple(weight.shape)}")
    block = triton.next_power_of_2(n_cols)
    if block > MAX_BLOCK:
        raise ValueError(f"rows of {n_cols} elements are wider than the kernel's {MAX_BLOCK}")
    x2 = x.reshape(-1, n_cols)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    warps = 8 if block >= 4096 else 4
    return x2, n_cols, block, warps


@torch.compiler.disable  # launched eagerly under torch.compile, as the other kernels
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y shaped like x in the promoted dtype of x and weight, fp32 rstd of shape x.shape[:-1] + (1,))."""
    x2, n_cols, block, warps = _layout(x, weight)
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        launchable(_rms_norm_fwd_kernel, x.device)[(x2.shape[0],)](
            x2, weight.contiguous(), y, rstd, n_cols, float(eps), BLOCK=block, num_warps=warps)
    return y.view(x.shape), rstd.view(*x.shape[:-1], 1)


@torch.compiler.disable  # launched eagerly under torch.compile, as the other kernels
def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dx for y = rms_norm_forward(x, weight)[0] (the weight's gradient is not computed here)."""
    x2, n_cols, block, warps = _layout(x, weight)
    dy2 = dy.reshape(-1, n_cols).contiguous()
    dx = torch.empty_like(x2)
    if x2.shape[0]:
        launchable(_rms_norm_bwd_kernel, x.device)[(x2.shape[0],)](
            dy2, x2, weight.contiguous(), rstd.reshape(-1).contiguous(), dx, n_cols, BLOCK=block, num_warps=warps)
    return dx.view(x.shape)


def rms_norm_forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm_forward` in torch ops: transformers' Qwen2RMSNorm op for op (fp32 variance,
    cast back, then scale by the weight), so its output bits are transformers'."""
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
    return weight * (x32 * rstd).to(x.dtype), rstd


def rms_norm_backward_torch(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """:func:`rms_norm_backward` in torch ops: autograd's chain for ``weight * cast(x32 * rstd)``,
    the grad of the cast output in x's dtype, then d x32 = rstd · (g − x̂ · mean(g · x̂)) in fp32,
    cast back to x's dtype."""
    xhat = x.to(torch.float32) * rstd
    g = (dy * weight).to(x.dtype).to(torch.float32)
    return (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)


# --- 3. autograd function ----------------------------------------------------------------------


class RMSNormFunction(torch.autograd.Function):
    """(x (..., h), weight (h,), eps, use_kernels) -> y; the host functions are the kernels' when
    ``use_kernels``, else the torch ones. Saves x (own dtype), the weight and the fp32 rstd only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, use_kernels: bool) -> torch.Tensor:
        y, rstd = (rms_norm_forward if use_kernels else rms_norm_forward_torch)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.use_kernels = use_kernels
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx = (rms_norm_backward if ctx.use_kernels else rms_norm_backward_torch)(dy, x, weight, rstd)
        d_weight = None
        if ctx.needs_input_grad[1]:  # frozen in LoRA; autograd's sum over rows otherwise
            normed = (x.to(torch.float32) * rstd).to(x.dtype)
            d_weight = (dy * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return dx, d_weight, None, None


# --- 4. dispatch, and the reference ------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` with transformers' numerics over the last dim of x; the kernels when
    ``kernels.backend.use_triton(x, weight)``, else torch ops. Saves x (own dtype) and the fp32 rstd."""
    return RMSNormFunction.apply(x, weight, eps, use_triton(x, weight))


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen2RMSNorm.forward under plain autograd (the tests' oracle)."""
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
