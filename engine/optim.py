"""The optimizers a training run can use (`TrainConfig.optimizer`).

    optimizer = build_optimizer("adamw_8bit", params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

- ``adamw``: ``torch.optim.AdamW`` with fp32 moments.
- ``adamw_8bit``: :class:`AdamW8bit`, bitsandbytes' 8-bit AdamW — what the paper's Axolotl configs
  ask for with ``optimizer: adamw_8bit`` (transformers builds ``bitsandbytes.optim.AdamW(...,
  optim_bits=8)``; Axolotl 0.15.0 pins bitsandbytes 0.49.1, 0.19.0 pins 0.50.2, whose 8-bit
  Adam paths are the same) — written in torch, no bitsandbytes needed.

What bitsandbytes computes, and so what :class:`AdamW8bit` computes (references are to
bitsandbytes 0.49.1 / 0.50.2: ``bitsandbytes/optim/optimizer.py``, ``bitsandbytes/functional.py``
and the CUDA kernels ``kOptimizerStatic8bit2StateBlockwise``, ``quantize_2D`` and
``kOptimizer32bit2State`` in ``csrc/kernels.cu`` / ``csrc/cuda/optimizers.cu``):

* **Which tensors are 8-bit.** ``Optimizer2State.init_state``: a parameter with fewer than
  ``min_8bit_size = 4096`` elements keeps fp32 moments and is updated by the 32-bit kernel; every
  other one gets two uint8 code tensors of its shape (``state1``: the first moment, ``state2``: the
  second) and two fp32 vectors of per-block scales (``absmax1``, ``absmax2``), one per **block of
  256** consecutive elements of the flattened parameter (``blocksize = 256``; the last block may
  be short). Codes and scales start at zero. ``step`` counts the updates of that parameter.
* **The code books.** ``create_dynamic_map(signed=True)`` for the first moment (127 negative
  values, 0, 127 positive values and 1.0; smallest -0.9930) and ``signed=False`` for the second
  (0 … 1.0): :func:`create_dynamic_map`, transcribed.
* **One 8-bit update** (per element, fp32; ``c1 = 1 - beta1^t``, ``c2 = sqrt(1 - beta2^t)``,
  ``step_size = -lr * c2 / c1``): dequantize ``m = map1[code1] * absmax1[block]`` and
  ``v = map2[code2] * absmax2[block]``; ``v = v * beta2 + (1 - beta2) * g * g``,
  ``m = m * beta1 + (1 - beta1) * g`` (a non-finite ``g`` instead zeroes both and leaves the
  parameter alone); the block's new scales are ``max |m|`` and ``max |v|``; the parameter moves
  with the *unquantized* new moments, ``p = p + step_size * m / (sqrt(v) + c2 * eps)``, and then
  decays, ``p = p * (1 - lr * weight_decay)`` (after the step, unlike torch's AdamW, which decays
  first); finally ``m / absmax1`` and ``v / absmax2`` are rounded to the nearest code by the
  kernel's binary search (:func:`quantize_codes`), and a first-moment code whose value has the
  wrong sign is moved one code towards the right sign. A block whose new scale is 0 divides 0 by
  0 (NaN): its codes are what the search returns for NaN; they dequantize to 0 all the same.
* **The 32-bit update** (small tensors): the same step with fp32 moments, ``v = v * beta2 +
  (1 - beta2) * (g * g)`` and no special case for non-finite gradients.
* Transformers passes no ``percentile_clipping`` (100: none), ``max_unorm = 0`` and
  ``skip_zeros = False``, so none of those paths run.

Arithmetic: every operation is a separate IEEE fp32 operation in the kernels' order, on any
device. The CUDA kernels differ from that only where the hardware does: ``__powf`` and
``__fdividef`` are approximate (≤ 2 ulp) and nvcc may fuse a multiply-add, so a GPU run of
bitsandbytes agrees with this to ~1 ulp per operation, which can move an element whose moment lies
on a rounding midpoint to the neighbouring code.

Sharding (FSDP2): the blocks are those of the *whole* parameter, whatever its sharding, so a run
on any number of ranks computes what one process computes and a checkpoint is the same
world-size-independent state. Codes and fp32 moments are DTensors sharded like the parameter;
the scales (``numel / 256`` floats per moment) are plain tensors replicated on every rank. A
block split between two ranks' shards gets its scale from an all-reduce (MAX) of the ranks'
partial maxima, one per parameter and step. The state goes through
``torch.distributed.checkpoint``'s optimizer state dict like torch's AdamW's
(``engine.parallel.get_full_optimizer_state`` / ``set_full_optimizer_state``).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist

from engine.config import OPTIMIZERS
from engine.errors import ConfigError
BLOCK_SIZE = 256  # bitsandbytes Optimizer2State.init_state: blocksize = 256 (kernel BLOCKSIZE_2STATE)
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size default: smaller tensors keep fp32 moments


def build_optimizer(name: str, params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer `TrainConfig.optimizer` names, over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw_8bit":
        return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


# ---------------------------------------------------------------- the code books


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes.functional.create_dynamic_map, transcribed: the 256 values an 8-bit code stands
    for (a dynamic exponent and a fraction; see Dettmers, "8-Bit Approximations for Parallelism
    in Deep Learning"), sorted, fp32."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


SIGNED_MAP = create_dynamic_map(signed=True)  # first moment ("dynamic")
UNSIGNED_MAP = create_dynamic_map(signed=False)  # second moment ("udynamic")


def quantize_codes(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The code index of every element of ``x`` (fp32, already divided by its block's scale), as
    bitsandbytes' ``quantize_2D`` finds it (int64, 0..255).

    The kernel's binary search (pivot 127, steps 64 … 1) always ends on an even index ``p`` next
    to ``x``: between the two codes ``lo < x <= hi`` that bracket ``x`` it picks by comparing
    ``x`` with their fp32 midpoint, and a tie goes to the even one of the two (when ``p = lo`` it
    takes ``hi`` only if ``x > mid``; when ``p = hi`` it takes ``lo`` only if ``x < mid``). At or
    below the first code it returns 0 (its lower sentinel, -1 or 0, only moves the midpoint), and
    NaN (0 / 0 in an all-zero block) compares false all the way down to 0. The same for the
    signed and the unsigned book."""
    hi = torch.searchsorted(code, x.contiguous()).clamp(1, 255)  # code[hi - 1] < x <= code[hi]
    lo = hi - 1
    mid = (code[lo] + code[hi]) * 0.5
    pick = torch.where(lo % 2 == 0, torch.where(x > mid, hi, lo), torch.where(x < mid, lo, hi))
    return torch.where((x <= code[0]) | torch.isnan(x), 0, pick)


def fix_sign(codes: torch.Tensor, m: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The kernel's "make sure state1 term has still the same sign after quantization": a code
    whose value's sign bit differs from the moment's moves one step towards it (uint8 wrap-around,
    as in CUDA's unsigned char)."""
    wrong = torch.signbit(code[codes]) != torch.signbit(m)
    moved = torch.where(m > 0, codes + 1, codes - 1) % 256
    return torch.where(wrong, moved, codes)


@functools.lru_cache(maxsize=None)
def _code_books(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return SIGNED_MAP.to(device), UNSIGNED_MAP.to(device)


def _sqrt(t: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 square root (CUDA's sqrtf): torch's vectorised CPU sqrt is off
    by an ulp for about a fifth of fp32 inputs; the float64 root rounded to fp32 is exact."""
    return t.double().sqrt().float()


def _f32(x: float) -> float:
    """``x`` rounded to fp32 (as a Python float): the kernels' scalar arguments are C floats."""
    return float(np.float32(x))


# ---------------------------------------------------------------- the optimizer


class AdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' ``AdamW(optim_bits=8)`` (= ``AdamW8bit``) in torch; see the module docstring.

    State per parameter: ``step`` (int), and either ``state1``/``state2`` (uint8 codes, the
    parameter's shape) with ``absmax1``/``absmax2`` (fp32, one per 256-element block of the whole
    parameter), or — below ``min_8bit_size`` elements — ``state1``/``state2`` as fp32 moments.
    Parameters must be fp32 (the engine's adapters are).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW8bit settings: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"AdamW8bit updates fp32 parameters, got {p.dtype}")

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim.Optimizer casts every state tensor of a floating-point parameter to the
        # parameter's dtype, codes included: turn them back into bytes (exact: they are 0..255).
        # And it keeps the given tensors where no cast is needed: copy them, so that updating the
        # state in place never writes into the caller's state dict.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            codes = ("state1", "state2") if "absmax1" in state else ()
            for key, value in state.items():
                if torch.is_tensor(value):
                    state[key] = value.to(torch.uint8) if key in codes else value.clone()

    def is_8bit(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.min_8bit_size  # the whole parameter's size, sharded or not

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        if self.is_8bit(p):
            state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
            state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
            blocks = -(-p.numel() // BLOCK_SIZE)
            local = _local(p)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=local.device)
        else:
            state["state1"] = torch.zeros_like(p, dtype=torch.float32)
            state["state2"] = torch.zeros_like(p, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                scalars = _Scalars(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], state["step"])
                if state["state1"].dtype == torch.uint8:
                    _update_8bit(p, state, scalars)
                else:
                    _update_32bit(_local(p), _local(p.grad), _local(state["state1"]), _local(state["state2"]), scalars)
        return loss


class _Scalars:
    """One update's constants, as the kernels compute them in fp32 from their C-float arguments."""

    def __init__(self, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int):
        lr, self.beta1, self.beta2, eps, wd = (_f32(x) for x in (lr, beta1, beta2, eps, weight_decay))
        self.one_minus_beta1 = _f32(1.0 - self.beta1)
        self.one_minus_beta2 = _f32(1.0 - self.beta2)
        c1 = _f32(1.0 - _f32(self.beta1 ** step))
        self.c2 = _f32(math.sqrt(_f32(1.0 - _f32(self.beta2 ** step))))
        self.step_size = _f32(_f32(-lr * self.c2) / c1)
        self.eps_c2 = _f32(self.c2 * eps)
        self.decay = _f32(1.0 - _f32(lr * wd)) if wd > 0 else None


def _update_32bit(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, k: _Scalars) -> None:
    """kOptimizer32bit2State, ADAM (in place on local tensors)."""
    g = g.float()
    m.copy_(m * k.beta1 + g * k.one_minus_beta1)
    v.copy_(v * k.beta2 + (g * g) * k.one_minus_beta2)
    new = p + (m / (_sqrt(v) + k.eps_c2)) * k.step_size
    if k.decay is not None:
        new = new * k.decay
    p.copy_(new)


def _update_8bit(p: torch.Tensor, state: dict, k: _Scalars) -> None:
    """kOptimizerStatic8bit2StateBlockwise, ADAM, on this rank's shard of ``p``."""
    local_p, g = _local(p), _local(p.grad).float().reshape(-1)
    codes1, codes2 = _local(state["state1"]), _local(state["state2"])
    absmax1, absmax2 = state["absmax1"], state["absmax2"]
    start, n = _flat_start(p), local_p.numel()
    first, lead = start // BLOCK_SIZE, start % BLOCK_SIZE
    last = -(-(start + n) // BLOCK_SIZE)  # one past this shard's last block
    signed_map, unsigned_map = _code_books(g.device)

    def per_element(scales: torch.Tensor) -> torch.Tensor:  # each element's block scale
        return scales[first:last].repeat_interleave(BLOCK_SIZE)[lead:lead + n]

    def block_max(x: torch.Tensor) -> torch.Tensor:  # max |x| of each block this shard touches
        padded = torch.zeros((last - first) * BLOCK_SIZE, dtype=x.dtype, device=x.device)
        padded[lead:lead + n] = x.abs()
        return padded.view(-1, BLOCK_SIZE).amax(dim=1)

    finite = torch.isfinite(g)
    v = unsigned_map[codes2.reshape(-1).long()] * per_element(absmax2)
    v = v * k.beta2 + (g * k.one_minus_beta2) * g
    m = signed_map[codes1.reshape(-1).long()] * per_element(absmax1)
    m = m * k.beta1 + g * k.one_minus_beta1
    m, v = torch.where(finite, m, 0.0), torch.where(finite, v, 0.0)

    new1 = torch.zeros_like(absmax1)
    new2 = torch.zeros_like(absmax2)
    new1[first:last], new2[first:last] = block_max(m), block_max(v)
    if p.numel() % BLOCK_SIZE:
        # The kernel also runs the short last block's missing elements, as code 128 (the
        # smallest positive value) for the first moment, code 0 for the second and a zero gradient.
        pad = (signed_map[128] * absmax1[-1]) * k.beta1 + (signed_map.new_zeros(()) * k.one_minus_beta1)
        new1[-1] = torch.maximum(new1[-1], pad.abs())
    if _is_sharded(p):
        both = torch.cat([new1, new2])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=p.device_mesh.get_group())
        new1, new2 = both[: len(new1)], both[len(new1):]
    absmax1.copy_(new1)
    absmax2.copy_(new2)

    flat_p = local_p.view(-1)  # a view: parameters (and FSDP2 shards) are contiguous
    new_p = flat_p + (m / (_sqrt(v) + k.eps_c2)) * k.step_size
    if k.decay is not None:
        new_p = new_p * k.decay
    flat_p.copy_(torch.where(finite, new_p, flat_p))

    c1 = quantize_codes(m / per_element(absmax1), signed_map)
    c1 = fix_sign(c1, m, signed_map)
    c2 = quantize_codes(v / per_element(absmax2), unsigned_map)
    codes1.copy_(c1.view_as(codes1).to(torch.uint8))
    codes2.copy_(c2.view_as(codes2).to(torch.uint8))


# ---------------------------------------------------------------- sharded tensors


def _is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(t, DTensor) and any(isinstance(pl, Shard) for pl in t.placements)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _flat_start(p: torch.Tensor) -> int:
    """Where this rank's shard starts in the flattened whole parameter (0 when not sharded).
    FSDP2 shards dim 0, so a shard is a contiguous range of the flattened parameter."""
    from engine.parallel import local_region

    region = local_region(p) if _is_sharded(p) else None
    if region is None:
        return 0
    if any(s.start != 0 or s.stop != n for s, n in zip(region[1:], p.shape[1:])):
        raise NotImplementedError("AdamW8bit supports parameters sharded on dim 0 only (FSDP2)")
    return region[0].start * math.prod(p.shape[1:])
