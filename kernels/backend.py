"""Which implementation a kernel call uses: the Triton kernel or the pure-torch reference.

Default: Triton for CUDA tensors (when triton imports), the reference everywhere else. Tests and
benchmarks force one side with `force("reference")` / `force("triton")` (a context manager) or the
environment variable `ENGINE_KERNELS=reference|triton`.

Forcing "triton" on CPU tensors runs the kernels under the Triton interpreter: every kernel launch
goes through `launchable(kernel, device)`, which interprets for CPU tensors whatever
`TRITON_INTERPRET` said when triton was imported (see `InterpretedKernel`). That is how CI runs the
real kernel code without a GPU. (The interpreter's `tl.dot` on bf16 operands is wrong in triton
3.9: interpreter tests use fp32/fp16 where a kernel uses `tl.dot`.)

Tile sizes depend on the GPU generation (``capability(device)``: 80 for the A100, 90 for the
H100/H200). ``compile_target(cc)`` makes every kernel module pick the tiles of compute capability
``cc`` whatever device its tensors are on: ``kernels.compile_report`` uses it to compile, without
a GPU, exactly what the runtime would launch on an A100 or an H100.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_CHOICES = ("auto", "reference", "triton")
_forced: str | None = None


def setting() -> str:
    """"auto", "reference" or "triton": what ``force`` or ENGINE_KERNELS asks for."""
    choice = _forced or os.environ.get("ENGINE_KERNELS", "auto")
    if choice not in _CHOICES:
        raise ValueError(f"ENGINE_KERNELS must be one of {', '.join(_CHOICES)}, got {choice!r}")
    return choice


def use_triton(*tensors: torch.Tensor) -> bool:
    choice = setting()
    if choice == "reference":
        return False
    if choice == "triton":
        return True
    return all(t.is_cuda for t in tensors) and triton_available()


def path_for(device: torch.device) -> str:
    """"triton" or "reference": the path kernels on ``device`` take, as ``use_triton`` decides
    for tensors there (the memory estimate counts per path)."""
    choice = setting()
    if choice != "auto":
        return choice
    return "triton" if device.type == "cuda" and triton_available() else "reference"


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


# ---------------------------------------------------------------- the target GPU generation

_target_capability: int | None = None


def capability(device: torch.device) -> int:
    """Compute capability of ``device`` as one int (80: A100, 90: H100/H200), or the one
    ``compile_target`` set. The kernels' tile choices are functions of this number."""
    if _target_capability is not None:
        return _target_capability
    if device.type != "cuda":
        raise ValueError(f"no compute capability for a {device.type} device (use compile_target(cc) to pick one)")
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@contextlib.contextmanager
def compile_target(cc: int) -> Iterator[None]:
    """Within this block the kernel modules choose tiles for compute capability ``cc`` (e.g. 80 or
    90) for tensors on any device but the CPU (the CPU keeps the interpreter's tiles)."""
    global _target_capability
    if not isinstance(cc, int) or cc < 70:
        raise ValueError(f"compute capability must be an int such as 80 or 90, got {cc!r}")
    previous, _target_capability = _target_capability, cc
    try:
        yield
    finally:
        _target_capability = previous


# ---------------------------------------------------------------- launching on CPU tensors


class InterpretedKernel:
    """``kernel[grid](...)`` under the Triton interpreter, for CPU tensors, whatever TRITON_INTERPRET
    was when triton was imported.

    Triton decides compiled vs interpreted at decoration time, triton.language's own @jit helpers
    (tl.zeros, tl.max, tl.rand, ...) included, so setting TRITON_INTERPRET after triton is imported
    (by any module of a pytest process) has no effect, and setting it before would also turn other
    kernels' GPU tests into interpreter runs. Instead, for the duration of one launch:
    triton.language is patched to the interpreter's semantics in one scope of our own (undone
    afterwards: the interpreter's own nested-call path leaves tl.core patched, which would break
    compiling CUDA kernels later in the process), the kernel runs as an InterpretedFunction, and
    @jit functions it calls (our helpers, triton.language's) run as their interpreter rewrites
    (JITFunction.__call__ otherwise refuses to run outside a compiled kernel). Uses
    triton.runtime.interpreter internals (triton 3.x).
    """

    _interpreted: dict = {}
    _rewritten: dict = {}

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        import types

        from triton.runtime import interpreter
        from triton.runtime.jit import JITFunction

        fn = self.kernel.fn
        if fn not in self._interpreted:
            self._interpreted[fn] = interpreter.InterpretedFunction(fn)

        def call_rewritten(jit_fn, *a, **kw):
            f = jit_fn.fn
            if f not in self._rewritten:
                self._rewritten[f] = interpreter.InterpretedFunction(f).rewrite()
            return self._rewritten[f](*a, **kw)

        # _patch_lang patches the triton.language modules it finds in a function's globals.
        import triton.language as tl

        probe = types.FunctionType((lambda: None).__code__, {"tl": tl, "core": tl.core})
        refuse = JITFunction.__call__
        patch_tensor = interpreter._patch_lang_tensor

        # triton < 3.7's interpreter turns its 1-element arrays into ints with int(), which numpy
        # >= 2.4 refuses (triton-lang/triton#9171): index the element instead, for this launch.
        def patch_tensor_index(tensor, scope):
            patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patch_tensor_index
        try:
            scope = interpreter._patch_lang(probe)
            JITFunction.__call__ = call_rewritten
            try:
                self._interpreted[fn][grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = refuse
                scope.restore()
        finally:
            interpreter._patch_lang_tensor = patch_tensor


def launchable(kernel, device: torch.device):
    """The launchable form of `kernel` for tensors on `device`: compiled for CUDA, interpreted on CPU."""
    from triton.runtime.jit import JITFunction

    if device.type == "cpu" and isinstance(kernel, JITFunction):
        return InterpretedKernel(kernel)
    return kernel  # CUDA, or already an InterpretedFunction (TRITON_INTERPRET=1 at import)
