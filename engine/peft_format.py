"""PEFT's LoRA adapter directories (the format of peft 0.21; tests check against it), read and written.

A directory holds two files::

    adapter_config.json         PEFT's LoraConfig: r, lora_alpha, lora_dropout, use_rslora,
                                target_modules, and switches for features the engine refuses
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight  (r, in_features)
                                base_model.model.<module>.lora_B.weight  (out_features, r)

They are read into, and written from, an ``engine.lora.LoraConfig`` and ``{module name: (A, B)}``:
what ``engine.lora.attach_adapter`` takes and ``engine.lora.adapter_state`` gives. Only this file
knows PEFT's JSON keys and tensor names; ``engine.lora`` does the model surgery::

    write_peft_adapter(out, *lora.adapter_state(model), base_model_name_or_path="Qwen/Qwen2.5-32B-Instruct")
    load_peft_adapter(model, out)     # = read_peft_adapter + lora.attach_adapter

Features that change what an adapter computes (DoRA, biases, per-layer ranks, PiSSA-style inits,
...) are refused with a LoraError naming the file. Engine code never imports peft.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from engine import lora
from engine.errors import LoraError
from engine.lora import AdapterWeights, LoraConfig

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."

# Tensor keys on disk ("...q_proj.lora_A.weight") and in PEFT's memory ("...q_proj.lora_A.default.weight").
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# adapter_config.json keys whose non-default values change what the adapter computes.
_UNSUPPORTED_FEATURES: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "rank_pattern": "per-layer ranks (rank_pattern)",
    "alpha_pattern": "per-layer alphas (alpha_pattern)",
    "layers_to_transform": "layers_to_transform",
    "layers_pattern": "layers_pattern",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "exclude_modules": "exclude_modules",
}

# init_lora_weights values that only choose the adapter's starting point. Others (pissa*, olora,
# corda, loftq) modify the base weights at init, so the adapter is meaningless on the original
# base, or select a LoRA variant with a different forward (mica).
_HARMLESS_INITS = ("gaussian", "eva", "orthogonal")

_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_MAX_LISTED = 20


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return "\n  " + shown + (f"\n  ... and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _read_config_json(config_path: Path) -> dict[str, Any]:
    """The checked contents of an adapter_config.json; unsupported PEFT features raise LoraError."""
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LoraError(f"{config_path}: cannot be read as JSON ({err}); is it PEFT's adapter_config.json?") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        found = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise LoraError(f"{config_path}: peft_type {found!r} is not supported (only 'LORA' adapters)")
    problems = []
    for key, what in _UNSUPPORTED_FEATURES.items():
        value = cfg.get(key)
        if value not in (None, False, {}, []):
            problems.append(f"{what} = {value!r}")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in _HARMLESS_INITS):
        problems.append(f"init_lora_weights = {init!r} (changes the base weights or the LoRA forward)")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias = {cfg['bias']!r} (only 'none')")
    if problems:
        raise LoraError(
            f"{config_path}: unsupported PEFT feature(s):\n  " + "\n  ".join(problems)
            + "\n(the engine runs plain LoRA only: merge such an adapter into its base with peft's "
            "merge_and_unload and use the merged model as the base)"
        )
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in cfg]
    if missing:
        raise LoraError(f"{config_path}: missing {missing}; is it PEFT's adapter_config.json?")
    return cfg


def _target_modules(spec: Any, linear_names: Collection[str], config_path: Path) -> tuple[str, ...]:
    """PEFT's target_modules as engine.lora's: a list as it is, a regex (matched against whole
    module names) or ``"all-linear"`` (every linear but the LM head) as the names it selects."""
    if isinstance(spec, list):
        return tuple(spec)
    if spec == "all-linear":
        return tuple(n for n in linear_names if n != "lm_head")
    if isinstance(spec, str):
        selected = tuple(n for n in linear_names if re.fullmatch(spec, n))
        if not selected:
            raise LoraError(f"{config_path}: target_modules regex {spec!r} matches no linear layer of the model")
        return selected
    raise LoraError(f"{config_path}: target_modules must be a list of module names or a regex, got {spec!r}")


def _read_weights(weights_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} from adapter_model.safetensors, as stored; every problem of the file
    listed in one LoraError."""
    problems: list[str] = []
    unexpected: list[str] = []
    found: dict[tuple[str, str], str] = {}  # (module, "A"/"B") -> key
    adapter_names: set[str] = set()
    try:
        f = safe_open(weights_path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise LoraError(f"{weights_path}: not a readable safetensors file ({err}); the adapter is damaged (a "
                        "truncated copy?): copy or save it again") from None
    with f:
        for key in f.keys():
            m = _KEY_RE.match(key)
            if m is None:
                unexpected.append(f"{key} (not a lora_A/lora_B weight)")
                continue
            module = m["module"].removeprefix(PREFIX)
            if m["adapter"] is not None:
                adapter_names.add(m["adapter"])
            if (module, m["ab"]) in found:
                problems.append(f"tensor for {module}.lora_{m['ab']} appears twice: {found[(module, m['ab'])]}, {key}")
                continue
            found[(module, m["ab"])] = key
            dtype = f.get_slice(key).get_dtype()
            if dtype not in _FLOAT_DTYPES:
                problems.append(f"tensor '{key}' has non-float dtype {dtype}")
        if len(adapter_names) > 1:
            problems.append(f"the file holds several adapters: {sorted(adapter_names)}; save each on its own")
        modules = sorted({module for module, _ in found})
        lone = [f"{PREFIX}{n}.lora_{ab}.weight" for n in modules for ab in "AB" if (n, ab) not in found]
        if lone:
            problems.append(f"{len(lone)} tensor(s) missing (each module needs lora_A and lora_B):{_listing(lone)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensor(s):{_listing(unexpected)}")
        if problems:
            raise LoraError(f"{weights_path}:\n" + "\n".join(problems))
        return {n: (f.get_tensor(found[(n, "A")]), f.get_tensor(found[(n, "B")])) for n in modules}


def read_peft_adapter(path: str | Path, linear_names: Collection[str]) -> tuple[LoraConfig, AdapterWeights]:
    """A PEFT LoRA adapter directory as (LoraConfig, {module name: (A, B)}), tensors as stored.

    ``linear_names`` are the full names of the model's linear layers: PEFT resolves a regex or
    ``"all-linear"`` target_modules against them, and the returned config lists what they select.
    Tensor keys may be on-disk style (``...q_proj.lora_A.weight``) or PEFT's in-memory style
    (``...q_proj.lora_A.default.weight``), with or without the ``base_model.model.`` prefix.
    Problems of the files themselves raise LoraError (fitting the model is attach_adapter's check).
    """
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise LoraError(f"no {CONFIG_NAME} in {path}; pass the directory PEFT's save_pretrained wrote")
    cfg = _read_config_json(config_path)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        other = [p.name for p in path.glob("adapter_model*")]
        found_other = f" (found {other}; only safetensors is supported: save with safe_serialization=True)" if other else ""
        raise LoraError(f"no {WEIGHTS_NAME} in {path}{found_other}")
    targets = _target_modules(cfg["target_modules"], linear_names, config_path)
    try:
        config = LoraConfig(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout") or 0.0,
                            use_rslora=bool(cfg.get("use_rslora", False)), target_modules=targets)
    except LoraError as err:
        raise LoraError(f"{config_path}: {err}") from None
    return config, _read_weights(weights_path)


def load_peft_adapter(
    model: nn.Module, path: str | Path, trainable: bool = False, *, values_out: dict[str, torch.Tensor] | None = None
) -> LoraConfig:
    """Stack a PEFT LoRA adapter directory on ``model`` as a new adapter level; returns its config.

    :func:`read_peft_adapter`, then ``engine.lora.attach_adapter`` (``trainable`` and
    ``values_out`` are its: a frozen level by default; ``values_out`` for a meta-device model).
    Nothing is changed when the files are unusable or do not fit the model (a LoraError says why).
    """
    path = Path(path)
    linear_names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    config, weights = read_peft_adapter(path, linear_names)
    lora.attach_adapter(model, config, weights, trainable=trainable, values_out=values_out,
                        source=f"cannot load PEFT adapter {path}")
    return config


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _config_json(config: LoraConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """``adapter_config.json`` contents for PEFT's LoraConfig (keys that have existed in PEFT for
    a long time; newer PEFT fills the rest with defaults)."""
    alpha = config.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": list(config.target_modules),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "loftq_config": {},
        "use_dora": False,
        "layer_replication": None,
        "lora_bias": False,
    }


def _atomic_replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_peft_adapter(
    out_dir: str | Path,
    config: LoraConfig,
    weights: AdapterWeights,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``weights`` ({module name: (A, B)}, cast to ``dtype``) and ``config`` as PEFT's
    adapter_model.safetensors and adapter_config.json into ``out_dir``, each atomically (temp
    file + os.replace); loadable with ``PeftModel.from_pretrained``. Returns ``out_dir``.

    ``config`` must describe ``weights``: every module selected by its target_modules, A and B of
    rank ``config.r`` (``engine.lora.adapter_state`` gives such a pair for a model's adapter).
    """
    problems = [] if weights else ["no weights"]
    for name, (a, b) in weights.items():
        if not config.selects(name):
            problems.append(f"{name} is not selected by target_modules {list(config.target_modules)}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != config.r or b.shape[1] != config.r:
            problems.append(f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} are not of rank r = {config.r}")
    if problems:
        raise LoraError(f"write_peft_adapter({out_dir}): config and weights disagree:{_listing(problems)}")
    tensors = {}
    for name, (a, b) in sorted(weights.items()):
        for ab, t in (("A", a), ("B", b)):
            tensors[f"{PREFIX}{name}.lora_{ab}.weight"] = t.detach().to(device="cpu", dtype=dtype).contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_replace(out_dir / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(_config_json(config, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    _atomic_replace(out_dir / CONFIG_NAME, lambda p: p.write_text(text))
    return out_dir


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_peft_adapter", "read_peft_adapter", "write_peft_adapter"]
