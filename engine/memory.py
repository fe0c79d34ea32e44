"""Per-GPU memory estimate of a LoRA training step under FSDP2, printed before training starts
(and of evaluation, `eval_estimate`, printed before an eval loads its model).

    python -m engine.memory --preset qwen2.5-32b --gpus 8 --gpu-gib 80 [--data-parallel replicate]

Counts: base weights (sharded over the ranks), the all-gathered layers FSDP keeps in flight,
adapters and their AdamW state (fp32, sharded), activations per token, a backward working set,
and the loss (the fused cross-entropy holds one (rows × vocab) chunk of logits plus d_hidden).

The activation term is what autograd saves, counted exactly from the model's code on the Triton
path (``tests/test_saved_tensors.py`` checks it against the tensors a real step saves): per token and
decoder layer run without recomputation (``engine/models/saved_tensors.py``)

    2h (the two norms' inputs) + 2q + 2kv (attention's q, k, v and output) + 2i (gate, up)
    + r per adapted projection (x·Aᵀ), in the compute dtype, plus fp32 log-sum-exp per head and
    two fp32 rstd values,

and h per token for a layer that is recomputed (its input). The backward working set (one
layer's worth) and the allocator's overhead are not measured yet: the total is an estimate until
checked against a measured peak on a GPU. ``check_fits`` refuses a step that would not fit.
"""

from __future__ import annotations

import argparse
import sys

import torch

from engine.config import DTYPE_NAMES, PROJECTIONS
from engine.errors import WontFit
from engine.models import ModelArgs
from kernels.cross_entropy import CHUNK_BYTES

GIB = 1024**3
USABLE = 0.92  # of the device's memory: the CUDA context and the allocator's fragmentation take the rest


def _bytes(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def _shapes(args: ModelArgs) -> dict[str, tuple[int, int]]:
    h, inter = args.hidden_size, args.intermediate_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def layer_activation_bytes(args: ModelArgs, *, dtype: str = "bfloat16", lora_r: int = 32,
                           lora_targets=PROJECTIONS) -> tuple[float, float]:
    """(bytes per token, bytes per layer regardless of tokens) that one decoder layer run without
    recomputation saves for backward; the per-layer part is the adapters cast to the compute dtype."""
    b = _bytes(dtype)
    shapes = _shapes(args)
    h, inter = args.hidden_size, args.intermediate_size
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    targets = [t for t in lora_targets if t in shapes]
    per_token = b * (2 * h + 2 * q + 2 * kv + 2 * inter + lora_r * len(targets)) + 4 * (args.num_attention_heads + 2)
    casts = b * sum(lora_r * sum(shapes[t]) for t in targets)
    return per_token, casts


def estimate(args: ModelArgs, *, dtype: str = "bfloat16", lora_r: int = 32, lora_targets=PROJECTIONS,
             micro_batch_tokens: int = 4096, activation_checkpointing: bool = False,
             checkpointed_layers: int | None = None, n_stacked: int = 0, world_size: int = 1) -> dict[str, float]:
    """GiB per GPU by component, plus "total". With ``activation_checkpointing``,
    ``checkpointed_layers`` layers are recomputed (None: all of them)."""
    bytes_w = _bytes(dtype)
    h, L, V = args.hidden_size, args.num_hidden_layers, args.vocab_size
    shapes = _shapes(args)
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h + q + 2 * kv
    n_params = L * per_layer + V * h * (1 if args.tie_word_embeddings else 2) + h
    lora_params = L * sum(lora_r * sum(shapes[t]) for t in lora_targets if t in shapes)
    k = (L if checkpointed_layers is None else max(0, min(L, checkpointed_layers))) if activation_checkpointing else 0
    tokens = micro_batch_tokens
    layer_token, layer_casts = layer_activation_bytes(args, dtype=dtype, lora_r=lora_r, lora_targets=lora_targets)
    # Layers whose full activations are held at once. The recomputed layers are the first k, so
    # backward reaches them only after the others' activations were freed: at the end of the
    # forward L - k layers are held, while recomputing one layer just that one.
    live = max(L - k, 1 if k else 0)
    saved = tokens * (live * layer_token + k * bytes_w * h) + live * layer_casts
    what = "all layers recomputed" if k == L else f"{k} of {L} layers recomputed" if k else "no recomputation"
    est = {
        "weights (÷ ranks when sharded)": n_params * bytes_w / world_size / GIB,
        "unsharded layers (FSDP all-gather, 2 in flight)": 2 * per_layer * bytes_w / GIB if world_size > 1 else 0.0,
        "adapters fp32 (new + stacked, ÷ ranks when sharded)": lora_params * 4 * (1 + n_stacked) / world_size / GIB,
        "adapter grads + AdamW state fp32 (÷ ranks when sharded)": lora_params * 12 / world_size / GIB,
        f"saved activations ({tokens} tokens/micro-batch, {what})": saved / GIB,
        "backward working set (one layer's activations)": (tokens * layer_token + layer_casts) / GIB,
        "loss (fused CE: one logits chunk + d_hidden)": (CHUNK_BYTES + 2 * tokens * h * bytes_w) / GIB,
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
    shapes = _shapes(args)
    q, kv = shapes["q_proj"][1], shapes["k_proj"][1]
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h + q + 2 * kv
    n_params = L * per_layer + V * h * (1 if args.tie_word_embeddings else 2) + h
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
