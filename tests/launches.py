"""Which Triton kernels a kernel module really launches, for tests that check a dispatch.

Every launch goes through ``launchable(kernel, device)`` (``kernels.backend``), imported by name
into each kernel module, so recording its calls there sees the kernel whether it runs compiled
(CUDA), interpreted by ``kernels.backend.InterpretedKernel`` (CPU), or interpreted because
``TRITON_INTERPRET=1`` was set when triton was imported (then ``launchable`` hands the kernel back
as it is, and ``InterpretedKernel`` is never used).
"""

from __future__ import annotations

from types import ModuleType


def record_launches(monkeypatch, module: ModuleType) -> list[str]:
    """The list the names of the kernels ``module`` launches are appended to, from now on."""
    launched: list[str] = []
    real = module.launchable

    def launchable(kernel, device):
        launched.append(kernel.fn.__name__)
        return real(kernel, device)

    monkeypatch.setattr(module, "launchable", launchable)
    return launched
