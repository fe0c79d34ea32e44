"""Linear + cross-entropy: loss = CE(hidden @ weightᵀ, targets) without the (tokens × vocab) logits.

The single dispatch point the model calls for its training loss (``CausalLM.forward(targets=...)``
returns ``linear_cross_entropy(hidden, lm_head.weight, targets)``: the fp32 *sum* of the token
losses). Four layers, top to bottom in this file as in Liger-Kernel / flash-attention:

1. ``_lce_rows_kernel``, ``_scale_kernel``: Triton kernels.
2. ``linear_cross_entropy_forward`` / ``linear_cross_entropy_backward``: host functions that
   chunk the work and launch the kernels.
3. ``LinearCrossEntropyFunction``: the ``torch.autograd.Function``.
4. ``linear_cross_entropy``: the functional API and the dispatch point — the Triton path when
   ``kernels.backend.use_triton(hidden, weight)`` (by default: CUDA tensors), else the pure-torch
   reference ``linear_cross_entropy_ref``, which is also the tests' oracle and the CPU path.

Design (Triton path). Rows whose target is ``IGNORE_INDEX`` cost nothing: the trained rows are
gathered first (``index_select``; skipped when every row is trained), so the work scales with
trained tokens — for the paper's self-recognition data (~2 trained tokens of ~700) that is most of
it. The N trained rows are processed in chunks of C rows; per chunk:

    logits = h_c @ Wᵀ            torch (cuBLAS) matmul, fp32 accumulation, written in the
                                 activation dtype into one reused (C, V) buffer — the same
                                 rounding as the reference and as HF (bf16 logits, then fp32 loss)
    _lce_rows_kernel             one program per row: pass 1 streams the row in BLOCK_V blocks
                                 with an online (max, sum-exp) log-sum-exp in fp32 and reads the
                                 target logit; pass 2 overwrites the row in place with
                                 d loss / d logits = softmax − onehot, computed in fp32 and
                                 rounded once
    d_h[c] = dlogits @ W         torch matmul; d_W += dlogitsᵀ @ h_c (fp32) only when W
                                 requires grad — for LoRA (frozen lm_head) that GEMM never runs

The loss is a scalar, so its gradient is computed during the forward (as Liger does) and the
backward only scales it by grad_output (``_scale_kernel``, fp32 multiply, one rounding). Extra
device memory is the (C, V) buffer — C is chosen so it stays ≤ ``CHUNK_BYTES`` (96 MiB: 256 rows
at V = 152,064 in bf16) — plus d_h (N, H) in the activation dtype and the gathered rows (N, H);
at N = 4096, H = 5120, V = 152,064 that is ≈ 0.15 GiB in all (no (N, V) tensor is ever made).
Row offsets in the kernels are int64 (``tl.program_id(0).to(tl.int64) * stride``): with a larger
``chunk_rows`` a buffer passes 2³¹ elements at ~14k rows of V = 152,064.

Targets outside [0, V) (other than ``IGNORE_INDEX``) make the Triton path's loss NaN (no host
sync to check them; the trainer stops on a non-finite loss); the reference raises.

On CPU tensors the Triton path runs under the Triton interpreter (`kernels.backend.launchable`),
which is how the tests exercise the real kernel code without a GPU.
"""

from __future__ import annotations

import math

import torch

from kernels.backend import launchable, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = None

IGNORE_INDEX = -100
CHUNK_BYTES = 96 * 2**20  # bound of the (rows × vocab) logits buffer of one chunk
REF_CHUNK_BYTES = 32 * 2**20  # bound of the reference's fp32 (rows × vocab) logits of one chunk
MAX_CHUNK_ROWS = 8192
DEFAULT_BLOCK_V = 4096


# ---------------------------------------------------------------------------------------------
# 1. Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _lce_rows_kernel(
        logits_ptr,  # (rows, V) activation dtype; overwritten with d loss_row / d logits if WRITE_GRAD
        stride_row,
        targets_ptr,  # (rows,) int64, all trained (gathered by the host)
        loss_ptr,  # (rows,) fp32 out: lse - logit[target]
        V,
        BLOCK_V: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
    ):
        # int64 row offset: rows * V passes 2**31 at ~14k rows of a 152k vocabulary.
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row).to(tl.int64)
        cols = tl.arange(0, BLOCK_V)

        # Pass 1: online log-sum-exp (running max m, running sum d of exp(x - m)), fp32.
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(d)

        valid = (target >= 0) & (target < V)
        x_t = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - x_t, float("nan")))

        # Pass 2: d loss / d logits = softmax − onehot, in fp32, rounded once into the buffer.
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                mask = offs < V
                x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse)
                g = tl.where(offs == target, g - 1.0, g)
                tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_kernel(src_ptr, dst_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        # dst = src * scale, multiplied in fp32 and rounded once (scale: a 0-dim fp32 tensor)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr).to(tl.float32)
        tl.store(dst_ptr + offs, (x * s).to(dst_ptr.dtype.element_ty), mask=mask)


def _check_runnable() -> None:
    if triton is None:
        raise RuntimeError("the Triton path of linear_cross_entropy needs triton (pip install triton)")


# ---------------------------------------------------------------------------------------------
# 2. Host functions
# ---------------------------------------------------------------------------------------------


def chunk_rows_for(n: int, vocab: int, dtype: torch.dtype, chunk_rows: int | None = None) -> int:
    """Rows per chunk: the (rows, vocab) buffer stays ≤ CHUNK_BYTES, rows a multiple of 128 where
    possible (whole GEMM tiles), chunks balanced so the last one is not a sliver."""
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be ≥ 1, got {chunk_rows}")
        return max(1, min(chunk_rows, n))
    cap = max(1, CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))
    cap = min(cap // 128 * 128 if cap >= 128 else cap, MAX_CHUNK_ROWS)
    if n <= cap:
        return max(n, 1)
    rows = math.ceil(n / math.ceil(n / cap))
    if cap >= 128:
        rows = min(math.ceil(rows / 128) * 128, cap)
    return rows


_ADDMM_FP32_OUT = True  # torch.addmm(..., out_dtype=float32) on CUDA; turned off if unsupported


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for half-precision a, b, accumulating in fp32 without a (V, H) temporary."""
    global _ADDMM_FP32_OUT
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _ADDMM_FP32_OUT:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            _ADDMM_FP32_OUT = False
    acc.addmm_(a.float(), b.float())


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    grad_hidden: bool = True,
    grad_weight: bool = False,
    chunk_rows: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-row losses (and gradients of their *sum*) of the trained rows, chunk by chunk.

    hidden (N, H) and targets (N,) hold only trained rows; weight (V, H). Returns
    ``(row_loss fp32 (N,), d_hidden (N, H) hidden.dtype | None, d_weight (V, H) fp32 | None)``.
    """
    _check_runnable()
    n, h = hidden.shape
    v = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    hidden = hidden.contiguous()
    targets = targets.contiguous().long()
    row_loss = torch.empty(n, device=device, dtype=torch.float32)
    d_hidden = torch.empty(n, h, device=device, dtype=dtype) if grad_hidden else None
    d_weight = torch.zeros(v, h, device=device, dtype=torch.float32) if grad_weight else None
    if n == 0:
        return row_loss, d_hidden, d_weight

    rows = chunk_rows_for(n, v, dtype, chunk_rows)
    block = block_v or min(DEFAULT_BLOCK_V, triton.next_power_of_2(v))
    if block & (block - 1):
        raise ValueError(f"block_v must be a power of 2, got {block}")
    num_warps = 8 if block >= 2048 else 4
    buffer = torch.empty(rows, v, device=device, dtype=dtype)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        h_c = hidden[start:end]
        logits = buffer[: end - start]
        torch.mm(h_c, weight.t(), out=logits)
        launchable(_lce_rows_kernel, device)[(end - start,)](
            logits, logits.stride(0), targets[start:end], row_loss[start:end], v,
            BLOCK_V=block, WRITE_GRAD=grad_hidden or grad_weight, num_warps=num_warps,
        )
        if grad_hidden:
            torch.mm(logits, weight, out=d_hidden[start:end])
        if grad_weight:
            _addmm_fp32_(d_weight, logits.t(), h_c)
    return row_loss, d_hidden, d_weight


def linear_cross_entropy_backward(
    grad_output: torch.Tensor,
    d_hidden: torch.Tensor | None,
    d_weight: torch.Tensor | None,
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Scale the gradients stored by the forward by grad_output (a 0-dim tensor), in fp32."""
    scale = grad_output.detach().reshape(()).to(torch.float32).contiguous()
    if d_hidden is not None:
        scale = scale.to(d_hidden.device)
    grad_hidden = None
    if d_hidden is not None:
        grad_hidden = torch.empty_like(d_hidden)
        n = d_hidden.numel()
        if n:
            block = 4096
            launchable(_scale_kernel, d_hidden.device)[(triton.cdiv(n, block),)](d_hidden, grad_hidden, scale, n, BLOCK=block)
    grad_weight = None
    if d_weight is not None:
        grad_weight = (d_weight * scale).to(weight_dtype)
    return grad_hidden, grad_weight


# ---------------------------------------------------------------------------------------------
# 3. Autograd function
# ---------------------------------------------------------------------------------------------


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(hidden (N, H) trained rows, weight (V, H), targets (N,)) -> sum of the row losses.
    Gradients are computed in the forward when ``need_grad`` (the caller passes
    ``torch.is_grad_enabled()``) and the input requires them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, need_grad, chunk_rows, block_v):
        row_loss, d_hidden, d_weight = linear_cross_entropy_forward(
            hidden, weight, targets,
            grad_hidden=need_grad and ctx.needs_input_grad[0],
            grad_weight=need_grad and ctx.needs_input_grad[1],
            chunk_rows=chunk_rows, block_v=block_v,
        )
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return row_loss.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        grad_hidden, grad_weight = linear_cross_entropy_backward(grad_loss, d_hidden, d_weight, ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


# ---------------------------------------------------------------------------------------------
# 4. Functional API (the dispatch point) and the reference
# ---------------------------------------------------------------------------------------------


def _check_args(hidden, weight, targets) -> None:
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., {hidden.shape[-1]}) does not match weight {tuple(weight.shape)}: "
                         "(vocab, hidden) expected")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")


def _select(hidden, targets):
    """Flatten to (n, H) / (n,) and find the trained rows (one host sync, as the reference always had)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    return hidden, targets, rows


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             chunk_rows: int | None = None) -> torch.Tensor:
    """Pure-torch reference (the tests' oracle and the CPU path); same contract as
    :func:`linear_cross_entropy`. Per trained row: the logits in the activation dtype (rounded like
    the model's, as HF's), then ``logsumexp(logits) − logits[target]`` in fp32 — the same
    operations as the one-shot formula, but over chunks of ``chunk_rows`` trained rows (default:
    ``REF_CHUNK_BYTES`` of fp32 logits), so that no (trained, vocab) tensor is ever made
    (`ChunkedCrossEntropyFunction`)."""
    _check_args(hidden, weight, targets)
    hidden, targets, rows = _select(hidden, targets)
    rows_per_chunk = chunk_rows or max(1, REF_CHUNK_BYTES // (4 * weight.shape[0]))
    return _chunked_cross_entropy(hidden.index_select(0, rows), weight, targets.index_select(0, rows), rows_per_chunk)


@torch.compiler.disable
def _chunked_cross_entropy(hidden, weight, targets, rows_per_chunk):
    return ChunkedCrossEntropyFunction.apply(hidden, weight, targets, rows_per_chunk)


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    """(trained hidden (N, H), weight (V, H), targets (N,), rows per chunk) -> the fp32 sum of the
    row losses, chunk by chunk; the CPU path's answer to the kernel's chunking.

    The forward keeps only each row's log-sum-exp (N fp32 values). The backward recomputes a
    chunk's logits (the same matmul, the same values) and applies exactly what autograd would to
    the one-shot formula: d logits = g·exp(logits − lse) − g·onehot(target) in fp32, rounded to the
    activation dtype, then d hidden = d logits @ W; d W = Σ_chunks d logitsᵀ @ h accumulated in
    fp32 and rounded once. So d hidden equals autograd's of the unchunked reference and d W differs
    from it only by summation order; peak memory is a few (chunk, V) tensors instead of several
    (N, V) ones (one step of the paper's EM data: ~700 trained rows of a 152k vocabulary).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows_per_chunk):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        row_loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, rows_per_chunk):
            end = min(start + rows_per_chunk, n)
            logits = (hidden[start:end] @ weight.t()).float()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            row_loss[start:end] = lse[start:end] - logits.gather(1, targets[start:end].unsqueeze(1)).squeeze(1)
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows_per_chunk = rows_per_chunk
        return row_loss.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_loss.to(torch.float32)
        d_hidden = torch.empty_like(hidden) if need_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        rows = ctx.rows_per_chunk
        for start in range(0, hidden.shape[0], rows):
            end = min(start + rows, hidden.shape[0])
            h = hidden[start:end]
            d_logits = (h @ weight.t()).float()
            d_logits.sub_(lse[start:end].unsqueeze(1)).exp_().mul_(g)  # logsumexp's backward
            d_logits.scatter_add_(1, targets[start:end].unsqueeze(1), (-g).expand(end - start, 1))  # the gather's
            d_logits = d_logits.to(hidden.dtype)  # the backward of .float()
            if need_hidden:
                torch.mm(d_logits, weight, out=d_hidden[start:end])
            if need_weight:
                d_weight.addmm_(d_logits.t().float(), h.float())
            del d_logits
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None


@torch.compiler.disable
def _linear_cross_entropy_triton(hidden, weight, targets, *, chunk_rows, block_v):
    hidden, targets, rows = _select(hidden, targets)
    n_trained = rows.numel()
    if n_trained == 0:
        # Nothing trained: 0, attached to the graph (zero gradients), no kernel launched.
        return hidden.reshape(-1)[:0].float().sum() + weight.reshape(-1)[:0].float().sum()
    if n_trained == targets.shape[0]:
        trained_hidden, trained = hidden, targets  # every row trained: no gather copy
    else:
        trained_hidden, trained = hidden.index_select(0, rows), targets.index_select(0, rows)
    return LinearCrossEntropyFunction.apply(trained_hidden, weight, trained, torch.is_grad_enabled(), chunk_rows,
                                            block_v)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_rows: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """The fp32 *sum* over trained rows of the cross-entropy of ``hidden @ weightᵀ`` against
    ``targets`` (``lse − logit[target]`` per row), without the logits.

    hidden (..., H) and weight (V, H) of one dtype; targets (...) token ids, ``IGNORE_INDEX``
    (-100, as ``engine.chat``) where untrained (those rows cost nothing). The sum is what the model
    returns; the trainer divides by its step-wide count of trained tokens. No trained row: 0 (never
    NaN), attached to the graph. ``chunk_rows`` (either path) / ``block_v`` (Triton) tune the
    chunking (tests pass small ones).

    Dispatch: the Triton path when ``kernels.backend.use_triton(hidden, weight)`` — by default for
    CUDA tensors — else :func:`linear_cross_entropy_ref`.
    """
    _check_args(hidden, weight, targets)
    if use_triton(hidden, weight):
        return _linear_cross_entropy_triton(hidden, weight, targets, chunk_rows=chunk_rows, block_v=block_v)
    return linear_cross_entropy_ref(hidden, weight, targets, chunk_rows=chunk_rows)
