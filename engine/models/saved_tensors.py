"""Saved-tensor hooks that let the decoder keep fewer activations for backward, with HF's numerics.

What autograd keeps per token and layer decides how many layers a step can run without
recomputation, and recomputation is a third of a LoRA step's matmul time. Written op by op as
transformers does, a layer saves (h hidden, q = heads·head_dim, kv = kv_heads·head_dim, i
intermediate, in elements):

* each RMSNorm: its input in **fp32** (2h in bf16 elements) and its output (h) for the adapters
  of the next projections — 3h per norm;
* the SwiGLU MLP: gate output, up output, silu(gate) and the product (4i), the product being the
  input of down_proj's adapter.

The decoder instead:

* normalises with ``kernels.rms_norm.rms_norm``, an autograd function with HF's forward numerics
  that saves the input in its own dtype plus one fp32 rstd per row, and the adapters that take
  its output rebuild it in backward from that input (:func:`recompute_saved`) — 1h per norm;
* multiplies with ``kernels.swiglu.swiglu``, which saves gate and up outputs only and recomputes
  silu in backward; down_proj's adapter input is rebuilt from them (:func:`recompute_saved`) — 2i.

For a Qwen2.5-32B layer that is 152 KiB per token instead of 300 KiB in bf16 (``engine.memory``
counts it; a test checks the count against what autograd really holds), the difference between
needing activation checkpointing and not at 4096-token micro-batches on one H200. The
recomputation costs a few elementwise ops per layer.

:func:`recompute_saved` works inside non-reentrant activation checkpointing too: the rebuilt
tensor's inputs, like every other saved tensor, are handed to the checkpoint's own hooks, so
nothing is held past the forward that the checkpoint would have dropped.

Contracts this relies on
------------------------
* **How the adapters save their input.** :func:`recompute_saved` recognises the tensor to
  rebuild by its storage, not by identity: whatever autograd saves that is ``output`` itself or a
  contiguous reshape of *all* of it (same data pointer, dtype, device and element count, both
  contiguous; :func:`_is_view_of_all`). ``engine.lora.LoraLinear.forward`` reshapes its 3-D input
  (batch, seq, in) into a 2-D (tokens, in) view of all of it before its matmuls, and the adapters'
  first matmul saves that view: it is rebuilt. Anything else is kept as usual, so a LoraLinear
  that copied or cast its input first would give the same numbers but keep a copy, and the memory
  estimate would be too low; two tests of ``tests/test_saved_tensors.py`` fail then (the one that
  watches a LoraLinear inside :func:`recompute_saved`, and the one that counts the bytes a real
  step saves against the estimate). LoRA dropout > 0 saves the dropped-out copy instead, which is
  kept (the estimate assumes dropout 0, the paper's setting).
* **Reading the enclosing hooks.** Nested saved-tensor hooks replace the outer ones rather than
  chain, so ours must hand every tensor on to the enclosing ones (activation checkpointing's)
  themselves, and torch has no public way to read those: this module uses the private
  ``torch._C._autograd._top_saved_tensors_default_hooks``. When a torch version lacks it or
  changes its signature, the tensor is kept (numerics unchanged) and a warning says once per
  process that the memory estimate is too low.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch


class _Rebuild:
    """What is kept instead of a tensor: how to rebuild it, and its inputs as the enclosing hooks
    packed them."""

    __slots__ = ("rebuild", "packed", "shape")

    def __init__(self, rebuild: Callable[..., torch.Tensor], packed: tuple, shape: torch.Size):
        self.rebuild, self.packed, self.shape = rebuild, packed, shape


def _is_view_of_all(t: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether ``t`` is ``output`` or a contiguous reshape of all of it (a LoraLinear saves its
    3-D input as a 2-D view: the contract above)."""
    return (t.data_ptr() == output.data_ptr() and t.dtype == output.dtype and t.device == output.device
            and t.numel() == output.numel() and t.is_contiguous() and output.is_contiguous())


# The saved-tensor hooks active around a block (activation checkpointing's, for one): private API.
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_warned_unreadable = False


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


def _warn_unreadable_hooks() -> None:
    global _warned_unreadable
    if _warned_unreadable:
        return
    _warned_unreadable = True
    warnings.warn(
        f"torch {torch.__version__}: cannot read the enclosing saved-tensor hooks "
        "(torch._C._autograd._top_saved_tensors_default_hooks), so norm and SwiGLU outputs are kept "
        "for backward instead of rebuilt: same results, but the activations take more memory than "
        "engine.memory estimates (the estimate is too low)",
        RuntimeWarning,
        stacklevel=2,
    )


@contextlib.contextmanager
def recompute_saved(output: torch.Tensor, rebuild: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> Iterator[None]:
    """Within this block, autograd does not keep ``output`` for backward: wherever it would be
    saved (as itself or a contiguous reshape of all of it), ``inputs`` are saved instead (tensors
    the producer of ``output`` saves anyway, so no extra memory) and ``rebuild(*inputs)``
    recomputes it when backward needs it. Every tensor, the inputs included, goes through the
    enclosing saved-tensor hooks (activation checkpointing's), if any. A no-op when no graph is
    being recorded; keeps ``output`` (and warns once) when the enclosing hooks cannot be read."""
    if output.grad_fn is None or not torch.is_grad_enabled():
        yield
        return
    outer = _enclosing_hooks()
    if outer is None:  # hooks we cannot chain to: keep the tensor
        _warn_unreadable_hooks()
        yield
        return
    outer_pack, outer_unpack = outer
    # Autograd keeps the pack hook with every tensor it packed until backward has used it, so the
    # hook must not hold ``output`` (nor, under activation checkpointing, ``inputs``) itself: it
    # reads them from ``block``, emptied when the block ends. Held by the closure, they stayed
    # alive for the whole step: a norm's output (h per token) and silu(gate)·up (i) per layer,
    # and with recomputation the layer's inputs and outputs too, which the pack-hook count of
    # tests/test_saved_tensors.py cannot see (the peak-memory tests do).
    block = [output, inputs]

    def pack(t: torch.Tensor):
        if block and _is_view_of_all(t, block[0]):
            return _Rebuild(rebuild, tuple(outer_pack(i) for i in block[1]), t.shape)
        return outer_pack(t)

    def unpack(saved):
        if isinstance(saved, _Rebuild):
            return saved.rebuild(*(outer_unpack(p) for p in saved.packed)).view(saved.shape)
        return outer_unpack(saved)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        block.clear()
