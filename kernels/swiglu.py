"""SwiGLU's elementwise part, ``silu(gate) * up``, as one Triton kernel each way, with torch's numerics.

torch computes ``F.silu(gate) * up`` as two kernels (silu, rounded to the input dtype; the product,
rounded again) and autograd's backward as four (silu recomputed, ``dm * up``, ``silu_backward``,
``dm * silu``), each a full pass over (tokens × intermediate) — 113M elements per layer at 4,096
tokens of Qwen2.5-32B. Here the forward reads gate and up and writes the product, and the backward
reads dm, gate and up and writes both gradients, with the same roundings as torch: silu and the
product rounded to the input dtype, ``dm * up`` rounded before ``silu_backward``'s formula
``g · σ · (1 + x · (1 − σ))`` in fp32. The exponential may differ from torch's in its last fp32 bit,
which rarely moves a half-precision output by one unit.

Four layers, top to bottom:

1. ``_swiglu_fwd_kernel`` / ``_swiglu_bwd_kernel``: Triton kernels.
2. Host functions: ``swiglu_forward`` / ``swiglu_backward`` launch the kernels;
   ``swiglu_forward_torch`` / ``swiglu_backward_torch`` are torch's ops for the same contract
   (bit-identical to autograd through ``F.silu(gate) * up``).
3. ``SwiGLUFunction``: the autograd function over either pair. It saves gate and up only, not
   silu(gate) as autograd through torch's ops does (memory accounting:
   ``engine.models.saved_tensors``).
4. ``swiglu(gate, up)``: the dispatch point the model calls — the kernels when
   ``kernels.backend.use_triton(gate, up)`` (by default: CUDA tensors), the torch ops otherwise.

``swiglu_ref`` is torch's expression under plain autograd: the tests' oracle. On CPU tensors the
kernels run under the Triton interpreter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import launchable, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path still works
    triton = None

BLOCK = 2048

# --- 1. kernels --------------------------------------------------------------------------------

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


# --- 2. host functions -------------------------------------------------------------------------


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


def swiglu_forward_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """:func:`swiglu_forward` in torch ops."""
    return F.silu(gate) * up


def swiglu_backward_torch(dm: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`swiglu_backward` in torch ops: what autograd runs for ``F.silu(gate) * up``, bit for bit
    (``aten.silu_backward`` is F.silu's gradient)."""
    return torch.ops.aten.silu_backward(dm * up, gate), dm * F.silu(gate)


# --- 3. autograd function ----------------------------------------------------------------------


class SwiGLUFunction(torch.autograd.Function):
    """(gate, up, use_kernels) -> silu(gate) * up; the host functions are the kernels' when
    ``use_kernels``, else the torch ones. Saves gate and up only: silu is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, use_kernels: bool) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.use_kernels = use_kernels
        return (swiglu_forward if use_kernels else swiglu_forward_torch)(gate, up)

    @staticmethod
    def backward(ctx, dm: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate, d_up = (swiglu_backward if ctx.use_kernels else swiglu_backward_torch)(dm, gate, up)
        return d_gate, d_up, None


# --- 4. dispatch, and the reference ------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with torch's numerics; the kernels when ``kernels.backend.use_triton(gate,
    up)``, else torch ops. Saves gate and up only; the gradients are autograd's."""
    return SwiGLUFunction.apply(gate, up, use_triton(gate, up))


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """torch's expression under plain autograd (the tests' oracle)."""
    return F.silu(gate) * up
