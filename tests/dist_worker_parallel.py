"""Helpers shared by tests/test_parallel.py and the 2-rank worker it launches with torchrun.

As a script (``torchrun --nproc_per_node 2 tests/dist_worker_parallel.py CKPT TIED_CKPT OUT``)
each rank runs every distributed scenario and saves what it observed to ``OUT/rank{r}.pt``;
the test process compares those results with single-process references. One launch serves all
tests, since starting the process group costs more than the scenarios themselves.

The LoRA stand-in (``LoraLinear``) mirrors what ``engine.lora`` must provide for parallelism:
base parameter names unchanged (``...q_proj.weight``), frozen base weights in the model dtype,
trainable fp32 ``lora_A`` (r, in) and ``lora_B`` (out, r) parameters. With r = 1, every
``lora_A`` has a single row, so on 2 ranks the second rank's shard is empty.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.loading import load_safetensors
from engine import parallel as par
from engine.models import CausalLM, ModelArgs

LORA_TARGETS = ("q_proj", "v_proj", "gate_proj", "down_proj")
LORA_RANK = 1
LORA_SCALE = 2.0
VOCAB = 97  # odd: the embedding and LM head split 49 / 48 over 2 ranks
INTERMEDIATE = 75  # odd: gate/up split 38 / 37; down_proj's lora_A has 75 columns
CLIP_MAX_NORM = 1e-3


def tiny_config(tied: bool) -> dict:
    return dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
        tie_word_embeddings=tied,
    )


class LoraLinear(nn.Module):
    """``base(x) + scale * B(A(x))`` keeping ``base``'s parameter names (weight, bias)."""

    def __init__(self, base: nn.Linear, r: int = LORA_RANK, scale: float = LORA_SCALE):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=torch.float32))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        a, b = self.lora_A, self.lora_B  # fp32, or param_dtype under FSDP mixed precision
        return out + (self.scale * F.linear(F.linear(x.to(a.dtype), a), b)).to(out.dtype)


def add_lora(model: CausalLM) -> CausalLM:
    """Freeze every base parameter and wrap the target projections (works on meta too)."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in LORA_TARGETS and isinstance(child, nn.Linear):
                setattr(module, child_name, LoraLinear(child))
    return model


def is_lora(name: str) -> bool:
    return ".lora_" in name


def lora_full_init(name: str, shape: torch.Size) -> torch.Tensor:
    """The deterministic full initial value of a LoRA parameter (identical on every rank)."""
    seed = sum(map(ord, name))
    return 0.3 * torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def init_lora_(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if is_lora(name):
            par.copy_full_(p, lora_full_init(name, p.shape))


def lora_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def eval_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(123))


def rank_batch(rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Different data (and shapes) per rank and micro-batch; targets with masked (-100) positions."""
    g = torch.Generator().manual_seed(1000 + rank + 10 * micro)
    shape = [[(2, 7), (1, 11)], [(1, 5), (3, 4)]][micro][rank]
    ids = torch.randint(0, VOCAB, shape, generator=g)
    targets = torch.randint(0, VOCAB, shape, generator=g)
    targets[:, : rank + 2] = -100
    return ids, targets


def global_trained_tokens(world_size: int = 2, micro_batches: int = 1) -> int:
    return sum(
        int((rank_batch(r, k)[1] != -100).sum()) for r in range(world_size) for k in range(micro_batches)
    )


def loss_sum(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(ids).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


ENGINE_LORA_TARGETS = ("q_proj", "v_proj", "gate_proj", "down_proj")


def engine_lora_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """engine.lora's deterministic init, with B made nonzero so that A's gradients are too."""
    from engine import lora

    values = lora.lora_init_values(model, seed=3)
    return {n: (v if n.endswith(".A") else lora_full_init(n, v.shape)) for n, v in values.items()}


def build_with_engine_lora(ckpt: str | Path) -> CausalLM:
    """The production path with the real engine.lora (r 3: odd rows for A, 2/1 over 2 ranks)."""
    import json

    from engine import lora

    with open(Path(ckpt) / "config.json") as f:
        args = ModelArgs.from_hf_config(json.load(f))
    with torch.device("meta"):
        model = CausalLM(args)
    lora.apply_lora(model, lora.LoraConfig(r=3, alpha=6.0, target_modules=ENGINE_LORA_TARGETS))
    par.apply_activation_checkpointing(model)
    par.apply_fsdp(model, param_dtype=torch.float32)
    model.to_empty(device="cpu")
    load_safetensors(model, ckpt, expect_missing=lora.is_lora_parameter_name)
    for name, value in engine_lora_values(model).items():
        par.copy_full_(model.get_parameter(name), value)
    return model


def build_sharded(
    ckpt: str | Path,
    *,
    base_dtype: torch.dtype,
    param_dtype: torch.dtype | None,
    lora: bool = True,
    checkpointing: bool = True,
    device: torch.device | str = "cpu",
    load: bool = True,
) -> CausalLM:
    """The production path: meta build, LoRA, activation checkpointing, FSDP, to_empty, load."""
    import json

    with open(Path(ckpt) / "config.json") as f:
        args = ModelArgs.from_hf_config(json.load(f))
    with torch.device("meta"):
        model = CausalLM(args)
    model.to(dtype=base_dtype)
    if lora:
        with torch.device("meta"):
            add_lora(model)
    if checkpointing:
        par.apply_activation_checkpointing(model)
    par.apply_fsdp(model, param_dtype=param_dtype)
    model.to_empty(device=device)
    if not load:
        return model
    load_safetensors(model, ckpt, expect_missing=is_lora if lora else None)
    if lora:
        init_lora_(model)
    return model


# --- the 2-rank scenarios -------------------------------------------------------------------


def _train_step_results(model: CausalLM, rank: int, res: dict) -> None:
    """Forward/backward on this rank's data; gathered grads, clipping, AdamW, optimizer state."""
    model.train()
    ids, targets = rank_batch(rank)
    loss = loss_sum(model, ids, targets) / global_trained_tokens()
    loss.backward()
    res["loss"] = loss.item()
    res["frozen_grads"] = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    named = lora_params(model)
    res["grad_types"] = {n: type(p.grad).__name__ for n, p in named}
    res["grads"] = par.full_state_dict((n, p.grad) for n, p in named)
    res["clip_norm"] = par.clip_grad_norm_([p for _, p in named], CLIP_MAX_NORM)
    res["clipped_grads"] = par.full_state_dict((n, p.grad) for n, p in named)

    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1)
    opt.step()
    res["params_after_step"] = par.full_state_dict(named)
    state = par.get_full_optimizer_state(model, opt)
    res["optim_state"] = state
    # Round trip into a fresh optimizer on the same sharded model: only rank 0's copy is read.
    opt2 = torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1)
    par.set_full_optimizer_state(model, opt2, state if rank == 0 else {})
    res["optim_state_roundtrip"] = par.get_full_optimizer_state(model, opt2)
    # Sharded optimizer state: each rank holds only its own rows of exp_avg.
    res["local_exp_avg_shapes"] = {
        n: tuple(opt.state[p]["exp_avg"].to_local().shape) for n, p in named if p in opt.state
    }


def run_worker(ckpt: str, tied_ckpt: str, out_dir: str) -> None:
    d = par.init_distributed()
    assert d.world_size == 2 and par.is_distributed()
    res: dict = {"rank": d.rank, "world_size": d.world_size, "is_main": d.is_main, "device": str(d.device)}
    torch.manual_seed(0)

    # fp32 everywhere: exact comparisons with the single-process reference.
    model = build_sharded(ckpt, base_dtype=torch.float32, param_dtype=torch.float32)
    res["param_types"] = {n: type(p).__name__ for n, p in model.named_parameters()}
    res["local_shapes"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    res["global_shapes"] = {n: tuple(p.shape) for n, p in model.named_parameters()}
    res["regions"] = {
        n: [(s.start, s.stop) for s in par.local_region(p)] for n, p in model.named_parameters()
    }
    res["local_embed"] = model.model.embed_tokens.weight.to_local().clone()
    res["inv_freq"] = model.model.rotary_emb.inv_freq.clone()
    res["checkpointed_layers"] = [par.is_activation_checkpointed(layer) for layer in model.model.layers]
    model.eval()
    with torch.no_grad():
        res["logits"] = model(eval_ids())
    res["param_types_after_eval"] = {n: type(p).__name__ for n, p in model.named_parameters()}
    _train_step_results(model, d.rank, res)

    # copy_full_ / gather_full on an odd-sized frozen weight and an empty-shard LoRA parameter.
    roundtrip = {}
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.q_proj.lora_A"):
        p = model.get_parameter(name)
        full = torch.randn(tuple(p.shape), generator=torch.Generator().manual_seed(7))
        par.copy_full_(p, full)
        roundtrip[name] = (full, par.gather_full(p), p.to_local().clone())
    res["copy_roundtrip"] = roundtrip

    # Mixed dtypes: frozen bf16 base, trainable fp32 LoRA, two mixed-precision policies.
    for key, param_dtype in (("mixed_none", None), ("mixed_bf16", torch.bfloat16)):
        m = build_sharded(ckpt, base_dtype=torch.bfloat16, param_dtype=param_dtype)
        m.train()
        ids, targets = rank_batch(d.rank)
        loss = loss_sum(m, ids, targets) / global_trained_tokens()
        loss.backward()
        named = lora_params(m)
        res[key] = {
            "param_dtypes": {n: str(p.dtype) for n, p in m.named_parameters()},
            "grads": par.full_state_dict((n, p.grad) for n, p in named),
        }

    # Gradient accumulation: 2 micro-batches per rank, reduction only on the last.
    m = build_sharded(ckpt, base_dtype=torch.float32, param_dtype=torch.float32)
    m.train()
    n = global_trained_tokens(micro_batches=2)
    seen = []
    for k in range(2):
        par.set_gradient_sync(m, k == 1)
        (loss_sum(m, *rank_batch(d.rank, k)) / n).backward()
        seen.append(all(p.grad is None for _, p in lora_params(m)))
    res["accum_grads_none_before_sync"] = seen
    res["accum_grads"] = par.full_state_dict((n_, p.grad) for n_, p in lora_params(m))

    # The real engine.lora, if present: same checks as above, recorded rather than raised.
    try:
        from engine import lora

        m = build_with_engine_lora(ckpt)
        m.eval()
        with torch.no_grad():
            logits = m(eval_ids())
        m.train()
        (loss_sum(m, *rank_batch(d.rank)) / global_trained_tokens()).backward()
        res["engine_lora"] = {
            "logits": logits,
            "grads": par.full_state_dict((n_, p.grad) for n_, p in lora.named_trainable_lora_parameters(m)),
            "local_shapes": {n_: tuple(p.to_local().shape) for n_, p in lora.named_trainable_lora_parameters(m)},
        }
    except ImportError as err:
        res["engine_lora"] = f"ImportError: {err}"
    except Exception:  # noqa: BLE001 - reported by the test that needs it
        res["engine_lora"] = traceback.format_exc()

    # Tied embeddings: one DTensor shared by embed_tokens and lm_head, loaded once.
    tied = build_sharded(tied_ckpt, base_dtype=torch.float32, param_dtype=torch.float32, checkpointing=False)
    res["tied_is_same"] = tied.lm_head.weight is tied.model.embed_tokens.weight
    res["tied_names"] = [n for n, _ in tied.named_parameters() if "embed" in n or "lm_head" in n]
    tied.eval()
    with torch.no_grad():
        res["tied_logits"] = tied(eval_ids())

    # Validation under FSDP: global shapes are checked; adapters must be declared missing.
    m = build_sharded(ckpt, base_dtype=torch.float32, param_dtype=None, load=False)
    try:
        load_safetensors(m, ckpt)  # adapters not declared missing
        res["missing_error"] = None
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        res["missing_error"] = f"{type(err).__name__}: {err}"
    m2 = build_sharded(ckpt, base_dtype=torch.float32, param_dtype=None, lora=False, load=False)
    try:
        load_safetensors(m2, tied_ckpt)  # no lm_head.weight stored there
        res["tied_into_untied_error"] = None
    except Exception as err:  # noqa: BLE001
        res["tied_into_untied_error"] = f"{type(err).__name__}: {err}"

    res["all_reduce"] = par.all_reduce_sum(torch.tensor([float(d.rank + 1), 10.0])).tolist()
    par.barrier()
    torch.save(res, Path(out_dir) / f"rank{d.rank}.pt")
    par.barrier()
    par.destroy_distributed()
    res["initialized_after_destroy"] = par.is_distributed()
    assert not res["initialized_after_destroy"]


if __name__ == "__main__":
    try:
        run_worker(*sys.argv[1:4])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
