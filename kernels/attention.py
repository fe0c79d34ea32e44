"""Varlen grouped-query flash attention (forward and backward) in Triton, and its torch oracle.

Layout is flash-attention's varlen layout: q (total_tokens, n_heads, head_dim), k and v
(total_tokens, n_kv_heads, head_dim), samples packed back to back with ``cu_seqlens`` (int32,
(n + 1,), rising from 0 to total_tokens) marking their boundaries. Attention never crosses a
boundary; empty samples are allowed. Query head h reads KV head h // (n_heads // n_kv_heads), as
HF's repeat_kv. bf16/fp16 inputs (fp32 works too: exact-precision dots on 16 × 16 tiles, for
tests; the model's dispatch sends fp32 CUDA tensors to the torch path), fp32 softmax statistics and
accumulators; the log-sum-exp of every row is saved for backward.

Four layers, as in flash-attention's Triton files:

1. kernels: ``_attn_fwd_kernel``; ``_attn_bwd_preprocess`` (delta = rowsum(dO * O)),
   ``_attn_bwd_dkdv_kernel`` and ``_attn_bwd_dq_kernel``;
2. host functions ``attention_forward`` / ``attention_backward`` (checks, grids, block sizes);
3. ``FlashAttentionFunction`` (torch.autograd.Function);
4. ``flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, causal, scale, dropout_p)``, and
   ``attention(q, k, v, *, cu_seqlens, dropout_p, scale)``, the dispatch point the model calls in
   its (batch, seq, heads, head_dim) layout: the kernels when ``kernels.backend.use_triton(q, k,
   v)`` (by default: CUDA tensors), else ``attention_sdpa``, the torch path built on
   ``F.scaled_dot_product_attention`` (the call transformers' "sdpa" attention makes).

``attention_ref`` (per-sample explicit softmax, fp32 by default) is the oracle the tests compare
against.

Kernel design
-------------
Forward: one program per (query head, sample, query block of BLOCK_M rows); grid
(n_heads, n_samples, cdiv(max_seqlen, BLOCK_M)), x fastest. Programs whose block starts past their
sample's end exit at once, and the query-block index runs backwards so the longest causal rows of
every head start first (longest-processing-time-first over the whole grid).
The KV loop is split in two: blocks strictly left of the diagonal need no mask at all; only the
BLOCK_M // BLOCK_N diagonal blocks apply the causal and length masks. KV blocks right of the
diagonal are never visited, so a packed row of short samples costs what those samples cost, not
what a dense causal row of the same length would. Online softmax in base 2 (exp2 with
scale·log2 e folded into one multiply), m/l/acc in fp32; the natural-log LSE is stored as
(n_heads, total_tokens) fp32.

Backward (no atomics, deterministic):
- ``_attn_bwd_preprocess``: delta = rowsum(dO * O) per (head, token), fp32.
- ``_attn_bwd_dkdv_kernel``: one program per (KV head, sample, KV block of BLOCK_N rows); grid
  (n_kv_heads, n_samples, cdiv(max_seqlen, BLOCK_N)), earliest (most loaded) key blocks of every
  KV head first. It
  holds K, V and the fp32 dK/dV accumulators and runs one flat loop over (query head of its
  group, query block) pairs: first the BLOCK_N // BLOCK_M diagonal query blocks with the causal
  mask, then every later query block without it (earlier ones see none of these keys). dK/dV of
  the GROUP query heads are summed in registers: no atomics, K/V never repeated, no
  (tokens, n_heads, head_dim) gradient buffer. (A nested head loop around the block loop spilled
  registers on sm_90; the flat loop has one head's footprint and pipelines across heads.)
- ``_attn_bwd_dq_kernel``: one program per (query block, sample, query head), the forward's loop
  structure, recomputing P from the saved LSE.
Both recompute QKᵀ (flash-attention 2's Triton recipe), trading two extra matmuls for no atomics.

Dropout (Seed-OSS: attention dropout 0.1): the keep mask of element (head h, query token t of the
packed row, key j counted from its sample's start) is ``tl.rand(seed, (h·T + t)·T + j) >= p``
(Philox, 64-bit offsets, T = total tokens), regenerated bit-identically in both backward kernels;
kept probabilities are scaled by 1/(1 - p). The seed is drawn from torch's CPU generator per
forward call, so ``torch.manual_seed`` makes runs reproducible and activation checkpointing
(which restores the CPU RNG state) recomputes the same mask. ``dropout_keep_mask`` materialises
the mask for tests.

Block sizes (``AttentionConfig``): per GPU generation, head dim, dtype and dropout by
``tiles_for(capability, ...)``, which the runtime (``default_config``) and the offline compile
report (``python -m kernels.compile_report``) both call; see there.

Interpreter: for CPU tensors the kernels run under the Triton interpreter whatever TRITON_INTERPRET
said when triton was imported (``kernels.backend.launchable``); CUDA tensors use the compiled kernels. So
tests need not set TRITON_INTERPRET before triton is imported, and do not turn other kernels' GPU
tests into interpreter runs by setting it.
(tl.dot on bf16 is wrong in the triton 3.9 interpreter: test bf16 on a GPU.)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kernels.backend import capability, launchable, setting, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path (attention_sdpa) still works
    triton = None

LOG2E = 1.4426950408889634

# --- 1. kernels ------------------------------------------------------------------------------

if triton is not None:
    _LOG2E = tl.constexpr(LOG2E)  # the kernels' copy: Triton globals must be constexpr

    @triton.jit
    def _load_rows(ptrs, rows_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
        """Load a (rows, BLOCK_D) tile; zero past the head dim and (if CHECK_ROWS) where not rows_ok."""
        if CHECK_ROWS:
            if BLOCK_D == HEAD_DIM:
                x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
            else:
                x = tl.load(ptrs, mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            if BLOCK_D == HEAD_DIM:
                x = tl.load(ptrs)
            else:
                x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        return x

    @triton.jit
    def _store_rows(ptrs, x, rows_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        if BLOCK_D == HEAD_DIM:
            tl.store(ptrs, x, mask=rows_ok[:, None])
        else:
            tl.store(ptrs, x, mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :])

    @triton.jit
    def _dropout_keep(seed, head_row, col, total_tokens, dropout_p):
        """Keep mask for rows head_row = h·T + token (int64) and sample-local key indices col."""
        return tl.rand(seed, head_row * total_tokens + col) >= dropout_p

    @triton.jit
    def _attn_fwd_inner(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt,
        lo, hi, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """KV blocks [lo, hi) for one query block; k_ptrs/v_ptrs point at key lo. MASKED applies the
        length mask (and the causal one if CAUSAL); unmasked blocks must lie fully inside the sample and
        left of the diagonal."""
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k = _load_rows(k_ptrs, cols < seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N) fp32
            if MASKED:
                visible = cols[None, :] < seqlen
                if CAUSAL:
                    visible = visible & (cols[None, :] <= offs_m[:, None])
                qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser uses the undropped p
            acc = acc * alpha[:, None]
            if DROPOUT:
                keep = _dropout_keep(seed, head_rows[:, None], cols[None, :], total_tokens, dropout_p)
                p = tl.where(keep, p, 0.0)
            v = _load_rows(v_ptrs, cols < seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
            m_i = m_new
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["seed"])
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, CU_SEQLENS,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
        total_tokens, qk_scale, dropout_p, seed,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # Launch order (x fastest): every head and sample of the last query block first, so the
        # longest causal rows start first across the whole grid (see _grid_order).
        head = tl.program_id(0)
        seq = tl.program_id(1)
        m_block = tl.num_programs(2) - 1 - tl.program_id(2)
        seq_start = tl.load(CU_SEQLENS + seq)
        seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start
        start_m = m_block * BLOCK_M
        if start_m >= seqlen:
            return
        start = seq_start.to(tl.int64)  # int64 token offsets: total_tokens · stride may pass 2**31
        kv_head = head // GROUP

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows_ok = offs_m < seqlen
        q = _load_rows(Q + (start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                       rows_ok, offs_d, HEAD_DIM, BLOCK_D, True)
        k_ptrs = K + (start + offs_n[:, None]) * stride_kt + kv_head * stride_kh + offs_d[None, :]
        v_ptrs = V + (start + offs_n[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :]
        head_rows = head.to(tl.int64) * total_tokens + start + offs_m  # dropout RNG rows (int64)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if CAUSAL:
            # Left of the diagonal: every key < start_m is visible to every row, no mask.
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt,
                0, start_m, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
                False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
            # The diagonal blocks, causal + length masks. Nothing right of them is visited.
            hi = tl.minimum(start_m + BLOCK_M, seqlen)
            skip = start_m.to(tl.int64)
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_ptrs + skip * stride_kt, v_ptrs + skip * stride_vt, stride_kt, stride_vt,
                start_m, hi, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
                True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
        else:
            full = (seqlen // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt,
                0, full, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
                False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
            skip = full.to(tl.int64)
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_ptrs + skip * stride_kt, v_ptrs + skip * stride_vt, stride_kt, stride_vt,
                full, seqlen, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
                True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)

        # Every row (padding rows past seqlen included) saw key 0, so l_i > 0 and m_i is finite.
        out = acc / l_i[:, None]
        if DROPOUT:
            out = out * (1.0 / (1.0 - dropout_p))
        lse = (m_i + tl.log2(l_i)) * (1.0 / _LOG2E)  # natural log, as flash-attention's softmax_lse
        tl.store(LSE + head.to(tl.int64) * stride_lh + start + offs_m, lse, mask=rows_ok)
        _store_rows(O + (start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :],
                    out.to(O.dtype.element_ty), rows_ok, offs_d, HEAD_DIM, BLOCK_D)

    @triton.jit
    def _attn_bwd_preprocess(
        O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh, total_tokens,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """delta[h, t] = sum_d dO[t, h, d] · O[t, h, d] in fp32 (O is the dropped-out output)."""
        head = tl.program_id(1)
        offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        ok = offs_t < total_tokens
        o = _load_rows(O + offs_t[:, None] * stride_ot + head * stride_oh + offs_d[None, :], ok, offs_d,
                       HEAD_DIM, BLOCK_D, True)
        do = _load_rows(DO + offs_t[:, None] * stride_dot + head * stride_doh + offs_d[None, :], ok, offs_d,
                        HEAD_DIM, BLOCK_D, True)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + head.to(tl.int64) * stride_dh + offs_t, delta, mask=ok)

    @triton.jit
    def _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
        start, kv_head, lo, n_blocks, offs_n, offs_d, seqlen, total_tokens, qk_scale, dropout_p, seed,
        GROUP: tl.constexpr, CAUSAL_MASK: tl.constexpr, DROPOUT: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """The query blocks lo + [0, n_blocks) · BLOCK_M of each of the GROUP query heads of kv_head
        against one KV block, in transposed form (keys on rows). One flat loop over (head, block) so
        the software pipeline runs across heads and the register footprint is that of one head.
        Query rows past seqlen load as zeros (q = dO = 0, lse = delta = 0): they contribute exactly 0."""
        offs_m0 = tl.arange(0, BLOCK_M)
        for it in range(0, GROUP * n_blocks):
            g = it // n_blocks
            head = kv_head * GROUP + g
            head64 = head.to(tl.int64)  # head · total_tokens may pass 2**31
            rows = lo + (it - g * n_blocks) * BLOCK_M + offs_m0
            rows_ok = rows < seqlen
            tok = start + rows  # int64
            q = _load_rows(Q + tok[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                           rows_ok, offs_d, HEAD_DIM, BLOCK_D, True)
            do = _load_rows(DO + tok[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                            rows_ok, offs_d, HEAD_DIM, BLOCK_D, True)
            lse2 = tl.load(LSE + head64 * stride_lh + tok, mask=rows_ok, other=0.0) * _LOG2E
            delta = tl.load(DELTA + head64 * stride_lh + tok, mask=rows_ok, other=0.0)
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
            pT = tl.exp2(qkT * qk_scale - lse2[None, :])
            if CAUSAL_MASK:
                pT = tl.where(rows[None, :] >= offs_n[:, None], pT, 0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # dP of the dropped probabilities
            if DROPOUT:
                keep = _dropout_keep(seed, head64 * total_tokens + tok[None, :], offs_n[:, None], total_tokens,
                                     dropout_p)
                inv_keep = 1.0 / (1.0 - dropout_p)
                pT_used = tl.where(keep, pT * inv_keep, 0.0)
                dpT = tl.where(keep, dpT * inv_keep, 0.0)
            else:
                pT_used = pT
            dv = tl.dot(pT_used.to(do.dtype), do, dv, input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
        return dk, dv

    @triton.jit(do_not_specialize=["seed"])
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
        total_tokens, qk_scale, sm_scale, dropout_p, seed,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        # Early key blocks have the most query blocks: block 0 of every KV head and sample starts
        # first (see _grid_order).
        kv_head = tl.program_id(0)
        seq = tl.program_id(1)
        n_block = tl.program_id(2)
        seq_start = tl.load(CU_SEQLENS + seq)
        seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start
        start_n = n_block * BLOCK_N
        if start_n >= seqlen:
            return
        start = seq_start.to(tl.int64)

        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        cols_ok = offs_n < seqlen
        k = _load_rows(K + (start + offs_n[:, None]) * stride_kt + kv_head * stride_kh + offs_d[None, :],
                       cols_ok, offs_d, HEAD_DIM, BLOCK_D, True)
        v = _load_rows(V + (start + offs_n[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :],
                       cols_ok, offs_d, HEAD_DIM, BLOCK_D, True)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        # The GROUP query heads that share this KV head are summed in registers (no atomics, no
        # repeated K/V, no per-query-head dK/dV buffer).
        n_blocks_total = tl.cdiv(seqlen, BLOCK_M)
        if CAUSAL:
            # Queries before start_n see none of these keys. The diagonal query blocks
            # [start_n, start_n + BLOCK_N) need the causal mask; those after it see every key.
            first = start_n // BLOCK_M
            n_diag = tl.minimum(BLOCK_N // BLOCK_M, n_blocks_total - first)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
                start, kv_head, start_n, n_diag, offs_n, offs_d, seqlen, total_tokens, qk_scale, dropout_p, seed,
                GROUP, True, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
                start, kv_head, start_n + BLOCK_N, n_blocks_total - first - n_diag, offs_n, offs_d, seqlen,
                total_tokens, qk_scale, dropout_p, seed,
                GROUP, False, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC)
        else:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh,
                start, kv_head, 0, n_blocks_total, offs_n, offs_d, seqlen, total_tokens, qk_scale, dropout_p, seed,
                GROUP, False, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PREC)

        dk = dk * sm_scale
        _store_rows(DK + (start + offs_n[:, None]) * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                    dk.to(DK.dtype.element_ty), cols_ok, offs_d, HEAD_DIM, BLOCK_D)
        _store_rows(DV + (start + offs_n[:, None]) * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                    dv.to(DV.dtype.element_ty), cols_ok, offs_d, HEAD_DIM, BLOCK_D)

    @triton.jit
    def _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt,
        lo, hi, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k = _load_rows(k_ptrs, cols < seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
            v = _load_rows(v_ptrs, cols < seqlen, offs_d, HEAD_DIM, BLOCK_D, MASKED)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            p = tl.exp2(qk * qk_scale - lse2[:, None])
            if MASKED:
                visible = cols[None, :] < seqlen
                if CAUSAL:
                    visible = visible & (cols[None, :] <= offs_m[:, None])
                p = tl.where(visible, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            if DROPOUT:
                keep = _dropout_keep(seed, head_rows[:, None], cols[None, :], total_tokens, dropout_p)
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        return dq

    @triton.jit(do_not_specialize=["seed"])
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh, stride_lh,
        total_tokens, qk_scale, sm_scale, dropout_p, seed,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        head = tl.program_id(0)  # the forward's launch order
        seq = tl.program_id(1)
        m_block = tl.num_programs(2) - 1 - tl.program_id(2)
        seq_start = tl.load(CU_SEQLENS + seq)
        seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start
        start_m = m_block * BLOCK_M
        if start_m >= seqlen:
            return
        start = seq_start.to(tl.int64)
        kv_head = head // GROUP

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        rows_ok = offs_m < seqlen
        q = _load_rows(Q + (start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
                       rows_ok, offs_d, HEAD_DIM, BLOCK_D, True)
        do = _load_rows(DO + (start + offs_m[:, None]) * stride_dot + head * stride_doh + offs_d[None, :],
                        rows_ok, offs_d, HEAD_DIM, BLOCK_D, True)
        lse2 = tl.load(LSE + head.to(tl.int64) * stride_lh + start + offs_m, mask=rows_ok, other=0.0) * _LOG2E
        delta = tl.load(DELTA + head.to(tl.int64) * stride_lh + start + offs_m, mask=rows_ok, other=0.0)
        k_ptrs = K + (start + offs_n[:, None]) * stride_kt + kv_head * stride_kh + offs_d[None, :]
        v_ptrs = V + (start + offs_n[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :]
        head_rows = head.to(tl.int64) * total_tokens + start + offs_m

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if CAUSAL:
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt,
                0, start_m, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
                False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
            hi = tl.minimum(start_m + BLOCK_M, seqlen)
            skip = start_m.to(tl.int64)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, k_ptrs + skip * stride_kt, v_ptrs + skip * stride_vt, stride_kt, stride_vt,
                start_m, hi, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
                True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
        else:
            full = (seqlen // BLOCK_N) * BLOCK_N
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt,
                0, full, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
                False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
            skip = full.to(tl.int64)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, k_ptrs + skip * stride_kt, v_ptrs + skip * stride_vt, stride_kt, stride_vt,
                full, seqlen, offs_m, offs_n, offs_d, seqlen, head_rows, total_tokens, qk_scale, dropout_p, seed,
                True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)

        dq = dq * sm_scale
        _store_rows(DQ + (start + offs_m[:, None]) * stride_dqt + head * stride_dqh + offs_d[None, :],
                    dq.to(DQ.dtype.element_ty), rows_ok, offs_d, HEAD_DIM, BLOCK_D)

    @triton.jit(do_not_specialize=["seed"])
    def _dropout_mask_kernel(
        MASK, CU_SEQLENS, stride_mh, stride_mt, total_tokens, dropout_p, seed,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Test helper: MASK[h, t, j] = keep bit of (head h, token t, key j of t's sample), j < seqlen."""
        m_block = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        seq_start = tl.load(CU_SEQLENS + seq)
        seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start
        start = seq_start.to(tl.int64)
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        head_rows = head.to(tl.int64) * total_tokens + start + offs_m
        for start_n in range(0, seqlen, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            keep = _dropout_keep(seed, head_rows[:, None], cols[None, :], total_tokens, dropout_p)
            ptrs = MASK + head.to(tl.int64) * stride_mh + (start + offs_m[:, None]) * stride_mt + cols[None, :]
            tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen) & (cols[None, :] < seqlen))


# --- 2. host functions -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes and launch parameters of the three main kernels (defaults: H100/H200, d = 128,
    bf16/fp16, no dropout; ``tiles_for`` has the tiles of each GPU generation).

    fwd_block_m % fwd_block_n == 0, dq_block_m % dq_block_n == 0 and
    dkdv_block_n % dkdv_block_m == 0 (the diagonal is covered by whole inner blocks).
    """

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dkdv_block_m: int = 32
    dkdv_block_n: int = 64
    dkdv_warps: int = 8
    dkdv_stages: int = 2
    dq_block_m: int = 128
    dq_block_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 2

    def check(self) -> None:
        sizes = [v for f, v in dataclasses.asdict(self).items() if "block" in f]
        if any(s < 16 or s & (s - 1) for s in sizes):
            raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot), got {self}")
        if self.fwd_block_m % self.fwd_block_n or self.dq_block_m % self.dq_block_n:
            raise ValueError(f"fwd/dq block_m must be a multiple of block_n, got {self}")
        if self.dkdv_block_n % self.dkdv_block_m:
            raise ValueError(f"dkdv block_n must be a multiple of block_m, got {self}")


# Interpreter (CPU): the smallest tiles tl.dot accepts; speed is the interpreter's per-op cost.
INTERPRETER_CONFIG = AttentionConfig(16, 16, 1, 1, 16, 16, 1, 1, 16, 16, 1, 1)

# Tiles per GPU generation for d <= 128 in bf16/fp16, without and with dropout. Chosen so that
# every production kernel (Qwen2.5-32B 40/8 heads, Seed-OSS-36B 80/8, d = 128, bf16 and fp16,
# dropout on and off) compiles without register spills and below 255 registers where a candidate
# allowed, with triton 3.6 (the GPU image's) and 3.9 (CI's): `python -m kernels.compile_report`
# prints the figures and fails on a spill; kernels/BENCHMARKS.md has the table and the candidates
# that were rejected. None of them is timed yet (`python -m kernels.bench_attention --attn-sweep`).
# Fields: fwd (block_m, block_n, warps, stages), dK/dV (block_m, block_n, ...), dQ (block_m, ...).
#
# sm_90 (H100/H200): wgmma reads Q/K/V from shared memory, so 128-row tiles fit: forward and dQ
# 128 × 64 (Triton's and flash-attention 2's tile for d = 128); dK/dV holds 64 keys and steps
# over 32 query rows (the former 128 keys sat at exactly 255 registers with triton 3.6 and
# spilled with dropout at GQA group 10 with 3.9; 64 keys also double the dK/dV programs, see
# kernels/BENCHMARKS.md). Dropout (Philox in registers) halves the forward/dQ key tile and the
# dK/dV query step.
# sm_80 (A100): mma.sync keeps the dot operands in registers, so the sm_90 tiles spill (16-56 B):
# forward 128 × 32, dQ 64 × 64, dK/dV 64 keys × 64 query rows; with dropout forward 64 × 32,
# dQ 64 × 32, dK/dV 64 keys × 32 query rows. Shared memory stays below 100 KiB.
_TILES = {
    (90, False): AttentionConfig(128, 64, 8, 3, 32, 64, 8, 2, 128, 64, 8, 2),
    (90, True): AttentionConfig(128, 32, 8, 3, 16, 64, 8, 2, 128, 32, 8, 2),
    (80, False): AttentionConfig(128, 32, 8, 3, 64, 64, 8, 2, 64, 64, 8, 2),
    (80, True): AttentionConfig(64, 32, 8, 3, 32, 64, 8, 2, 64, 32, 8, 2),
}
# fp32 inputs run exact fp32 dots ("ieee": FMA, no tensor cores); every larger tile spills
# kilobytes on sm_80 and sm_90 (32 × 32 forward: 2 KB), 16 × 16 compiles clean. For tests and
# debugging: the model's dispatch (`attention`) sends fp32 CUDA tensors to the torch path.
FP32_CONFIG = AttentionConfig(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1)
# d = 256 (no target model's): half-size tiles, 4 warps; these spill.
WIDE_HEAD_CONFIG = AttentionConfig(64, 32, 4, 2, 16, 64, 4, 2, 64, 32, 4, 2)


def tiles_for(
    capability: int, head_dim: int, *, dtype: torch.dtype = torch.bfloat16, dropout: bool = False
) -> AttentionConfig:
    """The tiles the kernels use on a GPU of compute capability ``capability`` (80: A100, 90:
    H100/H200; below 90 the A100's, from 90 on the H100's). The runtime (``default_config``) and
    the offline compile report (``kernels.compile_report``) both call this."""
    if dtype == torch.float32:
        return FP32_CONFIG
    if _block_d(head_dim) > 128:
        return WIDE_HEAD_CONFIG
    return _TILES[(90 if capability >= 90 else 80), bool(dropout)]


def default_config(
    head_dim: int, device: torch.device, *, dtype: torch.dtype = torch.bfloat16, dropout: bool = False
) -> AttentionConfig:
    """Tiles for tensors on ``device``: 16 × 16 under the interpreter (CPU), else
    ``tiles_for(kernels.backend.capability(device), ...)``."""
    if device.type == "cpu":
        return INTERPRETER_CONFIG
    return tiles_for(capability(device), head_dim, dtype=dtype, dropout=dropout)


def _grid_order(heads: int, n_seqs: int, blocks: int) -> tuple[int, int, int]:
    """Grid of the forward, dK/dV and dQ kernels: (heads, samples, blocks), x fastest, so the
    GPU starts the most loaded block of every head and sample before any lighter block
    (longest-processing-time-first order; see kernels/BENCHMARKS.md for the wave arithmetic).
    Only the launch order differs from a head-major grid: every program computes the same
    values, so results are bit-identical."""
    if blocks > 65535 or n_seqs > 65535:
        raise ValueError(f"{blocks} blocks or {n_seqs} samples exceed the grid's 65535")
    return (heads, n_seqs, blocks)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (total_tokens, heads, head_dim), got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"n_heads {q.shape[1]} is not a multiple of n_kv_heads {k.shape[1]}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] > 256:
        raise ValueError(f"head_dim {q.shape[2]} > 256 is not supported")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of n + 1 >= 2 bounds, got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.numel() - 1 > 65535:  # the grid's y dimension
        raise ValueError(f"at most 65535 samples per call, got {cu_seqlens.numel() - 1}")
    devices = {t.device for t in (q, k, v, cu_seqlens)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v and cu_seqlens must be on one device, got {devices}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: AttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns out (total, n_heads, head_dim) in q's dtype and lse (n_heads, total) fp32 (natural
    log of each row's softmax denominator, scores scaled). cu_seqlens must rise from 0 to total
    and max_seqlen be >= every sample's length (it sizes the grid); neither is checked on the
    device (that would cost a host sync): rows outside cu_seqlens are left unwritten."""
    _check_inputs(q, k, v, cu_seqlens)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    total, n_heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else float(scale)
    config = config or default_config(head_dim, q.device, dtype=q.dtype, dropout=dropout_p > 0)
    config.check()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(n_heads, total, device=q.device, dtype=torch.float32)
    n_seqs = cu_seqlens.numel() - 1
    if total == 0:
        return out, lse
    if max_seqlen <= 0:
        raise ValueError(f"max_seqlen must be the longest sample's length, got {max_seqlen} for {total} tokens")
    grid = _grid_order(n_heads, n_seqs, triton.cdiv(max_seqlen, config.fwd_block_m))
    launchable(_attn_fwd_kernel, q.device)[grid](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        total, scale * LOG2E, float(dropout_p), int(seed),
        GROUP=n_heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        BLOCK_M=config.fwd_block_m, BLOCK_N=config.fwd_block_n,
        CAUSAL=bool(causal), DROPOUT=dropout_p > 0, DOT_PREC=_dot_precision(q.dtype),
        num_warps=config.fwd_warps, num_stages=config.fwd_stages,
    )
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: AttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (in the inputs' dtype) of attention_forward's output given dout; seed and
    dropout_p must be the forward's."""
    _check_inputs(q, k, v, cu_seqlens)
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    total, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    config = config or default_config(head_dim, q.device, dtype=q.dtype, dropout=dropout_p > 0)
    config.check()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    n_seqs = cu_seqlens.numel() - 1
    if total == 0:
        return dq, dk, dv
    if max_seqlen <= 0:
        raise ValueError(f"max_seqlen must be the longest sample's length, got {max_seqlen} for {total} tokens")
    block_d = _block_d(head_dim)
    delta = torch.empty_like(lse)
    block_t = 16 if q.device.type == "cpu" else 64
    launchable(_attn_bwd_preprocess, q.device)[(triton.cdiv(total, block_t), n_heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0), total,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t,
    )
    common = dict(
        GROUP=n_heads // n_kv, HEAD_DIM=head_dim, BLOCK_D=block_d,
        CAUSAL=bool(causal), DROPOUT=dropout_p > 0, DOT_PREC=_dot_precision(q.dtype),
    )
    scalars = (total, scale * LOG2E, scale, float(dropout_p), int(seed))
    dkdv_grid = _grid_order(n_kv, n_seqs, triton.cdiv(max_seqlen, config.dkdv_block_n))
    launchable(_attn_bwd_dkdv_kernel, q.device)[dkdv_grid](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        *scalars, BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n,
        num_warps=config.dkdv_warps, num_stages=config.dkdv_stages, **common,
    )
    dq_grid = _grid_order(n_heads, n_seqs, triton.cdiv(max_seqlen, config.dq_block_m))
    launchable(_attn_bwd_dq_kernel, q.device)[dq_grid](
        q, k, v, dout, lse, delta, dq, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        *scalars, BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n,
        num_warps=config.dq_warps, num_stages=config.dq_stages, **common,
    )
    return dq, dk, dv


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests, debugging): exact fp32 products, not tf32. Ignored for fp16/bf16.
    return "ieee" if dtype == torch.float32 else "tf32"


def dropout_keep_mask(
    cu_seqlens: torch.Tensor, n_heads: int, max_seqlen: int, *, seed: int, dropout_p: float
) -> torch.Tensor:
    """The kernels' dropout keep mask as bool (n_heads, total, max_seqlen): [h, t, j] for key j
    (counted from the start of t's sample, j < its length; False elsewhere). For tests."""
    total = int(cu_seqlens[-1])
    mask = torch.zeros(n_heads, total, max(max_seqlen, 1), dtype=torch.int8, device=cu_seqlens.device)
    block = 64
    if total and max_seqlen > 0:
        launchable(_dropout_mask_kernel, cu_seqlens.device)[
            (triton.cdiv(max_seqlen, block), cu_seqlens.numel() - 1, n_heads)
        ](mask, cu_seqlens, mask.stride(0), mask.stride(1), total, float(dropout_p), int(seed),
          BLOCK_M=block, BLOCK_N=block)
    return mask.bool()[:, :, :max_seqlen]


# --- 3. autograd -----------------------------------------------------------------------------


def _draw_seed() -> int:
    # torch's CPU generator: no device sync, reproducible under torch.manual_seed, and restored by
    # torch.utils.checkpoint so recomputed forwards drop the same elements. Below 2**31 so the
    # kernels' seed argument keeps one integer type (no recompiles).
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, dropout_p, config):
        seed = _draw_seed() if dropout_p > 0 else 0
        out, lse = attention_forward(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale,
                                     dropout_p=dropout_p, seed=seed, config=config)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed, ctx.config = (
            max_seqlen, causal, scale, dropout_p, seed, config)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = attention_backward(
            dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, causal=ctx.causal, scale=ctx.scale,
            dropout_p=ctx.dropout_p, seed=ctx.seed, config=ctx.config,
        )
        return dq, dk, dv, None, None, None, None, None, None


# --- 4. functional API and the model's dispatch point ------------------------------------------


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Attention over packed samples: q (total, n_heads, d), k/v (total, n_kv_heads, d), cu_seqlens
    int32 (n + 1,) -> (total, n_heads, d). max_seqlen (longest sample; computed, with a device
    sync, when None) sizes the grid. scale defaults to d**-0.5; dropout_p acts on the attention
    probabilities (pass 0.0 outside training)."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return FlashAttentionFunction.apply(q, k, v, cu_seqlens, int(max_seqlen), causal, scale, float(dropout_p), config)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention in the model's layout; the dispatch point.

    q: (batch, seq, n_heads, head_dim); k, v: (batch, seq, n_kv_heads, head_dim), where n_heads is
    a multiple of n_kv_heads (query head h reads KV head h // (n_heads // n_kv_heads), as HF's
    repeat_kv). Returns (batch, seq, n_heads, head_dim). ``dropout_p`` applies to the attention
    probabilities; callers pass 0.0 outside training.

    Padding-free packing: with ``cu_seqlens`` (int tensor (num_samples + 1,), rising from 0 to
    seq), batch must be 1 and the row holds samples back to back; attention never crosses their
    boundaries (the caller restarts positions at each: ``engine.models.positions``). A packed row
    is already the kernels' varlen layout, one reshape away.

    The kernels when ``kernels.backend.use_triton(q, k, v)``, else :func:`attention_sdpa`; fp32
    CUDA tensors also take :func:`attention_sdpa` unless the kernels are forced
    (``force("triton")``): the kernels' exact fp32 dots only compile without spills on 16 × 16
    tiles (``FP32_CONFIG``), far slower than SDPA.
    """
    if use_triton(q, k, v) and not (q.is_cuda and q.dtype == torch.float32 and setting() != "triton"):
        return _flash_attention(q, k, v, cu_seqlens=cu_seqlens, dropout_p=dropout_p, scale=scale)
    return attention_sdpa(q, k, v, cu_seqlens=cu_seqlens, dropout_p=dropout_p, scale=scale)


@torch.compiler.disable  # a graph break under torch.compile: the kernels launch eagerly
def _flash_attention(q, k, v, *, cu_seqlens, dropout_p, scale):
    """The kernels over (total_tokens, heads, head_dim): a packed row is already one; a plain
    batch becomes b samples of s tokens."""
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


# --- the torch path and the oracle -------------------------------------------------------------


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`attention` in torch: ``F.scaled_dot_product_attention``, as transformers' "sdpa"
    path calls it; a packed row runs one causal SDPA per sample."""
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
        # A block-diagonal causal mask without materialising the (total, total) mask. Empty
        # samples contribute nothing.
        out = torch.cat(
            [sdpa(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]) for s, e in zip(bounds[:-1], bounds[1:]) if e > s],
            dim=2,
        )
    return out.transpose(1, 2)




def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Per-sample explicit softmax attention, in fp32 when upcast (else in the inputs' dtype), with
    the same (total, heads, d) layout and GQA convention. dropout_mask (n_heads, total, >= max
    length) bool, as ``dropout_keep_mask`` returns, applies dropout with those kept elements.
    Returns the inputs' dtype (fp32 results of fp16 inputs: pass q.float() etc.)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    n_heads, head_dim = q.shape[1], q.shape[2]
    group = n_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qs = q[s:e].transpose(0, 1)  # (h, n, d)
        ks = k[s:e].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[s:e].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale  # (h, n, n)
        if causal:
            n = e - s
            future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if dropout_mask is not None:
            probs = probs * dropout_mask[:, s:e, : e - s].to(probs.dtype) / (1.0 - dropout_p)
        elif dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        outs.append((probs @ vs).transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape).to(dtype)
    return torch.cat(outs, dim=0).to(dtype)
