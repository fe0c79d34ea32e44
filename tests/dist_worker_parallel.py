"""Helpers shared by tests/test_parallel.py and the 2-rank worker it launches with torchrun.

As a script (``torchrun --nproc_per_node 2 tests/dist_worker_parallel.py CKPT TIED_CKPT OUT``)
each rank runs every distributed scenario and saves what it observed to ``OUT/rank{r}.pt``;
the test process compares those results with single-process references. One launch serves all
tests, since starting the process group costs more than the scenarios themselves.

The adapters are engine.lora's, added as the trainer adds them (on the meta device, before
activation checkpointing and FSDP): base parameter names unchanged (``...q_proj.weight``),
frozen base weights in the model dtype, trainable fp32 ``...q_proj.lora.0.A`` (r, in) and
``.B`` (out, r). With r = 1 every ``A`` has a single row, so on 2 ranks the second rank's shard
is empty.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.loading import load_safetensors
from engine import lora
from engine import parallel as par
from engine.models import CausalLM, ModelArgs

LORA = lora.LoraConfig(r=1, alpha=2.0, use_rslora=False, target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"))
VOCAB = 97  # odd: the embedding and LM head split 49 / 48 over 2 ranks
INTERMEDIATE = 75  # odd: gate/up split 38 / 37; down_proj's A has 75 columns
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


def add_lora(model: CausalLM) -> CausalLM:
    """engine.lora's adapters (``LORA``, scaling 2), base frozen; works on the meta device too."""
    lora.apply_lora(model, LORA)
    return model


is_lora = lora.is_lora_parameter_name


def lora_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full initial value of every adapter parameter, identical on every rank: engine.lora's
    init for ``A`` (seeded per module name), ``B`` random too so that ``A``'s gradients are not 0."""
    values = lora.lora_init_values(model, seed=3)
    for name, value in values.items():
        if name.endswith(".B"):
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            values[name] = 0.3 * torch.randn(tuple(value.shape), generator=g)
    return values


def set_lora_values_(model: nn.Module) -> None:
    """Copy :func:`lora_values` into the (possibly sharded) adapter parameters, as the trainer does."""
    for name, value in lora_values(model).items():
        par.copy_full_(model.get_parameter(name), value)


def lora_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(lora.named_trainable_lora_parameters(model))


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


def build_sharded(
    ckpt: str | Path,
    *,
    base_dtype: torch.dtype,
    param_dtype: torch.dtype | None,
    adapters: bool = True,
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
    if adapters:
        add_lora(model)
    if checkpointing:
        par.apply_activation_checkpointing(model)
    par.apply_fsdp(model, param_dtype=param_dtype)
    model.to_empty(device=device)
    if not load:
        return model
    load_safetensors(model, ckpt, expect_missing=is_lora if adapters else None)
    if adapters:
        set_lora_values_(model)
    return model


@contextlib.contextmanager
def fused_loss():
    """The training loss on the Triton path of ``kernels.cross_entropy`` (interpreted on CPU), the
    fused linear cross-entropy GPUs run, whose backward does not read the LM head; every other
    kernel stays on torch (interpreting them all would cost a minute). Patches the loss's dispatch
    predicate, which ``engine.parallel`` also reads to decide whether to all-gather the head in
    backward."""
    import kernels.cross_entropy as ce

    saved = ce.use_triton
    ce.use_triton = lambda *tensors: True
    try:
        yield
    finally:
        ce.use_triton = saved


def count_all_gathers(model: nn.Module) -> collections.Counter:
    """Count FSDP2's all-gathers from now on: ``{(group, "forward" | "backward"): calls}`` and
    ``{(group, phase, "elements"): elements received}``, the group named by its modules' names
    ("" is the root), the phase by whether autograd's engine is running. Uses FSDP2's
    ``set_custom_all_gather`` with its default all-gather wrapped."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    counts: collections.Counter = collections.Counter()

    class Counting(DefaultAllGather):
        def __init__(self, label: str):
            super().__init__()
            self.label = label

        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            counts[(self.label, phase)] += 1
            counts[(self.label, phase, "elements")] += output_tensor.numel()
            return super().__call__(output_tensor, input_tensor, group, async_op)

    groups: dict[int, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            groups.setdefault(id(module._get_fsdp_state()), []).append((name, module))
    for members in groups.values():
        members[0][1].set_custom_all_gather(Counting("+".join(name for name, _ in members)))
    return counts


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


def _all_gather_results(ckpt: str, tied_ckpt: str, rank: int) -> dict:
    """All-gathers per FSDP group in one training step's forward and backward (and in a no_grad
    forward), with the loss and the adapters' gradients, for the fused loss and the torch one."""
    out = {}
    for tied, path in ((False, ckpt), (True, tied_ckpt)):
        for fused in (True, False):
            model = build_sharded(path, base_dtype=torch.float32, param_dtype=torch.float32)
            counts = count_all_gathers(model)
            model.train()
            ids, targets = rank_batch(rank)
            with fused_loss() if fused else contextlib.nullcontext():
                loss = model(ids, targets=targets) / global_trained_tokens()
                loss.backward()
            res = {"train": dict(counts), "loss": loss.item(),
                   "grads": par.full_state_dict((n, p.grad) for n, p in lora_params(model))}
            counts.clear()
            model.eval()
            with torch.no_grad():
                model(eval_ids())
            res["no_grad"] = dict(counts)
            res["param_types_after_no_grad"] = sorted({type(p).__name__ for p in model.parameters()})
            out[("tied" if tied else "untied", "fused" if fused else "torch")] = res
    return out


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
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.self_attn.q_proj.lora.0.A"):
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
    m2 = build_sharded(ckpt, base_dtype=torch.float32, param_dtype=None, adapters=False, load=False)
    try:
        load_safetensors(m2, tied_ckpt)  # no lm_head.weight stored there
        res["tied_into_untied_error"] = None
    except Exception as err:  # noqa: BLE001
        res["tied_into_untied_error"] = f"{type(err).__name__}: {err}"

    res["all_gathers"] = _all_gather_results(ckpt, tied_ckpt, d.rank)

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
