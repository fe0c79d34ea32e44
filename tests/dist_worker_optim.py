"""Helpers shared by tests/test_optim.py and the 2-rank worker it launches with torchrun.

As a script (``torchrun --nproc_per_node 2 tests/dist_worker_optim.py OUT CKPT DATA``) each rank shards a
module of parameters with FSDP2 (``fully_shard``, dim 0, gloo), runs `engine.optim.AdamW8bit` on
the same full gradients as the single-process reference, and rank 0 saves the full parameters
and the full optimizer state (``engine.parallel.get_full_optimizer_state``) to ``OUT/result.pt``.
It also resumes from a state saved by one process (``OUT/single_step3.pt``, written by the test
before the launch) and from its own, both through ``set_full_optimizer_state``.

The shapes make 2-rank shards cut 256-element blocks in two (41 x 100: rows 0-20 | 21-40, the cut
at element 2100 = block 8 + 52), leave one rank's shard empty (1 x 4096), and keep one tensor
under bitsandbytes' 4096-element threshold (fp32 moments).

The same launch checks the trainer's per-token loss weighting under FSDP2: the tiny model at
``CKPT``, sharded, accumulates one step of ``DATA``'s chats with ``loss_normalization =
micro_batch_mean`` (the gradient scaled per position at the decoder's output); rank 0 saves the
full gradients, which must equal one process's.
"""

from __future__ import annotations

import copy
import sys
import traceback
from pathlib import Path

import torch
from torch import nn

from engine import parallel as par
from engine.optim import AdamW8bit

SHAPES = {"a": (41, 100), "b": (17, 300), "c": (10, 10), "d": (1, 4096)}
STEPS, RESUME_AT = 5, 3
SETTINGS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


class Params(nn.Module):
    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=gen) * 0.1))


def lr_at(step: int) -> float:
    return 1e-2 * min(step, 3) / 3  # a warm-up, so lr changes between steps


def full_grads(step: int) -> dict[str, torch.Tensor]:
    """The step's gradient of every parameter: rows of very different scales, some all zero."""
    gen = torch.Generator().manual_seed(100 + step)
    out = {}
    for name, shape in SHAPES.items():
        scale = 10.0 ** torch.randint(-7, 1, (shape[0], 1), generator=gen).float()
        g = torch.randn(shape, generator=gen) * scale
        if step == 2:
            g.view(-1)[:600] = 0.0  # whole blocks without gradient: their new scale is 0
        out[name] = g
    return out


def run_steps(module: nn.Module, opt: AdamW8bit, steps: range) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for step in steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        grads = full_grads(step)
        for name, p in module.named_parameters():
            g = grads[name]
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)


def full_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return par.full_state_dict(module.named_parameters())


def sharded(module: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    return module


def resumed(params: dict[str, torch.Tensor], state: dict) -> tuple[nn.Module, AdamW8bit]:
    """A fresh sharded module holding ``params``, its optimizer loaded with ``state``."""
    module = sharded(Params())
    for name, p in module.named_parameters():
        par.copy_full_(p, params[name])
    opt = AdamW8bit(module.parameters(), lr=lr_at(RESUME_AT), **SETTINGS)
    par.set_full_optimizer_state(module, opt, state)
    return module, opt


def tiny_model(ckpt: Path):
    """The trainer's model (FSDP2 under a process group), adapters set to fixed random values
    (B too, so that every adapter has a gradient)."""
    from engine import lora
    from engine.assemble import build_model, read_model_args

    ckpt_dir, args = read_model_args(ckpt)
    model = build_model(args, dtype=torch.float32, device=torch.device("cpu"), weights=ckpt_dir,
                        new_adapter=lora.LoraConfig(r=4, alpha=8.0), seed=0)
    gen = torch.Generator().manual_seed(5)
    for _, p in sorted(lora.named_trainable_lora_parameters(model)):
        par.copy_full_(p, torch.randn(p.shape, generator=gen) * 0.1)
    return model


def step_samples(ckpt: Path, data: Path, n: int = 7) -> list:
    from engine.data import load_samples
    from engine.tokenizer import Tokenizer

    return load_samples(data, Tokenizer.from_file(ckpt), "seed-oss").samples[:n]


def weighted_gradients(model, samples: list, dist: par.Dist, budget: int) -> dict[str, torch.Tensor]:
    from engine import lora
    from engine.train import accumulate_gradients

    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, samples, dist, budget, "micro_batch_mean", 2)
    return {n: par.gather_full(p.grad).clone() for n, p in lora.named_trainable_lora_parameters(model)}


def main(out: Path, ckpt: Path, data: Path) -> None:
    dist = par.init_distributed()
    try:
        module = sharded(Params())
        opt = AdamW8bit(module.parameters(), lr=lr_at(1), **SETTINGS)
        run_steps(module, opt, range(1, RESUME_AT + 1))
        # A copy: the full state of a plain (replicated) tensor is the live tensor itself.
        result = {"params3": full_params(module), "state3": copy.deepcopy(par.get_full_optimizer_state(module, opt))}
        run_steps(module, opt, range(RESUME_AT + 1, STEPS + 1))
        result |= {"params5": full_params(module), "state5": par.get_full_optimizer_state(module, opt)}

        # Resume at step 3 from the single process's state and from this run's own; only rank 0's
        # copy of the state is read (set_full_optimizer_state broadcasts it).
        single = torch.load(out / "single_step3.pt", weights_only=False)
        for key, params, state in (("from_single", single["params"], single["state"]),
                                   ("from_two", result["params3"], result["state3"])):
            module2, opt2 = resumed(params, state if dist.is_main else {})
            run_steps(module2, opt2, range(RESUME_AT + 1, STEPS + 1))
            result[f"params5_{key}"] = full_params(module2)
        result["weighted_grads"] = weighted_gradients(tiny_model(ckpt), step_samples(ckpt, data), dist, budget=300)
        if dist.is_main:
            torch.save(result, out / "result.pt")
        par.barrier()
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        raise
    finally:
        par.destroy_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
