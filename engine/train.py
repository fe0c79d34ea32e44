"""LoRA fine-tuning: `python -m engine.train --config run.toml [--key=value ...]`.

The same command runs as one process or under `torchrun --nproc_per_node N` (FSDP2 or replicated
ranks, gloo on CPU, NCCL on GPU). One optimizer step consumes `batch_size` samples (the paper: 16),
in an order fixed by the seed. The step's samples are dealt to the ranks balancing tokens, each
rank packs its own into varlen rows of at most `micro_batch_tokens` tokens (no padding; attention
and positions restart at each sample), and every trained token's loss is weighted by a number that
depends only on the step's samples and their order (`sample_loss_weights`): by default 1 / the
trained tokens of the *whole step* (HF's fixed gradient accumulation does the same), or as one of
Axolotl's releases averaged (`loss_normalization`). So the step's gradient is the same however its
samples are split into micro-batches or ranks. The optimizer: `engine.optim`.

The run directory (`out_dir`): `engine.rundir`. The model: `engine.assemble.build_model`. Random
streams (dropout): `engine.rng`. A step that diverges, a write that fails and a rank that hangs end
the run with one line naming the step, the file or the rank, and the last good checkpoint, which a
resumption continues exactly: `engine.faults`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from engine import faults, lora, memory, parallel, peft_format, rng
from engine.assemble import Layout, build_model, read_model_args, torch_dtype
from engine.chat import check_tokenizer
from engine.config import TrainConfig, load_config
from engine.data import Sample, load_samples
from engine.errors import EngineError, TrainingError, report
from engine.optim import build_optimizer
from engine.models import CausalLM
from engine.packing import PackedBatch, collate_packed, pack
from engine.rundir import RunDir, RunRecords, fingerprint
from engine.tokenizer import Tokenizer
from kernels import backend

# ---------------------------------------------------------------- the plan: which samples, when, where


def step_plan(num_samples: int, cfg: TrainConfig) -> list[tuple[int, list[int]]]:
    """(epoch, sample indices) for every optimizer step of the full run.

    Each epoch is a fresh permutation seeded by (seed, epoch); its last step may be short. The plan
    depends only on the data size and the config, so a resumed run continues it exactly.
    """
    plan = []
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(num_samples).tolist()
        for start in range(0, num_samples, cfg.batch_size):
            plan.append((epoch, order[start:start + cfg.batch_size]))
    return plan


def rank_micro_batches(step_samples: list[Sample], rank: int, world: int, budget: int) -> tuple[list[list[Sample]], int]:
    """This rank's packed rows of one step, and how many micro-batches every rank must run.

    Samples are dealt to the ranks first, balancing tokens (longest first, each to the rank with
    the fewest tokens so far, the lower rank on ties), then each rank packs its own, in step
    order, into rows of at most ``budget`` tokens. So every rank gets work even when the whole
    step would fit one row (the paper's 16 EM chats are ~1,500 tokens: packed over the step they
    would keep one rank of eight busy). A rank with fewer rows than another runs empty
    micro-batches (FSDP needs the same number of forward/backward passes on every rank). With
    one rank this is plain packing of the step in order.
    """
    loads, dealt = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(step_samples)), key=lambda i: (-len(step_samples[i].input_ids), i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        dealt[r].append(i)
        loads[r] += len(step_samples[i].input_ids)
    rows = [pack([step_samples[i] for i in sorted(d)], budget) for d in dealt]
    return rows[rank], max(len(r) for r in rows)


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """HF's get_linear_schedule_with_warmup: linear ramp from 0, then linear decay to 0.

    As in HF (and so in the paper's runs), the first optimizer step uses the factor at step 0,
    i.e. a learning rate of 0 when there is warm-up.
    """
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- the trainer


class Trainer:
    """One training run: its run directory checked first, then the data, the memory estimate,
    the model and the optimizer; `run()` trains (or resumes) to the end."""

    def __init__(self, cfg: TrainConfig, dist: "parallel.Dist"):
        self.cfg, self.dist = cfg, dist
        self.log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if dist.is_main else (lambda msg: None)
        self.run_dir = RunDir(cfg.out_dir)
        # Before anything heavy: a forgotten --resume=true or a changed setting is reported now,
        # not after loading tens of GB of weights.
        self.resuming = self.run_dir.check_start(cfg, dist.world_size)
        self.records = RunRecords(self.run_dir, dist.is_main, cfg.record_tokens)

        ckpt_dir, self.model_args = read_model_args(cfg.model)
        tokenizer = Tokenizer.from_file(cfg.tokenizer or ckpt_dir)
        check_tokenizer(tokenizer, cfg.template, model_vocab_size=self.model_args.vocab_size, model=cfg.model)
        self.data_sha256: dict[str, str] | None = None  # recorded in config.json (a changed file is refused)
        self.samples: list[Sample] = []
        for path in cfg.data:  # every rank loads all data (cheap) and so knows every step's token count
            ds = load_samples(path, tokenizer, cfg.template, cfg.policy(), max_len=cfg.max_len,
                              overlong="truncate" if cfg.truncate else "drop", skip_invalid=cfg.skip_invalid,
                              boundary_tokens=cfg.boundary_tokens)
            st = ds.stats
            boundary = f", {st.boundary_trained} boundary token(s) trained" if st.boundary_trained else ""
            self.log(f"data {path}: {st.kept} samples ({st.invalid} invalid, {st.dropped_overlong} over "
                     f"{cfg.max_len} tokens dropped, {st.truncated} truncated), {st.trained_tokens} trained tokens"
                     f"{boundary}")
            self.samples += ds.samples
        if not self.samples:
            raise TrainingError("no training samples left after loading the data")
        self.data_sha256 = fingerprint(cfg.data)
        self.plan = step_plan(len(self.samples), cfg)
        self.total_steps = len(self.plan)
        self.last_step = min(self.total_steps, cfg.max_steps or self.total_steps)

        self.lora_config = cfg.lora_config()
        layout = Layout(checkpointed_layers=self.check_memory(), compile=cfg.compile, data_parallel=cfg.data_parallel)
        self.model = build_model(self.model_args, dtype=torch_dtype(cfg.dtype), device=dist.device, weights=ckpt_dir,
                                 layout=layout, stack_adapters=cfg.stack_adapters, new_adapter=self.lora_config,
                                 seed=cfg.seed)
        self.params = lora.trainable_lora_parameters(self.model)
        self.optimizer = build_optimizer(cfg.optimizer, self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                         eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, self.total_steps)
        )
        self.step = 0  # optimizer steps done
        self.last_checkpoint: Path | None = None

    def check_memory(self) -> int | None:
        """Print the per-GPU memory estimate; refuse, before loading anything, a step that won't
        fit. Returns how many layers to recompute (None: all, 0: none)."""
        cfg, dist, args = self.cfg, self.dist, self.model_args
        if not cfg.activation_checkpointing:
            layers: int | None = 0
        else:
            layers = None if cfg.checkpoint_layers in ("all", "auto") else int(cfg.checkpoint_layers)
        common = dict(dtype=cfg.dtype, lora_r=cfg.lora_r, lora_targets=cfg.lora_targets,
                      micro_batch_tokens=cfg.micro_batch_tokens, n_stacked=len(cfg.stack_adapters),
                      world_size=dist.world_size if cfg.data_parallel == "fsdp" else 1,
                      kernels=backend.path_for(dist.device))
        available = cfg.memory_gib or memory.device_gib(dist.device)
        if cfg.activation_checkpointing and cfg.checkpoint_layers == "auto":
            if available is None:
                self.log("checkpoint_layers = auto: no device memory to plan for (CPU): recomputing every layer")
            else:
                layers = memory.fewest_checkpointed_layers(args, available, **common)  # None: none fits
                if layers is not None:
                    self.log(f"checkpoint_layers = auto: recomputing {layers} of {args.num_hidden_layers} layers")
        est = memory.estimate(args, activation_checkpointing=layers != 0, checkpointed_layers=layers, **common)
        where = f"{'GPU' if dist.device.type == 'cuda' else 'process'} ({dist.world_size} rank(s))"
        for line in memory.format_estimate(est, where):
            self.log(line)
        memory.check_fits(est, dist.device, cfg.memory_gib)
        return layers

    # ------------------------------------------------------------ start / resume

    def start(self) -> None:
        """Write the run's config (a fresh run), or load its last intact checkpoint (a resumption);
        seed every random stream (or restore it); remove what an interrupted write left."""
        parallel.barrier()  # every rank has checked the directory before rank 0 writes
        path = None
        if self.resuming:
            path, skipped = self.run_dir.latest_checkpoint()
            for problem in skipped:
                self.log(f"skipping damaged checkpoint: {problem}")
            if path is not None:
                self.load_checkpoint(path)
            else:
                self.log("no complete checkpoint to resume from: starting from step 0")
        if path is None:
            rng.seed_all(self.cfg.seed, self.dist.rank)

        def files() -> None:
            if not self.dist.is_main:
                return
            for stale in self.run_dir.remove_stale_temporaries():
                self.log(f"removed stale temporary {stale}")
            if self.resuming:
                for note in self.records.truncate_after(self.step):
                    self.log(note)
            if path is None:
                self.run_dir.write_config(self.cfg, self.dist.world_size, self.data_sha256)

        self.together(files, self.run_dir.path)
        if path is not None:
            self.log(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------ faults

    def last_good(self) -> str:
        return (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was written yet")

    def together(self, write, path: Path) -> None:
        """Run `write` (this rank's share of some writes), then agree with every rank on whether all
        succeeded (a collective): a failure on one rank ends the run on all of them, at once. A
        failed write becomes a WriteError naming the file (or `path`) and the step."""
        error = None
        try:
            write()
        except EngineError as e:
            error = e
        except (OSError, SafetensorError) as e:
            error = faults.write_error(e, path, faults.describe_where(self.step), self.last_good())
        failed = faults.failed_ranks(error is not None, self.dist)
        if error is not None:
            raise error
        if failed:
            raise TrainingError(f"stopped {faults.describe_where(self.step)}: rank(s) {', '.join(map(str, failed))} "
                                f"failed (see its message); {self.last_good()}")

    def check_finite(self, named, what: str) -> None:
        """Refuse to write non-finite values (a last safeguard: an accepted step has none)."""
        count, first = faults.nonfinite_values(named, "cpu")
        if count:
            raise TrainingError(f"refusing to write {what} with non-finite values in {count} tensor(s) (e.g. {first}) "
                                f"at step {self.step}; {self.last_good()}")

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of this step atomically (all ranks agree at each phase); a failure
        removes the partial one, leaving the last good checkpoint as it was."""
        run, main = self.run_dir, self.dist.is_main
        pending = run.pending_checkpoint(self.step)
        self.together(lambda: main and run.begin_checkpoint(self.step), pending)
        adapter = parallel.full_state_dict(lora.named_trainable_lora_parameters(self.model))
        optim_state = parallel.get_full_optimizer_state(self.model, self.optimizer)

        def write() -> None:
            run.write_rng(pending, self.dist.rank, rng.state())
            if main:
                self.check_finite(list(adapter.items()) + _state_tensors(optim_state), "a checkpoint")
                run.write_training_state(pending, adapter, optim_state, self.scheduler.state_dict())

        try:
            self.together(write, pending)
            self.together(lambda: main and run.commit_checkpoint(
                pending, {"step": self.step, "world_size": self.dist.world_size, "total_steps": self.total_steps}),
                pending)
        except EngineError:
            if main:
                faults.remove_tree(pending)  # frees the space; the next start would remove it anyway
            raise
        self.last_checkpoint = run.checkpoint_path(self.step)
        return self.last_checkpoint

    def load_checkpoint(self, path: Path) -> None:
        saved = self.run_dir.read_checkpoint(path, self.dist.rank)
        manifest = saved["manifest"]
        same_ranks = manifest["world_size"] == self.dist.world_size
        if not same_ranks:
            # Adapter and optimizer state are saved whole and the data order is rank-independent, so
            # the run continues the same; only per-rank random streams (dropout) start afresh.
            self.log(f"resuming on {self.dist.world_size} rank(s) a run checkpointed on {manifest['world_size']}: "
                     "same data order and state; dropout random streams are re-seeded, not restored")
        named = dict(lora.named_trainable_lora_parameters(self.model))
        if set(saved["adapter"]) != set(named):
            raise TrainingError(f"{path}: adapter tensors do not match the model's trainable parameters")
        with torch.no_grad():
            for name, param in named.items():
                parallel.copy_full_(param, saved["adapter"][name])
        parallel.set_full_optimizer_state(self.model, self.optimizer, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.step = manifest["step"]
        if same_ranks and saved["rng"] is not None:
            rng.restore(saved["rng"])
        else:
            rng.seed_all(self.cfg.seed, self.dist.rank, self.step)
        self.last_checkpoint = path

    # ------------------------------------------------------------ one optimizer step

    def train_step(self, step_samples: list[Sample]) -> dict:
        """One optimizer step, refused (TrainingError, nothing logged or saved) when its loss or
        gradient norm is not finite (before the update) or its update leaves a non-finite value
        in the adapter or the optimizer state."""
        cfg, step = self.cfg, self.step + 1
        loss_total, n_targets, tokens = accumulate_gradients(
            self.model, step_samples, self.dist, cfg.micro_batch_tokens, cfg.loss_normalization,
            cfg.loss_micro_batch_size)
        step_loss = loss_total / max(1, n_targets)
        if not math.isfinite(step_loss):
            raise self.diverged(f"non-finite loss ({step_loss}) at step {step}; stopped before the update")
        grad_norm = parallel.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if not math.isfinite(grad_norm):  # the same on every rank: the norm is reduced over them
            raise self.diverged(f"non-finite gradient norm ({grad_norm}) at step {step}; stopped before the update")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.check_update(step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": n_targets, "tokens": tokens}

    def diverged(self, what: str) -> TrainingError:
        return TrainingError(f"{what}; {self.last_good()}; a resumption would repeat this step: start a new run "
                             "with a lower lr (or check the model and the data)")

    def check_update(self, step: int) -> None:
        """Refuse an update that left an inf or nan in the adapter or its optimizer state, on any rank."""
        named = lora.named_trainable_lora_parameters(self.model)
        found = faults.nonfinite_after_update(named, self.optimizer, self.dist)
        if found:
            raise TrainingError(f"non-finite adapter values after the update of step {step} ({found}); the step was "
                                f"not saved; {self.last_good()}; a resumption would repeat this step: start a new run "
                                "with a lower lr (or check the data)")

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        """Train (or resume) to the end. A collective that fails under torchrun (a hung or dead
        rank) ends the run with one line naming the rank(s) that did not answer."""
        try:
            self._run()
        except RuntimeError as e:
            if isinstance(e, EngineError) or not faults.is_collective_failure(e):
                raise
            where = faults.describe_where(self.at_step)
            raise faults.timeout_error(e, self.dist, where, self.cfg.collective_timeout_min, self.last_good()) from None

    def _run(self) -> None:
        cfg = self.cfg
        self.at_step = self.step  # the step a collective failure is reported at
        self.start()
        self.model.train()
        self.log(f"training {self.last_step - self.step} step(s) (of {self.total_steps} in the full run) on "
                 f"{self.dist.world_size} rank(s); {len(self.params)} trainable tensors, "
                 f"{sum(p.numel() for p in self.params):,} trainable parameters")
        start, start_step = time.perf_counter(), self.step
        while self.step < self.last_step:
            epoch, indices = self.plan[self.step]
            step_samples = [self.samples[i] for i in indices]
            self.at_step = self.step + 1
            t0 = time.perf_counter()
            record = self.train_step(step_samples)
            self.step += 1
            dt = time.perf_counter() - t0
            record = {"step": self.step, "epoch": epoch, **record, "tokens_per_s": record["tokens"] / dt,
                      "step_s": dt}
            self.together(lambda: (self.records.tokens(self.step, epoch, step_samples), self.records.metrics(record)),
                          self.run_dir.path)
            if self.step % cfg.log_every == 0 or self.step == self.last_step:
                elapsed = time.perf_counter() - start
                eta = elapsed / (self.step - start_step) * (self.last_step - self.step)
                self.log(f"step {self.step}/{self.last_step} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                         f"grad {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | ETA {format_eta(eta)}")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step != self.last_step:
                self.save_checkpoint()
        if self.last_checkpoint != self.run_dir.checkpoint_path(self.step):  # not when resumed at the end
            self.save_checkpoint()
        self.export_adapter(self.run_dir.adapter_dir)
        self.log(f"done: adapter in {self.run_dir.adapter_dir}")

    def export_adapter(self, target: Path) -> None:
        config, weights = lora.adapter_state(self.model)  # a collective under FSDP

        def write() -> None:
            if self.dist.is_main:
                self.check_finite([(f"{n}.lora_{ab}", t) for n, pair in weights.items() for ab, t in zip("AB", pair)],
                                  "the adapter")
                peft_format.write_peft_adapter(target, config, weights, base_model_name_or_path=self.cfg.model)

        self.together(write, target)


def sample_loss_weights(step_samples: list[Sample], normalization: str = "step_tokens",
                        micro_batch_size: int = 2) -> list[float]:
    """The weight of each trained token's loss, per sample of one optimizer step, in step order.

    step_tokens            1 / the step's trained tokens: the step's mean token loss (HF's fixed
                           gradient accumulation; ours by default).
    micro_batch_mean       1 / (trained tokens of the sample's micro-batch) / (micro-batches in the
                           step): the mean over the step's micro-batches of each one's mean token
                           loss, as Axolotl >= 0.17 computes it. A micro-batch is `micro_batch_size`
                           consecutive samples of the step in its order, as Axolotl's data loader
                           would form them (the step's last one may be shorter).
    step_tokens_div_accum  step_tokens divided again by the number of micro-batches: Axolotl 0.15.0
                           with its pinned transformers, which divides by the accumulation steps twice.

    The weights depend on the step's samples and their order only, never on how the step is
    packed into rows or dealt to ranks, so neither changes the step's gradient.
    """
    n_targets = sum(s.num_targets for s in step_samples)
    groups = [step_samples[i:i + micro_batch_size] for i in range(0, len(step_samples), micro_batch_size)]
    if normalization == "step_tokens":
        return [1.0 / max(1, n_targets)] * len(step_samples)
    if normalization == "step_tokens_div_accum":
        return [1.0 / max(1, n_targets) / len(groups)] * len(step_samples)
    if normalization != "micro_batch_mean":
        raise ValueError(f"unknown loss normalization {normalization!r}")
    weights = []
    for group in groups:
        group_targets = sum(s.num_targets for s in group)
        weights += [1.0 / group_targets / len(groups) if group_targets else 0.0] * len(group)
    return weights


def accumulate_gradients(model: CausalLM, step_samples: list[Sample], dist: parallel.Dist, micro_batch_tokens: int,
                         normalization: str = "step_tokens", micro_batch_size: int = 2) -> tuple[float, int, int]:
    """Forward and backward one optimizer step's samples on this rank, every trained token's loss
    weighted by `sample_loss_weights`. Returns (summed loss over all ranks, trained tokens, tokens).

    When all the step's samples weigh the same (step_tokens, step_tokens_div_accum) the packed
    row's summed loss is scaled by that weight; otherwise the gradient reaching the final hidden
    states is scaled position by position by the weight of the sample each position belongs to
    (`_ScaleGrad`), which is exact: a position's hidden state feeds only its own token's loss.
    The returned loss is unweighted (the step's mean token loss is loss / trained tokens)."""
    n_targets = sum(s.num_targets for s in step_samples)  # the whole step's, known on every rank
    weights = sample_loss_weights(step_samples, normalization, micro_batch_size)
    uniform = len(set(weights)) == 1
    weight_of = {id(s): w for s, w in zip(step_samples, weights)}
    rows, n_micro = rank_micro_batches(step_samples, dist.rank, dist.world_size, micro_batch_tokens)
    loss_sum = torch.zeros((), dtype=torch.float32, device=dist.device)  # on device: no sync per micro-batch
    tokens = 0
    for i in range(n_micro):
        parallel.set_gradient_sync(model, i == n_micro - 1)  # reduce across ranks once per step
        if i >= len(rows):  # this rank ran out of rows: a zero-weight pass keeps FSDP's collectives in step
            loss = _forward(model, _dummy_batch(dist.device))
            (loss * 0.0).backward()
            continue
        batch = collate_packed(rows[i]).to(dist.device)
        tokens += batch.input_ids.numel()
        if uniform:
            loss = _forward(model, batch)
            (loss * weights[0]).backward()
        else:
            position_weights = torch.tensor([weight_of[id(s)] for s in rows[i] for _ in s.input_ids],
                                            dtype=torch.float32, device=dist.device)
            loss = _forward(model, batch, position_weights)
            loss.backward()
        loss_sum += loss.detach()
    if dist.world_size > 1 and not parallel.is_sharded(model):  # replicated: sum the adapters' gradients
        parallel.all_reduce_gradients_(lora.trainable_lora_parameters(model))
    totals = parallel.all_reduce_sum(torch.tensor([loss_sum.item(), float(tokens)], dtype=torch.float64))
    return totals[0].item(), n_targets, int(totals[1].item())


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient of position t by weights[t] (in fp32)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weights)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weights,) = ctx.saved_tensors
        return (grad.float() * weights.view(1, -1, 1)).to(grad.dtype), None


def _forward(model: CausalLM, batch: PackedBatch, position_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The packed row's summed token loss. With ``position_weights``, the gradient into the final
    hidden states (the decoder stack's output, which feeds only the LM head and the loss) is
    scaled position by position."""
    def forward() -> torch.Tensor:
        return model(batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
                     targets=batch.targets)

    if position_weights is None:
        return forward()
    hook = model.model.register_forward_hook(lambda module, args, out: _ScaleGrad.apply(out, position_weights))
    try:
        return forward()
    finally:
        hook.remove()


def _dummy_batch(device) -> PackedBatch:
    one = torch.zeros((1, 1), dtype=torch.long)
    return PackedBatch(one, torch.full((1, 1), -100), one.clone(), torch.tensor([0, 1], dtype=torch.int32), 0, []).to(device)


def _state_tensors(optim_state: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of a full optimizer state (`parallel.get_full_optimizer_state`)."""
    return [(f"{name} ({key})", t) for name, per_param in optim_state.get("state", {}).items()
            for key, t in per_param.items() if isinstance(t, torch.Tensor)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    def default(f) -> str:
        if f.default_factory is not dataclasses.MISSING:
            return str(f.default_factory())
        return "(required)" if f.default is dataclasses.MISSING else str(f.default)

    epilog = "settings (in the TOML file, or as --key=value):\n" + "\n".join(
        f"  {f.name:25s} {f.metadata['help']} [{default(f)}]" for f in dataclasses.fields(TrainConfig)
    )
    parser = argparse.ArgumentParser(prog="python -m engine.train", description="LoRA fine-tuning of a chat model.",
                                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file of settings")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
    except EngineError as e:  # every rank reports: under torchrun, before the process group exists
        return report(e, int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    dist = parallel.init_distributed(timeout=timedelta(minutes=cfg.collective_timeout_min))
    try:
        Trainer(cfg, dist).run()
    except EngineError as e:  # every rank reports: a problem may show on one rank only
        code = report(e, dist.rank if dist.world_size > 1 else None)
        if getattr(e, "process_group_broken", False):  # tearing it down could block or abort
            sys.stdout.flush()
            os._exit(code)
        return code
    finally:
        parallel.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
