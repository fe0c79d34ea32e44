"""Fused linear cross-entropy (kernels/cross_entropy.py): the Triton path against the torch fp32 reference.

Without a GPU the Triton path runs under the Triton interpreter on tiny shapes (CPU tensors are
launched through `kernels.backend.launchable`), so the real kernel code runs in every CI run.
``test_gpu_*`` need CUDA (compiled kernels, bf16 at real sizes).

Tolerances: fp32 ≤ 1e-5 relative. Half precision follows flash-attention's rule: the kernel's
error against the fp32 reference must be at most ~2× the error of the reference itself computed
in that half dtype (plus fixed caps: fp16 loss ≤ 1e-3, grads ≤ 1e-2).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.utils._python_dispatch

from kernels import backend
from kernels import cross_entropy as ce
from tests.launches import record_launches

CUDA = torch.cuda.is_available()

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(n=29, h=48, v=203, dtype=torch.float32, ignored=0.3, seed=0, device="cpu", scale=0.5):
    """hidden (n, h), weight (v, h), targets (n,) with about `ignored` of them IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * scale
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignored] = ce.IGNORE_INDEX
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device)


def run(path, hidden, weight, targets, *, weight_grad=False, upcast=False, **kw):
    """(loss, hidden.grad, weight.grad) of one forward + backward on `path`."""
    h = hidden.detach().clone()
    w = weight.detach().clone()
    if upcast:
        h, w = h.float(), w.float()
    h.requires_grad_(True)
    w.requires_grad_(weight_grad)
    with backend.force(path):
        loss = ce.linear_cross_entropy(h, w, targets, **kw)
    loss.backward()
    return loss, h.grad, w.grad


def row_losses(hidden, weight, targets, **kw):
    """The Triton host function's per-row losses and d hidden of trained rows, and the
    reference's: fp32 cross-entropy of the same rounded logits, and its autograd gradient."""
    got, d_hidden, _ = ce.linear_cross_entropy_forward(hidden, weight, targets, **kw)
    h = hidden.detach().clone().requires_grad_(True)
    want = torch.nn.functional.cross_entropy((h @ weight.t()).float(), targets, reduction="none")
    (want_d_hidden,) = torch.autograd.grad(want.sum(), h)
    return got, d_hidden, want.detach(), want_d_hidden


def assert_close(got, want, tol, what=""):
    (lg, hg, wg), (lw, hw, ww) = got, want
    assert lg.dtype == torch.float32 and lg.dim() == 0
    assert rel(lg, lw) <= tol, f"{what} loss {lg.item()} vs {lw.item()}"
    assert rel(hg, hw) <= tol, f"{what} hidden grad rel {rel(hg, hw)}"
    assert (wg is None) == (ww is None)
    if ww is not None:
        assert rel(wg, ww) <= tol, f"{what} weight grad rel {rel(wg, ww)}"


# --- the Triton path under the interpreter ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "v", "chunk_rows", "block_v", "weight_grad"),
    [
        (24, 203, 8, 128, False),  # several chunks (8, 8, ~2 trained rows), V not a multiple of the block
        (24, 203, 8, 128, True),  # W requires grad: fp32-accumulated over the chunks
        (1, 97, None, 64, True),  # N = 1
        (17, 256, 32, 256, False),  # one chunk, one block exactly
    ],
)
def test_interp_fp32_matches_reference(n, v, chunk_rows, block_v, weight_grad):
    hidden, weight, targets = make(n=n, v=v)
    kw = dict(weight_grad=weight_grad, chunk_rows=chunk_rows, block_v=block_v)
    assert_close(run("triton", hidden, weight, targets, **kw), run("reference", hidden, weight, targets, **kw), 1e-5)


def test_interp_path_launches_the_triton_kernels(monkeypatch):
    """The Triton path really runs the kernels (interpreted on CPU), not the reference; seen at
    ``launchable``, so with TRITON_INTERPRET=1 set as without."""
    launched = record_launches(monkeypatch, ce)
    hidden, weight, targets = make(n=6, v=50)
    run("triton", hidden, weight, targets)
    assert launched == ["_lce_rows_kernel", "_scale_kernel"]
    launched.clear()
    run("reference", hidden, weight, targets)
    assert launched == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interp_half_precision_within_dtype_noise(dtype):
    # The kernels only load/store half values and compute in fp32 (the GEMMs are torch's), so bf16
    # works under the interpreter too; the compiled bf16 path is test_gpu_bf16_matches_reference.
    hidden, weight, targets = make(n=24, v=211, dtype=dtype)
    kw = dict(weight_grad=True, chunk_rows=8, block_v=128)
    exact = run("reference", hidden, weight, targets, upcast=True, **kw)  # same inputs, fp32 math
    ref_half = run("reference", hidden, weight, targets, **kw)
    got = run("triton", hidden, weight, targets, **kw)
    caps = {torch.float16: (1e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2)}[dtype]
    for i, cap in ((0, caps[0]), (1, caps[1]), (2, caps[1])):
        err = rel(got[i], exact[i])
        noise = rel(ref_half[i], exact[i])
        assert err <= min(cap, 2 * noise + 1e-6), f"output {i}: kernel {err:.2e}, reference in {dtype} {noise:.2e}"


@pytest.mark.parametrize("weight_grad", [False, True])
def test_interp_all_rows_ignored(weight_grad):
    hidden, weight, targets = make(n=6, v=50)
    targets[:] = ce.IGNORE_INDEX
    for path in ("triton", "reference"):
        loss, gh, gw = run(path, hidden, weight, targets, weight_grad=weight_grad)
        assert loss.item() == 0.0 and loss.requires_grad, path  # 0, never NaN, attached
        assert torch.equal(gh, torch.zeros_like(gh))
        assert gw is None if not weight_grad else torch.equal(gw, torch.zeros_like(gw))


def test_interp_row_losses_and_gradients():
    """Per trained row (the host function's output, which the loss sums): each loss and each row of
    d hidden against torch's cross-entropy of the same logits, over several chunks and blocks."""
    hidden, weight, targets = make(n=23, v=130, ignored=0.0)
    got, d_hidden, want, want_d_hidden = row_losses(hidden, weight, targets, chunk_rows=8, block_v=64)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert rel(d_hidden, want_d_hidden) <= 1e-5


def test_interp_leading_dims_are_flattened():
    hidden, weight, targets = make(n=24, v=90)
    batched = run("triton", hidden.view(2, 12, -1), weight, targets.view(2, 12), block_v=64)
    flat = run("triton", hidden, weight, targets, block_v=64)
    assert torch.equal(batched[0], flat[0]) and torch.equal(batched[1].view(24, -1), flat[1])


def test_interp_frozen_weight_runs_no_weight_gemm(monkeypatch):
    calls = []
    real = ce._addmm_fp32_
    monkeypatch.setattr(ce, "_addmm_fp32_", lambda *a: calls.append(1) or real(*a))
    hidden, weight, targets = make(n=20, v=80)
    _, gh, gw = run("triton", hidden, weight, targets, chunk_rows=8, block_v=32)
    assert gw is None and gh is not None and calls == []  # frozen: W.grad stays None, GEMM never run
    _, _, gw = run("triton", hidden, weight, targets, weight_grad=True, chunk_rows=8, block_v=32)
    assert gw is not None and len(calls) == 2  # 2 chunks of trained rows


def test_interp_no_gradients_computed_without_grad(monkeypatch):
    seen = []
    real = ce.linear_cross_entropy_forward
    monkeypatch.setattr(ce, "linear_cross_entropy_forward", lambda *a, **k: seen.append(k) or real(*a, **k))
    hidden, weight, targets = make(n=10, v=64)
    hidden.requires_grad_(True)
    with torch.no_grad(), backend.force("triton"):
        loss = ce.linear_cross_entropy(hidden, weight, targets, block_v=32)
    with backend.force("reference"):
        want = ce.linear_cross_entropy(hidden.detach(), weight, targets)
    assert rel(loss, want) <= 1e-5 and not loss.requires_grad
    assert seen and not seen[0]["grad_hidden"] and not seen[0]["grad_weight"]


def test_interp_backward_scales_by_grad_output_and_retains_graph():
    hidden, weight, targets = make(n=12, v=70)
    h = hidden.clone().requires_grad_(True)
    with backend.force("triton"):
        loss = ce.linear_cross_entropy(h, weight, targets, block_v=32)
    (3.0 * loss).backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    loss.backward()  # the stored gradient was not modified in place by the first backward
    assert torch.allclose(first, 3.0 * h.grad, rtol=1e-6)
    _, want, _ = run("reference", hidden, weight, targets)
    assert rel(h.grad, want) <= 1e-5


def test_interp_out_of_range_target_is_nan_not_a_crash():
    hidden, weight, targets = make(n=5, v=40, ignored=0.0)
    targets[2] = 40
    with backend.force("triton"):
        loss = ce.linear_cross_entropy(hidden, weight, targets, block_v=16)
    row_loss, _, _ = ce.linear_cross_entropy_forward(hidden, weight, targets, grad_hidden=False, block_v=16)
    assert loss.isnan() and row_loss[2].isnan() and row_loss[[0, 1, 3, 4]].isfinite().all()


def test_interp_model_loss_and_grads_match_reference(monkeypatch):
    from engine.models import CausalLM, ModelArgs

    config = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=131, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  rope_theta=1e6, rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = CausalLM(ModelArgs.from_hf_config(config))
    model.init_weights()
    ids = torch.randint(0, 131, (2, 11))
    targets = torch.randint(0, 131, (2, 11))
    targets[:, :4] = ce.IGNORE_INDEX
    results = {}
    for path in ("reference", "triton"):
        model.zero_grad(set_to_none=True)
        # Only the loss takes the Triton path; everything else (attention) keeps its reference.
        monkeypatch.setattr(ce, "use_triton", lambda *t, _p=path: _p == "triton")
        loss = model(ids, targets=targets)
        loss.backward()
        results[path] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (lt, gt), (lr, gr) = results["triton"], results["reference"]
    assert rel(lt, lr) <= 1e-5
    for name in gr:
        assert rel(gt[name], gr[name]) <= 1e-5, name


# --- reference semantics and host logic (no kernel) -------------------------------------------------------


def test_reference_equals_torch_cross_entropy():
    hidden, weight, targets = make(n=40, v=100, dtype=torch.bfloat16)
    logits = (hidden @ weight.t()).float()  # the model's rounding: bf16 logits, fp32 loss
    with backend.force("reference"):
        got = ce.linear_cross_entropy(hidden, weight, targets)
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6)


def _one_shot_reference(hidden, weight, targets):
    """The reference as it was: every trained row's logits at once, autograd's gradient."""
    hidden, targets, rows = ce._select(hidden, targets)
    logits = (hidden.index_select(0, rows) @ weight.t()).float()
    trained = targets.index_select(0, rows)
    return (torch.logsumexp(logits, dim=-1) - logits.gather(1, trained.unsqueeze(1)).squeeze(1)).sum()


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """The bytes of the largest tensor any op makes while active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_reference_makes_no_tensor_of_all_trained_rows_logits():
    """Bug: the CPU path made every trained row's logits at once, several times over (fp32 copies,
    softmax, gradient): on the paper's EM workload twice the peak memory of transformers + PEFT.
    It now works in chunks of at most REF_CHUNK_BYTES (32 MiB) of fp32 logits."""
    hidden, weight, targets = make(n=300, h=16, v=50_021, ignored=0.3)
    trained = int((targets != ce.IGNORE_INDEX).sum())
    with backend.force("reference"), _LargestTensor() as seen:
        loss = ce.linear_cross_entropy(hidden.clone().requires_grad_(True), weight, targets)
        loss.backward()
    assert seen.largest <= 32 * 2**20 < trained * 50_021 * 4
    assert rel(loss, _one_shot_reference(hidden, weight, targets)) <= 4 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_chunked_and_exact_up_to_summation_order(dtype):
    """Chunked, the reference's loss and gradients are those of the one-shot formula up to
    summation order, and no tensor is larger than one chunk's fp32 logits."""
    eps = torch.finfo(torch.float32).eps
    n, v, chunk = 300, 4099, 32  # several chunks of a small vocabulary, d W too
    hidden, weight, targets = make(n=n, h=16, v=v, dtype=dtype, ignored=0.3)  # h < chunk: (v, h) tensors are smaller
    trained = int((targets != ce.IGNORE_INDEX).sum())
    results = {}
    for name, fn in (("one-shot", _one_shot_reference),
                     ("chunked", lambda h, w, t: ce.linear_cross_entropy_ref(h, w, t, chunk_rows=chunk))):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with _LargestTensor() as seen:
            loss = fn(h, w, targets)
            (0.37 * loss).backward()  # a grad_output other than 1, as the trainer's 1 / trained tokens
        results[name] = (loss.detach(), h.grad, w.grad, seen.largest)
    (l0, h0, w0, big), (l1, h1, w1, largest) = results["one-shot"], results["chunked"]
    assert rel(l1, l0) <= 4 * eps
    assert rel(h1, h0) <= 4 * eps  # d hidden: the same per-row arithmetic (matmul blocking aside)
    # d W: a sum over the trained rows, reordered (chunk by chunk, in fp32), then rounded once to dtype.
    assert rel(w1, w0) <= max(torch.finfo(dtype).eps, eps * math.sqrt(trained))
    assert largest <= chunk * v * 4 < trained * v * 4 <= big


def test_argument_errors():
    hidden, weight, targets = make(n=4, v=10)
    with pytest.raises(ValueError, match="dtype|float"):
        ce.linear_cross_entropy(hidden.double(), weight, targets)
    with pytest.raises(ValueError, match="targets"):
        ce.linear_cross_entropy(hidden, weight, targets[:3])


def test_chunk_rows_bound_memory_and_balance():
    # The shape: the (rows, V) logits buffer of a chunk stays ≤ CHUNK_BYTES (< 0.25 GiB in all).
    v = 152_064
    rows = ce.chunk_rows_for(4096, v, torch.bfloat16)
    assert rows % 128 == 0 and rows * v * 2 <= ce.CHUNK_BYTES and rows >= 128
    assert ce.chunk_rows_for(3072, v, torch.bfloat16) == 256  # 12 equal chunks
    assert ce.chunk_rows_for(41, v, torch.bfloat16) == 41  # 99% ignored: one chunk
    assert ce.chunk_rows_for(4096, v, torch.float32) * v * 4 <= ce.CHUNK_BYTES
    assert ce.chunk_rows_for(100, 50, torch.float32) == 100 and ce.chunk_rows_for(100, 50, torch.float32, 7) == 7
    n = 1000  # balanced: 4 chunks of ≤ 256, not 3 of 331 and a sliver
    r = ce.chunk_rows_for(n, v, torch.bfloat16)
    assert r == 256 and -(-n // r) == 4


def test_bench_reference_only_runs_on_cpu(tmp_path, capsys):
    # CI form of `python -m kernels.bench --reference-only --only ce`.
    from kernels.bench import main

    out = tmp_path / "bench.json"
    assert main(["--reference-only", "--only", "ce", "--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    names = {r["name"] for r in rows}
    assert any("torch" in n for n in names) and any("reference" in n for n in names)
    assert all(r["ms"] > 0 and r["tflops"] > 0 and isinstance(r["ratios"], dict) for r in rows)
    assert "ce" in capsys.readouterr().out


# --- on a GPU: compiled kernels, bf16, int64 offsets, default dispatch ------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("weight_grad", [False, True])
def test_gpu_bf16_matches_reference(weight_grad):
    hidden, weight, targets = make(n=1000, h=256, v=50_257, dtype=torch.bfloat16, device="cuda", scale=0.1)
    kw = dict(weight_grad=weight_grad, chunk_rows=256)
    exact = run("reference", hidden, weight, targets, upcast=True, **kw)
    ref_half = run("reference", hidden, weight, targets, **kw)
    got = run("triton", hidden, weight, targets, **kw)
    for i in range(3 if weight_grad else 2):
        err, noise = rel(got[i], exact[i]), rel(ref_half[i], exact[i])
        assert err <= 2 * noise + 1e-5, f"output {i}: kernel {err:.2e}, bf16 reference {noise:.2e}"


@pytest.mark.gpu
@gpu
def test_gpu_int64_row_offsets():
    # One chunk of 14,500 rows × 152,064: the buffer has 2.2e9 > 2**31 elements, so the last rows'
    # element offsets overflow int32 (8.8 GB in fp32). Their losses and gradients (written in place
    # at those offsets) must match the reference's for the same rows.
    n, v = 14_500, 152_064
    hidden, weight, targets = make(n=n, h=16, v=v, device="cuda", ignored=0.0, scale=0.2)
    row_loss, d_hidden, _ = ce.linear_cross_entropy_forward(hidden, weight, targets, chunk_rows=n)
    rows = torch.tensor([0, 1, n - 2, n - 1], device="cuda")
    _, _, want, want_d_hidden = row_losses(hidden[rows], weight, targets[rows])
    assert torch.allclose(row_loss[rows], want, rtol=1e-4, atol=1e-5)
    assert rel(d_hidden[rows], want_d_hidden) <= 1e-4


@pytest.mark.gpu
@gpu
def test_gpu_default_dispatch_is_triton(monkeypatch):
    calls = []
    real = ce.LinearCrossEntropyFunction.apply
    monkeypatch.setattr(ce.LinearCrossEntropyFunction, "apply", lambda *a: calls.append(1) or real(*a))
    hidden, weight, targets = make(n=64, h=64, v=1000, dtype=torch.bfloat16, device="cuda")
    ce.linear_cross_entropy(hidden, weight, targets)
    assert calls == [1]
