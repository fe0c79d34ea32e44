"""Build a :class:`CausalLM` from an HF checkpoint directory (or hub id) of safetensors files.

The model is built on the meta device (no memory), given real but uninitialised storage in the
requested dtype with ``to_empty``, then filled one tensor at a time from the safetensors files,
converting each tensor to that dtype as it is copied. Peak extra memory is one checkpoint tensor,
never a second copy of the model.

Every name, shape and dtype is checked from the safetensors headers before any tensor data is
read, so a wrong or damaged checkpoint fails fast with one error listing every problem.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.errors import CheckpointError, ConfigError
from engine.hub import resolve_checkpoint_dir

from .config import ModelArgs
from .decoder import CausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype codes that convert losslessly in meaning to the model's float dtype. FP8 is
# excluded: FP8 checkpoints need their scale tensors, not a plain cast.
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

# How many names an error message lists before summarising the rest.
_MAX_LISTED = 20


def from_pretrained(
    path_or_hub_id: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> CausalLM:
    """Load an HF ``Qwen2ForCausalLM`` / ``SeedOssForCausalLM`` checkpoint.

    ``path_or_hub_id`` is a local checkpoint directory, or else a hub repo id, which is fetched
    (config and safetensors only) with ``huggingface_hub.snapshot_download``. All parameters are
    converted to ``dtype`` and placed on ``device``. The model is returned in eval mode, as
    transformers does; call ``.train()`` to enable dropout.
    """
    ckpt_dir = resolve_checkpoint_dir(path_or_hub_id)
    config_path = ckpt_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in checkpoint directory {ckpt_dir}")
    try:
        args = ModelArgs.from_hf_config(_read_json(config_path))
    except ConfigError as e:
        raise ConfigError(f"{config_path}: {e}") from None

    with torch.device("meta"):
        model = CausalLM(args)
    model.to(dtype=dtype)  # still on meta: only the recorded dtype changes
    model.to_empty(device=device)
    load_safetensors(model, ckpt_dir)
    return model.eval()


def _read_json(path: Path) -> Any:
    """A checkpoint's JSON file; one that is not valid JSON raises CheckpointError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the checkpoint is damaged: download or copy it "
                              "again") from None


def _open(path: Path):
    """safe_open, with a truncated or corrupt file raising CheckpointError naming it (safetensors
    checks the header and that the data covers it exactly)."""
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the checkpoint is damaged (a "
                              "truncated download?): download or copy it again") from None


def _tensor_files(ckpt_dir: Path) -> dict[Path, set[str] | None]:
    """Safetensors files to read -> tensor names the index places there (None for a single file)."""
    index_path = ckpt_dir / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map")
        files: dict[Path, set[str] | None] = defaultdict(set)
        for name, filename in weight_map.items():
            files[ckpt_dir / filename].add(name)
        absent = sorted(str(path.name) for path in files if not path.is_file())
        if absent:
            raise CheckpointError(f"{index_path} names shard file(s) that do not exist: {', '.join(absent)}")
        return dict(files)
    single = ckpt_dir / SINGLE_FILE
    if single.is_file():
        return {single: None}
    found = sorted(p.name for p in ckpt_dir.glob("*.safetensors"))
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {ckpt_dir}"
        + (f" (found other safetensors files: {', '.join(found)})" if found else "")
    )


def _listing(items: list[str]) -> str:
    shown = "\n  ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return "\n  " + shown + (f"\n  ... and {more} more" if more > 0 else "")


@torch.no_grad()
def load_safetensors(
    model: nn.Module,
    ckpt_dir: str | Path,
    *,
    expect_missing: Callable[[str], bool] | Collection[str] | None = None,
) -> nn.Module:
    """Fill every parameter of a materialised ``model`` from the checkpoint's safetensors files, by
    HF name; returns ``model``.

    Validation first (:func:`iter_checkpoint`: every name, shape and dtype from the file headers):
    one :class:`CheckpointError` names each tensor (and its file) that is missing, unexpected,
    mis-shaped or not floating point, before any data is read. ``expect_missing`` (names or a
    predicate) lists parameters the checkpoint may lack, such as LoRA adapters.

    A parameter sharded by FSDP2 (a DTensor, sharded on dim 0) receives only this rank's rows,
    and only those rows are read from the file (``get_slice(name)[start:end]``); a rank whose
    chunk is empty reads nothing. A plain parameter is read whole. Values are converted to the
    parameter's dtype and device. Tied embeddings are re-tied if ``to_empty`` separated them, and
    the non-persistent buffers (rotary ``inv_freq``) are recomputed.
    """
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    on_meta += [name for name, b in model.named_buffers() if b.is_meta]
    if on_meta:
        raise CheckpointError(
            f"model still has {len(on_meta)} tensor(s) on the meta device (e.g. {on_meta[0]}); "
            "call model.to_empty(device=...) before loading"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    from engine.parallel import local_region  # the shard layout is FSDP2's (torch.chunk on dim 0)

    for name, param, tensor_slice in iter_checkpoint(model, ckpt_dir, expect_missing=expect_missing):
        region = local_region(param)
        if region is None:
            param.copy_(tensor_slice[:])  # copy_ converts dtype and device
            continue
        local = param.to_local()
        if local.numel() == 0:
            continue
        # safetensors slices read only the requested rows of a row-major tensor.
        local.copy_(tensor_slice[region] if region else tensor_slice[:])  # region () for a 0-d tensor
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    return model


def iter_checkpoint(
    model: nn.Module,
    ckpt_dir: str | Path,
    *,
    expect_missing: Callable[[str], bool] | Collection[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """Validate the checkpoint against ``model``, then iterate ``(name, parameter, slice)``.

    Validation (every name, shape and dtype, from the safetensors headers only) runs when this
    function is called, before any tensor data is read, and raises one :class:`CheckpointError`
    listing every problem. Shapes are compared with ``parameter.shape``, which for a sharded
    DTensor parameter is the global shape.

    The returned iterator opens each file once and yields, for every parameter the checkpoint
    holds, its name, the model's parameter, and the safetensors slice reader
    (``safe_open(...).get_slice(name)``): ``slice[:]`` reads the whole tensor, ``slice[a:b]``
    only rows ``a:b``. A slice is valid only until the iterator advances to the next file.

    Tied parameters are visited once, under their first name (``named_parameters``
    de-duplicates); a stored ``lm_head.weight`` is ignored when the config ties embeddings, as HF
    does. ``expect_missing`` (a collection of names or a predicate on names) marks parameters
    the checkpoint may lack, e.g. LoRA adapters; they are skipped when absent and loaded when
    present.
    """
    sources, params = _plan(model, Path(ckpt_dir), expect_missing)
    return _iter_sources(sources, params)


def _plan(
    model: nn.Module,
    ckpt_dir: Path,
    expect_missing: Callable[[str], bool] | Collection[str] | None,
) -> tuple[dict[str, Path], dict[str, torch.Tensor]]:
    """Pass 1, headers only: parameter name -> file holding it, after checking everything."""
    if expect_missing is None:
        may_lack: Callable[[str], bool] = lambda name: False  # noqa: E731
    elif callable(expect_missing):
        may_lack = expect_missing
    else:
        allowed = set(expect_missing)
        may_lack = allowed.__contains__
    files = _tensor_files(ckpt_dir)
    # remove_duplicate drops a tied lm_head.weight: it is the embedding matrix, filled under that name.
    params = dict(model.named_parameters())
    args = getattr(model, "args", None)
    tied_head = "lm_head.weight" if getattr(args, "tie_word_embeddings", False) else None
    architecture = getattr(args, "architecture", type(model).__name__)

    problems: list[str] = []
    unexpected: list[str] = []
    source: dict[str, Path] = {}  # parameter name -> file holding it
    for path, indexed_names in files.items():
        with _open(path) as f:
            names = set(f.keys())
            for name in sorted((indexed_names or set()) - names):
                problems.append(f"{INDEX_FILE} places tensor '{name}' in {path.name}, but that file lacks it")
            for name in sorted(names):
                if name == tied_head:
                    # HF also ignores a stored head when embeddings are tied: the embedding wins.
                    continue
                if name not in params:
                    unexpected.append(f"{name} (in {path.name})")
                    continue
                if name in source:
                    problems.append(f"tensor '{name}' is in both {source[name].name} and {path.name}")
                    continue
                source[name] = path
                header = f.get_slice(name)
                shape, stored_dtype = tuple(header.get_shape()), header.get_dtype()
                expected = tuple(params[name].shape)
                if shape != expected:
                    problems.append(f"tensor '{name}' in {path.name} has shape {shape}, expected {expected}")
                if stored_dtype not in _FLOAT_DTYPES:
                    problems.append(
                        f"tensor '{name}' in {path.name} has dtype {stored_dtype}, expected a floating-point "
                        f"tensor ({'/'.join(_FLOAT_DTYPES)}); quantized or integer checkpoints are not supported"
                    )
    missing = sorted(name for name in set(params) - set(source) if not may_lack(name))
    if missing:
        problems.append(f"checkpoint lacks {len(missing)} tensor(s) the model needs:{_listing(missing)}")
    if unexpected:
        problems.append(
            f"checkpoint has {len(unexpected)} tensor(s) the {architecture} model does not define:"
            f"{_listing(unexpected)}"
        )
    if problems:
        raise CheckpointError(f"cannot load checkpoint {ckpt_dir}:\n" + "\n".join(problems))
    return source, params


def _iter_sources(
    sources: dict[str, Path], params: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """Pass 2: one file open at a time, tensors in file order."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, path in sources.items():
        by_file[path].append(name)
    for path, names in by_file.items():
        with _open(path) as f:
            for name in names:
                yield name, params[name], f.get_slice(name)
