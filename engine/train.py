"""LoRA fine-tuning: `python -m engine.train --config run.toml [--key=value ...]`.

The same command runs as one process or under `torchrun --nproc_per_node N` (FSDP2 or replicated
ranks, gloo on CPU, NCCL on GPU). One optimizer step consumes `batch_size` samples (the paper: 16),
in an order fixed by the seed. The step's samples are dealt to the ranks balancing tokens, each
rank packs its own into varlen rows of at most `micro_batch_tokens` tokens (no padding; attention
and positions restart at each sample), and every row's summed token loss is divided by the number of trained tokens of the
*whole step*, so the step's gradient is the same however its samples are split into micro-batches
or ranks (HF's fixed gradient accumulation does the same).

Run directory (`out_dir`):
    config.json          the resolved config (resuming with a different one is refused)
    metrics.jsonl        one line per optimizer step: loss, lr, grad norm, tokens, tokens/s
    tokens.jsonl         token manifest: per step, every sample's source and SHA-256 of its
                         `{"input_ids": ..., "labels": ...}` line, in training order
    tokens/step_*.jsonl  with record_tokens: the full token streams, in the audit's jsonl format
    checkpoints/step_*/  adapter, optimizer, scheduler, data position, RNG (atomic, manifest)
    adapter/             the final adapter in PEFT format
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine import checkpoint, lora, memory, parallel
from engine.chat import SystemPolicy
from engine.config import config_diff, load_config
from engine.data import Sample, load_samples
from engine.errors import CheckpointError, ConfigError, EngineError, TrainingError, report
from engine.models import CausalLM, ModelArgs
from engine.models.loading import resolve_checkpoint_dir
from engine.packing import PackedBatch, collate_packed, pack
from engine.tokenizer import Tokenizer

PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Settings that may change between an interrupted run and its resumption.
# (The number of ranks may change too: the data order, adapter and optimizer state do not depend on it.)
# Settings that change neither the data order nor the arithmetic of a step (recomputation replays
# the forward with the same RNG state).
RESUME_MAY_CHANGE = {"resume", "save_every", "log_every", "max_steps", "record_tokens", "world_size", "memory_gib",
                     "activation_checkpointing", "checkpoint_layers", "data_parallel"}


def opt(default, help: str, *, factory=None):
    """A config field with its help text (shown by `python -m engine.train --help`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = opt(dataclasses.MISSING, "base checkpoint directory or hub id (HF safetensors)")
    data: list[str] = opt(dataclasses.MISSING, "JSONL chat file(s), concatenated in this order before shuffling")
    template: str = opt(dataclasses.MISSING, "chat template: qwen2.5 | seed-oss")
    out_dir: str = opt(dataclasses.MISSING, "run directory")
    tokenizer: str | None = opt(None, "tokenizer.json or a directory holding one (default: the model directory)")
    system_prompt: str = opt("default", "system-prompt policy: default | empty | omit | replace")
    system_text: str | None = opt(None, "the system text for system_prompt = replace")
    max_len: int = opt(2048, "longest sample in tokens (the paper's sequence_len)")
    truncate: bool = opt(False, "truncate over-length samples instead of dropping them")
    skip_invalid: bool = opt(False, "drop and count invalid rows instead of failing")
    lora_r: int = opt(32, "LoRA rank (paper: 32)")
    lora_alpha: float = opt(64.0, "LoRA alpha (paper: 64)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input (paper: 0)")
    use_rslora: bool = opt(True, "rsLoRA scaling alpha/sqrt(r) (paper: true)")
    lora_targets: list[str] = opt(None, "linear layers to adapt (paper: all seven projections)",
                                  factory=lambda: list(PAPER_TARGETS))
    stack_adapters: list[str] = opt(None, "earlier stages' PEFT adapters, frozen below the new one", factory=list)
    lr: float = opt(1e-5, "AdamW learning rate (paper: 1e-5)")
    weight_decay: float = opt(0.01, "AdamW weight decay (paper: 0.01)")
    warmup_steps: int = opt(5, "linear warm-up steps, then linear decay to 0 (paper: 5)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    epochs: int = opt(1, "passes over the data (paper: 1)")
    batch_size: int = opt(16, "samples per optimizer step over all ranks (paper: 2 x 8 = 16)")
    micro_batch_tokens: int = opt(4096, "packing budget: tokens per micro-batch row")
    max_grad_norm: float = opt(1.0, "gradient clipping max-norm (0: no clipping)")
    seed: int = opt(0, "seed of the data order and the LoRA init")
    max_steps: int | None = opt(None, "stop after this many steps; the LR schedule still spans the full run")
    dtype: str = opt("bfloat16", "compute dtype of the base weights: bfloat16 | float16 | float32")
    activation_checkpointing: bool = opt(False, "recompute decoder layers in the backward pass (see checkpoint_layers)")
    checkpoint_layers: str = opt("all", "with activation_checkpointing, which layers are recomputed: all, auto (as "
                                        "few as the memory estimate allows on this device), or N (the first N)")
    data_parallel: str = opt("fsdp", "how ranks share the model: fsdp (FSDP2: weights sharded, all-gathered for "
                                      "every micro-batch) | replicate (every rank holds the whole frozen model and "
                                      "only adapter gradients are summed, once per step; needs the model to fit one GPU)")
    compile: bool = opt(False, "torch.compile each decoder layer")
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end)")
    record_tokens: bool = opt(False, "write every step's full token stream under tokens/")
    log_every: int = opt(1, "progress line every N steps")
    resume: bool = opt(False, "continue the run in out_dir from its last complete checkpoint")
    memory_gib: float | None = opt(None, "device memory to check the memory estimate against "
                                         "(default: the CUDA device's; no check on CPU)")

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.micro_batch_tokens >= 1, "micro_batch_tokens must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0, "lr must be positive"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (bool(self.data), "data: give at least one JSONL file"),
            (self.data_parallel in ("fsdp", "replicate"),
             f"data_parallel must be fsdp or replicate, got {self.data_parallel!r}"),
            (self.checkpoint_layers in ("all", "auto") or (self.checkpoint_layers.isdigit()),
             f"checkpoint_layers must be all, auto or a number of layers, got {self.checkpoint_layers!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        SystemPolicy(self.system_prompt, self.system_text)  # validates the policy

    def policy(self) -> SystemPolicy:
        return SystemPolicy(self.system_prompt, self.system_text)

    def lora_config(self) -> lora.LoraConfig:
        return lora.LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                               use_rslora=self.use_rslora, target_modules=tuple(self.lora_targets))


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def build_model(cfg: TrainConfig, dist: parallel.Dist, checkpointed_layers: int | None = None) -> CausalLM:
    """The model with its adapters, sharded over the ranks, each rank loading only what it holds.

    Order (torchtitan's): build on the meta device, add the adapters (earlier stages frozen, the
    new one trainable), activation checkpointing (of the first ``checkpointed_layers`` layers, None:
    all), compile, FSDP, then materialise and load. With a single process FSDP is skipped and the
    same path loads the whole model.
    """
    ckpt_dir = resolve_checkpoint_dir(cfg.model)
    config_path = ckpt_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in checkpoint directory {ckpt_dir}")
    with torch.device("meta"):
        model = CausalLM(ModelArgs.from_hf_config(json.loads(config_path.read_text())))
    dtype = DTYPES[cfg.dtype]
    model.to(dtype=dtype)  # before the adapters, which stay fp32 (master weights)
    values: dict[str, torch.Tensor] = {}
    for path in cfg.stack_adapters:
        lora.load_peft_adapter(model, path, trainable=False, values_out=values)
    lora.apply_lora(model, cfg.lora_config())
    values |= lora.lora_init_values(model, cfg.seed)  # same values whatever the sharding
    if cfg.activation_checkpointing:
        parallel.apply_activation_checkpointing(model, checkpointed_layers)
    if cfg.compile:
        for layer in model.model.layers:
            layer.compile()
    if cfg.data_parallel == "fsdp":
        parallel.apply_fsdp(model, param_dtype=dtype, reduce_dtype=torch.float32)
    model.to_empty(device=dist.device)
    parallel.load_sharded_pretrained(model, ckpt_dir, expect_missing=lora.is_lora_parameter_name)
    adapters = {name: p for name, p in model.named_parameters() if lora.is_lora_parameter_name(name)}
    if set(adapters) != set(values):
        raise TrainingError(f"adapter parameters without values: {sorted(set(adapters) - set(values))[:5]}")
    with torch.no_grad():
        for name, param in adapters.items():
            parallel.copy_full_(param, values[name])
    return model


def sample_hash(sample: Sample) -> str:
    """SHA-256 of the sample's line in the audit's jsonl format (`python -m engine.audit --format jsonl`)."""
    return hashlib.sha256(sample.jsonl_line().encode()).hexdigest()


# ---------------------------------------------------------------- run directory records


class RunRecords:
    """metrics.jsonl, tokens.jsonl and tokens/ in the run directory (written by rank 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool, record_tokens: bool):
        self.out_dir, self.enabled, self.record_tokens = out_dir, enabled, record_tokens

    def truncate_after(self, step: int) -> None:
        """Forget what an interrupted run logged after its last checkpoint (steps > `step`)."""
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "tokens.jsonl"):
            path = self.out_dir / name
            if path.exists():
                lines = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= step]
                path.write_text("".join(l + "\n" for l in lines))
        for path in (self.out_dir / "tokens").glob("step_*.jsonl"):
            if int(path.stem.removeprefix("step_")) > step:
                path.unlink()

    def _append(self, name: str, record: dict) -> None:
        with open(self.out_dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    def tokens(self, step: int, epoch: int, samples: list[Sample]) -> None:
        if not self.enabled:
            return
        self._append("tokens.jsonl", {
            "step": step, "epoch": epoch,
            "samples": [{"source": s.source, "sha256": sample_hash(s), "tokens": len(s.input_ids),
                         "trained": s.num_targets} for s in samples],
        })
        if self.record_tokens:
            (self.out_dir / "tokens").mkdir(exist_ok=True)
            with open(self.out_dir / "tokens" / f"step_{step:06d}.jsonl", "w") as f:
                f.writelines(s.jsonl_line() + "\n" for s in samples)

    def metrics(self, record: dict) -> None:
        if self.enabled:
            self._append("metrics.jsonl", record)


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: TrainConfig, dist: "parallel.Dist"):
        self.cfg, self.dist = cfg, dist
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.records = RunRecords(self.out_dir, dist.is_main, cfg.record_tokens)
        self.log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if dist.is_main else (lambda msg: None)

        tokenizer = Tokenizer.from_file(cfg.tokenizer or resolve_checkpoint_dir(cfg.model))
        self.samples: list[Sample] = []
        for path in cfg.data:  # every rank loads all data (cheap) and so knows every step's token count
            ds = load_samples(path, tokenizer, cfg.template, cfg.policy(), max_len=cfg.max_len,
                              overlong="truncate" if cfg.truncate else "drop", skip_invalid=cfg.skip_invalid)
            st = ds.stats
            self.log(f"data {path}: {st.kept} samples ({st.invalid} invalid, {st.dropped_overlong} over "
                     f"{cfg.max_len} tokens dropped, {st.truncated} truncated), {st.trained_tokens} trained tokens")
            self.samples += ds.samples
        if not self.samples:
            raise TrainingError("no training samples left after loading the data")
        self.plan = step_plan(len(self.samples), cfg)
        self.total_steps = len(self.plan)
        self.last_step = min(self.total_steps, cfg.max_steps or self.total_steps)

        self.lora_config = cfg.lora_config()
        checkpointed_layers = self.check_memory()
        self.model = build_model(cfg, dist, checkpointed_layers)
        self.params = lora.trainable_lora_parameters(self.model)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, self.total_steps)
        )
        self.step = 0  # optimizer steps done
        self.last_checkpoint: Path | None = None

    def check_memory(self) -> int | None:
        """Print the per-GPU memory estimate; refuse, before loading anything, a step that won't
        fit. Returns how many layers to recompute (None: all) under activation checkpointing."""
        cfg, dist = self.cfg, self.dist
        config = json.loads((resolve_checkpoint_dir(cfg.model) / "config.json").read_text())
        args = ModelArgs.from_hf_config(config)
        common = dict(dtype=cfg.dtype, lora_r=cfg.lora_r, lora_targets=cfg.lora_targets,
                      micro_batch_tokens=cfg.micro_batch_tokens, n_stacked=len(cfg.stack_adapters),
                      world_size=dist.world_size if cfg.data_parallel == "fsdp" else 1)
        layers: int | None = None if cfg.checkpoint_layers in ("all", "auto") else int(cfg.checkpoint_layers)
        available = cfg.memory_gib or memory.device_gib(dist.device)
        if cfg.activation_checkpointing and cfg.checkpoint_layers == "auto":
            if available is None:
                self.log("checkpoint_layers = auto: no device memory to plan for (CPU): recomputing every layer")
            else:
                layers = memory.fewest_checkpointed_layers(args, available, **common)  # None: none fits
                if layers is not None:
                    self.log(f"checkpoint_layers = auto: recomputing {layers} of {args.num_hidden_layers} layers")
        est = memory.estimate(args, activation_checkpointing=cfg.activation_checkpointing,
                              checkpointed_layers=layers, **common)
        where = f"{'GPU' if dist.device.type == 'cuda' else 'process'} ({dist.world_size} rank(s))"
        for line in memory.format_estimate(est, where):
            self.log(line)
        try:
            memory.check_fits(est, dist.device, cfg.memory_gib)
        except memory.WontFit as e:
            raise TrainingError(str(e)) from None
        return layers

    # ------------------------------------------------------------ start / resume

    def prepare_run_dir(self) -> None:
        cfg_dict = dataclasses.asdict(self.cfg) | {"world_size": self.dist.world_size}
        config_path = self.out_dir / "config.json"
        exists = config_path.exists()
        parallel.barrier()  # every rank looks before rank 0 writes
        if exists:
            if not self.cfg.resume:
                raise TrainingError(f"{self.out_dir} already holds a run; pass --resume=true to continue it, "
                                    "or choose another out_dir")
            old = json.loads(config_path.read_text())
            diff = config_diff(old, cfg_dict, ignore=RESUME_MAY_CHANGE)
            if diff:
                raise TrainingError("cannot resume: the config differs from the run's:\n  " + "\n  ".join(diff))
            path, skipped = checkpoint.latest_valid(self.ckpt_root)
            for problem in skipped:
                self.log(f"skipping damaged checkpoint: {problem}")
            if path is not None:
                self.load_checkpoint(path)
                self.records.truncate_after(self.step)
                self.log(f"resumed from {path} at step {self.step}")
                return
            self.log("no complete checkpoint to resume from: starting from step 0")
            self.records.truncate_after(0)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = config_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cfg_dict, indent=1))
            os.replace(tmp, config_path)
        parallel.barrier()

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        tmp = self.ckpt_root / f".tmp-{checkpoint.step_dir_name(self.step)}"
        if self.dist.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            checkpoint.begin(self.ckpt_root, self.step)
        parallel.barrier()
        torch.save(_rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
        adapter = parallel.full_state_dict(lora.named_trainable_lora_parameters(self.model))
        optim_state = parallel.get_full_optimizer_state(self.model, self.optimizer)
        if self.dist.is_main:
            from safetensors.torch import save_file

            save_file(adapter, str(tmp / "adapter.safetensors"))
            torch.save({"optimizer": optim_state, "scheduler": self.scheduler.state_dict()}, tmp / "optimizer.pt")
        parallel.barrier()
        final = None
        if self.dist.is_main:
            final = checkpoint.commit(tmp, {"step": self.step, "world_size": self.dist.world_size,
                                            "total_steps": self.total_steps})
        parallel.barrier()
        self.last_checkpoint = self.ckpt_root / checkpoint.step_dir_name(self.step)
        return final or self.last_checkpoint

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        manifest = checkpoint.read_manifest(path)
        if manifest["world_size"] != self.dist.world_size:
            # Adapter and optimizer state are saved whole and the data order is rank-independent, so
            # the run continues the same; only per-rank random streams (dropout) start afresh.
            self.log(f"resuming on {self.dist.world_size} rank(s) a run checkpointed on {manifest['world_size']}: "
                     "same data order and state; dropout random streams are not restored")
        adapter = load_file(str(path / "adapter.safetensors"))
        named = dict(lora.named_trainable_lora_parameters(self.model))
        if set(adapter) != set(named):
            raise TrainingError(f"{path}: adapter tensors do not match the model's trainable parameters")
        with torch.no_grad():
            for name, param in named.items():
                parallel.copy_full_(param, adapter[name])
        state = torch.load(path / "optimizer.pt", weights_only=False)
        parallel.set_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if manifest["world_size"] == self.dist.world_size:
            _set_rng_state(torch.load(path / f"rng_rank{self.dist.rank}.pt", weights_only=False))
        self.step = manifest["step"]
        self.last_checkpoint = path

    # ------------------------------------------------------------ one optimizer step

    def train_step(self, step_samples: list[Sample]) -> dict:
        cfg = self.cfg
        loss_total, n_targets, tokens = accumulate_gradients(self.model, step_samples, self.dist, cfg.micro_batch_tokens)
        step_loss = loss_total / max(1, n_targets)
        if not math.isfinite(step_loss):
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
            raise TrainingError(f"non-finite loss ({step_loss}) at step {self.step + 1}; stopped before the update; {where}")
        grad_norm = parallel.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": step_loss, "lr": lr, "grad_norm": grad_norm, "trained_tokens": n_targets, "tokens": tokens}

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        cfg = self.cfg
        self.prepare_run_dir()
        self.model.train()
        self.log(f"training {self.last_step - self.step} step(s) (of {self.total_steps} in the full run) on "
                 f"{self.dist.world_size} rank(s); {len(self.params)} trainable tensors, "
                 f"{sum(p.numel() for p in self.params):,} trainable parameters")
        start, start_step = time.perf_counter(), self.step
        while self.step < self.last_step:
            epoch, indices = self.plan[self.step]
            step_samples = [self.samples[i] for i in indices]
            t0 = time.perf_counter()
            record = self.train_step(step_samples)
            self.step += 1
            dt = time.perf_counter() - t0
            record = {"step": self.step, "epoch": epoch, **record, "tokens_per_s": record["tokens"] / dt,
                      "step_s": dt}
            self.records.tokens(self.step, epoch, step_samples)
            self.records.metrics(record)
            if self.step % cfg.log_every == 0 or self.step == self.last_step:
                elapsed = time.perf_counter() - start
                eta = elapsed / (self.step - start_step) * (self.last_step - self.step)
                self.log(f"step {self.step}/{self.last_step} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                         f"grad {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | ETA {format_eta(eta)}")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step != self.last_step:
                self.save_checkpoint()
        self.save_checkpoint()
        self.export_adapter(self.out_dir / "adapter")
        self.log(f"done: adapter in {self.out_dir / 'adapter'}")

    def export_adapter(self, target: Path) -> None:
        state = lora.peft_state_dict(self.model)  # a collective under FSDP
        if self.dist.is_main:
            lora.write_peft_adapter(target, state, self.lora_config, base_model_name_or_path=self.cfg.model)
        parallel.barrier()


def accumulate_gradients(model: CausalLM, step_samples: list[Sample], dist: parallel.Dist,
                         micro_batch_tokens: int) -> tuple[float, int, int]:
    """Forward and backward one optimizer step's samples on this rank, gradients scaled by 1 / the
    step's trained-token count. Returns (summed loss over all ranks, trained tokens, tokens)."""
    n_targets = sum(s.num_targets for s in step_samples)  # the whole step's, known on every rank
    rows, n_micro = rank_micro_batches(step_samples, dist.rank, dist.world_size, micro_batch_tokens)
    loss_sum = torch.zeros((), dtype=torch.float32, device=dist.device)  # on device: no sync per micro-batch
    tokens = 0
    for i in range(n_micro):
        parallel.set_gradient_sync(model, i == n_micro - 1)  # reduce across ranks once per step
        if i < len(rows):
            batch = collate_packed(rows[i]).to(dist.device)
            tokens += batch.input_ids.numel()
            scale = 1.0
        else:  # this rank ran out of rows: a zero-weight pass keeps FSDP's collectives in step
            batch = _dummy_batch(dist.device)
            scale = 0.0
        loss = model(batch.input_ids, position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens,
                     targets=batch.targets)
        (loss * (scale / max(1, n_targets))).backward()
        loss_sum += loss.detach() * scale
    if dist.world_size > 1 and not parallel.is_sharded(model):  # replicated: sum the adapters' gradients
        parallel.all_reduce_gradients_(lora.trainable_lora_parameters(model))
    totals = parallel.all_reduce_sum(torch.tensor([loss_sum.item(), float(tokens)], dtype=torch.float64))
    return totals[0].item(), n_targets, int(totals[1].item())


def _dummy_batch(device) -> PackedBatch:
    one = torch.zeros((1, 1), dtype=torch.long)
    return PackedBatch(one, torch.full((1, 1), -100), one.clone(), torch.tensor([0, 1], dtype=torch.int32), 0, []).to(device)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    dist = parallel.init_distributed()
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        Trainer(cfg, dist).run()
    except EngineError as e:  # every rank reports: a problem may show on one rank only
        return report(e, dist.rank if dist.world_size > 1 else None)
    finally:
        parallel.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
