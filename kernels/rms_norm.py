"""RMSNorm as one Triton kernel each way, with transformers' numerics.

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

``rms_norm_forward`` / ``rms_norm_backward`` are host functions; ``engine.models.lean.rms_norm``
calls them when ``kernels.backend.use_triton`` says so (CUDA tensors by default) and its torch code
otherwise, which is also the tests' oracle. On CPU tensors they run under the Triton interpreter.
"""

from __future__ import annotations

import torch

from kernels.backend import launchable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

MAX_BLOCK = 65536  # widest row handled by one program (hidden sizes of the models are 5120)

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
