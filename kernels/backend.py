"""Which implementation a kernel call uses: the Triton kernel or the pure-torch reference.

Default: Triton for CUDA tensors (when triton imports), the reference everywhere else. Tests and
benchmarks force one side with `force("reference")` / `force("triton")` (a context manager) or the
environment variable `ENGINE_KERNELS=reference|triton`.

Forcing "triton" on CPU tensors means the Triton interpreter. Triton decides interpreted vs compiled
when a function is decorated, so `TRITON_INTERPRET=1` only works if set before triton is first
imported. The two kernel test files cope in two ways: the attention kernel launches CPU tensors
through an interpreted wrapper of its own (`kernels/attention.py`), and the cross-entropy
interpreter tests run in a child pytest process with the variable set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_CHOICES = ("auto", "reference", "triton")
_forced: str | None = None


def _setting() -> str:
    choice = _forced or os.environ.get("ENGINE_KERNELS", "auto")
    if choice not in _CHOICES:
        raise ValueError(f"ENGINE_KERNELS must be one of {', '.join(_CHOICES)}, got {choice!r}")
    return choice


def use_triton(*tensors: torch.Tensor) -> bool:
    choice = _setting()
    if choice == "reference":
        return False
    if choice == "triton":
        return True
    return all(t.is_cuda for t in tensors) and triton_available()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def force(choice: str) -> Iterator[None]:
    global _forced
    if choice not in _CHOICES:
        raise ValueError(f"backend must be one of {', '.join(_CHOICES)}, got {choice!r}")
    previous, _forced = _forced, choice
    try:
        yield
    finally:
        _forced = previous
