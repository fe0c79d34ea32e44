"""LoRA adapters around frozen base linears, stackable; file formats live in ``engine.peft_format``.

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
:func:`apply_lora` or :func:`attach_adapter` adds one level to the whole model (level 0, 1, ...),
so ``lora.<k>`` names the same adapter in every module it touches even when a later level targets
fewer modules. ``A``/``B`` have the shapes of PEFT's ``lora_A.weight``/``lora_B.weight``.

Forward::

    y = F.linear(x, W, b) + sum_k scaling_k * B_k(A_k(dropout_k(x)))

where each adapter's ``+ scaling_k * B_k(·)`` is one GEMM accumulating into the base output
(``addmm_`` with ``alpha = scaling_k``, :meth:`LoraAdapter.add_to_`), with ``A_k``, ``B_k`` cast
to ``x.dtype`` (fp32 master weights, computed in the activation dtype; under FSDP2 mixed
precision they already arrive in bf16 and the cast is a no-op). Base weights are never cast or
trained. ``scaling = alpha / sqrt(r)`` with rsLoRA, ``alpha / r`` otherwise.

Life cycle (a sharded run builds on the meta device and copies :func:`lora_init_values` into the
shards instead of passing ``seed``: see ``engine.parallel``)::

    apply_lora(model, LoraConfig(), seed=0)   # wrap, freeze the rest, PEFT's init (A kaiming, B 0)
    ...train trainable_lora_parameters(model)...
    config, weights = adapter_state(model)    # the newest level: exact LoraConfig, {module: (A, B)}
    merge_lora_(model)                        # fold every adapter into W, back to plain nn.Linear

Adapters read from a file are added with :func:`attach_adapter` (``engine.peft_format`` reads and
writes PEFT's files and holds ``load_peft_adapter``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import PROJECTIONS, train_default
from engine.errors import LoraError


# One adapter level's values: module name -> (A (r, in_features), B (out_features, r)).
AdapterWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]

# Our adapter parameter names: "<module>.lora.<level>.A" / ".B".
_LORA_PARAM_RE = re.compile(r"^(?P<module>.+)\.lora\.(?P<level>\d+)\.(?P<ab>[AB])$")

_MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraConfig:
    """One adapter's hyper-parameters. Defaults are the trainer's, i.e. the paper's setting (r 32,
    alpha 64, rsLoRA, no dropout, all seven projections: `engine.config.TrainConfig`).

    ``target_modules`` follows PEFT's matching: a module is targeted when its full name equals an
    entry or ends with ``"." + entry`` (so ``"q_proj"`` and ``"self_attn.q_proj"`` both work).
    """

    r: int = train_default("lora_r")
    alpha: float = train_default("lora_alpha")
    dropout: float = train_default("lora_dropout")
    use_rslora: bool = train_default("use_rslora")
    target_modules: tuple[str, ...] = field(default=PROJECTIONS)

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
        dropout_ok = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not dropout_ok or not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"LoRA dropout must be a number in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise LoraError(f"target_modules must be a non-empty list of module names, got {self.target_modules!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scaling(self) -> float:
        """PEFT's: ``alpha / sqrt(r)`` (rsLoRA) or ``alpha / r``."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def selects(self, module_name: str) -> bool:
        """Whether ``target_modules`` selects the module of this full name."""
        return any(_matches(module_name, t) for t in self.target_modules)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class LoraAdapter(nn.Module):
    """One low-rank update: parameters ``A`` (r, in) and ``B`` (out, r), fp32 master weights.

    Not called as a module: :class:`LoraLinear` adds it into the base output with :meth:`add_to_`.
    """

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, *,
                 device: torch.device | str | None = None, trainable: bool = True):
        super().__init__()
        self.r = config.r
        self.alpha = config.alpha
        self.use_rslora = config.use_rslora
        self.scaling = config.scaling
        self.dropout_p = config.dropout
        self.A = nn.Parameter(torch.empty(self.r, in_features, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.empty(out_features, self.r, device=device, dtype=torch.float32))
        # As PEFT: a real dropout module only when p > 0 (active in training mode only).
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.trainable = True
        self.set_trainable(trainable)

    def set_trainable(self, trainable: bool) -> None:
        self.trainable = bool(trainable)
        self.A.requires_grad_(self.trainable)
        self.B.requires_grad_(self.trainable)

    def add_to_(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + delta(x)`` for 2-D ``x`` (tokens, in), written into ``out`` (tokens, out: a base
        layer's output, not a view, which autograd does not keep) by one GEMM that accumulates
        into it with ``alpha = scaling``: the (tokens × out) product is never materialised, scaled
        and added as separate passes (PEFT's three). Rounds once where PEFT rounds three times, so
        it is at least as close to the exact sum. Computed in ``x.dtype``."""
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
        """Base output plus every adapter's, on ``x`` reshaped to 2-D rows.

        Reshape contract with the decoder's saved-tensor hooks (``engine/models/lean.py``, put
        around the projections by ``engine/models/decoder.py``): ``x2`` below is a reshape of
        **all** of ``x`` into (tokens, in_features), a view since the decoder's inputs here are
        contiguous (a norm's output, silu(gate)·up), and this one ``x2`` is passed to the base
        matmul and to every adapter. The base weight is frozen, so only each adapter's first
        matmul saves it (for ``A``'s gradient). The hooks recognise a saved tensor that is the
        block's output or a contiguous view of all of it (same storage start, dtype, device and
        element count), keep the block's inputs instead and rebuild it in backward: that is why a
        norm's output costs no activation memory although q/k/v's adapters all need it.

        Changes that break it:

        * handing the adapters anything but that view: a copy (casting ``x`` to the adapters'
          dtype as PEFT does, ``.contiguous()``, ``.clone()``), a subset of rows (only trained
          tokens, say) or chunks. Numerically harmless, but every adapter then saves its own
          (tokens × in_features) tensor, beyond what ``engine.memory`` estimates (the memory
          test in ``tests/test_lean.py`` fails, in its run without activation checkpointing);
        * writing into ``x`` or ``x2`` in place (an in-place dropout, a ``mul_``): the hooks
          rebuild the unmodified values, so the gradients are silently wrong (autograd's in-place
          check does not see through saved-tensor hooks).

        With ``dropout > 0`` each adapter saves its own dropped input (a new tensor): correct, but
        not in the memory estimate.
        """
        if not self.lora:
            return F.linear(x, self.weight, self.bias)
        # 2-D also because for 3-D input F.linear's output would be a view, and accumulating into
        # a view costs autograd a copy of the gradient in backward.
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, self.weight, self.bias)
        for adapter in self.lora.values():
            out = adapter.add_to_(out, x2)
        return out.view(*x.shape[:-1], out.shape[-1])


# ---------------------------------------------------------------------------------------------
# Choosing and wrapping targets
# ---------------------------------------------------------------------------------------------


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return "\n  " + shown + (f"\n  ... and {more} more" if more > 0 else "")


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _tied_linear_names(model: nn.Module, linears: Mapping[str, nn.Linear]) -> set[str]:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {name for name, m in linears.items() if counts.get(id(m.weight), 0) > 1}


def _select_targets(model: nn.Module, config: LoraConfig, what: str) -> dict[str, nn.Linear]:
    """Linear modules selected by ``config.target_modules``; every entry must match something,
    and the LM head and tied weights are refused."""
    linears = _linear_modules(model)
    unmatched = [t for t in config.target_modules if not any(_matches(n, t) for n in linears)]
    if unmatched:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise LoraError(
            f"{what}: target module(s) {unmatched} match no linear layer of the model; "
            f"its linear layers are named {leaf_names} (full names like {next(iter(linears), '?')!r})"
        )
    targets = {n: m for n, m in linears.items() if config.selects(n)}
    if "lm_head" in targets:
        raise LoraError(
            f"{what}: LoRA on lm_head is not supported (the fused loss reads lm_head.weight directly); "
            "target the decoder projections only"
        )
    tied = sorted(_tied_linear_names(model, targets))
    if tied:
        raise LoraError(f"{what}: cannot put LoRA on linear layers with tied (shared) weights: {tied}")
    return targets


def _levels(model: nn.Module) -> list[int]:
    return sorted({int(k) for m in model.modules() if isinstance(m, LoraLinear) for k in m.lora.keys()})


def _level_modules(model: nn.Module, level: int) -> dict[str, LoraAdapter]:
    key = str(level)
    return {
        name: m.lora[key] for name, m in model.named_modules() if isinstance(m, LoraLinear) and key in m.lora
    }


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


def _add_adapters(model: nn.Module, targets: Mapping[str, nn.Linear], config: LoraConfig, trainable: bool) -> int:
    """Wrap ``targets`` (if not yet wrapped) and add one new adapter level to each; returns the level."""
    existing = _levels(model)
    level = existing[-1] + 1 if existing else 0
    for name, linear in targets.items():
        module = linear if isinstance(linear, LoraLinear) else LoraLinear.wrap(linear)
        if module is not linear:
            _set_module(model, name, module)
        adapter = LoraAdapter(module.in_features, module.out_features, config,
                              device=module.weight.device, trainable=trainable)
        adapter.train(module.training)
        if adapter.A.device.type != "meta":
            # Uninitialised until values are copied in: NaN so that forgetting it fails loudly
            # instead of training from garbage.
            with torch.no_grad():
                adapter.A.fill_(float("nan"))
                adapter.B.zero_()
        module.lora[str(level)] = adapter
    return level


def _on_meta(targets: Mapping[str, nn.Linear]) -> bool:
    return any(m.weight.device.type == "meta" for m in targets.values())


# ---------------------------------------------------------------------------------------------
# Adding adapters: new (trainable) or with given values
# ---------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, config: LoraConfig, *, seed: int | None = None) -> list[str]:
    """Wrap every linear layer matched by ``config.target_modules`` with a new trainable adapter.

    Freezes every other parameter, earlier adapters included (calling it again stacks a new
    trainable adapter on frozen earlier ones). Adapter parameters are fp32 on the base weight's
    device; on the meta device nothing is allocated. With ``seed`` the new adapter gets
    :func:`lora_init_values` (needs a materialised model); without it, on a real device, ``A``
    holds NaN until the caller copies values in. Returns the wrapped module names.
    """
    if not isinstance(config, LoraConfig):
        raise LoraError(f"config must be a LoraConfig, got {type(config).__name__}")
    targets = _select_targets(model, config, "apply_lora")
    if seed is not None and _on_meta(targets):
        raise LoraError(
            "apply_lora: seed needs a materialised model, this one is on the meta device; leave seed "
            "out and copy lora_init_values(model, seed) into the parameters after to_empty"
        )
    _freeze_all(model)
    _add_adapters(model, targets, config, trainable=True)
    if seed is not None:
        with torch.no_grad():
            for name, value in lora_init_values(model, seed).items():
                model.get_parameter(name).copy_(value)
    return list(targets)


@torch.no_grad()
def attach_adapter(
    model: nn.Module,
    config: LoraConfig,
    weights: AdapterWeights,
    *,
    trainable: bool = False,
    values_out: dict[str, torch.Tensor] | None = None,
    source: str = "attach_adapter",
) -> None:
    """Stack an adapter with given values on ``model`` as a new level.

    ``weights`` must hold exactly the modules ``config.target_modules`` selects, with ``A`` of
    shape (r, in_features) and ``B`` (out_features, r). Every problem (modules without values,
    values for modules not selected or absent, wrong shapes) is listed in one LoraError, headed
    by ``source``, before anything is changed. With ``trainable`` the new adapter is trained and
    everything else frozen (as :func:`apply_lora`); otherwise it is frozen and other parameters
    keep their flags.

    On a meta-device model (the sharded-loading path) pass ``values_out``: the adapter structure
    is added and its fp32 values stored there by parameter name, for the caller to copy into the
    materialised (possibly sharded) parameters.
    """
    targets = _select_targets(model, config, source)
    if values_out is None and _on_meta(targets):
        raise LoraError(f"{source}: the model is on the meta device; materialise it first (to_empty) or pass values_out")
    linears = _linear_modules(model)
    problems = []
    missing = [n for n in targets if n not in weights]
    if missing:
        problems.append(f"no values for {len(missing)} module(s) that target_modules select:{_listing(missing)}")
    unexpected = [
        f"{n} ({'not selected by target_modules' if n in linears else 'no such linear layer in the model'})"
        for n in weights if n not in targets
    ]
    if unexpected:
        problems.append(f"values for {len(unexpected)} module(s) the adapter cannot go on:{_listing(unexpected)}")
    for name, linear in targets.items():
        if name not in weights:
            continue
        expected = {"A": (config.r, linear.in_features), "B": (linear.out_features, config.r)}
        for ab, tensor in zip("AB", weights[name]):
            if tuple(tensor.shape) != expected[ab]:
                problems.append(
                    f"{name}: {ab} has shape {tuple(tensor.shape)}, expected {expected[ab]} "
                    f"(in_features {linear.in_features}, out_features {linear.out_features}, r {config.r}): "
                    "adapter made for a different base model? Use it with the model it was trained on"
                )
    if missing or unexpected:
        problems.append("(is the adapter for this base model, and do its target_modules describe its tensors?)")
    if problems:
        raise LoraError(f"{source}:\n" + "\n".join(problems))

    if trainable:
        _freeze_all(model)
    level = _add_adapters(model, targets, config, trainable=trainable)
    for name, adapter in _level_modules(model, level).items():
        for ab, value in zip("AB", weights[name]):
            if values_out is None:
                getattr(adapter, ab).copy_(value)
            else:
                values_out[f"{name}.lora.{level}.{ab}"] = value.float()


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
    model. A sharded caller copies each value into its shard (``engine.parallel.copy_full_``).
    """
    values: dict[str, torch.Tensor] = {}
    for prefix, adapter in _lora_adapters(model):
        if not adapter.trainable:
            continue
        # Seeded by the module name without the stack level: a stage trained on top of a stacked
        # adapter (level 1) starts from the same values as on the merged model (level 0).
        module_name = prefix.rsplit(".lora.", 1)[0]
        generator = torch.Generator(device="cpu").manual_seed(_param_seed(seed, f"{module_name}.A"))
        a = torch.empty(tuple(adapter.A.shape), dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        values[f"{prefix}.A"] = a
        values[f"{prefix}.B"] = torch.zeros(tuple(adapter.B.shape), dtype=torch.float32)
    return values


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


# ---------------------------------------------------------------------------------------------
# One level's config and values
# ---------------------------------------------------------------------------------------------


def _full(t: torch.Tensor) -> torch.Tensor:
    # A sharded DTensor is gathered (a collective: every rank must make the same calls).
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state(model: nn.Module, index: int = -1) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One adapter level as (its LoraConfig, {module name: (A, B)}), what ``attach_adapter`` takes.

    ``index`` counts stack levels, oldest first (-1: the newest). The config describes the level
    exactly: its r / alpha / dropout / rsLoRA, and target_modules selecting exactly the wrapped
    modules (leaf names when the level covers every linear of those names, else full module
    names). Tensors are the fp32 masters, not copied; sharded ones are gathered, so under FSDP
    every rank must call this (a collective).
    """
    levels = _levels(model)
    if not levels:
        raise LoraError("the model has no LoRA adapter")
    try:
        level = levels[index]
    except IndexError:
        raise LoraError(f"adapter index {index} out of range: the model has adapter levels {levels}") from None
    adapters = _level_modules(model, level)
    hyper = {(a.r, a.alpha, a.dropout_p, a.use_rslora) for a in adapters.values()}
    if len(hyper) != 1:
        raise LoraError(f"adapter level {level} mixes hyper-parameters {sorted(hyper)}; one level has one r/alpha")
    r, alpha, dropout, use_rslora = hyper.pop()
    leaves = sorted({n.rsplit(".", 1)[-1] for n in adapters})
    covers_all = all(n in adapters for n in _linear_modules(model) if n.rsplit(".", 1)[-1] in leaves)
    targets = tuple(leaves) if covers_all else tuple(sorted(adapters))
    config = LoraConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, target_modules=targets)
    weights = {name: (_full(a.A.detach()), _full(a.B.detach())) for name, a in adapters.items()}
    return config, weights


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
    "AdapterWeights",
    "LoraAdapter",
    "LoraConfig",
    "LoraError",
    "LoraLinear",
    "adapter_state",
    "apply_lora",
    "attach_adapter",
    "is_lora_parameter_name",
    "lora_init_values",
    "merge_lora_",
    "named_trainable_lora_parameters",
    "trainable_lora_parameters",
]
