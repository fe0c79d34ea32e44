"""Data parallelism for training: process group, activation checkpointing, FSDP2, sharded tensors.

Parallelism is applied to a built model from outside, in torchtitan's order; the model file has
no distributed code::

    dist = init_distributed()                        # torchrun env, or a single process
    with torch.device("meta"):
        model = CausalLM(args)                       # no memory
    model.to(torch.bfloat16)                         # still meta: the recorded dtype only
    lora.apply_lora(model, lora.LoraConfig())        # trainable fp32 adapters, base frozen
    apply_activation_checkpointing(model)            # 1. per decoder layer, names unchanged
    # (2. torch.compile would go here)
    apply_fsdp(model, param_dtype=torch.bfloat16)    # 3. fully_shard layers, then the root
    model.to_empty(device=dist.device)
    load_safetensors(model, ckpt_dir, expect_missing=lora.is_lora_parameter_name)  # each rank its rows
    for name, value in lora.lora_init_values(model, seed).items():
        copy_full_(model.get_parameter(name), value)  # identical init on any world size

``engine.assemble.build_model`` is that sequence, the one the trainer, the benchmark and the
evals use.

Gradient semantics: after ``backward`` every sharded gradient holds the plain **sum** over ranks
of the per-rank gradients (FSDP2's default is the mean). The trainer divides the loss by the
global number of trained tokens itself, so it needs the sum. :func:`apply_fsdp` sets FSDP2's
gradient divide factor to 1 and forces SUM-only collectives, so the reduce-scatter is a plain
``ReduceOp.SUM`` with no division: no AVG (which has had silent-correctness bugs on some
backends) and no PREMUL_SUM (which a divide factor alone selects, and gloo refuses).

Replication instead of sharding: a model not passed to :func:`apply_fsdp` runs whole on every rank
(all of it loaded by each), and :func:`all_reduce_gradients_` sums the trainable parameters'
gradients over ranks once per optimizer step. For LoRA on a frozen base that fits one GPU this
trades memory for communication: FSDP all-gathers every layer's weights for each micro-batch's
forward and again for its backward (about 2 × 57 GB received per GPU per micro-batch for
Qwen2.5-32B on 8 ranks), replication only the adapters' gradients once per step (1 GiB for r32).

Without a process group (a plain ``python`` run) every function still works: ``apply_fsdp`` is a
no-op, tensors are plain, collectives are identities.

FSDP2 shards every parameter on dim 0 with ``torch.chunk`` semantics: with ``n`` rows and ``w``
ranks, each rank holds ``ceil(n / w)`` rows except the last ones, which hold fewer or none.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Dist",
    "all_reduce_gradients_",
    "all_reduce_sum",
    "apply_activation_checkpointing",
    "apply_fsdp",
    "barrier",
    "clip_grad_norm_",
    "copy_full_",
    "destroy_distributed",
    "full_state_dict",
    "gather_full",
    "get_full_optimizer_state",
    "init_distributed",
    "is_activation_checkpointed",
    "is_distributed",
    "is_sharded",
    "local_region",
    "set_full_optimizer_state",
    "set_gradient_sync",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


# --- process group --------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among ``world_size`` and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def is_distributed() -> bool:
    """True when a default process group exists (collectives are real)."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(timeout: timedelta | None = None) -> Dist:
    """Join the process group torchrun describes, or run as one process without any.

    With torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set, initialises the default
    process group (env:// rendezvous) if not done yet: NCCL for CUDA tensors plus gloo for CPU
    tensors when CUDA is available (and the CUDA device is set to ``cuda:LOCAL_RANK``), gloo
    alone otherwise. With none of them set: a single process, no process group, device
    ``cuda:0`` if CUDA is available else ``cpu``. Setting only some of them is an error.
    """
    present = [var for var in _TORCHRUN_VARS if var in os.environ]
    use_cuda = torch.cuda.is_available()
    if not present:
        if is_distributed():  # initialised by the caller some other way
            rank, world = dist.get_rank(), dist.get_world_size()
            local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        else:
            rank, world, local_rank = 0, 1, 0
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)
    if len(present) != len(_TORCHRUN_VARS):
        missing = sorted(set(_TORCHRUN_VARS) - set(present))
        raise RuntimeError(
            f"incomplete torchrun environment: {', '.join(present)} set but not {', '.join(missing)}; "
            "launch with torchrun, or unset them for a single process"
        )
    rank, world, local_rank = (int(os.environ[var]) for var in _TORCHRUN_VARS)
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not is_distributed():
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    if (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(
            f"process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but the environment says {rank} of {world}"
        )
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Tear down the default process group, if any."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (identity without a process group).

    Uses ``ReduceOp.SUM`` only: divide afterwards yourself rather than reduce with AVG.
    """
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# --- activation checkpointing ---------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a :class:`engine.models.CausalLM` (``model.model.layers``)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"expected a CausalLM with model.layers (an nn.ModuleList), got {type(model).__name__}")
    return list(layers)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # The class's forward, recomputed in backward. FSDP's hooks live in __call__, outside this
    # function, so recomputation runs on the parameters FSDP unsharded for backward.
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, layers: int | None = None) -> nn.Module:
    """Recompute decoder layers' activations in backward instead of storing them: every layer, or
    the first ``layers`` of them (fewer recompute less and hold more memory; ``engine.memory``
    estimates what fits). Afterwards exactly those layers are checkpointed: calling it again with
    another count re-plans, and ``layers=0`` undoes it.

    Each chosen layer's ``forward`` is replaced, on the instance, by one that runs the class's
    forward under non-reentrant ``torch.utils.checkpoint`` (RNG state preserved, so dropout masks
    are identical in the recomputation). No wrapper module is inserted: parameter and state-dict
    names do not change, so loading and saving by HF name work as before. Apply before
    ``apply_fsdp``. Returns ``model``.
    """
    all_layers = _decoder_layers(model)
    if layers is not None and layers < 0:
        raise ValueError(f"layers must be >= 0 (or None for all), got {layers}")
    count = len(all_layers) if layers is None else layers
    for i, layer in enumerate(all_layers):
        if i < count and not is_activation_checkpointed(layer):
            layer.forward = types.MethodType(_checkpointed_forward, layer)
        elif i >= count and is_activation_checkpointed(layer):
            del layer.forward
    return model


def is_activation_checkpointed(layer: nn.Module) -> bool:
    """Whether :func:`apply_activation_checkpointing` wrapped this layer."""
    forward = vars(layer).get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


# --- FSDP2 ----------------------------------------------------------------------------------


def _default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def apply_fsdp(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    mesh: Any = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``) on a 1-D data-parallel mesh; returns it.

    Groups, each all-gathered for its forward and resharded after it when
    ``reshard_after_forward`` (FSDP2's default would keep the root unsharded after forward; then
    after a ``no_grad`` forward, which has no backward to reshard it, ``named_parameters()`` would
    yield plain full tensors for the root's parameters until the next forward):

    * each decoder layer, all-gathered again in backward (its adapters' gradients need the frozen
      weights); each layer's forward prefetches the next one's, the last layer's the LM head's;
    * the input embedding and the LM head, each alone, or together in one group when tied (one
      matrix, then unsharded from the embedding's call to the head's). Neither is all-gathered
      in backward: the embedding's backward never runs (frozen weight, integer input), and the
      head's backward does not read its weight when the loss is the fused linear cross-entropy,
      which computes its gradient in the forward (``kernels/cross_entropy.py``; decided call by
      call, see :func:`_head_needs_weight_in_backward`: logits, the torch reference loss or a
      trainable head do get the all-gather);
    * the root: the final norm alone, all-gathered in backward (h elements), as its backward
      reads its weight.

    Parameters keep their names and become DTensors sharded on dim 0.

    ``MixedPrecisionPolicy(param_dtype, reduce_dtype)``: parameters are all-gathered and used in
    ``param_dtype`` (None: their own dtype, which may differ between frozen bf16 base weights
    and trainable fp32 adapters), gradients are reduced in ``reduce_dtype`` and stored in the
    parameter's dtype. FSDP2 requires all *trainable* parameters of one group to share a dtype.

    Gradients are **summed** over ranks, not averaged (see the module docstring). Call on a
    model built on the meta device (then ``to_empty`` and `engine.models.loading.load_safetensors`) or
    on a materialised one. Without a process group this is a no-op: the model keeps its own
    dtypes and nothing is cast.
    """
    if not is_distributed():
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = mesh if mesh is not None else _default_mesh()
    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp expects a 1-D device mesh, got {mesh.ndim}-D")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)

    def shard(module: nn.Module | list[nn.Module]) -> None:
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)

    layers = _decoder_layers(model)
    for layer in layers:
        shard(layer)
    embed, head = model.model.embed_tokens, model.lm_head
    tied = head.weight is embed.weight
    if tied:
        shard([embed, head])  # one group: FSDP2 refuses a parameter shared by two
    else:
        shard(embed)
        shard(head)
    shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            _set_sum_reduction(module)

    if not tied and not embed.weight.requires_grad:
        embed.set_unshard_in_backward(False)
    head.register_forward_pre_hook(_decide_head_unshard_in_backward, with_kwargs=True)
    # Each layer's all-gather starts as soon as the previous layer's has landed, not when the CPU
    # reaches the layer: its transfer overlaps the previous layer's compute even when the CPU
    # does not run ahead (the memory estimate counts what is in flight). The last layer
    # prefetches the untied head (a tied one is unsharded since the embedding). Backward keeps
    # FSDP2's default of prefetching the next layer.
    for layer, following in zip(layers, layers[1:] + ([] if tied else [head])):
        layer.set_modules_to_forward_prefetch([following])
    return model


def _head_needs_weight_in_backward(hidden: torch.Tensor, targets: torch.Tensor | None) -> bool:
    """Whether the backward of one LM-head call reads the head's weight.

    Logits (no ``targets``): yes, the matmul's input gradient is ``d_logits @ weight``. The loss
    (``targets``) on the Triton path of ``kernels.cross_entropy.linear_cross_entropy``: no, its
    forward computes d_hidden (and d_weight, for a trainable head) chunk by chunk and its backward
    only scales them. On the torch reference path (CPU by default) the loss is autograd through
    the logits matmul: yes. Decided by the loss's own dispatch predicate
    (``kernels.cross_entropy.use_triton``), on ``hidden`` alone: the weight lives on the same
    device. Were it ever wrong, backward would read a freed (zero-size) storage and fail; it
    could not compute silently with stale values."""
    from kernels import cross_entropy

    return targets is None or not cross_entropy.use_triton(hidden)


def _decide_head_unshard_in_backward(head: nn.Module, args: tuple, kwargs: dict) -> None:
    # Forward pre-hook of the LM head (an FSDP module, or in the group of a tied embedding):
    # decides, call by call, whether FSDP2's pre-backward hook all-gathers its group again. A
    # trainable head always needs it (FSDP reduce-scatters its gradient from the unsharded
    # parameter).
    hidden, targets = args[0], (args[1] if len(args) > 1 else kwargs.get("targets"))
    head.set_unshard_in_backward(head.weight.requires_grad or _head_needs_weight_in_backward(hidden, targets))


def _set_sum_reduction(module: Any) -> None:
    # torch 2.13 names: set_gradient_divide_factor (set_reduce_scatter_divide_factor is its
    # deprecated alias) and set_force_sum_reduction_for_comms. With factor 1
    # and forced SUM, FSDP2's _get_gradient_divide_factors returns (None, 1.0, SUM, SUM): a plain
    # SUM reduce-scatter and no division. Factor 1 alone would use ReduceOp.PREMUL_SUM(1.0),
    # which NCCL supports but gloo does not.
    if not (hasattr(module, "set_gradient_divide_factor") and hasattr(module, "set_force_sum_reduction_for_comms")):
        raise RuntimeError(
            f"torch {torch.__version__}: FSDP2 lacks set_gradient_divide_factor / "
            "set_force_sum_reduction_for_comms, needed for summed gradients"
        )
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn the cross-rank gradient reduction of the next backward on or off (accumulation).

    With ``enabled=False`` FSDP2 accumulates each rank's unsharded gradients locally (upcast to
    ``reduce_dtype`` when the compute dtype differs) and communicates nothing; the next backward with ``enabled=True``
    reduce-scatters the accumulated sum (summed over ranks, as always). Call it before every
    micro-batch's backward: False for all but the last of a step. No-op without FSDP.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled, recurse=False)


# --- sharded tensors ------------------------------------------------------------------------


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_region(tensor: torch.Tensor) -> tuple[slice, ...] | None:
    """The index of this rank's shard within the full tensor, or None for a plain tensor.

    For a DTensor on a 1-D mesh, sharded (``Shard(d)``, torch.chunk semantics, as FSDP2 and
    DTensor use) or replicated. The result is checked against ``tensor.to_local().shape``.
    """
    if not _is_dtensor(tensor):
        return None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = tensor.device_mesh, tensor.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise NotImplementedError(f"only 1-D meshes are supported, got placements {placements}")
    shape = tuple(tensor.shape)
    region = [slice(0, n) for n in shape]
    placement = placements[0]
    if type(placement) is Shard:
        dim, world, rank = placement.dim, mesh.size(), mesh.get_local_rank()
        n = shape[dim]
        chunk = -(-n // world) if n else 0
        start = min(rank * chunk, n)
        region[dim] = slice(start, min(start + chunk, n))
    elif not isinstance(placement, Replicate):
        raise NotImplementedError(f"unsupported placement {placement!r}")
    local_shape = tuple(s.stop - s.start for s in region)
    if local_shape != tuple(tensor.to_local().shape):
        raise RuntimeError(
            f"shard layout mismatch: computed local shape {local_shape} for global {shape} "
            f"with {placement}, but the local tensor has shape {tuple(tensor.to_local().shape)}"
        )
    return tuple(region)


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Copy the full (unsharded) ``full`` into ``param``, sharded or not; returns ``param``.

    Every rank passes the same full tensor and keeps its own rows (converted to ``param``'s
    dtype and device), so initialisation is identical whatever the world size.
    """
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"copy_full_: full tensor has shape {tuple(full.shape)}, parameter {tuple(param.shape)}")
    region = local_region(param)
    if region is None:
        param.copy_(full)
    else:
        local = param.to_local()
        if local.numel():
            local.copy_(full[region])
    return param


@torch.no_grad()
def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor (a collective: every rank must call), or ``tensor`` itself,
    detached."""
    if _is_dtensor(tensor):
        return tensor.full_tensor().detach()
    return tensor.detach()


def full_state_dict(
    named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    to_cpu: bool = True,
) -> dict[str, torch.Tensor]:
    """``{name: full tensor}`` for e.g. the trainable LoRA parameters, on every rank.

    A collective when any tensor is a DTensor: every rank must call it with the same names in
    the same order (e.g. ``(n, p) for n, p in model.named_parameters() if p.requires_grad``);
    typically rank 0 then saves the result. Tensors are gathered one at a time, so peak extra
    memory is one full tensor plus the result.
    """
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    out: dict[str, torch.Tensor] = {}
    for name, tensor in items:
        full = gather_full(tensor)
        out[name] = full.cpu() if to_cpu else full
    return out


# --- gradients ------------------------------------------------------------------------------


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`apply_fsdp` sharded this model (under a process group)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@torch.no_grad()
def all_reduce_gradients_(parameters: Iterable[torch.Tensor], bucket_elements: int = 1 << 26) -> None:
    """Sum the plain (replicated, non-DTensor) gradients of ``parameters`` over all ranks, in
    flat buckets of at most ``bucket_elements`` per dtype (a 256 MiB fp32 bucket by default).
    Every rank must call it with the same parameters in the same order. No-op without a process
    group; DTensor gradients (FSDP reduces those itself) are left alone."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None and not _is_dtensor(p.grad)]
    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    for g in grads:
        per_dtype = buckets.setdefault(g.dtype, [[]])
        if per_dtype[-1] and sum(t.numel() for t in per_dtype[-1]) + g.numel() > bucket_elements:
            per_dtype.append([])
        per_dtype[-1].append(g)
    for bucket in (b for per_dtype in buckets.values() for b in per_dtype if b):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def _total_norm(grads: list[torch.Tensor], norm_type: float, foreach: bool | None) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type, error_if_nonfinite=False, foreach=foreach)
    if _is_dtensor(norm):
        norm = norm.full_tensor()  # reduces the per-rank partial norms
    return norm.float()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> float:
    """Clip gradients in place to total norm ``max_norm``; return the total norm before clipping.

    The norm is over the full (unsharded) gradients, equal to the single-process value: DTensor
    (FSDP) gradients' partial norms are reduced across ranks, plain gradients are taken as they
    are, and the two kinds may be mixed. A collective when any gradient is a DTensor.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    sharded = [p.grad for p in params if _is_dtensor(p.grad)]
    plain = [p.grad for p in params if not _is_dtensor(p.grad)]
    norms = [_total_norm(g, norm_type, foreach) for g in (sharded, plain) if g]
    if len(norms) == 1:
        total = norms[0]
    elif norm_type == float("inf"):
        total = torch.maximum(norms[0], norms[1].to(norms[0].device))
    else:
        total = (norms[0] ** norm_type + norms[1].to(norms[0].device) ** norm_type) ** (1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite: {total.item()}")
    total_norm = float(total.item())
    # torch.nn.utils.clip_grads_with_norm_'s coefficient; applied even when 1 (as torch does), so
    # a non-finite norm poisons the gradients visibly instead of silently skipping the clip.
    clip_coef = min(max_norm / (total_norm + 1e-6), 1.0)
    for g in sharded + plain:
        g.mul_(clip_coef)
    return total_norm


# --- optimizer state ------------------------------------------------------------------------


def get_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with full (unsharded) CPU tensors keyed by parameter name.

    World-size independent: ``{"state": {name: {"step", "exp_avg", ...}}, "param_groups":
    [{..., "params": [names]}]}``. A collective under FSDP; only rank 0 gets the state, the
    other ranks get ``{}`` (``torch.distributed.checkpoint.state_dict`` with
    ``full_state_dict=True, cpu_offload=True``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def set_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a state from :func:`get_full_optimizer_state`, saved under any world size.

    Under a process group only rank 0's ``state`` is read (others may pass ``{}``): it is
    broadcast and each rank keeps its own shard. A collective.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=is_distributed())
    # torch creates a fresh optimizer's state (which it needs, to learn the shards' layout) by
    # one step with zero gradients and lr 0, but skips that when any parameter has a gradient,
    # and then fails ("Expected device to be set"). Hide existing gradients for the duration.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    if not optimizer.state:
        for p in params:
            p.grad = None
    try:
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)
    finally:
        for p, g in zip(params, grads):
            p.grad = g
