"""Per-GPU memory estimate of a LoRA training step under FSDP2, printed before training starts.

Counts: base weights (sharded over the ranks), the all-gathered layers FSDP keeps in flight,
adapters and their AdamW state (fp32, sharded), activations per token (one layer's worth plus the
layer inputs with activation checkpointing, every layer's without), and the loss (the fused
cross-entropy holds one (rows × vocab) chunk of logits plus d_hidden). A rough estimate, not yet
checked against a measured peak on a GPU; `check_fits` refuses a step that would not fit.
"""

from __future__ import annotations

import torch

from engine.models import ModelArgs
from kernels.cross_entropy import CHUNK_BYTES

GIB = 1024**3
USABLE = 0.92  # of the device's memory: the CUDA context and the allocator's fragmentation take the rest
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class WontFit(ValueError):
    pass


def estimate(args: ModelArgs, *, dtype: str = "bfloat16", lora_r: int = 32, lora_targets=PROJECTIONS,
             micro_batch_tokens: int = 4096, activation_checkpointing: bool = False, n_stacked: int = 0,
             world_size: int = 1) -> dict[str, float]:
    """GiB per GPU by component, plus "total"."""
    bytes_w = DTYPE_BYTES[dtype]
    h, inter, L, V = args.hidden_size, args.intermediate_size, args.num_hidden_layers, args.vocab_size
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h + q + 2 * kv
    n_params = L * per_layer + V * h * (1 if args.tie_word_embeddings else 2) + h
    lora_params = L * sum(lora_r * sum(shapes[t]) for t in lora_targets if t in shapes)
    tokens = micro_batch_tokens
    one_layer = bytes_w * (8 * h + 2 * q + 4 * kv + 4 * inter)  # live activations of one layer, per token
    act_per_token = L * bytes_w * h + one_layer if activation_checkpointing else L * one_layer
    est = {
        "weights (sharded)": n_params * bytes_w / world_size / GIB,
        "unsharded layers (FSDP all-gather, 2 in flight)": 2 * per_layer * bytes_w / GIB if world_size > 1 else 0.0,
        "adapters fp32 (new + stacked, sharded)": lora_params * 4 * (1 + n_stacked) / world_size / GIB,
        "adapter grads + AdamW state fp32 (sharded)": lora_params * 12 / world_size / GIB,
        f"activations ({tokens} tokens/micro-batch, {act_per_token / 1024:.0f} KiB/token)": tokens * act_per_token / GIB,
        "loss (fused CE: one logits chunk + d_hidden)": (CHUNK_BYTES + 2 * tokens * h * bytes_w) / GIB,
    }
    est["total"] = sum(est.values())
    return est


def format_estimate(est: dict[str, float], where: str) -> list[str]:
    return [f"memory estimate per {where}:"] + [f"  {k:70s} {v:8.2f} GiB" for k, v in est.items()]


def check_fits(est: dict[str, float], device: torch.device, available_gib: float | None = None) -> None:
    """Refuse when the estimate exceeds 92% of the device's memory (or of `available_gib`).
    Without a CUDA device and without `available_gib` there is nothing to check."""
    if available_gib is not None:
        where = f"{available_gib:.1f} GiB given"
    elif device.type == "cuda":
        available_gib = torch.cuda.get_device_properties(device).total_memory / GIB
        where = f"{torch.cuda.get_device_name(device)}, {available_gib:.1f} GiB"
    else:
        return
    if est["total"] > USABLE * available_gib:
        raise WontFit(
            f"will not fit: about {est['total']:.1f} GiB per GPU estimated, {where} available "
            f"({USABLE:.0%} usable). Use more GPUs (torchrun --nproc_per_node N, or several nodes), "
            "activation_checkpointing = true, or a smaller micro_batch_tokens"
        )
