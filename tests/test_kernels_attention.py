"""Varlen GQA flash attention (kernels/attention.py) against its fp32 oracle ``attention_ref``.

On CPU the Triton kernels run under the Triton interpreter on tiny shapes (≤ 70 tokens, 2-4
query / 1-2 KV heads, head dims 8-24, 16- and 32-row tiles; ~10 s for the file on 2 cores).
kernels.attention runs CPU tensors interpreted whatever TRITON_INTERPRET said when triton was
imported (in a full pytest run other modules import triton first, so the variable would be read
too late), hence this module does not set it and leaves other kernels' tests as they are;
``test_interpreter_launch_leaves_triton_as_it_was`` checks that a launch undoes what it patches.
With TRITON_INTERPRET=1 set before triton's import, every kernel is interpreted the usual way and
these tests pass too.

Tolerances: fp32 inputs run fp32 dots ("ieee") with fp32 softmax statistics, the same arithmetic
as the oracle in another summation order and with exp2 instead of exp, so the differences are a
few ulp of the values times the reduction lengths (≤ 70 keys, ≤ 2 heads per group): ~1e-6 on
O(1)-O(10) values; 1e-5 relative to the largest magnitude leaves a 10× margin. fp16 inputs:
flash-attention's rule, error vs the fp32 oracle ≤ 2 × the error of the same reference computed
in fp16 (plus fp16's rounding of the result). bf16 cannot be checked in the interpreter (tl.dot on
bf16 is wrong there): the CUDA-only tests at the end check bf16 on the issue's mixed lengths.
"""

from __future__ import annotations

import pytest
import torch

import kernels.attention as ka
from kernels.backend import force

TILES_32 = ka.AttentionConfig(32, 16, 1, 1, 16, 32, 1, 1, 32, 16, 1, 1)  # block_m != block_n paths
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(lengths, n_heads, n_kv, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = int(cu[-1])
    q, k, v, do = (torch.randn(total, h, d, generator=g, device=device).to(dtype)
                   for h in (n_heads, n_kv, n_kv, n_heads))
    return q, k, v, do, cu, max(lengths)


def _ref_grads(q, k, v, do, cu, *, upcast=True, **kw):
    """Reference output and dq, dk, dv by autograd; fp32 when upcast (inputs are promoted)."""
    leaves = [(t.float() if upcast else t).detach().requires_grad_() for t in (q, k, v)]
    out = ka.attention_ref(*leaves, cu, **kw)
    out.backward(do.float() if upcast else do)
    return [out.detach(), *(t.grad for t in leaves)]


def _kernel_grads(q, k, v, do, cu, max_seqlen, **kw):
    out, lse = ka.attention_forward(q, k, v, cu, max_seqlen, **kw)
    return [out, *ka.attention_backward(do, q, k, v, out, lse, cu, max_seqlen, **kw)], lse


def _assert_close_fp32(got, want, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        tol = 1e-5 * max(1.0, b.abs().max().item())
        err = (a.float() - b).abs().max().item()
        assert err <= tol, f"{name}: max error {err:.2e} > {tol:.2e}"


CASES = {
    # lengths 1, 5, 17 (not a multiple of the 16-row tile) and an empty sample; group 2 over two
    # KV heads.
    "varlen_gqa2": dict(lengths=[1, 5, 0, 17, 13], n_heads=4, n_kv=2, d=16),
    # group 1 (MHA); trailing empty sample.
    "varlen_mha": dict(lengths=[17, 3, 0], n_heads=2, n_kv=2, d=16),
    # multi-query (group 3), head_dim 24 padded to a 32-wide tile (Seed-OSS test shapes).
    "mqa_d24": dict(lengths=[9, 0, 20], n_heads=3, n_kv=1, d=24),
    # head_dim 8 (< the 16 tl.dot needs: padded), one sample.
    "d8": dict(lengths=[23], n_heads=2, n_kv=1, d=8),
    # 32-row query tiles / 32-key dK-dV tiles: two 16-key blocks per diagonal, skipped blocks.
    "tiles32": dict(lengths=[1, 40, 0, 5, 17], n_heads=2, n_kv=1, d=16, config=TILES_32),
    # non-causal: full key blocks and a partial tail block (40 = 2 × 16 + 8; 7 < 16).
    "noncausal": dict(lengths=[40, 0, 7], n_heads=2, n_kv=1, d=16, causal=False, config=TILES_32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_backward_fp32(case):
    spec = dict(CASES[case])
    causal, config = spec.pop("causal", True), spec.pop("config", None)
    q, k, v, do, cu, max_seqlen = _inputs(**spec)
    got, lse = _kernel_grads(q, k, v, do, cu, max_seqlen, causal=causal, config=config)
    _assert_close_fp32(got, _ref_grads(q, k, v, do, cu, causal=causal))
    # LSE: natural-log softmax denominators of the scaled scores, (heads, total).
    qh, kh = q.transpose(0, 1), k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(0, 1)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            scores = qh[:, s:e] @ kh[:, s:e].transpose(1, 2) * q.shape[2] ** -0.5
            if causal:
                scores = scores.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
            torch.testing.assert_close(lse[:, s:e], scores.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_forward_backward_fp16():
    q, k, v, do, cu, max_seqlen = _inputs([1, 17, 0, 33], 2, 1, 16, dtype=torch.float16)
    got, _ = _kernel_grads(q, k, v, do, cu, max_seqlen)
    want = _ref_grads(q, k, v, do, cu)  # fp32 oracle
    torch_fp16 = _ref_grads(q, k, v, do, cu, upcast=False)  # the same maths in fp16
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, torch_fp16):
        assert a.dtype == torch.float16
        err = (a.float() - b).abs().max().item()
        torch_err = (c.float() - b).abs().max().item()
        rounding = (b.half().float() - b).abs().max().item()
        assert err <= 2 * torch_err + rounding, f"{name}: {err:.2e} vs torch fp16 {torch_err:.2e}"


# --- dropout -----------------------------------------------------------------------------------


def test_dropout_mask_statistics():
    lengths, n_heads, p = [1, 40, 0, 29], 4, 0.25
    cu = torch.tensor([0, 1, 41, 41, 70], dtype=torch.int32)
    mask = ka.dropout_keep_mask(cu, n_heads, max(lengths), seed=7, dropout_p=p)
    valid = torch.zeros_like(mask)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        valid[:, s:e, : e - s] = True
    assert not mask[~valid].any()
    kept = mask[valid].float()  # 4 × (1 + 1600 + 841) = 9768 draws
    assert abs(kept.mean().item() - (1 - p)) < 0.02  # ±0.02 ≈ 4.5 standard deviations
    # Distinct streams per head and per seed, identical for the same seed.
    assert (mask[0] != mask[1]).any()
    assert torch.equal(mask, ka.dropout_keep_mask(cu, n_heads, max(lengths), seed=7, dropout_p=p))
    assert not torch.equal(mask, ka.dropout_keep_mask(cu, n_heads, max(lengths), seed=8, dropout_p=p))
    # Rows are not repeated: the 40-token sample's rows differ from each other.
    rows = mask[0, 1:41, :40]
    assert len({tuple(r.tolist()) for r in rows}) == 40


def test_dropout_matches_reference_with_the_kernels_mask():
    """Causal: covers the masked and unmasked key loops of all three kernels (the 17-token sample
    spans two 16-row tiles); non-causal dropout runs the same inner loops."""
    causal = True
    q, k, v, do, cu, max_seqlen = _inputs([1, 0, 17, 13], 2, 1, 16)
    p, seed = 0.3, 1234
    got, _ = _kernel_grads(q, k, v, do, cu, max_seqlen, causal=causal, dropout_p=p, seed=seed)
    mask = ka.dropout_keep_mask(cu, 2, max_seqlen, seed=seed, dropout_p=p)
    _assert_close_fp32(got, _ref_grads(q, k, v, do, cu, causal=causal, dropout_p=p, dropout_mask=mask))


def test_dropout_autograd_determinism():
    q, k, v, do, cu, max_seqlen = _inputs([5, 17], 2, 1, 16)

    def run(seed, backward=True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(seed)
        out = ka.flash_attention_varlen(*leaves, cu, max_seqlen, dropout_p=0.2)
        if not backward:
            return [out.detach()]
        out.backward(do)
        return [out.detach(), *(t.grad for t in leaves)]

    first, again, other = run(0), run(0), run(1, backward=False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    no_dropout = ka.flash_attention_varlen(q, k, v, cu, max_seqlen)
    assert (first[0] - no_dropout).abs().max() > 1e-2


def test_dropout_under_activation_checkpointing():
    """torch.utils.checkpoint restores the CPU RNG state for the recomputed forward, so the
    recomputation draws the same seed and the gradients equal those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    q, k, v, do, cu, max_seqlen = _inputs([5, 17], 2, 1, 16)

    def grads(use_checkpoint):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(3)
        f = lambda *t: ka.flash_attention_varlen(*t, cu, max_seqlen, dropout_p=0.25)  # noqa: E731
        out = checkpoint(f, *leaves, use_reentrant=False) if use_checkpoint else f(*leaves)
        out.backward(do)
        return [out.detach(), *(t.grad for t in leaves)]

    assert all(torch.equal(a, b) for a, b in zip(grads(False), grads(True)))


# --- API edges ---------------------------------------------------------------------------------


def test_autograd_function_matches_host_functions_and_max_seqlen_default():
    q, k, v, do, cu, max_seqlen = _inputs([17, 6], 2, 1, 16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ka.flash_attention_varlen(*leaves, cu)  # max_seqlen computed from cu_seqlens
    out.backward(do)
    got, _ = _kernel_grads(q, k, v, do, cu, max_seqlen)
    for a, b in zip([out.detach(), *(t.grad for t in leaves)], got):
        assert torch.equal(a, b)


def test_all_empty_and_strided_inputs():
    q = torch.zeros(0, 4, 16)
    k = v = torch.zeros(0, 2, 16)
    cu = torch.zeros(3, dtype=torch.int32)
    assert ka.flash_attention_varlen(q, k, v, cu).shape == (0, 4, 16)
    # Non-contiguous token/head strides are read in place (here q is a slice of a fused qkv).
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(11, 8, 16, generator=g)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    out, _ = ka.attention_forward(q, k, v, cu, 7)
    _assert_close_fp32([out], [ka.attention_ref(q, k, v, cu)])


def test_bad_inputs():
    q, k, v, _, cu, m = _inputs([4, 4], 4, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        ka.attention_forward(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu, m)
    with pytest.raises(ValueError, match="int32"):
        ka.attention_forward(q, k, v, cu.long(), m)
    with pytest.raises(ValueError, match="share"):
        ka.attention_forward(q.half(), k, v, cu, m)
    with pytest.raises(ValueError, match="dropout_p"):
        ka.flash_attention_varlen(q, k, v, cu, m, dropout_p=1.0)
    with pytest.raises(ValueError, match="multiple of block_n"):
        ka.attention_forward(q, k, v, cu, m, config=ka.AttentionConfig(16, 32, 1, 1, 16, 16, 1, 1, 16, 16, 1, 1))
    # The model's dispatch validates cu_seqlens on the Triton path as on the reference one.
    with force("triton"):
        with pytest.raises(ValueError, match="row length 8"):
            ka.attention(q[None], k[None], v[None], cu_seqlens=torch.tensor([0, 4]))
        with pytest.raises(ValueError, match="batch 1"):
            ka.attention(q[None].expand(2, -1, -1, -1), k[None].expand(2, -1, -1, -1),
                            v[None].expand(2, -1, -1, -1), cu_seqlens=torch.tensor([0, 8]))


def test_interpreter_launch_leaves_triton_as_it_was(monkeypatch):
    """A launch through kernels.backend.InterpretedKernel undoes what it patches.

    With TRITON_INTERPRET=1 set when triton was imported, the @jit functions are triton's own
    InterpretedFunctions and launchable hands them back as they are, so the launch is routed
    through InterpretedKernel here explicitly, with the JITFunction that @triton.jit makes
    otherwise: the same launch either way. Triton's own interpreted launches leave
    triton.language patched, so then the check is that ours changed nothing; without
    TRITON_INTERPRET, also that the builtins compiled kernels need are all there."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from kernels.backend import InterpretedKernel

    def as_jit(fn):
        return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)

    def language_state():
        return ("__index__" in vars(tl.core.tensor), JITFunction.__call__,
                {(module.__name__, name): getattr(module, name) for module in (tl, tl.core, tl.math)
                 for name in ("full", "load", "dot", "exp2", "umulhi") if hasattr(module, name)})

    interpreted_at_import = not isinstance(ka._attn_fwd_kernel, JITFunction)
    monkeypatch.setattr(ka, "launchable", lambda kernel, device: InterpretedKernel(as_jit(kernel)))
    before = language_state()
    q, k, v, _, cu, m = _inputs([3], 4, 2, 16)
    out, _ = ka.attention_forward(q, k, v, cu, m)
    _assert_close_fp32([out], [ka.attention_ref(q, k, v, cu)], ["out"])  # the launch did run the kernel
    assert language_state() == before
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        as_jit(ka._load_rows)(None, None, None, 16, 16, False)
    if not interpreted_at_import:  # compiled kernels need triton.language's builtins, unpatched
        has_index, _, functions = before
        assert not has_index
        for (module, name), function in functions.items():
            assert getattr(function, "__triton_builtin__", False), f"{module}.{name}"


# --- the model through the dispatch point ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    import engine.models as em

    # Seed-OSS layout (q/k/v and o_proj biases, attention dropout 0.1: inactive in eval mode).
    config = dict(architectures=["SeedOssForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  attention_out_bias=True, residual_dropout=0.0, initializer_range=0.2, rope_theta=1e4)
    torch.manual_seed(0)
    model = em.CausalLM(em.ModelArgs.from_hf_config(config))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model.eval()


def _logits_and_grads(model, backend, ids, **kw):
    model.zero_grad()
    with force(backend):
        logits = model(ids, **kw)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_model_triton_matches_reference(tiny_model, packed):
    g = torch.Generator().manual_seed(4)
    if packed:  # int64 cu_seqlens as the model's callers may pass; the dispatch converts them
        ids, kw = torch.randint(0, 128, (1, 24), generator=g), dict(cu_seqlens=torch.tensor([0, 5, 5, 17, 18, 24]))
    else:
        ids, kw = torch.randint(0, 128, (2, 11), generator=g), {}
    ref_logits, ref_grads = _logits_and_grads(tiny_model, "reference", ids, **kw)
    logits, grads = _logits_and_grads(tiny_model, "triton", ids, **kw)
    _assert_close_fp32([logits, *grads.values()], [ref_logits, *ref_grads.values()], ["logits", *grads])


# --- CUDA: bf16/fp16 on the shapes -----------------------------------------------------


def _assert_low_precision_rule(got, q, k, v, do, cu, **mask_kw):
    """flash-attention's rule: error vs the fp32 oracle ≤ 2 × the error of the same reference
    computed in the inputs' precision (+ the rounding of the result to that precision)."""
    want = _ref_grads(q, k, v, do, cu, **mask_kw)
    torch_low = _ref_grads(q, k, v, do, cu, upcast=False, **mask_kw)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, torch_low):
        err = (a.float() - b).abs().max().item()
        torch_err = (c.float() - b).abs().max().item()
        rounding = (b.to(q.dtype).float() - b).abs().max().item()
        assert err <= 2 * torch_err + rounding, f"{name}: {err:.2e} vs torch {q.dtype} {torch_err:.2e}"


def _check_against_torch_low_precision(lengths, n_heads, n_kv, d, dtype, **kw):
    q, k, v, do, cu, max_seqlen = _inputs(lengths, n_heads, n_kv, d, dtype=dtype, device="cuda")
    got, _ = _kernel_grads(q, k, v, do, cu, max_seqlen, **kw)
    mask_kw = {}
    if kw.get("dropout_p"):
        mask = ka.dropout_keep_mask(cu, n_heads, max_seqlen, seed=kw["seed"], dropout_p=kw["dropout_p"])
        mask_kw = dict(dropout_p=kw["dropout_p"], dropout_mask=mask)
    _assert_low_precision_rule(got, q, k, v, do, cu, **mask_kw)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize(("n_heads", "n_kv"), [(40, 8), (80, 8)], ids=["qwen2.5-32b", "seed-oss-36b"])
def test_cuda_bf16_mixed_lengths(n_heads, n_kv):
    _check_against_torch_low_precision([1, 17, 128, 1000, 0, 4096], n_heads, n_kv, 128, torch.bfloat16)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_fp16_and_head_dims(d):
    _check_against_torch_low_precision([1, 17, 128, 1000, 333], 16, 4, d, torch.float16)


@pytest.mark.gpu
@cuda
def test_cuda_bf16_dropout():
    _check_against_torch_low_precision([1, 17, 128, 1000], 40, 8, 128, torch.bfloat16, dropout_p=0.1, seed=99)


@pytest.mark.gpu
@cuda
def test_cuda_fp32_and_noncausal():
    q, k, v, do, cu, max_seqlen = _inputs([1, 17, 300, 0, 129], 8, 2, 128, device="cuda")
    for causal in (True, False):
        got, _ = _kernel_grads(q, k, v, do, cu, max_seqlen, causal=causal)
        _assert_close_fp32(got, _ref_grads(q, k, v, do, cu, causal=causal))


@pytest.mark.gpu
@cuda
def test_cuda_dispatch_sends_fp32_to_sdpa(monkeypatch):
    """fp32 CUDA tensors take the torch path in the model's dispatch (the kernels' exact fp32 dots
    only compile without spills on 16 × 16 tiles); force("triton") still reaches the kernels."""
    calls = []
    real = ka.flash_attention_varlen
    monkeypatch.setattr(ka, "flash_attention_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = torch.randn(1, 33, 8, 64, device="cuda")
    k = v = torch.randn(1, 33, 2, 64, device="cuda")
    out = ka.attention(q, k, v)
    assert not calls
    with force("triton"):
        forced = ka.attention(q, k, v)
    assert calls == [1]
    assert (out - forced).abs().max().item() < 1e-4


@pytest.mark.gpu
@cuda
def test_cuda_int64_offsets():
    """total_tokens · n_heads · head_dim > 2**31: the last samples' element offsets pass int32."""
    n_heads, n_kv, d, length = 40, 8, 128, 512
    n = 2**31 // (n_heads * d * length) + 3  # 822 samples, 420,864 tokens; q alone 4.3 GB in bf16
    q, k, v, do, cu, max_seqlen = _inputs([length] * n, n_heads, n_kv, d, dtype=torch.bfloat16, device="cuda")
    assert int(cu[-3]) * n_heads * d > 2**31
    got, _ = _kernel_grads(q, k, v, do, cu, max_seqlen)
    tail = slice(int(cu[-4]), int(cu[-1]))  # the last three samples, checked on their own
    cu_tail = (cu[-4:] - cu[-4]).contiguous()
    _assert_low_precision_rule([t[tail] for t in got], *(t[tail] for t in (q, k, v, do)), cu_tail)


@pytest.mark.gpu
@cuda
def test_cuda_model_dispatch_routes_to_triton(monkeypatch):
    calls = []
    real = ka.flash_attention_varlen
    monkeypatch.setattr(ka, "flash_attention_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = torch.randn(2, 33, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = v = torch.randn(2, 33, 2, 64, device="cuda", dtype=torch.bfloat16)
    out = ka.attention(q, k, v)
    assert calls and out.shape == q.shape
    with force("reference"):
        ref = ka.attention(q.float(), k.float(), v.float())
    assert (out.float() - ref).abs().max() < 2e-2
