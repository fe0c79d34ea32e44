"""LoRA adapters around frozen base linears, stackable, with PEFT-compatible import and export.

Parameter naming
----------------
A targeted ``nn.Linear`` is replaced by a :class:`LoraLinear` (a subclass of ``nn.Linear``) that
keeps the base parameters under their original names, so HF checkpoints still load by name after
LoRA was applied (e.g. on the meta device, before FSDP sharding)::

    model.layers.0.self_attn.q_proj.weight        base weight, frozen, dtype as loaded
    model.layers.0.self_attn.q_proj.bias          base bias (if any), frozen
    model.layers.0.self_attn.q_proj.lora.0.A      adapter 0: (r, in_features), fp32
    model.layers.0.self_attn.q_proj.lora.0.B      adapter 0: (out_features, r), fp32
    model.layers.0.self_attn.q_proj.lora.1.A      adapter 1, stacked on top of adapter 0
    ...

``lora`` is an ``nn.ModuleDict`` keyed by the adapter's *stack level*: every call of
:func:`apply_lora` or :func:`load_peft_adapter` adds one level to the whole model (level 0, 1, ...),
so ``lora.<k>`` names the same adapter in every module it touches even when a later level targets
fewer modules. ``A``/``B`` have the shapes of PEFT's ``lora_A.weight``/``lora_B.weight``.

Forward::

    y = F.linear(x, W, b) + sum_k scaling_k * B_k(A_k(dropout_k(x)))

where each adapter's ``+ scaling_k * B_k(·)`` is one GEMM accumulating into the base output
(``addmm_`` with ``alpha = scaling_k``, :meth:`LoraAdapter.add_to_`).

with ``A_k``, ``B_k`` cast to ``x.dtype`` (fp32 master weights, computed in the activation dtype;
under FSDP2 mixed precision they already arrive in bf16 and the cast is a no-op). Base weights are
never cast or trained. ``scaling = alpha / sqrt(r)`` with rsLoRA, ``alpha / r`` otherwise.

Life cycle::

    apply_lora(model, LoraConfig())    # wrap + freeze base and earlier adapters (works on meta)
    init_lora_(model, seed=0)          # PEFT's init, per-parameter seeded: A kaiming, B zeros
    ...train trainable_lora_parameters(model)...
    save_peft_adapter(model, out, None, "Qwen/Qwen2.5-32B-Instruct")   # PEFT-format adapter
    merge_lora_(model)                 # fold every adapter into W, back to plain nn.Linear

Engine code never imports peft; the file formats follow peft 0.21 (tests check against it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from engine.errors import LoraError
from safetensors.torch import save_file
from torch import nn

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

# Our adapter parameter names: "<module>.lora.<level>.A" / ".B".
_LORA_PARAM_RE = re.compile(r"^(?P<module>.+)\.lora\.(?P<level>\d+)\.(?P<ab>[AB])$")
# PEFT's keys on disk ("...q_proj.lora_A.weight") and in memory ("...q_proj.lora_A.default.weight").
_PEFT_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

_MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraConfig:
    """One adapter's hyper-parameters. Defaults are the paper's setting (r 32, alpha 64, rsLoRA,
    all attention and MLP projections).

    ``target_modules`` follows PEFT's matching: a module is targeted when its full name equals an
    entry or ends with ``"." + entry`` (so ``"q_proj"`` and ``"self_attn.q_proj"`` both work).
    """

    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    use_rslora: bool = True
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            raise LoraError(
                f"target_modules must be a list of module names, got the string {self.target_modules!r}"
            )
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoraError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        alpha_ok = isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
        if not alpha_ok or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise LoraError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise LoraError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise LoraError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / sqrt(r)`` (rsLoRA) or ``alpha / r``."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class LoraAdapter(nn.Module):
    """One low-rank update: parameters ``A`` (r, in) and ``B`` (out, r), fp32 master weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float,
        use_rslora: bool,
        *,
        device: torch.device | str | None = None,
        trainable: bool = True,
    ):
        super().__init__()
        self.r = r
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout_p = float(dropout)
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=torch.float32))
        # As PEFT: a real dropout module only when p > 0 (active in training mode only).
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.trainable = True
        self.set_trainable(trainable)

    def set_trainable(self, trainable: bool) -> None:
        self.trainable = bool(trainable)
        self.A.requires_grad_(self.trainable)
        self.B.requires_grad_(self.trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> delta (..., out), computed in x.dtype; same op order as PEFT.
        a, b = self.A.to(x.dtype), self.B.to(x.dtype)
        return F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def add_to_(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + delta(x)`` for 2-D ``x`` (tokens, in), written into ``out`` (tokens, out: a base
        layer's output, not a view, which autograd does not keep) by one GEMM that accumulates into it with ``alpha = scaling``: the (tokens × out)
        product is never materialised, scaled and added as separate passes (PEFT's three).
        Rounds once where PEFT rounds three times, so it is at least as close to the exact sum."""
        a, b = self.A.to(x.dtype), self.B.to(x.dtype)
        xa = F.linear(self.dropout(x), a)  # (tokens, r)
        return out.addmm_(xa, b.t(), alpha=self.scaling)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shape (out, in)."""
        return (self.B.float() @ self.A.float()) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.6g}, rslora={self.use_rslora}, "
            f"dropout={self.dropout_p}, trainable={self.trainable}"
        )


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight``/``bias`` parameters and names) plus a stack of adapters
    in ``self.lora`` (``nn.ModuleDict`` keyed by stack level)."""

    lora: nn.ModuleDict

    @classmethod
    def wrap(cls, linear: nn.Linear) -> LoraLinear:
        """A LoraLinear sharing ``linear``'s parameter objects (nothing is allocated or copied)."""
        if type(linear) is not nn.Linear:
            raise LoraError(f"can only wrap a plain nn.Linear, got {type(linear).__name__}")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.lora = nn.ModuleDict()
        new.train(linear.training)
        return new

    def unwrap(self) -> nn.Linear:
        """A plain nn.Linear sharing this module's base parameters (adapters dropped)."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = self.weight
        plain.bias = self.bias
        plain.train(self.training)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora:
            return F.linear(x, self.weight, self.bias)
        # On 2-D rows: for 3-D input, F.linear's output would be a view, and accumulating into a
        # view costs autograd a copy of the gradient in backward.
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, self.weight, self.bias)
        for adapter in self.lora.values():
            out = adapter.add_to_(out, x2)
        return out.view(*x.shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------------------------
# Applying adapters
# ---------------------------------------------------------------------------------------------


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return "\n  " + shown + (f"\n  ... and {more} more" if more > 0 else "")


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _tied_linear_names(model: nn.Module, linears: Mapping[str, nn.Linear]) -> set[str]:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {name for name, m in linears.items() if counts.get(id(m.weight), 0) > 1}


def _select_targets(model: nn.Module, target_modules: tuple[str, ...], what: str) -> dict[str, nn.Linear]:
    """Linear modules matched by ``target_modules`` (PEFT's suffix matching); every entry must
    match something, and the LM head and tied weights are refused."""
    linears = _linear_modules(model)
    unmatched = [t for t in target_modules if not any(_matches(n, t) for n in linears)]
    if unmatched:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise LoraError(
            f"{what}: target module(s) {unmatched} match no linear layer of the model; "
            f"its linear layers are named {leaf_names} (full names like {next(iter(linears), '?')!r})"
        )
    targets = {n: m for n, m in linears.items() if any(_matches(n, t) for t in target_modules)}
    _refuse_unsupported_targets(model, targets, what)
    return targets


def _refuse_unsupported_targets(model: nn.Module, targets: Mapping[str, nn.Linear], what: str) -> None:
    if "lm_head" in targets:
        raise LoraError(
            f"{what}: LoRA on lm_head is not supported (the fused loss reads lm_head.weight directly); "
            "target the decoder projections only"
        )
    tied = sorted(_tied_linear_names(model, targets))
    if tied:
        raise LoraError(f"{what}: cannot put LoRA on linear layers with tied (shared) weights: {tied}")


def _levels(model: nn.Module) -> list[int]:
    return sorted({int(k) for m in model.modules() if isinstance(m, LoraLinear) for k in m.lora.keys()})


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _freeze_all(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LoraAdapter):
            m.set_trainable(False)
    for p in model.parameters():
        p.requires_grad_(False)


def _add_adapters(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    trainable: bool,
) -> int:
    """Wrap ``targets`` (if not yet wrapped) and add one new adapter level to each; returns the level."""
    existing = _levels(model)
    level = existing[-1] + 1 if existing else 0
    for name, linear in targets.items():
        module = linear if isinstance(linear, LoraLinear) else LoraLinear.wrap(linear)
        if module is not linear:
            _set_module(model, name, module)
        adapter = LoraAdapter(
            module.in_features,
            module.out_features,
            r,
            alpha,
            dropout,
            use_rslora,
            device=module.weight.device,
            trainable=trainable,
        )
        adapter.train(module.training)
        if adapter.A.device.type != "meta":
            # Uninitialised until init_lora_ (or a loader) fills it: NaN so that forgetting it
            # fails loudly instead of training from garbage.
            with torch.no_grad():
                adapter.A.fill_(float("nan"))
                adapter.B.zero_()
        module.lora[str(level)] = adapter
    return level


def apply_lora(model: nn.Module, config: LoraConfig, *, seed: int | None = None) -> list[str]:
    """Wrap every linear layer matched by ``config.target_modules`` with a new trainable adapter.

    Freezes every other parameter, earlier adapters included (calling it again stacks a new
    trainable adapter on frozen earlier ones). Adapter parameters are fp32 on the base weight's
    device; on the meta device nothing is allocated. On a real device the new ``A`` holds NaN
    until :func:`init_lora_` runs (``seed=...`` here calls it for you). Returns the wrapped
    module names.
    """
    if not isinstance(config, LoraConfig):
        raise LoraError(f"config must be a LoraConfig, got {type(config).__name__}")
    targets = _select_targets(model, config.target_modules, "apply_lora")
    _freeze_all(model)
    _add_adapters(model, targets, config.r, config.alpha, config.dropout, config.use_rslora, trainable=True)
    if seed is not None:
        init_lora_(model, seed)
    return list(targets)


# ---------------------------------------------------------------------------------------------
# Init
# ---------------------------------------------------------------------------------------------


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _lora_adapters(model: nn.Module) -> Iterator[tuple[str, LoraAdapter]]:
    """(``"<module>.lora.<level>"``, adapter) for every adapter, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            for key, adapter in module.lora.items():
                yield f"{name}.lora.{key}", adapter


def lora_init_values(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Initial values of every trainable adapter's parameters: full fp32 CPU tensors by name.

    PEFT's scheme: ``A`` (r, in) ``kaiming_uniform_(a=sqrt(5))`` (uniform in +-1/sqrt(in)), ``B``
    zeros. Each ``A`` comes from its own CPU generator seeded from (seed, module name), so the
    values do not depend on module order, device, sharding or stack level; works on a meta-device
    model.
    """
    values: dict[str, torch.Tensor] = {}
    for prefix, adapter in _lora_adapters(model):
        if not adapter.trainable:
            continue
        a_name, b_name = f"{prefix}.A", f"{prefix}.B"
        # Seeded by the module name without the stack level: a stage trained on top of a stacked
        # adapter (level 1) starts from the same values as on the merged model (level 0).
        module_name = prefix.rsplit(".lora.", 1)[0]
        generator = torch.Generator(device="cpu").manual_seed(_param_seed(seed, f"{module_name}.A"))
        a = torch.empty(tuple(adapter.A.shape), dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        values[a_name] = a
        values[b_name] = torch.zeros(tuple(adapter.B.shape), dtype=torch.float32)
    return values


@torch.no_grad()
def init_lora_(model: nn.Module, seed: int) -> list[str]:
    """Fill every trainable adapter with :func:`lora_init_values`; returns the parameter names.

    Sharded (DTensor) parameters are refused: a sharded caller copies its slices of
    ``lora_init_values`` itself.
    """
    values = lora_init_values(model, seed)
    if not values:
        raise LoraError("init_lora_: the model has no trainable LoRA adapter (call apply_lora first)")
    params = dict(model.named_parameters())
    for name, value in values.items():
        p = params[name]
        if p.device.type == "meta":
            raise LoraError(f"init_lora_: {name} is on the meta device; materialise the model first (to_empty)")
        if hasattr(p, "device_mesh"):
            raise LoraError(
                f"init_lora_: {name} is a sharded DTensor; copy the matching slice of lora_init_values() "
                "into each shard instead"
            )
        p.copy_(value)
    return list(values)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def is_lora_parameter_name(name: str) -> bool:
    """True for adapter parameter names (``...lora.<level>.A`` / ``.B``)."""
    return _LORA_PARAM_RE.match(name) is not None


def named_trainable_lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter parameter that requires grad."""
    for name, p in model.named_parameters():
        if p.requires_grad and is_lora_parameter_name(name):
            yield name, p


def trainable_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in named_trainable_lora_parameters(model)]


def lora_levels(model: nn.Module) -> list[int]:
    """Stack levels of the adapters in the model, oldest first."""
    return _levels(model)


# ---------------------------------------------------------------------------------------------
# PEFT export
# ---------------------------------------------------------------------------------------------


def _resolve_level(model: nn.Module, adapter_index: int) -> int:
    levels = _levels(model)
    if not levels:
        raise LoraError("the model has no LoRA adapter")
    try:
        return levels[adapter_index]
    except IndexError:
        raise LoraError(f"adapter_index {adapter_index} out of range: the model has adapter levels {levels}") from None


def _level_modules(model: nn.Module, level: int) -> dict[str, LoraAdapter]:
    key = str(level)
    return {
        name: m.lora[key] for name, m in model.named_modules() if isinstance(m, LoraLinear) and key in m.lora
    }


def _full(t: torch.Tensor) -> torch.Tensor:
    # A sharded DTensor is gathered (a collective: every rank must make the same calls).
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def peft_state_dict(model: nn.Module, adapter_index: int = -1) -> dict[str, torch.Tensor]:
    """One adapter level as PEFT's on-disk keys -> full tensors (not copied; fp32 masters).

    ``base_model.model.<module>.lora_A.weight`` = our ``<module>.lora.<level>.A``, and ``lora_B``
    likewise. ``adapter_index`` indexes :func:`lora_levels` (-1: the newest).
    """
    level = _resolve_level(model, adapter_index)
    out: dict[str, torch.Tensor] = {}
    for name, adapter in _level_modules(model, level).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = _full(adapter.A.detach())
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = _full(adapter.B.detach())
    return out


def peft_adapter_config(model: nn.Module, adapter_index: int = -1) -> LoraConfig:
    """The LoraConfig describing one adapter level exactly (target_modules as PEFT must match them:
    leaf names when the level covers every linear of those names, else full module names)."""
    level = _resolve_level(model, adapter_index)
    adapters = _level_modules(model, level)
    hyper = {(a.r, a.alpha, a.dropout_p, a.use_rslora) for a in adapters.values()}
    if len(hyper) != 1:
        raise LoraError(f"adapter level {level} mixes hyper-parameters {sorted(hyper)}; PEFT needs one r/alpha")
    r, alpha, dropout, use_rslora = hyper.pop()
    linears = _linear_modules(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapters})
    covers_all = all((n in adapters) for n in linears if n.rsplit(".", 1)[-1] in leaves)
    targets = tuple(leaves) if covers_all else tuple(sorted(adapters))
    return LoraConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, target_modules=targets)


def peft_config_dict(config: LoraConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
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
    state_dict: Mapping[str, torch.Tensor],
    config: LoraConfig,
    base_model_name_or_path: str | None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``adapter_model.safetensors`` (tensors cast to ``dtype``) and ``adapter_config.json``
    into ``out_dir``, each atomically (temp file + os.replace). ``state_dict`` has PEFT's keys
    (:func:`peft_state_dict`, or full tensors gathered by a distributed caller)."""
    bad = [k for k in state_dict if not (k.startswith(PEFT_PREFIX) and _PEFT_KEY_RE.match(k))]
    if bad or not state_dict:
        raise LoraError(
            "write_peft_adapter: not PEFT adapter keys (base_model.model.<module>.lora_A.weight):"
            + _listing(bad or ["(empty state dict)"])
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in sorted(state_dict.items())}
    _atomic_replace(out_dir / PEFT_WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(peft_config_dict(config, base_model_name_or_path), indent=2, sort_keys=True) + "\n"
    _atomic_replace(out_dir / PEFT_CONFIG_NAME, lambda p: p.write_text(text))
    return out_dir


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | Path,
    config: LoraConfig | None = None,
    base_model_name_or_path: str | None = None,
    adapter_index: int = -1,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save one adapter level in PEFT's format (loadable with ``PeftModel.from_pretrained``).

    ``config`` is optional; when given, its r / alpha / dropout / use_rslora must equal the
    adapter's (so the file cannot claim a different scaling than was trained). The written
    target_modules always describe exactly the wrapped modules.
    """
    exact = peft_adapter_config(model, adapter_index)
    if config is not None:
        theirs = (config.r, float(config.alpha), float(config.dropout), config.use_rslora)
        ours = (exact.r, float(exact.alpha), float(exact.dropout), exact.use_rslora)
        if theirs != ours:
            raise LoraError(
                f"save_peft_adapter: config (r, alpha, dropout, use_rslora) = {theirs} does not match "
                f"the model's adapter {ours}"
            )
    return write_peft_adapter(out_dir, peft_state_dict(model, adapter_index), exact, base_model_name_or_path, dtype)


# ---------------------------------------------------------------------------------------------
# PEFT import
# ---------------------------------------------------------------------------------------------

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


def _peft_targets(model: nn.Module, cfg: dict[str, Any]) -> dict[str, nn.Linear]:
    target = cfg.get("target_modules")
    linears = _linear_modules(model)
    if target == "all-linear":
        targets = {n: m for n, m in linears.items() if n != "lm_head"}
    elif isinstance(target, str):
        targets = {n: m for n, m in linears.items() if re.fullmatch(target, n)}
        if not targets:
            raise LoraError(f"target_modules regex {target!r} matches no linear layer of the model")
    elif isinstance(target, list) and target:
        return _select_targets(model, tuple(target), "load_peft_adapter")
    else:
        raise LoraError(f"adapter_config.json has no usable target_modules: {target!r}")
    _refuse_unsupported_targets(model, targets, "load_peft_adapter")
    return targets


def read_peft_config(path: str | Path) -> dict[str, Any]:
    """Read and check an ``adapter_config.json``; unsupported PEFT features raise LoraError."""
    path = Path(path)
    config_path = path / PEFT_CONFIG_NAME if path.is_dir() else path
    if not config_path.is_file():
        raise LoraError(f"no {PEFT_CONFIG_NAME} at {path}")
    cfg = json.loads(config_path.read_text())
    if cfg.get("peft_type") != "LORA":
        raise LoraError(f"{config_path}: peft_type {cfg.get('peft_type')!r} is not supported (only 'LORA')")
    problems = []
    for key, what in _UNSUPPORTED_FEATURES.items():
        value = cfg.get(key)
        if value not in (None, False, {}, []):
            problems.append(f"{what} = {value!r}")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in _HARMLESS_INITS):
        problems.append(
            f"init_lora_weights = {init!r} (changes the base weights or the LoRA forward; "
            "convert the adapter to a plain LoRA first)"
        )
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias = {cfg['bias']!r} (only 'none')")
    if problems:
        raise LoraError(f"{config_path}: unsupported PEFT feature(s):\n  " + "\n  ".join(problems))
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise LoraError(f"{config_path}: missing {key!r}")
    return cfg


@torch.no_grad()
def load_peft_adapter(
    model: nn.Module, path: str | Path, trainable: bool = False, *, values_out: dict | None = None
) -> LoraConfig:
    """Stack a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) on
    ``model`` as a new adapter level; returns its LoraConfig.

    Keys may be on-disk style (``...q_proj.lora_A.weight``) or PEFT's in-memory style
    (``...q_proj.lora_A.default.weight``), with or without the ``base_model.model.`` prefix.
    Every problem (missing/unexpected keys, modules the model lacks, shape mismatches) is listed
    in one LoraError before anything is changed. With ``trainable`` the new adapter is trained
    and everything else frozen (as :func:`apply_lora`); otherwise it is frozen and other
    parameters keep their flags.

    On a meta-device model (the sharded-loading path) pass ``values_out``: the adapter structure
    is added and its tensors are stored there by parameter name, for the caller to copy into the
    materialised (possibly sharded) parameters.
    """
    path = Path(path)
    cfg = read_peft_config(path)
    weights = path / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        other = [p.name for p in path.glob("adapter_model*")]
        found_other = f" (found {other}; only safetensors is supported)" if other else ""
        raise LoraError(f"no {PEFT_WEIGHTS_NAME} in {path}{found_other}")

    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    targets = _peft_targets(model, cfg)
    config = LoraConfig(
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout") or 0.0),
        use_rslora=bool(cfg.get("use_rslora", False)),
        # A regex or "all-linear" target becomes the explicit list of modules it matched.
        target_modules=tuple(cfg["target_modules"]) if isinstance(cfg["target_modules"], list) else tuple(targets),
    )
    if values_out is None and any(m.weight.device.type == "meta" for m in targets.values()):
        raise LoraError("load_peft_adapter: the model is on the meta device; materialise it first or pass values_out")

    problems: list[str] = []
    unexpected: list[str] = []
    found: dict[tuple[str, str], str] = {}  # (module, "A"/"B") -> key
    adapter_names: set[str] = set()
    linears = _linear_modules(model)
    with safe_open(weights, framework="pt", device="cpu") as f:
        keys = list(f.keys())
        for key in keys:
            m = _PEFT_KEY_RE.match(key)
            if m is None:
                unexpected.append(f"{key} (not a lora_A/lora_B weight)")
                continue
            module = m["module"].removeprefix(PEFT_PREFIX)
            if m["adapter"] is not None:
                adapter_names.add(m["adapter"])
            if module not in targets:
                why = "not targeted by target_modules" if module in linears else "no such linear layer in the model"
                unexpected.append(f"{key} ({why})")
                continue
            if (module, m["ab"]) in found:
                problems.append(f"tensor for {module}.lora_{m['ab']} appears twice: {found[(module, m['ab'])]}, {key}")
                continue
            found[(module, m["ab"])] = key
            linear = targets[module]
            expected = (r, linear.in_features) if m["ab"] == "A" else (linear.out_features, r)
            header = f.get_slice(key)
            shape = tuple(header.get_shape())
            if shape != expected:
                problems.append(
                    f"tensor '{key}' has shape {shape}, expected {expected} for {module} "
                    f"(in_features {linear.in_features}, out_features {linear.out_features}, r {r}): "
                    "adapter made for a different base model?"
                )
            if header.get_dtype() not in ("F64", "F32", "F16", "BF16"):
                problems.append(f"tensor '{key}' has non-float dtype {header.get_dtype()}")
        if len(adapter_names) > 1:
            problems.append(f"{weights.name} holds several adapters: {sorted(adapter_names)}")
        missing = [f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for n in targets for ab in "AB" if (n, ab) not in found]
        if missing:
            problems.append(f"adapter lacks {len(missing)} tensor(s) its target_modules require:{_listing(missing)}")
        if unexpected:
            problems.append(f"adapter has {len(unexpected)} unexpected tensor(s):{_listing(unexpected)}")
        if problems:
            raise LoraError(f"cannot load PEFT adapter {path}:\n" + "\n".join(problems))

        if trainable:
            _freeze_all(model)
        level = _add_adapters(model, targets, r, alpha, config.dropout, config.use_rslora, trainable=trainable)
        for name, adapter in _level_modules(model, level).items():
            for ab in "AB":
                tensor = f.get_tensor(found[(name, ab)])
                if values_out is None:
                    getattr(adapter, ab).copy_(tensor)
                else:
                    values_out[f"{name}.lora.{level}.{ab}"] = tensor.float()
    return config


# ---------------------------------------------------------------------------------------------
# Merge
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def merge_lora_(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight and turn each LoraLinear back into a plain nn.Linear.

    ``W <- W + sum_k scaling_k * B_k @ A_k``, computed in fp32 and cast once to W's dtype. Returns
    the merged module names. The base weight keeps its requires_grad flag (frozen).
    """
    merged = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLinear):
            continue
        weight = module.weight
        if weight.device.type == "meta":
            raise LoraError(f"merge_lora_: {name} is on the meta device")
        if hasattr(weight, "device_mesh"):
            raise LoraError(f"merge_lora_: {name}.weight is a sharded DTensor; gather the model first")
        w = weight.detach().to(torch.float32, copy=True)
        for adapter in module.lora.values():
            w += adapter.delta_weight().to(w.device)
        weight.copy_(w.to(weight.dtype))
        _set_module(model, name, module.unwrap())
        merged.append(name)
    return merged


__all__ = [
    "DEFAULT_TARGET_MODULES",
    "LoraAdapter",
    "LoraConfig",
    "LoraError",
    "LoraLinear",
    "apply_lora",
    "init_lora_",
    "is_lora_parameter_name",
    "load_peft_adapter",
    "lora_init_values",
    "lora_levels",
    "lora_scaling",
    "merge_lora_",
    "named_trainable_lora_parameters",
    "peft_adapter_config",
    "peft_config_dict",
    "peft_state_dict",
    "read_peft_config",
    "save_peft_adapter",
    "trainable_lora_parameters",
    "write_peft_adapter",
]
