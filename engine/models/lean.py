"""Memory-lean building blocks of the decoder: HF's forward numerics, fewer saved activations.

What autograd keeps per token and layer decides how many layers a step can run without
recomputation, and recomputation is a third of a LoRA step's matmul time. Written op by op as
transformers does, a layer saves (h hidden, q = heads·head_dim, kv = kv_heads·head_dim, i
intermediate, in elements):

* each RMSNorm: its input in **fp32** (2h in bf16 elements) and its output (h) for the adapters
  of the next projections — 3h per norm;
* the SwiGLU MLP: gate output, up output, silu(gate) and the product (4i), the product being the
  input of down_proj's adapter.

Here instead:

* :func:`rms_norm` is an autograd function with HF's forward numerics (its ops on the torch path,
  one Triton kernel each way on CUDA: ``kernels/rms_norm.py``) that saves the input in its own
  dtype plus one fp32 rstd per row, and the adapters that take its output rebuild it in
  backward from that input (:func:`recompute_saved`) — 1h per norm;
* :func:`swiglu` saves gate and up outputs only and recomputes silu in backward with
  ``aten.silu_backward`` (bit-identical to autograd's gradient); down_proj's adapter input is
  rebuilt from them — 2i.

For a Qwen2.5-32B layer that is 152 KiB per token instead of 300 KiB in bf16 (see
``engine.memory``), the difference between needing activation checkpointing and not at
4096-token micro-batches on one H200. The recomputation costs a few elementwise ops per layer.
On the torch path the forward bits are transformers'; on CUDA the Triton kernels (RMSNorm,
SwiGLU, and :func:`rotary` for RoPE) keep its roundings, RoPE bit for bit, the other two up to the
order of an fp32 reduction or the last bit of an exponential.

:func:`recompute_saved` works inside non-reentrant activation checkpointing too: the rebuilt
tensor's inputs, like every other saved tensor, are handed to the checkpoint's own hooks, so
nothing is held past the forward that the checkpoint would have dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from kernels.backend import use_triton


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.triton = use_triton(x, weight)
        if ctx.triton:  # one pass per row, the same roundings (kernels/rms_norm.py)
            from kernels.rms_norm import rms_norm_forward

            y, rstd = rms_norm_forward(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return y
        # transformers' Qwen2RMSNorm op for op: fp32 variance, cast back, then scale by the weight.
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd if not ctx.triton or ctx.needs_input_grad[1] else None
        if ctx.triton:
            from kernels.rms_norm import rms_norm_backward

            dx = rms_norm_backward(dy, x, weight, rstd)
        else:
            # Autograd's chain for weight * cast(x32 * rstd): the grad of the cast output in x's
            # dtype, then d x32 = rstd * (g - xhat * mean(g * xhat)) in fp32, cast back to x's dtype.
            g = (dy * weight).to(x.dtype).to(torch.float32)
            dx = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        d_weight = None
        if ctx.needs_input_grad[1]:
            normed = xhat.to(x.dtype)
            d_weight = (dy * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        return dx, d_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` with HF's numerics; saves x (own dtype) and the fp32 rstd only."""
    return _RMSNormFunction.apply(x, weight, eps)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.triton = use_triton(gate, up)
        if ctx.triton:  # one pass, torch's roundings (kernels/swiglu.py)
            from kernels.swiglu import swiglu_forward

            return swiglu_forward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dm: torch.Tensor):
        gate, up = ctx.saved_tensors
        if ctx.triton:
            from kernels.swiglu import swiglu_backward

            return swiglu_backward(dm, gate, up)
        d_gate = torch.ops.aten.silu_backward(dm * up, gate)  # what autograd computes for F.silu
        d_up = dm * F.silu(gate)
        return d_gate, d_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; saves gate and up only, the same gradients as autograd's."""
    return _SwiGLUFunction.apply(gate, up)


def swiglu_values(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The forward value alone (rebuilding the product in backward), on the same path as :func:`swiglu`."""
    if use_triton(gate, up):
        from kernels.swiglu import swiglu_forward

        return swiglu_forward(gate, up)
    return F.silu(gate) * up


class _RotaryFunction(torch.autograd.Function):
    """RoPE through the Triton kernels (kernels/rope.py); saves cos and sin only, as autograd does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        from kernels.rope import rope_forward

        b, s, h, d = x.shape
        cos, sin = cos.reshape(b * s, d), sin.reshape(b * s, d)
        ctx.save_for_backward(cos, sin)
        return rope_forward(x.reshape(b * s, h, d), cos, sin).view(b, s, h, d)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from kernels.rope import rope_backward

        cos, sin = ctx.saved_tensors
        b, s, h, d = dy.shape
        return rope_backward(dy.reshape(b * s, h, d), cos, sin).view(b, s, h, d), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` for x (b, s, heads, d), cos and sin (b, s, d), on the
    Triton kernels (the caller dispatches; the torch expression is ``decoder.apply_rotary``)."""
    return _RotaryFunction.apply(x, cos, sin)


class _Rebuild:
    """What is kept instead of a tensor: how to rebuild it, and its inputs as the enclosing hooks
    packed them."""

    __slots__ = ("rebuild", "packed", "shape")

    def __init__(self, rebuild: Callable[..., torch.Tensor], packed: tuple, shape: torch.Size):
        self.rebuild, self.packed, self.shape = rebuild, packed, shape


def _is_view_of_all(t: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether ``t`` is ``output`` or a contiguous reshape of all of it (a linear layer saves its
    3-D input as a 2-D view)."""
    return (t.data_ptr() == output.data_ptr() and t.dtype == output.dtype and t.device == output.device
            and t.numel() == output.numel() and t.is_contiguous() and output.is_contiguous())


# The saved-tensor hooks active around a block (activation checkpointing's, for one): nested hooks
# replace the outer ones rather than chain, so ours hand every tensor on to them themselves.
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _enclosing_hooks() -> tuple[Callable, Callable] | None:
    """The saved-tensor hooks active here as (pack, unpack), identities when there are none, or
    None when they cannot be read."""
    if _top_hooks is None:
        return None
    try:
        top = _top_hooks(False)  # (ignore_is_tracing)
    except (TypeError, RuntimeError):
        return None
    return top if top is not None else (_identity, _identity)


def _identity(t):
    return t


@contextlib.contextmanager
def recompute_saved(output: torch.Tensor, rebuild: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Iterator[None]:
    """Within this block, autograd does not keep ``output`` for backward: wherever it would be
    saved, ``inputs`` are saved instead (tensors the producer of ``output`` saves anyway, so no
    extra memory) and ``rebuild(*inputs)`` recomputes it when backward needs it. Every tensor,
    the inputs included, goes through the enclosing saved-tensor hooks (activation
    checkpointing's), if any. A no-op when no graph is being recorded."""
    outer = _enclosing_hooks() if output.grad_fn is not None and torch.is_grad_enabled() else None
    if outer is None:  # no graph, or hooks we cannot chain to: keep the tensor
        yield
        return
    outer_pack, outer_unpack = outer

    def pack(t: torch.Tensor):
        if _is_view_of_all(t, output):
            return _Rebuild(rebuild, tuple(outer_pack(i) for i in inputs), t.shape)
        return outer_pack(t)

    def unpack(saved):
        if isinstance(saved, _Rebuild):
            return saved.rebuild(*(outer_unpack(p) for p in saved.packed)).view(saved.shape)
        return outer_unpack(saved)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
