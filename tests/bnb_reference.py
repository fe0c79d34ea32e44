"""bitsandbytes' CUDA optimizer kernels for Adam, transcribed element by element in numpy fp32.

The oracle of tests/test_optim.py for `engine.optim.AdamW8bit`: a line-by-line reading of
``kOptimizerStatic8bit2StateBlockwise`` (with ``quantize_2D``, its quadrants and its sign fix) and
``kOptimizer32bit2State`` (bitsandbytes 0.49.1 / 0.50.2, ``csrc/kernels.cu`` /
``csrc/cuda/optimizers.cu``), one thread's work at a time, kept as close to the C as Python
allows so that it can be checked against the source by eye. Every value is an ``np.float32``, so
every operation is one IEEE fp32 operation; ``__powf`` and ``__fdividef`` (hardware
approximations) are taken as correctly rounded. Slow: for tensors of a few thousand elements.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32
FLT_MAX = np.finfo(np.float32).max
BLOCK_SIZE = 256  # BLOCKSIZE_2STATE, one element per thread (NUM_2STATE = 1)
QUAD = 3


def powf(base: np.float32, step: int) -> np.float32:
    return f32(np.float64(base) ** step)


def quantize_2D(signed: bool, quadrants: list, smem_code: np.ndarray, x: np.float32) -> int:
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower = f32(-1.0) if signed else f32(0.0)
    upper = f32(1.0)
    val = quadrants[1]
    local_pivot, offset = 1, 1
    i = 64
    while i > 0:
        if x > val:
            lower_pivot = pivot
            lower = val
            pivot += i
            local_pivot += offset
        else:
            upper_pivot = pivot
            upper = val
            pivot -= i
            local_pivot -= offset
        val = quadrants[local_pivot] if i >= 64 else smem_code[pivot]
        offset -= 1
        i >>= 1
    if x > val:
        midpoint = (upper + val) * f32(0.5)
        return upper_pivot if x > midpoint else pivot
    midpoint = (lower + val) * f32(0.5)
    return lower_pivot if x < midpoint else pivot


def adam_8bit_blockwise(p, g, state1, state2, beta1, beta2, eps, step, lr, quantiles1, quantiles2, absmax1, absmax2,
                        weight_decay) -> None:
    """One kernel launch, in place on flat numpy arrays (p, g fp32; state1/2 uint8; absmax fp32)."""
    beta1, beta2, eps, lr, weight_decay = f32(beta1), f32(beta2), f32(eps), f32(lr), f32(weight_decay)
    n = len(p)
    correction1 = f32(1.0) - powf(beta1, step)
    correction2 = np.sqrt(f32(1.0) - powf(beta2, step))
    step_size = (-lr * correction2) / correction1
    quadrants1 = [quantiles1[(k * 256 // (QUAD + 1)) + (256 // (QUAD + 1) - 1)] for k in range(QUAD)]
    quadrants2 = [quantiles2[(k * 256 // (QUAD + 1)) + (256 // (QUAD + 1) - 1)] for k in range(QUAD)]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for i in range(0, n, BLOCK_SIZE):
            valid_items = min(BLOCK_SIZE, n - i)
            # BlockLoad with defaults for the missing items: g 0, state1 code 128, state2 code 0.
            g_vals = [g[i + j] if j < valid_items else f32(0.0) for j in range(BLOCK_SIZE)]
            c1s = [int(state1[i + j]) if j < valid_items else 128 for j in range(BLOCK_SIZE)]
            c2s = [int(state2[i + j]) if j < valid_items else 0 for j in range(BLOCK_SIZE)]
            s1_vals, s2_vals = [f32(0.0)] * BLOCK_SIZE, [f32(0.0)] * BLOCK_SIZE
            new_local_abs_max1 = new_local_abs_max2 = -FLT_MAX
            for j in range(BLOCK_SIZE):
                if not np.isnan(g_vals[j]) and not np.isinf(g_vals[j]):
                    s2_vals[j] = quantiles2[c2s[j]] * absmax2[i // BLOCK_SIZE]
                    g_val = g_vals[j]
                    s2_vals[j] = (s2_vals[j] * beta2) + (((f32(1.0) - beta2) * g_val * g_val))
                    s1_vals[j] = quantiles1[c1s[j]] * absmax1[i // BLOCK_SIZE]
                    s1_vals[j] = (s1_vals[j] * beta1) + (((f32(1.0) - beta1) * g_val))
                else:
                    s1_vals[j] = f32(0.0)
                    s2_vals[j] = f32(0.0)
                new_local_abs_max1 = np.fmax(new_local_abs_max1, np.abs(s1_vals[j]))
                new_local_abs_max2 = np.fmax(new_local_abs_max2, np.abs(s2_vals[j]))
            absmax1[i // BLOCK_SIZE] = new_local_abs_max1
            absmax2[i // BLOCK_SIZE] = new_local_abs_max2
            for j in range(valid_items):
                if not np.isnan(g_vals[j]) and not np.isinf(g_vals[j]):
                    p[i + j] = p[i + j] + (step_size * (s1_vals[j] / (np.sqrt(s2_vals[j]) + (correction2 * eps))))
                    if weight_decay > f32(0.0):
                        p[i + j] = p[i + j] * (f32(1.0) - (lr * weight_decay))
            for j in range(valid_items):
                c1 = quantize_2D(True, quadrants1, quantiles1, s1_vals[j] / new_local_abs_max1)
                c2 = quantize_2D(False, quadrants2, quantiles2, s2_vals[j] / new_local_abs_max2)
                if np.signbit(quantiles1[c1]) != np.signbit(s1_vals[j]):
                    c1 = (c1 + 1) % 256 if s1_vals[j] > f32(0.0) else (c1 - 1) % 256
                state1[i + j] = c1
                state2[i + j] = c2


def adam_32bit(p, g, state1, state2, beta1, beta2, eps, weight_decay, step, lr) -> None:
    """kOptimizer32bit2State<ADAM> with update_scale 1 and gnorm_scale 1, in place."""
    beta1, beta2, eps, lr, weight_decay = f32(beta1), f32(beta2), f32(eps), f32(lr), f32(weight_decay)
    correction1 = f32(1.0) - powf(beta1, step)
    correction2 = np.sqrt(f32(1.0) - powf(beta2, step))
    step_size = -lr * correction2 / correction1
    update_scale = f32(1.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for j in range(len(p)):
            state1[j] = state1[j] * beta1 + ((f32(1.0) - beta1) * g[j])
            state2[j] = state2[j] * beta2 + ((f32(1.0) - beta2) * (g[j] * g[j]))
            p[j] = p[j] + (update_scale * step_size * (state1[j] / (np.sqrt(state2[j]) + (eps * correction2))))
            if weight_decay > f32(0.0):
                p[j] = p[j] * (f32(1.0) - (lr * weight_decay))
