"""SwiGLU's elementwise part, ``silu(gate) * up``, as one Triton kernel each way, with torch's numerics.

torch computes ``F.silu(gate) * up`` as two kernels (silu, rounded to the input dtype; the product,
rounded again) and autograd's backward as four (silu recomputed, ``dm * up``, ``silu_backward``,
``dm * silu``), each a full pass over (tokens × intermediate) — 113M elements per layer at 4,096
tokens of Qwen2.5-32B. Here the forward reads gate and up and writes the product, and the backward
reads dm, gate and up and writes both gradients, with the same roundings as torch: silu and the
product rounded to the input dtype, ``dm * up`` rounded before ``silu_backward``'s formula
``g · σ · (1 + x · (1 − σ))`` in fp32. The exponential may differ from torch's in its last fp32 bit,
which rarely moves a half-precision output by one unit.

``engine.models.lean.swiglu`` calls these when ``kernels.backend.use_triton`` says so (CUDA tensors
by default) and torch otherwise; on CPU tensors they run under the Triton interpreter.
"""

from __future__ import annotations

import torch

from kernels.backend import launchable

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

BLOCK = 2048

if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # silu, rounded
        tl.store(out_ptr + offs, (s * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(dm_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dm = tl.load(dm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        ds = (dm * u).to(dgate_ptr.dtype.element_ty).to(tl.float32)  # autograd: dm * up, rounded
        tl.store(dgate_ptr + offs, (ds * sig * (1.0 + g * (1.0 - sig))).to(dgate_ptr.dtype.element_ty), mask=mask)
        s = (g / (1.0 + tl.exp(-g))).to(dup_ptr.dtype.element_ty).to(tl.float32)
        tl.store(dup_ptr + offs, (dm * s).to(dup_ptr.dtype.element_ty), mask=mask)


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the Triton SwiGLU needs triton (pip install triton)")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must match, got {tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")


@torch.compiler.disable  # launched eagerly under torch.compile, as the other kernels
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, shaped and typed like gate."""
    _check(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        launchable(_swiglu_fwd_kernel, gate.device)[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=8)
    return out


@torch.compiler.disable  # launched eagerly under torch.compile, as the other kernels
def swiglu_backward(dm: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) for m = swiglu_forward(gate, up) given dm."""
    _check(gate, up)
    gate, up, dm = gate.contiguous(), up.contiguous(), dm.contiguous().to(gate.dtype)
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        launchable(_swiglu_bwd_kernel, gate.device)[(triton.cdiv(n, BLOCK),)](
            dm, gate, up, d_gate, d_up, n, BLOCK=BLOCK, num_warps=8)
    return d_gate, d_up
