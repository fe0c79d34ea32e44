"""Per-GPU memory estimate of a LoRA training step under FSDP2, printed before training starts
(and of evaluation, `eval_estimate`, printed before an eval loads its model).

    python -m engine.memory --preset qwen2.5-32b --gpus 8 --gpu-gib 80 [--data-parallel replicate]

The trainer refuses a run whose estimate exceeds 92% of the device (``check_fits``) and plans how
many layers to recompute from it (``fewest_checkpointed_layers``). The total is

    static   weights (÷ ranks when sharded), the FSDP all-gathers in flight, adapters and their
             gradients and AdamW state (fp32, ÷ ranks when sharded)
  + saved    what autograd holds for backward at the end of the forward
  + peak     the larger of the two moments at which a step peaks on top of ``saved``: the loss at
             the end of the forward, or the backward of one decoder layer.

Per token, in bytes (b the compute dtype's size; h hidden, q = heads·head_dim, kv =
kv_heads·head_dim, i intermediate, r the LoRA rank, n_a the adapted projections, d head_dim, V the
vocabulary; T tokens per micro-batch, all assumed trained, the upper bound):

* **saved, per layer run without recomputation** (``layer_activation_bytes``; exact on the Triton
  path, ``tests/test_saved_tensors.py`` and ``tests/test_memory_peak.py`` check it)::

      S = b·(2h + 2q + 2kv + 2i + n_a·r) + 4·(heads + 2)

  the two norms' inputs, q, k, v and attention's output, the MLP's gate and up outputs, each
  adapter's x·Aᵀ; fp32 log-sum-exp per head and two rstd values; with residual dropout
  (Seed-OSS) + 2h, its two bool masks. Plus, per layer and regardless
  of T, the adapters cast to the compute dtype (fp32 masters cast to bf16; none in fp32, none
  under FSDP, which all-gathers them in the compute dtype and frees them with the layer). A
  recomputed layer keeps only its input (b·h). The rotary tables (cos, sin: 2·d·b) are shared by
  all layers. ``engine/models/saved_tensors.py`` explains why the norms' and SwiGLU's outputs are
  not in S: they are rebuilt in backward.

* **backward of one layer** (the working set on top of what is saved): the gradient arriving
  from the layer above (b·h) plus the SwiGLU backward's three (T × i) tensors — d(silu(gate)·up),
  d gate and d up (the kernel recomputes silu) — which is the layer's largest moment: before it,
  down_proj's backward holds two (T × i) input gradients (base and adapter) and the rebuilt
  silu(gate)·up one at a time; after it, gate/up's backward holds d gate, d up and (T × h)
  gradients; attention's holds d out, dq, dk, dv (2q + 2kv < 3i). So ``W = b·(h + 3·max(i, q))``
  (q would matter only past i: o_proj's backward is down_proj's with q for i). The RMSNorm
  kernel's backward works in fp32 registers and writes one (T × h) gradient; the adapters'
  gradients are (r × in) and (out × r): small. When every layer is recomputed, the layer being
  back-propagated first re-runs its forward: its S is held again (less its input, already
  counted). When only the first k < L layers are, the non-recomputed ones are back-propagated
  while everything is held: recomputing the last layer would lower the forward's end only.

* **the loss at the end of the forward**: the final norm's saved input and its output, the loss's
  input (2·b·h + 4), and the fused cross-entropy's d_hidden (b·h), kept from its forward to its
  backward, its row losses (4), and one (rows × V) logits chunk of at most 96 MiB
  (``kernels.cross_entropy.chunk_rows_for``). It exceeds the backward only for short
  micro-batches (a 152k vocabulary chunk is two full-width SwiGLU rows per token at most).

The same terms on the torch reference path (``kernels="reference"``: the CPU, or
``ENGINE_KERNELS=reference``): attention (one SDPA call per packed sample) keeps each sample's
output and o_proj's adapter a copy of their concatenation (S + b·q); the SwiGLU backward's torch
expression holds a fourth (T × i) tensor, silu(gate) (W + b·i); the loss materialises the fp32
(T × V) logits a chunk of at most 32 MiB at a time (``REF_CHUNK_BYTES``; R rows) and, on top of
the rest of the step, peaks at R·V·5·4 bytes in fp32 and R·V·6·b in a 16-bit dtype (whose fp32
temporaries are shorter-lived): counts measured with torch's allocator records
(``tests/test_memory_peak.py``), not derived op by op;
the residual dropouts' masks (Seed-OSS: 2·h per layer in S, one byte each on the GPU) are the
CPU's scaled noise, in the compute dtype (2·b·h).

What a CPU measurement cannot tell (``tests/test_memory_peak.py`` measures every term above, on
both paths, against the peak of live tensor bytes of a real step): CUDA's caching allocator
(rounding, fragmentation: part of the 8% that ``USABLE`` leaves), cuBLAS workspaces, the CUDA
context, NCCL's buffers and FSDP2's all-gather/reduce-scatter staging (counted here as two
layers, or a layer and the LM head, in flight, plus one layer's adapter gradients and their
reduce-scatter input), and torch.compile's buffers.
"""

from __future__ import annotations

import argparse
import sys

import torch

from engine.config import DTYPE_NAMES, PROJECTIONS
from engine.errors import WontFit
from engine.models import ModelArgs
from kernels.cross_entropy import REF_CHUNK_BYTES, chunk_rows_for

GIB = 1024**3
USABLE = 0.92  # of the device's memory: the CUDA context and the allocator's fragmentation take the rest
KERNELS = ("triton", "reference")


def _bytes(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def _shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    h, inter = args.hidden_size, args.intermediate_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def _check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")


def parameter_counts(args: ModelArgs) -> tuple[int, int]:
    """(parameters of one decoder layer, parameters of the model): the projections, the layer's two
    norms and q/k/v biases; the embedding (and an untied LM head) and the final norm."""
    h = args.hidden_size
    shapes = _shapes(args)
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h + q + 2 * kv
    return per_layer, args.num_hidden_layers * per_layer + args.vocab_size * h * (1 if args.tie_word_embeddings else 2) + h


def layer_activation_bytes(args: ModelArgs, *, dtype: str = "bfloat16", lora_r: int = 32,
                           lora_targets=PROJECTIONS, kernels: str = "triton") -> tuple[float, float]:
    """(bytes per token, bytes per layer regardless of tokens) that one decoder layer run without
    recomputation saves for backward; the per-layer part is the fp32 adapters cast to the compute
    dtype (none when that is fp32). See the module docstring."""
    _check_kernels(kernels)
    b = _bytes(dtype)
    shapes = _shapes(args)
    h, inter = args.hidden_size, args.intermediate_size
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    targets = [t for t in lora_targets if t in shapes]
    per_token = b * (2 * h + 2 * q + 2 * kv + 2 * inter + lora_r * len(targets)) + 4 * (args.num_attention_heads + 2)
    if args.residual_dropout > 0:
        # The two residual dropouts' masks (Seed-OSS): CUDA's fused dropout keeps a bool mask, one
        # byte per element; the CPU's keeps its scaled noise in the compute dtype.
        per_token += 2 * h * (1 if kernels == "triton" else b)
    if kernels == "reference":
        per_token += b * q  # SDPA's per-sample outputs, besides o_proj's copy of their concatenation
    casts = 0 if dtype == "float32" else b * sum(lora_r * sum(shapes[t]) for t in targets)
    return per_token, casts


def backward_working_bytes(args: ModelArgs, *, dtype: str = "bfloat16", tokens: int,
                           kernels: str = "triton") -> float:
    """Bytes one decoder layer's backward holds on top of the saved activations, at its largest
    moment (the SwiGLU backward): the incoming gradient and three (tokens × intermediate) tensors,
    four on the torch path. See the module docstring."""
    _check_kernels(kernels)
    q = args.num_attention_heads * args.head_dim
    wide = max(args.intermediate_size, q)
    incoming = 2 if args.residual_dropout > 0 else 1  # and its dropped-out copy
    return tokens * _bytes(dtype) * (incoming * args.hidden_size + (3 if kernels == "triton" else 4) * wide)


def loss_bytes(args: ModelArgs, *, dtype: str = "bfloat16", tokens: int, kernels: str = "triton") -> float:
    """Bytes held on top of the decoder layers' saved activations while the loss is computed: the
    final norm's saved input and output, and the loss's own (fused: d_hidden, row losses, one
    logits chunk; torch: a chunk of fp32 logits and its copies, see the module docstring)."""
    _check_kernels(kernels)
    b, h, v = _bytes(dtype), args.hidden_size, args.vocab_size
    final_norm = tokens * (2 * b * h + 4)
    if kernels == "reference":
        rows = min(tokens, max(1, REF_CHUNK_BYTES // (4 * v)))
        return final_norm + rows * v * (5 * 4 if dtype == "float32" else 6 * b)
    rows = chunk_rows_for(tokens, v, getattr(torch, dtype)) if tokens else 0
    return final_norm + tokens * (b * h + 4) + rows * v * b


def estimate(args: ModelArgs, *, dtype: str = "bfloat16", lora_r: int = 32, lora_targets=PROJECTIONS,
             micro_batch_tokens: int = 4096, activation_checkpointing: bool = False,
             checkpointed_layers: int | None = None, n_stacked: int = 0, world_size: int = 1,
             kernels: str = "triton") -> dict[str, float]:
    """GiB per GPU by component, plus "total" (their sum). With ``activation_checkpointing``,
    ``checkpointed_layers`` layers are recomputed (None: all of them). ``world_size`` > 1 means
    FSDP-sharded ranks (replicated ranks estimate as one). ``kernels``: the path the step runs,
    "triton" (GPUs) or "reference" (torch ops: the CPU). See the module docstring."""
    b = _bytes(dtype)
    h, L, V = args.hidden_size, args.num_hidden_layers, args.vocab_size
    shapes = _shapes(args)
    per_layer, n_params = parameter_counts(args)
    layer_lora = sum(lora_r * sum(shapes[t]) for t in lora_targets if t in shapes)
    lora_params = L * layer_lora
    k = (L if checkpointed_layers is None else max(0, min(L, checkpointed_layers))) if activation_checkpointing else 0
    tokens = micro_batch_tokens
    sharded = world_size > 1

    layer_token, casts = layer_activation_bytes(args, dtype=dtype, lora_r=lora_r, lora_targets=lora_targets,
                                                kernels=kernels)
    full_layer = tokens * layer_token + (0 if sharded else casts)  # FSDP gathers the adapters in `dtype`
    rotary = tokens * 2 * args.head_dim * b
    saved = (L - k) * full_layer + k * tokens * h * b + rotary
    # The peak on top of `saved`: the backward of one layer (the first to be back-propagated: a
    # recomputed one holds its activations again, less its input) or the loss, whichever is larger.
    recomputed = full_layer - tokens * h * b if k == L else 0
    backward = recomputed + backward_working_bytes(args, dtype=dtype, tokens=tokens, kernels=kernels)
    loss = loss_bytes(args, dtype=dtype, tokens=tokens, kernels=kernels)
    if backward >= loss:
        peak_what = "one layer's backward (" + ("recomputed + gradients)" if recomputed else "gradients)")
    else:
        peak_what = "the loss at the end of the forward"

    what = "all layers recomputed" if k == L else f"{k} of {L} layers recomputed" if k else "no recomputation"
    # FSDP: a layer's weights and the next one's (prefetched) in flight, or at the loss the last
    # layer's and the LM head's (a tied head is unsharded all through the forward); one layer's
    # adapters gathered in `dtype`, their unsharded fp32 gradients and the reduce-scatter input.
    head = V * h
    gathered = (2 * per_layer + head) if args.tie_word_embeddings else per_layer + max(per_layer, head)
    fsdp = gathered * b + layer_lora * (b + 8) if sharded else 0.0
    est = {
        "weights (÷ ranks when sharded)": n_params * b / world_size / GIB,
        "FSDP all-gathers in flight (2 layers, or a layer and the LM head)": fsdp / GIB,
        "adapters fp32 (new + stacked, ÷ ranks when sharded)": lora_params * 4 * (1 + n_stacked) / world_size / GIB,
        "adapter grads + AdamW state fp32 (÷ ranks when sharded)": lora_params * 12 / world_size / GIB,
        f"saved activations ({tokens} tokens/micro-batch, {what})": saved / GIB,
        f"peak on top of them: {peak_what}": max(backward, loss) / GIB,
    }
    est["total"] = sum(est.values())
    return est


def eval_estimate(args: ModelArgs, *, dtype: str = "bfloat16", world_size: int = 1, sharded: bool = False,
                  adapter_params: int = 0, batch_size: int = 8, context_tokens: int = 2048) -> dict[str, float]:
    """GiB per device of evaluating (scoring or generating) with ``batch_size`` conversations of
    up to ``context_tokens`` tokens each (prompt + new tokens), by component, plus "total". With
    ``sharded`` the weights and stacked adapters (fp32, ``adapter_params`` elements) are split
    over the ``world_size`` ranks, and a forward pass holds whole the root group (final norm and
    LM head, gathered for the whole pass) and two decoder layers (the current one and the one
    prefetched; an untied embedding is gathered and freed before them). No gradients, no saved
    activations: one layer's activations at a time, the KV cache and the last positions' logits."""
    b = _bytes(dtype)
    h, L, V = args.hidden_size, args.num_hidden_layers, args.vocab_size
    kv = _shapes(args)["k_proj"][1]
    per_layer, n_params = parameter_counts(args)
    ranks = world_size if sharded else 1
    tokens = batch_size * context_tokens
    layer_token, _ = layer_activation_bytes(args, dtype=dtype, lora_r=0, lora_targets=())
    gathered = V * h + h + max(2 * per_layer, 0 if args.tie_word_embeddings else V * h)
    est = {
        "weights (÷ ranks when sharded)": n_params * b / ranks / GIB,
        "stacked adapters fp32 (÷ ranks when sharded)": adapter_params * 4 / ranks / GIB,
        "gathered during a pass (FSDP: LM head + 2 layers in flight)": gathered * b / GIB if ranks > 1 else 0.0,
        f"KV cache ({batch_size} conversations × {context_tokens} tokens)": tokens * L * 2 * kv * b / GIB,
        "one layer's activations over those tokens": tokens * layer_token / GIB,
        "logits at the last positions (fp32, with log-softmax)": batch_size * V * 4 * 2 / GIB,
    }
    est["total"] = sum(est.values())
    return est


def adapter_parameters(adapter_dirs) -> int:
    """Elements in the PEFT adapters' ``adapter_model.safetensors`` files (read from their
    headers, nothing loaded). An unreadable file counts 0: loading it reports what is wrong."""
    import math
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    total = 0
    for directory in adapter_dirs:
        try:
            with safe_open(str(Path(directory) / "adapter_model.safetensors"), framework="pt") as f:
                total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
        except (OSError, SafetensorError):
            pass
    return total


def format_estimate(est: dict[str, float], where: str) -> list[str]:
    return [f"memory estimate per {where}:"] + [f"  {k:70s} {v:8.2f} GiB" for k, v in est.items()]


def device_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB


TRAINING_ADVICE = ("Use more GPUs (torchrun --nproc_per_node N, or several nodes), activation_checkpointing = true, "
                   "or a smaller micro_batch_tokens")


def check_fits(est: dict[str, float], device: torch.device, available_gib: float | None = None,
               advice: str = TRAINING_ADVICE) -> None:
    """Refuse when the estimate exceeds 92% of the device's memory (or of `available_gib`),
    saying what to do (`advice`). Without a CUDA device and without `available_gib` there is
    nothing to check."""
    if available_gib is not None:
        where = f"{available_gib:.1f} GiB given"
    elif device.type == "cuda":
        available_gib = device_gib(device)
        where = f"{torch.cuda.get_device_name(device)}, {available_gib:.1f} GiB"
    else:
        return
    if est["total"] > USABLE * available_gib:
        raise WontFit(
            f"will not fit: about {est['total']:.1f} GiB per GPU estimated, {where} available "
            f"({USABLE:.0%} usable). {advice}"
        )


def fewest_checkpointed_layers(args: ModelArgs, available_gib: float, **kwargs) -> int | None:
    """The fewest decoder layers to recompute for the estimate to fit in `available_gib`
    (0: none need be), or None when even recomputing all of them does not fit."""
    kwargs = dict(kwargs, activation_checkpointing=True)
    for k in range(args.num_hidden_layers + 1):
        if estimate(args, checkpointed_layers=k, **kwargs)["total"] <= USABLE * available_gib:
            return k
    return None


def largest_micro_batch(args: ModelArgs, available_gib: float, *, limit: int = 1 << 20, **kwargs) -> int:
    """The largest micro_batch_tokens (a multiple of 256) whose estimate fits; 0 when none does."""
    best, step = 0, 256
    while best + step <= limit and estimate(args, micro_batch_tokens=best + step, **kwargs)["total"] <= USABLE * available_gib:
        best += step
    return best


def main(argv: list[str] | None = None) -> int:
    from engine.models.presets import PRESETS

    p = argparse.ArgumentParser(prog="python -m engine.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2.5-32b", choices=sorted(PRESETS))
    p.add_argument("--gpus", type=int, default=1, help="ranks")
    p.add_argument("--data-parallel", default="fsdp", choices=("fsdp", "replicate"),
                   help="fsdp: weights and adapter state sharded over the ranks; replicate: whole on every rank")
    p.add_argument("--gpu-gib", type=float, default=None, help="memory of one GPU (default: this machine's GPU)")
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES)
    args = p.parse_args(argv)
    model_args = ModelArgs.from_hf_config(PRESETS[args.preset])
    gib = args.gpu_gib or device_gib(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    common = dict(dtype=args.dtype, lora_r=args.lora_r, world_size=args.gpus if args.data_parallel == "fsdp" else 1)
    where = f"{args.gpus} GPU(s){', replicated' if args.data_parallel == 'replicate' and args.gpus > 1 else ''}"
    for ac, label in ((True, "activation checkpointing on every layer"), (False, "no activation checkpointing")):
        est = estimate(model_args, micro_batch_tokens=args.micro_batch_tokens, activation_checkpointing=ac, **common)
        print("\n".join(format_estimate(est, f"GPU, {args.preset}, {where}, {label}")))
    if gib is None:
        print("\n(no GPU here: give --gpu-gib to see what fits)")
        return 0
    print(f"\non {where} of {gib:.0f} GiB ({USABLE:.0%} usable), estimated:")
    for ac in (True, False):
        tokens = largest_micro_batch(model_args, gib, activation_checkpointing=ac, **common)
        print(f"  largest micro-batch {'with' if ac else 'without'} activation checkpointing: "
              + (f"{tokens:,} tokens" if tokens else "none fits"))
    k = fewest_checkpointed_layers(model_args, gib, micro_batch_tokens=args.micro_batch_tokens, **common)
    n = model_args.num_hidden_layers
    print(f"  at {args.micro_batch_tokens:,} tokens per micro-batch: "
          + ("does not fit even recomputing every layer" if k is None else f"recompute {k} of {n} layers "
             f"(checkpoint_layers = \"auto\" picks this)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
