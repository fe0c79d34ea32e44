"""The memory estimate (engine/memory.py) against the measured memory of real training steps.

On the CPU every tensor is allocated and freed through one allocator, whose calls torch's
profiler records with ``profile_memory=True``: the running sum of those records is the exact
number of bytes of live tensors (not the process's RSS), and its maximum over a step is the
step's peak, what ``torch.cuda.max_memory_allocated`` reports on a GPU before the caching
allocator rounds it. A step here is the trainer's: a packed row of two samples, every token
trained (the estimate's assumption), forward with targets, backward, after a first step so that
the adapters' gradients already exist (accumulation's steady state; the estimate counts them
with the static terms).

The estimate's activation terms ("saved activations" and "peak on top of them") must be at
least the measured peak growth and at most 10% above it: above is the safe side (the trainer
refuses a run that would not fit), so an estimate below the measurement fails, however close.
The slope over two token counts is checked the same way, so a per-token term cannot hide behind
a per-step constant. Host-only bytes are subtracted from the measurement: activation
checkpointing saves the CPU generator's state per recomputed layer (on a GPU, host memory).

Shapes keep the real models' proportions at toy width: Qwen2.5-32B's (i = 5.4 h, q = h, few KV
heads) and Seed-OSS-36B's (q = 2 h, attention biases, residual dropout 0.1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import engine.bench as bench
from engine.assemble import Layout, build_model
from engine.memory import GIB, estimate, layer_activation_bytes
from engine.models import ModelArgs
from engine.models.presets import PRESETS
from kernels.backend import force

SHAPES = {
    "qwen2.5-32b": dict(hidden_size=64, intermediate_size=352, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=16, vocab_size=256),
    # residual dropout kept; attention dropout off (the torch path's SDPA would fall back to
    # materialising the probabilities, which the estimate does not model; the kernel keeps none)
    # Qwen2.5-0.5B's widths (a vocabulary of 8,192: the torch path's fp32 logits would otherwise
    # be most of the peak, leaving the layers' terms unchecked)
    "qwen2.5-0.5b-like": dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                              head_dim=64, vocab_size=8192, tie_word_embeddings=True),
    "seed-oss-36b": dict(hidden_size=64, intermediate_size=352, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=16, vocab_size=256, attention_dropout=0.0),
}
LORA_R = bench.paper_lora(tiny=True).r
TOKENS = (128, 256)
TOLERANCE = 0.10
RNG_STATE_BYTES = torch.get_rng_state().numel()  # saved by torch.utils.checkpoint per recomputed layer


def model_args(shape: str, layers: int) -> ModelArgs:
    preset = shape.removesuffix("-like").replace("0.5b", "32b")
    return ModelArgs.from_hf_config(PRESETS[preset] | SHAPES[shape] | {"num_hidden_layers": layers})


def build(args: ModelArgs, dtype: torch.dtype, recomputed: int):
    """The trainer's model (engine.assemble.build_model): random weights, the paper's adapter."""
    return build_model(args, dtype=dtype, device="cpu", weights=None, new_adapter=bench.paper_lora(tiny=True),
                       layout=Layout(checkpointed_layers=recomputed, data_parallel="replicate"), seed=0)


def _allocations(prof) -> tuple[list[tuple[int, int]], int | None]:
    """Every allocation (+bytes) and free (-bytes) the profiler saw, in time order, and when the
    region recorded as "backward" started (ns)."""
    from torch._C._profiler import _EventType

    events, backward = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif node.name == "backward" and backward is None:
            backward = node.start_time_ns
        stack.extend(node.children)
    return sorted(events), backward


def step_memory(model, tokens: int, kernels: str) -> tuple[int, int]:
    """(bytes live at the end of the forward, peak bytes during the step), over what was live
    before it, for one training step on ``tokens`` tokens on the ``kernels`` path."""
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, model.args.vocab_size, (1, tokens), generator=g)
    targets = torch.randint(0, model.args.vocab_size, (1, tokens), generator=g)
    cu_seqlens = torch.tensor([0, tokens // 3, tokens], dtype=torch.int32)

    def step():
        loss = model(ids, cu_seqlens=cu_seqlens, targets=targets)
        with record_function("backward"):
            (loss / tokens).backward()

    with force(kernels):
        step()  # the adapters' gradients exist from here on
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events, backward = _allocations(prof)
    assert backward is not None
    live = peak = 0
    after_forward = None
    for time, size in events:
        if after_forward is None and time >= backward:
            after_forward = live
        live += size
        peak = max(peak, live)
    return after_forward, peak


def estimated_activation_bytes(args: ModelArgs, dtype: torch.dtype, recomputed: int, tokens: int,
                               kernels: str) -> float:
    est = estimate(args, dtype=str(dtype).removeprefix("torch."), lora_r=LORA_R, micro_batch_tokens=tokens,
                   activation_checkpointing=recomputed != 0, checkpointed_layers=recomputed, kernels=kernels)
    return sum(v for k, v in est.items() if k.startswith(("saved activations", "peak on top"))) * GIB


def check_peaks(preset: str, dtype: torch.dtype, recomputed: int, kernels: str, layers: int = 3,
                tokens: tuple[int, ...] = TOKENS) -> list[tuple[int, float]]:
    args = model_args(preset, layers)
    model = build(args, dtype, recomputed)
    rows = []
    for n in tokens:
        measured = step_memory(model, n, kernels)[1] - recomputed * RNG_STATE_BYTES
        est = estimated_activation_bytes(args, dtype, recomputed, n, kernels)
        rows.append((measured, est))
        assert measured <= est <= (1 + TOLERANCE) * measured, (n, measured, est, est / measured)
    (m0, e0), (m1, e1) = rows[0], rows[-1]
    assert m1 - m0 <= e1 - e0 <= (1 + TOLERANCE) * (m1 - m0), ("slope", m1 - m0, e1 - e0)
    return rows


@pytest.mark.parametrize("recomputed", [0, 1, 3], ids=["no-recompute", "first-layer", "all-recomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_estimate_bounds_the_measured_peak_torch_path(dtype, recomputed):
    """The torch reference path (what a CPU runs), Qwen2.5 proportions, 3 layers."""
    check_peaks("qwen2.5-32b", dtype, recomputed, "reference")


@pytest.mark.parametrize("recomputed", [0, 2], ids=["no-recompute", "all-recomputed"])
def test_estimate_bounds_the_measured_peak_seed_oss_shape(recomputed):
    """Seed-OSS proportions (q = 2h, biases, residual dropout's saved masks), bf16, 2 layers."""
    check_peaks("seed-oss-36b", torch.bfloat16, recomputed, "reference", layers=2)


@pytest.mark.parametrize("preset, kernels", [("qwen2.5-32b", "reference"), ("qwen2.5-32b", "triton"),
                                             ("seed-oss-36b", "reference")])
def test_saved_activations_are_exactly_what_stays_live(preset, kernels):
    """After the forward, each decoder layer adds exactly the estimate's saved bytes to the live
    tensors: S per layer run without recomputation, its input (plus the generator state) per
    recomputed one. Unlike tests/test_saved_tensors.py, which counts what autograd's pack hooks
    receive, this sees tensors kept alive any other way (a closure of a saved-tensor hook held
    the norms' outputs and silu(gate)·up of every layer, and with recomputation the layers'
    inputs and outputs: 1.3× and 20× the estimate per layer)."""
    tokens, dtype = 16 if kernels == "triton" else 48, torch.float16 if kernels == "triton" else torch.bfloat16
    name = str(dtype).removeprefix("torch.")
    for recomputed in (False, True):
        live = {}
        for layers in (1, 2):
            args = model_args(preset, layers)
            live[layers] = step_memory(build(args, dtype, layers if recomputed else 0), tokens, kernels)[0]
        per_layer = live[2] - live[1]
        if recomputed:
            expected = tokens * args.hidden_size * dtype.itemsize + RNG_STATE_BYTES
        else:
            per_token, casts = layer_activation_bytes(args, dtype=name, lora_r=LORA_R, kernels=kernels)
            expected = tokens * per_token + casts
        assert per_layer == expected, (recomputed, per_layer, expected)


@pytest.mark.slow
@pytest.mark.parametrize("recomputed", [0, 2], ids=["no-recompute", "all-recomputed"])
def test_estimate_bounds_the_measured_peak_half_billion_shape(recomputed):
    """Qwen2.5-0.5B's widths, bf16, 2 layers, 128 and 256 tokens, on the torch path: minutes."""
    check_peaks("qwen2.5-0.5b-like", torch.bfloat16, recomputed, "reference", layers=2)


@contextlib.contextmanager
def _interpreter_frees_promptly():
    """Under the Triton interpreter a kernel's arguments stay referenced by a reference cycle
    until the garbage collector runs, so a kernel's output buffers outlive their last use (on a
    GPU they do not). Collect the youngest generation after each launch."""
    import kernels.backend as backend

    launch = backend.InterpretedKernel._launch

    def launch_and_collect(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect(0)

    backend.InterpretedKernel._launch = launch_and_collect
    try:
        yield
    finally:
        backend.InterpretedKernel._launch = launch


@pytest.mark.slow
@pytest.mark.parametrize("recomputed", [0, 2], ids=["no-recompute", "all-recomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_estimate_bounds_the_measured_peak_triton_path(dtype, recomputed):
    """The Triton kernels GPUs run (under the interpreter; fp16, as its bf16 dot is wrong), 2
    layers, 64 and 128 tokens: several minutes."""
    with _interpreter_frees_promptly():
        check_peaks("qwen2.5-32b", dtype, recomputed, "triton", layers=2, tokens=(64, 128))


def test_estimate_terms_at_full_size():
    """The estimate's activation terms for Qwen2.5-32B at 4,096 tokens in bf16 (GiB): the saved
    activations are exactly 64 layers' S plus the rotary tables, and the peak on top is one
    layer's backward, which dominates the loss's."""
    args = ModelArgs.from_hf_config(PRESETS["qwen2.5-32b"])
    per_token, casts = layer_activation_bytes(args, dtype="bfloat16", lora_r=32)
    assert per_token == 2 * (2 * 5120 + 2 * 5120 + 2 * 1024 + 2 * 27648 + 32 * 7) + 4 * 42
    est = estimate(args, micro_batch_tokens=4096)
    saved = next(v for k, v in est.items() if k.startswith("saved activations"))
    assert saved * GIB == 64 * (4096 * per_token + casts) + 4096 * 2 * 128 * 2
    (peak_key, peak), = [(k, v) for k, v in est.items() if k.startswith("peak on top")]
    assert "backward" in peak_key and peak * GIB == 4096 * 2 * (5120 + 3 * 27648)
    sharded = estimate(dataclasses.replace(args), micro_batch_tokens=4096, world_size=8)
    assert next(v for k, v in sharded.items() if k.startswith("saved")) * GIB == saved * GIB - 64 * casts
