"""The one path from a checkpoint (or a bare config) to the model a job runs.

The trainer, the step benchmark and evaluation all build their model here, so the benchmark times
what the trainer runs. The order is fixed (torchtitan's):

    1. build on the meta device (no memory), cast to the compute dtype
    2. stacked adapters of earlier stages (frozen), then the new adapter (trainable, fp32 masters)
    3. activation checkpointing of the first N decoder layers       (`Layout.checkpointed_layers`)
    4. torch.compile of each decoder layer                          (`Layout.compile`)
    5. FSDP2 over the ranks, or nothing (replicated ranks, one process) (`Layout.data_parallel`)
    6. materialise (`to_empty`) and load the weights, each rank reading only its own rows
       (`engine.models.loading.load_safetensors`), or initialise them (a config without weights)
    7. the adapters' values: stacked adapters' tensors, the new adapter's seeded initialisation
       (the same values whatever the number of ranks)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import lora, parallel
from engine.config import DTYPE_NAMES
from engine.errors import CheckpointError, ConfigError, TrainingError
from engine.models import CausalLM, ModelArgs
from engine.hub import resolve_checkpoint_dir
from engine.models.loading import load_safetensors
from engine.peft_format import load_peft_adapter


@dataclass(frozen=True)
class Layout:
    """How a built model is spread over time and ranks."""

    checkpointed_layers: int | None = 0  # activation checkpointing of the first N layers; None: all
    compile: bool = False  # torch.compile each decoder layer
    data_parallel: str = "fsdp"  # fsdp: FSDP2-sharded under a process group | replicate: whole on every rank

    def __post_init__(self) -> None:
        if self.data_parallel not in ("fsdp", "replicate"):
            raise ConfigError(f"data_parallel must be fsdp or replicate, got {self.data_parallel!r}")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a name in `engine.config.DTYPE_NAMES`."""
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def read_model_args(checkpoint: str | Path) -> tuple[Path, ModelArgs]:
    """(checkpoint directory, the model's shape) from a checkpoint's config.json; a hub id is fetched."""
    ckpt_dir = resolve_checkpoint_dir(checkpoint)
    path = ckpt_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in checkpoint directory {ckpt_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); re-download the checkpoint's config.json") from None
    try:
        return ckpt_dir, ModelArgs.from_hf_config(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def build_model(
    args: ModelArgs,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    weights: Path | None,
    layout: Layout = Layout(),
    stack_adapters: tuple[str | Path, ...] | list = (),
    new_adapter: lora.LoraConfig | None = None,
    seed: int = 0,
) -> CausalLM:
    """The model, its adapters and its layout, materialised on `device`.

    `weights`: the checkpoint directory to load (every tensor checked before any is read); None
    initialises the weights from `seed` (the step benchmark's random model). `stack_adapters`:
    PEFT adapter directories, frozen, in order. `new_adapter`: the adapter to train (initialised
    from `seed`), or None for a frozen model. Returned in training mode when there is a new
    adapter, else in eval mode with every parameter frozen.
    """
    with torch.device("meta"):
        model = CausalLM(args)
    model.to(dtype=dtype)  # before the adapters, which stay fp32 (master weights)
    values: dict[str, torch.Tensor] = {}
    for path in stack_adapters:
        load_peft_adapter(model, path, trainable=False, values_out=values)
    if new_adapter is not None:
        lora.apply_lora(model, new_adapter)
        values |= lora.lora_init_values(model, seed)  # same values whatever the sharding
    if layout.checkpointed_layers != 0:
        parallel.apply_activation_checkpointing(model, layout.checkpointed_layers)
    if layout.compile:
        for layer in model.model.layers:
            layer.compile()
    if layout.data_parallel == "fsdp":
        parallel.apply_fsdp(model, param_dtype=dtype, reduce_dtype=torch.float32)  # no-op without ranks
    model.to_empty(device=device)
    if weights is not None:
        load_safetensors(model, weights, expect_missing=lora.is_lora_parameter_name)
    else:
        model.tie_weights()
        cuda = torch.device(device).type == "cuda"
        with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):  # leaves the global RNG alone
            torch.manual_seed(seed)
            model.init_weights()  # HF's scheme: N(0, initializer_range); also the rotary buffers
    adapters = {name: p for name, p in model.named_parameters() if lora.is_lora_parameter_name(name)}
    if set(adapters) != set(values):
        raise TrainingError(f"adapter parameters without values: {sorted(set(adapters) - set(values))[:5]}")
    with torch.no_grad():
        for name, param in adapters.items():
            parallel.copy_full_(param, values[name])
    if new_adapter is None:
        model.requires_grad_(False)
        return model.eval()
    return model.train()
