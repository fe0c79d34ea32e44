"""Training settings (`TrainConfig`) and how they are read: a TOML file plus `--key=value` overrides.

    cfg = load_config(TrainConfig, "run.toml", ["--lr=2e-5", "--data=a.jsonl,b.jsonl"])

Values on the command line are parsed by the field's declared type (int, float, bool, str,
list[str] as a comma-separated list, and `X | None`, where "none" means None). Unknown keys, in the
file or on the command line, are errors that list the known ones.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engine.chat import SystemPolicy
from engine.chat.encode import BOUNDARY_POLICIES
from engine.errors import ConfigError

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("none", "null", ""):
            return None
        return _parse(text, args[0], key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return [_parse(part.strip(), inner, key) for part in text.split(",") if part.strip()]
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}: expected true or false, got {text!r}")
    try:
        return tp(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--{key}: expected {getattr(tp, '__name__', tp)}, got {text!r}") from None


def _check_value(value: Any, tp: Any, key: str, where: str) -> Any:
    """Type-check a TOML value (TOML already typed it); ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list")
        (inner,) = typing.get_args(tp)
        return [_check_value(v, inner, key, where) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        for key, value in raw.items():
            if key not in types_:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(types_)}")
            values[key] = _check_value(value, types_[key], key, str(path))
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ConfigError(f"override {item!r} must look like --key=value")
        key, text = item[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in types_:
            raise ConfigError(f"unknown option --{key}; known: {', '.join('--' + k for k in types_)}")
        values[key] = _parse(text, types_[key], key)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)} (in the TOML file or as --key=value)")
    return cls(**values)


def config_diff(old: dict, new: dict, ignore: set[str] = frozenset()) -> list[str]:
    """Human-readable differences between two config dicts."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# The linear projections of a decoder layer; the paper adapts all seven.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Compute dtypes by name (torch.<name>).
DTYPE_NAMES = ("bfloat16", "float16", "float32")
# Optimizers by name: engine.optim.build_optimizer.
OPTIMIZERS = ("adamw", "adamw_8bit")
# How a step's token losses are weighted: engine.train.sample_loss_weights.
LOSS_NORMALIZATIONS = ("step_tokens", "micro_batch_mean", "step_tokens_div_accum")

# What a run ran with before these settings existed (a config.json written by an older engine
# lacks them): torch's AdamW, the step's token mean, and straddling tokens masked.
SETTINGS_BEFORE_THEY_EXISTED = {"optimizer": "adamw", "loss_normalization": "step_tokens", "loss_micro_batch_size": 2,
                                "boundary_tokens": "mask"}

# Settings that may change between an interrupted run and its resumption.
# (The number of ranks may change too: the data order, adapter and optimizer state do not depend on it.)
# Settings that change neither the data order nor the arithmetic of a step (recomputation replays
# the forward with the same RNG state).
RESUME_MAY_CHANGE = {"resume", "save_every", "log_every", "max_steps", "record_tokens", "world_size", "memory_gib",
                     "activation_checkpointing", "checkpoint_layers", "data_parallel", "collective_timeout_min"}


def opt(default, help: str, *, factory=None):
    """A config field with its help text (shown by `python -m engine.train --help`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the paper's (its Axolotl LoRA runs)."""

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
                                  factory=lambda: list(PROJECTIONS))
    stack_adapters: list[str] = opt(None, "earlier stages' PEFT adapters, frozen below the new one", factory=list)
    lr: float = opt(1e-5, "AdamW learning rate (paper: 1e-5)")
    weight_decay: float = opt(0.01, "AdamW weight decay (paper: 0.01)")
    warmup_steps: int = opt(5, "linear warm-up steps, then linear decay to 0 (paper: 5)")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_eps: float = opt(1e-8, "AdamW epsilon")
    optimizer: str = opt("adamw", "adamw (torch's AdamW, fp32 moments) | adamw_8bit (bitsandbytes' blockwise 8-bit "
                                  "AdamW, the paper's Axolotl `optimizer: adamw_8bit`; see engine.optim)")
    loss_normalization: str = opt("step_tokens", "how token losses are weighted: step_tokens (each by 1 / the step's "
                                                 "trained tokens) | micro_batch_mean (Axolotl >= 0.17: the mean over "
                                                 "the step's micro-batches of each one's mean token loss) | "
                                                 "step_tokens_div_accum (Axolotl 0.15.0: step_tokens divided again "
                                                 "by the number of micro-batches)")
    loss_micro_batch_size: int = opt(2, "with loss_normalization micro_batch_mean or step_tokens_div_accum: samples "
                                        "per Axolotl micro-batch, consecutive in the step's order (paper: 2)")
    boundary_tokens: str = opt("train", "a token straddling the start of a trained span (an assistant reply "
                                        "starting with a newline merges it with the header's): train (as Axolotl "
                                        "does) | mask")
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
    collective_timeout_min: float = opt(20.0, "under torchrun: minutes a rank waits for the others in a collective "
                                              "before the job fails, naming the rank(s) that did not answer")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # every float setting, present and future: inf and nan are refused
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.micro_batch_tokens >= 1, "micro_batch_tokens must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr > 0, "lr must be positive"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)"),
            (self.adam_eps > 0, "adam_eps must be positive"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0: no clipping)"),
            (self.lora_alpha > 0, "lora_alpha must be positive"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.memory_gib is None or self.memory_gib > 0, "memory_gib must be positive"),
            (self.collective_timeout_min > 0, "collective_timeout_min must be positive"),
            (self.seed >= 0, "seed must be >= 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.dtype in DTYPE_NAMES, f"dtype must be one of {', '.join(DTYPE_NAMES)}"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (bool(self.data), "data: give at least one JSONL file"),
            (self.data_parallel in ("fsdp", "replicate"),
             f"data_parallel must be fsdp or replicate, got {self.data_parallel!r}"),
            (self.checkpoint_layers in ("all", "auto") or (self.checkpoint_layers.isdigit()),
             f"checkpoint_layers must be all, auto or a number of layers, got {self.checkpoint_layers!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.loss_normalization in LOSS_NORMALIZATIONS,
             f"loss_normalization must be one of {', '.join(LOSS_NORMALIZATIONS)}, got {self.loss_normalization!r}"),
            (self.loss_micro_batch_size >= 1, "loss_micro_batch_size must be >= 1"),
            (self.boundary_tokens in BOUNDARY_POLICIES,
             f"boundary_tokens must be one of {', '.join(BOUNDARY_POLICIES)}, got {self.boundary_tokens!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        SystemPolicy(self.system_prompt, self.system_text)  # validates the policy

    def policy(self) -> SystemPolicy:
        return SystemPolicy(self.system_prompt, self.system_text)

    def lora_config(self):
        from engine import lora

        return lora.LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                               use_rslora=self.use_rslora, target_modules=tuple(self.lora_targets))


def train_default(name: str) -> Any:
    """A TrainConfig setting's default: the paper's value, for code that runs without a config."""
    f = TrainConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
