"""SwiGLU (kernels/swiglu.py) against torch's F.silu(gate) * up and autograd's gradients: the torch
path bit for bit, and the Triton kernels under the Triton interpreter on CPU (fp32, fp16: the
interpreter casts to bf16 by truncation, so bf16 is checked on a GPU) and on CUDA when there is one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.swiglu as ks
from kernels.backend import force
from kernels.swiglu import swiglu, swiglu_backward, swiglu_forward
from tests.launches import record_launches

pytest.importorskip("triton")

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _check(shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    gate, up, dm = ((torch.randn(shape, generator=g) * 3).to(device, dtype) for _ in range(3))
    out = swiglu_forward(gate, up)
    gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
    ref = F.silu(gr) * ur
    want = torch.autograd.grad(ref, (gr, ur), dm)
    got = swiglu_backward(dm, gate, up)
    for a, b in [(out, ref.detach()), *zip(got, want)]:
        assert a.dtype == b.dtype and a.shape == b.shape
        diff = (a.float() - b.float()).abs()
        # The exponential may differ in its last fp32 bit: a unit or two of the output's dtype at
        # most, and in a half dtype almost never.
        assert (diff <= 4 * ULP[dtype] * b.float().abs() + 1e-6 * b.float().abs().max()).all()
        if dtype != torch.float32:
            assert (diff == 0).float().mean() >= 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (3, 700), (2, 5, 413)])
def test_interpreted_swiglu_matches_torch(dtype, shape):
    _check(shape, dtype, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_is_autograds_bit_for_bit(dtype):
    """The dispatch's torch path (what CPU runs) saves less than autograd but computes the same bits:
    aten.silu_backward is what autograd runs for F.silu."""
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(4, 40, generator=g).to(dtype).requires_grad_()
    up = torch.randn(4, 40, generator=g).to(dtype).requires_grad_()
    dm = torch.randn(4, 40, generator=g).to(dtype)
    with force("reference"):
        ours = swiglu(gate, up)
    ref = ks.swiglu_ref(gate, up)
    assert torch.equal(ours, ref)
    for a, b in zip(torch.autograd.grad(ours, (gate, up), dm), torch.autograd.grad(ref, (gate, up), dm)):
        assert torch.equal(a, b)


def test_dispatch_launches_the_kernels(monkeypatch):
    launched = record_launches(monkeypatch, ks)
    g = torch.Generator().manual_seed(2)
    gate, up, dm = (torch.randn(4, 96, generator=g) for _ in range(3))
    outs = {}
    for backend in ("reference", "triton"):
        gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
        with force(backend):
            m = swiglu(gr, ur)
            m.backward(dm)
        outs[backend] = (m.detach(), gr.grad, ur.grad)
        assert launched == ([] if backend == "reference" else ["_swiglu_fwd_kernel", "_swiglu_bwd_kernel"])
    for a, b in zip(outs["reference"], outs["triton"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_swiglu_matches_torch(dtype):
    _check((4096, 27648), dtype, torch.device("cuda"))
