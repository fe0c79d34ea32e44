"""RMSNorm (kernels/rms_norm.py) against transformers' op-by-op numerics (``rms_norm_ref``): the
torch path, and the Triton kernels under the Triton interpreter on CPU and on CUDA when there is
one. The interpreter (triton 3.9) casts fp32 to bf16 by truncation, not round-to-nearest as the
GPU does (half of all values differ by one unit), so the kernels' bf16 is checked on a GPU only;
fp32 and fp16 round as on the GPU."""

from __future__ import annotations

import pytest
import torch

import kernels.rms_norm as kr
from kernels.backend import force
from kernels.rms_norm import rms_norm, rms_norm_backward, rms_norm_forward, rms_norm_ref
from tests.launches import record_launches

pytest.importorskip("triton")

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(device, dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w, dy


def _check(shape, dtype, device):
    x, w, dy = _inputs(shape, dtype, device)
    y, rstd = rms_norm_forward(x, w, 1e-6)
    ref = rms_norm_ref(x, w, 1e-6)
    assert y.dtype == ref.dtype and y.shape == ref.shape and rstd.shape == (*shape[:-1], 1)
    # A unit or two in the last place at most (the fp32 sum of squares is ordered differently);
    # in a half dtype that is rare: almost every element is bit-identical.
    diff = (y.float() - ref.float()).abs()
    assert (diff <= ULP[dtype] * ref.float().abs() * 2 + 1e-30).all()
    if dtype != torch.float32:
        assert (diff == 0).float().mean() >= 0.95
    # Backward against autograd through the op-by-op formula, in fp64 as the judge: no further from
    # the exact gradient than autograd in the same dtype is, plus one rounding.
    xr = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(rms_norm_ref(xr, w, 1e-6), xr, dy)
    got = rms_norm_backward(dy, x, w, rstd)
    x64 = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(rms_norm_ref(x64, w.double(), 1e-6), x64, dy.double())
    err_got = (got.double() - exact).abs().max().item()
    err_want = (want.double() - exact).abs().max().item()
    assert err_got <= 2 * err_want + ULP[dtype] * exact.abs().max().item(), (err_got, err_want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 48), (7, 100), (2, 3, 64)])
def test_interpreted_rms_norm_matches_transformers(dtype, shape):
    _check(shape, dtype, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_against_autograd(dtype):
    """The dispatch's torch path (what CPU runs): transformers' forward bits, and gradients as close
    to fp64's as autograd through transformers' ops (fp32: to rounding; bf16: within one ulp)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 48, generator=g) * 3).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(48, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(3, 5, 48, generator=g).to(dtype)
    with force("reference"):
        ours = rms_norm(x, w, 1e-6)
    ref = rms_norm_ref(x, w, 1e-6)
    assert torch.equal(ours, ref)  # the same forward ops, the same bits
    got = torch.autograd.grad(ours, (x, w), dy)
    want = torch.autograd.grad(ref, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = torch.autograd.grad(rms_norm_ref(x64, w64, 1e-6), (x64, w64), dy.double())
    for a, b, e in zip(got, want, exact):
        if dtype == torch.float32:
            assert (a - b).abs().max() <= 1e-6 * b.abs().max()
        else:  # different fp32 op order, then one bf16 rounding: as close to fp64 as autograd's, within one ulp
            assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-12


def test_dispatch_launches_the_kernels_and_keeps_gradients(monkeypatch):
    """rms_norm with the Triton path forced launches the kernels, and gives the torch path's outputs
    and input gradients within one rounding; the weight's gradient (frozen in LoRA) still computed
    when asked."""
    launched = record_launches(monkeypatch, kr)
    x, w, dy = _inputs((3, 40), torch.float32, torch.device("cpu"), seed=1)
    outs = {}
    for backend in ("reference", "triton"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        with force(backend):
            y = rms_norm(xr, wr, 1e-6)
            y.backward(dy)
        outs[backend] = (y.detach(), xr.grad, wr.grad)
        assert launched == ([] if backend == "reference" else ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"])
    for a, b in zip(outs["reference"], outs["triton"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_rms_norm_matches_transformers(dtype):
    _check((4096, 5120), dtype, torch.device("cuda"))


def test_elementwise_benchmark_runs_on_cpu(tmp_path):
    """CI form of `python -m kernels.bench --reference-only --only elementwise` (figures meaningless)."""
    import json

    from kernels.bench import main

    out = tmp_path / "bench.json"
    assert main(["--reference-only", "--only", "elementwise", "--repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["section"], r["name"]) for r in rows] == [("elementwise", "torch op by op")] * 3
    assert all(r["ms"] > 0 and r["target"].endswith("GB/s (ideal bytes)") for r in rows)
