"""The Triton RoPE (kernels/rope.py) against transformers' expression (``rope_ref``) and autograd's
gradient: under the Triton interpreter on CPU in fp32 and fp16 (the interpreter casts to bf16 by
truncation, so bf16 runs on a GPU), bit-identical outputs and gradients expected."""

from __future__ import annotations

import pytest
import torch

import kernels.rope as kr
from kernels.backend import force
from kernels.rope import rope, rope_backward, rope_forward, rotate_half
from tests.launches import record_launches

pytest.importorskip("triton")


def _hf(x, cos, sin):  # transformers' apply_rotary_pos_emb for one tensor, heads on dim 1 of (t, h, d)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def _tables(tokens, d, dtype, device):
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(tokens, dtype=torch.float32)[:, None] * inv_freq[None, :] + 17.0
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def _check(tokens, heads, d, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, heads, d, generator=g).to(device, dtype)
    dy = torch.randn(tokens, heads, d, generator=g).to(device, dtype)
    cos, sin = _tables(tokens, d, dtype, device)
    xr = x.clone().requires_grad_()
    ref = _hf(xr, cos, sin)
    (want,) = torch.autograd.grad(ref, xr, dy)
    assert torch.equal(rope_forward(x, cos, sin), ref.detach())
    assert torch.equal(rope_backward(dy, cos, sin), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,heads,d", [(1, 1, 2), (9, 5, 16), (33, 40, 128), (7, 3, 24)])
def test_interpreted_rope_is_bit_identical(tokens, heads, d, dtype):
    _check(tokens, heads, d, dtype, torch.device("cpu"))


def test_dispatch_launches_the_kernel(monkeypatch):
    launched = record_launches(monkeypatch, kr)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, 16, generator=g)
    dy = torch.randn(2, 6, 4, 16, generator=g)
    cos, sin = _tables(12, 16, torch.float32, torch.device("cpu"))
    cos, sin = cos.view(2, 6, 16), sin.view(2, 6, 16)
    results = {}
    for backend in ("reference", "triton"):
        xr = x.clone().requires_grad_()
        with force(backend):
            out = rope(xr, cos, sin)
            out.backward(dy)
        results[backend] = (out.detach(), xr.grad)
        assert launched == ([] if backend == "reference" else ["_rope_kernel", "_rope_kernel"])
    assert all(torch.equal(a, b) for a, b in zip(results["reference"], results["triton"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_rope_is_bit_identical(dtype):
    _check(4096, 40, 128, dtype, torch.device("cuda"))
