"""The Triton RMSNorm (kernels/rms_norm.py) against transformers' op-by-op numerics, run under the
Triton interpreter on CPU and on CUDA when there is one. The interpreter (triton 3.9) casts fp32 to
bf16 by truncation, not round-to-nearest as the GPU does (half of all values differ by one unit),
so bf16 is checked on a GPU only; fp32 and fp16 round as on the GPU."""

from __future__ import annotations

import pytest
import torch

from engine.models.lean import rms_norm
from kernels.backend import force
from kernels.rms_norm import rms_norm_backward, rms_norm_forward

pytest.importorskip("triton")

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _hf(x, weight, eps):
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(device, dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w, dy


def _check(shape, dtype, device):
    x, w, dy = _inputs(shape, dtype, device)
    y, rstd = rms_norm_forward(x, w, 1e-6)
    ref = _hf(x, w, 1e-6)
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
    (want,) = torch.autograd.grad(_hf(xr, w, 1e-6), xr, dy)
    got = rms_norm_backward(dy, x, w, rstd)
    x64 = x.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(_hf(x64, w.double(), 1e-6), x64, dy.double())
    err_got = (got.double() - exact).abs().max().item()
    err_want = (want.double() - exact).abs().max().item()
    assert err_got <= 2 * err_want + ULP[dtype] * exact.abs().max().item(), (err_got, err_want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 48), (7, 100), (2, 3, 64)])
def test_interpreted_rms_norm_matches_transformers(dtype, shape):
    _check(shape, dtype, torch.device("cpu"))


def test_model_path_uses_the_kernel_and_keeps_gradients():
    """lean.rms_norm with the Triton path forced: same outputs and input gradients as the torch
    path, within one rounding; the weight's gradient (frozen in LoRA) still computed when asked."""
    x, w, dy = _inputs((3, 40), torch.float32, torch.device("cpu"), seed=1)
    outs = {}
    for backend in ("reference", "triton"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        with force(backend):
            y = rms_norm(xr, wr, 1e-6)
            y.backward(dy)
        outs[backend] = (y.detach(), xr.grad, wr.grad)
    for a, b in zip(outs["reference"], outs["triton"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


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
